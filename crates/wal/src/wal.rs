//! The public WAL: placing writes, reading the log, compaction.
//!
//! Writers encode and checksum on their own thread, then take the state lock
//! only to check indexes, place their records and queue them. The lock is
//! never held across I/O except the rare wait for a spare segment.

use crate::error::OP_SYNC_DIRECTORY;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};

use crate::driver::{
    pack_pos, unpack_pos, Driver, IoBackend, NewSegment, Op, Records, SyncBackend, WriteOp,
};
use crate::durable::{Notify, Ticket};
use crate::error::{Error, Result};
use crate::format::{self, Body, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::index::{LogIndex, RecordLoc};
use crate::metrics::Metrics;
use crate::options::{Backend, Options};
use crate::recovery::{self, apply_snapshot, apply_truncate, RecoveryReport};
use crate::ring::Doorbell;
use crate::segment::{segment_name, start_prewriter, Spare, SparePool};
use crate::storage::{OsStorage, Storage, StorageFile};
use crate::uring;
use crate::{Entry, HardState, SnapshotMeta};

/// What [`Wal::try_write`] returns instead of a ticket.
#[derive(Debug)]
pub enum TryWriteError {
    /// The write would have had to wait (the queue to the I/O driver is
    /// full, or no pre-written segment is ready): nothing was written, and
    /// here is the batch back.
    Busy(WriteBatch),
    /// As [`Wal::write`] fails.
    Failed(Error),
}

impl From<Error> for TryWriteError {
    fn from(e: Error) -> TryWriteError {
        TryWriteError::Failed(e)
    }
}

/// Everything one write makes durable together, applied in this order:
/// truncate, snapshot, entries, hard state.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Remove entries at and above this index (a Raft log conflict).
    pub truncate_from: Option<u64>,
    /// Record a snapshot. Entries it covers stop being served; a log that
    /// does not contain its (index, term) is discarded and restarts after it.
    pub snapshot: Option<SnapshotMeta>,
    /// Contiguous entries; the first continues the log.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
}

#[derive(Debug)]
struct SegInfo {
    seq: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    salt: u64,
    /// Sequence number of the last write placed in it.
    last_write_seq: u64,
}

/// Where the next write goes in the last segment.
#[derive(Debug, Clone, Copy)]
struct Active {
    seq: u64,
    salt: u64,
    offset: u64,
}

#[derive(Debug)]
struct State {
    index: LogIndex,
    hard_state: HardState,
    snapshot: Option<SnapshotMeta>,
    /// The write that carried the latest snapshot record.
    snapshot_seq: u64,
    /// Oldest first; the last one is where writes go.
    segments: VecDeque<SegInfo>,
    /// `None` until a write starts a segment (fresh WAL, or the last segment
    /// had a torn tail).
    active: Option<Active>,
    /// Where the last segment ends: `prev_end` of the next one.
    last_end: u64,
    next_write_seq: u64,
    next_segment_seq: u64,
    /// Records whose bodies are held in memory until durable: (write seq,
    /// first index, record number in the index).
    held: VecDeque<(u64, u64, u64)>,
    /// How to undo each write placed but not yet written whole (oldest
    /// first): a write that runs out of space is undone with every write
    /// after it. Trimmed to what the driver has not written on every
    /// write, so about as long as the queue.
    undo: VecDeque<Undo>,
    closed: bool,
}

/// What one write changed in [`State`], as it was before: enough to put
/// the state back as if the write (and every later one, undone first) had
/// never been placed.
#[derive(Debug)]
struct Undo {
    seq: u64,
    /// The index's journal before the write ([`LogIndex::rollback_to`]).
    index_mark: u64,
    hard_state: HardState,
    /// The snapshot and `snapshot_seq`, if the write replaced them.
    snapshot: Option<(Option<SnapshotMeta>, u64)>,
    active: Option<Active>,
    last_end: u64,
    next_segment_seq: u64,
    /// `last_write_seq` of the last segment before the write.
    back_last_write_seq: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    opts: Options,
    storage: Arc<dyn Storage>,
    state: Mutex<State>,
    /// Held by [`Wal::compact`] throughout: the segments one compaction
    /// removes stay in `State::segments` until their files are gone, so a
    /// second one must not pick them too.
    compacting: Mutex<()>,
    notify: Arc<Notify>,
    tx: Sender<Op>,
    doorbell: Option<Arc<Doorbell>>,
    durable_pos: Arc<AtomicU64>,
    metrics: Arc<Mutex<Metrics>>,
    pool: Arc<SparePool>,
    backend: Backend,
    salt_seed: AtomicU64,
    recovery: RecoveryReport,
}

