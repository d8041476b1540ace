//! End-to-end tests of `tern lab`: the real binary, real namespaces, TUN devices, ping,
//! iperf3 and tcpdump. They need root (as in CI); elsewhere they say so and skip, unless
//! CI=true, where not being root is a failure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{is_root, json, lock, ok, tern};
use serde_json::Value;

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// RTTs in ms of `count` pings from site A to site B.
fn ping_ms(count: u32) -> Vec<f64> {
    ping_from("tern-a", "198.18.2.1", count)
}

/// RTTs in ms of the replies to `count` pings from namespace `ns` to `to` (1 s timeout).
fn ping_from(ns: &str, to: &str, count: u32) -> Vec<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            to,
        ])
        .output()
        .expect("ping");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn a_to_b(stats: &Value) -> &Value {
    &stats["a_to_b"]["stats"]
}

#[test]
fn lab_lifecycle_status_stats_and_live_changes() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--profile", "mpls"]);
    assert!(netns_exists("tern-a") && netns_exists("tern-b"));

    let st = json(&["lab", "status", "--json"]);
    assert_eq!(st["up"], true);
    assert_eq!(st["profile"], "mpls");
    assert_eq!(st["sites"][0]["netns"], "tern-a");
    assert_eq!(st["sites"][0]["address"], "198.18.1.1");
    assert_eq!(st["sites"][1]["address"], "198.18.2.1");
    assert_eq!(st["a_to_b"]["rate_bps"], 100_000_000);
    assert_eq!(st["a_to_b"]["delay_us"], 12_500);
    assert_eq!(st["a_to_b"]["jitter_us"], 3_000);
    // The lab as a cluster file, what tern vm / migrate / protect read.
    let c = tern_cluster::Cluster::read(std::path::Path::new(tern_cluster::LAB_PATH)).unwrap();
    assert_eq!(c.site_names(), ["a", "b"]);
    let b = c.site("b").unwrap();
    assert_eq!(b.netns.as_deref(), Some("tern-b"));
    assert_eq!(b.address.to_string(), "198.18.2.1");
    assert!(b.control.exists() && b.migrate.exists(), "{b:?}");
    assert_eq!(c.profile.as_deref(), Some("mpls"));

    // Traffic crosses only through the emulator, with its delay (25 ms ± 6 ms of jitter).
    let rtts = ping_ms(10);
    assert!(rtts.len() >= 8, "{rtts:?}");
    assert!(rtts.iter().all(|r| (18.0..40.0).contains(r)), "{rtts:?}");
    let stats = json(&["lab", "stats", "--json"]);
    assert!(a_to_b(&stats)["forwarded_packets"].as_u64().unwrap() >= 8);
    assert!(
        stats["b_to_a"]["stats"]["forwarded_packets"]
            .as_u64()
            .unwrap()
            >= 8
    );
    assert!(a_to_b(&stats)["sojourn"]["p50_us"].as_u64().unwrap() >= 8_000);

    // Live change of both directions, then of one.
    ok(&["lab", "set", "--rtt", "100ms", "--jitter", "0"]);
    let rtts = ping_ms(5);
    assert!(rtts.iter().all(|r| (99.0..110.0).contains(r)), "{rtts:?}");
    ok(&["lab", "set", "--direction", "b-to-a", "--rate", "10mbit"]);
    let st = json(&["lab", "status", "--json"]);
    assert_eq!(st["a_to_b"]["rate_bps"], 100_000_000);
    assert_eq!(st["b_to_a"]["rate_bps"], 10_000_000);
    assert_eq!(st["a_to_b"]["delay_us"], 50_000);

    // A second `up` is refused while the lab runs.
    let out = tern(&["lab", "up", "--profile", "baseline"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already up"));

    ok(&["lab", "down"]);
    assert!(!netns_exists("tern-a") && !netns_exists("tern-b"));
    assert!(
        !std::path::Path::new(tern_cluster::LAB_PATH).exists(),
        "lab down leaves its cluster file"
    );
    assert_eq!(json(&["lab", "status", "--json"])["up"], false);
    ok(&["lab", "down"]); // idempotent
}

#[test]
fn bad_input_gets_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["lab", "up", "--profile", "moon"],
            "no profile named \"moon\"",
        ),
        (&["lab", "up", "--rate", "fast"], "malformed rate"),
        (&["lab", "up", "--loss", "5"], "malformed percentage"),
        (&["lab", "up", "--rtt", "25"], "malformed duration"),
        (&["lab", "up", "--loss", "150%"], "out of range"),
        (&["lab", "exec", "z", "true"], "no site"),
    ];
    for (args, want) in cases {
        let out = tern(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    let out = tern(&["lab", "stats"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lab is up"));
}

#[test]
fn a_crashed_emulator_is_cleaned_up() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--profile", "baseline"]);
    let pid = json(&["lab", "status", "--json"])["emulator_pid"]
        .as_i64()
        .unwrap();
    // SAFETY: kill with the pid of the emulator this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    let st = json(&["lab", "status", "--json"]);
    assert_eq!(st["up"], false);
    assert_eq!(st["emulator_alive"], false);
    // `up` over the wreckage works, and so does `down`.
    ok(&["lab", "up", "--profile", "sonet"]);
    assert!(!ping_ms(3).is_empty());
    ok(&["lab", "down"]);
    assert!(!netns_exists("tern-a"));
}

#[test]
fn reconfiguration_keeps_queued_packets() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    // 2 Mbit/s with room for 1000 packets: a 1 s burst at 8 Mbit/s queues most of it.
    ok(&[
        "lab", "up", "--rate", "2mbit", "--rtt", "10ms", "--queue", "1000",
    ]);
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tern-b",
            "iperf3",
            "-s",
            "-1",
            "-B",
            "198.18.2.1",
            "-p",
            "5299",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tern-a",
            "iperf3",
            "-c",
            "198.18.2.1",
            "-p",
            "5299",
            "-u",
            "-b",
            "8M",
            "-l",
            "1000",
            "-t",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_400));
    let before = json(&["lab", "stats", "--json"]);
    let queued = a_to_b(&before)["queued_packets"].as_u64().unwrap();
    assert!(queued > 100, "expected a standing queue, got {queued}");
    ok(&["lab", "set", "--rate", "1gbit"]);
    std::thread::sleep(Duration::from_millis(500));
    let after = json(&["lab", "stats", "--json"]);
    let s = a_to_b(&after);
    assert_eq!(s["queued_packets"], 0);
    assert_eq!(
        s["queue_drop_packets"],
        a_to_b(&before)["queue_drop_packets"],
        "the change dropped queued packets"
    );
    let offered = s["offered_packets"].as_u64().unwrap();
    let accounted = s["forwarded_packets"].as_u64().unwrap()
        + s["queue_drop_packets"].as_u64().unwrap()
        + s["random_drop_packets"].as_u64().unwrap()
        + s["in_flight_packets"].as_u64().unwrap();
    assert_eq!(offered, accounted);
    let _ = srv.kill();
    let _ = srv.wait();
    let _ = client.wait();
    ok(&["lab", "down"]);
}

