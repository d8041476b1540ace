//! `tern bench accel`: tern's accelerator against kernel TCP and kcptun, per profile.
//!
//! For each profile, side by side in one run, client in `tern-a`, server in `tern-b`:
//!
//! - goodput of one and of four parallel iperf3 flows (incompressible payload: `-F` of a
//!   pseudo-random file, see `ensure_random_payload`) for `cubic` and `bbr`
//!   (plain kernel TCP), `kcptun` (a TCP port forward over KCP/UDP; iperf3's control and data
//!   connections all go through it) and `tern` (the lab brought up with `--accel`: the same
//!   plain iperf3 command, intercepted by a tern node in each site);
//! - effective goodput of a compressible corpus (the first bytes of a tar of /usr, sent with
//!   `iperf3 -F`; iperf3 counts the original bytes the receiver got);
//! - CPU seconds per GB delivered of the kcptun and tern processes (utime + stime);
//! - on the request/response profiles: 1 MiB fetches on a new connection each
//!   (`tern bench rr-server` / `rr-client`, see [`crate::rr`]).
//!
//! ```text
//!   per profile:  lab up ─▶ cubic, bbr, kcptun ─▶ lab down ─▶ lab up --accel ─▶ tern ─▶ lab down
//!   per transport:          1 flow, 4 flows, compressible, rr (each run: fresh server, bounded)
//! ```
//!
//! Every external process has a wall-clock bound and is killed on drop; the lab is brought
//! down between configurations and on every error. A transport that cannot run (kcptun not
//! installed, `lab up --accel` refused) is recorded as unavailable, and the rest goes on.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tern_link::{Profile, format_rate};

use crate::rr::{RESPONSE_BYTES, RrReport};
use crate::{BenchError, error_chain, machine, write_results};

/// iperf3 server port in `tern-b`.
pub const IPERF_PORT: u16 = 5201;
/// rr-server port in `tern-b`.
pub const RR_PORT: u16 = 7001;
/// kcptun: UDP port of the server on 198.18.2.1 (the rr tunnel uses the next one).
pub const KCP_UDP_PORT: u16 = 29900;
/// kcptun: TCP port of the client on 127.0.0.1 in `tern-a` for iperf3 (rr: [`KCP_RR_LOCAL_PORT`]).
pub const KCP_IPERF_LOCAL_PORT: u16 = 15201;
pub const KCP_RR_LOCAL_PORT: u16 = 17001;
/// kcptun's default UDP payload size; its windows are counted in packets of this size.
pub const KCP_MTU_BYTES: u64 = 1350;
pub const KCP_MIN_WINDOW_PACKETS: u32 = 4096;
pub const KCP_MAX_WINDOW_PACKETS: u32 = 32_768;
/// Pre-shared key of the lab's kcptun pairs (aes-128); lab traffic only.
pub const KCP_KEY: &str = "tern-bench-accel";
/// kcptun's FEC (data, parity shards) unless chosen: off (see [`KcptunConfig::for_profile`]).
pub const KCP_FEC_DEFAULT: (u32, u32) = (0, 0);
/// Bound on `--datashard` + `--parityshard`.
pub const KCP_MAX_SHARDS: u32 = 64;
pub const PARALLEL_FLOWS: u32 = 4;
const SITE_A: &str = "tern-a";
const SITE_B: &str = "tern-b";
const ADDR_B: &str = "198.18.2.1";
/// Bounds on external processes beyond their own run time.
const LAB_TIMEOUT: Duration = Duration::from_secs(90);
const IPERF_SLACK: Duration = Duration::from_secs(30);
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
const COMPRESS_TIMEOUT: Duration = Duration::from_secs(300);
const CORPUS_TIMEOUT: Duration = Duration::from_secs(600);
const SERVER_SETTLE: Duration = Duration::from_millis(300);
/// Largest corpus accepted (and the cap on `--corpus-mib`).
pub const MAX_CORPUS_BYTES: u64 = 4 << 30;
const WORK_DIR: &str = "/run/tern/bench-accel";
/// The incompressible payload (see `ensure_random_payload`).
pub const RANDOM_PAYLOAD: &str = "/var/tmp/tern-random-payload.bin";

/// How the bytes cross the emulated WAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Cubic,
    Bbr,
    Kcptun,
    Tern,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::Cubic,
        Transport::Bbr,
        Transport::Kcptun,
        Transport::Tern,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Cubic => "cubic",
            Transport::Bbr => "bbr",
            Transport::Kcptun => "kcptun",
            Transport::Tern => "tern",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| format!("unknown transport {s:?} (cubic, bbr, kcptun, tern)"))
    }

    /// The congestion control named on the iperf3 / rr client (kcptun's legs are local).
    fn congestion(self) -> Option<&'static str> {
        match self {
            Transport::Cubic => Some("cubic"),
            Transport::Bbr | Transport::Tern => Some("bbr"),
            Transport::Kcptun => None,
        }
    }

    /// Colour in the chart.
    fn colour(self) -> &'static str {
        match self {
            Transport::Cubic => "#8c8c8c",
            Transport::Bbr => "#4c72b0",
            Transport::Kcptun => "#dd8452",
            Transport::Tern => "#55a868",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AccelBenchOptions {
    /// Profiles whose goodput is measured.
    pub profiles: Vec<String>,
    /// Profiles whose request/response times are measured.
    pub rr_profiles: Vec<String>,
    pub transports: Vec<Transport>,
    /// Seconds per one-flow run on the incompressible payload: the runs the goodput targets
    /// are read from, long enough that loss-driven steady state, not the first seconds of
    /// slow start, decides them.
    pub duration_s: u32,
    /// Seconds per 4-flow and compressible run.
    pub short_duration_s: u32,
    pub compressible: bool,
    pub rr_count: u32,
    pub corpus_path: PathBuf,
    pub corpus_max_bytes: u64,
    /// kcptun `--sndwnd`/`--rcvwnd` for every profile instead of the BDP rule.
    pub kcptun_window_packets: Option<u32>,
    /// kcptun `--datashard`, `--parityshard`.
    pub kcptun_fec: (u32, u32),
    pub out_dir: PathBuf,
    pub tern_exe: PathBuf,
    /// The command line that produced the results, recorded with them.
    pub command: String,
}

/// A measurement, or why there is none.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell<T> {
    Ok(T),
    /// The transport could not run at all (not installed, lab refused `--accel`).
    Unavailable(String),
    /// It ran and failed.
    Failed(String),
}

impl<T> Cell<T> {
    pub fn ok(&self) -> Option<&T> {
        match self {
            Cell::Ok(v) => Some(v),
            _ => None,
        }
    }

    fn from_result(r: Result<T, BenchError>) -> Self {
        match r {
            Ok(v) => Cell::Ok(v),
            Err(e) => Cell::Failed(error_chain(&e)),
        }
    }

