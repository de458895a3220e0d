//! Duplicate filtering for group messages arriving at a worker, whichever bus carried them
//! (channel broker or Redis): a publish resent after a reconnect, or replayed by a fresh
//! broker, carries the same (origin, seq) and is dropped here. Owned by `worker::bus::Bus`.

use std::collections::HashMap;

/// Most origins remembered; the least recently heard from is forgotten beyond that.
const MAX_ORIGINS: usize = 4096;
/// Sequence numbers remembered behind the highest one seen, per origin.
const WINDOW: u64 = 1024;

/// Per-origin memory of the sequence numbers already delivered: the highest one plus a
/// bitmap of the `WINDOW` before it, so a message resent after a broker restart (or held by a
/// fresh broker and delivered a little out of order) is recognised and dropped.
#[derive(Default)]
pub struct Dedupe {
    origins: HashMap<u64, Seen>,
    tick: u64,
    /// Messages dropped as already delivered.
    pub duplicates: u64,
}

struct Seen {
    highest: u64,
    /// Bit i set: `highest - i` was delivered.
    bits: [u64; (WINDOW / 64) as usize],
    last_used: u64,
}

impl Dedupe {
    /// True the first time `(origin, seq)` is offered; false for a repeat (or one too old to tell).
    pub fn first_time(&mut self, origin: u64, seq: u64) -> bool {
        self.tick += 1;
        if !self.origins.contains_key(&origin) && self.origins.len() >= MAX_ORIGINS {
            if let Some(oldest) = self.origins.iter().min_by_key(|(_, s)| s.last_used).map(|(o, _)| *o) {
                self.origins.remove(&oldest);
            }
        }
        let seen =
            self.origins.entry(origin).or_insert(Seen { highest: 0, bits: [0; (WINDOW / 64) as usize], last_used: 0 });
        seen.last_used = self.tick;
        let fresh = seen.offer(seq);
        if !fresh {
            self.duplicates += 1;
        }
        fresh
    }
}

impl Seen {
    fn offer(&mut self, seq: u64) -> bool {
        if seq > self.highest {
            self.shift(seq - self.highest);
            self.highest = seq;
            self.bits[0] |= 1;
            return true;
        }
        let back = self.highest - seq;
        if back >= WINDOW {
            return false;
        }
        let (word, bit) = ((back / 64) as usize, back % 64);
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        fresh
    }

    /// Moves the window forward by `by` positions (bit i becomes bit i + by).
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; (WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        let n = self.bits.len();
        for i in (0..n).rev() {
            let from = i.checked_sub(words);
            let mut v = from.map_or(0, |f| self.bits[f] << bits);
            if bits > 0 {
                if let Some(f) = i.checked_sub(words + 1) {
                    v |= self.bits[f] >> (64 - bits);
                }
            }
            self.bits[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Dedupe;

    #[test]
    fn repeats_are_dropped_in_order_or_not() {
        let mut d = Dedupe::default();
        assert!((1..=100).all(|s| d.first_time(7, s)));
        assert!((1..=100).all(|s| !d.first_time(7, s)), "a resend of all of them");
        assert!(d.first_time(8, 1), "origins are independent");
        // Out of order within the window: 300 before 200..299.
        assert!(d.first_time(7, 300));
        assert!((200..300).all(|s| d.first_time(7, s)));
        assert!(!d.first_time(7, 250));
        // Far beyond: the window moves on; very old numbers count as seen.
        assert!(d.first_time(7, 100_000));
        assert!(!d.first_time(7, 5));
        assert_eq!(d.duplicates, 102);
    }
}
