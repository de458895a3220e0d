//! Receiver-side accounting: every delivered payload is checked against the
//! receiving connection's groups and a per-(publisher, group) bitmap of sequence
//! numbers, so loss, duplicates, reordering and wrong-group deliveries are counted.
//! With protocol 2 the payload arrives inside an envelope carrying the group's offset:
//! offsets must then also be consecutive per group per connection (from the join reply's
//! offset on), and every missing or repeated offset and every gap notice is an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::sys::now_ns;
use crate::wire::{Envelope, Payload};

const SHARDS: usize = 32;
/// Publisher ids on the wire are `epoch * EPOCH_STRIDE + index`, so frames from an
/// earlier phase that arrive late are recognised as stale instead of miscounted.
pub const EPOCH_STRIDE: u32 = 1000;

#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    max: u64,
}

#[derive(Default)]
struct Conn {
    groups: Vec<u32>,
    seen: HashMap<(u32, u32), Seen>,
    /// Protocol 2: the last offset seen (or the join reply's) per group; kept across phases.
    offsets: HashMap<u32, u64>,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    delivered: u64,
    duplicates: u64,
    wrong_group: u64,
    out_of_order: u64,
    stale: u64,
    malformed: u64,
    /// Protocol 2: offsets skipped, offsets seen again (or going back), gap notices.
    offset_gaps: u64,
    offset_repeats: u64,
    gap_notices: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.wrong_group += o.wrong_group;
        self.out_of_order += o.out_of_order;
        self.stale += o.stale;
        self.malformed += o.malformed;
        self.offset_gaps += o.offset_gaps;
        self.offset_repeats += o.offset_repeats;
        self.gap_notices += o.gap_notices;
    }
}

struct Shard {
    conns: Vec<Conn>,
    hist: Histogram<u64>,
    c: Counters,
}

/// Shared by every receiver task of one scenario run.
pub struct Tracker {
    shards: Vec<Mutex<Shard>>,
    /// Connections speak protocol 2 (`?protocol=2`): frames are envelopes.
    protocol2: bool,
    epoch: AtomicU32,
    /// Valid deliveries so far (drain loop watches it).
    delivered: AtomicU64,
    /// Per-connection valid deliveries (S7's publisher window watches it).
    progress: Vec<AtomicU64>,
    replies: AtomicU64,
    errors: AtomicU64,
    conn_failures: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Outcome of one measured phase.
#[derive(Debug, Default, Clone)]
pub struct PhaseReport {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub wrong_group: u64,
    pub out_of_order: u64,
    pub stale: u64,
    pub malformed: u64,
    pub lat_us: [u64; 4],
    /// Set for protocol 2, with its offset counters (see Counters).
    pub protocol2: bool,
    pub offset_gaps: u64,
    pub offset_repeats: u64,
    pub gap_notices: u64,
}

impl PhaseReport {
    /// No loss, no duplicate, no wrong group, nothing unparseable.
    /// Protocol 2: and offsets consecutive, no gap notice.
    pub fn exact(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.wrong_group == 0
            && self.malformed == 0
            && self.offset_gaps == 0
            && self.offset_repeats == 0
            && self.gap_notices == 0
    }

    pub fn p99_ms(&self) -> f64 {
        self.lat_us[2] as f64 / 1000.0
    }

