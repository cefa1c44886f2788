//! The safety properties of Raft (§5.2–§5.4, Figure 3), checked against
//! what the simulation observes. Every method takes one observation and
//! answers whether it is consistent with everything observed before.
//!
//! This module only judges: it never drives nodes and never repairs state.
//! Its methods are public so that tests can feed it forged observations and
//! see it object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::types::{Entry, Index, Membership, NodeId, Payload, Term};
use crate::RaftLog;

/// A broken safety property, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

macro_rules! violation {
    ($($arg:tt)*) => {
        Err(Violation(format!($($arg)*)))
    };
}
pub(crate) use violation;

/// What was seen so far, over the whole run (restarts included).
#[derive(Debug, Default)]
pub struct Safety {
    /// Election safety: the one leader of each term.
    leaders: BTreeMap<Term, NodeId>,
    /// Log matching: every `(index, term)` seen in any log, with the term of
    /// the entry before it and its payload. By induction on the index, equal
    /// `(index, term)` with equal previous term everywhere means identical
    /// logs up to there.
    entries: HashMap<(Index, Term), (Term, Payload)>,
    /// Entries known committed, with the lowest term of a node seen holding
    /// them committed (at least the term that committed them).
    committed: BTreeMap<Index, (Entry, Term)>,
    /// State machine safety: the entry applied at each index and the
    /// applied-log digest after it.
    applied: BTreeMap<Index, (Entry, u64)>,
    /// Durable votes: (term, voter) → the candidate it voted for.
    votes: HashMap<(Term, NodeId), NodeId>,
    /// The cluster's first membership (before any membership entry), when
    /// known.
    initial: Option<Membership>,
    /// Committed membership entries.
    memberships: BTreeMap<Index, Membership>,
}

impl Safety {
    pub fn new() -> Safety {
        Safety::default()
    }

    /// A cluster that started with `initial` (the membership in force
    /// before the first membership entry).
    pub fn with_initial_membership(initial: Membership) -> Safety {
        Safety {
            initial: Some(initial),
            ..Safety::default()
        }
    }

    /// `node` durably voted for `candidate` in `term`: never for two
    /// candidates in one term.
    pub fn voted(&mut self, node: NodeId, term: Term, candidate: NodeId) -> Result<(), Violation> {
        match *self.votes.entry((term, node)).or_insert(candidate) {
            other if other != candidate => violation!(
                "election safety: node {node} voted for {other} and for {candidate} in term {term}"
            ),
            _ => Ok(()),
        }
    }

    /// `node` became leader of `term` in `membership` (the one it campaigned
    /// in): a majority of its voters, and of the outgoing voters while
    /// joint, durably voted for it — its own vote too: a leader whose vote
    /// a crash could lose may lead the same term twice.
    pub fn elected(
        &self,
        node: NodeId,
        term: Term,
        membership: &Membership,
    ) -> Result<(), Violation> {
        let quorum = |set: &BTreeSet<NodeId>| {
            let yes = set
                .iter()
                .filter(|&&v| self.votes.get(&(term, v)) == Some(&node))
                .count();
            2 * yes > set.len()
        };
        let ok = quorum(&membership.voters)
            && (membership.outgoing.is_empty() || quorum(&membership.outgoing));
        if ok {
            return Ok(());
        }
        let votes: Vec<NodeId> = membership
            .members()
            .into_iter()
            .filter(|&v| self.votes.get(&(term, v)) == Some(&node))
            .collect();
        violation!(
            "election safety: node {node} leads term {term} in {membership:?} with durable \
             votes from {votes:?} only"
        )
    }

    /// `node` is leader in `term` (election safety: one leader per term).
    pub fn leader(&mut self, node: NodeId, term: Term) -> Result<(), Violation> {
        match self.leaders.insert(term, node) {
            Some(other) if other != node => {
                violation!("election safety: nodes {other} and {node} both led term {term}")
            }
            _ => Ok(()),
        }
    }

    /// Distinct leaders seen, one per term.
    pub fn leaders(&self) -> usize {
        self.leaders.len()
    }

    /// `entry` is in `node`'s log, following an entry of `prev_term` (the
    /// base term at the start of the log, 0 before index 1).
    pub fn appended(
        &mut self,
        node: NodeId,
        prev_term: Term,
        entry: &Entry,
    ) -> Result<(), Violation> {
        match self.entries.get(&(entry.index, entry.term)) {
            None => {
                self.entries.insert(
                    (entry.index, entry.term),
                    (prev_term, entry.payload.clone()),
                );
                Ok(())
            }
            Some((prev, payload)) if *prev == prev_term && *payload == entry.payload => Ok(()),
            Some((prev, payload)) => violation!(
                "log matching: node {node} has entry {}/{} = {:?} after term {prev_term}, \
                 seen before as {payload:?} after term {prev}",
                entry.index,
                entry.term,
                entry.payload
            ),
        }
    }

