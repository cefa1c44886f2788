//! A simulated io_uring on the simulated disk, so that the io_uring
//! backend's logic (`ring.rs`, the same code production runs over the
//! kernel's ring) goes through the crash-state and fault tests.
//!
//! [`open`] opens a WAL on a [`SimStorage`] whose driver runs
//! `RingBackend` over this ring. Writes and the fdatasyncs of lone groups
//! go through the storage seam as on the real ring; the fdatasyncs queued
//! on the ring complete here, in an order drawn from a seeded RNG: each time
//! the driver looks, any of those in flight may complete, later ones before
//! earlier ones, several at once or none (at least one when it waits).
//! [`SimRing::hold`] keeps them all in flight until
//! [`SimRing::release`], so that a test can pile up groups.
//!
//! What an fdatasync on the ring makes durable, modelled no more kindly
//! than Linux:
//!
//! - only the writes to its file that had completed when it was queued
//!   ([`SimStorage`]'s `sync_point`), not those made while it was in flight;
//! - only once every fdatasync in flight when it completed has completed
//!   too, each with success. Linux hands a writeback error to the first
//!   fdatasync on the file description to check after it (errseq), so a
//!   success can hide an error of its own pages that another, still in
//!   flight, will report; until those have answered, the success is only a
//!   promise (logged as [`Op::SyncData`](crate::sim::Op::SyncData) when
//!   kept, never when one of them fails);
//! - nothing at all once one has failed: the error could be of any page
//!   written before, and Linux marks pages whose writeback failed clean, so
//!   a later success does not bring them back (the WAL never syncs again
//!   after a failure anyway).
//!
//! A failure injected with `fail_next_sync*` goes to whichever fdatasync
//! completes first, in the permuted order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::driver::Group;
use crate::options::{Backend, Options};
use crate::ring::{Bell, Ring, RingBackend};
use crate::sim::{Rng, SimStorage};
use crate::Wal;

/// How often a wait with nothing to complete looks again (a release is not
/// signalled).
const WAIT_TICK: Duration = Duration::from_millis(1);

/// The test's handle on the simulated rings of the WALs opened with it:
/// the seed of their completion order, holding completions back, counts.
/// Clones share them.
#[derive(Debug, Clone)]
pub struct SimRing {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct Shared {
    seed: u64,
    /// Rings made so far: each draws from its own stream of the seed.
    rings: u64,
    held: bool,
    stats: RingStats,
}

/// What the simulated rings did, summed over every WAL opened with one
/// [`SimRing`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// fdatasyncs queued on a ring (a lone group's runs on the driver
    /// thread instead, through the storage seam).
    pub fsyncs: u64,
    /// Of those, completed while one queued before it was still in flight.
    pub out_of_order: u64,
    /// Completed with success while others were in flight, so durable only
    /// once those completed too.
    pub deferred: u64,
    /// Completed with an injected failure.
    pub failed: u64,
    /// Most fdatasyncs in flight at once.
    pub inflight_max: usize,
}

