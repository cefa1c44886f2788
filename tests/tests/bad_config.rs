//! `skiff serve` refuses a bad configuration — a bad flag value, a missing
//! `--id`, an unknown or mistyped TOML key, a value that fails validation —
//! by exiting non-zero with a message that names the field, before it
//! touches the network.

use std::process::Command;
use std::time::Duration;

use skiff_tests::{free_addr, run_bounded, skiff_bin};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of a valid single-node configuration in `dir`, less those named
/// in `without`.
fn valid_flags(dir: &std::path::Path, without: &[&str]) -> Vec<String> {
    let peer = free_addr();
    let flags = [
        ("--id", "1".to_string()),
        ("--data-dir", dir.join("data").display().to_string()),
        ("--listen-client", free_addr().to_string()),
        ("--listen-peer", peer.to_string()),
        ("--initial-cluster", format!("1={peer}")),
    ];
    flags
        .into_iter()
        .filter(|(f, _)| !without.contains(f))
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
}

/// Runs `skiff serve <args>`; asserts a non-zero exit and that stderr
/// mentions every one of `needles`; returns stderr.
fn refused(args: &[String], needles: &[&str]) -> String {
    let out = run_bounded(
        Command::new(skiff_bin()).arg("serve").args(args),
        EXIT_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "skiff serve {args:?} succeeded; stderr:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "skiff serve {args:?}: stderr does not mention {needle:?}:\n{stderr}"
        );
    }
    stderr
}

fn with(mut flags: Vec<String>, extra: &[&str]) -> Vec<String> {
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

#[test]
fn bad_flag_values_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let base = || valid_flags(dir.path(), &["--id"]);
    refused(&with(base(), &["--id", "one"]), &["--id"]);
    refused(
        &with(base(), &["--id", "1", "--tick-interval-ms", "fast"]),
        &["--tick-interval-ms"],
    );
    refused(
        &with(base(), &["--id", "1", "--wal-backend", "floppy"]),
        &["--wal-backend"],
    );
    refused(
        &with(base(), &["--id", "1", "--no-such-flag", "1"]),
        &["--no-such-flag"],
    );
    // Values that parse but fail validation.
    refused(
        &with(base(), &["--id", "1", "--tick-interval-ms", "0"]),
        &["tick-interval-ms"],
    );
    refused(
        &with(base(), &["--id", "1", "--heartbeat-ticks", "1000"]),
        &["heartbeat"],
    );
    refused(
        &with(base(), &["--id", "1", "--snapshot-entries", "0"]),
        &["snapshot-entries"],
    );
    refused(
        &with(base(), &["--id", "1", "--wal-segment-size", "1000"]),
        &["wal"],
    );
    // A node id the initial cluster does not list.
    refused(&with(base(), &["--id", "7"]), &["initial-cluster"]);
    // Unparsable cluster lists name the flag and the bad entry.
    let flags: Vec<String> = valid_flags(dir.path(), &["--initial-cluster"]);
    refused(
        &with(flags, &["--initial-cluster", "1=nowhere"]),
        &["--initial-cluster", "nowhere"],
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused configuration created the data directory"
    );
}

#[test]
fn missing_id_is_named() {
    let dir = tempfile::tempdir().unwrap();
    refused(&valid_flags(dir.path(), &["--id"]), &["--id"]);
    refused(&valid_flags(dir.path(), &["--data-dir"]), &["data-dir"]);
    refused(
        &valid_flags(dir.path(), &["--initial-cluster"]),
        &["initial-cluster"],
    );
}

#[test]
fn bad_toml_keys_and_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("skiff.toml");
    let run = |toml: &str, needles: &[&str]| {
        std::fs::write(&config, toml).unwrap();
        let flags = with(
            valid_flags(dir.path(), &[]),
            &["--config", config.to_str().unwrap()],
        );
        refused(&flags, needles)
    };
    run("id = 1\nbatch_sise = 64\n", &["batch_sise"]);
    run("election_ticks_min = \"many\"\n", &["election_ticks_min"]);
    run("heartbeat_ticks = -1\n", &["heartbeat_ticks"]);
    run("wal_backend = \"floppy\"\n", &["wal_backend"]);
    run("initial_cluster = \"1=x\"\n", &["initial_cluster"]);
    // A file that is not there.
    std::fs::remove_file(&config).unwrap();
    let flags = with(
        valid_flags(dir.path(), &[]),
        &["--config", config.to_str().unwrap()],
    );
    refused(&flags, &["skiff.toml"]);
}
