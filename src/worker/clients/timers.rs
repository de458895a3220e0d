//! The handshake and close timeouts of a worker's connections: a min-heap of deadlines on
//! the worker clock (`Clients::clock_ms`, milliseconds, wrapping).
//!
//! Sized for a connect storm: every accepted connection has a handshake timer until it
//! expires, so the heap briefly holds one entry per connection. An entry is 16 bytes (a
//! 4-byte deadline, not a 16-byte `Instant`), and the heap gives its capacity back once it
//! has emptied out, so idle connections do not pay for the storm that brought them
//! (docs/benchmarks.md, S8: user memory per idle connection).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

/// Longest delay a timer takes; later deadlines are brought forward to it. Half the range
/// of the wrapping clock: every pending deadline lies within it of every other one, so the
/// wrapping comparison below is a total order over the heap. (12 days; the longest
/// configurable duration is one day.)
const MAX_DELAY_MS: u32 = 1 << 30;

/// Capacity the heap keeps however empty it gets: shrinking is for after a storm, not for
/// the come and go of a few connections.
const KEEP_CAPACITY: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timer {
    /// Worker clock when due.
    at_ms: u32,
    /// The connection's slab key: a worker holds far fewer than 2^32 connections (each is a
    /// file descriptor).
    key: u32,
    /// The connection's id: the slab key is reused, the id is not.
    id: u64,
}

impl Ord for Timer {
    fn cmp(&self, other: &Timer) -> Ordering {
        // Wrapping: earlier when less than half the clock's range before (see MAX_DELAY_MS).
        (self.at_ms.wrapping_sub(other.at_ms) as i32)
            .cmp(&0)
            .then(self.key.cmp(&other.key))
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Timer) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
}

impl Timers {
    /// A timer for connection `id` in slab slot `key`, due `after` from worker clock `now_ms`.
    pub(crate) fn push(&mut self, now_ms: u32, after: Duration, key: usize, id: u64) {
        // Whole milliseconds, rounded up (the clock has no finer grain).
        let delay = u32::try_from(after.as_micros().div_ceil(1000)).unwrap_or(u32::MAX).min(MAX_DELAY_MS);
        self.heap.push(Reverse(Timer { at_ms: now_ms.wrapping_add(delay), key: key as u32, id }));
    }

    /// Takes out the earliest timer if it is due at `now_ms`: (slab key, connection id).
    pub(crate) fn pop_due(&mut self, now_ms: u32) -> Option<(usize, u64)> {
        let Reverse(first) = self.heap.peek()?;
        if (now_ms.wrapping_sub(first.at_ms) as i32) < 0 {
            return None;
        }
        let Reverse(timer) = self.heap.pop()?;
        Some((timer.key as usize, timer.id))
    }

    /// Milliseconds from `now_ms` until the earliest timer is due (0 if it is).
    pub(crate) fn next_in_ms(&self, now_ms: u32) -> Option<u32> {
        self.heap.peek().map(|Reverse(t)| (t.at_ms.wrapping_sub(now_ms) as i32).max(0) as u32)
    }

    /// Gives back capacity once the heap is mostly empty (after a connect storm has passed):
    /// shrinks to twice what is left when under a quarter is used, so it does not shrink and
    /// grow by turns.
    pub(crate) fn release_spare(&mut self) {
        let capacity = self.heap.capacity();
        if capacity > KEEP_CAPACITY && self.heap.len() * 4 < capacity {
            self.heap.shrink_to((self.heap.len() * 2).max(KEEP_CAPACITY));
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.heap.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_entry_is_16_bytes() {
        // Was 32 with an `Instant` deadline: at 100,000 connections the handshake timers
        // of a connect storm are 3 MB.
        assert_eq!(std::mem::size_of::<Reverse<Timer>>(), 16);
    }

    #[test]
    fn timers_fall_due_in_order_across_the_clock_wrap() {
        let mut timers = Timers::default();
        let now = u32::MAX - 5;
        timers.push(now, ms(20), 3, 30); // due at 14, past the wrap
        timers.push(now, ms(2), 1, 10); // due at MAX - 3
        timers.push(now, ms(10), 2, 20); // due at 4
        assert_eq!(timers.next_in_ms(now), Some(2));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(timers.pop_due(now.wrapping_add(2)), Some((1, 10)));
        assert_eq!(timers.pop_due(now.wrapping_add(2)), None);
        assert_eq!(timers.next_in_ms(now.wrapping_add(2)), Some(8));
        // Overdue timers are due at once.
        assert_eq!(timers.next_in_ms(100), Some(0));
        assert_eq!(timers.pop_due(100), Some((2, 20)));
        assert_eq!(timers.pop_due(100), Some((3, 30)));
        assert_eq!(timers.pop_due(100), None);
        assert_eq!(timers.next_in_ms(100), None);
    }

    #[test]
    fn a_delay_past_the_clock_range_is_capped() {
        let mut timers = Timers::default();
        timers.push(7, Duration::from_secs(100 * 86_400), 1, 1);
        timers.push(7, ms(5), 2, 2);
        assert_eq!(timers.next_in_ms(7), Some(5));
        assert_eq!(timers.pop_due(12), Some((2, 2)));
        assert_eq!(timers.next_in_ms(7), Some(MAX_DELAY_MS));
    }

    #[test]
    fn the_heap_gives_back_what_a_storm_took() {
        let mut timers = Timers::default();
        for key in 0..20_000 {
            timers.push(0, ms(10_000), key, key as u64);
        }
        timers.push(0, ms(50_000), 7, 7);
        let storm = timers.capacity();
        assert!(storm >= 20_001);
        timers.release_spare();
        assert_eq!(timers.capacity(), storm, "a full heap keeps its capacity");
        while timers.pop_due(10_000).is_some() {}
        timers.release_spare();
        assert_eq!(timers.capacity(), KEEP_CAPACITY, "one timer left: back to the floor");
        assert_eq!(timers.pop_due(50_000), Some((7, 7)));
    }
}
