//! Protocol 2 on `bus = "redis"` (issue 12): real groupcast instances on one real redis-server,
//! real WebSocket clients with `?protocol=2`. Offsets are assigned in Redis (a Lua script), so
//! members on two instances see a group's messages with the same consecutive offsets in the
//! same order; a join answers the group's epoch and offset; `since` recovers across instances
//! from the group's Redis stream, within `[history] size`; a Redis restart without persistence
//! starts a new epoch (rejoin: recovered:false, connected members: a gap notice), with
//! persistence (appendonly) the epoch and history survive and a rejoin recovers.
//! Skips (with a note) where redis-server is not installed, except under CI.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, wait_for, Opts, Redis, Server, TempDir, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn instance(redis_port: u16, history: &str) -> Server {
    Server::start_with(Opts {
        workers: Some(2),
        config: Some(format!(
            "bus = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:{redis_port}/\"\nprefix = \"gc-p2:\"\n\
             connect_timeout_ms = 500\nio_timeout_ms = 1000\n\
             [history]\n{history}\n\
             [limits]\ncommands_per_second = 1000000\ncommands_burst = 1000000\n"
        )),
        ..Opts::default()
    })
}

/// A protocol-2 WebSocket client.
struct P2 {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl P2 {
    fn connect(addr: SocketAddr) -> P2 {
        let stream = TcpStream::connect(addr).expect("connect to groupcast");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let url = format!("ws://{addr}/?protocol=2");
        let mut attempt = tungstenite::client::client(url.as_str(), stream);
        let ws = loop {
            match attempt {
                Ok((ws, _)) => break ws,
                Err(tungstenite::HandshakeError::Interrupted(mid)) => attempt = mid.handshake(),
                Err(e) => panic!("WebSocket handshake failed: {e}"),
            }
        };
        P2 { ws, next_id: 0 }
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// The next text frame as JSON; `None` when nothing came within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.ws.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("JSON from groupcast")),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    fn recv(&mut self) -> Value {
        self.next(TIMEOUT).unwrap_or_else(|| panic!("no frame within {TIMEOUT:?}"))
    }

    /// Sends `cmd` with a fresh id; returns the frames before its reply, and the reply.
    fn ask(&mut self, mut cmd: Value) -> (Vec<Value>, Value) {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        self.send(cmd);
        let mut before = Vec::new();
        loop {
            let v = self.recv();
            if v["id"] == json!(id) {
                return (before, v);
            }
            before.push(v);
        }
    }

