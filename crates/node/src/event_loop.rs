//! The event loop: collect inputs → `raft.step` → dispatch actions.
//!
//! One thread owns the Raft core and the KV state machine. Each pass:
//!
//! 1. **collect**: wait for an input or the next tick, then drain what is
//!    queued (bounded by `batch_entries_max` / `batch_bytes_max`): Raft
//!    messages from peers, client writes (the proposal batcher), client
//!    reads; then the WAL tickets that became durable (the WAL driver wakes
//!    the loop through the tickets' waker, no thread in between);
//! 2. **step**: feed them to the core — one `propose` for the whole batch of
//!    writes, one `read_index` for the whole batch of linearizable reads;
//! 3. **dispatch** the actions, in order:
//!    * `Persist` → one WAL write (group commit happens in the WAL); its
//!      ticket waits in the loop, in order, until the WAL says durable;
//!    * `Send` → the pass's outbox, handed to the transport in one
//!      `send_batch` once the pass's actions are dispatched (the leader's
//!      AppendEntries leave in the same pass as its own WAL write: its fsync
//!      overlaps the network; to an idle peer the transport writes them
//!      from this thread, one frame per peer, without waking its writer),
//!      or, for votes and acknowledgements, held until their persist is
//!      durable;
//!    * `Apply` → the apply stage: the KV store, then the reply to the
//!      client that proposed each entry; waiting reads are served;
//!    * snapshots: send (offer the file to the follower, which fetches it
//!      in parallel chunks), install (restore the store from the fetched
//!      file), compact (record the snapshot in the WAL, then drop segments).
//!
//! Stage names: accepted (request reached the loop) → submitted (proposed
//! and handed to the WAL) → durable → committed → applied.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use skiff_net::{SnapshotFiles, Transport};
use skiff_raft::{
    Action, Entry, Index, Membership, Message, MessageBody, NodeId, Payload, PersistId, Raft, Role,
};
use skiff_wal::{Ticket, Wal, WriteBatch};
use tokio::sync::oneshot;

use crate::command::Command;
use crate::config::NodeConfig;
use crate::kv::{KvError, KvStore};
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp};
use crate::storage::{self, encode_membership};

mod metrics;
mod snapshots;
mod wal_tickets;

use self::metrics::Stages;
pub(crate) use self::snapshots::file_crc;
pub use self::snapshots::SnapshotOffer;
use self::wal_tickets::{Durable, WalWaker};

/// Inputs queued for the loop (bounded: `INPUTS_MAX`).
pub const INPUTS_MAX: usize = 65_536;
/// Messages moved from the transport's inbox per input.
pub const MESSAGES_PER_INPUT_MAX: usize = 1024;
/// WAL writes (persists, snapshot records) in flight before the loop
/// stops proposing (bounded by Raft's windows long before this).
pub const TICKETS_MAX: usize = 65_536;
/// Snapshot files kept besides the latest (for transfers under way).
pub const SNAPSHOTS_KEPT: usize = 1;

/// Why a client request was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("not the leader")]
    NotLeader { leader: Option<NodeId> },
    #[error("{0}")]
    Unavailable(String),
    #[error("too many requests: {0}")]
    Busy(String),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("the node stopped: {0}")]
    Stopped(String),
}

pub type WriteReply = oneshot::Sender<Result<ResponseOp, RequestError>>;
pub type ReadReply = oneshot::Sender<Result<RangeResponse, RequestError>>;

