// The chat demo (examples/chat, served by the API listener at /demo/) in headless Chromium,
// driven over the DevTools protocol by puppeteer-core, against the real groupcast binary:
// two pages (alice, bob) join one room; alice sends, bob shows it; a reload (live hand-off: the
// pages do not even reconnect); alice sends, bob shows it once; a reload --close (close 1012: the
// client reconnects and recovers); alice sends, bob shows it once and every earlier message
// still once. Screenshots of both pages go to target/browser/ for a person to look at.
//
// Needs Debian's chromium (/usr/bin/chromium, or CHROMIUM_PATH) and puppeteer-core (npm ci in
// tests/browser); without them it fails under CI and skips with the reason elsewhere.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.GROUPCAST_BIN || path.join(repo, "target/debug/groupcast");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = path.join(repo, "target/browser");
/** Deadline for anything to happen (start, page load, delivery, reconnect): a loaded CI machine. */
const TIMEOUT = 60_000;
const POLL = 50;
const ROOM = "lobby";

const underCi = () => !!process.env.CI && process.env.CI !== "false" && process.env.CI !== "0";

test("chat demo in Chromium: live messages across a live hand-off and a reload --close, each shown once", { timeout: 300_000 }, async (t) => {
  const { puppeteer, missing } = await prerequisites();
  if (missing.length) {
    const reason = missing.join("; ");
    if (underCi()) throw new Error(`cannot run here, and under CI every test must: ${reason}`);
    t.skip(reason);
    return;
  }

  let server;
  let browser;
  const pages = {};
  const pageLog = []; // console output and uncaught errors of the pages, printed on failure
  const pageErrors = [];
  try {
    server = await Instance.start();
    t.diagnostic(`groupcast: ws ${server.wsPort}, api ${server.apiPort}, dir ${server.dir}`);

    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      // --no-sandbox: CI runs as root, and Chromium refuses to start its sandbox as root. The
      // pages are our own demo on loopback, so the sandbox protects nothing here.
      // --disable-dev-shm-usage: /dev/shm is small in containers; Chromium uses /tmp instead.
      // The other two: the page not in front keeps running its timers and rendering at full
      // speed (its reconnect back-off is not stretched by background throttling).
      args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-timer-throttling", "--disable-renderer-backgrounding"],
      timeout: TIMEOUT,
      protocolTimeout: TIMEOUT,
    });

    for (const name of ["alice", "bob"]) {
      const page = await browser.newPage();
      page.setDefaultTimeout(TIMEOUT);
      await page.setViewport({ width: 820, height: 680 });
      page.on("console", (m) => pageLog.push(`${name} console.${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => {
        pageErrors.push(`${name}: ${e.message}`);
        pageLog.push(`${name} uncaught: ${e.message}`);
      });
      const url = `${server.demoUrl}?name=${name}&room=${ROOM}&autojoin=1`;
      const res = await page.goto(url, { waitUntil: "load" });
      assert.equal(res.status(), 200, `GET ${url}`);
      pages[name] = page;
    }
    const { alice, bob } = pages;
    for (const [name, page] of Object.entries(pages)) {
      await waitFor(`${name} to join ${ROOM}`, () => page.$eval("#chat", (e, room) => e.dataset.joined === room, ROOM));
    }

    // 1. Before any reload.
    // The last one is shown as typed, tags and all: the page never parses user text as HTML.
    const texts = ["hello bob, before any reload", "still here after the live hand-off?", "and after a reload --close <b>&amp;</b>"];
    await say(alice, texts[0]);
    await waitFor("bob to show alice's first message", async () => (await shown(bob, texts[0])) === 1);
    const reply = "hi alice!";
    await say(bob, reply);
    await waitFor("alice to show bob's reply", async () => (await shown(alice, reply)) === 1);

    // 2. Live hand-off: the connections move to the new workers without a disconnect.
    let pids = await server.workerPids();
    await server.reload();
    pids = await server.waitReplaced(pids);
    await say(alice, texts[1]);
    await waitFor("bob to show the message sent after the live hand-off", async () => (await shown(bob, texts[1])) === 1);
    for (const [name, page] of Object.entries(pages)) {
      const s = await status(page);
      assert.equal(s.connects, "1", `${name} did not reconnect across a live hand-off (${s.text})`);
      assert.equal(s.state, "connected", `${name}: ${s.text}`);
    }

    // 3. reload --close: close 1012, the client reconnects and rejoins with `since`: recovered.
    await server.reload("--close");
    await server.waitReplaced(pids);
    for (const [name, page] of Object.entries(pages)) {
      let seen;
      const s = await waitFor(`${name} to reconnect and recover after reload --close`, async () => {
        seen = await status(page);
        // A page may reconnect twice: its new connection can land on the worker the reload
        // replaces next, which closes it with 1012 too. Every reconnect must have recovered.
        const connects = Number(seen.connects);
        return connects >= 2 && seen.state === "recovered" && Number(seen.recoveries) === connects - 1 ? seen : undefined;
      }).catch((e) => {
        throw new Error(`${e.message} (status line: ${JSON.stringify(seen)})`);
      });
      assert.equal(s.lastClose, "1012", `${name} was closed with 1012 (service restart)`);
      assert.equal(s.gaps, "0", `${name} lost nothing`);
    }
    await say(alice, texts[2]);
    await waitFor("bob to show the message sent after reload --close", async () => (await shown(bob, texts[2])) === 1);

    // Each shown exactly once, in order, on both pages: a last message alice sends proves
    // that nothing sent before it is still on its way (a group's messages arrive in order).
    const last = "bye";
    await say(alice, last);
    for (const [name, page] of Object.entries(pages)) {
      await waitFor(`${name} to show alice's last message`, async () => (await shown(page, last)) >= 1);
      const got = await messages(page);
      assert.deepEqual(
        got.map((m) => [m.from, m.text]),
        [["alice", texts[0]], ["bob", reply], ...[...texts.slice(1), last].map((text) => ["alice", text])],
        `${name} shows every message exactly once, in order`,
      );
      const offsets = got.map((m) => m.offset);
      assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), `${name}: offsets increase`);
      assert.equal(new Set(offsets).size, offsets.length, `${name}: no offset twice`);
      assert.equal((await status(page)).gaps, "0", `${name}: no gap`);
    }
    assert.deepEqual(pageErrors, [], "no uncaught error in the pages");
    const files = await screenshots(pages);
    for (const f of files) assert.ok(fs.statSync(f).size > 0, `${f} written`);
    t.diagnostic(`screenshots: ${files.join(", ")}`);
  } catch (e) {
    // Pictures of the failure, and what the pages and the server said.
    await screenshots(pages).catch(() => {});
    e.message += `\n--- pages ---\n${pageLog.join("\n")}\n--- groupcast log ---\n${server?.log() ?? ""}`;
    throw e;
  } finally {
    await closeBrowser(browser);
    await server?.stop();
  }
});

