//! A WAL that ran out of space (ENOSPC, EDQUOT): the member goes on.
//!
//! The WAL reports a write that ran out of space in one of two ways:
//! `Full` from `write` (no room for a new segment: nothing was queued), or
//! `NoSpace` on the ticket (the write and every write queued behind it were
//! dropped, and the WAL's log rolled back to before them; a write handed
//! over after the rollback that no longer continues its log is refused).
//! Either way nothing acknowledged is lost, and the Raft core still holds
//! in memory every entry it asked to persist. The loop then:
//!
//! * stops writing to the WAL: every persist from then on is *owed* (the
//!   highest id is kept; sends held for it stay held, so no acknowledgement
//!   or vote leaves for what is not durable), and the tickets already in
//!   flight report nothing (a later one may be durable while an earlier one
//!   was dropped, and persists are reported in order only);
//! * reports its space low (`Shared::space_low`: the KV raises NOSPACE and
//!   refuses writes, reads go on);
//! * every [`NO_SPACE_RETRY`], once no ticket is in flight, compares the
//!   WAL's log with the core's and writes the difference — the snapshot
//!   record the core's log now starts from if the WAL lacks it, a
//!   truncation where the two disagree, the entries, the hard state — in
//!   writes of at most [`REWRITE_BYTES_MAX`] of entries. The last of them
//!   carries the highest owed persist: its durability reports every owed
//!   persist at once. A rewrite that runs out of space again starts over.
//!
//! To the rest of the cluster the member looks like one with a stalled
//! disk: as a follower it does not acknowledge, until the rewrite is
//! durable; a majority with room goes on committing. It applies nothing
//! meanwhile (the core applies only entries durable here), so a leader
//! hands leadership to the most caught-up voter, and retries that with
//! every rewrite attempt. A snapshot not yet recorded is recorded by the rewrite
//! (`last_snapshot_meta`); if the core's log starts above what the WAL
//! holds and no such record is known the member stops (never seen: the
//! core's log moves only by snapshots the loop records).

use skiff_wal::Error as WalError;

use super::*;

/// How often a member whose WAL ran out of space tries to write what it
/// owes (the WAL's spare-segment pre-writer retries as often).
pub const NO_SPACE_RETRY: Duration = Duration::from_millis(200);
/// Entry bytes per write of a rewrite, at most (and at most a quarter of a
/// WAL segment: a record must fit in one).
pub const REWRITE_BYTES_MAX: usize = 4 << 20;

/// The state of a member whose WAL ran out of space.
pub(super) struct NoSpace {
    since: Instant,
    retry_at: Instant,
    /// The highest persist not made durable (0: none).
    owed: PersistId,
}

impl<S: StateMachine> EventLoop<S> {
    /// Hands `batch` to the WAL without waiting and keeps its ticket; a
    /// write the WAL cannot take at once waits in the loop's backlog, in
    /// order (see `wal_tickets.rs`). While the WAL is out of space nothing
    /// is written and `durable` is owed. A write the WAL refuses for want
    /// of space starts that state; any other refusal is fatal (named
    /// `what`).
    pub(super) fn write_wal(
        &mut self,
        batch: WriteBatch,
        durable: Durable,
        what: &'static str,
    ) -> Result<(), String> {
        if self.no_space.is_some() {
            self.owe(durable);
            return Ok(());
        }
        self.backlog_push(Backlogged::new(batch, durable, what));
        self.drain_wal_backlog()
    }

    /// The WAL refused a write (`what`) with `e`: out of space starts that
    /// state and owes `durable`; anything else is fatal.
    pub(super) fn wal_write_failed(
        &mut self,
        e: WalError,
        durable: Durable,
        what: &str,
    ) -> Result<(), String> {
        if self.out_of_space(&e) {
            self.enter_no_space(&e.to_string());
            self.owe(durable);
            Ok(())
        } else {
            Err(format!("{what}: {e}"))
        }
    }

    /// Whether the WAL refused a write for want of space.
    fn out_of_space(&self, e: &WalError) -> bool {
        match e {
            WalError::Full { .. } | WalError::NoSpace { .. } => true,
            // A write that no longer continues the WAL's log: the WAL
            // rolled back writes that ran out of space, as one of the
            // tickets in flight says.
            WalError::NonContiguous { .. } | WalError::Unavailable { .. } => self
                .tickets
                .iter()
                .any(|(t, _, _)| matches!(t.is_durable(), Err(WalError::NoSpace { .. }))),
            _ => false,
        }
    }

    fn owe(&mut self, durable: Durable) {
        if let (Some(ns), Durable::Persisted(id)) = (self.no_space.as_mut(), durable) {
            ns.owed = ns.owed.max(id);
        }
    }

