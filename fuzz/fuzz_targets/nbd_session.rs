#![no_main]
//! Arbitrary bytes into a `ServerSession`, fed in chunks whose sizes come from the input,
//! requests answered from a small in-memory disk. Must never panic.
use libfuzzer_sys::fuzz_target;
use tern_nbd::{Event, ExportInfo, MemBackend, ServerSession, execute, nbd_error};

const EXPORT_BYTES: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let exports = vec![
        ExportInfo {
            name: "disk".into(),
            description: "fuzz".into(),
            size: EXPORT_BYTES as u64,
            read_only: false,
            multi_conn: false,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: EXPORT_BYTES as u64,
            read_only: true,
            multi_conn: true,
        },
    ];
    let backend = MemBackend::new(EXPORT_BYTES, false);
    let mut session = ServerSession::new(exports);
    for piece in rest.chunks(chunk).map(Some).chain([None]) {
        match piece {
            Some(bytes) => session.input(bytes),
            None => session.input_eof(),
        }
        while let Some(event) = session.poll_event() {
            if let Event::Request(request) = event {
                let result = execute(&backend, &request).map_err(|e| nbd_error(&e));
                let _ = session.reply(request.id, result);
            }
        }
        let _ = session.take_output();
    }
});
