// Against the real binary: join, send, receive envelopes with offsets 1..n in order; send()
// resolves to the offset; a JSON value arrives as that value; a second member on the other
// worker sees the same order.

import { test, after } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../groupcast.js";
import { Server, waitFor, webSocketClass } from "./helpers.mjs";
import { speaksProtocol2 } from "./scenario.mjs";

let server;
after(async () => server?.stop());

test("join, send, offsets 1..n in order, send resolves to the offset", { timeout: 300_000 }, async (t) => {
  server = await Server.start({
    workers: 2,
    config: "[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n",
  });
  assert.ok(await speaksProtocol2(server.url), "the server answers a protocol-2 join with its position");
  const WebSocket = webSocketClass();
  const a = connect(server.url, { WebSocket });
  const b = connect(server.url, { WebSocket });
  try {
    const gotA = [];
    const gotB = [];
    const ra = await a.join("basic", (m, meta) => gotA.push([meta.offset, m]));
    const rb = await b.join("basic", (m, meta) => gotB.push([meta.offset, m]));
    assert.equal(ra.ok, true);
    assert.equal(typeof ra.epoch, "string");
    assert.equal(ra.offset, 0, "a new group starts at offset 0");
    assert.equal(rb.epoch, ra.epoch);
    const n = 20;
    const offsets = [];
    for (let i = 1; i <= n; i++) {
      // Alternate senders: one total order for both members whoever sends.
      const sender = i % 2 ? a : b;
      offsets.push(await sender.send("basic", i === n ? { last: [1, 2] } : `m${i}`));
    }
    assert.deepEqual(
      offsets,
      Array.from({ length: n }, (_, i) => i + 1),
    );
    await waitFor("every message at both members", () => gotA.length >= n && gotB.length >= n);
    const expected = Array.from({ length: n }, (_, i) => [i + 1, i + 1 === n ? { last: [1, 2] } : `m${i + 1}`]);
    assert.deepEqual(gotA, expected);
    assert.deepEqual(gotB, expected);
    // A late joiner starts at the current offset and sees nothing of the past.
    const c = connect(server.url, { WebSocket });
    try {
      const gotC = [];
      const rc = await c.join("basic", (m, meta) => gotC.push(meta.offset));
      assert.equal(rc.offset, n);
      assert.equal(await c.send("basic", "after"), n + 1);
      await waitFor("the late joiner's own message", () => gotC.length === 1);
      assert.deepEqual(gotC, [n + 1]);
    } finally {
      c.close();
    }
  } finally {
    a.close();
    b.close();
  }
});
