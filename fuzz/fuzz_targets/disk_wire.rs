#![no_main]
//! The disk replication wire format (`tern-disk/src/wire.rs`): arbitrary bytes through the
//! incremental `Reader` in chunks, and `decode(kind, body)` directly. Never a panic; every
//! decoded message re-encodes to bytes that decode to the same message (an ERROR's text
//! cut to the encoder's 4 KiB).
use libfuzzer_sys::fuzz_target;
use tern_disk::wire::{Msg, Reader, decode};

fn round_trip(m: &Msg) {
    let bytes = m.to_bytes();
    let mut r = Reader::default();
    r.push(&bytes);
    let back = r
        .next_msg()
        .expect("own encoding decodes")
        .expect("complete");
    match (m, &back) {
        // The encoder cuts an ERROR's text to 4 KiB (the decoder takes up to a body).
        (Msg::Error(long), Msg::Error(cut)) if long.len() > 4096 => {
            assert!(long.starts_with(cut.as_str()) && cut.len() > 4092);
        }
        _ => assert_eq!(&back, m),
    }
    assert_eq!(r.pending(), 0);
}

fuzz_target!(|data: &[u8]| {
    let [kind, split, rest @ ..] = data else {
        return;
    };
    if let Ok(m) = decode(*kind, rest) {
        round_trip(&m);
    }
    let mut r = Reader::default();
    'outer: for chunk in rest.chunks(usize::from(*split) + 1) {
        r.push(chunk);
        loop {
            match r.next_msg() {
                Ok(Some(m)) => round_trip(&m),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
});
