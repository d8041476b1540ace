//! Adaptive compression of stream data as self-delimiting records.
//!
//! # Role
//!
//! The node cuts each relayed TCP byte stream into chunks (≤ 64 KiB) and turns every chunk
//! into one record on the reliable stream with [`RecordEncoder`]; the far side feeds the
//! stream, in slices of any size, to [`RecordDecoder`], which emits the original bytes.
//! zstd keeps one compression context per stream: each record is the output of that context
//! flushed at the record's end, so a record can refer to the stream's earlier *compressed*
//! records within the window ([`ZSTD_WINDOW_LOG`], 8 MiB; [`ZSTD_SMALL_WINDOW_LOG`], 2 MiB,
//! for the streams beyond a node's budget), and the far side's decoder keeps the matching
//! context. The node's chunks are often a few KiB (it reads what the
//! stream's window frees), and independent records of that size lose a quarter of the ratio:
//! on the first 150 MB of the /usr corpus in 16 KiB chunks, zstd-3 makes 2.14x record by
//! record and 2.64x as one stream. Raw records bypass both contexts, so falling back to raw
//! and probing again needs no reset.
//!
//! Compression pays on a WAN link only when the data compresses, so the encoder watches its
//! own results: when the recent records (decayed average, ~16 records) shrink by less than
//! 20 % the stream falls back to raw records
//! for a back-off of N records (N = 2, doubling after every failed probe up to 32, back to
//! 2 after a probe that compresses), then probes again. A full-length back-off whose last
//! record does not look compressible (below) is followed by another one, without a probe,
//! up to 7 times in a row. Already-compressed or encrypted payloads thus cost one probe per
//! 256 records (16 MiB of 64 KiB records) instead of a compression per record, and
//! compressible data after an incompressible stretch is found again quickly (a cap of 1024
//! records = 64 MiB kept the /usr corpus raw for long stretches on `mpls`).
//! Where the link is slow the node turns the back-off off (`set_compress_all`): a raw
//! record never enters the zstd window, so the back-off also loses later matches against
//! it, and compressing incompressible bytes costs zstd-3 only ~0.6 ms of CPU per MB.
//! A back-off also ends at once at a record that looks compressible (order-0 entropy of a
//! 4 KiB sample below 7.5 bits/byte, `looks_compressible`): the probe is made on that
//! record. An early probe that does not pay starts a back-off without early probes, so a
//! back-off costs at most one extra probe.
//!
//! # Wire format (integers big-endian)
//!
//! ```text
//! [codec u8][stored_len u32][original_len u32][stored bytes; stored_len]
//! codec 0 = raw   (stored_len == original_len)
//!       1 = lz4   (one lz4_flex / LZ4 block, no frame, no size prefix)
//!       2 = zstd  (the stream's zstd context fed this record and flushed; the records
//!                  of codec 2 of one stream, concatenated, are one zstd frame in progress)
//! ```
//!
//! `original_len ≤ MAX_RECORD` (256 KiB) and `stored_len ≤ MAX_STORED`; the decoder checks
//! both before buffering or allocating anything, and checks that a compressed record
//! decompresses to exactly `original_len` bytes. Empty chunks produce no record; larger
//! chunks are split at `MAX_RECORD`. An lz4 record is only emitted when it is smaller than the
//! raw record would be; a zstd record is always emitted once compressed (the context has
//! taken it in; for incompressible input zstd's stored blocks cost a few bytes per record).
//! Unknown codec numbers are errors: a new codec needs a new transport protocol version.
//!
//! Sans-IO and deterministic: the compressors are pure functions of their input.

use std::fmt;

use zstd::stream::raw::{
    Decoder as ZstdDecoder, Encoder as ZstdEncoder, InBuffer, Operation, OutBuffer,
};
use zstd::zstd_safe::{CParameter, DParameter};

use lz4_flex::block::{CompressTable, compress_into_with_table, get_maximum_output_size};

/// Largest original (decompressed) size of one record, in bytes.
pub const MAX_RECORD: usize = 256 * 1024;
/// Largest stored size the decoder accepts: `MAX_RECORD` plus room for a codec's framing
/// (zstd's bound for incompressible input is 1/256 more plus a few bytes).
pub const MAX_STORED: usize = MAX_RECORD + MAX_RECORD / 128;
/// The zstd window of a stream (log2 bytes): how far back a record can refer. Both ends hold
/// this much per compressing stream; the decoder refuses frames that ask for more. On the
/// first 200 MB of the /usr corpus zstd -3 makes 2.13x with a 2 MiB window and 2.47x with
/// 8 MiB (tar holds the same files in several places), at the same speed (`zstd -3
/// --zstd=wlog=21|23`).
pub const ZSTD_WINDOW_LOG: u32 = 23;
/// The window of streams beyond the node's budget of large windows (see `tern-node`).
pub const ZSTD_SMALL_WINDOW_LOG: u32 = 21;
/// Size of a record header, in bytes.
pub const RECORD_HEADER_LEN: usize = 9;
/// Chunks shorter than this are always sent raw and do not affect the back-off.
pub const MIN_COMPRESS_LEN: usize = 64;
/// Raw records after the first poor compression result.
pub const INITIAL_BACKOFF_RECORDS: u32 = 2;
/// Upper bound of the doubling back-off.
pub const MAX_BACKOFF_RECORDS: u32 = 32;
/// Probes skipped in a row at the end of full-length back-offs whose last record does not
/// look compressible; the next one is made whatever the record looks like, for repeats of
/// high-entropy data that only a match in the window finds. Incompressible streams thus
/// spend one probe per 256 records (16 MiB of 64 KiB records) instead of per 32: at
/// 1 Gbit/s a zstd-3 probe of 64 KiB of random bytes took ~10 % of the sending node's CPU
/// and held its loop for a fraction of a millisecond.
pub const MAX_SKIPPED_PROBES: u32 = 7;

const CODEC_RAW: u8 = 0;
const CODEC_LZ4: u8 = 1;
const CODEC_ZSTD: u8 = 2;

/// Compression codec of a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    /// No compression.
    Raw,
    /// LZ4 block format: fast, modest ratio.
    Lz4,
    /// Zstandard at the given level (1..=19 typical; 0 means zstd's default, 3).
    Zstd {
        /// Compression level.
        level: i32,
    },
}

