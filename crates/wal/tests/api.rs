//! The WAL's API on real files, run once per backend. The io_uring run
//! skips, saying why, where the kernel forbids io_uring.

use std::time::Duration;

use bytes::Bytes;
use skiff_wal::{Backend, Entry, Error, HardState, Options, SnapshotMeta, Wal, WriteBatch};

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..hi)
        .map(|i| Entry {
            index: i,
            term,
            payload: Bytes::from(format!("entry-{i}-{}", "x".repeat((i % 37 + 100) as usize))),
        })
        .collect()
}

fn small(backend: Backend) -> Options {
    Options {
        segment_size: 64 << 10,
        snapshot_meta_max: 4096,
        backend,
        ..Options::default()
    }
}

/// Opens a WAL with `backend`, or returns `None` (printing why) when the
/// kernel forbids io_uring.
fn open(dir: &std::path::Path, opts: Options) -> Option<Wal> {
    match Wal::open(dir, opts.clone()) {
        Ok(w) => Some(w),
        Err(Error::InvalidOption {
            field: "backend",
            reason,
        }) if opts.backend == Backend::IoUring => {
            eprintln!("SKIPPED: io_uring unavailable here: {reason}");
            None
        }
        Err(e) => panic!("open failed: {e}"),
    }
}

macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { super::$name(skiff_wal::Backend::IoUring) })*
        }
        mod pwritev {
            $(#[test] fn $name() { super::$name(skiff_wal::Backend::Pwritev) })*
        }
    };
}

per_backend!(
    append_read_reopen,
    truncate_and_hard_state_survive_reopen,
    snapshot_compaction_deletes_segments_only_when_durable,
    a_snapshot_in_a_batch_keeps_or_restarts_the_log,
    async_ticket_resolves,
    misuse_is_a_clear_error,
    concurrent_writers_are_ordered,
    lone_writes_sync_inline_bursts_overlap,
);

fn append_read_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    assert_eq!(wal.backend(), backend);
    assert_eq!((wal.first_index(), wal.last_index()), (1, 0));
    let mut tickets = Vec::new();
    for chunk in 0..100u64 {
        tickets.push(
            wal.append(entries(chunk * 10 + 1, chunk * 10 + 11, 1 + chunk / 50))
                .unwrap(),
        );
    }
    for t in &tickets {
        t.wait().unwrap();
    }
    assert!(wal.segment_count() > 1, "64 KiB segments rotate");
    assert_eq!(wal.read(1, 1001).unwrap(), {
        let mut all = entries(1, 501, 1);
        all.extend(entries(501, 1001, 2));
        all
    });
    assert_eq!(wal.term(500).unwrap(), 1);
    assert_eq!(wal.term(501).unwrap(), 2);
    assert_eq!(wal.term(0).unwrap(), 0);
    assert!(matches!(wal.term(1001), Err(Error::Unavailable { .. })));
    let m = wal.metrics();
    wal.close().unwrap();

    let wal = open(dir.path(), small(backend)).unwrap();
    assert_eq!((wal.first_index(), wal.last_index()), (1, 1000));
    assert_eq!(wal.read(990, 1001).unwrap(), entries(990, 1001, 2));
    assert_eq!(wal.recovery_report().truncated_tail, None);
    // Appends continue where the log ends.
    wal.append(entries(1001, 1002, 3)).unwrap().wait().unwrap();
    assert_eq!(wal.last_index(), 1001);
    assert!(m.groups_total >= 1 && m.fsyncs_total >= 1);
    assert_eq!(m.entries_total, 1000);
    // Every write's queue wait, every group's write and fsync time.
    assert_eq!(m.queue_wait_us.len(), 100);
    assert_eq!(m.write_us.len(), m.fsyncs_total);
    assert_eq!(m.fsync_us.len(), m.fsyncs_total);
}

fn truncate_and_hard_state_survive_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    drop(wal.append(entries(1, 51, 1)).unwrap());
    let hs = HardState {
        term: 2,
        vote: 3,
        commit: 20,
    };
    wal.write(WriteBatch {
        truncate_from: Some(31),
        entries: entries(31, 41, 2),
        hard_state: Some(hs),
        ..WriteBatch::default()
    })
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(wal.last_index(), 40);
    assert_eq!(wal.term(31).unwrap(), 2);
    drop(wal);
    let wal = open(dir.path(), small(backend)).unwrap();
    assert_eq!(wal.hard_state(), hs);
    assert_eq!(wal.last_index(), 40);
    assert_eq!(wal.term(30).unwrap(), 1);
    assert_eq!(wal.read(31, 41).unwrap(), entries(31, 41, 2));
}

