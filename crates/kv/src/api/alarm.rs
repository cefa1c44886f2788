//! Alarms (NOSPACE, CORRUPT): list, raise, disarm.

use tonic::{Response, Status};

use super::Api;
use crate::pb::etcdserverpb::{AlarmRequest, AlarmResponse};

pub(super) async fn alarm(_api: &Api, _req: AlarmRequest) -> Result<Response<AlarmResponse>, Status> {
    Err(Status::unimplemented("Alarm: not yet"))
}
