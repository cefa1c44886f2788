//! Snapshots under sustained load: a 3-node cluster snapshots every few
//! seconds while a closed loop of writers keeps it busy. Snapshots are
//! written on a background thread, so the event loop keeps sending
//! heartbeats: no election happens (the Raft term and the leader stay put),
//! no request fails, every acknowledged write reads back, and every member
//! took several snapshots.
//!
//! `SKIFF_SUSTAINED_SECS` sets the length of the load (default 60 s).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_tests::client::{key_str, value_str, GetOptions};
use skiff_tests::{connect, metric, metric_labelled, Cluster, ClusterOptions, NodeId};

/// Applied entries between two snapshots: at the ~3,800 writes/s measured
/// on a 2-core machine (test profile), a snapshot every ~2.6 s, ~20 in the
/// default 60 s; a machine four times slower still takes 5.
const SNAPSHOT_ENTRIES: u64 = 10_000;
/// The log behind a snapshot (no member lags here; the default would keep
/// more entries than a snapshot interval).
const CATCHUP_ENTRIES: u64 = 1_000;
const WRITERS: usize = 16;
const KEYS: usize = 5_000;
const VALUE_BYTES: usize = 1024;
const DEFAULT_SECS: u64 = 60;
/// Snapshots every member must have taken by the end.
const SNAPSHOTS_MIN: f64 = 3.0;
/// Between two samples of every member's term and leader.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

fn key(k: usize) -> String {
    format!("s/{k:05}")
}

fn value(w: usize, seq: u64) -> String {
    let head = format!("w{w}-{seq}-");
    head.repeat(VALUE_BYTES / head.len() + 1)[..VALUE_BYTES].to_string()
}

/// Writer `w` owns the keys `k ≡ w (mod WRITERS)` and puts them one at a
/// time in a pseudo-random order until `stop`; every put must succeed.
/// Returns the last acknowledged value of each key it wrote.
async fn writer(
    w: usize,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> BTreeMap<String, String> {
    let mut client = connect(&endpoints).await;
    let mine = (KEYS - w).div_ceil(WRITERS);
    let mut last = BTreeMap::new();
    // xorshift: a fixed, per-writer sequence of keys.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (w as u64 + 1);
    let mut seq = 0;
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = key(w + WRITERS * (x % mine as u64) as usize);
        let v = value(w, seq);
        seq += 1;
        if let Err(e) = client.put(&k, &v, None).await {
            panic!("writer {w}: put {k} failed: {e}");
        }
        last.insert(k, v);
        acked.fetch_add(1, Ordering::Relaxed);
    }
    last
}

/// `(leader, term)` as `id` reports them: its Status and its
/// `skiff_raft_term` metric, which must agree.
async fn view(cluster: &Cluster, id: NodeId) -> (u64, u64) {
    let s = cluster
        .status(id)
        .await
        .unwrap_or_else(|e| panic!("Status of member {id}: {e}"));
    let term = cluster
        .metric(id, "skiff_raft_term")
        .unwrap_or_else(|e| panic!("metrics of member {id}: {e}"));
    (s.leader, term as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_load_keep_the_leader() {
    let secs: u64 = std::env::var("SKIFF_SUSTAINED_SECS")
        .ok()
        .map(|s| s.parse().expect("SKIFF_SUSTAINED_SECS: whole seconds"))
        .unwrap_or(DEFAULT_SECS);
    let cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--snapshot-entries", SNAPSHOT_ENTRIES)
            .arg("--snapshot-catchup-entries", CATCHUP_ENTRIES),
    );
    let (leader, term) = cluster.wait_leader(LEADER_TIMEOUT).await;
    for id in cluster.ids() {
        assert_eq!(view(&cluster, id).await, (leader, term), "member {id}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let endpoints = cluster.endpoints();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            // Spread the writers over the members (followers forward).
            let mut mine = endpoints.clone();
            mine.rotate_left(w % endpoints.len());
            tokio::spawn(writer(w, mine, stop.clone(), acked.clone()))
        })
        .collect();

    // Sample every member's view of the leader and term through the run.
    let started = Instant::now();
    let run = Duration::from_secs(secs);
    let mut samples = 0;
    while started.elapsed() < run {
        tokio::time::sleep(SAMPLE_INTERVAL).await;
        for id in cluster.ids() {
            let seen = view(&cluster, id).await;
            assert_eq!(
                seen,
                (leader, term),
                "member {id}'s (leader, term) changed {:.1} s into the load, after {} writes",
                started.elapsed().as_secs_f64(),
                acked.load(Ordering::Relaxed)
            );
        }
        samples += 1;
        // A writer that failed ends the test at once.
        if let Some(w) = writers.iter().position(|t| t.is_finished()) {
            panic!("writer {w} stopped before the end of the load");
        }
    }
    stop.store(true, Ordering::Release);
    let mut expected = BTreeMap::new();
    for w in writers {
        expected.extend(w.await.expect("writer"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = acked.load(Ordering::Relaxed);
    eprintln!(
        "{writes} writes in {elapsed:.1} s: {:.0} writes/s ({WRITERS} writers, {VALUE_BYTES} B \
         values, {} keys written); {samples} samples of (leader, term), all ({leader}, {term})",
        writes as f64 / elapsed,
        expected.len()
    );

    // Every acknowledged write reads back, by a linearizable read on each
    // member.
    for id in cluster.ids() {
        let mut client = cluster.client(id).await;
        let r = client
            .get("s/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("range on member {id}: {e}"));
        let stored: BTreeMap<&str, &str> = r
            .kvs
            .iter()
            .map(|kv| (key_str(kv), value_str(kv)))
            .collect();
        assert_eq!(stored.len(), expected.len(), "keys on member {id}");
        for (k, v) in &expected {
            assert!(
                stored.get(k.as_str()) == Some(&v.as_str()),
                "member {id}: {k} is not its last acknowledged value"
            );
        }
    }

    // Every member snapshotted several times, and never failed to.
    let mut report = Vec::new();
    for id in cluster.ids() {
        let text = cluster
            .metrics(id)
            .unwrap_or_else(|e| panic!("metrics of member {id}: {e}"));
        let get = |name: &str| {
            metric(&text, name).unwrap_or_else(|| panic!("member {id} exports no {name}"))
        };
        let taken = get("skiff_snapshots_taken_total");
        let failed = get("skiff_snapshot_failures_total");
        let pass_max_us = metric_labelled(&text, "skiff_loop_pass_us", "quantile=\"1\"")
            .unwrap_or_else(|| panic!("member {id} exports no skiff_loop_pass_us max"));
        let pass_p999_us = metric_labelled(&text, "skiff_loop_pass_us", "quantile=\"0.999\"")
            .unwrap_or_else(|| panic!("member {id} exports no skiff_loop_pass_us p99.9"));
        eprintln!(
            "member {id}{}: {taken} snapshots taken, {failed} failed; longest loop pass \
             {pass_max_us} us (p99.9 {pass_p999_us} us)",
            if id == leader { " (leader)" } else { "" }
        );
        report.push((id, taken, failed));
    }
    for (id, taken, failed) in report {
        assert_eq!(failed, 0.0, "member {id}: snapshot failures");
        assert!(
            taken >= SNAPSHOTS_MIN,
            "member {id} took {taken} snapshots in {elapsed:.0} s of load ({writes} writes, \
             one per {SNAPSHOT_ENTRIES} entries)"
        );
    }
    for id in cluster.ids() {
        assert_eq!(
            view(&cluster, id).await,
            (leader, term),
            "member {id} at the end"
        );
    }
}
