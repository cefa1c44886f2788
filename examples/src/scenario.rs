//! The lock-table scenario the example's `main` and its test run: a
//! 3-member cluster in this process (real WAL files, real TCP on
//! loopback), concurrent clients on every member, then a member stopped,
//! snapshotted past and restarted.
//!
//! What it checks, and fails with a message on:
//! * mutual exclusion: no lock is ever granted to a second owner while a
//!   client still holds it (clients record their holdings in a shared
//!   table: a holder clears its record *before* proposing the release, so
//!   any grant applied after that release is answered after the clear);
//! * fencing: each lock's tokens only grow;
//! * the table's counters equal what the clients saw (grants, commands);
//! * every member took snapshots; a member stopped while the others moved
//!   on, then restarted from its data directory, ends with a table equal
//!   to the others' (and to the locks the scenario left held).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_node::config::NodeConfig;
use skiff_node::embedded::EmbeddedCluster;
use skiff_node::{NodeHandle, RequestError};

use crate::lock_table::{Command, Dump, LockTable, Query, QueryResponse, Response};

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Options {
    /// Clients; client `i` talks to member `i % 3 + 1` and owns as `i + 1`.
    pub clients: usize,
    /// Acquire attempts per client.
    pub rounds: usize,
    /// Distinct locks the clients fight over.
    pub locks: usize,
    /// Commands proposed while a member is down.
    pub while_down: usize,
    /// Locks left held at the end (what the restarted member must see).
    pub left_held: usize,
    /// Take a snapshot every this many applied entries.
    pub snapshot_entries: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            clients: 9,
            rounds: 60,
            locks: 4,
            while_down: 400,
            left_held: 16,
            snapshot_entries: 100,
        }
    }
}

/// What a successful run saw.
#[derive(Debug)]
pub struct Report {
    pub grants: u64,
    pub held_by_other: u64,
    pub commands: u64,
    /// `skiff_snapshots_taken_total` of each member before the restart.
    pub snapshots_taken: Vec<u64>,
    pub restarted: u64,
    /// `skiff_snapshots_installed_total` on the restarted member.
    pub restarted_installed: u64,
    pub elapsed: Duration,
}

/// Retries of one request refused as busy or unavailable (a leader
/// change, a full queue) before the scenario gives up.
const RETRIES_MAX: usize = 200;
const RETRY_PAUSE: Duration = Duration::from_millis(20);
const LEADER_TIMEOUT: Duration = Duration::from_secs(20);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// The cluster's tunables: fast elections, snapshots every
/// `snapshot_entries`, and a short log tail so a member that was down
/// catches up from a snapshot.
pub fn config(opts: &Options) -> NodeConfig {
    NodeConfig {
        tick_interval_ms: 10,
        election_ticks_min: 20,
        election_ticks_max: 40,
        heartbeat_ticks: 3,
        snapshot_entries: opts.snapshot_entries,
        snapshot_catchup_entries: opts.snapshot_entries / 4,
        wal_segment_size: 1 << 20,
        io_threads: 1,
        ..NodeConfig::default()
    }
}

/// One client's record of who holds what, shared by all clients.
#[derive(Default)]
struct Observed {
    /// lock → (holder the clients know of, last token granted).
    locks: BTreeMap<String, (Option<u64>, u64)>,
}

