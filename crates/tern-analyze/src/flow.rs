//! Per-TCP-flow analysis: the thesis' measures (seed-tcp.md §2.10) at one capture point.
//!
//! Rules (see docs/analyze.md):
//! - A flow is a 4-tuple; its *sender* is the side that carried more payload bytes.
//! - The ACK stream is every pure ACK (ACK set, no payload, no SYN/FIN/RST) receiver→sender.
//!   Duplicates (ack number not advancing) are included and counted.
//! - Inter-arrival Δ_k = t_k − t_{k−1} over consecutive ACKs of the stream.
//! - ACK-compression level C = #{Δ_k < T_pkt} / #{Δ_k} (T_pkt = 0.12 ms by default: 1500 B at
//!   100 Mb/s).
//! - Burstiness B = σ_t/μ_t of t_i = bytes newly acknowledged (increase of the highest
//!   cumulative ACK) in interval i of n = 60 ms, intervals aligned to the first ACK that
//!   acknowledges data and running to the last ACK, empty intervals included, σ the population
//!   standard deviation. The thesis' printed μ/σ is also reported, labelled.
//! - Retransmission: a data segment starting below the highest sequence end already seen.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::packet::{ACK, FIN, RST, SYN, TcpSegment};

/// Most flows tracked per file; segments of further flows are counted and ignored.
pub const MAX_FLOWS: usize = 65_536;

/// Most histogram bins (bounds the output for odd `--bin-us` / `--hist-max-us` choices).
pub const MAX_BINS: usize = 10_000;

/// Most points in a per-interval series (longer series are truncated, flagged in the report).
pub const MAX_SERIES_POINTS: usize = 1_000_000;

/// Analysis parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Packet time T_pkt: the compression threshold (thesis: 0.12 ms).
    pub t_pkt_ns: u64,
    /// Histogram bin width (thesis' modes are multiples of 5 µs).
    pub bin_ns: u64,
    /// Histogram upper edge; larger inter-arrivals go to the overflow bin.
    pub hist_max_ns: u64,
    /// Burstiness interval n (thesis: 60 ms).
    pub burst_interval_ns: u64,
    /// Long-timescale throughput interval (1 s).
    pub long_interval_ns: u64,
    /// Bottleneck rate R for the per-ACK compression ratio ρ.
    pub bottleneck_bps: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            t_pkt_ns: 120_000,
            bin_ns: 5_000,
            hist_max_ns: 1_000_000,
            burst_interval_ns: 60_000_000,
            long_interval_ns: 1_000_000_000,
            bottleneck_bps: 100_000_000,
        }
    }
}

/// Histogram of inter-arrivals: percent of all Δ per bin.
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub bin_us: f64,
    pub percent: Vec<f64>,
    pub overflow_percent: f64,
    /// Lower edges (ms) of the three fullest bins, fullest first.
    pub modes_ms: Vec<f64>,
    /// Percent of Δ within ±1 bin of k·T_pkt for k = 1..=8 (seed-tcp.md §2.10 item 5):
    /// (k·T_pkt in ms, percent).
    pub mass_near_multiples: Vec<(f64, f64)>,
}

/// Burstiness at one interval length.
#[derive(Debug, Clone, Serialize)]
pub struct Burstiness {
    pub interval_ms: f64,
    pub intervals: usize,
    pub mean_bytes: f64,
    pub std_bytes: f64,
    /// σ/μ: the primary measure (coefficient of variation).
    pub sigma_over_mu: Option<f64>,
    /// μ/σ: as printed in the thesis (labelled; not the coefficient of variation).
    pub mu_over_sigma_as_printed: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    pub label: String,
    pub sender: String,
    pub receiver: String,
    pub first_ts_ns: u64,
    pub duration_s: f64,
    pub data_segments: u64,
    pub data_bytes: u64,
    pub retransmitted_segments: u64,
    pub retransmitted_bytes: u64,
    /// Trace-based loss estimate: retransmitted data segments / data segments.
    pub retransmission_rate: f64,
    pub acks: u64,
    pub duplicate_acks: u64,
    pub inter_arrivals: u64,
    /// C = #{Δ < T_pkt}/#{Δ}.
    pub ack_compression_level: Option<f64>,
    pub inter_arrival_median_us: Option<f64>,
    pub histogram: Histogram,
    /// CDF over all Δ, sampled at every bin edge in [0, T_pkt]: (ms, fraction).
    pub compression_cdf: Vec<(f64, f64)>,
    /// Per-ACK ratio ρ = Δ / (newly acked bytes · 8 / R): median and P(ρ < 0.5).
    pub rho_median: Option<f64>,
    pub rho_below_half: Option<f64>,
    pub burstiness: Burstiness,
    /// Throughput (Mb/s) per burst interval (60 ms), from the ACK stream.
    pub throughput_short_mbps: Vec<f64>,
    /// Throughput (Mb/s) per long interval (1 s).
    pub throughput_long_mbps: Vec<f64>,
    /// Highest 1 ms throughput (Mb/s).
    pub peak_1ms_mbps: f64,
    pub series_truncated: bool,
    /// Raw inter-arrivals (ns), for plots and cross-file comparison (not in JSON).
    #[serde(skip)]
    pub deltas_ns: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub params: Params,
    pub flows: Vec<FlowReport>,
    pub flows_over_limit_segments: u64,
}

