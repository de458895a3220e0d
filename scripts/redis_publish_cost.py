#!/usr/bin/env python3
"""The Redis bus's publish cost, before and after protocol 2 (issue 12): N one-at-a-time
round trips of the seed's PUBLISH of a MESSAGE frame, then of the numbering script
(EVALSHA, src/channel/redis_history.rs) that protocol 2 runs instead, against a local
redis-server on a free port with one subscriber draining the channel. Prints the wall time
per publish seen by the publisher and Redis's own CPU per call (INFO commandstats).

usage: scripts/redis_publish_cost.py [N] [PAYLOAD_BYTES]
"""
import os, re, socket, struct, subprocess, sys, threading, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 100
MESSAGE = 4  # wire.rs MESSAGE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lua_source():
    src = open(os.path.join(ROOT, "src/channel/redis_history.rs")).read()
    return re.search(r'const PUBLISH_LUA: &str = r#"(.*?)"#;', src, re.S).group(1)


def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def call(self, *args):
        self.s.sendall(command(*args))
        return self.reply()

    def reply(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in (b"+", b"-"):
            if kind == b"-":
                raise RuntimeError(rest.decode())
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError("bad reply %r" % line)


def main():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                c = Conn(port)
                c.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        sub = Conn(port)
        sub.s.sendall(command("SUBSCRIBE", "gc:room"))
        def drain():
            try:
                while True:
                    sub.reply()
            except (OSError, RuntimeError):
                pass  # Redis stopped at the end
        threading.Thread(target=drain, daemon=True).start()
        payload = b"x" * SIZE
        group = b"room"
        origin = 0x1234

        def frame(seq):  # the seed's MESSAGE frame (wire.rs): len, type, origin, seq, group, payload
            body = struct.pack(">BQQH", MESSAGE, origin, seq, len(group)) + group + payload
            return struct.pack(">I", len(body)) + body

        c.call("CONFIG", "RESETSTAT")
        t0 = time.perf_counter()
        for seq in range(1, N + 1):
            c.call("PUBLISH", "gc:room", frame(seq))
        before = (time.perf_counter() - t0) / N
        sha = c.call("SCRIPT", "LOAD", lua_source())
        tail = struct.pack(">BH", 0, len(group)) + group + payload
        t0 = time.perf_counter()
        for seq in range(1, N + 1):
            head = struct.pack(">QQ", origin, seq)
            c.call("EVALSHA", sha, 3, b"gc:h:room", b"gc:p:room", b"gc:o:%016x" % origin, b"gc:room", head, tail,
                   seq, "0123456789abcdef", 100, 300000, 86400000, b"\x0b")
        after = (time.perf_counter() - t0) / N
        stats = c.call("INFO", "commandstats").decode()
        if os.environ.get("ALLSTATS"):
            print(stats)
        per_call = dict(re.findall(r"cmdstat_(\w+):calls=\d+,usec=\d+,usec_per_call=([\d.]+)", stats))
        print("N=%d payload=%d bytes, one subscriber, one round trip per publish" % (N, SIZE))
        print("seed PUBLISH:        %6.1f us per publish (publisher), Redis CPU %s us/call"
              % (before * 1e6, per_call.get("publish")))
        print("protocol-2 EVALSHA:  %6.1f us per publish (publisher), Redis CPU %s us/call"
              % (after * 1e6, per_call.get("evalsha")))
    finally:
        redis.kill()
        redis.wait()


main()
