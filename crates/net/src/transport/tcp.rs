//! [`TcpTransport`]: the handle, the state its tasks share, and the task
//! set that shutdown stops.
//!
//! Tasks: one accept loop ([`super::inbound`]), one reader per inbound
//! connection, and one task per peer that connects, writes and reconnects
//! ([`super::outbound`]). Messages flow one way on each connection: a node
//! writes to a peer on the connection it opened and reads from the
//! connections its peers opened, so no reader ever waits on a writer.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;

use crate::addr::PeerAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use skiff_raft::{Message, NodeId};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::config::{check_peer_id, TcpConfig, TransportConfigError};
use super::metrics::{add, inc, Counters, TransportMetrics};
use super::{inbound, outbound, Inbox, SendError, Transport};
use crate::codec::{encode_raft_frame_sized, message_encoded_len, RAFT_BODY_PREFIX_LEN};
use crate::frame::{FrameEncoder, FRAME_HEADER_LEN};

/// Pending connections the kernel queues for the accept loop.
const LISTEN_BACKLOG: u32 = 1024;

/// Why [`TcpTransport::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] TransportConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// [`TcpTransport::shutdown`] ran out of time: `tasks_aborted` tasks were
/// still running and were aborted (their connections are closed all the
/// same).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shutdown timed out after {timeout:?}: {tasks_aborted} tasks aborted")]
pub struct ShutdownError {
    pub timeout: Duration,
    pub tasks_aborted: usize,
}

/// The Raft transport over TCP.
///
/// One long-lived outbound connection per peer, opened with a
/// [`crate::Hello`] on [`crate::Channel::Raft`] and answered by one; a
/// writer task per peer drains the peer's bounded queue and coalesces what
/// it finds into one frame per write (up to `coalesce_bytes_max`), never
/// waiting for responses; broken connections are reopened with exponential
/// backoff, and while a peer is not connected sends to it are refused as
/// [`SendError::Disconnected`]. Inbound connections are checked (cluster,
/// addressee, channel) and read into the shared [`Inbox`]; any malformed
/// byte closes only that connection. See [`TcpConfig`] for every bound and
/// timeout.
///
/// Create it inside a tokio runtime; its tasks run on that runtime. `send`
/// may be called from any thread. Dropping it stops every task (abruptly);
/// [`TcpTransport::shutdown`] stops them in order, with a timeout.
#[derive(Debug)]
pub struct TcpTransport {
    shared: Arc<Shared>,
    /// The tasks. Only the handle holds it strongly, so that dropping the
    /// handle aborts them; tasks hold a [`Spawner`] (a weak reference).
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

/// What the handle and the tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: TcpConfig,
    pub(crate) local_addr: SocketAddr,
    pub(crate) counters: Arc<Counters>,
    pub(crate) shutting_down: AtomicBool,
    /// Becomes `true` once, at shutdown; every task watches it.
    pub(crate) shutdown: watch::Sender<bool>,
    peers: RwLock<BTreeMap<NodeId, Arc<PeerSlot>>>,
    /// The inbox's sender; readers clone it. Taken at shutdown, so that the
    /// inbox reports the end once the last reader is gone.
    inbox_tx: Mutex<Option<mpsc::Sender<Message>>>,
    /// The current inbound connection of each peer, to close when the peer
    /// opens a newer one (it does so only once it gave the old one up).
    inbound: Mutex<HashMap<NodeId, (u64, watch::Sender<bool>)>>,
    next_conn_id: AtomicU64,
    /// Inbound connections open (`inbound_connections_max` permits).
    pub(crate) conn_slots: Arc<Semaphore>,
    pub(crate) spawner: Spawner,
}

/// One peer as `send` sees it; its task owns the queue's receiving end.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    pub(crate) id: NodeId,
    pub(crate) addr: PeerAddr,
    pub(crate) queue: mpsc::Sender<Queued>,
    /// Whether a handshaken connection is up; sends are refused otherwise.
    connected: AtomicBool,
    /// What decides between writing a batch at once from the sending thread
    /// and queueing it for the writer task; see [`Direct`].
    direct: Mutex<Direct>,
    state_changed: Notify,
    /// Becomes `true` when the peer is removed or the transport shuts down.
    stop: watch::Sender<bool>,
}

/// What the writer task takes from a peer's queue.
#[derive(Debug)]
pub(crate) enum Queued {
    /// A message with its encoded length (computed once, by `send`).
    Msg { msg: Message, len: usize },
    /// Write [`Direct::rest`], the end of a frame a direct write left
    /// half-written, before anything else.
    Flush,
}

