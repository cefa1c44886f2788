//! A small, deterministic in-memory cluster for the paper tests: messages
//! are queued and delivered in order unless a link is cut; persists complete
//! when the test says (at once by default); crashes lose what was not
//! persisted.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use skiff_raft::{
    Action, Config, Entry, HardState, Index, Message, NodeId, Payload, PersistId, Raft, Restored,
    Role,
};

pub struct Node {
    pub raft: Raft,
    /// Persists handed out but not yet completed (when `auto_persist` is
    /// off): (id, hard state, entries).
    pub unpersisted: VecDeque<(PersistId, Option<HardState>, Vec<Entry>)>,
    /// Messages waiting for a persist.
    pub held: Vec<(PersistId, Message)>,
    pub durable_hs: HardState,
    pub durable_log: Vec<Entry>,
    pub applied: Vec<Entry>,
    pub auto_persist: bool,
    /// Reads answered: (ctx, Some(index)) ready, (ctx, None) failed.
    pub reads: Vec<(u64, Option<Index>)>,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, Node>,
    pub net: VecDeque<Message>,
    /// Directed links that drop everything: (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    pub delivered: usize,
}

pub fn config(id: NodeId, n: u64) -> Config {
    let mut c = Config::new(id, (1..=n).collect());
    c.election_ticks_min = 10;
    c.election_ticks_max = 20;
    c.heartbeat_ticks = 2;
    c
}

