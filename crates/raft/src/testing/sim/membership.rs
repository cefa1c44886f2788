//! Membership changes during the faulty phase: random changes, valid or
//! not, proposed to the node believed to lead, each answer checked
//! against the contract; removed nodes stopped and started again when
//! added back.

use super::*;
use crate::MembershipChange;

/// What a proposal must get: `refusals` that apply (any of them is a right
/// answer; `InvalidChange` compared by kind, `ChangePending` by one of
/// `pending_at`), else `Ok` with `next`.
struct Expected {
    refusals: Vec<ProposeError>,
    /// Where the pending change may be said to be: its entry, or, once
    /// compacted away, the log's base (the core may have forgotten the
    /// entry's index: it recomputes the membership from the base after a
    /// truncation).
    pending_at: Vec<Index>,
    next: Option<Membership>,
}

impl Expected {
    fn allows(&self, e: &ProposeError) -> bool {
        self.refusals.iter().any(|r| match (r, e) {
            (ProposeError::InvalidChange(_), ProposeError::InvalidChange(_)) => true,
            (ProposeError::ChangePending { .. }, ProposeError::ChangePending { index }) => {
                self.pending_at.contains(index)
            }
            (r, e) => r == e,
        })
    }
}

impl Sim {
    /// One membership event: mostly a random change proposed to the node
    /// believed to lead (sometimes to another node), sometimes a removed
    /// node stopped.
    pub(super) fn membership_event(&mut self) -> Result<(), Violation> {
        if self.chance(100) {
            self.stop_removed();
            return Ok(());
        }
        let target = match self.leader() {
            Some(l) if !self.chance(100) => l,
            _ => match self.random_up_node() {
                Some(id) => id,
                None => return Ok(()),
            },
        };
        let change = self.random_change(target);
        let expected = self.expected(target, &change);
        let last = self.node(target).raft.last_index();
        self.changes_proposed += 1;
        let result = self
            .node_mut(target)
            .raft
            .propose_membership(change.clone());
        self.fold(&[0x3C, target, result.as_ref().map_or(0, |&i| i)]);
        self.note(|| format!("change {change:?} on {target}: {result:?}"));
        match (result, expected) {
            (Ok(index), Expected { refusals, next, .. }) if refusals.is_empty() => {
                let next = next.expect("no refusal: a valid change");
                self.changes_accepted += 1;
                let raft = &self.node(target).raft;
                let entry = raft.log().entry(index);
                let payload_ok = match entry {
                    Some(Entry {
                        payload: Payload::Membership(m),
                        ..
                    }) => *m == next,
                    _ => false,
                };
                if index != last + 1 || !payload_ok || *raft.membership() != next {
                    return violation!(
                        "node {target} accepted {change:?} at {index} (log was at {last}): its \
                         membership is {:?} with entry {entry:?}; expected {next:?} at {}",
                        raft.membership(),
                        last + 1
                    );
                }
            }
            (Err(e), expected) if expected.allows(&e) => {}
            (result, Expected { refusals, next, .. }) => {
                return violation!(
                    "node {target} answered {change:?} with {result:?}; expected {}",
                    if refusals.is_empty() {
                        format!("Ok with {next:?}")
                    } else {
                        format!("one of {refusals:?}")
                    }
                );
            }
        }
        self.drive(target)
    }

