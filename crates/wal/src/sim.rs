//! A simulated, recording disk for crash-state and fault-injection tests.
//!
//! [`SimStorage`] implements [`Storage`] in memory. It owns three things: the
//! *volatile* view (what reads, `list` and `open` see now), the *durable* view
//! (what a crash is sure to leave) and an ordered log of every successful
//! operation ([`Op`]). From any prefix of that log,
//! [`SimStorage::crash_states`] builds the disk images a crash right after it
//! could leave, modelled conservatively on POSIX and ext4:
//!
//! - file data written since the inode's last `sync_data` may be lost: whole,
//!   torn at a 512-byte sector boundary, or sector by sector in any order;
//!   an fdatasync queued on a simulated ring (`sim_ring`) makes durable only
//!   the writes done before it was queued ([`Op::SyncData`] says how many);
//! - creates, renames and removals in a directory may be lost, newest first,
//!   until `sync_dir` of that directory;
//! - directories themselves (`create_dir_all`) are durable at once and are not
//!   logged: every image holds every directory the live disk knows. What
//!   POSIX asks for is tracked apart: a directory is listed by
//!   [`SimStorage::unsynced_dirs`] from its creation until its parent is
//!   synced, so that tests can check that whoever creates one makes it
//!   durable.
//!
//! It also injects faults into the live disk: a failing `sync_data` or write
//! (of any file, or of the files a test picks by path), a failing remove or
//! rename (of the paths a test picks), a capacity limit (ENOSPC) and bit
//! flips. It never touches the real file system and must
//! never promise more durability than POSIX does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::storage::{Storage, StorageFile};

/// Sector size of the simulated device: torn and partial writes keep or lose
/// whole sectors, aligned to absolute file offsets.
pub const SECTOR_BYTES: u64 = 512;
/// Bound on one file's size, so that a bad offset fails (EFBIG) instead of
/// allocating without limit.
const FILE_BYTES_MAX: u64 = 1 << 32;
/// Bound on "torn" images per crash point.
const TORN_IMAGES_MAX: usize = 16;
/// Number of "partial" images per crash point.
const PARTIAL_IMAGES: usize = 3;
/// Bound on "metadata-prefix" images per crash point.
const METADATA_PREFIX_IMAGES_MAX: usize = 8;

/// One successful operation on a [`SimStorage`], in the order it happened.
/// Failed operations are not logged: they changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new, empty inode `ino` was linked at `path`.
    Create { path: PathBuf, ino: u64 },
    /// `data` (never empty) was written at `offset` of inode `ino`.
    Write {
        ino: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// The first `writes` writes to inode `ino` (counting every
    /// [`Op::Write`] of it since it was created) became durable: all of them
    /// for `sync_data`; for an fdatasync queued on a ring and completing
    /// later, only those that had completed when it was queued.
    SyncData { ino: u64, writes: u64 },
    /// The entry `from` moved to `to`, replacing what `to` named.
    Rename { from: PathBuf, to: PathBuf },
    /// The entry at `path` was unlinked.
    Remove { path: PathBuf },
    /// Every earlier create, rename and removal in `dir` became durable.
    SyncDir { dir: PathBuf },
    /// A point a test named with [`SimStorage::mark`], for example "step 7
    /// is about to be submitted".
    Mark(u64),
    /// The WAL's driver acknowledged every write up to this sequence number
    /// of the WAL open now (numbers start again at each open), just before
    /// telling waiters.
    Acknowledged(u64),
}

/// One disk image a crash could leave.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// "clean", "dropped", "torn", "partial" or "metadata-prefix".
    pub kind: &'static str,
    /// A fresh disk whose volatile and durable views both equal the image,
    /// with an empty op log.
    pub storage: SimStorage,
}

/// The simulated disk. Clones share the same disk.
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
}

