//! `tern migrate`: live migration of a VM to the other site.

use std::time::Duration;

use anyhow::{Result, bail};
use tern_migrate::{MigrateOptions, Route};

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The VM to move (see `tern vm list`).
    name: String,
    /// Destination site.
    #[arg(long)]
    to: String,
    /// Plain kernel TCP from QEMU to QEMU through the emulated link (the "no accel" row)
    /// instead of tern's transport.
    #[arg(long)]
    direct: bool,
    /// Congestion control of the sites' kernel TCP with --direct.
    #[arg(long, default_value = "cubic", value_parser = ["cubic", "bbr", "reno"])]
    cc: String,
    /// Start the destination paused, compare both guests' RAM byte for byte, then resume
    /// it (adds the comparison to the pause; downtime is then measured to load completion).
    #[arg(long)]
    check_memory: bool,
    /// QEMU's downtime-limit in ms (when QEMU switches over).
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Give up (cancel, keep the source running) when QEMU sends nothing for this many
    /// seconds.
    #[arg(long, default_value_t = 20)]
    stall_timeout: u64,
    /// Give up after this many seconds in all.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// In-guest verification passes to wait for at the destination (tern guests; 0: skip).
    #[arg(long, default_value_t = 1)]
    verify_passes: u32,
    /// Print the summary as JSON (total_s, downtime_ms, qemu_bytes, wire_bytes, iterations,
    /// verified, ...).
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: MigrateArgs) -> Result<()> {
    if a.cc != "cubic" && !a.direct {
        bail!("--cc applies to --direct only (tern's transport has its own rate control)");
    }
    let mut o = MigrateOptions::new(&a.name, &a.to);
    o.route = if a.direct { Route::Direct } else { Route::Tern };
    o.cc = a.cc;
    o.check_memory = a.check_memory;
    o.downtime_limit_ms = a.downtime_limit;
    o.stall_timeout = Duration::from_secs(a.stall_timeout.max(1));
    o.timeout = Duration::from_secs(a.timeout.max(1));
    o.guest_verify_passes = a.verify_passes;
    o.progress = !a.quiet;
    match tern_migrate::migrate(&o) {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let route = match &r.cc {
                    Some(cc) => format!("direct TCP ({cc})"),
                    None => "tern".to_string(),
                };
                println!(
                    "migrated {} from site {} to site {} via {route}: total {:.2} s, downtime {:.0} ms, \
                     {} iteration(s), QEMU sent {:.1} MiB, {:.1} MiB on the wire, verified: {}",
                    r.name,
                    r.from,
                    r.to,
                    r.total_s,
                    r.downtime_ms,
                    r.iterations,
                    r.qemu_bytes as f64 / (1 << 20) as f64,
                    r.wire_bytes as f64 / (1 << 20) as f64,
                    match r.verified {
                        Some(true) => "yes",
                        Some(false) => "NO",
                        None => "not checked",
                    }
                );
            }
            if r.verified == Some(false) {
                bail!("verification failed: {:?} {:?}", r.memory, r.guest_verify);
            }
            Ok(())
        }
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"error": tern_migrate::run::error_chain(&e)})
                );
            }
            Err(e.into())
        }
    }
}
