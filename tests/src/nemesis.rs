//! Fault campaigns against real `skiff serve` processes, checked for
//! linearizability and lost acknowledged writes.
//!
//! A campaign runs rounds on one [`Cluster`]. In each round clients
//! ([`WorkloadConfig::clients`] tokio tasks, each with its own [`Client`])
//! put, read and compare-and-set a small set of keys and write unique
//! "ack" keys, recording every operation with the times it was called and
//! answered, while the nemesis drives [`WorkloadConfig`]`::cycles` fault
//! cycles on a seeded schedule: apply one [`Fault`], hold it, heal it, wait
//! until the cluster takes a write again. At the end of the round every
//! key is read once more, the history goes to skiff-raft's checker
//! ([`linearizability::check`]) and every acknowledged ack key must be on
//! every member.
//!
//! Faults: `SIGKILL` and restart (any member, or the leader); `SIGSTOP` for
//! longer than an election timeout, then `SIGCONT`; network partitions with
//! nftables rules on the loopback addresses the members' peer ports use
//! (each member has its own 127.a.b.id, see
//! [`ClusterOptions::peer_ip_prefix`]): a minority cut off, the leader cut
//! off, and packets lost one way between two members.
//!
//! What an answer proves: an operation that returned is recorded with its
//! answer; a write whose request failed in any way but "could not connect"
//! (never sent) is recorded as unknown: it may or may not have happened. A
//! failed read is dropped (it had no effect).
//!
//! A failing round copies the schedule, the history, every member's log
//! and data directory to a directory under [`artifacts_root`] and prints
//! the command that replays the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_raft::testing::linearizability::{self, Input, Operation, Output, Verdict};

use crate::client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use crate::lying_disk::{self, LyingDisk};
use crate::{Client, Cluster, ConnectOptions, NodeId};

/// Steps the checker may spend on one key before answering `Unknown`.
pub const CHECK_BUDGET: u64 = 5_000_000;
/// How long the cluster may take to accept a write again after a fault is
/// healed.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member may take to apply what the leader committed, at the
/// end of a round.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeouts of the workload's clients: short, so that a client stuck on a
/// paused or cut-off member moves on quickly.
pub const WORKLOAD_CLIENT: ConnectOptions = ConnectOptions {
    request_timeout: Duration::from_secs(2),
    connect_timeout: Duration::from_millis(500),
};

/// The kinds of fault the nemesis applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// `SIGKILL` a random member, restart it after the hold.
    Kill,
    /// `SIGKILL` the leader, restart it after the hold.
    KillLeader,
    /// `SIGSTOP` a random member for the hold, then `SIGCONT`.
    Pause,
    /// `SIGSTOP` the leader for the hold, then `SIGCONT`.
    PauseLeader,
    /// Cut a random minority off from the rest (both directions).
    PartitionMinority,
    /// Cut the leader off from every other member.
    IsolateLeader,
    /// Drop every packet from one member to another, one way only.
    OneWayLoss,
    /// Restart the leader with its clock at [`WorkloadConfig::slow_tick_ms`]
    /// per tick ([`SKEWED_TICK_MS`]: 10% slow, the drift
    /// `--lease-drift-pct` allows by default), hand it
    /// leadership back, then cut it off from every other member for the
    /// hold; afterwards it restarts with the cluster's clock. A slow
    /// leader is the clock a lease must be safe against: it believes its
    /// lease longer than the followers' promise lasts.
    SlowLeaderIsolated,
    /// `SIGKILL` a random member and throw away every write its disk had
    /// not made durable (its [`LyingDisk`] loses power); restart it after
    /// the hold.
    PowerLoss,
    /// Every member loses power at once (a coordinated power loss): all
    /// are `SIGKILL`ed, every disk drops what was not fsynced, and all
    /// restart after the hold. Whatever was acknowledged must survive.
    PowerLossAll,
    /// The next fsync of a WAL segment on a random member fails with `EIO`
    /// and loses the writes it covered. The member must stop (an fsync
    /// error on the WAL is fatal) with a non-zero exit status within
    /// [`FSYNC_FAULT_TIMEOUT`]; its machine then loses power and it
    /// restarts after the hold.
    FsyncError,
    /// The leader's disk stops answering: its WAL fsyncs hang, unanswered,
    /// for [`DISK_STALL_EXTRA`] plus the hold (long enough for a leader
    /// whose writes stall to hand leadership over), then complete.
    StallLeaderDisk,
}

/// What a [`Fault::StallLeaderDisk`] holds beyond the drawn hold: above
/// the time after which a leader whose WAL write stalls hands leadership
/// over (4 longest election timeouts: 4 s at the campaign's 100 ticks of
/// 10 ms), so that the hand-over happens under the workload.
pub const DISK_STALL_EXTRA: Duration = Duration::from_secs(5);