    fn join(&mut self, group: &str, since: Option<(&str, u64)>) -> (Vec<Value>, Value) {
        let mut cmd = json!({"cmd": "add_group", "group_id": group});
        if let Some((epoch, offset)) = since {
            cmd["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let (before, reply) = self.ask(cmd);
        assert_eq!(reply["ok"], true, "{reply}");
        (before, reply)
    }

    /// Sends and returns the offset the message got.
    fn publish(&mut self, group: &str, message: &str) -> u64 {
        let (before, reply) = self.ask(json!({"cmd": "send_to_group", "group_id": group, "message": message}));
        assert!(before.iter().all(|v| v.get("offset").is_some()), "only envelopes before the reply: {before:?}");
        reply["offset"].as_u64().unwrap_or_else(|| panic!("send_to_group reply with an offset: {reply}"))
    }

    /// The next `n` envelopes of `group` as (offset, message).
    fn envelopes(&mut self, group: &str, n: usize) -> Vec<(u64, String)> {
        (0..n)
            .map(|_| {
                let v = self.recv();
                assert_eq!(v["group"], group, "an envelope of {group}: {v}");
                (v["offset"].as_u64().expect("offset"), v["message"].as_str().expect("message").to_owned())
            })
            .collect()
    }
}

fn epoch_of(reply: &Value) -> String {
    let e = reply["epoch"].as_str().unwrap_or_else(|| panic!("an epoch in {reply}")).to_owned();
    assert!(e.len() == 16 && e.bytes().all(|c| c.is_ascii_hexdigit()), "16 hex chars: {e}");
    e
}

fn items(before: &[Value]) -> Vec<u64> {
    before.iter().map(|v| v["offset"].as_u64().expect("an envelope")).collect()
}

#[test]
fn offsets_are_consecutive_and_in_one_order_on_both_instances() {
    let port = free_port();
    let Some(_redis) = Redis::start(port, None) else { return };
    let a = instance(port, "");
    let b = instance(port, "");
    let mut on_a = P2::connect(a.addr);
    let mut on_b = P2::connect(b.addr);
    let (_, ra) = on_a.join("room", None);
    let (_, rb) = on_b.join("room", None);
    assert_eq!((ra["offset"].as_u64(), rb["offset"].as_u64()), (Some(0), Some(0)), "{ra} {rb}");
    assert_eq!(epoch_of(&ra), epoch_of(&rb), "one epoch per group, whichever instance asks");

    let mut sender_a = P2::connect(a.addr);
    let mut sender_b = P2::connect(b.addr);
    let mut stamped = Vec::new();
    for i in 0..20 {
        stamped.push(sender_a.publish("room", &format!("a{i}")));
        stamped.push(sender_b.publish("room", &format!("b{i}")));
    }
    stamped.sort();
    assert_eq!(stamped, (1..=40).collect::<Vec<_>>(), "each send_to_group answered with its own offset");
    let got_a = on_a.envelopes("room", 40);
    let got_b = on_b.envelopes("room", 40);
    assert_eq!(got_a.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>(), "consecutive");
    assert_eq!(got_a, got_b, "the same messages with the same offsets in the same order");
    for sender in ["a", "b"] {
        let seq: Vec<&str> = got_a.iter().filter(|m| m.1.starts_with(sender)).map(|m| m.1.as_str()).collect();
        let want: Vec<String> = (0..20).map(|i| format!("{sender}{i}")).collect();
        assert_eq!(seq, want, "each sender's messages in its order");
    }
    assert!(on_a.next(Duration::from_millis(300)).is_none(), "nothing twice");
}

#[test]
fn since_recovers_across_instances_and_a_foreign_epoch_does_not() {
    let port = free_port();
    let Some(_redis) = Redis::start(port, None) else { return };
    let a = instance(port, "");
    let b = instance(port, "");
    let mut member = P2::connect(a.addr);
    let (_, first) = member.join("chat", None);
    let epoch = epoch_of(&first);
    let mut sender = P2::connect(a.addr);
    for i in 1..=5 {
        assert_eq!(sender.publish("chat", &format!("m{i}")), i);
    }
    assert_eq!(member.envelopes("chat", 5).last().map(|m| m.0), Some(5));

    // On the other instance, from offset 2: 3, 4, 5 first, then the reply, then live.
    let mut back = P2::connect(b.addr);
    let (before, reply) = back.join("chat", Some((&epoch, 2)));
    assert_eq!(items(&before), vec![3, 4, 5], "{before:?}");
    assert_eq!(before[0]["message"], "m3");
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(5)), "{reply}");
    assert_eq!(epoch_of(&reply), epoch);
    assert_eq!(sender.publish("chat", "m6"), 6);
    assert_eq!(back.envelopes("chat", 1), vec![(6, "m6".to_owned())], "live after the replay, no gap, no repeat");

    // Up to date: recovered with nothing replayed.
    let mut current = P2::connect(b.addr);
    let (before, reply) = current.join("chat", Some((&epoch, 6)));
    assert!(before.is_empty() && reply["recovered"] == true && reply["offset"] == 6, "{before:?} {reply}");

    // Another epoch: nothing replayed, the current position.
    let mut stranger = P2::connect(b.addr);
    let (before, reply) = stranger.join("chat", Some(("0123456789abcdef", 2)));
    assert!(before.is_empty(), "{before:?}");
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(false), Some(6)), "{reply}");
    assert_eq!(epoch_of(&reply), epoch);
}

