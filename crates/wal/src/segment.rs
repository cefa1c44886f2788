//! Segment files: names, spares and the background pre-writer.
//!
//! A spare is a file of exactly `segment_size` zero bytes (or a recycled
//! segment, whose stale records no longer verify once it gets a new salt)
//! that is durable in the directory. The pre-writer keeps `spare_segments`
//! of them ready so that starting a segment costs a rename, not 64 MiB of
//! writes, and so that fdatasync never has to allocate extents.
//!
//! A failed create, write or rename of a spare is retried (nothing it did
//! was made durable, and the partial file is removed). A failed fdatasync of
//! a spare or fsync of the directory never is: it fails the WAL, as every
//! fsync error does (the file system may have dropped what it was asked to
//! make durable and report success next time).

use crate::error::OP_SYNC_DIRECTORY;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::driver::is_no_space;
use crate::durable::Notify;
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile};

/// How long the pre-writer waits before trying again after a failure.
const PREWRITE_RETRY: Duration = Duration::from_millis(200);

pub(crate) fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:020}-{first_index:020}.wal")
}

/// Parses `segment_name`'s output.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 20 || first.len() != 20 {
        return None;
    }
    Some((seq.parse().ok()?, first.parse().ok()?))
}

pub(crate) fn spare_name(n: u64) -> String {
    format!("spare-{n:020}.wal")
}

pub(crate) fn parse_spare_name(name: &str) -> Option<u64> {
    name.strip_prefix("spare-")?
        .strip_suffix(".wal")?
        .parse()
        .ok()
}

/// A ready spare file.
#[derive(Debug, Clone)]
pub(crate) struct Spare {
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: VecDeque<Spare>,
    /// The last pre-write failure, cleared by a success.
    last_error: Option<io::ErrorKind>,
    last_error_text: Option<String>,
    /// An fsync failed: no spare is made or handed out any more.
    fatal: Option<String>,
}

