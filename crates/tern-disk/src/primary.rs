//! The primary's side of replication, sans-IO.
//!
//! ```text
//!  Disconnected --connect--> Hello --READY--> Hashes --HASHES_END--> Syncing --cursor at end--> Live
//!        ^                                                               (SYNCED sent)            |
//!        +------------------------- disconnect / ERROR / bad input --------------------------------+
//! ```
//! Every (re)connection starts with the secondary's per-block hashes, so whatever already
//! arrived (before a link cut, or an older copy from a previous sync) is never sent again, and
//! no in-memory backlog has to survive a crash: the primary's volume is the backlog.
//!
//! The driver calls [`Primary::write`] / [`Primary::zero`] with each guest write **after**
//! writing it locally and under the same lock as [`Primary::scanned`], so messages leave in
//! the order the volume changed. Writes to blocks the scan has not reached yet send nothing:
//! the scan reads their newest content. Scanned blocks are cut into 4 KiB chunks: zero chunks
//! become ZERO, chunks the secondary holds elsewhere become COPY (index of what this session
//! sent, invalidated by later writes), the rest are zstd-compressed DATA.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::wire::{self, ChunkHash, Compression, Hash, Msg};
use crate::{CHUNK, Mode, block_hash, chunk_hash};

/// Unacknowledged bytes beyond which [`Primary::backlog_full`] holds guest writes (async)
/// and the scan pauses.
pub const DEFAULT_MAX_BACKLOG: u64 = 64 << 20;
/// In `auto` mode, the backlog at or under which replication turns synchronous once the
/// initial sync is acknowledged.
pub const AUTO_SYNC_BACKLOG: u64 = 1 << 20;
/// zstd level of the replication stream.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Most index entries (chunks the secondary is known to hold), 1 GiB of 4 KiB chunks.
pub const MAX_INDEX: usize = 1 << 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Disconnected,
    Hello,
    Hashes,
    Syncing,
    Live,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub sessions: u64,
    pub blocks_scanned: u64,
    pub blocks_same: u64,
    pub chunks_same: u64,
    pub checks: u64,
    pub holes_skipped_bytes: u64,
    pub zero_bytes: u64,
    pub copy_bytes: u64,
    pub data_raw_bytes: u64,
    pub data_wire_bytes: u64,
    pub live_writes: u64,
    pub live_bytes: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub sync_completions: u64,
}

#[derive(Debug)]
pub struct Primary {
    size: u64,
    block_shift: u8,
    name: String,
    pub mode: Mode,
    pub max_backlog: u64,
    zstd_level: i32,
    /// Fencing epoch sent in HELLO.
    epoch: u64,
    /// The session's zstd stream (DATA compression 2).
    stream: Option<tern_codec::residual::Compressor>,
    phase: Phase,
    seq: u64,
    acked: u64,
    synced_seq: Option<u64>,
    /// Auto mode has turned synchronous (until the next disconnect).
    auto_sync: bool,
    out: Vec<u8>,
    inflight: VecDeque<(u64, u64)>,
    backlog: u64,
    reader: wire::Reader,
    /// The secondary's block hashes at the start of the session.
    remote: Vec<ChunkHash>,
    cursor: u64,
    /// CHECKs sent and not yet answered.
    checks_out: u64,
    /// NEEDs received: block offset -> chunks to send.
    rereads: std::collections::BTreeMap<u64, u16>,
    index: HashMap<Hash, u64>,
    at: HashMap<u64, Hash>,
    last_error: Option<String>,
    stats: Stats,
    /// Guest writes applied locally (all sessions).
    local: u64,
    /// Guest writes durable at the secondary.
    committed_local: u64,
    /// (replication seq, local write count): once seq is ACKed, that many writes are
    /// committed. Cleared with the session.
    marks: VecDeque<(u64, u64)>,
    /// A protected group's primary: what its VM's writes depend on (peer MAC, write count),
    /// sent as CLOCK before each live write and before SYNCED ([`Primary::set_deps`]).
    deps: Option<Vec<([u8; 6], u64)>>,
}

