//! Synthetic microbenchmarks and the corrupted-training experiment (seed Fig. 3.5b) in
//! simulation.
//!
//! The generator mimics the seed's benchmark suite (§3.3): CPU, network transmit/receive,
//! disk read/write and mixes, each at five intensities, several intervals per run, with
//! per-interval jitter on the native metrics. The virtual side is a planted linear model
//! plus Gaussian noise, so a fit can be judged against the truth. Corruption adds a
//! background CPU hog's extra guest CPU to every interval of a chosen run — the failure the
//! refinement exists for. Deterministic for a seed.

use serde::{Deserialize, Serialize};

use crate::data::{FORMAT_VERSION, METRIC_COUNT, Metric, Metrics, TrainingSample, TrainingSet};
use crate::error::Result;
use crate::model::{Evaluation, FitParams, RefineMode, evaluate, fit};

/// The five benchmark intensities, percent of the measured maximum (the seed's "10% to
/// 90%"; the exact levels are not given).
pub const INTENSITIES_PCT: [f64; 5] = [10.0, 30.0, 50.0, 70.0, 90.0];

/// Ethernet payload per full-size packet, bytes.
const MSS_BYTES: f64 = 1448.0;

/// Small deterministic RNG (SplitMix64), so the simulator needs no dependency.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// A ground-truth linear model of one target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlantedTarget {
    /// Constant, CPU percent.
    pub intercept: f64,
    /// Coefficients in [`Metric::ALL`] order.
    pub coef: [f64; METRIC_COUNT],
    /// Gaussian noise standard deviation, CPU percentage points.
    pub noise_sd_pct: f64,
}

impl PlantedTarget {
    /// Noise-free value.
    pub fn eval(&self, m: &Metrics) -> f64 {
        self.intercept
            + m.to_array()
                .iter()
                .zip(&self.coef)
                .map(|(a, c)| a * c)
                .sum::<f64>()
    }

    /// Metrics with non-zero coefficients.
    pub fn support(&self) -> Vec<Metric> {
        Metric::ALL
            .into_iter()
            .filter(|m| self.coef[m.index()] != 0.0)
            .collect()
    }
}

/// Ground truth for both targets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Planted {
    /// VM CPU.
    pub vm: PlantedTarget,
    /// Host-side CPU.
    pub host: PlantedTarget,
}

impl Default for Planted {
    /// Shaped like the seed's selected models (§3.5.2): VM from user, kernel and rx
    /// packets; host from kernel, iowait, rx/tx packets and write requests.
    fn default() -> Self {
        let mut vm = [0.0; METRIC_COUNT];
        vm[Metric::UserPct.index()] = 1.05;
        vm[Metric::KernelPct.index()] = 1.6;
        vm[Metric::RxPktsPerS.index()] = 0.0015;
        let mut host = [0.0; METRIC_COUNT];
        host[Metric::KernelPct.index()] = 0.25;
        host[Metric::IowaitPct.index()] = 0.4;
        host[Metric::RxPktsPerS.index()] = 0.0012;
        host[Metric::TxPktsPerS.index()] = 0.0008;
        host[Metric::WriteReqPerS.index()] = 0.01;
        Self {
            vm: PlantedTarget {
                intercept: 2.0,
                coef: vm,
                noise_sd_pct: 1.0,
            },
            host: PlantedTarget {
                intercept: 1.0,
                coef: host,
                noise_sd_pct: 0.4,
            },
        }
    }
}

/// Benchmark request types of §3.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchKind {
    /// Fibonacci terms per request.
    Cpu,
    /// Server sends files.
    NetTx,
    /// Clients upload files.
    NetRx,
    /// Random file reads.
    DiskRead,
    /// Random file writes.
    DiskWrite,
}

impl BenchKind {
    /// The basic kinds.
    pub const ALL: [BenchKind; 5] = [
        BenchKind::Cpu,
        BenchKind::NetTx,
        BenchKind::NetRx,
        BenchKind::DiskRead,
        BenchKind::DiskWrite,
    ];

