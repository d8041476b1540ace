//! Wire format: packet headers, QUIC-style variable-length integers and frames.
//!
//! ```text
//! handshake init     [0x01][sender_index u16][noise IK message 1 (payload: version u8, timestamp u64)]
//!                    [mac1 16][mac2 16]
//! handshake response [0x02][receiver_index u16][noise IK message 2][mac 16, keyed by the init's mac1]
//! cookie reply       [0x03][receiver_index u16][salt 16][AEAD(cookie 16) + 16-byte tag]
//! data               [1 L L p p p p p][packet number: L more bytes][AEAD(frames) + 16-byte tag]
//! ```
//! The initiator's session index (1..=65535) pairs a handshake response with its initiation.
//! A data packet carries no session index: the receiver finds the session by the sender's
//! address (a node holds one session per peer, and a peer is at one address), as QUIC does
//! with zero-length connection IDs. The data header is 1 + L bytes (L = 0..=3, in
//! bits 6-5 of the first byte); it carries the packet number's low 5 + 8L bits, the top 5 of
//! them in the first byte. The receiver expands them to the 64-bit number nearest the next one
//! it expects (QUIC's rule, RFC 9000 appendix A.3), and the full number is the AEAD nonce, so
//! a changed header or a wrong expansion fails authentication. The sender picks the shortest
//! header that covers twice the distance from its largest acknowledged packet (RFC 9000
//! A.2): 2 bytes while fewer than 4,096 packets are unacknowledged, which covers 1 Gbit/s up
//! to ~45 ms of RTT with its queue. A sender never has 2^28 packets outstanding.
//! Frames inside a data packet (integers are varints unless noted):
//! ```text
//! 0x00 PADDING        (rest of the packet)
//! 0x01 PING
//! 0x02 ACK            largest, ack_delay_us, recovered_total, extra_ranges, first_range, (gap, len)*
//! 0x04 STREAM         id, offset, len, data        (0x05 = STREAM with FIN)
//! 0x10 STREAM_END     id, offset's low k bytes, data to the end of the packet (type
//!                     0x10 | (k-1) << 1 | FIN, k = 1..=4; see below)
//! 0x06 RESET_STREAM   id, code, final_size
//! 0x07 MAX_STREAM_DATA id, max_offset
//! 0x08 MAX_DATA       max_bytes
//! 0x09 REPAIR         len, FEC repair symbol (see fec.rs)
//! 0x0a CLOSE          code
//! ```
//! STREAM_END ends the packet, so it needs no length, and its offset is truncated like a packet
//! number: the receiver expands it to the offset nearest the highest it has received on the
//! stream. The sender picks k so that 2^(8k-1) exceeds the stream's unacknowledged span plus
//! the stream bytes that packets sent after this one could have delivered before it arrives
//! (the replay window bounds how late a packet is still accepted; see `stream_offset_len`).
//! Version policy: the init payload carries `PROTOCOL_VERSION`; a node refuses other versions.
//! New frame types get new type bytes; unknown frame types make a packet invalid (it is dropped
//! and counted), so both sites must run the same version.

use thiserror::Error;

/// 2: zstd records of a stream share one context (see `record.rs`).
/// 3: 32-bit packet numbers in the data header; STREAM_END frames.
/// 4: 16-bit session indexes; 1- to 4-byte packet numbers.
/// 5: no session index in data packets; the packet number's length and top bits in the
///    first byte; STREAM_END offsets truncated.
/// 6: initiations end with mac1 and mac2 (16 bytes each); cookie replies (type 0x03);
///    responses end with a MAC keyed by the init's mac1.
pub const PROTOCOL_VERSION: u8 = 6;
pub const TYPE_INIT: u8 = 0x01;
pub const TYPE_RESPONSE: u8 = 0x02;
/// Cookie reply to an initiation the responder will not process without proof of address.
pub const TYPE_COOKIE: u8 = 0x03;
/// Set in the first byte of every data packet (handshake types are below it).
pub const DATA_FLAG: u8 = 0x80;
/// Largest number of ACK ranges encoded (older ones are dropped; the sender treats them as
/// outstanding and its loss detection resolves them).
pub const MAX_ACK_RANGES: usize = 32;
/// Upper bound for any varint-encoded length inside a packet.
pub const MAX_FRAME_DATA: usize = 65_535;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("packet truncated at offset {offset}")]
    Truncated { offset: usize },
    #[error("unknown frame type {kind:#04x} at offset {offset}")]
    UnknownFrame { kind: u8, offset: usize },
    #[error("frame field out of range at offset {offset}")]
    OutOfRange { offset: usize },
}

