// groupcast client: protocol 2 (offsets, recovery on rejoin) over one WebSocket that comes back
// by itself. An ES module without dependencies, for browsers and Node >= 20 (pass a WebSocket
// constructor in the options where there is no global one). See README.md for the semantics.

const DEFAULT_BACKOFF = { min: 100, max: 10000 };
const DEFAULT_MAX_QUEUE = 1000;
// A connection not open by then is given up and retried (some WebSocket implementations never
// report a connection the peer dropped during the handshake).
const DEFAULT_CONNECT_TIMEOUT_MS = 10000;
// A rejoin refused with rate_limited is tried again after this long (same connection).
const RATE_LIMIT_RETRY_MS = 1000;
// A connection open at least this long proves the server fine: the back-off starts over. One
// closed sooner (a server that accepts and drops at once) keeps growing it: no tight loop.
const STABLE_MS = 1000;
// Most envelopes a group keeps while its join is unanswered.
const MAX_HELD = 100000;

/** An error reply of the server (`{"error":..,"detail":..}`), or a local refusal. */
export class GroupcastError extends Error {
  constructor(code, detail, reply) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "GroupcastError";
    this.code = code;
    this.detail = detail;
    this.reply = reply;
  }
}

/** Opens a client; it connects at once and reconnects until close(). */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/** The back-off before reconnect attempt `attempt` (0-based): full jitter over min * 2^attempt, capped. */
export function backoffDelay(attempt, { min, max }, random = Math.random) {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.max(0, Math.floor(random() * cap));
}

class Client {
  constructor(url, options) {
    const protocol = options.protocol ?? 2;
    if (protocol !== 2) throw new TypeError("groupcast client: only protocol 2 is supported");
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("groupcast client: no WebSocket; pass {WebSocket} in the options");
    }
    // In a page, a relative URL ("/ws") is taken relative to it, http(s) becoming ws(s). A bad
    // URL throws here, at once, not at every reconnect.
    const u = new URL(url, globalThis.location?.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    else if (u.protocol === "https:") u.protocol = "wss:";
    this._url = u.toString();
    this._token = options.token;
    this._backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this._maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    this._connectTimeout = options.connectTimeout ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this._connectTimer = null;
    this._random = options.random ?? Math.random;
    this._listeners = new Map(); // event -> Set(fn)
    this._groups = new Map(); // group id (string) -> Group
    this._pending = new Map(); // command id -> {resolve, reject}
    this._queue = []; // sends made while disconnected: {group, message, resolve, reject}
    this._nextId = 1;
    this._ws = null;
    this._open = false;
    this._closed = false; // close() was called
    this._attempt = 0;
    this._openedAt = 0;
    this._timer = null;
    this._state = "idle";
    // Next microtask: listeners attached right after connect() see "connecting".
    queueMicrotask(() => this._connect());
  }

  /** "idle" (before the first attempt), "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this._state;
  }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * Joins `group`; `onMessage(message, {group, offset, epoch})` gets its messages in offset order,
   * each once. A promise of the join reply ({ok, epoch, offset}); it waits for the connection.
   */
  join(group, onMessage) {
    if (this._closed) return Promise.reject(new GroupcastError("closed", "client closed"));
    if (typeof onMessage !== "function") throw new TypeError("join(group, onMessage): onMessage must be a function");
    const key = String(group);
    const existing = this._groups.get(key);
    if (existing) {
      existing.onMessage = onMessage;
      return existing.joined;
    }
    const g = new Group(key, onMessage);
    this._groups.set(key, g);
    if (this._open) this._sendJoin(g);
    return g.joined;
  }

  /** Leaves `group`: no more messages, no rejoin. A promise settled when the server answered (or at once offline). */
  leave(group) {
    const key = String(group);
    const g = this._groups.get(key);
    if (!g) return Promise.resolve();
    this._groups.delete(key);
    g.settle(new GroupcastError("left", `left group ${key} before the join was answered`));
    if (!this._open) return Promise.resolve();
    return this._command({ cmd: "leave_group", group_id: key }).then(() => undefined);
  }

