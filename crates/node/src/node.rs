//! A running node: its threads, its runtime and the handle clients use.
//!
//! Threads: the event loop (owns Raft and the KV store; the WAL's driver
//! wakes it when writes become durable), and a small tokio runtime for the
//! transport, the inbox pump (a task moving Raft messages from the
//! transport to the loop, and starting snapshot fetches), the snapshot
//! server, the gRPC API and the metrics endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use skiff_net::{
    fetch_snapshot, Channel, FetchOptions, Hello, Inbox, ServerOptions, SnapshotFiles,
    SnapshotServer, TcpConfig, TcpTransport,
};
use skiff_raft::{Message, MessageBody, NodeId, Raft, Role};
use skiff_wal::Wal;

use crate::config::{ConfigError, NodeConfig};
use crate::event_loop::{
    EventLoop, Input, RequestError, Shared, SnapshotOffer, INPUTS_MAX, MESSAGES_PER_INPUT_MAX,
};
use crate::kv::KvStore;
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, ResponseOp};
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
    pub revision: u64,
}

/// What the API needs of a node (shared by its gRPC services).
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) inputs: Sender<Input>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) cluster_id: u64,
}

impl NodeHandle {
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
            revision: s.revision.load(Ordering::Acquire),
        }
    }

    pub fn membership(&self) -> skiff_raft::Membership {
        self.shared
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the node stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        if !self.shared.stopped.load(Ordering::Acquire) {
            return None;
        }
        let fatal = self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner());
        Some(fatal.clone().unwrap_or_else(|| "shut down".into()))
    }

    fn submit(&self, input: Input) -> Result<(), RequestError> {
        match self.inputs.try_send(input) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(_)) => Err(RequestError::Busy(format!(
                "the node's input queue is full ({INPUTS_MAX})"
            ))),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(RequestError::Stopped(
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

    /// Proposes a write and waits until it is applied here.
    pub async fn write(&self, op: RequestOp) -> Result<ResponseOp, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Write {
            op,
            reply,
            accepted: Instant::now(),
        })?;
        self.wait(rx).await
    }

    /// Serves a range: linearizable (ReadIndex) unless `req.serializable`.
    pub async fn read(&self, req: RangeRequest) -> Result<RangeResponse, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Read { req, reply })?;
        self.wait(rx).await
    }

    /// Prometheus text of the node's metrics.
    pub async fn metrics_text(&self) -> Result<String, RequestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Input::Metrics(reply))?;
        match tokio::time::timeout(self.cfg.request_timeout(), rx).await {
            Ok(Ok(text)) => Ok(text),
            _ => Err(RequestError::Unavailable("metrics not rendered".into())),
        }
    }

    /// The client address of `id`, when configured.
    pub fn client_addr(&self, id: NodeId) -> Option<SocketAddr> {
        if id == self.cfg.id {
            return Some(self.cfg.listen_client);
        }
        self.cfg.initial_cluster_clients.get(&id).copied()
    }
}