    /// A random change for `target`'s membership: mostly valid, sometimes
    /// not (already a member, not a member, the last voter, empty or
    /// overlapping sets).
    fn random_change(&mut self, target: NodeId) -> MembershipChange {
        let cur = self.node(target).raft.membership().clone();
        let pool: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        let members = cur.members();
        let outside: Vec<NodeId> = pool
            .iter()
            .copied()
            .filter(|id| !members.contains(id))
            .collect();
        let voters: Vec<NodeId> = cur.voters.iter().copied().collect();
        let learners: Vec<NodeId> = cur.learners.iter().copied().collect();
        let mut removable = voters.clone();
        removable.extend(&learners);
        let mut promotable = learners.clone();
        promotable.extend(&outside);
        match self.rng.range(0, 99) {
            0..=19 => match self.pick(&outside) {
                Some(id) if !self.chance(100) => MembershipChange::AddLearner(id),
                _ => MembershipChange::AddLearner(self.pick(&pool).unwrap_or(1)),
            },
            20..=39 => match self.pick(&promotable) {
                Some(id) if !self.chance(100) => MembershipChange::AddVoter(id),
                _ => MembershipChange::AddVoter(self.pick(&voters).unwrap_or(1)),
            },
            40..=59 => match self.pick(&removable) {
                Some(id) if !self.chance(100) => MembershipChange::Remove(id),
                _ => MembershipChange::Remove(self.pick(&outside).unwrap_or(0)),
            },
            60..=91 => {
                // 1..=5 voters from the pool; learners: the current ones and
                // some of the voters left, never a new voter.
                let mut candidates = pool.clone();
                let want = self.rng.range(1, 5.min(pool.len() as u32)) as usize;
                let mut new_voters = BTreeSet::new();
                while new_voters.len() < want {
                    let i = self.rng.range(0, candidates.len() as u32 - 1) as usize;
                    new_voters.insert(candidates.swap_remove(i));
                }
                let mut new_learners: BTreeSet<NodeId> = cur.learners.clone();
                for &v in &cur.voters {
                    if self.chance(300) {
                        new_learners.insert(v);
                    }
                }
                if self.chance(200) {
                    new_learners.clear();
                }
                new_learners.retain(|l| !new_voters.contains(l));
                MembershipChange::Joint {
                    voters: new_voters,
                    learners: new_learners,
                }
            }
            _ => match self.rng.range(0, 3) {
                0 => MembershipChange::Joint {
                    voters: BTreeSet::new(),
                    learners: cur.learners.clone(),
                },
                1 => {
                    let v = self.pick(&pool).unwrap_or(1);
                    MembershipChange::Joint {
                        voters: [v].into(),
                        learners: [v].into(),
                    }
                }
                2 => MembershipChange::AddLearner(0),
                _ => MembershipChange::Joint {
                    voters: [0].into(),
                    learners: BTreeSet::new(),
                },
            },
        }
    }

    fn pick(&mut self, from: &[NodeId]) -> Option<NodeId> {
        if from.is_empty() {
            return None;
        }
        Some(from[self.rng.range(0, from.len() as u32 - 1) as usize])
    }

    /// What `propose_membership(change)` on `id` must answer, per its
    /// documentation: refused when not leader, while transferring, while
    /// the last change is uncommitted or joint, before the leader committed
    /// an entry of its term, or when invalid; else the new membership.
    fn expected(&self, id: NodeId, change: &MembershipChange) -> Expected {
        let node = self.node(id);
        let raft = &node.raft;
        let cur = raft.membership();
        // The shadow log is the core's log (checked every step).
        let (change_index, _) = node.shadow_membership();
        let mut pending_at = vec![change_index];
        if node.shadow_changes.is_empty() {
            pending_at.push(node.shadow_base.0);
        }
        let mut refusals = Vec::new();
        if raft.role() != Role::Leader {
            refusals.push(ProposeError::NotLeader {
                leader_hint: raft.leader(),
            });
        }
        if let Some(to) = raft.transferee() {
            refusals.push(ProposeError::Transferring { to });
        }
        if change_index > raft.commit() || cur.is_joint() {
            refusals.push(ProposeError::ChangePending {
                index: change_index,
            });
        }
        if raft.log().term(raft.commit()) != Some(raft.term()) {
            refusals.push(ProposeError::LeaderNotReady);
        }
        let next = match apply_change(cur, change) {
            Ok(m) => Some(m),
            Err(why) => {
                refusals.push(ProposeError::InvalidChange(why));
                None
            }
        };
        Expected {
            refusals,
            pending_at,
            next,
        }
    }

