//! `tern bench sandpiper --sim`: Sandpiper's simulated experiments on the controller core
//! (`tern-balance`), no VMs: the 16-host / 35-VM data center against static placement
//! (Fig. 5.10), the 50-host × 3-VM stress test at 20–45 simultaneous hotspots
//! (Fig. 5.12b), and the planner's time for 500 / 5,000 / 50,000 VMs (Fig. 5.11b).
//! Writes `sandpiper-sim.{json,md,svg}`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};
use tern_balance::BalanceConfig;
use tern_balance::sim::{
    Event, Mode, SimReport, StressKind, datacenter_16x35, simulate, stress_experiment, timing_pool,
};

use crate::BenchError;
use crate::chart::xml_escape;

#[derive(Debug, Clone)]
pub struct SandpiperBenchOptions {
    pub out_dir: PathBuf,
    /// Seeded pools per stress level.
    pub trials: usize,
    pub seed: u64,
    /// VM counts to time the planner at (5 VMs per host).
    pub timing_vms: Vec<usize>,
    pub command: String,
}

fn fail(detail: impl Into<String>) -> BenchError {
    BenchError::Failed {
        tool: "bench sandpiper",
        detail: detail.into(),
    }
}

/// Timing runs per size (the median is reported); one for the largest pools.
const TIMING_RUNS: usize = 3;
/// Stress levels (hot hosts out of 50).
const STRESS_LEVELS: [usize; 6] = [20, 25, 30, 35, 40, 45];

