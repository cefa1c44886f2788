//! The Maintenance service: status, hashes, alarms, backup, defragment,
//! leadership.

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
        let user = self.user_of(&req).await?;
        super::alarm::alarm(self, &user, req.into_inner()).await
    }

    /// Succeeds at once, doing nothing: etcd's Defragment rewrites its
    /// bbolt file to give back the free pages that deletes and compactions
    /// left in it. Skiff has no such file: the store lives in memory (a
    /// compaction frees what it removes as its slices run), and its
    /// snapshot files are written whole, never updated in place (old ones
    /// are deleted once the WAL records a newer one). There is nothing to
    /// defragment, so the answer is a truthful success.
    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.require_admin(&req).await?;
        let store = self.store_status().await?;
        Ok(Response::new(DefragmentResponse {
            header: self.header(store.revision),
        }))
    }

    /// etcd's Hash (a hash of the whole backend), for this member: the
    /// CRC32C of the store's snapshot encoding of what this member applied
    /// (serializable: no ReadIndex round, as etcd serves it locally). It
    /// covers the whole state: the revision, the compact revision, the
    /// Raft index applied, every version readable at or above the compact
    /// revision (key, value, create and mod revision, version, lease;
    /// tombstones too), the lease table and the alarms, whatever physical
    /// compaction got to. Members that applied the same log prefix answer
    /// the same hash; unlike etcd's (which skips its consistent index), it
    /// also differs between members that applied different numbers of
    /// entries, no-ops included. The store is frozen on the loop (O(1)) and
    /// hashed on a blocking thread (O(state)).
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.require_admin(&req).await?;
        let view = match self.node.query(KvQuery::View, false).await {
            Ok(KvQueryResponse::View(view)) => view,
            Ok(_) => return Err(unexpected()),
            Err(e) => return Err(status_of(e)),
        };
        let revision = view.revision();
        let hash = tokio::task::spawn_blocking(move || {
            view.write_snapshot(&mut std::io::sink())
                .map(|info| info.crc32c)
        })
        .await
        .map_err(|e| Status::internal(format!("hash task: {e}")))?
        .map_err(|e| Status::internal(format!("hash: {e}")))?;
        Ok(Response::new(HashResponse {
            header: self.header(revision),
            hash,
        }))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.require_admin(&req).await?;
        super::backup::snapshot(self, req.into_inner()).await
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let token = super::auth::token_of(&req);
        super::cluster::move_leader(self, &user, token, req.into_inner()).await
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status();
        let store = self.store_status().await?;
        let mut errors: Vec<String> = self.node.stopped().into_iter().collect();
        // The active alarms, as etcd lists them ("memberID:<id> alarm:NOSPACE").
        let alarms = super::alarm::list(self, false).await?;
        errors.extend(alarms.iter().map(ToString::to_string));
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
        self.require_admin(&req).await?;
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
