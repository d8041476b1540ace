//! The node's event loop: one thread, epoll with nanosecond timeouts, batched UDP, and every
//! terminated TCP connection as a stream of the transport.
//!
//! ```text
//! client --TCP--> [REDIRECT] listener --accept--> open stream, write open header (zero-RTT)
//!   TCP bytes --RecordEncoder (compress)--> stream ==WAN== stream --RecordDecoder--> TCP to target
//!   FIN <-> stream finish, RST <-> stream reset, connect failure -> reset -> client RST
//! ```
//! Every stream starts with an open header (`open.rs`): TCP target, unix socket (live
//! migration, `tern migrate`) or overlay (the L2 switch, `switch.rs`). Migration streams are
//! read from QEMU only while the stream's never-sent bytes stay under about two
//! bandwidth-delay products, so QEMU's own bandwidth estimate is the WAN's drain rate.
//! A migration stream opened with codec options is re-encoded by tern-codec between QEMU and
//! the record layer (source: `Encoder`; destination: `Decoder` and the site's content
//! store), and its reverse direction carries framed return-path bytes and the store summary.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tern_codec::ContentStore as _;
use tern_transport::connection::Config;
use tern_transport::endpoint::{Endpoint, EndpointEvent, PeerConfig, PeerId};
use tern_transport::record::{
    Codec, RecordDecoder, RecordEncoder, ZSTD_SMALL_WINDOW_LOG, ZSTD_WINDOW_LOG,
};
use tern_transport::{Event, StreamError};

use crate::config::{Compression, NodeConfig};
use crate::open::OpenHeader;
use crate::status::{FlowTotals, MigrationRecord, NodeStatus, OverlayStatus, PeerStatus};
use crate::switch::{self, FrameDecoder, Port, Switch};
use crate::sys::{self, Epoll, UdpBatch, UdpRecv};
use crate::{NodeError, nft, open};

/// Flows that may compress with the large zstd window (8 MiB, ~10 MiB of encoder state
/// and 8 MiB at the far decoder each); later flows get 2 MiB while these are open.
const LARGE_WINDOW_FLOWS: usize = 16;
/// Flows that may compress with zstd at all: 16 × 8 MiB + 240 × 2 MiB of windows at the far
/// decoder (and ~1.2x that here) at most, instead of one zstd context per flow up to
/// [`MAX_FLOWS`] (8 GiB); later flows compress with lz4 while these are open. A peer's
/// streams get zstd decoders here with the same bounds doubled, per peer (`new_flow`), so a
/// peer that ignores them holds at most 32 × 8 MiB + 480 × 2 MiB of our memory in windows.
const ZSTD_FLOWS: usize = 256;

const TOKEN_UDP: u64 = 0;
/// The management thread wants a status snapshot (`mgmt.rs`).
const TOKEN_MGMT: u64 = 1;
const TOKEN_INTERCEPT: u64 = 3;
const TOKEN_OVERLAY: u64 = 4;
const TOKEN_MIGRATE: u64 = 5;
const TOKEN_TAP: u64 = 6;
/// The site agent queued local requests to relay to a peer's agent (`agent_worker.rs`).
const TOKEN_AGENT: u64 = 7;
const TOKEN_FORWARD: u64 = 16;
/// Local relay requests being read (`accept_migrations`); forwards end below.
const TOKEN_REQUEST: u64 = 1 << 30;
const TOKEN_PORT: u64 = 1 << 31;
const TOKEN_FLOW: u64 = 1 << 32;
/// Bytes read from a TCP socket per record.
const CHUNK: usize = 64 * 1024;
/// Bounds of a relayed TCP stream's never-sent bytes (about two BDPs in between): reading and
/// compressing further ahead only delays the packets that are due (the node has one thread).
/// Reading up to the 16 MiB stream window on `mpls` with zstd-3 spent ~0.2 s compressing
/// before the first packet left, and the pacer's lost slots dragged the rate estimate down.
const TCP_BUFFER_MIN: u64 = 1 << 20;
const TCP_BUFFER_MAX: u64 = 16 << 20;
/// TCP bytes read (and compressed) for one flow before the loop turns to the network again.
const PUMP_BUDGET: usize = 4 * CHUNK;
/// Below this bottleneck-rate estimate a relayed stream compresses every record instead of
/// backing off while compression does not pay (`RecordEncoder::set_compress_all`): even
/// incompressible input then costs zstd-3 ≤ 31 MB/s × 0.6 ms/MB ≈ 2 % of a core, and the
/// complete window finds repeats the back-off would send raw (/usr corpus 2.21x → 2.37x).
/// At 1 Gbit/s it would cost 7–10 % of the sending node's CPU, which a 2-core host pays in
/// goodput. A new connection's estimate starts low (Startup), so its first round trips
/// compress every record on any link.
const COMPRESS_ALL_BELOW_BPS: u64 = 250_000_000;
/// Decoded bytes waiting for a slow TCP receiver before the stream stops being read.
const OUT_LIMIT: usize = 4 << 20;
/// Most concurrently terminated connections.
const MAX_FLOWS: usize = 4096;
/// Most VM NICs attached to the switch.
const MAX_PORTS: usize = 256;
/// Frames queued towards one VM NIC before further frames to it are dropped.
const PORT_OUT_LIMIT: usize = 1 << 20;
/// Bounds of a migration stream's never-sent bytes (about two BDPs in between). Counting
/// unacknowledged bytes instead stalled the stream behind every lost packet until its
/// repair (tern 2-4x slower than kernel BBR on the lossy 1 Gbit/s profiles); a limit that
/// follows the pacing rate without a floor let the sender go application-limited and drag
/// the rate estimate, and with it the limit, down in a spiral (45 of 100 Mbit/s on mpls).
const MIGRATION_BUFFER_MIN: u64 = 512 << 10;
const MIGRATION_BUFFER_MAX: u64 = 4 << 20;
/// QEMU bytes a re-encoded migration stream may have read beyond what the destination
/// reports written to its QEMU (at least; 3x the stream limit when larger).
const MIGRATION_QEMU_INFLIGHT: u64 = 8 << 20;
/// Delivered QEMU bytes between two reports from a destination.
const DELIVERED_REPORT: u64 = 256 << 10;
/// Decoded bytes waiting for a destination QEMU before the stream stops being read.
const MIGRATION_OUT_LIMIT: usize = 1 << 20;
/// How long a source waits for the destination's store summary before sending without it.
const SUMMARY_WAIT_NS: u64 = 3_000_000_000;
/// UDP receive batches (of up to `sys::BATCH` datagrams) per loop turn, so that timers and
/// TCP are never starved by a flood: 16 × 32 datagrams ≈ 6 ms of a 1 Gbit/s link.
const UDP_BATCHES_PER_TURN: usize = 16;
/// Local relay requests being read at once; the oldest is refused for a new one.
const MAX_PENDING_REQUESTS: usize = 16;
/// Time a local client has to send its whole relay request.
const REQUEST_TIMEOUT_NS: u64 = 2_000_000_000;
/// Finished migrations kept in the status.
const MIGRATION_LOG: usize = 32;
/// Stream reset codes.
pub const RESET_TCP_RST: u64 = 1;
pub const RESET_CONNECT_FAILED: u64 = 2;
pub const RESET_BAD_HEADER: u64 = 3;
pub const RESET_BAD_RECORD: u64 = 4;
/// The stream's target is not granted to the peer that opened it (`grants.rs`).
pub const RESET_REFUSED: u64 = 5;

static STOP: AtomicBool = AtomicBool::new(false);
/// SIGHUP: re-read the config (`reload.rs`).
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

/// The local end of a flow: a terminated TCP connection or a unix socket (migration).
#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn shutdown_write(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
    /// Makes close send a TCP RST (unix sockets just close).
    fn abort_on_close(&self) {
        if let Sock::Tcp(s) = self {
            sys::set_linger_zero(s.as_raw_fd());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowKind {
    Tcp,
    Migration,
}

#[derive(Debug, PartialEq, Eq)]
enum FlowState {
    /// Accepting side: waiting for the open header from the stream.
    AwaitHeader,
    Connecting,
    Open,
}

/// The tern-codec end of a re-encoded migration stream (always boxed in its flow).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum MigCodec {
    Source {
        enc: tern_codec::Encoder,
        rev: tern_codec::wire::ReverseReader,
        summary_deadline_ns: u64,
        /// QEMU bytes the destination reports written to its QEMU.
        delivered: u64,
        record: MigrationRecord,
    },
    Destination {
        dec: tern_codec::Decoder,
        pinned: bool,
        /// QEMU bytes written to the local QEMU, and the last total reported to the source.
        delivered: u64,
        reported: u64,
        record: MigrationRecord,
    },
}

#[derive(Debug)]
struct Flow {
    sock: Option<Sock>,
    mig: Option<Box<MigCodec>>,
    /// Encoded bytes the stream did not take yet (written before anything new is read).
    spill: Vec<u8>,
    kind: FlowKind,
    peer: PeerId,
    stream: u64,
    state: FlowState,
    sock_readable: bool,
    read_eof: bool,
    enc: RecordEncoder,
    header: Vec<u8>,
    dec: RecordDecoder,
    /// The zstd window its decoder may hold (`None`: no zstd), see `new_flow`.
    dec_window_log: Option<u32>,
    out: Vec<u8>,
    out_pos: usize,
    stream_fin: bool,
    shut_write: bool,
}

#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    ep: Endpoint,
    epoll: Epoll,
    udp: UdpSocket,
    mgmt: crate::mgmt::Mgmt,
    agent: crate::agent_worker::Agent,
    intercept: Option<TcpListener>,
    forwards: Vec<TcpListener>,
    flows: HashMap<u64, Flow>,
    by_stream: BTreeMap<(PeerId, u64), u64>,
    next_flow: u64,
    totals: FlowTotals,
    codec: Codec,
    tx: UdpBatch,
    rx: UdpRecv,
    buf: Vec<u8>,
    enc_buf: Vec<u8>,
    udp_blocked: bool,
    clock_base: u64,
    started_ns: u64,
    nft_table: Option<String>,
    overlay: Option<Overlay>,
    migrate: Option<UnixListener>,
    store: Option<tern_codec::FileStore>,
    mig_log: VecDeque<MigrationRecord>,
    mig_buf: Vec<u8>,
    rt: Realtime,
    requests: BTreeMap<u64, PendingRequest>,
    next_request: u64,
    /// Flows relaying a local client's agent request to a peer: a reset is answered to the
    /// client (`open_agent_relays`).
    agent_relays: std::collections::BTreeSet<u64>,
    /// The UDP socket had more to read when `recv_udp` stopped at its budget.
    udp_more: bool,
    /// systemd's `NOTIFY_SOCKET`, if set (`notify.rs`).
    notify: crate::notify::Notifier,
    reloads: crate::reload::ReloadStats,
}

