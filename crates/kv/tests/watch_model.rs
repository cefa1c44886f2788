//! Watch delivery against the MVCC history, in process (no network, no
//! Raft): a [`KvMachine`] applies random batches of log entries (puts,
//! deletes of one key and of ranges, txns, compactions at a random
//! revision, no-ops, physical compaction steps) on a small key space, its
//! hub's dispatcher runs on its own thread, and watchers are created (any
//! key / prefix / range / all keys, start revision now, past, at or below
//! the compact revision, or future; random filters and prev_kv), cancelled
//! and their streams closed at random points, on four streams: two drained
//! after every step, two "slow" ones (queues of 2 and 1 responses) drained
//! only now and then, so that their watchers go unsynced and catch up from
//! history.
//!
//! The reference is a second [`KvStore`] fed the same entries with
//! `collect_events(true)`; its events are themselves checked against a
//! naive model of the live keys (each event's `prev_kv` is the key's
//! previous live version, a put's version and create revision follow from
//! it).
//!
//! At the end every stream asks for progress (answered only once all its
//! watchers are synced, after every event through the dispatcher's
//! revision was queued), the test drains until every stream answered at
//! the final revision or later, then checks each watcher. With `S` its
//! effective start (`start_revision`, or the revision in its created
//! header + 1 when it asked for 0), `E(r)` the reference events of
//! revision `r` on its keys that its filters let through, `prev_kv`
//! removed unless it asked for it, and `E'(r)` the same with only the
//! puts and no `prev_kv` at all (a revision read from history at the
//! compact revision itself: its deletions and previous versions are gone,
//! as in etcd):
//!
//! * it receives events only of revisions `>= S`, revisions in increasing
//!   order, each revision's events in one run, in the order the reference
//!   store made them (a Txn's op order; each key once);
//! * **not cancelled** (neither by the test nor by compaction, stream not
//!   closed): for every revision `r` in `S..=final` it received exactly
//!   `E(r)`, or exactly `E'(r)` when `r` is a revision the store was
//!   compacted to;
//! * **cancelled for compaction** at `C` (`canceled`, `compact_revision =
//!   C`): `C` is a revision the store was compacted to, and the events it
//!   received are those of the rule above for `S..=L` (`L`: its last
//!   event's revision, `S - 1` if none) with `L + 1 < C`: the next
//!   revision it needed was below `C` (etcd cancels a watcher whose next
//!   revision was compacted away; one that had received revision `C - 1`
//!   or later needs nothing below `C`);
//! * **cancelled by the test, or stream closed**: the same prefix rule,
//!   without the condition on `C`;
//! * a start-0 watcher's created header revision is not below the store
//!   revision the test had applied before sending the create.
//!
//! Two more tests drive the gap paths deterministically or nearly so: a
//! feed overflow ([`FEED_BATCHES_MAX`] batches queued while the dispatcher
//! is held inside a view request), and a watcher created while a batch
//! applied without collecting events.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use skiff_kv::machine::{KvCommand, KvMachine, KvResponse};
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::watch_create_request::FilterType;
use skiff_kv::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchResponse,
};
use skiff_kv::pb::mvccpb::event::EventType;
use skiff_kv::pb::mvccpb::{Event, KeyValue};
use skiff_kv::store::{KvError, KvStore};
use skiff_kv::watch::{
    Command, Hub, ViewSource, FEED_BATCHES_MAX, INVALID_WATCH_ID, STREAM_RESPONSES_MAX,
};
use skiff_node::{Committed, SnapshotView, StateMachine};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

/// The key space, in key order; several share a prefix.
const KEYS: [&str; 6] = ["a", "a/1", "a/2", "ab", "b", "b/1"];
/// Prefixes watched.
const PREFIXES: [&str; 3] = ["a", "a/", "b"];
/// Event queue capacity of each stream slot; below [`SLOW_BELOW`] a slot is
/// slow: drained only by [`Op::Drain`] and at the end.
const SLOT_CAPACITIES: [usize; 4] = [STREAM_RESPONSES_MAX, STREAM_RESPONSES_MAX, 2, 1];
const SLOW_BELOW: usize = 8;
/// Control responses (created, cancelled) queued per stream.
const CONTROL_CAPACITY: usize = 1024;
/// Longest the end of a case may wait for the streams.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Never fires within a test: no progress notifications but requested ones.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key(i: usize) -> Bytes {
    Bytes::from_static(KEYS[i].as_bytes())
}

/// The range end of the keys starting with `p`.
fn prefix_end(p: &[u8]) -> Bytes {
    let mut end = p.to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    Bytes::from(end)
}

/// Keys `a..b` when `a < b`, the prefix of key `a` when equal, keys from
/// `b` on when `a > b`.
fn key_range(a: usize, b: usize) -> (Bytes, Bytes) {
    use std::cmp::Ordering::*;
    match a.cmp(&b) {
        Less => (key(a), key(b)),
        Equal => (key(a), prefix_end(KEYS[a].as_bytes())),
        Greater => (key(b), Bytes::from_static(b"\0")),
    }
}

/// etcd's key range rule, written out independently of the store's.
fn in_range(start: &[u8], range_end: &[u8], k: &[u8]) -> bool {
    if range_end.is_empty() {
        k == start
    } else if range_end == [0] {
        k >= start
    } else {
        start <= k && k < range_end
    }
}

fn put_op(k: Bytes, v: Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: k,
            value: v,
            ..Default::default()
        })),
    }
}

fn delete_op(k: Bytes, range_end: Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: k,
            range_end,
            prev_kv: false,
        })),
    }
}

fn encoded(cmd: &KvCommand) -> Bytes {
    let mut b = BytesMut::new();
    KvMachine::encode_command(cmd, &mut b);
    b.freeze()
}

