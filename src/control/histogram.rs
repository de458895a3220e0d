//! A small fixed-bucket histogram for the figures a worker samples on its delivery path
//! (`ProcessStats::publish_to_write_seconds`, `ProcessStats::send_queue_bytes`), sent with the
//! other figures over the status link to the master, and from there to the api child, which
//! renders it as a Prometheus histogram (api/metrics.rs).
//!
//! Values are integers in the unit of the bounds (microseconds, bytes): `observe` is a few
//! compares and two additions, no allocation and no float. The bounds travel in the JSON with
//! the counts, so a reader never needs to know which binary made them (during a reload the
//! api child and the workers may run different versions).

use serde::{Deserialize, Serialize};

/// Upper bounds (inclusive, microseconds) of `publish_to_write_seconds`: 50 µs to 10 s in
/// 1-2.5-5 steps, so `histogram_quantile` is meaningful from a quiet loopback (tens of µs) to
/// a worker that falls behind (seconds).
pub const WRITE_DELAY_BOUNDS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Upper bounds (inclusive, bytes) of `send_queue_bytes`: one small frame (128 B) to 16 MiB
/// in steps of 4, the range of `limits.send_buffer_limit`.
pub const SEND_QUEUE_BOUNDS_BYTES: &[u64] =
    &[128, 512, 2_048, 8_192, 32_768, 131_072, 524_288, 2_097_152, 8_388_608, 16_777_216];

/// Counts of observed values per bucket, cumulative only when rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Histogram {
    /// Inclusive upper bound of each bucket but the last (`+Inf`), ascending.
    pub bounds: Vec<u64>,
    /// Observations per bucket (not cumulative): `bounds.len() + 1` entries, the last for
    /// values over every bound. Empty in a histogram nobody fills (`Default`).
    pub counts: Vec<u64>,
    /// Sum of every observed value, in the unit of the bounds.
    pub sum: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &[u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Histogram { bounds: bounds.to_vec(), counts: vec![0; bounds.len() + 1], sum: 0 }
    }

    /// Counts one value. Most values are small, so the scan from the smallest bound usually
    /// stops after a few compares.
    #[inline]
    pub fn observe(&mut self, value: u64) {
        let at = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get_mut(at) {
            *count += 1;
            self.sum = self.sum.wrapping_add(value);
        }
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether this histogram has buckets at all (workers' do; other processes send none).
    pub fn is_defined(&self) -> bool {
        !self.bounds.is_empty() && self.counts.len() == self.bounds.len() + 1
    }

    /// `(upper bound, count)` per bucket (not cumulative), `+Inf` last, bounds divided by
    /// `divisor` (1e6 turns microseconds into seconds; a division keeps 50 µs `5e-5`
    /// exactly where a product would print `4.9999999999999996e-5`).
    pub fn buckets(&self, divisor: f64) -> Vec<(f64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &n)| (self.bounds.get(i).map_or(f64::INFINITY, |&b| b as f64 / divisor), n))
            .collect()
    }

    /// Adds `other`'s counts (same bounds; two rows of one worker slot during a reload).
    /// Returns false, adding nothing, when the bounds differ.
    pub fn merge(&mut self, other: &Histogram) -> bool {
        if !other.is_defined() {
            return true;
        }
        if !self.is_defined() {
            *self = other.clone();
            return true;
        }
        if self.bounds != other.bounds {
            return false;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum = self.sum.wrapping_add(other.sum);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::new(&[10, 100]);
        for v in [0, 10, 11, 100, 101, u64::MAX / 2] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 2, 2]);
        assert_eq!(h.count(), 6);
        assert_eq!(h.buckets(10.0), vec![(1.0, 2), (10.0, 2), (f64::INFINITY, 2)]);
        assert_eq!(h.sum, 10 + 11 + 100 + 101 + u64::MAX / 2);
    }

    #[test]
    fn json_round_trip_and_old_rows_without_it() {
        let mut h = Histogram::new(WRITE_DELAY_BOUNDS_US);
        h.observe(70);
        let back: Histogram = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let empty: Histogram = serde_json::from_str("{}").unwrap();
        assert!(!empty.is_defined());
        let mut e = empty.clone();
        e.observe(5); // nothing to count into: no panic
        assert_eq!(e.count(), 0);
    }

    #[test]
    fn merging_needs_the_same_bounds() {
        let mut a = Histogram::new(&[1, 2]);
        let mut b = Histogram::new(&[1, 2]);
        a.observe(1);
        b.observe(3);
        assert!(a.merge(&b));
        assert_eq!((a.counts.clone(), a.sum), (vec![1, 0, 1], 4));
        assert!(!a.merge(&Histogram::new(&[5])));
        let mut none = Histogram::default();
        assert!(none.merge(&a));
        assert_eq!(none, a);
    }
}
