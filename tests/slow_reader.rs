//! Slow readers under both `limits.slow_client` policies: a client that joined a group and
//! stopped reading (with a small receive buffer, so the kernel buffers fill fast) while a
//! publisher floods the group. The worker's memory stays bounded by `send_buffer_limit`, a
//! fast client in the same group on the same worker receives every message, and the slow one
//! is closed with 1008 (`close`) or loses its oldest messages and is told how many (`drop`)
//! (issue 6).

mod common;
mod robustness;

use std::time::Duration;

use common::*;
use robustness::*;
use serde_json::{json, Value};

/// Group messages of 16 KiB...
const SIZE: usize = 16 * 1024;
/// ... 100 MiB of them.
const COUNT: usize = 6400;
/// Messages the publisher may be ahead of the fast client: 128 KiB, under the 256 KiB send
/// buffer limit, so the fast client never counts as slow.
const WINDOW: usize = 8;
/// What the worker may grow by, whatever was published.
const RSS_SLACK_KIB: u64 = 32 * 1024;

struct Setup {
    server: Server,
    slow: RawWs,
    fast: RawWs,
    publisher: RawWs,
    /// The worker holding the slow and the fast client.
    worker: usize,
}

fn setup(policy: &str) -> Setup {
    let config = format!(
        "[limits]\nsend_buffer_limit = 262144\nslow_client = \"{policy}\"\n\
         commands_per_second = 1000000\ncommands_burst = 1000000\n\
         ping_interval_ms = 600000\nidle_timeout_ms = 0\n"
    );
    // No keep-alive pings: the test reads frames one by one and expects data only, and on a
    // loaded machine it can run past the default 30-s ping interval (seen in a full run).
    let server = start(2, &config);
    let mut slow = RawWs::upgrade(connect_small_rcvbuf(server.addr, 4096));
    let worker = server.workers_of_ports(&[slow.port()])[0];
    // The fast client on the same worker, the publisher on the other one (so the flood also
    // crosses the channel).
    let pick = |same: bool| {
        for _ in 0..256 {
            let c = RawWs::connect(server.addr);
            if (server.workers_of_ports(&[c.port()])[0] == worker) == same {
                return c;
            }
        }
        panic!("256 connections did not reach the wanted worker");
    };
    let mut fast = pick(true);
    let publisher = pick(false);
    // The slow client asks for a reply, so it wants to hear about missed messages too.
    slow.send_text(r#"{"cmd":"add_group","group_id":"flood","id":"slow"}"#);
    assert_eq!(slow.next_text(), r#"{"id":"slow","ok":true}"#);
    fast.send_text(r#"{"cmd":"add_group","group_id":"flood","id":"fast"}"#);
    assert_eq!(fast.next_text(), r#"{"id":"fast","ok":true}"#);
    server.wait_subscriptions(2);
    Setup { server, slow, fast, publisher, worker }
}

/// Publishes `COUNT` messages, never more than `WINDOW` ahead of the fast client, which must
/// receive each one, in order. Returns the worker's highest RSS seen (KiB).
fn flood(s: &mut Setup) -> u64 {
    let mut max_rss = 0;
    let mut expect = 0;
    for seq in 0..COUNT {
        std::io::Write::write_all(&mut s.publisher.stream, &flood_frame("flood", seq, SIZE)).unwrap();
        while expect + WINDOW <= seq {
            let text = s.fast.next_text();
            assert_eq!(flood_seq(&text), Some(expect), "fast client: missing, duplicated or reordered");
            assert_eq!(text.len(), SIZE);
            expect += 1;
        }
        if seq % 400 == 0 {
            max_rss = max_rss.max(worker_rss(&s.server.status(), s.worker));
        }
    }
    while expect < COUNT {
        assert_eq!(flood_seq(&s.fast.next_text()), Some(expect), "fast client");
        expect += 1;
    }
    max_rss.max(worker_rss(&s.server.status(), s.worker))
}

/// Reads the slow client's backlog: the group messages (checked to be in order), and the
/// frames that were not group messages.
fn read_backlog(slow: &mut RawWs, until: impl Fn(u8, &[u8]) -> bool) -> (Vec<usize>, Vec<(u8, Vec<u8>)>) {
    let mut seqs = Vec::new();
    let mut others = Vec::new();
    loop {
        match slow.next_frame() {
            Ok((0x81, payload)) if flood_seq(std::str::from_utf8(&payload).unwrap()).is_some() => {
                let seq = flood_seq(std::str::from_utf8(&payload).unwrap()).unwrap();
                assert!(seqs.last().is_none_or(|&l| l < seq), "slow client: {seq} after {:?}", seqs.last());
                seqs.push(seq);
            }
            Ok((first, payload)) => {
                let stop = until(first, &payload);
                others.push((first, payload));
                if stop {
                    return (seqs, others);
                }
            }
            Err(End::Eof) => return (seqs, others),
            Err(End::Timeout) => panic!(
                "slow client: nothing more within its read timeout after {} messages and {} other frames \
                 ({others:?}); expected the rest of its queue, then the missed report",
                seqs.len(),
                others.len()
            ),
        }
    }
}

#[test]
fn slow_reader_is_closed_with_1008_and_memory_stays_bounded() {
    let mut s = setup("close");
    let baseline = worker_rss(&s.server.status(), s.worker);
    let max_rss = flood(&mut s);
    let report = s.server.status();
    let row = &worker_rows(&report)[s.worker];
    assert!(field(row, "slow_closed") >= 1, "{row}");
    assert_eq!(worker_sum(&report, "slow_closed"), 1, "only the slow client");
    assert!(
        max_rss < baseline + RSS_SLACK_KIB,
        "worker RSS grew from {baseline} KiB to {max_rss} KiB while 100 MiB were published"
    );
    // Cut off: the worker forgets it (the fast client and the publisher remain).
    s.server.wait_status("the slow client to be dropped", |r| field(&r["totals"], "connections") == 2);
    // What it finally reads: some messages, in order, then at most a close frame 1008, then
    // the end of the stream.
    let (seqs, others) = read_backlog(&mut s.slow, |_, _| false);
    assert!(seqs.len() < COUNT / 2, "the slow client got {} of {COUNT} messages", seqs.len());
    for (first, payload) in &others {
        assert_eq!(*first, 0x88, "only a close frame besides messages, got {first:#x}");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
        assert_eq!(&payload[2..], b"send buffer full: client too slow");
    }
    assert_eq!(field(&s.server.status()["totals"], "restarts"), 0);
}

#[test]
fn slow_reader_loses_its_oldest_messages_and_is_told_how_many() {
    let mut s = setup("drop");
    let baseline = worker_rss(&s.server.status(), s.worker);
    let max_rss = flood(&mut s);
    let report = s.server.status();
    let dropped = field(&worker_rows(&report)[s.worker], "slow_dropped");
    assert!(dropped > 0, "{report}");
    assert_eq!(worker_sum(&report, "slow_closed"), 0);
    assert_eq!(field(&report["totals"], "connections"), 3, "the slow client stays connected");
    assert!(
        max_rss < baseline + RSS_SLACK_KIB,
        "worker RSS grew from {baseline} KiB to {max_rss} KiB while 100 MiB were published"
    );
    // It reads at last: fewer messages than published, then the missed report (the fast client
    // got everything, so the worker has queued all there will be).
    let is_missed =
        |first: u8, p: &[u8]| first == 0x81 && serde_json::from_slice::<Value>(p).is_ok_and(|v| v["event"] == "missed");
    s.slow.read_timeout(Some(Duration::from_secs(10)));
    let (seqs, others) = read_backlog(&mut s.slow, is_missed);
    let missed: Value = serde_json::from_slice(&others.last().expect("a missed report").1).unwrap();
    assert_eq!(others.len(), 1, "nothing but messages before the report: {others:?}");
    let count = missed["count"].as_u64().unwrap_or_else(|| panic!("{missed}"));
    assert_eq!(missed, json!({"event": "missed", "count": count}));
    assert!(seqs.len() < COUNT, "received {} of {COUNT}", seqs.len());
    assert_eq!(count, (COUNT - seqs.len()) as u64, "missed = published - received");
    assert_eq!(count, dropped, "the report matches the slow_dropped counter");
    // The newest messages were kept.
    assert_eq!(seqs.last(), Some(&(COUNT - 1)));
    // Still a working connection, with nothing else pending.
    s.slow.send_text(r#"{"cmd":"leave_group","group_id":"x","id":"after"}"#);
    assert_eq!(s.slow.next_text(), r#"{"id":"after","ok":true}"#);
    assert_eq!(field(&s.server.status()["totals"], "restarts"), 0);
}
