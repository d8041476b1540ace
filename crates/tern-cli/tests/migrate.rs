//! End to end: live migration of real QEMU guests through the real lab (root, the guest
//! image from scripts/guest-image.sh). Every migration is verified byte for byte.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_root, json, lock, ok, tern};
use serde_json::Value;

const IMAGE: &str = "/var/lib/tern/guest/initrd.img";

fn have_image() -> bool {
    let ok = Path::new(IMAGE).exists();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "the guest image must exist in CI (scripts/setup.sh builds it)"
        );
        eprintln!("skipping: no guest image at {IMAGE}");
    }
    ok
}

/// Brings a lab up and takes it (and its VMs) down when dropped.
struct Lab;

impl Lab {
    fn up(profile: &str) -> Lab {
        let _ = tern(&["lab", "down"]);
        ok(&["lab", "up", "--profile", profile]);
        Lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for vm in ["mig1", "mig2", "mig3", "mig4"] {
            let _ = tern(&["vm", "stop", vm]);
        }
        let _ = tern(&["lab", "down"]);
    }
}

fn vm_info(name: &str) -> Value {
    let list = json(&["vm", "list", "--json"]);
    list.as_array()
        .and_then(|a| {
            a.iter()
                .find(|v| v["name"] == name && v["role"] == "primary")
        })
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

fn serial(name: &str) -> String {
    let log = vm_info(name)["serial_log"].as_str().unwrap().to_string();
    std::fs::read_to_string(log).unwrap_or_default()
}

fn verify_oks(log: &str) -> usize {
    log.matches("tern-guest: verify ok").count()
}

/// Starts a tern guest and waits for its first good verification pass.
fn start_guest(name: &str, mem: &str) {
    ok(&[
        "vm",
        "start",
        name,
        "--site",
        "a",
        "--mem",
        mem,
        "--workload",
        "web-db",
    ]);
    wait_log(name, |l| verify_oks(l) >= 1, "a first verification pass");
}

fn wait_log(name: &str, cond: impl Fn(&str) -> bool, what: &str) {
    let end = Instant::now() + Duration::from_secs(240);
    loop {
        let log = serial(name);
        assert!(
            !log.contains("verify FAIL"),
            "guest reported corruption:\n{log}"
        );
        if cond(&log) {
            return;
        }
        assert!(Instant::now() < end, "{name}: no {what}:\n{log}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn migrate(args: &[&str]) -> Value {
    let mut full = vec!["migrate"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--json", "--quiet", "--check-memory"]);
    let r = json(&full);
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["memory"]["pages_differing"], 0, "{r}");
    assert_eq!(r["guest_verify"]["failures"], 0, "{r}");
    assert!(r["total_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["qemu_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["wire_bytes"].as_u64().unwrap() > 0, "{r}");
    r
}

#[test]
fn migrates_both_ways_through_tern_and_direct_verified() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("mpls");
    start_guest("mig1", "128");
    let r = migrate(&["mig1", "--to", "b"]);
    assert_eq!(r["route"], "tern");
    assert_eq!(vm_info("mig1")["site"], "b");
    assert_eq!(vm_info("mig1")["state"], "running");
    // tern compresses: fewer bytes on the link than QEMU wrote.
    assert!(
        r["wire_bytes"].as_u64() < r["qemu_bytes"].as_u64(),
        "no reduction: {r}"
    );
    // And back over plain kernel TCP.
    let r = migrate(&["mig1", "--to", "a", "--direct", "--cc", "bbr"]);
    assert_eq!(r["cc"], "bbr");
    assert_eq!(vm_info("mig1")["site"], "a");
    // Exactly one instance is left, and bad requests get clear errors.
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let out = tern(&["migrate", "mig1", "--to", "a"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already runs at site a"));
    let out = tern(&["migrate", "nope", "--to", "b"]);
    assert!(!out.status.success());
}

/// A thread that enters a site's namespace to make its sockets there.
#[test]
fn codec_options_verified_and_the_store_serves_the_return_trip() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("cloudnet-lab");
    start_guest("mig4", "128");
    // Everything on: the stream is parsed to the end of RAM, pages are re-encoded.
    let r = migrate(&["mig4", "--to", "b", "--codec", "all"]);
    let st = &r["codec"]["stats"];
    assert_eq!(r["codec"]["options"], "re+delta+store+zstd", "{r}");
    assert!(st["pages"].as_u64().unwrap() > 1000, "{r}");
    assert!(st["fallback"].is_null(), "{r}");
    // Smart stop ran (QEMU may still switch over by itself when the dirty set is tiny).
    assert!(r["smart_stop"]["decisions"].is_array(), "{r}");
    // Coming back: the first migration left the pages in site a's store.
    let r = migrate(&["mig4", "--to", "a", "--codec", "all"]);
    let st = &r["codec"]["stats"];
    assert!(st["store_hits"].as_u64().unwrap() > 1000, "{r}");
    assert!(
        r["wire_bytes"].as_u64().unwrap() * 5 < r["qemu_bytes"].as_u64().unwrap(),
        "{r}"
    );
    // Frames without the codec's zstd (the transport compresses), QEMU's stop rule.
    let r = migrate(&[
        "mig4",
        "--to",
        "b",
        "--codec",
        "re+delta",
        "--smart-stop",
        "off",
    ]);
    assert!(r["smart_stop"].is_null(), "{r}");
    assert!(r["codec"]["stats"]["re_hits"].as_u64().is_some(), "{r}");
    // QEMU's XBZRLE records pass through the parser untouched.
    let r = migrate(&["mig4", "--to", "a", "--qemu-cap", "xbzrle"]);
    assert!(r["codec"]["stats"]["fallback"].is_null(), "{r}");
    // multifd cannot ride tern's single stream: a clear refusal, nothing started.
    let out = tern(&["migrate", "mig4", "--to", "b", "--qemu-cap", "multifd"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --direct"));
    assert_eq!(vm_info("mig4")["site"], "a");
}

fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn tcp_connection_to_the_vm_survives_migration() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("cloudnet-lab");
    start_guest("mig2", "128");
    let ip = vm_info("mig2")["ip"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // A client at site A holds one echo connection through the migration to B.
    let sock = in_netns("tern-a", move || {
        TcpStream::connect_timeout(&format!("{ip}:7").parse().unwrap(), Duration::from_secs(10))
            .expect("connect to the VM's echo service")
    });
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) || n < 5 {
            let line = format!("line {n} {}\n", "x".repeat(100));
            w.write_all(line.as_bytes())
                .expect("send on the held connection");
            let mut back = String::new();
            r.read_line(&mut back).expect("echo on the held connection");
            assert_eq!(back, line, "echo mismatch");
            n += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        n
    });
    std::thread::sleep(Duration::from_secs(1));
    let m = migrate(&["mig2", "--to", "b"]);
    assert_eq!(vm_info("mig2")["site"], "b", "{m}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let n = echo.join().expect("the connection kept echoing");
    assert!(n >= 20, "only {n} echoes");
    // The VM is reachable from site B's client too, at the same address.
    let ip = vm_info("mig2")["ip"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", "tern-b", "ping", "-c", "2", "-W", "3", &ip])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Starts `tern migrate NAME --to b` in the background (for tests that break it midway).
fn spawn_migrate(name: &str, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["migrate", name, "--to", "b", "--json", "--quiet"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn cut_link_aborts_cleanly_and_the_retry_succeeds() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("mpls");
    start_guest("mig3", "192");
    // A slow link keeps the migration running past the cut (over the full 100 Mbit/s the
    // codec can finish a 192 MiB guest in under 2.5 s).
    ok(&["lab", "set", "--rate", "10mbit"]);
    let child = spawn_migrate("mig3", &["--stall-timeout", "4"]);
    // Cut the link once the stream is flowing.
    std::thread::sleep(Duration::from_millis(2500));
    ok(&["lab", "set", "--loss", "100%"]);
    let out = child.wait_with_output().unwrap();
    ok(&["lab", "set", "--profile", "mpls"]);
    assert!(!out.status.success(), "a cut migration must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stalled") || err.contains("failed"), "{err}");
    assert!(err.contains("left running"), "{err}");
    // The source still runs, unchanged: its own checks keep passing; no destination left.
    let info = vm_info("mig3");
    assert_eq!(info["site"], "a");
    assert_eq!(info["state"], "running");
    let before = verify_oks(&serial("mig3"));
    wait_log(
        "mig3",
        |l| verify_oks(l) >= before + 2,
        "verification after the abort",
    );
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Once the link is back, the same migration succeeds.
    std::thread::sleep(Duration::from_secs(2));
    let r = migrate(&["mig3", "--to", "b"]);
    assert_eq!(vm_info("mig3")["site"], "b", "{r}");
}

#[test]
fn destination_crash_aborts_cleanly_and_the_retry_succeeds() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("mpls");
    start_guest("mig1", "192");
    ok(&["lab", "set", "--rate", "10mbit"]); // still streaming when the destination dies
    let child = spawn_migrate("mig1", &[]);
    // Kill the destination QEMU once the stream is flowing.
    std::thread::sleep(Duration::from_millis(2500));
    let list = json(&["vm", "list", "--json"]);
    let dest = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mig1" && v["role"] == "incoming")
        .unwrap_or_else(|| panic!("no incoming instance: {list}"))
        .clone();
    let pid = dest["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill with a pid tern listed as the destination QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = child.wait_with_output().unwrap();
    ok(&["lab", "set", "--profile", "mpls"]);
    assert!(
        !out.status.success(),
        "a migration to a dead peer must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("left running"), "{err}");
    let info = vm_info("mig1");
    assert_eq!(
        (info["site"].as_str(), info["state"].as_str()),
        (Some("a"), Some("running"))
    );
    let before = verify_oks(&serial("mig1"));
    wait_log(
        "mig1",
        |l| verify_oks(l) >= before + 2,
        "verification after the abort",
    );
    let r = migrate(&["mig1", "--to", "b"]);
    assert_eq!(vm_info("mig1")["site"], "b", "{r}");
}

fn record_path(name: &str) -> std::path::PathBuf {
    Path::new("/run/tern/vm").join(name).join("migration.json")
}

/// `tern migrate` dies past the point of no return (QEMU completed, the destination is
/// loaded and paused for --check-memory's comparison): the source must not come back.
/// `--recover` resumes the destination and quits the source.
#[test]
fn killed_past_completion_recover_moves_the_vm_forward() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("mpls");
    start_guest("mig2", "192");
    let mut child = spawn_migrate("mig2", &["--check-memory"]);
    // The RAM dumps start only after QEMU reported completion.
    let dump = Path::new("/run/tern/vm/mig2/b/mem-source.bin");
    let end = Instant::now() + Duration::from_secs(120);
    while !dump.exists() {
        assert!(Instant::now() < end, "the migration never completed");
        assert!(
            child.try_wait().unwrap().is_none(),
            "tern migrate ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(record_path("mig2").exists(), "no pending-migration record");
    // Nothing else may start a migration of it until it is settled.
    let again = tern(&["migrate", "mig2", "--to", "b", "--quiet"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--recover"),
        "{again:?}"
    );
    let r = json(&["migrate", "mig2", "--recover", "--json"]);
    assert_eq!(
        (r["outcome"].as_str(), r["site"].as_str()),
        (Some("forward"), Some("b")),
        "{r}"
    );
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the source is gone: {list}"
    );
    let info = vm_info("mig2");
    assert_eq!(
        (info["site"].as_str(), info["state"].as_str()),
        (Some("b"), Some("running"))
    );
    let before = verify_oks(&serial("mig2"));
    wait_log(
        "mig2",
        |l| verify_oks(l) > before,
        "verification at the destination",
    );
    assert!(!record_path("mig2").exists());
}

/// `tern migrate` dies while the stream is still flowing: the destination never finished
/// loading, so `--recover` kills it and the source keeps running.
#[test]
fn killed_mid_stream_recover_keeps_the_source() {
    if !is_root() || !have_image() {
        return;
    }
    let _g = lock();
    let _lab = Lab::up("mpls");
    start_guest("mig4", "192");
    ok(&["lab", "set", "--rate", "10mbit"]); // still streaming when tern migrate dies
    let mut child = spawn_migrate("mig4", &["--check-memory"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "tern migrate ended early"
    );
    child.kill().unwrap();
    let _ = child.wait();
    let r = json(&["migrate", "mig4", "--recover", "--json"]);
    ok(&["lab", "set", "--profile", "mpls"]);
    assert_eq!(
        (
            r["outcome"].as_str(),
            r["site"].as_str(),
            r["state"].as_str()
        ),
        (Some("rollback"), Some("a"), Some("running")),
        "{r}"
    );
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "no destination left: {list}"
    );
    let before = verify_oks(&serial("mig4"));
    wait_log(
        "mig4",
        |l| verify_oks(l) > before,
        "verification after the recovery",
    );
    assert!(!record_path("mig4").exists());
    let r = migrate(&["mig4", "--to", "b"]);
    assert_eq!(vm_info("mig4")["site"], "b", "{r}");
}
