//! The event loop: collect inputs → `raft.step` → dispatch actions.
//!
//! One thread owns the Raft core and the state machine. Each pass:
//!
//! 1. **collect**: block until an input or the next tick, then drain what
//!    is queued (bounded by `batch_entries_max` / `batch_bytes_max`): Raft
//!    messages from peers, client commands (the proposal batcher), client
//!    queries; then the WAL tickets that became durable (the WAL driver
//!    wakes the loop through the tickets' waker, no thread in between);
//! 2. **step**: feed them to the core — one `propose` for the whole batch of
//!    commands, one `read_index` for the whole batch of linearizable reads;
//! 3. **dispatch** the actions, in order:
//!    * `Persist` → one WAL write (group commit happens in the WAL), handed
//!      over without waiting (`Wal::try_write`; one the WAL cannot take at
//!      once waits in the loop's backlog, in order: see `wal_tickets.rs`);
//!      its ticket waits in the loop, in order, until the WAL says durable;
//!    * `Send` → the pass's outbox, handed to the transport in one
//!      `send_batch` once the pass's actions are dispatched (the leader's
//!      AppendEntries leave in the same pass as its own WAL write: its fsync
//!      overlaps the network; to an idle peer the transport writes them
//!      from this thread, one frame per peer, without waking its writer),
//!      or, for votes and acknowledgements, held until their persist is
//!      durable;
//!    * `Apply` → the apply stage: the state machine, then the reply to the
//!      client that proposed each entry; waiting reads are served;
//!    * snapshots (`snapshots`): the loop only freezes a view of the state
//!      machine and hands it to the snapshot thread, which writes, fsyncs
//!      and renames the file, compacts the WAL and removes old files; a
//!      follower installs a snapshot that was fetched and restored off the
//!      loop by swapping it in.
//!
//! Stage names: accepted (request reached the loop) → submitted (proposed
//! and handed to the WAL) → durable → committed → applied.
//!
//! The loop never waits on work proportional to the data: snapshots,
//! restores, WAL compaction and dropping a replaced state all run on other
//! threads; nor on a stalled disk (the WAL backlog), nor on rendering its
//! metrics (a scrape takes its histograms, `metrics.rs`). `loop_pass_us`
//! (a metric) is the length of each pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use skiff_net::{SnapshotFiles, Transport};
use skiff_raft::{
    Action, Entry, Index, Membership, Message, MessageBody, NodeId, Payload, PersistId, Raft, Role,
    Term,
};
use skiff_wal::{Ticket, Wal, WriteBatch};
use tokio::sync::oneshot;

use crate::command;
use crate::config::NodeConfig;
use crate::cpu_wait::CpuWait;
use crate::queue::{QueueReceiver, QueueSender};
use crate::state_machine::{Committed, SnapshotView, StateMachine};
use crate::storage::{self, encode_membership};

mod membership;
mod metrics;
mod no_space;
mod snapshots;
#[cfg(test)]
pub(crate) mod test_support;
mod wal_tickets;

use self::metrics::Stages;
pub(crate) use self::metrics::{MetricsSample, StageHistograms};
pub use self::no_space::{NO_SPACE_RETRY, REWRITE_BYTES_MAX};
pub use self::snapshots::SnapshotOffer;
pub(crate) use self::snapshots::{file_crc, lower_thread_priority, SnapshotWorker};
use self::wal_tickets::{Backlogged, Durable, WalWaker};

/// How often the loop looks at the data directory's free space: writes
/// go on at full speed until the next look, so this and the write rate
/// size `space_reserve_bytes`.
pub const SPACE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Inputs queued for the loop (bounded: `INPUTS_MAX`).
pub const INPUTS_MAX: usize = 65_536;
/// Inputs taken from the queue per lock (the loop drains in slices).
pub const INPUTS_PER_DRAIN_MAX: usize = 1024;
/// Messages moved from the transport's inbox per input.
pub const MESSAGES_PER_INPUT_MAX: usize = 1024;
/// WAL writes (persists, snapshot records) in flight before the loop
/// stops proposing (bounded by Raft's windows long before this).
pub const TICKETS_MAX: usize = 65_536;
/// Bytes of entries the loop keeps for the WAL when its queue is full (a
/// stalled disk) before it waits for the WAL after all: the bound of
/// `wal_backlog`. Raft's windows (proposals pending, bytes in flight per
/// follower) bound it long before this.
pub const WAL_BACKLOG_BYTES_MAX: usize = 256 << 20;
/// How soon the loop offers the WAL its backlog again.
pub const WAL_BACKLOG_RETRY: Duration = Duration::from_millis(1);
/// A leader whose WAL write waited this many (longest) election timeouts,
/// not taken or not durable, hands leadership over (a stalled disk; see
/// `wal_tickets.rs`). Above an election timeout: an fsync that is only
/// slow under load does not move leadership.
pub const WAL_STALL_ELECTIONS: u32 = 4;

/// Why a client request was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("not the leader")]
    NotLeader { leader: Option<NodeId> },
    #[error("{0}")]
    Unavailable(String),
    #[error("too many requests: {0}")]
    Busy(String),
    #[error("the node stopped: {0}")]
    Stopped(String),
    /// Refused before anything was appended, for a moment: leadership is
    /// being handed over, or a new leader has not committed an entry of
    /// its term yet. The same request is safe to send again shortly.
    #[error("{0}")]
    NotYet(String),
    /// The request cannot be done as asked (an invalid membership change,
    /// a transfer to a node that is not a voter).
    #[error("{0}")]
    Invalid(String),
}

