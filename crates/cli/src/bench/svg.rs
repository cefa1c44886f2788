//! A hand-written SVG plot of a latency distribution, in the style of
//! HdrHistogram's percentile plots: x is the percentile on a "1/(1-p)" log
//! axis (0 %, 90 %, 99 %, ... 99.999 %), y is the latency on a log axis.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 500.0;
const MARGIN_LEFT: f64 = 90.0;
const MARGIN_RIGHT: f64 = 30.0;
const MARGIN_TOP: f64 = 60.0;
const MARGIN_BOTTOM: f64 = 70.0;
/// The x axis ends at 99.999 %: 5 decades of 1/(1-p).
const X_DECADES: f64 = 5.0;
/// Quantile iteration density (HdrHistogram's "ticks per half distance").
const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Bound on plotted points.
const POINTS_MAX: usize = 4000;

/// The marked percentiles: (quantile, label).
const MARKS: [(f64, &str); 3] = [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")];

/// Renders the plot. `subtitle` is printed under the title (the RESULT line).
pub(super) fn latency_plot(histogram: &Histogram<u64>, title: &str, subtitle: &str) -> String {
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let mut s = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; the results are ignored below.
    let _ = writeln!(
        s,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{:.1}" y="24" text-anchor="middle" font-size="16">{}</text>
<text x="{:.1}" y="44" text-anchor="middle" fill="#555">{}</text>"##,
        WIDTH / 2.0,
        escape(title),
        WIDTH / 2.0,
        escape(subtitle),
    );

    // Y range: whole decades around the data, at least one decade.
    let (lo_us, hi_us) = if histogram.is_empty() {
        (1, 1000)
    } else {
        (histogram.min().max(1), histogram.max().max(1))
    };
    let y_lo = (lo_us as f64).log10().floor();
    let y_hi = ((hi_us as f64).log10().ceil()).max(y_lo + 1.0);
    let x_of = |decades: f64| MARGIN_LEFT + decades.clamp(0.0, X_DECADES) / X_DECADES * plot_w;
    let y_of = |us: f64| {
        let v = us.max(1.0).log10().clamp(y_lo, y_hi);
        MARGIN_TOP + plot_h - (v - y_lo) / (y_hi - y_lo) * plot_h
    };

    // Frame.
    let _ = writeln!(
        s,
        r#"<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );

    // X ticks: one per decade of 1/(1-p).
    for d in 0..=(X_DECADES as u32) {
        let x = x_of(f64::from(d));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{MARGIN_TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>
<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/>
<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            MARGIN_TOP + plot_h,
            MARGIN_TOP + plot_h,
            MARGIN_TOP + plot_h + 5.0,
            MARGIN_TOP + plot_h + 20.0,
            percentile_label(d),
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile (log scale of 1/(1-p))</text>"#,
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 20.0,
    );

    // Y ticks: one per decade, light minor lines at 2..9.
    let decades = (y_hi - y_lo) as u32;
    for k in 0..=decades {
        let decade = 10f64.powf(y_lo + f64::from(k));
        let y = y_of(decade);
        let _ = writeln!(
            s,
            r##"<line x1="{MARGIN_LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>
<line x1="{:.1}" y1="{y:.1}" x2="{MARGIN_LEFT}" y2="{y:.1}" stroke="black"/>
<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            MARGIN_LEFT + plot_w,
            MARGIN_LEFT - 5.0,
            MARGIN_LEFT - 8.0,
            y + 4.0,
            latency_label(decade),
        );
        if k < decades {
            for m in 2..=9 {
                let y = y_of(decade * f64::from(m));
                let _ = writeln!(
                    s,
                    r##"<line x1="{MARGIN_LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#f2f2f2"/>"##,
                    MARGIN_LEFT + plot_w,
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (µs, log scale)</text>"#,
        MARGIN_TOP + plot_h / 2.0,
        MARGIN_TOP + plot_h / 2.0,
    );

    if histogram.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#a00">no data</text>"##,
            MARGIN_LEFT + plot_w / 2.0,
            MARGIN_TOP + plot_h / 2.0,
        );
    } else {
        let mut points = String::new();
        let mut n = 0usize;
        for v in histogram.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            let x = x_of(decades_of(v.quantile_iterated_to()));
            let y = y_of(v.value_iterated_to() as f64);
            let _ = write!(points, "{x:.1},{y:.1} ");
            n += 1;
            if n >= POINTS_MAX {
                break;
            }
        }
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            points.trim_end()
        );
        for (q, label) in MARKS {
            let value = histogram.value_at_quantile(q);
            let (x, y) = (x_of(decades_of(q)), y_of(value as f64));
            let _ = writeln!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="#d62728"/>
<text x="{:.1}" y="{:.1}" fill="#d62728">{label} {value} µs</text>"##,
                x + 6.0,
                y - 6.0,
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// x position of quantile `q`, in decades of 1/(1-q), capped at the axis end.
fn decades_of(q: f64) -> f64 {
    let tail = (1.0 - q).max(10f64.powf(-X_DECADES));
    (-tail.log10()).clamp(0.0, X_DECADES)
}

/// "0%", "90%", "99%", "99.9%", ... for decade `d` of 1/(1-p).
fn percentile_label(d: u32) -> String {
    match d {
        0 => "0%".to_string(),
        1 => "90%".to_string(),
        d => format!(
            "99{}{}%",
            if d > 2 { "." } else { "" },
            "9".repeat(d as usize - 2)
        ),
    }
}

/// "1 µs", "10 µs", "100 µs", "1 ms", ... for a power of ten in µs.
fn latency_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    /// A minimal well-formedness check: every tag closes in order, the
    /// document is one <svg> element, attribute values are quoted and no
    /// number is NaN or infinite.
    fn check_well_formed(doc: &str) {
        let body = doc
            .strip_prefix(r#"<?xml version="1.0" encoding="UTF-8"?>"#)
            .expect("xml declaration")
            .trim();
        assert!(body.starts_with("<svg "), "root is svg");
        assert!(body.ends_with("</svg>"), "ends with </svg>");
        assert!(
            !doc.contains("NaN") && !doc.contains("inf"),
            "finite numbers"
        );
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = body;
        let mut roots = 0;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray '>' in text {text:?}");
            let close = rest[open..].find('>').expect("tag closes") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside tag {tag:?}");
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes balance in {tag:?}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name), "closing </{name}>");
            } else {
                let name = tag.split_whitespace().next().expect("tag name");
                if stack.is_empty() {
                    roots += 1;
                }
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert_eq!(roots, 1, "one root element");
    }

    #[test]
    fn plot_is_well_formed_with_axes_and_a_curve() {
        let report = sample_report();
        let doc = report.svg("load <&> \"test\"");
        check_well_formed(&doc);
        assert!(doc.contains("load &lt;&amp;&gt; &quot;test&quot;"));
        for label in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(doc.contains(&format!(">{label}</text>")), "x label {label}");
        }
        for label in ["1 µs", "10 µs", "100 µs", "1 ms", "10 ms"] {
            assert!(doc.contains(&format!(">{label}</text>")), "y label {label}");
        }
        assert!(doc.contains("RESULT writes_per_s="));
        let points = doc
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .expect("polyline points");
        let xs: Vec<f64> = points
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert!(xs.len() > 10, "{} points", xs.len());
        assert!(xs.windows(2).all(|w| w[0] <= w[1]), "x never goes back");
    }

    #[test]
    fn empty_plot_is_well_formed() {
        let doc = latency_plot(&crate::bench::load::new_histogram(), "t", "s");
        check_well_formed(&doc);
        assert!(doc.contains("no data"));
    }

    #[test]
    fn axis_helpers() {
        assert_eq!(decades_of(0.0), 0.0);
        assert!((decades_of(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(decades_of(1.0), X_DECADES);
        assert_eq!(latency_label(1000.0), "1 ms");
        assert_eq!(latency_label(1e7), "10 s");
        assert_eq!(percentile_label(3), "99.9%");
    }
}