/// A segmented, checksummed write-ahead log with group commit.
///
/// `Wal` is `Sync`: many threads may write concurrently; writes are ordered
/// by the state lock and made durable in that order.
#[derive(Debug)]
pub struct Wal {
    inner: Arc<Inner>,
    driver: Option<JoinHandle<()>>,
    prewriter: Option<JoinHandle<()>>,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` on the real file system.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Wal> {
        Wal::open_with_storage(dir, opts, Arc::new(OsStorage))
    }

    /// Opens the WAL in `dir` on the given storage, recovering what is there
    /// (see [`crate::recovery`]).
    pub fn open_with_storage(
        dir: impl AsRef<Path>,
        opts: Options,
        storage: Arc<dyn Storage>,
    ) -> Result<Wal> {
        Wal::open_with_backend(dir.as_ref(), opts, storage, None)
    }

    /// [`Wal::open_with_storage`] with the I/O backend given, and which
    /// kind it is (tests script one to complete groups out of order, or run
    /// the io_uring logic over a simulated ring), or chosen from the options.
    pub(crate) fn open_with_backend(
        dir: &Path,
        opts: Options,
        storage: Arc<dyn Storage>,
        io: Option<(Box<dyn IoBackend>, Backend)>,
    ) -> Result<Wal> {
        opts.validate()?;
        let dir = dir.to_path_buf();
        let rec = recovery::recover(storage.as_ref(), &dir, opts.segment_size)?;
        let (io, backend): (Box<dyn IoBackend>, Backend) = match io {
            Some(given) => given,
            None => choose_backend(&opts, storage.as_ref())?,
        };
        let doorbell = io.doorbell();
        tracing::info!(
            dir = %dir.display(),
            backend = %backend,
            segments = rec.report.segments,
            first_index = rec.index.first(),
            last_index = rec.index.next() - 1,
            "WAL opened"
        );

        let mut segments = VecDeque::new();
        for s in &rec.segments {
            segments.push_back(SegInfo {
                seq: s.seq,
                path: s.path.clone(),
                file: s.file.clone(),
                salt: s.salt,
                last_write_seq: 0,
            });
        }
        let last = rec.segments.last();
        // What recovery read may so far only be in the page cache (a process
        // crash keeps dirty pages): make it durable before any watermark
        // claims it is.
        if let Some(l) = last {
            l.file
                .sync_data()
                .map_err(|e| Error::io("fdatasync", &l.path, e))?;
        }
        let active = match last {
            Some(l) if rec.continue_last => Some(Active {
                seq: l.seq,
                salt: l.salt,
                offset: l.end,
            }),
            _ => None,
        };
        let durable_pos = Arc::new(AtomicU64::new(last.map_or(0, |l| pack_pos(l.seq, l.end))));
        let mut index = rec.index;
        index.start_journal();
        let state = State {
            index,
            hard_state: rec.hard_state,
            snapshot: rec.snapshot,
            snapshot_seq: 0,
            segments,
            active,
            last_end: last.map_or(0, |l| l.end),
            next_write_seq: 1,
            next_segment_seq: last.map_or(1, |l| l.seq + 1),
            held: VecDeque::new(),
            undo: VecDeque::new(),
            closed: false,
        };
        let (tx, rx) = crossbeam_channel::bounded(opts.queue_depth);
        let notify = Arc::new(Notify::new(0));
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let pool = Arc::new(SparePool::new(
            dir.clone(),
            storage.clone(),
            opts.segment_size,
            opts.spare_segments,
            rec.next_spare_name,
            rec.spares,
            notify.clone(),
        ));
        let driver = Driver {
            rx,
            sleeps_in_ring: doorbell.is_some(),
            notify: notify.clone(),
            pool: pool.clone(),
            metrics: metrics.clone(),
            durable_pos: durable_pos.clone(),
            storage: storage.clone(),
            dir: dir.clone(),
            active: last
                .filter(|_| rec.continue_last)
                .map(|l| (l.seq, l.path.clone(), l.file.clone())),
            backend: io,
            group_bytes_max: opts.group_bytes_max,
            segment_size: opts.segment_size,
            groups_inflight_max: opts.groups_inflight_max,
            held: None,
            pending: VecDeque::new(),
            next_group: 0,
            spare_bufs: Vec::new(),
        };
        let driver = std::thread::Builder::new()
            .name("skiff-wal-io".into())
            .spawn(move || driver.run())
            .map_err(|e| Error::io("spawn I/O driver", &dir, e))?;
        let prewriter = start_prewriter(pool.clone())?;
        let inner = Arc::new(Inner {
            dir,
            opts,
            storage,
            state: Mutex::new(state),
            compacting: Mutex::new(()),
            notify,
            tx,
            doorbell,
            durable_pos,
            metrics,
            pool,
            backend,
            salt_seed: AtomicU64::new(random_seed()),
            recovery: rec.report,
        });
        Ok(Wal {
            inner,
            driver: Some(driver),
            prewriter,
        })
    }

    /// What recovery found and did when this WAL was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// The backend that runs (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// Appends contiguous entries that continue the log.
    pub fn append(&self, entries: Vec<Entry>) -> Result<Ticket> {
        self.write(WriteBatch {
            entries,
            ..WriteBatch::default()
        })
    }

    pub fn save_hard_state(&self, hard_state: HardState) -> Result<Ticket> {
        self.write(WriteBatch {
            hard_state: Some(hard_state),
            ..WriteBatch::default()
        })
    }

    /// Removes entries at and above `from`.
    pub fn truncate_suffix(&self, from: u64) -> Result<Ticket> {
        self.write(WriteBatch {
            truncate_from: Some(from),
            ..WriteBatch::default()
        })
    }

    /// Records snapshot metadata; [`Wal::compact`] may delete what it covers
    /// once this is durable.
    pub fn save_snapshot(&self, meta: SnapshotMeta) -> Result<Ticket> {
        self.write(WriteBatch {
            snapshot: Some(meta),
            ..WriteBatch::default()
        })
    }

    /// Queues a batch as one write and returns at once; the ticket says when
    /// it is durable. Blocks (up to `submit_timeout`) only when the queue is
    /// full or a new segment has to wait for a spare.
    pub fn write(&self, batch: WriteBatch) -> Result<Ticket> {
        self.submit(batch, true).map_err(|e| match e {
            TryWriteError::Failed(e) => e,
            TryWriteError::Busy(_) => unreachable!("a waiting write is never busy"),
        })
    }

    /// [`Wal::write`] that never waits: when the queue to the I/O driver is
    /// full, or the write needs a new segment and no pre-written spare is
    /// ready, nothing is written and the batch comes back
    /// ([`TryWriteError::Busy`]) to be offered again later, in the same
    /// order as any batch after it. An event loop hands its writes over
    /// with this, so a stalled disk never stops the loop.
    pub fn try_write(&self, batch: WriteBatch) -> std::result::Result<Ticket, TryWriteError> {
        // Full already: give it back before encoding anything.
        if self.inner.tx.is_full() {
            return Err(TryWriteError::Busy(batch));
        }
        self.submit(batch, false)
    }

    /// Queues `batch`; `wait`: up to `submit_timeout` for queue room or a
    /// spare segment, else [`TryWriteError::Busy`] at once.
    fn submit(&self, batch: WriteBatch, wait: bool) -> std::result::Result<Ticket, TryWriteError> {
        let inner = &*self.inner;
        check_batch_shape(&batch, &inner.opts)?;
        // Encode and checksum outside the lock.
        let mut bodies = Records::default();
        if let Some(from) = batch.truncate_from {
            bodies.push(Body::truncate(from));
        }
        if let Some(meta) = &batch.snapshot {
            bodies.push(Body::snapshot(meta));
        }
        let entries_body = (!batch.entries.is_empty()).then(|| Body::entries(&batch.entries));
        let entries_at = bodies.len();
        if let Some(b) = &entries_body {
            bodies.push(b.clone());
        }
        if let Some(hs) = &batch.hard_state {
            bodies.push(Body::hard_state(hs));
        }
        let len: u64 = bodies.iter().map(|b| b.framed_len() as u64).sum();

        let mut st = self.lock();
        if let Some(e) = inner.notify.failure() {
            return Err(e.into());
        }
        if st.closed {
            return Err(Error::Closed.into());
        }
        release_held(&mut st, inner.notify.durable_seq());
        forget_written(&mut st, inner.notify.written_seq());
        let entries_next = check_batch_order(&st, &batch)?;
        debug_assert!(batch
            .entries
            .first()
            .is_none_or(|e| e.index == entries_next));

        let seq = st.next_write_seq;
        let mut new_segment = None;
        let fits = st
            .active
            .is_some_and(|a| a.offset + len <= inner.opts.segment_size);
        if !fits {
            let wait_max = if wait {
                inner.opts.submit_timeout
            } else {
                Duration::ZERO
            };
            match self.new_segment(&st, len, entries_next, wait_max) {
                Ok(ns) => new_segment = Some(ns),
                Err(Error::Timeout { .. }) if !wait => {
                    drop(st);
                    return Err(TryWriteError::Busy(batch));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let (segment_seq, salt, offset) = match (&new_segment, st.active) {
            (Some(ns), _) => (ns.header.seq, ns.header.salt, 0u64),
            (None, Some(a)) => (a.seq, a.salt, a.offset),
            (None, None) => unreachable!("a write without a new segment has an active one"),
        };
        let prefix: u64 = new_segment.as_ref().map_or(0, |ns: &NewSegment| {
            SEGMENT_HEADER_LEN as u64
                + ns.checkpoint
                    .iter()
                    .map(|b| b.framed_len() as u64)
                    .sum::<u64>()
        });
        let (durable_seg, durable_off) = unpack_pos(inner.durable_pos.load(Ordering::Acquire));
        let watermark = if durable_seg == segment_seq && new_segment.is_none() {
            durable_off.min(offset)
        } else {
            0
        };
        let entries_offset = offset
            + prefix
            + bodies
                .iter()
                .take(entries_at)
                .map(|b| b.framed_len() as u64)
                .sum::<u64>();
        let op = WriteOp {
            seq,
            segment_seq,
            offset,
            len: prefix + len,
            salt,
            watermark,
            bodies,
            new_segment,
            entries: batch.entries.len() as u64,
            queued_at: Instant::now(),
        };
        let started = op
            .new_segment
            .as_ref()
            .map(|ns| (ns.header, ns.path.clone(), ns.spare.clone()));
        // try_send first: the common case needs no deadline (no clock read).
        let sent = match inner.tx.try_send(Op::Write(op)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(op)) if !wait => {
                give_back_spare(inner, op);
                drop(st);
                return Err(TryWriteError::Busy(batch));
            }
            Err(TrySendError::Full(op)) => inner.tx.send_timeout(op, inner.opts.submit_timeout),
            Err(TrySendError::Disconnected(op)) => Err(SendTimeoutError::Disconnected(op)),
        };
        match sent {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(op)) => {
                give_back_spare(inner, op);
                return Err(Error::Timeout {
                    what: "room in the WAL queue",
                    waited_ms: inner.opts.submit_timeout.as_millis() as u64,
                }
                .into());
            }
            Err(SendTimeoutError::Disconnected(_)) => {
                return Err(inner.notify.failure().unwrap_or(Error::Closed).into());
            }
        }
        if let Some(d) = &inner.doorbell {
            d.ring();
        }

        // Queued: apply to the in-memory state, keeping how to undo it.
        let undo = Undo {
            seq,
            index_mark: st.index.journal_mark(),
            hard_state: st.hard_state,
            snapshot: batch
                .snapshot
                .as_ref()
                .map(|_| (st.snapshot.clone(), st.snapshot_seq)),
            active: st.active,
            last_end: st.last_end,
            next_segment_seq: st.next_segment_seq,
            back_last_write_seq: st.segments.back().map(|s| s.last_write_seq),
        };
        st.undo.push_back(undo);
        st.next_write_seq += 1;
        if let Some((header, path, spare)) = started {
            st.segments.push_back(SegInfo {
                seq: header.seq,
                path,
                file: spare.file,
                salt: header.salt,
                last_write_seq: seq,
            });
            st.next_segment_seq += 1;
            st.active = Some(Active {
                seq: header.seq,
                salt: header.salt,
                offset: 0,
            });
        }
        let total = prefix + len;
        let active = st.active.as_mut().expect("active after placement");
        active.offset += total;
        let end = active.offset;
        st.last_end = end;
        st.segments
            .back_mut()
            .expect("a segment exists")
            .last_write_seq = seq;
        if let Some(from) = batch.truncate_from {
            apply_truncate(&mut st.index, from);
        }
        if let Some(meta) = batch.snapshot {
            apply_snapshot(&mut st.index, &meta);
            st.snapshot = Some(meta);
            st.snapshot_seq = seq;
        }
        if let Some(body) = entries_body {
            let first_index = batch.entries[0].index;
            let number = st.index.push(
                RecordLoc {
                    first_index,
                    count: batch.entries.len() as u64,
                    segment_seq,
                    offset: entries_offset,
                    framed_len: body.framed_len() as u32,
                    body: Some(body.bytes),
                    write_seq: seq,
                },
                batch.entries.iter().map(|e| e.term),
            );
            st.held.push_back((seq, first_index, number));
        }
        if let Some(hs) = batch.hard_state {
            st.hard_state = hs;
        }
        #[cfg(debug_assertions)]
        if st.index.records().len() < 4096 {
            st.index.check();
        }
        drop(st);
        Ok(Ticket::new(
            seq,
            inner.notify.clone(),
            inner.opts.wait_timeout,
        ))
    }

    /// Builds the start of a new segment for a write of `len` bytes. Takes a
    /// spare (which may wait, up to `wait_max`).
    fn new_segment(
        &self,
        st: &State,
        len: u64,
        first_index: u64,
        wait_max: Duration,
    ) -> Result<NewSegment> {
        let inner = &*self.inner;
        let mut checkpoint = Vec::new();
        checkpoint.push(Body::hard_state(&st.hard_state));
        if let Some(meta) = &st.snapshot {
            checkpoint.push(Body::snapshot(meta));
        }
        let prefix = SEGMENT_HEADER_LEN as u64
            + checkpoint
                .iter()
                .map(|b| b.framed_len() as u64)
                .sum::<u64>();
        if prefix + len > inner.opts.segment_size {
            return Err(Error::TooLarge {
                bytes: len,
                max: inner.opts.segment_size - prefix,
            });
        }
        let spare = inner.pool.take(wait_max).inspect_err(|e| {
            // An I/O error making a spare (an fsync among them) is fatal like
            // any other: never carry on past it. ENOSPC and timeouts are not.
            if e.is_fatal() {
                inner.notify.fail(e.to_string());
            }
        })?;
        let seq = st.next_segment_seq;
        let header = SegmentHeader {
            seq,
            first_index,
            salt: inner.next_salt(),
            prev_end: st.last_end,
        };
        Ok(NewSegment {
            path: inner.dir.join(segment_name(seq, first_index)),
            spare,
            header,
            checkpoint,
        })
    }

    /// Blocks until every write queued so far is durable.
    ///
    /// A failed WAL reports its failure even when everything queued was
    /// durable before it (a failed fsync of a spare segment, say); if the
    /// last write was dropped for want of space, `NoSpace`.
    pub fn sync(&self) -> Result<()> {
        if let Some(e) = self.inner.notify.failure() {
            return Err(e);
        }
        let seq = self.lock().next_write_seq - 1;
        if seq == 0 {
            return Ok(());
        }
        self.inner.notify.wait(seq, self.inner.opts.wait_timeout)
    }

    /// Deletes (or recycles) whole segments that hold nothing above `upto`.
    /// Needs a durable snapshot at or above `upto`; when the newest snapshot
    /// record covers `upto` but is not durable yet, waits for it (up to
    /// `wait_timeout`). Returns how many segments were removed.
    ///
    /// Segments go oldest first, and each leaves the WAL's list only once
    /// its file is gone (removed, or renamed to a spare). When a remove or
    /// rename fails the error is returned; the segments not yet removed stay
    /// listed (and on disk, a contiguous run as recovery wants it), and the
    /// next compaction removes them. Those removed before the failure are
    /// not counted anywhere. A failed directory fsync is different: like
    /// any failed fsync it fails the WAL for good (`Error::Failed` from then
    /// on).
    pub fn compact(&self, upto: u64) -> Result<usize> {
        let inner = &*self.inner;
        // Nothing it guards can be left half changed by a panic.
        let _compacting = inner
            .compacting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The snapshot record that covers `upto` may already have been
        // followed by a newer one that is written but not yet durable (a
        // node records its next snapshot while the compaction for the last
        // one waits its turn): the WAL keeps only the newest record, so wait
        // for it (up to `wait_timeout`) rather than fail. What the wait
        // answers is seen below: a failure fails the compaction, a dropped
        // record leaves the older, durable one in place.
        let pending = {
            let st = self.lock();
            let newer = st.snapshot.as_ref().is_some_and(|s| s.index >= upto);
            (newer && st.snapshot_seq > inner.notify.durable_seq()).then_some(st.snapshot_seq)
        };
        if let Some(seq) = pending {
            let _ = inner.notify.wait(seq, inner.opts.wait_timeout);
        }
        let victims: Vec<(u64, PathBuf, Arc<dyn StorageFile>)> = {
            let mut st = self.lock();
            if let Some(e) = inner.notify.failure() {
                return Err(e);
            }
            let durable = inner.notify.durable_seq();
            let covered = st
                .snapshot
                .as_ref()
                .is_some_and(|s| s.index >= upto && st.snapshot_seq <= durable);
            if !covered {
                return Err(Error::SnapshotNotDurable { index: upto });
            }
            let keep_from = st.index.first_segment_above(upto).unwrap_or(u64::MAX);
            // A write not yet written may still be dropped for want of
            // space, and the log then goes back to the segment it was
            // placed after: that one must stay.
            forget_written(&mut st, inner.notify.written_seq());
            let keep_for_undo = st
                .undo
                .iter()
                .filter_map(|u| u.active.map(|a| a.seq))
                .min()
                .unwrap_or(u64::MAX);
            // Never the last segment: writes go there, or its end is the
            // seal point of the next one. The victims stay listed (and
            // readable) until their files are gone: a roll back only drops
            // segments after the last one of now, and other compactions
            // wait for this one.
            let candidates = st.segments.len().saturating_sub(1);
            st.segments
                .iter()
                .take(candidates)
                .take_while(|s| s.seq < keep_from.min(keep_for_undo) && s.last_write_seq <= durable)
                .map(|s| (s.seq, s.path.clone(), s.file.clone()))
                .collect()
        };
        if victims.is_empty() {
            return Ok(0);
        }
        // A failed directory fsync is never retried: the WAL fails, as for
        // any fsync.
        let sync_dir = || {
            inner.storage.sync_dir(&inner.dir).map_err(|e| {
                let e = Error::io(OP_SYNC_DIRECTORY, &inner.dir, e);
                inner.notify.fail(e.to_string());
                e
            })
        };
        let mut n = 0;
        for (seq, seg_path, file) in victims {
            // Oldest first, each made durable before the next: a crash part
            // way leaves a contiguous run of segments whatever the file
            // system reorders.
            if inner.pool.ready_len() < inner.opts.spare_segments.max(1)
                && file.len().ok() == Some(inner.opts.segment_size)
            {
                let path = inner.pool.next_spare_path();
                inner
                    .storage
                    .rename(&seg_path, &path)
                    .map_err(|e| Error::io("recycle segment", &seg_path, e))?;
                self.forget_compacted(seq);
                n += 1;
                sync_dir()?;
                if let Some(extra) = inner.pool.offer(Spare { path, file }) {
                    inner
                        .storage
                        .remove(&extra.path)
                        .map_err(|e| Error::io("remove segment", &extra.path, e))?;
                    sync_dir()?;
                }
            } else {
                inner
                    .storage
                    .remove(&seg_path)
                    .map_err(|e| Error::io("remove segment", &seg_path, e))?;
                self.forget_compacted(seq);
                n += 1;
                sync_dir()?;
            }
        }
        tracing::debug!(segments = n, upto, "compacted WAL");
        Ok(n)
    }

    /// Takes segment `seq`, whose file compaction just removed or renamed,
    /// off the list: it is the oldest one.
    fn forget_compacted(&self, seq: u64) {
        let mut st = self.lock();
        let at = st.segments.iter().position(|s| s.seq == seq);
        debug_assert_eq!(at, Some(0), "compaction removes the oldest segment");
        if let Some(at) = at {
            st.segments.remove(at);
        }
    }

    /// Entries in `lo..hi`.
    pub fn read(&self, lo: u64, hi: u64) -> Result<Vec<Entry>> {
        let (locs, files) = {
            let st = self.lock();
            check_range(&st, lo, hi)?;
            let mut locs = Vec::new();
            let mut files: Vec<(u64, Arc<dyn StorageFile>, u64, PathBuf)> = Vec::new();
            if lo < hi {
                let mut pos = st.index.record_pos(lo).expect("lo is live");
                while let Some(r) = st.index.records().get(pos) {
                    if r.first_index >= hi {
                        break;
                    }
                    if r.body.is_none() && !files.iter().any(|f| f.0 == r.segment_seq) {
                        let seg = st
                            .segments
                            .iter()
                            .find(|s| s.seq == r.segment_seq)
                            .expect("a live record's segment exists");
                        files.push((seg.seq, seg.file.clone(), seg.salt, seg.path.clone()));
                    }
                    locs.push(r.clone());
                    pos += 1;
                }
            }
            (locs, files)
        };
        let mut out: Vec<Entry> = Vec::with_capacity((hi - lo) as usize);
        prefault(
            out.as_ptr().cast(),
            out.capacity() * std::mem::size_of::<Entry>(),
        );
        let corrupt_body = |loc: &RecordLoc, e: format::BodyError| {
            let segment = self
                .lock()
                .segments
                .iter()
                .find(|s| s.seq == loc.segment_seq)
                .map_or_else(|| self.inner.dir.clone(), |s| s.path.clone());
            Error::Corruption {
                segment,
                offset: loc.offset,
                reason: e.0.to_string(),
            }
        };
        let mut i = 0;
        while i < locs.len() {
            let loc = &locs[i];
            if let Some(body) = &loc.body {
                decode_live(body, loc, lo, hi, &mut out).map_err(|e| corrupt_body(loc, e))?;
                i += 1;
                continue;
            }
            // The records on disk that follow in the same segment are read
            // with this one, in one read (a restarting node reads the whole
            // log: one read per record cost more than the copy).
            let start = loc.offset;
            let mut end = start + u64::from(loc.framed_len);
            let mut j = i + 1;
            while let Some(n) = locs.get(j) {
                let n_end = n.offset + u64::from(n.framed_len);
                if n.body.is_some()
                    || n.segment_seq != loc.segment_seq
                    || n.offset < end
                    || n.offset - end > READ_GAP_MAX
                    || n_end - start > READ_CHUNK_MAX
                {
                    break;
                }
                end = n_end;
                j += 1;
            }
            let (_, file, salt, path) = files
                .iter()
                .find(|f| f.0 == loc.segment_seq)
                .expect("collected");
            let bodies = read_chunk(file.as_ref(), path, start, end).and_then(|chunk| {
                locs[i..j]
                    .iter()
                    .map(|loc| verify_body(&chunk, start, path, *salt, loc))
                    .collect::<Result<Vec<Bytes>>>()
            });
            let bodies = match bodies {
                Ok(b) => b,
                Err(e) => {
                    // Compaction may have recycled the file meanwhile.
                    check_range(&self.lock(), lo, hi)?;
                    return Err(e);
                }
            };
            for (loc, body) in locs[i..j].iter().zip(&bodies) {
                decode_live(body, loc, lo, hi, &mut out).map_err(|e| corrupt_body(loc, e))?;
            }
            i = j;
        }
        assert_eq!(out.len() as u64, hi - lo, "read returns exactly the range");
        Ok(out)
    }

    /// Term of `index`: of a live entry, of the snapshot's last entry, or 0
    /// for index 0.
    pub fn term(&self, index: u64) -> Result<u64> {
        let st = self.lock();
        if let Some(t) = st.index.term(index) {
            return Ok(t);
        }
        if let Some(s) = &st.snapshot {
            if s.index == index {
                return Ok(s.term);
            }
        }
        if index == 0 {
            return Ok(0);
        }
        if index < st.index.first() {
            return Err(Error::Compacted {
                index,
                first_index: st.index.first(),
            });
        }
        Err(Error::Unavailable {
            index,
            last_index: st.index.next() - 1,
        })
    }

    /// First live index (1 for an empty log that never had a snapshot).
    pub fn first_index(&self) -> u64 {
        self.lock().index.first()
    }

    /// Last index (`first_index() - 1` when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.lock().index.next() - 1
    }

    /// The last hard state written (durable once its write's ticket is).
    pub fn hard_state(&self) -> HardState {
        self.lock().hard_state
    }

    pub fn snapshot(&self) -> Option<SnapshotMeta> {
        self.lock().snapshot.clone()
    }

    /// Number of segment files in use.
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }

    /// A copy of the driver's histograms and counters, current to the last
    /// group submitted or completed.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.lock().expect("metrics lock").clone()
    }

    /// Flushes what is queued, stops the threads and reports whether
    /// everything queued became durable.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let last = {
            // Runs from Drop: a panic that poisoned the lock must not turn
            // into a second panic (an abort) here. The state is only read.
            let mut st = self
                .inner
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.closed = true;
            st.next_write_seq - 1
        };
        let _ = self
            .inner
            .tx
            .send_timeout(Op::Shutdown, self.inner.opts.submit_timeout);
        if let Some(d) = &self.inner.doorbell {
            d.ring();
        }
        if let Some(h) = self.driver.take() {
            let _ = h.join();
        }
        self.inner.pool.stop();
        if let Some(h) = self.prewriter.take() {
            let _ = h.join();
        }
        if let Some(e) = self.inner.notify.failure() {
            return Err(e);
        }
        // Writes dropped for want of space were answered already.
        let last = self.inner.notify.kept_at_or_before(last);
        if self.inner.notify.durable_seq() < last {
            return Err(Error::Failed {
                reason: "the I/O driver stopped before everything queued was durable".into(),
            });
        }
        Ok(())
    }

    /// The state, rolled back first if writes were dropped for want of
    /// space since it was last taken: whatever reads it (a write placing
    /// itself, `last_index`, `read`) sees the log without them.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.inner.state.lock().expect("WAL state lock poisoned");
        if let Some(from) = self.inner.notify.open_rejection() {
            roll_back(&mut st, from);
            self.inner.notify.close_rejection(st.next_write_seq - 1);
        }
        st
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if self.driver.is_some() {
            let _ = self.shutdown();
        }
    }
}

impl Inner {
    fn next_salt(&self) -> u64 {
        splitmix(
            self.salt_seed
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed),
        )
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn choose_backend(opts: &Options, storage: &dyn Storage) -> Result<(Box<dyn IoBackend>, Backend)> {
    let want_uring = match opts.backend {
        Backend::Pwritev => false,
        Backend::IoUring => {
            if !storage.has_raw_fds() {
                return Err(Error::InvalidOption {
                    field: "backend",
                    reason: "io-uring needs storage with file descriptors".into(),
                });
            }
            true
        }
        Backend::Auto => storage.has_raw_fds(),
    };
    if want_uring {
        match uring::backend(opts.groups_inflight_max) {
            Ok(b) => return Ok((Box::new(b), Backend::IoUring)),
            Err(e) if opts.backend == Backend::IoUring => {
                return Err(Error::InvalidOption {
                    field: "backend",
                    reason: format!("io_uring cannot be set up here: {e}"),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; using the pwritev backend");
            }
        }
    }
    Ok((Box::new(SyncBackend::default()), Backend::Pwritev))
}

/// Checks what does not depend on the log: contiguity inside the batch,
/// sizes.
fn check_batch_shape(batch: &WriteBatch, opts: &Options) -> Result<()> {
    for w in batch.entries.windows(2) {
        if w[1].index != w[0].index + 1 {
            return Err(Error::NonContiguous {
                expected: w[0].index + 1,
                got: w[1].index,
            });
        }
        if w[1].term < w[0].term {
            return Err(Error::TermRegression {
                index: w[1].index,
                term: w[1].term,
                previous: w[0].term,
            });
        }
    }
    if let Some(meta) = &batch.snapshot {
        if meta.data.len() > opts.snapshot_meta_max {
            return Err(Error::TooLarge {
                bytes: meta.data.len() as u64,
                max: opts.snapshot_meta_max as u64,
            });
        }
    }
    Ok(())
}

/// Checks the batch against the log and returns the index its entries must
/// start at. Mirrors what `apply_truncate` and `apply_snapshot` will do.
fn check_batch_order(st: &State, batch: &WriteBatch) -> Result<u64> {
    let first = st.index.first();
    let mut next = st.index.next();
    if let Some(from) = batch.truncate_from {
        if let Some(s) = &st.snapshot {
            if from <= s.index {
                return Err(Error::BelowSnapshot {
                    index: from,
                    snapshot_index: s.index,
                });
            }
        }
        if from < first {
            return Err(Error::Compacted {
                index: from,
                first_index: first,
            });
        }
        if from > next {
            return Err(Error::Unavailable {
                index: from,
                last_index: next - 1,
            });
        }
        next = from;
    }
    // The term of the entry just before `next`, where known.
    let mut term_before = if next > first {
        st.index.term(next - 1)
    } else {
        st.snapshot
            .as_ref()
            .filter(|s| s.index + 1 == next)
            .map(|s| s.term)
    };
    if let Some(meta) = &batch.snapshot {
        if let Some(s) = &st.snapshot {
            if meta.index < s.index {
                return Err(Error::StaleSnapshot {
                    index: meta.index,
                    current: s.index,
                });
            }
        }
        let contained = meta.index < first
            || (meta.index < next && st.index.term(meta.index) == Some(meta.term));
        if !contained {
            next = meta.index + 1;
            term_before = Some(meta.term);
        }
    }
    if let Some(e) = batch.entries.first() {
        if e.index != next {
            return Err(Error::NonContiguous {
                expected: next,
                got: e.index,
            });
        }
        if let Some(t) = term_before {
            if e.term < t {
                return Err(Error::TermRegression {
                    index: e.index,
                    term: e.term,
                    previous: t,
                });
            }
        }
    }
    Ok(next)
}

fn check_range(st: &State, lo: u64, hi: u64) -> Result<()> {
    if lo > hi {
        return Err(Error::Unavailable {
            index: lo,
            last_index: hi.saturating_sub(1),
        });
    }
    if lo < st.index.first() {
        return Err(Error::Compacted {
            index: lo,
            first_index: st.index.first(),
        });
    }
    if hi > st.index.next() {
        return Err(Error::Unavailable {
            index: hi - 1,
            last_index: st.index.next() - 1,
        });
    }
    Ok(())
}

/// Forgets how to undo writes the driver wrote whole: they are never
/// dropped.
fn forget_written(st: &mut State, written: u64) {
    while st.undo.front().is_some_and(|u| u.seq <= written) {
        st.undo.pop_front();
    }
    let mark = st
        .undo
        .front()
        .map_or_else(|| st.index.journal_mark(), |u| u.index_mark);
    st.index.forget_journal_before(mark);
}

/// Undoes every write from `from` on (newest first): the driver dropped
/// them, none was written. The state is then as it was right before write
/// `from` was placed, and the next write is placed where it was.
fn roll_back(st: &mut State, from: u64) {
    let at = st
        .undo
        .iter()
        .position(|u| u.seq >= from)
        .expect("a dropped write is still undoable");
    assert_eq!(st.undo[at].seq, from, "every dropped write was placed");
    let dropped: Vec<Undo> = st.undo.drain(at..).collect();
    let oldest = &dropped[0];
    st.index.rollback_to(oldest.index_mark);
    for u in dropped.iter().rev() {
        if let Some((snapshot, snapshot_seq)) = &u.snapshot {
            st.snapshot = snapshot.clone();
            st.snapshot_seq = *snapshot_seq;
        }
    }
    st.hard_state = oldest.hard_state;
    st.active = oldest.active;
    st.last_end = oldest.last_end;
    st.next_segment_seq = oldest.next_segment_seq;
    while st
        .segments
        .back()
        .is_some_and(|s| s.seq >= oldest.next_segment_seq)
    {
        st.segments.pop_back();
    }
    if let (Some(back), Some(seq)) = (st.segments.back_mut(), oldest.back_last_write_seq) {
        back.last_write_seq = seq;
    }
    while st.held.back().is_some_and(|&(seq, _, _)| seq >= from) {
        st.held.pop_back();
    }
    st.index.check();
    tracing::warn!(
        first_dropped = from,
        last_dropped = st.next_write_seq - 1,
        last_index = st.index.next() - 1,
        "WAL rolled back writes dropped for want of space"
    );
}

/// Drops in-memory copies of bodies that are durable (and so readable).
fn release_held(st: &mut State, durable: u64) {
    while let Some(&(seq, first_index, number)) = st.held.front() {
        if seq > durable {
            break;
        }
        st.held.pop_front();
        // By number, not by a search: the index may hold millions of records.
        if let Some(r) = st.index.record_by_number(number) {
            if r.write_seq == seq && r.first_index == first_index {
                r.body = None;
            }
        }
    }
}

/// Most bytes [`Wal::read`] reads at once (several records of a segment).
const READ_CHUNK_MAX: u64 = 8 << 20;
/// Most bytes of other records (hard states, truncated entries) between two
/// records [`Wal::read`] reads in one go rather than skips.
const READ_GAP_MAX: u64 = 64 << 10;

/// Reads bytes `start..end` of a segment.
fn read_chunk(file: &dyn StorageFile, path: &Path, start: u64, end: u64) -> Result<Bytes> {
    let mut buf = vec![0u8; (end - start) as usize];
    prefault(buf.as_ptr(), buf.len());
    file.read_exact_at(&mut buf, start)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(Bytes::from(buf))
}

/// Faults in the pages of a fresh buffer of `len` bytes at `ptr` in one
/// call (`MADV_POPULATE_WRITE`) when it is large. Reading the whole log
/// back fills about as much fresh memory as the log: faulting it in one
/// page at a time, inside the kernel's copy, cost more than the copy itself
/// (wal-bench --recovery-gib: read 1.0-1.6 GB/s before, 1.3-2.1 after on
/// the 2-core VM). Leaves the contents as they are; only a hint (kernels
/// before 5.14 refuse it, and the pages then fault in as before).
fn prefault(ptr: *const u8, len: usize) {
    const PREFAULT_MIN: usize = 1 << 20;
    const PAGE: usize = 4096;
    if len < PREFAULT_MIN {
        return;
    }
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) & !(PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside one live allocation of ours;
        // MADV_POPULATE_WRITE maps its pages without changing what they
        // hold.
        let _ = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}

/// Verifies the record at `loc` in `chunk` (read from offset `start` of its
/// segment) and returns its body: pairs the checks done when writing.
fn verify_body(
    chunk: &Bytes,
    start: u64,
    path: &Path,
    salt: u64,
    loc: &RecordLoc,
) -> Result<Bytes> {
    let at = (loc.offset - start) as usize;
    let corruption = |reason: &str| Error::Corruption {
        segment: path.to_path_buf(),
        offset: loc.offset,
        reason: reason.to_string(),
    };
    let (header, body) =
        format::read_record(chunk, at, salt).map_err(|e| corruption(e.reason()))?;
    if header.framed_len() != loc.framed_len as usize {
        return Err(corruption("record length differs from the one indexed"));
    }
    Ok(chunk.slice_ref(body))
}

/// Appends the live entries of `loc` in `lo..hi`, whose payloads slice
/// `body`, to `out`.
fn decode_live(
    body: &Bytes,
    loc: &RecordLoc,
    lo: u64,
    hi: u64,
    out: &mut Vec<Entry>,
) -> std::result::Result<(), format::BodyError> {
    let live_end = loc.end().min(hi);
    format::for_each_entry(body, |index, term, payload| {
        if index >= lo && index < live_end {
            out.push(Entry {
                index,
                term,
                payload: body.slice(payload),
            });
        }
    })?;
    Ok(())
}

/// Returns a spare taken for a write that could not be queued.
fn give_back_spare(inner: &Inner, op: Op) {
    if let Op::Write(WriteOp {
        new_segment: Some(ns),
        ..
    }) = op
    {
        if let Some(extra) = inner.pool.offer(ns.spare) {
            // No directory fsync: a spare that comes back after a crash is
            // found by recovery and used like any other.
            let _ = inner.storage.remove(&extra.path);
        }
    }
}
