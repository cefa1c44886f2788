//! A backlog of committed entries is applied over several loop passes,
//! at most `apply_bytes_max` of entry bytes per pass (one entry at least),
//! so that a burst of large writes or a follower catching up never makes
//! one pass long enough to delay heartbeats.
//!
//! A 3-member cluster in this process (real WAL files, real TCP) runs a
//! state machine that records the most commands it was handed in one
//! `apply` call. Hundreds of concurrent proposals commit in large batches:
//! with the default bound the state machine sees batches of many entries
//! (the scenario makes backlogs); with `apply_bytes_max = 1` it sees one
//! entry per call, and every member still applies every entry, in order.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use skiff_node::config::NodeConfig;
use skiff_node::embedded::EmbeddedCluster;
use skiff_node::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};

mod common;

/// The most commands seen in one `apply` call, by any member.
static LARGEST_APPLY: AtomicUsize = AtomicUsize::new(0);
/// The tests share `LARGEST_APPLY`: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Proposals in flight at once.
const CONCURRENT: u64 = 400;

/// The numbers proposed, in the order applied.
#[derive(Default)]
struct Seen(Vec<u64>);

struct Frozen(Vec<u64>);

impl SnapshotView for Frozen {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for v in &self.0 {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }
}

impl StateMachine for Seen {
    type Command = u64;
    type Response = ();
    type Query = ();
    type QueryResponse = Vec<u64>;
    type Snapshot = Frozen;

    fn encode_command(v: &u64, out: &mut BytesMut) {
        out.put_u64_le(*v);
    }

    fn apply(&mut self, batch: &[Committed], out: &mut Vec<()>) -> Result<(), ApplyError> {
        let mut commands = 0;
        for e in batch {
            let Some(v) = common::command_u64(e)? else {
                continue;
            };
            self.0.push(v);
            out.push(());
            commands += 1;
        }
        LARGEST_APPLY.fetch_max(commands, Ordering::Relaxed);
        Ok(())
    }

    fn query(&self, _: &()) -> Vec<u64> {
        self.0.clone()
    }

    fn snapshot(&self) -> Frozen {
        Frozen(self.0.clone())
    }

    fn restore(r: &mut dyn Read) -> Result<Self, RestoreError> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        if bytes.len() % 8 != 0 {
            return Err(RestoreError::Corrupt(format!("{} bytes", bytes.len())));
        }
        Ok(Seen(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    }
}

/// Proposes `0..CONCURRENT` all at once through the leader of a cluster
/// with `apply_bytes_max`, waits until every member applied all of them,
/// and returns the largest `apply` call seen. Every member must hold the
/// same sequence, each number once.
fn run(apply_bytes_max: usize) -> usize {
    let cfg = NodeConfig {
        tick_interval_ms: 10,
        election_ticks_min: 30,
        election_ticks_max: 60,
        request_timeout_ms: 30_000,
        apply_bytes_max,
        ..NodeConfig::default()
    };
    let cluster = EmbeddedCluster::start(3, &cfg, |_| Seen::default()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    LARGEST_APPLY.store(0, Ordering::Relaxed);
    let h = cluster.node(leader).unwrap().handle().clone();
    rt.block_on(async {
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|v| {
                let h = h.clone();
                tokio::spawn(async move { h.propose(v).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("proposal");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let states: Vec<Vec<u64>> = loop {
        let states: Vec<Vec<u64>> = (1..=3)
            .map(|id| {
                let h = cluster.node(id).unwrap().handle().clone();
                rt.block_on(h.query((), false)).expect("query")
            })
            .collect();
        if states.iter().all(|s| s.len() >= CONCURRENT as usize) {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "members did not apply every proposal: {:?}",
            states.iter().map(Vec::len).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s, &states[0], "member {} applied another sequence", i + 1);
    }
    let mut sorted = states[0].clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..CONCURRENT).collect::<Vec<_>>());
    cluster.shutdown().unwrap();
    LARGEST_APPLY.load(Ordering::Relaxed)
}

#[test]
fn a_committed_backlog_is_applied_over_bounded_passes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The scenario makes backlogs: with the default bound (1 MiB) the
    // batches that commit at once are applied in one call.
    let unbounded = run(NodeConfig::default().apply_bytes_max);
    assert!(
        unbounded > 1,
        "{CONCURRENT} concurrent proposals never committed more than one entry at once"
    );
    // One entry per pass.
    let bounded = run(1);
    assert_eq!(
        bounded, 1,
        "an apply call took {bounded} entries with apply_bytes_max = 1"
    );
}
