//! End-to-end tests of the accelerator: `tern lab up --accel` starts a tern node in each site;
//! unmodified Python clients and servers talk plain TCP and are intercepted transparently.
//! Root only (CI runs as root; elsewhere they skip unless CI=true).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{is_root, lock, ok, tern};
use serde_json::Value;

fn node_status(site: &str) -> Value {
    let sock = format!("/run/tern/lab/node-{site}.sock");
    serde_json::from_str(&ok(&["node", "status", "--socket", &sock, "--json"])).unwrap()
}

/// Whether site `site`'s node answers and says its first peer is connected (a restarted
/// node's control socket appears only once it is running).
fn peer_connected(site: &str) -> bool {
    let sock = format!("/run/tern/lab/node-{site}.sock");
    let out = tern(&["node", "status", "--socket", &sock, "--json"]);
    out.status.success()
        && serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|v| v["peers"][0]["connected"] == true)
}

fn python_in(ns: &str, code: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "python3", "-c", code]);
    c
}

/// Server in B: hash what arrives until FIN, then send `reply_mib` MiB back (seeded) and
/// print both hashes. Client in A: the mirror image.
const SERVER: &str = r#"
import hashlib, random, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.2.1", 5300)); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
rng = random.Random(9); g = hashlib.sha256(); m = 0
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    b = rng.randbytes(1 << 20); c.sendall(b); g.update(b); m += len(b)
c.close()
print(n, h.hexdigest(), m, g.hexdigest())
"#;

const CLIENT: &str = r#"
import hashlib, random, socket, time
rng = random.Random(7); h = hashlib.sha256(); n = 0
c = socket.socket()
for _ in range(50):
    try:
        c.connect(("198.18.2.1", 5300)); break
    except OSError:
        time.sleep(0.1)
for i in range(24):
    b = rng.randbytes(1 << 19) if i % 2 else (b"tern %d " % i) * 80000
    c.sendall(b); h.update(b); n += len(b)
c.shutdown(socket.SHUT_WR)
g = hashlib.sha256(); m = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    g.update(b); m += len(b)
print(n, h.hexdigest(), m, g.hexdigest())
"#;

/// Runs the client/server pair once and returns (client line, server line).
fn transfer() -> (String, String) {
    let server = python_in("tern-b", SERVER)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let client = python_in("tern-a", CLIENT).output().unwrap();
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let server = server.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&client.stdout).trim().to_string(),
        String::from_utf8_lossy(&server.stdout).trim().to_string(),
    )
}

#[test]
fn accelerated_tcp_is_intact_both_ways_and_resets_map() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&[
        "lab", "up", "--rate", "100mbit", "--rtt", "20ms", "--loss", "0.5%", "--jitter", "1ms",
        "--accel",
    ]);
    let st: Value = serde_json::from_str(&ok(&["lab", "status", "--json"])).unwrap();
    assert_eq!(st["nodes"].as_array().map(|n| n.len()), Some(2), "{st}");

    // Data in both directions, FIN in both directions, byte for byte.
    let (client, server) = transfer();
    let c: Vec<&str> = client.split_whitespace().collect();
    let s: Vec<&str> = server.split_whitespace().collect();
    assert_eq!(c.len(), 4, "client said {client:?}");
    assert_eq!(s.len(), 4, "server said {server:?}");
    assert_eq!(c[0..2], s[0..2], "A->B bytes differ");
    assert_eq!(c[2..4], s[2..4], "B->A bytes differ");
    assert_eq!(s[2], (8u64 << 20).to_string());

    // It went through tern: node A terminated the connection and sent it compressed/encrypted.
    let a = node_status("a");
    assert!(a["flows"]["opened"].as_u64().unwrap() >= 1, "{a}");
    let t = &a["peers"][0]["transport"];
    let sent: u64 = c[0].parse().unwrap();
    assert!(t["stream_bytes_sent"].as_u64().unwrap() > 0, "{a}");
    assert!(a["flows"]["tcp_bytes_in"].as_u64().unwrap() >= sent, "{a}");

    // A connection to a closed port at the far site is refused: the client sees a reset.
    let refused = python_in(
        "tern-a",
        r#"
import socket, sys
c = socket.socket(); c.settimeout(10)
try:
    c.connect(("198.18.2.1", 5999))
    c.sendall(b"hello")
    r = c.recv(10)
    print("eof" if r == b"" else "data")
except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
    print("reset")
"#,
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&refused.stdout).trim(), "reset");
    let b = node_status("b");
    assert!(b["flows"]["connect_failed"].as_u64().unwrap() >= 1, "{b}");
    ok(&["lab", "down"]);
}

