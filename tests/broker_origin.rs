//! The broker binds each peer's origin at HELLO (issue 10, defect 4): an authenticated peer
//! that sends a MESSAGE under another worker's origin (with seq u64::MAX, which would make
//! every receiver drop that worker's real messages as repeats) is disconnected and the frame
//! is not forwarded; so is a second peer claiming an origin a connected peer holds. The real
//! worker's messages keep flowing. The broker is a standalone one with a secret on loopback TCP,
//! as on a cluster.

mod channel_peer;
mod common;

use std::time::Duration;

use channel_peer::*;
use common::*;
use serde_json::json;

const FAST: &str = "[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n";

#[test]
fn a_peer_cannot_publish_under_another_workers_origin() {
    let broker = Broker::start("origin");
    let (_server, mut sender, mut receiver) = broker.sender_and_receiver(FAST, "g");

    // A peer that knows the secret listens to "g" to learn worker 0's origin.
    let mut rogue = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0x0bad_0000, "rogue");
    rogue.subscribe("g");
    broker.wait_memberships(2);
    sender.send_to_group(&json!("g"), "probe");
    assert_eq!(receiver.recv(), "probe");
    let victim = match rogue.next(Duration::from_secs(10)) {
        Some(Got::Message { origin, .. }) => origin,
        other => panic!("expected the probe, got {other:?}"),
    };

    // A second peer may not take over the origin its owner is connected with.
    let mut thief = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), victim, "thief");
    // (It may be gone before this write lands.)
    let _ = thief.try_send(&message(victim, u64::MAX, "g", b"stolen"));
    assert!(thief.closed_within(Duration::from_secs(10)), "a peer claiming a connected worker's origin is dropped");

    // The rogue, bound to its own origin, publishes under the victim's with the highest seq,
    // then one of its own: the broker drops it (before the fix: forwarded, then acknowledged).
    rogue.publish(victim, u64::MAX, "g", b"spoofed");
    rogue.publish(rogue.origin, 1, "g", b"own");
    let mut acked = false;
    while let Some(got) = rogue.next(Duration::from_secs(10)) {
        acked |= matches!(got, Got::Ack(_));
    }
    assert!(!acked, "the spoofing peer was acknowledged instead of dropped");

    // The victim's real messages still reach the other worker; the spoof never did.
    for i in 0..20 {
        sender.send_to_group(&json!("g"), &format!("real-{i}"));
    }
    for i in 0..20 {
        assert_eq!(receiver.recv(), format!("real-{i}"));
    }
    assert!(receiver.sync().is_empty());
    let ch = broker.channel_row().unwrap();
    assert!(field(&ch, "protocol_errors") >= 2, "{ch}");
    assert!(broker.log().contains("origin"), "the refusal is logged:\n{}", broker.log());
}
