//! The Cluster service: the members, and changes to them.

use tonic::{Request, Response, Status};

use super::Api;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse,
};

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented("MemberAdd: not yet"))
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented("MemberRemove: not yet"))
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented("MemberUpdate: not yet"))
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented("MemberPromote: not yet"))
    }

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
        let revision = self.store_status().await?.revision;
        Ok(Response::new(MemberListResponse {
            header: self.header(revision),
            members,
        }))
    }
}


pub(super) async fn move_leader(
    _api: &Api,
    _req: MoveLeaderRequest,
) -> Result<Response<MoveLeaderResponse>, Status> {
    Err(Status::unimplemented("MoveLeader: not yet"))
}
