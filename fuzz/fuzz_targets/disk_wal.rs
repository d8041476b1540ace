#![no_main]
//! The backup's write log (`tern-disk/src/wal.rs`): a log file of arbitrary bytes decodes or
//! is refused, never a panic; a log built from the decoded records decodes back to them.
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
    // The header's magic and applied counter are kept as read.
    let mut enc = wal::header(c.applied_write).to_vec();
    assert_eq!(enc[..16], data[..16]);
    // A log of the decoded records, each durable before the next, decodes back to them.
    for r in &c.records {
        let at = enc.len() as u64;
        wal::encode(r, at, at, &mut enc);
    }
    let back = wal::decode(&enc).expect("own log decodes");
    assert_eq!(back.records, c.records);
    assert_eq!(back.applied_write, c.applied_write);
    assert_eq!(back.valid, enc.len());
});
