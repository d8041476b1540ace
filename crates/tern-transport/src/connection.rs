//! One authenticated connection between two site nodes: packet protection, streams, flow
//! control, acknowledgement, loss recovery, FEC, pacing and rate control.
//!
//! Sans-IO: `handle_packet(now, ..)`, `handle_timeout(now)`, `poll_transmit(now, out)`,
//! `poll_timeout()`, `poll_event()`. Time is nanoseconds on any monotonic clock.
//!
//! Streams are reliable ordered byte streams with FIN (half-close) and RESET (abort both
//! directions), mapping TCP FIN and RST. The initiator of the handshake opens even stream ids,
//! the responder odd ones; a frame for an unseen peer id opens that stream (zero-RTT open: the
//! first data rides with the open).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use thiserror::Error;

use crate::cc::{RateController, SendSnapshot};
use crate::crypto::{DirectionKey, PacketKeys, REPLAY_WINDOW, ReplayWindow};
use crate::fec::{self, FecDecoder, FecEncoder, RepairSymbol};
use crate::rangeset::RangeSet;
use crate::stream::{RecvError, RecvStream, SendStream};
use crate::wire::{self, Frame, MAX_ACK_RANGES, MAX_FRAME_DATA, PnRange};

/// Path RTT below which FEC stays off (see `Connection::fec_active`).
const FEC_MIN_RTT_NS: u64 = 4_000_000;

/// Bytes of every data packet's plaintext kept free so a FEC repair symbol covering a
/// full-size packet still fits in one datagram.
const FEC_RESERVE: usize = 24;
const TAG_LEN: usize = 16;
/// Packets the pacer may send back to back to catch up after a late wake-up, within
/// [`PACING_CATCH_UP_MIN_NS`] and 2 ms worth.
const PACING_CATCH_UP_PACKETS: usize = 16;
/// Least catch-up, whatever the rate: 1 ms, what Linux lets a paced TCP socket put into one
/// TSO burst (`tcp_tso_autosize`, pacing rate >> 10). 250 µs (16 packets at 1 Gbit/s) lost
/// the slots of every longer stall: with four relayed flows the node's loop runs longer
/// and goodput on `sonet` stayed at ~920 of 965 Mbit/s with 1-2 MB unsent in every stream.
const PACING_CATCH_UP_MIN_NS: u64 = 1_000_000;
/// A packet whose pacing slot is this close is sent now, with the one that is due: at
/// 1 Gbit/s about 8 packets leave per wake-up (one sendmmsg, one wake-up of the receiver)
/// instead of one every 12 µs. Linux TCP sends ~1 ms of its pacing rate per TSO burst;
/// this stays well under that.
const PACING_HORIZON_NS: u64 = 100_000;
/// ... and at least this many packet intervals ahead, so that at 100 Mbit/s three packets
/// leave per wake-up rather than one (a wake-up per packet cost node `a` 0.2 cores on `mpls`).
const PACING_HORIZON_PACKETS: u64 = 2;
/// Loss-rate windows (of 2000 packets) whose minimum is the background loss estimate.
const LOSS_SAMPLES: usize = 8;
/// Most out-of-order segments all streams of one connection hold together (each stream holds
/// at most `stream::MAX_RECV_SEGMENTS`; bytes are bounded by the connection window). A frame
/// that would add one beyond it closes the connection with [`CLOSE_PROTOCOL`].
pub const MAX_CONN_RECV_SEGMENTS: usize = 65_536;
/// Most RESET_STREAM frames queued to send; a peer that makes us refuse more streams than this
/// before they drain breaks the protocol (the connection closes with [`CLOSE_PROTOCOL`]).
pub const MAX_PENDING_RESETS: usize = 4096;
/// RESET code sent when the peer opens more streams than `max_streams`.
pub const RESET_REFUSED: u64 = 0x100;
/// Close codes.
pub const CLOSE_NORMAL: u64 = 0;
pub const CLOSE_IDLE: u64 = 1;
pub const CLOSE_PROTOCOL: u64 = 2;

#[derive(Debug, Clone)]
pub struct Config {
    /// Largest UDP payload tried by path-MTU probing (1500-byte path: 1472).
    pub max_udp_payload: usize,
    /// UDP payload used until a probe confirms a larger one.
    pub min_udp_payload: usize,
    pub stream_window_bytes: u64,
    pub conn_window_bytes: u64,
    /// Bytes the application may queue per stream beyond what is acknowledged.
    pub stream_send_buffer_bytes: u64,
    pub max_streams: usize,
    pub initial_rtt_us: u64,
    pub max_rate_bps: Option<u64>,
    pub fec: bool,
    /// Target probability that a FEC block cannot be repaired.
    pub fec_target_failure: f64,
    pub idle_timeout_us: u64,
    pub keepalive_us: u64,
    pub max_ack_delay_us: u64,
    /// Acknowledge at least every this many ack-eliciting packets.
    pub ack_every: u32,
    /// Update the send key after this long under one key (WireGuard: 120 s).
    pub rekey_after_us: u64,
    /// ... or after this many packets sent under one key ([`REKEY_AFTER_PACKETS`]).
    pub rekey_after_packets: u64,
    /// Never send more than this many packets under one key ([`KEY_PACKET_LIMIT`]): sending
    /// stops until a key update is possible.
    pub key_packet_limit: u64,
    /// How long the previous receive key still opens late packets after the peer's update.
    pub old_key_grace_us: u64,
}

/// Packets sent under one key before the sender updates it: half of [`KEY_PACKET_LIMIT`],
/// so an update has 2^22 packets of time to be confirmed before the hard stop.
pub const REKEY_AFTER_PACKETS: u64 = 1 << 22;
/// Hard limit of packets under one AES-GCM key: RFC 9001 §6.6's confidentiality limit for
/// AEAD_AES_256_GCM (2^23 full-size packets, the conservative analysis). A sender that
/// reaches it without having been able to update stops sending (`key_exhausted_stalls`).
pub const KEY_PACKET_LIMIT: u64 = 1 << 23;
/// Time under one key before an update (WireGuard's REKEY_AFTER_TIME).
pub const REKEY_AFTER_US: u64 = 120_000_000;
/// Default lifetime of the previous receive key after the peer updated (a few PTOs on any
/// WAN path; later packets are obsolete anyway: the replay window is 4096 packets).
pub const OLD_KEY_GRACE_US: u64 = 3_000_000;

impl Default for Config {
    fn default() -> Self {
        Self {
            max_udp_payload: 1472,
            min_udp_payload: 1232,
            stream_window_bytes: 32 << 20,
            conn_window_bytes: 64 << 20,
            stream_send_buffer_bytes: 32 << 20,
            max_streams: 1024,
            initial_rtt_us: 50_000,
            max_rate_bps: None,
            fec: true,
            fec_target_failure: 1e-3,
            idle_timeout_us: 15_000_000,
            keepalive_us: 1_000_000,
            max_ack_delay_us: 2_000,
            ack_every: 8,
            rekey_after_us: REKEY_AFTER_US,
            rekey_after_packets: REKEY_AFTER_PACKETS,
            key_packet_limit: KEY_PACKET_LIMIT,
            old_key_grace_us: OLD_KEY_GRACE_US,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("stream {0} does not exist or is closed")]
    Unknown(u64),
    #[error("stream {0} was reset by the peer (code {1})")]
    Reset(u64, u64),
    #[error("too many open streams (limit {0})")]
    TooMany(usize),
    #[error("stream {0} is already finished")]
    Finished(u64),
    #[error("connection is closed")]
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream (its first bytes may already be readable).
    StreamOpened(u64),
    Readable(u64),
    Writable(u64),
    /// The peer reset the stream; its state is gone.
    StreamReset {
        id: u64,
        code: u64,
    },
    Closed {
        code: u64,
    },
}

/// Counters and estimates of one connection (serialized as-is in `tern node status`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)] // a newer or older node's status still parses
pub struct ConnStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub stream_bytes_sent: u64,
    pub stream_bytes_retransmitted: u64,
    pub packets_lost: u64,
    pub fec_repairs_sent: u64,
    pub fec_recovered: u64,
    pub auth_failures: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub srtt_us: u64,
    pub min_rtt_us: u64,
    pub pacing_rate_bps: u64,
    pub cwnd_bytes: u64,
    pub bytes_in_flight: u64,
    pub loss_estimate: f64,
    pub udp_payload: usize,
    pub streams_open: usize,
    /// Times the peer broke the protocol (each closes the connection with `CLOSE_PROTOCOL`).
    pub protocol_errors: u64,
    /// Frames naming a peer stream id beyond the stream limit.
    pub stream_id_violations: u64,
    /// Stream data refused because the out-of-order buffer bound was reached.
    pub reassembly_limit_hits: u64,
    /// Send-key updates made, and receive-key updates followed (the peer's).
    pub key_updates_sent: u64,
    pub key_updates_received: u64,
    /// Late packets opened with the previous receive key within the grace time.
    pub old_key_packets: u64,
    /// Packets numbered before the peer's last key update that came after the grace time
    /// (refused: the previous key is gone).
    pub old_key_rejected: u64,
    /// Times sending stopped because the key reached `key_packet_limit` before an update
    /// was possible.
    pub key_exhausted_stalls: u64,
    /// ACK frames naming a packet number never sent (each closes the connection).
    pub acks_of_unsent: u64,
}

