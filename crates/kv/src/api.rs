//! The etcd v3 gRPC API on top of a node running the [`KvMachine`]: KV
//! (Range, Put, DeleteRange, Txn, Compact), Watch, Lease, Lock, Election,
//! Cluster, Maintenance and Auth.
//!
//! With auth on, every request is checked against its caller's permissions
//! (module `auth`): here before it is proposed or served, and a client's
//! writes again at apply.
//!
//! Writes are proposed through Raft: on the leader directly, on a follower
//! forwarded to the leader over the peer connection (Raft `Propose`), and
//! answered when this member applies them. Reads are linearizable (ReadIndex, served on any member after it
//! applied through the read index) unless the request asks for
//! `serializable`, which is served from this member's state at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_node::PeerAddr;
use skiff_node::{NodeHandle, RequestError};
use tonic::{Request, Response, Status};

use crate::lease::Lessor;
use crate::machine::{
    AuthView, KvCommand, KvMachine, KvQuery, KvQueryResponse, KvResponse, Quota, StoreStatus,
};
use crate::pb::etcdserverpb::auth_server::AuthServer;
use crate::pb::etcdserverpb::cluster_server::ClusterServer;
use crate::pb::etcdserverpb::kv_server::{Kv, KvServer};
use crate::pb::etcdserverpb::lease_server::LeaseServer;
use crate::pb::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::watch_server::WatchServer;
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use crate::store::auth::PermKind;
use crate::store::{validate_request, write_cost, KvError};
use crate::tls::{ClientTls, MemberTls};
use crate::watch::Hub;
pub use auth::AuthOptions;

mod alarm;
pub mod auth;
pub mod backup;
mod cluster;
mod lease;
mod lock;
mod maintenance;
mod watch;

/// The version `Maintenance.Status` reports (the etcd API level served).
pub const API_VERSION: &str = "3.5.0";
/// Largest gRPC message accepted (etcd's default request bound + framing).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 2 << 20;
/// How long a proposal refused for a moment waits before it is sent again.
pub const PROPOSE_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Counts a proposal in flight (see [`ServeParts::inflight`]) while it
/// lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How often a `physical` Compact looks whether the removal is done.
pub const COMPACT_POLL: Duration = Duration::from_millis(10);

/// What the API serves from besides the node: the member's services and
/// shared state kept beside its state machine.
pub struct ServeParts {
    pub hub: Hub,
    pub lessor: Lessor,
    pub quota: Arc<Quota>,
    pub auth_view: Arc<AuthView>,
    pub auth_options: AuthOptions,
    /// Client proposals in flight on this member: a stopping member waits
    /// for them (bounded) before its node stops.
    pub inflight: Arc<AtomicUsize>,
    /// Told when the server stopped (its connections closed after `stop`).
    pub served: std::sync::mpsc::Sender<()>,
}

/// Starts the gRPC server on `addr` (TLS per `tls`); returns the bound
/// address. It stops when `stop` fires.
pub async fn serve(
    node: NodeHandle<KvMachine>,
    parts: ServeParts,
    addr: SocketAddr,
    tls: MemberTls,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<SocketAddr, String> {
    let ServeParts {
        hub,
        lessor,
        quota,
        auth_view,
        auth_options,
        inflight,
        served,
    } = parts;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let client_cert_auth = node.config().client_cert_auth && tls.server.is_some();
    let api = Api {
        auth: Arc::new(auth::AuthGate::new(auth_view, auth_options)),
        inflight,
        client_cert_auth,
        node,
        hub,
        next_stream: Arc::new(AtomicU64::new(0)),
        lessor,
        forwarders: Arc::default(),
        quota,
        forward_tls: tls.client,
    };
    tokio::spawn(cluster::publish_client_urls(api.clone()));
    tokio::spawn(alarm::watch_disk_space(api.clone()));
    let api = std::sync::Arc::new(api);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(config) = tls.server {
        builder = builder.tls_config(config).map_err(|e| e.to_string())?;
    }
    let server = builder
        .add_service(
            KvServer::from_arc(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            WatchServer::from_arc(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(LeaseServer::from_arc(api.clone()))
        .add_service(LockServer::from_arc(api.clone()))
        .add_service(ElectionServer::from_arc(api.clone()))
        .add_service(ClusterServer::from_arc(api.clone()))
        .add_service(AuthServer::from_arc(api.clone()))
        .add_service(MaintenanceServer::from_arc(api))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        });
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
        let _ = served.send(());
    });
    Ok(local)
}

