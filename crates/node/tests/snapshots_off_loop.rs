//! Snapshots never stop the event loop, and a snapshot that fails to be
//! written never stops the member nor loses log: a 3-member cluster in one
//! process (real WAL files, real TCP) running a state machine whose
//! snapshot writes can be made slow or made to fail.
//!
//! The state machine keeps a list of every number proposed (so that a
//! member whose state lost or repeated an entry is seen at once) and its
//! snapshot view writes it out, first sleeping `WRITE_DELAY_MS` and failing
//! while `FAIL_WRITES` is set; a restore first sleeps `RESTORE_DELAY_MS`. The tests share these switches: they run
//! one at a time (a mutex).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use skiff_node::config::NodeConfig;
use skiff_node::embedded::EmbeddedCluster;
use skiff_node::{ApplyError, Committed, NodeHandle, RestoreError, SnapshotView, StateMachine};

mod common;

static FAIL_WRITES: AtomicBool = AtomicBool::new(false);
static WRITE_DELAY_MS: AtomicU64 = AtomicU64::new(0);
static RESTORE_DELAY_MS: AtomicU64 = AtomicU64::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Default)]
struct Log {
    /// Shared with frozen views: a snapshot is an O(1) clone of the Arc.
    items: Arc<Vec<u64>>,
}

struct Frozen(Arc<Vec<u64>>);

impl SnapshotView for Frozen {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(
            WRITE_DELAY_MS.load(Ordering::Relaxed),
        ));
        if FAIL_WRITES.load(Ordering::Relaxed) {
            w.write_all(b"partial")?;
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        w.write_all(&(self.0.len() as u64).to_le_bytes())?;
        for v in self.0.iter() {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }
}

impl StateMachine for Log {
    type Command = u64;
    type Response = usize;
    type Query = ();
    type QueryResponse = Vec<u64>;
    type Snapshot = Frozen;

    fn encode_command(v: &u64, out: &mut BytesMut) {
        out.put_u64_le(*v);
    }

    fn apply(&mut self, batch: &[Committed], out: &mut Vec<usize>) -> Result<(), ApplyError> {
        for e in batch {
            let Some(v) = common::command_u64(e)? else {
                continue;
            };
            Arc::make_mut(&mut self.items).push(v);
            out.push(self.items.len());
        }
        Ok(())
    }

    fn query(&self, _: &()) -> Vec<u64> {
        self.items.to_vec()
    }

    fn snapshot(&self) -> Frozen {
        Frozen(self.items.clone())
    }

    fn restore(r: &mut dyn Read) -> Result<Self, RestoreError> {
        std::thread::sleep(Duration::from_millis(
            RESTORE_DELAY_MS.load(Ordering::Relaxed),
        ));
        let mut n = [0u8; 8];
        r.read_exact(&mut n)?;
        let n = u64::from_le_bytes(n);
        if n > 1 << 24 {
            return Err(RestoreError::Corrupt(format!("{n} items")));
        }
        let mut items = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut v = [0u8; 8];
            r.read_exact(&mut v)?;
            items.push(u64::from_le_bytes(v));
        }
        if r.read(&mut [0u8; 1])? != 0 {
            return Err(RestoreError::Corrupt("trailing bytes".into()));
        }
        Ok(Log {
            items: Arc::new(items),
        })
    }
}

/// Takes the tests' turn (they share the switches) and sets the switches:
/// failing snapshot writes, their delay, and the delay of a restore.
fn faults(
    fail_writes: bool,
    write_delay_ms: u64,
    restore_delay_ms: u64,
) -> MutexGuard<'static, ()> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    FAIL_WRITES.store(fail_writes, Ordering::Relaxed);
    WRITE_DELAY_MS.store(write_delay_ms, Ordering::Relaxed);
    RESTORE_DELAY_MS.store(restore_delay_ms, Ordering::Relaxed);
    serial
}