#[test]
fn history_shorter_than_asked_is_recovered_false() {
    let port = free_port();
    let Some(_redis) = Redis::start(port, None) else { return };
    let a = instance(port, "size = 3");
    let b = instance(port, "size = 3\nmax_recover = 2");
    let mut sender = P2::connect(a.addr);
    let mut member = P2::connect(a.addr);
    let (_, first) = member.join("short", None);
    let epoch = epoch_of(&first);
    for i in 1..=6 {
        assert_eq!(sender.publish("short", &format!("s{i}")), i);
    }
    // Kept: 4, 5, 6.
    let mut late = P2::connect(a.addr);
    let (before, reply) = late.join("short", Some((&epoch, 1)));
    assert!(before.is_empty(), "nothing replayed: {before:?}");
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(false), Some(6)), "{reply}");
    let mut in_time = P2::connect(a.addr);
    let (before, reply) = in_time.join("short", Some((&epoch, 3)));
    assert_eq!(items(&before), vec![4, 5, 6]);
    assert_eq!(reply["recovered"], true, "{reply}");
    // More than history.max_recover (2 on b) is not replayed either.
    let mut limited = P2::connect(b.addr);
    let (before, reply) = limited.join("short", Some((&epoch, 3)));
    assert!(before.is_empty() && reply["recovered"] == false, "{before:?} {reply}");
    let mut limited = P2::connect(b.addr);
    let (before, reply) = limited.join("short", Some((&epoch, 4)));
    assert_eq!(items(&before), vec![5, 6]);
    assert_eq!(reply["recovered"], true, "{reply}");
}

/// Waits for the gap notice of `group` on `member`; only envelopes may come before it.
fn gap_notice(member: &mut P2, group: &str) -> Value {
    loop {
        let v = member.recv();
        if v.get("gap").is_some() {
            assert_eq!(v["group"], group, "{v}");
            return v;
        }
        assert!(v.get("offset").is_some(), "only envelopes before the gap notice: {v}");
    }
}

#[test]
fn redis_restart_without_persistence_is_a_new_epoch_and_a_gap() {
    let port = free_port();
    let Some(redis) = Redis::start(port, None) else { return };
    let a = instance(port, "");
    let mut member = P2::connect(a.addr);
    let (_, first) = member.join("lost", None);
    let epoch = epoch_of(&first);
    let mut sender = P2::connect(a.addr);
    for i in 1..=3 {
        assert_eq!(sender.publish("lost", &format!("l{i}")), i);
    }
    assert_eq!(member.envelopes("lost", 3).len(), 3);

    let _redis = redis.restart();
    let gap = gap_notice(&mut member, "lost");
    assert_eq!(gap["gap"], true);
    let new_epoch = gap["epoch"].as_str().expect("epoch").to_owned();
    assert_ne!(new_epoch, epoch, "Redis lost the data: a new epoch");
    let at = gap["offset"].as_u64().expect("offset");

    let mut back = P2::connect(a.addr);
    let (before, reply) = back.join("lost", Some((&epoch, 3)));
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(epoch_of(&reply), new_epoch);

    // The stream goes on under the new epoch, for both.
    let offset = sender.publish("lost", "after");
    assert_eq!(offset, at + 1);
    assert_eq!(member.envelopes("lost", 1), vec![(offset, "after".to_owned())]);
    assert_eq!(back.envelopes("lost", 1), vec![(offset, "after".to_owned())]);
}

