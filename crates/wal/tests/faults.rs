//! Faults on the simulated disk: a failing fdatasync, a full disk, a
//! failing remove or rename, bad options and media corruption (bit flips in
//! synced data).
//!
//! The I/O faults run on both I/O paths (`pwritev::*`, `io_uring_path::*`):
//! the pwritev backend, and the io_uring backend's logic over a simulated
//! ring. `ring_*` tests are the io_uring path's own: several groups in
//! flight, their fdatasyncs completing out of order, when the fault hits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_wal::format::{self, RecordType, SegmentHeader, SEGMENT_HEADER_LEN};
use skiff_wal::sim::{Op, SimStorage};
use skiff_wal::sim_ring::SimRing;
use skiff_wal::{
    Backend, Entry, Error, HardState, Options, SnapshotMeta, Storage, Ticket, Wal, WriteBatch,
};

mod common;
use common::{open_on, open_with, options, Io, DIR};

fn open(sim: &SimStorage, io: &Io) -> skiff_wal::Result<Wal> {
    open_on(sim, options(0), io)
}

fn entries(lo: u64, hi: u64, term: u64, len: usize) -> Vec<Entry> {
    (lo..hi)
        .map(|index| Entry {
            index,
            term,
            payload: Bytes::from(
                (0..len)
                    .map(|i| (index as usize * 131 + i * 7 + term as usize) as u8)
                    .collect::<Vec<u8>>(),
            ),
        })
        .collect()
}

/// Appends `n` entries after the last one and waits for them.
fn append_acked(wal: &Wal, n: u64, term: u64, len: usize) -> Vec<Entry> {
    let next = wal.last_index() + 1;
    let batch = entries(next, next + n, term, len);
    wal.append(batch.clone()).unwrap().wait().unwrap();
    batch
}

/// Waits (up to 10 s) until the pre-writer has a spare segment ready.
fn wait_for_spare(sim: &SimStorage) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim
        .file_names(Path::new(DIR))
        .iter()
        .any(|n| n.starts_with("spare-") && n.ends_with(".wal"))
    {
        assert!(Instant::now() < deadline, "no spare pre-written");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn segment_paths(sim: &SimStorage) -> Vec<PathBuf> {
    sim.file_names(Path::new(DIR))
        .into_iter()
        .filter(|n| n.ends_with(".wal") && !n.starts_with("spare-"))
        .map(|n| Path::new(DIR).join(n))
        .collect()
}

/// Bytes held by every file on the disk.
fn used_bytes(sim: &SimStorage) -> u64 {
    sim.file_names(Path::new(DIR))
        .iter()
        .map(|n| sim.read_file(&Path::new(DIR).join(n)).unwrap().len() as u64)
        .sum()
}

/// An independent copy of the disk as it is now (everything the WAL wrote
/// is synced by the time a test copies it).
fn copy(sim: &SimStorage) -> SimStorage {
    sim.crash_states(sim.op_count(), 0)
        .into_iter()
        .find(|s| s.kind == "clean")
        .expect("a clean image")
        .storage
}

/// A verified record of a segment file: offset, type, body.
struct Record {
    offset: u64,
    kind: u8,
    body: Bytes,
}

fn records(sim: &SimStorage, path: &Path) -> Vec<Record> {
    let data = sim.read_file(path).expect("segment exists");
    let header = SegmentHeader::decode(&data).expect("segment header verifies");
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while let Ok((h, body)) = format::read_record(&data, at, header.salt) {
        out.push(Record {
            offset: at as u64,
            kind: h.kind,
            body: Bytes::copy_from_slice(body),
        });
        at += h.framed_len();
    }
    out
}

fn entries_records(sim: &SimStorage, path: &Path) -> Vec<Record> {
    records(sim, path)
        .into_iter()
        .filter(|r| r.kind == RecordType::Entries as u8)
        .collect()
}

fn is_failed<T: std::fmt::Debug>(r: skiff_wal::Result<T>) -> bool {
    matches!(r, Err(Error::Failed { .. }))
}

// ---------------------------------------------------------------------------
// (a) fdatasync failure

/// A failed fdatasync fails the WAL for good: the tickets of that group and
/// of every write queued with or after it get `Failed`, whether they wait
/// before or after the failure, blocking or async; later writes, compaction,
/// sync and close report it; and the WAL never syncs (nor writes) again.
fn fsync_failure_fails_the_wal_for_good(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let acked = append_acked(&wal, 10, 1, 100);
    let durable = wal.append(entries(11, 12, 1, 100)).unwrap();
    durable.wait().unwrap();
    let snap = SnapshotMeta {
        index: 5,
        term: 1,
        data: Bytes::from_static(b"m"),
    };
    wal.save_snapshot(snap).unwrap().wait().unwrap();
    let before = sim.op_count();

    sim.fail_next_sync(libc::EIO);
    let t1 = wal.append(entries(12, 14, 1, 100)).unwrap();
    // A waiter blocked when the failure lands.
    let blocked = {
        let t1 = t1.clone();
        std::thread::spawn(move || t1.wait())
    };
    let t2 = wal.append(entries(14, 16, 1, 100));
    let t3 = wal.save_hard_state(HardState {
        term: 1,
        vote: 1,
        commit: 15,
    });
    let err = blocked.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    assert!(err.is_fatal());
    assert!(
        err.to_string().contains("fdatasync"),
        "the reason names the failed call: {err}"
    );
    assert!(is_failed(t1.wait()));
    assert!(is_failed(t1.is_durable()));
    // Writes queued behind the failed group (or refused, if the failure
    // landed first) fail too.
    for t in [t2, t3] {
        match t {
            Ok(t) => assert!(is_failed(t.wait())),
            Err(e) => assert!(matches!(e, Error::Failed { .. }), "{e:?}"),
        }
    }
    // An async waiter gets it too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let late = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), t1.clone())
            .await
            .expect("resolves")
    });
    assert!(is_failed(late));
    // What was durable before stays so.
    durable.wait().unwrap();

    let after_failure = sim.op_count();
    assert!(is_failed(wal.append(entries(16, 17, 1, 100))));
    assert!(is_failed(wal.save_hard_state(HardState::default())));
    assert!(is_failed(wal.truncate_suffix(8)));
    assert!(is_failed(wal.compact(5)));
    assert!(is_failed(wal.sync()));
    assert!(is_failed(wal.close()));

    // Never retried: after the failed group's write, nothing touches the
    // disk; in particular no fdatasync ever succeeds. (On the io_uring
    // path the groups of t2 and t3 may have been written while t1's
    // fdatasync was in flight: a write each, none rewritten.)
    let ops = sim.ops();
    assert_eq!(ops.len(), after_failure, "nothing done after the failure");
    let tail = &ops[before..];
    assert!(
        !tail.iter().any(|op| matches!(op, Op::SyncData { .. })),
        "no fdatasync after the failure: {:?}",
        tail.iter().map(op_name).collect::<Vec<_>>()
    );
    let writes = group_writes(tail);
    assert!(
        writes == 1 || (io.is_ring() && writes <= 3),
        "one group write, not retried: {:?}",
        tail.iter().map(op_name).collect::<Vec<_>>()
    );

    // Every crash image keeps what was acknowledged.
    for state in sim.crash_states(sim.op_count(), 3) {
        let wal = open(&state.storage, &io).unwrap();
        assert!(wal.last_index() >= 11, "{}", state.kind);
        assert_eq!(wal.read(6, 12).unwrap(), {
            let mut all = acked.clone();
            all.extend(entries(11, 12, 1, 100));
            all.split_off(5)
        });
    }
    // A restarted process recovers everything acknowledged and goes on.
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.first_index(), 6);
    assert!(wal.last_index() >= 11);
    assert_eq!(wal.read(6, 11).unwrap(), acked[5..].to_vec());
    let last = wal.last_index();
    wal.append(entries(last + 1, last + 2, 2, 10))
        .unwrap()
        .wait()
        .unwrap();
    wal.close().unwrap();
}

