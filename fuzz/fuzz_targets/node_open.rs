#![no_main]
//! The node's stream-open header (`tern-node/src/open.rs`) and the local migration request:
//! arbitrary bytes decode or fail, never panic; a decoded header re-encodes to the bytes it
//! was read from, and only ever names a safe relative path.
use libfuzzer_sys::fuzz_target;
use tern_node::open::{OpenHeader, read_migration_request, safe_relative_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, used))) = OpenHeader::decode(data) {
        assert!(used <= data.len());
        if let OpenHeader::Unix { path, .. } = &h {
            assert!(safe_relative_path(path));
        }
        let mut enc = Vec::new();
        h.encode(&mut enc);
        assert_eq!(OpenHeader::decode(&enc), Ok(Some((h, enc.len()))));
    }
    // Every prefix of the input is "incomplete" or the same verdict, never a panic.
    for cut in 0..data.len().min(16) {
        let _ = OpenHeader::decode(&data[..cut]);
    }
    if let Ok(req) = read_migration_request(&mut &data[..]) {
        assert!(safe_relative_path(&req.path));
        assert!(tern_codec::Options::from_byte(req.codec).is_some());
    }
});
