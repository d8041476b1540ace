//! The replication stream's messages.
//!
//! ```text
//! frame   = type (1) | body length (4, LE) | body          body <= MAX_BODY
//! primary -> secondary
//!   1 HELLO     magic "TERNDSK1" | version (1) | volume bytes (8) | block shift (1) | name len (1) | name
//!   2 DATA      seq (8) | offset (8) | raw length (4) | compression (1) | bytes
//!               compression 0: bytes as they are; 1: one zstd frame; 2: the next flushed
//!               piece of the session's zstd stream (one stream per session, 8 MiB window)
//!   3 ZERO      seq (8) | offset (8) | length (8)
//!   4 COPY      seq (8) | offset (8) | source offset (8) | length (4)
//!   5 FLUSH     seq (8)                       answer with ACK now
//!   6 SYNCED    seq (8)                       the secondary is consistent once seq is durable
//!   7 CHECK     offset (8) | count (1) | count x 8-byte chunk hashes    which of this
//!               block's chunks differ? (count <= 16)
//!   8 CLOCK     write (8) | count (1) | count x (MAC (6) | writes (8))   (count <= 15)
//!               the messages up to the next CLOCK carry the guest's writes up to number
//!               `write`, which depend on those peer tiers' writes (PipeCloud's clocks;
//!               only from primaries of a protected group; before each live write and
//!               before SYNCED)
//! secondary -> primary
//!   129 READY   volume bytes (8) | block shift (1) | consistent (1)
//!   130 HASHES  first block (8) | count (4) | bitmap of non-zero blocks (count/8 bytes,
//!               rounded up, bit i = byte i/8 bit i%8) | 8-byte hash per non-zero block
//!   131 HASHES_END  block count (8)
//!   132 ACK     seq (8)                       everything up to seq is durable
//!   133 ERROR   UTF-8 message                 then the secondary closes
//!   134 NEED    offset (8) | bitmap (2)       the CHECKed chunks that differ (bit i: chunk i)
//! ```
//! All integers little-endian. Offsets and lengths are bytes. Version policy: the HELLO
//! version is exact-match; a secondary answers ERROR to anything else. [`Reader`] is
//! incremental: `Ok(None)` means "need more bytes".

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"TERNDSK1";
pub const VERSION: u8 = 1;
/// Largest frame body: a DATA of [`MAX_DATA`] plus its fields, or a HASHES of
/// [`MAX_HASHES`] hashes.
pub const MAX_BODY: usize = 1 << 20;
/// Largest DATA payload (raw or compressed).
pub const MAX_DATA: usize = 512 << 10;
/// Most block hashes in one HASHES frame (512 MiB of volume, at most 65 KiB of body).
pub const MAX_HASHES: usize = 8192;
/// Most chunk hashes in one CHECK (one 64 KiB block of 4 KiB chunks).
pub const MAX_CHECK: usize = 16;
/// Most peer entries in one CLOCK (the other members of a protected group).
pub const MAX_CLOCK_PEERS: usize = 15;
/// Largest ZERO length (one frame can zero 1 TiB).
pub const MAX_ZERO: u64 = 1 << 40;
/// How a DATA payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Frame = 1,
    Stream = 2,
}

/// A 16-byte BLAKE3 prefix (deduplication keys, volume comparison).
pub type Hash = [u8; 16];
/// An 8-byte BLAKE3 prefix of a block or chunk; 0 means "all zeros" (see
/// [`crate::chunk_hash`]).
pub type ChunkHash = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        version: u8,
        size: u64,
        block_shift: u8,
        name: String,
        /// The primary's fencing epoch: a secondary whose epoch is higher (it was
        /// promoted since) refuses the session. Absent on the wire = 0.
        epoch: u64,
    },
    Data {
        seq: u64,
        offset: u64,
        raw_len: u32,
        compression: Compression,
        bytes: Vec<u8>,
    },
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Copy {
        seq: u64,
        offset: u64,
        src: u64,
        len: u32,
    },
    Flush {
        seq: u64,
    },
    Synced {
        seq: u64,
    },
    Check {
        offset: u64,
        hashes: Vec<ChunkHash>,
    },
    Clock {
        write: u64,
        deps: Vec<([u8; 6], u64)>,
    },
    Need {
        offset: u64,
        bitmap: u16,
    },
    Ready {
        size: u64,
        block_shift: u8,
        consistent: bool,
    },
    Hashes {
        first: u64,
        hashes: Vec<ChunkHash>,
    },
    HashesEnd {
        blocks: u64,
    },
    Ack {
        seq: u64,
    },
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("message type {kind} body of {len} bytes is out of bounds")]
    Length { kind: u8, len: usize },
    #[error("bad magic in HELLO")]
    Magic,
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

