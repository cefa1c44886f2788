//! The loop's WAL tickets: each WAL write waits in the loop, in order,
//! until the WAL says durable; the WAL driver wakes the loop through the
//! tickets' waker, with no thread in between.
//!
//! The loop never waits to hand a write over: it offers each with
//! [`Wal::try_write`], and a write the WAL cannot take at once (its queue
//! to the I/O driver full, or no pre-written segment ready: a stalled or
//! saturated disk) waits in the loop's *backlog*, in order, offered again
//! on every pass (at least every [`WAL_BACKLOG_RETRY`]) before anything
//! after it. Meanwhile the loop goes on stepping Raft, sending heartbeats,
//! serving reads and applying what is durable; only what waits for this
//! member's persistence (its acknowledgements, votes, its own commits)
//! waits with the backlog. Past [`WAL_BACKLOG_BYTES_MAX`] the loop waits
//! for the WAL after all (up to its `submit_timeout`).
//!
//! A write not taken or not durable for [`WAL_STALL_ELECTIONS`] election
//! timeouts makes a leader hand leadership to the most caught-up voter:
//! its disk stalled (the others' did not), and it commits and answers
//! nothing meanwhile. (etcd's loop blocks on its WAL, and its followers
//! elect another leader once heartbeats stop.) One that waited the WAL's
//! `wait_timeout` is fatal, as before.

use skiff_wal::TryWriteError;

use super::*;

/// A write the WAL has not taken yet.
pub(crate) struct Backlogged {
    batch: WriteBatch,
    pub(super) durable: Durable,
    what: &'static str,
    bytes: usize,
    since: Instant,
}

impl Backlogged {
    pub(super) fn new(batch: WriteBatch, durable: Durable, what: &'static str) -> Backlogged {
        let bytes = batch
            .entries
            .iter()
            .map(|e| e.payload.len() + WAL_ENTRY_OVERHEAD)
            .sum::<usize>()
            + WAL_ENTRY_OVERHEAD;
        Backlogged {
            batch,
            durable,
            what,
            bytes,
            since: Instant::now(),
        }
    }
}

/// Bytes a backlogged entry is counted for besides its payload (index,
/// term, framing: an estimate, for the bound only).
const WAL_ENTRY_OVERHEAD: usize = 32;

impl<S: StateMachine> EventLoop<S> {
    pub(super) fn backlog_push(&mut self, b: Backlogged) {
        self.wal_backlog_bytes += b.bytes;
        self.wal_backlog.push_back(b);
    }

    /// Empties the backlog (the WAL ran out of space: what it held is
    /// owed).
    pub(super) fn take_wal_backlog(&mut self) -> VecDeque<Backlogged> {
        self.wal_backlog_bytes = 0;
        std::mem::take(&mut self.wal_backlog)
    }

    /// Offers the backlog to the WAL, oldest first, until the WAL is busy
    /// again; past [`WAL_BACKLOG_BYTES_MAX`] waits for it. See the module
    /// docs for what a backlog that does not move leads to.
    pub(super) fn drain_wal_backlog(&mut self) -> Result<(), String> {
        while let Some(front) = self.wal_backlog.pop_front() {
            self.wal_backlog_bytes -= front.bytes;
            let over = self.wal_backlog_bytes + front.bytes > WAL_BACKLOG_BYTES_MAX;
            let Backlogged {
                batch,
                durable,
                what,
                bytes,
                since,
            } = front;
            let offered = if over {
                // Bounded: wait for the WAL (the loop's own wait).
                self.wal.write(batch).map_err(TryWriteError::Failed)
            } else {
                self.wal.try_write(batch)
            };
            match offered {
                Ok(ticket) => {
                    // From the first offer to the WAL taking it.
                    self.stages.wal_submit_us.saturating_record(us_since(since));
                    self.wait_for(ticket, durable)?;
                }
                Err(TryWriteError::Busy(batch)) => {
                    self.wal_backlog_bytes += bytes;
                    self.wal_backlog.push_front(Backlogged {
                        batch,
                        durable,
                        what,
                        bytes,
                        since,
                    });
                    break;
                }
                Err(TryWriteError::Failed(e)) => self.wal_write_failed(e, durable, what)?,
            }
        }
        let Some(waited) = self.wal_backlog.front().map(|b| b.since.elapsed()) else {
            return Ok(());
        };
        let limit = self.wal.options().wait_timeout;
        if waited > limit {
            return Err(format!(
                "the WAL took no write for {limit:?} (wait_timeout): {} writes wait",
                self.wal_backlog.len()
            ));
        }
        self.hand_over_if_stalled(waited, "took no write");
        Ok(())
    }

