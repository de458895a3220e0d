//! What the broker remembers of publishers that disconnected: the highest seq it numbered for
//! each origin, so that the publishes a worker sends again after reconnecting are known as
//! resends (not numbered, stored or forwarded twice). Kept like an idle group's position: for
//! `history.meta_ttl_ms`, at most `history.max_groups` origins, the longest gone forgotten
//! first. Used by the broker process only (`channel/server.rs`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Stale queue entries tolerated beyond the live ones before the queue is compacted.
const COMPACT_SLACK: usize = 1024;

pub struct Departed {
    /// origin -> (highest seq numbered, stamp of its queue entry).
    seqs: HashMap<u64, (u64, u64)>,
    /// (forget at, origin, stamp) in departure order; entries of origins that came back are
    /// stale (their stamp no longer matches).
    order: VecDeque<(Instant, u64, u64)>,
    ttl: Duration,
    max: usize,
    next_stamp: u64,
}

impl Departed {
    pub fn new(ttl: Duration, max: usize) -> Departed {
        Departed { seqs: HashMap::new(), order: VecDeque::new(), ttl, max, next_stamp: 0 }
    }

    /// Origin `origin` disconnected after the broker numbered its publishes up to `seq`.
    pub fn put(&mut self, origin: u64, seq: u64, now: Instant) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.seqs.insert(origin, (seq, stamp));
        self.order.push_back((now + self.ttl, origin, stamp));
        while self.seqs.len() > self.max {
            self.forget_front();
        }
        if self.order.len() > 2 * self.seqs.len() + COMPACT_SLACK {
            let seqs = &self.seqs;
            self.order.retain(|(_, origin, stamp)| seqs.get(origin).is_some_and(|s| s.1 == *stamp));
        }
    }

    /// Origin `origin` is back: the highest seq numbered for it, if remembered.
    pub fn take(&mut self, origin: u64) -> Option<u64> {
        self.seqs.remove(&origin).map(|s| s.0)
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|e| e.0)
    }

    /// Forgets the origins gone for the whole `ttl`.
    pub fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|e| e.0 <= now) {
            self.forget_front();
        }
    }

    fn forget_front(&mut self) {
        if let Some((_, origin, stamp)) = self.order.pop_front() {
            if self.seqs.get(&origin).is_some_and(|s| s.1 == stamp) {
                self.seqs.remove(&origin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_ttl_or_count() {
        let t0 = Instant::now();
        let mut d = Departed::new(Duration::from_secs(10), 2);
        d.put(1, 5, t0);
        assert_eq!(d.take(1), Some(5));
        assert_eq!(d.take(1), None, "taken back by its peer");
        d.put(1, 6, t0);
        d.put(2, 7, t0);
        d.put(3, 8, t0);
        assert_eq!(d.take(1), None, "the longest gone is forgotten past the count");
        d.expire(t0 + Duration::from_secs(10));
        assert_eq!((d.take(2), d.take(3)), (None, None), "forgotten after the ttl");
    }
}