#[derive(Debug, Clone)]
enum SentFrame {
    Stream {
        id: u64,
        offset: u64,
        len: u32,
        fin: bool,
    },
    Reset {
        id: u64,
        code: u64,
        final_size: u64,
    },
    MaxStreamData(u64),
    MaxData,
    Close,
}

#[derive(Debug)]
struct SentPacket {
    time_ns: u64,
    size: u32,
    ack_eliciting: bool,
    repair: bool,
    mtu_probe: bool,
    snap: SendSnapshot,
    frames: Vec<SentFrame>,
}

#[derive(Debug)]
struct Stream {
    send: SendStream,
    recv: RecvStream,
    queued: bool,
    want_writable: bool,
    readable_signalled: bool,
}

/// The previous receive key, kept for packets sent before the peer's key update.
#[derive(Debug)]
struct PreviousKey {
    key: DirectionKey,
    /// The first packet number seen under the current key: anything below may be older.
    switch_pn: u64,
    expires_ns: u64,
}

/// Key update inside a live connection (QUIC RFC 9001 §6 without the header bit: the
/// receiver notices an update by trial, as the new key is derived, not negotiated).
///
/// Each direction has its own chain of keys, k(n+1) = REKEY(k(n)). A sender moves to the
/// next key after `rekey_after_us` or `rekey_after_packets`, but only once the peer has
/// acknowledged a packet under the current key (so the receiver is never two keys behind).
/// The receiver tries its current key; a packet that fails it and is numbered above every
/// packet received so far is tried under the next key, and if that opens it the receiver
/// moves on, keeping the previous key for `old_key_grace_us` for packets numbered below
/// the switch. Packet numbers continue across keys, so no nonce repeats under any key.
/// Streams, congestion state and acknowledgements are untouched: it is not a new session.
#[derive(Debug)]
struct KeyPhases {
    send: DirectionKey,
    send_first_pn: u64,
    send_since_ns: u64,
    send_packets: u64,
    recv: DirectionKey,
    recv_next: DirectionKey,
    recv_prev: Option<PreviousKey>,
    /// Receive-key updates followed, and the switch packet number of the last one.
    recv_updates: u64,
    recv_switch_pn: u64,
    /// The current send key's exhaustion was counted.
    exhausted_counted: bool,
}