#[test]
fn wrong_key_cannot_connect_and_a_udp_flood_only_moves_drop_counters() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--rate", "100mbit", "--rtt", "10ms", "--accel"]);
    let st: Value = serde_json::from_str(&ok(&["lab", "status", "--json"])).unwrap();
    let b_key = st["nodes"][1]["public_key"].as_str().unwrap().to_string();

    // A rogue node in site A with its own fresh key, pointing at B with B's real public key.
    let dir = "/run/tern/lab/rogue";
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let key = format!("{dir}/rogue.key");
    ok(&["keygen", "--out", &key]);
    let cfg = format!("{dir}/rogue.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"rogue\"\nprivate_key_file = \"{key}\"\nlisten = \"198.18.1.1:7410\"\n\
             control = \"{dir}/rogue.sock\"\n\n[[peer]]\nname = \"b\"\npublic_key = \"{b_key}\"\n\
             address = \"198.18.2.1:7400\"\n"
        ),
    )
    .unwrap();
    let mut rogue = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tern-a",
            env!("CARGO_BIN_EXE_tern"),
            "node",
            "run",
            "--config",
            &cfg,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let r: Value = serde_json::from_str(&ok(&[
        "node",
        "status",
        "--socket",
        &format!("{dir}/rogue.sock"),
        "--json",
    ]))
    .unwrap();
    let _ = rogue.kill();
    let _ = rogue.wait();
    assert_eq!(r["peers"][0]["connected"], false, "{r}");
    let b = node_status("b");
    assert!(
        b["endpoint"]["handshakes_unknown_key"].as_u64().unwrap() >= 1,
        "{b}"
    );
    assert_eq!(b["peers"][0]["connected"], true, "{b}");

    // A flood of random datagrams, some with valid-looking type bytes, at B's port.
    let before = node_status("b");
    let flood = python_in(
        "tern-a",
        r#"
import random, socket
rng = random.Random(3); s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(20000):
    n = rng.randrange(0, 1400)
    b = bytes([rng.choice([1, 2, 3, rng.randrange(256)])]) + rng.randbytes(n)
    s.sendto(b, ("198.18.2.1", 7400))
"#,
    )
    .output()
    .unwrap();
    assert!(flood.status.success());
    // The emulated link drops part of the flood (queue overflow); what reaches the node
    // must all land in drop counters.
    std::thread::sleep(Duration::from_secs(1));
    let after = node_status("b");
    let e0 = &before["endpoint"];
    let e1 = &after["endpoint"];
    let drops = |e: &Value| {
        [
            "dropped_malformed",
            "dropped_unknown_session",
            "handshakes_rejected",
            "handshakes_rate_limited",
            // Protocol 6: random inits fail mac1 before any other check.
            "handshakes_bad_mac1",
            "handshakes_source_limited",
        ]
        .iter()
        .map(|k| e[k].as_u64().unwrap())
        .sum::<u64>()
    };
    let received =
        e1["datagrams_received"].as_u64().unwrap() - e0["datagrams_received"].as_u64().unwrap();
    let dropped = drops(e1) - drops(e0);
    assert!(
        received >= 1_000,
        "flood did not arrive: before {e0}, after {e1}"
    );
    // Everything but the peer's own few packets (ACKs, keepalives) was dropped and counted.
    assert!(dropped + 200 >= received, "before {e0}, after {e1}");
    assert_eq!(
        e1["handshakes_completed"], e0["handshakes_completed"],
        "{e1}"
    );
    assert_eq!(after["peers"][0]["connected"], true, "{after}");
    // And the accelerated path still carries data intact.
    let (client, server) = transfer();
    assert_eq!(client, server);
    ok(&["lab", "down"]);
}

