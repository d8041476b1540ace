//! The MOVE model: two target models (VM CPU, host-side CPU), the CPU-scaling baseline,
//! the bad-benchmark refinement loop, prediction and error statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::{
    FORMAT_VERSION, METRIC_COUNT, Metric, Metrics, Trace, TrainingSample, TrainingSet,
};
use crate::error::{MoveError, Result};
use crate::fit::{
    F_TO_ENTER_ALPHA, IrlsParams, StepwiseStep, design, forward_stepwise, irls_bisquare, ols,
};
use crate::stats::{ecdf, percentile};

/// Refinement threshold: a benchmark run is bad when its mean squared error exceeds the
/// overall MSE plus this many standard deviations of the per-sample squared errors (the
/// seed computes exactly these two statistics but gives no factor). With a fraction `f` of
/// runs off by `A`, the threshold is ≈ `A·(f + k·√(f(1−f)))`; k = 2 catches them up to
/// f ≈ 20%, while a clean run's MSE over ~10 intervals almost never reaches `(1 + 2√2)·σ²`.
pub const REFINE_K_SIGMA: f64 = 2.0;

/// Bound on refinement rounds (fit → flag → drop → refit). When hit, the last model is kept
/// and `RefinementReport::round_limit_hit` is set.
pub const MAX_REFINE_ROUNDS: usize = 5;

/// At most this fraction of benchmark runs may be dropped in total. A round that would
/// exceed it drops nothing, stops, and sets `RefinementReport::drop_limit_hit`: so many
/// "bad" runs means the model, not the runs, is wrong.
pub const MAX_DROPPED_FRACTION: f64 = 0.25;

/// Relative errors use `max(actual, floor)` as denominator, so near-idle intervals (host
/// CPU of a CPU-only benchmark is often < 1%) do not turn 0.2-point misses into 50% errors.
pub const REL_ERROR_FLOOR_PCT: f64 = 5.0;

/// What the refinement does with runs it flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefineMode {
    /// Drop the flagged runs and refit, up to [`MAX_REFINE_ROUNDS`].
    Drop,
    /// Only report them (the caller reruns those benchmarks and fits again).
    Flag,
    /// No refinement.
    Off,
}

/// Fitting parameters (all recorded in the model JSON).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitParams {
    /// Partial F-test entry level.
    pub alpha_enter: f64,
    /// IRLS parameters.
    pub irls: IrlsParams,
    /// Refinement factor k of `MSE + k·σ`.
    pub refine_k_sigma: f64,
    /// Refinement behaviour.
    pub refine: RefineMode,
}

impl Default for FitParams {
    fn default() -> Self {
        Self {
            alpha_enter: F_TO_ENTER_ALPHA,
            irls: IrlsParams::default(),
            refine_k_sigma: REFINE_K_SIGMA,
            refine: RefineMode::Drop,
        }
    }
}

/// One selected metric and its robust coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Term {
    /// The metric.
    pub metric: Metric,
    /// CPU percent per unit of the metric.
    pub coef: f64,
}

/// A linear model of one target; unselected metrics have coefficient 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetModel {
    /// Constant term, CPU percent.
    pub intercept: f64,
    /// Selected metrics in entry order.
    pub terms: Vec<Term>,
    /// The stepwise search trace.
    pub steps: Vec<StepwiseStep>,
    /// Whether IRLS met its tolerance.
    pub irls_converged: bool,
    /// IRLS iterations.
    pub irls_iterations: u32,
}

impl TargetModel {
    /// Linear prediction, clamped at 0 (CPU use cannot be negative).
    pub fn predict(&self, m: &Metrics) -> f64 {
        let a = m.to_array();
        let v = self.intercept
            + self
                .terms
                .iter()
                .map(|t| t.coef * a[t.metric.index()])
                .sum::<f64>();
        v.max(0.0)
    }

    /// Coefficients of all 11 metrics (0 where unselected).
    pub fn full_coefficients(&self) -> [f64; METRIC_COUNT] {
        let mut c = [0.0; METRIC_COUNT];
        for t in &self.terms {
            c[t.metric.index()] = t.coef;
        }
        c
    }
}