pub type WriteReply<S> = oneshot::Sender<Result<<S as StateMachine>::Response, RequestError>>;
pub type QueryReply<S> = oneshot::Sender<Result<<S as StateMachine>::QueryResponse, RequestError>>;

/// What the loop reacts to.
pub enum Input<S: StateMachine> {
    Messages(Vec<Message>),
    /// A client command, proposed through Raft.
    Write {
        cmd: S::Command,
        reply: WriteReply<S>,
        accepted: Instant,
    },
    /// A client read; after a read index when `linearizable`, else at once.
    Query {
        query: S::Query,
        linearizable: bool,
        reply: QueryReply<S>,
    },
    /// A membership change, proposed on the leader; answered with the
    /// membership once this member applied it.
    ChangeMembership {
        change: skiff_raft::MembershipChange,
        meta: Option<Bytes>,
        reply: membership::ChangeReply,
    },
    /// Hand leadership to the target (or the most caught-up voter);
    /// answered with the new leader once it leads.
    TransferLeadership {
        target: Option<NodeId>,
        reply: membership::TransferReply,
    },
    /// A WAL ticket became durable (or the WAL failed): look at the
    /// tickets waiting in the loop.
    WalProgress,
    /// A follower fetched the leader's snapshot into `path` and restored
    /// `state` from it (off the loop): step `msg`.
    SnapshotFetched {
        msg: Message,
        path: PathBuf,
        len: u64,
        crc: u32,
        state: Box<S>,
    },
    /// The snapshot thread finished a snapshot file (or failed to).
    SnapshotWritten {
        index: Index,
        term: Term,
        path: PathBuf,
        result: Result<(u64, u32), String>,
        took: Duration,
    },
    /// The snapshot thread compacted the WAL through `upto` (or failed to).
    WalCompacted {
        upto: Index,
        result: Result<usize, skiff_wal::Error>,
    },
    /// Render the metrics as Prometheus text.
    Metrics(oneshot::Sender<MetricsSample>),
    Shutdown,
}

/// State other threads read (status, routing): written by the loop only.
#[derive(Debug, Default)]
pub struct Shared {
    pub role: AtomicU8,
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    pub membership: Mutex<Membership>,
    /// Free bytes on the data directory's filesystem at the last look
    /// (0 before the first look or when the check is off).
    pub disk_available: AtomicU64,
    /// `disk_available` is below `space_reserve_bytes`.
    pub space_low: AtomicBool,
    /// Peer messages the inbox pump dropped because the loop's input queue
    /// stayed full for `PEER_MESSAGES_WAIT_MAX` (Raft tolerates the loss).
    pub peer_messages_dropped: AtomicU64,
    /// Set when the loop ended; `fatal` says why when it failed.
    pub stopped: AtomicBool,
    pub fatal: Mutex<Option<String>>,
    /// The running totals of the loop's stage histograms, kept by whoever
    /// renders the metrics (see `MetricsSample`); none before the first
    /// scrape.
    pub(crate) metrics_book: Mutex<Option<StageHistograms>>,
}

impl Shared {
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            3 => Role::Leader,
            2 => Role::Candidate,
            1 => Role::PreCandidate,
            _ => Role::Follower,
        }
    }

    pub fn leader(&self) -> Option<NodeId> {
        match self.leader.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }
}