    /// A leader whose WAL write has waited `waited` (not taken, or not
    /// durable) hands leadership over past [`WAL_STALL_ELECTIONS`] election
    /// timeouts: its disk stalled, and it cannot commit or answer anything
    /// meanwhile (entries are applied once durable here).
    fn hand_over_if_stalled(&mut self, waited: Duration, what: &str) {
        let limit = self.cfg.tick_interval() * self.cfg.election_ticks_max * WAL_STALL_ELECTIONS;
        if waited > limit {
            self.hand_over_if_leading(&format!(
                "the WAL {what} for {} ms (over {} ms)",
                waited.as_millis(),
                limit.as_millis()
            ));
        }
    }

    /// Hands the whole backlog to the WAL, waiting for it where it must
    /// (installing a snapshot reads the WAL's log right after recording
    /// it: rare, and only a stalled disk makes it wait).
    pub(super) fn flush_wal_backlog(&mut self) -> Result<(), String> {
        while let Some(front) = self.wal_backlog.pop_front() {
            self.wal_backlog_bytes -= front.bytes;
            match self.wal.write(front.batch) {
                Ok(ticket) => self.wait_for(ticket, front.durable)?,
                Err(e) => self.wal_write_failed(e, front.durable, front.what)?,
            }
        }
        Ok(())
    }

    /// Keeps `ticket` until the WAL says durable; its waker wakes the loop.
    pub(super) fn wait_for(&mut self, mut ticket: Ticket, durable: Durable) -> Result<(), String> {
        if self.tickets.len() >= TICKETS_MAX {
            return Err(format!("{TICKETS_MAX} WAL writes in flight (TICKETS_MAX)"));
        }
        let waker = Waker::from(self.wal_waker.clone());
        // Registers the waker. A ticket durable already (the driver was
        // faster than this thread) registers none: wake the loop now, or
        // it would sleep until the next tick with the ticket unseen.
        if Pin::new(&mut ticket)
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            waker.wake_by_ref();
        }
        self.tickets.push_back((ticket, durable, Instant::now()));
        Ok(())
    }

    /// Takes the tickets that became durable, in order. A WAL failure, or
    /// a write not durable within the WAL's `wait_timeout`, is fatal; a
    /// write dropped for want of space is not.
    pub(super) fn poll_tickets(&mut self) -> Result<(), String> {
        self.wal_waker.pending.store(false, Ordering::Release);
        while let Some((ticket, _, written)) = self.tickets.front() {
            let (state, written) = (ticket.is_durable(), *written);
            match state {
                Ok(true) => {}
                Ok(false) => {
                    let limit = self.wal.options().wait_timeout;
                    let waited = written.elapsed();
                    if waited > limit {
                        return Err(format!(
                            "a WAL write was not durable within {limit:?} (wait_timeout)"
                        ));
                    }
                    self.hand_over_if_stalled(waited, "made no write durable");
                    break;
                }
                Err(e @ skiff_wal::Error::NoSpace { .. }) => {
                    // Dropped for want of space: owed (see `no_space.rs`).
                    self.enter_no_space(&e.to_string());
                    self.tickets.pop_front();
                    continue;
                }
                Err(e) => return Err(format!("WAL failed: {e}")),
            }
            let (_, durable, _) = self.tickets.pop_front().expect("front exists");
            match durable {
                Durable::Persisted(id) => self.on_persisted(id),
                Durable::SnapshotRecorded { upto } => self.on_snapshot_recorded(upto),
                Durable::Owed => {}
            }
        }
        Ok(())
    }
}

/// What a WAL ticket's durability means to the loop.
pub(super) enum Durable {
    /// Persist `id` of the Raft core.
    Persisted(PersistId),
    /// The snapshot record through `upto`: compact the WAL.
    SnapshotRecorded { upto: Index },
    /// Nothing: written while or before the WAL ran out of space, what it
    /// stood for is owed (see `no_space.rs`).
    Owed,
}

/// The waker of the loop's WAL tickets: the WAL driver calls it when
/// writes become durable (or the WAL fails). It queues one `WalProgress`
/// until the loop's next pass; the loop looks at its tickets on every pass
/// anyway, so a full input queue loses nothing.
pub(super) struct WalWaker<S: StateMachine> {
    pub(super) pending: AtomicBool,
    pub(super) inputs: QueueSender<Input<S>>,
}

impl<S: StateMachine> Wake for WalWaker<S> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.inputs.try_send(Input::WalProgress);
        }
    }
}