    fn problem(&self) -> Option<String> {
        match self {
            Cell::Ok(_) => None,
            Cell::Unavailable(m) => Some(format!("unavailable: {m}")),
            Cell::Failed(m) => Some(format!("failed: {m}")),
        }
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Goodput {
    /// Receiver-side application bytes per second × 8.
    pub goodput_bps: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: Option<u64>,
    /// utime + stime of the transport's own processes (kcptun pair, tern nodes) over the run.
    pub cpu_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransportResult {
    pub transport: Transport,
    pub one_flow: Option<Cell<Goodput>>,
    pub four_flows: Option<Cell<Goodput>>,
    pub compressible: Option<Cell<Goodput>>,
    pub rr: Option<Cell<RrReport>>,
    /// CPU seconds per GB over the random-payload runs (1 and 4 flows together).
    pub cpu_s_per_gb: Option<f64>,
    /// The processes whose CPU was counted.
    pub cpu_pids: Vec<u32>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProfileResult {
    pub profile: String,
    pub rate_bps: u64,
    pub rtt_ms: f64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub kcptun: KcptunConfig,
    pub transports: Vec<TransportResult>,
}

impl ProfileResult {
    fn get(&self, t: Transport) -> Option<&TransportResult> {
        self.transports.iter().find(|r| r.transport == t)
    }
}

// ---------------------------------------------------------------------------------------
// Pure parts: /proc parsing, kcptun flags, iperf3 reports, estimate, tables, chart.

/// utime + stime (clock ticks) from the text of `/proc/PID/stat`. The command name (field
/// 2) is in parentheses and may itself hold spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds used so far by all of `pids`; `None` if any of them is gone.
pub fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        ticks += parse_stat_cpu_ticks(&stat)?;
    }
    Some(ticks as f64 / clock_ticks_per_s())
}

/// kcptun settings for one profile, recorded with the results.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KcptunConfig {
    /// `--sndwnd` and `--rcvwnd`, both ends (packets of [`KCP_MTU_BYTES`]).
    pub window_packets: u32,
    pub data_shards: u32,
    pub parity_shards: u32,
}

impl KcptunConfig {
    /// Windows: twice the bandwidth-delay product in KCP packets, rounded up to a multiple
    /// of 1024, within [4096, 32768]. KCP's throughput is window × MTU / RTT, and the RTT
    /// under load includes the emulator's queue (one BDP). The floor of 4096 because fast3
    /// sends without congestion control and recovers loss by fast retransmit, so a larger
    /// window measured faster even on slow links (8 s runs, FEC off: mpls 61/71/79/83
    /// Mbit/s at 512/1024/2048/4096; thesis 21/34/48 at 1024/2048/4096).
    /// FEC: off by default. kcptun's own default (10 data + 3 parity shards) measured
    /// slower on every profile tried (mpls 56–59 vs 71–83 Mbit/s; metro 144 vs 202): at
    /// ≤ 0.1% loss the parity costs more rate and CPU than the retransmissions it saves.
    pub fn for_profile(p: &Profile, window_override: Option<u32>, fec: (u32, u32)) -> Self {
        let bdp_bytes = p.rate_bps as f64 / 8.0 * p.rtt_us as f64 / 1e6;
        let packets = (2.0 * bdp_bytes / KCP_MTU_BYTES as f64).ceil() as u64;
        let window = packets.div_ceil(1024).saturating_mul(1024).clamp(
            u64::from(KCP_MIN_WINDOW_PACKETS),
            u64::from(KCP_MAX_WINDOW_PACKETS),
        ) as u32;
        Self {
            window_packets: window_override
                .unwrap_or(window)
                .clamp(1, KCP_MAX_WINDOW_PACKETS),
            data_shards: fec.0,
            parity_shards: fec.1,
        }
    }

    /// Flags common to both ends.
    pub fn common_args(&self, compress: bool) -> Vec<String> {
        let mut a: Vec<String> = [
            "--mode",
            "fast3",
            "--crypt",
            "aes-128",
            "--key",
            KCP_KEY,
            "--mtu",
            &KCP_MTU_BYTES.to_string(),
            "--sndwnd",
            &self.window_packets.to_string(),
            "--rcvwnd",
            &self.window_packets.to_string(),
            "--datashard",
            &self.data_shards.to_string(),
            "--parityshard",
            &self.parity_shards.to_string(),
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !compress {
            a.push("--nocomp".into());
        }
        a
    }

    pub fn server_args(&self, listen_udp: &str, target: &str, compress: bool) -> Vec<String> {
        let mut a = vec![
            "--listen".to_string(),
            listen_udp.to_string(),
            "--target".into(),
            target.into(),
        ];
        a.extend(self.common_args(compress));
        a
    }

    pub fn client_args(&self, local: &str, remote_udp: &str, compress: bool) -> Vec<String> {
        let mut a = vec![
            "--localaddr".to_string(),
            local.to_string(),
            "--remoteaddr".into(),
            remote_udp.into(),
        ];
        a.extend(self.common_args(compress));
        a
    }
}

/// Receiver-side goodput of an iperf3 TCP report (`-J`).
pub fn parse_goodput(report: &Value) -> Result<(f64, u64, f64, Option<u64>), BenchError> {
    if let Some(err) = report.get("error").and_then(Value::as_str) {
        return Err(BenchError::Failed {
            tool: "iperf3",
            detail: err.to_string(),
        });
    }
    let r = &report["end"]["sum_received"];
    let (Some(bps), Some(bytes), Some(seconds)) = (
        r["bits_per_second"].as_f64(),
        r["bytes"].as_u64(),
        r["seconds"].as_f64(),
    ) else {
        return Err(BenchError::Tool {
            tool: "iperf3",
            detail: "report has no end.sum_received".into(),
        });
    };
    let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64();
    Ok((bps, bytes, seconds, retransmits))
}

/// The expected duration of the whole run in seconds, printed before it starts. Calibrated
/// on short runs here: ~1 s per iperf3 run beyond its `-t` (server start, connect, result
/// exchange), ~2 s per lab up + down, ~0.6 s per kcptun pair.
pub fn estimate_s(opts: &AccelBenchOptions) -> u64 {
    let short_runs = 1.0 + if opts.compressible { 1.0 } else { 0.0 };
    let per_transport =
        f64::from(opts.duration_s) + 1.0 + short_runs * (f64::from(opts.short_duration_s) + 1.0);
    let plain = opts.transports.iter().any(|t| *t != Transport::Tern);
    let tern = opts.transports.contains(&Transport::Tern);
    let configs = f64::from(u8::from(plain) + u8::from(tern));
    let mut total = 0.0;
    let mut seen = Vec::new();
    for name in opts.profiles.iter().chain(&opts.rr_profiles) {
        if seen.contains(name) {
            continue;
        }
        seen.push(name.clone());
        let Ok(p) = Profile::find(name) else { continue };
        total += configs * 2.0;
        if opts.profiles.contains(name) {
            total += opts.transports.len() as f64 * per_transport;
        }
        if opts.rr_profiles.contains(name) {
            let rtt_s = p.rtt_us as f64 / 1e6;
            let rate = if p.rate_bps == 0 {
                1e10
            } else {
                p.rate_bps as f64
            };
            let each = 4.0 * rtt_s + 2.0 * RESPONSE_BYTES as f64 * 8.0 / rate + 0.05;
            total += opts.transports.len() as f64 * (2.0 + f64::from(opts.rr_count) * each);
        }
        if opts.transports.contains(&Transport::Kcptun) {
            total += 1.8;
        }
    }
    total.ceil() as u64
}

fn mbit(bps: f64) -> String {
    if bps >= 100e6 {
        format!("{:.0}", bps / 1e6)
    } else {
        format!("{:.1}", bps / 1e6)
    }
}

fn goodput_of(c: &Option<Cell<Goodput>>) -> Option<f64> {
    c.as_ref()?.ok().map(|g| g.goodput_bps)
}

fn cell_text(c: &Option<Cell<Goodput>>) -> String {
    match c {
        None => "–".into(),
        Some(Cell::Ok(g)) => mbit(g.goodput_bps),
        Some(Cell::Unavailable(_)) => "n/a".into(),
        Some(Cell::Failed(_)) => "failed".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn link_text(r: &ProfileResult) -> String {
    format!(
        "{} {} ms {}% j{} ms",
        format_rate(r.rate_bps),
        r.rtt_ms,
        r.loss_percent,
        r.jitter_ms
    )
}

/// The goodput table: one row per profile.
pub fn goodput_table(results: &[ProfileResult], transports: &[Transport]) -> String {
    let rows: Vec<&ProfileResult> = results
        .iter()
        .filter(|r| r.transports.iter().any(|t| t.one_flow.is_some()))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let has = |t| transports.contains(&t);
    let compressible = rows
        .iter()
        .any(|r| r.transports.iter().any(|t| t.compressible.is_some()));
    let mut head = vec!["profile".to_string(), "link".into()];
    for t in transports {
        head.push(format!("{} 1 / 4 flows", t.name()));
    }
    if compressible {
        for t in transports {
            head.push(format!("{} compressible", t.name()));
        }
    }
    for t in [Transport::Kcptun, Transport::Tern] {
        if has(t) {
            head.push(format!("{} CPU s/GB", t.name()));
        }
    }
    let ratios: Vec<Transport> = [Transport::Bbr, Transport::Cubic]
        .into_iter()
        .filter(|t| has(Transport::Tern) && has(*t))
        .collect();
    for t in &ratios {
        head.push(format!("tern/{} 1 / 4 flows", t.name()));
    }
    let mut md = format!("| {} |\n", head.join(" | "));
    md.push_str(&format!("|{}\n", "---|".repeat(head.len())));
    for r in rows {
        let mut row = vec![r.profile.clone(), link_text(r)];
        for t in transports {
            row.push(match r.get(*t) {
                Some(x) => format!("{} / {}", cell_text(&x.one_flow), cell_text(&x.four_flows)),
                None => "–".into(),
            });
        }
        if compressible {
            for t in transports {
                row.push(
                    r.get(*t)
                        .map(|x| cell_text(&x.compressible))
                        .unwrap_or_else(|| "–".into()),
                );
            }
        }
        for t in [Transport::Kcptun, Transport::Tern] {
            if has(t) {
                row.push(
                    r.get(t)
                        .and_then(|x| x.cpu_s_per_gb)
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_else(|| "–".into()),
                );
            }
        }
        let tern = r.get(Transport::Tern);
        for t in &ratios {
            let other = r.get(*t);
            let f = |pick: fn(&TransportResult) -> &Option<Cell<Goodput>>| {
                ratio(
                    tern.and_then(|x| goodput_of(pick(x))),
                    other.and_then(|x| goodput_of(pick(x))),
                )
            };
            row.push(format!("{} / {}", f(|x| &x.one_flow), f(|x| &x.four_flows)));
        }
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md
}

/// The request/response table: one row per profile measured.
pub fn rr_table(results: &[ProfileResult], transports: &[Transport]) -> String {
    let rows: Vec<&ProfileResult> = results
        .iter()
        .filter(|r| r.transports.iter().any(|t| t.rr.is_some()))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut head = vec![
        "profile".to_string(),
        "link".into(),
        "floor: 2 RTT + 1 MiB at line rate (ms)".into(),
    ];
    for t in transports {
        head.push(format!("{} median / p90 (ms)", t.name()));
    }
    let mut md = format!("| {} |\n", head.join(" | "));
    md.push_str(&format!("|{}\n", "---|".repeat(head.len())));
    for r in rows {
        let floor_ms = 2.0 * r.rtt_ms
            + if r.rate_bps == 0 {
                0.0
            } else {
                RESPONSE_BYTES as f64 * 8.0 / r.rate_bps as f64 * 1e3
            };
        let mut row = vec![r.profile.clone(), link_text(r), format!("{floor_ms:.1}")];
        for t in transports {
            row.push(match r.get(*t).and_then(|x| x.rr.as_ref()) {
                None => "–".into(),
                Some(Cell::Ok(rep)) => format!("{:.1} / {:.1}", rep.median_ms, rep.p90_ms),
                Some(Cell::Unavailable(_)) => "n/a".into(),
                Some(Cell::Failed(_)) => "failed".into(),
            });
        }
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md
}

/// One group of bars: a profile and the value (Mbit/s) per transport, `None` if missing.
pub type ChartGroup = (String, Vec<(Transport, Option<f64>)>);

/// A grouped bar chart of goodput, one group per profile, one bar per transport with a
/// value, on a log axis in Mbit/s (see [`crate::chart::log_bars`]).
pub fn svg_chart(title: &str, groups: &[ChartGroup]) -> String {
    let mut transports: Vec<Transport> = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|(t, _)| *t))
        .collect();
    transports.sort();
    transports.dedup();
    let series: Vec<crate::chart::Series> = transports
        .iter()
        .map(|t| crate::chart::Series {
            name: t.name().to_string(),
            colour: t.colour(),
        })
        .collect();
    let groups: Vec<(String, Vec<Option<f64>>)> = groups
        .iter()
        .map(|(name, bars)| {
            let values = transports
                .iter()
                .map(|t| bars.iter().find(|(bt, _)| bt == t).and_then(|(_, v)| *v))
                .collect();
            (name.clone(), values)
        })
        .collect();
    crate::chart::log_bars(title, "goodput, Mbit/s", "Mbit/s", &series, &groups)
}

// ---------------------------------------------------------------------------------------
// Processes: bounded runs, guarded children, the lab.

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion, killing it after `timeout`.
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, BenchError> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("start {what}")))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(io(format!("wait for {what}")))? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(BenchError::Failed {
            tool: "timeout",
            detail: format!("`{what}` killed after {} s", timeout.as_secs()),
        }),
    }
}

