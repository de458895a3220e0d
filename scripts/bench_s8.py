"""S8 for scripts/bench: 100,000 connections on one box, kernel memory counted.

Each server (groupcast with --s8-workers workers, default 6; uWebSockets.js, one process)
holds as many connections as it can here: every process on this box is capped at 20,000
open files (hard limit), so groupcast (several processes) reaches 100,000 and uWS
(one process) about 19,000. The loader runs as several `groupcast-bench s8` processes
(each under the cap), its source addresses spread over 127.0.0.1..8.

Per server: idle memory per connection (user: the PSS of the server's processes; kernel:
growth of SUnreclaim, of the slab caches a connection uses, and of /proc/net/sockstat's TCP
`mem` pages, both ends of each loopback connection included), the connect-and-join storm,
20 broadcasts to the group all members joined (time until the last member has it), and a
rate ramp over the groups of 100 (the highest step delivered without loss).
"""

import json
import math
import os
import select
import signal
import subprocess
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
# Slab caches one idle TCP connection uses (its socket, inode, file, dentry, epoll item).
SLAB_CACHES = ["TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq",
               "skbuff_head_cache", "kmalloc-64", "kmalloc-128", "kmalloc-192", "kmalloc-256",
               "kmalloc-512", "kmalloc-1k", "kmalloc-2k", "kmalloc-4k", "kmalloc-8k"]
UWS_MAX = 19_000


def log(msg):
    print(f"[bench s8] {msg}", flush=True, file=__import__("sys").stderr)


def kernel_sample():
    """SUnreclaim and Slab (bytes), TCP sockstat (sockets, mem bytes), slab cache bytes."""
    out = {"slab_caches": {}}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k in ("Slab", "SUnreclaim", "SReclaimable"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    w = line.split()[1:]
                    d = dict(zip(w[::2], w[1::2]))
                    out["tcp_inuse"] = int(d.get("inuse", 0))
                    out["tcp_mem_bytes"] = int(d.get("mem", 0)) * PAGE
    except OSError:
        pass
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                w = line.split()
                if w and w[0] in SLAB_CACHES:
                    # active_objs * objsize (what is in use, not the slabs' slack)
                    out["slab_caches"][w[0]] = int(w[1]) * int(w[3])
    except (OSError, IndexError, ValueError):
        pass
    return out


def kernel_delta(a, b):
    d = {k: b[k] - a[k] for k in ("Slab", "SUnreclaim", "SReclaimable", "tcp_inuse", "tcp_mem_bytes")
         if k in a and k in b}
    d["slab_caches"] = {k: b["slab_caches"].get(k, 0) - a["slab_caches"].get(k, 0)
                        for k in set(a["slab_caches"]) | set(b["slab_caches"])}
    d["slab_caches_total"] = sum(d["slab_caches"].values())
    return d


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))]