/// The direct path of one peer. [`Transport::send_batch`] writes a batch
/// for an idle link to the socket from the calling thread, as one frame,
/// instead of waking the writer task for it: one thread wakeup fewer on
/// every round trip of a lightly loaded cluster. Order and exclusion: a
/// direct write happens under this lock and only while the writer has
/// nothing to do (`queued == 0`, not busy, no `rest`); the writer counts
/// what it takes off `queued` only once written, so anything queued before
/// goes out before anything written directly, and what is queued after a
/// direct write goes out after it.
#[derive(Debug, Default)]
pub(crate) struct Direct {
    /// The connection's write side, while the writer task runs one.
    pub(crate) wr: Option<Arc<OwnedWriteHalf>>,
    /// Items in the queue or taken by the writer and not yet written.
    pub(crate) queued: usize,
    /// The writer is writing something of its own (a keepalive).
    pub(crate) writer_busy: bool,
    /// The unwritten end of a frame a direct write left half-written (the
    /// socket buffer was full); a [`Queued::Flush`] tells the writer.
    pub(crate) rest: Option<Bytes>,
    /// Where direct frames are encoded.
    buf: BytesMut,
}

impl Direct {
    fn idle(&self) -> bool {
        self.wr.is_some() && self.queued == 0 && !self.writer_busy && self.rest.is_none()
    }

    /// Forgets the connection (it ended, or a new one starts).
    pub(crate) fn reset(&mut self, wr: Option<Arc<OwnedWriteHalf>>) {
        self.wr = wr;
        self.queued = 0;
        self.writer_busy = false;
        self.rest = None;
        if self.buf.capacity() > DIRECT_BUF_KEEP_MAX {
            self.buf = BytesMut::new();
        }
    }
}

/// A direct-write buffer grown past this is released when its connection
/// ends.
const DIRECT_BUF_KEEP_MAX: usize = 1 << 20;

