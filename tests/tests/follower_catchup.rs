//! A follower SIGKILLed and restarted catches up the way its lag calls for
//! (`--snapshot-catchup-entries`): from the leader's log when it is within
//! the entries the log keeps behind a snapshot, even though the leader took
//! a snapshot past it meanwhile; from a snapshot when the leader compacted
//! its log past it. After each catch-up every member hashes the same store
//! (`Maintenance.HashKV` at one revision) and the follower's own state
//! (serializable reads) holds the latest value of every key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use skiff_tests::client::{key_str, value_str, GetOptions};
use skiff_tests::{connect, Cluster, ClusterOptions, NodeId};

/// Applied entries between two snapshots.
const SNAPSHOT_ENTRIES: u64 = 2_000;
/// Entries the log keeps behind a snapshot.
const CATCHUP_ENTRIES: u64 = 3_000;
/// Written before the follower's first crash: the leader's next snapshot
/// (at `SNAPSHOT_ENTRIES`) falls into the writes made while it is down.
const WRITES_BEFORE: usize = 1_500;
/// Written while the follower is down the first time: well within
/// `CATCHUP_ENTRIES`.
const WRITES_WITHIN_MARGIN: usize = 1_000;
/// Written while it is down the second time: past `CATCHUP_ENTRIES` plus a
/// snapshot interval, so the leader's log no longer reaches back to it.
const WRITES_PAST_MARGIN: usize = 8_000;
const KEYS: usize = 512;
const VALUE_BYTES: usize = 100;
const WRITERS: usize = 8;
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

// Writer w's keys are those of the writes w makes.
const _: () = assert!(KEYS % WRITERS == 0);
// A snapshot the leader takes while the follower is down is at most the
// writes made meanwhile ahead of it: within the margin, with room to spare.
const _: () = assert!(2 * WRITES_WITHIN_MARGIN as u64 <= CATCHUP_ENTRIES);
const _: () = assert!(((WRITES_BEFORE + WRITES_WITHIN_MARGIN) as u64) > SNAPSHOT_ENTRIES);
const _: () = assert!(WRITES_PAST_MARGIN as u64 > CATCHUP_ENTRIES + 2 * SNAPSHOT_ENTRIES);

fn key(k: usize) -> String {
    format!("k/{k:05}")
}

fn value(round: &str, seq: usize) -> String {
    let head = format!("{round}-{seq}-");
    head.repeat(VALUE_BYTES / head.len() + 1)[..VALUE_BYTES].to_string()
}

/// Puts `count` entries through the running members from `WRITERS`
/// concurrent writers; writer `w` owns the keys `k ≡ w (mod WRITERS)` and
/// writes them one at a time, so the last value it wrote to a key is the
/// key's value. Every put must succeed. Returns the values written.
async fn write(cluster: &Cluster, count: usize, round: &str) -> BTreeMap<String, String> {
    let endpoints: Vec<String> = cluster
        .running()
        .into_iter()
        .map(|id| cluster.endpoint(id))
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        // Spread the writers over the running members.
        let mut mine = endpoints.clone();
        mine.rotate_left(w % endpoints.len());
        let round = round.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&mine).await;
            let mut written = BTreeMap::new();
            for seq in (w..count).step_by(WRITERS) {
                let (k, v) = (key(seq % KEYS), value(&round, seq));
                client
                    .put(&k, &v, None)
                    .await
                    .unwrap_or_else(|e| panic!("put {k} ({round} #{seq}): {e}"));
                written.insert(k, v);
            }
            written
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{round}: {count} puts in {secs:.1} s ({:.0}/s)",
        count as f64 / secs
    );
    all
}

/// Waits until every running member applied the leader's commit index;
/// then checks that they all hash the same store at the leader's current
/// revision. Returns that revision.
async fn assert_same_store(cluster: &Cluster, what: &str) -> i64 {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut client = cluster.client(leader).await;
    let r = client
        .get(
            "k/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count on the leader");
    let revision = r.header.expect("header").revision;
    let commit = cluster.status(leader).await.expect("status").raft_index;
    for id in cluster.running() {
        cluster.wait_applied(id, commit, CATCH_UP_TIMEOUT).await;
    }
    let mut hashes = Vec::new();
    for id in cluster.running() {
        let h = cluster
            .hash_kv(id, revision)
            .await
            .unwrap_or_else(|e| panic!("HashKV at {revision} on member {id}: {e}"));
        assert_eq!(h.hash_revision, revision, "member {id}'s hash revision");
        hashes.push((id, h.hash, h.compact_revision));
    }
    eprintln!("{what}: HashKV at revision {revision}: {hashes:x?}");
    assert!(
        hashes
            .windows(2)
            .all(|w| (w[0].1, w[0].2) == (w[1].1, w[1].2)),
        "{what}: members hash differently at revision {revision}: (id, hash, compact) {hashes:?}"
    );
    revision
}