impl Msg {
    pub fn seq(&self) -> Option<u64> {
        match self {
            Msg::Data { seq, .. }
            | Msg::Zero { seq, .. }
            | Msg::Copy { seq, .. }
            | Msg::Flush { seq }
            | Msg::Synced { seq } => Some(*seq),
            _ => None,
        }
    }

    /// Appends the framed message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 5]);
        let kind = match self {
            Msg::Hello {
                version,
                size,
                block_shift,
                name,
                epoch,
            } => {
                assert!(name.len() <= 255, "volume names are at most 255 bytes");
                out.extend_from_slice(MAGIC);
                out.push(*version);
                out.extend_from_slice(&size.to_le_bytes());
                out.push(*block_shift);
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                1
            }
            Msg::Data {
                seq,
                offset,
                raw_len,
                compression,
                bytes,
            } => {
                assert!(bytes.len() <= MAX_DATA && *raw_len as usize <= MAX_DATA);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.push(*compression as u8);
                out.extend_from_slice(bytes);
                2
            }
            Msg::Zero { seq, offset, len } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                3
            }
            Msg::Copy {
                seq,
                offset,
                src,
                len,
            } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&src.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                4
            }
            Msg::Flush { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                5
            }
            Msg::Synced { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                6
            }
            Msg::Check { offset, hashes } => {
                assert!(hashes.len() <= MAX_CHECK);
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(hashes.len() as u8);
                for h in hashes {
                    out.extend_from_slice(&h.to_le_bytes());
                }
                7
            }
            Msg::Clock { write, deps } => {
                assert!(deps.len() <= MAX_CLOCK_PEERS);
                out.extend_from_slice(&write.to_le_bytes());
                out.push(deps.len() as u8);
                for (mac, n) in deps {
                    out.extend_from_slice(mac);
                    out.extend_from_slice(&n.to_le_bytes());
                }
                8
            }
            Msg::Need { offset, bitmap } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&bitmap.to_le_bytes());
                134
            }
            Msg::Ready {
                size,
                block_shift,
                consistent,
            } => {
                out.extend_from_slice(&size.to_le_bytes());
                out.push(*block_shift);
                out.push(u8::from(*consistent));
                129
            }
            Msg::Hashes { first, hashes } => {
                assert!(hashes.len() <= MAX_HASHES);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                let map = out.len();
                out.resize(map + hashes.len().div_ceil(8), 0);
                for (i, h) in hashes.iter().enumerate() {
                    if *h != 0 {
                        out[map + i / 8] |= 1 << (i % 8);
                        out.extend_from_slice(&h.to_le_bytes());
                    }
                }
                130
            }
            Msg::HashesEnd { blocks } => {
                out.extend_from_slice(&blocks.to_le_bytes());
                131
            }
            Msg::Ack { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                132
            }
            Msg::Error(m) => {
                let mut cut = m.len().min(4096);
                while !m.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.extend_from_slice(&m.as_bytes()[..cut]);
                133
            }
        };
        let body = out.len() - start - 5;
        debug_assert!(body <= MAX_BODY);
        out[start] = kind;
        out[start + 1..start + 5].copy_from_slice(&(body as u32).to_le_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

struct Cur<'a>(&'a [u8], &'static str);

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed(self.1));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn end(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.1))
        }
    }
}

