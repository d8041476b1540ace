//! A blocking QMP client: a thin driver around [`QmpSession`] over a `UnixStream`.
//!
//! Every call has a deadline: reads use `SO_RCVTIMEO` set to the time left, writes
//! `SO_SNDTIMEO`. [`QmpClient::execute_with_fd`] sends a file descriptor with `SCM_RIGHTS`
//! in the same `sendmsg` as the command's bytes: QEMU attaches received descriptors to the
//! monitor and `getfd` takes the one that arrived with its own command, which is how tern
//! hands QEMU an already-connected migration socket (`getfd {"fdname": "mig"}`, then
//! `migrate {"uri": "fd:mig"}`).

use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::qmp::{Event, Greeting, QmpError, QmpSession, ReplyError};

/// Deadline of [`QmpClient::execute`] unless changed with [`QmpClient::set_command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the socket per `read` call.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Pause between connection attempts while QEMU has not created its socket yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket {path}: {what} did not complete within {timeout:?}")]
    Timeout {
        path: PathBuf,
        what: String,
        timeout: Duration,
    },
    #[error("QEMU closed QMP socket {path}")]
    Closed { path: PathBuf },
    #[error("QMP socket {path}")]
    Protocol {
        path: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("QMP command {cmd} failed: {error}")]
    Command {
        cmd: String,
        #[source]
        error: ReplyError,
    },
}