/// A running node. Dropping it shuts it down.
pub struct Node {
    handle: NodeHandle,
    runtime: Option<tokio::runtime::Runtime>,
    transport: Arc<TcpTransport>,
    loop_thread: Option<JoinHandle<Result<(), String>>>,
    client_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    _snapshot_server: SnapshotServer,
    api_shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Node {
    /// Opens the data directory, recovers, joins the cluster and starts
    /// serving the client API.
    pub fn start(cfg: NodeConfig) -> Result<Node, StartError> {
        cfg.validate()?;
        let data_dir = cfg.data_dir.clone();
        let wal_dir = data_dir.join("wal");
        let snap_dir = data_dir.join("snap");
        for dir in [&data_dir, &wal_dir, &snap_dir] {
            std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
                path: dir.clone(),
                source,
            })?;
        }
        let wal = Wal::open(&wal_dir, cfg.wal_options()).map_err(|source| StartError::Wal {
            path: wal_dir.clone(),
            source,
        })?;
        tracing::info!(backend = ?wal.backend(), dir = %wal_dir.display(), "WAL open");
        let recovered = storage::recover(&wal, &snap_dir)?;
        let wal = Arc::new(wal);
        let (kv, snapshot) = match &recovered.snapshot {
            Some((index, term, path)) => {
                let file = std::fs::File::open(path).map_err(|e| StartError::Snapshot {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let mut r = std::io::BufReader::with_capacity(1 << 20, file);
                let kv = KvStore::read_snapshot(&mut r).map_err(|e| StartError::Snapshot {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let crc = crate::event_loop::file_crc(path).map_err(|e| StartError::Snapshot {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                (kv, Some((*index, *term, path.clone(), len, crc)))
            }
            None => (KvStore::new(), None),
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
        let cluster_id = cfg.cluster_id();
        let mut tcp = TcpConfig::new(cluster_id, cfg.id, cfg.listen_peer);
        for (&id, &addr) in &cfg.initial_cluster {
            if id != cfg.id {
                tcp = tcp.with_peer(id, addr);
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
                    ServerOptions::new(cluster_id, cfg.id),
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

        let (input_tx, input_rx) = crossbeam_channel::bounded(INPUTS_MAX);
        let shared = Arc::new(Shared::default());
        let cfg = Arc::new(cfg);
        let handle = NodeHandle {
            inputs: input_tx.clone(),
            shared: shared.clone(),
            cfg: cfg.clone(),
            cluster_id,
        };
        {
            let pump = Pump {
                inbox,
                inputs: input_tx.clone(),
                rt: runtime.handle().clone(),
                cluster_id,
                id: cfg.id,
                snap_dir: snap_dir.clone(),
                fetch: FetchOptions {
                    streams: cfg.snapshot_streams,
                    chunk_bytes: cfg.snapshot_chunk_bytes,
                    ..FetchOptions::default()
                },
                fetching: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
            };
            runtime.spawn(pump.run());
        }
        let event_loop = EventLoop::new(
            (*cfg).clone(),
            raft,
            kv,
            wal,
            transport.clone(),
            input_rx,
            input_tx.clone(),
            shared,
            snap_dir,
            snapshots,
            snapshot_addr,
            snapshot,
        );
        let loop_thread = std::thread::Builder::new()
            .name(format!("skiff-{}-loop", cfg.id))
            .spawn(move || event_loop.run())
            .map_err(StartError::Runtime)?;

        let (api_shutdown, api_stop) = tokio::sync::oneshot::channel();
        let client_addr = runtime
            .block_on(crate::api::serve(
                handle.clone(),
                cfg.listen_client,
                api_stop,
            ))
            .map_err(|reason| StartError::Listen {
                what: "client",
                addr: cfg.listen_client,
                reason,
            })?;
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
            client = %client_addr,
            peer = %transport.local_addr(),
            snapshot = %snapshot_addr,
            "node started"
        );
        Ok(Node {
            handle,
            runtime: Some(runtime),
            transport,
            loop_thread: Some(loop_thread),
            client_addr,
            metrics_addr,
            _snapshot_server: snapshot_server,
            api_shutdown: Some(api_shutdown),
        })
    }

    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
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
        self.shutdown_inner()
    }

    /// Stops serving, lets the loop finish its pass, stops every thread.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), String> {
        if let Some(tx) = self.api_shutdown.take() {
            let _ = tx.send(());
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

impl Drop for Node {
    fn drop(&mut self) {
        if self.loop_thread.is_some() {
            let _ = self.shutdown_inner();
        }
    }
}

/// Moves messages from the transport to the loop; a snapshot offer is
/// fetched first (in parallel chunks) and stepped once the file is durable.
struct Pump {
    inbox: Inbox,
    inputs: Sender<Input>,
    rt: tokio::runtime::Handle,
    cluster_id: u64,
    id: NodeId,
    snap_dir: PathBuf,
    fetch: FetchOptions,
    /// Fetches under way, by (leader, index).
    fetching: Arc<std::sync::Mutex<BTreeMap<(NodeId, u64), ()>>>,
}

impl Pump {
    /// A task on the node's runtime: the transport's reader tasks wake it
    /// on their own worker, so a message reaches the loop with one thread
    /// wakeup (the loop's).
    async fn run(mut self) {
        let mut received = Vec::with_capacity(MESSAGES_PER_INPUT_MAX);
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
            if !batch.is_empty()
                && send_input(&self.inputs, Input::Messages(batch))
                    .await
                    .is_err()
            {
                return;
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
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            if fetching.contains_key(&key) {
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
        let (dir, opts, inputs, fetching) = (
            self.snap_dir.join("incoming"),
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
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| e.to_string())?;
                fetch_snapshot(offer.addr, hello, meta, &dir, &opts)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match result {
                Ok(fetched) => {
                    tracing::info!(
                        index = meta.index,
                        ms = fetched.stats.transfer.as_millis() as u64,
                        "snapshot fetched"
                    );
                    let input = Input::SnapshotFetched {
                        msg,
                        path: fetched.path,
                    };
                    if let Err(e) = send_input(&inputs, input).await {
                        tracing::warn!(error = %e, "fetched snapshot not handed over");
                    }
                }
                Err(e) => tracing::warn!(index = meta.index, error = %e, "snapshot fetch failed"),
            }
            fetching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }
}

/// Longest a task waits for room in the loop's input queue.
const INPUT_WAIT_MAX: Duration = Duration::from_secs(30);

/// Queues `input` for the loop from a task: waits (without blocking the
/// runtime's worker) while the queue is full, up to `INPUT_WAIT_MAX`.
async fn send_input(inputs: &Sender<Input>, mut input: Input) -> Result<(), String> {
    let deadline = Instant::now() + INPUT_WAIT_MAX;
    let mut pause = Duration::from_micros(50);
    loop {
        match inputs.try_send(input) {
            Ok(()) => return Ok(()),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err("the event loop stopped".into())
            }
            Err(crossbeam_channel::TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the loop's input queue stayed full for {INPUT_WAIT_MAX:?}"
                    ));
                }
                input = back;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    }
}
