// Helpers of the client's tests against the real groupcast binary: free ports, a private temp
// dir, the instance (started in the foreground, ready when `status --json` says so, killed by
// pid), a redis-server, and a TCP proxy the test can cut. Every process started here is killed on
// exit, failures and signals included (by pid, after checking it still belongs to the instance).
// Imported only: it runs nothing by itself (node --test also loads it as a file of tests).

import { spawn, execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");

/** The binary under test: GROUPCAST_BIN, or target/debug/groupcast of this checkout. */
export const BIN = process.env.GROUPCAST_BIN || path.join(repo, "target/debug/groupcast");
/** Deadline for anything to happen (start, delivery, recovery); generous for a loaded machine. */
export const TIMEOUT = 60_000;
const POLL = 25;

export const underCi = () => !!process.env.CI && process.env.CI !== "false" && process.env.CI !== "0";

/**
 * For a test that cannot run here: under CI it fails (throws `reason`), elsewhere it skips with
 * it: `if (cannotRun(t, "why")) return;`.
 */
export function cannotRun(t, reason) {
  if (underCi()) throw new Error(`cannot run here, and under CI every test must: ${reason}`);
  t.skip(reason);
  return true;
}

/** The WebSocket class (Node 20 needs --experimental-websocket). */
export function webSocketClass() {
  if (typeof globalThis.WebSocket !== "function") {
    throw new Error("no global WebSocket: run node with --experimental-websocket (Node 20) or Node >= 22");
  }
  return globalThis.WebSocket;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` (sync or async) until it returns something other than undefined/false; that value. */
export async function waitFor(what, fn, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false && v !== null) return v;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${lastError ? `: ${lastError.message}` : ""}`);
    }
    await sleep(POLL);
  }
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---- cleanup of everything started here ----------------------------------------------------

const owned = new Set(); // {pid, marker}: marker is a string its cmdline or environ must contain
const dirs = new Set();

function belongs(pid, marker) {
  for (const f of ["cmdline", "environ"]) {
    try {
      if (fs.readFileSync(`/proc/${pid}/${f}`).toString("latin1").includes(marker)) return true;
    } catch {
      // gone, or not ours to read
    }
  }
  return false;
}

function alive(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "latin1");
    const state = stat.slice(stat.lastIndexOf(")") + 1).trim()[0];
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

function killOwned(pid, marker, sig) {
  if (pid > 0 && alive(pid) && belongs(pid, marker)) {
    try {
      process.kill(pid, sig);
    } catch {
      // raced with its exit
    }
  }
}

function cleanupAll() {
  for (const { pid, marker } of owned) killOwned(pid, marker, "SIGKILL");
  owned.clear();
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  dirs.clear();
}

process.on("exit", cleanupAll);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => {
    cleanupAll();
    process.exit(128 + (os.constants.signals[sig] ?? 0));
  });
}

export function tempDir(name) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `gc-js-${name}-`));
  dirs.add(d);
  return d;
}

/** Runs `BIN args` to completion (killed after TIMEOUT): {code, stdout, stderr}. */
export function run(args, { bin = BIN } = {}) {
  return new Promise((resolve) => {
    execFile(bin, args, { timeout: TIMEOUT, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === "number" ? err.code : null) : 0, stdout, stderr });
    });
  });
}

// ---- the instance --------------------------------------------------------------------------

