//! The broker numbers every message of a group and keeps its history (issue 12, protocol 2 on
//! the channel wire): consecutive offsets under the group's epoch, PUBLICATION to version-2
//! subscribers and plain MESSAGE to version-1 ones, a STAMP per publish to a version-2
//! publisher, resends stamped 0 and not forwarded again, HISTORY answered by the
//! recoverability rule (epoch, history length, limits, peer buffer), a new epoch after a
//! restart. Raw frames against a real standalone broker.

mod channel_peer;
mod common;

use std::time::Duration;

use channel_peer::{Got, RawPeer};
use common::*;
use groupcast::channel::auth;
use groupcast::channel::wire::{self, PayloadKind, Since};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

/// A frame a version-2 peer gets, owned.
#[derive(Debug, Clone, PartialEq)]
enum In {
    Ack(u64),
    Stamp { seq: u64, offset: u64 },
    Publication { origin: u64, seq: u64, offset: u64, kind: PayloadKind, group: String, payload: Vec<u8> },
    Item { request: u64, offset: u64, kind: PayloadKind, payload: Vec<u8> },
    Position { request: u64, epoch: String, offset: u64, recovered: bool },
    Message { origin: u64, seq: u64, group: String, payload: Vec<u8> },
    Other(String),
}

/// A channel peer that introduces itself with HELLO version 2.
struct V2 {
    peer: RawPeer,
    origin: u64,
    requests: u64,
}

impl V2 {
    fn join(broker: &Broker, origin: u64) -> V2 {
        V2::try_join(broker, origin).expect("the broker admits the peer")
    }

