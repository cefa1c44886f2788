//! Alarms (etcd's `v3alarm`): a set of (member, alarm type) that is
//! replicated state, raised and disarmed through the log, kept in
//! snapshots; and the space cost of a request, which decides what a NOSPACE
//! alarm refuses.
//!
//! While a [`AlarmKind::NoSpace`] alarm is active (raised by any member),
//! [`super::KvStore::apply`] refuses every request that would grow the
//! store ([`write_cost`] > 0: a Put, a Txn with a Put on either branch at
//! any depth) and [`super::KvStore::lease_grant`] refuses every grant, with
//! [`KvError::NoSpace`], as etcd's capped applier does. Range, DeleteRange,
//! Compact, LeaseRevoke, LeaseCheckpoint and Txns without puts go on. The
//! refusal depends only on the alarms applied before, so it is the same on
//! every member. A [`AlarmKind::Corrupt`] alarm is recorded, listed and
//! disarmed, and changes nothing else (etcd refuses every request then).

use super::{KvError, KvStore, KEY_OVERHEAD_BYTES, VERSION_OVERHEAD_BYTES};
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::{AlarmType, RequestOp, TxnRequest};

/// What a LeaseGrant costs against the space quota (etcd's
/// `leaseOverhead`). Leases are not counted in [`super::StoreStats::bytes`].
pub const LEASE_COST_BYTES: u64 = 64;

/// The type of an alarm; the numbers are etcd's `AlarmType`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum AlarmKind {
    /// The store went over its space quota: writes that grow it are refused.
    NoSpace = 1,
    /// A member found its state corrupt (recorded only; see module docs).
    Corrupt = 2,
}

impl AlarmKind {
    /// Every kind, in order.
    pub const ALL: [AlarmKind; 2] = [AlarmKind::NoSpace, AlarmKind::Corrupt];

    /// The kind of an etcd `AlarmType` number (None: NONE or unknown).
    pub fn from_i32(n: i32) -> Option<AlarmKind> {
        match AlarmType::try_from(n).ok()? {
            AlarmType::None => None,
            AlarmType::Nospace => Some(AlarmKind::NoSpace),
            AlarmType::Corrupt => Some(AlarmKind::Corrupt),
        }
    }

    /// Its etcd `AlarmType` number.
    pub fn as_i32(self) -> i32 {
        match self {
            AlarmKind::NoSpace => AlarmType::Nospace as i32,
            AlarmKind::Corrupt => AlarmType::Corrupt as i32,
        }
    }

    /// Its byte in commands and snapshots.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind of a byte written by [`Self::as_u8`].
    pub fn from_u8(b: u8) -> Option<AlarmKind> {
        AlarmKind::ALL.into_iter().find(|k| k.as_u8() == b)
    }

    /// etcd's name (`NOSPACE`, `CORRUPT`), as `etcdctl alarm list` prints it.
    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::NoSpace => "NOSPACE",
            AlarmKind::Corrupt => "CORRUPT",
        }
    }
}

/// An active alarm: which member raised which kind (etcd's `AlarmMember`).
/// Ordered by member, then kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Alarm {
    pub member: u64,
    pub kind: AlarmKind,
}

impl std::fmt::Display for Alarm {
    /// As etcd prints an `AlarmMember` (`etcdctl alarm list`, Status
    /// errors): `memberID:<decimal id> alarm:NOSPACE`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memberID:{} alarm:{}", self.member, self.kind.name())
    }
}

/// Active alarms: a persistent set, so that a frozen view shares it.
pub(super) type Alarms = imbl::OrdSet<Alarm>;

/// What a request may add to [`super::StoreStats::bytes`], at most (0: it
/// cannot grow the store): a Put costs its key and value and the overheads
/// of a new key and version; a Txn the dearer of its two branches (etcd's
/// `costTxn`; nested txns count too); Range and DeleteRange nothing (a
/// delete's tombstone is not charged, as in etcd).
pub fn write_cost(op: &RequestOp) -> u64 {
    match &op.request {
        Some(Request::RequestPut(p)) => {
            p.key.len() as u64 + p.value.len() as u64 + VERSION_OVERHEAD_BYTES + KEY_OVERHEAD_BYTES
        }
        Some(Request::RequestTxn(t)) => txn_cost(t),
        Some(Request::RequestRange(_) | Request::RequestDeleteRange(_)) | None => 0,
    }
}

fn txn_cost(t: &TxnRequest) -> u64 {
    let branch = |ops: &[RequestOp]| ops.iter().map(write_cost).fold(0u64, u64::saturating_add);
    branch(&t.success).max(branch(&t.failure))
}

impl KvStore {
    /// Raises `kind` for `member`, from the log entry at `index`; returns
    /// the alarm (already active or not). Changes no revision.
    pub fn alarm_activate(&mut self, index: u64, member: u64, kind: AlarmKind) -> Alarm {
        self.advance_applied(index);
        let alarm = Alarm { member, kind };
        self.alarms.insert(alarm);
        alarm
    }

    /// Disarms `kind` of `member`, from the log entry at `index`; returns
    /// the alarm removed (None: it was not active). Changes no revision.
    pub fn alarm_deactivate(&mut self, index: u64, member: u64, kind: AlarmKind) -> Option<Alarm> {
        self.advance_applied(index);
        self.alarms.remove(&Alarm { member, kind })
    }

    /// The active alarms, by member then kind.
    pub fn alarms(&self) -> impl Iterator<Item = Alarm> + '_ {
        self.alarms.iter().copied()
    }

    /// Whether any member has `kind` active.
    pub fn alarm_active(&self, kind: AlarmKind) -> bool {
        self.alarms.iter().any(|a| a.kind == kind)
    }

    /// [`KvError::NoSpace`] when a NOSPACE alarm is active and `cost` > 0.
    pub(super) fn check_space(&self, cost: u64) -> Result<(), KvError> {
        if cost > 0 && self.alarm_active(AlarmKind::NoSpace) {
            Err(KvError::NoSpace)
        } else {
            Ok(())
        }
    }
}
