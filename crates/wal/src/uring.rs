//! The io_uring backend: each group is written with `pwritev` on the driver
//! thread, then its fdatasync is submitted to the ring, with up to
//! `groups_inflight_max` fdatasyncs in flight — the next group's write runs
//! while the previous group's fdatasync waits for the device.
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
//! receive, which spins and yields before it parks.
//!
//! The ring's `unsafe` lives here: the fdatasync SQE references no memory;
//! the doorbell's read buffer is boxed and kept until its completion. The
//! doorbell is an eventfd read kept pending while the driver sleeps in the
//! ring, so that a writer queueing a write wakes it without a timeout.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::driver::{Done, Failure, Group, IoBackend, OP_WRITE};

const KIND_FSYNC: u64 = 1;
const KIND_DOORBELL: u64 = 2;
/// How long `Drop` waits for the doorbell read to come back.
const DROP_DRAIN: Duration = Duration::from_secs(1);

/// Wakes the driver while it sleeps in the ring.
#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: RawFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Doorbell {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Called by writers after queueing: rings only if the driver sleeps.
    pub fn ring(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.signal();
        }
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) still leaves the read pending to complete.
        let _ = unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.fd) };
    }
}

#[derive(Debug)]
struct InFlight {
    group: Group,
    write_done: Instant,
    fsync_done: Option<Instant>,
}

pub(crate) struct UringBackend {
    ring: IoUring,
    slab: HashMap<u64, InFlight>,
    doorbell: Arc<Doorbell>,
    doorbell_buf: Box<[u8; 8]>,
    doorbell_armed: bool,
    /// Groups synced on the driver thread (`submit` with `alone`), reported
    /// by the next `reap`.
    done_inline: Vec<Done>,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("inflight", &self.slab.len())
            .finish()
    }
}

impl UringBackend {
    /// Sets up a ring for `groups` groups in flight; fails where the kernel
    /// or a seccomp filter forbids io_uring (EPERM, ENOSYS).
    pub fn new(groups: usize) -> io::Result<UringBackend> {
        let entries = (groups * 2 + 2).next_power_of_two() as u32;
        let ring = IoUring::new(entries)?;
        // Creating a ring can succeed where submitting is then forbidden:
        // probe with a no-op round trip.
        let mut backend = UringBackend {
            ring,
            slab: HashMap::new(),
            doorbell: Arc::new(Doorbell::new()?),
            doorbell_buf: Box::new([0; 8]),
            doorbell_armed: false,
            done_inline: Vec::new(),
        };
        backend.probe()?;
        Ok(backend)
    }

    fn probe(&mut self) -> io::Result<()> {
        let nop = opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: a no-op references no memory.
        unsafe { self.push(nop)? };
        self.ring.submit_and_wait(1)?;
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion for probe"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    /// # Safety
    ///
    /// Every buffer the entry points to must stay valid and unmoved until
    /// its completion has been reaped.
    unsafe fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            return Ok(());
        }
        self.ring.submit()?;
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    fn arm_doorbell(&mut self) -> io::Result<()> {
        if self.doorbell_armed {
            return Ok(());
        }
        let read = opcode::Read::new(
            types::Fd(self.doorbell.fd),
            self.doorbell_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(KIND_DOORBELL);
        // SAFETY: `doorbell_buf` is boxed (stable address) and owned by self;
        // `Drop` waits for this read to complete before freeing it.
        unsafe { self.push(read)? };
        self.doorbell_armed = true;
        Ok(())
    }
}

fn uring_error(path: PathBuf, op: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |error| Failure { op, path, error }
}

impl IoBackend for UringBackend {
    fn doorbell(&self) -> Option<Arc<Doorbell>> {
        Some(self.doorbell.clone())
    }

