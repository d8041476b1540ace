//! End to end: tern volumes, their NBD server (driven by QEMU's own qemu-io), replication
//! between the lab's sites through the real nodes (a killed secondary, a cut link), and a VM
//! migrated with its disk and back. Volumes are compared by content after every step.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_root, json, lock, ok, tern};
use serde_json::Value;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "{tool} must exist in CI");
        eprintln!("skipping: no {tool}");
    }
    found
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Files a filesystem can be filled with: compressible pseudo-text, and some exact
/// duplicates (the content cache's case).
fn populate(dir: &Path, files: usize, bytes: usize) {
    let words = [
        "replica",
        "block",
        "journal",
        "extent",
        "inode",
        "site",
        "tern",
        "wan",
        "commit",
        "page",
        "dirty",
        "sync",
        "async",
        "primary",
        "secondary",
        "volume",
    ];
    let mut x = 0x9e3779b97f4a7c15u64;
    for f in 0..files {
        let mut s = String::with_capacity(bytes);
        while s.len() < bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(words[(x % 16) as usize]);
            s.push(if x % 11 == 0 { '\n' } else { ' ' });
            if x % 5 == 0 {
                s.push_str(&format!("{} ", x % 100_000));
            }
        }
        std::fs::write(dir.join(format!("f{f:04}.txt")), &s).unwrap();
        if f % 4 == 0 {
            std::fs::write(dir.join(format!("dup{f:04}.txt")), &s).unwrap();
        }
    }
}

fn qemu_io(sock: &Path, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(format!("nbd+unix:///disk?socket={}", sock.display()));
    c.output().expect("run qemu-io")
}

fn qemu_io_ok(sock: &Path, cmds: &[&str]) {
    let out = qemu_io(sock, cmds);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !all.contains("failed"),
        "qemu-io {cmds:?}: {all}"
    );
}

fn serve(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("disk")
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("spawn tern disk serve")
}

/// Starts a secondary for `volume` with its sockets in `bdir` (under the far node's
/// migration directory, so the relay can reach `bdir/repl.sock`); returns once it answers.
fn start_secondary(bdir: &Path, volume: &Path, log: &Path) -> Child {
    start_secondary_with(bdir, volume, log, &[])
}

/// [`start_secondary`] with more `tern disk serve` options.
fn start_secondary_with(bdir: &Path, volume: &Path, log: &Path, more: &[String]) -> Child {
    std::fs::create_dir_all(bdir).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args = vec![
        "--nbd".to_string(),
        s(&bdir.join("nbd.sock")),
        "--control".into(),
        s(&bdir.join("ctl.sock")),
        "--secondary".into(),
        "--listen".into(),
        s(&bdir.join("repl.sock")),
    ];
    args.extend_from_slice(more);
    args.push(s(volume));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = std::fs::remove_file(bdir.join("ctl.sock"));
    let child = serve(&argv, log);
    wait_socket(&bdir.join("ctl.sock"));
    child
}

fn status(control: &Path) -> Value {
    json(&["disk", "ctl", control.to_str().unwrap(), "status"])
}

