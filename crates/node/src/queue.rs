//! The event loop's input queue: bounded, multi-producer, single-consumer,
//! and blocking without spinning.
//!
//! [`InputQueue::new`] returns a [`QueueSender`] (cloneable, shared by every
//! producer: API handlers, the transport, the WAL driver) and the one
//! [`QueueReceiver`] that the event loop thread owns.
//!
//! Why not `crossbeam_channel`: its receive path spins and then backs off
//! with `sched_yield` before it parks, which at low load keeps the loop
//! thread busy doing nothing and takes CPU from other processes on small
//! machines. This queue is a `Mutex<VecDeque<T>>` with two `Condvar`s:
//!
//! * the consumer that finds the queue empty blocks on the condvar at once
//!   (a futex wait), and wakes when an item arrives, at its deadline, or when
//!   the queue closes. It never busy-waits or yields in a loop;
//! * a producer that finds the queue full either gets [`TrySendError::Full`]
//!   at once ([`QueueSender::try_send`]) or blocks on the other condvar until
//!   the consumer makes room ([`QueueSender::send_timeout`]). It never spins
//!   either;
//! * [`QueueReceiver::recv_many`] moves everything queued (up to a maximum)
//!   out in one lock acquisition, so a burst of inputs costs one lock, not one
//!   per input.
//!
//! Wakeups are only issued when someone is waiting: a producer signals the
//! consumer only if the consumer is blocked (and only the first such producer
//! does), and the consumer signals producers only if some are blocked on a
//! full queue. The common case (consumer busy, queue not full) makes no
//! system call beyond the uncontended mutex.
//!
//! # Bound
//!
//! The queue holds at most `capacity` items (fixed at construction). A full
//! queue is back-pressure: producers see `Full` or wait.
//!
//! # Closing
//!
//! The queue closes when the receiver calls [`QueueReceiver::close`] or is
//! dropped. Then every send fails with `Closed` (giving the item back),
//! blocked senders wake with `Closed`, and the items still queued are
//! dropped, so that any reply channel inside them is dropped too and its
//! waiter learns that the node stopped.
//!
//! When every [`QueueSender`] has been dropped, the receiver still gets the
//! items queued, then [`Closed`] (like a disconnected channel).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Entry point: builds a bounded queue and returns its two ends.
pub struct InputQueue<T> {
    _items: PhantomData<T>,
}

impl<T> InputQueue<T> {
    /// Creates a queue holding at most `capacity` items, and returns its
    /// sender (clone it for every producer) and its single receiver.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0 (a queue that can hold nothing could never pass an
    /// item).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
        assert!(capacity > 0, "InputQueue capacity must be at least 1");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity),
                closed: false,
                senders: 1,
                consumer_waiting: false,
                senders_waiting: 0,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
        });
        (
            QueueSender {
                shared: Arc::clone(&shared),
            },
            QueueReceiver {
                shared,
                _not_sync: PhantomData,
            },
        )
    }
}

/// What both ends share.
struct Shared<T> {
    state: Mutex<State<T>>,
    /// The consumer waits here for an item (or close, or the last sender
    /// leaving).
    not_empty: Condvar,
    /// Producers wait here for room (or close).
    not_full: Condvar,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Set by the receiver (close or drop); never cleared.
    closed: bool,
    /// Live `QueueSender`s.
    senders: usize,
    /// The consumer is blocked on `not_empty` and nobody has signalled it
    /// yet. The first producer to push clears it and signals; later pushes
    /// before the consumer runs need not.
    consumer_waiting: bool,
    /// Producers blocked on `not_full`.
    senders_waiting: usize,
}

impl<T> Shared<T> {
    /// Locks the state. A panic while holding the lock cannot leave the
    /// state inconsistent (every critical section only pushes, drains or sets
    /// flags), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Waits on `cv` until notified or until `deadline` (`None`: no deadline).
/// May return early (spurious wakeup): callers re-check their condition.
fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, State<T>>,
    deadline: Option<Instant>,
    now: Instant,
) -> MutexGuard<'a, State<T>> {
    match deadline {
        None => cv.wait(guard).unwrap_or_else(PoisonError::into_inner),
        Some(d) => {
            cv.wait_timeout(guard, d.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
    }
}

// ---------------------------------------------------------------- errors

/// Why [`QueueSender::try_send`] failed; holds the item that was not sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The receiver closed the queue (or was dropped).
    Closed(T),
}

