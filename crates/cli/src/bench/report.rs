//! What a load run measured, and its outputs: a table, the `RESULT` line,
//! JSON and SVG.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{svg, BenchArgs, BenchError};

/// Percentiles listed in the JSON report.
pub const REPORT_PERCENTILES: [f64; 10] = [
    0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 99.999, 100.0,
];

/// Version of the JSON report layout; bump when a field changes meaning.
pub const JSON_REPORT_VERSION: u32 = 1;

/// The result of [`super::run_load`]. Counts and latencies cover only the
/// measured window (Puts that completed in it), not the warmup.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// The flags of the run.
    pub args: BenchArgs,
    /// The endpoints loaded (normalized: http://host:port).
    pub endpoints: Vec<String>,
    /// Successful Puts.
    pub writes: u64,
    /// Failed Puts by gRPC code name ("Unavailable", "DeadlineExceeded", ...).
    pub errors: BTreeMap<String, u64>,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// `writes / elapsed`.
    pub writes_per_s: f64,
    /// CPU time of this process (all threads) per measured write, µs: with
    /// the embedded cluster, servers and client together; against
    /// endpoints, the client alone. `None` when it could not be read.
    pub cpu_us_per_write: Option<f64>,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// 99.9th percentile latency, µs.
    pub p999_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Every measured latency, µs.
    pub histogram: Histogram<u64>,
}

/// One point of the latency distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PercentilePoint {
    /// 0..=100.
    pub percentile: f64,
    /// Latency at that percentile, µs.
    pub latency_us: u64,
}

/// The JSON form of a [`LoadReport`] (what `--json` writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonReport {
    /// Layout version ([`JSON_REPORT_VERSION`]).
    pub version: u32,
    /// The flags of the run.
    pub args: BenchArgs,
    /// The endpoints loaded.
    pub endpoints: Vec<String>,
    /// Successful Puts in the measured window.
    pub writes: u64,
    /// Failed Puts in the measured window, by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// Length of the measured window, seconds.
    pub elapsed_s: f64,
    /// Throughput.
    pub writes_per_s: f64,
    /// CPU time of the process per write, µs (see [`LoadReport`]).
    #[serde(default)]
    pub cpu_us_per_write: Option<f64>,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// 99.9th percentile latency, µs.
    pub p999_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// The distribution at [`REPORT_PERCENTILES`].
    pub percentiles: Vec<PercentilePoint>,
}

impl LoadReport {
    /// Derives the summary figures from the histogram.
    pub fn new(
        args: BenchArgs,
        endpoints: Vec<String>,
        writes: u64,
        errors: BTreeMap<String, u64>,
        elapsed: Duration,
        histogram: Histogram<u64>,
    ) -> Self {
        let elapsed_s = elapsed.as_secs_f64();
        let empty = histogram.is_empty();
        let at = |q: f64| {
            if empty {
                0
            } else {
                histogram.value_at_quantile(q)
            }
        };
        let report = Self {
            args,
            endpoints,
            writes,
            errors,
            elapsed,
            writes_per_s: if elapsed_s > 0.0 {
                writes as f64 / elapsed_s
            } else {
                0.0
            },
            cpu_us_per_write: None,
            p50_us: at(0.5),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: if empty { 0 } else { histogram.max() },
            mean_us: if empty { 0.0 } else { histogram.mean() },
            histogram,
        };
        debug_assert!(report.p50_us <= report.p99_us);
        debug_assert!(report.p99_us <= report.p999_us);
        debug_assert!(report.p999_us <= report.max_us);
        report
    }

    /// Failed Puts, all codes.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The one line that scripts grep:
    /// `RESULT writes_per_s=<n> p50_us=<n> p99_us=<n> p999_us=<n>`, then
    /// ` cpu_us_per_write=<f>` when the CPU time was read.
    pub fn result_line(&self) -> String {
        let mut line = format!(
            "RESULT writes_per_s={} p50_us={} p99_us={} p999_us={}",
            self.writes_per_s.round() as u64,
            self.p50_us,
            self.p99_us,
            self.p999_us
        );
        if let Some(cpu) = self.cpu_us_per_write {
            line.push_str(&format!(" cpu_us_per_write={cpu:.1}"));
        }
        line
    }

    /// A short human-readable table.
    pub fn human(&self) -> String {
        let a = &self.args;
        let mut out = format!(
            "skiff bench: {} clients × {} in flight, {} B values, {} keys, {:.1} s measured \
             (+{:.1} s warmup), {} endpoint(s)\n",
            a.clients,
            a.concurrency,
            a.value_size,
            a.key_space,
            self.elapsed.as_secs_f64(),
            a.warmup_time().as_secs_f64(),
            self.endpoints.len()
        );
        out.push_str(&format!(
            "  {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "writes", "writes/s", "mean µs", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
        ));
        out.push_str(&format!(
            "  {:>10} {:>12.0} {:>10.0} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            self.writes,
            self.writes_per_s,
            self.mean_us,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.error_total()
        ));
        if let Some(cpu) = self.cpu_us_per_write {
            out.push_str(&format!(
                "  CPU time of this process per write: {cpu:.1} µs\n"
            ));
        }
        if !self.errors.is_empty() {
            let by_code: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            out.push_str(&format!("  errors by code: {}\n", by_code.join(" ")));
        }
        out
    }

