//! The simulated disks and host: persists that complete late and in
//! order, what survives a crash, restarts from it, and snapshots.

use super::*;

impl Sim {
    /// Queues a persist of `id`: it may complete after a random delay, and
    /// after the ones before it.
    pub(super) fn queue_persist(&mut self, id: NodeId, pid: PersistId, write: Write) {
        let delay = u64::from(self.rng.range(0, self.knobs.persist_delay_max));
        let node = &mut self.nodes[(id - 1) as usize];
        let after = node.pending.back().map_or(0, |p| p.ready_at);
        node.pending.push_back(Persist {
            id: pid,
            ready_at: after.max(self.now + delay),
            write,
        });
    }

    /// The leader sent `id` a snapshot: restore the state machine from it
    /// now, and make it durable in order with the persists.
    pub(super) fn install_snapshot(
        &mut self,
        id: NodeId,
        pid: PersistId,
        index: Index,
        term: Term,
        membership: Membership,
        data: &[u8],
    ) -> Result<(), Violation> {
        let kv = Kv::decode(data).map_err(Violation)?;
        if kv.applied != index {
            return violation!(
                "node {id} asked to install a snapshot through {index} holding {}",
                kv.applied
            );
        }
        self.safety.snapshot(id, index, kv.digest)?;
        self.check_snapshot_membership(id, index, &membership, "installs a snapshot")?;
        self.snapshots_installed += 1;
        let snapshot = Snapshot {
            index,
            term,
            membership,
            kv: kv.clone(),
        };
        let node = self.node_mut(id);
        if let Some(e) = node.to_apply.iter().find(|e| e.index > index) {
            return violation!(
                "node {id} installs a snapshot through {index} with entry {} handed out to apply",
                e.index
            );
        }
        // The snapshot covers what was handed out and not yet applied.
        node.to_apply.clear();
        node.kv = kv;
        node.snapshot = Some(snapshot.clone());
        node.shadow_base = (index, term);
        node.shadow.clear();
        node.shadow_base_membership = (index, snapshot.membership.clone());
        node.shadow_changes.clear();
        self.queue_persist(id, pid, Write::Snapshot(snapshot));
        self.serve_reads(id);
        Ok(())
    }

    /// The log through `upto` is covered by the disk's snapshot: drop it
    /// from the disk (and the shadow log). `membership`, kept with the
    /// snapshot, must be the one in force at `upto`: per the log this node
    /// persisted, and per the committed log.
    pub(super) fn compact(
        &mut self,
        id: NodeId,
        upto: Index,
        membership: Membership,
    ) -> Result<(), Violation> {
        self.check_snapshot_membership(id, upto, &membership, "compacts")?;
        let node = self.node_mut(id);
        if upto > node.shadow_base.0 {
            let in_force = node
                .shadow_changes
                .iter()
                .rev()
                .find(|(i, _)| *i <= upto)
                .unwrap_or(&node.shadow_base_membership)
                .clone();
            if in_force.1 != membership {
                return violation!(
                    "node {id} compacts through {upto} keeping membership {membership:?}; its \
                     log has {:?} in force there",
                    in_force.1
                );
            }
            node.shadow_changes.retain(|(i, _)| *i > upto);
            node.shadow_base_membership = in_force;
        }
        let Some(s) = node.disk_snapshot.as_mut().filter(|s| s.index >= upto) else {
            return violation!("node {id} asked to compact through {upto} without a snapshot");
        };
        if s.index == upto {
            s.membership = membership.clone();
        }
        if let Some(s) = node.snapshot.as_mut().filter(|s| s.index == upto) {
            s.membership = membership;
        }
        if upto > node.disk_base.0 {
            let n = ((upto - node.disk_base.0) as usize).min(node.disk_log.len());
            let term = match node.disk_log[..n].last() {
                Some(e) if e.index == upto => e.term,
                _ => {
                    return violation!("node {id} compacts through {upto}, beyond its durable log")
                }
            };
            node.disk_log.drain(..n);
            node.disk_base = (upto, term);
        }
        if upto > node.shadow_base.0 {
            let n = ((upto - node.shadow_base.0) as usize).min(node.shadow.len());
            let term = node.shadow_term(upto).unwrap_or(0);
            node.shadow.drain(..n);
            node.shadow_base = (upto, term);
        }
        Ok(())
    }

