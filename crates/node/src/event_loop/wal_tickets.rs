//! The loop's WAL tickets: each WAL write waits in the loop, in order,
//! until the WAL says durable; the WAL driver wakes the loop through the
//! tickets' waker, with no thread in between.

use super::*;

impl<S: StateMachine> EventLoop<S> {
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
                    if written.elapsed() > limit {
                        return Err(format!(
                            "a WAL write was not durable within {limit:?} (wait_timeout)"
                        ));
                    }
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
