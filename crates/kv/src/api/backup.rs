//! Maintenance.Snapshot: a consistent backup of the store, streamed.

use std::pin::Pin;

use tonic::codegen::tokio_stream::Stream;
use tonic::{Response, Status};

use super::Api;
use crate::pb::etcdserverpb::{SnapshotRequest, SnapshotResponse};

pub(super) type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

pub(super) async fn snapshot(
    _api: &Api,
    _req: SnapshotRequest,
) -> Result<Response<SnapshotStream>, Status> {
    Err(Status::unimplemented("Snapshot: not yet"))
}
