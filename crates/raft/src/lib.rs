//! skiff-raft: the Raft state machine, with no I/O, no clock and no threads.
//!
//! The core changes only through its inputs and hands its work back as a
//! list of [`Action`]s. Time enters as ticks, randomness as a seed: the same
//! inputs give the same actions.
//!
//! # The contract
//!
//! Inputs: [`Raft::tick`], [`Raft::propose`], [`Raft::step`] (a message),
//! [`Raft::persisted`] (a persist is durable), [`Raft::applied`],
//! [`Raft::unreachable`]. After each, [`Raft::take_actions`] returns, in
//! order:
//!
//! 1. at most one [`Action::Persist`]: truncate the log from its first
//!    entry's index, append its entries, save its hard state — in that
//!    order, after every earlier persist. Report it with `persisted(id)`.
//! 2. [`Action::Send`]s. A message with `after_persist: Some(id)` (a vote, a
//!    vote request, an acknowledgement) leaves only once persist `id` is
//!    durable; one without (a leader's AppendEntries, heartbeats, pre-votes)
//!    may leave at once — the leader's disk write and its sends overlap.
//! 3. [`Action::Apply`]: committed entries that are durable here, in order.
//!    Report progress with `applied(index)`.
//! 4. [`Action::RoleChanged`] when the role, term or leader changed.
//!
//! A leader counts its own log toward a quorum only for what it reported
//! persisted, and commits only entries of its own term (§5.4.2); followers
//! acknowledge only durable entries; a candidate counts its own vote only
//! once it is durable (a sole voter leads only after its persist).
//!
//! # What this crate owns
//!
//! Consensus rules only: election with pre-vote and check-quorum, pipelined
//! and batched replication with per-follower flow control, fast conflict
//! back-off, proposal backpressure. It never touches files, sockets or the
//! clock.

mod log;
mod planted;
mod progress;
mod raft;
mod rng;
mod types;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use crate::log::RaftLog;
#[cfg(any(test, feature = "testing"))]
pub use crate::planted::PlantedBug;
pub use crate::progress::{Progress, ProgressState};
pub use crate::raft::{Raft, Restored};
pub use crate::rng::Rng;
pub use crate::types::{
    Action, Config, Entry, HardState, Index, Membership, MembershipChange, Message, MessageBody,
    NodeId, Payload, PersistId, RejectHint, Role, Term, ENTRY_OVERHEAD_BYTES,
};

/// A proposal the core refused; nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("{uncommitted_bytes} bytes are uncommitted; the bound is {max}: retry later")]
    Backpressure {
        uncommitted_bytes: usize,
        max: usize,
    },
    #[error("empty proposal")]
    Empty,
    #[error("leadership is being transferred to {to}: retry on the new leader")]
    Transferring { to: NodeId },
    #[error("a membership change is still uncommitted (at index {index})")]
    ChangePending { index: Index },
    #[error("the leader has not yet committed an entry of its term; retry shortly")]
    LeaderNotReady,
    #[error("invalid membership change: {0}")]
    InvalidChange(String),
}

/// A read the core refused at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("no known leader to confirm the read")]
    NoLeader,
    #[error("{pending} reads are pending; the bound is {max}: retry later")]
    Backpressure { pending: usize, max: usize },
}

/// A leadership transfer the core refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("{0} is not another voter")]
    NotAVoter(NodeId),
}

/// An invalid [`Config`]: `field` names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid raft config `{field}`: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}
