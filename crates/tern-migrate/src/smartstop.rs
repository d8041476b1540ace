//! CloudNet's smart stop-and-copy on unmodified QEMU (sans-IO).
//!
//! QEMU runs with a tiny `downtime-limit`, so it never switches over by itself and syncs its
//! dirty bitmap once per full pass. At each sync the controller sees the dirty set `D_i` (the
//! pages the next pass must send) and decides:
//!
//! ```text
//!   D_i fits an eighth of the downtime target    -> stop
//!   D_i fits the target, shrank by less than half -> stop (one more pass gains little)
//!   pass i reached the iteration cap             -> stop ("cap")
//!   D_i >= 95 % of D_(i-1), first time           -> crossover: sending no longer gains
//!   after the crossover: D_i <= every D since the pass before it -> stop ("local minimum")
//!                        `window` passes without a new minimum  -> stop ("window")
//!   otherwise                                     -> continue
//! ```
//! "Stop" means raising `downtime-limit` to QEMU's maximum: QEMU switches over at its next
//! check (within about 100 ms) and sends what is dirty with the VM paused.

use serde::Serialize;

use crate::monitor::Sample;

/// QEMU's largest `downtime-limit` (ms): forces the switchover.
pub const FORCE_DOWNTIME_MS: u64 = 2_000_000;
/// `downtime-limit` while iterating (ms).
pub const ITERATE_DOWNTIME_MS: u64 = 1;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub elapsed_ms: u64,
    /// QEMU's dirty-sync count at this decision.
    pub iteration: u64,
    pub dirty_pages: u64,
    /// `dirty_pages` at QEMU's current rate, ms.
    pub est_downtime_ms: u64,
    pub stop: bool,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct SmartStop {
    target_ms: u64,
    window: usize,
    max_iterations: u64,
    last_sync: u64,
    history: Vec<u64>,
    crossover: Option<usize>,
    stopped: bool,
    pub log: Vec<Decision>,
}