    /// Stops a random node outside the membership once its removal
    /// committed: outside the latest committed membership (every later
    /// leader holds it), and in no other up node's latest membership (a
    /// change that adds it back may be in a log: it may be needed).
    fn stop_removed(&mut self) {
        let Some(committed) = self.safety.committed_membership(Index::MAX) else {
            return;
        };
        let members = committed.members();
        let outside: Vec<NodeId> =
            self.nodes
                .iter()
                .filter(|n| n.up && !members.contains(&n.id))
                .filter(|n| {
                    !self.nodes.iter().any(|o| {
                        o.up && o.id != n.id && o.raft.membership().members().contains(&n.id)
                    })
                })
                .map(|n| n.id)
                .collect();
        if let Some(id) = self.pick(&outside) {
            self.stop(id);
        }
    }

    /// Stopped nodes that an up node's membership includes again (a
    /// change adding them back is in its log) start from their disks.
    pub(super) fn restart_readded(&mut self) -> Result<(), Violation> {
        let stopped: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.stopped)
            .map(|n| n.id)
            .collect();
        for id in stopped {
            let wanted = self
                .nodes
                .iter()
                .any(|o| o.up && o.raft.membership().members().contains(&id));
            if wanted {
                self.note(|| format!("{id} added back: start it"));
                self.restart(id)?;
            }
        }
        Ok(())
    }

    /// The membership the cluster is taken to be in: the leader's, else
    /// that of the up node with the highest term.
    pub(super) fn reference_membership(&self) -> Membership {
        let node = match self.leader() {
            Some(l) => Some(self.node(l)),
            None => self
                .nodes
                .iter()
                .filter(|n| n.up)
                .max_by_key(|n| (n.raft.term(), n.raft.last_index())),
        };
        node.map(|n| n.raft.membership().clone())
            .unwrap_or_default()
    }

    /// A snapshot through `index` keeps `membership`: it must be the
    /// membership committed there.
    pub(super) fn check_snapshot_membership(
        &self,
        id: NodeId,
        index: Index,
        membership: &Membership,
        what: &str,
    ) -> Result<(), Violation> {
        match self.safety.committed_membership(index) {
            Some(c) if c != membership => violation!(
                "node {id} {what} through {index} keeping membership {membership:?}; the \
                 membership committed there is {c:?}"
            ),
            _ => Ok(()),
        }
    }
}

/// The membership `change` makes of `cur`, or why it is invalid (per
/// [`MembershipChange`]'s documentation).
fn apply_change(cur: &Membership, change: &MembershipChange) -> Result<Membership, String> {
    let mut m = cur.clone();
    match change {
        MembershipChange::AddLearner(id) => {
            if *id == 0 || cur.members().contains(id) {
                return Err(format!("{id} is already a member"));
            }
            m.learners.insert(*id);
        }
        MembershipChange::AddVoter(id) => {
            if *id == 0 || cur.voters.contains(id) {
                return Err(format!("{id} is already a voter"));
            }
            m.learners.remove(id);
            m.voters.insert(*id);
        }
        MembershipChange::Remove(id) => {
            if !m.voters.remove(id) && !m.learners.remove(id) {
                return Err(format!("{id} is not a member"));
            }
            if m.voters.is_empty() {
                return Err("the last voter".into());
            }
        }
        MembershipChange::Joint { voters, learners } => {
            if voters.is_empty() || voters.contains(&0) || learners.contains(&0) {
                return Err("voters empty or node 0".into());
            }
            if voters.iter().any(|v| learners.contains(v)) {
                return Err("both voter and learner".into());
            }
            m = Membership {
                voters: voters.clone(),
                outgoing: if *voters == cur.voters {
                    BTreeSet::new()
                } else {
                    cur.voters.clone()
                },
                learners: learners.clone(),
                meta: cur.meta.clone(),
            };
        }
        MembershipChange::Update(_) => return Err("an update needs the member's meta".into()),
    }
    m.prune_meta();
    Ok(m)
}