/// How long a member may run on after a WAL fsync of its failed, and how
/// long the nemesis waits for that fsync.
pub const FSYNC_FAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// The tick of a member whose clock the nemesis slows, by default (the
/// cluster's is 10 ms).
pub const SKEWED_TICK_MS: u64 = 11;

impl Fault {
    /// Every kind, in the order a round's schedule draws them from.
    pub const ALL: [Fault; 12] = [
        Fault::Kill,
        Fault::KillLeader,
        Fault::Pause,
        Fault::PauseLeader,
        Fault::PartitionMinority,
        Fault::IsolateLeader,
        Fault::OneWayLoss,
        Fault::SlowLeaderIsolated,
        Fault::PowerLoss,
        Fault::PowerLossAll,
        Fault::FsyncError,
        Fault::StallLeaderDisk,
    ];

    fn needs_firewall(self) -> bool {
        matches!(
            self,
            Fault::PartitionMinority
                | Fault::IsolateLeader
                | Fault::OneWayLoss
                | Fault::SlowLeaderIsolated
        )
    }

    fn needs_lying_disks(self) -> bool {
        matches!(
            self,
            Fault::PowerLoss | Fault::PowerLossAll | Fault::FsyncError | Fault::StallLeaderDisk
        )
    }
}

/// A seeded generator (splitmix64): the schedule of a seed is the same on
/// every run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64) as usize]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Packet-filter rules on loopback, in an nftables table of their own that
/// is deleted on drop.
pub struct Firewall {
    table: String,
}

impl Firewall {
    /// Creates the table `name` with an empty input chain, or says why it
    /// cannot (not root, no `nft`).
    pub fn new(name: &str) -> Result<Firewall, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network partitions need root (nftables rules)".into());
        }
        match Command::new("nft").arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => {
                return Err(
                    "network partitions need the nft command (Debian package nftables)".into(),
                )
            }
        }
        let fw = Firewall {
            table: name.to_string(),
        };
        let _ = nft(&["delete", "table", "inet", name]);
        nft(&["add", "table", "inet", name])?;
        // Dropped on the way in, so the sender sees a black hole (lost
        // packets, retransmissions, timeouts), not an error.
        nft(&[
            "add",
            "chain",
            "inet",
            name,
            "input",
            "{ type filter hook input priority 0 ; policy accept ; }",
        ])?;
        Ok(fw)
    }

    /// Drops every packet from `from` to `to` (one direction).
    pub fn block(&self, from: IpAddr, to: IpAddr) -> Result<(), String> {
        nft(&[
            "add",
            "rule",
            "inet",
            &self.table,
            "input",
            "ip",
            "saddr",
            &from.to_string(),
            "ip",
            "daddr",
            &to.to_string(),
            "drop",
        ])
    }

    /// Removes every rule.
    pub fn heal(&self) -> Result<(), String> {
        nft(&["flush", "chain", "inet", &self.table, "input"])
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.table]) {
            eprintln!(
                "nemesis: could not delete nftables table {}: {e}",
                self.table
            );
        }
    }
}

