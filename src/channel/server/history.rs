//! The broker's per-group positions and bounded history (protocol 2, `[history]`): each group
//! the broker has seen has an epoch (16 random hex characters) and the offset of its last
//! message; the last `history.size` messages of each group are kept for `history.ttl_ms`, all
//! groups together within `history.max_bytes`. Used by the broker process only
//! (`channel/server.rs`), which numbers messages here (`begin`, then `finish` once forwarded)
//! and answers HISTORY from here (`recover`).
//!
//! Life of a position: kept while the group has subscribers or kept messages ("active"), then
//! for `history.meta_ttl_ms` ("idle"); at most `history.max_groups` idle positions, the one idle
//! longest forgotten first. A forgotten group starts again at a new epoch and offset 0, so a
//! client that asks across that gets `recovered: false`.
//!
//! Expiry never scans: kept messages sit in one global queue in arrival order (a group's order
//! is the global order, so the oldest kept message overall is the oldest of its group), idle
//! groups in a second queue in the order they went idle. Entries a group dropped by other means
//! (its per-group size, a re-subscribe) stay behind as stale entries, skipped when met and
//! compacted away when they outnumber the live ones.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::channel::wire::PayloadKind;
use crate::config::HistorySettings;

/// Stale queue entries tolerated beyond the live ones before a queue is compacted.
const COMPACT_SLACK: usize = 1024;

/// A group's epoch: 16 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch([u8; 16]);

impl Epoch {
    fn from_u64(x: u64) -> Epoch {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = HEX[((x >> (60 - 4 * i)) & 0xf) as usize];
        }
        Epoch(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

/// Distinct epochs without a system call per group: splitmix64 over a counter from a random
/// start. The mix is a bijection, so epochs never repeat within one broker's life; the random
/// start makes them differ from every earlier broker's.
struct Epochs {
    state: u64,
}

impl Epochs {
    fn next(&mut self) -> Epoch {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Epoch::from_u64(z ^ (z >> 31))
    }
}

/// A kept message: its PUBLICATION frame as it was forwarded (so keeping it costs no copy),
/// with the payload from `payload_at` on.
#[derive(Debug, Clone)]
pub struct Kept {
    pub frame: Vec<u8>,
    pub payload_at: usize,
    pub kind: PayloadKind,
}

impl Kept {
    pub fn payload(&self) -> &[u8] {
        self.frame.get(self.payload_at..).unwrap_or_default()
    }
}

struct Group {
    name: Box<str>,
    /// Tells this group apart from a later one in the same slab slot, for the queues.
    serial: u64,
    epoch: Epoch,
    /// Offset of the group's last message (0: none yet under this epoch).
    top: u64,
    /// Kept messages, oldest first: offsets `top - ring.len() + 1 ..= top`.
    ring: VecDeque<Kept>,
    subscribed: bool,
    /// Set while idle: the stamp of its entry in the idle queue.
    idle: Option<u64>,
}

impl Group {
    /// Offset of the oldest kept message (`top + 1` when none is kept).
    fn first(&self) -> u64 {
        self.top + 1 - self.ring.len() as u64
    }
}

/// Where the global queue's entry points: a kept message of a group.
struct KeptRef {
    slot: usize,
    serial: u64,
    offset: u64,
    expires: Instant,
}

struct IdleRef {
    slot: usize,
    serial: u64,
    stamp: u64,
    expires: Instant,
}

/// What a HISTORY gets: the group's position and, when recoverable, the offsets to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub slot: usize,
    pub epoch: Epoch,
    pub top: u64,
    /// `Some(first)` when every message `first..=top` can be replayed (possibly none).
    pub replay_from: Option<u64>,
}

/// A message being numbered: from `begin` to `finish`.
#[derive(Debug, Clone, Copy)]
pub struct Numbering {
    pub slot: usize,
    pub offset: u64,
}

pub struct History {
    size: usize,
    ttl: Duration,
    max_bytes: usize,
    max_groups: usize,
    meta_ttl: Duration,
    by_name: HashMap<Box<str>, usize>,
    groups: Slab<Group>,
    kept_order: VecDeque<KeptRef>,
    idle_order: VecDeque<IdleRef>,
    /// Live entries of the two queues (the rest are stale).
    kept: usize,
    idle: usize,
    bytes: usize,
    next_serial: u64,
    epochs: Epochs,
}

impl History {
    /// An empty history under `settings`; `seed` makes the epochs (random in the broker).
    pub fn new(settings: &HistorySettings, seed: u64) -> History {
        History {
            size: settings.size,
            ttl: Duration::from_millis(settings.ttl_ms),
            max_bytes: settings.max_bytes,
            max_groups: settings.max_groups,
            meta_ttl: Duration::from_millis(settings.meta_ttl_ms),
            by_name: HashMap::new(),
            groups: Slab::new(),
            kept_order: VecDeque::new(),
            idle_order: VecDeque::new(),
            kept: 0,
            idle: 0,
            bytes: 0,
            next_serial: 0,
            epochs: Epochs { state: seed },
        }
    }

