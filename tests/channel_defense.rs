//! The channel server (broker) defends itself against rogue peers on its socket: a frame over
//! `channel.max_frame`, an empty frame, an unknown frame type or a truncated body gets the peer
//! disconnected; a peer that subscribes and never reads is cut off once
//! `channel.peer_buffer_limit` bytes are queued for it. Each time the broker stays the same
//! process, its memory stays bounded, and the workers keep delivering across workers
//! (issue 6; frames in docs/channel-protocol.md).

mod common;
mod robustness;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use groupcast::channel::wire;
use robustness::*;
use serde_json::json;

const PEER_BUFFER_LIMIT: u64 = 1 << 20;

fn rogue(server: &Server) -> UnixStream {
    let stream = UnixStream::connect(server.dir.join("g.channel.sock")).expect("connect to the channel socket");
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    stream
}

/// A frame with any type and body, for the malformed ones `wire` cannot produce: length of
/// type + body, type, body.
fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

fn hello(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_hello(&mut out, wire::VERSION, 0xdead_0000, name);
    out
}

fn subscribe(group: &str) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_subscribe(&mut out, group);
    out
}

/// Checks that what the broker sent a rogue before it hung up decodes to CHALLENGE frames
/// only (the greeting every peer gets); describes anything else.
fn only_challenges(bytes: &[u8]) -> Result<(), String> {
    let mut at = 0;
    while at < bytes.len() {
        match wire::decode(&bytes[at..], 1 << 20) {
            Ok(Some((wire::Frame::Challenge { .. }, used))) => at += used,
            other => return Err(format!("at byte {at} of {}: {other:?}", bytes.len())),
        }
    }
    Ok(())
}

/// Waits until the broker has exactly the workers as peers again.
fn only_workers_connected(server: &Server) {
    let workers = server.workers as u64;
    server.wait_status("the broker to hold only the workers", |r| field(&channel_row(r), "connections") == workers);
}

#[test]
fn malformed_channel_frames_disconnect_the_peer_only() {
    let server = start(2, "[channel]\nmax_frame = 65536\n");
    let mut watchers = Watchers::new(&server, "watch");
    watchers.settle(&server, 0);
    let channel = channel_pid(&server.status());
    let workers = worker_pids(&server.status());

    // A MESSAGE whose body ends inside its origin field.
    let truncated_message = raw_frame(wire::MESSAGE, &[0; 4]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Only the length prefix is needed to refuse it; no body follows.
        ("length over max_frame", 65537u32.to_be_bytes().to_vec()),
        ("length of 16 MiB + 1 (over the default too)", ((16 << 20) + 1u32).to_be_bytes().to_vec()),
        ("length 0xffffffff", vec![0xff; 4]),
        ("empty frame", vec![0, 0, 0, 0]),
        ("unknown frame type", raw_frame(99, b"whatever")),
        ("truncated SUBSCRIBE (string longer than the frame)", raw_frame(wire::SUBSCRIBE, &[0x00, 0x0a, b'g'])),
        ("SUBSCRIBE without its string", raw_frame(wire::SUBSCRIBE, &[])),
        ("truncated MESSAGE", truncated_message),
        ("HELLO with another version", {
            let mut h = hello("rogue");
            h[wire::LEN_PREFIX + 1] = wire::VERSION + 8;
            h
        }),
        ("unknown type after a valid HELLO", [hello("rogue"), raw_frame(0, b"")].concat()),
        ("truncated REPUBLISH after a valid HELLO", [hello("rogue"), raw_frame(wire::REPUBLISH, &[0; 12])].concat()),
        ("REPUBLISH from a version-1 peer", {
            let mut publish = Vec::new();
            wire::encode_publish(&mut publish, 0xdead_0000, 1, wire::PayloadKind::Text, "g", b"x");
            let mut out = hello("rogue");
            wire::as_republish(&publish, &mut out);
            out
        }),
    ];
    for (name, bytes) in &cases {
        let mut peer = rogue(&server);
        peer.write_all(bytes).unwrap();
        let answer = read_to_eof(&mut peer, Duration::from_secs(10));
        // The broker may greet every peer (CHALLENGE); it must send nothing else to a rogue.
        if let Err(other) = only_challenges(&answer) {
            panic!("{name}: the broker sent more than its greeting: {other}");
        }
        only_workers_connected(&server);
        watchers.check(name);
    }
    let report = server.status();
    assert_eq!(channel_pid(&report), channel, "the broker is the same process");
    assert_eq!(worker_pids(&report), workers);
    assert_eq!(field(&report["totals"], "restarts"), 0);
    assert!(worker_rows(&report).iter().all(|w| w["channel_connected"] == true));
}

