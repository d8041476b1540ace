//! Sans-IO progress monitor of one migration: fed `query-migrate` samples with the time, it
//! reports progress (iterations, remaining, rate) and decides when a migration has stalled.
//!
//! A stall is "no new bytes sent by QEMU for `stall_ms`": what a cut link or a hung peer
//! looks like from the source. Failed and cancelled states end the migration at once.

use serde::{Deserialize, Serialize};

/// One `query-migrate` reply, reduced to what the monitor needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub status: String,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub dirty_sync_count: u64,
    pub dirty_pages_rate: u64,
    /// QEMU's send rate, Mbit/s.
    #[serde(default)]
    pub mbps: f64,
}

impl Sample {
    /// Parses the `return` value of QMP `query-migrate`.
    pub fn from_qmp(v: &serde_json::Value) -> Sample {
        let ram = &v["ram"];
        let u = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
        Sample {
            status: v["status"].as_str().unwrap_or("none").to_string(),
            transferred_bytes: u(&ram["transferred"]),
            remaining_bytes: u(&ram["remaining"]),
            total_bytes: u(&ram["total"]),
            dirty_sync_count: u(&ram["dirty-sync-count"]),
            dirty_pages_rate: u(&ram["dirty-pages-rate"]),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Running,
    Completed,
    /// QEMU reported `failed` or `cancelled`.
    Failed,
    /// No progress for the stall timeout.
    Stalled,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub elapsed_ms: u64,
    pub status: String,
    pub iterations: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    /// Send rate over the last rate window, bits per second.
    pub rate_bps: u64,
}

/// Width of the rate window.
const RATE_WINDOW_MS: u64 = 1000;
/// Samples kept for the rate window (bounded).
const MAX_SAMPLES: usize = 64;

#[derive(Debug)]
pub struct Monitor {
    start_ms: u64,
    stall_ms: u64,
    last_progress_ms: u64,
    last: Sample,
    window: std::collections::VecDeque<(u64, u64)>,
    progress: Progress,
}

impl Monitor {
    pub fn new(now_ms: u64, stall_ms: u64) -> Monitor {
        Monitor {
            start_ms: now_ms,
            stall_ms,
            last_progress_ms: now_ms,
            last: Sample::default(),
            window: Default::default(),
            progress: Progress::default(),
        }
    }

    pub fn on_sample(&mut self, now_ms: u64, s: Sample) -> Verdict {
        if s.transferred_bytes > self.last.transferred_bytes || s.status != self.last.status {
            self.last_progress_ms = now_ms;
        }
        self.window.push_back((now_ms, s.transferred_bytes));
        while self.window.len() > MAX_SAMPLES
            || self
                .window
                .front()
                .is_some_and(|&(t, _)| now_ms - t > RATE_WINDOW_MS && self.window.len() > 2)
        {
            self.window.pop_front();
        }
        let rate_bps = match (self.window.front(), self.window.back()) {
            // A failed migration's last sample may carry no RAM counters (0): no rate.
            (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
                b1.saturating_sub(b0) * 8 * 1000 / (t1 - t0)
            }
            _ => 0,
        };
        self.progress = Progress {
            elapsed_ms: now_ms - self.start_ms,
            status: s.status.clone(),
            iterations: s.dirty_sync_count,
            transferred_bytes: s.transferred_bytes,
            remaining_bytes: s.remaining_bytes,
            rate_bps,
        };
        let verdict = match s.status.as_str() {
            "completed" => Verdict::Completed,
            "failed" | "cancelled" => Verdict::Failed,
            _ if now_ms - self.last_progress_ms >= self.stall_ms => Verdict::Stalled,
            _ => Verdict::Running,
        };
        self.last = s;
        verdict
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }
}

/// One human-readable progress line.
pub fn progress_line(p: &Progress) -> String {
    format!(
        "{:>6.1} s  {:<9} iter {:>2}  sent {:>7.1} MiB  remaining {:>7.1} MiB  {:>7.1} Mbit/s",
        p.elapsed_ms as f64 / 1000.0,
        p.status,
        p.iterations,
        p.transferred_bytes as f64 / (1 << 20) as f64,
        p.remaining_bytes as f64 / (1 << 20) as f64,
        p.rate_bps as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(status: &str, sent: u64) -> Sample {
        Sample {
            status: status.into(),
            transferred_bytes: sent,
            remaining_bytes: 1000,
            dirty_sync_count: 2,
            ..Sample::default()
        }
    }

    #[test]
    fn rate_and_completion() {
        let mut m = Monitor::new(0, 5000);
        for i in 0..20u64 {
            assert_eq!(
                m.on_sample(i * 100, s("active", i * 1_250_000)),
                Verdict::Running
            );
        }
        // 1.25 MB per 100 ms = 100 Mbit/s.
        assert_eq!(m.progress().rate_bps, 100_000_000);
        assert_eq!(m.progress().iterations, 2);
        assert_eq!(
            m.on_sample(2000, s("completed", 30_000_000)),
            Verdict::Completed
        );
    }

    #[test]
    fn stall_and_failure() {
        let mut m = Monitor::new(0, 3000);
        assert_eq!(m.on_sample(100, s("active", 10)), Verdict::Running);
        assert_eq!(m.on_sample(2000, s("active", 10)), Verdict::Running);
        assert_eq!(m.on_sample(3100, s("active", 10)), Verdict::Stalled);
        // Progress resets the stall clock.
        assert_eq!(m.on_sample(3200, s("active", 11)), Verdict::Running);
        assert_eq!(m.on_sample(6100, s("active", 11)), Verdict::Running);
        assert_eq!(m.on_sample(6300, s("failed", 11)), Verdict::Failed);
        assert_eq!(
            Monitor::new(0, 1).on_sample(0, s("cancelled", 0)),
            Verdict::Failed
        );
    }

    /// A destination that crashed: QEMU reports `failed` with no RAM counters, so the
    /// transferred count drops to 0 (this overflowed and panicked `tern migrate`).
    #[test]
    fn a_failed_sample_without_counters_is_a_failure_not_a_panic() {
        let mut m = Monitor::new(0, 5000);
        assert_eq!(m.on_sample(100, s("active", 5_000_000)), Verdict::Running);
        assert_eq!(m.on_sample(200, s("active", 9_000_000)), Verdict::Running);
        assert_eq!(m.on_sample(300, s("failed", 0)), Verdict::Failed);
        assert_eq!(m.progress().rate_bps, 0);
    }

    #[test]
    fn parses_query_migrate() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"status":"active","ram":{"transferred":603263,"remaining":4096,"total":67641344,"dirty-sync-count":2,"dirty-pages-rate":10}}"#,
        )
        .unwrap();
        let s = Sample::from_qmp(&v);
        assert_eq!(s.status, "active");
        assert_eq!(s.transferred_bytes, 603263);
        assert_eq!(s.total_bytes, 67641344);
        assert_eq!(s.dirty_sync_count, 2);
        assert!(progress_line(&Progress::default()).contains("iter"));
    }
}
