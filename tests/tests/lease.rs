//! The etcd v3 Lease service end to end, on 3-node clusters of `skiff
//! serve` processes, with etcd's own behaviour as the reference
//! (server/etcdserver/api/v3rpc/lease.go, server/lease/lessor.go):
//!
//! * grant with a server-chosen and a client-chosen id, a duplicate id
//!   refused ("lease already exists"), a TTL below the minimum raised to it
//!   (etcd's 1.5 election timeouts), a TTL above etcd's maximum refused;
//!   keys attached with put; time-to-live with keys and the lease list, on
//!   the leader and through a follower; revoke deletes every key of the
//!   lease at one revision; a put naming an unknown lease refused
//!   ("requested lease not found"); a keepalive of an unknown lease answers
//!   TTL 0, a time-to-live TTL -1;
//! * a lease revoked through a follower is gone on the leader too (its
//!   keepalives answer TTL 0 at once);
//! * expiry: a lease not kept alive goes, with its keys, after its TTL (and
//!   never before);
//! * a lease kept alive through a follower survives a leader SIGKILL and a
//!   rolling SIGKILL restart of every member;
//! * checkpoints: with `--lease-checkpoint-interval-ms`, the TTL left
//!   survives a restart of the whole cluster (it does not start over);
//! * the real `etcdctl` (skipped, with the reason printed, where etcdctl is
//!   not installed): `lease grant`, `put --lease`, `lease timetolive
//!   --keys`, `lease list`, `lease keep-alive`, `lease revoke`; `lock`
//!   contention between two etcdctl processes; `elect` with two campaigners
//!   and an observer, the first campaigner SIGKILLed (etcdctl 3.4's
//!   `elect` has no session TTL flag: its 60 s lease is revoked by the test
//!   instead of waited for, unless `SKIFF_TEST_ELECT_EXPIRY` is set).
//!
//! Leases are granted once the leader's lessor answers ([`lessor_ready`]):
//! one granted in the first moments of a leader's term, before its lessor
//! loaded, gets an election timeout more than its TTL.
//!
//! Every wait is bounded. Timing bounds derive from the Raft timing the
//! clusters run with (passed explicitly, see [`timing`]) and are one-sided
//! where a busy machine could stretch them: a lease may go later than its
//! TTL plus an election timeout (the tests then only wait longer, up to a
//! generous bound), never earlier.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_tests::background::Background;
use skiff_tests::client::{
    key_str, value_str, Client, Error, Event, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream, Watcher,
};
use skiff_tests::{
    etcdctl_path, poll_until, run_bounded, Cluster, ClusterOptions, NodeId, CLIENT_OPTIONS,
};
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for watch events that must come.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// What a busy machine may add to any expected delay (an expiry, a
/// takeover): only ever makes a wait longer.
const SLACK: Duration = Duration::from_secs(30);
/// Raft tick of every cluster here (`--tick-interval-ms`).
const TICK_INTERVAL_MS: u64 = 10;
/// `--election-ticks-max` of the clusters that do not ask for another one
/// (the harness's default, stated here so that the bounds follow it).
const ELECTION_TICKS_MAX: u64 = 60;
/// A lease id no test grants.
const UNKNOWN: i64 = 0x7e57_0000_dead;
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const LEASE_EXISTS: &str = "etcdserver: lease already exists";
const TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";
/// etcd's MaxLeaseTTL.
const LEASE_TTL_MAX: i64 = 9_000_000_000;

// ---------------------------------------------------------------------------
// Timing.

/// Cluster options with the Raft timing stated explicitly.
fn timing(election_ticks_max: u64) -> ClusterOptions {
    ClusterOptions::default()
        .arg("--tick-interval-ms", TICK_INTERVAL_MS)
        .arg("--election-ticks-max", election_ticks_max)
}

/// The longest election timeout: what a new leader adds to every lease's
/// deadline (etcd extends leases by an election timeout on promotion).
fn election_timeout(election_ticks_max: u64) -> Duration {
    Duration::from_millis(TICK_INTERVAL_MS * election_ticks_max)
}

/// The smallest TTL granted, seconds: 1.5 election timeouts, rounded up
/// (etcd's `minTTL`).
fn min_ttl(election_ticks_max: u64) -> i64 {
    let ms = election_timeout(election_ticks_max).as_millis() as i64 * 3 / 2;
    ((ms + 999) / 1000).max(1)
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> i64 {
    d.as_millis().div_ceil(1000) as i64
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s as u64)
}

// ---------------------------------------------------------------------------
// Helpers.

/// The leader and one follower.
async fn roles(cluster: &Cluster) -> (NodeId, NodeId) {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    (leader, follower)
}

/// Waits until every running member agrees on a leader and `id` has
/// applied everything that leader has committed.
async fn rejoined(cluster: &Cluster, id: NodeId) -> NodeId {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let commit = cluster.status(leader).await.expect("status").raft_index;
    cluster.wait_applied(id, commit, CATCH_UP_TIMEOUT).await;
    leader
}

/// Waits until the leader's lessor answers (a time-to-live of a lease
/// nobody holds: TTL -1), so that what follows is granted by a leader whose
/// lessor has loaded its leases (see the module docs).
async fn lessor_ready(client: &mut Client) {
    let client = &*client;
    poll_until("the leader's lessor to answer", LEADER_TIMEOUT, || {
        let mut client = client.clone();
        async move {
            let r = client.lease_time_to_live(UNKNOWN, false).await.ok()?;
            assert_eq!(r.ttl, -1, "time-to-live of a lease never granted: {r:?}");
            Some(())
        }
    })
    .await;
}

