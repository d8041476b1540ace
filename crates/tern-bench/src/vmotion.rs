//! `tern bench vmotion`: the seed's VMotion table (HyperIP 000/001) with QEMU guests.
//!
//! One reference VM (default 512 MiB, `web-db`) boots at site A of a lab with the profile;
//! each run migrates it once per method (QEMU over kernel TCP cubic, over bbr, and tern),
//! back and forth between the sites, through the real `tern migrate` command. Every
//! migration is verified (RAM byte for byte with `--check-memory`, and the guest's own
//! checksums). Medians per profile and method go into `vmotion.{json,md,svg}`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::accel::run_bounded;
use crate::chart::{Series, log_bars};
use crate::{BenchError, machine, write_results};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Cubic,
    Bbr,
    Tern,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Cubic, Method::Bbr, Method::Tern];
    pub fn name(self) -> &'static str {
        match self {
            Method::Cubic => "cubic",
            Method::Bbr => "bbr",
            Method::Tern => "tern",
        }
    }
    pub fn parse(s: &str) -> Result<Method, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method {s:?} (cubic, bbr, tern)"))
    }
    fn label(self) -> &'static str {
        match self {
            Method::Cubic => "QEMU over TCP cubic (no accel)",
            Method::Bbr => "QEMU over TCP bbr",
            Method::Tern => "tern",
        }
    }
    fn colour(self) -> &'static str {
        match self {
            Method::Cubic => "#8c8c8c",
            Method::Bbr => "#4c72b0",
            Method::Tern => "#55a868",
        }
    }
    fn args(self) -> Vec<&'static str> {
        match self {
            Method::Cubic => vec!["--direct", "--cc", "cubic"],
            Method::Bbr => vec!["--direct", "--cc", "bbr"],
            Method::Tern => vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmotionOptions {
    pub profiles: Vec<String>,
    pub methods: Vec<Method>,
    pub runs: u32,
    pub mem_mib: u32,
    pub workload: String,
    /// The workload's page-dirtying rate, MiB/s.
    pub rate_mb_s: u32,
    pub seed: u64,
    pub check_memory: bool,
    pub migrate_timeout_s: u64,
    pub out_dir: PathBuf,
    pub tern_exe: PathBuf,
    pub command: String,
}

/// One migration as `tern migrate --json` reported it, or why it failed.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub profile: String,
    pub method: Method,
    pub run: u32,
    pub ok: bool,
    pub report: Value,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub profile: String,
    pub method: Method,
    pub runs: usize,
    pub failed: usize,
    pub total_s: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub wire_mib: Option<f64>,
    pub qemu_mib: Option<f64>,
    pub all_verified: bool,
}

/// Median of `key` × `scale` over completed migrations' `tern migrate --json` reports.
pub(crate) fn median_of(reports: &[&Value], key: &str, scale: f64) -> Option<f64> {
    median(
        reports
            .iter()
            .filter_map(|r| r[key].as_f64())
            .map(|v| v * scale)
            .collect(),
    )
}

