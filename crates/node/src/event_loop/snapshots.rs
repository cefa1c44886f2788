//! Snapshots of the event loop, none of which blocks it on the state's
//! size:
//!
//! * take one: the loop freezes a view of the state machine
//!   ([`StateMachine::snapshot`]) and hands it to the snapshot thread
//!   ([`SnapshotWorker`]), which writes, checksums, fsyncs and renames the
//!   file, then reports back (`Input::SnapshotWritten`); a failed write is
//!   logged and retried after [`SNAPSHOT_RETRY_AFTER`], never fatal;
//! * tell the core: a durable snapshot is told to Raft (which then drops
//!   its entries and emits `Compact`) only once `snapshot_catchup_entries`
//!   more entries are applied, so the log always keeps that margin for
//!   followers slightly behind (they catch up from the log, not from a
//!   whole snapshot);
//! * compact: `Compact` records the snapshot in the WAL; once durable, the
//!   snapshot thread deletes the WAL segments below it and old files, and
//!   reports (`Input::WalCompacted`): a segment not removed is counted
//!   (`skiff_wal_compaction_failures_total`) and left to the next
//!   snapshot's compaction (which covers everything below it), a failed
//!   WAL or fsync stops the member ([`compaction_failure`]);
//! * offer one to a follower (which fetches it in parallel chunks); while
//!   it fetches, restores and then catches up from the log, the leader
//!   holds back telling the core of newer snapshots (so the entries right
//!   after the offered one stay in the log), within
//!   [`CATCHUP_HOLD_MAX`] and a log of at most
//!   [`CATCHUP_HOLD_LOG_FACTOR`] snapshot intervals: otherwise a follower
//!   whose fetch and restore take longer than a snapshot interval under
//!   load installs a snapshot the log has already left behind, and fetches
//!   another, for ever (etcd pauses compaction while a snapshot is in
//!   flight for the same reason);
//! * install one: the follower's node fetched and restored it off the loop
//!   (see `crate::node`); the loop swaps it in and hands the old state to
//!   the snapshot thread to drop; once the WAL's record of it is durable,
//!   the WAL below it and older snapshot files go, as after a snapshot of
//!   its own.

use std::io::Write;
use std::path::Path;

use crossbeam_channel::{Receiver, Sender};

use super::*;
use crate::queue::SendTimeoutError;

/// Jobs queued for the snapshot thread (bounded).
pub const SNAPSHOT_JOBS_MAX: usize = 16;
/// After a failed snapshot write, the next try waits this long.
pub const SNAPSHOT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Snapshot files kept below the one the WAL records (for transfers under
/// way).
pub const SNAPSHOTS_KEPT: usize = 1;
/// Longest the snapshot thread waits for room in the loop's queue to
/// report a result.
pub const SNAPSHOT_REPORT_WAIT_MAX: Duration = Duration::from_secs(30);

/// Longest the leader holds back log compaction for a follower catching
/// up from a snapshot without its match index moving (from the first
/// offer, which covers the fetch and the restore, then from each move): a
/// follower that stops moving is not waited for, until it moves again.
pub const CATCHUP_HOLD_MAX: Duration = Duration::from_secs(60);
/// While holding compaction back, the log the leader keeps in memory may
/// grow to this many snapshot intervals (`snapshot_entries`, and
/// `snapshot_bytes` of entries) past the margin; beyond it the hold ends.
pub const CATCHUP_HOLD_LOG_FACTOR: u64 = 4;

/// A follower the leader offered a snapshot to (see
/// `EventLoop::compaction_held`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Catchup {
    /// The newest snapshot offered to it.
    index: Index,
    /// Its match index when last seen to move.
    matched: Index,
    /// Since the first offer, or since its match index last moved.
    since: Instant,
    /// It stopped moving for [`CATCHUP_HOLD_MAX`]: holds nothing until
    /// it moves.
    given_up: bool,
}

/// The nice value of the threads that do work in proportion to the state
/// (the snapshot thread: writes, WAL compaction, dropping a replaced
/// state; the restore of a fetched snapshot). Where they compete with the
/// event loop for a CPU, the loop wins about ten times their share
/// (Linux's weights: 1024 at nice 0, 110 at nice 10), so its passes, and
/// the heartbeats they send, are not held up; on an idle CPU they run at
/// full speed.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (Linux
/// gives each thread its own nice value). Raising a nice value needs no
/// privilege; a refusal is logged and the thread goes on as it was.
pub(crate) fn lower_thread_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority reads only its arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(),
            "background thread priority not lowered");
    }
}

