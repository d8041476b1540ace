//! `tern balance`: Sandpiper's controller on a pool snapshot (`plan --dry-run`, `explain`)
//! and `tern bench sandpiper --sim`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tern_balance::{BalanceConfig, Controller, PoolState};

#[derive(Subcommand, Debug)]
pub enum BalanceCmd {
    /// What the controller would do now and why: hotspots, the plan's steps (resizes,
    /// migrations, swaps; dependencies; concurrency cap).
    Plan(PlanArgs),
    /// Every decision of the plan with its inputs: samples, forecasts, thresholds,
    /// provisioned needs, candidates rejected and why.
    Explain(StateArgs),
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// Pool snapshot (JSON): hosts, VMs with placement and recent samples, optional config.
    #[arg(long)]
    state: PathBuf,
    /// Controller parameters (TOML; overrides the snapshot's config). Defaults: the seed's
    /// (75% CPU and network, k=3 of n=5 at 10 s, delta 10%).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Compute the plan only (the live loop that executes it is not implemented yet).
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    state: StateArgs,
}

fn load(a: &StateArgs) -> Result<Controller> {
    let text =
        std::fs::read_to_string(&a.state).with_context(|| format!("read {}", a.state.display()))?;
    let mut state: PoolState =
        serde_json::from_str(&text).with_context(|| format!("parse {}", a.state.display()))?;
    if let Some(c) = &a.config {
        let t = std::fs::read_to_string(c).with_context(|| format!("read {}", c.display()))?;
        state.config = Some(
            BalanceConfig::from_toml_str(&t).with_context(|| format!("config {}", c.display()))?,
        );
    }
    Controller::from_state(&state).with_context(|| format!("load pool from {}", a.state.display()))
}

pub fn run(c: BalanceCmd) -> Result<()> {
    match c {
        BalanceCmd::Plan(a) => {
            if !a.dry_run {
                bail!("only --dry-run is supported: executing plans needs the live control loop");
            }
            let ctl = load(&a.state)?;
            let plan = ctl.plan(ctl.pool().now_s);
            if a.state.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                let text = tern_balance::explain::render(&plan);
                // The summary and steps; `explain` prints the reasons too.
                for l in text.lines().take_while(|l| *l != "why:") {
                    println!("{l}");
                }
                for h in &plan.unresolved {
                    println!("unresolved: {h} (see `tern balance explain`)");
                }
            }
        }
        BalanceCmd::Explain(a) => {
            let ctl = load(&a)?;
            let plan = ctl.plan(ctl.pool().now_s);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&plan.decisions)?);
            } else {
                print!("{}", tern_balance::explain::render(&plan));
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SandpiperBenchArgs {
    /// Run the simulated experiments (the controller core in virtual time; no VMs).
    #[arg(long)]
    sim: bool,
    /// Seeded pools per stress-test level.
    #[arg(long, default_value_t = 50)]
    trials: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// VM counts to time the planner at, comma-separated (5 VMs per host).
    #[arg(long, value_delimiter = ',', default_value = "500,5000,50000")]
    timing_vms: Vec<usize>,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn bench(a: SandpiperBenchArgs) -> Result<()> {
    if !a.sim {
        bail!("only --sim is implemented (the real-guest experiments need hosts in the lab)");
    }
    if !(1..=10_000).contains(&a.trials) || a.timing_vms.iter().any(|n| *n > 1_000_000) {
        bail!("--trials takes 1 to 10000, --timing-vms at most 1000000 each");
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let opts = tern_bench::sandpiper::SandpiperBenchOptions {
        out_dir: a.out,
        trials: a.trials,
        seed: a.seed,
        timing_vms: a.timing_vms,
        command,
    };
    let r = tern_bench::sandpiper::run(&opts)?;
    println!(
        "16x35: {} vs static {} overloaded host-intervals ({:.0}% fewer); timing: {}",
        r["datacenter"]["controller"]["overloaded_host_intervals"],
        r["datacenter"]["static"]["overloaded_host_intervals"],
        r["datacenter"]["reduction"].as_f64().unwrap_or(0.0) * 100.0,
        r["timing"]
            .as_array()
            .map(|t| t
                .iter()
                .map(|x| format!(
                    "{} VMs {:.0} ms",
                    x["vms"],
                    x["plan_ms"].as_f64().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    println!(
        "wrote {}/sandpiper-sim.{{json,md,svg}}",
        opts.out_dir.display()
    );
    Ok(())
}
