//! `skiff bench` and `skiff status` against a tiny in-process fake etcd
//! (KV.Put, Maintenance.Status and Alarm only), so that the client side is tested
//! without a cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use skiff::bench::{run_load, status, BenchArgs, BenchError};
use skiff_kv::pb::etcdserverpb::kv_server::{Kv, KvServer};
use skiff_kv::pb::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
use skiff_kv::pb::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest, CompactionResponse,
    DefragmentRequest, DefragmentResponse, DeleteRangeRequest, DeleteRangeResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, SnapshotRequest, SnapshotResponse,
    StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

const FAKE_MEMBER_ID: u64 = 0x7e57;

/// Counts Puts; every `fail_every`-th one (if not 0) fails with Unavailable.
struct FakeEtcd {
    fail_every: u64,
    delay: Duration,
    value_size: usize,
    received: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl FakeEtcd {
    fn new(fail_every: u64) -> Arc<Self> {
        Arc::new(Self {
            fail_every,
            delay: Duration::from_micros(200),
            value_size: 64,
            received: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }
}

#[tonic::async_trait]
impl Kv for FakeEtcd {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let put = request.into_inner();
        assert!(
            put.key.starts_with(b"key-") && put.key.len() == 4 + 16,
            "{:?}",
            put.key
        );
        assert_eq!(put.value.len(), self.value_size);
        let n = self.received.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::time::sleep(self.delay).await;
        if n.checked_rem(self.fail_every) == Some(0) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable("fake: every Nth Put fails"));
        }
        self.ok.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(PutResponse {
            header: Some(ResponseHeader {
                member_id: FAKE_MEMBER_ID,
                revision: n as i64,
                ..ResponseHeader::default()
            }),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl Maintenance for FakeEtcd {
    type SnapshotStream = std::pin::Pin<
        Box<
            dyn tonic::codegen::tokio_stream::Stream<Item = Result<SnapshotResponse, Status>>
                + Send,
        >,
    >;

    /// A NOSPACE alarm on this member and one on another member.
    async fn alarm(&self, _: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Ok(Response::new(AlarmResponse {
            header: None,
            alarms: vec![
                AlarmMember {
                    member_id: FAKE_MEMBER_ID,
                    alarm: AlarmType::Nospace as i32,
                },
                AlarmMember {
                    member_id: FAKE_MEMBER_ID + 1,
                    alarm: AlarmType::Corrupt as i32,
                },
            ],
        }))
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn move_leader(
        &self,
        _: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            header: Some(ResponseHeader {
                member_id: FAKE_MEMBER_ID,
                raft_term: 4,
                ..ResponseHeader::default()
            }),
            version: "fake".to_string(),
            leader: FAKE_MEMBER_ID,
            raft_index: 12,
            raft_term: 4,
            raft_applied_index: 11,
            ..StatusResponse::default()
        }))
    }

    async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves the fake on 127.0.0.1:<free port>; returns "127.0.0.1:port".
async fn serve(fake: Arc<FakeEtcd>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = Server::builder()
        .add_service(KvServer::from_arc(Arc::clone(&fake)))
        .add_service(MaintenanceServer::from_arc(fake))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    addr.to_string()
}

/// An address where nothing listens.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr.to_string()
}

fn args(clients: usize, concurrency: usize, duration_s: f64) -> BenchArgs {
    BenchArgs {
        clients,
        concurrency,
        value_size: 64,
        key_space: 1000,
        duration: duration_s,
        warmup: 0.0,
        no_progress: true,
        ..BenchArgs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_counts_writes_and_errors_like_the_server() {
    let fake = FakeEtcd::new(50);
    let endpoint = serve(Arc::clone(&fake)).await;
    let (clients, concurrency) = (2, 4);
    let in_flight_max = (clients * concurrency) as u64;

    let report = run_load(
        &args(clients, concurrency, 1.0),
        std::slice::from_ref(&endpoint),
    )
    .await
    .expect("load runs");

    assert!(report.writes > 0, "{report:?}");
    // Without warmup every Put the server answered either completed in the
    // window (counted) or was in flight when it closed (at most one per task).
    let server_ok = fake.ok.load(Ordering::Relaxed);
    assert!(
        report.writes <= server_ok && server_ok <= report.writes + in_flight_max,
        "client writes {} vs server ok {server_ok}",
        report.writes
    );
    let server_failed = fake.failed.load(Ordering::Relaxed);
    let client_failed = report.error_total();
    assert!(
        client_failed <= server_failed && server_failed <= client_failed + in_flight_max,
        "client errors {client_failed} vs server failed {server_failed}"
    );
    assert!(client_failed > 0, "every 50th Put fails");
    assert_eq!(report.errors.keys().collect::<Vec<_>>(), ["Unavailable"]);

    assert_eq!(report.histogram.len(), report.writes);
    assert!(
        report.p50_us >= 200,
        "the fake sleeps 200 µs: {}",
        report.p50_us
    );
    assert!(report.p50_us <= report.p99_us);
    assert!(report.p99_us <= report.p999_us);
    assert!(report.p999_us <= report.max_us);
    assert_eq!(report.elapsed, Duration::from_secs(1));
    assert!((report.writes_per_s - report.writes as f64).abs() < 1.0);
    assert_eq!(report.endpoints, [format!("http://{endpoint}")]);
    assert!(report.result_line().starts_with("RESULT writes_per_s="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_fails_clearly_when_nothing_succeeds() {
    let fake = FakeEtcd::new(1);
    let endpoint = serve(fake).await;
    let err = run_load(&args(1, 2, 0.5), &[endpoint])
        .await
        .expect_err("every Put fails");
    assert!(matches!(err, BenchError::NoSuccess { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("Unavailable"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_names_an_unreachable_endpoint() {
    let good = serve(FakeEtcd::new(0)).await;
    let bad = closed_port().await;
    let err = run_load(&args(2, 1, 0.5), &[good, bad.clone()])
        .await
        .expect_err("second endpoint is closed");
    assert!(matches!(err, BenchError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&bad), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_members_and_unreachable_rows() {
    let good = serve(FakeEtcd::new(0)).await;
    let bad = closed_port().await;
    let rows = status(
        &[good.clone(), bad.clone()],
        &skiff::bench::Access::anonymous(skiff_kv::tls::ClientTls::plaintext()),
    )
    .await
    .expect("status");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].endpoint, format!("http://{good}"));
    let member = rows[0].reply.as_ref().expect("fake answers");
    assert_eq!(member.member_id, FAKE_MEMBER_ID);
    assert_eq!(member.leader_id, FAKE_MEMBER_ID);
    assert_eq!(
        (member.raft_term, member.raft_index, member.applied_index),
        (4, 12, 11)
    );
    assert!(member.is_leader());
    assert!(!member.is_learner);
    assert_eq!(member.alarms, ["NOSPACE"], "only this member's alarms");
    assert_eq!(rows[1].endpoint, format!("http://{bad}"));
    assert!(rows[1].reply.is_err(), "{:?}", rows[1]);

    let table = skiff::bench::format_status_table(&rows);
    assert!(
        table.ends_with(&format!(
            "members=2 reachable=1 leader={FAKE_MEMBER_ID:x}\n"
        )),
        "{table}"
    );
}
