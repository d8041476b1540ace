#![no_main]
//! The overlay's switch (`tern-node/src/switch.rs`): `be32 len | frame` framing decoded in
//! chunks (marked or not) and every frame handed to `Switch::handle_frame` /
//! `handle_marked` from a port chosen by the input, with time moving on by a step the input
//! picks (so entries age).
//! Never a panic; a unicast never goes back out of its ingress port; frames re-frame to the same bytes.
use libfuzzer_sys::fuzz_target;
use tern_node::switch::{Forward, FrameDecoder, Port, Switch, encode_marked};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::default();
    let mut sw = Switch::new();
    let mut reframed = Vec::new();
    let mut consumed = 0usize;
    let mut now_ns = 0u64;
    'outer: for (i, chunk) in rest.chunks(usize::from(split) + 1).enumerate() {
        dec.push(chunk);
        loop {
            match dec.next_marked() {
                Ok(Some((marked, frame))) => {
                    consumed += 4 + frame.len();
                    encode_marked(frame, marked, &mut reframed);
                    let ingress = match i % 4 {
                        0 => Port::Tap,
                        1 => Port::Vm(i as u64 % 3),
                        _ => Port::Remote(i % 2),
                    };
                    let frame = frame.to_vec();
                    // Up to ~200 s a frame: a few frames cross the 300 s ageing time.
                    now_ns += u64::from(frame.first().copied().unwrap_or(0)) * 800_000_000;
                    let forward = if marked {
                        sw.handle_marked(ingress, &frame, now_ns)
                    } else {
                        sw.handle_frame(ingress, &frame, now_ns)
                    };
                    if let Forward::One(p) = forward {
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
        let _ = sw.lookup(&mac, now_ns);
    }
    sw.remove_port(Port::Remote(0));
});
