//! The controller's parameters, with Sandpiper's defaults (§5.4, §5.5, §5.7.10), loadable
//! from TOML. Every field has a default, so a TOML file names only what it changes.

use serde::{Deserialize, Serialize};

use crate::BalanceError;
use crate::profile::{MAX_HISTOGRAM_BINS, MAX_WINDOW_SAMPLES};

/// Largest concurrency cap a plan may carry (migrations running at once).
pub const MAX_CONCURRENT_STEPS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// Measurement interval I (seconds). Seed: 10 s.
    pub interval_s: f64,
    /// Profile window W (samples). Seed: the last 200 measurements.
    pub window_samples: usize,
    /// Histogram bins of a distribution profile.
    pub histogram_bins: usize,
    /// Host CPU threshold (fraction of capacity). Seed: 0.75.
    pub cpu_threshold: f64,
    /// Host network threshold (fraction of capacity). Seed: 0.75.
    pub net_threshold: f64,
    /// Host swap-rate threshold (swap I/O operations per second, summed over the host's
    /// VMs). The seed does not give one.
    pub swap_ops_threshold_per_s: f64,
    /// Gray-box VM memory threshold (fraction of the VM's allocation in use).
    pub vm_mem_threshold: f64,
    /// k of the k-out-of-n rule. Seed: 3.
    pub k: usize,
    /// n of the k-out-of-n rule. Seed: 5.
    pub n: usize,
    /// Percentile of the distribution profile taken as a VM's peak. Seed: 95.
    pub peak_percentile: f64,
    /// Δ added to the peak when the host resource is saturated (fraction of the host's
    /// capacity). Seed: 0.10.
    pub delta: f64,
    /// Host utilization at or above which a resource counts as saturated (the observed
    /// tail then under-estimates the need, so Δ is added).
    pub saturation: f64,
    /// Δm: memory step for a swapping VM (MiB). Seed: 32 MB.
    pub delta_mem_mb: f64,
    /// Black-box memory utilization for the volume metric without swapping. Seed: 0.5.
    pub blackbox_mem_util: f64,
    /// ε: a fully used resource counts as 1 − ε in the volume metric.
    pub epsilon: f64,
    /// Intervals ahead for trend-aware destination choice (Fig. 5.12a: 120 s = 12 × 10 s).
    pub trend_horizon_intervals: u32,
    /// Recent samples the trend slope is fitted over.
    pub trend_samples: usize,
    /// Prefer destinations whose forecast stays below threshold.
    pub trend_aware: bool,
    /// Try two-host swaps when no single migration fits.
    pub swaps: bool,
    /// Try multi-way moves (evict low-VSR VMs from the destination to third hosts) when
    /// neither migrations nor swaps fit.
    pub multi_way: bool,
    /// Beyond Sandpiper: a hot host first sheds the smallest VM whose departure alone
    /// cools it (Sandpiper: always the highest VSR), saving spare capacity for others.
    pub best_fit: bool,
    /// Resize in place (vCPU hot-add, memory grow) before migrating.
    pub resize_first: bool,
    /// Keep the moves of hot hosts that were resolved when others were not (Sandpiper's
    /// "partial solution"); false gives up on the whole plan instead.
    pub partial_plans: bool,
    /// Migrations a plan may run at once.
    pub max_concurrent_migrations: usize,
    /// Intervals a host sits out of detection after a migration touched it (its samples
    /// then describe a transient).
    pub settle_intervals: u32,
    /// Weight of a migration's predicted seconds in the destination score (volume units per
    /// second); 0 ignores cost except for `max_migration_s`.
    pub cost_weight_per_s: f64,
    /// A destination whose predicted migration time exceeds this is rejected.
    pub max_migration_s: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            interval_s: 10.0,
            window_samples: 200,
            histogram_bins: 50,
            cpu_threshold: 0.75,
            net_threshold: 0.75,
            swap_ops_threshold_per_s: 50.0,
            vm_mem_threshold: 0.9,
            k: 3,
            n: 5,
            peak_percentile: 95.0,
            delta: 0.10,
            saturation: 0.95,
            delta_mem_mb: 32.0,
            blackbox_mem_util: 0.5,
            epsilon: 0.01,
            trend_horizon_intervals: 12,
            trend_samples: 12,
            trend_aware: true,
            swaps: true,
            multi_way: true,
            best_fit: false,
            resize_first: true,
            partial_plans: true,
            max_concurrent_migrations: 4,
            settle_intervals: 3,
            cost_weight_per_s: 0.0,
            max_migration_s: 3600.0,
        }
    }
}