/// At least one report, and every one verified.
pub(crate) fn all_verified(reports: &[&Value]) -> bool {
    !reports.is_empty()
        && reports
            .iter()
            .all(|r| r["verified"].as_bool() == Some(true))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn summarize(results: &[RunResult], profiles: &[String], methods: &[Method]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for p in profiles {
        for &m in methods {
            let rs: Vec<&RunResult> = results
                .iter()
                .filter(|r| &r.profile == p && r.method == m)
                .collect();
            let ok: Vec<&Value> = rs.iter().filter(|r| r.ok).map(|r| &r.report).collect();
            let f = |k: &str, scale: f64| median_of(&ok, k, scale);
            let mib = 1.0 / (1u64 << 20) as f64;
            cells.push(Cell {
                profile: p.clone(),
                method: m,
                runs: rs.len(),
                failed: rs.len() - ok.len(),
                total_s: f("total_s", 1.0),
                downtime_ms: f("downtime_ms", 1.0),
                wire_mib: f("wire_bytes", mib),
                qemu_mib: f("qemu_bytes", mib),
                all_verified: all_verified(&ok),
            });
        }
    }
    cells
}

fn mmss(s: f64) -> String {
    let m = (s / 60.0).floor();
    format!("{:02}:{:04.1}", m as u64, s - m * 60.0)
}

pub fn markdown(opts: &VmotionOptions, cells: &[Cell]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# tern bench vmotion\n");
    let _ = writeln!(
        md,
        "Command: `{}`. Reference VM: {} MiB, workload `{}` dirtying {} MiB/s, QEMU 7.2 TCG; \
         {} run(s) per cell, medians; methods alternate within each run and the VM moves back \
         and forth.\n",
        opts.command, opts.mem_mib, opts.workload, opts.rate_mb_s, opts.runs
    );
    let get = |p: &str, m: Method| cells.iter().find(|c| c.profile == p && c.method == m);
    let header = |md: &mut String, what: &str| {
        let _ = write!(md, "| {what} |");
        for p in &opts.profiles {
            let _ = write!(md, " {p} |");
        }
        let _ = write!(md, "\n|---|");
        for _ in &opts.profiles {
            let _ = write!(md, "---:|");
        }
        md.push('\n');
    };
    type Fmt = fn(&Cell) -> Option<String>;
    let tables: [(&str, Fmt); 3] = [
        ("Total migration time (mm:ss)", |c| c.total_s.map(mmss)),
        ("Downtime, source STOP to destination RESUME (ms)", |c| {
            c.downtime_ms.map(|v| format!("{v:.0}"))
        }),
        (
            "Bytes on the WAN link (MiB; QEMU's own count in brackets)",
            |c| {
                c.wire_mib
                    .map(|w| format!("{w:.1} ({:.1})", c.qemu_mib.unwrap_or(0.0)))
            },
        ),
    ];
    for (title, f) in tables {
        let _ = writeln!(md, "## {title}\n");
        header(&mut md, "method");
        for &m in &opts.methods {
            let _ = write!(md, "| {} |", m.label());
            for p in &opts.profiles {
                let v = get(p, m).and_then(|c| {
                    let mut s = f(c)?;
                    if c.failed > 0 {
                        let _ = write!(s, " ({} failed)", c.failed);
                    }
                    Some(s)
                });
                let _ = write!(md, " {} |", v.unwrap_or_else(|| "failed".into()));
            }
            md.push('\n');
        }
        md.push('\n');
    }
    let _ = writeln!(md, "## Targets\n");
    let t = |p: &str, m| get(p, m).and_then(|c| c.total_s);
    if let (Some(c), Some(tn)) = (t("mpls", Method::Cubic), t("mpls", Method::Tern)) {
        let _ = writeln!(
            md,
            "- mpls: tern {:.1} s vs QEMU over cubic {:.1} s = **{:.1}× faster** (target ≥ 6×).",
            tn,
            c,
            c / tn
        );
    }
    if let Some(base) = t("baseline", Method::Cubic).or(t("baseline", Method::Bbr)) {
        for p in opts.profiles.iter().filter(|p| *p != "baseline") {
            if let Some(tn) = t(p, Method::Tern) {
                let _ = writeln!(
                    md,
                    "- {p}: tern {:.1} s = {:.2}× the baseline row ({:.1} s; target ≤ 1.5×).",
                    tn,
                    tn / base,
                    base
                );
            }
        }
    }
    let unverified: Vec<String> = cells
        .iter()
        .filter(|c| c.runs > c.failed && !c.all_verified)
        .map(|c| format!("{} {}", c.profile, c.method.name()))
        .collect();
    let _ = writeln!(
        md,
        "- Verified (RAM compared byte for byte and guest checksums) on every completed run: {}",
        if unverified.is_empty() {
            "yes".to_string()
        } else {
            format!("NO: {}", unverified.join(", "))
        }
    );
    md
}

fn tern(opts: &VmotionOptions) -> Command {
    Command::new(&opts.tern_exe)
}

pub(crate) fn ok_or_fail(out: std::process::Output, what: &str) -> Result<String, BenchError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BenchError::Failed {
            tool: "tern",
            detail: format!(
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        })
    }
}

const VM: &str = "vmotion-ref";

