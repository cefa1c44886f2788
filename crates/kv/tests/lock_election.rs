//! etcd's Lock and Election services on a 3-node cluster in one process
//! (real WAL files, real TCP, the gRPC API): mutual exclusion in queue
//! order, release by unlock and by lease revocation, and an election with
//! two campaigners, proclaim, observe and resign. Requests go to different
//! members, so followers' forwarding is on the path.

use std::time::Duration;

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::lease_client::LeaseClient;
use skiff_kv::pb::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest};
use skiff_kv::pb::v3electionpb::election_client::ElectionClient;
use skiff_kv::pb::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
use skiff_kv::pb::v3lockpb::lock_client::LockClient;
use skiff_kv::pb::v3lockpb::{LockRequest, UnlockRequest};
use skiff_node::config::NodeConfig;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(20);

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

async fn channel(endpoint: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

async fn lease(ch: &Channel, ttl: i64) -> i64 {
    LeaseClient::new(ch.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn revoke(ch: &Channel, id: i64) {
    LeaseClient::new(ch.clone())
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .unwrap();
}

/// Whether `fut` is still pending after `d`.
async fn still_waiting<F: std::future::Future>(
    fut: &mut std::pin::Pin<Box<F>>,
    d: Duration,
) -> bool {
    tokio::time::timeout(d, fut.as_mut()).await.is_err()
}

#[test]
fn lock_and_election_on_a_cluster() {
    let cluster = skiff_kv::server::embedded_cluster(3, &base()).unwrap();
    let leader = cluster.wait_leader(WAIT).expect("a leader");
    let eps = cluster.endpoints();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let on_leader = channel(&eps[leader as usize - 1]).await;
        let follower = (1..=3u64).find(|&id| id != leader).unwrap();
        let on_follower = channel(&eps[follower as usize - 1]).await;

        // ---- Lock: the second waits for the first; unlock hands over.
        let (l1, l2, l3) = (
            lease(&on_leader, 30).await,
            lease(&on_follower, 30).await,
            lease(&on_follower, 30).await,
        );
        let name = Bytes::from_static(b"jobs");
        let first = LockClient::new(on_leader.clone())
            .lock(LockRequest {
                name: name.clone(),
                lease: l1,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(first.key.starts_with(b"jobs/"), "{:?}", first.key);
        let mut c2 = LockClient::new(on_follower.clone());
        let mut second = Box::pin(async move {
            c2.lock(LockRequest {
                name: Bytes::from_static(b"jobs"),
                lease: l2,
            })
            .await
        });
        assert!(
            still_waiting(&mut second, Duration::from_millis(500)).await,
            "second got a held lock"
        );
        let mut c3 = LockClient::new(on_follower.clone());
        let mut third = Box::pin(async move {
            c3.lock(LockRequest {
                name: Bytes::from_static(b"jobs"),
                lease: l3,
            })
            .await
        });
        assert!(still_waiting(&mut third, Duration::from_millis(300)).await);
        LockClient::new(on_leader.clone())
            .unlock(UnlockRequest {
                key: first.key.clone(),
            })
            .await
            .unwrap();
        let got2 = tokio::time::timeout(WAIT, second.as_mut())
            .await
            .expect("second gets the lock")
            .unwrap()
            .into_inner();
        assert_ne!(got2.key, first.key);
        // The third queues behind the second: revoking the second's lease
        // (its key goes with it) hands the lock over.
        assert!(
            still_waiting(&mut third, Duration::from_millis(300)).await,
            "third got a held lock"
        );
        revoke(&on_leader, l2).await;
        let got3 = tokio::time::timeout(WAIT, third.as_mut())
            .await
            .expect("third gets the lock")
            .unwrap()
            .into_inner();
        assert_ne!(got3.key, got2.key);

        // ---- Election.
        let (e1, e2) = (lease(&on_leader, 30).await, lease(&on_follower, 30).await);
        let name = Bytes::from_static(b"primary");
        let mut el = ElectionClient::new(on_follower.clone());
        let none = el
            .leader(LeaderRequest { name: name.clone() })
            .await
            .unwrap_err();
        assert_eq!(none.code(), tonic::Code::NotFound, "{none}");
        let won = ElectionClient::new(on_leader.clone())
            .campaign(CampaignRequest {
                name: name.clone(),
                lease: e1,
                value: Bytes::from_static(b"a"),
            })
            .await
            .unwrap()
            .into_inner()
            .leader
            .expect("leader key");
        let mut observe = ElectionClient::new(on_follower.clone())
            .observe(LeaderRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        let seen = tokio::time::timeout(WAIT, observe.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(seen.kv.unwrap().value, Bytes::from_static(b"a"));
        let mut c = ElectionClient::new(on_follower.clone());
        let mut challenger = Box::pin(async move {
            c.campaign(CampaignRequest {
                name: Bytes::from_static(b"primary"),
                lease: e2,
                value: Bytes::from_static(b"b"),
            })
            .await
        });
        assert!(
            still_waiting(&mut challenger, Duration::from_millis(500)).await,
            "two leaders"
        );
        ElectionClient::new(on_follower.clone())
            .proclaim(ProclaimRequest {
                leader: Some(won.clone()),
                value: Bytes::from_static(b"a2"),
            })
            .await
            .unwrap();
        let seen = tokio::time::timeout(WAIT, observe.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(seen.kv.unwrap().value, Bytes::from_static(b"a2"));
        let now = el
            .leader(LeaderRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(now.kv.unwrap().value, Bytes::from_static(b"a2"));
        ElectionClient::new(on_leader.clone())
            .resign(ResignRequest {
                leader: Some(won.clone()),
            })
            .await
            .unwrap();
        let second = tokio::time::timeout(WAIT, challenger.as_mut())
            .await
            .expect("challenger wins")
            .unwrap()
            .into_inner()
            .leader
            .unwrap();
        assert_ne!(second.key, won.key);
        let seen = tokio::time::timeout(WAIT, observe.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(seen.kv.unwrap().value, Bytes::from_static(b"b"));
        // The old leader key no longer proclaims.
        let stale = ElectionClient::new(on_leader.clone())
            .proclaim(ProclaimRequest {
                leader: Some(won),
                value: Bytes::from_static(b"x"),
            })
            .await
            .unwrap_err();
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale}");
    });
    drop(rt);
    cluster.shutdown().unwrap();
}
