//! The etcd v3 Lease service. Grants, revokes and checkpoints go through
//! Raft; keepalives and time-to-live are answered by the leader's
//! [`crate::lease::Lessor`]. On a follower, grant, keepalive and
//! time-to-live are forwarded to the leader's client address (as etcd
//! forwards them), so that only the leader's clock decides expiry.

use skiff_node::PeerAddr;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::{kv_status, status_of, unexpected, Api};
use crate::lease::NotReady;
use crate::machine::{KvCommand, KvQuery, KvQueryResponse, KvResponse};
use crate::pb::etcdserverpb::lease_client::LeaseClient;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::store::auth::PermKind;
use crate::store::{KvError, LEASE_COST_BYTES, LEASE_TTL_MAX};

/// Keepalive responses queued for one stream.
const KEEPALIVE_QUEUE: usize = 64;
/// How long a request waits for a new leader to load its leases.
const LOADING_WAIT: Duration = Duration::from_secs(3);
/// How long a forward to the leader may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections to leaders kept for forwarding (one per leader seen).
const FORWARD_CLIENTS_MAX: usize = 16;

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// Clients of other members' Lease services, by client address.
#[derive(Debug, Default)]
pub(super) struct Forwarders {
    clients: std::sync::Mutex<HashMap<PeerAddr, LeaseClient<Channel>>>,
}

/// A lease id nobody chose: positive, from the clock, the member id and a
/// per-process random seed.
fn new_lease_id(member: u64) -> i64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(member);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    ((h.finish() >> 1) as i64).max(1)
}

impl Api {
    fn lease_header(&self) -> Option<crate::pb::etcdserverpb::ResponseHeader> {
        self.header(self.hub.revision())
    }

    /// A client of the leader's Lease service (this member is not it).
    async fn leader_lease_client(&self) -> Result<LeaseClient<Channel>, Status> {
        let s = self.node.status();
        let leader = s
            .leader
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let addr = self.node.client_addr(leader).ok_or_else(|| {
            Status::unavailable(format!(
                "etcdserver: the client address of leader {leader} is not configured \
                 (--initial-cluster-clients); connect to the leader"
            ))
        })?;
        if let Some(c) = self.forwarders.clients.lock().expect("lock").get(&addr) {
            return Ok(c.clone());
        }
        let endpoint = self.member_endpoint(&addr, CONNECT_TIMEOUT)?;
        let channel = endpoint.connect().await.map_err(|e| {
            Status::unavailable(format!("etcdserver: cannot reach leader {leader}: {e}"))
        })?;
        let client = LeaseClient::new(channel);
        let mut clients = self.forwarders.clients.lock().expect("lock");
        if clients.len() >= FORWARD_CLIENTS_MAX {
            clients.clear();
        }
        clients.insert(addr, client.clone());
        Ok(client)
    }

    fn leading(&self) -> bool {
        self.node.status().role == skiff_raft::Role::Leader
    }

    /// Waits (bounded) while a new leader loads its leases.
    async fn lessor_ready<T>(
        &self,
        mut f: impl FnMut() -> Result<T, NotReady>,
    ) -> Result<Option<T>, Status> {
        let deadline = tokio::time::Instant::now() + LOADING_WAIT;
        loop {
            match f() {
                Ok(v) => return Ok(Some(v)),
                Err(NotReady::NotLeader) => return Ok(None),
                Err(NotReady::Loading) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(NotReady::Loading) => {
                    return Err(Status::unavailable(
                        "etcdserver: leader is loading its leases",
                    ))
                }
            }
        }
    }

    /// Renews `id` here when this member is the leader: the new TTL (0:
    /// not found); None when it is not the leader.
    async fn renew_here(&self, id: i64) -> Result<Option<i64>, Status> {
        let lessor = self.lessor.clone();
        let Some((ttl, reset)) = self.lessor_ready(|| lessor.renew(id)).await? else {
            return Ok(None);
        };
        if reset {
            // The checkpointed TTL left no longer holds.
            let node = self.node.clone();
            tokio::spawn(async move {
                let cmd = KvCommand::LeaseCheckpoint {
                    remaining: vec![(id, 0)],
                };
                let _ = node.propose(cmd).await;
            });
        }
        Ok(Some(ttl))
    }

