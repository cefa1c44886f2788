//! skiff-node: the replicated-state-machine runtime.
//!
//! The only crate that sees raft, wal and net together, and the one that
//! knows nothing of what it replicates: a service brings a
//! [`StateMachine`], the runtime orders its commands through Raft, makes
//! them durable, applies them on every member, serves its reads after a
//! read index, and snapshots it without stopping.
//!
//! * [`node`]: [`Node::start`] and the [`NodeHandle`] a service proposes
//!   and queries through;
//! * [`state_machine`]: the contract, with which method runs on which
//!   thread;
//! * [`event_loop`]: collect inputs → `raft.step` → dispatch actions (the
//!   write path), and its snapshots;
//! * [`embedded`]: a whole cluster in one process;
//! * [`config`], [`metrics`], [`storage`] (how Raft's state sits in the
//!   WAL), [`command`] (how commands sit in log entries), [`queue`] (the
//!   loop's input queue).
//!
//! # Example: a replicated counter
//!
//! ```
//! use std::io::{Read, Write};
//! use std::time::Duration;
//!
//! use bytes::{BufMut, BytesMut};
//! use skiff_node::config::NodeConfig;
//! use skiff_node::embedded::EmbeddedCluster;
//! use skiff_node::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};
//!
//! /// Adds each command's number to a total.
//! #[derive(Default)]
//! struct Counter {
//!     total: u64,
//! }
//!
//! struct Frozen(u64);
//!
//! impl SnapshotView for Frozen {
//!     fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
//!         w.write_all(&self.0.to_le_bytes())
//!     }
//! }
//!
//! impl StateMachine for Counter {
//!     type Command = u64;
//!     type Response = u64; // the total after the command
//!     type Query = ();
//!     type QueryResponse = u64;
//!     type Snapshot = Frozen;
//!
//!     fn encode_command(add: &u64, out: &mut BytesMut) {
//!         out.put_u64_le(*add);
//!     }
//!
//!     fn apply(&mut self, batch: &[Committed], out: &mut Vec<u64>) -> Result<(), ApplyError> {
//!         for entry in batch {
//!             let Some(cmd) = &entry.command else { continue };
//!             let add: [u8; 8] = cmd[..].try_into().map_err(|_| ApplyError {
//!                 index: entry.index,
//!                 reason: "not a u64".into(),
//!             })?;
//!             self.total += u64::from_le_bytes(add);
//!             out.push(self.total);
//!         }
//!         Ok(())
//!     }
//!
//!     fn query(&self, _: &()) -> u64 {
//!         self.total
//!     }
//!
//!     fn snapshot(&self) -> Frozen {
//!         Frozen(self.total)
//!     }
//!
//!     fn restore(r: &mut dyn Read) -> Result<Self, RestoreError> {
//!         let mut b = [0; 8];
//!         r.read_exact(&mut b)?;
//!         Ok(Counter { total: u64::from_le_bytes(b) })
//!     }
//! }
//!
//! let cluster = EmbeddedCluster::start(3, &NodeConfig::default(), |_| Counter::default())?;
//! let leader = cluster.wait_leader(Duration::from_secs(20)).expect("a leader");
//! let node = cluster.node(leader).unwrap().handle().clone();
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! rt.block_on(async {
//!     assert_eq!(node.propose(2).await?, 2);
//!     assert_eq!(node.propose(3).await?, 5);
//!     assert_eq!(node.query((), true).await?, 5);
//!     Ok::<_, skiff_node::RequestError>(())
//! })?;
//! cluster.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bootstrap;
pub mod command;
pub mod config;
pub mod cpu_wait;
pub mod embedded;
pub mod event_loop;
pub mod members;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod state_machine;
pub mod storage;

pub use event_loop::RequestError;
pub use node::{Node, NodeHandle, NodeStatus, StartError};
/// The address type of [`NodeConfig::initial_cluster`](config::NodeConfig::initial_cluster): an IP or a host name, and a port.
pub use skiff_net::{Host, PeerAddr};
pub use state_machine::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};
