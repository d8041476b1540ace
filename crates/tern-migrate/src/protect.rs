//! `tern protect` and `tern failover`: disaster recovery for a running VM (driver).
//!
//! ```text
//!  tern protect NAME --backup b --mode pipelined|sync|async
//!    primary site: the VM's disk server ──replicate (async | auto, then strict sync)──▶
//!    backup site: secondary disk server in /run/tern/vm/NAME.backup/b on
//!    /var/lib/tern/volumes/b/NAME.img
//!    pipelined: async + the VM's NIC gate on; sync, async: gate off (if the VM has one)
//!  tern failover NAME
//!    fence the primary (stop it if it still runs, cut the replication session), promote
//!    the backup volume (refused if it is mid-resync), boot the VM at the backup site
//!    from it, point the lab's client site (if any) at the backup site; report RPO (writes
//!    not at the backup) and RTO (until the guest is ready)
//! ```
//!
//! The protection is recorded in `/var/lib/tern/protect/NAME.json` with the VM's spec, so
//! failover can boot it without the lost site. See docs/dr.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tern_disk::daemon::{self, DiskPaths};
use tern_vm::{VmHost, VmSpec};

use crate::disk::{default_dest_volume, prepare_dest_volume, refused};
use crate::run::MigrateError;

/// Where protection records live.
pub const PROTECT_DIR: &str = "/var/lib/tern/protect";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectMode {
    /// Asynchronous replication behind PipeCloud's gate: no client-visible loss at async's
    /// speed.
    Pipelined,
    /// Every write waits for the backup's acknowledgement.
    Sync,
    /// Writes go to the backup in the background; replies are not held (may lose what
    /// clients saw).
    Async,
}

impl std::str::FromStr for ProtectMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pipelined" => Ok(ProtectMode::Pipelined),
            "sync" => Ok(ProtectMode::Sync),
            "async" => Ok(ProtectMode::Async),
            _ => Err(format!("unknown mode {s:?} (pipelined, sync or async)")),
        }
    }
}

impl std::fmt::Display for ProtectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProtectMode::Pipelined => "pipelined",
            ProtectMode::Sync => "sync",
            ProtectMode::Async => "async",
        })
    }
}

/// A protected VM, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Protection {
    pub name: String,
    pub primary_site: String,
    pub backup_site: String,
    pub mode: ProtectMode,
    pub primary_volume: PathBuf,
    pub backup_volume: PathBuf,
    /// The VM's spec at protect time (booted at the backup site on failover).
    pub spec: VmSpec,
    pub protected_unix_s: u64,
    /// Set once failed over: the site the VM now runs at.
    #[serde(default)]
    pub failed_over_to: Option<String>,
}

impl Protection {
    fn primary_dir(&self) -> PathBuf {
        vm_dir().join(&self.name).join(&self.primary_site)
    }
    fn backup_dir(&self) -> PathBuf {
        backup_dir(&self.name, &self.backup_site)
    }
}

/// The backup disk server's directory: `/run/tern/vm/NAME.backup/SITE` (not a VM name:
/// names have no dots).
pub fn backup_dir(name: &str, site: &str) -> PathBuf {
    vm_dir().join(format!("{name}.backup")).join(site)
}

/// The cluster's VM directory (the default one without a cluster file).
fn vm_dir() -> PathBuf {
    tern_cluster::Cluster::load(None)
        .map(|c| c.vm_dir)
        .unwrap_or_else(|_| tern_cluster::DEFAULT_VM_DIR.into())
}

fn record_path(name: &str) -> PathBuf {
    Path::new(PROTECT_DIR).join(format!("{name}.json"))
}

