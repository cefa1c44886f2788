//! `engine-bench --quick` runs to its end and reports a positive rate.

use std::process::Command;

#[test]
fn quick_run_prints_a_positive_result() {
    let out = Command::new(env!("CARGO_BIN_EXE_engine-bench"))
        .args([
            "--quick",
            "--secs",
            "1",
            "--proposers",
            "2",
            "--inflight",
            "32",
        ])
        .output()
        .expect("engine-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "engine-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let rate: f64 = last
        .strip_prefix("RESULT entries_per_s=")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no RESULT line last:\n{stdout}"));
    assert!(rate > 0.0, "{last}");
    for field in ["p50_us=", "p99_us=", "cpu_us_per_entry="] {
        assert!(last.contains(field), "{field} missing from {last}");
    }
}
