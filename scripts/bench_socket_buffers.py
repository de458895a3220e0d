#!/usr/bin/env python3
"""Socket buffer settings (issue 15, point 2): kernel memory a stalled connection holds, and throughput.

For each setting in --settings (bytes; default 0,65536,16384,4096; 0 = no `socket_*_buffer`
lines, the kernel's default and autotuning) a fresh groupcast (2 workers) gets
`socket_send_buffer = X` and `socket_recv_buffer = X` (SO_SNDBUF / SO_RCVBUF on its listeners,
inherited by accepted sockets), its command rate limit lifted and the per-IP cap off;
`limits.send_buffer_limit` and `limits.slow_client` stay at their defaults (printed under the
table, read from `status --json`). Then:

1. Stalled clients. N raw WebSocket clients (plain sockets, fixed Sec-WebSocket-Key) join the
   group "stall" and never read again; one publisher sends M messages of 64 KiB to "stall" at
   a steady pace (--rate). During and after the publishing the script samples:
   - /proc/net/sockstat TCP `mem` (pages x 4096) minus a sample taken before the clients
     connected, divided by N: kernel buffer bytes per stalled connection, BOTH ends (the
     server's send queue and the client's receive queue), system wide (so other load on the
     box adds noise);
   - `ss -tmn` skmem of the server's end of each stalled connection (publisher excluded):
     w (wmem_queued: bytes, skb truesize, queued in the send buffer, sent or not),
     r (rmem_alloc: received, not yet read), f (forward_alloc: reserved, not yet used),
     tb (sk_sndbuf: the send buffer's size, what SO_SNDBUF or autotuning made it; the kernel
     doubles SO_SNDBUF and caps it at net.core.wmem_max; autotuning grows it to tcp_wmem[2]);
     the kernel always lets one segment in, so a stalled socket holds at least one skb (on
     loopback, MSS 47,616 bytes: ~48 KB, whatever smaller SO_SNDBUF is asked for);
     "server end" below is w + r + f per connection, and the client end is its r + f;
   - `groupcast status --json`: slow_closed / slow_dropped (the slow-client policy acting
     when a client's user-space queue passes send_buffer_limit) and the send_queue_bytes
     histogram (queue depths the workers saw when writing; status has no live queue gauge).
   "peak" = the sample with the largest sockstat delta; "end" = after publishing, once the
   figures stop moving. A client the server closed leaves an orphaned server socket whose
   unsent data the kernel keeps until the (still stalled) client end goes away: counted in
   sockstat, not in the ESTAB figures; the `orphan` column says how many.
2. Throughput, a fresh server per measurement: `groupcast-bench s7` (64 KiB messages to a
   group of 100, closed loop: MB/s, server CPU us/MB) and `groupcast-bench s2 --steps 5000
   --duration 5` (server CPU us/delivery, p99, loss at 5,000 msg/s).

--runs K repeats everything (settings interleaved per run) and the table shows medians.
--quick: seconds-long smoke (N=20, 20 messages, loader --smoke) that checks everything ran.
Writes the table to stdout and target/bench-results/socket-buffers-<time>.{md,json}.

How to read it: the stalled rows say how much kernel memory one client that stops reading
can pin (the server's share is what SO_SNDBUF bounds; the client's share is the client's
own receive buffer and not the server's to set); the throughput rows say what the bound
costs a client that does read. Exit status: 0 all ran and the loaders were content; 1 a
measurement did not run (server start, loader error); 2 all ran but a loader reported a
miss (S2: under 95 % of the rate, inexact delivery, or p99 >= 100 ms).
"""

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
MASK = b"\x5a\x13\xc7\x2e"
MSG_SIZE = 64 * 1024
SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def log(msg):
    print(f"[bench sockbuf] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

def proc_tree(root):
    """Pids of the live process tree rooted at `root`."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(rest[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out, i = [root], 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Server:
    """One fresh groupcast with the socket buffer setting `bufsize` (0: keys omitted)."""

    def __init__(self, groupcast_bin, bufsize, logdir):
        self.bin, self.port = groupcast_bin, free_port()
        self.tmp = tempfile.mkdtemp(prefix="bench-sockbuf-")
        text = ""
        if bufsize:
            # Top-level keys: before any table.
            text += f"socket_send_buffer = {bufsize}\nsocket_recv_buffer = {bufsize}\n"
        # The publishers send thousands of commands per second from one address: lift the
        # anti-abuse bounds meant for browsers. send_buffer_limit stays at its default.
        text += ("[limits]\ncommands_per_second = 1000000\ncommands_burst = 1000000\n"
                 "max_connections_per_ip = 0\n")
        self.config, self.pid_file = Path(self.tmp) / "bench.toml", f"{self.tmp}/g.pid"
        self.config.write_text(text)
        self.log_path = logdir / f"groupcast-sockbuf-{bufsize}-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [str(groupcast_bin), "-c", str(self.config), "start", "--listen", f"127.0.0.1:{self.port}",
               "--workers", "2", "--pid-file", self.pid_file]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.pid = self.proc.pid
        self.ok = wait_port(self.port, self.proc) and self.wait_status()

    def status(self):
        p = subprocess.run([str(self.bin), "-c", str(self.config), "--pid-file", self.pid_file, "status", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        return json.loads(p.stdout)

    def wait_status(self, timeout=20.0):
        """Ready when status answers with every worker running."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                st = self.status()
                workers = [p for p in st.get("processes", []) if p.get("role", "").startswith("worker")]
                if len(workers) >= 2 and all(p.get("state") == "running" for p in workers):
                    return True
            except (json.JSONDecodeError, subprocess.TimeoutExpired, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self):
        pids = proc_tree(self.pid)
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.time() + 5
        for pid in pids[1:]:  # children it left behind (ours, by pid)
            while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- raw WebSocket

def ws_frame(text):
    """One masked text frame (client to server)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + MASK + masked


def ws_connect(port, timeout=10.0):
    """A plain socket past the HTTP upgrade (101 read, nothing more)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf, deadline = b"", time.time() + timeout
        while b"\r\n\r\n" not in buf:
            if time.time() > deadline:
                raise TimeoutError("no upgrade answer")
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            buf += chunk
        status = buf.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"upgrade refused: {status!r}")
        return s
    except BaseException:
        s.close()
        raise