type End = (IpAddr, u16);

/// Unwraps 32-bit sequence numbers into a monotone-ish 64-bit space around the last value.
#[derive(Debug, Clone, Copy)]
struct Unwrap {
    last: i64,
}

impl Unwrap {
    fn new(base: u32) -> Self {
        // Start high enough that going back a little never goes negative.
        Self {
            last: (1i64 << 32) + i64::from(base),
        }
    }
    fn at(&mut self, x: u32) -> i64 {
        let diff = x.wrapping_sub(self.last as u32) as i32;
        let v = self.last + i64::from(diff);
        if v > self.last {
            self.last = v;
        }
        v
    }
}

fn label(a: End, b: End) -> String {
    format!("{}:{}-{}:{}", a.0, a.1, b.0, b.1)
}

/// Analyse the TCP segments of one capture point. `filter`: keep flows whose label
/// (`ip:port-ip:port`, sender first) contains it.
pub fn analyze(segs: &[TcpSegment], params: &Params, filter: Option<&str>) -> Analysis {
    let mut flows: BTreeMap<(End, End), Vec<&TcpSegment>> = BTreeMap::new();
    let mut over = 0u64;
    for s in segs {
        let a = (s.src, s.sport);
        let b = (s.dst, s.dport);
        let key = if a <= b { (a, b) } else { (b, a) };
        if !flows.contains_key(&key) && flows.len() >= MAX_FLOWS {
            over += 1;
            continue;
        }
        flows.entry(key).or_default().push(s);
    }
    let mut out = Vec::new();
    for ((a, b), fsegs) in flows {
        let bytes_from = |e: End| -> u64 {
            fsegs
                .iter()
                .filter(|s| (s.src, s.sport) == e)
                .map(|s| u64::from(s.payload_len))
                .sum()
        };
        let (snd, rcv) = if bytes_from(a) >= bytes_from(b) {
            (a, b)
        } else {
            (b, a)
        };
        let lab = label(snd, rcv);
        if let Some(f) = filter {
            if !lab.contains(f) {
                continue;
            }
        }
        out.push(analyze_flow(&fsegs, snd, rcv, lab, params));
    }
    Analysis {
        params: params.clone(),
        flows: out,
        flows_over_limit_segments: over,
    }
}