/// The first paragraph of a tool's stderr, on one line.
fn first_paragraph(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let s: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let s = s.join(" ");
    if s.chars().count() > 400 {
        s.chars().take(400).collect::<String>() + "…"
    } else {
        s
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// A long-running process inside a namespace, killed on drop.
struct Guarded {
    child: Child,
    what: String,
    log: PathBuf,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guarded({} pid {})", self.what, self.child.id())
    }
}

impl Guarded {
    fn start(
        netns: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, BenchError> {
        let mut cmd = tern_lab::netns_command(netns, &program.to_string_lossy());
        cmd.args(args);
        let what = describe(&cmd);
        let f = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let f2 = f.try_clone().map_err(io("dup log"))?;
        // `ip netns exec` execs the program: the child's pid is the program's.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(io(format!("start {what}")))?;
        let mut g = Self { child, what, log };
        std::thread::sleep(SERVER_SETTLE);
        g.check()?;
        Ok(g)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error (with the end of its log) if the process has exited.
    fn check(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(BenchError::Failed {
                tool: "process",
                detail: format!("`{}` exited ({st}): {}", self.what, tail(&self.log, 5)),
            }),
            Err(e) => Err(BenchError::Io {
                what: format!("wait for {}", self.what),
                source: e,
            }),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A lab brought up by this benchmark; down on drop.
struct Lab<'a> {
    tern_exe: &'a Path,
}

impl std::fmt::Debug for Lab<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lab")
    }
}

fn lab_down(tern_exe: &Path) {
    let r = run_bounded(Command::new(tern_exe).args(["lab", "down"]), LAB_TIMEOUT);
    if !matches!(&r, Ok(o) if o.status.success()) {
        // The library does the same by name; it also works when the binary is gone.
        if let Err(e) = tern_lab::down() {
            eprintln!("  warning: lab down failed: {e}");
        }
    }
}

impl<'a> Lab<'a> {
    /// `tern lab up --profile P [--accel]`; the error is the tool's own first paragraph.
    fn up(tern_exe: &'a Path, profile: &str, accel: bool) -> Result<Self, String> {
        let mut cmd = Command::new(tern_exe);
        cmd.args(["lab", "up", "--profile", profile]);
        if accel {
            cmd.arg("--accel");
        }
        // Someone else's lab (the bench checked at start; this closes the window between
        // configurations) is theirs: refuse rather than bring it down.
        if tern_lab::status().is_ok_and(|st| st.up) {
            return Err("another lab came up during the run; not touching it".into());
        }
        match run_bounded(&mut cmd, LAB_TIMEOUT) {
            Ok(o) if o.status.success() => Ok(Self { tern_exe }),
            Ok(o) => {
                let why = first_paragraph(&o.stderr);
                if !why.contains("already up") {
                    lab_down(tern_exe);
                }
                Err(format!("`{}`: {why}", describe(&cmd)))
            }
            Err(e) => {
                lab_down(tern_exe);
                Err(error_chain(&e))
            }
        }
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        lab_down(self.tern_exe);
    }
}

/// Pids of the tern nodes: `tern lab status --json` → `nodes[].pid`, else `pgrep -f 'tern node'`.
fn tern_node_pids(tern_exe: &Path) -> (Vec<u32>, &'static str) {
    if let Ok(o) = run_bounded(
        Command::new(tern_exe).args(["lab", "status", "--json"]),
        TOOL_TIMEOUT,
    ) {
        if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
            let pids = node_pids_from_status(&v);
            if !pids.is_empty() {
                return (pids, "tern lab status --json: nodes[].pid");
            }
        }
    }
    let pids = run_bounded(
        Command::new("pgrep").args(["-f", "tern node"]),
        TOOL_TIMEOUT,
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default();
    (pids, "pgrep -f 'tern node'")
}

/// `nodes[].pid` of a `tern lab status --json` document.
pub fn node_pids_from_status(v: &Value) -> Vec<u32> {
    v["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["pid"].as_u64())
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Corpus.

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CorpusInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub made_by: String,
    /// original / compressed, `gzip -1` and `zstd -3` (for context; computed once, cached).
    pub gzip1_ratio: Option<f64>,
    pub zstd3_ratio: Option<f64>,
}

fn make_corpus(path: &Path, max_bytes: u64) -> Result<(), BenchError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let tmp = path.with_extension("partial");
    let out = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let mut tar = Command::new("tar")
        .args(["cf", "-", "/usr"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start tar"))?;
    let Some(stdout) = tar.stdout.take() else {
        let _ = tar.kill();
        let _ = tar.wait();
        return Err(BenchError::Failed {
            tool: "tar",
            detail: "no stdout".into(),
        });
    };
    let started = Instant::now();
    // `head -c` in Rust: stop reading at the cap, then stop tar.
    let copy = std::io::copy(
        &mut stdout.take(max_bytes),
        &mut std::io::BufWriter::new(out),
    );
    let _ = tar.kill();
    let _ = tar.wait();
    let n = copy.map_err(io(format!("write {}", tmp.display())))?;
    if n == 0 || started.elapsed() > CORPUS_TIMEOUT {
        let _ = std::fs::remove_file(&tmp);
        return Err(BenchError::Failed {
            tool: "tar",
            detail: format!("corpus from /usr: {n} bytes"),
        });
    }
    std::fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(())
}

/// The incompressible payload: pseudo-random bytes (splitmix64, fixed seed), at least
/// `bytes` long, made once and reused. iperf3's own "random" payload is one 128 KiB buffer
/// sent over and over, which any stream compressor with a window of 128 KiB or more (tern's
/// zstd contexts, 2 MiB) turns into references: it is not incompressible data.
pub fn ensure_random_payload(path: &Path, bytes: u64) -> Result<PathBuf, BenchError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= bytes) {
        return Ok(path.to_path_buf());
    }
    eprintln!(
        "making the incompressible payload: {} MiB of pseudo-random bytes in {}",
        bytes >> 20,
        path.display()
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let tmp = path.with_extension("partial");
    let mut out = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let mut state = 0x7465_726e_u64; // "tern"
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < bytes {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&crate::rr::splitmix64(&mut state).to_le_bytes());
        }
        std::io::Write::write_all(&mut out, &buf)
            .map_err(io(format!("write {}", tmp.display())))?;
        written += buf.len() as u64;
    }
    drop(out);
    std::fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(path.to_path_buf())
}

/// Size of the incompressible payload for runs of `secs`: 1.5 Gbit/s for the whole run, so
/// iperf3 -F never reaches its end on these 1 Gbit/s links.
pub fn random_payload_bytes(secs: u32) -> u64 {
    (u64::from(secs) * 1_500_000_000 / 8).max(256 << 20)
}

/// Bytes of `program args < path` on stdout, bounded in time.
fn compressed_size(program: &str, args: &[&str], path: &Path) -> Option<u64> {
    let input = std::fs::File::open(path).ok()?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let counter = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let deadline = Instant::now() + COMPRESS_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    counter.join().ok()?.ok()
}

/// The corpus file (made once, reused) and its compression ratios (cached beside it).
fn ensure_corpus(path: &Path, max_bytes: u64) -> Result<CorpusInfo, BenchError> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.len() > 0);
    if meta.is_none() {
        eprintln!(
            "making the compressible corpus: tar cf - /usr | head -c {max_bytes} > {}",
            path.display()
        );
        make_corpus(path, max_bytes)?;
    }
    let bytes = std::fs::metadata(path)
        .map_err(io(format!("stat {}", path.display())))?
        .len();
    let cache = path.with_extension("ratios.json");
    if let Some(c) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|t| serde_json::from_str::<CorpusInfo>(&t).ok())
        .filter(|c| c.bytes == bytes && c.path == path)
    {
        return Ok(c);
    }
    eprintln!("compression ratios of the corpus (gzip -1, zstd -3; once) ...");
    let r = |size: Option<u64>| size.filter(|s| *s > 0).map(|s| bytes as f64 / s as f64);
    let info = CorpusInfo {
        path: path.to_path_buf(),
        bytes,
        made_by: format!("tar cf - /usr 2>/dev/null | head -c {max_bytes}"),
        gzip1_ratio: r(compressed_size("gzip", &["-1", "-c"], path)),
        zstd3_ratio: r(compressed_size("zstd", &["-3", "-c", "-q"], path)),
    };
    if let Ok(t) = serde_json::to_string_pretty(&info) {
        let _ = std::fs::write(&cache, t);
    }
    Ok(info)
}

