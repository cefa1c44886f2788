//! A running node: its threads, its runtime and the handle clients use.
//!
//! Threads: the event loop (owns Raft and the state machine; the WAL's
//! driver wakes it when writes become durable), the snapshot thread
//! (writes snapshot files, compacts the WAL, drops replaced states), and a
//! small tokio runtime for the transport, the inbox pump (a task moving
//! Raft messages from the transport to the loop, and starting snapshot
//! fetches, which restore the fetched state on a thread of their own at
//! the background priority), the
//! snapshot server, the metrics endpoint and whatever the embedding
//! service runs on it (its client API: [`Node::runtime`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_net::tls::PeerTls;
use skiff_net::{
    fetch_snapshot, Channel, FetchOptions, Hello, Host, Inbox, PeerAddr, ServerOptions,
    SnapshotFiles, SnapshotServer, TcpConfig, TcpTransport,
};
use skiff_raft::{Message, MessageBody, NodeId, Raft, Role};
use skiff_wal::Wal;

use crate::config::{ConfigError, NodeConfig};
use crate::event_loop::{
    file_crc, EventLoop, Input, LoopParts, RequestError, Shared, SnapshotOffer, SnapshotWorker,
    INPUTS_MAX, MESSAGES_PER_INPUT_MAX,
};
use crate::queue::{InputQueue, QueueSender, SendTimeoutError, TrySendError};
use crate::state_machine::StateMachine;
use crate::storage;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Creating or fsyncing a directory of the data directory.
    #[error("data directory: {0}")]
    Dir(#[from] storage::DirError),
    #[error("WAL in {path}: {source}")]
    Wal {
        path: PathBuf,
        source: skiff_wal::Error,
    },
    #[error("recovery: {0}")]
    Recovery(#[from] storage::StorageError),
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {addr} ({what}): {reason}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Removed(String),
    #[error("cluster id: {0}")]
    ClusterId(String),
}

/// The file in the data directory that records the cluster id.
pub const CLUSTER_ID_FILE: &str = "cluster_id";

/// The cluster id recorded in `data_dir`, recording `configured` (the
/// configured or derived id) on first start. A configured id
/// (`explicit`) that differs from the recorded one is an error.
fn cluster_id_of(
    data_dir: &std::path::Path,
    configured: u64,
    explicit: bool,
) -> Result<u64, StartError> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded = crate::config::parse_id(text.trim()).map_err(|e| {
                StartError::ClusterId(format!("{} is corrupt: {e}", path.display()))
            })?;
            if explicit && recorded != configured {
                return Err(StartError::ClusterId(format!(
                    "configured {configured:#x}, but this data directory belongs to cluster \
                     {recorded:#x}"
                )));
            }
            Ok(recorded)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let io = |source| StartError::DataDir {
                path: path.clone(),
                source,
            };
            let tmp = data_dir.join(format!("{CLUSTER_ID_FILE}.tmp"));
            let f = std::fs::File::create(&tmp).map_err(io)?;
            std::io::Write::write_all(&mut &f, format!("{configured:#x}\n").as_bytes())
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            storage::sync_dir(data_dir)?;
            Ok(configured)
        }
        Err(source) => Err(StartError::DataDir { path, source }),
    }
}

/// Status of this member, as `Maintenance.Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit: u64,
    pub applied: u64,
}

/// What a service needs of a running node: propose commands, query the
/// state, read the node's status. Cheap to clone; usable from any thread
/// or task.
pub struct NodeHandle<S: StateMachine> {
    pub(crate) inputs: QueueSender<Input<S>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) cluster_id: u64,
}

impl<S: StateMachine> Clone for NodeHandle<S> {
    fn clone(&self) -> Self {
        NodeHandle {
            inputs: self.inputs.clone(),
            shared: self.shared.clone(),
            cfg: self.cfg.clone(),
            cluster_id: self.cluster_id,
        }
    }
}

impl<S: StateMachine> NodeHandle<S> {
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn status(&self) -> NodeStatus {
        let s = &self.shared;
        NodeStatus {
            id: self.cfg.id,
            role: s.role(),
            term: s.term.load(Ordering::Acquire),
            leader: s.leader(),
            commit: s.commit.load(Ordering::Acquire),
            applied: s.applied.load(Ordering::Acquire),
        }
    }

