//! `tern bench cloudnet`: CloudNet's Tables 6.1/6.2 on QEMU guests.
//!
//! For each workload (CloudNet's TPC-W, kernel compile, SPECjbb as tern-guest's `web-db`,
//! `kernel-compile`, `java-heap`) and run: a fresh lab on the profile (default
//! `cloudnet-lab`, 100 Mbit/s, 20 ms), cold content stores, one VM booted at site A, then
//! one migration per configuration with the VM moving back and forth: QEMU's own options
//! over kernel TCP (cubic) and tern with each optimization alone and all together, the last
//! followed at once by a migration back (follow-the-sun: the content store's case). Every
//! migration is checked byte for byte (`--check-memory`) and by the guest's checksums.
//! Medians per workload and configuration go into `cloudnet.{json,md,svg}`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::accel::run_bounded;
use crate::chart::{Series, log_bars};
use crate::vmotion::{all_verified, boot_vm, median_of, migrate_once, ok_or_fail};
use crate::{BenchError, machine, write_results};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    QemuDefault,
    QemuXbzrle,
    QemuMultifdZstd,
    QemuBest,
    TernNone,
    TernRe,
    TernDelta,
    TernZstd,
    #[serde(rename = "tern-smart-stop")]
    TernSmart,
    TernAll,
    /// Straight after `TernAll`, back to where the VM came from.
    #[serde(rename = "tern-all-return")]
    TernReturn,
}

impl Config {
    pub const ALL: [Config; 11] = [
        Config::QemuDefault,
        Config::QemuXbzrle,
        Config::QemuMultifdZstd,
        Config::QemuBest,
        Config::TernNone,
        Config::TernRe,
        Config::TernDelta,
        Config::TernZstd,
        Config::TernSmart,
        Config::TernAll,
        Config::TernReturn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::QemuDefault => "qemu-default",
            Config::QemuXbzrle => "qemu-xbzrle",
            Config::QemuMultifdZstd => "qemu-multifd-zstd",
            Config::QemuBest => "qemu-best",
            Config::TernNone => "tern-none",
            Config::TernRe => "tern-re",
            Config::TernDelta => "tern-delta",
            Config::TernZstd => "tern-zstd",
            Config::TernSmart => "tern-smart-stop",
            Config::TernAll => "tern-all",
            Config::TernReturn => "tern-all-return",
        }
    }

    pub fn parse(s: &str) -> Result<Config, String> {
        Config::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Config::ALL.iter().map(|c| c.name()).collect();
                format!("unknown configuration {s:?} ({})", names.join(", "))
            })
    }

    pub fn label(self) -> &'static str {
        match self {
            Config::QemuDefault => "QEMU default (TCP cubic)",
            Config::QemuXbzrle => "QEMU xbzrle (cache 1/4 RAM)",
            Config::QemuMultifdZstd => "QEMU multifd zstd (2 channels)",
            Config::QemuBest => "QEMU best: multifd zstd + auto-converge",
            Config::TernNone => "tern transport only",
            Config::TernRe => "tern RE alone",
            Config::TernDelta => "tern page deltas alone",
            Config::TernZstd => "tern stream zstd alone",
            Config::TernSmart => "tern smart stop alone",
            Config::TernAll => "tern all",
            Config::TernReturn => "tern all, migrating back (follow-the-sun)",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Config::QemuDefault => "#8c8c8c",
            Config::QemuXbzrle => "#b07aa1",
            Config::QemuMultifdZstd => "#4c72b0",
            Config::QemuBest => "#1f3b73",
            Config::TernNone => "#c6e3c2",
            Config::TernRe => "#a1d99b",
            Config::TernDelta => "#74c476",
            Config::TernZstd => "#41ab5d",
            Config::TernSmart => "#dd8452",
            Config::TernAll => "#238b45",
            Config::TernReturn => "#00441b",
        }
    }

    /// `tern migrate` arguments; `mem_mib` sizes the xbzrle cache.
    pub fn args(self, mem_mib: u32) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let qemu = [
            "--direct",
            "--cc",
            "cubic",
            "--codec",
            "none",
            "--smart-stop",
            "off",
        ];
        let multifd = [
            "--qemu-cap",
            "multifd",
            "--qemu-param",
            "multifd-compression=zstd",
        ];
        let tern = |codec: &str, smart: &str| v(&["--codec", codec, "--smart-stop", smart]);
        match self {
            Config::QemuDefault => v(&qemu),
            Config::QemuXbzrle => {
                let mut a = v(&qemu);
                a.extend(v(&["--qemu-cap", "xbzrle", "--qemu-param"]));
                a.push(format!(
                    "xbzrle-cache-size={}",
                    u64::from(mem_mib) * (1 << 20) / 4
                ));
                a
            }
            Config::QemuMultifdZstd => [v(&qemu), v(&multifd)].concat(),
            Config::QemuBest => {
                [v(&qemu), v(&multifd), v(&["--qemu-cap", "auto-converge"])].concat()
            }
            Config::TernNone => tern("none", "off"),
            Config::TernRe => tern("re", "off"),
            Config::TernDelta => tern("delta", "off"),
            Config::TernZstd => tern("zstd", "off"),
            Config::TernSmart => tern("none", "on"),
            Config::TernAll | Config::TernReturn => tern("all", "on"),
        }
    }

    fn is_qemu(self) -> bool {
        matches!(
            self,
            Config::QemuDefault | Config::QemuXbzrle | Config::QemuMultifdZstd | Config::QemuBest
        )
    }
}

