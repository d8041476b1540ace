//! The site agent's threads: requests from the control socket (`mgmt.rs` hands over the
//! connection) and from peers (an agent stream, spliced by the node loop to one end of a
//! socket pair) wait in bounded queues, one lane for local callers and one for peers, each
//! served by [`AGENT_WORKERS`] threads, which read the frame (with a deadline), check the
//! caller's allow-list, call the [`AgentHandler`] and write the reply. The node loop never
//! blocks on any of it: handing over is a `try_send`, and a full queue gets an
//! `overloaded` reply at once. With separate lanes, peers that send slowly (or flood) can
//! delay each other but never a local caller.
//!
//! A local request that names a site is not served here: the worker queues it as a
//! [`Relay`] and wakes the node loop, which opens an agent stream to that peer and splices
//! the client's socket to it (the peer's agent answers through it).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agent::{self, AgentError, Answer, Caller, ErrorCode, Reply, Request};
use crate::sys::EventFd;

/// Requests waiting for a worker, per lane (local, peers); one more gets an `overloaded`
/// reply.
pub const AGENT_QUEUE: usize = 16;
/// Threads serving requests, per lane (a handler call may take seconds: starting QEMU).
pub const AGENT_WORKERS: usize = 2;
/// Time a caller has to send its whole request frame.
pub const AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a reply may take to be written.
pub const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Local relay requests waiting for the node loop; more get an `overloaded` reply.
pub const MAX_PENDING_RELAYS: usize = 16;

/// Carries out agent commands at this site (implemented by the binary).
pub trait AgentHandler: Send + Sync + 'static {
    /// `req` passed the caller's allow-list and the codec's bounds.
    fn handle(&self, req: &Request) -> Result<Answer, AgentError>;
}

/// Counters of the agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStats {
    /// Requests handed to the agent (local and from peers).
    pub requests: u64,
    /// Answered by the handler (with success or its error).
    pub served: u64,
    /// Outside the calling peer's allow-list (never reached the handler).
    pub refused: u64,
    /// Malformed, over the size limit, or not sent within the deadline.
    pub bad_requests: u64,
    /// Refused because the queue was full.
    pub overloaded: u64,
    /// Local requests relayed to a peer's agent.
    pub relayed: u64,
    /// Requests from peers.
    pub from_peers: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    served: AtomicU64,
    refused: AtomicU64,
    bad_requests: AtomicU64,
    overloaded: AtomicU64,
    relayed: AtomicU64,
    from_peers: AtomicU64,
}

/// A local request for a peer's agent, for the node loop to open.
#[derive(Debug)]
pub struct Relay {
    pub peer: String,
    /// The client; non-blocking, its request fully read.
    pub sock: UnixStream,
    /// The request frame to send to the peer (site emptied).
    pub frame: Vec<u8>,
}

struct Job {
    caller: Caller,
    sock: UnixStream,
    /// Bytes of the request already read (by `mgmt.rs`).
    prefix: Vec<u8>,
}

struct Shared {
    counters: Counters,
    relays: Mutex<VecDeque<Relay>>,
    /// Wakes the node loop for relays.
    wake: EventFd,
    handler: Option<Arc<dyn AgentHandler>>,
}

/// A handle on the agent's queue (cheap to clone, for the node loop and `mgmt.rs`).
#[derive(Clone)]
pub struct Agent {
    local: SyncSender<Job>,
    peers: SyncSender<Job>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("handler", &self.shared.handler.is_some())
            .finish()
    }
}