/// `id`'s own state (a serializable read there) holds exactly `expected`.
async fn assert_serves(cluster: &Cluster, id: NodeId, expected: &BTreeMap<String, String>) {
    let mut client = cluster.client(id).await;
    let r = client
        .get(
            "k/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap_or_else(|e| panic!("serializable range on member {id}: {e}"));
    let stored: BTreeMap<&str, &str> = r
        .kvs
        .iter()
        .map(|kv| (key_str(kv), value_str(kv)))
        .collect();
    assert_eq!(stored.len(), expected.len(), "keys on member {id}");
    for (k, v) in expected {
        assert!(
            stored.get(k.as_str()) == Some(&v.as_str()),
            "member {id}: {k} is {:?}, wrote {v:?}",
            stored.get(k.as_str())
        );
    }
}

fn counter(cluster: &Cluster, id: NodeId, name: &str) -> f64 {
    cluster
        .metric(id, name)
        .unwrap_or_else(|e| panic!("metrics of member {id}: {e}"))
}

/// Restarts `id` and waits until it applied the leader's commit index.
async fn restart_and_catch_up(cluster: &mut Cluster, id: NodeId) -> Duration {
    let started = Instant::now();
    cluster.restart(id);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let commit = cluster.status(leader).await.expect("status").raft_index;
    cluster.wait_applied(id, commit, CATCH_UP_TIMEOUT).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_catches_up_from_the_log_then_from_a_snapshot() {
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--snapshot-entries", SNAPSHOT_ENTRIES)
            .arg("--snapshot-catchup-entries", CATCHUP_ENTRIES),
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut expected = write(&cluster, WRITES_BEFORE, "before").await;
    assert_same_store(&cluster, "before the first crash").await;

    // Down for fewer entries than the log keeps behind a snapshot.
    let mut failing_over = connect(&[cluster.endpoint(follower), cluster.endpoint(leader)]).await;
    assert_eq!(failing_over.current_endpoint(), cluster.endpoint(follower));
    cluster.kill(follower);
    // The harness's client: a read on the dead member fails over to the
    // next endpoint; so does the next write.
    let r = failing_over
        .get(
            "k/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("a read after the endpoint died");
    assert_eq!(r.count, KEYS.min(WRITES_BEFORE) as i64);
    assert_eq!(failing_over.current_endpoint(), cluster.endpoint(leader));
    failing_over.put("k/extra", "x", None).await.expect("put");
    expected.insert("k/extra".into(), "x".into());
    expected.extend(write(&cluster, WRITES_WITHIN_MARGIN, "within-margin").await);
    let taken = counter(&cluster, leader, "skiff_snapshots_taken_total");
    assert!(
        taken >= 1.0,
        "leader {leader} took no snapshot after {} writes",
        WRITES_BEFORE + WRITES_WITHIN_MARGIN
    );
    let took = restart_and_catch_up(&mut cluster, follower).await;
    let installed = counter(&cluster, follower, "skiff_snapshots_installed_total");
    eprintln!(
        "member {follower} caught up in {:.1} s, snapshots installed: {installed}",
        took.as_secs_f64()
    );
    assert_eq!(
        installed, 0.0,
        "member {follower} was within the catch-up margin but installed a snapshot"
    );
    assert_same_store(&cluster, "after catching up from the log").await;
    assert_serves(&cluster, follower, &expected).await;

    // Down for more entries than the log keeps: only a snapshot will do.
    cluster.kill(follower);
    expected.extend(write(&cluster, WRITES_PAST_MARGIN, "past-margin").await);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let taken_now = counter(&cluster, leader, "skiff_snapshots_taken_total");
    assert!(
        taken_now >= taken + 2.0,
        "leader {leader} took {taken_now} snapshots in all, {taken} before the second crash"
    );
    let took = restart_and_catch_up(&mut cluster, follower).await;
    let installed = counter(&cluster, follower, "skiff_snapshots_installed_total");
    eprintln!(
        "member {follower} caught up in {:.1} s, snapshots installed: {installed}",
        took.as_secs_f64()
    );
    assert!(
        installed >= 1.0,
        "member {follower} was {WRITES_PAST_MARGIN} writes behind (catch-up margin \
         {CATCHUP_ENTRIES}) but installed no snapshot"
    );
    assert_eq!(
        counter(&cluster, follower, "skiff_snapshot_failures_total"),
        0.0,
        "snapshot failures on member {follower}"
    );
    assert_same_store(&cluster, "after catching up from a snapshot").await;
    assert_serves(&cluster, follower, &expected).await;
}
