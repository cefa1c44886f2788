//! Watch: each member tells its watchers about the changes it applied, in
//! revision order, each exactly once, without ever slowing the loop.
//!
//! # Parts and threads
//!
//! * **The feed** ([`Hub::applied`]) runs on the loop thread, inside
//!   `KvMachine::apply`: while any watcher exists the store collects the
//!   events of each applied batch ([`crate::store::KvStore::collect_events`])
//!   and the batch is queued here, under one short lock, with one wakeup of
//!   the dispatcher. Bounded ([`FEED_EVENTS_MAX`], [`FEED_BATCHES_MAX`]):
//!   past the bound the queued events are dropped and replaced by a *gap*
//!   (the revisions, no events), which the dispatcher fills from history.
//!   Without watchers the feed costs one atomic load per batch.
//! * **The dispatcher** (one thread per member, `skiff-N-watch`) matches
//!   events against watchers and hands each watcher's share to its gRPC
//!   stream's bounded queue ([`STREAM_RESPONSES_MAX`]) with a `try_send`:
//!   it never blocks on a client.
//! * **Streams** ([`crate::api`]): one task reads a client's requests and
//!   passes them on as [`Command`]s; gRPC's writer reads the stream's
//!   response queues itself (control first, then events).
//!
//! # Synced and unsynced watchers (etcd's terms)
//!
//! A *synced* watcher gets events as batches arrive. One that starts at a
//! past revision, whose stream queue was full (a slow client), or that a
//! gap concerned is *unsynced*: it catches up from a frozen view of the
//! store (`KvQuery::View`, an O(1) freeze served by the loop) in chunks of
//! [`CATCH_UP_EVENTS_MAX`] events, at most every [`RETRY_INTERVAL`] while
//! its queue has no room, and becomes synced once it has everything
//! through the newest revision the dispatcher has seen. A watcher whose
//! next revision was compacted away is cancelled with `compact_revision`
//! set, as etcd does. Live and catch-up events are the same: the events of
//! one revision come in the order the request wrote them (a Txn's
//! operations in order, etcd's sub-revisions) on both paths.
//!
//! # Costs
//!
//! Matching an event: one hash lookup for the single-key watchers plus one
//! check per distinct watched range (watchers of the same range share the
//! check). Catching up: a scan of the watched keys' history per chunk.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;

use crate::pb::etcdserverpb::watch_create_request::FilterType;
use crate::pb::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchResponse};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::Event;
use crate::store::{key_in_range, KvError, StoreView};

/// Responses queued for one gRPC stream (event responses; each holds one
/// watcher's events of one batch). A full queue makes the watchers that
/// could not be served unsynced.
pub const STREAM_RESPONSES_MAX: usize = 256;
/// Control responses (created, cancelled) queued for one stream: a client
/// that sends requests without reading waits for room.
pub const CONTROL_RESPONSES_MAX: usize = 64;
/// Events queued from the loop for the dispatcher; past it they are
/// dropped for a gap that watchers fill from history.
pub const FEED_EVENTS_MAX: usize = 262_144;
/// Applied batches queued from the loop for the dispatcher; see
/// [`FEED_EVENTS_MAX`].
pub const FEED_BATCHES_MAX: usize = 16_384;
/// Requests (create, cancel, progress, stream open/close) queued for the
/// dispatcher; past it a request is refused.
pub const COMMANDS_MAX: usize = 65_536;
/// Watchers on one member, all streams together; past it a create is
/// refused.
pub const WATCHERS_MAX: usize = 1_000_000;
/// Events per catch-up response of an unsynced watcher (a revision is
/// never split, so a response may hold more).
pub const CATCH_UP_EVENTS_MAX: usize = 1024;
/// A response to a watcher that asked for `fragment` is split above this
/// (etcd's default request size limit).
pub const RESPONSE_BYTES_MAX: usize = 1536 * 1024;
/// How often unsynced watchers retry while their stream queue is full.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// How often a watcher that asked for `progress_notify` hears the current
/// revision while nothing happens to its keys (etcd's default).
pub const PROGRESS_INTERVAL_DEFAULT: Duration = Duration::from_secs(600);

