//! What is checked after every step and at the end of a run, and the
//! settling and calm phases that precede the end.

use super::*;

impl Sim {
    /// The checks after every step, on every node that is up: its
    /// invariants, its log against its persists, its membership against
    /// that log, what it holds committed, and whether it leads (election
    /// safety in the membership it campaigned in, leader completeness);
    /// then that commitment is durable. A new leader may be given a short
    /// reign (see [`Sim::maybe_shorten_reign`]).
    pub(super) fn check_step(&mut self) -> Result<(), Violation> {
        let mut elected = Vec::new();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if !node.up {
                continue;
            }
            let id = node.id;
            node.raft.check_invariants();
            let (role, term) = (node.raft.role(), node.raft.term());
            let log = node.raft.log();
            if (log.last_index(), Some(log.last_term()))
                != (
                    node.shadow_base.0 + node.shadow.len() as u64,
                    node.shadow_term(node.shadow_base.0 + node.shadow.len() as u64),
                )
                || log.base() != node.shadow_base
            {
                return violation!(
                    "node {id}: the log ({:?}..={}/{}) is not what its persists described \
                     ({:?}..={:?})",
                    log.base(),
                    log.last_index(),
                    log.last_term(),
                    node.shadow_base,
                    node.shadow.last().map(|e| (e.index, e.term))
                );
            }
            let (_, shadow_membership) = node.shadow_membership();
            if node.raft.membership() != shadow_membership {
                return violation!(
                    "node {id}: its membership {:?} is not the one in force in its log ({:?})",
                    node.raft.membership(),
                    node.shadow_membership()
                );
            }
            let commit = node.raft.commit();
            if commit > node.seen_commit {
                let from = node.seen_commit.max(log.base().0) + 1;
                node.seen_commit = commit;
                for index in from..=commit {
                    let e = log.entry(index).expect("committed entries are in the log");
                    self.safety.committed(id, term, e)?;
                }
            }
            if role == Role::Leader {
                self.safety.leader(id, term)?;
                if node.last_role != (role, term) {
                    // A leader need not be a voter in its membership
                    // (thesis §4.2.2); its votes must be a quorum of it.
                    self.safety.elected(id, term, node.raft.membership())?;
                    self.safety.became_leader(id, term, log)?;
                    elected.push((id, term));
                }
            }
            node.last_role = (role, term);
        }
        for (id, term) in elected {
            self.maybe_shorten_reign(id, term);
        }
        self.check_commitment()?;
        if self.now % LOGS_COMPARE_EVERY == 0 {
            self.compare_logs()?;
        }
        Ok(())
    }

    /// No up node that lacks the highest committed entry could be elected
    /// (see [`Safety::commitment_durable`]). A voter may vote with the log
    /// in its memory or, after a crash, the one on its disk: the less up to
    /// date of the two counts.
    pub(super) fn check_commitment(&self) -> Result<(), Violation> {
        let Some((index, term)) = self.safety.last_committed() else {
            return Ok(());
        };
        let disk_last = |n: &Node| match n.disk_log.last() {
            Some(e) => (e.term, e.index),
            None => (n.disk_base.1, n.disk_base.0),
        };
        let voter_last = |v: NodeId| {
            let n = self.node(v);
            let disk = disk_last(n);
            if n.up {
                let log = n.raft.log();
                disk.min((log.last_term(), log.last_index()))
            } else {
                disk
            }
        };
        for n in self.nodes.iter().filter(|n| n.up) {
            let log = n.raft.log();
            let holds = log.base().0 >= index || log.term(index) == Some(term);
            if holds || !n.raft.can_campaign() {
                continue;
            }
            self.safety.commitment_durable(
                n.id,
                (log.last_term(), log.last_index()),
                n.raft.membership(),
                voter_last,
            )?;
        }
        Ok(())
    }

    /// Log matching, pairwise on the logs as they are now.
    pub(super) fn compare_logs(&self) -> Result<(), Violation> {
        let up: Vec<&Node> = self.nodes.iter().filter(|n| n.up).collect();
        for (i, a) in up.iter().enumerate() {
            for b in &up[i + 1..] {
                Safety::logs_match(a.id, a.raft.log(), b.id, b.raft.log())?;
            }
        }
        Ok(())
    }

    /// Heals, restarts, stops faults and new operations, and runs until the
    /// cluster settled; not settling is a (liveness) failure.
    pub(super) fn settle(&mut self) -> Result<(), Violation> {
        self.settling = true;
        self.clients_stopped = true;
        let in_flight = self.net.len();
        self.note(|| format!("settle: heal, restart, no more faults ({in_flight} in flight)"));
        self.cuts.clear();
        // Stopped nodes stay stopped unless the membership includes them.
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up && !self.nodes[i].stopped {
                self.nodes[i].restart_at = self.now;
            }
        }
        for c in 0..self.clients.len() {
            if let Waiting::Refused { .. } = self.clients[c].waiting {
                self.give_up(c);
            }
        }
        let end = self.now + self.cfg.settle_steps_max;
        while self.now < end {
            self.step()?;
            if self.settled() {
                return Ok(());
            }
        }
        let state: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let progress: Vec<String> = self
                    .nodes
                    .iter()
                    .filter_map(|p| n.raft.progress(p.id).map(|pr| (p.id, pr)))
                    .map(|(p, pr)| {
                        format!(
                            "{p}:{:?} match={} next={} inflight={}",
                            pr.state,
                            pr.match_index,
                            pr.next,
                            pr.inflight_len()
                        )
                    })
                    .collect();
                format!(
                    "{}: up={} stopped={} {:?} t{} leader={:?} base={} last={} commit={} \
                     applied={} pending={} membership={:?} progress=[{}]",
                    n.id,
                    n.up,
                    n.stopped,
                    n.raft.role(),
                    n.raft.term(),
                    n.raft.leader(),
                    n.raft.log().base().0,
                    n.raft.last_index(),
                    n.raft.commit(),
                    n.kv.applied,
                    n.pending.len(),
                    n.raft.membership(),
                    progress.join(", ")
                )
            })
            .collect();
        self.stuck = true;
        violation!(
            "the cluster did not settle within {} steps after healing ({} messages in \
             flight): {}",
            self.cfg.settle_steps_max,
            self.net.len(),
            state.join("; ")
        )
    }

    /// After settling, clients call again for [`SimConfig::calm_steps`]
    /// steps with no faults: the healed cluster serves them (counted in
    /// [`SimReport::calm_ops_ok`]).
    pub(super) fn calm(&mut self) -> Result<(), Violation> {
        self.note(|| "calm: clients call again, no faults".to_string());
        self.clients_stopped = false;
        self.calm_from = Some(self.now);
        let end = self.now + self.cfg.calm_steps;
        while self.now < end {
            self.step()?;
        }
        Ok(())
    }

    /// One leader in a committed, non-joint membership, every member
    /// (voter or learner) following it with its whole log committed and
    /// applied, every client answered. Nodes outside the membership are
    /// exempt.
    pub(super) fn settled(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let l = &self.node(leader);
        let last = l.raft.last_index();
        let m = l.raft.membership();
        let caught_up = |n: &Node| {
            n.up && n.pending.is_empty()
                && n.raft.leader() == Some(leader)
                && n.raft.term() == l.raft.term()
                && n.raft.last_index() == last
                && n.raft.commit() == last
                && n.kv.applied == last
        };
        !m.is_joint()
            && caught_up(l)
            && m.members().into_iter().all(|id| caught_up(self.node(id)))
            && self.clients.iter().all(|c| c.waiting == Waiting::Idle)
    }

    /// After settling: the logs match, every member has the leader's state
    /// machine and membership, and no acknowledged command is missing from
    /// the applied log.
    pub(super) fn final_checks(&mut self) -> Result<(), Violation> {
        self.compare_logs()?;
        let leader = self.leader().expect("settled with a leader");
        let m = self.node(leader).raft.membership().clone();
        let first = &self.node(leader).kv;
        for id in m.members() {
            let n = self.node(id);
            if n.kv != *first {
                return violation!(
                    "state machines differ after settling: leader {leader} {first:?}, node {id} \
                     {:?}",
                    n.kv
                );
            }
            if *n.raft.membership() != m {
                return violation!(
                    "memberships differ after settling: leader {leader} {m:?}, node {id} {:?}",
                    n.raft.membership()
                );
            }
        }
        let applied = first.applied;
        self.final_membership = m;
        for (i, rec) in self.ops.iter().enumerate() {
            if rec.ret.is_none() || rec.read_index {
                continue;
            }
            let index = rec.index.expect("answered log operations have an index");
            let kept = index <= applied
                && self
                    .safety
                    .applied_entry(index)
                    .is_some_and(|e| match &e.payload {
                        Payload::Normal(b) => Command::decode(b)
                            .is_ok_and(|cmd| cmd.client == rec.client && cmd.op == rec.op),
                        _ => false,
                    });
            if !kept {
                return violation!(
                    "acknowledged op {i} (client {} op {} at {index}) is not in the applied log \
                     (applied through {applied})",
                    rec.client,
                    rec.op
                );
            }
        }
        Ok(())
    }
}