#[derive(Clone)]
struct Api {
    node: NodeHandle<KvMachine>,
    /// The member's watch hub (its dispatcher runs beside the node).
    hub: Hub,
    /// Ids of watch streams.
    next_stream: Arc<AtomicU64>,
    /// Lease deadlines, on the leader.
    lessor: Lessor,
    /// Connections to the leader for forwarded lease requests.
    forwarders: Arc<lease::Forwarders>,
    /// This member's space quota (see `alarm::check_space`).
    quota: Arc<Quota>,
    /// How this member calls the other members' client ports.
    forward_tls: ClientTls,
    /// The auth state as applied, token and password settings.
    auth: Arc<auth::AuthGate>,
    /// Whether a verified client certificate's common name names the user.
    client_cert_auth: bool,
    /// Client proposals in flight ([`ServeParts::inflight`]).
    inflight: Arc<AtomicUsize>,
}

fn kv_status(e: &KvError) -> Status {
    Status::new(tonic::Code::from_i32(e.grpc_code().as_i32()), e.to_string())
}

fn status_of(e: RequestError) -> Status {
    match e {
        RequestError::NotLeader { leader: None } => Status::unavailable("etcdserver: no leader"),
        RequestError::NotLeader {
            leader: Some(leader),
        } => Status::unavailable(format!(
            "etcdserver: not leader (the leader is member {leader})"
        )),
        RequestError::Unavailable(m) | RequestError::NotYet(m) => Status::unavailable(m),
        RequestError::Busy(m) => {
            Status::resource_exhausted(format!("etcdserver: too many requests: {m}"))
        }
        RequestError::Stopped(m) => Status::unavailable(format!("etcdserver: stopped: {m}")),
        RequestError::Invalid(m) => Status::failed_precondition(format!("etcdserver: {m}")),
    }
}

impl Api {
    /// An endpoint for another member's client port at `addr` (a host name
    /// is resolved when the channel connects), over TLS when this member's
    /// port serves TLS.
    fn member_endpoint(
        &self,
        addr: &PeerAddr,
        timeout: Duration,
    ) -> Result<tonic::transport::Endpoint, Status> {
        Ok(self
            .forward_tls
            .endpoint(&addr.to_string())
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(self.node.config().request_timeout()))
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let s = self.node.status();
        Some(ResponseHeader {
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            revision,
            raft_term: s.term,
        })
    }

    /// Proposes `cmd` (through the leader) and waits until it is applied
    /// on this member. A refusal that appended nothing and lasts a moment
    /// (no leader known yet, leadership being handed over, a new leader
    /// not ready) is retried every [`PROPOSE_RETRY_PAUSE`] until the
    /// request timeout, as etcd waits for a leader: a client sees an
    /// election or a hand-over as latency, not as an error.
    async fn propose(&self, cmd: KvCommand) -> Result<KvResponse, Status> {
        let _inflight = InFlight::enter(&self.inflight);
        let deadline = Instant::now() + self.node.config().request_timeout();
        loop {
            match self.node.propose(cmd.clone()).await {
                Err(RequestError::NotLeader { leader: None } | RequestError::NotYet(_))
                    if Instant::now() + PROPOSE_RETRY_PAUSE < deadline =>
                {
                    tokio::time::sleep(PROPOSE_RETRY_PAUSE).await;
                }
                r => return r.map_err(status_of)?.map_err(|e| kv_status(&e)),
            }
        }
    }

    /// Proposes `cmd` asked by a client as `user` ("": none): apply
    /// checks that `user` may (when auth is on).
    async fn propose_as(&self, user: &str, cmd: KvCommand) -> Result<KvResponse, Status> {
        self.propose(KvCommand::From {
            user: user.to_string(),
            command: Box::new(cmd),
        })
        .await
    }

    /// Proposes `op` (made by this member on behalf of a client it
    /// checked) and returns its response with a full header.
    async fn write(&self, op: RequestOp) -> Result<OpResponse, Status> {
        self.write_as(None, op).await
    }

