//! Starting and stopping `tern disk serve` processes for VM instances (driver).
//!
//! A VM instance directory `DIR` (`/run/tern/vm/NAME/SITE`) holds its disk server's files:
//! `nbd.sock` (QEMU's disk), `disk-ctl.sock` (control), `disk-repl.sock` (a secondary's
//! replication socket, the target of the relayed stream), `disk.pid`, `disk.log`, and for a
//! gated VM `gate-nic.sock` (its NIC, gated by the disk server, see `nic.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Mode;
use crate::server::{Role, request};

/// The export name QEMU asks for.
pub const EXPORT: &str = "disk";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPaths {
    pub nbd: PathBuf,
    pub control: PathBuf,
    pub repl: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// A gated VM's NIC connects here (PipeCloud).
    pub gate_nic: PathBuf,
    /// A primary's published write/committed counters, for peer tiers' gates; a
    /// secondary's applied write, for peer backups.
    pub counters: PathBuf,
}

impl DiskPaths {
    pub fn in_dir(dir: &Path) -> DiskPaths {
        DiskPaths {
            nbd: dir.join("nbd.sock"),
            control: dir.join("disk-ctl.sock"),
            repl: dir.join("disk-repl.sock"),
            pid: dir.join("disk.pid"),
            log: dir.join("disk.log"),
            gate_nic: dir.join("gate-nic.sock"),
            counters: dir.join("disk-counters"),
        }
    }
}

/// The `tern` executable to run servers with: `$TERN_EXE`, else this process's own.
pub fn tern_exe() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TERN_EXE") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe().map_err(|e| format!("cannot find the tern executable: {e}"))
}

/// A gated VM's NIC (PipeCloud), for [`start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateStart {
    /// The site switch socket.
    pub switch: PathBuf,
    pub mac: tern_gate::Mac,
    /// Gated peer tiers of the VM's group: MAC and counter page ([`DiskPaths::counters`]).
    pub peers: Vec<(tern_gate::Mac, PathBuf)>,
}

/// Starts `tern disk serve` for `volume` in the background with its files in `dir`;
/// returns once its control socket answers. With `gate`, the server also gates the VM's NIC
/// (PipeCloud): QEMU connects to [`DiskPaths::gate_nic`], frames go on to the switch.
pub fn start(
    dir: &Path,
    volume: &Path,
    role: Role,
    mode: Mode,
    gate: Option<&GateStart>,
) -> Result<DiskPaths, String> {
    start_with(dir, volume, role, mode, gate, &[])
}

/// Starts a protected VM's backup: a secondary whose logged writes wait for the writes
/// they depend on at `peers` (the other tiers' backups: their VM's MAC and their
/// [`DiskPaths::counters`]).
pub fn start_backup(
    dir: &Path,
    volume: &Path,
    peers: &[(tern_gate::Mac, PathBuf)],
) -> Result<DiskPaths, String> {
    start_with(dir, volume, Role::Secondary, Mode::Async, None, peers)
}

fn start_with(
    dir: &Path,
    volume: &Path,
    role: Role,
    mode: Mode,
    gate: Option<&GateStart>,
    backup_peers: &[(tern_gate::Mac, PathBuf)],
) -> Result<DiskPaths, String> {
    let p = DiskPaths::in_dir(dir);
    let exe = tern_exe()?;
    let log = fs::File::create(&p.log).map_err(|e| format!("create {}: {e}", p.log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&exe);
    cmd.arg("disk")
        .arg("serve")
        .arg(volume)
        .arg("--nbd")
        .arg(&p.nbd)
        .arg("--control")
        .arg(&p.control)
        .arg("--export")
        .arg(EXPORT)
        .arg("--mode")
        .arg(mode.to_string());
    if role == Role::Secondary {
        cmd.arg("--secondary").arg("--listen").arg(&p.repl);
    }
    cmd.arg("--counters").arg(&p.counters);
    for (mac, page) in backup_peers {
        cmd.arg("--backup-peer")
            .arg(format!("{}={}", mac_text(mac), page.display()));
    }
    if let Some(g) = gate {
        cmd.arg("--gate-nic")
            .arg(&p.gate_nic)
            .arg("--switch")
            .arg(&g.switch)
            .arg("--gate-mac")
            .arg(mac_text(&g.mac));
        for (mac, page) in &g.peers {
            cmd.arg("--gate-peer")
                .arg(format!("{}={}", mac_text(mac), page.display()));
        }
    }
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("run {} disk serve: {e}", exe.display()))?;
    let pid = child.id();
    let _ = fs::write(&p.pid, format!("{pid}\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if request(&p.control, &json!({"cmd": "status"})).is_ok() {
            return Ok(p);
        }
        if !alive(pid) || Instant::now() > deadline {
            let log = fs::read_to_string(&p.log).unwrap_or_default();
            stop(dir);
            return Err(format!(
                "tern disk serve {} did not start: {}",
                volume.display(),
                log.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    // Reap it if it exited (it is our child when we started it).
    // SAFETY: waitpid with WNOHANG on a pid; no memory is passed.
    unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Stops the disk server of `dir` (shutdown request, then SIGKILL); a no-op without one.
pub fn stop(dir: &Path) {
    let p = DiskPaths::in_dir(dir);
    let pid = fs::read_to_string(&p.pid)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let _ = request(&p.control, &json!({"cmd": "shutdown"}));
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if alive(pid) && cmdline.contains("serve") {
            // SAFETY: kill of our own disk server (its command line was just checked).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let _ = fs::remove_file(&p.pid);
}

/// The status of the disk server of `dir`.
pub fn status(dir: &Path) -> Result<Value, String> {
    request(&DiskPaths::in_dir(dir).control, &json!({"cmd": "status"}))
}

/// `52:54:00:12:34:56`.
pub fn mac_text(m: &tern_gate::Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<tern_gate::Mac, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "bad MAC address {s:?} (want 6 hex bytes, e.g. 52:54:00:12:34:56)"
        ));
    }
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
    }
    Ok(m)
}

/// Parses a `--gate-peer` value: `MAC=COUNTER_PAGE`.
pub fn parse_gate_peer(s: &str) -> Result<(tern_gate::Mac, PathBuf), String> {
    let (mac, page) = s
        .split_once('=')
        .ok_or_else(|| format!("bad gate peer {s:?} (want MAC=PATH of its disk-counters)"))?;
    Ok((parse_mac(mac)?, PathBuf::from(page)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_peers_parse() {
        let m = parse_mac("52:54:00:0a:ff:01").unwrap();
        assert_eq!(m, [0x52, 0x54, 0, 0x0a, 0xff, 1]);
        assert_eq!(mac_text(&m), "52:54:00:0a:ff:01");
        assert!(parse_mac("52:54:00:0a:ff").is_err());
        assert!(parse_mac("52:54:00:0a:ff:zz").is_err());
        let (pm, p) = parse_gate_peer("52:54:00:0a:ff:01=/run/x/disk-counters").unwrap();
        assert_eq!((pm, p), (m, PathBuf::from("/run/x/disk-counters")));
        assert!(parse_gate_peer("/run/x").is_err());
    }
}