/// Reads from a byte slice, tracking the offset for error messages.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub fn offset(&self) -> usize {
        self.pos
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(WireError::Truncated { offset: self.pos })?;
        self.pos += 1;
        Ok(b)
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(WireError::Truncated { offset: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn varint(&mut self) -> Result<u64, WireError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for _ in 1..len {
            v = (v << 8) | u64::from(self.u8()?);
        }
        Ok(v)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }
}

/// Largest value a varint can hold.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    debug_assert!(v <= VARINT_MAX);
    match varint_len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// An acknowledged packet-number range, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PnRange {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Padding,
    Ping,
    /// Ranges in descending order, non-overlapping.
    Ack {
        ack_delay_us: u64,
        recovered_total: u64,
        ranges: Vec<PnRange>,
    },
    Stream {
        id: u64,
        offset: u64,
        fin: bool,
        data: &'a [u8],
    },
    /// A STREAM frame that ends its packet: `offset` holds only the offset's low
    /// `offset_len` bytes (1..=4); the receiver expands them (`expand_stream_offset`).
    StreamEnd {
        id: u64,
        offset: u64,
        offset_len: usize,
        fin: bool,
        data: &'a [u8],
    },
    ResetStream {
        id: u64,
        code: u64,
        final_size: u64,
    },
    MaxStreamData {
        id: u64,
        max: u64,
    },
    MaxData {
        max: u64,
    },
    Repair {
        symbol: &'a [u8],
    },
    Close {
        code: u64,
    },
}

/// Bytes a STREAM frame header takes (excluding data). Its offset is always a varint.
pub fn stream_header_len(id: u64, offset: u64, len: usize) -> usize {
    1 + varint_len(id) + varint_len(offset) + varint_len(len as u64)
}

/// Bytes a STREAM_END frame header takes (excluding data).
pub fn stream_end_header_len(id: u64, offset_len: usize) -> usize {
    1 + varint_len(id) + offset_len
}

/// Bytes of a STREAM_END frame's truncated offset, if any length up to 4 serves: the shortest
/// whose half-window exceeds `span`, the farthest the receiver's highest received offset can
/// be from the frame's offset when the frame arrives. None from 2^31 on (use STREAM).
pub fn stream_offset_len(span: u64) -> Option<usize> {
    (1..=4).find(|&k| span < 1 << (8 * k - 1))
}

/// Expands a STREAM_END frame's truncated offset to the offset nearest `highest`, the end of
/// the highest data received on the stream.
pub fn expand_stream_offset(truncated: u64, offset_len: usize, highest: u64) -> u64 {
    expand_packet_number(truncated, 8 * offset_len as u32, highest)
}

/// Bits of the packet number a data header of `header_len` bytes (1..=4) carries.
pub const fn packet_number_bits(header_len: usize) -> u32 {
    8 * header_len as u32 - 3
}

/// Bytes of the data header for packet number `pn`, given the sender's largest acknowledged
/// packet: the shortest that covers twice the unacknowledged range (RFC 9000 A.2), at most 4.
pub fn data_header_len(pn: u64, largest_acked: Option<u64>) -> usize {
    let range = largest_acked.map_or(pn + 1, |a| pn.saturating_sub(a));
    (1..4)
        .find(|&n| range < 1 << (packet_number_bits(n) - 1))
        .unwrap_or(4)
}

/// Expands the low `bits` bits of a packet number to the full number nearest `expected`
/// (the largest number received so far plus one).
pub fn expand_packet_number(truncated: u64, bits: u32, expected: u64) -> u64 {
    let win: u64 = 1 << bits;
    let half = win / 2;
    let candidate = (expected & !(win - 1)) | (truncated & (win - 1));
    if candidate.saturating_add(half) <= expected {
        candidate + win
    } else if candidate > expected.saturating_add(half) && candidate >= win {
        candidate - win
    } else {
        candidate
    }
}