impl Codec {
    /// The codec number written in record headers.
    pub fn id(self) -> u8 {
        match self {
            Codec::Raw => CODEC_RAW,
            Codec::Lz4 => CODEC_LZ4,
            Codec::Zstd { .. } => CODEC_ZSTD,
        }
    }
}

/// Errors from decoding a record stream. After one, the decoder refuses further input.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The codec byte is not 0, 1 or 2.
    #[error("unknown record codec {codec} at stream offset {offset}")]
    UnknownCodec {
        /// The codec byte.
        codec: u8,
        /// Stream offset of the record header.
        offset: u64,
    },
    /// `original_len` exceeds [`MAX_RECORD`].
    #[error("record at stream offset {offset} claims {original_len} bytes, limit is {MAX_RECORD}")]
    RecordTooLarge {
        /// The header's original length.
        original_len: u32,
        /// Stream offset of the record header.
        offset: u64,
    },
    /// `stored_len` exceeds [`MAX_STORED`].
    #[error("record at stream offset {offset} stores {stored_len} bytes, limit is {MAX_STORED}")]
    StoredTooLarge {
        /// The header's stored length.
        stored_len: u32,
        /// Stream offset of the record header.
        offset: u64,
    },
    /// A raw record whose two lengths differ.
    #[error(
        "raw record at stream offset {offset} stores {stored_len} bytes but claims {original_len}"
    )]
    RawLengthMismatch {
        /// The header's stored length.
        stored_len: u32,
        /// The header's original length.
        original_len: u32,
        /// Stream offset of the record header.
        offset: u64,
    },
    /// LZ4 data that does not decode.
    #[error("lz4 record at stream offset {offset} is corrupt")]
    Lz4 {
        /// Stream offset of the record header.
        offset: u64,
        /// What lz4_flex found.
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    /// Zstandard data that does not decode (or a decompression context could not be made).
    #[error("zstd record at stream offset {offset} is corrupt")]
    Zstd {
        /// Stream offset of the record header.
        offset: u64,
        /// What zstd reported.
        #[source]
        source: std::io::Error,
    },
    /// Decompressed size differs from the header's `original_len`.
    #[error(
        "record at stream offset {offset} decompressed to {actual} bytes, header says {expected}"
    )]
    SizeMismatch {
        /// The header's original length.
        expected: usize,
        /// Bytes actually produced.
        actual: usize,
        /// Stream offset of the record header.
        offset: u64,
    },
    /// An earlier error ended this stream.
    #[error("record stream already failed")]
    Failed,
}

/// Counters of a [`RecordEncoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompressorStats {
    /// Chunk bytes given to `encode`.
    pub input_bytes: u64,
    /// Bytes appended to `out`, headers included.
    pub output_bytes: u64,
    /// Records stored raw.
    pub records_raw: u64,
    /// Records stored compressed.
    pub records_compressed: u64,
    /// Compression attempts made at the end of a back-off, or early (see `early_probes`).
    pub probes: u64,
    /// Probes made before a back-off's end because a record looked compressible.
    pub early_probes: u64,
    /// Times the stream switched to raw records because compression did not pay.
    pub backoffs: u64,
    /// Probes skipped at the end of a back-off (see [`MAX_SKIPPED_PROBES`]).
    pub skipped_probes: u64,
}

/// Per-stream adaptive compressor producing records.
pub struct RecordEncoder {
    codec: Codec,
    lz4_table: CompressTable,
    /// Made at the first zstd attempt, so streams that never compress hold no window.
    zstd: Option<ZstdEncoder<'static>>,
    /// zstd window (log2 bytes).
    window_log: u32,
    /// Length of the next back-off, in records.
    backoff_records: u32,
    /// Raw records still to send before the next probe.
    raw_remaining: u32,
    /// The next compression attempt is a probe.
    probing: bool,
    /// Probes skipped in a row (see [`MAX_SKIPPED_PROBES`]).
    skipped_probes: u32,
    /// A record of this back-off looked compressible and was probed early without paying
    /// off: the rest of the back-off does not look again.
    early_probe_failed: bool,
    /// Input and output bytes of the recent compressed records, decayed by 15/16 per record
    /// (about the last 16, 1 MiB of 64 KiB records): the pay-off test looks at these, not at one record.
    recent_in: f64,
    recent_out: f64,
    /// Compress every record: no back-off (see [`RecordEncoder::set_compress_all`]).
    compress_all: bool,
    stats: CompressorStats,
}

