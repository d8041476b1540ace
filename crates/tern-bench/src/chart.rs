//! SVG bar charts for benchmark results (no dependencies; one `<rect class="bar">` per bar).

use std::fmt::Write as _;

/// One series of bars: its legend name and fill colour.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub colour: &'static str,
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A grouped bar chart on a log axis: one group per label, one bar per series (`values[i]`
/// belongs to `series[i]`). Missing values leave a gap marked "n/a". Every bar is a
/// `<rect class="bar" ...>`.
pub fn log_bars(
    title: &str,
    axis: &str,
    unit: &str,
    series: &[Series],
    groups: &[(String, Vec<Option<f64>>)],
) -> String {
    let values: Vec<f64> = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().filter_map(|v| *v))
        .filter(|v| *v > 0.0)
        .collect();
    let bar_w = 14.0;
    let group_gap = 18.0;
    let group_w = bar_w * series.len().max(1) as f64 + group_gap;
    let (left, right, top, plot_h, bottom) = (70.0, 150.0, 64.0, 300.0, 90.0);
    // At least wide enough for the title and legend.
    let width = (left + group_w * groups.len().max(1) as f64 + right).max(560.0);
    let height = top + plot_h + bottom;
    let (lo_exp, hi_exp) = if values.is_empty() {
        (0, 3)
    } else {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(0.0, f64::max);
        let lo_exp = lo.log10().floor() as i32;
        let hi_exp = (hi.log10().ceil() as i32).max(lo_exp + 1);
        (lo_exp, hi_exp)
    };
    let span = f64::from(hi_exp - lo_exp);
    let y = |v: f64| top + plot_h * (1.0 - (v.log10() - f64::from(lo_exp)) / span);
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
        r#"<text x="{left:.0}" y="22" font-size="14">{}</text>"#,
        xml_escape(title)
    );
    // Grid and axis labels at 1, 2, 5 × 10^k.
    for e in lo_exp..=hi_exp {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if e == hi_exp && m > 1.0 {
                continue;
            }
            let yy = y(v);
            let stroke = if m == 1.0 { "#bbbbbb" } else { "#e5e5e5" };
            let _ = writeln!(
                s,
                r#"<line x1="{left:.0}" y1="{yy:.1}" x2="{:.0}" y2="{yy:.1}" stroke="{stroke}"/>"#,
                width - right
            );
            let label = if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{label}</text>"#,
                left - 6.0,
                yy + 4.0
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.0}" text-anchor="middle" transform="rotate(-90 16 {:.0})">{} (log scale)</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        xml_escape(axis)
    );
    let base = top + plot_h;
    let _ = writeln!(
        s,
        r#"<line x1="{left:.0}" y1="{base:.1}" x2="{:.0}" y2="{base:.1}" stroke="black"/>"#,
        width - right
    );
    for (gi, (name, bars)) in groups.iter().enumerate() {
        let gx = left + group_gap / 2.0 + gi as f64 * group_w;
        for (ti, t) in series.iter().enumerate() {
            let x = gx + ti as f64 * bar_w;
            match bars.get(ti).copied().flatten() {
                Some(v) if v > 0.0 => {
                    let yy = y(v);
                    let _ = writeln!(
                        s,
                        r#"<rect class="bar" x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {:.1} {}</title></rect>"#,
                        bar_w - 2.0,
                        base - yy,
                        t.colour,
                        xml_escape(name),
                        xml_escape(&t.name),
                        v,
                        xml_escape(unit)
                    );
                    // The value above the bar, vertical (bars are narrow).
                    let (vx, vy) = (x + bar_w / 2.0 + 3.0, yy - 3.0);
                    let _ = writeln!(
                        s,
                        r##"<text x="{vx:.1}" y="{vy:.1}" font-size="8" fill="#333333" transform="rotate(-90 {vx:.1} {vy:.1})">{}</text>"##,
                        if v >= 100.0 {
                            format!("{v:.0}")
                        } else {
                            format!("{v:.1}")
                        }
                    );
                }
                _ => {
                    if ti < bars.len() {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" font-size="8" fill="#999999" transform="rotate(-90 {:.1} {:.1})">n/a</text>"##,
                            x + bar_w / 2.0 + 3.0,
                            base - 4.0,
                            x + bar_w / 2.0 + 3.0,
                            base - 4.0
                        );
                    }
                }
            }
        }
        let lx = gx + bar_w * series.len() as f64 / 2.0;
        let ly = base + 14.0;
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="end" transform="rotate(-35 {lx:.1} {ly:.1})">{}</text>"#,
            xml_escape(name)
        );
    }
    for (i, t) in series.iter().enumerate() {
        let lx = width - right + 20.0;
        let ly = top + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="{:.0}" width="12" height="12" fill="{}"/>"#,
            ly - 10.0,
            t.colour
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{ly:.0}">{}</text>"#,
            lx + 18.0,
            xml_escape(&t.name)
        );
    }
    s.push_str("</svg>\n");
    s
}
