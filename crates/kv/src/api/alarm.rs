//! Alarms (NOSPACE, CORRUPT): list, raise, disarm; and the space quota
//! checked before a write is proposed.
//!
//! Alarms are replicated state (`crate::store::Alarm`): raised and disarmed
//! through Raft, listed from what this member applied after a ReadIndex
//! round (etcd sends a GET through Raft too: both are linearizable).
//!
//! The quota, as etcd's `quotaKVServer`: a request that would grow the
//! store is refused with "etcdserver: mvcc: database space exceeded"
//! (RESOURCE_EXHAUSTED) while a NOSPACE alarm is active, and when this
//! member's store plus the request's cost would pass the quota, in which
//! case this member also raises NOSPACE under its own id. The store refuses
//! such writes again when applying them after the alarm, so a write
//! proposed before the alarm was applied cannot slip through.

use tonic::{Response, Status};

use super::{kv_status, status_of, unexpected, Api};
use crate::machine::{KvCommand, KvQuery, KvQueryResponse, KvResponse, QuotaCheck};
use crate::pb::etcdserverpb::alarm_request::AlarmAction;
use crate::pb::etcdserverpb::{AlarmMember, AlarmRequest, AlarmResponse};
use crate::store::{Alarm, AlarmKind, KvError};

/// How often a member looks whether its disk fell below the reserve.
const DISK_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Raises this member's NOSPACE alarm as soon as its data directory's
/// filesystem falls below `space_reserve_bytes` (the node looks every
/// `SPACE_CHECK_INTERVAL`), whether or not clients write through this member: a follower
/// whose disk fills stops the cluster's writes before its WAL runs out
/// of space, as etcd's alarm stops them cluster-wide. Raised again if
/// disarmed while the space is still low. Runs until the node stops.
pub(super) async fn watch_disk_space(api: Api) {
    loop {
        tokio::time::sleep(DISK_WATCH_INTERVAL).await;
        if api.node.stopped().is_some() {
            return;
        }
        if api.node.space_low() && !api.quota.nospace() {
            // Cost 1: anything but free; refused, and raised, as a write.
            let _ = api.check_space(1).await;
        }
    }
}

fn member(a: Alarm) -> AlarmMember {
    AlarmMember {
        member_id: a.member,
        alarm: a.kind.as_i32(),
    }
}

/// etcd's Alarm RPC:
/// * GET lists the active alarms of type `alarm` (NONE: every type), as
///   etcd; a non-zero `memberID` also keeps only that member's (etcd
///   ignores it; its clients send 0);
/// * ACTIVATE raises `alarm` for `memberID` and answers the alarm; NONE
///   does nothing (as etcd);
/// * DEACTIVATE disarms it and answers the alarm disarmed, none when it
///   was not active (`etcdctl alarm disarm` lists, then disarms each).
pub(super) async fn alarm(
    api: &Api,
    user: &str,
    req: AlarmRequest,
) -> Result<Response<AlarmResponse>, Status> {
    let action = AlarmAction::try_from(req.action).map_err(|_| {
        Status::invalid_argument(format!("etcdserver: unknown alarm action {}", req.action))
    })?;
    let kind = AlarmKind::from_i32(req.alarm);
    if kind.is_none() && req.alarm != 0 {
        return Err(Status::invalid_argument(format!(
            "etcdserver: unknown alarm type {}",
            req.alarm
        )));
    }
    let alarms = match (action, kind) {
        (AlarmAction::Get, _) => list(api, true)
            .await?
            .into_iter()
            .filter(|a| kind.is_none_or(|k| a.kind == k))
            .filter(|a| req.member_id == 0 || a.member == req.member_id)
            .collect(),
        (AlarmAction::Activate | AlarmAction::Deactivate, None) => Vec::new(),
        (AlarmAction::Activate | AlarmAction::Deactivate, Some(kind)) => {
            let cmd = KvCommand::Alarm {
                activate: action == AlarmAction::Activate,
                member: req.member_id,
                kind,
            };
            api.auth_state()
                .check_admin(user)
                .map_err(|e| super::kv_status(&e))?;
            match api.propose_as(user, cmd).await? {
                KvResponse::Alarm(a) => a.into_iter().collect(),
                _ => return Err(unexpected()),
            }
        }
    };
    Ok(Response::new(AlarmResponse {
        header: api.header(api.hub.revision()),
        alarms: alarms.into_iter().map(member).collect(),
    }))
}

/// The active alarms this member applied (after a ReadIndex round when
/// `linearizable`).
pub(super) async fn list(api: &Api, linearizable: bool) -> Result<Vec<Alarm>, Status> {
    match api.node.query(KvQuery::Alarms, linearizable).await {
        Ok(KvQueryResponse::Alarms(all)) => Ok(all),
        Ok(_) => Err(unexpected()),
        Err(e) => Err(status_of(e)),
    }
}

impl Api {
    /// Refuses a request that adds at most `cost` bytes to the store
    /// (`crate::store::write_cost`, `LEASE_COST_BYTES`) while a NOSPACE
    /// alarm is active or when it would take the store past this member's
    /// quota or while this member's disk is low; then raises NOSPACE for
    /// this member (one proposal at a time; its failure is logged, the
    /// request is refused either way) — first for the quota, in the
    /// background for a low disk.
    pub(super) async fn check_space(&self, cost: u64) -> Result<(), Status> {
        let mut check = self.quota.check(cost);
        let disk_low = check == QuotaCheck::Fits && cost > 0 && self.node.space_low();
        if disk_low {
            // The disk is nearly full (or this member's WAL ran out of
            // space): the same alarm as the quota.
            check = QuotaCheck::Exceeds;
        }
        match check {
            QuotaCheck::Fits => return Ok(()),
            QuotaCheck::Alarmed => {}
            QuotaCheck::Exceeds if self.quota.begin_raise() => {
                let quota = self.quota.clone();
                let node = self.node.clone();
                let member = node.id();
                tracing::warn!(
                    member,
                    bytes = quota.bytes(),
                    quota = quota.limit(),
                    cost,
                    disk_space_low = node.space_low(),
                    "a write would pass the space quota or the disk's reserve: raising NOSPACE"
                );
                // On its own task, so that a client that gives up does not
                // leave the claim taken.
                let raise = tokio::spawn(async move {
                    let cmd = KvCommand::Alarm {
                        activate: true,
                        member,
                        kind: AlarmKind::NoSpace,
                    };
                    let r = node.propose(cmd).await;
                    quota.raised();
                    if let Err(e) = r {
                        tracing::warn!(member, error = %e, "NOSPACE alarm not raised");
                    }
                });
                // A member short of disk may not apply the alarm soon (a
                // WAL out of space applies nothing until there is room):
                // its request is refused now, the raise goes on.
                if !disk_low {
                    let _ = raise.await;
                }
            }
            QuotaCheck::Exceeds => {}
        }
        Err(kv_status(&KvError::NoSpace))
    }
}
