//! `tern model`: MOVE's virtualization-overhead model — `fit` a training set, `predict`
//! the VM and host-side CPU traces of a native trace, `simulate` a synthetic training set
//! and application trace (no lab needed). Formats: docs/move.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use tern_move::data::FORMAT_VERSION;
use tern_move::model::{FitParams, RefineMode};
use tern_move::{Model, Trace, TraceSample, TrainingSet};

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Fit the VM and host ("Dom-0") CPU models from a training set; prints the model JSON
    /// (selected metrics, coefficients, refinement report) or writes it to --out.
    Fit(FitArgs),
    /// Predict the VM and host-side CPU traces of a native trace.
    Predict(PredictArgs),
    /// Error of a model on measured samples (a training-set-format file): p50/p90 and
    /// the error CDF, MOVE vs the CPU-scaling baseline.
    Eval(EvalArgs),
    /// Write a synthetic microbenchmark training set and application trace (seeded).
    Simulate(SimulateArgs),
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model JSON.
    model: PathBuf,
    /// Measured samples (training-set JSON: native metrics plus measured VM/host CPU).
    measured: PathBuf,
    /// Print JSON (summaries and CDF points).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RefineArg {
    /// Drop runs whose error is far above the overall error, and refit.
    Drop,
    /// Only list them for a rerun.
    Flag,
    /// No refinement.
    Off,
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// Training set JSON.
    training: PathBuf,
    /// Write the model here instead of stdout (a summary goes to stdout then).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Bad-benchmark refinement.
    #[arg(long, value_enum, default_value = "drop")]
    refine: RefineArg,
    /// Partial F-test entry level.
    #[arg(long, default_value_t = tern_move::fit::F_TO_ENTER_ALPHA)]
    alpha: f64,
    /// Refinement threshold factor k in MSE + k·sd.
    #[arg(long, default_value_t = tern_move::model::REFINE_K_SIGMA)]
    k_sigma: f64,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model JSON (from `tern model fit`).
    model: PathBuf,
    /// Native trace JSON.
    trace: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Training set output.
    #[arg(long)]
    training: PathBuf,
    /// Application trace output (native metrics only).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Fraction of runs to corrupt with a guest CPU hog.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// CPU points the hog adds.
    #[arg(long, default_value_t = 20.0)]
    hog_pct: f64,
}

pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Fit(a) => fit(a),
        ModelCmd::Predict(a) => predict(a),
        ModelCmd::Eval(a) => eval(a),
        ModelCmd::Simulate(a) => simulate(a),
    }
}

