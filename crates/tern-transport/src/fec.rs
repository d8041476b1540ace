//! Block Reed-Solomon forward error correction over packet payloads.
//!
//! # Role
//!
//! On a lossy WAN, waiting a round trip to retransmit a lost packet costs more than sending a
//! little redundancy up front. The sender feeds each protected packet's plaintext payload to
//! [`FecEncoder`]; a run of consecutive packet numbers forms a *block* of at most
//! [`MAX_BLOCK_SOURCES`] sources, and closing the block yields up to [`MAX_BLOCK_REPAIRS`]
//! [`RepairSymbol`]s (sent in their own packets). The receiver feeds every authenticated
//! source payload and every repair symbol to [`FecDecoder`], in any order and with
//! duplicates; once any `k` of a block's `k + r` symbols are present, the missing sources
//! come back out. [`repair_count`] picks `r` from a loss estimate.
//!
//! The code is systematic Reed-Solomon over GF(2^16) from `reed-solomon-simd` (Leopard-RS,
//! AVX2/SSSE3 when available): sources travel unchanged, any `k` shards recover the block.
//! A block with a single repair (`r = 1`) uses plain XOR parity instead, which is the same
//! one-erasure code without the Leopard decoder's fixed cost: every Leopard recovery
//! evaluates an error locator over the whole 2^16 field, about 0.3–0.4 ms on the development
//! machine whatever `k` and the shard size (see `fec::tests::bench_encode_decode`).
//!
//! # Shards
//!
//! Every source of a block becomes one shard `[len u16 BE][payload][zero padding]`; all
//! shards of a block have the size of the longest, rounded up to an even number (the only
//! constraint `reed-solomon-simd` 3.x has: non-zero and even). Repair symbols have that same
//! size, so the largest is `2 + MAX_PAYLOAD` = 1502 bytes. With `r = 1` the repair data is
//! the XOR of all shards of the block; otherwise it is `reed-solomon-simd`'s recovery shard
//! `repair_index` of a `(k, r)` code, which depends on `r` as well as on the sources.
//!
//! # Wire format of a repair symbol (all integers big-endian)
//!
//! ```text
//! offset  size  field
//!      0     8  first_pn       packet number of the block's first source
//!      8     2  source_count   k, 1..=64
//!     10     2  repair_index   0..repair_count
//!     12     2  repair_count   r, 1..=16 (part of the code: all symbols of a block agree)
//!     14     2  data_len       shard size: even, 2..=1502
//!     16     n  data
//! ```
//!
//! Versioning: the field layout is fixed for transport protocol version 1 (the Noise
//! prologue); a change of layout changes that version.
//!
//! # Bounds
//!
//! The encoder holds one open block (≤ 64 × 1500 bytes) and at most [`MAX_PENDING_REPAIRS`]
//! repairs of auto-closed blocks. The decoder keeps the last [`SOURCE_WINDOW`] sources in a
//! ring keyed by packet number, at most [`MAX_DECODER_BLOCKS`] blocks and
//! [`MAX_DECODER_REPAIR_BYTES`] of repair data; the oldest block is evicted first.
//!
//! Sans-IO and deterministic: no clock, no randomness, ordered maps only.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

/// Most sources in one block.
pub const MAX_BLOCK_SOURCES: usize = 64;
/// Most repair symbols for one block.
pub const MAX_BLOCK_REPAIRS: usize = 16;
/// Largest payload that can be protected, in bytes.
pub const MAX_PAYLOAD: usize = 1500;
/// Largest shard (and repair data) size, in bytes.
pub const MAX_SHARD_BYTES: usize = shard_bytes(MAX_PAYLOAD);
/// Size of an encoded repair symbol's header, in bytes.
pub const REPAIR_HEADER_LEN: usize = 16;
/// Sources the decoder remembers, counted back from the highest packet number seen.
pub const SOURCE_WINDOW: u64 = (MAX_BLOCK_SOURCES * 4) as u64;
/// Most blocks the decoder tracks (pending or finished).
pub const MAX_DECODER_BLOCKS: usize = 128;
/// Most repair-symbol bytes the decoder holds.
pub const MAX_DECODER_REPAIR_BYTES: usize = 1 << 20;
/// Most repair symbols of auto-closed blocks the encoder holds for the next `finish_block`.
pub const MAX_PENDING_REPAIRS: usize = MAX_BLOCK_REPAIRS * 4;
/// Most recovered packets queued by [`FecDecoder::on_source`] before the oldest is dropped.
pub const MAX_RECOVERED_QUEUE: usize = MAX_BLOCK_SOURCES * 4;

/// Shard size for a block whose longest payload is `max_payload` bytes.
const fn shard_bytes(max_payload: usize) -> usize {
    (2 + max_payload + 1) & !1
}

/// Errors from decoding or validating a repair symbol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    /// Fewer bytes than the header, or than the header says.
    #[error("repair symbol truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// Bytes after the symbol, where [`RepairSymbol::decode`] wants exactly one symbol.
    #[error("repair symbol has {extra} trailing bytes")]
    TrailingBytes {
        /// Bytes beyond the symbol.
        extra: usize,
    },
    /// `source_count` outside `1..=MAX_BLOCK_SOURCES`.
    #[error("repair symbol covers {count} sources, expected 1 to {MAX_BLOCK_SOURCES}")]
    SourceCount {
        /// The field's value.
        count: u16,
    },
    /// `repair_count` outside `1..=MAX_BLOCK_REPAIRS`.
    #[error("repair symbol claims {count} repairs per block, expected 1 to {MAX_BLOCK_REPAIRS}")]
    RepairCount {
        /// The field's value.
        count: u16,
    },
    /// `repair_index` not below `repair_count`.
    #[error("repair index {index} is not below repair count {count}")]
    RepairIndex {
        /// The field's value.
        index: u16,
        /// The block's repair count.
        count: u16,
    },
    /// Shard size odd, zero or above [`MAX_SHARD_BYTES`].
    #[error("repair data is {len} bytes, expected an even length from 2 to {MAX_SHARD_BYTES}")]
    DataLength {
        /// Data length in bytes.
        len: usize,
    },
    /// The block would run past the last packet number.
    #[error(
        "repair block at packet {first_pn} with {count} sources overflows the packet number space"
    )]
    PacketNumberOverflow {
        /// The block's first packet number.
        first_pn: u64,
        /// Its source count.
        count: u16,
    },
}