/// A local relay request whose bytes are still arriving.
#[derive(Debug)]
struct PendingRequest {
    sock: UnixStream,
    buf: Vec<u8>,
    deadline_ns: u64,
}

/// Scheduling policy of the node's loop under `realtime_priority` (see [`Node::update_realtime`]).
#[derive(Debug, Default)]
struct Realtime {
    active: bool,
    /// Setting the policy failed (no CAP_SYS_NICE): stay as started.
    failed: bool,
    window_start_ns: u64,
    sent: u64,
    received: u64,
    switches: u64,
    /// Loop iterations of this window that stopped reading TCP at the budget.
    read_bound: u64,
}

/// Whether a window in which the node sent `sent` and received `received` WAN bytes, and
/// stopped reading TCP at its budget `read_bound` times, calls for SCHED_FIFO.
fn wants_realtime(sent: u64, received: u64, read_bound: u64) -> bool {
    sent >= RT_MIN_BYTES && sent > received && read_bound == 0
}

/// How often the node re-decides its scheduling policy.
const RT_WINDOW_NS: u64 = 20_000_000;
/// Least WAN bytes sent in a window for the node to count as sending (~26 Mbit/s).
const RT_MIN_BYTES: u64 = 64 * 1024;

/// A VM NIC on the switch.
#[derive(Debug)]
struct VmPort {
    sock: UnixStream,
    dec: FrameDecoder,
    out: Vec<u8>,
    out_pos: usize,
}

/// The overlay link to one remote site: our stream to it and its stream to us.
#[derive(Debug, Default)]
struct RemoteLink {
    out: Option<u64>,
    inbound: Option<u64>,
    dec: FrameDecoder,
}

#[derive(Debug)]
struct Overlay {
    listener: UnixListener,
    socket: std::path::PathBuf,
    tap: Option<File>,
    ports: BTreeMap<u64, VmPort>,
    next_port: u64,
    remotes: Vec<RemoteLink>,
    sw: Switch,
    frame: Vec<u8>,
    status: OverlayStatus,
}

/// Writes as much of a flow's spill as its stream takes; the bytes written.
fn write_spill(
    conn: &mut tern_transport::connection::Connection,
    stream: u64,
    spill: &mut Vec<u8>,
) -> u64 {
    let w = conn.stream_write(stream, spill).unwrap_or(0);
    spill.drain(..w);
    w as u64
}

/// The site's content store, or one that holds nothing when the node has none.
fn content_store<'a>(
    store: &'a mut Option<tern_codec::FileStore>,
    none: &'a mut tern_codec::store::NoStore,
) -> &'a mut dyn tern_codec::ContentStore {
    match store {
        Some(s) => s,
        None => none,
    }
}

/// Decoded bytes a flow may hold for its local socket before the stream stops being read.
fn flow_out_limit(kind: FlowKind) -> usize {
    match kind {
        FlowKind::Tcp => OUT_LIMIT,
        FlowKind::Migration => MIGRATION_OUT_LIMIT,
    }
}

/// What a new flow's neighbours hold: our zstd encoders (and those with the large
/// window), and the zstd decoders the same peer's streams hold here (and those allowed the
/// large window).
#[derive(Debug, Clone, Copy, Default)]
struct FlowCounts {
    zstd_flows: usize,
    large_windows: usize,
    zstd_caps: usize,
    large_caps: usize,
}

/// A new flow's encoder codec and window, and the largest zstd window its decoder accepts
/// (`None`: no zstd at all). Bounds what a site's flows hold: at most [`ZSTD_FLOWS`] zstd
/// encoders (later flows lz4), [`LARGE_WINDOW_FLOWS`] of them with the large window; a
/// peer's streams get at most twice that many zstd decoders (a tern sender's counts and
/// ours differ while flows close), past which its zstd records are refused.
fn flow_codecs(configured: Codec, n: FlowCounts) -> (Codec, u32, Option<u32>) {
    let window_log = if n.large_windows < LARGE_WINDOW_FLOWS {
        ZSTD_WINDOW_LOG
    } else {
        ZSTD_SMALL_WINDOW_LOG
    };
    // Past ZSTD_FLOWS, lz4 (a few KiB of state a side) instead of another zstd context.
    let codec = match configured {
        Codec::Zstd { .. } if n.zstd_flows >= ZSTD_FLOWS => Codec::Lz4,
        c => c,
    };
    let dec_window_log = if n.zstd_caps >= 2 * ZSTD_FLOWS {
        None
    } else if n.large_caps < 2 * LARGE_WINDOW_FLOWS {
        Some(ZSTD_WINDOW_LOG)
    } else {
        Some(ZSTD_SMALL_WINDOW_LOG)
    };
    (codec, window_log, dec_window_log)
}

/// A relay target must be a socket itself, not a symlink to one elsewhere (a policy
/// refusal: `PermissionDenied`).
fn is_socket_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path)?.file_type().is_socket() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a socket (a symlink or another kind of file)",
        ))
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Binds a non-blocking unix listener, replacing a stale socket file: mode 0600 from the
/// start (`tern_os::unix::bind_private`); accepted clients are checked with
/// `tern_os::unix::peer_allowed`.
fn bind_unix(path: &Path) -> Result<UnixListener, NodeError> {
    let io = |what: String| move |source| NodeError::Io { what, source };
    let l =
        tern_os::unix::bind_private(path, None).map_err(io(format!("bind {}", path.display())))?;
    l.set_nonblocking(true)
        .map_err(io("listener non-blocking".into()))?;
    Ok(l)
}

impl Node {
    /// A node whose site agent has no handler (agent requests get `unavailable`).
    pub fn new(config: NodeConfig) -> Result<Node, NodeError> {
        Node::with_agent(config, None)
    }

