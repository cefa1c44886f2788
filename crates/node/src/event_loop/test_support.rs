//! What the runtime's unit tests share: a state machine with nothing in
//! it, and a one-member event loop on a real WAL.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::queue::InputQueue;
use crate::state_machine::{ApplyError, RestoreError};

/// A snapshot view with nothing in it.
pub(crate) struct NoView;

impl SnapshotView for NoView {
    fn write_to(&self, _: &mut dyn std::io::Write) -> std::io::Result<()> {
        Ok(())
    }
}

/// A state machine with nothing in it: a command is bytes, and every one
/// answers `()`.
pub(crate) struct Nop;

impl StateMachine for Nop {
    type Command = Vec<u8>;
    type Response = ();
    type Query = ();
    type QueryResponse = ();
    type Snapshot = NoView;
    fn encode_command(c: &Vec<u8>, out: &mut BytesMut) {
        out.extend_from_slice(c);
    }
    fn apply(&mut self, batch: &[Committed], out: &mut Vec<()>) -> Result<(), ApplyError> {
        out.extend(batch.iter().filter(|c| c.command.is_some()).map(|_| ()));
        Ok(())
    }
    fn query(&self, _: &()) {}
    fn snapshot(&self) -> NoView {
        NoView
    }
    fn restore(_: &mut dyn std::io::Read) -> Result<Self, RestoreError> {
        Ok(Nop)
    }
}

/// The configuration of [`one_member_loop`]'s member.
pub(crate) fn one_member_config(dir: &Path) -> NodeConfig {
    let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
    NodeConfig {
        id: 1,
        data_dir: dir.to_path_buf(),
        listen_peer: addr,
        initial_cluster: [(1, addr)].into(),
        ..NodeConfig::default()
    }
}

/// A one-member event loop (not running) on a real WAL in `dir/wal`,
/// through `storage` when given, and the sender of its inputs.
pub(crate) fn one_member_loop(
    dir: &Path,
    storage: Option<Arc<dyn skiff_wal::Storage>>,
) -> (EventLoop<Nop>, QueueSender<Input<Nop>>) {
    one_member_loop_with(one_member_config(dir), storage)
}

/// [`one_member_loop`] with `cfg` (its `data_dir` holds the WAL).
pub(crate) fn one_member_loop_with(
    cfg: NodeConfig,
    storage: Option<Arc<dyn skiff_wal::Storage>>,
) -> (EventLoop<Nop>, QueueSender<Input<Nop>>) {
    let dir = cfg.data_dir.clone();
    let addr = cfg.listen_peer;
    let wal = match storage {
        Some(s) => Wal::open_with_storage(dir.join("wal"), cfg.wal_options(), s),
        None => Wal::open(dir.join("wal"), cfg.wal_options()),
    };
    let wal = Arc::new(wal.unwrap());
    let snap_dir = dir.join("snap");
    std::fs::create_dir_all(&snap_dir).unwrap();
    let raft = Raft::new(cfg.raft_config(), skiff_raft::Restored::default(), 1).unwrap();
    let net = skiff_net::SimNetwork::new(skiff_net::SimNetConfig::new(1)).unwrap();
    let (transport, _inbox) = net.endpoint(1);
    let (tx, rx) = InputQueue::new(INPUTS_MAX);
    let worker = SnapshotWorker::start(
        "loop-test-snap".into(),
        wal.clone(),
        snap_dir.clone(),
        tx.clone(),
    )
    .unwrap();
    let parts = LoopParts {
        wal,
        transport: Arc::new(transport),
        inputs: rx,
        wake: tx.clone(),
        shared: Arc::new(Shared::default()),
        snap_dir,
        snapshots: Arc::new(SnapshotFiles::new()),
        snapshot_addr: addr,
        snapshot: None,
        worker,
    };
    (EventLoop::new(cfg, raft, Nop, 0, parts), tx)
}
