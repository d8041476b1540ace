//! The node's management surfaces — the control socket (`tern node status`) and the
//! Prometheus endpoint — served from their own thread, so no client, however slow, idle or
//! numerous, can stall the data path.
//!
//! ```text
//!  clients ──▶ [mgmt thread: epoll, non-blocking sockets, bounded connections, deadlines]
//!                 │ a request is complete: want a snapshot
//!                 ├──── eventfd ────▶ [node loop] status() ──▶ Arc<NodeStatus> ──┐
//!                 ◀──────────────────────────── condvar ─────────────────────────┘
//!                 render JSON / Prometheus text here, write non-blocking, close
//! ```
//! The node loop's whole cost is one `status()` per batch of complete requests; reading,
//! parsing, rendering and writing happen here. Each surface holds at most
//! [`MAX_CONNECTIONS`]; when full, the oldest connection is closed to make room, so a flood
//! of idle connections delays a real request by at most its own turn. A connection that has
//! not sent a whole request (or not read its reply) within [`REQUEST_TIMEOUT`] is closed.
//! The control socket only serves root or the node's own user (`SO_PEERCRED`).
//! Requests: `status` (JSON `NodeStatus`) and `reload` (the node loop re-reads its config
//! file, `reload.rs`; JSON [`ReloadReply`], after at most [`RELOAD_WAIT`]).
//! A control connection whose first byte is the agent frame magic (`agent.rs`) is handed, with what
//! was read of it, to the site agent's queue (`agent_worker.rs`) as a local caller.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::status::NodeStatus;
use crate::sys::{self, Epoll, EventFd};

/// Open connections per surface (control, metrics); the oldest is closed for a new one.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request and then to read the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest control request ("status\n").
pub const MAX_CONTROL_REQUEST: usize = 256;
/// Longest HTTP request head the metrics endpoint reads.
pub const MAX_HTTP_REQUEST: usize = 8 << 10;
/// How long a request waits for the node loop's snapshot before it gets an error.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(1);
/// How long a `reload` request waits for the node loop's answer before it gets an error
/// (the reload may still happen).
pub const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// The control socket's answer to `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub ok: bool,
    /// What changed, or why the reload was refused.
    pub message: String,
}

const TOKEN_STOP: u64 = 0;
const TOKEN_CONTROL: u64 = 1;
const TOKEN_METRICS: u64 = 2;
const TOKEN_CONN: u64 = 16;

/// Counters of the management thread.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MgmtStats {
    pub accepted: u64,
    pub served: u64,
    /// Closed to make room for a newer connection.
    pub evicted: u64,
    /// Closed at [`REQUEST_TIMEOUT`].
    pub timed_out: u64,
    /// Control connections from a user other than root or the node's.
    pub refused_peer: u64,
    /// Requests too long, malformed, or unanswered by the node loop.
    pub bad_requests: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    served: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
    refused_peer: AtomicU64,
    bad_requests: AtomicU64,
}

#[derive(Debug, Default)]
struct Snapshot {
    wanted: bool,
    seq: u64,
    status: Option<Arc<NodeStatus>>,
}

/// A `reload` request handed to the node loop and its answer.
#[derive(Debug, Default)]
struct ReloadSlot {
    wanted: bool,
    seq: u64,
    reply: Option<ReloadReply>,
}

#[derive(Debug, Default)]
struct Shared {
    snap: Mutex<Snapshot>,
    ready: Condvar,
    reload: Mutex<ReloadSlot>,
    reloaded: Condvar,
    counters: Counters,
    stop: AtomicBool,
}