    pub fn membership(&self) -> skiff_raft::Membership {
        self.shared
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The data directory's filesystem has less free space than
    /// `space_reserve_bytes` (looked at every `SPACE_CHECK_INTERVAL`): a service should
    /// refuse writes that grow its state until it has more.
    pub fn space_low(&self) -> bool {
        self.shared.space_low.load(Ordering::Acquire)
    }

    /// Why the node stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        if !self.shared.stopped.load(Ordering::Acquire) {
            return None;
        }
        let fatal = self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner());
        Some(fatal.clone().unwrap_or_else(|| "shut down".into()))
    }

    fn submit(&self, input: Input<S>) -> Result<(), RequestError> {
        match self.inputs.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(RequestError::Busy(format!(
                "the node's input queue is full ({INPUTS_MAX})"
            ))),
            Err(TrySendError::Closed(_)) => Err(RequestError::Stopped(
                self.stopped().unwrap_or_else(|| "stopped".into()),
            )),
        }
    }

    async fn wait<T>(
        &self,
        rx: tokio::sync::oneshot::Receiver<Result<T, RequestError>>,
    ) -> Result<T, RequestError> {
        match tokio::time::timeout(self.cfg.request_timeout(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Stopped(
                self.stopped().unwrap_or_else(|| "stopped".into()),
            )),
            Err(_) => Err(RequestError::Unavailable(format!(
                "no answer within request_timeout_ms = {}",
                self.cfg.request_timeout_ms
            ))),
        }
    }

    /// Proposes `cmd` through Raft (a follower forwards it to the leader)
    /// and waits, at most `request_timeout_ms`, until this member applied
    /// it; returns the state machine's response.
    pub async fn propose(&self, cmd: S::Command) -> Result<S::Response, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Write {
            cmd,
            reply,
            accepted: Instant::now(),
        })?;
        self.wait(rx).await
    }

    /// Serves `query` from this member's state: linearizable (after a
    /// ReadIndex round, once this member applied through the read index)
    /// when asked, else at once from what it applied (serializable).
    pub async fn query(
        &self,
        query: S::Query,
        linearizable: bool,
    ) -> Result<S::QueryResponse, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Query {
            query,
            linearizable,
            reply,
        })?;
        self.wait(rx).await
    }

    /// Prometheus text of the node's metrics.
    pub async fn metrics_text(&self) -> Result<String, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Metrics(reply))?;
        let sample = match tokio::time::timeout(self.cfg.request_timeout(), rx).await {
            Ok(Ok(sample)) => sample,
            _ => return Err(RequestError::Unavailable("metrics not rendered".into())),
        };
        // Rendered here, off the loop, on a blocking thread (a millisecond
        // or so of quantile walks).
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || sample.render(&shared.metrics_book))
            .await
            .map_err(|e| RequestError::Unavailable(format!("metrics not rendered: {e}")))
    }

    /// The client address of `id`, when configured.
    pub fn client_addr(&self, id: NodeId) -> Option<PeerAddr> {
        if id == self.cfg.id {
            return Some(self.cfg.listen_client.into());
        }
        crate::members::client_addr(&self.membership(), &self.cfg, id)
    }

    /// What is known of member `id` (its meta, else the configuration).
    pub fn member_info(&self, id: NodeId) -> crate::members::MemberInfo {
        crate::members::member_info(&self.membership(), &self.cfg, id)
    }

    /// Proposes a membership change on this member, which must lead (a
    /// follower answers `NotLeader`), setting the meta of the member the
    /// change names when given (see `Raft::propose_membership_with`).
    /// Answers with the new membership once this member applied it.
    pub async fn change_membership(
        &self,
        change: skiff_raft::MembershipChange,
        info: Option<&crate::members::MemberInfo>,
    ) -> Result<skiff_raft::Membership, RequestError> {
        if let Some(info) = info {
            info.validate().map_err(RequestError::Invalid)?;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::ChangeMembership {
            change,
            meta: info.map(crate::members::MemberInfo::encode),
            reply,
        })?;
        self.wait(rx).await
    }

    /// Hands leadership from this member (which must lead) to `target`,
    /// or to the most caught-up voter; answers with the new leader once it
    /// leads.
    pub async fn transfer_leadership(
        &self,
        target: Option<NodeId>,
    ) -> Result<NodeId, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::TransferLeadership { target, reply })?;
        self.wait(rx).await
    }
}