/// What a follower is told to fetch a snapshot from: carried as the `data`
/// of the `InstallSnapshot` message (`len` u64 LE, `crc` u32 LE, then the
/// leader's snapshot server address as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOffer {
    pub len: u64,
    pub crc: u32,
    pub addr: SocketAddr,
}

impl SnapshotOffer {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(12 + 48);
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.crc.to_le_bytes());
        b.extend_from_slice(self.addr.to_string().as_bytes());
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<SnapshotOffer> {
        let (len, rest) = b.split_first_chunk::<8>()?;
        let (crc, rest) = rest.split_first_chunk::<4>()?;
        let addr = std::str::from_utf8(rest).ok()?.parse().ok()?;
        Some(SnapshotOffer {
            len: u64::from_le_bytes(*len),
            crc: u32::from_le_bytes(*crc),
            addr,
        })
    }
}

/// Work for the snapshot thread.
pub(crate) enum SnapshotJob<S: StateMachine> {
    /// Write `view` durably to `path` and report `Input::SnapshotWritten`.
    Write {
        view: S::Snapshot,
        index: Index,
        term: Term,
        path: PathBuf,
    },
    /// The WAL records a durable snapshot at `upto`: delete the segments
    /// below it, then snapshot files below `upto` but the newest
    /// [`SNAPSHOTS_KEPT`].
    Compact { upto: Index },
    /// A replaced state machine: dropping a large state is work in
    /// proportion to its size, kept off the loop.
    Drop(Box<S>),
}

/// The snapshot thread's queue and handle. The loop shuts it down when it
/// stops ([`SnapshotWorker::shutdown`]): a snapshot write under way is
/// abandoned (no file is left), queued writes and compactions are skipped,
/// so that nothing touches the data directory once the member stopped (a
/// restarted member may own it) and a large snapshot does not hold up a
/// shutdown.
pub(crate) struct SnapshotWorker<S: StateMachine> {
    jobs: Option<Sender<SnapshotJob<S>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<S: StateMachine> SnapshotWorker<S> {
    /// Starts the thread. It reports to the loop through `inputs`.
    pub(crate) fn start(
        name: String,
        wal: Arc<Wal>,
        snap_dir: PathBuf,
        inputs: QueueSender<Input<S>>,
    ) -> std::io::Result<SnapshotWorker<S>> {
        let (jobs, rx) = crossbeam_channel::bounded(SNAPSHOT_JOBS_MAX);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run_worker(rx, wal, snap_dir, inputs, stop))?;
        Ok(SnapshotWorker {
            jobs: Some(jobs),
            stopping,
            thread: Some(thread),
        })
    }

    /// Skips what is queued, abandons a snapshot write under way (its
    /// writer fails at the next buffer), waits for the thread to end.
    pub(crate) fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the snapshot thread panicked");
            }
        }
    }

    /// Drops `state` on the snapshot thread (here when its queue is full).
    pub(crate) fn drop_off_loop(&self, state: Box<S>) {
        if let Err(SnapshotJob::Drop(state)) = self.submit(SnapshotJob::Drop(state)) {
            drop(state);
        }
    }

    /// Queues `job`; `Err` gives it back when the queue is full.
    fn submit(&self, job: SnapshotJob<S>) -> Result<(), SnapshotJob<S>> {
        match &self.jobs {
            Some(jobs) => jobs.try_send(job).map_err(|e| e.into_inner()),
            None => Err(job),
        }
    }
}

fn run_worker<S: StateMachine>(
    jobs: Receiver<SnapshotJob<S>>,
    wal: Arc<Wal>,
    snap_dir: PathBuf,
    inputs: QueueSender<Input<S>>,
    stopping: Arc<AtomicBool>,
) {
    lower_thread_priority();
    for job in jobs {
        if stopping.load(Ordering::Acquire) && !matches!(job, SnapshotJob::Drop(_)) {
            continue;
        }
        match job {
            SnapshotJob::Write {
                view,
                index,
                term,
                path,
            } => {
                let started = Instant::now();
                let result = write_snapshot_file(&view, &path, &stopping)
                    .map_err(|e| format!("snapshot {}: {e}", path.display()));
                drop(view);
                let report = Input::SnapshotWritten {
                    index,
                    term,
                    path,
                    result,
                    took: started.elapsed(),
                };
                match inputs.send_timeout(report, SNAPSHOT_REPORT_WAIT_MAX) {
                    Ok(()) => {}
                    Err(SendTimeoutError::Closed(_)) => return,
                    Err(SendTimeoutError::Timeout(_)) => {
                        tracing::warn!(index, "snapshot written but the loop did not take the news")
                    }
                }
            }
            SnapshotJob::Compact { upto } => {
                let result = wal.compact(upto);
                let fatal = result
                    .as_ref()
                    .is_err_and(|e| compaction_failure(e) == CompactionFailure::Fatal);
                if !fatal {
                    remove_old_snapshots(&snap_dir, upto);
                }
                let report = Input::WalCompacted { upto, result };
                match inputs.send_timeout(report, SNAPSHOT_REPORT_WAIT_MAX) {
                    Ok(()) => {}
                    Err(SendTimeoutError::Closed(_)) => return,
                    Err(SendTimeoutError::Timeout(report)) => {
                        if let Input::WalCompacted { result: Err(e), .. } = report {
                            tracing::error!(upto, error = %e,
                                "WAL compaction failed and the loop did not take the news");
                        }
                    }
                }
            }
            SnapshotJob::Drop(state) => drop(state),
        }
    }
}