class Drain(threading.Thread):
    """Reads and discards what the server sends the publisher, so it is never the slow one."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.stop = sock, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.1)
                if r and not self.sock.recv(1 << 16):
                    return
            except (OSError, ValueError):
                return


# ---------------------------------------------------------------- kernel sampling

def sysctl(name):
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().split()
    except OSError:
        return None


def sockstat():
    """TCP line of /proc/net/sockstat: {'inuse','orphan','tw','alloc','mem'} (mem in pages)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    w = line.split()[1:]
                    return {k: int(v) for k, v in zip(w[::2], w[1::2])}
    except (OSError, ValueError):
        pass
    return {}


def ss_sockets(port):
    """Every TCP socket with local or peer port `port`: dicts with state, local/peer port, skmem."""
    try:
        out = subprocess.run(["ss", "-tamnH", f"( sport = :{port} or dport = :{port} )"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    socks, cur = [], None
    for line in out.splitlines():
        m = SKMEM.search(line)
        if m and cur is not None:
            mem = {}
            for item in m.group(1).split(","):
                k = item.rstrip("0123456789")
                try:
                    mem[k] = int(item[len(k):])
                except ValueError:
                    pass
            cur["skmem"] = mem
            continue
        w = line.split()
        if len(w) >= 5 and not line.startswith((" ", "\t")):
            # State Recv-Q Send-Q Local:Port Peer:Port
            try:
                cur = {"state": w[0], "recv_q": int(w[1]), "send_q": int(w[2]),
                       "lport": int(w[3].rsplit(":", 1)[1]), "pport": int(w[4].rsplit(":", 1)[1]), "skmem": {}}
            except (ValueError, IndexError):
                cur = None
                continue
            socks.append(cur)
    return socks


def ss_summary(port, publisher_port, n):
    """Per stalled connection: server end (w + r + f, and parts) and client end (r + f)."""
    socks = ss_sockets(port)
    srv = [s for s in socks if s["lport"] == port and s["pport"] != publisher_port and s["state"] != "LISTEN"]
    est = [s for s in srv if s["state"] == "ESTAB"]
    cli = [s for s in socks if s["pport"] == port and s["lport"] != publisher_port]

    def tot(ss, k):
        return sum(s["skmem"].get(k, 0) for s in ss)

    tbs = sorted(s["skmem"].get("tb", 0) for s in est)
    return {
        "server_estab": len(est), "server_other_states": len(srv) - len(est),
        "server_end_bytes_per_conn": round((tot(srv, "w") + tot(srv, "r") + tot(srv, "f")) / n),
        "server_w_per_conn": round(tot(srv, "w") / n), "server_f_per_conn": round(tot(srv, "f") / n),
        "server_send_q_per_conn": round(sum(s["send_q"] for s in srv) / n),
        "server_tb_median": tbs[len(tbs) // 2] if tbs else None,
        "client_end_bytes_per_conn": round((tot(cli, "r") + tot(cli, "f")) / n),
        "client_rb_median": sorted(s["skmem"].get("rb", 0) for s in cli)[len(cli) // 2] if cli else None,
    }


def status_summary(st):
    """The slow-client counters and the workers' queue-depth histogram from status --json."""
    t = st.get("totals", {})
    hist_max, hist_sum, hist_n = 0, 0, 0
    rss = 0
    for p in st.get("processes", []):
        if not str(p.get("role", "")).startswith("worker"):
            continue
        rss += p.get("rss_kib", 0) * 1024
        h = p.get("send_queue_bytes") or {}
        bounds, counts = h.get("bounds", []), h.get("counts", [])
        hist_sum += h.get("sum", 0)
        hist_n += sum(counts)
        for i, c in enumerate(counts):
            if c:
                hist_max = max(hist_max, bounds[i] if i < len(bounds) else float("inf"))
    return {"slow_closed": t.get("slow_closed", 0), "slow_dropped": t.get("slow_dropped", 0),
            "connections": t.get("connections", 0), "memberships": t.get("memberships", 0),
            "messages_out": t.get("messages_out", 0), "backpressure_pauses": t.get("backpressure_pauses", 0),
            "send_queue_mean_bytes": round(hist_sum / hist_n) if hist_n else None,
            "send_queue_max_bucket_bytes": hist_max if hist_n else None, "worker_rss_bytes": rss}


# ---------------------------------------------------------------- measurements

def stalled(groupcast_bin, bufsize, n, messages, rate, logdir):
    """Part 1: n clients that stop reading, one publisher of `messages` 64 KiB messages."""
    rec = {"stalled_clients": n, "messages": messages, "message_bytes": MSG_SIZE, "rate": rate}
    srv = Server(groupcast_bin, bufsize, logdir)
    clients, pub, drain = [], None, None
    try:
        if not srv.ok:
            rec["error"] = f"groupcast failed to start (log {srv.log_path})"
            return rec
        st = srv.status()
        rec["send_buffer_limit"] = st.get("limits", {}).get("send_buffer_limit")
        rec["slow_client"] = st.get("limits", {}).get("slow_client")
        rec["status_socket_send_buffer"] = st.get("socket_send_buffer")
        rec["status_socket_recv_buffer"] = st.get("socket_recv_buffer")
        rss0 = status_summary(st)["worker_rss_bytes"]
        k0 = sockstat()
        join = ws_frame('{"cmd":"add_group","group_id":"stall"}')
        for _ in range(n):
            s = ws_connect(srv.port)
            s.sendall(join)
            clients.append(s)  # never read again
        deadline = time.time() + 30
        while status_summary(srv.status())["memberships"] < n:
            if time.time() > deadline:
                rec["error"] = f"only {status_summary(srv.status())['memberships']} of {n} clients joined"
                return rec
            time.sleep(0.1)
        pub = ws_connect(srv.port)
        pub_port = pub.getsockname()[1]
        drain = Drain(pub)
        drain.start()
        frame = ws_frame('{"cmd":"send_to_group","group_id":"stall","message":"' + "x" * MSG_SIZE + '"}')
        samples = []

        def sample(phase):
            k = sockstat()
            s = {"t": round(time.time() - t0, 2), "phase": phase,
                 "sockstat_mem_delta_bytes": (k.get("mem", 0) - k0.get("mem", 0)) * PAGE,
                 "orphan": k.get("orphan", 0) - k0.get("orphan", 0)}
            s.update(ss_summary(srv.port, pub_port, n))
            s.update(status_summary(srv.status()))
            samples.append(s)
            return s

        t0 = time.time()
        next_sample = t0
        for i in range(messages):
            due = t0 + i / rate
            while time.time() < due:
                time.sleep(min(0.01, max(0.0, due - time.time())))
            pub.sendall(frame)
            if time.time() >= next_sample:
                sample("publishing")
                next_sample = time.time() + 0.5
        # After the last message: sample until the figures stop moving (deadline 10 s).
        deadline, prev = time.time() + 10, None
        while True:
            time.sleep(0.5)
            s = sample("after")
            key = (s["sockstat_mem_delta_bytes"] // (64 * PAGE), s["server_end_bytes_per_conn"], s["slow_closed"])
            if key == prev or time.time() > deadline:
                break
            prev = key
        for x in samples:
            x["ss_both_ends_per_conn"] = x["server_end_bytes_per_conn"] + x["client_end_bytes_per_conn"]
        # The peak by this server's own sockets (ss): sockstat is system wide, so noisier.
        peak = max(samples, key=lambda x: x["ss_both_ends_per_conn"])
        end = samples[-1]
        closing = next((x for x in samples if x["slow_closed"] or x["slow_dropped"]), None)
        rec["first_slow_action_s"] = closing["t"] if closing else None
        rec["sockstat_max_bytes_per_conn"] = round(max(x["sockstat_mem_delta_bytes"] for x in samples) / n)
        rec["peak"] = dict(peak, sockstat_bytes_per_conn=round(peak["sockstat_mem_delta_bytes"] / n))
        rec["end"] = dict(end, sockstat_bytes_per_conn=round(end["sockstat_mem_delta_bytes"] / n))
        rec["worker_rss_growth_bytes"] = end["worker_rss_bytes"] - rss0
        rec["samples"] = samples
        log(f"setting {bufsize}: peak {rec['peak']['sockstat_bytes_per_conn']:,} B/conn both ends "
            f"(server end {peak['server_end_bytes_per_conn']:,}), slow closed {end['slow_closed']}/{n}")
    except (OSError, TimeoutError, ConnectionError, json.JSONDecodeError, subprocess.TimeoutExpired) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if drain:
            drain.stop.set()
        for s in clients + ([pub] if pub else []):
            try:
                s.close()
            except OSError:
                pass
        if drain:
            drain.join(timeout=2)
        srv.stop()
    return rec


def loader_run(loader, scenario, srv, smoke, extra, timeout):
    cmd = [str(loader), scenario, "--addr", f"127.0.0.1:{srv.port}", "--server-pid", str(srv.pid)] + extra
    if smoke:
        cmd.append("--smoke")
    log("  $ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=timeout, text=True)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"loader timed out after {timeout}s"}
    except (json.JSONDecodeError, IndexError):
        return {"ok": False, "error": f"loader printed no JSON (exit {p.returncode})"}


def throughput(groupcast_bin, loader, bufsize, smoke, logdir):
    """Part 2: S7 and S2 at 5,000 msg/s, each against a fresh server."""
    out = {}
    for name, extra in (("s7", []), ("s2", ["--steps", "5000", "--duration", "2" if smoke else "5"])):
        srv = Server(groupcast_bin, bufsize, logdir)
        try:
            if not srv.ok:
                out[name] = {"error": f"groupcast failed to start (log {srv.log_path})"}
                continue
            res = loader_run(loader, name, srv, smoke, extra, 180 if smoke else 600)
        finally:
            srv.stop()
        if name == "s7":
            r = res.get("result") or {}
            out[name] = {"ok": res.get("ok"), "mb_per_s": r.get("delivered_mb_per_s"),
                         "cpu_us_per_mb": r.get("server_cpu_us_per_mb"), "p99_ms": r.get("p99_ms"),
                         "lost": r.get("lost"), "error": res.get("error") or (r.get("errors") or None),
                         "loader": res}
        else:
            st = (res.get("steps") or [{}])[0]
            out[name] = {"ok": res.get("ok"), "rate": st.get("target_rate"),
                         "cpu_us_per_delivery": st.get("server_cpu_us_per_delivery"), "p99_ms": st.get("p99_ms"),
                         "lost": st.get("lost"), "pass": st.get("pass"),
                         "error": res.get("error") or (st.get("errors") or None), "loader": res}
        log(f"setting {bufsize}: {name} " + str({k: v for k, v in out[name].items() if k != "loader"}))
    return out


# ---------------------------------------------------------------- table

def get(rec, path):
    for k in path.split("."):
        if not isinstance(rec, dict):
            return None
        rec = rec.get(k)
    return rec


def median_of(recs, path):
    vals = [v for v in (get(r, path) for r in recs) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def fmt(v, unit=""):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:,.2f}{unit}"
    return f"{round(v):,}{unit}"


ROWS = [
    ("stalled, peak: kernel B/conn, both ends (sockstat mem)", "stalled.peak.sockstat_bytes_per_conn"),
    ("stalled, peak: kernel B/conn, both ends (ss, this server only)", "stalled.peak.ss_both_ends_per_conn"),
    ("stalled, peak: server end B/conn (ss w+r+f)", "stalled.peak.server_end_bytes_per_conn"),
    ("stalled, peak: server send buffer tb (median)", "stalled.peak.server_tb_median"),
    ("stalled, peak: client end B/conn (ss r+f)", "stalled.peak.client_end_bytes_per_conn"),
    ("stalled, end: kernel B/conn, both ends (sockstat)", "stalled.end.sockstat_bytes_per_conn"),
    ("stalled, end: server end B/conn (ss, ESTAB + orphans)", "stalled.end.server_end_bytes_per_conn"),
    ("stalled, end: orphaned sockets (sockstat)", "stalled.end.orphan"),
    ("user-space queue: mean depth at write, B (status)", "stalled.end.send_queue_mean_bytes"),
    ("user-space queue: deepest histogram bucket <= B", "stalled.end.send_queue_max_bucket_bytes"),
    ("slow-client closes", "stalled.end.slow_closed"),
    ("slow-client drops", "stalled.end.slow_dropped"),
    ("first slow-client close/drop, s after the first message", "stalled.first_slow_action_s"),
    ("S7 MB/s", "throughput.s7.mb_per_s"),
    ("S7 server CPU us/MB", "throughput.s7.cpu_us_per_mb"),
    ("S7 lost", "throughput.s7.lost"),
    ("S2@5000 server CPU us/delivery", "throughput.s2.cpu_us_per_delivery"),
    ("S2@5000 p99 ms", "throughput.s2.p99_ms"),
    ("S2@5000 lost", "throughput.s2.lost"),
    ("S2@5000 passed (loader: >= 95 % of the rate, exact delivery, p99 < 100 ms)", "throughput.s2.pass"),
]


def markdown(settings, by_setting, meta):
    cols = [("kernel default" if s == 0 else f"{s:,}") for s in settings]
    lines = ["| socket_*_buffer | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for label, path in ROWS:
        if path.endswith(".pass"):
            cells = ["/".join(fmt(get(r, path)) for r in by_setting[s]) or "–" for s in settings]
        else:
            cells = [fmt(median_of(by_setting[s], path)) for s in settings]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errs = [f"{s}: {e}" for s in settings for r in by_setting[s] for e in r.get("errors", [])]
    lines.append("")
    lines.append(
        f"{meta['when']}{', QUICK' if meta['quick'] else ''}; median of {meta['runs']} run(s); "
        f"{meta['stalled_clients']} stalled clients, {meta['messages']} messages of 64 KiB at {meta['rate']}/s; "
        f"limits.send_buffer_limit = {meta.get('send_buffer_limit')} B, slow_client = {meta.get('slow_client')} "
        f"(defaults); sysctl wmem_max {meta['sysctl']['net.core.wmem_max']}, rmem_max "
        f"{meta['sysctl']['net.core.rmem_max']}, tcp_wmem {meta['sysctl']['net.ipv4.tcp_wmem']}, tcp_rmem "
        f"{meta['sysctl']['net.ipv4.tcp_rmem']}. The clients' own receive buffers are the kernel default in "
        "every column. sockstat figures are system wide (noise from other load); ss figures are this "
        f"server's sockets only. A slow-client close leaves an orphaned server socket whose unsent data "
        "the kernel keeps while the client end stays stalled (tcp_orphan_retries "
        f"{meta['sysctl']['net.ipv4.tcp_orphan_retries']}): the 'end' rows count them. "
        f"{os.cpu_count()} CPUs shared by server and loader.")
    if errs:
        lines.append("\nErrors: " + "; ".join(errs))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--settings", default="0,65536,16384,4096", help="socket buffer sizes in bytes (0 = kernel default)")
    ap.add_argument("--stalled", type=int, default=None, help="stalled clients (default 200; quick 20)")
    ap.add_argument("--messages", type=int, default=None, help="64 KiB messages published (default 200; quick 20)")
    ap.add_argument("--rate", type=float, default=40.0, help="publish rate, messages/s (default 40)")
    ap.add_argument("--runs", type=int, default=1, help="repeat K times, report medians")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke")
    ap.add_argument("--no-throughput", action="store_true", help="only the stalled-client part")
    ap.add_argument("--bin-dir", default=None, help="where groupcast and groupcast-bench are "
                    "(default: $CARGO_TARGET_DIR or target/, release/)")
    args = ap.parse_args()
    n = args.stalled or (20 if args.quick else 200)
    messages = args.messages or (20 if args.quick else 200)
    settings = [int(x) for x in args.settings.split(",") if x.strip()]
    tdir = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    bindir = Path(args.bin_dir) if args.bin_dir else tdir / "release"
    groupcast_bin, loader = bindir / "groupcast", bindir / "groupcast-bench"
    for b in (groupcast_bin, loader):
        if not b.exists():
            raise SystemExit(f"missing {b}: cargo build --release -p groupcast -p groupcast-bench")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    outdir = tdir / "bench-results"
    outdir.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="bench-sockbuf-logs-"))
    by_setting = {s: [] for s in settings}
    code = 0
    for run in range(args.runs):
        for s in settings:
            log(f"run {run + 1}/{args.runs}, setting {s}")
            rec = {"setting": s, "run": run + 1, "errors": []}
            rec["stalled"] = stalled(groupcast_bin, s, n, messages, args.rate, logdir)
            if rec["stalled"].get("error"):
                rec["errors"].append("stalled: " + rec["stalled"]["error"])
            if not args.no_throughput:
                rec["throughput"] = throughput(groupcast_bin, loader, s, args.quick, logdir)
                for k, v in rec["throughput"].items():
                    if v.get("error"):
                        rec["errors"].append(f"{k}: {v['error']}")
                    elif not v.get("ok"):
                        # It ran; the loader's verdict (S2: the step missed its rate or lost
                        # messages) is in the table, and in the exit status.
                        rec["verdicts"] = rec.get("verdicts", []) + [f"{k}: loader not ok"]
            if rec["errors"]:
                code = 1
            elif rec.get("verdicts") and code == 0:
                code = 2
            by_setting[s].append(rec)
    first = next((r["stalled"] for rs in by_setting.values() for r in rs if "send_buffer_limit" in r["stalled"]), {})
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "runs": args.runs,
            "stalled_clients": n, "messages": messages, "rate": args.rate,
            "send_buffer_limit": first.get("send_buffer_limit"), "slow_client": first.get("slow_client"),
            "sysctl": {k: " ".join(sysctl(k) or ["?"]) for k in
                       ("net.core.wmem_max", "net.core.rmem_max", "net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem",
                        "net.ipv4.tcp_mem", "net.ipv4.tcp_orphan_retries", "net.ipv4.tcp_max_orphans")}}
    md = markdown(settings, by_setting, meta)
    print(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (outdir / f"socket-buffers-{stamp}.md").write_text(md)
    (outdir / f"socket-buffers-{stamp}.json").write_text(
        json.dumps({"meta": meta, "records": {str(s): v for s, v in by_setting.items()}}, indent=1))
    log(f"wrote {outdir}/socket-buffers-{stamp}.{{md,json}}; server logs in {logdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