impl fmt::Debug for RecordEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordEncoder")
            .field("codec", &self.codec)
            .field("backoff_records", &self.backoff_records)
            .field("raw_remaining", &self.raw_remaining)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RecordEncoder {
    /// An encoder compressing with `codec`.
    ///
    /// If a zstd context cannot be made (out of memory) or fails, the stream goes raw.
    pub fn new(codec: Codec) -> Self {
        Self::with_window_log(codec, ZSTD_WINDOW_LOG)
    }

    /// An encoder whose zstd window is `2^window_log` bytes (clamped to
    /// [`ZSTD_SMALL_WINDOW_LOG`]..=[`ZSTD_WINDOW_LOG`]).
    pub fn with_window_log(codec: Codec, window_log: u32) -> Self {
        RecordEncoder {
            codec,
            lz4_table: CompressTable::large(),
            zstd: None,
            window_log: window_log.clamp(ZSTD_SMALL_WINDOW_LOG, ZSTD_WINDOW_LOG),
            backoff_records: INITIAL_BACKOFF_RECORDS,
            raw_remaining: 0,
            probing: false,
            skipped_probes: 0,
            early_probe_failed: false,
            recent_in: 0.0,
            recent_out: 0.0,
            compress_all: false,
            stats: CompressorStats::default(),
        }
    }

    /// Compress every record (`true`) or back off while compression does not pay (`false`,
    /// the default). The back-off saves CPU, but a raw record also never enters the zstd
    /// window, so a later copy of incompressible bytes (the same .gz or firmware blob twice
    /// in a tar) cannot be matched either: on the first 200 MB of the /usr corpus, zstd-3 in
    /// 64 KiB records makes 2.21x with back-off and 2.37x compressing every record, and
    /// random bytes cost zstd-3 ~0.6 ms of CPU per MB (1.7 GB/s here). The node turns this
    /// on where the link is slow enough that the CPU does not matter.
    pub fn set_compress_all(&mut self, on: bool) {
        if on && !self.compress_all {
            self.raw_remaining = 0;
            self.probing = false;
            self.skipped_probes = 0;
        }
        self.compress_all = on;
    }

    /// The codec in use.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The zstd window (log2 bytes) this encoder uses if it compresses with zstd.
    pub fn window_log(&self) -> u32 {
        self.window_log
    }

    /// Counters so far.
    pub fn stats(&self) -> &CompressorStats {
        &self.stats
    }

    /// Appends `chunk` to `out` as one record (several if it exceeds [`MAX_RECORD`]; none if
    /// it is empty).
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let before = out.len();
        for piece in chunk.chunks(MAX_RECORD) {
            self.encode_one(piece, out);
        }
        self.stats.input_bytes += chunk.len() as u64;
        self.stats.output_bytes += (out.len() - before) as u64;
    }

    fn encode_one(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        if self.codec == Codec::Raw || piece.len() < MIN_COMPRESS_LEN {
            write_raw(piece, out);
            self.stats.records_raw += 1;
            return;
        }
        let mut early = false;
        if self.raw_remaining > 0 {
            if !self.early_probe_failed && looks_compressible(piece) {
                // The content changed (from compressed files to text or code, say): probe
                // now rather than at the back-off's end.
                self.raw_remaining = 0;
                self.probing = true;
                early = true;
                self.stats.early_probes += 1;
            } else {
                self.raw_remaining -= 1;
                if self.raw_remaining == 0
                    && self.backoff_records == MAX_BACKOFF_RECORDS
                    && self.skipped_probes < MAX_SKIPPED_PROBES
                {
                    // Still incompressible-looking after the longest back-off: another one.
                    self.skipped_probes += 1;
                    self.stats.skipped_probes += 1;
                    self.raw_remaining = MAX_BACKOFF_RECORDS;
                }
                self.probing = self.raw_remaining == 0;
                write_raw(piece, out);
                self.stats.records_raw += 1;
                return;
            }
        }
        if self.probing {
            self.stats.probes += 1;
        }
        self.skipped_probes = 0;
        let start = out.len();
        let stored = self.compress(piece, out, start);
        // zstd's context has taken the piece in: its record must go out whatever its size.
        let must_send = matches!(self.codec, Codec::Zstd { .. });
        match stored {
            Some(stored) if stored < piece.len() || must_send => {
                write_header(out, start, self.codec.id(), stored, piece.len());
                self.stats.records_compressed += 1;
            }
            _ => {
                out.truncate(start);
                write_raw(piece, out);
                self.stats.records_raw += 1;
            }
        }
        // Paying off means saving at least 20 % (stored * 5 <= original * 4) over the recent
        // records: one record of already-compressed bytes amid text (a .gz in a tar) does not
        // switch compression off, a stream of them does. A probe is judged alone.
        let out_len = stored.map_or(piece.len(), |s| s.min(piece.len()));
        if self.probing {
            (self.recent_in, self.recent_out) = (0.0, 0.0);
        }
        self.recent_in = self.recent_in * 0.9375 + piece.len() as f64;
        self.recent_out = self.recent_out * 0.9375 + out_len as f64;
        let paid = stored.is_some() && self.recent_out * 5.0 <= self.recent_in * 4.0;
        if paid {
            if self.probing {
                self.backoff_records = INITIAL_BACKOFF_RECORDS;
            }
            self.early_probe_failed = false;
        } else if !self.compress_all {
            self.early_probe_failed = early;
            if self.probing {
                self.backoff_records = (self.backoff_records * 2).min(MAX_BACKOFF_RECORDS);
            }
            self.raw_remaining = self.backoff_records;
            self.stats.backoffs += 1;
        }
        self.probing = false;
    }

    /// Compresses `piece` into `out` after a header-sized gap at `start`; returns the
    /// compressed length, or `None` if the codec failed or (lz4) the output did not fit.
    /// A zstd failure leaves the context in an unknown state, so the stream goes raw for good.
    fn compress(&mut self, piece: &[u8], out: &mut Vec<u8>, start: usize) -> Option<usize> {
        let body = start + RECORD_HEADER_LEN;
        match self.codec {
            Codec::Raw => None,
            Codec::Lz4 => {
                out.resize(body + get_maximum_output_size(piece.len()), 0);
                let n = compress_into_with_table(piece, &mut out[body..], &mut self.lz4_table).ok();
                out.truncate(body + n.unwrap_or(0));
                n
            }
            Codec::Zstd { level } => {
                let n = self.zstd_stream(level, piece, out, body);
                if n.is_none() {
                    self.codec = Codec::Raw;
                    self.zstd = None;
                }
                out.truncate(body + n.unwrap_or(0));
                n
            }
        }
    }

    /// Feeds `piece` to the stream's zstd context and flushes it into `out[body..]`.
    fn zstd_stream(
        &mut self,
        level: i32,
        piece: &[u8],
        out: &mut Vec<u8>,
        body: usize,
    ) -> Option<usize> {
        let zstd = match &mut self.zstd {
            Some(z) => z,
            None => {
                let mut z = ZstdEncoder::new(level).ok()?;
                z.set_parameter(CParameter::WindowLog(self.window_log))
                    .ok()?;
                self.zstd.insert(z)
            }
        };
        // Flushing emits everything taken in, so the bound of one frame holding `piece`
        // (plus the few bytes of a block header per flush) always suffices.
        let cap = zstd::zstd_safe::compress_bound(piece.len()) + 64;
        out.resize(body + cap, 0);
        let mut input = InBuffer::around(piece);
        let mut output = OutBuffer::around(&mut out[body..]);
        while input.pos() < piece.len() {
            zstd.run(&mut input, &mut output).ok()?;
        }
        loop {
            let left = zstd.flush(&mut output).ok()?;
            if left == 0 {
                break;
            }
            if output.pos() == cap {
                return None; // cannot happen within the bound; treated as a codec failure
            }
        }
        let n = output.pos();
        (n <= MAX_STORED).then_some(n)
    }
}

/// Whether `piece` looks worth a compression probe: the order-0 entropy of up to 4 KiB
/// sampled across it is below 7.5 bits per byte. Random and already-compressed bytes measure
/// ~7.95 on such a sample; text and machine code 4.5-6.5. Costs ~1 µs per record.
fn looks_compressible(piece: &[u8]) -> bool {
    const SLICES: usize = 4;
    const SLICE: usize = 1024;
    let mut counts = [0u32; 256];
    let mut n = 0usize;
    let step = (piece.len() / SLICES).max(1);
    for i in 0..SLICES {
        let start = i * step;
        if start >= piece.len() {
            break;
        }
        for &b in &piece[start..(start + SLICE).min(piece.len())] {
            counts[usize::from(b)] += 1;
            n += 1;
        }
    }
    if n < 256 {
        return false;
    }
    let total = n as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    entropy < 7.5
}