fn eval(a: EvalArgs) -> Result<()> {
    use tern_move::model::error_cdf;
    let model: Model = read_json(&a.model, "model")?;
    let set: TrainingSet = read_json(&a.measured, "measured samples")?;
    model.validate()?;
    set.validate()?;
    let e = tern_move::evaluate(&model, &set.samples);
    let pairs = |f: &dyn Fn(&tern_move::TrainingSample) -> (f64, f64)| {
        set.samples.iter().map(f).collect::<Vec<_>>()
    };
    let vm = pairs(&|s| (model.vm.predict(&s.metrics), s.vm_cpu_pct));
    let host = pairs(&|s| (model.host.predict(&s.metrics), s.host_cpu_pct));
    if a.json {
        let doc = serde_json::json!({
            "version": FORMAT_VERSION,
            "summary": e,
            "cdf_vm": error_cdf(&vm),
            "cdf_host": error_cdf(&host),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("| target | model | n | p50 rel % | p90 rel % | p90 abs pts |");
    println!("|---|---|---|---|---|---|");
    for (t, m, s) in [
        ("vm", "MOVE", &e.vm),
        ("vm", "CPU scaling", &e.baseline_vm),
        ("host", "MOVE", &e.host),
        ("host", "CPU scaling", &e.baseline_host),
    ] {
        println!(
            "| {t} | {m} | {} | {:.2} | {:.2} | {:.2} |",
            s.n, s.p50_rel_pct, s.p90_rel_pct, s.p90_abs_pts
        );
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {what} {}", path.display()))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn fit(a: FitArgs) -> Result<()> {
    let set: TrainingSet = read_json(&a.training, "training set")?;
    let params = FitParams {
        alpha_enter: a.alpha,
        refine_k_sigma: a.k_sigma,
        refine: match a.refine {
            RefineArg::Drop => RefineMode::Drop,
            RefineArg::Flag => RefineMode::Flag,
            RefineArg::Off => RefineMode::Off,
        },
        ..FitParams::default()
    };
    let model = tern_move::fit(&set, &params).context("fitting the model")?;
    let Some(out) = a.out else {
        println!("{}", serde_json::to_string_pretty(&model)?);
        return Ok(());
    };
    write_json(&out, &model)?;
    // Training error over the runs the final fit kept (dropped runs are bad by definition).
    let kept: Vec<_> = set
        .samples
        .iter()
        .filter(|s| !model.refinement.dropped.contains(&s.benchmark))
        .cloned()
        .collect();
    let eval = tern_move::evaluate(&model, &kept);
    for (name, t, e, b) in [
        ("vm", &model.vm, &eval.vm, &eval.baseline_vm),
        ("host", &model.host, &eval.host, &eval.baseline_host),
    ] {
        let terms: Vec<String> = t
            .terms
            .iter()
            .map(|t| format!("{}={:.6e}", t.metric.name(), t.coef))
            .collect();
        println!("{name}: intercept={:.4} {}", t.intercept, terms.join(" "));
        println!(
            "  training p90 error {:.2}% (cpu-scaling baseline {:.2}%)",
            e.p90_rel_pct, b.p90_rel_pct
        );
    }
    let r = &model.refinement;
    println!(
        "refinement: {} rounds, dropped {:?}, rerun {:?}{}{}",
        r.rounds.len(),
        r.dropped,
        r.rerun,
        if r.drop_limit_hit {
            " (drop limit hit)"
        } else {
            ""
        },
        if r.round_limit_hit {
            " (round limit hit)"
        } else {
            ""
        },
    );
    println!("model written to {}", out.display());
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let model: Model = read_json(&a.model, "model")?;
    let trace: Trace = read_json(&a.trace, "trace")?;
    let p = tern_move::predict(&model, &trace).context("predicting")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12}",
        "t_s", "vm_cpu%", "host_cpu%", "scale_vm%", "scale_host%"
    );
    for s in &p.samples {
        println!(
            "{:>8.0} {:>10.2} {:>10.2} {:>12.2} {:>12.2}",
            s.t_s, s.vm_cpu_pct, s.host_cpu_pct, s.baseline_vm_cpu_pct, s.baseline_host_cpu_pct
        );
    }
    Ok(())
}

fn simulate(a: SimulateArgs) -> Result<()> {
    use tern_move::sim::{
        HogSide, Planted, SimConfig, application_trace, corrupt, microbenchmarks,
    };
    let planted = Planted::default();
    let cfg = SimConfig::default();
    let mut set = microbenchmarks(a.seed, &planted, &cfg);
    if a.corrupt > 0.0 {
        let bad = corrupt(&mut set, a.corrupt, a.hog_pct, HogSide::Guest, a.seed);
        eprintln!("corrupted runs: {bad:?}");
    }
    write_json(&a.training, &set)?;
    if let Some(path) = a.trace {
        let app = application_trace(a.seed, &planted, 120);
        let trace = Trace {
            version: FORMAT_VERSION,
            interval_s: cfg.interval_s,
            samples: app
                .iter()
                .enumerate()
                .map(|(i, s)| TraceSample {
                    t_s: cfg.interval_s * i as f64,
                    metrics: s.metrics,
                })
                .collect(),
        };
        write_json(&path, &trace)?;
    }
    Ok(())
}
