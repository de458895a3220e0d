// The client's bookkeeping without a server: an in-memory WebSocket stands in for the network,
// so each rule (ids, order, no repeat, recovery, gap, queueing, back-off) is checked exactly.

import { test } from "node:test";
import assert from "node:assert/strict";

import { connect, backoffDelay } from "../groupcast.js";
import { FakeWebSocket, until } from "./fake_ws.mjs";

function client(extra = {}) {
  FakeWebSocket.reset();
  const gc = connect("ws://127.0.0.1:9/room?x=1", {
    WebSocket: FakeWebSocket,
    backoff: { min: 1, max: 5 },
    ...extra,
  });
  const events = [];
  for (const e of ["state", "recovered", "gap", "error"]) gc.on(e, (p) => events.push([e, p]));
  return { gc, events };
}

async function socket(n) {
  await until(`connection ${n}`, () => FakeWebSocket.instances.length >= n);
  return FakeWebSocket.instances[n - 1];
}

/** Answers the last `cmd` command on `ws` with `reply` fields. */
function answer(ws, cmd, reply) {
  const c = ws.commands(cmd).at(-1);
  assert.ok(c, `no ${cmd} sent`);
  ws.receive({ id: c.id, ok: true, ...reply });
  return c;
}

test("the URL asks for protocol 2 and carries the token", async () => {
  const { gc } = client({ token: "T.K.N" });
  const ws = await socket(1);
  const u = new URL(ws.url);
  assert.equal(u.searchParams.get("protocol"), "2");
  assert.equal(u.searchParams.get("token"), "T.K.N");
  assert.equal(u.searchParams.get("x"), "1");
  gc.close();
});

test("in a page, a relative URL is taken relative to it, https becoming wss", async () => {
  globalThis.location = { href: "https://app.example.com/chat/room?x=1" };
  try {
    FakeWebSocket.reset();
    const gc = connect("/ws", { WebSocket: FakeWebSocket });
    const ws = await socket(1);
    assert.equal(ws.url, "wss://app.example.com/ws?protocol=2");
    gc.close();
  } finally {
    delete globalThis.location;
  }
});

test("a token function is asked again for each connection", async () => {
  let n = 0;
  const { gc } = client({ token: async () => `tok${++n}` });
  const ws1 = await socket(1);
  assert.equal(new URL(ws1.url).searchParams.get("token"), "tok1");
  ws1.open();
  ws1.drop(1006);
  const ws2 = await socket(2);
  assert.equal(new URL(ws2.url).searchParams.get("token"), "tok2");
  gc.close();
});

test("join before open, in-order delivery, repeats dropped, early envelopes at or below the join offset dropped", async () => {
  const { gc, events } = client();
  const got = [];
  const joined = gc.join(7, (m, meta) => got.push([m, meta.offset, meta.group]));
  const ws = await socket(1);
  assert.equal(ws.sent.length, 0, "nothing sent before open");
  ws.open();
  const join = ws.commands("add_group")[0];
  assert.deepEqual(join, { cmd: "add_group", group_id: "7", id: join.id });
  // Envelopes before the reply: history up to the reply's offset is not delivered.
  ws.receive({ group: "7", offset: 4, message: "old" });
  ws.receive({ group: "7", offset: 6, message: "live6" });
  ws.receive({ group: "7", offset: 5, message: "old5" });
  answer(ws, "add_group", { epoch: "e1", offset: 5 });
  const reply = await joined;
  assert.equal(reply.offset, 5);
  ws.receive({ group: "7", offset: 7, message: { a: 1 } });
  ws.receive({ group: "7", offset: 7, message: "repeat" });
  ws.receive({ group: "7", offset: 6, message: "repeat" });
  ws.receive({ group: "other", offset: 8, message: "not mine" });
  assert.deepEqual(got, [
    ["live6", 6, "7"],
    [{ a: 1 }, 7, "7"],
  ]);
  assert.deepEqual(
    events.filter(([e]) => e === "state").map(([, p]) => p.state),
    ["connecting", "open"],
  );
  gc.close();
});

test("reconnect after 1012: rejoin with since, replay then recovered, no repeat", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push(meta.offset));
  const ws1 = await socket(1);
  ws1.open();
  answer(ws1, "add_group", { epoch: "E", offset: 10 });
  await until("join settled", () => true);
  ws1.receive({ group: "g", offset: 11, message: "x" });
  ws1.drop(1012, "service restart");
  const ws2 = await socket(2);
  const states = events.filter(([e]) => e === "state").map(([, p]) => p);
  assert.ok(states.some((s) => s.state === "closed" && s.code === 1012));
  const rec = states.find((s) => s.state === "reconnecting");
  assert.ok(rec && rec.delay >= 0 && rec.delay <= 5, `delay ${rec?.delay}`);
  ws2.open();
  const join = ws2.commands("add_group")[0];
  assert.deepEqual(join.since, { epoch: "E", offset: 11 });
  // Replay (one repeat thrown in), reply, live.
  ws2.receive({ group: "g", offset: 12, message: "r" });
  ws2.receive({ group: "g", offset: 12, message: "r" });
  ws2.receive({ group: "g", offset: 13, message: "r" });
  answer(ws2, "add_group", { epoch: "E", offset: 13, recovered: true });
  await until("recovered event", () => events.some(([e]) => e === "recovered"));
  ws2.receive({ group: "g", offset: 14, message: "live" });
  assert.deepEqual(got, [11, 12, 13, 14]);
  assert.deepEqual(events.find(([e]) => e === "recovered")[1], { group: "g", epoch: "E", offset: 13 });
  assert.ok(!events.some(([e]) => e === "gap"));
  gc.close();
});

