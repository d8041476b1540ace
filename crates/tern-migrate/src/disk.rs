//! `tern migrate --with-disk`: the volume moves with the VM (CloudNet's choreography).
//!
//! ```text
//! source disk server (primary) ──replicate, auto──▶ destination disk server (secondary)
//!   1. initial sync: hash compare, holes/zeros/duplicates skipped, zstd    (async acks)
//!   2. in sync and backlog drained: auto turns synchronous                (guest writes wait)
//!   3. memory migration; QEMU stops the source; destination loads paused
//!   4. switchover: replication stopped at the source (nothing in flight: synchronous),
//!      destination promoted (refused unless its copy is consistent), volumes compared by
//!      hash, destination resumed; the source's server goes with the source instance
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tern_disk::daemon::{self, DiskPaths};
use tern_disk::volume;

use crate::run::MigrateError;

/// Where destination volumes go by default: `/var/lib/tern/volumes/SITE/NAME.img`.
pub const VOLUME_DIR: &str = "/var/lib/tern/volumes";

pub fn default_dest_volume(name: &str, site: &str) -> PathBuf {
    Path::new(VOLUME_DIR).join(site).join(format!("{name}.img"))
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub source_volume: PathBuf,
    pub dest_volume: PathBuf,
    pub size: u64,
    /// The destination already held a copy of the same size (incremental re-sync).
    pub dest_existed: bool,
    /// From `replicate` to "in sync and synchronous".
    pub sync_s: f64,
    /// IP bytes the source site put on the link during the disk phase.
    pub sync_wire_bytes: u64,
    /// Replication bytes the source's disk server sent in all (disk phase and live writes).
    pub stream_bytes: u64,
    pub blocks: u64,
    pub blocks_same: u64,
    pub zero_bytes: u64,
    pub copy_bytes: u64,
    pub data_raw_bytes: u64,
    pub data_wire_bytes: u64,
    pub live_writes: u64,
    /// Stop replication + promote, while the guest is paused (part of the downtime).
    pub switchover_ms: f64,
    /// Source and destination volumes compared by content at switchover.
    pub identical: Option<bool>,
    pub digest: Option<String>,
}

pub(crate) fn refused(msg: impl Into<String>) -> MigrateError {
    MigrateError::Refused(msg.into())
}

/// Creates the destination volume (sparse, the source's size) unless a same-size one
/// exists; returns whether it existed.
pub fn prepare_dest_volume(src: &Path, dest: &Path) -> Result<bool, MigrateError> {
    let size = volume::size_of(src).map_err(|e| refused(e.to_string()))?;
    if dest.exists() {
        let have = volume::size_of(dest).map_err(|e| refused(e.to_string()))?;
        if have != size {
            return Err(refused(format!(
                "destination volume {} is {have} bytes, the source's {size}; remove it or give \
                 --dest-volume",
                dest.display()
            )));
        }
        return Ok(true);
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| refused(format!("create {}: {e}", dir.display())))?;
    }
    volume::create(dest, size).map_err(|e| refused(e.to_string()))?;
    Ok(false)
}

fn status(dir: &Path) -> Result<Value, MigrateError> {
    daemon::status(dir).map_err(|e| refused(format!("disk server: {e}")))
}