/// A peer with a valid key is still only granted what B's config allows: site A's node,
/// restarted with port forwards of its own choosing, cannot reach B's loopback (B's metrics
/// port) through B's relay, while a target inside B's `tcp_targets` still works; and A's own
/// relay refuses a target that is not a migration or replication socket (QMP).
#[test]
fn a_peer_reaches_only_what_it_is_granted() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--rate", "100mbit", "--rtt", "10ms", "--accel"]);
    let st: Value = serde_json::from_str(&ok(&["lab", "status", "--json"])).unwrap();
    let a_pid = st["nodes"][0]["pid"].as_u64().unwrap() as i32;
    // SAFETY: a plain kill(2) of the lab's node A, which the lab started.
    unsafe { libc::kill(a_pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    let cfg = std::fs::read_to_string("/run/tern/lab/node-a.toml").unwrap();
    let hostile = format!(
        "{cfg}\n[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"site-b\"\ntarget = \"127.0.0.1:9464\"\n\
         \n[[forward]]\nlisten = \"127.0.0.1:9001\"\npeer = \"site-b\"\ntarget = \"198.18.2.1:5300\"\n"
    );
    let path = "/run/tern/lab/node-a-hostile.toml";
    std::fs::write(path, hostile).unwrap();
    let mut node = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tern-a",
            env!("CARGO_BIN_EXE_tern"),
            "node",
            "run",
            "--config",
            path,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let connected = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        peer_connected("a")
    });
    assert!(connected, "node A did not reconnect to B");
    let before = node_status("b")["flows"]["refused_by_policy"]
        .as_u64()
        .unwrap();

    // B's loopback metrics port through B's relay: reset, no HTTP reply.
    let probe = python_in(
        "tern-a",
        r#"
import socket
c = socket.create_connection(("127.0.0.1", 9000), timeout=10)
try:
    c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    r = c.recv(100)
    print("data" if r else "eof")
except (ConnectionResetError, BrokenPipeError):
    print("reset")
"#,
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    assert!(
        said == "reset" || said == "eof",
        "B's relay answered: {said}"
    );
    let after = node_status("b")["flows"]["refused_by_policy"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "B did not count a refusal ({before} -> {after})"
    );

    // A granted target still works through the same peer.
    let server = python_in(
        "tern-b",
        r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.2.1", 5300)); s.listen(1); c, _ = s.accept(); c.sendall(c.recv(100)); c.close()
"#,
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let echo = python_in(
        "tern-a",
        r#"
import socket
c = socket.create_connection(("127.0.0.1", 9001), timeout=10); c.sendall(b"granted")
print(c.recv(100).decode())
"#,
    )
    .output()
    .unwrap();
    let _ = server.wait_with_output();
    assert_eq!(String::from_utf8_lossy(&echo.stdout).trim(), "granted");

    // A's relay (a local request, as `tern migrate` sends) refuses a QMP socket as a target.
    let err = tern_node::open::connect_relay(
        std::path::Path::new("/run/tern/lab/migrate-a.sock"),
        "site-b",
        "vm1/b/qmp.sock",
        0,
    )
    .unwrap_err();
    assert!(err.contains("neither a migration socket"), "{err}");

    // A request A's relay lets through by name (`incoming.sock`) that is, at B, a symlink
    // to a VM's QMP socket: B itself refuses it, and nothing reaches the QMP socket.
    let vmdir = std::path::Path::new("/run/tern/vm/tern-test-qmp/b");
    let _ = std::fs::remove_dir_all(vmdir);
    std::fs::create_dir_all(vmdir).unwrap();
    let qmp = std::os::unix::net::UnixListener::bind(vmdir.join("qmp.sock")).unwrap();
    qmp.set_nonblocking(true).unwrap();
    std::os::unix::fs::symlink("qmp.sock", vmdir.join("incoming.sock")).unwrap();
    let before = node_status("b")["flows"]["refused_by_policy"]
        .as_u64()
        .unwrap();
    let relayed = tern_node::open::connect_relay(
        std::path::Path::new("/run/tern/lab/migrate-a.sock"),
        "site-b",
        "tern-test-qmp/b/incoming.sock",
        0,
    );
    if let Ok(mut c) = relayed {
        use std::io::{Read, Write};
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(b"{\"execute\": \"qmp_capabilities\"}\n");
        let mut buf = [0u8; 64];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "the far node answered a relayed stream to a QMP socket"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        qmp.accept().is_err(),
        "a relayed stream reached the QMP socket"
    );
    let after = node_status("b")["flows"]["refused_by_policy"]
        .as_u64()
        .unwrap();
    assert!(after > before, "B counted no refusal ({before} -> {after})");
    let _ = std::fs::remove_dir_all("/run/tern/vm/tern-test-qmp");

    let _ = node.kill();
    let _ = node.wait();
    ok(&["lab", "down"]);
}

/// Restarts the lab's node A (same config, key and address): kill, start, wait until it is
/// connected to B again; returns the new process and the seconds it took to connect.
fn restart_node_a(pid: i32) -> (std::process::Child, f64) {
    // SAFETY: a plain kill(2) of node A, which the lab (or this test) started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let node = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tern-a",
            env!("CARGO_BIN_EXE_tern"),
            "node",
            "run",
            "--config",
            "/run/tern/lab/node-a.toml",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let connected = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let out = common::tern(&[
            "node",
            "status",
            "--socket",
            "/run/tern/lab/node-a.sock",
            "--json",
        ]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|s| s["peers"][0]["connected"] == true)
    });
    assert!(connected, "node A did not reconnect within 10 s");
    (node, start.elapsed().as_secs_f64())
}