#[test]
fn a_peer_that_does_not_read_is_cut_off_at_peer_buffer_limit() {
    let server = start(
        2,
        &format!("[channel]\npeer_buffer_limit = {PEER_BUFFER_LIMIT}\n[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n"),
    );
    let mut watchers = Watchers::new(&server, "watch");
    for c in &mut watchers.clients {
        c.add_group(&json!("flood"));
        c.sync_quiet();
    }
    watchers.settle(&server, 2);
    let before = server.status();
    let channel = channel_pid(&before);
    let baseline = field(&channel_row(&before), "rss_kib");

    // The rogue subscribes to "flood" like a worker would, then never reads.
    let mut peer = rogue(&server);
    peer.write_all(&[hello("rogue"), subscribe("flood")].concat()).unwrap();
    server.wait_status("the rogue's subscription", |r| {
        let ch = channel_row(r);
        field(&ch, "connections") == 3 && field(&ch, "memberships") == 5
    });

    // Watcher 0 floods "flood" with 16 KiB messages, in steps both watchers keep up with,
    // until the broker cuts the rogue off.
    let message = "m".repeat(16 * 1024);
    let mut sent = 0usize;
    loop {
        for _ in 0..8 {
            watchers.clients[0].send_to_group(&json!("flood"), &message);
        }
        sent += 8;
        for c in &mut watchers.clients {
            for _ in 0..8 {
                assert_eq!(c.recv().len(), message.len());
            }
        }
        let r = server.status();
        let ch = channel_row(&r);
        assert!(
            field(&ch, "rss_kib") < baseline + 32 * 1024,
            "broker RSS grew from {baseline} KiB to {} KiB",
            field(&ch, "rss_kib")
        );
        if field(&ch, "connections") == 2 {
            break;
        }
        // The rogue should be gone after about limit + socket buffers; allow 8 times that.
        assert!((sent * message.len()) as u64 <= 8 * PEER_BUFFER_LIMIT, "rogue still connected after {sent} messages");
    }
    assert!((sent * message.len()) as u64 >= PEER_BUFFER_LIMIT, "cut off after only {sent} messages");
    // Its socket is closed by the broker: after what was already in flight, end of stream.
    peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let backlog = read_to_eof(&mut peer, Duration::from_secs(10));
    assert!(!backlog.is_empty() && (backlog.len() as u64) < 2 * PEER_BUFFER_LIMIT, "{} bytes", backlog.len());
    // The rogue's subscription is gone; the workers' remain and deliver across workers.
    let report = server.wait_subscriptions(4);
    assert_eq!(field(&channel_row(&report), "memberships"), 4);
    assert_eq!(channel_pid(&report), channel, "the broker is the same process");
    assert_eq!(field(&report["totals"], "restarts"), 0);
    watchers.check("a rogue peer cut off");
    let flows: Vec<Flow> =
        (0..2).map(|s| Flow { sender: s, group: "flood".into(), group_id: json!("flood") }).collect();
    let member_of = vec![["watch".to_string(), "flood".to_string()].into(); 2];
    exchange(&mut watchers.clients, &member_of, &flows, 20, "after");
}
