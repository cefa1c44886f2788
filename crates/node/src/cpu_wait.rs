//! How long a thread waited for a CPU: runnable, on a run queue, not
//! running (Linux's `/proc/thread-self/schedstat`, second field).
//!
//! The event loop reads it to tell a pass that its own work made long
//! (work, or a wait on I/O or a lock: both the loop's doing) from one the
//! scheduler made long by running other threads: on a machine with fewer
//! CPUs than busy threads a pass can sit runnable for tens of
//! milliseconds. Both delay heartbeats; only the first is the loop's to
//! fix, the second is the machine's (see `skiff_loop_passes_over_heartbeat_*`
//! in the metrics).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// The calling thread's run-queue wait clock (None where the kernel does
/// not keep one: not Linux, or no schedstats).
pub struct CpuWait {
    file: Option<File>,
}

/// The most bytes of a schedstat line (three decimal u64s).
const LINE_MAX: usize = 96;

impl CpuWait {
    /// The clock of the calling thread: the file stays bound to it.
    pub fn for_this_thread() -> CpuWait {
        let file = File::open("/proc/thread-self/schedstat").ok();
        let w = CpuWait { file };
        match w.waited() {
            Some(_) => w,
            None => CpuWait { file: None },
        }
    }

    /// Total time the thread has waited for a CPU since it started.
    pub fn waited(&self) -> Option<Duration> {
        let file = self.file.as_ref()?;
        let mut buf = [0u8; LINE_MAX];
        let n = file.read_at(&mut buf, 0).ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let ns: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(Duration::from_nanos(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// The first CPU this thread may run on.
    fn allowed_cpu() -> Option<usize> {
        // SAFETY: sched_getaffinity fills the set it is given.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set))
        }
    }

    fn pin_to_cpu(cpu: usize) -> bool {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays in it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    fn spin(d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    /// Two busy threads on one CPU: each waits about half the time.
    #[test]
    fn a_thread_sharing_its_cpu_waits_and_an_idle_one_does_not() {
        let w = CpuWait::for_this_thread();
        let Some(start) = w.waited() else {
            eprintln!("skipped: this kernel keeps no schedstat");
            return;
        };
        let Some(cpu) = allowed_cpu().filter(|&c| pin_to_cpu(c)) else {
            eprintln!("skipped: cannot pin this thread to a CPU");
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let rival = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to_cpu(cpu);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let began = Instant::now();
        spin(Duration::from_millis(400));
        let wall = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        rival.join().unwrap();
        let waited = w.waited().unwrap() - start;
        // Fair share: about half of the wall time; well above a tenth even
        // on a busy machine.
        assert!(
            waited > wall / 10,
            "waited {waited:?} of {wall:?} sharing a CPU with a busy thread"
        );
        // A thread's clock is its own: one that only sleeps barely waits.
        let sleeper = std::thread::spawn(|| {
            let w = CpuWait::for_this_thread();
            let start = w.waited().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            w.waited().unwrap() - start
        })
        .join()
        .unwrap();
        assert!(
            sleeper < Duration::from_millis(100),
            "a sleeping thread waited {sleeper:?}"
        );
    }
}
