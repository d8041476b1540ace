//! The node's event loop: one thread, epoll with nanosecond timeouts, batched UDP, and every
//! terminated TCP connection as a stream of the transport.
//!
//! ```text
//! client --TCP--> [REDIRECT] listener --accept--> open stream, write open header (zero-RTT)
//!   TCP bytes --RecordEncoder (compress)--> stream ==WAN== stream --RecordDecoder--> TCP to target
//!   FIN <-> stream finish, RST <-> stream reset, connect failure -> reset -> client RST
//! ```
//! Stream open header (first bytes of every stream, before the records):
//! `'T' | version 1 | kind 1 (TCP) | 4 | IPv4 address (4) | port (2)` = 10 bytes.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

use tern_transport::connection::Config;
use tern_transport::endpoint::{Endpoint, EndpointEvent, PeerConfig, PeerId};
use tern_transport::record::{Codec, RecordDecoder, RecordEncoder};
use tern_transport::{Event, StreamError};

use crate::config::{Compression, NodeConfig};
use crate::status::{FlowTotals, NodeStatus, PeerStatus};
use crate::sys::{self, Epoll, UdpBatch};
use crate::{NodeError, nft};

const TOKEN_UDP: u64 = 0;
const TOKEN_CONTROL: u64 = 1;
const TOKEN_METRICS: u64 = 2;
const TOKEN_INTERCEPT: u64 = 3;
const TOKEN_FORWARD: u64 = 16;
const TOKEN_FLOW: u64 = 1 << 32;
/// Bytes read from a TCP socket per record.
const CHUNK: usize = 64 * 1024;
/// Decoded bytes waiting for a slow TCP receiver before the stream stops being read.
const OUT_LIMIT: usize = 4 << 20;
/// Most concurrently terminated connections.
const MAX_FLOWS: usize = 4096;
const HEADER_LEN: usize = 10;
/// Stream reset codes.
pub const RESET_TCP_RST: u64 = 1;
pub const RESET_CONNECT_FAILED: u64 = 2;
pub const RESET_BAD_HEADER: u64 = 3;
pub const RESET_BAD_RECORD: u64 = 4;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Debug, PartialEq, Eq)]
enum FlowState {
    /// Accepting side: waiting for the open header from the stream.
    AwaitHeader,
    Connecting,
    Open,
}

