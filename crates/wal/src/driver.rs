//! The I/O driver: one thread that turns queued writes into groups of one
//! write and one fdatasync, and releases tickets in order.
//!
//! It owns the backend (io_uring or pwritev) and the active segment's file.
//! It must never take the WAL's state lock: writers place their records
//! before queueing them, so the driver only frames, copies, writes and syncs.

use crate::error::{OP_FDATASYNC, OP_SYNC_DIRECTORY};
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::durable::Notify;
use crate::format::{self, Body, SegmentHeader};
use crate::metrics::Metrics;
use crate::segment::{Spare, SparePool};
use crate::storage::{Storage, StorageFile};

/// A group's write is padded with zeros up to a multiple of this (4 KiB: the
/// block size of common Linux file systems, and the page size on x86-64), so
/// that it never ends inside a block.
///
/// Why: spare segments are zero-filled with O_DIRECT, so their blocks are not
/// in the page cache, and a buffered write that covers only part of a block
/// that is not cached makes the kernel read that block from the device first
/// and wait for it (`ext4_block_write_begin`). Every group ended inside a
/// block: each write waited for one device read (27% of the driver's
/// context switches in wal-bench; a 90 KB write took ~160 µs instead of
/// ~20 µs). With the padding, the block a group ends in is written whole,
/// and the next group, which starts inside it, finds it cached.
///
/// Safe because the bytes past the log's end are zeros already (a spare is
/// zero-filled; recovery reads zeros as the clean end), and groups are
/// written in order by this thread: the next group overwrites the padding
/// after it was written, never before.
pub(crate) const PAD_TO: u64 = 4096;

/// How long an idle driver sleeps before looking again (it wakes at once
/// when a write is queued).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A segment to start before a write: the spare to rename into place and
/// what goes at its start.
#[derive(Debug)]
pub(crate) struct NewSegment {
    pub spare: Spare,
    pub path: PathBuf,
    pub header: SegmentHeader,
    /// Hard state and snapshot records repeated at the segment's start so
    /// that compacting older segments never loses them.
    pub checkpoint: Vec<Body>,
}

/// The record bodies of one write, in order, held inline: a write has at
/// most a truncate, a snapshot, an entries and a hard state record.
///
/// Inline because the I/O thread drops every write it takes: a `Vec` here
/// was one free per write of memory another thread allocated, and with
/// glibc's per-thread arenas each such free takes the allocating thread's
/// arena lock: dropping the writes took about 39% of the driver's time in
/// wal-bench, mostly futex waits on those locks.
#[derive(Debug, Default)]
pub(crate) struct Records {
    slots: [Option<Body>; Records::MAX],
    len: usize,
}

impl Records {
    pub const MAX: usize = 4;

    /// Adds the next record; a write never has more than [`Records::MAX`].
    pub fn push(&mut self, body: Body) {
        assert!(self.len < Records::MAX, "a write has at most four records");
        self.slots[self.len] = Some(body);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = &Body> {
        self.slots[..self.len].iter().flatten()
    }
}

/// One queued write: records already placed at `offset` of a segment.
#[derive(Debug)]
pub(crate) struct WriteOp {
    pub seq: u64,
    pub segment_seq: u64,
    /// Where this write's first byte lands (the segment header for a new
    /// segment).
    pub offset: u64,
    /// Framed bytes of the whole write.
    pub len: u64,
    pub salt: u64,
    pub watermark: u64,
    pub bodies: Records,
    pub new_segment: Option<NewSegment>,
    pub entries: u64,
    pub queued_at: Instant,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // nearly every op is a write: boxing would cost an allocation each
pub(crate) enum Op {
    Write(WriteOp),
    /// Finish what is queued and in flight, then exit.
    Shutdown,
}

/// A group handed to a backend: one contiguous buffer for one file.
#[derive(Debug)]
pub(crate) struct Group {
    pub id: u64,
    pub file: Arc<dyn StorageFile>,
    pub path: PathBuf,
    pub offset: u64,
    pub buf: Vec<u8>,
    pub submitted_at: Instant,
}

/// A group whose write and fdatasync both completed.
#[derive(Debug)]
pub(crate) struct Done {
    pub id: u64,
    pub buf: Vec<u8>,
    pub write: Duration,
    pub fsync: Duration,
    /// The fdatasync ran on the driver thread (not handed to another).
    pub inline: bool,
}

/// [`Failure::op`] of a group's write: the one failure that is not fatal
/// when it is for want of space (see [`Driver::drop_group`]).
pub(crate) const OP_WRITE: &str = "write";

/// Whether an error means the file system had no room (or quota) left.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// I/O failure of a group: fatal, but for a write that ran out of space.
#[derive(Debug)]
pub(crate) struct Failure {
    pub op: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.error)
    }
}

