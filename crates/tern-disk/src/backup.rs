//! The backup's write log and its applier (driver of `wal.rs`).
//!
//! A secondary keeps its log in `VOLUME.wal`. While its copy is consistent, every replicated
//! change is appended there (and made durable before the ACK); the applier thread moves
//! records into the volume as their dependencies on the group's other disks are met, and
//! empties the log (after an fdatasync of the volume) whenever it has caught up. Peers'
//! applied counters are read from their backups' counter pages (`--backup-peer MAC=PAGE`);
//! this backup publishes its own in its counter page. See `docs/dr.md`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::counters::CounterPage;
use crate::secondary::Op;
use crate::wal::{self, Backlog, Mac, Record};

/// At failover, how long the peers' applied counters must stay still before the records
/// that still wait for them are dropped.
pub const SETTLE_QUIET: Duration = Duration::from_millis(1000);
/// The applier empties a caught-up log once it is this long, or once no change arrived for
/// [`CHECKPOINT_IDLE`] (emptying costs an fdatasync of the volume and of the log, which a
/// stream of synchronous writes should not wait behind).
pub const CHECKPOINT_BYTES: u64 = 16 << 20;
pub const CHECKPOINT_IDLE: Duration = Duration::from_millis(500);

pub fn log_path(volume: &Path) -> PathBuf {
    let mut p = volume.as_os_str().to_owned();
    p.push(".wal");
    PathBuf::from(p)
}

/// Where [`Log::reset`] writes the emptied log before renaming it over the old one.
fn reset_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LogStatus {
    /// Records logged and not yet applied, and their bytes.
    pub records: usize,
    pub bytes: u64,
    /// The guest write the volume holds up to (published to the group's other backups).
    pub applied_write: u64,
    /// The peer write the first record waits for, as `MAC=count`.
    pub waiting_for: Option<String>,
    /// Records dropped at failover (they depended on writes a peer's backup never got).
    pub discarded: u64,
    /// The backlog reached its bound ([`wal::MAX_BACKLOG_BYTES`], records) and the
    /// replication session waited for room (counter), and whether it waits now.
    pub full_waits: u64,
    pub full_now: bool,
    /// Peers (`MAC`) whose backup's counter page cannot be opened: their applied counter
    /// reads as 0, so every record that depends on them waits.
    pub missing_peer_pages: Vec<String>,
    /// The backup failed (an I/O error applying a logged write to the volume): it applies
    /// nothing more, keeps every record in its log, takes no replication session and
    /// cannot be promoted until it is restarted (the log is replayed then). DRBD's
    /// `on-io-error detach`.
    pub failed: Option<String>,
    /// Applies of logged writes to the volume that failed (counter).
    pub apply_errors: u64,
}

pub(crate) struct Log {
    file: File,
    path: PathBuf,
    end: u64,
    /// The log's length as of its last fdatasync (each record says it: `wal.rs`).
    durable_end: u64,
    /// The guest write of the last record durable in the log (or the applied write the
    /// volume durably holds): the applied counter published to peers never passes it, so
    /// a peer's backup never applies a write that depends on one a crash here would lose.
    durable_write: u64,
    /// The guest write of the last record appended.
    last_write: u64,
    backlog: Backlog,
    /// Appending (a consistent copy) rather than writing into the volume.
    pub(crate) logging: bool,
    /// Appended since the last fdatasync of the log.
    dirty: bool,
    /// Appends so far: a checkpoint only empties the log if none came in meanwhile.
    appends: u64,
    last_append: Instant,
    /// Applied to the volume since the log was last emptied.
    unsynced: bool,
    /// See [`LogStatus::failed`].
    failed: Option<String>,
    full_waits: u64,
    full_now: bool,
    apply_errors: u64,
    peers: Vec<(Mac, PathBuf, Option<CounterPage>)>,
}

