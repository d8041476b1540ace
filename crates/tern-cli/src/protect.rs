//! `tern protect` and `tern failover`: disaster recovery for a running VM (docs/dr.md).

use std::time::Duration;

use anyhow::Result;
use tern_migrate::protect::{self, ProtectMode, ProtectOptions};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProtectArgs {
    #[command(subcommand)]
    cmd: Option<ProtectCmd>,
    /// The running VM to protect (it needs a tern volume: `tern vm start --volume`).
    name: Option<String>,
    /// The backup site (its disk server receives the VM's writes).
    #[arg(long)]
    backup: Option<String>,
    /// pipelined: asynchronous replication, the VM's replies held in its NIC gate until
    /// the writes before them are at the backup (needs `tern vm start --gate`); sync:
    /// every write waits for the backup; async: nothing waits (replies clients saw may be
    /// lost in a disaster).
    #[arg(long, default_value = "pipelined")]
    mode: ProtectMode,
    /// Backup volume (default /var/lib/tern/volumes/SITE/NAME.img; an existing copy
    /// receives only what differs).
    #[arg(long)]
    backup_volume: Option<std::path::PathBuf>,
    /// Seconds to wait for the initial sync.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(clap::Subcommand, Debug)]
enum ProtectCmd {
    /// Protected VMs: mode, backup, sync state, writes not yet at the backup, gate.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// End a protection: replication stops, the backup server stops, the volume stays.
    Stop { name: String },
}

pub fn run(a: ProtectArgs) -> Result<()> {
    match (a.cmd, a.name) {
        (Some(ProtectCmd::Status { name, json }), _) => {
            let st = protect::status(name.as_deref())?;
            let failed: Vec<String> = st
                .iter()
                .filter_map(|v| {
                    let why = v["backup_failed"].as_str()?;
                    Some(format!("{}: backup FAILED: {why}", v["name"].as_str()?))
                })
                .collect();
            let verdict = || match failed.is_empty() {
                true => Ok(()),
                false => Err(anyhow::anyhow!("{}", failed.join("\n"))),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return verdict();
            }
            if st.is_empty() {
                println!("no protected VMs");
            }
            for v in st {
                let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
                let n = |k: &str| v[k].as_u64().map_or("-".to_string(), |x| x.to_string());
                println!(
                    "{}: {} {} -> {}{}; phase {}, in sync {}, backlog {} B, writes {} \
                     (uncommitted {}), gate held {}{}",
                    s("name"),
                    s("mode"),
                    s("primary_site"),
                    s("backup_site"),
                    v["failed_over_to"]
                        .as_str()
                        .map_or(String::new(), |t| format!(" (FAILED OVER to {t})")),
                    s("phase"),
                    v["in_sync"],
                    n("backlog_bytes"),
                    n("writes"),
                    n("uncommitted_writes"),
                    v["gate"]["held_now"],
                    if v["primary_reachable"] == false {
                        "; primary unreachable"
                    } else {
                        ""
                    }
                );
            }
            verdict()
        }
        (Some(ProtectCmd::Stop { name }), _) => {
            protect::unprotect(&name)?;
            println!("{name}: no longer protected");
            Ok(())
        }
        (None, Some(name)) => {
            let Some(backup) = a.backup else {
                anyhow::bail!("--backup SITE is required (where the copy lives)");
            };
            let p = protect::protect(&ProtectOptions {
                name,
                backup_site: backup,
                mode: a.mode,
                backup_volume: a.backup_volume,
                timeout: Duration::from_secs(a.timeout),
                progress: true,
            })?;
            println!(
                "{} protected ({}): site {} -> {}, backup volume {}",
                p.name,
                p.mode,
                p.primary_site,
                p.backup_site,
                p.backup_volume.display()
            );
            Ok(())
        }
        (None, None) => anyhow::bail!("give a VM name, or `tern protect status`"),
    }
}

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// The protected VM whose primary site is lost.
    name: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Promote the backup even if the primary could not be confirmed stopped (like DRBD's
    /// `primary --force`): the backup's new epoch fences the old primary.
    #[arg(long)]
    force: bool,
}

pub fn failover(a: FailoverArgs) -> Result<()> {
    let r = protect::failover(&a.name, !a.json, a.force)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} failed over {} -> {} ({}{}, epoch {}): RPO {} writes, promote {:.0} ms ({} \
             logged writes dropped: they depended on writes another tier's backup never got), \
             RTO {:.1} s",
            r.name,
            r.from,
            r.to,
            r.mode,
            if r.forced { ", FORCED" } else { "" },
            r.epoch,
            r.rpo_writes
                .map_or("unknown (primary unreachable)".to_string(), |w| w
                    .to_string()),
            r.promote_ms,
            r.log_dropped,
            r.rto_s
        );
    }
    Ok(())
}