  /**
   * Publishes `message` (any JSON value) to `group`: a promise of the offset it got (undefined
   * when the server cannot know it). Offline it is queued (bounded) and sent on open. Rejected
   * on an error reply, or when the connection drops before the reply (it may have been published).
   */
  send(group, message) {
    if (this._closed) return Promise.reject(new GroupcastError("closed", "client closed"));
    if (this._open) return this._sendNow(String(group), message);
    if (this._queue.length >= this._maxQueue) {
      return Promise.reject(new GroupcastError("queue_full", `${this._maxQueue} sends already wait for the connection`));
    }
    return new Promise((resolve, reject) => this._queue.push({ group: String(group), message, resolve, reject }));
  }

  /** Closes for good: no reconnect; waiting joins and sends are rejected. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const ws = this._ws;
    this._ws = null;
    this._open = false;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    const err = new GroupcastError("closed", "client closed");
    this._failPending(err);
    for (const q of this._queue.splice(0)) q.reject(err);
    for (const g of this._groups.values()) g.settle(err);
    this._setState("closed", { code: 1000, reason: "client closed", deliberate: true });
  }

  // ---- connection --------------------------------------------------------------------------

  async _connect() {
    if (this._closed) return;
    this._setState("connecting", { attempt: this._attempt });
    let url;
    try {
      url = await this._buildUrl();
    } catch (e) {
      this._emit("error", { error: "token", detail: `the token function failed: ${e?.message ?? e}` });
      this._scheduleReconnect();
      return;
    }
    if (this._closed) return;
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (e) {
      this._emit("error", { error: "connect", detail: String(e?.message ?? e) });
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._connectTimer = setTimeout(() => {
      this._connectTimer = null;
      if (ws !== this._ws || this._open) return;
      try {
        ws.close();
      } catch {
        // not closable while connecting in some implementations; it is detached anyway
      }
      this._onClose(ws, 1006, "connect timeout");
    }, this._connectTimeout);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    // An error is always followed by a close event; nothing to do here.
    ws.onerror = () => {};
  }

  async _buildUrl() {
    const u = new URL(this._url);
    u.searchParams.set("protocol", "2");
    const token = typeof this._token === "function" ? await this._token() : this._token;
    if (token != null && token !== "") u.searchParams.set("token", token);
    return u.toString();
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._open = true;
    this._openedAt = Date.now();
    this._setState("open");
    for (const g of this._groups.values()) this._sendJoin(g);
    for (const q of this._queue.splice(0)) this._sendNow(q.group, q.message).then(q.resolve, q.reject);
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    detach(ws);
    this._ws = null;
    if (this._open && Date.now() - this._openedAt >= STABLE_MS) this._attempt = 0;
    this._open = false;
    this._failPending(new GroupcastError("disconnected", `connection closed (${code}) before the reply`));
    for (const g of this._groups.values()) g.disconnected();
    this._setState("closed", { code, reason, deliberate: false });
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closed || this._timer) return;
    const delay = backoffDelay(this._attempt, this._backoff, this._random);
    this._attempt += 1;
    this._setState("reconnecting", { delay, attempt: this._attempt });
    this._timer = setTimeout(() => {
      this._timer = null;
      this._connect();
    }, delay);
  }

  /** Drops the connection now and reconnects through the usual back-off (to recover state). */
  _reconnectNow(why) {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(4000, why);
    } catch {
      // closing already
    }
    this._onClose(ws, 4000, why);
  }

  _failPending(err) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) p.reject(err);
  }

  // ---- commands ----------------------------------------------------------------------------

  /** Sends `cmd` with a fresh id; a promise of the ok reply, rejected on an error reply. */
  _command(cmd) {
    return new Promise((resolve, reject) => this._request(cmd, resolve, reject));
  }

  /**
   * Sends `cmd` with a fresh id; `onOk(reply)` or `onError(GroupcastError)` is called from the
   * frame handler itself (not a later microtask), so the client's state follows the frames in order.
   */
  _request(cmd, onOk, onError) {
    const id = this._nextId++;
    this._pending.set(id, { resolve: onOk, reject: onError });
    try {
      this._ws.send(JSON.stringify({ ...cmd, id }));
    } catch (e) {
      this._pending.delete(id);
      onError(new GroupcastError("disconnected", String(e?.message ?? e)));
    }
  }

  _sendNow(group, message) {
    return this._command({ cmd: "send_to_group", group_id: group, message }).then((r) => r.offset);
  }

  /** Joins `g` on the open connection: with `since` when its position is known (recovery). */
  _sendJoin(g) {
    const cmd = { cmd: "add_group", group_id: g.id };
    const since = g.position();
    if (since) cmd.since = since;
    g.joining();
    const ws = this._ws;
    this._request(
      cmd,
      (reply) => {
        if (this._groups.get(g.id) !== g || ws !== this._ws) return;
        this._joinAnswered(g, since, reply);
      },
      (err) => {
        if (this._closed || this._groups.get(g.id) !== g || ws !== this._ws) return;
        if (err.code === "rate_limited") {
          setTimeout(() => {
            if (this._groups.get(g.id) === g && ws === this._ws && this._open) this._sendJoin(g);
          }, RATE_LIMIT_RETRY_MS);
          return;
        }
        if (err.code === "disconnected") return; // rejoined on the next open
        // Refused for good (forbidden, too_many_groups, invalid_field): forget the group.
        this._groups.delete(g.id);
        if (!g.settle(err)) this._emit("error", { group: g.id, error: err.code, detail: err.detail });
      },
    );
  }

  _joinAnswered(g, since, reply) {
    const epoch = reply.epoch;
    const top = reply.offset;
    if (since == null) {
      g.adopt(epoch, top);
    } else if (reply.recovered === true && epoch === since.epoch) {
      // Replayed envelopes came before the reply; anything short of `top` was not delivered.
      this._flush(g);
      if (g.offset < top) {
        const from = { epoch: g.epoch, offset: g.offset };
        g.adopt(epoch, top);
        this._emit("gap", { group: g.id, epoch, offset: top, from });
      } else {
        g.adopt(epoch, top);
        this._emit("recovered", { group: g.id, epoch, offset: top });
      }
    } else {
      g.adopt(epoch, top);
      this._emit("gap", { group: g.id, epoch, offset: top, from: since });
    }
    g.settle(null, reply);
    this._flush(g);
  }

  // ---- frames ------------------------------------------------------------------------------

  _onFrame(ws, data) {
    if (ws !== this._ws) return;
    let msg;
    try {
      msg = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      this._emit("error", { error: "bad_frame", detail: "a frame that is not JSON", data });
      return;
    }
    if (msg === null || typeof msg !== "object") {
      this._emit("error", { error: "bad_frame", detail: "a frame that is not a JSON object", data });
      return;
    }
    if (typeof msg.group === "string" && msg.gap === true) return this._onGapNotice(msg);
    if (typeof msg.group === "string" && Number.isInteger(msg.offset) && "message" in msg) return this._onEnvelope(msg);
    if ("id" in msg && (msg.ok === true || "error" in msg)) return this._onReply(msg);
    if ("error" in msg) return this._emit("error", msg);
    // {"event":"missed"} and anything newer: the offsets tell what was lost; ignore.
  }

  _onReply(msg) {
    const p = this._pending.get(msg.id);
    if (!p) return;
    this._pending.delete(msg.id);
    if (msg.ok === true) p.resolve(msg);
    else p.reject(new GroupcastError(String(msg.error), msg.detail, msg));
  }

  _onEnvelope(env) {
    const g = this._groups.get(env.group);
    if (!g) return; // left, or never joined
    if (g.offset == null) {
      // A first join not answered yet: whatever is at or below its offset is history.
      g.hold(env);
      return;
    }
    this._accept(g, env);
  }

  /** Delivers `env` if it is the next offset; drops a repeat; a hole starts a recovery. Whether delivered. */
  _accept(g, env) {
    if (env.offset <= g.offset) return false; // seen already (replayed twice, resent)
    if (env.offset === g.offset + 1) {
      this._deliver(g, env);
      return true;
    }
    // A hole: something in between was lost on the way. While a join is pending, keep it for
    // the reply to settle (the server may send live messages that waited for the join's
    // answer before the reply); otherwise join again on this connection with `since` (leaving
    // first, so the server replays everything after our offset).
    if (g.pending) g.hold(env);
    else this._rejoin(g);
    return false;
  }

  _rejoin(g) {
    if (!this._open) return;
    const ws = this._ws;
    // Back to back: the server handles a connection's commands in order, so the join's replay
    // starts right after our offset whatever was in flight. A refused leave (rate_limited)
    // would leave the join's outcome unclear: start over on a new connection then.
    this._request(
      { cmd: "leave_group", group_id: g.id },
      () => {},
      (err) => {
        if (err.code !== "disconnected" && ws === this._ws) this._reconnectNow("rejoin refused");
      },
    );
    this._sendJoin(g);
  }

  _onGapNotice(msg) {
    const g = this._groups.get(msg.group);
    if (!g) return;
    const from = g.position();
    g.adopt(String(msg.epoch), msg.offset);
    this._emit("gap", { group: g.id, epoch: g.epoch, offset: g.offset, from });
    this._flush(g);
  }

  /**
   * Delivers held envelopes above the group's offset, in order, as long as they follow; from a
   * hole on they stay held (a join pending, or started here to fill the hole).
   */
  _flush(g) {
    if (g.offset == null) return;
    const held = g.buffer.splice(0).sort((a, b) => a.offset - b.offset);
    for (let i = 0; i < held.length; i++) {
      if (this._groups.get(g.id) !== g) return; // a handler left the group
      const env = held[i];
      if (env.offset <= g.offset) continue;
      if (env.offset === g.offset + 1) {
        this._deliver(g, env);
        continue;
      }
      if (!g.pending) this._rejoin(g);
      for (const rest of held.slice(i)) g.hold(rest);
      return;
    }
  }

  _deliver(g, env) {
    g.offset = env.offset;
    try {
      g.onMessage(env.message, { group: g.id, offset: env.offset, epoch: g.epoch });
    } catch (e) {
      this._emit("error", { group: g.id, error: "handler", detail: String(e?.message ?? e), exception: e });
    }
  }

  // ---- events ------------------------------------------------------------------------------

  _setState(state, details = {}) {
    this._state = state;
    this._emit("state", { state, ...details });
  }

  _emit(event, payload) {
    const fns = this._listeners.get(event);
    if (!fns) return;
    for (const fn of [...fns]) {
      try {
        fn(payload);
      } catch (e) {
        if (event !== "error") this._emit("error", { error: "listener", detail: String(e?.message ?? e), exception: e });
      }
    }
  }
}