impl Log {
    /// Opens (or creates) the log of `volume` and loads what it holds; a torn tail is cut.
    pub(crate) fn open(
        volume: &Path,
        consistent: bool,
        peers: &[(Mac, PathBuf)],
    ) -> Result<Log, String> {
        let path = log_path(volume);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let bytes = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let c = wal::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut backlog = Backlog::new(c.applied_write);
        let n = c.records.len();
        let last_write = c
            .records
            .iter()
            .map(|r| r.write)
            .fold(c.applied_write, u64::max);
        for r in c.records {
            backlog.push(r);
        }
        if n > 0 {
            eprintln!(
                "tern disk: {}: {n} logged write(s) to apply",
                path.display()
            );
        }
        let mut log = Log {
            file,
            path,
            end: c.valid as u64,
            durable_end: c.valid as u64,
            durable_write: last_write,
            last_write,
            backlog,
            logging: consistent,
            dirty: false,
            appends: 0,
            last_append: Instant::now(),
            unsynced: n > 0,
            failed: None,
            apply_errors: 0,
            full_waits: 0,
            full_now: false,
            peers: peers.iter().map(|(m, p)| (*m, p.clone(), None)).collect(),
        };
        if c.valid == 0 {
            log.reset()?;
        } else if c.valid < bytes.len() {
            log.file
                .set_len(c.valid as u64)
                .and_then(|()| log.file.sync_data())
                .map_err(|e| format!("cut the torn tail of {}: {e}", log.path.display()))?;
        }
        Ok(log)
    }

    /// Empties the log: header only, with the applied write. Crash-safe: the new file is
    /// written and fdatasynced beside the old one, renamed over it and the directory
    /// fsynced, so a crash leaves either the old log or the new one, never an empty or
    /// headerless file.
    fn reset(&mut self) -> Result<(), String> {
        let applied = self.backlog.applied_write();
        let h = wal::header(applied);
        let tmp = reset_path(&self.path);
        let ctx = |what: &str, e: io::Error| format!("reset {}: {what}: {e}", self.path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| ctx("create the new log", e))?;
        file.write_all_at(&h, 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| ctx("write the new log", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| ctx("rename the new log", e))?;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| ctx("fsync the directory", e))?;
        self.file = file;
        self.end = h.len() as u64;
        self.durable_end = self.end;
        self.durable_write = applied;
        self.last_write = applied;
        self.dirty = false;
        self.unsynced = false;
        Ok(())
    }

    /// The applied write peers may rely on: applied here and durable in the log (or in
    /// the volume, after a checkpoint or a completed sync).
    pub(crate) fn published_write(&self) -> u64 {
        self.backlog.applied_write().min(self.durable_write)
    }

    pub(crate) fn status(&self) -> LogStatus {
        LogStatus {
            records: self.backlog.len(),
            bytes: self.backlog.bytes(),
            applied_write: self.backlog.applied_write(),
            waiting_for: self
                .waiting_for()
                .map(|(m, n)| format!("{}={n}", mac_text(&m))),
            discarded: self.backlog.discarded,
            full_waits: self.full_waits,
            full_now: self.full_now,
            missing_peer_pages: self
                .peers
                .iter()
                .filter(|(_, _, p)| p.is_none())
                .map(|(m, _, _)| mac_text(m))
                .collect(),
            failed: self.failed.clone(),
            apply_errors: self.apply_errors,
        }
    }

    /// Why the backup stopped applying (an I/O error at its volume), if it did.
    pub(crate) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The backlog is at its bound: wait ([`Backup::wait_for_room`]) before appending.
    pub(crate) fn backlog_full(&self) -> bool {
        self.backlog.is_full()
    }

    /// Nothing waits to be applied.
    pub(crate) fn is_caught_up(&self) -> bool {
        self.backlog.is_empty()
    }

    /// A completed sync: the volume holds every write up to `w`.
    pub(crate) fn synced_to(&mut self, w: u64) {
        self.backlog.set_applied_write(w);
        self.durable_write = self.durable_write.max(w);
        self.last_write = self.last_write.max(w);
    }