class Loader:
    """One `groupcast-bench s8` process, talked to by lines on its stdin/stdout."""

    def __init__(self, loader, port, first, n, groups, publisher, smoke):
        cmd = [str(loader), "s8", "--addr", f"127.0.0.1:{port}", "--first", str(first),
               "--connections", str(n), "--groups", str(groups), "--source-ips", "8", "--threads", "1"]
        if publisher:
            cmd.append("--publisher")
        if smoke:
            cmd.append("--smoke")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def read(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"loader {self.proc.pid} said nothing in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"loader {self.proc.pid} ended (exit {self.proc.poll()})")
        return json.loads(line)

    def ask(self, cmd, timeout=60):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_count(loaders, key, sub, want, timeout, stall=None):
    """Poll `report` until the members' count for bcast/steps `sub` reaches `want`.
    Returns (count, last arrival ns or None, failures, first_error)."""
    deadline, last_change, best = time.time() + timeout, time.time(), -1
    while True:
        reps = [ld.ask("report") for ld in loaders]
        got = sum((r[key].get(str(sub)) or [0, 0])[0] for r in reps)
        last = max(((r[key].get(str(sub)) or [0, 0])[1] for r in reps), default=None)
        fails = sum(r["failures"] for r in reps)
        err = next((r["first_error"] for r in reps if r.get("first_error")), None)
        if got > best:
            best, last_change = got, time.time()
        if got >= want or fails or time.time() > deadline or (stall and time.time() - last_change > stall):
            return got, last, fails, err
        time.sleep(0.05)


def run_one(kind, n, loader, make_server, tree_pss_bytes, tree_cpu_us, proc_tree, smoke, steps, step_s):
    """One server at `n` members: returns its record."""
    groups = max(1, n // 100)
    nload = 2 if smoke else max(2, math.ceil(n / 17_000))
    rec = {"server": kind, "members": n, "groups_of_100": groups, "loader_processes": nload}
    srv = make_server(kind)
    if not srv.ok:
        srv.stop()
        rec["error"] = f"{kind} failed to start (log {srv.log_path})"
        return rec
    loaders = []
    try:
        time.sleep(1.0)
        k0, pss0, cpu0 = kernel_sample(), tree_pss_bytes(srv.pid), tree_cpu_us(srv.pid)
        rec["server_processes"] = len(proc_tree(srv.pid))
        per = math.ceil(n / nload)
        for i in range(nload):
            first = i * per
            loaders.append(Loader(loader, srv.port, first, min(per, n - first), groups, i == 0, smoke))
        readies = [ld.read(900) for ld in loaders]
        cpu1 = tree_cpu_us(srv.pid)
        opened = sum(r["opened"] for r in readies)
        joined = sum(r["joined"] for r in readies)
        hs = sorted(v for r in readies for v in r["handshake_us"])
        t0 = min(r["t_start_ns"] for r in readies)
        t1 = max(r["t_joined_ns"] for r in readies)
        storm_s = (t1 - t0) / 1e9
        rec["storm"] = {
            "opened": opened, "joined": joined,
            "connect_failures": sum(r["connect_failures"] for r in readies),
            "first_error": next((r["first_error"] for r in readies if r.get("first_error")), None),
            "seconds": round(storm_s, 3),
            "connects_per_s": round(joined / storm_s) if storm_s > 0 else None,
            "handshake_p50_ms": pct(hs, 0.5) / 1000 if hs else None,
            "handshake_p99_ms": pct(hs, 0.99) / 1000 if hs else None,
            "handshake_max_ms": hs[-1] / 1000 if hs else None,
            "server_cpu_us": cpu1 - cpu0,
            "server_cpu_us_per_connect": round((cpu1 - cpu0) / max(1, joined), 1),
        }
        log(f"{kind}: {joined:,}/{n:,} joined in {storm_s:.1f}s")
        if joined < n:
            rec["error"] = f"only {joined} of {n} members joined: {rec['storm']['first_error']}"
            return rec
        c_settle = tree_cpu_us(srv.pid)
        time.sleep(3.0)  # settle: accept queues drained, join replies flushed
        k1, pss1 = kernel_sample(), tree_pss_bytes(srv.pid)
        idle_cpu = (tree_cpu_us(srv.pid) - c_settle) / 3.0 / 1e6
        kd = kernel_delta(k0, k1)
        held = n + 1  # the publisher is open too
        rec["idle"] = {
            "pss_bytes": pss1, "pss_growth_bytes": pss1 - pss0,
            # Server CPU while the members sit idle (pings, timers), in cores (3 s sample).
            "server_cpu_cores_idle": round(idle_cpu, 3),
            "pss_bytes_per_connection": round((pss1 - pss0) / held, 1),
            "kernel_delta": kd,
            # Both ends of every loopback connection are in these numbers; the loader's end
            # (a tokio socket: socket, inode, file, dentry, epoll item) is about the same size.
            "kernel_sunreclaim_bytes_per_connection_both_ends": round(kd.get("SUnreclaim", 0) / held, 1),
            "kernel_slab_caches_bytes_per_connection_both_ends": round(kd["slab_caches_total"] / held, 1),
            "kernel_tcp_mem_bytes_per_connection_both_ends": round(kd.get("tcp_mem_bytes", 0) / held, 1),
        }
        log(f"{kind}: PSS {rec['idle']['pss_bytes_per_connection']} B/conn, slab caches "
            f"{rec['idle']['kernel_slab_caches_bytes_per_connection_both_ends']} B/conn (both ends)")

        # Broadcasts to the group every member joined.
        nb = 5 if smoke else 20
        lat, bfail, cpu_b0 = [], None, tree_cpu_us(srv.pid)
        for seq in range(1, nb + 1):
            sent = loaders[0].ask(f"bcast {seq}")["sent_ns"]
            got, last, fails, err = wait_count(loaders, "bcast", seq, n, 60)
            if got < n or fails:
                bfail = f"broadcast {seq}: {got} of {n} delivered, {fails} failures: {err}"
                break
            lat.append((last - sent) / 1e6)
        cpu_b1 = tree_cpu_us(srv.pid)
        ls = sorted(lat)
        rec["broadcast"] = {
            "broadcasts": len(lat), "members": n, "error": bfail,
            "last_member_p50_ms": round(pct(ls, 0.5), 3) if ls else None,
            "last_member_p99_ms": round(pct(ls, 0.99), 3) if ls else None,
            "last_member_max_ms": round(ls[-1], 3) if ls else None,
            "server_cpu_us_per_delivery": round((cpu_b1 - cpu_b0) / max(1, len(lat) * n), 3),
        }
        log(f"{kind}: broadcast {rec['broadcast']}")
        if bfail:
            rec["error"] = bfail
            return rec

        # Rate ramp over the groups of 100 (each message reaches n/groups members).
        per_group = n // groups
        ramp, best = [], None
        for i, rate in enumerate(steps):
            c0 = tree_cpu_us(srv.pid)
            pub = loaders[0].ask(f"rate {i} {rate} {step_s} 64", timeout=step_s * 10 + 60)
            sent = pub["sent"]
            want = sent * per_group
            got, last, fails, err = wait_count(loaders, "steps", i, want, 120, stall=10)
            c1 = tree_cpu_us(srv.pid)
            # Kept up: every delivery in, and the last one within 10 % (+ 0.2 s) of the step's
            # length after the first publish; a server (or loader) that falls behind delivers
            # everything late, which is not "this rate without loss".
            span = (last - pub["start_ns"]) / 1e9 if last else None
            kept_up = span is not None and span <= step_s * 1.1 + 0.2
            ok = got == want and not fails and kept_up
            ramp.append({"rate": rate, "sent": sent, "expected": want, "delivered": got, "ok": ok,
                         "last_delivery_s": round(span, 3) if span else None,
                         "publish_s": round((pub["end_ns"] - pub["start_ns"]) / 1e9, 3),
                         "server_cpu_us_per_delivery": round((c1 - c0) / max(1, got), 3), "error": err})
            log(f"{kind}: rate {rate}/s: {got}/{want} delivered, the last {span and round(span, 2)} s "
                f"after the first publish")
            if not ok:
                break
            best = rate
        rec["ramp"] = {"steps": ramp, "highest_lossless_rate": best,
                       "highest_lossless_deliveries_per_s": best * per_group if best else None}
        rec["alive"] = srv.proc.poll() is None
    except (TimeoutError, RuntimeError, json.JSONDecodeError, OSError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        for ld in loaders:
            ld.stop()
        srv.stop()
    return rec


def fmtn(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        s = f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    else:
        s = f"{v:,}"
    return s + unit


ROWS = [
    ("connections held (server processes)", lambda r: f"{r['members'] + 1:,} ({r.get('server_processes', '?')})"),
    ("user PSS B/idle connection", lambda r: fmtn(r.get("idle", {}).get("pss_bytes_per_connection"))),
    ("kernel slab caches B/connection, both ends", lambda r: fmtn(r.get("idle", {}).get("kernel_slab_caches_bytes_per_connection_both_ends"))),
    ("kernel SUnreclaim B/connection, both ends", lambda r: fmtn(r.get("idle", {}).get("kernel_sunreclaim_bytes_per_connection_both_ends"))),
    ("kernel TCP buffer B/connection (sockstat mem), both ends", lambda r: fmtn(r.get("idle", {}).get("kernel_tcp_mem_bytes_per_connection_both_ends"))),
    ("server CPU while idle (cores, 3 s after the storm)", lambda r: fmtn(r.get("idle", {}).get("server_cpu_cores_idle"))),
    ("storm connects+joins/s", lambda r: fmtn(r.get("storm", {}).get("connects_per_s"))),
    ("storm handshake p50 / p99 ms", lambda r: f"{fmtn(r.get('storm', {}).get('handshake_p50_ms'))} / {fmtn(r.get('storm', {}).get('handshake_p99_ms'))}"),
    ("storm server CPU us/connection (handshake + 2 joins)", lambda r: fmtn(r.get("storm", {}).get("server_cpu_us_per_connect"))),
    ("broadcast to all: last member p50 / p99 / max ms", lambda r: " / ".join(fmtn(r.get("broadcast", {}).get(k)) for k in ("last_member_p50_ms", "last_member_p99_ms", "last_member_max_ms"))),
    ("broadcast server CPU us/delivery", lambda r: fmtn(r.get("broadcast", {}).get("server_cpu_us_per_delivery"))),
    ("groups of 100: highest rate delivered in full and on time, msg/s (deliveries/s)", lambda r: f"{fmtn(r.get('ramp', {}).get('highest_lossless_rate'))} ({fmtn(r.get('ramp', {}).get('highest_lossless_deliveries_per_s'))})"),
    ("error", lambda r: r.get("error") or "none"),
]


def markdown(records, meta):
    cols = [r["server"] for r in records]
    lines = ["| S8 | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for label, get in ROWS:
        lines.append("| " + label + " | " + " | ".join(str(get(r)) for r in records) + " |")
    small = meta.get("workers_at_uws_size")
    lines.append(f"\n{meta['when']}{', SMOKE' if meta['smoke'] else ''}: groupcast {meta['workers']} workers"
                 + (f" ({small} at uWS's size)" if small and small != meta['workers'] else "") + "; "
                 "uWS is one process, capped here at ~19,000 connections by the 20,000-file hard limit. "
                 "Kernel figures include both ends of each loopback connection (the loader's end is about "
                 "the same size: socket, inode, file, dentry, epoll item).\n")
    return "\n".join(lines) + "\n"


def run(loader, make_server, servers, smoke, workers, outdir, helpers, n=None, steps=None, step_s=None,
        at_uws_size=False):
    """Run S8 on every server in `servers` (with `at_uws_size`, groupcast a second time at
    uWS's size, column "groupcast@19k"); returns (records, markdown, exit code)."""
    tree_pss_bytes, tree_cpu_us, proc_tree = helpers
    big_workers, small_workers = workers if isinstance(workers, tuple) else (workers, workers)
    n_gc = n or (300 if smoke else 100_000)
    steps = steps or ([50, 200] if smoke else [2000, 4000, 8000, 12000, 16000, 24000, 32000])
    step_s = step_s or (1.0 if smoke else 3.0)
    records, code = [], 0
    runs = []
    for kind in servers:
        if kind == "ws":
            log("skipping the ws peer (S8 compares groupcast and uWebSockets.js)")
            continue
        runs.append((kind, kind, n_gc if kind == "groupcast" else min(n_gc, UWS_MAX), big_workers))
        if kind == "groupcast" and at_uws_size and n_gc > UWS_MAX:
            # At the size one process can hold, groupcast runs as an operator would run it
            # there: one worker per core (its default), not the 6 the file cap forces at 100,000.
            runs.append((f"groupcast@{UWS_MAX // 1000}k", kind, UWS_MAX, small_workers))
    for label, kind, size, nworkers in runs:
        log(f"{label}: {size:,} members" + (f", {nworkers} workers" if kind == "groupcast" else ""))
        rec = run_one(kind, size, loader, lambda k: make_server(k, nworkers), tree_pss_bytes, tree_cpu_us,
                      proc_tree, smoke, steps, step_s)
        rec["server"] = label
        if kind == "groupcast":
            rec["workers"] = nworkers
        records.append(rec)
        if rec.get("error"):
            log(f"FAILED {kind}: {rec['error']}")
            code = 1
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke, "workers": big_workers,
            "workers_at_uws_size": small_workers}
    md = markdown(records, meta)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (outdir / f"s8-{stamp}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (outdir / f"s8-{stamp}.md").write_text(md)
    return records, md, code
