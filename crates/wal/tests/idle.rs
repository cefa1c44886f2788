//! The WAL driver's idle sleep, alone in its test binary so that its
//! driver thread is the only one in the process.

use std::time::Duration;

use bytes::Bytes;
use skiff_wal::{Backend, Entry, Error, Options, Wal};

/// Nonvoluntary context switches of this process's WAL driver thread(s).
fn driver_yields() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != "skiff-wal-io" {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// An idle driver woken by each of a series of lone writes blocks and
/// wakes; it does not spin or yield its way to sleep (each `sched_yield`
/// that finds another runnable thread counts as a nonvoluntary switch,
/// and on a small machine takes CPU from whoever needed it). The bound is
/// loose: preemption of the driver while it works is possible on a busy
/// machine; a yield loop before each sleep made 321-348 over these 200
/// writes. io_uring only: the `pwritev` fallback sleeps in its queue.
#[test]
fn idle_driver_wakes_without_yielding() {
    let dir = tempfile::tempdir().unwrap();
    let wal = match Wal::open(
        dir.path(),
        Options {
            backend: Backend::IoUring,
            ..Options::default()
        },
    ) {
        Ok(w) => w,
        Err(Error::InvalidOption { reason, .. }) => {
            eprintln!("SKIPPED: io_uring unavailable here: {reason}");
            return;
        }
        Err(e) => panic!("open failed: {e}"),
    };
    // Sequential writes with a pause, so that the driver goes idle before
    // each.
    // Runnable threads, so that a yield finds someone to switch to.
    let busy: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let end = std::time::Instant::now() + Duration::from_millis(1500);
                while std::time::Instant::now() < end {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let Some(before) = driver_yields() else {
        eprintln!("SKIPPED: no /proc/self/task here");
        return;
    };
    let writes = 200u64;
    for i in 1..=writes {
        wal.append(vec![Entry {
            index: i,
            term: 1,
            payload: Bytes::from_static(b"lone write"),
        }])
        .unwrap()
        .wait()
        .unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let yields = driver_yields().unwrap() - before;
    for b in busy {
        b.join().unwrap();
    }
    eprintln!("{yields} nonvoluntary switches of WAL drivers over {writes} lone writes");
    assert!(
        yields < writes / 2,
        "{yields} nonvoluntary switches over {writes} lone writes"
    );
}