impl KeyPhases {
    fn new(keys: PacketKeys, now_ns: u64) -> Self {
        let recv_next = keys.recv.next();
        KeyPhases {
            send: keys.send,
            send_first_pn: 0,
            send_since_ns: now_ns,
            send_packets: 0,
            recv: keys.recv,
            recv_next,
            recv_prev: None,
            recv_updates: 0,
            recv_switch_pn: 0,
            exhausted_counted: false,
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    config: Config,
    is_initiator: bool,
    keys: KeyPhases,
    confirmed: bool,
    closed: Option<u64>,
    close_pending: Option<u64>,
    // --- sending
    next_pn: u64,
    sent: BTreeMap<u64, SentPacket>,
    bytes_in_flight: u64,
    largest_acked: Option<u64>,
    srtt_ns: u64,
    rttvar_ns: u64,
    latest_rtt_ns: u64,
    has_rtt: bool,
    pto_count: u32,
    loss_time_ns: Option<u64>,
    last_ack_eliciting_ns: u64,
    /// Ack-eliciting packets in `sent` (the PTO timer runs while any are outstanding).
    ack_eliciting_in_flight: u64,
    cc: RateController,
    next_send_ns: u64,
    udp_payload: usize,
    mtu_probe: Option<(u64, usize)>,
    mtu_probe_done: bool,
    // --- receiving
    replay: ReplayWindow,
    received: RangeSet,
    largest_received: Option<u64>,
    ack_pending: u32,
    ack_deadline_ns: Option<u64>,
    ack_immediate: bool,
    ack_needed: bool,
    last_received_ns: u64,
    last_sent_ns: u64,
    // --- streams
    streams: BTreeMap<u64, Stream>,
    send_queue: VecDeque<u64>,
    next_local_id: u64,
    next_remote_id: u64,
    pending_max_stream_data: BTreeSet<u64>,
    pending_max_data: bool,
    pending_resets: VecDeque<(u64, u64, u64)>,
    ping_pending: bool,
    conn_max_advertised: u64,
    conn_received: u64,
    conn_consumed: u64,
    peer_max_data: u64,
    conn_sent: u64,
    conn_buffered: u64,
    /// Out-of-order segments held by all receive streams (≤ [`MAX_CONN_RECV_SEGMENTS`]).
    recv_segments: usize,
    events: VecDeque<Event>,
    // --- FEC
    fec_enc: FecEncoder,
    fec_dec: FecDecoder,
    fec_block_start_ns: u64,
    repairs: VecDeque<RepairSymbol>,
    loss_window_sent: u64,
    loss_window_lost: u64,
    /// Losses of packets numbered below this (sent in Startup or Drain) are not counted.
    loss_window_first_pn: u64,
    peer_recovered_total: u64,
    recovered_total: u64,
    loss_estimate: f64,
    loss_samples: [f64; LOSS_SAMPLES],
    loss_sample_index: usize,
    // --- scratch
    plain: Vec<u8>,
    frame_buf: Vec<u8>,
    stats: ConnStats,
}

impl Connection {
    /// A connection after a completed handshake. `initial_max_data` is the peer's stream window
    /// (both sides use the same configuration).
    pub fn new(config: Config, keys: PacketKeys, is_initiator: bool, now_ns: u64) -> Self {
        let udp_payload = config.min_udp_payload.min(config.max_udp_payload);
        Self {
            cc: RateController::new(config.initial_rtt_us, udp_payload, config.max_rate_bps),
            is_initiator,
            keys: KeyPhases::new(keys, now_ns),
            confirmed: is_initiator,
            closed: None,
            close_pending: None,
            next_pn: 0,
            sent: BTreeMap::new(),
            bytes_in_flight: 0,
            largest_acked: None,
            srtt_ns: config.initial_rtt_us * 1000,
            rttvar_ns: config.initial_rtt_us * 500,
            latest_rtt_ns: 0,
            has_rtt: false,
            pto_count: 0,
            loss_time_ns: None,
            last_ack_eliciting_ns: now_ns,
            ack_eliciting_in_flight: 0,
            next_send_ns: now_ns,
            udp_payload,
            mtu_probe: None,
            mtu_probe_done: config.max_udp_payload <= udp_payload,
            replay: ReplayWindow::new(),
            received: RangeSet::new(),
            largest_received: None,
            ack_pending: 0,
            ack_deadline_ns: None,
            ack_immediate: false,
            ack_needed: false,
            last_received_ns: now_ns,
            last_sent_ns: now_ns,
            streams: BTreeMap::new(),
            send_queue: VecDeque::new(),
            next_local_id: u64::from(!is_initiator),
            next_remote_id: u64::from(is_initiator),
            pending_max_stream_data: BTreeSet::new(),
            pending_max_data: false,
            pending_resets: VecDeque::new(),
            ping_pending: is_initiator,
            conn_max_advertised: config.conn_window_bytes,
            conn_received: 0,
            conn_consumed: 0,
            peer_max_data: config.conn_window_bytes,
            conn_sent: 0,
            conn_buffered: 0,
            recv_segments: 0,
            events: VecDeque::new(),
            fec_enc: FecEncoder::new(),
            fec_dec: FecDecoder::new(),
            fec_block_start_ns: 0,
            repairs: VecDeque::new(),
            loss_window_sent: 0,
            loss_window_lost: 0,
            loss_window_first_pn: 0,
            peer_recovered_total: 0,
            recovered_total: 0,
            loss_estimate: 0.0,
            loss_samples: [0.0; LOSS_SAMPLES],
            loss_sample_index: 0,
            plain: Vec::with_capacity(2048),
            frame_buf: Vec::with_capacity(2048),
            stats: ConnStats::default(),
            config,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    pub fn cc_mode(&self) -> crate::cc::Mode {
        self.cc.mode()
    }

    pub fn is_initiator(&self) -> bool {
        self.is_initiator
    }

    /// The congestion controller's bottleneck-rate estimate, bits per second: in Startup at
    /// least the initial window per RTT, never above `max_rate`.
    pub fn btl_bw_bps(&self) -> u64 {
        (self.cc.btl_bw_bytes_per_s() * 8.0) as u64
    }

    pub fn stats(&self) -> ConnStats {
        let mut s = self.stats.clone();
        s.srtt_us = self.srtt_ns / 1000;
        s.min_rtt_us = self.cc.min_rtt_ns().unwrap_or(0) / 1000;
        s.pacing_rate_bps = (self.cc.pacing_rate() * 8.0) as u64;
        s.cwnd_bytes = self.cc.cwnd();
        s.bytes_in_flight = self.bytes_in_flight;
        s.loss_estimate = self.loss_estimate;
        s.udp_payload = self.udp_payload;
        s.streams_open = self.streams.len();
        s.fec_recovered = self.recovered_total;
        s
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------------ streams (application)

    pub fn open_stream(&mut self) -> Result<u64, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::Closed);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(StreamError::TooMany(self.config.max_streams));
        }
        let id = self.next_local_id;
        self.next_local_id += 2;
        self.streams.insert(id, self.new_stream());
        Ok(id)
    }

    fn new_stream(&self) -> Stream {
        Stream {
            send: SendStream::new(self.config.stream_window_bytes),
            recv: RecvStream::new(self.config.stream_window_bytes),
            queued: false,
            want_writable: false,
            readable_signalled: false,
        }
    }

    fn stream_mut(&mut self, id: u64) -> Result<&mut Stream, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::Closed);
        }
        self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))
    }

    /// Bytes `stream_write` would accept now.
    pub fn stream_capacity(&self, id: u64) -> usize {
        let Some(s) = self.streams.get(&id) else {
            return 0;
        };
        if s.send.fin_written || s.send.reset.is_some() || self.closed.is_some() {
            return 0;
        }
        let stream_room = self
            .config
            .stream_send_buffer_bytes
            .saturating_sub(s.send.buffered());
        let conn_room = (self.config.conn_window_bytes * 2).saturating_sub(self.conn_buffered);
        stream_room.min(conn_room) as usize
    }

    /// Bytes written to a stream and never sent yet (retransmissions not counted): what a
    /// sender that wants back-pressure at the WAN's drain rate keeps small.
    pub fn stream_unsent(&self, id: u64) -> u64 {
        self.streams
            .get(&id)
            .map_or(0, |s| s.send.written.saturating_sub(s.send.sent))
    }

    /// Queues data; returns how much was taken (0 = full: `Writable` follows when room frees).
    pub fn stream_write(&mut self, id: u64, data: &[u8]) -> Result<usize, StreamError> {
        let cap = self.stream_capacity(id);
        let s = self.stream_mut(id)?;
        if s.send.fin_written {
            return Err(StreamError::Finished(id));
        }
        let n = cap.min(data.len());
        if n < data.len() {
            s.want_writable = true;
        }
        if n > 0 {
            s.send.write(&data[..n]);
            self.conn_buffered += n as u64;
            self.enqueue(id);
        }
        Ok(n)
    }

    /// Half-closes the sending direction (TCP FIN).
    pub fn stream_finish(&mut self, id: u64) -> Result<(), StreamError> {
        let s = self.stream_mut(id)?;
        s.send.fin_written = true;
        self.enqueue(id);
        Ok(())
    }

    /// Aborts both directions (TCP RST); the stream's state is dropped.
    pub fn stream_reset(&mut self, id: u64, code: u64) -> Result<(), StreamError> {
        let s = self.streams.remove(&id).ok_or(StreamError::Unknown(id))?;
        self.conn_buffered -= s.send.buffered();
        self.recv_segments -= s.recv.pending_segments();
        self.pending_resets.push_back((id, code, s.send.written));
        Ok(())
    }

    /// Reads contiguous data. Returns (bytes, fin): fin is true once everything up to the
    /// peer's FIN has been read.
    pub fn stream_read(&mut self, id: u64, out: &mut [u8]) -> Result<(usize, bool), StreamError> {
        let window = self.config.stream_window_bytes;
        let s = self.stream_mut(id)?;
        if let Some(code) = s.recv.reset {
            return Err(StreamError::Reset(id, code));
        }
        let n = s.recv.read(out);
        let fin = s.recv.is_finished();
        if s.recv.readable_bytes() == 0 {
            s.readable_signalled = false;
        }
        if s.recv.fin_offset.is_none()
            && s.recv.read_offset + window - s.recv.max_advertised >= window / 4
        {
            s.recv.max_advertised = s.recv.read_offset + window;
            self.pending_max_stream_data.insert(id);
        }
        self.conn_consumed += n as u64;
        let cw = self.config.conn_window_bytes;
        if self.conn_consumed + cw - self.conn_max_advertised >= cw / 4 {
            self.conn_max_advertised = self.conn_consumed + cw;
            self.pending_max_data = true;
        }
        self.maybe_remove(id);
        Ok((n, fin))
    }

    pub fn stream_readable_bytes(&self, id: u64) -> usize {
        self.streams
            .get(&id)
            .map_or(0, |s| s.recv.readable_bytes() as usize)
    }

    fn maybe_remove(&mut self, id: u64) {
        if let Some(s) = self.streams.get(&id)
            && s.send.is_done()
            && (s.recv.is_finished() || s.recv.reset.is_some())
        {
            self.recv_segments -= s.recv.pending_segments();
            self.streams.remove(&id);
        }
    }

    fn enqueue(&mut self, id: u64) {
        if let Some(s) = self.streams.get_mut(&id)
            && !s.queued
            && s.send.has_pending()
        {
            s.queued = true;
            self.send_queue.push_back(id);
        }
    }

    /// Closes the connection; a CLOSE frame is sent once.
    pub fn close(&mut self, code: u64) {
        if self.closed.is_none() {
            self.close_pending = Some(code);
        }
    }

    // ------------------------------------------------------------------ receiving

    /// A data packet for this connection, not yet authenticated (header already parsed:
    /// `truncated_pn` is the packet number's low bits from a header of `header_len` bytes).
    /// Returns true if it authenticated under this connection's keys.
    pub fn handle_packet(
        &mut self,
        now_ns: u64,
        truncated_pn: u64,
        header_len: usize,
        ciphertext: &[u8],
    ) -> bool {
        if self.closed.is_some() || self.close_pending.is_some() {
            return false;
        }
        let expected = self.replay.highest().map_or(0, |h| h + 1);
        let pn = wire::expand_packet_number(
            truncated_pn,
            wire::packet_number_bits(header_len),
            expected,
        );
        if !self.replay.check(pn) {
            self.stats.duplicates += 1;
            return false;
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        if !self.open_packet(now_ns, pn, ciphertext, &mut plain) {
            self.stats.auth_failures += 1;
            self.plain = plain;
            return false;
        }
        self.replay.accept(pn);
        self.stats.packets_received += 1;
        self.stats.bytes_received += (ciphertext.len() + header_len) as u64;
        self.last_received_ns = now_ns;
        self.confirmed = true;
        if self.process_payload(now_ns, pn, &plain, false) {
            self.fec_dec.on_source(pn, &plain);
            // A late source can complete a block whose repairs came first.
            for (rpn, rpayload) in self.fec_dec.take_recovered() {
                self.on_recovered(now_ns, rpn, &rpayload);
            }
        }
        self.plain = plain;
        true
    }

    /// Opens a packet under the key its number and the key phases select (see [`KeyPhases`]).
    fn open_packet(&mut self, now_ns: u64, pn: u64, ciphertext: &[u8], out: &mut Vec<u8>) -> bool {
        let k = &mut self.keys;
        if let Some(prev) = &k.recv_prev
            && now_ns >= prev.expires_ns
        {
            k.recv_prev = None;
        }
        let before_switch = match &k.recv_prev {
            Some(prev) => pn < prev.switch_pn,
            None => false,
        };
        if before_switch {
            let prev = k.recv_prev.as_ref().expect("checked");
            if prev.key.open(pn, ciphertext, out).is_ok() {
                self.stats.old_key_packets += 1;
                return true;
            }
            // Reordered packets of the current key may come from below the switch too.
            return k.recv.open(pn, ciphertext, out).is_ok();
        }
        if k.recv.open(pn, ciphertext, out).is_ok() {
            return true;
        }
        if self.replay.highest().is_some_and(|h| pn <= h) {
            // Not after everything received: not the first packet of a key update, but
            // perhaps a late packet of a key whose grace time is over.
            if k.recv_prev.is_none() && k.recv_updates > 0 && pn < k.recv_switch_pn {
                self.stats.old_key_rejected += 1;
            }
            return false;
        }
        if k.recv_next.open(pn, ciphertext, out).is_err() {
            return false;
        }
        let next_next = k.recv_next.next();
        let current =
            std::mem::replace(&mut k.recv, std::mem::replace(&mut k.recv_next, next_next));
        k.recv_prev = Some(PreviousKey {
            key: current,
            switch_pn: pn,
            expires_ns: now_ns + self.config.old_key_grace_us * 1000,
        });
        k.recv_updates += 1;
        k.recv_switch_pn = pn;
        self.stats.key_updates_received += 1;
        true
    }

    /// Moves to the next send key when it is time and the peer has confirmed the current one
    /// (acknowledged a packet sent under it).
    fn maybe_update_send_key(&mut self, now_ns: u64) {
        let k = &mut self.keys;
        let due = k.send_packets >= self.config.rekey_after_packets
            || now_ns >= k.send_since_ns + self.config.rekey_after_us * 1000;
        let confirmed = self.largest_acked.is_some_and(|l| l >= k.send_first_pn);
        if due && confirmed {
            k.send = k.send.next();
            k.send_first_pn = self.next_pn;
            k.send_since_ns = now_ns;
            k.send_packets = 0;
            k.exhausted_counted = false;
            self.stats.key_updates_sent += 1;
        }
    }

    /// True when the send key may not protect another packet.
    fn send_key_exhausted(&mut self) -> bool {
        let exhausted = self.keys.send_packets >= self.config.key_packet_limit;
        if exhausted && !self.keys.exhausted_counted {
            self.keys.exhausted_counted = true;
            self.stats.key_exhausted_stalls += 1;
        }
        exhausted
    }

    /// Returns true if the payload was valid.
    fn process_payload(&mut self, now_ns: u64, pn: u64, payload: &[u8], recovered: bool) -> bool {
        if self.received.contains(pn) {
            self.stats.duplicates += 1;
            return false;
        }
        let frames = match wire::decode_frames(payload) {
            Ok(f) => f,
            Err(_) => {
                self.stats.malformed += 1;
                return false;
            }
        };
        let mut ack_eliciting = false;
        let mut repairs = Vec::new();
        for frame in frames {
            match frame {
                Frame::Padding => {}
                Frame::Ping => ack_eliciting = true,
                Frame::Ack {
                    ack_delay_us,
                    recovered_total,
                    ranges,
                } => self.on_ack_frame(now_ns, ack_delay_us, recovered_total, &ranges),
                Frame::Stream {
                    id,
                    offset,
                    fin,
                    data,
                } => {
                    ack_eliciting = true;
                    self.on_stream_frame(id, offset, None, fin, data);
                }
                Frame::StreamEnd {
                    id,
                    offset,
                    offset_len,
                    fin,
                    data,
                } => {
                    ack_eliciting = true;
                    self.on_stream_frame(id, offset, Some(offset_len), fin, data);
                }
                Frame::ResetStream { id, code, .. } => {
                    ack_eliciting = true;
                    self.on_reset_frame(id, code);
                }
                Frame::MaxStreamData { id, max } => {
                    ack_eliciting = true;
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.send.max_data = s.send.max_data.max(max);
                    }
                    self.enqueue(id);
                }
                Frame::MaxData { max } => {
                    ack_eliciting = true;
                    if max > self.peer_max_data {
                        self.peer_max_data = max;
                        let ids: Vec<u64> = self.streams.keys().copied().collect();
                        for id in ids {
                            self.enqueue(id);
                        }
                    }
                }
                Frame::Repair { symbol } => {
                    if !recovered {
                        repairs.push(symbol.to_vec());
                    }
                }
                Frame::Close { code } => {
                    self.closed = Some(code);
                    self.events.push_back(Event::Closed { code });
                    return true;
                }
            }
            if self.closed.is_some() {
                return true;
            }
            if self.close_pending.is_some() {
                // A protocol error: nothing after it in the packet is processed.
                return false;
            }
        }
        let is_new_gap = self.largest_received.is_some_and(|l| pn > l + 1);
        let is_late = self.largest_received.is_some_and(|l| pn < l);
        self.received.insert(pn..pn + 1);
        self.received.keep_highest(4 * MAX_ACK_RANGES);
        self.largest_received = Some(self.largest_received.map_or(pn, |l| l.max(pn)));
        self.ack_needed = true;
        if ack_eliciting {
            self.ack_pending += 1;
            if self.ack_pending >= self.config.ack_every || is_new_gap || is_late {
                self.ack_immediate = true;
            } else if self.ack_deadline_ns.is_none() {
                let delay = (self.config.max_ack_delay_us * 1000)
                    .min(self.srtt_ns / 8)
                    .max(200_000);
                self.ack_deadline_ns = Some(now_ns + delay);
            }
        }
        for symbol in repairs {
            let Ok(sym) = RepairSymbol::decode(&symbol) else {
                self.stats.malformed += 1;
                continue;
            };
            for (rpn, rpayload) in self.fec_dec.on_repair(sym) {
                self.on_recovered(now_ns, rpn, &rpayload);
            }
        }
        true
    }

    fn on_recovered(&mut self, now_ns: u64, pn: u64, payload: &[u8]) {
        if !self.received.contains(pn) && self.replay.accept(pn) {
            self.recovered_total += 1;
            self.process_payload(now_ns, pn, payload, true);
        }
    }

    /// `offset_len`: the frame carried only the offset's low bytes (STREAM_END), to expand
    /// against the highest offset received on the stream.
    fn on_stream_frame(
        &mut self,
        id: u64,
        offset: u64,
        offset_len: Option<usize>,
        fin: bool,
        data: &[u8],
    ) {
        let local = (id & 1) == u64::from(!self.is_initiator);
        if !self.streams.contains_key(&id) {
            if local || id < self.next_remote_id {
                return; // closed stream: late or duplicate data
            }
            if !self.open_remote_up_to(id) || !self.streams.contains_key(&id) {
                return;
            }
        }
        let s = self.streams.get_mut(&id).expect("checked");
        let offset = offset_len.map_or(offset, |k| {
            wire::expand_stream_offset(offset, k, s.recv.highest)
        });
        let end = offset.saturating_add(data.len() as u64);
        if end > s.recv.max_advertised {
            self.stats.malformed += 1;
            self.close(CLOSE_PROTOCOL);
            return;
        }
        let before = s.recv.highest;
        let segments_before = s.recv.pending_segments();
        match s.recv.on_data(offset, data, fin) {
            Ok(readable) => {
                self.conn_received += s.recv.highest - before;
                self.recv_segments =
                    self.recv_segments + s.recv.pending_segments() - segments_before;
                if self.recv_segments > MAX_CONN_RECV_SEGMENTS {
                    // One frame past the bound: the connection closes before another arrives.
                    self.stats.reassembly_limit_hits += 1;
                    self.protocol_error();
                    return;
                }
                if readable && !s.readable_signalled {
                    s.readable_signalled = true;
                    self.events.push_back(Event::Readable(id));
                }
            }
            Err(RecvError::TooManySegments) => {
                self.stats.reassembly_limit_hits += 1;
                self.protocol_error();
            }
            Err(RecvError::FinalSize) => {
                self.stats.malformed += 1;
                self.protocol_error();
            }
        }
        if self.conn_received > self.conn_max_advertised {
            self.protocol_error();
        }
    }

    /// Opens every peer stream id up to `id` (lower ones may still arrive); refuses beyond
    /// the stream limit.
    ///
    /// The peer never has more than `max_streams` streams open, so a frame naming an id more
    /// than `max_streams` unopened ids ahead is a protocol violation: the connection is closed
    /// with [`CLOSE_PROTOCOL`] and false returned, before any per-id work (an id of 2^61
    /// would otherwise loop 2^60 times).
    fn open_remote_up_to(&mut self, id: u64) -> bool {
        let new_ids = id.saturating_sub(self.next_remote_id) / 2 + 1;
        if new_ids > self.config.max_streams as u64 {
            self.stats.stream_id_violations += 1;
            self.protocol_error();
            return false;
        }
        while self.next_remote_id <= id {
            let nid = self.next_remote_id;
            self.next_remote_id += 2;
            if self.streams.len() >= self.config.max_streams {
                if self.pending_resets.len() >= MAX_PENDING_RESETS {
                    self.protocol_error();
                    return false;
                }
                self.pending_resets.push_back((nid, RESET_REFUSED, 0));
                continue;
            }
            self.streams.insert(nid, self.new_stream());
            self.events.push_back(Event::StreamOpened(nid));
        }
        true
    }

    /// Closes the connection because the peer broke the protocol.
    fn protocol_error(&mut self) {
        self.stats.protocol_errors += 1;
        self.close(CLOSE_PROTOCOL);
    }

    fn on_reset_frame(&mut self, id: u64, code: u64) {
        let local = (id & 1) == u64::from(!self.is_initiator);
        if !local && id >= self.next_remote_id {
            // Reset of a stream whose data never arrived: open it (and lower ids), then reset.
            if !self.open_remote_up_to(id) {
                return;
            }
        }
        if let Some(s) = self.streams.remove(&id) {
            self.conn_buffered -= s.send.buffered();
            self.recv_segments -= s.recv.pending_segments();
            self.events.push_back(Event::StreamReset { id, code });
        }
    }

    fn on_ack_frame(&mut self, now_ns: u64, ack_delay_us: u64, recovered: u64, ranges: &[PnRange]) {
        if recovered > self.peer_recovered_total {
            self.loss_window_lost += recovered - self.peer_recovered_total;
            self.peer_recovered_total = recovered;
        }
        let Some(largest) = ranges.first().map(|r| r.end) else {
            return;
        };
        if largest >= self.next_pn {
            // An acknowledgement of a packet never sent: it would confirm key updates and
            // declare real packets lost (RFC 9000 §13.1: PROTOCOL_VIOLATION).
            self.stats.acks_of_unsent += 1;
            self.protocol_error();
            return;
        }
        let mut newly: Vec<(u64, SentPacket)> = Vec::new();
        for r in ranges {
            let pns: Vec<u64> = self
                .sent
                .range(r.start..=r.end)
                .map(|(&pn, _)| pn)
                .collect();
            for pn in pns {
                let p = self.remove_sent(pn).expect("present");
                newly.push((pn, p));
            }
        }
        if newly.is_empty() {
            return;
        }
        self.largest_acked = Some(self.largest_acked.map_or(largest, |l| l.max(largest)));
        // RTT from the largest newly acknowledged packet, if it is the ACK's largest.
        if let Some((pn, p)) = newly.iter().max_by_key(|(pn, _)| *pn)
            && *pn == largest
        {
            let mut rtt = now_ns.saturating_sub(p.time_ns);
            self.cc.on_rtt_sample(now_ns, rtt);
            let min_rtt = self.cc.min_rtt_ns().unwrap_or(rtt);
            let delay = ack_delay_us * 1000;
            if rtt >= min_rtt + delay {
                rtt -= delay;
            }
            self.latest_rtt_ns = rtt;
            if !self.has_rtt {
                self.srtt_ns = rtt;
                self.rttvar_ns = rtt / 2;
                self.has_rtt = true;
            } else {
                let diff = self.srtt_ns.abs_diff(rtt);
                self.rttvar_ns = (3 * self.rttvar_ns + diff) / 4;
                self.srtt_ns = (7 * self.srtt_ns + rtt) / 8;
            }
        }
        let mut acked = 0;
        for (pn, p) in newly {
            acked += u64::from(p.size);
            self.bytes_in_flight -= u64::from(p.size);
            self.cc
                .on_ack(now_ns, &p.snap, p.time_ns, u64::from(p.size));
            if p.mtu_probe {
                self.on_mtu_probe_acked(pn);
            }
            for f in p.frames {
                self.on_frame_acked(f);
            }
        }
        self.cc.on_ack_event(now_ns, acked);
        self.pto_count = 0;
        self.detect_losses(now_ns);
        self.cc.update_mode(now_ns, self.bytes_in_flight);
    }

    fn on_frame_acked(&mut self, f: SentFrame) {
        if let SentFrame::Stream {
            id,
            offset,
            len,
            fin,
        } = f
            && let Some(s) = self.streams.get_mut(&id)
        {
            let freed = s.send.on_acked(offset..offset + u64::from(len), fin);
            self.conn_buffered -= freed;
            if freed > 0 && s.want_writable {
                s.want_writable = false;
                self.events.push_back(Event::Writable(id));
            }
            self.maybe_remove(id);
        }
    }

    fn on_frame_lost(&mut self, f: SentFrame) {
        match f {
            SentFrame::Stream {
                id,
                offset,
                len,
                fin,
            } => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.send.on_lost(offset..offset + u64::from(len), fin);
                    self.stats.stream_bytes_retransmitted += u64::from(len);
                    self.enqueue(id);
                }
            }
            SentFrame::Reset {
                id,
                code,
                final_size,
            } => self.pending_resets.push_back((id, code, final_size)),
            SentFrame::MaxStreamData(id) => {
                if self.streams.contains_key(&id) {
                    self.pending_max_stream_data.insert(id);
                }
            }
            SentFrame::MaxData => self.pending_max_data = true,
            SentFrame::Close => {
                if let Some(code) = self.closed {
                    self.close_pending = Some(code);
                }
            }
        }
    }

    fn fec_span(&self) -> u64 {
        if self.fec_active() {
            (fec::MAX_BLOCK_SOURCES + fec::MAX_BLOCK_REPAIRS) as u64
        } else {
            0
        }
    }

    /// FEC runs only where it can beat a retransmission: a block is open for at least 2 ms
    /// and loss detection waits two block durations for repairs, so below a 4 ms path RTT a
    /// retransmission arrives before a repair would, and repairs only cost bandwidth.
    fn fec_active(&self) -> bool {
        self.config.fec
            && self.loss_estimate > 1e-5
            && self
                .cc
                .min_rtt_ns()
                .is_some_and(|rtt| rtt >= FEC_MIN_RTT_NS)
    }

    fn loss_delay_ns(&self) -> u64 {
        let base = self.srtt_ns.max(self.latest_rtt_ns) * 9 / 8;
        let fec_extra = if self.fec_active() {
            self.fec_block_duration_ns() * 2
        } else {
            0
        };
        base.max(1_000_000) + fec_extra
    }

    fn fec_block_duration_ns(&self) -> u64 {
        (self.srtt_ns / 4).clamp(2_000_000, 10_000_000)
    }

    fn detect_losses(&mut self, now_ns: u64) {
        let Some(largest) = self.largest_acked else {
            return;
        };
        let threshold = 3 + self.fec_span();
        let delay = self.loss_delay_ns();
        self.loss_time_ns = None;
        let mut lost = Vec::new();
        for (&pn, p) in self.sent.range(..largest) {
            if largest - pn >= threshold || p.time_ns + delay <= now_ns {
                lost.push(pn);
            } else {
                self.loss_time_ns = Some(p.time_ns + delay);
                break;
            }
        }
        for pn in lost {
            self.declare_lost(pn);
        }
    }

    fn remove_sent(&mut self, pn: u64) -> Option<SentPacket> {
        let p = self.sent.remove(&pn)?;
        if p.ack_eliciting {
            self.ack_eliciting_in_flight -= 1;
        }
        Some(p)
    }

    fn declare_lost(&mut self, pn: u64) {
        let Some(p) = self.remove_sent(pn) else {
            return;
        };
        self.bytes_in_flight -= u64::from(p.size);
        if p.mtu_probe {
            self.on_mtu_probe_lost(pn);
        } else if !p.repair {
            self.stats.packets_lost += 1;
            if pn >= self.loss_window_first_pn {
                self.loss_window_lost += 1;
            }
            self.cc.on_lost(u64::from(p.size));
        }
        for f in p.frames {
            self.on_frame_lost(f);
        }
    }

    fn on_mtu_probe_acked(&mut self, pn: u64) {
        if let Some((probe_pn, size)) = self.mtu_probe
            && probe_pn == pn
        {
            self.udp_payload = size;
            self.cc.set_mtu(size);
            self.mtu_probe = None;
            self.mtu_probe_done = true;
        }
    }

    fn on_mtu_probe_lost(&mut self, pn: u64) {
        if let Some((probe_pn, size)) = self.mtu_probe
            && probe_pn == pn
        {
            self.mtu_probe = None;
            // Try a smaller size next; give up at the minimum.
            let next = size.saturating_sub(64);
            if next <= self.udp_payload {
                self.mtu_probe_done = true;
            } else {
                self.config.max_udp_payload = next;
            }
        }
    }

    // ------------------------------------------------------------------ timers

    pub fn poll_timeout(&self) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        let mut t = self.last_received_ns + self.config.idle_timeout_us * 1000;
        let mut min = |x: Option<u64>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        min(self.ack_deadline_ns);
        min(self.loss_time_ns);
        if self.ack_eliciting_in_flight > 0 {
            min(Some(self.pto_deadline()));
        }
        if self.has_sendable() {
            min(Some(self.next_send_ns));
        }
        if self.fec_enc.open_len() > 0 {
            min(Some(self.fec_block_start_ns + self.fec_block_duration_ns()));
        }
        if self.confirmed && self.keys.send_packets < self.config.key_packet_limit {
            min(Some(
                self.last_sent_ns.max(self.last_received_ns) + self.config.keepalive_us * 1000,
            ));
        }
        Some(t)
    }

    fn pto_deadline(&self) -> u64 {
        let pto = self.srtt_ns
            + (4 * self.rttvar_ns).max(1_000_000)
            + self.config.max_ack_delay_us * 1000
            + if self.fec_active() {
                self.fec_block_duration_ns()
            } else {
                0
            };
        self.last_ack_eliciting_ns + (pto << self.pto_count.min(6))
    }

    pub fn handle_timeout(&mut self, now_ns: u64) {
        if self.closed.is_some() {
            return;
        }
        if now_ns >= self.last_received_ns + self.config.idle_timeout_us * 1000 {
            self.closed = Some(CLOSE_IDLE);
            self.events.push_back(Event::Closed { code: CLOSE_IDLE });
            return;
        }
        if self.ack_deadline_ns.is_some_and(|d| now_ns >= d) {
            self.ack_immediate = true;
            self.ack_deadline_ns = None;
        }
        if self.loss_time_ns.is_some_and(|t| now_ns >= t) {
            self.detect_losses(now_ns);
        }
        if self.ack_eliciting_in_flight > 0 && now_ns >= self.pto_deadline() {
            self.pto_count += 1;
            self.last_ack_eliciting_ns = now_ns;
            // Probe: resend the oldest outstanding data.
            let oldest: Vec<u64> = self
                .sent
                .iter()
                .filter(|(_, p)| p.ack_eliciting)
                .map(|(&pn, _)| pn)
                .take(2)
                .collect();
            for pn in oldest {
                self.declare_lost(pn);
            }
            self.ping_pending = true;
        }
        if self.fec_enc.open_len() > 0
            && now_ns >= self.fec_block_start_ns + self.fec_block_duration_ns()
        {
            self.finish_fec_block();
        }
        if self.confirmed
            && now_ns
                >= self.last_sent_ns.max(self.last_received_ns) + self.config.keepalive_us * 1000
        {
            self.ping_pending = true;
        }
    }

    // ------------------------------------------------------------------ sending

    fn has_stream_data(&self) -> bool {
        !self.send_queue.is_empty()
    }

    fn has_control(&self) -> bool {
        self.ping_pending
            || self.pending_max_data
            || !self.pending_max_stream_data.is_empty()
            || !self.pending_resets.is_empty()
            || self.close_pending.is_some()
    }

    fn has_sendable(&self) -> bool {
        self.confirmed
            && self.keys.send_packets < self.config.key_packet_limit
            && (!self.repairs.is_empty()
                || self.has_control()
                || (self.has_stream_data() && self.bytes_in_flight < self.cc.cwnd()))
    }

    /// Plaintext room of a data packet. The FEC reserve is kept only while FEC protects
    /// packets: a packet built while FEC is off is never protected (`protect` below reads the
    /// same `fec_active()` in the same call), and on loss-free paths 24 bytes of each ~1.4 KB
    /// packet are 1.7 % of the goodput.
    fn max_plain(&self) -> usize {
        let reserve = if self.fec_active() { FEC_RESERVE } else { 0 };
        self.udp_payload - self.next_header_len() - TAG_LEN - reserve
    }

    /// Header length of the next packet: its packet number's length follows the largest
    /// acknowledged one (see `wire::data_header_len`; FEC_RESERVE leaves 5 bytes to spare, so
    /// a repair whose header is up to 3 bytes longer than its sources' still fits).
    fn next_header_len(&self) -> usize {
        wire::data_header_len(self.next_pn, self.largest_acked)
    }

    /// Most stream bytes the packets sent after one packet can deliver before the peer's
    /// replay window refuses that packet: REPLAY_WINDOW datagrams of the largest size this
    /// connection can still send (the path-MTU probe only ever lowers that size).
    fn late_span(&self) -> u64 {
        REPLAY_WINDOW * self.config.max_udp_payload.max(self.udp_payload) as u64
    }

    fn finish_fec_block(&mut self) {
        let k = self.fec_enc.open_len();
        let r = if self.fec_active() {
            // Loss above a few percent is congestion, which more repair traffic would worsen.
            fec::repair_count(
                k,
                self.loss_estimate.min(0.02),
                self.config.fec_target_failure,
            )
        } else {
            0
        };
        self.repairs.extend(self.fec_enc.finish_block(r));
    }

    fn update_loss_estimate(&mut self) {
        if self.cc.mode() != crate::cc::Mode::ProbeBw {
            // Startup overfills the queue on purpose: those losses are congestion, not the
            // path's background loss that FEC should cover. Windows start in ProbeBw.
            self.loss_window_sent = 0;
            self.loss_window_lost = 0;
            self.loss_window_first_pn = self.next_pn;
            return;
        }
        if self.loss_window_sent >= 2000 {
            // The background (random) loss is the floor under congestion episodes: take the
            // minimum over the last windows.
            let sample = self.loss_window_lost as f64 / self.loss_window_sent as f64;
            self.loss_samples[self.loss_sample_index % LOSS_SAMPLES] = sample;
            self.loss_sample_index += 1;
            let n = self.loss_sample_index.min(LOSS_SAMPLES);
            self.loss_estimate = self.loss_samples[..n].iter().copied().fold(1.0, f64::min);
            self.loss_window_sent = 0;
            self.loss_window_lost = 0;
        }
    }

    /// Appends one datagram to `out` if something should be sent now. Call until it returns
    /// false; then wait until `poll_timeout()` or new input.
    pub fn poll_transmit(&mut self, now_ns: u64, out: &mut Vec<u8>) -> bool {
        if self.closed.is_some() && self.close_pending.is_none() {
            return false;
        }
        self.maybe_update_send_key(now_ns);
        if self.send_key_exhausted() {
            return false;
        }
        let ack_due = self.ack_immediate
            || (self.ack_pending > 0 && self.ack_deadline_ns.is_some_and(|d| now_ns >= d));
        // Pacing: allow a small catch-up burst to absorb timer and scheduling lateness (the
        // node shares 2 cores with the applications it serves; slots it missed while
        // descheduled for a millisecond would otherwise be lost and read as a slower path).
        let interval_ns = |bytes: usize, rate: f64| (bytes as f64 * 1e9 / rate) as u64;
        let rate = self.cc.pacing_rate();
        let burst_ns = interval_ns(PACING_CATCH_UP_PACKETS * self.udp_payload, rate)
            .clamp(PACING_CATCH_UP_MIN_NS, 2_000_000);
        let horizon_ns =
            PACING_HORIZON_NS.max(PACING_HORIZON_PACKETS * interval_ns(self.udp_payload, rate));
        let paced_ok = now_ns + horizon_ns >= self.next_send_ns;
        if self.close_pending.is_some() {
            return self.send_close(now_ns, out);
        }
        if paced_ok
            && self.confirmed
            && let Some(sym) = self.repairs.pop_front()
        {
            let mut buf = std::mem::take(&mut self.frame_buf);
            buf.clear();
            sym.encode(&mut buf);
            let mut plain = std::mem::take(&mut self.plain);
            plain.clear();
            Frame::Repair { symbol: &buf }.encode(&mut plain);
            self.frame_buf = buf;
            self.seal_and_record(now_ns, plain, Vec::new(), false, true, false, out);
            self.stats.fec_repairs_sent += 1;
            self.advance_pacer(now_ns, burst_ns, rate);
            return true;
        }
        let cwnd_ok = self.bytes_in_flight < self.cc.cwnd();
        let data_ok = self.confirmed
            && paced_ok
            && (self.has_control() || (cwnd_ok && self.has_stream_data()));
        let probe_ok = self.confirmed
            && paced_ok
            && cwnd_ok
            && !self.mtu_probe_done
            && self.mtu_probe.is_none()
            && self.has_rtt;
        if !data_ok && !ack_due && !probe_ok {
            if self.confirmed && cwnd_ok && paced_ok && !self.has_stream_data() {
                self.cc.on_app_limited(self.bytes_in_flight);
                if self.fec_enc.open_len() > 0 {
                    self.finish_fec_block();
                    if !self.repairs.is_empty() {
                        return self.poll_transmit(now_ns, out);
                    }
                }
            }
            return false;
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let mut frames = Vec::new();
        let limit = if probe_ok && !data_ok {
            self.config.max_udp_payload - self.next_header_len() - TAG_LEN
        } else {
            self.max_plain()
        };
        if self.ack_needed && self.largest_received.is_some() {
            self.write_ack(now_ns, &mut plain);
        }
        let mut ack_eliciting = false;
        if data_ok {
            ack_eliciting |= self.write_control(&mut plain, &mut frames, limit);
            if cwnd_ok {
                ack_eliciting |= self.write_stream_frames(&mut plain, &mut frames, limit);
            }
        }
        let mut mtu_probe = false;
        if probe_ok && !data_ok {
            Frame::Ping.encode(&mut plain);
            plain.resize(limit, 0); // PADDING
            ack_eliciting = true;
            mtu_probe = true;
        }
        if plain.is_empty() {
            self.plain = plain;
            return false;
        }
        if ack_eliciting {
            self.advance_pacer(now_ns, burst_ns, rate);
        }
        // ACK-only packets are protected too, so they do not break the run of a block.
        // A block starts only after the previous block's repairs are out (they take packet
        // numbers, and a block covers consecutive ones).
        let protect = !mtu_probe
            && self.fec_active()
            && (self.fec_enc.open_len() > 0 || self.repairs.is_empty());
        let pn = self.next_pn;
        if mtu_probe {
            self.mtu_probe = Some((pn, self.config.max_udp_payload));
        }
        self.seal_and_record(now_ns, plain, frames, ack_eliciting, false, mtu_probe, out);
        if protect {
            if self.fec_enc.open_len() > 0 && self.fec_enc.next_pn() != Some(pn) {
                // An unprotected packet (ACK, repair) broke the run: close with our count.
                self.finish_fec_block();
            }
            if self.fec_enc.open_len() == 0 {
                self.fec_block_start_ns = now_ns;
            }
            self.fec_enc.push(pn, &self.plain);
            let k_target = ((rate * self.fec_block_duration_ns() as f64 / 1e9)
                / self.udp_payload as f64) as usize;
            if self.fec_enc.open_len() >= k_target.clamp(8, fec::MAX_BLOCK_SOURCES) {
                self.finish_fec_block();
            }
        } else if self.fec_enc.open_len() > 0 {
            self.finish_fec_block();
        }
        true
    }

    fn advance_pacer(&mut self, now_ns: u64, burst_ns: u64, rate: f64) {
        let base = self.next_send_ns.max(now_ns.saturating_sub(burst_ns));
        self.next_send_ns = base + (self.udp_payload as f64 * 1e9 / rate) as u64;
    }

    fn write_ack(&mut self, _now_ns: u64, plain: &mut Vec<u8>) {
        let ranges: Vec<PnRange> = self
            .received
            .iter_rev()
            .take(MAX_ACK_RANGES)
            .map(|r| PnRange {
                start: r.start,
                end: r.end - 1,
            })
            .collect();
        Frame::Ack {
            ack_delay_us: 0,
            recovered_total: self.recovered_total,
            ranges,
        }
        .encode(plain);
        self.ack_pending = 0;
        self.ack_immediate = false;
        self.ack_deadline_ns = None;
        self.ack_needed = false;
    }

    fn write_control(
        &mut self,
        plain: &mut Vec<u8>,
        frames: &mut Vec<SentFrame>,
        limit: usize,
    ) -> bool {
        let mut any = false;
        if self.ping_pending {
            Frame::Ping.encode(plain);
            self.ping_pending = false;
            any = true;
        }
        while plain.len() + 32 < limit
            && let Some((id, code, final_size)) = self.pending_resets.pop_front()
        {
            Frame::ResetStream {
                id,
                code,
                final_size,
            }
            .encode(plain);
            frames.push(SentFrame::Reset {
                id,
                code,
                final_size,
            });
            any = true;
        }
        if self.pending_max_data && plain.len() + 16 < limit {
            Frame::MaxData {
                max: self.conn_max_advertised,
            }
            .encode(plain);
            frames.push(SentFrame::MaxData);
            self.pending_max_data = false;
            any = true;
        }
        while plain.len() + 24 < limit
            && let Some(id) = self.pending_max_stream_data.pop_first()
        {
            if let Some(s) = self.streams.get(&id) {
                Frame::MaxStreamData {
                    id,
                    max: s.recv.max_advertised,
                }
                .encode(plain);
                frames.push(SentFrame::MaxStreamData(id));
                any = true;
            }
        }
        any
    }

    fn write_stream_frames(
        &mut self,
        plain: &mut Vec<u8>,
        frames: &mut Vec<SentFrame>,
        limit: usize,
    ) -> bool {
        let mut any = false;
        let late_span = self.late_span();
        let mut data = std::mem::take(&mut self.frame_buf);
        while let Some(&id) = self.send_queue.front() {
            let room = limit.saturating_sub(plain.len());
            if room < 24 {
                break;
            }
            self.send_queue.pop_front();
            let conn_room = self.peer_max_data.saturating_sub(self.conn_sent);
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.queued = false;
            // A STREAM_END's truncated offset must reach from the frame's offset (in
            // [unacked_start, sent]) to the receiver's highest received offset when the frame
            // arrives: at least unacked_start, at most sent plus what the packets sent after
            // this one carry before the replay window refuses it (`late_span`). A span past
            // 2^31 leaves only STREAM frames, whose header is no longer than `hdr` below.
            let offset_len = wire::stream_offset_len(
                s.send.sent.saturating_sub(s.send.unacked_start()) + late_span,
            );
            let hdr = match offset_len {
                Some(k) => wire::stream_end_header_len(id, k),
                None => wire::stream_header_len(id, s.send.written, MAX_FRAME_DATA),
            };
            let max_len = room.saturating_sub(hdr) as u64;
            data.clear();
            let (offset, len, fin, new_bytes) = if let Some(r) =
                s.send.retransmit.pop_front(max_len)
            {
                let len = r.end - r.start;
                s.send.copy_range(r.start, len as usize, &mut data);
                let fin =
                    s.send.fin_written && r.end == s.send.written && s.send.sent == s.send.written;
                (r.start, len, fin, 0)
            } else {
                let avail = (s.send.written - s.send.sent)
                    .min(s.send.max_data.saturating_sub(s.send.sent))
                    .min(conn_room)
                    .min(max_len);
                let offset = s.send.sent;
                s.send.copy_range(offset, avail as usize, &mut data);
                s.send.sent += avail;
                let fin = s.send.fin_written && s.send.sent == s.send.written;
                (offset, avail, fin, avail)
            };
            if len == 0 && (!fin || s.send.fin_sent) {
                // Flow-control blocked (the peer's window update re-queues the stream).
                continue;
            }
            if fin {
                s.send.fin_sent = true;
            }
            self.conn_sent += new_bytes;
            self.stats.stream_bytes_sent += len;
            // A frame after which no other fits (24 bytes) ends the packet and needs no
            // length; one whose length would not fit is a STREAM_END too.
            let with_len = wire::stream_header_len(id, offset, data.len()) + data.len();
            let ends_packet = room < with_len + 24;
            if let (true, Some(offset_len)) = (ends_packet, offset_len) {
                Frame::StreamEnd {
                    id,
                    offset,
                    offset_len,
                    fin,
                    data: &data,
                }
                .encode(plain);
            } else {
                Frame::Stream {
                    id,
                    offset,
                    fin,
                    data: &data,
                }
                .encode(plain);
            }
            frames.push(SentFrame::Stream {
                id,
                offset,
                len: len as u32,
                fin,
            });
            any = true;
            if s.send.has_pending() {
                s.queued = true;
                self.send_queue.push_back(id);
            }
            if ends_packet {
                break;
            }
        }
        self.frame_buf = data;
        any
    }

    fn send_close(&mut self, now_ns: u64, out: &mut Vec<u8>) -> bool {
        let code = self.close_pending.take().unwrap_or(CLOSE_NORMAL);
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        Frame::Close { code }.encode(&mut plain);
        self.seal_and_record(
            now_ns,
            plain,
            vec![SentFrame::Close],
            true,
            false,
            false,
            out,
        );
        if self.closed.is_none() {
            self.closed = Some(code);
            self.events.push_back(Event::Closed { code });
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn seal_and_record(
        &mut self,
        now_ns: u64,
        plain: Vec<u8>,
        frames: Vec<SentFrame>,
        ack_eliciting: bool,
        repair: bool,
        mtu_probe: bool,
        out: &mut Vec<u8>,
    ) {
        self.maybe_update_send_key(now_ns);
        let pn = self.next_pn;
        let header_len = self.next_header_len();
        self.next_pn += 1;
        let start = out.len();
        wire::put_data_header(out, pn, header_len);
        self.keys
            .send
            .seal(pn, &plain, out)
            .expect("sealing with a valid key cannot fail");
        self.keys.send_packets += 1;
        let size = (out.len() - start) as u32;
        self.plain = plain;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += u64::from(size);
        self.last_sent_ns = now_ns;
        let in_flight = ack_eliciting || repair;
        if in_flight {
            if self.send_queue.is_empty() && self.repairs.is_empty() {
                // Nothing queued behind this packet: its rate sample measures the
                // application, not the path.
                self.cc
                    .on_app_limited(self.bytes_in_flight + u64::from(size));
            }
            let snap = self.cc.on_sent(now_ns, self.bytes_in_flight);
            if ack_eliciting {
                self.last_ack_eliciting_ns = now_ns;
                self.ack_eliciting_in_flight += 1;
            }
            if !repair && !mtu_probe {
                self.loss_window_sent += 1;
                self.update_loss_estimate();
            }
            self.bytes_in_flight += u64::from(size);
            self.sent.insert(
                pn,
                SentPacket {
                    time_ns: now_ns,
                    size,
                    ack_eliciting,
                    repair,
                    mtu_probe,
                    snap,
                    frames,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, InitiatorHandshake, StaticKeypair};

    /// Keys of both ends of one session: (initiator's, responder's).
    fn session_keys() -> (PacketKeys, PacketKeys) {
        let ka = StaticKeypair::from_seed(1);
        let kb = StaticKeypair::from_seed(2);
        let (hs, m1) = InitiatorHandshake::start(&ka, &kb.public, b"", Some(3)).unwrap();
        let accepted = crypto::accept_initiation(&kb, &m1, Some(4)).unwrap();
        let (m2, keys_b) = accepted.respond(b"").unwrap();
        let (_, keys_a) = hs.finish(&m2).unwrap();
        (keys_a, keys_b)
    }

    /// A responder-side connection and the initiator's keys, to forge packets the responder
    /// authenticates (an authenticated but hostile peer).
    struct Harness {
        conn: Connection,
        peer_keys: PacketKeys,
        next_pn: u64,
    }

    impl Harness {
        fn new(config: Config) -> Self {
            let (keys_a, keys_b) = session_keys();
            Harness {
                conn: Connection::new(config, keys_b, false, 0),
                peer_keys: keys_a,
                next_pn: 0,
            }
        }

        fn send_frames(&mut self, now_ns: u64, frames: &[Frame<'_>]) {
            let mut plain = Vec::new();
            for f in frames {
                f.encode(&mut plain);
            }
            let pn = self.next_pn;
            self.next_pn += 1;
            let mut ct = Vec::new();
            self.peer_keys.seal(pn, &plain, &mut ct).unwrap();
            // 4-byte header: 29 bits of packet number.
            self.conn
                .handle_packet(now_ns, pn & ((1 << 29) - 1), 4, &ct);
        }

        /// Drives transmits until the connection reports its close; returns the code.
        fn closed_code(&mut self, now_ns: u64) -> Option<u64> {
            let mut out = Vec::new();
            for _ in 0..64 {
                out.clear();
                if !self.conn.poll_transmit(now_ns, &mut out) {
                    break;
                }
            }
            std::iter::from_fn(|| self.conn.poll_event()).find_map(|e| match e {
                Event::Closed { code } => Some(code),
                _ => None,
            })
        }
    }

    /// Regression (issue 25, defect 9): a STREAM frame with id 2^61 made the receiver open
    /// every id below it one by one (2^60 iterations: the node hung). It is now a protocol
    /// error, found before any per-id work.
    #[test]
    fn stream_id_far_beyond_the_limit_closes_the_connection() {
        let mut h = Harness::new(Config::default());
        h.send_frames(
            1,
            &[Frame::Stream {
                id: 1 << 61,
                offset: 0,
                fin: false,
                data: b"x",
            }],
        );
        assert_eq!(h.conn.stats().stream_id_violations, 1);
        assert_eq!(h.conn.stats().streams_open, 0);
        assert_eq!(h.closed_code(2), Some(CLOSE_PROTOCOL));
    }

    /// The same through RESET_STREAM, which also opens the ids below it.
    #[test]
    fn reset_of_a_far_stream_id_closes_the_connection() {
        let mut h = Harness::new(Config::default());
        h.send_frames(
            1,
            &[Frame::ResetStream {
                id: 1 << 61,
                code: 0,
                final_size: 0,
            }],
        );
        assert_eq!(h.conn.stats().stream_id_violations, 1);
        assert_eq!(h.closed_code(2), Some(CLOSE_PROTOCOL));
    }

    /// Ids up to the limit still open (zero-RTT opens may arrive out of order).
    #[test]
    fn stream_ids_within_the_limit_open_lower_ids() {
        let config = Config {
            max_streams: 8,
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let id = 2 * 7; // the 8th initiator stream
        h.send_frames(
            1,
            &[Frame::Stream {
                id,
                offset: 0,
                fin: false,
                data: b"x",
            }],
        );
        assert_eq!(h.conn.stats().streams_open, 8);
        assert_eq!(h.conn.stats().protocol_errors, 0);
        // One more unopened id than the limit allows is refused.
        h.send_frames(
            2,
            &[Frame::Stream {
                id: id + 2 + 2 * 8,
                offset: 0,
                fin: false,
                data: b"x",
            }],
        );
        assert_eq!(h.conn.stats().stream_id_violations, 1);
        assert_eq!(h.closed_code(3), Some(CLOSE_PROTOCOL));
    }

    /// Regression (issue 25, defect 12): overlapping out-of-order segments inside the window
    /// were each stored whole. 2,000 frames of 60,000 bytes, each one byte further, now hold
    /// the 61,999 bytes they cover (before: 120 MB), and the connection stays open.
    #[test]
    fn overlapping_segments_hold_only_the_bytes_they_cover() {
        let mut h = Harness::new(Config::default());
        let data = vec![7u8; 60_000];
        for i in 0..2000u64 {
            h.send_frames(
                1 + i,
                &[Frame::Stream {
                    id: 0,
                    offset: 1 + i,
                    fin: false,
                    data: &data,
                }],
            );
        }
        let s = h.conn.streams.get(&0).expect("open");
        assert_eq!(s.recv.pending_bytes(), 61_999);
        assert_eq!(h.conn.recv_segments, 1);
        assert_eq!(h.conn.stats().protocol_errors, 0);
    }

    /// Sibling of defect 9: an ACK of packet numbers never sent set `largest_acked` far
    /// ahead, so every packet in flight was declared lost at once (and it would confirm key
    /// updates the peer never saw). It is a protocol error now.
    #[test]
    fn ack_of_a_packet_never_sent_closes_the_connection() {
        let mut h = Harness::new(Config::default());
        h.send_frames(1, &[Frame::Ping]);
        h.send_frames(
            2,
            &[Frame::Ack {
                ack_delay_us: 0,
                recovered_total: 0,
                ranges: vec![PnRange {
                    start: 0,
                    end: 1_000_000,
                }],
            }],
        );
        assert_eq!(h.conn.stats().acks_of_unsent, 1);
        assert_eq!(h.closed_code(3), Some(CLOSE_PROTOCOL));
    }

    /// Many tiny disjoint segments across streams hit the per-connection segment bound and
    /// close the connection instead of growing without limit.
    #[test]
    fn connection_segment_bound_closes_the_connection() {
        let config = Config {
            max_streams: 16,
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let per_stream = crate::stream::MAX_RECV_SEGMENTS as u64;
        let mut sent = 0u64;
        'outer: for stream in 0..16u64 {
            for i in 0..per_stream {
                h.send_frames(
                    1,
                    &[Frame::Stream {
                        id: 2 * stream,
                        offset: 2 + 2 * i,
                        fin: false,
                        data: b"x",
                    }],
                );
                sent += 1;
                if h.conn.stats().protocol_errors > 0 {
                    break 'outer;
                }
            }
        }
        assert_eq!(sent, MAX_CONN_RECV_SEGMENTS as u64 + 1);
        assert_eq!(h.conn.stats().reassembly_limit_hits, 1);
        assert_eq!(h.closed_code(2), Some(CLOSE_PROTOCOL));
    }

    /// Both ends of one session, with packets moved by hand.
    struct Pair {
        a: Connection,
        b: Connection,
        now_ns: u64,
        stream: u64,
        /// `a` writes stream data every step.
        write: bool,
    }

    /// A packet `a` sent and the number of send-key updates `a` had made when it sent it.
    struct Sent {
        packet: Vec<u8>,
        key: u64,
    }

    impl Pair {
        fn new(config: Config) -> Self {
            let (keys_a, keys_b) = session_keys();
            let mut a = Connection::new(config.clone(), keys_a, true, 0);
            let b = Connection::new(config, keys_b, false, 0);
            let stream = a.open_stream().unwrap();
            Pair {
                a,
                b,
                now_ns: 0,
                stream,
                write: true,
            }
        }

        fn deliver(to: &mut Connection, now_ns: u64, packet: &[u8]) -> bool {
            let (pn, header_len) = wire::parse_data_header(packet).expect("data packet");
            to.handle_packet(now_ns, pn, header_len, &packet[header_len..])
        }

        /// One millisecond: `a` writes stream data and sends; each of its packets is
        /// delivered unless `hold` keeps it (returned); `b`'s packets all reach `a`.
        fn step(&mut self, mut hold: impl FnMut(&Sent) -> bool) -> Vec<Sent> {
            self.now_ns += 1_000_000;
            let now = self.now_ns;
            self.a.handle_timeout(now);
            self.b.handle_timeout(now);
            if self.write {
                let _ = self.a.stream_write(self.stream, &[5u8; 8192]);
            }
            let mut held = Vec::new();
            let mut out = Vec::new();
            while self.a.poll_transmit(now, &mut out) {
                let sent = Sent {
                    packet: std::mem::take(&mut out),
                    key: self.a.stats().key_updates_sent,
                };
                if hold(&sent) {
                    held.push(sent);
                } else {
                    Self::deliver(&mut self.b, now, &sent.packet);
                }
            }
            while self.b.poll_transmit(now, &mut out) {
                Self::deliver(&mut self.a, now, &out);
                out.clear();
            }
            let mut buf = vec![0u8; 1 << 16];
            while let Ok((n, _)) = self.b.stream_read(self.stream, &mut buf) {
                if n == 0 {
                    break;
                }
            }
            held
        }

        /// Steps until `a` sends a packet under the key `b` receives with; holds it back.
        fn hold_one(&mut self) -> Sent {
            for _ in 0..1000 {
                // A packet under the same key as the one before it, which b received.
                let mut delivered_key = None;
                let mut done = false;
                let mut held = self.step(|s| {
                    let hold = !done && delivered_key == Some(s.key);
                    done |= hold;
                    if !hold {
                        delivered_key = Some(s.key);
                    }
                    hold
                });
                if let Some(s) = held.pop() {
                    return s;
                }
            }
            panic!("no packet to hold");
        }

        /// Steps until `a` has made `updates` send-key updates and `b` has followed.
        fn run_until_updates(&mut self, updates: u64) {
            for _ in 0..10_000 {
                if self.a.stats().key_updates_sent >= updates
                    && self.b.stats().key_updates_received >= updates
                {
                    return;
                }
                self.step(|_| false);
            }
            panic!("no key update {updates}: {:?}", self.a.stats());
        }
    }

    /// Issue 25, defect 3: the packet-count trigger updates the send key inside the live
    /// connection; a packet sent under the previous key and delivered after the receiver
    /// switched is accepted within the grace time and refused after it.
    #[test]
    fn key_updates_keep_the_previous_key_for_the_grace_time_only() {
        // Few packets per key and immediate ACKs keep the late packet within the reach of
        // its truncated packet number (a separate limit on lateness).
        let config = Config {
            rekey_after_packets: 4,
            ack_every: 1,
            old_key_grace_us: 500_000,
            ..Config::default()
        };
        let mut p = Pair::new(config);
        p.run_until_updates(2);
        // Hold back one packet under the key b is at, then run until b has moved on.
        let late = p.hold_one();
        p.run_until_updates(late.key + 1);
        let received = p.b.stats().packets_received;
        assert!(Pair::deliver(&mut p.b, p.now_ns, &late.packet));
        assert_eq!(p.b.stats().old_key_packets, 1);
        assert_eq!(p.b.stats().packets_received, received + 1);

        // Hold one more; deliver it after b moved on and the grace time passed.
        let late = p.hold_one();
        p.run_until_updates(late.key + 1);
        p.write = false; // so a sends (almost) nothing while the grace time runs out
        for _ in 0..600 {
            p.step(|_| false); // 600 ms > 500 ms of grace
        }
        let received = p.b.stats().packets_received;
        let rejected = p.b.stats().old_key_rejected;
        assert!(!Pair::deliver(&mut p.b, p.now_ns, &late.packet));
        assert_eq!(p.b.stats().old_key_rejected, rejected + 1);
        assert_eq!(p.b.stats().packets_received, received);
        // Nothing was reset: the stream kept flowing through every update.
        p.write = true;
        p.run_until_updates(late.key + 3);
        assert_eq!(p.a.stats().protocol_errors + p.b.stats().protocol_errors, 0);
        assert!(!p.a.is_closed() && !p.b.is_closed());
        let read = p.b.streams.get(&p.stream).expect("open").recv.read_offset;
        assert!(read > 50_000, "{read} bytes read");
    }

    /// The hard limit: a sender whose peer never confirms its key stops at
    /// `key_packet_limit` packets under that key, and resumes after a confirmation.
    #[test]
    fn sending_stops_at_the_key_packet_limit() {
        let config = Config {
            rekey_after_packets: 8,
            key_packet_limit: 16,
            ..Config::default()
        };
        let mut p = Pair::new(config);
        // Nothing reaches b: a's first key is never confirmed.
        let mut held = Vec::new();
        for _ in 0..200 {
            held.extend(p.step(|_| true));
        }
        assert_eq!(held.len(), 16);
        assert_eq!(p.a.stats().key_updates_sent, 0);
        assert_eq!(p.a.stats().key_exhausted_stalls, 1);
        assert!(
            p.a.poll_timeout().is_some_and(|t| t > p.now_ns),
            "no busy loop"
        );
        // Delivered late, they are acknowledged; a updates its key and sends again.
        for s in &held {
            Pair::deliver(&mut p.b, p.now_ns, &s.packet);
        }
        for _ in 0..50 {
            p.step(|_| false);
        }
        assert!(p.a.stats().key_updates_sent >= 1, "{:?}", p.a.stats());
        assert!(p.a.stats().packets_sent > 16);
    }

    /// The time trigger.
    #[test]
    fn key_updates_after_the_configured_time() {
        let config = Config {
            rekey_after_us: 100_000,
            ..Config::default()
        };
        let mut p = Pair::new(config);
        for _ in 0..1050 {
            p.step(|_| false);
        }
        let updates = p.a.stats().key_updates_sent;
        assert!((9..=10).contains(&updates), "{updates} updates in 1.05 s");
        assert_eq!(p.b.stats().key_updates_received, updates);
    }
}
