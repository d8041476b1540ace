//! `tern bench ...` glue: arguments to options, the recorded command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_link::PROFILES;

#[derive(clap::Args, Debug)]
pub struct WanBenchArgs {
    /// Profiles to measure, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Pings per profile (10 ms apart).
    #[arg(long, default_value_t = 200)]
    pings: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for wan.json and wan.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn wan(a: WanBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    let profiles = if a.profiles.is_empty() {
        PROFILES.iter().map(|p| p.name.to_string()).collect()
    } else {
        a.profiles
    };
    let opts = tern_bench::wan::WanBenchOptions {
        profiles,
        duration_s: a.duration,
        pings: a.pings,
        seed: a.seed,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::wan::run(&opts)?;
    Ok(())
}
