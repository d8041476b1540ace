//! `tern bench mgmt`: does a crowd of idle management clients stall the data path?
//!
//! One accelerated iperf3 flow from site A to site B (`tern lab up --profile P --accel`),
//! measured in alternating pairs of runs: alone, and with `--idle` idle TCP connections to
//! node A's metrics port plus `--idle` idle connections to its control socket, opened
//! `--open-after` seconds into the flow and held to its end, during which one metrics fetch
//! and one `tern node status` are timed. The target (issue 25/26): goodput with the idle
//! connections ≥ 95 % of without. Before the management thread (`tern-node/src/mgmt.rs`),
//! 30 such connections on `sonet` stopped the flow for 6 s.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{BenchError, tools};

#[derive(Debug, Clone)]
pub struct MgmtBenchOptions {
    pub profile: String,
    pub seconds: u32,
    pub rounds: u32,
    pub idle: u32,
    pub open_after_s: f64,
    pub out_dir: PathBuf,
    pub tern_exe: PathBuf,
    pub command: String,
}

const SITE_A: &str = "tern-a";
const SITE_B: &str = "tern-b";
const ADDR_B: &str = "198.18.2.1";
const IPERF_PORT: u16 = 5201;
const METRICS: &str = "127.0.0.1:9464";
const CONTROL: &str = "/run/tern/lab/node-a.sock";

/// The idle crowd, run inside site A: waits, opens the connections, times one metrics fetch
/// and one status request behind them, prints both times as JSON and holds the connections
/// until it is killed.
const CROWD: &str = r#"
import json, socket, sys, time
n, wait, metrics, control = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
host, port = metrics.split(":")
time.sleep(wait)
idle, refused = [], 0
for _ in range(n):
    for make in (lambda: socket.create_connection((host, int(port)), timeout=5),
                 lambda: socket.socket(socket.AF_UNIX)):
        try:
            s = make()
            if s.family == socket.AF_UNIX:
                s.settimeout(5); s.connect(control)
            idle.append(s)
        except OSError:
            refused += 1
def timed(f):
    t = time.monotonic()
    try:
        ok = f()
    except OSError:
        ok = False
    return time.monotonic() - t, ok
def fetch_metrics():
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n"); b = b""
    while True:
        c = s.recv(65536)
        if not c: break
        b += c
    return b.startswith(b"HTTP/1.0 200")
def fetch_status():
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(control)
    s.sendall(b"status\n"); b = b""
    while True:
        c = s.recv(65536)
        if not c: break
        b += c
    return b.startswith(b"{")
m, mok = timed(fetch_metrics)
c, cok = timed(fetch_status)
print(json.dumps({"opened": len(idle), "refused": refused, "metrics_s": m, "metrics_ok": mok,
                  "status_s": c, "status_ok": cok}), flush=True)