/// The `watch_id` of a progress response for a whole stream, and of a
/// create that failed (etcd's `InvalidWatchID`).
pub const INVALID_WATCH_ID: i64 = -1;

/// Where the dispatcher gets a frozen view of the store (a serializable
/// query through the loop); `None` when the member does not answer.
pub type ViewSource = Box<dyn FnMut() -> Option<StoreView> + Send>;

/// A request from a stream to the dispatcher.
#[derive(Debug)]
pub enum Command {
    /// A stream opened: its event responses go to `events`.
    Open {
        stream: u64,
        events: mpsc::Sender<WatchResponse>,
    },
    /// Create a watcher; the created (or refused) response goes to `reply`.
    Create {
        stream: u64,
        req: WatchCreateRequest,
        reply: mpsc::OwnedPermit<WatchResponse>,
    },
    /// Cancel a watcher; the cancelled response goes to `reply` (an id
    /// not known is ignored, as etcd does).
    Cancel {
        stream: u64,
        watch_id: i64,
        reply: mpsc::OwnedPermit<WatchResponse>,
    },
    /// Answer, once every watcher of the stream is synced, with an empty
    /// response at the current revision (watch_id -1).
    Progress { stream: u64 },
    /// The stream ended: drop its watchers.
    Close { stream: u64 },
}

/// Why [`Hub::command`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("watch: {COMMANDS_MAX} requests queued (COMMANDS_MAX); try again")]
    Busy,
    #[error("watch: the member is stopping")]
    Stopped,
}

/// One applied batch: the revisions `from..=to` and, when collected, all
/// their events (None: a gap, to be filled from history).
#[derive(Debug)]
struct Batch {
    from: i64,
    to: i64,
    events: Option<Vec<Event>>,
}

#[derive(Debug, Default)]
struct Feed {
    batches: VecDeque<Batch>,
    events: usize,
    commands: VecDeque<Command>,
    /// The store revision after the last applied batch.
    revision: i64,
    stopped: bool,
}

#[derive(Debug, Default)]
struct Counters {
    watchers: AtomicU64,
    unsynced: AtomicU64,
    streams: AtomicU64,
    events_sent: AtomicU64,
    gaps: AtomicU64,
    compacted: AtomicU64,
}

