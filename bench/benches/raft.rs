//! Criterion bench of the Raft core alone (no I/O): the leader proposes a
//! batch, its actions are handed to the followers, their acknowledgements
//! back, until the batch commits — for batches of 1, 64 and 1024 entries of
//! 128 bytes in 3- and 5-node clusters. Persists complete at once, so this
//! measures the core's CPU time per entry.

use std::collections::VecDeque;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_raft::{Action, Config, Message, Raft, Restored, Role};

struct Cluster {
    nodes: Vec<Raft>,
    net: VecDeque<Message>,
    leader: usize,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        let voters: Vec<u64> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let mut c = Config::new(id, voters.clone());
                c.inflight_max = 1 << 16;
                c.inflight_bytes_max = 1 << 30;
                c.uncommitted_bytes_max = 1 << 30;
                Raft::new(c, Restored::default(), id).expect("valid config")
            })
            .collect();
        let mut c = Cluster {
            nodes,
            net: VecDeque::new(),
            leader: 0,
        };
        while c.nodes[0].role() != Role::Leader {
            c.nodes[0].tick();
            c.settle();
        }
        c
    }

    /// Carries out every node's actions until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                for a in self.nodes[i].take_actions() {
                    moved = true;
                    match a {
                        Action::Persist { id, .. } => self.nodes[i].persisted(id),
                        Action::Send { msg, .. } => self.net.push_back(msg),
                        Action::Apply { entries } => {
                            let last = entries.last().expect("non-empty").index;
                            self.nodes[i].applied(last);
                        }
                        _ => {}
                    }
                }
            }
            while let Some(m) = self.net.pop_front() {
                moved = true;
                let to = (m.to - 1) as usize;
                self.nodes[to].step(m);
            }
            if !moved {
                return;
            }
        }
    }

    fn round(&mut self, batch: &[Bytes]) {
        let (_, last) = self.nodes[self.leader]
            .propose(batch.to_vec())
            .expect("leader accepts");
        self.settle();
        assert!(self.nodes[self.leader].commit() >= last);
        // Keep memory bounded: compact what everyone applied.
        if last % 8192 < batch.len() as u64 {
            for n in &mut self.nodes {
                let applied = n.log().applied();
                n.snapshot_taken(applied);
                n.take_actions();
            }
        }
    }
}

fn propose_to_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("raft_propose_to_commit");
    for nodes in [3u64, 5] {
        for batch in [1usize, 64, 1024] {
            let mut cluster = Cluster::new(nodes);
            let cmds: Vec<Bytes> = (0..batch).map(|_| Bytes::from(vec![7u8; 128])).collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(format!("{nodes}_nodes"), batch), |b| {
                b.iter(|| cluster.round(&cmds))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, propose_to_commit);
criterion_main!(benches);