#[derive(Debug, Clone)]
pub struct CloudnetOptions {
    pub profile: String,
    pub workloads: Vec<String>,
    pub configs: Vec<Config>,
    pub runs: u32,
    pub mem_mib: u32,
    /// Records each workload rewrites, MiB/s (QEMU sees about twice that in dirty pages).
    pub rate_mb_s: u32,
    pub seed: u64,
    pub migrate_timeout_s: u64,
    pub out_dir: PathBuf,
    pub tern_exe: PathBuf,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub workload: String,
    pub config: Config,
    pub run: u32,
    pub ok: bool,
    pub report: Value,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub workload: String,
    pub config: Config,
    pub runs: usize,
    pub failed: usize,
    pub wire_mib: Option<f64>,
    pub qemu_mib: Option<f64>,
    pub total_s: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub iterations: Option<f64>,
    pub all_verified: bool,
}

pub fn summarize(results: &[RunResult], workloads: &[String], configs: &[Config]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for w in workloads {
        for &c in configs {
            let rs: Vec<&RunResult> = results
                .iter()
                .filter(|r| &r.workload == w && r.config == c)
                .collect();
            let ok: Vec<&Value> = rs.iter().filter(|r| r.ok).map(|r| &r.report).collect();
            let f = |k: &str, scale: f64| median_of(&ok, k, scale);
            let mib = 1.0 / (1u64 << 20) as f64;
            cells.push(Cell {
                workload: w.clone(),
                config: c,
                runs: rs.len(),
                failed: rs.len() - ok.len(),
                wire_mib: f("wire_bytes", mib),
                qemu_mib: f("qemu_bytes", mib),
                total_s: f("total_s", 1.0),
                downtime_ms: f("downtime_ms", 1.0),
                iterations: f("iterations", 1.0),
                all_verified: all_verified(&ok),
            });
        }
    }
    cells
}

fn pct(new: f64, old: f64) -> String {
    format!("{:+.0}%", (new / old - 1.0) * 100.0)
}

