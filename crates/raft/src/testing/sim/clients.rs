//! The simulated clients: operations called, proposed or read, answered
//! when applied, or given up with an unknown outcome.

use super::*;

impl Sim {
    /// The read `ctx` on `id` may be served once `id` applied `index`.
    pub(super) fn read_ready(
        &mut self,
        id: NodeId,
        ctx: u64,
        index: Index,
    ) -> Result<(), Violation> {
        let (life, term) = (self.node(id).life, self.node(id).raft.term());
        for c in &mut self.clients {
            if let Waiting::Reading {
                node,
                life: l,
                ctx: x,
                ready,
                floor,
                ..
            } = &mut c.waiting
            {
                if *node == id && *l == life && *x == ctx {
                    if index < *floor {
                        return violation!(
                            "stale read: node {id} (term {term}) gave read {ctx} the read index \
                             {index}, but {floor} was committed before it was asked"
                        );
                    }
                    *ready = Some(index);
                }
            }
        }
        self.serve_reads(id);
        Ok(())
    }

    /// The read `ctx` on `id` failed: the client retries later.
    pub(super) fn read_failed(&mut self, id: NodeId, ctx: u64) {
        self.refuse(id, ctx, true);
    }

    /// The leader refused the batch `ctx` that `id` forwarded: none of it
    /// was proposed, the client retries later. A refusal must come back to
    /// the node that forwarded the batch.
    pub(super) fn forward_refused(&mut self, id: NodeId, ctx: u64) -> Result<(), Violation> {
        if self.forwarded.get(&ctx) != Some(&id) {
            return violation!(
                "node {id} got ProposeRefused {{ ctx: {ctx} }} for a batch it never forwarded"
            );
        }
        self.note(|| format!("  {id} forward {ctx} refused"));
        self.refuse(id, ctx, false);
        Ok(())
    }

    /// The clients waiting on `id` (in its current life) for the read
    /// (`read`) or the forwarded batch `ctx`: refused, to retry later.
    fn refuse(&mut self, id: NodeId, ctx: u64, read: bool) {
        let life = self.node(id).life;
        for c in &mut self.clients {
            let waiting = match c.waiting {
                Waiting::Reading {
                    op,
                    node,
                    life,
                    ctx,
                    ..
                } if read => Some((op, node, life, ctx)),
                Waiting::Forwarded {
                    op,
                    node,
                    life,
                    ctx,
                } if !read => Some((op, node, life, ctx)),
                _ => None,
            };
            if let Some((op, node, l, x)) = waiting {
                if node == id && l == life && x == ctx {
                    c.waiting = Waiting::Refused { op };
                }
            }
        }
    }