impl Frame<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Padding => out.push(0x00),
            Frame::Ping => out.push(0x01),
            Frame::Ack {
                ack_delay_us,
                recovered_total,
                ranges,
            } => {
                debug_assert!(!ranges.is_empty());
                let ranges = &ranges[..ranges.len().min(MAX_ACK_RANGES)];
                out.push(0x02);
                put_varint(out, ranges[0].end);
                put_varint(out, *ack_delay_us);
                put_varint(out, *recovered_total);
                put_varint(out, (ranges.len() - 1) as u64);
                put_varint(out, ranges[0].end - ranges[0].start);
                let mut prev_start = ranges[0].start;
                for r in &ranges[1..] {
                    // gap: packets between r.end and prev_start, minus one (never negative).
                    put_varint(out, prev_start - r.end - 2);
                    put_varint(out, r.end - r.start);
                    prev_start = r.start;
                }
            }
            Frame::Stream {
                id,
                offset,
                fin,
                data,
            } => {
                out.push(if *fin { 0x05 } else { 0x04 });
                put_varint(out, *id);
                put_varint(out, *offset);
                put_varint(out, data.len() as u64);
                out.extend_from_slice(data);
            }
            Frame::StreamEnd {
                id,
                offset,
                offset_len,
                fin,
                data,
            } => {
                debug_assert!((1..=4).contains(offset_len));
                out.push(0x10 | ((*offset_len as u8 - 1) << 1) | u8::from(*fin));
                put_varint(out, *id);
                out.extend_from_slice(&offset.to_be_bytes()[8 - offset_len..]);
                out.extend_from_slice(data);
            }
            Frame::ResetStream {
                id,
                code,
                final_size,
            } => {
                out.push(0x06);
                put_varint(out, *id);
                put_varint(out, *code);
                put_varint(out, *final_size);
            }
            Frame::MaxStreamData { id, max } => {
                out.push(0x07);
                put_varint(out, *id);
                put_varint(out, *max);
            }
            Frame::MaxData { max } => {
                out.push(0x08);
                put_varint(out, *max);
            }
            Frame::Repair { symbol } => {
                out.push(0x09);
                put_varint(out, symbol.len() as u64);
                out.extend_from_slice(symbol);
            }
            Frame::Close { code } => {
                out.push(0x0a);
                put_varint(out, *code);
            }
        }
    }

    /// Decodes one frame. PADDING consumes the rest of the packet.
    pub fn decode<'a>(r: &mut Reader<'a>) -> Result<Frame<'a>, WireError> {
        let at = r.offset();
        let kind = r.u8()?;
        Ok(match kind {
            0x00 => {
                r.rest();
                Frame::Padding
            }
            0x01 => Frame::Ping,
            0x02 => {
                let largest = r.varint()?;
                let ack_delay_us = r.varint()?;
                let recovered_total = r.varint()?;
                let extra = r.varint()?;
                if extra as usize >= MAX_ACK_RANGES {
                    return Err(WireError::OutOfRange { offset: at });
                }
                let first = r.varint()?;
                let start = largest
                    .checked_sub(first)
                    .ok_or(WireError::OutOfRange { offset: at })?;
                let mut ranges = Vec::with_capacity(extra as usize + 1);
                ranges.push(PnRange {
                    start,
                    end: largest,
                });
                let mut prev_start = start;
                for _ in 0..extra {
                    let gap = r.varint()?;
                    let len = r.varint()?;
                    let end = prev_start
                        .checked_sub(gap.saturating_add(2))
                        .ok_or(WireError::OutOfRange { offset: at })?;
                    let start = end
                        .checked_sub(len)
                        .ok_or(WireError::OutOfRange { offset: at })?;
                    ranges.push(PnRange { start, end });
                    prev_start = start;
                }
                Frame::Ack {
                    ack_delay_us,
                    recovered_total,
                    ranges,
                }
            }
            0x04 | 0x05 => {
                let id = r.varint()?;
                let offset = r.varint()?;
                let len = r.varint()?;
                if len as usize > MAX_FRAME_DATA || offset.saturating_add(len) > VARINT_MAX {
                    return Err(WireError::OutOfRange { offset: at });
                }
                let data = r.bytes(len as usize)?;
                Frame::Stream {
                    id,
                    offset,
                    fin: kind == 0x05,
                    data,
                }
            }
            0x10..=0x17 => {
                let id = r.varint()?;
                let offset_len = 1 + usize::from((kind >> 1) & 0x03);
                let offset = r
                    .bytes(offset_len)?
                    .iter()
                    .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
                let data = r.rest();
                if data.len() > MAX_FRAME_DATA {
                    return Err(WireError::OutOfRange { offset: at });
                }
                Frame::StreamEnd {
                    id,
                    offset,
                    offset_len,
                    fin: kind & 1 == 1,
                    data,
                }
            }
            0x06 => Frame::ResetStream {
                id: r.varint()?,
                code: r.varint()?,
                final_size: r.varint()?,
            },
            0x07 => Frame::MaxStreamData {
                id: r.varint()?,
                max: r.varint()?,
            },
            0x08 => Frame::MaxData { max: r.varint()? },
            0x09 => {
                let len = r.varint()?;
                if len as usize > MAX_FRAME_DATA {
                    return Err(WireError::OutOfRange { offset: at });
                }
                Frame::Repair {
                    symbol: r.bytes(len as usize)?,
                }
            }
            0x0a => Frame::Close { code: r.varint()? },
            kind => return Err(WireError::UnknownFrame { kind, offset: at }),
        })
    }
}