fn nft(args: &[&str]) -> Result<(), String> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .map_err(|e| format!("nft {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What one round does.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Seed of the round's schedule and of the clients' choices.
    pub seed: u64,
    /// Fault cycles in the round.
    pub cycles: usize,
    /// Fault kinds to draw from (each appears once per `kinds.len()`
    /// cycles, in a seeded order).
    pub kinds: Vec<Fault>,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the linearizability check covers.
    pub keys: u64,
    /// Pause between two operations of one client: keeps the number of
    /// operations in flight per key (what the check's cost grows with) low.
    pub op_pause: Duration,
    /// How long a fault is held: drawn in this range.
    pub hold: (Duration, Duration),
    /// Quiet time after a recovery, before the next fault.
    pub quiet: Duration,
    /// Prefix of every key the round writes (distinct per round).
    pub key_prefix: String,
    /// Reads served by whichever member the client talks to, without a
    /// ReadIndex round (etcd's serializable reads): not linearizable under
    /// partitions. Only for the test that shows the checker catches a
    /// stale read through this harness.
    pub serializable_reads: bool,
    /// One more client per member that only reads and stays on that member
    /// through errors and partitions, so that a member cut off from the
    /// majority keeps being asked for as long as the fault lasts (a
    /// workload client moves to another member at its first failed write).
    pub pinned_readers: bool,
    /// The tick, in ms, of a leader whose clock [`Fault::SlowLeaderIsolated`]
    /// slows (the cluster's is 10 ms).
    pub slow_tick_ms: u64,
    /// Bound on one client request ([`WORKLOAD_CLIENT`]'s by default): a
    /// client moves to another member after it.
    pub request_timeout: Duration,
    /// Where a failing round saves its evidence; `None`: [`artifacts_root`].
    pub artifacts: Option<PathBuf>,
}

impl WorkloadConfig {
    /// How the workload's clients connect.
    fn client_options(&self) -> ConnectOptions {
        ConnectOptions {
            request_timeout: self.request_timeout,
            ..WORKLOAD_CLIENT
        }
    }
}

/// Counts of what a round did, for the test's report.
#[derive(Debug, Default, Clone)]
pub struct RoundStats {
    pub cycles: usize,
    pub faults: BTreeMap<String, usize>,
    pub operations: usize,
    pub completed: usize,
    pub unknown: usize,
    pub reads: usize,
    pub cas: usize,
    pub acked_writes: usize,
    pub lost_acked_writes: usize,
    pub linearizable: bool,
    pub check_steps: u64,
    pub longest_recovery: Duration,
    /// Power losses of one member (a [`Fault::PowerLossAll`] counts one per
    /// member).
    pub power_losses: usize,
    /// Files and directory entries those power losses put back to their
    /// last fsync: what the disks had not made durable.
    pub files_reverted: usize,
    pub entries_reverted: usize,
    /// WAL fsyncs failed with `EIO`, each of which stopped its member.
    pub fsync_errors: usize,
    /// Leader disk stalls, the fsyncs they held, and those after which
    /// another member led.
    pub disk_stalls: usize,
    pub fsyncs_stalled: usize,
    pub stall_hand_overs: usize,
}

/// One client operation as the workload records it, before it becomes a
/// checker [`Operation`].
#[derive(Debug, Clone)]
struct Recorded {
    op: Operation,
    /// The member the client talked to last (for the failure report).
    endpoint: String,
}

#[derive(Default)]
struct History {
    ops: Vec<Recorded>,
    acked: Vec<String>,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    history: Mutex<History>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn record(&self, op: Operation, endpoint: String) {
        let mut history = self.history.lock().expect("history lock");
        history.ops.push(Recorded { op, endpoint });
    }
}

/// Runs one round on `cluster` (see the module docs). `Err` carries what
/// failed; the artifacts are saved before it returns.
pub async fn run_round(
    cluster: &mut Cluster,
    firewall: Option<&Firewall>,
    config: &WorkloadConfig,
) -> Result<RoundStats, String> {
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        history: Mutex::new(History::default()),
    });
    let endpoints = cluster.endpoints();
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        let shared = shared.clone();
        let config = config.clone();
        let mut endpoints = endpoints.clone();
        let first = c % endpoints.len();
        endpoints.rotate_left(first);
        tasks.push(tokio::spawn(async move {
            client_loop(c as u64 + 1, endpoints, &config, &shared).await
        }));
    }
    if config.pinned_readers {
        for (i, endpoint) in endpoints.iter().enumerate() {
            let shared = shared.clone();
            let config = config.clone();
            let id = (config.clients + 1 + i) as u64;
            let endpoint = endpoint.clone();
            tasks.push(tokio::spawn(async move {
                reader_loop(id, endpoint, &config, &shared).await
            }));
        }
    }

    let mut schedule = String::new();
    let mut stats = RoundStats::default();
    let outcome = nemesis(
        cluster,
        firewall,
        config,
        &shared,
        &mut schedule,
        &mut stats,
    )
    .await;

    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if let Err(e) = t.await {
            return Err(format!("a workload client panicked: {e}"));
        }
    }
    let outcome = match outcome {
        Ok(()) => check_round(cluster, config, &shared, &mut stats).await,
        Err(e) => Err(e),
    };
    if let Err(why) = &outcome {
        let history = shared.history.lock().expect("history lock");
        let saved = save_artifacts(cluster, config, &schedule, &history.ops, why);
        return Err(format!("{why}\n{saved}"));
    }
    Ok(stats)
}