    fn name(self) -> &'static str {
        match self {
            BenchKind::Cpu => "cpu",
            BenchKind::NetTx => "net-tx",
            BenchKind::NetRx => "net-rx",
            BenchKind::DiskRead => "disk-read",
            BenchKind::DiskWrite => "disk-write",
        }
    }

    /// Mean native metrics at load fraction `load` (0..1) with request size `size_bytes`.
    fn profile(self, load: f64, size_bytes: f64) -> [f64; METRIC_COUNT] {
        let mut m = Metrics::default();
        match self {
            BenchKind::Cpu => {
                let r = 200.0 * load;
                m.user_pct = 95.0 * load;
                m.kernel_pct = 1.0 + 3.0 * load;
                m.rx_pkts_per_s = 3.0 * r;
                m.tx_pkts_per_s = 3.0 * r;
                m.rx_bytes_per_s = 600.0 * r;
                m.tx_bytes_per_s = 900.0 * r;
            }
            BenchKind::NetTx | BenchKind::NetRx => {
                let bytes = load * 1.0e8;
                let data_pkts = bytes / MSS_BYTES;
                let (data_rx, data_tx) = if self == BenchKind::NetTx {
                    (false, true)
                } else {
                    (true, false)
                };
                let acks = data_pkts / 2.0;
                m.user_pct = 1.0 + 4.0 * load;
                m.kernel_pct = 2.0 + if data_tx { 22.0 } else { 28.0 } * load;
                // Per-request overhead packets make bytes/packet depend on the file size.
                let req_pkts = 4.0 * bytes / size_bytes;
                m.tx_pkts_per_s = if data_tx { data_pkts } else { acks } + req_pkts;
                m.rx_pkts_per_s = if data_rx { data_pkts } else { acks } + req_pkts;
                m.tx_bytes_per_s = if data_tx { bytes } else { acks * 66.0 } + req_pkts * 300.0;
                m.rx_bytes_per_s = if data_rx { bytes } else { acks * 66.0 } + req_pkts * 300.0;
            }
            BenchKind::DiskRead | BenchKind::DiskWrite => {
                let bytes = load * 6.0e7;
                let r = bytes / size_bytes;
                let reqs = r * (size_bytes / 131_072.0).ceil();
                m.user_pct = 1.0 + 3.0 * load;
                m.kernel_pct = 1.5 + 10.0 * load;
                m.iowait_pct = 2.0 + 35.0 * load;
                if self == BenchKind::DiskRead {
                    m.read_req_per_s = reqs;
                    m.read_blocks_per_s = bytes / 512.0;
                } else {
                    m.write_req_per_s = reqs;
                    m.write_blocks_per_s = bytes / 512.0;
                }
                m.rx_pkts_per_s = 3.0 * r;
                m.tx_pkts_per_s = 3.0 * r;
                m.rx_bytes_per_s = 400.0 * r;
                m.tx_bytes_per_s = 400.0 * r;
            }
        }
        m.to_array()
    }

    fn size_bytes(self, rng: &mut SimRng) -> f64 {
        let sizes: &[f64] = match self {
            BenchKind::Cpu => &[1.0],
            BenchKind::NetTx | BenchKind::NetRx => &[65_536.0, 262_144.0, 1_048_576.0],
            BenchKind::DiskRead | BenchKind::DiskWrite => &[16_384.0, 65_536.0, 262_144.0],
        };
        sizes[rng.below(sizes.len())]
    }
}

/// Generator settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Monitoring intervals per benchmark run.
    pub intervals_per_run: usize,
    /// Number of mixed-type benchmarks (each run at all five intensities).
    pub mixes: usize,
    /// Relative per-interval jitter of the native metrics (standard deviation).
    pub metric_jitter: f64,
    /// Monitoring interval, seconds.
    pub interval_s: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            intervals_per_run: 10,
            mixes: 5,
            metric_jitter: 0.03,
            interval_s: 30.0,
        }
    }
}

fn observe(mean: [f64; METRIC_COUNT], jitter: f64, rng: &mut SimRng) -> Metrics {
    let mut a = mean;
    for v in a.iter_mut() {
        *v = (*v * (1.0 + jitter * rng.normal())).max(0.0);
    }
    Metrics::from_array(a)
}

