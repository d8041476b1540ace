//! Profiles: bounded sliding windows of per-interval observations, their distribution
//! (histogram, percentiles) and their time series (AR(1) forecast, trend).
//!
//! Sandpiper keeps the last W = 200 observations of each metric per VM and per host; the
//! distribution profile estimates peaks (provisioning), the time-series profile feeds the
//! hotspot detector.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Largest window a profile may keep (samples). Configs asking for more are rejected by
/// [`crate::BalanceConfig::validate`]; the seed uses 200.
pub const MAX_WINDOW_SAMPLES: usize = 4096;

/// Largest number of histogram bins (bounds the distribution profile's memory).
pub const MAX_HISTOGRAM_BINS: usize = 1024;

/// A bounded sliding window of observations: pushing past `capacity` drops the oldest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    capacity: usize,
    samples: VecDeque<f64>,
    /// Observations dropped off the old end (a counter, for explanations and tests).
    dropped: u64,
}

impl Window {
    /// A window keeping at most `capacity` samples (clamped to 1..=[`MAX_WINDOW_SAMPLES`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_WINDOW_SAMPLES);
        Self {
            capacity,
            samples: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends one observation; non-finite values are stored as 0 (a broken sample must not
    /// poison means and forecasts).
    pub fn push(&mut self, v: f64) {
        let v = if v.is_finite() { v } else { 0.0 };
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
            self.dropped += 1;
        }
        self.samples.push_back(v);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The most recent observation.
    pub fn last(&self) -> Option<f64> {
        self.samples.back().copied()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = f64> + ExactSizeIterator + Clone + '_ {
        self.samples.iter().copied()
    }

    /// The `n` most recent observations, oldest first (fewer if the window is shorter).
    pub fn recent(&self, n: usize) -> Vec<f64> {
        let skip = self.samples.len().saturating_sub(n);
        self.samples.iter().skip(skip).copied().collect()
    }

    pub fn mean(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().sum::<f64>() / self.samples.len() as f64
    }

    pub fn variance(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        self.samples.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1) as f64
    }

    /// The `p`-th percentile (0..=100) by linear interpolation between order statistics.
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        percentile_of(&mut v, p)
    }

    /// The distribution profile: a histogram of the window normalized to probabilities.
    pub fn histogram(&self, bins: usize) -> Histogram {
        Histogram::from_samples(self.iter(), bins)
    }

    /// The AR(1) model of the window (eq. 5.1).
    pub fn ar1(&self) -> Ar1 {
        Ar1::fit(self)
    }

    /// Least-squares slope per interval over the `n` most recent observations (0 with fewer
    /// than 2).
    pub fn slope_per_interval(&self, n: usize) -> f64 {
        let ys = self.recent(n);
        let k = ys.len();
        if k < 2 {
            return 0.0;
        }
        let mx = (k - 1) as f64 / 2.0;
        let my = ys.iter().sum::<f64>() / k as f64;
        let (mut num, mut den) = (0.0, 0.0);
        for (i, y) in ys.iter().enumerate() {
            let dx = i as f64 - mx;
            num += dx * (y - my);
            den += dx * dx;
        }
        if den == 0.0 { 0.0 } else { num / den }
    }
}

/// Percentile (0..=100) of a slice, sorting it in place; 0 for an empty slice.
pub fn percentile_of(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let p = p.clamp(0.0, 100.0) / 100.0;
    let pos = p * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// A distribution profile: equal-width bins over `[min, max]`, normalized to sum to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    /// Probability of each bin; empty if there were no samples.
    pub probability: Vec<f64>,
}

impl Histogram {
    pub fn from_samples(samples: impl Iterator<Item = f64> + Clone, bins: usize) -> Self {
        let bins = bins.clamp(1, MAX_HISTOGRAM_BINS);
        let (mut min, mut max, mut n) = (f64::INFINITY, f64::NEG_INFINITY, 0usize);
        for v in samples.clone() {
            min = min.min(v);
            max = max.max(v);
            n += 1;
        }
        if n == 0 {
            return Self {
                min: 0.0,
                max: 0.0,
                probability: Vec::new(),
            };
        }
        let mut counts = vec![0u64; bins];
        let width = (max - min) / bins as f64;
        for v in samples {
            let i = if width > 0.0 {
                (((v - min) / width) as usize).min(bins - 1)
            } else {
                0
            };
            counts[i] += 1;
        }
        Self {
            min,
            max,
            probability: counts.iter().map(|c| *c as f64 / n as f64).collect(),
        }
    }

