//! A small, deterministic in-memory cluster for the paper tests: messages
//! are queued and delivered in order unless a link is cut; persists complete
//! when the test says (at once by default); crashes lose what was not
//! persisted.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use skiff_raft::{
    Action, Config, Entry, HardState, Index, Membership, Message, MessageBody, NodeId, Payload,
    PersistId, Raft, Restored, Role, Term,
};

pub struct Unpersisted {
    pub id: PersistId,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    /// An installed snapshot's (index, term): replaces the durable log.
    pub snapshot: Option<(Index, Term)>,
}

pub struct Node {
    pub raft: Raft,
    /// Persists handed out but not yet completed (when `auto_persist` is
    /// off): (id, hard state, entries).
    pub unpersisted: VecDeque<Unpersisted>,
    /// Messages waiting for a persist.
    pub held: Vec<(PersistId, Message)>,
    pub durable_hs: HardState,
    pub durable_log: Vec<Entry>,
    /// (index, term) the durable log follows (a snapshot's).
    pub durable_base: (Index, Term),
    /// The latest snapshot: (index, term, application commands through it).
    pub snapshot: Option<(Index, Term, Membership, Vec<Bytes>)>,
    /// The configuration the node was started with (reused on restart).
    pub config: Config,
    /// Commands restored from an installed snapshot, before `applied`.
    pub snap_cmds: Vec<Bytes>,
    pub applied: Vec<Entry>,
    pub auto_persist: bool,
    /// Reads answered: (ctx, Some(index)) ready, (ctx, None) failed.
    pub reads: Vec<(u64, Option<Index>)>,
    /// Forwarded batches the leader refused.
    pub refused: Vec<u64>,
}

impl Node {
    /// A new node with an empty disk.
    fn fresh(config: Config) -> Node {
        Node {
            raft: Raft::new(config.clone(), Restored::default(), 42).unwrap(),
            unpersisted: VecDeque::new(),
            held: Vec::new(),
            durable_hs: HardState::default(),
            durable_log: Vec::new(),
            durable_base: (0, 0),
            snapshot: None,
            config,
            snap_cmds: Vec::new(),
            applied: Vec::new(),
            auto_persist: true,
            reads: Vec::new(),
            refused: Vec::new(),
        }
    }
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
            nodes.insert(id, Node::fresh(c));
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
                node.unpersisted.push_back(Unpersisted {
                    id: pid,
                    hard_state,
                    entries,
                    snapshot: None,
                });
                if node.auto_persist {
                    self.complete_persists(id);
                }
            }
            Action::InstallSnapshot {
                id: pid,
                index,
                term,
                membership,
                data,
            } => {
                let cmds = decode_cmds(&data);
                node.snap_cmds = cmds.clone();
                node.applied.clear();
                node.snapshot = Some((index, term, membership, cmds));
                node.unpersisted.push_back(Unpersisted {
                    id: pid,
                    hard_state: None,
                    entries: Vec::new(),
                    snapshot: Some((index, term)),
                });
                if node.auto_persist {
                    self.complete_persists(id);
                }
            }
            Action::SendSnapshot { to, .. } => {
                let (index, term, membership, cmds) =
                    node.snapshot.clone().expect("a snapshot was taken");
                self.net.push_back(Message {
                    from: id,
                    to,
                    term: node.raft.term(),
                    body: MessageBody::InstallSnapshot {
                        index,
                        snapshot_term: term,
                        membership,
                        data: encode_cmds(&cmds),
                    },
                });
            }
            Action::Compact { upto, .. } => {
                if let Some(e) = node.durable_log.iter().find(|e| e.index == upto) {
                    node.durable_base = (upto, e.term);
                }
                node.durable_log.retain(|e| e.index > upto);
            }
            Action::Send { msg, after_persist } => match after_persist {
                Some(p) if node.unpersisted.iter().any(|u| u.id <= p) => node.held.push((p, msg)),
                _ => self.net.push_back(msg),
            },
            Action::Apply { entries } => {
                let last = entries.last().unwrap().index;
                node.applied.extend(entries);
                node.raft.applied(last);
            }
            Action::ReadReady { ctx, index } => node.reads.push((ctx, Some(index))),
            Action::ReadFailed { ctx } => node.reads.push((ctx, None)),
            Action::ProposeRefused { ctx } => node.refused.push(ctx),
            Action::RoleChanged { .. } => {}
        }
    }

    /// Completes every outstanding persist of `id`.
    pub fn complete_persists(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let mut last = None;
        while let Some(u) = node.unpersisted.pop_front() {
            let (pid, hs, entries) = (u.id, u.hard_state, u.entries);
            if let Some((index, term)) = u.snapshot {
                node.durable_log.clear();
                node.durable_base = (index, term);
            }
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

    /// Leader `from` starts handing leadership to `to` (its messages are
    /// queued, not delivered).
    pub fn start_transfer(&mut self, from: NodeId, to: NodeId) {
        self.nodes
            .get_mut(&from)
            .unwrap()
            .raft
            .transfer_leadership(to)
            .unwrap();
        self.drain(from);
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

    /// Application commands applied by `id`, in order (those restored from
    /// a snapshot first).
    pub fn applied_cmds(&self, id: NodeId) -> Vec<Bytes> {
        let node = &self.nodes[&id];
        let mut out = node.snap_cmds.clone();
        out.extend(node.applied.iter().filter_map(|e| match &e.payload {
            Payload::Normal(b) => Some(b.clone()),
            Payload::Noop | Payload::Membership(_) => None,
        }));
        out
    }

    /// `id` snapshots its state machine at what it applied and tells the
    /// core (which compacts and asks the host to compact).
    pub fn take_snapshot(&mut self, id: NodeId) {
        let cmds = self.applied_cmds(id);
        let node = self.nodes.get_mut(&id).unwrap();
        let index = node.raft.log().applied();
        let term = node.raft.log().term(index).unwrap();
        let membership = node.raft.membership().clone();
        node.snapshot = Some((index, term, membership, cmds));
        node.raft.snapshot_taken(index);
        self.drain(id);
    }

    /// Starts a new, empty node `id` that knows no membership: it joins
    /// when a leader adds it.
    pub fn add_node(&mut self, id: NodeId) {
        let mut c = config(id, 0);
        c.voters.clear();
        self.nodes.insert(id, Node::fresh(c));
    }

    /// Crashes `id` (losing unpersisted state) and restarts it from its
    /// durable state.
    pub fn restart(&mut self, id: NodeId) {
        let n = self.nodes.len() as u64;
        let node = self.nodes.get_mut(&id).unwrap();
        node.unpersisted.clear();
        node.held.clear();
        node.applied.clear();
        node.snap_cmds = node
            .snapshot
            .as_ref()
            .map(|s| s.3.clone())
            .unwrap_or_default();
        let _ = n;
        let restored = Restored {
            hard_state: node.durable_hs,
            base_index: node.durable_base.0,
            base_term: node.durable_base.1,
            entries: node.durable_log.clone(),
            membership: node
                .snapshot
                .as_ref()
                .filter(|s| s.0 == node.durable_base.0)
                .map(|s| s.2.clone()),
        };
        node.raft = Raft::new(node.config.clone(), restored, 7).unwrap();
    }
}

/// Length-prefixed commands: the harness's state-machine snapshot format.
pub fn encode_cmds(cmds: &[Bytes]) -> Bytes {
    let mut out = Vec::new();
    for c in cmds {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(c);
    }
    Bytes::from(out)
}

pub fn decode_cmds(data: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        out.push(Bytes::copy_from_slice(&data[at + 4..at + 4 + n]));
        at += 4 + n;
    }
    out
}