/// Panics unless `result` failed with a status `code` whose message
/// contains `message`.
fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Error>,
    code: Code,
    message: &str,
    what: &str,
) {
    match result {
        Ok(r) => panic!("{what} succeeded, expected {code:?} {message:?}: {r:?}"),
        Err(e) => {
            let status = e
                .status()
                .unwrap_or_else(|| panic!("{what}: not a gRPC status: {e}"));
            assert_eq!(status.code(), code, "{what}: {e}");
            assert!(
                status.message().contains(message),
                "{what}: expected {message:?}, got {e}"
            );
        }
    }
}

async fn grant(client: &mut Client, ttl: i64, id: Option<i64>) -> (i64, i64) {
    let r = client
        .lease_grant(ttl, id)
        .await
        .unwrap_or_else(|e| panic!("grant TTL {ttl} id {id:?}: {e}"));
    assert!(r.error.is_empty(), "grant answered an error: {r:?}");
    assert!(r.id > 0, "granted lease id {}: {r:?}", r.id);
    if let Some(id) = id {
        assert_eq!(r.id, id, "the chosen id");
    }
    (r.id, r.ttl)
}

/// Puts `key` attached to `lease`; returns the revision.
async fn put_leased(client: &mut Client, key: &str, value: &str, lease: i64) -> i64 {
    let r = client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap_or_else(|e| panic!("put {key} with lease {lease:x}: {e}"));
    r.header.expect("a put response has a header").revision
}

/// `(key, value, lease)` of every key under `prefix`, read on `client`.
async fn keys(client: &mut Client, prefix: &str) -> Vec<(String, String, i64)> {
    let r = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_or_else(|e| panic!("get --prefix {prefix}: {e}"));
    r.kvs
        .iter()
        .map(|kv| (key_str(kv).to_string(), value_str(kv).to_string(), kv.lease))
        .collect()
}

/// The ids `LeaseLeases` lists on `client`'s member, sorted.
async fn listed(client: &mut Client) -> Vec<i64> {
    let r = client.lease_leases().await.expect("lease list");
    let mut ids: Vec<i64> = r.leases.iter().map(|l| l.id).collect();
    ids.sort_unstable();
    ids
}

/// `(TTL, granted TTL, sorted keys)` of `LeaseTimeToLive` on `client`.
async fn time_to_live(client: &mut Client, id: i64, with_keys: bool) -> (i64, i64, Vec<String>) {
    let r = client
        .lease_time_to_live(id, with_keys)
        .await
        .unwrap_or_else(|e| panic!("time-to-live of {id:x}: {e}"));
    assert_eq!(r.id, id, "time-to-live answered for another lease: {r:?}");
    let mut keys: Vec<String> = r
        .keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    (r.ttl, r.granted_ttl, keys)
}

/// Opens a keepalive stream for `id` on `client`, which sends one
/// keepalive; returns the TTL answered, and the stream for more.
async fn keep_alive(client: &mut Client, id: i64) -> (i64, LeaseKeeper, LeaseKeepAliveStream) {
    let (keeper, mut stream) = client
        .lease_keep_alive(id)
        .await
        .unwrap_or_else(|e| panic!("open a keepalive stream for {id:x}: {e}"));
    let r = stream
        .message()
        .await
        .unwrap_or_else(|e| panic!("keepalive of {id:x}: {e}"))
        .unwrap_or_else(|| panic!("the keepalive stream of {id:x} ended unanswered"));
    assert_eq!(r.id, id, "keepalive answered for another lease: {r:?}");
    (r.ttl, keeper, stream)
}

/// Reads a watch stream until it delivered `n` events; panics if it fails,
/// ends or does not within [`EVENT_TIMEOUT`].
async fn read_events(stream: &mut WatchStream, n: usize, what: &str) -> Vec<Event> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut got: Vec<Event> = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.message_within(left).await {
            Ok(Some(r)) => {
                assert!(!r.canceled, "{what}: the watcher was cancelled: {r:?}");
                got.extend(r.events);
            }
            Ok(None) => panic!("{what}: the watch stream ended; got {got:#?}"),
            Err(e) => panic!("{what}: {e}; got {got:#?}"),
        }
    }
    got
}