fn rev_of(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

fn is_delete(ev: &Event) -> bool {
    ev.r#type == EventType::Delete as i32
}

/// `rev:PUT key=value (prev mod_rev=value)`, one per event.
fn show(evs: &[Event]) -> String {
    let parts: Vec<String> = evs
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            let body = if is_delete(e) {
                format!("DEL {}", String::from_utf8_lossy(&kv.key))
            } else {
                format!(
                    "PUT {}={}",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value)
                )
            };
            let prev = e.prev_kv.as_ref().map_or(String::new(), |p| {
                format!(
                    " (prev {}={})",
                    p.mod_revision,
                    String::from_utf8_lossy(&p.value)
                )
            });
            format!("{}:{body}{prev}", kv.mod_revision)
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------

/// One log entry.
#[derive(Debug, Clone)]
enum W {
    Put(usize),
    Del(usize),
    /// See [`key_range`].
    DelRange(usize, usize),
    /// If the version of `cmp_key` equals `version`: `success`, else
    /// `failure`; each a list of (key, put?) (a key's first op kept).
    Txn {
        cmp_key: usize,
        version: i64,
        success: Vec<(usize, bool)>,
        failure: Vec<(usize, bool)>,
    },
    /// Compact to `1 + n % revision` (at or below the compact revision:
    /// refused, as is fine).
    Compact(u32),
    /// Compact to exactly this revision (the fixed tests).
    CompactTo(i64),
    /// An entry of the runtime's own (no command).
    Noop,
}

#[derive(Debug, Clone)]
enum RangeSpec {
    Key(usize),
    Prefix(usize),
    /// See [`key_range`].
    Range(usize, usize),
    /// Empty key, range end "\0".
    All,
}

impl RangeSpec {
    fn bounds(&self) -> (Bytes, Bytes) {
        match self {
            RangeSpec::Key(i) => (key(*i), Bytes::new()),
            RangeSpec::Prefix(p) => (
                Bytes::from_static(PREFIXES[*p].as_bytes()),
                prefix_end(PREFIXES[*p].as_bytes()),
            ),
            RangeSpec::Range(a, b) => key_range(*a, *b),
            RangeSpec::All => (Bytes::new(), Bytes::from_static(b"\0")),
        }
    }
}

#[derive(Debug, Clone)]
enum StartSpec {
    /// start_revision 0.
    Now,
    /// `1 + n % revision`: any past revision, below the compact revision
    /// included.
    Past(u32),
    /// The compact revision itself (1 before any compaction).
    AtCompact,
    /// `revision + n`.
    Future(u8),
    /// Exactly this revision (the fixed tests).
    At(i64),
}

#[derive(Debug, Clone)]
struct Spec {
    range: RangeSpec,
    start: StartSpec,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    /// Ask for a watch_id (else the dispatcher assigns one).
    explicit_id: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// Apply these entries as one batch, then maybe run physical
    /// compaction to the end.
    Apply(Vec<W>, bool),
    Create(usize, Spec),
    /// Cancel one of the slot's watchers (picked by the number).
    Cancel(usize, usize),
    /// Drain a (slow) slot's event queue once.
    Drain(usize),
    /// Close the slot's stream and open a new one in its place.
    Reopen(usize),
    /// Let the dispatcher run a little.
    Pause,
    /// Install a snapshot of a leader that applied the log so far, these
    /// entries, and maybe a compaction to its revision minus the number.
    Install(Vec<W>, Option<u8>),
}

fn write_strategy() -> impl Strategy<Value = W> {
    let k = 0..KEYS.len();
    let txn_ops = vec((0..KEYS.len(), any::<bool>()), 0..4);
    prop_oneof![
        16 => k.clone().prop_map(W::Put),
        4 => k.clone().prop_map(W::Del),
        4 => (k.clone(), k.clone()).prop_map(|(a, b)| W::DelRange(a, b)),
        6 => (k, 0i64..3, txn_ops.clone(), txn_ops).prop_map(|(cmp_key, version, success, failure)| {
            W::Txn { cmp_key, version, success, failure }
        }),
        1 => any::<u32>().prop_map(W::Compact),
        2 => Just(W::Noop),
    ]
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    let k = 0..KEYS.len();
    let range = prop_oneof![
        3 => k.clone().prop_map(RangeSpec::Key),
        2 => (0..PREFIXES.len()).prop_map(RangeSpec::Prefix),
        2 => (k.clone(), k).prop_map(|(a, b)| RangeSpec::Range(a, b)),
        2 => Just(RangeSpec::All),
    ];
    let start = prop_oneof![
        3 => Just(StartSpec::Now),
        3 => any::<u32>().prop_map(StartSpec::Past),
        1 => Just(StartSpec::AtCompact),
        1 => (1u8..4).prop_map(StartSpec::Future),
    ];
    // Each filter one time in five.
    let filter = (0u8..5).prop_map(|n| n == 0);
    (
        range,
        start,
        filter.clone(),
        filter,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(range, start, no_put, no_delete, prev_kv, explicit_id)| Spec {
                range,
                start,
                no_put,
                no_delete,
                prev_kv,
                explicit_id,
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0..SLOT_CAPACITIES.len();
    prop_oneof![
        24 => (vec(write_strategy(), 1..6), (0u8..4).prop_map(|n| n == 0))
            .prop_map(|(ws, step)| Op::Apply(ws, step)),
        8 => (slot.clone(), spec_strategy()).prop_map(|(s, spec)| Op::Create(s, spec)),
        2 => (slot.clone(), any::<usize>()).prop_map(|(s, n)| Op::Cancel(s, n)),
        6 => slot.clone().prop_map(Op::Drain),
        1 => slot.prop_map(Op::Reopen),
        2 => Just(Op::Pause),
        1 => (vec(write_strategy(), 0..12), proptest::option::of(0u8..4))
            .prop_map(|(ws, back)| Op::Install(ws, back)),
    ]
}

// ---------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------

/// One watcher as the test asked for it and as it was answered.
#[derive(Debug)]
struct Rec {
    slot: usize,
    stream: u64,
    spec: Spec,
    key: Bytes,
    range_end: Bytes,
    start_revision: i64,
    /// The watch_id asked for (0: assigned).
    asked_id: i64,
    /// The store revision applied before the create was sent.
    sent_at: i64,
    /// The compact revision then.
    compact_at: i64,
    /// Log entries applied then.
    applied_before: u64,
    id: Option<i64>,
    created_rev: Option<i64>,
    events: Vec<Event>,
    /// A compaction cancel: (compact_revision, header revision).
    cancel: Option<(i64, i64)>,
    client_cancelled: bool,
    cancel_acked: bool,
    closed: bool,
}

impl Rec {
    fn describe(&self, idx: usize) -> String {
        format!(
            "watcher #{idx} (slot {} stream {} id {:?}): key {:?} range_end {:?} \
             start_revision {} no_put {} no_delete {} prev_kv {}; sent at revision {} \
             (compact {}), created header revision {:?}, cancel {:?}, client_cancelled {}, \
             stream closed {}; spec {:?}",
            self.slot,
            self.stream,
            self.id,
            self.key,
            self.range_end,
            self.start_revision,
            self.spec.no_put,
            self.spec.no_delete,
            self.spec.prev_kv,
            self.sent_at,
            self.compact_at,
            self.created_rev,
            self.cancel,
            self.client_cancelled,
            self.closed,
            self.spec
        )
    }

    /// What this watcher should get of `all` (the reference events of one
    /// revision); `compacted`: as read from history at the compact
    /// revision itself (puts only, no prev_kv).
    fn expected(&self, all: &[Event], compacted: bool) -> Vec<Event> {
        all.iter()
            .filter(|e| {
                let k = e.kv.as_ref().map_or(&[][..], |kv| kv.key.as_ref());
                in_range(&self.key, &self.range_end, k)
            })
            .filter(|e| !(compacted && is_delete(e)))
            .filter(|e| {
                if is_delete(e) {
                    !self.spec.no_delete
                } else {
                    !self.spec.no_put
                }
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.spec.prev_kv || compacted {
                    e.prev_kv = None;
                }
                e
            })
            .collect()
    }
}

struct Slot {
    stream: u64,
    capacity: usize,
    events: mpsc::Receiver<WatchResponse>,
    control_tx: mpsc::Sender<WatchResponse>,
    control: mpsc::Receiver<WatchResponse>,
    /// Creates sent whose created response has not come, in order.
    pending: VecDeque<usize>,
    /// The highest revision of a progress response.
    progress: Option<i64>,
    /// The dispatcher dropped the stream (closed slots).
    disconnected: bool,
}

impl Slot {
    fn slow(&self) -> bool {
        self.capacity < SLOW_BELOW
    }
}

/// The gate of [`a_feed_overflow_gap_is_filled_from_history`]: the view
/// source marks `entered`, then waits for the mutex.
type Gate = (Arc<Mutex<()>>, Arc<AtomicBool>);

struct Harness {
    machine: Arc<Mutex<KvMachine>>,
    hub: Hub,
    dispatcher: Option<JoinHandle<()>>,
    reference: KvStore,
    /// The reference's events by revision.
    ref_events: BTreeMap<i64, Vec<Event>>,
    /// The naive model: each live key's latest version.
    live: BTreeMap<Bytes, KeyValue>,
    /// Revisions the store was compacted to.
    compacts: BTreeSet<i64>,
    index: u64,
    /// Every entry made, in order.
    log: Vec<Committed>,
    values: u64,
    slots: Vec<Slot>,
    closed: Vec<Slot>,
    next_stream: u64,
    recs: Vec<Rec>,
    by_id: HashMap<(u64, i64), usize>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.hub.stop();
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
    }
}

type Entries = (Vec<Committed>, Vec<(u64, Option<KvCommand>)>);

impl Harness {
    fn new(gate: Option<Gate>) -> Harness {
        let machine = Arc::new(Mutex::new(KvMachine::new()));
        let hub = lock(&machine).hub().clone();
        let m = machine.clone();
        let views: ViewSource = Box::new(move || {
            if let Some((gate, entered)) = &gate {
                entered.store(true, Ordering::SeqCst);
                drop(lock(gate));
            }
            Some(lock(&m).store().freeze())
        });
        let dispatcher = hub
            .start("watch-model".into(), views, PROGRESS_INTERVAL)
            .expect("dispatcher thread");
        let mut reference = KvStore::new();
        reference.collect_events(true);
        let mut h = Harness {
            machine,
            hub,
            dispatcher: Some(dispatcher),
            reference,
            ref_events: BTreeMap::new(),
            live: BTreeMap::new(),
            compacts: BTreeSet::new(),
            index: 0,
            log: Vec::new(),
            values: 0,
            slots: Vec::new(),
            closed: Vec::new(),
            next_stream: 1,
            recs: Vec::new(),
            by_id: HashMap::new(),
        };
        for cap in SLOT_CAPACITIES {
            let s = h.open(cap);
            h.slots.push(s);
        }
        h
    }

    fn open(&mut self, capacity: usize) -> Slot {
        let stream = self.next_stream;
        self.next_stream += 1;
        let (events_tx, events) = mpsc::channel(capacity);
        let (control_tx, control) = mpsc::channel(CONTROL_CAPACITY);
        self.hub
            .command(Command::Open {
                stream,
                events: events_tx,
            })
            .expect("open a stream");
        Slot {
            stream,
            capacity,
            events,
            control_tx,
            control,
            pending: VecDeque::new(),
            progress: None,
            disconnected: false,
        }
    }

    fn revision(&self) -> i64 {
        self.reference.revision()
    }

    fn value(&mut self) -> Bytes {
        self.values += 1;
        Bytes::from(format!("v{}", self.values))
    }

    fn txn_ops(&mut self, ops: &[(usize, bool)]) -> Vec<RequestOp> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for &(k, put) in ops {
            if !seen.insert(k) {
                continue;
            }
            out.push(if put {
                let v = self.value();
                put_op(key(k), v)
            } else {
                delete_op(key(k), Bytes::new())
            });
        }
        out
    }

    fn command(&mut self, w: &W) -> Option<KvCommand> {
        Some(match w {
            W::Put(k) => {
                let v = self.value();
                KvCommand::Op(put_op(key(*k), v))
            }
            W::Del(k) => KvCommand::Op(delete_op(key(*k), Bytes::new())),
            W::DelRange(a, b) => {
                let (k, end) = key_range(*a, *b);
                KvCommand::Op(delete_op(k, end))
            }
            W::Txn {
                cmp_key,
                version,
                success,
                failure,
            } => {
                let success = self.txn_ops(success);
                let failure = self.txn_ops(failure);
                KvCommand::Op(RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        compare: vec![Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Version as i32,
                            key: key(*cmp_key),
                            range_end: Bytes::new(),
                            target_union: Some(TargetUnion::Version(*version)),
                        }],
                        success,
                        failure,
                    })),
                })
            }
            W::Compact(n) => KvCommand::Compact {
                revision: 1 + i64::from(*n) % self.revision(),
            },
            W::CompactTo(revision) => KvCommand::Compact {
                revision: *revision,
            },
            W::Noop => return None,
        })
    }

    /// The log entries of `ws` (and the commands, for the reference).
    /// Compact revisions are picked against the reference's revision
    /// before the batch.
    fn entries(&mut self, ws: &[W]) -> Entries {
        let mut entries = Vec::new();
        let mut cmds = Vec::new();
        for w in ws {
            self.index += 1;
            let cmd = self.command(w);
            entries.push(Committed {
                index: self.index,
                term: 1,
                command: cmd.as_ref().map(encoded),
            });
            cmds.push((self.index, cmd));
        }
        self.log.extend(entries.iter().cloned());
        (entries, cmds)
    }

    fn apply(&mut self, ws: &[W], physical: bool) -> Result<(), String> {
        let (entries, cmds) = self.entries(ws);
        let mut responses = Vec::new();
        {
            let mut m = lock(&self.machine);
            m.apply(&entries, &mut responses)
                .map_err(|e| format!("apply failed: {e:?}"))?;
            if physical {
                while m.background_step() {}
            }
        }
        self.follow(&cmds, &responses)
    }

    /// Applies `cmds` to the reference, checks the machine answered the
    /// same, records the reference's events (checked against the model).
    fn follow(
        &mut self,
        cmds: &[(u64, Option<KvCommand>)],
        responses: &[Result<KvResponse, KvError>],
    ) -> Result<(), String> {
        let mut answers = responses.iter();
        for (index, cmd) in cmds {
            let index = *index;
            match cmd {
                None => self.reference.mark_applied(index),
                Some(KvCommand::Op(op)) => {
                    let want = self.reference.apply(index, op).map(KvResponse::Op);
                    let got = answers.next();
                    if got != Some(&want) {
                        return Err(format!(
                            "entry {index}: machine answered {got:?}, reference {want:?}"
                        ));
                    }
                }
                Some(KvCommand::Compact { revision }) => {
                    let want = self.reference.compact(index, *revision);
                    let got = answers.next();
                    match (&want, got) {
                        (Ok(()), Some(Ok(KvResponse::Compacted { .. }))) => {
                            self.compacts.insert(*revision);
                        }
                        (Err(a), Some(Err(b))) if a == b => {}
                        _ => {
                            return Err(format!(
                            "compact entry {index}: machine answered {got:?}, reference {want:?}"
                        ))
                        }
                    }
                }
                Some(other) => return Err(format!("entry {index}: the test makes no {other:?}")),
            }
        }
        if answers.next().is_some() {
            return Err("the machine answered more entries than it was given".into());
        }
        let events = self.reference.take_events();
        self.record(events)?;
        let (mrev, mcompact) = {
            let m = lock(&self.machine);
            (m.store().revision(), m.store().compact_revision())
        };
        if (mrev, mcompact) != (self.revision(), self.reference.compact_revision()) {
            return Err(format!(
                "machine at revision {mrev} compact {mcompact}, reference at {} compact {}",
                self.revision(),
                self.reference.compact_revision()
            ));
        }
        Ok(())
    }

    /// Checks the reference's events against the naive model of the live
    /// keys and files them by revision.
    fn record(&mut self, events: Vec<Event>) -> Result<(), String> {
        for ev in events {
            let kv = ev.kv.clone().ok_or("reference event without kv")?;
            let rev = kv.mod_revision;
            let last = self.ref_events.keys().next_back().copied().unwrap_or(0);
            if rev < last {
                return Err(format!("reference event of revision {rev} after {last}"));
            }
            if let Some(same) = self.ref_events.get(&rev) {
                if same
                    .iter()
                    .any(|e| e.kv.as_ref().is_some_and(|k| k.key == kv.key))
                {
                    return Err(format!(
                        "reference events of revision {rev} name {:?} twice",
                        kv.key
                    ));
                }
            }
            let prev = self.live.get(&kv.key).cloned();
            if ev.prev_kv != prev {
                return Err(format!(
                    "reference event {} has prev_kv {:?}, the model's live version is {prev:?}",
                    show(std::slice::from_ref(&ev)),
                    ev.prev_kv
                ));
            }
            if is_delete(&ev) {
                if prev.is_none() {
                    return Err(format!("delete event of a key not live: {kv:?}"));
                }
                self.live.remove(&kv.key);
            } else {
                let (version, create) = prev
                    .as_ref()
                    .map_or((1, rev), |p| (p.version + 1, p.create_revision));
                if kv.version != version || kv.create_revision != create {
                    return Err(format!(
                        "put event {kv:?}: the model wants version {version}, create {create}"
                    ));
                }
                self.live.insert(kv.key.clone(), kv);
            }
            self.ref_events.entry(rev).or_default().push(ev);
        }
        Ok(())
    }

    /// See [`Op::Install`].
    fn install(&mut self, ws: &[W], compact_back: Option<u8>) -> Result<(), String> {
        let fail = |e| format!("leader apply failed: {e:?}");
        let mut leader = KvMachine::new();
        leader.apply(&self.log, &mut Vec::new()).map_err(fail)?;
        let (mut entries, mut cmds) = self.entries(ws);
        let mut responses = Vec::new();
        leader.apply(&entries, &mut responses).map_err(fail)?;
        if let Some(back) = compact_back {
            let to = (leader.store().revision() - i64::from(back)).max(1);
            let (e, c) = self.entries(&[W::CompactTo(to)]);
            leader.apply(&e, &mut responses).map_err(fail)?;
            entries.extend(e);
            cmds.extend(c);
        }
        let mut bytes = Vec::new();
        leader
            .snapshot()
            .write_to(&mut bytes)
            .map_err(|e| format!("snapshot: {e}"))?;
        let restored =
            KvMachine::restore(&mut &bytes[..]).map_err(|e| format!("restore: {e:?}"))?;
        lock(&self.machine).install(restored);
        self.follow(&cmds, &responses)
    }

    fn start_revision(&self, start: &StartSpec) -> i64 {
        let rev = self.revision();
        match start {
            StartSpec::Now => 0,
            StartSpec::Past(n) => 1 + i64::from(*n) % rev,
            StartSpec::AtCompact => self.reference.compact_revision().max(1),
            StartSpec::Future(n) => rev + i64::from(*n),
            StartSpec::At(r) => *r,
        }
    }

    fn create(&mut self, slot: usize, spec: &Spec) -> Result<usize, String> {
        let idx = self.recs.len();
        let (key, range_end) = spec.range.bounds();
        let start_revision = self.start_revision(&spec.start);
        let asked_id = if spec.explicit_id {
            100 + idx as i64
        } else {
            0
        };
        let mut filters = Vec::new();
        if spec.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if spec.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        let req = WatchCreateRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            start_revision,
            progress_notify: false,
            filters,
            prev_kv: spec.prev_kv,
            watch_id: asked_id,
            fragment: false,
        };
        let s = &mut self.slots[slot];
        let reply = s
            .control_tx
            .clone()
            .try_reserve_owned()
            .map_err(|e| format!("control queue of slot {slot}: {e}"))?;
        self.hub
            .command(Command::Create {
                stream: s.stream,
                req,
                reply,
            })
            .map_err(|e| format!("create refused: {e}"))?;
        s.pending.push_back(idx);
        self.recs.push(Rec {
            slot,
            stream: s.stream,
            spec: spec.clone(),
            key,
            range_end,
            start_revision,
            asked_id,
            sent_at: self.reference.revision(),
            compact_at: self.reference.compact_revision(),
            applied_before: self.index,
            id: None,
            created_rev: None,
            events: Vec::new(),
            cancel: None,
            client_cancelled: false,
            cancel_acked: false,
            closed: false,
        });
        Ok(idx)
    }

    fn cancel(&mut self, slot: usize, pick: usize) -> Result<(), String> {
        let stream = self.slots[slot].stream;
        let live: Vec<usize> = (0..self.recs.len())
            .filter(|&i| {
                let r = &self.recs[i];
                r.stream == stream && r.id.is_some() && !r.client_cancelled && r.cancel.is_none()
            })
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let idx = live[pick % live.len()];
        let s = &mut self.slots[slot];
        let reply = s
            .control_tx
            .clone()
            .try_reserve_owned()
            .map_err(|e| format!("control queue of slot {slot}: {e}"))?;
        let watch_id = self.recs[idx].id.expect("filtered");
        self.hub
            .command(Command::Cancel {
                stream,
                watch_id,
                reply,
            })
            .map_err(|e| format!("cancel refused: {e}"))?;
        self.recs[idx].client_cancelled = true;
        Ok(())
    }

    fn reopen(&mut self, slot: usize) -> Result<(), String> {
        let stream = self.slots[slot].stream;
        self.hub
            .command(Command::Close { stream })
            .map_err(|e| format!("close refused: {e}"))?;
        for r in self.recs.iter_mut().filter(|r| r.stream == stream) {
            r.closed = true;
        }
        let fresh = self.open(SLOT_CAPACITIES[slot]);
        let old = std::mem::replace(&mut self.slots[slot], fresh);
        self.closed.push(old);
        Ok(())
    }

    /// Reads what came: control responses of every slot, events of the
    /// fast and closed slots (and of the slow ones when `slow`).
    fn poll(&mut self, slow: bool) -> Result<(), String> {
        for s in self.slots.iter_mut() {
            drain(s, &mut self.recs, &mut self.by_id, slow || !s.slow())?;
        }
        for s in self.closed.iter_mut() {
            drain(s, &mut self.recs, &mut self.by_id, true)?;
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Apply(ws, physical) => self.apply(ws, *physical)?,
            Op::Create(slot, spec) => {
                self.create(*slot, spec)?;
            }
            Op::Cancel(slot, pick) => {
                self.poll(false)?;
                self.cancel(*slot, *pick)?;
            }
            Op::Drain(slot) => {
                let s = &mut self.slots[*slot];
                drain(s, &mut self.recs, &mut self.by_id, true)?;
            }
            Op::Reopen(slot) => self.reopen(*slot)?,
            Op::Pause => std::thread::sleep(Duration::from_millis(1)),
            Op::Install(ws, back) => self.install(ws, *back)?,
        }
        self.poll(false)
    }

    fn gauges(&self) -> String {
        let g: Vec<String> = self
            .hub
            .gauges()
            .into_iter()
            .map(|(name, _, v)| format!("{name}={v}"))
            .collect();
        g.join(" ")
    }

    fn gauge(&self, name: &str) -> u64 {
        self.hub
            .gauges()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map_or(0, |(_, _, v)| v)
    }

    /// Waits until every stream answered a progress request at the final
    /// revision (so every event through it was queued) and every closed
    /// stream ended, then checks every watcher.
    fn finish(&mut self) -> Result<(), String> {
        let final_rev = self.revision();
        let progress_rev = final_rev;
        for s in &self.slots {
            self.hub
                .command(Command::Progress { stream: s.stream })
                .map_err(|e| format!("progress refused: {e}"))?;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            self.poll(true)?;
            let mut waiting = Vec::new();
            for s in &self.slots {
                if s.progress.is_none_or(|p| p < progress_rev) || !s.pending.is_empty() {
                    waiting.push(format!(
                        "stream {} (progress {:?}, {} creates unanswered)",
                        s.stream,
                        s.progress,
                        s.pending.len()
                    ));
                }
            }
            for s in &self.closed {
                if !s.disconnected || !s.pending.is_empty() {
                    waiting.push(format!(
                        "closed stream {} (ended {}, {} creates unanswered)",
                        s.stream,
                        s.disconnected,
                        s.pending.len()
                    ));
                }
            }
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "after {DRAIN_TIMEOUT:?}, still waiting for {}; final revision {final_rev}; \
                     gauges: {}",
                    waiting.join(", "),
                    self.gauges()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Anything more would be a duplicate.
        std::thread::sleep(Duration::from_millis(10));
        self.poll(true)?;
        for (idx, rec) in self.recs.iter().enumerate() {
            self.check(rec, final_rev)
                .map_err(|e| format!("{e}\n  {}", rec.describe(idx)))?;
        }
        Ok(())
    }

    /// The rules of the module docs, for one watcher.
    fn check(&self, rec: &Rec, final_rev: i64) -> Result<(), String> {
        let created_rev = rec.created_rev.ok_or("no created response")?;
        // Before the first apply the hub knows no revision and says 0
        // (see `a_watcher_created_before_any_apply_hears_the_store_revision`);
        // its start is then 1, which loses nothing.
        let before_any_apply = rec.applied_before == 0 && created_rev == 0;
        if rec.start_revision == 0 && created_rev < rec.sent_at && !before_any_apply {
            return Err(format!(
                "created header revision {created_rev} is below revision {} applied before \
                 the create was sent",
                rec.sent_at
            ));
        }
        let start = if rec.start_revision == 0 {
            created_rev + 1
        } else {
            rec.start_revision
        };
        // Received events by revision; a revision in two runs (a duplicate
        // delivery, or out of order) is an error.
        let mut got: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        let mut last = i64::MIN;
        for ev in &rec.events {
            let r = rev_of(ev);
            if r < last {
                return Err(format!(
                    "event of revision {r} after one of revision {last}; received {}",
                    show(&rec.events)
                ));
            }
            last = r;
            got.entry(r).or_default().push(ev.clone());
        }
        if let Some(&first) = got.keys().next() {
            if first < start {
                return Err(format!(
                    "event of revision {first} below the effective start {start}; received {}",
                    show(&rec.events)
                ));
            }
        }
        let received_last = got.keys().next_back().copied();
        if received_last.is_some_and(|l| l > final_rev) {
            return Err(format!("event beyond the final revision {final_rev}"));
        }
        let complete = rec.cancel.is_none() && !rec.client_cancelled && !rec.closed;
        let hi = if complete {
            final_rev
        } else {
            received_last.unwrap_or(start - 1).max(start - 1)
        };
        for r in start.max(1)..=hi {
            let have = got.get(&r).map_or(&[][..], Vec::as_slice);
            let all = self.ref_events.get(&r).map_or(&[][..], Vec::as_slice);
            let full = rec.expected(all, false);
            if have == full.as_slice() {
                continue;
            }
            let compacted = self.compacts.contains(&r).then(|| rec.expected(all, true));
            if compacted.as_deref() == Some(have) {
                continue;
            }
            return Err(format!(
                "revision {r} (effective start {start}, checked through {hi}, final {final_rev}, \
                 compacted to {:?}): received {}, expected {}{}\n  all received: {}",
                self.compacts,
                show(have),
                show(&full),
                compacted.map_or(String::new(), |c| format!(
                    " or (read at the compact \
                     revision) {}",
                    show(&c)
                )),
                show(&rec.events)
            ));
        }
        if let Some((c, header)) = rec.cancel {
            if !self.compacts.contains(&c) {
                return Err(format!(
                    "cancelled with compact_revision {c}, not a revision compacted to ({:?})",
                    self.compacts
                ));
            }
            if hi + 1 >= c {
                return Err(format!(
                    "cancelled as compacted at {c}, but it needed nothing below {c}: effective \
                     start {start}, received through {hi}"
                ));
            }
            if header < c {
                return Err(format!("cancel header revision {header} below {c}"));
            }
        }
        if rec.client_cancelled && rec.cancel.is_none() && !rec.closed && !rec.cancel_acked {
            return Err("cancelled by the client, no cancelled response".into());
        }
        Ok(())
    }
}

