//! The Raft state machine: inputs in, actions out.
//!
//! Every public input method runs one *step*: it changes the state, then
//! [`Raft::finish_step`] turns what changed into actions in a fixed order —
//! one `Persist` (new entries and/or hard state), then the messages, then
//! entries to apply. Messages that depend on durable state (votes, vote
//! requests, acknowledgements) carry `after_persist`; a leader's
//! AppendEntries do not, so its disk write and its network sends overlap
//! (thesis §10.2.1), and its own log counts toward a quorum only once the
//! host reports the persist done.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::log::RaftLog;
use crate::planted::planted;
#[cfg(any(test, feature = "testing"))]
use crate::planted::PlantedBug;
use crate::progress::{Progress, ProgressState};
use crate::rng::Rng;
use crate::types::{
    Action, Config, Entry, HardState, Index, Membership, MembershipChange, Message, MessageBody,
    NodeId, Payload, PersistId, RejectHint, Role, Term,
};
use crate::{ConfigError, ProposeError, ReadError, TransferError};

/// Heartbeat rounds kept waiting for confirmation; older ones are dropped
/// (a later round's confirmation covers them).
const ROUNDS_MAX: usize = 1024;

/// A read waiting for a heartbeat round to confirm leadership.
#[derive(Debug, Clone, Copy)]
struct PendingRead {
    ctx: u64,
    /// This node, or the follower that forwarded it.
    from: NodeId,
    index: Index,
    round: u64,
}

/// A read a follower forwarded to the leader, waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct ForwardedRead {
    ctx: u64,
    /// The tick from which the read is taken as lost (its request or its
    /// answer): the host is told to retry.
    expires_at: u64,
}

/// What a node restarts from: its durable hard state and log.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub hard_state: HardState,
    /// Index and term of the entry before `entries` (0, 0 for a log that
    /// starts at 1).
    pub base_index: Index,
    pub base_term: Term,
    pub entries: Vec<Entry>,
    /// The membership in force at `base_index` (from the snapshot); `None`:
    /// the configured voters.
    pub membership: Option<Membership>,
}

#[derive(Debug)]
pub struct Raft {
    cfg: Config,
    rng: Rng,
    role: Role,
    term: Term,
    vote: NodeId,
    leader: Option<NodeId>,
    log: RaftLog,
    /// The latest membership in the log (in force as soon as appended).
    membership: Membership,
    /// Index of the entry that set it; the base index when it comes from
    /// the snapshot or the configuration.
    membership_index: Index,
    /// The membership in force at the log's base.
    base_membership: Membership,
    /// Leader only: every other member.
    progress: BTreeMap<NodeId, Progress>,
    /// Pre-candidate and candidate: the answers so far.
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    election_timeout: u32,
    /// Leader: bytes of entries above the commit index.
    uncommitted_bytes: usize,
    // Persistence bookkeeping.
    next_persist: PersistId,
    durable_persist: PersistId,
    /// The persist that carries the current term and vote (`PersistId::MAX`
    /// from the start of a campaign until `finish_step` hands it out). A
    /// candidate counts its own vote only once it is durable: a sole voter
    /// that led a term on a vote it then lost in a crash would lead that
    /// term again, with another log, and a learner could hold both.
    vote_persist: PersistId,
    /// Persists not yet reported durable that carried entries: (id, last
    /// index, its term).
    persists: VecDeque<(PersistId, Index, Term)>,
    /// The hard state last handed out to persist.
    saved: HardState,
    // This step's output, assembled by `finish_step`.
    step_entries: Vec<Entry>,
    step_msgs: Vec<(Message, bool)>,
    /// Actions that follow this step's messages and applies (reads,
    /// snapshots to send, compaction).
    step_reads: Vec<Action>,
    /// A snapshot to install, ahead of this step's persist.
    step_snapshot: Option<(Index, Term, Bytes)>,
    actions: Vec<Action>,
    /// Ticks since this node started: the clock of leases.
    now: u64,
    /// The tick this node last heard from a leader of its term (an Append,
    /// a heartbeat or a snapshot). For `election_ticks_min` ticks after it
    /// the node grants no vote or pre-vote but a transfer's: the promise a
    /// leader's lease rests on. Kept whatever else changes — term, role,
    /// the leader field — because a message of a higher term that names no
    /// leader ends nothing for the old leader, which may still serve lease
    /// reads. At start with lease reads: tick 0, as if a leader was just
    /// heard (a lease granted before a restart must still hold).
    leader_heard_at: Option<u64>,
    // ---- Reads. Leader: heartbeat rounds confirm leadership.
    read_round: u64,
    round_started_this_step: bool,
    /// Unconfirmed rounds: (round, tick it started).
    rounds: VecDeque<(u64, u64)>,
    /// Highest round each peer answered.
    round_acks: BTreeMap<NodeId, u64>,
    confirmed_round: u64,
    /// Lease reads are served without a round while `now < lease_until`.
    lease_until: u64,
    reads: VecDeque<PendingRead>,
    /// Reads that wait for this leader to commit an entry of its term.
    reads_waiting_commit: Vec<(u64, NodeId)>,
    /// Follower: reads forwarded to the leader, oldest first; each expires
    /// after `election_ticks_min` ticks without an answer.
    reads_forwarded: Vec<ForwardedRead>,
    // ---- Leadership transfer (leader).
    transferee: Option<NodeId>,
    transfer_elapsed: u32,
    /// Set for the rest of the term once a transfer started: lease reads
    /// fall back to heartbeat rounds.
    lease_revoked: bool,
    last_role: (Role, Term, Option<NodeId>),
    /// A known bug a test planted (see [`Raft::plant_bug`]).
    #[cfg(any(test, feature = "testing"))]
    planted: Option<PlantedBug>,
}