fn us_since(t: Instant) -> u64 {
    t.elapsed().as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

/// A client command of this pass, encoded, not yet proposed.
struct Proposal<S: StateMachine> {
    request_id: u64,
    entry: Bytes,
    reply: WriteReply<S>,
    accepted: Instant,
}

/// A proposal waiting for its entry to be applied.
struct PendingWrite<S: StateMachine> {
    request_id: u64,
    reply: WriteReply<S>,
    accepted: Instant,
}

/// A write this follower forwarded to the leader: answered when this node
/// applies the command with its request id, or when the leader refuses
/// the batch `ctx`.
struct ForwardedWrite<S: StateMachine> {
    ctx: u64,
    reply: WriteReply<S>,
    accepted: Instant,
}

struct PendingRead<S: StateMachine> {
    query: S::Query,
    reply: QueryReply<S>,
    accepted: Instant,
}

/// A snapshot fetched and restored off the loop, waiting for the core to
/// install it.
struct Fetched<S> {
    path: PathBuf,
    len: u64,
    crc: u32,
    state: Box<S>,
}

/// Everything the loop owns.
pub struct EventLoop<S: StateMachine> {
    pub(crate) cfg: NodeConfig,
    pub(crate) raft: Raft,
    pub(crate) sm: S,
    /// The last log index applied to `sm` (or restored into it).
    applied: Index,
    pub(crate) wal: Arc<Wal>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) inputs: QueueReceiver<Input<S>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) snap_dir: PathBuf,
    pub(crate) snapshots: Arc<SnapshotFiles>,
    pub(crate) snapshot_addr: SocketAddr,
    /// The latest snapshot offered to followers: (index, term, offer).
    pub(crate) snapshot: Option<(Index, Term, SnapshotOffer)>,
    /// Durable snapshot files not yet told to the core (it is told once
    /// `snapshot_catchup_entries` more are applied, so the log keeps that
    /// margin for followers slightly behind): (index, term).
    untold: VecDeque<(Index, Term)>,
    /// Followers offered a snapshot, for which the leader holds back log
    /// compaction until they catch up (see `snapshots.rs`).
    catchups: BTreeMap<NodeId, snapshots::Catchup>,
    /// Whether compaction was held at the last look (to count holds).
    compaction_holding: bool,
    /// Follower: the persist that records the last snapshot installed,
    /// and its index: once durable, the WAL below it and older snapshot
    /// files go, as after a snapshot of its own.
    install_recorded: Option<(PersistId, Index)>,
    /// Snapshot files the core may name in `Compact`: index → term.
    held: BTreeMap<Index, Term>,
    worker: SnapshotWorker<S>,
    // ---- Bookkeeping.
    durable: PersistId,
    /// WAL writes not yet durable, in WAL order, with what their
    /// durability means and when they were written.
    tickets: VecDeque<(Ticket, Durable, Instant)>,
    /// Writes the WAL could not take at once, in order (see
    /// `wal_tickets.rs`), and their bytes.
    wal_backlog: VecDeque<Backlogged>,
    wal_backlog_bytes: usize,
    /// Wakes the loop when the WAL advances.
    wal_waker: Arc<WalWaker<S>>,
    held_sends: VecDeque<(PersistId, Message)>,
    /// Messages of this pass, sent together at the end of its dispatch.
    outbox: Vec<Message>,
    writes: BTreeMap<Index, PendingWrite<S>>,
    /// Writes forwarded to the leader, by request id.
    forwarded: HashMap<u64, ForwardedWrite<S>>,
    next_forward_ctx: u64,
    next_request: u64,
    reads_waiting_index: HashMap<u64, Vec<PendingRead<S>>>,
    reads_waiting_apply: BTreeMap<Index, Vec<PendingRead<S>>>,
    next_read_ctx: u64,
    fetched: HashMap<Index, Fetched<S>>,
    /// The last index written to the WAL (to know when a persist truncates).
    wal_last: Index,
    /// Set while the WAL is out of space (see `no_space.rs`).
    no_space: Option<no_space::NoSpace>,
    /// The last snapshot record asked of the WAL (written again if the
    /// WAL ran out of space before it was durable).
    last_snapshot_meta: Option<skiff_wal::SnapshotMeta>,
    applied_since_snapshot: (u64, u64),
    snapshot_in_progress: bool,
    /// No snapshot is started before this (after a failed one).
    snapshot_retry_at: Option<Instant>,
    last_snapshot_index: Index,
    /// The state machine has deferred work (`background_step`).
    sm_busy: bool,
    /// Propose batches waiting to become durable locally: (last index, when
    /// the oldest request of the batch was accepted, requests).
    submitted: VecDeque<(Index, Instant, u64)>,
    /// Committed entries handed out by the core and not applied yet: at
    /// most `apply_bytes_max` of them are applied per pass (see `apply`).
    /// Bounded by what the core holds committed and unapplied (clones of
    /// its entries: their payloads are shared).
    to_apply: VecDeque<Entry>,
    /// Entry bytes the apply stage may still take in this pass.
    apply_budget: usize,
    /// Reused buffers of the apply stage.
    apply_batch: Vec<Committed>,
    apply_responses: Vec<S::Response>,
    stages: Stages,
    last_sweep: Instant,
    members: membership::Members,
    last_space_check: Instant,
}

/// What `EventLoop::new` takes besides the core and the state machine.
pub(crate) struct LoopParts<S: StateMachine> {
    pub wal: Arc<Wal>,
    pub transport: Arc<dyn Transport>,
    pub inputs: QueueReceiver<Input<S>>,
    pub wake: QueueSender<Input<S>>,
    pub shared: Arc<Shared>,
    pub snap_dir: PathBuf,
    pub snapshots: Arc<SnapshotFiles>,
    pub snapshot_addr: SocketAddr,
    pub snapshot: Option<(Index, Term, SnapshotOffer)>,
    pub worker: SnapshotWorker<S>,
}

impl<S: StateMachine> EventLoop<S> {
    pub(crate) fn new(
        cfg: NodeConfig,
        raft: Raft,
        sm: S,
        applied: Index,
        parts: LoopParts<S>,
    ) -> Self {
        let wal_last = parts.wal.last_index();
        let last_snapshot_index = parts.snapshot.as_ref().map_or(0, |s| s.0);
        let held = parts.snapshot.iter().map(|s| (s.0, s.1)).collect();
        let next_request = cfg.id << 48 | (now_nanos() & ((1 << 40) - 1)) << 8;
        EventLoop {
            cfg,
            raft,
            sm,
            applied,
            wal: parts.wal,
            transport: parts.transport,
            inputs: parts.inputs,
            tickets: VecDeque::new(),
            wal_backlog: VecDeque::new(),
            wal_backlog_bytes: 0,
            wal_waker: Arc::new(WalWaker {
                pending: AtomicBool::new(false),
                inputs: parts.wake,
            }),
            shared: parts.shared,
            snap_dir: parts.snap_dir,
            snapshots: parts.snapshots,
            snapshot_addr: parts.snapshot_addr,
            snapshot: parts.snapshot,
            untold: VecDeque::new(),
            catchups: BTreeMap::new(),
            compaction_holding: false,
            install_recorded: None,
            held,
            worker: parts.worker,
            durable: 0,
            held_sends: VecDeque::new(),
            outbox: Vec::new(),
            writes: BTreeMap::new(),
            forwarded: HashMap::new(),
            next_forward_ctx: 1,
            next_request,
            reads_waiting_index: HashMap::new(),
            reads_waiting_apply: BTreeMap::new(),
            next_read_ctx: 1,
            fetched: HashMap::new(),
            wal_last,
            no_space: None,
            last_snapshot_meta: None,
            applied_since_snapshot: (0, 0),
            snapshot_in_progress: false,
            snapshot_retry_at: None,
            last_snapshot_index,
            sm_busy: true,
            submitted: VecDeque::new(),
            to_apply: VecDeque::new(),
            apply_budget: 0,
            apply_batch: Vec::new(),
            apply_responses: Vec::new(),
            stages: Stages::new(),
            last_sweep: Instant::now(),
            members: membership::Members::default(),
            last_space_check: Instant::now(),
        }
    }

