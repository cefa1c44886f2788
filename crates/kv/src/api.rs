//! The etcd v3 gRPC API on top of a node: KV (Range, Put, DeleteRange, Txn,
//! Compact), Cluster.MemberList and Maintenance.Status.
//!
//! Writes are proposed through Raft: on the leader directly, on a follower
//! forwarded to the leader over the peer connection (Raft `Propose`), and
//! answered when this member applies them. Reads are linearizable (ReadIndex, served on any member after it
//! applied through the read index) unless the request asks for
//! `serializable`, which is served from this member's state at once.

use std::net::SocketAddr;

use tonic::{Request, Response, Status};

use crate::event_loop::RequestError;
use crate::kv::{validate_request, KvError};
use crate::node::NodeHandle;
use crate::pb::etcdserverpb::cluster_server::{Cluster, ClusterServer};
use crate::pb::etcdserverpb::kv_server::{Kv, KvServer};
use crate::pb::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, Member,
    MemberListRequest, MemberListResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};

/// The version `Maintenance.Status` reports (the etcd API level served).
pub const API_VERSION: &str = "3.5.0";
/// Largest gRPC message accepted (etcd's default request bound + framing).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 2 << 20;

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
    let api = Api { node };
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

    /// Proposes `op` (through the leader) and waits until it is applied
    /// on this member.
    async fn write(&self, op: RequestOp) -> Result<OpResponse, Status> {
        validate_request(&op).map_err(|e| kv_status(&e))?;
        self.node
            .write(op)
            .await
            .map_err(status_of)?
            .response
            .ok_or_else(|| Status::internal("empty response from the state machine"))
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
        let op = RequestOp {
            request: Some(Op::RequestPut(req.into_inner())),
        };
        match self.write(op).await? {
            OpResponse::ResponsePut(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let op = RequestOp {
            request: Some(Op::RequestDeleteRange(req.into_inner())),
        };
        match self.write(op).await? {
            OpResponse::ResponseDeleteRange(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let op = RequestOp {
            request: Some(Op::RequestTxn(req.into_inner())),
        };
        match self.write(op).await? {
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