    /// Opens a keepalive stream to the leader whose responses go to `tx`;
    /// returns where to send the requests.
    async fn forward_keepalives(
        &self,
        tx: mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
        token: &Option<String>,
    ) -> Result<mpsc::Sender<LeaseKeepAliveRequest>, Status> {
        let mut client = self.leader_lease_client().await?;
        let (up_tx, up_rx) = mpsc::channel(KEEPALIVE_QUEUE);
        let mut responses = client
            .lease_keep_alive(super::auth::with_token(ReceiverStream::new(up_rx), token))
            .await?
            .into_inner();
        tokio::spawn(async move {
            // Ends when the leader ends it (it stepped down, or stopped):
            // the next request opens another.
            while let Ok(Some(r)) = responses.message().await {
                if tx.send(Ok(r)).await.is_err() {
                    break;
                }
            }
        });
        Ok(up_tx)
    }

    /// The keys attached to lease `id` on this member (none when it is
    /// not held).
    async fn lease_keys(&self, id: i64) -> Result<Vec<bytes::Bytes>, Status> {
        match self
            .node
            .query(KvQuery::Lease { id, keys: true }, false)
            .await
        {
            Ok(KvQueryResponse::Lease(l)) => Ok(l.map(|l| l.keys).unwrap_or_default()),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(status_of(e)),
        }
    }

    /// Refuses a keepalive or revoke (`Write`) or a look at lease `id`
    /// (`Read`) unless `user` may `want` every key attached to it.
    async fn check_lease_access(&self, user: &str, id: i64, want: PermKind) -> Result<(), Status> {
        let state = self.auth_state();
        if !state.enabled() || state.check_admin(user).is_ok() {
            return state.check_user(user).map_err(|e| kv_status(&e));
        }
        let keys = self.lease_keys(id).await?;
        state
            .check_lease(user, &keys, want)
            .map_err(|e| kv_status(&e))
    }