fn snapshot_compaction_deletes_segments_only_when_durable(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    for c in 0..200u64 {
        drop(wal.append(entries(c * 10 + 1, c * 10 + 11, 1)).unwrap());
    }
    wal.sync().unwrap();
    let before = wal.segment_count();
    assert!(before > 4);
    assert!(matches!(
        wal.compact(1500),
        Err(Error::SnapshotNotDurable { index: 1500 })
    ));
    let meta = SnapshotMeta {
        index: 1500,
        term: 1,
        data: Bytes::from_static(b"members=1,2,3"),
    };
    wal.save_snapshot(meta.clone()).unwrap().wait().unwrap();
    // A durable snapshot covers nothing beyond its index.
    assert!(matches!(
        wal.compact(1501),
        Err(Error::SnapshotNotDurable { index: 1501 })
    ));
    assert_eq!(wal.segment_count(), before);
    let removed = wal.compact(1500).unwrap();
    assert!(removed > 0);
    assert_eq!(wal.segment_count(), before - removed);
    assert_eq!(wal.first_index(), 1501);
    assert!(matches!(wal.read(1400, 1600), Err(Error::Compacted { .. })));
    assert_eq!(wal.term(1500).unwrap(), 1);
    wal.close().unwrap();
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .count();
    assert!(
        files <= before - removed + 2,
        "compacted segments are deleted or kept as one spare"
    );

    let wal = open(dir.path(), small(backend)).unwrap();
    assert_eq!(wal.snapshot(), Some(meta));
    assert_eq!(wal.first_index(), 1501);
    assert_eq!(wal.last_index(), 2000);
    assert_eq!(wal.read(1501, 2001).unwrap(), entries(1501, 2001, 1));
}

/// A batch that records a snapshot and entries: the entries continue the
/// log when it contains the snapshot's (index, term); else the log is
/// discarded and restarts after the snapshot. Both survive a reopen.
fn a_snapshot_in_a_batch_keeps_or_restarts_the_log(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    let snapshot = |index: u64, term: u64| SnapshotMeta {
        index,
        term,
        data: Bytes::from(format!("at {index}")),
    };
    // Records `meta` and `entries` in one batch.
    let write = |wal: &Wal, meta: SnapshotMeta, entries: Vec<Entry>| {
        let batch = WriteBatch {
            snapshot: Some(meta),
            entries,
            ..WriteBatch::default()
        };
        wal.write(batch).unwrap().wait().unwrap();
    };
    wal.append(entries(1, 11, 1)).unwrap().wait().unwrap();
    write(&wal, snapshot(5, 1), entries(11, 13, 1));
    assert_eq!((wal.first_index(), wal.last_index()), (6, 12));
    assert_eq!(wal.read(6, 13).unwrap(), entries(6, 13, 1));

    let ahead = snapshot(20, 3);
    write(&wal, ahead.clone(), entries(21, 23, 3));
    assert_eq!((wal.first_index(), wal.last_index()), (21, 22));
    assert_eq!(wal.term(20).unwrap(), 3);
    assert_eq!(wal.read(21, 23).unwrap(), entries(21, 23, 3));
    wal.close().unwrap();

    let wal = open(dir.path(), small(backend)).unwrap();
    assert_eq!(wal.snapshot(), Some(ahead));
    assert_eq!((wal.first_index(), wal.last_index()), (21, 22));
    assert_eq!(wal.read(21, 23).unwrap(), entries(21, 23, 3));

    // A snapshot alone, ahead of the log: the next entry follows it and
    // may not go back below its term.
    write(&wal, snapshot(30, 4), Vec::new());
    assert_eq!((wal.first_index(), wal.last_index()), (31, 30));
    assert!(matches!(
        wal.append(entries(31, 32, 3)),
        Err(Error::TermRegression {
            index: 31,
            term: 3,
            previous: 4
        })
    ));
    wal.append(entries(31, 32, 4)).unwrap().wait().unwrap();
    assert_eq!(wal.read(31, 32).unwrap(), entries(31, 32, 4));
}

fn async_ticket_resolves(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let t1 = wal.append(entries(1, 3, 1)).unwrap();
        let t2 = wal.append(entries(3, 5, 1)).unwrap();
        tokio::time::timeout(Duration::from_secs(30), async { (t1.await, t2.await) })
            .await
            .map(|(a, b)| {
                a.unwrap();
                b.unwrap();
            })
            .expect("durable within 30 s");
    });
    assert_eq!(wal.last_index(), 4);
}