fn sample(
    benchmark: &str,
    metrics: Metrics,
    planted: &Planted,
    rng: &mut SimRng,
) -> TrainingSample {
    TrainingSample {
        benchmark: benchmark.to_string(),
        metrics,
        vm_cpu_pct: (planted.vm.eval(&metrics) + planted.vm.noise_sd_pct * rng.normal()).max(0.0),
        host_cpu_pct: (planted.host.eval(&metrics) + planted.host.noise_sd_pct * rng.normal())
            .max(0.0),
    }
}

fn mix_profile(weights: &[f64; 5], sizes: &[f64; 5], load: f64) -> [f64; METRIC_COUNT] {
    let mut out = [0.0; METRIC_COUNT];
    for ((k, w), s) in BenchKind::ALL.iter().zip(weights).zip(sizes) {
        for (o, v) in out.iter_mut().zip(k.profile(load, *s)) {
            *o += w * v;
        }
    }
    out
}

/// A training set of the benchmark suite: each basic kind and each mix at every intensity.
pub fn microbenchmarks(seed: u64, planted: &Planted, cfg: &SimConfig) -> TrainingSet {
    let mut rng = SimRng::new(seed);
    let mut samples = Vec::new();
    for kind in BenchKind::ALL {
        for pct in INTENSITIES_PCT {
            let id = format!("{}-{pct:.0}", kind.name());
            let mean = kind.profile(pct / 100.0, kind.size_bytes(&mut rng));
            for _ in 0..cfg.intervals_per_run {
                let m = observe(mean, cfg.metric_jitter, &mut rng);
                samples.push(sample(&id, m, planted, &mut rng));
            }
        }
    }
    for mix in 0..cfg.mixes {
        let mut w = [0.0; 5];
        w.iter_mut().for_each(|x| *x = 0.1 + rng.uniform());
        let total: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= total);
        let mut sizes = [0.0; 5];
        for (s, k) in sizes.iter_mut().zip(BenchKind::ALL) {
            *s = k.size_bytes(&mut rng);
        }
        for pct in INTENSITIES_PCT {
            let id = format!("mix{mix}-{pct:.0}");
            let mean = mix_profile(&w, &sizes, pct / 100.0);
            for _ in 0..cfg.intervals_per_run {
                let m = observe(mean, cfg.metric_jitter, &mut rng);
                samples.push(sample(&id, m, planted, &mut rng));
            }
        }
    }
    TrainingSet {
        version: FORMAT_VERSION,
        interval_s: cfg.interval_s,
        platform: "simulated".into(),
        samples,
    }
}

/// A held-out "application" trace, RUBiS-like: a CPU-heavy front end with network
/// transmit and some disk, its load ramping 10% → 90% and back with a drifting mix.
pub fn application_trace(seed: u64, planted: &Planted, intervals: usize) -> Vec<TrainingSample> {
    let mut rng = SimRng::new(seed ^ 0x5eed_a991);
    let sizes = [1.0, 131_072.0, 65_536.0, 16_384.0, 65_536.0];
    (0..intervals)
        .map(|i| {
            let phase = i as f64 / intervals.max(1) as f64;
            let load = 0.1 + 0.8 * (std::f64::consts::PI * phase).sin();
            let drift = 0.1 * rng.normal();
            let mut w = [0.5 + drift, 0.25, 0.08, 0.12 - drift / 2.0, 0.05];
            w.iter_mut().for_each(|x| *x = x.max(0.01));
            let m = observe(mix_profile(&w, &sizes, load), 0.03, &mut rng);
            sample("app", m, planted, &mut rng)
        })
        .collect()
}

/// Where the background CPU hog ran during a corrupted benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HogSide {
    /// In the guest during the virtual run: measured VM CPU is too high.
    Guest,
    /// On the native system during the native run: native user CPU is too high (the
    /// seed's RUBiS spike); the virtual measurement is clean.
    Native,
}