    /// The `p`-th percentile read off the histogram (upper edge of the bin where the
    /// cumulative probability reaches p): a conservative peak estimate.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.probability.is_empty() {
            return 0.0;
        }
        let target = p.clamp(0.0, 100.0) / 100.0;
        let width = (self.max - self.min) / self.probability.len() as f64;
        let mut cum = 0.0;
        for (i, pr) in self.probability.iter().enumerate() {
            cum += pr;
            if cum + 1e-12 >= target {
                return self.min + width * (i + 1) as f64;
            }
        }
        self.max
    }
}

/// AR(1): û_{k+1} = μ + φ·(u_k − μ) (eq. 5.1). φ is the lag-1 autocorrelation of the
/// window (the text does not say how φ is estimated; this is the standard estimator),
/// clamped to [-1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ar1 {
    pub mu: f64,
    pub phi: f64,
    pub last: f64,
}

impl Ar1 {
    pub fn fit(w: &Window) -> Self {
        let mu = w.mean();
        let last = w.last().unwrap_or(0.0);
        let (mut num, mut den) = (0.0, 0.0);
        let mut prev: Option<f64> = None;
        for v in w.iter() {
            let d = v - mu;
            den += d * d;
            if let Some(p) = prev {
                num += (p - mu) * d;
            }
            prev = Some(v);
        }
        // A flat window is perfectly persistent: forecast = last value.
        let phi = if den > 1e-12 {
            (num / den).clamp(-1.0, 1.0)
        } else {
            1.0
        };
        Self { mu, phi, last }
    }

    /// The forecast `h` intervals ahead: μ + φ^h (u_k − μ).
    pub fn forecast(&self, h: u32) -> f64 {
        self.mu + self.phi.powi(h.min(i32::MAX as u32) as i32) * (self.last - self.mu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded_and_drops_oldest() {
        let mut w = Window::new(3);
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            w.push(v);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.dropped(), 2);
        assert_eq!(w.recent(5), vec![3.0, 4.0, 5.0]);
        assert_eq!(w.recent(2), vec![4.0, 5.0]);
        assert_eq!(Window::new(1_000_000).capacity(), MAX_WINDOW_SAMPLES);
    }

    #[test]
    fn non_finite_samples_become_zero() {
        let mut w = Window::new(4);
        w.push(f64::NAN);
        w.push(2.0);
        assert_eq!(w.mean(), 1.0);
    }

    #[test]
    fn percentiles_interpolate() {
        let mut w = Window::new(200);
        for i in 0..=100 {
            w.push(i as f64);
        }
        assert!((w.percentile(95.0) - 95.0).abs() < 1e-9);
        assert!((w.percentile(50.0) - 50.0).abs() < 1e-9);
        let h = w.histogram(10);
        assert!((h.probability.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let hp = h.percentile(95.0);
        assert!((95.0..=100.0).contains(&hp), "{hp}");
    }

    #[test]
    fn ar1_tracks_persistence_and_reverts_noise() {
        // A slow sine: strongly persistent, forecast stays near the last value.
        let mut w = Window::new(200);
        for i in 0..200 {
            w.push(0.5 + 0.3 * (i as f64 / 20.0).sin());
        }
        let m = w.ar1();
        assert!(m.phi > 0.9, "{}", m.phi);
        assert!((m.forecast(1) - m.last).abs() < 0.05);
        // Alternating noise: negative phi, forecast swings to the other side of the mean.
        let mut w = Window::new(200);
        for i in 0..200 {
            w.push(if i % 2 == 0 { 0.4 } else { 0.6 });
        }
        let m = w.ar1();
        assert!(m.phi < -0.9);
        assert!(m.forecast(1) < 0.45, "last 0.6 predicts ~0.4");
    }

    #[test]
    fn slope_of_a_ramp() {
        let mut w = Window::new(50);
        for i in 0..20 {
            w.push(0.1 + 0.02 * i as f64);
        }
        assert!((w.slope_per_interval(12) - 0.02).abs() < 1e-9);
    }
}
