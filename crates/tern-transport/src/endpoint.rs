//! A node's endpoint: its static identity, its pinned peers, the Noise IK handshake and the
//! demultiplexing of datagrams to connections.
//!
//! ```text
//!  initiator                                   responder
//!  Idle --connect--> InitSent --[0x01 init]-->  length, mac1 (keyed by our public key)?
//!                    (retry every 1 s)          under load: mac2 valid for the source?
//!                    <--[0x03 cookie]---------- (no: cookie reply; initiator retries at once)
//!                                               per-source and global budget, then DH:
//!                                               pinned key? timestamp newer? -> next session
//!  Established <--[0x02 response]--------------  (the current session is untouched)
//!  --[data: PING]-->                            authenticates under the next session's
//!                                               keys: it replaces the current one and the
//!                                               peer's address moves to its source
//! ```
//! Simultaneous initiation: the side with the smaller static public key keeps its own
//! initiation and ignores the other's. A newer valid initiation never disturbs a live
//! session by itself: only a packet under its keys (which a replay cannot make) does (the
//! peer restarted). Anything that fails parsing or authentication is dropped and counted;
//! nothing a remote sends can make this code panic. Layouts: `wire.rs`, docs/transport.md.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::connection::{Config, Connection, Event};
use crate::crypto::{self, COOKIE_SALT_LEN, InitiatorHandshake, MAC_LEN, StaticKeypair};
use crate::wire::{self, PROTOCOL_VERSION, Reader, TYPE_COOKIE, TYPE_INIT, TYPE_RESPONSE};

/// Handshake initiations processed per second at most (each costs Diffie-Hellman work).
/// Only initiations with a valid mac1 (and, under load, a valid mac2) draw on it.
pub const MAX_INITS_PER_SECOND: u32 = 50;
/// Below this many of the second's [`MAX_INITS_PER_SECOND`] left the responder is under
/// load for [`UNDER_LOAD_NS`]: it then processes only initiations whose mac2 proves their
/// source address, and answers the others with a cookie reply.
pub const UNDER_LOAD_TOKENS: u32 = MAX_INITS_PER_SECOND / 2;
/// How long the responder stays under load after the budget ran low.
pub const UNDER_LOAD_NS: u64 = 1_000_000_000;
/// Initiations one source IP address may have processed: a burst of this many, refilled at
/// this many per second. More are dropped and counted (`handshakes_source_limited`).
pub const PER_SOURCE_INITS_PER_SECOND: u64 = 5;
/// Source addresses the per-source limiter tracks; when full, the least recently seen goes.
pub const MAX_TRACKED_SOURCES: usize = 1024;
/// The cookie secret is replaced this often; cookies under it and the one before are valid.
pub const COOKIE_SECRET_LIFETIME_NS: u64 = 120_000_000_000;
/// An initiator uses a received cookie for this long (a little under the secret's lifetime).
pub const COOKIE_USE_NS: u64 = 110_000_000_000;
/// Handshake packets (responses, cookie replies, initiations) queued to send at most; beyond
/// that a new one is dropped and counted (`handshake_transmits_dropped`).
pub const MAX_QUEUED_HANDSHAKE_TRANSMITS: usize = 1024;
/// Bytes after the Noise message of an initiation: mac1 and mac2.
pub const INIT_MACS_LEN: usize = 2 * MAC_LEN;
/// Shortest and longest initiation: type, index, Noise message 1, macs.
pub const MIN_INIT_LEN: usize = 3 + crypto::MESSAGE1_OVERHEAD + INIT_MACS_LEN;
pub const MAX_INIT_LEN: usize = MIN_INIT_LEN + crypto::MAX_HANDSHAKE_PAYLOAD;
/// Length of a cookie reply: type, index, salt, sealed cookie.
pub const COOKIE_REPLY_LEN: usize = 3 + COOKIE_SALT_LEN + crypto::SEALED_COOKIE_LEN;
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
#[serde(default)] // a newer or older node's status still parses
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
    /// Initiations of a plausible length received (before any check).
    pub inits_received: u64,
    /// Initiations dropped because mac1 was wrong (not made with our public key).
    pub handshakes_bad_mac1: u64,
    /// Initiations dropped by the per-source limit.
    pub handshakes_source_limited: u64,
    /// Initiations answered with a cookie reply (under load, no valid mac2).
    pub cookies_sent: u64,
    /// Cookie replies accepted (as initiator).
    pub cookies_received: u64,
    /// Cookie replies that failed authentication.
    pub cookies_invalid: u64,
    /// Initiations accepted and answered with a response.
    pub inits_accepted: u64,
    /// Handshake packets not queued because [`MAX_QUEUED_HANDSHAKE_TRANSMITS`] were waiting.
    pub handshake_transmits_dropped: u64,
    /// Handshake responses whose MAC (keyed by our init's mac1) was wrong.
    pub responses_bad_mac: u64,
}