/// A failed fdatasync of the first group after a reopen, with four writers
/// appending concurrently: every one of their writes fails, none is
/// acknowledged.
fn fsync_failure_reaches_every_concurrent_writer(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    append_acked(&wal, 5, 1, 50);
    wal.close().unwrap();
    let wal = Arc::new(open(&sim, &io).unwrap());
    let next = Arc::new(std::sync::Mutex::new(6u64));
    // The reopen synced the last segment; from here no fdatasync succeeds.
    let before = sim.op_count();
    sim.fail_next_sync(libc::EIO);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                let mut failed = 0;
                for _ in 0..20 {
                    let ticket = {
                        let mut n = next.lock().unwrap();
                        let t = wal.append(entries(*n, *n + 1, 1, 50));
                        if t.is_ok() {
                            *n += 1;
                        }
                        t
                    };
                    match ticket.and_then(|t| t.wait()) {
                        Err(Error::Failed { .. }) => failed += 1,
                        Err(e) => panic!("unexpected error {e}"),
                        Ok(()) => panic!("a write after a failed fdatasync was acknowledged"),
                    }
                }
                failed
            })
        })
        .collect();
    let failed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(failed, 80);
    let ops = sim.ops();
    assert!(!ops[before..]
        .iter()
        .any(|op| matches!(op, Op::SyncData { .. })));
    // The first group's write, or on the io_uring path those of the groups
    // in flight with its fdatasync: none rewritten.
    let in_flight_max = if io.is_ring() {
        options(0).groups_inflight_max
    } else {
        1
    };
    assert!(group_writes(&ops[before..]) <= in_flight_max);
    let wal = Arc::try_unwrap(wal).unwrap();
    assert!(is_failed(wal.close()));
}

/// A failed fdatasync while making a spare on the writer's thread (no
/// pre-writer) is reported to the writer as a fatal error, never swallowed:
/// the write is not queued, no partial spare is left, and nothing
/// acknowledged is lost.
fn fsync_failure_while_making_a_spare_is_reported(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let mut acked = Vec::new();
    // 3000-byte entries: five fill a segment, the sixth needs a new one.
    for _ in 0..5 {
        acked.extend(append_acked(&wal, 1, 1, 3000));
    }
    assert_eq!(wal.segment_count(), 1);
    let ops = sim.op_count();
    sim.fail_next_sync(libc::EIO);
    match wal.append(entries(6, 7, 1, 3000)) {
        Err(e) => assert!(e.is_fatal(), "{e:?}"),
        Ok(t) => panic!("append whose segment could not be made: {:?}", t.wait()),
    }
    assert_eq!(wal.last_index(), 5);
    assert_eq!(wal.segment_count(), 1);
    assert!(!sim.ops()[ops..]
        .iter()
        .any(|op| matches!(op, Op::SyncData { .. })));
    assert_eq!(segment_paths(&sim).len(), 1);
    assert!(
        sim.file_names(Path::new(DIR))
            .iter()
            .all(|n| !n.starts_with("spare-")),
        "{:?}",
        sim.file_names(Path::new(DIR))
    );
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    drop(wal);
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    wal.close().unwrap();
}

/// Whether `path` is a spare being pre-written (its temporary name).
fn is_spare_in_progress(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tmp")
}

/// Waits (up to 10 s) until `wal.sync()` reports a failure; returns it.
fn wait_until_failed(wal: &Wal) -> Option<Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Err(e) = wal.sync() {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A failed fdatasync of a spare the pre-writer is making is never retried:
/// the pre-writer stops and the WAL fails, so that the next append, sync
/// and close report it (even with room left in the active segment, so that
/// no append would otherwise ask for a spare). What was acknowledged before
/// stays.
fn fsync_failure_in_the_prewriter_fails_the_wal(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let acked = append_acked(&wal, 5, 1, 100);
    wal.close().unwrap();

    // The reopened WAL goes on in its last segment, and its pre-writer
    // starts a spare at once: that spare's fdatasync fails.
    sim.fail_next_sync_where(libc::EIO, is_spare_in_progress);
    let wal = open_on(&sim, options(1), &io).unwrap();
    let err = wait_until_failed(&wal).expect("the failed fdatasync of a spare fails the WAL");
    assert!(!sim.sync_failure_pending());
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    assert!(err.is_fatal());
    assert!(
        err.to_string().contains("fdatasync spare segment"),
        "the reason names the failed call: {err}"
    );
    let before = sim.op_count();
    assert!(is_failed(wal.append(entries(6, 7, 1, 100))));
    assert!(is_failed(wal.sync()));
    // Give a retry time to happen: none does.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !sim.ops()[before..]
            .iter()
            .any(|op| matches!(op, Op::SyncData { .. } | Op::Rename { .. })),
        "nothing is synced or renamed after the failure: {:?}",
        sim.ops()[before..].iter().map(op_name).collect::<Vec<_>>()
    );
    assert!(
        sim.file_names(Path::new(DIR))
            .iter()
            .all(|n| !n.starts_with("spare-")),
        "no spare was made: {:?}",
        sim.file_names(Path::new(DIR))
    );
    assert!(is_failed(wal.close()));

    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    wal.close().unwrap();
}

/// An fdatasync of a spare that fails with ENOSPC is an fsync error like
/// any other: fatal, not the clean `Full` of a spare that could not be
/// written.
fn enospc_from_the_fsync_of_a_spare_is_fatal_not_full(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let mut acked = Vec::new();
    // 3000-byte entries: five fill a segment, the sixth needs a new one.
    for _ in 0..5 {
        acked.extend(append_acked(&wal, 1, 1, 3000));
    }
    sim.fail_next_sync_where(libc::ENOSPC, is_spare_in_progress);
    match wal.append(entries(6, 7, 1, 3000)) {
        Err(e) => assert!(e.is_fatal(), "{e:?}"),
        Ok(t) => panic!("append whose segment could not be made: {:?}", t.wait()),
    }
    assert!(is_failed(wal.append(entries(6, 7, 1, 10))));
    assert!(is_failed(wal.sync()));
    drop(wal);
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    wal.close().unwrap();
}

/// Group writes in `ops`, checking that none rewrote what an earlier one
/// wrote (a retry).
fn group_writes(ops: &[Op]) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for op in ops {
        if let Op::Write { ino, offset, .. } = op {
            assert!(
                seen.insert((*ino, *offset)),
                "rewrote ino {ino} at {offset}"
            );
        }
    }
    seen.len()
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Write { ino, offset, data } => format!("Write(ino {ino} @{offset} +{})", data.len()),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// (b) ENOSPC

/// Fills the active segment with large entries until the next append needs
/// a new segment; returns every entry acknowledged.
fn fill_until_rotation_needed(wal: &Wal, term: u64) -> Vec<Entry> {
    let mut acked = Vec::new();
    let segs = wal.segment_count();
    // 2000-byte entries: seven fill a 16 KiB segment, leaving room for small
    // records (a snapshot, a hard state) but not for an eighth.
    loop {
        let next = wal.last_index() + 1;
        let batch = entries(next, next + 1, term, 2000);
        wal.append(batch.clone()).unwrap().wait().unwrap();
        acked.extend(batch);
        if wal.segment_count() > segs {
            break;
        }
    }
    // Now in a fresh segment: fill it up.
    for _ in 0..6 {
        acked.extend(append_acked(wal, 1, term, 2000));
    }
    acked
}

/// With spares made on demand, the append that needs a new segment on a
/// full disk fails with `Full` and changes nothing; appends that fit the
/// pre-written active segment still succeed; a reopen with room finds
/// everything acknowledged.
/// A spare that cannot be made for a reason other than space (an I/O
/// error writing it) is reported as that I/O error, not as a full disk:
/// "full" tells the host to free space and retry, which would not help.
fn eio_making_a_spare_is_an_io_error_not_full(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    append_acked(&wal, 20, 1, 100);
    fill_until_rotation_needed(&wal, 1);
    let last = wal.last_index();
    sim.fail_next_write_where(libc::EIO, 0, |p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("spare-"))
    });
    match wal.append(entries(last + 1, last + 2, 1, 2000)) {
        Err(Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EIO)),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(wal.last_index(), last);
    // A disk that fails I/O is not a full one, now or after.
    assert!(!matches!(
        wal.append(entries(last + 1, last + 2, 1, 2000)),
        Err(Error::Full { .. }) | Ok(_)
    ));
}