/// The fault schedule of one round.
async fn nemesis(
    cluster: &mut Cluster,
    firewall: Option<&Firewall>,
    config: &WorkloadConfig,
    shared: &Shared,
    schedule: &mut String,
    stats: &mut RoundStats,
) -> Result<(), String> {
    let mut rng = Rng::new(config.seed ^ 0x6e65_6d65_7369_7321);
    let mut order: Vec<Fault> = Vec::new();
    let ids = cluster.ids();
    for cycle in 0..config.cycles {
        if order.is_empty() {
            order = config.kinds.clone();
            rng.shuffle(&mut order);
        }
        let fault = order.pop().expect("a fault kind");
        check_alive(cluster, cycle)?;
        let (leader, _) = cluster.wait_leader(RECOVERY_TIMEOUT).await;
        let hold = Duration::from_millis(rng.range(
            config.hold.0.as_millis() as u64,
            config.hold.1.as_millis() as u64 + 1,
        ));
        let victim = rng.pick(&ids);
        let mut others: Vec<NodeId> = ids.iter().copied().filter(|&i| i != victim).collect();
        rng.shuffle(&mut others);
        let _ = writeln!(
            schedule,
            "t={:.3}s cycle {cycle}: {fault:?} leader={leader} victim={victim} hold={}ms",
            shared.start.elapsed().as_secs_f64(),
            hold.as_millis()
        );
        let fw =
            || firewall.ok_or_else(|| format!("{fault:?} needs a firewall and the round has none"));
        let disk = |cluster: &Cluster, id: NodeId| -> Result<(), String> {
            cluster
                .disk(id)
                .map(drop)
                .ok_or_else(|| format!("{fault:?} needs lying disks and member {id} has none"))
        };
        match fault {
            Fault::Kill | Fault::KillLeader => {
                let target = if fault == Fault::Kill { victim } else { leader };
                tokio::task::block_in_place(|| cluster.kill(target));
                tokio::time::sleep(hold).await;
                let restarted = tokio::task::block_in_place(|| cluster.try_restart(target));
                restarted.map_err(|e| format!("cycle {cycle}: restart of {target}: {e}"))?;
            }
            Fault::Pause | Fault::PauseLeader => {
                let target = if fault == Fault::Pause {
                    victim
                } else {
                    leader
                };
                cluster.pause(target);
                tokio::time::sleep(hold).await;
                cluster.resume(target);
            }
            Fault::PartitionMinority | Fault::IsolateLeader => {
                let fw = fw()?;
                let minority: Vec<NodeId> = if fault == Fault::IsolateLeader {
                    vec![leader]
                } else {
                    let mut all = ids.clone();
                    rng.shuffle(&mut all);
                    all.truncate((ids.len() - 1) / 2);
                    all
                };
                let _ = writeln!(schedule, "    minority {minority:?}");
                for &a in &minority {
                    for &b in ids.iter().filter(|b| !minority.contains(b)) {
                        fw.block(cluster.peer_ip(a), cluster.peer_ip(b))?;
                        fw.block(cluster.peer_ip(b), cluster.peer_ip(a))?;
                    }
                }
                tokio::time::sleep(hold).await;
                fw.heal()?;
            }
            Fault::SlowLeaderIsolated => {
                let fw = fw()?;
                let target = leader;
                let slow = vec![
                    "--tick-interval-ms".to_string(),
                    config.slow_tick_ms.to_string(),
                ];
                restart_with(cluster, target, slow, cycle)?;
                if !move_leader_to(cluster, target).await {
                    return Err(format!(
                        "cycle {cycle}: member {target} (clock slowed) did not take leadership \
                         within {:.0} s of MoveLeader",
                        RECOVERY_TIMEOUT.as_secs_f64()
                    ));
                }
                let _ = writeln!(
                    schedule,
                    "    member {target} restarted at {} ms per tick, leads again",
                    config.slow_tick_ms
                );
                for &b in ids.iter().filter(|&&b| b != target) {
                    fw.block(cluster.peer_ip(target), cluster.peer_ip(b))?;
                    fw.block(cluster.peer_ip(b), cluster.peer_ip(target))?;
                }
                tokio::time::sleep(hold).await;
                fw.heal()?;
                restart_with(cluster, target, Vec::new(), cycle)?;
            }
            Fault::PowerLoss => {
                disk(cluster, victim)?;
                power_cut(cluster, &[victim], schedule, stats).await;
                tokio::time::sleep(hold).await;
                let restarted = tokio::task::block_in_place(|| cluster.try_restart(victim));
                restarted.map_err(|e| format!("cycle {cycle}: restart of {victim}: {e}"))?;
            }
            Fault::PowerLossAll => {
                for &id in &ids {
                    disk(cluster, id)?;
                }
                power_cut(cluster, &ids, schedule, stats).await;
                tokio::time::sleep(hold).await;
                for &id in &ids {
                    let restarted = tokio::task::block_in_place(|| cluster.try_restart(id));
                    restarted.map_err(|e| format!("cycle {cycle}: restart of {id}: {e}"))?;
                }
            }
            Fault::FsyncError => {
                disk(cluster, victim)?;
                fsync_error(cluster, victim, cycle, schedule)?;
                stats.fsync_errors += 1;
                lose_power(cluster, victim, schedule, stats);
                if let Some(disk) = cluster.disk(victim) {
                    disk.power_on();
                }
                tokio::time::sleep(hold).await;
                let restarted = tokio::task::block_in_place(|| cluster.try_restart(victim));
                restarted.map_err(|e| format!("cycle {cycle}: restart of {victim}: {e}"))?;
            }
            Fault::StallLeaderDisk => {
                disk(cluster, leader)?;
                if let Some(d) = cluster.disk(leader) {
                    d.stall_fsyncs(lying_disk::is_wal_segment);
                }
                tokio::time::sleep(DISK_STALL_EXTRA + hold).await;
                let mut moved = false;
                for &id in ids.iter().filter(|&&id| id != leader) {
                    if let Ok(s) = cluster.status(id).await {
                        moved |= s.leader != 0 && s.leader != leader;
                    }
                }
                let held = cluster.disk(leader).map_or(0, LyingDisk::end_stall);
                stats.disk_stalls += 1;
                stats.fsyncs_stalled += held;
                stats.stall_hand_overs += usize::from(moved);
                let _ = writeln!(
                    schedule,
                    "    member {leader}'s WAL fsyncs stalled ({held} held); another member led                      before the end: {moved}"
                );
            }
            Fault::OneWayLoss => {
                let fw = fw()?;
                let to = others[0];
                let _ = writeln!(schedule, "    packets {victim} -> {to} dropped");
                fw.block(cluster.peer_ip(victim), cluster.peer_ip(to))?;
                tokio::time::sleep(hold).await;
                fw.heal()?;
            }
        }
        let healed = Instant::now();
        check_alive(cluster, cycle)?;
        wait_writable(cluster, config, cycle).await?;
        let recovery = healed.elapsed();
        stats.longest_recovery = stats.longest_recovery.max(recovery);
        let _ = writeln!(
            schedule,
            "    healed; writable again after {} ms",
            recovery.as_millis()
        );
        *stats.faults.entry(format!("{fault:?}")).or_default() += 1;
        stats.cycles += 1;
        tokio::time::sleep(config.quiet).await;
    }
    Ok(())
}