impl PeerSlot {
    pub(crate) fn direct(&self) -> MutexGuard<'_, Direct> {
        self.direct.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.state_changed.notify_waiters();
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

/// Spawns tasks into the transport's set, as long as the transport exists
/// and is not shutting down.
#[derive(Debug, Clone)]
pub(crate) struct Spawner {
    tasks: Weak<Mutex<Option<JoinSet<()>>>>,
    runtime: Handle,
    counters: Weak<Counters>,
}

impl Spawner {
    /// Spawns `task`; drops it instead once shutdown has begun.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let Some(tasks) = self.tasks.upgrade() else {
            return;
        };
        let mut tasks = lock(&tasks);
        if let Some(set) = tasks.as_mut() {
            // Reap finished tasks so that the set stays as small as the
            // tasks running (connections come and go).
            while let Some(done) = set.try_join_next() {
                self.reaped(done);
            }
            set.spawn_on(task, &self.runtime);
        }
    }

    /// Counts and logs a task that panicked (tokio catches the panic, so
    /// it would otherwise go unseen).
    fn reaped(&self, done: Result<(), tokio::task::JoinError>) {
        if let Err(e) = done {
            if e.is_panic() {
                if let Some(counters) = self.counters.upgrade() {
                    inc(&counters.task_panics);
                }
                tracing::error!(error = %e, "a transport task panicked");
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves
/// the data consistent at each step.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TcpTransport {
    /// Validates `cfg`, listens on `cfg.listen_addr`, and starts connecting
    /// to every peer. Returns the transport and the inbox of received
    /// messages.
    pub async fn start(cfg: TcpConfig) -> Result<(TcpTransport, Inbox), StartError> {
        cfg.validate()?;
        let listener = listen(cfg.listen_addr).map_err(|source| StartError::Bind {
            addr: cfg.listen_addr,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.listen_addr,
            source,
        })?;
        let (inbox_tx, inbox) = Inbox::channel(cfg.inbox_max);
        let tasks = Arc::new(Mutex::new(Some(JoinSet::new())));
        let counters = Arc::new(Counters::default());
        let spawner = Spawner {
            tasks: Arc::downgrade(&tasks),
            runtime: Handle::current(),
            counters: Arc::downgrade(&counters),
        };
        let peers = cfg.peers.clone();
        let shared = Arc::new(Shared {
            local_addr,
            counters,
            shutting_down: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            peers: RwLock::new(BTreeMap::new()),
            inbox_tx: Mutex::new(Some(inbox_tx)),
            inbound: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            conn_slots: Arc::new(Semaphore::new(cfg.inbound_connections_max)),
            spawner,
            cfg,
        });
        tracing::info!(
            node = shared.cfg.id,
            cluster_id = shared.cfg.cluster_id,
            %local_addr,
            peers = peers.len(),
            "raft transport listening"
        );
        shared.spawner.spawn(inbound::accept_loop(
            Arc::clone(&shared),
            listener,
            shared.shutdown.subscribe(),
        ));
        let transport = TcpTransport { shared, tasks };
        for (id, addr) in peers {
            transport.add_peer(id, addr)?;
        }
        Ok((transport, inbox))
    }

    /// The address the transport listens on (the port picked, when
    /// `listen_addr` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    pub fn config(&self) -> &TcpConfig {
        &self.shared.cfg
    }

    /// Starts keeping a connection to peer `id` at `addr`. A peer already
    /// known is readdressed: its old connection and queued messages are
    /// dropped.
    pub fn add_peer(
        &self,
        id: NodeId,
        addr: impl Into<PeerAddr>,
    ) -> Result<(), TransportConfigError> {
        let addr = addr.into();
        check_peer_id(self.shared.cfg.id, id)?;
        let (tx, rx) = mpsc::channel(self.shared.cfg.send_queue_max);
        let (stop, stop_rx) = watch::channel(false);
        let slot = Arc::new(PeerSlot {
            id,
            addr,
            queue: tx,
            connected: AtomicBool::new(false),
            direct: Mutex::new(Direct::default()),
            state_changed: Notify::new(),
            stop,
        });
        {
            let mut peers = self.shared.peers_write();
            // Checked under the lock that shutdown takes to stop peers, so
            // that no peer starts after shutdown stopped the others.
            if self.shared.shutting_down.load(Ordering::Acquire) {
                return Ok(());
            }
            if let Some(old) = peers.insert(id, Arc::clone(&slot)) {
                old.stop.send_replace(true);
            }
        }
        self.shared.spawner.spawn(outbound::run_peer(
            Arc::clone(&self.shared),
            slot,
            rx,
            stop_rx,
        ));
        Ok(())
    }

    /// Stops sending to peer `id` and closes its connection (messages still
    /// queued are dropped). Returns whether it was a peer.
    pub fn remove_peer(&self, id: NodeId) -> bool {
        let removed = self.shared.peers_write().remove(&id);
        match removed {
            Some(slot) => {
                slot.stop.send_replace(true);
                true
            }
            None => false,
        }
    }

    /// The peers and their addresses.
    pub fn peers(&self) -> Vec<(NodeId, PeerAddr)> {
        self.shared
            .peers_read()
            .values()
            .map(|p| (p.id, p.addr.clone()))
            .collect()
    }

    /// The address of peer `id`, if it is one.
    pub fn peer_addr(&self, id: NodeId) -> Option<PeerAddr> {
        self.shared.peer_addr(id)
    }

    /// Whether a connection to `peer` is up (sends are accepted).
    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.shared.peer(peer).is_some_and(|p| p.is_connected())
    }

    /// Waits until a connection to `peer` is up, at most `timeout`; returns
    /// whether it is.
    pub async fn wait_connected(&self, peer: NodeId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Re-read the slot each round: the peer may be readdressed.
            let Some(slot) = self.shared.peer(peer) else {
                return false;
            };
            let changed = slot.state_changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that a change between the
            // check and the wait is not missed.
            changed.as_mut().enable();
            if slot.is_connected() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return slot.is_connected();
            }
        }
    }

    /// The counters, totals since start.
    pub fn metrics(&self) -> TransportMetrics {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, closes every connection, and waits for every task
    /// to end, at most `timeout`; tasks still running then are aborted.
    /// Sends fail with [`SendError::ShutDown`] from the start of the call;
    /// the inbox ends (`recv` gives `None`) once the messages it holds are
    /// taken. Calling it again does nothing.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownError> {
        self.shared.begin_shutdown();
        let set = lock(&self.tasks).take();
        let Some(mut set) = set else {
            return Ok(());
        };
        let spawner = &self.shared.spawner;
        let joined = tokio::time::timeout(timeout, async {
            while let Some(done) = set.join_next().await {
                spawner.reaped(done);
            }
        })
        .await;
        // The readers held the inbox's other senders; all are gone now.
        lock(&self.shared.inbox_tx).take();
        match joined {
            Ok(()) => {
                tracing::info!(node = self.shared.cfg.id, "raft transport shut down");
                Ok(())
            }
            Err(_) => {
                let tasks_aborted = set.len();
                set.abort_all();
                while set.join_next().await.is_some() {}
                tracing::warn!(
                    node = self.shared.cfg.id,
                    tasks_aborted,
                    ?timeout,
                    "raft transport shutdown timed out; tasks aborted"
                );
                Err(ShutdownError {
                    timeout,
                    tasks_aborted,
                })
            }
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // The task set goes with `self.tasks` (aborting what runs); the
        // signal lets tasks that are between polls end on their own.
        self.shared.begin_shutdown();
    }
}