fn enospc_for_a_new_segment_is_a_clean_full_error(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let mut acked = append_acked(&wal, 20, 1, 100);
    acked.extend(fill_until_rotation_needed(&wal, 1));
    let segs = wal.segment_count();
    let last = wal.last_index();
    // Room for half a segment: not enough for a new one.
    sim.set_capacity(Some(used_bytes(&sim) + (8 << 10)));
    let ops = sim.op_count();
    let big = entries(last + 1, last + 2, 1, 2000);
    match wal.append(big.clone()) {
        Err(Error::Full { dir }) => assert_eq!(dir, Path::new(DIR)),
        other => panic!("expected Full, got {other:?}"),
    }
    // A clean refusal: the log, the segments and the directory unchanged,
    // no partial spare left behind.
    assert_eq!(wal.last_index(), last);
    assert_eq!(wal.segment_count(), segs);
    assert!(
        !sim.file_names(Path::new(DIR))
            .iter()
            .any(|n| n.ends_with(".tmp")),
        "{:?}",
        sim.file_names(Path::new(DIR))
    );
    assert!(!sim.ops()[ops..]
        .iter()
        .any(|op| matches!(op, Op::SyncData { .. })));
    // It is not fatal, and asking again gives the same answer.
    assert!(matches!(wal.append(big.clone()), Err(Error::Full { .. })));
    // Small records still fit the pre-written active segment: writes inside
    // it never need space.
    let hs = HardState {
        term: 1,
        vote: 2,
        commit: last,
    };
    wal.save_hard_state(hs).unwrap().wait().unwrap();
    let small = entries(last + 1, last + 2, 1, 10);
    wal.append(small.clone()).unwrap().wait().unwrap();
    acked.extend(small);
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    wal.sync().unwrap();
    wal.close().unwrap();

    // Reopen with the disk still full: everything is there.
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    assert_eq!(wal.hard_state(), hs);
    drop(wal);
    // And once there is room again, the log goes on.
    sim.set_capacity(None);
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    assert_eq!(wal.hard_state(), hs);
    let last = wal.last_index();
    let more = entries(last + 1, last + 3, 2, 2000);
    wal.append(more.clone()).unwrap().wait().unwrap();
    acked.extend(more);
    wal.close().unwrap();
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    wal.close().unwrap();
}

/// On the live WAL: after `Full`, a snapshot and compaction free segments
/// and appends succeed again, first on the recycled segment, then on new
/// spares made in the space freed.
fn compaction_after_full_lets_appends_go_on(spare_segments: usize, io: Io) {
    let sim = SimStorage::new();
    let wal = open_on(&sim, options(spare_segments), &io).unwrap();
    let mut acked = append_acked(&wal, 20, 1, 100);
    acked.extend(fill_until_rotation_needed(&wal, 1));
    acked.extend(fill_until_rotation_needed(&wal, 1));
    if spare_segments > 0 {
        // Let the pre-writer have its spare ready before the disk fills.
        wait_for_spare(&sim);
    }
    sim.set_capacity(Some(used_bytes(&sim) + (8 << 10)));
    // Keep appending until the disk has no room for a segment: with a
    // pre-writer the ready spare is used first.
    let full_at = loop {
        let next = wal.last_index() + 1;
        let batch = entries(next, next + 1, 1, 2000);
        match wal.append(batch.clone()) {
            Ok(t) => {
                t.wait().unwrap();
                acked.extend(batch);
            }
            Err(Error::Full { dir }) => {
                assert_eq!(dir, Path::new(DIR));
                break next;
            }
            Err(e) => panic!("expected Full, got {e}"),
        }
        assert!(next < 1000, "never Full");
    };
    assert_eq!(wal.last_index() + 1, full_at);
    assert_eq!(wal.read(1, full_at).unwrap(), acked);
    let segs = wal.segment_count();
    assert!(segs >= 3);

    // A snapshot (a small record: it fits) then compaction.
    let snap_index = full_at - 3;
    let meta = SnapshotMeta {
        index: snap_index,
        term: 1,
        data: Bytes::from_static(b"members=1,2,3"),
    };
    wal.save_snapshot(meta.clone()).unwrap().wait().unwrap();
    let removed = wal.compact(snap_index).unwrap();
    assert!(removed >= 2, "removed {removed}");
    let live = acked.split_off(snap_index as usize);
    assert_eq!(wal.first_index(), snap_index + 1);
    assert_eq!(wal.read(snap_index + 1, full_at).unwrap(), live);

    // Appends go on: the recycled segment first, then new spares in the
    // room compaction freed.
    let mut acked = live;
    let segs = wal.segment_count();
    for _ in 0..12 {
        let next = wal.last_index() + 1;
        let batch = entries(next, next + 1, 2, 2000);
        match wal.append(batch.clone()) {
            Ok(t) => t.wait().unwrap(),
            Err(e) => panic!("append after compaction freed space: {e}"),
        }
        acked.extend(batch);
    }
    assert!(wal.segment_count() > segs, "new segments were started");
    assert_eq!(
        wal.read(snap_index + 1, wal.last_index() + 1).unwrap(),
        acked
    );
    wal.close().unwrap();

    sim.set_capacity(None);
    let wal = open_on(&sim, options(spare_segments), &io).unwrap();
    assert_eq!(wal.snapshot(), Some(meta));
    assert_eq!(wal.first_index(), snap_index + 1);
    assert_eq!(
        wal.read(snap_index + 1, wal.last_index() + 1).unwrap(),
        acked
    );
    wal.close().unwrap();
}

fn compaction_after_full_lets_appends_go_on_without_prewriter(io: Io) {
    compaction_after_full_lets_appends_go_on(0, io);
}

fn compaction_after_full_lets_appends_go_on_with_prewriter(io: Io) {
    compaction_after_full_lets_appends_go_on(1, io);
}

// ---------------------------------------------------------------------------
// (e) ENOSPC on a write to a segment

/// Whether `path` is a segment (not a spare).
fn is_segment(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".wal") && !n.starts_with("spare-"))
}

fn is_no_space(r: skiff_wal::Result<()>, first_seq: u64) -> bool {
    matches!(r, Err(Error::NoSpace { first_seq: f, .. }) if f == first_seq)
}

/// The log a WAL holds: first index, live entries, hard state, snapshot.
fn log_of(wal: &Wal) -> (u64, Vec<Entry>, HardState, Option<SnapshotMeta>) {
    (
        wal.first_index(),
        wal.read(wal.first_index(), wal.last_index() + 1).unwrap(),
        wal.hard_state(),
        wal.snapshot(),
    )
}

/// Every crash image of the disk as it is now opens as `want`.
fn every_crash_recovers(
    sim: &SimStorage,
    want: &(u64, Vec<Entry>, HardState, Option<SnapshotMeta>),
    io: &Io,
) {
    for state in sim.crash_states(sim.op_count(), 7) {
        let wal = open(&state.storage, io).unwrap();
        assert_eq!(&log_of(&wal), want, "crash image {}", state.kind);
    }
}

/// A write to the active segment that runs out of space (after landing
/// whole, the worst case for recovery) is dropped: its ticket says
/// `NoSpace` (not fatal), the log is as before it (in memory, and in every
/// crash image from then on: the bytes it left are cleared durably), and
/// the WAL goes on, the next write taking the dropped one's place.
fn enospc_on_a_write_drops_it_and_the_log_goes_on(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let mut acked = append_acked(&wal, 5, 1, 100);
    let hs = HardState {
        term: 1,
        vote: 1,
        commit: 3,
    };
    wal.save_hard_state(hs).unwrap().wait().unwrap();
    let before = log_of(&wal);

    sim.fail_next_write_where(libc::ENOSPC, 4096, is_segment);
    let dropped = wal
        .write(WriteBatch {
            entries: entries(6, 9, 1, 100),
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: 8,
            }),
            ..WriteBatch::default()
        })
        .unwrap();
    let err = dropped.wait().unwrap_err();
    assert!(!sim.write_failure_pending());
    assert!(
        matches!(&err, Error::NoSpace { first_seq, source, .. }
            if *first_seq == dropped.seq() && source.raw_os_error() == Some(libc::ENOSPC)),
        "{err:?}"
    );
    assert!(!err.is_fatal());
    assert!(is_no_space(dropped.is_durable().map(|_| ()), dropped.seq()));
    assert_eq!(log_of(&wal), before);
    assert_eq!(wal.last_index(), 5);
    assert!(is_no_space(wal.sync(), dropped.seq()));
    every_crash_recovers(&sim, &before, &io);

    // The same indexes again, other payloads: they take the dropped
    // write's place.
    let retry = entries(6, 8, 2, 50);
    wal.append(retry.clone()).unwrap().wait().unwrap();
    acked.extend(retry);
    wal.sync().unwrap();
    assert!(
        is_no_space(dropped.wait(), dropped.seq()),
        "dropped for good"
    );
    assert_eq!(wal.read(1, 8).unwrap(), acked);
    wal.close().unwrap();

    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.recovery_report().truncated_tail, None);
    assert_eq!(wal.read(1, 8).unwrap(), acked);
    assert_eq!(wal.last_index(), 7);
    assert_eq!(wal.hard_state(), hs);
    wal.close().unwrap();
}