async fn propose(node: &NodeHandle<LockTable>, cmd: Command) -> Result<(Response, usize), String> {
    for attempt in 0..RETRIES_MAX {
        match node.propose(cmd.clone()).await {
            Ok(r) => return Ok((r, attempt)),
            Err(
                RequestError::Busy(_)
                | RequestError::Unavailable(_)
                | RequestError::NotYet(_)
                | RequestError::NotLeader { .. },
            ) => {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(format!("{cmd:?} on node {}: {e}", node.id())),
        }
    }
    Err(format!(
        "{cmd:?} on node {}: still refused after {RETRIES_MAX} tries",
        node.id()
    ))
}

async fn dump(node: &NodeHandle<LockTable>) -> Result<Dump, String> {
    for _ in 0..RETRIES_MAX {
        match node.query(Query::Dump, true).await {
            Ok(QueryResponse::Dump(d)) => return Ok(d),
            Ok(other) => return Err(format!("dump answered {other:?}")),
            Err(RequestError::Stopped(e)) => return Err(format!("node {}: {e}", node.id())),
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
    Err(format!(
        "node {}: no dump after {RETRIES_MAX} tries",
        node.id()
    ))
}

/// One client: `rounds` times, try a lock; when granted, check nobody
/// else holds it, hold it for a moment, release it.
async fn client(
    i: usize,
    node: NodeHandle<LockTable>,
    opts: Options,
    observed: Arc<Mutex<Observed>>,
    counts: Arc<[AtomicU64; 3]>,
) -> Result<(), String> {
    let owner = i as u64 + 1;
    for round in 0..opts.rounds {
        let lock = format!("lock-{}", (i * 7 + round * 3) % opts.locks);
        let (r, _) = propose(
            &node,
            Command::Acquire {
                lock: lock.clone(),
                owner,
            },
        )
        .await?;
        counts[2].fetch_add(1, Ordering::Relaxed);
        match r {
            Response::Granted { token } => {
                counts[0].fetch_add(1, Ordering::Relaxed);
                {
                    let mut o = observed.lock().unwrap();
                    let (holder, last) = o.locks.entry(lock.clone()).or_insert((None, 0));
                    if let Some(h) = holder {
                        return Err(format!(
                            "{lock} granted to {owner} (token {token}) while {h} holds it"
                        ));
                    }
                    if token <= *last {
                        return Err(format!("{lock}: token {token} granted after token {last}"));
                    }
                    *holder = Some(owner);
                    *last = token;
                }
                tokio::task::yield_now().await;
                {
                    // Cleared before the release is proposed (see the
                    // module docs).
                    let mut o = observed.lock().unwrap();
                    let rec = o.locks.get_mut(&lock).expect("recorded at the grant");
                    assert_eq!(rec.0, Some(owner), "only this client clears its record");
                    rec.0 = None;
                }
                let (r, attempt) = propose(
                    &node,
                    Command::Release {
                        lock: lock.clone(),
                        owner,
                    },
                )
                .await?;
                counts[2].fetch_add(1, Ordering::Relaxed);
                // A retried release may find the first attempt applied.
                let ok = r == Response::Released
                    || (attempt > 0 && matches!(r, Response::NotHolder { .. }));
                if !ok {
                    return Err(format!(
                        "{lock}: release by its holder {owner} answered {r:?}"
                    ));
                }
            }
            Response::HeldBy { owner: h } if h != owner => {
                counts[1].fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            other => return Err(format!("{lock}: acquire by {owner} answered {other:?}")),
        }
    }
    Ok(())
}

/// A counter from a node's Prometheus text.
fn counter(text: &str, name: &str) -> Result<u64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| format!("no {name} in the metrics"))
}

fn handles(cluster: &EmbeddedCluster<LockTable>) -> Result<Vec<NodeHandle<LockTable>>, String> {
    (1..=3)
        .map(|id| {
            cluster
                .node(id)
                .map(|n| n.handle().clone())
                .ok_or_else(|| format!("node {id} not running"))
        })
        .collect()
}

/// Linearizable dumps of every member, which must all be equal.
async fn same_everywhere(nodes: &[NodeHandle<LockTable>]) -> Result<Dump, String> {
    let first = dump(&nodes[0]).await?;
    for n in &nodes[1..] {
        let d = dump(n).await?;
        if d != first {
            return Err(format!(
                "node {} has {d:?}, node {} has {first:?}",
                n.id(),
                nodes[0].id()
            ));
        }
    }
    Ok(first)
}

/// Runs the scenario; `Err` says what did not hold.
pub fn run(opts: &Options) -> Result<Report, String> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut cluster = EmbeddedCluster::start(3, &config(opts), |_| LockTable::new())
        .map_err(|e| format!("starting the cluster: {e}"))?;
    let leader = cluster
        .wait_leader(LEADER_TIMEOUT)
        .ok_or("no leader elected")?;
    let nodes = handles(&cluster)?;

    // 1. Concurrent clients on every member (followers forward).
    let observed = Arc::new(Mutex::new(Observed::default()));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..opts.clients {
            tasks.push(tokio::spawn(client(
                i,
                nodes[i % 3].clone(),
                opts.clone(),
                observed.clone(),
                counts.clone(),
            )));
        }
        for t in tasks {
            t.await.map_err(|e| format!("client panicked: {e}"))??;
        }
        Ok::<_, String>(())
    })?;
    let grants = counts[0].load(Ordering::Relaxed);
    let held_by_other = counts[1].load(Ordering::Relaxed);
    let commands = counts[2].load(Ordering::Relaxed);
    let d = rt.block_on(same_everywhere(&nodes))?;
    if !d.locks.is_empty() {
        return Err(format!(
            "locks still held after every client released: {:?}",
            d.locks
        ));
    }
    // A retried request may be applied twice (each is a command); a
    // retried acquire is re-entrant, so grants are exact.
    if d.grants != grants || d.commands < commands {
        return Err(format!(
            "the table counts {} grants / {} commands, the clients saw {grants} / {commands}",
            d.grants, d.commands
        ));
    }
    let mut snapshots_taken = Vec::new();
    for n in &nodes {
        let text = rt.block_on(n.metrics_text()).map_err(|e| e.to_string())?;
        snapshots_taken.push(counter(&text, "skiff_snapshots_taken_total")?);
    }
    if snapshots_taken.contains(&0) {
        return Err(format!("a member took no snapshot: {snapshots_taken:?}"));
    }

    // 2. Stop a follower; the others apply (and snapshot, and compact the
    //    log) past it; leave some locks held.
    let down = (1..=3).find(|&id| id != leader).expect("3 members");
    cluster.stop(down)?;
    let up: Vec<NodeHandle<LockTable>> = nodes.iter().filter(|n| n.id() != down).cloned().collect();
    let mut expected = Vec::new();
    rt.block_on(async {
        for k in 0..opts.while_down {
            let lock = format!("churn-{}", k % 5);
            let n = &up[k % up.len()];
            propose(
                n,
                Command::Acquire {
                    lock: lock.clone(),
                    owner: 1000,
                },
            )
            .await?;
            propose(n, Command::Release { lock, owner: 1000 }).await?;
        }
        for k in 0..opts.left_held {
            let (lock, owner) = (format!("held-{k:03}"), 2000 + k as u64);
            match propose(
                &up[k % up.len()],
                Command::Acquire {
                    lock: lock.clone(),
                    owner,
                },
            )
            .await?
            {
                (Response::Granted { .. }, _) => expected.push((lock, owner)),
                (r, _) => return Err(format!("{lock}: free lock answered {r:?}")),
            }
        }
        Ok::<_, String>(())
    })?;

    // 3. Restart it from its data directory; it catches up (from the
    //    leader's snapshot when the log it needs was compacted away).
    cluster
        .restart(down)
        .map_err(|e| format!("restarting node {down}: {e}"))?;
    cluster
        .wait_leader(LEADER_TIMEOUT)
        .ok_or("no leader after the restart")?;
    let nodes = handles(&cluster)?;
    let target = nodes.iter().map(|n| n.status().commit).max().unwrap_or(0);
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    let restarted = &nodes[down as usize - 1];
    while restarted.status().applied < target {
        if Instant::now() > deadline {
            return Err(format!(
                "node {down} applied {} of {target} after {CATCH_UP_TIMEOUT:?}",
                restarted.status().applied
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = rt.block_on(same_everywhere(&nodes))?;
    let held: Vec<(String, u64)> = d.locks.iter().map(|(l, g)| (l.clone(), g.owner)).collect();
    if held != expected {
        return Err(format!(
            "after the restart the table holds {held:?}, expected {expected:?}"
        ));
    }
    let text = rt
        .block_on(restarted.metrics_text())
        .map_err(|e| e.to_string())?;
    let restarted_installed = counter(&text, "skiff_snapshots_installed_total")?;
    drop(nodes);
    cluster.shutdown()?;
    Ok(Report {
        grants,
        held_by_other,
        commands,
        snapshots_taken,
        restarted: down,
        restarted_installed,
        elapsed: started.elapsed(),
    })
}
