//! The migration driver: starts the destination, connects the stream (through the site
//! nodes, or direct TCP), drives QMP, watches progress, verifies, and cleans up on failure.

use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tern_vm::{QmpClient, VmHost, VmSpec};

use crate::memcmp::{self, MemCompare};
use crate::monitor::{Monitor, Progress, Sample, Verdict, progress_line};
use crate::settle::{self, Action, Dest, Facts, PendingMigration, Phase, Source};
use crate::sites;
use crate::smartstop::{self, Decision, SmartStop};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Vm(#[from] tern_vm::VmError),
    #[error("QMP {what}")]
    Qmp {
        what: String,
        #[source]
        source: tern_vm::ClientError,
    },
    #[error("{0}")]
    Refused(String),
    /// The migration did not complete; the source was left running.
    #[error("migration {reason}; the source VM at site {site} was left {state}")]
    Aborted {
        reason: String,
        site: String,
        state: String,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something failed after the destination could run: it was kept and the source quit.
    #[error("{reason}; the VM had reached site {site} and runs there now (the source was quit)")]
    Moved { reason: String, site: String },
    /// Neither way is safe: both instances were left as they were, and the record kept.
    #[error(
        "{reason}; not settled: {why}. Both instances were left as they are: inspect them, \
         then `tern migrate {name} --recover`"
    )]
    Unsettled {
        reason: String,
        why: settle::Stuck,
        name: String,
    },
}

fn qmp_err(what: impl Into<String>) -> impl FnOnce(tern_vm::ClientError) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Qmp { what, source }
}

/// How the migration stream travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Through the site nodes: tern's transport, compression, back-pressure.
    Tern,
    /// QEMU to QEMU over kernel TCP with this congestion control.
    Direct,
}

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub name: String,
    pub to_site: String,
    pub route: Route,
    /// Congestion control of both sites' kernel TCP for `Direct` (`cubic`, `bbr`, `reno`).
    pub cc: String,
    /// TCP port of the destination QEMU for `Direct` (inside the nodes' bypass range).
    pub direct_port: u16,
    /// QEMU's `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// QEMU's `max-bandwidth`, bytes/s.
    pub max_bandwidth: u64,
    /// Give up when QEMU sends nothing for this long.
    pub stall_timeout: Duration,
    /// Hard bound on the whole migration.
    pub timeout: Duration,
    /// Start the destination paused and compare both guests' RAM before resuming it.
    pub check_memory: bool,
    /// After the switchover, wait for this many good in-guest verification passes on the
    /// destination (tern guests with a workload only; 0 skips).
    pub guest_verify_passes: u32,
    /// Print progress to stderr.
    pub progress: bool,
    /// tern-codec optimizations on the tern route (ignored for `Direct`).
    pub codec: tern_codec::Options,
    /// CloudNet's smart stop-and-copy: iterate with a tiny downtime-limit and force the
    /// switchover at the controller's chosen pass (`downtime_limit_ms` is its target).
    pub smart_stop: bool,
    /// QEMU migration capabilities to switch on (e.g. `xbzrle`, `multifd`, `auto-converge`).
    pub qemu_capabilities: Vec<String>,
    /// Extra QEMU migration parameters (e.g. `{"multifd-compression": "zstd"}`).
    pub qemu_parameters: serde_json::Map<String, Value>,
    /// Move the VM's tern volume too (async initial sync, then synchronous, then memory).
    pub with_disk: bool,
    /// The destination's volume (default `crate::disk::default_dest_volume`); an existing
    /// one of the same size receives only what differs.
    pub dest_volume: Option<std::path::PathBuf>,
    /// Compare both volumes by content at switchover (with `with_disk`).
    pub check_disk: bool,
}

/// Capabilities whose pages leave the main stream or change its format beyond what
/// tern-codec parses: the stream is relayed as it is.
const CODEC_UNSAFE_CAPS: [&str; 6] = [
    "multifd",
    "postcopy-ram",
    "postcopy-preempt",
    "x-ignore-shared",
    "rdma-pin-all",
    "x-colo",
];

impl MigrateOptions {
    pub fn new(name: &str, to_site: &str) -> MigrateOptions {
        MigrateOptions {
            name: name.into(),
            to_site: to_site.into(),
            route: Route::Tern,
            cc: "cubic".into(),
            direct_port: tern_cluster::DEFAULT_DIRECT_PORTS.0,
            downtime_limit_ms: 300,
            max_bandwidth: 10 << 30,
            stall_timeout: Duration::from_secs(20),
            timeout: Duration::from_secs(1800),
            check_memory: false,
            guest_verify_passes: 1,
            progress: true,
            codec: tern_codec::Options::ALL,
            smart_stop: true,
            qemu_capabilities: Vec::new(),
            qemu_parameters: serde_json::Map::new(),
            with_disk: false,
            dest_volume: None,
            check_disk: true,
        }
    }