impl SmartStop {
    /// `target_ms`: stop at once when the dirty set fits this downtime.
    pub fn new(target_ms: u64, window: usize, max_iterations: u64) -> SmartStop {
        SmartStop {
            target_ms,
            window: window.max(1),
            max_iterations,
            last_sync: 0,
            history: Vec::new(),
            crossover: None,
            stopped: false,
            log: Vec::new(),
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Why it stopped, if it did.
    pub fn stop_reason(&self) -> Option<&str> {
        self.log.iter().find(|d| d.stop).map(|d| d.reason.as_str())
    }

    /// Feeds one `query-migrate` sample; true means "force the switchover now".
    pub fn on_sample(&mut self, now_ms: u64, s: &Sample) -> bool {
        if self.stopped || s.status != "active" || s.dirty_sync_count <= self.last_sync {
            return false;
        }
        self.last_sync = s.dirty_sync_count;
        if s.dirty_sync_count < 2 {
            return false; // still the bulk pass
        }
        let dirty = s.remaining_bytes / 4096;
        let est = if s.mbps > 0.0 {
            (s.remaining_bytes as f64 * 8.0 / (s.mbps * 1e6) * 1000.0) as u64
        } else {
            u64::MAX
        };
        let i = self.history.len();
        self.history.push(dirty);
        let shrinking_fast = i >= 1 && dirty * 2 < self.history[i - 1];
        let (stop, reason) = if est <= self.target_ms / 8 {
            (
                true,
                format!("fits an eighth of the {} ms target", self.target_ms),
            )
        } else if est <= self.target_ms && i >= 1 && !shrinking_fast {
            (
                true,
                format!("fits the {} ms target and shrinks slowly", self.target_ms),
            )
        } else if est <= self.target_ms && s.dirty_sync_count < self.max_iterations {
            (
                false,
                "fits the target but still shrinking fast".to_string(),
            )
        } else if s.dirty_sync_count >= self.max_iterations {
            (true, format!("iteration cap {}", self.max_iterations))
        } else if let Some(c) = self.crossover {
            let from = c.saturating_sub(1);
            let min_before = self.history[from..i]
                .iter()
                .copied()
                .min()
                .unwrap_or(u64::MAX);
            if dirty <= min_before {
                (true, "local minimum after the crossover".to_string())
            } else if i - c >= self.window {
                (true, format!("no new minimum in {} passes", self.window))
            } else {
                (
                    false,
                    "after the crossover, looking for a minimum".to_string(),
                )
            }
        } else if i >= 1 && dirty * 100 >= self.history[i - 1] * 95 {
            self.crossover = Some(i);
            (
                false,
                "crossover: the dirty set stopped shrinking".to_string(),
            )
        } else {
            (false, "dirty set shrinking".to_string())
        };
        self.stopped = stop;
        self.log.push(Decision {
            elapsed_ms: now_ms,
            iteration: s.dirty_sync_count,
            dirty_pages: dirty,
            est_downtime_ms: est.min(u64::from(u32::MAX)),
            stop,
            reason,
        });
        stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sync: u64, dirty_pages: u64) -> Sample {
        Sample {
            status: "active".into(),
            dirty_sync_count: sync,
            remaining_bytes: dirty_pages * 4096,
            mbps: 100.0,
            ..Sample::default()
        }
    }

    fn run(ctl: &mut SmartStop, dirty: &[u64]) -> Option<u64> {
        for (k, &d) in dirty.iter().enumerate() {
            let sync = k as u64 + 2;
            // Several samples per pass: only the first after a sync counts.
            ctl.on_sample(0, &sample(sync - 1, d + 1000));
            if ctl.on_sample(0, &sample(sync, d)) {
                return Some(sync);
            }
            assert!(!ctl.on_sample(0, &sample(sync, d / 2)));
        }
        None
    }

    #[test]
    fn stops_when_the_dirty_set_fits_the_target() {
        // 300 ms at 100 Mbit/s = 3.75 MB = 915 pages; an eighth is 114 pages.
        let mut c = SmartStop::new(300, 3, 30);
        assert_eq!(run(&mut c, &[50_000, 20_000, 5_000, 800, 600]), Some(6));
        assert_eq!(
            c.stop_reason(),
            Some("fits the 300 ms target and shrinks slowly")
        );
        let mut c = SmartStop::new(300, 3, 30);
        assert_eq!(run(&mut c, &[50_000, 100]), Some(3));
        assert_eq!(c.stop_reason(), Some("fits an eighth of the 300 ms target"));
    }

    #[test]
    fn stops_at_a_local_minimum_after_the_crossover() {
        let mut c = SmartStop::new(300, 3, 30);
        // Shrinks, then crossover at 12k (>= 95 % of 12.2k), then 11k is a new minimum.
        assert_eq!(
            run(&mut c, &[40_000, 12_200, 12_000, 13_000, 11_000]),
            Some(6)
        );
        assert_eq!(c.stop_reason(), Some("local minimum after the crossover"));
        assert!(c.log.iter().any(|d| d.reason.starts_with("crossover")));
    }

    #[test]
    fn window_and_cap_bound_the_iterations() {
        let mut c = SmartStop::new(300, 2, 30);
        assert_eq!(
            run(&mut c, &[10_000, 10_000, 12_000, 13_000, 9_000]),
            Some(5)
        );
        assert_eq!(c.stop_reason(), Some("no new minimum in 2 passes"));
        let mut c = SmartStop::new(300, 100, 6);
        let v: Vec<u64> = (0..20).map(|i| 100_000 + i * 1000).collect();
        assert_eq!(run(&mut c, &v), Some(6));
        assert_eq!(c.stop_reason(), Some("iteration cap 6"));
    }

    #[test]
    fn ignores_the_bulk_pass_and_other_states() {
        let mut c = SmartStop::new(300, 3, 30);
        assert!(!c.on_sample(0, &sample(1, 1)));
        let mut s = sample(3, 1);
        s.status = "completed".into();
        assert!(!c.on_sample(0, &s));
        assert!(c.log.is_empty());
    }
}