/// Parses every frame of a decrypted payload.
pub fn decode_frames(payload: &[u8]) -> Result<Vec<Frame<'_>>, WireError> {
    let mut r = Reader::new(payload);
    let mut frames = Vec::new();
    while !r.is_empty() {
        frames.push(Frame::decode(&mut r)?);
    }
    Ok(frames)
}

/// Appends a data header of `header_len` bytes (1..=4) for packet number `pn`.
pub fn put_data_header(out: &mut Vec<u8>, pn: u64, header_len: usize) {
    debug_assert!((1..=4).contains(&header_len));
    let low = pn & ((1 << packet_number_bits(header_len)) - 1);
    let rest = header_len - 1;
    out.push(DATA_FLAG | (rest as u8) << 5 | (low >> (8 * rest)) as u8);
    out.extend_from_slice(&low.to_be_bytes()[8 - rest..]);
}

/// Parses a data header: (truncated packet number, header length). `None` for anything else
/// or a truncated header.
pub fn parse_data_header(data: &[u8]) -> Option<(u64, usize)> {
    let t = *data.first()?;
    if !is_data_type(t) {
        return None;
    }
    let len = 1 + usize::from((t >> 5) & 0x03);
    let h = data.get(..len)?;
    let pn = h[1..]
        .iter()
        .fold(u64::from(t & 0x1f), |v, &b| (v << 8) | u64::from(b));
    Some((pn, len))
}