    /// Connects, authenticates and sends HELLO 2; `None` when the broker closes instead.
    fn try_join(broker: &Broker, origin: u64) -> Option<V2> {
        let mut p = V2 { peer: RawPeer::tcp(broker.addr.port()), origin, requests: 0 };
        let (flags, nonce) = match p.raw_next(WAIT)? {
            wire_owned::Challenge(flags, nonce) => (flags, nonce),
            other => panic!("the first frame is not a CHALLENGE: {other:?}"),
        };
        assert_ne!(flags & wire::FLAG_AUTH_REQUIRED, 0, "the test broker has a secret");
        assert_ne!(flags & wire::FLAG_REPUBLISH, 0, "the broker says it understands REPUBLISH");
        let mine = auth::nonce().unwrap();
        let mut out = Vec::new();
        wire::encode_auth(&mut out, &mine, &auth::peer_proof(BROKER_SECRET, &nonce, &mine));
        p.send(&out);
        assert!(matches!(p.raw_next(WAIT)?, wire_owned::AuthOk), "AUTH_OK after AUTH");
        out.clear();
        wire::encode_hello(&mut out, wire::VERSION_OFFSETS, origin, &format!("v2-{origin:x}"));
        p.send(&out);
        // The broker refuses a HELLO whose origin a connected peer holds by closing: an answer
        // to HISTORY says it was admitted.
        let request = p.history("fence-probe", None, 0);
        loop {
            match p.next(WAIT) {
                Some(In::Position { request: r, .. }) if r == request => return Some(p),
                Some(_) => {}
                None => return None,
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        // The broker may have closed already (a refused HELLO): the next read says so.
        let _ = self.peer.try_send(bytes);
    }

    fn subscribe(&mut self, group: &str) {
        let mut out = Vec::new();
        wire::encode_subscribe(&mut out, group);
        self.send(&out);
    }

    fn resubscribe(&mut self, group: &str) {
        let mut out = Vec::new();
        wire::encode_resubscribe(&mut out, group);
        self.send(&out);
    }

    fn publish(&mut self, seq: u64, kind: PayloadKind, group: &str, payload: &[u8]) {
        let mut out = Vec::new();
        wire::encode_publish(&mut out, self.origin, seq, kind, group, payload);
        self.send(&out);
    }

    /// Sends a publish as REPUBLISH (an earlier connection carried it, unacknowledged).
    fn republish(&mut self, seq: u64, kind: PayloadKind, group: &str, payload: &[u8]) {
        let (mut publish, mut out) = (Vec::new(), Vec::new());
        wire::encode_publish(&mut publish, self.origin, seq, kind, group, payload);
        wire::as_republish(&publish, &mut out);
        self.send(&out);
    }

    /// Sends HISTORY; returns its request id.
    fn history(&mut self, group: &str, since: Option<(&str, u64)>, limit: u32) -> u64 {
        self.requests += 1;
        let mut out = Vec::new();
        let since = since.map(|(epoch, offset)| Since { epoch, offset });
        wire::encode_history(&mut out, self.requests, group, since, limit);
        self.send(&out);
        self.requests
    }

    /// Asks HISTORY and collects the answer: the items' offsets and payloads, then the
    /// POSITION's epoch, offset and recovered flag. Other frames meanwhile are kept in `other`.
    fn ask(&mut self, group: &str, since: Option<(&str, u64)>, limit: u32) -> Answer {
        let request = self.history(group, since, limit);
        let mut items = Vec::new();
        loop {
            match self.next(WAIT).expect("an answer to HISTORY") {
                In::Item { request: r, offset, payload, .. } if r == request => items.push((offset, payload)),
                In::Position { request: r, epoch, offset, recovered } if r == request => {
                    return Answer { items, epoch, offset, recovered }
                }
                In::Ack(_) | In::Stamp { .. } => {}
                other => panic!("unexpected {other:?} in the answer to HISTORY"),
            }
        }
    }

    fn next(&mut self, timeout: Duration) -> Option<In> {
        Some(match self.raw_next(timeout)? {
            wire_owned::Frame(f) => f,
            other => In::Other(format!("{other:?}")),
        })
    }

    /// What a publisher gets until `QUIET`: its STAMPs (ACKs, and the POSITION that answered
    /// the admission probe of `try_join`, left out).
    fn stamps(&mut self) -> Vec<In> {
        let mut got = self.drain(QUIET);
        got.retain(|f| !matches!(f, In::Position { .. }));
        got
    }

    /// Frames until `timeout` of silence, ACKs left out.
    fn drain(&mut self, timeout: Duration) -> Vec<In> {
        std::iter::from_fn(|| self.next(timeout)).filter(|f| !matches!(f, In::Ack(_))).collect()
    }

    fn raw_next(&mut self, timeout: Duration) -> Option<wire_owned> {
        self.peer.next_with(timeout, wire_owned::of)
    }
}

/// What a raw read gives: the set-up frames apart from the rest.
#[allow(non_camel_case_types)]
#[derive(Debug)]
enum wire_owned {
    Challenge(u8, [u8; wire::NONCE_LEN]),
    AuthOk,
    Frame(In),
}

impl wire_owned {
    fn of(frame: wire::Frame<'_>) -> wire_owned {
        wire_owned::Frame(match frame {
            wire::Frame::Challenge { flags, nonce, .. } => return wire_owned::Challenge(flags, nonce),
            wire::Frame::AuthOk { .. } => return wire_owned::AuthOk,
            wire::Frame::Ack { seq } => In::Ack(seq),
            wire::Frame::Stamp { seq, offset } => In::Stamp { seq, offset },
            wire::Frame::Publication { origin, seq, offset, kind, group, payload } => {
                In::Publication { origin, seq, offset, kind, group: group.into(), payload: payload.to_vec() }
            }
            wire::Frame::HistoryItem { request, offset, kind, payload } => {
                In::Item { request, offset, kind, payload: payload.to_vec() }
            }
            wire::Frame::Position { request, epoch, offset, recovered } => {
                In::Position { request, epoch: epoch.into(), offset, recovered }
            }
            wire::Frame::Message { origin, seq, group, payload } => {
                In::Message { origin, seq, group: group.into(), payload: payload.to_vec() }
            }
            other => In::Other(format!("{other:?}")),
        })
    }
}

#[derive(Debug)]
struct Answer {
    items: Vec<(u64, Vec<u8>)>,
    epoch: String,
    offset: u64,
    recovered: bool,
}

impl Answer {
    fn offsets(&self) -> Vec<u64> {
        self.items.iter().map(|i| i.0).collect()
    }
}

fn broker(config: &str) -> Broker {
    Broker::start_with("broker-history", BrokerOpts { config: Some(config.to_owned()), ..BrokerOpts::default() })
}

fn v1(broker: &Broker, origin: u64) -> RawPeer {
    RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), origin, "v1")
}