/// The real lab's half of the handshake defences (issue 25): a captured initiation replayed
/// from another address during a transfer neither resets the session nor moves B's idea of
/// A's address; and 1,000 junk initiations a second do not keep a restarted A from
/// reconnecting within a few seconds.
#[test]
fn replayed_and_junk_initiations_neither_reset_a_flow_nor_starve_a_reconnect() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--rate", "100mbit", "--rtt", "10ms", "--accel"]);
    let st: Value = serde_json::from_str(&ok(&["lab", "status", "--json"])).unwrap();
    let a_pid = st["nodes"][0]["pid"].as_u64().unwrap() as i32;

    // Capture the initiation a restarted node A sends (IP packets on B's WAN device).
    let capture = python_in(
        "tern-b",
        r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind(("wan0", 0)); s.settimeout(15)
while True:
    p = s.recv(4096)
    ihl = (p[0] & 15) * 4
    if p[9] != 17: continue
    dport = int.from_bytes(p[ihl + 2:ihl + 4], "big")
    payload = p[ihl + 8:]
    if dport == 7400 and payload[:1] == b"\x01":
        print(payload.hex(), flush=True); break
"#,
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (node, _) = restart_node_a(a_pid);
    let init = capture.wait_with_output().unwrap();
    let init_hex = String::from_utf8_lossy(&init.stdout).trim().to_string();
    assert!(init_hex.len() > 100, "no initiation captured: {init_hex:?}");

    // Replay it from another port of site A, 20 times, while a transfer runs.
    let before = node_status("b");
    let replayer = python_in(
        "tern-a",
        &format!(
            "import socket, time\ninit = bytes.fromhex('{init_hex}')\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('198.18.1.1', 7499))\n\
             for _ in range(20):\n    s.sendto(init, ('198.18.2.1', 7400)); time.sleep(0.1)\n"
        ),
    )
    .spawn()
    .unwrap();
    let (client, server) = transfer();
    replayer.wait_with_output().unwrap();
    assert_eq!(client, server, "the transfer during the replays differs");
    let after = node_status("b");
    let e0 = &before["endpoint"];
    let e1 = &after["endpoint"];
    assert!(
        e1["handshakes_replayed"].as_u64().unwrap() > e0["handshakes_replayed"].as_u64().unwrap(),
        "the replays were not recognized: {e1}"
    );
    assert_eq!(e1["sessions_confirmed"], e0["sessions_confirmed"], "{e1}");
    assert_eq!(after["peers"][0]["connected"], true, "{after}");
    assert_eq!(after["peers"][0]["address"], "198.18.1.1:7400", "{after}");

    // 1,000 junk initiations a second from many ports of site A, while A restarts.
    let flood = python_in(
        "tern-a",
        r#"
import os, random, socket, time
rng = random.Random(5)
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
end = time.monotonic() + 8
while time.monotonic() < end:
    t = time.monotonic()
    for i in range(100):
        n = rng.choice([3, 140, 172, rng.randrange(1, 400)])
        rng.choice(socks).sendto(b"\x01" + os.urandom(n - 1), ("198.18.2.1", 7400))
    time.sleep(max(0, 0.1 - (time.monotonic() - t)))
"#,
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let node_pid = node.id() as i32;
    // The `ip netns exec` wrapper execs tern, so its pid is node A's.
    let (mut node, took) = restart_node_a(node_pid);
    let flood_out = flood.wait_with_output().unwrap();
    assert!(flood_out.status.success());
    let b = node_status("b");
    assert!(
        b["endpoint"]["handshakes_bad_mac1"].as_u64().unwrap() >= 1_000,
        "the flood did not arrive: {b}"
    );
    assert!(
        took < 5.0,
        "node A took {took:.1} s to reconnect through the flood"
    );
    let (client, server) = transfer();
    assert_eq!(client, server);
    let _ = node.kill();
    let _ = node.wait();
    ok(&["lab", "down"]);
}
