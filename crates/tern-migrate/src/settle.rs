//! Settling a migration that failed or whose `tern migrate` died (docs/migration.md,
//! "Point of no return").
//!
//! The rule: once the destination may have run, the source is never resumed; it is quit and
//! the destination goes on. While the destination certainly has not run (it is still
//! loading, or was started paused and tern never resumed it), the destination is killed
//! *first* and then the source may resume. [`decide`] is that rule as a pure function of
//! what both QEMUs report and of the [`PendingMigration`] record `tern migrate` writes
//! atomically before it sends the `migrate` command (phase `streaming`) and again before it
//! resumes a paused destination (phase `committed`). `tern migrate --recover NAME` reads the
//! record, queries both QEMUs and applies the same decision.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name, in the VM's directory (`/run/tern/vm/NAME/`).
pub const RECORD_FILE: &str = "migration.json";

/// Where a migration stands, as far as the destination's right to run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// `migrate` may have been sent; a destination started paused has not been resumed.
    Streaming,
    /// tern decided the destination runs (written before its `cont`); no way back.
    Committed,
}

/// What recovery needs to know about a migration in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMigration {
    pub name: String,
    pub from: String,
    pub to: String,
    /// The destination was started with `-S`: it cannot run before tern's `cont`. Without
    /// it QEMU starts the destination by itself as soon as it has loaded the stream.
    pub dest_paused_start: bool,
    /// The volume moves too; it is switched over before the phase becomes `committed`.
    pub with_disk: bool,
    /// The source was running when the migration began (a paused VM stays paused).
    pub source_was_running: bool,
    pub phase: Phase,
    pub started_unix_ms: u64,
    /// The `tern migrate` process driving it: `--recover` refuses while it lives.
    #[serde(default)]
    pub driver_pid: u32,
}

/// Whether the process that wrote `rec` still runs (and is a tern: a recycled pid is not).
pub fn driver_alive(rec: &PendingMigration) -> bool {
    rec.driver_pid != 0
        && rec.driver_pid != std::process::id()
        && std::fs::read(format!("/proc/{}/cmdline", rec.driver_pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("tern"))
}

/// The source QEMU as queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Running,
    /// Paused, and its migration did not complete.
    Paused,
    /// It sent everything (`postmigrate`, or its migration reports `completed`).
    Migrated,
    /// Gone, or its QMP does not answer.
    Unavailable,
}

/// The destination QEMU as queried *after* tern sent it `stop` (which also clears QEMU's
/// autostart while it is still loading, so it cannot start between the query and the
/// action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// It was running when first queried: it has run.
    Running,
    /// Alive, not running, done loading (or any other state but `inmigrate`).
    Loaded,
    /// Still loading (`inmigrate`): it never ran.
    Loading,
    /// The process is gone.
    Gone,
    /// Alive but its QMP does not answer.
    Unresponsive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub source: Source,
    pub dest: Dest,
    pub phase: Phase,
    pub dest_paused_start: bool,
    pub with_disk: bool,
    /// `tern migrate` itself failed before committing (a check or a step went wrong): go
    /// back if that is still safe. `false` under `--recover` (nothing was found wrong).
    pub reject_dest: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The destination goes on: resume it if paused, quit the source, make it the primary.
    Forward { resume_dest: bool },
    /// Kill the destination first, then resume the source if it is paused.
    Rollback { resume_source: bool },
    /// Neither is safe: leave both as they are and keep the record.
    Stuck(Stuck),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stuck {
    #[error("the destination's QMP does not answer, so whether it ran is unknown")]
    DestUnresponsive,
    #[error("the destination is gone and may have run: the source must not resume")]
    DestGoneMayHaveRun,
    #[error("the source is gone and the destination never finished loading")]
    NothingLoaded,
    #[error("the source is gone and the destination was refused before it ran")]
    RefusedDestOnly,
    #[error("the source is gone and the destination's volume was never switched over")]
    VolumeNotSwitched,
    #[error("the record says committed but the destination is still loading")]
    Inconsistent,
}