fn drain_control(
    slot: &mut Slot,
    recs: &mut [Rec],
    by_id: &mut HashMap<(u64, i64), usize>,
) -> Result<(), String> {
    while let Ok(resp) = slot.control.try_recv() {
        let rev = resp.header.as_ref().map_or(-1, |h| h.revision);
        if resp.created {
            let idx = slot.pending.pop_front().ok_or_else(|| {
                format!(
                    "stream {}: created response with no create pending: {resp:?}",
                    slot.stream
                )
            })?;
            let rec = &mut recs[idx];
            if resp.canceled {
                return Err(format!(
                    "{}: refused: {:?}",
                    rec.describe(idx),
                    resp.cancel_reason
                ));
            }
            if rec.asked_id != 0 && resp.watch_id != rec.asked_id {
                return Err(format!(
                    "{}: created as id {}",
                    rec.describe(idx),
                    resp.watch_id
                ));
            }
            if !resp.events.is_empty() || resp.watch_id < 0 {
                return Err(format!("bad created response {resp:?}"));
            }
            if let Some(other) = by_id.insert((slot.stream, resp.watch_id), idx) {
                return Err(format!(
                    "stream {}: watch id {} given to #{other} and #{idx}",
                    slot.stream, resp.watch_id
                ));
            }
            rec.id = Some(resp.watch_id);
            rec.created_rev = Some(rev);
        } else if resp.canceled {
            let idx = by_id.get(&(slot.stream, resp.watch_id)).copied();
            let ok = idx.is_some_and(|i| recs[i].client_cancelled && !recs[i].cancel_acked);
            if !ok || resp.compact_revision != 0 || !resp.events.is_empty() {
                return Err(format!(
                    "stream {}: unexpected cancelled response {resp:?}",
                    slot.stream
                ));
            }
            recs[idx.expect("checked")].cancel_acked = true;
        } else {
            return Err(format!(
                "stream {}: unexpected control response {resp:?}",
                slot.stream
            ));
        }
    }
    Ok(())
}