// ---------------------------------------------------------------------------------------
// Measurements.

struct Ctx<'a> {
    opts: &'a AccelBenchOptions,
    started: Instant,
    corpus: Option<&'a CorpusInfo>,
    /// The incompressible payload file (`iperf3 -F`).
    random: PathBuf,
    kcptun_ok: Result<(), String>,
}

impl Ctx<'_> {
    fn progress(&self, msg: &str) {
        let s = self.started.elapsed().as_secs();
        eprintln!("[{:02}:{:02}] {msg}", s / 60, s % 60);
    }
}

/// One iperf3 run from tern-a with a fresh one-off server in tern-b.
fn iperf3_run(client_args: &[String], secs: u32, cpu_pids: &[u32]) -> Result<Goodput, BenchError> {
    let _server = Guarded::start(
        SITE_B,
        Path::new("iperf3"),
        &[
            "-s",
            "-1",
            "-B",
            "0.0.0.0",
            "-p",
            &IPERF_PORT.to_string(),
            "--rcv-timeout",
            "15000",
        ]
        .map(String::from),
        Path::new(WORK_DIR).join("iperf3-server.log"),
    )?;
    let mut cmd = tern_lab::netns_command(SITE_A, "iperf3");
    cmd.args(["-J", "--connect-timeout", "10000"])
        .args(client_args);
    let command = describe(&cmd);
    let cpu_before = cpu_seconds(cpu_pids);
    let out = run_bounded(&mut cmd, Duration::from_secs(u64::from(secs)) + IPERF_SLACK)?;
    let cpu_after = cpu_seconds(cpu_pids);
    let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Tool {
        tool: "iperf3",
        detail: format!("{e}: {}", first_paragraph(&out.stderr)),
    })?;
    let (goodput_bps, bytes, seconds, retransmits) = parse_goodput(&report)?;
    let cpu_s = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(Goodput {
        goodput_bps,
        bytes,
        seconds,
        retransmits,
        cpu_s,
        cpu_s_per_gb: cpu_s
            .filter(|_| bytes > 0)
            .map(|c| c / (bytes as f64 / 1e9)),
        command,
    })
}

fn iperf3_args(t: Transport, secs: u32, flows: u32, file: Option<&Path>) -> Vec<String> {
    let (host, port) = match t {
        Transport::Kcptun => ("127.0.0.1", KCP_IPERF_LOCAL_PORT),
        _ => (ADDR_B, IPERF_PORT),
    };
    let mut a: Vec<String> = vec![
        "-c".into(),
        host.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        secs.to_string(),
    ];
    if flows > 1 {
        a.extend(["-P".into(), flows.to_string()]);
    }
    if let Some(cc) = t.congestion() {
        a.extend(["-C".into(), cc.into()]);
    }
    if let Some(f) = file {
        a.extend(["-F".into(), f.display().to_string()]);
    }
    a
}

/// A kcptun server in tern-b and client in tern-a forwarding `local_port` → `target_port`.
struct KcptunPair {
    server: Guarded,
    client: Guarded,
}

impl std::fmt::Debug for KcptunPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KcptunPair({:?}, {:?})", self.server, self.client)
    }
}

impl KcptunPair {
    fn start(
        cfg: &KcptunConfig,
        udp_port: u16,
        local_port: u16,
        target_port: u16,
        compress: bool,
    ) -> Result<Self, BenchError> {
        let udp = format!("{ADDR_B}:{udp_port}");
        let server = Guarded::start(
            SITE_B,
            Path::new("kcptun-server"),
            &cfg.server_args(&udp, &format!("127.0.0.1:{target_port}"), compress),
            Path::new(WORK_DIR).join(format!("kcptun-server-{udp_port}.log")),
        )?;
        let client = Guarded::start(
            SITE_A,
            Path::new("kcptun-client"),
            &cfg.client_args(&format!("127.0.0.1:{local_port}"), &udp, compress),
            Path::new(WORK_DIR).join(format!("kcptun-client-{udp_port}.log")),
        )?;
        Ok(Self { server, client })
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.server.pid(), self.client.pid()]
    }

    fn check(&mut self) -> Result<(), BenchError> {
        self.server.check()?;
        self.client.check()
    }
}

