//! The io_uring backend's logic, apart from the ring itself: what to write
//! and sync on the driver thread, what to queue on the ring, which
//! completion belongs to which group, when a group is finished, and how the
//! driver sleeps in the ring and is woken.
//!
//! [`RingBackend`] is that logic over a [`Ring`]: the kernel's (in
//! `uring.rs`, the only `unsafe` of the path) in production, a simulated one
//! that completes fdatasyncs in a seeded, permuted order (`sim_ring.rs`) in
//! the crash-state and fault tests. Both run this same code: a decision made
//! here is tested; only the glue that pushes entries and reads completions is
//! not (the real-file tests run it). This module must never do I/O itself
//! other than through the [`StorageFile`](crate::storage::StorageFile) seam
//! and the ring.
//!
//! Each group is written with `pwritev` on the driver thread, then its
//! fdatasync is queued on the ring, with up to `groups_inflight_max`
//! fdatasyncs in flight — the next group's write runs while the previous
//! group's fdatasync waits for the device.
//!
//! Why not a write SQE linked to the fdatasync: on ext4 a buffered write on
//! io_uring is punted to a kernel worker thread, which costs a thread hop
//! per group; measured with wal-bench on this project's 2-core machine, the
//! inline write gave 1.17-1.20M entries/s against 0.82-0.83M for the linked
//! pair. The fdatasync is still ordered after the write (it is queued once
//! the write completed).
//!
//! A group with nothing to overlap (nothing else in flight or queued when
//! it is submitted) is synced on the driver thread instead: on the ring its
//! fdatasync would go to a kernel worker, a wakeup there and one back. At
//! one write in flight that hop was a third of the driver's context
//! switches (skiff bench 1x1: 690-740 µs of CPU per write against 850-920
//! before, together with the idle sleep below); under load, wal-bench and
//! engine-bench measured no loss (groups simply grow while one syncs).
//!
//! Idle, the driver sleeps in the ring on the doorbell, not in its queue's
//! receive, which spins and yields before it parks. The doorbell is a read
//! kept pending on the ring while the driver sleeps there, so that a writer
//! queueing a write wakes it without a timeout.

use crate::error::OP_FDATASYNC;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::driver::{Done, Failure, Group, IoBackend, OP_WRITE};

/// What [`RingBackend`] needs of a ring: queue fdatasyncs, hand them over,
/// wait, read completions, and keep the doorbell's read pending.
///
/// Completions carry the tag they were queued with and the result: 0 or
/// more on success, `-errno` on failure (the kernel's convention). The
/// doorbell's own completion is the ring's business: it wakes a wait and is
/// never reported.
pub(crate) trait Ring: Send {
    /// What writers signal to complete the doorbell's read.
    fn bell(&self) -> Arc<dyn Bell>;
    /// Queues (does not yet hand over) an fdatasync of `group.file`,
    /// issued after the group's write completed, completing with `tag`.
    fn push_fsync(&mut self, group: &Group, tag: u64) -> io::Result<()>;
    /// Hands what is queued to the kernel without waiting.
    fn submit(&mut self) -> io::Result<()>;
    /// Hands what is queued over and waits until at least one completion
    /// (the doorbell's included) is ready.
    fn submit_and_wait(&mut self) -> io::Result<()>;
    /// Queues a read of the doorbell unless one is pending already.
    fn arm_doorbell(&mut self) -> io::Result<()>;
    /// Moves the fdatasync completions ready now into `out`.
    fn reap_into(&mut self, out: &mut Vec<(u64, i32)>);
}

/// How a writer wakes a driver asleep in its ring.
pub(crate) trait Bell: Send + Sync + std::fmt::Debug {
    fn signal(&self);
}

/// Wakes the driver while it sleeps in the ring.
#[derive(Debug)]
pub(crate) struct Doorbell {
    bell: Arc<dyn Bell>,
    /// Set by the driver just before it sleeps in the ring; taken by the
    /// first writer to queue after that, which signals the bell.
    sleeping: AtomicBool,
}

impl Doorbell {
    fn new(bell: Arc<dyn Bell>) -> Doorbell {
        Doorbell {
            bell,
            sleeping: AtomicBool::new(false),
        }
    }

    /// Called by writers after queueing: rings only if the driver sleeps.
    pub fn ring(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.bell.signal();
        }
    }
}

/// A group whose write completed and whose fdatasync is on the ring.
#[derive(Debug)]
struct InFlight {
    group: Group,
    write_done: Instant,
}

/// The io_uring backend over any [`Ring`].
pub(crate) struct RingBackend<R: Ring> {
    ring: R,
    /// Groups whose fdatasync is on the ring, by id (their tag).
    slab: HashMap<u64, InFlight>,
    doorbell: Arc<Doorbell>,
    /// Groups synced on the driver thread (`submit` with `alone`), reported
    /// by the next `reap`.
    done_inline: Vec<Done>,
    /// Completions read in one `reap`, kept for its allocation.
    cqes: Vec<(u64, i32)>,
}