    /// The codec actually used: none off the tern route or with capabilities it cannot
    /// parse (and a note why).
    pub fn effective_codec(&self) -> (tern_codec::Options, Option<String>) {
        if self.route != Route::Tern || !self.codec.any() {
            return (tern_codec::Options::NONE, None);
        }
        match self
            .qemu_capabilities
            .iter()
            .find(|c| CODEC_UNSAFE_CAPS.contains(&c.as_str()))
        {
            Some(c) => (
                tern_codec::Options::NONE,
                Some(format!(
                    "capability {c} is on: stream relayed without re-encoding"
                )),
            ),
            None => (self.codec, None),
        }
    }
}

/// What `tern migrate --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub name: String,
    pub from: String,
    pub to: String,
    pub route: Route,
    /// Congestion control of the direct path (`null` through tern).
    pub cc: Option<String>,
    pub profile: Option<String>,
    /// From the `migrate` command to the destination running (with `check_memory`: to the
    /// destination's load completion).
    pub total_s: f64,
    /// Source STOP event to destination RESUME event (QEMU's timestamps). With
    /// `check_memory`, to the destination's MIGRATION completed event instead, since the
    /// destination then waits for the comparison before it resumes.
    pub downtime_ms: f64,
    /// QEMU's own `downtime` figure (excludes time the VM sat paused before the stop).
    pub qemu_downtime_ms: u64,
    /// Bytes QEMU wrote into its migration socket (`ram.transferred`, before compression).
    pub qemu_bytes: u64,
    /// IP bytes the sending site put on the emulated link during the migration (both
    /// paths measured the same way, retransmissions and overlay traffic included).
    pub wire_bytes: u64,
    pub iterations: u64,
    /// Every check that ran passed: RAM byte-for-byte (with `check_memory`) and the
    /// guest's own checksums (tern guests); `false` if any failed, `null` if none ran.
    pub verified: Option<bool>,
    pub memory: Option<MemCompare>,
    pub guest_verify: Option<GuestVerify>,
    /// QEMU capabilities switched on for this migration.
    pub qemu_capabilities: Vec<String>,
    /// tern-codec counters from the source node (tern route with a codec).
    pub codec: Option<CodecReport>,
    /// Smart stop-and-copy decisions, one per pass after the bulk pass.
    pub smart_stop: Option<SmartStopReport>,
    /// The volume's replication and switchover (`with_disk`).
    pub disk: Option<crate::disk::DiskReport>,
}