/// A running node. Dropping it shuts it down.
pub struct Node<S: StateMachine> {
    handle: NodeHandle<S>,
    runtime: Option<tokio::runtime::Runtime>,
    transport: Arc<TcpTransport>,
    loop_thread: Option<JoinHandle<Result<(), String>>>,
    metrics_addr: Option<SocketAddr>,
    _snapshot_server: SnapshotServer,
    /// Run by `shutdown` before the loop stops (the service's API first).
    on_shutdown: Vec<Box<dyn FnOnce() + Send>>,
}

impl<S: StateMachine> Node<S> {
    /// Opens the data directory, recovers (the state machine from the
    /// latest snapshot, or `initial` when there is none, then the log from
    /// the WAL), joins the cluster and starts the loop. `initial` is the
    /// state of a member that never applied anything; a snapshot found is
    /// installed into it ([`StateMachine::install`]).
    pub fn start(cfg: NodeConfig, initial: S) -> Result<Node<S>, StartError> {
        cfg.validate()?;
        // Read before anything is opened: a bad file stops the start here.
        let peer_tls = match cfg.peer_tls_files()? {
            None => None,
            Some(files) => Some(PeerTls::from_files(&files).map_err(|e| {
                StartError::Config(ConfigError {
                    field: "peer_cert_file".into(),
                    reason: e.to_string(),
                })
            })?),
        };
        let data_dir = cfg.data_dir.clone();
        let wal_dir = data_dir.join("wal");
        let snap_dir = data_dir.join("snap");
        // Durably: a WAL segment or snapshot file fsynced inside a
        // directory whose own entry was lost would be lost with it.
        for dir in [&data_dir, &wal_dir, &snap_dir] {
            storage::create_dir_durable(dir)?;
        }
        if let Some(why) = crate::members::removed(&data_dir) {
            return Err(StartError::Removed(why));
        }
        let cluster_id = cluster_id_of(&data_dir, cfg.cluster_id(), cfg.cluster_id != 0)?;
        let wal = Wal::open(&wal_dir, cfg.wal_options()).map_err(|source| StartError::Wal {
            path: wal_dir.clone(),
            source,
        })?;
        tracing::info!(backend = ?wal.backend(), dir = %wal_dir.display(), "WAL open");
        let recovered = storage::recover(&wal, &snap_dir)?;
        let recorded = recovered.snapshot.as_ref().map(|(index, _, _)| *index);
        let unrecorded = storage::remove_unrecorded_snapshots(&snap_dir, recorded);
        if unrecorded > 0 {
            tracing::info!(
                files = unrecorded,
                "removed snapshot files newer than the one the WAL records (never told to the core)"
            );
        }
        let wal = Arc::new(wal);
        let (sm, applied, snapshot) = match &recovered.snapshot {
            Some((index, term, path)) => {
                let started = Instant::now();
                let snapshot_error = |reason: String| StartError::Snapshot {
                    path: path.clone(),
                    reason,
                };
                let (sm, len) = restore_file::<S>(path).map_err(snapshot_error)?;
                let crc = file_crc(path).map_err(|e| snapshot_error(e.to_string()))?;
                tracing::info!(
                    index,
                    bytes = len,
                    ms = started.elapsed().as_millis() as u64,
                    "state restored from snapshot"
                );
                let mut initial = initial;
                drop(initial.install(sm));
                (
                    initial,
                    *index,
                    Some((*index, *term, path.clone(), len, crc)),
                )
            }
            None => (initial, 0, None),
        };
        tracing::info!(
            id = cfg.id,
            entries = recovered.restored.entries.len(),
            base = recovered.restored.base_index,
            term = recovered.restored.hard_state.term,
            "recovered"
        );
        let seed = cfg.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let raft = Raft::new(cfg.raft_config(), recovered.restored, seed)
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads)
            .thread_name(format!("skiff-{}-io", cfg.id))
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let mut tcp = TcpConfig::new(cluster_id, cfg.id, cfg.listen_peer);
        tcp.tls = peer_tls.clone();
        for (&id, addr) in &cfg.initial_cluster {
            if id != cfg.id {
                tcp = tcp.with_peer(id, addr.clone());
            }
        }
        let (transport, inbox) =
            runtime
                .block_on(TcpTransport::start(tcp))
                .map_err(|e| StartError::Listen {
                    what: "peer",
                    addr: cfg.listen_peer,
                    reason: e.to_string(),
                })?;
        let transport = Arc::new(transport);
        let snapshots = Arc::new(SnapshotFiles::new());
        let snapshot_server = runtime
            .block_on(async {
                let listener = tokio::net::TcpListener::bind(cfg.listen_snapshot)
                    .await
                    .map_err(|e| e.to_string())?;
                SnapshotServer::serve(
                    listener,
                    snapshots.clone(),
                    ServerOptions {
                        tls: peer_tls.clone(),
                        ..ServerOptions::new(cluster_id, cfg.id)
                    },
                )
                .map_err(|e| e.to_string())
            })
            .map_err(|reason| StartError::Listen {
                what: "snapshot",
                addr: cfg.listen_snapshot,
                reason,
            })?;
        let snapshot_addr = snapshot_server.local_addr();
        let snapshot = snapshot.map(|(index, term, path, len, crc)| {
            snapshots.insert(
                path,
                skiff_net::SnapshotMeta {
                    index,
                    term,
                    len,
                    crc,
                },
            );
            (
                index,
                term,
                SnapshotOffer {
                    len,
                    crc,
                    addr: snapshot_addr,
                },
            )
        });

