//! Soak: thousands of connections for minutes, mixing well-behaved clients that keep joining
//! and leaving groups (and reconnecting), steady publishers, slow readers that stop reading
//! for a while, and bad clients (garbage JSON, binary frames, oversized frames, invalid UTF-8,
//! abrupt disconnects, half handshakes). Run by `scripts/soak`, which adds the server-side
//! checks (no restart, same pids) and owns the server.
//!
//! Exactness with changing membership: each membership of a good client is an interval from
//! its join's acknowledgement to the moment it sends the leave (or disconnects). Every message
//! whose publisher stamp lies inside the interval shrunk by `GRACE` at both ends (time for
//! the broker to learn of the subscription, for messages in flight) must arrive exactly once;
//! a message of a group is only acceptable inside the interval widened by `LOOSE`; every
//! message at most once per connection, and in order per (publisher, group).
//!
//! Memory: the server's process tree is sampled (PSS and RSS) every few seconds; the average
//! of the last window must stay within 20% + 8 MiB of the first window after warm-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use super::{Ctx, Outcome};
use crate::conn::Target;
use crate::sys::now_ns;
use crate::wire::{self, Payload};
use crate::ws::{self, Frame, Reader, Writer};

/// Margin inside a membership interval within which delivery is required.
const GRACE: u64 = 1_000_000_000;
/// Margin outside a membership interval within which a delivery is still acceptable.
const LOOSE: u64 = 3_000_000_000;
/// The hot group (a string id above the normal groups): big messages, slow readers in it.
const HOT_SIZE: usize = 8192;

/// A tiny deterministic PRNG (xorshift), one per task.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Clone, Debug)]
struct Params {
    connections: usize,
    groups: u32,
    publishers: usize,
    rate: f64,
    size: usize,
    duration: Duration,
    hot_rate: f64,
}

/// What one incarnation (connection) of a good client saw.
#[derive(Default)]
struct Record {
    /// (group, required from, required until), publisher stamps.
    required: Vec<(u32, u64, u64)>,
    /// (publisher, group) -> bitmap of received seqs.
    seen: HashMap<(u32, u32), Vec<u64>>,
}

#[derive(Default)]
struct Counts {
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    unexpected: AtomicU64,
    good_closed: AtomicU64,
    good_errors: AtomicU64,
    connect_failures: AtomicU64,
    incarnations: AtomicU64,
    joins: AtomicU64,
    leaves: AtomicU64,
    received: AtomicU64,
    slow_stalls: AtomicU64,
    slow_closed_1008: AtomicU64,
    slow_ended: AtomicU64,
    slow_received: AtomicU64,
    bad_attempts: AtomicU64,
    bad_as_documented: AtomicU64,
    bad_mismatch: AtomicU64,
}

struct Shared {
    target: Target,
    p: Params,
    /// Set once publishing stopped and deliveries drained: every task wraps up.
    finish: AtomicBool,
    /// Publisher stamp after which nothing was published (0 while publishing).
    stop_ns: AtomicU64,
    records: Mutex<Vec<Record>>,
    hist: Mutex<Histogram<u64>>,
    c: Counts,
    first_errors: Mutex<Vec<String>>,
}

impl Shared {
    fn note(&self, what: String) {
        if let Ok(mut v) = self.first_errors.lock() {
            if v.len() < 20 {
                v.push(what);
            }
        }
    }
    fn finishing(&self) -> bool {
        self.finish.load(Relaxed)
    }
}

async fn connect(t: &Target, rcvbuf: Option<u32>) -> Result<(Reader, Writer)> {
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(t.addr)).await??;
    stream.set_nodelay(true)?;
    tokio::time::timeout(Duration::from_secs(10), ws::handshake(stream, &t.addr.to_string())).await?
}

/// A close frame from the client (code 1000), masked.
fn close_frame() -> Vec<u8> {
    let mut out = Vec::new();
    ws::encode_close(1000, &mut out);
    out
}

// ---- good clients --------------------------------------------------------------------------