impl Primary {
    pub fn new(size: u64, name: &str, mode: Mode) -> Primary {
        Primary {
            size,
            block_shift: crate::BLOCK_SHIFT,
            name: name.chars().take(255).collect(),
            mode,
            max_backlog: DEFAULT_MAX_BACKLOG,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            epoch: 0,
            stream: None,
            phase: Phase::Disconnected,
            seq: 0,
            acked: 0,
            synced_seq: None,
            auto_sync: false,
            out: Vec::new(),
            inflight: VecDeque::new(),
            backlog: 0,
            reader: wire::Reader::default(),
            remote: Vec::new(),
            cursor: 0,
            checks_out: 0,
            rereads: Default::default(),
            index: HashMap::new(),
            at: HashMap::new(),
            last_error: None,
            stats: Stats::default(),
            local: 0,
            committed_local: 0,
            marks: VecDeque::new(),
            deps: None,
        }
    }

    pub fn with_zstd_level(mut self, level: i32) -> Primary {
        self.zstd_level = level;
        self
    }

    /// The fencing epoch this primary's HELLO carries (its volume's persisted epoch).
    pub fn with_epoch(mut self, epoch: u64) -> Primary {
        self.epoch = epoch;
        self
    }

    /// A promotion moved the volume's epoch: the next HELLO carries `epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    fn block_bytes(&self) -> u64 {
        1 << self.block_shift
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_bytes())
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    pub fn acked(&self) -> u64 {
        self.acked
    }
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog
    }
    /// Blocks examined by the current session's scan.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The secondary holds a consistent copy: the scan finished and its SYNCED is durable.
    pub fn in_sync(&self) -> bool {
        self.phase == Phase::Live && self.synced_seq.is_some_and(|s| self.acked >= s)
    }

    /// Whether a guest write must wait for the secondary's acknowledgement.
    pub fn synchronous(&self) -> bool {
        match self.mode {
            Mode::Async => false,
            Mode::Sync => true,
            Mode::Auto => self.auto_sync,
        }
    }

    /// The guest write path should wait (async back-pressure): too much unacknowledged.
    pub fn backlog_full(&self) -> bool {
        self.phase != Phase::Disconnected && self.backlog > self.max_backlog
    }

    /// A new session over a fresh byte stream.
    pub fn connect(&mut self) {
        self.reset_session();
        self.phase = Phase::Hello;
        self.stats.sessions += 1;
        self.stream = tern_codec::residual::Compressor::new(self.zstd_level).ok();
        self.emit_unsequenced(Msg::Hello {
            version: wire::VERSION,
            size: self.size,
            block_shift: self.block_shift,
            name: self.name.clone(),
            epoch: self.epoch,
        });
    }

    /// The stream broke (or the driver gave up on it).
    pub fn disconnect(&mut self, reason: &str) {
        self.last_error = Some(reason.to_string());
        self.reset_session();
    }

    fn reset_session(&mut self) {
        self.phase = Phase::Disconnected;
        self.out.clear();
        self.inflight.clear();
        self.backlog = 0;
        self.acked = self.seq;
        self.synced_seq = None;
        self.auto_sync = false;
        self.reader = wire::Reader::default();
        self.stream = None;
        self.remote = Vec::new();
        self.cursor = 0;
        self.checks_out = 0;
        self.rereads.clear();
        self.marks.clear();
        self.index.clear();
        self.at.clear();
    }

    /// Bytes to send, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes from the secondary. An error ends the session (already disconnected).
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.phase == Phase::Disconnected {
            return Ok(());
        }
        self.stats.bytes_in += bytes.len() as u64;
        self.reader.push(bytes);
        loop {
            let m = match self.reader.next_msg() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return self.fail(format!("from the secondary: {e}")),
            };
            match (self.phase, m) {
                (
                    Phase::Hello,
                    Msg::Ready {
                        size, block_shift, ..
                    },
                ) => {
                    if size != self.size || block_shift != self.block_shift {
                        return self.fail(format!(
                            "secondary volume is {size} bytes in {}-byte blocks, the primary's \
                             {} bytes in {}-byte blocks",
                            1u64 << block_shift.min(63),
                            self.size,
                            self.block_bytes()
                        ));
                    }
                    self.phase = Phase::Hashes;
                    self.remote = Vec::with_capacity(self.blocks() as usize);
                }
                (Phase::Hashes, Msg::Hashes { first, hashes }) => {
                    if first != self.remote.len() as u64
                        || first + hashes.len() as u64 > self.blocks()
                    {
                        return self.fail("hash list out of order".into());
                    }
                    self.remote.extend(hashes);
                }
                (Phase::Hashes, Msg::HashesEnd { blocks }) => {
                    if blocks != self.blocks() || self.remote.len() as u64 != blocks {
                        return self.fail("hash list incomplete".into());
                    }
                    self.phase = Phase::Syncing;
                    self.cursor = 0;
                    self.finish_scan_if_done();
                }
                (Phase::Syncing, Msg::Need { offset, bitmap }) => {
                    if self.checks_out == 0
                        || offset % self.block_bytes() != 0
                        || offset >= self.size
                    {
                        return self.fail(format!("NEED at {offset} without a CHECK"));
                    }
                    self.checks_out -= 1;
                    if bitmap != 0 {
                        self.rereads.insert(offset, bitmap);
                    } else {
                        self.stats.blocks_same += 1;
                    }
                    self.finish_scan_if_done();
                }
                (Phase::Syncing | Phase::Live, Msg::Ack { seq }) => {
                    if seq > self.seq {
                        return self.fail(format!("ACK {seq} beyond the last sent {}", self.seq));
                    }
                    self.acked = self.acked.max(seq);
                    self.commit_acked();
                    while let Some(&(s, n)) = self.inflight.front() {
                        if s > self.acked {
                            break;
                        }
                        self.backlog -= n;
                        self.inflight.pop_front();
                    }
                    if self.mode == Mode::Auto
                        && !self.auto_sync
                        && self.in_sync()
                        && self.backlog <= AUTO_SYNC_BACKLOG
                    {
                        self.auto_sync = true;
                    }
                    if self.synced_seq.is_some_and(|s| s == seq) {
                        self.stats.sync_completions += 1;
                    }
                }
                (_, Msg::Error(msg)) => return self.fail(format!("secondary: {msg}")),
                (p, m) => return self.fail(format!("unexpected {m:?} in phase {p:?}")),
            }
        }
    }

    fn fail(&mut self, msg: String) -> Result<(), String> {
        self.disconnect(&msg);
        Err(msg)
    }

    fn emit_unsequenced(&mut self, m: Msg) {
        let before = self.out.len();
        m.encode(&mut self.out);
        self.stats.bytes_out += (self.out.len() - before) as u64;
    }

    fn emit(&mut self, m: Msg) -> u64 {
        let before = self.out.len();
        m.encode(&mut self.out);
        let n = (self.out.len() - before) as u64;
        self.stats.bytes_out += n;
        let seq = m.seq().expect("sequenced message");
        self.inflight.push_back((seq, n));
        self.backlog += n;
        seq
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    // ------------------------------------------------------------------ scan

    /// The next block the driver should read and pass to [`Primary::scanned`], as
    /// (offset, length); `None` when not syncing or the backlog is full.
    pub fn next_scan(&self) -> Option<(u64, usize)> {
        if self.phase != Phase::Syncing || self.backlog > self.max_backlog {
            return None;
        }
        let off = self.cursor << self.block_shift;
        if self.cursor >= self.blocks() {
            return None;
        }
        Some((off, (self.size - off).min(self.block_bytes()) as usize))
    }

    /// Blocks `[cursor, until)` are holes in the primary's volume (SEEK_DATA): blocks the
    /// secondary holds as non-zero become ZEROs. `until` is clamped.
    pub fn scanned_hole(&mut self, until_block: u64) {
        if self.phase != Phase::Syncing {
            return;
        }
        let until = until_block.min(self.blocks());
        if until <= self.cursor {
            return;
        }
        let mut run: Option<u64> = None;
        for b in self.cursor..=until {
            let nonzero = b < until && self.remote[b as usize] != 0;
            match (nonzero, run) {
                (true, None) => run = Some(b),
                (false, Some(r)) => {
                    let end = (b << self.block_shift).min(self.size);
                    let start = r << self.block_shift;
                    self.send_zero(start, end - start);
                    run = None;
                }
                _ => {}
            }
            if b < until && !nonzero {
                self.stats.blocks_same += 1;
            }
        }
        let bytes =
            ((until << self.block_shift).min(self.size)) - (self.cursor << self.block_shift);
        self.stats.holes_skipped_bytes += bytes;
        self.stats.blocks_scanned += until - self.cursor;
        self.cursor = until;
        self.finish_scan_if_done();
    }

    /// The content of the block at the cursor, read just now under the write lock. A block
    /// equal to the secondary's is skipped; one the secondary holds as zeros is sent
    /// outright (its zero chunks skipped); otherwise its chunk hashes go out in a CHECK and
    /// only the chunks the secondary NEEDs follow ([`Primary::next_reread`]).
    pub fn scanned(&mut self, offset: u64, data: &[u8]) {
        if self.phase != Phase::Syncing || offset != self.cursor << self.block_shift {
            return;
        }
        let b = self.cursor as usize;
        self.stats.blocks_scanned += 1;
        let remote = self.remote[b];
        if chunk_hash(data) == remote {
            self.stats.blocks_same += 1;
        } else if remote == 0 {
            self.send_selected_chunks(offset, data, u16::MAX, true);
        } else {
            let hashes = crate::volume::chunk_hashes_of(data);
            self.checks_out += 1;
            self.stats.checks += 1;
            self.emit_unsequenced(Msg::Check { offset, hashes });
        }
        self.cursor += 1;
        self.finish_scan_if_done();
    }

    /// A block whose NEED arrived, to be read again and passed to [`Primary::reread`].
    pub fn next_reread(&self) -> Option<(u64, usize)> {
        let (&off, _) = self.rereads.first_key_value()?;
        Some((off, (self.size - off).min(self.block_bytes()) as usize))
    }

    /// The current content of a block the secondary NEEDs chunks of.
    pub fn reread(&mut self, offset: u64, data: &[u8]) {
        let Some(bitmap) = self.rereads.remove(&offset) else {
            return;
        };
        self.send_selected_chunks(offset, data, bitmap, false);
        self.finish_scan_if_done();
    }

    /// Sends the chunks of `data` selected by `bitmap` (bit i: chunk i); zero chunks are
    /// skipped when the secondary's block is known to be zeros, else sent as ZERO.
    fn send_selected_chunks(&mut self, offset: u64, data: &[u8], bitmap: u16, remote_zero: bool) {
        let all = remote_zero;
        let n = data.len().div_ceil(CHUNK);
        let mut run: Option<usize> = None;
        for i in 0..=n {
            let pick = i < n && bitmap & (1 << i) != 0 && {
                let c = &data[i * CHUNK..((i + 1) * CHUNK).min(data.len())];
                !(all && c.iter().all(|&x| x == 0))
            };
            match (pick, run) {
                (true, None) => run = Some(i),
                (false, Some(r)) => {
                    let end = (i * CHUNK).min(data.len());
                    self.send_chunks(offset + (r * CHUNK) as u64, &data[r * CHUNK..end], true);
                    run = None;
                }
                _ => {}
            }
            if i < n && !pick {
                self.stats.chunks_same += 1;
            }
        }
    }

    fn finish_scan_if_done(&mut self) {
        if self.phase == Phase::Syncing
            && self.cursor >= self.blocks()
            && self.checks_out == 0
            && self.rereads.is_empty()
        {
            self.send_clock(self.local);
            let seq = self.next_seq();
            self.emit(Msg::Synced { seq });
            // Every write so far is in the secondary's copy once this is durable.
            self.marks.push_back((seq, self.local));
            self.synced_seq = Some(seq);
            self.phase = Phase::Live;
            self.remote = Vec::new();
        }
    }

    /// Zero chunks → ZERO, chunks the secondary holds → COPY (when `dedupe`), literal runs →
    /// DATA (zstd when smaller).
    fn send_chunks(&mut self, offset: u64, data: &[u8], dedupe: bool) {
        let mut lit_start: Option<usize> = None;
        let mut zero_start: Option<usize> = None;
        let mut i = 0;
        while i < data.len() {
            let n = CHUNK.min(data.len() - i);
            let chunk = &data[i..i + n];
            let chunk_off = offset + i as u64;
            let aligned = chunk_off % CHUNK as u64 == 0 && n == CHUNK;
            let is_zero = chunk.iter().all(|&x| x == 0);
            let copy_src = if dedupe && aligned && !is_zero {
                let h = block_hash(chunk);
                self.index.get(&h).copied().filter(|&s| s != chunk_off)
            } else {
                None
            };
            if !is_zero && let Some(z) = zero_start.take() {
                self.send_zero(offset + z as u64, (i - z) as u64);
            }
            if (is_zero || copy_src.is_some())
                && let Some(l) = lit_start.take()
            {
                self.send_literal(offset + l as u64, &data[l..i]);
            }
            if is_zero {
                zero_start.get_or_insert(i);
            } else if let Some(src) = copy_src {
                let seq = self.next_seq();
                self.invalidate(chunk_off, n as u64);
                self.emit(Msg::Copy {
                    seq,
                    offset: chunk_off,
                    src,
                    len: n as u32,
                });
                self.stats.copy_bytes += n as u64;
            } else {
                lit_start.get_or_insert(i);
            }
            i += n;
        }
        if let Some(z) = zero_start {
            self.send_zero(offset + z as u64, (data.len() - z) as u64);
        }
        if let Some(l) = lit_start {
            self.send_literal(offset + l as u64, &data[l..]);
        }
    }

    fn send_zero(&mut self, offset: u64, len: u64) {
        self.invalidate(offset, len);
        let seq = self.next_seq();
        self.emit(Msg::Zero { seq, offset, len });
        self.stats.zero_bytes += len;
    }

    fn send_literal(&mut self, offset: u64, data: &[u8]) {
        for (k, piece) in data.chunks(wire::MAX_DATA / 2).enumerate() {
            let off = offset + (k * (wire::MAX_DATA / 2)) as u64;
            self.invalidate(off, piece.len() as u64);
            // The session's stream: its window finds the matches between 4 KiB pieces that
            // separate frames cannot (measured: re-sync of scattered text chunks 5.0% ->
            // see docs/disk.md).
            let (compression, bytes) = match self.stream.as_mut() {
                Some(z) => {
                    let mut out = Vec::with_capacity(piece.len() / 2);
                    match z.push(piece, &mut out) {
                        Ok(()) => (Compression::Stream, out),
                        Err(_) => {
                            // A broken stream cannot be resumed: this session ends.
                            self.stream = None;
                            (Compression::None, piece.to_vec())
                        }
                    }
                }
                None => (Compression::None, piece.to_vec()),
            };
            self.stats.data_raw_bytes += piece.len() as u64;
            self.stats.data_wire_bytes += bytes.len() as u64;
            let seq = self.next_seq();
            self.emit(Msg::Data {
                seq,
                offset: off,
                raw_len: piece.len() as u32,
                compression,
                bytes,
            });
            // What the secondary now holds at aligned whole chunks can serve later COPYs.
            let mut c = off.next_multiple_of(CHUNK as u64);
            while c + CHUNK as u64 <= off + piece.len() as u64 && self.index.len() < MAX_INDEX {
                let s = (c - off) as usize;
                let h = block_hash(&piece[s..s + CHUNK]);
                self.index.entry(h).or_insert(c);
                self.at.insert(c, h);
                c += CHUNK as u64;
            }
        }
    }

    /// The secondary's bytes in `[offset, offset+len)` are about to change: forget chunks
    /// indexed there.
    fn invalidate(&mut self, offset: u64, len: u64) {
        if self.at.is_empty() {
            return;
        }
        let first = offset / CHUNK as u64 * CHUNK as u64;
        let mut c = first;
        while c < offset + len {
            if let Some(h) = self.at.remove(&c)
                && self.index.get(&h) == Some(&c)
            {
                self.index.remove(&h);
            }
            c += CHUNK as u64;
        }
    }

    // ------------------------------------------------------------------ write counters

    /// Guest writes applied locally so far: the "pending" counter PipeCloud tags outbound
    /// packets with (every write counts, sent or not).
    pub fn writes(&self) -> u64 {
        self.local
    }

    /// Every guest write numbered `<=` this is durable at the secondary: the "committed"
    /// counter a packet tagged with a pending counter waits for. It only moves forward and
    /// never past a write whose data the secondary may lack: in a live session each write
    /// commits with its own ACK; writes that were not sent (disconnected, or ahead of the
    /// scan) commit with the ACK of the next completed sync's SYNCED, which covers every
    /// write before it.
    pub fn committed_writes(&self) -> u64 {
        self.committed_local
    }

    /// The primary of a protected group's tier: the peer tiers' write counts its VM's
    /// next writes depend on (`tern_gate::Group`), so the backup can apply writes across
    /// the group's disks in causal order (CLOCK).
    pub fn set_deps(&mut self, deps: Vec<([u8; 6], u64)>) {
        let mut deps = deps;
        deps.truncate(wire::MAX_CLOCK_PEERS);
        self.deps = Some(deps);
    }

    fn send_clock(&mut self, write: u64) {
        if let Some(deps) = self.deps.clone() {
            self.emit_unsequenced(Msg::Clock { write, deps });
        }
    }

    fn count_write(&mut self, sent_as: Option<u64>) {
        self.local += 1;
        match sent_as {
            // In a live session with nothing uncovered before it, its own ACK commits it.
            Some(seq) if self.phase == Phase::Live => self.marks.push_back((seq, self.local)),
            // Covered later: by the SYNCED that ends this (or a later) session's scan.
            _ => {}
        }
    }

    fn commit_acked(&mut self) {
        while let Some(&(seq, local)) = self.marks.front() {
            if seq > self.acked {
                break;
            }
            self.committed_local = self.committed_local.max(local);
            self.marks.pop_front();
        }
    }

    // ------------------------------------------------------------------ guest writes

    /// A guest write of `data` at `offset`, already written locally. Returns the sequence
    /// number to wait for in synchronous mode, `None` when nothing had to be sent.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u64> {
        if !self.must_send(offset) || data.is_empty() {
            self.count_write(None);
            return None;
        }
        self.stats.live_writes += 1;
        self.stats.live_bytes += data.len() as u64;
        self.send_clock(self.local + 1);
        self.send_chunks(offset, data, false);
        self.count_write(Some(self.seq));
        Some(self.seq)
    }

    /// A guest trim or write-zeroes of `[offset, offset+len)`, already applied locally.
    pub fn zero(&mut self, offset: u64, len: u64) -> Option<u64> {
        if !self.must_send(offset) || len == 0 {
            self.count_write(None);
            return None;
        }
        self.stats.live_writes += 1;
        self.send_clock(self.local + 1);
        let mut o = offset;
        while o < offset + len {
            let n = (offset + len - o).min(wire::MAX_ZERO);
            self.send_zero(o, n);
            o += n;
        }
        self.count_write(Some(self.seq));
        Some(self.seq)
    }

    /// A guest flush: in a live session, ask the secondary to acknowledge now.
    pub fn flush(&mut self) -> Option<u64> {
        if !matches!(self.phase, Phase::Syncing | Phase::Live) {
            return None;
        }
        let seq = self.next_seq();
        Some(self.emit(Msg::Flush { seq }))
    }

    /// Writes starting in blocks the scan has passed (or after it) travel now; earlier
    /// phases and blocks ahead of the cursor are covered by the scan.
    fn must_send(&self, offset: u64) -> bool {
        match self.phase {
            Phase::Live => true,
            Phase::Syncing => (offset >> self.block_shift) < self.cursor,
            _ => false,
        }
    }
}