    /// `id`'s host applies `entries` (the next ones) and reports it.
    pub(super) fn apply_entries(&mut self, id: NodeId, entries: &[Entry]) -> Result<(), Violation> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        self.note(|| format!("  {id} apply {:?}", span(entries)));
        for e in entries {
            self.apply(id, e)?;
        }
        self.node_mut(id).raft.applied(last);
        self.serve_reads(id);
        Ok(())
    }

    /// A lagging host applies some of the entries handed out to it.
    pub(super) fn apply_event(&mut self) -> Result<(), Violation> {
        let ready: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.up && !n.to_apply.is_empty())
            .map(|n| n.id)
            .collect();
        let id = ready[self.rng.range(0, ready.len() as u32 - 1) as usize];
        let n = self.node(id).to_apply.len() as u32;
        let count = self.rng.range(1, n) as usize;
        let entries: Vec<Entry> = self.node_mut(id).to_apply.drain(..count).collect();
        self.fold(&[0xA0, id, entries.len() as u64]);
        self.apply_entries(id, &entries)?;
        self.drive(id)
    }

    /// `id` applies `e` to its state machine (state machine safety), and
    /// answers the client waiting for that index, if any.
    pub(super) fn apply(&mut self, id: NodeId, e: &Entry) -> Result<(), Violation> {
        let node = &mut self.nodes[(id - 1) as usize];
        let result = node
            .kv
            .apply(e)
            .map_err(|m| Violation(format!("node {id}: {m}")))?;
        let digest = node.kv.digest;
        let life = node.life;
        self.safety.applied(id, e, digest)?;
        let Some((cmd, output)) = result else {
            return Ok(());
        };
        match self.applied_ops.get(&(cmd.client, cmd.op)) {
            Some(&at) if at != e.index => {
                return violation!(
                    "client {} op {} applied at {at} and again at {}",
                    cmd.client,
                    cmd.op,
                    e.index
                );
            }
            _ => {
                self.applied_ops.insert((cmd.client, cmd.op), e.index);
            }
        }
        for c in 0..self.clients.len() {
            let (op, index) = match self.clients[c].waiting {
                Waiting::Proposed {
                    op,
                    node,
                    life: l,
                    index,
                    ..
                } if node == id && l == life => (op, index),
                // Answered by its own command, wherever it was proposed.
                Waiting::Forwarded {
                    op, node, life: l, ..
                } if node == id
                    && l == life
                    && self.ops[op].client == cmd.client
                    && self.ops[op].op == cmd.op =>
                {
                    self.ops[op].index = Some(e.index);
                    (op, e.index)
                }
                _ => continue,
            };
            if index != e.index {
                continue;
            }
            if self.ops[op].client == cmd.client && self.ops[op].op == cmd.op {
                self.note(|| format!("  client {} op {op} -> {output:?}", c + 1));
                if let Output::Value(v) = output {
                    self.last_read.insert(cmd.input.key(), v);
                }
                self.complete(c, output);
            } else {
                self.note(|| format!("  client {} op {op} lost its index", c + 1));
                self.give_up(c);
            }
        }
        Ok(())
    }

    /// Answers ReadIndex reads on `id` whose read index it applied.
    pub(super) fn serve_reads(&mut self, id: NodeId) {
        let (life, applied) = (self.node(id).life, self.node(id).kv.applied);
        for c in 0..self.clients.len() {
            let Waiting::Reading {
                op,
                node,
                life: l,
                ready: Some(r),
                ..
            } = self.clients[c].waiting
            else {
                continue;
            };
            if node != id || l != life || applied < r {
                continue;
            }
            let key = self.ops[op].input.key();
            let v = self.node(id).kv.map.get(&key).copied();
            self.note(|| format!("  client {} read op {op} at {r} -> {v:?}", c + 1));
            self.last_read.insert(key, v);
            self.complete(c, Output::Value(v));
        }
    }

    /// A writer (or, with `reader`, a reader) without an answer pending
    /// calls a new operation, or retries one that was refused.
    pub(super) fn client_event(&mut self, reader: bool) -> Result<(), Violation> {
        let free: Vec<usize> = (0..self.clients.len())
            .filter(|&c| self.clients[c].reader == reader && self.may_call(c))
            .collect();
        let c = free[self.rng.range(0, free.len() as u32 - 1) as usize];
        let op = match self.clients[c].waiting {
            Waiting::Refused { op } => op,
            _ => self.new_op(c),
        };
        self.submit(c, op)
    }

    /// Whether client `c` may call (or retry) now: it waits for no answer,
    /// and it is no writer in a quiet phase.
    pub(super) fn may_call(&self, c: usize) -> bool {
        let client = &self.clients[c];
        let quiet = !self.settling
            && self
                .knobs
                .quiet_phase_steps
                .is_some_and(|len| (self.now / len) % 3 == 2);
        matches!(client.waiting, Waiting::Idle | Waiting::Refused { .. })
            && (client.reader || !quiet)
    }

    /// A new operation of client `c` on a random key: 40% `Put`, 35% `Get`,
    /// 25% `Cas` (expecting nothing, the value last read or the value last
    /// written). Values are unique, so the checker can tell writes apart.
    pub(super) fn new_op(&mut self, c: usize) -> usize {
        let key = u64::from(self.rng.range(0, self.cfg.keys as u32 - 1));
        let reader = self.clients[c].reader;
        let input = match self.rng.range(0, 99) {
            _ if reader => Input::Get { key },
            0..=39 => {
                let value = self.fresh_value(key);
                Input::Put { key, value }
            }
            40..=74 => Input::Get { key },
            _ => {
                let expect = match self.rng.range(0, 3) {
                    0 => None,
                    1 => self.last_read.get(&key).copied().flatten(),
                    _ => self.last_written.get(&key).copied(),
                };
                let new = self.fresh_value(key);
                Input::Cas { key, expect, new }
            }
        };
        let read_index = reader
            || (matches!(input, Input::Get { .. }) && self.chance(self.knobs.read_index_permille));
        let client = &mut self.clients[c];
        let rec = OpRecord {
            client: client.id,
            op: client.next_op,
            input,
            call: self.now,
            deadline: self.now + self.cfg.op_timeout_steps,
            read_index,
            accepted: false,
            index: None,
            ret: None,
            output: None,
            gave_up: false,
        };
        client.next_op += 1;
        self.ops.push(rec);
        let op = self.ops.len() - 1;
        self.note(|| {
            format!(
                "client {} calls op {op}: {input:?} read_index={read_index}",
                c + 1
            )
        });
        op
    }

    /// A value never written before (remembered as the last written to `key`).
    pub(super) fn fresh_value(&mut self, key: u64) -> u64 {
        let v = self.next_value;
        self.next_value += 1;
        self.last_written.insert(key, v);
        v
    }

    /// One attempt of `op` on the node the client believes leads, or on
    /// any node for some reads and for the writes it forwards.
    pub(super) fn submit(&mut self, c: usize, op: usize) -> Result<(), Violation> {
        let rec = self.ops[op].clone();
        let mut target = self.clients[c].guess;
        let forward = !rec.read_index && self.chance(self.knobs.forward_permille);
        if forward || (rec.read_index && self.chance(300)) {
            target = self.random_node();
        }
        self.fold(&[0xCA, c as u64, op as u64, target]);
        if !self.node(target).up {
            self.clients[c].guess = self.random_node();
            self.clients[c].waiting = Waiting::Refused { op };
            return Ok(());
        }
        let life = self.node(target).life;
        if rec.read_index {
            let ctx = self.next_ctx;
            self.next_ctx += 1;
            let floor = self.safety.commit_max();
            let result = self.node_mut(target).raft.read_index(ctx);
            self.note(|| format!("client {} read op {op} on {target}: {result:?}", c + 1));
            self.clients[c].waiting = match result {
                Ok(()) => {
                    self.ops[op].accepted = true;
                    Waiting::Reading {
                        op,
                        node: target,
                        life,
                        ctx,
                        ready: None,
                        floor,
                    }
                }
                Err(ReadError::NoLeader) => {
                    self.clients[c].guess = self.random_node();
                    Waiting::Refused { op }
                }
                Err(ReadError::Backpressure { .. }) => Waiting::Refused { op },
            };
        } else if forward {
            let cmd = Command {
                client: rec.client,
                op: rec.op,
                input: rec.input,
            };
            let ctx = self.next_ctx;
            self.next_ctx += 1;
            self.forwarded.insert(ctx, target);
            let result = self.node_mut(target).raft.forward(ctx, vec![cmd.encode()]);
            self.note(|| format!("client {} forwards op {op} via {target}: {result:?}", c + 1));
            self.clients[c].waiting = match result {
                Ok(()) => {
                    self.ops[op].accepted = true;
                    Waiting::Forwarded {
                        op,
                        node: target,
                        life,
                        ctx,
                    }
                }
                Err(ProposeError::NotLeader { .. }) => {
                    self.clients[c].guess = self.random_node();
                    Waiting::Refused { op }
                }
                Err(ProposeError::Empty | ProposeError::InvalidChange(_)) => {
                    return violation!("a forwarded command was refused: {result:?}")
                }
                Err(_) => Waiting::Refused { op },
            };
        } else {
            let cmd = Command {
                client: rec.client,
                op: rec.op,
                input: rec.input,
            };
            let result = self.node_mut(target).raft.propose(vec![cmd.encode()]);
            self.note(|| format!("client {} proposes op {op} to {target}: {result:?}", c + 1));
            self.clients[c].waiting = match result {
                Ok((index, _)) => {
                    self.ops[op].accepted = true;
                    self.ops[op].index = Some(index);
                    Waiting::Proposed {
                        op,
                        node: target,
                        life,
                        index,
                    }
                }
                Err(ProposeError::NotLeader { leader_hint }) => {
                    self.clients[c].guess = match leader_hint {
                        Some(l) => l,
                        None => self.random_node(),
                    };
                    Waiting::Refused { op }
                }
                Err(ProposeError::Empty | ProposeError::InvalidChange(_)) => {
                    return violation!("a command proposal was refused: {result:?}")
                }
                Err(_) => Waiting::Refused { op },
            };
        }
        self.drive(target)
    }

    /// Client `c` got its answer now.
    pub(super) fn complete(&mut self, c: usize, output: Output) {
        let op = match self.clients[c].waiting {
            Waiting::Proposed { op, .. } => op,
            Waiting::Reading { op, .. } => {
                self.read_index_ok += 1;
                op
            }
            Waiting::Forwarded { op, .. } => {
                self.forwards_ok += 1;
                op
            }
            w => unreachable!("completing {w:?}"),
        };
        self.fold(&[0xC1, c as u64, op as u64]);
        let rec = &mut self.ops[op];
        rec.ret = Some(self.now);
        rec.output = Some(output);
        self.clients[c].waiting = Waiting::Idle;
    }

    /// The client stops waiting for its operation: unknown if it was ever
    /// accepted, left out of the history if not.
    pub(super) fn give_up(&mut self, c: usize) {
        let Some(op) = self.clients[c].waiting.op() else {
            return;
        };
        self.fold(&[0xC2, c as u64, op as u64]);
        self.ops[op].gave_up = true;
        self.clients[c].waiting = Waiting::Idle;
    }

    /// The operations that may have taken effect, for the checker.
    pub(super) fn history(&self) -> Vec<Operation> {
        self.ops
            .iter()
            .filter(|r| r.ret.is_some() || r.accepted)
            .map(|r| match (r.ret, r.output) {
                (Some(ret), Some(output)) => {
                    Operation::completed(u64::from(r.client), r.input, r.call, ret, output)
                }
                _ => Operation::unknown(u64::from(r.client), r.input, r.call),
            })
            .collect()
    }
}