impl Raft {
    /// A node starting from `restored` (use `Restored::default()` for a new
    /// one), with its randomness seeded by `seed`.
    pub fn new(cfg: Config, restored: Restored, seed: u64) -> Result<Raft, ConfigError> {
        cfg.validate()?;
        let hs = restored.hard_state;
        let log = RaftLog::restore(
            restored.base_index,
            restored.base_term,
            restored.entries,
            hs.commit,
        );
        let base_membership = restored
            .membership
            .clone()
            .unwrap_or_else(|| Membership::with_voters(cfg.voters.iter().copied()));
        let mut raft = Raft {
            membership: base_membership.clone(),
            membership_index: restored.base_index,
            base_membership,
            rng: Rng::new(seed ^ cfg.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            cfg,
            role: Role::Follower,
            term: hs.term,
            vote: hs.vote,
            leader: None,
            log,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            election_timeout: 0,
            uncommitted_bytes: 0,
            next_persist: 1,
            durable_persist: 0,
            vote_persist: 0,
            persists: VecDeque::new(),
            saved: hs,
            step_entries: Vec::new(),
            step_msgs: Vec::new(),
            step_reads: Vec::new(),
            step_snapshot: None,
            actions: Vec::new(),
            now: 0,
            leader_heard_at: None,
            read_round: 0,
            round_started_this_step: false,
            rounds: VecDeque::new(),
            round_acks: BTreeMap::new(),
            confirmed_round: 0,
            lease_until: 0,
            reads: VecDeque::new(),
            reads_waiting_commit: Vec::new(),
            reads_forwarded: Vec::new(),
            transferee: None,
            transfer_elapsed: 0,
            lease_revoked: false,
            last_role: (Role::Follower, hs.term, None),
            #[cfg(any(test, feature = "testing"))]
            planted: None,
        };
        raft.recompute_membership();
        if raft.cfg.lease_reads {
            raft.leader_heard_at = Some(0);
        }
        raft.reset_election_timeout();
        Ok(raft)
    }

    // ---- Inputs ----------------------------------------------------------

    /// One unit of time passed.
    pub fn tick(&mut self) {
        self.now += 1;
        self.election_elapsed += 1;
        self.expire_forwarded_reads();
        if let Some(to) = self.transferee {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.cfg.election_ticks_min {
                // The target did not take over in time: lead on.
                let _ = to;
                self.transferee = None;
            }
        }
        if self.role == Role::Leader {
            self.retry_lost_snapshots();
            self.heartbeat_elapsed += 1;
            if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
                self.heartbeat_elapsed = 0;
                self.broadcast_heartbeat();
            }
            if self.cfg.check_quorum && self.election_elapsed >= self.cfg.election_ticks_min {
                self.election_elapsed = 0;
                self.check_quorum_active();
            }
        } else if self.election_elapsed >= self.election_timeout {
            if self.can_campaign() {
                self.campaign();
            } else {
                self.reset_election_timeout();
            }
        }
        self.finish_step();
    }

    /// Appends client commands (leader only) and starts replicating them.
    /// Returns the indexes they got.
    pub fn propose(&mut self, commands: Vec<Bytes>) -> Result<(Index, Index), ProposeError> {
        let result = self.propose_commands(commands);
        self.finish_step();
        result
    }

    /// Proposes `commands` through the leader: on the leader, the same as
    /// [`Raft::propose`]; on a follower, sends them to the leader as one
    /// `Propose` batch named `ctx`. The host learns the outcome by applying
    /// them (it recognises its commands by an id inside them), or
    /// [`Action::ProposeRefused`]`{ ctx }` when the leader refused the
    /// batch. A batch lost in flight (the leader crashed or changed) is
    /// never answered: the host bounds its wait.
    pub fn forward(&mut self, ctx: u64, commands: Vec<Bytes>) -> Result<(), ProposeError> {
        let result = match self.role {
            Role::Leader => self.propose_commands(commands).map(|_| ()),
            _ if commands.is_empty() => Err(ProposeError::Empty),
            _ => match self.leader {
                Some(leader) => {
                    self.send(leader, MessageBody::Propose { ctx, commands }, false);
                    Ok(())
                }
                None => Err(ProposeError::NotLeader { leader_hint: None }),
            },
        };
        self.finish_step();
        result
    }