/// Phases 1–2: replicate until the destination is in sync and writes are synchronous.
#[allow(clippy::too_many_arguments)]
pub fn sync(
    src_dir: &Path,
    from: &str,
    to: &str,
    dest_rel: &str,
    stall: Duration,
    timeout: Duration,
    progress: bool,
    link_bytes: impl Fn() -> u64,
) -> Result<(f64, u64), MigrateError> {
    let t0 = Instant::now();
    let wire0 = link_bytes();
    let cluster = crate::sites::load()?;
    tern_disk::server::request(
        &DiskPaths::in_dir(src_dir).control,
        &json!({
            "cmd": "replicate",
            "node": crate::sites::migrate_socket(&cluster, from)?,
            "peer": crate::sites::node_name(&cluster, to)?,
            "target": dest_rel,
            "mode": "auto",
        }),
    )
    .map_err(|e| refused(format!("start disk replication: {e}")))?;
    let mut last_out = 0u64;
    let mut last_change = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(1);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let st = status(src_dir)?;
        let out = st["stats"]["bytes_out"].as_u64().unwrap_or(0);
        if out != last_out {
            last_out = out;
            last_change = Instant::now();
        }
        if progress && last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            eprint!(
                "\rdisk: {:>5}/{} blocks scanned, {:>8.1} MB sent, {}{}   ",
                st["scanned_blocks"].as_u64().unwrap_or(0),
                st["blocks"].as_u64().unwrap_or(0),
                out as f64 / 1e6,
                st["phase"].as_str().unwrap_or("?"),
                if st["synchronous"] == json!(true) {
                    ", synchronous"
                } else {
                    ""
                }
            );
        }
        if st["in_sync"] == json!(true) && st["synchronous"] == json!(true) {
            if progress {
                eprintln!(
                    "\rdisk: in sync after {:.1} s, {:.1} MB sent; replication is synchronous",
                    t0.elapsed().as_secs_f64(),
                    out as f64 / 1e6
                );
            }
            return Ok((
                t0.elapsed().as_secs_f64(),
                link_bytes().saturating_sub(wire0),
            ));
        }
        if last_change.elapsed() > stall || t0.elapsed() > timeout {
            return Err(MigrateError::Aborted {
                reason: format!(
                    "disk replication made no progress for {} s ({})",
                    stall.as_secs(),
                    st["last_error"].as_str().unwrap_or("no error reported")
                ),
                site: String::new(),
                state: String::new(),
            });
        }
    }
}

/// Phase 4 while both guests are paused: stop replication, promote the destination.
/// Returns the time it took, ms.
pub fn switchover(src_dir: &Path, dest_dir: &Path) -> Result<f64, MigrateError> {
    let t0 = Instant::now();
    let st = status(src_dir)?;
    if st["in_sync"] != json!(true) || st["backlog_bytes"].as_u64() != Some(0) {
        return Err(refused(format!(
            "the destination volume is not in sync at switchover (phase {}, backlog {} bytes, \
             {})",
            st["phase"],
            st["backlog_bytes"],
            st["last_error"].as_str().unwrap_or("no error")
        )));
    }
    tern_disk::server::request(
        &DiskPaths::in_dir(src_dir).control,
        &json!({"cmd": "stop-replication"}),
    )
    .map_err(|e| refused(format!("stop replication: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tern_disk::server::request(
            &DiskPaths::in_dir(dest_dir).control,
            &json!({"cmd": "promote"}),
        ) {
            Ok(_) => break,
            // The session's end travels through both nodes; give it a moment.
            Err(e) if e.contains("still active") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(refused(format!("promote the destination volume: {e}"))),
        }
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// The report, from the source server's counters and an optional content comparison.
pub fn report(
    src_dir: &Path,
    source_volume: &Path,
    dest_volume: &Path,
    dest_existed: bool,
    (sync_s, sync_wire_bytes): (f64, u64),
    switchover_ms: f64,
    compare: bool,
) -> Result<DiskReport, MigrateError> {
    let st = status(src_dir)?;
    let s = &st["stats"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let (identical, digest) = if compare {
        let v = volume::verify(source_volume, dest_volume).map_err(|e| refused(e.to_string()))?;
        (Some(v.equal), Some(v.digest_b))
    } else {
        (None, None)
    };
    Ok(DiskReport {
        source_volume: source_volume.to_path_buf(),
        dest_volume: dest_volume.to_path_buf(),
        size: st["size"].as_u64().unwrap_or(0),
        dest_existed,
        sync_s,
        sync_wire_bytes,
        stream_bytes: n("bytes_out"),
        blocks: st["blocks"].as_u64().unwrap_or(0),
        blocks_same: n("blocks_same"),
        zero_bytes: n("zero_bytes"),
        copy_bytes: n("copy_bytes"),
        data_raw_bytes: n("data_raw_bytes"),
        data_wire_bytes: n("data_wire_bytes"),
        live_writes: n("live_writes"),
        switchover_ms,
        identical,
        digest,
    })
}