fn analyze_flow(segs: &[&TcpSegment], snd: End, rcv: End, lab: String, p: &Params) -> FlowReport {
    let first_ts = segs.iter().map(|s| s.ts_ns).min().unwrap_or(0);
    let last_ts = segs.iter().map(|s| s.ts_ns).max().unwrap_or(0);
    // Sequence base: the sender's first segment (SYN or data).
    let first_snd = segs.iter().find(|s| (s.src, s.sport) == snd);
    let base = first_snd
        .map(|s| s.seq)
        .or_else(|| segs.first().map(|s| s.ack))
        .unwrap_or(0);
    // The first data byte: one past the ISN when the SYN was captured.
    let data_base = i64::from(first_snd.is_some_and(|s| s.has(SYN)));
    let mut seq_u = Unwrap::new(base);
    let mut ack_u = Unwrap::new(base);
    let (mut data_segments, mut data_bytes, mut rtx_segs, mut rtx_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut max_end: Option<i64> = None;
    // (ts, newly acked bytes) per pure ACK.
    let mut acks: Vec<(u64, u64)> = Vec::new();
    let mut dup = 0u64;
    let mut high_ack: Option<i64> = None;
    for s in segs {
        if (s.src, s.sport) == snd {
            let seq = seq_u.at(s.seq);
            if s.payload_len > 0 {
                data_segments += 1;
                data_bytes += u64::from(s.payload_len);
                let end = seq + i64::from(s.payload_len);
                match max_end {
                    Some(m) if seq < m => {
                        rtx_segs += 1;
                        rtx_bytes += u64::from(s.payload_len);
                        if end > m {
                            max_end = Some(end);
                        }
                    }
                    _ => max_end = Some(end),
                }
            } else if s.has(SYN) || s.has(FIN) {
                let end = seq + 1;
                max_end = Some(max_end.map_or(end, |m| m.max(end)));
            }
        } else if (s.src, s.sport) == rcv
            && s.has(ACK)
            && s.payload_len == 0
            && !s.has(SYN)
            && !s.has(FIN)
            && !s.has(RST)
        {
            let a = ack_u.at(s.ack);
            let newly = match high_ack {
                Some(h) if a > h => (a - h) as u64,
                Some(_) => {
                    dup += 1;
                    0
                }
                // The first ACK: count bytes above the first data byte.
                None => (a - (1i64 << 32) - i64::from(base) - data_base).max(0) as u64,
            };
            if high_ack.is_none_or(|h| a > h) {
                high_ack = Some(a);
            }
            acks.push((s.ts_ns, newly));
        }
    }
    let deltas: Vec<u64> = acks
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0))
        .collect();
    let n = deltas.len();
    let compressed = deltas.iter().filter(|&&d| d < p.t_pkt_ns).count();
    let level = (n > 0).then(|| compressed as f64 / n as f64);
    let mut sorted = deltas.clone();
    sorted.sort_unstable();
    let median = |v: &[f64]| -> Option<f64> {
        if v.is_empty() {
            None
        } else if v.len() % 2 == 1 {
            Some(v[v.len() / 2])
        } else {
            Some((v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0)
        }
    };
    let sorted_f: Vec<f64> = sorted.iter().map(|&d| d as f64 / 1000.0).collect();
    let histogram = histogram(&deltas, p);
    let bin = p.bin_ns.max(1);
    let cdf_points = ((p.t_pkt_ns / bin) as usize).min(MAX_BINS);
    let compression_cdf = (0..=cdf_points)
        .map(|i| {
            let x = i as u64 * bin;
            let below = sorted.partition_point(|&d| d < x);
            (
                x as f64 / 1e6,
                if n == 0 { 0.0 } else { below as f64 / n as f64 },
            )
        })
        .collect();
    // ρ for ACKs that acknowledge new bytes.
    let mut rho: Vec<f64> = acks
        .windows(2)
        .filter(|w| w[1].1 > 0)
        .map(|w| {
            let d = w[1].0.saturating_sub(w[0].0) as f64;
            let ideal = w[1].1 as f64 * 8.0 / p.bottleneck_bps.max(1) as f64 * 1e9;
            d / ideal
        })
        .collect();
    rho.sort_by(f64::total_cmp);
    let rho_below_half = (!rho.is_empty())
        .then(|| rho.iter().filter(|&&r| r < 0.5).count() as f64 / rho.len() as f64);
    let mut series_truncated = false;
    let first_data_ack = acks.iter().position(|a| a.1 > 0);
    let per_interval = |iv: u64, trunc: &mut bool| -> Vec<u64> {
        let Some(i0) = first_data_ack else {
            return Vec::new();
        };
        let t0 = acks[i0].0;
        // Capture timestamps need not be monotone (clock steps, merged files).
        let t_end = acks[i0..].iter().map(|a| a.0).max().unwrap_or(t0);
        let iv = iv.max(1);
        let count = ((t_end - t0) / iv + 1) as usize;
        if count > MAX_SERIES_POINTS {
            *trunc = true;
        }
        let mut v = vec![0u64; count.min(MAX_SERIES_POINTS)];
        for a in &acks[i0..] {
            let k = (a.0.saturating_sub(t0) / iv) as usize;
            if let Some(x) = v.get_mut(k) {
                *x += a.1;
            }
        }
        v
    };
    let short = per_interval(p.burst_interval_ns, &mut series_truncated);
    let long = per_interval(p.long_interval_ns, &mut series_truncated);
    let ms = per_interval(1_000_000, &mut series_truncated);
    let mbps = |v: &[u64], iv: u64| -> Vec<f64> {
        v.iter()
            .map(|&b| b as f64 * 8.0 / (iv as f64 / 1e9) / 1e6)
            .collect()
    };
    let burstiness = burstiness(&short, p.burst_interval_ns);
    FlowReport {
        label: lab,
        sender: format!("{}:{}", snd.0, snd.1),
        receiver: format!("{}:{}", rcv.0, rcv.1),
        first_ts_ns: first_ts,
        duration_s: last_ts.saturating_sub(first_ts) as f64 / 1e9,
        data_segments,
        data_bytes,
        retransmitted_segments: rtx_segs,
        retransmitted_bytes: rtx_bytes,
        retransmission_rate: if data_segments == 0 {
            0.0
        } else {
            rtx_segs as f64 / data_segments as f64
        },
        acks: acks.len() as u64,
        duplicate_acks: dup,
        inter_arrivals: n as u64,
        ack_compression_level: level,
        inter_arrival_median_us: median(&sorted_f),
        histogram,
        compression_cdf,
        rho_median: median(&rho),
        rho_below_half,
        burstiness,
        throughput_short_mbps: mbps(&short, p.burst_interval_ns),
        throughput_long_mbps: mbps(&long, p.long_interval_ns),
        peak_1ms_mbps: mbps(&ms, 1_000_000).into_iter().fold(0.0, f64::max),
        series_truncated,
        deltas_ns: deltas,
    }
}