    fn propose_commands(&mut self, commands: Vec<Bytes>) -> Result<(Index, Index), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if commands.is_empty() {
            return Err(ProposeError::Empty);
        }
        if let Some(to) = self.transferee {
            return Err(ProposeError::Transferring { to });
        }
        let first = self.log.last_index() + 1;
        let entries: Vec<Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                index: first + i as u64,
                term: self.term,
                payload: Payload::Normal(c),
            })
            .collect();
        let bytes: usize = entries.iter().map(Entry::size).sum();
        // One batch always fits into an empty window, however large.
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + bytes > self.cfg.uncommitted_bytes_max
        {
            return Err(ProposeError::Backpressure {
                uncommitted_bytes: self.uncommitted_bytes,
                max: self.cfg.uncommitted_bytes_max,
            });
        }
        let last = first + entries.len() as u64 - 1;
        self.append_as_leader(entries);
        self.broadcast_append();
        Ok((first, last))
    }

    /// A message from another node.
    pub fn step(&mut self, msg: Message) {
        if msg.to != self.cfg.id || msg.from == self.cfg.id || msg.from == 0 {
            return;
        }
        self.step_inner(msg);
        self.finish_step();
    }

    /// Every persist up to `id` is durable.
    pub fn persisted(&mut self, id: PersistId) {
        assert!(id < self.next_persist, "persist {id} was never asked for");
        if id <= self.durable_persist {
            return;
        }
        self.durable_persist = id;
        let mut last = None;
        while self.persists.front().is_some_and(|p| p.0 <= id) {
            last = self.persists.pop_front();
        }
        if let Some((_, index, term)) = last {
            self.log.persisted_to(index, term);
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
        if self.role == Role::Candidate {
            // Our own vote may just have become durable.
            self.tally(false);
        }
        self.finish_step();
    }

    /// The host applied entries through `index`.
    pub fn applied(&mut self, index: Index) {
        self.log.applied_to(index);
        self.finish_step();
    }

    /// The host took a durable snapshot of the state machine through
    /// `index` (at most what it applied): entries up to it leave memory and
    /// the host is told it may compact its stored log.
    ///
    /// The membership in force at `index` goes with the snapshot. A node
    /// that joined knowing no membership (no voters configured) learns it
    /// from the first membership entry or snapshot the leader sends; until
    /// its log holds one at or below `index`, the membership there is
    /// unknown to it and the log is not compacted (no `Compact`): the host
    /// keeps its stored log and may snapshot again later.
    pub fn snapshot_taken(&mut self, index: Index) {
        if index > self.log.base().0 {
            // Read before the entries that say it are dropped.
            let membership = self.membership_at(index);
            if membership.voters.is_empty() {
                self.finish_step();
                return;
            }
            self.base_membership = membership;
            self.log.compact_to(index);
            self.step_reads.push(Action::Compact {
                upto: index,
                membership: self.base_membership.clone(),
            });
        }
        self.finish_step();
    }

    /// The transport could not deliver to `peer` (or a snapshot to it
    /// failed): stop streaming to it optimistically and probe again.
    pub fn unreachable(&mut self, peer: NodeId) {
        if let Some(pr) = self.progress.get_mut(&peer) {
            if pr.state != ProgressState::Probe {
                let next = pr.match_index + 1;
                pr.probe_from(next);
            }
        }
        self.finish_step();
    }

    /// Asks for a linearizable read. When [`Action::ReadReady`]`{ ctx,
    /// index }` comes back, the read may be served from the state machine
    /// once it has applied through `index`; [`Action::ReadFailed`] means
    /// retry. On the leader the read index is its commit index, confirmed
    /// by a heartbeat round answered by a quorum (ReadIndex, thesis §6.4)
    /// or, with `lease_reads`, by the lease from the last confirmed round:
    /// followers do not vote for anyone else for `election_ticks_min` ticks
    /// after hearing from the leader, so a round started at tick `t` and
    /// confirmed by a quorum lets the leader serve reads until tick `t +
    /// lease_ticks - 1` ([`crate::Config::lease_ticks`]: shorter than
    /// `election_ticks_min` by the clock-rate difference
    /// `lease_drift_pct` allows, and one tick). A follower forwards the request to the
    /// leader and reports the index it answers (follower reads); an answer
    /// that has not come within `election_ticks_min` ticks is taken as
    /// lost, and the read fails ([`Action::ReadFailed`]).
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ReadError> {
        let result = match self.role {
            Role::Leader => self.leader_read(ctx, self.cfg.id),
            _ => match self.leader {
                Some(leader) => {
                    if self.reads_forwarded.len() >= self.cfg.reads_pending_max {
                        Err(ReadError::Backpressure {
                            pending: self.reads_forwarded.len(),
                            max: self.cfg.reads_pending_max,
                        })
                    } else {
                        self.reads_forwarded.push(ForwardedRead {
                            ctx,
                            expires_at: self.now + u64::from(self.cfg.election_ticks_min),
                        });
                        self.send(leader, MessageBody::ReadIndex { ctx }, false);
                        Ok(())
                    }
                }
                None => Err(ReadError::NoLeader),
            },
        };
        self.finish_step();
        result
    }

    /// Hands leadership to `target`: proposals stop, the target is brought
    /// up to date and told to campaign at once. Gives up after an election
    /// timeout (proposals resume).
    pub fn transfer_leadership(&mut self, target: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if target == self.cfg.id || !self.membership.is_voter(target) {
            return Err(TransferError::NotAVoter(target));
        }
        self.transferee = Some(target);
        self.transfer_elapsed = 0;
        // The target will be voted in by followers that still hear us
        // (TimeoutNow votes ignore leases): our lease no longer holds.
        self.lease_revoked = true;
        self.lease_until = 0;
        if self.progress[&target].match_index == self.log.last_index() {
            self.send(target, MessageBody::TimeoutNow, false);
        } else {
            self.send_append(target);
        }
        self.finish_step();
        Ok(())
    }

    /// Test-only (feature `testing`): runs this core with a known bug, to
    /// show that a harness catches it. `None` (the default) is the correct
    /// core.
    #[cfg(any(test, feature = "testing"))]
    pub fn plant_bug(&mut self, bug: Option<PlantedBug>) {
        self.planted = bug;
    }

    /// The actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    // ---- Read-only state ------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn vote(&self) -> NodeId {
        self.vote
    }
    pub fn commit(&self) -> Index {
        self.log.commit()
    }
    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }
    pub fn persisted_index(&self) -> Index {
        self.log.persisted()
    }
    pub fn log(&self) -> &RaftLog {
        &self.log
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit(),
        }
    }
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        self.progress.get(&peer)
    }
    pub fn uncommitted_bytes(&self) -> usize {
        self.uncommitted_bytes
    }
    /// Reads waiting for confirmation on this node.
    pub fn reads_pending(&self) -> usize {
        self.reads.len() + self.reads_waiting_commit.len() + self.reads_forwarded.len()
    }
    /// The node leadership is being transferred to, if any.
    pub fn transferee(&self) -> Option<NodeId> {
        self.transferee
    }

    /// Asserts the invariants that must hold between steps. Runs after
    /// every step in builds with debug assertions (the test profile), never
    /// in release builds: part of it is O(entries in memory). The
    /// simulation also calls it after every step, whatever the build.
    pub fn check_invariants(&self) {
        self.log.check();
        assert!(self.saved.term <= self.term, "term never goes back");
        assert!(
            self.log.commit() >= self.saved.commit.min(self.log.last_index()),
            "commit never goes back"
        );
        match self.role {
            Role::Leader => {
                assert_eq!(self.leader, Some(self.cfg.id), "a leader leads itself");
                assert_eq!(self.vote, self.cfg.id, "a leader voted for itself");
                let peers: BTreeSet<NodeId> = self.peers().collect();
                assert!(
                    self.progress.keys().copied().eq(peers.iter().copied()),
                    "progress is kept for exactly the other members"
                );
                for (id, pr) in &self.progress {
                    assert!(
                        pr.match_index <= self.log.last_index(),
                        "follower {id} matches beyond the leader's log"
                    );
                    assert!(pr.next > pr.match_index, "next is past match for {id}");
                }
                let uncommitted: usize = (self.log.commit() + 1..=self.log.last_index())
                    .filter_map(|i| self.log.entry(i))
                    .map(Entry::size)
                    .sum();
                assert_eq!(self.uncommitted_bytes, uncommitted, "uncommitted bytes");
            }
            Role::Candidate => {
                assert_eq!(self.vote, self.cfg.id, "a candidate voted for itself");
                assert!(self.can_campaign(), "only voters campaign");
            }
            Role::Follower | Role::PreCandidate => {
                assert!(self.progress.is_empty(), "only a leader tracks progress")
            }
        }
        assert!(self.step_entries.is_empty() && self.step_msgs.is_empty());
    }

    // ---- Steps ----------------------------------------------------------

    fn step_inner(&mut self, msg: Message) {
        if msg.term > self.term {
            match &msg.body {
                // Asking changes nothing; a granted answer is for the term we
                // would campaign in.
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResponse { granted: true } => {}
                MessageBody::Vote { transfer, .. } => {
                    if self.in_lease() && !transfer {
                        // We hear from a leader: this candidate is disruptive
                        // (thesis §4.2.3). Ignore it without adopting its term.
                        return;
                    }
                    self.become_follower(msg.term, None);
                }
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                    self.become_follower(msg.term, Some(msg.from));
                }
                _ => self.become_follower(msg.term, None),
            }
        } else if msg.term < self.term {
            match msg.body {
                // True whatever the term: the sender did not propose the
                // batch. Dropped, the host's writes would wait out their
                // timeout (a forward that crossed a leadership transfer
                // to this node).
                MessageBody::ProposeRefused { ctx } => {
                    self.step_reads.push(Action::ProposeRefused { ctx });
                }
                // A stale leader learns our term and steps down.
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                    self.send(
                        msg.from,
                        MessageBody::AppendResponse {
                            success: false,
                            match_index: 0,
                            reject: None,
                        },
                        true,
                    );
                }
                MessageBody::PreVote { .. } => {
                    self.send(
                        msg.from,
                        MessageBody::PreVoteResponse { granted: false },
                        false,
                    );
                }
                MessageBody::Vote { .. } => {
                    self.send(msg.from, MessageBody::VoteResponse { granted: false }, true);
                }
                MessageBody::ReadIndex { ctx } => {
                    self.send(
                        msg.from,
                        MessageBody::ReadIndexResponse { ctx, index: None },
                        false,
                    );
                }
                MessageBody::Propose { ctx, .. } => {
                    self.send(msg.from, MessageBody::ProposeRefused { ctx }, false);
                }
                _ => {}
            }
            return;
        }

        match msg.body {
            MessageBody::PreVote {
                last_index,
                last_term,
            } => self.on_pre_vote(msg.from, msg.term, last_index, last_term),
            MessageBody::Vote {
                last_index,
                last_term,
                transfer,
            } => self.on_vote(msg.from, last_index, last_term, transfer),
            MessageBody::PreVoteResponse { granted } => {
                if self.role == Role::PreCandidate && msg.term == self.term + 1 {
                    self.votes.insert(msg.from, granted);
                    self.tally(true);
                } else if !granted && msg.term > self.term {
                    self.become_follower(msg.term, None);
                }
            }
            MessageBody::VoteResponse { granted } => {
                if self.role == Role::Candidate {
                    self.votes.insert(msg.from, granted);
                    self.tally(false);
                }
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.follow(msg.from);
                self.on_append(msg.from, prev_index, prev_term, entries, commit);
            }
            MessageBody::Heartbeat { commit, round } => {
                self.follow(msg.from);
                // The leader never sends a commit beyond what we match.
                let commit = commit.min(self.log.last_index());
                self.log.commit_to(commit);
                self.send(msg.from, MessageBody::HeartbeatResponse { round }, false);
            }
            MessageBody::ReadIndex { ctx } => {
                if self.role == Role::Leader {
                    // A refusal is answered to the follower inside.
                    let _ = self.leader_read(ctx, msg.from);
                } else {
                    self.send(
                        msg.from,
                        MessageBody::ReadIndexResponse { ctx, index: None },
                        false,
                    );
                }
            }
            MessageBody::Propose { ctx, commands } => {
                // Proposed only by the leader of this term; never passed on
                // (no forwarding loops): the follower retries elsewhere.
                let accepted = self.role == Role::Leader && self.propose_commands(commands).is_ok();
                if !accepted {
                    self.send(msg.from, MessageBody::ProposeRefused { ctx }, false);
                }
            }
            MessageBody::ProposeRefused { ctx } => {
                self.step_reads.push(Action::ProposeRefused { ctx });
            }
            MessageBody::ReadIndexResponse { ctx, index } => {
                if let Some(pos) = self.reads_forwarded.iter().position(|r| r.ctx == ctx) {
                    self.reads_forwarded.remove(pos);
                    self.step_reads.push(match index {
                        Some(index) => Action::ReadReady { ctx, index },
                        None => Action::ReadFailed { ctx },
                    });
                }
            }
            MessageBody::InstallSnapshot {
                index,
                snapshot_term,
                membership,
                data,
            } => {
                self.follow(msg.from);
                self.on_install_snapshot(msg.from, index, snapshot_term, membership, data);
            }
            // For the host (see its documentation): nothing for the core.
            MessageBody::Removed => {}
            MessageBody::TimeoutNow => {
                // A transfer to a node the membership no longer lets
                // campaign (demoted since it was asked) is void.
                if self.role == Role::Follower
                    && self.leader == Some(msg.from)
                    && self.can_campaign()
                {
                    self.become_candidate_now(true);
                }
            }
            MessageBody::AppendResponse {
                success,
                match_index,
                reject,
            } => {
                if self.role == Role::Leader {
                    self.on_append_response(msg.from, success, match_index, reject);
                }
            }
            MessageBody::HeartbeatResponse { round } => {
                if self.role == Role::Leader {
                    let Some(pr) = self.progress.get_mut(&msg.from) else {
                        return;
                    };
                    pr.recent_active = true;
                    pr.heartbeat_answered(round);
                    if pr.state == ProgressState::Snapshot {
                        if pr.snapshot_probe_due(round) {
                            self.probe_snapshot(msg.from);
                        }
                    } else if pr.match_index < self.log.last_index() {
                        self.send_append(msg.from);
                    }
                    let acked = self.round_acks.entry(msg.from).or_insert(0);
                    *acked = (*acked).max(round);
                    self.confirm_rounds();
                }
            }
        }
    }

    /// A message from the leader of our term.
    fn follow(&mut self, leader: NodeId) {
        if self.role != Role::Follower || self.leader != Some(leader) {
            self.become_follower(self.term, Some(leader));
        }
        self.election_elapsed = 0;
        self.leader_heard_at = Some(self.now);
    }

    // ---- Elections ------------------------------------------------------

    /// The highest value that a majority of every configuration in force
    /// has reached (`value` of each voter): joint consensus needs both.
    fn quorum_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        let of = |set: &BTreeSet<NodeId>| -> u64 {
            if set.is_empty() {
                return u64::MAX;
            }
            let mut v: Vec<u64> = set.iter().map(|&id| value(id)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v[set.len() / 2]
        };
        if planted!(self, JointNewOnly) {
            return of(&self.membership.voters);
        }
        of(&self.membership.voters).min(of(&self.membership.outgoing))
    }

    /// Whether this node alone is a quorum.
    fn sole_voter(&self) -> bool {
        self.quorum_value(|id| u64::from(id == self.cfg.id)) == 1
    }

    /// Whether this node refuses votes and pre-votes (but a transfer's): it
    /// leads, or it heard from a leader less than `election_ticks_min`
    /// ticks ago, whatever happened since (thesis §4.2.3; the promise that
    /// lease reads rest on, see [`Raft::read_index`]).
    fn in_lease(&self) -> bool {
        let window = u64::from(self.cfg.election_ticks_min);
        self.cfg.check_quorum
            && (self.role == Role::Leader
                || self
                    .leader_heard_at
                    .is_some_and(|at| self.now < at + window))
    }

    /// Whether this node may start an election: it votes in its latest
    /// configuration, or that configuration is not known to be committed
    /// and it votes in the one before it. A leader appends a change only
    /// once the previous one committed, so until the latest commits the
    /// one before may still be the cluster's, and this node may be needed
    /// for its quorum (a removed voter that alone holds the change, say).
    /// Votes are still counted in the latest configuration.
    pub fn can_campaign(&self) -> bool {
        self.membership.is_voter(self.cfg.id)
            || (self.membership_index > self.log.commit()
                && self
                    .membership_at(self.membership_index - 1)
                    .is_voter(self.cfg.id))
    }

    fn reset_election_timeout(&mut self) {
        self.election_elapsed = 0;
        self.election_timeout = self
            .rng
            .range(self.cfg.election_ticks_min, self.cfg.election_ticks_max);
    }

    fn campaign(&mut self) {
        if self.cfg.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate();
        }
    }

    /// Common start of a pre-election and an election: no leader, a fresh
    /// timeout, and our own vote counted.
    fn start_campaign(&mut self, role: Role) {
        self.fail_reads();
        self.role = role;
        self.leader = None;
        self.progress.clear();
        self.reset_election_timeout();
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
    }

    fn become_pre_candidate(&mut self) {
        self.start_campaign(Role::PreCandidate);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.voter_peers() {
            self.step_msgs.push((
                Message {
                    from: self.cfg.id,
                    to: peer,
                    term: self.term + 1,
                    body: MessageBody::PreVote {
                        last_index,
                        last_term,
                    },
                },
                false,
            ));
        }
        self.tally(true);
    }

    fn become_candidate(&mut self) {
        self.become_candidate_now(false);
    }

    /// `transfer`: asked by the leader (TimeoutNow), so voters that still
    /// hear it do not ignore us.
    fn become_candidate_now(&mut self, transfer: bool) {
        // Reads fail under the old term (their refusals carry it).
        self.fail_reads();
        self.term += 1;
        self.vote = self.cfg.id;
        self.vote_persist = PersistId::MAX;
        self.start_campaign(Role::Candidate);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.voter_peers() {
            self.send(
                peer,
                MessageBody::Vote {
                    last_index,
                    last_term,
                    transfer,
                },
                true,
            );
        }
        self.tally(false);
    }

    /// Counts the answers of a (pre-)election.
    fn tally(&mut self, pre: bool) {
        // A pre-vote promises nothing; a vote counts once durable.
        let own_counts = pre || self.durable_persist >= self.vote_persist;
        let won = self.quorum_value(|id| {
            u64::from(self.votes.get(&id) == Some(&true) && (id != self.cfg.id || own_counts))
        }) == 1;
        let lost = self.quorum_value(|id| u64::from(self.votes.get(&id) != Some(&false))) == 0;
        if won {
            if pre {
                self.become_candidate();
            } else {
                self.become_leader();
            }
        } else if lost {
            self.become_follower(self.term, None);
        }
    }

    fn on_pre_vote(&mut self, from: NodeId, term: Term, last_index: Index, last_term: Term) {
        let granted =
            term > self.term && !self.in_lease() && self.log.is_up_to_date(last_index, last_term);
        // A grant answers in the term asked about; a refusal in ours.
        let msg = Message {
            from: self.cfg.id,
            to: from,
            term: if granted { term } else { self.term },
            body: MessageBody::PreVoteResponse { granted },
        };
        self.step_msgs.push((msg, false));
    }

    /// `transfer`: the candidate was asked by the leader to campaign
    /// (TimeoutNow), which revoked its lease first: the lease is no reason
    /// to refuse.
    fn on_vote(&mut self, from: NodeId, last_index: Index, last_term: Term, transfer: bool) {
        let can_vote = self.vote == 0 || self.vote == from;
        // A vote of our term may come after a message of that term which
        // named no leader (a stray answer): the leader heard before it may
        // still serve lease reads.
        let granted = can_vote
            && self.leader.is_none()
            && (transfer || !self.in_lease())
            && self.log.is_up_to_date(last_index, last_term);
        if granted {
            self.vote = from;
            self.election_elapsed = 0;
        }
        // The vote must be durable before the answer leaves.
        self.send(from, MessageBody::VoteResponse { granted }, true);
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.fail_reads();
        if term > self.term {
            self.term = term;
            self.vote = 0;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.progress.clear();
        self.votes.clear();
        self.uncommitted_bytes = 0;
        self.reset_election_timeout();
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.transferee = None;
        self.lease_revoked = false;
        self.round_acks.clear();
        self.rounds.clear();
        self.confirmed_round = self.read_round;
        self.lease_until = 0;
        self.leader = Some(self.cfg.id);
        self.votes.clear();
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        let next = self.log.last_index() + 1;
        self.progress = self.peers().map(|p| (p, Progress::new(next))).collect();
        self.uncommitted_bytes = (self.log.commit() + 1..=self.log.last_index())
            .filter_map(|i| self.log.entry(i))
            .map(Entry::size)
            .sum();
        // An entry of our own term lets us commit earlier terms' entries
        // (§5.4.2) and tells followers who leads.
        self.append_as_leader(vec![Entry {
            index: next,
            term: self.term,
            payload: Payload::Noop,
        }]);
        self.broadcast_append();
    }

    /// Steps down when no quorum was heard from within an election timeout.
    fn check_quorum_active(&mut self) {
        let active = self.quorum_value(|id| {
            u64::from(id == self.cfg.id || self.progress.get(&id).is_some_and(|p| p.recent_active))
        });
        for pr in self.progress.values_mut() {
            pr.recent_active = false;
        }
        if active == 0 {
            self.become_follower(self.term, None);
        }
    }

    // ---- Replication ----------------------------------------------------

    fn append_as_leader(&mut self, entries: Vec<Entry>) {
        self.uncommitted_bytes += entries.iter().map(Entry::size).sum::<usize>();
        self.log.append(&entries);
        self.step_entries.extend(entries);
        // A cluster of one commits on its own persist; others need acks.
    }

    fn broadcast_append(&mut self) {
        for peer in self.peers().collect::<Vec<_>>() {
            self.send_append(peer);
        }
    }

    /// Starts a heartbeat round: every follower is asked to answer it.
    fn broadcast_heartbeat(&mut self) {
        self.read_round += 1;
        self.round_started_this_step = true;
        self.rounds.push_back((self.read_round, self.now));
        if self.rounds.len() > ROUNDS_MAX {
            self.rounds.pop_front();
        }
        let (commit, round) = (self.log.commit(), self.read_round);
        for peer in self.peers().collect::<Vec<_>>() {
            let m = self.progress.get(&peer).map_or(0, |p| p.match_index);
            if let Some(pr) = self.progress.get_mut(&peer) {
                pr.commit_sent = pr.commit_sent.max(commit.min(m));
            }
            self.send(
                peer,
                MessageBody::Heartbeat {
                    commit: commit.min(m),
                    round,
                },
                false,
            );
        }
        self.confirm_rounds();
    }

    /// Serves or queues a read for `from` (this node or a follower).
    fn leader_read(&mut self, ctx: u64, from: NodeId) -> Result<(), ReadError> {
        let pending = self.reads.len() + self.reads_waiting_commit.len();
        if pending >= self.cfg.reads_pending_max {
            let err = ReadError::Backpressure {
                pending,
                max: self.cfg.reads_pending_max,
            };
            if from != self.cfg.id {
                self.send(
                    from,
                    MessageBody::ReadIndexResponse { ctx, index: None },
                    false,
                );
            }
            return Err(err);
        }
        // Until an entry of this term commits, the commit index may lag
        // what earlier leaders committed (thesis §6.4 step 1).
        if self.log.term(self.log.commit()) != Some(self.term) {
            self.reads_waiting_commit.push((ctx, from));
            return Ok(());
        }
        let index = self.log.commit();
        let in_lease = self.now < self.lease_until || planted!(self, LeaseUnchecked);
        if self.sole_voter()
            || (self.cfg.lease_reads && in_lease)
            || planted!(self, ReadWithoutRound)
        {
            self.read_ready(ctx, from, index);
            return Ok(());
        }
        if !self.round_started_this_step {
            self.broadcast_heartbeat();
        }
        self.reads.push_back(PendingRead {
            ctx,
            from,
            index,
            round: self.read_round,
        });
        Ok(())
    }

    fn read_ready(&mut self, ctx: u64, from: NodeId, index: Index) {
        if from == self.cfg.id {
            self.step_reads.push(Action::ReadReady { ctx, index });
        } else {
            self.send(
                from,
                MessageBody::ReadIndexResponse {
                    ctx,
                    index: Some(index),
                },
                false,
            );
        }
    }

    /// Confirms the rounds a quorum answered: releases their reads and
    /// extends the lease.
    fn confirm_rounds(&mut self) {
        let confirmed = self.quorum_value(|id| {
            if id == self.cfg.id {
                self.read_round
            } else {
                self.round_acks.get(&id).copied().unwrap_or(0)
            }
        });
        if confirmed <= self.confirmed_round {
            return;
        }
        self.confirmed_round = confirmed;
        while let Some(&(round, started)) = self.rounds.front() {
            if round > confirmed {
                break;
            }
            self.rounds.pop_front();
            if round == confirmed && !self.lease_revoked {
                let lease = started + self.cfg.lease_ticks() - 1;
                self.lease_until = self.lease_until.max(lease);
            }
        }
        while self.reads.front().is_some_and(|r| r.round <= confirmed) {
            let r = self.reads.pop_front().expect("checked");
            self.read_ready(r.ctx, r.from, r.index);
        }
    }

    /// Leadership or the leader changed: pending reads cannot be confirmed.
    fn fail_reads(&mut self) {
        for r in std::mem::take(&mut self.reads) {
            self.read_failed(r.ctx, r.from);
        }
        for (ctx, from) in std::mem::take(&mut self.reads_waiting_commit) {
            self.read_failed(ctx, from);
        }
        for r in std::mem::take(&mut self.reads_forwarded) {
            self.step_reads.push(Action::ReadFailed { ctx: r.ctx });
        }
        self.lease_until = 0;
    }

    /// Forwarded reads unanswered past their deadline were lost on the way
    /// (to the leader or back): they fail, so that the host retries and
    /// they stop counting against `reads_pending_max`. A late answer is
    /// then ignored.
    fn expire_forwarded_reads(&mut self) {
        let now = self.now;
        if !self.reads_forwarded.iter().any(|r| r.expires_at <= now) {
            return;
        }
        let (expired, waiting): (Vec<ForwardedRead>, Vec<ForwardedRead>) =
            std::mem::take(&mut self.reads_forwarded)
                .into_iter()
                .partition(|r| r.expires_at <= now);
        self.reads_forwarded = waiting;
        for r in expired {
            self.step_reads.push(Action::ReadFailed { ctx: r.ctx });
        }
    }

    fn read_failed(&mut self, ctx: u64, from: NodeId) {
        if from == self.cfg.id {
            self.step_reads.push(Action::ReadFailed { ctx });
        } else {
            self.send(
                from,
                MessageBody::ReadIndexResponse { ctx, index: None },
                false,
            );
        }
    }

    /// Sends what the window allows to `peer`: in `Replicate` as many
    /// messages as fit, in `Probe` one (even empty, to find the match).
    fn send_append(&mut self, peer: NodeId) {
        loop {
            // A membership change may have just removed the peer.
            let Some(pr) = self.progress.get(&peer) else {
                return;
            };
            if !pr.can_send(self.cfg.inflight_max, self.cfg.inflight_bytes_max) {
                return;
            }
            let next = pr.next;
            let probing = pr.state == ProgressState::Probe;
            let prev_index = next - 1;
            // Checked before "nothing new to send": a follower whose next
            // entries were compacted needs a snapshot even when idle.
            let Some(prev_term) = self.log.term(prev_index) else {
                // Compacted: only a snapshot can bring this follower on.
                let (base, _) = self.log.base();
                self.progress
                    .get_mut(&peer)
                    .expect("peer has progress")
                    .snapshot_sent(base, self.read_round);
                self.step_reads.push(Action::SendSnapshot {
                    to: peer,
                    index: base,
                    membership: self.base_membership.clone(),
                });
                return;
            };
            let entries = self.log.slice(next, self.cfg.batch_bytes_max);
            if entries.is_empty() && !probing {
                return;
            }
            let bytes: usize = entries.iter().map(Entry::size).sum();
            let last = prev_index + entries.len() as u64;
            let pr = self.progress.get_mut(&peer).expect("peer has progress");
            pr.sent(last, bytes, self.read_round);
            pr.commit_sent = pr.commit_sent.max(self.log.commit().min(last));
            self.send(
                peer,
                MessageBody::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit: self.log.commit(),
                },
                false,
            );
            if probing {
                return;
            }
        }
    }

    fn on_append(
        &mut self,
        leader: NodeId,
        mut prev_index: Index,
        mut prev_term: Term,
        mut entries: Vec<Entry>,
        commit: Index,
    ) {
        // Entries at or below our commit index match by the log matching
        // property: skip them.
        let committed = self.log.commit();
        if prev_index < committed {
            let last = prev_index + entries.len() as u64;
            if last <= committed {
                self.send(
                    leader,
                    MessageBody::AppendResponse {
                        success: true,
                        match_index: last,
                        reject: None,
                    },
                    true,
                );
                return;
            }
            entries.drain(..(committed - prev_index) as usize);
            prev_index = committed;
            prev_term = self.log.term(committed).expect("commit is in the log");
        }
        if self.log.term(prev_index) != Some(prev_term) {
            let reject = if prev_index > self.log.last_index() {
                RejectHint {
                    rejected: prev_index,
                    conflict_term: None,
                    conflict_index: self.log.last_index() + 1,
                }
            } else {
                let term = self.log.term(prev_index).expect("within the log");
                RejectHint {
                    rejected: prev_index,
                    conflict_term: Some(term),
                    conflict_index: self
                        .log
                        .first_index_of_term_at(prev_index)
                        .max(committed + 1),
                }
            };
            self.send(
                leader,
                MessageBody::AppendResponse {
                    success: false,
                    match_index: 0,
                    reject: Some(reject),
                },
                true,
            );
            return;
        }
        let last_new = prev_index + entries.len() as u64;
        let new = self.log.merge(entries);
        let config_touched = new
            .first()
            .is_some_and(|e| e.index <= self.membership_index)
            || new
                .iter()
                .any(|e| matches!(e.payload, Payload::Membership(_)));
        if config_touched {
            self.recompute_membership();
        }
        self.step_entries.extend(new);
        self.log.commit_to(commit.min(last_new));
        // Acknowledged only once durable (the send waits for the persist).
        self.send(
            leader,
            MessageBody::AppendResponse {
                success: true,
                match_index: last_new,
                reject: None,
            },
            true,
        );
    }

    /// Snapshot sends unanswered for `snapshot_timeout_ticks` are sent again.
    fn retry_lost_snapshots(&mut self) {
        let limit = self.cfg.snapshot_timeout_ticks;
        let mut lost = Vec::new();
        for (&id, pr) in self.progress.iter_mut() {
            if pr.state == ProgressState::Snapshot {
                pr.snapshot_ticks += 1;
                if pr.snapshot_ticks >= limit {
                    let next = pr.match_index + 1;
                    pr.probe_from(next);
                    lost.push(id);
                }
            }
        }
        for id in lost {
            self.send_append(id);
        }
    }

    /// A follower in the Snapshot state may have installed the snapshot and
    /// lost its answer: ask with an empty AppendEntries at the snapshot's
    /// index (untracked; a refusal while the transfer runs is ignored).
    fn probe_snapshot(&mut self, peer: NodeId) {
        let Some(pr) = self.progress.get(&peer) else {
            return;
        };
        let index = pr.next - 1;
        if let Some(term) = self.log.term(index) {
            self.send(
                peer,
                MessageBody::Append {
                    prev_index: index,
                    prev_term: term,
                    entries: Vec::new(),
                    commit: self.log.commit().min(index),
                },
                false,
            );
        } else {
            // Compacted past the snapshot being sent: it is obsolete, send
            // the current one.
            let pr = self.progress.get_mut(&peer).expect("peer has progress");
            let next = pr.match_index + 1;
            pr.probe_from(next);
            self.send_append(peer);
        }
    }

    fn on_install_snapshot(
        &mut self,
        leader: NodeId,
        index: Index,
        term: Term,
        membership: Membership,
        data: Bytes,
    ) {
        let commit = self.log.commit();
        let matched = if index <= commit {
            commit
        } else if self.log.term(index) == Some(term) {
            // We hold its last entry: the log through it matches.
            self.log.commit_to(index);
            index
        } else {
            self.log.reset_to_snapshot(index, term);
            self.base_membership = membership;
            self.recompute_membership();
            self.step_snapshot = Some((index, term, data));
            index
        };
        self.send(
            leader,
            MessageBody::AppendResponse {
                success: true,
                match_index: matched,
                reject: None,
            },
            true,
        );
    }

    fn on_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        match_index: Index,
        reject: Option<RejectHint>,
    ) {
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if success {
            if pr.acked(match_index) {
                self.maybe_commit();
                if self.role != Role::Leader {
                    return; // removed by the change that just committed
                }
            }
            if self.transferee == Some(from)
                && self
                    .progress
                    .get(&from)
                    .is_some_and(|p| p.match_index == self.log.last_index())
            {
                self.send(from, MessageBody::TimeoutNow, false);
            }
            self.send_append(from);
            self.send_commit(from);
            return;
        }
        let Some(hint) = reject else {
            return;
        };
        let stale = match pr.state {
            // Below the match: answers an older message. "Too short" for a
            // message inside the window: the follower holds everything up
            // to the match (durably, in this term), and the window's
            // earlier messages fill the gap unless they were lost (or the
            // follower lost their unacknowledged entries in a crash) — the
            // heartbeat stall check or `unreachable` probes again then.
            // Under a transport that reorders, rewinding here would resend
            // the whole window on every reordering.
            ProgressState::Replicate => {
                hint.rejected < pr.match_index
                    || (hint.conflict_term.is_none()
                        && hint.rejected < pr.next
                        && hint.conflict_index > pr.match_index)
            }
            ProgressState::Probe => hint.rejected + 1 != pr.next,
            ProgressState::Snapshot => true,
        };
        if stale {
            return;
        }
        let next = match hint.conflict_term {
            Some(ct) => {
                let idx = self.log.last_index_with_term_at_most(ct, hint.rejected);
                if self.log.term(idx) == Some(ct) {
                    idx + 1
                } else {
                    hint.conflict_index.min(idx + 1)
                }
            }
            None => hint.conflict_index.min(hint.rejected),
        };
        let pr = self.progress.get_mut(&from).expect("checked above");
        pr.probe_from(next.max(1));
        self.send_append(from);
    }

    /// Advances the commit index to the highest entry of this term held
    /// durably by a quorum (the leader's own copy counts once persisted).
    fn maybe_commit(&mut self) {
        let own = if planted!(self, AckBeforePersist) {
            self.log.last_index()
        } else {
            self.log.persisted()
        };
        let n = self.quorum_value(|id| {
            if id == self.cfg.id {
                own
            } else {
                self.progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        let of_this_term = self.log.term(n) == Some(self.term) || planted!(self, CommitEarlierTerm);
        if n > self.log.commit() && of_this_term {
            let old = self.log.commit();
            self.log.commit_to(n);
            let freed: usize = (old + 1..=n)
                .filter_map(|i| self.log.entry(i))
                .map(Entry::size)
                .sum();
            self.uncommitted_bytes -= freed;
            for (ctx, from) in std::mem::take(&mut self.reads_waiting_commit) {
                let _ = self.leader_read(ctx, from);
            }
            if n >= self.membership_index {
                self.membership_committed();
            }
            self.broadcast_commit();
        }
    }

    /// A commit index that moved goes at once to every follower in
    /// `Replicate`, with its next entries or on a heartbeat (see
    /// [`Raft::send_commit`]). The flow of `Append`s is left alone.
    fn broadcast_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        for peer in self.peers().collect::<Vec<_>>() {
            let Some(pr) = self.progress.get(&peer) else {
                continue;
            };
            if pr.state != ProgressState::Replicate {
                continue;
            }
            if pr.next <= last {
                self.send_append(peer);
            }
            self.send_commit(peer);
        }
    }

    /// Tells `peer` the commit index, on a heartbeat of the current round,
    /// when it may use more of it than it was sent: followers apply, and
    /// answer the writes forwarded through them, without waiting for the
    /// next heartbeat.
    fn send_commit(&mut self, peer: NodeId) {
        if self.role != Role::Leader {
            return;
        }
        let (commit, round) = (self.log.commit(), self.read_round);
        let Some(pr) = self.progress.get_mut(&peer) else {
            return;
        };
        let usable = commit.min(pr.match_index);
        if usable <= pr.commit_sent {
            return;
        }
        pr.commit_sent = usable;
        self.send(
            peer,
            MessageBody::Heartbeat {
                commit: usable,
                round,
            },
            false,
        );
    }

    // ---- Membership -----------------------------------------------------

    /// Proposes a membership change (leader only). One change at a time:
    /// the previous one must have committed, and — the guard against the
    /// single-server change bug — this leader must have committed an entry
    /// of its own term first. Returns the index of the change's entry.
    pub fn propose_membership(&mut self, change: MembershipChange) -> Result<Index, ProposeError> {
        self.propose_membership_with(change, None)
    }

    /// [`Raft::propose_membership`], also setting the meta of the member the
    /// change names (`AddLearner`, `AddVoter`, `Update`; `Update` needs
    /// it). Meta of members that are not named is kept; meta of nodes the
    /// change removes is dropped.
    pub fn propose_membership_with(
        &mut self,
        change: MembershipChange,
        meta: Option<Bytes>,
    ) -> Result<Index, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some(to) = self.transferee {
            return Err(ProposeError::Transferring { to });
        }
        if self.membership_index > self.log.commit() || self.membership.is_joint() {
            return Err(ProposeError::ChangePending {
                index: self.membership_index,
            });
        }
        if self.log.term(self.log.commit()) != Some(self.term) {
            return Err(ProposeError::LeaderNotReady);
        }
        let cur = &self.membership;
        let invalid = |r: String| Err(ProposeError::InvalidChange(r));
        let named = match &change {
            MembershipChange::AddLearner(id)
            | MembershipChange::AddVoter(id)
            | MembershipChange::Update(id) => Some(*id),
            MembershipChange::Remove(_) | MembershipChange::Joint { .. } => None,
        };
        if meta.is_some() && named.is_none() {
            return invalid("only an added or updated member's meta can be set".into());
        }
        let mut next = match change {
            MembershipChange::AddLearner(id) => {
                if id == 0 || cur.is_voter(id) || cur.learners.contains(&id) {
                    return invalid(format!("{id} is already a member"));
                }
                let mut m = cur.clone();
                m.learners.insert(id);
                m
            }
            MembershipChange::AddVoter(id) => {
                if id == 0 || cur.voters.contains(&id) {
                    return invalid(format!("{id} is already a voter"));
                }
                let mut m = cur.clone();
                m.learners.remove(&id);
                m.voters.insert(id);
                m
            }
            MembershipChange::Remove(id) => {
                let mut m = cur.clone();
                if !m.voters.remove(&id) && !m.learners.remove(&id) {
                    return invalid(format!("{id} is not a member"));
                }
                if m.voters.is_empty() {
                    return invalid("the last voter cannot be removed".into());
                }
                m
            }
            MembershipChange::Joint { voters, learners } => {
                if voters.is_empty() || voters.contains(&0) || learners.contains(&0) {
                    return invalid("voters must be a non-empty set of node ids".into());
                }
                if voters.iter().any(|v| learners.contains(v)) {
                    return invalid("a node cannot be both voter and learner".into());
                }
                Membership {
                    outgoing: if voters == cur.voters {
                        BTreeSet::new()
                    } else {
                        cur.voters.clone()
                    },
                    voters,
                    learners,
                    meta: cur.meta.clone(),
                }
            }
            MembershipChange::Update(id) => {
                if !cur.members().contains(&id) {
                    return invalid(format!("{id} is not a member"));
                }
                if meta.is_none() {
                    return invalid("an update needs the member's meta".into());
                }
                cur.clone()
            }
        };
        if let (Some(id), Some(meta)) = (named, meta) {
            next.meta.insert(id, meta);
        }
        next.prune_meta();
        let index = self.append_membership(next);
        self.broadcast_append();
        self.finish_step();
        Ok(index)
    }

    /// The membership in force (the latest in the log).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The index of the entry that set [`Raft::membership`] (0 or the
    /// snapshot's index when it came from there): committed once
    /// `commit()` reaches it.
    pub fn membership_index(&self) -> Index {
        self.membership_index
    }

    fn append_membership(&mut self, m: Membership) -> Index {
        let index = self.log.last_index() + 1;
        self.append_as_leader(vec![Entry {
            index,
            term: self.term,
            payload: Payload::Membership(m.clone()),
        }]);
        self.membership = m;
        self.membership_index = index;
        self.sync_progress();
        index
    }

    /// Leader: progress for exactly the other members.
    fn sync_progress(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if self
            .transferee
            .is_some_and(|t| !self.membership.is_voter(t))
        {
            // The target was demoted (leaving a joint configuration, a
            // truncated change): it may not campaign, lead on.
            self.transferee = None;
        }
        let members: BTreeSet<NodeId> = self.peers().collect();
        self.progress.retain(|id, _| members.contains(id));
        let next = self.log.last_index() + 1;
        for id in members {
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(next));
        }
    }

    /// The membership change at `membership_index` committed.
    fn membership_committed(&mut self) {
        if self.membership.is_joint() {
            // Leave the joint configuration on our own (thesis §4.3).
            let mut m = self.membership.clone();
            m.outgoing.clear();
            m.prune_meta();
            self.append_membership(m);
            self.broadcast_append();
        } else if !self.membership.is_voter(self.cfg.id) {
            // Removed: the configuration without us is committed, step
            // down, and ask the most caught-up voter to campaign at once
            // rather than let the rest wait out an election timeout. The
            // commit index goes first (on each peer's ordered stream): the
            // rest learn that the change committed, and apply it, without
            // waiting for the next leader to commit an entry.
            self.broadcast_commit();
            let successor = self
                .progress
                .iter()
                .filter(|(id, _)| self.membership.is_voter(**id))
                .max_by_key(|(id, pr)| (pr.match_index, std::cmp::Reverse(**id)))
                .map(|(id, _)| *id);
            if let Some(to) = successor {
                self.send(to, MessageBody::TimeoutNow, false);
            }
            self.become_follower(self.term, None);
        }
    }

    /// Sets the membership from the latest change in the log, or the base.
    fn recompute_membership(&mut self) {
        let (base, _) = self.log.base();
        let mut i = self.log.last_index();
        while i > base {
            if let Some(Entry {
                payload: Payload::Membership(m),
                ..
            }) = self.log.entry(i)
            {
                self.membership = m.clone();
                self.membership_index = i;
                self.sync_progress();
                return;
            }
            i -= 1;
        }
        self.membership = self.base_membership.clone();
        self.membership_index = base;
        self.sync_progress();
    }

    /// The membership in force at `index` (at or above the base).
    fn membership_at(&self, index: Index) -> Membership {
        let (base, _) = self.log.base();
        let mut i = index.min(self.log.last_index());
        while i > base {
            if let Some(Entry {
                payload: Payload::Membership(m),
                ..
            }) = self.log.entry(i)
            {
                return m.clone();
            }
            i -= 1;
        }
        self.base_membership.clone()
    }

    // ---- Output ---------------------------------------------------------

    /// Every other member (the leader replicates to all of them).
    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.membership
            .members()
            .into_iter()
            .filter(move |&p| p != self.cfg.id)
    }

    /// Every other voter, in either configuration.
    fn voter_peers(&self) -> Vec<NodeId> {
        self.membership
            .all_voters()
            .into_iter()
            .filter(|&p| p != self.cfg.id)
            .collect()
    }

    fn send(&mut self, to: NodeId, body: MessageBody, needs_durable: bool) {
        let needs_durable = needs_durable
            && !(planted!(self, AckBeforePersist)
                && matches!(body, MessageBody::AppendResponse { .. }));
        let msg = Message {
            from: self.cfg.id,
            to,
            term: self.term,
            body,
        };
        self.step_msgs.push((msg, needs_durable));
    }

    /// Turns this step's changes into actions (see the module docs).
    fn finish_step(&mut self) {
        if let Some((index, term, data)) = self.step_snapshot.take() {
            let id = self.next_persist;
            self.next_persist += 1;
            self.persists.push_back((id, index, term));
            self.actions.push(Action::InstallSnapshot {
                id,
                index,
                term,
                membership: self.base_membership.clone(),
                data,
            });
        }
        let hs = self.hard_state();
        let vote_changed = hs.term != self.saved.term || hs.vote != self.saved.vote;
        let entries = std::mem::take(&mut self.step_entries);
        if vote_changed || !entries.is_empty() {
            let id = self.next_persist;
            self.next_persist += 1;
            if let Some(last) = entries.last() {
                self.persists.push_back((id, last.index, last.term));
            }
            if vote_changed {
                self.vote_persist = id;
            }
            let hard_state = (hs != self.saved).then_some(hs);
            self.saved = hs;
            self.actions.push(Action::Persist {
                id,
                hard_state,
                entries,
            });
        }
        let pending =
            (self.durable_persist + 1 < self.next_persist).then_some(self.next_persist - 1);
        for (msg, needs_durable) in std::mem::take(&mut self.step_msgs) {
            self.actions.push(Action::Send {
                msg,
                after_persist: if needs_durable { pending } else { None },
            });
        }
        let apply = self.log.take_to_apply();
        if !apply.is_empty() {
            self.actions.push(Action::Apply { entries: apply });
        }
        self.actions.append(&mut self.step_reads);
        self.round_started_this_step = false;
        let now = (self.role, self.term, self.leader);
        if now != self.last_role {
            self.last_role = now;
            self.actions.push(Action::RoleChanged {
                role: self.role,
                term: self.term,
                leader: self.leader,
            });
        }
        // Not with the `testing` feature alone: `cargo build --release` at
        // the workspace root unifies the features the tests crate asks for
        // into the `skiff` binary, and the log check is O(entries in
        // memory) per step (it took 28% of a loaded leader's loop thread).
        #[cfg(any(test, debug_assertions))]
        self.check_invariants();
    }
}