/// Decodes one body of type `kind`.
pub fn decode(kind: u8, body: &[u8]) -> Result<Msg, WireError> {
    let name = match kind {
        1 => "HELLO",
        2 => "DATA",
        3 => "ZERO",
        4 => "COPY",
        5 => "FLUSH",
        6 => "SYNCED",
        7 => "CHECK",
        8 => "CLOCK",
        129 => "READY",
        130 => "HASHES",
        131 => "HASHES_END",
        132 => "ACK",
        133 => "ERROR",
        134 => "NEED",
        k => return Err(WireError::Type(k)),
    };
    let mut c = Cur(body, name);
    let m = match kind {
        1 => {
            if c.take(8)? != MAGIC {
                return Err(WireError::Magic);
            }
            let version = c.u8()?;
            let size = c.u64()?;
            let block_shift = c.u8()?;
            let n = c.u8()? as usize;
            let name = String::from_utf8(c.take(n)?.to_vec())
                .map_err(|_| WireError::Malformed("HELLO"))?;
            // A HELLO without the epoch (older primaries) is epoch 0.
            let epoch = if c.0.is_empty() { 0 } else { c.u64()? };
            Msg::Hello {
                version,
                size,
                block_shift,
                name,
                epoch,
            }
        }
        2 => {
            let seq = c.u64()?;
            let offset = c.u64()?;
            let raw_len = c.u32()?;
            let compression = match c.u8()? {
                0 => Compression::None,
                1 => Compression::Frame,
                2 => Compression::Stream,
                _ => return Err(WireError::Malformed("DATA")),
            };
            let bytes = c.0.to_vec();
            c.0 = &[];
            if raw_len as usize > MAX_DATA
                || raw_len == 0
                || bytes.len() > MAX_DATA
                || (compression == Compression::None && bytes.len() != raw_len as usize)
            {
                return Err(WireError::Malformed("DATA"));
            }
            Msg::Data {
                seq,
                offset,
                raw_len,
                compression,
                bytes,
            }
        }
        3 => {
            let seq = c.u64()?;
            let offset = c.u64()?;
            let len = c.u64()?;
            if len == 0 || len > MAX_ZERO {
                return Err(WireError::Malformed("ZERO"));
            }
            Msg::Zero { seq, offset, len }
        }
        4 => {
            let seq = c.u64()?;
            let offset = c.u64()?;
            let src = c.u64()?;
            let len = c.u32()?;
            if len == 0 || len as usize > MAX_DATA {
                return Err(WireError::Malformed("COPY"));
            }
            Msg::Copy {
                seq,
                offset,
                src,
                len,
            }
        }
        5 => Msg::Flush { seq: c.u64()? },
        6 => Msg::Synced { seq: c.u64()? },
        7 => {
            let offset = c.u64()?;
            let n = c.u8()? as usize;
            if n == 0 || n > MAX_CHECK {
                return Err(WireError::Malformed("CHECK"));
            }
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(c.u64()?);
            }
            Msg::Check { offset, hashes }
        }
        8 => {
            let write = c.u64()?;
            let n = c.u8()? as usize;
            if n > MAX_CLOCK_PEERS {
                return Err(WireError::Malformed("CLOCK"));
            }
            let mut deps = Vec::with_capacity(n);
            for _ in 0..n {
                let mac: [u8; 6] = c.take(6)?.try_into().expect("6 bytes");
                deps.push((mac, c.u64()?));
            }
            Msg::Clock { write, deps }
        }
        134 => {
            let offset = c.u64()?;
            let bitmap = u16::from_le_bytes(c.take(2)?.try_into().expect("2 bytes"));
            Msg::Need { offset, bitmap }
        }
        129 => {
            let size = c.u64()?;
            let block_shift = c.u8()?;
            let consistent = match c.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed("READY")),
            };
            Msg::Ready {
                size,
                block_shift,
                consistent,
            }
        }
        130 => {
            let first = c.u64()?;
            let n = c.u32()? as usize;
            if n > MAX_HASHES {
                return Err(WireError::Malformed("HASHES"));
            }
            let map = c.take(n.div_ceil(8))?.to_vec();
            let mut hashes = Vec::with_capacity(n);
            for i in 0..n {
                if map[i / 8] & (1 << (i % 8)) != 0 {
                    let h = c.u64()?;
                    if h == 0 {
                        return Err(WireError::Malformed("HASHES"));
                    }
                    hashes.push(h);
                } else {
                    hashes.push(0);
                }
            }
            if n % 8 != 0 && map[n / 8] >> (n % 8) != 0 {
                return Err(WireError::Malformed("HASHES"));
            }
            Msg::Hashes { first, hashes }
        }
        131 => Msg::HashesEnd { blocks: c.u64()? },
        132 => Msg::Ack { seq: c.u64()? },
        _ => {
            let m = String::from_utf8_lossy(c.0).into_owned();
            c.0 = &[];
            Msg::Error(m)
        }
    };
    c.end()?;
    Ok(m)
}