#[test]
fn redis_restart_with_persistence_keeps_the_epoch_and_recovers() {
    let port = free_port();
    let dir = TempDir::new("redis-aof");
    let Some(redis) = Redis::start(port, Some(dir.path())) else { return };
    let a = instance(port, "");
    let b = instance(port, "");
    let mut member = P2::connect(a.addr);
    let (_, first) = member.join("kept", None);
    let epoch = epoch_of(&first);
    let mut sender = P2::connect(b.addr);
    for i in 1..=3 {
        assert_eq!(sender.publish("kept", &format!("k{i}")), i);
    }
    assert_eq!(member.envelopes("kept", 3).len(), 3);

    let _redis = redis.restart();
    // The sender's instance publishes again once Redis is back (its command connection
    // reconnects): offsets go on in the same epoch.
    let offset = wait_for("a publish to get an offset after the restart", Duration::from_secs(30), || {
        let (_, reply) = sender.ask(json!({"cmd": "send_to_group", "group_id": "kept", "message": "k4"}));
        reply["offset"].as_u64().filter(|o| *o > 0)
    });
    assert_eq!(offset, 4, "the position survived");
    let got = member.envelopes("kept", 1);
    assert_eq!(got, vec![(4, "k4".to_owned())], "no gap notice, the stream goes on");

    let mut back = P2::connect(b.addr);
    let (before, reply) = back.join("kept", Some((&epoch, 1)));
    assert_eq!(items(&before), vec![2, 3, 4], "the history survived");
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(4)), "{reply}");
    assert_eq!(epoch_of(&reply), epoch);
    assert!(member.next(Duration::from_millis(300)).is_none(), "no gap notice, nothing twice");
}

/// Publishes to `group` on `addr` from a thread until the guard is dropped.
struct Stream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Stream {
    fn start(addr: SocketAddr, group: &'static str) -> Stream {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sender = P2::connect(addr);
            let mut last = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                last = sender.publish(group, &format!("x{last}"));
            }
            last
        });
        Stream { stop, thread: Some(thread) }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Envelopes of `group` that came before a join's reply (`before`) and the `n` after it: their
/// offsets must be `from`, `from + 1`, ... (live messages that arrived while the join waited
/// for its answer may come before the reply, after the replay: the worker's order).
fn consecutive(member: &mut P2, group: &str, before: &[Value], from: u64, n: usize) -> u64 {
    let mut got: Vec<u64> = before.iter().map(|v| v["offset"].as_u64().unwrap_or_else(|| panic!("{v}"))).collect();
    for _ in 0..n {
        let v = member.recv();
        assert_eq!(v["group"].as_str(), Some(group), "{v}");
        got.push(v["offset"].as_u64().unwrap_or_else(|| panic!("an envelope, not {v}")));
    }
    assert_eq!(got, (from..from + got.len() as u64).collect::<Vec<_>>(), "no gap, no repeat");
    from + got.len() as u64 - 1
}

#[test]
fn joins_during_a_steady_stream_lose_and_repeat_nothing() {
    let port = free_port();
    let Some(_redis) = Redis::start(port, None) else { return };
    // No history on `a`: a message missed between a join's answer and the live stream could
    // not be caught up there, it would be a gap notice.
    let a = instance(port, "size = 0");
    // Enough history on `b` that every join below can be recovered.
    let b = instance(port, "size = 100000");
    {
        let _streams: Vec<Stream> = (0..4).map(|_| Stream::start(a.addr, "s0")).collect();
        for _ in 0..30 {
            let mut joiner = P2::connect(a.addr);
            let (before, reply) = joiner.join("s0", None);
            let top = reply["offset"].as_u64().expect("offset");
            consecutive(&mut joiner, "s0", &before, top + 1, 5);
        }
    }
    let _streams: Vec<Stream> = (0..4).map(|_| Stream::start(b.addr, "s1")).collect();
    let mut first = P2::connect(b.addr);
    let (before, reply) = first.join("s1", None);
    let epoch = epoch_of(&reply);
    let mut since = reply["offset"].as_u64().expect("offset");
    since = consecutive(&mut first, "s1", &before, since + 1, 3);
    for i in 0..12 {
        let mut joiner = P2::connect(if i % 2 == 0 { a.addr } else { b.addr });
        let (before, reply) = joiner.join("s1", Some((&epoch, since)));
        let top = reply["offset"].as_u64().expect("offset");
        assert_eq!(reply["recovered"], true, "{reply}");
        assert!(items(&before).starts_with(&(since + 1..=top).collect::<Vec<_>>()), "the replay first");
        since = consecutive(&mut joiner, "s1", &before, since + 1, 5);
    }
}

