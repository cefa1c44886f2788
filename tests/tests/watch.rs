//! The etcd v3 Watch service end to end, on 3-node clusters of `skiff
//! serve` processes, with etcd's own behaviour as the reference
//! (server/etcdserver/api/v3rpc/watch.go, server/storage/mvcc/watcher.go):
//!
//! * a watcher from now: the create response, then PUT and DELETE events in
//!   revision order with etcd's key-value fields;
//! * history: a watcher from a past revision replays it exactly once, then
//!   goes on live; prefix watchers; prev_kv; the NOPUT and NODELETE filters;
//! * one stream, many watchers: cancel, client-chosen ids, a duplicate id
//!   refused;
//! * a start revision below the compact revision: the watcher is cancelled
//!   with compact_revision set;
//! * progress requests: answered with watch id -1 at the member's revision
//!   once every watcher of the stream has caught up; progress_notify
//!   watchers hear the revision while idle (with a short interval);
//! * a txn's events share its revision and keep its operations' order;
//! * watchers on followers see the leader's writes in order, and across a
//!   leader SIGKILL every acknowledged write exactly once (the follower's
//!   stream, or a watcher re-created from the last revision seen + 1);
//! * the real `etcdctl watch` (skipped, with the reason printed, where
//!   etcdctl is not installed).
//!
//! Every wait is bounded; no assertion is on timing. A "quiet" wait (nothing
//! more arrives for [`QUIET`]) only ever catches responses that should not
//! exist: it cannot make a correct server fail.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_tests::client::{
    key_str, value_str, Client, Event, EventType, KeyValue, Txn, TxnOp, WatchOptions,
    WatchResponse, WatchStream, Watcher,
};
use skiff_tests::{etcdctl_path, poll_until, Cluster, ClusterOptions, NodeId, CLIENT_OPTIONS};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for watch responses that must come.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Nothing for this long: the stream has nothing more to say.
const QUIET: Duration = Duration::from_millis(1_500);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Acknowledged writes wanted before the leader is killed, and again under
/// the new leader.
const ACKS_PER_PHASE: usize = 150;
/// etcd's `clientv3.InvalidWatchID`: progress notifications for a whole
/// stream, refused creations.
const INVALID_WATCH_ID: i64 = -1;

// ---------------------------------------------------------------------------
// Events as the tests compare them.

/// An event, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    kind: EventType,
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    prev: Option<Prev>,
}

/// An event's prev_kv.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prev {
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