    /// Mirrors a persist's entries into `id`'s shadow log and checks each
    /// new entry against every log seen (log matching).
    pub(super) fn shadow_replace(
        &mut self,
        id: NodeId,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let node = &mut self.nodes[(id - 1) as usize];
        let (base, _) = node.shadow_base;
        if first.index <= base || first.index > base + node.shadow.len() as u64 + 1 {
            return violation!(
                "node {id} persists entries from {} onto a log of {}..={}",
                first.index,
                base + 1,
                base + node.shadow.len() as u64
            );
        }
        node.shadow.truncate((first.index - base - 1) as usize);
        node.shadow_changes.retain(|(i, _)| *i < first.index);
        for e in entries {
            let prev = node.shadow_term(e.index - 1).expect("contiguous");
            if e.index != base + node.shadow.len() as u64 + 1 {
                return violation!(
                    "node {id} persists non-contiguous entries: {:?}",
                    span(entries)
                );
            }
            self.safety.appended(id, prev, e)?;
            if let Payload::Membership(m) = &e.payload {
                node.shadow_changes.push((e.index, m.clone()));
            }
            node.shadow.push(e.clone());
        }
        Ok(())
    }

    /// Some of the oldest ready persists of a node complete, in order.
    pub(super) fn complete_persists(&mut self) -> Result<(), Violation> {
        let now = self.now;
        let ready: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.up && n.pending.front().is_some_and(|p| p.ready_at <= now))
            .map(|n| n.id)
            .collect();
        let id = ready[self.rng.range(0, ready.len() as u32 - 1) as usize];
        let n_ready = self
            .node(id)
            .pending
            .iter()
            .take_while(|p| p.ready_at <= now)
            .count();
        let count = self.rng.range(1, n_ready as u32) as usize;
        let mut last = 0;
        for _ in 0..count {
            let p = self.node_mut(id).pending.pop_front().expect("counted");
            last = p.id;
            self.write_disk(id, p.write)?;
        }
        self.fold(&[0xB0, id, last]);
        self.note(|| format!("persisted {id} through #{last}"));
        let node = self.node_mut(id);
        node.durable_id = last;
        let (ready_msgs, held): (Vec<_>, Vec<_>) =
            node.held.drain(..).partition(|(p, _)| *p <= last);
        node.held = held;
        for (_, msg) in ready_msgs {
            self.send(msg);
        }
        self.node_mut(id).raft.persisted(last);
        self.drive(id)
    }

    /// Makes one persist durable on the disk, exactly as the contract says:
    /// truncate from the first entry, append, save the hard state.
    pub(super) fn write_disk(&mut self, id: NodeId, write: Write) -> Result<(), Violation> {
        if let Write::Log {
            hard_state: Some(hs),
            ..
        } = &write
        {
            if hs.vote != 0 {
                self.safety.voted(id, hs.term, hs.vote)?;
            }
        }
        let node = self.node_mut(id);
        match write {
            Write::Log {
                hard_state,
                entries,
            } => {
                if let Some(first) = entries.first() {
                    let (base, _) = node.disk_base;
                    let len = node.disk_log.len() as u64;
                    if first.index <= base || first.index > base + len + 1 {
                        return violation!(
                            "node {id} writes entries from {} onto a disk log of {}..={}",
                            first.index,
                            base + 1,
                            base + len
                        );
                    }
                    node.disk_log.truncate((first.index - base - 1) as usize);
                    node.disk_log.extend(entries);
                }
                if let Some(hs) = hard_state {
                    node.disk_hs = hs;
                }
            }
            Write::Snapshot(s) => {
                node.disk_log.clear();
                node.disk_base = (s.index, s.term);
                node.disk_snapshot = Some(s);
            }
        }
        Ok(())
    }

    /// The host of a random node snapshots its state machine, if it applied
    /// far enough beyond its last snapshot.
    pub(super) fn snapshot_event(&mut self) -> Result<(), Violation> {
        let (Some(gap), Some(id)) = (self.knobs.snapshot_gap, self.random_up_node()) else {
            return Ok(());
        };
        let node = self.node(id);
        let index = node.raft.log().applied();
        let installing = node
            .pending
            .iter()
            .any(|p| matches!(p.write, Write::Snapshot(_)));
        if installing || index < node.raft.log().base().0 + gap {
            return Ok(());
        }
        if node.kv.applied != index {
            return violation!(
                "node {id}: the core counts {index} applied, the state machine {}",
                node.kv.applied
            );
        }
        let term = node
            .raft
            .log()
            .term(index)
            .expect("applied entries are in the log");
        let snapshot = Snapshot {
            index,
            term,
            // In force at `index` per its log (the core says so again
            // with `Compact`, checked there).
            membership: node.shadow_membership_at(index).clone(),
            kv: node.kv.clone(),
        };
        self.fold(&[0x50, id, index]);
        self.note(|| format!("snapshot {id} at {index}/{term}"));
        self.snapshots_taken += 1;
        let node = self.node_mut(id);
        node.disk_snapshot = Some(snapshot.clone());
        node.snapshot = Some(snapshot);
        node.raft.snapshot_taken(index);
        self.drive(id)
    }

    /// `id` crashes: what was not durable is lost (pending persists, held
    /// messages, the state machine); it restarts later.
    pub(super) fn crash(&mut self, id: NodeId) {
        let restart_at = self.now + u64::from(self.rng.range(0, 400));
        self.crash_until(id, restart_at);
    }

    /// `id` crashes and restarts from its disk at step `restart_at`.
    pub(super) fn crash_until(&mut self, id: NodeId, restart_at: u64) {
        self.crashes += 1;
        self.fold(&[0xCC, id, restart_at]);
        self.note(|| format!("crash {id} until {restart_at}"));
        self.go_down(id, restart_at);
    }

    /// `id` (removed from the membership) is stopped: it starts again from
    /// its disk only if it is added back.
    pub(super) fn stop(&mut self, id: NodeId) {
        self.fold(&[0x5D, id]);
        self.note(|| format!("stop {id} (removed)"));
        self.go_down(id, u64::MAX);
        self.node_mut(id).stopped = true;
    }

    fn go_down(&mut self, id: NodeId, restart_at: u64) {
        let lie = if self.cfg.lying_disk {
            self.rng.range(1, 3) as usize
        } else {
            0
        };
        let node = self.node_mut(id);
        node.up = false;
        node.restart_at = restart_at;
        node.life += 1;
        node.pending.clear();
        node.held.clear();
        node.kv = Kv::default();
        node.to_apply.clear();
        if lie > 0 {
            let keep = node.disk_log.len().saturating_sub(lie);
            node.disk_log.truncate(keep);
            node.disk_hs.vote = 0;
        }
        for c in 0..self.clients.len() {
            if self.clients[c].waiting.node() == Some(id) {
                self.give_up(c);
            }
        }
    }

    /// `id` restarts from its disk: snapshot, log after it, hard state. The
    /// state machine restarts from the snapshot and the core applies the
    /// rest again.
    pub(super) fn restart(&mut self, id: NodeId) -> Result<(), Violation> {
        let seed = self.rng.next_u64();
        let planted = self.cfg.planted;
        self.fold(&[0xAA, id]);
        self.note(|| format!("restart {id}"));
        let node = self.node_mut(id);
        let snapshot = node
            .disk_snapshot
            .clone()
            .filter(|s| s.index == node.disk_base.0);
        if node.disk_base.0 > 0 && snapshot.is_none() {
            return violation!(
                "node {id}: its disk log starts after {:?} with no snapshot there",
                node.disk_base
            );
        }
        let restored = Restored {
            hard_state: node.disk_hs,
            base_index: node.disk_base.0,
            base_term: node.disk_base.1,
            entries: node.disk_log.clone(),
            membership: snapshot.as_ref().map(|s| s.membership.clone()),
        };
        node.raft = Raft::new(node.cfg.clone(), restored, seed)
            .map_err(|e| Violation(format!("node {id} cannot restart: {e}")))?;
        node.raft.plant_bug(planted);
        node.up = true;
        node.stopped = false;
        node.durable_id = 0;
        node.kv = snapshot.as_ref().map(|s| s.kv.clone()).unwrap_or_default();
        node.shadow_base_membership = match &snapshot {
            Some(s) => (s.index, s.membership.clone()),
            None => (0, Membership::with_voters(node.cfg.voters.iter().copied())),
        };
        node.shadow_changes = node
            .disk_log
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::Membership(m) => Some((e.index, m.clone())),
                _ => None,
            })
            .collect();
        node.snapshot = snapshot;
        node.shadow_base = node.disk_base;
        node.shadow = node.disk_log.clone();
        node.seen_commit = node.disk_base.0;
        node.last_role = (Role::Follower, node.disk_hs.term);
        self.drive(id)
    }
}
