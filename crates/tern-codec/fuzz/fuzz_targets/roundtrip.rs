#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_codec::{Decoder, Encoder, MemStore, Options};

fuzz_target!(|data: &[u8]| {
    let Some((&opts, rest)) = data.split_first() else { return };
    let Some(opts) = Options::from_byte(opts & 15) else { return };
    let mut e = Encoder::with_capacity(opts, 64, 64);
    let mut enc = Vec::new();
    let (mut a, mut b) = (MemStore::default(), MemStore::default());
    for chunk in rest.chunks(1000) {
        e.push(chunk, &mut enc, &mut a);
    }
    e.finish(&mut enc);
    let mut d = Decoder::with_capacity(opts, 64, 64);
    let mut out = Vec::new();
    d.push(&enc, &mut out, &mut b).expect("own encoding decodes");
    assert_eq!(out, rest);
});