        let (input_tx, input_rx) = InputQueue::new(INPUTS_MAX);
        let shared = Arc::new(Shared::default());
        let cfg = Arc::new(cfg);
        let handle = NodeHandle {
            inputs: input_tx.clone(),
            shared: shared.clone(),
            cfg: cfg.clone(),
            cluster_id,
        };
        {
            let pump = Pump::<S> {
                inbox,
                inputs: input_tx.clone(),
                rt: runtime.handle().clone(),
                cluster_id,
                id: cfg.id,
                snap_dir: snap_dir.clone(),
                fetch: FetchOptions {
                    streams: cfg.snapshot_streams,
                    chunk_bytes: cfg.snapshot_chunk_bytes,
                    local_ip: skiff_net::source_ip_for(cfg.listen_peer),
                    tls: peer_tls,
                    ..FetchOptions::default()
                },
                fetching: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
                peer_addr: {
                    let transport = transport.clone();
                    Arc::new(move |id| transport.peer_addr(id))
                },
                shared: shared.clone(),
                wait_max: PEER_MESSAGES_WAIT_MAX,
            };
            runtime.spawn(pump.run());
        }
        let worker = SnapshotWorker::start(
            format!("skiff-{}-snap", cfg.id),
            wal.clone(),
            snap_dir.clone(),
            input_tx.clone(),
        )
        .map_err(StartError::Runtime)?;
        let event_loop = EventLoop::new(
            (*cfg).clone(),
            raft,
            sm,
            applied,
            LoopParts {
                wal,
                transport: transport.clone(),
                inputs: input_rx,
                wake: input_tx,
                shared,
                snap_dir,
                snapshots,
                snapshot_addr,
                snapshot,
                worker,
            },
        );
        let loop_thread = std::thread::Builder::new()
            .name(format!("skiff-{}-loop", cfg.id))
            .spawn(move || event_loop.run())
            .map_err(StartError::Runtime)?;