/// The settling rule (module doc).
pub fn decide(f: Facts) -> Action {
    let resume_source = f.source != Source::Running;
    let source_ok = f.source != Source::Unavailable;
    let committed = f.phase == Phase::Committed;
    match f.dest {
        Dest::Running => Action::Forward { resume_dest: false },
        Dest::Unresponsive => Action::Stuck(Stuck::DestUnresponsive),
        Dest::Loaded => {
            // Loaded and started without -S: QEMU started it itself (someone paused it
            // since); committed: tern may have resumed it.
            if committed || !f.dest_paused_start {
                return Action::Forward { resume_dest: true };
            }
            // Never ran. The volume is switched over only on the way to `committed`, so
            // with a disk the way forward is not ready: go back.
            let back = f.reject_dest || f.with_disk;
            match (back, source_ok) {
                (false, _) => Action::Forward { resume_dest: true },
                (true, true) => Action::Rollback { resume_source },
                (true, false) if f.with_disk => Action::Stuck(Stuck::VolumeNotSwitched),
                (true, false) => Action::Stuck(Stuck::RefusedDestOnly),
            }
        }
        Dest::Loading if committed => Action::Stuck(Stuck::Inconsistent),
        Dest::Loading if source_ok => Action::Rollback { resume_source },
        Dest::Loading => Action::Stuck(Stuck::NothingLoaded),
        Dest::Gone => {
            // Could it have run before it died? Only if tern committed, or QEMU could have
            // started it itself once the source had sent everything.
            let may_have_run = committed
                || (!f.dest_paused_start
                    && matches!(f.source, Source::Migrated | Source::Unavailable));
            match f.source {
                Source::Running if !committed => Action::Rollback {
                    resume_source: false,
                },
                _ if may_have_run => Action::Stuck(Stuck::DestGoneMayHaveRun),
                Source::Unavailable => Action::Stuck(Stuck::NothingLoaded),
                _ => Action::Rollback { resume_source },
            }
        }
    }
}

/// Classifies the source from `query-status` and `query-migrate` (`None`: no answer).
pub fn source_from(status: Option<&str>, migration: Option<&str>) -> Source {
    match (status, migration) {
        (None, _) => Source::Unavailable,
        (Some("running"), _) => Source::Running,
        (Some("postmigrate"), _) | (_, Some("completed")) => Source::Migrated,
        _ => Source::Paused,
    }
}

/// Classifies the destination from its `query-status` before and after tern's `stop`.
pub fn dest_from(alive: bool, before: Option<&str>, after: Option<&str>) -> Dest {
    match (alive, before, after) {
        (false, _, _) => Dest::Gone,
        (true, Some("running"), _) | (true, _, Some("running")) => Dest::Running,
        (true, None, _) | (true, _, None) => Dest::Unresponsive,
        (true, _, Some("inmigrate")) => Dest::Loading,
        (true, _, _) => Dest::Loaded,
    }
}

/// The record's path for VM `name` under the VM root.
pub fn record_path(vm_root: &Path, name: &str) -> PathBuf {
    vm_root.join(name).join(RECORD_FILE)
}