    pub fn to_json(&self) -> Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        let mut v = json!({
            "expected": self.expected, "delivered": self.delivered, "lost": self.lost,
            "duplicates": self.duplicates, "wrong_group": self.wrong_group,
            "out_of_order": self.out_of_order, "stale": self.stale, "malformed": self.malformed,
            "p50_ms": ms(self.lat_us[0]), "p90_ms": ms(self.lat_us[1]),
            "p99_ms": ms(self.lat_us[2]), "max_ms": ms(self.lat_us[3]),
        });
        if self.protocol2 {
            v["offset_gaps"] = json!(self.offset_gaps);
            v["offset_repeats"] = json!(self.offset_repeats);
            v["gap_notices"] = json!(self.gap_notices);
        }
        v
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 120 s, 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

impl Tracker {
    /// `groups[i]` are the groups connection `i` joins (empty for publishers);
    /// `protocol2`: the connections speak protocol 2.
    pub fn new(groups: &[Vec<u32>], protocol2: bool) -> Tracker {
        let mut shards: Vec<Shard> =
            (0..SHARDS).map(|_| Shard { conns: Vec::new(), hist: new_hist(), c: Counters::default() }).collect();
        for (i, g) in groups.iter().enumerate() {
            shards[i % SHARDS].conns.push(Conn { groups: g.clone(), seen: HashMap::new(), offsets: HashMap::new() });
        }
        Tracker {
            shards: shards.into_iter().map(Mutex::new).collect(),
            protocol2,
            epoch: AtomicU32::new(1),
            delivered: AtomicU64::new(0),
            progress: (0..groups.len()).map(|_| AtomicU64::new(0)).collect(),
            replies: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            conn_failures: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    /// The probe id of member `conn`'s join of `group` under protocol 2, where every join
    /// is answered (the reply's offset anchors the offset check): the group in the low bits.
    pub fn join_id(conn: usize, group: u32) -> u64 {
        (conn as u64) << 32 | group as u64
    }

    pub fn epoch(&self) -> u32 {
        self.epoch.load(Relaxed)
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Relaxed)
    }

    pub fn progress(&self, conn: usize) -> u64 {
        self.progress[conn].load(Relaxed)
    }

    pub fn replies(&self) -> u64 {
        self.replies.load(Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    pub fn conn_failures(&self) -> u64 {
        self.conn_failures.load(Relaxed)
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|g| g.clone())
    }

    /// A connection broke or closed while the scenario still needed it.
    pub fn note_conn_failure(&self, why: String) {
        self.conn_failures.fetch_add(1, Relaxed);
        self.remember(why);
    }

    fn remember(&self, why: String) {
        if let Ok(mut g) = self.first_error.lock() {
            g.get_or_insert(why);
        }
    }

    /// Account text frames received by connection `conn`: `ranges` index into `buf`.
    /// Payload frames are checked under one shard lock per batch.
    pub fn on_texts(&self, conn: usize, buf: &[u8], ranges: &[(usize, usize)]) {
        if ranges.is_empty() {
            return;
        }
        let now = now_ns();
        let mut guard = match self.shards[conn % SHARDS].lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let Shard { conns, hist, c } = &mut *guard;
        let state = &mut conns[conn / SHARDS];
        for &(s, e) in ranges {
            let Ok(text) = std::str::from_utf8(&buf[s..e]) else {
                c.malformed += 1;
                continue;
            };
            if self.protocol2 && text.starts_with(r#"{"group":"#) {
                self.on_envelope(conn, state, hist, c, now, text);
                continue;
            }
            if text.starts_with('{') {
                self.on_control(text, state);
                continue;
            }
            let Some(p) = Payload::decode(text) else {
                c.malformed += 1;
                continue;
            };
            self.on_payload(conn, state, hist, c, now, p);
        }
    }

    /// Protocol 2: check the offset against the last one of the group on this connection,
    /// then account the payload inside as protocol 1 would.
    fn on_envelope(
        &self,
        conn: usize,
        state: &mut Conn,
        hist: &mut Histogram<u64>,
        c: &mut Counters,
        now: u64,
        text: &str,
    ) {
        let Some(env) = Envelope::decode(text) else {
            c.malformed += 1;
            return;
        };
        let Ok(group) = env.group.parse::<u32>() else {
            c.wrong_group += 1;
            return;
        };
        let Some(message) = env.message else {
            c.gap_notices += 1;
            self.remember(format!("server said: {text}"));
            // The stream goes on after the notice's offset.
            state.offsets.insert(group, env.offset);
            return;
        };
        match state.offsets.insert(group, env.offset) {
            Some(last) if env.offset <= last => {
                c.offset_repeats += 1;
                // Keep the highest offset: a stray old frame must not hide a later gap.
                state.offsets.insert(group, last);
            }
            Some(last) if env.offset > last + 1 => c.offset_gaps += env.offset - last - 1,
            _ => {}
        }
        match Payload::decode(&message) {
            Some(p) if p.group == group => self.on_payload(conn, state, hist, c, now, p),
            Some(_) => c.wrong_group += 1,
            None => c.malformed += 1,
        }
    }

    /// Account one decoded benchmark payload received by connection `conn`.
    #[inline]
    fn on_payload(
        &self,
        conn: usize,
        state: &mut Conn,
        hist: &mut Histogram<u64>,
        c: &mut Counters,
        now: u64,
        p: Payload,
    ) {
        if p.publisher / EPOCH_STRIDE != self.epoch() {
            c.stale += 1;
            return;
        }
        if !state.groups.contains(&p.group) {
            c.wrong_group += 1;
            return;
        }
        let seen = state.seen.entry((p.publisher, p.group)).or_default();
        let (word, bit) = ((p.seq / 64) as usize, p.seq % 64);
        if seen.bits.len() <= word {
            seen.bits.resize(word + 1, 0);
        }
        if seen.bits[word] & (1 << bit) != 0 {
            c.duplicates += 1;
            return;
        }
        seen.bits[word] |= 1 << bit;
        if p.seq < seen.max {
            c.out_of_order += 1;
        }
        seen.max = seen.max.max(p.seq);
        c.delivered += 1;
        let _ = hist.record(now.saturating_sub(p.send_ns) / 1000);
        self.delivered.fetch_add(1, Relaxed);
        self.progress[conn].fetch_add(1, Relaxed);
    }

    /// A reply (counted for the probe) or an error. Protocol 2: a join reply's offset is
    /// where the group's stream starts for this connection.
    fn on_control(&self, text: &str, state: &mut Conn) {
        match serde_json::from_str::<Value>(text) {
            Ok(v) if v.get("id").is_some() && v.get("error").is_none() => {
                if let (true, Some(id), Some(offset)) =
                    (self.protocol2, v["id"].as_u64(), v.get("offset").and_then(Value::as_u64))
                {
                    // A message that came before the reply already anchored the group.
                    state.offsets.entry(id as u32).or_insert(offset);
                }
                self.replies.fetch_add(1, Relaxed);
            }
            _ => {
                self.errors.fetch_add(1, Relaxed);
                self.remember(format!("server said: {text}"));
            }
        }
    }

    /// Close the phase: compare what was received with what publishers sent
    /// (`sent[(publisher, group)] = messages`, seqs 0..n), then reset for the next epoch.
    pub fn finish_phase(&self, sent: &HashMap<(u32, u32), u64>) -> PhaseReport {
        let mut by_group: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        for (&(p, g), &n) in sent {
            by_group.entry(g).or_default().push((p, n));
        }
        let mut r = PhaseReport::default();
        let mut hist = new_hist();
        let mut c = Counters::default();
        for shard in &self.shards {
            let mut s = match shard.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            for conn in &mut s.conns {
                for g in &conn.groups {
                    for &(p, n) in by_group.get(g).map(Vec::as_slice).unwrap_or(&[]) {
                        r.expected += n;
                        let got = conn.seen.get(&(p, *g)).map_or(0, |seen| {
                            let full = (n / 64) as usize;
                            let mut ones: u64 = seen.bits.iter().take(full).map(|w| w.count_ones() as u64).sum();
                            if n % 64 != 0 {
                                let mask = (1u64 << (n % 64)) - 1;
                                ones += (seen.bits.get(full).copied().unwrap_or(0) & mask).count_ones() as u64;
                            }
                            ones
                        });
                        r.lost += n - got.min(n);
                    }
                }
                conn.seen.clear();
            }
            let _ = hist.add(&s.hist);
            s.hist.reset();
            c.add(&s.c);
            s.c = Counters::default();
        }
        self.epoch.fetch_add(1, Relaxed);
        r.delivered = c.delivered;
        r.duplicates = c.duplicates;
        r.wrong_group = c.wrong_group;
        r.out_of_order = c.out_of_order;
        r.stale = c.stale;
        r.malformed = c.malformed;
        r.protocol2 = self.protocol2;
        r.offset_gaps = c.offset_gaps;
        r.offset_repeats = c.offset_repeats;
        r.gap_notices = c.gap_notices;
        if !hist.is_empty() {
            r.lat_us =
                [hist.value_at_quantile(0.50), hist.value_at_quantile(0.90), hist.value_at_quantile(0.99), hist.max()];
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(group: u32, offset: u64, seq: u64) -> String {
        let p = Payload { publisher: EPOCH_STRIDE, seq, send_ns: now_ns(), group };
        format!(r#"{{"group":"{group}","offset":{offset},"message":"{}"}}"#, p.encode(32))
    }

    fn feed(t: &Tracker, texts: &[String]) {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for s in texts {
            ranges.push((buf.len(), buf.len() + s.len()));
            buf.extend_from_slice(s.as_bytes());
        }
        t.on_texts(0, &buf, &ranges);
    }

    #[test]
    fn protocol2_offsets_must_follow_the_join_reply() {
        let t = Tracker::new(&[vec![5]], true);
        let reply = format!(r#"{{"id":{},"ok":true,"epoch":"e","offset":10}}"#, Tracker::join_id(0, 5));
        // 11, 12, (13 missing), 14, 14 again (a repeat, and a duplicate payload), then a gap notice.
        feed(&t, &[reply, frame(5, 11, 0), frame(5, 12, 1), frame(5, 14, 2), frame(5, 14, 2)]);
        feed(&t, &[r#"{"group":"5","gap":true,"epoch":"f","offset":20}"#.to_owned(), frame(5, 21, 3)]);
        let r = t.finish_phase(&HashMap::from([((EPOCH_STRIDE, 5), 4)]));
        assert_eq!(t.replies(), 1);
        assert_eq!((r.offset_gaps, r.offset_repeats, r.gap_notices), (1, 1, 1));
        assert_eq!((r.delivered, r.duplicates, r.lost), (4, 1, 0));
        assert!(!r.exact());
        assert_eq!(r.to_json()["offset_gaps"], 1);
    }

    #[test]
    fn protocol2_clean_stream_is_exact_and_protocol1_json_unchanged() {
        let t = Tracker::new(&[vec![5]], true);
        feed(&t, &[frame(5, 3, 0), frame(5, 4, 1)]);
        let r = t.finish_phase(&HashMap::from([((EPOCH_STRIDE, 5), 2)]));
        assert!(r.exact(), "{r:?}");
        let p1 = Tracker::new(&[vec![5]], false).finish_phase(&HashMap::new()).to_json();
        assert!(p1.get("offset_gaps").is_none());
    }
}
