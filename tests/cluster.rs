//! Several instances sharing one standalone broker (`groupcast channel`): cross-instance
//! delivery exactly once, the shared-secret handshake (wrong or missing secrets refused), the
//! refusal to listen unauthenticated beyond loopback, and exactly-once delivery while the
//! broker is killed with SIGKILL and restarted as both sides publish.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, run_timed, signal, wait_for, Broker, Client, Server, TempDir};
use groupcast::channel::wire;
use serde_json::json;

/// Commands come fast in these tests: lift the per-connection rate limit.
const FAST: &str = "[limits]\ncommands_per_second = 1000000\ncommands_burst = 1000000\n";

/// Two instances (A and B, 2 workers each) on `broker`, with `n` members of `group` on each;
/// returns once every membership is subscribed at the broker.
struct TwoInstances {
    a: Server,
    b: Server,
    on_a: Vec<Client>,
    on_b: Vec<Client>,
}

fn two_instances(broker: &Broker, group: &str, n: usize) -> TwoInstances {
    let a = broker.instance(FAST);
    let b = broker.instance(FAST);
    wait_for("4 workers connected to the broker", Duration::from_secs(30), || (broker.peers() == 4).then_some(()));
    let join = |server: &Server| -> Vec<Client> {
        let mut clients: Vec<Client> = (0..n).map(|_| Client::connect(server.addr)).collect();
        for c in clients.iter_mut() {
            c.add_group(&json!(group));
            c.sync();
        }
        // An instance using a remote broker has no channel row of its own, so
        // `Server::wait_subscriptions` does not apply: count its memberships.
        server.wait_status(&format!("{n} memberships"), |r| r["totals"]["memberships"] == n as u64);
        clients
    };
    let (on_a, on_b) = (join(&a), join(&b));
    // The broker has both instances' subscriptions (one per worker with members).
    broker.wait_memberships(2);
    TwoInstances { a, b, on_a, on_b }
}

#[test]
fn a_member_on_one_instance_receives_what_a_client_on_another_sends_exactly_once() {
    let broker = Broker::start("cluster-share");
    let TwoInstances { a, b: _b, mut on_a, mut on_b } = two_instances(&broker, "room", 4);
    for i in 0..50 {
        on_b[0].send_to_group(&json!("room"), &format!("from-b-{i}"));
        on_a[1].send_to_group(&json!("room"), &format!("from-a-{i}"));
    }
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        let got: Vec<String> = (0..100).map(|_| c.recv()).collect();
        let from_b: Vec<&String> = got.iter().filter(|m| m.starts_with("from-b-")).collect();
        let from_a: Vec<&String> = got.iter().filter(|m| m.starts_with("from-a-")).collect();
        assert_eq!(from_b, (0..50).map(|i| format!("from-b-{i}")).collect::<Vec<_>>().iter().collect::<Vec<_>>());
        assert_eq!(from_a, (0..50).map(|i| format!("from-a-{i}")).collect::<Vec<_>>().iter().collect::<Vec<_>>());
        assert!(c.sync().is_empty(), "nothing arrives twice");
    }
    // `publish` through the shared broker, with the secret, reaches both instances.
    let out = Command::new(common::bin())
        .args(["publish", "room", "from the command line", "--pid-file"])
        .arg(a.pid_file.clone())
        .args(["-c"])
        .arg(write_config(&a.dir.join("publish.toml"), &broker))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(c.recv(), "from the command line");
    }
}

fn write_config(path: &Path, broker: &Broker) -> PathBuf {
    std::fs::write(path, broker.channel_config()).unwrap();
    path.to_owned()
}

#[test]
fn peers_without_the_secret_are_refused() {
    let broker = Broker::start("cluster-auth");
    let dir = TempDir::new("cluster-auth-peer");
    // Wrong secret: publish is refused and says why.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "this is not the right secret at all").unwrap();
    let config = dir.join("g.toml");
    std::fs::write(&config, format!("[channel]\nconnect = \"{}\"\nsecret_file = {wrong:?}\n", broker.addr)).unwrap();
    let run = run_timed(&["-c", config.to_str().unwrap(), "publish", "g", "x"], dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("closed the connection") || run.stderr.contains("secret"), "{run:?}");
    wait_for("the broker to log the failed proof", Duration::from_secs(10), || {
        broker.log().contains("failed authentication").then_some(())
    });
    // No secret at all: refused with a clear message.
    std::fs::write(&config, format!("[channel]\nconnect = \"{}\"\n", broker.addr)).unwrap();
    let run = run_timed(&["-c", config.to_str().unwrap(), "publish", "g", "x"], dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("requires a shared secret"), "{run:?}");
    // A raw peer that skips AUTH and sends HELLO is disconnected (EOF after the challenge).
    let mut raw = TcpStream::connect(broker.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = Vec::new();
    wire::encode_hello(&mut hello, wire::VERSION, 7, "rogue");
    raw.write_all(&hello).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    let first = wire::decode(&sink, 1 << 20);
    assert!(
        matches!(first, Ok(Some((wire::Frame::Challenge { flags, .. }, _))) if flags & wire::FLAG_AUTH_REQUIRED != 0),
        "first frame is the CHALLENGE: {first:?}"
    );
    assert!(broker.log().contains("did not authenticate"), "{}", broker.log());
    // The right secret works.
    let right = write_config(&dir.join("right.toml"), &broker);
    let run = run_timed(&["-c", right.to_str().unwrap(), "publish", "g", "x"], dir.path());
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn an_unauthenticated_broker_stays_on_loopback_unless_told_otherwise() {
    let dir = TempDir::new("cluster-insecure");
    let port = free_port();
    let pid = dir.join("b.pid");
    let run = run_timed(
        &["channel", "--listen", &format!("0.0.0.0:{port}"), "--pid-file", pid.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("channel.listen") && run.stderr.contains("secret_file"), "{run:?}");
    assert!(!pid.exists());
}

#[test]
fn broker_killed_and_restarted_while_both_sides_publish_loses_and_duplicates_nothing() {
    let broker = Broker::start("cluster-kill");
    let TwoInstances { a, b, mut on_a, mut on_b } = two_instances(&broker, "k", 3);
    let first = broker.channel_pid().expect("broker running");
    const N: usize = 600;
    for i in 0..N {
        on_a[0].send_to_group(&json!("k"), &format!("a{i}"));
        on_b[0].send_to_group(&json!("k"), &format!("b{i}"));
        if i == N / 3 {
            signal(first, libc::SIGKILL);
        }
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The standalone master restarts its broker; both instances reconnect to it.
    wait_for("a new broker process", Duration::from_secs(30), || broker.channel_pid().filter(|p| *p != first));
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        let got: Vec<String> = (0..2 * N).map(|_| c.recv()).collect();
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), 2 * N, "duplicates delivered");
        for side in ["a", "b"] {
            let seq: Vec<usize> = got.iter().filter_map(|m| m.strip_prefix(side)).map(|n| n.parse().unwrap()).collect();
            assert_eq!(seq, (0..N).collect::<Vec<_>>(), "{side}: every message, in order");
        }
        assert!(c.sync().is_empty(), "nothing more arrives");
    }
    let resent: u64 = [&a, &b]
        .iter()
        .flat_map(|s| common::worker_rows(&s.status()))
        .map(|w| w["channel_resent"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("publishes resent after the broker restart: {resent}");
    assert!(resent > 0, "the kill happened mid-stream, so unacknowledged publishes were sent again");
}