pub fn cmd(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

impl Cluster {
    pub fn new(n: u64) -> Cluster {
        Cluster::with_config(n, |_| {})
    }

    pub fn with_config(n: u64, tweak: impl Fn(&mut Config)) -> Cluster {
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut c = config(id, n);
            tweak(&mut c);
            nodes.insert(
                id,
                Node {
                    raft: Raft::new(c, Restored::default(), 42).unwrap(),
                    unpersisted: VecDeque::new(),
                    held: Vec::new(),
                    durable_hs: HardState::default(),
                    durable_log: Vec::new(),
                    applied: Vec::new(),
                    auto_persist: true,
                    reads: Vec::new(),
                },
            );
        }
        Cluster {
            nodes,
            net: VecDeque::new(),
            cut: BTreeSet::new(),
            delivered: 0,
        }
    }

    pub fn raft(&self, id: NodeId) -> &Raft {
        &self.nodes[&id].raft
    }

    /// Runs the node's actions until it has nothing more to say.
    pub fn drain(&mut self, id: NodeId) {
        loop {
            let node = self.nodes.get_mut(&id).unwrap();
            let actions = node.raft.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.handle(id, a);
            }
        }
    }

    fn handle(&mut self, id: NodeId, action: Action) {
        let node = self.nodes.get_mut(&id).unwrap();
        match action {
            Action::Persist {
                id: pid,
                hard_state,
                entries,
            } => {
                node.unpersisted.push_back((pid, hard_state, entries));
                if node.auto_persist {
                    self.complete_persists(id);
                }
            }
            Action::Send { msg, after_persist } => match after_persist {
                Some(p) if node.unpersisted.iter().any(|u| u.0 <= p) => node.held.push((p, msg)),
                _ => self.net.push_back(msg),
            },
            Action::Apply { entries } => {
                let last = entries.last().unwrap().index;
                node.applied.extend(entries);
                node.raft.applied(last);
            }
            Action::ReadReady { ctx, index } => node.reads.push((ctx, Some(index))),
            Action::ReadFailed { ctx } => node.reads.push((ctx, None)),
            Action::RoleChanged { .. } => {}
        }
    }

    /// Completes every outstanding persist of `id`.
    pub fn complete_persists(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let mut last = None;
        while let Some((pid, hs, entries)) = node.unpersisted.pop_front() {
            if let Some(first) = entries.first() {
                node.durable_log.retain(|e| e.index < first.index);
                node.durable_log.extend(entries);
            }
            if let Some(hs) = hs {
                node.durable_hs = hs;
            }
            last = Some(pid);
        }
        if let Some(pid) = last {
            let (ready, held): (Vec<_>, Vec<_>) = node.held.drain(..).partition(|(p, _)| *p <= pid);
            node.held = held;
            self.net.extend(ready.into_iter().map(|(_, m)| m));
            self.nodes.get_mut(&id).unwrap().raft.persisted(pid);
            self.drain(id);
        }
    }

    /// Delivers the oldest queued message; false when none is queued.
    pub fn deliver_one(&mut self) -> bool {
        while let Some(msg) = self.net.pop_front() {
            if self.cut.contains(&(msg.from, msg.to)) || !self.nodes.contains_key(&msg.to) {
                continue;
            }
            self.delivered += 1;
            let to = msg.to;
            self.nodes.get_mut(&to).unwrap().raft.step(msg);
            self.drain(to);
            return true;
        }
        false
    }

    /// Delivers queued messages until none is left (bounded).
    pub fn deliver_all(&mut self) {
        for _ in 0..100_000 {
            let Some(msg) = self.net.pop_front() else {
                return;
            };
            if self.cut.contains(&(msg.from, msg.to)) || !self.nodes.contains_key(&msg.to) {
                continue;
            }
            self.delivered += 1;
            let to = msg.to;
            self.nodes.get_mut(&to).unwrap().raft.step(msg);
            self.drain(to);
        }
        panic!("the network did not go quiet");
    }

    pub fn tick(&mut self, id: NodeId) {
        self.nodes.get_mut(&id).unwrap().raft.tick();
        self.drain(id);
    }

    pub fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            let ids: Vec<_> = self.nodes.keys().copied().collect();
            for id in ids {
                self.tick(id);
            }
            self.deliver_all();
        }
    }

    /// Makes `id` campaign now and settles the election.
    pub fn elect(&mut self, id: NodeId) {
        for _ in 0..100 {
            self.tick(id);
            self.deliver_all();
            if self.raft(id).role() == Role::Leader {
                return;
            }
        }
        panic!("node {id} did not become leader");
    }

    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.raft.role() == Role::Leader)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn propose(&mut self, id: NodeId, cmds: &[&str]) -> (Index, Index) {
        let r = self
            .nodes
            .get_mut(&id)
            .unwrap()
            .raft
            .propose(cmds.iter().map(|c| cmd(c)).collect())
            .unwrap();
        self.drain(id);
        r
    }

    pub fn isolate(&mut self, id: NodeId) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Lets `ids` time out alone (their campaigns go nowhere), so that they
    /// no longer consider any leader alive; the links are restored after.
    pub fn expire_leases(&mut self, ids: &[NodeId]) {
        let saved = self.cut.clone();
        let all: Vec<_> = self.nodes.keys().copied().collect();
        for &a in &all {
            for &b in &all {
                self.cut.insert((a, b));
            }
        }
        for _ in 0..25 {
            for &id in ids {
                self.tick(id);
            }
        }
        self.net.clear();
        self.cut = saved;
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Application commands applied by `id`, in order.
    pub fn applied_cmds(&self, id: NodeId) -> Vec<Bytes> {
        self.nodes[&id]
            .applied
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::Normal(b) => Some(b.clone()),
                Payload::Noop => None,
            })
            .collect()
    }

    /// Crashes `id` (losing unpersisted state) and restarts it from its
    /// durable state.
    pub fn restart(&mut self, id: NodeId) {
        let n = self.nodes.len() as u64;
        let node = self.nodes.get_mut(&id).unwrap();
        node.unpersisted.clear();
        node.held.clear();
        node.applied.clear();
        let restored = Restored {
            hard_state: node.durable_hs,
            base_index: 0,
            base_term: 0,
            entries: node.durable_log.clone(),
        };
        node.raft = Raft::new(config(id, n), restored, 7).unwrap();
    }
}