impl<T> TrySendError<T> {
    /// The item that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(t) | Self::Closed(t) => t,
        }
    }
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("Full(..)"),
            Self::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("input queue is full"),
            Self::Closed(_) => f.write_str("input queue is closed"),
        }
    }
}

impl<T> std::error::Error for TrySendError<T> {}

/// Why [`QueueSender::send_timeout`] failed; holds the item that was not
/// sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SendTimeoutError<T> {
    /// The queue stayed full for the whole timeout.
    Timeout(T),
    /// The receiver closed the queue (or was dropped).
    Closed(T),
}

impl<T> SendTimeoutError<T> {
    /// The item that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            Self::Timeout(t) | Self::Closed(t) => t,
        }
    }
}

impl<T> fmt::Debug for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(_) => f.write_str("Timeout(..)"),
            Self::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> fmt::Display for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(_) => f.write_str("timed out waiting for room in the input queue"),
            Self::Closed(_) => f.write_str("input queue is closed"),
        }
    }
}

impl<T> std::error::Error for SendTimeoutError<T> {}

/// The queue is closed (by the receiver), or every sender is gone and
/// nothing is left queued: no item will ever arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("input queue is closed")
    }
}

impl std::error::Error for Closed {}

// ---------------------------------------------------------------- sender

/// A producer's end of an [`InputQueue`]. Clone it for each producer; it is
/// `Send + Sync` (for `T: Send`). No method spins: a sender either succeeds,
/// fails at once, or blocks on a condvar.
pub struct QueueSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> QueueSender<T> {
    /// Queues `item` if there is room; never blocks (beyond the queue's
    /// short-held lock).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let st = self.shared.lock();
        if st.closed {
            return Err(TrySendError::Closed(item));
        }
        if st.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        self.push_locked(st, item);
        Ok(())
    }

    /// Queues `item`, blocking while the queue is full for at most
    /// `timeout`. Fails with `Closed` as soon as the queue closes (also while
    /// blocked).
    pub fn send_timeout(&self, item: T, timeout: Duration) -> Result<(), SendTimeoutError<T>> {
        // A timeout too large to represent as an Instant waits forever.
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        loop {
            if st.closed {
                return Err(SendTimeoutError::Closed(item));
            }
            if st.items.len() < self.shared.capacity {
                self.push_locked(st, item);
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(SendTimeoutError::Timeout(item));
            }
            st.senders_waiting += 1;
            st = wait_until(&self.shared.not_full, st, deadline, now);
            st.senders_waiting -= 1;
        }
    }

    /// Whether the receiver has closed the queue (or been dropped): every
    /// send will fail.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Items queued now (a snapshot: it may change at once).
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Whether nothing is queued now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given at construction.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Pushes under the lock (room and open already checked), then signals
    /// the consumer outside the lock if it is blocked and not yet signalled.
    fn push_locked(&self, mut st: MutexGuard<'_, State<T>>, item: T) {
        st.items.push_back(item);
        let wake = std::mem::replace(&mut st.consumer_waiting, false);
        drop(st);
        if wake {
            self.shared.not_empty.notify_one();
        }
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        let wake = st.senders == 0 && std::mem::replace(&mut st.consumer_waiting, false);
        drop(st);
        if wake {
            self.shared.not_empty.notify_one();
        }
    }
}

impl<T> fmt::Debug for QueueSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueSender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------- receiver