    /// A node whose site agent carries out requests with `handler` (`agent_worker.rs`).
    pub fn with_agent(
        config: NodeConfig,
        handler: Option<std::sync::Arc<dyn crate::agent_worker::AgentHandler>>,
    ) -> Result<Node, NodeError> {
        let io = |what: String| move |source| NodeError::Io { what, source };
        let udp =
            UdpSocket::bind(config.listen).map_err(io(format!("bind UDP {}", config.listen)))?;
        udp.set_nonblocking(true)
            .map_err(io("UDP non-blocking".into()))?;
        sys::set_buffers(&udp, 16 << 20);
        sys::set_dont_fragment(udp.as_raw_fd());
        sys::enable_udp_gro(udp.as_raw_fd());
        // The content store opens (a large one takes a second) before the control socket
        // exists: a client that sees the socket gets answers from a running loop, not a
        // management thread whose loop is still busy opening the store.
        let store = match config.migration.as_ref().and_then(|m| m.store.as_ref()) {
            Some((dir, pages)) => Some(
                tern_codec::FileStore::open(dir, *pages)
                    .map_err(io(format!("open content store {}", dir.display())))?,
            ),
            None => None,
        };
        let control = tern_os::unix::bind_private(&config.control, None).map_err(io(format!(
            "bind control socket {}",
            config.control.display()
        )))?;
        let metrics = match config.metrics {
            Some(a) => Some(TcpListener::bind(a).map_err(io(format!("bind metrics {a}")))?),
            None => None,
        };
        // Control and metrics are served from their own thread (`mgmt.rs`).
        let agent = crate::agent_worker::Agent::spawn(handler)
            .map_err(io("start the agent threads".into()))?;
        let mgmt = crate::mgmt::Mgmt::spawn(control, metrics, Some(agent.clone()))
            .map_err(io("start the management thread".into()))?;
        let intercept = if config.accelerate.is_empty() {
            None
        } else {
            let a = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.intercept_port));
            let l = TcpListener::bind(a).map_err(io(format!("bind intercept listener {a}")))?;
            l.set_nonblocking(true)
                .map_err(io("listener non-blocking".into()))?;
            Some(l)
        };
        let mut forwards = Vec::new();
        for f in &config.forward {
            let l =
                TcpListener::bind(f.listen).map_err(io(format!("bind forward {}", f.listen)))?;
            l.set_nonblocking(true)
                .map_err(io("listener non-blocking".into()))?;
            forwards.push(l);
        }
        let epoll = Epoll::new().map_err(io("epoll".into()))?;
        epoll
            .add(
                udp.as_raw_fd(),
                TOKEN_UDP,
                sys::READ | sys::WRITE | sys::EDGE,
            )
            .map_err(io("epoll add".into()))?;
        epoll
            .add(mgmt.wake_fd(), TOKEN_MGMT, sys::READ)
            .map_err(io("epoll add".into()))?;
        epoll
            .add(agent.wake_fd(), TOKEN_AGENT, sys::READ)
            .map_err(io("epoll add".into()))?;
        if let Some(l) = &intercept {
            epoll
                .add(l.as_raw_fd(), TOKEN_INTERCEPT, sys::READ)
                .map_err(io("epoll add".into()))?;
        }
        for (i, l) in forwards.iter().enumerate() {
            epoll
                .add(l.as_raw_fd(), TOKEN_FORWARD + i as u64, sys::READ)
                .map_err(io("epoll add".into()))?;
        }
        let overlay = match &config.overlay {
            Some(o) => {
                let listener = bind_unix(&o.socket)?;
                epoll
                    .add(listener.as_raw_fd(), TOKEN_OVERLAY, sys::READ)
                    .map_err(io("epoll add".into()))?;
                let tap = match &o.tap {
                    Some(name) => {
                        let f = sys::open_tap(name).map_err(io(format!("TAP {name}")))?;
                        let mut cmds = vec![vec!["link", "set", name.as_str(), "up"]];
                        let addr = o.tap_address.map(|(ip, p)| format!("{ip}/{p}"));
                        if let Some(a) = &addr {
                            cmds.push(vec!["addr", "replace", a.as_str(), "dev", name.as_str()]);
                        }
                        for c in cmds {
                            let ok = std::process::Command::new("ip")
                                .args(&c)
                                .status()
                                .map(|s| s.success())
                                .unwrap_or(false);
                            if !ok {
                                return Err(NodeError::Io {
                                    what: format!("ip {}", c.join(" ")),
                                    source: io::Error::other("failed"),
                                });
                            }
                        }
                        epoll
                            .add(f.as_raw_fd(), TOKEN_TAP, sys::READ | sys::EDGE)
                            .map_err(io("epoll add".into()))?;
                        Some(f)
                    }
                    None => None,
                };
                Some(Overlay {
                    listener,
                    socket: o.socket.clone(),
                    tap,
                    ports: BTreeMap::new(),
                    next_port: 0,
                    remotes: (0..config.peers.len())
                        .map(|_| RemoteLink::default())
                        .collect(),
                    sw: Switch::new(),
                    frame: Vec::with_capacity(switch::MAX_FRAME),
                    status: OverlayStatus::default(),
                })
            }
            None => None,
        };
        let migrate = match &config.migration {
            Some(m) => {
                let l = bind_unix(&m.socket)?;
                epoll
                    .add(l.as_raw_fd(), TOKEN_MIGRATE, sys::READ)
                    .map_err(io("epoll add".into()))?;
                Some(l)
            }
            None => None,
        };
        let nft_table = if config.accelerate.is_empty() {
            None
        } else {
            Some(nft::install(
                &config.name,
                &config.accelerate,
                config.intercept_port,
                config.bypass_ports,
            )?)
        };
        let transport = Config {
            max_rate_bps: config.max_rate_bps,
            fec: config.fec,
            rekey_after_packets: config.rekey_after_packets,
            ..Config::default()
        };
        let peers = config
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                public: p.public,
                addr: p.address,
            })
            .collect();
        let clock_base = sys::mono_ns();
        let seed = sys::wall_ns() ^ u64::from(std::process::id());
        let ep = Endpoint::new(
            config.identity.clone(),
            peers,
            transport,
            seed,
            false,
            sys::wall_ns(),
        );
        let codec = match config.compression {
            Compression::None => Codec::Raw,
            Compression::Lz4 => Codec::Lz4,
            Compression::Zstd { level } => Codec::Zstd { level },
        };
        Ok(Node {
            ep,
            epoll,
            udp,
            mgmt,
            agent,
            intercept,
            forwards,
            flows: HashMap::new(),
            by_stream: BTreeMap::new(),
            next_flow: 0,
            totals: FlowTotals::default(),
            codec,
            tx: UdpBatch::new(),
            rx: UdpRecv::new(),
            buf: vec![0; CHUNK],
            enc_buf: Vec::with_capacity(CHUNK + 64),
            udp_blocked: false,
            clock_base,
            started_ns: sys::mono_ns(),
            nft_table,
            overlay,
            migrate,
            store,
            mig_log: VecDeque::new(),
            rt: Realtime::default(),
            mig_buf: Vec::with_capacity(2 * CHUNK),
            requests: BTreeMap::new(),
            next_request: 0,
            agent_relays: std::collections::BTreeSet::new(),
            udp_more: false,
            notify: crate::notify::Notifier::from_env(),
            reloads: Default::default(),
            config,
        })
    }

    fn now(&self) -> u64 {
        sys::mono_ns() - self.clock_base
    }

    /// Runs until SIGINT/SIGTERM; SIGHUP reloads the config ([`Node::reload`]).
    pub fn run(mut self) -> Result<(), NodeError> {
        // SAFETY: installing an async-signal-safe handler that only stores an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        sys::set_timer_slack();
        eprintln!(
            "tern node {}: listening on udp {}, {} peer(s), {} transparent rule(s), {} forward(s)",
            self.config.name,
            self.config.listen,
            self.config.peers.len(),
            self.config.accelerate.len(),
            self.config.forward.len()
        );
        // Everything is bound and listening (Node::new).
        let summary = self.summary();
        self.notify.ready(&summary);
        let mut ready = Vec::new();
        let result = loop {
            if STOP.load(Ordering::SeqCst) {
                break Ok(());
            }
            if RELOAD.swap(false, Ordering::SeqCst) {
                let _ = self.reload();
            }
            let now = self.now();
            self.update_realtime(now);
            self.ep.handle_timeout(now);
            if self.udp_more {
                self.recv_udp();
            }
            self.handle_events();
            let more = self.pump_all_tcp();
            self.rt.read_bound += u64::from(more);
            self.handle_events();
            if let Err(e) = self.flush_udp() {
                eprintln!("tern node: UDP send: {e}");
            }
            let timeout = self.ep.poll_timeout().map(|t| t.saturating_sub(self.now()));
            let timeout = if (self.tx.is_empty() || self.udp_blocked) && !more && !self.udp_more {
                timeout
            } else {
                Some(0)
            };
            // No early wake-up and spin: the pacer absorbs a late wake-up (it catches up), and
            // spinning took the cores from the programs the node serves (node `a` on `mpls`
            // 0.27 -> 0.20 cores, `ll-metro` 0.47 -> 0.41, goodput alike).
            if let Err(e) = self.epoll.wait(timeout, &mut ready) {
                break Err(NodeError::Io {
                    what: "epoll wait".into(),
                    source: e,
                });
            }
            for &(token, events) in &ready {
                self.on_ready(token, events);
            }
        };
        eprintln!("tern node {}: stopping", self.config.name);
        self.notify.stopping();
        self.shutdown();
        result
    }

    /// With `realtime_priority` set, the loop runs under SCHED_FIFO while the node mostly
    /// sends onto the WAN (in the last [`RT_WINDOW_NS`] it sent ≥ [`RT_MIN_BYTES`], more
    /// than it received, and never stopped reading TCP at its budget) and time-shares
    /// otherwise. A sending node's loop is the datapath that kernel TCP runs in softirq,
    /// ahead of every task: descheduled for 1–2 ms behind the emulator and iperf3 on 2
    /// cores, it let the 1.2 ms queue of `ll-metro` run dry (one 8 s flow, alternating runs:
    /// 888 / 914 / 906 -> 929 / 938 / 933 Mbit/s). A receiving node stays time-shared:
    /// woken by every arriving batch, under SCHED_FIFO it preempted the emulator that fed it
    /// (853 / 845 against 909 / 916). So does a node busy reading TCP: it kept the
    /// application that writes that TCP off a core (4 flows on `metro` 899 against 917 on
    /// average; with the rule 942 against 917).
    fn update_realtime(&mut self, now: u64) {
        let Some(priority) = self.config.realtime_priority else {
            return;
        };
        if self.rt.failed || now < self.rt.window_start_ns + RT_WINDOW_NS {
            return;
        }
        let (sent, received) = (0..self.ep.peer_count())
            .filter_map(|p| self.ep.connection_ref(p))
            .map(|c| c.stats())
            .fold((0, 0), |(s, r), st| {
                (s + st.bytes_sent, r + st.bytes_received)
            });
        // Counters restart with a new connection: a window across that counts as idle.
        let ds = sent.saturating_sub(self.rt.sent);
        let dr = received.saturating_sub(self.rt.received);
        (self.rt.window_start_ns, self.rt.sent, self.rt.received) = (now, sent, received);
        let want = wants_realtime(ds, dr, self.rt.read_bound);
        self.rt.read_bound = 0;
        if want == self.rt.active {
            return;
        }
        match sys::set_realtime(want.then_some(priority)) {
            Ok(()) => {
                self.rt.active = want;
                self.rt.switches += 1;
            }
            Err(e) => {
                eprintln!(
                    "tern node: cannot change the scheduling policy ({e}); \
                     realtime_priority is ignored"
                );
                self.rt.failed = true;
            }
        }
    }

    fn shutdown(&mut self) {
        for peer in 0..self.ep.peer_count() {
            if let Some(c) = self.ep.connection(peer) {
                c.close(tern_transport::connection::CLOSE_NORMAL);
            }
        }
        let _ = self.flush_udp();
        if let Some(t) = self.nft_table.take() {
            nft::remove(&t);
        }
        let _ = std::fs::remove_file(&self.config.control);
        if let Some(o) = &self.overlay {
            let _ = std::fs::remove_file(&o.socket);
        }
        if let Some(m) = &self.config.migration {
            let _ = std::fs::remove_file(&m.socket);
        }
    }

    fn on_ready(&mut self, token: u64, events: u32) {
        match token {
            TOKEN_UDP => {
                if events & sys::WRITE != 0 {
                    self.udp_blocked = false;
                }
                if events & sys::READ != 0 {
                    self.recv_udp();
                }
            }
            TOKEN_MGMT => {
                if self.mgmt.take_reload() {
                    let outcome = self.reload();
                    self.mgmt.reload_done(outcome);
                }
                self.mgmt.serve(|| self.status())
            }
            TOKEN_INTERCEPT => self.accept(None),
            TOKEN_OVERLAY => self.accept_ports(),
            TOKEN_MIGRATE => self.accept_migrations(),
            TOKEN_TAP => self.read_tap(),
            TOKEN_AGENT => self.open_agent_relays(),
            t if (TOKEN_REQUEST..TOKEN_PORT).contains(&t) => self.read_request(t - TOKEN_REQUEST),
            t if (TOKEN_FORWARD..TOKEN_REQUEST).contains(&t) => {
                self.accept(Some((t - TOKEN_FORWARD) as usize))
            }
            t if (TOKEN_PORT..TOKEN_FLOW).contains(&t) => self.on_port_ready(t - TOKEN_PORT),
            t => self.on_flow_ready(t - TOKEN_FLOW, events),
        }
    }

    /// Reads up to [`UDP_BATCHES_PER_TURN`] batches; with more waiting, `udp_more` makes the
    /// loop come back to it after its timers and TCP (the socket is edge-triggered).
    fn recv_udp(&mut self) {
        self.udp_more = false;
        for _ in 0..UDP_BATCHES_PER_TURN {
            let n = match self.rx.recv(self.udp.as_raw_fd()) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("tern node: UDP receive: {e}");
                    0
                }
            };
            let now = self.now();
            for i in 0..n {
                let (from, data) = self.rx.get(i);
                self.ep.handle_datagram(now, from, data);
            }
            if !self.rx.was_full() {
                return;
            }
            // Let the transport answer (ACKs) between large batches.
            self.handle_events();
            let _ = self.flush_udp();
        }
        self.udp_more = true;
    }

    fn flush_udp(&mut self) -> io::Result<()> {
        let fd = self.udp.as_raw_fd();
        let mut pkt = Vec::with_capacity(2048);
        loop {
            if self.udp_blocked {
                return Ok(());
            }
            if !self.tx.is_full() {
                pkt.clear();
                let now = self.now();
                if let Some(to) = self.ep.poll_transmit(now, &mut pkt) {
                    self.tx.push(to, &pkt);
                    continue;
                }
            }
            if self.tx.is_empty() {
                return Ok(());
            }
            let before = self.tx.len();
            self.tx.send(fd)?;
            if self.tx.len() == before {
                self.udp_blocked = true;
                return Ok(());
            }
        }
    }

    // ------------------------------------------------------------------ transport events

    fn handle_events(&mut self) {
        while let Some(ev) = self.ep.poll_event() {
            match ev {
                EndpointEvent::Connected(peer) => {
                    eprintln!("tern node: connected to peer {}", self.ep.peer_name(peer));
                    self.open_overlay_link(peer);
                }
                EndpointEvent::Disconnected { peer, code } => {
                    eprintln!(
                        "tern node: peer {} disconnected (code {code}); resetting its connections",
                        self.ep.peer_name(peer)
                    );
                    let ids: Vec<u64> = self
                        .by_stream
                        .range((peer, 0)..=(peer, u64::MAX))
                        .map(|(_, &f)| f)
                        .collect();
                    for f in ids {
                        self.abort_flow(f, false);
                    }
                    if let Some(o) = &mut self.overlay {
                        o.remotes[peer] = RemoteLink::default();
                        o.sw.remove_port(Port::Remote(peer));
                    }
                }
                EndpointEvent::Stream { peer, event } => self.on_stream_event(peer, event),
            }
        }
    }

    fn on_stream_event(&mut self, peer: PeerId, event: Event) {
        match event {
            Event::StreamOpened(id) => {
                if self.flows.len() >= MAX_FLOWS {
                    if let Some(c) = self.ep.connection(peer) {
                        let _ = c.stream_reset(id, RESET_CONNECT_FAILED);
                    }
                    self.totals.refused += 1;
                    return;
                }
                let f = self.new_flow(None, FlowKind::Tcp, peer, id, FlowState::AwaitHeader);
                self.pump_stream(f);
            }
            Event::Readable(id) => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.pump_stream(f);
                } else if self.is_overlay_inbound(peer, id) {
                    self.pump_overlay_in(peer);
                }
            }
            Event::Writable(id) => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.pump_tcp(f);
                }
            }
            Event::StreamReset { id, code } => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.totals.reset_by_peer += 1;
                    self.answer_agent_reset(f, code);
                    self.abort_flow(f, false);
                } else if let Some(o) = &mut self.overlay {
                    let link = &mut o.remotes[peer];
                    if link.inbound == Some(id) {
                        link.inbound = None;
                        link.dec = FrameDecoder::default();
                    }
                    if link.out == Some(id) {
                        link.out = None;
                    }
                }
            }
            Event::Closed { .. } => {}
        }
    }

    fn new_flow(
        &mut self,
        sock: Option<Sock>,
        kind: FlowKind,
        peer: PeerId,
        stream: u64,
        state: FlowState,
    ) -> u64 {
        let id = self.next_flow;
        self.next_flow += 1;
        // One pass over the open flows: our zstd encoders (and those with the large window),
        // and the zstd decoders this peer's streams hold here (and those allowed the large
        // window).
        let (mut zstd_flows, mut large_windows, mut zstd_caps, mut large_caps) = (0, 0, 0, 0);
        for f in self.flows.values() {
            if matches!(f.enc.codec(), Codec::Zstd { .. }) {
                zstd_flows += 1;
                large_windows += usize::from(f.enc.window_log() == ZSTD_WINDOW_LOG);
            }
            if f.peer == peer && f.dec_window_log.is_some() {
                zstd_caps += 1;
                large_caps += usize::from(f.dec_window_log == Some(ZSTD_WINDOW_LOG));
            }
        }
        let (codec, window_log, dec_window_log) = flow_codecs(
            self.codec,
            FlowCounts {
                zstd_flows,
                large_windows,
                zstd_caps,
                large_caps,
            },
        );
        if let Some(s) = &sock {
            let _ = self.epoll.add(
                s.fd(),
                TOKEN_FLOW + id,
                sys::READ | sys::WRITE | sys::EDGE | sys::HUP,
            );
        }
        self.flows.insert(
            id,
            Flow {
                sock,
                mig: None,
                spill: Vec::new(),
                kind,
                peer,
                stream,
                state,
                sock_readable: true,
                read_eof: false,
                enc: RecordEncoder::with_window_log(codec, window_log),
                header: Vec::new(),
                dec: RecordDecoder::with_window_log_max(dec_window_log),
                dec_window_log,
                out: Vec::new(),
                out_pos: 0,
                stream_fin: false,
                shut_write: false,
            },
        );
        self.by_stream.insert((peer, stream), id);
        self.totals.opened += 1;
        id
    }

    // ------------------------------------------------------------------ TCP side

    fn accept(&mut self, forward: Option<usize>) {
        loop {
            let listener = match forward {
                Some(i) => &self.forwards[i],
                None => self
                    .intercept
                    .as_ref()
                    .expect("registered only when present"),
            };
            let (sock, _) = match listener.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    eprintln!("tern node: accept: {e}");
                    return;
                }
            };
            let target = match forward {
                Some(i) => Some((self.config.forward[i].target, self.config.forward[i].peer)),
                None => sys::original_dst(sock.as_raw_fd()).ok().and_then(|dst| {
                    self.config
                        .accelerate
                        .iter()
                        .find(|a| a.subnet.contains(*dst.ip()))
                        .map(|a| (SocketAddr::V4(dst), a.peer))
                }),
            };
            let Some((SocketAddr::V4(target), peer)) = target else {
                self.totals.refused += 1;
                sys::set_linger_zero(sock.as_raw_fd());
                continue;
            };
            let _ = sock.set_nonblocking(true);
            sys::set_nodelay(sock.as_raw_fd());
            let stream = match self.ep.connection(peer).map(|c| c.open_stream()) {
                Some(Ok(s)) if self.flows.len() < MAX_FLOWS => s,
                _ => {
                    // No connection to the peer (yet): refuse like an unreachable host.
                    self.totals.refused += 1;
                    sys::set_linger_zero(sock.as_raw_fd());
                    continue;
                }
            };
            let mut header = Vec::new();
            OpenHeader::Tcp(target).encode(&mut header);
            if let Some(c) = self.ep.connection(peer) {
                let _ = c.stream_write(stream, &header);
            }
            let f = self.new_flow(
                Some(Sock::Tcp(sock)),
                FlowKind::Tcp,
                peer,
                stream,
                FlowState::Open,
            );
            self.pump_tcp(f);
        }
    }

    fn on_flow_ready(&mut self, f: u64, events: u32) {
        let Some(flow) = self.flows.get_mut(&f) else {
            return;
        };
        if flow.state == FlowState::Connecting && events & (sys::WRITE | sys::HUP) != 0 {
            let fd = flow.sock.as_ref().map(|s| s.fd()).unwrap_or(-1);
            match sys::take_error(fd) {
                Ok(()) => flow.state = FlowState::Open,
                Err(_) => {
                    self.totals.connect_failed += 1;
                    self.abort_flow(f, true);
                    return;
                }
            }
        }
        if events & (sys::READ | sys::HUP) != 0 {
            flow.sock_readable = true;
        }
        if flow.state == FlowState::Open {
            self.flush_out(f);
            self.pump_stream(f);
            self.pump_tcp(f);
        }
    }

    /// Returns true if a flow has more to read now (the loop must not sleep).
    fn pump_all_tcp(&mut self) -> bool {
        let ready: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, fl)| {
                fl.state == FlowState::Open
                    && (!fl.spill.is_empty() || (fl.sock_readable && !fl.read_eof))
            })
            .map(|(&k, _)| k)
            .collect();
        let mut more = false;
        for f in ready {
            more |= self.pump_tcp(f);
            let _ = self.flush_udp();
        }
        more
    }

    /// TCP socket -> stream, while the stream has room; returns true when it stopped at
    /// [`PUMP_BUDGET`] with more to read.
    fn pump_tcp(&mut self, f: u64) -> bool {
        let now = self.now();
        let mut budget = PUMP_BUDGET;
        loop {
            let Some(flow) = self.flows.get_mut(&f) else {
                return false;
            };
            if flow.state != FlowState::Open {
                return false;
            }
            let Some(conn) = self.ep.connection(flow.peer) else {
                return false;
            };
            if !flow.spill.is_empty() {
                self.totals.stream_bytes_out += write_spill(conn, flow.stream, &mut flow.spill);
                if !flow.spill.is_empty() {
                    return false;
                }
                if flow.read_eof {
                    let _ = conn.stream_finish(flow.stream);
                    self.maybe_finish(f);
                    return false;
                }
            }
            if !flow.sock_readable || flow.read_eof {
                return false;
            }
            if let Some(m) = flow.mig.as_deref()
                && let MigCodec::Source {
                    enc,
                    summary_deadline_ns,
                    ..
                } = m
                && enc.options().store
                && !enc.has_summary()
                && now < *summary_deadline_ns
            {
                return false; // QEMU waits (in its setup phase) until the store summary is in
            }
            // Back-pressure: the sender must see the WAN's drain rate, not a buffer's fill rate.
            // Relayed TCP reads at least half a chunk: records of a few KiB (the room one sent
            // packet frees) compress worse, zstd starts each with fresh entropy tables.
            let (buffer_min, buffer_max, min_read) = if flow.kind == FlowKind::Migration {
                (MIGRATION_BUFFER_MIN, MIGRATION_BUFFER_MAX, 2048)
            } else {
                (TCP_BUFFER_MIN, TCP_BUFFER_MAX, CHUNK / 2)
            };
            let st = conn.stats();
            let bdp = st.pacing_rate_bps / 8 * st.srtt_us.max(1000) / 1_000_000;
            let limit = (2 * bdp).clamp(buffer_min, buffer_max);
            if let Some(MigCodec::Source { enc, delivered, .. }) = flow.mig.as_deref()
                && enc.stats().input_bytes.saturating_sub(*delivered)
                    >= MIGRATION_QEMU_INFLIGHT.max(3 * limit)
            {
                // Deltas and store references shrink pages up to 240-fold: without this
                // bound QEMU could push the whole VM into the destination's receive
                // window, to be decoded and loaded after the switchover.
                return false;
            }
            let room = limit.saturating_sub(conn.stream_unsent(flow.stream));
            let cap = conn.stream_capacity(flow.stream).min(room as usize);
            if cap < min_read {
                return false; // resumes on Writable, or on the next loop once acks free room
            }
            let want = (cap - 64).min(CHUNK);
            let sock = flow.sock.as_mut().expect("open flows have sockets");
            match sock.read(&mut self.buf[..want]) {
                Ok(0) => {
                    flow.read_eof = true;
                    if let Some(MigCodec::Source { enc, .. }) = flow.mig.as_deref_mut() {
                        self.mig_buf.clear();
                        enc.finish(&mut self.mig_buf);
                        self.enc_buf.clear();
                        flow.enc.encode(&self.mig_buf, &mut self.enc_buf);
                        flow.spill.extend_from_slice(&self.enc_buf);
                        self.totals.stream_bytes_out +=
                            write_spill(conn, flow.stream, &mut flow.spill);
                        if !flow.spill.is_empty() {
                            return false; // finished once the spill is written
                        }
                    }
                    let _ = conn.stream_finish(flow.stream);
                    self.maybe_finish(f);
                    return false;
                }
                Ok(n) => {
                    self.totals.tcp_bytes_in += n as u64;
                    budget = budget.saturating_sub(n);
                    let data: &[u8] = match flow.mig.as_deref_mut() {
                        None => &self.buf[..n],
                        Some(MigCodec::Source { enc, .. }) => {
                            self.mig_buf.clear();
                            let mut none = tern_codec::store::NoStore;
                            let store = content_store(&mut self.store, &mut none);
                            enc.push(&self.buf[..n], &mut self.mig_buf, store);
                            &self.mig_buf
                        }
                        Some(MigCodec::Destination { .. }) => {
                            // QEMU's return path, framed for the source's reverse reader.
                            self.mig_buf.clear();
                            tern_codec::wire::put_reverse(
                                &mut self.mig_buf,
                                tern_codec::wire::REV_RETURN,
                                &self.buf[..n],
                            );
                            &self.mig_buf
                        }
                    };
                    self.enc_buf.clear();
                    let bw = conn.btl_bw_bps();
                    flow.enc
                        .set_compress_all(bw > 0 && bw < COMPRESS_ALL_BELOW_BPS);
                    flow.enc.encode(data, &mut self.enc_buf);
                    let w = conn.stream_write(flow.stream, &self.enc_buf).unwrap_or(0);
                    self.totals.stream_bytes_out += w as u64;
                    if w < self.enc_buf.len() {
                        flow.spill.extend_from_slice(&self.enc_buf[w..]);
                        return false;
                    }
                    if budget == 0 {
                        return true;
                    }
                    // Packets fall due while a chunk is read and encoded: send them before
                    // the next chunk, so reading never idles the link.
                    let _ = self.flush_udp();
                }
                Err(e) if would_block(&e) => {
                    flow.sock_readable = false;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // RST or error from the local side: abort the stream both ways.
                    self.totals.reset_local += 1;
                    self.abort_flow(f, true);
                    return false;
                }
            }
        }
    }

    /// Stream -> decoder -> output buffer -> TCP socket.
    fn pump_stream(&mut self, f: u64) {
        loop {
            let Some(flow) = self.flows.get_mut(&f) else {
                return;
            };
            if flow.out.len() - flow.out_pos > flow_out_limit(flow.kind) || flow.stream_fin {
                break;
            }
            let Some(conn) = self.ep.connection(flow.peer) else {
                return;
            };
            let (n, fin) = match conn.stream_read(flow.stream, &mut self.buf) {
                Ok(x) => x,
                Err(StreamError::Reset(..)) | Err(_) => return,
            };
            let mut data = &self.buf[..n];
            if flow.state == FlowState::AwaitHeader {
                // Accumulate until the header is complete (it may span reads).
                let before = flow.header.len();
                let take = (open::MAX_HEADER_LEN - before).min(data.len());
                flow.header.extend_from_slice(&data[..take]);
                let (header, used) = match OpenHeader::decode(&flow.header) {
                    Ok(Some(x)) => x,
                    Ok(None) if flow.header.len() < open::MAX_HEADER_LEN && !fin => {
                        if n == 0 {
                            break;
                        }
                        continue;
                    }
                    Ok(None) | Err(_) => {
                        self.totals.bad_header += 1;
                        let _ = conn.stream_reset(flow.stream, RESET_BAD_HEADER);
                        self.drop_flow(f);
                        return;
                    }
                };
                data = &data[used - before..];
                // The peer is authenticated, not trusted: only what its grants allow.
                let verdict = match self.config.peers.get(flow.peer) {
                    Some(p) => p.grants.check(&header).map(|_| ()),
                    None => Err(crate::grants::Refusal::UnixTarget(String::new())),
                };
                if let Err(r) = verdict {
                    self.totals.refused_by_policy += 1;
                    let name = self.config.peers.get(flow.peer).map_or("?", |p| &p.name);
                    eprintln!("tern node: refused a stream from peer {name}: {r}");
                    let _ = conn.stream_reset(flow.stream, RESET_REFUSED);
                    self.drop_flow(f);
                    return;
                }
                let opened = match header {
                    OpenHeader::Tcp(target) => sys::connect_nonblocking(SocketAddr::V4(target))
                        .map(|sock| {
                            flow.state = FlowState::Connecting;
                            Sock::Tcp(sock)
                        }),
                    OpenHeader::Unix { path: rel, codec } => match &self.config.migration {
                        Some(m) => {
                            let path = m.target_dir.join(&rel);
                            is_socket_file(&path)
                                .and_then(|()| UnixStream::connect(&path))
                                .and_then(|sock| {
                                    sock.set_nonblocking(true)?;
                                    flow.state = FlowState::Open;
                                    flow.kind = FlowKind::Migration;
                                    self.totals.migrations += 1;
                                    if let Some(opts) =
                                        tern_codec::Options::from_byte(codec).filter(|o| o.any())
                                    {
                                        let record =
                                            MigrationRecord::new("destination", &rel, opts);
                                        let mut pinned = false;
                                        if opts.store {
                                            // Tell the source what this site holds; keep it held.
                                            let summary = match &mut self.store {
                                                Some(s) => {
                                                    s.pin();
                                                    pinned = true;
                                                    tern_codec::ContentStore::summary(s)
                                                }
                                                None => tern_codec::Summary::default(),
                                            };
                                            let mut p = Vec::new();
                                            summary.encode(&mut p);
                                            let mut frame = Vec::new();
                                            tern_codec::wire::put_reverse(
                                                &mut frame,
                                                tern_codec::wire::REV_SUMMARY,
                                                &p,
                                            );
                                            flow.enc.encode(&frame, &mut flow.spill);
                                        }
                                        flow.mig = Some(Box::new(MigCodec::Destination {
                                            dec: tern_codec::Decoder::new(opts),
                                            pinned,
                                            delivered: 0,
                                            reported: 0,
                                            record,
                                        }));
                                    }
                                    Ok(Sock::Unix(sock))
                                })
                        }
                        None => Err(io::Error::other("no [migration] section")),
                    },
                    OpenHeader::Agent => {
                        // One end to the agent's queue, the other spliced to the stream.
                        let caller = crate::agent::Caller::Peer {
                            name: self.ep.peer_name(flow.peer).to_string(),
                            allow: self
                                .config
                                .peers
                                .get(flow.peer)
                                .map(|p| p.grants.agent())
                                .unwrap_or_default(),
                        };
                        UnixStream::pair().and_then(|(here, there)| {
                            here.set_nonblocking(true)?;
                            flow.state = FlowState::Open;
                            self.agent.submit(caller, there, Vec::new());
                            Ok(Sock::Unix(here))
                        })
                    }
                    OpenHeader::Overlay => {
                        let (peer, stream) = (flow.peer, flow.stream);
                        let rest = data.to_vec();
                        self.by_stream.remove(&(peer, stream));
                        self.flows.remove(&f);
                        self.adopt_overlay_inbound(peer, stream, &rest);
                        return;
                    }
                };
                let flow = self.flows.get_mut(&f).expect("present");
                match opened {
                    Ok(sock) => {
                        let _ = self.epoll.add(
                            sock.fd(),
                            TOKEN_FLOW + f,
                            sys::READ | sys::WRITE | sys::EDGE | sys::HUP,
                        );
                        flow.sock = Some(sock);
                    }
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                        self.totals.refused_by_policy += 1;
                        let name = self.config.peers.get(flow.peer).map_or("?", |p| &p.name);
                        eprintln!("tern node: refused a stream from peer {name}: {e}");
                        if let Some(c) = self.ep.connection(flow.peer) {
                            let _ = c.stream_reset(flow.stream, RESET_REFUSED);
                        }
                        self.drop_flow(f);
                        return;
                    }
                    Err(_) => {
                        self.totals.connect_failed += 1;
                        if let Some(c) = self.ep.connection(flow.peer) {
                            let _ = c.stream_reset(flow.stream, RESET_CONNECT_FAILED);
                        }
                        self.drop_flow(f);
                        return;
                    }
                }
            }
            let Some(flow) = self.flows.get_mut(&f) else {
                return;
            };
            let Some(conn) = self.ep.connection(flow.peer) else {
                return;
            };
            if !data.is_empty() {
                self.totals.stream_bytes_in += data.len() as u64;
                let before = flow.out.len();
                let records = match flow.mig.as_deref_mut() {
                    None => flow.dec.push(data, &mut flow.out),
                    Some(_) => {
                        self.mig_buf.clear();
                        flow.dec.push(data, &mut self.mig_buf)
                    }
                };
                if records.is_err() {
                    self.totals.bad_record += 1;
                    let _ = conn.stream_reset(flow.stream, RESET_BAD_RECORD);
                    self.abort_flow(f, false);
                    return;
                }
                let codec_err = match flow.mig.as_deref_mut() {
                    None => None,
                    Some(MigCodec::Destination { dec, record, .. }) => {
                        let mut none = tern_codec::store::NoStore;
                        let store = content_store(&mut self.store, &mut none);
                        dec.push(&self.mig_buf, &mut flow.out, store)
                            .err()
                            .map(|e| {
                                record.error = Some(e.to_string());
                                e.to_string()
                            })
                    }
                    Some(MigCodec::Source {
                        enc,
                        rev,
                        record,
                        delivered,
                        ..
                    }) => {
                        let out = &mut flow.out;
                        let mut bad_summary = false;
                        let r = rev.push(&self.mig_buf, |kind, payload| match kind {
                            tern_codec::wire::REV_RETURN => out.extend_from_slice(payload),
                            tern_codec::wire::REV_SUMMARY => {
                                match tern_codec::Summary::decode(payload) {
                                    Some(s) => enc.set_summary(s),
                                    None => bad_summary = true,
                                }
                            }
                            _ => match tern_codec::wire::get_varint(payload) {
                                Ok(Some((v, _))) => *delivered = (*delivered).max(v),
                                _ => bad_summary = true,
                            },
                        });
                        match (r, bad_summary) {
                            (Err(e), _) => Some(e.to_string()),
                            (_, true) => Some("malformed reverse frame".to_string()),
                            _ => None,
                        }
                        .inspect(|e| record.error = Some(e.clone()))
                    }
                };
                if let Some(e) = codec_err {
                    eprintln!("tern node: migration stream: {e}");
                    self.totals.bad_record += 1;
                    let _ = conn.stream_reset(flow.stream, RESET_BAD_RECORD);
                    self.abort_flow(f, false);
                    return;
                }
                self.totals.tcp_bytes_out += (flow.out.len() - before) as u64;
            }
            if fin {
                flow.stream_fin = true;
            }
            if n == 0 {
                break;
            }
        }
        self.flush_out(f);
    }

    fn flush_out(&mut self, f: u64) {
        let Some(flow) = self.flows.get_mut(&f) else {
            return;
        };
        if flow.state != FlowState::Open {
            return;
        }
        let sock = flow.sock.as_mut().expect("open flows have sockets");
        let start_pos = flow.out_pos;
        while flow.out_pos < flow.out.len() {
            match sock.write(&flow.out[flow.out_pos..]) {
                Ok(n) => flow.out_pos += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.totals.reset_local += 1;
                    self.abort_flow(f, true);
                    return;
                }
            }
        }
        if let Some(MigCodec::Destination {
            delivered,
            reported,
            ..
        }) = flow.mig.as_deref_mut()
        {
            *delivered += (flow.out_pos - start_pos) as u64;
            let drained = flow.out_pos == flow.out.len();
            if *delivered > *reported
                && (*delivered - *reported >= DELIVERED_REPORT || drained)
                && !flow.read_eof
            {
                let mut v = Vec::new();
                tern_codec::wire::put_varint(&mut v, *delivered);
                let mut frame = Vec::new();
                tern_codec::wire::put_reverse(&mut frame, tern_codec::wire::REV_DELIVERED, &v);
                flow.enc.encode(&frame, &mut flow.spill);
                *reported = *delivered;
                if let Some(conn) = self.ep.connection(flow.peer) {
                    self.totals.stream_bytes_out += write_spill(conn, flow.stream, &mut flow.spill);
                }
            }
        }
        if flow.out_pos == flow.out.len() {
            flow.out.clear();
            flow.out_pos = 0;
            if flow.stream_fin && !flow.shut_write {
                flow.shut_write = true;
                sock.shutdown_write();
            }
        } else if flow.out_pos > OUT_LIMIT {
            flow.out.drain(..flow.out_pos);
            flow.out_pos = 0;
        }
        let resume =
            flow.out.len() - flow.out_pos < flow_out_limit(flow.kind) / 2 && !flow.stream_fin;
        self.maybe_finish(f);
        if resume
            && let Some(flow) = self.flows.get(&f)
            && self
                .ep
                .connection_ref(flow.peer)
                .is_some_and(|c| c.stream_readable_bytes(flow.stream) > 0)
        {
            self.pump_stream(f);
        }
    }

    fn maybe_finish(&mut self, f: u64) {
        if let Some(flow) = self.flows.get(&f)
            && flow.read_eof
            && flow.shut_write
        {
            self.totals.completed += 1;
            self.drop_flow(f);
        }
    }

    /// Ends a flow abnormally: RST towards the local TCP peer; `reset_stream` also resets the
    /// stream towards the remote site.
    fn abort_flow(&mut self, f: u64, reset_stream: bool) {
        if let Some(flow) = self.flows.get(&f) {
            if let Some(s) = &flow.sock {
                s.abort_on_close();
            }
            if reset_stream {
                let (peer, stream) = (flow.peer, flow.stream);
                if let Some(c) = self.ep.connection(peer) {
                    let _ = c.stream_reset(stream, RESET_TCP_RST);
                }
            }
        }
        self.drop_flow(f);
    }

    fn drop_flow(&mut self, f: u64) {
        self.agent_relays.remove(&f);
        if let Some(flow) = self.flows.remove(&f) {
            if let Some(s) = &flow.sock {
                self.epoll.delete(s.fd());
            }
            self.by_stream.remove(&(flow.peer, flow.stream));
            let st = flow.enc.stats();
            self.totals.compress_in += st.input_bytes;
            self.totals.compress_out += st.output_bytes;
            if let Some(m) = flow.mig {
                let mut record = match *m {
                    MigCodec::Source {
                        enc, mut record, ..
                    } => {
                        record.stats = Some(enc.stats().clone());
                        record
                    }
                    MigCodec::Destination {
                        dec,
                        pinned,
                        mut record,
                        ..
                    } => {
                        if pinned && let Some(s) = &mut self.store {
                            tern_codec::ContentStore::unpin(s);
                        }
                        record.pages_decoded = dec.pages_out;
                        record.bytes_decoded = dec.output_bytes;
                        record
                    }
                };
                record.wire_bytes = st.output_bytes;
                record.complete = flow.read_eof && flow.shut_write;
                record.ended_unix_ms = sys::wall_ns() / 1_000_000;
                if self.mig_log.len() == MIGRATION_LOG {
                    self.mig_log.pop_front();
                }
                self.mig_log.push_back(record);
            }
        }
    }

    // ------------------------------------------------------------------ overlay (L2 switch)

    fn open_overlay_link(&mut self, peer: PeerId) {
        let Some(o) = &mut self.overlay else { return };
        let Some(conn) = self.ep.connection(peer) else {
            return;
        };
        if let Ok(id) = conn.open_stream() {
            let mut h = Vec::new();
            OpenHeader::Overlay.encode(&mut h);
            let _ = conn.stream_write(id, &h);
            o.remotes[peer].out = Some(id);
        }
    }

    fn is_overlay_inbound(&self, peer: PeerId, id: u64) -> bool {
        self.overlay
            .as_ref()
            .is_some_and(|o| o.remotes[peer].inbound == Some(id))
    }

    fn adopt_overlay_inbound(&mut self, peer: PeerId, stream: u64, rest: &[u8]) {
        let Some(o) = &mut self.overlay else {
            self.totals.bad_header += 1;
            if let Some(c) = self.ep.connection(peer) {
                let _ = c.stream_reset(stream, RESET_BAD_HEADER);
            }
            return;
        };
        let link = &mut o.remotes[peer];
        link.inbound = Some(stream);
        link.dec = FrameDecoder::default();
        link.dec.push(rest);
        self.pump_overlay_in(peer);
    }

    /// Frames arriving from a remote site.
    fn pump_overlay_in(&mut self, peer: PeerId) {
        loop {
            let Some(o) = &mut self.overlay else { return };
            let Some(id) = o.remotes[peer].inbound else {
                return;
            };
            let Some(conn) = self.ep.connection(peer) else {
                return;
            };
            let (n, _fin) = conn.stream_read(id, &mut self.buf).unwrap_or((0, true));
            o.remotes[peer].dec.push(&self.buf[..n]);
            loop {
                let o = self.overlay.as_mut().expect("checked");
                let link = &mut o.remotes[peer];
                match link.dec.next_frame() {
                    Ok(Some(fr)) => {
                        o.frame.clear();
                        o.frame.extend_from_slice(fr);
                        o.status.remote_frames_in += 1;
                        self.switch_frame(Port::Remote(peer), false);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        o.status.bad_frames += 1;
                        link.inbound = None;
                        if let Some(c) = self.ep.connection(peer) {
                            let _ = c.stream_reset(id, RESET_BAD_RECORD);
                        }
                        return;
                    }
                }
            }
            if n == 0 {
                return;
            }
        }
    }

    fn accept_ports(&mut self) {
        loop {
            let Some(o) = &mut self.overlay else { return };
            let sock = match o.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    eprintln!("tern node: overlay accept: {e}");
                    return;
                }
            };
            if o.ports.len() >= MAX_PORTS
                || !tern_os::unix::peer_allowed(&sock, None)
                || sock.set_nonblocking(true).is_err()
            {
                o.status.ports_refused += 1;
                continue;
            }
            let id = o.next_port;
            o.next_port += 1;
            let _ = self.epoll.add(
                sock.as_raw_fd(),
                TOKEN_PORT + id,
                sys::READ | sys::WRITE | sys::EDGE | sys::HUP,
            );
            o.ports.insert(
                id,
                VmPort {
                    sock,
                    dec: FrameDecoder::default(),
                    out: Vec::new(),
                    out_pos: 0,
                },
            );
            o.status.ports_attached += 1;
            self.on_port_ready(id);
        }
    }

    /// A VM NIC is readable or writable: flush queued frames, then switch what it sent.
    fn on_port_ready(&mut self, id: u64) {
        if !self.flush_port(id) {
            return;
        }
        loop {
            let Some(o) = &mut self.overlay else { return };
            let Some(p) = o.ports.get_mut(&id) else {
                return;
            };
            match p.sock.read(&mut self.buf) {
                Ok(0) => return self.close_port(id),
                Ok(n) => p.dec.push(&self.buf[..n]),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close_port(id),
            }
            loop {
                let o = self.overlay.as_mut().expect("checked");
                let Some(p) = o.ports.get_mut(&id) else {
                    return;
                };
                match p.dec.next_marked() {
                    Ok(Some((marked, fr))) => {
                        o.frame.clear();
                        o.frame.extend_from_slice(fr);
                        self.switch_frame(Port::Vm(id), marked);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        o.status.bad_frames += 1;
                        return self.close_port(id);
                    }
                }
            }
        }
    }

    /// Writes queued frames to a VM NIC; false if the port was closed.
    fn flush_port(&mut self, id: u64) -> bool {
        let Some(o) = &mut self.overlay else {
            return false;
        };
        let Some(p) = o.ports.get_mut(&id) else {
            return false;
        };
        while p.out_pos < p.out.len() {
            match p.sock.write(&p.out[p.out_pos..]) {
                Ok(n) => p.out_pos += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_port(id);
                    return false;
                }
            }
        }
        if p.out_pos == p.out.len() {
            p.out.clear();
            p.out_pos = 0;
        }
        true
    }

    fn close_port(&mut self, id: u64) {
        let Some(o) = &mut self.overlay else { return };
        if let Some(p) = o.ports.remove(&id) {
            self.epoll.delete(p.sock.as_raw_fd());
            o.sw.remove_port(Port::Vm(id));
            o.status.ports_detached += 1;
        }
    }

    fn read_tap(&mut self) {
        loop {
            let Some(o) = &mut self.overlay else { return };
            let Some(tap) = &mut o.tap else { return };
            o.frame.resize(switch::MAX_FRAME + 1, 0);
            match tap.read(&mut o.frame) {
                Ok(n) if n <= switch::MAX_FRAME => {
                    o.frame.truncate(n);
                    self.switch_frame(Port::Tap, false);
                }
                Ok(_) => o.status.bad_frames += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Switches the frame in `overlay.frame` that entered at `ingress` (`marked`: its
    /// length carried the switch's mark, see `switch.rs`).
    fn switch_frame(&mut self, ingress: Port, marked: bool) {
        let now_ns = self.now();
        let Some(o) = &mut self.overlay else { return };
        let forward = if marked {
            o.sw.handle_marked(ingress, &o.frame, now_ns)
        } else {
            o.sw.handle_frame(ingress, &o.frame, now_ns)
        };
        let trusted = o.sw.trusted_source(ingress, &o.frame);
        let targets: Vec<Port> = match forward {
            switch::Forward::One(p) => vec![p],
            switch::Forward::Drop => return,
            switch::Forward::Flood => {
                let mut t: Vec<Port> = o.ports.keys().map(|&id| Port::Vm(id)).collect();
                if o.tap.is_some() {
                    t.push(Port::Tap);
                }
                t.extend((0..o.remotes.len()).map(Port::Remote));
                t.retain(|&p| Switch::floods_to(ingress, p));
                t
            }
        };
        for port in targets {
            let o = self.overlay.as_mut().expect("checked");
            match port {
                Port::Vm(id) => {
                    let Some(p) = o.ports.get_mut(&id) else {
                        continue;
                    };
                    if p.out.len() - p.out_pos > PORT_OUT_LIMIT {
                        o.status.frames_dropped += 1;
                        continue;
                    }
                    let mark = trusted && o.sw.is_gated(port);
                    switch::encode_marked(&o.frame, mark, &mut p.out);
                    self.flush_port(id);
                }
                Port::Tap => {
                    if let Some(tap) = &mut o.tap
                        && tap.write(&o.frame).is_err()
                    {
                        o.status.frames_dropped += 1;
                    }
                }
                Port::Remote(peer) => {
                    let Some(id) = o.remotes[peer].out else {
                        continue;
                    };
                    let Some(conn) = self.ep.connection(peer) else {
                        continue;
                    };
                    if conn.stream_capacity(id) < o.frame.len() + 4 {
                        o.status.frames_dropped += 1;
                        continue;
                    }
                    // Capacity was checked for both: the length prefix and the frame.
                    let _ = conn.stream_write(id, &(o.frame.len() as u32).to_be_bytes());
                    let _ = conn.stream_write(id, &o.frame);
                    o.status.remote_frames_out += 1;
                }
            }
        }
    }

    // ------------------------------------------------------------------ migration relay

    /// A local request (`tern migrate`, format in `open.rs`), answered with one byte, 0 =
    /// stream open (then the socket is the migration stream), otherwise an error line follows
    /// and the socket closes. Requests are read without blocking the loop
    /// ([`Node::read_request`]); at most [`MAX_PENDING_REQUESTS`] wait at once.
    fn accept_migrations(&mut self) {
        loop {
            let Some(l) = &self.migrate else { return };
            let sock = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    eprintln!("tern node: migration accept: {e}");
                    return;
                }
            };
            if !tern_os::unix::peer_allowed(&sock, None) || sock.set_nonblocking(true).is_err() {
                self.totals.refused += 1;
                continue;
            }
            let now = self.now();
            self.expire_requests(now);
            if self.requests.len() >= MAX_PENDING_REQUESTS
                && let Some((&old, _)) = self.requests.iter().next()
            {
                self.totals.refused += 1;
                self.drop_request(old);
            }
            let id = self.next_request;
            self.next_request += 1;
            if self
                .epoll
                .add(sock.as_raw_fd(), TOKEN_REQUEST + id, sys::READ | sys::HUP)
                .is_err()
            {
                continue;
            }
            self.requests.insert(
                id,
                PendingRequest {
                    sock,
                    buf: Vec::new(),
                    deadline_ns: now + REQUEST_TIMEOUT_NS,
                },
            );
            self.read_request(id);
        }
    }

    fn drop_request(&mut self, id: u64) -> Option<PendingRequest> {
        let r = self.requests.remove(&id)?;
        self.epoll.delete(r.sock.as_raw_fd());
        Some(r)
    }

    fn expire_requests(&mut self, now: u64) {
        let late: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline_ns <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.totals.refused += 1;
            self.drop_request(id);
        }
    }

    /// Reads what a pending request's client sent; opens the stream once it is whole.
    fn read_request(&mut self, id: u64) {
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; 512];
        let decoded = loop {
            match r.sock.read(&mut chunk) {
                Ok(0) => break Err("the request ended early".to_string()),
                Ok(n) => {
                    r.buf.extend_from_slice(&chunk[..n]);
                    match open::decode_migration_request(&r.buf) {
                        Ok(Some((req, _))) => break Ok(req),
                        Ok(None) if r.buf.len() < open::MAX_MIGRATION_REQUEST => {}
                        Ok(None) => break Err("request too long".to_string()),
                        Err(e) => break Err(e),
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(PendingRequest { mut sock, .. }) = self.drop_request(id) else {
            return;
        };
        match decoded.and_then(|req| self.open_migration(req)) {
            Ok((peer, stream, mig)) => {
                let _ = sock.write_all(&[0]);
                self.totals.migrations += 1;
                let f = self.new_flow(
                    Some(Sock::Unix(sock)),
                    FlowKind::Migration,
                    peer,
                    stream,
                    FlowState::Open,
                );
                if let Some(flow) = self.flows.get_mut(&f) {
                    if let Some(MigCodec::Source { enc, .. }) = &mig
                        && enc.options().zstd
                    {
                        // Already one zstd stream: records would only add a probe.
                        flow.enc = RecordEncoder::new(Codec::Raw);
                    }
                    flow.mig = mig.map(Box::new);
                }
                self.pump_tcp(f);
            }
            Err(msg) => {
                self.totals.refused += 1;
                let _ = sock.write_all(format!("\x01{msg}\n").as_bytes());
            }
        }
    }

    fn open_migration(
        &mut self,
        req: open::MigrationRequest,
    ) -> Result<(PeerId, u64, Option<MigCodec>), String> {
        let open::MigrationRequest {
            peer: peer_name,
            path,
            codec,
        } = req;
        if crate::grants::unix_purpose(&path).is_none() {
            return Err(format!(
                "relay target {path:?} is neither a migration socket ({}) nor a replication \
                 socket ({})",
                crate::grants::MIGRATION_SOCKETS.join(", "),
                crate::grants::REPLICATION_SOCKETS.join(", ")
            ));
        }
        let peer = (0..self.ep.peer_count())
            .find(|&p| !self.ep.is_removed(p) && self.ep.peer_name(p) == peer_name)
            .ok_or_else(|| format!("no peer named {peer_name:?}"))?;
        if !self.ep.is_connected(peer) {
            return Err(format!("peer {peer_name:?} is not connected"));
        }
        let conn = self.ep.connection(peer).ok_or("peer is not connected")?;
        let stream = conn.open_stream().map_err(|e| e.to_string())?;
        let mut h = Vec::new();
        OpenHeader::Unix {
            path: path.clone(),
            codec,
        }
        .encode(&mut h);
        let _ = conn.stream_write(stream, &h);
        let mig = tern_codec::Options::from_byte(codec)
            .filter(|o| o.any())
            .map(|opts| MigCodec::Source {
                enc: tern_codec::Encoder::new(opts).with_zstd_level(
                    self.config
                        .migration
                        .as_ref()
                        .map_or(tern_codec::residual::DEFAULT_LEVEL, |m| m.zstd_level),
                ),
                rev: tern_codec::wire::ReverseReader::default(),
                summary_deadline_ns: self.now() + SUMMARY_WAIT_NS,
                delivered: 0,
                record: MigrationRecord::new("source", &path, opts),
            });
        Ok((peer, stream, mig))
    }

    /// Opens an agent stream to the named peer for each local request the agent queued and
    /// splices the client's socket to it; a failure is answered to the client.
    fn open_agent_relays(&mut self) {
        for r in self.agent.take_relays() {
            let crate::agent_worker::Relay {
                peer: peer_name,
                mut sock,
                frame,
            } = r;
            let peer = (0..self.ep.peer_count()).find(|&p| self.ep.peer_name(p) == peer_name);
            let stream = match peer {
                None => Err(format!("no peer named {peer_name:?}")),
                Some(_) if self.flows.len() >= MAX_FLOWS => Err("too many flows".to_string()),
                Some(p) if !self.ep.is_connected(p) => {
                    Err(format!("peer {peer_name:?} is not connected"))
                }
                Some(p) => self
                    .ep
                    .connection(p)
                    .ok_or_else(|| format!("peer {peer_name:?} is not connected"))
                    .and_then(|c| c.open_stream().map_err(|e| e.to_string())),
            };
            let (peer, stream) = match (peer, stream) {
                (Some(p), Ok(s)) => (p, s),
                (_, Err(e)) => {
                    self.totals.refused += 1;
                    let reply = crate::agent::Reply::Error(crate::agent::AgentError::new(
                        crate::agent::ErrorCode::Unavailable,
                        format!("cannot relay to site {peer_name:?}: {e}"),
                    ));
                    let _ = sock.write(&crate::agent::encode_reply(&reply));
                    continue;
                }
                (None, Ok(_)) => continue,
            };
            let mut h = Vec::new();
            OpenHeader::Agent.encode(&mut h);
            if let Some(c) = self.ep.connection(peer) {
                let _ = c.stream_write(stream, &h);
            }
            let f = self.new_flow(
                Some(Sock::Unix(sock)),
                FlowKind::Tcp,
                peer,
                stream,
                FlowState::Open,
            );
            if let Some(flow) = self.flows.get_mut(&f) {
                // The request the agent already read, ahead of anything the client sends.
                flow.enc.encode(&frame, &mut flow.spill);
                self.agent_relays.insert(f);
            }
            self.pump_tcp(f);
        }
    }

    /// A peer reset an agent relay's stream before its reply: tell the client why (the
    /// reply frame is small; its socket is non-blocking).
    fn answer_agent_reset(&mut self, f: u64, code: u64) {
        if !self.agent_relays.remove(&f) {
            return;
        }
        let Some(flow) = self.flows.get_mut(&f) else {
            return;
        };
        let peer = self.ep.peer_name(flow.peer).to_string();
        let (code, why) = match code {
            RESET_REFUSED => (
                crate::agent::ErrorCode::Refused,
                "it grants this site no agent commands",
            ),
            _ => (
                crate::agent::ErrorCode::Unavailable,
                "its node reset the agent stream",
            ),
        };
        let reply = crate::agent::Reply::Error(crate::agent::AgentError::new(
            code,
            format!("site {peer} refused the request: {why}"),
        ));
        if flow.out_pos == flow.out.len()
            && let Some(s) = flow.sock.as_mut()
        {
            let _ = s.write(&crate::agent::encode_reply(&reply));
        }
    }

    // ------------------------------------------------------------------ reload

    /// One line for `systemctl status`.
    fn summary(&self) -> String {
        let live = (0..self.ep.peer_count())
            .filter(|&p| !self.ep.is_removed(p))
            .count();
        format!(
            "listening on udp {}, {live} peer(s), {} reload(s)",
            self.config.listen, self.reloads.applied
        )
    }

    /// Re-reads the config file and applies its peer changes (`reload.rs`): sessions of
    /// unchanged peers stay, a removed or re-keyed peer's session ends (with its flows). On
    /// an invalid file or a change that needs a restart nothing changes. Returns the
    /// summary or the refusal, also logged and kept in the status.
    pub fn reload(&mut self) -> Result<String, String> {
        self.notify.reloading();
        let outcome = match crate::reload::load_and_plan(&self.config, &self.ep) {
            Ok(plan) => {
                crate::reload::apply(&plan, &mut self.ep);
                if let Some(o) = &mut self.overlay {
                    o.remotes
                        .resize_with(self.ep.peer_count(), RemoteLink::default);
                }
                let summary = plan.summary();
                self.config = plan.config;
                // Sessions that ended take their flows with them now.
                self.handle_events();
                Ok(summary)
            }
            Err(e) => Err(e.to_string()),
        };
        self.reloads.record(&self.config.name, &outcome);
        let summary = self.summary();
        self.notify.ready(&summary);
        outcome
    }

    // ------------------------------------------------------------------ status

    pub fn status(&self) -> NodeStatus {
        let mut totals = self.totals.clone();
        totals.active = self.flows.len() as u64;
        for fl in self.flows.values() {
            let st = fl.enc.stats();
            totals.compress_in += st.input_bytes;
            totals.compress_out += st.output_bytes;
        }
        NodeStatus {
            name: self.config.name.clone(),
            listen: self.config.listen.to_string(),
            uptime_s: (sys::mono_ns() - self.started_ns) as f64 / 1e9,
            peers: (0..self.ep.peer_count())
                .filter(|&p| !self.ep.is_removed(p))
                .map(|p| PeerStatus {
                    name: self.ep.peer_name(p).to_string(),
                    address: self.ep.peer_addr(p).map(|a| a.to_string()),
                    connected: self.ep.is_connected(p),
                    transport: self.ep.connection_ref(p).map(|c| c.stats()),
                })
                .collect(),
            endpoint: self.ep.stats().clone(),
            flows: totals,
            udp: crate::status::UdpStatus {
                gso: self.tx.gso(),
                gso_messages: self.tx.gso_messages,
                gso_datagrams: self.tx.gso_datagrams,
                gro_trains: self.rx.gro_trains,
                gro_datagrams: self.rx.gro_datagrams,
            },
            overlay: self.overlay.as_ref().map(|o| OverlayStatus {
                ports: o.ports.len(),
                switch: o.sw.stats(),
                ..o.status.clone()
            }),
            store_pages: self.store.as_ref().map(|s| s.len() as u64),
            migration_log: self.mig_log.iter().cloned().collect(),
            realtime: self.rt.active,
            realtime_switches: self.rt.switches,
            mgmt: self.mgmt.stats(),
            agent: self.agent.stats(),
            reload: self.reloads.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flows' zstd state is bounded by named counts, with defined behaviour at each bound.
    #[test]
    fn zstd_contexts_are_bounded_per_site_and_per_peer() {
        let zstd = Codec::Zstd { level: 1 };
        let n = |zstd_flows, large_windows, zstd_caps, large_caps| FlowCounts {
            zstd_flows,
            large_windows,
            zstd_caps,
            large_caps,
        };
        assert_eq!(
            flow_codecs(zstd, n(0, 0, 0, 0)),
            (zstd, ZSTD_WINDOW_LOG, Some(ZSTD_WINDOW_LOG))
        );
        // Past LARGE_WINDOW_FLOWS, the small window (ours and, at twice that, the peer's).
        let (_, w, d) = flow_codecs(zstd, n(20, LARGE_WINDOW_FLOWS, 20, 2 * LARGE_WINDOW_FLOWS));
        assert_eq!((w, d), (ZSTD_SMALL_WINDOW_LOG, Some(ZSTD_SMALL_WINDOW_LOG)));
        // At ZSTD_FLOWS encoders the next flow is lz4; below it, still zstd.
        assert_eq!(flow_codecs(zstd, n(ZSTD_FLOWS - 1, 16, 0, 0)).0, zstd);
        assert_eq!(flow_codecs(zstd, n(ZSTD_FLOWS, 16, 0, 0)).0, Codec::Lz4);
        // A peer holding 2 x ZSTD_FLOWS zstd decoders here gets no more: its next stream
        // accepts no zstd records at all.
        assert_eq!(
            flow_codecs(zstd, n(0, 0, 2 * ZSTD_FLOWS - 1, 40)).2,
            Some(ZSTD_SMALL_WINDOW_LOG)
        );
        assert_eq!(flow_codecs(zstd, n(0, 0, 2 * ZSTD_FLOWS, 40)).2, None);
        // Other codecs are left as configured.
        assert_eq!(
            flow_codecs(Codec::Raw, n(ZSTD_FLOWS, 0, 0, 0)).0,
            Codec::Raw
        );
    }

    #[test]
    fn only_a_node_that_mostly_sends_and_keeps_up_with_its_tcp_runs_realtime() {
        assert!(wants_realtime(RT_MIN_BYTES, 0, 0));
        assert!(wants_realtime(10 << 20, 1 << 20, 0));
        // Too little to matter, a receiver, a node behind on its TCP reads.
        assert!(!wants_realtime(RT_MIN_BYTES - 1, 0, 0));
        assert!(!wants_realtime(1 << 20, 10 << 20, 0));
        assert!(!wants_realtime(1 << 20, 1 << 20, 0));
        assert!(!wants_realtime(10 << 20, 0, 1));
    }
}
