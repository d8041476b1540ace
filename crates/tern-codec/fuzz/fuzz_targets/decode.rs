#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_codec::{Decoder, MemStore, Options};

fuzz_target!(|data: &[u8]| {
    let Some((&opts, rest)) = data.split_first() else { return };
    let Some(opts) = Options::from_byte(opts & 15) else { return };
    let mut d = Decoder::with_capacity(opts, 64, 64);
    let mut out = Vec::new();
    for chunk in rest.chunks(97) {
        if d.push(chunk, &mut out, &mut MemStore::default()).is_err() {
            break;
        }
    }
});