/** One joined group: its handler, its position (epoch, last offset delivered), its join promise. */
class Group {
  constructor(id, onMessage) {
    this.id = id;
    this.onMessage = onMessage;
    this.epoch = null;
    this.offset = null;
    this.pending = false; // an add_group is in flight
    this.buffer = []; // envelopes that wait for the pending join's reply
    this._settled = false;
    this.joined = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // A join() caller that does not await must not get an unhandled rejection.
    this.joined.catch(() => {});
  }

  /** The `since` of a rejoin, or null before the first position. */
  position() {
    return this.epoch != null && this.offset != null ? { epoch: this.epoch, offset: this.offset } : null;
  }

  joining() {
    this.pending = true;
  }

  /** Takes the server's position; within the same epoch never goes back (nothing twice). */
  adopt(epoch, offset) {
    this.pending = false;
    const same = typeof epoch !== "string" || epoch === this.epoch;
    if (typeof epoch === "string") this.epoch = epoch;
    if (Number.isInteger(offset) && !(same && this.offset != null && offset < this.offset)) this.offset = offset;
  }

  /** Keeps an envelope until the pending join is answered (bounded: the oldest go, and the hole they leave is recovered). */
  hold(env) {
    if (this.buffer.length >= MAX_HELD) this.buffer.shift();
    this.buffer.push(env);
  }

  disconnected() {
    this.pending = false;
    this.buffer = [];
  }

  /** Settles the join() promise once; whether this call settled it. */
  settle(err, reply) {
    if (this._settled) return false;
    this._settled = true;
    if (err) this._reject(err);
    else this._resolve(reply);
    return true;
  }
}

function detach(ws) {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = () => {};
}
