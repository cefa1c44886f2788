//! The simulated network and the faults the run injects: delays,
//! reordering, drops, duplicates, partitions, crashes and transfers.

use super::*;

/// Share of crash faults that take the whole cluster down at once.
const CLUSTER_RESTART_PERMILLE: u32 = 150;
/// A leader whose reign is cut short is deposed within this many steps.
const REIGN_STEPS_MAX: u32 = 80;

impl Sim {
    /// `id` must send `to` its latest snapshot (at least through `index`,
    /// with `membership` in force there); the transfer sometimes fails, and
    /// the core is told.
    pub(super) fn send_snapshot(
        &mut self,
        id: NodeId,
        to: NodeId,
        index: Index,
        membership: &Membership,
    ) -> Result<(), Violation> {
        let term = self.node(id).raft.term();
        let Some(s) = self.node(id).snapshot.clone() else {
            return violation!("node {id} asked to send a snapshot it never had");
        };
        if s.index < index {
            return violation!(
                "node {id} asked to send a snapshot through {index}; its latest is {}",
                s.index
            );
        }
        if s.index == index && s.membership != *membership {
            return violation!(
                "node {id} asked to send its snapshot through {index} with membership \
                 {membership:?}; the snapshot keeps {:?}",
                s.membership
            );
        }
        if self.chance(self.knobs.snapshot_fail_permille) {
            self.note(|| format!("  {id} snapshot to {to} fails"));
            self.unreachable.push((id, to));
            return Ok(());
        }
        let msg = Message {
            from: id,
            to,
            term,
            body: MessageBody::InstallSnapshot {
                index: s.index,
                snapshot_term: s.term,
                membership: s.membership,
                data: s.kv.encode(),
            },
        };
        self.send(msg);
        Ok(())
    }

    /// Puts `msg` on the network: maybe dropped (and reported), maybe
    /// duplicated, each copy delayed at random.
    pub(super) fn send(&mut self, msg: Message) {
        let faulty = !self.settling && self.cfg.faults;
        if faulty && self.chance(self.knobs.drop_permille) {
            self.note(|| format!("  drop {}->{} {}", msg.from, msg.to, body_name(&msg.body)));
            if is_snapshot(&msg) || self.chance(self.knobs.unreachable_permille) {
                self.unreachable.push((msg.from, msg.to));
            }
            return;
        }
        // A forwarded batch is never duplicated: the core proposes each
        // copy it gets (the host would have to drop duplicates by the ids
        // inside, and this host keeps no client sessions).
        let copies = if faulty && !is_forward(&msg) && self.chance(self.knobs.dup_permille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if faulty && self.chance(self.knobs.long_delay_permille) {
                self.rng
                    .range(self.knobs.delay_max, self.knobs.delay_max * 30)
            } else {
                self.rng.range(0, self.knobs.delay_max)
            };
            self.net.push(InFlight {
                at: self.now + u64::from(delay),
                msg: msg.clone(),
            });
        }
        assert!(
            self.net.len() <= NET_MAX,
            "{} messages in flight",
            self.net.len()
        );
    }

    /// Delivers a random message whose delay passed, unless its link is cut
    /// or its receiver is down.
    pub(super) fn deliver(&mut self) -> Result<(), Violation> {
        let now = self.now;
        let ready = self.net.iter().filter(|m| m.at <= now).count();
        let mut k = self.rng.range(0, ready as u32 - 1);
        let pos = self
            .net
            .iter()
            .position(|m| {
                if m.at > now {
                    return false;
                }
                k = k.wrapping_sub(1);
                k == u32::MAX
            })
            .expect("k < ready");
        let msg = self.net.swap_remove(pos).msg;
        let (from, to) = (msg.from, msg.to);
        self.fold(&[0xD0, from, to, msg.term, body_tag(&msg.body)]);
        if !self.node(to).up || self.cuts.contains(&(from, to)) {
            if is_snapshot(&msg) || self.chance(self.knobs.unreachable_permille) {
                self.unreachable.push((from, to));
            }
            return Ok(());
        }
        self.note(|| {
            format!(
                "deliver {from}->{to} t{} {}",
                msg.term,
                body_name(&msg.body)
            )
        });
        self.node_mut(to).raft.step(msg);
        self.drive(to)
    }

