//! tern-vm against a real QEMU (no lab, no root): the QMP client including fd passing,
//! and the VM lifecycle including a migration over a passed socket, with the multiboot
//! test kernel as guest. Skipped (with a line saying so) when QEMU is not installed,
//! except under CI=true.

use std::fs;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_vm::vm::{self, Role, VmHost, VmSpec};
use tern_vm::{ClientError, QmpClient, testkernel};

fn have_qemu() -> bool {
    let ok = Command::new(vm::QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("CI").is_err(), "CI must have {}", vm::QEMU);
        eprintln!("skipping: {} is not installed", vm::QEMU);
    }
    ok
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-vm-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A bare QEMU (no guest, paused) that is killed when dropped.
struct Qemu {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn bare_qemu(tag: &str) -> (Qemu, PathBuf) {
    let dir = scratch(tag);
    let sock = dir.join("qmp.sock");
    let child = Command::new(vm::QEMU)
        .args(["-machine", "pc,accel=tcg", "-nodefaults", "-no-user-config"])
        .args(["-m", "65540K", "-display", "none", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn qemu");
    (Qemu { child, dir }, sock)
}

/// The socket inodes a process holds open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[test]
fn qmp_client_against_real_qemu() {
    if !have_qemu() {
        return;
    }
    let (qemu, sock) = bare_qemu("qmp");
    let mut c = QmpClient::connect(&sock, Duration::from_secs(10)).unwrap();
    let g = c.greeting().clone();
    assert!(g.version.major >= 7, "{:?}", g.version);
    assert!(g.capabilities.iter().any(|c| c == "oob"));

    let st = c.execute("query-status", Value::Null).unwrap();
    assert_eq!(st["status"], "prelaunch");

    // QMP errors come back with their class and description.
    let e = c.execute("no-such-command", Value::Null).unwrap_err();
    let r = e.reply_error().expect("a QMP error reply");
    assert_eq!(r.class, "CommandNotFound");
    assert!(r.desc.contains("no-such-command"), "{}", r.desc);
    let e = c.execute("query-status", json!({"x": 1})).unwrap_err();
    assert!(e.to_string().contains("Parameter 'x' is unexpected"), "{e}");

    // Events: RESUME and STOP, each waited for by name; nothing else is left queued.
    c.execute("cont", json!({})).unwrap();
    let resume = c.wait_event("RESUME", Duration::from_secs(5)).unwrap();
    assert!(resume.timestamp_us > 1_600_000_000_000_000);
    c.execute("stop", Value::Null).unwrap();
    c.wait_event("STOP", Duration::from_secs(5)).unwrap();
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap()["status"],
        "paused"
    );
    assert!(c.events().unwrap().is_empty());
    let t0 = Instant::now();
    let e = c
        .wait_event("NEVER", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    // fd passing: QEMU holds our socket after getfd and lets go of it after closefd.
    let (ours, _peer) = UnixStream::pair().unwrap();
    let inode = fs::metadata(format!("/proc/self/fd/{}", ours.as_raw_fd()))
        .unwrap()
        .ino();
    let pid = qemu.child.id();
    assert!(!socket_inodes(pid).contains(&inode));
    c.execute_with_fd("getfd", json!({"fdname": "mig"}), ours.as_fd())
        .unwrap();
    assert!(
        socket_inodes(pid).contains(&inode),
        "QEMU holds the passed fd"
    );
    c.execute("closefd", json!({"fdname": "mig"})).unwrap();
    assert!(!socket_inodes(pid).contains(&inode), "closefd released it");
    let e = c.execute("closefd", json!({"fdname": "mig"})).unwrap_err();
    assert_eq!(e.reply_error().unwrap().class, "GenericError");
    assert!(e.to_string().contains("'mig' not found"), "{e}");
    let e = c.execute("getfd", json!({"fdname": "nofd"})).unwrap_err();
    assert!(e.to_string().contains("No file descriptor supplied"), "{e}");

    // quit: the reply, SHUTDOWN, then the socket closes.
    c.execute("quit", Value::Null).unwrap();
    let ev = c.wait_event("SHUTDOWN", Duration::from_secs(5)).unwrap();
    assert_eq!(ev.data["reason"], "host-qmp-quit");
    let e = c.execute("query-status", Value::Null).unwrap_err();
    assert!(
        matches!(e, ClientError::Closed { .. } | ClientError::Io { .. }),
        "{e}"
    );
}

#[test]
fn connect_to_nothing_fails_within_the_timeout() {
    let dir = scratch("noqmp");
    let t0 = Instant::now();
    let e = QmpClient::connect(&dir.join("absent.sock"), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert!(t0.elapsed() < Duration::from_secs(3));

    // A socket that accepts but never greets: the greeting wait times out.
    let path = dir.join("mute.sock");
    let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = QmpClient::connect(&path, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("greeting"), "{e}");
    fs::remove_dir_all(&dir).unwrap();
}

/// VMs under a scratch root; every QEMU is stopped (SIGKILL if need be) when dropped.
struct Vms {
    host: VmHost,
    names: Vec<String>,
}

impl Drop for Vms {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.host.stop(n);
        }
        let _ = fs::remove_dir_all(self.host.root());
    }
}

fn test_guest(dir: &Path, message: &str) -> (PathBuf, PathBuf) {
    let kernel = dir.join("kernel.bin");
    let initrd = dir.join("initrd.img");
    fs::write(&kernel, testkernel::multiboot_image(message)).unwrap();
    fs::write(&initrd, b"not used by the test kernel\n").unwrap();
    (kernel, initrd)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's counter (see `testkernel`), read from guest RAM over QMP.
fn guest_counter(c: &mut QmpClient) -> u64 {
    let out = c
        .execute(
            "human-monitor-command",
            json!({"command-line": format!("xp /1wx {:#x}", testkernel::COUNTER_ADDR)}),
        )
        .unwrap();
    // "0000000000200000: 0x0001b3c5\r\n"
    let s = out.as_str().unwrap();
    let hex = s.split("0x").nth(1).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn lifecycle_and_migration_over_a_passed_socket() {
    if !have_qemu() {
        return;
    }
    let dir = scratch("life");
    let (kernel, initrd) = test_guest(&dir, "tern test guest up\n");
    let vms = Vms {
        host: VmHost::unconfined(dir.join("vm")),
        names: vec!["t1".into(), "t2".into()],
    };
    let host = &vms.host;

    let mut spec = VmSpec::new("t1", "a");
    spec.mem_mib = 64;
    spec.kernel = kernel.clone();
    spec.initrd = initrd.clone();
    let info = host.start(&spec).unwrap();
    assert_eq!(info.role, Role::Primary);
    assert_eq!(info.mem_mib, 64);
    assert_eq!(info.ip.unwrap().to_string(), "198.18.100.10/24");
    assert_eq!(info.mac, vm::MacAddr::for_name("t1"));
    assert!(vm::pid_alive(info.pid, &info.qmp_socket));
    assert!(info.qmp_socket.exists());
    let serial = info.serial_log.clone();
    wait_for("the guest's serial line", Duration::from_secs(20), || {
        fs::read_to_string(&serial).is_ok_and(|s| s.contains("tern test guest up"))
    });

    // The record holds the resolved spec and the argv's RAM is off the 256 KiB grid.
    let rec = host.record("t1", None).unwrap();
    assert_eq!(rec.pid, info.pid);
    assert_eq!(rec.spec.ip, info.ip);
    assert!(rec.argv.iter().any(|a| a == "65540K"));

    // Same name again: refused while it runs. Another VM gets the next address.
    let e = host.start(&spec).unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    let mut s2 = spec.clone();
    s2.name = "t2".into();
    let info2 = host.start(&s2).unwrap();
    assert_eq!(info2.ip.unwrap().to_string(), "198.18.100.11/24");
    let mut s3 = spec.clone();
    s3.name = "t3".into();
    s3.ip = info2.ip;
    let e = host.start(&s3).unwrap_err();
    assert!(e.to_string().contains("taken by VM t2"), "{e}");
    host.stop("t2").unwrap();
    assert!(!host.root().join("t2").exists());
    assert!(!vm::pid_alive(info2.pid, &info2.qmp_socket));

    // Migration a -> b over a socket tern connects and hands to the source with getfd.
    let dest_dir = host.paths("t1", "b").dir;
    let incoming = dest_dir.join("incoming.sock");
    let mut dspec = rec.spec.clone();
    dspec.site = "b".into();
    let d = host
        .start_incoming(&dspec, "b", &format!("unix:{}", incoming.display()))
        .unwrap();
    assert_eq!(d.role, Role::Incoming);
    assert_eq!(d.state, "inmigrate");
    assert_eq!(d.mac, info.mac);
    assert_eq!(d.ip, info.ip);
    let listed = host.list().unwrap();
    let states: Vec<(String, String, Role)> = listed
        .iter()
        .map(|i| (i.site.clone(), i.state.clone(), i.role))
        .collect();
    assert_eq!(
        states,
        [
            ("a".to_string(), "running".to_string(), Role::Primary),
            ("b".to_string(), "inmigrate".to_string(), Role::Incoming)
        ]
    );
    let e = host.start_incoming(&dspec, "b", "defer").unwrap_err();
    assert!(
        e.to_string().contains("already has an instance at site b"),
        "{e}"
    );

    let mut src = host.qmp("t1", Some("a")).unwrap();
    let before = guest_counter(&mut src);
    src.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .unwrap();
    let conn = UnixStream::connect(&incoming).unwrap();
    src.execute_with_fd("getfd", json!({"fdname": "mig"}), conn.as_fd())
        .unwrap();
    drop(conn); // QEMU has its own copy
    src.execute("migrate", json!({"uri": "fd:mig"})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = src.wait_event("MIGRATION", left).unwrap();
        match ev.data["status"].as_str().unwrap() {
            "completed" => break,
            "failed" | "cancelled" => panic!("migration {ev:?}"),
            _ => {}
        }
    }
    // QEMU sends "completed" before it leaves finish-migrate for postmigrate.
    wait_for(
        "the source to stop after migration",
        Duration::from_secs(10),
        || src.execute("query-status", Value::Null).unwrap()["status"] == "postmigrate",
    );
    drop(src);

    // The destination runs the guest on: its counter moves past the source's.
    let mut dst = host.qmp("t1", Some("b")).unwrap();
    wait_for("the destination to run", Duration::from_secs(10), || {
        dst.execute("query-status", Value::Null).unwrap()["status"] == "running"
    });
    let after = guest_counter(&mut dst);
    assert!(after > before, "counter {before} -> {after}");
    wait_for("the counter to move at b", Duration::from_secs(10), || {
        guest_counter(&mut dst) > after
    });
    drop(dst);

    // Promote: the source is stopped and removed; b is THE instance.
    let p = host.promote("t1", "b").unwrap();
    assert_eq!((p.role, p.state.as_str()), (Role::Primary, "running"));
    assert!(!vm::pid_alive(info.pid, &info.qmp_socket));
    assert!(!host.paths("t1", "a").dir.exists());
    let listed = host.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].site, "b");
    assert_eq!(host.record("t1", None).unwrap().site, "b");

    // Stop: QEMU gone, state gone; stopping again says there is no such VM.
    host.stop("t1").unwrap();
    assert!(!vm::pid_alive(p.pid, &p.qmp_socket));
    assert!(!host.root().join("t1").exists());
    assert!(host.list().unwrap().is_empty());
    let e = host.stop("t1").unwrap_err();
    assert!(e.to_string().contains("no VM named t1"), "{e}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dead_instances_are_reported_then_replaced() {
    if !have_qemu() {
        return;
    }
    let dir = scratch("dead");
    let (kernel, initrd) = test_guest(&dir, "x\n");
    let vms = Vms {
        host: VmHost::unconfined(dir.join("vm")),
        names: vec!["d1".into()],
    };
    let mut spec = VmSpec::new("d1", "a");
    spec.mem_mib = 64;
    spec.kernel = kernel;
    spec.initrd = initrd;
    let info = vms.host.start(&spec).unwrap();
    // SAFETY: kill of the QEMU this test just started (checked alive by start).
    unsafe { libc::kill(info.pid as i32, libc::SIGKILL) };
    wait_for("QEMU to die", Duration::from_secs(5), || {
        !vm::pid_alive(info.pid, &info.qmp_socket)
    });
    let listed = vms.host.list().unwrap();
    assert_eq!(listed[0].state, "dead");
    // A new start of the same name clears the dead instance.
    let again = vms.host.start(&spec).unwrap();
    assert_ne!(again.pid, info.pid);
    assert_eq!(vms.host.list().unwrap()[0].state, "running");
    drop(vms);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qemu_start_failure_is_reported_and_leaves_nothing() {
    if !have_qemu() {
        return;
    }
    let dir = scratch("fail");
    let (kernel, initrd) = test_guest(&dir, "x\n");
    let vms = Vms {
        host: VmHost::unconfined(dir.join("vm")),
        names: vec!["f1".into()],
    };
    let mut spec = VmSpec::new("f1", "a");
    spec.mem_mib = 64;
    spec.kernel = kernel;
    spec.initrd = initrd;
    // qcow2 magic over garbage: tern attaches it as qcow2 and QEMU refuses the image.
    let disk = dir.join("bad.qcow2");
    fs::write(&disk, b"QFI\xfbnot really a qcow2 header").unwrap();
    spec.disk = Some(disk);
    let e = vms.host.start(&spec).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("QEMU did not start VM f1 at site a"), "{msg}");
    assert!(msg.contains("qcow2"), "{msg}");
    assert!(!vms.host.root().join("f1").exists());
    assert!(vms.host.list().unwrap().is_empty());
    drop(vms);
    fs::remove_dir_all(&dir).unwrap();
}
