//! Helpers shared by the end-to-end test binaries (each is its own crate, so each gets its
//! own lock: cargo runs test binaries one after another).

#![allow(dead_code)] // not every test binary uses every helper

use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// The lab's namespaces are global: one test at a time.
static LAB: Mutex<()> = Mutex::new(());

pub fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

pub fn ok(args: &[&str]) -> String {
    let out = tern(args);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).expect("JSON output")
}

/// The lab needs root; elsewhere tests skip, except under CI=true, where that is a failure.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").is_err(),
            "lab tests must run as root in CI"
        );
        eprintln!("skipping: the lab tests need root");
    }
    root
}

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}
