//! Skiff through the `etcd-client` crate: a Rust client library for etcd's
//! v3 API that Skiff neither wrote nor controls (Skiff's own tests use
//! `skiff_tests::client`, built on skiff-kv's stubs, and the real etcdctl).
//!
//! The library's calls are made by `tests/etcd-client-check`, a program in
//! a Cargo workspace of its own: the etcd-client crate's build script
//! compiles etcd's `.proto` files with whatever `PROTOC` names, and Skiff's
//! build must need no protoc. [`check_program`] builds it once per test
//! process, with `PROTOC` naming this crate's `skiff-test-protoc` (a
//! protoc-compatible descriptor-set writer on the `protox` parser), into
//! `<target>/etcd-client-check`, from its committed `Cargo.lock`
//! (`--locked`). So these tests need nothing but a Rust toolchain and the
//! crates' sources, like every other test here.
//!
//! * KV and watch (`kv-watch`, through a follower): put with prev_kv, a
//!   txn compare-and-set won and lost; a prefix watch from now with
//!   prev_kv (puts and a delete in revision order, a key outside the prefix
//!   never); the same history from a past revision; a filter without puts;
//!   cancel; a progress request; a watch from below a compaction cancelled
//!   with etcd's `compact_revision`, and a get there refused.
//! * Leases (`lease`, through a follower): grant, attach two keys,
//!   time-to-live with its keys, the lease list, a keepalive, revoke (both
//!   keys go at one revision; TTL -1 after), a put naming the revoked lease
//!   refused with etcd's error, and expiry of a lease nobody renews: after
//!   its TTL, never before.
//! * Lock contention between two processes: the second gets the lock only
//!   once the first released it.
//! * An election with two campaigner processes and an observer: the
//!   leader's process is SIGKILLed, the other takes over once its session
//!   lease expires (never before), proclaims and resigns; the observer sees
//!   the four values in order.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use skiff_tests::background::Background;
use skiff_tests::{run_bounded, Cluster, ClusterOptions, NodeId};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest run of a check program that is expected to finish.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a line a background check program must print.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest build of the check program (its dependencies compile the first
/// time: about 35 s on a 2-core machine).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// What a busy machine may add to an expected delay (an expiry, a
/// takeover): only ever makes a wait longer.
const SLACK: Duration = Duration::from_secs(30);
/// How long something that must not happen yet is watched for.
const QUIET: Duration = Duration::from_secs(1);
/// Raft tick and election timeout of the clusters here, stated so that the
/// TTLs below follow them: the smallest lease TTL is 1.5 election timeouts
/// (etcd's `minTTL`), 0.9 s here, so 1 s.
const TICK_INTERVAL_MS: u64 = 10;
const ELECTION_TICKS_MAX: u64 = 60;
/// TTL of the leases and sessions the check program grants, seconds.
const TTL_S: u64 = 3;

fn options() -> ClusterOptions {
    ClusterOptions::default()
        .arg("--tick-interval-ms", TICK_INTERVAL_MS)
        .arg("--election-ticks-max", ELECTION_TICKS_MAX)
}

fn election_timeout() -> Duration {
    Duration::from_millis(TICK_INTERVAL_MS * ELECTION_TICKS_MAX)
}

/// The check program, built once per test process (see the module docs).
fn check_program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("etcd-client-check/Cargo.toml");
        // <target>/<profile>/deps/<this test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let target = exe
            .ancestors()
            .nth(3)
            .expect("the test binary lives in <target>/<profile>/deps");
        let target_dir = target.join("etcd-client-check");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let started = Instant::now();
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--quiet", "--locked", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target_dir)
            .env("PROTOC", env!("CARGO_BIN_EXE_skiff-test-protoc"))
            .env_remove("PROTOC_INCLUDE");
        let out = run_bounded(&mut cmd, BUILD_TIMEOUT);
        assert!(
            out.status.success(),
            "building the etcd-client check program ({cmd:?}) failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = target_dir.join("debug/etcd-client-check");
        assert!(
            bin.is_file(),
            "cargo built it but {} is missing",
            bin.display()
        );
        eprintln!(
            "etcd-client check program: {} (cargo build took {:.1} s)",
            bin.display(),
            started.elapsed().as_secs_f64()
        );
        bin
    })
}

fn check_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(check_program());
    cmd.args(args);
    cmd
}

