//! Receiver-side accounting: every delivered payload is checked against the
//! receiving connection's groups and a per-(publisher, group) bitmap of sequence
//! numbers, so loss, duplicates, reordering and wrong-group deliveries are counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::sys::now_ns;
use crate::wire::Payload;

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
}

#[derive(Default, Clone, Copy)]
struct Counters {
    delivered: u64,
    duplicates: u64,
    wrong_group: u64,
    out_of_order: u64,
    stale: u64,
    malformed: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.wrong_group += o.wrong_group;
        self.out_of_order += o.out_of_order;
        self.stale += o.stale;
        self.malformed += o.malformed;
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
}

impl PhaseReport {
    /// No loss, no duplicate, no wrong group, nothing unparseable.
    pub fn exact(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.wrong_group == 0 && self.malformed == 0
    }

    pub fn p99_ms(&self) -> f64 {
        self.lat_us[2] as f64 / 1000.0
    }

    pub fn to_json(&self) -> Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "expected": self.expected, "delivered": self.delivered, "lost": self.lost,
            "duplicates": self.duplicates, "wrong_group": self.wrong_group,
            "out_of_order": self.out_of_order, "stale": self.stale, "malformed": self.malformed,
            "p50_ms": ms(self.lat_us[0]), "p90_ms": ms(self.lat_us[1]),
            "p99_ms": ms(self.lat_us[2]), "max_ms": ms(self.lat_us[3]),
        })
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 120 s, 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

impl Tracker {
    /// `groups[i]` are the groups connection `i` joins (empty for publishers).
    pub fn new(groups: &[Vec<u32>]) -> Tracker {
        let mut shards: Vec<Shard> =
            (0..SHARDS).map(|_| Shard { conns: Vec::new(), hist: new_hist(), c: Counters::default() }).collect();
        for (i, g) in groups.iter().enumerate() {
            shards[i % SHARDS].conns.push(Conn { groups: g.clone(), seen: HashMap::new() });
        }
        Tracker {
            shards: shards.into_iter().map(Mutex::new).collect(),
            epoch: AtomicU32::new(1),
            delivered: AtomicU64::new(0),
            progress: (0..groups.len()).map(|_| AtomicU64::new(0)).collect(),
            replies: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            conn_failures: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
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
        for &(s, e) in ranges {
            let Ok(text) = std::str::from_utf8(&buf[s..e]) else {
                c.malformed += 1;
                continue;
            };
            if text.starts_with('{') {
                self.on_control(text);
                continue;
            }
            let Some(p) = Payload::decode(text) else {
                c.malformed += 1;
                continue;
            };
            if p.publisher / EPOCH_STRIDE != self.epoch() {
                c.stale += 1;
                continue;
            }
            let state = &mut conns[conn / SHARDS];
            if !state.groups.contains(&p.group) {
                c.wrong_group += 1;
                continue;
            }
            let seen = state.seen.entry((p.publisher, p.group)).or_default();
            let (word, bit) = ((p.seq / 64) as usize, p.seq % 64);
            if seen.bits.len() <= word {
                seen.bits.resize(word + 1, 0);
            }
            if seen.bits[word] & (1 << bit) != 0 {
                c.duplicates += 1;
                continue;
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
    }

    fn on_control(&self, text: &str) {
        match serde_json::from_str::<Value>(text) {
            Ok(v) if v.get("id").is_some() && v.get("error").is_none() => {
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
        if !hist.is_empty() {
            r.lat_us =
                [hist.value_at_quantile(0.50), hist.value_at_quantile(0.90), hist.value_at_quantile(0.99), hist.max()];
        }
        r
    }
}