pub fn markdown(opts: &CloudnetOptions, cells: &[Cell]) -> String {
    let mut md = String::new();
    let get = |w: &str, c: Config| cells.iter().find(|x| x.workload == w && x.config == c);
    let _ = writeln!(md, "# tern bench cloudnet\n");
    let _ = writeln!(
        md,
        "Command: `{}`. Profile `{}`; one {} MiB VM per workload and run (QEMU 7.2 TCG, \
         workload writing {} MiB/s of records), a fresh lab and cold content stores per run; \
         {} run(s) per cell, medians. Wire bytes are IP bytes the sending site put on the \
         emulated link. Every completed migration was checked byte for byte in guest RAM and \
         by the guest's own checksums.\n",
        opts.command, opts.profile, opts.mem_mib, opts.rate_mb_s, opts.runs
    );
    // Table 6.1 shape: QEMU default -> tern all, per workload.
    let _ = writeln!(
        md,
        "## QEMU default vs tern, all optimizations (CloudNet Table 6.1)\n"
    );
    let _ = writeln!(
        md,
        "| workload | data on the wire (MiB) | total time (s) | pause time (ms) | passes |\n|---|---|---|---|---|"
    );
    for w in &opts.workloads {
        let (Some(d), Some(t)) = (get(w, Config::QemuDefault), get(w, Config::TernAll)) else {
            continue;
        };
        let pair = |a: Option<f64>, b: Option<f64>, prec: usize| match (a, b) {
            (Some(a), Some(b)) => format!("{a:.prec$} → {b:.prec$} ({})", pct(b, a)),
            _ => "failed".into(),
        };
        let _ = writeln!(
            md,
            "| {w} | {} | {} | {} | {} → {} |",
            pair(d.wire_mib, t.wire_mib, 1),
            pair(d.total_s, t.total_s, 1),
            pair(d.downtime_ms, t.downtime_ms, 0),
            d.iterations.map_or("-".into(), |v| format!("{v:.0}")),
            t.iterations.map_or("-".into(), |v| format!("{v:.0}")),
        );
    }
    md.push('\n');
    // Table 6.2 shape: every configuration.
    type Fmt = fn(&Cell) -> Option<String>;
    let tables: [(&str, Fmt); 4] = [
        (
            "Data on the wire (MiB; QEMU's own count in brackets)",
            |c| {
                c.wire_mib
                    .map(|w| format!("{w:.1} ({:.0})", c.qemu_mib.unwrap_or(0.0)))
            },
        ),
        ("Total time (s)", |c| c.total_s.map(|v| format!("{v:.1}"))),
        ("Pause time, source STOP to destination RESUME (ms)", |c| {
            c.downtime_ms.map(|v| format!("{v:.0}"))
        }),
        ("Passes (QEMU dirty-sync count)", |c| {
            c.iterations.map(|v| format!("{v:.0}"))
        }),
    ];
    for (title, f) in tables {
        let _ = writeln!(md, "## {title}\n");
        let _ = write!(md, "| configuration |");
        for w in &opts.workloads {
            let _ = write!(md, " {w} |");
        }
        let _ = write!(md, "\n|---|");
        for _ in &opts.workloads {
            let _ = write!(md, "---:|");
        }
        md.push('\n');
        for &c in &opts.configs {
            let _ = write!(md, "| {} |", c.label());
            for w in &opts.workloads {
                let v = get(w, c).and_then(|x| {
                    let mut s = f(x)?;
                    if x.failed > 0 {
                        let _ = write!(s, " ({} failed)", x.failed);
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
    for w in &opts.workloads {
        let v = |c: Config, f: fn(&Cell) -> Option<f64>| get(w, c).and_then(f);
        let wire = |c: Config| v(c, |x| x.wire_mib);
        let (Some(def), Some(all)) = (wire(Config::QemuDefault), wire(Config::TernAll)) else {
            let _ = writeln!(md, "- {w}: QEMU default or tern all did not complete.");
            continue;
        };
        let best_qemu = [
            Config::QemuXbzrle,
            Config::QemuMultifdZstd,
            Config::QemuBest,
        ]
        .into_iter()
        .filter_map(|c| wire(c).map(|x| (x, c)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
        let mut line = format!(
            "- {w}: wire {:.1} MiB = **{:.0}%** of QEMU default (target ≤ 50%)",
            all,
            all / def * 100.0
        );
        if let Some((b, c)) = best_qemu {
            let _ = write!(
                line,
                "; {} QEMU's best built-in ({}, {:.1} MiB)",
                if all < b { "**below**" } else { "NOT below" },
                c.name(),
                b
            );
        }
        if let (Some(td), Some(ta)) = (
            v(Config::QemuDefault, |x| x.total_s),
            v(Config::TernAll, |x| x.total_s),
        ) {
            let _ = write!(
                line,
                "; total time **{:.0}%** of default (target ≤ 60%)",
                ta / td * 100.0
            );
        }
        if let (Some(pd), Some(pa)) = (
            v(Config::QemuDefault, |x| x.downtime_ms),
            v(Config::TernAll, |x| x.downtime_ms),
        ) {
            let _ = write!(
                line,
                "; pause {pa:.0} ms vs {pd:.0} ms ({})",
                if pa <= pd { "no worse" } else { "WORSE" }
            );
        }
        if let Some(r) = wire(Config::TernReturn) {
            let _ = write!(
                line,
                "; migrating back sends **{:.1}%** of the first (target ≤ 20%)",
                r / all * 100.0
            );
        }
        let _ = writeln!(md, "{line}.");
    }
    let unverified: Vec<String> = cells
        .iter()
        .filter(|c| c.runs > c.failed && !c.all_verified)
        .map(|c| format!("{} {}", c.workload, c.config.name()))
        .collect();
    let _ = writeln!(
        md,
        "- Verified on every completed run: {}",
        if unverified.is_empty() {
            "yes".to_string()
        } else {
            format!("NO: {}", unverified.join(", "))
        }
    );
    md
}

/// Every migration that did not complete and verify, with its error.
pub fn failures(results: &[RunResult]) -> String {
    let failed: Vec<&RunResult> = results.iter().filter(|r| !r.ok).collect();
    if failed.is_empty() {
        return String::new();
    }
    let mut md = String::from("\n## Failed migrations\n\n");
    for r in failed {
        let _ = writeln!(
            md,
            "- {} run {} {}: {}",
            r.workload,
            r.run,
            r.config.name(),
            r.error.as_deref().unwrap_or("no error text")
        );
    }
    md
}

const VM: &str = "cloudnet-ref";

fn tern(opts: &CloudnetOptions) -> Command {
    Command::new(&opts.tern_exe)
}

/// A fresh lab with empty content stores.
fn fresh_lab(opts: &CloudnetOptions) -> Result<(), BenchError> {
    let _ = run_bounded(tern(opts).args(["vm", "stop", VM]), Duration::from_secs(60));
    let _ = run_bounded(tern(opts).args(["lab", "down"]), Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(tern_lab::STORE_DIR);
    let seed = opts.seed.to_string();
    let up = run_bounded(
        tern(opts).args(["lab", "up", "--profile", &opts.profile, "--seed", &seed]),
        Duration::from_secs(90),
    )?;
    ok_or_fail(up, "lab up").map(|_| ())
}

pub fn run(opts: &CloudnetOptions) -> Result<Value, BenchError> {
    let mut results: Vec<RunResult> = Vec::new();
    let started = Instant::now();
    for workload in &opts.workloads {
        for run in 0..opts.runs {
            eprintln!("== {workload} run {run}");
            let outcome = (|| -> Result<(), BenchError> {
                fresh_lab(opts)?;
                boot_vm(&opts.tern_exe, VM, opts.mem_mib, workload, opts.rate_mb_s)?;
                let mut site = "a";
                for &c in &opts.configs {
                    let to = if site == "a" { "b" } else { "a" };
                    let args = c.args(opts.mem_mib);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let (ok, report, error) =
                        migrate_once(&opts.tern_exe, VM, to, &args, true, opts.migrate_timeout_s)?;
                    eprintln!(
                        "   {:<18} {site}->{to}: {}",
                        c.name(),
                        if ok {
                            format!(
                                "{:.1} MiB wire, {:.2} s, pause {:.0} ms, {} passes, verified {}",
                                report["wire_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                                report["total_s"].as_f64().unwrap_or(0.0),
                                report["downtime_ms"].as_f64().unwrap_or(0.0),
                                report["iterations"],
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
                        workload: workload.clone(),
                        config: c,
                        run,
                        ok,
                        report,
                        error,
                    });
                }
                Ok(())
            })();
            if let Err(e) = outcome {
                eprintln!("   {workload}: {}", crate::error_chain(&e));
                results.push(RunResult {
                    workload: workload.clone(),
                    config: Config::TernAll,
                    run,
                    ok: false,
                    report: Value::Null,
                    error: Some(crate::error_chain(&e)),
                });
            }
        }
    }
    let _ = run_bounded(tern(opts).args(["vm", "stop", VM]), Duration::from_secs(60));
    let _ = run_bounded(tern(opts).args(["lab", "down"]), Duration::from_secs(60));
    let cells = summarize(&results, &opts.workloads, &opts.configs);
    let mut md = markdown(opts, &cells);
    md.push_str(&failures(&results));
    let series: Vec<Series> = opts
        .configs
        .iter()
        .map(|c| Series {
            name: c.label().to_string(),
            colour: c.colour(),
        })
        .collect();
    let groups = |f: fn(&Cell) -> Option<f64>| -> Vec<(String, Vec<Option<f64>>)> {
        opts.workloads
            .iter()
            .map(|w| {
                let v = opts
                    .configs
                    .iter()
                    .map(|&c| {
                        cells
                            .iter()
                            .find(|x| &x.workload == w && x.config == c)
                            .and_then(f)
                    })
                    .collect();
                (w.clone(), v)
            })
            .collect()
    };
    let svgs = [
        (
            "cloudnet.svg",
            log_bars(
                "Live migration on cloudnet-lab: data on the wire (median)",
                "MiB on the link",
                "MiB",
                &series,
                &groups(|c| c.wire_mib),
            ),
        ),
        (
            "cloudnet-time.svg",
            log_bars(
                "Live migration on cloudnet-lab: total time (median)",
                "total time, s",
                "s",
                &series,
                &groups(|c| c.total_s),
            ),
        ),
    ];
    let json = json!({
        "command": opts.command,
        "machine": machine(),
        "profile": opts.profile,
        "mem_mib": opts.mem_mib,
        "rate_mb_s": opts.rate_mb_s,
        "runs": opts.runs,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "qemu_configs": opts.configs.iter().filter(|c| c.is_qemu()).map(|c| c.name()).collect::<Vec<_>>(),
        "cells": cells,
        "results": results,
    });
    write_results(&opts.out_dir, "cloudnet", &json, &md)?;
    for (name, svg) in svgs {
        let path = opts.out_dir.join(name);
        std::fs::write(&path, svg).map_err(|source| BenchError::Io {
            what: format!("write {}", path.display()),
            source,
        })?;
    }
    println!("{md}");
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(w: &str, c: Config, wire_mib: f64, total: f64, pause: f64) -> RunResult {
        RunResult {
            workload: w.into(),
            config: c,
            run: 0,
            ok: true,
            report: json!({"wire_bytes": wire_mib * 1048576.0, "qemu_bytes": 1048576.0 * 500.0,
                           "total_s": total, "downtime_ms": pause, "iterations": 3,
                           "verified": true}),
            error: None,
        }
    }

    #[test]
    fn tables_and_targets() {
        let w = vec!["web-db".to_string()];
        let configs = vec![
            Config::QemuDefault,
            Config::QemuMultifdZstd,
            Config::TernAll,
            Config::TernReturn,
        ];
        let results = vec![
            r("web-db", Config::QemuDefault, 600.0, 60.0, 300.0),
            r("web-db", Config::QemuMultifdZstd, 200.0, 20.0, 700.0),
            r("web-db", Config::TernAll, 150.0, 30.0, 100.0),
            r("web-db", Config::TernReturn, 15.0, 3.0, 100.0),
        ];
        let cells = summarize(&results, &w, &configs);
        let opts = CloudnetOptions {
            profile: "cloudnet-lab".into(),
            workloads: w,
            configs,
            runs: 1,
            mem_mib: 512,
            rate_mb_s: 2,
            seed: 1,
            migrate_timeout_s: 60,
            out_dir: "/tmp".into(),
            tern_exe: "tern".into(),
            command: "tern bench cloudnet".into(),
        };
        let md = markdown(&opts, &cells);
        assert!(md.contains("600.0 → 150.0 (-75%)"), "{md}");
        assert!(md.contains("**25%** of QEMU default"), "{md}");
        assert!(
            md.contains("**below** QEMU's best built-in (qemu-multifd-zstd"),
            "{md}"
        );
        assert!(md.contains("total time **50%**"), "{md}");
        assert!(md.contains("(no worse)"), "{md}");
        assert!(md.contains("**10.0%** of the first"), "{md}");
        assert_eq!(Config::parse("tern-all"), Ok(Config::TernAll));
        for c in Config::ALL {
            assert_eq!(
                json!(c),
                json!(c.name()),
                "JSON names match --configs names"
            );
        }
        assert_eq!(failures(&results), "");
        let mut bad = r("web-db", Config::TernAll, 1.0, 1.0, 1.0);
        bad.ok = false;
        bad.error = Some("verification failed".into());
        assert!(failures(&[bad]).contains("web-db run 0 tern-all: verification failed"));
        assert!(Config::parse("x").is_err());
        let a = Config::QemuXbzrle.args(512);
        assert!(
            a.contains(&"xbzrle-cache-size=134217728".to_string()),
            "{a:?}"
        );
    }
}