    /// Runs until `Shutdown` or a fatal error (returned).
    pub fn run(mut self) -> Result<(), String> {
        let tick = self.cfg.tick_interval();
        let heartbeat = tick * self.cfg.heartbeat_ticks;
        let linger = Duration::from_micros(self.cfg.batch_linger_us);
        let mut next_tick = Instant::now() + tick;
        let mut writes: Vec<Proposal<S>> = Vec::new();
        let mut reads: Vec<PendingRead<S>> = Vec::new();
        let mut queued: VecDeque<Input<S>> = VecDeque::new();
        let mut drained: Vec<Input<S>> = Vec::with_capacity(INPUTS_PER_DRAIN_MAX);
        // This thread's wait for a CPU, read at most once a tick (at a
        // pass's start) and at the end of a pass of a heartbeat or more.
        let cpu_wait = CpuWait::for_this_thread();
        let mut cpu_wait_mark: Option<(Instant, Duration)> = None;
        self.publish();
        self.check_space();
        let result = loop {
            // ---- 1. collect. Block (no spinning) until an input or the
            // next tick; with deferred state-machine work, do not block.
            if queued.is_empty() {
                let deadline = if self.sm_busy || !self.to_apply.is_empty() {
                    Instant::now()
                } else if !self.wal_backlog.is_empty() {
                    // Offered again soon (the WAL's progress wakes the loop
                    // too, when a write becomes durable).
                    next_tick.min(Instant::now() + WAL_BACKLOG_RETRY)
                } else {
                    next_tick
                };
                drained.clear();
                match self
                    .inputs
                    .recv_many(&mut drained, INPUTS_PER_DRAIN_MAX, Some(deadline))
                {
                    Ok(_) => queued.extend(drained.drain(..)),
                    Err(_) => break Ok(()),
                }
            }
            let pass_started = Instant::now();
            self.apply_budget = self.cfg.apply_bytes_max;
            if cpu_wait_mark.is_none_or(|(at, _)| pass_started - at >= tick) {
                cpu_wait_mark = cpu_wait.waited().map(|w| (pass_started, w));
            }
            let mut stop = None;
            let mut batch_bytes = 0usize;
            let mut linger_until: Option<Instant> = None;
            loop {
                if let Some(i) = queued.pop_front() {
                    if let Err(e) = self.collect(i, &mut writes, &mut reads, &mut batch_bytes) {
                        stop = Some(e);
                        break;
                    }
                    if writes.len() >= self.cfg.batch_entries_max
                        || batch_bytes >= self.cfg.batch_bytes_max
                    {
                        break;
                    }
                    continue;
                }
                drained.clear();
                if self
                    .inputs
                    .try_recv_many(&mut drained, INPUTS_PER_DRAIN_MAX)
                    > 0
                {
                    queued.extend(drained.drain(..));
                    continue;
                }
                // Nothing queued: linger for more writes if asked to.
                if writes.is_empty() || linger.is_zero() {
                    break;
                }
                let until = *linger_until.get_or_insert_with(|| Instant::now() + linger);
                if Instant::now() >= until {
                    break;
                }
                match self
                    .inputs
                    .recv_many(&mut drained, INPUTS_PER_DRAIN_MAX, Some(until))
                {
                    Ok(0) => break,
                    Ok(_) => queued.extend(drained.drain(..)),
                    Err(_) => break,
                }
            }
            if let Some(stop) = stop {
                break stop;
            }
            if let Err(e) = self.poll_tickets() {
                break Err(e);
            }
            if let Err(e) = self.drain_wal_backlog() {
                break Err(e);
            }
            if let Err(e) = self.retry_no_space() {
                break Err(e);
            }
            // ---- 2. step.
            if Instant::now() >= next_tick {
                self.raft.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            if !writes.is_empty() {
                self.propose(&mut writes);
            }
            if !reads.is_empty() {
                self.read(&mut reads);
            }
            // ---- 3. dispatch.
            if let Err(e) = self.dispatch() {
                break Err(e);
            }
            if self.sm_busy {
                self.sm_busy = self.sm.background_step();
            }
            if self.last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep();
            }
            if self.last_space_check.elapsed() >= SPACE_CHECK_INTERVAL {
                self.check_space();
            }
            if let Err(e) = self.membership_pass() {
                self.flush_sends();
                break Err(e);
            }
            self.flush_sends();
            let pass = pass_started.elapsed();
            self.stages
                .loop_pass_us
                .saturating_record(pass.as_micros().max(1) as u64);
            if pass >= heartbeat {
                self.stages.passes_over_heartbeat += 1;
                // What the thread waited for a CPU since the mark (at most a
                // tick before the pass began): a lower bound of the pass's
                // own time is what remains.
                let waited = match (cpu_wait_mark, cpu_wait.waited()) {
                    (Some((_, then)), Some(now)) => now.saturating_sub(then),
                    _ => Duration::ZERO,
                };
                if pass.saturating_sub(waited) < heartbeat {
                    self.stages.passes_over_heartbeat_cpu_wait += 1;
                }
            }
        };
        self.stop(result.as_ref().err().cloned());
        result
    }