/// Whether `t` is the first byte of a data packet.
pub fn is_data_type(t: u8) -> bool {
    t & DATA_FLAG != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_golden_and_round_trip() {
        // RFC 9000 §A.1 examples.
        let cases: [(u64, &[u8]); 4] = [
            (37, &[0x25]),
            (15_293, &[0x7b, 0xbd]),
            (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
            (
                151_288_809_941_952_652,
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            ),
        ];
        for (v, bytes) in cases {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes);
            assert_eq!(Reader::new(bytes).varint().unwrap(), v);
        }
    }

    #[test]
    fn frames_round_trip() {
        let data = [7u8; 100];
        let frames = vec![
            Frame::Ping,
            Frame::Ack {
                ack_delay_us: 250,
                recovered_total: 3,
                ranges: vec![
                    PnRange {
                        start: 90,
                        end: 100,
                    },
                    PnRange { start: 50, end: 80 },
                    PnRange { start: 3, end: 3 },
                ],
            },
            Frame::Stream {
                id: 4,
                offset: 1 << 40,
                fin: true,
                data: &data,
            },
            Frame::ResetStream {
                id: 9,
                code: 1,
                final_size: 77,
            },
            Frame::MaxStreamData {
                id: 2,
                max: 1 << 30,
            },
            Frame::MaxData { max: 5 },
            Frame::Repair {
                symbol: &data[..10],
            },
            Frame::Close { code: 2 },
        ];
        let mut out = Vec::new();
        for f in &frames {
            f.encode(&mut out);
        }
        assert_eq!(decode_frames(&out).unwrap(), frames);
    }

    #[test]
    fn stream_frame_golden_bytes() {
        let mut out = Vec::new();
        Frame::Stream {
            id: 2,
            offset: 64,
            fin: false,
            data: b"hi",
        }
        .encode(&mut out);
        assert_eq!(out, [0x04, 0x02, 0x40, 0x40, 0x02, b'h', b'i']);
    }

    #[test]
    fn stream_end_frame_golden_bytes_and_round_trip() {
        let mut out = Vec::new();
        Frame::StreamEnd {
            id: 2,
            offset: 0x0304_0506,
            offset_len: 3,
            fin: true,
            data: b"hi",
        }
        .encode(&mut out);
        // Only the offset's low 3 bytes go on the wire.
        assert_eq!(out, [0x15, 0x02, 0x04, 0x05, 0x06, b'h', b'i']);
        assert_eq!(out.len(), stream_end_header_len(2, 3) + 2);
        // After other frames; the data runs to the end.
        let mut packet = Vec::new();
        Frame::Ping.encode(&mut packet);
        Frame::StreamEnd {
            id: 7,
            offset: 0x1234,
            offset_len: 4,
            fin: false,
            data: &[9; 1400],
        }
        .encode(&mut packet);
        let frames = decode_frames(&packet).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[1],
            Frame::StreamEnd {
                id: 7,
                offset: 0x1234,
                offset_len: 4,
                fin: false,
                data: &[9; 1400],
            }
        );
        // Every length round-trips with and without FIN.
        for (offset_len, fin, kind) in [(1, false, 0x10), (2, true, 0x13), (4, true, 0x17)] {
            let mut out = Vec::new();
            let f = Frame::StreamEnd {
                id: 3,
                offset: 0x42,
                offset_len,
                fin,
                data: b"xyz",
            };
            f.encode(&mut out);
            assert_eq!(out[0], kind);
            assert_eq!(out.len(), stream_end_header_len(3, offset_len) + 3);
            assert_eq!(decode_frames(&out).unwrap(), [f]);
        }
        // Empty data with FIN is a valid frame.
        let frames = decode_frames(&[0x11, 0x01, 0x05]).unwrap();
        assert_eq!(
            frames,
            [Frame::StreamEnd {
                id: 1,
                offset: 5,
                offset_len: 1,
                fin: true,
                data: &[],
            }]
        );
        // The STREAM frame with a length keeps its varint offset (8 bytes past 1 GiB).
        for offset in [64, (1u64 << 30) - 1, 1 << 30, 1 << 40] {
            let mut out = Vec::new();
            Frame::Stream {
                id: 3,
                offset,
                fin: false,
                data: b"xyz",
            }
            .encode(&mut out);
            assert_eq!(out.len(), stream_header_len(3, offset, 3) + 3, "{offset}");
        }
    }

    #[test]
    fn stream_offsets_expand_within_their_span() {
        assert_eq!(stream_offset_len(0), Some(1));
        assert_eq!(stream_offset_len(127), Some(1));
        assert_eq!(stream_offset_len(128), Some(2));
        assert_eq!(stream_offset_len((1 << 23) - 1), Some(3));
        assert_eq!(stream_offset_len(1 << 23), Some(4));
        assert_eq!(stream_offset_len((1 << 31) - 1), Some(4));
        assert_eq!(stream_offset_len(1 << 31), None);
        // Any offset and highest-received pair within the span comes back exactly, past
        // 2^32 and 2^48 too (where a varint takes 8 bytes).
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for base in [0u64, 1 << 30, (1 << 32) - 5000, 1 << 48] {
            for _ in 0..5_000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let span = rng % (1 << 24);
                let k = stream_offset_len(span).unwrap();
                let offset = base + (rng >> 40) % (span + 1);
                let highest = if rng & 1 == 0 {
                    offset.saturating_sub(span)
                } else {
                    offset + span
                };
                let mut out = Vec::new();
                Frame::StreamEnd {
                    id: 1,
                    offset,
                    offset_len: k,
                    fin: false,
                    data: b"",
                }
                .encode(&mut out);
                let [
                    Frame::StreamEnd {
                        offset: t,
                        offset_len,
                        ..
                    },
                ] = decode_frames(&out).unwrap()[..]
                else {
                    panic!("not a STREAM_END");
                };
                assert_eq!(offset_len, k);
                assert_eq!(
                    expand_stream_offset(t, k, highest),
                    offset,
                    "{offset} {highest} {k}"
                );
            }
        }
    }

    #[test]
    fn data_header_golden_bytes() {
        let mut out = Vec::new();
        // 4 bytes: 29 bits of the packet number.
        put_data_header(&mut out, 0x0000_0007_1234_5679, 4);
        assert_eq!(out, [0xe0 | 0x12, 0x34, 0x56, 0x79]);
        assert_eq!(parse_data_header(&out), Some((0x1234_5679, 4)));
        out.clear();
        put_data_header(&mut out, 0x1_2345, 2);
        assert_eq!(out, [0xa3, 0x45]);
        assert_eq!(parse_data_header(&out), Some((0x0345, 2)));
        out.clear();
        put_data_header(&mut out, 0x3f, 1);
        assert_eq!(out, [0x9f]);
        assert_eq!(parse_data_header(&out), Some((0x1f, 1)));
        // Trailing bytes are the ciphertext's.
        assert_eq!(parse_data_header(&[0xc1, 2, 3, 4, 5]), Some((0x1_0203, 3)));
        // Handshake types, other types and cut headers are not data headers.
        for bad in [
            &[0x01, 0, 1, 2][..],
            &[0x7f, 0, 1],
            &[0xe0, 0, 1],
            &[0xa0],
            &[],
        ] {
            assert_eq!(parse_data_header(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_length_covers_twice_the_unacknowledged_range() {
        assert_eq!(data_header_len(0, None), 1);
        assert_eq!(data_header_len(15, Some(0)), 1);
        assert_eq!(data_header_len(16, Some(0)), 2);
        assert_eq!(data_header_len(1_000_000, Some(1_000_000 - 4_095)), 2);
        assert_eq!(data_header_len(1_000_000, Some(1_000_000 - 4_096)), 3);
        assert_eq!(data_header_len(1 << 40, Some((1 << 40) - (1 << 19))), 3);
        assert_eq!(data_header_len(1 << 40, Some((1 << 40) - (1 << 20))), 4);
        // Nothing acknowledged yet (or ever, on an ACK-only direction): the range is the
        // whole history, and 4 bytes is the most.
        assert_eq!(data_header_len(1 << 40, None), 4);
    }

    #[test]
    fn packet_numbers_expand_to_the_nearest() {
        // RFC 9000 A.3's example: 0xa82f9b32 with 16 bits, expected 0xa82f30eb.
        assert_eq!(
            expand_packet_number(0x9b32, 16, 0xa82f_30ea + 1),
            0xa82f_9b32
        );
        // Just past a wrap of 29 bits.
        assert_eq!(expand_packet_number(5, 29, 1 << 29), (1 << 29) + 5);
        assert_eq!(
            expand_packet_number(0x1fff_fff0, 29, (1 << 29) + 3),
            0x1fff_fff0
        );
        assert_eq!(expand_packet_number(0, 5, 0), 0);
        assert_eq!(expand_packet_number(17, 13, 10), 17);
        assert_eq!(expand_packet_number(0x1fff_ffff, 29, 0), 0x1fff_ffff);
        // Every number less than half the window below the expected one, or up to half the
        // window above, comes back exactly, for every header length, also through the header.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for len in 1..=4usize {
            let bits = packet_number_bits(len);
            let half = 1i64 << (bits - 1);
            for _ in 0..10_000 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let expected = rng >> 20;
                let delta = (rng % (2 * half as u64 - 1)) as i64 - half + 1;
                let pn = expected.saturating_add_signed(delta);
                let mut out = Vec::new();
                put_data_header(&mut out, pn, len);
                let (truncated, parsed_len) = parse_data_header(&out).unwrap();
                assert_eq!(parsed_len, len);
                assert_eq!(
                    expand_packet_number(truncated, bits, expected),
                    pn,
                    "{pn} {expected} {len}"
                );
            }
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(matches!(
            decode_frames(&[0x77]),
            Err(WireError::UnknownFrame { kind: 0x77, .. })
        ));
        // STREAM_END cut inside its 4-byte offset.
        assert!(matches!(
            decode_frames(&[0x16, 0x01, 0x00, 0x01]),
            Err(WireError::Truncated { .. })
        ));
        // STREAM claiming more data than present.
        assert!(matches!(
            decode_frames(&[0x04, 0x01, 0x00, 0x10, 1, 2]),
            Err(WireError::Truncated { .. })
        ));
        // ACK whose first range goes below zero.
        assert!(matches!(
            decode_frames(&[0x02, 0x01, 0x00, 0x00, 0x00, 0x05]),
            Err(WireError::OutOfRange { .. })
        ));
        // Random garbage never panics.
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode_frames(&buf);
        }
    }
}
