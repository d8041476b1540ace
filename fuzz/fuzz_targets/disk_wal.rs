#![no_main]
//! The backup's write log (`tern-disk/src/wal.rs`): a log file of arbitrary bytes decodes or
//! is refused, never a panic; what decodes re-encodes to the intact prefix (reserved header bytes aside); and a
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
    // The header's magic and applied counter, then every intact record, byte for byte (the
    // header's last 8 bytes are reserved: written as zeros, not read).
    let header = wal::HEADER;
    assert_eq!(enc.len(), c.valid);
    assert_eq!(enc[..16], data[..16]);
    assert_eq!(enc[header..], data[header..c.valid]);
    let back = wal::decode(&enc).expect("own log decodes");
    assert_eq!(back, c);
});