fn write_header(out: &mut [u8], start: usize, codec: u8, stored: usize, original: usize) {
    debug_assert!(original <= MAX_RECORD && stored <= MAX_STORED);
    out[start] = codec;
    out[start + 1..start + 5].copy_from_slice(&(stored as u32).to_be_bytes());
    out[start + 5..start + 9].copy_from_slice(&(original as u32).to_be_bytes());
}

fn write_raw(piece: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    write_header(out, start, CODEC_RAW, piece.len(), piece.len());
    out.extend_from_slice(piece);
}

/// Counters of a [`RecordDecoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecompressorStats {
    /// Stream bytes of complete records consumed, headers included.
    pub input_bytes: u64,
    /// Bytes produced.
    pub output_bytes: u64,
    /// Records decoded.
    pub records: u64,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    codec: u8,
    stored_len: usize,
    original_len: usize,
}

impl Header {
    fn total_len(&self) -> usize {
        RECORD_HEADER_LEN + self.stored_len
    }
}

/// Validates a record header; `offset` is its stream offset, for errors.
fn parse_header(bytes: &[u8; RECORD_HEADER_LEN], offset: u64) -> Result<Header, RecordError> {
    let codec = bytes[0];
    let stored = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let original = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
    if codec > CODEC_ZSTD {
        return Err(RecordError::UnknownCodec { codec, offset });
    }
    if original as usize > MAX_RECORD {
        return Err(RecordError::RecordTooLarge {
            original_len: original,
            offset,
        });
    }
    if stored as usize > MAX_STORED {
        return Err(RecordError::StoredTooLarge {
            stored_len: stored,
            offset,
        });
    }
    if codec == CODEC_RAW && stored != original {
        return Err(RecordError::RawLengthMismatch {
            stored_len: stored,
            original_len: original,
            offset,
        });
    }
    Ok(Header {
        codec,
        stored_len: stored as usize,
        original_len: original as usize,
    })
}

/// Incremental record decoder: push arbitrary slices of the stream, get the original bytes.
pub struct RecordDecoder {
    /// An incomplete record (at most `RECORD_HEADER_LEN + MAX_STORED` bytes).
    partial: Vec<u8>,
    /// The stream's zstd context, made at its first zstd record.
    zstd: Option<ZstdDecoder<'static>>,
    /// Largest zstd window this stream may use (its context's memory); `None`: zstd records
    /// are refused (the receiver's budget of zstd contexts is spent).
    window_log_max: Option<u32>,
    /// Stream offset of the next record header.
    offset: u64,
    failed: bool,
    stats: DecompressorStats,
}

