// The pieces of the fault tests: a receiver that logs everything its client reports, a publisher
// sending a numbered sequence at a steady rate, and the final check that the receiver holds every
// message exactly once in offset order, or reported a gap exactly where one had to be.
// Imported only: it runs nothing by itself (node --test also loads it as a file of tests).

import assert from "node:assert/strict";

import { connect } from "../groupcast.js";
import { waitFor, webSocketClass } from "./helpers.mjs";

const FAST_BACKOFF = { min: 50, max: 1000 };
// Node 20's WebSocket never reports a connection dropped during its handshake: give up sooner.
const CONNECT_TIMEOUT = 2000;

/**
 * Whether the server at `url` speaks protocol 2 (its join reply carries an epoch). The server
 * side lands on main separately; tests use this to say clearly what they wait for.
 */
export async function speaksProtocol2(url, group = "__probe__") {
  const WebSocket = webSocketClass();
  return new Promise((resolve) => {
    const u = new URL(url);
    u.searchParams.set("protocol", "2");
    const ws = new WebSocket(u.toString());
    const timer = setTimeout(() => finish(false), 20_000);
    const finish = (v) => {
      clearTimeout(timer);
      try {
        ws.close();
      } catch {
        // closing
      }
      resolve(v);
    };
    ws.onopen = () => ws.send(JSON.stringify({ cmd: "add_group", group_id: group, id: "probe" }));
    ws.onmessage = (ev) => {
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (m.id === "probe") finish(typeof m.epoch === "string" && Number.isInteger(m.offset));
    };
    ws.onclose = () => finish(false);
  });
}

/** A client joined to `group` that records, in order, every delivery, gap, recovery and state. */
export class Receiver {
  static async start(url, group, opts = {}) {
    const r = new Receiver();
    r.group = group;
    r.log = []; // {kind: "msg", offset, epoch, n} | {kind: "gap", ...} | {kind: "recovered", ...}
    r.states = [];
    r.errors = [];
    r.gc = connect(url, { WebSocket: webSocketClass(), backoff: FAST_BACKOFF, connectTimeout: CONNECT_TIMEOUT, ...opts });
    r.gc.on("state", (s) => r.states.push(s));
    r.gc.on("gap", (g) => g.group === group && r.log.push({ kind: "gap", ...g }));
    r.gc.on("recovered", (g) => g.group === group && r.log.push({ kind: "recovered", ...g }));
    r.gc.on("error", (e) => r.errors.push(e));
    r.joinReply = await r.gc.join(group, (message, meta) =>
      r.log.push({ kind: "msg", offset: meta.offset, epoch: meta.epoch, n: message?.n, message }),
    );
    return r;
  }

  messages() {
    return this.log.filter((e) => e.kind === "msg");
  }

  count(kind) {
    return this.log.filter((e) => e.kind === kind).length;
  }

  /** Numbers (`n`) of the messages received. */
  numbers() {
    return this.messages().map((m) => m.n);
  }

  /** Waits until `k` more messages arrived than when called (the stream flows). */
  async progress(k, what = `${k} more messages`) {
    const base = this.messages().length;
    await waitFor(`${what} (have ${base})`, () => this.messages().length >= base + k);
  }

  /** Number of (re)connections opened so far. */
  opens() {
    return this.states.filter((s) => s.state === "open").length;
  }

  close() {
    this.gc.close();
  }
}

/** A client sending {n: 1}, {n: 2}, ... to `group` every `intervalMs`, recording each outcome. */
export class Publisher {
  static start(url, group, intervalMs = 10) {
    const p = new Publisher();
    p.group = group;
    p.sent = 0;
    p.results = new Map(); // n -> {offset} | {error}
    p.gc = connect(url, { WebSocket: webSocketClass(), backoff: FAST_BACKOFF, connectTimeout: CONNECT_TIMEOUT });
    p.timer = setInterval(() => p.publishOne(), intervalMs);
    return p;
  }

  publishOne() {
    const n = ++this.sent;
    this.gc.send(this.group, { n }).then(
      (offset) => this.results.set(n, { offset }),
      (e) => this.results.set(n, { error: e.code ?? String(e) }),
    );
  }