fn config() -> NodeConfig {
    NodeConfig {
        tick_interval_ms: 10,
        election_ticks_min: 30,
        election_ticks_max: 60,
        heartbeat_ticks: 3,
        snapshot_entries: 200,
        snapshot_catchup_entries: 50,
        wal_segment_size: 1 << 20,
        request_timeout_ms: 20_000,
        ..NodeConfig::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A counter or gauge from the node's Prometheus text.
fn metric(rt: &tokio::runtime::Runtime, node: &NodeHandle<Log>, name: &str) -> u64 {
    let text = rt.block_on(node.metrics_text()).expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn handles(cluster: &EmbeddedCluster<Log>) -> Vec<NodeHandle<Log>> {
    (1..=3)
        .map(|id| cluster.node(id).unwrap().handle().clone())
        .collect()
}

/// Proposes `from..to` in order through `node`, one at a time;
/// returns the longest a proposal took.
fn propose_range(
    rt: &tokio::runtime::Runtime,
    node: &NodeHandle<Log>,
    from: u64,
    to: u64,
) -> Duration {
    rt.block_on(async {
        let mut longest = Duration::ZERO;
        for v in from..to {
            let started = Instant::now();
            node.propose(v).await.expect("proposal");
            longest = longest.max(started.elapsed());
        }
        longest
    })
}

/// Waits until every member applied `n` items and returns their states.
fn states_after(
    rt: &tokio::runtime::Runtime,
    nodes: &[NodeHandle<Log>],
    n: usize,
) -> Vec<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states: Vec<Vec<u64>> = nodes
            .iter()
            .map(|h| rt.block_on(h.query((), false)).expect("query"))
            .collect();
        if states.iter().all(|s| s.len() >= n) || Instant::now() > deadline {
            return states;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A snapshot write that takes far longer than an election timeout does
/// not stop the loop: proposals keep committing, no election happens. (On
/// a loop that wrote snapshots itself, every member would stall 1.5 s per
/// snapshot and the followers would elect a new leader.)
#[test]
fn a_slow_snapshot_write_does_not_stop_the_loop() {
    let _serial = faults(false, 1_500, 0);
    let cluster = EmbeddedCluster::start(3, &config(), |_| Log::default()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let nodes = handles(&cluster);
    let rt = rt();
    let term = nodes[0].status().term;
    // 600 proposals: several snapshots per member, each writing for 1.5 s.
    let longest = propose_range(&rt, &nodes[leader as usize - 1], 0, 600);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 600;
    while nodes
        .iter()
        .any(|h| metric(&rt, h, "skiff_snapshots_taken_total") < 2)
    {
        assert!(
            Instant::now() < deadline,
            "members did not take 2 snapshots each"
        );
        propose_range(&rt, &nodes[leader as usize - 1], next, next + 10);
        next += 10;
    }
    for h in &nodes {
        let status = h.status();
        assert_eq!(status.term, term, "member {} saw an election", status.id);
        assert_eq!(status.leader, Some(leader));
    }
    // Proposals never waited for a snapshot (generous: a busy machine).
    assert!(
        longest < Duration::from_millis(1_200),
        "a proposal took {longest:?} while snapshots were written"
    );
    let states = states_after(&rt, &nodes, next as usize);
    assert!(states.iter().all(|s| s == &(0..next).collect::<Vec<u64>>()));
    WRITE_DELAY_MS.store(0, Ordering::Relaxed);
    cluster.shutdown().unwrap();
}

/// Failing snapshot writes (disk full) are counted and retried; the member
/// keeps serving and keeps its log (a restart replays it all); once writes
/// succeed again, snapshots are taken and a restart starts from one.
#[test]
fn a_failed_snapshot_is_retried_and_loses_nothing() {
    let _serial = faults(true, 0, 0);
    let mut cluster = EmbeddedCluster::start(3, &config(), |_| Log::default()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let rt = rt();
    let nodes = handles(&cluster);
    propose_range(&rt, &nodes[leader as usize - 1], 0, 500);
    for h in &nodes {
        assert!(metric(&rt, h, "skiff_snapshot_failures_total") >= 1);
        assert_eq!(metric(&rt, h, "skiff_snapshots_taken_total"), 0);
        assert!(h.stopped().is_none());
    }
    // No snapshot file was left behind, not even a partial one.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let snap_dir = cluster.config(follower).unwrap().data_dir.join("snap");
    let files: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .collect();
    assert!(files.is_empty(), "{files:?}");
    // The log is whole: a restarted follower replays every entry.
    cluster.restart(follower).unwrap();
    let nodes = handles(&cluster);
    let states = states_after(&rt, &nodes, 500);
    assert_eq!(
        states[follower as usize - 1],
        (0..500).collect::<Vec<u64>>()
    );

    // Writes work again: after the retry delay, snapshots are taken.
    FAIL_WRITES.store(false, Ordering::Relaxed);
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut next = 500;
    while nodes
        .iter()
        .any(|h| metric(&rt, h, "skiff_snapshots_taken_total") == 0)
    {
        assert!(
            Instant::now() < deadline,
            "no snapshot after writes recovered"
        );
        propose_range(&rt, &nodes[leader as usize - 1], next, next + 50);
        next += 50;
        std::thread::sleep(Duration::from_millis(200));
    }
    // A restart starts from the snapshot and the log after it.
    cluster.restart(follower).unwrap();
    let nodes = handles(&cluster);
    let states = states_after(&rt, &nodes, next as usize);
    assert_eq!(
        states[follower as usize - 1],
        (0..next).collect::<Vec<u64>>()
    );
    assert!(states.iter().all(|s| s == &states[0]));
    cluster.shutdown().unwrap();
}

/// A follower that needs a snapshot, and takes longer to fetch and restore
/// it than the leader takes to write its next one, still catches up while
/// writes go on: the leader holds back log compaction for it, so it goes
/// on from the log after one install. (Before, the leader compacted past
/// the snapshot while the follower restored it, so the follower fetched a
/// newer one, and again, as long as the writes lasted.)
#[test]
fn a_follower_slow_to_restore_catches_up_under_load() {
    let _serial = faults(false, 0, 0);
    // A snapshot each 400 entries; the load writes 300/s, so about 900
    // entries (two snapshots and more) go by during the 3-s restore, and
    // the log the leader may hold meanwhile is 4 x 400 + 50.
    let cfg = NodeConfig {
        snapshot_entries: 400,
        ..config()
    };
    let mut cluster = EmbeddedCluster::start(3, &cfg, |_| Log::default()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let rt = rt();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    cluster.stop(follower).unwrap();
    let lead = cluster.node(leader).unwrap().handle().clone();
    // The leader's log moves past the follower: it will need a snapshot.
    propose_range(&rt, &lead, 0, 1_000);

    RESTORE_DELAY_MS.store(3_000, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(1_000));
    let load = {
        let (lead, stop, written) = (lead.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let rt = crate::rt();
            let started = Instant::now();
            let mut v = 1_000;
            while !stop.load(Ordering::Relaxed) {
                rt.block_on(lead.propose(v)).expect("proposal");
                v += 1;
                written.store(v, Ordering::Relaxed);
                // 300 proposals a second, or as many as the machine takes.
                let due = started + Duration::from_micros((v - 1_000) * 3_333);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            v
        })
    };
    cluster.restart(follower).unwrap();
    let f = cluster.node(follower).unwrap().handle().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let caught_up = loop {
        let lead_len = rt.block_on(lead.query((), false)).expect("query").len();
        let f_len = rt.block_on(f.query((), false)).expect("query").len();
        if f_len + 100 >= lead_len && f_len > 1_000 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let installs = metric(&rt, &f, "skiff_snapshots_installed_total");
    stop.store(true, Ordering::Relaxed);
    let next = load.join().unwrap();
    RESTORE_DELAY_MS.store(0, Ordering::Relaxed);
    assert!(
        caught_up,
        "the follower never caught up while {} entries were written; {installs} snapshots installed",
        written.load(Ordering::Relaxed) - 1_000
    );
    assert!(installs <= 2, "{installs} snapshots installed to catch up");
    assert!(metric(&rt, &lead, "skiff_log_compaction_holds_total") >= 1);
    let nodes = handles(&cluster);
    let states = states_after(&rt, &nodes, next as usize);
    assert!(states.iter().all(|s| s == &(0..next).collect::<Vec<u64>>()));
    cluster.shutdown().unwrap();
}

/// `.snap` files in member `id`'s snapshot directory.
fn snapshot_files(cluster: &EmbeddedCluster<Log>, id: u64) -> Vec<String> {
    let dir = cluster.config(id).unwrap().data_dir.join("snap");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".snap"))
        .collect();
    names.sort();
    names
}

/// A follower that installed a snapshot keeps no more snapshot files than
/// after one of its own (the recorded one and one below it), without
/// waiting for its own next snapshot. (Before, every file it had stayed
/// until then: a member that installed several large snapshots in a row
/// held them all.)
#[test]
fn an_installed_snapshot_replaces_the_older_files() {
    let _serial = faults(false, 0, 0);
    let mut cluster = EmbeddedCluster::start(3, &config(), |_| Log::default()).unwrap();
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    let rt = rt();
    let lead = cluster.node(leader).unwrap().handle().clone();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    // Snapshots of its own, one each 200 entries (the newest not yet
    // compacted below: the margin of 50 entries was not applied after it).
    propose_range(&rt, &lead, 0, 1_000);
    let nodes = handles(&cluster);
    states_after(&rt, &nodes, 1_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &rt,
        &nodes[follower as usize - 1],
        "skiff_snapshots_taken_total",
    ) < 5
    {
        assert!(
            Instant::now() < deadline,
            "the follower took no 4 snapshots"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let own = snapshot_files(&cluster, follower);
    assert!(own.len() >= 2, "{own:?}");

    cluster.stop(follower).unwrap();
    propose_range(&rt, &lead, 1_000, 3_000);
    cluster.restart(follower).unwrap();
    let f = cluster.node(follower).unwrap().handle().clone();
    states_after(&rt, std::slice::from_ref(&f), 3_000);
    assert_eq!(metric(&rt, &f, "skiff_snapshots_installed_total"), 1);
    // Nothing more is written: no snapshot of its own comes to clean up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = snapshot_files(&cluster, follower);
        if files.len() <= 2 && !files.contains(&own[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after installing a snapshot the follower holds {files:?} (its own were {own:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let states = states_after(&rt, &handles(&cluster), 3_000);
    assert!(states
        .iter()
        .all(|s| s == &(0..3_000).collect::<Vec<u64>>()));
    cluster.shutdown().unwrap();
}