impl Agent {
    /// Starts the workers. Without a handler every authorized request is answered
    /// `unavailable`. The threads end when every handle is dropped.
    pub fn spawn(handler: Option<Arc<dyn AgentHandler>>) -> io::Result<Agent> {
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            relays: Mutex::new(VecDeque::new()),
            wake: EventFd::new()?,
            handler,
        });
        let lane = |name: &str| -> io::Result<SyncSender<Job>> {
            let (tx, rx) = std::sync::mpsc::sync_channel(AGENT_QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..AGENT_WORKERS {
                let (rx, shared) = (rx.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("tern-agent-{name}{i}"))
                    .spawn(move || worker(&rx, &shared))?;
            }
            Ok(tx)
        };
        let local = lane("l")?;
        let peers = lane("p")?;
        Ok(Agent {
            local,
            peers,
            shared,
        })
    }

    /// The descriptor the node loop watches for relays.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.shared.wake.fd()
    }

    /// Hands a connection to the workers without blocking; a full queue is answered
    /// `overloaded` here (a short non-blocking write) and the connection closed.
    pub fn submit(&self, caller: Caller, sock: UnixStream, prefix: Vec<u8>) {
        let c = &self.shared.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        let lane = match caller {
            Caller::Peer { .. } => {
                c.from_peers.fetch_add(1, Ordering::Relaxed);
                &self.peers
            }
            Caller::Local => &self.local,
        };
        match lane.try_send(Job {
            caller,
            sock,
            prefix,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                c.overloaded.fetch_add(1, Ordering::Relaxed);
                let mut sock = job.sock;
                let _ = sock.set_nonblocking(true);
                let _ = sock.write(&agent::encode_reply(&Reply::Error(AgentError::new(
                    ErrorCode::Overloaded,
                    format!("the agent has {AGENT_QUEUE} requests queued; try again"),
                ))));
            }
        }
    }

    /// Relays the workers queued for the node loop (drains the wake-up).
    pub fn take_relays(&self) -> Vec<Relay> {
        self.shared.wake.drain();
        self.shared
            .relays
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> AgentStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentStats {
            requests: get(&c.requests),
            served: get(&c.served),
            refused: get(&c.refused),
            bad_requests: get(&c.bad_requests),
            overloaded: get(&c.overloaded),
            relayed: get(&c.relayed),
            from_peers: get(&c.from_peers),
        }
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        let job = match rx.lock() {
            Ok(r) => match r.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        serve(job, shared);
    }
}

/// Reads a whole request frame within [`AGENT_REQUEST_TIMEOUT`].
fn read_frame(
    sock: &mut UnixStream,
    mut buf: Vec<u8>,
) -> Result<(agent::RequestFrame, Vec<u8>), AgentError> {
    let deadline = Instant::now() + AGENT_REQUEST_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        match agent::decode_request(&buf) {
            Ok(Some((f, used))) => {
                buf.truncate(used);
                return Ok((f, buf));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_agent_error()),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentError::new(
                ErrorCode::BadRequest,
                format!("the request was not complete within {AGENT_REQUEST_TIMEOUT:?}"),
            ));
        }
        let _ = sock.set_read_timeout(Some(left));
        match sock.read(&mut chunk) {
            Ok(0) => {
                return Err(AgentError::new(
                    ErrorCode::BadRequest,
                    "the request ended early",
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return Err(AgentError::new(
                    ErrorCode::BadRequest,
                    format!("reading the request: {e}"),
                ));
            }
        }
    }
}

fn serve(job: Job, shared: &Shared) {
    let Job {
        caller,
        mut sock,
        prefix,
    } = job;
    let c = &shared.counters;
    let _ = sock.set_nonblocking(false);
    let _ = sock.set_write_timeout(Some(AGENT_WRITE_TIMEOUT));
    let reply = match read_frame(&mut sock, prefix) {
        Err(e) => {
            c.bad_requests.fetch_add(1, Ordering::Relaxed);
            Reply::Error(e)
        }
        Ok((frame, _)) if !frame.site.is_empty() => match caller {
            Caller::Local => match relay(shared, frame, sock) {
                Ok(()) => return,
                Err((e, s)) => {
                    sock = s;
                    Reply::Error(e)
                }
            },
            Caller::Peer { .. } => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                Reply::Error(AgentError::new(
                    ErrorCode::Refused,
                    "a peer's request cannot be relayed further",
                ))
            }
        },
        Ok((frame, _)) => match caller.authorize(&frame.request) {
            Err(e) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                if let Caller::Peer { name, .. } = &caller {
                    eprintln!(
                        "tern node: agent refused {} from peer {name}",
                        frame.request.command().name()
                    );
                }
                Reply::Error(e)
            }
            Ok(()) => {
                c.served.fetch_add(1, Ordering::Relaxed);
                match &shared.handler {
                    Some(h) => h.handle(&frame.request).into(),
                    None => Reply::Error(AgentError::new(
                        ErrorCode::Unavailable,
                        "this node runs without an agent handler",
                    )),
                }
            }
        },
    };
    let _ = sock.write_all(&agent::encode_reply(&reply));
    let _ = sock.shutdown(std::net::Shutdown::Write);
    // A close with unread input resets the caller's end before it reads the reply.
    let mut sink = [0u8; 512];
    let _ = sock.set_nonblocking(true);
    while matches!(sock.read(&mut sink), Ok(n) if n > 0) {}
}