/// Incremental frame reader.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    pos: usize,
}

impl Reader {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next message, `Ok(None)` when more bytes are needed.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, WireError> {
        let b = &self.buf[self.pos..];
        if b.len() < 5 {
            self.compact();
            return Ok(None);
        }
        let kind = b[0];
        let len = u32::from_le_bytes(b[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_BODY {
            return Err(WireError::Length { kind, len });
        }
        if b.len() < 5 + len {
            self.compact();
            return Ok(None);
        }
        let m = decode(kind, &b[5..5 + len])?;
        self.pos += 5 + len;
        Ok(Some(m))
    }

    fn compact(&mut self) {
        if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: VERSION,
                size: 1 << 30,
                block_shift: 16,
                name: "vm1-disk".into(),
                epoch: 3,
            },
            Msg::Data {
                seq: 7,
                offset: 65536,
                raw_len: 4,
                compression: Compression::None,
                bytes: vec![1, 2, 3, 4],
            },
            Msg::Zero {
                seq: 8,
                offset: 0,
                len: 4096,
            },
            Msg::Copy {
                seq: 9,
                offset: 8192,
                src: 0,
                len: 4096,
            },
            Msg::Flush { seq: 10 },
            Msg::Synced { seq: 11 },
            Msg::Ready {
                size: 1 << 30,
                block_shift: 16,
                consistent: true,
            },
            Msg::Hashes {
                first: 3,
                hashes: vec![7, 0, 0, 0, 0, 0, 0, 0, 0, u64::MAX],
            },
            Msg::HashesEnd { blocks: 16384 },
            Msg::Check {
                offset: 65536,
                hashes: vec![0, 1, u64::MAX],
            },
            Msg::Need {
                offset: 65536,
                bitmap: 0b101,
            },
            Msg::Clock {
                write: 12,
                deps: vec![([2, 0, 0, 0, 0, 7], 40)],
            },
            Msg::Clock {
                write: 13,
                deps: vec![],
            },
            Msg::Ack { seq: 11 },
            Msg::Error("volume size differs".into()),
        ]
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(
            Msg::Ack { seq: 0x0102 }.to_bytes(),
            [132, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]
        );
        let z = Msg::Zero {
            seq: 1,
            offset: 2,
            len: 3,
        }
        .to_bytes();
        assert_eq!(z[..5], [3, 24, 0, 0, 0]);
        let h = Msg::Hello {
            version: 1,
            size: 0,
            block_shift: 16,
            name: "v".into(),
            epoch: 0,
        }
        .to_bytes();
        assert_eq!(&h[5..13], MAGIC);
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let mut stream = Vec::new();
        for m in all() {
            m.encode(&mut stream);
        }
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let mut r = Reader::default();
            let mut got = Vec::new();
            for c in stream.chunks(step) {
                r.push(c);
                while let Some(m) = r.next_msg().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, all(), "chunk size {step}");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn bounds_and_damage_are_errors_not_panics() {
        let mut r = Reader::default();
        r.push(&[2, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(r.next_msg(), Err(WireError::Length { .. })));
        let mut r = Reader::default();
        r.push(&[77, 0, 0, 0, 0]);
        assert_eq!(r.next_msg(), Err(WireError::Type(77)));
        // Every truncation and every single-byte change of every message decodes or errs.
        for m in all() {
            let b = m.to_bytes();
            for cut in 0..b.len() - 5 {
                let _ = decode(b[0], &b[5..5 + cut]);
            }
            for i in 5..b.len() {
                let mut d = b.clone();
                d[i] ^= 0x5a;
                let _ = decode(d[0], &d[5..]);
            }
        }
        let bad = Msg::Data {
            seq: 1,
            offset: 0,
            raw_len: 9,
            compression: Compression::None,
            bytes: vec![0; 4],
        }
        .to_bytes();
        assert_eq!(decode(bad[0], &bad[5..]), Err(WireError::Malformed("DATA")));
    }
}
