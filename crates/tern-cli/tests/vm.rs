//! End-to-end tests of `tern vm`: the real binary, a real lab and real QEMU (TCG). The lab
//! needs root (as in CI); elsewhere the lab tests say so and skip, unless CI=true.
//!
//! One test boots tern's multiboot test kernel (always available); one boots the tern
//! guest (`/var/lib/tern/guest/{vmlinuz,initrd.img}`) and skips, saying so, when it has
//! not been built.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{is_root, json, lock, ok, tern};
use serde_json::Value;
use tern_vm::{testkernel, vm};

/// Stops the VMs (SIGKILL if `tern vm stop` cannot) and takes the lab down, also when a
/// test fails half-way.
struct Cleanup {
    names: Vec<&'static str>,
    dir: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.names {
            let out = tern(&["vm", "stop", n]);
            if !out.status.success() {
                kill_leftovers(n);
            }
        }
        let _ = tern(&["lab", "down"]);
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn kill_leftovers(name: &str) {
    for site in ["a", "b"] {
        let paths = vm::InstancePaths::new(Path::new(vm::VM_RUN_DIR), name, site);
        let pid = std::fs::read_to_string(&paths.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid.filter(|p| vm::pid_alive(*p, &paths.qmp_socket)) {
            // SAFETY: kill of a pid whose command line is this test VM's QEMU.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(vm::VM_RUN_DIR).join(name));
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn instance<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .expect("an array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

fn netns_of(pid: u64) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "identify", &pid.to_string()])
        .output()
        .expect("ip netns identify");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn bad_vm_input_gets_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["vm", "start", "bad/name"], "invalid VM name"),
        (&["vm", "start", "-x"], "unexpected argument"),
        (&["vm", "start", "v1", "--mem", "16"], "out of range"),
        (
            &["vm", "start", "v1", "--kernel", "/nonexistent/vmlinuz"],
            "kernel /nonexistent/vmlinuz does not exist",
        ),
        (&["vm", "start", "v1", "--ip", "198.18.100"], "not an IPv4"),
        (
            &["vm", "start", "v1", "--mac", "01:00:5e:00:00:01"],
            "multicast",
        ),
        (
            &["vm", "start", "v1", "--net", "/x", "--no-net"],
            "cannot be used",
        ),
        (&["vm", "stop", "no-such-vm"], "no VM named no-such-vm"),
    ];
    for (args, want) in cases {
        let out = tern(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn vm_lifecycle_in_the_lab_with_the_test_kernel() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    let dir = std::env::temp_dir().join(format!("tern-vm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _c = Cleanup {
        names: vec!["t1"],
        dir: Some(dir.clone()),
    };
    let kernel = dir.join("kernel.bin");
    let initrd = dir.join("initrd.img");
    std::fs::write(&kernel, testkernel::multiboot_image("tern e2e guest up\n")).unwrap();
    std::fs::write(&initrd, b"unused\n").unwrap();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let start = [
        "vm", "start", "t1", "--site", "a", "--mem", "64", "--kernel", k,
    ];
    let start = [
        &start[..],
        &["--initrd", i, "--no-net", "--workload", "none"],
    ]
    .concat();

    // Without a lab there is nowhere to run.
    let out = tern(&start);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster file"));

    ok(&["lab", "up", "--profile", "baseline"]);
    let started: Value = serde_json::from_str(&ok(&[&start[..], &["--json"]].concat())).unwrap();
    assert_eq!(started["state"], "running");
    let list = json(&["vm", "list", "--json"]);
    let v = instance(&list, "t1");
    assert_eq!(v["site"], "a");
    assert_eq!(v["state"], "running");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["mem_mib"], 64);
    assert_eq!(v["ip"], "198.18.100.10/24");
    assert_eq!(v["mac"], vm::MacAddr::for_name("t1").to_string());
    assert_eq!(v["qmp_socket"], "/run/tern/vm/t1/a/qmp.sock");
    let pid = v["pid"].as_u64().unwrap();
    let qmp = PathBuf::from(v["qmp_socket"].as_str().unwrap());
    assert!(qmp.exists());
    assert!(vm::pid_alive(pid as u32, &qmp));
    assert_eq!(netns_of(pid), "tern-a", "QEMU runs inside the site");

    // The guest's serial output lands in the listed log.
    let serial = PathBuf::from(v["serial_log"].as_str().unwrap());
    wait_for("the guest's serial line", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("tern e2e guest up"))
    });

    // The QMP socket answers (a real client through the library).
    let mut c = tern_vm::QmpClient::connect(&qmp, Duration::from_secs(5)).unwrap();
    let name = c.execute("query-name", Value::Null).unwrap();
    assert_eq!(name["name"], "t1");
    drop(c);

    // One VM per name.
    let out = tern(&start);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));

    // Human list.
    let text = ok(&["vm", "list"]);
    assert!(text.contains("t1") && text.contains("running"), "{text}");

    ok(&["vm", "stop", "t1"]);
    assert!(!vm::pid_alive(pid as u32, &qmp));
    assert!(!Path::new("/run/tern/vm/t1").exists());
    assert_eq!(json(&["vm", "list", "--json"]), Value::Array(vec![]));
    ok(&["lab", "down"]);
}

#[test]
fn vm_with_the_tern_guest() {
    let (kernel, initrd) = (Path::new(vm::DEFAULT_KERNEL), Path::new(vm::DEFAULT_INITRD));
    if !kernel.exists() || !initrd.exists() {
        eprintln!(
            "skipping: the tern guest is not built ({} / {}; see scripts/guest-image.sh)",
            kernel.display(),
            initrd.display()
        );
        return;
    }
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    let _c = Cleanup {
        names: vec!["g1"],
        dir: None,
    };
    ok(&["lab", "up", "--profile", "baseline"]);
    ok(&[
        "vm",
        "start",
        "g1",
        "--site",
        "b",
        "--mem",
        "256",
        "--workload",
        "web-db",
    ]);
    let list = json(&["vm", "list", "--json"]);
    let v = instance(&list, "g1");
    assert_eq!(v["state"], "running");
    assert_eq!(v["workload"], "web-db");
    let pid = v["pid"].as_u64().unwrap();
    assert_eq!(netns_of(pid), "tern-b");
    // The guest boots (TCG: tens of seconds) and reports the address tern gave it on its
    // kernel command line.
    let serial = PathBuf::from(v["serial_log"].as_str().unwrap());
    wait_for("the guest to boot", Duration::from_secs(240), || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("198.18.100.10/24"))
    });
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(instance(&list, "g1")["state"], "running");
    ok(&["vm", "stop", "g1"]);
    assert!(!Path::new("/run/tern/vm/g1").exists());
    ok(&["lab", "down"]);
}
