//! The Cluster service (MemberAdd, MemberRemove, MemberUpdate,
//! MemberPromote, MemberList) and Maintenance.MoveLeader.
//!
//! Each change is one Raft membership change through the core's guarded
//! path (one at a time; a new leader first commits an entry of its term),
//! proposed by the leader: a follower forwards the request to the leader's
//! client address and relays its answer. A member's name and URLs ride
//! with the membership as its meta ([`skiff_node::members::MemberInfo`]).

use std::hash::{BuildHasher, Hasher};

use skiff_node::members::{self, MemberInfo};
use skiff_node::RequestError;
use skiff_raft::{Membership, MembershipChange, NodeId};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{status_of, Api};
use crate::pb::etcdserverpb::cluster_client::ClusterClient;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::pb::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse,
};
use crate::store::auth::ROOT;

/// How long a forward to the leader may take to connect.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A new member id nobody chose: from the peer URLs, the cluster, the
/// clock and a per-process random seed (as etcd derives one); never 0 and
/// never one in use.
fn new_member_id(peer_urls: &[String], cluster: u64, taken: &Membership) -> NodeId {
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        for u in peer_urls {
            h.write(u.as_bytes());
        }
        h.write_u64(cluster);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let id = h.finish() >> 1;
        if id != 0 && !taken.members().contains(&id) {
            return id;
        }
    }
}

impl Api {
    fn member_of(&self, m: &Membership, id: NodeId) -> Member {
        let info = members::member_info(m, self.node.config(), id);
        Member {
            id,
            name: info.name,
            peer_ur_ls: info.peer_urls,
            client_ur_ls: info.client_urls,
            is_learner: m.learners.contains(&id),
        }
    }

    fn members_of(&self, m: &Membership) -> Vec<Member> {
        m.members()
            .into_iter()
            .map(|id| self.member_of(m, id))
            .collect()
    }

    /// A channel to the leader's client API (this member is not it).
    async fn leader_channel(&self, leader: Option<NodeId>) -> Result<Channel, Status> {
        let leader = leader.ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let addr = self.node.client_addr(leader).ok_or_else(|| {
            Status::unavailable(format!(
                "etcdserver: the client address of leader {leader} is not known; connect to \
                 the leader"
            ))
        })?;
        self.member_endpoint(&addr, CONNECT_TIMEOUT)?
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!("etcdserver: cannot reach leader {leader}: {e}"))
            })
    }

    /// Proposes `change` on this member if it leads. `Ok(None)`: it does
    /// not lead (the caller forwards to `leader`).
    async fn change(
        &self,
        change: MembershipChange,
        info: Option<&MemberInfo>,
    ) -> Result<Result<Membership, Option<NodeId>>, Status> {
        match self.node.change_membership(change, info).await {
            Ok(m) => Ok(Ok(m)),
            Err(RequestError::NotLeader { leader }) => Ok(Err(leader)),
            Err(e) => Err(membership_status(e)),
        }
    }

    /// Peer URLs a member may take: valid, and no other member's.
    fn check_peer_urls(&self, urls: &[String], except: Option<NodeId>) -> Result<(), Status> {
        if urls.is_empty() {
            return Err(Status::invalid_argument(
                "etcdserver: a member needs at least one peer URL",
            ));
        }
        let info = MemberInfo {
            peer_urls: urls.to_vec(),
            ..MemberInfo::default()
        };
        info.validate()
            .map_err(|e| Status::invalid_argument(format!("etcdserver: {e}")))?;
        let m = self.node.membership();
        let wanted: Vec<_> = urls
            .iter()
            .filter_map(|u| members::parse_url(u).ok())
            .collect();
        for id in m.members() {
            if Some(id) == except {
                continue;
            }
            let theirs = members::member_info(&m, self.node.config(), id).peer_urls;
            if theirs
                .iter()
                .filter_map(|u| members::parse_url(u).ok())
                .any(|a| wanted.contains(&a))
            {
                return Err(Status::failed_precondition(
                    "etcdserver: Peer URLs already exists",
                ));
            }
        }
        Ok(())
    }

    fn known_member(&self, id: NodeId) -> Result<Membership, Status> {
        let m = self.node.membership();
        if !m.members().contains(&id) {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        Ok(m)
    }
}

/// How often a member added with MemberAdd looks whether its client URLs
/// are published.
const PUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A member added with MemberAdd publishes its client URLs (MemberAdd
/// knows only its peer URLs), as etcd members publish their attributes:
/// a MemberUpdate through the leader, retried until the membership shows
/// them. Members of the initial cluster have no meta and need none (every
/// member's configuration lists them). Runs until the node stops.
pub(super) async fn publish_client_urls(api: Api) {
    let me = api.node.id();
    let url = members::url_of(api.node.config().listen_client);
    loop {
        tokio::time::sleep(PUBLISH_INTERVAL).await;
        if api.node.stopped().is_some() {
            return;
        }
        let m = api.node.membership();
        let Some(meta) = m.meta.get(&me) else {
            continue;
        };
        let Ok(info) = MemberInfo::decode(meta) else {
            continue;
        };
        if info.client_urls.contains(&url) {
            continue;
        }
        let req = MemberUpdateRequest {
            id: me,
            peer_ur_ls: info.peer_urls.clone(),
            client_ur_ls: vec![url.clone()],
        };
        // An update of the member's own: made as root (etcd makes its
        // internal requests with a root token too).
        let token = match api.forward_token(ROOT, None).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(member = me, error = %e.message(), "no root token yet");
                continue;
            }
        };
        let result = match api
            .member_update(super::auth::with_token(req, &token))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(e.message().to_string()),
        };
        match result {
            Ok(()) => tracing::info!(member = me, %url, "client URL published"),
            Err(error) => tracing::debug!(member = me, %error, "client URL not published yet"),
        }
    }
}

