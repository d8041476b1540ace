#![no_main]
//! The backup's write log (`tern-disk/src/wal.rs`): a log file of arbitrary bytes decodes or
//! is refused, never a panic; what decodes re-encodes to exactly the intact prefix; and a
//! log built from decoded records decodes back to them.
use libfuzzer_sys::fuzz_target;
use tern_disk::wal;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = wal::decode(data) else {
        return;
    };
    assert!(c.valid <= data.len());
    if data.is_empty() {
        return;
    }
    let mut enc = wal::header(c.applied_write).to_vec();
    for r in &c.records {
        wal::encode(r, &mut enc);
    }
    assert_eq!(enc.len(), c.valid);
    assert_eq!(enc, data[..c.valid]);
    let back = wal::decode(&enc).expect("own log decodes");
    assert_eq!(back, c);
});
