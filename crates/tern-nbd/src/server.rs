//! Blocking driver: per connection a thread running a [`ServerSession`], a reader thread,
//! and [`WORKERS_PER_CONNECTION`] workers, so requests run concurrently (QEMU keeps several
//! in flight; with synchronous replication each waits for a round trip, and they overlap).
//! [`serve_connection`] is the sequential form for any `Read + Write` stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{Backend, execute, nbd_error};
use crate::proto::{CloseReason, Command, Event, ExportInfo, ProtocolError, Reply, ServerSession};

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Connections served at once; more are closed right after accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests of one connection executed at once (the session accepts up to
/// `proto::MAX_IN_FLIGHT`; the rest wait in the job queue).
pub const WORKERS_PER_CONNECTION: usize = 16;
/// Pause after a failed accept (EMFILE and the like) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A named export.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .field("read_only", &self.backend.read_only())
            .finish()
    }
}

impl Export {
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            backend,
        }
    }

    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.backend.size(),
            read_only: self.backend.read_only(),
            multi_conn: self.backend.multi_conn(),
        }
    }
}

/// Counters of a connection or of a whole server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted (a single `serve_connection` counts one).
    pub connections: u64,
    /// Connections ended by an I/O error or a protocol violation.
    pub dropped: u64,
    /// Requests handed to a backend.
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Error replies, from the backend or from request validation.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    dropped: AtomicU64,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One request's outcome: an error, bytes read, or `written` bytes written.
    fn count(&self, result: &Result<Reply, crate::proto::NbdError>, written: u64) {
        match result {
            Err(_) => Counters::add(&self.errors, 1),
            Ok(Reply::Data(d)) => Counters::add(&self.bytes_read, d.len() as u64),
            Ok(_) => Counters::add(&self.bytes_written, written),
        }
    }

    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            connections: get(&self.connections),
            dropped: get(&self.dropped),
            requests: get(&self.requests),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
        }
    }
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("client broke the NBD protocol")]
    Protocol(#[from] ProtocolError),
}

/// Runs one client to completion: negotiation, then requests one at a time until the
/// client disconnects. A clean end (abort, disconnect, hang-up between messages) is `Ok`.
pub fn serve_connection<S: Read + Write>(
    stream: S,
    exports: &[Export],
) -> Result<Stats, ServeError> {
    let counters = Counters::default();
    Counters::add(&counters.connections, 1);
    serve(stream, exports, &counters)?;
    Ok(counters.snapshot())
}