// ---- prerequisites -----------------------------------------------------------------------

async function prerequisites() {
  const missing = [];
  if (!fs.existsSync(BIN)) missing.push(`no groupcast binary at ${BIN} (cargo build, or set GROUPCAST_BIN)`);
  if (!fs.existsSync(CHROMIUM)) missing.push(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`);
  let puppeteer = null;
  try {
    puppeteer = (await import("puppeteer-core")).default;
  } catch (e) {
    missing.push(`puppeteer-core is not installed (cd tests/browser && npm ci): ${e.message}`);
  }
  return { puppeteer, missing };
}

// ---- the pages ---------------------------------------------------------------------------

/** Types `text` in the page's message box and sends it; waits until the box is emptied. */
async function say(page, text) {
  // Clicks need the page in front: a background tab renders no frames, and puppeteer waits
  // for one to see the button.
  await page.bringToFront();
  await page.type("#send input[name=text]", text);
  await page.click("#send button[type=submit]");
  await waitFor(`"${text}" to be sent`, () => page.$eval("#send input[name=text]", (e) => e.value === ""));
}

/** The status line's hooks: state, connects, recoveries, gaps, lastClose, text. */
function status(page) {
  return page.$eval("#status", (e) => ({ ...e.dataset, text: e.textContent }));
}

/** The messages the page shows, in order: [{offset, from, text}]. */
function messages(page) {
  return page.$$eval("#messages li.msg", (lis) =>
    lis.map((li) => ({ offset: Number(li.dataset.offset), from: li.dataset.from, text: li.querySelector(".text").textContent })),
  );
}

/** How many times the page shows a message with this text. */
async function shown(page, text) {
  return (await messages(page)).filter((m) => m.text === text).length;
}

async function screenshots(pages) {
  fs.mkdirSync(SHOTS, { recursive: true });
  const files = [];
  for (const [name, page] of Object.entries(pages)) {
    const file = path.join(SHOTS, `${name}.png`);
    await page.bringToFront();
    await page.screenshot({ path: file });
    files.push(file);
  }
  return files;
}

/** Closes the browser; one that does not close in time is killed (by its pid). */
async function closeBrowser(browser) {
  if (!browser) return;
  const proc = browser.process();
  const closed = browser.close().catch(() => {});
  const timedOut = await Promise.race([closed.then(() => false), sleep(10_000).then(() => true)]);
  if (timedOut && proc?.pid && proc.exitCode === null) {
    try {
      process.kill(proc.pid, "SIGKILL");
    } catch {
      // exited meanwhile
    }
  }
}

// ---- the instance ------------------------------------------------------------------------

class Instance {
  /** Starts `groupcast start -c FILE` (2 workers, the API with the demo) and waits until it serves. */
  static async start() {
    const s = new Instance();
    s.dir = fs.mkdtempSync(path.join(os.tmpdir(), "gc-browser-"));
    s.pidFile = path.join(s.dir, "groupcast.pid");
    s.configFile = path.join(s.dir, "groupcast.toml");
    [s.wsPort, s.apiPort] = await freePorts(2);
    fs.writeFileSync(
      s.configFile,
      [
        `listen = "127.0.0.1:${s.wsPort}"`,
        "workers = 2",
        `pid_file = "${s.pidFile}"`,
        "",
        "[api]",
        `listen = "127.0.0.1:${s.apiPort}"`,
        "demo = true",
        "",
      ].join("\n"),
    );
    s.demoUrl = `http://127.0.0.1:${s.apiPort}/demo/`;
    s.pids = new Set(); // every process of the instance seen in status, killed at the end
    const out = fs.openSync(path.join(s.dir, "stdout.log"), "w");
    const err = fs.openSync(path.join(s.dir, "stderr.log"), "w");
    s.child = spawn(BIN, ["start", "-c", s.configFile], { stdio: ["ignore", out, err] });
    fs.closeSync(out);
    fs.closeSync(err);
    s.exited = null;
    s.child.on("exit", (code, signal) => (s.exited = { code, signal }));
    s.masterPid = s.child.pid;
    try {
      await s.waitServing();
    } catch (e) {
      await s.stop();
      throw new Error(`${e.message}\n--- groupcast log ---\n${s.log()}`);
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

  /** `groupcast status --json`, parsed; remembers its pids for the kill at the end. */
  async status() {
    if (this.exited) throw new Error(`groupcast exited: ${JSON.stringify(this.exited)}`);
    const r = await run(["status", "-c", this.configFile, "--json"]);
    if (r.code !== 0) throw new Error(`status failed (${r.code}): ${r.stderr}`);
    const report = JSON.parse(r.stdout);
    for (const p of report.processes ?? []) if (p.pid > 0) this.pids.add(p.pid);
    return report;
  }

  /** Every process running, both workers on the bus, the API ready, the demo page served. */
  async waitServing() {
    await waitFor("groupcast to be ready", async () => {
      const r = await this.status();
      const workers = r.processes.filter((p) => p.role === "worker");
      return workers.length === 2 && r.processes.every((p) => p.state === "running") && workers.every((w) => w.channel_connected === true);
    });
    await waitFor("the API to be ready", async () => (await httpGet(`http://127.0.0.1:${this.apiPort}/ready`)).status === 200);
    await waitFor("the demo page to be served", async () => (await httpGet(this.demoUrl)).status === 200);
  }

  async workerPids() {
    const r = await this.status();
    return r.processes.filter((p) => p.role === "worker").map((p) => p.pid);
  }

  /** `groupcast reload [ARGS] -c FILE`; throws unless it succeeded. */
  async reload(...args) {
    const r = await run(["reload", ...args, "-c", this.configFile]);
    if (r.code !== 0) throw new Error(`reload ${args.join(" ")} failed (${r.code}): ${r.stdout}${r.stderr}`);
  }

  /** Waits until no worker of `old` is left and the instance serves again; the new worker pids. */
  async waitReplaced(old) {
    await waitFor("the reload to replace every worker", async () => {
      const pids = await this.workerPids();
      return pids.length === 2 && !pids.some((p) => old.includes(p));
    });
    await this.waitServing();
    return this.workerPids();
  }

  /** SIGTERM to the master (by pid), then SIGKILL to whatever of the instance is left. */
  async stop() {
    if (this.child && !this.exited) {
      signal(this.masterPid, "SIGTERM");
      const deadline = Date.now() + 10_000;
      while (!this.exited && Date.now() < deadline) await sleep(POLL);
    }
    for (const pid of [this.masterPid, ...this.pids]) {
      if (this.belongs(pid)) signal(pid, "SIGKILL");
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** Whether `pid` is still a process of this instance (its command line or environment names our files). */
  belongs(pid) {
    for (const f of ["cmdline", "environ"]) {
      try {
        if (fs.readFileSync(`/proc/${pid}/${f}`).toString("latin1").includes(this.dir)) return true;
      } catch {
        // gone, or not ours to read
      }
    }
    return false;
  }
}

function signal(pid, sig) {
  try {
    process.kill(pid, sig);
  } catch {
    // exited meanwhile
  }
}

// ---- small helpers -----------------------------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns something other than undefined/false/null; that value. */
async function waitFor(what, fn, timeout = TIMEOUT) {
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

/** `n` distinct ports free a moment ago on 127.0.0.1 (held together, so never the same twice). */
async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      await new Promise((resolve, reject) => {
        s.once("error", reject);
        s.listen(0, "127.0.0.1", resolve);
      });
      servers.push(s);
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

/** Runs `BIN args` to completion (killed after TIMEOUT): {code, stdout, stderr}. */
function run(args) {
  return new Promise((resolve) => {
    execFile(BIN, args, { timeout: TIMEOUT, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === "number" ? err.code : null) : 0, stdout, stderr });
    });
  });
}

/** GET `url`: {status, body}; a connection error throws. */
async function httpGet(url) {
  const res = await fetch(url, { signal: AbortSignal.timeout(5_000) });
  return { status: res.status, body: await res.text() };
}