    fn peer_applied(&mut self) -> Vec<(Mac, u64)> {
        self.peers
            .iter_mut()
            .map(|(mac, path, page)| {
                if page.is_none() {
                    *page = CounterPage::open(path).ok();
                }
                // A peer whose backup is not there yet has applied nothing.
                (*mac, page.as_ref().map_or(0, CounterPage::applied))
            })
            .collect()
    }

    fn waiting_for(&self) -> Option<(Mac, u64)> {
        let have: Vec<(Mac, u64)> = self
            .peers
            .iter()
            .map(|(m, _, p)| (*m, p.as_ref().map_or(0, CounterPage::applied)))
            .collect();
        self.backlog.blocked_on(|m| lookup(&have, m))
    }

    /// Appends a change, resolving a COPY against what the copy holds once the backlog is
    /// applied (so replaying the log is idempotent). Durable at the next [`Log::sync`].
    pub(crate) fn append(
        &mut self,
        volume: &impl Fn(u64, &mut [u8]) -> io::Result<()>,
        seq: u64,
        write: u64,
        deps: &[(Mac, u64)],
        op: Op,
    ) -> Result<(), String> {
        let op = match op {
            Op::Copy { offset, src, len } => {
                let mut data = vec![0u8; len as usize];
                volume(src, &mut data).map_err(|e| format!("read the volume at {src}: {e}"))?;
                self.overlay(src, &mut data);
                Op::Write { offset, data }
            }
            op => op,
        };
        let r = Record {
            seq,
            write,
            deps: deps.to_vec(),
            op,
        };
        let mut buf = Vec::with_capacity(r.bytes() as usize + 64);
        wal::encode(&r, self.end, self.durable_end, &mut buf);
        self.file
            .write_all_at(&buf, self.end)
            .map_err(|e| format!("append to {}: {e}", self.path.display()))?;
        self.end += buf.len() as u64;
        self.dirty = true;
        self.appends += 1;
        self.last_append = Instant::now();
        self.last_write = self.last_write.max(r.write);
        self.backlog.push(r);
        Ok(())
    }

    /// What the backlog changes in `[at, at + buf.len())`, applied in order over `buf`.
    fn overlay(&self, at: u64, buf: &mut [u8]) {
        let end = at + buf.len() as u64;
        for r in self.backlog.iter() {
            let (o, len) = match &r.op {
                Op::Write { offset, data } => (*offset, data.len() as u64),
                Op::Zero { offset, len } => (*offset, *len),
                Op::Copy { .. } => unreachable!("logged copies are resolved"),
            };
            let (lo, hi) = (o.max(at), (o + len).min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - at) as usize..(hi - at) as usize];
            match &r.op {
                Op::Write { offset, data } => {
                    dst.copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                }
                _ => dst.fill(0),
            }
        }
    }

    /// fdatasync of what was appended.
    pub(crate) fn sync(&mut self) -> Result<(), String> {
        if self.dirty {
            self.file
                .sync_data()
                .map_err(|e| format!("fdatasync {}: {e}", self.path.display()))?;
            self.dirty = false;
            self.durable_end = self.end;
            self.durable_write = self.last_write;
        }
        Ok(())
    }
}

fn lookup(have: &[(Mac, u64)], m: &Mac) -> Option<u64> {
    have.iter().find(|(p, _)| p == m).map(|(_, n)| *n)
}

struct OpText<'a>(&'a Op);
impl std::fmt::Display for OpText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Op::Write { offset, data } => write!(f, "write {offset}+{}", data.len()),
            Op::Zero { offset, len } => write!(f, "zero {offset}+{len}"),
            Op::Copy { offset, src, len } => write!(f, "copy {src}->{offset}+{len}"),
        }
    }
}