#[derive(Debug, Default)]
struct Shared {
    /// Whether the store collects events: set when a create is queued,
    /// cleared by the dispatcher when no watcher is left (under the feed
    /// lock, with no create queued).
    collect: AtomicBool,
    feed: Mutex<Feed>,
    wake: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Feed> {
        self.feed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A member's watch hub: the feed the machine writes and the commands the
/// API sends, for one dispatcher thread. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    shared: Arc<Shared>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// A hub for a store at `revision` (what watchers created before the
    /// first apply start after).
    pub fn at_revision(revision: i64) -> Hub {
        let hub = Hub::default();
        hub.shared.lock().revision = revision;
        hub
    }

    /// Whether the machine should collect events for the batch it starts.
    pub(crate) fn collecting(&self) -> bool {
        self.shared.collect.load(Ordering::SeqCst)
    }

    /// The machine applied revisions `from..=to` (`to == from - 1`: none
    /// changed), with their events when it collected them. Loop thread;
    /// O(1) besides moving the vector.
    pub(crate) fn applied(&self, from: i64, to: i64, events: Option<Vec<Event>>) {
        let mut feed = self.shared.lock();
        feed.revision = to;
        if to < from {
            return;
        }
        // Checked under the lock: a create queued before this point has
        // set the flag, so its watcher hears of these revisions.
        if events.is_none() && !self.shared.collect.load(Ordering::SeqCst) {
            return;
        }
        let n = events.as_ref().map_or(0, Vec::len);
        if feed.events + n > FEED_EVENTS_MAX || feed.batches.len() >= FEED_BATCHES_MAX {
            // The dispatcher is behind: keep the revisions, drop events.
            let first = feed.batches.front().map_or(from, |b| b.from);
            feed.batches.clear();
            feed.events = 0;
            feed.batches.push_back(Batch {
                from: first,
                to,
                events: None,
            });
        } else {
            feed.events += n;
            feed.batches.push_back(Batch { from, to, events });
        }
        drop(feed);
        self.shared.wake.notify_one();
    }

    /// The machine's state was replaced by a snapshot at revision `to`
    /// (from `from - 1`): watchers catch up from the new history.
    pub(crate) fn jumped(&self, from: i64, to: i64) {
        {
            let mut feed = self.shared.lock();
            feed.revision = to;
            if self.shared.collect.load(Ordering::SeqCst) {
                feed.batches.push_back(Batch {
                    from: from.min(to),
                    to,
                    events: None,
                });
            }
        }
        self.shared.wake.notify_one();
    }

    /// The store revision after the last applied batch.
    pub fn revision(&self) -> i64 {
        self.shared.lock().revision
    }

    /// Queues a request for the dispatcher.
    pub fn command(&self, cmd: Command) -> Result<(), CommandError> {
        let mut feed = self.shared.lock();
        if feed.stopped {
            return Err(CommandError::Stopped);
        }
        if feed.commands.len() >= COMMANDS_MAX && !matches!(cmd, Command::Close { .. }) {
            return Err(CommandError::Busy);
        }
        if matches!(cmd, Command::Create { .. }) {
            self.shared.collect.store(true, Ordering::SeqCst);
        }
        feed.commands.push_back(cmd);
        drop(feed);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Starts the dispatcher thread (named `name`); it runs until
    /// [`Hub::stop`].
    pub fn start(
        &self,
        name: String,
        views: ViewSource,
        progress_interval: Duration,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let d = Dispatcher {
            shared: self.shared.clone(),
            views,
            view: None,
            progress_interval,
            next_progress: Instant::now() + progress_interval,
            streams: HashMap::new(),
            watchers: HashMap::new(),
            exact: HashMap::new(),
            ranges: HashMap::new(),
            unsynced: BTreeSet::new(),
            known_rev: 0,
            catch_up_now: false,
            next_retry: Instant::now(),
            progress_pending: false,
        };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || d.run())
    }

    /// Stops the dispatcher; its streams end.
    pub fn stop(&self) {
        self.shared.lock().stopped = true;
        self.shared.wake.notify_one();
    }

    /// Gauges and counters for the metrics endpoint.
    pub fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "watch_watchers",
                "Watchers on this member.",
                get(&c.watchers),
            ),
            (
                "watch_slow_watchers",
                "Watchers catching up from history (unsynced): slow clients, past start revisions.",
                get(&c.unsynced),
            ),
            ("watch_streams", "Watch streams open.", get(&c.streams)),
            (
                "watch_events_sent_total",
                "Events handed to watch streams.",
                get(&c.events_sent),
            ),
            (
                "watch_feed_gaps_total",
                "Applied batches whose events were not collected or dropped, filled from history.",
                get(&c.gaps),
            ),
            (
                "watch_compacted_total",
                "Watchers cancelled because their next revision was compacted.",
                get(&c.compacted),
            ),
        ]
    }
}

type WatcherKey = (u64, i64);

#[derive(Debug)]
struct Watcher {
    key: Bytes,
    range_end: Bytes,
    /// The next revision this watcher needs (everything below was sent or
    /// does not concern it).
    next_rev: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    fragment: bool,
    synced: bool,
    /// An event response went out since the last progress tick.
    sent_since_progress: bool,
}