/// A refused change as etcd words it.
fn membership_status(e: RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::failed_precondition(format!("etcdserver: {m}")),
        other => status_of(other),
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let token = super::auth::token_of(&req);
        let req = req.into_inner();
        self.check_peer_urls(&req.peer_ur_ls, None)?;
        let m = self.node.membership();
        let id = new_member_id(&req.peer_ur_ls, self.node.cluster_id(), &m);
        let info = MemberInfo {
            name: String::new(),
            peer_urls: req.peer_ur_ls.clone(),
            client_urls: Vec::new(),
        };
        let change = if req.is_learner {
            MembershipChange::AddLearner(id)
        } else {
            MembershipChange::AddVoter(id)
        };
        match self.change(change, Some(&info)).await? {
            Ok(m) => {
                tracing::info!(member = id, urls = ?req.peer_ur_ls, learner = req.is_learner, "member added");
                Ok(Response::new(MemberAddResponse {
                    header: self.header(self.hub.revision()),
                    member: Some(self.member_of(&m, id)),
                    members: self.members_of(&m),
                }))
            }
            Err(leader) => {
                let ch = self.leader_channel(leader).await?;
                let token = self.forward_token(&user, token).await?;
                ClusterClient::new(ch)
                    .member_add(super::auth::with_token(req, &token))
                    .await
            }
        }
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let token = super::auth::token_of(&req);
        let req = req.into_inner();
        self.known_member(req.id)?;
        match self.change(MembershipChange::Remove(req.id), None).await? {
            Ok(m) => {
                tracing::info!(member = req.id, "member removed");
                Ok(Response::new(MemberRemoveResponse {
                    header: self.header(self.hub.revision()),
                    members: self.members_of(&m),
                }))
            }
            Err(leader) => {
                let ch = self.leader_channel(leader).await?;
                let token = self.forward_token(&user, token).await?;
                ClusterClient::new(ch)
                    .member_remove(super::auth::with_token(req, &token))
                    .await
            }
        }
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let token = super::auth::token_of(&req);
        let req = req.into_inner();
        let m = self.known_member(req.id)?;
        let mut info = members::member_info(&m, self.node.config(), req.id);
        if !req.peer_ur_ls.is_empty() || req.client_ur_ls.is_empty() {
            self.check_peer_urls(&req.peer_ur_ls, Some(req.id))?;
            info.peer_urls = req.peer_ur_ls.clone();
        }
        if !req.client_ur_ls.is_empty() {
            info.client_urls = req.client_ur_ls.clone();
            if info.name.is_empty() {
                info.name = members::default_name(req.id);
            }
        }
        info.validate()
            .map_err(|e| Status::invalid_argument(format!("etcdserver: {e}")))?;
        match self
            .change(MembershipChange::Update(req.id), Some(&info))
            .await?
        {
            Ok(m) => Ok(Response::new(MemberUpdateResponse {
                header: self.header(self.hub.revision()),
                members: self.members_of(&m),
            })),
            Err(leader) => {
                let ch = self.leader_channel(leader).await?;
                let token = self.forward_token(&user, token).await?;
                ClusterClient::new(ch)
                    .member_update(super::auth::with_token(req, &token))
                    .await
            }
        }
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let token = super::auth::token_of(&req);
        let req = req.into_inner();
        let m = self.known_member(req.id)?;
        if !m.learners.contains(&req.id) {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member",
            ));
        }
        match self
            .change(MembershipChange::AddVoter(req.id), None)
            .await?
        {
            Ok(m) => {
                tracing::info!(member = req.id, "learner promoted");
                Ok(Response::new(MemberPromoteResponse {
                    header: self.header(self.hub.revision()),
                    members: self.members_of(&m),
                }))
            }
            Err(leader) => {
                let ch = self.leader_channel(leader).await?;
                let token = self.forward_token(&user, token).await?;
                ClusterClient::new(ch)
                    .member_promote(super::auth::with_token(req, &token))
                    .await
            }
        }
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let m = self.node.membership();
        Ok(Response::new(MemberListResponse {
            header: self.header(self.hub.revision()),
            members: self.members_of(&m),
        }))
    }
}

/// Maintenance.MoveLeader: a leadership transfer to a caught-up voter;
/// a follower forwards it to the leader.
pub(super) async fn move_leader(
    api: &Api,
    user: &str,
    token: Option<String>,
    req: MoveLeaderRequest,
) -> Result<Response<MoveLeaderResponse>, Status> {
    let m = api.node.membership();
    if !m.is_voter(req.target_id) {
        return Err(Status::failed_precondition(format!(
            "etcdserver: bad leader transferee: member {} is not a voter",
            req.target_id
        )));
    }
    if api.node.status().leader == Some(req.target_id) {
        return Ok(Response::new(MoveLeaderResponse {
            header: api.header(api.hub.revision()),
        }));
    }
    match api.node.transfer_leadership(Some(req.target_id)).await {
        Ok(_) => Ok(Response::new(MoveLeaderResponse {
            header: api.header(api.hub.revision()),
        })),
        Err(RequestError::NotLeader { leader }) => {
            let ch = api.leader_channel(leader).await?;
            let token = api.forward_token(user, token).await?;
            MaintenanceClient::new(ch)
                .move_leader(super::auth::with_token(req, &token))
                .await
        }
        Err(e) => Err(membership_status(e)),
    }
}