pub fn run(o: &SandpiperBenchOptions) -> Result<Value, BenchError> {
    let sc = datacenter_16x35(o.seed);
    let err = |e: tern_balance::BalanceError| fail(e.to_string());
    let stat = simulate(&sc, Mode::Static).map_err(err)?;
    let ctl = simulate(&sc, Mode::Controller).map_err(err)?;
    let reduction =
        1.0 - ctl.overloaded_host_intervals as f64 / stat.overloaded_host_intervals.max(1) as f64;
    let mitigation_s = match (ctl.first_detection_s, ctl.last_migration_end_s) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut stress = Vec::new();
    for kind in [StressKind::CpuOnly, StressKind::Mixed] {
        for (name, cfg) in [
            ("sandpiper", BalanceConfig::sandpiper()),
            (
                "tern (2nd pass + multi-way, trend)",
                BalanceConfig::default(),
            ),
        ] {
            let rows =
                stress_experiment(&STRESS_LEVELS, o.trials, o.seed, kind, &cfg).map_err(err)?;
            stress.push((kind, name, rows));
        }
    }
    let mut timing = Vec::new();
    for &n in &o.timing_vms {
        let pool = timing_pool(n, o.seed).map_err(err)?;
        let runs = if n > 10_000 { 1 } else { TIMING_RUNS };
        let mut ms = Vec::new();
        let mut last = None;
        for _ in 0..runs {
            let t0 = Instant::now();
            let p = pool.plan(0.0);
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            last = Some(p);
        }
        ms.sort_by(f64::total_cmp);
        let p = last.ok_or_else(|| fail("no timing run"))?;
        timing.push(json!({
            "vms": n,
            "hosts": pool.pool().hosts.len(),
            "hotspots": p.hotspots.len(),
            "resolved": p.resolved.len(),
            "steps": p.steps.len(),
            "plan_ms": ms[ms.len() / 2],
        }));
    }
    let target_1s = timing
        .iter()
        .find(|t| t["vms"] == 5000)
        .map(|t| t["plan_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0);
    let summary = |r: &SimReport| {
        json!({
            "overloaded_host_intervals": r.overloaded_host_intervals,
            "overloaded_at_end": r.overloaded_at_end,
            "plans": r.plans,
            "migrations": r.migrations,
            "swaps": r.swaps,
            "multi_way": r.multi_way,
            "resizes": r.resizes,
            "first_detection_s": r.first_detection_s,
            "last_migration_end_s": r.last_migration_end_s,
            "hotspot_resolution_s": r.hotspot_resolution_s,
        })
    };
    let result = json!({
        "command": o.command,
        "machine": crate::machine(),
        "seed": o.seed,
        "datacenter": {
            "scenario": sc.name,
            "intervals": sc.intervals,
            "interval_s": sc.cfg.interval_s,
            "static": summary(&stat),
            "controller": summary(&ctl),
            "reduction": reduction,
            "detection_to_last_migration_s": mitigation_s,
            "target_reduction_61pct_met": reduction >= 0.61,
            "events": ctl.events,
        },
        "stress": stress.iter().map(|(k, name, rows)| json!({
            "kind": k, "planner": name, "rows": rows,
        })).collect::<Vec<_>>(),
        "timing": timing,
        "target_5000_vms_under_1s_met": target_1s,
    });
    let md = markdown(o, &stat, &ctl, reduction, mitigation_s, &stress, &timing);
    crate::write_results(&o.out_dir, "sandpiper-sim", &result, &md)?;
    let svg = timeline_svg(
        &sc.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
        &stat,
        &ctl,
        sc.cfg.interval_s,
        sc.cfg.cpu_threshold,
    );
    let path = o.out_dir.join("sandpiper-sim.svg");
    std::fs::write(&path, svg).map_err(|source| BenchError::Io {
        what: format!("write {}", path.display()),
        source,
    })?;
    Ok(result)
}

fn markdown(
    o: &SandpiperBenchOptions,
    stat: &SimReport,
    ctl: &SimReport,
    reduction: f64,
    mitigation_s: Option<f64>,
    stress: &[(StressKind, &str, Vec<tern_balance::sim::StressRow>)],
    timing: &[Value],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Sandpiper, simulated (controller core in virtual time)\n"
    );
    let _ = writeln!(s, "Command: `{}` (seed {})\n", o.command, o.seed);
    let _ = writeln!(s, "## 16 hosts, 35 VMs (Fig. 5.10)\n");
    let _ = writeln!(
        s,
        "| placement | overloaded host-intervals | hosts overloaded at end | migrations | swaps | resizes |\n|---|---|---|---|---|---|"
    );
    for (n, r) in [("static", stat), ("sandpiper controller", ctl)] {
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} |",
            r.overloaded_host_intervals, r.overloaded_at_end, r.migrations, r.swaps, r.resizes
        );
    }
    let _ = writeln!(
        s,
        "\n{:.0}% fewer overloaded host-intervals than static (seed: 61%; target met: {}). First detection at {} s; last migration done {} s after it (seed: 7 migrations and 2 swaps within 237 s).\n",
        reduction * 100.0,
        if reduction >= 0.61 { "yes" } else { "NO" },
        ctl.first_detection_s
            .map(|t| format!("{t:.0}"))
            .unwrap_or("-".into()),
        mitigation_s
            .map(|t| format!("{t:.0}"))
            .unwrap_or("-".into()),
    );
    let mut res: Vec<f64> = ctl.hotspot_resolution_s.iter().map(|x| x.2).collect();
    res.sort_by(f64::total_cmp);
    if !res.is_empty() {
        let _ = writeln!(
            s,
            "Per hotspot, detection until the host is below its thresholds: median {:.0} s, max {:.0} s over {} hotspots (seed, Fig. 5.4: < 20 s; migrations here take memory x 1.2 / 1 Gbit/s + 2 s; the simulator samples once per interval, so the interval is the resolution).\n",
            res[res.len() / 2],
            res[res.len() - 1],
            res.len(),
        );
    }
    let _ = writeln!(s, "Timeline: `sandpiper-sim.svg`.\n");
    let _ = writeln!(
        s,
        "## 50 hosts x 3 VMs, simultaneous hotspots (Fig. 5.12b)\n"
    );
    let _ = writeln!(
        s,
        "{} seeded pools per level; \"all\" = fraction of pools with every hotspot resolved, \"resolved\" = mean hotspots resolved. Seed: 73% all at 35, 3% at 40, 22 of 45 at 45.\n",
        o.trials
    );
    let _ = writeln!(
        s,
        "| hotspots in | planner | hot | all | resolved | migrations | swaps | multi-way |\n|---|---|---|---|---|---|---|---|"
    );
    for (k, name, rows) in stress {
        for r in rows {
            let _ = writeln!(
                s,
                "| {k:?} | {name} | {} | {:.0}% | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.hot_hosts,
                r.all_resolved_fraction * 100.0,
                r.mean_resolved,
                r.mean_migrations,
                r.mean_swaps,
                r.mean_multi_way
            );
        }
    }
    let _ = writeln!(s, "\n## Planner time (Fig. 5.11b)\n");
    let _ = writeln!(
        s,
        "| VMs | hosts | hotspots | resolved | steps | plan ms |\n|---|---|---|---|---|---|"
    );
    for t in timing {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1} |",
            t["vms"],
            t["hosts"],
            t["hotspots"],
            t["resolved"],
            t["steps"],
            t["plan_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        s,
        "\nTarget: 5,000 VMs on 1,000 hosts in < 1 s (seed: 500 VMs in < 5 s)."
    );
    s
}

