//! Cluster membership on real processes: growing a cluster under write
//! load (a voter, then a learner that is promoted), shrinking it (a
//! follower, then the leader), replacing a SIGKILLed member, MoveLeader and
//! a rolling SIGTERM restart under load, refused requests, and etcdctl's
//! member commands.
//!
//! Load comes from a closed-loop writer ([`Writer`]) that puts distinct
//! keys and records the acknowledged ones; a failed put is retried with
//! the same key and value (harmless if the first attempt was applied after
//! all), so every key it reports acknowledged must read back on every
//! member at the end.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_tests::client::Member;
use skiff_tests::{
    etcdctl_path, poll_until, run_bounded, Client, Cluster, ClusterOptions, NodeId, CLIENT_OPTIONS,
};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A new or restarted member catching up with the leader.
const CATCHUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A removed member noticing it and exiting.
const REMOVED_EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Every acknowledged write showing up on a member.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);
/// The writer making some progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- writer

/// What a [`Writer`] did.
#[derive(Debug, Default)]
struct WriteLog {
    /// Acknowledged keys, in order.
    acked: Vec<String>,
    /// Put attempts that returned an error (each was retried).
    failed: u64,
    /// Of those, the ones a member answered with an error (not a lost
    /// connection or a timeout).
    refused: u64,
    /// The first errors, with when they happened.
    errors: Vec<String>,
    /// Longest time between two acknowledgements (or from the start to
    /// the first one).
    longest_gap: Duration,
    /// When (since the writer started) that gap ended.
    longest_gap_end: Duration,
}

/// A background closed-loop writer (see the module docs).
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<WriteLog>,
}