        let metrics_addr = match cfg.listen_metrics {
            Some(addr) => Some(
                runtime
                    .block_on(crate::metrics::serve(handle.clone(), addr))
                    .map_err(|reason| StartError::Listen {
                        what: "metrics",
                        addr,
                        reason,
                    })?,
            ),
            None => None,
        };
        tracing::info!(
            id = cfg.id,
            peer = %transport.local_addr(),
            snapshot = %snapshot_addr,
            "node started"
        );
        Ok(Node {
            handle,
            runtime: Some(runtime),
            transport,
            loop_thread: Some(loop_thread),
            metrics_addr,
            _snapshot_server: snapshot_server,
            on_shutdown: Vec::new(),
        })
    }

    pub fn handle(&self) -> &NodeHandle<S> {
        &self.handle
    }

    /// The node's tokio runtime: a service runs its client API on it.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until shutdown")
            .handle()
    }

    /// Runs `f` first thing on shutdown (a service stopping its API).
    pub fn on_shutdown(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_shutdown.push(Box::new(f));
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Blocks until the node stops on its own (a fatal error) or `stop`
    /// returns true (checked every 100 ms); then shuts down.
    pub fn wait(mut self, stop: impl Fn() -> bool) -> Result<(), String> {
        while !stop() {
            if let Some(why) = self.handle.stopped() {
                let _ = self.shutdown_inner();
                return if why == "shut down" { Ok(()) } else { Err(why) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.hand_over_leadership();
        self.shutdown_inner()
    }

    /// A leader asked to stop first hands leadership to the most caught-up
    /// voter, so that a rolling restart loses no write to an election
    /// timeout. Bounded by two election timeouts; a failed hand-over is
    /// logged and the node stops anyway.
    pub fn hand_over_leadership(&self) {
        let h = &self.handle;
        if h.status().role != Role::Leader || h.membership().all_voters().len() < 2 {
            return;
        }
        let cfg = h.config();
        let limit = cfg.tick_interval() * cfg.election_ticks_max * 2;
        let started = Instant::now();
        let result = self
            .runtime()
            .block_on(async { tokio::time::timeout(limit, h.transfer_leadership(None)).await });
        match result {
            Ok(Ok(to)) => tracing::info!(
                to,
                ms = started.elapsed().as_millis() as u64,
                "leadership handed over before stopping"
            ),
            Ok(Err(error)) => tracing::warn!(%error, "leadership not handed over; stopping anyway"),
            Err(_) => tracing::warn!(
                ?limit,
                "leadership not handed over in time; stopping anyway"
            ),
        }
    }

    /// Stops serving, lets the loop finish its pass, stops every thread.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), String> {
        for f in self.on_shutdown.drain(..) {
            f();
        }
        let _ = self
            .handle
            .inputs
            .send_timeout(Input::Shutdown, Duration::from_secs(5));
        let result = match self.loop_thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err("event loop panicked".into())),
            None => Ok(()),
        };
        if let Some(rt) = self.runtime.take() {
            let transport = self.transport.clone();
            let _ = rt.block_on(transport.shutdown(Duration::from_secs(2)));
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        result
    }
}

impl<S: StateMachine> Drop for Node<S> {
    fn drop(&mut self) {
        if self.loop_thread.is_some() {
            let _ = self.shutdown_inner();
        }
    }
}

/// Restores a state machine from the snapshot file at `path`; returns it
/// and the file's length. Runs on the calling thread (never the loop).
fn restore_file<S: StateMachine>(path: &std::path::Path) -> Result<(S, u64), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file
        .metadata()
        .map(|m| m.len())
        .map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let sm = S::restore(&mut reader).map_err(|e| e.to_string())?;
    Ok((sm, len))
}

/// Longest the inbox pump waits for room in the loop's input queue for one
/// batch of peer messages; then it drops the batch and goes on with the
/// next. Above the default election timeout (300..600 ms): messages that
/// waited longer are stale (heartbeats and votes of a past round), and Raft
/// tolerates their loss (the leader resends from each follower's progress,
/// elections time out and retry). A queue full for this long means the loop
/// is far behind: shedding input beats giving up on the peers for good.
pub const PEER_MESSAGES_WAIT_MAX: Duration = Duration::from_secs(1);
/// The pump warns of dropped peer messages at most this often (with the
/// count since its last warning); `skiff_peer_messages_dropped_total`
/// counts every one.
pub const PEER_DROPS_WARN_EVERY: Duration = Duration::from_secs(10);

/// Moves messages from the transport to the loop; a snapshot offer is
/// fetched first (in parallel chunks), restored into a new state machine
/// on a thread of its own (nice `BACKGROUND_NICE`), and stepped once both
/// are done. A batch the loop's
/// queue does not take within `wait_max` is dropped and counted; the pump
/// stops only when the loop does (its queue closed) or the transport ends.
type PeerAddrOf = Arc<dyn Fn(NodeId) -> Option<PeerAddr> + Send + Sync>;

/// Where to fetch a snapshot that member `from` (at `peer`, its peer
/// address) offered from its snapshot port `offered`: at `offered` itself,
/// unless the member's peer address is a host name (the name is dialled,
/// so that TLS verifies the certificate by it, and resolved as the peer
/// connection's is) or the sender listens on a wildcard address (which
/// names no host to connect to): then at its peer host, on the offered
/// port.
fn snapshot_sender(offered: SocketAddr, peer: Option<PeerAddr>) -> PeerAddr {
    match peer {
        Some(p) if matches!(p.host(), Host::Name(_)) || offered.ip().is_unspecified() => {
            PeerAddr::new(p.host().clone(), offered.port())
        }
        _ => offered.into(),
    }
}

