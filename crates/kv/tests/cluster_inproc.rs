//! A 3-node cluster in one process (real WAL files, real TCP, the gRPC API):
//! writes through any member, linearizable reads everywhere, restart from
//! the WAL, catch-up by snapshot. The same on separate processes (SIGKILL,
//! etcdctl) lives in the `skiff-tests` crate.

use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::kv_client::KvClient;
use skiff_kv::pb::etcdserverpb::{PutRequest, RangeRequest};
use skiff_node::config::NodeConfig;
use tonic::transport::Channel;

fn base() -> NodeConfig {
    NodeConfig {
        tick_interval_ms: 10,
        election_ticks_min: 20,
        election_ticks_max: 40,
        heartbeat_ticks: 3,
        wal_segment_size: 1 << 20,
        ..NodeConfig::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(endpoint: &str) -> KvClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    KvClient::new(ch)
}

async fn put(c: &mut KvClient<Channel>, k: &str, v: &str) -> i64 {
    let r = c
        .put(PutRequest {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            ..PutRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.header.unwrap().revision
}

async fn get(c: &mut KvClient<Channel>, k: &str, serializable: bool) -> Option<String> {
    let r = c
        .range(RangeRequest {
            key: Bytes::copy_from_slice(k.as_bytes()),
            serializable,
            ..RangeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.kvs
        .first()
        .map(|kv| String::from_utf8(kv.value.to_vec()).unwrap())
}

#[test]
fn writes_anywhere_reads_everywhere_and_restart() {
    let mut cluster = skiff_kv::server::embedded_cluster(3, &base()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let eps = cluster.endpoints();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rt = rt();
    rt.block_on(async {
        let mut on_follower = client(&eps[follower as usize - 1]).await;
        let mut on_leader = client(&eps[leader as usize - 1]).await;
        // A write sent to a follower is forwarded to the leader.
        let r1 = put(&mut on_follower, "a", "1").await;
        let r2 = put(&mut on_leader, "a", "2").await;
        assert_eq!(r2, r1 + 1, "one revision per put");
        // Linearizable read after write on every member.
        for ep in &eps {
            let mut c = client(ep).await;
            assert_eq!(get(&mut c, "a", false).await.as_deref(), Some("2"), "{ep}");
        }
    });
    // A node restarted from its WAL serves what it had.
    cluster.restart(follower).unwrap();
    cluster
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let eps = cluster.endpoints();
    rt.block_on(async {
        let mut c = client(&eps[follower as usize - 1]).await;
        assert_eq!(get(&mut c, "a", false).await.as_deref(), Some("2"));
    });
    cluster.shutdown().unwrap();
}

#[test]
fn lagging_follower_catches_up_by_snapshot() {
    let cfg = NodeConfig {
        snapshot_entries: 50,
        ..base()
    };
    let mut cluster = skiff_kv::server::embedded_cluster(3, &cfg).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let lagging = (1..=3).find(|&id| id != leader).unwrap();
    cluster.stop(lagging).unwrap();
    let eps = cluster.endpoints();
    let rt = rt();
    let leader_ep = eps
        .iter()
        .find(|e| {
            e.ends_with(
                &cluster
                    .node(leader)
                    .unwrap()
                    .handle()
                    .config()
                    .listen_client
                    .port()
                    .to_string(),
            )
        })
        .unwrap()
        .clone();
    rt.block_on(async {
        let mut c = client(&leader_ep).await;
        for i in 0..400 {
            put(&mut c, &format!("k{i:04}"), &format!("v{i}")).await;
        }
    });
    cluster.restart(lagging).unwrap();
    let node = cluster.node(lagging).unwrap();
    let target = cluster.node(leader).unwrap().handle().status().commit;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.handle().status().applied < target {
        assert!(
            Instant::now() < deadline,
            "node {lagging} stuck at {:?}, leader commit {target}",
            node.handle().status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ep = format!("http://{}", node.handle().config().listen_client);
    rt.block_on(async {
        let mut c = client(&ep).await;
        for i in [0, 199, 399] {
            assert_eq!(
                get(&mut c, &format!("k{i:04}"), true).await,
                Some(format!("v{i}")),
                "key {i} on the caught-up node"
            );
        }
    });
    cluster.shutdown().unwrap();
}

/// A follower's acknowledgement leaves as soon as its WAL says durable, not
/// with the next thing Raft happens to emit. Heartbeats here come every
/// 1.9 s: were acknowledgements held until the follower's next action (the
/// next heartbeat it answers), a put would take about a second on average;
/// released on durability it takes milliseconds. The bound leaves a wide
/// margin for a busy machine on both sides.
#[test]
fn acknowledgements_do_not_wait_for_a_heartbeat() {
    let cfg = NodeConfig {
        tick_interval_ms: 10,
        election_ticks_min: 200,
        election_ticks_max: 400,
        heartbeat_ticks: 190,
        ..base()
    };
    let cluster = skiff_kv::server::embedded_cluster(3, &cfg).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(60))
        .expect("a leader");
    let ep = format!(
        "http://{}",
        cluster
            .node(leader)
            .unwrap()
            .handle()
            .config()
            .listen_client
    );
    let rt = rt();
    let mut took: Vec<Duration> = rt.block_on(async {
        let mut c = client(&ep).await;
        let mut took = Vec::new();
        for i in 0..21 {
            let t = Instant::now();
            put(&mut c, &format!("k{i}"), "v").await;
            took.push(t.elapsed());
        }
        took
    });
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(400),
        "median put {median:?} with heartbeats every 1.9 s: {took:?}"
    );
    cluster.shutdown().unwrap();
}