/// Why a spare could not be made.
#[derive(Debug)]
enum SpareError {
    /// A create, write or rename failed: nothing was made durable, the
    /// partial file is gone; trying again is safe.
    Retry(io::Error),
    /// An fdatasync of the spare or an fsync of the directory failed: never
    /// retried, fatal to the WAL.
    Sync {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

/// Spares ready for use, filled by the pre-writer (or on demand).
#[derive(Debug)]
pub(crate) struct SparePool {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    segment_size: u64,
    target: usize,
    next_name: AtomicU64,
    state: Mutex<PoolState>,
    cond: Condvar,
    stop: AtomicBool,
    /// The WAL's failure state, set by an fsync error here.
    notify: Arc<Notify>,
}

impl SparePool {
    pub fn new(
        dir: PathBuf,
        storage: Arc<dyn Storage>,
        segment_size: u64,
        target: usize,
        next_name: u64,
        existing: Vec<Spare>,
        notify: Arc<Notify>,
    ) -> SparePool {
        SparePool {
            dir,
            storage,
            segment_size,
            target,
            next_name: AtomicU64::new(next_name),
            state: Mutex::new(PoolState {
                ready: existing.into(),
                ..PoolState::default()
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            notify,
        }
    }

    /// Takes a spare: a ready one, else one made now (no pre-writer), else
    /// waits for the pre-writer up to `timeout`. `Full` when the disk has no
    /// room for one.
    pub fn take(&self, timeout: Duration) -> Result<Spare> {
        if self.target == 0 {
            let mut st = self.state.lock().expect("pool lock");
            if let Some(reason) = &st.fatal {
                return Err(Error::Failed {
                    reason: reason.clone(),
                });
            }
            if let Some(s) = st.ready.pop_front() {
                return Ok(s);
            }
            drop(st);
            return self.create_spare().map_err(|e| self.spare_error(e));
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("pool lock");
        loop {
            if let Some(reason) = &st.fatal {
                return Err(Error::Failed {
                    reason: reason.clone(),
                });
            }
            if let Some(s) = st.ready.pop_front() {
                self.cond.notify_all();
                return Ok(s);
            }
            if st.last_error == Some(io::ErrorKind::StorageFull) {
                return Err(Error::Full {
                    dir: self.dir.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "a spare segment",
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            self.cond.notify_all();
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .expect("pool lock")
                .0;
        }
    }

    fn spare_error(&self, e: SpareError) -> Error {
        match e {
            SpareError::Retry(e) if is_no_space(&e) => Error::Full {
                dir: self.dir.clone(),
            },
            SpareError::Retry(e) => Error::io("create spare segment", &self.dir, e),
            SpareError::Sync { op, path, error } => {
                let err = Error::io(op, path, error);
                self.fail(err.to_string());
                err
            }
        }
    }

    /// Records an fsync failure: the pool hands out nothing more and the WAL
    /// fails, so that the next append or sync reports it.
    fn fail(&self, reason: String) {
        tracing::error!(dir = %self.dir.display(), error = %reason, "fsync failed while making a spare segment; the WAL accepts no more writes");
        let mut st = self.state.lock().expect("pool lock");
        st.fatal.get_or_insert_with(|| reason.clone());
        self.cond.notify_all();
        drop(st);
        self.notify.fail(reason);
    }

    /// Offers a compacted segment (already renamed to a spare name and
    /// durable in the directory) for reuse. Returns it back when the pool is
    /// full, for the caller to delete.
    pub fn offer(&self, spare: Spare) -> Option<Spare> {
        let mut st = self.state.lock().expect("pool lock");
        if st.ready.len() < self.target.max(1) {
            st.ready.push_back(spare);
            st.last_error = None;
            self.cond.notify_all();
            None
        } else {
            Some(spare)
        }
    }

    pub fn ready_len(&self) -> usize {
        self.state.lock().expect("pool lock").ready.len()
    }

    pub fn next_spare_path(&self) -> PathBuf {
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        self.dir.join(spare_name(n))
    }

    /// Writes a new spare: zeros to a temporary name, fdatasync, rename,
    /// directory fsync. Removes the partial file on failure.
    fn create_spare(&self) -> std::result::Result<Spare, SpareError> {
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("spare-{n:020}.tmp"));
        let path = self.dir.join(spare_name(n));
        fn sync(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpareError {
            let path = path.to_path_buf();
            move |error| SpareError::Sync { op, path, error }
        }
        let result = (|| {
            let file = self.storage.create(&tmp).map_err(SpareError::Retry)?;
            self.storage
                .fill_zeros(&tmp, file.as_ref(), self.segment_size)
                .map_err(SpareError::Retry)?;
            file.sync_data()
                .map_err(sync("fdatasync spare segment", &tmp))?;
            self.storage
                .rename(&tmp, &path)
                .map_err(SpareError::Retry)?;
            self.storage
                .sync_dir(&self.dir)
                .map_err(sync(OP_SYNC_DIRECTORY, &self.dir))?;
            Ok(file)
        })();
        match result {
            Ok(file) => Ok(Spare { path, file }),
            Err(e) => {
                // No directory fsync: a `.tmp` that comes back after a
                // crash is removed by recovery.
                let _ = self.storage.remove(&tmp);
                Err(e)
            }
        }
    }

    /// The pre-writer's loop: keep `target` spares ready until stopped.
    fn run(&self) {
        let mut st = self.state.lock().expect("pool lock");
        while !self.stop.load(Ordering::Acquire) {
            if st.ready.len() >= self.target {
                st = self
                    .cond
                    .wait_timeout(st, Duration::from_secs(1))
                    .expect("pool lock")
                    .0;
                continue;
            }
            drop(st);
            let made = self.create_spare();
            st = self.state.lock().expect("pool lock");
            match made {
                Ok(spare) => {
                    tracing::debug!(path = %spare.path.display(), "pre-wrote spare segment");
                    st.ready.push_back(spare);
                    st.last_error = None;
                    st.last_error_text = None;
                    self.cond.notify_all();
                }
                Err(SpareError::Sync { op, path, error }) => {
                    // Never retried: an fsync error may mean the file system
                    // dropped what it was asked to make durable.
                    drop(st);
                    self.fail(Error::io(op, path, error).to_string());
                    return;
                }
                Err(SpareError::Retry(e)) => {
                    let kind = if is_no_space(&e) {
                        io::ErrorKind::StorageFull
                    } else {
                        e.kind()
                    };
                    if st.last_error_text.as_deref() != Some(&e.to_string()) {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "cannot pre-write a spare segment");
                    }
                    st.last_error = Some(kind);
                    st.last_error_text = Some(e.to_string());
                    self.cond.notify_all();
                    st = self
                        .cond
                        .wait_timeout(st, PREWRITE_RETRY)
                        .expect("pool lock")
                        .0;
                }
            }
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _st = self.state.lock().expect("pool lock");
        self.cond.notify_all();
    }
}

/// Starts the pre-writer thread when the pool has a target.
pub(crate) fn start_prewriter(pool: Arc<SparePool>) -> Result<Option<JoinHandle<()>>> {
    if pool.target == 0 {
        return Ok(None);
    }
    let handle = std::thread::Builder::new()
        .name("skiff-wal-prewrite".into())
        .spawn(move || pool.run())
        .map_err(|e| Error::io("spawn pre-writer", Path::new("skiff-wal-prewrite"), e))?;
    Ok(Some(handle))
}
