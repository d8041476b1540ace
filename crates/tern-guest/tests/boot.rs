//! Boots the real guest image (scripts/guest-image.sh) under QEMU TCG the way tern does and
//! watches the serial console. Skipped, with a line saying so, when the image or QEMU is
//! missing.
//!
//! Memory: the Debian cloud kernel needs ~54 MB above its 16 MiB load address just to
//! decompress (bzImage `init_size`), so a 64 MiB guest reboots in the decompressor; 96 MiB
//! is the smallest round size that boots with room for the workload. Sizes are 4 KiB over a
//! multiple of 256 KiB (QEMU 7.2 TCG dirty-tracking bug, see docs/guest.md).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_MEM: &str = "98308K";
/// A liveness bound, not a performance claim: TCG on a loaded 2-core machine is slow.
const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "198.18.100.10";

fn guest_dir() -> PathBuf {
    std::env::var_os("TERN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/tern/guest"))
}

/// The image, or `None` (and a skip line) when this machine cannot run the test.
fn image() -> Option<PathBuf> {
    let dir = guest_dir();
    if !dir.join("initrd.img").exists() || !dir.join("vmlinuz").exists() {
        println!(
            "skip: no guest image in {} (run scripts/guest-image.sh)",
            dir.display()
        );
        return None;
    }
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !qemu.is_ok_and(|s| s.success()) {
        println!("skip: qemu-system-x86_64 not installed");
        return None;
    }
    Some(dir)
}

/// A running guest; killed (and its log removed) when dropped, also on a failed assert.
struct Guest {
    child: Child,
    log: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

impl Guest {
    /// Boots with `tern.*` keys in `keys`, forwarding host ports to guest ports `fwd`.
    fn boot(dir: &Path, name: &str, keys: &str, fwd: &[(u16, u16)]) -> Guest {
        let log =
            std::env::temp_dir().join(format!("tern-guest-boot-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut netdev = "user,id=n0,net=198.18.100.0/24,host=198.18.100.2".to_string();
        for (host, guest) in fwd {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-{GUEST_IP}:{guest}"));
        }
        let append = format!(
            "console=ttyS0 quiet mitigations=off tsc=reliable no_timer_check \
             tern.ip={GUEST_IP}/24 {keys}"
        );
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "pc,accel=tcg", "-nodefaults", "-m", GUEST_MEM])
            .args(["-smp", "1", "-display", "none"])
            .arg("-kernel")
            .arg(dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(dir.join("initrd.img"))
            .args(["-append", &append])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Guest { child, log }
    }

    fn console(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `pred` holds for the console text; panics with the console on timeout
    /// or when QEMU exits.
    fn wait_console(&mut self, what: &str, started: Instant, pred: impl Fn(&str) -> bool) {
        loop {
            let text = self.console();
            if pred(&text) {
                println!("{what} after {:.1}s", started.elapsed().as_secs_f64());
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("qemu exited ({status}) before {what}; console:\n{text}");
            }
            if started.elapsed() > DEADLINE {
                panic!("no {what} within {DEADLINE:?}; console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn web_db_guest_boots_verifies_and_serves() {
    let Some(dir) = image() else { return };
    let (http_port, echo_port) = (free_port(), free_port());
    let started = Instant::now();
    let mut g = Guest::boot(
        &dir,
        "web-db",
        "tern.workload=web-db tern.mem_mb=16",
        &[(http_port, 80), (echo_port, 7)],
    );
    g.wait_console("ready", started, |t| t.contains("tern-guest: ready "));
    g.wait_console("verify ok", started, |t| {
        t.contains("tern-guest: verify ok pass=1 ")
    });
    let console = g.console();
    assert!(
        console.contains(&format!("tern-init: eth0 up ip={GUEST_IP}/24")),
        "{console}"
    );
    assert!(
        console.contains(&format!(
            "tern-guest: ready workload=web-db mem_mb=16 ip={GUEST_IP}/24"
        )),
        "{console}"
    );
    assert!(
        console.contains("verify ok pass=1 records=4096 bytes=16777216"),
        "{console}"
    );

    // eth0 carries TCP: /status through QEMU's port forward (retried while the forward's
    // first connection races the guest's listener).
    let mut status = String::new();
    while started.elapsed() < DEADLINE {
        match http_get(http_port, "/status") {
            Ok(r) if r.contains("\"verified\":true") => {
                status = r;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    assert!(status.starts_with("HTTP/1.0 200 OK"), "status: {status:?}");
    assert!(status.contains("\"workload\":\"web-db\""), "{status}");
    assert!(status.contains("\"records\":4096"), "{status}");

    let mut echo = TcpStream::connect(("127.0.0.1", echo_port)).expect("echo connect");
    echo.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    echo.write_all(&sent).expect("echo write");
    let mut got = vec![0u8; sent.len()];
    echo.read_exact(&mut got).expect("echo read");
    assert!(got == sent, "echo returned different bytes");

    // The workload keeps writing and the passes keep passing.
    g.wait_console("verify ok pass=3", started, |t| {
        t.contains("verify ok pass=3 ")
    });
    let console = g.console();
    assert!(!console.contains("FAIL"), "{console}");
    assert!(!console.contains("exited"), "{console}");
}

#[test]
fn injected_corruption_is_reported_on_the_console() {
    let Some(dir) = image() else { return };
    let started = Instant::now();
    // tern.corrupt_s=2: one byte flipped behind the checksums 2 s after ready.
    let mut g = Guest::boot(
        &dir,
        "corrupt",
        "tern.workload=kernel-compile tern.mem_mb=8 tern.corrupt_s=2",
        &[],
    );
    g.wait_console("verify FAIL", started, |t| {
        t.contains("tern-guest: verify FAIL pass=")
    });
    let console = g.console();
    let injected = console
        .lines()
        .find_map(|l| l.strip_prefix("tern-guest: injected corruption record="))
        .and_then(|rest| rest.split(' ').next())
        .expect("injection marker")
        .to_string();
    // The failing record is the one corrupted, and passes before it were clean.
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("tern-guest: verify FAIL")
                && l.contains(&format!("record={injected} "))),
        "{console}"
    );
    assert!(console.contains("verify ok pass=1 "), "{console}");
}