/// Holds writes back while closed ([`SimStorage::pause_writes`]).
#[derive(Default)]
struct Gate {
    paused: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    fn wait_open(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        while *paused {
            paused = self
                .cond
                .wait(paused)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Directory entries: file name -> inode.
type Entries = BTreeMap<String, u64>;

#[derive(Default)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    // Invariant: every entry (volatile or durable) names an inode in `inodes`.
    dirs: BTreeMap<PathBuf, Dir>,
    ops: Vec<Op>,
    /// The last inode number handed out; numbers are never reused.
    ino_last: u64,
    /// The errno the next `sync_data` of a file the filter picks fails with.
    sync_failure: Option<(i32, PathFilter)>,
    /// The next write to a file the filter picks keeps this many bytes of
    /// what it was asked to write, then fails with the errno.
    write_failure: Option<(i32, usize, PathFilter)>,
    /// The errno the next `remove` of, or `rename` from, a path the filter
    /// picks fails with.
    unlink_failure: Option<(i32, PathFilter)>,
    /// The errno the next `sync_dir` fails with.
    sync_dir_failure: Option<i32>,
    capacity_bytes: Option<u64>,
    /// Directories created whose entry in their parent is not yet durable
    /// (no `sync_dir` of the parent since).
    unsynced_dirs: BTreeSet<PathBuf>,
}

/// Picks files by the path they were opened or created at.
type PathFilter = Box<dyn Fn(&Path) -> bool + Send>;

#[derive(Default)]
struct Inode {
    data: Vec<u8>,
    /// `data` as of the last write made durable.
    durable: Vec<u8>,
    /// Writes logged so far.
    writes: u64,
    /// Writes made durable so far: the first `synced` of them.
    // Invariant: synced <= writes, and `unsynced` holds writes
    // synced..writes, in order.
    synced: u64,
    /// The writes not yet durable, as indexes of their [`Op::Write`] in
    /// the op log.
    unsynced: Vec<usize>,
}

impl Inode {
    /// Makes the first `through` writes durable (fewer: nothing to do).
    fn sync_through(&mut self, through: u64, ops: &[Op]) {
        assert!(through <= self.writes, "a sync covers only writes done");
        if through <= self.synced {
            return;
        }
        let n = (through - self.synced) as usize;
        if n == self.unsynced.len() {
            self.durable.clone_from(&self.data);
            self.unsynced.clear();
        } else {
            for at in self.unsynced.drain(..n) {
                let Op::Write { offset, data, .. } = &ops[at] else {
                    unreachable!("an unsynced write is a write");
                };
                write_at(&mut self.durable, *offset, data);
            }
        }
        self.synced = through;
    }
}

#[derive(Default)]
struct Dir {
    entries: Entries,
    /// `entries` as of the last `sync_dir`.
    durable: Entries,
}

/// An open file: the inode stays readable and writable after it is unlinked,
/// as on POSIX.
struct SimFile {
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
    ino: u64,
    path: PathBuf,
}

impl SimStorage {
    /// An empty disk with no directories.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock left a consistent state:
        // every mutation below completes before anything can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends [`Op::Mark`]`(id)` to the op log.
    pub fn mark(&self, id: u64) {
        self.lock().ops.push(Op::Mark(id));
    }

    /// Number of operations logged so far.
    pub fn op_count(&self) -> usize {
        self.lock().ops.len()
    }

    /// A copy of the op log.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// Makes the next `sync_data` (of any file) fail with `errno` without
    /// making anything durable.
    pub fn fail_next_sync(&self, errno: i32) {
        self.fail_next_sync_where(errno, |_| true);
    }

    /// Makes the next `sync_data` of a file whose path `pick` accepts fail
    /// with `errno`, making nothing durable. Syncs of other files go on as
    /// usual. A file's path is the first name that links its inode now (the
    /// one it was opened or created at once it is unlinked).
    pub fn fail_next_sync_where(&self, errno: i32, pick: impl Fn(&Path) -> bool + Send + 'static) {
        self.lock().sync_failure = Some((errno, Box::new(pick)));
    }

    /// Whether a sync failure set up by `fail_next_sync*` is still to come.
    pub fn sync_failure_pending(&self) -> bool {
        self.lock().sync_failure.is_some()
    }

    /// Makes the next write to a file whose path (as for
    /// [`fail_next_sync_where`](Self::fail_next_sync_where)) `pick` accepts
    /// fail with `errno` after writing only the
    /// first `kept_bytes` bytes of it (0: nothing), as a write that runs
    /// out of space part way does. The bytes kept are logged as a write.
    pub fn fail_next_write_where(
        &self,
        errno: i32,
        kept_bytes: usize,
        pick: impl Fn(&Path) -> bool + Send + 'static,
    ) {
        self.lock().write_failure = Some((errno, kept_bytes, Box::new(pick)));
    }

    /// Makes the next `remove` of a path, or `rename` from a path, that
    /// `pick` accepts fail with `errno` (EACCES, EIO, ...), changing and
    /// logging nothing. Other removes and renames go on as usual.
    pub fn fail_next_unlink_where(
        &self,
        errno: i32,
        pick: impl Fn(&Path) -> bool + Send + 'static,
    ) {
        self.lock().unlink_failure = Some((errno, Box::new(pick)));
    }

    /// Makes the next `sync_dir` (of any directory) fail with `errno`,
    /// making nothing durable.
    pub fn fail_next_sync_dir(&self, errno: i32) {
        self.lock().sync_dir_failure = Some(errno);
    }

    /// Whether a failure set up by `fail_next_unlink_where` is still to
    /// come.
    pub fn unlink_failure_pending(&self) -> bool {
        self.lock().unlink_failure.is_some()
    }

    /// Makes every write to a file wait (in `write_all_at`) until
    /// [`resume_writes`](Self::resume_writes): a test can then queue work
    /// behind a write it knows has not happened yet.
    pub fn pause_writes(&self) {
        *self
            .gate
            .paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
    }

    pub fn resume_writes(&self) {
        *self
            .gate
            .paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = false;
        self.gate.cond.notify_all();
    }

    /// Whether a write failure set up by `fail_next_write_where` is still
    /// to come.
    pub fn write_failure_pending(&self) -> bool {
        self.lock().write_failure.is_some()
    }

    /// Directories created (by `create_dir_all`) whose parent was not
    /// synced since: a power loss could lose them, with every file in them.
    pub fn unsynced_dirs(&self) -> Vec<PathBuf> {
        self.lock().unsynced_dirs.iter().cloned().collect()
    }

    /// Limits the total size of all linked files; a write that would grow the
    /// total beyond `bytes` fails with ENOSPC and writes nothing.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity_bytes = bytes;
    }

    /// Flips `bit` (0..8) of the byte at `offset` of the file at `path`, in
    /// both views: media corruption. It is not logged, so crash states do not
    /// see it. Flip synced bytes: a write not yet durable that covers the
    /// byte brings its own back when an fdatasync queued on a simulated ring
    /// makes it durable.
    ///
    /// # Panics
    ///
    /// If the file does not exist or is shorter than `offset + 1`.
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) {
        assert!(bit < 8, "bit {bit} is not in 0..8");
        let mut state = self.lock();
        let ino = state.lookup(path).expect("flip_bit: no such file");
        let inode = state.inodes.get_mut(&ino).expect("entry without inode");
        let at = usize::try_from(offset).expect("offset fits usize");
        assert!(at < inode.data.len(), "flip_bit past the end of {path:?}");
        inode.data[at] ^= 1 << bit;
        if let Some(byte) = inode.durable.get_mut(at) {
            *byte ^= 1 << bit;
        }
    }