    /// Whether messages are kept at all (`history.size` > 0): if not, `finish` takes none.
    pub fn keeps(&self) -> bool {
        self.size > 0
    }

    /// Positions kept now.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Messages kept now.
    pub fn messages(&self) -> usize {
        self.kept
    }

    /// Bytes of the messages kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn slot(&mut self, group: &str) -> usize {
        if let Some(&slot) = self.by_name.get(group) {
            return slot;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let slot = self.groups.insert(Group {
            name: group.into(),
            serial,
            epoch: self.epochs.next(),
            top: 0,
            ring: VecDeque::new(),
            subscribed: false,
            idle: None,
        });
        self.by_name.insert(group.into(), slot);
        slot
    }

    /// Gives the next message of `group` its offset (creating the group's position).
    /// `finish` must follow before anything else touches the history.
    pub fn begin(&mut self, group: &str) -> Numbering {
        let slot = self.slot(group);
        self.begin_at(slot)
    }

    /// `begin` for the group at `slot` (as `subscribed` returned it; valid while the group
    /// has subscribers).
    pub fn begin_at(&mut self, slot: usize) -> Numbering {
        let g = &mut self.groups[slot];
        g.top += 1;
        // The ring holds `first..=top`: the new offset has no kept message (yet), so what was
        // kept stays addressable only if this message is kept too; `finish` restores that.
        Numbering { slot, offset: g.top }
    }

    /// Keeps the message numbered by `begin` (`None`: not kept, as when `size` is 0), then
    /// applies the bounds.
    pub fn finish(&mut self, n: Numbering, kept: Option<Kept>, now: Instant) {
        let g = &mut self.groups[n.slot];
        match kept.filter(|_| self.size > 0) {
            Some(kept) => {
                self.bytes += kept.frame.len();
                self.kept += 1;
                g.ring.push_back(kept);
                self.kept_order.push_back(KeptRef {
                    slot: n.slot,
                    serial: g.serial,
                    offset: n.offset,
                    expires: now + self.ttl,
                });
                if g.ring.len() > self.size {
                    if let Some(old) = g.ring.pop_front() {
                        self.bytes -= old.frame.len();
                        self.kept -= 1;
                    }
                }
                // Active from here on: the bound below must not forget a group it just kept in.
                self.settle(n.slot, now);
            }
            None => {
                // A message not kept breaks the run: nothing before it can be replayed.
                let dropped = g.ring.len();
                let freed: usize = g.ring.drain(..).map(|k| k.frame.len()).sum();
                self.bytes -= freed;
                self.kept -= dropped;
            }
        }
        while self.bytes > self.max_bytes {
            if !self.drop_oldest(now) {
                break;
            }
        }
        // The bounds above never forget this group (it went idle last, if at all), but a
        // missing slot must not panic either.
        if self.groups.contains(n.slot) {
            self.settle(n.slot, now);
        }
        self.compact();
    }

    /// `group` has subscribers now (its position is made if missing); returns its slot, which
    /// stays valid while it has subscribers (an active group is never forgotten).
    pub fn subscribed(&mut self, group: &str, now: Instant) -> usize {
        let slot = self.slot(group);
        self.groups[slot].subscribed = true;
        self.settle(slot, now);
        slot
    }

