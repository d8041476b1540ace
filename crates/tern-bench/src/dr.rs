//! `tern bench dr`: the guest's key-value service (serialized commits: write, fdatasync,
//! reply) under async, sync and pipelined (async + PipeCloud's gate) replication to site b,
//! driven by closed-loop clients at site a; throughput and response times per link profile.
//!
//! Two tiers: a front-end VM (`tern-guest --frontend`) makes `calls` sequential commits at
//! the key-value VM per client request. Pipelined gates both VMs as one protected group
//! (frames between them carry write clocks, `tern_gate::Group`); `pipelined-no-clocks`
//! gates each VM alone (the database's replies to the front end wait too) to show what the
//! clocks are worth.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::BenchError;
use crate::accel::run_bounded;
use crate::vmotion::ok_or_fail;

#[derive(Debug, Clone)]
pub struct DrBenchOptions {
    pub tern_exe: PathBuf,
    pub out_dir: PathBuf,
    pub profiles: Vec<String>,
    pub clients: u32,
    pub seconds: u32,
    /// Tier counts to measure (1 and/or 2).
    pub tiers: Vec<u32>,
    /// Two tiers: database commits per client request.
    pub calls: u32,
    /// Two tiers: closed-loop clients.
    pub tier2_clients: u32,
    /// Measurements per row (medians are reported).
    pub runs: u32,
    pub command: String,
}

const VM: &str = "bench-dr";
const FE: &str = "bench-dr-fe";
const DB_IP: &str = "198.18.100.10";
const FE_IP: &str = "198.18.100.11";
const BACKUP_DIR: &str = "/run/tern/vm/bench-dr-backup/b";

/// Closed-loop clients: each sends `PUT id` and waits for its `OK` before the next;
/// prints one line per reply: `<latency ms>`; stops after the given seconds.
const CLIENT: &str = r#"
import socket, sys, threading, time
n, secs, host, ids = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
end = time.time() + secs
lat = []
lock = threading.Lock()
def run(k):
    s = socket.create_connection((host, 7070), timeout=30)
    f = s.makefile("rw")
    i = k
    mine = []
    while time.time() < end:
        t = time.time()
        f.write("PUT %d\n" % (i % ids))
        f.flush()
        l = f.readline()
        if not l.startswith("OK"):
            break
        mine.append((time.time() - t) * 1000)
        i += n
    with lock:
        lat.extend(mine)
ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(" ".join("%.2f" % x for x in lat))
"#;

fn fail(detail: impl Into<String>) -> BenchError {
    BenchError::Failed {
        tool: "bench dr",
        detail: detail.into(),
    }
}

struct Run<'a> {
    o: &'a DrBenchOptions,
    backup: Option<Child>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.backup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for vm in [FE, VM] {
            let _ = run_bounded(
                Command::new(&self.o.tern_exe).args(["vm", "stop", vm]),
                Duration::from_secs(60),
            );
        }
        let _ = std::fs::remove_dir_all(Path::new(BACKUP_DIR).parent().unwrap_or(Path::new("/")));
    }
}

