//! Tickets: how a writer learns that its write is durable.
//!
//! Every queued write gets a sequence number. The driver publishes the
//! highest sequence number whose group's fdatasync completed (in order), and
//! wakes blocking waiters (condvar) and async waiters (wakers). A failure is
//! published once and delivered to every waiter, present and future.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub(crate) struct Notify {
    durable_seq: AtomicU64,
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

    /// True once durable; an error if the WAL failed first.
    pub fn is_durable(&self) -> Result<bool> {
        match self.notify.check(self.seq) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// Blocks until durable, the WAL fails, or `wait_timeout` passes.
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