/// A write that fails for any other reason than space (here `EIO`) is
/// not dropped and retried like one that ran out of room: the WAL fails for
/// good, the ticket says `Failed` (fatal), and nothing written after it is
/// acknowledged. (Found by cargo-mutants: `is_no_space` answering `true`
/// for every error went unnoticed.)
fn eio_on_a_write_is_fatal_not_no_space(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let acked = append_acked(&wal, 5, 1, 100);

    sim.fail_next_write_where(libc::EIO, 4096, is_segment);
    let failed = wal.append(entries(6, 9, 1, 100)).unwrap();
    let err = failed.wait().unwrap_err();
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    assert!(err.is_fatal(), "{err:?}");
    assert!(is_failed(wal.sync()));
    let later = wal.append(entries(9, 10, 1, 100));
    assert!(
        later.map_or(true, |t| t.wait().is_err()),
        "a write after the failure was acknowledged"
    );
    drop(wal);

    let wal = open(&sim, &io).unwrap();
    assert!(wal.last_index() >= 5);
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    wal.close().unwrap();
}

/// Writes queued behind one that runs out of space (part way) are dropped
/// with it, each with `NoSpace`, and everything they did to the log is
/// undone: a conflict's truncation, a snapshot, a hard state, more
/// entries. The WAL takes the same batch again once there is room.
fn enospc_drops_every_write_queued_behind_it_and_undoes_them(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let acked = append_acked(&wal, 10, 1, 100);
    let hs = HardState {
        term: 1,
        vote: 1,
        commit: 4,
    };
    wal.save_hard_state(hs).unwrap().wait().unwrap();
    let before = log_of(&wal);

    // Held back, so that the later writes are placed before the first
    // one's failure is known.
    sim.pause_writes();
    sim.fail_next_write_where(libc::EDQUOT, 300, is_segment);
    let conflict = WriteBatch {
        truncate_from: Some(6),
        entries: entries(6, 9, 2, 100),
        hard_state: Some(HardState {
            term: 2,
            vote: 2,
            commit: 5,
        }),
        ..WriteBatch::default()
    };
    let t1 = wal.write(conflict.clone()).unwrap();
    let meta = SnapshotMeta {
        index: 7,
        term: 2,
        data: Bytes::from_static(b"m"),
    };
    let t2 = wal.save_snapshot(meta.clone()).unwrap();
    let t3 = wal.append(entries(9, 12, 2, 100)).unwrap();
    assert_eq!(wal.first_index(), 8, "the snapshot was placed");
    sim.resume_writes();
    for t in [&t1, &t2, &t3] {
        assert!(is_no_space(t.wait(), t1.seq()), "{:?}", t.wait());
    }
    assert_eq!(log_of(&wal), before);
    every_crash_recovers(&sim, &before, &io);

    // Room again: the same batches go through.
    wal.write(conflict).unwrap().wait().unwrap();
    wal.save_snapshot(meta.clone()).unwrap().wait().unwrap();
    wal.append(entries(9, 12, 2, 100)).unwrap().wait().unwrap();
    let mut want = acked[..5].to_vec();
    want.extend(entries(6, 9, 2, 100));
    want.extend(entries(9, 12, 2, 100));
    let after = (
        8,
        want[7..].to_vec(),
        HardState {
            term: 2,
            vote: 2,
            commit: 5,
        },
        Some(meta),
    );
    assert_eq!(log_of(&wal), after);
    wal.close().unwrap();
    let wal = open(&sim, &io).unwrap();
    assert_eq!(log_of(&wal), after);
    wal.close().unwrap();
}

/// A write that starts a segment and runs out of space: the new segment is
/// removed (durably), the log goes back to the segment before, and the
/// write goes through once asked again.
fn enospc_on_a_write_that_starts_a_segment_removes_the_segment(io: Io) {
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    let mut acked = append_acked(&wal, 20, 1, 100);
    acked.extend(fill_until_rotation_needed(&wal, 1));
    let segments = segment_paths(&sim);
    let count = wal.segment_count();
    let before = log_of(&wal);
    let last = wal.last_index();

    sim.fail_next_write_where(libc::ENOSPC, 0, is_segment);
    let big = entries(last + 1, last + 2, 1, 2000);
    let t = wal.append(big.clone()).unwrap();
    assert!(is_no_space(t.wait(), t.seq()), "{:?}", t.wait());
    assert_eq!(log_of(&wal), before);
    assert_eq!(wal.segment_count(), count);
    assert_eq!(segment_paths(&sim), segments);
    every_crash_recovers(&sim, &before, &io);

    wal.append(big.clone()).unwrap().wait().unwrap();
    acked.extend(big);
    assert_eq!(wal.segment_count(), count + 1);
    wal.close().unwrap();
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.read(1, last + 2).unwrap(), acked);
    wal.close().unwrap();
}

/// Compaction keeps the segment a write that may still be dropped would
/// send the log back to: here a write starts a new segment, compaction
/// runs while it is not yet written, and the write then runs out of space;
/// the log goes on in the segment before, which must still be one.
fn compaction_keeps_the_segment_a_dropped_write_goes_back_to(io: Io) {
    let sim = SimStorage::new();
    let wal = open_on(&sim, options(1), &io).unwrap();
    append_acked(&wal, 20, 1, 100);
    let filled = fill_until_rotation_needed(&wal, 1);
    let last = wal.last_index();
    let meta = SnapshotMeta {
        index: last,
        term: 1,
        data: Bytes::from_static(b"m"),
    };
    wal.save_snapshot(meta.clone()).unwrap().wait().unwrap();
    assert!(!filled.is_empty());
    // The next segment comes from a spare already made: nothing on the
    // writer's thread writes while writes are held back.
    wait_for_spare(&sim);
    sim.pause_writes();
    sim.fail_next_write_where(libc::ENOSPC, 0, is_segment);
    let t = wal.append(entries(last + 1, last + 2, 1, 2000)).unwrap();
    wal.compact(last).unwrap();
    sim.resume_writes();
    assert!(is_no_space(t.wait(), t.seq()), "{:?}", t.wait());

    let more = entries(last + 1, last + 3, 1, 100);
    wal.append(more.clone()).unwrap().wait().unwrap();
    assert_eq!(wal.read(last + 1, last + 3).unwrap(), more);
    wal.close().unwrap();
    let wal = open(&sim, &io).unwrap();
    assert_eq!(wal.snapshot(), Some(meta));
    assert_eq!(wal.read(last + 1, wal.last_index() + 1).unwrap(), more);
    wal.close().unwrap();
}

// ---------------------------------------------------------------------------
// (f) A failed remove or rename of a compacted segment

/// Makes the `nth` (0: the next) remove of, or rename from, a segment fail
/// with `errno`.
fn fail_nth_segment_unlink(sim: &SimStorage, errno: i32, nth: usize) {
    let seen = AtomicUsize::new(0);
    sim.fail_next_unlink_where(errno, move |p| {
        is_segment(p) && seen.fetch_add(1, Ordering::Relaxed) == nth
    });
}

/// A WAL on `sim` with four or more segments and a durable snapshot
/// record at its last index (returned): a compaction removes all but the
/// last segment.
fn ready_to_compact(sim: &SimStorage, io: &Io) -> (Wal, u64) {
    let wal = open(sim, io).unwrap();
    append_acked(&wal, 20, 1, 100);
    for _ in 0..3 {
        fill_until_rotation_needed(&wal, 1);
    }
    let last = wal.last_index();
    let meta = SnapshotMeta {
        index: last,
        term: 1,
        data: Bytes::from_static(b"m"),
    };
    wal.save_snapshot(meta).unwrap().wait().unwrap();
    (wal, last)
}