/// The power of `targets` goes while they write: each disk goes dark at
/// its next WAL fsync (or after [`POWER_CUT_WAIT`] without one), so that
/// a write is in flight when it does; then the members are `SIGKILL`ed and
/// their disks drop what was not durable.
async fn power_cut(
    cluster: &mut Cluster,
    targets: &[NodeId],
    schedule: &mut String,
    stats: &mut RoundStats,
) {
    for &id in targets {
        if let Some(disk) = cluster.disk(id) {
            disk.cut_power_at_next_fsync(lying_disk::is_wal_segment);
        }
    }
    let deadline = Instant::now() + POWER_CUT_WAIT;
    let dark = |c: &Cluster| {
        targets
            .iter()
            .filter(|&&id| c.disk(id).is_some_and(LyingDisk::is_dark))
            .count()
    };
    while dark(cluster) < targets.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = writeln!(
        schedule,
        "    power cut at a WAL fsync on {} of {} members",
        dark(cluster),
        targets.len()
    );
    // SIGKILL first, then the loss (which answers the held fsyncs, so the
    // processes can exit), then reap, then the power comes back.
    for &id in targets {
        cluster.sigkill(id);
    }
    for &id in targets {
        lose_power(cluster, id, schedule, stats);
    }
    tokio::task::block_in_place(|| {
        for &id in targets {
            cluster.kill(id);
        }
    });
    for &id in targets {
        if let Some(disk) = cluster.disk(id) {
            disk.power_on();
        }
    }
}

/// How long [`power_cut`] waits for a member's next WAL fsync.
pub const POWER_CUT_WAIT: Duration = Duration::from_secs(5);

/// `id` (killed) loses power: its disk drops what was not durable.
fn lose_power(cluster: &Cluster, id: NodeId, schedule: &mut String, stats: &mut RoundStats) {
    if let Some(disk) = cluster.disk(id) {
        let loss = disk.lose_power();
        stats.power_losses += 1;
        stats.files_reverted += loss.files_reverted;
        stats.entries_reverted += loss.entries_reverted;
        let _ = writeln!(
            schedule,
            "    member {id} lost power: {} files and {} directory entries went back to their \
             last fsync, {} fsyncs in flight never completed",
            loss.files_reverted, loss.entries_reverted, loss.fsyncs_in_flight
        );
    }
}