/// Membership bookkeeping of one incarnation.
struct Member {
    group: u32,
    /// Stamp of the join's acknowledgement, once it came.
    acked: Option<u64>,
    /// Loose window start (join sent - LOOSE).
    loose_from: u64,
}

struct Incarnation {
    rec: Record,
    open: Vec<Member>,
    /// Closed loose windows (group, from, until).
    loose: Vec<(u32, u64, u64)>,
    /// Reply id -> group of the join it acknowledges.
    pending: HashMap<u64, u32>,
    next_id: u64,
    last: HashMap<(u32, u32), u64>,
}

impl Incarnation {
    fn new() -> Incarnation {
        Incarnation {
            rec: Record::default(),
            open: Vec::new(),
            loose: Vec::new(),
            pending: HashMap::new(),
            next_id: 1,
            last: HashMap::new(),
        }
    }

    fn join(&mut self, group: u32, out: &mut Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, group);
        self.open.push(Member { group, acked: None, loose_from: now_ns().saturating_sub(LOOSE) });
        ws::encode_text(&wire::add_group(group, Some(id)), out);
    }

    /// Ends the membership of `group` now (leave sent, or the connection ends at `until`).
    fn end(&mut self, at: usize, until: u64) {
        let m = self.open.swap_remove(at);
        if let Some(acked) = m.acked {
            let (from, to) = (acked + GRACE, until.saturating_sub(GRACE));
            if to > from {
                self.rec.required.push((m.group, from, to));
            }
        }
        self.loose.push((m.group, m.loose_from, until + LOOSE));
    }

    fn end_all(&mut self, until: u64) {
        while !self.open.is_empty() {
            self.end(0, until);
        }
    }

    fn acceptable(&self, group: u32, stamp: u64) -> bool {
        self.open.iter().any(|m| m.group == group && stamp >= m.loose_from)
            || self.loose.iter().any(|&(g, from, to)| g == group && stamp >= from && stamp <= to)
    }
}

enum Ended {
    Finished,
    Reconnect,
}