impl<S: StateMachine> EventLoop<S> {
    /// Freezes the state machine and hands the view to the snapshot
    /// thread. O(1) on the loop (what `snapshot` costs).
    pub(super) fn start_snapshot(&mut self) -> Result<(), String> {
        let index = self.applied;
        if index <= self.last_snapshot_index {
            return Ok(());
        }
        let term = self
            .wal
            .term(index)
            .map_err(|e| format!("term of applied entry {index}: {e}"))?;
        let path = storage::snapshot_path(&self.snap_dir, index, term);
        let job = SnapshotJob::Write {
            view: self.sm.snapshot(),
            index,
            term,
            path,
        };
        if self.worker.submit(job).is_err() {
            // The thread is behind: try again after more applies.
            self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY_AFTER);
            return Ok(());
        }
        self.snapshot_in_progress = true;
        self.applied_since_snapshot = (0, 0);
        self.stages.snapshots_started += 1;
        Ok(())
    }

    pub(super) fn on_snapshot_written(
        &mut self,
        index: Index,
        term: Term,
        path: PathBuf,
        result: Result<(u64, u32), String>,
        took: Duration,
    ) {
        self.snapshot_in_progress = false;
        let (len, crc) = match result {
            Ok(done) => done,
            Err(e) => {
                self.stages.snapshot_failures += 1;
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY_AFTER);
                tracing::warn!(index, error = %e, retry_in = ?SNAPSHOT_RETRY_AFTER,
                    "snapshot failed; the log is kept and it will be retried");
                return;
            }
        };
        self.snapshot_retry_at = None;
        self.stages.snapshots_taken += 1;
        self.stages
            .snapshot_write_us
            .saturating_record(took.as_micros().max(1) as u64);
        tracing::info!(
            index,
            term,
            bytes = len,
            ms = took.as_millis() as u64,
            "snapshot taken"
        );
        if index <= self.last_snapshot_index {
            // An installed snapshot overtook it.
            return;
        }
        self.last_snapshot_index = index;
        self.held.insert(index, term);
        self.untold.push_back((index, term));
        let offer = SnapshotOffer {
            len,
            crc,
            addr: self.snapshot_addr,
        };
        self.offer_snapshot(index, term, path, offer);
        self.tell_snapshots();
    }

    /// Tells the core of the newest durable snapshot that is at least
    /// `snapshot_catchup_entries` behind what is applied, unless a
    /// follower catching up from a snapshot still needs what it would drop
    /// ([`EventLoop::compaction_held`]).
    pub(super) fn tell_snapshots(&mut self) {
        let margin = self.cfg.snapshot_catchup_entries;
        let told = self
            .untold
            .iter()
            .take_while(|&&(index, _)| index.saturating_add(margin) <= self.applied)
            .count();
        let Some(&(index, _)) = told.checked_sub(1).and_then(|i| self.untold.get(i)) else {
            return;
        };
        if self.compaction_held(index) {
            return;
        }
        self.untold.drain(..told);
        self.raft.snapshot_taken(index);
    }

    /// Whether compacting the log through `index` waits for a follower
    /// that was offered a snapshot and has not yet matched `index`: it
    /// needs the entries after its snapshot to catch up.
    ///
    /// A follower holds compaction while it makes progress: until it has
    /// gone [`CATCHUP_HOLD_MAX`] without its match index moving (counted
    /// from the first offer: the fetch and restore, then from each step
    /// of the catch-up), after which it holds nothing until it moves again
    /// (so a member that is down does not hold the log for ever). No
    /// follower holds it once the log held in memory passes
    /// [`CATCHUP_HOLD_LOG_FACTOR`] snapshot intervals, or once this member
    /// stops leading.
    fn compaction_held(&mut self, index: Index) -> bool {
        if self.catchups.is_empty() {
            self.compaction_holding = false;
            return false;
        }
        let log = self.raft.log();
        let factor = CATCHUP_HOLD_LOG_FACTOR;
        let entries_max = (self.cfg.snapshot_entries.saturating_mul(factor))
            .saturating_add(self.cfg.snapshot_catchup_entries);
        let bytes_max = self.cfg.snapshot_bytes.saturating_mul(factor);
        let held_entries = log.last_index() - log.base().0;
        let held_bytes = log.bytes() as u64;
        let too_long = held_entries > entries_max || held_bytes > bytes_max;
        let leading = self.raft.role() == Role::Leader;
        let now = Instant::now();
        let raft = &self.raft;
        let stages = &mut self.stages;
        let mut held = false;
        self.catchups.retain(|&peer, c| {
            let Some(pr) = raft.progress(peer).filter(|_| leading) else {
                return false;
            };
            if pr.match_index >= index {
                return false;
            }
            if pr.match_index > c.matched {
                c.matched = pr.match_index;
                c.since = now;
                c.given_up = false;
            }
            if c.given_up {
                return true;
            }
            let waited = now.duration_since(c.since);
            if waited > CATCHUP_HOLD_MAX {
                c.given_up = true;
                stages.catchup_holds_ended += 1;
                tracing::warn!(
                    peer,
                    snapshot = c.index,
                    matched = pr.match_index,
                    ?waited,
                    "log compaction no longer held for a follower that stopped catching up"
                );
                return true;
            }
            held = true;
            true
        });
        if held && too_long {
            if self.compaction_holding {
                stages.catchup_holds_ended += 1;
                tracing::warn!(
                    held_entries,
                    held_bytes,
                    "log compaction no longer held for followers catching up: the log is too long"
                );
            }
            held = false;
        }
        if held && !self.compaction_holding {
            self.stages.catchup_holds += 1;
            tracing::info!(upto = index, followers = ?self.catchups.keys().collect::<Vec<_>>(),
                "log compaction held for followers catching up from a snapshot");
        }
        self.compaction_holding = held;
        held
    }

    pub(super) fn offer_snapshot(
        &mut self,
        index: Index,
        term: Term,
        path: PathBuf,
        offer: SnapshotOffer,
    ) {
        self.snapshots.insert(
            path,
            skiff_net::SnapshotMeta {
                index,
                term,
                len: offer.len,
                crc: offer.crc,
            },
        );
        if let Some((old, _, _)) = self.snapshot.replace((index, term, offer)) {
            if old != index {
                self.snapshots.remove(old);
            }
        }
    }

    /// `Compact`: record the snapshot in the WAL; once durable, compact.
    pub(super) fn record_snapshot(
        &mut self,
        upto: Index,
        membership: &Membership,
    ) -> Result<(), String> {
        let Some(&term) = self.held.get(&upto) else {
            return Ok(());
        };
        let batch = self.snapshot_record(upto, term, membership);
        self.write_wal(
            batch,
            Durable::SnapshotRecorded { upto },
            "WAL snapshot record",
        )
    }

    /// The WAL write recording a snapshot at (`index`, `term`) with its
    /// membership; kept as the last one asked for (see `no_space.rs`).
    fn snapshot_record(&mut self, index: Index, term: Term, membership: &Membership) -> WriteBatch {
        let mut data = BytesMut::new();
        encode_membership(membership, &mut data);
        let meta = skiff_wal::SnapshotMeta {
            index,
            term,
            data: data.freeze(),
        };
        self.last_snapshot_meta = Some(meta.clone());
        WriteBatch {
            snapshot: Some(meta),
            ..WriteBatch::default()
        }
    }

    /// The WAL's snapshot record through `upto` is durable: the rest is
    /// the snapshot thread's.
    pub(super) fn on_snapshot_recorded(&mut self, upto: Index) {
        self.held = self.held.split_off(&upto);
        if self.worker.submit(SnapshotJob::Compact { upto }).is_err() {
            tracing::debug!(
                upto,
                "snapshot thread busy; WAL compaction left to the next snapshot"
            );
        }
    }

    /// `SendSnapshot`: offer our latest snapshot; the follower fetches it.
    pub(super) fn send_snapshot(&mut self, to: NodeId, needed: Index, membership: Membership) {
        let Some((index, term, offer)) = self.snapshot.clone() else {
            tracing::warn!(to, "a follower needs a snapshot but none is held");
            return;
        };
        if index < needed {
            tracing::warn!(to, index, needed, "the snapshot held is older than needed");
            return;
        }
        let msg = Message {
            from: self.cfg.id,
            to,
            term: self.raft.term(),
            body: MessageBody::InstallSnapshot {
                index,
                snapshot_term: term,
                membership,
                data: offer.encode(),
            },
        };
        tracing::info!(to, index, "offering snapshot");
        self.send(msg);
        let matched = self.raft.progress(to).map_or(0, |pr| pr.match_index);
        self.catchups
            .entry(to)
            .and_modify(|c| c.index = index)
            .or_insert(Catchup {
                index,
                matched,
                since: Instant::now(),
                given_up: false,
            });
    }

    /// `InstallSnapshot`: swap in the state restored off the loop and make
    /// the snapshot the WAL's base.
    pub(super) fn install_snapshot(
        &mut self,
        id: PersistId,
        index: Index,
        term: Term,
        membership: &Membership,
    ) -> Result<(), String> {
        let fetched = self
            .fetched
            .remove(&index)
            .ok_or_else(|| format!("snapshot {index} to install was not fetched"))?;
        let old = self.sm.install(*fetched.state);
        self.worker.drop_off_loop(Box::new(old));
        // Entries left to apply are all below the snapshot (the core
        // installs one only above its commit index): it replaces them.
        self.to_apply.clear();
        self.applied = index;
        self.sm_busy = true;
        self.stages.snapshots_installed += 1;
        let offer = SnapshotOffer {
            len: fetched.len,
            crc: fetched.crc,
            addr: self.snapshot_addr,
        };
        self.held.insert(index, term);
        self.untold.clear();
        self.offer_snapshot(index, term, fetched.path, offer);
        self.last_snapshot_index = index;
        self.applied_since_snapshot = (0, 0);
        // Requests waiting on entries the snapshot replaced.
        let stale: Vec<Index> = self.writes.range(..=index).map(|(i, _)| *i).collect();
        for i in stale {
            if let Some(p) = self.writes.remove(&i) {
                let _ = p.reply.send(Err(lost()));
            }
        }
        let batch = self.snapshot_record(index, term, membership);
        self.write_wal(batch, Durable::Persisted(id), "WAL snapshot record")?;
        // Once durable, compact below it (`on_persisted`): otherwise the
        // log and the files it replaced stay until this member's own next
        // snapshot, one more snapshot's worth of disk per install.
        self.install_recorded = Some((id, index));
        // The WAL's log is read next: it must have taken the record.
        self.flush_wal_backlog()?;
        self.wal_last = self.wal.last_index();
        tracing::info!(index, term, "snapshot installed");
        Ok(())
    }
}

