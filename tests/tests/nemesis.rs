//! Fault campaigns on a real 3-member cluster (see `skiff_tests::nemesis`):
//! kills, pauses, partitions, one-way loss, a slowed leader clock, power
//! losses (one member or all at once), WAL fsync errors and a leader's
//! disk stalling, on disks that lie (`skiff_tests::lying_disk`), on a
//! seeded schedule, every
//! client operation checked for linearizability and every acknowledged
//! write looked for on every member.
//!
//! `fault_campaign` is CI's bounded run (`SKIFF_NEMESIS_CYCLES`, default
//! 30; `SKIFF_NEMESIS_SEED` replays a schedule; `SKIFF_NEMESIS_KINDS`, a
//! comma-separated list such as `PowerLoss,FsyncError`, keeps those kinds
//! only). `soak` runs rounds for
//! `SKIFF_SOAK_SECS` (default one hour): `cargo test --release -p
//! skiff-tests --test nemesis soak -- --ignored --nocapture`.
//! Partitions need root and `nft` (Debian package nftables), the disk
//! faults root and `/dev/fuse`; without them the campaign runs the other
//! faults and says why.

use std::time::{Duration, Instant};

use skiff_tests::lying_disk;
use skiff_tests::nemesis::{self, Fault, Firewall, RoundStats, WorkloadConfig};
use skiff_tests::{Cluster, ClusterOptions};

/// A 3-member cluster whose members have peer IPs of their own, distinct
/// per test (`salt`) and per test process, on lying disks where `disks`.
fn cluster(salt: u8, lease_reads: bool, disks: bool) -> Cluster {
    Cluster::start(
        ClusterOptions {
            lying_disks: disks,
            ..options(salt)
        }
        // Elections a little slower than the default: on a busy 2-core
        // machine a member must not lose its leader to scheduling alone.
        .arg("--election-ticks-min", 50)
        .arg("--election-ticks-max", 100)
        .arg("--lease-reads", lease_reads),
    )
}

/// Options giving members peer IPs of their own, distinct per test
/// (`salt`, below 6) and per test process.
fn options(salt: u8) -> ClusterOptions {
    let pid = std::process::id();
    ClusterOptions {
        peer_ip_prefix: Some((
            100 + (pid % 50) as u8 + 50 * (salt % 2),
            (pid / 50 % 80) as u8 * 3 + 1 + salt / 2,
        )),
        ..ClusterOptions::default()
    }
}

/// `SKIFF_NEMESIS_CYCLES`, or `default`.
fn cycles(default: usize) -> usize {
    std::env::var("SKIFF_NEMESIS_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn round_config(seed: u64, cycles: usize, kinds: Vec<Fault>, round: usize) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        cycles,
        kinds,
        clients: 4,
        keys: 8,
        op_pause: Duration::from_millis(5),
        // Longer than an election timeout (100 ticks of 10 ms): a paused
        // or cut-off leader is replaced.
        hold: (Duration::from_millis(1_200), Duration::from_millis(2_500)),
        quiet: Duration::from_millis(300),
        key_prefix: format!("nemesis/{round}/"),
        serializable_reads: false,
        pinned_readers: false,
        slow_tick_ms: nemesis::SKEWED_TICK_MS,
        request_timeout: nemesis::WORKLOAD_CLIENT.request_timeout,
        artifacts: None,
    }
}

fn report(label: &str, s: &RoundStats) {
    println!(
        "NEMESIS {label}: cycles={} faults={:?} operations={} completed={} unknown={} reads={} \
         cas={} acked_writes={} lost_acked_writes={} linearizable={} check_steps={} \
         longest_recovery_ms={} power_losses={} files_reverted={} entries_reverted={} \
         fsync_errors={} disk_stalls={} fsyncs_stalled={} stall_hand_overs={}",
        s.cycles,
        s.faults,
        s.operations,
        s.completed,
        s.unknown,
        s.reads,
        s.cas,
        s.acked_writes,
        s.lost_acked_writes,
        s.linearizable,
        s.check_steps,
        s.longest_recovery.as_millis(),
        s.power_losses,
        s.files_reverted,
        s.entries_reverted,
        s.fsync_errors,
        s.disk_stalls,
        s.fsyncs_stalled,
        s.stall_hand_overs
    );
}

