#![no_main]
//! QMP replies (`tern-vm/src/qmp.rs`): arbitrary bytes from "QEMU" into a `QmpSession` in
//! chunks, with a command outstanding so replies are matched. Never a panic.
use libfuzzer_sys::fuzz_target;
use tern_vm::QmpSession;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut s = QmpSession::new();
    let mut ids = Vec::new();
    if let Ok(id) = s.send_command("query-status", serde_json::Value::Null) {
        ids.push(id);
    }
    for chunk in rest.chunks(usize::from(split) + 1) {
        if s.handle_input(chunk).is_err() {
            break;
        }
        while s.poll_transmit().is_some() {}
        if s.is_ready()
            && ids.len() < 4
            && let Ok(id) = s.send_command("query-migrate", serde_json::json!({}))
        {
            ids.push(id);
        }
        for &id in &ids {
            let _ = s.take_reply(id);
        }
        while s.poll_event().is_some() {}
    }
});