export class Server {
  /**
   * Starts `groupcast start -c FILE` in the foreground with `config` (TOML, without `listen`,
   * `workers` or `pid_file`, which are set here) and waits until every process runs.
   */
  static async start({ workers = 2, config = "" } = {}) {
    if (!fs.existsSync(BIN)) throw new Error(`no groupcast binary at ${BIN} (cargo build, or set GROUPCAST_BIN)`);
    const s = new Server();
    s.dir = tempDir("srv");
    s.pidFile = path.join(s.dir, "g.pid");
    s.configFile = path.join(s.dir, "g.toml");
    s.workers = workers;
    const text = `listen = "127.0.0.1:0"\nworkers = ${workers}\npid_file = "${s.pidFile}"\n${config}\n`;
    fs.writeFileSync(s.configFile, text);
    const out = fs.openSync(path.join(s.dir, "stdout.log"), "w");
    const err = fs.openSync(path.join(s.dir, "stderr.log"), "w");
    s.child = spawn(BIN, ["start", "-c", s.configFile], { stdio: ["ignore", out, err] });
    fs.closeSync(out);
    fs.closeSync(err);
    s.exited = null;
    s.child.on("exit", (code, signal) => (s.exited = { code, signal }));
    s.masterPid = s.child.pid;
    owned.add({ pid: s.masterPid, marker: s.pidFile });
    try {
      await s.waitReady();
    } catch (e) {
      await s.stop();
      throw new Error(`${e.message}\n--- log ---\n${s.log()}`);
    }
    return s;
  }

  log() {
    try {
      return fs.readFileSync(path.join(this.dir, "stderr.log"), "utf8");
    } catch {
      return "";
    }
  }

  /** `groupcast status --json`, parsed (its child pids are remembered for the kill at exit). */
  async status() {
    const r = await run(["status", "-c", this.configFile, "--json"]);
    if (r.code !== 0) throw new Error(`status failed (${r.code}): ${r.stderr}`);
    const report = JSON.parse(r.stdout);
    for (const p of report.processes ?? []) {
      if (p.pid > 0) owned.add({ pid: p.pid, marker: this.pidFile });
    }
    return report;
  }

  /** Polls status until `pred(report)`; the report. */
  async waitStatus(what, pred, timeout = TIMEOUT) {
    return waitFor(what, async () => {
      if (this.exited) throw new Error(`groupcast exited: ${JSON.stringify(this.exited)}`);
      const r = await this.status();
      return pred(r) ? r : undefined;
    }, timeout);
  }

  /** Every process running, every worker on the bus: what a fresh start or a restart ends in. */
  async waitReady() {
    const r = await this.waitStatus("groupcast to be ready", (r) => {
      const ws = workerRows(r);
      return (
        ws.length === this.workers &&
        r.processes.every((p) => p.state === "running") &&
        ws.every((w) => w.channel_connected === true)
      );
    });
    this.masterPid = r.master_pid;
    this.addr = r.listen;
    this.url = `ws://${r.listen}/`;
    return r;
  }

