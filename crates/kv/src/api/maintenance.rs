//! The Maintenance service: status, hashes, alarms, backup, leadership.

use tonic::{Request, Response, Status};

use super::{kv_status, status_of, unexpected, Api, API_VERSION};
use crate::machine::{KvQuery, KvQueryResponse};
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, StatusRequest, StatusResponse,
};

#[tonic::async_trait]
impl Maintenance for Api {
    type SnapshotStream = super::backup::SnapshotStream;

    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        super::alarm::alarm(self, req.into_inner()).await
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(Status::unimplemented("Defragment: not yet"))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(Status::unimplemented("Hash: not yet"))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        super::backup::snapshot(self, req.into_inner()).await
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        super::cluster::move_leader(self, req.into_inner()).await
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status();
        let store = self.store_status().await?;
        let errors = self.node.stopped().into_iter().collect();
        // The store lives in memory: both sizes are the bytes it holds,
        // history and tombstones included (there is no file with free
        // pages to tell apart, as etcd's bbolt has).
        let bytes = i64::try_from(store.stats.bytes).unwrap_or(i64::MAX);
        Ok(Response::new(StatusResponse {
            header: self.header(store.revision),
            version: API_VERSION.into(),
            db_size: bytes,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit,
            raft_term: s.term,
            raft_applied_index: s.applied,
            errors,
            db_size_in_use: bytes,
            is_learner: self.node.membership().learners.contains(&s.id),
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let revision = req.into_inner().revision;
        match self.node.query(KvQuery::HashKv { revision }, true).await {
            Ok(KvQueryResponse::HashKv(Ok((hash, compact_revision, hash_revision)), current)) => {
                Ok(Response::new(HashKvResponse {
                    header: self.header(current),
                    hash,
                    compact_revision,
                    hash_revision,
                }))
            }
            Ok(KvQueryResponse::HashKv(Err(e), _)) => Err(kv_status(&e)),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(status_of(e)),
        }
    }
}
