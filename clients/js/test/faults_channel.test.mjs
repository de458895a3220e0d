// Against the real binary, channel bus: a protocol-2 client keeps receiving a numbered stream
// while its worker is SIGKILLed, the instance reloads (a live hand-off, then --close: 1012), the broker (channel process)
// is SIGKILLed and restarted by the master (new epoch: one gap), and its TCP connection is cut.
// At the end it holds every message exactly once in offset order, with the one gap the broker
// restart had to cause, no loss of a publish confirmed before that restart, and no other loss.

import { test, after } from "node:test";
import assert from "node:assert/strict";

import { Server, Proxy, waitFor, channelRow, sleep } from "./helpers.mjs";
import { speaksProtocol2, Receiver, Publisher, underFaults, workerOf, checkHistory } from "./scenario.mjs";

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

const CONFIG = `
[history]
size = 10000
max_recover = 10000
[limits]
commands_per_second = 100000
commands_burst = 100000
`;

test("worker kill, reload, broker restart, TCP cut: every message once, in order, one gap at the broker restart", { timeout: 300_000 }, async (t) => {
  const server = await Server.start({ workers: 2, config: CONFIG });
  cleanup.push(() => server.stop());
  assert.ok(await speaksProtocol2(server.url), "the server answers a protocol-2 join with its position");
  const proxy = await Proxy.start(server.addr);
  cleanup.push(() => proxy.close());
  const receiver = await Receiver.start(proxy.url, "seq");
  cleanup.push(() => receiver.close());
  const publisher = Publisher.start(server.url, "seq", 10);
  cleanup.push(() => publisher.gc.close());
  // What the publisher had sent when the receiver learned of the gap: nothing sent after that
  // may be lost (the new broker is there; publishes wait in the workers' queues until it is).
  let sentAtGap = null;
  receiver.gc.on("gap", () => (sentAtGap ??= publisher.sent));

  let gapsBefore;
  // Publishes confirmed before the broker was killed: the broker had forwarded them (it writes
  // the forwards before the publisher's STAMP), so the restart may not lose them.
  let confirmedAtKill = [];
  await underFaults(receiver, publisher, [
    [
      "SIGKILL of the receiver's worker",
      async () => {
        const pid = await workerOf(server, proxy);
        const opens = receiver.opens();
        server.kill(pid, "SIGKILL");
        await waitFor("the receiver to reconnect", () => receiver.opens() > opens);
        await server.waitReady();
      },
    ],
    [
      "reload (live hand-off: the connection moves, no reconnect)",
      async () => {
        const opens = receiver.opens();
        const closes = receiver.states.filter((s) => s.state === "closed").length;
        await server.reload();
        await sleep(300);
        assert.equal(receiver.opens(), opens, "no reconnect across a hand-off");
        assert.equal(receiver.states.filter((s) => s.state === "closed").length, closes, "not closed");
      },
    ],
    [
      "reload --close (close 1012)",
      async () => {
        const opens = receiver.opens();
        await server.reload("--close");
        await waitFor("the receiver to reconnect", () => receiver.opens() > opens);
        assert.ok(receiver.states.some((s) => s.state === "closed" && s.code === 1012), "closed with 1012");
      },
    ],
    [
      "SIGKILL of the broker",
      async () => {
        const before = channelRow(await server.status()).pid;
        gapsBefore = receiver.count("gap");
        confirmedAtKill = publisher.confirmed();
        server.kill(before, "SIGKILL");
        await server.waitStatus("a new channel process", (r) => channelRow(r)?.pid !== before);
        await server.waitReady();
        await waitFor("the gap of the broker restart", () => receiver.count("gap") > gapsBefore);
      },
    ],
    [
      "TCP connection cut",
      async () => {
        const opens = receiver.opens();
        proxy.cut();
        await waitFor("the receiver to reconnect", () => receiver.opens() > opens);
      },
    ],
  ]);
  assert.equal(gapsBefore, 0, "no gap before the broker restart");
  const gap = receiver.log.find((e) => e.kind === "gap");
  assert.notEqual(gap.epoch, receiver.joinReply.epoch, "the broker restart made a new epoch");
  const { holes, received } = checkHistory(receiver, publisher, { gaps: 1 });
  const got = new Set(receiver.numbers());
  const lostConfirmed = confirmedAtKill.filter((n) => !got.has(n));
  assert.deepEqual(lostConfirmed, [], "publishes confirmed before the broker restart are never lost");
  assert.ok(holes[0][1] <= sentAtGap + 1, `lost messages sent after the gap was known: ${JSON.stringify(holes)}, sent ${sentAtGap}`);
  assert.ok(receiver.count("recovered") >= 3, `recovered after each reconnect: ${receiver.count("recovered")}`);
  t.diagnostic(`received ${received} of ${publisher.sent}; hole ${JSON.stringify(holes)}; reconnects ${receiver.opens() - 1}`);
});
