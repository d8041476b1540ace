#![no_main]
//! The tern-codec decoder on arbitrary bytes (first byte: options), fed in chunks: Ok or Err,
//! never a panic, and never more output per push than the decoder's bound.
use libfuzzer_sys::fuzz_target;
use tern_codec::decoder::MAX_PUSH_OUTPUT_BYTES;
use tern_codec::{Decoder, MemStore, Options};

fuzz_target!(|data: &[u8]| {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let Some(opts) = Options::from_byte(opts & 15) else {
        return;
    };
    let mut d = Decoder::with_capacity(opts, 64, 64);
    let mut store = MemStore::default();
    let mut out = Vec::new();
    for chunk in rest.chunks(97) {
        out.clear();
        let r = d.push(chunk, &mut out, &mut store);
        assert!(out.len() as u64 <= MAX_PUSH_OUTPUT_BYTES);
        if r.is_err() {
            break;
        }
    }
});
