//! The broker's ACKs (docs/channel-protocol.md "Acknowledgements"): an ACK joins whatever
//! else its publisher is written in the same turn, and one that would be a write of its own
//! waits for the next one, at most 5 ms or 256 publishes (issue 15: a lone ACK woke the
//! publishing worker once per publish). These tests hold the broker to the bound: an ACK
//! kept back is still written when nothing else comes, it always covers every publish, and
//! publishers that get each other's forwards get every forward, in order, and every ACK.

mod channel_peer;
mod common;

use std::time::Duration;

use channel_peer::*;
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// The ACKs `peer` gets until one covers `seq` (a frame that is not an ACK fails the test).
fn acks_until(peer: &mut RawPeer, seq: u64) -> Vec<u64> {
    let mut acks = Vec::new();
    loop {
        match peer.next(WAIT) {
            Some(Got::Ack(s)) => {
                acks.push(s);
                if s >= seq {
                    return acks;
                }
            }
            other => panic!("waiting for the ACK of seq {seq} (got {acks:?} so far): {other:?}"),
        }
    }
}

#[test]
fn a_lone_ack_is_still_written_when_nothing_else_comes() {
    let broker = Broker::start("acks-lone");
    let mut peer = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0x0a11_0001, "lone");
    let origin = peer.origin;
    // Nobody subscribes "nobody": the publisher gets nothing but its ACKs, which the broker
    // keeps back and must still write (its ACK timer; the master's status questions wake the
    // broker too, so this checks that the ACK comes, not how soon).
    for round in 1..=3u64 {
        peer.publish(origin, round, "nobody", format!("m{round}").as_bytes());
        let acks = acks_until(&mut peer, round);
        assert_eq!(acks.last(), Some(&round), "round {round}: {acks:?}");
    }
}

#[test]
fn many_publishes_in_one_turn_get_one_ack_covering_all() {
    let broker = Broker::start("acks-many");
    let mut peer = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0x0a11_0002, "many");
    let origin = peer.origin;
    let mut batch = Vec::new();
    for seq in 1..=600u64 {
        batch.extend(message(origin, seq, "nobody", format!("m{seq}").as_bytes()));
    }
    peer.send(&batch);
    let acks = acks_until(&mut peer, 600);
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "ACKs only move forward: {acks:?}");
    assert_eq!(acks.last(), Some(&600));
}

#[test]
fn two_publishers_of_one_group_get_every_forward_in_order_and_every_ack() {
    let broker = Broker::start("acks-order");
    let mut a = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0x0a11_0003, "a");
    let mut b = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0x0a11_0004, "b");
    a.subscribe("g");
    b.subscribe("g");
    broker.wait_memberships(2);
    // Both publish to "g", each many times: every publish of one is forwarded to the other,
    // so ACKs ride along with forwards. Each peer must see all of the other's messages, in
    // order, and ACKs that end at its own last seq.
    let (oa, ob) = (a.origin, b.origin);
    for seq in 1..=200u64 {
        a.publish(oa, seq, "g", format!("a{seq}").as_bytes());
        b.publish(ob, seq, "g", format!("b{seq}").as_bytes());
    }
    for (peer, from, name) in [(&mut a, ob, "a"), (&mut b, oa, "b")] {
        let (mut next, mut acked) = (1u64, 0u64);
        while next <= 200 || acked < 200 {
            match peer.next(WAIT) {
                Some(Got::Message { origin, seq, .. }) => {
                    assert_eq!((origin, seq), (from, next), "{name}: forwards in order");
                    next += 1;
                }
                Some(Got::Ack(seq)) => {
                    assert!(seq > acked, "{name}: ACKs move forward ({acked} then {seq})");
                    acked = seq;
                }
                other => panic!("{name}: {next} forwards and ACK {acked} so far, then {other:?}"),
            }
        }
        assert_eq!(acked, 200, "{name}");
    }
}
