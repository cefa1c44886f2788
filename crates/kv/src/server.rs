//! A Skiff KV member: a [`skiff_node::Node`] running the [`KvMachine`],
//! with the etcd v3 gRPC API on its client address.

use skiff_node::config::NodeConfig;
use skiff_node::embedded::{EmbeddedCluster, Starter};
use skiff_node::{Node, StartError};

use std::time::Duration;

use crate::compactor::{AutoCompaction, REVISION_CHECK_INTERVAL};

use crate::lease::{Lessor, CHECKPOINT_INTERVAL_DEFAULT};
use crate::machine::{KvMachine, KvQuery, KvQueryResponse, QUOTA_BYTES_DEFAULT};
use crate::watch::{ViewSource, PROGRESS_INTERVAL_DEFAULT};

/// A running KV member; dropping it (or `shutdown`) stops the API first.
pub type KvNode = Node<KvMachine>;

/// Starts a member: recovers its state, joins the cluster and serves the
/// etcd API on `cfg.listen_client`.
pub fn start(cfg: NodeConfig) -> Result<KvNode, StartError> {
    start_with(cfg, KvOptions::default())
}

/// What a KV member takes besides its node's config.
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// How often a watcher that asked for `progress_notify` hears the
    /// revision while nothing happens to its keys (etcd's
    /// `--experimental-watch-progress-notify-interval`).
    pub watch_progress_interval: Duration,
    /// How often the leader records the TTL left of every lease through
    /// Raft, so that a restart or a new leader counts from there (etcd's
    /// lease checkpoint interval).
    pub lease_checkpoint_interval: Duration,
    /// The space quota of the store, bytes of
    /// [`crate::store::StoreStats::bytes`] (what Status reports as the db
    /// size: every version held, tombstones and history included, with
    /// per-key and per-version overheads): a write that would take the
    /// store past it is refused with "etcdserver: mvcc: database space
    /// exceeded" and raises a NOSPACE alarm, which refuses every write that
    /// grows the store until it is disarmed (etcd's
    /// `--quota-backend-bytes`). 0: the default, etcd's 2 GiB
    /// ([`QUOTA_BYTES_DEFAULT`]); `u64::MAX`: no quota.
    pub quota_backend_bytes: u64,
    /// Automatic compaction of the history (etcd's
    /// `--auto-compaction-mode` and `--auto-compaction-retention`).
    pub auto_compaction: AutoCompaction,
    /// How often the `revision` auto-compaction mode looks (etcd's 5
    /// minutes).
    pub revision_compaction_interval: Duration,
    /// Token lifetime and password hashing cost (etcd's
    /// `--auth-token-ttl`, `--bcrypt-cost`).
    pub auth: crate::api::AuthOptions,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            watch_progress_interval: PROGRESS_INTERVAL_DEFAULT,
            lease_checkpoint_interval: CHECKPOINT_INTERVAL_DEFAULT,
            quota_backend_bytes: QUOTA_BYTES_DEFAULT,
            auto_compaction: AutoCompaction::Off,
            revision_compaction_interval: REVISION_CHECK_INTERVAL,
            auth: crate::api::AuthOptions::default(),
        }
    }
}

/// Longest a stopping member waits for the client proposals in flight.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// How often it looks.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// How long the watch dispatcher waits for a frozen view from the loop.
const VIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// [`start`] with options.
pub fn start_with(cfg: NodeConfig, opts: KvOptions) -> Result<KvNode, StartError> {
    let addr = cfg.listen_client;
    let tls = crate::tls::MemberTls::load(&cfg)?;
    let machine = KvMachine::with_quota(opts.quota_backend_bytes);
    let quota = machine.quota().clone();
    let hub = machine.hub().clone();
    let counters = machine.counters().clone();
    let lease_notes = machine.lease_notes().clone();
    let auth_view = machine.auth_view().clone();
    let mut node = Node::start(cfg, machine)?;
    let id = node.handle().id();
    tracing::info!(
        id,
        quota_bytes = quota.limit(),
        "space quota (--quota-backend-bytes)"
    );

    // The watch dispatcher gets frozen views through serializable queries.
    let handle = node.handle().clone();
    let rt = node.runtime().clone();
    let views: ViewSource = Box::new(move || {
        let view = rt.block_on(async {
            tokio::time::timeout(VIEW_TIMEOUT, handle.query(KvQuery::View, false)).await
        });
        match view {
            Ok(Ok(KvQueryResponse::View(v))) => Some(v),
            _ => None,
        }
    });
    let dispatcher = hub
        .start(
            format!("skiff-{id}-watch"),
            views,
            opts.watch_progress_interval,
        )
        .map_err(StartError::Runtime)?;

    let lessor = Lessor::new(
        node.handle().clone(),
        opts.lease_checkpoint_interval,
        counters,
        lease_notes,
    );
    let lessor_task = node.runtime().spawn(lessor.clone().run());
    if opts.auto_compaction != AutoCompaction::Off {
        tracing::info!(id, policy = ?opts.auto_compaction, "auto-compaction on");
    }
    let compactor_task = node.runtime().spawn(crate::compactor::run(
        node.handle().clone(),
        hub.clone(),
        opts.auto_compaction,
        opts.revision_compaction_interval,
    ));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let tls_on = tls.server.is_some();
    let inflight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (served_tx, served_rx) = std::sync::mpsc::channel();
    let bound = node
        .runtime()
        .block_on(crate::api::serve(
            node.handle().clone(),
            crate::api::ServeParts {
                hub: hub.clone(),
                lessor,
                quota,
                auth_view,
                auth_options: opts.auth,
                inflight: inflight.clone(),
                served: served_tx,
            },
            addr,
            tls,
            stop_rx,
        ))
        .map_err(|reason| StartError::Listen {
            what: "client",
            addr,
            reason,
        })?;
    tracing::info!(id, client = %bound, tls = tls_on, "etcd API serving");
    node.on_shutdown(move || {
        // The client port stops taking connections and tells its clients
        // to go elsewhere (HTTP/2 GOAWAY: a request that crosses it is
        // refused unprocessed, safe to resend); the requests in flight
        // finish while the node still runs. Bounded by DRAIN_MAX (streams
        // such as watches keep their connections until then), so that a
        // stopping member answers what it took.
        let _ = stop_tx.send(());
        let drain_until = std::time::Instant::now() + DRAIN_MAX;
        let _ = served_rx.recv_timeout(DRAIN_MAX);
        while inflight.load(std::sync::atomic::Ordering::Acquire) > 0
            && std::time::Instant::now() < drain_until
        {
            std::thread::sleep(DRAIN_POLL);
        }
        lessor_task.abort();
        compactor_task.abort();
        hub.stop();
        let _ = dispatcher.join();
    });
    Ok(node)
}

/// What [`EmbeddedCluster::start_with`] takes to start KV members.
pub fn starter() -> Starter<KvMachine> {
    Box::new(start)
}

/// `n` KV members in this process, on loopback, in a temporary directory.
pub fn embedded_cluster(
    n: usize,
    base: &NodeConfig,
) -> Result<EmbeddedCluster<KvMachine>, StartError> {
    EmbeddedCluster::start_with(n, base, starter())
}
