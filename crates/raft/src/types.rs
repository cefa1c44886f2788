//! The core's vocabulary: entries, messages, actions and configuration.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

/// A node's identity; 0 is never a node ("no vote", "no leader").
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A log index; 0 is "before the first entry".
pub type Index = u64;
/// Identifies one [`Action::Persist`]; the node reports it back through
/// [`crate::Raft::persisted`] once durable. Increasing from 1.
pub type PersistId = u64;

/// What an entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Appended by a new leader to commit entries of earlier terms (§5.4.2).
    Noop,
    /// An application command.
    Normal(Bytes),
    /// A new membership; it takes effect as soon as it is in the log
    /// (thesis §4.1), and is reverted if the entry is truncated.
    Membership(Membership),
}

/// Who votes and who only receives the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    /// Non-empty during joint consensus: the voters being left. Decisions
    /// then need a majority of `voters` and a majority of `outgoing`.
    pub outgoing: BTreeSet<NodeId>,
    /// Receive the log, never vote or count toward a quorum.
    pub learners: BTreeSet<NodeId>,
    /// The host's bytes about each member (its addresses, its name): opaque
    /// to the core, replicated with the membership, kept in snapshots.
    /// Only members have an entry; a change that removes a member drops it.
    pub meta: BTreeMap<NodeId, Bytes>,
}

impl Membership {
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            voters: voters.into_iter().collect(),
            ..Membership::default()
        }
    }

    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Votes in either configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing.contains(&id)
    }

    /// Everyone the leader replicates to (itself included).
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        all.extend(&self.outgoing);
        all.extend(&self.learners);
        all
    }

    /// Drops the meta of nodes that are no longer members.
    pub fn prune_meta(&mut self) {
        let members = self.members();
        self.meta.retain(|id, _| members.contains(id));
    }

    /// Everyone who votes, in either configuration.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        all.extend(&self.outgoing);
        all
    }
}

/// A membership change a leader may propose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new member that receives the log but does not vote.
    AddLearner(NodeId),
    /// A new voter, or a learner promoted (one voter more: a single-server
    /// change, thesis §4.1).
    AddVoter(NodeId),
    /// Removes a voter (single-server change) or a learner.
    Remove(NodeId),
    /// Any new voter set through joint consensus (thesis §4.3): the leader
    /// enters the joint configuration, and leaves it on its own once that
    /// entry commits.
    Joint {
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    },
    /// No change to who votes: only the member's meta is replaced (with
    /// [`crate::Raft::propose_membership_with`]).
    Update(NodeId),
}

impl Payload {
    /// Bytes counted against batch and flow-control bounds.
    pub fn size(&self) -> usize {
        match self {
            Payload::Noop => 0,
            Payload::Normal(b) => b.len(),
            Payload::Membership(m) => {
                8 * m.members().len() + m.meta.values().map(|b| 12 + b.len()).sum::<usize>()
            }
        }
    }
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    pub payload: Payload,
}

impl Entry {
    /// Bytes counted against batch and flow-control bounds: the payload and
    /// a fixed overhead for index, term and framing.
    pub fn size(&self) -> usize {
        ENTRY_OVERHEAD_BYTES + self.payload.size()
    }
}

/// Per-entry overhead counted by [`Entry::size`].
pub const ENTRY_OVERHEAD_BYTES: usize = 24;

/// State that must be durable before any vote or message depending on it
/// leaves the node. `vote == 0`: no vote in `term`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub vote: NodeId,
    pub commit: Index,
}