struct Pump<S: StateMachine> {
    inbox: Inbox,
    inputs: QueueSender<Input<S>>,
    rt: tokio::runtime::Handle,
    cluster_id: u64,
    id: NodeId,
    snap_dir: PathBuf,
    fetch: FetchOptions,
    /// Fetches under way, by (leader, index).
    fetching: Arc<std::sync::Mutex<BTreeMap<(NodeId, u64), ()>>>,
    /// The peer address of a member (the transport's).
    peer_addr: PeerAddrOf,
    /// Where dropped messages are counted (`peer_messages_dropped`).
    shared: Arc<Shared>,
    /// [`PEER_MESSAGES_WAIT_MAX`] (tests shorten it).
    wait_max: Duration,
}

/// The pump's rate-limited warning about dropped messages.
#[derive(Default)]
struct DropWarning {
    last: Option<Instant>,
    /// Dropped since the last warning.
    unreported: u64,
}

impl DropWarning {
    fn dropped(&mut self, n: u64, waited: Duration) {
        self.unreported += n;
        if self
            .last
            .is_some_and(|t| t.elapsed() < PEER_DROPS_WARN_EVERY)
        {
            return;
        }
        tracing::warn!(
            dropped = self.unreported,
            ?waited,
            "the loop's input queue stayed full: peer messages dropped (Raft resends what matters)"
        );
        self.last = Some(Instant::now());
        self.unreported = 0;
    }
}

impl<S: StateMachine> Pump<S> {
    /// A task on the node's runtime: the transport's reader tasks wake it
    /// on their own worker, so a message reaches the loop with one thread
    /// wakeup (the loop's).
    async fn run(mut self) {
        let mut received = Vec::with_capacity(MESSAGES_PER_INPUT_MAX);
        let mut warning = DropWarning::default();
        loop {
            received.clear();
            if self
                .inbox
                .recv_many(&mut received, MESSAGES_PER_INPUT_MAX)
                .await
                == 0
            {
                return;
            }
            let mut batch = Vec::with_capacity(received.len());
            for msg in received.drain(..) {
                self.take(msg, &mut batch);
            }
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            match send_input_within(&self.inputs, Input::Messages(batch), self.wait_max).await {
                Ok(()) => {}
                Err(SendTimeoutError::Closed(_)) => return,
                Err(SendTimeoutError::Timeout(_)) => {
                    self.shared
                        .peer_messages_dropped
                        .fetch_add(n, Ordering::Relaxed);
                    warning.dropped(n, self.wait_max);
                }
            }
        }
    }

