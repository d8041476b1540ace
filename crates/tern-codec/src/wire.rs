//! The encoded stream: a sequence of frames, then (optionally) a raw tail.
//!
//! ```text
//! forward (source node -> destination node)
//!   0x01 RAW       varint len | len bytes             verbatim QEMU bytes
//!   0x02 PAGE      u8 hlen | hlen header bytes | body  a PAGE record (header = be64 word [+ idstr])
//!   0x03 PAGE_NEXT body                                header word = previous page's + 4096,
//!                                                      CONTINUE (no idstr)
//!   0x04 RAW_TAIL                                      every later byte is verbatim
//!   every PAGE / PAGE_NEXT frame ends with a 4-byte LE check of the rebuilt page
//!   body: 0 LITERAL   4096 bytes
//!         1 SUBS      u8 kinds (2 bits per 1 KiB sub-block, low bits first:
//!                     0 zero, 1 ref = varint distance back in the ring, 2 literal 1024 bytes)
//!         2 DELTA     varint len | len bytes of delta::encode against the page's last version
//!         3 STORE     16-byte content hash (BLAKE3 prefix) held by the destination's store
//!
//! reverse (destination node -> source node)
//!   0x01 RETURN    varint len | len bytes             QEMU return-path bytes
//!   0x02 SUMMARY   varint len | Summary::encode        what the destination's store holds
//!   0x03 DELIVERED varint len | varint total           QEMU bytes written to the destination
//!                                                      QEMU so far (the source bounds what
//!                                                      it has read beyond that)
//! ```
//! Varints are LEB128 (7 bits a byte, low first), at most 10 bytes.

pub const RAW: u8 = 0x01;
pub const PAGE_HDR: u8 = 0x02;
pub const PAGE_NEXT: u8 = 0x03;
pub const RAW_TAIL: u8 = 0x04;

pub const BODY_LITERAL: u8 = 0;
pub const BODY_SUBS: u8 = 1;
pub const BODY_DELTA: u8 = 2;
pub const BODY_STORE: u8 = 3;

pub const SUB_ZERO: u8 = 0;
pub const SUB_REF: u8 = 1;
pub const SUB_LITERAL: u8 = 2;

pub const REV_RETURN: u8 = 0x01;
pub const REV_SUMMARY: u8 = 0x02;
pub const REV_DELIVERED: u8 = 0x03;

/// Largest RAW or reverse frame a decoder accepts.
pub const MAX_FRAME: u64 = 64 << 20;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Reads a varint at the start of `buf`: `Ok(Some((value, used)))`, `Ok(None)` if
/// incomplete, `Err(())` if longer than 10 bytes or overflowing.
#[allow(clippy::result_unit_err)]
pub fn get_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, ()> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i == 9 && b > 1 {
            return Err(());
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
        if i == 9 {
            return Err(());
        }
    }
    Ok(None)
}

/// Appends a reverse-direction frame.
pub fn put_reverse(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReverseError {
    #[error("unknown reverse frame kind {0:#04x}")]
    Kind(u8),
    #[error("bad reverse frame length")]
    Length,
}

/// Splits the reverse direction into frames (incremental).
#[derive(Debug, Default)]
pub struct ReverseReader {
    buf: Vec<u8>,
}

impl ReverseReader {
    /// Feeds bytes; calls `f(kind, payload)` for every complete frame.
    pub fn push(&mut self, data: &[u8], mut f: impl FnMut(u8, &[u8])) -> Result<(), ReverseError> {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let Some(&kind) = rest.first() else { break };
            if !(REV_RETURN..=REV_DELIVERED).contains(&kind) {
                return Err(ReverseError::Kind(kind));
            }
            let (len, used) = match get_varint(&rest[1..]) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(()) => return Err(ReverseError::Length),
            };
            if len > MAX_FRAME {
                return Err(ReverseError::Length);
            }
            let end = 1 + used + len as usize;
            if rest.len() < end {
                break;
            }
            f(kind, &rest[1 + used..end]);
            pos += end;
        }
        self.buf.drain(..pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 1 << 32, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(get_varint(&b), Ok(Some((v, b.len()))));
            assert_eq!(get_varint(&b[..b.len() - 1]), Ok(None));
        }
        assert_eq!(get_varint(&[0xff; 11]), Err(()));
        assert_eq!(
            get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(())
        );
    }

    #[test]
    fn reverse_frames_split_anywhere() {
        let mut all = Vec::new();
        put_reverse(&mut all, REV_RETURN, b"hello");
        put_reverse(&mut all, REV_SUMMARY, &[7; 300]);
        for cut in 0..all.len() {
            let mut r = ReverseReader::default();
            let mut got = Vec::new();
            r.push(&all[..cut], |k, p| got.push((k, p.to_vec())))
                .unwrap();
            r.push(&all[cut..], |k, p| got.push((k, p.to_vec())))
                .unwrap();
            assert_eq!(
                got,
                vec![(REV_RETURN, b"hello".to_vec()), (REV_SUMMARY, vec![7; 300])]
            );
        }
        let mut r = ReverseReader::default();
        assert_eq!(r.push(&[9, 0], |_, _| {}), Err(ReverseError::Kind(9)));
    }
}