/// A compaction whose recycling rename (`nth` 0: the first segment goes to
/// the empty spare pool) or remove (`nth` 1) of a segment fails reports the
/// error and keeps every segment whose file is still there: the next
/// compaction removes them, oldest first, and counts them. The log, every
/// crash image on the way and a reopen are as before.
fn failed_unlink_in_compaction_is_retried(nth: usize, io: Io) {
    let sim = SimStorage::new();
    let (wal, last) = ready_to_compact(&sim, &io);
    let want = log_of(&wal);
    let before = segment_paths(&sim);
    let listed = wal.segment_count();
    assert_eq!(before.len(), listed);
    assert!(listed >= 4, "{listed} segments");

    fail_nth_segment_unlink(&sim, libc::EACCES, nth);
    let err = wal.compact(last).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
        "{err}"
    );
    // Not a sync failure: the node retries it at the next compaction.
    assert!(!err.is_sync_failure(), "{err}");
    assert!(!sim.unlink_failure_pending());
    // The segments before the failed one are gone, the others still there
    // and still the WAL's.
    assert_eq!(segment_paths(&sim), before[nth..]);
    assert_eq!(wal.segment_count(), listed - nth);
    assert_eq!(log_of(&wal), want);
    every_crash_recovers(&sim, &want, &io);

    let removed = wal.compact(last).unwrap();
    assert_eq!(removed, listed - 1 - nth, "the retry removes the rest");
    assert_eq!(segment_paths(&sim), before[listed - 1..]);
    assert_eq!(wal.segment_count(), 1);
    if nth == 0 {
        assert!(
            sim.ops()
                .iter()
                .any(|op| matches!(op, Op::Rename { from, .. } if *from == before[0])),
            "the first segment was recycled"
        );
    }
    assert_eq!(wal.compact(last).unwrap(), 0);
    assert_eq!(log_of(&wal), want);
    every_crash_recovers(&sim, &want, &io);
    wal.close().unwrap();
    let wal = open(&sim, &io).unwrap();
    assert_eq!(log_of(&wal), want);
    assert_eq!(wal.segment_count(), 1);
    wal.close().unwrap();
}

fn failed_recycle_in_compaction_is_retried_by_the_next_compaction(io: Io) {
    failed_unlink_in_compaction_is_retried(0, io);
}

fn failed_remove_in_compaction_is_retried_by_the_next_compaction(io: Io) {
    failed_unlink_in_compaction_is_retried(1, io);
}

/// The directory fsync after a compaction removed a segment fails: the WAL
/// fails for good (an fsync is never retried), and what was acknowledged
/// survives every crash.
fn failed_directory_sync_in_compaction_fails_the_wal(io: Io) {
    let sim = SimStorage::new();
    let (wal, last) = ready_to_compact(&sim, &io);
    let want = log_of(&wal);
    assert!(wal.segment_count() >= 4);

    sim.fail_next_sync_dir(libc::EIO);
    let err = wal.compact(last).unwrap_err();
    assert!(err.is_sync_failure(), "{err}");
    let next = wal.last_index() + 1;
    let after = wal.append(entries(next, next + 1, 1, 10));
    assert!(
        matches!(after, Err(Error::Failed { .. })),
        "the WAL goes on after a failed directory fsync: {after:?}"
    );
    assert!(matches!(wal.compact(last), Err(Error::Failed { .. })));
    every_crash_recovers(&sim, &want, &io);
}

/// Offers batches of two 1,500-byte entries with `try_write` until one
/// comes back busy (unchanged), with writes paused; the ones taken join
/// `want` and `tickets`. Returns the busy batch.
fn try_write_until_busy(wal: &Wal, want: &mut Vec<Entry>, tickets: &mut Vec<Ticket>) -> WriteBatch {
    let mut next = wal.last_index() + 1;
    loop {
        assert!(
            next < 1_000,
            "the WAL took 1,000 entries with writes paused"
        );
        let batch = WriteBatch {
            entries: entries(next, next + 2, 1, 1500),
            ..WriteBatch::default()
        };
        match wal.try_write(batch.clone()) {
            Ok(t) => {
                tickets.push(t);
                want.extend(batch.entries);
                next += 2;
            }
            Err(skiff_wal::TryWriteError::Busy(back)) => {
                assert_eq!(back.entries, batch.entries, "the batch came back changed");
                return back;
            }
            Err(skiff_wal::TryWriteError::Failed(e)) => panic!("try_write failed: {e}"),
        }
    }
}

/// On a disk that does not take writes (the I/O driver stuck in one),
/// `try_write` never waits: once the queue is full, or a new segment finds
/// no spare ready, it hands the batch back untouched and the log is as if
/// it was never offered (a waiting `write` would block for
/// `submit_timeout`, and fail with a timeout). Offered again, in order,
/// once the disk moves, every batch goes through.
fn try_write_hands_the_batch_back_instead_of_waiting(io: Io) {
    let sim = SimStorage::new();
    let opts = Options {
        queue_depth: 8,
        submit_timeout: Duration::from_secs(120),
        ..options(1)
    };
    let wal = open_on(&sim, opts, &io).unwrap();
    let mut want = append_acked(&wal, 3, 1, 100);
    wait_for_spare(&sim);
    sim.pause_writes();
    let mut tickets: Vec<Ticket> = Vec::new();
    let busy = try_write_until_busy(&wal, &mut want, &mut tickets);
    let next = busy.entries[0].index;
    // Nothing of the busy batch was placed: the log ends before it.
    assert_eq!(wal.last_index(), next - 1);
    assert!(tickets.iter().all(|t| !t.is_durable().unwrap()));
    sim.resume_writes();
    let mut pending = Some(busy);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(batch) = pending.take() {
        match wal.try_write(batch) {
            Ok(t) => {
                tickets.push(t);
                want.extend(entries(next, next + 2, 1, 1500));
            }
            Err(skiff_wal::TryWriteError::Busy(back)) => {
                assert!(Instant::now() < deadline, "still busy 30 s after resuming");
                std::thread::sleep(Duration::from_millis(1));
                pending = Some(back);
            }
            Err(skiff_wal::TryWriteError::Failed(e)) => panic!("try_write failed: {e}"),
        }
    }
    for t in &tickets {
        t.wait().unwrap();
    }
    assert_eq!(log_of(&wal).1, want);
    wal.close().unwrap();
    let wal = open_on(&sim, options(1), &io).unwrap();
    assert_eq!(log_of(&wal).1, want);
    wal.close().unwrap();
}

/// `write` (the waiting write) answers a timeout after `submit_timeout`
/// where `try_write` hands the batch back, with nothing of it placed; once
/// the disk resumes the same batch goes in and the log is whole after a
/// reopen.
fn write_times_out_then_goes_on(
    sim: &SimStorage,
    resume: ResumeWrites,
    wal: Wal,
    batch: WriteBatch,
    mut want: Vec<Entry>,
    tickets: Vec<Ticket>,
    io: &Io,
) {
    let wal = wal;
    let _resume = resume;
    let last = wal.last_index();
    let started = Instant::now();
    match wal.write(batch.clone()) {
        Err(skiff_wal::Error::Timeout { .. }) => {}
        other => panic!("a waiting write with the disk paused answered {other:?}"),
    }
    assert!(
        started.elapsed() >= WAITING_WRITE_TIMEOUT / 2,
        "timed out after {:?}, before submit_timeout",
        started.elapsed()
    );
    assert_eq!(wal.last_index(), last, "the timed-out write was placed");
    sim.resume_writes();
    for t in &tickets {
        t.wait().unwrap();
    }
    wal.write(batch.clone()).unwrap().wait().unwrap();
    want.extend(batch.entries);
    assert_eq!(log_of(&wal).1, want);
    wal.close().unwrap();
    let wal = open_on(sim, options(1), io).unwrap();
    assert_eq!(log_of(&wal).1, want);
    wal.close().unwrap();
}

/// `submit_timeout` of the two tests below.
const WAITING_WRITE_TIMEOUT: Duration = Duration::from_millis(300);

/// Resumes the simulated disk's writes when dropped: a test that fails
/// while they are paused then ends instead of hanging in closing its WAL
/// (bind it after the WAL, so that it is dropped first).
struct ResumeWrites(SimStorage);

impl Drop for ResumeWrites {
    fn drop(&mut self) {
        self.0.resume_writes();
    }
}