/// The CPU-scaling baseline: `target = a + b·(user + kernel)`, least squares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalingModel {
    /// Constant, CPU percent.
    pub intercept: f64,
    /// Factor on native total CPU.
    pub per_total_cpu: f64,
}

impl ScalingModel {
    /// Prediction clamped at 0.
    pub fn predict(&self, m: &Metrics) -> f64 {
        (self.intercept + self.per_total_cpu * m.total_cpu_pct()).max(0.0)
    }
}

/// Statistics of one refinement round for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTarget {
    /// Overall mean squared error.
    pub mse: f64,
    /// Standard deviation of the per-sample squared errors.
    pub sd_sq_err: f64,
    /// `mse + k·sd`.
    pub threshold: f64,
}

/// One refinement round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefinementRound {
    /// VM target statistics.
    pub vm: RoundTarget,
    /// Host target statistics.
    pub host: RoundTarget,
    /// Runs whose MSE exceeded a threshold, sorted.
    pub flagged: Vec<String>,
}

/// What the refinement did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RefinementReport {
    /// The rounds, in order.
    pub rounds: Vec<RefinementRound>,
    /// Runs dropped from the training data, sorted.
    pub dropped: Vec<String>,
    /// Runs flagged but kept (mode `flag`, or a limit was hit): rerun these.
    pub rerun: Vec<String>,
    /// [`MAX_DROPPED_FRACTION`] stopped the loop.
    pub drop_limit_hit: bool,
    /// [`MAX_REFINE_ROUNDS`] stopped the loop.
    pub round_limit_hit: bool,
}

/// A fitted MOVE model (the `tern model fit` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Copied from the training set.
    pub platform: String,
    /// VM CPU model.
    pub vm: TargetModel,
    /// Host-side ("Dom-0") CPU model.
    pub host: TargetModel,
    /// CPU-scaling baseline for the VM CPU.
    pub baseline_vm: ScalingModel,
    /// CPU-scaling baseline for the host CPU.
    pub baseline_host: ScalingModel,
    /// Parameters used.
    pub params: FitParams,
    /// Samples and runs the final fit used.
    pub samples_used: usize,
    /// Benchmark runs the final fit used.
    pub benchmarks_used: usize,
    /// Refinement outcome.
    pub refinement: RefinementReport,
}