    /// `group` has no subscribers any more: its position goes idle once nothing is kept.
    pub fn unsubscribed(&mut self, group: &str, now: Instant) {
        if let Some(&slot) = self.by_name.get(group) {
            self.groups[slot].subscribed = false;
            self.settle(slot, now);
            self.compact();
        }
    }

    /// The answer to HISTORY for `group` (creating its position): `since` and `limit` (already
    /// capped by `max_recover`) decide whether the messages after `since` can be replayed.
    pub fn recover(&mut self, group: &str, since: Option<(&str, u64)>, limit: u64, now: Instant) -> Answer {
        let slot = self.slot(group);
        self.settle(slot, now);
        let g = &self.groups[slot];
        let replay_from = since.and_then(|(epoch, offset)| {
            let ok = epoch == g.epoch.as_str()
                && offset <= g.top
                && g.top - offset <= limit
                && (offset == g.top || g.first() <= offset + 1);
            ok.then_some(offset + 1)
        });
        Answer { slot, epoch: g.epoch, top: g.top, replay_from }
    }

    /// The kept messages of the group at `slot` from offset `from` on, oldest first.
    pub fn kept_from(&self, slot: usize, from: u64) -> impl Iterator<Item = (u64, &Kept)> + '_ {
        let g = self.groups.get(slot);
        let first = g.map_or(0, Group::first);
        let skip = from.saturating_sub(first) as usize;
        g.into_iter()
            .flat_map(move |g| g.ring.iter().skip(skip))
            .enumerate()
            .map(move |(i, k)| (first + skip as u64 + i as u64, k))
    }

    /// The position of `group` if the broker has one: its epoch and last offset.
    #[cfg(test)]
    pub fn position(&self, group: &str) -> Option<(Epoch, u64)> {
        let g = &self.groups[*self.by_name.get(group)?];
        Some((g.epoch, g.top))
    }

    /// When `expire` has something to do next (possibly a stale entry to skip).
    pub fn next_expiry(&self) -> Option<Instant> {
        let kept = self.kept_order.front().map(|k| k.expires);
        let idle = self.idle_order.front().map(|i| i.expires);
        kept.into_iter().chain(idle).min()
    }

    /// Drops the kept messages whose `ttl_ms` passed and forgets the positions idle for
    /// `meta_ttl_ms`.
    pub fn expire(&mut self, now: Instant) {
        loop {
            self.skip_stale_kept();
            if self.kept_order.front().is_none_or(|k| k.expires > now) {
                break;
            }
            self.drop_oldest(now);
        }
        while let Some(front) = self.idle_order.front() {
            if front.expires > now {
                break;
            }
            self.forget_front_idle();
        }
        self.compact();
    }

    /// Removes the stale entries at the front of the kept queue.
    fn skip_stale_kept(&mut self) {
        while let Some(entry) = self.kept_order.front() {
            let live = self
                .groups
                .get(entry.slot)
                .is_some_and(|g| g.serial == entry.serial && !g.ring.is_empty() && entry.offset == g.first());
            if live {
                return;
            }
            self.kept_order.pop_front();
        }
    }

    /// Drops the oldest kept message of all; false when none is kept.
    fn drop_oldest(&mut self, now: Instant) -> bool {
        self.skip_stale_kept();
        let Some(entry) = self.kept_order.pop_front() else { return false };
        if let Some(old) = self.groups[entry.slot].ring.pop_front() {
            self.bytes -= old.frame.len();
            self.kept -= 1;
        }
        self.settle(entry.slot, now);
        true
    }

    /// Forgets the group at the front of the idle queue (skipping stale entries).
    fn forget_front_idle(&mut self) {
        let Some(entry) = self.idle_order.pop_front() else { return };
        let live = self.groups.get(entry.slot).is_some_and(|g| g.serial == entry.serial && g.idle == Some(entry.stamp));
        if live {
            let g = self.groups.remove(entry.slot);
            self.by_name.remove(&g.name);
            self.idle -= 1;
        }
    }

