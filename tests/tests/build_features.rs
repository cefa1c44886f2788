//! What `cargo build --release` at the workspace root puts in the `skiff`
//! binary: none of the `testing` features the tests crate turns on in
//! skiff-raft and skiff-wal (planted bugs, test disks). Before the
//! workspace named its `default-members`, Cargo unified them into the
//! binary, and with them the core's per-step invariant check, which is
//! O(entries in memory): half the CPU of a loaded leader.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use skiff_tests::run_bounded;

const CARGO_TIMEOUT: Duration = Duration::from_secs(300);

/// `cargo tree` of what depends on `krate` (with the features asked of
/// it), at the workspace root, for the normal (non-dev) build.
fn features_of(krate: &str, workspace: bool) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "tree",
        "--offline",
        "--edges",
        "normal,features",
        "-i",
        krate,
    ]);
    if workspace {
        cmd.arg("--workspace");
    }
    let out = run_bounded(&mut cmd, CARGO_TIMEOUT);
    assert!(
        out.status.success(),
        "cargo tree -i {krate} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_default_build_has_no_testing_features() {
    for krate in ["skiff-raft", "skiff-wal"] {
        let testing = format!("{krate} feature \"testing\"");
        let default = features_of(krate, false);
        assert!(
            default.contains(&format!("{krate} feature \"default\"")),
            "cargo tree printed no features of {krate}:\n{default}"
        );
        assert!(
            !default.contains(&testing),
            "the default build turns on {krate}'s `testing`:\n{default}"
        );
        // The same check sees the feature where the tests crate is built.
        assert!(
            features_of(krate, true).contains(&testing),
            "`cargo tree --workspace` shows no {testing}: the check above cannot fail"
        );
    }
}
