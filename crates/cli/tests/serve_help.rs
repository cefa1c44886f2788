//! The `skiff serve` operator surface: `--help` describes every flag and
//! shows its default (taken from `NodeConfig::default()` and
//! `KvOptions::default()`), ids are decimal or 0x-hex, and
//! `--initial-cluster-state` reaches the node's configuration.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use skiff_kv::server::KvOptions;
use skiff_node::config::NodeConfig;

fn skiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .output()
        .expect("run skiff")
}

/// `--flag` → the text of its block in `skiff serve <help_flag>` (its
/// description, default and possible values, lines joined by spaces).
fn flag_blocks(help_flag: &str) -> BTreeMap<String, String> {
    let out = skiff(&["serve", help_flag]);
    assert!(out.status.success(), "skiff serve {help_flag}: {out:?}");
    let text = String::from_utf8(out.stdout).expect("help is UTF-8");
    let mut blocks: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // An option starts a block: `  -h, --help` or `      --flag <VALUE>`.
        if (2..=6).contains(&indent) && trimmed.starts_with('-') {
            let flag = trimmed
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .expect("an option line names a long flag")
                .trim_end_matches(',')
                .to_string();
            // Short help puts the description on the same line.
            let rest = trimmed
                .split_once('>')
                .map_or("", |(_, rest)| rest)
                .trim()
                .to_string();
            blocks.insert(flag.clone(), rest);
            current = Some(flag);
        } else if indent == 0 {
            current = None;
        } else if let Some(flag) = &current {
            let block = blocks.get_mut(flag).expect("the current block");
            block.push(' ');
            block.push_str(trimmed);
        }
    }
    blocks
}

fn default_of(block: &str) -> Option<&str> {
    let (_, rest) = block.split_once("[default: ")?;
    rest.split_once(']').map(|(d, _)| d)
}

#[test]
fn every_serve_flag_has_a_description_and_a_default() {
    let n = NodeConfig::default();
    let kv = KvOptions::default();
    for help_flag in ["--help", "-h"] {
        let blocks = flag_blocks(help_flag);
        assert!(blocks.len() > 30, "{help_flag}: {blocks:#?}");
        for (flag, block) in &blocks {
            if flag == "--help" {
                continue;
            }
            let description = block.split("[default: ").next().unwrap_or("").trim();
            assert!(
                description.len() >= 10,
                "{help_flag}: {flag} has no description: {block:?}"
            );
            assert!(
                default_of(block).is_some_and(|d| !d.is_empty()),
                "{help_flag}: {flag} shows no default: {block:?}"
            );
        }
        let shown = |flag: &str| {
            default_of(&blocks[flag])
                .unwrap_or_else(|| panic!("{flag}"))
                .to_string()
        };
        // The defaults are the configuration's, not copies.
        assert_eq!(shown("--tick-interval-ms"), n.tick_interval_ms.to_string());
        assert_eq!(
            shown("--election-ticks-min"),
            n.election_ticks_min.to_string()
        );
        assert_eq!(shown("--batch-bytes-max"), n.batch_bytes_max.to_string());
        assert_eq!(shown("--pre-vote"), n.pre_vote.to_string());
        assert_eq!(shown("--listen-client"), n.listen_client.to_string());
        assert_eq!(shown("--snapshot-entries"), n.snapshot_entries.to_string());
        assert_eq!(shown("--wal-segment-size"), n.wal_segment_size.to_string());
        assert_eq!(shown("--wal-backend"), "auto");
        assert_eq!(shown("--initial-cluster-state"), "new");
        assert_eq!(shown("--id"), "none, required");
        assert_eq!(shown("--listen-metrics"), "none");
        assert_eq!(
            shown("--quota-backend-bytes"),
            kv.quota_backend_bytes.to_string()
        );
        assert_eq!(shown("--quota-backend-bytes"), (2u64 << 30).to_string());
        assert_eq!(
            shown("--watch-progress-notify-interval-ms"),
            kv.watch_progress_interval.as_millis().to_string()
        );
        assert_eq!(
            shown("--lease-checkpoint-interval-ms"),
            kv.lease_checkpoint_interval.as_millis().to_string()
        );
    }
}

fn stderr_of(args: &[&str]) -> String {
    let out = skiff(args);
    assert!(!out.status.success(), "skiff {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ids_are_decimal_or_hex() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // 0x2 is member 2, which the cluster does not list: the check that
    // refuses it names the id it parsed.
    for id in ["0x2", "0X2", "2"] {
        let err = stderr_of(&[
            "serve",
            "--id",
            id,
            "--data-dir",
            data,
            "--initial-cluster",
            "1=127.0.0.1:1",
        ]);
        assert!(
            err.contains("does not list this node (id 2)"),
            "{id}: {err}"
        );
    }
    for bad in ["0xZZ", "1.5", "two", "0x"] {
        let err = stderr_of(&["serve", "--id", bad]);
        assert!(err.contains("is not an id"), "{bad}: {err}");
        let err = stderr_of(&["serve", "--cluster-id", bad]);
        assert!(err.contains("is not an id"), "{bad}: {err}");
    }
}

#[test]
fn initial_cluster_state_reaches_the_node_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let base = [
        "serve",
        "--id",
        "1",
        "--data-dir",
        data,
        "--initial-cluster",
        "1=127.0.0.1:2380",
        "--initial-cluster-state",
    ];
    // Joining needs the cluster id: the config check says so.
    let mut args = base.to_vec();
    args.push("existing");
    let err = stderr_of(&args);
    assert!(err.contains("--cluster-id"), "{err}");
    let mut args = base.to_vec();
    args.push("sideways");
    let err = stderr_of(&args);
    assert!(
        err.contains("new") && err.contains("existing"),
        "the possible values: {err}"
    );
}