/// What a failed WAL compaction means to the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompactionFailure {
    /// Failed without harm to what is durable (an old segment not removed
    /// or recycled: its space is not reclaimed): counted, and the next
    /// snapshot's compaction tries again (it covers everything below it).
    Retry,
    /// The WAL failed, or an fsync did: the member stops, as on any fatal
    /// WAL error. An fsync error is never retried: the kernel may have
    /// dropped what it could not write.
    Fatal,
    /// The WAL is closed: the member is stopping.
    Stopped,
}

/// The decision table of a failed compaction.
pub(crate) fn compaction_failure(e: &skiff_wal::Error) -> CompactionFailure {
    match e {
        e if e.is_sync_failure() => CompactionFailure::Fatal,
        skiff_wal::Error::Closed => CompactionFailure::Stopped,
        _ => CompactionFailure::Retry,
    }
}

impl<S: StateMachine> EventLoop<S> {
    /// The snapshot thread's report of a compaction. `Err`: fatal.
    pub(super) fn on_wal_compacted(
        &mut self,
        upto: Index,
        result: Result<usize, skiff_wal::Error>,
    ) -> Result<(), String> {
        let e = match result {
            Ok(n) => {
                tracing::debug!(upto, segments = n, "WAL compacted");
                return Ok(());
            }
            Err(e) => e,
        };
        match compaction_failure(&e) {
            CompactionFailure::Retry => {
                self.stages.wal_compaction_failures += 1;
                tracing::warn!(upto, error = %e,
                    "WAL compaction failed; counted, tried again with the next snapshot");
                Ok(())
            }
            CompactionFailure::Fatal => Err(format!("WAL compaction through {upto}: {e}")),
            CompactionFailure::Stopped => Ok(()),
        }
    }
}