/// What the driver needs from an I/O backend.
pub(crate) trait IoBackend: Send {
    /// The doorbell writers ring after queueing, if the backend sleeps
    /// somewhere the queue cannot wake it.
    fn doorbell(&self) -> Option<Arc<crate::ring::Doorbell>> {
        None
    }

    /// Starts (or performs) the group's write followed by one fdatasync.
    /// `alone`: nothing else is in flight or queued, so nothing could
    /// overlap this group's fdatasync; a backend may then perform it on the
    /// calling thread rather than hand it to another.
    fn submit(&mut self, group: Group, alone: bool) -> Result<(), Failure>;
    fn inflight(&self) -> usize;
    /// Collects finished groups. With `wait`, blocks until one finishes or
    /// `has_work` might have turned true (the doorbell rang).
    fn reap(
        &mut self,
        wait: bool,
        has_work: &dyn Fn() -> bool,
        out: &mut Vec<Done>,
    ) -> Result<(), Failure>;
}

/// Writes and syncs on the driver thread: `pwritev` then `fdatasync`.
#[derive(Debug, Default)]
pub(crate) struct SyncBackend {
    done: Vec<Done>,
}

impl IoBackend for SyncBackend {
    fn submit(&mut self, g: Group, _alone: bool) -> Result<(), Failure> {
        let fail = |op, error| Failure {
            op,
            path: g.path.clone(),
            error,
        };
        let t0 = Instant::now();
        g.file
            .write_all_at(&[io::IoSlice::new(&g.buf)], g.offset)
            .map_err(|e| fail(OP_WRITE, e))?;
        let t1 = Instant::now();
        g.file.sync_data().map_err(|e| fail(OP_FDATASYNC, e))?;
        self.done.push(Done {
            id: g.id,
            buf: g.buf,
            write: t1 - t0,
            fsync: t1.elapsed(),
            inline: true,
        });
        Ok(())
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }

