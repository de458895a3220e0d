//! The grace window replays what a fresh broker holds once per (peer, group) and within
//! `channel.peer_buffer_limit` (issue 10, defect 7): a repeated RESUBSCRIBE of a group gets no
//! second copy, and a replay larger than the peer's bound is cut at the bound, not queued whole.

mod channel_peer;
mod common;

use std::time::Duration;

use channel_peer::*;
use common::*;

const PUBLISHER: u64 = 0xaaa0;
const LATE: u64 = 0xbbb0;

/// A broker that stays in its grace window for the whole test.
fn start(extra: &str) -> Broker {
    let config = format!("[channel]\ngrace_ms = 600000\n{extra}");
    Broker::start_with("grace-replay", BrokerOpts { config: Some(config), ..BrokerOpts::default() })
}

fn peer(broker: &Broker, origin: u64, name: &str) -> RawPeer {
    RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), origin, name)
}

/// Publishes `count` messages of `size` bytes to `group` and waits until the broker has them.
fn hold(broker: &Broker, group: &str, count: u64, size: usize) {
    let mut p = peer(broker, PUBLISHER, "publisher");
    let payload = vec![b'x'; size];
    for seq in 1..=count {
        p.publish(PUBLISHER, seq, group, &payload);
    }
    loop {
        match p.next(Duration::from_secs(30)) {
            Some(Got::Ack(seq)) if seq == count => return,
            Some(_) => {}
            None => panic!("no ACK for the held messages"),
        }
    }
}

/// Publishes one message of its own (to a group nobody has) and returns the MESSAGE frames
/// the broker sent before acknowledging it: the broker queues a replay before that ACK.
fn frames_before_ack(p: &mut RawPeer, seq: u64) -> Vec<(u64, u64, usize)> {
    p.publish(p.origin, seq, "fence", b"");
    let mut got = Vec::new();
    loop {
        match p.next(Duration::from_secs(30)) {
            Some(Got::Ack(s)) if s == seq => return got,
            Some(Got::Message { origin, seq, payload, .. }) => got.push((origin, seq, payload.len())),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("no ACK (dropped?)"),
        }
    }
}

#[test]
fn a_repeated_resubscribe_replays_nothing_twice() {
    let broker = start("");
    hold(&broker, "r", 50, 10);
    let mut late = peer(&broker, LATE, "late");
    late.resubscribe("r");
    let first = frames_before_ack(&mut late, 1);
    assert_eq!(first, (1..=50).map(|s| (PUBLISHER, s, 10)).collect::<Vec<_>>(), "the held messages, in order");
    late.resubscribe("r");
    assert_eq!(frames_before_ack(&mut late, 2), vec![], "a second RESUBSCRIBE of the group replays nothing");
}

#[test]
fn a_replay_stays_within_peer_buffer_limit() {
    let limit = 1 << 20;
    let broker = start(&format!("peer_buffer_limit = {limit}\n"));
    hold(&broker, "big", 48, 64 * 1024);
    let mut late = peer(&broker, LATE, "late");
    late.resubscribe("big");
    let got = frames_before_ack(&mut late, 1);
    let bytes: usize = got.iter().map(|(_, _, n)| n).sum();
    assert!(!got.is_empty() && bytes <= limit, "replayed {} messages, {bytes} bytes", got.len());
    let seqs: Vec<u64> = got.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>(), "the oldest first, in order");
}