test("recovered:false is a gap at the server's position; later messages continue from there", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push(meta.offset));
  const ws1 = await socket(1);
  ws1.open();
  answer(ws1, "add_group", { epoch: "E", offset: 3 });
  ws1.drop(1006);
  const ws2 = await socket(2);
  ws2.open();
  answer(ws2, "add_group", { epoch: "F", offset: 40, recovered: false });
  await until("gap", () => events.some(([e]) => e === "gap"));
  assert.deepEqual(events.find(([e]) => e === "gap")[1], {
    group: "g",
    epoch: "F",
    offset: 40,
    from: { epoch: "E", offset: 3 },
  });
  ws2.receive({ group: "g", offset: 41, message: "after" });
  assert.deepEqual(got, [41]);
  // The next rejoin asks from the new position.
  ws2.drop(1001);
  const ws3 = await socket(3);
  ws3.open();
  assert.deepEqual(ws3.commands("add_group")[0].since, { epoch: "F", offset: 41 });
  gc.close();
});

test("live messages sent before a rejoin's reply are held for it: after recovered:false they follow the new position", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push(meta.offset));
  const ws1 = await socket(1);
  ws1.open();
  answer(ws1, "add_group", { epoch: "E", offset: 3 });
  ws1.drop(1006);
  const ws2 = await socket(2);
  ws2.open();
  // History no longer reaches back to 3: the server is at 40; live 41 and 42 come first.
  ws2.receive({ group: "g", offset: 41, message: "a" });
  ws2.receive({ group: "g", offset: 42, message: "b" });
  assert.deepEqual(got, []);
  answer(ws2, "add_group", { epoch: "E", offset: 40, recovered: false });
  ws2.receive({ group: "g", offset: 43, message: "c" });
  assert.deepEqual(got, [41, 42, 43]);
  assert.equal(events.filter(([e]) => e === "gap").length, 1);
  gc.close();
});

test("live messages sent before a recovered reply are delivered once, in order", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push(meta.offset));
  const ws1 = await socket(1);
  ws1.open();
  answer(ws1, "add_group", { epoch: "E", offset: 3 });
  ws1.drop(1006);
  const ws2 = await socket(2);
  ws2.open();
  ws2.receive({ group: "g", offset: 4, message: "replay" });
  ws2.receive({ group: "g", offset: 6, message: "live, after a hole" });
  ws2.receive({ group: "g", offset: 5, message: "live" });
  answer(ws2, "add_group", { epoch: "E", offset: 4, recovered: true });
  ws2.receive({ group: "g", offset: 6, message: "repeat" });
  ws2.receive({ group: "g", offset: 7, message: "live" });
  assert.deepEqual(got, [4, 5, 6, 7]);
  assert.equal(events.filter(([e]) => e === "recovered").length, 1);
  assert.equal(events.filter(([e]) => e === "gap").length, 0);
  gc.close();
});

test("a gap notice is reported and adopted", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push([meta.offset, meta.epoch]));
  const ws = await socket(1);
  ws.open();
  answer(ws, "add_group", { epoch: "E", offset: 8 });
  await until("join", () => true);
  ws.receive({ group: "g", gap: true, epoch: "N", offset: 0 });
  ws.receive({ group: "g", offset: 1, message: "fresh" });
  assert.deepEqual(got, [[1, "N"]]);
  assert.deepEqual(events.find(([e]) => e === "gap")[1], {
    group: "g",
    epoch: "N",
    offset: 0,
    from: { epoch: "E", offset: 8 },
  });
  gc.close();
});

test("a hole in the offsets makes the client leave and rejoin with since on the same connection", async () => {
  const { gc, events } = client();
  const got = [];
  gc.join("g", (m, meta) => got.push(meta.offset));
  const ws = await socket(1);
  ws.open();
  answer(ws, "add_group", { epoch: "E", offset: 0 });
  await until("join", () => true);
  ws.receive({ group: "g", offset: 1, message: "a" });
  ws.receive({ group: "g", offset: 3, message: "c" }); // 2 is missing
  assert.deepEqual(
    ws.sent.slice(-2).map((c) => c.cmd),
    ["leave_group", "add_group"],
  );
  answer(ws, "leave_group", {});
  assert.deepEqual(ws.commands("add_group")[1].since, { epoch: "E", offset: 1 });
  ws.receive({ group: "g", offset: 4, message: "d" }); // live, still before the reply: waits
  ws.receive({ group: "g", offset: 2, message: "b" });
  ws.receive({ group: "g", offset: 3, message: "c" });
  ws.receive({ group: "g", offset: 4, message: "d" });
  answer(ws, "add_group", { epoch: "E", offset: 4, recovered: true });
  await until("recovered", () => events.some(([e]) => e === "recovered"));
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.equal(FakeWebSocket.instances.length, 1, "no reconnect needed");
  gc.close();
});

