//! Running ping and iperf3 inside the lab's namespaces and reading their output.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::BenchError;

/// Round-trip times in ms from `ping -c count -i interval`, one per reply.
pub fn ping(netns: &str, dst: &str, count: u32, interval_s: f64) -> Result<Vec<f64>, BenchError> {
    let out = tern_lab::run_in(
        netns,
        "ping",
        &[
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{interval_s}"),
            "-W",
            "2",
            dst,
        ],
    )
    .or_else(|e| match e {
        // ping exits 1 when some replies were lost; the replies it got still count.
        tern_lab::LabError::Command { .. } => Ok(String::new()),
        other => Err(other),
    })?;
    let rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        return Err(BenchError::Tool {
            tool: "ping",
            detail: format!("no replies from {dst}"),
        });
    }
    Ok(rtts)
}

/// Quantile of a sample (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// An iperf3 server in a namespace, stopped on drop.
pub struct Iperf3Server(Child);

impl std::fmt::Debug for Iperf3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Iperf3Server({})", self.0.id())
    }
}

impl Iperf3Server {
    pub fn start(netns: &str, bind: &str, port: u16) -> Result<Self, BenchError> {
        let child = tern_lab::netns_command(netns, "iperf3")
            .args(["-s", "-B", bind, "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Io {
                what: "start iperf3 server".into(),
                source,
            })?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self(child))
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs an iperf3 client with `-J` and returns its JSON report.
pub fn iperf3_client(netns: &str, args: &[&str]) -> Result<Value, BenchError> {
    let mut full = vec!["-J"];
    full.extend_from_slice(args);
    let out = tern_lab::netns_command(netns, "iperf3")
        .args(&full)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Io {
            what: "run iperf3".into(),
            source,
        })?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Tool {
        tool: "iperf3",
        detail: format!("{e}: {}", String::from_utf8_lossy(&out.stderr)),
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(BenchError::Tool {
            tool: "iperf3",
            detail: err.to_string(),
        });
    }
    Ok(v)
}

/// Receiver-side goodput in bit/s of a TCP iperf3 report.
pub fn tcp_goodput_bps(report: &Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
}

/// (packets sent, packets lost, receiver payload bytes, seconds) of a UDP iperf3 report.
pub fn udp_result(report: &Value) -> (u64, u64, u64, f64) {
    let s = &report["end"]["sum"];
    let r = &report["end"]["sum_received"];
    (
        s["packets"].as_u64().unwrap_or(0),
        s["lost_packets"].as_u64().unwrap_or(0),
        r["bytes"].as_u64().unwrap_or(0),
        r["seconds"].as_f64().unwrap_or(0.0),
    )
}