    /// The content of the file at `path` in the volatile view.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let ino = state.lookup(path).ok()?;
        Some(state.inodes[&ino].data.clone())
    }

    /// For an fdatasync queued now on a (simulated) ring: the inode linked at
    /// `path` and how many writes to it have completed, the writes that
    /// fdatasync is sure to cover.
    pub(crate) fn sync_point(&self, path: &Path) -> io::Result<(u64, u64)> {
        let state = self.lock();
        let ino = state.lookup(path)?;
        Ok((ino, state.inodes[&ino].writes))
    }

    /// For an fdatasync of inode `ino` (queued for `path`) completing: the
    /// failure set up by `fail_next_sync*`, taken, if it picks this file.
    pub(crate) fn take_sync_failure(&self, ino: u64, path: &Path) -> Option<io::Error> {
        self.lock().take_sync_failure(ino, path)
    }

    /// Makes the first `writes` writes to inode `ino` durable, as a
    /// successful fdatasync queued after them does, and logs
    /// [`Op::SyncData`].
    pub(crate) fn sync_through(&self, ino: u64, writes: u64) {
        self.lock().sync_through(ino, writes);
    }

    /// File names in `dir` in the volatile view, sorted; empty if `dir` does
    /// not exist.
    pub fn file_names(&self, dir: &Path) -> Vec<String> {
        self.list(dir).unwrap_or_default()
    }

    /// The disk images a crash right after the first `prefix` ops could
    /// leave: one "clean" and one "dropped" always, then "torn", "partial"
    /// (randomised from `seed` and `prefix`) and "metadata-prefix" ones where
    /// something is pending. See the module docs for the model.
    ///
    /// # Panics
    ///
    /// If `prefix` exceeds [`op_count`](Self::op_count).
    pub fn crash_states(&self, prefix: usize, seed: u64) -> Vec<CrashState> {
        let (replay, dirs) = {
            let state = self.lock();
            assert!(prefix <= state.ops.len(), "prefix {prefix} past the op log");
            let replay = Replay::new(&state.ops[..prefix]);
            (replay, state.dirs.keys().cloned().collect::<Vec<_>>())
        };
        let current = |_: &Path, d: &PendingDir| d.current.clone();
        let mut states = vec![
            replay.image("clean", &dirs, current, |i| i.clean()),
            replay.image(
                "dropped",
                &dirs,
                |_, d| d.durable.clone(),
                |i| i.durable.clone(),
            ),
        ];

        let mut torn = Vec::new();
        for (&ino, inode) in &replay.inodes {
            for (j, write) in inode.writes.iter().enumerate() {
                let sectors = sector_pieces(write).len();
                let mut keeps = vec![0, 1, sectors / 2];
                keeps.sort_unstable();
                keeps.dedup();
                // Keeping every sector equals the next write torn at 0, or
                // "clean" for the last one.
                torn.extend(
                    keeps
                        .into_iter()
                        .filter(|&k| k < sectors)
                        .map(|k| (ino, j, k)),
                );
            }
        }
        for (ino, j, k) in spread(torn, TORN_IMAGES_MAX) {
            states.push(replay.image("torn", &dirs, current, |i| {
                if i.ino == ino {
                    i.torn(j, k)
                } else {
                    i.clean()
                }
            }));
        }

        if replay.inodes.values().any(|i| !i.writes.is_empty()) {
            let mut rng = Rng::new(seed ^ (prefix as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for _ in 0..PARTIAL_IMAGES {
                states.push(replay.image("partial", &dirs, current, |i| i.partial(&mut rng)));
            }
        }

        let mut meta = Vec::new();
        for (dir, pending) in &replay.dirs {
            meta.extend((0..pending.changes.len()).map(|j| (dir.clone(), j)));
        }
        for (dir, j) in spread(meta, METADATA_PREFIX_IMAGES_MAX) {
            let entries = |p: &Path, d: &PendingDir| {
                if p == dir {
                    d.first_changes(j)
                } else {
                    d.current.clone()
                }
            };
            states.push(replay.image("metadata-prefix", &dirs, entries, |i| i.clean()));
        }
        states
    }

    /// A disk whose volatile and durable views both hold `dirs`, with the
    /// content of each linked inode from `files`.
    fn from_image(dirs: BTreeMap<PathBuf, Entries>, files: &BTreeMap<u64, Vec<u8>>) -> Self {
        let mut state = State {
            ino_last: files.keys().next_back().copied().unwrap_or(0),
            ..State::default()
        };
        for (path, entries) in dirs {
            for ino in entries.values() {
                let data = files[ino].clone();
                state.inodes.entry(*ino).or_insert_with(|| Inode {
                    durable: data.clone(),
                    data,
                    ..Inode::default()
                });
            }
            let dir = Dir {
                durable: entries.clone(),
                entries,
            };
            state.dirs.insert(path, dir);
        }
        Self {
            state: Arc::new(Mutex::new(state)),
            gate: Arc::default(),
        }
    }

    /// The durable view as `path -> content`, to check the replay against.
    #[cfg(test)]
    fn durable_files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let state = self.lock();
        let mut files = BTreeMap::new();
        for (dir, d) in &state.dirs {
            for (name, ino) in &d.durable {
                files.insert(dir.join(name), state.inodes[ino].durable.clone());
            }
        }
        files
    }
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("SimStorage")
            .field("dirs", &state.dirs.len())
            .field("inodes", &state.inodes.len())
            .field("ops", &state.ops.len())
            .finish()
    }
}

impl State {
    /// Takes the unlink failure set up for `path`, if any.
    fn take_unlink_failure(&mut self, path: &Path) -> Option<io::Error> {
        let picked = self
            .unlink_failure
            .as_ref()
            .is_some_and(|(_, pick)| pick(path));
        if !picked {
            return None;
        }
        let (errno, _) = self.unlink_failure.take().expect("picked");
        Some(io::Error::from_raw_os_error(errno))
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        let entries = &self.dirs.get(&dir).ok_or_else(|| not_found(path))?.entries;
        entries.get(&name).copied().ok_or_else(|| not_found(path))
    }

