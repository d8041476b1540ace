//! `tern bench dr`: the guest's key-value service (serialized commits: write, fdatasync,
//! reply) under async, sync and pipelined (async + PipeCloud's gate) replication to site b,
//! driven by closed-loop clients at site a; throughput and response times per link profile.
//! Single tier only (two tiers need the overlay's counter metadata, not built yet).

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
    pub command: String,
}

const VM: &str = "bench-dr";
const BACKUP_DIR: &str = "/run/tern/vm/bench-dr-backup/b";

/// Closed-loop clients: each sends `PUT id` and waits for its `OK` before the next;
/// prints one line per reply: `<latency ms>`; stops after the given seconds.
const CLIENT: &str = r#"
import socket, sys, threading, time
n, secs = int(sys.argv[1]), float(sys.argv[2])
end = time.time() + secs
lat = []
lock = threading.Lock()
def run(k):
    s = socket.create_connection(("198.18.100.10", 7070), timeout=30)
    f = s.makefile("rw")
    i = k
    mine = []
    while time.time() < end:
        t = time.time()
        f.write("PUT %d\n" % (i % 30000))
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
        let _ = run_bounded(
            Command::new(&self.o.tern_exe).args(["vm", "stop", VM]),
            Duration::from_secs(60),
        );
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

    /// One mode: a fresh VM and backup, the clients for `seconds`; (replies/s, sorted ms).
    fn measure(&mut self, mode: &str, work: &Path) -> Result<(f64, Vec<f64>), BenchError> {
        let s = |p: &Path| p.to_str().unwrap_or("").to_string();
        let (a, b) = (
            work.join(format!("{mode}-a.img")),
            work.join(format!("{mode}-b.img")),
        );
        for v in [&a, &b] {
            let _ = std::fs::remove_file(v);
            let _ = std::fs::remove_file(format!("{}.tern.json", v.display()));
            self.tern(&["disk", "create", &s(v), "--size", "16M"], 30)?;
        }
        let av = s(&a);
        let mut start = vec![
            "vm",
            "start",
            VM,
            "--site",
            "a",
            "--mem",
            "256",
            "--workload",
            "none",
            "--volume",
            &av,
            "--append",
            "tern.kv=vda",
        ];
        if mode == "pipelined" {
            start.push("--gate");
        }
        self.tern(&start, 120)?;
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
        let serial = Path::new(tern_lab::VM_DIR)
            .join(VM)
            .join("a")
            .join("serial.log");
        let end = Instant::now() + Duration::from_secs(240);
        while !std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("tern-guest: kv serving")
        {
            if Instant::now() > end {
                return Err(fail("the key-value service did not start"));
            }
            std::thread::sleep(Duration::from_millis(250));
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
                &self.o.clients.to_string(),
                &self.o.seconds.to_string(),
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
            return Err(fail(format!("{mode}: the clients got no reply")));
        }
        if let Some(mut c) = self.backup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.tern(&["vm", "stop", VM], 60)?;
        Ok((ms.len() as f64 / f64::from(self.o.seconds), ms))
    }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    crate::tools::quantile(sorted, q)
}

pub fn run(o: &DrBenchOptions) -> Result<Value, BenchError> {
    let started = Instant::now();
    let work = PathBuf::from("/var/tmp/tern-bench-dr");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| fail(e.to_string()))?;
    let mut rows = Vec::new();
    for p in &o.profiles {
        let mut r = Run { o, backup: None };
        let _ = r.tern(&["lab", "down"], 60);
        r.tern(&["lab", "up", "--profile", p], 90)?;
        for mode in ["async", "sync", "pipelined"] {
            eprintln!("== {p} {mode}");
            let (rate, ms) = r.measure(mode, &work)?;
            eprintln!(
                "   {rate:.1} replies/s, median {:.1} ms, p99 {:.1} ms",
                pct(&ms, 0.5),
                pct(&ms, 0.99)
            );
            rows.push(json!({
                "profile": p, "mode": mode, "replies_per_s": rate, "replies": ms.len(),
                "median_ms": pct(&ms, 0.5), "p90_ms": pct(&ms, 0.9), "p99_ms": pct(&ms, 0.99),
            }));
        }
    }
    let _ = run_bounded(
        Command::new(&o.tern_exe).args(["lab", "down"]),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&work);
    let get = |p: &str, m: &str| {
        rows.iter()
            .find(|r| r["profile"] == p && r["mode"] == m)
            .and_then(|r| r["replies_per_s"].as_f64())
            .unwrap_or(0.0)
    };
    let targets: Vec<Value> = o
        .profiles
        .iter()
        .map(|p| {
            let (a, s, pl) = (get(p, "async"), get(p, "sync"), get(p, "pipelined"));
            json!({"profile": p,
                   "pipelined_vs_async": pl / a.max(1e-9), "met_90pct_of_async": pl >= 0.9 * a,
                   "pipelined_vs_sync": pl / s.max(1e-9), "met_5x_sync": pl >= 5.0 * s})
        })
        .collect();
    let v = json!({
        "bench": "dr",
        "command": o.command,
        "machine": crate::machine(),
        "clients": o.clients,
        "seconds": o.seconds,
        "rows": rows,
        "targets": targets,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let mut md = format!(
        "# tern bench dr\n\nCommand: `{}`\n\nThe guest's key-value service (serialized \
         commits: write 512 B, fdatasync, reply) on a replicated raw volume; {} closed-loop \
         clients at site a for {} s per row.\n\n| link | replication | replies/s | median ms | \
         p90 ms | p99 ms |\n|---|---|---:|---:|---:|---:|\n",
        o.command, o.clients, o.seconds
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r["profile"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["replies_per_s"].as_f64().unwrap_or(0.0),
            r["median_ms"].as_f64().unwrap_or(0.0),
            r["p90_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    md.push_str("\nTargets (pipelined >= 90% of async and >= 5x sync):\n\n");
    for t in &targets {
        md.push_str(&format!(
            "- {}: pipelined/async {:.2} ({}), pipelined/sync {:.1}x ({})\n",
            t["profile"].as_str().unwrap_or(""),
            t["pipelined_vs_async"].as_f64().unwrap_or(0.0),
            if t["met_90pct_of_async"] == true {
                "met"
            } else {
                "NOT met"
            },
            t["pipelined_vs_sync"].as_f64().unwrap_or(0.0),
            if t["met_5x_sync"] == true {
                "met"
            } else {
                "NOT met"
            },
        ));
    }
    crate::write_results(&o.out_dir, "dr", &v, &md)?;
    print!("{md}");
    Ok(v)
}
