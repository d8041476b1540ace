//! `tern disk serve`: one volume, served to QEMU over NBD and replicated (driver).
//!
//! Threads: the NBD server's (one per client connection), a replication thread (primary:
//! connects through the site node, then scans and sends; a reader thread feeds ACKs back),
//! a listener for replication sessions (secondary), and the control socket.
//!
//! Control socket: one JSON request per connection, one JSON answer line:
//! `{"cmd":"status"}`, `{"cmd":"mode","mode":"sync"}`,
//! `{"cmd":"replicate","node":"/run/tern/lab/migrate-a.sock","peer":"site-b","target":"vm1/b/disk-repl.sock","mode":"auto"}`,
//! `{"cmd":"stop-replication"}`, `{"cmd":"promote","force":false}` (force: cut a running
//! session first, fencing a lost primary), `{"cmd":"gate","on":true}`, `{"cmd":"shutdown"}`.
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tern_nbd::backend::{Backend, Extent};
use tern_nbd::file::FileBackend;

use crate::primary::{Phase, Primary, Stats};
use crate::secondary::{Event, Op, Secondary};
use crate::volume::{self, State};
use crate::{BLOCK_BYTES, Mode};

/// How long a guest write waits for a synchronous ACK before the session is declared dead
/// (the write then completes degraded).
pub const SYNC_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between reconnection attempts of a primary.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// Where a primary replicates to: a relayed stream through the site node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The site node's relay (migration) socket.
    pub node: PathBuf,
    /// The far node's peer name, e.g. `site-b`.
    pub peer: String,
    /// The secondary's replication socket, relative to the far node's migration directory.
    pub target: String,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub volume: PathBuf,
    pub export: String,
    pub nbd_socket: PathBuf,
    pub control_socket: PathBuf,
    pub role: Role,
    /// Secondary: where the relayed replication stream connects.
    pub listen: Option<PathBuf>,
    pub replicate: Option<Target>,
    pub mode: Mode,
    /// Cap on the initial sync's reading rate, bytes/s (0: none).
    pub sync_rate_bps: u64,
    /// Level of the replication stream's zstd.
    pub zstd_level: i32,
    /// PipeCloud gating of the VM's NIC: frames the VM sends wait until the writes before
    /// them are committed at the secondary.
    pub gate: Option<GateOptions>,
    /// Where a primary publishes its write and committed counters for peer tiers' gates,
    /// and a secondary the write its volume holds up to for the group's other backups
    /// (`counters.rs`).
    pub counters: Option<PathBuf>,
    /// A secondary's peers: the backups of the other disks of its protected group (their
    /// VM's MAC and counter page). A logged write is applied once the writes it depends on
    /// are applied at theirs (`backup.rs`).
    pub backup_peers: Vec<(tern_gate::Mac, PathBuf)>,
}

/// A gated VM's NIC: PipeCloud's output gate between QEMU and the site switch (`nic.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateOptions {
    /// The socket QEMU's NIC connects to.
    pub nic: PathBuf,
    /// The site switch socket frames go on to.
    pub switch: PathBuf,
    /// The VM's MAC (with peers: its entry in clock trailers).
    pub mac: Option<tern_gate::Mac>,
    /// The other gated tiers of the VM's protected group: MAC and counter page. Frames to
    /// them pass at once, stamped with the VM's clock; frames leaving the group wait for
    /// every member disk they depend on.
    pub peers: Vec<(tern_gate::Mac, PathBuf)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub volume: PathBuf,
    pub size: u64,
    pub role: Role,
    pub consistent: bool,
    /// The volume's fencing epoch (bumped by each promotion).
    pub epoch: u64,
    pub mode: Mode,
    pub synchronous: bool,
    pub target: Option<Target>,
    pub phase: Phase,
    pub in_sync: bool,
    pub blocks: u64,
    pub scanned_blocks: u64,
    pub backlog_bytes: u64,
    pub degraded: bool,
    pub last_error: Option<String>,
    pub stats: Stats,
    pub secondary_session: bool,
    pub secondary_bytes_in: u64,
    /// Guest writes so far and those committed at the secondary (PipeCloud's counters).
    pub writes: u64,
    pub committed_writes: u64,
    pub gate: Option<tern_gate::GateStats>,
    /// A secondary's write log (writes received, durable, not yet in the volume).
    pub backup_log: Option<crate::backup::LogStatus>,
}