    fn submit(&mut self, group: Group, alone: bool) -> Result<(), Failure> {
        let fd = group
            .file
            .raw_fd()
            .expect("the io_uring backend runs only on storage with descriptors");
        let id = group.id;
        let path = group.path.clone();
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
                path: path.clone(),
                error,
            })?;
        if alone {
            // Nothing could overlap this fdatasync: run it here. On the ring
            // it would go to a kernel worker thread, a wakeup there and one
            // back, which at low load costs more CPU than the sync itself.
            let write_done = Instant::now();
            group.file.sync_data().map_err(|error| Failure {
                op: "fdatasync",
                path: path.clone(),
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
        let fsync = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(id << 2 | KIND_FSYNC);
        self.slab.insert(
            id,
            InFlight {
                group,
                write_done: Instant::now(),
                fsync_done: None,
            },
        );
        // SAFETY: the fsync references no memory.
        unsafe {
            self.push(fsync)
                .map_err(uring_error(path.clone(), "queue fdatasync"))?;
        }
        self.ring
            .submit()
            .map_err(uring_error(path, "io_uring submit"))?;
        Ok(())
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
        let ring_fail = |op| {
            move |error| Failure {
                op,
                path: PathBuf::from("io_uring"),
                error,
            }
        };
        if !self.done_inline.is_empty() {
            // Finished already: nothing to wait for.
            out.append(&mut self.done_inline);
            return Ok(());
        }
        if wait {
            self.arm_doorbell().map_err(ring_fail("arm doorbell"))?;
            self.doorbell.sleeping.store(true, Ordering::SeqCst);
            // A writer may have queued between our last look and `sleeping`.
            if has_work() {
                self.doorbell.sleeping.store(false, Ordering::SeqCst);
                self.ring.submit().map_err(ring_fail("io_uring submit"))?;
            } else {
                loop {
                    match self.ring.submit_and_wait(1) {
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) => return Err(ring_fail("io_uring wait")(e)),
                    }
                }
                self.doorbell.sleeping.store(false, Ordering::SeqCst);
            }
        }
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let now = Instant::now();
        for (data, res) in cqes {
            if data == KIND_DOORBELL {
                self.doorbell_armed = false;
                continue;
            }
            let id = data >> 2;
            let entry = self
                .slab
                .get_mut(&id)
                .expect("a completion names a group in flight");
            match data & 3 {
                KIND_FSYNC => {
                    if res < 0 {
                        return Err(Failure {
                            op: "fdatasync",
                            path: entry.group.path.clone(),
                            error: io::Error::from_raw_os_error(-res),
                        });
                    }
                    entry.fsync_done = Some(now);
                }
                other => unreachable!("unknown completion kind {other}"),
            }
            if entry.fsync_done.is_some() {
                let entry = self.slab.remove(&id).expect("present");
                let write_done = entry.write_done;
                out.push(Done {
                    id,
                    write: write_done.saturating_duration_since(entry.group.submitted_at),
                    fsync: entry
                        .fsync_done
                        .expect("checked")
                        .saturating_duration_since(write_done),
                    buf: entry.group.buf,
                    inline: false,
                });
            }
        }
        Ok(())
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Buffers of in-flight requests must outlive them: wait for every
        // completion (groups and the doorbell read) before freeing.
        let deadline = Instant::now() + DROP_DRAIN;
        if self.doorbell_armed {
            self.doorbell.signal();
        }
        while (self.doorbell_armed || !self.slab.is_empty()) && Instant::now() < deadline {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let cqes: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for data in cqes {
                if data == KIND_DOORBELL {
                    self.doorbell_armed = false;
                } else if data & 3 == KIND_FSYNC {
                    self.slab.remove(&(data >> 2));
                }
            }
        }
        if self.doorbell_armed || !self.slab.is_empty() {
            // Never free memory the kernel may still write to.
            std::mem::forget(std::mem::take(&mut self.slab));
            std::mem::forget(std::mem::replace(&mut self.doorbell_buf, Box::new([0; 8])));
        }
    }
}
