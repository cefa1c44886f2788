//! A whole cluster in one process, on loopback, in a temporary directory:
//! what `skiff bench` loads when it is given no endpoints, what the engine
//! bench and the embedding example run, and a fixture for tests. Real WAL
//! files, real TCP between the members.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use skiff_raft::{NodeId, Role};

use crate::config::NodeConfig;
use crate::node::{Node, StartError};
use crate::state_machine::StateMachine;

/// Starts one member from its configuration: [`Node::start`] with the
/// service's initial state, plus whatever the service runs beside it.
pub type Starter<S> = Box<dyn Fn(NodeConfig) -> Result<Node<S>, StartError> + Send + Sync>;

/// Nodes of a running embedded cluster (index `i` is node `i + 1`).
pub struct EmbeddedCluster<S: StateMachine> {
    nodes: Vec<Option<Node<S>>>,
    configs: Vec<NodeConfig>,
    starter: Starter<S>,
    _dir: Option<tempfile::TempDir>,
}

/// A loopback address whose port was free a moment ago (bound, then
/// released for a node to take).
///
/// Ports come from below the kernel's ephemeral range, in turn from a
/// point that depends on the process id, so that outgoing connections
/// (clients', peers', other tests') cannot take a port between this
/// choice and the node's bind, nor one a node binds again on restart, and
/// two calls in one process never give the same port. Falls back to an
/// ephemeral port where that range is too small.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    const LOW: u16 = 10_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 2_000 {
        let span = ephemeral_low - LOW;
        // Spread concurrent processes over the range.
        let _ = NEXT.compare_exchange(
            0,
            (std::process::id() as u16).wrapping_mul(613) % span + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        for _ in 0..span {
            let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr();
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl<S: StateMachine> EmbeddedCluster<S> {
    /// Starts `n` nodes with `base`'s tunables in a new temporary
    /// directory, each with the state `initial` gives for its id.
    pub fn start(
        n: usize,
        base: &NodeConfig,
        initial: impl Fn(NodeId) -> S + Send + Sync + 'static,
    ) -> Result<EmbeddedCluster<S>, StartError> {
        Self::start_with(
            n,
            base,
            Box::new(move |cfg: NodeConfig| {
                let sm = initial(cfg.id);
                Node::start(cfg, sm)
            }),
        )
    }

    /// Starts `n` nodes with `base`'s tunables in a new temporary
    /// directory, each by `starter`.
    pub fn start_with(
        n: usize,
        base: &NodeConfig,
        starter: Starter<S>,
    ) -> Result<EmbeddedCluster<S>, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-embedded-")
            .tempdir()
            .map_err(|source| StartError::DataDir {
                path: std::env::temp_dir(),
                source,
            })?;
        let mut c = EmbeddedCluster::start_in(n, base, dir.path(), starter)?;
        c._dir = Some(dir);
        Ok(c)
    }

    /// Starts `n` nodes under `root` (`root/node-<id>`).
    pub fn start_in(
        n: usize,
        base: &NodeConfig,
        root: &std::path::Path,
        starter: Starter<S>,
    ) -> Result<EmbeddedCluster<S>, StartError> {
        let io = |source| StartError::DataDir {
            path: root.to_path_buf(),
            source,
        };
        let mut peers = BTreeMap::new();
        let mut clients = BTreeMap::new();
        for id in 1..=n as NodeId {
            peers.insert(id, free_loopback_addr().map_err(io)?);
            clients.insert(id, free_loopback_addr().map_err(io)?);
        }
        let configs: Vec<NodeConfig> = (1..=n as NodeId)
            .map(|id| NodeConfig {
                id,
                data_dir: root.join(format!("node-{id}")),
                listen_client: clients[&id],
                listen_peer: peers[&id],
                listen_snapshot: ([127, 0, 0, 1], 0).into(),
                listen_metrics: None,
                initial_cluster: peers.iter().map(|(&id, &a)| (id, a.into())).collect(),
                initial_cluster_clients: clients.iter().map(|(&id, &a)| (id, a.into())).collect(),
                ..base.clone()
            })
            .collect();
        let mut nodes = Vec::new();
        for cfg in &configs {
            nodes.push(Some(starter(cfg.clone())?));
        }
        Ok(EmbeddedCluster {
            nodes,
            configs,
            starter,
            _dir: None,
        })
    }

    /// Client endpoints (`http://host:port`, each member's
    /// `listen_client`) of the running nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .zip(&self.configs)
            .filter(|(n, _)| n.is_some())
            .map(|(_, cfg)| format!("http://{}", cfg.listen_client))
            .collect()
    }

    /// The configuration node `id` runs with.
    pub fn config(&self, id: NodeId) -> Option<&NodeConfig> {
        self.configs.get(id as usize - 1)
    }

    pub fn node(&self, id: NodeId) -> Option<&Node<S>> {
        self.nodes.get(id as usize - 1)?.as_ref()
    }

    /// Waits until one running node leads and the others agree (bounded).
    pub fn wait_leader(&self, timeout: Duration) -> Option<NodeId> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let running: Vec<&Node<S>> = self.nodes.iter().flatten().collect();
            let leaders: Vec<NodeId> = running
                .iter()
                .filter(|n| n.handle().status().role == Role::Leader)
                .map(|n| n.handle().id())
                .collect();
            if let [leader] = leaders[..] {
                let agree = running
                    .iter()
                    .all(|n| n.handle().status().leader == Some(leader));
                if agree {
                    return Some(leader);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops node `id` (a clean shutdown).
    pub fn stop(&mut self, id: NodeId) -> Result<(), String> {
        match self.nodes.get_mut(id as usize - 1).and_then(Option::take) {
            Some(n) => n.shutdown(),
            None => Ok(()),
        }
    }

    /// Starts node `id` again from its data directory.
    pub fn restart(&mut self, id: NodeId) -> Result<(), StartError> {
        self.stop(id).ok();
        let node = (self.starter)(self.configs[id as usize - 1].clone())?;
        self.nodes[id as usize - 1] = Some(node);
        Ok(())
    }

    /// Stops every node.
    pub fn shutdown(mut self) -> Result<(), String> {
        let mut result = Ok(());
        for n in self.nodes.iter_mut().filter_map(Option::take) {
            if let Err(e) = n.shutdown() {
                result = Err(e);
            }
        }
        result
    }
}