/// Adds a background CPU hog's `hog_pct` points of CPU (on `side`) to every interval of
/// `round(fraction · runs)` randomly chosen runs; returns their ids, sorted.
pub fn corrupt(
    set: &mut TrainingSet,
    fraction: f64,
    hog_pct: f64,
    side: HogSide,
    seed: u64,
) -> Vec<String> {
    let mut runs: Vec<String> = set.samples.iter().map(|s| s.benchmark.clone()).collect();
    runs.sort();
    runs.dedup();
    let count = (fraction * runs.len() as f64).round() as usize;
    let mut rng = SimRng::new(seed ^ 0x0bad_bec4);
    let mut chosen = Vec::new();
    while chosen.len() < count.min(runs.len()) {
        let r = runs.swap_remove(rng.below(runs.len()));
        chosen.push(r);
    }
    chosen.sort();
    for s in set
        .samples
        .iter_mut()
        .filter(|s| chosen.contains(&s.benchmark))
    {
        match side {
            HogSide::Guest => s.vm_cpu_pct += hog_pct,
            HogSide::Native => s.metrics.user_pct += hog_pct,
        }
    }
    chosen
}

/// One arm of the experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// VM metrics selected.
    pub vm_selected: Vec<Metric>,
    /// Host metrics selected.
    pub host_selected: Vec<Metric>,
    /// Runs the refinement dropped.
    pub dropped: Vec<String>,
    /// Error on the held-out application trace.
    pub held_out: Evaluation,
}

/// Outcome of the corrupted-training experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionReport {
    /// Seed used.
    pub seed: u64,
    /// Where the hog ran.
    pub side: HogSide,
    /// Runs in the training set.
    pub runs: usize,
    /// Runs corrupted.
    pub corrupted: Vec<String>,
    /// Clean training set, refinement on (it should drop almost nothing).
    pub clean: Arm,
    /// Corrupted training set, no refinement.
    pub corrupted_unrefined: Arm,
    /// Corrupted training set, refinement on.
    pub corrupted_refined: Arm,
    /// Corrupted runs the refinement dropped.
    pub detected: usize,
    /// Clean runs the refinement dropped in the corrupted set.
    pub false_positives: usize,
}

fn arm(set: &TrainingSet, params: &FitParams, held_out: &[TrainingSample]) -> Result<Arm> {
    let m = fit(set, params)?;
    Ok(Arm {
        vm_selected: m.vm.terms.iter().map(|t| t.metric).collect(),
        host_selected: m.host.terms.iter().map(|t| t.metric).collect(),
        dropped: m.refinement.dropped.clone(),
        held_out: evaluate(&m, held_out),
    })
}

/// Fig. 3.5(b) in simulation: fit on a clean suite, on the same suite with `fraction` of
/// runs corrupted by a `hog_pct` guest CPU hog (with and without refinement), and compare
/// errors on a held-out application trace of `app_intervals` intervals.
pub fn corrupted_training_experiment(
    seed: u64,
    fraction: f64,
    hog_pct: f64,
    side: HogSide,
    app_intervals: usize,
) -> Result<CorruptionReport> {
    let planted = Planted::default();
    let clean = microbenchmarks(seed, &planted, &SimConfig::default());
    let mut bad = clean.clone();
    let corrupted = corrupt(&mut bad, fraction, hog_pct, side, seed);
    let held_out = application_trace(seed, &planted, app_intervals);
    let on = FitParams::default();
    let off = FitParams {
        refine: RefineMode::Off,
        ..on
    };
    let clean_arm = arm(&clean, &on, &held_out)?;
    let unrefined = arm(&bad, &off, &held_out)?;
    let refined = arm(&bad, &on, &held_out)?;
    let detected = refined
        .dropped
        .iter()
        .filter(|d| corrupted.contains(d))
        .count();
    let mut runs: Vec<&str> = clean.samples.iter().map(|s| s.benchmark.as_str()).collect();
    runs.sort();
    runs.dedup();
    Ok(CorruptionReport {
        seed,
        side,
        runs: runs.len(),
        false_positives: refined.dropped.len() - detected,
        detected,
        corrupted,
        clean: clean_arm,
        corrupted_unrefined: unrefined,
        corrupted_refined: refined,
    })
}