/// Removes snapshot files below `upto` but the newest [`SNAPSHOTS_KEPT`]
/// of them (files at or above `upto` are the recorded one and newer ones
/// not yet recorded).
fn remove_old_snapshots(snap_dir: &Path, upto: Index) {
    let mut older = storage::snapshot_files(snap_dir);
    older.retain(|(index, _)| *index < upto);
    let drop_n = older.len().saturating_sub(SNAPSHOTS_KEPT);
    for (_, path) in &older[..drop_n] {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::debug!(path = %path.display(), error = %e, "old snapshot not removed");
        }
    }
}

/// A writer that fails once `stop` is set (the member is shutting down:
/// a snapshot of a large state is abandoned rather than waited for).
struct Stoppable<'a, W> {
    inner: W,
    stop: &'a AtomicBool,
}

impl<W: Write> Write for Stoppable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the member is shutting down"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Dirty bytes of a snapshot file the snapshot thread lets pile up before
/// it starts their writeback (and waits for the chunk before).
pub const SNAPSHOT_SYNC_BYTES: u64 = 8 << 20;

/// A file written in order whose data is sent to the disk as it goes:
/// every [`SNAPSHOT_SYNC_BYTES`] the chunk just written starts its
/// writeback and the one before is waited for (`sync_file_range`), so
/// that at most two chunks are dirty at any time. Without it a snapshot of
/// hundreds of MiB sat dirty in the page cache until its fsync, and any
/// journal commit meanwhile (the WAL's directory fsync at a segment roll,
/// on ext4 in ordered mode) had to flush it first: the WAL's driver
/// stalled ~100 ms and the event loop with it (measured: one
/// `skiff_wal_submit_us` of ~100 ms per member per minute with snapshots
/// on, none with them off). A failed range sync fails the snapshot write
/// (its error might otherwise not reach the final fsync).
struct SyncAsWritten {
    file: std::fs::File,
    written: u64,
    /// Writeback started up to here.
    started: u64,
    /// Writeback waited for up to here.
    waited: u64,
    /// The file system does not do range syncs (EINVAL, ENOSYS,
    /// EOPNOTSUPP): the final fsync alone makes the file durable.
    unsupported: bool,
}