/// A message between nodes. `term` is the sender's term (for `PreVote`, the
/// term the sender would campaign in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: MessageBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageBody {
    /// Would you vote for me in `term`? Changes no state of the receiver.
    PreVote {
        last_index: Index,
        last_term: Term,
    },
    PreVoteResponse {
        granted: bool,
    },
    /// `transfer`: the leader asked the sender to campaign (leadership
    /// transfer), so receivers do not ignore it while they hear that leader.
    Vote {
        last_index: Index,
        last_term: Term,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    /// Entries following `(prev_index, prev_term)`; `commit` is the leader's
    /// commit index.
    Append {
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    },
    /// `success`: the follower's log matches the leader's through
    /// `match_index` (durably). Otherwise `reject` says where to go back to.
    AppendResponse {
        success: bool,
        match_index: Index,
        reject: Option<RejectHint>,
    },
    /// Keeps followers from campaigning and carries the commit index (never
    /// beyond what the follower is known to match). `round` numbers the
    /// leader's heartbeat rounds: a quorum answering round `r` confirms the
    /// leader was still leading when `r` started (ReadIndex, leases).
    Heartbeat {
        commit: Index,
        round: u64,
    },
    HeartbeatResponse {
        round: u64,
    },
    /// A follower asks the leader for a read index on behalf of a client.
    ReadIndex {
        ctx: u64,
    },
    /// `index: None`: the leader could not serve it (stepped down, too many
    /// reads pending).
    ReadIndexResponse {
        ctx: u64,
        index: Option<Index>,
    },
    /// A follower forwards client commands to the leader, which proposes
    /// them as they are (the host finds its own commands again when it
    /// applies them, by an id inside each command). `ctx` names the batch.
    Propose {
        ctx: u64,
        commands: Vec<Bytes>,
    },
    /// The receiver did not propose the batch `ctx` (not the leader, or
    /// a bound of the leader was reached). Accepted batches get no answer.
    ProposeRefused {
        ctx: u64,
    },
    /// Leadership transfer: campaign now, the leader steps aside.
    TimeoutNow,
    /// The sender's committed membership does not include the receiver:
    /// it was removed. Sent by the host (a leader answering a message
    /// from a node it removed); the core ignores it, the receiving host
    /// stops its node for good.
    Removed,
    /// The leader's state-machine snapshot through `(index, term)` (sent by
    /// the host after [`Action::SendSnapshot`]; the data may travel out of
    /// band, the message is delivered once it arrived whole). Answered with
    /// an `AppendResponse`.
    InstallSnapshot {
        index: Index,
        snapshot_term: Term,
        membership: Membership,
        data: Bytes,
    },
}

/// Why a follower rejected an `Append`, so that the leader backs off a whole
/// term per round trip instead of one index (thesis §5.3 optimisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectHint {
    /// The `prev_index` of the rejected message.
    pub rejected: Index,
    /// The follower's term at `rejected`, if it has that index.
    pub conflict_term: Option<Term>,
    /// With `conflict_term`: the first index of that term in the follower's
    /// log. Without: the follower's last index + 1.
    pub conflict_index: Index,
}

