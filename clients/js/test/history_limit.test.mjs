// Against the real binary: with `[history] size = 5`, a client away while 3 messages are
// published gets them on its return (recovered); away while 20 are published, it gets a gap at
// the current position, not a partial replay, and the live stream after it.

import { test, after } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../groupcast.js";
import { Server, Proxy, waitFor, webSocketClass } from "./helpers.mjs";
import { speaksProtocol2, Receiver } from "./scenario.mjs";

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

test("history size 5: away for 3 messages recovers them; away for 20 is a gap, not a partial replay", { timeout: 300_000 }, async (t) => {
  const server = await Server.start({ workers: 2, config: "[history]\nsize = 5\n" });
  cleanup.push(() => server.stop());
  assert.ok(await speaksProtocol2(server.url), "the server answers a protocol-2 join with its position");
  const proxy = await Proxy.start(server.addr);
  cleanup.push(() => proxy.close());
  const receiver = await Receiver.start(proxy.url, "hist");
  cleanup.push(() => receiver.close());
  const publisher = connect(server.url, { WebSocket: webSocketClass() });
  cleanup.push(() => publisher.close());
  const publish = async (from, to) => {
    for (let n = from; n <= to; n++) await publisher.send("hist", { n });
  };

  await publish(1, 2);
  await waitFor("the first two", () => receiver.messages().length === 2);

  // Away while 3 are published: within the history, all come back, once.
  proxy.refuse(true);
  await waitFor("the receiver to notice", () => receiver.gc.state !== "open");
  await publish(3, 5);
  let opens = receiver.opens();
  proxy.refuse(false);
  await waitFor("the receiver back", () => receiver.opens() > opens);
  await waitFor("recovered", () => receiver.count("recovered") === 1);
  assert.deepEqual(receiver.numbers(), [1, 2, 3, 4, 5]);
  assert.equal(receiver.count("gap"), 0);

  // Away while 20 are published: more than the history holds.
  proxy.refuse(true);
  await waitFor("the receiver to notice", () => receiver.gc.state !== "open");
  await publish(6, 25);
  opens = receiver.opens();
  proxy.refuse(false);
  await waitFor("the receiver back", () => receiver.opens() > opens).catch((e) => {
    throw new Error(`${e.message}; states ${JSON.stringify(receiver.states.slice(-8))}`);
  });
  await waitFor("the gap", () => receiver.count("gap") === 1);
  const gap = receiver.log.find((e) => e.kind === "gap");
  assert.deepEqual(
    { epoch: gap.epoch, offset: gap.offset, from: gap.from },
    { epoch: receiver.joinReply.epoch, offset: 25, from: { epoch: receiver.joinReply.epoch, offset: 5 } },
  );
  assert.deepEqual(receiver.numbers(), [1, 2, 3, 4, 5], "nothing of the lost stretch replayed");
  // The live stream goes on after the gap.
  await publish(26, 27);
  await waitFor("the live stream after the gap", () => receiver.messages().length === 7);
  assert.deepEqual(receiver.numbers(), [1, 2, 3, 4, 5, 26, 27]);
  assert.deepEqual(
    receiver.messages().map((m) => m.offset),
    [1, 2, 3, 4, 5, 26, 27],
  );
});