impl SyncAsWritten {
    fn new(file: std::fs::File) -> Self {
        SyncAsWritten {
            file,
            written: 0,
            started: 0,
            waited: 0,
            unsupported: false,
        }
    }

    fn sync_range(&mut self, from: u64, to: u64, flags: libc::c_uint) -> std::io::Result<()> {
        if self.unsupported {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open fd and a byte range; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                flags,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    self.unsupported = true;
                    Ok(())
                }
                _ => Err(e),
            };
        }
        Ok(())
    }
}

impl Write for SyncAsWritten {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= SNAPSHOT_SYNC_BYTES {
            if self.started > self.waited {
                self.sync_range(
                    self.waited,
                    self.started,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )?;
                self.waited = self.started;
            }
            self.sync_range(self.started, self.written, libc::SYNC_FILE_RANGE_WRITE)?;
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes `view` to `path` durably (temporary file written back as it
/// goes, fsync, rename, directory fsync); returns its length and CRC32C.
/// A failure leaves no file under `path` (the temporary one is removed);
/// so does `stop`.
fn write_snapshot_file(
    view: &impl SnapshotView,
    path: &Path,
    stop: &AtomicBool,
) -> std::io::Result<(u64, u32)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = crate::storage::CrcWriter::new(Stoppable {
            inner: std::io::BufWriter::with_capacity(1 << 20, SyncAsWritten::new(file)),
            stop,
        });
        view.write_to(&mut w)?;
        w.flush()?;
        let (len, crc) = (w.len, w.crc);
        let file = w.inner.inner.into_inner().map_err(|e| e.into_error())?.file;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        storage::sync_dir(dir)?;
        Ok((len, crc))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub(crate) fn file_crc(path: &Path) -> std::io::Result<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writeback is started for each chunk written and waited for one
    /// chunk behind: at most two chunks dirty; the file is whole.
    #[test]
    fn a_snapshot_file_is_written_back_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = SyncAsWritten::new(std::fs::File::create(&path).unwrap());
        let chunk = vec![7u8; 1 << 20];
        let total = 3 * SNAPSHOT_SYNC_BYTES + (1 << 20);
        for _ in 0..total / chunk.len() as u64 {
            w.write_all(&chunk).unwrap();
            if !w.unsupported {
                assert!(
                    w.written - w.waited <= 2 * SNAPSHOT_SYNC_BYTES,
                    "{}",
                    w.written
                );
            }
        }
        if !w.unsupported {
            assert_eq!(w.started, 3 * SNAPSHOT_SYNC_BYTES);
            assert_eq!(w.waited, 2 * SNAPSHOT_SYNC_BYTES);
        }
        w.file.sync_all().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), total);
    }

    struct Bytes3;
    impl SnapshotView for Bytes3 {
        fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
            w.write_all(b"abc")
        }
    }
    struct Failing;
    impl SnapshotView for Failing {
        fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk said no"))
        }
    }

    #[test]
    fn snapshot_files_are_whole_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot-1.snap");
        let go = AtomicBool::new(false);
        let (len, crc) = write_snapshot_file(&Bytes3, &path, &go).unwrap();
        assert_eq!((len, crc), (3, crc32c::crc32c(b"abc")));
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert_eq!(file_crc(&path).unwrap(), crc);
        let other = dir.path().join("snapshot-2.snap");
        let err = write_snapshot_file(&Failing, &other, &go).unwrap_err();
        assert!(err.to_string().contains("disk said no"));
        assert!(!other.exists());
        assert!(!other.with_extension("tmp").exists());
        // A member shutting down abandons the write.
        let stop = AtomicBool::new(true);
        let err = write_snapshot_file(&Bytes3, &other, &stop).unwrap_err();
        assert!(err.to_string().contains("shutting down"));
        assert!(!other.exists());
        assert!(!other.with_extension("tmp").exists());
    }

    #[test]
    fn old_snapshots_go_but_the_recorded_and_newer_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: u64| storage::snapshot_path(dir.path(), i, 1);
        for i in [10, 20, 30, 40, 50] {
            std::fs::write(name(i), b"x").unwrap();
        }
        remove_old_snapshots(dir.path(), 40);
        let left: Vec<bool> = [10, 20, 30, 40, 50]
            .iter()
            .map(|&i| name(i).exists())
            .collect();
        assert_eq!(left, [false, false, true, true, true]);
    }

    // ---- WAL compaction failures.

    use crate::event_loop::test_support::{one_member_loop, Nop, TestDisk};
    use crate::queue::InputQueue;

    /// A WAL of several 16 KiB segments holding entries 1..=100 and a
    /// durable snapshot record at 90.
    fn wal_to_compact(dir: &Path, storage: Arc<dyn skiff_wal::Storage>) -> Arc<Wal> {
        let opts = skiff_wal::Options {
            segment_size: 16 << 10,
            spare_segments: 0,
            snapshot_meta_max: 1024,
            ..skiff_wal::Options::default()
        };
        let wal = Wal::open_with_storage(dir, opts, storage).unwrap();
        for first in (1..=100u64).step_by(10) {
            let entries = (first..first + 10)
                .map(|index| skiff_wal::Entry {
                    index,
                    term: 1,
                    payload: Bytes::from(vec![7u8; 1024]),
                })
                .collect();
            wal.append(entries).unwrap().wait().unwrap();
        }
        let meta = skiff_wal::SnapshotMeta {
            index: 90,
            term: 1,
            data: Bytes::new(),
        };
        wal.save_snapshot(meta).unwrap().wait().unwrap();
        assert!(wal.segment_count() > 2, "{} segments", wal.segment_count());
        Arc::new(wal)
    }

    /// The next `WalCompacted` report on `inputs`.
    fn next_compaction(
        inputs: &crate::queue::QueueReceiver<Input<Nop>>,
    ) -> (Index, Result<usize, skiff_wal::Error>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            got.clear();
            match inputs.recv_many(&mut got, 16, Some(deadline)) {
                Ok(0) | Err(_) => panic!("no compaction report within 10 s"),
                Ok(_) => {}
            }
            for input in got.drain(..) {
                if let Input::WalCompacted { upto, result } = input {
                    return (upto, result);
                }
            }
        }
    }

    #[test]
    fn a_failed_compaction_is_reported_to_the_loop_not_only_logged() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(TestDisk::default());
        let wal = wal_to_compact(&dir.path().join("wal"), storage.clone());
        let snap_dir = dir.path().join("snap");
        std::fs::create_dir(&snap_dir).unwrap();
        let (tx, rx) = InputQueue::<Input<Nop>>::new(64);
        let mut worker = SnapshotWorker::start("compact-test".into(), wal.clone(), snap_dir, tx)
            .expect("snapshot thread");

        storage.fail_unlinks.store(true, Ordering::Relaxed);
        assert!(worker.submit(SnapshotJob::Compact { upto: 90 }).is_ok());
        let (upto, result) = next_compaction(&rx);
        assert_eq!(upto, 90);
        let e = result.expect_err("unlinks fail");
        assert_eq!(compaction_failure(&e), CompactionFailure::Retry, "{e}");

        // The next snapshot's compaction is tried again, and reported.
        storage.fail_unlinks.store(false, Ordering::Relaxed);
        let meta = skiff_wal::SnapshotMeta {
            index: 100,
            term: 1,
            data: Bytes::new(),
        };
        wal.save_snapshot(meta).unwrap().wait().unwrap();
        assert!(worker.submit(SnapshotJob::Compact { upto: 100 }).is_ok());
        let (upto, result) = next_compaction(&rx);
        assert_eq!(upto, 100);
        result.expect("compaction with working unlinks");
        worker.shutdown();
    }

    #[test]
    fn compaction_failures_fatal_only_for_a_failed_wal_or_fsync() {
        let io = |op| skiff_wal::Error::Io {
            op,
            path: "wal/00000001.seg".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let table = [
            (io("remove segment"), CompactionFailure::Retry),
            (io("recycle segment"), CompactionFailure::Retry),
            (io(skiff_wal::OP_SYNC_DIRECTORY), CompactionFailure::Fatal),
            (io(skiff_wal::OP_FDATASYNC), CompactionFailure::Fatal),
            // An op that merely mentions syncing is not a sync.
            (io("resync spare list"), CompactionFailure::Retry),
            (
                skiff_wal::Error::Failed {
                    reason: "fdatasync: EIO".into(),
                },
                CompactionFailure::Fatal,
            ),
            (
                skiff_wal::Error::SnapshotNotDurable { index: 9 },
                CompactionFailure::Retry,
            ),
            (skiff_wal::Error::Closed, CompactionFailure::Stopped),
        ];
        for (e, expected) in table {
            assert_eq!(compaction_failure(&e), expected, "{e}");
        }
    }

    fn io_error(op: &'static str) -> skiff_wal::Error {
        skiff_wal::Error::Io {
            op,
            path: "wal/00000001.seg".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        }
    }

    #[test]
    fn a_failed_compaction_is_counted_and_the_loop_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut lp, _tx) = one_member_loop(dir.path(), None);
        let (mut writes, mut reads, mut bytes) = (Vec::new(), Vec::new(), 0);
        let metric = |lp: &mut EventLoop<Nop>| {
            let text = lp.render_metrics();
            let line = text
                .lines()
                .find(|l| l.starts_with("skiff_wal_compaction_failures_total "))
                .expect("the metric is rendered")
                .to_owned();
            line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(metric(&mut lp), 0);
        for result in [
            Err(io_error("remove segment")),
            Ok(3),
            Err(skiff_wal::Error::Closed),
            Err(io_error("recycle segment")),
        ] {
            let input = Input::WalCompacted { upto: 10, result };
            assert!(lp
                .collect(input, &mut writes, &mut reads, &mut bytes)
                .is_ok());
        }
        assert_eq!(metric(&mut lp), 2);
        lp.stop(None);
    }

    #[test]
    fn a_failed_wal_or_fsync_in_compaction_stops_the_member() {
        for e in [
            io_error(skiff_wal::OP_SYNC_DIRECTORY),
            skiff_wal::Error::Failed {
                reason: "fdatasync: EIO".into(),
            },
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (lp, tx) = one_member_loop(dir.path(), None);
            let shared = lp.shared.clone();
            let expected = e.to_string();
            let (done, ended) = std::sync::mpsc::channel();
            std::thread::spawn(move || done.send(lp.run()));
            tx.send_timeout(
                Input::WalCompacted {
                    upto: 10,
                    result: Err(e),
                },
                Duration::from_secs(5),
            )
            .unwrap();
            let Ok(result) = ended.recv_timeout(Duration::from_secs(10)) else {
                let _ = tx.send_timeout(Input::Shutdown, Duration::from_secs(5));
                panic!("the member goes on after {expected}");
            };
            let why = result.expect_err("a fatal stop");
            assert!(
                why.contains("WAL compaction") && why.contains(&expected),
                "{why}"
            );
            assert!(shared.stopped.load(Ordering::Acquire));
            let fatal = shared.fatal.lock().unwrap().clone();
            assert_eq!(fatal.as_deref(), Some(why.as_str()));
        }
    }
}