/// What the core asks of its host, in order. The host must carry out
/// `Persist` actions in order, and may run them concurrently with `Send`s
/// that have no `after_persist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make durable, in this order: drop the log from `entries[0].index` on
    /// (when `entries` is non-empty), append `entries`, save `hard_state`.
    /// Report completion with [`crate::Raft::persisted`]`(id)`.
    Persist {
        id: PersistId,
        hard_state: Option<HardState>,
        entries: Vec<Entry>,
    },
    /// Send `msg`; when `after_persist` is set, only once every persist up
    /// to that id is durable (votes, acknowledgements).
    Send {
        msg: Message,
        after_persist: Option<PersistId>,
    },
    /// Committed, locally durable entries to apply, in order. Report with
    /// [`crate::Raft::applied`].
    Apply { entries: Vec<Entry> },
    /// A follower needs entries this node compacted: send it the latest
    /// snapshot (`InstallSnapshot`, at least through `index`). Report a
    /// failure with [`crate::Raft::unreachable`].
    SendSnapshot {
        to: NodeId,
        index: Index,
        membership: Membership,
    },
    /// Restore the state machine from `data` and record the snapshot
    /// durably in the log (replacing it), in order with the persists; then
    /// report [`crate::Raft::persisted`]`(id)`.
    InstallSnapshot {
        id: PersistId,
        index: Index,
        term: Term,
        membership: Membership,
        data: Bytes,
    },
    /// The log through `upto` is covered by a durable snapshot: the host
    /// may compact its stored log (for example the WAL's segments).
    /// Keep `membership` (in force at `upto`) with the snapshot: a restart
    /// passes it back in [`crate::Restored`].
    Compact { upto: Index, membership: Membership },
    /// The read `ctx` (from [`crate::Raft::read_index`]) is linearizable
    /// once this node has applied through `index`.
    ReadReady { ctx: u64, index: Index },
    /// The read `ctx` cannot be served here (leadership changed before it
    /// was confirmed, or a forwarded read got no answer within
    /// `election_ticks_min` ticks); the client may retry.
    ReadFailed { ctx: u64 },
    /// The leader refused the batch `ctx` this node forwarded with
    /// [`crate::Raft::forward`]: none of its commands were proposed.
    ProposeRefused { ctx: u64 },
    /// The role or leader changed (for logs and for routing clients).
    RoleChanged {
        role: Role,
        term: Term,
        leader: Option<NodeId>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Tunables. Times are in ticks: the host calls [`crate::Raft::tick`] at a
/// fixed interval.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    /// The voters of a new cluster (a node restarting takes its membership
    /// from its log and snapshot instead). A node joining an existing
    /// cluster may be absent from it: it learns its membership from the
    /// leader.
    pub voters: Vec<NodeId>,
    /// The election timeout is drawn uniformly from `min..=max` each time
    /// it restarts.
    pub election_ticks_min: u32,
    pub election_ticks_max: u32,
    /// A leader sends heartbeats this often; must be below
    /// `election_ticks_min`.
    pub heartbeat_ticks: u32,
    /// Ask for votes without raising the term first (thesis §9.6).
    pub pre_vote: bool,
    /// A leader that hears from no quorum within an election timeout steps
    /// down, and followers ignore vote requests while they hear from a
    /// leader (thesis §6.2, §9.6).
    pub check_quorum: bool,
    /// AppendEntries messages in flight per follower.
    pub inflight_max: usize,
    /// Entry bytes in flight per follower.
    pub inflight_bytes_max: usize,
    /// Entry bytes per AppendEntries message (at least one entry is sent).
    pub batch_bytes_max: usize,
    /// Entry bytes appended but not yet committed; a proposal past it is
    /// refused with [`crate::ProposeError::Backpressure`].
    pub uncommitted_bytes_max: usize,
    /// Serve reads from a leader lease instead of a heartbeat round each.
    /// Needs `check_quorum` and `pre_vote`: without pre-vote a node cut off
    /// from the leader keeps raising its term, each node that hears it
    /// adopts that term and forgets its leader, and the lease then rests on
    /// the followers' clocks alone. Clock assumption: no two nodes' clock
    /// rates differ by more than `lease_drift_pct` (see
    /// [`crate::Raft::read_index`]).
    pub lease_reads: bool,
    /// The largest difference between two nodes' clock rates, in percent,
    /// that lease reads stay safe under: a lease lasts
    /// [`Config::lease_ticks`] ticks, `election_ticks_min * (100 - d) /
    /// (100 + d)`, so that a leader whose clock runs `d`% slow stops
    /// serving from it before a follower whose clock runs `d`% fast stops
    /// refusing votes.
    pub lease_drift_pct: u32,
    /// A snapshot send not acknowledged within this many ticks is taken as
    /// lost and asked for again (the host should report failures with
    /// `unreachable`; this is the safety net when it could not tell).
    pub snapshot_timeout_ticks: u32,
    /// Reads waiting for confirmation (local and forwarded); more are
    /// refused with [`crate::ReadError::Backpressure`]. A forwarded read
    /// unanswered for `election_ticks_min` ticks is taken as lost and
    /// fails ([`Action::ReadFailed`]), so lost messages free their place.
    pub reads_pending_max: usize,
}

