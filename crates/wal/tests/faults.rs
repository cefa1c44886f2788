//! Faults on the simulated disk: a failing fdatasync, a full disk, bad
//! options and media corruption (bit flips in synced data).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_wal::format::{self, RecordType, SegmentHeader, SEGMENT_HEADER_LEN};
use skiff_wal::sim::{Op, SimStorage};
use skiff_wal::{Backend, Entry, Error, HardState, Options, SnapshotMeta, Storage, Wal};

mod common;
use common::{open_with, options, DIR};

fn open(sim: &SimStorage) -> skiff_wal::Result<Wal> {
    open_with(sim, options(0))
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
#[test]
fn fsync_failure_fails_the_wal_for_good() {
    let sim = SimStorage::new();
    let wal = open(&sim).unwrap();
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
    // disk; in particular no fdatasync ever succeeds.
    let ops = sim.ops();
    assert_eq!(ops.len(), after_failure, "nothing done after the failure");
    let tail = &ops[before..];
    assert!(
        !tail.iter().any(|op| matches!(op, Op::SyncData { .. })),
        "no fdatasync after the failure: {:?}",
        tail.iter().map(op_name).collect::<Vec<_>>()
    );
    assert_eq!(
        tail.iter()
            .filter(|op| matches!(op, Op::Write { .. }))
            .count(),
        1,
        "one group write, not retried: {:?}",
        tail.iter().map(op_name).collect::<Vec<_>>()
    );

    // Every crash image keeps what was acknowledged.
    for state in sim.crash_states(sim.op_count(), 3) {
        let wal = open(&state.storage).unwrap();
        assert!(wal.last_index() >= 11, "{}", state.kind);
        assert_eq!(wal.read(6, 12).unwrap(), {
            let mut all = acked.clone();
            all.extend(entries(11, 12, 1, 100));
            all.split_off(5)
        });
    }
    // A restarted process recovers everything acknowledged and goes on.
    let wal = open(&sim).unwrap();
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
#[test]
fn fsync_failure_reaches_every_concurrent_writer() {
    let sim = SimStorage::new();
    let wal = open(&sim).unwrap();
    append_acked(&wal, 5, 1, 50);
    wal.close().unwrap();
    let wal = Arc::new(open(&sim).unwrap());
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
    assert!(
        ops[before..]
            .iter()
            .filter(|op| matches!(op, Op::Write { .. }))
            .count()
            <= 1
    );
    let wal = Arc::try_unwrap(wal).unwrap();
    assert!(is_failed(wal.close()));
}

/// A failed fdatasync while making a spare on the writer's thread (no
/// pre-writer) is reported to the writer as a fatal error, never swallowed:
/// the write is not queued, no partial spare is left, and nothing
/// acknowledged is lost.
#[test]
fn fsync_failure_while_making_a_spare_is_reported() {
    let sim = SimStorage::new();
    let wal = open(&sim).unwrap();
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
    let wal = open(&sim).unwrap();
    assert_eq!(wal.read(1, 6).unwrap(), acked);
    wal.close().unwrap();
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
#[test]
fn enospc_for_a_new_segment_is_a_clean_full_error() {
    let sim = SimStorage::new();
    let wal = open(&sim).unwrap();
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
    let wal = open(&sim).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    assert_eq!(wal.hard_state(), hs);
    drop(wal);
    // And once there is room again, the log goes on.
    sim.set_capacity(None);
    let wal = open(&sim).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    assert_eq!(wal.hard_state(), hs);
    let last = wal.last_index();
    let more = entries(last + 1, last + 3, 2, 2000);
    wal.append(more.clone()).unwrap().wait().unwrap();
    acked.extend(more);
    wal.close().unwrap();
    let wal = open(&sim).unwrap();
    assert_eq!(wal.read(1, wal.last_index() + 1).unwrap(), acked);
    wal.close().unwrap();
}

/// On the live WAL: after `Full`, a snapshot and compaction free segments
/// and appends succeed again, first on the recycled segment, then on new
/// spares made in the space freed.
fn compaction_after_full_lets_appends_go_on(spare_segments: usize) {
    let sim = SimStorage::new();
    let wal = open_with(&sim, options(spare_segments)).unwrap();
    let mut acked = append_acked(&wal, 20, 1, 100);
    acked.extend(fill_until_rotation_needed(&wal, 1));
    acked.extend(fill_until_rotation_needed(&wal, 1));
    if spare_segments > 0 {
        // Let the pre-writer have its spare ready before the disk fills.
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
    let wal = open_with(&sim, options(spare_segments)).unwrap();
    assert_eq!(wal.snapshot(), Some(meta));
    assert_eq!(wal.first_index(), snap_index + 1);
    assert_eq!(
        wal.read(snap_index + 1, wal.last_index() + 1).unwrap(),
        acked
    );
    wal.close().unwrap();
}

#[test]
fn compaction_after_full_lets_appends_go_on_without_prewriter() {
    compaction_after_full_lets_appends_go_on(0);
}

#[test]
fn compaction_after_full_lets_appends_go_on_with_prewriter() {
    compaction_after_full_lets_appends_go_on(1);
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
    let wal = open(&sim).unwrap();
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
    match open(disk) {
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
    open(&copy(&sim)).unwrap().close().unwrap();
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
    let wal = open(&disk).unwrap();
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
    let wal = open(&disk).unwrap();
    assert_eq!(wal.last_index(), first);
    wal.close().unwrap();
}

/// Reading an entry whose durable record was damaged after it was written
/// is `Corruption` naming the segment and the record, on the live WAL.
#[test]
fn bit_flip_is_corruption_on_read() {
    let sim = SimStorage::new();
    let wal = open(&sim).unwrap();
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