/// Arms an `EIO` on `id`'s next WAL fsync and waits for the member to stop
/// because of it (see [`Fault::FsyncError`]).
fn fsync_error(
    cluster: &mut Cluster,
    id: NodeId,
    cycle: usize,
    schedule: &mut String,
) -> Result<(), String> {
    fn disk(c: &Cluster, id: NodeId) -> &LyingDisk {
        c.disk(id).expect("checked by the caller")
    }
    disk(cluster, id).fail_next_fsync(lying_disk::is_wal_segment);
    let exited = tokio::task::block_in_place(|| cluster.wait_exit(id, FSYNC_FAULT_TIMEOUT));
    let fired = !disk(cluster, id).fsync_fault_armed();
    disk(cluster, id).disarm();
    let last_line = |c: &Cluster| {
        c.log(id)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string()
    };
    match exited {
        Some(status) if !status.success() => {
            let _ = writeln!(
                schedule,
                "    member {id} stopped on its failed WAL fsync ({status}): {}",
                last_line(cluster)
            );
            Ok(())
        }
        Some(status) => Err(format!(
            "cycle {cycle}: member {id} exited with {status} after a WAL fsync failed: a \
             failure must exit non-zero"
        )),
        None if fired => Err(format!(
            "cycle {cycle}: member {id} still ran {:.0} s after a WAL fsync of its failed \
             with EIO (an fsync error on the WAL must be fatal)",
            FSYNC_FAULT_TIMEOUT.as_secs_f64()
        )),
        None => Err(format!(
            "cycle {cycle}: member {id} fsynced no WAL segment within {:.0} s under load",
            FSYNC_FAULT_TIMEOUT.as_secs_f64()
        )),
    }
}

/// Fails when a member's process ended without the nemesis killing it (a
/// crash, an abort, a fatal error).
fn check_alive(cluster: &mut Cluster, cycle: usize) -> Result<(), String> {
    let gone = cluster.exited();
    if gone.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = gone
        .iter()
        .map(|(id, status)| {
            let log = cluster.log(*id);
            let last: Vec<&str> = log.lines().rev().take(3).collect();
            format!("member {id} exited ({status}); last log lines: {last:?}")
        })
        .collect();
    Err(format!("cycle {cycle}: {}", what.join("; ")))
}

/// Waits until some member takes a write (a key outside the checked set).
/// SIGKILLs `id` and starts it again with `args` after the cluster's.
fn restart_with(
    cluster: &mut Cluster,
    id: NodeId,
    args: Vec<String>,
    cycle: usize,
) -> Result<(), String> {
    tokio::task::block_in_place(|| {
        cluster.kill(id);
        cluster.set_member_args(id, args);
        cluster.try_restart(id)
    })
    .map_err(|e| format!("cycle {cycle}: restart of {id}: {e}"))
}

/// Hands leadership to `target` (MoveLeader, retried while it catches up);
/// whether it leads within [`RECOVERY_TIMEOUT`].
async fn move_leader_to(cluster: &Cluster, target: NodeId) -> bool {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    while Instant::now() < deadline {
        let (leader, _) = cluster.wait_leader(RECOVERY_TIMEOUT).await;
        if leader == target {
            return true;
        }
        if let Ok(mut c) = Client::connect(&[cluster.endpoint(leader)], WORKLOAD_CLIENT).await {
            let _ = c.move_leader(target).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_writable(
    cluster: &Cluster,
    config: &WorkloadConfig,
    cycle: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let key = format!("{}probe", config.key_prefix);
    let mut last = String::new();
    while Instant::now() < deadline {
        match Client::connect(&cluster.endpoints(), WORKLOAD_CLIENT).await {
            Ok(mut c) => match c.put(&key, cycle.to_string(), None).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "cycle {cycle}: the cluster took no write within {:.0} s of the fault's end (last error: {last})",
        RECOVERY_TIMEOUT.as_secs_f64()
    ))
}

fn key_name(config: &WorkloadConfig, key: u64) -> String {
    format!("{}k{key}", config.key_prefix)
}

fn parse_value(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// One client: operations until the round stops.
async fn client_loop(id: u64, endpoints: Vec<String>, config: &WorkloadConfig, shared: &Shared) {
    let mut rng = Rng::new(config.seed.wrapping_mul(31).wrapping_add(id));
    let mut client: Option<Client> = None;
    let mut seq = 0u64;
    // The value this client last saw per key: what its Cas expects.
    let mut seen: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match Client::connect(&endpoints, config.client_options()).await {
                Ok(c) => client.insert(c),
                Err(_) => {
                    tokio::time::sleep(config.op_pause).await;
                    continue;
                }
            },
        };
        seq += 1;
        let value = id * 1_000_000_000 + seq;
        let key = rng.range(0, config.keys);
        let roll = rng.range(0, 100);
        let endpoint = c.current_endpoint().to_string();
        let call = shared.now();
        // (input, result): result None = the op never reached a member.
        let (input, result): (Input, Result<Output, crate::client::Error>) = if roll < 30 {
            let input = Input::Put { key, value };
            let r = c.put(key_name(config, key), value.to_string(), None).await;
            (input, r.map(|_| Output::Ok))
        } else if roll < 70 {
            let input = Input::Get { key };
            let options = config
                .serializable_reads
                .then(|| GetOptions::new().with_serializable());
            let r = c.get(key_name(config, key), options).await;
            (
                input,
                r.map(|resp| Output::Value(resp.kvs.first().and_then(|kv| parse_value(&kv.value)))),
            )
        } else if roll < 85 {
            let expect = seen.get(&key).copied().flatten();
            let input = Input::Cas {
                key,
                expect,
                new: value,
            };
            let name = key_name(config, key);
            let compare = match expect {
                Some(v) => Compare::value(&name, CompareOp::Equal, v.to_string()),
                None => Compare::create_revision(&name, CompareOp::Equal, 0),
            };
            let txn =
                Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(&name, value.to_string(), None)]);
            let r = c.txn(txn).await;
            (input, r.map(|resp| Output::Cas(resp.succeeded)))
        } else {
            // An ack write: a unique key that must survive everything once
            // acknowledged.
            let name = format!("{}ack/{id}/{seq}", config.key_prefix);
            let ok = c.put(&name, "1", None).await.is_ok();
            if ok {
                shared
                    .history
                    .lock()
                    .expect("history lock")
                    .acked
                    .push(name);
            } else {
                c.next_endpoint();
            }
            tokio::time::sleep(config.op_pause).await;
            continue;
        };
        let ret = shared.now();
        let op = match result {
            Ok(output) => {
                match output {
                    Output::Value(v) => {
                        seen.insert(key, v);
                    }
                    Output::Ok => {
                        seen.insert(key, Some(value));
                    }
                    Output::Cas(true) => {
                        seen.insert(key, Some(value));
                    }
                    Output::Cas(false) => {
                        seen.remove(&key);
                    }
                }
                Some(Operation::completed(id, input, call, ret, output))
            }
            Err(e) => {
                c.next_endpoint();
                match (input, &e) {
                    (Input::Get { .. }, _) => None,
                    (_, crate::client::Error::Connect { .. }) => None,
                    _ => Some(Operation::unknown(id, input, call)),
                }
            }
        };
        if let Some(op) = op {
            shared.record(op, endpoint);
        }
        tokio::time::sleep(config.op_pause).await;
    }
}