fn drain(
    slot: &mut Slot,
    recs: &mut [Rec],
    by_id: &mut HashMap<(u64, i64), usize>,
    events: bool,
) -> Result<(), String> {
    drain_control(slot, recs, by_id)?;
    if !events {
        return Ok(());
    }
    loop {
        let resp = match slot.events.try_recv() {
            Ok(resp) => resp,
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => {
                slot.disconnected = true;
                return Ok(());
            }
        };
        let rev = resp.header.as_ref().map_or(-1, |h| h.revision);
        if resp.watch_id == INVALID_WATCH_ID {
            if resp.created || resp.canceled || !resp.events.is_empty() {
                return Err(format!("stream {}: bad progress {resp:?}", slot.stream));
            }
            slot.progress = Some(slot.progress.unwrap_or(rev).max(rev));
            continue;
        }
        let mut idx = by_id.get(&(slot.stream, resp.watch_id)).copied();
        if idx.is_none() {
            // Its created response went out first: read it now.
            drain_control(slot, recs, by_id)?;
            idx = by_id.get(&(slot.stream, resp.watch_id)).copied();
        }
        let idx = idx.ok_or_else(|| {
            format!(
                "stream {}: events for watch id {} never created: {resp:?}",
                slot.stream, resp.watch_id
            )
        })?;
        let rec = &mut recs[idx];
        if resp.created || resp.fragment {
            return Err(format!(
                "{}: unexpected response {resp:?}",
                rec.describe(idx)
            ));
        }
        if let Some(c) = rec.cancel {
            return Err(format!(
                "{}: response after its compaction cancel {c:?}: {resp:?}",
                rec.describe(idx)
            ));
        }
        if resp.canceled {
            if resp.compact_revision <= 0 || !resp.events.is_empty() {
                return Err(format!(
                    "{}: bad cancel on the event queue {resp:?}",
                    rec.describe(idx)
                ));
            }
            rec.cancel = Some((resp.compact_revision, rev));
            continue;
        }
        if resp.events.is_empty() {
            return Err(format!(
                "{}: empty event response (no progress_notify asked) {resp:?}",
                rec.describe(idx)
            ));
        }
        let top = resp.events.iter().map(rev_of).max().unwrap_or(0);
        if rev < top {
            return Err(format!(
                "{}: header revision {rev} below its event's {top}",
                rec.describe(idx)
            ));
        }
        rec.events.extend(resp.events);
    }
}

