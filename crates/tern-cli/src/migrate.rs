//! `tern migrate`: live migration of a VM to the other site.

use std::time::Duration;

use anyhow::{Result, bail};
use tern_migrate::{MigrateOptions, Route};

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The VM to move (see `tern vm list`).
    name: String,
    /// Destination site.
    #[arg(long, required_unless_present = "recover")]
    to: Option<String>,
    /// Settle a migration whose `tern migrate` died (from the record it left): if the
    /// destination runs, or finished loading, it goes on and the source is quit; if it
    /// never finished loading, it is killed and the source resumes (docs/migration.md).
    #[arg(long, conflicts_with = "to")]
    recover: bool,
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
    /// Downtime target in ms: QEMU's downtime-limit, or with --smart-stop on the dirty set
    /// size (at QEMU's rate) at which the controller stops at once.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// tern-codec re-encoding of the stream (tern route): none, re (redundancy elimination
    /// of 1 KiB sub-blocks), delta (page deltas), store (the destination's content store),
    /// all, or a list like re+delta.
    #[arg(long, default_value = "all", value_parser = parse_codec)]
    codec: tern_codec::Options,
    /// CloudNet's smart stop-and-copy: iterate with a 1 ms downtime-limit, stop at the pass
    /// that fits --downtime-limit or at a local minimum of the dirty set after the
    /// crossover (every decision in --json).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    smart_stop: String,
    /// QEMU migration capability to switch on (repeatable): xbzrle, auto-converge,
    /// multifd (needs --direct), compress, ...
    #[arg(long = "qemu-cap", value_name = "CAP")]
    qemu_caps: Vec<String>,
    /// Extra QEMU migration parameter NAME=VALUE (repeatable), e.g.
    /// multifd-compression=zstd, xbzrle-cache-size=268435456.
    #[arg(long = "qemu-param", value_name = "NAME=VALUE")]
    qemu_params: Vec<String>,
    /// Move the VM's tern volume too (`tern vm start --volume`): initial sync (async), then
    /// synchronous replication, then memory; the destination's copy becomes primary.
    #[arg(long)]
    with_disk: bool,
    /// With --with-disk: the destination volume (default
    /// /var/lib/tern/volumes/SITE/NAME.img); an existing one of the same size receives only
    /// the blocks that differ.
    #[arg(long, requires = "with_disk")]
    dest_volume: Option<std::path::PathBuf>,
    /// With --with-disk: skip comparing both volumes by content at switchover.
    #[arg(long, requires = "with_disk")]
    no_check_disk: bool,
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

fn parse_codec(s: &str) -> Result<tern_codec::Options, String> {
    tern_codec::Options::parse(s)
}

/// `NAME=VALUE` with a number, true/false, or a string value.
fn parse_param(p: &str) -> Result<(String, serde_json::Value)> {
    let Some((k, v)) = p.split_once('=') else {
        bail!("--qemu-param {p:?}: expected NAME=VALUE");
    };
    let v = if let Ok(n) = v.parse::<u64>() {
        serde_json::json!(n)
    } else if let Ok(b) = v.parse::<bool>() {
        serde_json::json!(b)
    } else {
        serde_json::json!(v)
    };
    Ok((k.to_string(), v))
}