fn serve<S: Read + Write>(
    mut stream: S,
    exports: &[Export],
    counters: &Counters,
) -> Result<(), ServeError> {
    let mut session = ServerSession::new(exports.iter().map(Export::info).collect());
    let mut buf = vec![0; READ_CHUNK_BYTES];
    let mut chosen: Option<&Export> = None;
    let mut rejected = 0;
    loop {
        while let Some(event) = session.poll_event() {
            match event {
                Event::ExportChosen(index) => chosen = exports.get(index),
                Event::Request(request) => {
                    Counters::add(&counters.requests, 1);
                    let result = match chosen {
                        Some(export) => {
                            execute(&*export.backend, &request).map_err(|e| nbd_error(&e))
                        }
                        None => Err(crate::proto::NbdError::Io),
                    };
                    counters.count(&result, written_by(&result, &request));
                    if let Err(e) = session.reply(request.id, result) {
                        eprintln!("tern-nbd: {e}");
                    }
                    write_output(&mut stream, &mut session)?;
                }
                Event::Close(reason) => {
                    Counters::add(&counters.errors, session.rejected() - rejected);
                    write_output(&mut stream, &mut session)?;
                    return match reason {
                        CloseReason::Violation(e) => Err(e.into()),
                        CloseReason::Abort | CloseReason::Disconnect | CloseReason::HangUp => {
                            Ok(())
                        }
                    };
                }
            }
        }
        Counters::add(&counters.errors, session.rejected() - rejected);
        rejected = session.rejected();
        write_output(&mut stream, &mut session)?;
        match stream.read(&mut buf) {
            Ok(0) => session.input_eof(),
            Ok(n) => session.input(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

enum Msg {
    Input(Vec<u8>),
    Eof,
    ReadFailed(io::Error),
    Done {
        id: crate::proto::RequestId,
        result: Result<Reply, crate::proto::NbdError>,
        written: u64,
    },
}

/// One connection with its requests executed by a worker pool; replies go out as they
/// complete (the session matches them to their cookies).
fn serve_concurrent(
    conn: &Conn,
    exports: &Arc<[Export]>,
    counters: &Arc<Counters>,
) -> Result<(), ServeError> {
    use std::sync::{Mutex, mpsc};
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut reader = conn.try_clone()?;
    let mut writer = conn.try_clone()?;
    let rtx = tx.clone();
    // Back-pressure: the reader reads only with a credit (one per chunk); the session
    // loop hands credits back while the session has room for them.
    let credits = Arc::new(ReadCredits::default());
    let rcredits = Arc::clone(&credits);
    let reader_thread = std::thread::Builder::new()
        .name("nbd-read".into())
        .spawn(move || {
            let mut buf = vec![0; READ_CHUNK_BYTES];
            loop {
                if !rcredits.take() {
                    return;
                }
                let msg = match reader.read(&mut buf) {
                    Ok(0) => Msg::Eof,
                    Ok(n) => Msg::Input(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Msg::ReadFailed(e),
                };
                let last = !matches!(msg, Msg::Input(_));
                if rtx.send(msg).is_err() || last {
                    return;
                }
            }
        })?;
    type Job = (crate::proto::Request, Arc<dyn Backend>);
    let (jtx, jrx) = mpsc::channel::<Job>();
    let jrx = Arc::new(Mutex::new(jrx));
    let mut workers = Vec::new();
    for i in 0..WORKERS_PER_CONNECTION {
        let (jrx, tx) = (Arc::clone(&jrx), tx.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("nbd-work-{i}"))
                .spawn(move || {
                    loop {
                        let job = jrx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((request, backend)) = job else { return };
                        let result = execute(&*backend, &request).map_err(|e| nbd_error(&e));
                        let written = written_by(&result, &request);
                        let done = Msg::Done {
                            id: request.id,
                            result,
                            written,
                        };
                        if tx.send(done).is_err() {
                            return;
                        }
                    }
                })?,
        );
    }
    drop(tx);
    let outcome = (|| -> Result<(), ServeError> {
        let mut session = ServerSession::new(exports.iter().map(Export::info).collect());
        let mut chosen: Option<&Export> = None;
        let mut rejected = 0;
        let mut in_flight = 0usize;
        let mut closing: Option<CloseReason> = None;
        loop {
            while let Some(event) = session.poll_event() {
                match event {
                    Event::ExportChosen(index) => chosen = exports.get(index),
                    Event::Request(request) => {
                        Counters::add(&counters.requests, 1);
                        match chosen {
                            Some(export) => {
                                in_flight += 1;
                                let backend = Arc::clone(&export.backend);
                                if jtx.send((request, backend)).is_err() {
                                    return Err(io::Error::other("workers gone").into());
                                }
                            }
                            None => {
                                Counters::add(&counters.errors, 1);
                                let _ = session.reply(request.id, Err(crate::proto::NbdError::Io));
                            }
                        }
                    }
                    Event::Close(reason) => closing = Some(reason),
                }
            }
            Counters::add(&counters.errors, session.rejected() - rejected);
            rejected = session.rejected();
            write_output(&mut writer, &mut session)?;
            match closing.take() {
                Some(CloseReason::Violation(e)) => return Err(e.into()),
                Some(_) if in_flight == 0 => return Ok(()),
                other => closing = other,
            }
            credits.refill(&session);
            match rx.recv() {
                Ok(Msg::Input(b)) => {
                    credits.returned();
                    session.input(&b);
                }
                Ok(Msg::Eof) => session.input_eof(),
                Ok(Msg::ReadFailed(e)) => return Err(e.into()),
                Ok(Msg::Done {
                    id,
                    result,
                    written,
                }) => {
                    in_flight -= 1;
                    counters.count(&result, written);
                    if let Err(e) = session.reply(id, result) {
                        eprintln!("tern-nbd: {e}");
                    }
                }
                // Reader gone and every worker idle: nothing more can arrive.
                Err(_) => return Ok(()),
            }
        }
    })();
    // Counted before the socket closes, so a client that saw the close sees the count.
    if outcome.is_err() {
        Counters::add(&counters.dropped, 1);
    }
    conn.shutdown();
    credits.close();
    drop(jtx);
    let _ = reader_thread.join();
    for w in workers {
        let _ = w.join();
    }
    outcome
}

/// Read chunks a connection's reader may have read and not yet handed to the session.
pub const READ_CREDITS: usize = 4;

/// The reader's credits: each is one read of up to [`READ_CHUNK_BYTES`] that the session
/// has room for, so the bytes read and not parsed stay under
/// [`crate::proto::MAX_BUFFERED_INPUT_BYTES`] (a client that pipelines faster than the
/// backend completes is held at its socket, not in memory).
#[derive(Default)]
struct ReadCredits {
    state: std::sync::Mutex<CreditState>,
    cond: std::sync::Condvar,
}

#[derive(Default)]
struct CreditState {
    /// Credits the reader may take now.
    free: usize,
    /// Taken by the reader and not yet fed to the session.
    out: usize,
    closed: bool,
}

impl ReadCredits {
    fn lock(&self) -> std::sync::MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a credit; false once the connection is closing.
    fn take(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.closed {
                return false;
            }
            if st.free > 0 {
                st.free -= 1;
                st.out += 1;
                return true;
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A chunk read with a credit reached the session.
    fn returned(&self) {
        let mut st = self.lock();
        st.out = st.out.saturating_sub(1);
    }

    /// Hands out credits for the room the session has left.
    fn refill(&self, session: &ServerSession) {
        let mut st = self.lock();
        let room = session.input_room() / READ_CHUNK_BYTES;
        let want = room.min(READ_CREDITS).saturating_sub(st.out);
        if want > st.free {
            st.free = want;
            self.cond.notify_all();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
    }
}

/// Bytes a request wrote, once it succeeded.
fn written_by(
    result: &Result<Reply, crate::proto::NbdError>,
    request: &crate::proto::Request,
) -> u64 {
    match (result, &request.command) {
        (Ok(_), Command::Write(d)) => d.len() as u64,
        _ => 0,
    }
}

fn write_output<S: Write>(stream: &mut S, session: &mut ServerSession) -> io::Result<()> {
    if session.has_output() {
        stream.write_all(&session.take_output())?;
        stream.flush()?;
    }
    Ok(())
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug)]
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Already-closed sockets report ENOTCONN, which is the state we want anyway.
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A bound, not yet serving, NBD server.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    addr: LocalAddr,
    exports: Arc<[Export]>,
}

impl Server {
    /// Listens on a unix socket at `path` (a stale one is replaced), mode 0600, serving
    /// only root and this process's uid (`unix.rs`); removed again on stop.
    pub fn bind_unix(path: impl AsRef<Path>, exports: Vec<Export>) -> io::Result<Server> {
        let path = path.as_ref().to_path_buf();
        // 0600 from the start, and only root or this uid is served (`unix.rs`).
        let listener = tern_os::unix::bind_private(&path, None)?;
        Ok(Server {
            listener: Listener::Unix(listener),
            addr: LocalAddr::Unix(path),
            exports: exports.into(),
        })
    }

    /// Listens on TCP (port 0 picks a free port; see [`ServerHandle::local_addr`]). NBD
    /// without TLS: bind to loopback unless the network is trusted.
    pub fn bind_tcp(addr: impl ToSocketAddrs, exports: Vec<Export>) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = LocalAddr::Tcp(listener.local_addr()?);
        Ok(Server {
            listener: Listener::Tcp(listener),
            addr,
            exports: exports.into(),
        })
    }

    pub fn local_addr(&self) -> &LocalAddr {
        &self.addr
    }

    /// Starts the accept loop on its own thread.
    pub fn spawn(self) -> io::Result<ServerHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let addr = self.addr.clone();
        let (stop2, counters2) = (Arc::clone(&stop), Arc::clone(&counters));
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(self, &stop2, &counters2))?;
        Ok(ServerHandle {
            addr,
            stop,
            counters,
            accept: Some(accept),
        })
    }
}

fn accept_loop(server: Server, stop: &AtomicBool, counters: &Arc<Counters>) {
    let mut connections: Vec<(Conn, JoinHandle<()>)> = Vec::new();
    let mut next_id = 0u64;
    loop {
        let accepted = match &server.listener {
            Listener::Unix(l) => match l.accept() {
                Ok((s, _)) if !tern_os::unix::peer_allowed(&s, None) => {
                    let who = tern_os::unix::peer_cred(&s).map(|c| c.uid);
                    eprintln!("tern-nbd: refused a connection from uid {who:?}");
                    continue;
                }
                r => r.map(|(s, _)| Conn::Unix(s)),
            },
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Request/reply traffic: Nagle would only add latency.
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("tern-nbd: accept on {:?}: {e}", server.addr);
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        let (finished, running): (Vec<_>, Vec<_>) =
            connections.into_iter().partition(|(_, t)| t.is_finished());
        connections = running;
        for (_, thread) in finished {
            let _ = thread.join();
        }
        if connections.len() >= MAX_CONNECTIONS {
            eprintln!("tern-nbd: {MAX_CONNECTIONS} connections already open; refusing one");
            continue;
        }
        let id = next_id;
        next_id += 1;
        Counters::add(&counters.connections, 1);
        let spawned = conn.try_clone().and_then(|handle| {
            let (exports, counters) = (Arc::clone(&server.exports), Arc::clone(counters));
            let thread = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = serve_concurrent(&conn, &exports, &counters) {
                        eprintln!("tern-nbd: connection {id}: {}", chain(&e));
                    }
                    // The accept loop's clone keeps the descriptor open: end the socket.
                    conn.shutdown();
                })?;
            Ok((handle, thread))
        });
        match spawned {
            Ok(entry) => connections.push(entry),
            Err(e) => eprintln!("tern-nbd: connection {id}: cannot start: {e}"),
        }
    }
    for (conn, _) in &connections {
        conn.shutdown();
    }
    for (_, thread) in connections {
        let _ = thread.join();
    }
    if let LocalAddr::Unix(path) = &server.addr {
        let _ = std::fs::remove_file(path);
    }
}

/// `error: source: source ...` on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}

/// A running server. Dropping it stops it too.
#[derive(Debug)]
pub struct ServerHandle {
    addr: LocalAddr,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    accept: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> &LocalAddr {
        &self.addr
    }

    /// Counters so far, across all connections.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Stops accepting, shuts down open connections, waits for every thread, and returns
    /// the final counters.
    pub fn stop(mut self) -> Stats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = match &self.addr {
            LocalAddr::Unix(path) => UnixStream::connect(path).map(drop),
            LocalAddr::Tcp(addr) => {
                let mut addr = *addr;
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                TcpStream::connect(addr).map(drop)
            }
        };
        let _ = accept.join();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