/// The node loop's handle on its management thread.
#[derive(Debug)]
pub struct Mgmt {
    shared: Arc<Shared>,
    /// The mgmt thread wakes the node loop with it (registered in the node's epoll).
    wake: Arc<EventFd>,
    /// The node wakes the mgmt thread with it to stop.
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mgmt {
    pub fn spawn(
        control: UnixListener,
        metrics: Option<TcpListener>,
        agent: Option<crate::agent_worker::Agent>,
    ) -> io::Result<Mgmt> {
        control.set_nonblocking(true)?;
        if let Some(m) = &metrics {
            m.set_nonblocking(true)?;
        }
        let shared = Arc::new(Shared::default());
        let wake = Arc::new(EventFd::new()?);
        let stop = Arc::new(EventFd::new()?);
        let mut server = Server {
            ep: Epoll::new()?,
            control,
            metrics,
            conns: BTreeMap::new(),
            next: TOKEN_CONN,
            shared: shared.clone(),
            wake: wake.clone(),
            stop: stop.clone(),
            events: Vec::new(),
            agent,
        };
        server.ep.add(stop.fd(), TOKEN_STOP, sys::READ)?;
        server
            .ep
            .add(server.control.as_raw_fd(), TOKEN_CONTROL, sys::READ)?;
        if let Some(m) = &server.metrics {
            server.ep.add(m.as_raw_fd(), TOKEN_METRICS, sys::READ)?;
        }
        let thread = std::thread::Builder::new()
            .name("tern-mgmt".into())
            .spawn(move || server.run())?;
        Ok(Mgmt {
            shared,
            wake,
            stop,
            thread: Some(thread),
        })
    }

    /// The descriptor the node loop watches for readability.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.fd()
    }

    /// Called by the node loop when [`Mgmt::wake_fd`] is readable: takes one snapshot if the
    /// management thread wants one.
    pub fn serve(&self, status: impl FnOnce() -> NodeStatus) {
        self.wake.drain();
        let wanted = self.shared.snap.lock().map(|s| s.wanted).unwrap_or(false);
        if !wanted {
            return;
        }
        let st = Arc::new(status());
        if let Ok(mut s) = self.shared.snap.lock() {
            s.wanted = false;
            s.seq += 1;
            s.status = Some(st);
        }
        self.shared.ready.notify_all();
    }

    /// Called by the node loop when [`Mgmt::wake_fd`] is readable, before [`Mgmt::serve`]:
    /// whether a client asked for a reload (then answer with [`Mgmt::reload_done`]).
    pub fn take_reload(&self) -> bool {
        self.shared
            .reload
            .lock()
            .map(|mut r| std::mem::take(&mut r.wanted))
            .unwrap_or(false)
    }

    /// The outcome of the reload [`Mgmt::take_reload`] asked for.
    pub fn reload_done(&self, outcome: Result<String, String>) {
        if let Ok(mut r) = self.shared.reload.lock() {
            r.seq += 1;
            r.reply = Some(match outcome {
                Ok(message) => ReloadReply { ok: true, message },
                Err(message) => ReloadReply { ok: false, message },
            });
        }
        self.shared.reloaded.notify_all();
    }

    pub fn stats(&self) -> MgmtStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MgmtStats {
            accepted: get(&c.accepted),
            served: get(&c.served),
            evicted: get(&c.evicted),
            timed_out: get(&c.timed_out),
            refused_peer: get(&c.refused_peer),
            bad_requests: get(&c.bad_requests),
        }
    }
}

impl Drop for Mgmt {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.stop.notify();
        self.shared.ready.notify_all();
        self.shared.reloaded.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    Control,
    Metrics,
}

#[derive(Debug)]
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
}

#[derive(Debug)]
struct Conn {
    sock: Sock,
    surface: Surface,
    deadline: Instant,
    request: Vec<u8>,
    /// The reply being written (`None` while reading the request).
    reply: Option<Vec<u8>>,
    written: usize,
    /// The request is complete; the reply waits for a snapshot.
    pending: bool,
}

/// Where a request ends, if it is complete (`eof`: the client half-closed).
fn request_complete(surface: Surface, buf: &[u8], eof: bool) -> bool {
    match surface {
        Surface::Control => eof || buf.contains(&b'\n'),
        Surface::Metrics => {
            eof || buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
        }
    }
}

fn request_limit(surface: Surface) -> usize {
    match surface {
        Surface::Control => MAX_CONTROL_REQUEST,
        Surface::Metrics => MAX_HTTP_REQUEST,
    }
}

/// The reply to a complete request, given the node's status (None: the loop did not answer).
fn render(surface: Surface, request: &[u8], status: Option<&NodeStatus>) -> Vec<u8> {
    match surface {
        Surface::Control => {
            let req = String::from_utf8_lossy(request);
            let mut out = match (req.trim(), status) {
                ("status", Some(st)) => serde_json::to_string(st).unwrap_or_default(),
                ("status", None) => "{\"error\":\"the node loop did not answer\"}".to_string(),
                _ => "{\"error\":\"unknown request; send \\\"status\\\" or \\\"reload\\\"\"}"
                    .to_string(),
            };
            out.push('\n');
            out.into_bytes()
        }
        Surface::Metrics => match status {
            Some(st) => {
                let body = crate::status::prometheus(st);
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            }
            None => b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
        },
    }
}

