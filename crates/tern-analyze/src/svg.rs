//! SVG plots shaped like the thesis' figures (no dependencies; the style of
//! tern-bench's chart.rs): the inter-arrival histogram (Figs. 4.3–4.19: percent of ACKs per
//! bin against inter-arrival in ms), the compression CDF over [0, T_pkt] (Figs. 4.6/4.7) and
//! throughput per interval (Figs. 5.x).

use std::fmt::Write as _;

use crate::flow::{FlowReport, Params};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const LEFT: f64 = 70.0;
const TOP: f64 = 48.0;
const W: f64 = 560.0;
const H: f64 = 300.0;

fn frame(title: &str, xlab: &str, ylab: &str, x_max: f64, y_max: f64) -> String {
    let (width, height) = (LEFT + W + 30.0, TOP + H + 60.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT:.0}" y="22" font-size="14">{}</text>"#,
        esc(title)
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let yy = TOP + H * (1.0 - f);
        let xx = LEFT + W * f;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT:.0}" y1="{yy:.1}" x2="{:.0}" y2="{yy:.1}" stroke="#e5e5e5"/>"##,
            LEFT + W
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{:.3}</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            y_max * f
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.0}" text-anchor="middle">{:.3}</text>"#,
            TOP + H + 16.0,
            x_max * f
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT:.0}" y1="{:.1}" x2="{:.0}" y2="{:.1}" stroke="black"/>"#,
        TOP + H,
        LEFT + W,
        TOP + H
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">{}</text>"#,
        LEFT + W / 2.0,
        TOP + H + 40.0,
        esc(xlab)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.0}" text-anchor="middle" transform="rotate(-90 16 {:.0})">{}</text>"#,
        TOP + H / 2.0,
        TOP + H / 2.0,
        esc(ylab)
    );
    s
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * e {
            return m * e;
        }
    }
    10.0 * e
}

/// Inter-arrival histogram: one `<rect class="bar">` per non-empty bin.
pub fn histogram(f: &FlowReport, p: &Params, title: &str) -> String {
    let h = &f.histogram;
    let x_max = p.hist_max_ns as f64 / 1e6;
    let y_max = nice_max(h.percent.iter().copied().fold(0.0, f64::max));
    let mut s = frame(
        title,
        "ACK inter-arrival time (ms)",
        "ACKs (%)",
        x_max,
        y_max,
    );
    let bw = W * (h.bin_us / 1000.0) / x_max;
    for (i, &pc) in h.percent.iter().enumerate() {
        if pc <= 0.0 {
            continue;
        }
        let x = LEFT + bw * i as f64;
        let hh = H * pc / y_max;
        let _ = writeln!(
            s,
            r##"<rect class="bar" x="{x:.2}" y="{:.2}" width="{:.2}" height="{hh:.2}" fill="#4477aa"><title>{:.3} ms: {pc:.2}%</title></rect>"##,
            TOP + H - hh,
            bw.max(0.5),
            i as f64 * h.bin_us / 1000.0
        );
    }
    let tx = LEFT + W * (p.t_pkt_ns as f64 / 1e6) / x_max;
    let _ = writeln!(
        s,
        r##"<line x1="{tx:.1}" y1="{TOP:.0}" x2="{tx:.1}" y2="{:.0}" stroke="#cc3311" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.0}" fill="#cc3311">T_pkt</text>"##,
        TOP + H,
        tx + 3.0,
        TOP + 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="{:.0}" text-anchor="end">overflow &gt; {x_max} ms: {:.2}%</text>"#,
        LEFT + W,
        TOP - 6.0,
        h.overflow_percent
    );
    s.push_str("</svg>\n");
    s
}

fn polyline(s: &mut String, pts: &[(f64, f64)], x_max: f64, y_max: f64, colour: &str) {
    let mut d = String::new();
    for &(x, y) in pts {
        let _ = write!(
            d,
            "{:.2},{:.2} ",
            LEFT + W * x / x_max,
            TOP + H * (1.0 - y / y_max)
        );
    }
    let _ = writeln!(
        s,
        r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
        d.trim_end()
    );
}

/// The compression CDF over [0, T_pkt], normalised over all ACKs (Figs. 4.6/4.7).
pub fn compression_cdf(f: &FlowReport, p: &Params, title: &str) -> String {
    let x_max = p.t_pkt_ns as f64 / 1e6;
    let pts: Vec<(f64, f64)> = f
        .compression_cdf
        .iter()
        .map(|&(x, y)| (x, y * 100.0))
        .collect();
    let y_max = nice_max(pts.last().map_or(1.0, |p| p.1).max(1.0));
    let mut s = frame(
        title,
        "ACK inter-arrival time (ms)",
        "cumulative ACKs (%)",
        x_max,
        y_max,
    );
    polyline(&mut s, &pts, x_max, y_max, "#4477aa");
    s.push_str("</svg>\n");
    s
}

/// Throughput per interval (Mb/s) against time (s).
pub fn throughput(series_mbps: &[f64], interval_ns: u64, title: &str) -> String {
    let iv_s = interval_ns as f64 / 1e9;
    let x_max = (series_mbps.len() as f64 * iv_s).max(iv_s);
    let y_max = nice_max(series_mbps.iter().copied().fold(0.0, f64::max));
    let mut s = frame(title, "time (s)", "throughput (Mb/s)", x_max, y_max);
    let pts: Vec<(f64, f64)> = series_mbps
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64 * iv_s, v))
        .collect();
    polyline(&mut s, &pts, x_max, y_max, "#228833");
    s.push_str("</svg>\n");
    s
}