    /// One input into this pass. `Err` ends the loop with its result.
    fn collect(
        &mut self,
        input: Input<S>,
        writes: &mut Vec<Proposal<S>>,
        reads: &mut Vec<PendingRead<S>>,
        batch_bytes: &mut usize,
    ) -> Result<(), Result<(), String>> {
        match input {
            Input::Messages(msgs) => {
                for msg in msgs {
                    if matches!(msg.body, MessageBody::Removed) {
                        let how = format!("member {} says so", msg.from);
                        return Err(Err(self.removed(&how)));
                    }
                    if self.answer_removed(&msg) {
                        continue;
                    }
                    if let Some(reason) = forwarded_commands_are_bad::<S>(&msg) {
                        // Proposed, a command that does not decode would
                        // stop every node at apply: refuse the batch.
                        tracing::warn!(
                            from = msg.from,
                            %reason,
                            "forwarded commands that do not decode refused"
                        );
                        if let MessageBody::Propose { ctx, .. } = msg.body {
                            self.send(Message {
                                from: self.cfg.id,
                                to: msg.from,
                                term: self.raft.term(),
                                body: MessageBody::ProposeRefused { ctx },
                            });
                        }
                        continue;
                    }
                    self.raft.step(msg);
                }
            }
            Input::Write {
                cmd,
                reply,
                accepted,
            } => {
                self.next_request += 1;
                let request_id = self.next_request;
                let entry = command::encode(request_id, |b| S::encode_command(&cmd, b));
                *batch_bytes += entry.len();
                writes.push(Proposal {
                    request_id,
                    entry,
                    reply,
                    accepted,
                });
            }
            Input::Query {
                query,
                linearizable,
                reply,
            } => {
                let r = PendingRead {
                    query,
                    reply,
                    accepted: Instant::now(),
                };
                if linearizable {
                    reads.push(r);
                } else {
                    self.serve_read(r, false);
                }
            }
            Input::ChangeMembership {
                change,
                meta,
                reply,
            } => self.change_membership(change, meta, reply),
            Input::TransferLeadership { target, reply } => self.transfer_leadership(target, reply),
            // Tickets are looked at on every pass.
            Input::WalProgress => {}
            Input::SnapshotFetched {
                msg,
                path,
                len,
                crc,
                state,
            } => {
                if let MessageBody::InstallSnapshot { index, .. } = &msg.body {
                    self.fetched.insert(
                        *index,
                        Fetched {
                            path,
                            len,
                            crc,
                            state,
                        },
                    );
                }
                self.raft.step(msg);
            }
            Input::SnapshotWritten {
                index,
                term,
                path,
                result,
                took,
            } => self.on_snapshot_written(index, term, path, result, took),
            Input::WalCompacted { upto, result } => {
                self.on_wal_compacted(upto, result).map_err(Err)?;
            }
            Input::Metrics(reply) => {
                if let Err(unsent) = reply.send(self.metrics_sample()) {
                    // The scraper gave up: keep its values for the next.
                    self.stages.give_back(unsent);
                }
            }
            Input::Shutdown => return Err(Ok(())),
        }
        Ok(())
    }

    fn pending_requests(&self) -> usize {
        self.writes.len()
            + self.forwarded.len()
            + self
                .reads_waiting_apply
                .values()
                .map(Vec::len)
                .sum::<usize>()
            + self
                .reads_waiting_index
                .values()
                .map(Vec::len)
                .sum::<usize>()
    }

    /// The proposal batcher's output: one `propose` for the whole batch.
    fn propose(&mut self, writes: &mut Vec<Proposal<S>>) {
        let room = self
            .cfg
            .requests_pending_max
            .saturating_sub(self.pending_requests());
        if writes.len() > room {
            for p in writes.drain(room..) {
                let _ = p.reply.send(Err(RequestError::Busy(format!(
                    "{} requests pending (requests_pending_max)",
                    self.cfg.requests_pending_max
                ))));
            }
        }
        if writes.is_empty() {
            return;
        }
        let commands: Vec<Bytes> = writes.iter().map(|p| p.entry.clone()).collect();
        if self.raft.role() != Role::Leader {
            self.forward(writes, commands);
            return;
        }
        match self.raft.propose(commands) {
            Ok((first, last)) => {
                let oldest = writes
                    .iter()
                    .map(|w| w.accepted)
                    .min()
                    .unwrap_or_else(Instant::now);
                let n = writes.len() as u64;
                self.stages.batch_entries.saturating_record(n);
                self.submitted.push_back((last, oldest, n));
                for (index, p) in (first..=last).zip(writes.drain(..)) {
                    self.writes.insert(
                        index,
                        PendingWrite {
                            request_id: p.request_id,
                            reply: p.reply,
                            accepted: p.accepted,
                        },
                    );
                }
            }
            Err(e) => refuse_all(writes, propose_error(e)),
        }
    }

    /// A follower's batch goes to the leader as one Raft `Propose`; each
    /// write is answered when this node applies it (found by request id).
    fn forward(&mut self, writes: &mut Vec<Proposal<S>>, commands: Vec<Bytes>) {
        let ctx = self.next_forward_ctx;
        self.next_forward_ctx += 1;
        match self.raft.forward(ctx, commands) {
            Ok(()) => {
                self.stages
                    .batch_entries
                    .saturating_record(writes.len() as u64);
                for p in writes.drain(..) {
                    self.forwarded.insert(
                        p.request_id,
                        ForwardedWrite {
                            ctx,
                            reply: p.reply,
                            accepted: p.accepted,
                        },
                    );
                }
            }
            Err(e) => refuse_all(writes, propose_error(e)),
        }
    }