async fn good_client(idx: usize, sh: Arc<Shared>, stable: bool) {
    let mut rng = Rng::new(idx as u64 + 1);
    // Spread the ramp a little so the first joins do not all land at once.
    tokio::time::sleep(rng.millis(0, 500)).await;
    while !sh.finishing() {
        let conn = match connect(&sh.target, None).await {
            Ok(c) => c,
            Err(e) => {
                sh.c.connect_failures.fetch_add(1, Relaxed);
                sh.note(format!("good client {idx}: connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        sh.c.incarnations.fetch_add(1, Relaxed);
        let mut inc = Incarnation::new();
        let ended = incarnation(idx, &sh, stable, &mut rng, conn, &mut inc).await;
        if let Ok(mut records) = sh.records.lock() {
            records.push(inc.rec);
        }
        if matches!(ended, Ended::Finished) {
            return;
        }
        if stable && !sh.finishing() {
            sh.note(format!("stable client {idx} lost its connection"));
        }
    }
}

async fn incarnation(
    idx: usize,
    sh: &Shared,
    stable: bool,
    rng: &mut Rng,
    (mut r, w): (Reader, Writer),
    inc: &mut Incarnation,
) -> Ended {
    let groups = sh.p.groups;
    let hot = groups;
    let mut out = Vec::new();
    if stable {
        inc.join(idx as u32 % groups, &mut out);
        inc.join((idx as u32 * 7 + 3) % groups, &mut out);
        if idx.is_multiple_of(10) {
            inc.join(hot, &mut out);
        }
    } else {
        for _ in 0..1 + rng.below(3) {
            let g = rng.below(groups as u64) as u32;
            if !inc.open.iter().any(|m| m.group == g) {
                inc.join(g, &mut out);
            }
        }
    }
    sh.c.joins.fetch_add(inc.open.len() as u64, Relaxed);
    if ws::send(&w, &out).await.is_err() {
        inc.end_all(now_ns());
        return Ended::Reconnect;
    }
    let mut next_action = Instant::now() + rng.millis(2000, 8000);
    loop {
        let wake = (Instant::now() + Duration::from_millis(250)).min(next_action);
        let filled = tokio::select! {
            res = r.fill() => Some(res),
            _ = tokio::time::sleep_until(wake.into()) => None,
        };
        match filled {
            Some(Ok(true)) => {}
            Some(Ok(false)) | Some(Err(_)) => {
                if !sh.finishing() {
                    sh.c.good_closed.fetch_add(1, Relaxed);
                    sh.note(format!("good client {idx}: connection ended by the server"));
                }
                inc.end_all(now_ns());
                return Ended::Reconnect;
            }
            None => {}
        }
        // Account every whole frame.
        let now = now_ns();
        let mut lat = Vec::new();
        loop {
            let (frame, used) = match ws::parse(&r.buf, r.pos) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    sh.c.good_errors.fetch_add(1, Relaxed);
                    sh.note(format!("good client {idx}: bad frame: {e}"));
                    inc.end_all(now);
                    return Ended::Reconnect;
                }
            };
            match frame {
                Frame::Text(s, e) => {
                    let text = String::from_utf8_lossy(&r.buf[s..e]);
                    if text.starts_with('{') {
                        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        match v.get("id").and_then(Value::as_u64).and_then(|id| inc.pending.remove(&id)) {
                            Some(g) if v["ok"] == true => {
                                if let Some(m) = inc.open.iter_mut().find(|m| m.group == g && m.acked.is_none()) {
                                    m.acked = Some(now);
                                }
                            }
                            _ => {
                                sh.c.good_errors.fetch_add(1, Relaxed);
                                sh.note(format!("good client {idx}: server said {text}"));
                            }
                        }
                    } else if let Some(p) = Payload::decode(&text) {
                        sh.c.received.fetch_add(1, Relaxed);
                        if !inc.acceptable(p.group, p.send_ns) {
                            sh.c.unexpected.fetch_add(1, Relaxed);
                            sh.note(format!("good client {idx}: message of group {} outside its membership", p.group));
                        }
                        let bits = inc.rec.seen.entry((p.publisher, p.group)).or_default();
                        let (word, bit) = ((p.seq / 64) as usize, p.seq % 64);
                        if bits.len() <= word {
                            bits.resize(word + 1, 0);
                        }
                        if bits[word] & (1 << bit) != 0 {
                            sh.c.duplicates.fetch_add(1, Relaxed);
                        }
                        bits[word] |= 1 << bit;
                        let last = inc.last.entry((p.publisher, p.group)).or_insert(0);
                        if p.seq < *last {
                            sh.c.out_of_order.fetch_add(1, Relaxed);
                        }
                        *last = p.seq;
                        lat.push(now.saturating_sub(p.send_ns) / 1000);
                    } else {
                        sh.c.good_errors.fetch_add(1, Relaxed);
                        sh.note(format!("good client {idx}: unparseable {text:.60}"));
                    }
                }
                Frame::Ping(s, e) => {
                    let mut pong = Vec::new();
                    ws::encode_pong(&r.buf[s..e], &mut pong);
                    let _ = ws::send(&w, &pong).await;
                }
                Frame::Close => {
                    if !sh.finishing() {
                        sh.c.good_closed.fetch_add(1, Relaxed);
                        sh.note(format!("good client {idx}: closed by the server"));
                    }
                    r.pos += used;
                    inc.end_all(now);
                    return Ended::Reconnect;
                }
                Frame::Other => {}
            }
            r.pos += used;
        }
        if !lat.is_empty() {
            if let Ok(mut h) = sh.hist.lock() {
                for us in lat {
                    let _ = h.record(us.max(1));
                }
            }
        }
        if sh.finishing() {
            // Publishing stopped and deliveries drained: memberships end with the last publish.
            let stop = sh.stop_ns.load(Relaxed);
            inc.end_all(stop + GRACE);
            let _ = ws::send(&w, &close_frame()).await;
            return Ended::Finished;
        }
        if stable || Instant::now() < next_action {
            continue;
        }
        next_action = Instant::now() + rng.millis(2000, 8000);
        let mut out = Vec::new();
        match rng.below(10) {
            0..=3 if inc.open.len() > 1 => {
                let at = rng.below(inc.open.len() as u64) as usize;
                let g = inc.open[at].group;
                inc.end(at, now_ns());
                ws::encode_text(&format!(r#"{{"cmd":"leave_group","group_id":"{g}"}}"#), &mut out);
                sh.c.leaves.fetch_add(1, Relaxed);
            }
            0..=8 => {
                let g = rng.below(groups as u64) as u32;
                if inc.open.len() < 4 && !inc.open.iter().any(|m| m.group == g) {
                    inc.join(g, &mut out);
                    sh.c.joins.fetch_add(1, Relaxed);
                }
            }
            _ => {
                // Leave for good: politely half the time, abruptly otherwise.
                inc.end_all(now_ns());
                if rng.below(2) == 0 {
                    let _ = ws::send(&w, &close_frame()).await;
                }
                return Ended::Reconnect;
            }
        }
        if !out.is_empty() && ws::send(&w, &out).await.is_err() {
            inc.end_all(now_ns());
            return Ended::Reconnect;
        }
    }
}

// ---- publishers ----------------------------------------------------------------------------

/// Publishes `rate` msg/s round-robin over `groups` until `duration`; returns the stamps of
/// every message by (group, seq).
async fn publisher(
    id: u32,
    sh: Arc<Shared>,
    groups: Vec<u32>,
    rate: f64,
    size: usize,
) -> Result<HashMap<u32, Vec<u64>>> {
    let (mut r, w) = connect(&sh.target, None).await?;
    // Nothing comes back but pings; answer them.
    let pw = w.clone();
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = r.next_text(&pw).await {} });
    let mut sent: HashMap<u32, Vec<u64>> = HashMap::new();
    let start = Instant::now();
    let mut total = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut batch = Vec::new();
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(sh.p.duration);
        let due = (rate * elapsed.as_secs_f64()) as u64;
        batch.clear();
        while total < due {
            let group = groups[(total % groups.len() as u64) as usize];
            let stamps = sent.entry(group).or_default();
            let p = Payload { publisher: id, seq: stamps.len() as u64, send_ns: now_ns(), group };
            stamps.push(p.send_ns);
            ws::encode_text(&wire::send_to_group(group, &p.encode(size)), &mut batch);
            total += 1;
        }
        if !batch.is_empty() {
            ws::send(&w, &batch).await?;
        }
        if elapsed >= sh.p.duration {
            break;
        }
    }
    drain.abort();
    Ok(sent)
}

// ---- slow readers --------------------------------------------------------------------------

/// Joins the hot group with a small receive buffer; reads for a while, stops reading for a
/// while, and so on. The server may close it (1008); then it comes back.
async fn slow_reader(idx: usize, sh: Arc<Shared>) {
    let mut rng = Rng::new(1_000_003 + idx as u64);
    tokio::time::sleep(rng.millis(0, 2000)).await;
    while !sh.finishing() {
        let Ok((mut r, w)) = connect(&sh.target, Some(8192)).await else {
            sh.c.connect_failures.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut out = Vec::new();
        ws::encode_text(&wire::add_group(sh.p.groups, Some(1)), &mut out);
        ws::encode_text(&wire::add_group(rng.below(sh.p.groups as u64) as u32, None), &mut out);
        if ws::send(&w, &out).await.is_err() {
            continue;
        }
        'conn: loop {
            // Read for 2..5 s.
            let until = Instant::now() + rng.millis(2000, 5000);
            while Instant::now() < until {
                let res = tokio::select! {
                    res = r.fill() => res,
                    _ = tokio::time::sleep_until(until.into()) => Ok(true),
                };
                if !matches!(res, Ok(true)) {
                    sh.c.slow_ended.fetch_add(1, Relaxed);
                    break 'conn;
                }
                while let Ok(Some((frame, used))) = ws::parse(&r.buf, r.pos) {
                    let close = match frame {
                        Frame::Text(..) => {
                            sh.c.slow_received.fetch_add(1, Relaxed);
                            false
                        }
                        Frame::Ping(s, e) => {
                            let mut pong = Vec::new();
                            ws::encode_pong(&r.buf[s..e], &mut pong);
                            let _ = ws::send(&w, &pong).await;
                            false
                        }
                        Frame::Close => {
                            let code = r.buf.get(r.pos + 2..r.pos + 4).map(|b| u16::from_be_bytes([b[0], b[1]]));
                            if code == Some(1008) {
                                sh.c.slow_closed_1008.fetch_add(1, Relaxed);
                            }
                            true
                        }
                        Frame::Other => false,
                    };
                    r.pos += used;
                    if close {
                        sh.c.slow_ended.fetch_add(1, Relaxed);
                        break 'conn;
                    }
                }
                if sh.finishing() {
                    let _ = ws::send(&w, &close_frame()).await;
                    return;
                }
            }
            // Stop reading for 6..12 s.
            sh.c.slow_stalls.fetch_add(1, Relaxed);
            let stall = Instant::now() + rng.millis(6000, 12000);
            while Instant::now() < stall && !sh.finishing() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

// ---- bad clients ---------------------------------------------------------------------------

/// Reads frames until a close frame (its code) or a text frame (its text); `None` at EOF or
/// after 10 s.
async fn answer(r: &mut Reader) -> Option<Result<u16, String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(Some((frame, used))) = ws::parse(&r.buf, r.pos) {
            let at = r.pos;
            r.pos += used;
            match frame {
                Frame::Close => {
                    let code = r.buf.get(at + 2..at + 4).map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                    return Some(Ok(code));
                }
                Frame::Text(s, e) => return Some(Err(String::from_utf8_lossy(&r.buf[s..e]).into_owned())),
                _ => {}
            }
        }
        match tokio::time::timeout_at(deadline.into(), r.fill()).await {
            Ok(Ok(true)) => {}
            _ => return None,
        }
    }
}

/// Masked frame with key 0: payload as is.
fn raw_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    groupcast::ws::frame::encode_client(&mut out, first, payload, Some([0; 4]));
    out
}

const BAD_KINDS: [&str; 6] = ["garbage_json", "binary", "oversized", "invalid_utf8", "abrupt", "half_handshake"];

async fn bad_client(idx: usize, sh: Arc<Shared>, mismatches: Arc<Mutex<HashMap<&'static str, u64>>>) {
    let mut rng = Rng::new(2_000_003 + idx as u64);
    while !sh.finishing() {
        tokio::time::sleep(rng.millis(500, 3000)).await;
        let kind = BAD_KINDS[rng.below(BAD_KINDS.len() as u64) as usize];
        sh.c.bad_attempts.fetch_add(1, Relaxed);
        let ok = bad_attempt(&sh, kind, &mut rng).await.unwrap_or_default();
        if ok {
            sh.c.bad_as_documented.fetch_add(1, Relaxed);
        } else if !sh.finishing() {
            sh.c.bad_mismatch.fetch_add(1, Relaxed);
            if let Ok(mut m) = mismatches.lock() {
                *m.entry(kind).or_default() += 1;
            }
        }
    }
}

/// One misbehaviour; true when the server answered as documented.
async fn bad_attempt(sh: &Shared, kind: &str, rng: &mut Rng) -> Result<bool> {
    if kind == "half_handshake" {
        let mut s = tokio::net::TcpStream::connect(sh.target.addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: loc").await?;
        tokio::time::sleep(rng.millis(10, 300)).await;
        return Ok(true); // dropped mid-request: nothing to check but the server's health
    }
    let (mut r, w) = connect(&sh.target, None).await?;
    let check = |got: Option<Result<u16, String>>, want: u16| matches!(got, Some(Ok(c)) if c == want);
    Ok(match kind {
        "garbage_json" => {
            ws::send(&w, &raw_frame(0x81, b"{\"cmd\":\"add_group\",,,")).await?;
            let got = answer(&mut r).await;
            let ok = matches!(&got, Some(Err(t)) if t.contains("\"error\":\"invalid_json\""));
            let _ = ws::send(&w, &close_frame()).await;
            ok
        }
        "binary" => {
            ws::send(&w, &raw_frame(0x82, &[1, 2, 3])).await?;
            check(answer(&mut r).await, 1003)
        }
        "oversized" => {
            // Only the header of a 2 MiB frame: refused on its length alone.
            let mut head = vec![0x81, 0x80 | 127];
            head.extend_from_slice(&(2u64 << 20).to_be_bytes());
            head.extend_from_slice(&[0; 4]);
            head.extend_from_slice(&[b' '; 100]);
            ws::send(&w, &head).await?;
            check(answer(&mut r).await, 1009)
        }
        "invalid_utf8" => {
            ws::send(&w, &raw_frame(0x81, b"{\"cmd\":\"\xff\xfe\"}")).await?;
            check(answer(&mut r).await, 1007)
        }
        _ => {
            // abrupt: join, publish nothing, vanish without a close frame.
            let mut out = Vec::new();
            ws::encode_text(&wire::add_group(rng.below(sh.p.groups as u64) as u32, Some(9)), &mut out);
            ws::send(&w, &out).await?;
            let got = answer(&mut r).await;
            matches!(got, Some(Err(t)) if t == r#"{"id":9,"ok":true}"#)
        }
    })
}

// ---- memory --------------------------------------------------------------------------------

/// RSS (from /proc/PID/status) of the server's process tree, bytes.
fn tree_rss_bytes(root: u32) -> u64 {
    crate::procfs::tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Averages of the first and the last window after warm-up; ok if the last is within 20% +
/// 8 MiB of the first.
fn memory_verdict(samples: &[(f64, u64, u64)], duration: f64) -> Value {
    let warmup = (duration * 0.2).min(60.0);
    let window = ((duration - warmup) * 0.25).min(60.0);
    let avg = |lo: f64, hi: f64, pick: fn(&(f64, u64, u64)) -> u64| {
        let v: Vec<u64> = samples.iter().filter(|s| s.0 >= lo && s.0 <= hi).map(pick).collect();
        (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64 / v.len() as f64)
    };
    let mut out = json!({"warmup_s": warmup, "window_s": window});
    let mut ok = true;
    for (name, pick) in [("pss", (|s: &(f64, u64, u64)| s.1) as fn(&(f64, u64, u64)) -> u64), ("rss", |s| s.2)] {
        let first = avg(warmup, warmup + window, pick);
        let last = avg(duration - window, duration + 1.0, pick);
        let pass = match (first, last) {
            (Some(f), Some(l)) => l <= f * 1.2 + 8.0 * 1048576.0,
            _ => false,
        };
        ok &= pass;
        out[name] = json!({
            "first_mib": first.map(|b| (b / 1048576.0 * 10.0).round() / 10.0),
            "last_mib": last.map(|b| (b / 1048576.0 * 10.0).round() / 10.0),
            "flat": pass,
        });
    }
    out["ok"] = json!(ok);
    out
}

// ---- the scenario --------------------------------------------------------------------------

pub async fn soak(ctx: &Ctx) -> Result<Outcome> {
    let o = &ctx.o;
    let p = Params {
        connections: ctx.pick(&o.connections, 3000, 200),
        groups: ctx.pick(&o.groups, 100, 20) as u32,
        publishers: ctx.pick(&o.publishers, 4, 2),
        rate: ctx.pick(&o.rate, 200.0, 100.0),
        size: ctx.pick(&o.size, 128, 128),
        duration: ctx.duration(300.0, 20.0),
        hot_rate: 100.0,
    };
    if p.groups == 0 || p.publishers == 0 {
        bail!("need at least one group and one publisher");
    }
    let server = ctx.server;
    let sh = Arc::new(Shared {
        target: ctx.target()?.clone(),
        p: p.clone(),
        finish: AtomicBool::new(false),
        stop_ns: AtomicU64::new(0),
        records: Mutex::new(Vec::new()),
        hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        c: Counts::default(),
        first_errors: Mutex::new(Vec::new()),
    });
    // 2% slow readers, 2% bad clients, 10% of the good ones stable, the rest churning.
    let slow = (p.connections / 50).max(1);
    let bad = (p.connections / 50).max(1);
    let good = p.connections.saturating_sub(slow + bad + p.publishers + 1).max(1);
    eprintln!(
        "soak: {good} good clients, {slow} slow readers, {bad} bad clients, {} publishers + 1 hot, {:?}",
        p.publishers, p.duration
    );
    let t0 = Instant::now();
    let mismatches = Arc::new(Mutex::new(HashMap::new()));
    let mut clients = Vec::new();
    for i in 0..good {
        clients.push(tokio::spawn(good_client(i, sh.clone(), i % 10 == 0)));
    }
    for i in 0..slow {
        clients.push(tokio::spawn(slow_reader(i, sh.clone())));
    }
    for i in 0..bad {
        clients.push(tokio::spawn(bad_client(i, sh.clone(), mismatches.clone())));
    }
    // Memory sampler.
    let sampler = {
        let sh = sh.clone();
        let every = Duration::from_secs_f64((p.duration.as_secs_f64() / 60.0).clamp(1.0, 5.0));
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !sh.finishing() {
                if let Some(root) = server.0 {
                    let (pss, rss) = tokio::task::spawn_blocking(move || {
                        (crate::procfs::tree_pss_bytes(root), tree_rss_bytes(root))
                    })
                    .await
                    .unwrap_or((0, 0));
                    samples.push((t0.elapsed().as_secs_f64(), pss, rss));
                }
                tokio::time::sleep(every).await;
            }
            samples
        })
    };
    // Publishers: the normal ones over all groups, the hot one on the hot group.
    let mut pubs = Vec::new();
    for k in 0..p.publishers {
        let mut groups: Vec<u32> = (0..p.groups).collect();
        groups.rotate_left(k % p.groups as usize);
        pubs.push(tokio::spawn(publisher(k as u32 + 1, sh.clone(), groups, p.rate / p.publishers as f64, p.size)));
    }
    pubs.push(tokio::spawn(publisher(p.publishers as u32 + 1, sh.clone(), vec![p.groups], p.hot_rate, HOT_SIZE)));
    let mut sent: HashMap<(u32, u32), Vec<u64>> = HashMap::new();
    let mut publish_errors = Vec::new();
    for (k, t) in pubs.into_iter().enumerate() {
        match t.await {
            Ok(Ok(s)) => {
                for (g, stamps) in s {
                    sent.insert((k as u32 + 1, g), stamps);
                }
            }
            Ok(Err(e)) => publish_errors.push(format!("publisher {}: {e:#}", k + 1)),
            Err(e) => publish_errors.push(format!("publisher {}: {e}", k + 1)),
        }
    }
    sh.stop_ns.store(now_ns(), Relaxed);
    let published: u64 = sent.values().map(|v| v.len() as u64).sum();
    eprintln!("soak: published {published}; draining");
    // Drain: until nothing arrived for 1 s (at most 15 s).
    let (mut last, mut since) = (sh.c.received.load(Relaxed), Instant::now());
    let drain_start = Instant::now();
    while since.elapsed() < Duration::from_secs(1) && drain_start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sh.c.received.load(Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    sh.finish.store(true, Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(20), c).await;
    }
    let samples = sampler.await.unwrap_or_default();

    // Exactness over every membership interval.
    let records = std::mem::take(&mut *sh.records.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut by_group: HashMap<u32, Vec<(u32, &Vec<u64>)>> = HashMap::new();
    for ((publ, g), stamps) in &sent {
        by_group.entry(*g).or_default().push((*publ, stamps));
    }
    let (mut expected, mut lost) = (0u64, 0u64);
    for rec in &records {
        for &(g, from, to) in &rec.required {
            for &(publ, stamps) in by_group.get(&g).map(Vec::as_slice).unwrap_or(&[]) {
                let bits = rec.seen.get(&(publ, g));
                for (seq, &ns) in stamps.iter().enumerate() {
                    if ns < from || ns > to {
                        continue;
                    }
                    expected += 1;
                    let got = bits.and_then(|b| b.get(seq / 64)).is_some_and(|w| w & (1 << (seq % 64)) != 0);
                    if !got {
                        lost += 1;
                    }
                }
            }
        }
    }
    let c = &sh.c;
    let get = |a: &AtomicU64| a.load(Relaxed);
    let hist = sh.hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    let memory = memory_verdict(&samples, p.duration.as_secs_f64());
    let exact = lost == 0 && get(&c.duplicates) == 0 && get(&c.unexpected) == 0 && get(&c.out_of_order) == 0;
    let clean = get(&c.good_closed) == 0 && get(&c.good_errors) == 0 && get(&c.bad_mismatch) == 0;
    let ok = exact && clean && publish_errors.is_empty() && memory["ok"] == true && expected > 0;
    let mismatches: HashMap<&str, u64> = mismatches.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(Outcome {
        ok,
        body: json!({
            "params": {
                "connections": p.connections, "good": good, "stable": good.div_ceil(10), "slow": slow, "bad": bad,
                "groups": p.groups, "publishers": p.publishers, "rate": p.rate, "size": p.size,
                "hot_rate": p.hot_rate, "hot_size": HOT_SIZE, "duration_s": p.duration.as_secs_f64(),
            },
            "published": published,
            "delivery": {
                "required": expected, "lost": lost, "received": get(&c.received),
                "duplicates": get(&c.duplicates), "out_of_order": get(&c.out_of_order),
                "unexpected": get(&c.unexpected), "exact": exact,
                "p50_ms": ms(hist.value_at_quantile(0.5)), "p99_ms": ms(hist.value_at_quantile(0.99)),
                "max_ms": ms(hist.max()),
            },
            "good_clients": {
                "incarnations": get(&c.incarnations), "joins": get(&c.joins), "leaves": get(&c.leaves),
                "closed_by_server": get(&c.good_closed), "errors": get(&c.good_errors),
                "connect_failures": get(&c.connect_failures),
            },
            "slow_readers": {
                "stalls": get(&c.slow_stalls), "closed_1008": get(&c.slow_closed_1008),
                "ended": get(&c.slow_ended), "received": get(&c.slow_received),
            },
            "bad_clients": {
                "attempts": get(&c.bad_attempts), "as_documented": get(&c.bad_as_documented),
                "mismatch": get(&c.bad_mismatch), "mismatch_by_kind": mismatches,
            },
            "memory": memory,
            "memory_samples": samples.iter().map(|s| json!([(s.0 * 10.0).round() / 10.0, s.1, s.2])).collect::<Vec<_>>(),
            "publish_errors": publish_errors,
            "first_errors": sh.first_errors.lock().map(|v| v.clone()).unwrap_or_default(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_verdict_accepts_flat_and_refuses_growth() {
        let flat: Vec<(f64, u64, u64)> = (0..60).map(|t| (t as f64, 100 << 20, 120 << 20)).collect();
        assert_eq!(memory_verdict(&flat, 60.0)["ok"], true);
        let growing: Vec<(f64, u64, u64)> =
            (0..60).map(|t| (t as f64, (100 + 2 * t as u64) << 20, 120 << 20)).collect();
        assert_eq!(memory_verdict(&growing, 60.0)["ok"], false);
    }
}