time.sleep(3600)
"#;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn run_tern(exe: &Path, args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run tern {}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Failed {
            tool: "tern",
            detail: format!(
                "`tern {}`: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// One iperf3 run through the accelerator; with `crowd`, the idle connections join it.
fn one_run(o: &MgmtBenchOptions, crowd: bool) -> Result<Value, BenchError> {
    let mut server = tern_lab::netns_command(SITE_B, "iperf3")
        .args(["-s", "-1", "-B", ADDR_B, "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start iperf3 server"))?;
    std::thread::sleep(Duration::from_millis(300));
    let mut helper = if crowd {
        Some(
            tern_lab::netns_command(SITE_A, "python3")
                .args(["-c", CROWD])
                .args([
                    o.idle.to_string(),
                    o.open_after_s.to_string(),
                    METRICS.to_string(),
                    CONTROL.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(io("start the idle clients"))?,
        )
    } else {
        None
    };
    let secs = o.seconds.to_string();
    let report = tools::iperf3_client(
        SITE_A,
        &[
            "-c",
            ADDR_B,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs,
            "-C",
            "bbr",
            "-F",
            crate::accel::RANDOM_PAYLOAD,
            "--connect-timeout",
            "10000",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    let mut crowd_report = Value::Null;
    if let Some(mut h) = helper.take() {
        let _ = h.kill();
        let out = h
            .wait_with_output()
            .map_err(io("wait for the idle clients"))?;
        crowd_report = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
    }
    let report = report?;
    let intervals: Vec<f64> = report["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                .map(|b| b / 1e6)
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "goodput_mbit": tools::tcp_goodput_bps(&report) / 1e6,
        "min_interval_mbit": intervals.iter().cloned().fold(f64::INFINITY, f64::min),
        "intervals_mbit": intervals,
        "crowd": crowd_report,
    }))
}

pub fn run(o: &MgmtBenchOptions) -> Result<Value, BenchError> {
    let exe = o.tern_exe.as_path();
    // iperf3's own payload is one 128 KiB buffer repeated, which tern's zstd would remove.
    crate::accel::ensure_random_payload(
        Path::new(crate::accel::RANDOM_PAYLOAD),
        crate::accel::random_payload_bytes(o.seconds),
    )?;
    let _ = run_tern(exe, &["lab", "down"]);
    run_tern(exe, &["lab", "up", "--profile", &o.profile, "--accel"])?;
    let result = (|| {
        let mut alone = Vec::new();
        let mut crowded = Vec::new();
        for round in 0..o.rounds {
            // Alternate which goes first, so a drift of the machine falls on both.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for crowd in order {
                let r = one_run(o, crowd)?;
                eprintln!(
                    "  round {} {}: {:.1} Mbit/s (lowest second {:.1}){}",
                    round + 1,
                    if crowd { "with idle clients" } else { "alone" },
                    r["goodput_mbit"].as_f64().unwrap_or(0.0),
                    r["min_interval_mbit"].as_f64().unwrap_or(0.0),
                    if crowd {
                        format!(
                            ", metrics fetch {:.3} s, status {:.3} s",
                            r["crowd"]["metrics_s"].as_f64().unwrap_or(f64::NAN),
                            r["crowd"]["status_s"].as_f64().unwrap_or(f64::NAN)
                        )
                    } else {
                        String::new()
                    }
                );
                if crowd {
                    crowded.push(r);
                } else {
                    alone.push(r);
                }
            }
        }
        Ok::<_, BenchError>((alone, crowded))
    })();
    let _ = run_tern(exe, &["lab", "down"]);
    let (alone, crowded) = result?;
    let mean = |v: &[Value]| {
        v.iter()
            .filter_map(|r| r["goodput_mbit"].as_f64())
            .sum::<f64>()
            / v.len().max(1) as f64
    };
    let (a, c) = (mean(&alone), mean(&crowded));
    let ratio = if a > 0.0 { c / a } else { 0.0 };
    let worst_fetch = crowded
        .iter()
        .filter_map(|r| r["crowd"]["metrics_s"].as_f64())
        .fold(0.0, f64::max);
    let worst_status = crowded
        .iter()
        .filter_map(|r| r["crowd"]["status_s"].as_f64())
        .fold(0.0, f64::max);
    let all_ok = crowded
        .iter()
        .all(|r| r["crowd"]["metrics_ok"] == true && r["crowd"]["status_ok"] == true);
    let value = json!({
        "command": o.command,
        "machine": crate::machine(),
        "profile": o.profile,
        "seconds": o.seconds,
        "rounds": o.rounds,
        "idle_per_surface": o.idle,
        "open_after_s": o.open_after_s,
        "alone": alone,
        "with_idle": crowded,
        "mean_alone_mbit": a,
        "mean_with_idle_mbit": c,
        "ratio": ratio,
        "worst_metrics_fetch_s": worst_fetch,
        "worst_status_s": worst_status,
        "requests_answered": all_ok,
        "target": {"ratio_at_least": 0.95, "met": ratio >= 0.95 && all_ok},
    });
    let row = |name: &str, v: &[Value]| {
        let cells: Vec<String> = v
            .iter()
            .map(|r| format!("{:.1}", r["goodput_mbit"].as_f64().unwrap_or(0.0)))
            .collect();
        format!("| {name} | {} | {:.1} |\n", cells.join(" / "), mean(v))
    };
    let md = format!(
        "# Idle management connections during an accelerated flow\n\n\
         `{}`\n\n\
         One iperf3 flow of incompressible bytes (`-C bbr -F {}`, as `tern bench accel` runs \
         tern) on `{}` for {} s; with idle \
         clients, {} idle TCP connections to node A's metrics port and {} to its control \
         socket open {:.1} s into the flow and stay to its end.\n\n\
         | run | goodput per round (Mbit/s) | mean |\n|---|---|---|\n{}{}\n\
         **with idle / alone = {:.3}** (target ≥ 0.95: {}). Slowest metrics fetch behind the \
         idle connections {:.3} s, slowest `status` {:.3} s; every request answered: {}.\n",
        o.command,
        crate::accel::RANDOM_PAYLOAD,
        o.profile,
        o.seconds,
        o.idle,
        o.idle,
        o.open_after_s,
        row("alone", &alone),
        row("with idle clients", &crowded),
        ratio,
        if ratio >= 0.95 { "met" } else { "not met" },
        worst_fetch,
        worst_status,
        all_ok,
    );
    crate::write_results(&o.out_dir, "mgmt", &value, &md)?;
    print!("{md}");
    Ok(value)
}
