//! A follower that was down while the others snapshotted and compacted
//! their logs past where it stopped catches up by fetching a snapshot
//! (streamed over the snapshot port), then the log after it.

use std::collections::BTreeMap;
use std::time::Duration;

use skiff_tests::client::{key_str, value_str, Client, GetOptions};
use skiff_tests::{metric, poll_until, Cluster, ClusterOptions, NodeId};

/// Applied entries between two snapshots: small, so that a few thousand
/// writes compact the log many times over.
const SNAPSHOT_ENTRIES: u64 = 200;
/// Entries the log keeps behind a snapshot (`--snapshot-catchup-entries`):
/// far fewer than the writes made while the follower is down, so that the
/// leader's log no longer reaches back to it (with the default, 5,000, it
/// would catch up from the log).
const CATCHUP_ENTRIES: u64 = 100;
/// Near the smallest segment the WAL accepts with its default
/// snapshot-metadata bound: the writes below fill more than one, so
/// compaction deletes segments too, not only the Raft log in memory.
const WAL_SEGMENT_BYTES: u64 = 3 << 20;
const KEYS: usize = 3_000;
const VALUE_BYTES: usize = 1024;
const WRITERS: usize = 8;
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(90);

fn value(key: usize, round: u32) -> String {
    let head = format!("round{round}-key{key}-");
    let mut v = head.clone();
    while v.len() < VALUE_BYTES {
        v.push_str(&head);
    }
    v.truncate(VALUE_BYTES);
    v
}

/// Puts keys `0..KEYS` (every `step`-th from `first`) with `round`'s values.
async fn write_keys(client: Client, first: usize, step: usize, round: u32) {
    let mut client = client;
    for k in (first..KEYS).step_by(step) {
        let key = format!("k/{k:05}");
        client
            .put(key.clone(), value(k, round), None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
}

async fn read_all(cluster: &Cluster, id: NodeId, serializable: bool) -> BTreeMap<String, String> {
    let mut client = cluster.client(id).await;
    let mut options = GetOptions::new().with_prefix();
    if serializable {
        options = options.with_serializable();
    }
    let r = client
        .get("k/", Some(options))
        .await
        .unwrap_or_else(|e| panic!("range on member {id}: {e}"));
    r.kvs
        .iter()
        .map(|kv| (key_str(kv).to_string(), value_str(kv).to_string()))
        .collect()
}

/// The `index=` values of `what` lines ("snapshot taken", ...) in `log`.
fn logged_indexes(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let at = l.find("index=")? + "index=".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(
        ClusterOptions {
            wal_segment_bytes: WAL_SEGMENT_BYTES,
            ..ClusterOptions::default()
        }
        .arg("--snapshot-entries", SNAPSHOT_ENTRIES)
        .arg("--snapshot-catchup-entries", CATCHUP_ENTRIES),
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let lagging = cluster.ids().into_iter().find(|&id| id != leader).unwrap();

    // Round 1 reaches everyone; then the follower stops cleanly.
    write_keys(cluster.client(leader).await, 0, 10, 1).await;
    let commit = cluster.status(leader).await.unwrap().raft_index;
    cluster
        .wait_applied(lagging, commit, CATCH_UP_TIMEOUT)
        .await;
    let stopped_at = cluster.status(lagging).await.unwrap().raft_applied_index;
    let status = cluster.terminate(lagging);
    assert!(
        status.success(),
        "member {lagging} exited with {status} on SIGTERM"
    );
    assert!(
        cluster.log(lagging).contains("stopped"),
        "member {lagging} did not log a clean stop"
    );

    // Round 2: every key, through the leader and the other follower, from
    // several writers at once.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let via = cluster
            .running()
            .into_iter()
            .nth(w % 2)
            .expect("two members run");
        tasks.push(tokio::spawn(write_keys(
            cluster.client(via).await,
            w,
            WRITERS,
            2,
        )));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let target = cluster.status(leader).await.unwrap().raft_index;
    let snapshots = logged_indexes(&cluster.log(leader), "snapshot taken");
    assert!(
        snapshots
            .iter()
            .any(|&i| i > stopped_at + SNAPSHOT_ENTRIES + CATCHUP_ENTRIES),
        "leader {leader} took no snapshot well past index {stopped_at}: {snapshots:?}"
    );

    // The follower comes back, fetches a snapshot and catches up.
    cluster.restart(lagging);
    cluster
        .wait_applied(lagging, target, CATCH_UP_TIMEOUT)
        .await;
    let log = cluster.log_since_start(lagging);
    let installed = logged_indexes(&log, "snapshot installed");
    assert!(
        installed.iter().any(|&i| i > stopped_at),
        "member {lagging} installed no snapshot past index {stopped_at} \
         (installed: {installed:?}); its log since restart:\n{log}"
    );

    // Its own state (serializable reads) holds the latest value of every key.
    let stored = read_all(&cluster, lagging, true).await;
    assert_eq!(stored.len(), KEYS);
    for (k, v) in (0..KEYS).map(|k| (format!("k/{k:05}"), value(k, 2))) {
        assert_eq!(stored.get(&k), Some(&v), "member {lagging}: {k}");
    }
    assert!(stored == read_all(&cluster, leader, false).await);

    // The metrics endpoint agrees.
    let text = cluster.metrics(lagging).expect("metrics");
    let applied = metric(&text, "skiff_applied_index").expect("skiff_applied_index");
    assert!(applied >= target as f64, "applied {applied} < {target}");

    // And it still takes part: a new write reaches it.
    let mut client = cluster.client(lagging).await;
    client.put("k/after", "yes", None).await.expect("put");
    let r = poll_until(
        "the new key on the caught-up member",
        CATCH_UP_TIMEOUT,
        || {
            let c = &cluster;
            async move {
                let mut client = c.client(lagging).await;
                let r = client
                    .get("k/after", Some(GetOptions::new().with_serializable()))
                    .await
                    .ok()?;
                (!r.kvs.is_empty()).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(r.kvs[0].value, "yes");
}

/// A member restarted before its newest snapshot was told to the core
/// (the loop tells a snapshot only once it is `--snapshot-catchup-entries`
/// behind what is applied) replays its log from the snapshot the WAL
/// records and takes a new one; the untold file of its last life is
/// removed at start, so restarts do not pile snapshot files up. (Found by
/// the fault soak on lying disks: 14 files of 10 MB on one member after
/// half an hour of kills.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_before_a_snapshot_is_told_leave_no_files_behind() {
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--snapshot-entries", 50)
            .arg("--snapshot-catchup-entries", 1_000_000),
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let member = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let snap_dir = cluster.data_dir(member).join("snap");
    let files = || {
        std::fs::read_dir(&snap_dir)
            .expect("the snapshot directory")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            .count()
    };
    let lives = 4;
    for life in 0..lives {
        let mut client = cluster.client(leader).await;
        for k in 0..60 {
            client
                .put(format!("life{life}/k{k}"), "v", None)
                .await
                .expect("put");
        }
        let taken = poll_until("a snapshot in this life", CATCH_UP_TIMEOUT, || async {
            let n = cluster
                .log_since_start(member)
                .matches("snapshot taken")
                .count();
            (n > 0).then_some(n)
        })
        .await;
        if life + 1 == lives {
            let n = files();
            assert!(
                n <= taken,
                "member {member} holds {n} snapshot files after {lives} starts; this life \
                 took {taken}"
            );
            assert!(
                cluster
                    .log_since_start(member)
                    .contains("removed snapshot files newer than the one the WAL records"),
                "the start did not remove the last life's file"
            );
        } else {
            cluster.kill(member);
            cluster.restart(member);
        }
    }
}