/// One checked round of `cycles` faults of every kind available.
async fn campaign(label: &str, salt: u8, lease_reads: bool, cycles: usize) {
    let seed = nemesis::seed_from_env();
    let firewall = Firewall::new(&format!("skiff_nemesis_{}_{salt}", std::process::id()));
    let disks = lying_disk::available();
    let (mut kinds, missing) = nemesis::available_kinds(&firewall, &disks);
    if let Some(why) = &missing {
        println!("NEMESIS {label}: {why}");
    }
    if let Ok(only) = std::env::var("SKIFF_NEMESIS_KINDS") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        kinds.retain(|k| only.contains(&format!("{k:?}").as_str()));
        assert!(
            !kinds.is_empty(),
            "SKIFF_NEMESIS_KINDS={only:?} names no available kind"
        );
    }
    println!("NEMESIS {label}: seed={seed} cycles={cycles} kinds={kinds:?}");
    let mut cluster = cluster(salt, lease_reads, disks.is_ok());
    let config = round_config(seed, cycles, kinds.clone(), 0);
    let stats = nemesis::run_round(&mut cluster, firewall.as_ref().ok(), &config)
        .await
        .unwrap_or_else(|e| panic!("{label}, seed {seed}: {e}"));
    report(label, &stats);
    assert_eq!(stats.cycles, cycles);
    for kind in &kinds {
        assert!(
            stats.faults.contains_key(&format!("{kind:?}")) || cycles < kinds.len(),
            "fault kind {kind:?} never ran in {cycles} cycles"
        );
    }
    assert!(stats.linearizable);
    assert_eq!(stats.lost_acked_writes, 0);
    // A campaign in which almost nothing was answered proves nothing.
    assert!(
        stats.completed >= 20 * cycles,
        "only {} operations completed in {cycles} cycles",
        stats.completed
    );
    assert!(stats.acked_writes > 0, "no ack write was acknowledged");
    // A power loss that never found anything to throw away tested nothing,
    // nor did a stall that held no fsync.
    if stats.power_losses > 0 {
        assert!(
            stats.files_reverted > 0,
            "{} power losses reverted no file",
            stats.power_losses
        );
    }
    if stats.disk_stalls > 0 {
        assert!(
            stats.fsyncs_stalled > 0,
            "{} disk stalls held no fsync",
            stats.disk_stalls
        );
    }
}

/// CI's campaign: linearizable reads by ReadIndex.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_campaign() {
    campaign("campaign", 0, false, cycles(30)).await;
}

/// The same faults with lease reads on (a leader answers reads from its
/// lease, without a round): pauses and partitions of the leader are
/// exactly what a lease must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_campaign_lease_reads() {
    campaign("campaign with lease reads", 1, true, cycles(14)).await;
}

/// The harness can fail: with serializable reads (served by any member
/// without a ReadIndex round), a member cut off from the majority answers
/// reads with values the majority has overwritten, and the round must end
/// in a linearizability violation, with its artifacts saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_are_caught() {
    let firewall = match Firewall::new(&format!("skiff_stale_{}", std::process::id())) {
        Ok(fw) => fw,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let seed = nemesis::seed_from_env();
    let mut cluster = cluster(2, false, false);
    let mut config = round_config(
        seed,
        6,
        vec![Fault::PartitionMinority, Fault::IsolateLeader],
        0,
    );
    config.serializable_reads = true;
    // A reader stays on each member: the cut-off one is asked all through
    // each partition, while the majority overwrites what it holds.
    config.pinned_readers = true;
    config.op_pause = Duration::from_millis(2);
    let artifacts = tempfile::tempdir().expect("a temporary directory");
    config.artifacts = Some(artifacts.path().to_path_buf());
    let result = nemesis::run_round(&mut cluster, Some(&firewall), &config).await;
    let err = match result {
        Ok(stats) => panic!(
            "seed {seed}: stale serializable reads under partitions went unnoticed: {stats:?}"
        ),
        Err(e) => e,
    };
    assert!(err.contains("not linearizable"), "seed {seed}: {err}");
    assert!(err.contains("replay: SKIFF_NEMESIS_SEED="), "{err}");
    let saved: Vec<_> = std::fs::read_dir(artifacts.path())
        .expect("the artifacts directory")
        .collect();
    assert_eq!(saved.len(), 1, "one failing round saved: {saved:?}");
    let dir = saved[0].as_ref().expect("an entry").path();
    for file in [
        "failure.txt",
        "schedule.txt",
        "history.txt",
        "cluster/node-1.log",
    ] {
        assert!(dir.join(file).exists(), "{} lacks {file}", dir.display());
    }
}