fn misuse_is_a_clear_error(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    drop(wal.append(entries(1, 11, 2)).unwrap());
    assert!(matches!(
        wal.append(entries(12, 13, 2)),
        Err(Error::NonContiguous {
            expected: 11,
            got: 12
        })
    ));
    assert!(matches!(
        wal.append(entries(11, 12, 1)),
        Err(Error::TermRegression { .. })
    ));
    // A gap inside one batch.
    let mut gap = entries(11, 12, 2);
    gap.extend(entries(13, 14, 2));
    assert!(matches!(
        wal.append(gap),
        Err(Error::NonContiguous {
            expected: 12,
            got: 13
        })
    ));
    assert!(matches!(
        wal.truncate_suffix(20),
        Err(Error::Unavailable {
            index: 20,
            last_index: 10
        })
    ));
    let huge = vec![Entry {
        index: 11,
        term: 2,
        payload: Bytes::from(vec![0u8; 128 << 10]),
    }];
    assert!(matches!(wal.append(huge), Err(Error::TooLarge { .. })));
    // The log is unchanged by the refused writes.
    wal.sync().unwrap();
    assert_eq!(wal.last_index(), 10);
    drop(wal);

    for (opts, field) in [
        (
            Options {
                segment_size: 1000,
                ..Options::default()
            },
            "segment_size",
        ),
        (
            Options {
                queue_depth: 0,
                ..Options::default()
            },
            "queue_depth",
        ),
        (
            Options {
                groups_inflight_max: 0,
                ..Options::default()
            },
            "groups_inflight_max",
        ),
    ] {
        match Wal::open(dir.path(), opts) {
            Err(Error::InvalidOption { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidOption {field}, got {other:?}"),
        }
    }
    assert!("bogus".parse::<Backend>().unwrap_err().contains("bogus"));
}

fn concurrent_writers_are_ordered(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(wal) = open(dir.path(), small(backend)) else {
        return;
    };
    let wal = std::sync::Arc::new(wal);
    let next = std::sync::Arc::new(std::sync::Mutex::new(1u64));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    // Indexes are handed out under the same lock that orders
                    // the append, as a Raft leader does.
                    let ticket = {
                        let mut n = next.lock().unwrap();
                        let t = wal.append(entries(*n, *n + 3, 1)).unwrap();
                        *n += 3;
                        t
                    };
                    ticket.wait().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(wal.last_index(), 4800);
    assert_eq!(wal.read(1, 4801).unwrap(), entries(1, 4801, 1));
    let m = wal.metrics();
    assert!(
        m.fsyncs_total <= 1600,
        "group commit shares fsyncs: {}",
        m.fsyncs_total
    );
}

/// A write with nothing else in flight is synced on the driver thread (no
/// hop to a kernel worker); with io_uring, a burst that leaves writes
/// queued behind a group hands that group's fdatasync to the ring so the
/// next group's write overlaps it.
fn lone_writes_sync_inline_bursts_overlap(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        group_bytes_max: 4096,
        ..small(backend)
    };
    let Some(wal) = open(dir.path(), opts) else {
        return;
    };
    for i in 1..=50u64 {
        wal.append(entries(i, i + 1, 1)).unwrap().wait().unwrap();
    }
    let m = wal.metrics();
    assert_eq!(m.fsyncs_total, 50, "one group per lone write");
    assert_eq!(m.fsyncs_inline_total, 50, "lone groups sync inline");

    let big = |i: u64| {
        vec![Entry {
            index: i,
            term: 1,
            payload: Bytes::from(vec![i as u8; 1500]),
        }]
    };
    let tickets: Vec<_> = (51..=250u64).map(|i| wal.append(big(i)).unwrap()).collect();
    for t in &tickets {
        t.wait().unwrap();
    }
    assert_eq!(
        wal.read(51, 251).unwrap(),
        (51..=250).flat_map(big).collect::<Vec<_>>()
    );
    let m = wal.metrics();
    let burst = m.fsyncs_total - 50;
    let inline = m.fsyncs_inline_total - 50;
    assert!(
        burst >= 200 * 1500 / 4096,
        "groups stay within group_bytes_max: {burst}"
    );
    match backend {
        Backend::Pwritev => assert_eq!(inline, burst),
        _ => assert!(
            inline < burst,
            "a burst overlaps syncs on the ring: {inline} of {burst} inline"
        ),
    }
}

/// Whether this kernel completes an io_uring no-op (the round trip the WAL
/// probes with), checked here without the WAL.
fn kernel_runs_io_uring() -> std::io::Result<()> {
    let mut ring = io_uring::IoUring::new(4)?;
    let nop = io_uring::opcode::Nop::new().build().user_data(7);
    // SAFETY: a no-op references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| std::io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

/// Where the kernel runs io_uring, the WAL uses it: asked for it, and by
/// default (`Auto`). The other tests skip their io_uring half where the WAL
/// cannot open on it, so without this one a probe that always failed would
/// go unnoticed (cargo-mutants found that).
#[test]
fn io_uring_is_used_wherever_the_kernel_runs_it() {
    if let Err(e) = kernel_runs_io_uring() {
        println!("skipped: the kernel does not run io_uring here: {e}");
        return;
    }
    for backend in [Backend::IoUring, Backend::Auto] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), small(backend)).unwrap_or_else(|e| {
            panic!("{backend:?}: the kernel runs io_uring, the WAL did not: {e}")
        });
        assert_eq!(wal.backend(), Backend::IoUring, "asked for {backend:?}");
        wal.close().unwrap();
    }
}