    /// The WAL ran out of space (`why`): stop writing, owe every persist in
    /// flight, report the space low.
    pub(super) fn enter_no_space(&mut self, why: &str) {
        if self.no_space.is_some() {
            return;
        }
        let mut owed = 0;
        for (_, durable, _) in self.tickets.iter_mut() {
            if let Durable::Persisted(id) = *durable {
                owed = owed.max(id);
                *durable = Durable::Owed;
            }
        }
        // Writes the WAL had not taken yet are owed too (the rewrite
        // writes what the WAL lacks, their part included).
        for b in self.take_wal_backlog() {
            if let Durable::Persisted(id) = b.durable {
                owed = owed.max(id);
            }
        }
        tracing::warn!(
            error = why,
            "the WAL ran out of space: what Raft asks to persist waits until there is room \
             (retried every {NO_SPACE_RETRY:?}); writes are refused, reads go on"
        );
        self.stages.wal_no_space += 1;
        let now = Instant::now();
        self.no_space = Some(NoSpace {
            since: now,
            retry_at: now + NO_SPACE_RETRY,
            owed,
        });
        self.check_space();
        self.hand_over_if_leading("the WAL is out of space");
    }

    /// A leader that cannot make its own entries durable applies nothing
    /// (entries are applied once durable here), so it answers no client:
    /// it hands leadership to the most caught-up voter.
    pub(super) fn hand_over_if_leading(&mut self, why: &str) {
        if self.raft.role() != Role::Leader
            || self.raft.transferee().is_some()
            || self.raft.membership().all_voters().len() < 2
        {
            return;
        }
        tracing::warn!("{why}: handing leadership over");
        let (reply, _) = oneshot::channel();
        self.transfer_leadership(None, reply);
    }

    /// Whether the WAL is out of space (a rewrite pending).
    pub(super) fn wal_out_of_space(&self) -> bool {
        self.no_space.is_some()
    }

    /// Out of space and due: writes what the WAL lacks of the core's log
    /// (see the module docs). `Err` is fatal.
    pub(super) fn retry_no_space(&mut self) -> Result<(), String> {
        let (owed, since) = match &self.no_space {
            Some(ns) if self.tickets.is_empty() && Instant::now() >= ns.retry_at => {
                (ns.owed, ns.since)
            }
            _ => return Ok(()),
        };
        self.hand_over_if_leading("the WAL is out of space");
        let batches = self.rewrite_batches()?;
        let (writes, entries) = (
            batches.len(),
            batches.iter().map(|b| b.entries.len()).sum::<usize>(),
        );
        for (i, batch) in batches.into_iter().enumerate() {
            let durable = if i + 1 == writes && owed > self.durable {
                Durable::Persisted(owed)
            } else {
                Durable::Owed
            };
            match self.wal.write(batch) {
                Ok(ticket) => self.wait_for(ticket, durable)?,
                Err(e) if self.out_of_space(&e) => {
                    // Still no room (what was queued before is owed too:
                    // its tickets report nothing).
                    if let Some(ns) = self.no_space.as_mut() {
                        ns.retry_at = Instant::now() + NO_SPACE_RETRY;
                    }
                    return Ok(());
                }
                Err(e) => return Err(format!("WAL rewrite after running out of space: {e}")),
            }
        }
        self.no_space = None;
        self.wal_last = self.wal.last_index();
        if writes == 0 && owed > self.durable {
            // The WAL holds all the core asked for: what was owed is durable.
            self.on_persisted(owed);
        }
        tracing::info!(
            writes,
            entries,
            out_of_space_ms = since.elapsed().as_millis() as u64,
            "WAL writes resumed: what was owed is written again"
        );
        self.check_space();
        Ok(())
    }