impl fmt::Debug for RecordDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordDecoder")
            .field("buffered", &self.partial.len())
            .field("offset", &self.offset)
            .field("failed", &self.failed)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for RecordDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordDecoder {
    /// Feeds one zstd record to the stream's context; returns the bytes written to `dst`
    /// (the caller compares with the header's length: `dst` has one byte of room beyond it).
    fn zstd_stream(&mut self, stored: &[u8], dst: &mut [u8]) -> std::io::Result<usize> {
        let zstd = match &mut self.zstd {
            Some(z) => z,
            None => {
                let Some(log) = self.window_log_max else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::OutOfMemory,
                        "no zstd context for this stream: the receiver's budget is spent",
                    ));
                };
                let mut z = ZstdDecoder::new()?;
                z.set_parameter(DParameter::WindowLogMax(log))?;
                self.zstd.insert(z)
            }
        };
        let mut input = InBuffer::around(stored);
        let mut output = OutBuffer::around(dst);
        loop {
            let (in_before, out_before) = (input.pos(), output.pos());
            zstd.run(&mut input, &mut output)?;
            let progressed = input.pos() > in_before || output.pos() > out_before;
            if !progressed || output.pos() == output.capacity() {
                break;
            }
        }
        if input.pos() < stored.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "zstd record holds more than its stated length",
            ));
        }
        Ok(output.pos())
    }

    /// A decoder at the start of a stream (zstd windows up to [`ZSTD_WINDOW_LOG`]).
    pub fn new() -> Self {
        Self::with_window_log_max(Some(ZSTD_WINDOW_LOG))
    }

    /// A decoder whose zstd context may hold a window of at most 2^`log` bytes (a frame that
    /// needs more is an error), or that refuses zstd records (`None`): a receiver bounds the
    /// memory a peer's streams can make it hold.
    pub fn with_window_log_max(log: Option<u32>) -> Self {
        RecordDecoder {
            window_log_max: log.map(|l| l.min(ZSTD_WINDOW_LOG)),
            partial: Vec::new(),
            zstd: None,
            offset: 0,
            failed: false,
            stats: DecompressorStats::default(),
        }
    }

    /// Bytes held from an incomplete record.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> &DecompressorStats {
        &self.stats
    }

    /// Consumes `input` and appends the contents of every record it completes to `out`.
    ///
    /// Partial records are buffered, not errors. On error, `out` keeps the records decoded
    /// before the bad one, and the decoder rejects all further input.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.failed {
            return Err(RecordError::Failed);
        }
        let result = self.push_inner(input, out);
        if result.is_err() {
            self.failed = true;
            self.partial = Vec::new();
        }
        result
    }

    fn push_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if !self.partial.is_empty() {
            // Complete the header, then the body, of the buffered record.
            let need = RECORD_HEADER_LEN.saturating_sub(self.partial.len());
            let (head, rest) = input.split_at(need.min(input.len()));
            self.partial.extend_from_slice(head);
            input = rest;
            let Some(header_bytes) = self.partial.first_chunk::<RECORD_HEADER_LEN>() else {
                return Ok(());
            };
            let header = parse_header(header_bytes, self.offset)?;
            let need = header.total_len() - self.partial.len();
            let (body, rest) = input.split_at(need.min(input.len()));
            self.partial.extend_from_slice(body);
            input = rest;
            if self.partial.len() < header.total_len() {
                return Ok(());
            }
            let record = std::mem::take(&mut self.partial);
            let result = self.decode_record(header, &record[RECORD_HEADER_LEN..], out);
            // Keep the allocation for the next partial record.
            self.partial = record;
            self.partial.clear();
            result?;
        }
        while let Some(header_bytes) = input.first_chunk::<RECORD_HEADER_LEN>() {
            let header = parse_header(header_bytes, self.offset)?;
            let Some(record) = input.get(..header.total_len()) else {
                break;
            };
            self.decode_record(header, &record[RECORD_HEADER_LEN..], out)?;
            input = &input[header.total_len()..];
        }
        // Header validated above when present, so this is bounded by one record.
        self.partial.extend_from_slice(input);
        Ok(())
    }

    fn decode_record(
        &mut self,
        header: Header,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let offset = self.offset;
        let start = out.len();
        let expected = header.original_len;
        let produced = match header.codec {
            CODEC_RAW => {
                out.extend_from_slice(stored);
                Ok(stored.len())
            }
            CODEC_LZ4 => {
                out.resize(start + expected, 0);
                lz4_flex::block::decompress_into(stored, &mut out[start..])
                    .map_err(|source| RecordError::Lz4 { offset, source })
            }
            _ => {
                // One byte of room beyond `expected` so that too much output is detected.
                out.resize(start + expected + 1, 0);
                self.zstd_stream(stored, &mut out[start..])
                    .map_err(|source| RecordError::Zstd { offset, source })
            }
        };
        match produced {
            Ok(actual) if actual == expected => {
                out.truncate(start + expected);
                self.offset += header.total_len() as u64;
                self.stats.input_bytes += header.total_len() as u64;
                self.stats.output_bytes += expected as u64;
                self.stats.records += 1;
                Ok(())
            }
            Ok(actual) => {
                out.truncate(start);
                Err(RecordError::SizeMismatch {
                    expected,
                    actual,
                    offset,
                })
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
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
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    const CODECS: [Codec; 5] = [
        Codec::Raw,
        Codec::Lz4,
        Codec::Zstd { level: 1 },
        Codec::Zstd { level: 3 },
        Codec::Zstd { level: -5 },
    ];

    /// Text-like data with some random stretches.
    fn sample(rng: &mut TestRng, len: usize) -> Vec<u8> {
        let words: [&[u8]; 6] = [b"migrate ", b"page ", b"dirty ", b"qemu ", b"tern ", b"\n"];
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            if rng.below(10) == 0 {
                let n = rng.below(200) as usize;
                out.extend(rng.bytes(n));
            } else {
                out.extend_from_slice(words[rng.below(words.len() as u64) as usize]);
            }
        }
        out.truncate(len);
        out
    }

    fn decode_in_pieces(stream: &[u8], rng: &mut TestRng) -> Vec<u8> {
        let mut dec = RecordDecoder::new();
        let mut out = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let cut = match rng.below(4) {
                0 => 1,
                1 => rng.below(20) as usize,
                _ => rng.below(100_000) as usize,
            }
            .min(rest.len());
            dec.push(&rest[..cut], &mut out).unwrap();
            rest = &rest[cut..];
            assert!(dec.buffered() <= RECORD_HEADER_LEN + MAX_STORED);
        }
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.stats().input_bytes, stream.len() as u64);
        out
    }

    #[test]
    fn round_trip_all_codecs_random_splits() {
        for (i, codec) in CODECS.into_iter().enumerate() {
            let mut rng = TestRng(i as u64);
            let mut enc = RecordEncoder::new(codec);
            let mut stream = Vec::new();
            let mut original = Vec::new();
            for _ in 0..60 {
                let len = match rng.below(6) {
                    0 => rng.below(MIN_COMPRESS_LEN as u64) as usize,
                    1 => 64 * 1024,
                    2 => MAX_RECORD + rng.below(1000) as usize, // split into two records
                    _ => rng.below(70_000) as usize,
                };
                let chunk = if rng.below(4) == 0 {
                    rng.bytes(len)
                } else {
                    sample(&mut rng, len)
                };
                enc.encode(&chunk, &mut stream);
                original.extend_from_slice(&chunk);
            }
            let stats = *enc.stats();
            assert_eq!(stats.input_bytes, original.len() as u64);
            assert_eq!(stats.output_bytes, stream.len() as u64);
            if codec != Codec::Raw {
                assert!(stats.records_compressed > 0, "{codec:?} {stats:?}");
            }
            for _ in 0..3 {
                assert!(decode_in_pieces(&stream, &mut rng) == original, "{codec:?}");
            }
        }
    }

    #[test]
    fn compressible_data_is_compressed() {
        let text = b"The quick brown fox jumps over the lazy dog. ".repeat(1500);
        for codec in [Codec::Lz4, Codec::Zstd { level: 3 }] {
            let mut enc = RecordEncoder::new(codec);
            let mut stream = Vec::new();
            for _ in 0..10 {
                enc.encode(&text[..64 * 1024], &mut stream);
            }
            let stats = *enc.stats();
            assert_eq!(stats.records_compressed, 10, "{codec:?}");
            assert_eq!(stats.records_raw, 0);
            assert!(
                stats.output_bytes * 10 < stats.input_bytes,
                "{codec:?} {stats:?}"
            );
            assert_eq!(stream[0], codec.id());
            let mut out = Vec::new();
            RecordDecoder::new().push(&stream, &mut out).unwrap();
            assert_eq!(out.len(), 10 * 64 * 1024);
        }
    }

    #[test]
    fn incompressible_data_backs_off_and_probes() {
        let mut rng = TestRng(7);
        for codec in [Codec::Lz4, Codec::Zstd { level: 1 }] {
            let mut enc = RecordEncoder::new(codec);
            let mut stream = Vec::new();
            let mut original = Vec::new();
            // 1 failure -> 2 raw, probe fails -> 4 raw, -> 8, -> 16: 1+2+1+4+1+8+1+16.
            for _ in 0..34 {
                let chunk = rng.bytes(4096);
                enc.encode(&chunk, &mut stream);
                original.extend_from_slice(&chunk);
            }
            let stats = *enc.stats();
            assert_eq!(stats.probes, 3, "{stats:?}");
            assert_eq!(stats.backoffs, 4);
            assert_eq!(enc.backoff_records, 16);
            assert_eq!(enc.raw_remaining, 0);
            if codec == Codec::Lz4 {
                assert_eq!(stats.records_compressed, 0, "{codec:?}");
                assert_eq!(stats.records_raw, 34);
                assert_eq!(
                    stats.output_bytes,
                    stats.input_bytes + 34 * RECORD_HEADER_LEN as u64
                );
            } else {
                // zstd's context took the 4 attempts in: they go out as stored zstd blocks.
                assert_eq!(stats.records_compressed, 4, "{codec:?}");
                assert_eq!(stats.records_raw, 30);
                let overhead = stats.output_bytes - stats.input_bytes;
                assert!(
                    overhead <= 34 * RECORD_HEADER_LEN as u64 + 4 * 32,
                    "{stats:?}"
                );
            }

            // Compressible data again: the next probe succeeds and resets the back-off.
            let text = b"abcabcabcabc".repeat(400);
            enc.encode(&text, &mut stream);
            original.extend_from_slice(&text);
            assert_eq!(enc.stats().probes, 4);
            assert_eq!(enc.stats().records_compressed, stats.records_compressed + 1);
            assert_eq!(enc.backoff_records, INITIAL_BACKOFF_RECORDS);
            assert_eq!(decode_in_pieces(&stream, &mut rng), original);
        }
    }

    #[test]
    fn long_incompressible_stretches_skip_most_probes() {
        let mut rng = TestRng(5);
        let mut enc = RecordEncoder::new(Codec::Zstd { level: 1 });
        let mut stream = Vec::new();
        let mut original = Vec::new();
        let mut feed = |enc: &mut RecordEncoder, chunk: Vec<u8>| {
            enc.encode(&chunk, &mut stream);
            original.extend_from_slice(&chunk);
        };
        // The first attempt and probes after 2, 4, 8 and 16 raw records (35 records) reach
        // the longest back-off; from there one probe per 8 × 32 raw records + itself.
        for _ in 0..35 + 2 * 257 {
            feed(&mut enc, rng.bytes(1024));
        }
        let stats = *enc.stats();
        assert_eq!(stats.probes, 4 + 2, "{stats:?}");
        assert_eq!(stats.skipped_probes, 2 * 7, "{stats:?}");
        // Text is still found at once (an early probe), and resets the back-off.
        feed(&mut enc, b"abcabcabcabc".repeat(100));
        assert_eq!(enc.stats().early_probes, 1);
        assert_eq!(enc.stats().records_compressed, stats.records_compressed + 1);
        assert_eq!(enc.backoff_records, INITIAL_BACKOFF_RECORDS);
        assert_eq!(decode_in_pieces(&stream, &mut rng), original);
    }

    #[test]
    fn compress_all_keeps_incompressible_bytes_in_the_window_for_their_repeat() {
        // 40 records of random bytes, then the same 40 again. With the back-off the first
        // copy goes out raw after the first probes, so its repeat finds nothing to refer to;
        // compressing every record makes the repeat nearly free.
        let mut rng = TestRng(21);
        let blob: Vec<Vec<u8>> = (0..40).map(|_| rng.bytes(16 * 1024)).collect();
        let mut sizes = Vec::new();
        for all in [false, true] {
            let mut enc = RecordEncoder::new(Codec::Zstd { level: 3 });
            enc.set_compress_all(all);
            let mut stream = Vec::new();
            for chunk in blob.iter().chain(&blob) {
                enc.encode(chunk, &mut stream);
            }
            let stats = *enc.stats();
            if all {
                assert_eq!((stats.records_raw, stats.backoffs), (0, 0), "{stats:?}");
            } else {
                assert!(stats.records_raw > 60, "{stats:?}");
            }
            let original: Vec<u8> = blob.concat().repeat(2);
            assert_eq!(decode_in_pieces(&stream, &mut rng), original);
            sizes.push(stream.len());
        }
        let raw = 80 * 16 * 1024;
        assert!(sizes[0] > raw * 95 / 100, "{sizes:?}");
        assert!(sizes[1] < raw * 55 / 100, "{sizes:?}");
    }

    #[test]
    fn zstd_records_refer_to_earlier_records_of_the_stream() {
        // Random bytes do not compress by themselves, but the second copy of them is a
        // reference into the first record's history, even after raw records in between.
        let mut rng = TestRng(11);
        let block = rng.bytes(20_000);
        let mut enc = RecordEncoder::new(Codec::Zstd { level: 1 });
        let mut stream = Vec::new();
        let mut original = Vec::new();
        let mut last = 0;
        for chunk in [&block[..], &rng.bytes(3000), &rng.bytes(3000), &block[..]] {
            last = stream.len();
            enc.encode(chunk, &mut stream);
            original.extend_from_slice(chunk);
        }
        let stats = *enc.stats();
        assert_eq!((stats.records_compressed, stats.records_raw), (2, 2));
        assert!(stats.output_bytes < 20_000 + 6000 + 200, "{stats:?}");
        let mut rng = TestRng(12);
        assert_eq!(decode_in_pieces(&stream, &mut rng), original);
        // The last record cannot be decoded without the stream's earlier zstd records.
        assert_eq!(stream[last], CODEC_ZSTD);
        assert!(decode_all(&stream[last..]).is_err());
    }

    #[test]
    fn an_incompressible_record_amid_text_does_not_switch_compression_off() {
        // A tar of /usr: a compressed file now and then between text files.
        let mut rng = TestRng(13);
        for codec in [Codec::Lz4, Codec::Zstd { level: 3 }] {
            let mut enc = RecordEncoder::new(codec);
            let mut stream = Vec::new();
            let mut original = Vec::new();
            for i in 0..40 {
                let chunk = if i % 4 == 3 {
                    rng.bytes(16 * 1024)
                } else {
                    let words: [&[u8]; 4] = [b"migrate ", b"page ", b"dirty ", b"\n"];
                    let mut text = Vec::new();
                    while text.len() < 16 * 1024 {
                        text.extend_from_slice(words[rng.below(4) as usize]);
                    }
                    text
                };
                enc.encode(&chunk, &mut stream);
                original.extend_from_slice(&chunk);
            }
            let stats = *enc.stats();
            // Every record was compressed (lz4 sends the random ones raw: larger otherwise).
            assert_eq!(stats.backoffs, 0, "{codec:?} {stats:?}");
            assert_eq!(stats.probes, 0, "{codec:?} {stats:?}");
            assert!(stats.records_compressed >= 30, "{codec:?} {stats:?}");
            assert_eq!(decode_in_pieces(&stream, &mut rng), original);
        }
    }

    /// A back-off ends early at a record that looks compressible; an early probe that does
    /// not pay stops early probes for the rest of that back-off.
    #[test]
    fn compressible_content_ends_a_back_off_early() {
        let mut rng = TestRng(9);
        let mut enc = RecordEncoder::new(Codec::Zstd { level: 3 });
        let mut stream = Vec::new();
        let mut original = Vec::new();
        let mut feed = |enc: &mut RecordEncoder, chunk: Vec<u8>| {
            enc.encode(&chunk, &mut stream);
            original.extend_from_slice(&chunk);
        };
        for _ in 0..7 {
            feed(&mut enc, rng.bytes(4096)); // 1 + 2 raw + probe + 3 of 4 raw
        }
        assert_eq!(enc.raw_remaining, 1);
        // 7 bits of entropy per byte: looks compressible, saves ~12 %, does not pay.
        let seven_bits =
            |rng: &mut TestRng| -> Vec<u8> { rng.bytes(4096).iter().map(|b| b & 0x7f).collect() };
        feed(&mut enc, seven_bits(&mut rng));
        assert_eq!(enc.stats().early_probes, 1);
        assert!(enc.early_probe_failed);
        let raw_before = enc.stats().records_raw;
        feed(&mut enc, seven_bits(&mut rng));
        assert_eq!(enc.stats().early_probes, 1, "no second early probe");
        assert_eq!(enc.stats().records_raw, raw_before + 1);
        // Text ends the back-off once the failed early probe's back-off is over.
        while enc.raw_remaining > 0 {
            feed(&mut enc, rng.bytes(4096));
        }
        feed(
            &mut enc,
            b"the quick brown fox jumps over the lazy dog. ".repeat(90),
        );
        assert_eq!(enc.backoff_records, INITIAL_BACKOFF_RECORDS);
        // Fresh back-off after random data, then text in the middle of it: probed at once.
        for _ in 0..40 {
            if enc.raw_remaining > 0 {
                break;
            }
            feed(&mut enc, rng.bytes(4096));
        }
        assert!(enc.raw_remaining > 0);
        let early = enc.stats().early_probes;
        feed(
            &mut enc,
            b"lorem ipsum dolor sit amet, consectetur adipiscing ".repeat(80),
        );
        assert_eq!(enc.stats().early_probes, early + 1);
        assert_eq!(enc.raw_remaining, 0);
        assert!(!enc.early_probe_failed);
        assert_eq!(decode_in_pieces(&stream, &mut rng), original);
    }

    #[test]
    fn back_off_is_capped() {
        let mut rng = TestRng(8);
        let mut enc = RecordEncoder::new(Codec::Lz4);
        let mut stream = Vec::new();
        for _ in 0..5000 {
            stream.clear();
            enc.encode(&rng.bytes(MIN_COMPRESS_LEN), &mut stream);
        }
        assert_eq!(enc.backoff_records, MAX_BACKOFF_RECORDS);
        let max_probes = 5000 / u64::from(MAX_BACKOFF_RECORDS) + 10;
        assert!(enc.stats().probes <= max_probes, "{:?}", enc.stats());
    }

    #[test]
    fn raw_record_golden_bytes() {
        let mut enc = RecordEncoder::new(Codec::Lz4);
        let mut out = vec![0xff];
        enc.encode(b"hello", &mut out);
        assert_eq!(
            out,
            [
                0xff, 0, 0, 0, 0, 5, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'
            ]
        );
        enc.encode(b"", &mut out);
        assert_eq!(out.len(), 15, "empty chunk makes no record");
        let mut plain = Vec::new();
        let mut dec = RecordDecoder::new();
        dec.push(&out[1..], &mut plain).unwrap();
        assert_eq!(plain, b"hello");
        assert_eq!(dec.stats().records, 1);
    }

    fn decode_all(stream: &[u8]) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        RecordDecoder::new().push(stream, &mut out)?;
        Ok(out)
    }

    fn record(codec: u8, stored: u32, original: u32, body: &[u8]) -> Vec<u8> {
        let mut r = vec![codec];
        r.extend_from_slice(&stored.to_be_bytes());
        r.extend_from_slice(&original.to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn malformed_input_is_an_error() {
        let huge = record(0, u32::MAX, u32::MAX, b"");
        assert!(matches!(
            decode_all(&huge),
            Err(RecordError::RecordTooLarge { .. })
        ));
        let huge_stored = record(1, u32::MAX, 10, b"");
        assert!(matches!(
            decode_all(&huge_stored),
            Err(RecordError::StoredTooLarge { .. })
        ));
        let bad_codec = record(3, 1, 1, b"x");
        assert!(matches!(
            decode_all(&bad_codec),
            Err(RecordError::UnknownCodec {
                codec: 3,
                offset: 0
            })
        ));
        let raw_mismatch = record(0, 1, 2, b"x");
        assert!(matches!(
            decode_all(&raw_mismatch),
            Err(RecordError::RawLengthMismatch { .. })
        ));

        // Header errors are reported as soon as the header is complete, before the body.
        let mut dec = RecordDecoder::new();
        let mut out = Vec::new();
        dec.push(&huge[..5], &mut out).unwrap();
        assert!(dec.push(&huge[5..9], &mut out).is_err());
        assert!(matches!(dec.push(b"", &mut out), Err(RecordError::Failed)));

        let text = b"hello hello hello hello hello hello hello hello hello hello".repeat(20);
        for codec in [Codec::Lz4, Codec::Zstd { level: 3 }] {
            let mut stream = Vec::new();
            let mut enc = RecordEncoder::new(codec);
            enc.encode(b"first record is fine, and is raw", &mut stream);
            let second = stream.len();
            enc.encode(&text, &mut stream);
            assert_eq!(stream[second], codec.id());

            // Declared size larger or smaller than the real content.
            for delta in [-1i64, 1, 100] {
                let mut bad = stream.clone();
                let original = text.len() as i64 + delta;
                bad[second + 5..second + 9].copy_from_slice(&(original as u32).to_be_bytes());
                let mut out = Vec::new();
                let err = RecordDecoder::new().push(&bad, &mut out).unwrap_err();
                assert_eq!(out, b"first record is fine, and is raw", "{codec:?} {err}");
                assert!(
                    matches!(
                        err,
                        RecordError::SizeMismatch { .. }
                            | RecordError::Lz4 { .. }
                            | RecordError::Zstd { .. }
                    ),
                    "{codec:?} {delta} {err:?}"
                );
                assert!(
                    err.to_string().contains(&format!("offset {second}")),
                    "{err}"
                );
            }
            // Corrupted body bytes: every single-byte corruption errors or decodes to the
            // right length (lz4 literals can change undetected; zstd may too), never panics.
            let mut rng = TestRng(9);
            for _ in 0..2000 {
                let mut bad = stream.clone();
                let i = second
                    + RECORD_HEADER_LEN
                    + rng.below((bad.len() - second - 9) as u64) as usize;
                bad[i] = rng.next() as u8;
                if let Ok(out) = decode_all(&bad) {
                    assert_eq!(out.len(), 32 + text.len());
                }
            }
            // Truncated stored length.
            let mut bad = stream.clone();
            let stored = bad.len() - second - RECORD_HEADER_LEN;
            bad[second + 1..second + 5].copy_from_slice(&(stored as u32 - 3).to_be_bytes());
            bad.truncate(bad.len() - 3);
            assert!(decode_all(&bad).is_err(), "{codec:?}");
        }

        // Random garbage never panics.
        let mut rng = TestRng(10);
        for _ in 0..5000 {
            let len = rng.below(40) as usize;
            let mut garbage = rng.bytes(len);
            if len >= 9 {
                garbage[0] = rng.below(4) as u8;
                garbage[1..5].copy_from_slice(&((len - 9) as u32).to_be_bytes());
                garbage[5..9].copy_from_slice(&(rng.below(100) as u32).to_be_bytes());
            }
            let _ = decode_all(&garbage);
        }
    }

    /// Reads up to `cap` bytes of `tar cf - <dir>` as a realistic mixed sample.
    fn tar_sample(dir: &str, cap: usize) -> Vec<u8> {
        use std::io::Read;
        let mut child = std::process::Command::new("tar")
            .args(["cf", "-", dir])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn tar");
        let mut data = Vec::with_capacity(cap);
        let stdout = child.stdout.take().expect("tar stdout");
        stdout
            .take(cap as u64)
            .read_to_end(&mut data)
            .expect("read tar");
        let _ = child.kill();
        let _ = child.wait();
        data
    }

    /// Compress MB/s, decompress MB/s (decoder fed 1400-byte slices) and the encoder stats.
    /// `adaptive: false` compresses every chunk (back-off disabled) to show raw codec speed.
    fn measure(codec: Codec, data: &[u8], adaptive: bool) -> (f64, f64, CompressorStats) {
        let mut enc = RecordEncoder::new(codec);
        let mut stream = Vec::with_capacity(data.len() + data.len() / 100);
        let start = std::time::Instant::now();
        for chunk in data.chunks(64 * 1024) {
            if !adaptive {
                enc.raw_remaining = 0;
                enc.probing = false;
            }
            enc.encode(chunk, &mut stream);
        }
        let c_secs = start.elapsed().as_secs_f64();
        let mut dec = RecordDecoder::new();
        let mut out = Vec::with_capacity(data.len());
        let start = std::time::Instant::now();
        for piece in stream.chunks(1400) {
            dec.push(piece, &mut out).unwrap();
        }
        let d_secs = start.elapsed().as_secs_f64();
        assert!(out == data);
        let mbps = |secs: f64| data.len() as f64 / secs / 1e6;
        (mbps(c_secs), mbps(d_secs), *enc.stats())
    }

    /// `cargo test --release -p tern-transport --lib record -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release with --nocapture"]
    fn bench_codecs_on_usr_lib() {
        let codecs = [
            ("lz4", Codec::Lz4),
            ("zstd-1", Codec::Zstd { level: 1 }),
            ("zstd-3", Codec::Zstd { level: 3 }),
        ];
        // TERN_RECORD_SAMPLE=FILE: the first 150 MB of FILE instead (e.g. the bench corpus).
        let samples: Vec<(String, Vec<u8>)> = match std::env::var("TERN_RECORD_SAMPLE") {
            Ok(path) => {
                use std::io::Read;
                let mut data = Vec::new();
                std::fs::File::open(&path)
                    .expect("TERN_RECORD_SAMPLE")
                    .take(150_000_000)
                    .read_to_end(&mut data)
                    .expect("read sample");
                vec![(format!("the head of {path}"), data)]
            }
            Err(_) => ["/usr/lib", "/usr/lib/x86_64-linux-gnu"]
                .map(|dir| (format!("`tar cf - {dir}`"), tar_sample(dir, 64 << 20)))
                .into(),
        };
        for (what, data) in samples {
            println!(
                "\nsample: {} MiB of {what}, 64 KiB chunks",
                data.len() >> 20
            );
            println!(
                "| codec | mode | compress MB/s | decompress MB/s | ratio | compressed | raw | probes |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for (name, codec) in codecs {
                for adaptive in [true, false] {
                    let (c, d, s) = measure(codec, &data, adaptive);
                    println!(
                        "| {name} | {} | {c:.0} | {d:.0} | {:.3} | {} | {} | {} |",
                        if adaptive { "adaptive" } else { "always" },
                        s.input_bytes as f64 / s.output_bytes as f64,
                        s.records_compressed,
                        s.records_raw,
                        s.probes
                    );
                }
            }
        }
    }

    #[test]
    fn a_decoder_holds_no_larger_window_than_it_is_given() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut large = Vec::new();
        RecordEncoder::with_window_log(Codec::Zstd { level: 1 }, ZSTD_WINDOW_LOG)
            .encode(&data, &mut large);
        let mut small = Vec::new();
        RecordEncoder::with_window_log(Codec::Zstd { level: 1 }, ZSTD_SMALL_WINDOW_LOG)
            .encode(&data, &mut small);
        let decode = |max: Option<u32>, wire: &[u8]| {
            let mut out = Vec::new();
            RecordDecoder::with_window_log_max(max)
                .push(wire, &mut out)
                .map(|()| out)
        };
        assert_eq!(decode(Some(ZSTD_WINDOW_LOG), &large).unwrap(), data);
        assert_eq!(decode(Some(ZSTD_SMALL_WINDOW_LOG), &small).unwrap(), data);
        // A peer that ignores the small window it was meant to use is refused, not obeyed.
        assert!(decode(Some(ZSTD_SMALL_WINDOW_LOG), &large).is_err());
        // Without a budget: no zstd context at all; raw records still pass.
        assert!(decode(None, &small).is_err());
        let mut raw = Vec::new();
        RecordEncoder::new(Codec::Raw).encode(&data, &mut raw);
        assert_eq!(decode(None, &raw).unwrap(), data);
    }
}