fn rr_run(
    ctx: &Ctx<'_>,
    connect: &str,
    cc: Option<&str>,
    kcptun: Option<(&KcptunConfig, u16)>,
) -> Result<RrReport, BenchError> {
    let exe = &ctx.opts.tern_exe;
    let mut srv_args: Vec<String> = ["bench", "rr-server", "--listen"]
        .map(String::from)
        .to_vec();
    srv_args.push(format!("0.0.0.0:{RR_PORT}"));
    if let Some(cc) = cc {
        srv_args.extend(["--cc".into(), cc.into()]);
    }
    let _server = Guarded::start(
        SITE_B,
        exe,
        &srv_args,
        Path::new(WORK_DIR).join("rr-server.log"),
    )?;
    let _pair = match kcptun {
        Some((cfg, udp_port)) => Some(KcptunPair::start(
            cfg,
            udp_port,
            KCP_RR_LOCAL_PORT,
            RR_PORT,
            false,
        )?),
        None => None,
    };
    let mut cmd = tern_lab::netns_command(SITE_A, &exe.to_string_lossy());
    cmd.args([
        "bench",
        "rr-client",
        "--connect",
        connect,
        "--count",
        &ctx.opts.rr_count.to_string(),
        "--json",
    ]);
    if let Some(cc) = cc {
        cmd.args(["--cc", cc]);
    }
    let timeout = Duration::from_secs(30 + 35 * u64::from(ctx.opts.rr_count.min(100)));
    let out = run_bounded(&mut cmd, timeout)?;
    if !out.status.success() {
        return Err(BenchError::Failed {
            tool: "rr-client",
            detail: first_paragraph(&out.stderr),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Tool {
        tool: "rr-client",
        detail: e.to_string(),
    })
}

fn sum_cpu_per_gb(runs: &[&Option<Cell<Goodput>>]) -> Option<f64> {
    let mut cpu = 0.0;
    let mut bytes = 0u64;
    for r in runs {
        let g = r.as_ref()?.ok()?;
        cpu += g.cpu_s?;
        bytes += g.bytes;
    }
    (bytes > 0).then(|| cpu / (bytes as f64 / 1e9))
}

fn report_run(ctx: &Ctx<'_>, p: &str, t: Transport, what: &str, c: &Cell<Goodput>) {
    let msg = match c {
        Cell::Ok(g) => format!(
            "{:.1} Mbit/s{}",
            g.goodput_bps / 1e6,
            g.cpu_s_per_gb
                .map(|v| format!(", {v:.2} CPU s/GB"))
                .unwrap_or_default()
        ),
        other => other.problem().unwrap_or_default(),
    };
    ctx.progress(&format!("{p} {} {what}: {msg}", t.name()));
}

/// All measurements of one transport on a lab that is up in the right configuration.
fn transport_run(
    ctx: &Ctx<'_>,
    p: &Profile,
    kcp: &KcptunConfig,
    t: Transport,
    goodput: bool,
    rr: bool,
) -> TransportResult {
    let long = ctx.opts.duration_s;
    let short = ctx.opts.short_duration_s;
    let mut res = TransportResult {
        transport: t,
        one_flow: None,
        four_flows: None,
        compressible: None,
        rr: None,
        cpu_s_per_gb: None,
        cpu_pids: vec![],
        notes: vec![],
    };
    let compressible = goodput && ctx.corpus.is_some();
    if t == Transport::Kcptun {
        if let Err(why) = &ctx.kcptun_ok {
            ctx.progress(&format!("{} kcptun: unavailable: {why}", p.name));
            return not_run(t, goodput, compressible, rr, Cell::Unavailable(why.clone()));
        }
    }
    let mut cpu_pids = Vec::new();
    if t == Transport::Tern {
        let (pids, source) = tern_node_pids(&ctx.opts.tern_exe);
        if pids.is_empty() {
            res.notes
                .push("no tern node processes found: CPU not measured".into());
        } else {
            res.notes.push(format!("node pids from {source}"));
        }
        cpu_pids = pids;
    }
    if goodput {
        let pair = if t == Transport::Kcptun {
            KcptunPair::start(kcp, KCP_UDP_PORT, KCP_IPERF_LOCAL_PORT, IPERF_PORT, false).map(Some)
        } else {
            Ok(None)
        };
        match pair {
            Ok(mut pair) => {
                let pids = pair
                    .as_ref()
                    .map(KcptunPair::pids)
                    .unwrap_or_else(|| cpu_pids.clone());
                for (flows, slot) in [
                    (1, &mut res.one_flow),
                    (PARALLEL_FLOWS, &mut res.four_flows),
                ] {
                    let secs = if flows == 1 { long } else { short };
                    let args = iperf3_args(t, secs, flows, Some(&ctx.random));
                    let r = iperf3_run(&args, secs, &pids);
                    let r = r.and_then(|g| match pair.as_mut() {
                        Some(pp) => pp.check().map(|()| g),
                        None => Ok(g),
                    });
                    let c = Cell::from_result(r);
                    report_run(
                        ctx,
                        p.name,
                        t,
                        &if flows == 1 {
                            "1 flow".to_string()
                        } else {
                            format!("{flows} flows")
                        },
                        &c,
                    );
                    *slot = Some(c);
                }
                res.cpu_pids = pids;
            }
            Err(e) => {
                let m = format!("kcptun did not start: {}", error_chain(&e));
                ctx.progress(&format!("{} kcptun: {m}", p.name));
                (res.one_flow, res.four_flows) =
                    (Some(Cell::Failed(m.clone())), Some(Cell::Failed(m)));
            }
        }
        res.cpu_s_per_gb = sum_cpu_per_gb(&[&res.one_flow, &res.four_flows]);
        if t == Transport::Tern && !cpu_pids.is_empty() {
            let used = [&res.one_flow, &res.four_flows]
                .iter()
                .filter_map(|c| c.as_ref()?.ok()?.cpu_s)
                .sum::<f64>();
            if used < 0.05 {
                res.notes.push(format!(
                    "tern nodes used {used:.2} CPU s over the runs: was the traffic intercepted?"
                ));
            }
        }
    }
    if compressible {
        if let Some(corpus) = ctx.corpus {
            let pair = if t == Transport::Kcptun {
                KcptunPair::start(kcp, KCP_UDP_PORT, KCP_IPERF_LOCAL_PORT, IPERF_PORT, true)
                    .map(Some)
            } else {
                Ok(None)
            };
            let c = match pair {
                Ok(pair) => {
                    let pids = pair
                        .as_ref()
                        .map(KcptunPair::pids)
                        .unwrap_or_else(|| cpu_pids.clone());
                    Cell::from_result(iperf3_run(
                        &iperf3_args(t, short, 1, Some(&corpus.path)),
                        short,
                        &pids,
                    ))
                }
                Err(e) => Cell::Failed(format!("kcptun did not start: {}", error_chain(&e))),
            };
            report_run(ctx, p.name, t, "compressible", &c);
            res.compressible = Some(c);
        }
    }
    if rr {
        let r = match t {
            Transport::Kcptun => rr_run(
                ctx,
                &format!("127.0.0.1:{KCP_RR_LOCAL_PORT}"),
                None,
                Some((kcp, KCP_UDP_PORT + 1)),
            ),
            _ => rr_run(ctx, &format!("{ADDR_B}:{RR_PORT}"), t.congestion(), None),
        };
        let c = Cell::from_result(r);
        ctx.progress(&format!(
            "{} {} rr: {}",
            p.name,
            t.name(),
            match &c {
                Cell::Ok(r) => format!("median {:.1} ms, p90 {:.1} ms", r.median_ms, r.p90_ms),
                other => other.problem().unwrap_or_default(),
            }
        ));
        res.rr = Some(c);
    }
    res
}

fn same_problem<T>(c: &Cell<()>) -> Cell<T> {
    match c {
        Cell::Unavailable(m) => Cell::Unavailable(m.clone()),
        Cell::Failed(m) => Cell::Failed(m.clone()),
        Cell::Ok(()) => Cell::Failed("not run".into()),
    }
}

/// Every cell of `t` marked unavailable or failed for one reason.
fn not_run(
    t: Transport,
    goodput: bool,
    compressible: bool,
    rr: bool,
    why: Cell<()>,
) -> TransportResult {
    TransportResult {
        transport: t,
        one_flow: goodput.then(|| same_problem(&why)),
        four_flows: goodput.then(|| same_problem(&why)),
        compressible: (goodput && compressible).then(|| same_problem(&why)),
        rr: rr.then(|| same_problem(&why)),
        cpu_s_per_gb: None,
        cpu_pids: vec![],
        notes: vec![],
    }
}

fn profile_run(ctx: &Ctx<'_>, p: &Profile, goodput: bool, rr: bool) -> ProfileResult {
    let kcp = KcptunConfig::for_profile(p, ctx.opts.kcptun_window_packets, ctx.opts.kcptun_fec);
    let transports = &ctx.opts.transports;
    let compressible = ctx.corpus.is_some();
    let mut results = Vec::new();
    let plain: Vec<Transport> = transports
        .iter()
        .copied()
        .filter(|t| *t != Transport::Tern)
        .collect();
    if !plain.is_empty() {
        ctx.progress(&format!("{}: lab up", p.name));
        match Lab::up(&ctx.opts.tern_exe, p.name, false) {
            Ok(lab) => {
                for t in &plain {
                    results.push(transport_run(ctx, p, &kcp, *t, goodput, rr));
                }
                drop(lab);
            }
            Err(e) => {
                ctx.progress(&format!("{}: lab up failed: {e}", p.name));
                for t in &plain {
                    results.push(not_run(
                        *t,
                        goodput,
                        compressible,
                        rr,
                        Cell::Failed(format!("lab up: {e}")),
                    ));
                }
            }
        }
    }
    if transports.contains(&Transport::Tern) {
        ctx.progress(&format!("{}: lab up --accel", p.name));
        match Lab::up(&ctx.opts.tern_exe, p.name, true) {
            Ok(lab) => {
                results.push(transport_run(ctx, p, &kcp, Transport::Tern, goodput, rr));
                drop(lab);
            }
            Err(e) => {
                ctx.progress(&format!("{} tern: unavailable: {e}", p.name));
                results.push(not_run(
                    Transport::Tern,
                    goodput,
                    compressible,
                    rr,
                    Cell::Unavailable(e),
                ));
            }
        }
    }
    results.sort_by_key(|r| transports.iter().position(|t| *t == r.transport));
    ProfileResult {
        profile: p.name.to_string(),
        rate_bps: p.rate_bps,
        rtt_ms: p.rtt_us as f64 / 1e3,
        loss_percent: p.loss_percent,
        jitter_ms: p.jitter_us as f64 / 1e3,
        kcptun: kcp,
        transports: results,
    }
}

fn tool_version(program: &str, arg: &str) -> Result<String, String> {
    match run_bounded(Command::new(program).arg(arg), TOOL_TIMEOUT) {
        Ok(o) => {
            let text = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
            Ok(text)
        }
        Err(e) => Err(error_chain(&e)),
    }
}

fn debian_version(package: &str) -> Option<String> {
    let o = run_bounded(
        Command::new("dpkg-query").args(["-W", "-f=${Version}", package]),
        TOOL_TIMEOUT,
    )
    .ok()?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !v.is_empty()).then_some(v)
}

/// Runs the benchmark and writes `accel.json`, `accel.md` and `accel.svg` into `opts.out_dir`.
pub fn run(opts: &AccelBenchOptions) -> Result<Value, BenchError> {
    let mut visit: Vec<&'static Profile> = Vec::new();
    for name in opts.profiles.iter().chain(&opts.rr_profiles) {
        let p = Profile::find(name).map_err(tern_lab::LabError::from)?;
        if !visit.iter().any(|v| v.name == p.name) {
            visit.push(p);
        }
    }
    if opts.transports.is_empty() {
        return Err(BenchError::Failed {
            tool: "accel",
            detail: "no transports selected".into(),
        });
    }
    // Never tear down a lab someone else is using.
    let st = tern_lab::status()?;
    if st.up {
        return Err(tern_lab::LabError::AlreadyUp {
            profile: st.profile.unwrap_or_default(),
        }
        .into());
    }
    std::fs::create_dir_all(WORK_DIR).map_err(io(format!("create {WORK_DIR}")))?;
    let iperf3_version = tool_version("iperf3", "--version").unwrap_or_default();
    let kcptun_version = if opts.transports.contains(&Transport::Kcptun) {
        tool_version("kcptun-client", "--version")
            .map(|v| match debian_version("kcptun") {
                Some(d) => format!("{v} (Debian package {d})"),
                None => v,
            })
            .map_err(|e| {
                format!(
                    "kcptun-client not runnable ({e}); install it: apt-get install kcptun (scripts/setup.sh does)"
                )
            })
    } else {
        Err("not selected".into())
    };
    let corpus = if opts.compressible && !opts.profiles.is_empty() {
        Some(ensure_corpus(&opts.corpus_path, opts.corpus_max_bytes)?)
    } else {
        None
    };
    if let Some(c) = &corpus {
        eprintln!(
            "corpus {}: {} MiB, gzip -1 ratio {}, zstd -3 ratio {}",
            c.path.display(),
            c.bytes >> 20,
            c.gzip1_ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into()),
            c.zstd3_ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into()),
        );
    }
    let est = estimate_s(opts);
    eprintln!(
        "tern bench accel: {} profile(s), transports {}, {} s per one-flow run, {} s per other run; estimated {} min {} s",
        visit.len(),
        opts.transports
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(","),
        opts.duration_s,
        opts.short_duration_s,
        est / 60,
        est % 60
    );
    eprintln!("  (if interrupted: `tern lab down` removes the lab and every process in it)");
    let random = ensure_random_payload(
        Path::new(RANDOM_PAYLOAD),
        random_payload_bytes(opts.duration_s.max(opts.short_duration_s)),
    )?;
    let ctx = Ctx {
        opts,
        started: Instant::now(),
        corpus: corpus.as_ref(),
        random,
        kcptun_ok: kcptun_version.clone().map(|_| ()),
    };
    let mut results = Vec::new();
    for p in &visit {
        let goodput = opts.profiles.iter().any(|n| n == p.name);
        let rr = opts.rr_profiles.iter().any(|n| n == p.name);
        results.push(profile_run(&ctx, p, goodput, rr));
    }
    let elapsed = ctx.started.elapsed().as_secs();
    ctx.progress("done");

    let m = machine();
    let example_kcp = KcptunConfig::for_profile(
        Profile::find("mpls").map_err(tern_lab::LabError::from)?,
        opts.kcptun_window_packets,
        opts.kcptun_fec,
    );
    let kcp_server = format!(
        "ip netns exec {SITE_B} kcptun-server {}",
        example_kcp
            .server_args(
                &format!("{ADDR_B}:{KCP_UDP_PORT}"),
                &format!("127.0.0.1:{IPERF_PORT}"),
                false
            )
            .join(" ")
    );
    let kcp_client = format!(
        "ip netns exec {SITE_A} kcptun-client {}",
        example_kcp
            .client_args(
                &format!("127.0.0.1:{KCP_IPERF_LOCAL_PORT}"),
                &format!("{ADDR_B}:{KCP_UDP_PORT}"),
                false
            )
            .join(" ")
    );
    let mut commands = json!({
        "lab": "tern lab up --profile P   (tern: tern lab up --profile P --accel); tern lab down between configurations",
        "iperf3_server": format!("ip netns exec {SITE_B} iperf3 -s -1 -B 0.0.0.0 -p {IPERF_PORT} --rcv-timeout 15000"),
        "iperf3_client": format!("ip netns exec {SITE_A} iperf3 -J --connect-timeout 10000 -c {ADDR_B} -p {IPERF_PORT} -t S [-P 4] -C cubic|bbr -F {RANDOM_PAYLOAD}|corpus  (kcptun: -c 127.0.0.1 -p {KCP_IPERF_LOCAL_PORT}, no -C)"),
        "kcptun_server": kcp_server,
        "kcptun_client": kcp_client,
        "kcptun_notes": "shown for mpls; per profile --sndwnd/--rcvwnd = max(4096, 2 × BDP in 1350-byte packets rounded up to 1024), ≤ 32768, unless --kcptun-window; --nocomp dropped for the compressible corpus; rr uses a second pair on UDP port 29901 forwarding 127.0.0.1:17001 -> 127.0.0.1:7001",
        "rr_server": format!("ip netns exec {SITE_B} tern bench rr-server --listen 0.0.0.0:{RR_PORT} [--cc cubic|bbr]"),
        "rr_client": format!("ip netns exec {SITE_A} tern bench rr-client --connect {ADDR_B}:{RR_PORT} --count N --json [--cc cubic|bbr]  (kcptun: --connect 127.0.0.1:{KCP_RR_LOCAL_PORT})"),
    });
    let with_kcptun = opts.transports.contains(&Transport::Kcptun);
    if !with_kcptun {
        if let Some(c) = commands.as_object_mut() {
            c.retain(|k, _| !k.starts_with("kcptun"));
        }
    }
    let json = json!({
        "benchmark": "accel",
        "command": opts.command,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "elapsed_s": elapsed,
        "machine": m,
        "tools": { "iperf3": iperf3_version, "kcptun": kcptun_version.clone().unwrap_or_else(|e| format!("unavailable: {e}")) },
        "duration_s": opts.duration_s,
        "short_duration_s": opts.short_duration_s,
        "transports": opts.transports,
        "rr_count": opts.rr_count,
        "rr_response_bytes": RESPONSE_BYTES,
        "corpus": corpus,
        "commands": commands,
        "profiles": results,
    });

    let mut md = String::new();
    md.push_str("# tern bench accel — tern against kernel TCP and kcptun\n\n");
    let _ = writeln!(
        md,
        "Command: `{}`  \nMachine: {} cores, {}, kernel {}, default congestion control {}; {}; {}. Run took {} min {} s.\n",
        opts.command,
        m.cores,
        m.cpu,
        m.kernel,
        m.default_congestion_control,
        iperf3_version,
        match &kcptun_version {
            Ok(v) => v.clone(),
            Err(e) => format!("kcptun: {e}"),
        },
        elapsed / 60,
        elapsed % 60
    );
    let _ = writeln!(
        md,
        "Goodput: iperf3 from tern-a to 198.18.2.1 in tern-b, receiver-side Mbit/s, {} s per one-flow run and {} s per 4-flow run (one-flow runs are the long ones: a migration over these links lasts minutes, and over a few seconds cubic's initial slow start, not its loss-driven steady state, decides its average), incompressible payload (`-F {RANDOM_PAYLOAD}`, pseudo-random bytes: iperf3's own random payload is one 128 KiB buffer repeated, which tern's per-stream zstd window would remove), 1 flow / {PARALLEL_FLOWS} parallel flows (`-P {PARALLEL_FLOWS}`). `cubic`, `bbr`: plain kernel TCP, `-C` named. `kcptun`: iperf3 to a kcptun client on 127.0.0.1 in tern-a, KCP over UDP to the kcptun server on 198.18.2.1, which connects to the iperf3 server on 127.0.0.1 (control and data connections all tunnelled). `tern`: lab brought up with `--accel`, the plain iperf3 command with `-C bbr`. Compressible: one flow of `iperf3 -F` on the corpus (stops at the end of the file or after {} s; iperf3 counts original bytes). CPU s/GB: utime + stime of the kcptun pair or the tern nodes per GB delivered, random-payload runs. Ratios: tern goodput over the other transport's, 1 flow / 4 flows.\n",
        opts.duration_s, opts.short_duration_s, opts.short_duration_s
    );
    if let Some(c) = &corpus {
        let _ = writeln!(
            md,
            "Corpus: `{}` ({} MiB; `{}`); gzip -1 ratio {}, zstd -3 ratio {}.\n",
            c.path.display(),
            c.bytes >> 20,
            c.made_by,
            c.gzip1_ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into()),
            c.zstd3_ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into())
        );
    }
    let table = goodput_table(&results, &opts.transports);
    if !table.is_empty() {
        md.push_str("## Goodput (Mbit/s)\n\n");
        md.push_str(&table);
        md.push_str("\n![one-flow goodput per profile](accel.svg)\n\n");
    }
    let rr = rr_table(&results, &opts.transports);
    if !rr.is_empty() {
        let _ = writeln!(
            md,
            "## 1 MiB request/response\n\n{} sequential requests, each a new TCP connection: connect() start to the last byte of exactly 1 MiB (checked byte for byte). Server and client set the transport's congestion control (`tern`: bbr; `kcptun`: local legs, default).\n",
            opts.rr_count
        );
        md.push_str(&rr);
        md.push('\n');
    }
    md.push_str("## Commands\n\n");
    for (k, v) in commands.as_object().into_iter().flatten() {
        let _ = writeln!(md, "- {k}: `{}`", v.as_str().unwrap_or(""));
    }
    if with_kcptun {
        md.push_str("- kcptun per profile (window packets, FEC data/parity): ");
        md.push_str(
            &results
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {}/{}",
                        r.profile,
                        r.kcptun.window_packets,
                        r.kcptun.data_shards,
                        r.kcptun.parity_shards
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
        md.push('\n');
    }
    md.push('\n');
    let mut problems = BTreeMap::new();
    for r in &results {
        for t in &r.transports {
            let cells: [(&str, Option<String>); 4] = [
                ("1 flow", t.one_flow.as_ref().and_then(Cell::problem)),
                ("4 flows", t.four_flows.as_ref().and_then(Cell::problem)),
                (
                    "compressible",
                    t.compressible.as_ref().and_then(Cell::problem),
                ),
                ("rr", t.rr.as_ref().and_then(Cell::problem)),
            ];
            for (what, p) in cells {
                if let Some(p) = p {
                    problems.entry(p).or_insert_with(Vec::new).push(format!(
                        "{} {} {what}",
                        r.profile,
                        t.transport.name()
                    ));
                }
            }
            for n in &t.notes {
                if !n.starts_with("node pids") {
                    problems
                        .entry(n.clone())
                        .or_insert_with(Vec::new)
                        .push(format!("{} {}", r.profile, t.transport.name()));
                }
            }
        }
    }
    if !problems.is_empty() {
        md.push_str("## Not measured, failed, or suspicious\n\n");
        for (p, wheres) in &problems {
            let _ = writeln!(md, "- {}: {p}", wheres.join(", "));
        }
        md.push('\n');
    }

    let groups: Vec<ChartGroup> = results
        .iter()
        .filter(|r| r.transports.iter().any(|t| t.one_flow.is_some()))
        .map(|r| {
            (
                r.profile.clone(),
                opts.transports
                    .iter()
                    .map(|t| {
                        (
                            *t,
                            r.get(*t)
                                .and_then(|x| goodput_of(&x.one_flow))
                                .map(|b| b / 1e6),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    write_results(&opts.out_dir, "accel", &json, &md)?;
    if !groups.is_empty() {
        let svg = svg_chart("tern bench accel: one-flow goodput per profile", &groups);
        let path = opts.out_dir.join("accel.svg");
        std::fs::write(&path, svg).map_err(io(format!("write {}", path.display())))?;
    }
    println!("{md}");
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_awkward_name() {
        // Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let line = "4242 (tern (node) x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(1234 + 567));
        let plain = "17 (kcptun-client) R 1 17 17 0 -1 0 0 0 0 0 9 1 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu_ticks(plain), Some(10));
        assert_eq!(parse_stat_cpu_ticks("17 (x) R 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parens"), None);
    }

    #[test]
    fn own_stat_parses() {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_cpu_ticks(&s).is_some());
        assert!(cpu_seconds(&[std::process::id()]).is_some());
        assert_eq!(cpu_seconds(&[]), None);
    }

    #[test]
    fn kcptun_windows_follow_the_bdp() {
        let w = |n: &str| KcptunConfig::for_profile(Profile::find(n).unwrap(), None, (0, 0));
        assert_eq!(w("baseline").window_packets, 4096);
        assert_eq!(w("mpls").window_packets, 4096);
        // 1 Gbit/s × 12 ms = 1.5 MB = 1112 packets; ×2 → 2223 → 3072 → floor 4096.
        assert_eq!(w("metro").window_packets, 4096);
        assert_eq!(w("dr-50").window_packets, 10240);
        assert_eq!(w("dr-100").window_packets, 19456);
        assert_eq!((w("mpls").data_shards, w("mpls").parity_shards), (0, 0));
        let o = KcptunConfig::for_profile(Profile::find("mpls").unwrap(), Some(8192), (10, 3));
        assert_eq!(
            (o.window_packets, o.data_shards, o.parity_shards),
            (8192, 10, 3)
        );
        let a = w("mpls").common_args(false);
        assert!(a.windows(2).any(|x| x == ["--mode", "fast3"]));
        assert!(a.windows(2).any(|x| x == ["--crypt", "aes-128"]));
        assert!(a.contains(&"--nocomp".to_string()));
        assert!(
            !w("mpls")
                .common_args(true)
                .contains(&"--nocomp".to_string())
        );
    }

    #[test]
    fn transports_parse() {
        assert_eq!(Transport::parse("kcptun"), Ok(Transport::Kcptun));
        assert_eq!(Transport::parse(" tern"), Ok(Transport::Tern));
        assert!(Transport::parse("quic").is_err());
    }

    #[test]
    fn iperf3_report_parsing() {
        let v: Value = serde_json::from_str(
            r#"{"end":{"sum_sent":{"retransmits":7,"bytes":100},"sum_received":{"bits_per_second":8.0e7,"bytes":80000000,"seconds":8.0}}}"#,
        )
        .unwrap();
        assert_eq!(
            parse_goodput(&v).unwrap(),
            (8.0e7, 80_000_000, 8.0, Some(7))
        );
        let e: Value =
            serde_json::from_str(r#"{"start":{},"error":"unable to connect to server"}"#).unwrap();
        assert!(
            parse_goodput(&e)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
        assert!(parse_goodput(&serde_json::json!({"end":{}})).is_err());
    }

    #[test]
    fn node_pids_from_lab_status() {
        let v = serde_json::json!({"up": true, "nodes": [{"site": "a", "pid": 10}, {"site": "b", "pid": 11}]});
        assert_eq!(node_pids_from_status(&v), vec![10, 11]);
        assert!(node_pids_from_status(&serde_json::json!({"up": true})).is_empty());
    }

    /// Checks that tags nest and close properly (enough XML for this writer's output).
    fn well_formed(s: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if text.contains('>') {
                return Err(format!("stray > in {text:?}"));
            }
            let j = rest[i..].find('>').ok_or("unclosed tag")? + i;
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("close {name} without open"))?;
                if open != name {
                    return Err(format!("close {name} for open {open}"));
                }
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().ok_or("empty tag")?;
                stack.push(name.to_string());
            }
            let quotes = tag.matches('"').count();
            if quotes % 2 != 0 {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            rest = &rest[j + 1..];
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok(())
    }

    #[test]
    fn svg_has_one_bar_per_value_and_is_well_formed() {
        let groups = vec![
            (
                "mpls".to_string(),
                vec![
                    (Transport::Cubic, Some(27.2)),
                    (Transport::Bbr, Some(69.6)),
                    (Transport::Kcptun, Some(55.0)),
                    (Transport::Tern, None),
                ],
            ),
            (
                "a<b&c".to_string(),
                vec![
                    (Transport::Cubic, Some(900.0)),
                    (Transport::Bbr, Some(950.0)),
                    (Transport::Kcptun, Some(0.5)),
                    (Transport::Tern, Some(980.0)),
                ],
            ),
        ];
        let svg = svg_chart("one flow <Mbit/s>", &groups);
        well_formed(&svg).unwrap();
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 7);
        assert_eq!(svg.matches(">n/a<").count(), 1);
        assert!(svg.contains("a&lt;b&amp;c"));
        assert!(svg.contains("Mbit/s"));
        // Legend: one swatch per transport.
        for t in Transport::ALL {
            assert!(svg.contains(&format!(">{}</text>", t.name())));
        }
        // Axis spans 0.1 .. 1000.
        assert!(svg.contains(">0.1</text>") && svg.contains(">1000</text>"));
        let empty = svg_chart("nothing", &[]);
        well_formed(&empty).unwrap();
        assert_eq!(empty.matches(r#"class="bar""#).count(), 0);
        assert!(well_formed("<a><b></a></b>").is_err());
    }

    fn sample(t: Transport, one: Option<f64>) -> TransportResult {
        let g = |bps: f64| Goodput {
            goodput_bps: bps,
            bytes: (bps / 8.0 * 8.0) as u64,
            seconds: 8.0,
            retransmits: None,
            cpu_s: Some(1.0),
            cpu_s_per_gb: None,
            command: String::new(),
        };
        TransportResult {
            transport: t,
            one_flow: Some(match one {
                Some(v) => Cell::Ok(g(v)),
                None => Cell::Unavailable("no --accel".into()),
            }),
            four_flows: Some(match one {
                Some(v) => Cell::Ok(g(v * 1.2)),
                None => Cell::Unavailable("no --accel".into()),
            }),
            compressible: None,
            rr: None,
            cpu_s_per_gb: None,
            cpu_pids: vec![],
            notes: vec![],
        }
    }

    #[test]
    fn table_rows_and_ratios() {
        let p = Profile::find("mpls").unwrap();
        let r = ProfileResult {
            profile: "mpls".into(),
            rate_bps: p.rate_bps,
            rtt_ms: 25.0,
            loss_percent: 0.05,
            jitter_ms: 3.0,
            kcptun: KcptunConfig::for_profile(p, None, KCP_FEC_DEFAULT),
            transports: vec![
                sample(Transport::Cubic, Some(25e6)),
                sample(Transport::Bbr, Some(50e6)),
                sample(Transport::Tern, Some(90e6)),
            ],
        };
        let t = goodput_table(
            std::slice::from_ref(&r),
            &[Transport::Cubic, Transport::Bbr, Transport::Tern],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[2].contains("| 1.80 / 1.80 | 3.60 / 3.60 |"), "{t}");
        let mut r2 = r;
        r2.transports[2] = sample(Transport::Tern, None);
        let t = goodput_table(&[r2], &[Transport::Cubic, Transport::Bbr, Transport::Tern]);
        assert!(t.contains("n/a / n/a") && t.contains("– / –"), "{t}");
    }

    #[test]
    fn bounded_run_kills_a_hung_process() {
        let t = Instant::now();
        let e =
            run_bounded(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("killed after"), "{e}");
        let o = run_bounded(Command::new("echo").arg("hi"), Duration::from_secs(10)).unwrap();
        assert_eq!(o.stdout, b"hi\n");
    }

    #[test]
    fn lab_up_refused_is_reported_not_fatal() {
        if tern_lab::status().is_ok_and(|s| s.up) {
            eprintln!("skipped: a lab is up");
            return;
        }
        // A stand-in `tern` that knows no --accel (as before the accelerator existed).
        let dir = std::env::temp_dir().join(format!("tern-accel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("tern");
        std::fs::write(
            &exe,
            "#!/bin/sh\ncase \"$*\" in *--accel*) echo \"error: unexpected argument '--accel' found\" >&2; echo >&2; echo 'Usage: tern lab up' >&2; exit 2;; esac\nexit 0\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Lab::up(&exe, "mpls", true).unwrap_err();
        assert!(
            e.ends_with("error: unexpected argument '--accel' found"),
            "{e}"
        );
        let lab = Lab::up(&exe, "mpls", false).unwrap();
        drop(lab);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn estimate_of_the_default_run_is_under_45_minutes() {
        // 11 profiles × 4 transports × (31 s + 2 × 9 s), labs, kcptun, rr on mpls: ~39 min.
        let all: Vec<String> = tern_link::PROFILES
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        let opts = AccelBenchOptions {
            profiles: all,
            rr_profiles: vec!["mpls".into()],
            transports: Transport::ALL.to_vec(),
            duration_s: 30,
            short_duration_s: 8,
            compressible: true,
            rr_count: 20,
            corpus_path: PathBuf::from("/nonexistent"),
            corpus_max_bytes: 512 << 20,
            kcptun_window_packets: None,
            kcptun_fec: KCP_FEC_DEFAULT,
            out_dir: PathBuf::from("/nonexistent"),
            tern_exe: PathBuf::from("tern"),
            command: String::new(),
        };
        let s = estimate_s(&opts);
        assert!((2000..=2700).contains(&s), "{s}");
    }
}