/// Two panels (static, controller): each host's demanded CPU utilization per interval,
/// the threshold, detections (red ticks) and migrations (blue bars).
fn timeline_svg(
    hosts: &[String],
    stat: &SimReport,
    ctl: &SimReport,
    interval_s: f64,
    threshold: f64,
) -> String {
    let (w, ph, left, top, gap) = (760.0, 220.0, 50.0, 40.0, 70.0);
    let n = ctl.cpu_util.len().max(2);
    let tmax = (n - 1) as f64 * interval_s;
    let x = |t: f64| left + (w - left - 20.0) * t / tmax;
    let ymax = 1.2;
    let mut s = String::new();
    let height = top + 2.0 * ph + gap + 60.0;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">16 hosts / 35 VMs: host CPU demand (incl. migration overhead), static vs controller</text>"#
    );
    for (k, (title, r)) in [("static placement", stat), ("sandpiper controller", ctl)]
        .into_iter()
        .enumerate()
    {
        let y0 = top + k as f64 * (ph + gap);
        let y = |u: f64| y0 + ph * (1.0 - (u / ymax).min(1.0));
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}">{}</text>"#,
            y0 - 6.0,
            xml_escape(title)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y0}" width="{}" height="{ph}" fill="none" stroke="#999"/>"##,
            w - left - 20.0
        );
        for u in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{:.0}%</text>"#,
                left - 4.0,
                y(u) + 4.0,
                u * 100.0
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#c00" stroke-dasharray="4 3"/>"##,
            w - 20.0,
            y(threshold),
            y(threshold)
        );
        for (h, name) in hosts.iter().enumerate() {
            let hot = r
                .cpu_util
                .iter()
                .any(|u| u.get(h).copied().unwrap_or(0.0) > threshold);
            let colour = if hot {
                format!("hsl({}, 70%, 45%)", (h * 47) % 360)
            } else {
                "#bbb".into()
            };
            let pts: Vec<String> = r
                .cpu_util
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    format!(
                        "{:.1},{:.1}",
                        x(i as f64 * interval_s),
                        y(u.get(h).copied().unwrap_or(0.0))
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="host" fill="none" stroke="{colour}" stroke-width="{}" points="{}"><title>{}</title></polyline>"#,
                if hot { 1.6 } else { 0.8 },
                pts.join(" "),
                xml_escape(name)
            );
        }
        let mut lane = 0usize;
        for e in &r.events {
            match e {
                Event::Detect { t_s, host } => {
                    let _ = writeln!(
                        s,
                        r##"<line class="detect" x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#d00"><title>detect {3}</title></line>"##,
                        x(*t_s),
                        y0,
                        y0 + 8.0,
                        xml_escape(host)
                    );
                }
                Event::MigrateEnd { t_s, vm, from, to } => {
                    let start = r
                        .events
                        .iter()
                        .filter_map(|x| match x {
                            Event::MigrateStart { t_s: s0, vm: v, .. } if v == vm && s0 <= t_s => {
                                Some(*s0)
                            }
                            _ => None,
                        })
                        .fold(f64::NAN, f64::max);
                    let yy = y0 + ph - 6.0 - 5.0 * (lane % 8) as f64;
                    lane += 1;
                    let _ = writeln!(
                        s,
                        r##"<line class="migration" x1="{:.1}" x2="{:.1}" y1="{yy}" y2="{yy}" stroke="#06c" stroke-width="3"><title>{} {} -> {}</title></line>"##,
                        x(start),
                        x(*t_s),
                        xml_escape(vm),
                        xml_escape(from),
                        xml_escape(to)
                    );
                }
                _ => {}
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">time (s); red ticks: detections, blue bars: migrations</text>"#,
            (left + w) / 2.0,
            y0 + ph + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
