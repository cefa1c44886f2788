//! A disk that stops answering, on real processes: the leader's WAL fsyncs
//! hang (its data directory is on a lying disk, `skiff_tests::lying_disk`,
//! that holds them). The leader's loop goes on (it answers its metrics, and
//! says what it waits for), hands leadership to a member whose disk
//! answers, and the cluster keeps taking writes; once the disk answers
//! again, the old leader catches up and every acknowledged write is on
//! every member. Skipped, with the reason, where this process may not mount
//! FUSE.

use std::time::{Duration, Instant};

use skiff_tests::lying_disk::{self, is_wal_segment};
use skiff_tests::{poll_until, Cluster, ClusterOptions, NodeId};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The hand-over: 4 longest election timeouts of a stalled write (2.4 s
/// at the default ticks), then the transfer; generous for a busy machine.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// `skiff_{name} V` in `text`.
fn metric(text: &str, name: &str) -> Option<u64> {
    let prefix = format!("skiff_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_stalls_hands_over_and_catches_up_after() {
    if let Err(why) = lying_disk::available() {
        println!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions {
        lying_disks: true,
        ..ClusterOptions::default()
    });
    let (leader, term) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut client = skiff_tests::connect(&cluster.endpoints()).await;
    let mut acked: Vec<String> = Vec::new();
    for i in 0..50 {
        let key = format!("before/{i:03}");
        client
            .put(&key, "v", None)
            .await
            .expect("put before the stall");
        acked.push(key);
    }

    cluster
        .disk(leader)
        .expect("a lying disk")
        .stall_fsyncs(is_wal_segment);
    let stalled_at = Instant::now();
    // Writes keep coming (through every member); those the stalled leader
    // takes cannot commit until it hands over (they time out at the
    // client: indeterminate, not counted).
    let writer = {
        let endpoints = cluster.endpoints();
        tokio::spawn(async move {
            let mut client = skiff_tests::connect(&endpoints).await;
            let mut acked = Vec::new();
            let until = Instant::now() + HAND_OVER_TIMEOUT;
            let mut i = 0;
            while Instant::now() < until && acked.len() < 50 {
                let key = format!("during/{i:04}");
                i += 1;
                if client.put(&key, "v", None).await.is_ok() {
                    acked.push(key);
                }
            }
            acked
        })
    };
    let cluster_ref = &cluster;
    let new_leader: NodeId = poll_until(
        &format!("a member other than {leader} (its disk stalled) to lead"),
        HAND_OVER_TIMEOUT,
        || async move {
            let others = cluster_ref.ids().into_iter().filter(|&id| id != leader);
            for id in others {
                let s = cluster_ref.status(id).await.ok()?;
                if s.leader != 0 && s.leader != leader && s.raft_term > term {
                    return Some(s.leader);
                }
            }
            None
        },
    )
    .await;
    eprintln!(
        "member {new_leader} leads {:.2} s after member {leader}'s disk stalled",
        stalled_at.elapsed().as_secs_f64()
    );
    let during = writer.await.expect("the writer task");
    assert!(
        during.len() >= 50,
        "only {} writes acknowledged while member {leader}'s disk stalled",
        during.len()
    );
    acked.extend(during);

    // The stalled member's loop still answers, and says it waits.
    let text = cluster
        .metrics(leader)
        .expect("metrics of the stalled member");
    assert_eq!(
        metric(&text, "is_leader"),
        Some(0),
        "the stalled member still leads"
    );
    assert!(
        cluster.log(leader).contains("handing leadership over"),
        "member {leader} did not say why it handed leadership over"
    );
    assert!(
        cluster.exited().is_empty(),
        "a member exited while a disk stalled"
    );

    let held = cluster.disk(leader).expect("a lying disk").end_stall();
    eprintln!(
        "the stall held {held} fsyncs for {:.2} s",
        stalled_at.elapsed().as_secs_f64()
    );
    for i in 0..20 {
        let key = format!("after/{i:03}");
        client
            .put(&key, "v", None)
            .await
            .expect("put after the stall");
        acked.push(key);
    }
    let last = acked.last().expect("writes").clone();
    let cluster_ref = &cluster;
    poll_until(
        &format!("member {leader} to catch up after its disk answers again"),
        CATCH_UP_TIMEOUT,
        || {
            let last = last.clone();
            async move {
                let keys = cluster_ref.keys_with_prefix(leader, "after/").await.ok()?;
                keys.contains(&last).then_some(())
            }
        },
    )
    .await;
    for id in cluster.ids() {
        for prefix in ["before/", "during/", "after/"] {
            let keys = cluster
                .keys_with_prefix(id, prefix)
                .await
                .unwrap_or_else(|e| panic!("keys of member {id}: {e}"));
            let missing: Vec<&String> = acked
                .iter()
                .filter(|k| k.starts_with(prefix) && !keys.contains(*k))
                .collect();
            assert!(
                missing.is_empty(),
                "member {id} lacks acknowledged writes: {missing:?}"
            );
        }
    }
    assert!(cluster.exited().is_empty(), "a member exited");
    eprintln!(
        "a_leader_whose_disk_stalls_hands_over_and_catches_up_after: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
