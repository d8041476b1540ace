//! `tern analyze PCAP... [--flow F] [--json] [--svg DIR]`: the thesis' per-flow measures over
//! pcap files (tern-analyze). One report per file and flow; each file is its own capture point.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tern_analyze::{Params, svg};

/// Largest pcap file read (the file is read into memory).
const MAX_PCAP_BYTES: u64 = 4 << 30;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// pcap files (classic libpcap: tcpdump -w, the lab's --pcap-dir).
    #[arg(required = true)]
    pcaps: Vec<PathBuf>,
    /// Only flows whose label `ip:port-ip:port` (sender first) contains this.
    #[arg(long)]
    flow: Option<String>,
    /// Print JSON (one object: files → flows).
    #[arg(long)]
    json: bool,
    /// Write SVG plots (histogram, compression CDF, throughput) per file and flow here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Packet time T_pkt in µs: the compression threshold (thesis: 120 = 1500 B at 100 Mb/s).
    #[arg(long, default_value_t = 120.0)]
    t_pkt_us: f64,
    /// Histogram bin width in µs.
    #[arg(long, default_value_t = 5.0)]
    bin_us: f64,
    /// Histogram range in µs (larger inter-arrivals go to the overflow bin).
    #[arg(long, default_value_t = 1000.0)]
    hist_max_us: f64,
    /// Burstiness / short-throughput interval in ms (thesis: 60).
    #[arg(long, default_value_t = 60.0)]
    interval_ms: f64,
    /// Bottleneck rate in Mb/s for the per-ACK compression ratio ρ.
    #[arg(long, default_value_t = 100.0)]
    rate_mbps: f64,
}

fn to_ns(v: f64, scale: f64) -> u64 {
    (v * scale).round().max(1.0) as u64
}

pub fn run(a: AnalyzeArgs) -> Result<()> {
    let params = Params {
        t_pkt_ns: to_ns(a.t_pkt_us, 1e3),
        bin_ns: to_ns(a.bin_us, 1e3),
        hist_max_ns: to_ns(a.hist_max_us, 1e3),
        burst_interval_ns: to_ns(a.interval_ms, 1e6),
        long_interval_ns: 1_000_000_000,
        bottleneck_bps: to_ns(a.rate_mbps, 1e6),
    };
    if let Some(d) = &a.svg {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let mut files = serde_json::Map::new();
    let mut all: Vec<(String, tern_analyze::Analysis)> = Vec::new();
    for path in &a.pcaps {
        let len = std::fs::metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        anyhow::ensure!(
            len <= MAX_PCAP_BYTES,
            "{}: {len} bytes exceeds the {MAX_PCAP_BYTES}-byte limit",
            path.display()
        );
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let (cap, an) = tern_analyze::analyze_pcap(&bytes, &params, a.flow.as_deref())
            .with_context(|| format!("parse {}", path.display()))?;
        let stem = path
            .file_stem()
            .map_or_else(|| "capture".into(), |s| s.to_string_lossy().into_owned());
        if let Some(dir) = &a.svg {
            for (i, f) in an.flows.iter().enumerate() {
                let base = format!("{stem}.flow{i}");
                let t = format!("{stem}: {}", f.label);
                let plots = [
                    (
                        "hist",
                        svg::histogram(f, &params, &format!("ACK inter-arrival, {t}")),
                    ),
                    (
                        "cdf",
                        svg::compression_cdf(f, &params, &format!("ACK compression CDF, {t}")),
                    ),
                    (
                        "tput",
                        svg::throughput(
                            &f.throughput_short_mbps,
                            params.burst_interval_ns,
                            &format!("throughput per {} ms, {t}", a.interval_ms),
                        ),
                    ),
                ];
                for (kind, body) in plots {
                    let p = dir.join(format!("{base}.{kind}.svg"));
                    std::fs::write(&p, body).with_context(|| format!("write {}", p.display()))?;
                }
            }
        }
        all.push((path.display().to_string(), an.clone()));
        if a.json {
            files.insert(
                path.display().to_string(),
                serde_json::json!({ "capture": {
                    "link": cap.link, "nanosecond": cap.nanosecond, "records": cap.records,
                    "records_not_tcp": cap.records_not_tcp, "truncated_tail": cap.truncated_tail,
                    "records_skipped_over_limit": cap.records_skipped_over_limit,
                }, "analysis": an }),
            );
        } else {
            println!(
                "{}: {} records ({} not TCP), {:?}",
                path.display(),
                cap.records,
                cap.records_not_tcp,
                cap.link
            );
            for (i, f) in an.flows.iter().enumerate() {
                let opt =
                    |v: Option<f64>, s: f64| v.map_or("-".into(), |x| format!("{:.3}", x * s));
                println!(
                    "  flow{i} {}: {:.2} s, {} data segs ({} rtx, {:.3}%), {} acks ({} dup)",
                    f.label,
                    f.duration_s,
                    f.data_segments,
                    f.retransmitted_segments,
                    f.retransmission_rate * 100.0,
                    f.acks,
                    f.duplicate_acks
                );
                println!(
                    "    ACK-compression C(<{} us) = {}%, median inter-arrival {} us, modes {:?} ms, rho median {}, P(rho<0.5) {}%",
                    a.t_pkt_us,
                    opt(f.ack_compression_level, 100.0),
                    opt(f.inter_arrival_median_us, 1.0),
                    f.histogram.modes_ms,
                    opt(f.rho_median, 1.0),
                    opt(f.rho_below_half, 100.0)
                );
                println!(
                    "    burstiness sigma/mu @{} ms = {} (as printed in the thesis mu/sigma = {}), peak 1 ms {:.1} Mb/s",
                    f.burstiness.interval_ms,
                    opt(f.burstiness.sigma_over_mu, 1.0),
                    opt(f.burstiness.mu_over_sigma_as_printed, 1.0),
                    f.peak_1ms_mbps
                );
            }
        }
    }
    let comparisons = compare(&all);
    if a.json {
        let out = serde_json::json!({ "files": files, "comparisons": comparisons });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &comparisons {
            let pct = |k: &str| {
                c[k].as_f64()
                    .map_or("-".into(), |v| format!("{:.3}%", v * 100.0))
            };
            println!(
                "compare {}: C at {} = {}, at {} = {} (difference {}), KS distance {}",
                c["flow"].as_str().unwrap_or("?"),
                c["reference"].as_str().unwrap_or("?"),
                pct("reference_level"),
                c["point"].as_str().unwrap_or("?"),
                pct("level"),
                pct("level_minus_reference"),
                c["ks_distance"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.3}"))
            );
        }
    }
    Ok(())
}

/// The same flow seen at several capture points (e.g. host side and inside the VM): each
/// point's compression level against the first file's, and the KS distance of the
/// inter-arrival distributions (seed-tcp.md §2.10 item 6: C(VM) − C(host)).
fn compare(all: &[(String, tern_analyze::Analysis)]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Some((base_name, base)) = all.first() else {
        return out;
    };
    for bf in &base.flows {
        for (name, an) in &all[1..] {
            let Some(f) = an.flows.iter().find(|f| f.label == bf.label) else {
                continue;
            };
            let delta = bf
                .ack_compression_level
                .zip(f.ack_compression_level)
                .map(|(b, x)| x - b);
            out.push(serde_json::json!({
                "flow": bf.label, "reference": base_name, "point": name,
                "reference_level": bf.ack_compression_level, "level": f.ack_compression_level,
                "level_minus_reference": delta,
                "ks_distance": tern_analyze::ks_distance(&bf.deltas_ns, &f.deltas_ns),
            }));
        }
    }
    out
}