/// `(type, key, mod_revision)` of an event.
fn event(e: &Event) -> (EventType, String, i64) {
    let kv = e.kv.as_ref().expect("an event has a kv");
    let kind = EventType::try_from(e.r#type).expect("a known event type");
    (kind, key_str(kv).to_string(), kv.mod_revision)
}

/// Opens a prefix watcher on `client`'s member (from `start`, 0: now);
/// the server must have created it. Keep the [`Watcher`]: dropping it
/// half-closes the stream, which Skiff takes as the end of the stream.
async fn watch_prefix(client: &mut Client, prefix: &str, start: i64) -> (Watcher, WatchStream) {
    let (watcher, stream) = client
        .watch(
            prefix,
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await
        .unwrap_or_else(|e| panic!("watch {prefix} from {start}: {e}"));
    let created = watcher.create_response();
    assert!(
        created.created && !created.canceled,
        "watch {prefix} from {start}: {created:?}"
    );
    (watcher, stream)
}

/// Checks two DELETE events, of `a` and `b`, at one revision; returns it.
fn assert_deleted_together(events: &[Event], a: &str, b: &str, what: &str) -> i64 {
    let mut got: Vec<(EventType, String, i64)> = events.iter().map(event).collect();
    got.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(got.len(), 2, "{what}: {got:?}");
    let revision = got[0].2;
    assert_eq!(
        got,
        [
            (EventType::Delete, a.to_string(), revision),
            (EventType::Delete, b.to_string(), revision),
        ],
        "{what}: the lease's keys must go in one DELETE revision"
    );
    revision
}

// ---------------------------------------------------------------------------
// The API, once through.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_attach_inspect_and_revoke() {
    // A longer election timeout than the default, so that the minimum TTL
    // (1.5 of it) is above 1 s and "raised to the minimum" shows.
    const TICKS: u64 = 200;
    let min = min_ttl(TICKS);
    assert_eq!(min, 3, "the minimum TTL these flags give");
    let cluster = Cluster::start(timing(TICKS));
    let (leader, follower) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_follower = cluster.client(follower).await;
    lessor_ready(&mut on_leader).await;

    // A server-chosen id, on the leader; a client-chosen one, through a
    // follower (forwarded to the leader).
    let (auto, ttl) = grant(&mut on_leader, 60, None).await;
    assert_eq!(ttl, 60);
    const CHOSEN: i64 = 0x5eed_1ea5e;
    let (id, ttl) = grant(&mut on_follower, 60, Some(CHOSEN)).await;
    assert_eq!((id, ttl), (CHOSEN, 60));
    assert_ne!(auto, id);

    // The same id again: refused, on either member.
    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let r = client.lease_grant(30, Some(CHOSEN)).await;
        assert_status(
            r,
            Code::FailedPrecondition,
            LEASE_EXISTS,
            &format!("a second grant of {CHOSEN:x} on the {who}"),
        );
    }
    let r = on_leader.lease_grant(LEASE_TTL_MAX + 1, None).await;
    assert_status(
        r,
        Code::InvalidArgument,
        TTL_TOO_LARGE,
        "a TTL above the max",
    );

    // Below the minimum: raised to it (and reported so by time-to-live).
    let (short, ttl) = grant(&mut on_follower, 1, None).await;
    assert_eq!(ttl, min, "TTL 1 is raised to the minimum");
    let (left, granted, _) = time_to_live(&mut on_leader, short, false).await;
    assert_eq!(granted, min, "the granted TTL of a raised lease");
    assert!((0..=min).contains(&left), "TTL left {left} of {min}");
    on_leader.lease_revoke(short).await.expect("revoke");

    // Two keys on the lease (one written through the follower), one key
    // without a lease under the same prefix.
    put_leased(&mut on_leader, "lease/a", "1", id).await;
    put_leased(&mut on_follower, "lease/b", "2", id).await;
    on_leader.put("lease/c", "3", None).await.expect("put");
    assert_eq!(
        keys(&mut on_follower, "lease/").await,
        [
            ("lease/a".into(), "1".into(), id),
            ("lease/b".into(), "2".into(), id),
            ("lease/c".into(), "3".into(), 0),
        ]
    );

    // A put naming a lease nobody holds: refused, nothing written (also
    // inside a txn).
    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let r = client
            .put("lease/x", "x", Some(PutOptions::new().with_lease(UNKNOWN)))
            .await;
        assert_status(
            r,
            Code::NotFound,
            LEASE_NOT_FOUND,
            &format!("a put with an unknown lease on the {who}"),
        );
        let txn = Txn::new().and_then([TxnOp::put(
            "lease/x",
            "x",
            Some(PutOptions::new().with_lease(UNKNOWN)),
        )]);
        let r = client.txn(txn).await;
        assert_status(
            r,
            Code::NotFound,
            LEASE_NOT_FOUND,
            &format!("a txn put with an unknown lease on the {who}"),
        );
    }
    assert_eq!(keys(&mut on_leader, "lease/x").await, []);

    // Time-to-live, with and without keys, on the leader and through the
    // follower (forwarded).
    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let (left, granted, with_keys) = time_to_live(client, id, true).await;
        assert_eq!(granted, 60, "granted TTL on the {who}");
        assert!(0 < left && left <= 60, "TTL left {left} on the {who}");
        assert_eq!(with_keys, ["lease/a", "lease/b"], "keys on the {who}");
        let (_, _, without) = time_to_live(client, id, false).await;
        assert!(without.is_empty(), "keys without asking: {without:?}");
    }

    // The lease list, on both.
    let mut want = vec![auto, id];
    want.sort_unstable();
    assert_eq!(listed(&mut on_leader).await, want, "leases on the leader");
    assert_eq!(
        listed(&mut on_follower).await,
        want,
        "leases on the follower"
    );

    // A keepalive through the follower renews to the full TTL, twice on
    // one stream.
    let (ttl, mut keeper, mut stream) = keep_alive(&mut on_follower, id).await;
    assert_eq!(ttl, 60, "keepalive through the follower");
    keeper.keep_alive().await.expect("a second keepalive");
    let r = stream
        .message()
        .await
        .expect("a second keepalive answer")
        .expect("the stream is open");
    assert_eq!((r.id, r.ttl), (id, 60));
    drop((keeper, stream));

    // Revoke (on the leader; through a follower: see the next test): both
    // keys go at one revision, the one the revoke answers with; the key
    // without a lease stays. Watched on the follower.
    let (_watcher, mut watch) = watch_prefix(&mut on_follower, "lease/", 0).await;
    let r = on_leader.lease_revoke(id).await.expect("revoke");
    let revoked_at = r.header.expect("a revoke response has a header").revision;
    let events = read_events(&mut watch, 2, "the revoke's deletes").await;
    let deleted_at = assert_deleted_together(&events, "lease/a", "lease/b", "revoke");
    assert_eq!(
        deleted_at, revoked_at,
        "the revoke answers with its deletion's revision"
    );
    assert_eq!(
        keys(&mut on_leader, "lease/").await,
        [("lease/c".into(), "3".into(), 0)]
    );

    // Gone: time-to-live -1, not listed, keepalive TTL 0, a second revoke
    // and a put naming it refused. The same for a lease never granted.
    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        for (what, lease) in [("revoked", id), ("unknown", UNKNOWN)] {
            let (left, granted, keys) = time_to_live(client, lease, true).await;
            assert_eq!(
                (left, granted, keys.len()),
                (-1, 0, 0),
                "time-to-live of the {what} lease on the {who}"
            );
            let (ttl, _, _) = keep_alive(client, lease).await;
            assert_eq!(ttl, 0, "keepalive of the {what} lease on the {who}");
            let r = client.lease_revoke(lease).await;
            assert_status(
                r,
                Code::NotFound,
                LEASE_NOT_FOUND,
                &format!("revoke of the {what} lease on the {who}"),
            );
        }
        let r = client
            .put("lease/a", "again", Some(PutOptions::new().with_lease(id)))
            .await;
        assert_status(
            r,
            Code::NotFound,
            LEASE_NOT_FOUND,
            "a put on a revoked lease",
        );
        assert_eq!(listed(client).await, [auto], "leases on the {who}");
    }
    on_leader.lease_revoke(auto).await.expect("revoke");
    assert_eq!(listed(&mut on_follower).await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_through_a_follower_is_gone_everywhere() {
    let cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_follower = cluster.client(follower).await;
    lessor_ready(&mut on_leader).await;
    let (id, _) = grant(&mut on_leader, 60, None).await;
    put_leased(&mut on_leader, "byfollower/k", "v", id).await;
    let (ttl, ..) = keep_alive(&mut on_leader, id).await;
    assert_eq!(ttl, 60);

    // Revoked through the follower (which proposes it through Raft): the
    // key goes, and every member, the leader's lessor included, treats the
    // lease as gone at once (etcd's lessor forgets a lease when the revoke
    // is applied, on every member).
    on_follower.lease_revoke(id).await.expect("revoke");
    assert_eq!(keys(&mut on_leader, "byfollower/").await, []);
    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let (left, ..) = time_to_live(client, id, false).await;
        assert_eq!(left, -1, "time-to-live of the revoked lease on the {who}");
        let (ttl, ..) = keep_alive(client, id).await;
        assert_eq!(
            ttl, 0,
            "keepalive of a lease revoked through a follower, on the {who}: the lease is gone"
        );
        assert_eq!(listed(client).await, [], "leases on the {who}");
    }
}