#[derive(Debug)]
struct Pending {
    hs: InitiatorHandshake,
    local_index: u16,
    /// The initiation's mac1: a cookie reply to it is bound to it.
    mac1: [u8; MAC_LEN],
    /// A cookie reply was taken for this initiation (one retry per initiation).
    cookie_taken: bool,
}

/// Per-source GCRA state: the theoretical arrival time of the next initiation.
#[derive(Debug, Clone, Copy)]
struct SourceBucket {
    tat_ns: u64,
    last_ns: u64,
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
    /// The last cookie this peer sent us, and when it came.
    cookie: Option<([u8; MAC_LEN], u64)>,
    /// Removed by [`Endpoint::remove_peer`]: its id stays allocated, its key handshakes no more.
    removed: bool,
    /// `config.addr` changed while a session was up: it becomes `addr` when that session ends.
    readdress: bool,
}

impl Peer {
    fn new(c: PeerConfig) -> Peer {
        Peer {
            addr: c.addr,
            config: c,
            conn: None,
            next: None,
            pending: None,
            next_attempt_ns: 0,
            last_init_timestamp: 0,
            cookie: None,
            removed: false,
            readdress: false,
        }
    }
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
    under_load_until_ns: u64,
    /// mac1 key for initiations addressed to this node.
    mac1_key: [u8; 32],
    /// Current and previous cookie secret, and when the current one was made.
    cookie_secrets: [[u8; 32]; 2],
    cookie_rotated_ns: u64,
    cookie_rotations: u64,
    sources: BTreeMap<IpAddr, SourceBucket>,
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
        let peers = peers.into_iter().map(Peer::new).collect();
        let mac1_key = crypto::mac1_key(&identity.public);
        let cookie_secrets = [
            crypto::cookie_secret(&identity, 0, seed),
            crypto::cookie_secret(&identity, u64::MAX, seed),
        ];
        Self {
            mac1_key,
            cookie_secrets,
            cookie_rotated_ns: 0,
            cookie_rotations: 0,
            sources: BTreeMap::new(),
            under_load_until_ns: 0,
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

    /// Peer ids in use, removed ones included (ids are never reused).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Adds a peer (a node's config reload); its id is `peer_count()` before the call.
    pub fn add_peer(&mut self, config: PeerConfig) -> PeerId {
        self.peers.push(Peer::new(config));
        self.peers.len() - 1
    }

    /// Changes a peer's key or address (a node's config reload). A new public key ends the
    /// peer's session, its pending initiation and its unconfirmed next session (all made
    /// with the old key), with a `Disconnected` event if a session was up. A new address
    /// alone leaves a live session on the path it has (it keeps following its peer) and is
    /// where initiations go once that session ends; without a session, at once.
    /// Returns whether a session was ended.
    pub fn set_peer(&mut self, peer: PeerId, config: PeerConfig) -> bool {
        let rekeyed = self.peers[peer].config.public != config.public;
        let had = rekeyed && self.peers[peer].conn.is_some();
        if rekeyed {
            self.reset_peer(peer);
            self.peers[peer].last_init_timestamp = 0;
        }
        let p = &mut self.peers[peer];
        if p.config.addr != config.addr {
            if p.conn.is_some() {
                p.readdress = true;
            } else {
                p.addr = config.addr;
                p.next_attempt_ns = 0;
            }
        }
        p.config = config;
        had
    }

    /// Removes a peer (a node's config reload): its session ends (a `Disconnected` event if
    /// one was up), its key is refused like an unknown one and no initiation goes to it. The
    /// id stays allocated so other peers' ids do not move; [`Endpoint::is_removed`] says so.
    pub fn remove_peer(&mut self, peer: PeerId) {
        self.reset_peer(peer);
        let p = &mut self.peers[peer];
        p.addr = None;
        p.readdress = false;
        p.removed = true;
    }

    pub fn is_removed(&self, peer: PeerId) -> bool {
        self.peers[peer].removed
    }

    /// Ends a peer's session and handshakes.
    fn reset_peer(&mut self, peer: PeerId) {
        if let Some(old) = self.peers[peer].pending.take() {
            self.by_index.remove(&old.local_index);
        }
        let p = &mut self.peers[peer];
        p.next = None;
        p.cookie = None;
        p.next_attempt_ns = 0;
        self.drop_connection(peer);
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
                    if std::mem::take(&mut p.readdress) {
                        p.addr = p.config.addr;
                    }
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
        let mac1 = crypto::mac(&crypto::mac1_key(&public), &pkt);
        pkt.extend_from_slice(&mac1);
        let mac2 = match self.peers[peer].cookie {
            Some((cookie, at_ns)) if now_ns < at_ns.saturating_add(COOKIE_USE_NS) => {
                crypto::mac(&cookie, &pkt)
            }
            _ => [0u8; MAC_LEN],
        };
        pkt.extend_from_slice(&mac2);
        self.queue_handshake(addr, pkt);
        self.by_index.insert(local_index, peer);
        let p = &mut self.peers[peer];
        p.pending = Some(Pending {
            hs,
            local_index,
            mac1,
            cookie_taken: false,
        });
        p.next_attempt_ns = now_ns + HANDSHAKE_RETRY_NS;
    }

    fn queue_handshake(&mut self, to: SocketAddr, pkt: Vec<u8>) {
        if self.transmits.len() >= MAX_QUEUED_HANDSHAKE_TRANSMITS {
            self.stats.handshake_transmits_dropped += 1;
            return;
        }
        self.transmits.push_back((to, pkt));
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
            TYPE_COOKIE => self.on_cookie(now_ns, data),
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

    /// Per-source limit (GCRA, [`PER_SOURCE_INITS_PER_SECOND`] with an equal burst).
    fn take_source_token(&mut self, now_ns: u64, ip: IpAddr) -> bool {
        let interval_ns = 1_000_000_000 / PER_SOURCE_INITS_PER_SECOND;
        let burst_ns = interval_ns * PER_SOURCE_INITS_PER_SECOND;
        if !self.sources.contains_key(&ip) && self.sources.len() >= MAX_TRACKED_SOURCES {
            // Forget sources whose budget is full again; if none, the least recently seen.
            self.sources.retain(|_, b| b.tat_ns > now_ns);
            if self.sources.len() >= MAX_TRACKED_SOURCES
                && let Some(oldest) = self
                    .sources
                    .iter()
                    .min_by_key(|(_, b)| b.last_ns)
                    .map(|(&ip, _)| ip)
            {
                self.sources.remove(&oldest);
            }
        }
        let b = self.sources.entry(ip).or_insert(SourceBucket {
            tat_ns: now_ns,
            last_ns: now_ns,
        });
        b.last_ns = now_ns;
        let tat = b.tat_ns.max(now_ns) + interval_ns;
        if tat > now_ns + burst_ns {
            return false;
        }
        b.tat_ns = tat;
        true
    }

    fn rotate_cookie_secret(&mut self, now_ns: u64) {
        if now_ns >= self.cookie_rotated_ns + COOKIE_SECRET_LIFETIME_NS {
            self.cookie_rotations += 1;
            let nonce = self.next_rand();
            self.cookie_secrets[1] = self.cookie_secrets[0];
            self.cookie_secrets[0] =
                crypto::cookie_secret(&self.identity, self.cookie_rotations, nonce);
            self.cookie_rotated_ns = now_ns;
        }
    }

    fn cookie_for(secret: &[u8; 32], from: SocketAddr) -> [u8; MAC_LEN] {
        let mut addr = Vec::with_capacity(19);
        match from.ip() {
            IpAddr::V4(ip) => addr.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => addr.extend_from_slice(&ip.octets()),
        }
        addr.extend_from_slice(&from.port().to_be_bytes());
        crypto::mac(secret, &addr)
    }

    fn send_cookie_reply(&mut self, from: SocketAddr, data: &[u8]) {
        let mac1 = &data[data.len() - INIT_MACS_LEN..data.len() - MAC_LEN];
        let cookie = Self::cookie_for(&self.cookie_secrets[0], from);
        let mut salt = [0u8; COOKIE_SALT_LEN];
        salt[..8].copy_from_slice(&self.next_rand().to_le_bytes());
        salt[8..].copy_from_slice(&self.next_rand().to_le_bytes());
        let sealed = crypto::seal_cookie(&self.identity.public, &salt, mac1, &cookie);
        let mut pkt = Vec::with_capacity(COOKIE_REPLY_LEN);
        pkt.push(TYPE_COOKIE);
        pkt.extend_from_slice(&data[1..3]);
        pkt.extend_from_slice(&salt);
        pkt.extend_from_slice(&sealed);
        self.stats.cookies_sent += 1;
        self.queue_handshake(from, pkt);
    }

    /// A cookie reply: remember the cookie and retry the initiation with it at once.
    fn on_cookie(&mut self, now_ns: u64, data: &[u8]) {
        if data.len() != COOKIE_REPLY_LEN {
            self.stats.dropped_malformed += 1;
            return;
        }
        let index = u16::from_be_bytes([data[1], data[2]]);
        let Some(&peer) = self.by_index.get(&index) else {
            self.stats.dropped_unknown_session += 1;
            return;
        };
        let public = self.peers[peer].config.public;
        let Some(pending) = self.peers[peer].pending.as_mut() else {
            self.stats.dropped_unknown_session += 1;
            return;
        };
        if pending.local_index != index || pending.cookie_taken {
            self.stats.dropped_unknown_session += 1;
            return;
        }
        let salt = &data[3..3 + COOKIE_SALT_LEN];
        let Some(cookie) =
            crypto::open_cookie(&public, salt, &pending.mac1, &data[3 + COOKIE_SALT_LEN..])
        else {
            self.stats.cookies_invalid += 1;
            return;
        };
        pending.cookie_taken = true;
        self.stats.cookies_received += 1;
        self.peers[peer].cookie = Some((cookie, now_ns));
        self.start_handshake(now_ns, peer);
    }

    fn on_init(&mut self, now_ns: u64, from: SocketAddr, data: &[u8]) {
        if !(MIN_INIT_LEN..=MAX_INIT_LEN).contains(&data.len()) {
            self.stats.dropped_malformed += 1;
            return;
        }
        self.stats.inits_received += 1;
        // Cheap checks first: mac1 (the sender knows our public key), then under load mac2
        // (the sender receives at its source address), then the per-source and global
        // budgets, and only then Diffie-Hellman.
        let mac2_at = data.len() - MAC_LEN;
        let mac1_at = mac2_at - MAC_LEN;
        if !crypto::mac_eq(
            &crypto::mac(&self.mac1_key, &data[..mac1_at]),
            &data[mac1_at..mac2_at],
        ) {
            self.stats.handshakes_bad_mac1 += 1;
            return;
        }
        self.rotate_cookie_secret(now_ns);
        if now_ns < self.under_load_until_ns {
            let proven = self.cookie_secrets.iter().any(|secret| {
                let cookie = Self::cookie_for(secret, from);
                crypto::mac_eq(&crypto::mac(&cookie, &data[..mac2_at]), &data[mac2_at..])
            });
            if !proven {
                self.send_cookie_reply(from, data);
                return;
            }
        }
        if !self.take_source_token(now_ns, from.ip()) {
            self.stats.handshakes_source_limited += 1;
            return;
        }
        if !self.take_init_token(now_ns) {
            self.stats.handshakes_rate_limited += 1;
            return;
        }
        if self.init_tokens < UNDER_LOAD_TOKENS {
            self.under_load_until_ns = now_ns + UNDER_LOAD_NS;
        }
        let remote_index = u16::from_be_bytes([data[1], data[2]]);
        let seed = self.deterministic.then(|| self.next_rand());
        let Ok(accepted) = crypto::accept_initiation(&self.identity, &data[3..mac1_at], seed)
        else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let Some(peer) = self
            .peers
            .iter()
            .position(|p| !p.removed && p.config.public == accepted.remote_public)
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
        // Keyed by the init's mac1, which only the initiator and those on its path have seen.
        let response_mac = crypto::mac(&data[mac1_at..mac2_at], &pkt);
        pkt.extend_from_slice(&response_mac);
        self.queue_handshake(from, pkt);
        self.stats.inits_accepted += 1;
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
        let p = &mut self.peers[peer];
        if std::mem::take(&mut p.readdress) {
            p.addr = p.config.addr;
        }
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
        let Some(pending) = p.pending.as_ref().filter(|x| x.local_index == index) else {
            self.stats.dropped_unknown_session += 1;
            return;
        };
        // The response MAC (keyed by our init's mac1) first: an off-path sender who guessed
        // the index neither costs Diffie-Hellman work nor ends the pending initiation.
        let body = r.rest();
        let Some(mac_at) = body.len().checked_sub(MAC_LEN) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let covered = &data[..3 + mac_at];
        if !crypto::mac_eq(&crypto::mac(&pending.mac1, covered), &body[mac_at..]) {
            self.stats.responses_bad_mac += 1;
            return;
        }
        let pending = p.pending.take().expect("checked");
        self.by_index.remove(&index);
        let Ok((payload, keys)) = pending.hs.finish(&body[..mac_at]) else {
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
        Some(&TYPE_COOKIE) => "cookie",
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

    /// A reload's peer changes: removing a peer ends its session and refuses its key; a new
    /// key ends the session made with the old one; an added peer handshakes; the other
    /// peers' sessions are untouched throughout.
    #[test]
    fn peers_can_be_added_rekeyed_and_removed_without_touching_the_others() {
        let (mut a, mut b, addr_a, addr_b) = pair();
        a.handle_timeout(0);
        deliver(&mut a, &mut b, addr_a, 0);
        deliver(&mut b, &mut a, addr_b, 1);
        deliver(&mut a, &mut b, addr_a, 1);
        assert!(a.is_connected(0) && b.is_connected(0));
        drain_events(&mut b);
        // b learns a third peer c, which connects; a's session stays.
        let kc = StaticKeypair::from_seed(13);
        let addr_c: SocketAddr = "198.18.3.1:7400".parse().unwrap();
        let ka_public = StaticKeypair::from_seed(11).public;
        let c_id = b.add_peer(PeerConfig {
            name: "c".into(),
            public: kc.public,
            addr: None,
        });
        assert_eq!(c_id, 1);
        let mut c = Endpoint::new(
            kc.clone(),
            vec![PeerConfig {
                name: "b".into(),
                public: b.identity.public,
                addr: Some(addr_b),
            }],
            Config::default(),
            3,
            true,
            1 << 40,
        );
        c.handle_timeout(0);
        deliver(&mut c, &mut b, addr_c, 2);
        deliver(&mut b, &mut c, addr_b, 3);
        deliver(&mut c, &mut b, addr_c, 3);
        assert!(b.is_connected(c_id) && b.is_connected(0));
        drain_events(&mut b);
        // A new address for a only moves where initiations would go.
        let moved: SocketAddr = "198.18.1.2:7400".parse().unwrap();
        let ended = b.set_peer(
            0,
            PeerConfig {
                name: "a".into(),
                public: ka_public,
                addr: Some(moved),
            },
        );
        assert!(!ended && b.is_connected(0));
        assert_eq!(
            b.peer_addr(0),
            Some(addr_a),
            "the live session keeps its path"
        );
        // A new key for c ends its session (made with the old key); a's stays.
        let kc2 = StaticKeypair::from_seed(14);
        let ended = b.set_peer(
            c_id,
            PeerConfig {
                name: "c".into(),
                public: kc2.public,
                addr: None,
            },
        );
        assert!(ended && !b.is_connected(c_id) && b.is_connected(0));
        assert_eq!(
            drain_events(&mut b),
            [EndpointEvent::Disconnected {
                peer: c_id,
                code: crate::connection::CLOSE_NORMAL
            }]
        );
        // c, not connected now, gets a new address at once.
        let c_moved: SocketAddr = "198.18.3.2:7400".parse().unwrap();
        b.set_peer(
            c_id,
            PeerConfig {
                name: "c".into(),
                public: kc2.public,
                addr: Some(c_moved),
            },
        );
        assert_eq!(b.peer_addr(c_id), Some(c_moved));
        // c with its old key is now unknown.
        let before = b.stats().handshakes_unknown_key;
        let mut c_again = Endpoint::new(
            kc,
            vec![PeerConfig {
                name: "b".into(),
                public: b.identity.public,
                addr: Some(addr_b),
            }],
            Config::default(),
            4,
            true,
            1 << 41,
        );
        c_again.handle_timeout(0);
        deliver(&mut c_again, &mut b, addr_c, 20);
        assert_eq!(b.stats().handshakes_unknown_key, before + 1);
        // Removing a ends its session and its key handshakes no more.
        b.remove_peer(0);
        assert!(b.is_removed(0) && !b.is_connected(0) && b.peer_addr(0).is_none());
        assert_eq!(
            drain_events(&mut b),
            [EndpointEvent::Disconnected {
                peer: 0,
                code: crate::connection::CLOSE_NORMAL
            }]
        );
        let mut a2 = Endpoint::new(
            StaticKeypair::from_seed(11),
            vec![PeerConfig {
                name: "b".into(),
                public: b.identity.public,
                addr: Some(addr_b),
            }],
            Config::default(),
            5,
            true,
            1 << 42,
        );
        a2.handle_timeout(0);
        let before = b.stats().handshakes_unknown_key;
        deliver(&mut a2, &mut b, addr_a, 30);
        assert_eq!(b.stats().handshakes_unknown_key, before + 1);
        assert!(!b.is_connected(0));
        // Nothing is sent to a removed peer.
        b.handle_timeout(40_000_000_000);
        let mut out = Vec::new();
        while let Some(to) = b.poll_transmit(40_000_000_000, &mut out) {
            assert_ne!(to, moved);
            out.clear();
        }
    }

    /// A new address for a connected peer waits for the session to end, then initiations go
    /// there.
    #[test]
    fn a_new_address_applies_when_the_live_session_ends() {
        let (mut a, mut b, addr_a, addr_b) = pair();
        a.handle_timeout(0);
        deliver(&mut a, &mut b, addr_a, 0);
        deliver(&mut b, &mut a, addr_b, 1);
        deliver(&mut a, &mut b, addr_a, 1);
        assert!(a.is_connected(0));
        let moved: SocketAddr = "198.18.2.2:7400".parse().unwrap();
        let kb = b.identity.public;
        assert!(!a.set_peer(
            0,
            PeerConfig {
                name: "b".into(),
                public: kb,
                addr: Some(moved),
            },
        ));
        assert_eq!(a.peer_addr(0), Some(addr_b));
        // The session ends (idle: nothing from b any more).
        let mut now = 2;
        let mut out = Vec::new();
        while a.is_connected(0) {
            now += 1_000_000_000;
            assert!(now < 600_000_000_000, "the session never idled out");
            a.handle_timeout(now);
            while a.poll_transmit(now, &mut out).is_some() {
                out.clear();
            }
            drain_events(&mut a);
        }
        drain_events(&mut a);
        assert_eq!(a.peer_addr(0), Some(moved));
        a.handle_timeout(now + 1);
        let mut to = Vec::new();
        while let Some(d) = a.poll_transmit(now + 1, &mut out) {
            to.push(d);
            out.clear();
        }
        assert!(to.contains(&moved), "{to:?}");
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

    /// Junk a flooder sends: 3-byte stubs, full-size random bytes (bad mac1), and real
    /// initiations from a key nobody pinned (valid mac1: the flooder knows the public key),
    /// each from a random spoofed address.
    struct Flood {
        rng: u64,
        valid_mac1: Vec<Vec<u8>>,
        count: u64,
    }

    impl Flood {
        fn new(target_public: [u8; 32], target_addr: SocketAddr) -> Self {
            let stranger = StaticKeypair::from_seed(99);
            let mut valid_mac1 = Vec::new();
            for i in 0..20u64 {
                let mut ep = Endpoint::new(
                    stranger.clone(),
                    vec![PeerConfig {
                        name: "target".into(),
                        public: target_public,
                        addr: Some(target_addr),
                    }],
                    Config::default(),
                    100 + i,
                    true,
                    (1 << 40) + i,
                );
                ep.handle_timeout(0);
                let mut out = Vec::new();
                ep.poll_transmit(0, &mut out).expect("init");
                valid_mac1.push(out);
            }
            Flood {
                rng: 1,
                valid_mac1,
                count: 0,
            }
        }

        fn next(&mut self) -> (SocketAddr, Vec<u8>) {
            self.rng = self
                .rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = self.rng >> 16;
            let addr = SocketAddr::from(([198, 19, (r >> 8) as u8, r as u8], (r >> 16) as u16 | 1));
            self.count += 1;
            let pkt = match self.count % 3 {
                0 => vec![TYPE_INIT, r as u8, (r >> 8) as u8],
                1 => {
                    let mut p = vec![TYPE_INIT];
                    p.extend((0..MIN_INIT_LEN - 1 + 9).map(|i| (r >> (i % 40)) as u8));
                    p
                }
                _ => self.valid_mac1[(r % 20) as usize].clone(),
            };
            (addr, pkt)
        }
    }

    /// Runs `x` and `y` over a 5 ms link in 1 ms steps with 1,000 flood datagrams a second
    /// into `y`, from `start_ns`; returns how long after its start x and y are connected
    /// and the time then (None after 5 s).
    fn connect_under_flood(
        x: &mut Endpoint,
        y: &mut Endpoint,
        addr_x: SocketAddr,
        addr_y: SocketAddr,
        flood: &mut Flood,
        start_ns: u64,
    ) -> Option<(u64, u64)> {
        const MS: u64 = 1_000_000;
        let mut in_flight: Vec<(u64, bool, Vec<u8>)> = Vec::new();
        let mut out = Vec::new();
        // The flood runs alone for 1.5 s first, so the responder is under load when x starts.
        const WARM_UP_STEPS: u64 = 1500;
        for step in 0..WARM_UP_STEPS + 5000 {
            let now = start_ns + step * MS;
            let (src, junk) = flood.next();
            y.handle_datagram(now, src, &junk);
            if step < WARM_UP_STEPS {
                continue;
            }
            x.handle_timeout(now);
            y.handle_timeout(now);
            while let Some(dst) = x.poll_transmit(now, &mut out) {
                if dst == addr_y {
                    in_flight.push((now + 5 * MS, true, std::mem::take(&mut out)));
                }
                out.clear();
            }
            while let Some(dst) = y.poll_transmit(now, &mut out) {
                if dst == addr_x {
                    in_flight.push((now + 5 * MS, false, std::mem::take(&mut out)));
                }
                out.clear(); // replies to spoofed sources go nowhere
            }
            let (due, later): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|f| f.0 <= now);
            in_flight = later;
            for (_, to_y, pkt) in due {
                if to_y {
                    y.handle_datagram(now, addr_x, &pkt);
                } else {
                    x.handle_datagram(now, addr_y, &pkt);
                }
            }
            let x_events = drain_events(x);
            let y_events = drain_events(y);
            if x_events
                .iter()
                .chain(&y_events)
                .any(|e| matches!(e, EndpointEvent::Connected(_)))
                && x.is_connected(0)
                && y.is_connected(0)
                && y.connection_ref(0).unwrap().stats().packets_received > 0
            {
                return Some((now - start_ns - WARM_UP_STEPS * MS, now));
            }
        }
        None
    }

    /// Regression (issue 25, defect 2): one global budget of 50 initiations a second was spent
    /// before any check, so 1,000 junk datagrams a second starved every real handshake. Now
    /// junk fails mac1 for free, valid-mac1 floods from spoofed sources put the responder
    /// under load and get cookie replies, and a restarted real peer connects (through a
    /// cookie round trip) within a few hundred ms of simulated time.
    #[test]
    fn one_source_gets_its_own_budget_of_inits_and_no_more() {
        let ky = StaticKeypair::from_seed(42);
        let addr_y: SocketAddr = "198.18.2.1:7400".parse().unwrap();
        let mut y = Endpoint::new(
            ky.clone(),
            vec![PeerConfig {
                name: "x".into(),
                public: StaticKeypair::from_seed(41).public,
                addr: None,
            }],
            Config::default(),
            8,
            true,
            1 << 40,
        );
        // A stranger that knows y's public key (so its mac1 is valid) sends 100 inits a
        // second for 2 s from one address.
        let flood = Flood::new(ky.public, addr_y);
        let src: SocketAddr = "198.19.0.7:7400".parse().unwrap();
        for k in 0..200u64 {
            let pkt = &flood.valid_mac1[(k % 20) as usize];
            y.handle_datagram(k * 10_000_000, src, pkt);
        }
        let st = y.stats().clone();
        let processed = st.handshakes_unknown_key + st.inits_accepted + st.handshakes_rejected;
        // A burst of PER_SOURCE_INITS_PER_SECOND, then that many a second: 5 + 2 x 5.
        assert!(
            (10..=16).contains(&processed),
            "{processed} inits from one source reached Diffie-Hellman: {st:?}"
        );
        assert!(st.handshakes_source_limited >= 180, "{st:?}");
        assert_eq!(
            st.handshakes_rate_limited, 0,
            "one source never drained the global budget"
        );
        assert_eq!(
            st.cookies_sent, 0,
            "one source never put y under load: {st:?}"
        );
        // Another address still has its whole budget.
        let other: SocketAddr = "198.19.0.8:7400".parse().unwrap();
        y.handle_datagram(2_000_000_000, other, &flood.valid_mac1[0]);
        let st2 = y.stats().clone();
        assert_eq!(st2.handshakes_source_limited, st.handshakes_source_limited);
        assert_eq!(
            st2.handshakes_unknown_key + st2.inits_accepted + st2.handshakes_rejected,
            processed + 1
        );
    }

    #[test]
    fn restarted_peer_connects_through_a_flood_of_junk_inits() {
        let kx = StaticKeypair::from_seed(31);
        let ky = StaticKeypair::from_seed(32);
        let addr_x: SocketAddr = "198.18.1.1:7400".parse().unwrap();
        let addr_y: SocketAddr = "198.18.2.1:7400".parse().unwrap();
        let peer = |name: &str, public, addr| PeerConfig {
            name: name.into(),
            public,
            addr,
        };
        let ky_pub = ky.public;
        let new_x = |epoch: u64, seed: u64| {
            Endpoint::new(
                kx.clone(),
                vec![peer("y", ky_pub, Some(addr_y))],
                Config::default(),
                seed,
                true,
                epoch,
            )
        };
        let mut y = Endpoint::new(
            ky,
            vec![peer("x", kx.public, None)],
            Config::default(),
            8,
            true,
            1 << 40,
        );
        let mut flood = Flood::new(ky_pub, addr_y);
        let mut x = new_x(1 << 40, 9);
        let (first, _) = connect_under_flood(&mut x, &mut y, addr_x, addr_y, &mut flood, 0)
            .expect("first connection within 5 s");
        assert!(first < 1_000_000_000, "connected after {first} ns");
        // x restarts (a later epoch) and reconnects while the flood goes on.
        let mut x = new_x(2 << 40, 10);
        let start = 10_000_000_000;
        let (again, at) = connect_under_flood(&mut x, &mut y, addr_x, addr_y, &mut flood, start)
            .expect("reconnection within 5 s");
        assert!(again < 1_000_000_000, "reconnected after {again} ns");
        stream_round_trip(&mut x, &mut y, addr_x, at + 1, b"through the flood");
        assert!(x.stats().cookies_received >= 1, "{:?}", x.stats());
        let st = y.stats().clone();
        assert!(
            st.handshakes_bad_mac1 > 0 && st.dropped_malformed > 0,
            "{st:?}"
        );
        assert!(
            st.cookies_sent > 0,
            "the valid-mac1 flood put y under load: {st:?}"
        );
        assert!(st.handshakes_unknown_key > 0);
        // Diffie-Hellman work stayed within the budget.
        assert!(
            st.handshakes_unknown_key + st.inits_accepted <= 2 * 50 * 6,
            "{st:?}"
        );
        assert!(st.inits_received > 0);
    }

    /// Adversarial input: 30,000 datagrams made by mutating captured init, response, cookie
    /// and data packets (bit flips, truncation, extension, type swaps) reach a responder with
    /// a live session. Nothing panics, nothing replaces the session or moves the peer's
    /// address, and the session still carries data afterwards.
    #[test]
    fn mutated_handshake_and_data_packets_only_move_counters() {
        let (mut a, mut b, addr_a, addr_b) = pair();
        a.handle_timeout(0);
        let mut captured = deliver(&mut a, &mut b, addr_a, 0); // init
        captured.extend(deliver(&mut b, &mut a, addr_b, 1)); // response
        captured.extend(deliver(&mut a, &mut b, addr_a, 1)); // PING
        assert!(a.is_connected(0) && b.is_connected(0));
        stream_round_trip(&mut a, &mut b, addr_a, 2, b"data");
        let c = a.connection(0).unwrap();
        let id = c.open_stream().unwrap();
        c.stream_write(id, &[9u8; 3000]).unwrap();
        let mut out = Vec::new();
        while a.poll_transmit(3, &mut out).is_some() {
            captured.push(std::mem::take(&mut out));
        }
        // A well-formed cookie reply shape, too.
        let mut cookie = vec![TYPE_COOKIE];
        cookie.resize(COOKIE_REPLY_LEN, 7);
        captured.push(cookie);
        drain_events(&mut b);
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..30_000u64 {
            let mut pkt = captured[(next() % captured.len() as u64) as usize].clone();
            match next() % 5 {
                0 => {
                    let at = (next() % pkt.len() as u64) as usize;
                    pkt[at] ^= 1 << (next() % 8);
                }
                1 => pkt.truncate((next() % (pkt.len() as u64 + 1)) as usize),
                2 => pkt.extend((0..next() % 64).map(|x| x as u8)),
                3 => pkt[0] = [TYPE_INIT, TYPE_RESPONSE, TYPE_COOKIE, 0x80, 0xff][i as usize % 5],
                _ => {
                    for _ in 0..1 + next() % 8 {
                        let at = (next() % pkt.len() as u64) as usize;
                        pkt[at] = next() as u8;
                    }
                }
            }
            let from = if next() % 2 == 0 {
                addr_a
            } else {
                SocketAddr::from(([198, 19, 0, (next() % 250) as u8], 7400))
            };
            b.handle_datagram(10 + i, from, &pkt);
        }
        assert!(!drain_events(&mut b).iter().any(|e| matches!(
            e,
            EndpointEvent::Disconnected { .. } | EndpointEvent::Connected(_)
        )));
        assert_eq!(b.peer_addr(0), Some(addr_a));
        let now = 1_000_000_000;
        let mut out = Vec::new();
        while b.poll_transmit(now, &mut out).is_some() {
            out.clear(); // replies to the junk
        }
        stream_round_trip(&mut a, &mut b, addr_a, now, b"still fine");
    }

    /// Sibling of defect 2: a forged handshake response with a guessed session index cost
    /// the initiator Diffie-Hellman work and ended its pending initiation, so the real
    /// response was dropped. The response MAC (keyed by the init's mac1) is checked first.
    #[test]
    fn forged_response_neither_ends_the_initiation_nor_costs_dh() {
        let (mut a, mut b, addr_a, addr_b) = pair();
        a.handle_timeout(0);
        deliver(&mut a, &mut b, addr_a, 0);
        let mut out = Vec::new();
        b.poll_transmit(0, &mut out).expect("response");
        assert_eq!(out[0], TYPE_RESPONSE);
        let mut forged = out.clone();
        forged[10] ^= 0x40; // inside Noise message 2
        a.handle_datagram(1, "198.18.9.9:7400".parse().unwrap(), &forged);
        assert_eq!(a.stats().responses_bad_mac, 1);
        assert_eq!(a.stats().handshakes_rejected, 0);
        a.handle_datagram(2, addr_b, &out);
        assert!(a.is_connected(0), "{:?}", a.stats());
    }
}