    /// The leader refused the forwarded batch `ctx`: none of it was
    /// proposed.
    fn forward_refused(&mut self, ctx: u64) {
        let refused: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, f)| f.ctx == ctx)
            .map(|(&id, _)| id)
            .collect();
        for id in refused {
            if let Some(f) = self.forwarded.remove(&id) {
                let _ = f.reply.send(Err(RequestError::Unavailable(
                    "etcdserver: the leader did not take the write (leadership changing or \
                     too many uncommitted writes); retry"
                        .into(),
                )));
            }
        }
    }

    /// Linearizable reads of one pass share one read index.
    fn read(&mut self, reads: &mut Vec<PendingRead<S>>) {
        if self.pending_requests() + reads.len() > self.cfg.requests_pending_max {
            for r in reads.drain(..) {
                let _ = r.reply.send(Err(RequestError::Busy(format!(
                    "{} requests pending (requests_pending_max)",
                    self.cfg.requests_pending_max
                ))));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        match self.raft.read_index(ctx) {
            Ok(()) => {
                self.reads_waiting_index.insert(ctx, std::mem::take(reads));
            }
            Err(e) => {
                for r in reads.drain(..) {
                    let _ = r
                        .reply
                        .send(Err(RequestError::Unavailable(format!("read index: {e}"))));
                }
            }
        }
    }

    fn serve_read(&mut self, r: PendingRead<S>, linearizable: bool) {
        let result = self.sm.query(&r.query);
        if linearizable {
            self.stages
                .read_index_us
                .saturating_record(us_since(r.accepted));
        }
        let _ = r.reply.send(Ok(result));
    }

    fn on_persisted(&mut self, id: PersistId) {
        self.durable = self.durable.max(id);
        self.raft.persisted(id);
        if let Some((recorded, upto)) = self.install_recorded {
            if id >= recorded {
                self.install_recorded = None;
                self.on_snapshot_recorded(upto);
            }
        }
        let persisted = self.raft.persisted_index();
        while let Some(&(last, oldest, n)) = self.submitted.front() {
            if last > persisted {
                break;
            }
            self.submitted.pop_front();
            let _ = self
                .stages
                .propose_to_durable_us
                .record_n(us_since(oldest), n);
        }
    }

    /// Dispatches every action of this pass, in order.
    fn dispatch(&mut self) -> Result<(), String> {
        // What earlier passes left to apply goes first.
        self.apply_some()?;
        loop {
            // Sends held for persists that are now durable leave first: a
            // persist completing (a follower's entries, a vote) often makes
            // Raft emit nothing new, and its held acknowledgement must not
            // wait for the next action.
            self.release_held_sends();
            let actions = self.raft.take_actions();
            if actions.is_empty() {
                break;
            }
            self.dispatch_actions(actions)?;
        }
        // A fetched snapshot the core did not install in this pass (stale,
        // or the term moved on) is a whole state: drop it off the loop.
        for (_, stale) in self.fetched.drain() {
            self.worker.drop_off_loop(stale.state);
        }
        self.flush_sends();
        self.publish();
        Ok(())
    }

    /// Sends the held messages whose persist is now durable, in order.
    fn release_held_sends(&mut self) {
        while let Some((id, _)) = self.held_sends.front() {
            if *id > self.durable {
                break;
            }
            let (_, msg) = self.held_sends.pop_front().expect("front exists");
            self.send(msg);
        }
    }

    fn dispatch_actions(&mut self, actions: Vec<Action>) -> Result<(), String> {
        for action in actions {
            match action {
                Action::Persist {
                    id,
                    hard_state,
                    entries,
                } => self.persist(id, hard_state, entries)?,
                Action::Send { msg, after_persist } => match after_persist {
                    Some(id) if id > self.durable => self.held_sends.push_back((id, msg)),
                    _ => self.send(msg),
                },
                Action::Apply { entries } => {
                    self.to_apply.extend(entries);
                    self.apply_some()?;
                }
                Action::SendSnapshot {
                    to,
                    index,
                    membership,
                } => self.send_snapshot(to, index, membership),
                Action::InstallSnapshot {
                    id,
                    index,
                    term,
                    membership,
                    data: _,
                } => self.install_snapshot(id, index, term, &membership)?,
                Action::Compact { upto, membership } => self.record_snapshot(upto, &membership)?,
                Action::ReadReady { ctx, index } => {
                    if let Some(reads) = self.reads_waiting_index.remove(&ctx) {
                        if index <= self.applied {
                            for r in reads {
                                self.serve_read(r, true);
                            }
                        } else {
                            self.reads_waiting_apply
                                .entry(index)
                                .or_default()
                                .extend(reads);
                        }
                    }
                }
                Action::ReadFailed { ctx } => {
                    for r in self.reads_waiting_index.remove(&ctx).unwrap_or_default() {
                        let _ = r.reply.send(Err(RequestError::Unavailable(
                            "leadership changed before the read was confirmed; retry".into(),
                        )));
                    }
                }
                Action::ProposeRefused { ctx } => self.forward_refused(ctx),
                Action::RoleChanged { role, term, leader } => {
                    tracing::info!(?role, term, ?leader, "role changed");
                }
            }
        }
        Ok(())
    }

    fn persist(
        &mut self,
        id: PersistId,
        hard_state: Option<skiff_raft::HardState>,
        entries: Vec<Entry>,
    ) -> Result<(), String> {
        let truncate_from = entries
            .first()
            .map(|e| e.index)
            .filter(|&i| i <= self.wal_last);
        let last = entries.last().map(|e| e.index);
        let batch = WriteBatch {
            truncate_from,
            snapshot: None,
            entries: entries.iter().map(storage::to_wal).collect(),
            hard_state: hard_state.map(storage::to_wal_hard_state),
        };
        self.write_wal(batch, Durable::Persisted(id), "WAL write")?;
        // Not written while out of space (the rewrite that ends it sets it).
        if let (Some(last), false) = (last, self.wal_out_of_space()) {
            self.wal_last = last;
        }
        Ok(())
    }

    /// Into the outbox: sent with the rest of this pass's messages.
    fn send(&mut self, msg: Message) {
        self.outbox.push(msg);
    }

    /// Hands the outbox to the transport; a peer that did not take a
    /// message is reported unreachable to the core.
    fn flush_sends(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let msgs = std::mem::take(&mut self.outbox);
        for e in self.transport.send_batch(msgs) {
            tracing::trace!(error = %e, "send failed");
            self.raft.unreachable(e.peer());
        }
    }

    /// The apply stage: committed entries into the state machine, replies
    /// out.
    /// Applies what waits in `to_apply`, up to this pass's budget (one
    /// entry at least per pass): a backlog that commits at once (a
    /// follower catching up, a burst of large writes) is applied over
    /// several passes, each short enough for heartbeats to go out between
    /// them. The loop does not block while entries wait.
    fn apply_some(&mut self) -> Result<(), String> {
        while !self.to_apply.is_empty() && self.apply_budget > 0 {
            let mut bytes = 0usize;
            let mut n = 0usize;
            for e in &self.to_apply {
                if n > 0 && bytes + e.size() > self.apply_budget {
                    break;
                }
                bytes += e.size();
                n += 1;
            }
            self.apply_budget = self.apply_budget.saturating_sub(bytes.max(1));
            let entries: Vec<Entry> = self.to_apply.drain(..n).collect();
            self.apply(entries)?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let started = Instant::now();
        // Decode the runtime's header of each entry: request ids, in order.
        let mut batch = std::mem::take(&mut self.apply_batch);
        let mut ids: Vec<Option<u64>> = Vec::with_capacity(entries.len());
        batch.clear();
        for e in entries {
            self.membership_entry_applied(&e);
            let command = match e.payload {
                Payload::Normal(data) => {
                    self.applied_since_snapshot.0 += 1;
                    self.applied_since_snapshot.1 += data.len() as u64;
                    let (id, body) = command::decode(data)
                        .map_err(|err| format!("entry {} is not a command: {err}", e.index))?;
                    ids.push(Some(id));
                    Some(body)
                }
                Payload::Noop | Payload::Membership(_) => {
                    ids.push(None);
                    None
                }
            };
            batch.push(Committed {
                index: e.index,
                term: e.term,
                command,
            });
        }
        let mut responses = std::mem::take(&mut self.apply_responses);
        responses.clear();
        self.sm
            .apply(&batch, &mut responses)
            .map_err(|e| format!("state machine: {e}"))?;
        let commands = ids.iter().filter(|i| i.is_some()).count();
        if responses.len() != commands {
            return Err(format!(
                "state machine answered {} of {commands} commands",
                responses.len()
            ));
        }
        self.applied = last;
        let mut answers = responses.drain(..);
        for (c, id) in batch.iter().zip(ids) {
            let pending = self.writes.remove(&c.index);
            let Some(request_id) = id else {
                if let Some(p) = pending {
                    let _ = p.reply.send(Err(lost()));
                }
                continue;
            };
            let answer = answers.next().expect("one response per command (checked)");
            // Proposed here at this index, or forwarded from here.
            let waiter = match pending {
                Some(p) if p.request_id == request_id => Some((p.reply, p.accepted)),
                other => {
                    if let Some(p) = other {
                        let _ = p.reply.send(Err(lost()));
                    }
                    self.forwarded
                        .remove(&request_id)
                        .map(|f| (f.reply, f.accepted))
                }
            };
            if let Some((reply, accepted)) = waiter {
                self.stages
                    .propose_to_commit_us
                    .saturating_record(us_since(accepted));
                let _ = reply.send(Ok(answer));
            }
        }
        drop(answers);
        self.apply_responses = responses;
        self.apply_batch = batch;
        self.sm_busy = true;
        self.stages
            .commit_to_apply_us
            .saturating_record(us_since(started));
        self.raft.applied(last);
        // Reads waiting for this much to be applied.
        while let Some(entry) = self.reads_waiting_apply.first_entry() {
            if *entry.key() > last {
                break;
            }
            for r in entry.remove() {
                self.serve_read(r, true);
            }
        }
        self.tell_snapshots();
        let (n, bytes) = self.applied_since_snapshot;
        if !self.snapshot_in_progress
            && (n >= self.cfg.snapshot_entries || bytes >= self.cfg.snapshot_bytes)
            && self.snapshot_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            self.start_snapshot()?;
        }
        Ok(())
    }

    /// Drops requests whose clients gave up.
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        self.writes.retain(|_, w| !w.reply.is_closed());
        self.forwarded.retain(|_, w| !w.reply.is_closed());
        for reads in self.reads_waiting_apply.values_mut() {
            reads.retain(|r| !r.reply.is_closed());
        }
        self.reads_waiting_apply.retain(|_, r| !r.is_empty());
    }

    /// Free space of the data directory's filesystem against the reserve
    /// (one statvfs, every `SPACE_CHECK_INTERVAL`).
    /// Looks at the data directory's free space: below the reserve, or
    /// while the WAL is out of space, the node reports its space low.
    fn check_space(&mut self) {
        self.last_space_check = Instant::now();
        let reserve = self.cfg.space_reserve_bytes;
        let below = if reserve == 0 {
            false
        } else {
            match disk_available(&self.cfg.data_dir) {
                Ok(available) => {
                    self.shared
                        .disk_available
                        .store(available, Ordering::Release);
                    available < reserve
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the data directory's free space");
                    // Unknown: as it was.
                    self.shared.space_low.load(Ordering::Acquire)
                }
            }
        };
        let low = below || self.wal_out_of_space();
        if self.shared.space_low.swap(low, Ordering::AcqRel) != low {
            let available = self.shared.disk_available.load(Ordering::Acquire);
            if low {
                tracing::warn!(available, reserve, "disk space low: writes are refused");
            } else {
                tracing::info!(
                    available,
                    reserve,
                    "disk space back: writes are taken again"
                );
            }
        }
    }

    fn publish(&self) {
        let s = &self.shared;
        let role = match self.raft.role() {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        s.role.store(role, Ordering::Release);
        s.term.store(self.raft.term(), Ordering::Release);
        s.leader
            .store(self.raft.leader().unwrap_or(0), Ordering::Release);
        s.commit.store(self.raft.commit(), Ordering::Release);
        s.applied.store(self.applied, Ordering::Release);
        let m = self.raft.membership();
        let mut shared = s.membership.lock().unwrap_or_else(|e| e.into_inner());
        if *shared != *m {
            *shared = m.clone();
        }
    }

    fn stop(&mut self, fatal: Option<String>) {
        if let Some(f) = &fatal {
            tracing::error!(error = %f, "node stopping on a fatal error");
        }
        let why = fatal.clone().unwrap_or_else(|| "shut down".into());
        self.membership_stop(&why);
        for (_, w) in std::mem::take(&mut self.writes) {
            let _ = w.reply.send(Err(RequestError::Stopped(why.clone())));
        }
        for (_, w) in std::mem::take(&mut self.forwarded) {
            let _ = w.reply.send(Err(RequestError::Stopped(why.clone())));
        }
        for (_, reads) in std::mem::take(&mut self.reads_waiting_apply) {
            for r in reads {
                let _ = r.reply.send(Err(RequestError::Stopped(why.clone())));
            }
        }
        for (_, reads) in std::mem::take(&mut self.reads_waiting_index) {
            for r in reads {
                let _ = r.reply.send(Err(RequestError::Stopped(why.clone())));
            }
        }
        // Closed first: a snapshot thread reporting to a full queue must
        // not wait for the loop that is waiting for it.
        self.inputs.close();
        self.worker.shutdown();
        *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) = fatal;
        self.shared.stopped.store(true, Ordering::Release);
    }
}