/// The clock fault can fail a round: with no drift allowed for
/// (`--lease-drift-pct 0`) a leader whose clock runs at half speed believes
/// its lease holds for 49 of its 20 ms ticks (980 ms) after it was cut off,
/// while the others, whose promise not to vote ends after 500 ms, elect a
/// new leader within 500-600 ms (election timeouts of 50-60 ticks) and
/// write: a reader pinned on the old leader reads what they overwrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_clock_past_the_drift_bound_is_caught() {
    let firewall = match Firewall::new(&format!("skiff_clock_{}", std::process::id())) {
        Ok(fw) => fw,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let seed = nemesis::seed_from_env();
    let mut cluster = Cluster::start(
        options(4)
            .arg("--election-ticks-min", 50)
            .arg("--election-ticks-max", 60)
            .arg("--lease-reads", true)
            .arg("--lease-drift-pct", 0),
    );
    let mut config = round_config(seed, 6, vec![Fault::SlowLeaderIsolated], 0);
    config.slow_tick_ms = 20;
    config.pinned_readers = true;
    // Clients leave a cut-off member fast, so that writes reach the new
    // leader while the old one's lease still runs.
    config.request_timeout = Duration::from_millis(200);
    let artifacts = tempfile::tempdir().expect("a temporary directory");
    config.artifacts = Some(artifacts.path().to_path_buf());
    let err = match nemesis::run_round(&mut cluster, Some(&firewall), &config).await {
        Ok(stats) => panic!(
            "seed {seed}: a leader whose clock ran at half speed served stale lease reads unnoticed: {stats:?}"
        ),
        Err(e) => e,
    };
    assert!(err.contains("not linearizable"), "seed {seed}: {err}");
}

/// The disk faults can fail a round: on disks whose WAL fsyncs succeed
/// without making anything durable (a drive that ignores cache flushes),
/// a coordinated power loss takes acknowledged writes with it, and the
/// round must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_lost_by_a_disk_that_ignores_fsync_are_caught() {
    if let Err(why) = lying_disk::available() {
        println!("skipped: {why}");
        return;
    }
    let seed = nemesis::seed_from_env();
    let mut cluster = cluster(5, false, true);
    for id in cluster.ids() {
        cluster
            .disk(id)
            .expect("a lying disk")
            .ignore_fsyncs(lying_disk::is_wal_segment);
    }
    let mut config = round_config(seed, 2, vec![Fault::PowerLossAll], 0);
    let artifacts = tempfile::tempdir().expect("a temporary directory");
    config.artifacts = Some(artifacts.path().to_path_buf());
    let err = match nemesis::run_round(&mut cluster, None, &config).await {
        Ok(stats) => panic!(
            "seed {seed}: a power loss on disks that ignore fsync lost nothing that was noticed: \
             {stats:?}"
        ),
        Err(e) => e,
    };
    println!("seed {seed}: the round failed as it must: {err}");
    assert!(
        err.contains("acknowledged writes") || err.contains("not linearizable"),
        "seed {seed}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a soak: runs for SKIFF_SOAK_SECS (default 3600)"]
async fn soak() {
    let seed = nemesis::seed_from_env();
    let secs: u64 = std::env::var("SKIFF_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let firewall = Firewall::new(&format!("skiff_soak_{}", std::process::id()));
    let disks = lying_disk::available();
    let (kinds, missing) = nemesis::available_kinds(&firewall, &disks);
    if let Some(why) = &missing {
        println!("NEMESIS soak: {why}");
    }
    let lease_reads = std::env::var("SKIFF_SOAK_LEASE_READS").is_ok_and(|v| v == "1");
    let mut cluster = cluster(3, lease_reads, disks.is_ok());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut totals = RoundStats::default();
    let mut round = 0;
    while Instant::now() < deadline {
        let round_seed = seed.wrapping_add(round as u64);
        let config = round_config(round_seed, 21, kinds.clone(), round);
        let s = nemesis::run_round(&mut cluster, firewall.as_ref().ok(), &config)
            .await
            .unwrap_or_else(|e| panic!("round {round} (seed {round_seed}): {e}"));
        report(&format!("round {round}"), &s);
        totals.cycles += s.cycles;
        totals.operations += s.operations;
        totals.completed += s.completed;
        totals.unknown += s.unknown;
        totals.reads += s.reads;
        totals.cas += s.cas;
        totals.acked_writes += s.acked_writes;
        for (k, n) in s.faults {
            *totals.faults.entry(k).or_default() += n;
        }
        totals.longest_recovery = totals.longest_recovery.max(s.longest_recovery);
        totals.power_losses += s.power_losses;
        totals.files_reverted += s.files_reverted;
        totals.entries_reverted += s.entries_reverted;
        totals.fsync_errors += s.fsync_errors;
        totals.disk_stalls += s.disk_stalls;
        totals.fsyncs_stalled += s.fsyncs_stalled;
        totals.stall_hand_overs += s.stall_hand_overs;
        totals.linearizable = true;
        round += 1;
    }
    report(
        &format!("soak total ({round} rounds, seed {seed})"),
        &totals,
    );
}