impl Config {
    /// Defaults for a node `id` among `voters`.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Config {
        Config {
            id,
            voters,
            election_ticks_min: 10,
            election_ticks_max: 20,
            heartbeat_ticks: 2,
            pre_vote: true,
            check_quorum: true,
            inflight_max: 256,
            inflight_bytes_max: 32 << 20,
            batch_bytes_max: 1 << 20,
            uncommitted_bytes_max: 64 << 20,
            lease_reads: false,
            lease_drift_pct: 10,
            snapshot_timeout_ticks: 200,
            reads_pending_max: 4096,
        }
    }

    /// How many ticks a lease lasts from the start of the heartbeat round
    /// a quorum confirmed: `election_ticks_min` shortened for a clock-rate
    /// difference of `lease_drift_pct` between leader and follower.
    pub fn lease_ticks(&self) -> u64 {
        let d = u64::from(self.lease_drift_pct.min(99));
        u64::from(self.election_ticks_min) * (100 - d) / (100 + d)
    }

    /// Checks the configuration; the error names the field.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        let err = |field: &'static str, reason: String| Err(crate::ConfigError { field, reason });
        if self.id == 0 {
            return err("id", "node ids start at 1".into());
        }
        if self.voters.contains(&0) {
            return err("voters", "node ids start at 1".into());
        }
        let mut sorted = self.voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.voters.len() {
            return err("voters", "lists a node twice".into());
        }
        if self.election_ticks_min == 0 || self.election_ticks_max < self.election_ticks_min {
            return err(
                "election_ticks_max",
                format!(
                    "need 0 < min <= max, got min {} max {}",
                    self.election_ticks_min, self.election_ticks_max
                ),
            );
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks_min {
            return err(
                "heartbeat_ticks",
                format!(
                    "must be in 1..{} (below election_ticks_min), got {}",
                    self.election_ticks_min, self.heartbeat_ticks
                ),
            );
        }
        if self.inflight_max == 0 {
            return err("inflight_max", "must be at least 1".into());
        }
        if self.inflight_bytes_max == 0 {
            return err("inflight_bytes_max", "must be at least 1".into());
        }
        if self.batch_bytes_max == 0 {
            return err("batch_bytes_max", "must be at least 1".into());
        }
        if self.lease_reads && !self.check_quorum {
            return err("lease_reads", "needs check_quorum".into());
        }
        if self.lease_reads && !self.pre_vote {
            return err(
                "lease_reads",
                "needs pre_vote: without it a partitioned node's rising term makes \
                 the others drop their leader (turn pre_vote on, or lease_reads off)"
                    .into(),
            );
        }
        if self.lease_drift_pct >= 100 {
            return err(
                "lease_drift_pct",
                format!("must be below 100, got {}", self.lease_drift_pct),
            );
        }
        if self.lease_reads && self.lease_ticks() == 0 {
            return err(
                "lease_drift_pct",
                format!(
                    "{}% leaves no lease of election_ticks_min = {} ticks",
                    self.lease_drift_pct, self.election_ticks_min
                ),
            );
        }
        if self.snapshot_timeout_ticks <= self.election_ticks_max {
            return err(
                "snapshot_timeout_ticks",
                format!(
                    "must exceed election_ticks_max ({}), got {}",
                    self.election_ticks_max, self.snapshot_timeout_ticks
                ),
            );
        }
        if self.reads_pending_max == 0 {
            return err("reads_pending_max", "must be at least 1".into());
        }
        if self.uncommitted_bytes_max == 0 {
            return err("uncommitted_bytes_max", "must be at least 1".into());
        }
        Ok(())
    }
}