impl<R: Ring> std::fmt::Debug for RingBackend<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBackend")
            .field("inflight", &self.slab.len())
            .field("done_inline", &self.done_inline.len())
            .finish()
    }
}

impl<R: Ring> RingBackend<R> {
    pub fn new(ring: R) -> RingBackend<R> {
        let doorbell = Arc::new(Doorbell::new(ring.bell()));
        RingBackend {
            ring,
            slab: HashMap::new(),
            doorbell,
            done_inline: Vec::new(),
            cqes: Vec::new(),
        }
    }

    /// Blocks in the ring until a completion arrives or, once `has_work`
    /// may have turned true, a writer rings the doorbell.
    fn sleep(&mut self, has_work: &dyn Fn() -> bool) -> Result<(), Failure> {
        self.ring
            .arm_doorbell()
            .map_err(ring_failure("arm doorbell"))?;
        self.doorbell.sleeping.store(true, Ordering::SeqCst);
        // A writer may have queued between our last look and `sleeping`:
        // it saw the flag clear and did not ring.
        if has_work() {
            self.doorbell.sleeping.store(false, Ordering::SeqCst);
            return self.ring.submit().map_err(ring_failure("io_uring submit"));
        }
        let waited = self.ring.submit_and_wait();
        self.doorbell.sleeping.store(false, Ordering::SeqCst);
        waited.map_err(ring_failure("io_uring wait"))
    }
}

fn ring_failure(op: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |error| Failure {
        op,
        path: PathBuf::from("io_uring"),
        error,
    }
}

impl<R: Ring> IoBackend for RingBackend<R> {
    fn doorbell(&self) -> Option<Arc<Doorbell>> {
        Some(self.doorbell.clone())
    }

    fn submit(&mut self, group: Group, alone: bool) -> Result<(), Failure> {
        let id = group.id;
        debug_assert!(!self.slab.contains_key(&id), "group ids are unique");
        // The write is a copy into the page cache: done here it costs no
        // thread hop (io_uring punts buffered writes to a worker); only the
        // fdatasync, the part that waits for the device, goes to the ring,
        // where it overlaps the next group's write. Ordered after the write
        // by construction: the write has completed before it is queued.
        group
            .file
            .write_all_at(&[io::IoSlice::new(&group.buf)], group.offset)
            .map_err(|error| Failure {
                op: OP_WRITE,
                path: group.path.clone(),
                error,
            })?;
        let write_done = Instant::now();
        if alone {
            // Nothing could overlap this fdatasync: run it here. On the ring
            // it would go to a kernel worker thread, a wakeup there and one
            // back, which at low load costs more CPU than the sync itself.
            group.file.sync_data().map_err(|error| Failure {
                op: OP_FDATASYNC,
                path: group.path.clone(),
                error,
            })?;
            self.done_inline.push(Done {
                id,
                write: write_done.saturating_duration_since(group.submitted_at),
                fsync: write_done.elapsed(),
                buf: group.buf,
                inline: true,
            });
            return Ok(());
        }
        let path = group.path.clone();
        let queued = self.ring.push_fsync(&group, id);
        self.slab.insert(id, InFlight { group, write_done });
        queued.map_err(|error| Failure {
            op: "queue fdatasync",
            path: path.clone(),
            error,
        })?;
        self.ring.submit().map_err(|error| Failure {
            op: "io_uring submit",
            path,
            error,
        })
    }

    fn inflight(&self) -> usize {
        self.slab.len() + self.done_inline.len()
    }

    fn reap(
        &mut self,
        wait: bool,
        has_work: &dyn Fn() -> bool,
        out: &mut Vec<Done>,
    ) -> Result<(), Failure> {
        if !self.done_inline.is_empty() {
            // Finished already: nothing to wait for.
            out.append(&mut self.done_inline);
            return Ok(());
        }
        if wait {
            self.sleep(has_work)?;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap_into(&mut cqes);
        let now = Instant::now();
        let mut result = Ok(());
        for (id, res) in cqes.drain(..) {
            // A group is finished when its fdatasync completes: never when
            // its write does, and never by another group's completion.
            let entry = self
                .slab
                .remove(&id)
                .expect("a completion names a group in flight");
            if res < 0 {
                // Fatal: the driver stops and fails the WAL, whatever else
                // completed with it.
                result = Err(Failure {
                    op: OP_FDATASYNC,
                    path: entry.group.path,
                    error: io::Error::from_raw_os_error(-res),
                });
                break;
            }
            out.push(Done {
                id,
                write: entry
                    .write_done
                    .saturating_duration_since(entry.group.submitted_at),
                fsync: now.saturating_duration_since(entry.write_done),
                buf: entry.group.buf,
                inline: false,
            });
        }
        cqes.clear();
        self.cqes = cqes;
        result
    }
}
