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

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::log::RaftLog;
use crate::progress::{Progress, ProgressState};
use crate::rng::Rng;
use crate::types::{
    Action, Config, Entry, HardState, Index, Message, MessageBody, NodeId, Payload, PersistId,
    RejectHint, Role, Term,
};
use crate::{ConfigError, ProposeError};

/// What a node restarts from: its durable hard state and log.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub hard_state: HardState,
    /// Index and term of the entry before `entries` (0, 0 for a log that
    /// starts at 1).
    pub base_index: Index,
    pub base_term: Term,
    pub entries: Vec<Entry>,
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
    /// Leader only: every other voter.
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
    /// Persists not yet reported durable that carried entries: (id, last
    /// index, its term).
    persists: VecDeque<(PersistId, Index, Term)>,
    /// The hard state last handed out to persist.
    saved: HardState,
    // This step's output, assembled by `finish_step`.
    step_entries: Vec<Entry>,
    step_msgs: Vec<(Message, bool)>,
    actions: Vec<Action>,
    last_role: (Role, Term, Option<NodeId>),
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
        let mut raft = Raft {
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
            persists: VecDeque::new(),
            saved: hs,
            step_entries: Vec::new(),
            step_msgs: Vec::new(),
            actions: Vec::new(),
            last_role: (Role::Follower, hs.term, None),
        };
        raft.reset_election_timeout();
        Ok(raft)
    }

    // ---- Inputs ----------------------------------------------------------

    /// One unit of time passed.
    pub fn tick(&mut self) {
        self.election_elapsed += 1;
        if self.role == Role::Leader {
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
            self.campaign();
        }
        self.finish_step();
    }

    /// Appends client commands (leader only) and starts replicating them.
    /// Returns the indexes they got.
    pub fn propose(&mut self, commands: Vec<Bytes>) -> Result<(Index, Index), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if commands.is_empty() {
            return Err(ProposeError::Empty);
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
        self.finish_step();
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
        self.finish_step();
    }

    /// The host applied entries through `index`.
    pub fn applied(&mut self, index: Index) {
        self.log.applied_to(index);
        self.finish_step();
    }

    /// The transport could not deliver to `peer`: stop streaming to it
    /// optimistically and probe again.
    pub fn unreachable(&mut self, peer: NodeId) {
        if let Some(pr) = self.progress.get_mut(&peer) {
            if pr.state == ProgressState::Replicate {
                let next = pr.match_index + 1;
                pr.probe_from(next);
            }
        }
        self.finish_step();
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

    /// Asserts the invariants that must hold between steps. Runs after
    /// every step in test builds.
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
            Role::Candidate => assert_eq!(self.vote, self.cfg.id, "a candidate voted for itself"),
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
                MessageBody::Vote { .. } => {
                    if self.in_lease() {
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
            } => self.on_vote(msg.from, last_index, last_term),
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
            MessageBody::Heartbeat { commit } => {
                self.follow(msg.from);
                // The leader never sends a commit beyond what we match.
                let commit = commit.min(self.log.last_index());
                self.log.commit_to(commit);
                self.send(msg.from, MessageBody::HeartbeatResponse, false);
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
            MessageBody::HeartbeatResponse => {
                if self.role == Role::Leader {
                    let (max, bytes_max) = (self.cfg.inflight_max, self.cfg.inflight_bytes_max);
                    let Some(pr) = self.progress.get_mut(&msg.from) else {
                        return;
                    };
                    pr.recent_active = true;
                    pr.heartbeat_answered(max, bytes_max);
                    if pr.match_index < self.log.last_index() {
                        self.send_append(msg.from);
                    }
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
    }

    // ---- Elections ------------------------------------------------------

    fn quorum(&self) -> usize {
        self.cfg.voters.len() / 2 + 1
    }

    /// Whether we heard from a leader recently enough to ignore candidates.
    fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && self.leader.is_some_and(|l| l != self.cfg.id)
            && self.election_elapsed < self.cfg.election_ticks_min
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

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.progress.clear();
        self.reset_election_timeout();
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.peers().collect::<Vec<_>>() {
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
        self.role = Role::Candidate;
        self.term += 1;
        self.vote = self.cfg.id;
        self.leader = None;
        self.progress.clear();
        self.reset_election_timeout();
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.peers().collect::<Vec<_>>() {
            self.send(
                peer,
                MessageBody::Vote {
                    last_index,
                    last_term,
                },
                true,
            );
        }
        self.tally(false);
    }

    /// Counts the answers of a (pre-)election.
    fn tally(&mut self, pre: bool) {
        let granted = self.votes.values().filter(|&&g| g).count();
        let rejected = self.votes.len() - granted;
        if granted >= self.quorum() {
            if pre {
                self.become_candidate();
            } else {
                self.become_leader();
            }
        } else if rejected >= self.quorum() {
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

    fn on_vote(&mut self, from: NodeId, last_index: Index, last_term: Term) {
        let can_vote = self.vote == 0 || self.vote == from;
        let granted =
            can_vote && self.leader.is_none() && self.log.is_up_to_date(last_index, last_term);
        if granted {
            self.vote = from;
            self.election_elapsed = 0;
        }
        // The vote must be durable before the answer leaves.
        self.send(from, MessageBody::VoteResponse { granted }, true);
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
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
        let active = 1 + self.progress.values().filter(|p| p.recent_active).count();
        for pr in self.progress.values_mut() {
            pr.recent_active = false;
        }
        if active < self.quorum() {
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

    fn broadcast_heartbeat(&mut self) {
        let commit = self.log.commit();
        for peer in self.peers().collect::<Vec<_>>() {
            let m = self.progress[&peer].match_index;
            self.send(
                peer,
                MessageBody::Heartbeat {
                    commit: commit.min(m),
                },
                false,
            );
        }
    }

    /// Sends what the window allows to `peer`: in `Replicate` as many
    /// messages as fit, in `Probe` one (even empty, to find the match).
    fn send_append(&mut self, peer: NodeId) {
        loop {
            let pr = &self.progress[&peer];
            if !pr.can_send(self.cfg.inflight_max, self.cfg.inflight_bytes_max) {
                return;
            }
            let next = pr.next;
            let probing = pr.state == ProgressState::Probe;
            let entries = self.log.slice(next, self.cfg.batch_bytes_max);
            if entries.is_empty() && !probing {
                return;
            }
            let prev_index = next - 1;
            let prev_term = self
                .log
                .term(prev_index)
                .expect("the log keeps every entry a follower may need");
            let bytes: usize = entries.iter().map(Entry::size).sum();
            let last = prev_index + entries.len() as u64;
            self.progress
                .get_mut(&peer)
                .expect("peer has progress")
                .sent(last, bytes);
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
            }
            self.send_append(from);
            return;
        }
        let Some(hint) = reject else {
            return;
        };
        let stale = match pr.state {
            ProgressState::Replicate => hint.rejected < pr.match_index,
            ProgressState::Probe => hint.rejected + 1 != pr.next,
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
        let mut matched: Vec<Index> = self.progress.values().map(|p| p.match_index).collect();
        matched.push(self.log.persisted());
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let n = matched[self.quorum() - 1];
        if n > self.log.commit() && self.log.term(n) == Some(self.term) {
            let old = self.log.commit();
            self.log.commit_to(n);
            let freed: usize = (old + 1..=n)
                .filter_map(|i| self.log.entry(i))
                .map(Entry::size)
                .sum();
            self.uncommitted_bytes -= freed;
        }
    }

    // ---- Output ---------------------------------------------------------

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.cfg
            .voters
            .iter()
            .copied()
            .filter(move |&p| p != self.cfg.id)
    }

    fn send(&mut self, to: NodeId, body: MessageBody, needs_durable: bool) {
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
        let hs = self.hard_state();
        let vote_changed = hs.term != self.saved.term || hs.vote != self.saved.vote;
        let entries = std::mem::take(&mut self.step_entries);
        if vote_changed || !entries.is_empty() {
            let id = self.next_persist;
            self.next_persist += 1;
            if let Some(last) = entries.last() {
                self.persists.push_back((id, last.index, last.term));
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
        let now = (self.role, self.term, self.leader);
        if now != self.last_role {
            self.last_role = now;
            self.actions.push(Action::RoleChanged {
                role: self.role,
                term: self.term,
                leader: self.leader,
            });
        }
        #[cfg(any(test, debug_assertions, feature = "testing"))]
        self.check_invariants();
    }
}