/// One repair symbol of a block of consecutive source packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairSymbol {
    /// Packet number of the block's first source.
    pub first_pn: u64,
    /// Sources in the block (`k`).
    pub source_count: u16,
    /// Which repair symbol this is, `0..repair_count`.
    pub repair_index: u16,
    /// Repair symbols generated for the block (`r`).
    pub repair_count: u16,
    /// The repair shard.
    pub data: Vec<u8>,
}

impl RepairSymbol {
    /// Length of [`RepairSymbol::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        REPAIR_HEADER_LEN + self.data.len()
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(
            self.validate().is_ok(),
            "encoding invalid repair symbol {self:?}"
        );
        out.reserve(self.encoded_len());
        out.extend_from_slice(&self.first_pn.to_be_bytes());
        out.extend_from_slice(&self.source_count.to_be_bytes());
        out.extend_from_slice(&self.repair_index.to_be_bytes());
        out.extend_from_slice(&self.repair_count.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Decodes exactly one symbol occupying all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<RepairSymbol, FecError> {
        let (symbol, used) = Self::decode_prefix(buf)?;
        if used != buf.len() {
            return Err(FecError::TrailingBytes {
                extra: buf.len() - used,
            });
        }
        Ok(symbol)
    }

    /// Decodes one symbol from the start of `buf`; returns it and the bytes it used.
    pub fn decode_prefix(buf: &[u8]) -> Result<(RepairSymbol, usize), FecError> {
        let Some(header) = buf.first_chunk::<REPAIR_HEADER_LEN>() else {
            return Err(FecError::Truncated {
                len: buf.len(),
                expected: REPAIR_HEADER_LEN,
            });
        };
        let u16_at = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let mut first_pn = [0u8; 8];
        first_pn.copy_from_slice(&header[..8]);
        let data_len = usize::from(u16_at(14));
        // Check the fields before touching (or allocating for) the data.
        let mut symbol = RepairSymbol {
            first_pn: u64::from_be_bytes(first_pn),
            source_count: u16_at(8),
            repair_index: u16_at(10),
            repair_count: u16_at(12),
            data: Vec::new(),
        };
        validate_fields(&symbol, data_len)?;
        let end = REPAIR_HEADER_LEN + data_len;
        let Some(data) = buf.get(REPAIR_HEADER_LEN..end) else {
            return Err(FecError::Truncated {
                len: buf.len(),
                expected: end,
            });
        };
        symbol.data = data.to_vec();
        Ok((symbol, end))
    }

    /// Checks every field against the format's bounds.
    pub fn validate(&self) -> Result<(), FecError> {
        validate_fields(self, self.data.len())
    }
}

fn validate_fields(symbol: &RepairSymbol, data_len: usize) -> Result<(), FecError> {
    let k = symbol.source_count;
    if k == 0 || usize::from(k) > MAX_BLOCK_SOURCES {
        return Err(FecError::SourceCount { count: k });
    }
    let r = symbol.repair_count;
    if r == 0 || usize::from(r) > MAX_BLOCK_REPAIRS {
        return Err(FecError::RepairCount { count: r });
    }
    if symbol.repair_index >= r {
        return Err(FecError::RepairIndex {
            index: symbol.repair_index,
            count: r,
        });
    }
    if !(2..=MAX_SHARD_BYTES).contains(&data_len) || data_len % 2 != 0 {
        return Err(FecError::DataLength { len: data_len });
    }
    if symbol.first_pn.checked_add(u64::from(k) - 1).is_none() {
        return Err(FecError::PacketNumberOverflow {
            first_pn: symbol.first_pn,
            count: k,
        });
    }
    Ok(())
}

/// Writes the shard of `payload` (`[len][payload][zeros]`) into `shard`, sized `shard_len`.
fn fill_shard(shard: &mut Vec<u8>, payload: &[u8], shard_len: usize) {
    debug_assert!(2 + payload.len() <= shard_len);
    shard.clear();
    shard.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    shard.extend_from_slice(payload);
    shard.resize(shard_len, 0);
}

/// XORs the shard of `payload` into `acc` (its zero padding changes nothing).
fn xor_shard(acc: &mut [u8], payload: &[u8]) {
    debug_assert!(2 + payload.len() <= acc.len());
    let len = (payload.len() as u16).to_be_bytes();
    acc[0] ^= len[0];
    acc[1] ^= len[1];
    for (a, b) in acc[2..].iter_mut().zip(payload) {
        *a ^= b;
    }
}

/// The payload inside a reconstructed shard, if its length fits and its padding is zero.
fn shard_payload(shard: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*shard.first()?, *shard.get(1)?]));
    if len > MAX_PAYLOAD || 2 + len > shard.len() {
        return None;
    }
    shard[2 + len..]
        .iter()
        .all(|&b| b == 0)
        .then_some(&shard[2..2 + len])
}

/// Counters kept by [`FecEncoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecEncoderStats {
    /// Blocks closed with at least one source.
    pub blocks: u64,
    /// Sources added to blocks.
    pub sources: u64,
    /// Repair symbols generated.
    pub repairs: u64,
    /// Payloads over [`MAX_PAYLOAD`] that were left unprotected.
    pub unprotected: u64,
    /// Repairs of auto-closed blocks dropped because too many were pending.
    pub repairs_dropped: u64,
}

/// Sender side: groups consecutive source packets into blocks and makes repair symbols.
pub struct FecEncoder {
    first_pn: u64,
    /// Payload lengths of the open block's sources.
    lens: Vec<u16>,
    /// Payloads of the open block, back to back.
    data: Vec<u8>,
    max_len: usize,
    /// Repair count of the last `finish_block`, used when `push` must close a block itself.
    last_repair_count: usize,
    pending: VecDeque<RepairSymbol>,
    rs: Option<ReedSolomonEncoder>,
    shard: Vec<u8>,
    stats: FecEncoderStats,
}

