//! `tern bench rekey`: does updating the session keys cost goodput?
//!
//! One accelerated iperf3 flow from site A to site B (`tern lab up --profile P --accel`),
//! in alternating pairs of labs: nodes with the transport's own key-update limit (2^22
//! packets or 120 s: a 30 s flow on `sonet` sees no update), and nodes that update each
//! direction's key every `--rekey-after-packets` packets (65,536 by default: an update
//! every ~0.7 s at 1 Gbit/s). The target (issue 25 defect 3): goodput with frequent key
//! updates ≥ 0.97 of without (the spread of repeated runs of one configuration), and the
//! updates really happened (node A's `key_updates_sent`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{BenchError, tools};

#[derive(Debug, Clone)]
pub struct RekeyBenchOptions {
    pub profile: String,
    pub seconds: u32,
    pub rounds: u32,
    pub rekey_after_packets: u64,
    pub out_dir: PathBuf,
    pub tern_exe: PathBuf,
    pub command: String,
}

const SITE_A: &str = "tern-a";
const SITE_B: &str = "tern-b";
const ADDR_B: &str = "198.18.2.1";
const IPERF_PORT: u16 = 5201;
const CONTROL_A: &str = "/run/tern/lab/node-a.sock";
/// Goodput with frequent key updates over goodput without, at least.
pub const TARGET_RATIO: f64 = 0.97;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn tern(exe: &Path, args: &[&str]) -> Result<Vec<u8>, BenchError> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run tern {}", args.join(" "))))?;
    if out.status.success() {
        Ok(out.stdout)
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

/// Node A's key updates sent to its peer so far.
fn key_updates(exe: &Path) -> Result<u64, BenchError> {
    let out = tern(exe, &["node", "status", "--socket", CONTROL_A, "--json"])?;
    let v: Value = serde_json::from_slice(&out).map_err(|e| BenchError::Failed {
        tool: "tern",
        detail: format!("node status: {e}"),
    })?;
    Ok(v["peers"][0]["transport"]["key_updates_sent"]
        .as_u64()
        .unwrap_or(0))
}

/// A lab whose nodes update keys every `rekey` packets (None: the default), one flow.
fn one_run(o: &RekeyBenchOptions, rekey: Option<u64>) -> Result<Value, BenchError> {
    let exe = o.tern_exe.as_path();
    let _ = tern(exe, &["lab", "down"]);
    let n = rekey.map(|n| n.to_string());
    let mut up = vec!["lab", "up", "--profile", &o.profile, "--accel"];
    if let Some(n) = &n {
        up.extend(["--rekey-after-packets", n]);
    }
    tern(exe, &up)?;
    let result = (|| {
        let before = key_updates(exe)?;
        let mut server = tools_server()?;
        std::thread::sleep(Duration::from_millis(300));
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
        let report = report?;
        let updates = key_updates(exe)?.saturating_sub(before);
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
            "rekey_after_packets": rekey,
            "goodput_mbit": tools::tcp_goodput_bps(&report) / 1e6,
            "min_interval_mbit": intervals.iter().cloned().fold(f64::INFINITY, f64::min),
            "key_updates_sent": updates,
        }))
    })();
    let _ = tern(exe, &["lab", "down"]);
    result
}

fn tools_server() -> Result<std::process::Child, BenchError> {
    tern_lab::netns_command(SITE_B, "iperf3")
        .args(["-s", "-1", "-B", ADDR_B, "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start iperf3 server"))
}

pub fn run(o: &RekeyBenchOptions) -> Result<Value, BenchError> {
    crate::accel::ensure_random_payload(
        Path::new(crate::accel::RANDOM_PAYLOAD),
        crate::accel::random_payload_bytes(o.seconds),
    )?;
    let mut plain = Vec::new();
    let mut rekeyed = Vec::new();
    for round in 0..o.rounds {
        // Alternate which goes first, so a drift of the machine falls on both.
        let order = if round % 2 == 0 {
            [None, Some(o.rekey_after_packets)]
        } else {
            [Some(o.rekey_after_packets), None]
        };
        for rekey in order {
            let r = one_run(o, rekey)?;
            eprintln!(
                "  round {} {}: {:.1} Mbit/s (lowest second {:.1}), {} key updates",
                round + 1,
                match rekey {
                    Some(n) => format!("rekey every {n} packets"),
                    None => "default keys".into(),
                },
                r["goodput_mbit"].as_f64().unwrap_or(0.0),
                r["min_interval_mbit"].as_f64().unwrap_or(0.0),
                r["key_updates_sent"]
            );
            if rekey.is_some() {
                rekeyed.push(r);
            } else {
                plain.push(r);
            }
        }
    }
    let mean = |v: &[Value], k: &str| {
        v.iter().filter_map(|r| r[k].as_f64()).sum::<f64>() / v.len().max(1) as f64
    };
    let (a, b) = (mean(&plain, "goodput_mbit"), mean(&rekeyed, "goodput_mbit"));
    let ratio = if a > 0.0 { b / a } else { 0.0 };
    let updates_min = rekeyed
        .iter()
        .filter_map(|r| r["key_updates_sent"].as_u64())
        .min()
        .unwrap_or(0);
    let met = ratio >= TARGET_RATIO && updates_min > 0;
    let value = json!({
        "command": o.command,
        "machine": crate::machine(),
        "profile": o.profile,
        "seconds": o.seconds,
        "rounds": o.rounds,
        "rekey_after_packets": o.rekey_after_packets,
        "default_keys": plain,
        "frequent_rekey": rekeyed,
        "mean_default_mbit": a,
        "mean_rekey_mbit": b,
        "ratio": ratio,
        "fewest_key_updates_in_a_rekey_run": updates_min,
        "target": {"ratio_at_least": TARGET_RATIO, "met": met},
    });
    let row = |name: &str, v: &[Value]| {
        let cells: Vec<String> = v
            .iter()
            .map(|r| {
                format!(
                    "{:.1} ({} updates)",
                    r["goodput_mbit"].as_f64().unwrap_or(0.0),
                    r["key_updates_sent"]
                )
            })
            .collect();
        format!(
            "| {name} | {} | {:.1} |\n",
            cells.join(" / "),
            mean(v, "goodput_mbit")
        )
    };
    let md = format!(
        "# Key updates during an accelerated flow\n\n\
         `{}`\n\n\
         One iperf3 flow of incompressible bytes (`-C bbr -F {}`) through tern on `{}` for \
         {} s, in a fresh lab per run: nodes with the transport's own key-update limit \
         (2^22 packets or 120 s), and nodes that update each direction's key every {} \
         packets. Key updates counted at node A (`key_updates_sent`).\n\n\
         | nodes | goodput per round, Mbit/s (key updates) | mean |\n|---|---|---|\n{}{}\n\
         **frequent key updates / default = {:.3}** (target ≥ {TARGET_RATIO}, with updates \
         happening: {}).\n",
        o.command,
        crate::accel::RANDOM_PAYLOAD,
        o.profile,
        o.seconds,
        o.rekey_after_packets,
        row("default keys", &plain),
        row("frequent key updates", &rekeyed),
        ratio,
        if met { "met" } else { "not met" },
    );
    crate::write_results(&o.out_dir, "rekey", &value, &md)?;
    print!("{md}");
    Ok(value)
}