    fn take(&self, msg: Message, batch: &mut Vec<Message>) {
        let MessageBody::InstallSnapshot {
            index,
            snapshot_term,
            data,
            ..
        } = &msg.body
        else {
            batch.push(msg);
            return;
        };
        let Some(offer) = SnapshotOffer::decode(data) else {
            tracing::warn!(from = msg.from, "malformed snapshot offer dropped");
            return;
        };
        let key = (msg.from, *index);
        {
            // One fetch from a leader at a time: an offer repeated while
            // its fetch and restore run (the leader offers again after
            // `snapshot_timeout_ticks`, its newest snapshot by then) would
            // only compete with it for the disk and the CPUs. Once it is
            // installed, the leader either catches this member up from its
            // log (which it keeps for it meanwhile) or offers again.
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&(_, under_way)) = fetching.keys().find(|(from, _)| *from == msg.from) {
                tracing::debug!(
                    from = msg.from,
                    index,
                    under_way,
                    "snapshot offer ignored: a fetch from this leader is under way"
                );
                return;
            }
            fetching.insert(key, ());
        }
        let meta = skiff_net::SnapshotMeta {
            index: *index,
            term: *snapshot_term,
            len: offer.len,
            crc: offer.crc,
        };
        let hello = Hello {
            cluster_id: self.cluster_id,
            from: self.id,
            to: msg.from,
            channel: Channel::Snapshot,
        };
        let sender = snapshot_sender(offer.addr, (self.peer_addr)(msg.from));
        let (dir, snap_dir, opts, inputs, fetching) = (
            self.snap_dir.join("incoming"),
            self.snap_dir.clone(),
            self.fetch.clone(),
            self.inputs.clone(),
            self.fetching.clone(),
        );
        tracing::info!(
            from = msg.from,
            index,
            bytes = offer.len,
            "fetching snapshot"
        );
        self.rt.spawn(async move {
            let result = async {
                let incoming = dir.clone();
                tokio::task::spawn_blocking(move || storage::create_dir_durable(&incoming))
                    .await
                    .map_err(|e| format!("create task: {e}"))?
                    .map_err(|e| e.to_string())?;
                let fetched = fetch_snapshot(sender, hello, meta, &dir, &opts)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    index = meta.index,
                    ms = fetched.stats.transfer.as_millis() as u64,
                    "snapshot fetched"
                );
                // Verify, restore and file it on a thread of its own, at
                // the background priority: work in proportion to the
                // state, kept off the loop and off the runtime's workers.
                let path = fetched.path;
                let (done, restored) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name(format!("skiff-{}-restore", meta.index))
                    .spawn(move || {
                        crate::event_loop::lower_thread_priority();
                        let _ = done.send(install_prepare::<S>(&path, &snap_dir, meta));
                    })
                    .map_err(|e| format!("restore thread: {e}"))?;
                restored
                    .await
                    .map_err(|_| "the restore thread ended without an answer".to_string())?
            }
            .await;
            match result {
                Ok((path, state)) => {
                    let input = Input::SnapshotFetched {
                        msg,
                        path,
                        len: meta.len,
                        crc: meta.crc,
                        state: Box::new(state),
                    };
                    if let Err(e) = send_input(&inputs, input).await {
                        tracing::warn!(error = %e, "fetched snapshot not handed over");
                    }
                }
                Err(e) => tracing::warn!(index = meta.index, error = %e, "snapshot not installed"),
            }
            fetching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }
}

/// Checks a fetched snapshot file against the leader's checksum, restores
/// a state machine from it and moves it to its canonical name (durably).
fn install_prepare<S: StateMachine>(
    fetched: &std::path::Path,
    snap_dir: &std::path::Path,
    meta: skiff_net::SnapshotMeta,
) -> Result<(PathBuf, S), String> {
    let crc = file_crc(fetched).map_err(|e| format!("{}: {e}", fetched.display()))?;
    if crc != meta.crc {
        return Err(format!(
            "{}: checksum {crc:#010x}, the leader offered {:#010x}",
            fetched.display(),
            meta.crc
        ));
    }
    let started = Instant::now();
    let (state, _) =
        restore_file::<S>(fetched).map_err(|e| format!("{}: {e}", fetched.display()))?;
    let canonical = storage::snapshot_path(snap_dir, meta.index, meta.term);
    if canonical != fetched {
        std::fs::rename(fetched, &canonical)
            .map_err(|e| format!("rename {}: {e}", fetched.display()))?;
        // The new name, then the old one's removal (`incoming`).
        storage::sync_dir(snap_dir).map_err(|e| e.to_string())?;
        let from = fetched.parent().unwrap_or(snap_dir);
        if from != snap_dir {
            storage::sync_dir(from).map_err(|e| e.to_string())?;
        }
    }
    tracing::info!(
        index = meta.index,
        ms = started.elapsed().as_millis() as u64,
        "snapshot restored off the loop"
    );
    Ok((canonical, state))
}

/// Longest a task waits for room in the loop's input queue to hand over a
/// fetched snapshot (dropped after it: the leader offers it again).
const INPUT_WAIT_MAX: Duration = Duration::from_secs(30);

/// Queues `input` for the loop from a task: waits (without blocking the
/// runtime's worker) while the queue is full, up to `INPUT_WAIT_MAX`.
async fn send_input<S: StateMachine>(
    inputs: &QueueSender<Input<S>>,
    input: Input<S>,
) -> Result<(), String> {
    match send_input_within(inputs, input, INPUT_WAIT_MAX).await {
        Ok(()) => Ok(()),
        Err(SendTimeoutError::Closed(_)) => Err("the event loop stopped".into()),
        Err(SendTimeoutError::Timeout(_)) => Err(format!(
            "the loop's input queue stayed full for {INPUT_WAIT_MAX:?}"
        )),
    }
}