fn relay(
    shared: &Shared,
    frame: agent::RequestFrame,
    sock: UnixStream,
) -> Result<(), (AgentError, UnixStream)> {
    let bytes = agent::encode_request("", &frame.request);
    if sock.set_nonblocking(true).is_err() {
        return Err((AgentError::new(ErrorCode::Unavailable, "socket"), sock));
    }
    let Ok(mut q) = shared.relays.lock() else {
        return Err((AgentError::new(ErrorCode::Unavailable, "relay queue"), sock));
    };
    if q.len() >= MAX_PENDING_RELAYS {
        shared.counters.overloaded.fetch_add(1, Ordering::Relaxed);
        drop(q);
        let _ = sock.set_nonblocking(false);
        return Err((
            AgentError::new(
                ErrorCode::Overloaded,
                format!("{MAX_PENDING_RELAYS} relays are waiting; try again"),
            ),
            sock,
        ));
    }
    shared.counters.relayed.fetch_add(1, Ordering::Relaxed);
    q.push_back(Relay {
        peer: frame.site,
        sock,
        frame: bytes,
    });
    drop(q);
    shared.wake.notify();
    Ok(())
}

/// Sends one request to the agent behind `socket` (the node's control socket): `site`
/// empty for this node's agent, else the peer whose agent the node relays it to. Waits up
/// to `timeout` for the reply.
pub fn call(
    socket: &std::path::Path,
    site: &str,
    req: &Request,
    timeout: Duration,
) -> Result<Reply, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "connect to node control socket {} (is the node running?): {e}",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(&agent::encode_request(site, req))
        .map_err(|e| format!("send the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((r, _)) = agent::decode_reply(&buf)? {
            return Ok(r);
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(if site.is_empty() {
                    "the node closed the connection without a reply".into()
                } else {
                    format!(
                        "no reply relayed from site {site:?} (not connected, agent streams \
                         not granted there, or no agent handler)"
                    )
                });
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read the reply: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AllowList, Name, VmState};
    use std::sync::atomic::AtomicUsize;

    /// Counts calls; `vm.list` answers one VM, anything else waits on `gate` first.
    struct Test {
        calls: AtomicUsize,
        gate: Mutex<()>,
    }

    impl AgentHandler for Test {
        fn handle(&self, req: &Request) -> Result<Answer, AgentError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match req {
                Request::VmList {} => Ok(Answer::Vms {
                    vms: vec![VmState {
                        name: "vm1".into(),
                        site: "a".into(),
                        role: "primary".into(),
                        state: "running".into(),
                        pid: 1,
                        mem_mib: 256,
                        ip: None,
                    }],
                }),
                _ => {
                    let _g = self.gate.lock();
                    Ok(Answer::Done {
                        message: "ok".into(),
                    })
                }
            }
        }
    }

    fn ask(agent: &Agent, caller: Caller, req: &Request) -> Reply {
        let (a, mut b) = UnixStream::pair().unwrap();
        agent.submit(caller, a, Vec::new());
        b.write_all(&agent::encode_request("", req)).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        b.read_to_end(&mut buf).unwrap();
        agent::decode_reply(&buf).unwrap().unwrap().0
    }

    #[test]
    fn a_refused_command_never_reaches_the_handler_and_is_counted() {
        let h = Arc::new(Test {
            calls: AtomicUsize::new(0),
            gate: Mutex::new(()),
        });
        let agent = Agent::spawn(Some(h.clone())).unwrap();
        let peer = Caller::Peer {
            name: "site-b".into(),
            allow: AllowList::parse(&["vm.list"]).unwrap(),
        };
        let r = ask(&agent, peer.clone(), &Request::VmList {});
        assert!(
            matches!(r, Reply::Ok(Answer::Vms { ref vms }) if vms.len() == 1),
            "{r:?}"
        );
        let stop = Request::VmStop {
            name: Name::new("vm1").unwrap(),
        };
        let r = ask(&agent, peer, &stop);
        let Reply::Error(e) = r else { panic!("{r:?}") };
        assert_eq!(e.code, ErrorCode::Refused);
        assert!(e.message.contains("vm.stop"), "{}", e.message);
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        // A local caller may.
        assert!(matches!(ask(&agent, Caller::Local, &stop), Reply::Ok(_)));
        assert_eq!(h.calls.load(Ordering::SeqCst), 2);
        let s = agent.stats();
        assert_eq!(
            (s.requests, s.served, s.refused, s.from_peers),
            (3, 2, 1, 2)
        );
    }

    #[test]
    fn a_full_queue_is_answered_overloaded_at_once() {
        let h = Arc::new(Test {
            calls: AtomicUsize::new(0),
            gate: Mutex::new(()),
        });
        let agent = Agent::spawn(Some(h.clone())).unwrap();
        let held = h.gate.lock().unwrap();
        let stop = agent::encode_request(
            "",
            &Request::VmStop {
                name: Name::new("vm1").unwrap(),
            },
        );
        // The workers block in the handler; the queue fills; the rest are refused.
        let mut clients = Vec::new();
        for _ in 0..AGENT_WORKERS + AGENT_QUEUE + 3 {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(&stop).unwrap();
            agent.submit(Caller::Local, a, Vec::new());
            clients.push(b);
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = Instant::now();
        let mut last = clients.pop().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = last.read(&mut buf).unwrap();
        let Reply::Error(e) = agent::decode_reply(&buf[..n]).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Overloaded);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(agent.stats().overloaded >= 1, "{:?}", agent.stats());
        drop(held);
    }

    #[test]
    fn peers_that_stall_never_delay_a_local_caller() {
        let h = Arc::new(Test {
            calls: AtomicUsize::new(0),
            gate: Mutex::new(()),
        });
        let agent = Agent::spawn(Some(h.clone())).unwrap();
        let peer = Caller::Peer {
            name: "site-b".into(),
            allow: AllowList::ALL,
        };
        // Every peer worker waits for the rest of a frame, the peer queue is full.
        let frame = agent::encode_request("", &Request::VmList {});
        let mut stalled = Vec::new();
        for i in 0..AGENT_WORKERS + AGENT_QUEUE {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(&frame[..5]).unwrap();
            agent.submit(peer.clone(), a, Vec::new());
            stalled.push(b);
            if i + 1 == AGENT_WORKERS {
                // The workers take theirs before the queue fills.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        assert_eq!(agent.stats().overloaded, 0);
        let start = Instant::now();
        let r = ask(&agent, Caller::Local, &Request::VmList {});
        assert!(matches!(r, Reply::Ok(Answer::Vms { .. })), "{r:?}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // One more peer request is refused at once, not queued behind the stalled ones.
        let (a, mut b) = UnixStream::pair().unwrap();
        agent.submit(peer, a, Vec::new());
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = b.read(&mut buf).unwrap();
        let Reply::Error(e) = agent::decode_reply(&buf[..n]).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Overloaded);
        drop(stalled);
    }

    #[test]
    fn a_peer_cannot_relay_and_a_slow_or_bad_request_is_answered() {
        let agent = Agent::spawn(None).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        agent.submit(
            Caller::Peer {
                name: "site-b".into(),
                allow: AllowList::ALL,
            },
            a,
            Vec::new(),
        );
        b.write_all(&agent::encode_request("site-c", &Request::VmList {}))
            .unwrap();
        let mut buf = Vec::new();
        b.read_to_end(&mut buf).unwrap();
        let Reply::Error(e) = agent::decode_reply(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Refused);
        assert!(agent.take_relays().is_empty());
        // Garbage: bad request. No handler: unavailable.
        let (a, mut b) = UnixStream::pair().unwrap();
        agent.submit(Caller::Local, a, b"status\n".to_vec());
        let mut buf = Vec::new();
        b.read_to_end(&mut buf).unwrap();
        let Reply::Error(e) = agent::decode_reply(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::BadRequest);
        let Reply::Error(e) = ask(&agent, Caller::Local, &Request::VmList {}) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Unavailable);
        // A local request naming a site becomes a relay for the node loop.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&agent::encode_request("site-b", &Request::VmList {}))
            .unwrap();
        agent.submit(Caller::Local, a, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        let relays = loop {
            let r = agent.take_relays();
            if !r.is_empty() || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(relays.len(), 1);
        assert_eq!(relays[0].peer, "site-b");
        assert_eq!(
            agent::decode_request(&relays[0].frame).unwrap().unwrap().0,
            agent::RequestFrame {
                site: String::new(),
                request: Request::VmList {}
            }
        );
        let s = agent.stats();
        assert_eq!((s.bad_requests, s.refused, s.relayed), (1, 1, 1), "{s:?}");
    }
}