pub(crate) struct Inner {
    role: Role,
    consistent: bool,
    /// The volume's persisted fencing epoch (`volume::State::epoch`).
    epoch: u64,
    pub(crate) primary: Primary,
    target: Option<Target>,
    /// Bumped whenever the target changes; a replication thread exits when it differs.
    generation: u64,
    degraded: bool,
    secondary_session: bool,
    /// The running session's stream, so a forced promotion can end it (fencing).
    secondary_conn: Option<UnixStream>,
    secondary_bytes_in: u64,
    /// The gate holds frames (PipeCloud); off, frames pass (sync and async protection).
    pub(crate) gate_enforce: bool,
    /// A strict sync write waited [`SYNC_ACK_TIMEOUT`] in vain: sync writes stop waiting
    /// until the backup has committed every write again.
    sync_timed_out: bool,
    /// PipeCloud's output gate for the VM's NIC (`nic.rs`), when gated.
    pub(crate) gate: tern_gate::Gate,
    /// Frames the gate passed at once, encoded, for the releaser to write.
    pub(crate) gate_ready: Vec<u8>,
    /// The VM's NIC connection ended: the releaser stops.
    pub(crate) gate_closed: bool,
    /// The VM's protected group (its gated peer tiers), when it has peers.
    pub(crate) group: Option<tern_gate::Group>,
}

pub(crate) struct Shared {
    opts: ServeOptions,
    size: u64,
    file: FileBackend,
    /// The same file, for lseek(SEEK_DATA) and hashing.
    raw: std::fs::File,
    inner: Mutex<Inner>,
    pub(crate) cond: Condvar,
    pub(crate) stop: AtomicBool,
    /// A forced promotion cut the running replication session (read without the lock by
    /// a session that waits for room in the backup's backlog).
    session_cut: AtomicBool,
    counters: Option<Arc<crate::counters::CounterPage>>,
    /// A secondary's write log and applier.
    backup: Option<crate::backup::Backup>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the counters for peer gates (under the lock, so in order).
    fn publish(&self, g: &Inner) {
        if let Some(c) = &self.counters {
            c.publish(g.primary.writes(), g.primary.committed_writes());
        }
    }

    pub(crate) fn opts(&self) -> &ServeOptions {
        &self.opts
    }