    fn reap(
        &mut self,
        _wait: bool,
        _has_work: &dyn Fn() -> bool,
        out: &mut Vec<Done>,
    ) -> Result<(), Failure> {
        out.append(&mut self.done);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Wait {
    No,
    ForCompletion,
    /// Also wake when a writer queues something.
    ForCompletionOrWork,
}

/// A group waiting for its turn to be released.
#[derive(Debug)]
pub(crate) struct Pending {
    id: u64,
    last_seq: u64,
    segment_seq: u64,
    end: u64,
    /// Its fdatasync returned success.
    done: bool,
    /// Set when `done`: the id of the next group not yet submitted then.
    /// Every group below it had its fdatasync issued before this group's
    /// completed, so could have taken an error that belongs to this group's
    /// pages (see [`Driver::releasable`]).
    barrier: u64,
}

pub(crate) struct Driver {
    pub rx: Receiver<Op>,
    /// The backend has a doorbell: idle, the driver sleeps in it (woken by
    /// writers) instead of in the queue's receive.
    pub sleeps_in_ring: bool,
    pub notify: Arc<Notify>,
    /// Where spares taken by dropped writes go back to.
    pub pool: Arc<SparePool>,
    /// Recorded into directly: one uncontended lock per group.
    pub metrics: Arc<Mutex<Metrics>>,
    /// (segment seq << 32) | offset below which the active segment is durable.
    pub durable_pos: Arc<AtomicU64>,
    pub storage: Arc<dyn Storage>,
    pub dir: PathBuf,
    /// The segment writes go to: (seq, path, file).
    pub active: Option<(u64, PathBuf, Arc<dyn StorageFile>)>,
    pub backend: Box<dyn IoBackend>,
    pub group_bytes_max: usize,
    /// Bytes per segment file (a multiple of [`PAD_TO`]).
    pub segment_size: u64,
    pub groups_inflight_max: usize,
    pub held: Option<WriteOp>,
    pub pending: VecDeque<Pending>,
    pub next_group: u64,
    pub spare_bufs: Vec<Vec<u8>>,
}

pub(crate) fn pack_pos(segment_seq: u64, offset: u64) -> u64 {
    assert!(
        segment_seq < 1 << 32 && offset < 1 << 32,
        "durable position fits in 64 bits"
    );
    (segment_seq << 32) | offset
}

pub(crate) fn unpack_pos(pos: u64) -> (u64, u64) {
    (pos >> 32, pos & 0xffff_ffff)
}

impl Driver {
    /// Runs until shutdown or a fatal failure (which fails the WAL).
    pub fn run(mut self) {
        if let Err(f) = self.run_inner() {
            tracing::error!(error = %f, "WAL I/O failed; the WAL accepts no more writes");
            self.notify.fail(f.to_string());
        }
    }

    fn run_inner(&mut self) -> Result<(), Failure> {
        let mut done = Vec::new();
        loop {
            let mut ops: Vec<WriteOp> = Vec::new();
            let mut bytes = 0usize;
            let mut shutdown = false;
            if let Some(op) = self.held.take().and_then(|op| self.keep(op)) {
                bytes += op.len as usize;
                ops.push(op);
            } else if self.backend.inflight() == 0 && self.sleeps_in_ring {
                // Idle: sleep in the ring until a writer rings the doorbell
                // (the queue's own blocking receive spins and yields first,
                // a context switch per yield on a busy small machine).
                if self.rx.is_empty() {
                    self.reap(Wait::ForCompletionOrWork, &mut done)?;
                }
            } else if self.backend.inflight() == 0 {
                match self.rx.recv_timeout(IDLE_WAIT) {
                    Ok(Op::Write(op)) => {
                        let Some(op) = self.keep(op) else { continue };
                        bytes += op.len as usize;
                        ops.push(op);
                    }
                    Ok(Op::Shutdown) | Err(RecvTimeoutError::Disconnected) => shutdown = true,
                    Err(RecvTimeoutError::Timeout) => continue,
                }
            }
            while !shutdown && bytes < self.group_bytes_max {
                match self.rx.try_recv() {
                    Ok(Op::Write(op)) => {
                        let Some(op) = self.keep(op) else { continue };
                        // A write that starts a segment starts its own group,
                        // and a group stays within the byte bound unless a
                        // single write is larger.
                        if !ops.is_empty()
                            && (op.new_segment.is_some()
                                || bytes + op.len as usize > self.group_bytes_max)
                        {
                            self.held = Some(op);
                            break;
                        }
                        bytes += op.len as usize;
                        ops.push(op);
                    }
                    Ok(Op::Shutdown) | Err(TryRecvError::Disconnected) => shutdown = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if !ops.is_empty() {
                while self.backend.inflight() >= self.groups_inflight_max {
                    self.reap(Wait::ForCompletion, &mut done)?;
                }
                self.submit(ops)?;
            }
            if shutdown {
                self.drain(&mut done)?;
                if let Some(op) = self.held.take().and_then(|op| self.keep(op)) {
                    self.submit(vec![op])?;
                    self.drain(&mut done)?;
                }
                return Ok(());
            }
            if self.backend.inflight() > 0 {
                let wait = if self.held.is_none() && self.rx.is_empty() {
                    Wait::ForCompletionOrWork
                } else {
                    Wait::No
                };
                self.reap(wait, &mut done)?;
            }
        }
    }

    /// `op` unless it was dropped (placed after a write that ran out of
    /// space, before the writers rolled back): then it is discarded, and a
    /// spare it took goes back to the pool.
    fn keep(&self, op: WriteOp) -> Option<WriteOp> {
        if self.notify.rejected(op.seq).is_none() {
            return Some(op);
        }
        if let Some(ns) = op.new_segment {
            if let Some(extra) = self.pool.offer(ns.spare) {
                // No directory fsync: a spare that comes back after a
                // crash is found by recovery and used like any other.
                let _ = self.storage.remove(&extra.path);
            }
        }
        None
    }

    fn drain(&mut self, done: &mut Vec<Done>) -> Result<(), Failure> {
        while self.backend.inflight() > 0 {
            self.reap(Wait::ForCompletion, done)?;
        }
        Ok(())
    }

    fn reap(&mut self, wait: Wait, done: &mut Vec<Done>) -> Result<(), Failure> {
        let rx = self.rx.clone();
        match wait {
            Wait::No => self.backend.reap(false, &|| true, done)?,
            Wait::ForCompletion => self.backend.reap(true, &|| false, done)?,
            Wait::ForCompletionOrWork => self.backend.reap(true, &|| !rx.is_empty(), done)?,
        }
        let mut metrics = (!done.is_empty()).then(|| self.metrics.lock().expect("metrics lock"));
        for d in done.drain(..) {
            let m = metrics.as_mut().expect("locked when done is non-empty");
            Metrics::record_us(&mut m.write_us, d.write);
            Metrics::record_us(&mut m.fsync_us, d.fsync);
            m.fsyncs_total += 1;
            m.fsyncs_inline_total += u64::from(d.inline);
            let p = self
                .pending
                .iter_mut()
                .find(|p| p.id == d.id)
                .expect("a finished group is pending");
            assert!(!p.done, "a group completes once");
            p.done = true;
            // Conservative: the completion happened at or before this reap,
            // so no fewer groups were issued before it than this.
            p.barrier = self.next_group;
            if self.spare_bufs.len() < self.groups_inflight_max {
                self.spare_bufs.push(d.buf);
            }
        }
        drop(metrics);
        // Release in order: a group is durable only once every earlier one
        // is, and once no fdatasync that may hold its error is outstanding.
        let mut released = None;
        while self.releasable() {
            let p = self.pending.pop_front().expect("checked front");
            self.durable_pos
                .store(pack_pos(p.segment_seq, p.end), Ordering::Release);
            released = Some(p.last_seq);
        }
        if let Some(seq) = released {
            self.storage.acknowledged(seq);
            self.notify.advance(seq);
        }
        Ok(())
    }

    /// Whether the oldest pending group may be acknowledged.
    ///
    /// The rule, from how Linux reports writeback errors: an fdatasync that
    /// succeeds proves durable only the writes that completed before it was
    /// issued, and only if no other fdatasync took their error. An error of
    /// a page's writeback is recorded on the file and handed to the first
    /// fdatasync on that open file description to check after it (errseq):
    /// with several in flight on one descriptor, an error of group N's
    /// pages can be returned to the fdatasync of group N + 1 (or of any
    /// group in flight with N's), and N's own then returns success. So
    /// group N is acknowledged only when
    ///
    /// 1. its own fdatasync (issued after its write completed) succeeded,
    /// 2. every earlier group is acknowledged (release in order), and
    /// 3. every fdatasync issued before N's completed has completed too,
    ///    each with success: those are the only ones that could have taken
    ///    an error of N's pages before N's checked. One issued after N's
    ///    completed checks after it, so it cannot hide an error from N.
    ///
    /// Any fdatasync error is fatal (the driver stops and fails the WAL):
    /// every group not yet acknowledged fails with it, whichever group the
    /// error belonged to. The cost: with groups overlapping, a group is
    /// acknowledged when the groups in flight with it complete, not when it
    /// does.
    fn releasable(&self) -> bool {
        let Some(front) = self.pending.front() else {
            return false;
        };
        front.done
            && self
                .pending
                .iter()
                .take_while(|p| p.id < front.barrier)
                .all(|p| p.done)
    }

    fn submit(&mut self, ops: Vec<WriteOp>) -> Result<(), Failure> {
        let mut buf = self.spare_bufs.pop().unwrap_or_default();
        buf.clear();
        let first = &ops[0];
        if first.new_segment.is_some() {
            // Every earlier group must be durable before the new segment's
            // header (which records where the old one was sealed) is written.
            self.drain(&mut Vec::new())?;
        }
        let group_offset = first.offset;
        let first_seq = first.seq;
        // What to go back to if the group runs out of space.
        let before = self.active.clone();
        let mut started = None;
        let now = Instant::now();
        let mut entries = 0u64;
        for op in &ops {
            if let Some(ns) = &op.new_segment {
                self.start_segment(ns)?;
                started = Some(ns.path.clone());
                buf.extend_from_slice(&ns.header.encode());
                for body in &ns.checkpoint {
                    format::frame_into(&mut buf, op.salt, 0, body);
                }
            }
            let (seg, _, _) = self
                .active
                .as_ref()
                .expect("a segment is active before a write");
            assert_eq!(*seg, op.segment_seq, "write placed in the active segment");
            format::frame_write(&mut buf, op.salt, op.watermark, op.bodies.iter());
            assert_eq!(
                group_offset + buf.len() as u64,
                op.offset + op.len,
                "writes in a group are contiguous and as long as placed"
            );
            entries += op.entries;
        }
        let log_bytes = buf.len();
        let end = group_offset + log_bytes as u64;
        let padded_end = end.next_multiple_of(PAD_TO).min(self.segment_size);
        buf.resize((padded_end - group_offset) as usize, 0);
        let last = ops.last().expect("non-empty group");
        let (seg, path, file) = self.active.clone().expect("active segment");
        {
            let mut m = self.metrics.lock().expect("metrics lock");
            for op in &ops {
                Metrics::record_us(
                    &mut m.queue_wait_us,
                    now.saturating_duration_since(op.queued_at),
                );
            }
            m.groups_total += 1;
            m.bytes_total += log_bytes as u64;
            m.entries_total += entries;
            Metrics::record(&mut m.group_writes, ops.len() as u64);
            Metrics::record(&mut m.group_entries, entries);
            Metrics::record(&mut m.group_bytes, log_bytes as u64);
        }
        let id = self.next_group;
        self.next_group += 1;
        self.pending.push_back(Pending {
            id,
            last_seq: last.seq,
            segment_seq: seg,
            end: last.offset + last.len,
            done: false,
            barrier: u64::MAX,
        });
        let alone = self.backend.inflight() == 0 && self.held.is_none() && self.rx.is_empty();
        let group_len = buf.len() as u64;
        let submitted = self.backend.submit(
            Group {
                id,
                file,
                path,
                offset: group_offset,
                buf,
                submitted_at: now,
            },
            alone,
        );
        match submitted {
            Ok(()) => {
                self.notify.written(last.seq);
                Ok(())
            }
            Err(f) if f.op == OP_WRITE && is_no_space(&f.error) => {
                let pending = self.pending.pop_back().expect("pushed above");
                assert_eq!(pending.id, id, "the failed group is the last pending");
                self.drop_group(f, first_seq, group_offset, group_len, started, before)
            }
            Err(f) => Err(f),
        }
    }

    /// A group's write ran out of space (ENOSPC, EDQUOT): drops it and
    /// every write after it, leaving the log as it was before it.
    ///
    /// 1. Earlier groups were written whole: their fdatasyncs land (and they
    ///    are acknowledged) first.
    /// 2. The bytes the failed write may have left are cleared and that is
    ///    made durable, so that no crash from here on can bring back part of
    ///    a write its writer was told was dropped: zeros over the group's
    ///    range (what lay past the log's end: spares are zero-filled, a
    ///    recycled segment's stale bytes do not verify either way), or, for
    ///    a group that started a segment, the segment file removed and the
    ///    removal synced. A failure here is fatal like any other I/O error
    ///    (on a copy-on-write file system overwriting may need space too).
    /// 3. [`Notify::reject_from`] publishes the drop: the dropped writes'
    ///    tickets say `NoSpace`, later queued writes are discarded
    ///    ([`Driver::keep`]), and the next writer to take the WAL's lock
    ///    rolls its state back to before `first_seq`, so that the next write
    ///    is placed where the dropped one was.
    fn drop_group(
        &mut self,
        failure: Failure,
        first_seq: u64,
        offset: u64,
        len: u64,
        started: Option<PathBuf>,
        before: Option<(u64, PathBuf, Arc<dyn StorageFile>)>,
    ) -> Result<(), Failure> {
        tracing::warn!(error = %failure, first_seq, "WAL write ran out of space; dropping it and every write queued after it");
        self.drain(&mut Vec::new())?;
        let (_, path, file) = self.active.clone().expect("a group was written to one");
        let fail = |op, error| Failure {
            op,
            path: path.clone(),
            error,
        };
        match started {
            None => {
                let zeros = vec![0u8; len as usize];
                file.write_all_at(&[io::IoSlice::new(&zeros)], offset)
                    .map_err(|e| fail("write zeros over a write that ran out of space", e))?;
                file.sync_data().map_err(|e| fail(OP_FDATASYNC, e))?;
            }
            Some(segment) => {
                debug_assert_eq!(offset, 0, "a new segment's group starts it");
                self.storage
                    .remove(&segment)
                    .map_err(|e| fail("remove segment that ran out of space", e))?;
                self.storage
                    .sync_dir(&self.dir)
                    .map_err(|e| fail(OP_SYNC_DIRECTORY, e))?;
                self.active = before;
            }
        }
        let errno = failure.error.raw_os_error().unwrap_or(libc::ENOSPC);
        self.notify.reject_from(first_seq, failure.path, errno);
        Ok(())
    }

    /// Renames the spare into place and makes the rename durable.
    fn start_segment(&mut self, ns: &NewSegment) -> Result<(), Failure> {
        let fail = |op, error| Failure {
            op,
            path: ns.path.clone(),
            error,
        };
        self.storage
            .rename(&ns.spare.path, &ns.path)
            .map_err(|e| fail("rename spare to segment", e))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| fail(OP_SYNC_DIRECTORY, e))?;
        tracing::debug!(segment = %ns.path.display(), "started segment");
        self.active = Some((ns.header.seq, ns.path.clone(), ns.spare.file.clone()));
        Ok(())
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
