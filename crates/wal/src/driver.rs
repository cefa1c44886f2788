//! The I/O driver: one thread that turns queued writes into groups of one
//! write and one fdatasync, and releases tickets in order.
//!
//! It owns the backend (io_uring or pwritev) and the active segment's file.
//! It must never take the WAL's state lock: writers place their records
//! before queueing them, so the driver only frames, copies, writes and syncs.

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
use crate::segment::Spare;
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

/// Fatal I/O failure of a group.
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
    fn doorbell(&self) -> Option<Arc<crate::uring::Doorbell>> {
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
            .map_err(|e| fail("write", e))?;
        let t1 = Instant::now();
        g.file.sync_data().map_err(|e| fail("fdatasync", e))?;
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
    done: bool,
}

pub(crate) struct Driver {
    pub rx: Receiver<Op>,
    /// The backend has a doorbell: idle, the driver sleeps in it (woken by
    /// writers) instead of in the queue's receive.
    pub sleeps_in_ring: bool,
    pub notify: Arc<Notify>,
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
            if let Some(op) = self.held.take() {
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
                if let Some(op) = self.held.take() {
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
            p.done = true;
            if self.spare_bufs.len() < self.groups_inflight_max {
                self.spare_bufs.push(d.buf);
            }
        }
        drop(metrics);
        // Release in order: a group is durable only once every earlier one is.
        let mut released = None;
        while self.pending.front().is_some_and(|p| p.done) {
            let p = self.pending.pop_front().expect("checked front");
            self.durable_pos
                .store(pack_pos(p.segment_seq, p.end), Ordering::Release);
            released = Some(p.last_seq);
        }
        if let Some(seq) = released {
            self.notify.advance(seq);
        }
        Ok(())
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
        let now = Instant::now();
        let mut entries = 0u64;
        for op in &ops {
            if let Some(ns) = &op.new_segment {
                self.start_segment(ns)?;
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
        });
        let alone = self.backend.inflight() == 0 && self.held.is_none() && self.rx.is_empty();
        self.backend.submit(
            Group {
                id,
                file,
                path,
                offset: group_offset,
                buf,
                submitted_at: now,
            },
            alone,
        )
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
            .map_err(|e| fail("sync directory", e))?;
        tracing::debug!(segment = %ns.path.display(), "started segment");
        self.active = Some((ns.header.seq, ns.path.clone(), ns.spare.file.clone()));
        Ok(())
    }
}