impl Transport for TcpTransport {
    fn local_id(&self) -> NodeId {
        self.shared.cfg.id
    }

    fn set_peers(&self, peers: &std::collections::BTreeMap<NodeId, PeerAddr>) {
        let current: std::collections::BTreeMap<NodeId, PeerAddr> =
            self.peers().into_iter().collect();
        for id in current.keys() {
            if !peers.contains_key(id) {
                self.remove_peer(*id);
            }
        }
        for (&id, addr) in peers {
            if id != self.shared.cfg.id && current.get(&id) != Some(addr) {
                if let Err(error) = self.add_peer(id, addr.clone()) {
                    tracing::warn!(node = self.shared.cfg.id, peer = id, %error, "peer not added");
                }
            }
        }
    }

    fn send(&self, msg: Message) -> Result<(), SendError> {
        let peer = msg.to;
        let slot = self.slot_for(peer)?;
        let len = self.check_len(&msg)?;
        let mut direct = slot.direct();
        self.enqueue(&slot, &mut direct, msg, len)
    }

    /// Each peer's messages as one frame: written at once from this thread
    /// when the peer's link is idle, queued (each like [`Transport::send`])
    /// otherwise.
    fn send_batch(&self, msgs: Vec<Message>) -> Vec<SendError> {
        let mut errors = Vec::new();
        // Per peer, in the order peers first appear; each peer's messages
        // keep their order. A pass of the event loop sends to few peers.
        let mut groups: Vec<(NodeId, Vec<Message>)> = Vec::new();
        for msg in msgs {
            match groups.iter_mut().find(|(peer, _)| *peer == msg.to) {
                Some((_, group)) => group.push(msg),
                None => groups.push((msg.to, vec![msg])),
            }
        }
        for (peer, group) in groups {
            self.send_group(peer, group, &mut errors);
        }
        errors
    }
}

impl TcpTransport {
    fn slot_for(&self, peer: NodeId) -> Result<Arc<PeerSlot>, SendError> {
        let shared = &*self.shared;
        if shared.shutting_down.load(Ordering::Acquire) {
            return Err(SendError::ShutDown { peer });
        }
        shared.peer(peer).ok_or(SendError::UnknownPeer { peer })
    }

    /// The message's encoded length, if it fits a frame.
    fn check_len(&self, msg: &Message) -> Result<usize, SendError> {
        let len = message_encoded_len(msg);
        let frame_bytes_max = self.shared.cfg.frame_bytes_max;
        if FRAME_HEADER_LEN + RAFT_BODY_PREFIX_LEN + len > frame_bytes_max {
            return Err(SendError::TooLarge {
                peer: msg.to,
                len,
                frame_bytes_max,
            });
        }
        Ok(len)
    }

