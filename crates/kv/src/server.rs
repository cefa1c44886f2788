//! A Skiff KV member: a [`skiff_node::Node`] running the [`KvMachine`],
//! with the etcd v3 gRPC API on its client address.

use skiff_node::config::NodeConfig;
use skiff_node::embedded::{EmbeddedCluster, Starter};
use skiff_node::{Node, StartError};

use crate::machine::KvMachine;

/// A running KV member; dropping it (or `shutdown`) stops the API first.
pub type KvNode = Node<KvMachine>;

/// Starts a member: recovers its state, joins the cluster and serves the
/// etcd API on `cfg.listen_client`.
pub fn start(cfg: NodeConfig) -> Result<KvNode, StartError> {
    let addr = cfg.listen_client;
    let mut node = Node::start(cfg, KvMachine::new())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let bound = node
        .runtime()
        .block_on(crate::api::serve(node.handle().clone(), addr, stop_rx))
        .map_err(|reason| StartError::Listen {
            what: "client",
            addr,
            reason,
        })?;
    tracing::info!(id = node.handle().id(), client = %bound, "etcd API serving");
    node.on_shutdown(move || {
        let _ = stop_tx.send(());
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
