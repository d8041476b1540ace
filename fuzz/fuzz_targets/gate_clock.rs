#![no_main]
//! The gate's clock trailer (`tern-gate`): stripping a trailer off an arbitrary frame never
//! panics and, when it finds one, leaves the frame that re-appending the entries restores;
//! a group receiving arbitrary frames never panics.
use libfuzzer_sys::fuzz_target;
use tern_gate::{Group, append_clock, strip_clock};

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    if let Some(entries) = strip_clock(&mut frame) {
        assert!(frame.len() < data.len());
        let mut again = frame.clone();
        append_clock(&mut again, &entries);
        assert_eq!(again, data);
    } else {
        assert_eq!(frame, data);
    }
    let mut g = Group::new(
        [2, 0, 0, 0, 0, 1],
        vec![[2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]],
    );
    // From the owner's port (the trailer is parsed) and from anywhere else (left alone).
    let from_owner = data.first().is_some_and(|b| b & 1 == 1);
    let mut frame = data.to_vec();
    let took = g.receive(&mut frame, from_owner);
    if !from_owner {
        assert!(!took);
        assert_eq!(frame, data, "a frame nobody vouches for is left untouched");
    }
    let _ = g.deps();
});