/// Writes the record atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_record(path: &Path, rec: &PendingMigration) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The record, if there is one.
pub fn read_record(path: &Path) -> std::io::Result<Option<PendingMigration>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn remove_record(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: [Source; 4] = [
        Source::Running,
        Source::Paused,
        Source::Migrated,
        Source::Unavailable,
    ];
    const DESTS: [Dest; 5] = [
        Dest::Running,
        Dest::Loaded,
        Dest::Loading,
        Dest::Gone,
        Dest::Unresponsive,
    ];

    fn all_facts() -> Vec<Facts> {
        let mut v = Vec::new();
        for source in SOURCES {
            for dest in DESTS {
                for phase in [Phase::Streaming, Phase::Committed] {
                    for dest_paused_start in [false, true] {
                        for with_disk in [false, true] {
                            // A volume move always starts the destination paused.
                            if with_disk && !dest_paused_start {
                                continue;
                            }
                            for reject_dest in [false, true] {
                                v.push(Facts {
                                    source,
                                    dest,
                                    phase,
                                    dest_paused_start,
                                    with_disk,
                                    reject_dest,
                                });
                            }
                        }
                    }
                }
            }
        }
        v
    }

    /// Whether the destination may have run, from the facts alone (the safety oracle).
    fn dest_may_have_run(f: &Facts) -> bool {
        match f.dest {
            Dest::Running => true,
            Dest::Loading => false,
            Dest::Loaded => f.phase == Phase::Committed || !f.dest_paused_start,
            // QEMU can only have started it once the source had written everything, and
            // then the source reports completion (or is gone itself).
            Dest::Gone => {
                f.phase == Phase::Committed
                    || !f.dest_paused_start
                        && matches!(f.source, Source::Migrated | Source::Unavailable)
            }
            Dest::Unresponsive => true,
        }
    }

    /// Every combination: never resume the source when the destination may have run;
    /// never roll back to a source that is gone; never resume a destination that is gone.
    #[test]
    fn the_source_never_resumes_once_the_destination_may_have_run() {
        let facts = all_facts();
        assert_eq!(facts.len(), 4 * 5 * 2 * 3 * 2);
        for f in facts {
            let a = decide(f);
            if dest_may_have_run(&f) {
                assert!(!matches!(a, Action::Rollback { .. }), "{f:?} -> {a:?}");
            }
            if let Action::Rollback { resume_source } = a {
                assert_ne!(f.source, Source::Unavailable, "{f:?}");
                assert_eq!(resume_source, f.source != Source::Running, "{f:?}");
            }
            if let Action::Forward { resume_dest } = a {
                assert!(matches!(f.dest, Dest::Running | Dest::Loaded), "{f:?}");
                assert_eq!(resume_dest, f.dest == Dest::Loaded, "{f:?}");
            }
        }
    }

    fn f(source: Source, dest: Dest, phase: Phase, paused: bool) -> Facts {
        Facts {
            source,
            dest,
            phase,
            dest_paused_start: paused,
            with_disk: false,
            reject_dest: false,
        }
    }

    #[test]
    fn the_brief_cases() {
        use Action::*;
        use Dest as D;
        use Phase::*;
        use Source as S;
        // Destination running: it goes on, whatever the source and the record say.
        for s in SOURCES {
            assert_eq!(
                decide(f(s, D::Running, Streaming, false)),
                Forward { resume_dest: false }
            );
        }
        // Completed and paused: resume it (recovery), even started with -S.
        assert_eq!(
            decide(f(S::Migrated, D::Loaded, Streaming, true)),
            Forward { resume_dest: true }
        );
        assert_eq!(
            decide(f(S::Migrated, D::Loaded, Committed, true)),
            Forward { resume_dest: true }
        );
        // tern migrate found something wrong before it resumed a paused destination: back.
        let mut rejected = f(S::Migrated, D::Loaded, Streaming, true);
        rejected.reject_dest = true;
        assert_eq!(
            decide(rejected),
            Rollback {
                resume_source: true
            }
        );
        // ... but not once it may have run (QEMU started it itself).
        rejected.dest_paused_start = false;
        assert_eq!(decide(rejected), Forward { resume_dest: true });
        // The destination never completed: the source resumes.
        assert_eq!(
            decide(f(S::Paused, D::Loading, Streaming, false)),
            Rollback {
                resume_source: true
            }
        );
        assert_eq!(
            decide(f(S::Running, D::Gone, Streaming, false)),
            Rollback {
                resume_source: false
            }
        );
        // Gone after the source sent everything, started without -S: it may have run.
        assert_eq!(
            decide(f(S::Migrated, D::Gone, Streaming, false)),
            Stuck(super::Stuck::DestGoneMayHaveRun)
        );
        // Started with -S and never resumed: it did not run, the source may resume.
        assert_eq!(
            decide(f(S::Migrated, D::Gone, Streaming, true)),
            Rollback {
                resume_source: true
            }
        );
        assert_eq!(
            decide(f(S::Migrated, D::Gone, Committed, true)),
            Stuck(super::Stuck::DestGoneMayHaveRun)
        );
        assert_eq!(
            decide(f(S::Unavailable, D::Loading, Streaming, false)),
            Stuck(super::Stuck::NothingLoaded)
        );
        // A volume move not switched over goes back, if the source is there.
        let mut disk = f(S::Migrated, D::Loaded, Streaming, true);
        disk.with_disk = true;
        assert_eq!(
            decide(disk),
            Rollback {
                resume_source: true
            }
        );
        disk.source = S::Unavailable;
        assert_eq!(decide(disk), Stuck(super::Stuck::VolumeNotSwitched));
    }

    #[test]
    fn qemu_states_classify() {
        assert_eq!(
            source_from(Some("running"), Some("active")),
            Source::Running
        );
        assert_eq!(source_from(Some("postmigrate"), None), Source::Migrated);
        assert_eq!(
            source_from(Some("paused"), Some("completed")),
            Source::Migrated
        );
        assert_eq!(
            source_from(Some("paused"), Some("cancelled")),
            Source::Paused
        );
        assert_eq!(source_from(None, None), Source::Unavailable);
        assert_eq!(dest_from(false, None, None), Dest::Gone);
        assert_eq!(
            dest_from(true, Some("running"), Some("paused")),
            Dest::Running
        );
        assert_eq!(
            dest_from(true, Some("inmigrate"), Some("inmigrate")),
            Dest::Loading
        );
        // It finished loading (and started) between the two queries: counted as loaded,
        // never as loading.
        assert_eq!(
            dest_from(true, Some("inmigrate"), Some("paused")),
            Dest::Loaded
        );
        assert_eq!(
            dest_from(true, Some("prelaunch"), Some("prelaunch")),
            Dest::Loaded
        );
        assert_eq!(dest_from(true, None, None), Dest::Unresponsive);
    }

    #[test]
    fn the_record_round_trips_atomically() {
        let dir = std::env::temp_dir().join(format!("tern-settle-{}", std::process::id()));
        let path = record_path(&dir, "vm1");
        assert_eq!(read_record(&path).unwrap(), None);
        let mut rec = PendingMigration {
            name: "vm1".into(),
            from: "a".into(),
            to: "b".into(),
            dest_paused_start: true,
            with_disk: false,
            source_was_running: true,
            phase: Phase::Streaming,
            started_unix_ms: 7,
            driver_pid: std::process::id(),
        };
        assert!(!driver_alive(&rec), "our own process does not count");
        write_record(&path, &rec).unwrap();
        rec.phase = Phase::Committed;
        write_record(&path, &rec).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(rec));
        assert!(!path.with_extension("json.tmp").exists());
        remove_record(&path);
        assert_eq!(read_record(&path).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