  /** Stops sending; waits until every send has its outcome. */
  async stop() {
    clearInterval(this.timer);
    await waitFor("every publish to be answered", () => this.results.size === this.sent);
    this.gc.close();
  }

  /** Numbers whose send was answered ok (so certainly published). */
  confirmed() {
    return [...this.results].filter(([, r]) => !("error" in r)).map(([n]) => n);
  }
}

/**
 * The receiver's log is a valid history: within an epoch every delivery has the offset after
 * the previous one (or after the position a gap or a recovery announced), no number arrives
 * twice, numbers only grow (one publisher, one total order); every confirmed publish arrived,
 * except ones inside a reported gap (between the last message before it and the first after).
 * `gaps` is how many gaps the scenario must have caused (exactly).
 */
export function checkHistory(receiver, publisher, { gaps }) {
  const log = receiver.log;
  let pos = { epoch: receiver.joinReply.epoch, offset: receiver.joinReply.offset };
  const holes = []; // [last n before the gap, first n after it]
  let lastN = 0;
  let openGap = null;
  for (const e of log) {
    if (e.kind === "msg") {
      assert.equal(e.epoch, pos.epoch, `message ${e.n} at ${e.offset} in another epoch than announced: ${JSON.stringify(pos)}`);
      assert.equal(e.offset, pos.offset + 1, `message ${e.n}: offset ${e.offset} does not follow ${pos.offset}`);
      assert.ok(e.n > lastN, `message ${e.n} after ${lastN}: repeated or out of order`);
      if (openGap) {
        holes.push([openGap, e.n]);
        openGap = null;
      }
      lastN = e.n;
      pos = { epoch: e.epoch, offset: e.offset };
    } else if (e.kind === "gap") {
      pos = { epoch: e.epoch, offset: e.offset };
      openGap = openGap ?? lastN;
    } else if (e.kind === "recovered") {
      assert.equal(e.epoch, pos.epoch, "recovered in another epoch");
      // docs/protocol.md: replay, then the reply, then the live stream, so the reply's offset is
      // the last delivered; live messages that arrived while the join waited come after it.
      assert.equal(e.offset, pos.offset, `recovered reply is not at the last delivered: ${JSON.stringify(e)} vs ${JSON.stringify(pos)}`);
    }
  }
  assert.equal(receiver.count("gap"), gaps, `gaps reported: ${JSON.stringify(log.filter((e) => e.kind === "gap"))}`);
  if (openGap !== null) holes.push([openGap, Infinity]);
  const got = new Set(receiver.numbers());
  const inHole = (n) => holes.some(([a, b]) => n > a && n < b);
  const missing = publisher.confirmed().filter((n) => !got.has(n) && !inHole(n));
  assert.deepEqual(missing, [], `confirmed publishes never received, outside any reported gap (holes ${JSON.stringify(holes)})`);
  return { holes, received: got.size };
}

/**
 * Runs `faults` one after another while `publisher` publishes: before each, the receiver must
 * be receiving (`progress` more messages); after each, it must be again (it came back). Then
 * the publisher stops and the receiver must get everything confirmed after its last gap.
 */
export async function underFaults(receiver, publisher, faults, progress = 15) {
  await receiver.progress(progress, "messages before the first fault");
  for (const [name, act] of faults) {
    const opens = receiver.opens();
    await act();
    await receiver.progress(progress, `messages after: ${name} (opens ${opens} -> ${receiver.opens()})`);
  }
  await publisher.stop();
  const last = Math.max(...publisher.confirmed());
  await waitFor(`the last confirmed message (${last})`, () => receiver.numbers().includes(last));
}

/** The pid of the worker holding the proxy's connection to the server (the receiver's). */
export async function workerOf(server, proxy) {
  return waitFor("the receiver's connection in `connections`", async () => {
    const ports = proxy.upstreamPorts();
    if (ports.length !== 1) return undefined;
    const conns = await server.connections();
    return conns.find((c) => c.peer === `127.0.0.1:${ports[0]}`)?.worker_pid;
  });
}
