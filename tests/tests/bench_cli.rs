//! `skiff bench` with no endpoints — the README's main command — as a child
//! process: it starts its embedded 3-node cluster, loads it, ends with the
//! exact `RESULT` line, and writes the JSON report and the SVG plot asked
//! for. Short measured window: this checks the job runs end to end, not
//! its speed (that is the bench's own business).

use std::process::Command;
use std::time::Duration;

use skiff_tests::{run_bounded, skiff_bin};

const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name} in {line:?}: {e}"))
}

#[test]
fn bench_loads_an_embedded_cluster_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let svg = dir.path().join("latency.svg");
    let out = run_bounded(
        Command::new(skiff_bin())
            .args(["bench", "--duration", "1", "--warmup", "0", "--no-progress"])
            .args(["--clients", "2", "--concurrency", "4"])
            .arg("--json")
            .arg(&json)
            .arg("--plot")
            .arg(&svg)
            .env("TMPDIR", dir.path()),
        BENCH_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "skiff bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("RESULT writes_per_s="),
        "last line {last:?} of\n{stdout}"
    );
    let names: Vec<&str> = last
        .split_whitespace()
        .skip(1)
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    // `cpu_us_per_write` follows when the bench could read its CPU time.
    assert_eq!(names[..4], ["writes_per_s", "p50_us", "p99_us", "p999_us"]);
    assert!(
        names[4..].is_empty() || names[4..] == ["cpu_us_per_write"],
        "{last}"
    );
    assert!(field(last, "writes_per_s") > 0, "{last}");
    let (p50, p99, p999) = (
        field(last, "p50_us"),
        field(last, "p99_us"),
        field(last, "p999_us"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= p999, "{last}");

    let report = std::fs::read_to_string(&json).expect("the JSON report");
    assert!(report.contains("\"writes_per_s\""), "{report}");
    let plot = std::fs::read_to_string(&svg).expect("the SVG plot");
    assert!(plot.trim_start().starts_with("<svg") || plot.starts_with("<?xml"));
    assert!(plot.trim_end().ends_with("</svg>"));
}

#[test]
fn bench_ceiling_loads_a_server_that_keeps_nothing() {
    let out = run_bounded(
        Command::new(skiff_bin())
            .args(["bench", "--ceiling", "--duration", "1", "--warmup", "0"])
            .args(["--no-progress", "--clients", "2", "--concurrency", "4"]),
        BENCH_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "skiff bench --ceiling failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("ceiling:"), "{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(field(last, "writes_per_s") > 0, "{last}");
    // Every Put succeeded: the table's error column is 0.
    assert!(
        !stdout.contains("errors by code"),
        "the ceiling server refused Puts:\n{stdout}"
    );

    // It is a baseline for a cluster run, not a target: with endpoints it
    // is refused by name.
    let out = run_bounded(
        Command::new(skiff_bin()).args(["bench", "--ceiling", "--endpoints", "127.0.0.1:2379"]),
        BENCH_TIMEOUT,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ceiling") && stderr.contains("--endpoints"),
        "{stderr}"
    );
}

#[test]
fn bench_watchers_measures_without_with_and_without_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_bounded(
        Command::new(skiff_bin())
            .args(["bench", "--duration", "1", "--warmup", "0", "--no-progress"])
            .args(["--clients", "2", "--concurrency", "4", "--key-space", "10"])
            .args(["--watchers", "20"])
            .env("TMPDIR", dir.path()),
        BENCH_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skiff bench --watchers failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in [
        "without watchers:",
        "with 20 watchers:",
        "without watchers again:",
    ] {
        assert!(stdout.contains(phase), "no {phase:?} in\n{stdout}");
    }
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("RESULT watchers=20 "), "{last}");
    // Two watchers per key: every write made two events.
    assert!(field(last, "events_per_s") > 0, "{last}");
    let (before, after) = (field(last, "p99_us_before"), field(last, "p99_us_after"));
    assert_eq!(
        field(last, "p99_us_without"),
        (before + after).div_ceil(2),
        "{last}"
    );
}