/// What the loop reacts to.
pub enum Input {
    Messages(Vec<Message>),
    /// A client write (Put, DeleteRange, Txn), validated by the API.
    Write {
        op: RequestOp,
        reply: WriteReply,
        accepted: Instant,
    },
    /// A client read; linearizable unless `req.serializable`.
    Read {
        req: RangeRequest,
        reply: ReadReply,
    },
    /// A WAL ticket became durable (or the WAL failed): look at the
    /// tickets waiting in the loop.
    WalProgress,
    /// A follower fetched the leader's snapshot into `path`: step `msg`.
    SnapshotFetched {
        msg: Message,
        path: PathBuf,
    },
    /// Render the metrics as Prometheus text.
    Metrics(oneshot::Sender<String>),
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
    pub revision: AtomicU64,
    pub membership: Mutex<Membership>,
    /// Set when the loop ended; `fatal` says why when it failed.
    pub stopped: AtomicBool,
    pub fatal: Mutex<Option<String>>,
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

/// A proposal waiting for its entry to be applied.
struct PendingWrite {
    request_id: u64,
    reply: WriteReply,
    accepted: Instant,
}

/// A write this follower forwarded to the leader: answered when this node
/// applies the command with its request id, or when the leader refuses
/// the batch `ctx`.
struct ForwardedWrite {
    ctx: u64,
    reply: WriteReply,
    accepted: Instant,
}

struct PendingRead {
    req: RangeRequest,
    reply: ReadReply,
    accepted: Instant,
}

/// Everything the loop owns.
pub struct EventLoop {
    pub(crate) cfg: NodeConfig,
    pub(crate) raft: Raft,
    pub(crate) kv: KvStore,
    pub(crate) wal: Arc<Wal>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) inputs: Receiver<Input>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) snap_dir: PathBuf,
    pub(crate) snapshots: Arc<SnapshotFiles>,
    pub(crate) snapshot_addr: SocketAddr,
    /// The latest snapshot: (index, term, offer).
    pub(crate) snapshot: Option<(Index, u64, SnapshotOffer)>,
    pub(crate) cluster_id: u64,
    // ---- Bookkeeping.
    durable: PersistId,
    /// WAL writes not yet durable, in WAL order, with what their
    /// durability means and when they were written.
    tickets: VecDeque<(Ticket, Durable, Instant)>,
    /// Wakes the loop when the WAL advances.
    wal_waker: Arc<WalWaker>,
    held_sends: VecDeque<(PersistId, Message)>,
    /// Messages of this pass, sent together at the end of its dispatch.
    outbox: Vec<Message>,
    writes: BTreeMap<Index, PendingWrite>,
    /// Writes forwarded to the leader, by request id.
    forwarded: HashMap<u64, ForwardedWrite>,
    next_forward_ctx: u64,
    next_request: u64,
    reads_waiting_index: HashMap<u64, Vec<PendingRead>>,
    reads_waiting_apply: BTreeMap<Index, Vec<PendingRead>>,
    next_read_ctx: u64,
    fetched: HashMap<Index, PathBuf>,
    /// The last index written to the WAL (to know when a persist truncates).
    wal_last: Index,
    applied_since_snapshot: (u64, u64),
    snapshot_in_progress: bool,
    last_snapshot_index: Index,
    /// Propose batches waiting to become durable locally: (last index, when
    /// the oldest request of the batch was accepted, requests).
    submitted: VecDeque<(Index, Instant, u64)>,
    stages: Stages,
    last_sweep: Instant,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: NodeConfig,
        raft: Raft,
        kv: KvStore,
        wal: Arc<Wal>,
        transport: Arc<dyn Transport>,
        inputs: Receiver<Input>,
        wake: Sender<Input>,
        shared: Arc<Shared>,
        snap_dir: PathBuf,
        snapshots: Arc<SnapshotFiles>,
        snapshot_addr: SocketAddr,
        snapshot: Option<(Index, u64, SnapshotOffer)>,
    ) -> EventLoop {
        let wal_last = wal.last_index();
        let last_snapshot_index = snapshot.as_ref().map_or(0, |s| s.0);
        let cluster_id = cfg.cluster_id();
        let next_request = cfg.id << 48 | (now_nanos() & ((1 << 40) - 1)) << 8;
        EventLoop {
            cfg,
            raft,
            kv,
            wal,
            transport,
            inputs,
            tickets: VecDeque::new(),
            wal_waker: Arc::new(WalWaker {
                pending: AtomicBool::new(false),
                inputs: wake,
            }),
            shared,
            snap_dir,
            snapshots,
            snapshot_addr,
            snapshot,
            cluster_id,
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
            applied_since_snapshot: (0, 0),
            snapshot_in_progress: false,
            last_snapshot_index,
            submitted: VecDeque::new(),
            stages: Stages::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Runs until `Shutdown` or a fatal error (returned).
    pub fn run(mut self) -> Result<(), String> {
        let tick = self.cfg.tick_interval();
        let linger = Duration::from_micros(self.cfg.batch_linger_us);
        let mut next_tick = Instant::now() + tick;
        let mut writes: Vec<(RequestOp, WriteReply, Instant)> = Vec::new();
        let mut reads: Vec<PendingRead> = Vec::new();
        self.publish();
        let result = loop {
            // ---- 1. collect.
            let now = Instant::now();
            let first = if now >= next_tick {
                None
            } else {
                match self.inputs.recv_timeout(next_tick - now) {
                    Ok(input) => Some(input),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break Ok(()),
                }
            };
            let mut stop = None;
            let mut batch_bytes = 0usize;
            let mut input = first;
            let mut linger_until: Option<Instant> = None;
            loop {
                if let Some(i) = input.take() {
                    match self.collect(i, &mut writes, &mut reads, &mut batch_bytes) {
                        Ok(()) => {}
                        Err(e) => {
                            stop = Some(e);
                            break;
                        }
                    }
                }
                if writes.len() >= self.cfg.batch_entries_max
                    || batch_bytes >= self.cfg.batch_bytes_max
                {
                    break;
                }
                match self.inputs.try_recv() {
                    Ok(i) => input = Some(i),
                    Err(_) => {
                        // Nothing queued: linger for more writes if asked to.
                        if writes.is_empty() || linger.is_zero() {
                            break;
                        }
                        let until = *linger_until.get_or_insert_with(|| Instant::now() + linger);
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        match self.inputs.recv_timeout(until - now) {
                            Ok(i) => input = Some(i),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Some(stop) = stop {
                break stop;
            }
            if let Err(e) = self.poll_tickets() {
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
            if self.last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep();
            }
            self.flush_sends();
        };
        self.stop(result.as_ref().err().cloned());
        result
    }

    /// One input into this pass. `Err(Ok(()))`-like: `Err` ends the loop with
    /// its result.
    fn collect(
        &mut self,
        input: Input,
        writes: &mut Vec<(RequestOp, WriteReply, Instant)>,
        reads: &mut Vec<PendingRead>,
        batch_bytes: &mut usize,
    ) -> Result<(), Result<(), String>> {
        match input {
            Input::Messages(msgs) => {
                for msg in msgs {
                    if forwarded_commands_are_bad(&msg) {
                        // Proposed, a command that does not decode would
                        // stop every node at apply: refuse the batch.
                        tracing::warn!(
                            from = msg.from,
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
                op,
                reply,
                accepted,
            } => {
                *batch_bytes += prost::Message::encoded_len(&op);
                writes.push((op, reply, accepted));
            }
            Input::Read { req, reply } => reads.push(PendingRead {
                req,
                reply,
                accepted: Instant::now(),
            }),
            // Tickets are looked at on every pass.
            Input::WalProgress => {}
            Input::SnapshotFetched { msg, path } => {
                if let MessageBody::InstallSnapshot { index, .. } = &msg.body {
                    self.fetched.insert(*index, path);
                }
                self.raft.step(msg);
            }
            Input::Metrics(reply) => {
                let _ = reply.send(self.render_metrics());
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
    fn propose(&mut self, writes: &mut Vec<(RequestOp, WriteReply, Instant)>) {
        let room = self
            .cfg
            .requests_pending_max
            .saturating_sub(self.pending_requests());
        if writes.len() > room {
            for (_, reply, _) in writes.drain(room..) {
                let _ = reply.send(Err(RequestError::Busy(format!(
                    "{} requests pending (requests_pending_max)",
                    self.cfg.requests_pending_max
                ))));
            }
        }
        if writes.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(writes.len());
        let commands: Vec<Bytes> = writes
            .iter()
            .map(|(op, _, _)| {
                self.next_request += 1;
                ids.push(self.next_request);
                Command::encode_parts(self.next_request, op)
            })
            .collect();
        if self.raft.role() != Role::Leader {
            self.forward(writes, ids, commands);
            return;
        }
        match self.raft.propose(commands) {
            Ok((first, last)) => {
                let oldest = writes
                    .iter()
                    .map(|w| w.2)
                    .min()
                    .unwrap_or_else(Instant::now);
                let n = writes.len() as u64;
                self.stages.batch_entries.saturating_record(n);
                self.submitted.push_back((last, oldest, n));
                for ((index, (_, reply, accepted)), request_id) in
                    (first..=last).zip(writes.drain(..)).zip(ids)
                {
                    self.writes.insert(
                        index,
                        PendingWrite {
                            request_id,
                            reply,
                            accepted,
                        },
                    );
                }
            }
            Err(e) => refuse_all(writes, propose_error(e)),
        }
    }

    /// A follower's batch goes to the leader as one Raft `Propose`; each
    /// write is answered when this node applies it (found by request id).
    fn forward(
        &mut self,
        writes: &mut Vec<(RequestOp, WriteReply, Instant)>,
        ids: Vec<u64>,
        commands: Vec<Bytes>,
    ) {
        let ctx = self.next_forward_ctx;
        self.next_forward_ctx += 1;
        match self.raft.forward(ctx, commands) {
            Ok(()) => {
                self.stages
                    .batch_entries
                    .saturating_record(writes.len() as u64);
                for ((_, reply, accepted), request_id) in writes.drain(..).zip(ids) {
                    self.forwarded.insert(
                        request_id,
                        ForwardedWrite {
                            ctx,
                            reply,
                            accepted,
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

    /// Serializable reads are served at once; linearizable ones share one
    /// read index.
    fn read(&mut self, reads: &mut Vec<PendingRead>) {
        let mut linear = Vec::new();
        for r in reads.drain(..) {
            if r.req.serializable {
                self.serve_read(r);
            } else {
                linear.push(r);
            }
        }
        if linear.is_empty() {
            return;
        }
        if self.pending_requests() + linear.len() > self.cfg.requests_pending_max {
            for r in linear {
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
                self.reads_waiting_index.insert(ctx, linear);
            }
            Err(e) => {
                for r in linear {
                    let _ = r
                        .reply
                        .send(Err(RequestError::Unavailable(format!("read index: {e}"))));
                }
            }
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.cfg.id,
            revision,
            raft_term: self.raft.term(),
        })
    }

    fn serve_read(&mut self, r: PendingRead) {
        let result = self.kv.range(&r.req).map(|mut resp| {
            resp.header = self.header(self.kv.revision());
            resp
        });
        if !r.req.serializable {
            self.stages
                .read_index_us
                .saturating_record(us_since(r.accepted));
        }
        let _ = r.reply.send(result.map_err(RequestError::from));
    }

    fn on_persisted(&mut self, id: PersistId) {
        self.durable = self.durable.max(id);
        self.raft.persisted(id);
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
                Action::Apply { entries } => self.apply(entries)?,
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
                        if index <= self.kv.applied_index() {
                            for r in reads {
                                self.serve_read(r);
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
        if let Some(last) = entries.last() {
            self.wal_last = last.index;
        }
        let batch = WriteBatch {
            truncate_from,
            snapshot: None,
            entries: entries.iter().map(storage::to_wal).collect(),
            hard_state: hard_state.map(storage::to_wal_hard_state),
        };
        let ticket = self
            .wal
            .write(batch)
            .map_err(|e| format!("WAL write: {e}"))?;
        self.wait_for(ticket, Durable::Persisted(id))
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

    /// The apply stage: committed entries into the KV store, replies out.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let started = Instant::now();
        for e in entries {
            let pending = self.writes.remove(&e.index);
            match e.payload {
                Payload::Normal(data) => {
                    self.applied_since_snapshot.0 += 1;
                    self.applied_since_snapshot.1 += data.len() as u64;
                    let cmd = Command::decode(data)
                        .map_err(|err| format!("entry {} is not a command: {err}", e.index))?;
                    let result = self.kv.apply(e.index, &cmd.op);
                    // Proposed here at this index, or forwarded from here.
                    let waiter = match pending {
                        Some(p) if p.request_id == cmd.request_id => Some((p.reply, p.accepted)),
                        other => {
                            if let Some(p) = other {
                                let _ = p.reply.send(Err(lost()));
                            }
                            self.forwarded
                                .remove(&cmd.request_id)
                                .map(|f| (f.reply, f.accepted))
                        }
                    };
                    if let Some((reply, accepted)) = waiter {
                        self.stages
                            .propose_to_commit_us
                            .saturating_record(us_since(accepted));
                        let result = result.map(|mut r| {
                            set_header(&mut r, self.header(self.kv.revision()));
                            r
                        });
                        let _ = reply.send(result.map_err(RequestError::from));
                    }
                }
                Payload::Noop | Payload::Membership(_) => {
                    self.kv.mark_applied(e.index);
                    if let Some(p) = pending {
                        let _ = p.reply.send(Err(lost()));
                    }
                }
            }
        }
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
                self.serve_read(r);
            }
        }
        let (n, bytes) = self.applied_since_snapshot;
        if !self.snapshot_in_progress
            && (n >= self.cfg.snapshot_entries || bytes >= self.cfg.snapshot_bytes)
        {
            self.take_snapshot()?;
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
        s.applied.store(self.kv.applied_index(), Ordering::Release);
        s.revision
            .store(self.kv.revision().max(0) as u64, Ordering::Release);
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
        for (_, w) in std::mem::take(&mut self.writes) {
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
        *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) = fatal;
        self.shared.stopped.store(true, Ordering::Release);
    }
}

/// Whether `msg` forwards a command this node could not apply.
fn forwarded_commands_are_bad(msg: &Message) -> bool {
    match &msg.body {
        MessageBody::Propose { commands, .. } => commands
            .iter()
            .any(|c| c.is_empty() || Command::decode(c.clone()).is_err()),
        _ => false,
    }
}

/// Answers every write of a batch that was not proposed with `err`.
fn refuse_all(writes: &mut Vec<(RequestOp, WriteReply, Instant)>, err: RequestError) {
    for (_, reply, _) in writes.drain(..) {
        let _ = reply.send(Err(err.clone()));
    }
}

fn propose_error(e: skiff_raft::ProposeError) -> RequestError {
    match e {
        skiff_raft::ProposeError::NotLeader { leader_hint } => RequestError::NotLeader {
            leader: leader_hint,
        },
        skiff_raft::ProposeError::Backpressure { .. } => RequestError::Busy(e.to_string()),
        other => RequestError::Unavailable(other.to_string()),
    }
}

fn lost() -> RequestError {
    RequestError::Unavailable(
        "the proposal was dropped by a leadership change and not applied; retry".into(),
    )
}

fn set_header(r: &mut ResponseOp, header: Option<ResponseHeader>) {
    use crate::pb::etcdserverpb::response_op::Response;
    match &mut r.response {
        Some(Response::ResponsePut(p)) => p.header = header,
        Some(Response::ResponseDeleteRange(p)) => p.header = header,
        Some(Response::ResponseTxn(p)) => p.header = header,
        Some(Response::ResponseRange(p)) => p.header = header,
        None => {}
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let good = Command {
            request_id: 7,
            op: RequestOp::default(),
        }
        .encode();
        assert!(!forwarded_commands_are_bad(&propose(vec![good.clone()])));
        for bad in [
            Bytes::new(),
            Bytes::from_static(&[0xFE, 1, 2]),
            good.slice(..good.len() / 2),
        ] {
            assert!(
                forwarded_commands_are_bad(&propose(vec![good.clone(), bad.clone()])),
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
        assert!(!forwarded_commands_are_bad(&heartbeat));
    }
}
