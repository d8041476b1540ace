//! A node's endpoint: its static identity, its pinned peers, the Noise IK handshake and the
//! demultiplexing of datagrams to connections.
//!
//! ```text
//!  initiator                                   responder
//!  Idle --connect--> InitSent --[0x01 init]-->  (peer key pinned? timestamp newer?)
//!                    (retry every 1 s)          Established (unconfirmed until 1st data)
//!  Established <--[0x02 response]--------------
//!  --[data: PING]-->                            confirmed
//! ```
//! Simultaneous initiation: the side with the smaller static public key keeps its own
//! initiation and ignores the other's. A newer valid initiation from a peer with an established
//! connection replaces it (the peer restarted). Anything that fails parsing or authentication is
//! dropped and counted; nothing a remote sends can make this code panic.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use crate::connection::{Config, Connection, Event};
use crate::crypto::{self, InitiatorHandshake, StaticKeypair};
use crate::wire::{self, PROTOCOL_VERSION, Reader, TYPE_INIT, TYPE_RESPONSE};

/// Handshake initiations processed per second at most (each costs Diffie-Hellman work).
pub const MAX_INITS_PER_SECOND: u32 = 50;
const HANDSHAKE_RETRY_NS: u64 = 1_000_000_000;
/// How long a responder keeps a session whose initiator has not sent a packet under its keys
/// yet (the initiator sends its first packet at once and retransmits it on loss).
pub const NEXT_SESSION_TIMEOUT_NS: u64 = 10_000_000_000;

pub type PeerId = usize;

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub public: [u8; 32],
    /// Where to send initiations; None = wait for the peer to connect.
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointEvent {
    Connected(PeerId),
    Disconnected { peer: PeerId, code: u64 },
    Stream { peer: PeerId, event: Event },
}

/// Drop and handshake counters (serialized as-is in `tern node status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointStats {
    pub datagrams_received: u64,
    pub dropped_malformed: u64,
    /// Data from an address with no session, or a handshake response that matches no
    /// pending initiation.
    pub dropped_unknown_session: u64,
    pub handshakes_rejected: u64,
    pub handshakes_unknown_key: u64,
    pub handshakes_replayed: u64,
    pub handshakes_rate_limited: u64,
    /// Handshakes whose keys this side holds (as initiator: response accepted; as responder:
    /// response sent, session still unconfirmed).
    pub handshakes_completed: u64,
    /// Responder sessions confirmed by a packet under their keys (each replaces the current).
    pub sessions_confirmed: u64,
    /// Responder sessions dropped because no packet under their keys came in time (replays).
    pub sessions_expired_unconfirmed: u64,
}

#[derive(Debug)]
struct Pending {
    hs: InitiatorHandshake,
    local_index: u16,
}

/// A session a valid initiation created, not yet confirmed: it becomes the peer's connection
/// only when a data packet from `addr` authenticates under its keys, which a replayed
/// initiation cannot produce (its sender lacks the initiator's ephemeral secret).
#[derive(Debug)]
struct NextSession {
    conn: Connection,
    addr: SocketAddr,
    /// Dropped unconfirmed at this time ([`NEXT_SESSION_TIMEOUT_NS`] after the initiation).
    expires_ns: u64,
}

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    addr: Option<SocketAddr>,
    conn: Option<Connection>,
    /// At most one unconfirmed responder session; a newer valid initiation replaces it.
    next: Option<NextSession>,
    pending: Option<Pending>,
    next_attempt_ns: u64,
    last_init_timestamp: u64,
}

#[derive(Debug)]
pub struct Endpoint {
    identity: StaticKeypair,
    config: Config,
    peers: Vec<Peer>,
    by_index: BTreeMap<u16, PeerId>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<EndpointEvent>,
    stats: EndpointStats,
    rng: u64,
    deterministic: bool,
    epoch_ns: u64,
    init_tokens: u32,
    init_refill_ns: u64,
    next_peer: usize,
}

