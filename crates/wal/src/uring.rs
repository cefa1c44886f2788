//! The kernel's io_uring under [`RingBackend`]: building fdatasync and
//! doorbell-read entries, submitting, waiting, reading completions. Every
//! decision about groups lives in `ring.rs`, where the simulated ring runs
//! it too; this file is only the glue, and holds the path's `unsafe`.
//!
//! The fdatasync entry references no memory. The doorbell is an eventfd
//! whose read is kept pending while the driver sleeps in the ring; its
//! 8-byte buffer is boxed and kept until that read's completion (`Drop`
//! waits for it, or leaks the buffer).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::driver::Group;
use crate::ring::{Bell, Ring, RingBackend};

const KIND_FSYNC: u64 = 1;
const KIND_DOORBELL: u64 = 2;
/// `user_data` of the probe at set-up.
const PROBE: u64 = u64::MAX;
/// How long `Drop` waits for outstanding completions.
const DROP_DRAIN: Duration = Duration::from_secs(1);

/// The production backend: the io_uring logic over the kernel's ring, for
/// `groups` groups in flight. Fails where the kernel or a seccomp filter
/// forbids io_uring (EPERM, ENOSYS).
pub(crate) fn backend(groups: usize) -> io::Result<RingBackend<UringRing>> {
    Ok(RingBackend::new(UringRing::new(groups)?))
}

/// An eventfd: signalled by writers, read by the ring.
#[derive(Debug)]
struct EventFd(RawFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }
}

impl Bell for EventFd {
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) still leaves the read pending to complete.
        let _ = unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

pub(crate) struct UringRing {
    ring: IoUring,
    eventfd: Arc<EventFd>,
    doorbell_buf: Box<[u8; 8]>,
    doorbell_armed: bool,
    /// fdatasyncs pushed whose completion was not read yet.
    fsyncs_pending: usize,
}

impl UringRing {
    fn new(groups: usize) -> io::Result<UringRing> {
        let entries = (groups * 2 + 2).next_power_of_two() as u32;
        let mut ring = UringRing {
            ring: IoUring::new(entries)?,
            eventfd: Arc::new(EventFd::new()?),
            doorbell_buf: Box::new([0; 8]),
            doorbell_armed: false,
            fsyncs_pending: 0,
        };
        // Creating a ring can succeed where submitting is then forbidden:
        // probe with a no-op round trip.
        ring.probe()?;
        Ok(ring)
    }

    fn probe(&mut self) -> io::Result<()> {
        let nop = opcode::Nop::new().build().user_data(PROBE);
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
}

impl Ring for UringRing {
    fn bell(&self) -> Arc<dyn Bell> {
        self.eventfd.clone()
    }

    fn push_fsync(&mut self, group: &Group, tag: u64) -> io::Result<()> {
        let fd = group
            .file
            .raw_fd()
            .expect("the io_uring backend runs only on storage with descriptors");
        let fsync = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(tag << 2 | KIND_FSYNC);
        // SAFETY: the fsync references no memory.
        unsafe { self.push(fsync)? };
        self.fsyncs_pending += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn arm_doorbell(&mut self) -> io::Result<()> {
        if self.doorbell_armed {
            return Ok(());
        }
        let read = opcode::Read::new(types::Fd(self.eventfd.0), self.doorbell_buf.as_mut_ptr(), 8)
            .build()
            .user_data(KIND_DOORBELL);
        // SAFETY: `doorbell_buf` is boxed (stable address) and owned by self;
        // `Drop` waits for this read to complete before freeing it.
        unsafe { self.push(read)? };
        self.doorbell_armed = true;
        Ok(())
    }

    fn reap_into(&mut self, out: &mut Vec<(u64, i32)>) {
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            match data & 3 {
                KIND_DOORBELL => self.doorbell_armed = false,
                KIND_FSYNC => {
                    self.fsyncs_pending -= 1;
                    out.push((data >> 2, cqe.result()));
                }
                other => unreachable!("unknown completion kind {other}"),
            }
        }
    }
}

impl Drop for UringRing {
    fn drop(&mut self) {
        // Buffers of in-flight requests must outlive them: wait for every
        // completion (the doorbell read, and fdatasyncs of a driver that
        // stopped on a failure) before freeing.
        let deadline = Instant::now() + DROP_DRAIN;
        if self.doorbell_armed {
            self.eventfd.signal();
        }
        let mut sink = Vec::new();
        while (self.doorbell_armed || self.fsyncs_pending > 0) && Instant::now() < deadline {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap_into(&mut sink);
            sink.clear();
        }
        if self.doorbell_armed {
            // Never free memory the kernel may still write to.
            std::mem::forget(std::mem::replace(&mut self.doorbell_buf, Box::new([0; 8])));
        }
    }
}