    /// Tells senders about the drops queued for reporting.
    pub(super) fn flush_unreachable(&mut self) -> Result<(), Violation> {
        for _ in 0..DRIVE_ROUNDS_MAX {
            if self.unreachable.is_empty() {
                return Ok(());
            }
            for (from, to) in std::mem::take(&mut self.unreachable) {
                if self.node(from).up {
                    self.note(|| format!("unreachable {from}->{to}"));
                    self.fold(&[0xF0, from, to]);
                    self.node_mut(from).raft.unreachable(to);
                    self.drive(from)?;
                }
            }
        }
        violation!("unreachable reports keep coming")
    }

    /// Injects one random fault.
    pub(super) fn fault(&mut self) -> Result<(), Violation> {
        match self.rng.range(0, 10) {
            0 if self.chance(CLUSTER_RESTART_PERMILLE) => self.restart_cluster(),
            0..=2 => self.crash_one(),
            3 if self.chance(500) => self.bridge(),
            3 | 4 => self.partition_in_two(),
            5 => self.cut_links(),
            6 => self.deafen(false)?,
            7 => self.deafen(true)?,
            8 => self.isolate_leader(),
            9 => {
                if let Some(leader) = self.leader() {
                    self.transfer(leader)?;
                }
            }
            _ => {
                self.note(|| "heal early".to_string());
                self.cuts.clear();
            }
        }
        Ok(())
    }

    /// Crashes a random node, keeping a majority of each voter set of the
    /// membership in force up, so that the cluster can still make
    /// progress.
    fn crash_one(&mut self) {
        if let Some(id) = self.random_up_node() {
            self.crash_keeping_quorum(id);
        }
    }

    /// Crashes `id` if a majority of each voter set of the membership in
    /// force stays up without it; says whether it did.
    fn crash_keeping_quorum(&mut self, id: NodeId) -> bool {
        let m = self.reference_membership();
        let keeps_quorum = |set: &BTreeSet<NodeId>| {
            let down = set.iter().filter(|&&v| v == id || !self.node(v).up).count();
            2 * down < set.len() || set.is_empty()
        };
        let crash = keeps_quorum(&m.voters) && keeps_quorum(&m.outgoing);
        if crash {
            self.crash(id);
        }
        crash
    }

    /// Every node crashes at once (a power cut): each restarts from its
    /// disk alone, after a short random while. Quorums are lost until
    /// enough are back.
    fn restart_cluster(&mut self) {
        self.cluster_restarts += 1;
        self.note(|| "the whole cluster crashes".to_string());
        self.fold(&[0xCE]);
        for i in 0..self.nodes.len() {
            if self.nodes[i].up {
                let restart_at = self.now + u64::from(self.rng.range(0, 100));
                self.crash_until(self.nodes[i].id, restart_at);
            }
        }
    }

    /// Symmetric: two random sides, every link between them cut.
    fn partition_in_two(&mut self) {
        let n = self.nodes.len() as u64;
        let side: Vec<bool> = (0..n).map(|_| self.rng.range(0, 1) == 1).collect();
        self.cuts.clear();
        for a in 1..=n {
            for b in 1..=n {
                if side[(a - 1) as usize] != side[(b - 1) as usize] {
                    self.cuts.insert((a, b));
                }
            }
        }
        self.partitioned("partition");
    }

    /// Not transitive: two random sides that cannot talk, and one node
    /// (the bridge) that talks to both. A side that cannot hear the leader
    /// may elect another through the bridge, which still hears the old one.
    fn bridge(&mut self) {
        let n = self.nodes.len() as u64;
        let bridge = self.random_node();
        let side: Vec<bool> = (0..n).map(|_| self.rng.range(0, 1) == 1).collect();
        self.cuts.clear();
        for a in (1..=n).filter(|&a| a != bridge) {
            for b in (1..=n).filter(|&b| b != bridge) {
                if side[(a - 1) as usize] != side[(b - 1) as usize] {
                    self.cuts.insert((a, b));
                }
            }
        }
        self.partitioned("bridge");
    }

    /// `id` was just elected in `term`: with the seed's chance, it will be
    /// deposed soon.
    pub(super) fn maybe_shorten_reign(&mut self, id: NodeId, term: Term) {
        if self.settling || !self.chance(self.knobs.short_reign_permille) {
            return;
        }
        let at = self.now + u64::from(self.rng.range(0, REIGN_STEPS_MAX));
        self.note(|| format!("  {id} will be deposed at {at}"));
        self.reigns_ending.push((id, term, at));
    }