/// Boots the reference VM at site `a` and waits until its workload is ready.
fn start_vm(opts: &VmotionOptions) -> Result<(), BenchError> {
    boot_vm(
        &opts.tern_exe,
        VM,
        opts.mem_mib,
        &opts.workload,
        opts.rate_mb_s,
    )
}

/// Boots VM `vm` at site `a` with a tern-guest workload and waits for its first good
/// verification pass.
pub(crate) fn boot_vm(
    tern_exe: &std::path::Path,
    vm: &str,
    mem_mib: u32,
    workload: &str,
    rate_mb_s: u32,
) -> Result<(), BenchError> {
    let tern = || Command::new(tern_exe);
    let mem = mem_mib.to_string();
    let rate = rate_mb_s.to_string();
    let out = run_bounded(
        tern().args([
            "vm",
            "start",
            vm,
            "--site",
            "a",
            "--mem",
            &mem,
            "--workload",
            workload,
            "--rate",
            &rate,
        ]),
        Duration::from_secs(60),
    )?;
    ok_or_fail(out, "vm start")?;
    let list = ok_or_fail(
        run_bounded(
            tern().args(["vm", "list", "--json"]),
            Duration::from_secs(30),
        )?,
        "vm list",
    )?;
    let v: Value = serde_json::from_str(&list).map_err(|e| BenchError::Tool {
        tool: "tern vm list",
        detail: e.to_string(),
    })?;
    let log = v
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == vm))
        .and_then(|x| x["serial_log"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| BenchError::Tool {
            tool: "tern vm list",
            detail: format!("{vm} not listed"),
        })?;
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("tern-guest: verify ok") {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(BenchError::Failed {
                tool: "guest",
                detail: format!("{vm} not ready after 600 s; see {}", log.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One `tern migrate --json`: (completed, its report, why not).
pub(crate) fn migrate_once(
    tern_exe: &std::path::Path,
    vm: &str,
    to: &str,
    args: &[&str],
    check_memory: bool,
    timeout_s: u64,
) -> Result<(bool, Value, Option<String>), BenchError> {
    let timeout = timeout_s.to_string();
    let mut cmd = Command::new(tern_exe);
    cmd.args(["migrate", vm, "--to", to, "--json", "--quiet"])
        .args(["--timeout", &timeout])
        .args(args);
    if check_memory {
        cmd.arg("--check-memory");
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(timeout_s + 300))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    let ok = out.status.success() && report["total_s"].is_number();
    let error = (!ok).then(|| {
        report["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
    });
    Ok((ok, report, error))
}

pub fn run(opts: &VmotionOptions) -> Result<Value, BenchError> {
    let mut results: Vec<RunResult> = Vec::new();
    let started = Instant::now();
    for profile in &opts.profiles {
        eprintln!("== {profile}");
        let seed = opts.seed.to_string();
        let up = run_bounded(
            tern(opts).args(["lab", "up", "--profile", profile, "--seed", &seed]),
            Duration::from_secs(90),
        )?;
        ok_or_fail(up, "lab up")?;
        let outcome = (|| -> Result<(), BenchError> {
            start_vm(opts)?;
            let mut site = "a";
            for run in 0..opts.runs {
                for &m in &opts.methods {
                    let to = if site == "a" { "b" } else { "a" };
                    let (ok, report, error) = migrate_once(
                        &opts.tern_exe,
                        VM,
                        to,
                        &m.args(),
                        opts.check_memory,
                        opts.migrate_timeout_s,
                    )?;
                    eprintln!(
                        "   run {run} {:<5} {site}->{to}: {}",
                        m.name(),
                        if ok {
                            format!(
                                "{:.2} s, downtime {:.0} ms, wire {:.1} MiB, verified {}",
                                report["total_s"].as_f64().unwrap_or(0.0),
                                report["downtime_ms"].as_f64().unwrap_or(0.0),
                                report["wire_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                                report["verified"]
                            )
                        } else {
                            format!("FAILED: {}", error.clone().unwrap_or_default())
                        }
                    );
                    if ok {
                        site = to;
                    }
                    results.push(RunResult {
                        profile: profile.clone(),
                        method: m,
                        run,
                        ok,
                        report,
                        error,
                    });
                }
            }
            Ok(())
        })();
        let _ = run_bounded(tern(opts).args(["vm", "stop", VM]), Duration::from_secs(60));
        let _ = run_bounded(tern(opts).args(["lab", "down"]), Duration::from_secs(60));
        if let Err(e) = outcome {
            eprintln!("   {profile}: {}", crate::error_chain(&e));
            results.push(RunResult {
                profile: profile.clone(),
                method: Method::Tern,
                run: 0,
                ok: false,
                report: Value::Null,
                error: Some(crate::error_chain(&e)),
            });
        }
    }
    let cells = summarize(&results, &opts.profiles, &opts.methods);
    let md = markdown(opts, &cells);
    let series: Vec<Series> = opts
        .methods
        .iter()
        .map(|m| Series {
            name: m.label().to_string(),
            colour: m.colour(),
        })
        .collect();
    let groups: Vec<(String, Vec<Option<f64>>)> = opts
        .profiles
        .iter()
        .map(|p| {
            let v = opts
                .methods
                .iter()
                .map(|&m| {
                    cells
                        .iter()
                        .find(|c| &c.profile == p && c.method == m)
                        .and_then(|c| c.total_s)
                })
                .collect();
            (p.clone(), v)
        })
        .collect();
    let svg = log_bars(
        "Live migration of the reference VM: total time (median)",
        "total time, s",
        "s",
        &series,
        &groups,
    );
    let json = json!({
        "command": opts.command,
        "machine": machine(),
        "mem_mib": opts.mem_mib,
        "workload": opts.workload,
        "rate_mb_s": opts.rate_mb_s,
        "runs": opts.runs,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "cells": cells,
        "results": results,
    });
    write_results(&opts.out_dir, "vmotion", &json, &md)?;
    let svg_path = opts.out_dir.join("vmotion.svg");
    std::fs::write(&svg_path, svg).map_err(|source| BenchError::Io {
        what: format!("write {}", svg_path.display()),
        source,
    })?;
    println!("{md}");
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(profile: &str, m: Method, total: f64, ok: bool) -> RunResult {
        RunResult {
            profile: profile.into(),
            method: m,
            run: 0,
            ok,
            report: json!({"total_s": total, "downtime_ms": 100.0, "wire_bytes": 1048576.0 * 10.0,
                           "qemu_bytes": 1048576.0 * 20.0, "verified": true}),
            error: None,
        }
    }

    #[test]
    fn medians_targets_and_failures() {
        let profiles = vec!["baseline".to_string(), "mpls".to_string()];
        let results = vec![
            r("baseline", Method::Cubic, 4.0, true),
            r("baseline", Method::Tern, 5.0, true),
            r("mpls", Method::Cubic, 60.0, true),
            r("mpls", Method::Cubic, 80.0, true),
            r("mpls", Method::Cubic, 999.0, false),
            r("mpls", Method::Tern, 10.0, true),
        ];
        let cells = summarize(&results, &profiles, &[Method::Cubic, Method::Tern]);
        let c = cells
            .iter()
            .find(|c| c.profile == "mpls" && c.method == Method::Cubic)
            .unwrap();
        assert_eq!(c.total_s, Some(70.0));
        assert_eq!((c.runs, c.failed), (3, 1));
        assert_eq!(c.wire_mib, Some(10.0));
        let opts = VmotionOptions {
            profiles,
            methods: vec![Method::Cubic, Method::Tern],
            runs: 2,
            mem_mib: 512,
            workload: "web-db".into(),
            rate_mb_s: 2,
            seed: 1,
            check_memory: true,
            migrate_timeout_s: 60,
            out_dir: "/tmp".into(),
            tern_exe: "tern".into(),
            command: "tern bench vmotion".into(),
        };
        let md = markdown(&opts, &cells);
        assert!(md.contains("7.0× faster"), "{md}");
        assert!(md.contains("2.50× the baseline"), "{md}");
        assert!(md.contains("01:10.0 (1 failed)"), "{md}");
        assert_eq!(mmss(256.0), "04:16.0");
    }
}