impl ClientError {
    /// The QMP error reply, when QEMU refused the command (as opposed to I/O or protocol
    /// trouble).
    pub fn reply_error(&self) -> Option<&ReplyError> {
        match self {
            ClientError::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A connected, negotiated QMP monitor.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    path: PathBuf,
    session: QmpSession,
    command_timeout: Duration,
    eof: bool,
    buf: Vec<u8>,
}

impl QmpClient {
    /// Connects to QEMU's QMP socket and negotiates capabilities. Retries while the socket
    /// does not exist or refuses (QEMU still starting) until `timeout`. A monitor serves
    /// one client at a time: while another client holds it, this waits for the greeting
    /// and times out.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() + CONNECT_RETRY < deadline =>
                {
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        };
        let mut c = QmpClient {
            stream,
            path: path.to_path_buf(),
            session: QmpSession::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            eof: false,
            buf: vec![0; READ_CHUNK_BYTES],
        };
        while !c.session.is_ready() {
            c.pump(deadline, timeout, "greeting and capabilities negotiation")?;
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's greeting (version, capabilities).
    pub fn greeting(&self) -> &Greeting {
        self.session
            .greeting()
            .expect("a connected client has negotiated, so it has a greeting")
    }

    /// Deadline of each later [`execute`](Self::execute) and
    /// [`execute_with_fd`](Self::execute_with_fd).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Runs a command; `args` is `Value::Null` (no arguments) or an object. Returns the
    /// `return` value, or [`ClientError::Command`] with QEMU's error class and description.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, None)
    }

    /// Runs a command with `fd` attached (SCM_RIGHTS) to the bytes of that command, e.g.
    /// `getfd {"fdname": "mig"}` or `add-fd`. QEMU receives its own duplicate; the caller
    /// keeps `fd` and should close it once QEMU has it.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, Some(fd))
    }

    fn execute_inner(
        &mut self,
        cmd: &str,
        args: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, ClientError> {
        let timeout = self.command_timeout;
        let deadline = Instant::now() + timeout;
        if self.eof {
            return Err(self.closed());
        }
        // Anything queued earlier goes first, so the next transmit is this command's line.
        self.flush(deadline, timeout)?;
        let id = self
            .session
            .send_command(cmd, args)
            .map_err(|e| self.protocol(e))?;
        let line = self
            .session
            .poll_transmit()
            .expect("a ready session transmits a command at once");
        let what = || format!("sending {cmd}");
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| self.io("set write timeout", e))?;
        let result = match fd {
            Some(fd) => send_with_fd(&self.stream, &line, fd).and_then(|n| {
                // The descriptor travelled with the first byte; the rest is plain data.
                (&self.stream).write_all(&line[n..])
            }),
            None => (&self.stream).write_all(&line),
        };
        if let Err(e) = result {
            self.session.abandon(id);
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                    path: self.path.clone(),
                    what: what(),
                    timeout,
                },
                _ => self.io("send a command", e),
            });
        }
        let waiting = format!("{cmd} (reply)");
        loop {
            if let Some(reply) = self.session.take_reply(id) {
                return reply.map_err(|error| ClientError::Command {
                    cmd: cmd.to_string(),
                    error,
                });
            }
            if let Err(e) = self.pump(deadline, timeout, &waiting) {
                self.session.abandon(id);
                return Err(e);
            }
        }
    }

    /// Waits for the next event called `name` (events of other names stay queued).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, ClientError> {
        let deadline = Instant::now() + timeout;
        let what = format!("waiting for event {name}");
        loop {
            if let Some(e) = self.session.take_event(name) {
                return Ok(e);
            }
            if self.eof {
                return Err(self.closed());
            }
            self.pump(deadline, timeout, &what)?;
        }
    }

    /// Every event received so far, oldest first (reads what the socket already holds,
    /// without waiting).
    pub fn events(&mut self) -> Result<Vec<Event>, ClientError> {
        if !self.eof {
            self.stream
                .set_nonblocking(true)
                .map_err(|e| self.io("set non-blocking", e))?;
            let read = self.read_available();
            self.stream
                .set_nonblocking(false)
                .map_err(|e| self.io("set blocking", e))?;
            read?;
        }
        Ok(std::iter::from_fn(|| self.session.poll_event()).collect())
    }

    /// Events dropped because they were not taken and the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.session.events_dropped()
    }

    fn read_available(&mut self) -> Result<(), ClientError> {
        loop {
            match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    let r = self.session.handle_input(&self.buf[..n]);
                    r.map_err(|e| self.protocol(e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
    }

    fn flush(&mut self, deadline: Instant, timeout: Duration) -> Result<(), ClientError> {
        while let Some(line) = self.session.poll_transmit() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stream
                .set_write_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| self.io("set write timeout", e))?;
            (&self.stream)
                .write_all(&line)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                        path: self.path.clone(),
                        what: "sending queued commands".into(),
                        timeout,
                    },
                    _ => self.io("send", e),
                })?;
        }
        Ok(())
    }

    /// Sends what the session has queued, then reads once (at most until `deadline`).
    fn pump(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<(), ClientError> {
        self.flush(deadline, timeout)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout {
                path: self.path.clone(),
                what: what.to_string(),
                timeout,
            });
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| self.io("set read timeout", e))?;
        match self.stream.read(&mut self.buf) {
            Ok(0) => {
                self.eof = true;
                Err(self.closed())
            }
            Ok(n) => {
                let r = self.session.handle_input(&self.buf[..n]);
                r.map_err(|e| self.protocol(e))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.io("read", e)),
        }
    }

    fn closed(&self) -> ClientError {
        ClientError::Closed {
            path: self.path.clone(),
        }
    }

    fn io(&self, what: &'static str, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn protocol(&self, source: QmpError) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            source,
        }
    }
}

/// One `sendmsg` of (a prefix of) `data` with `fd` as SCM_RIGHTS ancillary data; returns
/// the bytes sent (at least 1 on success, as the descriptor needs a byte to travel with).
fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    const FD_BYTES: u32 = size_of::<libc::c_int>() as u32;
    // A u64 array keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES) } as usize;
    assert!(space <= size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes (checked above), enough
    // for one cmsghdr carrying one int, so CMSG_FIRSTHDR is non-null and CMSG_DATA points
    // inside the buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_BYTES) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    loop {
        // SAFETY: `msg` points at `iov` (which borrows `data`) and `control`, both alive for
        // the call; the socket fd is valid while `sock` is borrowed. MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