#[test]
fn groupcast_publish_is_numbered_too() {
    let port = free_port();
    let Some(_redis) = Redis::start(port, None) else { return };
    let a = instance(port, "");
    let mut member = P2::connect(a.addr);
    let (_, reply) = member.join("news", None);
    let epoch = epoch_of(&reply);
    let out = Command::new(common::bin())
        .arg("-c")
        .arg(a.dir.join("g.toml"))
        .arg("--pid-file")
        .arg(&a.pid_file)
        .args(["publish", "news", "through redis"])
        .output()
        .unwrap();
    assert!(out.status.success(), "publish failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(member.envelopes("news", 1), vec![(1, "through redis".to_owned())]);
    let mut late = P2::connect(a.addr);
    let (before, reply) = late.join("news", Some((&epoch, 0)));
    assert_eq!(items(&before), vec![1], "kept in the history like any other");
    assert_eq!(reply["recovered"], true, "{reply}");
}

#[test]
fn a_burst_is_numbered_in_order_even_across_a_script_flush() {
    let port = free_port();
    let Some(redis) = Redis::start(port, None) else { return };
    let a = instance(port, "size = 2000");
    let mut member = P2::connect(a.addr);
    let (_, reply) = member.join("burst", None);
    let epoch = epoch_of(&reply);
    let mut sender = P2::connect(a.addr);
    // Without ids: nothing is awaited, the publishes queue up and go in pipelines.
    let send = |sender: &mut P2, from: usize| {
        for i in from..from + 500 {
            sender.send(json!({"cmd": "send_to_group", "group_id": "burst", "message": format!("b{i}")}));
        }
    };
    send(&mut sender, 0);
    let first = member.envelopes("burst", 500);
    assert!(redis.command("SCRIPT FLUSH").contains("OK"));
    send(&mut sender, 500);
    let got: Vec<(u64, String)> = first.into_iter().chain(member.envelopes("burst", 500)).collect();
    let want: Vec<(u64, String)> = (0..1000).map(|i| (i as u64 + 1, format!("b{i}"))).collect();
    assert_eq!(got, want, "numbered in the order sent, once each");
    let mut late = P2::connect(a.addr);
    let (before, reply) = late.join("burst", Some((&epoch, 990)));
    assert_eq!(items(&before), (991..=1000).collect::<Vec<_>>());
    assert_eq!(reply["recovered"], true);
}

#[test]
fn a_cut_subscription_is_caught_up_from_history() {
    let port = free_port();
    let Some(redis) = Redis::start(port, None) else { return };
    let a = instance(port, "");
    let b = instance(port, "");
    let mut member = P2::connect(a.addr);
    member.join("cut", None);
    let mut sender = P2::connect(b.addr);
    for i in 1..=10 {
        assert_eq!(sender.publish("cut", &format!("c{i}")), i);
    }
    // Every subscription connection is cut; Redis pub/sub keeps nothing for them, so what is
    // published before they are back reaches `a` only through the catch-up from the stream.
    assert!(redis.command("CLIENT KILL TYPE pubsub").starts_with(':'));
    for i in 11..=40 {
        assert_eq!(sender.publish("cut", &format!("c{i}")), i);
    }
    let got = member.envelopes("cut", 40);
    let want: Vec<(u64, String)> = (1..=40).map(|i| (i, format!("c{i}"))).collect();
    assert_eq!(got, want, "everything once, in order, no gap notice");
    assert!(member.next(Duration::from_millis(300)).is_none(), "nothing twice");
}