#[derive(Debug)]
struct Flow {
    sock: Option<TcpStream>,
    peer: PeerId,
    stream: u64,
    state: FlowState,
    sock_readable: bool,
    read_eof: bool,
    enc: RecordEncoder,
    header: Vec<u8>,
    dec: RecordDecoder,
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
    control: UnixListener,
    metrics: Option<TcpListener>,
    intercept: Option<TcpListener>,
    forwards: Vec<TcpListener>,
    flows: HashMap<u64, Flow>,
    by_stream: BTreeMap<(PeerId, u64), u64>,
    next_flow: u64,
    totals: FlowTotals,
    codec: Codec,
    tx: UdpBatch,
    rx: UdpBatch,
    buf: Vec<u8>,
    enc_buf: Vec<u8>,
    udp_blocked: bool,
    clock_base: u64,
    started_ns: u64,
    nft_table: Option<String>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Node {
    pub fn new(config: NodeConfig) -> Result<Node, NodeError> {
        let io = |what: String| move |source| NodeError::Io { what, source };
        let udp =
            UdpSocket::bind(config.listen).map_err(io(format!("bind UDP {}", config.listen)))?;
        udp.set_nonblocking(true)
            .map_err(io("UDP non-blocking".into()))?;
        sys::set_buffers(&udp, 16 << 20);
        sys::set_dont_fragment(udp.as_raw_fd());
        if let Some(dir) = config.control.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        let _ = std::fs::remove_file(&config.control);
        let control = UnixListener::bind(&config.control).map_err(io(format!(
            "bind control socket {}",
            config.control.display()
        )))?;
        control
            .set_nonblocking(true)
            .map_err(io("control non-blocking".into()))?;
        let metrics = match config.metrics {
            Some(a) => {
                let l = TcpListener::bind(a).map_err(io(format!("bind metrics {a}")))?;
                l.set_nonblocking(true)
                    .map_err(io("metrics non-blocking".into()))?;
                Some(l)
            }
            None => None,
        };
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
            .add(control.as_raw_fd(), TOKEN_CONTROL, sys::READ)
            .map_err(io("epoll add".into()))?;
        if let Some(m) = &metrics {
            epoll
                .add(m.as_raw_fd(), TOKEN_METRICS, sys::READ)
                .map_err(io("epoll add".into()))?;
        }
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
        let nft_table = if config.accelerate.is_empty() {
            None
        } else {
            Some(nft::install(
                &config.name,
                &config.accelerate,
                config.intercept_port,
            )?)
        };
        let transport = Config {
            max_rate_bps: config.max_rate_bps,
            fec: config.fec,
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
            Compression::Zstd => Codec::Zstd { level: 1 },
        };
        Ok(Node {
            ep,
            epoll,
            udp,
            control,
            metrics,
            intercept,
            forwards,
            flows: HashMap::new(),
            by_stream: BTreeMap::new(),
            next_flow: 0,
            totals: FlowTotals::default(),
            codec,
            tx: UdpBatch::new(),
            rx: UdpBatch::new(),
            buf: vec![0; CHUNK],
            enc_buf: Vec::with_capacity(CHUNK + 64),
            udp_blocked: false,
            clock_base,
            started_ns: sys::mono_ns(),
            nft_table,
            config,
        })
    }

    fn now(&self) -> u64 {
        sys::mono_ns() - self.clock_base
    }

    /// Runs until SIGINT/SIGTERM.
    pub fn run(mut self) -> Result<(), NodeError> {
        // SAFETY: installing an async-signal-safe handler that only stores an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
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
        let mut ready = Vec::new();
        let result = loop {
            if STOP.load(Ordering::SeqCst) {
                break Ok(());
            }
            let now = self.now();
            self.ep.handle_timeout(now);
            self.handle_events();
            self.pump_all_tcp();
            self.handle_events();
            if let Err(e) = self.flush_udp() {
                eprintln!("tern node: UDP send: {e}");
            }
            let timeout = self.ep.poll_timeout().map(|t| t.saturating_sub(self.now()));
            let timeout = if self.tx.is_empty() || self.udp_blocked {
                timeout
            } else {
                Some(0)
            };
            // Timers overshoot by tens of microseconds: wake early and spin the rest.
            let wait = timeout.map(|t| if t < 60_000 { 0 } else { t - 50_000 });
            if let Err(e) = self.epoll.wait(wait, &mut ready) {
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
        self.shutdown();
        result
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
            TOKEN_CONTROL => self.serve_control(),
            TOKEN_METRICS => self.serve_metrics(),
            TOKEN_INTERCEPT => self.accept(None),
            t if (TOKEN_FORWARD..TOKEN_FLOW).contains(&t) => {
                self.accept(Some((t - TOKEN_FORWARD) as usize))
            }
            t => self.on_flow_ready(t - TOKEN_FLOW, events),
        }
    }

    fn recv_udp(&mut self) {
        loop {
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
            if n < sys::BATCH {
                break;
            }
            // Let the transport answer (ACKs) between large batches.
            self.handle_events();
            let _ = self.flush_udp();
        }
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
                let f = self.new_flow(None, peer, id, FlowState::AwaitHeader);
                self.pump_stream(f);
            }
            Event::Readable(id) => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.pump_stream(f);
                }
            }
            Event::Writable(id) => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.pump_tcp(f);
                }
            }
            Event::StreamReset { id, .. } => {
                if let Some(&f) = self.by_stream.get(&(peer, id)) {
                    self.totals.reset_by_peer += 1;
                    self.abort_flow(f, false);
                }
            }
            Event::Closed { .. } => {}
        }
    }

    fn new_flow(
        &mut self,
        sock: Option<TcpStream>,
        peer: PeerId,
        stream: u64,
        state: FlowState,
    ) -> u64 {
        let id = self.next_flow;
        self.next_flow += 1;
        if let Some(s) = &sock {
            let _ = self.epoll.add(
                s.as_raw_fd(),
                TOKEN_FLOW + id,
                sys::READ | sys::WRITE | sys::EDGE | sys::HUP,
            );
        }
        self.flows.insert(
            id,
            Flow {
                sock,
                peer,
                stream,
                state,
                sock_readable: true,
                read_eof: false,
                enc: RecordEncoder::new(self.codec),
                header: Vec::new(),
                dec: RecordDecoder::new(),
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
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(&[b'T', 1, 1, 4]);
            header.extend_from_slice(&target.ip().octets());
            header.extend_from_slice(&target.port().to_be_bytes());
            if let Some(c) = self.ep.connection(peer) {
                let _ = c.stream_write(stream, &header);
            }
            let f = self.new_flow(Some(sock), peer, stream, FlowState::Open);
            self.pump_tcp(f);
        }
    }

    fn on_flow_ready(&mut self, f: u64, events: u32) {
        let Some(flow) = self.flows.get_mut(&f) else {
            return;
        };
        if flow.state == FlowState::Connecting && events & (sys::WRITE | sys::HUP) != 0 {
            let fd = flow.sock.as_ref().map(|s| s.as_raw_fd()).unwrap_or(-1);
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

    fn pump_all_tcp(&mut self) {
        let ready: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, fl)| fl.sock_readable && !fl.read_eof && fl.state == FlowState::Open)
            .map(|(&k, _)| k)
            .collect();
        for f in ready {
            self.pump_tcp(f);
        }
    }

    /// TCP socket -> stream, while the stream has room.
    fn pump_tcp(&mut self, f: u64) {
        loop {
            let Some(flow) = self.flows.get_mut(&f) else {
                return;
            };
            if !flow.sock_readable || flow.read_eof || flow.state != FlowState::Open {
                return;
            }
            let Some(conn) = self.ep.connection(flow.peer) else {
                return;
            };
            let cap = conn.stream_capacity(flow.stream);
            if cap < 2048 {
                return; // resumes on Writable
            }
            let want = (cap - 64).min(CHUNK);
            let sock = flow.sock.as_mut().expect("open flows have sockets");
            match sock.read(&mut self.buf[..want]) {
                Ok(0) => {
                    flow.read_eof = true;
                    let _ = conn.stream_finish(flow.stream);
                    self.maybe_finish(f);
                    return;
                }
                Ok(n) => {
                    self.totals.tcp_bytes_in += n as u64;
                    self.enc_buf.clear();
                    flow.enc.encode(&self.buf[..n], &mut self.enc_buf);
                    let w = conn.stream_write(flow.stream, &self.enc_buf).unwrap_or(0);
                    debug_assert_eq!(w, self.enc_buf.len());
                    self.totals.stream_bytes_out += w as u64;
                }
                Err(e) if would_block(&e) => {
                    flow.sock_readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // RST or error from the local side: abort the stream both ways.
                    self.totals.reset_local += 1;
                    self.abort_flow(f, true);
                    return;
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
            if flow.out.len() - flow.out_pos > OUT_LIMIT || flow.stream_fin {
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
                let need = HEADER_LEN - flow.header.len();
                let take = need.min(data.len());
                flow.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if flow.header.len() == HEADER_LEN {
                    let h = &flow.header;
                    if h[0] != b'T' || h[1] != 1 || h[2] != 1 || h[3] != 4 {
                        self.totals.bad_header += 1;
                        let _ = conn.stream_reset(flow.stream, RESET_BAD_HEADER);
                        self.drop_flow(f);
                        return;
                    }
                    let ip = Ipv4Addr::new(h[4], h[5], h[6], h[7]);
                    let port = u16::from_be_bytes([h[8], h[9]]);
                    let target = SocketAddr::V4(SocketAddrV4::new(ip, port));
                    match sys::connect_nonblocking(target) {
                        Ok(sock) => {
                            flow.state = FlowState::Connecting;
                            let _ = self.epoll.add(
                                sock.as_raw_fd(),
                                TOKEN_FLOW + f,
                                sys::READ | sys::WRITE | sys::EDGE | sys::HUP,
                            );
                            flow.sock = Some(sock);
                        }
                        Err(_) => {
                            self.totals.connect_failed += 1;
                            let _ = conn.stream_reset(flow.stream, RESET_CONNECT_FAILED);
                            self.drop_flow(f);
                            return;
                        }
                    }
                }
            }
            if !data.is_empty() {
                self.totals.stream_bytes_in += data.len() as u64;
                let before = flow.out.len();
                if flow.dec.push(data, &mut flow.out).is_err() {
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
        if flow.out_pos == flow.out.len() {
            flow.out.clear();
            flow.out_pos = 0;
            if flow.stream_fin && !flow.shut_write {
                flow.shut_write = true;
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
        } else if flow.out_pos > OUT_LIMIT {
            flow.out.drain(..flow.out_pos);
            flow.out_pos = 0;
        }
        let resume = flow.out.len() - flow.out_pos < OUT_LIMIT / 2 && !flow.stream_fin;
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
                sys::set_linger_zero(s.as_raw_fd());
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
        if let Some(flow) = self.flows.remove(&f) {
            if let Some(s) = &flow.sock {
                self.epoll.delete(s.as_raw_fd());
            }
            self.by_stream.remove(&(flow.peer, flow.stream));
            let st = flow.enc.stats();
            self.totals.compress_in += st.input_bytes;
            self.totals.compress_out += st.output_bytes;
        }
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
                .map(|p| PeerStatus {
                    name: self.ep.peer_name(p).to_string(),
                    address: self.ep.peer_addr(p).map(|a| a.to_string()),
                    connected: self.ep.is_connected(p),
                    transport: self.ep.connection_ref(p).map(|c| c.stats()),
                })
                .collect(),
            endpoint: self.ep.stats().clone(),
            flows: totals,
        }
    }

    fn serve_control(&mut self) {
        while let Ok((mut s, _)) = self.control.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
            let mut req = [0u8; 64];
            let n = s.read(&mut req).unwrap_or(0);
            let req = String::from_utf8_lossy(&req[..n]);
            let reply = if req.trim() == "status" {
                serde_json::to_string(&self.status()).unwrap_or_default()
            } else {
                "{\"error\":\"unknown request; send \\\"status\\\"\"}".to_string()
            };
            let _ = s.write_all(reply.as_bytes());
            let _ = s.write_all(b"\n");
        }
    }

    fn serve_metrics(&mut self) {
        let Some(l) = &self.metrics else { return };
        while let Ok((mut s, _)) = l.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let body = crate::status::prometheus(&self.status());
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                body
            );
        }
    }
}
