//! Decompression bombs: a ~33 KiB residual zstd stream that expands to 1 GiB of valid RAW
//! frames must be refused with an error at the per-push bound, not decoded into gigabytes.

use tern_codec::decoder::{MAX_PUSH_FRAME_BYTES, MAX_PUSH_OUTPUT_BYTES};
use tern_codec::residual::Decompressor;
use tern_codec::{DecodeError, Decoder, MemStore, Options, wire};

const BLOCK: usize = 128 << 10;

/// A zstd frame header (no content size, 128 KiB window) followed by blocks.
fn zstd_header() -> Vec<u8> {
    // magic, frame header descriptor 0 (no size, not single-segment), window 2^(10+7).
    vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3]
}

fn raw_block(z: &mut Vec<u8>, bytes: &[u8]) {
    let h = (bytes.len() as u32) << 3;
    z.extend_from_slice(&h.to_le_bytes()[..3]);
    z.extend_from_slice(bytes);
}

fn rle_block(z: &mut Vec<u8>, byte: u8, len: usize, last: bool) {
    let h = (len as u32) << 3 | 1 << 1 | u32::from(last);
    z.extend_from_slice(&h.to_le_bytes()[..3]);
    z.push(byte);
}

/// `frames` RAW frames of `wire::MAX_FRAME` bytes of 'A' each, as RLE blocks.
fn bomb(frames: usize) -> Vec<u8> {
    let mut z = zstd_header();
    let len = wire::MAX_FRAME as usize;
    for f in 0..frames {
        let mut hdr = vec![wire::RAW];
        wire::put_varint(&mut hdr, len as u64);
        raw_block(&mut z, &hdr);
        let blocks = len / BLOCK;
        for b in 0..blocks {
            rle_block(&mut z, b'A', BLOCK, f + 1 == frames && b + 1 == blocks);
        }
    }
    z
}

#[test]
fn residual_bomb_is_refused_at_the_push_bound() {
    let z = bomb(16); // 16 x 64 MiB = 1 GiB of frames
    assert!(z.len() < 40 << 10, "{} bytes", z.len());
    let opts = Options {
        zstd: true,
        ..Options::NONE
    };
    let mut d = Decoder::new(opts);
    let mut out = Vec::new();
    let e = d
        .push(&z, &mut out, &mut MemStore::default())
        .expect_err("a 1 GiB bomb must be refused");
    assert!(
        matches!(
            e,
            DecodeError::OutputLimit { .. } | DecodeError::ZstdLimit { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("decompression bomb"), "{e}");
    assert!(out.len() as u64 <= MAX_PUSH_OUTPUT_BYTES);
    assert!(out.iter().all(|&b| b == b'A'));
}

#[test]
fn a_bomb_split_over_pushes_is_decoded_within_the_bound_per_push() {
    // The same frames arriving in 1 KiB pieces: each push stays under the bound, and the
    // output is exactly what the frames say (a bound per push, not a cap on the stream).
    let z = bomb(2);
    let opts = Options {
        zstd: true,
        ..Options::NONE
    };
    let mut d = Decoder::new(opts);
    let mut total = 0u64;
    let mut out = Vec::new();
    for piece in z.chunks(1024) {
        out.clear();
        d.push(piece, &mut out, &mut MemStore::default())
            .expect("within the bound");
        assert!(out.len() as u64 <= MAX_PUSH_OUTPUT_BYTES);
        total += out.len() as u64;
    }
    assert_eq!(total, 2 * wire::MAX_FRAME);
    assert!(d.is_clean());
    const { assert!(MAX_PUSH_FRAME_BYTES >= 2 * wire::MAX_FRAME) };
}

#[test]
fn decompressor_stops_at_the_declared_size_without_allocating_more() {
    let z = bomb(16);
    let limit = 1 << 20;
    let mut d = Decompressor::new().unwrap();
    let mut out = Vec::new();
    let e = d
        .push_limited(&z, &mut out, limit)
        .expect_err("over the limit");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(out.len(), limit);
    assert!(out.capacity() <= 2 * limit, "{}", out.capacity());
    // Exactly the size the format declares is fine.
    let mut z = zstd_header();
    rle_block(&mut z, 7, 1000, true);
    let mut d = Decompressor::new().unwrap();
    let mut out = Vec::new();
    d.push_limited(&z, &mut out, 1000).unwrap();
    assert_eq!(out, vec![7; 1000]);
    let mut d = Decompressor::new().unwrap();
    assert!(d.push_limited(&z, &mut Vec::new(), 999).is_err());
}
