//! The grace window of a fresh broker: for `channel.grace_ms` after it starts, it keeps a copy
//! of every message it forwards (at most `channel.grace_max_bytes`, oldest dropped first), so
//! that a peer re-subscribing late (an instance that reconnected after others already sent
//! again what the dead broker had not acknowledged) still gets them. Kept in arrival order and
//! indexed by group, so a replay touches only the messages of its group. The frames held are
//! PUBLICATIONs (they carry the offset each message got); the broker turns them into MESSAGE
//! for version-1 peers. Used by the broker process only (`channel/server.rs`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A message kept during the grace window.
struct Held {
    group: Box<str>,
    origin: u64,
    frame: Vec<u8>,
}

pub struct Grace {
    /// End of the window; `None` once it is over (or when `grace_ms` is 0).
    until: Option<Instant>,
    /// Messages in arrival order; `held[i]` has arrival number `first + i`.
    held: VecDeque<Held>,
    first: u64,
    /// Arrival numbers of each group's held messages, oldest first.
    by_group: HashMap<Box<str>, VecDeque<u64>>,
    bytes: usize,
    max_bytes: usize,
}

impl Grace {
    pub fn new(window: Duration, max_bytes: usize) -> Grace {
        Grace {
            until: (!window.is_zero()).then(|| Instant::now() + window),
            held: VecDeque::new(),
            first: 0,
            by_group: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// When the window ends, if it is still open.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    pub fn is_open(&self) -> bool {
        self.until.is_some()
    }

    /// Messages held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Keeps a copy of `frame` while the window is open; returns how many older messages were
    /// dropped to stay within `max_bytes`.
    pub fn hold(&mut self, group: &str, origin: u64, frame: &[u8]) -> u64 {
        if self.until.is_none() {
            return 0;
        }
        let number = self.first + self.held.len() as u64;
        self.by_group.entry(group.into()).or_default().push_back(number);
        self.held.push_back(Held { group: group.into(), origin, frame: frame.to_vec() });
        self.bytes += frame.len();
        let mut dropped = 0;
        while self.bytes > self.max_bytes {
            let Some(old) = self.held.pop_front() else { break };
            self.bytes -= old.frame.len();
            self.first += 1;
            // The oldest held message is the oldest of its group too.
            if let Some(numbers) = self.by_group.get_mut(&old.group) {
                numbers.pop_front();
                if numbers.is_empty() {
                    self.by_group.remove(&old.group);
                }
            }
            dropped += 1;
        }
        dropped
    }

    /// Ends the window once `now` is past it; returns how many messages it released then.
    pub fn expire(&mut self, now: Instant) -> Option<usize> {
        if self.until.is_none_or(|t| now < t) {
            return None;
        }
        let released = self.held.len();
        *self = Grace::new(Duration::ZERO, self.max_bytes);
        Some(released)
    }

    /// The held frames of `group`, oldest first, except those published by `except`.
    pub fn frames<'a>(&'a self, group: &str, except: Option<u64>) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.by_group
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|&n| self.held.get((n - self.first) as usize))
            .filter(move |h| Some(h.origin) != except)
            .map(|h| h.frame.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_by_group_in_order_and_bounded() {
        let mut g = Grace::new(Duration::from_secs(60), 30);
        g.hold("a", 1, b"a1--------");
        g.hold("b", 1, b"b1--------");
        g.hold("a", 2, b"a2--------");
        let a: Vec<&[u8]> = g.frames("a", None).collect();
        assert_eq!(a, [b"a1--------", b"a2--------"]);
        assert_eq!(g.frames("a", Some(2)).count(), 1, "a peer's own messages are not replayed");
        assert_eq!(g.hold("b", 1, b"b2--------"), 1, "the oldest is dropped for room");
        assert_eq!(g.frames("a", None).collect::<Vec<_>>(), [b"a2--------"]);
        assert_eq!(g.frames("b", None).count(), 2);
        assert_eq!(g.expire(Instant::now()), None);
        assert_eq!(g.expire(Instant::now() + Duration::from_secs(61)), Some(3));
        assert!(!g.is_open());
        assert_eq!(g.hold("a", 1, b"late"), 0);
        assert_eq!(g.frames("a", None).count(), 0);
    }
}
