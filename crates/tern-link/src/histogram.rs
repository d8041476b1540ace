//! A bounded log-linear histogram of durations in microseconds (HDR-style, 1/16 relative
//! precision), fixed memory whatever the values.

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Values up to 2^40 µs (~12 days) are bucketed; larger ones land in the last bucket.
const MAX_EXP: usize = 40;
const BUCKETS: usize = SUB + (MAX_EXP - SUB_BITS as usize) * SUB;

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum_us: u128,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    if exp as usize >= MAX_EXP {
        return BUCKETS - 1;
    }
    let shift = exp - SUB_BITS;
    let sub = ((v >> shift) as usize) & (SUB - 1);
    SUB + (exp - SUB_BITS) as usize * SUB + sub
}

/// Lowest value that maps to bucket `i`.
fn lower_bound(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let exp = (i - SUB) / SUB + SUB_BITS as usize;
    let sub = (i - SUB) % SUB;
    ((SUB + sub) as u64) << (exp - SUB_BITS as usize)
}

/// Summary of a histogram as printed in stats and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Histogram {
    pub fn record(&mut self, value_us: u64) {
        self.counts[index(value_us)] += 1;
        self.total += 1;
        self.sum_us += u128::from(value_us);
        self.max_us = self.max_us.max(value_us);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Value at quantile `q` in [0, 1]: the lower bound of the bucket holding it
    /// (within 1/16 of the true value), or the exact maximum for q = 1.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return lower_bound(i).min(self.max_us);
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> HistogramSummary {
        HistogramSummary {
            count: self.total,
            mean_us: if self.total == 0 {
                0.0
            } else {
                self.sum_us as f64 / self.total as f64
            },
            p50_us: self.quantile(0.5),
            p90_us: self.quantile(0.9),
            p99_us: self.quantile(0.99),
            p999_us: self.quantile(0.999),
            max_us: self.max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotone_and_tight() {
        let mut prev = 0;
        for v in (0..1_000_000u64).step_by(7) {
            let i = index(v);
            assert!(i >= prev);
            prev = i;
            let lb = lower_bound(i);
            assert!(lb <= v, "v {v} lb {lb}");
            assert!((v - lb) as f64 <= v as f64 / SUB as f64, "v {v} lb {lb}");
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let mut h = Histogram::default();
        for v in 1..=10_000 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert!((4_700..=5_000).contains(&s.p50_us), "{s:?}");
        assert!((9_300..=9_900).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 10_000);
        assert!((s.mean_us - 5_000.5).abs() < 1e-6);
    }
}
