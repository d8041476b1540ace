//! Data formats: the 11 native metrics (Table 3.1), training sets and native traces.
//!
//! Both documents are JSON with a `version` field ([`FORMAT_VERSION`]); see `docs/move.md`.
//! A collector writes one [`TrainingSample`] per monitoring interval of a benchmark run;
//! the model never sees time, only `(benchmark, metrics, targets)` rows.

use serde::{Deserialize, Serialize};

use crate::error::{MoveError, Result};

/// Version of the training-set, trace and model JSON documents this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Number of native metrics (Table 3.1 of the seed).
pub const METRIC_COUNT: usize = 11;

/// Largest training set or trace accepted, in samples; larger documents are rejected with
/// [`MoveError::TooLarge`] before any fitting (bounds memory and the O(n·p²) QR).
pub const MAX_SAMPLES: usize = 200_000;

/// One native metric of Table 3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// User-space CPU, percent of one CPU.
    UserPct,
    /// Kernel CPU, percent of one CPU.
    KernelPct,
    /// I/O wait, percent of one CPU.
    IowaitPct,
    /// Received packets per second.
    RxPktsPerS,
    /// Transmitted packets per second.
    TxPktsPerS,
    /// Received bytes per second.
    RxBytesPerS,
    /// Transmitted bytes per second.
    TxBytesPerS,
    /// Disk read requests per second.
    ReadReqPerS,
    /// Disk write requests per second.
    WriteReqPerS,
    /// Disk blocks (512 B sectors) read per second.
    ReadBlocksPerS,
    /// Disk blocks (512 B sectors) written per second.
    WriteBlocksPerS,
}

impl Metric {
    /// All metrics in canonical (column) order.
    pub const ALL: [Metric; METRIC_COUNT] = [
        Metric::UserPct,
        Metric::KernelPct,
        Metric::IowaitPct,
        Metric::RxPktsPerS,
        Metric::TxPktsPerS,
        Metric::RxBytesPerS,
        Metric::TxBytesPerS,
        Metric::ReadReqPerS,
        Metric::WriteReqPerS,
        Metric::ReadBlocksPerS,
        Metric::WriteBlocksPerS,
    ];

    /// Column index in [`Metrics::to_array`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The JSON field name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::UserPct => "user_pct",
            Metric::KernelPct => "kernel_pct",
            Metric::IowaitPct => "iowait_pct",
            Metric::RxPktsPerS => "rx_pkts_per_s",
            Metric::TxPktsPerS => "tx_pkts_per_s",
            Metric::RxBytesPerS => "rx_bytes_per_s",
            Metric::TxBytesPerS => "tx_bytes_per_s",
            Metric::ReadReqPerS => "read_req_per_s",
            Metric::WriteReqPerS => "write_req_per_s",
            Metric::ReadBlocksPerS => "read_blocks_per_s",
            Metric::WriteBlocksPerS => "write_blocks_per_s",
        }
    }
}

/// The 11 native metrics of one interval.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Metrics {
    pub user_pct: f64,
    pub kernel_pct: f64,
    pub iowait_pct: f64,
    pub rx_pkts_per_s: f64,
    pub tx_pkts_per_s: f64,
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    pub read_req_per_s: f64,
    pub write_req_per_s: f64,
    pub read_blocks_per_s: f64,
    pub write_blocks_per_s: f64,
}

impl Metrics {
    /// Values in [`Metric::ALL`] order.
    pub fn to_array(&self) -> [f64; METRIC_COUNT] {
        [
            self.user_pct,
            self.kernel_pct,
            self.iowait_pct,
            self.rx_pkts_per_s,
            self.tx_pkts_per_s,
            self.rx_bytes_per_s,
            self.tx_bytes_per_s,
            self.read_req_per_s,
            self.write_req_per_s,
            self.read_blocks_per_s,
            self.write_blocks_per_s,
        ]
    }