impl Model {
    /// Checks the version and that coefficients are finite.
    pub fn validate(&self) -> Result<()> {
        crate::data::check_version("model", self.version)?;
        for (what, t) in [("vm", &self.vm), ("host", &self.host)] {
            for (i, v) in std::iter::once(t.intercept)
                .chain(t.terms.iter().map(|t| t.coef))
                .enumerate()
            {
                if !v.is_finite() {
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

fn fit_target(rows: &[[f64; METRIC_COUNT]], y: &[f64], params: &FitParams) -> Result<TargetModel> {
    let sel = forward_stepwise(rows, y, &Metric::ALL, params.alpha_enter)?;
    let x = design(rows, &sel.selected);
    let rf = irls_bisquare(&x, y, &params.irls)?;
    Ok(TargetModel {
        intercept: rf.coef[0],
        terms: sel
            .selected
            .iter()
            .zip(&rf.coef[1..])
            .map(|(&metric, &coef)| Term { metric, coef })
            .collect(),
        steps: sel.steps,
        irls_converged: rf.converged,
        irls_iterations: rf.iterations,
    })
}

fn fit_scaling(
    samples: &[&TrainingSample],
    target: impl Fn(&TrainingSample) -> f64,
) -> Result<ScalingModel> {
    let rows: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| vec![1.0, s.metrics.total_cpu_pct()])
        .collect();
    let y: Vec<f64> = samples.iter().map(|s| target(s)).collect();
    let b = ols(&crate::linalg::Matrix::from_rows(&rows), &y)?;
    Ok(ScalingModel {
        intercept: b[0],
        per_total_cpu: b[1],
    })
}

fn round_stats(
    samples: &[&TrainingSample],
    model: &TargetModel,
    target: impl Fn(&TrainingSample) -> f64,
    k: f64,
) -> (RoundTarget, BTreeMap<String, f64>) {
    let sq: Vec<f64> = samples
        .iter()
        .map(|s| (model.predict(&s.metrics) - target(s)).powi(2))
        .collect();
    let n = sq.len() as f64;
    let mse = sq.iter().sum::<f64>() / n;
    let sd = (sq.iter().map(|e| (e - mse).powi(2)).sum::<f64>() / n).sqrt();
    let mut per: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (s, e) in samples.iter().zip(&sq) {
        let slot = per.entry(s.benchmark.clone()).or_default();
        slot.0 += e;
        slot.1 += 1;
    }
    let per = per
        .into_iter()
        .map(|(b, (s, c))| (b, s / c as f64))
        .collect();
    (
        RoundTarget {
            mse,
            sd_sq_err: sd,
            threshold: mse + k * sd,
        },
        per,
    )
}

/// Fits the VM and host models with stepwise selection and IRLS, the CPU-scaling
/// baselines, and runs the refinement loop per `params.refine`.
pub fn fit(training: &TrainingSet, params: &FitParams) -> Result<Model> {
    training.validate()?;
    let all_runs: std::collections::BTreeSet<&str> = training
        .samples
        .iter()
        .map(|s| s.benchmark.as_str())
        .collect();
    let max_drop = (MAX_DROPPED_FRACTION * all_runs.len() as f64).floor() as usize;
    let mut dropped: Vec<String> = Vec::new();
    let mut report = RefinementReport::default();
    loop {
        let used: Vec<&TrainingSample> = training
            .samples
            .iter()
            .filter(|s| !dropped.contains(&s.benchmark))
            .collect();
        let rows: Vec<[f64; METRIC_COUNT]> = used.iter().map(|s| s.metrics.to_array()).collect();
        let y_vm: Vec<f64> = used.iter().map(|s| s.vm_cpu_pct).collect();
        let y_host: Vec<f64> = used.iter().map(|s| s.host_cpu_pct).collect();
        let vm = fit_target(&rows, &y_vm, params)?;
        let host = fit_target(&rows, &y_host, params)?;
        let model = |report: RefinementReport| -> Result<Model> {
            Ok(Model {
                version: FORMAT_VERSION,
                platform: training.platform.clone(),
                vm: vm.clone(),
                host: host.clone(),
                baseline_vm: fit_scaling(&used, |s| s.vm_cpu_pct)?,
                baseline_host: fit_scaling(&used, |s| s.host_cpu_pct)?,
                params: *params,
                samples_used: used.len(),
                benchmarks_used: all_runs.len() - dropped.len(),
                refinement: report,
            })
        };
        if params.refine == RefineMode::Off {
            return model(report);
        }
        let k = params.refine_k_sigma;
        let (vm_stats, vm_per) = round_stats(&used, &vm, |s| s.vm_cpu_pct, k);
        let (host_stats, host_per) = round_stats(&used, &host, |s| s.host_cpu_pct, k);
        let flagged: Vec<String> = vm_per
            .iter()
            .filter(|(b, e)| **e > vm_stats.threshold || host_per[*b] > host_stats.threshold)
            .map(|(b, _)| b.clone())
            .collect();
        report.rounds.push(RefinementRound {
            vm: vm_stats,
            host: host_stats,
            flagged: flagged.clone(),
        });
        if flagged.is_empty() {
            return model(report);
        }
        if params.refine == RefineMode::Flag {
            report.rerun = flagged;
            return model(report);
        }
        if dropped.len() + flagged.len() > max_drop {
            report.drop_limit_hit = true;
            report.rerun = flagged;
            return model(report);
        }
        if report.rounds.len() >= MAX_REFINE_ROUNDS {
            report.round_limit_hit = true;
            report.rerun = flagged;
            return model(report);
        }
        dropped.extend(flagged);
        dropped.sort();
        report.dropped = dropped.clone();
    }
}

/// One predicted interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictedSample {
    /// Interval start, seconds.
    pub t_s: f64,
    /// Predicted VM CPU, percent.
    pub vm_cpu_pct: f64,
    /// Predicted host-side CPU, percent.
    pub host_cpu_pct: f64,
    /// CPU-scaling baseline's VM CPU, percent.
    pub baseline_vm_cpu_pct: f64,
    /// CPU-scaling baseline's host CPU, percent.
    pub baseline_host_cpu_pct: f64,
}

/// Predicted CPU traces (`tern model predict --json` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Copied from the trace.
    pub interval_s: f64,
    /// Per-interval predictions.
    pub samples: Vec<PredictedSample>,
}

/// Applies the model to a native trace.
pub fn predict(model: &Model, trace: &Trace) -> Result<Prediction> {
    model.validate()?;
    trace.validate()?;
    Ok(Prediction {
        version: FORMAT_VERSION,
        interval_s: trace.interval_s,
        samples: trace
            .samples
            .iter()
            .map(|s| PredictedSample {
                t_s: s.t_s,
                vm_cpu_pct: model.vm.predict(&s.metrics),
                host_cpu_pct: model.host.predict(&s.metrics),
                baseline_vm_cpu_pct: model.baseline_vm.predict(&s.metrics),
                baseline_host_cpu_pct: model.baseline_host.predict(&s.metrics),
            })
            .collect(),
    })
}

/// Error of predictions against measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorSummary {
    /// Samples compared.
    pub n: usize,
    /// Median relative error, percent (denominator floored at [`REL_ERROR_FLOOR_PCT`]).
    pub p50_rel_pct: f64,
    /// 90th-percentile relative error, percent.
    pub p90_rel_pct: f64,
    /// 90th-percentile absolute error, CPU percentage points.
    pub p90_abs_pts: f64,
    /// Mean absolute error, CPU percentage points.
    pub mean_abs_pts: f64,
}

/// Relative error in percent, `100·|pred − actual| / max(actual, REL_ERROR_FLOOR_PCT)`.
pub fn rel_error_pct(pred: f64, actual: f64) -> f64 {
    100.0 * (pred - actual).abs() / actual.max(REL_ERROR_FLOOR_PCT)
}

/// Summarizes `(predicted, actual)` pairs.
pub fn summarize(pairs: &[(f64, f64)]) -> ErrorSummary {
    let rel: Vec<f64> = pairs.iter().map(|&(p, a)| rel_error_pct(p, a)).collect();
    let abs: Vec<f64> = pairs.iter().map(|&(p, a)| (p - a).abs()).collect();
    ErrorSummary {
        n: pairs.len(),
        p50_rel_pct: percentile(&rel, 50.0),
        p90_rel_pct: percentile(&rel, 90.0),
        p90_abs_pts: percentile(&abs, 90.0),
        mean_abs_pts: abs.iter().sum::<f64>() / abs.len().max(1) as f64,
    }
}

/// Relative-error CDF points `(error_pct, fraction ≤)` for a CDF plot.
pub fn error_cdf(pairs: &[(f64, f64)]) -> Vec<(f64, f64)> {
    ecdf(
        &pairs
            .iter()
            .map(|&(p, a)| rel_error_pct(p, a))
            .collect::<Vec<_>>(),
    )
}

/// Errors of the model and the baseline on measured samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// MOVE VM model.
    pub vm: ErrorSummary,
    /// MOVE host model.
    pub host: ErrorSummary,
    /// CPU-scaling baseline, VM.
    pub baseline_vm: ErrorSummary,
    /// CPU-scaling baseline, host.
    pub baseline_host: ErrorSummary,
}

/// Evaluates a model on measured samples (training data or a held-out set).
pub fn evaluate(model: &Model, samples: &[TrainingSample]) -> Evaluation {
    let pairs =
        |f: &dyn Fn(&TrainingSample) -> (f64, f64)| samples.iter().map(f).collect::<Vec<_>>();
    Evaluation {
        vm: summarize(&pairs(&|s| (model.vm.predict(&s.metrics), s.vm_cpu_pct))),
        host: summarize(&pairs(&|s| {
            (model.host.predict(&s.metrics), s.host_cpu_pct)
        })),
        baseline_vm: summarize(&pairs(&|s| {
            (model.baseline_vm.predict(&s.metrics), s.vm_cpu_pct)
        })),
        baseline_host: summarize(&pairs(&|s| {
            (model.baseline_host.predict(&s.metrics), s.host_cpu_pct)
        })),
    }
}
