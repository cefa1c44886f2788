//! What the runtime's unit tests share: a state machine with nothing in
//! it, a file system that fails on demand, and a one-member event loop on
//! a real WAL.

use std::io::IoSlice;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
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
        initial_cluster: [(1, addr.into())].into(),
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

/// How [`TestDisk`] refuses writes while full.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) enum Refuses {
    /// Writes past a file's end (ext4, xfs: blocks already allocated can
    /// be overwritten). The WAL's segments are pre-written, so what fails
    /// is making the next spare: `Full` from `write`.
    #[default]
    Growth,
    /// Every write but one of zeros (a copy-on-write file system that
    /// stores zero blocks as holes, as ZFS with compression does). A
    /// group's write fails: `NoSpace` on its ticket, the WAL clears the
    /// range with zeros and rolls back.
    NonZeroWrites,
}

/// The real file system, failing on demand: unlinks and renames fail
/// (EACCES) while `fail_unlinks` is set; file writes fail with ENOSPC as
/// `refuses` says while `full` is set; file writes and syncs wait while
/// `stalled` is (a disk that stopped answering).
#[derive(Debug, Default)]
pub(crate) struct TestDisk {
    pub fail_unlinks: AtomicBool,
    pub full: Arc<AtomicBool>,
    pub refuses: Refuses,
    pub stalled: Arc<Stall>,
}

/// Holds file writes and syncs while set.
#[derive(Debug, Default)]
pub(crate) struct Stall {
    on: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Stall {
    pub(crate) fn set(&self, on: bool) {
        *self.on.lock().unwrap() = on;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut on = self.on.lock().unwrap();
        while *on {
            on = self.changed.wait(on).unwrap();
        }
    }
}

impl TestDisk {
    fn check_unlink(&self) -> std::io::Result<()> {
        if self.fail_unlinks.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(())
    }

    fn wrap(&self, f: Arc<dyn skiff_wal::StorageFile>) -> Arc<dyn skiff_wal::StorageFile> {
        Arc::new(TestFile {
            inner: f,
            full: self.full.clone(),
            refuses: self.refuses,
            stalled: self.stalled.clone(),
        })
    }
}

#[derive(Debug)]
struct TestFile {
    inner: Arc<dyn skiff_wal::StorageFile>,
    full: Arc<AtomicBool>,
    refuses: Refuses,
    stalled: Arc<Stall>,
}

impl skiff_wal::StorageFile for TestFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> std::io::Result<()> {
        self.stalled.pass();
        if self.full.load(Ordering::Relaxed) {
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            let refused = match self.refuses {
                Refuses::Growth => offset + len > self.inner.len()?,
                Refuses::NonZeroWrites => bufs.iter().any(|b| b.iter().any(|&x| x != 0)),
            };
            if refused {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        self.inner.write_all_at(bufs, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.stalled.pass();
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

impl skiff_wal::Storage for TestDisk {
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn skiff_wal::StorageFile>> {
        Ok(self.wrap(skiff_wal::OsStorage.open(path)?))
    }
    fn create(&self, path: &Path) -> std::io::Result<Arc<dyn skiff_wal::StorageFile>> {
        Ok(self.wrap(skiff_wal::OsStorage.create(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.check_unlink()?;
        skiff_wal::OsStorage.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.check_unlink()?;
        skiff_wal::OsStorage.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        skiff_wal::OsStorage.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        skiff_wal::OsStorage.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        skiff_wal::OsStorage.create_dir_all(dir)
    }
}