    /// `node`, in `term`, holds `entry` committed.
    pub fn committed(&mut self, node: NodeId, term: Term, entry: &Entry) -> Result<(), Violation> {
        match self.committed.get_mut(&entry.index) {
            None => {
                self.committed.insert(entry.index, (entry.clone(), term));
                if let Payload::Membership(m) = &entry.payload {
                    self.membership_committed(node, entry.index, m)?;
                }
                Ok(())
            }
            Some((seen, _)) if seen != entry => violation!(
                "committed entries differ at {}: node {node} has {entry:?}, seen {seen:?}",
                entry.index
            ),
            Some((_, t)) => {
                *t = (*t).min(term);
                Ok(())
            }
        }
    }

    /// A membership committed at `index`: the committed memberships before
    /// and after it differ from it by at most one voter, or enter or leave
    /// a joint configuration (thesis §4.1, §4.3).
    fn membership_committed(
        &mut self,
        node: NodeId,
        index: Index,
        m: &Membership,
    ) -> Result<(), Violation> {
        self.memberships.insert(index, m.clone());
        let prev = self
            .memberships
            .range(..index)
            .next_back()
            .map(|(&i, m)| (i, m))
            .or(self.initial.as_ref().map(|m| (0, m)));
        let next = self
            .memberships
            .range(index + 1..)
            .next()
            .map(|(&i, m)| (i, m));
        let pairs = [prev.map(|p| (p, (index, m))), next.map(|n| ((index, m), n))];
        for ((ia, a), (ib, b)) in pairs.into_iter().flatten() {
            if let Err(why) = membership_step(a, b) {
                return violation!(
                    "membership safety: node {node} holds committed {b:?} at {ib} after \
                     committed {a:?} at {ia}: {why}"
                );
            }
        }
        Ok(())
    }

    /// The membership committed at `index`: the latest committed membership
    /// entry at or before it, else the initial one (`None` when not known).
    pub fn committed_membership(&self, index: Index) -> Option<&Membership> {
        self.memberships
            .range(..=index)
            .next_back()
            .map(|(_, m)| m)
            .or(self.initial.as_ref())
    }

