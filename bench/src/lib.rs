//! skiff-bench: shared pieces of Skiff's load benches (`src/bin`) and
//! criterion benches (`benches/`).

pub mod log;
pub mod raw;

use hdrhistogram::Histogram;

/// `p50=.. p99=.. p99.9=.. max=..` in microseconds.
pub fn percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50={}us p99={}us p99.9={}us max={}us (n={})",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    )
}

/// A rate with thousands separators, no decimals.
pub fn fmt_rate(per_s: f64) -> String {
    let n = per_s.round() as u64;
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_grouped_by_thousands() {
        assert_eq!(super::fmt_rate(1234567.4), "1,234,567");
        assert_eq!(super::fmt_rate(999.0), "999");
        assert_eq!(super::fmt_rate(0.0), "0");
    }
}
