//! Page deltas: the new version of a page as runs against the version sent before
//! (CloudNet's XOR + run-length step; the same idea as QEMU's XBZRLE).
//!
//! ```text
//! delta = { skip varint | len varint | len new bytes }*     skip: unchanged bytes before
//! ```
//! Runs end at the page end; trailing unchanged bytes are not coded, so an unchanged page is
//! the empty delta. Unchanged gaps shorter than [`MIN_GAP`] bytes are folded into the
//! changed run (two varints would cost more than the bytes).

use crate::PAGE;
use crate::wire::{get_varint, put_varint};

/// Shortest unchanged gap coded as a skip.
pub const MIN_GAP: usize = 4;

/// Appends the delta from `old` to `new` to `out`; gives up (returns false, `out` restored)
/// once it would exceed `limit` bytes.
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    debug_assert_eq!(old.len(), PAGE);
    debug_assert_eq!(new.len(), PAGE);
    let start = out.len();
    let mut pos = 0; // bytes of `new` coded so far
    let mut i = 0;
    while i < PAGE {
        // Skip equal 8-byte words fast, then bytes.
        while i + 8 <= PAGE && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < PAGE && old[i] == new[i] {
            i += 1;
        }
        if i >= PAGE {
            break;
        }
        let run_start = i;
        // Extend the changed run until an unchanged gap of MIN_GAP bytes.
        let mut end = i;
        let mut j = i;
        while j < PAGE {
            if old[j] != new[j] {
                j += 1;
                end = j;
            } else {
                let mut k = j;
                while k < PAGE && old[k] == new[k] && k - j < MIN_GAP {
                    k += 1;
                }
                if k - j >= MIN_GAP || k == PAGE {
                    break;
                }
                j = k;
            }
        }
        put_varint(out, (run_start - pos) as u64);
        put_varint(out, (end - run_start) as u64);
        out.extend_from_slice(&new[run_start..end]);
        if out.len() - start > limit {
            out.truncate(start);
            return false;
        }
        pos = end;
        i = end;
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed page delta")]
pub struct DeltaError;

/// Applies `delta` to `page` (which holds the previous version) in place.
pub fn apply(page: &mut [u8], mut delta: &[u8]) -> Result<(), DeltaError> {
    let mut pos = 0usize;
    while !delta.is_empty() {
        let (skip, a) = get_varint(delta).ok().flatten().ok_or(DeltaError)?;
        let (len, b) = get_varint(&delta[a..]).ok().flatten().ok_or(DeltaError)?;
        delta = &delta[a + b..];
        let at = pos.checked_add(skip as usize).ok_or(DeltaError)?;
        let end = at.checked_add(len as usize).ok_or(DeltaError)?;
        if end > PAGE || (len as usize) > delta.len() || len == 0 {
            return Err(DeltaError);
        }
        page[at..end].copy_from_slice(&delta[..len as usize]);
        delta = &delta[len as usize..];
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut d = Vec::new();
        assert!(encode(old, new, PAGE * 2, &mut d));
        let mut page = old.to_vec();
        apply(&mut page, &d).unwrap();
        assert_eq!(page, new);
        d.len()
    }

    #[test]
    fn small_changes_give_small_deltas() {
        let old: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        assert_eq!(round_trip(&old, &old), 0);
        let mut new = old.clone();
        new[100] ^= 1;
        new[101] ^= 1;
        new[4095] = 0;
        assert!(round_trip(&old, &new) <= 8);
        let mut new = old.clone();
        for i in (0..PAGE).step_by(3) {
            new[i] ^= 0xff;
        }
        round_trip(&old, &new);
        let new: Vec<u8> = (0..PAGE).map(|i| (i * 13 + 1) as u8).collect();
        round_trip(&old, &new);
    }

    #[test]
    fn limit_restores_output() {
        let old = vec![0u8; PAGE];
        let new = vec![1u8; PAGE];
        let mut d = vec![9];
        assert!(!encode(&old, &new, 100, &mut d));
        assert_eq!(d, vec![9]);
    }

    #[test]
    fn bad_deltas_are_errors() {
        let mut p = vec![0u8; PAGE];
        assert_eq!(apply(&mut p, &[0x80]), Err(DeltaError));
        assert_eq!(apply(&mut p, &[0, 5, 1]), Err(DeltaError));
        let mut big = Vec::new();
        put_varint(&mut big, 4095);
        put_varint(&mut big, 2);
        big.extend_from_slice(&[1, 2]);
        assert_eq!(apply(&mut p, &big), Err(DeltaError));
        assert_eq!(apply(&mut p, &[0, 0]), Err(DeltaError));
    }
}
