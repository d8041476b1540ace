#![no_main]
//! The codec's reverse direction (destination -> source): the frame reader and the store
//! summary on arbitrary bytes, no panic; frames re-encoded read back the same.
use libfuzzer_sys::fuzz_target;
use tern_codec::Summary;
use tern_codec::wire::{ReverseReader, put_reverse};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    if let Some(s) = Summary::decode(rest) {
        let mut b = Vec::new();
        s.encode(&mut b);
        assert_eq!(Summary::decode(&b), Some(s));
    }
    let mut r = ReverseReader::default();
    let mut frames = Vec::new();
    for chunk in rest.chunks(usize::from(split) + 1) {
        if r.push(chunk, |k, p| frames.push((k, p.to_vec()))).is_err() {
            break;
        }
    }
    let mut again = Vec::new();
    for (k, p) in &frames {
        put_reverse(&mut again, *k, p);
    }
    let mut r = ReverseReader::default();
    let mut back = Vec::new();
    r.push(&again, |k, p| back.push((k, p.to_vec())))
        .expect("own frames read back");
    assert_eq!(back, frames);
});