pub fn run(a: MigrateArgs) -> Result<()> {
    if a.recover {
        return recover(&a.name, a.json);
    }
    let to = a.to.clone().unwrap_or_default();
    if a.cc != "cubic" && !a.direct {
        bail!("--cc applies to --direct only (tern's transport has its own rate control)");
    }
    if a.qemu_caps.iter().any(|c| c == "multifd") && !a.direct {
        bail!(
            "--qemu-cap multifd needs --direct (QEMU 7.2 opens multifd channels itself and \
             cannot take them as file descriptors)"
        );
    }
    let mut o = MigrateOptions::new(&a.name, &to);
    o.route = if a.direct { Route::Direct } else { Route::Tern };
    o.cc = a.cc;
    o.check_memory = a.check_memory;
    o.downtime_limit_ms = a.downtime_limit;
    o.stall_timeout = Duration::from_secs(a.stall_timeout.max(1));
    o.timeout = Duration::from_secs(a.timeout.max(1));
    o.guest_verify_passes = a.verify_passes;
    o.progress = !a.quiet;
    o.codec = a.codec;
    o.smart_stop = a.smart_stop == "on";
    o.qemu_capabilities = a.qemu_caps;
    o.with_disk = a.with_disk;
    o.dest_volume = a.dest_volume.map(|p| std::path::absolute(&p).unwrap_or(p));
    o.check_disk = !a.no_check_disk;
    for p in &a.qemu_params {
        let (k, v) = parse_param(p)?;
        o.qemu_parameters.insert(k, v);
    }
    match tern_migrate::migrate(&o) {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let route = match &r.cc {
                    Some(cc) => format!("direct TCP ({cc})"),
                    None => match &r.codec {
                        Some(c) => format!("tern (codec {})", c.options),
                        None => "tern".to_string(),
                    },
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
            if !a.json {
                if let Some(c) = &r.codec
                    && let Some(st) = &c.stats
                {
                    println!(
                        "codec: {} pages; saved {:.1} MiB by RE ({} sub-blocks), {:.1} MiB by \
                         deltas ({} pages), {:.1} MiB by the store ({} pages), {} zero \
                         sub-blocks; {:.1} MiB into the transport{}",
                        st.pages,
                        st.re_saved as f64 / (1 << 20) as f64,
                        st.re_hits,
                        st.delta_saved as f64 / (1 << 20) as f64,
                        st.delta_pages,
                        st.store_saved as f64 / (1 << 20) as f64,
                        st.store_hits,
                        st.zero_subblocks,
                        c.stream_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
                        st.fallback
                            .as_ref()
                            .map(|f| format!(" (raw from: {f})"))
                            .unwrap_or_default()
                    );
                }
                if let Some(d) = &r.disk {
                    println!(
                        "disk: {} -> {} ({} MiB{}): in sync after {:.1} s with {:.1} MiB on the \
                         wire ({} of {} blocks unchanged, {:.1} MiB zero, {:.1} MiB deduplicated, \
                         {:.1} MiB data as {:.1} MiB); switchover {:.0} ms; identical: {}",
                        d.source_volume.display(),
                        d.dest_volume.display(),
                        d.size >> 20,
                        if d.dest_existed { ", re-sync" } else { "" },
                        d.sync_s,
                        d.sync_wire_bytes as f64 / (1 << 20) as f64,
                        d.blocks_same,
                        d.blocks,
                        d.zero_bytes as f64 / (1 << 20) as f64,
                        d.copy_bytes as f64 / (1 << 20) as f64,
                        d.data_raw_bytes as f64 / (1 << 20) as f64,
                        d.data_wire_bytes as f64 / (1 << 20) as f64,
                        d.switchover_ms,
                        match d.identical {
                            Some(true) => "yes",
                            Some(false) => "NO",
                            None => "not checked",
                        }
                    );
                }
                if let Some(s) = &r.smart_stop {
                    println!(
                        "smart stop: {} after {} pass(es)",
                        s.stop_reason
                            .as_deref()
                            .unwrap_or("QEMU switched over by itself"),
                        s.decisions.len()
                    );
                }
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

fn recover(name: &str, json: bool) -> Result<()> {
    use tern_migrate::run::Settled;
    let settled = tern_migrate::run::recover(name)?;
    let (outcome, site, state) = match &settled {
        Settled::Forward { site } => ("forward", site.as_str(), "running"),
        Settled::Rollback { site, state } => ("rollback", site.as_str(), state.as_str()),
        Settled::Stuck(why) => bail!(
            "{name}: not settled: {why}; both instances were left as they are (inspect them \
             with `tern vm list`, then try again)"
        ),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "outcome": outcome, "site": site, "state": state})
        );
    } else {
        println!("{name}: settled ({outcome}): it is {state} at site {site}");
    }
    Ok(())
}
