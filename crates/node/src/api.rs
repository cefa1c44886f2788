//! The etcd v3 gRPC API on top of a node: KV (Range, Put, DeleteRange, Txn,
//! Compact), Cluster.MemberList and Maintenance.Status.
//!
//! Writes are proposed on the leader; a follower forwards them to the
//! leader's client address (one hop; a forwarded request is never forwarded
//! again). Reads are linearizable (ReadIndex, served on any member after it
//! applied through the read index) unless the request asks for
//! `serializable`, which is served from this member's state at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::event_loop::RequestError;
use crate::kv::{validate_request, KvError};
use crate::node::NodeHandle;
use crate::pb::etcdserverpb::cluster_server::{Cluster, ClusterServer};
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::kv_server::{Kv, KvServer};
use crate::pb::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, Member,
    MemberListRequest, MemberListResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};

/// Metadata key marking a request a follower forwarded.
const FORWARDED: &str = "skiff-forwarded";
/// The version `Maintenance.Status` reports (the etcd API level served).
pub const API_VERSION: &str = "3.5.0";
/// Largest gRPC message accepted (etcd's default request bound + framing).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 2 << 20;
/// Leaders' client channels cached for forwarding.
const FORWARD_CHANNELS_MAX: usize = 16;

/// Starts the gRPC server on `addr`; returns the bound address. It stops
/// when `stop` fires.
pub async fn serve(
    node: NodeHandle,
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let api = Api {
        node,
        channels: Mutex::new(HashMap::new()),
    };
    let api = std::sync::Arc::new(api);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(
            KvServer::from_arc(api.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(ClusterServer::from_arc(api.clone()))
        .add_service(MaintenanceServer::from_arc(api))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        });
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    Ok(local)
}

struct Api {
    node: NodeHandle,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
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
            "etcdserver: not leader (leader is member {leader}; its client address is not configured)"
        )),
        RequestError::Unavailable(m) => Status::unavailable(m),
        RequestError::Busy(m) => {
            Status::resource_exhausted(format!("etcdserver: too many requests: {m}"))
        }
        RequestError::Kv(e) => kv_status(&e),
        RequestError::Stopped(m) => Status::unavailable(format!("etcdserver: stopped: {m}")),
    }
}

impl Api {
    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let s = self.node.status();
        Some(ResponseHeader {
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            revision,
            raft_term: s.term,
        })
    }

    /// Proposes `op` here, or forwards the original request to the leader.
    async fn write<T, F, Fut>(
        &self,
        op: RequestOp,
        forwarded: bool,
        forward: F,
    ) -> Result<OpResponse, Status>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
        T: Into<OpResponse>,
    {
        validate_request(&op).map_err(|e| kv_status(&e))?;
        match self.node.write(op).await {
            Ok(r) => r
                .response
                .ok_or_else(|| Status::internal("empty response from the state machine")),
            Err(RequestError::NotLeader {
                leader: Some(leader),
            }) if !forwarded => {
                let Some(addr) = self.node.client_addr(leader) else {
                    return Err(status_of(RequestError::NotLeader {
                        leader: Some(leader),
                    }));
                };
                let client = self.client(addr).await?;
                forward(client).await.map(Into::into)
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn client(&self, addr: SocketAddr) -> Result<KvClient<Channel>, Status> {
        if let Some(ch) = self.lock_channels().get(&addr) {
            return Ok(KvClient::new(ch.clone()));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.node.config().request_timeout())
            .tcp_nodelay(true);
        let ch = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("forwarding to the leader at {addr}: {e}")))?;
        let mut channels = self.lock_channels();
        if channels.len() >= FORWARD_CHANNELS_MAX {
            channels.clear();
        }
        channels.insert(addr, ch.clone());
        Ok(KvClient::new(ch))
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn forwarded_request<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

impl From<PutResponse> for OpResponse {
    fn from(r: PutResponse) -> OpResponse {
        OpResponse::ResponsePut(r)
    }
}

impl From<DeleteRangeResponse> for OpResponse {
    fn from(r: DeleteRangeResponse) -> OpResponse {
        OpResponse::ResponseDeleteRange(r)
    }
}

impl From<TxnResponse> for OpResponse {
    fn from(r: TxnResponse) -> OpResponse {
        OpResponse::ResponseTxn(r)
    }
}

fn unexpected() -> Status {
    Status::internal("the state machine answered with another kind of response")
}

#[tonic::async_trait]
impl Kv for Api {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        self.node
            .read(req)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let put = req.into_inner();
        let op = RequestOp {
            request: Some(Op::RequestPut(put.clone())),
        };
        let r = self
            .write(op, forwarded, |mut c| async move {
                c.put(forwarded_request(put))
                    .await
                    .map(Response::into_inner)
            })
            .await?;
        match r {
            OpResponse::ResponsePut(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let del = req.into_inner();
        let op = RequestOp {
            request: Some(Op::RequestDeleteRange(del.clone())),
        };
        let r = self
            .write(op, forwarded, |mut c| async move {
                c.delete_range(forwarded_request(del))
                    .await
                    .map(Response::into_inner)
            })
            .await?;
        match r {
            OpResponse::ResponseDeleteRange(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let txn = req.into_inner();
        let op = RequestOp {
            request: Some(Op::RequestTxn(txn.clone())),
        };
        let r = self
            .write(op, forwarded, |mut c| async move {
                c.txn(forwarded_request(txn))
                    .await
                    .map(Response::into_inner)
            })
            .await?;
        match r {
            OpResponse::ResponseTxn(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    /// Skiff keeps only the latest version of each key: there is no history
    /// to compact. A revision up to the current one is accepted (history
    /// below it is already unavailable); a future one is refused as etcd
    /// does.
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let rev = req.into_inner().revision;
        let current = self.node.status().revision as i64;
        if rev > current {
            return Err(Status::out_of_range(
                "etcdserver: mvcc: required revision is a future revision",
            ));
        }
        Ok(Response::new(CompactionResponse {
            header: self.header(current),
        }))
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let m = self.node.membership();
        let cfg = self.node.config();
        let members = m
            .members()
            .into_iter()
            .map(|id| Member {
                id,
                name: format!("skiff-{id}"),
                peer_ur_ls: cfg
                    .initial_cluster
                    .get(&id)
                    .map(|a| vec![format!("http://{a}")])
                    .unwrap_or_default(),
                client_ur_ls: self
                    .node
                    .client_addr(id)
                    .map(|a| vec![format!("http://{a}")])
                    .unwrap_or_default(),
                is_learner: m.learners.contains(&id),
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: self.header(self.node.status().revision as i64),
            members,
        }))
    }
}

#[tonic::async_trait]
impl Maintenance for Api {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status();
        let errors = self.node.stopped().into_iter().collect();
        Ok(Response::new(StatusResponse {
            header: self.header(s.revision as i64),
            version: API_VERSION.into(),
            db_size: 0,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit,
            raft_term: s.term,
            raft_applied_index: s.applied,
            errors,
            db_size_in_use: 0,
            is_learner: self.node.membership().learners.contains(&s.id),
        }))
    }
}
