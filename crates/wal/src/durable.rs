//! Tickets: how a writer learns that its write is durable.
//!
//! Every queued write gets a sequence number. The driver publishes the
//! highest sequence number whose group's fdatasync completed (in order), and
//! wakes blocking waiters (condvar) and async waiters (wakers). A failure is
//! published once and delivered to every waiter, present and future.
//!
//! A write that runs out of space is *dropped* instead, with every write
//! queued after it: the driver publishes a rejection from its sequence
//! number on (open-ended), the next writer to take the WAL's lock undoes
//! the dropped writes and closes the range at the last of them. A dropped
//! write's ticket says [`Error::NoSpace`] for good, even once later writes
//! (with higher numbers) are durable.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Writes dropped because one of them ran out of space.
#[derive(Debug, Clone)]
struct Rejection {
    /// The write whose group failed.
    lo: u64,
    /// The last write dropped with it; `u64::MAX` until the writers' state
    /// is rolled back (no write is placed in between).
    hi: u64,
    path: PathBuf,
    errno: i32,
}

impl Rejection {
    fn error(&self) -> Error {
        Error::NoSpace {
            path: self.path.clone(),
            first_seq: self.lo,
            source: io::Error::from_raw_os_error(self.errno),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Notify {
    durable_seq: AtomicU64,
    /// The last write the driver wrote whole (its fdatasync may be to
    /// come): writes up to it are never dropped.
    written_seq: AtomicU64,
    /// Oldest first; one per write that ran out of space. Grows by one per
    /// such event (each one also means an operator had to free space).
    rejections: Mutex<Vec<Rejection>>,
    /// The highest write any rejection covers (`u64::MAX` while one is
    /// open), 0 for none: checks skip the lock below it.
    rejected_max: AtomicU64,
    failed_flag: AtomicBool,
    failure: OnceLock<String>,
    wakers: Mutex<Vec<(u64, Waker)>>,
    blocked: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Notify {
    pub(crate) fn new(durable_seq: u64) -> Notify {
        let n = Notify::default();
        n.durable_seq.store(durable_seq, Ordering::Release);
        n
    }

    pub(crate) fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    pub(crate) fn failure(&self) -> Option<Error> {
        if self.failed_flag.load(Ordering::Acquire) {
            let reason = self.failure.get().cloned().unwrap_or_default();
            Some(Error::Failed { reason })
        } else {
            None
        }
    }

    /// Called by the driver, in order, when everything up to `seq` is durable.
    pub(crate) fn advance(&self, seq: u64) {
        let prev = self.durable_seq.swap(seq, Ordering::AcqRel);
        assert!(
            prev <= seq,
            "durable sequence moved back from {prev} to {seq}"
        );
        self.wake(|s| s <= seq);
    }

    /// Called by the driver once a group's write completed whole.
    pub(crate) fn written(&self, seq: u64) {
        self.written_seq.fetch_max(seq, Ordering::AcqRel);
    }

    pub(crate) fn written_seq(&self) -> u64 {
        self.written_seq.load(Ordering::Acquire)
    }

    /// Called by the driver when the group starting with write `lo` ran out
    /// of space and the bytes it may have left are cleared: drops `lo` and
    /// every write after it until the writers roll back.
    pub(crate) fn reject_from(&self, lo: u64, path: PathBuf, errno: i32) {
        {
            let mut r = self.rejections.lock().expect("rejections lock");
            assert!(
                r.last().is_none_or(|last| last.hi < lo),
                "a rejection starts after the last one closed"
            );
            assert!(
                self.written_seq() < lo,
                "a write written whole is never dropped"
            );
            r.push(Rejection {
                lo,
                hi: u64::MAX,
                path,
                errno,
            });
            self.rejected_max.store(u64::MAX, Ordering::Release);
        }
        self.wake(|s| s >= lo);
    }

    /// The first write of a rejection the writers have not rolled back yet.
    pub(crate) fn open_rejection(&self) -> Option<u64> {
        if self.rejected_max.load(Ordering::Acquire) != u64::MAX {
            return None;
        }
        let r = self.rejections.lock().expect("rejections lock");
        r.last().filter(|x| x.hi == u64::MAX).map(|x| x.lo)
    }

    /// Closes the open rejection at `hi`, the last write placed before the
    /// writers rolled back (under their lock: nothing is placed meanwhile).
    pub(crate) fn close_rejection(&self, hi: u64) {
        let mut r = self.rejections.lock().expect("rejections lock");
        let last = r.last_mut().expect("an open rejection");
        assert!(
            last.hi == u64::MAX && last.lo <= hi,
            "close the open rejection"
        );
        last.hi = hi;
        self.rejected_max.store(hi, Ordering::Release);
    }

    /// `Some(NoSpace)` when write `seq` was dropped.
    pub(crate) fn rejected(&self, seq: u64) -> Option<Error> {
        if seq == 0 || seq > self.rejected_max.load(Ordering::Acquire) {
            return None;
        }
        let r = self.rejections.lock().expect("rejections lock");
        r.iter()
            .find(|x| x.lo <= seq && seq <= x.hi)
            .map(Rejection::error)
    }

    /// The last write at or before `seq` that was not dropped (0: none).
    pub(crate) fn kept_at_or_before(&self, mut seq: u64) -> u64 {
        let r = self.rejections.lock().expect("rejections lock");
        for x in r.iter().rev() {
            if x.lo <= seq && seq <= x.hi {
                seq = x.lo - 1;
            }
        }
        seq
    }

    /// Puts the WAL in the failed state; the first reason wins.
    pub(crate) fn fail(&self, reason: String) {
        let _ = self.failure.set(reason);
        self.failed_flag.store(true, Ordering::Release);
        self.wake(|_| true);
    }

    fn wake(&self, ready: impl Fn(u64) -> bool) {
        let woken: Vec<Waker> = {
            let mut wakers = self.wakers.lock().expect("wakers lock");
            let mut woken = Vec::new();
            let mut i = 0;
            while i < wakers.len() {
                if ready(wakers[i].0) {
                    woken.push(wakers.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            woken
        };
        for w in woken {
            w.wake();
        }
        if self.blocked.load(Ordering::Acquire) > 0 {
            // Taking the lock orders this notify after a waiter's check.
            drop(self.lock.lock().expect("notify lock"));
            self.cond.notify_all();
        }
    }

    fn check(&self, seq: u64) -> Option<Result<()>> {
        // Before durability: a dropped write stays dropped when later ones
        // (higher numbers) become durable.
        if let Some(e) = self.rejected(seq) {
            return Some(Err(e));
        }
        if self.durable_seq() >= seq {
            return Some(Ok(()));
        }
        self.failure().map(Err)
    }

    pub(crate) fn wait(&self, seq: u64, timeout: Duration) -> Result<()> {
        if let Some(r) = self.check(seq) {
            return r;
        }
        let deadline = Instant::now() + timeout;
        self.blocked.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.lock.lock().expect("notify lock");
        let result = loop {
            if let Some(r) = self.check(seq) {
                break r;
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Error::Timeout {
                    what: "durability",
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            guard = self
                .cond
                .wait_timeout(guard, deadline - now)
                .expect("notify lock")
                .0;
        };
        drop(guard);
        self.blocked.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn poll_seq(&self, seq: u64, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Some(r) = self.check(seq) {
            return Poll::Ready(r);
        }
        self.wakers
            .lock()
            .expect("wakers lock")
            .push((seq, cx.waker().clone()));
        // The driver may have advanced between the check and the push.
        match self.check(seq) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// Proof that a write was queued; says when it is durable.
///
/// Wait for it with [`Ticket::wait`] (blocking, bounded by the WAL's
/// `wait_timeout`) or `.await` it (no timeout of its own: wrap it in the
/// runtime's timeout).
#[derive(Debug, Clone)]
#[must_use = "a write is not durable until its ticket says so"]
pub struct Ticket {
    seq: u64,
    notify: Arc<Notify>,
    timeout: Duration,
}

impl Ticket {
    pub(crate) fn new(seq: u64, notify: Arc<Notify>, timeout: Duration) -> Ticket {
        Ticket {
            seq,
            notify,
            timeout,
        }
    }

    /// The write's position in the WAL's total order of writes.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// True once durable; an error if the WAL failed first, or
    /// [`Error::NoSpace`] if the write was dropped.
    pub fn is_durable(&self) -> Result<bool> {
        match self.notify.check(self.seq) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// Blocks until durable, the WAL fails, the write is dropped
    /// ([`Error::NoSpace`]), or `wait_timeout` passes.
    pub fn wait(&self) -> Result<()> {
        self.notify.wait(self.seq, self.timeout)
    }

    /// Blocks until durable, the WAL fails, or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.notify.wait(self.seq, timeout)
    }
}

impl Future for Ticket {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.notify.poll_seq(self.seq, cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use super::Notify;
    use crate::Error;

    /// A waker that records whether it was woken.
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn waiter(n: &Notify, seq: u64) -> Arc<Flag> {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let polled = n.poll_seq(seq, &mut Context::from_waker(&waker));
        assert!(polled.is_pending(), "write {seq} is not durable yet");
        flag
    }

    fn woken(f: &Flag) -> bool {
        f.0.load(Ordering::SeqCst)
    }

    fn poll(n: &Notify, seq: u64) -> Poll<crate::Result<()>> {
        let waker = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
        n.poll_seq(seq, &mut Context::from_waker(&waker))
    }

    /// Durability wakes the futures of the writes it covers and keeps the
    /// others waiting (whatever order they registered in).
    #[test]
    fn advance_wakes_exactly_the_futures_it_makes_durable() {
        let n = Notify::new(0);
        let w3 = waiter(&n, 3);
        let w1 = waiter(&n, 1);
        let w2 = waiter(&n, 2);
        n.advance(2);
        assert!(woken(&w1) && woken(&w2));
        assert!(!woken(&w3), "write 3 is not durable");
        assert!(poll(&n, 2).is_ready());
        assert!(poll(&n, 3).is_pending());
        n.advance(3);
        assert!(woken(&w3));
        assert!(matches!(poll(&n, 3), Poll::Ready(Ok(()))));
    }

    /// Dropping writes for want of space wakes the futures of the dropped
    /// writes (with `NoSpace`), not those of the writes before them.
    #[test]
    fn a_rejection_wakes_the_futures_of_the_writes_it_drops() {
        let n = Notify::new(0);
        let w1 = waiter(&n, 1);
        let w2 = waiter(&n, 2);
        let w3 = waiter(&n, 3);
        n.reject_from(2, "segment".into(), libc::ENOSPC);
        assert!(woken(&w2) && woken(&w3), "the dropped writes' futures");
        assert!(!woken(&w1), "write 1 was not dropped");
        for seq in [2, 3] {
            assert!(
                matches!(
                    poll(&n, seq),
                    Poll::Ready(Err(Error::NoSpace { first_seq: 2, .. }))
                ),
                "write {seq}"
            );
        }
        assert!(poll(&n, 1).is_pending());
        n.advance(1);
        assert!(woken(&w1));
    }

    /// The last kept write at or before a sequence number skips every
    /// dropped run it falls into, and only those.
    #[test]
    fn kept_at_or_before_skips_exactly_the_dropped_writes() {
        let n = Notify::new(0);
        n.reject_from(5, "segment".into(), libc::ENOSPC);
        n.close_rejection(7);
        n.reject_from(10, "segment".into(), libc::ENOSPC);
        n.close_rejection(12);
        let kept: Vec<u64> = (1..=14).map(|s| n.kept_at_or_before(s)).collect();
        assert_eq!(kept, [1, 2, 3, 4, 4, 4, 4, 8, 9, 9, 9, 9, 13, 14]);
    }
}