    /// Refuses a request naming a lease this member does not hold, before
    /// it reaches Raft (the store checks again when applying).
    pub(super) async fn check_leases(&self, ids: &[i64]) -> Result<(), Status> {
        for &id in ids {
            match self
                .node
                .query(KvQuery::Lease { id, keys: false }, false)
                .await
            {
                Ok(KvQueryResponse::Lease(Some(_))) => {}
                Ok(KvQueryResponse::Lease(None)) => return Err(kv_status(&KvError::LeaseNotFound)),
                Ok(_) => return Err(unexpected()),
                Err(e) => return Err(status_of(e)),
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Lease for Api {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let user = self.require_user(&request).await?;
        let token = super::auth::token_of(&request);
        let req = request.into_inner();
        // Space first, on the member asked (as etcd's quotaLeaseServer).
        self.check_space(LEASE_COST_BYTES).await?;
        if !self.leading() {
            let mut client = self.leader_lease_client().await?;
            let token = self.forward_token(&user, token).await?;
            let granted = client
                .lease_grant(super::auth::with_token(req, &token))
                .await?;
            // The leader applied the grant; a Put or Lock with the lease
            // sent here next is checked against this member's state, so
            // answer once this member applied it too (a read index is at
            // least the grant's entry).
            self.node
                .query(KvQuery::Status, true)
                .await
                .map_err(status_of)?;
            return Ok(granted);
        }
        if req.ttl > LEASE_TTL_MAX {
            return Err(kv_status(&KvError::LeaseTtlTooLarge));
        }
        if req.id < 0 {
            return Err(kv_status(&KvError::LeaseNotFound));
        }
        let id = if req.id == 0 {
            new_lease_id(self.node.id())
        } else {
            req.id
        };
        let ttl = req.ttl.max(self.lessor.min_ttl());
        match self
            .propose_as(&user, KvCommand::LeaseGrant { id, ttl })
            .await?
        {
            KvResponse::LeaseGranted { revision } => Ok(Response::new(LeaseGrantResponse {
                header: self.header(revision),
                id,
                ttl,
                error: String::new(),
            })),
            _ => Err(unexpected()),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let user = self.user_of(&request).await?;
        let id = request.into_inner().id;
        self.check_lease_access(&user, id, PermKind::Write).await?;
        // The leader's lessor hears of it from apply.
        match self
            .propose_as(&user, KvCommand::LeaseRevoke { id })
            .await?
        {
            KvResponse::LeaseRevoked { revision } => Ok(Response::new(LeaseRevokeResponse {
                header: self.header(revision),
            })),
            _ => Err(unexpected()),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let user = self.user_of(&request).await?;
        let token = super::auth::token_of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_QUEUE);
        let api = self.clone();
        tokio::spawn(async move {
            // On a follower: one stream to the leader for this client's
            // stream, pipelined; reopened when it ends.
            let mut upstream: Option<mpsc::Sender<LeaseKeepAliveRequest>> = None;
            loop {
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if let Err(status) = api.check_lease_access(&user, req.id, PermKind::Write).await {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                let reply = match api.renew_here(req.id).await {
                    Ok(Some(ttl)) => {
                        upstream = None;
                        Ok(LeaseKeepAliveResponse {
                            header: api.lease_header(),
                            id: req.id,
                            ttl,
                        })
                    }
                    Ok(None) => {
                        let up = match upstream.take().filter(|u| !u.is_closed()) {
                            Some(up) => Ok(up),
                            None => match api.forward_token(&user, token.clone()).await {
                                Ok(t) => api.forward_keepalives(tx.clone(), &t).await,
                                Err(status) => Err(status),
                            },
                        };
                        match up {
                            Ok(up) if up.send(req).await.is_ok() => {
                                upstream = Some(up);
                                continue;
                            }
                            Ok(_) => Err(Status::unavailable(
                                "etcdserver: the keepalive stream to the leader ended",
                            )),
                            Err(status) => Err(status),
                        }
                    }
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let user = self.user_of(&request).await?;
        let token = super::auth::token_of(&request);
        let req = request.into_inner();
        self.check_lease_access(&user, req.id, PermKind::Read)
            .await?;
        let lessor = self.lessor.clone();
        let Some(left) = self.lessor_ready(|| lessor.remaining(req.id)).await? else {
            let mut client = self.leader_lease_client().await?;
            let token = self.forward_token(&user, token).await?;
            return client
                .lease_time_to_live(super::auth::with_token(req, &token))
                .await;
        };
        let lease = match self
            .node
            .query(
                KvQuery::Lease {
                    id: req.id,
                    keys: req.keys,
                },
                false,
            )
            .await
        {
            Ok(KvQueryResponse::Lease(l)) => l,
            Ok(_) => return Err(unexpected()),
            Err(e) => return Err(status_of(e)),
        };
        let (ttl, granted, keys) = match (left, lease) {
            (Some(left), Some(l)) => (left, l.ttl, l.keys),
            _ => (-1, 0, Vec::new()),
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.lease_header(),
            id: req.id,
            ttl,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let user = self.user_of(&request).await?;
        match self.node.query(KvQuery::Leases, true).await {
            Ok(KvQueryResponse::Leases(all)) => {
                for (id, ..) in &all {
                    self.check_lease_access(&user, *id, PermKind::Read).await?;
                }
                Ok(Response::new(LeaseLeasesResponse {
                    header: self.lease_header(),
                    leases: all.into_iter().map(|(id, ..)| LeaseStatus { id }).collect(),
                }))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(status_of(e)),
        }
    }
}