/// Queues `input` for the loop from a task, waiting (without blocking the
/// runtime's worker) while the queue is full, up to `wait_max`; gives the
/// input back when the queue stayed full or closed.
async fn send_input_within<S: StateMachine>(
    inputs: &QueueSender<Input<S>>,
    mut input: Input<S>,
    wait_max: Duration,
) -> Result<(), SendTimeoutError<Input<S>>> {
    let deadline = Instant::now() + wait_max;
    let mut pause = Duration::from_micros(50);
    loop {
        match inputs.try_send(input) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(back)) => return Err(SendTimeoutError::Closed(back)),
            Err(TrySendError::Full(back)) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(SendTimeoutError::Timeout(back));
                }
                input = back;
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use skiff_net::{SimNetConfig, SimNetwork, Transport};

    use super::*;
    use crate::event_loop::test_support::Nop;

    #[test]
    fn a_snapshot_is_fetched_by_the_senders_host_name_or_from_a_wildcard_by_its_peer_host() {
        let offered: SocketAddr = "10.0.0.1:2381".parse().unwrap();
        let ip_peer: PeerAddr = "10.0.0.9:2380".parse().unwrap();
        let named_peer: PeerAddr = "node-1.example:2380".parse().unwrap();
        assert_eq!(snapshot_sender(offered, None), offered.into());
        assert_eq!(
            snapshot_sender(offered, Some(ip_peer.clone())),
            offered.into()
        );
        assert_eq!(
            snapshot_sender(offered, Some(named_peer)).to_string(),
            "node-1.example:2381"
        );
        let wildcard: SocketAddr = "0.0.0.0:2381".parse().unwrap();
        assert_eq!(
            snapshot_sender(wildcard, Some(ip_peer)).to_string(),
            "10.0.0.9:2381"
        );
        assert_eq!(snapshot_sender(wildcard, None), wildcard.into());
    }

    fn heartbeat(round: u64) -> Message {
        Message {
            from: 2,
            to: 1,
            term: 1,
            body: MessageBody::Heartbeat { commit: 0, round },
        }
    }

    /// Waits up to 10 s for `done`.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_pump_drops_what_a_full_queue_refuses_and_goes_on() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let net = SimNetwork::new(SimNetConfig::new(7)).unwrap();
        let (_me, inbox) = net.endpoint(1);
        let (peer, _peer_inbox) = net.endpoint(2);
        let (inputs, loop_end) = InputQueue::<Input<Nop>>::new(1);
        let shared = Arc::new(Shared::default());
        let wait_max = Duration::from_millis(20);
        let pump = Pump::<Nop> {
            inbox,
            inputs: inputs.clone(),
            rt: rt.handle().clone(),
            cluster_id: 1,
            id: 1,
            snap_dir: dir.path().to_path_buf(),
            fetch: FetchOptions::default(),
            fetching: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
            peer_addr: Arc::new(|_| None),
            shared: shared.clone(),
            wait_max,
        };
        rt.spawn(pump.run());
        let dropped = || shared.peer_messages_dropped.load(Ordering::Relaxed);

        // The loop is stuck: its queue is full for longer than the bound.
        inputs.try_send(Input::WalProgress).unwrap();
        peer.send(heartbeat(1)).unwrap();
        assert_eq!(net.deliver_due(net.now()), 1);
        eventually("the first heartbeat is dropped", || dropped() == 1);

        // The loop catches up: the pump still hears the peers.
        let mut taken = Vec::new();
        assert_eq!(loop_end.try_recv_many(&mut taken, 8), 1);
        peer.send(heartbeat(2)).unwrap();
        assert_eq!(net.deliver_due(net.now()), 1);
        taken.clear();
        let got = loop_end
            .recv_many(
                &mut taken,
                8,
                Some(Instant::now() + Duration::from_secs(10)),
            )
            .unwrap();
        assert_eq!(got, 1, "the pump went on after a drop");
        let Some(Input::Messages(msgs)) = taken.pop() else {
            panic!("expected peer messages");
        };
        assert_eq!(msgs, vec![heartbeat(2)]);
        assert_eq!(dropped(), 1);

        // The loop stopped: the pump ends rather than dropping forever.
        loop_end.close();
        peer.send(heartbeat(3)).unwrap();
        assert_eq!(net.deliver_due(net.now()), 1);
        std::thread::sleep(wait_max * 5);
        assert_eq!(dropped(), 1);
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}