impl BalanceConfig {
    /// Parses TOML (every key optional) and validates the result.
    pub fn from_toml_str(s: &str) -> Result<Self, BalanceError> {
        let c: Self = toml::from_str(s).map_err(|e| BalanceError::Config {
            detail: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Sandpiper without this crate's extensions (no multi-way moves, no trend).
    pub fn sandpiper() -> Self {
        Self {
            multi_way: false,
            trend_aware: false,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), BalanceError> {
        let bad = |detail: String| Err(BalanceError::Config { detail });
        if !(self.interval_s > 0.0 && self.interval_s.is_finite()) {
            return bad(format!("interval_s must be > 0, got {}", self.interval_s));
        }
        if self.window_samples == 0 || self.window_samples > MAX_WINDOW_SAMPLES {
            return bad(format!(
                "window_samples must be 1..={MAX_WINDOW_SAMPLES}, got {}",
                self.window_samples
            ));
        }
        if self.histogram_bins == 0 || self.histogram_bins > MAX_HISTOGRAM_BINS {
            return bad(format!(
                "histogram_bins must be 1..={MAX_HISTOGRAM_BINS}, got {}",
                self.histogram_bins
            ));
        }
        if self.k == 0 || self.k > self.n || self.n > self.window_samples {
            return bad(format!(
                "need 1 <= k <= n <= window_samples, got k={} n={} window_samples={}",
                self.k, self.n, self.window_samples
            ));
        }
        for (name, v) in [
            ("cpu_threshold", self.cpu_threshold),
            ("net_threshold", self.net_threshold),
            ("vm_mem_threshold", self.vm_mem_threshold),
            ("saturation", self.saturation),
            ("blackbox_mem_util", self.blackbox_mem_util),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(format!("{name} must be in (0, 1], got {v}"));
            }
        }
        if !(self.epsilon > 0.0 && self.epsilon < 0.5) {
            return bad(format!("epsilon must be in (0, 0.5), got {}", self.epsilon));
        }
        if !(0.0..=100.0).contains(&self.peak_percentile) {
            return bad(format!(
                "peak_percentile must be 0..=100, got {}",
                self.peak_percentile
            ));
        }
        if self.delta < 0.0 || self.delta_mem_mb < 0.0 || self.cost_weight_per_s < 0.0 {
            return bad("delta, delta_mem_mb and cost_weight_per_s must be >= 0".into());
        }
        if self.max_concurrent_migrations == 0
            || self.max_concurrent_migrations > MAX_CONCURRENT_STEPS
        {
            return bad(format!(
                "max_concurrent_migrations must be 1..={MAX_CONCURRENT_STEPS}, got {}",
                self.max_concurrent_migrations
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = BalanceConfig::default();
        assert_eq!((c.k, c.n), (3, 5));
        assert_eq!(c.cpu_threshold, 0.75);
        assert_eq!(c.net_threshold, 0.75);
        assert_eq!(c.delta, 0.10);
        assert_eq!(c.interval_s, 10.0);
        assert_eq!(c.window_samples, 200);
        assert_eq!(c.delta_mem_mb, 32.0);
        c.validate().unwrap();
    }

    #[test]
    fn toml_overrides_only_what_it_names() {
        let c = BalanceConfig::from_toml_str("k = 2\nn = 4\ncpu_threshold = 0.8\n").unwrap();
        assert_eq!((c.k, c.n, c.cpu_threshold), (2, 4, 0.8));
        assert_eq!(c.net_threshold, 0.75);
        assert!(BalanceConfig::from_toml_str("k = 6\nn = 5\n").is_err());
        assert!(BalanceConfig::from_toml_str("no_such_key = 1\n").is_err());
        assert!(BalanceConfig::from_toml_str("window_samples = 100000\n").is_err());
    }
}