    /// Waits (async back-pressure, sync ACK) after a write was applied locally and handed to
    /// the primary; `mine` is the write counter including this write. Explicit sync mode is
    /// strict: the write completes once the backup has committed it, across session ends
    /// and resyncs, for up to [`SYNC_ACK_TIMEOUT`]; then the volume is degraded (said in
    /// status) and sync writes stop waiting until the backup is in step again. Auto mode's
    /// synchronous phase (migration) waits only while its session lives. Never fails the
    /// guest's write.
    fn after_write(&self, mut g: MutexGuard<'_, Inner>, seq: Option<u64>, mine: u64) {
        let deadline = Instant::now() + SYNC_ACK_TIMEOUT;
        loop {
            let strict = g.primary.mode == Mode::Sync && g.target.is_some() && !g.sync_timed_out;
            let wait_commit = strict && g.primary.committed_writes() < mine;
            let wait_ack = !strict
                && g.primary.synchronous()
                && seq.is_some_and(|s| g.primary.acked() < s)
                && g.primary.phase() != Phase::Disconnected;
            let wait_room = !g.primary.synchronous() && g.primary.backlog_full();
            if !(wait_commit || wait_ack || wait_room) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                if strict {
                    g.sync_timed_out = true;
                }
                g.primary.disconnect("no ACK from the secondary in 30 s");
                g.degraded = true;
                eprintln!(
                    "tern disk: {}: secondary silent, degraded",
                    self.opts.export
                );
                self.cond.notify_all();
                return;
            }
            g = self
                .cond
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn writable(&self, g: &Inner) -> io::Result<()> {
        if g.role == Role::Secondary {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn status(&self) -> Status {
        let g = self.lock();
        Status {
            volume: self.opts.volume.clone(),
            size: self.size,
            role: g.role,
            consistent: g.consistent,
            epoch: g.epoch,
            mode: g.primary.mode,
            synchronous: g.primary.synchronous(),
            target: g.target.clone(),
            phase: g.primary.phase(),
            in_sync: g.primary.in_sync(),
            blocks: g.primary.blocks(),
            scanned_blocks: g.primary.cursor(),
            backlog_bytes: g.primary.backlog_bytes(),
            degraded: g.degraded,
            last_error: g.primary.last_error().map(str::to_string),
            stats: g.primary.stats().clone(),
            secondary_session: g.secondary_session,
            secondary_bytes_in: g.secondary_bytes_in,
            writes: g.primary.writes(),
            committed_writes: g.primary.committed_writes(),
            gate: self.opts.gate.as_ref().map(|_| g.gate.stats()),
            backup_log: self.backup.as_ref().map(|b| b.lock().status()),
        }
    }
}

/// The NBD face of a served volume: local I/O, then replication.
struct Replicated(Arc<Shared>);

impl Replicated {
    /// A guest change: refused on a secondary; applied locally, then handed to the primary
    /// under the same lock (so replication sees the volume's order), then waited for as the
    /// mode says.
    fn change(
        &self,
        local: impl FnOnce(&FileBackend) -> io::Result<()>,
        replicate: impl FnOnce(&mut Primary) -> Option<u64>,
    ) -> io::Result<()> {
        let s = &self.0;
        let mut g = s.lock();
        s.writable(&g)?;
        local(&s.file)?;
        if let Some(deps) = g.group.as_ref().map(tern_gate::Group::deps) {
            g.primary.set_deps(deps);
        }
        let seq = replicate(&mut g.primary);
        // Before the reply: a peer tier's gate must see this write once our VM can act on it.
        s.publish(&g);
        s.cond.notify_all();
        let mine = g.primary.writes();
        s.after_write(g, seq, mine);
        Ok(())
    }
}

impl Backend for Replicated {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.file.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.change(|f| f.write_at(offset, data, fua), |p| p.write(offset, data))
    }
    fn flush(&self) -> io::Result<()> {
        let s = &self.0;
        s.file.flush()?;
        let mut g = s.lock();
        let seq = if g.primary.synchronous() {
            g.primary.flush()
        } else {
            None
        };
        s.cond.notify_all();
        // A flush covers every write before it.
        let mine = g.primary.writes();
        s.after_write(g, seq, mine);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.change(|f| f.trim(offset, len, fua), |p| p.zero(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.change(
            |f| f.write_zeroes(offset, len, may_trim, fua),
            |p| p.zero(offset, len),
        )
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.0.file.block_status(offset, len)
    }
}

/// Runs the server until a `shutdown` request (or `stop` is set). Binds the sockets first
/// and reports errors before serving.
pub fn serve(opts: ServeOptions, ready: impl FnOnce()) -> Result<(), String> {
    let size = volume::size_of(&opts.volume).map_err(|e| e.to_string())?;
    let state = volume::read_state(&opts.volume).map_err(|e| e.to_string())?;
    let file = FileBackend::open(&opts.volume, false)
        .map_err(|e| format!("open {}: {e}", opts.volume.display()))?;
    if opts.role == Role::Secondary && opts.listen.is_none() {
        return Err("a secondary needs a replication socket (--listen)".into());
    }
    if opts.role == Role::Secondary && opts.replicate.is_some() {
        return Err("a secondary cannot replicate onward; promote it first".into());
    }
    for p in [&opts.nbd_socket, &opts.control_socket]
        .into_iter()
        .chain(opts.listen.as_ref())
    {
        let _ = std::fs::remove_file(p);
    }
    // Every socket 0600 from the start (not umask), and its peers checked on accept
    // (`tern_nbd::unix`).
    let bind = |p: &Path| {
        tern_os::unix::bind_private(p, None).map_err(|e| format!("bind {}: {e}", p.display()))
    };
    let gate_listener = match &opts.gate {
        Some(GateOptions { nic, .. }) => Some(bind(nic)?),
        None => None,
    };
    let listen = match &opts.listen {
        Some(p) => Some(bind(p)?),
        None => None,
    };
    // Last: once the control socket exists, the others do too (callers wait for it).
    let control = bind(&opts.control_socket)?;
    let primary = Primary::new(size, &opts.export, opts.mode)
        .with_zstd_level(opts.zstd_level)
        .with_epoch(state.epoch);
    let counters = match &opts.counters {
        Some(p) => Some(Arc::new(
            crate::counters::CounterPage::create(p)
                .map_err(|e| format!("create {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let raw = std::fs::File::open(&opts.volume)
        .map_err(|e| format!("open {}: {e}", opts.volume.display()))?;
    let shared = Arc::new(Shared {
        size,
        file,
        raw,
        inner: Mutex::new(Inner {
            role: opts.role,
            consistent: state.consistent,
            epoch: state.epoch,
            primary,
            target: opts.replicate.clone(),
            generation: 0,
            degraded: false,
            secondary_session: false,
            secondary_conn: None,
            secondary_bytes_in: 0,
            gate_enforce: true,
            sync_timed_out: false,
            gate: tern_gate::Gate::new(tern_gate::DEFAULT_LIMIT_BYTES),
            gate_ready: Vec::new(),
            gate_closed: false,
            group: opts.gate.as_ref().and_then(|g| {
                let me = g.mac?;
                let peers: Vec<_> = g.peers.iter().map(|(m, _)| *m).collect();
                (!peers.is_empty()).then(|| tern_gate::Group::new(me, peers))
            }),
        }),
        cond: Condvar::new(),
        stop: AtomicBool::new(false),
        session_cut: AtomicBool::new(false),
        counters: counters.clone(),
        backup: match opts.role {
            Role::Secondary => Some(crate::backup::Backup::new(
                crate::backup::Log::open(&opts.volume, state.consistent, &opts.backup_peers)?,
                counters,
            )),
            Role::Primary => None,
        },
        opts: opts.clone(),
    });
    if shared.backup.is_some() {
        let sh = shared.clone();
        std::thread::spawn(move || {
            let b = sh.backup.as_ref().expect("a secondary");
            b.run(
                &|| sh.stop.load(Ordering::Relaxed),
                &|op| apply(&sh, op, &mut Vec::new()),
                &|| sh.file.flush(),
            );
        });
    }
    let export = tern_nbd::server::Export {
        name: opts.export.clone(),
        description: format!("tern volume {}", opts.volume.display()),
        backend: Arc::new(Replicated(shared.clone())),
    };
    let nbd = tern_nbd::server::Server::bind_unix(&opts.nbd_socket, vec![export])
        .map_err(|e| format!("bind {}: {e}", opts.nbd_socket.display()))?
        .spawn()
        .map_err(|e| format!("start the NBD server: {e}"))?;
    if opts.replicate.is_some() {
        start_replication(&shared, 0);
    }
    if let Some(l) = listen {
        let sh = shared.clone();
        std::thread::spawn(move || secondary_listener(sh, l));
    }
    if let (Some(l), Some(gate)) = (gate_listener, opts.gate.clone()) {
        let sh = shared.clone();
        std::thread::spawn(move || crate::nic::serve(sh, l, gate.switch));
    }
    ready();
    control.set_nonblocking(true).map_err(|e| e.to_string())?;
    while !shared.stop.load(Ordering::Relaxed) {
        match control.accept() {
            Ok((c, _)) if !tern_os::unix::peer_allowed(&c, None) => {
                let who = tern_os::unix::peer_cred(&c).map(|c| c.uid);
                eprintln!("tern disk: control socket: refused uid {who:?}");
            }
            Ok((c, _)) => {
                let _ = c.set_nonblocking(false);
                handle_control(&shared, c);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("control socket: {e}")),
        }
    }
    {
        let mut g = shared.lock();
        g.generation += 1;
        g.primary.disconnect("shutdown");
        shared.cond.notify_all();
    }
    nbd.stop();
    if let Err(e) = shared.file.flush() {
        // Not swallowed: what the last writes left in the page cache may not be durable.
        eprintln!(
            "tern disk: {}: fdatasync at shutdown failed: {e}",
            opts.export
        );
    }
    for p in [&opts.nbd_socket, &opts.control_socket]
        .into_iter()
        .chain(opts.listen.as_ref())
    {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn start_replication(shared: &Arc<Shared>, generation: u64) {
    let sh = shared.clone();
    std::thread::spawn(move || replicate(sh, generation));
}

/// The primary's session loop: connect, then scan + send until the target changes.
fn replicate(sh: Arc<Shared>, generation: u64) {
    let mut said = String::new();
    loop {
        let target = {
            let g = sh.lock();
            if g.generation != generation || sh.stop.load(Ordering::Relaxed) {
                return;
            }
            match &g.target {
                Some(t) => t.clone(),
                None => return,
            }
        };
        let sock =
            match tern_node::open::connect_relay(&target.node, &target.peer, &target.target, 0) {
                Ok(s) => s,
                Err(e) => {
                    if e != said {
                        eprintln!("tern disk: {}: {e}; retrying", sh.opts.export);
                        said = e.clone();
                    }
                    let mut g = sh.lock();
                    g.degraded = true;
                    g.primary.disconnect(&e);
                    drop(g);
                    std::thread::sleep(RECONNECT_DELAY);
                    continue;
                }
            };
        said.clear();
        let err = session(&sh, sock, generation);
        let mut g = sh.lock();
        g.primary.disconnect(&err);
        g.degraded = true;
        sh.cond.notify_all();
        drop(g);
        eprintln!(
            "tern disk: {}: replication session ended: {err}",
            sh.opts.export
        );
        std::thread::sleep(RECONNECT_DELAY);
    }
}

/// One session; returns why it ended.
fn session(sh: &Arc<Shared>, sock: UnixStream, generation: u64) -> String {
    let Ok(mut rd) = sock.try_clone() else {
        return "cannot clone the socket".into();
    };
    let mut wr = sock;
    {
        let mut g = sh.lock();
        g.primary.connect();
        g.degraded = false;
    }
    let alive = Arc::new(AtomicBool::new(true));
    let reader = {
        let sh = sh.clone();
        let alive = alive.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let why = loop {
                match rd.read(&mut buf) {
                    Ok(0) => break "the secondary closed the stream".to_string(),
                    Ok(n) => {
                        let mut g = sh.lock();
                        if let Err(e) = g.primary.handle_input(&buf[..n]) {
                            break e;
                        }
                        sh.publish(&g);
                        if g.sync_timed_out
                            && g.primary.in_sync()
                            && g.primary.committed_writes() == g.primary.writes()
                        {
                            g.sync_timed_out = false;
                        }
                        sh.cond.notify_all();
                    }
                    Err(e) => break format!("read: {e}"),
                }
            };
            alive.store(false, Ordering::Relaxed);
            let _ = rd.shutdown(std::net::Shutdown::Both);
            let mut g = sh.lock();
            g.primary.disconnect(&why);
            sh.cond.notify_all();
            why
        })
    };
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let started = Instant::now();
    let mut scanned_bytes = 0u64;
    let why = 'outer: loop {
        let out = {
            let mut g = sh.lock();
            loop {
                if g.generation != generation || sh.stop.load(Ordering::Relaxed) {
                    break 'outer "replication stopped".to_string();
                }
                if !alive.load(Ordering::Relaxed) || g.primary.phase() == Phase::Disconnected {
                    break 'outer g.primary.last_error().unwrap_or("disconnected").to_string();
                }
                // Blocks the secondary NEEDs chunks of, read again now (newest content).
                let mut budget = 16;
                while budget > 0 {
                    let Some((off, len)) = g.primary.next_reread() else {
                        break;
                    };
                    budget -= 1;
                    if let Err(e) = sh.file.read_at(off, &mut buf[..len]) {
                        break 'outer format!("read the volume at {off}: {e}");
                    }
                    g.primary.reread(off, &buf[..len]);
                }
                // Scan a few blocks per turn, so guest writes get the lock in between.
                let mut budget = 16;
                while budget > 0 {
                    let Some((off, len)) = g.primary.next_scan() else {
                        break;
                    };
                    if sh.opts.sync_rate_bps > 0 {
                        let allowed =
                            started.elapsed().as_secs_f64() * sh.opts.sync_rate_bps as f64;
                        if scanned_bytes as f64 > allowed {
                            break;
                        }
                    }
                    budget -= 1;
                    // Under the lock: no guest write can fill a hole between this lseek
                    // and the scan's answer.
                    match volume::next_data(&sh.raw, off).unwrap_or(Some(off)) {
                        Some(d) if d < off + len as u64 => {
                            if let Err(e) = sh.file.read_at(off, &mut buf[..len]) {
                                break 'outer format!("read the volume at {off}: {e}");
                            }
                            scanned_bytes += len as u64;
                            g.primary.scanned(off, &buf[..len]);
                        }
                        Some(d) => g.primary.scanned_hole(d / BLOCK_BYTES),
                        None => g.primary.scanned_hole(u64::MAX),
                    }
                }
                if g.primary.has_output() {
                    break g.primary.take_output();
                }
                g = sh
                    .cond
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if let Err(e) = wr.write_all(&out) {
            break format!("write: {e}");
        }
    };
    let _ = wr.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    why
}

/// How long a new replication connection waits for an ending session to finish before it
/// is refused as a second session.
const SESSION_HANDOVER: Duration = Duration::from_millis(500);

/// Accepts replication sessions one at a time.
fn secondary_listener(sh: Arc<Shared>, l: UnixListener) {
    for c in l.incoming() {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut c) = c else { continue };
        if !tern_os::unix::peer_allowed(&c, None) {
            let who = tern_os::unix::peer_cred(&c).map(|c| c.uid);
            eprintln!("tern disk: replication socket: refused uid {who:?}");
            continue;
        }
        let failed = sh
            .backup
            .as_ref()
            .and_then(|b| b.lock().failed().map(str::to_string));
        let refused = {
            let mut g = sh.lock();
            // A session that is ending (its ERROR sent, its thread not done yet) makes way
            // for the reconnect that follows at once, instead of refusing it.
            let deadline = std::time::Instant::now() + SESSION_HANDOVER;
            while g.secondary_session {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                g = sh
                    .cond
                    .wait_timeout(g, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let why = if let Some(f) = failed {
                Some(format!("the backup failed: {f}"))
            } else if g.role != Role::Secondary {
                Some("this volume is a primary now".to_string())
            } else if g.secondary_session {
                Some("another replication session is active".to_string())
            } else {
                None
            };
            if why.is_none() {
                g.secondary_session = true;
                g.secondary_conn = c.try_clone().ok();
                sh.session_cut.store(false, Ordering::Relaxed);
            }
            why
        };
        if let Some(why) = refused {
            let _ = c.write_all(&crate::wire::Msg::Error(why).to_bytes());
            continue;
        }
        let sh2 = sh.clone();
        std::thread::spawn(move || {
            if let Err(e) = secondary_session(&sh2, c) {
                eprintln!("tern disk: {}: replication session: {e}", sh2.opts.export);
            }
            let mut g = sh2.lock();
            g.secondary_session = false;
            g.secondary_conn = None;
            sh2.cond.notify_all();
        });
    }
}

fn readable_now(s: &UnixStream) -> bool {
    use std::os::unix::io::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

fn secondary_session(sh: &Arc<Shared>, mut c: UnixStream) -> Result<(), String> {
    let backup = sh.backup.as_ref().ok_or("not a secondary")?;
    let mut core = Secondary::new(sh.size).with_epoch(sh.lock().epoch);
    let mut buf = vec![0u8; 1 << 20];
    let mut copy_buf = Vec::new();
    // The CLOCK the next changes belong to: (guest write, peer writes it depends on).
    let mut stamp: (u64, Vec<([u8; 6], u64)>) = (0, Vec::new());
    // Written into the volume in place (resync) since the last fdatasync.
    let mut in_place = false;
    loop {
        let n = c.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        sh.lock().secondary_bytes_in += n as u64;
        let (events, err) = core.handle_input(&buf[..n]);
        for e in events {
            match e {
                Event::NeedHashes { name, epoch } => {
                    let mut g = sh.lock();
                    if g.role != Role::Secondary {
                        return Err("promoted while a session started".into());
                    }
                    if epoch < g.epoch {
                        // Promoted between this session's start and its HELLO.
                        return Err(format!("fenced: epoch {epoch} < {}", g.epoch));
                    }
                    g.epoch = epoch;
                    // The session re-syncs the copy: what the log holds goes in first.
                    backup.drain_for_resync(&|op| apply(sh, op, &mut Vec::new()), &|| {
                        sh.file.flush()
                    })?;
                    g.consistent = false;
                    let state = State {
                        consistent: false,
                        epoch: g.epoch,
                    };
                    drop(g);
                    volume::write_state(&sh.opts.volume, &state).map_err(|e| e.to_string())?;
                    eprintln!("tern disk: {}: replication from {name:?}", sh.opts.export);
                    core.ready(false);
                    c.write_all(&core.take_output())
                        .map_err(|e| format!("write: {e}"))?;
                    let hs = volume::block_hashes(&sh.raw, sh.size)
                        .map_err(|e| format!("hash the volume: {e}"))?;
                    core.hashes(&hs);
                }
                Event::Clock { write, deps } => stamp = (write, deps),
                Event::Apply { seq, op } => {
                    let mut l = backup.lock();
                    if l.logging && l.backlog_full() {
                        // Back-pressure: acknowledge what is logged, then read no more
                        // until the applier makes room.
                        drop(l);
                        durable(sh, &mut core, seq - 1, &mut in_place, stamp.0)?;
                        c.write_all(&core.take_output())
                            .map_err(|e| format!("write: {e}"))?;
                        l = backup.wait_for_room(backup.lock(), &|l: &crate::backup::Log| {
                            if sh.stop.load(Ordering::Relaxed)
                                || sh.session_cut.load(Ordering::Relaxed)
                            {
                                return Some("the session was cut".into());
                            }
                            l.failed().map(|f| format!("the backup failed: {f}"))
                        })?;
                    }
                    if l.logging {
                        l.append(&|at, b| sh.file.read_at(at, b), seq, stamp.0, &stamp.1, op)?;
                        backup.apply_ready(&mut l, false, &|op| apply(sh, op, &mut Vec::new()))?;
                        if !l.is_caught_up() {
                            backup.wake();
                        }
                    } else {
                        drop(l);
                        apply(sh, &op, &mut copy_buf)
                            .map_err(|e| format!("apply {}: {e}", OpShort(&op)))?;
                        in_place = true;
                    }
                }
                Event::Check { offset, hashes } => {
                    let len = (sh.size - offset).min(BLOCK_BYTES) as usize;
                    copy_buf.resize(len, 0);
                    sh.file
                        .read_at(offset, &mut copy_buf[..len])
                        .map_err(|e| format!("read the volume at {offset}: {e}"))?;
                    let mine = volume::chunk_hashes_of(&copy_buf[..len]);
                    core.check_answer(offset, &hashes, &mine);
                }
                Event::SyncNow { seq } => durable(sh, &mut core, seq, &mut in_place, stamp.0)?,
                Event::Consistent => {}
            }
        }
        if core.dirty() && !readable_now(&c) {
            let seq = core.last_seq();
            durable(sh, &mut core, seq, &mut in_place, stamp.0)?;
        }
        let out = core.take_output();
        if !out.is_empty() {
            c.write_all(&out).map_err(|e| format!("write: {e}"))?;
        }
        if let Some(e) = err {
            return Err(e);
        }
    }
    if core.dirty() {
        let seq = core.last_seq();
        durable(sh, &mut core, seq, &mut in_place, stamp.0)?;
    }
    Ok(())
}

#[derive(Debug)]
struct OpShort<'a>(&'a Op);
impl std::fmt::Display for OpShort<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Op::Write { offset, data } => write!(f, "write {}+{}", offset, data.len()),
            Op::Zero { offset, len } => write!(f, "zero {offset}+{len}"),
            Op::Copy { offset, src, len } => write!(f, "copy {src}->{offset}+{len}"),
        }
    }
}

fn apply(sh: &Shared, op: &Op, copy_buf: &mut Vec<u8>) -> io::Result<()> {
    match op {
        Op::Write { offset, data } => sh.file.write_at(*offset, data, false),
        Op::Zero { offset, len } => sh.file.write_zeroes(*offset, *len, true, false),
        Op::Copy { offset, src, len } => {
            copy_buf.resize(*len as usize, 0);
            sh.file.read_at(*src, copy_buf)?;
            sh.file.write_at(*offset, copy_buf, false)
        }
    }
}

/// Makes what arrived durable (the log, and the volume if written in place), then ACKs up
/// to `seq` (everything up to it is logged or applied). A completed sync makes the copy
/// consistent: the volume holds every guest write up to `synced_write` (the CLOCK before
/// SYNCED), and later changes go to the log.
fn durable(
    sh: &Shared,
    core: &mut Secondary,
    seq: u64,
    in_place: &mut bool,
    synced_write: u64,
) -> Result<(), String> {
    let backup = sh.backup.as_ref().ok_or("not a secondary")?;
    if *in_place {
        sh.file.flush().map_err(|e| format!("fdatasync: {e}"))?;
        *in_place = false;
    }
    backup.sync(&mut backup.lock())?;
    if let Some(Event::Consistent) = core.durable(seq) {
        let epoch = sh.lock().epoch;
        volume::write_state(
            &sh.opts.volume,
            &State {
                consistent: true,
                epoch,
            },
        )
        .map_err(|e| e.to_string())?;
        sh.lock().consistent = true;
        let mut l = backup.lock();
        l.synced_to(synced_write);
        l.logging = true;
        backup.publish(&l);
        eprintln!("tern disk: {}: consistent", sh.opts.export);
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
enum Request {
    Status,
    Mode {
        mode: Mode,
    },
    Replicate {
        node: PathBuf,
        peer: String,
        target: String,
        mode: Option<Mode>,
    },
    StopReplication,
    /// With `force`, a running session is cut first (the primary is declared lost: fence
    /// it); what it had applied stays, and a copy mid-resync is still refused.
    Promote {
        #[serde(default)]
        force: bool,
    },
    /// The NIC gate holds frames (`on`) or lets them pass.
    Gate {
        on: bool,
    },
    Shutdown,
}

fn handle_control(sh: &Arc<Shared>, c: UnixStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new(&c);
    let answer = match r.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => control(sh, req),
            Err(e) => Err(format!("bad request: {e}")),
        },
        Err(e) => Err(format!("read request: {e}")),
    };
    let v = match answer {
        Ok(v) => {
            let mut v = v;
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({"ok": false, "error": e}),
    };
    let mut w = &c;
    let _ = writeln!(w, "{v}");
}

fn control(sh: &Arc<Shared>, req: Request) -> Result<Value, String> {
    match req {
        Request::Status => Ok(serde_json::to_value(sh.status()).expect("status serializes")),
        Request::Mode { mode } => {
            let mut g = sh.lock();
            g.primary.mode = mode;
            sh.cond.notify_all();
            Ok(json!({"mode": mode}))
        }
        Request::Replicate {
            node,
            peer,
            target,
            mode,
        } => {
            let mut g = sh.lock();
            if g.role != Role::Primary {
                return Err("a secondary cannot replicate; promote it first".into());
            }
            if !tern_node::open::safe_relative_path(&target) {
                return Err(format!("unsafe target path {target:?}"));
            }
            g.target = Some(Target { node, peer, target });
            if let Some(m) = mode {
                g.primary.mode = m;
            }
            g.generation += 1;
            g.primary.disconnect("new target");
            let generation = g.generation;
            sh.cond.notify_all();
            drop(g);
            start_replication(sh, generation);
            Ok(json!({}))
        }
        Request::StopReplication => {
            let mut g = sh.lock();
            g.target = None;
            g.generation += 1;
            g.primary.disconnect("replication stopped");
            g.degraded = false;
            sh.cond.notify_all();
            Ok(json!({}))
        }
        Request::Gate { on } => {
            if sh.opts.gate.is_none() {
                return Err("this volume's VM has no gate (start it with --gate)".into());
            }
            sh.lock().gate_enforce = on;
            sh.cond.notify_all();
            Ok(json!({"gate": on}))
        }
        Request::Promote { force } => {
            let mut g = sh.lock();
            if g.role == Role::Primary {
                return Ok(json!({"role": "primary"}));
            }
            if force && g.secondary_session {
                sh.session_cut.store(true, Ordering::Relaxed);
                if let Some(c) = g.secondary_conn.take() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while g.secondary_session && Instant::now() < deadline {
                    g = sh
                        .cond
                        .wait_timeout(g, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            if g.secondary_session {
                return Err("a replication session is still active; stop it at the primary".into());
            }
            if !g.consistent {
                return Err(
                    "this copy is inconsistent (its last sync did not complete); refusing to \
                     promote"
                        .into(),
                );
            }
            // The backup's log: apply what the group's other backups allow, drop the rest.
            let (applied, dropped) = match &sh.backup {
                Some(b) => b.settle(&|op| apply(sh, op, &mut Vec::new()), &|| sh.file.flush())?,
                None => (0, 0),
            };
            if dropped > 0 {
                eprintln!(
                    "tern disk: {}: promoted; {dropped} logged write(s) dropped (they depend on \
                     writes a peer's backup never received)",
                    sh.opts.export
                );
            }
            // Fencing: the new epoch is durable before this copy acts as a primary, so
            // the old primary's replication (an older epoch) is refused from now on, across
            // restarts too.
            let epoch = g.epoch + 1;
            volume::write_state(
                &sh.opts.volume,
                &State {
                    consistent: true,
                    epoch,
                },
            )
            .map_err(|e| format!("persist the new epoch: {e}"))?;
            g.epoch = epoch;
            g.primary.set_epoch(epoch);
            g.role = Role::Primary;
            Ok(
                json!({"role": "primary", "epoch": epoch, "log_applied": applied,
                      "log_dropped": dropped}),
            )
        }
        Request::Shutdown => {
            sh.stop.store(true, Ordering::Relaxed);
            Ok(json!({}))
        }
    }
}

/// One request to a running server's control socket.
pub fn request(control: &Path, req: &Value) -> Result<Value, String> {
    let mut s =
        UnixStream::connect(control).map_err(|e| format!("connect {}: {e}", control.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{req}").map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from {}: {e}", control.display()))?;
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad answer {line:?}: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("request failed").to_string())
    }
}