/// What `with_disk` needs through the migration.
#[derive(Debug, Clone)]
struct DiskPlan {
    src_dir: std::path::PathBuf,
    dest_dir: std::path::PathBuf,
    source_volume: std::path::PathBuf,
    dest_volume: std::path::PathBuf,
    dest_existed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CodecReport {
    pub options: String,
    /// Why the codec was not used, if it was asked for.
    pub note: Option<String>,
    /// The source node's counters (`null` if the node did not report in time).
    pub stats: Option<tern_codec::Stats>,
    /// Bytes the source node wrote into the transport stream (after residual compression).
    pub stream_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmartStopReport {
    pub stop_reason: Option<String>,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestVerify {
    pub passes_ok: u32,
    pub failures: u32,
    pub last_line: String,
}

fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Counts `tern-guest: verify` lines in a serial log: (ok, failed, last line).
pub fn guest_verify_lines(log: &str) -> (u32, u32, String) {
    let mut ok = 0;
    let mut bad = 0;
    let mut last = String::new();
    for l in log.lines() {
        if l.contains("tern-guest: verify ok") {
            ok += 1;
            last = l.trim().to_string();
        } else if l.contains("tern-guest: verify FAIL") {
            bad += 1;
            last = l.trim().to_string();
        }
    }
    (ok, bad, last)
}

/// Migrates a VM; on any failure the destination is stopped and the source left running.
pub fn migrate(opts: &MigrateOptions) -> Result<MigrateReport, MigrateError> {
    let host = VmHost::lab();
    let cluster = sites::load()?;
    if let Ok(Some(p)) = settle::read_record(&settle::record_path(host.root(), &opts.name)) {
        return Err(MigrateError::Refused(format!(
            "{} has an unfinished migration from site {} to site {}: run `tern migrate {} \
             --recover` first",
            opts.name, p.from, p.to, opts.name
        )));
    }
    let src = host.record(&opts.name, None)?;
    let from = src.site.clone();
    if from == opts.to_site {
        return Err(MigrateError::Refused(format!(
            "{} already runs at site {from}",
            opts.name
        )));
    }
    let to_address = sites::site(&cluster, &opts.to_site)?.address;
    let mut sq = host.qmp(&opts.name, Some(&from))?;
    let status = sq
        .execute("query-status", Value::Null)
        .map_err(qmp_err("query-status"))?;
    let state = status["status"].as_str().unwrap_or("?").to_string();
    if state != "running" && state != "paused" {
        return Err(MigrateError::Refused(format!(
            "the source VM is {state}, not running"
        )));
    }
    preflight(&mut sq, opts)?;

    // The destination: same machine, the destination site's switch.
    let mut spec: VmSpec = src.spec.clone();
    if spec.net_socket.is_some() {
        spec.net_socket = Some(sites::switch_socket(&cluster, &opts.to_site)?.ok_or_else(
            || {
                MigrateError::Refused(format!(
                    "{} has a NIC but site {} has no overlay switch (no `switch` in {})",
                    opts.name,
                    opts.to_site,
                    cluster.path.display()
                ))
            },
        )?);
    }
    let dest_dir = host.paths(&opts.name, &opts.to_site).dir;
    let disk_plan = match (&src.spec.volume, opts.with_disk) {
        (Some(v), true) => {
            let dest_volume = opts
                .dest_volume
                .clone()
                .unwrap_or_else(|| crate::disk::default_dest_volume(&opts.name, &opts.to_site));
            if dest_volume == *v {
                return Err(MigrateError::Refused(
                    "the destination volume is the source's own file".into(),
                ));
            }
            let dest_existed = crate::disk::prepare_dest_volume(v, &dest_volume)?;
            spec.volume = Some(dest_volume.clone());
            Some(DiskPlan {
                src_dir: src.paths.dir.clone(),
                dest_dir: dest_dir.clone(),
                source_volume: v.clone(),
                dest_volume,
                dest_existed,
            })
        }
        (None, true) => {
            return Err(MigrateError::Refused(format!(
                "{} has no tern volume (start it with `tern vm start --volume`)",
                opts.name
            )));
        }
        (Some(_), false) => {
            return Err(MigrateError::Refused(format!(
                "{} has a tern volume: migrate it with --with-disk",
                opts.name
            )));
        }
        (None, false) => None,
    };
    let incoming_sock = dest_dir.join("incoming.sock");
    let uri = match opts.route {
        Route::Tern => format!("unix:{}", incoming_sock.display()),
        Route::Direct => format!("tcp:{to_address}:{}", opts.direct_port),
    };
    if opts.route == Route::Direct {
        sites::set_cc(&cluster, &from, &opts.cc)?;
        sites::set_cc(&cluster, &opts.to_site, &opts.cc)?;
    }
    let dest_paused_start = opts.check_memory || disk_plan.is_some();
    let mut pending = PendingMigration {
        name: opts.name.clone(),
        from: from.clone(),
        to: opts.to_site.clone(),
        dest_paused_start,
        with_disk: disk_plan.is_some(),
        source_was_running: src_was_running(&status),
        phase: Phase::Streaming,
        started_unix_ms: unix_ms(),
        driver_pid: std::process::id(),
    };
    let record = settle::record_path(host.root(), &opts.name);
    let dest = if dest_paused_start {
        host.start_incoming_paused(&spec, &opts.to_site, &uri)?
    } else {
        host.start_incoming(&spec, &opts.to_site, &uri)?
    };
    // Before `migrate` is sent: recovery needs it from then on.
    let result = settle::write_record(&record, &pending)
        .map_err(|source| MigrateError::Io {
            what: format!("write {}", record.display()),
            source,
        })
        .and_then(|()| {
            run(
                opts,
                &host,
                &mut sq,
                &from,
                &dest,
                &incoming_sock,
                &uri,
                disk_plan.as_ref(),
                (&mut pending, &record),
            )
        });
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            let reason = match &e {
                MigrateError::Aborted { reason, .. } => reason.clone(),
                other => format!("failed: {}", error_chain(other)),
            };
            // Settle by the point-of-no-return rule (settle.rs): back only while the
            // destination cannot have run.
            Err(
                match settle_migration(&host, &pending, &record, Some(&mut sq), true) {
                    Settled::Forward { site } => MigrateError::Moved { reason, site },
                    Settled::Rollback { site, state } => MigrateError::Aborted {
                        reason,
                        site,
                        state,
                    },
                    Settled::Stuck(why) => MigrateError::Unsettled {
                        reason,
                        why,
                        name: opts.name.clone(),
                    },
                },
            )
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a migration was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The destination runs at `site`; the source was quit.
    Forward { site: String },
    /// The destination was killed; the source at `site` is `state`.
    Rollback { site: String, state: String },
    /// Nothing was done (the record stays).
    Stuck(settle::Stuck),
}

/// Stops QEMU's part of a migration still under way: cancel, and wait (bounded) until it
/// leaves the active states (a completed one stays completed).
fn cancel(sq: &mut QmpClient) {
    let _ = sq.execute("migrate_cancel", Value::Null);
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        let st = sq
            .execute("query-migrate", Value::Null)
            .map(|v| v["status"].as_str().unwrap_or("none").to_string())
            .unwrap_or_default();
        if !matches!(st.as_str(), "active" | "cancelling" | "setup" | "device")
            || Instant::now() > deadline
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a cancelled migration may take to leave QEMU's active states; after it the
/// source is judged as it then is.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

fn status_of(q: &mut QmpClient) -> Option<String> {
    q.execute("query-status", Value::Null)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
}

/// QEMU's announce-self (RARP from the VM's MAC, 5 rounds from 50 ms): once the source's
/// switch port is gone, this moves the MAC at every switch (docs/migration.md).
fn announce(dq: &mut QmpClient) {
    let _ = dq.execute(
        "announce-self",
        json!({"initial": 50, "max": 550, "rounds": 5, "step": 100}),
    );
}

/// Queries both QEMUs, decides by `settle::decide` and acts: forward (resume the
/// destination if paused, quit the source, promote), rollback (kill the destination first,
/// then resume the source if it ran before) or nothing. `sq`: the source's QMP connection if
/// the caller holds it (QEMU serves one at a time). `reject_dest`: the caller found the
/// migration failed (go back if still safe); false for `--recover`.
pub fn settle_migration(
    host: &VmHost,
    pending: &PendingMigration,
    record: &Path,
    sq: Option<&mut QmpClient>,
    reject_dest: bool,
) -> Settled {
    let (name, from, to) = (&pending.name, &pending.from, &pending.to);
    let mut own_sq: Option<QmpClient>;
    let sq = match sq {
        Some(q) => Some(q),
        None => {
            own_sq = host.qmp(name, Some(from)).ok();
            own_sq.as_mut()
        }
    };
    let source = match sq {
        Some(q) => {
            cancel(q);
            let st = status_of(q);
            let mig = q
                .execute("query-migrate", Value::Null)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_string));
            (settle::source_from(st.as_deref(), mig.as_deref()), Some(q))
        }
        None => (Source::Unavailable, None),
    };
    let (source, sq) = source;
    let alive = host
        .record(name, Some(to))
        .is_ok_and(|r| tern_vm::vm::pid_alive(r.pid, &r.paths.qmp_socket));
    let mut dq = if alive {
        host.qmp(name, Some(to)).ok()
    } else {
        None
    };
    let dest = match &mut dq {
        Some(q) => {
            let before = status_of(q);
            let after = if before.as_deref() == Some("running") {
                before.clone()
            } else {
                // Clears autostart while it still loads: it cannot start behind our back.
                let _ = q.execute("stop", Value::Null);
                status_of(q)
            };
            settle::dest_from(true, before.as_deref(), after.as_deref())
        }
        None if alive => Dest::Unresponsive,
        None => Dest::Gone,
    };
    let facts = Facts {
        source,
        dest,
        phase: pending.phase,
        dest_paused_start: pending.dest_paused_start,
        with_disk: pending.with_disk,
        reject_dest,
    };
    match settle::decide(facts) {
        Action::Forward { resume_dest } => {
            let dq = dq.as_mut().expect("forward only with a live destination");
            if resume_dest {
                let committed = PendingMigration {
                    phase: Phase::Committed,
                    ..pending.clone()
                };
                if settle::write_record(record, &committed).is_err() {
                    return Settled::Stuck(settle::Stuck::DestUnresponsive);
                }
                if dq.execute("cont", Value::Null).is_err() {
                    return Settled::Stuck(settle::Stuck::DestUnresponsive);
                }
            }
            if host.promote(name, to).is_err() {
                // Whatever failed, the source must not run again: kill it.
                let _ = host.stop_instance(name, from);
            }
            announce(dq);
            settle::remove_record(record);
            Settled::Forward { site: to.clone() }
        }
        Action::Rollback { resume_source } => {
            drop(dq);
            // The destination goes first: once it is dead it can never run.
            let _ = host.stop_instance(name, to);
            if pending.with_disk {
                // The source's volume stays primary; the destination's copy is dropped
                // with its instance (and stays inconsistent on disk).
                let _ = tern_disk::server::request(
                    &tern_disk::daemon::DiskPaths::in_dir(&host.paths(name, from).dir).control,
                    &json!({"cmd": "stop-replication"}),
                );
            }
            let state = match sq {
                Some(q) => {
                    if resume_source && pending.source_was_running {
                        let _ = q.execute("cont", Value::Null);
                    }
                    status_of(q).unwrap_or_else(|| "?".into())
                }
                None => "?".into(),
            };
            settle::remove_record(record);
            Settled::Rollback {
                site: from.clone(),
                state,
            }
        }
        Action::Stuck(why) => Settled::Stuck(why),
    }
}

/// `tern migrate NAME --recover`: settles a migration whose `tern migrate` died, from its
/// record (`settle.rs`).
pub fn recover(name: &str) -> Result<Settled, MigrateError> {
    let host = VmHost::lab();
    let record = settle::record_path(host.root(), name);
    let pending = settle::read_record(&record)
        .map_err(|source| MigrateError::Io {
            what: format!("read {}", record.display()),
            source,
        })?
        .ok_or_else(|| {
            MigrateError::Refused(format!("{name} has no unfinished migration to recover"))
        })?;
    if settle::driver_alive(&pending) {
        return Err(MigrateError::Refused(format!(
            "the tern migrate of {name} (pid {}) still runs: it settles the migration itself",
            pending.driver_pid
        )));
    }
    Ok(settle_migration(&host, &pending, &record, None, false))
}

fn src_was_running(status: &Value) -> bool {
    status["status"].as_str() == Some("running")
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Refuses configurations tern cannot carry and sets the parameters every path shares.
fn preflight(q: &mut QmpClient, opts: &MigrateOptions) -> Result<(), MigrateError> {
    let mig = q
        .execute("query-migrate", Value::Null)
        .map_err(qmp_err("query-migrate"))?;
    if let Some(s) = mig["status"].as_str()
        && matches!(s, "active" | "setup" | "cancelling" | "device")
    {
        return Err(MigrateError::Refused(format!(
            "a migration is already {s} for this VM"
        )));
    }
    let caps = capabilities(&opts.qemu_capabilities);
    q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .map_err(qmp_err("migrate-set-capabilities"))?;
    let downtime = if opts.smart_stop {
        smartstop::ITERATE_DOWNTIME_MS
    } else {
        opts.downtime_limit_ms
    };
    let mut params = serde_json::Map::new();
    params.insert("downtime-limit".into(), json!(downtime));
    params.insert("max-bandwidth".into(), json!(opts.max_bandwidth));
    params.extend(opts.qemu_parameters.clone());
    q.execute("migrate-set-parameters", Value::Object(params))
        .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// The capability list for `migrate-set-capabilities`: `events`, the extras on, and every
/// other capability tern may switch on set off (a VM keeps them from an earlier migration).
fn capabilities(extra: &[String]) -> Value {
    let mut names: Vec<&str> = vec!["xbzrle", "auto-converge", "multifd", "compress"];
    for e in extra {
        if !names.contains(&e.as_str()) {
            names.push(e);
        }
    }
    let mut list = vec![json!({"capability": "events", "state": true})];
    for n in names {
        list.push(json!({"capability": n, "state": extra.iter().any(|e| e == n)}));
    }
    Value::Array(list)
}

#[allow(clippy::too_many_arguments)]
fn run(
    opts: &MigrateOptions,
    host: &VmHost,
    sq: &mut QmpClient,
    from: &str,
    dest: &tern_vm::VmInfo,
    incoming_sock: &Path,
    uri: &str,
    disk: Option<&DiskPlan>,
    (pending, record): (&mut PendingMigration, &Path),
) -> Result<MigrateReport, MigrateError> {
    let cluster = sites::load()?;
    let link_bytes = |from: &str| sites::link_bytes(&cluster, from);
    let mut dq = host.qmp(&opts.name, Some(&opts.to_site))?;
    dq.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": capabilities(&opts.qemu_capabilities) }),
    )
    .map_err(qmp_err("destination migrate-set-capabilities"))?;
    if !opts.qemu_parameters.is_empty() {
        // The destination must match (multifd channels and compression, for one).
        dq.execute(
            "migrate-set-parameters",
            Value::Object(opts.qemu_parameters.clone()),
        )
        .map_err(qmp_err("destination migrate-set-parameters"))?;
    }
    let (codec, codec_note) = opts.effective_codec();
    // The incoming socket relative to the VM dir: the far node's target and the key of the
    // source node's record of the stream.
    let rel = sites::vm_relative(&cluster, incoming_sock, "the incoming socket")?;
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let disk_sync = match disk {
        Some(d) => {
            let rel = sites::vm_relative(
                &cluster,
                &tern_disk::daemon::DiskPaths::in_dir(&d.dest_dir).repl,
                "the disk replication socket",
            )?;
            Some(crate::disk::sync(
                &d.src_dir,
                from,
                &opts.to_site,
                &rel,
                opts.stall_timeout,
                opts.timeout,
                opts.progress,
                || link_bytes(from),
            )?)
        }
        None => None,
    };
    let _ = sq.events();
    let wire0 = link_bytes(from);
    let t0 = Instant::now();
    let t0_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    match opts.route {
        Route::Tern => {
            if !wait_for(incoming_sock, Duration::from_secs(10)) {
                return Err(MigrateError::Refused(format!(
                    "destination QEMU did not open {}",
                    incoming_sock.display()
                )));
            }
            let stream = crate::relay::open(
                &sites::migrate_socket(&cluster, from)?,
                &sites::node_name(&cluster, &opts.to_site)?,
                &rel,
                codec,
            )
            .map_err(MigrateError::Refused)?;
            sq.execute_with_fd("getfd", json!({"fdname": "tern-mig"}), stream.as_fd())
                .map_err(qmp_err("getfd"))?;
            drop(stream);
            sq.execute("migrate", json!({"uri": "fd:tern-mig"}))
                .map_err(qmp_err("migrate"))?;
        }
        Route::Direct => {
            // QEMU listens once its monitor answers; give the listener a moment.
            std::thread::sleep(Duration::from_millis(200));
            sq.execute("migrate", json!({"uri": uri}))
                .map_err(qmp_err("migrate"))?;
        }
    }
    let mut monitor = Monitor::new(0, opts.stall_timeout.as_millis() as u64);
    let mut smart = opts
        .smart_stop
        .then(|| SmartStop::new(opts.downtime_limit_ms, 3, 30));
    let mut last_print = 0u64;
    let tty = opts.progress && unsafe_isatty_stderr();
    let final_info = loop {
        // 50 ms: smart stop must see each pass's dirty set before QEMU's next sync.
        std::thread::sleep(Duration::from_millis(50));
        let v = sq
            .execute("query-migrate", Value::Null)
            .map_err(qmp_err("query-migrate"))?;
        let now = now_ms(t0);
        let sample = Sample::from_qmp(&v);
        if let Some(ctl) = &mut smart
            && ctl.on_sample(now, &sample)
        {
            sq.execute(
                "migrate-set-parameters",
                json!({ "downtime-limit": smartstop::FORCE_DOWNTIME_MS }),
            )
            .map_err(qmp_err("force the switchover"))?;
            if opts.progress {
                let d = ctl.log.last().expect("a decision was logged");
                eprintln!(
                    "\nsmart stop at pass {}: {} dirty pages (~{} ms): {}",
                    d.iteration, d.dirty_pages, d.est_downtime_ms, d.reason
                );
            }
        }
        let verdict = monitor.on_sample(now, sample);
        if opts.progress && (tty || now - last_print >= 2000 || verdict != Verdict::Running) {
            last_print = now;
            let line = progress_line(monitor.progress());
            let mut e = std::io::stderr();
            if tty {
                let _ = write!(e, "\r{line}");
            } else {
                let _ = writeln!(e, "{line}");
            }
        }
        match verdict {
            Verdict::Running if t0.elapsed() > opts.timeout => {
                return Err(MigrateError::Aborted {
                    reason: format!("timed out after {:?}", opts.timeout),
                    site: String::new(),
                    state: String::new(),
                });
            }
            Verdict::Running => {}
            Verdict::Completed => break v,
            Verdict::Failed => {
                let why = v["error-desc"].as_str().unwrap_or("no reason given");
                return Err(MigrateError::Aborted {
                    reason: format!("failed in QEMU: {why}"),
                    site: String::new(),
                    state: String::new(),
                });
            }
            Verdict::Stalled => {
                return Err(MigrateError::Aborted {
                    reason: format!(
                        "stalled: nothing sent for {} s (link cut or peer gone?)",
                        opts.stall_timeout.as_secs()
                    ),
                    site: String::new(),
                    state: String::new(),
                });
            }
        }
    };
    if tty {
        eprintln!();
    }
    let progress: Progress = monitor.progress().clone();
    // Downtime: source STOP to destination RESUME (or, paused, to its completion).
    let stop = sq
        .wait_event("STOP", Duration::from_secs(5))
        .map_err(qmp_err("waiting for the source's STOP event"))?;
    let mut memory = None;
    let mut disk_report = None;
    let mut switchover_ms = 0.0;
    let end_event = if opts.check_memory || disk.is_some() {
        let done = wait_dest_migration_done(&mut dq)?;
        if opts.check_memory {
            let m = compare_memory(
                sq,
                &mut dq,
                &dest.dir,
                src_mem_bytes(host, &opts.name, from)?,
            )?;
            memory = Some(m);
        }
        if let (Some(d), Some(synced)) = (disk, disk_sync) {
            switchover_ms = crate::disk::switchover(&d.src_dir, &d.dest_dir)?;
            let r = crate::disk::report(
                &d.src_dir,
                &d.source_volume,
                &d.dest_volume,
                d.dest_existed,
                synced,
                switchover_ms,
                opts.check_disk,
            )?;
            if r.identical == Some(false) {
                return Err(MigrateError::Aborted {
                    reason: format!(
                        "the volumes differ at switchover ({} vs {})",
                        d.source_volume.display(),
                        d.dest_volume.display()
                    ),
                    site: String::new(),
                    state: String::new(),
                });
            }
            disk_report = Some(r);
        }
        // The point of no return for a paused destination: from here on it may run.
        pending.phase = Phase::Committed;
        settle::write_record(record, pending).map_err(|source| MigrateError::Io {
            what: format!("write {}", record.display()),
            source,
        })?;
        dq.execute("cont", Value::Null)
            .map_err(qmp_err("resume the destination"))?;
        done
    } else {
        dq.wait_event("RESUME", Duration::from_secs(30))
            .map_err(qmp_err("waiting for the destination's RESUME event"))?
    };
    // To the destination's resume (or load completion), by QEMU's clock: the RAM
    // comparison of --check-memory does not count.
    let total_s = end_event.timestamp_us.saturating_sub(t0_unix_us) as f64 / 1e6;
    let wire_bytes = link_bytes(from).saturating_sub(wire0);
    let downtime_ms =
        (end_event.timestamp_us.saturating_sub(stop.timestamp_us)) as f64 / 1000.0 + switchover_ms;
    host.promote(&opts.name, &opts.to_site)?;
    // The source's switch port is gone with it: the announce now moves the MAC.
    announce(&mut dq);
    settle::remove_record(record);

    let guest_verify = if opts.guest_verify_passes > 0 && dest.workload.is_some() {
        Some(wait_guest_verify(
            &dest.serial_log,
            opts.guest_verify_passes,
        )?)
    } else {
        None
    };
    let mut checks = Vec::new();
    if let Some(m) = &memory {
        checks.push(m.pages_differing == 0);
    }
    if let Some(g) = &guest_verify {
        checks.push(g.failures == 0 && g.passes_ok >= opts.guest_verify_passes);
    }
    if let Some(same) = disk_report.as_ref().and_then(|d| d.identical) {
        checks.push(same);
    }
    let verified = (!checks.is_empty()).then(|| checks.iter().all(|&c| c));
    let codec_report =
        (opts.route == Route::Tern && (codec.any() || codec_note.is_some())).then(|| {
            let record = codec
                .any()
                .then(|| source_record(from, &rel, started_unix_ms))
                .flatten();
            CodecReport {
                options: codec.to_string(),
                note: codec_note,
                stream_bytes: record.as_ref().map(|r| r.wire_bytes),
                stats: record.and_then(|r| r.stats),
            }
        });
    Ok(MigrateReport {
        name: opts.name.clone(),
        from: from.to_string(),
        to: opts.to_site.clone(),
        route: opts.route,
        cc: (opts.route == Route::Direct).then(|| opts.cc.clone()),
        profile: cluster.profile.clone(),
        total_s,
        downtime_ms,
        qemu_downtime_ms: final_info["downtime"].as_u64().unwrap_or(0),
        qemu_bytes: final_info["ram"]["transferred"]
            .as_u64()
            .unwrap_or(progress.transferred_bytes),
        wire_bytes,
        iterations: final_info["ram"]["dirty-sync-count"]
            .as_u64()
            .unwrap_or(progress.iterations),
        verified,
        memory,
        guest_verify,
        qemu_capabilities: opts.qemu_capabilities.clone(),
        codec: codec_report,
        smart_stop: smart.map(|c| SmartStopReport {
            stop_reason: c.stop_reason().map(str::to_string),
            decisions: c.log,
        }),
        disk: disk_report,
    })
}

/// The source node's record of this migration's stream (it ends a round trip after QEMU's
/// completion); `None` if it does not show up within 10 s.
fn source_record(
    site: &str,
    rel: &str,
    since_unix_ms: u64,
) -> Option<tern_node::status::MigrationRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let control = sites::load().and_then(|c| Ok(sites::site(&c, site)?.control.clone()));
        if let Ok(st) = control.and_then(|p| {
            tern_node::request_status(&p).map_err(|e| MigrateError::Refused(e.to_string()))
        }) && let Some(r) = st.migration_log.into_iter().rev().find(|r| {
            r.role == "source" && r.path == rel && r.started_unix_ms + 1000 >= since_unix_ms
        }) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unsafe_isatty_stderr() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

fn src_mem_bytes(host: &VmHost, name: &str, site: &str) -> Result<u64, MigrateError> {
    let rec = host.record(name, Some(site))?;
    Ok(tern_vm::vm::ram_kib(rec.spec.mem_mib) * 1024)
}

fn wait_dest_migration_done(dq: &mut QmpClient) -> Result<tern_vm::Event, MigrateError> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = dq
            .wait_event("MIGRATION", end.saturating_duration_since(Instant::now()))
            .map_err(qmp_err("waiting for the destination to finish loading"))?;
        match ev.data["status"].as_str() {
            Some("completed") => return Ok(ev),
            Some("failed") => {
                return Err(MigrateError::Refused(
                    "the destination failed to load the migration stream".into(),
                ));
            }
            _ => {}
        }
    }
}

/// Dumps both guests' RAM (`pmemsave`) and compares it page by page.
fn compare_memory(
    sq: &mut QmpClient,
    dq: &mut QmpClient,
    dest_dir: &Path,
    bytes: u64,
) -> Result<MemCompare, MigrateError> {
    let dir: PathBuf = dest_dir.to_path_buf();
    let (a, b) = (dir.join("mem-source.bin"), dir.join("mem-dest.bin"));
    for (q, f) in [(&mut *sq, &a), (&mut *dq, &b)] {
        q.set_command_timeout(Duration::from_secs(120));
        q.execute(
            "pmemsave",
            json!({"val": 0, "size": bytes, "filename": f.to_string_lossy()}),
        )
        .map_err(qmp_err(format!("pmemsave to {}", f.display())))?;
    }
    let mut r = memcmp::compare_files(&a, &b).map_err(|source| MigrateError::Io {
        what: "compare RAM dumps".into(),
        source,
    });
    if let Ok(m) = &mut r
        && m.pages_differing > 0
    {
        // Keep both dumps for diagnosis (the VM directories go away with the instances).
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let keep = Path::new(EVIDENCE_DIR).join(format!("memcmp-{stamp}"));
        if std::fs::create_dir_all(&keep).is_ok()
            && std::fs::copy(&a, keep.join("mem-source.bin")).is_ok()
            && std::fs::copy(&b, keep.join("mem-dest.bin")).is_ok()
        {
            m.evidence = Some(keep.display().to_string());
        }
    }
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}

/// Where RAM dumps that differ are kept.
const EVIDENCE_DIR: &str = "/var/lib/tern/evidence";

/// Waits for `passes` verification lines in the destination's serial log (which only holds
/// what the guest printed after it resumed there), or the first failure.
fn wait_guest_verify(log: &Path, passes: u32) -> Result<GuestVerify, MigrateError> {
    let end = Instant::now() + GUEST_VERIFY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let (ok, bad, last) = guest_verify_lines(&text);
        if bad > 0 || ok >= passes || Instant::now() > end {
            return Ok(GuestVerify {
                passes_ok: ok,
                failures: bad,
                last_line: last,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long the guest may take for its verification passes after a migration.
const GUEST_VERIFY_TIMEOUT: Duration = Duration::from_secs(180);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_guest_verify_lines() {
        let log = "boot\ntern-guest: ready workload=web-db\ntern-guest: verify ok pass=1 records=9\n\
                   noise\ntern-guest: verify ok pass=2 records=9\n";
        assert_eq!(
            guest_verify_lines(log),
            (2, 0, "tern-guest: verify ok pass=2 records=9".into())
        );
        let (ok, bad, last) = guest_verify_lines("tern-guest: verify FAIL pass=3 record=7\n");
        assert_eq!((ok, bad), (0, 1));
        assert!(last.contains("FAIL"));
    }
}