fn histogram(deltas: &[u64], p: &Params) -> Histogram {
    let bin = p.bin_ns.max(1);
    let nbins = (p.hist_max_ns.div_ceil(bin) as usize).clamp(1, MAX_BINS);
    let mut counts = vec![0u64; nbins];
    let mut overflow = 0u64;
    for &d in deltas {
        match counts.get_mut((d / bin) as usize) {
            Some(c) => *c += 1,
            None => overflow += 1,
        }
    }
    let n = deltas.len().max(1) as f64;
    let mut order: Vec<usize> = (0..nbins).filter(|&i| counts[i] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let near = |center: u64| -> f64 {
        let (lo, hi) = (center.saturating_sub(bin), center + bin);
        deltas.iter().filter(|&&d| d >= lo && d <= hi).count() as f64 * 100.0 / n
    };
    let mass_near_multiples = (1..=8u64)
        .map(|k| ((k * p.t_pkt_ns) as f64 / 1e6, near(k * p.t_pkt_ns)))
        .collect();
    Histogram {
        mass_near_multiples,
        bin_us: bin as f64 / 1000.0,
        percent: counts.iter().map(|&c| c as f64 * 100.0 / n).collect(),
        overflow_percent: overflow as f64 * 100.0 / n,
        modes_ms: order
            .iter()
            .take(3)
            .map(|&i| (i as u64 * bin) as f64 / 1e6)
            .collect(),
    }
}

fn burstiness(t: &[u64], interval_ns: u64) -> Burstiness {
    let k = t.len();
    let (mean, std) = if k == 0 {
        (0.0, 0.0)
    } else {
        let mean = t.iter().map(|&x| x as f64).sum::<f64>() / k as f64;
        let var = t.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / k as f64;
        (mean, var.sqrt())
    };
    Burstiness {
        interval_ms: interval_ns as f64 / 1e6,
        intervals: k,
        mean_bytes: mean,
        std_bytes: std,
        sigma_over_mu: (mean > 0.0).then(|| std / mean),
        mu_over_sigma_as_printed: (std > 0.0).then(|| mean / std),
    }
}

/// Kolmogorov–Smirnov distance sup |F_a − F_b| between two inter-arrival samples (ns), e.g.
/// host-side distributions for different VM counts (seed-tcp.md §4.2: ≤ 0.05 means "about
/// invariant"). `None` if either sample is empty.
pub fn ks_distance(a: &[u64], b: &[u64]) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let mut x = a.to_vec();
    let mut y = b.to_vec();
    x.sort_unstable();
    y.sort_unstable();
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < x.len() && j < y.len() {
        let v = x[i].min(y[j]);
        while i < x.len() && x[i] == v {
            i += 1;
        }
        while j < y.len() && y[j] == v {
            j += 1;
        }
        let fa = i as f64 / x.len() as f64;
        let fb = j as f64 / y.len() as f64;
        d = d.max((fa - fb).abs());
    }
    Some(d)
}