    /// Bytes held by linked inodes and by `ino`, which may be unlinked but
    /// open.
    fn used_bytes(&self, ino: u64) -> u64 {
        let mut inos: BTreeSet<u64> = self
            .dirs
            .values()
            .flat_map(|d| d.entries.values().copied())
            .collect();
        inos.insert(ino);
        inos.iter().map(|i| self.inodes[i].data.len() as u64).sum()
    }

    fn write(&mut self, ino: u64, offset: u64, data: Vec<u8>) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > FILE_BYTES_MAX {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let growth = end.saturating_sub(self.inodes[&ino].data.len() as u64);
        if let Some(capacity) = self.capacity_bytes {
            if growth > 0 && self.used_bytes(ino) + growth > capacity {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let inode = self.inodes.get_mut(&ino).expect("open file without inode");
        write_at(&mut inode.data, offset, &data);
        inode.writes += 1;
        inode.unsynced.push(self.ops.len());
        self.ops.push(Op::Write { ino, offset, data });
        Ok(())
    }

    /// The first name that links `ino` now, else `opened_at`.
    fn current_path(&self, ino: u64, opened_at: &Path) -> PathBuf {
        self.dirs
            .iter()
            .find_map(|(dir, d)| {
                d.entries
                    .iter()
                    .find(|(_, &i)| i == ino)
                    .map(|(name, _)| dir.join(name))
            })
            .unwrap_or_else(|| opened_at.to_path_buf())
    }

    fn sync_data(&mut self, ino: u64, opened_at: &Path) -> io::Result<()> {
        if let Some(e) = self.take_sync_failure(ino, opened_at) {
            return Err(e);
        }
        let writes = self.inodes[&ino].writes;
        self.sync_through(ino, writes);
        Ok(())
    }

    /// Takes the sync failure set up for the file `ino`, if it picks it.
    fn take_sync_failure(&mut self, ino: u64, opened_at: &Path) -> Option<io::Error> {
        let picked = self.sync_failure.as_ref().is_some_and(|(_, pick)| {
            let path = self.current_path(ino, opened_at);
            pick(&path)
        });
        if !picked {
            return None;
        }
        let (errno, _) = self.sync_failure.take().expect("checked");
        Some(io::Error::from_raw_os_error(errno))
    }

    /// Makes the first `writes` writes to `ino` durable, and logs it.
    fn sync_through(&mut self, ino: u64, writes: u64) {
        let inode = self.inodes.get_mut(&ino).expect("open file without inode");
        inode.sync_through(writes, &self.ops);
        self.ops.push(Op::SyncData { ino, writes });
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let ino = self.lock().lookup(path)?;
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            gate: Arc::clone(&self.gate),
            ino,
            path: path.to_path_buf(),
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let (dir, name) = split(path)?;
        let mut state = self.lock();
        let ino = state.ino_last + 1;
        let entries = &mut state.dir_mut(&dir)?.entries;
        if entries.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        entries.insert(name, ino);
        state.ino_last = ino;
        state.inodes.insert(ino, Inode::default());
        state.ops.push(Op::Create {
            path: path.to_path_buf(),
            ino,
        });
        drop(state);
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            gate: Arc::clone(&self.gate),
            ino,
            path: path.to_path_buf(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let mut state = self.lock();
        let ino = state.lookup(from)?;
        if let Some(e) = state.take_unlink_failure(from) {
            return Err(e);
        }
        state.dir_mut(&to_dir)?;
        if state.lookup(to).ok() == Some(ino) {
            // POSIX: two names of one inode (or one name twice): do nothing.
            return Ok(());
        }
        state.dir_mut(&from_dir)?.entries.remove(&from_name);
        state.dir_mut(&to_dir)?.entries.insert(to_name, ino);
        state.ops.push(Op::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = split(path)?;
        let mut state = self.lock();
        state.lookup(path)?;
        if let Some(e) = state.take_unlink_failure(path) {
            return Err(e);
        }
        state.dir_mut(&dir)?.entries.remove(&name);
        state.ops.push(Op::Remove {
            path: path.to_path_buf(),
        });
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if let Some(errno) = state.sync_dir_failure.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let d = state.dir_mut(dir)?;
        d.durable = d.entries.clone();
        state
            .unsynced_dirs
            .retain(|child| child.parent() != Some(dir));
        state.ops.push(Op::SyncDir {
            dir: dir.to_path_buf(),
        });
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        let d = state.dirs.get(dir).ok_or_else(|| not_found(dir))?;
        Ok(d.entries.keys().cloned().collect())
    }

    fn acknowledged(&self, write_seq: u64) {
        self.lock().ops.push(Op::Acknowledged(write_seq));
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        for ancestor in dir.ancestors() {
            if state.dirs.contains_key(ancestor) {
                continue;
            }
            state.dirs.insert(ancestor.to_path_buf(), Dir::default());
            // The root (and the empty path of a relative one) has no
            // parent to sync.
            if ancestor.parent().is_some() {
                state.unsynced_dirs.insert(ancestor.to_path_buf());
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile")
            .field("ino", &self.ino)
            .field("path", &self.path)
            .finish()
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let data = &state.inodes[&self.ino].data;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.gate.wait_open();
        let mut data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let picked = state.write_failure.as_ref().is_some_and(|(_, _, pick)| {
            let path = state.current_path(self.ino, &self.path);
            pick(&path)
        });
        if picked {
            let (errno, kept, _) = state.write_failure.take().expect("checked");
            data.truncate(kept);
            state.write(self.ino, offset, data)?;
            return Err(io::Error::from_raw_os_error(errno));
        }
        state.write(self.ino, offset, data)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sync_data(self.ino, &self.path)
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(state.inodes[&self.ino].data.len() as u64)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A log prefix replayed: per inode and directory, what is durable and what
/// is still pending.
#[derive(Default)]
struct Replay {
    inodes: BTreeMap<u64, PendingInode>,
    dirs: BTreeMap<PathBuf, PendingDir>,
}

#[derive(Default)]
struct PendingInode {
    ino: u64,
    durable: Vec<u8>,
    /// Writes not yet durable, oldest first, as `(offset, data)`.
    writes: Vec<(u64, Vec<u8>)>,
    /// Writes made durable so far (the number of `writes[0]`).
    synced: u64,
}

#[derive(Default)]
struct PendingDir {
    durable: Entries,
    /// `durable` with every change applied: the volatile view.
    current: Entries,
    /// Changes since the last `SyncDir`, oldest first.
    changes: Vec<Change>,
}

/// One metadata change to one directory. A rename within a directory is one
/// atomic change; across directories it is an unlink in one and a link in the
/// other, each made durable by its own directory's sync.
enum Change {
    Link { name: String, ino: u64 },
    Unlink { name: String },
    Move { from: String, to: String, ino: u64 },
}

impl Change {
    fn apply(&self, entries: &mut Entries) {
        match self {
            Change::Link { name, ino } => {
                entries.insert(name.clone(), *ino);
            }
            Change::Unlink { name } => {
                entries.remove(name);
            }
            Change::Move { from, to, ino } => {
                entries.remove(from);
                entries.insert(to.clone(), *ino);
            }
        }
    }
}

impl Replay {
    fn new(ops: &[Op]) -> Self {
        let mut replay = Replay::default();
        for op in ops {
            match op {
                Op::Create { path, ino } => {
                    let (dir, name) = split(path).expect("logged path is valid");
                    replay.change(&dir, Change::Link { name, ino: *ino });
                    let inode = PendingInode {
                        ino: *ino,
                        ..PendingInode::default()
                    };
                    assert!(replay.inodes.insert(*ino, inode).is_none(), "inode reused");
                }
                Op::Write { ino, offset, data } => {
                    let inode = replay.inodes.get_mut(ino).expect("write before create");
                    inode.writes.push((*offset, data.clone()));
                }
                Op::SyncData { ino, writes } => {
                    let inode = replay.inodes.get_mut(ino).expect("sync before create");
                    let n = writes.saturating_sub(inode.synced) as usize;
                    assert!(n <= inode.writes.len(), "a sync covers only writes done");
                    let synced = inode.writes.drain(..n);
                    let pieces = synced.as_slice().iter().map(|(o, d)| (*o, d.as_slice()));
                    inode.durable = content(&inode.durable, pieces);
                    drop(synced);
                    inode.synced += n as u64;
                }
                Op::Rename { from, to } => {
                    let (from_dir, from_name) = split(from).expect("logged path is valid");
                    let (to_dir, to_name) = split(to).expect("logged path is valid");
                    let ino = replay.dirs[&from_dir].current[&from_name];
                    if from_dir == to_dir {
                        let (from, to) = (from_name, to_name);
                        replay.change(&from_dir, Change::Move { from, to, ino });
                    } else {
                        replay.change(&from_dir, Change::Unlink { name: from_name });
                        replay.change(&to_dir, Change::Link { name: to_name, ino });
                    }
                }
                Op::Remove { path } => {
                    let (dir, name) = split(path).expect("logged path is valid");
                    replay.change(&dir, Change::Unlink { name });
                }
                Op::SyncDir { dir } => {
                    let d = replay.dirs.entry(dir.clone()).or_default();
                    d.durable = d.current.clone();
                    d.changes.clear();
                }
                Op::Mark(_) | Op::Acknowledged(_) => {}
            }
        }
        replay
    }

    fn change(&mut self, dir: &Path, change: Change) {
        let d = self.dirs.entry(dir.to_path_buf()).or_default();
        change.apply(&mut d.current);
        d.changes.push(change);
    }

    /// One image: each of `dirs` with the entries `entries_of` picks, each
    /// inode with the content `content_of` picks. `content_of` runs for every
    /// inode in inode order, linked or not, so that a seeded choice does not
    /// depend on which names survive.
    fn image(
        &self,
        kind: &'static str,
        dirs: &[PathBuf],
        entries_of: impl Fn(&Path, &PendingDir) -> Entries,
        mut content_of: impl FnMut(&PendingInode) -> Vec<u8>,
    ) -> CrashState {
        let files: BTreeMap<u64, Vec<u8>> = self
            .inodes
            .values()
            .map(|i| {
                let content = content_of(i);
                debug_assert!(content.len() >= i.durable.len(), "image lost synced bytes");
                (i.ino, content)
            })
            .collect();
        let mut image = BTreeMap::new();
        for dir in dirs {
            let entries = self.dirs.get(dir).map(|d| entries_of(dir, d));
            image.insert(dir.clone(), entries.unwrap_or_default());
        }
        let storage = SimStorage::from_image(image, &files);
        CrashState { kind, storage }
    }
}

impl PendingDir {
    fn first_changes(&self, j: usize) -> Entries {
        let mut entries = self.durable.clone();
        for change in &self.changes[..j] {
            change.apply(&mut entries);
        }
        entries
    }
}

impl PendingInode {
    /// Every pending write kept.
    fn clean(&self) -> Vec<u8> {
        let pieces = self.writes.iter().map(|(o, d)| (*o, d.as_slice()));
        content(&self.durable, pieces)
    }

    /// Writes before `j` kept, the first `k` sectors of write `j`, none after.
    fn torn(&self, j: usize, k: usize) -> Vec<u8> {
        let before = self.writes[..j].iter().map(|(o, d)| (*o, d.as_slice()));
        let sectors = sector_pieces(&self.writes[j]);
        content(&self.durable, before.chain(sectors.into_iter().take(k)))
    }

    /// Each sector of each pending write kept with probability 1/2.
    fn partial(&self, rng: &mut Rng) -> Vec<u8> {
        let mut kept = Vec::new();
        for write in &self.writes {
            kept.extend(sector_pieces(write).into_iter().filter(|_| rng.coin()));
        }
        content(&self.durable, kept.into_iter())
    }
}

/// `durable` with `pieces` written over it in order; gaps read as zeros.
fn content<'a>(durable: &[u8], pieces: impl Iterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut data = durable.to_vec();
    for (offset, bytes) in pieces {
        write_at(&mut data, offset, bytes);
    }
    data
}

/// Splits a write into its pieces within each sector it touches.
fn sector_pieces((offset, data): &(u64, Vec<u8>)) -> Vec<(u64, &[u8])> {
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let abs = offset + at as u64;
        let room = (SECTOR_BYTES - abs % SECTOR_BYTES) as usize;
        let n = room.min(data.len() - at);
        pieces.push((abs, &data[at..at + n]));
        at += n;
    }
    pieces
}

fn write_at(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = usize::try_from(offset).expect("offset below FILE_BYTES_MAX");
    let end = start + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
}

/// At most `max` of `items`, evenly spread, first and last included.
fn spread<T>(mut items: Vec<T>, max: usize) -> Vec<T> {
    if items.len() <= max {
        return items;
    }
    assert!(max >= 2);
    // The step (len - 1) / (max - 1) is over 1, so the picks are distinct.
    let picks: BTreeSet<usize> = (0..max)
        .map(|i| i * (items.len() - 1) / (max - 1))
        .collect();
    let mut index = 0;
    items.retain(|_| {
        index += 1;
        picks.contains(&(index - 1))
    });
    debug_assert_eq!(items.len(), max);
    items
}

/// Splits a file path into its directory and its name.
fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        let msg = format!("{} is not a file path", path.display());
        io::Error::new(io::ErrorKind::InvalidInput, msg)
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    Ok((dir.to_path_buf(), name.to_owned()))
}

fn not_found(path: &Path) -> io::Error {
    let msg = format!("{} not found", path.display());
    io::Error::new(io::ErrorKind::NotFound, msg)
}

/// splitmix64: small, seedable, good enough to pick sectors.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/wal";

    fn path(name: &str) -> PathBuf {
        Path::new(DIR).join(name)
    }

    /// A disk with `/wal/a` created, durable in its directory, and empty.
    fn disk_with_file() -> (SimStorage, Arc<dyn StorageFile>) {
        let disk = SimStorage::new();
        disk.create_dir_all(Path::new(DIR)).unwrap();
        let file = disk.create(&path("a")).unwrap();
        disk.sync_dir(Path::new(DIR)).unwrap();
        (disk, file)
    }

    fn write(file: &Arc<dyn StorageFile>, offset: u64, data: &[u8]) -> io::Result<()> {
        file.write_all_at(&[IoSlice::new(data)], offset)
    }

    fn kind<'a>(states: &'a [CrashState], kind: &str) -> Vec<&'a SimStorage> {
        states
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| &s.storage)
            .collect()
    }

    #[test]
    fn unsynced_write_is_lost_when_dropped_and_kept_when_clean() {
        let (disk, file) = disk_with_file();
        write(&file, 0, b"durable").unwrap();
        file.sync_data().unwrap();
        write(&file, 7, b"+volatile").unwrap();
        let states = disk.crash_states(disk.op_count(), 1);
        let clean = kind(&states, "clean")[0].read_file(&path("a"));
        let dropped = kind(&states, "dropped")[0].read_file(&path("a"));
        assert_eq!(clean.as_deref(), Some(&b"durable+volatile"[..]));
        assert_eq!(dropped.as_deref(), Some(&b"durable"[..]));

        // A crash state is a fresh disk with both views equal.
        let image = kind(&states, "clean")[0];
        assert_eq!(image.op_count(), 0);
        assert_eq!(image.durable_files()[&path("a")], b"durable+volatile");
    }

    #[test]
    fn create_survives_dropped_only_after_sync_dir() {
        let disk = SimStorage::new();
        disk.create_dir_all(Path::new(DIR)).unwrap();
        let file = disk.create(&path("b")).unwrap();
        write(&file, 0, b"data").unwrap();
        file.sync_data().unwrap();
        let before = disk.crash_states(disk.op_count(), 0);
        assert_eq!(kind(&before, "dropped")[0].read_file(&path("b")), None);
        assert_eq!(
            kind(&before, "dropped")[0].file_names(Path::new(DIR)),
            Vec::<String>::new()
        );
        assert!(kind(&before, "clean")[0].read_file(&path("b")).is_some());
        // The one pending create gives one metadata-prefix image: without it.
        let meta = kind(&before, "metadata-prefix");
        assert_eq!(meta.len(), 1);
        assert_eq!(meta[0].read_file(&path("b")), None);

        disk.sync_dir(Path::new(DIR)).unwrap();
        let after = disk.crash_states(disk.op_count(), 0);
        let dropped = kind(&after, "dropped")[0].read_file(&path("b"));
        assert_eq!(dropped.as_deref(), Some(&b"data"[..]));
        assert!(kind(&after, "metadata-prefix").is_empty());
    }

    #[test]
    fn torn_images_keep_a_sector_prefix_of_the_write() {
        let (disk, file) = disk_with_file();
        write(&file, 0, &[1; 100]).unwrap();
        file.sync_data().unwrap();
        // Four sectors' worth starting mid-sector: pieces 100..512, 512..1024,
        // 1024..1536, 1536..2048, 2048..2148.
        write(&file, 100, &[7; 2048]).unwrap();
        let states = disk.crash_states(disk.op_count(), 0);
        let mut lens = BTreeSet::new();
        for image in kind(&states, "torn") {
            let data = image.read_file(&path("a")).unwrap();
            assert!(data[..100].iter().all(|&b| b == 1), "synced bytes kept");
            assert!(data[100..].iter().all(|&b| b == 7), "a prefix, no holes");
            lens.insert(data.len());
        }
        // k = 0, 1 and 5 / 2 = 2 sectors.
        assert_eq!(lens, BTreeSet::from([100, 512, 1024]));
    }

    #[test]
    fn partial_images_can_keep_a_later_sector_without_an_earlier() {
        let (disk, file) = disk_with_file();
        write(&file, 0, &[9; 1024]).unwrap();
        let prefix = disk.op_count();
        let found = (0..32).any(|seed| {
            kind(&disk.crash_states(prefix, seed), "partial")
                .iter()
                .any(|image| {
                    let data = image.read_file(&path("a")).unwrap();
                    data.len() == 1024 && data[0] == 0 && data[512] == 9
                })
        });
        assert!(found);
    }

    #[test]
    fn metadata_prefix_applies_changes_in_order() {
        let (disk, _) = disk_with_file();
        disk.create(&path("b")).unwrap();
        disk.rename(&path("b"), &path("a")).unwrap();
        disk.remove(&path("a")).unwrap();
        let states = disk.crash_states(disk.op_count(), 0);
        let names: Vec<Vec<String>> = kind(&states, "metadata-prefix")
            .iter()
            .map(|s| s.file_names(Path::new(DIR)))
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["a".to_owned()],
                vec!["a".into(), "b".into()],
                vec!["a".into()]
            ]
        );
        assert!(kind(&states, "clean")[0]
            .file_names(Path::new(DIR))
            .is_empty());
    }

    #[test]
    fn failed_sync_makes_nothing_durable() {
        let (disk, file) = disk_with_file();
        write(&file, 0, b"x").unwrap();
        disk.fail_next_sync(libc::EIO);
        let err = file.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(!disk
            .ops()
            .iter()
            .any(|op| matches!(op, Op::SyncData { .. })));
        assert_eq!(disk.durable_files()[&path("a")], b"");
        let states = disk.crash_states(disk.op_count(), 0);
        assert_eq!(
            kind(&states, "dropped")[0].read_file(&path("a")),
            Some(vec![])
        );
        // Only the next sync fails.
        file.sync_data().unwrap();
        assert_eq!(disk.durable_files()[&path("a")], b"x");
    }

    #[test]
    fn picked_faults_follow_the_current_name() {
        let (disk, file) = disk_with_file();
        let is_b = |p: &Path| p.ends_with("b");
        disk.fail_next_sync_where(libc::EIO, is_b);
        disk.fail_next_write_where(libc::ENOSPC, 2, is_b);
        // Not picked while named `a`.
        write(&file, 0, b"xyz").unwrap();
        file.sync_data().unwrap();
        assert!(disk.sync_failure_pending() && disk.write_failure_pending());
        disk.rename(&path("a"), &path("b")).unwrap();
        let err = write(&file, 3, b"1234").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            disk.read_file(&path("b")).unwrap(),
            b"xyz12",
            "kept 2 bytes"
        );
        let err = file.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(!disk.sync_failure_pending() && !disk.write_failure_pending());
        write(&file, 5, b"34").unwrap();
        file.sync_data().unwrap();
        disk.sync_dir(Path::new(DIR)).unwrap();
        assert_eq!(disk.durable_files()[&path("b")], b"xyz1234");
    }

    #[test]
    fn a_picked_remove_or_rename_fails_once_and_changes_nothing() {
        let (disk, _file) = disk_with_file();
        let ops = disk.op_count();
        let is_a = |p: &Path| p.ends_with("a");
        disk.fail_next_unlink_where(libc::EACCES, is_a);
        // Not picked: a missing file is still ENOENT, the fault stays.
        let err = disk.remove(&path("b")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(disk.unlink_failure_pending());
        let err = disk.rename(&path("a"), &path("b")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        assert!(!disk.unlink_failure_pending());
        assert_eq!(disk.file_names(Path::new(DIR)), ["a"]);
        assert_eq!(disk.op_count(), ops, "a failed rename is not logged");
        disk.fail_next_unlink_where(libc::EIO, is_a);
        let err = disk.remove(&path("a")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(disk.file_names(Path::new(DIR)), ["a"]);
        // Only the next one fails.
        disk.remove(&path("a")).unwrap();
        assert!(disk.file_names(Path::new(DIR)).is_empty());
    }

    #[test]
    fn new_directories_are_unsynced_until_their_parent_is_synced() {
        let disk = SimStorage::new();
        disk.create_dir_all(Path::new("/a/b")).unwrap();
        let dirs = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(disk.unsynced_dirs(), dirs(&["/a", "/a/b"]));
        disk.sync_dir(Path::new("/a")).unwrap();
        assert_eq!(disk.unsynced_dirs(), dirs(&["/a"]));
        disk.create_dir_all(Path::new("/a/b")).unwrap();
        assert_eq!(disk.unsynced_dirs(), dirs(&["/a"]), "existing: unchanged");
        disk.sync_dir(Path::new("/")).unwrap();
        assert!(disk.unsynced_dirs().is_empty());
    }

    #[test]
    fn capacity_fails_growing_writes_with_enospc() {
        let (disk, file) = disk_with_file();
        disk.set_capacity(Some(1000));
        write(&file, 0, &[1; 600]).unwrap();
        let ops = disk.op_count();
        let err = write(&file, 600, &[2; 600]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(file.len().unwrap(), 600, "nothing written");
        assert_eq!(disk.op_count(), ops, "nothing logged");
        write(&file, 0, &[3; 600]).unwrap(); // overwrites do not grow
        write(&file, 600, &[2; 400]).unwrap();
        disk.set_capacity(None);
        write(&file, 1000, &[2; 600]).unwrap();
        assert_eq!(file.len().unwrap(), 1600);
    }

    #[test]
    fn names_and_errors_follow_posix() {
        let (disk, file) = disk_with_file();
        let err = disk.create(&path("a")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        for err in [
            disk.open(&path("nope")).unwrap_err(),
            disk.remove(&path("nope")).unwrap_err(),
            disk.rename(&path("nope"), &path("b")).unwrap_err(),
            disk.create(Path::new("/nodir/a")).unwrap_err(),
        ] {
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        }
        write(&file, 0, b"old").unwrap();
        let b = disk.create(&path("b")).unwrap();
        write(&b, 0, b"new").unwrap();
        disk.rename(&path("b"), &path("a")).unwrap();
        assert_eq!(disk.read_file(&path("a")).unwrap(), b"new");
        assert_eq!(disk.file_names(Path::new(DIR)), vec!["a".to_owned()]);
        disk.flip_bit(&path("a"), 0, 0);
        assert_eq!(disk.read_file(&path("a")).unwrap(), b"oew");
        let mut buf = [0; 8];
        assert_eq!(
            b.read_at(&mut buf, 1).unwrap(),
            2,
            "open file reads past rename"
        );
        assert_eq!(&buf[..2], b"ew");
    }

    /// The replayed "dropped" image must equal the live durable view at every
    /// point of a run mixing every op.
    /// An fdatasync queued on a ring covers the writes done when it was
    /// queued, not those done while it was in flight; a later full sync
    /// covers everything, and an earlier point completing after it undoes
    /// nothing.
    #[test]
    fn a_queued_sync_covers_only_writes_done_when_it_was_queued() {
        let (disk, file) = disk_with_file();
        write(&file, 0, b"one").unwrap();
        let first = disk.sync_point(&path("a")).unwrap();
        write(&file, 3, b"+two").unwrap();
        let second = disk.sync_point(&path("a")).unwrap();
        write(&file, 7, b"+three").unwrap();
        assert_eq!(second.1, first.1 + 1);
        let dropped = |disk: &SimStorage| {
            let states = disk.crash_states(disk.op_count(), 0);
            kind(&states, "dropped")[0].read_file(&path("a")).unwrap()
        };
        disk.sync_through(second.0, second.1);
        assert_eq!(dropped(&disk), b"one+two");
        assert_eq!(disk.durable_files()[&path("a")], b"one+two");
        disk.sync_through(first.0, first.1);
        assert_eq!(dropped(&disk), b"one+two");
        file.sync_data().unwrap();
        assert_eq!(dropped(&disk), b"one+two+three");
        assert!(matches!(
            disk.ops().last(),
            Some(Op::SyncData { writes: 3, .. })
        ));
    }

    /// A failure set up for the next sync goes to a queued fdatasync
    /// completing first as well as to `sync_data`, and is taken once.
    #[test]
    fn a_queued_sync_takes_the_injected_failure() {
        let (disk, file) = disk_with_file();
        write(&file, 0, b"x").unwrap();
        let (ino, _) = disk.sync_point(&path("a")).unwrap();
        disk.fail_next_sync(libc::EIO);
        let e = disk.take_sync_failure(ino, &path("a")).unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(disk.take_sync_failure(ino, &path("a")).is_none());
        file.sync_data().unwrap();
    }

    #[test]
    fn dropped_image_matches_live_durable_view() {
        let disk = SimStorage::new();
        disk.create_dir_all(Path::new("/wal/snap")).unwrap();
        let mut rng = Rng::new(42);
        let mut files: Vec<Arc<dyn StorageFile>> = Vec::new();
        // fdatasyncs queued on a ring, not yet completed: (inode, point).
        let mut issued = Vec::new();
        for step in 0..300 {
            let name = |n: u64| path(&format!("f{}", n % 4));
            match rng.next_u64() % 9 {
                6 => issued.extend(disk.sync_point(&name(rng.next_u64())).ok()),
                7 if !issued.is_empty() => {
                    let (ino, point) = issued.swap_remove(rng.below(issued.len()));
                    disk.sync_through(ino, point);
                }
                0 => files.extend(disk.create(&name(rng.next_u64())).ok()),
                1 | 2 if !files.is_empty() => {
                    let file = &files[rng.next_u64() as usize % files.len()];
                    let data = vec![step as u8; (rng.next_u64() % 900) as usize];
                    write(file, rng.next_u64() % 1500, &data).unwrap();
                }
                3 if !files.is_empty() => files[rng.next_u64() as usize % files.len()]
                    .sync_data()
                    .unwrap(),
                4 => {
                    let to = if rng.coin() {
                        name(rng.next_u64())
                    } else {
                        Path::new("/wal/snap/s").into()
                    };
                    let _ = disk.rename(&name(rng.next_u64()), &to);
                }
                5 => {
                    let _ = disk.remove(&name(rng.next_u64()));
                }
                _ => {
                    let dir = if rng.coin() { DIR } else { "/wal/snap" };
                    disk.sync_dir(Path::new(dir)).unwrap();
                }
            }
            let states = disk.crash_states(disk.op_count(), step);
            let dropped = kind(&states, "dropped")[0];
            assert_eq!(dropped.durable_files(), disk.durable_files(), "step {step}");
        }
    }
}