impl Watcher {
    fn wants(&self, ev: &Event) -> bool {
        let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if rev < self.next_rev {
            return false;
        }
        if ev.r#type == EventType::Delete as i32 {
            !self.no_delete
        } else {
            !self.no_put
        }
    }

    fn shaped(&self, ev: &Event) -> Event {
        let mut ev = ev.clone();
        if !self.prev_kv {
            ev.prev_kv = None;
        }
        ev
    }

    fn single(&self) -> bool {
        self.range_end.is_empty()
    }
}

#[derive(Debug)]
struct Stream {
    events: mpsc::Sender<WatchResponse>,
    watchers: BTreeSet<i64>,
    next_id: i64,
    progress_wanted: bool,
}

/// What happened to a response handed to a stream.
enum Sent {
    Ok,
    Full,
    Closed,
}

struct Dispatcher {
    shared: Arc<Shared>,
    views: ViewSource,
    view: Option<StoreView>,
    progress_interval: Duration,
    next_progress: Instant,
    streams: HashMap<u64, Stream>,
    watchers: HashMap<WatcherKey, Watcher>,
    /// Synced single-key watchers by key.
    exact: HashMap<Bytes, Vec<WatcherKey>>,
    /// Synced range watchers by (key, range_end).
    ranges: HashMap<(Bytes, Bytes), Vec<WatcherKey>>,
    unsynced: BTreeSet<WatcherKey>,
    /// Every synced watcher has every event it wants through this.
    known_rev: i64,
    /// Unsynced watchers arrived: catch up without waiting for the retry.
    catch_up_now: bool,
    next_retry: Instant,
    /// A progress answer waits for room in its stream's queue.
    progress_pending: bool,
}

impl Drop for Dispatcher {
    /// However the dispatcher ends (stopped, or a bug panicked it), the
    /// hub refuses further requests, so streams fail instead of hanging.
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.collect.store(false, Ordering::SeqCst);
    }
}

impl Dispatcher {
    fn run(mut self) {
        loop {
            let (batches, commands, revision) = {
                let mut feed = self.shared.lock();
                loop {
                    if feed.stopped {
                        drop(feed);
                        self.stop_all();
                        return;
                    }
                    if !feed.batches.is_empty() || !feed.commands.is_empty() {
                        break;
                    }
                    let now = Instant::now();
                    let due = self.next_due();
                    if due <= now {
                        break;
                    }
                    feed = self
                        .shared
                        .wake
                        .wait_timeout(feed, due - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                feed.events = 0;
                (
                    std::mem::take(&mut feed.batches),
                    std::mem::take(&mut feed.commands),
                    feed.revision,
                )
            };
            for batch in batches {
                self.dispatch(batch);
            }
            // Every batch through `revision` is dispatched.
            self.known_rev = self.known_rev.max(revision);
            for cmd in commands {
                self.handle(cmd);
            }
            let now = Instant::now();
            if !self.unsynced.is_empty() && (self.catch_up_now || now >= self.next_retry) {
                self.catch_up();
                self.catch_up_now = false;
                self.next_retry = Instant::now() + RETRY_INTERVAL;
            }
            if self.unsynced.is_empty() {
                // Release the history the view pins.
                self.view = None;
            }
            if now >= self.next_progress {
                self.progress_tick();
                self.next_progress = now + self.progress_interval;
            }
            self.answer_progress_requests();
            if self.progress_pending && Instant::now() >= self.next_retry {
                self.next_retry = Instant::now() + RETRY_INTERVAL;
            }
            self.maybe_stop_collecting();
            self.publish_gauges();
        }
    }

    fn next_due(&self) -> Instant {
        let mut due = self.next_progress;
        if self.progress_pending {
            // A progress answer found its stream full: try again.
            due = due.min(self.next_retry);
        }
        if !self.unsynced.is_empty() {
            due = due.min(if self.catch_up_now {
                Instant::now()
            } else {
                self.next_retry
            });
        }
        due
    }

    fn header(revision: i64) -> Option<ResponseHeader> {
        // The stream fills cluster, member and term.
        Some(ResponseHeader {
            revision,
            ..ResponseHeader::default()
        })
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Open { stream, events } => {
                self.streams.insert(
                    stream,
                    Stream {
                        events,
                        watchers: BTreeSet::new(),
                        next_id: 0,
                        progress_wanted: false,
                    },
                );
            }
            Command::Create { stream, req, reply } => self.create(stream, req, reply),
            Command::Cancel {
                stream,
                watch_id,
                reply,
            } => {
                if self.remove((stream, watch_id)) {
                    reply.send(WatchResponse {
                        header: Self::header(self.known_rev),
                        watch_id,
                        canceled: true,
                        ..WatchResponse::default()
                    });
                }
            }
            Command::Progress { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.progress_wanted = true;
                }
            }
            Command::Close { stream } => self.close_stream(stream),
        }
    }