/// The consumer's end of an [`InputQueue`]: exactly one exists. It is `Send`
/// but not `Sync` and not `Clone`, so only one thread can ever wait on the
/// queue (the wakeup protocol relies on a single consumer). Dropping it
/// closes the queue.
pub struct QueueReceiver<T> {
    shared: Arc<Shared<T>>,
    /// Makes the receiver `!Sync`: a single consumer.
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl<T> QueueReceiver<T> {
    /// Moves up to `max` queued items into `out` (oldest first) in one lock
    /// acquisition, and returns how many.
    ///
    /// If nothing is queued, blocks on a condvar (no spinning, no yielding)
    /// until an item arrives, returning what is queued then, or until
    /// `deadline` (`None`: no deadline), returning `Ok(0)`. Returns `Ok(0)`
    /// at once if `max` is 0.
    ///
    /// Errors with [`Closed`] when nothing is queued and nothing can arrive:
    /// the queue was closed, or every sender is gone.
    pub fn recv_many(
        &self,
        out: &mut Vec<T>,
        max: usize,
        deadline: Option<Instant>,
    ) -> Result<usize, Closed> {
        if max == 0 {
            return Ok(0);
        }
        let mut st = self.shared.lock();
        loop {
            if !st.items.is_empty() {
                return Ok(self.drain_locked(st, out, max));
            }
            if st.closed || st.senders == 0 {
                return Err(Closed);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(0);
            }
            st.consumer_waiting = true;
            st = wait_until(&self.shared.not_empty, st, deadline, now);
            st.consumer_waiting = false;
        }
    }

    /// Moves up to `max` queued items into `out` (oldest first) without
    /// blocking, and returns how many (0 if none is queued or the queue is
    /// closed).
    pub fn try_recv_many(&self, out: &mut Vec<T>, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let st = self.shared.lock();
        if st.items.is_empty() {
            return 0;
        }
        self.drain_locked(st, out, max)
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given at construction.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Closes the queue: later and blocked sends fail with `Closed`, and the
    /// items still queued are dropped (outside the lock). Idempotent; also
    /// done when the receiver is dropped.
    pub fn close(&self) {
        let mut st = self.shared.lock();
        st.closed = true;
        let dropped = std::mem::take(&mut st.items);
        let wake_senders = st.senders_waiting > 0;
        drop(st);
        if wake_senders {
            self.shared.not_full.notify_all();
        }
        // Items may hold reply channels whose drop wakes other tasks: drop
        // them without holding the lock.
        drop(dropped);
    }

    /// Drains under the lock (the queue is not empty), then wakes blocked
    /// senders outside the lock if room was made for them.
    fn drain_locked(
        &self,
        mut st: MutexGuard<'_, State<T>>,
        out: &mut Vec<T>,
        max: usize,
    ) -> usize {
        let n = st.items.len().min(max);
        out.extend(st.items.drain(..n));
        let wake_senders = st.senders_waiting > 0;
        drop(st);
        if wake_senders {
            self.shared.not_full.notify_all();
        }
        n
    }
}

impl<T> Drop for QueueReceiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<T> fmt::Debug for QueueReceiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueReceiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

    /// Long enough never to expire in a passing test, even on a busy
    /// machine; a failing test errs instead of hanging.
    const GENEROUS: Duration = Duration::from_secs(5);
    /// A short wait that a test lets expire.
    const SHORT: Duration = Duration::from_millis(50);
    /// How long the no-spin test keeps the consumer blocked.
    const IDLE_WAIT: Duration = Duration::from_millis(300);
    /// CPU the consumer may use over `IDLE_WAIT`: a spin/yield loop uses
    /// nearly all of it, a blocked thread next to nothing.
    const IDLE_CPU_MAX: Duration = Duration::from_millis(20);

    /// Counts its drops.
    struct DropCounter(Arc<AtomicUsize>);

    impl Drop for DropCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls (test only) until `f` holds, or panics after `GENEROUS`.
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + GENEROUS;
        while !f() {
            assert!(Instant::now() < until, "timed out waiting for: {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_send_sync<X: Send + Sync>() {}
    fn assert_send<X: Send>() {}

    #[test]
    fn ends_are_send_and_sync_as_documented() {
        assert_send_sync::<QueueSender<Vec<u8>>>();
        assert_send::<QueueReceiver<Vec<u8>>>();
    }

    #[test]
    fn fifo_per_producer_across_many_producers() {
        const PRODUCERS: usize = 4;
        const PER_PRODUCER: usize = 5_000;
        const BATCH_MAX: usize = 32;
        let (tx, rx) = InputQueue::new(64);
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let tx = tx.clone();
                thread::spawn(move || {
                    for i in 0..PER_PRODUCER {
                        tx.send_timeout((p, i), GENEROUS).expect("send");
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0usize; PRODUCERS];
        let mut out = Vec::new();
        loop {
            out.clear();
            match rx.recv_many(&mut out, BATCH_MAX, Some(Instant::now() + GENEROUS)) {
                Ok(n) => {
                    assert!(n > 0, "timed out with producers still running");
                    assert!(n <= BATCH_MAX);
                    assert_eq!(n, out.len());
                    for &(p, i) in &out {
                        assert_eq!(i, next[p], "producer {p} out of order");
                        next[p] += 1;
                    }
                }
                // Every sender gone and the queue drained.
                Err(Closed) => break,
            }
        }
        for h in handles {
            h.join().expect("producer");
        }
        assert_eq!(next, [PER_PRODUCER; PRODUCERS]);
    }

    #[test]
    fn try_send_respects_the_bound() {
        let (tx, rx) = InputQueue::new(3);
        for i in 0..3 {
            tx.try_send(i).expect("room");
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.len(), 3);
        let mut out = Vec::new();
        assert_eq!(rx.try_recv_many(&mut out, 1), 1);
        tx.try_send(3).expect("room after a drain");
        assert_eq!(rx.try_recv_many(&mut out, 10), 3);
        assert_eq!(out, vec![0, 1, 2, 3]);
        assert_eq!(rx.try_recv_many(&mut out, 10), 0);
        assert!(rx.is_empty());
    }

    #[test]
    fn recv_many_takes_at_most_max() {
        let (tx, rx) = InputQueue::new(8);
        for i in 0..5 {
            tx.try_send(i).expect("room");
        }
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 0, None), Ok(0));
        assert_eq!(rx.recv_many(&mut out, 2, None), Ok(2));
        assert_eq!(rx.recv_many(&mut out, 10, None), Ok(3));
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn send_timeout_waits_for_room() {
        let (tx, rx) = InputQueue::new(1);
        tx.try_send(1).expect("room");
        let consumer = thread::spawn(move || {
            thread::sleep(SHORT);
            let mut out = Vec::new();
            // Drain the first item, then receive the second.
            let deadline = Some(Instant::now() + GENEROUS);
            while out.len() < 2 {
                rx.recv_many(&mut out, 10, deadline).expect("open");
            }
            out
        });
        let start = Instant::now();
        tx.send_timeout(2, GENEROUS)
            .expect("room made by the consumer");
        assert!(start.elapsed() < GENEROUS);
        assert_eq!(consumer.join().expect("consumer"), vec![1, 2]);
    }

    #[test]
    fn send_timeout_times_out_when_full() {
        let (tx, rx) = InputQueue::new(1);
        tx.try_send(1).expect("room");
        let start = Instant::now();
        assert_eq!(tx.send_timeout(2, SHORT), Err(SendTimeoutError::Timeout(2)));
        assert!(start.elapsed() >= SHORT);
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn recv_many_returns_zero_at_the_deadline() {
        let (_tx, rx) = InputQueue::<u32>::new(4);
        let mut out = Vec::new();
        let start = Instant::now();
        assert_eq!(rx.recv_many(&mut out, 10, Some(start + SHORT)), Ok(0));
        assert!(start.elapsed() >= SHORT);
        assert!(out.is_empty());
        // A deadline already past does not block.
        assert_eq!(rx.recv_many(&mut out, 10, Some(start)), Ok(0));
    }

    #[test]
    fn recv_many_wakes_promptly_on_push() {
        let (tx, rx) = InputQueue::new(4);
        let producer = thread::spawn(move || {
            thread::sleep(SHORT);
            tx.try_send(7u32).expect("room");
            tx // keep the sender alive until joined
        });
        let mut out = Vec::new();
        let start = Instant::now();
        let n = rx
            .recv_many(&mut out, 10, Some(start + GENEROUS))
            .expect("open");
        let waited = start.elapsed();
        assert_eq!((n, out.as_slice()), (1, &[7][..]));
        assert!(
            waited < GENEROUS / 2,
            "woke after {waited:?}, not at the push"
        );
        drop(producer.join().expect("producer"));
    }

    /// Ping-pong through two queues: each round the consumer is (usually)
    /// blocked when the item arrives, so a lost wakeup shows as a timeout.
    #[test]
    fn no_lost_wakeups_in_ping_pong() {
        const ROUNDS: u32 = 2_000;
        let (ping_tx, ping_rx) = InputQueue::new(1);
        let (pong_tx, pong_rx) = InputQueue::new(1);
        let echo = thread::spawn(move || {
            let mut out = Vec::new();
            loop {
                out.clear();
                match ping_rx.recv_many(&mut out, 1, Some(Instant::now() + GENEROUS)) {
                    Ok(1) => pong_tx.try_send(out[0]).expect("room"),
                    Ok(_) => panic!("echo: lost wakeup"),
                    Err(Closed) => return,
                }
            }
        });
        let mut out = Vec::new();
        for i in 0..ROUNDS {
            ping_tx.try_send(i).expect("room");
            out.clear();
            let n = pong_rx
                .recv_many(&mut out, 1, Some(Instant::now() + GENEROUS))
                .expect("open");
            assert_eq!((n, out[0]), (1, i), "lost wakeup in round {i}");
        }
        drop(ping_tx);
        echo.join().expect("echo");
    }

    #[test]
    fn last_sender_dropped_wakes_a_blocked_consumer() {
        let (tx, rx) = InputQueue::<u32>::new(4);
        let tx2 = tx.clone();
        tx.try_send(1).expect("room");
        drop(tx);
        let dropper = thread::spawn(move || {
            thread::sleep(SHORT);
            drop(tx2);
        });
        let mut out = Vec::new();
        // What was queued still comes out, then Closed (not a timeout).
        assert_eq!(rx.recv_many(&mut out, 10, None), Ok(1));
        let start = Instant::now();
        assert_eq!(
            rx.recv_many(&mut out, 10, Some(start + GENEROUS)),
            Err(Closed)
        );
        assert!(start.elapsed() < GENEROUS / 2);
        dropper.join().expect("dropper");
    }

    #[test]
    fn close_wakes_blocked_senders_and_drops_queued_items() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = InputQueue::new(1);
        tx.try_send(DropCounter(Arc::clone(&drops))).expect("room");
        let blocked = {
            let tx = tx.clone();
            let item = DropCounter(Arc::clone(&drops));
            thread::spawn(move || tx.send_timeout(item, GENEROUS))
        };
        let shared = Arc::clone(&rx.shared);
        eventually("the sender blocks on a full queue", || {
            shared.lock().senders_waiting == 1
        });
        let start = Instant::now();
        rx.close();
        // The queued item is dropped by close.
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        let res = blocked.join().expect("sender");
        assert!(
            start.elapsed() < GENEROUS / 2,
            "close did not wake the sender"
        );
        assert!(matches!(res, Err(SendTimeoutError::Closed(_))));
        // The refused item came back to the sender; dropping it counts.
        drop(res);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
        assert!(tx.is_closed());
        assert!(matches!(
            tx.try_send(DropCounter(Arc::clone(&drops))),
            Err(TrySendError::Closed(_))
        ));
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 10, None), Err(Closed));
        assert_eq!(rx.try_recv_many(&mut out, 10), 0);
    }

    #[test]
    fn dropping_the_receiver_closes() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = InputQueue::new(4);
        for _ in 0..3 {
            tx.try_send(DropCounter(Arc::clone(&drops))).expect("room");
        }
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(drops.load(Ordering::SeqCst), 3);
        let refused = tx.send_timeout(DropCounter(Arc::clone(&drops)), GENEROUS);
        assert!(matches!(refused, Err(SendTimeoutError::Closed(_))));
    }

    /// CPU time (user + system) used so far by the calling thread.
    #[cfg(target_os = "linux")]
    fn thread_cpu_time() -> Duration {
        // SAFETY: an all-zero `rusage` is a valid value of this plain C
        // struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable `rusage`; RUSAGE_THREAD
        // reports on the calling thread.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(rc, 0, "getrusage failed");
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn blocked_consumer_does_not_spin() {
        let (tx, rx) = InputQueue::<u32>::new(4);
        let consumer = thread::spawn(move || {
            let mut out = Vec::new();
            let before = thread_cpu_time();
            let start = Instant::now();
            let res = rx.recv_many(&mut out, 10, Some(start + IDLE_WAIT));
            let waited = start.elapsed();
            (res, waited, thread_cpu_time() - before)
        });
        let (res, waited, cpu) = consumer.join().expect("consumer");
        drop(tx);
        assert_eq!(res, Ok(0));
        assert!(waited >= IDLE_WAIT);
        assert!(
            cpu < IDLE_CPU_MAX,
            "consumer used {cpu:?} of CPU while blocked for {waited:?}"
        );
    }
}