    /// Deposes the leaders whose reign is over, if they still lead: a crash
    /// when the rest keep a quorum, else isolation.
    pub(super) fn end_reigns(&mut self) {
        if self.settling {
            self.reigns_ending.clear();
            return;
        }
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.reigns_ending.drain(..).partition(|r| r.2 <= now);
        self.reigns_ending = later;
        for (id, term, _) in due {
            let node = self.node(id);
            if !node.up || node.raft.role() != Role::Leader || node.raft.term() != term {
                continue;
            }
            self.fold(&[0xDE, id, term]);
            if !(self.chance(500) && self.crash_keeping_quorum(id)) {
                self.isolate(id);
            }
        }
    }

    /// One-way: a few random directed links.
    fn cut_links(&mut self) {
        self.cuts.clear();
        for _ in 0..self.rng.range(1, 3) {
            let (a, b) = (self.random_node(), self.random_node());
            if a != b {
                self.cuts.insert((a, b));
            }
        }
        self.partitioned("one-way cut");
    }

    /// One-way: a node (the leader, if any) hears nobody while everyone
    /// still hears it; with `transfer`, it also hands leadership away,
    /// which it will not hear about.
    fn deafen(&mut self, transfer: bool) -> Result<(), Violation> {
        let deaf = match self.leader() {
            Some(l) => l,
            None => self.random_node(),
        };
        self.cuts.clear();
        for other in (1..=self.nodes.len() as u64).filter(|&o| o != deaf) {
            self.cuts.insert((other, deaf));
        }
        self.partitioned("deafen");
        if transfer && self.leader() == Some(deaf) {
            self.transfer(deaf)?;
        }
        Ok(())
    }

    /// The leader is cut off both ways.
    fn isolate_leader(&mut self) {
        if let Some(leader) = self.leader() {
            self.isolate(leader);
        }
    }

    /// `id` is cut off both ways.
    fn isolate(&mut self, id: NodeId) {
        self.cuts.clear();
        for other in (1..=self.nodes.len() as u64).filter(|&o| o != id) {
            self.cuts.insert((id, other));
            self.cuts.insert((other, id));
        }
        self.partitioned(&format!("isolate {id}"));
    }

    /// `leader` hands leadership to another random node, mostly a voter;
    /// a node that is no voter must be refused.
    fn transfer(&mut self, leader: NodeId) -> Result<(), Violation> {
        let n = self.nodes.len() as u32;
        if n < 2 {
            return Ok(());
        }
        let m = self.node(leader).raft.membership().clone();
        let voters: Vec<NodeId> = m
            .all_voters()
            .into_iter()
            .filter(|&v| v != leader)
            .collect();
        let target = if !voters.is_empty() && self.chance(800) {
            voters[self.rng.range(0, voters.len() as u32 - 1) as usize]
        } else {
            let mut target = u64::from(self.rng.range(1, n - 1));
            if target >= leader {
                target += 1;
            }
            target
        };
        self.note(|| format!("transfer {leader} -> {target}"));
        self.fold(&[0x70, leader, target]);
        let result = self.node_mut(leader).raft.transfer_leadership(target);
        self.note(|| format!("  {result:?}"));
        let voter = m.is_voter(target);
        match result {
            Ok(()) if voter => {}
            Err(TransferError::NotAVoter(t)) if !voter && t == target => {}
            _ => {
                return violation!(
                    "leader {leader} answered a transfer to {target} (voter: {voter}, \
                     membership {m:?}) with {result:?}"
                )
            }
        }
        self.drive(leader)
    }

    /// The cuts just made hold for a random while.
    pub(super) fn partitioned(&mut self, what: &str) {
        self.partitions += 1;
        self.heal_at = self.now + u64::from(self.rng.range(50, 800));
        let cuts: Vec<_> = self.cuts.iter().copied().collect();
        for &(a, b) in &cuts {
            self.fold(&[0xC0, a, b]);
        }
        let heal_at = self.heal_at;
        self.note(|| format!("{what}: {cuts:?} until {heal_at}"));
    }
}