    fn create(
        &mut self,
        stream: u64,
        req: WatchCreateRequest,
        reply: mpsc::OwnedPermit<WatchResponse>,
    ) {
        let refuse = |reply: mpsc::OwnedPermit<WatchResponse>, reason: String, rev: i64| {
            reply.send(WatchResponse {
                header: Self::header(rev),
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..WatchResponse::default()
            });
        };
        let rev = self.known_rev;
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if req.start_revision < 0 {
            return refuse(reply, KvError::Compacted.to_string(), rev);
        }
        // As etcd: an empty key is the smallest key.
        let key = if req.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            req.key.clone()
        };
        let range_end = req.range_end.clone();
        if !range_end.is_empty() && range_end.as_ref() != [0] && range_end <= key {
            return refuse(reply, "mvcc: watcher range is empty".into(), rev);
        }
        if self.watchers.len() >= WATCHERS_MAX {
            return refuse(
                reply,
                format!("watch: {WATCHERS_MAX} watchers on this member (WATCHERS_MAX)"),
                rev,
            );
        }
        let id = if req.watch_id == 0 || req.watch_id == INVALID_WATCH_ID {
            while s.watchers.contains(&s.next_id) {
                s.next_id += 1;
            }
            s.next_id += 1;
            s.next_id - 1
        } else if req.watch_id < 0 {
            return refuse(
                reply,
                "watch: a watch_id is 0 (assigned) or positive".into(),
                rev,
            );
        } else if s.watchers.contains(&req.watch_id) {
            return refuse(
                reply,
                "mvcc: duplicate watch ID provided on the WatchStream".into(),
                rev,
            );
        } else {
            req.watch_id
        };
        let filters: Vec<FilterType> = req
            .filters
            .iter()
            .filter_map(|f| FilterType::try_from(*f).ok())
            .collect();
        let start = if req.start_revision == 0 {
            rev + 1
        } else {
            req.start_revision
        };
        let w = Watcher {
            key,
            range_end,
            next_rev: start,
            no_put: filters.contains(&FilterType::Noput),
            no_delete: filters.contains(&FilterType::Nodelete),
            prev_kv: req.prev_kv,
            progress_notify: req.progress_notify,
            fragment: req.fragment,
            synced: false,
            sent_since_progress: false,
        };
        s.watchers.insert(id);
        // Created goes out before any event of this watcher: events go to
        // the stream's other queue, which gRPC's writer reads second.
        reply.send(WatchResponse {
            header: Self::header(rev),
            watch_id: id,
            created: true,
            ..WatchResponse::default()
        });
        let wk = (stream, id);
        let synced = start > rev;
        self.watchers.insert(wk, w);
        if synced {
            self.make_synced(wk);
        } else {
            self.unsynced.insert(wk);
            self.catch_up_now = true;
        }
    }

    fn make_synced(&mut self, wk: WatcherKey) {
        let Some(w) = self.watchers.get_mut(&wk) else {
            return;
        };
        self.unsynced.remove(&wk);
        if w.synced {
            return;
        }
        w.synced = true;
        if w.single() {
            self.exact.entry(w.key.clone()).or_default().push(wk);
        } else {
            self.ranges
                .entry((w.key.clone(), w.range_end.clone()))
                .or_default()
                .push(wk);
        }
    }

    fn make_unsynced(&mut self, wk: WatcherKey, next_rev: i64) {
        let Some(w) = self.watchers.get_mut(&wk) else {
            return;
        };
        w.next_rev = w.next_rev.max(next_rev);
        if w.synced {
            w.synced = false;
            let (key, range_end, single) = (w.key.clone(), w.range_end.clone(), w.single());
            self.unindex(wk, key, range_end, single);
        }
        self.unsynced.insert(wk);
    }

    fn unindex(&mut self, wk: WatcherKey, key: Bytes, range_end: Bytes, single: bool) {
        if single {
            if let Some(v) = self.exact.get_mut(&key) {
                v.retain(|x| *x != wk);
                if v.is_empty() {
                    self.exact.remove(&key);
                }
            }
        } else {
            let rk = (key, range_end);
            if let Some(v) = self.ranges.get_mut(&rk) {
                v.retain(|x| *x != wk);
                if v.is_empty() {
                    self.ranges.remove(&rk);
                }
            }
        }
    }

    /// Removes a watcher; false when it did not exist.
    fn remove(&mut self, wk: WatcherKey) -> bool {
        let Some(w) = self.watchers.remove(&wk) else {
            return false;
        };
        if w.synced {
            let single = w.single();
            self.unindex(wk, w.key, w.range_end, single);
        }
        self.unsynced.remove(&wk);
        if let Some(s) = self.streams.get_mut(&wk.0) {
            s.watchers.remove(&wk.1);
        }
        true
    }

    fn close_stream(&mut self, stream: u64) {
        let Some(s) = self.streams.get(&stream) else {
            return;
        };
        let ids: Vec<i64> = s.watchers.iter().copied().collect();
        for id in ids {
            self.remove((stream, id));
        }
        self.streams.remove(&stream);
    }

    fn stop_all(&mut self) {
        let streams: Vec<u64> = self.streams.keys().copied().collect();
        for s in streams {
            self.close_stream(s);
        }
        self.publish_gauges();
    }

    /// Hands `resp` (events of one watcher) to its stream, fragmented when
    /// the watcher asked for it and it is large.
    fn send(&mut self, wk: WatcherKey, resp: WatchResponse) -> Sent {
        let Some(s) = self.streams.get(&wk.0) else {
            return Sent::Closed;
        };
        let fragment = self.watchers.get(&wk).is_some_and(|w| w.fragment);
        let parts = if fragment && resp.events.len() > 1 && resp.encoded_len() > RESPONSE_BYTES_MAX
        {
            fragments(resp)
        } else {
            vec![resp]
        };
        // The dispatcher is the only sender: room seen is room kept.
        if s.events.capacity() < parts.len() {
            return if s.events.is_closed() {
                Sent::Closed
            } else {
                Sent::Full
            };
        }
        let n: usize = parts.iter().map(|p| p.events.len()).sum();
        for p in parts {
            if s.events.try_send(p).is_err() {
                return Sent::Closed;
            }
        }
        self.shared
            .counters
            .events_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        Sent::Ok
    }

    /// Delivers one batch to the synced watchers.
    fn dispatch(&mut self, batch: Batch) {
        let Some(events) = batch.events else {
            // A gap: every synced watcher that needs these revisions
            // catches up from history.
            self.shared.counters.gaps.fetch_add(1, Ordering::Relaxed);
            let hit: Vec<WatcherKey> = self
                .watchers
                .iter()
                .filter(|(_, w)| w.synced && w.next_rev <= batch.to)
                .map(|(k, _)| *k)
                .collect();
            for wk in hit {
                // While watchers exist batches are contiguous: a synced
                // watcher has everything before this one.
                self.make_unsynced(wk, batch.from);
            }
            self.catch_up_now = true;
            return;
        };
        let mut per: HashMap<WatcherKey, Vec<Event>> = HashMap::new();
        for ev in &events {
            let Some(kv) = &ev.kv else { continue };
            if let Some(ws) = self.exact.get(&kv.key) {
                for wk in ws {
                    let w = &self.watchers[wk];
                    if w.wants(ev) {
                        per.entry(*wk).or_default().push(w.shaped(ev));
                    }
                }
            }
            for ((start, end), ws) in &self.ranges {
                if !key_in_range(start, end, &kv.key) {
                    continue;
                }
                for wk in ws {
                    let w = &self.watchers[wk];
                    if w.wants(ev) {
                        per.entry(*wk).or_default().push(w.shaped(ev));
                    }
                }
            }
        }
        for (wk, evs) in per {
            let first = evs[0].kv.as_ref().map_or(batch.from, |kv| kv.mod_revision);
            let resp = WatchResponse {
                header: Self::header(batch.to),
                watch_id: wk.1,
                events: evs,
                ..WatchResponse::default()
            };
            match self.send(wk, resp) {
                Sent::Ok => {
                    if let Some(w) = self.watchers.get_mut(&wk) {
                        w.next_rev = batch.to + 1;
                        w.sent_since_progress = true;
                    }
                }
                Sent::Full => self.make_unsynced(wk, first),
                Sent::Closed => self.close_stream(wk.0),
            }
        }
    }

    /// Brings unsynced watchers forward from a frozen view.
    fn catch_up(&mut self) {
        let fresh = self
            .view
            .as_ref()
            .is_some_and(|v| v.revision() >= self.known_rev);
        if !fresh {
            self.view = (self.views)();
        }
        let Some(view) = self.view.clone() else {
            return;
        };
        let waiting: Vec<WatcherKey> = self.unsynced.iter().copied().collect();
        for wk in waiting {
            while let Some(w) = self.watchers.get(&wk) {
                if w.next_rev < view.compact_revision() {
                    let resp = WatchResponse {
                        header: Self::header(view.revision()),
                        watch_id: wk.1,
                        canceled: true,
                        compact_revision: view.compact_revision(),
                        ..WatchResponse::default()
                    };
                    match self.send(wk, resp) {
                        Sent::Ok => {
                            self.shared
                                .counters
                                .compacted
                                .fetch_add(1, Ordering::Relaxed);
                            self.remove(wk);
                        }
                        Sent::Full => {}
                        Sent::Closed => self.close_stream(wk.0),
                    }
                    break;
                }
                if w.next_rev > view.revision() {
                    if view.revision() >= self.known_rev {
                        self.make_synced(wk);
                    }
                    break;
                }
                let (found, next) =
                    view.changes(&w.key, &w.range_end, w.next_rev, CATCH_UP_EVENTS_MAX);
                let evs: Vec<Event> = found
                    .iter()
                    .filter(|e| w.wants(e))
                    .map(|e| w.shaped(e))
                    .collect();
                if evs.is_empty() {
                    if let Some(w) = self.watchers.get_mut(&wk) {
                        w.next_rev = next;
                    }
                    continue;
                }
                let resp = WatchResponse {
                    header: Self::header(view.revision()),
                    watch_id: wk.1,
                    events: evs,
                    ..WatchResponse::default()
                };
                match self.send(wk, resp) {
                    Sent::Ok => {
                        if let Some(w) = self.watchers.get_mut(&wk) {
                            w.next_rev = next;
                            w.sent_since_progress = true;
                        }
                    }
                    Sent::Full => break,
                    Sent::Closed => {
                        self.close_stream(wk.0);
                        break;
                    }
                }
            }
        }
    }

    fn progress_tick(&mut self) {
        let known_rev = self.known_rev;
        let due: Vec<(WatcherKey, i64)> = self
            .watchers
            .iter_mut()
            .filter(|(_, w)| w.synced && w.progress_notify)
            .filter_map(|(k, w)| {
                let quiet = !w.sent_since_progress;
                w.sent_since_progress = false;
                quiet.then_some((*k, progress_rev(known_rev, w)))
            })
            .collect();
        for (wk, rev) in due {
            let resp = WatchResponse {
                header: Self::header(rev),
                watch_id: wk.1,
                ..WatchResponse::default()
            };
            if let Sent::Closed = self.send(wk, resp) {
                self.close_stream(wk.0);
            }
        }
    }

    fn answer_progress_requests(&mut self) {
        self.progress_pending = false;
        let wanted: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| s.progress_wanted)
            .map(|(id, _)| *id)
            .collect();
        for stream in wanted {
            let s = &self.streams[&stream];
            let mut rev = self.known_rev;
            let mut all_synced = true;
            for id in &s.watchers {
                let w = &self.watchers[&(stream, *id)];
                all_synced &= w.synced;
                rev = rev.max(progress_rev(self.known_rev, w));
            }
            if !all_synced {
                // Answered once they are; catching up wakes the loop.
                continue;
            }
            let resp = WatchResponse {
                header: Self::header(rev),
                watch_id: INVALID_WATCH_ID,
                ..WatchResponse::default()
            };
            match self.send((stream, INVALID_WATCH_ID), resp) {
                Sent::Ok => {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.progress_wanted = false;
                    }
                }
                Sent::Full => self.progress_pending = true,
                Sent::Closed => self.close_stream(stream),
            }
        }
    }

    fn maybe_stop_collecting(&mut self) {
        if !self.watchers.is_empty() || !self.shared.collect.load(Ordering::SeqCst) {
            return;
        }
        let feed = self.shared.lock();
        let create_queued = feed
            .commands
            .iter()
            .any(|c| matches!(c, Command::Create { .. }));
        if !create_queued {
            self.shared.collect.store(false, Ordering::SeqCst);
        }
    }

    fn publish_gauges(&self) {
        let c = &self.shared.counters;
        c.watchers
            .store(self.watchers.len() as u64, Ordering::Relaxed);
        c.unsynced
            .store(self.unsynced.len() as u64, Ordering::Relaxed);
        c.streams
            .store(self.streams.len() as u64, Ordering::Relaxed);
    }
}

