//! Automatic compaction on real `skiff serve` processes (etcd's
//! `--auto-compaction-mode` / `--auto-compaction-retention`): the history
//! is compacted without any client asking, on every member, keeping what
//! the retention says.

use std::time::{Duration, Instant};

use skiff_tests::client::GetOptions;
use skiff_tests::{poll_until, Cluster, ClusterOptions};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const COMPACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Every member's compaction revision once all agree on one above
/// `above`.
async fn compacted_everywhere(cluster: &Cluster, above: i64) -> i64 {
    poll_until(
        &format!("every member to compact above revision {above}"),
        COMPACTION_TIMEOUT,
        || async {
            let mut seen = None;
            for id in cluster.ids() {
                let h = cluster.hash_kv(id, 0).await.ok()?;
                if h.compact_revision <= above || seen.is_some_and(|s| s != h.compact_revision) {
                    return None;
                }
                seen = Some(h.compact_revision);
            }
            seen
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_mode_keeps_the_last_n_revisions() {
    let cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--auto-compaction-mode", "revision")
            .arg("--auto-compaction-retention", "5")
            .arg("--auto-compaction-check-interval-ms", "200"),
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(1).await;
    let mut revision = 0;
    for i in 0..30 {
        revision = c
            .put("k", format!("v{i}"), None)
            .await
            .expect("put")
            .header
            .expect("header")
            .revision;
    }
    let compacted = compacted_everywhere(&cluster, 0).await;
    // Nothing is written any more: it settles at revision - 5.
    let settled = poll_until(
        "the compaction to reach revision - 5",
        COMPACTION_TIMEOUT,
        || async {
            let h = cluster.hash_kv(1, 0).await.ok()?;
            (h.compact_revision == revision - 5).then_some(h.compact_revision)
        },
    )
    .await;
    assert!(compacted <= settled);
    let kept = c
        .get("k", Some(GetOptions::new().with_revision(revision - 5)))
        .await
        .expect("the revision at the retention's edge is kept");
    assert_eq!(&kept.kvs[0].value[..], b"v24");
    let gone = c
        .get("k", Some(GetOptions::new().with_revision(revision - 6)))
        .await
        .expect_err("a revision past the retention is compacted");
    assert!(gone.to_string().contains("compacted"), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_mode_keeps_the_retention_of_time_and_goes_on() {
    let retention = Duration::from_secs(2);
    let cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--auto-compaction-mode", "periodic")
            .arg("--auto-compaction-retention", "2s"),
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(1).await;
    // Writes for a while, remembering when each revision was made.
    let mut made = Vec::new();
    let started = Instant::now();
    let mut first = None;
    while started.elapsed() < COMPACTION_TIMEOUT {
        let r = c
            .put("k", "v", None)
            .await
            .expect("put")
            .header
            .expect("header")
            .revision;
        made.push((Instant::now(), r));
        let h = cluster.hash_kv(1, 0).await.expect("hash");
        if h.compact_revision > 0 {
            // A compaction keeps every revision of the last `retention`.
            let now = Instant::now();
            let recent = made
                .iter()
                .find(|(at, _)| now.duration_since(*at) < retention)
                .map(|&(_, r)| r)
                .unwrap_or(r);
            assert!(
                h.compact_revision <= recent,
                "compacted to {} but revision {recent} is younger than the retention",
                h.compact_revision
            );
            match first {
                None => first = Some(h.compact_revision),
                // A second compaction: it goes on by itself.
                Some(f) if h.compact_revision > f => break,
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = first.expect("no automatic compaction within the timeout");
    let last = compacted_everywhere(&cluster, first).await;
    assert!(last > first);
}