impl Writer {
    /// Starts writing `<prefix>/<n>` keys through a client over
    /// `endpoints`.
    fn start(endpoints: Vec<String>, prefix: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let prefix = prefix.to_string();
        let handle = tokio::spawn({
            let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
            async move { write_loop(endpoints, prefix, stop, acked, failed).await }
        });
        Writer {
            stop,
            acked,
            failed,
            handle,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `more` writes beyond the current count are
    /// acknowledged.
    async fn wait_progress(&self, more: u64, what: &str) {
        let target = self.acked() + more;
        poll_until(
            &format!("{more} more acknowledged writes ({what})"),
            PROGRESS_TIMEOUT,
            || async { (self.acked() >= target).then_some(()) },
        )
        .await;
    }

    async fn stop(self) -> WriteLog {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the writer task")
    }
}

async fn write_loop(
    endpoints: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> WriteLog {
    let started = Instant::now();
    let mut log = WriteLog::default();
    let mut rotation = 0;
    let mut client: Option<Client> = None;
    let mut last_ack = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            // After an error start over from the next endpoint: a member
            // that answers with errors (shutting down, removed) is left.
            let mut list = endpoints.clone();
            list.rotate_left(rotation % endpoints.len());
            rotation += 1;
            match Client::connect(&list, CLIENT_OPTIONS).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    note_error(&mut log, &failed, started, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let key = format!("{prefix}/{n:07}");
        let c = client.as_mut().expect("connected above");
        match c.put(&key, format!("value-{n}"), None).await {
            Ok(_) => {
                let now = Instant::now();
                if now - last_ack > log.longest_gap {
                    log.longest_gap = now - last_ack;
                    log.longest_gap_end = now - started;
                }
                last_ack = now;
                log.acked.push(key);
                acked.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            Err(e) => {
                if e.is_refusal() {
                    log.refused += 1;
                }
                note_error(&mut log, &failed, started, e.to_string());
                client = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    log
}

fn note_error(log: &mut WriteLog, failed: &AtomicU64, started: Instant, e: String) {
    log.failed += 1;
    failed.fetch_add(1, Ordering::Relaxed);
    if log.errors.len() < 12 {
        log.errors
            .push(format!("{:.2} s: {e}", started.elapsed().as_secs_f64()));
    }
}

fn print_write_log(test: &str, log: &WriteLog) {
    eprintln!(
        "{test}: {} writes acknowledged, {} failed attempts (retried), longest gap {:.0} ms \
         (ending {:.2} s in)",
        log.acked.len(),
        log.failed,
        log.longest_gap.as_secs_f64() * 1e3,
        log.longest_gap_end.as_secs_f64()
    );
    for e in &log.errors {
        eprintln!("{test}:   error at {e}");
    }
}

// --------------------------------------------------------------- helpers

/// A client over every member in `ids`.
async fn client_of(cluster: &Cluster, ids: &[NodeId]) -> Client {
    let endpoints: Vec<String> = ids.iter().map(|&id| cluster.endpoint(id)).collect();
    skiff_tests::connect(&endpoints).await
}

/// The cluster id, from a response header.
async fn cluster_id(client: &mut Client) -> u64 {
    let r = client.member_list().await.expect("member list");
    let id = r.header.expect("a header").cluster_id;
    assert_ne!(id, 0, "the header carries no cluster id");
    id
}

/// Members as (id, learner, peer URLs), sorted: what must not change.
fn shape(members: &[Member]) -> Vec<(u64, bool, Vec<String>)> {
    let mut v: Vec<_> = members
        .iter()
        .map(|m| (m.id, m.is_learner, m.peer_ur_ls.clone()))
        .collect();
    v.sort();
    v
}

/// Waits until `id` has applied everything the leader had committed when
/// called.
async fn wait_caught_up(cluster: &Cluster, leader: NodeId, id: NodeId) {
    let commit = cluster
        .status(leader)
        .await
        .unwrap_or_else(|e| panic!("status of leader {leader}: {e}"))
        .raft_index;
    cluster.wait_applied(id, commit, CATCHUP_TIMEOUT).await;
}

/// Waits until every member in `ids` holds every key in `acked` (a
/// serializable read of that member alone); panics naming what is missing.
async fn check_read_back(cluster: &Cluster, ids: &[NodeId], prefix: &str, acked: &[String]) {
    for &id in ids {
        let deadline = Instant::now() + READ_BACK_TIMEOUT;
        loop {
            let missing = missing_on(cluster, id, prefix, acked).await;
            match missing {
                Ok(m) if m.is_empty() => break,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(m) => panic!(
                    "member {id} lacks {} of {} acknowledged writes, e.g. {:?}",
                    m.len(),
                    acked.len(),
                    &m[..m.len().min(5)]
                ),
                Err(e) => panic!("cannot read member {id}: {e}"),
            }
        }
    }
}

async fn missing_on(
    cluster: &Cluster,
    id: NodeId,
    prefix: &str,
    acked: &[String],
) -> Result<Vec<String>, String> {
    let have = cluster.keys_with_prefix(id, &format!("{prefix}/")).await?;
    Ok(acked
        .iter()
        .filter(|k| !have.contains(*k))
        .cloned()
        .collect())
}

/// HashKV of every member in `ids` at the revision `leader` is at now:
/// all equal.
async fn check_hash_kv(cluster: &Cluster, leader: NodeId, ids: &[NodeId]) {
    let revision = cluster
        .status(leader)
        .await
        .unwrap_or_else(|e| panic!("status of leader {leader}: {e}"))
        .header
        .expect("a header")
        .revision;
    let mut hashes = Vec::new();
    for &id in ids {
        let h = poll_until(
            &format!("HashKV of member {id} at revision {revision}"),
            CATCHUP_TIMEOUT,
            || async { cluster.hash_kv(id, revision).await.ok() },
        )
        .await;
        hashes.push((id, h.hash, h.compact_revision, h.hash_revision));
    }
    eprintln!("HashKV at revision {revision}: {hashes:?}");
    assert!(
        hashes.windows(2).all(|w| w[0].1 == w[1].1),
        "members disagree on HashKV at revision {revision}: {hashes:?}"
    );
}

/// The member `cluster.wait_leader` agrees on, asserted to be `target`.
async fn wait_leader_is(cluster: &Cluster, target: NodeId) {
    poll_until(
        &format!("member {target} to lead, every running member agreeing"),
        LEADER_TIMEOUT,
        || async {
            let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
            (leader == target).then_some(())
        },
    )
    .await;
}

/// The cells of each data row of an etcdctl `-w table`, trimmed.
fn table_rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|r| r.first().is_some_and(|c| c != "ID"))
        .collect()
}

/// Panics (with the last lines of its log) if `id`'s process has exited.
fn assert_alive(cluster: &mut Cluster, id: NodeId, when: &str) {
    if let Some(status) = cluster.wait_exit(id, Duration::ZERO) {
        let log = cluster.log(id);
        let last: Vec<&str> = log.lines().rev().take(4).collect();
        panic!("member {id} exited ({status}) {when}; its last log lines: {last:#?}");
    }
}

/// A gRPC status' code and message, or a panic naming what came back.
fn expect_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, skiff_tests::client::Error>,
    code: tonic::Code,
    message: &str,
) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), wanted {code:?} {message:?}"),
        Err(e) => {
            let status = e
                .status()
                .unwrap_or_else(|| panic!("{what}: no gRPC status but {e}"));
            eprintln!("{what}: {:?}: {}", status.code(), status.message());
            assert_eq!(status.code(), code, "{what}: {e}");
            assert!(
                status.message().contains(message),
                "{what}: message {:?} lacks {message:?}",
                status.message()
            );
        }
    }
}

/// Adds a member with MemberAdd (through `client`) and starts its process;
/// returns its id.
async fn add_member(
    cluster: &mut Cluster,
    client: &mut Client,
    cluster_id: u64,
    learner: bool,
) -> NodeId {
    let addrs = cluster.new_member_addrs();
    let r = client
        .member_add(&[addrs.peer_url()], learner)
        .await
        .unwrap_or_else(|e| panic!("MemberAdd of {} failed: {e}", addrs.peer_url()));
    let header = r.header.as_ref().expect("a header");
    assert_eq!(header.cluster_id, cluster_id, "MemberAdd's header");
    let member = r.member.clone().expect("MemberAdd names the new member");
    let id = member.id;
    assert_ne!(id, 0);
    assert!(id < 1 << 63, "member id {id:#x} has more than 63 bits");
    assert_eq!(member.is_learner, learner, "{member:?}");
    assert_eq!(member.peer_ur_ls, vec![addrs.peer_url()], "{member:?}");
    assert!(
        r.members.iter().any(|m| m.id == id),
        "MemberAdd's member list lacks {id:#x}: {:?}",
        r.members
    );
    eprintln!(
        "added member {id} ({id:#x}) at {}, learner: {learner}",
        addrs.peer_url()
    );
    cluster.add_member_process(id, cluster_id, addrs);
    id
}

// ----------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_three_to_five_under_load() {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions::default());
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let initial = cluster.ids();
    let mut client = client_of(&cluster, &initial).await;
    let cid = cluster_id(&mut client).await;
    let writer = Writer::start(cluster.endpoints(), "grow");
    writer.wait_progress(50, "before growing").await;