    /// Puts the group at `slot` in or out of the idle queue as its state says, and keeps at
    /// most `max_groups` idle.
    fn settle(&mut self, slot: usize, now: Instant) {
        let g = &mut self.groups[slot];
        let idle = !g.subscribed && g.ring.is_empty();
        match (idle, g.idle) {
            (true, None) => {
                let stamp = self.next_serial;
                self.next_serial += 1;
                g.idle = Some(stamp);
                self.idle_order.push_back(IdleRef { slot, serial: g.serial, stamp, expires: now + self.meta_ttl });
                self.idle += 1;
                while self.idle > self.max_groups {
                    self.forget_front_idle();
                }
            }
            (false, Some(_)) => {
                g.idle = None;
                self.idle -= 1;
            }
            _ => {}
        }
    }

    /// Drops the stale entries of a queue once they outnumber the live ones (plus a slack), so
    /// a busy group trimmed by its size does not grow the queue without bound.
    fn compact(&mut self) {
        if self.kept_order.len() > 2 * self.kept + COMPACT_SLACK {
            let groups = &self.groups;
            self.kept_order.retain(|e| {
                groups.get(e.slot).is_some_and(|g| g.serial == e.serial && !g.ring.is_empty() && e.offset >= g.first())
            });
        }
        if self.idle_order.len() > 2 * self.idle + COMPACT_SLACK {
            let groups = &self.groups;
            self.idle_order
                .retain(|e| groups.get(e.slot).is_some_and(|g| g.serial == e.serial && g.idle == Some(e.stamp)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(size: usize, max_bytes: usize, max_groups: usize) -> HistorySettings {
        HistorySettings { size, ttl_ms: 1000, max_bytes, max_recover: 1000, max_groups, meta_ttl_ms: 5000 }
    }

    fn kept(payload: &[u8]) -> Option<Kept> {
        Some(Kept { frame: payload.to_vec(), payload_at: 0, kind: PayloadKind::Text })
    }

    fn publish(h: &mut History, group: &str, payload: &[u8], now: Instant) -> u64 {
        let n = h.begin(group);
        let k = if h.keeps() { kept(payload) } else { None };
        h.finish(n, k, now);
        n.offset
    }

    fn replay(h: &mut History, group: &str, since: Option<(&str, u64)>, limit: u64, now: Instant) -> Option<Vec<u64>> {
        let a = h.recover(group, since, limit, now);
        a.replay_from.map(|from| h.kept_from(a.slot, from).map(|(o, _)| o).collect())
    }

    #[test]
    fn epochs_are_hex_and_distinct() {
        let mut e = Epochs { state: 42 };
        let (a, b) = (e.next(), e.next());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(Epoch::from_u64(0xab).as_str(), "00000000000000ab");
    }

    #[test]
    fn offsets_count_per_group_and_size_bounds_the_ring() {
        let now = Instant::now();
        let mut h = History::new(&settings(3, 1 << 20, 10), 1);
        assert_eq!((1..=5).map(|_| publish(&mut h, "a", b"x", now)).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(publish(&mut h, "b", b"y", now), 1, "each group counts on its own");
        assert_eq!(h.messages(), 4);
        let epoch = h.position("a").unwrap().0;
        let e = epoch.as_str();
        assert_eq!(replay(&mut h, "a", Some((e, 2)), 100, now), Some(vec![3, 4, 5]));
        assert_eq!(replay(&mut h, "a", Some((e, 1)), 100, now), None, "offset 2 is no longer kept");
        assert_eq!(replay(&mut h, "a", Some((e, 5)), 100, now), Some(vec![]), "up to date");
        assert_eq!(replay(&mut h, "a", Some((e, 6)), 100, now), None, "ahead of the group");
        assert_eq!(replay(&mut h, "a", Some((e, 3)), 1, now), None, "more than the limit");
        assert_eq!(replay(&mut h, "a", Some((e, 4)), 1, now), Some(vec![5]));
        assert_eq!(replay(&mut h, "a", Some(("0000000000000000", 4)), 100, now), None, "another epoch");
        assert_eq!(replay(&mut h, "a", None, 100, now), None);
        let a = h.recover("new", None, 100, now);
        assert_eq!((a.top, a.replay_from), (0, None), "HISTORY creates the position");
        assert_ne!(a.epoch, epoch);
    }

    #[test]
    fn size_zero_numbers_but_keeps_nothing() {
        let now = Instant::now();
        let mut h = History::new(&settings(0, 1 << 20, 10), 1);
        assert!(!h.keeps());
        assert_eq!(publish(&mut h, "a", b"x", now), 1);
        assert_eq!(publish(&mut h, "a", b"x", now), 2);
        assert_eq!(h.messages(), 0);
        let e = h.position("a").unwrap().0;
        assert_eq!(replay(&mut h, "a", Some((e.as_str(), 2)), 100, now), Some(vec![]));
        assert_eq!(replay(&mut h, "a", Some((e.as_str(), 1)), 100, now), None);
    }

    #[test]
    fn ttl_drops_messages_then_the_idle_position() {
        let t0 = Instant::now();
        let mut h = History::new(&settings(10, 1 << 20, 10), 1);
        publish(&mut h, "a", b"x", t0);
        publish(&mut h, "a", b"x", t0 + Duration::from_millis(500));
        assert_eq!(h.next_expiry(), Some(t0 + Duration::from_secs(1)));
        h.expire(t0 + Duration::from_millis(1000));
        assert_eq!(h.messages(), 1, "the first expired");
        h.expire(t0 + Duration::from_millis(1500));
        assert_eq!((h.messages(), h.bytes()), (0, 0));
        let (epoch, top) = h.position("a").unwrap();
        assert_eq!(top, 2, "the position outlives its messages");
        h.expire(t0 + Duration::from_millis(6499));
        assert_eq!(h.position("a"), Some((epoch, 2)));
        h.expire(t0 + Duration::from_millis(6500));
        assert_eq!(h.position("a"), None, "forgotten meta_ttl_ms after it went idle");
        assert_eq!(publish(&mut h, "a", b"x", t0 + Duration::from_secs(7)), 1);
        assert_ne!(h.position("a").unwrap().0, epoch, "a new epoch");
    }

    #[test]
    fn a_subscribed_group_keeps_its_position() {
        let t0 = Instant::now();
        let mut h = History::new(&settings(0, 1 << 20, 10), 1);
        h.subscribed("a", t0);
        publish(&mut h, "a", b"x", t0);
        h.expire(t0 + Duration::from_secs(60));
        assert_eq!(h.position("a").map(|p| p.1), Some(1));
        h.unsubscribed("a", t0 + Duration::from_secs(60));
        h.expire(t0 + Duration::from_secs(64));
        assert!(h.position("a").is_some());
        h.expire(t0 + Duration::from_secs(65));
        assert!(h.position("a").is_none());
    }

    #[test]
    fn max_bytes_drops_the_oldest_across_groups() {
        let now = Instant::now();
        let mut h = History::new(&settings(10, 10, 10), 1);
        publish(&mut h, "a", b"aaaa", now);
        publish(&mut h, "b", b"bbbb", now);
        publish(&mut h, "a", b"aaaa", now);
        assert_eq!((h.messages(), h.bytes()), (2, 8));
        let e = h.position("a").unwrap().0;
        assert_eq!(replay(&mut h, "a", Some((e.as_str(), 1)), 9, now), Some(vec![2]));
        assert_eq!(replay(&mut h, "a", Some((e.as_str(), 0)), 9, now), None);
        publish(&mut h, "c", b"cccccccccccc", now);
        assert_eq!((h.messages(), h.bytes()), (0, 0), "a message over max_bytes is not kept either");
    }

    #[test]
    fn max_groups_forgets_the_longest_idle() {
        let t0 = Instant::now();
        let mut h = History::new(&settings(0, 1 << 20, 2), 1);
        publish(&mut h, "a", b"x", t0);
        publish(&mut h, "b", b"x", t0);
        h.subscribed("s", t0);
        assert_eq!(h.groups(), 3, "a subscribed group does not count");
        publish(&mut h, "c", b"x", t0);
        assert!(h.position("a").is_none() && h.position("b").is_some() && h.position("c").is_some());
        h.subscribed("b", t0);
        h.unsubscribed("b", t0);
        publish(&mut h, "d", b"x", t0);
        assert!(h.position("c").is_none(), "b went idle again after c");
        assert!(h.position("b").is_some() && h.position("d").is_some() && h.position("s").is_some());
    }

    #[test]
    fn stale_entries_are_compacted() {
        let now = Instant::now();
        let mut h = History::new(&settings(1, 1 << 30, 10), 1);
        for _ in 0..10_000 {
            publish(&mut h, "busy", b"x", now);
        }
        assert_eq!(h.messages(), 1);
        assert!(h.kept_order.len() <= 2 + COMPACT_SLACK, "{} entries", h.kept_order.len());
        for _ in 0..10_000 {
            h.subscribed("flap", now);
            h.unsubscribed("flap", now);
        }
        assert!(h.idle_order.len() <= 4 + COMPACT_SLACK, "{} entries", h.idle_order.len());
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        const GROUPS: [&str; 3] = ["a", "b", "c"];

        #[derive(Debug, Clone)]
        enum Op {
            Publish(usize, usize),
            Subscribe(usize),
            Unsubscribe(usize),
            /// since = top - back (None when back is None), own epoch or not, limit.
            History(usize, Option<u64>, bool, u64),
            Advance(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..3usize, 1..20usize).prop_map(|(g, n)| Op::Publish(g, n)),
                1 => (0..3usize).prop_map(Op::Subscribe),
                1 => (0..3usize).prop_map(Op::Unsubscribe),
                3 => (0..3usize, proptest::option::of(0..8u64), any::<bool>(), 0..6u64)
                    .prop_map(|(g, b, e, l)| Op::History(g, b, e, l)),
                2 => (0..40u64).prop_map(Op::Advance),
            ]
        }

        #[derive(Default)]
        struct MGroup {
            top: u64,
            /// (offset, payload, time kept, arrival number)
            kept: VecDeque<(u64, Vec<u8>, u64, u64)>,
            subscribed: bool,
            idle: Option<(u64, u64)>,
            epoch: Option<Epoch>,
        }

        struct Model {
            s: HistorySettings,
            groups: BTreeMap<&'static str, MGroup>,
            counter: u64,
        }

        impl Model {
            fn settle(&mut self, g: &str, now: u64) {
                let Some(m) = self.groups.get_mut(g) else { return };
                let idle = !m.subscribed && m.kept.is_empty();
                if idle && m.idle.is_none() {
                    m.idle = Some((self.counter, now));
                    self.counter += 1;
                    loop {
                        let idle: Vec<(u64, &str)> =
                            self.groups.iter().filter_map(|(n, m)| m.idle.map(|i| (i.0, *n))).collect();
                        if idle.len() <= self.s.max_groups {
                            break;
                        }
                        let oldest = idle.iter().min().unwrap().1.to_owned();
                        self.groups.remove(oldest.as_str());
                    }
                } else if !idle {
                    m.idle = None;
                }
            }

            fn drop_oldest(&mut self, now: u64) -> bool {
                let oldest = self.groups.iter().filter_map(|(n, m)| m.kept.front().map(|k| (k.3, *n))).min();
                let Some((_, g)) = oldest else { return false };
                self.groups.get_mut(g).unwrap().kept.pop_front();
                self.settle(g, now);
                true
            }

            fn bytes(&self) -> usize {
                self.groups.values().flat_map(|m| m.kept.iter()).map(|k| k.1.len()).sum()
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
            #[test]
            fn the_ring_matches_a_simple_model(
                size in 0..5usize, max_bytes in 0..80usize, max_groups in 1..3usize,
                ttl in 1..60u64, meta_ttl in 1..60u64, ops in proptest::collection::vec(op(), 1..80)
            ) {
                let s = HistorySettings { size, ttl_ms: ttl, max_bytes, max_recover: 1000, max_groups, meta_ttl_ms: meta_ttl };
                let mut h = History::new(&s, 7);
                let mut m = Model { s, groups: BTreeMap::new(), counter: 0 };
                let t0 = Instant::now();
                let mut now = 0u64;
                let at = |t: u64| t0 + Duration::from_millis(t);
                for op in ops {
                    match op {
                        Op::Publish(g, n) => {
                            let name = GROUPS[g];
                            let payload = vec![g as u8; n];
                            let offset = publish(&mut h, name, &payload, at(now));
                            let mg = m.groups.entry(name).or_default();
                            mg.top += 1;
                            prop_assert_eq!(offset, mg.top);
                            if size > 0 {
                                mg.kept.push_back((mg.top, payload, now, m.counter));
                                m.counter += 1;
                                if mg.kept.len() > size { mg.kept.pop_front(); }
                                m.settle(name, now);
                            }
                            while m.bytes() > max_bytes && m.drop_oldest(now) {}
                            m.settle(name, now);
                        }
                        Op::Subscribe(g) => {
                            h.subscribed(GROUPS[g], at(now));
                            m.groups.entry(GROUPS[g]).or_default().subscribed = true;
                            m.settle(GROUPS[g], now);
                        }
                        Op::Unsubscribe(g) => {
                            h.unsubscribed(GROUPS[g], at(now));
                            if let Some(mg) = m.groups.get_mut(GROUPS[g]) { mg.subscribed = false; }
                            m.settle(GROUPS[g], now);
                        }
                        Op::History(g, back, own, limit) => {
                            let name = GROUPS[g];
                            let known = m.groups.get(name).and_then(|mg| mg.epoch);
                            let epoch = known.filter(|_| own).map_or("ffffffffffffffff".to_owned(), |e| e.as_str().to_owned());
                            let top = m.groups.get(name).map_or(0, |mg| mg.top);
                            let since = back.map(|b| (epoch.as_str(), top.wrapping_sub(b).min(top + 1)));
                            let a = h.recover(name, since, limit, at(now));
                            m.groups.entry(name).or_default();
                            m.settle(name, now);
                            let mg = &m.groups[name];
                            prop_assert_eq!(a.top, mg.top);
                            let expect = since.and_then(|(e, o)| {
                                let first = mg.kept.front().map_or(mg.top + 1, |k| k.0);
                                (e == a.epoch.as_str() && o <= mg.top && mg.top - o <= limit && (o == mg.top || first <= o + 1))
                                    .then(|| mg.kept.iter().filter(|k| k.0 > o).map(|k| (k.0, k.1.clone())).collect::<Vec<_>>())
                            });
                            let got = a.replay_from.map(|from| h.kept_from(a.slot, from).map(|(o, k)| (o, k.payload().to_vec())).collect::<Vec<_>>());
                            prop_assert_eq!(got, expect);
                        }
                        Op::Advance(dt) => {
                            now += dt;
                            h.expire(at(now));
                            loop {
                                let due = m.groups.values().filter_map(|mg| mg.kept.front()).filter(|k| k.2 + ttl <= now).map(|k| k.3).min();
                                if due.is_none() || !m.drop_oldest(now) { break; }
                            }
                            let gone: Vec<&str> = m.groups.iter().filter(|(_, mg)| mg.idle.is_some_and(|i| i.1 + meta_ttl <= now)).map(|(n, _)| *n).collect();
                            for g in gone { m.groups.remove(g); }
                        }
                    }
                    // The positions, epochs and kept messages agree after every step.
                    for name in GROUPS {
                        let pos = h.position(name);
                        match m.groups.get_mut(name) {
                            None => prop_assert!(pos.is_none(), "{} should be forgotten", name),
                            Some(mg) => {
                                let (epoch, top) = pos.expect("a position the model keeps");
                                prop_assert_eq!(top, mg.top);
                                prop_assert_eq!(*mg.epoch.get_or_insert(epoch), epoch, "the epoch of {} changed", name);
                            }
                        }
                    }
                    let kept: usize = m.groups.values().map(|mg| mg.kept.len()).sum();
                    prop_assert_eq!((h.messages(), h.bytes()), (kept, m.bytes()));
                }
            }
        }
    }
}
