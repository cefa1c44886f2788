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

/// CPU time (user + system) this process has used so far, all threads
/// together (one definition for every bench: the runtime's).
pub use skiff_node::metrics::process_cpu;

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
    fn process_cpu_counts_a_busy_thread() {
        let before = super::process_cpu().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = super::process_cpu().unwrap() - before;
        // A busy loop of 60 ms of wall time: at least a third of it is CPU
        // even on a loaded machine, and never more than a few threads' worth.
        assert!(
            used >= std::time::Duration::from_millis(20),
            "counted {used:?} of CPU for 60 ms of spinning"
        );
    }

    #[test]
    fn rates_are_grouped_by_thousands() {
        assert_eq!(super::fmt_rate(1234567.4), "1,234,567");
        assert_eq!(super::fmt_rate(999.0), "999");
        assert_eq!(super::fmt_rate(0.0), "0");
    }
}