    /// The writes that bring the WAL (all of its tickets resolved) to the
    /// core's log and hard state.
    fn rewrite_batches(&self) -> Result<Vec<WriteBatch>, String> {
        let log = self.raft.log();
        let (base, _) = log.base();
        let raft_last = log.last_index();
        let wal_last = self.wal.last_index();
        let wal_snapshot = self.wal.snapshot().map_or(0, |s| s.index);
        // The snapshot the core's log starts from, if the WAL lacks it.
        let snapshot = self
            .last_snapshot_meta
            .as_ref()
            .filter(|m| m.index == base && m.index > wal_snapshot)
            .cloned();
        // The first index where the two logs may differ: below it (and
        // above the snapshots) the WAL's terms match the core's.
        let floor = base.max(wal_snapshot);
        let mut k = wal_last.min(raft_last) + 1;
        while k - 1 > floor && self.wal.term(k - 1).ok() != log.term(k - 1) {
            k -= 1;
        }
        let (from, truncate_from) = match &snapshot {
            Some(meta) if k > base && self.wal.term(base).ok() == Some(meta.term) => {
                (k, (k <= wal_last).then_some(k))
            }
            // The WAL's log is replaced from the snapshot on.
            Some(_) => (base + 1, None),
            None if k <= base => {
                return Err(format!(
                    "the WAL ran out of space and cannot be brought back: the Raft log starts \
                     after {base}, the WAL holds up to {wal_last}, and no snapshot record at \
                     {base} is known"
                ))
            }
            None => (k, (k <= wal_last).then_some(k)),
        };
        let mut batches = Vec::new();
        let mut batch = WriteBatch {
            truncate_from,
            snapshot,
            ..WriteBatch::default()
        };
        let chunk = REWRITE_BYTES_MAX.min(self.wal.options().segment_size as usize / 4);
        let mut bytes = 0;
        for index in from..=raft_last {
            let e = log
                .entry(index)
                .ok_or_else(|| format!("entry {index} of the Raft log is missing"))?;
            if bytes >= chunk {
                batches.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            let e = storage::to_wal(e);
            bytes += e.payload.len();
            batch.entries.push(e);
        }
        let hard_state = storage::to_wal_hard_state(self.raft.hard_state());
        if hard_state != self.wal.hard_state() {
            batch.hard_state = Some(hard_state);
        }
        let empty = batch.truncate_from.is_none()
            && batch.snapshot.is_none()
            && batch.entries.is_empty()
            && batch.hard_state.is_none();
        if !empty {
            batches.push(batch);
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::test_support::{
        one_member_config, one_member_loop_with, Nop, Refuses, TestDisk,
    };

    type Reply = oneshot::Receiver<Result<(), RequestError>>;

    /// One write of 4 KiB.
    fn write(tx: &QueueSender<Input<Nop>>) -> Reply {
        let (reply, answer) = oneshot::channel();
        let input = Input::Write {
            cmd: vec![7u8; 4096],
            reply,
            accepted: Instant::now(),
        };
        assert!(
            tx.send_timeout(input, Duration::from_secs(5)).is_ok(),
            "the loop ended"
        );
        answer
    }

    /// The answer to `r` within `wait`, if any.
    fn answer(r: &mut Reply, wait: Duration) -> Option<Result<(), RequestError>> {
        let deadline = Instant::now() + wait;
        loop {
            match r.try_recv() {
                Ok(a) => return Some(a),
                Err(oneshot::error::TryRecvError::Closed) => panic!("the reply was dropped"),
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() >= deadline => {
                    return None
                }
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
            }
        }
    }

    /// The value of `name` in the loop's metrics.
    fn metric(tx: &QueueSender<Input<Nop>>, name: &str) -> u64 {
        let (reply, mut text) = oneshot::channel();
        assert!(tx
            .send_timeout(Input::Metrics(reply), Duration::from_secs(5))
            .is_ok());
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            if let Ok(sample) = text.try_recv() {
                break sample.render(&Mutex::new(None));
            }
            assert!(Instant::now() < deadline, "no metrics within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        };
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }

    /// A running sole voter: its input queue, its shared state, its thread.
    type SoleVoter = (
        QueueSender<Input<Nop>>,
        Arc<Shared>,
        std::thread::JoinHandle<Result<(), String>>,
    );

    /// A one-member loop on `disk` in `dir`, running on a thread of its
    /// own, with small WAL segments (a few dozen writes need a new one, so
    /// a disk that refuses or stalls has no spare ready): it leads, and one
    /// write went through.
    fn running_sole_voter(dir: &std::path::Path, disk: &Arc<TestDisk>) -> SoleVoter {
        let cfg = NodeConfig {
            wal_segment_size: 256 << 10,
            ..one_member_config(dir)
        };
        let (lp, tx) = one_member_loop_with(cfg, Some(disk.clone()));
        let shared = lp.shared.clone();
        let runner = std::thread::spawn(move || lp.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match answer(&mut write(&tx), Duration::from_secs(10)) {
                Some(Ok(())) => break,
                Some(Err(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => panic!("no first write: {other:?}"),
            }
        }
        (tx, shared, runner)
    }

    /// Stops `voter` cleanly and checks that the WAL holds every entry it
    /// committed after `commit_before`; returns its commit index.
    fn stop_and_read_back(dir: &std::path::Path, voter: SoleVoter, commit_before: u64) -> u64 {
        let (tx, shared, runner) = voter;
        let commit = shared.commit.load(Ordering::Acquire);
        assert!(tx
            .send_timeout(Input::Shutdown, Duration::from_secs(5))
            .is_ok());
        runner.join().unwrap().expect("a clean stop");
        // What was answered is in the WAL.
        let wal = Wal::open(dir.join("wal"), skiff_wal::Options::default()).unwrap();
        let entries = wal.read(commit_before + 1, commit + 1).unwrap();
        assert_eq!(entries.len() as u64, commit - commit_before);
        commit
    }

    /// A sole voter whose WAL runs out of space keeps running: the writes
    /// it takes meanwhile wait (they cannot commit before they are
    /// durable); once there is room again they are written, answered, and
    /// found in the WAL after a restart.
    fn out_of_space_and_back(refuses: Refuses) {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(TestDisk {
            refuses,
            ..TestDisk::default()
        });
        let (tx, shared, runner) = running_sole_voter(dir.path(), &disk);
        let commit_before = shared.commit.load(Ordering::Acquire);

        disk.full.store(true, Ordering::Relaxed);
        // More than the active segment and the spare hold.
        let mut owed: Vec<Reply> = Vec::new();
        for _ in 0..10 {
            owed.extend((0..20).map(|_| write(&tx)));
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&tx, "skiff_wal_out_of_space") == 0 {
            assert!(Instant::now() < deadline, "the WAL never ran out of space");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Past a few retries: the member goes on, says it is short, and
        // answers nothing it could not make durable.
        std::thread::sleep(NO_SPACE_RETRY * 3);
        assert!(
            !shared.stopped.load(Ordering::Acquire),
            "the member stopped: {:?}",
            shared.fatal.lock().unwrap()
        );
        assert!(metric(&tx, "skiff_wal_no_space_total") >= 1);
        assert!(shared.space_low.load(Ordering::Acquire));
        let commit_full = shared.commit.load(Ordering::Acquire);
        let sent = owed.len() as u64;
        owed.retain_mut(|r| match answer(r, Duration::ZERO) {
            Some(a) => {
                assert!(a.is_ok(), "{a:?}");
                false
            }
            None => true,
        });
        let answered_full = sent - owed.len() as u64;
        assert_eq!(commit_full - commit_before, answered_full);
        assert!(!owed.is_empty(), "every write fit");

        // Room again: everything owed is written and answered.
        disk.full.store(false, Ordering::Relaxed);
        for r in &mut owed {
            let a = answer(r, Duration::from_secs(10)).expect("answered once there is room");
            assert!(a.is_ok(), "{a:?}");
        }
        assert_eq!(metric(&tx, "skiff_wal_out_of_space"), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.space_low.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "space still reported low");
            std::thread::sleep(Duration::from_millis(10));
        }
        let commit = stop_and_read_back(dir.path(), (tx, shared, runner), commit_before);
        assert!(commit >= commit_before + sent);
    }

    /// A disk that stops answering (writes and fsyncs hang) does not stop
    /// the loop: the writes the WAL cannot take wait in the loop's backlog,
    /// the loop answers meanwhile (here: metrics), answers no write before
    /// it is durable, and once the disk answers again every write is
    /// written in order, answered, and in the WAL after a restart. (The
    /// loop used to wait in the WAL for a spare segment or queue room, up
    /// to the WAL's 30-s `submit_timeout`, and then stop.)
    #[test]
    fn a_stalled_disk_does_not_stop_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(TestDisk::default());
        let (tx, shared, runner) = running_sole_voter(dir.path(), &disk);
        let commit_before = shared.commit.load(Ordering::Acquire);

        disk.stalled.set(true);
        let mut waiting: Vec<Reply> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Until the WAL takes no more (a backlog), the loop answering all
        // along.
        while metric(&tx, "skiff_wal_backlog_writes") == 0 {
            assert!(
                Instant::now() < deadline,
                "no backlog after {} writes",
                waiting.len()
            );
            waiting.extend((0..20).map(|_| write(&tx)));
            std::thread::sleep(Duration::from_millis(20));
        }
        waiting.extend((0..20).map(|_| write(&tx)));
        std::thread::sleep(Duration::from_millis(200));
        assert!(metric(&tx, "skiff_wal_backlog_writes") > 0);
        assert!(
            !shared.stopped.load(Ordering::Acquire),
            "the member stopped: {:?}",
            shared.fatal.lock().unwrap()
        );
        for r in &mut waiting {
            assert!(
                answer(r, Duration::ZERO).is_none(),
                "a write was answered before it was durable"
            );
        }

        disk.stalled.set(false);
        for r in &mut waiting {
            let a = answer(r, Duration::from_secs(10)).expect("answered once the disk answers");
            assert!(a.is_ok(), "{a:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(&tx, "skiff_wal_backlog_writes") > 0 {
            assert!(Instant::now() < deadline, "the backlog never emptied");
            std::thread::sleep(Duration::from_millis(10));
        }
        let commit = stop_and_read_back(dir.path(), (tx, shared, runner), commit_before);
        assert!(commit >= commit_before + waiting.len() as u64);
    }

    #[test]
    fn no_room_for_a_new_segment_is_owed_not_fatal() {
        out_of_space_and_back(Refuses::Growth);
    }

    #[test]
    fn a_write_dropped_for_want_of_space_is_owed_not_fatal() {
        out_of_space_and_back(Refuses::NonZeroWrites);
    }
}