    // A voter: MemberAdd, then its process.
    let id4 = add_member(&mut cluster, &mut client, cid, false).await;
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    wait_caught_up(&cluster, leader, id4).await;
    writer.wait_progress(50, "after adding a voter").await;

    // A learner: MemberAdd, its process, caught up, promoted.
    let id5 = add_member(&mut cluster, &mut client, cid, true).await;
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    wait_caught_up(&cluster, leader, id5).await;
    assert!(
        cluster.status(id5).await.expect("status").is_learner,
        "the caught-up learner's Status says it is not one"
    );
    let mut lagging = 0;
    let deadline = Instant::now() + CATCHUP_TIMEOUT;
    let promoted = loop {
        match client.member_promote(id5).await {
            Ok(r) => break r,
            Err(e) if e.to_string().contains("in sync with leader") => {
                lagging += 1;
                assert!(
                    Instant::now() < deadline,
                    "learner {id5} still not in sync after {lagging} promotions: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("MemberPromote of {id5}: {e}"),
        }
    };
    eprintln!("learner promoted after {lagging} refusals (not in sync)");
    assert!(
        promoted.members.iter().all(|m| !m.is_learner),
        "after promotion: {:?}",
        promoted.members
    );
    writer.wait_progress(50, "after promoting").await;
    let log = writer.stop().await;
    print_write_log("grow", &log);
    assert_alive(&mut cluster, id4, "after it was added as a voter");
    assert_alive(
        &mut cluster,
        id5,
        "after it was added as a learner and promoted",
    );

    // Five voters, each with its URLs.
    let all = cluster.ids();
    assert_eq!(all.len(), 5);
    let list = client.member_list().await.expect("member list");
    assert_eq!(
        list.members.iter().map(|m| m.id).collect::<BTreeSet<_>>(),
        all.iter().copied().collect::<BTreeSet<_>>(),
        "{list:?}"
    );
    for m in &list.members {
        assert!(!m.is_learner, "{m:?}");
        assert_eq!(m.peer_ur_ls, vec![cluster.peer_url(m.id)], "{m:?}");
    }
    // The new members publish their client URLs.
    poll_until(
        "members 4 and 5 to publish their client URLs",
        CATCHUP_TIMEOUT,
        || async {
            let list = client_of(&cluster, &initial)
                .await
                .member_list()
                .await
                .ok()?;
            list.members
                .iter()
                .filter(|m| m.id == id4 || m.id == id5)
                .all(|m| m.client_ur_ls == vec![cluster.endpoint(m.id)])
                .then_some(())
        },
    )
    .await;
    assert!(!cluster.status(id5).await.expect("status").is_learner);

    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    check_read_back(&cluster, &all, "grow", &log.acked).await;
    check_hash_kv(&cluster, leader, &all).await;
    eprintln!(
        "grow_three_to_five_under_load: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_five_to_three_removing_the_leader() {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 5,
        ..ClusterOptions::default()
    });
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut client = client_of(&cluster, &cluster.ids()).await;
    for i in 0..20 {
        client
            .put(format!("shrink/before-{i}"), "x", None)
            .await
            .expect("put");
    }

    // A follower first.
    let follower = *cluster
        .ids()
        .iter()
        .rev()
        .find(|&&id| id != leader)
        .unwrap();
    let r = client
        .member_remove(follower)
        .await
        .expect("remove a follower");
    assert_eq!(r.members.len(), 4, "{:?}", r.members);
    let status = cluster
        .wait_exit(follower, REMOVED_EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("removed follower {follower} still runs"));
    eprintln!("removed follower {follower} exited: {status}");
    assert!(!status.success(), "removed follower exited with {status}");
    cluster.retire(follower);

    // Then the leader, through a client of the leader alone.
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let t0 = Instant::now();
    let r = cluster
        .client(leader)
        .await
        .member_remove(leader)
        .await
        .expect("remove the leader");
    assert_eq!(r.members.len(), 3, "{:?}", r.members);
    let status = cluster
        .wait_exit(leader, REMOVED_EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("removed leader {leader} still runs"));
    eprintln!(
        "removed leader {leader} exited after {:.2} s: {status}",
        t0.elapsed().as_secs_f64()
    );
    assert!(!status.success(), "removed leader exited with {status}");
    cluster.retire(leader);

    for id in [follower, leader] {
        let log = cluster.log(id);
        assert!(
            log.contains("removed"),
            "member {id}'s log does not say it was removed"
        );
        assert!(
            cluster.data_dir(id).join("removed").exists(),
            "no `removed` marker in member {id}'s data directory"
        );
    }

    // The rest elect a leader and accept writes.
    let rest = cluster.running();
    assert_eq!(rest.len(), 3);
    let (new_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    eprintln!(
        "new leader {new_leader} {:.2} s after removing the old one",
        t0.elapsed().as_secs_f64()
    );
    assert!(rest.contains(&new_leader));
    let mut client = client_of(&cluster, &rest).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("shrink/after-{i}");
        client
            .put(&key, "y", None)
            .await
            .expect("put after shrinking");
        acked.push(key);
    }
    let list = client.member_list().await.expect("member list");
    assert_eq!(
        list.members.iter().map(|m| m.id).collect::<BTreeSet<_>>(),
        rest.iter().copied().collect::<BTreeSet<_>>(),
        "{list:?}"
    );
    check_read_back(&cluster, &rest, "shrink", &acked).await;

    // A removed member does not start again on its data directory.
    for id in [follower, leader] {
        match cluster.try_restart(id) {
            Ok(()) => {
                let exited = cluster.wait_exit(id, Duration::from_secs(5));
                panic!(
                    "removed member {id} started again on its data directory \
                     (exit within 5 s: {exited:?})"
                );
            }
            Err(why) => {
                eprintln!("restart of removed member {id} refused: {why}");
                assert!(
                    cluster.log_since_start(id).contains("removed"),
                    "member {id} refused to start without saying it was removed"
                );
            }
        }
    }
    eprintln!(
        "shrink_five_to_three_removing_the_leader: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_killed_member_under_load() {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    // The member to kill: 3, or the highest other follower when 3 leads.
    let victim = *cluster
        .ids()
        .iter()
        .rev()
        .find(|&&id| id != leader)
        .unwrap();
    let survivors: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != victim)
        .collect();
    let mut client = client_of(&cluster, &survivors).await;
    let cid = cluster_id(&mut client).await;
    let writer = Writer::start(cluster.endpoints(), "replace");
    writer.wait_progress(50, "before the kill").await;

    cluster.kill(victim);
    eprintln!("killed member {victim} (leader {leader})");
    let failed_before = writer.failed();
    writer.wait_progress(50, "with a member killed").await;

    let r = client
        .member_remove(victim)
        .await
        .expect("remove the killed member");
    assert_eq!(r.members.len(), 2, "{:?}", r.members);
    cluster.retire(victim);
    writer
        .wait_progress(50, "after removing the killed member")
        .await;

    let new = add_member(&mut cluster, &mut client, cid, false).await;
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    wait_caught_up(&cluster, leader, new).await;
    writer
        .wait_progress(50, "after adding the replacement")
        .await;
    assert_alive(
        &mut cluster,
        new,
        &format!("after it replaced member {victim}"),
    );
    let log = writer.stop().await;
    print_write_log("replace", &log);
    eprintln!(
        "replace: {} failed attempts before the kill, {} after",
        failed_before,
        log.failed - failed_before
    );

    let members: Vec<NodeId> = survivors.iter().copied().chain([new]).collect();
    let list = client.member_list().await.expect("member list");
    assert_eq!(
        list.members.iter().map(|m| m.id).collect::<BTreeSet<_>>(),
        members.iter().copied().collect::<BTreeSet<_>>(),
        "{list:?}"
    );
    // A follower died: the writer loses at most the requests in flight to
    // it.
    assert!(
        log.failed <= 10,
        "{} failed write attempts with 2 of 3 members alive: {:?}",
        log.failed,
        log.errors
    );
    assert!(
        log.longest_gap < Duration::from_secs(5),
        "writes stalled for {:?}",
        log.longest_gap
    );
    check_read_back(&cluster, &members, "replace", &log.acked).await;
    check_hash_kv(&cluster, leader, &members).await;
    eprintln!(
        "replace_a_killed_member_under_load: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_to_each_member_under_load() {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let ids = cluster.ids();
    let writer = Writer::start(cluster.endpoints(), "move");
    writer.wait_progress(50, "before the moves").await;
    let at = ids.iter().position(|&id| id == leader).unwrap();
    for round in 1..=ids.len() {
        let target = ids[(at + round) % ids.len()];
        // Through a member that is not the target (the leader, or a
        // follower that forwards).
        let via = ids[(at + round + 1) % ids.len()];
        let t0 = Instant::now();
        cluster
            .client(via)
            .await
            .move_leader(target)
            .await
            .unwrap_or_else(|e| panic!("MoveLeader to {target} via {via}: {e}"));
        let took = t0.elapsed();
        wait_leader_is(&cluster, target).await;
        eprintln!(
            "moved leadership to {target} (via {via}): MoveLeader answered in {:.0} ms, all \
             agree after {:.0} ms",
            took.as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64() * 1e3
        );
        writer.wait_progress(30, "after a move").await;
    }
    let log = writer.stop().await;
    print_write_log("move_leader", &log);
    assert!(
        log.longest_gap < Duration::from_secs(2),
        "writes stalled for {:?} around a leadership move",
        log.longest_gap
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    check_read_back(&cluster, &ids, "move", &log.acked).await;
    check_hash_kv(&cluster, leader, &ids).await;
    eprintln!(
        "move_leader_to_each_member_under_load: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_restart_under_load() {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions::default());
    let (first_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let ids = cluster.ids();
    let writer = Writer::start(cluster.endpoints(), "rolling");
    writer.wait_progress(50, "before the restarts").await;
    for &id in &ids {
        let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
        let failed_before = writer.failed();
        let t0 = Instant::now();
        let status = cluster.terminate(id);
        eprintln!(
            "member {id} (leader: {}) exited {:.2} s after SIGTERM: {status}",
            id == leader,
            t0.elapsed().as_secs_f64()
        );
        assert!(
            status.success(),
            "member {id} exited with {status} on SIGTERM"
        );
        writer.wait_progress(20, "with a member down").await;
        cluster.restart(id);
        let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
        wait_caught_up(&cluster, leader, id).await;
        writer.wait_progress(20, "after a restart").await;
        eprintln!(
            "member {id} rejoined {:.2} s after SIGTERM; {} failed write attempts meanwhile",
            t0.elapsed().as_secs_f64(),
            writer.failed() - failed_before
        );
    }
    let log = writer.stop().await;
    print_write_log("rolling", &log);
    eprintln!("rolling: the first leader was {first_leader}");
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    check_read_back(&cluster, &ids, "rolling", &log.acked).await;
    check_hash_kv(&cluster, leader, &ids).await;
    assert!(
        log.longest_gap < Duration::from_secs(5),
        "writes stalled for {:?} in a rolling restart",
        log.longest_gap
    );
    // A stopping member hands leadership over and answers the writes it
    // took; a restarted one waits for a leader instead of refusing: no
    // write is refused.
    assert_eq!(
        log.refused, 0,
        "members refused writes in a rolling SIGTERM restart: {:?}",
        log.errors
    );
    // And none fails at the client either: what crossed a stopping
    // member's GOAWAY was never sent, and the client resends it elsewhere.
    assert_eq!(
        log.failed, 0,
        "writes failed in a rolling SIGTERM restart: {:?}",
        log.errors
    );
    eprintln!(
        "rolling_sigterm_restart_under_load: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_are_refused() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = *cluster.ids().iter().find(|&&id| id != leader).unwrap();
    let mut any = client_of(&cluster, &cluster.ids()).await;
    let before = shape(&any.member_list().await.expect("member list").members);
    assert_eq!(before.len(), 3);
    let unknown: u64 = 0x1234_5678_9abc_def0;
    // Once on the leader, once on a follower (which would forward).
    for id in [leader, follower] {
        let mut c = cluster.client(id).await;
        let on = |what: &str| format!("{what} on member {id}");
        for bad in [
            "not a url",
            "http://127.0.0.1",
            // Not a host name (host names are taken, and resolved when
            // the transport connects).
            "http://bad_host.example:2380",
            "http://[::1:2380",
            "http://127.0.0.1:0",
        ] {
            expect_status(
                &on(&format!("MemberAdd {bad:?}")),
                c.member_add(&[bad.to_string()], false).await,
                tonic::Code::InvalidArgument,
                "",
            );
        }
        expect_status(
            &on("MemberAdd without a URL"),
            c.member_add(&[], false).await,
            tonic::Code::InvalidArgument,
            "",
        );
        expect_status(
            &on("MemberAdd of member 2's peer URL"),
            c.member_add(&[cluster.peer_url(2)], true).await,
            tonic::Code::FailedPrecondition,
            "Peer URLs already exists",
        );
        expect_status(
            &on("MemberRemove of an unknown id"),
            c.member_remove(unknown).await,
            tonic::Code::NotFound,
            "member not found",
        );
        expect_status(
            &on("MemberUpdate of an unknown id"),
            c.member_update(unknown, &["http://127.0.0.1:1".to_string()])
                .await,
            tonic::Code::NotFound,
            "member not found",
        );
        expect_status(
            &on("MemberUpdate to member 1's peer URL"),
            c.member_update(3, &[cluster.peer_url(1)]).await,
            tonic::Code::FailedPrecondition,
            "Peer URLs already exists",
        );
        expect_status(
            &on("MemberPromote of a voter"),
            c.member_promote(1).await,
            tonic::Code::FailedPrecondition,
            "can only promote a learner member",
        );
        expect_status(
            &on("MemberPromote of an unknown id"),
            c.member_promote(unknown).await,
            tonic::Code::NotFound,
            "member not found",
        );
        let r = c.move_leader(unknown).await;
        assert!(
            r.is_err(),
            "MoveLeader to an unknown member succeeded: {r:?}"
        );
        eprintln!(
            "MoveLeader to an unknown member on {id}: {}",
            r.unwrap_err()
        );
        let after = shape(&c.member_list().await.expect("member list").members);
        assert_eq!(before, after, "the membership changed");
    }
    // And the cluster still works.
    any.put("bad/after", "ok", None).await.expect("put");
    let (leader_after, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    assert_eq!(leader, leader_after, "a refused request changed the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_member_commands() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let mut cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut client = client_of(&cluster, &cluster.ids()).await;
    let cid = cluster_id(&mut client).await;
    // host:port endpoints (see tests/etcdctl.rs on etcdctl 3.4 and URLs).
    let bare = |cluster: &Cluster| {
        cluster
            .running()
            .iter()
            .map(|&id| {
                cluster
                    .endpoint(id)
                    .trim_start_matches("http://")
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let ctl = |endpoints: &str, args: &[&str]| -> String {
        let mut cmd = std::process::Command::new(&bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--command-timeout=10s")
            .arg("--dial-timeout=5s")
            .args(args);
        let out = run_bounded(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("$ etcdctl {}\n{stdout}", args.join(" "));
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };

    let table = ctl(&bare(&cluster), &["member", "list", "-w", "table"]);
    assert!(
        table.contains("ID") && table.contains("PEER ADDRS"),
        "{table}"
    );
    let rows = table_rows(&table);
    for id in cluster.ids() {
        let row = rows
            .iter()
            .find(|r| r[0] == format!("{id:x}"))
            .unwrap_or_else(|| panic!("no row for member {id:x} in\n{table}"));
        assert_eq!(row[1], "started", "{row:?}");
        assert_eq!(row[3], cluster.peer_url(id), "{row:?}");
        assert_eq!(row[4], cluster.endpoint(id), "{row:?}");
        assert_eq!(row[5], "false", "learner column of {row:?}");
    }

    // member add: prints the new id and the cluster id.
    let addrs = cluster.new_member_addrs();
    let out = ctl(
        &bare(&cluster),
        &[
            "member",
            "add",
            "newbie",
            &format!("--peer-urls={}", addrs.peer_url()),
        ],
    );
    // "Member 8e9e05c52164694d added to cluster cdf818194e3a8c32"
    let line = out
        .lines()
        .find(|l| l.starts_with("Member ") && l.contains(" added to cluster "))
        .unwrap_or_else(|| panic!("no `Member .. added to cluster ..` in\n{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let new = u64::from_str_radix(words[1], 16).expect("a hex member id");
    let printed_cid = u64::from_str_radix(words[5], 16).expect("a hex cluster id");
    assert_eq!(printed_cid, cid, "{line}");
    assert!(out.contains(&addrs.peer_url()), "{out}");
    cluster.add_member_process(new, cid, addrs);
    let (leader_now, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    wait_caught_up(&cluster, leader_now, new).await;
    let table = ctl(&bare(&cluster), &["member", "list", "-w", "table"]);
    assert!(
        table_rows(&table)
            .iter()
            .any(|r| r[0] == format!("{new:x}")),
        "{table}"
    );

    // move-leader to a follower, by hex id.
    let target = *cluster.ids().iter().find(|&&id| id != leader_now).unwrap();
    let out = ctl(&bare(&cluster), &["move-leader", &format!("{target:x}")]);
    assert!(
        out.contains("Leadership transferred") && out.contains(&format!("{target:x}")),
        "{out}"
    );
    wait_leader_is(&cluster, target).await;
    eprintln!("etcdctl: first leader {leader}, moved to {target:x}");
}