impl Endpoint {
    /// `seed`: drives session indexes, and when `deterministic` also the handshake's ephemeral
    /// keys (simulation only). `epoch_ns`: wall-clock time at `now_ns == 0`, so initiation
    /// timestamps keep increasing across restarts.
    pub fn new(
        identity: StaticKeypair,
        peers: Vec<PeerConfig>,
        config: Config,
        seed: u64,
        deterministic: bool,
        epoch_ns: u64,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|c| Peer {
                addr: c.addr,
                config: c,
                conn: None,
                next: None,
                pending: None,
                next_attempt_ns: 0,
                last_init_timestamp: 0,
            })
            .collect();
        Self {
            identity,
            config,
            peers,
            by_index: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
            rng: seed ^ 0x5851_f42d_4c95_7f2d,
            deterministic,
            epoch_ns,
            init_tokens: MAX_INITS_PER_SECOND,
            init_refill_ns: 0,
            next_peer: 0,
        }
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn new_index(&mut self) -> u16 {
        loop {
            let i = self.next_rand() as u16;
            if i != 0 && !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn peer_name(&self, peer: PeerId) -> &str {
        &self.peers[peer].config.name
    }

    pub fn peer_addr(&self, peer: PeerId) -> Option<SocketAddr> {
        self.peers[peer].addr
    }

    pub fn connection(&mut self, peer: PeerId) -> Option<&mut Connection> {
        self.peers.get_mut(peer)?.conn.as_mut()
    }

    pub fn connection_ref(&self, peer: PeerId) -> Option<&Connection> {
        self.peers.get(peer)?.conn.as_ref()
    }

    pub fn is_connected(&self, peer: PeerId) -> bool {
        self.peers[peer]
            .conn
            .as_ref()
            .is_some_and(|c| !c.is_closed())
    }

    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        for (id, p) in self.peers.iter_mut().enumerate() {
            if let Some(c) = p.conn.as_mut()
                && let Some(event) = c.poll_event()
            {
                if let Event::Closed { code } = event {
                    p.conn = None;
                    p.next_attempt_ns = 0;
                    return Some(EndpointEvent::Disconnected { peer: id, code });
                }
                return Some(EndpointEvent::Stream { peer: id, event });
            }
        }
        None
    }

    fn timestamp(&self, now_ns: u64) -> u64 {
        self.epoch_ns.wrapping_add(now_ns)
    }

    fn start_handshake(&mut self, now_ns: u64, peer: PeerId) {
        let Some(addr) = self.peers[peer].addr else {
            return;
        };
        if let Some(old) = self.peers[peer].pending.take() {
            self.by_index.remove(&old.local_index);
        }
        let local_index = self.new_index();
        let mut payload = vec![PROTOCOL_VERSION];
        payload.extend_from_slice(&self.timestamp(now_ns).to_be_bytes());
        let seed = self.deterministic.then(|| self.next_rand());
        let public = self.peers[peer].config.public;
        let Ok((hs, msg)) = InitiatorHandshake::start(&self.identity, &public, &payload, seed)
        else {
            return;
        };
        let mut pkt = vec![TYPE_INIT];
        pkt.extend_from_slice(&local_index.to_be_bytes());
        pkt.extend_from_slice(&msg);
        self.transmits.push_back((addr, pkt));
        self.by_index.insert(local_index, peer);
        let p = &mut self.peers[peer];
        p.pending = Some(Pending { hs, local_index });
        p.next_attempt_ns = now_ns + HANDSHAKE_RETRY_NS;
    }

    /// A datagram from `from`.
    pub fn handle_datagram(&mut self, now_ns: u64, from: SocketAddr, data: &[u8]) {
        self.stats.datagrams_received += 1;
        let Some(&kind) = data.first() else {
            self.stats.dropped_malformed += 1;
            return;
        };
        match kind {
            t if wire::is_data_type(t) => self.on_data(now_ns, from, data),
            TYPE_INIT => self.on_init(now_ns, from, data),
            TYPE_RESPONSE => self.on_response(now_ns, from, data),
            _ => self.stats.dropped_malformed += 1,
        }
    }

    /// A data packet: its session is the connection of the peer at `from`.
    fn on_data(&mut self, now_ns: u64, from: SocketAddr, data: &[u8]) {
        let Some((pn, header_len)) = wire::parse_data_header(data) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let ct = &data[header_len..];
        if ct.len() < crypto::PacketKeys::TAG_LEN {
            self.stats.dropped_malformed += 1;
            return;
        }
        let mut reached = false;
        for peer in 0..self.peers.len() {
            let p = &mut self.peers[peer];
            if p.addr == Some(from)
                && let Some(c) = p.conn.as_mut()
            {
                reached = true;
                if c.handle_packet(now_ns, pn, header_len, ct) {
                    return;
                }
            }
            if let Some(next) = p.next.as_mut()
                && next.addr == from
            {
                reached = true;
                if next.conn.handle_packet(now_ns, pn, header_len, ct) {
                    self.promote(peer);
                    return;
                }
            }
        }
        if !reached {
            self.stats.dropped_unknown_session += 1;
        }
    }

    /// The initiator of `peer`'s next session proved it holds the session keys: that session
    /// replaces the current one, and the peer's address becomes the one it came from.
    fn promote(&mut self, peer: PeerId) {
        let Some(next) = self.peers[peer].next.take() else {
            return;
        };
        if let Some(old) = self.peers[peer].pending.take() {
            self.by_index.remove(&old.local_index);
        }
        self.drop_connection(peer);
        let p = &mut self.peers[peer];
        p.addr = Some(next.addr);
        p.conn = Some(next.conn);
        self.stats.sessions_confirmed += 1;
        self.events.push_back(EndpointEvent::Connected(peer));
    }

    fn take_init_token(&mut self, now_ns: u64) -> bool {
        if now_ns >= self.init_refill_ns + 1_000_000_000 {
            self.init_tokens = MAX_INITS_PER_SECOND;
            self.init_refill_ns = now_ns;
        }
        if self.init_tokens == 0 {
            return false;
        }
        self.init_tokens -= 1;
        true
    }

    fn on_init(&mut self, now_ns: u64, from: SocketAddr, data: &[u8]) {
        if data.len() < 3 {
            self.stats.dropped_malformed += 1;
            return;
        }
        if !self.take_init_token(now_ns) {
            self.stats.handshakes_rate_limited += 1;
            return;
        }
        let remote_index = u16::from_be_bytes([data[1], data[2]]);
        let seed = self.deterministic.then(|| self.next_rand());
        let Ok(accepted) = crypto::accept_initiation(&self.identity, &data[3..], seed) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let Some(peer) = self
            .peers
            .iter()
            .position(|p| p.config.public == accepted.remote_public)
        else {
            self.stats.handshakes_unknown_key += 1;
            return;
        };
        let payload = &accepted.payload;
        if payload.len() != 9 || payload[0] != PROTOCOL_VERSION {
            self.stats.handshakes_rejected += 1;
            return;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&payload[1..9]);
        let ts = u64::from_be_bytes(ts);
        if ts <= self.peers[peer].last_init_timestamp {
            self.stats.handshakes_replayed += 1;
            return;
        }
        // Every authenticated initiation moves the freshness mark, also one this side ignores
        // below, so none can be replayed later.
        self.peers[peer].last_init_timestamp = ts;
        // Simultaneous open: the smaller key's own initiation wins.
        if self.peers[peer].pending.is_some() && self.identity.public < accepted.remote_public {
            return;
        }
        let Ok((msg2, keys)) = accepted.respond(&[PROTOCOL_VERSION]) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let mut pkt = vec![TYPE_RESPONSE];
        pkt.extend_from_slice(&remote_index.to_be_bytes());
        pkt.extend_from_slice(&msg2);
        self.transmits.push_back((from, pkt));
        // The current session, the peer's address and our own pending initiation stay as they
        // are until the initiator proves the new keys (a replayed init cannot).
        let conn = Connection::new(self.config.clone(), keys, false, now_ns);
        self.peers[peer].next = Some(NextSession {
            conn,
            addr: from,
            expires_ns: now_ns + NEXT_SESSION_TIMEOUT_NS,
        });
        self.stats.handshakes_completed += 1;
    }

    /// A finished handshake: the peer's new connection, which data packets from `from` reach.
    fn install(
        &mut self,
        now_ns: u64,
        peer: PeerId,
        from: SocketAddr,
        keys: crypto::PacketKeys,
        is_initiator: bool,
    ) {
        let conn = Connection::new(self.config.clone(), keys, is_initiator, now_ns);
        let p = &mut self.peers[peer];
        p.addr = Some(from);
        p.conn = Some(conn);
        self.stats.handshakes_completed += 1;
        self.events.push_back(EndpointEvent::Connected(peer));
    }

    fn drop_connection(&mut self, peer: PeerId) {
        if self.peers[peer].conn.take().is_some() {
            self.events.push_back(EndpointEvent::Disconnected {
                peer,
                code: crate::connection::CLOSE_NORMAL,
            });
        }
    }

    fn on_response(&mut self, now_ns: u64, from: SocketAddr, data: &[u8]) {
        let mut r = Reader::new(data);
        let (Ok(_), Ok(index)) = (r.u8(), r.u16()) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let Some(&peer) = self.by_index.get(&index) else {
            self.stats.dropped_unknown_session += 1;
            return;
        };
        let p = &mut self.peers[peer];
        if p.pending.as_ref().map(|x| x.local_index) != Some(index) {
            self.stats.dropped_unknown_session += 1;
            return;
        }
        let pending = p.pending.take().expect("checked");
        self.by_index.remove(&index);
        let Ok((payload, keys)) = pending.hs.finish(r.rest()) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        if payload.first() != Some(&PROTOCOL_VERSION) {
            self.stats.handshakes_rejected += 1;
            return;
        }
        self.drop_connection(peer);
        self.install(now_ns, peer, from, keys, true);
    }

    pub fn handle_timeout(&mut self, now_ns: u64) {
        for p in &mut self.peers {
            if p.next.as_ref().is_some_and(|n| now_ns >= n.expires_ns) {
                p.next = None;
                self.stats.sessions_expired_unconfirmed += 1;
            }
        }
        for peer in 0..self.peers.len() {
            if let Some(c) = self.peers[peer].conn.as_mut() {
                c.handle_timeout(now_ns);
            } else if self.peers[peer].addr.is_some() && now_ns >= self.peers[peer].next_attempt_ns
            {
                self.start_handshake(now_ns, peer);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut min = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        if !self.transmits.is_empty() {
            min(0);
        }
        for p in &self.peers {
            if let Some(n) = &p.next {
                min(n.expires_ns);
            }
            match &p.conn {
                Some(c) => {
                    if let Some(x) = c.poll_timeout() {
                        min(x);
                    }
                }
                None if p.addr.is_some() => min(p.next_attempt_ns),
                None => {}
            }
        }
        t
    }

    /// Appends one datagram to `out` and returns its destination, or None.
    pub fn poll_transmit(&mut self, now_ns: u64, out: &mut Vec<u8>) -> Option<SocketAddr> {
        if let Some((addr, pkt)) = self.transmits.pop_front() {
            out.extend_from_slice(&pkt);
            return Some(addr);
        }
        let n = self.peers.len();
        for i in 0..n {
            let peer = (self.next_peer + i) % n;
            let p = &mut self.peers[peer];
            if let (Some(c), Some(addr)) = (p.conn.as_mut(), p.addr)
                && c.poll_transmit(now_ns, out)
            {
                self.next_peer = (peer + 1) % n;
                return Some(addr);
            }
        }
        None
    }
}

/// Parses just enough of a datagram to say what it is, for counters and tracing.
pub fn datagram_kind(data: &[u8]) -> &'static str {
    match data.first() {
        Some(&TYPE_INIT) => "init",
        Some(&TYPE_RESPONSE) => "response",
        Some(&t) if wire::is_data_type(t) => "data",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Endpoint, Endpoint, SocketAddr, SocketAddr) {
        let ka = StaticKeypair::from_seed(11);
        let kb = StaticKeypair::from_seed(12);
        let addr_a: SocketAddr = "198.18.1.1:7400".parse().unwrap();
        let addr_b: SocketAddr = "198.18.2.1:7400".parse().unwrap();
        let peer = |name: &str, public, addr| PeerConfig {
            name: name.into(),
            public,
            addr,
        };
        let a = Endpoint::new(
            ka.clone(),
            vec![peer("b", kb.public, Some(addr_b))],
            Config::default(),
            1,
            true,
            1 << 40,
        );
        let b = Endpoint::new(
            kb,
            vec![peer("a", ka.public, None)],
            Config::default(),
            2,
            true,
            1 << 40,
        );
        (a, b, addr_a, addr_b)
    }

    /// Moves every datagram `from` has queued to `to`, arriving from `src`; returns them.
    fn deliver(from: &mut Endpoint, to: &mut Endpoint, src: SocketAddr, now: u64) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        let mut out = Vec::new();
        while from.poll_transmit(now, &mut out).is_some() {
            to.handle_datagram(now, src, &out);
            sent.push(std::mem::take(&mut out));
        }
        sent
    }

    #[test]
    fn data_reaches_the_session_of_its_source_address_only() {
        let (mut a, mut b, addr_a, _) = pair();
        a.handle_timeout(0);
        deliver(&mut a, &mut b, addr_a, 0); // init
        deliver(&mut b, &mut a, "198.18.2.1:7400".parse().unwrap(), 1); // response
        assert!(a.is_connected(0) && !b.is_connected(0));
        deliver(&mut a, &mut b, addr_a, 1); // PING: confirms b's session
        assert!(b.is_connected(0));
        let base = b.connection_ref(0).unwrap().stats().packets_received;
        let id = a.connection(0).unwrap().open_stream().unwrap();
        a.connection(0).unwrap().stream_write(id, b"hello").unwrap();
        // The same data packets from any other address reach no session.
        let stranger: SocketAddr = "198.18.1.9:7400".parse().unwrap();
        let packets = deliver(&mut a, &mut b, stranger, 2);
        assert!(!packets.is_empty());
        assert!(packets.iter().all(|p| wire::is_data_type(p[0])));
        assert_eq!(b.stats().dropped_unknown_session, packets.len() as u64);
        assert_eq!(b.connection_ref(0).unwrap().stats().packets_received, base);
        // From the peer's address they are authenticated and delivered.
        for p in &packets {
            b.handle_datagram(3, addr_a, p);
        }
        let received = b.connection_ref(0).unwrap().stats().packets_received;
        assert_eq!(received, base + packets.len() as u64);
        // A flipped packet-number bit in the header fails authentication.
        let mut bad = packets[0].clone();
        bad[0] ^= 0x10;
        b.handle_datagram(4, addr_a, &bad);
        assert_eq!(b.connection_ref(0).unwrap().stats().auth_failures, 1);
        assert_eq!(
            b.connection_ref(0).unwrap().stats().packets_received,
            received
        );
    }

    /// Sends `msg` on a new stream of `from`'s connection and checks `to` reads it.
    fn stream_round_trip(
        from: &mut Endpoint,
        to: &mut Endpoint,
        from_addr: SocketAddr,
        now: u64,
        msg: &[u8],
    ) {
        let c = from.connection(0).expect("connected");
        let id = c.open_stream().unwrap();
        c.stream_write(id, msg).unwrap();
        c.stream_finish(id).unwrap();
        assert!(!deliver(from, to, from_addr, now).is_empty());
        let mut buf = vec![0u8; 4096];
        let (n, fin) = to
            .connection(0)
            .expect("connected")
            .stream_read(id, &mut buf)
            .unwrap();
        assert_eq!((&buf[..n], fin), (msg, true));
    }

    fn drain_events(ep: &mut Endpoint) -> Vec<EndpointEvent> {
        std::iter::from_fn(|| ep.poll_event()).collect()
    }

    /// Regression (issue 25, defect 1): an initiation captured before a restart was accepted
    /// by a node whose live session it had initiated itself (its freshness mark for the peer
    /// was still 0); the node dropped that session and re-pointed the peer's address to the
    /// sender. Now the replay only creates an unconfirmed session, which never confirms.
    #[test]
    fn replayed_init_leaves_the_live_session_and_address_alone() {
        let kx = StaticKeypair::from_seed(21);
        let ky = StaticKeypair::from_seed(22);
        let addr_x: SocketAddr = "198.18.1.1:7400".parse().unwrap();
        let addr_y: SocketAddr = "198.18.2.1:7400".parse().unwrap();
        let attacker: SocketAddr = "198.18.3.3:7400".parse().unwrap();
        let peer = |name: &str, public, addr| PeerConfig {
            name: name.into(),
            public,
            addr,
        };
        // y, before a restart, initiates to x; the attacker captures that init.
        let mut y_old = Endpoint::new(
            ky.clone(),
            vec![peer("x", kx.public, Some(addr_x))],
            Config::default(),
            5,
            true,
            1 << 40,
        );
        y_old.handle_timeout(0);
        let mut captured = Vec::new();
        assert!(y_old.poll_transmit(0, &mut captured).is_some());
        assert_eq!(captured[0], TYPE_INIT);
        // y restarted and waits; x connects to it.
        let mut y = Endpoint::new(
            ky,
            vec![peer("x", kx.public, None)],
            Config::default(),
            6,
            true,
            2 << 40,
        );
        let mut x = Endpoint::new(
            kx,
            vec![peer("y", ky_public(&y), Some(addr_y))],
            Config::default(),
            7,
            true,
            2 << 40,
        );
        let t = 1_000_000_000;
        x.handle_timeout(t);
        deliver(&mut x, &mut y, addr_x, t);
        deliver(&mut y, &mut x, addr_y, t);
        deliver(&mut x, &mut y, addr_x, t);
        assert!(x.is_connected(0) && y.is_connected(0));
        drain_events(&mut x);
        drain_events(&mut y);
        stream_round_trip(&mut x, &mut y, addr_x, t + 1, b"before");

        // The replay reaches x from the attacker's address.
        x.handle_datagram(t + 2, attacker, &captured);
        assert!(x.is_connected(0));
        assert_eq!(x.peer_addr(0), Some(addr_y));
        assert!(
            !drain_events(&mut x).iter().any(|e| matches!(
                e,
                EndpointEvent::Disconnected { .. } | EndpointEvent::Connected(_)
            )),
            "the replay must not replace the session"
        );
        let mut out = Vec::new();
        let mut to_attacker = 0;
        while let Some(dst) = x.poll_transmit(t + 2, &mut out) {
            assert_eq!(
                dst, attacker,
                "only the handshake response goes to the sender"
            );
            assert_eq!(out[0], TYPE_RESPONSE);
            to_attacker += 1;
            out.clear();
        }
        assert_eq!(to_attacker, 1);
        // The session keeps working both ways, at the same address.
        stream_round_trip(&mut x, &mut y, addr_x, t + 3, b"after, x to y");
        stream_round_trip(&mut y, &mut x, addr_y, t + 4, b"after, y to x");
        assert_eq!(x.peer_addr(0), Some(addr_y));
        // The unconfirmed session expires; the same init replayed again is refused as stale.
        x.handle_timeout(t + 2 + NEXT_SESSION_TIMEOUT_NS);
        assert_eq!(x.stats().sessions_expired_unconfirmed, 1);
        x.handle_datagram(t + 3 + NEXT_SESSION_TIMEOUT_NS, attacker, &captured);
        assert_eq!(x.stats().handshakes_replayed, 1);
        assert!(x.is_connected(0));
    }

    fn ky_public(y: &Endpoint) -> [u8; 32] {
        y.identity.public
    }
}