fn wait_for(what: &str, timeout_s: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(timeout_s);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_socket(p: &Path) {
    wait_for(&format!("{}", p.display()), 10, || p.exists());
}

/// `tern disk verify --json` (which exits 1 when the volumes differ).
fn verify(a: &Path, b: &Path) -> Value {
    let out = tern(&[
        "disk",
        "verify",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("verify prints JSON");
    assert_eq!(out.status.success(), v["equal"] == true, "{v}");
    v
}

#[test]
fn volumes_and_the_nbd_server_with_qemu_io() {
    if !have("qemu-io") || !have("mkfs.ext4") {
        return;
    }
    let d = tmpdir("local");
    let a = d.join("a.img");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Bad input: clear errors, nothing created.
    let out = tern(&["disk", "create", &s(&a), "--size", "1000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4096"));
    let out = tern(&["disk", "create", &s(&a), "--size", "12Q"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unit"));
    assert!(!a.exists());
    ok(&["disk", "create", &s(&a), "--size", "64M", "--mkfs"]);
    assert!(
        !tern(&["disk", "create", &s(&a), "--size", "64M"])
            .status
            .success()
    );
    let info = json(&["disk", "info", &s(&a), "--json"]);
    assert_eq!(info["size"], 64 << 20);
    assert_eq!(info["state"]["consistent"], true);

    // A primary without a target serves reads and writes.
    let (nbd, ctl) = (d.join("nbd.sock"), d.join("ctl.sock"));
    // Servers die with the test, also when it fails half-way.
    let mut guard = Servers(Vec::new());
    guard.0.push(serve(
        &["--nbd", &s(&nbd), "--control", &s(&ctl), &s(&a)],
        &d.join("a.log"),
    ));
    wait_socket(&ctl);
    qemu_io_ok(
        &nbd,
        &[
            "write -P 0xab 8M 1M",
            "read -P 0xab 8M 1M",
            "write -z 9M 64k",
            "discard 10M 64k",
            "flush",
        ],
    );
    let st = status(&ctl);
    assert_eq!(st["role"], "primary");
    assert_eq!(st["phase"], "disconnected");
    // Export and import round trip (qcow2) keep the content.
    let q = d.join("a.qcow2");
    let b = d.join("b.img");
    ok(&["disk", "export", &s(&a), &s(&q)]);
    ok(&["disk", "import", &s(&q), &s(&b)]);
    assert_eq!(verify(&a, &b)["equal"], true);
    // A secondary refuses NBD writes and unsafe requests; promote works without a session.
    let (nbd2, ctl2, listen2) = (d.join("nbd2.sock"), d.join("ctl2.sock"), d.join("r.sock"));
    guard.0.push(serve(
        &[
            "--nbd",
            &s(&nbd2),
            "--control",
            &s(&ctl2),
            "--secondary",
            "--listen",
            &s(&listen2),
            &s(&b),
        ],
        &d.join("b.log"),
    ));
    wait_socket(&ctl2);
    let out = qemu_io(&nbd2, &["write -P 1 0 4k"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Operation not permitted")
            || String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    qemu_io_ok(&nbd2, &["read -P 0xab 8M 1M"]);
    let out = tern(&[
        "disk",
        "ctl",
        &s(&ctl2),
        "replicate",
        "/x",
        "site-a",
        "../etc",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("secondary cannot replicate"));
    let out = tern(&[
        "disk",
        "ctl",
        &s(&ctl),
        "replicate",
        "/x",
        "site-b",
        "../etc",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsafe target path"));
    let out = tern(&["disk", "ctl", &s(&ctl), "fly"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown control command"));
    ok(&["disk", "ctl", &s(&ctl2), "promote"]);
    qemu_io_ok(&nbd2, &["write -P 2 0 4k"]);
    assert_eq!(verify(&a, &b)["equal"], false);
    assert!(!tern(&["disk", "verify", &s(&a), &s(&b)]).status.success());
    ok(&["disk", "ctl", &s(&ctl), "shutdown"]);
    ok(&["disk", "ctl", &s(&ctl2), "shutdown"]);
    for c in &mut guard.0 {
        assert!(c.wait().unwrap().success());
    }
    guard.0.clear();
    std::fs::remove_dir_all(&d).unwrap();
}

/// Disk servers, killed when dropped (also when a test fails half-way).
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Brings a lab up and takes it (and its VMs and disk servers) down when dropped.
struct Lab(Vec<Child>);

impl Lab {
    fn up(profile: &str) -> Lab {
        let _ = tern(&["lab", "down"]);
        ok(&["lab", "up", "--profile", profile]);
        Lab(Vec::new())
    }

    /// With the client site `c` (`--client-site`).
    fn up_with_clients(profile: &str) -> Lab {
        let _ = tern(&["lab", "down"]);
        ok(&["lab", "up", "--profile", profile, "--client-site"]);
        Lab(Vec::new())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever VM a test left behind (it panicked before its own cleanup) must not
        // break the tests after it.
        for vm in ["dsk3", "dsk2", "dsk1"] {
            let _ = tern(&["vm", "stop", vm]);
        }
        let _ = tern(&["protect", "stop", "dsk3"]);
        let _ = tern(&["protect", "stop", "dsk1"]);
        let _ = tern(&["lab", "down"]);
    }
}

#[test]
fn replication_survives_a_killed_secondary_and_a_cut_link_without_resending() {
    if !is_root() || !have("qemu-io") || !have("mkfs.ext4") {
        return;
    }
    let _g = lock();
    let d = tmpdir("repl");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let pop = d.join("pop");
    std::fs::create_dir_all(&pop).unwrap();
    populate(&pop, 320, 128 << 10);
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    ok(&[
        "disk",
        "create",
        &s(&a),
        "--size",
        "512M",
        "--mkfs",
        "--populate",
        &s(&pop),
    ]);
    ok(&["disk", "create", &s(&b), "--size", "512M"]);
    let data_bytes = json(&["disk", "info", &s(&a), "--json"])["data_blocks"]
        .as_u64()
        .unwrap()
        * 65536;

    let mut lab = Lab::up("cloudnet-lab");
    // The secondary's sockets live under the far node's migration directory.
    let bdir = Path::new("/run/tern/vm/dsk-repl/b");
    let sec = start_secondary(bdir, &b, &d.join("b1.log"));
    let (nbd, ctl) = (d.join("nbd.sock"), d.join("ctl.sock"));
    let prim = serve(
        &[
            "--nbd",
            &s(&nbd),
            "--control",
            &s(&ctl),
            "--node",
            "/run/tern/lab/migrate-a.sock",
            "--peer",
            "site-b",
            "--target",
            "dsk-repl/b/repl.sock",
            "--mode",
            "async",
            "--sync-rate",
            "6",
            &s(&a),
        ],
        &d.join("a.log"),
    );
    lab.0.push(prim);
    wait_socket(&ctl);
    // Kill the secondary half-way through the initial sync.
    wait_for("half the data sent", 120, || {
        status(&ctl)["stats"]["data_raw_bytes"].as_u64().unwrap() > data_bytes / 2
    });
    let mut sec = sec;
    sec.kill().unwrap();
    sec.wait().unwrap();
    wait_for("the primary to notice", 30, || {
        status(&ctl)["phase"] == "disconnected"
    });
    let st = status(&ctl);
    assert_eq!(st["degraded"], true, "{st}");
    assert!(st["last_error"].as_str().is_some(), "{st}");
    // The primary keeps serving the VM: async, and sync (degraded, said so).
    qemu_io_ok(&nbd, &["write -P 0x11 300M 256k", "flush"]);
    ok(&["disk", "ctl", &s(&ctl), "mode", "sync"]);
    qemu_io_ok(&nbd, &["write -P 0x12 301M 256k", "flush"]);
    let st = status(&ctl);
    assert_eq!(st["synchronous"], true);
    assert_eq!(st["degraded"], true);
    ok(&["disk", "ctl", &s(&ctl), "mode", "async"]);
    let before = status(&ctl)["stats"].clone();

    // The secondary comes back (its copy is inconsistent); the link is cut for 3 s mid-way.
    let state = std::fs::read_to_string(d.join("b.img.tern.json")).unwrap();
    assert!(state.contains("false"), "{state}");
    let sec = start_secondary(bdir, &b, &d.join("b2.log"));
    lab.0.push(sec);
    wait_for("the second session", 60, || {
        status(&ctl)["phase"] == "syncing" || status(&ctl)["phase"] == "live"
    });
    ok(&["lab", "set", "--loss", "100%"]);
    std::thread::sleep(Duration::from_secs(3));
    ok(&["lab", "set", "--loss", "0%"]);
    wait_for("in sync", 240, || status(&ctl)["in_sync"] == true);
    let st = status(&ctl);
    let resent = |k: &str| st["stats"][k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let second = resent("data_raw_bytes") + resent("copy_bytes");
    // What arrived before the kill is not sent again: the second session carries the other
    // half (plus the two writes), far from a full sync.
    assert!(
        second < data_bytes * 7 / 10,
        "second session sent {second} of {data_bytes} data bytes: {st}"
    );
    assert!(resent("blocks_same") > 0, "{st}");
    // Live writes in async mode, then quiesce and compare.
    qemu_io_ok(
        &nbd,
        &["write -P 0x13 200M 1M", "write -z 201M 1M", "flush"],
    );
    wait_for("acks", 60, || {
        let st = status(&ctl);
        st["backlog_bytes"] == 0 && st["in_sync"] == true
    });
    let v = verify(&a, &b);
    assert_eq!(v["equal"], true, "{v}");
    assert_eq!(status(&bdir.join("ctl.sock"))["consistent"], true);
    // Promotion needs the session over.
    let out = tern(&["disk", "ctl", &s(&bdir.join("ctl.sock")), "promote"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("still active"));
    ok(&["disk", "ctl", &s(&ctl), "stop-replication"]);
    wait_for("promotion", 10, || {
        tern(&["disk", "ctl", &s(&bdir.join("ctl.sock")), "promote"])
            .status
            .success()
    });
    drop(lab);
    let _ = std::fs::remove_dir_all("/run/tern/vm/dsk-repl");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_vm_migrates_with_its_disk_and_back_and_its_filesystem_is_clean() {
    if !is_root() || !have("mkfs.ext4") || !Path::new("/var/lib/tern/guest/initrd.img").exists() {
        assert!(
            std::env::var("CI").is_err() || !is_root(),
            "guest image missing in CI"
        );
        return;
    }
    let _g = lock();
    let d = tmpdir("vm");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let pop = d.join("pop");
    std::fs::create_dir_all(&pop).unwrap();
    populate(&pop, 160, 128 << 10);
    let a = d.join("dsk1.img");
    ok(&[
        "disk",
        "create",
        &s(&a),
        "--size",
        "256M",
        "--mkfs",
        "--populate",
        &s(&pop),
    ]);
    let b = d.join("dsk1-b.img");
    let _lab = Lab::up("cloudnet-lab");
    ok(&[
        "vm",
        "start",
        "dsk1",
        "--site",
        "a",
        "--mem",
        "256",
        "--workload",
        "web-db",
        "--volume",
        &s(&a),
        "--append",
        "tern.diskw=4",
    ]);
    let serial = Path::new("/run/tern/vm/dsk1/a/serial.log");
    wait_for("the guest's disk writer", 240, || {
        std::fs::read_to_string(serial)
            .unwrap_or_default()
            .contains("tern-init: disk writer")
    });
    let there = json(&[
        "migrate",
        "dsk1",
        "--to",
        "b",
        "--with-disk",
        "--dest-volume",
        &s(&b),
        "--json",
        "--quiet",
        "--check-memory",
    ]);
    assert_eq!(there["verified"], true, "{there}");
    assert_eq!(there["memory"]["pages_differing"], 0, "{there}");
    assert_eq!(there["disk"]["identical"], true, "{there}");
    assert_eq!(there["disk"]["dest_existed"], false, "{there}");
    // The guest keeps writing at b: its disk is b's volume, now primary.
    let log_b = Path::new("/run/tern/vm/dsk1/b/serial.log");
    std::thread::sleep(Duration::from_secs(3));
    let serial_b = std::fs::read_to_string(log_b).unwrap_or_default();
    assert!(!serial_b.contains("I/O error"), "{serial_b}");
    assert_eq!(
        json(&["disk", "ctl", "/run/tern/vm/dsk1/b/disk-ctl.sock", "status"])["role"],
        "primary"
    );
    // Back to a, into the old copy: only what changed travels.
    let back = json(&[
        "migrate",
        "dsk1",
        "--to",
        "a",
        "--with-disk",
        "--dest-volume",
        &s(&a),
        "--json",
        "--quiet",
        "--check-memory",
    ]);
    assert_eq!(back["verified"], true, "{back}");
    assert_eq!(back["disk"]["identical"], true, "{back}");
    assert_eq!(back["disk"]["dest_existed"], true, "{back}");
    let first = there["disk"]["stream_bytes"].as_u64().unwrap();
    let again = back["disk"]["stream_bytes"].as_u64().unwrap();
    assert!(
        again < first / 2,
        "re-sync sent {again}, the first sync {first}"
    );
    // The guest remounts its filesystem read-only (SysRq u), then the volume at a must
    // check clean without any repair (e2fsck -n).
    ok(&["vm", "sysrq", "dsk1", "u"]);
    wait_for("the read-only remount", 30, || {
        std::fs::read_to_string("/run/tern/vm/dsk1/a/serial.log")
            .unwrap_or_default()
            .contains("Emergency Remount")
    });
    std::thread::sleep(Duration::from_secs(2));
    ok(&["vm", "stop", "dsk1"]);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&a)
        .output()
        .unwrap();
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// Pings the VM from site a; the replies received.
fn ping_vm(count: u32) -> u32 {
    let out = tern(&[
        "lab",
        "exec",
        "a",
        "--",
        "ping",
        "-c",
        &count.to_string(),
        "-W",
        "1",
        "198.18.100.10",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.split(", ")
                .find(|p| p.ends_with(" received"))
                .and_then(|p| p.trim_end_matches(" received").parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_gated_vm_speaks_only_when_its_writes_are_at_the_backup() {
    if !is_root() || !have("mkfs.ext4") || !Path::new("/var/lib/tern/guest/initrd.img").exists() {
        return;
    }
    let _g = lock();
    let d = tmpdir("gate");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (a, b) = (d.join("g.img"), d.join("g-b.img"));
    ok(&["disk", "create", &s(&a), "--size", "128M", "--mkfs"]);
    ok(&["disk", "create", &s(&b), "--size", "128M"]);
    let mut lab = Lab::up("dr-50");
    ok(&[
        "vm",
        "start",
        "dsk1",
        "--site",
        "a",
        "--mem",
        "256",
        "--workload",
        "none",
        "--volume",
        &s(&a),
        "--gate",
        "--append",
        "tern.diskw=2",
    ]);
    wait_for("the guest's disk writer", 240, || {
        std::fs::read_to_string("/run/tern/vm/dsk1/a/serial.log")
            .unwrap_or_default()
            .contains("tern-init: disk writer")
    });
    let ctl = Path::new("/run/tern/vm/dsk1/a/disk-ctl.sock");
    // No backup: the guest's writes are committed nowhere, so nothing it sends leaves.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ping_vm(3), 0, "replies escaped a closed gate");
    let st = status(ctl);
    assert!(st["writes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["committed_writes"], 0, "{st}");
    assert!(st["gate"]["held"].as_u64().unwrap() > 0, "{st}");
    // A backup at b: once the writes are there, the held frames go and replies flow.
    let bdir = Path::new("/run/tern/vm/dsk-gate/b");
    let mut sec = start_secondary(bdir, &b, &d.join("b.log"));
    ok(&[
        "disk",
        "ctl",
        &s(ctl),
        "replicate",
        "/run/tern/lab/migrate-a.sock",
        "site-b",
        "dsk-gate/b/repl.sock",
        "async",
    ]);
    wait_for("the backup in sync", 60, || status(ctl)["in_sync"] == true);
    assert!(ping_vm(5) >= 3, "the gate did not open");
    let st = status(ctl);
    assert!(st["gate"]["released"].as_u64().unwrap() > 0, "{st}");
    assert!(st["committed_writes"].as_u64().unwrap() > 0, "{st}");
    // The backup dies: the next write closes the gate again.
    sec.kill().unwrap();
    sec.wait().unwrap();
    wait_for("the primary to notice", 30, || {
        status(ctl)["phase"] == "disconnected"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ping_vm(3), 0, "replies left while the backup was gone");
    let st = status(ctl);
    assert!(
        st["writes"].as_u64().unwrap() > st["committed_writes"].as_u64().unwrap(),
        "{st}"
    );
    lab.0.clear();
    drop(lab);
    let _ = std::fs::remove_dir_all("/run/tern/vm/dsk-gate");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The key-value client: numbered PUTs, one at a time; prints each id the service answered
/// OK (it runs in site a's namespace and is killed at the disaster).
const KV_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7070), timeout=30)
f = s.makefile("rw")
i = 0
while True:
    f.write("PUT %d\n" % i)
    f.flush()
    l = f.readline()
    if not l:
        break
    if l.startswith("OK"):
        print(l.split()[1], flush=True)
    i += 1
"#;

/// Site a dies for `names`: their QEMU and disk server SIGKILLed.
fn kill_at_a(names: &[&str]) {
    for name in names {
        let dir = Path::new("/run/tern/vm").join(name).join("a");
        for pidfile in ["qemu.pid", "disk.pid"] {
            if let Ok(pid) = std::fs::read_to_string(dir.join(pidfile)) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

/// Stops a client and returns what it printed (the ids it saw acknowledged).
fn client_output(mut client: std::process::Child) -> String {
    use std::io::Read as _;
    let _ = client.kill();
    let mut out = String::new();
    let _ = client
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out);
    let _ = client.wait();
    out
}

/// What protects the application in a [`real_disaster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The key-value VM alone, gated or not (async replication).
    OneTier { gated: bool },
    /// The key-value VM alone, strict synchronous replication, no gate.
    Sync,
    /// A front end (`tern.fe=`, [`CALLS`] commits per request) in front of the key-value
    /// VM. With clocks both are gated as one group; without, only the front end (the VM
    /// the clients talk to) is gated, alone: its own disk has no writes, so it holds
    /// nothing back — the mistake the clocks exist to prevent.
    TwoTier { clocks: bool },
}

/// Database commits per front-end request in the two-tier disasters.
const CALLS: u32 = 3;

fn start_kv_vm(name: &str, ip: &str, volume: &str, append: &str, gate: &[&str]) {
    let cidr = format!("{ip}/24");
    let mut start = vec![
        "vm",
        "start",
        name,
        "--site",
        "a",
        "--mem",
        "256",
        "--workload",
        "none",
        "--ip",
        &cidr,
        "--volume",
        volume,
        "--append",
        append,
    ];
    start.extend(gate);
    ok(&start);
}

/// One real disaster: the key-value service on a raw volume replicated to b (behind a
/// front end, gated or not, per `setup`), a client at site a; after `run_ms` the primary
/// site dies (link cut, then QEMU and the disk servers killed). Returns (acknowledged
/// client requests, those with a record missing at the backup).
fn real_disaster(d: &Path, setup: Setup, run_ms: u64) -> (usize, usize) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (a, b, fe) = (d.join("kv.img"), d.join("kv-b.img"), d.join("fe.img"));
    for v in [&a, &b, &fe] {
        let _ = std::fs::remove_file(v);
        let _ = std::fs::remove_file(format!("{}.tern.json", v.display()));
        ok(&["disk", "create", &s(v), "--size", "16M"]);
    }
    let (db_gate, fe_gate): (&[&str], &[&str]) = match setup {
        Setup::OneTier { gated: true } => (&["--gate"], &[]),
        Setup::OneTier { gated: false } | Setup::Sync => (&[], &[]),
        Setup::TwoTier { clocks: true } => (
            &["--gate", "--gate-peer", "dsk2"],
            &["--gate", "--gate-peer", "dsk1"],
        ),
        Setup::TwoTier { clocks: false } => (&[], &["--gate"]),
    };
    start_kv_vm("dsk1", "198.18.100.10", &s(&a), "tern.kv=vda", db_gate);
    let two = matches!(setup, Setup::TwoTier { .. });
    if two {
        let append = format!("tern.fe=198.18.100.10,{CALLS}");
        start_kv_vm("dsk2", "198.18.100.11", &s(&fe), &append, fe_gate);
    }
    let bdir = Path::new("/run/tern/vm/dsk-kv/b");
    let _sec = Servers(vec![start_secondary(bdir, &b, &d.join("kv-b.log"))]);
    let ctl = Path::new("/run/tern/vm/dsk1/a/disk-ctl.sock");
    ok(&[
        "disk",
        "ctl",
        &s(ctl),
        "replicate",
        "/run/tern/lab/migrate-a.sock",
        "site-b",
        "dsk-kv/b/repl.sock",
        if setup == Setup::Sync {
            "sync"
        } else {
            "async"
        },
    ]);
    wait_for("the backup in sync", 60, || status(ctl)["in_sync"] == true);
    let (vm, marker) = if two {
        ("dsk2", "tern-guest: frontend serving")
    } else {
        ("dsk1", "tern-guest: kv serving")
    };
    for (vm, marker) in [("dsk1", "tern-guest: kv serving"), (vm, marker)] {
        wait_for(marker, 240, || {
            std::fs::read_to_string(format!("/run/tern/vm/{vm}/a/serial.log"))
                .unwrap_or_default()
                .contains(marker)
        });
    }
    let host = if two {
        "198.18.100.11"
    } else {
        "198.18.100.10"
    };
    let client = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["lab", "exec", "a", "--", "python3", "-c", KV_CLIENT, host])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(run_ms));
    // The disaster: the site's link goes, and 300 ms later QEMU and its disk server die
    // (the client, at site a, keeps talking to the VM in between).
    ok(&["lab", "set", "--loss", "100%"]);
    std::thread::sleep(Duration::from_millis(300));
    kill_at_a(&["dsk1", "dsk2"]);
    let out = client_output(client);
    for name in ["dsk2", "dsk1"] {
        let _ = tern(&["vm", "stop", name]);
    }
    // What survives is the backup: every acknowledged record must be there. The link stays
    // cut until it is read: site a's node (which a real disaster takes too) must not
    // deliver what it still buffers.
    std::thread::sleep(Duration::from_millis(500));
    // The failover's promotion: the backup's write log goes into the volume.
    let promoted = json(&[
        "disk",
        "ctl",
        &s(&bdir.join("ctl.sock")),
        "promote",
        "--force",
    ]);
    assert_eq!(promoted["log_dropped"], 0, "{promoted}");
    let backup = std::fs::read(&b).unwrap();
    ok(&["lab", "set", "--loss", "0%"]);
    let acked: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let rec = tern_guest::kv::RECORD_BYTES;
    let present = |id: u64| {
        let at = id as usize * rec;
        backup.get(at..at + rec) == Some(&tern_guest::kv::record(id)[..])
    };
    let lost = acked
        .iter()
        .filter(|&&n| {
            if two {
                !tern_guest::kv::tier_ids(n, CALLS).all(present)
            } else {
                !present(n)
            }
        })
        .count();
    let _ = std::fs::remove_dir_all("/run/tern/vm/dsk-kv");
    (acked.len(), lost)
}

/// `trials` disasters under `setup`, the n-th after `base_ms + 700 * n` of traffic: none may
/// lose an acknowledged request. Returns how many were acknowledged in all.
fn disasters_lose_nothing(d: &Path, setup: Setup, label: &str, trials: u64, base_ms: u64) -> usize {
    let mut seen = 0;
    for t in 0..trials {
        let (acked, lost) = real_disaster(d, setup, base_ms + 700 * t);
        eprintln!("{label} trial {t}: {acked} acknowledged, {lost} lost");
        assert_eq!(
            lost, 0,
            "{label} trial {t}: {lost} of {acked} acknowledged requests lost"
        );
        seen += acked;
    }
    seen
}

/// Up to three disasters under `setup` (after `base_ms + 500 * n` of traffic) until one
/// loses an acknowledged request; `why` if none does (the test could not see a loss).
fn some_disaster_loses(d: &Path, setup: Setup, label: &str, base_ms: u64, why: &str) {
    let mut lost_total = 0;
    for t in 0..3 {
        let (acked, lost) = real_disaster(d, setup, base_ms + 500 * t);
        eprintln!("{label} trial {t}: {acked} acknowledged, {lost} lost");
        lost_total += lost;
        if lost > 0 {
            break;
        }
    }
    assert!(lost_total > 0, "{why}");
}

#[test]
fn real_disasters_lose_no_acknowledged_write_behind_the_gate_but_do_without_it() {
    if !is_root() || !have("python3") || !Path::new("/var/lib/tern/guest/initrd.img").exists() {
        return;
    }
    let _g = lock();
    let d = tmpdir("kv");
    let _lab = Lab::up("dr-50");
    let trials: u64 = std::env::var("TERN_DR_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seen = disasters_lose_nothing(&d, Setup::OneTier { gated: true }, "gated", trials, 1500);
    assert!(seen > 0, "the client never got a reply");
    // Strict synchronous replication loses nothing either (at its speed).
    disasters_lose_nothing(&d, Setup::Sync, "sync", trials, 2000);
    // The same disaster without the gate loses acknowledged writes (the test can see it).
    some_disaster_loses(
        &d,
        Setup::OneTier { gated: false },
        "async",
        1500,
        "async replication lost nothing: the test cannot see a loss",
    );
    // Two tiers, gated as one group: the front end's replies wait for the database's
    // commits at the backup. Gating the front end alone does not (the test sees the loss).
    let seen = disasters_lose_nothing(
        &d,
        Setup::TwoTier { clocks: true },
        "two-tier gated",
        trials.div_ceil(2),
        2000,
    );
    assert!(seen > 0, "the front end never answered");
    some_disaster_loses(
        &d,
        Setup::TwoTier { clocks: false },
        "two-tier front-end-only",
        2000,
        "gating only the front end lost nothing: the test cannot see a loss",
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// `tern protect` (pipelined) and `tern failover` after a real disaster, with the client
/// at the client site `c`: the VM boots at the backup site from the backup volume, which
/// holds every write the client saw acknowledged, and the client reaches it there.
#[test]
fn protect_then_failover_boots_the_vm_at_the_backup_with_every_acknowledged_write() {
    if !is_root() || !have("python3") || !Path::new("/var/lib/tern/guest/initrd.img").exists() {
        return;
    }
    let _g = lock();
    let d = tmpdir("protect");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (a, b) = (d.join("p.img"), d.join("p-b.img"));
    ok(&["disk", "create", &s(&a), "--size", "16M"]);
    let mut lab = Lab::up_with_clients("dr-50");
    let _ = tern(&["protect", "stop", "dsk1"]);
    start_kv_vm("dsk1", "198.18.100.10", &s(&a), "tern.kv=vda", &["--gate"]);
    // Refusals are clear: no backup site, same site.
    let out = tern(&["protect", "dsk1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backup"));
    let out = tern(&["protect", "dsk1", "--backup", "a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must differ"));
    ok(&[
        "protect",
        "dsk1",
        "--backup",
        "b",
        "--mode",
        "pipelined",
        "--backup-volume",
        &s(&b),
    ]);
    let st: Value = serde_json::from_str(&ok(&["protect", "status", "dsk1", "--json"])).unwrap();
    assert_eq!(st[0]["mode"], "pipelined", "{st}");
    assert_eq!(st[0]["in_sync"], true, "{st}");
    wait_for("the key-value service", 240, || {
        std::fs::read_to_string("/run/tern/vm/dsk1/a/serial.log")
            .unwrap_or_default()
            .contains("tern-guest: kv serving")
    });
    let client = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "lab",
            "exec",
            "c",
            "--",
            "python3",
            "-c",
            KV_CLIENT,
            "198.18.100.10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    // Site a is lost: its links to b and to the clients go, then its machines.
    ok(&["lab", "set", "--loss", "100%"]);
    ok(&["lab", "set", "--link", "c-a", "--loss", "100%"]);
    std::thread::sleep(Duration::from_millis(300));
    kill_at_a(&["dsk1"]);
    let out = client_output(client);
    // Site a stays cut off: failover works from site b alone, and moves the clients.
    let r: Value = serde_json::from_str(&ok(&["failover", "dsk1", "--json"])).unwrap();
    eprintln!("failover: {r}");
    assert_eq!(r["to"], "b", "{r}");
    assert_eq!(r["primary_reachable"], false, "{r}");
    assert!(r["rto_s"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["clients_rerouted"], true, "{r}");
    let backup = std::fs::read(&b).unwrap();
    let acked: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(!acked.is_empty(), "the client never got a reply");
    let rec = tern_guest::kv::RECORD_BYTES;
    for id in &acked {
        let at = *id as usize * rec;
        assert_eq!(
            backup.get(at..at + rec),
            Some(&tern_guest::kv::record(*id)[..]),
            "acknowledged record {id} is not on the backup"
        );
    }
    // The VM serves again at site b, from the backup volume, to the client site.
    wait_for("the key-value service at b", 240, || {
        std::fs::read_to_string("/run/tern/vm/dsk1/b/serial.log")
            .unwrap_or_default()
            .contains("tern-guest: kv serving")
    });
    let put = "import socket\ns=socket.create_connection(('198.18.100.10',7070),timeout=30)\n\
               s.sendall(b'PUT 31000\\n')\nprint(s.makefile().readline().strip())";
    let out = ok(&["lab", "exec", "c", "--", "python3", "-c", put]);
    assert_eq!(out.trim(), "OK 31000");
    let out = tern(&["failover", "dsk1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already failed over"));
    ok(&["lab", "set", "--loss", "0%"]);
    ok(&["lab", "set", "--link", "c-a", "--loss", "0%"]);
    ok(&["vm", "stop", "dsk1"]);
    ok(&["protect", "stop", "dsk1"]);
    lab.0.clear();
    drop(lab);
    std::fs::remove_dir_all(&d).unwrap();
}

/// One hand-driven replication session to a secondary (the test speaks the primary's side
/// of the protocol, so it can say exactly what each write depends on).
struct Feed {
    sock: std::os::unix::net::UnixStream,
    reader: tern_disk::wire::Reader,
    seq: u64,
}

impl Feed {
    /// HELLO, the secondary's hashes, then SYNCED (an empty volume is in sync at once)
    /// after a CLOCK saying it holds the guest's writes up to `write`.
    fn open(repl: &Path, name: &str, write: u64, deps: Vec<([u8; 6], u64)>) -> Feed {
        Feed::open_at(repl, name, write, deps, 0)
    }

    /// [`Feed::open`] for a primary of fencing epoch `epoch`, at write 0.
    fn open_epoch(repl: &Path, name: &str, epoch: u64) -> Feed {
        Feed::open_at(repl, name, 0, vec![], epoch)
    }

    fn open_at(repl: &Path, name: &str, write: u64, deps: Vec<([u8; 6], u64)>, epoch: u64) -> Feed {
        use tern_disk::wire::{self, Msg};
        let sock = std::os::unix::net::UnixStream::connect(repl).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut f = Feed {
            sock,
            reader: wire::Reader::default(),
            seq: 0,
        };
        f.send(&[Msg::Hello {
            version: wire::VERSION,
            size: 16 << 20,
            block_shift: tern_disk::BLOCK_SHIFT,
            name: name.into(),
            epoch,
        }]);
        f.expect(|m| matches!(m, Msg::HashesEnd { .. }));
        f.seq += 1;
        f.send(&[Msg::Clock { write, deps }, Msg::Synced { seq: f.seq }]);
        let seq = f.seq;
        f.expect(|m| matches!(m, Msg::Ack { seq: s } if *s >= seq));
        f
    }

    fn send(&mut self, msgs: &[tern_disk::wire::Msg]) {
        use std::io::Write;
        let mut out = Vec::new();
        for m in msgs {
            m.encode(&mut out);
        }
        self.sock.write_all(&out).unwrap();
    }

    fn expect(&mut self, want: impl Fn(&tern_disk::wire::Msg) -> bool) {
        use std::io::Read;
        loop {
            while let Some(m) = self.reader.next_msg().unwrap() {
                assert!(!matches!(m, tern_disk::wire::Msg::Error(_)), "{m:?}");
                if want(&m) {
                    return;
                }
            }
            let mut buf = [0u8; 65536];
            let n = self.sock.read(&mut buf).unwrap();
            assert!(n > 0, "the secondary closed the session");
            self.reader.push(&buf[..n]);
        }
    }

    /// Guest write `write` (512 bytes of `fill` at `offset`, no dependencies): whether the
    /// secondary acknowledged it (false: an ERROR, the session closed, or no answer in 10 s).
    fn try_write(&mut self, write: u64, offset: u64, fill: u8) -> bool {
        use std::io::Read;
        use tern_disk::wire::{Compression, Msg};
        self.seq += 1;
        let seq = self.seq;
        let mut out = Vec::new();
        for m in [
            Msg::Clock {
                write,
                deps: vec![],
            },
            Msg::Data {
                seq,
                offset,
                raw_len: 512,
                compression: Compression::None,
                bytes: vec![fill; 512],
            },
            Msg::Flush { seq: seq + 1 },
        ] {
            m.encode(&mut out);
        }
        self.seq += 1;
        if std::io::Write::write_all(&mut self.sock, &out).is_err() {
            return false;
        }
        loop {
            while let Ok(Some(m)) = self.reader.next_msg() {
                match m {
                    Msg::Ack { seq: s } if s > seq => return true,
                    Msg::Error(_) => return false,
                    _ => {}
                }
            }
            let mut buf = [0u8; 65536];
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.reader.push(&buf[..n]),
            }
        }
    }

    /// Guest write number `write` (512 bytes of `fill` at `offset`), depending on `deps`;
    /// returns once the secondary acknowledged it (durable in its log).
    fn write(&mut self, write: u64, deps: Vec<([u8; 6], u64)>, offset: u64, fill: u8) {
        use tern_disk::wire::{Compression, Msg};
        self.seq += 1;
        let seq = self.seq;
        self.send(&[
            Msg::Clock { write, deps },
            Msg::Data {
                seq,
                offset,
                raw_len: 512,
                compression: Compression::None,
                bytes: vec![fill; 512],
            },
            Msg::Flush { seq: seq + 1 },
        ]);
        self.seq += 1;
        self.expect(|m| matches!(m, Msg::Ack { seq: s } if *s > seq));
    }
}

/// Two tiers' backups (X and Y) at one site, each told where the other's counter page is.
/// Y's writes that depend on X's are logged and acknowledged at once but reach Y's volume
/// only once X's backup applied what they depend on: across a restart of Y's backup, and
/// at failover, where what waits on a write X's backup never got is dropped, so the two
/// volumes are always a consistent cut.
#[test]
fn a_backup_applies_writes_in_causal_order_across_disks_and_keeps_its_log_across_a_restart() {
    let d = tmpdir("causal");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    const X: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const Y: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    let mac = |m: &[u8; 6]| tern_disk::daemon::mac_text(m);
    let start = |me: &str, peer: &str, peer_mac: &[u8; 6], log: &str| {
        let dir = d.join(me);
        let more = [
            "--counters".to_string(),
            s(&dir.join("counters")),
            "--backup-peer".into(),
            format!("{}={}", mac(peer_mac), s(&d.join(peer).join("counters"))),
        ];
        start_secondary_with(&dir, &d.join(format!("{me}.img")), &d.join(log), &more)
    };
    for v in ["x", "y"] {
        ok(&[
            "disk",
            "create",
            &s(&d.join(format!("{v}.img"))),
            "--size",
            "16M",
        ]);
    }
    let mut servers = Servers(vec![
        start("x", "y", &Y, "x.log"),
        start("y", "x", &X, "y.log"),
    ]);
    let (xctl, yctl) = (d.join("x/ctl.sock"), d.join("y/ctl.sock"));
    let log_of = |ctl: &Path| status(ctl)["backup_log"].clone();
    let at = |v: &str, offset: usize| std::fs::read(d.join(format!("{v}.img"))).unwrap()[offset];

    let mut x = Feed::open(&d.join("x/repl.sock"), "x", 0, vec![(Y, 0)]);
    let mut y = Feed::open(&d.join("y/repl.sock"), "y", 0, vec![(X, 0)]);
    x.write(1, vec![(Y, 0)], 0, 0x11);
    y.write(1, vec![(X, 1)], 0, 0x21);
    assert_eq!((at("x", 0), at("y", 0)), (0x11, 0x21));
    // Y's writes 2 and 3 follow X's write 2, which has not reached X's backup yet.
    y.write(2, vec![(X, 2)], 4096, 0x22);
    y.write(3, vec![(X, 2)], 8192, 0x23);
    let l = log_of(&yctl);
    assert_eq!(l["records"], 2, "{l}");
    assert_eq!(l["applied_write"], 1, "{l}");
    assert_eq!(l["waiting_for"], format!("{}=2", mac(&X)), "{l}");
    assert_eq!((at("y", 4096), at("y", 8192)), (0, 0));

    // Y's backup dies and comes back: what it acknowledged is still in its log, still held.
    drop(y);
    let mut yserver = servers.0.pop().unwrap();
    yserver.kill().unwrap();
    yserver.wait().unwrap();
    servers.0.push(start("y", "x", &X, "y2.log"));
    let l = log_of(&yctl);
    assert_eq!(
        (l["records"].clone(), l["applied_write"].clone()),
        (2.into(), 1.into()),
        "{l}"
    );
    assert_eq!(at("y", 4096), 0);

    // X's write 2 arrives: Y's two go in, in order.
    x.write(2, vec![(Y, 1)], 4096, 0x12);
    wait_for("Y's backup to apply", 10, || log_of(&yctl)["records"] == 0);
    assert_eq!((at("y", 4096), at("y", 8192)), (0x22, 0x23));
    assert_eq!(log_of(&yctl)["applied_write"], 3);

    // Y's write 4 depends on X's write 3, which X's backup never gets: the disaster.
    let mut y = Feed::open(&d.join("y/repl.sock"), "y", 3, vec![(X, 2)]);
    y.write(4, vec![(X, 3)], 12288, 0x24);
    assert_eq!(log_of(&yctl)["records"], 1);
    drop((x, y));
    let px = json(&["disk", "ctl", &s(&xctl), "promote", "--force"]);
    assert_eq!(px["log_dropped"], 0, "{px}");
    let py = json(&["disk", "ctl", &s(&yctl), "promote", "--force"]);
    assert_eq!(py["log_dropped"], 1, "{py}");
    assert_eq!(status(&yctl)["role"], "primary");
    assert_eq!(log_of(&yctl)["records"], 0);
    // A consistent cut: X holds writes 1-2, Y everything that depends on no more than that.
    assert_eq!((at("x", 0), at("x", 4096)), (0x11, 0x12));
    assert_eq!(
        (at("y", 0), at("y", 4096), at("y", 8192), at("y", 12288)),
        (0x21, 0x22, 0x23, 0)
    );
    drop(servers);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Reads from a replication stream until an ERROR; returns its message ("" if the stream
/// closed without one).
fn read_error(sock: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let mut reader = tern_disk::wire::Reader::default();
    let mut buf = [0u8; 65536];
    loop {
        while let Some(m) = reader.next_msg().unwrap() {
            if let tern_disk::wire::Msg::Error(e) = m {
                return e;
            }
        }
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return String::new(),
            Ok(n) => reader.push(&buf[..n]),
        }
    }
}

/// A HELLO of epoch `epoch` for the 16 MiB volume `name` on a fresh connection.
fn hello(repl: &Path, name: &str, epoch: u64) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    use tern_disk::wire::{self, Msg};
    let mut sock = std::os::unix::net::UnixStream::connect(repl).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let m = Msg::Hello {
        version: wire::VERSION,
        size: 16 << 20,
        block_shift: tern_disk::BLOCK_SHIFT,
        name: name.into(),
        epoch,
    };
    sock.write_all(&m.to_bytes()).unwrap();
    sock
}

/// Fencing with real disk servers: the old primary's session is still open (a partition
/// that hangs the link) when the backup is promoted with force. The promotion cuts it,
/// persists epoch 1, and from then on the old primary (epoch 0) is refused: by the
/// promoted server, and by the same volume served as a secondary again after a restart
/// (the epoch is durable); a primary of the new epoch is served.
#[test]
fn a_promoted_backup_fences_the_old_primary_across_a_restart() {
    let _l = lock();
    let d = tmpdir("fence");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let vol = d.join("b.img");
    ok(&["disk", "create", &s(&vol), "--size", "16M"]);
    let bdir = d.join("b");
    let mut servers = Servers(vec![start_secondary(&bdir, &vol, &d.join("b.log"))]);
    let (ctl, repl) = (bdir.join("ctl.sock"), bdir.join("repl.sock"));
    let mut old = Feed::open(&repl, "b", 0, vec![]);
    old.write(1, vec![], 0, 0x11);
    assert_eq!(status(&ctl)["epoch"], 0);
    let promoted =
        tern_disk::server::request(&ctl, &serde_json::json!({"cmd": "promote", "force": true}))
            .unwrap();
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    let st = status(&ctl);
    assert_eq!(
        (st["role"].clone(), st["epoch"].clone()),
        ("primary".into(), 1.into())
    );
    // The hung session was cut: the old primary's next write gets no ACK.
    {
        use std::io::{Read, Write};
        let _ = old.sock.write_all(&[0u8; 16]);
        let mut b = [0u8; 64];
        let n = old.sock.read(&mut b).unwrap_or(0);
        assert!(
            n == 0 || !b[..n].starts_with(&[0x82]),
            "an ACK after the promotion"
        );
    }
    // Reconnecting, it is refused by the promoted server.
    let e = read_error(&mut hello(&repl, "b", 0));
    assert!(e.contains("primary now"), "{e:?}");
    // The same volume served as a secondary again (a restart, a reversed protection): the
    // old primary's epoch is still refused, the new one is served.
    let _ = tern_disk::server::request(&ctl, &serde_json::json!({"cmd": "shutdown"}));
    for mut c in servers.0.drain(..) {
        let _ = c.wait();
    }
    servers
        .0
        .push(start_secondary(&bdir, &vol, &d.join("b2.log")));
    assert_eq!(status(&ctl)["epoch"], 1);
    let e = read_error(&mut hello(&repl, "b", 0));
    assert!(e.contains("fenced"), "{e:?}");
    let mut new = Feed::open_epoch(&repl, "b", 1);
    new.write(1, vec![], 4096, 0x22);
    let img = std::fs::read(&vol).unwrap();
    assert_eq!((img[0], img[4096]), (0x11, 0x22));
}

/// Failover with a partitioned but still-running primary, in the real lab: the a-b link
/// is cut (the primary keeps running and its client at site c keeps sending PUTs), the
/// backup at b is promoted by force without stopping the primary, then the link heals.
/// The old primary's replication is refused at b (its epoch is older, and b is a primary
/// now), so none of the writes it issued after the cut is committed and its gate releases no
/// reply for one; only an ACK b sent before its promotion (retransmitted after the heal)
/// may still release the reply of a write that b's promoted copy holds.
#[test]
fn a_partitioned_primary_is_fenced_and_its_gate_never_releases_a_reply() {
    if !is_root() || !have("python3") || !Path::new("/var/lib/tern/guest/initrd.img").exists() {
        return;
    }
    let _g = lock();
    let d = tmpdir("fence-lab");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (a, b) = (d.join("f.img"), d.join("f-b.img"));
    ok(&["disk", "create", &s(&a), "--size", "16M"]);
    let mut lab = Lab::up_with_clients("dr-50");
    let _ = tern(&["protect", "stop", "dsk3"]);
    start_kv_vm("dsk3", "198.18.100.10", &s(&a), "tern.kv=vda", &["--gate"]);
    ok(&[
        "protect",
        "dsk3",
        "--backup",
        "b",
        "--mode",
        "pipelined",
        "--backup-volume",
        &s(&b),
    ]);
    wait_for("the key-value service", 240, || {
        std::fs::read_to_string("/run/tern/vm/dsk3/a/serial.log")
            .unwrap_or_default()
            .contains("tern-guest: kv serving")
    });
    let mut client = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "lab",
            "exec",
            "c",
            "--",
            "python3",
            "-c",
            KV_CLIENT,
            "198.18.100.10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Every reply the client gets, with when it got it.
    let replies = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let reader = {
        use std::io::BufRead;
        let out = client.stdout.take().unwrap();
        let replies = replies.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(id) = l.trim().parse() {
                    replies.lock().unwrap().push((Instant::now(), id));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(3000));
    assert!(
        !replies.lock().unwrap().is_empty(),
        "no reply before the partition"
    );
    // The partition: a and b cannot reach each other; a and its client still can.
    ok(&["lab", "set", "--loss", "100%"]);
    let cut = Instant::now();
    let pctl = tern_disk::daemon::DiskPaths::in_dir(Path::new("/run/tern/vm/dsk3/a")).control;
    // Writes the guest issued by the cut: only these can ever be committed. (An ACK of one
    // that b logged before its promotion may still arrive after the heal: the transport
    // retransmits it; that write is in b's copy.)
    let writes_at_cut = status(&pctl)["writes"].as_u64().unwrap();
    let bctl =
        tern_disk::daemon::DiskPaths::in_dir(&tern_migrate::protect::backup_dir("dsk3", "b"))
            .control;
    std::thread::sleep(Duration::from_millis(1000));
    // Failover without stopping the primary: the backup is promoted by force.
    let promoted = json(&["disk", "ctl", &s(&bctl), "promote", "--force"]);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    let committed = status(&pctl)["committed_writes"].as_u64().unwrap();
    // The partition heals; the old primary reconnects to b and is refused.
    ok(&["lab", "set", "--loss", "0%"]);
    std::thread::sleep(Duration::from_millis(8000));
    let st = status(&pctl);
    eprintln!("old primary: {st}");
    let committed_now = st["committed_writes"].as_u64().unwrap();
    assert!(
        committed <= committed_now && committed_now <= writes_at_cut,
        "committed {committed} at the promotion, {committed_now} after the heal, \
         {writes_at_cut} writes issued by the cut: {st}"
    );
    // The client is sequential (one PUT, then its reply), so the guest may write once more
    // after the cut or not at all, depending on where the cut fell; either way the reply to
    // the client's last PUT is still held: the primary runs, speaks to nobody.
    assert!(st["writes"].as_u64().unwrap() >= writes_at_cut, "{st}");
    assert!(st["gate"]["held_now"].as_u64().unwrap_or(0) > 0, "{st}");
    eprintln!("old primary's last error: {}", st["last_error"]);
    assert_eq!(status(&bctl)["role"], "primary");
    // No reply left the old primary after the partition (in flight at the cut: 500 ms)
    // unless its write was at b before b's promotion: the only commits after the cut are
    // ACKs b sent for writes issued before it (retransmitted after the heal, bounded by
    // `writes_at_cut` above), so late replies are at most as many as those late commits.
    let late: Vec<u64> = replies
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t > cut + Duration::from_millis(500))
        .map(|(_, id)| *id)
        .collect();
    assert!(
        late.len() as u64 <= committed_now - committed,
        "replies from the fenced primary: {late:?}, with {} commits after the promotion",
        committed_now - committed
    );
    let _ = client.kill();
    let _ = client.wait();
    let _ = reader.join();
    ok(&["vm", "stop", "dsk3"]);
    ok(&["protect", "stop", "dsk3"]);
    lab.0.clear();
    drop(lab);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The backup's volume fills up (ENOSPC on a small tmpfs) while the primary keeps writing:
/// every write the backup acknowledged is still there after space is freed and the backup
/// restarts — in the volume or in its log, replayed (issue 25, defect 5: the applier used to
/// drop the record it failed to apply, and a later checkpoint emptied the log past it).
#[test]
fn a_full_backup_volume_loses_no_acknowledged_write() {
    if !is_root() {
        return;
    }
    let _l = lock();
    let d = tmpdir("enospc");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tern-enospc"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let vol = small.join("b.img");
    ok(&["disk", "create", &s(&vol), "--size", "16M"]);
    let bdir = d.join("b");
    let mut servers = Servers(vec![start_secondary(&bdir, &vol, &d.join("b.log"))]);
    let (ctl, repl) = (bdir.join("ctl.sock"), bdir.join("repl.sock"));
    let mut feed = Feed::open(&repl, "b", 0, vec![]);
    // Fill the tmpfs, then free 16 pages: room for the log's records, not for long.
    let filler = small.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xeeu8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(16 * 4096)).unwrap();
    }
    // Writes to fresh 4 KiB blocks (each needs a page of the volume) until the backup stops
    // acknowledging; those it acknowledged must survive.
    let mut acked = Vec::new();
    for i in 1..=64u64 {
        if !feed.try_write(i, i * 4096, i as u8) {
            break;
        }
        acked.push(i);
    }
    assert!(!acked.is_empty(), "no write was acknowledged at all");
    assert!(acked.len() < 64, "the volume never filled up");
    wait_for("the backup to report the failed apply", 10, || {
        status(&ctl)["backup_log"]["failed"].is_string()
    });
    drop(feed);
    // Space again; the backup restarts and replays its log.
    std::fs::remove_file(&filler).unwrap();
    for mut c in servers.0.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    servers
        .0
        .push(start_secondary(&bdir, &vol, &d.join("b2.log")));
    wait_for("the replay", 20, || {
        status(&ctl)["backup_log"]["records"] == 0
    });
    let img = std::fs::read(&vol).unwrap();
    for i in acked {
        assert_eq!(
            img[(i * 4096) as usize],
            i as u8,
            "acknowledged write {i} is lost"
        );
    }
}

/// A backup's volume sits on a disk that starts failing (EIO from every write and sync of
/// the volume file: a FUSE file system failing on demand) while its log's disk still works.
/// Acknowledged writes wait in its log for another tier's backup (causal order); when they
/// become applicable the first apply fails: applying stops and says why, the log keeps
/// every record and no checkpoint empties it, and the primary's next write is refused,
/// not acknowledged. A bit then flipped in the middle of that log (an acknowledged record
/// unreadable) keeps the backup from starting, naming the offset, instead of cutting the
/// log there. With the bit and the disk repaired, the restarted backup replays its log and
/// every acknowledged write is in the volume.
#[test]
fn an_io_error_at_the_backup_and_a_flipped_bit_in_its_log_lose_no_acknowledged_write() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root with /dev/fuse"
        );
        return;
    }
    let _l = lock();
    let d = tmpdir("eio");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    const X: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const Y: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    let mac = |m: &[u8; 6]| tern_disk::daemon::mac_text(m);
    // Y's volume and log on the fault fs; X and both counter pages on the real disk.
    let (backing, mnt) = (d.join("disk"), d.join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = tern_faultfs::FaultFs::mount(&backing, &mnt).expect("mount the fault fs");
    let (xvol, yvol) = (d.join("x.img"), mnt.join("y.img"));
    for v in [&xvol, &yvol] {
        ok(&["disk", "create", &s(v), "--size", "16M"]);
    }
    let more = |me: &str, peer: &str, peer_mac: &[u8; 6]| {
        vec![
            "--counters".to_string(),
            s(&d.join(me).join("counters")),
            "--backup-peer".into(),
            format!("{}={}", mac(peer_mac), s(&d.join(peer).join("counters"))),
        ]
    };
    let start_y =
        |log: &str| start_secondary_with(&d.join("y"), &yvol, &d.join(log), &more("y", "x", &X));
    let mut servers = Servers(vec![
        start_secondary_with(&d.join("x"), &xvol, &d.join("x.log"), &more("x", "y", &Y)),
        start_y("y.log"),
    ]);
    let yctl = d.join("y/ctl.sock");
    let ylog = || status(&yctl)["backup_log"].clone();
    let mut x = Feed::open(&d.join("x/repl.sock"), "x", 0, vec![(Y, 0)]);
    let mut y = Feed::open(&d.join("y/repl.sock"), "y", 0, vec![(X, 0)]);
    x.write(1, vec![(Y, 0)], 0, 0x11);
    y.write(1, vec![(X, 1)], 0, 0x21);
    // Five acknowledged writes wait in Y's log for X's write 2.
    for i in 2..=6u64 {
        y.write(i, vec![(X, 2)], i * 4096, 0x20 + i as u8);
    }
    assert_eq!(ylog()["records"], 5, "{}", ylog());
    // Y's volume disk fails; X's write 2 arrives and makes Y's records applicable.
    fs.fail("y.img", libc::EIO);
    x.write(2, vec![(Y, 1)], 4096, 0x12);
    wait_for("Y's backup to report the failed apply", 10, || {
        ylog()["failed"].is_string()
    });
    let l = ylog();
    let failed = l["failed"].as_str().unwrap();
    assert!(
        failed.contains("Input/output error") && failed.contains("applying stopped"),
        "{failed}"
    );
    assert!(fs.injected() > 0);
    assert_eq!(
        l["records"], 5,
        "the log keeps every write not applied: {l}"
    );
    // `tern protect status` of a VM whose backup this is says so and exits non-zero.
    let name = format!("eio{}", std::process::id());
    let pdir = Path::new(tern_migrate::protect::PROTECT_DIR);
    std::fs::create_dir_all(pdir).unwrap();
    let record = tern_migrate::protect::Protection {
        name: name.clone(),
        primary_site: "a".into(),
        backup_site: "b".into(),
        mode: tern_migrate::protect::ProtectMode::Async,
        primary_volume: xvol.clone(),
        backup_volume: yvol.clone(),
        spec: tern_vm::VmSpec::new(&name, "a"),
        protected_unix_s: 0,
        failed_over_to: None,
    };
    let rpath = pdir.join(format!("{name}.json"));
    std::fs::write(&rpath, serde_json::to_vec(&record).unwrap()).unwrap();
    let bdir = tern_migrate::protect::backup_dir(&name, "b");
    std::fs::create_dir_all(&bdir).unwrap();
    std::os::unix::fs::symlink(&yctl, bdir.join("disk-ctl.sock")).unwrap();
    let out = tern(&["protect", "status", &name, "--json"]);
    let _ = std::fs::remove_file(&rpath);
    let _ = std::fs::remove_dir_all(bdir.parent().unwrap());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        st[0]["backup_failed"]
            .as_str()
            .is_some_and(|f| f.contains("Input/output error")),
        "{st}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("backup FAILED"));
    // A primary whose disk server still answers after `tern failover` told it to shut
    // down (a hung or partitioned host: a stand-in server that ignores shutdown, the one
    // fault the real server cannot give): failover refuses without --force and the
    // backup is not promoted.
    let name = format!("hung{}", std::process::id());
    let rpath = pdir.join(format!("{name}.json"));
    let record = tern_migrate::protect::Protection {
        name: name.clone(),
        spec: tern_vm::VmSpec::new(&name, "a"),
        ..record
    };
    std::fs::write(&rpath, serde_json::to_vec(&record).unwrap()).unwrap();
    let vm_dir = tern_migrate::protect::backup_dir(&name, "b")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let primary = vm_dir.join(&name).join("a");
    std::fs::create_dir_all(&primary).unwrap();
    let hung = std::os::unix::net::UnixListener::bind(primary.join("disk-ctl.sock")).unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for c in hung.incoming() {
            let Ok(mut c) = c else { return };
            let mut line = String::new();
            let _ = std::io::BufReader::new(&c).read_line(&mut line);
            let _ = writeln!(c, r#"{{"ok":true,"writes":7,"committed_writes":5}}"#);
        }
    });
    let bdir = tern_migrate::protect::backup_dir(&name, "b");
    std::fs::create_dir_all(&bdir).unwrap();
    std::os::unix::fs::symlink(&yctl, bdir.join("disk-ctl.sock")).unwrap();
    let out = tern(&["failover", &name, "--json"]);
    let _ = std::fs::remove_file(&rpath);
    let _ = std::fs::remove_dir_all(vm_dir.join(&name));
    let _ = std::fs::remove_dir_all(bdir.parent().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("could not be confirmed stopped") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        status(&yctl)["role"],
        "secondary",
        "the backup was promoted"
    );
    // Past the checkpoint's idle time: nothing was emptied.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ylog()["records"], 5, "{}", ylog());
    assert!(
        !y.try_write(7, 7 * 4096, 0x27),
        "a failed backup acknowledged a write"
    );
    drop((x, y));
    let mut yserver = servers.0.pop().unwrap();
    yserver.kill().unwrap();
    yserver.wait().unwrap();
    // A bit flips inside the log's first record; later records say it was durable.
    let wal = backing.join("y.img.wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(
        bytes.len() > tern_disk::wal::HEADER + 5 * 512,
        "{} bytes",
        bytes.len()
    );
    let at = tern_disk::wal::HEADER + 100;
    bytes[at] ^= 0x10;
    std::fs::write(&wal, &bytes).unwrap();
    fs.heal();
    let ybad = d.join("y-corrupt.log");
    let mut args = vec![
        "--nbd".to_string(),
        s(&d.join("y/nbd.sock")),
        "--control".into(),
        s(&yctl),
        "--secondary".into(),
        "--listen".into(),
        s(&d.join("y/repl.sock")),
    ];
    args.extend(more("y", "x", &X));
    args.push(s(&yvol));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut refused = serve(&argv, &ybad);
    let end = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(c) = refused.try_wait().unwrap() {
            break c;
        }
        if Instant::now() > end {
            let _ = refused.kill();
            panic!("a backup with a corrupt log kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(ybad.with_extension("err")).unwrap();
    assert!(!code.success(), "{err}");
    assert!(
        err.contains(&format!(
            "corrupt record at offset {}",
            tern_disk::wal::HEADER
        )),
        "the error names the bad record: {err}"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        bytes,
        "nothing was cut from the log"
    );
    // Repaired: the restarted backup replays every acknowledged write.
    bytes[at] ^= 0x10;
    std::fs::write(&wal, &bytes).unwrap();
    servers.0.push(start_y("y2.log"));
    wait_for("the replay", 20, || ylog()["records"] == 0);
    let img = std::fs::read(backing.join("y.img")).unwrap();
    assert_eq!(img[0], 0x21);
    for i in 2..=6u64 {
        assert_eq!(
            img[(i * 4096) as usize],
            0x20 + i as u8,
            "acknowledged write {i} is lost"
        );
    }
    drop(servers);
    drop(fs);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A zstd frame of RLE blocks that expands to `bytes` zeros (~4 bytes per 128 KiB).
fn zstd_zero_bomb(bytes: usize) -> Vec<u8> {
    const BLOCK: usize = 128 << 10;
    // magic, frame header descriptor 0 (no content size), window 2^17.
    let mut z = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
    let blocks = bytes / BLOCK;
    for b in 0..blocks {
        let h = (BLOCK as u32) << 3 | 1 << 1 | u32::from(b + 1 == blocks);
        z.extend_from_slice(&h.to_le_bytes()[..3]);
        z.push(0);
    }
    z
}

/// A file's permission bits.
fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = st
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kb << 10
}

/// An authenticated but hostile primary sends the real backup process DATA whose 32 KiB of
/// zstd (frame or stream) would expand to 1 GiB: the session ends with an ERROR naming it,
/// the process never holds more than it would for an honest DATA, the volume is untouched,
/// and the next session works.
#[test]
fn a_zstd_bomb_from_the_primary_is_refused_without_the_memory_it_claims() {
    use tern_disk::wire::{Compression, Msg};
    let d = tmpdir("bomb");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let vol = d.join("b.img");
    ok(&["disk", "create", &s(&vol), "--size", "16M"]);
    let bdir = d.join("b");
    let servers = Servers(vec![start_secondary(&bdir, &vol, &d.join("b.log"))]);
    let pid = servers.0[0].id();
    let repl = bdir.join("repl.sock");
    // Its management sockets exist only as 0600 (bound in a private directory, then moved).
    for sock in ["ctl.sock", "repl.sock", "nbd.sock"] {
        assert_eq!(mode_of(&bdir.join(sock)), 0o600, "{sock}");
    }
    let bomb = zstd_zero_bomb(1 << 30);
    assert!(bomb.len() < 64 << 10);
    let before = peak_rss(pid);
    for compression in [Compression::Frame, Compression::Stream] {
        let mut feed = Feed::open(&repl, "b", 0, vec![]);
        feed.write(1, vec![], 0, 0x11);
        feed.seq += 1;
        feed.send(&[
            Msg::Clock {
                write: 2,
                deps: vec![],
            },
            Msg::Data {
                seq: feed.seq,
                offset: 4096,
                raw_len: 4096,
                compression,
                bytes: bomb.clone(),
            },
            Msg::Flush { seq: feed.seq + 1 },
        ]);
        // The answer is an ERROR (then the session closes), never an ACK of the bomb.
        let error = loop {
            use std::io::Read;
            if let Some(m) = feed.reader.next_msg().unwrap() {
                match m {
                    Msg::Error(e) => break e,
                    Msg::Ack { seq } => assert!(seq < feed.seq, "the bomb was acknowledged"),
                    _ => {}
                }
                continue;
            }
            let mut buf = [0u8; 65536];
            let n = feed.sock.read(&mut buf).unwrap();
            assert!(n > 0, "{compression:?}: closed without an ERROR");
            feed.reader.push(&buf[..n]);
        };
        assert!(error.contains("zstd"), "{compression:?}: {error}");
    }
    let peak = peak_rss(pid);
    assert!(
        peak < before + (64 << 20),
        "the backup's peak RSS went from {before} to {peak} bytes"
    );
    // Still serving; the bomb's block was never written.
    let mut feed = Feed::open(&repl, "b", 0, vec![]);
    feed.write(1, vec![], 8192, 0x33);
    drop(feed);
    wait_for("the write to be applied", 10, || {
        std::fs::read(&vol).unwrap()[8192] == 0x33
    });
    let img = std::fs::read(&vol).unwrap();
    assert_eq!((img[0], img[4096]), (0x11, 0));
    drop(servers);
    std::fs::remove_dir_all(&d).unwrap();
}

/// One end of a `-netdev stream` connection (what QEMU's NIC or a VM's plain switch port
/// speaks: `be32 len | frame`).
struct Nic {
    sock: std::os::unix::net::UnixStream,
    dec: tern_node::switch::FrameDecoder,
}

impl Nic {
    fn connect(p: &Path) -> Nic {
        let sock = std::os::unix::net::UnixStream::connect(p)
            .unwrap_or_else(|e| panic!("connect {}: {e}", p.display()));
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Nic {
            sock,
            dec: tern_node::switch::FrameDecoder::default(),
        }
    }

    fn send(&mut self, frame: &[u8]) {
        let mut out = Vec::new();
        tern_node::switch::encode_frame(frame, &mut out);
        std::io::Write::write_all(&mut self.sock, &out).unwrap();
    }

    /// The next frame whose payload starts with `tag`, within `timeout`.
    fn recv(&mut self, tag: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            while let Ok(Some(f)) = self.dec.next_frame() {
                if f.len() >= 14 + tag.len() && &f[14..14 + tag.len()] == tag {
                    return Some(f.to_vec());
                }
            }
            let mut buf = [0u8; 65536];
            match std::io::Read::read(&mut self.sock, &mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(_) => {}
            }
        }
        None
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// Two gated tiers (front end FE, database DB) of a protected group on one real site switch
/// (`tern node`'s overlay), and a third VM's port that forges DB's frames with a clock
/// trailer saying DB's disk is a million writes ahead. FE's gate must take clocks only from
/// DB's own gated port: the forged trailer is not taken in (the frame reaches FE as sent,
/// trailer and all), so FE's replies to the world still leave at once instead of waiting
/// forever on a disk counter that will never get there. When DB's VM attaches, its gate
/// takes DB's MAC back from the impostor's port (which had bound it first): DB's real
/// frames reach FE with their trailer taken, and the impostor cannot send as DB any more.
#[test]
fn forged_clock_trailers_from_another_vm_neither_hold_nor_open_the_gate() {
    if !is_root() {
        return;
    }
    let d = tmpdir("clocks");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    const FE: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xfe];
    const DB: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xdb];
    const EVIL: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xee];
    let mac = |m: &[u8; 6]| tern_disk::daemon::mac_text(m);
    // The site switch: a node with an overlay and no peers.
    let key = d.join("a.key");
    assert!(
        tern(&["keygen", "--out", &s(&key)]).status.success(),
        "keygen"
    );
    let switch = d.join("switch.sock");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = d.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"a\"\nprivate_key_file = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             control = \"{}\"\n[overlay]\nsocket = \"{}\"\n[migration]\nsocket = \"{}\"\n\
             target_dir = \"{}\"\n",
            s(&key),
            s(&d.join("node.sock")),
            s(&switch),
            s(&d.join("migrate.sock")),
            s(&d)
        ),
    )
    .unwrap();
    let node = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["node", "run", "--config", &s(&cfg)])
        .stdout(std::fs::File::create(d.join("node.log")).unwrap())
        .stderr(std::fs::File::create(d.join("node.err")).unwrap())
        .spawn()
        .unwrap();
    let mut servers = Servers(vec![node]);
    wait_socket(&switch);
    // Each tier's disk server gates its VM's NIC; each knows the other's counter page.
    for (me, peer, my_mac, peer_mac) in [("fe", "db", FE, DB), ("db", "fe", DB, FE)] {
        let dir = d.join(me);
        std::fs::create_dir_all(&dir).unwrap();
        let vol = d.join(format!("{me}.img"));
        ok(&["disk", "create", &s(&vol), "--size", "16M"]);
        let args = [
            "--nbd".to_string(),
            s(&dir.join("nbd.sock")),
            "--control".into(),
            s(&dir.join("ctl.sock")),
            "--counters".into(),
            s(&dir.join("counters")),
            "--gate-nic".into(),
            s(&dir.join("nic.sock")),
            "--switch".into(),
            s(&switch),
            "--gate-mac".into(),
            mac(&my_mac),
            "--gate-peer".into(),
            format!("{}={}", mac(&peer_mac), s(&d.join(peer).join("counters"))),
            s(&vol),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.0.push(serve(&argv, &d.join(format!("{me}.log"))));
        wait_socket(&dir.join("ctl.sock"));
        wait_socket(&dir.join("nic.sock"));
        for sock in ["ctl.sock", "nic.sock", "nbd.sock"] {
            assert_eq!(mode_of(&dir.join(sock)), 0o600, "{me}/{sock}");
        }
    }
    for sock in [&switch, &d.join("node.sock"), &d.join("migrate.sock")] {
        assert_eq!(mode_of(sock), 0o600, "{}", sock.display());
    }
    // The VMs' NICs: FE and DB through their gates, the impostor on a plain switch port.
    // DB's VM is not attached yet (its NIC connects later, as after a restart).
    let mut fe = Nic::connect(&d.join("fe/nic.sock"));
    let mut evil = Nic::connect(&switch);
    std::thread::sleep(Duration::from_millis(300));
    // FE speaks first (the switch learns where it is).
    fe.send(&eth([0xff; 6], FE, b"fe-hello"));
    assert!(evil.recv(b"fe-hello", Duration::from_secs(5)).is_some());
    // The impostor, before DB ever sent a frame, sends as DB with a forged clock.
    let mut forged = eth(FE, DB, b"forged-1");
    tern_gate::append_clock(&mut forged, &[(DB, 1_000_000), (FE, 0)]);
    evil.send(&forged);
    let got = fe.recv(b"forged-1", Duration::from_secs(5));
    assert_eq!(
        got.as_deref(),
        Some(&forged[..]),
        "the forged frame reaches FE untouched: its trailer was not taken in"
    );
    // FE answers the world (the impostor's own MAC): not held on DB's "million writes".
    evil.send(&eth([0xff; 6], EVIL, b"evil-hello"));
    std::thread::sleep(Duration::from_millis(200));
    fe.send(&eth(EVIL, FE, b"fe-reply-1"));
    assert!(
        evil.recv(b"fe-reply-1", Duration::from_secs(5)).is_some(),
        "FE's reply was held by a forged clock"
    );
    // DB's VM attaches: its gate's hello takes DB's MAC back from the impostor's port.
    let mut db = Nic::connect(&d.join("db/nic.sock"));
    std::thread::sleep(Duration::from_millis(300));
    // DB's real frame: stamped by DB's gate, its trailer taken in and stripped at FE's.
    let real = eth(FE, DB, b"db-real");
    db.send(&real);
    let got = fe
        .recv(b"db-real", Duration::from_secs(5))
        .expect("DB's frame");
    assert_eq!(
        got, real,
        "DB's trailer is stripped before FE sees the frame"
    );
    // Now DB's MAC belongs to DB's gated port: the impostor cannot send as DB at all.
    let mut forged = eth(FE, DB, b"forged-2");
    tern_gate::append_clock(&mut forged, &[(DB, 1_000_000)]);
    evil.send(&forged);
    assert!(
        fe.recv(b"forged-2", Duration::from_secs(1)).is_none(),
        "a frame spoofing a bound MAC got through"
    );
    fe.send(&eth(EVIL, FE, b"fe-reply-2"));
    assert!(
        evil.recv(b"fe-reply-2", Duration::from_secs(5)).is_some(),
        "FE's reply was held after the second forgery"
    );
    let st = status(&d.join("fe/ctl.sock"));
    assert_eq!(st["gate"]["held_now"], 0, "{st}");
    drop((fe, db, evil));
    drop(servers);
    std::fs::remove_dir_all(&d).unwrap();
}