#[test]
fn pcap_capture_of_both_sides_reads_back_with_tcpdump() {
    if !is_root() {
        return;
    }
    let _g = lock();
    let dir = std::env::temp_dir().join(format!("tern-pcap-test-{}", std::process::id()));
    ok(&["lab", "down"]);
    ok(&[
        "lab",
        "up",
        "--profile",
        "ll-metro",
        "--pcap-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(ping_ms(4).len(), 4);
    // Stats flush the capture buffers.
    json(&["lab", "stats", "--json"]);
    for f in [
        "a-to-b.ingress",
        "a-to-b.egress",
        "b-to-a.ingress",
        "b-to-a.egress",
    ] {
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(dir.join(format!("{f}.pcap")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let icmp = text.lines().filter(|l| l.contains("ICMP")).count();
        assert_eq!(icmp, 4, "{f}: {text}");
    }
    ok(&["lab", "down"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Bytes crossing the link over TCP arrive intact. The emulator merges TCP trains into GSO
/// writes whose checksum the receiving stack trusts, so a merge bug would corrupt data
/// silently: compare hashes end to end, with loss and reordering-free jitter on the link.
#[test]
fn tcp_data_survives_the_link_byte_for_byte() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&[
        "lab", "up", "--rate", "500mbit", "--rtt", "4ms", "--loss", "0.2%", "--jitter", "1ms",
    ]);
    const SERVER: &str = r#"
import hashlib, socket
s = socket.socket(); s.bind(("198.18.2.1", 5300)); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest())
"#;
    const CLIENT: &str = r#"
import hashlib, random, socket, time
rng = random.Random(7); h = hashlib.sha256(); n = 0
c = socket.socket(); c.setsockopt(socket.IPPROTO_TCP, 13, b"cubic")
for _ in range(50):
    try:
        c.connect(("198.18.2.1", 5300)); break
    except OSError:
        time.sleep(0.1)
for i in range(40):
    # Text-like and random blocks, so merged payloads differ from one another.
    b = rng.randbytes(1 << 19) if i % 2 else (b"tern %d " % i) * 80000
    c.sendall(b); h.update(b); n += len(b)
c.close()
print(n, h.hexdigest())
"#;
    let server = Command::new("ip")
        .args(["netns", "exec", "tern-b", "python3", "-c", SERVER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let client = Command::new("ip")
        .args(["netns", "exec", "tern-a", "python3", "-c", CLIENT])
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let server = server.wait_with_output().unwrap();
    let sent = String::from_utf8_lossy(&client.stdout).trim().to_string();
    let got = String::from_utf8_lossy(&server.stdout).trim().to_string();
    let bytes: u64 = sent
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(bytes > 20_000_000, "unexpected byte count: {sent}");
    assert_eq!(sent, got);
    let stats = json(&["lab", "stats", "--json"]);
    let d = &stats["a_to_b"]["driver"];
    assert_eq!(d["write_errors"], 0);
    assert!(
        d["merged_writes"].as_u64().unwrap() > 0,
        "no GSO merges happened: {d}"
    );
    assert!(a_to_b(&stats)["random_drop_packets"].as_u64().unwrap() > 0);
    ok(&["lab", "down"]);
}

/// Pings from the client site to `to`; replies received.
fn ping_from_c(to: &str, count: u32) -> usize {
    ping_from("tern-c", to, count).len()
}

#[test]
fn the_client_site_reaches_both_sites_over_its_own_links() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    ok(&["lab", "up", "--profile", "dr-50", "--client-site"]);
    assert!(netns_exists("tern-c"));
    let st = json(&["lab", "status", "--json"]);
    assert!(
        st["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "c"),
        "{st}"
    );
    assert_eq!(ping_from_c("198.18.1.1", 5), 5, "c to a");
    assert_eq!(ping_from_c("198.18.2.1", 5), 5, "c to b");
    // Links are separate: cutting c-a leaves c-b and a-b alone.
    ok(&["lab", "set", "--link", "c-a", "--loss", "100%"]);
    assert_eq!(ping_from_c("198.18.1.1", 3), 0, "c-a is cut");
    assert_eq!(ping_from_c("198.18.2.1", 3), 3, "c-b still up");
    assert!(!ping_ms(3).is_empty(), "a-b still up");
    let out = tern(&["lab", "set", "--link", "c-x", "--loss", "0%"]);
    assert!(!out.status.success());
    ok(&["lab", "down"]);
    assert!(!netns_exists("tern-c"));
    // Without --client-site there is no c.
    ok(&["lab", "up", "--profile", "baseline"]);
    assert!(!netns_exists("tern-c"));
    let out = tern(&["lab", "set", "--link", "c-a", "--loss", "1%"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("client-site"));
    ok(&["lab", "down"]);
}