    /// Queues one message for the writer task (under the slot's direct
    /// lock, which keeps `queued` exact).
    fn enqueue(
        &self,
        slot: &PeerSlot,
        direct: &mut Direct,
        msg: Message,
        len: usize,
    ) -> Result<(), SendError> {
        let shared = &*self.shared;
        let peer = msg.to;
        if !slot.is_connected() {
            inc(&shared.counters.sends_disconnected);
            return Err(SendError::Disconnected { peer });
        }
        match slot.queue.try_send(Queued::Msg { msg, len }) {
            Ok(()) => {
                direct.queued += 1;
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&shared.counters.sends_queue_full);
                Err(SendError::QueueFull {
                    peer,
                    send_queue_max: shared.cfg.send_queue_max,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inc(&shared.counters.sends_disconnected);
                Err(SendError::Disconnected { peer })
            }
        }
    }

    fn send_group(&self, peer: NodeId, group: Vec<Message>, errors: &mut Vec<SendError>) {
        let slot = match self.slot_for(peer) {
            Ok(slot) => slot,
            Err(e) => {
                errors.extend(std::iter::repeat_n(e, group.len()));
                return;
            }
        };
        let mut msgs = Vec::with_capacity(group.len());
        let mut lens = Vec::with_capacity(group.len());
        for msg in group {
            match self.check_len(&msg) {
                Ok(len) => {
                    msgs.push(msg);
                    lens.push(len);
                }
                Err(e) => errors.push(e),
            }
        }
        let mut direct = slot.direct();
        if slot.is_connected()
            && direct.idle()
            && self.write_direct(&slot, &mut direct, &msgs, &lens)
        {
            return;
        }
        for (msg, len) in msgs.into_iter().zip(lens) {
            if let Err(e) = self.enqueue(&slot, &mut direct, msg, len) {
                errors.push(e);
            }
        }
    }

    /// Writes `msgs` as one frame to the idle link now; `false` if nothing
    /// was written (the socket takes no bytes, the batch is over the
    /// coalescing bound, or the write failed: the writer meets the error).
    fn write_direct(
        &self,
        slot: &PeerSlot,
        direct: &mut Direct,
        msgs: &[Message],
        lens: &[usize],
    ) -> bool {
        let shared = &*self.shared;
        let body_len = RAFT_BODY_PREFIX_LEN + lens.iter().sum::<usize>();
        if msgs.is_empty() || body_len > shared.cfg.coalesce_bytes_max {
            return false;
        }
        let Some(wr) = direct.wr.clone() else {
            return false;
        };
        let enc = FrameEncoder::new(shared.cfg.frame_bytes_max);
        let mut buf = std::mem::take(&mut direct.buf);
        buf.clear();
        let written = encode_raft_frame_sized(&enc, msgs, body_len, &mut buf)
            .ok()
            .and_then(|_| wr.try_write(&buf).ok());
        // Some(true): the frame is on its way; Some(false): half of it went
        // to a link whose writer is gone (lost); None: nothing was written.
        let outcome = match written {
            None | Some(0) => None,
            Some(n) if n == buf.len() => Some(true),
            // The socket buffer filled mid-frame: the writer sends the rest
            // before anything else.
            Some(n) if slot.queue.try_send(Queued::Flush).is_ok() => {
                direct.rest = Some(Bytes::copy_from_slice(&buf[n..]));
                direct.queued += 1;
                inc(&shared.counters.frames_sent_direct_partial);
                Some(true)
            }
            // Only if the writer task is gone (an idle link's queue is
            // empty): the link is dead, the frame lost.
            Some(_) => {
                add(
                    &shared.counters.messages_dropped_on_disconnect,
                    msgs.len() as u64,
                );
                Some(false)
            }
        };
        if outcome == Some(true) {
            add(&shared.counters.messages_sent, msgs.len() as u64);
            inc(&shared.counters.frames_sent);
            inc(&shared.counters.frames_sent_direct);
            add(&shared.counters.bytes_sent, buf.len() as u64);
        }
        direct.buf = buf;
        outcome.is_some()
    }
}

impl Shared {
    fn peers_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<NodeId, Arc<PeerSlot>>> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn peers_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<NodeId, Arc<PeerSlot>>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn peer(&self, id: NodeId) -> Option<Arc<PeerSlot>> {
        self.peers_read().get(&id).cloned()
    }

    /// Refuses sends from now on and tells every task to stop.
    fn begin_shutdown(&self) {
        {
            let peers = self.peers_write();
            self.shutting_down.store(true, Ordering::Release);
            for slot in peers.values() {
                slot.stop.send_replace(true);
            }
        }
        self.shutdown.send_replace(true);
    }

    /// The peer address of member `id`, if it is a peer.
    pub(crate) fn peer_addr(&self, id: NodeId) -> Option<PeerAddr> {
        self.peers_read().get(&id).map(|slot| slot.addr.clone())
    }

    /// A sender into the inbox, for a new reader; `None` once shut down.
    pub(crate) fn inbox_sender(&self) -> Option<mpsc::Sender<Message>> {
        lock(&self.inbox_tx).clone()
    }

    /// Records `peer`'s new inbound connection and closes the one it
    /// replaces. Returns the connection's id and the signal that it was
    /// replaced in turn.
    pub(crate) fn register_inbound(&self, peer: NodeId) -> (u64, watch::Receiver<bool>) {
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        if let Some((old_id, old)) = lock(&self.inbound).insert(peer, (conn_id, tx)) {
            tracing::debug!(
                node = self.cfg.id,
                peer_id = peer,
                old_conn = old_id,
                "peer opened a new connection; closing its previous one"
            );
            old.send_replace(true);
        }
        (conn_id, rx)
    }

    /// Forgets `peer`'s inbound connection `conn_id` unless a newer one
    /// replaced it already.
    pub(crate) fn unregister_inbound(&self, peer: NodeId, conn_id: u64) {
        let mut inbound = lock(&self.inbound);
        if inbound.get(&peer).is_some_and(|(id, _)| *id == conn_id) {
            inbound.remove(&peer);
        }
    }
}

/// Binds a listener that can rebind its port at once after a restart
/// (`SO_REUSEADDR`: connections of the previous process may still linger
/// in TIME_WAIT).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves when `stop` becomes `true` (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