    /// Highest index seen committed.
    pub fn commit_max(&self) -> Index {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// The highest entry seen committed: (index, term).
    pub fn last_committed(&self) -> Option<(Index, Term)> {
        self.committed
            .iter()
            .next_back()
            .map(|(&i, (e, _))| (i, e.term))
    }

    /// Commitment is durable (the invariant behind leader completeness, in
    /// a form that holds in every state, not only when an election
    /// happens): `candidate` lacks the highest committed entry and its log
    /// ends at `last` (term, index); it must not be able to collect a
    /// quorum of `membership` (of each configuration while joint) whose
    /// logs are no more up to date than its own — each voter judged by
    /// `voter_last`, the least up-to-date log it may vote with (after a
    /// crash: what is on its disk). A correct cluster commits only what a
    /// quorum holds durably behind an entry of the committing term, so any
    /// quorum has a voter that refuses. Found before any election happens:
    /// the Figure 8 state, and entries committed on copies a crash loses.
    pub fn commitment_durable(
        &self,
        candidate: NodeId,
        last: (Term, Index),
        membership: &Membership,
        voter_last: impl Fn(NodeId) -> (Term, Index),
    ) -> Result<(), Violation> {
        let Some((index, term)) = self.last_committed() else {
            return Ok(());
        };
        let granting = |set: &BTreeSet<NodeId>| -> Vec<NodeId> {
            set.iter()
                .copied()
                .filter(|&v| v == candidate || voter_last(v) <= last)
                .collect()
        };
        let voters = granting(&membership.voters);
        let outgoing = granting(&membership.outgoing);
        let elected = 2 * voters.len() > membership.voters.len()
            && (membership.outgoing.is_empty() || 2 * outgoing.len() > membership.outgoing.len());
        if elected {
            return violation!(
                "commitment: node {candidate} lacks committed entry {index}/{term}, its log ends \
                 at {}/{}, and could be elected in {membership:?} by {voters:?} {outgoing:?}, \
                 whose logs are no more up to date",
                last.1,
                last.0
            );
        }
        Ok(())
    }

    /// `node` just became leader of `term` with `log` (leader completeness:
    /// it holds every entry committed in an earlier term).
    pub fn became_leader(&self, node: NodeId, term: Term, log: &RaftLog) -> Result<(), Violation> {
        let (base, base_term) = log.base();
        for (&index, (entry, commit_term)) in self.committed.range(base..) {
            if *commit_term >= term {
                continue;
            }
            let held = if index == base {
                (base_term == entry.term).then_some(entry)
            } else {
                log.entry(index)
            };
            if held != Some(entry) {
                return violation!(
                    "leader completeness: node {node} leads term {term} without entry {index} \
                     committed by term {commit_term} ({entry:?}); it has {:?}",
                    log.entry(index)
                );
            }
        }
        Ok(())
    }

    /// `node` applied `entry`, reaching `digest` (state machine safety: the
    /// same entry at each index on every node).
    pub fn applied(&mut self, node: NodeId, entry: &Entry, digest: u64) -> Result<(), Violation> {
        match self.applied.get(&entry.index) {
            None => {
                self.applied.insert(entry.index, (entry.clone(), digest));
                Ok(())
            }
            Some((seen, d)) if seen == entry && *d == digest => Ok(()),
            Some((seen, _)) if seen == entry => violation!(
                "state machine safety: node {node} applied {} with a different log before it",
                entry.index
            ),
            Some((seen, _)) => violation!(
                "state machine safety: node {node} applied {entry:?} at {}, another node {seen:?}",
                entry.index
            ),
        }
    }

    /// The entry applied at `index`, if any node applied it.
    pub fn applied_entry(&self, index: Index) -> Option<&Entry> {
        self.applied.get(&index).map(|(e, _)| e)
    }

    /// `node` installed a snapshot through `index` whose state machine
    /// reached `digest`: it must be what applying the log gave.
    pub fn snapshot(&self, node: NodeId, index: Index, digest: u64) -> Result<(), Violation> {
        match self.applied.get(&index) {
            Some((_, d)) if *d == digest => Ok(()),
            Some(_) => violation!(
                "state machine safety: node {node} installed a snapshot through {index} \
                 that differs from the applied log"
            ),
            None => violation!(
                "node {node} installed a snapshot through {index}, which no node applied"
            ),
        }
    }

    /// Log matching between two logs now: where they hold the same term at
    /// an index, they hold the same entries up to it (as far as both still
    /// hold entries).
    pub fn logs_match(a: NodeId, la: &RaftLog, b: NodeId, lb: &RaftLog) -> Result<(), Violation> {
        let lo = la.base().0.max(lb.base().0);
        let mut hi = la.last_index().min(lb.last_index());
        while hi > lo && la.term(hi) != lb.term(hi) {
            hi -= 1;
        }
        if la.term(hi) != lb.term(hi) {
            // No index where both hold the same term: nothing to compare.
            return Ok(());
        }
        for i in (lo..=hi).rev() {
            let differ = if i == lo {
                la.term(i) != lb.term(i)
            } else {
                la.entry(i) != lb.entry(i)
            };
            if differ {
                return violation!(
                    "log matching: nodes {a} and {b} agree on term {:?} at {hi} but differ at \
                     {i}: {:?} vs {:?}",
                    la.term(hi),
                    la.entry(i),
                    lb.entry(i)
                );
            }
        }
        Ok(())
    }
}

/// Whether `b` may follow `a` in the log (both committed, consecutive):
/// learners change freely; voters by at most one outside joint
/// consensus; a joint configuration is entered from its outgoing voters
/// and left for its incoming ones.
pub fn membership_step(a: &Membership, b: &Membership) -> Result<(), String> {
    if b.voters.is_empty() {
        return Err("no voters".into());
    }
    // An outgoing voter may already be a learner (demoted when the joint
    // configuration is left).
    if b.voters.iter().any(|v| b.learners.contains(v)) {
        return Err("a node is both voter and learner".into());
    }
    match (a.is_joint(), b.is_joint()) {
        (false, false) => {
            let changed = a.voters.symmetric_difference(&b.voters).count();
            if changed > 1 {
                return Err(format!("{changed} voters changed at once"));
            }
        }
        (false, true) => {
            if b.outgoing != a.voters {
                return Err("the joint configuration does not leave the voters in force".into());
            }
        }
        (true, false) => {
            if b.voters != a.voters {
                return Err("leaving the joint configuration for other voters".into());
            }
        }
        (true, true) => return Err("a joint configuration follows another".into()),
    }
    Ok(())
}