/// The revision a synced watcher is known to have everything through.
fn progress_rev(known_rev: i64, w: &Watcher) -> i64 {
    known_rev.max(w.next_rev - 1)
}

/// Splits a response into parts of at most [`RESPONSE_BYTES_MAX`] (each
/// with at least one event), all but the last marked `fragment`, as etcd.
fn fragments(resp: WatchResponse) -> Vec<WatchResponse> {
    let mut parts = Vec::new();
    let mut cur = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..resp.clone()
    };
    let mut size = cur.encoded_len();
    for ev in resp.events {
        let len = ev.encoded_len() + 8;
        if !cur.events.is_empty() && size + len > RESPONSE_BYTES_MAX {
            let next = WatchResponse {
                events: Vec::new(),
                ..cur.clone()
            };
            parts.push(std::mem::replace(&mut cur, next));
            size = cur.encoded_len();
        }
        size += len;
        cur.events.push(ev);
    }
    cur.fragment = false;
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::mvccpb::KeyValue;

    fn put(key: &str, rev: i64, value_len: usize) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: Bytes::copy_from_slice(key.as_bytes()),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                value: Bytes::from(vec![b'x'; value_len]),
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn fragments_split_large_responses_and_mark_all_but_the_last() {
        let resp = WatchResponse {
            watch_id: 7,
            events: (0..6).map(|i| put("k", i + 2, 600 * 1024)).collect(),
            ..WatchResponse::default()
        };
        let parts = fragments(resp.clone());
        assert!(parts.len() >= 3, "{} parts", parts.len());
        for p in &parts {
            assert!(p.encoded_len() <= RESPONSE_BYTES_MAX + 1024);
            assert_eq!(p.watch_id, 7);
        }
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        let events: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(events, resp.events);
    }
}