impl fmt::Debug for FecEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FecEncoder")
            .field("first_pn", &self.first_pn)
            .field("open_len", &self.lens.len())
            .field("pending", &self.pending.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for FecEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FecEncoder {
    /// An encoder with no open block.
    pub fn new() -> Self {
        FecEncoder {
            first_pn: 0,
            lens: Vec::with_capacity(MAX_BLOCK_SOURCES),
            data: Vec::new(),
            max_len: 0,
            last_repair_count: 0,
            pending: VecDeque::new(),
            rs: None,
            shard: Vec::with_capacity(MAX_SHARD_BYTES),
            stats: FecEncoderStats::default(),
        }
    }

    /// The packet number that would extend the open block, if one is open and not full.
    ///
    /// A caller that wants to choose the repair count for every block checks this before
    /// [`FecEncoder::push`] and calls [`FecEncoder::finish_block`] itself on a mismatch.
    pub fn next_pn(&self) -> Option<u64> {
        if self.lens.is_empty() || self.lens.len() >= MAX_BLOCK_SOURCES {
            return None;
        }
        self.first_pn.checked_add(self.lens.len() as u64)
    }

    /// Adds the next source packet.
    ///
    /// If `pn` does not directly follow the open block, or the block is full, the open block
    /// is closed first: it is encoded with the repair count of the last `finish_block` call
    /// (initially 0, i.e. dropped) and its repairs are returned by the next `finish_block`.
    /// A payload over [`MAX_PAYLOAD`] closes the open block the same way and stays
    /// unprotected.
    pub fn push(&mut self, pn: u64, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD {
            self.auto_close();
            self.stats.unprotected += 1;
            return;
        }
        if !self.lens.is_empty() && self.next_pn() != Some(pn) {
            self.auto_close();
        }
        if self.lens.is_empty() {
            self.first_pn = pn;
        }
        self.lens.push(payload.len() as u16);
        self.data.extend_from_slice(payload);
        self.max_len = self.max_len.max(payload.len());
        self.stats.sources += 1;
    }

    /// Sources in the open block.
    pub fn open_len(&self) -> usize {
        self.lens.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> &FecEncoderStats {
        &self.stats
    }

    /// Closes the open block and returns `repair_count` repair symbols for it (capped at
    /// [`MAX_BLOCK_REPAIRS`]; 0 just drops the block), preceded by any repairs of blocks that
    /// `push` closed on its own. An empty block yields no symbols.
    pub fn finish_block(&mut self, repair_count: usize) -> Vec<RepairSymbol> {
        let repair_count = repair_count.min(MAX_BLOCK_REPAIRS);
        self.last_repair_count = repair_count;
        let mut out: Vec<RepairSymbol> = self.pending.drain(..).collect();
        self.encode_block(repair_count, &mut out);
        out
    }

    fn auto_close(&mut self) {
        let mut symbols = Vec::new();
        self.encode_block(self.last_repair_count, &mut symbols);
        self.pending.extend(symbols);
        while self.pending.len() > MAX_PENDING_REPAIRS {
            self.pending.pop_front();
            self.stats.repairs_dropped += 1;
        }
    }

    fn encode_block(&mut self, repair_count: usize, out: &mut Vec<RepairSymbol>) {
        let k = self.lens.len();
        if k > 0 {
            self.stats.blocks += 1;
        }
        if k > 0 && repair_count > 0 {
            let shard_len = shard_bytes(self.max_len);
            match self.encode_repairs(k, repair_count, shard_len, out) {
                Ok(()) => self.stats.repairs += repair_count as u64,
                // Parameters are within the library's supported range by construction.
                Err(e) => debug_assert!(false, "reed-solomon encode failed: {e}"),
            }
        }
        self.lens.clear();
        self.data.clear();
        self.max_len = 0;
    }

    fn encode_repairs(
        &mut self,
        k: usize,
        r: usize,
        shard_len: usize,
        out: &mut Vec<RepairSymbol>,
    ) -> Result<(), reed_solomon_simd::Error> {
        if r == 1 {
            // One repair is plain XOR parity: the one-erasure MDS code, whose decoding is a
            // pass over the shards instead of the Leopard decoder's field-sized error locator.
            let mut parity = vec![0u8; shard_len];
            let mut offset = 0;
            for &len in &self.lens {
                let len = usize::from(len);
                xor_shard(&mut parity, &self.data[offset..offset + len]);
                offset += len;
            }
            out.push(RepairSymbol {
                first_pn: self.first_pn,
                source_count: k as u16,
                repair_index: 0,
                repair_count: 1,
                data: parity,
            });
            return Ok(());
        }
        let rs = match &mut self.rs {
            Some(rs) => {
                rs.reset(k, r, shard_len)?;
                rs
            }
            None => self.rs.insert(ReedSolomonEncoder::new(k, r, shard_len)?),
        };
        let mut offset = 0;
        for &len in &self.lens {
            let len = usize::from(len);
            fill_shard(&mut self.shard, &self.data[offset..offset + len], shard_len);
            offset += len;
            rs.add_original_shard(&self.shard)?;
        }
        let result = rs.encode()?;
        for (index, data) in result.recovery_iter().enumerate() {
            out.push(RepairSymbol {
                first_pn: self.first_pn,
                source_count: k as u16,
                repair_index: index as u16,
                repair_count: r as u16,
                data: data.to_vec(),
            });
        }
        Ok(())
    }
}

/// Counters kept by [`FecDecoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecStats {
    /// Repair symbols passed to `on_repair`.
    pub repairs_received: u64,
    /// Repair symbols rejected: invalid fields, or disagreeing with their block's parameters.
    pub repairs_rejected: u64,
    /// Repair symbols not needed: block already complete, duplicate index, or too old.
    pub repairs_unneeded: u64,
    /// Source packets recovered.
    pub recovered_packets: u64,
    /// Blocks from which at least one source was recovered.
    pub blocks_recovered: u64,
    /// Incomplete blocks given up: sources left the window, or the shards were inconsistent.
    pub blocks_failed: u64,
    /// Incomplete blocks evicted to respect the block count or byte bound.
    pub blocks_evicted: u64,
    /// Recovered packets dropped because nobody drained the queue.
    pub recovered_dropped: u64,
}

#[derive(Debug, Clone)]
struct SourceSlot {
    pn: u64,
    present: bool,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Block {
    source_count: u16,
    repair_count: u16,
    shard_len: u16,
    repairs: Vec<(u16, Vec<u8>)>,
    done: bool,
}

impl Block {
    fn repair_bytes(&self) -> usize {
        self.repairs.iter().map(|(_, d)| d.len()).sum()
    }
}

/// Receiver side: collects sources and repair symbols and recovers lost sources.
pub struct FecDecoder {
    /// Ring of recent sources, slot = pn % SOURCE_WINDOW.
    sources: Vec<SourceSlot>,
    highest: Option<u64>,
    blocks: BTreeMap<u64, Block>,
    repair_bytes: usize,
    recovered: VecDeque<(u64, Vec<u8>)>,
    rs: Option<ReedSolomonDecoder>,
    shard: Vec<u8>,
    stats: FecStats,
}

impl fmt::Debug for FecDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FecDecoder")
            .field("highest", &self.highest)
            .field("blocks", &self.blocks.len())
            .field("repair_bytes", &self.repair_bytes)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for FecDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FecDecoder {
    /// A decoder that has seen nothing.
    pub fn new() -> Self {
        let empty = SourceSlot {
            pn: 0,
            present: false,
            data: Vec::new(),
        };
        FecDecoder {
            sources: vec![empty; SOURCE_WINDOW as usize],
            highest: None,
            blocks: BTreeMap::new(),
            repair_bytes: 0,
            recovered: VecDeque::new(),
            rs: None,
            shard: Vec::with_capacity(MAX_SHARD_BYTES),
            stats: FecStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> FecStats {
        self.stats
    }

    /// True if `pn` is too far behind the highest packet number to be remembered.
    fn too_old(&self, pn: u64) -> bool {
        self.highest
            .is_some_and(|h| pn.saturating_add(SOURCE_WINDOW) <= h)
    }

    /// A source packet arrived (authenticated, decrypted payload).
    ///
    /// It is remembered if it is within [`SOURCE_WINDOW`] of the highest packet number.
    /// If it completes a block whose repairs already arrived, the recovered packets are
    /// queued: drain them with [`FecDecoder::take_recovered`] (the next `on_repair` also
    /// returns them).
    pub fn on_source(&mut self, pn: u64, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD || self.too_old(pn) {
            return;
        }
        if !self.store(pn, payload) {
            return;
        }
        let Some((&first, block)) = self.blocks.range(..=pn).next_back() else {
            return;
        };
        if block.done || pn - first >= u64::from(block.source_count) {
            return;
        }
        let mut recovered = Vec::new();
        self.try_decode(first, &mut recovered);
        for packet in recovered {
            if self.recovered.len() >= MAX_RECOVERED_QUEUE {
                self.recovered.pop_front();
                self.stats.recovered_dropped += 1;
            }
            self.recovered.push_back(packet);
        }
    }

    /// Recovered packets queued by [`FecDecoder::on_source`], oldest first.
    pub fn take_recovered(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.recovered.drain(..).collect()
    }

    /// A repair symbol arrived; returns every source packet newly recovered, as
    /// `(packet number, payload)`, including any queued by `on_source`.
    pub fn on_repair(&mut self, symbol: RepairSymbol) -> Vec<(u64, Vec<u8>)> {
        self.stats.repairs_received += 1;
        let mut out = self.take_recovered();
        if symbol.validate().is_err() {
            self.stats.repairs_rejected += 1;
            return out;
        }
        let first = symbol.first_pn;
        match self.blocks.get_mut(&first) {
            Some(block) => {
                if block.source_count != symbol.source_count
                    || block.repair_count != symbol.repair_count
                    || usize::from(block.shard_len) != symbol.data.len()
                {
                    self.stats.repairs_rejected += 1;
                    return out;
                }
                if block.done || block.repairs.iter().any(|(i, _)| *i == symbol.repair_index) {
                    self.stats.repairs_unneeded += 1;
                    return out;
                }
                self.repair_bytes += symbol.data.len();
                block.repairs.push((symbol.repair_index, symbol.data));
            }
            None => {
                if self.too_old(first) {
                    self.stats.repairs_unneeded += 1;
                    return out;
                }
                self.repair_bytes += symbol.data.len();
                let block = Block {
                    source_count: symbol.source_count,
                    repair_count: symbol.repair_count,
                    shard_len: symbol.data.len() as u16,
                    repairs: vec![(symbol.repair_index, symbol.data)],
                    done: false,
                };
                self.blocks.insert(first, block);
            }
        }
        self.try_decode(first, &mut out);
        self.enforce_bounds();
        out
    }

    /// Stores a source in the ring; false if it was already there.
    fn store(&mut self, pn: u64, payload: &[u8]) -> bool {
        let slot = &mut self.sources[(pn % SOURCE_WINDOW) as usize];
        if slot.present && slot.pn == pn {
            return false;
        }
        if slot.present && slot.pn > pn {
            // A newer packet owns the slot (only possible before `highest` moved past it).
            return false;
        }
        slot.pn = pn;
        slot.present = true;
        slot.data.clear();
        slot.data.extend_from_slice(payload);
        if self.highest.is_none_or(|h| pn > h) {
            self.highest = Some(pn);
            self.prune_old_blocks();
        }
        true
    }

    fn source(&self, pn: u64) -> Option<&[u8]> {
        let slot = &self.sources[(pn % SOURCE_WINDOW) as usize];
        (slot.present && slot.pn == pn).then_some(&slot.data[..])
    }

    /// Drops blocks whose sources may already have been overwritten in the ring.
    fn prune_old_blocks(&mut self) {
        let Some(highest) = self.highest else { return };
        let Some(limit) = highest.checked_sub(SOURCE_WINDOW - 1) else {
            return;
        };
        // Blocks starting below `limit` may have lost sources from the ring.
        while let Some(entry) = self.blocks.first_entry() {
            if *entry.key() >= limit {
                break;
            }
            let block = entry.remove();
            self.repair_bytes -= block.repair_bytes();
            if !block.done {
                self.stats.blocks_failed += 1;
            }
        }
    }

    fn enforce_bounds(&mut self) {
        while self.blocks.len() > MAX_DECODER_BLOCKS || self.repair_bytes > MAX_DECODER_REPAIR_BYTES
        {
            let Some((_, block)) = self.blocks.pop_first() else {
                break;
            };
            self.repair_bytes -= block.repair_bytes();
            if !block.done {
                self.stats.blocks_evicted += 1;
            }
        }
    }

    /// Recovers block `first` if enough shards are present; appends recovered packets.
    fn try_decode(&mut self, first: u64, out: &mut Vec<(u64, Vec<u8>)>) {
        let Some(block) = self.blocks.get(&first) else {
            return;
        };
        if block.done {
            return;
        }
        let k = usize::from(block.source_count);
        let present = (0..k as u64)
            .filter(|&i| self.source(first + i).is_some())
            .count();
        if present == k {
            self.finish(first, false);
            return;
        }
        if present + block.repairs.len() < k {
            return;
        }
        let shard_len = usize::from(block.shard_len);
        match self.decode_block(first, shard_len, out) {
            Ok(count) => {
                self.stats.recovered_packets += count as u64;
                self.stats.blocks_recovered += u64::from(count > 0);
                self.finish(first, false);
            }
            Err(()) => self.finish(first, true),
        }
    }

    /// Runs Reed-Solomon over block `first`; Err if its shards contradict each other.
    fn decode_block(
        &mut self,
        first: u64,
        shard_len: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<usize, ()> {
        let Some(block) = self.blocks.get(&first) else {
            return Err(());
        };
        let (k, r) = (
            usize::from(block.source_count),
            usize::from(block.repair_count),
        );
        if r == 1 {
            let [(_, parity)] = &block.repairs[..] else {
                return Err(());
            };
            let mut acc = parity.clone();
            let mut missing = None;
            for i in 0..k {
                let pn = first + i as u64;
                let slot = &self.sources[(pn % SOURCE_WINDOW) as usize];
                if !(slot.present && slot.pn == pn) {
                    if missing.replace(i).is_some() {
                        return Err(());
                    }
                } else if 2 + slot.data.len() > shard_len {
                    return Err(());
                } else {
                    xor_shard(&mut acc, &slot.data);
                }
            }
            let Some(i) = missing else { return Ok(0) };
            let payload = shard_payload(&acc).ok_or(())?.to_vec();
            let pn = first + i as u64;
            self.store(pn, &payload);
            out.push((pn, payload));
            return Ok(1);
        }
        let rs = match &mut self.rs {
            Some(rs) => {
                rs.reset(k, r, shard_len).map_err(|_| ())?;
                rs
            }
            None => self
                .rs
                .insert(ReedSolomonDecoder::new(k, r, shard_len).map_err(|_| ())?),
        };
        for i in 0..k {
            let pn = first + i as u64;
            let slot = &self.sources[(pn % SOURCE_WINDOW) as usize];
            if !(slot.present && slot.pn == pn) {
                continue;
            }
            if 2 + slot.data.len() > shard_len {
                // A source longer than the block's shards: the repairs are not for it.
                return Err(());
            }
            fill_shard(&mut self.shard, &slot.data, shard_len);
            rs.add_original_shard(i, &self.shard).map_err(|_| ())?;
        }
        for (index, data) in &block.repairs {
            rs.add_recovery_shard(usize::from(*index), data)
                .map_err(|_| ())?;
        }
        let result = rs.decode().map_err(|_| ())?;
        let start = out.len();
        for (i, shard) in result.restored_original_iter() {
            let Some(payload) = shard_payload(shard) else {
                out.truncate(start);
                return Err(());
            };
            out.push((first + i as u64, payload.to_vec()));
        }
        drop(result);
        for (pn, payload) in &out[start..] {
            self.store(*pn, payload);
        }
        Ok(out.len() - start)
    }

    fn finish(&mut self, first: u64, failed: bool) {
        if let Some(block) = self.blocks.get_mut(&first) {
            self.repair_bytes -= block.repair_bytes();
            block.repairs = Vec::new();
            block.done = true;
            if failed {
                self.stats.blocks_failed += 1;
            }
        }
    }
}

/// Repair symbols needed for a block of `k` sources so that the probability that the block
/// cannot be recovered stays at or below `target_failure`, given an i.i.d. per-packet loss
/// probability `loss` (which applies to repair packets too).
///
/// Exact binomial tail: with `r` repairs, a block of `n = k + r` packets fails when more than
/// `r` of them are lost. Returns 0 when `loss * k < 1e-4` and caps at [`MAX_BLOCK_REPAIRS`].
pub fn repair_count(k: usize, loss: f64, target_failure: f64) -> usize {
    if k == 0 || loss.is_nan() || loss <= 0.0 || loss * (k as f64) < 1e-4 {
        return 0;
    }
    if loss >= 1.0 {
        return MAX_BLOCK_REPAIRS;
    }
    (0..=MAX_BLOCK_REPAIRS)
        .find(|&r| binomial_tail(k + r, r + 1, loss) <= target_failure)
        .unwrap_or(MAX_BLOCK_REPAIRS)
}

/// P(X >= m) for X ~ Binomial(n, p), 0 < p < 1, summed in log space so large `n` cannot
/// underflow the leading terms.
fn binomial_tail(n: usize, m: usize, p: f64) -> f64 {
    let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
    let mut ln_choose = 0.0f64; // ln C(n, j)
    let mut tail = 0.0;
    for j in 0..=n {
        if j >= m {
            tail += (ln_choose + j as f64 * ln_p + (n - j) as f64 * ln_q).exp();
        }
        if j < n {
            ln_choose += ((n - j) as f64).ln() - ((j + 1) as f64).ln();
        }
    }
    tail.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestRng(u64);

    impl TestRng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }
    }

    fn payload(rng: &mut TestRng, pn: u64) -> Vec<u8> {
        let len = match rng.below(8) {
            0 => 0,
            1 => MAX_PAYLOAD,
            2 => 1,
            _ => rng.below(MAX_PAYLOAD as u64 + 1) as usize,
        };
        (0..len)
            .map(|i| (pn as usize * 31 + i * 7) as u8 ^ 0xa5)
            .collect()
    }

    #[derive(Clone)]
    enum Event {
        Source(u64, Vec<u8>),
        Repair(RepairSymbol),
    }

    /// Encodes one block, drops the symbols whose positions are in `lost`, feeds the rest in
    /// `order`, and checks exactly the lost sources come back (when recoverable).
    fn run_block(k: usize, r: usize, first: u64, lost: &[usize], rng: &mut TestRng) {
        let mut enc = FecEncoder::new();
        let sources: Vec<Vec<u8>> = (0..k).map(|i| payload(rng, first + i as u64)).collect();
        for (i, p) in sources.iter().enumerate() {
            enc.push(first + i as u64, p);
        }
        assert_eq!(enc.open_len(), k);
        let repairs = enc.finish_block(r);
        assert_eq!(repairs.len(), r);
        assert_eq!(enc.open_len(), 0);
        let mut events: Vec<Event> = sources
            .iter()
            .enumerate()
            .map(|(i, p)| Event::Source(first + i as u64, p.clone()))
            .chain(repairs.into_iter().map(Event::Repair))
            .enumerate()
            .filter(|(pos, _)| !lost.contains(pos))
            .map(|(_, e)| e)
            .collect();
        rng.shuffle(&mut events);
        let mut dec = FecDecoder::new();
        let mut got = Vec::new();
        for event in events {
            match event {
                Event::Source(pn, p) => {
                    dec.on_source(pn, &p);
                    got.extend(dec.take_recovered());
                }
                Event::Repair(s) => {
                    let mut wire = Vec::new();
                    s.encode(&mut wire);
                    got.extend(dec.on_repair(RepairSymbol::decode(&wire).unwrap()));
                }
            }
        }
        got.sort();
        // Every recovered packet is a real source, and none is returned twice. A source can
        // be recovered although it was not lost, when repairs overtook it.
        for pair in got.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "duplicate recovery k={k} r={r} lost={lost:?}"
            );
        }
        for (pn, p) in &got {
            assert_eq!(
                p,
                &sources[(pn - first) as usize],
                "k={k} r={r} lost={lost:?}"
            );
        }
        assert_eq!(dec.stats().recovered_packets, got.len() as u64);
        let lost_sources: Vec<u64> = lost
            .iter()
            .filter(|&&pos| pos < k)
            .map(|&pos| first + pos as u64)
            .collect();
        if lost.len() <= r {
            for pn in lost_sources {
                assert!(
                    got.iter().any(|(g, _)| *g == pn),
                    "k={k} r={r} lost={lost:?}"
                );
            }
        } else {
            assert!(got.is_empty(), "k={k} r={r} lost={lost:?}");
        }
    }

    #[test]
    fn recovers_every_pattern_small() {
        let mut rng = TestRng(1);
        for (k, r) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
            let n = k + r;
            for mask in 0u32..(1 << n) {
                let lost: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                if lost.len() <= r + 1 {
                    run_block(k, r, 1000 + mask as u64, &lost, &mut rng);
                }
            }
        }
    }

    #[test]
    fn recovers_random_losses() {
        let mut rng = TestRng(2);
        for (k, r) in [
            (8, 1),
            (10, 3),
            (16, 4),
            (32, 4),
            (64, 1),
            (64, 8),
            (64, 16),
            (5, 16),
        ] {
            for _ in 0..6 {
                let mut positions: Vec<usize> = (0..k + r).collect();
                rng.shuffle(&mut positions);
                let count = rng.below(r as u64 + 1) as usize;
                let first = rng.below(1 << 40);
                run_block(k, r, first, &positions[..count], &mut rng);
            }
            // One loss too many: nothing recovered.
            let mut positions: Vec<usize> = (0..k).collect();
            rng.shuffle(&mut positions);
            if r < k {
                run_block(k, r, 7, &positions[..r + 1], &mut rng);
            }
        }
    }

    #[test]
    fn every_supported_shape_encodes() {
        let mut enc = FecEncoder::new();
        let mut pn = 0;
        for k in 1..=MAX_BLOCK_SOURCES {
            for r in 1..=MAX_BLOCK_REPAIRS {
                for _ in 0..k {
                    enc.push(pn, &[pn as u8; 3]);
                    pn += 1;
                }
                assert_eq!(enc.finish_block(r).len(), r, "k={k} r={r}");
            }
        }
    }

    #[test]
    fn duplicates_and_late_sources() {
        let mut rng = TestRng(3);
        let mut enc = FecEncoder::new();
        let sources: Vec<Vec<u8>> = (0..10).map(|i| payload(&mut rng, i)).collect();
        for (i, p) in sources.iter().enumerate() {
            enc.push(100 + i as u64, p);
        }
        let repairs = enc.finish_block(2);
        let mut dec = FecDecoder::new();
        for (i, p) in sources.iter().enumerate().skip(2) {
            dec.on_source(100 + i as u64, p);
            dec.on_source(100 + i as u64, p);
        }
        assert!(dec.on_repair(repairs[1].clone()).is_empty());
        assert!(
            dec.on_repair(repairs[1].clone()).is_empty(),
            "duplicate repair"
        );
        let got = dec.on_repair(repairs[0].clone());
        assert_eq!(
            got,
            vec![(100, sources[0].clone()), (101, sources[1].clone())]
        );
        // The lost source shows up late, and a repeat repair: nothing more happens.
        dec.on_source(100, &sources[0]);
        assert!(dec.take_recovered().is_empty());
        assert!(dec.on_repair(repairs[0].clone()).is_empty());
        let stats = dec.stats();
        assert_eq!(stats.recovered_packets, 2);
        assert_eq!(stats.blocks_recovered, 1);
        assert_eq!(stats.repairs_received, 4);
        assert_eq!(stats.repairs_unneeded, 2);
    }

    #[test]
    fn repairs_before_sources_recover_on_source_arrival() {
        let mut enc = FecEncoder::new();
        for pn in 0..4u64 {
            enc.push(pn, &[pn as u8; 100]);
        }
        let repairs = enc.finish_block(1);
        let mut dec = FecDecoder::new();
        assert!(dec.on_repair(repairs[0].clone()).is_empty());
        dec.on_source(0, &[0; 100]);
        dec.on_source(2, &[2; 100]);
        assert!(dec.take_recovered().is_empty());
        dec.on_source(3, &[3; 100]);
        assert_eq!(dec.take_recovered(), vec![(1, vec![1; 100])]);
    }

    #[test]
    fn push_auto_closes_on_gap_and_full_block() {
        let mut enc = FecEncoder::new();
        assert_eq!(enc.next_pn(), None);
        enc.push(10, b"a");
        assert_eq!(enc.next_pn(), Some(11));
        enc.push(11, b"b");
        // Gap before any finish_block: the old block is dropped (repair count 0).
        enc.push(20, b"c");
        assert_eq!(enc.open_len(), 1);
        assert_eq!(enc.finish_block(2).len(), 2);
        // Now the remembered repair count is 2.
        for pn in 30..30 + MAX_BLOCK_SOURCES as u64 + 3 {
            enc.push(pn, b"xy");
        }
        assert_eq!(enc.open_len(), 3);
        enc.push(1000, &[0; MAX_PAYLOAD + 1]);
        assert_eq!(enc.open_len(), 0);
        let out = enc.finish_block(1);
        // Full block of 64 (2 repairs) then the 3 closed by the oversized payload (2 repairs).
        assert_eq!(out.len(), 4);
        assert_eq!((out[0].first_pn, out[0].source_count), (30, 64));
        assert_eq!((out[2].first_pn, out[2].source_count), (94, 3));
        assert_eq!(enc.stats().unprotected, 1);
        assert!(enc.finish_block(3).is_empty(), "empty block");
    }

    #[test]
    fn repair_symbol_golden_bytes() {
        let symbol = RepairSymbol {
            first_pn: 0x0102_0304_0506_0708,
            source_count: 3,
            repair_index: 1,
            repair_count: 2,
            data: vec![0xaa, 0xbb, 0xcc, 0xdd],
        };
        let mut wire = vec![0xee];
        symbol.encode(&mut wire);
        assert_eq!(
            wire,
            [
                0xee, 1, 2, 3, 4, 5, 6, 7, 8, 0, 3, 0, 1, 0, 2, 0, 4, 0xaa, 0xbb, 0xcc, 0xdd
            ]
        );
        assert_eq!(RepairSymbol::decode(&wire[1..]).unwrap(), symbol);
        assert_eq!(RepairSymbol::decode_prefix(&wire[1..]).unwrap().1, 20);

        // A real encoder output: one source "hi" is the shard [0, 2, 'h', 'i'].
        let mut enc = FecEncoder::new();
        enc.push(5, b"hi");
        let repairs = enc.finish_block(1);
        assert_eq!(repairs[0].data, [0, 2, b'h', b'i']);
        let mut dec = FecDecoder::new();
        assert_eq!(dec.on_repair(repairs[0].clone()), vec![(5, b"hi".to_vec())]);
    }

    #[test]
    fn malformed_symbols_rejected() {
        let good = RepairSymbol {
            first_pn: 9,
            source_count: 4,
            repair_index: 0,
            repair_count: 2,
            data: vec![0; 6],
        };
        let mut wire = Vec::new();
        good.encode(&mut wire);
        let with = |offset: usize, value: u16| {
            let mut w = wire.clone();
            w[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
            RepairSymbol::decode(&w)
        };
        assert_eq!(with(8, 0), Err(FecError::SourceCount { count: 0 }));
        assert_eq!(with(8, 65), Err(FecError::SourceCount { count: 65 }));
        assert_eq!(with(12, 0), Err(FecError::RepairCount { count: 0 }));
        assert_eq!(with(12, 17), Err(FecError::RepairCount { count: 17 }));
        assert_eq!(
            with(10, 2),
            Err(FecError::RepairIndex { index: 2, count: 2 })
        );
        assert_eq!(with(14, 5), Err(FecError::DataLength { len: 5 }));
        assert_eq!(with(14, 0), Err(FecError::DataLength { len: 0 }));
        assert_eq!(with(14, 1504), Err(FecError::DataLength { len: 1504 }));
        assert_eq!(
            with(14, 8),
            Err(FecError::Truncated {
                len: 22,
                expected: 24
            })
        );
        assert_eq!(with(14, 4), Err(FecError::TrailingBytes { extra: 2 }));
        assert_eq!(
            RepairSymbol::decode(&wire[..10]),
            Err(FecError::Truncated {
                len: 10,
                expected: REPAIR_HEADER_LEN
            })
        );
        let mut w = wire.clone();
        w[..8].copy_from_slice(&(u64::MAX - 2).to_be_bytes());
        assert!(matches!(
            RepairSymbol::decode(&w),
            Err(FecError::PacketNumberOverflow { .. })
        ));
        assert!(!FecError::DataLength { len: 5 }.to_string().is_empty());

        // Random garbage never panics, and invalid symbols passed directly are counted.
        let mut rng = TestRng(4);
        let mut dec = FecDecoder::new();
        for _ in 0..20_000 {
            let len = rng.below(64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= REPAIR_HEADER_LEN && rng.below(2) == 0 {
                // Make the header plausible so the data path is exercised too.
                buf[8..10].copy_from_slice(&(1 + rng.below(4) as u16).to_be_bytes());
                let count = 1 + rng.below(2) as u16; // XOR parity and Reed-Solomon
                buf[10..12].copy_from_slice(&(rng.below(u64::from(count)) as u16).to_be_bytes());
                buf[12..14].copy_from_slice(&count.to_be_bytes());
                let data_len = ((len - REPAIR_HEADER_LEN) & !1) as u16;
                buf[14..16].copy_from_slice(&data_len.to_be_bytes());
                buf.truncate(REPAIR_HEADER_LEN + usize::from(data_len));
                buf[..8].copy_from_slice(&rng.below(64).to_be_bytes());
            }
            if let Ok(symbol) = RepairSymbol::decode(&buf) {
                dec.on_repair(symbol);
            }
            dec.on_source(rng.below(64), &buf);
        }
        let before = dec.stats().repairs_rejected;
        dec.on_repair(RepairSymbol {
            data: vec![0; 3],
            ..good.clone()
        });
        dec.on_repair(RepairSymbol {
            repair_index: 9,
            ..good.clone()
        });
        assert_eq!(dec.stats().repairs_rejected, before + 2);
    }

    #[test]
    fn inconsistent_block_parameters_rejected() {
        let mut enc = FecEncoder::new();
        for pn in 0..4u64 {
            enc.push(pn, &[1; 10]);
        }
        let repairs = enc.finish_block(2);
        let mut dec = FecDecoder::new();
        dec.on_repair(repairs[0].clone());
        let other = RepairSymbol {
            repair_count: 3,
            ..repairs[1].clone()
        };
        assert!(dec.on_repair(other).is_empty());
        assert_eq!(dec.stats().repairs_rejected, 1);
        // A source longer than the block's shard size makes the block fail, not panic.
        let mut dec = FecDecoder::new();
        dec.on_source(0, &[1; 100]);
        dec.on_source(1, &[1; 10]);
        dec.on_repair(repairs[0].clone());
        assert!(dec.on_repair(repairs[1].clone()).is_empty());
        assert_eq!(dec.stats().blocks_failed, 1);
    }

    /// Long run with loss: memory stays within the stated bounds and most losses recover.
    #[test]
    fn bounded_memory_over_100k_packets() {
        let mut rng = TestRng(5);
        let mut enc = FecEncoder::new();
        let mut dec = FecDecoder::new();
        let mut lost_sources = 0u64;
        // Short payloads, and losses in one block of 32 only: every recovery runs an
        // O(field size) error-locator evaluation, which the unoptimised debug build makes slow.
        let payload = [0x42u8; 160];
        let mut pn = 0u64;
        let mut block_no = 0u64;
        while pn < 100_000 {
            let k = 1 + rng.below(MAX_BLOCK_SOURCES as u64) as usize;
            let loss_pct = if block_no % 32 == 0 { 5 } else { 0 };
            block_no += 1;
            for _ in 0..k {
                let p = &payload[..(pn % 160) as usize];
                enc.push(pn, p);
                if rng.below(100) < loss_pct {
                    lost_sources += 1;
                } else {
                    dec.on_source(pn, p);
                }
                pn += 1;
            }
            for symbol in enc.finish_block(repair_count(k, 0.05, 1e-3)) {
                pn += 1; // repair packets use packet numbers too
                if rng.below(100) >= loss_pct {
                    dec.on_repair(symbol);
                }
            }
            assert!(dec.blocks.len() <= MAX_DECODER_BLOCKS);
            assert!(dec.repair_bytes <= MAX_DECODER_REPAIR_BYTES);
            assert_eq!(dec.sources.len(), SOURCE_WINDOW as usize);
            assert!(
                dec.sources
                    .iter()
                    .all(|s| s.data.capacity() <= 2 * MAX_PAYLOAD)
            );
        }
        assert!(lost_sources > 20);
        let stats = dec.stats();
        assert!(
            stats.recovered_packets * 100 >= lost_sources * 95,
            "{stats:?} lost {lost_sources}"
        );

        // A flood of repairs for blocks whose sources never come: evicted, bounded.
        let mut dec = FecDecoder::new();
        for i in 0..100_000u64 {
            let symbol = RepairSymbol {
                first_pn: i * 64,
                source_count: 64,
                repair_index: 0,
                repair_count: 16,
                data: vec![0; MAX_SHARD_BYTES],
            };
            assert!(dec.on_repair(symbol).is_empty());
            assert!(dec.blocks.len() <= MAX_DECODER_BLOCKS);
            assert!(dec.repair_bytes <= MAX_DECODER_REPAIR_BYTES);
        }
        assert_eq!(
            dec.stats().blocks_evicted,
            100_000 - MAX_DECODER_BLOCKS as u64
        );
    }

    #[test]
    fn repair_count_sanity() {
        assert_eq!(repair_count(64, 0.0, 1e-3), 0);
        assert_eq!(repair_count(0, 0.1, 1e-3), 0);
        assert_eq!(repair_count(64, f64::NAN, 1e-3), 0);
        assert_eq!(repair_count(10, 1e-6, 1e-9), 0, "loss * k negligible");
        let low = repair_count(64, 0.001, 1e-3);
        assert!((1..=2).contains(&low), "{low}");
        assert_eq!(repair_count(64, 0.001, 1e-2), 1);
        let high = repair_count(64, 0.05, 1e-3);
        assert!(high > low && high < MAX_BLOCK_REPAIRS, "{high}");
        assert_eq!(repair_count(64, 0.5, 1e-3), MAX_BLOCK_REPAIRS);
        assert_eq!(repair_count(64, 1.0, 1e-3), MAX_BLOCK_REPAIRS);
        let mut last = 0;
        for loss in [0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1] {
            let r = repair_count(32, loss, 1e-4);
            assert!(r >= last, "monotone in loss");
            last = r;
        }
        // Exact tail against a hand-computed value: P(X >= 2), n = 3, p = 0.1 is 0.028.
        assert!((binomial_tail(3, 2, 0.1) - 0.028).abs() < 1e-12);
        assert!((binomial_tail(100_000, 0, 0.3) - 1.0).abs() < 1e-9);
    }

    /// `cargo test --release -p tern-transport --lib fec::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "micro-benchmark; run in release with --nocapture"]
    fn bench_encode_decode() {
        for (k, r) in [(16, 1), (64, 1), (16, 2), (64, 2), (64, 4), (64, 16)] {
            let payload = [0x33u8; 1400];
            let blocks = 2000u64;
            let mut enc = FecEncoder::new();
            let mut all = Vec::new();
            let start = std::time::Instant::now();
            for b in 0..blocks {
                for i in 0..k as u64 {
                    enc.push(b * 1000 + i, &payload);
                }
                all.push(enc.finish_block(r));
            }
            let enc_secs = start.elapsed().as_secs_f64();
            let mut dec = FecDecoder::new();
            let start = std::time::Instant::now();
            for (b, repairs) in all.into_iter().enumerate() {
                for i in r as u64..k as u64 {
                    dec.on_source(b as u64 * 1000 + i, &payload);
                }
                for s in repairs {
                    std::hint::black_box(dec.on_repair(s));
                }
            }
            let dec_secs = start.elapsed().as_secs_f64();
            let bytes = blocks as f64 * k as f64 * 1400.0;
            println!(
                "k={k} r={r}: encode {:.0} MB/s of source, decode (r lost) {:.0} MB/s of source",
                bytes / enc_secs / 1e6,
                bytes / dec_secs / 1e6
            );
            assert_eq!(dec.stats().recovered_packets, blocks * r as u64);
        }
    }
}
