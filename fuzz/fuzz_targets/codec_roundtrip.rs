#![no_main]
//! Encoder -> decoder on arbitrary input (first byte: options, second: push size): the
//! decoder rebuilds exactly the bytes the encoder was given, in any split.
use libfuzzer_sys::fuzz_target;
use tern_codec::{Decoder, Encoder, MemStore, Options};

fuzz_target!(|data: &[u8]| {
    let [opts, split, rest @ ..] = data else {
        return;
    };
    let Some(opts) = Options::from_byte(opts & 15) else {
        return;
    };
    let split = usize::from(*split) * 8 + 1;
    let mut e = Encoder::with_capacity(opts, 64, 64);
    let mut enc = Vec::new();
    let (mut a, mut b) = (MemStore::default(), MemStore::default());
    for chunk in rest.chunks(1000) {
        e.push(chunk, &mut enc, &mut a);
    }
    e.finish(&mut enc);
    let mut d = Decoder::with_capacity(opts, 64, 64);
    let mut out = Vec::new();
    for piece in enc.chunks(split) {
        d.push(piece, &mut out, &mut b)
            .expect("own encoding decodes");
    }
    assert!(d.is_clean());
    assert_eq!(out, rest);
});