fn a_waiting_write_times_out_without_a_spare_segment(io: Io) {
    let sim = SimStorage::new();
    let opts = Options {
        submit_timeout: WAITING_WRITE_TIMEOUT,
        ..options(1)
    };
    let wal = open_on(&sim, opts, &io).unwrap();
    let mut want = append_acked(&wal, 3, 1, 100);
    wait_for_spare(&sim);
    // The one spare is taken by the next segment; no other can be made.
    sim.pause_writes();
    let resume = ResumeWrites(sim.clone());
    let mut tickets = Vec::new();
    let first_segment_ends = try_write_until_busy(&wal, &mut want, &mut tickets);
    write_times_out_then_goes_on(&sim, resume, wal, first_segment_ends, want, tickets, &io);
}

fn a_waiting_write_times_out_on_a_full_queue(io: Io) {
    let sim = SimStorage::new();
    let opts = Options {
        // Room for every write below: only the queue can fill.
        segment_size: 64 << 20,
        queue_depth: 4,
        submit_timeout: WAITING_WRITE_TIMEOUT,
        ..options(1)
    };
    let wal = open_on(&sim, opts, &io).unwrap();
    let mut want = append_acked(&wal, 3, 1, 100);
    sim.pause_writes();
    let resume = ResumeWrites(sim.clone());
    let mut tickets = Vec::new();
    let mut next = wal.last_index() + 1;
    // The driver drains the queue into groups until its groups in flight
    // are all stuck on the paused disk; the queue is full for good once
    // try_write has been busy for a while.
    let mut busy_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let full = loop {
        assert!(Instant::now() < deadline, "the queue never stayed full");
        let batch = WriteBatch {
            entries: entries(next, next + 1, 1, 100),
            ..WriteBatch::default()
        };
        match wal.try_write(batch.clone()) {
            Ok(t) => {
                tickets.push(t);
                want.extend(batch.entries);
                next += 1;
                busy_since = None;
            }
            Err(skiff_wal::TryWriteError::Busy(back)) => {
                let since = *busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(200) {
                    break back;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(skiff_wal::TryWriteError::Failed(e)) => panic!("try_write failed: {e}"),
        }
    };
    write_times_out_then_goes_on(&sim, resume, wal, full, want, tickets, &io);
}

/// A compaction through a durable snapshot record, asked for while a newer
/// record is written but not yet durable, waits for the newer one instead
/// of failing: the WAL keeps only the newest record, and a node records its
/// next snapshot while the last one's compaction waits its turn on the
/// snapshot thread. (Before, it failed with `SnapshotNotDurable`.)
fn compaction_waits_for_a_newer_snapshot_record_in_flight(io: Io) {
    let sim = SimStorage::new();
    let (wal, last) = ready_to_compact(&sim, &io);
    let listed = wal.segment_count();
    assert!(listed >= 4, "{listed} segments");
    append_acked(&wal, 5, 1, 100);
    sim.pause_writes();
    let resume = ResumeWrites(sim.clone());
    let newer_index = wal.last_index();
    let newer = wal
        .save_snapshot(SnapshotMeta {
            index: newer_index,
            term: 1,
            data: Bytes::from_static(b"n"),
        })
        .unwrap();
    // Beyond every record, nothing can cover it: no wait (the WAL's
    // `wait_timeout` is 10 s here).
    let started = Instant::now();
    let beyond = wal.compact(newer_index + 1);
    assert!(
        matches!(beyond, Err(Error::SnapshotNotDurable { .. })),
        "{beyond:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    std::thread::scope(|s| {
        let compacting = s.spawn(|| wal.compact(last));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !compacting.is_finished(),
            "the compaction answered while the newer record was not durable: {:?}",
            compacting.join()
        );
        drop(resume);
        let removed = compacting.join().unwrap().unwrap();
        assert_eq!(removed, listed - 1);
    });
    newer.wait().unwrap();
    assert_eq!(wal.segment_count(), 1);
}

/// Group commit: writes that queue up while the disk is busy go out
/// together, in a few groups, not one group (one write and one fsync)
/// each.
fn writes_queued_behind_a_slow_disk_share_groups(io: Io) {
    // At most `groups_inflight_max` (8) groups go out before the disk
    // stalls them; what queues behind them goes out in one or two.
    const WRITES: u64 = 40;
    let sim = SimStorage::new();
    let wal = open(&sim, &io).unwrap();
    append_acked(&wal, 1, 1, 100);
    let groups_before = wal.metrics().groups_total;
    sim.pause_writes();
    let resume = ResumeWrites(sim.clone());
    let first = wal.last_index() + 1;
    let tickets: Vec<_> = (first..first + WRITES)
        .map(|i| wal.append(entries(i, i + 1, 1, 100)).unwrap())
        .collect();
    drop(resume);
    for t in &tickets {
        t.wait().unwrap();
    }
    assert_eq!(
        wal.read(first, first + WRITES).unwrap(),
        entries(first, first + WRITES, 1, 100)
    );
    let groups = wal.metrics().groups_total - groups_before;
    assert!(
        groups <= WRITES / 2,
        "{WRITES} queued writes went out in {groups} groups"
    );
}

// ---------------------------------------------------------------------------
// Each test above runs on both I/O paths

/// `pwritev::name` runs test `name(io)` on the pwritev backend,
/// `io_uring_path::name` on the io_uring backend's logic over a simulated
/// ring, seeded from the test's name.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod pwritev {
            $(#[test] fn $name() { super::$name(super::Io::Pwritev) })*
        }
        mod io_uring_path {
            $(#[test] fn $name() {
                super::$name(super::Io::ring(super::seed_of(stringify!($name))))
            })*
        }
    };
}

/// FNV-1a of a test's name: its ring's seed.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

on_both_paths!(
    fsync_failure_fails_the_wal_for_good,
    fsync_failure_reaches_every_concurrent_writer,
    fsync_failure_while_making_a_spare_is_reported,
    fsync_failure_in_the_prewriter_fails_the_wal,
    enospc_from_the_fsync_of_a_spare_is_fatal_not_full,
    enospc_for_a_new_segment_is_a_clean_full_error,
    eio_making_a_spare_is_an_io_error_not_full,
    compaction_after_full_lets_appends_go_on_without_prewriter,
    compaction_after_full_lets_appends_go_on_with_prewriter,
    enospc_on_a_write_drops_it_and_the_log_goes_on,
    eio_on_a_write_is_fatal_not_no_space,
    enospc_drops_every_write_queued_behind_it_and_undoes_them,
    enospc_on_a_write_that_starts_a_segment_removes_the_segment,
    compaction_keeps_the_segment_a_dropped_write_goes_back_to,
    failed_recycle_in_compaction_is_retried_by_the_next_compaction,
    failed_remove_in_compaction_is_retried_by_the_next_compaction,
    failed_directory_sync_in_compaction_fails_the_wal,
    try_write_hands_the_batch_back_instead_of_waiting,
    a_waiting_write_times_out_without_a_spare_segment,
    a_waiting_write_times_out_on_a_full_queue,
    compaction_waits_for_a_newer_snapshot_record_in_flight,
    writes_queued_behind_a_slow_disk_share_groups,
);

// ---------------------------------------------------------------------------
// (g) The io_uring path with groups in flight

/// Seeds per ring test: each draws another completion order and puts the
/// fault at another place in it.
const RING_SEEDS: u64 = 8;
/// Writes queued at once in a ring test: one 1500-byte entry each, two to a
/// group, so about eight groups, up to `groups_inflight_max` in flight.
const RING_BURST: u64 = 16;

/// Smallest groups, room for every burst in one segment.
fn ring_options() -> Options {
    Options {
        group_bytes_max: 4096,
        segment_size: 64 << 10,
        ..options(0)
    }
}

/// Opens a WAL on the io_uring path with `seed`, appends entries 1..=4
/// (acknowledged), holds the ring and queues entries 5.. (one write each,
/// [`RING_BURST`] of them) without waiting. Returns the WAL, every entry
/// written, the tickets of the burst and the op count before it.
fn ring_burst(
    sim: &SimStorage,
    ring: &SimRing,
    arm_fault: impl FnOnce(),
) -> (Wal, Vec<Entry>, Vec<Ticket>, usize) {
    let wal = open_on(sim, ring_options(), &Io::Ring(ring.clone())).unwrap();
    let mut written = append_acked(&wal, 4, 1, 100);
    let before = sim.op_count();
    arm_fault();
    ring.hold();
    let mut tickets = Vec::new();
    for index in 5..5 + RING_BURST {
        let batch = entries(index, index + 1, 1, 1500);
        tickets.push(wal.append(batch.clone()).unwrap());
        written.extend(batch);
    }
    ring.release();
    (wal, written, tickets, before)
}

