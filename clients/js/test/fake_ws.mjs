// An in-memory stand-in for the WebSocket class, driven by the test: it records what the client
// sends and lets the test open, feed and drop each connection (no network, no timing).

export class FakeWebSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  static reset() {
    FakeWebSocket.instances = [];
  }

  static last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  send(data) {
    this.sent.push(JSON.parse(data));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
  }

  // ---- driven by the test ----

  open() {
    this.onopen?.({});
  }

  receive(obj) {
    this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
  }

  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }

  /** Commands sent so far with this cmd. */
  commands(cmd) {
    return this.sent.filter((c) => c.cmd === cmd);
  }
}

/** Resolves once `cond()` is true (polled on the event loop), or rejects after `ms`. */
export async function until(what, cond, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}