/// Why `msg` forwards a command this node could not apply, if it does.
fn forwarded_commands_are_bad<S: StateMachine>(msg: &Message) -> Option<String> {
    let MessageBody::Propose { commands, .. } = &msg.body else {
        return None;
    };
    commands
        .iter()
        .find_map(|c| match command::decode(c.clone()) {
            Err(e) => Some(e.to_string()),
            Ok((_, body)) => S::check_command(&body).err(),
        })
}

/// Answers every write of a batch that was not proposed with `err`.
fn refuse_all<S: StateMachine>(writes: &mut Vec<Proposal<S>>, err: RequestError) {
    for p in writes.drain(..) {
        let _ = p.reply.send(Err(err.clone()));
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s filesystem.
pub fn disk_available(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub(crate) fn propose_error(e: skiff_raft::ProposeError) -> RequestError {
    match e {
        skiff_raft::ProposeError::NotLeader { leader_hint } => RequestError::NotLeader {
            leader: leader_hint,
        },
        skiff_raft::ProposeError::Backpressure { .. } => RequestError::Busy(e.to_string()),
        skiff_raft::ProposeError::Transferring { .. }
        | skiff_raft::ProposeError::LeaderNotReady => RequestError::NotYet(e.to_string()),
        other => RequestError::Unavailable(other.to_string()),
    }
}

pub(crate) fn lost() -> RequestError {
    RequestError::Unavailable(
        "the proposal was dropped by a leadership change and not applied; retry".into(),
    )
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::test_support::NoView;
    use super::*;
    use crate::state_machine::{ApplyError, RestoreError};

    /// Accepts commands whose first byte is b'+' only.
    struct Picky;
    impl StateMachine for Picky {
        type Command = ();
        type Response = ();
        type Query = ();
        type QueryResponse = ();
        type Snapshot = NoView;
        fn encode_command(_: &(), _: &mut BytesMut) {}
        fn check_command(c: &Bytes) -> Result<(), String> {
            match c.first() {
                Some(b'+') => Ok(()),
                _ => Err("not a +".into()),
            }
        }
        fn apply(&mut self, _: &[Committed], _: &mut Vec<()>) -> Result<(), ApplyError> {
            Ok(())
        }
        fn query(&self, _: &()) {}
        fn snapshot(&self) -> NoView {
            NoView
        }
        fn restore(_: &mut dyn std::io::Read) -> Result<Self, RestoreError> {
            Ok(Picky)
        }
    }

    fn propose(commands: Vec<Bytes>) -> Message {
        Message {
            from: 2,
            to: 1,
            term: 3,
            body: MessageBody::Propose { ctx: 1, commands },
        }
    }

    #[test]
    fn forwarded_commands_that_do_not_decode_are_caught() {
        let good = command::encode(7, |b| b.extend_from_slice(b"+1"));
        let refused = command::encode(8, |b| b.extend_from_slice(b"-1"));
        assert_eq!(
            forwarded_commands_are_bad::<Picky>(&propose(vec![good.clone()])),
            None
        );
        for bad in [
            Bytes::new(),
            Bytes::from_static(&[0xFE, 1, 2]),
            good.slice(..good.len() / 2),
            refused,
        ] {
            assert!(
                forwarded_commands_are_bad::<Picky>(&propose(vec![good.clone(), bad.clone()]))
                    .is_some(),
                "{bad:?}"
            );
        }
        let heartbeat = Message {
            body: MessageBody::Heartbeat {
                commit: 0,
                round: 0,
            },
            ..propose(Vec::new())
        };
        assert_eq!(forwarded_commands_are_bad::<Picky>(&heartbeat), None);
    }
}