pub fn load(name: &str) -> Result<Protection, MigrateError> {
    let p = record_path(name);
    let text = std::fs::read_to_string(&p).map_err(|e| {
        refused(format!(
            "{name} is not protected ({}: {e}); run `tern protect {name} --backup SITE`",
            p.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| refused(format!("{}: {e}", p.display())))
}

fn save(p: &Protection) -> Result<(), MigrateError> {
    std::fs::create_dir_all(PROTECT_DIR)
        .map_err(|e| refused(format!("create {PROTECT_DIR}: {e}")))?;
    let path = record_path(&p.name);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(p).map_err(|e| refused(e.to_string()))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| refused(format!("write {}: {e}", path.display())))
}

fn ctl(dir: &Path, req: Value) -> Result<Value, MigrateError> {
    tern_disk::server::request(&DiskPaths::in_dir(dir).control, &req)
        .map_err(|e| refused(format!("disk server {}: {e}", dir.display())))
}

#[derive(Debug, Clone)]
pub struct ProtectOptions {
    pub name: String,
    pub backup_site: String,
    pub mode: ProtectMode,
    pub backup_volume: Option<PathBuf>,
    /// Give up waiting for the initial sync after this long.
    pub timeout: Duration,
    pub progress: bool,
}

/// Protects a running VM: backup volume and server at the backup site, replication in
/// `mode`, the gate set; returns once the backup is in sync.
pub fn protect(o: &ProtectOptions) -> Result<Protection, MigrateError> {
    let host = VmHost::lab();
    let rec = host.record(&o.name, None)?;
    let volume = rec.spec.volume.clone().ok_or_else(|| {
        refused(format!(
            "{} has no tern volume to protect (start it with `tern vm start --volume`)",
            o.name
        ))
    })?;
    if o.backup_site == rec.site {
        return Err(refused(format!(
            "the backup site must differ from the VM's site ({})",
            rec.site
        )));
    }
    if o.mode == ProtectMode::Pipelined && !rec.spec.gate {
        return Err(refused(format!(
            "pipelined protection holds the VM's replies in its NIC gate, and {} was started \
             without one: restart it with `tern vm start ... --gate`, or use --mode sync|async",
            o.name
        )));
    }
    let backup_volume = o
        .backup_volume
        .clone()
        .unwrap_or_else(|| default_dest_volume(&o.name, &o.backup_site));
    prepare_dest_volume(&volume, &backup_volume)?;
    let bdir = backup_dir(&o.name, &o.backup_site);
    daemon::stop(&bdir);
    std::fs::create_dir_all(&bdir)
        .map_err(|e| refused(format!("create {}: {e}", bdir.display())))?;
    // The other tiers of the VM's group: their backups (at the same site) hold the writes
    // ours may depend on.
    let peers: Vec<_> = rec
        .spec
        .gate_peers
        .iter()
        .map(|peer| {
            let mac = host
                .record(peer, Some(&rec.site))
                .map(|r| r.spec.mac_or_default())
                .unwrap_or_else(|_| tern_vm::vm::MacAddr::for_name(peer));
            let page = DiskPaths::in_dir(&backup_dir(peer, &o.backup_site)).counters;
            (mac.0, page)
        })
        .collect();
    daemon::start_backup(&bdir, &backup_volume, &peers).map_err(refused)?;
    let p = Protection {
        name: o.name.clone(),
        primary_site: rec.site.clone(),
        backup_site: o.backup_site.clone(),
        mode: o.mode,
        primary_volume: volume,
        backup_volume,
        spec: rec.spec.clone(),
        protected_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        failed_over_to: None,
    };
    let pdir = p.primary_dir();
    if rec.spec.gate {
        ctl(
            &pdir,
            json!({"cmd": "gate", "on": o.mode == ProtectMode::Pipelined}),
        )?;
    }
    let repl_mode = if o.mode == ProtectMode::Sync {
        "auto"
    } else {
        "async"
    };
    let cluster = crate::sites::load()?;
    ctl(
        &pdir,
        json!({
            "cmd": "replicate",
            "node": crate::sites::migrate_socket(&cluster, &rec.site)?,
            "peer": crate::sites::node_name(&cluster, &o.backup_site)?,
            "target": format!("{}.backup/{}/disk-repl.sock", o.name, o.backup_site),
            "mode": repl_mode,
        }),
    )?;
    save(&p)?;
    let t0 = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(1);
    loop {
        let st = ctl(&pdir, json!({"cmd": "status"}))?;
        let synced =
            st["in_sync"] == true && (o.mode != ProtectMode::Sync || st["synchronous"] == true);
        if o.progress && (synced || last_print.elapsed() >= Duration::from_millis(500)) {
            last_print = Instant::now();
            eprint!(
                "\rprotect {}: {:>5}/{} blocks scanned, {:>8.1} MB sent, {}   ",
                o.name,
                st["scanned_blocks"].as_u64().unwrap_or(0),
                st["blocks"].as_u64().unwrap_or(0),
                st["stats"]["bytes_out"].as_u64().unwrap_or(0) as f64 / 1e6,
                if synced { "in sync\n" } else { "syncing" }
            );
        }
        if synced {
            if o.mode == ProtectMode::Sync {
                // In step: from now on strict (a write completes once the backup has it,
                // across session ends, for up to 30 s).
                ctl(&pdir, json!({"cmd": "mode", "mode": "sync"}))?;
            }
            return Ok(p);
        }
        if t0.elapsed() > o.timeout {
            return Err(refused(format!(
                "the backup of {} is not in sync after {:?} (phase {}, {}); it keeps trying: \
                 see `tern protect status`",
                o.name,
                o.timeout,
                st["phase"],
                st["last_error"].as_str().unwrap_or("no error")
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Status of protected VMs (all, or `name`): the record plus the live replication state.
pub fn status(name: Option<&str>) -> Result<Vec<Value>, MigrateError> {
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => {
            let mut v: Vec<String> = std::fs::read_dir(PROTECT_DIR)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter_map(|e| {
                            let f = e.file_name().to_string_lossy().to_string();
                            f.strip_suffix(".json").map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        }
    };
    let mut out = Vec::new();
    for n in names {
        let p = load(&n)?;
        let live = daemon::status(&p.primary_dir()).ok();
        let backup = daemon::status(&p.backup_dir()).ok();
        let mut v = json!({
            "name": p.name, "mode": p.mode, "primary_site": p.primary_site,
            "backup_site": p.backup_site, "backup_volume": p.backup_volume,
            "failed_over_to": p.failed_over_to,
            "primary_reachable": live.is_some(), "backup_server": backup.is_some(),
        });
        if let Some(b) = &backup {
            // A backup that failed (I/O error at its volume) keeps its log but applies
            // and accepts nothing: `tern protect status` exits non-zero.
            v["backup_failed"] = b["backup_log"]["failed"].clone();
            v["backup_apply_errors"] = b["backup_log"]["apply_errors"].clone();
        }
        if let Some(st) = live {
            let (w, c) = (
                st["writes"].as_u64().unwrap_or(0),
                st["committed_writes"].as_u64().unwrap_or(0),
            );
            v["phase"] = st["phase"].clone();
            v["in_sync"] = st["in_sync"].clone();
            v["synchronous"] = st["synchronous"].clone();
            v["backlog_bytes"] = st["backlog_bytes"].clone();
            v["writes"] = json!(w);
            v["committed_writes"] = json!(c);
            v["uncommitted_writes"] = json!(w.saturating_sub(c));
            v["last_error"] = st["last_error"].clone();
            v["gate"] = st["gate"].clone();
        }
        out.push(v);
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub name: String,
    pub from: String,
    pub to: String,
    pub mode: ProtectMode,
    /// The primary's disk server answered (a declared, not a real, loss).
    pub primary_reachable: bool,
    /// Writes the primary had that the backup had not committed (lost by the failover);
    /// `None` when the primary was unreachable. With pipelined and sync protection none of
    /// them was ever visible to a client.
    pub rpo_writes: Option<u64>,
    pub backup_volume: PathBuf,
    /// Fencing and promotion of the backup volume, ms.
    pub promote_ms: f64,
    /// Writes the backup had received but dropped at promotion: they depended on writes of
    /// another tier of the group that its backup never received (so no client saw them).
    pub log_dropped: u64,
    /// From the failover's start until the guest at the backup site was ready, s.
    pub rto_s: f64,
    /// The primary was not confirmed stopped and `--force` promoted the backup anyway.
    pub forced: bool,
    /// The promoted volume's fencing epoch (replication from older epochs is refused).
    pub epoch: u64,
    /// The lab's client site now reaches the VM through the backup site.
    pub clients_rerouted: bool,
}

/// Declares the primary site lost and brings the VM up at the backup site. Refused when
/// the primary could not be confirmed stopped (its instance would not stop, or its disk
/// server still answers), unless `force` (DRBD's `primary --force`): then the backup's
/// new epoch fences the old primary — its replication is refused, so its gate never
/// releases another reply.
pub fn failover(name: &str, progress: bool, force: bool) -> Result<FailoverReport, MigrateError> {
    let t0 = Instant::now();
    let mut p = load(name)?;
    if let Some(site) = &p.failed_over_to {
        return Err(refused(format!(
            "{name} already failed over to site {site}"
        )));
    }
    let say = |m: &str| {
        if progress {
            eprintln!("failover {name}: {m} ({:.1} s)", t0.elapsed().as_secs_f64());
        }
    };
    let host = VmHost::lab();
    // Fence the primary: whatever of it still runs must not answer clients or write on.
    let live = daemon::status(&p.primary_dir()).ok();
    let rpo_writes = live.as_ref().map(|st| {
        st["writes"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(st["committed_writes"].as_u64().unwrap_or(0))
    });
    let stop_error = if host.record(name, Some(&p.primary_site)).is_ok() {
        host.stop_instance(name, &p.primary_site)
            .err()
            .map(|e| e.to_string())
    } else {
        daemon::stop(&p.primary_dir());
        None
    };
    let still_answers = daemon::status(&p.primary_dir()).is_ok();
    let unconfirmed = match (&stop_error, still_answers) {
        (Some(e), _) => Some(format!("stopping it failed: {e}")),
        (None, true) => Some("its disk server still answers".to_string()),
        (None, false) => None,
    };
    match (&unconfirmed, force) {
        (Some(why), false) => {
            return Err(refused(format!(
                "{name}: the primary at site {} could not be confirmed stopped ({why}); if \
                 that site is really lost, `tern failover {name} --force` promotes the \
                 backup anyway (its new epoch fences the old primary: its replication is \
                 refused and its gate releases no more replies)",
                p.primary_site
            )));
        }
        (Some(why), true) => say(&format!("primary NOT confirmed stopped ({why}); forced")),
        (None, _) => say("primary stopped"),
    }
    let bdir = p.backup_dir();
    let promoted = ctl(&bdir, json!({"cmd": "promote", "force": true}))?;
    let log_dropped = promoted["log_dropped"].as_u64().unwrap_or(0);
    let epoch = promoted["epoch"].as_u64().unwrap_or(0);
    let promote_ms = t0.elapsed().as_secs_f64() * 1000.0;
    say("backup volume promoted");
    daemon::stop(&bdir);
    let _ = std::fs::remove_dir_all(bdir.parent().unwrap_or(&bdir));
    let mut spec = p.spec.clone();
    spec.site = p.backup_site.clone();
    spec.volume = Some(p.backup_volume.clone());
    spec.gate = false;
    spec.gate_peers.clear();
    let cluster = crate::sites::load()?;
    spec.net_socket = crate::sites::switch_socket(&cluster, &p.backup_site)?;
    host.start(&spec)?;
    say("VM started at the backup site");
    // Clients follow (what DNS or a routing change does): the cluster's `on_failover`
    // command (the lab's reroutes its client site through the backup site).
    let clients_rerouted = match &cluster.on_failover {
        Some(cmd) if !cmd.is_empty() => {
            let ok = std::process::Command::new(&cmd[0])
                .args(&cmd[1..])
                .arg(&p.backup_site)
                // Its output is a log line, never part of this command's (JSON) output.
                .stdout(std::io::stderr())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("failover {name}: the cluster's on_failover command {cmd:?} failed");
            }
            ok
        }
        _ => false,
    };
    if clients_rerouted {
        say("client site routed to the backup site");
    }
    let serial = host.paths(name, &p.backup_site).serial_log;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("tern-guest: ready") {
            break;
        }
        if Instant::now() > deadline {
            return Err(refused(format!(
                "{name} started at site {} but its guest was not ready in 300 s (see {})",
                p.backup_site,
                serial.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rto_s = t0.elapsed().as_secs_f64();
    say("guest ready");
    p.failed_over_to = Some(p.backup_site.clone());
    save(&p)?;
    Ok(FailoverReport {
        name: name.to_string(),
        from: p.primary_site.clone(),
        to: p.backup_site.clone(),
        mode: p.mode,
        primary_reachable: live.is_some(),
        rpo_writes,
        backup_volume: p.backup_volume.clone(),
        promote_ms,
        log_dropped,
        rto_s,
        forced: unconfirmed.is_some(),
        epoch,
        clients_rerouted,
    })
}

/// Ends a protection (the backup server stops; the backup volume stays).
pub fn unprotect(name: &str) -> Result<(), MigrateError> {
    let p = load(name)?;
    if p.failed_over_to.is_none() {
        let _ = ctl(&p.primary_dir(), json!({"cmd": "stop-replication"}));
    }
    let bdir = p.backup_dir();
    daemon::stop(&bdir);
    let _ = std::fs::remove_dir_all(bdir.parent().unwrap_or(&bdir));
    std::fs::remove_file(record_path(name))
        .map_err(|e| refused(format!("remove {}: {e}", record_path(name).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in ["pipelined", "sync", "async"] {
            assert_eq!(m.parse::<ProtectMode>().unwrap().to_string(), m);
        }
        assert!("fast".parse::<ProtectMode>().is_err());
        assert_eq!(
            backup_dir("web1", "b"),
            Path::new("/run/tern/vm/web1.backup/b")
        );
    }
}