impl Prev {
    fn of(kv: &KeyValue) -> Prev {
        Prev {
            key: key_str(kv).to_string(),
            value: value_str(kv).to_string(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

impl Ev {
    fn of(e: &Event) -> Ev {
        let kv =
            e.kv.as_ref()
                .unwrap_or_else(|| panic!("an event without kv: {e:?}"));
        let kind = EventType::try_from(e.r#type)
            .unwrap_or_else(|_| panic!("an event of unknown type {}: {e:?}", e.r#type));
        Ev {
            kind,
            key: key_str(kv).to_string(),
            value: value_str(kv).to_string(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            prev: e.prev_kv.as_ref().map(Prev::of),
        }
    }

    /// A PUT event: `version` of `key`, created at `create`, written at
    /// `modified`.
    fn put(key: &str, value: &str, create: i64, modified: i64, version: i64) -> Ev {
        Ev {
            kind: EventType::Put,
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            version,
            prev: None,
        }
    }

    /// A DELETE event: etcd's tombstone carries the key and the deletion's
    /// revision only.
    fn del(key: &str, modified: i64) -> Ev {
        Ev {
            kind: EventType::Delete,
            key: key.into(),
            value: String::new(),
            create_revision: 0,
            mod_revision: modified,
            version: 0,
            prev: None,
        }
    }

    /// With prev_kv: the key's version before the event.
    fn prev(mut self, value: &str, create: i64, modified: i64, version: i64) -> Ev {
        self.prev = Some(Prev {
            key: self.key.clone(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            version,
        });
        self
    }
}

/// The events of watcher `id` in `responses`, in order.
fn events_of(responses: &[WatchResponse], id: i64) -> Vec<Ev> {
    responses
        .iter()
        .filter(|r| r.watch_id == id)
        .flat_map(|r| r.events.iter().map(Ev::of))
        .collect()
}

/// The latest event revision of watcher `id` in `responses` (0: none).
fn last_revision(responses: &[WatchResponse], id: i64) -> i64 {
    responses
        .iter()
        .filter(|r| r.watch_id == id)
        .flat_map(|r| r.events.iter())
        .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
        .max()
        .unwrap_or(0)
}

fn header_revision(r: &WatchResponse) -> i64 {
    r.header
        .as_ref()
        .unwrap_or_else(|| panic!("a watch response without header: {r:?}"))
        .revision
}

/// A response that only carries events (no create, cancel or compaction).
fn assert_plain_events(r: &WatchResponse, id: i64) {
    assert!(
        r.watch_id == id && !r.created && !r.canceled && r.compact_revision == 0,
        "expected events of watcher {id} only, got {r:?}"
    );
    assert!(!r.events.is_empty(), "an empty event response: {r:?}");
    let last = r.events.iter().map(|e| Ev::of(e).mod_revision).max();
    assert!(
        last.is_some_and(|last| header_revision(r) >= last),
        "the header revision is below the events' revisions: {r:?}"
    );
}

// ---------------------------------------------------------------------------
// Watch streams.

/// Opens a watch stream on `client`'s current endpoint with one watcher,
/// which the server must have created; returns it with its id.
async fn open(
    client: &mut Client,
    key: &str,
    options: Option<WatchOptions>,
) -> (Watcher, WatchStream, i64) {
    let (watcher, mut stream) = client
        .watch(key, options.clone())
        .await
        .unwrap_or_else(|e| panic!("watch {key:?} ({options:?}): {e}"));
    stream.set_timeout(EVENT_TIMEOUT);
    let created = watcher.create_response();
    assert!(
        created.created && !created.canceled && created.events.is_empty(),
        "the create response of a watch on {key:?} ({options:?}): {created:?}"
    );
    assert!(
        created.watch_id >= 0,
        "created with watch id {}",
        created.watch_id
    );
    let id = watcher.watch_id();
    assert_eq!(id, created.watch_id);
    (watcher, stream, id)
}

/// Reads responses until `done` holds for those read so far; panics if the
/// stream fails, ends, or `done` does not hold within [`EVENT_TIMEOUT`].
async fn read_until(
    stream: &mut WatchStream,
    what: &str,
    mut done: impl FnMut(&[WatchResponse]) -> bool,
) -> Vec<WatchResponse> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.message_within(left).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => panic!("the watch stream ended while waiting for {what}; got {got:#?}"),
            Err(e) => panic!("waiting for {what}: {e}; got {got:#?}"),
        }
    }
    got
}

/// Reads responses until the stream stays quiet for [`QUIET`]; returns
/// them.
async fn drain_quiet(stream: &mut WatchStream) -> Vec<WatchResponse> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut got = Vec::new();
    loop {
        match stream.message_within(QUIET).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => panic!("the watch stream ended; got {got:#?}"),
            Err(e) if e.is_timeout() => return got,
            Err(e) => panic!("draining a watch stream: {e}; got {got:#?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the watch stream never went quiet: {got:#?}"
        );
    }
}

/// Waits for the answer to a create request sent on an open stream.
async fn created(stream: &mut WatchStream, what: &str) -> WatchResponse {
    let got = read_until(stream, what, |rs| rs.iter().any(|r| r.created)).await;
    assert_eq!(
        got.len(),
        1,
        "responses before the create response ({what}): {got:#?}"
    );
    got.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------
// Writes.

async fn put(client: &mut Client, key: &str, value: &str) -> i64 {
    let r = client
        .put(key, value, None)
        .await
        .unwrap_or_else(|e| panic!("put {key}={value}: {e}"));
    r.header.expect("a put response has a header").revision
}

async fn del(client: &mut Client, key: &str) -> i64 {
    let r = client
        .delete(key, None)
        .await
        .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    assert_eq!(r.deleted, 1, "delete {key}");
    r.header.expect("a delete response has a header").revision
}

/// The store revision `client`'s member serves (linearizable read).
async fn current_revision(client: &mut Client) -> i64 {
    let r = client.get("\0", None).await.expect("get");
    r.header.expect("a range response has a header").revision
}

/// The leader and one follower.
async fn roles(cluster: &Cluster) -> (NodeId, NodeId) {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    (leader, follower)
}

/// Waits until `id` has applied everything the leader has committed.
async fn caught_up(cluster: &Cluster, id: NodeId) {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let commit = cluster.status(leader).await.expect("status").raft_index;
    cluster.wait_applied(id, commit, CATCH_UP_TIMEOUT).await;
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_from_now_sees_puts_and_deletes_in_order() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    put(&mut client, "before", "x").await;
    let rev0 = current_revision(&mut client).await;

    let (watcher, mut stream, id) = open(&mut client, "k", None).await;
    let created = watcher.create_response();
    assert_eq!(
        header_revision(created),
        rev0,
        "the create response's header revision is the store's: {created:?}"
    );
    assert_eq!(created.compact_revision, 0);

    let r1 = put(&mut client, "k", "v1").await;
    put(&mut client, "k2", "not watched").await; // another key
    put(&mut client, "j", "not watched").await;
    let r2 = put(&mut client, "k", "v2").await;
    let r3 = del(&mut client, "k").await;
    let r4 = put(&mut client, "k", "v3").await; // a new life: version 1
    assert_eq!((r1, r2, r4), (rev0 + 1, rev0 + 4, r3 + 1));

    let got = read_until(&mut stream, "the events of k", |rs| {
        last_revision(rs, id) >= r4
    })
    .await;
    for r in &got {
        assert_plain_events(r, id);
    }
    assert_eq!(
        events_of(&got, id),
        [
            Ev::put("k", "v1", r1, r1, 1),
            Ev::put("k", "v2", r1, r2, 2),
            Ev::del("k", r3),
            Ev::put("k", "v3", r4, r4, 1),
        ]
    );
    let more = drain_quiet(&mut stream).await;
    assert!(more.is_empty(), "responses after the last event: {more:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_replayed_once_then_live_with_prefix_and_prev_kv() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;

    // History.
    let r1 = put(&mut client, "p/a", "1").await;
    let r2 = put(&mut client, "p/b", "1").await;
    put(&mut client, "q", "outside").await;
    let r4 = put(&mut client, "p/a", "2").await;
    let r5 = del(&mut client, "p/b").await;
    put(&mut client, "p0", "outside: the prefix's range end").await;
    put(&mut client, "p", "outside: below the prefix").await;

    // A prefix watcher from r2, on a follower: the history from r2 exactly
    // once, then what follows, live.
    let mut on_follower = cluster.client(follower).await;
    let options = WatchOptions::new().with_prefix().with_start_revision(r2);
    let (_watcher, mut stream, id) = open(&mut on_follower, "p/", Some(options)).await;
    let r8 = put(&mut client, "p/c", "1").await;
    let r9 = put(&mut client, "p/a", "3").await;
    let r10 = put(&mut client, "p/", "the prefix itself").await;
    put(&mut client, "p0", "outside again").await;
    let r12 = put(&mut client, "p/zz", "last").await;
    let got = read_until(&mut stream, "the replay and the live events", |rs| {
        last_revision(rs, id) >= r12
    })
    .await;
    for r in &got {
        assert_plain_events(r, id);
    }
    assert_eq!(
        events_of(&got, id),
        [
            Ev::put("p/b", "1", r2, r2, 1),
            Ev::put("p/a", "2", r1, r4, 2),
            Ev::del("p/b", r5),
            Ev::put("p/c", "1", r8, r8, 1),
            Ev::put("p/a", "3", r1, r9, 3),
            Ev::put("p/", "the prefix itself", r10, r10, 1),
            Ev::put("p/zz", "last", r12, r12, 1),
        ]
    );
    let more = drain_quiet(&mut stream).await;
    assert!(more.is_empty(), "responses after the last event: {more:#?}");

    // prev_kv: the version before each event, none on a create (the first
    // one or after a delete), live and replayed.
    let (_live_watcher, mut live, live_id) =
        open(&mut client, "k", Some(WatchOptions::new().with_prev_key())).await;
    let k1 = put(&mut client, "k", "v1").await;
    let k2 = put(&mut client, "k", "v2").await;
    let k3 = del(&mut client, "k").await;
    let k4 = put(&mut client, "k", "v3").await;
    let want = [
        Ev::put("k", "v1", k1, k1, 1),
        Ev::put("k", "v2", k1, k2, 2).prev("v1", k1, k1, 1),
        Ev::del("k", k3).prev("v2", k1, k2, 2),
        Ev::put("k", "v3", k4, k4, 1),
    ];
    let got = read_until(&mut live, "live events with prev_kv", |rs| {
        last_revision(rs, live_id) >= k4
    })
    .await;
    assert_eq!(events_of(&got, live_id), want, "live, with prev_kv");
    for follower_too in [false, true] {
        let c = if follower_too {
            &mut on_follower
        } else {
            &mut client
        };
        let options = WatchOptions::new().with_prev_key().with_start_revision(k1);
        let (_w, mut replay, replay_id) = open(c, "k", Some(options)).await;
        let got = read_until(&mut replay, "replayed events with prev_kv", |rs| {
            last_revision(rs, replay_id) >= k4
        })
        .await;
        assert_eq!(
            events_of(&got, replay_id),
            want,
            "replayed with prev_kv (on the follower: {follower_too})"
        );
        let more = drain_quiet(&mut replay).await;
        assert!(more.is_empty(), "responses after the last event: {more:#?}");
    }
    // Without prev_kv, no prev_kv.
    let (_w, mut plain, plain_id) = open(
        &mut client,
        "k",
        Some(WatchOptions::new().with_start_revision(k2)),
    )
    .await;
    let got = read_until(&mut plain, "events without prev_kv", |rs| {
        last_revision(rs, plain_id) >= k4
    })
    .await;
    assert_eq!(
        events_of(&got, plain_id),
        [
            Ev::put("k", "v2", k1, k2, 2),
            Ev::del("k", k3),
            Ev::put("k", "v3", k4, k4, 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_cancel_on_one_stream() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let mut on_follower = cluster.client(follower).await;

    // Two watchers on one stream (on a follower): NOPUT and NODELETE.
    let (mut watcher, mut stream, no_put) = open(
        &mut on_follower,
        "f",
        Some(WatchOptions::new().with_filter_put()),
    )
    .await;
    watcher
        .watch("f", Some(WatchOptions::new().with_filter_delete()))
        .await
        .expect("a second watcher");
    let c = created(&mut stream, "the NODELETE watcher").await;
    assert!(!c.canceled, "{c:?}");
    let no_delete = c.watch_id;
    assert_ne!(no_delete, no_put, "two watchers, one id");
    assert!(no_delete >= 0, "{c:?}");

    let r1 = put(&mut client, "f", "1").await;
    let r2 = del(&mut client, "f").await;
    let r3 = put(&mut client, "f", "2").await;
    let r4 = del(&mut client, "f").await;
    let r5 = put(&mut client, "f", "3").await;
    let mut got = read_until(&mut stream, "the filtered events", |rs| {
        last_revision(rs, no_put) >= r4 && last_revision(rs, no_delete) >= r5
    })
    .await;
    got.extend(drain_quiet(&mut stream).await);
    for r in &got {
        assert!(
            r.watch_id == no_put || r.watch_id == no_delete,
            "a response for no watcher of the stream: {r:?}"
        );
        assert_plain_events(r, r.watch_id);
    }
    assert_eq!(
        events_of(&got, no_put),
        [Ev::del("f", r2), Ev::del("f", r4)],
        "NOPUT"
    );
    assert_eq!(
        events_of(&got, no_delete),
        [
            Ev::put("f", "1", r1, r1, 1),
            Ev::put("f", "2", r3, r3, 1),
            Ev::put("f", "3", r5, r5, 1),
        ],
        "NODELETE"
    );

    // Cancel the NODELETE watcher: a canceled response, then nothing more
    // for it, while a watcher created after it on the same stream, and the
    // NOPUT one, go on.
    watcher.cancel_by_id(no_delete).await.expect("cancel");
    let got = read_until(&mut stream, "the cancel response", |rs| {
        rs.iter().any(|r| r.canceled)
    })
    .await;
    assert_eq!(got.len(), 1, "responses before the cancel: {got:#?}");
    let c = &got[0];
    assert!(
        c.watch_id == no_delete && c.canceled && !c.created && c.events.is_empty(),
        "the cancel response: {c:?}"
    );
    assert_eq!(c.compact_revision, 0, "{c:?}");
    watcher.watch("f", None).await.expect("a third watcher");
    let c = created(&mut stream, "the third watcher").await;
    assert!(!c.canceled, "{c:?}");
    let third = c.watch_id;
    assert!(third != no_put && third >= 0, "{c:?}");
    let r6 = put(&mut client, "f", "4").await;
    let r7 = del(&mut client, "f").await;
    let mut got = read_until(&mut stream, "events after the cancel", |rs| {
        last_revision(rs, third) >= r7 && last_revision(rs, no_put) >= r7
    })
    .await;
    got.extend(drain_quiet(&mut stream).await);
    let stray: Vec<_> = got
        .iter()
        .filter(|r| r.watch_id != third && r.watch_id != no_put)
        .collect();
    assert!(
        stray.is_empty(),
        "responses after watcher {no_delete} was cancelled: {stray:#?}"
    );
    assert_eq!(
        events_of(&got, third),
        [Ev::put("f", "4", r5, r6, 2), Ev::del("f", r7)]
    );
    assert_eq!(events_of(&got, no_put), [Ev::del("f", r7)]);

    // Watcher::cancel cancels the stream's first watcher.
    watcher.cancel().await.expect("cancel");
    let got = read_until(&mut stream, "the cancel of the first watcher", |rs| {
        rs.iter().any(|r| r.canceled)
    })
    .await;
    assert!(
        got.len() == 1 && got[0].watch_id == no_put && got[0].canceled,
        "{got:#?}"
    );
    let r8 = put(&mut client, "f", "5").await;
    let r9 = del(&mut client, "f").await;
    let mut got = read_until(&mut stream, "events of the third watcher", |rs| {
        last_revision(rs, third) >= r9
    })
    .await;
    got.extend(drain_quiet(&mut stream).await);
    assert!(
        got.iter().all(|r| r.watch_id == third),
        "responses for cancelled watchers: {got:#?}"
    );
    assert_eq!(
        events_of(&got, third),
        [Ev::put("f", "5", r8, r8, 1), Ev::del("f", r9)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_watch_ids_and_a_duplicate_refused() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;

    let (mut watcher, mut stream, id_a) =
        open(&mut client, "a", Some(WatchOptions::new().with_watch_id(7))).await;
    assert_eq!(id_a, 7, "the client's id");
    watcher
        .watch("b", Some(WatchOptions::new().with_watch_id(9)))
        .await
        .expect("watch b");
    let c = created(&mut stream, "the watcher with id 9").await;
    assert!(c.watch_id == 9 && !c.canceled, "{c:?}");

    // Id 7 is taken: etcd answers created and canceled at once, with watch
    // id -1 and the reason ("mvcc: duplicate watch ID provided on the
    // WatchStream").
    watcher
        .watch("c", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .expect("watch c");
    let c = created(&mut stream, "the answer to a duplicate id").await;
    assert!(
        c.created && c.canceled && !c.cancel_reason.is_empty(),
        "a duplicate watch id must be refused with a reason: {c:?}"
    );
    assert_eq!(c.watch_id, INVALID_WATCH_ID, "{c:?}");
    eprintln!("duplicate id refused: {:?}", c.cancel_reason);

    // Other creations etcd refuses the same way: an empty range (end <= key:
    // "mvcc: watcher range is empty"), a negative start revision (etcd
    // answers with the compacted error).
    for (what, key, options) in [
        ("an empty range", "z", WatchOptions::new().with_range("a")),
        (
            "a negative start revision",
            "e",
            WatchOptions::new().with_start_revision(-1),
        ),
    ] {
        watcher.watch(key, Some(options)).await.expect("watch");
        let c = created(&mut stream, what).await;
        assert!(
            c.created
                && c.canceled
                && c.watch_id == INVALID_WATCH_ID
                && !c.cancel_reason.is_empty(),
            "a watch on {what} must be refused with a reason: {c:?}"
        );
        eprintln!("{what} refused: {:?}", c.cancel_reason);
    }

    // A server-chosen id next to client-chosen ones: any other.
    watcher.watch("d", None).await.expect("watch d");
    let c = created(&mut stream, "a server-chosen id").await;
    let id_d = c.watch_id;
    assert!(!c.canceled && id_d >= 0 && id_d != 7 && id_d != 9, "{c:?}");

    let r1 = put(&mut client, "a", "1").await;
    let r2 = put(&mut client, "b", "1").await;
    let r3 = put(&mut client, "a", "2").await;
    put(&mut client, "c", "1").await; // its watcher was refused
    let r5 = put(&mut client, "d", "1").await;
    let mut got = read_until(&mut stream, "the events of the three watchers", |rs| {
        last_revision(rs, 7) >= r3 && last_revision(rs, 9) >= r2 && last_revision(rs, id_d) >= r5
    })
    .await;
    got.extend(drain_quiet(&mut stream).await);
    for r in &got {
        assert!(
            [7, 9, id_d].contains(&r.watch_id),
            "a response for no watcher: {r:?}"
        );
        assert_plain_events(r, r.watch_id);
    }
    assert_eq!(
        events_of(&got, 7),
        [Ev::put("a", "1", r1, r1, 1), Ev::put("a", "2", r1, r3, 2)]
    );
    assert_eq!(events_of(&got, 9), [Ev::put("b", "1", r2, r2, 1)]);
    assert_eq!(events_of(&got, id_d), [Ev::put("d", "1", r5, r5, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_revision_below_the_compaction_cancels_the_watcher() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let r1 = put(&mut client, "k", "v1").await;
    let r2 = put(&mut client, "k", "v2").await;
    let r3 = put(&mut client, "k", "v3").await;
    let r4 = put(&mut client, "k", "v4").await;
    client.compact(r3, false).await.expect("compact");
    caught_up(&cluster, follower).await;
    let mut on_follower = cluster.client(follower).await;

    for (member, c) in [("leader", &mut client), ("follower", &mut on_follower)] {
        for start in [r1, r2] {
            // etcd: the watcher is created, then cancelled with the
            // compact revision (and no events).
            let options = WatchOptions::new().with_start_revision(start);
            let (w, mut stream) = c.watch("k", Some(options)).await.expect("watch");
            stream.set_timeout(EVENT_TIMEOUT);
            let create = w.create_response();
            assert!(
                create.created && !create.canceled && create.watch_id >= 0,
                "etcd creates a watcher from a compacted revision, then cancels it \
                 in a response of its own; the create response of a watch from {start} \
                 on the {member}, compacted at {r3}: {create:?}"
            );
            let id = w.watch_id();
            let got = read_until(&mut stream, "the compaction's cancel", |rs| {
                rs.iter().any(|r| r.canceled || !r.events.is_empty())
            })
            .await;
            let r = got.last().unwrap();
            assert!(
                got.len() == 1
                    && r.watch_id == id
                    && r.canceled
                    && !r.created
                    && r.events.is_empty(),
                "a watch from {start} on the {member}, compacted at {r3}: {got:#?}"
            );
            assert_eq!(
                r.compact_revision, r3,
                "the compact revision of a watch from {start} on the {member}: {r:?}"
            );
            let more = drain_quiet(&mut stream).await;
            assert!(more.is_empty(), "responses after the cancel: {more:#?}");
        }

        // From the compact revision itself: its version of k is kept.
        let options = WatchOptions::new().with_start_revision(r3);
        let (_w, mut stream, id) = open(c, "k", Some(options)).await;
        let got = read_until(&mut stream, "events from the compact revision", |rs| {
            last_revision(rs, id) >= r4
        })
        .await;
        for r in &got {
            assert_plain_events(r, id);
        }
        assert_eq!(
            events_of(&got, id),
            [Ev::put("k", "v3", r1, r3, 3), Ev::put("k", "v4", r1, r4, 4)],
            "a watch from the compact revision on the {member}"
        );
    }
    // And live on after it.
    let options = WatchOptions::new().with_start_revision(r3);
    let (_w, mut stream, id) = open(&mut on_follower, "k", Some(options)).await;
    let r5 = put(&mut client, "k", "v5").await;
    let got = read_until(&mut stream, "events from the compact revision on", |rs| {
        last_revision(rs, id) >= r5
    })
    .await;
    assert_eq!(
        events_of(&got, id),
        [
            Ev::put("k", "v3", r1, r3, 3),
            Ev::put("k", "v4", r1, r4, 4),
            Ev::put("k", "v5", r1, r5, 5),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_request_is_answered_at_the_current_revision() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    put(&mut client, "before", "x").await;

    for (member, id) in [("leader", leader), ("follower", follower)] {
        // The member has applied every write: its revision stays put until
        // the next one.
        caught_up(&cluster, id).await;
        let mut on_member = cluster.client(id).await;
        let (mut watcher, mut stream, k_id) = open(&mut on_member, "k", None).await;
        watcher.watch("other", None).await.expect("watch other");
        let c = created(&mut stream, "a second watcher").await;
        assert!(!c.canceled, "{c:?}");

        // Caught up, nothing happened: the revision of the creation.
        let rev0 = header_revision(watcher.create_response());
        watcher.request_progress().await.expect("progress request");
        let got = read_until(&mut stream, "a progress notification", |rs| {
            rs.iter().any(|r| r.watch_id == INVALID_WATCH_ID)
        })
        .await;
        assert_progress(&got, rev0, member);

        // After an event the watchers have seen: its revision.
        let r = put(&mut client, "k", member).await;
        read_until(&mut stream, "the event", |rs| last_revision(rs, k_id) >= r).await;
        watcher.request_progress().await.expect("progress request");
        let got = read_until(&mut stream, "a progress notification", |rs| {
            rs.iter().any(|r| r.watch_id == INVALID_WATCH_ID)
        })
        .await;
        assert_progress(&got, r, member);
        // One notification for the stream, not one per watcher.
        let more = drain_quiet(&mut stream).await;
        assert!(
            more.is_empty(),
            "after the progress notification: {more:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_watchers_hear_the_revision_while_idle() {
    // etcd: every interval, a watcher that asked for progress_notify and is
    // caught up gets an empty response with its own id at the current
    // revision; the others get nothing.
    let cluster =
        Cluster::start(ClusterOptions::default().arg("--watch-progress-notify-interval-ms", 200));
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let r0 = put(&mut client, "other", "x").await;
    caught_up(&cluster, follower).await;
    let mut on_follower = cluster.client(follower).await;
    let (mut watcher, mut stream, quiet_id) = open(&mut on_follower, "k", None).await;
    watcher
        .watch("k", Some(WatchOptions::new().with_progress_notify()))
        .await
        .expect("watch");
    let c = created(&mut stream, "the progress_notify watcher").await;
    assert!(!c.canceled, "{c:?}");
    let notified = c.watch_id;
    let is_notification = |r: &WatchResponse| r.watch_id == notified && r.events.is_empty();

    let got = read_until(&mut stream, "two progress notifications", |rs| {
        rs.iter().filter(|r| is_notification(r)).count() >= 2
    })
    .await;
    for r in &got {
        assert!(
            is_notification(r) && !r.created && !r.canceled && header_revision(r) == r0,
            "expected progress notifications of watcher {notified} at revision {r0} \
             (none for watcher {quiet_id}): {r:?}"
        );
    }

    // After an event: the event for both, then notifications at its
    // revision.
    let r1 = put(&mut client, "k", "v").await;
    let got = read_until(&mut stream, "a notification after the event", |rs| {
        last_revision(rs, notified) >= r1
            && last_revision(rs, quiet_id) >= r1
            && rs
                .iter()
                .any(|r| is_notification(r) && header_revision(r) >= r1)
    })
    .await;
    for r in &got {
        if r.events.is_empty() {
            assert!(
                r.watch_id == notified && !r.created && !r.canceled,
                "an empty response not for watcher {notified}: {r:?}"
            );
            let rev = header_revision(r);
            assert!(
                rev == r0 || rev == r1,
                "a progress notification at {rev}: {r:?}"
            );
        } else {
            assert_plain_events(r, r.watch_id);
        }
    }
    for id in [notified, quiet_id] {
        assert_eq!(
            events_of(&got, id),
            [Ev::put("k", "v", r1, r1, 1)],
            "watcher {id}"
        );
    }
}

/// `got` is one progress notification for the whole stream at `revision`.
fn assert_progress(got: &[WatchResponse], revision: i64, member: &str) {
    assert_eq!(got.len(), 1, "on the {member}: {got:#?}");
    let r = &got[0];
    assert!(
        r.watch_id == INVALID_WATCH_ID
            && r.events.is_empty()
            && !r.created
            && !r.canceled
            && r.compact_revision == 0,
        "a progress notification on the {member}: {r:?}"
    );
    assert_eq!(
        header_revision(r),
        revision,
        "the progress notification's revision on the {member}: {r:?}"
    );
}

/// The events a sequence of writes must produce, kept as they are made.
#[derive(Default)]
struct Model {
    /// Live keys: (create revision, version).
    keys: BTreeMap<String, (i64, i64)>,
    events: Vec<Ev>,
}

impl Model {
    fn put(&mut self, key: &str, value: &str, revision: i64) {
        let (create, version) = match self.keys.get(key) {
            Some(&(create, version)) => (create, version + 1),
            None => (revision, 1),
        };
        self.keys.insert(key.to_string(), (create, version));
        self.events
            .push(Ev::put(key, value, create, revision, version));
    }

    fn del(&mut self, key: &str, revision: i64) {
        assert!(self.keys.remove(key).is_some(), "{key} is not live");
        self.events.push(Ev::del(key, revision));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_watchers_see_the_leaders_writes_in_order() {
    const WRITES: usize = 200;
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = roles(&cluster).await;
    let followers: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let mut client = cluster.client(leader).await;
    let mut streams = Vec::new();
    for &id in &followers {
        let mut c = cluster.client(id).await;
        let (w, s, watch_id) = open(&mut c, "w/", Some(WatchOptions::new().with_prefix())).await;
        streams.push((id, w, s, watch_id));
    }

    // Puts over 20 keys (new versions of them), deletes, two-put txns, and
    // writes outside the prefix.
    let mut model = Model::default();
    for i in 0..WRITES {
        let key = format!("w/{:02}", i % 20);
        let value = format!("value-{i}");
        match i % 10 {
            3 if model.keys.contains_key(&key) => {
                let rev = del(&mut client, &key).await;
                model.del(&key, rev);
            }
            5 => {
                let other = format!("w/{:02}", (i + 7) % 20);
                let r = client
                    .txn(Txn::new().and_then([
                        TxnOp::put(&key, &value, None),
                        TxnOp::put(&other, &value, None),
                    ]))
                    .await
                    .expect("txn");
                assert!(r.succeeded);
                let rev = r.header.expect("header").revision;
                model.put(&key, &value, rev);
                model.put(&other, &value, rev);
            }
            7 => {
                put(&mut client, &format!("x/{i}"), "outside").await;
            }
            _ => {
                let rev = put(&mut client, &key, &value).await;
                model.put(&key, &value, rev);
            }
        }
    }
    let last = model.events.last().unwrap().mod_revision;

    for (id, _watcher, stream, watch_id) in &mut streams {
        let got = read_until(stream, "every write of the leader", |rs| {
            last_revision(rs, *watch_id) >= last
        })
        .await;
        for r in &got {
            assert_plain_events(r, *watch_id);
        }
        let seen = events_of(&got, *watch_id);
        // Revision order, and within a revision (a txn's) the order of its
        // operations, as the model wrote them.
        let revisions = |evs: &[Ev]| evs.iter().map(|e| e.mod_revision).collect::<Vec<_>>();
        assert_eq!(
            revisions(&seen),
            revisions(&model.events),
            "follower {id}'s watcher: the revisions of the events"
        );
        let wrote = &model.events;
        if let Some(at) = (0..seen.len().max(wrote.len())).find(|&i| seen.get(i) != wrote.get(i)) {
            panic!(
                "follower {id}'s watcher differs from the writes at event {at} of {}: \
                 saw {:?}, wrote {:?}",
                wrote.len(),
                seen.get(at),
                wrote.get(at)
            );
        }
        let more = drain_quiet(stream).await;
        assert!(more.is_empty(), "responses after the last event: {more:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txns_events_come_in_the_order_of_its_operations_live_and_replayed() {
    // A txn's events share its revision and come in the order the txn ran
    // its operations, live and replayed from history alike (each version
    // keeps its place among its revision's writes: etcd's sub-revision),
    // as etcd sends them.
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;
    let c1 = put(&mut client, "t/c", "old").await;
    let (_w, mut live, live_id) =
        open(&mut client, "t/", Some(WatchOptions::new().with_prefix())).await;
    let r = client
        .txn(Txn::new().and_then([
            TxnOp::put("t/d", "1", None),
            TxnOp::delete("t/c", None),
            TxnOp::put("t/a", "2", None),
        ]))
        .await
        .expect("txn");
    assert!(r.succeeded);
    let rev = r.header.expect("header").revision;
    assert!(c1 < rev);
    let want = [
        Ev::put("t/d", "1", rev, rev, 1),
        Ev::del("t/c", rev),
        Ev::put("t/a", "2", rev, rev, 1),
    ];
    let got = read_until(&mut live, "the txn's events, live", |rs| {
        events_of(rs, live_id).len() >= want.len()
    })
    .await;
    assert_eq!(events_of(&got, live_id), want, "live");
    caught_up(&cluster, follower).await;
    let mut on_follower = cluster.client(follower).await;
    let options = WatchOptions::new().with_prefix().with_start_revision(rev);
    let (_w, mut replay, replay_id) = open(&mut on_follower, "t/", Some(options)).await;
    let got = read_until(&mut replay, "the txn's events, replayed", |rs| {
        events_of(rs, replay_id).len() >= want.len()
    })
    .await;
    assert_eq!(events_of(&got, replay_id), want, "replayed");
}

// ---------------------------------------------------------------------------
// Across a leader crash.

/// What the writer saw.
#[derive(Default, Clone)]
struct Ledger {
    /// Every put sent: key → value.
    attempted: BTreeMap<String, String>,
    /// Acknowledged puts: (key, value, revision).
    acked: Vec<(String, String, i64)>,
    errors: usize,
}

/// Puts `w/<seq>` keys, one at a time, never reusing a key, through a
/// client of every member (the leader first); after an error the client
/// moves on to the next member.
async fn writer(endpoints: Vec<String>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let mut client = skiff_tests::connect(&endpoints).await;
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let key = format!("w/{seq:06}");
        let value = format!("value-{seq}");
        seq += 1;
        ledger
            .lock()
            .unwrap()
            .attempted
            .insert(key.clone(), value.clone());
        match client.put(&key, &value, None).await {
            Ok(r) => {
                let rev = r.header.expect("header").revision;
                ledger.lock().unwrap().acked.push((key, value, rev));
            }
            Err(_) => {
                ledger.lock().unwrap().errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn acked(ledger: &Mutex<Ledger>) -> usize {
    ledger.lock().unwrap().acked.len()
}

async fn wait_acks(ledger: &Mutex<Ledger>, target: usize, what: &str) {
    poll_until(
        &format!("{target} acknowledged writes ({what})"),
        CATCH_UP_TIMEOUT,
        || async { (acked(ledger) >= target).then_some(()) },
    )
    .await;
}

/// What a [`follow`] task saw.
#[derive(Default, Debug)]
struct Followed {
    /// Every event, in the order received: (key, value, revision).
    events: Vec<(String, String, i64)>,
    /// Streams opened (the first one included), with their endpoints.
    streams: Vec<String>,
    /// Why streams ended, or could not be opened.
    interruptions: Vec<String>,
}

impl Followed {
    fn last_revision(&self) -> i64 {
        self.events.last().map_or(0, |e| e.2)
    }
}

/// Follows the `w/` prefix from `start`, on `endpoints` (the first first):
/// when a stream fails or ends, re-creates the watcher from the revision
/// after the last one seen, on the next endpoint. Returns when `until`
/// (once known, > 0) has been seen, or `stop` is set.
async fn follow(
    endpoints: Vec<String>,
    start: i64,
    until: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Followed>>,
) {
    let done = || {
        let until = until.load(Ordering::Acquire);
        stop.load(Ordering::Acquire) || (until > 0 && seen.lock().unwrap().last_revision() >= until)
    };
    let interrupted = |why: String| seen.lock().unwrap().interruptions.push(why);
    let mut attempt = 0;
    while !done() {
        let mut rotated = endpoints.clone();
        rotated.rotate_left(attempt % endpoints.len());
        attempt += 1;
        let from = match seen.lock().unwrap().last_revision() {
            0 => start,
            last => last + 1,
        };
        let mut client = match Client::connect(&rotated, CLIENT_OPTIONS).await {
            Ok(c) => c,
            Err(e) => {
                interrupted(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let (_watcher, mut stream) = match client.watch("w/", Some(options)).await {
            Ok(w) if w.0.create_response().created && !w.0.create_response().canceled => w,
            Ok((w, _)) => {
                interrupted(format!("watch refused: {:?}", w.create_response()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                interrupted(format!("watch: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        seen.lock()
            .unwrap()
            .streams
            .push(format!("{} from {from}", stream.endpoint()));
        while !done() {
            match stream.message_within(Duration::from_millis(500)).await {
                Ok(Some(r)) => {
                    let mut seen = seen.lock().unwrap();
                    for e in &r.events {
                        let kv = e.kv.as_ref().expect("an event has a kv");
                        assert_eq!(e.r#type, EventType::Put as i32, "only puts: {e:?}");
                        seen.events.push((
                            key_str(kv).to_string(),
                            value_str(kv).to_string(),
                            kv.mod_revision,
                        ));
                    }
                    if r.canceled {
                        drop(seen);
                        interrupted(format!("cancelled: {r:?}"));
                        break;
                    }
                }
                Ok(None) => {
                    interrupted(format!("{}: the stream ended", stream.endpoint()));
                    break;
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    interrupted(e.to_string());
                    break;
                }
            }
        }
    }
}

/// Checks what a follower saw against the ledger: every revision from
/// `start` to `last` exactly once, in order (the writer's puts are the
/// cluster's only writes), each acknowledged put at its revision, and
/// nothing that was never attempted.
fn check_followed(name: &str, followed: &Followed, ledger: &Ledger, start: i64, last: i64) {
    let revisions: Vec<i64> = followed.events.iter().map(|e| e.2).collect();
    // Puts whose fate the writer did not learn may commit after `last`.
    let last = last.max(followed.last_revision());
    let want: Vec<i64> = (start..=last).collect();
    if revisions != want {
        let mut counts = BTreeMap::<i64, usize>::new();
        for &r in &revisions {
            *counts.entry(r).or_default() += 1;
        }
        let repeated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(10).collect();
        let missing: Vec<_> = want
            .iter()
            .filter(|r| !counts.contains_key(r))
            .take(10)
            .collect();
        let disorder = revisions.windows(2).position(|w| w[0] >= w[1]);
        panic!(
            "{name}: revisions {start}..={last} not seen exactly once in order: \
             {} events; repeated (rev, times) {repeated:?}; missing {missing:?}; \
             first out of order at event {disorder:?}; streams {:?}",
            revisions.len(),
            followed.streams
        );
    }
    let by_revision: BTreeMap<i64, (&str, &str)> = followed
        .events
        .iter()
        .map(|(k, v, r)| (*r, (k.as_str(), v.as_str())))
        .collect();
    for (key, value, rev) in &ledger.acked {
        assert_eq!(
            by_revision.get(rev),
            Some(&(key.as_str(), value.as_str())),
            "{name}: acknowledged put {key}={value} at revision {rev}"
        );
    }
    for (key, value, rev) in &followed.events {
        assert_eq!(
            ledger.attempted.get(key),
            Some(value),
            "{name}: event {key}={value} at {rev} was never written"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_every_acknowledged_write_once_across_a_leader_crash() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let (old_leader, old_term) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != old_leader)
        .unwrap();
    let mut client = cluster.client(old_leader).await;
    let start = current_revision(&mut client).await + 1;

    // Two followers of the writes: one on a follower, which survives, one
    // on the leader, which is killed and must resume elsewhere.
    let until = Arc::new(AtomicI64::new(0));
    let stop_following = Arc::new(AtomicBool::new(false));
    let mut followers = Vec::new();
    for (name, first) in [("on the follower", follower), ("on the leader", old_leader)] {
        let mut endpoints = vec![cluster.endpoint(first)];
        endpoints.extend(
            cluster
                .ids()
                .into_iter()
                .filter(|&id| id != first)
                .map(|id| cluster.endpoint(id)),
        );
        let seen = Arc::new(Mutex::new(Followed::default()));
        let task = tokio::spawn(follow(
            endpoints,
            start,
            until.clone(),
            stop_following.clone(),
            seen.clone(),
        ));
        followers.push((name, seen, task));
    }
    // Both watchers exist before the first write (they start from `start`
    // anyway, so this only keeps the first phase live rather than replayed).
    for (name, seen, _) in &followers {
        poll_until(&format!("the watcher {name}"), EVENT_TIMEOUT, || async {
            (!seen.lock().unwrap().streams.is_empty()).then_some(())
        })
        .await;
    }

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut endpoints = vec![cluster.endpoint(old_leader)];
    endpoints.extend(
        cluster
            .ids()
            .into_iter()
            .filter(|&id| id != old_leader)
            .map(|id| cluster.endpoint(id)),
    );
    let writer = tokio::spawn(writer(endpoints, ledger.clone(), stop.clone()));

    wait_acks(&ledger, ACKS_PER_PHASE, "before the crash").await;
    cluster.kill(old_leader);
    let acked_at_kill = acked(&ledger);
    let (new_leader, new_term) = cluster.wait_leader(LEADER_TIMEOUT).await;
    assert_ne!(new_leader, old_leader);
    assert!(new_term > old_term, "term {new_term} after {old_term}");
    let acked_at_election = acked(&ledger);
    wait_acks(
        &ledger,
        acked_at_election + ACKS_PER_PHASE,
        "under the new leader",
    )
    .await;
    stop.store(true, Ordering::Release);
    writer.await.expect("writer task");

    // Everything committed, acknowledged or not: up to the new leader's
    // revision.
    let mut survivor = cluster.client(new_leader).await;
    let last = current_revision(&mut survivor).await;
    until.store(last, Ordering::Release);
    for (name, seen, _) in &followers {
        poll_until(
            &format!("the watcher {name} to reach revision {last}"),
            CATCH_UP_TIMEOUT,
            || async { (seen.lock().unwrap().last_revision() >= last).then_some(()) },
        )
        .await;
    }
    stop_following.store(true, Ordering::Release);
    let ledger = ledger.lock().unwrap().clone();
    eprintln!(
        "{} puts attempted, {} acknowledged, {} errors; acks at kill {acked_at_kill}, \
         at election {acked_at_election}; revisions {start}..={last}",
        ledger.attempted.len(),
        ledger.acked.len(),
        ledger.errors
    );
    for (name, seen, task) in followers {
        task.await.expect("follow task");
        let seen = seen.lock().unwrap();
        eprintln!(
            "watcher {name}: {} events, streams {:?}, interruptions {:?}",
            seen.events.len(),
            seen.streams,
            seen.interruptions
        );
        check_followed(name, &seen, &ledger, start, last);
        if name == "on the leader" {
            assert!(
                seen.streams.len() >= 2,
                "the watcher on the killed leader never resumed elsewhere: {:?}",
                seen.streams
            );
        }
    }
}

// ---------------------------------------------------------------------------
// etcdctl.

/// A running `etcdctl watch`, its output collected; killed when dropped.
struct EtcdctlWatch {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    args: Vec<String>,
}

impl EtcdctlWatch {
    fn start(bin: &Path, endpoints: &[String], args: &[&str]) -> EtcdctlWatch {
        let endpoints: Vec<&str> = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        let mut child = Command::new(bin)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=5s")
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let collect = |mut from: Box<dyn Read + Send>, into: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    into.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(Box::new(child.stdout.take().unwrap()), stdout.clone()),
            collect(Box::new(child.stderr.take().unwrap()), stderr.clone()),
        ];
        EtcdctlWatch {
            child,
            stdout,
            stderr,
            readers,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until `stream` (stdout or stderr) contains `until`,
    /// then kills etcdctl; returns (stdout, stderr). Panics if etcdctl exits
    /// first without having printed it.
    async fn until(mut self, until: &str, on_stderr: bool) -> (String, String) {
        let deadline = Instant::now() + ETCDCTL_TIMEOUT;
        loop {
            let text = if on_stderr {
                self.stderr()
            } else {
                self.stdout()
            };
            if text.contains(until) {
                break;
            }
            let exited = self.child.try_wait().expect("try_wait");
            assert!(
                exited.is_none() || !self.readers.iter().all(JoinHandle::is_finished),
                "etcdctl watch {:?} exited ({exited:?}) without printing {until:?}:\n\
                 stdout: {}\nstderr: {}",
                self.args,
                self.stdout(),
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "etcdctl watch {:?} did not print {until:?} within {ETCDCTL_TIMEOUT:?}:\n\
                 stdout: {}\nstderr: {}",
                self.args,
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (self.stdout(), self.stderr())
    }
}

impl Drop for EtcdctlWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_replays_and_follows() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut client = cluster.client(leader).await;

    // `etcdctl watch foo --prefix --rev=N`, on a follower: history, then
    // live writes, as PUT/DELETE lines with key and value.
    let r1 = put(&mut client, "foo/a", "1").await;
    put(&mut client, "foo/b", "2").await;
    put(&mut client, "bar", "outside").await;
    put(&mut client, "foo/a", "3").await;
    del(&mut client, "foo/b").await;
    let watch = EtcdctlWatch::start(
        &bin,
        &[cluster.endpoint(follower)],
        &["foo", "--prefix", &format!("--rev={r1}")],
    );
    put(&mut client, "foo/c", "4").await;
    put(&mut client, "baz", "outside").await;
    del(&mut client, "foo/a").await;
    put(&mut client, "foobar", "in: the prefix is foo").await;
    put(&mut client, "foo/end", "done").await;
    let (stdout, stderr) = watch.until("foo/end\ndone\n", false).await;
    assert_eq!(
        stdout,
        "PUT\nfoo/a\n1\n\
         PUT\nfoo/b\n2\n\
         PUT\nfoo/a\n3\n\
         DELETE\nfoo/b\n\n\
         PUT\nfoo/c\n4\n\
         DELETE\nfoo/a\n\n\
         PUT\nfoobar\nin: the prefix is foo\n\
         PUT\nfoo/end\ndone\n",
        "etcdctl watch --prefix --rev={r1} (stderr: {stderr})"
    );

    // `etcdctl watch --prev-kv`: the previous key and value before the
    // event's, none on a create.
    let k1 = put(&mut client, "k", "v1").await;
    put(&mut client, "k", "v2").await;
    let k3 = del(&mut client, "k").await;
    let watch = EtcdctlWatch::start(
        &bin,
        &cluster.endpoints(),
        &["k", "--prev-kv", &format!("--rev={k1}")],
    );
    put(&mut client, "k", "v3").await;
    put(&mut client, "k", "v4").await;
    let (stdout, stderr) = watch.until("k\nv4\n", false).await;
    assert_eq!(
        stdout,
        "PUT\nk\nv1\n\
         PUT\nk\nv1\nk\nv2\n\
         DELETE\nk\nv2\nk\n\n\
         PUT\nk\nv3\n\
         PUT\nk\nv3\nk\nv4\n",
        "etcdctl watch --prev-kv --rev={k1} (stderr: {stderr})"
    );

    // Below the compact revision: etcdctl reports the watch cancelled as
    // compacted (from the response's compact_revision).
    client.compact(k3, false).await.expect("compact");
    caught_up(&cluster, follower).await;
    let watch = EtcdctlWatch::start(
        &bin,
        &[cluster.endpoint(follower)],
        &["k", &format!("--rev={k1}")],
    );
    let (stdout, stderr) = watch.until("compacted", true).await;
    assert!(
        stderr.contains("required revision has been compacted"),
        "etcdctl watch --rev={k1} below the compaction at {k3}: stderr {stderr:?}"
    );
    assert_eq!(stdout, "", "no events from a compacted watch");
}