fn mac_text(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The log, shared by the replication session (appends), the applier and the control
/// socket (status, failover).
pub(crate) struct Backup {
    log: Mutex<Log>,
    cond: Condvar,
    page: Option<Arc<CounterPage>>,
}

impl Backup {
    pub(crate) fn new(log: Log, page: Option<Arc<CounterPage>>) -> Backup {
        if let Some(p) = &page {
            p.publish_applied(log.published_write());
        }
        Backup {
            log: Mutex::new(log),
            cond: Condvar::new(),
            page,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wake(&self) {
        self.cond.notify_all();
    }

    /// Publishes the applied counter, never past what is durable ([`Log::published_write`]).
    pub(crate) fn publish(&self, l: &Log) {
        if let Some(p) = &self.page {
            p.publish_applied(l.published_write());
        }
    }

    /// Waits while the backlog is full ([`Backlog::is_full`]) for the applier to make
    /// room; `give_up` (checked every few ms) ends the wait with an error (the session is
    /// cut, the backup failed or shuts down).
    pub(crate) fn wait_for_room<'a>(
        &'a self,
        mut l: MutexGuard<'a, Log>,
        give_up: &impl Fn(&Log) -> Option<String>,
    ) -> Result<MutexGuard<'a, Log>, String> {
        if !l.backlog.is_full() {
            return Ok(l);
        }
        l.full_waits += 1;
        l.full_now = true;
        eprintln!(
            "tern disk: {}: backlog full ({} records, {} bytes; waiting for {}): replication \
             waits",
            l.path.display(),
            l.backlog.len(),
            l.backlog.bytes(),
            l.waiting_for()
                .map_or("nothing".to_string(), |(m, n)| format!(
                    "{}={n}",
                    mac_text(&m)
                ))
        );
        while l.backlog.is_full() {
            if let Some(why) = give_up(&l) {
                l.full_now = false;
                return Err(why);
            }
            self.cond.notify_all();
            l = self
                .cond
                .wait_timeout(l, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        l.full_now = false;
        Ok(l)
    }

    /// fdatasync of the log, then the applied counter that this made durable.
    pub(crate) fn sync(&self, l: &mut Log) -> Result<(), String> {
        l.sync()?;
        self.publish(l);
        Ok(())
    }

    /// Applies every record whose dependencies are met (all of them with `force`);
    /// returns how many. The replication session calls it right after each append, so a
    /// write that waits for nothing is in the volume before its ACK leaves; the applier
    /// thread takes care of the ones that wait.
    pub(crate) fn apply_ready(
        &self,
        l: &mut Log,
        force: bool,
        apply: &impl Fn(&Op) -> io::Result<()>,
    ) -> Result<u64, String> {
        if let Some(f) = &l.failed {
            return Err(format!("the backup failed: {f}"));
        }
        let have = if force { Vec::new() } else { l.peer_applied() };
        let mut n = 0;
        loop {
            // The record leaves the backlog (and counts as applied) only once it is in the
            // volume: a failed apply keeps it, and keeps the log from being emptied.
            let next = if force {
                l.backlog.iter().next()
            } else {
                l.backlog.peek_ready(|m| lookup(&have, m))
            };
            let Some(r) = next else { break };
            if let Err(e) = apply(&r.op) {
                let why = format!(
                    "apply logged write {} ({}) to the volume: {e}; applying stopped, the \
                     log keeps it and every later record (restart the disk server once the \
                     volume's storage is fixed)",
                    r.seq,
                    OpText(&r.op)
                );
                eprintln!("tern disk: {}: {why}", l.path.display());
                l.apply_errors += 1;
                l.failed = Some(why.clone());
                if n > 0 {
                    self.publish(l);
                }
                return Err(why);
            }
            l.backlog.pop();
            l.unsynced = true;
            n += 1;
        }
        if n > 0 {
            self.publish(l);
        }
        Ok(n)
    }

    /// Once caught up: fdatasync the volume, then empty the log (unless something was
    /// appended meanwhile).
    fn checkpoint(
        &self,
        l: MutexGuard<'_, Log>,
        flush: &impl Fn() -> io::Result<()>,
    ) -> Result<(), String> {
        let due = l.end >= CHECKPOINT_BYTES || l.last_append.elapsed() >= CHECKPOINT_IDLE;
        if l.failed.is_some() || !l.backlog.is_empty() || !l.unsynced || !due {
            return Ok(());
        }
        let appends = l.appends;
        drop(l);
        flush().map_err(|e| format!("fdatasync the volume: {e}"))?;
        let mut l = self.lock();
        if l.failed.is_none() && l.backlog.is_empty() && l.appends == appends {
            l.reset()?;
            self.publish(&l);
        }
        Ok(())
    }

    /// The applier thread's loop: runs until `stop` says so.
    pub(crate) fn run(
        &self,
        stop: &impl Fn() -> bool,
        apply: &impl Fn(&Op) -> io::Result<()>,
        flush: &impl Fn() -> io::Result<()>,
    ) {
        while !stop() {
            let mut l = self.lock();
            if l.failed.is_some() {
                // Said once when it failed; status and metrics say it from now on.
                drop(
                    self.cond
                        .wait_timeout(l, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner()),
                );
                continue;
            }
            // A failure is reported by apply_ready and kept in `failed`.
            let _ = self.apply_ready(&mut l, false, apply);
            let waiting = !l.backlog.is_empty();
            let r = if waiting {
                // Held on a peer's backup: look at its counter again shortly.
                drop(
                    self.cond
                        .wait_timeout(l, Duration::from_millis(1))
                        .unwrap_or_else(|p| p.into_inner()),
                );
                Ok(())
            } else {
                let r = self.checkpoint(l, flush);
                let l = self.lock();
                if l.backlog.is_empty() {
                    drop(
                        self.cond
                            .wait_timeout(l, Duration::from_millis(100))
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                }
                r
            };
            if let Err(e) = r {
                eprintln!("tern disk: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// A new replication session replaces the copy's contents: apply everything logged
    /// (dependencies or not), make it durable, empty the log and write in place from now.
    pub(crate) fn drain_for_resync(
        &self,
        apply: &impl Fn(&Op) -> io::Result<()>,
        flush: &impl Fn() -> io::Result<()>,
    ) -> Result<(), String> {
        let mut l = self.lock();
        self.apply_ready(&mut l, true, apply)?;
        l.logging = false;
        flush().map_err(|e| format!("fdatasync the volume: {e}"))?;
        l.reset()
    }

    /// Failover: apply what becomes applicable while the group's other backups still
    /// move, then drop what waits on writes that never arrived; leaves the volume durable
    /// and the log empty. Returns (records applied here, records dropped).
    pub(crate) fn settle(
        &self,
        apply: &impl Fn(&Op) -> io::Result<()>,
        flush: &impl Fn() -> io::Result<()>,
    ) -> Result<(u64, u64), String> {
        let mut applied = 0;
        let mut last: Option<Vec<(Mac, u64)>> = None;
        let mut quiet_since = Instant::now();
        let dropped = loop {
            let mut l = self.lock();
            applied += self.apply_ready(&mut l, false, apply)?;
            if l.backlog.is_empty() {
                break 0;
            }
            let now = l.peer_applied();
            if last.as_ref() != Some(&now) {
                last = Some(now);
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= SETTLE_QUIET {
                break l.backlog.discard();
            }
            drop(l);
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut l = self.lock();
        l.logging = false;
        flush().map_err(|e| format!("fdatasync the volume: {e}"))?;
        l.reset()?;
        self.publish(&l);
        Ok((applied, dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tern-backup-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(seq: u64) -> Op {
        Op::Write {
            offset: seq * 4096,
            data: vec![seq as u8; 4096],
        }
    }

    fn no_volume(_: u64, _: &mut [u8]) -> io::Result<()> {
        Ok(())
    }

    /// A log with `n` records, each made durable before the next (as acknowledged
    /// writes are); returns the volume path and the file offset of each record.
    fn durable_log(name: &str, n: u64) -> (PathBuf, Vec<u64>) {
        let vol = dir(name).join("v.raw");
        let mut l = Log::open(&vol, true, &[]).unwrap();
        let mut at = Vec::new();
        for seq in 1..=n {
            at.push(l.end);
            l.append(&no_volume, seq, seq, &[], write(seq)).unwrap();
            l.sync().unwrap();
        }
        (vol, at)
    }

    #[test]
    fn open_refuses_a_log_corrupt_before_acknowledged_records_and_cuts_nothing() {
        let (vol, at) = durable_log("mid", 4);
        let path = log_path(&vol);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at[1] as usize + 100] ^= 4;
        std::fs::write(&path, &bytes).unwrap();
        let e = Log::open(&vol, true, &[])
            .err()
            .expect("corruption is an error");
        assert!(e.contains("corrupt record at offset"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
    }

    #[test]
    fn open_cuts_a_torn_last_record() {
        let (vol, at) = durable_log("torn", 3);
        let path = log_path(&vol);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 7]).unwrap();
        let l = Log::open(&vol, true, &[]).unwrap();
        assert_eq!(l.backlog.len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), at[2]);
    }

    #[test]
    fn the_applied_counter_is_published_only_once_the_record_is_durable() {
        let d = dir("publish");
        let vol = d.join("v.raw");
        let page = Arc::new(CounterPage::create(&d.join("v.ctr")).unwrap());
        let b = Backup::new(Log::open(&vol, true, &[]).unwrap(), Some(page.clone()));
        let mut l = b.lock();
        l.append(&no_volume, 1, 5, &[], write(1)).unwrap();
        let applied = b.apply_ready(&mut l, false, &|_| Ok(())).unwrap();
        assert_eq!((applied, l.backlog.applied_write()), (1, 5));
        // In the volume, but neither the log record nor the volume is durable yet: a crash
        // here loses write 5, so no peer backup may apply what depends on it.
        assert_eq!(page.applied(), 0);
        b.sync(&mut l).unwrap();
        assert_eq!(page.applied(), 5);
    }

    #[test]
    fn reset_replaces_the_log_only_once_the_new_one_is_complete() {
        let (vol, _) = durable_log("reset", 2);
        let path = log_path(&vol);
        let before = std::fs::read(&path).unwrap();
        let mut l = Log::open(&vol, true, &[]).unwrap();
        // The new log cannot be written: the old one must still hold every record.
        std::fs::create_dir(reset_path(&path)).unwrap();
        assert!(l.reset().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(wal::decode(&before).unwrap().records.len(), 2);
        std::fs::remove_dir(reset_path(&path)).unwrap();
        // Drain, then reset: header only, written through the file the log now appends to.
        let _ = l.backlog.pop();
        let _ = l.backlog.pop();
        l.reset().unwrap();
        assert!(!reset_path(&path).exists());
        assert_eq!(std::fs::read(&path).unwrap(), wal::header(2));
        l.append(&no_volume, 3, 3, &[], write(3)).unwrap();
        l.sync().unwrap();
        let c = wal::decode(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((c.applied_write, c.records.len()), (2, 1));
    }

    #[test]
    fn a_failed_apply_keeps_the_record_stops_applying_and_blocks_the_checkpoint() {
        let d = dir("eio");
        let vol = d.join("v.raw");
        let page = Arc::new(CounterPage::create(&d.join("v.ctr")).unwrap());
        let b = Backup::new(Log::open(&vol, true, &[]).unwrap(), Some(page.clone()));
        let applied = std::cell::RefCell::new(Vec::new());
        let disk_full = std::cell::Cell::new(true);
        // The volume's storage: full (ENOSPC) at write 2's offset while `disk_full`.
        let apply = |op: &Op| {
            let Op::Write { offset, .. } = op else {
                unreachable!()
            };
            if disk_full.get() && *offset == 2 * 4096 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            applied.borrow_mut().push(*offset / 4096);
            Ok(())
        };
        let mut l = b.lock();
        for seq in 1..=3 {
            l.append(&no_volume, seq, seq, &[], write(seq)).unwrap();
        }
        b.sync(&mut l).unwrap();
        let e = b.apply_ready(&mut l, false, &apply).unwrap_err();
        assert!(
            e.contains("apply logged write 2") && e.contains("No space"),
            "{e}"
        );
        // Write 1 is in; 2 stays at the front with 3 behind it, nothing was applied over
        // the hole, and the applied counter stops before 2.
        assert_eq!(*applied.borrow(), vec![1]);
        let st = l.status();
        assert_eq!((st.records, st.applied_write, st.apply_errors), (2, 1, 1));
        assert!(st.failed.as_deref().unwrap().contains("No space"));
        assert_eq!(page.applied(), 1);
        // Even once the storage has room again, a failed backup applies nothing and its
        // log is never emptied, however long it idles.
        disk_full.set(false);
        assert!(b.apply_ready(&mut l, true, &apply).is_err());
        assert_eq!(*applied.borrow(), vec![1]);
        l.last_append = Instant::now() - CHECKPOINT_IDLE * 2;
        l.unsynced = true;
        b.checkpoint(l, &|| Ok(())).unwrap();
        let c = wal::decode(&std::fs::read(log_path(&vol)).unwrap()).unwrap();
        assert_eq!(
            c.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(
            b.settle(&apply, &|| Ok(())).is_err(),
            "a failed backup is not promoted"
        );
        // A restart replays the log: 2 and 3 go in, in order.
        drop(b);
        let b = Backup::new(Log::open(&vol, true, &[]).unwrap(), None);
        let mut l = b.lock();
        assert_eq!(b.apply_ready(&mut l, false, &apply).unwrap(), 3);
        assert_eq!(*applied.borrow(), vec![1, 1, 2, 3]);
    }

    #[test]
    fn a_full_backlog_makes_the_session_wait_and_a_missing_peer_page_is_reported() {
        let d = dir("full");
        let vol = d.join("v.raw");
        let peer: Mac = [2, 0, 0, 0, 0, 9];
        // The peer's counter page does not exist: its applied counter reads as 0.
        let peers = [(peer, d.join("no-such-page"))];
        let b = Arc::new(Backup::new(Log::open(&vol, true, &peers).unwrap(), None));
        {
            let mut l = b.lock();
            for seq in 1..=wal::MAX_BACKLOG_RECORDS as u64 {
                let op = Op::Zero {
                    offset: 0,
                    len: 4096,
                };
                l.append(&no_volume, seq, seq, &[(peer, 1)], op).unwrap();
            }
            assert_eq!(b.apply_ready(&mut l, false, &|_| Ok(())).unwrap(), 0);
            assert!(l.backlog_full());
            let st = l.status();
            assert_eq!(st.missing_peer_pages, vec!["02:00:00:00:00:09".to_string()]);
            assert_eq!(st.waiting_for.as_deref(), Some("02:00:00:00:00:09=1"));
        }
        // Cut while it waits: an error, not a record more in memory.
        let tries = std::cell::Cell::new(0);
        let e = b
            .wait_for_room(b.lock(), &|_| {
                tries.set(tries.get() + 1);
                (tries.get() > 3).then(|| "cut".to_string())
            })
            .err()
            .unwrap();
        assert_eq!(e, "cut");
        let st = b.lock().status();
        assert_eq!((st.full_waits, st.full_now), (1, false));
        // Room made by the applier (here: a forced drain) ends the wait.
        let b2 = b.clone();
        let drainer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut l = b2.lock();
            b2.apply_ready(&mut l, true, &|_| Ok(())).unwrap()
        });
        let l = b.wait_for_room(b.lock(), &|_| None).unwrap();
        assert!(!l.backlog_full());
        drop(l);
        assert_eq!(drainer.join().unwrap(), wal::MAX_BACKLOG_RECORDS as u64);
    }
}