test("send: the offset; error replies reject; offline sends queue (bounded) and go after the rejoins", async () => {
  const { gc } = client({ maxQueue: 2 });
  gc.join("g", () => {});
  const ws = await socket(1);
  const a = gc.send("g", "one");
  const b = gc.send("g", { two: 2 });
  await assert.rejects(gc.send("g", "three"), (e) => e.code === "queue_full");
  ws.open();
  assert.deepEqual(
    ws.sent.map((c) => c.cmd),
    ["add_group", "send_to_group", "send_to_group"],
  );
  const [s1, s2] = ws.commands("send_to_group");
  assert.deepEqual(s2.message, { two: 2 });
  ws.receive({ id: s1.id, ok: true, offset: 1 });
  ws.receive({ id: s2.id, ok: true, offset: 2 });
  assert.equal(await a, 1);
  assert.equal(await b, 2);
  const c = gc.send("g", "x");
  const s3 = ws.commands("send_to_group")[2];
  ws.receive({ error: "forbidden", detail: "no", id: s3.id });
  await assert.rejects(c, (e) => e.code === "forbidden");
  // A send in flight when the connection drops is rejected (it may have been published).
  const d = gc.send("g", "y");
  ws.drop(1006);
  await assert.rejects(d, (e) => e.code === "disconnected");
  gc.close();
});

test("leave while offline: not rejoined; a refused join rejects and is forgotten", async () => {
  const { gc } = client();
  gc.join("a", () => {});
  const refused = gc.join("b", () => {});
  gc.leave("a");
  const ws = await socket(1);
  ws.open();
  assert.deepEqual(
    ws.commands("add_group").map((c) => c.group_id),
    ["b"],
  );
  const c = ws.commands("add_group")[0];
  ws.receive({ error: "forbidden", detail: "rule", id: c.id });
  await assert.rejects(refused, (e) => e.code === "forbidden");
  ws.drop(1006);
  const ws2 = await socket(2);
  ws2.open();
  assert.equal(ws2.commands("add_group").length, 0);
  gc.close();
});

test("a rejoin refused with rate_limited is tried again on the same connection", async () => {
  const { gc, events } = client();
  gc.join("g", () => {});
  const ws = await socket(1);
  ws.open();
  const first = ws.commands("add_group")[0];
  ws.receive({ error: "rate_limited", detail: "slow down", id: first.id });
  await until("the retry", () => ws.commands("add_group").length === 2, 5000);
  answer(ws, "add_group", { epoch: "E", offset: 0 });
  assert.ok(!events.some(([e]) => e === "error"));
  assert.equal(FakeWebSocket.instances.length, 1);
  gc.close();
});

test("a connection dropped right after it opened does not reset the back-off; one that lived does", async () => {
  const { gc, events } = client({ backoff: { min: 10, max: 10000 }, random: () => 0.999 });
  const delays = () => events.filter(([e, p]) => e === "state" && p.state === "reconnecting").map(([, p]) => p.delay);
  for (let n = 1; n <= 3; n++) {
    const ws = await socket(n);
    ws.open();
    ws.drop(1006);
  }
  assert.deepEqual(delays(), [9, 19, 39]);
  const ws4 = await socket(4);
  ws4.open();
  await new Promise((r) => setTimeout(r, 1100));
  ws4.drop(1012);
  assert.deepEqual(delays(), [9, 19, 39, 9]);
  gc.close();
});

test("a connection that never opens is given up after connectTimeout and retried", async () => {
  const { gc, events } = client({ connectTimeout: 20 });
  await socket(1);
  const ws2 = await socket(2);
  const closed = events.find(([e, p]) => e === "state" && p.state === "closed")[1];
  assert.equal(closed.code, 1006);
  assert.equal(closed.reason, "connect timeout");
  ws2.open();
  assert.equal(gc.state, "open");
  gc.close();
});

test("close() is final: no reconnect, waiting sends rejected", async () => {
  const { gc, events } = client();
  const ws = await socket(1);
  const p = gc.send("g", "x");
  gc.close();
  await assert.rejects(p, (e) => e.code === "closed");
  assert.deepEqual(ws.closedWith, { code: 1000, reason: "client closed" });
  ws.drop(1000); // detached: ignored
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeWebSocket.instances.length, 1);
  const last = events.filter(([e]) => e === "state").at(-1)[1];
  assert.equal(last.state, "closed");
  assert.equal(last.deliberate, true);
});

test("back-off: full jitter under min * 2^attempt, capped at max", () => {
  const b = { min: 100, max: 10000 };
  assert.equal(backoffDelay(0, b, () => 0.999999), 99);
  assert.equal(backoffDelay(3, b, () => 0.5), 400);
  assert.equal(backoffDelay(20, b, () => 0.999999), 9999);
  assert.equal(backoffDelay(5, b, () => 0), 0);
});
