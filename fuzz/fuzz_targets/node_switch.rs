#![no_main]
//! The overlay's switch (`tern-node/src/switch.rs`): `be32 len | frame` framing decoded in
//! chunks and every frame handed to `Switch::handle_frame` from a port chosen by the input.
//! Never a panic; a unicast never goes back out of its ingress port; frames re-frame to the same bytes.
use libfuzzer_sys::fuzz_target;
use tern_node::switch::{Forward, FrameDecoder, Port, Switch, encode_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::default();
    let mut sw = Switch::new();
    let mut reframed = Vec::new();
    let mut consumed = 0usize;
    'outer: for (i, chunk) in rest.chunks(usize::from(split) + 1).enumerate() {
        dec.push(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    consumed += 4 + frame.len();
                    encode_frame(frame, &mut reframed);
                    let ingress = match i % 4 {
                        0 => Port::Tap,
                        1 => Port::Vm(i as u64 % 3),
                        _ => Port::Remote(i % 2),
                    };
                    let frame = frame.to_vec();
                    if let Forward::One(p) = sw.handle_frame(ingress, &frame) {
                        assert_ne!(p, ingress);
                    }
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    assert_eq!(reframed, rest[..consumed]);
    if rest.len() > 12 {
        let mac = rest[6..12].try_into().expect("6 bytes");
        let _ = sw.lookup(&mac);
    }
    sw.remove_port(Port::Remote(0));
});