/// A pinned reader (see [`WorkloadConfig::pinned_readers`]): reads random
/// keys from one member only, reconnecting to the same member after an
/// error. A failed read is not recorded (it had no effect).
async fn reader_loop(id: u64, endpoint: String, config: &WorkloadConfig, shared: &Shared) {
    let mut rng = Rng::new(config.seed.wrapping_mul(37).wrapping_add(id));
    let mut client: Option<Client> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match Client::connect(std::slice::from_ref(&endpoint), config.client_options())
                .await
            {
                Ok(c) => client.insert(c),
                Err(_) => {
                    tokio::time::sleep(config.op_pause).await;
                    continue;
                }
            },
        };
        let key = rng.range(0, config.keys);
        let options = config
            .serializable_reads
            .then(|| GetOptions::new().with_serializable());
        let call = shared.now();
        match c.get(key_name(config, key), options).await {
            Ok(resp) => {
                let ret = shared.now();
                let output = Output::Value(resp.kvs.first().and_then(|kv| parse_value(&kv.value)));
                let op = Operation::completed(id, Input::Get { key }, call, ret, output);
                shared.record(op, endpoint.clone());
            }
            Err(_) => client = None,
        }
        tokio::time::sleep(config.op_pause).await;
    }
}

/// The end of a round: final reads, the linearizability check, and every
/// acknowledged ack key on every member.
async fn check_round(
    cluster: &Cluster,
    config: &WorkloadConfig,
    shared: &Shared,
    stats: &mut RoundStats,
) -> Result<(), String> {
    // A last read of every key, once all faults are healed.
    let mut client = Client::connect(&cluster.endpoints(), WORKLOAD_CLIENT)
        .await
        .map_err(|e| format!("final reads: {e}"))?;
    for key in 0..config.keys {
        let mut attempts = 0;
        loop {
            let call = shared.now();
            match client.get(key_name(config, key), None).await {
                Ok(resp) => {
                    let v = resp.kvs.first().and_then(|kv| parse_value(&kv.value));
                    let op = Operation::completed(
                        0,
                        Input::Get { key },
                        call,
                        shared.now(),
                        Output::Value(v),
                    );
                    shared.record(op, client.current_endpoint().to_string());
                    break;
                }
                Err(e) if attempts < 20 => {
                    attempts += 1;
                    client.next_endpoint();
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("final read of key {key}: {e}")),
            }
        }
    }

    let (ops, acked) = {
        let h = shared.history.lock().expect("history lock");
        (
            h.ops.iter().map(|r| r.op).collect::<Vec<_>>(),
            h.acked.clone(),
        )
    };
    stats.operations = ops.len();
    stats.completed = ops.iter().filter(|o| o.ret.is_some()).count();
    stats.unknown = ops.len() - stats.completed;
    stats.reads = ops
        .iter()
        .filter(|o| matches!(o.input, Input::Get { .. }))
        .count();
    stats.cas = ops
        .iter()
        .filter(|o| matches!(o.input, Input::Cas { .. }))
        .count();
    stats.acked_writes = acked.len();
    let (verdict, check) = linearizability::check_with_stats(&ops, CHECK_BUDGET);
    stats.check_steps = check.steps;
    match &verdict {
        Verdict::Linearizable => stats.linearizable = true,
        Verdict::NotLinearizable { .. } => {
            return Err(format!(
                "the history is not linearizable: {}",
                verdict.explain(&ops)
            ))
        }
        Verdict::Unknown { key } => {
            return Err(format!(
                "the checker ran out of budget ({CHECK_BUDGET} steps) on key {key}: lower the \
                 clients or raise op_pause"
            ))
        }
    }

    // Every acknowledged ack key, on every member (serializable reads,
    // once each member caught up).
    let expected: BTreeSet<String> = acked.into_iter().collect();
    let prefix = format!("{}ack/", config.key_prefix);
    for id in cluster.ids() {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        let missing = loop {
            let found = cluster.keys_with_prefix(id, &prefix).await;
            let missing: Vec<&String> = match &found {
                Ok(keys) => expected.iter().filter(|k| !keys.contains(*k)).collect(),
                Err(_) => expected.iter().collect(),
            };
            if missing.is_empty() {
                break missing;
            }
            if Instant::now() >= deadline {
                if let Err(e) = found {
                    return Err(format!("member {id}: reading the ack keys: {e}"));
                }
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if !missing.is_empty() {
            stats.lost_acked_writes = missing.len();
            return Err(format!(
                "member {id} lacks {} of {} acknowledged writes, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(5)]
            ));
        }
    }
    Ok(())
}

/// Where failing rounds keep their evidence: `$SKIFF_NEMESIS_ARTIFACTS`, or
/// `skiff-nemesis` in the temporary directory.
pub fn artifacts_root() -> PathBuf {
    std::env::var_os("SKIFF_NEMESIS_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("skiff-nemesis"))
}

/// Copies what a failing round leaves to look at; returns what to tell the
/// reader (where it is, how to replay).
fn save_artifacts(
    cluster: &Cluster,
    config: &WorkloadConfig,
    schedule: &str,
    ops: &[Recorded],
    why: &str,
) -> String {
    let root = config.artifacts.clone().unwrap_or_else(artifacts_root);
    let dir = root.join(format!(
        "seed-{}-{}",
        config.seed,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    let mut notes = Vec::new();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        notes.push(format!("cannot create {}: {e}", dir.display()));
    }
    let mut history = String::new();
    for r in ops {
        let _ = writeln!(history, "{:?} via {}", r.op, r.endpoint);
    }
    for (name, text) in [
        ("failure.txt", why.to_string()),
        ("schedule.txt", schedule.to_string()),
        ("history.txt", history),
        ("config.txt", format!("{config:#?}")),
    ] {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            notes.push(format!("cannot write {name}: {e}"));
        }
    }
    if let Err(e) = copy_tree(cluster.dir(), &dir.join("cluster")) {
        notes.push(format!("cannot copy the cluster directory: {e}"));
    }
    format!(
        "schedule, history, logs and data directories saved in {}{}\nreplay: \
         SKIFF_NEMESIS_SEED={} cargo test --release -p skiff-tests --test nemesis -- --nocapture",
        dir.display(),
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        },
        config.seed
    )
}

pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The fault kinds this process can apply: all of them as root with
/// `nft` and FUSE (`disks`: [`lying_disk::available`]'s answer), otherwise
/// those it can, with what was left out and why.
pub fn available_kinds(
    firewall: &Result<Firewall, String>,
    disks: &Result<(), String>,
) -> (Vec<Fault>, Option<String>) {
    let mut missing = Vec::new();
    if let Err(why) = firewall {
        missing.push(format!("partitions and one-way loss skipped: {why}"));
    }
    if let Err(why) = disks {
        missing.push(format!(
            "power loss, fsync errors and disk stalls skipped: {why}"
        ));
    }
    let kinds = Fault::ALL
        .iter()
        .copied()
        .filter(|f| firewall.is_ok() || !f.needs_firewall())
        .filter(|f| disks.is_ok() || !f.needs_lying_disks())
        .collect();
    (kinds, (!missing.is_empty()).then(|| missing.join("; ")))
}

/// `SKIFF_NEMESIS_SEED`, or a seed from the clock (printed by the caller).
pub fn seed_from_env() -> u64 {
    std::env::var("SKIFF_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}
