#![no_main]
//! The record layer (`tern-transport/src/record.rs`): arbitrary bytes into a
//! `RecordDecoder` in chunks (no panic, output bounded by the records it accepted), and an
//! encoder -> decoder round trip of the same bytes with each codec.
use libfuzzer_sys::fuzz_target;
use tern_transport::record::{Codec, MAX_RECORD, RECORD_HEADER_LEN, RecordDecoder, RecordEncoder};

fuzz_target!(|data: &[u8]| {
    let Some((&meta, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(meta >> 2) * 16 + 1;
    let mut d = RecordDecoder::new();
    let mut out = Vec::new();
    for chunk in rest.chunks(split) {
        let before = out.len();
        let held = d.buffered();
        if d.push(chunk, &mut out).is_err() {
            break;
        }
        // One push yields at most the records completed by its bytes.
        let records = (held + chunk.len()) / RECORD_HEADER_LEN;
        assert!(out.len() - before <= records * MAX_RECORD);
    }
    let codec = match meta & 3 {
        0 => Codec::Raw,
        1 => Codec::Lz4,
        _ => Codec::Zstd { level: 1 },
    };
    let mut e = RecordEncoder::new(codec);
    e.set_compress_all(meta & 4 != 0);
    let mut enc = Vec::new();
    for chunk in rest.chunks(split * 7) {
        e.encode(chunk, &mut enc);
    }
    let mut d = RecordDecoder::new();
    let mut back = Vec::new();
    for piece in enc.chunks(split) {
        d.push(piece, &mut back).expect("own records decode");
    }
    assert_eq!(back, rest);
});