fn run_case(ops: &[Op]) -> Result<(), String> {
    let mut h = Harness::new(None);
    for (i, op) in ops.iter().enumerate() {
        h.step(op).map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    h.finish()
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", 64),
        max_shrink_iters: env_or("PROPTEST_MAX_SHRINK_ITERS", 64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn watchers_get_exactly_the_history(ops in vec(op_strategy(), 1..90)) {
        run_case(&ops).map_err(TestCaseError::fail)?;
    }
}

fn all_keys(start: StartSpec, prev_kv: bool) -> Spec {
    Spec {
        range: RangeSpec::All,
        start,
        no_put: false,
        no_delete: false,
        prev_kv,
        explicit_id: false,
    }
}

/// Waits for the created response of watcher `idx`; its header revision.
fn wait_created(h: &mut Harness, idx: usize) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        h.poll(false).unwrap();
        if let Some(rev) = h.recs[idx].created_rev {
            return rev;
        }
        assert!(Instant::now() < deadline, "no created response");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A synced watcher's batches are dropped from the full feed for a gap
/// (the dispatcher is held inside a view request meanwhile); it gets them
/// from history, exactly once, with a catch-up of many chunks.
#[test]
fn a_feed_overflow_gap_is_filled_from_history() {
    let gate = Arc::new(Mutex::new(()));
    let entered = Arc::new(AtomicBool::new(false));
    let mut h = Harness::new(Some((gate.clone(), entered.clone())));
    for k in 0..KEYS.len() {
        h.apply(&[W::Put(k)], false).unwrap();
    }
    let synced = h.create(0, &all_keys(StartSpec::Now, true)).unwrap();
    let created = wait_created(&mut h, synced);
    let prefix = h
        .create(
            1,
            &Spec {
                range: RangeSpec::Prefix(1),
                ..all_keys(StartSpec::Now, false)
            },
        )
        .unwrap();
    wait_created(&mut h, prefix);
    h.apply(&[W::Put(1), W::Del(2), W::Put(3)], false).unwrap();

    // A watcher from the past makes the dispatcher ask for a view: it
    // stays inside the view source until the gate opens.
    let held = lock(&gate);
    let past = h.create(1, &all_keys(StartSpec::At(3), true)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !entered.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the dispatcher never asked for a view"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Batches that change something (one that changes nothing is not
    // queued), past the feed's bound.
    let mut queued = 0;
    let mut i = 0;
    while queued < FEED_BATCHES_MAX + 10 {
        let w = match i % 7 {
            5 => W::Del(i % KEYS.len()),
            6 => W::DelRange(1, 3),
            _ => W::Put(i % KEYS.len()),
        };
        let before = h.revision();
        h.apply(&[w], false).unwrap();
        queued += usize::from(h.revision() > before);
        i += 1;
    }
    drop(held);
    h.finish().unwrap();
    assert!(
        h.gauge("watch_feed_gaps_total") >= 1,
        "no gap: {}",
        h.gauges()
    );
    assert!(created < h.revision());
    assert!(h.recs[synced].cancel.is_none() && h.recs[past].cancel.is_none());
    // The checks above were the rules; the counts for the record.
    let n = |i: usize| h.recs[i].events.len();
    let total: usize = h
        .ref_events
        .range(created + 1..)
        .map(|(_, e)| e.len())
        .sum();
    assert_eq!(n(synced), total);
}

/// A watcher created (start 0) while a large batch is being applied
/// without collecting events (no watcher when it started) hears of that
/// batch as a gap and gets its events from history. The create has to
/// land inside the apply, which is likely, not certain: a few tries, every
/// one checked, at least one on the gap path.
#[test]
fn a_watcher_created_during_an_uncollected_batch_gets_it_from_history() {
    const PUTS: usize = 40_000;
    let mut gap_seen = false;
    for attempt in 0..5 {
        let mut h = Harness::new(None);
        h.apply(&[W::Put(0), W::Put(1), W::Del(0)], false).unwrap();
        let before = h.revision();
        let ws: Vec<W> = (0..PUTS)
            .map(|i| match i % 5 {
                4 => W::Del(i % KEYS.len()),
                _ => W::Put(i % KEYS.len()),
            })
            .collect();
        let (entries, cmds) = h.entries(&ws);
        let machine = h.machine.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let applier = std::thread::spawn(move || {
            let mut m = lock(&machine);
            tx.send(()).unwrap();
            let mut responses = Vec::new();
            m.apply(&entries, &mut responses).unwrap();
            responses
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let w = h.create(0, &all_keys(StartSpec::Now, true)).unwrap();
        let created = wait_created(&mut h, w);
        let responses = applier.join().unwrap();
        h.follow(&cmds, &responses).unwrap();
        h.finish().unwrap();
        let gaps = h.gauge("watch_feed_gaps_total");
        eprintln!(
            "attempt {attempt}: created at {created} (revision before the batch {before}, \
             after {}), {} events received, {gaps} gaps",
            h.revision(),
            h.recs[w].events.len()
        );
        if created < h.revision() {
            assert!(gaps >= 1, "events received without a gap: {}", h.gauges());
            gap_seen = true;
            break;
        }
    }
    assert!(gap_seen, "the create never landed inside the apply");
}

/// A member that installs a snapshot (from a leader, its log behind)
/// jumps over revisions it never applied: its watchers hear of them as a
/// gap and catch up from the new history; those whose next revision the
/// snapshot's compaction removed are cancelled (`compacted`: the leader
/// compacted past them).
#[test]
fn watchers_catch_up_across_a_snapshot_install() {
    for compacted in [false, true] {
        let mut h = Harness::new(None);
        let writes = |n: usize| -> Vec<W> {
            (0..n)
                .map(|i| match i % 6 {
                    4 => W::Del((i / 6) % KEYS.len()),
                    5 => W::DelRange(4, 1),
                    _ => W::Put((i * 5) % KEYS.len()),
                })
                .collect()
        };
        h.apply(&writes(12), false).unwrap();
        let specs = [
            (0, all_keys(StartSpec::Now, true)),
            (
                1,
                Spec {
                    range: RangeSpec::Prefix(1),
                    ..all_keys(StartSpec::Now, false)
                },
            ),
            (
                2,
                Spec {
                    range: RangeSpec::Key(3),
                    ..all_keys(StartSpec::At(2), true)
                },
            ),
            (
                3,
                Spec {
                    range: RangeSpec::Range(1, 4),
                    no_delete: true,
                    ..all_keys(StartSpec::At(5), true)
                },
            ),
        ];
        let ws: Vec<usize> = specs
            .iter()
            .map(|(slot, spec)| h.create(*slot, spec).unwrap())
            .collect();
        for &w in &ws {
            wait_created(&mut h, w);
        }
        h.apply(&writes(7), false).unwrap();
        let behind = h.revision();

        // The leader: the same log, then more (and maybe a compaction past
        // every watcher here).
        let mut leader = KvMachine::new();
        leader.apply(&h.log, &mut Vec::new()).unwrap();
        let (mut entries, mut cmds) = h.entries(&writes(40));
        let mut responses = Vec::new();
        leader.apply(&entries, &mut responses).unwrap();
        if compacted {
            let to = leader.store().revision() - 3;
            let (e, c) = h.entries(&[&[W::CompactTo(to)], &writes(5)[..]].concat());
            leader.apply(&e, &mut responses).unwrap();
            entries.extend(e);
            cmds.extend(c);
        }
        let mut bytes = Vec::new();
        leader.snapshot().write_to(&mut bytes).unwrap();
        let restored = KvMachine::restore(&mut &bytes[..]).unwrap();
        lock(&h.machine).install(restored);
        h.follow(&cmds, &responses).unwrap();
        h.apply(&writes(9), false).unwrap();
        h.finish().unwrap();

        assert!(h.gauge("watch_feed_gaps_total") >= 1, "{}", h.gauges());
        let c = h.reference.compact_revision();
        assert_eq!(compacted, c > behind + 1, "compact revision {c}");
        // The synced watchers needed revision `behind + 1` next.
        for &w in &ws[..2] {
            let got = h.recs[w].cancel.map(|(rev, _)| rev);
            assert_eq!(got, compacted.then_some(c), "{}", h.recs[w].describe(w));
        }
    }
}

/// A progress request answered while the stream's queue is full stays
/// pending, and should go out once the client made room. It does not: with
/// every watcher synced nothing wakes the dispatcher again (`next_due`
/// counts only unsynced watchers and the progress tick), so the answer
/// waits for the next write or the progress interval (10 minutes by
/// default).
#[test]
fn a_progress_request_that_found_the_queue_full_is_answered() {
    let mut h = Harness::new(None);
    // Slot 3: a queue of one response.
    let w = h.create(3, &all_keys(StartSpec::Now, false)).unwrap();
    wait_created(&mut h, w);
    h.apply(&[W::Put(0)], false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.gauge("watch_events_sent_total") < 1 {
        assert!(Instant::now() < deadline, "the event never went out");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The queue is full (one event response): the answer must wait.
    let stream = h.slots[3].stream;
    h.hub.command(Command::Progress { stream }).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.slots[3].progress, None);
    // Room now; the answer should come.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        h.poll(true).unwrap();
        if h.slots[3].progress.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress answer 2 s after the queue had room (received {} events); gauges: {}",
            h.recs[w].events.len(),
            h.gauges()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.slots[3].progress, Some(h.revision()));
}

/// A watcher created (start 0) before the machine applied anything hears
/// the store's revision in its created header, as etcd (1 for a new
/// store). It hears 0: the hub's revision starts at 0 and is first set by
/// `Hub::applied`; a member restored from a snapshot at revision R says 0
/// too (also in progress answers) until it applies an entry.
#[test]
fn a_watcher_created_before_any_apply_hears_the_store_revision() {
    let mut h = Harness::new(None);
    let w = h.create(0, &all_keys(StartSpec::Now, false)).unwrap();
    assert_eq!(wait_created(&mut h, w), h.revision());
}