/// Every crash image at every point of `sim`'s op log from `from` on
/// recovers entries `1..=n` of `written` for some `n` at least the last
/// index acknowledged by then: `acked` at `from`, then as
/// [`Op::Acknowledged`] says, where write `seq` ended at index
/// `seq + 3` (the ring tests' first write holds entries 1..=4).
fn every_crash_from_keeps_what_was_acknowledged(
    sim: &SimStorage,
    from: usize,
    written: &[Entry],
    mut acked: u64,
) -> usize {
    let ops = sim.ops();
    let mut checked = 0;
    for prefix in from..=ops.len() {
        if let Some(Op::Acknowledged(seq)) = prefix.checked_sub(1).map(|i| &ops[i]) {
            acked = acked.max(seq + 3);
        }
        for state in sim.crash_states(prefix, prefix as u64) {
            let wal = open(&state.storage, &Io::Pwritev).unwrap();
            let last = wal.last_index();
            assert!(
                last >= acked,
                "crash after {prefix} ops, image {}: last index {last}, {acked} acknowledged",
                state.kind
            );
            assert_eq!(
                wal.read(1, last + 1).unwrap(),
                written[..last as usize],
                "crash after {prefix} ops, image {}",
                state.kind
            );
            checked += 1;
        }
    }
    checked
}

/// The `nth` (0: the next) call a fault filter sees for a segment.
fn nth_segment(nth: usize) -> impl Fn(&Path) -> bool + Send + 'static {
    let seen = AtomicUsize::new(0);
    move |p| is_segment(p) && seen.fetch_add(1, Ordering::Relaxed) == nth
}

/// An fdatasync failing somewhere in a burst of groups in flight, their
/// fdatasyncs completing out of order: the WAL fails; the tickets
/// acknowledged are a prefix, and none of them is one whose success that
/// failure could have hidden (Linux hands a writeback error to whichever
/// fdatasync checks first: the simulated ring keeps a success only once
/// every fdatasync in flight with it succeeded, so every crash image,
/// torn ones included, at every point, shows each acknowledged write).
/// Nothing is retried or written after.
#[test]
fn ring_fsync_failure_with_groups_in_flight_fails_the_rest() {
    let mut on_ring = 0;
    let mut out_of_order = 0;
    for seed in 0..RING_SEEDS {
        let sim = SimStorage::new();
        let ring = SimRing::new(seed);
        let nth = (seed % 4) as usize;
        let (wal, written, tickets, before) = ring_burst(&sim, &ring, || {
            sim.fail_next_sync_where(libc::EIO, nth_segment(nth));
        });
        let results: Vec<_> = tickets.iter().map(|t| t.wait()).collect();
        let ok = results.iter().take_while(|r| r.is_ok()).count();
        assert!(ok < results.len(), "seed {seed}: nothing failed");
        for r in &results[ok..] {
            assert!(matches!(r, Err(Error::Failed { .. })), "seed {seed}: {r:?}");
        }
        assert!(!sim.sync_failure_pending());
        assert!(is_failed(wal.append(entries(30, 31, 1, 10))));
        let after = sim.op_count();
        assert!(is_failed(wal.close()));
        assert_eq!(
            sim.op_count(),
            after,
            "seed {seed}: nothing done after the failure"
        );
        assert!(group_writes(&sim.ops()[before..]) <= RING_BURST as usize);

        let n = every_crash_from_keeps_what_was_acknowledged(&sim, before, &written, 4);
        assert!(n >= 10, "seed {seed}: {n} images");
        // A restart finds every acknowledged entry.
        let wal = open(&sim, &Io::Pwritev).unwrap();
        assert!(wal.last_index() >= 4 + ok as u64);
        wal.close().unwrap();
        let stats = ring.stats();
        on_ring += stats.failed;
        out_of_order += stats.out_of_order;
    }
    assert!(
        on_ring >= RING_SEEDS / 2 && out_of_order > 0,
        "the failures hit the ring {on_ring} times, {out_of_order} out of order"
    );
}

/// A group's write running out of space (part way) while earlier groups'
/// fdatasyncs are in flight, completing out of order: those groups are
/// acknowledged, the failed write and every one queued after it answer
/// `NoSpace`, the log (live, and in every crash image from then on) is the
/// acknowledged prefix, and the WAL takes the dropped entries again.
#[test]
fn ring_enospc_with_groups_in_flight_drops_the_rest_and_goes_on() {
    let mut out_of_order = 0;
    for seed in 0..RING_SEEDS {
        let sim = SimStorage::new();
        let ring = SimRing::new(seed);
        let nth = 1 + (seed % 5) as usize;
        let kept = (seed as usize * 997) % 3000;
        let (wal, written, tickets, before) = ring_burst(&sim, &ring, || {
            sim.fail_next_write_where(libc::ENOSPC, kept, nth_segment(nth));
        });
        let results: Vec<_> = tickets.iter().map(|t| t.wait()).collect();
        let ok = results.iter().take_while(|r| r.is_ok()).count();
        assert!(
            ok > 0 && ok < results.len(),
            "seed {seed}: {ok} acknowledged"
        );
        let first_dropped = tickets[ok].seq();
        for r in &results[ok..] {
            assert!(
                matches!(r, Err(Error::NoSpace { first_seq, .. }) if *first_seq == first_dropped),
                "seed {seed}: {r:?}"
            );
        }
        let last = 4 + ok as u64;
        let want = (
            1,
            written[..last as usize].to_vec(),
            HardState::default(),
            None,
        );
        assert_eq!(log_of(&wal), want, "seed {seed}");
        let n = every_crash_from_keeps_what_was_acknowledged(&sim, before, &written, 4);
        assert!(n >= 10, "seed {seed}: {n} images");
        every_crash_recovers(&sim, &want, &Io::Pwritev);

        // The dropped entries, again.
        let again = written[last as usize..].to_vec();
        wal.append(again).unwrap().wait().unwrap();
        assert_eq!(wal.read(1, 5 + RING_BURST).unwrap(), written);
        wal.close().unwrap();
        let wal = open(&sim, &Io::Pwritev).unwrap();
        assert_eq!(wal.read(1, 5 + RING_BURST).unwrap(), written);
        wal.close().unwrap();
        out_of_order += ring.stats().out_of_order;
    }
    assert!(out_of_order > 0, "no fdatasync completed out of order");
}

// ---------------------------------------------------------------------------
// (c) Bad options

fn with(f: impl FnOnce(&mut Options)) -> Options {
    let mut o = options(0);
    f(&mut o);
    o
}