impl SimRing {
    pub fn new(seed: u64) -> SimRing {
        SimRing {
            shared: Arc::new(Mutex::new(Shared {
                seed,
                rings: 0,
                held: false,
                stats: RingStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes nothing on the ring until [`release`](Self::release), the
    /// doorbell's read included: a driver asleep in the ring stays asleep
    /// (as one the scheduler is slow to run does) while writes queue up,
    /// and one waiting for a completion waits. Never hold while waiting for
    /// a ticket.
    pub fn hold(&self) {
        self.lock().held = true;
    }

    pub fn release(&self) {
        self.lock().held = false;
    }

    pub fn stats(&self) -> RingStats {
        self.lock().stats
    }

    pub fn seed(&self) -> u64 {
        self.lock().seed
    }
}

/// Opens (or creates) the WAL in `dir` on `sim`, with the io_uring
/// backend's logic over a simulated ring that `ring` seeds and controls.
/// `opts.backend` is not looked at; [`Wal::backend`] says `IoUring`.
pub fn open(
    dir: impl AsRef<Path>,
    opts: Options,
    sim: &SimStorage,
    ring: &SimRing,
) -> crate::Result<Wal> {
    let io = RingBackend::new(SimRingIo::new(sim.clone(), ring.clone()));
    Wal::open_with_backend(
        dir.as_ref(),
        opts,
        Arc::new(sim.clone()),
        Some((Box::new(io), Backend::IoUring)),
    )
}

/// The doorbell: a flag and a condition variable.
#[derive(Debug, Default)]
struct SimBell {
    rang: Mutex<bool>,
    cond: Condvar,
}

impl Bell for SimBell {
    fn signal(&self) {
        *self.rang.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cond.notify_all();
    }
}

/// An fdatasync on the ring.
#[derive(Debug)]
struct Fsync {
    tag: u64,
    ino: u64,
    /// Writes to `ino` it covers.
    point: u64,
    path: PathBuf,
}

/// A successful fdatasync not yet durable: waits for `blockers`, the tags
/// of the fdatasyncs in flight when it completed.
#[derive(Debug)]
struct Deferred {
    ino: u64,
    point: u64,
    blockers: Vec<u64>,
}

/// One WAL's simulated ring.
struct SimRingIo {
    sim: SimStorage,
    control: SimRing,
    rng: Rng,
    bell: Arc<SimBell>,
    doorbell_armed: bool,
    /// Pushed, not yet submitted.
    queued: Vec<Fsync>,
    /// Submitted, not completed; in the order they were queued.
    inflight: Vec<Fsync>,
    /// Completed, not yet reaped: (tag, result).
    completed: Vec<(u64, i32)>,
    deferred: Vec<Deferred>,
    /// An fdatasync failed: no success is kept any more.
    failed: bool,
}

impl SimRingIo {
    fn new(sim: SimStorage, control: SimRing) -> SimRingIo {
        let seed = {
            let mut shared = control.lock();
            shared.rings += 1;
            shared.seed ^ shared.rings.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        };
        SimRingIo {
            sim,
            control,
            rng: Rng::new(seed),
            bell: Arc::default(),
            doorbell_armed: false,
            queued: Vec::new(),
            inflight: Vec::new(),
            completed: Vec::new(),
            deferred: Vec::new(),
            failed: false,
        }
    }

    fn held(&self) -> bool {
        self.control.lock().held
    }

    /// Completes a random subset of what is in flight, in random order; at
    /// least one with `at_least_one` (and something in flight). Returns
    /// whether anything completed.
    fn progress(&mut self, at_least_one: bool) -> bool {
        if self.inflight.is_empty() || self.held() {
            return false;
        }
        // Each completes with probability 1/2 in a wait, 1/4 otherwise:
        // groups stay in flight while the driver has other work.
        let mut tags: Vec<u64> = self
            .inflight
            .iter()
            .map(|f| f.tag)
            .filter(|_| self.rng.coin() && (at_least_one || self.rng.coin()))
            .collect();
        if tags.is_empty() && at_least_one {
            tags.push(self.inflight[self.rng.below(self.inflight.len())].tag);
        }
        // Fisher-Yates: the order they complete in.
        for i in (1..tags.len()).rev() {
            tags.swap(i, self.rng.below(i + 1));
        }
        for &tag in &tags {
            self.complete(tag);
        }
        !tags.is_empty()
    }

    fn complete(&mut self, tag: u64) {
        let at = self
            .inflight
            .iter()
            .position(|f| f.tag == tag)
            .expect("completes an fdatasync in flight");
        let fsync = self.inflight.remove(at);
        let mut shared = self.control.lock();
        // `inflight` is in the order queued: any before `at` was queued
        // before this one.
        shared.stats.out_of_order += u64::from(at > 0);
        if let Some(error) = self.sim.take_sync_failure(fsync.ino, &fsync.path) {
            shared.stats.failed += 1;
            let errno = error
                .raw_os_error()
                .expect("injected failures have an errno");
            self.completed.push((tag, -errno));
            // Its error may be of pages any success not yet kept covered.
            self.deferred.clear();
            self.failed = true;
            return;
        }
        self.completed.push((tag, 0));
        if self.failed {
            return;
        }
        for d in &mut self.deferred {
            d.blockers.retain(|&b| b != tag);
        }
        let blockers: Vec<u64> = self.inflight.iter().map(|f| f.tag).collect();
        shared.stats.deferred += u64::from(!blockers.is_empty());
        drop(shared);
        self.deferred.push(Deferred {
            ino: fsync.ino,
            point: fsync.point,
            blockers,
        });
        let (ready, waiting) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition::<Vec<_>, _>(|d| d.blockers.is_empty());
        self.deferred = waiting;
        for d in ready {
            self.sim.sync_through(d.ino, d.point);
        }
    }

    /// Takes a ring of the doorbell, if one is pending for its read.
    fn take_doorbell(&mut self) -> bool {
        if !self.doorbell_armed || self.held() {
            return false;
        }
        let mut rang = self
            .bell
            .rang
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !*rang {
            return false;
        }
        *rang = false;
        self.doorbell_armed = false;
        true
    }
}

impl Ring for SimRingIo {
    fn bell(&self) -> Arc<dyn Bell> {
        self.bell.clone()
    }

    fn push_fsync(&mut self, group: &Group, tag: u64) -> std::io::Result<()> {
        let (ino, point) = self.sim.sync_point(&group.path)?;
        self.queued.push(Fsync {
            tag,
            ino,
            point,
            path: group.path.clone(),
        });
        self.control.lock().stats.fsyncs += 1;
        Ok(())
    }

    fn submit(&mut self) -> std::io::Result<()> {
        self.inflight.append(&mut self.queued);
        let mut shared = self.control.lock();
        shared.stats.inflight_max = shared.stats.inflight_max.max(self.inflight.len());
        Ok(())
    }

    fn submit_and_wait(&mut self) -> std::io::Result<()> {
        self.submit()?;
        loop {
            // The doorbell's read may complete first, fdatasyncs or not.
            if self.rng.coin() && self.take_doorbell() {
                return Ok(());
            }
            if self.progress(true) || self.take_doorbell() {
                return Ok(());
            }
            let rang = self
                .bell
                .rang
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !*rang {
                drop(self.bell.cond.wait_timeout(rang, WAIT_TICK));
            }
        }
    }

    fn arm_doorbell(&mut self) -> std::io::Result<()> {
        self.doorbell_armed = true;
        Ok(())
    }

    fn reap_into(&mut self, out: &mut Vec<(u64, i32)>) {
        self.progress(false);
        out.append(&mut self.completed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::time::Instant;

    use super::*;
    use crate::storage::{Storage, StorageFile};

    fn path() -> PathBuf {
        PathBuf::from("/wal/a")
    }

    /// A disk with `/wal/a`, and a ring on it.
    fn ring(seed: u64) -> (SimStorage, Arc<dyn StorageFile>, SimRingIo) {
        let disk = SimStorage::new();
        disk.create_dir_all(Path::new("/wal")).unwrap();
        let file = disk.create(&path()).unwrap();
        disk.sync_dir(Path::new("/wal")).unwrap();
        let ring = SimRingIo::new(disk.clone(), SimRing::new(seed));
        (disk, file, ring)
    }

    /// Writes `data` at `offset`, then queues the group's fdatasync.
    fn write_and_queue(ring: &mut SimRingIo, file: &Arc<dyn StorageFile>, tag: u64, data: &[u8]) {
        let offset = file.len().unwrap();
        file.write_all_at(&[IoSlice::new(data)], offset).unwrap();
        let group = Group {
            id: tag,
            file: file.clone(),
            path: path(),
            offset,
            buf: data.to_vec(),
            submitted_at: Instant::now(),
        };
        ring.push_fsync(&group, tag).unwrap();
    }

    fn durable(disk: &SimStorage) -> Vec<u8> {
        let states = disk.crash_states(disk.op_count(), 0);
        let dropped = states.iter().find(|s| s.kind == "dropped").unwrap();
        dropped.storage.read_file(&path()).unwrap()
    }

    #[test]
    fn a_success_is_kept_once_every_fsync_in_flight_with_it_succeeded() {
        let (disk, file, mut ring) = ring(1);
        write_and_queue(&mut ring, &file, 0, b"zero");
        write_and_queue(&mut ring, &file, 1, b"+one");
        ring.submit().unwrap();
        ring.complete(1);
        assert_eq!(ring.completed, [(1, 0)]);
        assert_eq!(durable(&disk), b"", "0 may yet report 1's error");
        ring.complete(0);
        assert_eq!(durable(&disk), b"zero+one");
        let stats = ring.control.stats();
        assert_eq!((stats.out_of_order, stats.deferred), (1, 1));
    }

    #[test]
    fn a_failure_voids_the_successes_it_could_have_hidden() {
        let (disk, file, mut ring) = ring(1);
        write_and_queue(&mut ring, &file, 0, b"zero");
        write_and_queue(&mut ring, &file, 1, b"+one");
        write_and_queue(&mut ring, &file, 2, b"+two");
        ring.submit().unwrap();
        ring.complete(0);
        // 0 succeeded while 1 and 2 were in flight: kept once they succeed.
        disk.fail_next_sync(libc::EIO);
        ring.complete(2);
        assert_eq!(ring.completed, [(0, 0), (2, -libc::EIO)]);
        ring.complete(1);
        assert_eq!(ring.completed[2], (1, 0));
        assert_eq!(
            durable(&disk),
            b"",
            "nothing kept: 2's error may be 0's or 1's"
        );
        assert_eq!(ring.control.stats().failed, 1);
    }

    #[test]
    fn the_completion_order_is_the_seeds() {
        let order = |seed| {
            let (_disk, file, mut ring) = ring(seed);
            for tag in 0..6 {
                write_and_queue(&mut ring, &file, tag, b"x");
            }
            ring.submit().unwrap();
            let mut order = Vec::new();
            while order.len() < 6 {
                ring.submit_and_wait().unwrap();
                ring.reap_into(&mut order);
            }
            order.into_iter().map(|(tag, _)| tag).collect::<Vec<u64>>()
        };
        assert_eq!(order(7), order(7));
        let orders: Vec<Vec<u64>> = (0..8).map(order).collect();
        assert!(
            orders.iter().any(|o| !o.is_sorted()),
            "some seed completes out of order: {orders:?}"
        );
    }
}