    /// Proposes `op` as asked by `user` (None: by this member), checked
    /// against the user's permissions here and again at apply.
    async fn write_as(&self, user: Option<&str>, op: RequestOp) -> Result<OpResponse, Status> {
        validate_request(&op).map_err(|e| kv_status(&e))?;
        if let Some(user) = user {
            self.auth_state()
                .check_op(user, &op, &|_| Vec::new())
                .map_err(|e| kv_status(&e))?;
        }
        self.check_space(write_cost(&op)).await?;
        let mut leases = Vec::new();
        put_leases(&op, &mut leases);
        self.check_leases(&leases).await?;
        let cmd = KvCommand::Op(op);
        let response = match user {
            Some(user) => self.propose_as(user, cmd).await?,
            None => self.propose(cmd).await?,
        };
        let KvResponse::Op(r) = response else {
            return Err(unexpected());
        };
        let mut r = r
            .response
            .ok_or_else(|| Status::internal("empty response from the state machine"))?;
        let header = match &mut r {
            OpResponse::ResponsePut(p) => &mut p.header,
            OpResponse::ResponseDeleteRange(p) => &mut p.header,
            OpResponse::ResponseTxn(p) => &mut p.header,
            OpResponse::ResponseRange(p) => &mut p.header,
        };
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.header(revision);
        Ok(r)
    }

    /// Serves a Range on this member, with a full header.
    async fn query_range(
        &self,
        req: RangeRequest,
        linearizable: bool,
    ) -> Result<RangeResponse, Status> {
        match self.node.query(KvQuery::Range(req), linearizable).await {
            Ok(KvQueryResponse::Range(Ok(mut r))) => {
                let revision = r.header.as_ref().map_or(0, |h| h.revision);
                r.header = self.header(revision);
                Ok(r)
            }
            Ok(KvQueryResponse::Range(Err(e))) => Err(kv_status(&e)),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(status_of(e)),
        }
    }

    /// The store's revisions and sizes on this member (serializable).
    async fn store_status(&self) -> Result<StoreStatus, Status> {
        match self.node.query(KvQuery::Status, false).await {
            Ok(KvQueryResponse::Status(s)) => Ok(s),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(status_of(e)),
        }
    }
}

/// The leases the puts of `op` (a txn's, on every branch) attach keys to.
fn put_leases(op: &RequestOp, out: &mut Vec<i64>) {
    match &op.request {
        Some(Op::RequestPut(p)) if p.lease != 0 && !out.contains(&p.lease) => out.push(p.lease),
        Some(Op::RequestTxn(t)) => {
            for op in t.success.iter().chain(&t.failure) {
                put_leases(op, out);
            }
        }
        _ => {}
    }
}

fn unexpected() -> Status {
    Status::internal("the state machine answered with another kind of response")
}

#[tonic::async_trait]
impl Kv for Api {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let user = self.user_of(&req).await?;
        let req = req.into_inner();
        self.auth_state()
            .check_range(&user, &req.key, &req.range_end, PermKind::Read)
            .map_err(|e| kv_status(&e))?;
        let linearizable = !req.serializable;
        self.query_range(req, linearizable).await.map(Response::new)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let user = self.user_of(&req).await?;
        let op = RequestOp {
            request: Some(Op::RequestPut(req.into_inner())),
        };
        match self.write_as(Some(&user), op).await? {
            OpResponse::ResponsePut(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let user = self.user_of(&req).await?;
        let op = RequestOp {
            request: Some(Op::RequestDeleteRange(req.into_inner())),
        };
        match self.write_as(Some(&user), op).await? {
            OpResponse::ResponseDeleteRange(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let user = self.user_of(&req).await?;
        let op = RequestOp {
            request: Some(Op::RequestTxn(req.into_inner())),
        };
        match self.write_as(Some(&user), op).await? {
            OpResponse::ResponseTxn(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    /// Compaction goes through Raft: every member compacts at the same
    /// point of the log. Reads below the revision fail once it is applied;
    /// with `physical`, the answer waits (up to the request timeout) until
    /// this member has also removed the compacted versions.
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let user = self.require_user(&req).await?;
        let req = req.into_inner();
        let KvResponse::Compacted { revision } = self
            .propose_as(
                &user,
                KvCommand::Compact {
                    revision: req.revision,
                },
            )
            .await?
        else {
            return Err(unexpected());
        };
        if req.physical {
            let deadline = Instant::now() + self.node.config().request_timeout();
            while self.store_status().await?.physically_compacted < req.revision {
                if Instant::now() >= deadline {
                    return Err(Status::deadline_exceeded(
                        "etcdserver: compaction accepted; physical removal not done within \
                         request_timeout_ms",
                    ));
                }
                tokio::time::sleep(COMPACT_POLL).await;
            }
        }
        Ok(Response::new(CompactionResponse {
            header: self.header(revision),
        }))
    }
}
