#![no_main]
//! Frame decoding of a decrypted payload (`tern-transport/src/wire.rs`): arbitrary bytes
//! decode or fail, never panic; whatever decodes re-encodes to frames that decode equal;
//! data headers parse back what was written.
use libfuzzer_sys::fuzz_target;
use tern_transport::wire::{self, Frame, Reader};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut frames = Vec::new();
    while !r.is_empty() {
        match Frame::decode(&mut r) {
            Ok(f) => frames.push(f),
            Err(_) => break,
        }
    }
    let mut enc = Vec::new();
    for f in &frames {
        f.encode(&mut enc);
    }
    // A StreamEnd frame runs to the end of its packet: only the last may be one.
    let ends_inside = frames[..frames.len().saturating_sub(1)]
        .iter()
        .any(|f| matches!(f, Frame::StreamEnd { .. }));
    if !ends_inside {
        let back = wire::decode_frames(&enc).expect("own encoding decodes");
        assert_eq!(back, frames);
    }
    if let Some((pn, len)) = wire::parse_data_header(data) {
        let mut h = Vec::new();
        wire::put_data_header(&mut h, pn, len);
        assert_eq!(wire::parse_data_header(&h), Some((pn, len)));
    }
});