/// Runs the check program to completion; panics unless it succeeds; its
/// stdout.
fn run_check(args: &[&str]) -> String {
    let out = run_bounded(&mut check_command(args), CHECK_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "etcd-client-check {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn endpoints(list: &[String]) -> String {
    list.join(",")
}

/// A 3-member cluster with a leader, one of its followers, and the check
/// program built (while the cluster started).
async fn cluster_and_program() -> (Cluster, NodeId) {
    let bin = tokio::task::spawn_blocking(check_program);
    let cluster = Cluster::start(options());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    bin.await.expect("the build");
    (cluster, follower)
}

/// The time (ms since the epoch) on the line of `out` that starts with
/// `tag` (the program's lines end with it).
fn stamp(out: &str, tag: &str) -> u128 {
    let line = out
        .lines()
        .find(|l| l.starts_with(tag))
        .unwrap_or_else(|| panic!("no {tag} line in {out:?}"));
    line.rsplit(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time at the end of {line:?}"))
}

/// The word after `tag` on its line.
fn word(out: &str, tag: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(tag))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_else(|| panic!("no {tag} line in {out:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_watch_through_etcd_client() {
    let (cluster, follower) = cluster_and_program().await;
    let out =
        tokio::task::spawn_blocking(move || run_check(&["kv-watch", &cluster.endpoint(follower)]))
            .await
            .expect("the check");
    for what in [
        "put get prev_kv txn",
        "prefix watch from now with prev_kv",
        "watch from a past revision",
        "watch filter without puts",
        "cancel",
        "request progress",
        "compacted start",
    ] {
        assert!(
            out.contains(&format!("ok {what}\n")),
            "no `ok {what}` in {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_etcd_client() {
    let (cluster, follower) = cluster_and_program().await;
    let endpoint = cluster.endpoint(follower);
    let out =
        tokio::task::spawn_blocking(move || run_check(&["lease", &endpoint, &TTL_S.to_string()]))
            .await
            .expect("the check");
    for what in [
        "grant attach time-to-live list",
        "keepalive",
        "revoke",
        "put with an unknown lease refused",
        "expiry",
    ] {
        assert!(
            out.contains(&format!("ok {what}\n")),
            "no `ok {what}` in {out}"
        );
    }
    let expired_ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("expired after "))
        .and_then(|l| l.trim_end_matches(" ms").parse().ok())
        .unwrap_or_else(|| panic!("no expiry time in {out}"));
    let bound = Duration::from_secs(TTL_S) + election_timeout() + SLACK;
    assert!(
        Duration::from_millis(expired_ms) <= bound,
        "the lease expired {expired_ms} ms after its grant, over {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_contention_between_two_etcd_client_processes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (cluster, follower) = cluster_and_program().await;
    let ttl = TTL_S.to_string();
    let hold_ms = 2_000;

    let first_endpoints = cluster.endpoint(follower);
    let mut first = Background::spawn_without_input(
        check_command(&["lock", &first_endpoints, "L", &ttl, &hold_ms.to_string()]),
        dir.path(),
        "first",
    );
    first.wait_output("\nLOCKED ", LINE_TIMEOUT).await;
    let all = endpoints(&cluster.endpoints());
    let mut second = Background::spawn_without_input(
        check_command(&["lock", &all, "L", &ttl, "0"]),
        dir.path(),
        "second",
    );
    second.wait_output("SESSION ", LINE_TIMEOUT).await;
    tokio::time::sleep(QUIET).await;
    if !first.stdout().contains("UNLOCKING") {
        assert!(
            !second.stdout().contains("LOCKED"),
            "the second got the lock while the first held it:\n{}\n{}",
            first.describe(),
            second.describe()
        );
    }
    first.wait_success(CHECK_TIMEOUT).await;
    second.wait_success(CHECK_TIMEOUT).await;
    let (a, b) = (first.stdout(), second.stdout());
    let released = stamp(&a, "UNLOCKING");
    let taken = stamp(&b, "LOCKED");
    assert!(
        taken >= released,
        "the second locked at {taken}, before the first released at {released}:\n{a}\n{b}"
    );
    assert_ne!(
        word(&a, "LOCKED"),
        word(&b, "LOCKED"),
        "one lock key for two holders"
    );
    assert!(word(&a, "LOCKED").starts_with("L/"), "lock key {a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_hands_over_when_the_leaders_process_is_killed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (cluster, follower) = cluster_and_program().await;
    let ttl = TTL_S.to_string();
    let all = endpoints(&cluster.endpoints());

    let mut observer = Background::spawn_without_input(
        check_command(&["observe", &cluster.endpoint(follower), "E", "4"]),
        dir.path(),
        "observer",
    );
    // A campaigner leads until its stdin closes (then it resigns).
    let campaigner = |value: &str| {
        let mut cmd = check_command(&["campaign", &all, "E", value, &ttl]);
        cmd.stdin(Stdio::piped());
        Background::spawn(cmd, dir.path(), value)
    };
    let mut one = campaigner("one");
    one.wait_output("\nPROCLAIMED ", LINE_TIMEOUT).await;
    let mut two = campaigner("two");
    two.wait_output("SESSION ", LINE_TIMEOUT).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        !two.stdout().contains("LEADER"),
        "two was elected while one led:\n{}",
        two.describe()
    );

    // One's process dies: its session lease is no longer renewed, and two
    // is elected once it expires.
    one.kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(TTL_S) + election_timeout() + SLACK;
    two.wait_output("\nLEADER ", bound).await;
    let took = killed.elapsed();
    eprintln!(
        "campaigner two took over {:.2} s after one was killed",
        took.as_secs_f64()
    );
    // One renewed its lease at most a third of its TTL before it died.
    let earliest = Duration::from_millis(TTL_S * 1000 * 2 / 3 - 200);
    assert!(
        took >= earliest,
        "two took over {took:?} after one was killed: one's lease expired early"
    );
    two.wait_output("\nPROCLAIMED ", LINE_TIMEOUT).await;
    assert_ne!(word(&one.stdout(), "LEADER"), word(&two.stdout(), "LEADER"));

    observer.wait_success(LINE_TIMEOUT).await;
    let seen: Vec<String> = observer
        .stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("OBSERVED "))
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        seen,
        ["one", "one-proclaimed", "two", "two-proclaimed"],
        "{}",
        observer.describe()
    );

    two.close_stdin();
    two.wait_success(LINE_TIMEOUT).await;
    assert!(two.stdout().contains("RESIGNED"), "{}", two.describe());
}