// ---------------------------------------------------------------------------
// Expiry.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_kept_alive_expires_with_its_keys() {
    const TTL: i64 = 2;
    assert!(min_ttl(ELECTION_TICKS_MAX) <= TTL);
    let cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_follower = cluster.client(follower).await;
    lessor_ready(&mut on_leader).await;
    let (_watcher, mut watch) = watch_prefix(&mut on_follower, "expire/", 0).await;

    let sent = Instant::now();
    let (id, ttl) = grant(&mut on_follower, TTL, None).await;
    assert_eq!(ttl, TTL);
    put_leased(&mut on_leader, "expire/a", "1", id).await;
    put_leased(&mut on_follower, "expire/b", "2", id).await;
    let puts = read_events(&mut watch, 2, "the puts").await;
    assert!(
        puts.iter().all(|e| event(e).0 == EventType::Put),
        "{puts:?}"
    );

    // Gone within TTL + an election timeout, plus what a busy machine adds.
    let bound = secs(TTL) + election_timeout(ELECTION_TICKS_MAX) + SLACK;
    poll_until(
        &format!("the keys of lease {id:x} (TTL {TTL} s) to be deleted"),
        bound,
        || {
            let mut client = on_leader.clone();
            async move { keys(&mut client, "expire/").await.is_empty().then_some(()) }
        },
    )
    .await;
    let gone_after = sent.elapsed();
    eprintln!(
        "lease {id:x} (TTL {TTL} s) and its keys gone {:.2} s after the grant was sent",
        gone_after.as_secs_f64()
    );
    // Never early: the leader's deadline starts after the grant was sent.
    assert!(
        gone_after >= secs(TTL),
        "lease of TTL {TTL} s expired after {gone_after:?}"
    );
    let events = read_events(&mut watch, 2, "the expiry's deletes").await;
    assert_deleted_together(&events, "expire/a", "expire/b", "expiry");

    for (who, client) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let (ttl, _, _) = keep_alive(client, id).await;
        assert_eq!(ttl, 0, "keepalive of the expired lease on the {who}");
        let (left, _, _) = time_to_live(client, id, true).await;
        assert_eq!(left, -1, "time-to-live of the expired lease on the {who}");
        assert_eq!(listed(client).await, [], "leases on the {who}");
    }
}

// ---------------------------------------------------------------------------
// Kept alive across failures.

/// What a keepalive loop saw.
#[derive(Debug, Default)]
struct KeepAliveLog {
    /// (when, endpoint, TTL) of every answer.
    answers: Vec<(Instant, String, i64)>,
    /// (when, error) of every failed keepalive.
    errors: Vec<(Instant, String)>,
}

impl KeepAliveLog {
    /// Whether an answer with a TTL came after `t`.
    fn renewed_after(&self, t: Instant) -> bool {
        self.answers.iter().any(|(at, _, ttl)| *at > t && *ttl > 0)
    }