/// Publishes `count` messages to `group` from `p` (seqs from `first_seq`) and waits for their
/// STAMPs; returns the offsets stamped.
fn publish_n(p: &mut V2, group: &str, first_seq: u64, count: u64, payload: &[u8]) -> Vec<u64> {
    for seq in first_seq..first_seq + count {
        p.publish(seq, PayloadKind::Text, group, payload);
    }
    let mut offsets = Vec::new();
    while offsets.len() < count as usize {
        match p.next(WAIT).expect("a STAMP per publish") {
            In::Stamp { offset, .. } => offsets.push(offset),
            In::Ack(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    offsets
}

#[test]
fn offsets_are_consecutive_and_each_peer_gets_its_form() {
    let broker = broker("");
    let (mut a, mut b) = (V2::join(&broker, 0xa1), V2::join(&broker, 0xb1));
    let mut c = v1(&broker, 0xc1);
    a.subscribe("g");
    b.subscribe("g");
    c.subscribe("g");
    broker.wait_memberships(3);

    a.publish(1, PayloadKind::Json, "g", br#"{"n":1}"#);
    a.publish(2, PayloadKind::Text, "g", b"two");
    let got_a = a.drain(QUIET);
    assert_eq!(got_a, [In::Stamp { seq: 1, offset: 1 }, In::Stamp { seq: 2, offset: 2 }], "no copy of its own");
    let pubs = b.drain(QUIET);
    assert_eq!(
        pubs,
        [
            In::Publication {
                origin: 0xa1,
                seq: 1,
                offset: 1,
                kind: PayloadKind::Json,
                group: "g".into(),
                payload: br#"{"n":1}"#.to_vec()
            },
            In::Publication {
                origin: 0xa1,
                seq: 2,
                offset: 2,
                kind: PayloadKind::Text,
                group: "g".into(),
                payload: b"two".to_vec()
            },
        ]
    );
    for (seq, payload) in [(1, &br#"{"n":1}"#[..]), (2, b"two")] {
        assert_eq!(
            c.next(WAIT),
            Some(Got::Message { origin: 0xa1, seq, group: "g".into(), payload: payload.to_vec() }),
            "a version-1 peer gets plain MESSAGE"
        );
    }

    // A version-1 publisher's MESSAGE is numbered in the same sequence; it gets no STAMP.
    c.publish(0xc1, 1, "g", b"from v1");
    assert_eq!(c.next(WAIT), Some(Got::Ack(1)));
    let want = In::Publication {
        origin: 0xc1,
        seq: 1,
        offset: 3,
        kind: PayloadKind::Text,
        group: "g".into(),
        payload: b"from v1".to_vec(),
    };
    assert_eq!(a.drain(QUIET), std::slice::from_ref(&want));
    assert_eq!(b.drain(QUIET), [want]);
    assert_eq!(c.next(QUIET), None, "nothing more for the version-1 peer");

    // Another group counts from 1.
    assert_eq!(publish_n(&mut a, "other", 3, 2, b"x"), [1, 2]);
    let status = broker.channel_row().unwrap();
    assert_eq!(status["history_groups"], 3, "g, other and the group each join probed: {status}");
    assert_eq!(status["history_messages"], 5, "{status}");
    assert!(status["history_bytes"].as_u64().unwrap() > 0, "{status}");
}

#[test]
fn history_replays_only_what_it_can_give_whole() {
    let broker = broker("[history]\nsize = 5\nmax_recover = 3\n");
    let mut a = V2::join(&broker, 0xa2);
    assert_eq!(publish_n(&mut a, "h", 1, 8, b"m"), (1..=8).collect::<Vec<_>>());
    let mut b = V2::join(&broker, 0xb2);

    let pos = b.ask("h", None, 100);
    assert_eq!((pos.offset, pos.recovered, pos.items.len()), (8, false, 0), "no since: the position only");
    assert_eq!(pos.epoch.len(), 16);
    assert!(pos.epoch.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{}", pos.epoch);
    let e = pos.epoch.as_str();

    let r = b.ask("h", Some((e, 6)), 100);
    assert_eq!((r.offsets(), r.recovered, r.offset), (vec![7, 8], true, 8));
    assert_eq!(r.items[0].1, b"m");
    let r = b.ask("h", Some((e, 8)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![], true), "up to date");
    let r = b.ask("h", Some((e, 5)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![6, 7, 8], true), "exactly max_recover");
    let r = b.ask("h", Some((e, 4)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![], false), "more than history.max_recover");
    let r = b.ask("h", Some((e, 5)), 2);
    assert_eq!((r.offsets(), r.recovered), (vec![], false), "more than the request's limit");
    let r = b.ask("h", Some((e, 2)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![], false), "offset 3 is no longer kept (size 5)");
    let r = b.ask("h", Some(("0123456789abcdef", 7)), 100);
    assert_eq!((r.offsets(), r.recovered, r.epoch.as_str(), r.offset), (vec![], false, e, 8), "another epoch");
    let r = b.ask("h", Some((e, 9)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![], false), "ahead of the group");

    let fresh = b.ask("new", None, 100);
    assert_eq!((fresh.offset, fresh.recovered), (0, false), "HISTORY creates the position");
    assert_ne!(fresh.epoch, pos.epoch, "each group has its own epoch");
    assert!(b.ask("new", Some((&fresh.epoch, 0)), 100).recovered);
    assert_eq!(publish_n(&mut a, "new", 9, 1, b"x"), [1], "the position HISTORY made is the one numbered");
}

#[test]
fn a_replay_must_fit_under_peer_buffer_limit() {
    let broker = broker("[channel]\npeer_buffer_limit = 1024\n");
    let mut a = V2::join(&broker, 0xa3);
    publish_n(&mut a, "big", 1, 3, &[b'z'; 600]);
    let mut b = V2::join(&broker, 0xb3);
    let e = b.ask("big", None, 100).epoch;
    let r = b.ask("big", Some((&e, 0)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![], false), "1.8 KB of history does not fit in 1 KiB");
    let r = b.ask("big", Some((&e, 2)), 100);
    assert_eq!((r.offsets(), r.recovered), (vec![3], true), "one message does");
}

#[test]
fn a_resend_is_stamped_zero_and_not_forwarded_again() {
    let broker = broker("");
    let mut b = V2::join(&broker, 0xb4);
    b.subscribe("r");
    broker.wait_memberships(1);
    let mut a = V2::join(&broker, 0xa4);
    assert_eq!(publish_n(&mut a, "r", 1, 2, b"m"), [1, 2]);
    a.publish(1, PayloadKind::Text, "r", b"m");
    assert_eq!(a.drain(QUIET), [In::Stamp { seq: 1, offset: 0 }], "a resend on the same connection");

    // Reconnect under the same origin (once the broker has noticed the old connection went)
    // and send the unacknowledged tail again, then something new.
    drop(a);
    let mut a = wait_for("the broker to admit the origin again", TIMEOUT, || V2::try_join(&broker, 0xa4));
    a.publish(2, PayloadKind::Text, "r", b"m");
    a.publish(3, PayloadKind::Text, "r", b"new");
    assert_eq!(a.stamps(), [In::Stamp { seq: 2, offset: 0 }, In::Stamp { seq: 3, offset: 3 }]);
    let offsets: Vec<u64> = b
        .drain(QUIET)
        .into_iter()
        .map(|f| match f {
            In::Publication { offset, .. } => offset,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, [1, 2, 3], "each publish once");
    assert_eq!(broker.channel_row().unwrap()["channel_resent"], 2);
}

/// The unacknowledged publishes of a worker whose broker died reach a restarted broker as
/// REPUBLISH from an origin it never saw: the dead broker may have numbered and forwarded them,
/// so they go to the subscribers with offset 0 (for the seed-protocol members, which workers
/// de-duplicate by origin and seq), are neither numbered nor kept, and the group's numbering
/// goes on as if they had not come (the stream protocol-2 members follow has no repeat).
#[test]
fn a_restarted_broker_forwards_a_republish_from_an_unknown_origin_without_an_offset() {
    let broker = broker("");
    let mut b = V2::join(&broker, 0xb9);
    b.subscribe("r");
    let mut old = v1(&broker, 0xc9);
    old.subscribe("r");
    broker.wait_memberships(2);
    let mut a = V2::join(&broker, 0xa9);
    a.republish(7, PayloadKind::Json, "r", b"{\"n\":7}");
    a.publish(8, PayloadKind::Json, "r", b"{\"n\":8}");
    assert_eq!(a.stamps(), [In::Stamp { seq: 7, offset: 0 }, In::Stamp { seq: 8, offset: 1 }]);
    let publication = |seq, offset, n: u64| In::Publication {
        origin: 0xa9,
        seq,
        offset,
        kind: PayloadKind::Json,
        group: "r".into(),
        payload: format!("{{\"n\":{n}}}").into_bytes(),
    };
    assert_eq!(b.drain(QUIET), [publication(7, 0, 7), publication(8, 1, 8)]);
    let seqs: Vec<u64> = std::iter::from_fn(|| old.next(QUIET))
        .filter_map(|f| match f {
            Got::Message { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, [7, 8], "a version-1 subscriber gets both as MESSAGE");
    let kept = b.ask("r", None, 10);
    assert_eq!(kept.offset, 1, "only the PUBLISH was numbered: {kept:?}");
    let replay = b.ask("r", Some((&kept.epoch, 0)), 10);
    assert_eq!(replay.offsets(), [1], "the REPUBLISH is not kept in the history");
    let row = broker.channel_row().unwrap();
    assert_eq!((row["channel_unnumbered"].as_u64(), row["channel_resent"].as_u64()), (Some(1), Some(0)));
}

/// To the broker that knows the origin (the link dropped, the broker lives), REPUBLISH is a
/// PUBLISH: what it numbered already is a resend, what it never read is numbered now. A
/// version-2 peer is known from its first connection on, even before it published anything.
#[test]
fn a_republish_to_a_broker_that_knows_the_origin_is_numbered_once() {
    let broker = broker("");
    let mut b = V2::join(&broker, 0xba);
    b.subscribe("r");
    broker.wait_memberships(1);
    let mut a = V2::join(&broker, 0xaa);
    assert_eq!(publish_n(&mut a, "r", 1, 1, b"one"), [1]);
    drop(a);
    let mut a = wait_for("the broker to admit the origin again", TIMEOUT, || V2::try_join(&broker, 0xaa));
    a.republish(1, PayloadKind::Text, "r", b"one");
    a.republish(2, PayloadKind::Text, "r", b"two");
    assert_eq!(a.stamps(), [In::Stamp { seq: 1, offset: 0 }, In::Stamp { seq: 2, offset: 2 }]);

    // Connected before, never published: still known.
    let quiet = V2::join(&broker, 0xab);
    drop(quiet);
    let mut q = wait_for("the broker to admit the origin again", TIMEOUT, || V2::try_join(&broker, 0xab));
    q.republish(1, PayloadKind::Text, "r", b"three");
    assert_eq!(q.stamps(), [In::Stamp { seq: 1, offset: 3 }]);

    let offsets: Vec<(u64, Vec<u8>)> = b
        .drain(QUIET)
        .into_iter()
        .map(|f| match f {
            In::Publication { offset, payload, .. } => (offset, payload),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, [(1, b"one".to_vec()), (2, b"two".to_vec()), (3, b"three".to_vec())], "each publish once");
    let row = broker.channel_row().unwrap();
    assert_eq!((row["channel_unnumbered"].as_u64(), row["channel_resent"].as_u64()), (Some(0), Some(1)));
}

#[test]
fn a_version_1_peer_may_not_send_history_or_publish() {
    let broker = broker("");
    for frame in [
        {
            let mut out = Vec::new();
            wire::encode_history(&mut out, 1, "g", None, 10);
            out
        },
        {
            let mut out = Vec::new();
            wire::encode_publish(&mut out, 0xc5, 1, PayloadKind::Text, "g", b"x");
            out
        },
    ] {
        let mut c = v1(&broker, 0xc5);
        let _ = c.try_send(&frame);
        assert!(c.closed_within(WAIT), "a protocol-2 frame from a version-1 peer is a violation");
    }
}

#[test]
fn a_restarted_broker_numbers_under_a_new_epoch() {
    let first = broker("");
    let addr = first.addr.to_string();
    let mut a = V2::join(&first, 0xa6);
    publish_n(&mut a, "g", 1, 3, b"m");
    let before = a.ask("g", None, 10);
    drop(a);
    drop(first);
    let second =
        Broker::start_with("broker-history-restart", BrokerOpts { listen: Some(addr), ..BrokerOpts::default() });
    let mut a = V2::join(&second, 0xa6);
    let after = a.ask("g", Some((&before.epoch, 3)), 10);
    assert_ne!(after.epoch, before.epoch);
    assert_eq!((after.offset, after.recovered), (0, false));
    assert_eq!(publish_n(&mut a, "g", 1, 1, b"m"), [1], "seqs of a new broker's peers start over too");
}

#[test]
fn messages_expire_after_ttl_and_positions_outlive_them() {
    let broker = broker("[history]\nttl_ms = 200\n");
    let mut a = V2::join(&broker, 0xa7);
    publish_n(&mut a, "t", 1, 2, b"m");
    let e = a.ask("t", None, 10).epoch;
    wait_for("the history to expire", TIMEOUT, || {
        (broker.channel_row()?["history_messages"].as_u64()? == 0).then_some(())
    });
    let r = a.ask("t", Some((&e, 1)), 10);
    assert_eq!((r.recovered, r.epoch.as_str(), r.offset), (false, e.as_str(), 2), "same epoch, nothing to replay");
    assert!(a.ask("t", Some((&e, 2)), 10).recovered);
}

#[test]
fn the_grace_window_replays_publications_with_their_offsets() {
    let broker = broker("[channel]\ngrace_ms = 600000\n");
    let mut a = V2::join(&broker, 0xa8);
    publish_n(&mut a, "gr", 1, 2, b"held");
    let mut late = V2::join(&broker, 0xb8);
    late.resubscribe("gr");
    let got = late.drain(QUIET);
    let offsets: Vec<(u64, u64)> = got
        .iter()
        .map(|f| match f {
            In::Publication { seq, offset, .. } => (*seq, *offset),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, [(1, 1), (2, 2)]);
    let mut old = v1(&broker, 0xc8);
    old.resubscribe("gr");
    for seq in 1..=2 {
        assert_eq!(
            old.next(WAIT),
            Some(Got::Message { origin: 0xa8, seq, group: "gr".into(), payload: b"held".to_vec() }),
            "a version-1 peer gets the held messages as MESSAGE"
        );
    }
}

#[test]
fn a_version_1_resend_after_a_reconnect_is_not_forwarded_again() {
    let broker = broker("");
    let mut b = V2::join(&broker, 0xb9);
    b.subscribe("r1");
    broker.wait_memberships(1);
    let mut c = v1(&broker, 0xc9);
    c.publish(0xc9, 1, "r1", b"one");
    assert_eq!(c.next(WAIT), Some(Got::Ack(1)));
    drop(c);
    wait_for("the broker to notice the version-1 peer left", TIMEOUT, || (broker.peers() == 1).then_some(()));
    let mut c = v1(&broker, 0xc9);
    c.publish(0xc9, 1, "r1", b"one");
    c.publish(0xc9, 2, "r1", b"two");
    let mut acks = Vec::new();
    while acks.last() != Some(&2) {
        match c.next(WAIT) {
            Some(Got::Ack(seq)) => acks.push(seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    let got: Vec<(u64, u64)> = b
        .drain(QUIET)
        .into_iter()
        .map(|f| match f {
            In::Publication { seq, offset, .. } => (seq, offset),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(got, [(1, 1), (2, 2)], "the resend of seq 1 is acknowledged, not forwarded");
}

#[test]
fn idle_positions_are_bounded_and_forgotten_then_start_a_new_epoch() {
    let broker = broker("[history]\nsize = 0\nmax_groups = 2\nmeta_ttl_ms = 500\n");
    let mut a = V2::join(&broker, 0xaa);
    for (seq, group) in (1..).zip(["i1", "i2", "i3", "i4"]) {
        publish_n(&mut a, group, seq, 1, b"m");
    }
    let groups = broker.channel_row().unwrap()["history_groups"].as_u64();
    assert_eq!(groups, Some(2), "at most history.max_groups idle positions");
    let before = a.ask("i4", None, 10);
    assert_eq!(before.offset, 1);
    wait_for("idle positions to be forgotten", TIMEOUT, || {
        (broker.channel_row()?["history_groups"].as_u64()? == 0).then_some(())
    });
    let after = a.ask("i4", Some((&before.epoch, 1)), 10);
    assert_ne!(after.epoch, before.epoch, "a forgotten group starts a new epoch");
    assert_eq!((after.offset, after.recovered), (0, false));
}