    /// Prints [`Self::human`] to stdout.
    pub fn print_human(&self) {
        print!("{}", self.human());
    }

    /// The JSON form.
    pub fn to_json(&self) -> JsonReport {
        let percentiles = REPORT_PERCENTILES
            .iter()
            .map(|&p| PercentilePoint {
                percentile: p,
                latency_us: if self.histogram.is_empty() {
                    0
                } else {
                    self.histogram.value_at_percentile(p)
                },
            })
            .collect();
        JsonReport {
            version: JSON_REPORT_VERSION,
            args: self.args.clone(),
            endpoints: self.endpoints.clone(),
            writes: self.writes,
            errors: self.errors.clone(),
            elapsed_s: self.elapsed.as_secs_f64(),
            writes_per_s: self.writes_per_s,
            cpu_us_per_write: self.cpu_us_per_write,
            p50_us: self.p50_us,
            p99_us: self.p99_us,
            p999_us: self.p999_us,
            max_us: self.max_us,
            mean_us: self.mean_us,
            percentiles,
        }
    }

    /// Writes the JSON form (pretty-printed) to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|source| BenchError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        write_file(path, text + "\n")
    }

    /// The latency distribution as an SVG document.
    pub fn svg(&self, title: &str) -> String {
        svg::latency_plot(&self.histogram, title, &self.result_line())
    }

    /// Writes [`Self::svg`] to `path`.
    pub fn write_svg(&self, path: &Path, title: &str) -> Result<(), BenchError> {
        write_file(path, self.svg(title))
    }
}

impl JsonReport {
    /// Reads a report that [`LoadReport::write_json`] wrote.
    pub fn read(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| BenchError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn write_file(path: &Path, text: String) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|source| BenchError::Io {
        op: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::load::new_histogram;

    /// A report over latencies 1..=10_000 µs, one each, plus errors.
    pub(crate) fn sample_report() -> LoadReport {
        let mut histogram = new_histogram::<u64>();
        for us in 1..=10_000 {
            histogram.record(us).expect("in range");
        }
        let errors = BTreeMap::from([("Unavailable".to_string(), 3)]);
        LoadReport::new(
            BenchArgs::default(),
            vec!["http://127.0.0.1:2379".to_string()],
            10_000,
            errors,
            Duration::from_secs(4),
            histogram,
        )
    }

    #[test]
    fn result_line_has_the_exact_format() {
        let report = sample_report();
        let line = report.result_line();
        assert_eq!(
            line,
            format!(
                "RESULT writes_per_s=2500 p50_us={} p99_us={} p999_us={}",
                report.p50_us, report.p99_us, report.p999_us
            )
        );
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], "RESULT");
        let names: Vec<&str> = fields[1..]
            .iter()
            .map(|f| {
                let (name, value) = f.split_once('=').expect("name=value");
                value.parse::<u64>().expect("integer");
                name
            })
            .collect();
        assert_eq!(names, ["writes_per_s", "p50_us", "p99_us", "p999_us"]);
        // 3 significant digits: within 0.1 % of the exact percentile.
        assert!((4995..=5006).contains(&report.p50_us), "{}", report.p50_us);
        assert!((9890..=9910).contains(&report.p99_us), "{}", report.p99_us);
        assert!(report.p999_us <= report.max_us);
        let mut with_cpu = sample_report();
        with_cpu.cpu_us_per_write = Some(61.26);
        assert_eq!(
            with_cpu.result_line(),
            format!("{line} cpu_us_per_write=61.3")
        );
        assert!(with_cpu.human().contains("per write: 61.3 µs"));
    }

    #[test]
    fn empty_report_is_all_zero() {
        let report = LoadReport::new(
            BenchArgs::default(),
            vec![],
            0,
            BTreeMap::new(),
            Duration::from_secs(1),
            new_histogram(),
        );
        assert_eq!(
            report.result_line(),
            "RESULT writes_per_s=0 p50_us=0 p99_us=0 p999_us=0"
        );
        assert!(report.human().contains("writes/s"));
        assert!(report.svg("empty").contains("no data"));
    }

    #[test]
    fn json_round_trips() {
        let report = sample_report();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("report.json");
        report.write_json(&path).expect("write");
        let back = JsonReport::read(&path).expect("read");
        assert_eq!(back, report.to_json());
        assert_eq!(back.version, JSON_REPORT_VERSION);
        assert_eq!(back.writes, 10_000);
        assert_eq!(back.errors["Unavailable"], 3);
        assert_eq!(back.args, BenchArgs::default());
        assert_eq!(back.percentiles.len(), REPORT_PERCENTILES.len());
        assert!(back
            .percentiles
            .windows(2)
            .all(|w| w[0].latency_us <= w[1].latency_us));
        // Scripts read fields by name from the pretty form.
        let text = std::fs::read_to_string(&path).expect("read text");
        assert!(text.contains("\"writes_per_s\": 2500.0"), "{text}");
    }

    #[test]
    fn write_to_a_missing_dir_names_the_file() {
        let report = sample_report();
        let err = report
            .write_json(Path::new("/nonexistent-dir/x.json"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x.json"), "{err}");
    }
}