  /** `groupcast connections --json`: the list. */
  async connections() {
    const r = await run(["connections", "-c", this.configFile, "--json"]);
    if (r.code !== 0) throw new Error(`connections failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout).connections;
  }

  /** `groupcast -c FILE reload [ARGS]` (`--close`: the way with close 1012); throws unless it
   *  succeeded. */
  async reload(...args) {
    const r = await run(["-c", this.configFile, "reload", ...args]);
    if (r.code !== 0) throw new Error(`reload failed (${r.code}): ${r.stdout}${r.stderr}\n${this.log()}`);
    return r;
  }

  /** Sends `sig` to `pid`, a process of this instance. */
  kill(pid, sig = "SIGKILL") {
    if (!belongs(pid, this.pidFile)) throw new Error(`pid ${pid} is not a process of this instance`);
    process.kill(pid, sig);
  }

  /** SIGTERM to the master, then SIGKILL to whatever of it is left. */
  async stop() {
    if (this.child && !this.exited) {
      try {
        this.child.kill("SIGTERM");
      } catch {
        // gone
      }
      const deadline = Date.now() + 10_000;
      while (!this.exited && Date.now() < deadline) await sleep(POLL);
    }
    for (const o of [...owned]) {
      if (o.marker === this.pidFile) {
        killOwned(o.pid, o.marker, "SIGKILL");
        owned.delete(o);
      }
    }
  }
}

export function workerRows(r) {
  return (r.processes ?? []).filter((p) => p.role === "worker").sort((a, b) => a.index - b.index);
}

export function channelRow(r) {
  return (r.processes ?? []).find((p) => p.role === "channel");
}

// ---- redis-server --------------------------------------------------------------------------

/** Whether redis-server can be started here. */
export function haveRedis() {
  return (process.env.PATH ?? "").split(":").some((d) => d && fs.existsSync(path.join(d, "redis-server")));
}

export class Redis {
  /**
   * Starts redis-server on `port` (a free one by default); waits for PONG. Without persistence,
   * or with `persistDir`: an append-only file there, fsynced at every write (so even a SIGKILL
   * keeps everything).
   */
  static async start(port, { persistDir } = {}) {
    const r = new Redis();
    r.port = port ?? (await freePort());
    const persistence = persistDir
      ? ["--dir", persistDir, "--appendonly", "yes", "--appendfsync", "always"]
      : ["--appendonly", "no"];
    r.child = spawn(
      "redis-server",
      ["--port", String(r.port), "--bind", "127.0.0.1", "--save", "", ...persistence],
      { stdio: "ignore" },
    );
    r.exited = false;
    r.child.on("exit", () => (r.exited = true));
    owned.add({ pid: r.child.pid, marker: String(r.port) });
    await waitFor("redis-server to answer PING", async () => (await r.command("PING")).includes("PONG"));
    return r;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/`;
  }

  /** One inline command; its raw answer ("" when Redis is not there). */
  command(cmd) {
    return new Promise((resolve) => {
      const s = net.connect(this.port, "127.0.0.1");
      let buf = "";
      const done = () => {
        s.destroy();
        resolve(buf);
      };
      s.setTimeout(5000, done);
      s.on("error", done);
      s.on("connect", () => s.write(`${cmd}\r\n`));
      s.on("data", (d) => {
        buf += d.toString();
        if (buf.endsWith("\r\n")) done();
      });
    });
  }

  /** SIGKILL (no persistence: its data is gone); waits until it has exited. */
  async kill() {
    if (!this.exited) this.child.kill("SIGKILL");
    await waitFor("redis-server to exit", () => this.exited);
  }
}

// ---- a TCP proxy the test can cut ----------------------------------------------------------

/** Forwards 127.0.0.1:port to `target` ("host:port"); `cut()` severs every connection. */
export class Proxy {
  static async start(target) {
    const p = new Proxy();
    const [host, port] = splitAddr(target);
    p.pairs = new Set();
    p.refusing = false;
    p.server = net.createServer((down) => {
      if (p.refusing) {
        down.destroy();
        return;
      }
      const up = net.connect(port, host);
      const pair = { down, up, upPort: null };
      p.pairs.add(pair);
      up.on("connect", () => (pair.upPort = up.localPort));
      down.pipe(up);
      up.pipe(down);
      const end = () => {
        down.destroy();
        up.destroy();
        p.pairs.delete(pair);
      };
      down.on("error", end);
      up.on("error", end);
      down.on("close", end);
      up.on("close", end);
    });
    await new Promise((resolve) => p.server.listen(0, "127.0.0.1", resolve));
    p.port = p.server.address().port;
    p.url = `ws://127.0.0.1:${p.port}/`;
    return p;
  }

  /** Local ports of the proxy's connections to the target (the server sees these as peers). */
  upstreamPorts() {
    return [...this.pairs].map((x) => x.upPort).filter((x) => x != null);
  }

  /** Severs every connection at once (both sides reset), like a network failure. */
  cut() {
    for (const { down, up } of this.pairs) {
      down.resetAndDestroy?.() ?? down.destroy();
      up.resetAndDestroy?.() ?? up.destroy();
    }
    this.pairs.clear();
  }

  /** While refusing, new connections are dropped at once (the client stays away). */
  refuse(on) {
    this.refusing = on;
    if (on) this.cut();
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

function splitAddr(addr) {
  const i = addr.lastIndexOf(":");
  return [addr.slice(0, i).replace(/^\[|\]$/g, ""), Number(addr.slice(i + 1))];
}