    /// The longest time between two answers with a TTL.
    fn max_gap(&self) -> Duration {
        let times: Vec<Instant> = self
            .answers
            .iter()
            .filter(|(_, _, ttl)| *ttl > 0)
            .map(|(at, ..)| *at)
            .collect();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// Sends one keepalive for `id`, on the open stream or on a new one.
async fn renew_once(
    client: &mut Client,
    open: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    id: i64,
    timeout: Duration,
) -> Result<(String, i64), String> {
    match open {
        Some((keeper, _)) => keeper.keep_alive().await.map_err(|e| e.to_string())?,
        None => {
            *open = Some(
                client
                    .lease_keep_alive(id)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
    }
    let (_, stream) = open.as_mut().expect("opened above");
    match stream.message_within(timeout).await {
        Ok(Some(r)) => Ok((stream.endpoint().to_string(), r.ttl)),
        Ok(None) => Err(format!("{} ended the keepalive stream", stream.endpoint())),
        Err(e) => Err(e.to_string()),
    }
}

/// Keeps `id` alive every `every` through `endpoints` (in that order of
/// preference) until `stop`; a failed keepalive is retried shortly on a new
/// stream (which fails over to the next endpoint when a member is down).
async fn keep_alive_loop(
    endpoints: Vec<String>,
    id: i64,
    every: Duration,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<KeepAliveLog>>,
) {
    const RETRY: Duration = Duration::from_millis(250);
    let mut client: Option<Client> = None;
    let mut open = None;
    while !stop.load(Ordering::Acquire) {
        if client.is_none() {
            match Client::connect(&endpoints, CLIENT_OPTIONS).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    log.lock()
                        .unwrap()
                        .errors
                        .push((Instant::now(), e.to_string()));
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        match renew_once(c, &mut open, id, every).await {
            Ok((endpoint, ttl)) => {
                log.lock()
                    .unwrap()
                    .answers
                    .push((Instant::now(), endpoint, ttl));
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                open = None;
                log.lock().unwrap().errors.push((Instant::now(), e));
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Waits (bounded) until the keepalive loop renewed the lease after `t`.
async fn renewed_after(log: &Mutex<KeepAliveLog>, t: Instant, what: &str) {
    poll_until(
        &format!("a keepalive answered with a TTL after {what}"),
        LEADER_TIMEOUT,
        || async { log.lock().unwrap().renewed_after(t).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_survives_a_leader_crash_and_a_rolling_restart() {
    const TTL: i64 = 6;
    let every = secs(TTL) / 3;
    let extension = election_timeout(ELECTION_TICKS_MAX);
    // Long enough for the lease to have expired without keepalives.
    let hold = secs(TTL) + extension + Duration::from_secs(1);
    let mut cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let mut client = connect_all(&cluster, leader).await;
    lessor_ready(&mut client).await;
    let (id, ttl) = grant(&mut client, TTL, None).await;
    assert_eq!(ttl, TTL);
    let start = put_leased(&mut client, "alive/a", "1", id).await;
    put_leased(&mut client, "alive/b", "2", id).await;

    // Keepalives through a follower first (the others after it, for when
    // it is down).
    let mut endpoints = vec![cluster.endpoint(follower)];
    endpoints.extend(
        cluster
            .ids()
            .into_iter()
            .filter(|&m| m != follower)
            .map(|m| cluster.endpoint(m)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(KeepAliveLog::default()));
    let task = tokio::spawn(keep_alive_loop(
        endpoints,
        id,
        every,
        stop.clone(),
        log.clone(),
    ));
    let t0 = Instant::now();
    renewed_after(&log, t0 - Duration::from_secs(1), "the start").await;
    tokio::time::sleep(hold).await;

    // The leader SIGKILLed: an election; the lease lives on under the new
    // leader, kept alive through it for longer than its TTL.
    eprintln!("killing leader {leader}");
    cluster.kill(leader);
    let (new_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    eprintln!("member {new_leader} leads");
    let t = Instant::now();
    renewed_after(&log, t, "the election").await;
    tokio::time::sleep(hold).await;
    cluster.restart(leader);
    rejoined(&cluster, leader).await;

    // A rolling restart: each member SIGKILLed and restarted, the next one
    // only once it is back.
    for m in cluster.ids() {
        eprintln!("rolling restart: killing member {m}");
        cluster.kill(m);
        cluster.wait_leader(LEADER_TIMEOUT).await;
        cluster.restart(m);
        let now_leading = rejoined(&cluster, m).await;
        eprintln!("member {m} is back; member {now_leading} leads");
        renewed_after(&log, Instant::now(), &format!("member {m} rejoined")).await;
    }
    tokio::time::sleep(hold).await;
    stop.store(true, Ordering::Release);
    tokio::time::timeout(LEADER_TIMEOUT, task)
        .await
        .expect("the keepalive loop stops")
        .expect("the keepalive loop did not panic");

    // Checked in a block: the guard must not live across an await.
    {
        let log = log.lock().unwrap();
        let lost: Vec<_> = log
            .answers
            .iter()
            .filter(|(_, _, ttl)| *ttl != TTL)
            .collect();
        let served: std::collections::BTreeSet<&str> =
            log.answers.iter().map(|(_, e, _)| e.as_str()).collect();
        eprintln!(
            "{} keepalives answered (by {served:?}), {} failed, longest gap {:.2} s",
            log.answers.len(),
            log.errors.len(),
            log.max_gap().as_secs_f64()
        );
        for (at, e) in &log.errors {
            eprintln!(
                "  keepalive failed at +{:.2} s: {e}",
                (*at - t0).as_secs_f64()
            );
        }
        assert!(
            lost.is_empty(),
            "keepalives answered other than TTL {TTL} (0: the lease was gone); longest gap \
         between renewals {:?}: {lost:?}",
            log.max_gap()
        );
    }

    // The keys are there, still on the lease, and no DELETE of them ever
    // happened: a watcher from the first put replays everything up to a
    // sentinel written after it.
    let mut client = connect_all(&cluster, cluster.wait_leader(LEADER_TIMEOUT).await.0).await;
    assert_eq!(
        keys(&mut client, "alive/").await,
        [
            ("alive/a".into(), "1".into(), id),
            ("alive/b".into(), "2".into(), id),
        ]
    );
    let (left, granted, attached) = time_to_live(&mut client, id, true).await;
    assert!(
        left > 0 && granted == TTL,
        "time-to-live {left} of {granted}"
    );
    assert_eq!(attached, ["alive/a", "alive/b"]);
    let (_watcher, mut watch) = watch_prefix(&mut client, "alive/", start).await;
    let sentinel = client.put("alive/~sentinel", "", None).await.expect("put");
    let sentinel = sentinel.header.expect("header").revision;
    let events = read_events(&mut watch, 3, "the history of alive/").await;
    let got: Vec<(EventType, String, i64)> = events.iter().map(event).collect();
    assert_eq!(
        got,
        [
            (EventType::Put, "alive/a".into(), start),
            (EventType::Put, "alive/b".into(), start + 1),
            (EventType::Put, "alive/~sentinel".into(), sentinel),
        ],
        "the history of alive/ from revision {start}"
    );
    client.lease_revoke(id).await.expect("revoke");
}

/// A client over every member, `first` first.
async fn connect_all(cluster: &Cluster, first: NodeId) -> Client {
    let mut endpoints = vec![cluster.endpoint(first)];
    endpoints.extend(
        cluster
            .ids()
            .into_iter()
            .filter(|&m| m != first)
            .map(|m| cluster.endpoint(m)),
    );
    Client::connect(&endpoints, CLIENT_OPTIONS)
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoints:?}: {e}"))
}

// ---------------------------------------------------------------------------
// Checkpoints.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpointed_ttl_survives_a_whole_cluster_restart() {
    const TTL: i64 = 30;
    const CHECKPOINT_MS: u64 = 500;
    // How long after the keepalive the cluster goes down (at least): the
    // TTL left that a checkpoint records by then is at most TTL - AGE.
    const AGE: i64 = 4;
    let extension = election_timeout(ELECTION_TICKS_MAX);
    let mut cluster = Cluster::start(
        timing(ELECTION_TICKS_MAX).arg("--lease-checkpoint-interval-ms", CHECKPOINT_MS),
    );
    let (leader, _) = roles(&cluster).await;
    let term_before = cluster.status(leader).await.expect("status").raft_term;
    let mut client = cluster.client(leader).await;
    lessor_ready(&mut client).await;
    let (id, ttl) = grant(&mut client, TTL, None).await;
    assert_eq!(ttl, TTL);
    put_leased(&mut client, "ckpt/k", "v", id).await;

    // Kept alive once, then not.
    let keep_sent = Instant::now();
    let (ttl, keeper, stream) = keep_alive(&mut client, id).await;
    let keep_answered = Instant::now();
    assert_eq!(ttl, TTL, "the keepalive");
    drop((keeper, stream));

    // Wait AGE, then until two more entries are committed and applied
    // everywhere: with nothing else written, they are checkpoints, and
    // the second was computed after the first committed, so after AGE
    // (checkpoints are proposed one after the other).
    tokio::time::sleep_until((keep_answered + secs(AGE)).into()).await;
    let from = cluster.status(leader).await.expect("status").raft_index;
    let target = from + 2;
    let applied = poll_until(
        &format!("the leader to commit index {target} (two checkpoints)"),
        CATCH_UP_TIMEOUT,
        || async {
            let s = cluster.status(leader).await.ok()?;
            (s.raft_index >= target).then_some(s.raft_index)
        },
    )
    .await;
    for m in cluster.ids() {
        cluster.wait_applied(m, applied, CATCH_UP_TIMEOUT).await;
    }
    let s = cluster.status(leader).await.expect("status");
    assert_eq!(s.leader, leader, "the leader changed before the kill");
    // Every election before the kill may have added an extension.
    let elections_before = s.raft_term - term_before;
    let (left_before, ..) = time_to_live(&mut client, id, false).await;

    // The whole cluster SIGKILLed, then restarted.
    let killed = Instant::now();
    for m in cluster.ids() {
        cluster.kill(m);
    }
    eprintln!(
        "cluster killed {:.2} s after the keepalive (TTL left then {left_before} s)",
        (killed - keep_answered).as_secs_f64()
    );
    let restarting = Instant::now();
    for m in cluster.ids() {
        cluster.restart(m);
    }
    let (new_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut client = connect_all(&cluster, new_leader).await;
    let (left, granted, attached) = poll_until(
        &format!("a time-to-live answer for lease {id:x} after the restart"),
        LEADER_TIMEOUT,
        || {
            let mut client = client.clone();
            async move {
                let r = client.lease_time_to_live(id, true).await.ok()?;
                let mut keys: Vec<String> = r
                    .keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect();
                keys.sort();
                Some((r.ttl, r.granted_ttl, keys))
            }
        },
    )
    .await;
    let answered = Instant::now();
    let ext = ceil_secs(extension);
    let upper = TTL - AGE + ext * (1 + elections_before as i64);
    // The deadline never comes earlier than TTL after the keepalive was
    // sent, the time the cluster was down included (less a second:
    // etcd truncates the TTL left, Skiff rounds it up).
    let lower = TTL - ceil_secs(answered - keep_sent) - 1;
    let fresh = TTL as f64 + extension.as_secs_f64() - (answered - restarting).as_secs_f64();
    eprintln!(
        "after the restart: TTL left {left} s, granted {granted} s; expected {lower}..={upper} \
         (a TTL starting over would read at least {fresh:.1} s)"
    );
    assert_eq!(granted, TTL, "granted TTL after the restart");
    assert!(
        left > 0,
        "lease {id:x} was lost in the restart (TTL {left})"
    );
    assert_eq!(attached, ["ckpt/k"]);
    assert!(
        left <= upper,
        "TTL left {left} s after the restart: the checkpointed TTL (at most {} s, plus an \
         election timeout of {extension:?}) did not carry",
        TTL - AGE
    );
    assert!(
        left >= lower,
        "TTL left {left} s after the restart is below the {lower} s the lease must have left"
    );
    // A keepalive renews to the full TTL again.
    let (ttl, ..) = keep_alive(&mut client, id).await;
    assert_eq!(ttl, TTL);
}

// ---------------------------------------------------------------------------
// etcdctl.

/// `http://127.0.0.1:1234` → `127.0.0.1:1234` (what etcdctl 3.4 wants, see
/// tests/etcdctl.rs).
fn bare(endpoints: &[String]) -> String {
    endpoints
        .iter()
        .map(|e| e.trim_start_matches("http://"))
        .collect::<Vec<_>>()
        .join(",")
}

struct Etcdctl {
    bin: PathBuf,
}

impl Etcdctl {
    fn command(&self, endpoints: &[String], args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", bare(endpoints)))
            .arg("--command-timeout=10s")
            .arg("--dial-timeout=5s")
            .args(args);
        cmd
    }

    /// Runs etcdctl to completion; panics unless it succeeds; its stdout.
    fn run(&self, endpoints: &[String], args: &[&str]) -> String {
        let out = run_bounded(&mut self.command(endpoints, args), ETCDCTL_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Starts etcdctl in the background, its output in files under `dir`.
    fn spawn(&self, endpoints: &[String], args: &[&str], dir: &Path, name: &str) -> Background {
        Background::spawn_without_input(self.command(endpoints, args), dir, name)
    }
}

/// `lease 00000000075bcd15 granted with TTL(60s)` → (id, ttl).
fn parse_granted(out: &str) -> (i64, i64) {
    let words: Vec<&str> = out.split_whitespace().collect();
    assert!(
        words.len() == 5 && words[0] == "lease" && words[2] == "granted",
        "unexpected `lease grant` output {out:?}"
    );
    let id = i64::from_str_radix(words[1], 16).expect("a hex lease id");
    let ttl = words[4]
        .trim_start_matches("TTL(")
        .trim_end_matches("s)")
        .parse()
        .expect("a TTL");
    (id, ttl)
}

/// `lease <id> granted with TTL(60s), remaining(57s)[, attached keys([a
/// b])]` → (granted, remaining, keys sorted).
fn parse_time_to_live(out: &str) -> (i64, i64, Vec<String>) {
    let field = |name: &str| -> &str {
        let from = out
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
            + name.len();
        let to = out[from..].find(')').expect("a closing parenthesis") + from;
        &out[from..to]
    };
    let granted = field("granted with TTL(")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let remaining = field("remaining(").trim_end_matches('s').parse().unwrap();
    let mut keys: Vec<String> = match out.find("attached keys([") {
        Some(_) => field("attached keys([")
            .trim_end_matches(']')
            .split_whitespace()
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    keys.sort();
    (granted, remaining, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let ctl = Etcdctl { bin };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let at = |id: NodeId| vec![cluster.endpoint(id)];
    let mut client = cluster.client(leader).await;
    lessor_ready(&mut client).await;

    let (id, ttl) = parse_granted(&ctl.run(&at(follower), &["lease", "grant", "60"]));
    let granted_at = Instant::now();
    assert_eq!(ttl, 60);
    let hex = format!("{id:016x}");
    let lease_flag = format!("--lease={hex}");
    assert_eq!(
        ctl.run(&at(leader), &["put", &lease_flag, "ectl/a", "1"])
            .trim(),
        "OK"
    );
    assert_eq!(
        ctl.run(&at(follower), &["put", &lease_flag, "ectl/b", "2"])
            .trim(),
        "OK"
    );
    assert_eq!(
        keys(&mut client, "ectl/").await,
        [
            ("ectl/a".into(), "1".into(), id),
            ("ectl/b".into(), "2".into(), id),
        ]
    );
    let out = ctl.run(&at(follower), &["lease", "timetolive", "--keys", &hex]);
    assert!(out.starts_with(&format!("lease {hex} granted")), "{out}");
    let (granted, remaining, attached) = parse_time_to_live(&out);
    assert_eq!(granted, 60, "{out}");
    assert_eq!(attached, ["ectl/a", "ectl/b"], "{out}");
    assert!(0 < remaining && remaining <= 60, "{out}");
    assert_eq!(
        ctl.run(&at(leader), &["lease", "list"]),
        format!("found 1 leases\n{hex}\n")
    );

    // Let some of the TTL go, then `lease keep-alive` (etcdctl renews at
    // once, then every TTL/3) until it reported a renewal; killed after a
    // few seconds.
    tokio::time::sleep_until((granted_at + Duration::from_secs(5)).into()).await;
    let spawned = Instant::now();
    let mut keeper = ctl.spawn(
        &at(follower),
        &["lease", "keep-alive", &hex],
        dir.path(),
        "keep",
    );
    keeper
        .wait_output(
            &format!("lease {hex} keepalived with TTL(60)"),
            ETCDCTL_TIMEOUT,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(keeper.exited().is_none(), "{}", keeper.describe());
    keeper.kill();
    let out = ctl.run(&at(leader), &["lease", "timetolive", &hex]);
    let (_, remaining, _) = parse_time_to_live(&out);
    // Renewed after `spawned`: about 60 s from then are left (less a
    // second: etcd truncates the TTL left, Skiff rounds it up). Without the
    // renewal, at most 60 s from the grant, 5 s earlier, would be.
    let lower = 60 - ceil_secs(spawned.elapsed()) - 1;
    assert!(
        remaining >= lower,
        "TTL left {remaining} s after `lease keep-alive`, expected at least {lower}: {out}"
    );

    assert_eq!(
        ctl.run(&at(follower), &["lease", "revoke", &hex]),
        format!("lease {hex} revoked\n")
    );
    assert_eq!(ctl.run(&at(leader), &["get", "--prefix", "ectl/"]), "");
    assert_eq!(
        ctl.run(&at(follower), &["lease", "timetolive", &hex]),
        format!("lease {hex} already expired\n")
    );
    assert_eq!(ctl.run(&at(leader), &["lease", "list"]), "found 0 leases\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_excludes_a_second_holder() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let ctl = Etcdctl { bin };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let extension = election_timeout(ELECTION_TICKS_MAX);

    // The first holder: `lock L <command>` runs the command holding the
    // lock (a 3 s sleep, then a marker file), then unlocks.
    let mut first = ctl.spawn(
        &[cluster.endpoint(follower)],
        &["lock", "L", "--", "sh", "-c", "sleep 3 && touch first.done"],
        dir.path(),
        "first",
    );
    // It holds the lock once its key is under L/ (nobody else asks yet).
    let deadline = Instant::now() + ETCDCTL_TIMEOUT;
    while keys(&mut client, "L/").await.len() != 1 {
        assert!(
            first.exited().is_none() && Instant::now() < deadline,
            "the first etcdctl did not take lock L: {}",
            first.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(first.exited().is_none(), "{}", first.describe());

    // The second: its command says whether the first's had finished.
    let mut second = ctl.spawn(
        &[cluster.endpoint(leader)],
        &[
            "lock",
            "L",
            "--",
            "sh",
            "-c",
            "if [ -e first.done ]; then echo got; else echo got-too-early; fi",
        ],
        dir.path(),
        "second",
    );
    // It queues: a second key under L/ while the first holds the lock
    // (or it already went through, which the output below tells).
    poll_until(
        "the second etcdctl to queue on lock L",
        ETCDCTL_TIMEOUT,
        || {
            let mut client = client.clone();
            let done = second.exited().is_some();
            async move { (done || keys(&mut client, "L/").await.len() == 2).then_some(()) }
        },
    )
    .await;
    first.wait_success(ETCDCTL_TIMEOUT).await;
    second.wait_success(ETCDCTL_TIMEOUT).await;
    assert_eq!(
        second.stdout(),
        "got\n",
        "the second holder ran before the first released: {}",
        second.describe()
    );
    assert!(dir.path().join("first.done").exists());
    assert_eq!(keys(&mut client, "L/").await, [], "both unlocked");

    // Their sessions' leases (etcdctl lock: TTL 10 s) are not revoked on
    // exit: they expire.
    let bound = secs(10) + extension + SLACK;
    poll_until("the etcdctl sessions' leases to expire", bound, || {
        let mut client = client.clone();
        async move { listed(&mut client).await.is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_hands_over_when_the_leaders_lease_goes() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    // etcdctl 3.4's `elect` has no session TTL flag (`etcdctl elect --help`
    // lists only --listen): its session lease has clientv3's default TTL,
    // 60 s. Waiting for it to expire is opt-in.
    const SESSION_TTL: i64 = 60;
    let wait_expiry = std::env::var_os("SKIFF_TEST_ELECT_EXPIRY").is_some();
    let ctl = Etcdctl { bin };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cluster = Cluster::start(timing(ELECTION_TICKS_MAX));
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let extension = election_timeout(ELECTION_TICKS_MAX);

    let mut one = ctl.spawn(
        &[cluster.endpoint(follower)],
        &["elect", "E", "one"],
        dir.path(),
        "one",
    );
    one.wait_output("\none\n", ETCDCTL_TIMEOUT).await;
    // It prints its key, E/<its session lease, hex>, and its proposal.
    let key = one.stdout().lines().next().unwrap_or_default().to_string();
    let hex = key
        .strip_prefix("E/")
        .unwrap_or_else(|| panic!("campaigner one printed {key:?}"));
    let lease = i64::from_str_radix(hex, 16).expect("a hex lease id in the key");
    let mut observer = ctl.spawn(
        &[cluster.endpoint(leader)],
        &["elect", "-l", "E"],
        dir.path(),
        "observer",
    );
    observer
        .wait_output(&format!("{key}\none\n"), ETCDCTL_TIMEOUT)
        .await;

    let mut two = ctl.spawn(
        &cluster.endpoints(),
        &["elect", "E", "two"],
        dir.path(),
        "two",
    );
    poll_until("campaigner two to queue on E", ETCDCTL_TIMEOUT, || {
        let mut client = client.clone();
        async move { (keys(&mut client, "E/").await.len() == 2).then_some(()) }
    })
    .await;

    // One is SIGKILLed: its key stays while its lease lives, and two waits.
    one.kill();
    let killed = Instant::now();
    let (left, granted, attached) = time_to_live(&mut client, lease, true).await;
    assert_eq!(granted, SESSION_TTL, "etcdctl elect's session TTL");
    assert!(left > 0, "campaigner one's lease is gone already");
    assert_eq!(attached, [key.as_str()]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !two.stdout().contains("two"),
        "two was elected while one's lease lived: {}",
        two.describe()
    );
    assert!(two.exited().is_none(), "{}", two.describe());

    let bound = if wait_expiry {
        eprintln!("waiting for campaigner one's session lease ({SESSION_TTL} s) to expire");
        secs(SESSION_TTL) + extension + SLACK
    } else {
        eprintln!(
            "NOTE: etcdctl elect has no session TTL flag (its lease lives {SESSION_TTL} s); \
             revoking campaigner one's lease {lease:x} instead of waiting for its expiry \
             (which proposes the same revoke); set SKIFF_TEST_ELECT_EXPIRY=1 to wait"
        );
        client.lease_revoke(lease).await.expect("revoke");
        ETCDCTL_TIMEOUT
    };
    two.wait_output("\ntwo\n", bound).await;
    let took = killed.elapsed();
    eprintln!(
        "campaigner two took over {:.1} s after one was killed",
        took.as_secs_f64()
    );
    if wait_expiry {
        assert!(
            took >= secs(SESSION_TTL - 20),
            "two took over {took:?} after one was killed: one's lease expired early"
        );
    }
    observer.wait_output("\ntwo\n", ETCDCTL_TIMEOUT).await;
    let two_key = two.stdout().lines().next().unwrap_or_default().to_string();
    assert!(
        two_key.starts_with("E/") && two_key != key,
        "{}",
        two.describe()
    );
    assert_eq!(
        keys(&mut client, "E/")
            .await
            .into_iter()
            .map(|k| k.0)
            .collect::<Vec<_>>(),
        [two_key]
    );
    two.kill();
    observer.kill();
}
