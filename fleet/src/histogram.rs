//! Latency histograms with fixed, documented bucket bounds, so histograms from many kiosks add
//! up to the fleet's and percentiles can be read from the sum.

use serde::{Deserialize, Serialize};

/// Upper bounds of the buckets in milliseconds (the last bucket is everything above the last
/// bound). Roughly 25% apart from 10 ms to 5 minutes: a percentile read from a histogram is
/// within one bucket's width of the exact value.
pub const BOUNDS_MS: [u64; 48] = [
    10, 13, 16, 20, 25, 31, 39, 49, 61, 76, 95, 119, 149, 186, 233, 291, 364, 455, 569, 711, 889,
    1111, 1389, 1736, 2170, 2713, 3391, 4239, 5298, 6623, 8279, 10348, 12935, 16169, 20212, 25265,
    31581, 39476, 49345, 61681, 77101, 96377, 120471, 150589, 188236, 235295, 294119, 367649,
];

/// Counts per bucket of [`BOUNDS_MS`] plus one overflow bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// `counts[i]` values were `<= BOUNDS_MS[i]` (and above the bound before); the last entry
    /// counts the values above every bound.
    pub counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BOUNDS_MS.len() + 1],
        }
    }
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, ms: u64) {
        let bucket = BOUNDS_MS.partition_point(|&b| b < ms);
        self.fix_len();
        self.counts[bucket] += 1;
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another histogram's counts (a kiosk's into the fleet's).
    pub fn merge(&mut self, other: &Histogram) {
        self.fix_len();
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// The `q` quantile (0..=1) in milliseconds, interpolated linearly inside its bucket;
    /// `None` when empty. Values above the last bound read as the last bound.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the wanted value, 1-based, as in the nearest-rank definition.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut below = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            if below + count >= rank {
                let Some(&upper) = BOUNDS_MS.get(i) else {
                    return BOUNDS_MS.last().copied();
                };
                let lower = if i == 0 { 0 } else { BOUNDS_MS[i - 1] };
                let within = (rank - below) as f64 / count as f64;
                return Some(lower + ((upper - lower) as f64 * within).round() as u64);
            }
            below += count;
        }
        BOUNDS_MS.last().copied()
    }

    fn fix_len(&mut self) {
        self.counts.resize(BOUNDS_MS.len() + 1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_bucket_whose_bound_covers_them() {
        let mut h = Histogram::default();
        for ms in [0, 10, 11, 367_649, 367_650] {
            h.record(ms);
        }
        assert_eq!(h.counts[0], 2, "0 and 10 ms");
        assert_eq!(h.counts[1], 1, "11 ms");
        assert_eq!(h.counts[47], 1, "the last bound");
        assert_eq!(h.counts[48], 1, "above every bound");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn quantiles_are_within_one_bucket_of_the_exact_value() {
        let mut h = Histogram::default();
        let values: Vec<u64> = (1..=1000).map(|i| i * 7).collect();
        for &v in &values {
            h.record(v);
        }
        for q in [0.5, 0.95, 0.99] {
            let exact = values[((q * 1000.0) as usize).saturating_sub(1)];
            let got = h.quantile(q).expect("not empty");
            let bucket = BOUNDS_MS.partition_point(|&b| b < exact);
            let width = BOUNDS_MS[bucket] - BOUNDS_MS[bucket - 1];
            assert!(
                exact.abs_diff(got) <= width,
                "q{q}: exact {exact}, got {got}"
            );
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_values() {
        let (mut a, mut b, mut all) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for v in 0..500u64 {
            let ms = v * v % 9000;
            if v % 3 == 0 { &mut a } else { &mut b }.record(ms);
            all.record(ms);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(a.quantile(0.95), all.quantile(0.95));
    }
}