    /// Inverse of [`Metrics::to_array`].
    pub fn from_array(a: [f64; METRIC_COUNT]) -> Self {
        Self {
            user_pct: a[0],
            kernel_pct: a[1],
            iowait_pct: a[2],
            rx_pkts_per_s: a[3],
            tx_pkts_per_s: a[4],
            rx_bytes_per_s: a[5],
            tx_bytes_per_s: a[6],
            read_req_per_s: a[7],
            write_req_per_s: a[8],
            read_blocks_per_s: a[9],
            write_blocks_per_s: a[10],
        }
    }

    /// The CPU-scaling baseline's single input: user + kernel.
    pub fn total_cpu_pct(&self) -> f64 {
        self.user_pct + self.kernel_pct
    }

    fn validate(&self, index: usize) -> Result<()> {
        for (m, v) in Metric::ALL.iter().zip(self.to_array()) {
            if !v.is_finite() || v < 0.0 {
                return Err(MoveError::InvalidValue {
                    what: m.name(),
                    index,
                    value: v,
                });
            }
        }
        Ok(())
    }
}

/// One monitoring interval of one benchmark run: native metrics plus the two CPU values
/// measured for the same benchmark interval on the virtual platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSample {
    /// Benchmark run id (e.g. `"net-tx-50"`); the refinement drops whole runs by this id.
    pub benchmark: String,
    /// Native metrics of the interval.
    pub metrics: Metrics,
    /// Guest CPU on the virtual platform (QEMU vCPU threads), percent of one CPU.
    pub vm_cpu_pct: f64,
    /// Host-side CPU spent for the guest outside its vCPUs (the seed's Dom-0), percent.
    pub host_cpu_pct: f64,
}

/// A training set (`tern model fit` input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSet {
    /// Must equal [`FORMAT_VERSION`].
    pub version: u32,
    /// Monitoring interval, seconds (informational; 30 s in the seed).
    pub interval_s: f64,
    /// Free-form platform pair description, e.g. `"native-x86 -> tcg-mttcg"`.
    #[serde(default)]
    pub platform: String,
    /// The samples.
    pub samples: Vec<TrainingSample>,
}

impl TrainingSet {
    /// Checks version, bounds and that every value is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        check_version("training set", self.version)?;
        check_len("training samples", self.samples.len())?;
        for (i, s) in self.samples.iter().enumerate() {
            s.metrics.validate(i)?;
            for (what, v) in [
                ("vm_cpu_pct", s.vm_cpu_pct),
                ("host_cpu_pct", s.host_cpu_pct),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(MoveError::InvalidValue {
                        what,
                        index: i,
                        value: v,
                    });
                }
            }
        }
        Ok(())
    }
}

/// One interval of a native application trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSample {
    /// Interval start, seconds from the trace start.
    pub t_s: f64,
    /// Native metrics.
    pub metrics: Metrics,
}

/// A native trace (`tern model predict` input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Must equal [`FORMAT_VERSION`].
    pub version: u32,
    /// Monitoring interval, seconds.
    pub interval_s: f64,
    /// The samples.
    pub samples: Vec<TraceSample>,
}

impl Trace {
    /// Checks version, bounds and values.
    pub fn validate(&self) -> Result<()> {
        check_version("trace", self.version)?;
        check_len("trace samples", self.samples.len())?;
        self.samples
            .iter()
            .enumerate()
            .try_for_each(|(i, s)| s.metrics.validate(i))
    }
}

pub(crate) fn check_version(what: &'static str, found: u32) -> Result<()> {
    if found != FORMAT_VERSION {
        return Err(MoveError::Version {
            what,
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

fn check_len(what: &'static str, count: usize) -> Result<()> {
    if count > MAX_SAMPLES {
        return Err(MoveError::TooLarge {
            what,
            count,
            limit: MAX_SAMPLES,
        });
    }
    Ok(())
}