/// Every validated field, just outside its range: `InvalidOption` naming
/// it, before anything touches the disk.
#[test]
fn bad_options_name_the_field() {
    let cases: Vec<(Options, &str)> = vec![
        (with(|o| o.segment_size = (16 << 10) + 1), "segment_size"),
        (with(|o| o.segment_size = 12 << 10), "segment_size"),
        (with(|o| o.segment_size = 0), "segment_size"),
        (with(|o| o.segment_size = 4 << 30), "segment_size"),
        (with(|o| o.queue_depth = 0), "queue_depth"),
        (with(|o| o.queue_depth = (1 << 20) + 1), "queue_depth"),
        (with(|o| o.group_bytes_max = 4095), "group_bytes_max"),
        (
            with(|o| o.group_bytes_max = (256 << 20) + 1),
            "group_bytes_max",
        ),
        (with(|o| o.groups_inflight_max = 0), "groups_inflight_max"),
        (with(|o| o.groups_inflight_max = 65), "groups_inflight_max"),
        (with(|o| o.spare_segments = 65), "spare_segments"),
        (
            with(|o| o.submit_timeout = Duration::ZERO),
            "submit_timeout",
        ),
        (with(|o| o.wait_timeout = Duration::ZERO), "wait_timeout"),
        (
            with(|o| o.snapshot_meta_max = (16 << 10) / 2 - 304 + 1),
            "snapshot_meta_max",
        ),
        (
            with(|o| {
                o.segment_size = 64 << 20;
                o.snapshot_meta_max = 64 << 20;
            }),
            "snapshot_meta_max",
        ),
    ];
    for (opts, field) in cases {
        let sim = SimStorage::new();
        match open_with(&sim, opts.clone()) {
            Err(e @ Error::InvalidOption { field: f, .. }) => {
                assert_eq!(f, field, "{opts:?}");
                assert!(e.to_string().contains(field), "{e}");
                assert!(!e.is_fatal());
            }
            other => panic!("{field}: expected InvalidOption, got {other:?}"),
        }
        assert!(
            matches!(opts.validate(), Err(Error::InvalidOption { field: f, .. }) if f == field)
        );
        // Checked before anything touched the disk: not even the directory.
        assert_eq!(sim.op_count(), 0);
        assert!(
            sim.list(Path::new(DIR)).is_err(),
            "{field}: directory created"
        );
    }

    // The edges of each range are accepted.
    for opts in [
        Options::default(),
        options(0),
        with(|o| o.segment_size = (4 << 30) - 4096),
        with(|o| o.queue_depth = 1),
        with(|o| o.queue_depth = 1 << 20),
        with(|o| o.group_bytes_max = 4096),
        with(|o| o.group_bytes_max = 256 << 20),
        with(|o| o.groups_inflight_max = 1),
        with(|o| o.groups_inflight_max = 64),
        with(|o| o.spare_segments = 64),
        with(|o| o.submit_timeout = Duration::from_nanos(1)),
        with(|o| o.wait_timeout = Duration::from_nanos(1)),
        with(|o| o.snapshot_meta_max = (16 << 10) / 2 - 304),
    ] {
        opts.validate()
            .unwrap_or_else(|e| panic!("{opts:?} refused: {e}"));
    }

    // io_uring needs real file descriptors.
    let sim = SimStorage::new();
    match open_with(&sim, with(|o| o.backend = Backend::IoUring)) {
        Err(Error::InvalidOption { field, .. }) => assert_eq!(field, "backend"),
        other => panic!("expected InvalidOption backend, got {other:?}"),
    }
    // `Auto` on a disk without descriptors runs pwritev.
    let wal = open_with(&sim, with(|o| o.backend = Backend::Auto)).unwrap();
    assert_eq!(wal.backend(), Backend::Pwritev);
    wal.close().unwrap();
}

// ---------------------------------------------------------------------------
// (d) Media corruption

/// A log over three or more segments, every write acknowledged one at a
/// time (so each record's watermark covers the one before), closed.
fn written_log() -> (SimStorage, Vec<Entry>) {
    let sim = SimStorage::new();
    let wal = open(&sim, &Io::Pwritev).unwrap();
    let mut acked = Vec::new();
    while wal.segment_count() < 3 {
        acked.extend(append_acked(&wal, 2, 1, 300));
    }
    for _ in 0..8 {
        acked.extend(append_acked(&wal, 2, 1, 300));
    }
    wal.close().unwrap();
    (sim, acked)
}

fn expect_corruption(disk: &SimStorage, segment: &Path, offset: u64) {
    match open(disk, &Io::Pwritev) {
        Err(Error::Corruption {
            segment: s,
            offset: o,
            reason,
        }) => {
            assert_eq!((s.as_path(), o), (segment, offset), "{reason}");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("expected Corruption at {segment:?}:{offset}, got {e}"),
        Ok(wal) => panic!(
            "expected Corruption at {segment:?}:{offset}, opened a log of {}..={} ({:?})",
            wal.first_index(),
            wal.last_index(),
            wal.recovery_report()
        ),
    }
}

/// A flipped bit in a record of a sealed segment (its body, its header) or
/// in the segment's header is `Corruption` naming the segment and the
/// record's offset.
#[test]
fn bit_flip_in_a_sealed_segment_is_corruption() {
    let (sim, _) = written_log();
    let segments = segment_paths(&sim);
    assert!(segments.len() >= 3);
    for sealed in &segments[..2] {
        let recs = entries_records(&sim, sealed);
        assert!(recs.len() >= 4, "{} records", recs.len());
        for rec in [&recs[0], &recs[recs.len() / 2], recs.last().unwrap()] {
            // Body, body checksum, length, watermark.
            for (at, bit) in [(24 + 20, 3), (8, 0), (4, 6), (16, 1)] {
                let disk = copy(&sim);
                disk.flip_bit(sealed, rec.offset + at, bit);
                expect_corruption(&disk, sealed, rec.offset);
            }
        }
        // The segment header: its sequence number, its salt.
        for (at, bit) in [(16, 0), (33, 5)] {
            let disk = copy(&sim);
            disk.flip_bit(sealed, at, bit);
            expect_corruption(&disk, sealed, 0);
        }
    }
    // The undamaged copy opens.
    open(&copy(&sim), &Io::Pwritev).unwrap().close().unwrap();
}

/// A flipped bit in a durable record in the middle of the last segment,
/// with later records after it, is `Corruption` at that record: the later
/// records' watermarks prove it had been durable, so it is not a torn tail.
#[test]
fn bit_flip_mid_last_segment_is_corruption() {
    let (sim, _) = written_log();
    let last = segment_paths(&sim).pop().unwrap();
    let recs = entries_records(&sim, &last);
    assert!(recs.len() >= 6, "{} records", recs.len());
    for rec in &recs[..recs.len() - 1] {
        for (at, bit) in [(24 + 30, 2), (0, 7), (12, 0)] {
            let disk = copy(&sim);
            disk.flip_bit(&last, rec.offset + at, bit);
            expect_corruption(&disk, &last, rec.offset);
        }
    }
}

/// The one case recovery cannot tell from a torn write (see the recovery
/// docs): the very last record of the last segment damaged. It is cut off,
/// and the report says where; the rest is intact and the log goes on.
#[test]
fn bit_flip_in_the_last_record_is_reported_as_a_cut_tail() {
    let (sim, acked) = written_log();
    let last = segment_paths(&sim).pop().unwrap();
    let rec = entries_records(&sim, &last).pop().unwrap();
    let (first, count) = format::entries_span(&rec.body).unwrap();
    let disk = copy(&sim);
    disk.flip_bit(&last, rec.offset + 24 + 40, 4);
    let wal = open(&disk, &Io::Pwritev).unwrap();
    assert_eq!(
        wal.recovery_report().truncated_tail,
        Some((last.clone(), rec.offset))
    );
    assert_eq!(wal.last_index(), first - 1);
    assert_eq!(
        wal.read(1, first).unwrap(),
        acked[..(first - 1) as usize].to_vec()
    );
    assert_eq!(first + count - 1, acked.len() as u64);
    wal.append(entries(first, first + 1, 2, 10))
        .unwrap()
        .wait()
        .unwrap();
    wal.close().unwrap();
    let wal = open(&disk, &Io::Pwritev).unwrap();
    assert_eq!(wal.last_index(), first);
    wal.close().unwrap();
}

/// Reading an entry whose durable record was damaged after it was written
/// is `Corruption` naming the segment and the record, on the live WAL.
#[test]
fn bit_flip_is_corruption_on_read() {
    let sim = SimStorage::new();
    let wal = open(&sim, &Io::Pwritev).unwrap();
    let mut acked = Vec::new();
    while wal.segment_count() < 3 {
        acked.extend(append_acked(&wal, 2, 1, 300));
    }
    // One more write after everything is durable: the WAL drops its
    // in-memory copies of durable records, so reads go to the disk.
    acked.extend(append_acked(&wal, 1, 1, 10));
    acked.extend(append_acked(&wal, 1, 1, 10));
    let segments = segment_paths(&sim);
    let sealed = &segments[1];
    let recs = entries_records(&sim, sealed);
    let rec = &recs[recs.len() / 2];
    let (first, count) = format::entries_span(&rec.body).unwrap();
    assert_eq!(
        wal.read(first, first + count).unwrap(),
        acked[(first - 1) as usize..(first + count - 1) as usize].to_vec()
    );
    sim.flip_bit(sealed, rec.offset + 24 + 17, 6);
    for (lo, hi) in [
        (first, first + count),
        (first + count - 1, first + count + 3),
        (1, wal.last_index() + 1),
    ] {
        match wal.read(lo, hi) {
            Err(Error::Corruption {
                segment, offset, ..
            }) => {
                assert_eq!((segment.as_path(), offset), (sealed.as_path(), rec.offset));
            }
            other => panic!("read({lo}, {hi}): expected Corruption, got {other:?}"),
        }
    }
    // Entries outside the damaged record still read.
    assert_eq!(
        wal.read(1, first).unwrap(),
        acked[..(first - 1) as usize].to_vec()
    );
    wal.close().unwrap();
    expect_corruption(&sim, sealed, rec.offset);
}