impl Run<'_> {
    fn tern(&self, args: &[&str], timeout_s: u64) -> Result<String, BenchError> {
        let out = run_bounded(
            Command::new(&self.o.tern_exe).args(args),
            Duration::from_secs(timeout_s),
        )?;
        ok_or_fail(out, &args.join(" "))
    }

    fn status(&self, ctl: &Path) -> Result<Value, BenchError> {
        let s = self.tern(&["disk", "ctl", ctl.to_str().unwrap_or(""), "status"], 30)?;
        serde_json::from_str(&s).map_err(|e| fail(e.to_string()))
    }

    /// Starts VM `name` at site a with a fresh `volume`, gated as `mode` says.
    fn start_vm(
        &self,
        name: &str,
        ip: &str,
        volume: &Path,
        append: &str,
        mode: &str,
        peer: Option<&str>,
    ) -> Result<(), BenchError> {
        let v = volume.to_str().unwrap_or("");
        let _ = std::fs::remove_file(volume);
        let _ = std::fs::remove_file(format!("{v}.tern.json"));
        self.tern(&["disk", "create", v, "--size", "64M"], 30)?;
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
            v,
            "--append",
            append,
        ];
        if mode.starts_with("pipelined") || mode == "paired" {
            start.push("--gate");
        }
        if let (Some(p), "pipelined") = (peer, mode) {
            start.extend(["--gate-peer", p]);
        }
        self.tern(&start, 120)?;
        Ok(())
    }

    fn wait_serial(&self, name: &str, marker: &str) -> Result<(), BenchError> {
        let serial = Path::new(tern_lab::VM_DIR)
            .join(name)
            .join("a")
            .join("serial.log");
        let end = Instant::now() + Duration::from_secs(240);
        while !std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains(marker)
        {
            if Instant::now() > end {
                return Err(fail(format!("{name}: no {marker:?} on the serial console")));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// One mode: fresh VMs and backup, the clients for `seconds`; (row mode, replies/s,
    /// sorted ms) per segment. `paired` is one gated VM measured twice in a row, gate off
    /// (`paired-async`) and on (`paired-pipelined`), the order alternating between runs: the
    /// same boot, NIC path and replication session, only the holding differs.
    fn measure(
        &mut self,
        mode: &str,
        tiers: u32,
        work: &Path,
        run: u32,
    ) -> Result<Vec<(String, f64, Vec<f64>)>, BenchError> {
        let s = |p: &Path| p.to_str().unwrap_or("").to_string();
        let (a, b) = (
            work.join(format!("{mode}-a.img")),
            work.join(format!("{mode}-b.img")),
        );
        let _ = std::fs::remove_file(&b);
        let _ = std::fs::remove_file(format!("{}.tern.json", b.display()));
        self.tern(&["disk", "create", &s(&b), "--size", "64M"], 30)?;
        let fe_peer = (tiers == 2).then_some(FE);
        self.start_vm(VM, DB_IP, &a, "tern.kv=vda", mode, fe_peer)?;
        if tiers == 2 {
            let fe_append = format!("tern.fe={DB_IP},{}", self.o.calls);
            let fe_vol = work.join(format!("{mode}-fe.img"));
            self.start_vm(FE, FE_IP, &fe_vol, &fe_append, mode, Some(VM))?;
        }
        let bdir = Path::new(BACKUP_DIR);
        std::fs::create_dir_all(bdir).map_err(|e| fail(e.to_string()))?;
        let child = Command::new(&self.o.tern_exe)
            .args(["disk", "serve", "--secondary"])
            .arg("--nbd")
            .arg(bdir.join("nbd.sock"))
            .arg("--control")
            .arg(bdir.join("ctl.sock"))
            .arg("--listen")
            .arg(bdir.join("repl.sock"))
            .arg(&b)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("start the backup: {e}")))?;
        self.backup = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while !bdir.join("ctl.sock").exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ctl = Path::new(tern_lab::VM_DIR)
            .join(VM)
            .join("a")
            .join("disk-ctl.sock");
        let repl_mode = if mode == "sync" { "sync" } else { "async" };
        self.tern(
            &[
                "disk",
                "ctl",
                &s(&ctl),
                "replicate",
                tern_lab::migrate_socket("a").to_str().unwrap_or(""),
                "site-b",
                "bench-dr-backup/b/repl.sock",
                repl_mode,
            ],
            30,
        )?;
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let st = self.status(&ctl)?;
            if st["in_sync"] == true && (mode != "sync" || st["synchronous"] == true) {
                break;
            }
            if Instant::now() > end {
                return Err(fail(format!("{mode}: backup not in sync: {st}")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.wait_serial(VM, "tern-guest: kv serving")?;
        let (host, clients, ids) = if tiers == 2 {
            self.wait_serial(FE, "tern-guest: frontend serving")?;
            (FE_IP, self.o.tier2_clients, 120_000 / self.o.calls.max(1))
        } else {
            (DB_IP, self.o.clients, 120_000)
        };
        let segments: Vec<(&str, Option<&str>)> = if mode == "paired" {
            // Which goes first alternates between runs (a fresh guest warms up).
            let mut v = vec![
                ("paired-async", Some("off")),
                ("paired-pipelined", Some("on")),
            ];
            if run % 2 == 1 {
                v.reverse();
            }
            v
        } else {
            vec![(mode, None)]
        };
        let mut got = Vec::new();
        for (label, gate) in segments {
            if let Some(g) = gate {
                self.tern(&["disk", "ctl", &s(&ctl), "gate", g], 30)?;
            }
            let out = run_bounded(
                Command::new(&self.o.tern_exe).args([
                    "lab",
                    "exec",
                    "a",
                    "--",
                    "python3",
                    "-c",
                    CLIENT,
                    &clients.to_string(),
                    &self.o.seconds.to_string(),
                    host,
                    &ids.to_string(),
                ]),
                Duration::from_secs(u64::from(self.o.seconds) + 120),
            )?;
            let text = ok_or_fail(out, "the key-value clients")?;
            let mut ms: Vec<f64> = text
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            ms.sort_by(f64::total_cmp);
            if ms.is_empty() {
                return Err(fail(format!("{label}: the clients got no reply")));
            }
            got.push((
                label.to_string(),
                ms.len() as f64 / f64::from(self.o.seconds),
                ms,
            ));
        }
        if let Some(mut c) = self.backup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if tiers == 2 {
            self.tern(&["vm", "stop", FE], 60)?;
        }
        self.tern(&["vm", "stop", VM], 60)?;
        Ok(got)
    }
}

/// `dr.svg` (throughput) and `dr-latency.svg` (median response time): one group per link
/// profile and tier count, one bar per replication mode.
fn write_charts(o: &DrBenchOptions, rows: &[Value]) -> Result<(), BenchError> {
    use crate::chart::{Series, log_bars};
    let modes = [
        ("async", "#9e9e9e"),
        ("sync", "#d62728"),
        ("pipelined", "#2ca02c"),
        ("pipelined-no-clocks", "#ff7f0e"),
    ];
    let series: Vec<Series> = modes
        .iter()
        .map(|(m, c)| Series {
            name: (*m).to_string(),
            colour: c,
        })
        .collect();
    let groups = |key: &str| -> Vec<(String, Vec<Option<f64>>)> {
        let mut g = Vec::new();
        for p in &o.profiles {
            for &t in &o.tiers {
                let bars = modes
                    .iter()
                    .map(|(m, _)| {
                        rows.iter()
                            .find(|r| r["profile"] == *p && r["tiers"] == t && r["mode"] == *m)
                            .and_then(|r| r[key].as_f64())
                    })
                    .collect();
                g.push((
                    format!("{p} {t} tier{}", if t == 1 { "" } else { "s" }),
                    bars,
                ));
            }
        }
        g
    };
    let svgs = [
        (
            "dr.svg",
            log_bars(
                "Disaster recovery: key-value replies/s by replication mode",
                "replies/s",
                "/s",
                &series,
                &groups("replies_per_s"),
            ),
        ),
        (
            "dr-latency.svg",
            log_bars(
                "Disaster recovery: median response time by replication mode",
                "median response time, ms",
                "ms",
                &series,
                &groups("median_ms"),
            ),
        ),
    ];
    for (name, svg) in svgs {
        let path = o.out_dir.join(name);
        std::fs::write(&path, svg).map_err(|source| BenchError::Io {
            what: format!("write {}", path.display()),
            source,
        })?;
    }
    Ok(())
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    crate::tools::quantile(sorted, q)
}

/// The median of a few runs' rates (sorted): the middle one, or the mean of the two
/// middle ones for an even count (the lower one alone biases a 4-run row).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn run(o: &DrBenchOptions) -> Result<Value, BenchError> {
    let started = Instant::now();
    let work = PathBuf::from("/var/tmp/tern-bench-dr");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| fail(e.to_string()))?;
    let mut rows = Vec::new();
    let cells: Vec<(u32, &str)> = o
        .tiers
        .iter()
        .flat_map(|&t| {
            let modes: &[&str] = if t == 2 {
                &["async", "sync", "pipelined", "pipelined-no-clocks"]
            } else {
                &["async", "sync", "pipelined", "paired"]
            };
            modes.iter().map(move |m| (t, *m))
        })
        .collect();
    for p in &o.profiles {
        // Runs interleave the modes (async, sync, pipelined, async, ...) so slow drifts of
        // this shared machine hit every mode alike; each measurement gets a fresh lab, so no
        // row inherits another's queues, streams or relay state.
        let mut order: Vec<(u32, String)> = Vec::new();
        let mut got: std::collections::HashMap<(u32, String), (Vec<f64>, Vec<f64>)> =
            std::collections::HashMap::new();
        for run in 0..o.runs {
            for &(tiers, mode) in &cells {
                let mut r = Run { o, backup: None };
                let _ = r.tern(&["lab", "down"], 60);
                r.tern(&["lab", "up", "--profile", p], 90)?;
                eprintln!("== {p} run {run} {tiers} tier(s) {mode}");
                for (label, rate, ms) in r.measure(mode, tiers, &work, run)? {
                    eprintln!(
                        "   {label}: {rate:.1} replies/s, median {:.1} ms, p99 {:.1} ms",
                        pct(&ms, 0.5),
                        pct(&ms, 0.99)
                    );
                    let key = (tiers, label);
                    if !order.contains(&key) {
                        order.push(key.clone());
                    }
                    let e = got.entry(key).or_default();
                    e.0.push(rate);
                    e.1.extend(ms);
                }
            }
        }
        for key in order {
            let (rates, mut ms) = got.remove(&key).unwrap_or_default();
            ms.sort_by(f64::total_cmp);
            let mut sorted = rates.clone();
            sorted.sort_by(f64::total_cmp);
            rows.push(json!({
                "profile": p, "tiers": key.0, "mode": key.1,
                "replies_per_s": median(&sorted), "runs_replies_per_s": rates,
                "replies": ms.len(),
                "median_ms": pct(&ms, 0.5), "p90_ms": pct(&ms, 0.9), "p99_ms": pct(&ms, 0.99),
            }));
        }
    }
    let _ = run_bounded(
        Command::new(&o.tern_exe).args(["lab", "down"]),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&work);
    let get = |p: &str, t: u32, m: &str, k: &str| {
        rows.iter()
            .find(|r| r["profile"] == p && r["tiers"] == t && r["mode"] == m)
            .and_then(|r| r[k].as_f64())
    };
    let mut targets: Vec<Value> = Vec::new();
    for p in &o.profiles {
        let rate = |m| get(p, 1, m, "replies_per_s");
        if let (Some(a), Some(s), Some(pl)) = (rate("async"), rate("sync"), rate("pipelined")) {
            targets.push(json!({"profile": p, "tiers": 1,
                "pipelined_vs_async": pl / a.max(1e-9), "met_90pct_of_async": pl >= 0.9 * a,
                "pipelined_vs_sync": pl / s.max(1e-9), "met_5x_sync": pl >= 5.0 * s}));
        }
        if let (Some(a), Some(pl)) = (rate("paired-async"), rate("paired-pipelined")) {
            targets.push(json!({"profile": p, "tiers": 1, "paired": true,
                "pipelined_vs_async": pl / a.max(1e-9), "met_90pct_of_async": pl >= 0.9 * a}));
        }
        let med = |m| get(p, 2, m, "median_ms");
        if let (Some(s), Some(pl)) = (med("sync"), med("pipelined")) {
            targets.push(json!({"profile": p, "tiers": 2,
                "sync_median_vs_pipelined": s / pl.max(1e-9), "met_3x_lower": s >= 3.0 * pl}));
        }
    }
    let v = json!({
        "bench": "dr",
        "command": o.command,
        "machine": crate::machine(),
        "clients": o.clients,
        "tier2_clients": o.tier2_clients,
        "calls": o.calls,
        "seconds": o.seconds,
        "runs": o.runs,
        "rows": rows,
        "targets": targets,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let mut md = format!(
        "# tern bench dr\n\nCommand: `{}`\n\nThe guest's key-value service (serialized \
         commits: write 512 B, fdatasync, reply) on a replicated raw volume at site a, backup \
         at b; {} closed-loop clients at site a for {} s per measurement, {} measurement(s) \
         per row (modes interleaved, a fresh lab each; replies/s is the median, latencies are \
         pooled). Two tiers: a front-end VM makes {} sequential commits at the key-value VM \
         per request, {} clients.\n\n\
         | link | tiers | replication | replies/s | median ms | p90 ms | p99 ms |\n\
         |---|---:|---|---:|---:|---:|---:|\n",
        o.command, o.clients, o.seconds, o.runs, o.calls, o.tier2_clients
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r["profile"].as_str().unwrap_or(""),
            r["tiers"],
            r["mode"].as_str().unwrap_or(""),
            r["replies_per_s"].as_f64().unwrap_or(0.0),
            r["median_ms"].as_f64().unwrap_or(0.0),
            r["p90_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    md.push_str(
        "\nTargets (one tier: pipelined >= 90% of async and >= 5x sync throughput; two \
         tiers: median response time >= 3x lower than sync):\n\n",
    );
    let met = |b: bool| if b { "met" } else { "NOT met" };
    for t in targets.iter().filter(|t| t["tiers"] == 2) {
        md.push_str(&format!(
            "- {} two tiers: sync median / pipelined median {:.1}x ({})\n",
            t["profile"].as_str().unwrap_or(""),
            t["sync_median_vs_pipelined"].as_f64().unwrap_or(0.0),
            met(t["met_3x_lower"] == true)
        ));
    }
    for t in targets.iter().filter(|t| t["tiers"] == 1) {
        let name = t["profile"].as_str().unwrap_or("");
        let ratio = t["pipelined_vs_async"].as_f64().unwrap_or(0.0);
        let ok90 = met(t["met_90pct_of_async"] == true);
        if t["paired"] == true {
            md.push_str(&format!(
                "- {name} paired (one gated VM, gate off then on): pipelined/async {ratio:.2} \
                 ({ok90})\n"
            ));
        } else {
            md.push_str(&format!(
                "- {name}: pipelined/async {ratio:.2} ({ok90}), pipelined/sync {:.1}x ({})\n",
                t["pipelined_vs_sync"].as_f64().unwrap_or(0.0),
                met(t["met_5x_sync"] == true)
            ));
        }
    }
    crate::write_results(&o.out_dir, "dr", &v, &md)?;
    write_charts(o, &rows)?;
    print!("{md}");
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(super::median(&[]), 0.0);
        assert_eq!(super::median(&[1.0, 5.0, 9.0]), 5.0);
        assert_eq!(super::median(&[156.7, 187.7, 277.2, 321.9]), 232.45);
    }
}