#[derive(Debug)]
struct Server {
    ep: Epoll,
    control: UnixListener,
    metrics: Option<TcpListener>,
    conns: BTreeMap<u64, Conn>,
    next: u64,
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
    events: Vec<(u64, u32)>,
    agent: Option<crate::agent_worker::Agent>,
}

impl Server {
    fn run(&mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = self
                .conns
                .values()
                .map(|c| c.deadline.saturating_duration_since(now).as_nanos() as u64)
                .min();
            let mut events = std::mem::take(&mut self.events);
            if self.ep.wait(timeout, &mut events).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            for &(token, ev) in &events {
                match token {
                    TOKEN_STOP => {
                        self.stop.drain();
                    }
                    TOKEN_CONTROL => self.accept(Surface::Control),
                    TOKEN_METRICS => self.accept(Surface::Metrics),
                    t => self.on_conn(t, ev),
                }
            }
            self.events = events;
            self.expire(Instant::now());
            self.answer();
        }
    }

    fn accept(&mut self, surface: Surface) {
        loop {
            let sock = match surface {
                Surface::Control => match self.control.accept() {
                    Ok((s, _)) => {
                        if !tern_os::unix::peer_allowed(&s, None) {
                            self.count(|c| &c.refused_peer);
                            continue;
                        }
                        Sock::Unix(s)
                    }
                    Err(_) => return,
                },
                Surface::Metrics => match self.metrics.as_ref().map(|m| m.accept()) {
                    Some(Ok((s, _))) => Sock::Tcp(s),
                    _ => return,
                },
            };
            let nonblocking = match &sock {
                Sock::Unix(s) => s.set_nonblocking(true),
                Sock::Tcp(s) => s.set_nonblocking(true),
            };
            if nonblocking.is_err() {
                continue;
            }
            self.count(|c| &c.accepted);
            let open = self.conns.values().filter(|c| c.surface == surface).count();
            if open >= MAX_CONNECTIONS {
                // The oldest connection of this surface (tokens grow with age) makes room.
                if let Some(&old) = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.surface == surface && !c.pending && c.reply.is_none())
                    .map(|(t, _)| t)
                {
                    self.close(old);
                    self.count(|c| &c.evicted);
                }
            }
            let token = self.next;
            self.next += 1;
            if self.ep.add(sock.fd(), token, sys::READ | sys::HUP).is_err() {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    sock,
                    surface,
                    deadline: Instant::now() + REQUEST_TIMEOUT,
                    request: Vec::new(),
                    reply: None,
                    written: 0,
                    pending: false,
                },
            );
        }
    }

    fn on_conn(&mut self, token: u64, ev: u32) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.reply.is_some() {
            if ev & (sys::WRITE | sys::HUP) != 0 {
                self.write(token);
            }
            return;
        }
        if c.pending {
            return;
        }
        let limit = request_limit(c.surface);
        let mut buf = [0u8; 1024];
        loop {
            match c.sock.read(&mut buf) {
                Ok(0) => {
                    if c.request.is_empty() {
                        self.close(token);
                    } else {
                        c.pending = true;
                    }
                    return;
                }
                Ok(n) => {
                    c.request.extend_from_slice(&buf[..n]);
                    if c.surface == Surface::Control
                        && c.request[0] == crate::agent::REQUEST_MAGIC
                        && self.agent.is_some()
                    {
                        self.hand_to_agent(token);
                        return;
                    }
                    if c.request.len() > limit {
                        self.count(|c| &c.bad_requests);
                        self.close(token);
                        return;
                    }
                    if request_complete(c.surface, &c.request, false) {
                        c.pending = true;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(token);
                    return;
                }
            }
        }
    }

    /// Answers every complete request: `reload` ones with one reload of the node loop, the
    /// others from one snapshot.
    fn answer(&mut self) {
        if !self.conns.values().any(|c| c.pending) {
            return;
        }
        let reloads: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.pending
                    && c.surface == Surface::Control
                    && String::from_utf8_lossy(&c.request).trim() == "reload"
            })
            .map(|(&t, _)| t)
            .collect();
        if !reloads.is_empty() {
            let reply = self.reload().unwrap_or_else(|| {
                self.count(|c| &c.bad_requests);
                ReloadReply {
                    ok: false,
                    message: "the node loop did not answer".into(),
                }
            });
            let mut bytes = serde_json::to_string(&reply).unwrap_or_default();
            bytes.push('\n');
            for token in reloads {
                self.reply(token, bytes.clone().into_bytes());
            }
            if !self.conns.values().any(|c| c.pending) {
                return;
            }
        }
        let status = self.snapshot();
        if status.is_none() {
            self.count(|c| &c.bad_requests);
        }
        let pending: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending)
            .map(|(&t, _)| t)
            .collect();
        for token in pending {
            let Some(c) = self.conns.get(&token) else {
                continue;
            };
            let bytes = render(c.surface, &c.request, status.as_deref());
            self.reply(token, bytes);
        }
    }

    /// Starts writing `bytes` as the reply of a complete request.
    fn reply(&mut self, token: u64, bytes: Vec<u8>) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.pending = false;
        c.reply = Some(bytes);
        c.deadline = Instant::now() + REQUEST_TIMEOUT;
        let fd = c.sock.fd();
        self.ep.delete(fd);
        if self.ep.add(fd, token, sys::WRITE | sys::HUP).is_err() {
            self.close(token);
            return;
        }
        self.write(token);
    }

    /// Asks the node loop to reload its config and waits for the outcome.
    fn reload(&self) -> Option<ReloadReply> {
        let mut r = self.shared.reload.lock().ok()?;
        let seq = r.seq;
        r.wanted = true;
        self.wake.notify();
        let (r, _) = self
            .shared
            .reloaded
            .wait_timeout_while(r, RELOAD_WAIT, |r| {
                r.seq == seq && !self.shared.stop.load(Ordering::SeqCst)
            })
            .ok()?;
        if r.seq == seq {
            return None;
        }
        r.reply.clone()
    }

    fn write(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Some(reply) = &c.reply else { return };
        while c.written < reply.len() {
            match c.sock.write(&reply[c.written..]) {
                Ok(0) => break,
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if c.written >= reply.len() {
            self.count(|c| &c.served);
        }
        self.close(token);
    }

    /// Asks the node loop for its status and waits for it.
    fn snapshot(&self) -> Option<Arc<NodeStatus>> {
        let mut s = self.shared.snap.lock().ok()?;
        let seq = s.seq;
        s.wanted = true;
        self.wake.notify();
        let (s, _) = self
            .shared
            .ready
            .wait_timeout_while(s, SNAPSHOT_WAIT, |s| {
                s.seq == seq && !self.shared.stop.load(Ordering::SeqCst)
            })
            .ok()?;
        if s.seq == seq {
            return None;
        }
        s.status.clone()
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now && !c.pending)
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            self.count(|c| &c.timed_out);
            self.close(t);
        }
    }

    /// Gives a control connection that carries an agent request to the agent's queue.
    fn hand_to_agent(&mut self, token: u64) {
        let Some(c) = self.conns.remove(&token) else {
            return;
        };
        self.ep.delete(c.sock.fd());
        if let (Sock::Unix(s), Some(agent)) = (c.sock, &self.agent) {
            agent.submit(crate::agent::Caller::Local, s, c.request);
        }
    }

    fn close(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            self.ep.delete(c.sock.fd());
        }
    }

    fn count(&self, which: impl Fn(&Counters) -> &AtomicU64) {
        which(&self.shared.counters).fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node loop stand-in: serves snapshots until told to stop.
    fn node_loop(m: Arc<Mgmt>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut snapshots = 0;
            let mut fds = [libc::pollfd {
                fd: m.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: one valid pollfd, its length passed.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
                if m.take_reload() {
                    m.reload_done(if snapshots % 2 == 0 {
                        Ok(format!("reload after {snapshots} snapshots"))
                    } else {
                        Err("node.listen needs a restart".into())
                    });
                }
                m.serve(|| {
                    snapshots += 1;
                    NodeStatus {
                        name: "site-t".into(),
                        uptime_s: snapshots as f64,
                        ..NodeStatus::default()
                    }
                });
            }
            snapshots
        })
    }

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tern-mgmt-{}-{}",
            std::process::id(),
            sys::mono_ns()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn idle_connections_neither_block_nor_starve_a_request() {
        let d = dir();
        let path = d.join("ctl.sock");
        let control = tern_os::unix::bind_private(&path, None).unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
        let maddr = metrics.local_addr().unwrap();
        let m = Arc::new(Mgmt::spawn(control, Some(metrics), None).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let node = node_loop(m.clone(), stop.clone());
        // 200 idle connections to each surface: more than MAX_CONNECTIONS, sending nothing.
        let idle_unix: Vec<UnixStream> = (0..200)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let idle_tcp: Vec<TcpStream> = (0..200)
            .map(|_| TcpStream::connect(maddr).unwrap())
            .collect();
        // A slowloris: a partial request that never ends.
        let mut slow = TcpStream::connect(maddr).unwrap();
        slow.write_all(b"GET /metr").unwrap();
        let start = Instant::now();
        let st = crate::request_status(&path).unwrap();
        assert_eq!(st.name, "site-t");
        let mut c = TcpStream::connect(maddr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
        assert!(
            body.contains("tern_flows_active{node=\"site-t\"}"),
            "{body}"
        );
        // Both answered while the idle connections sit there (they are not answered: a
        // request from each would be needed), well before the request timeout.
        assert!(start.elapsed() < REQUEST_TIMEOUT, "{:?}", start.elapsed());
        let s = m.stats();
        assert!(s.evicted >= 2 * (200 - MAX_CONNECTIONS as u64), "{s:?}");
        assert_eq!(s.served, 2, "{s:?}");
        drop((idle_unix, idle_tcp, slow));
        stop.store(true, Ordering::SeqCst);
        assert!(node.join().unwrap() >= 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_reload_request_reaches_the_node_loop_and_returns_its_outcome() {
        let d = dir();
        let path = d.join("ctl.sock");
        let control = tern_os::unix::bind_private(&path, None).unwrap();
        let m = Arc::new(Mgmt::spawn(control, None, None).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let node = node_loop(m.clone(), stop.clone());
        assert_eq!(
            crate::request_reload(&path).unwrap(),
            "reload after 0 snapshots"
        );
        assert_eq!(crate::request_status(&path).unwrap().uptime_s, 1.0);
        let e = crate::request_reload(&path).unwrap_err().to_string();
        assert!(
            e.contains("reload refused: node.listen needs a restart"),
            "{e}"
        );
        // Status still works after both.
        assert_eq!(crate::request_status(&path).unwrap().name, "site-t");
        assert_eq!(m.stats().served, 4);
        stop.store(true, Ordering::SeqCst);
        node.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_silent_client_is_closed_at_the_timeout_and_long_requests_are_refused() {
        let d = dir();
        let path = d.join("ctl.sock");
        let control = tern_os::unix::bind_private(&path, None).unwrap();
        let m = Arc::new(Mgmt::spawn(control, None, None).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let node = node_loop(m.clone(), stop.clone());
        let mut silent = UnixStream::connect(&path).unwrap();
        silent.set_read_timeout(Some(REQUEST_TIMEOUT * 3)).unwrap();
        let mut long = UnixStream::connect(&path).unwrap();
        let _ = long.write_all(&[b'x'; MAX_CONTROL_REQUEST + 10]);
        let mut b = [0u8; 16];
        // Closed by the server: EOF, not our own read timeout.
        assert_eq!(silent.read(&mut b).unwrap(), 0);
        let s = m.stats();
        assert!(s.timed_out >= 1, "{s:?}");
        assert!(s.bad_requests >= 1, "{s:?}");
        stop.store(true, Ordering::SeqCst);
        node.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_control_socket_serves_only_root_or_the_nodes_user() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let d = dir();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = d.join("ctl.sock");
        let control = tern_os::unix::bind_private(&path, None).unwrap();
        let m = Arc::new(Mgmt::spawn(control, None, None).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let node = node_loop(m.clone(), stop.clone());
        // Past the file mode (opened up here on purpose), SO_PEERCRED still refuses.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let client = format!(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
             try:\n    s.sendall(b'status\\n')\n    print(len(s.recv(100000)))\n\
             except (ConnectionResetError, BrokenPipeError):\n    print(0)\n",
            path.display().to_string()
        );
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&client)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
        assert_eq!(m.stats().refused_peer, 1);
        // Root is served.
        assert_eq!(crate::request_status(&path).unwrap().name, "site-t");
        stop.store(true, Ordering::SeqCst);
        node.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_control_socket_is_private_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let path = d.join("ctl.sock");
        std::fs::write(&path, b"stale").unwrap();
        let _l = tern_os::unix::bind_private(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing left behind but the socket.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("ctl.sock")]);
        UnixStream::connect(&path).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
