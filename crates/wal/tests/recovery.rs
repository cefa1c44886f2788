//! Recovery on real files: one test per row of the decision table in
//! `skiff_wal::recovery`, each producing its on-disk situation by writing
//! with the WAL, closing it, and editing the files with `std::fs`.
//!
//! Offsets are found by scanning the segment with `format::read_record`
//! (segment header of 48 bytes, then 8-byte aligned records), so every
//! `Corruption` is checked against the exact segment and record offset.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use skiff_wal::format::{
    self, frame_into, read_record, Body, RecordHeader, RecordType, SegmentHeader,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use skiff_wal::{Backend, Entry, Error, HardState, Options, SnapshotMeta, Wal, WriteBatch};

const SEGMENT_SIZE: u64 = 64 << 10;

fn opts() -> Options {
    Options {
        segment_size: SEGMENT_SIZE,
        snapshot_meta_max: 4096,
        backend: Backend::Pwritev,
        ..Options::default()
    }
}

fn open(dir: &Path) -> Wal {
    Wal::open(dir, opts()).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..hi)
        .map(|i| Entry {
            index: i,
            term,
            payload: Bytes::from(format!("e{i}-{}", "p".repeat((i * 37 % 150 + 40) as usize))),
        })
        .collect()
}

/// Appends `lo..hi` in batches of `per`, waiting for each batch before the
/// next so that every record's watermark covers the one before it.
fn append_synced(wal: &Wal, lo: u64, hi: u64, per: u64, term: u64) {
    let mut i = lo;
    while i < hi {
        let j = (i + per).min(hi);
        wal.append(entries(i, j, term)).unwrap().wait().unwrap();
        i = j;
    }
}

/// A WAL in a fresh directory holding `1..=last` (term 1), closed.
fn log_with(last: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    append_synced(&wal, 1, last + 1, 4, 1);
    wal.close().unwrap();
    dir
}

/// Segment files (not spares) in sequence order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".wal") && !name.starts_with("spare-")
        })
        .collect();
    v.sort();
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn segment_header(path: &Path) -> SegmentHeader {
    let bytes = fs::read(path).unwrap();
    SegmentHeader::decode(&bytes[..SEGMENT_HEADER_LEN]).unwrap()
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:020}-{first_index:020}.wal")
}

/// The records of a segment that verify, in order, until the first that
/// does not: (offset, header, body).
fn records(path: &Path) -> Vec<(u64, RecordHeader, Bytes)> {
    let bytes = fs::read(path).unwrap();
    let salt = segment_header(path).salt;
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while let Ok((h, body)) = read_record(&bytes, at, salt) {
        out.push((at as u64, h, Bytes::copy_from_slice(body)));
        at += h.framed_len();
    }
    out
}

/// Where the verified records of a segment end.
fn records_end(path: &Path) -> u64 {
    records(path)
        .last()
        .map_or(SEGMENT_HEADER_LEN as u64, |(o, h, _)| {
            o + h.framed_len() as u64
        })
}

/// The Entries records of a segment: (offset, header, first index, count).
fn entry_records(path: &Path) -> Vec<(u64, RecordHeader, u64, u64)> {
    records(path)
        .into_iter()
        .filter(|(_, h, _)| h.kind == RecordType::Entries as u8)
        .map(|(o, h, b)| {
            let (first, n) = format::entries_span(&b).unwrap();
            (o, h, first, n)
        })
        .collect()
}

fn xor_byte(path: &Path, offset: u64, mask: u8) {
    let f = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

/// Opens and expects `Corruption` at exactly `segment` and `offset`;
/// returns the reason.
fn expect_corruption(dir: &Path, segment: &Path, offset: u64) -> String {
    match Wal::open(dir, opts()) {
        Err(Error::Corruption {
            segment: s,
            offset: o,
            reason,
        }) => {
            assert_eq!(
                (s.as_path(), o),
                (segment, offset),
                "corruption reported at the wrong place ({reason})"
            );
            reason
        }
        Err(e) => panic!(
            "expected corruption in {} at {offset}, got {e}",
            segment.display()
        ),
        Ok(w) => panic!(
            "expected corruption in {} at {offset}, but the WAL opened with {:?} and last index {}",
            segment.display(),
            w.recovery_report(),
            w.last_index()
        ),
    }
}

/// Expects a torn tail cut at `offset` of `segment`, leaving `1..=last`;
/// then checks that appends go to a new segment and that the next open is
/// clean and has everything.
fn expect_torn_tail(dir: &Path, segment: &Path, offset: u64, last: u64) {
    let segs_before = segments(dir);
    let wal = open(dir);
    let report = wal.recovery_report().clone();
    assert_eq!(
        report.truncated_tail,
        Some((segment.to_path_buf(), offset)),
        "{report:?}"
    );
    assert_eq!(report.segments, segs_before.len());
    assert_eq!(wal.last_index(), last);
    assert_eq!(wal.read(1, last + 1).unwrap(), entries(1, last + 1, 1));
    assert_eq!(wal.segment_count(), segs_before.len());
    wal.append(entries(last + 1, last + 3, 2))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        wal.segment_count(),
        segs_before.len() + 1,
        "appends after a torn tail go to a new segment"
    );
    wal.close().unwrap();

    let segs = segments(dir);
    assert_eq!(segs.len(), segs_before.len() + 1);
    assert_eq!(
        segment_header(segs.last().unwrap()).prev_end,
        offset,
        "the new segment seals the torn one where it was cut"
    );
    let wal = open(dir);
    assert_eq!(
        wal.recovery_report().truncated_tail,
        None,
        "clean on reopen"
    );
    assert_eq!(wal.recovery_report().segments, segs.len());
    assert_eq!(wal.last_index(), last + 2);
    let mut want = entries(1, last + 1, 1);
    want.extend(entries(last + 1, last + 3, 2));
    assert_eq!(wal.read(1, last + 3).unwrap(), want);
}

/// Expects a clean end with `1..=last`, appends continuing in the same
/// last segment at `end`.
fn expect_clean_end(dir: &Path, end: u64, last: u64) {
    let segs = segments(dir);
    let wal = open(dir);
    let report = wal.recovery_report().clone();
    assert_eq!(report.truncated_tail, None, "{report:?}");
    assert_eq!(report.segments, segs.len());
    assert_eq!(report.unstarted_segments, 0);
    assert_eq!(wal.segment_count(), segs.len());
    assert_eq!(wal.last_index(), last);
    assert_eq!(wal.read(1, last + 1).unwrap(), entries(1, last + 1, 1));
    wal.append(entries(last + 1, last + 2, 1))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(wal.segment_count(), segs.len(), "appends continue in place");
    wal.close().unwrap();
    assert_eq!(segments(dir), segs, "no new segment was started");
    let recs = entry_records(segs.last().unwrap());
    let (off, _, first, n) = *recs.last().unwrap();
    assert_eq!(
        (off, first, n),
        (end, last + 1, 1),
        "the append landed at the old end"
    );
    let wal = open(dir);
    assert_eq!(wal.recovery_report().truncated_tail, None);
    assert_eq!(wal.read(1, last + 2).unwrap(), entries(1, last + 2, 1));
}

// ---------------------------------------------------------------------
// The layout the tests rely on.

#[test]
fn first_segment_layout_is_header_checkpoint_then_records() {
    let dir = log_with(8);
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 1);
    assert_eq!(
        segs[0].file_name().unwrap().to_str().unwrap(),
        segment_name(1, 1)
    );
    let h = segment_header(&segs[0]);
    assert_eq!((h.seq, h.first_index, h.prev_end), (1, 1, 0));
    let recs = records(&segs[0]);
    // The checkpoint hard state (24-byte body) right after the 48-byte
    // header, then the first entries record at 48 + 48.
    assert_eq!(recs[0].0, 48);
    assert_eq!(recs[0].1.kind, RecordType::HardState as u8);
    assert_eq!(recs[0].1.framed_len(), 48);
    assert_eq!(recs[1].0, 96);
    assert_eq!(recs[1].1.kind, RecordType::Entries as u8);
    assert_eq!(recs[1].1.watermark, 0);
    assert_eq!(format::entries_span(&recs[1].2).unwrap(), (1, 4));
    // The second batch was encoded after the first was durable.
    assert_eq!(recs[2].0, 96 + recs[1].1.framed_len() as u64);
    assert_eq!(recs[2].1.watermark, recs[2].0);
    for (o, h, _) in &recs {
        assert_eq!(o % 8, 0);
        assert!(h.framed_len() % 8 == 0);
    }
}

// ---------------------------------------------------------------------
// Row: any segment | a later valid record whose watermark is > S |
// Corruption { segment, offset }: S had been durable. The offset named is
// that of the record that stopped the scan (S itself for a one-record
// write).

#[test]
fn any_segment_later_record_with_watermark_beyond_damage_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "64 KiB segments rotate: {segs:?}");
    let last = segs.last().unwrap();
    let recs = entry_records(last);
    assert!(recs.len() >= 6);
    // Damage a record in the middle of the last segment, in its body and
    // (separately) in its header: records written after it prove it had
    // been durable.
    let (s, h, _, _) = recs[recs.len() / 2];
    assert!(
        records(last)
            .iter()
            .any(|(_, later, _)| later.watermark > s),
        "a later record's watermark covers the damaged one"
    );
    for (at, why) in [
        (
            s + RECORD_HEADER_LEN as u64 + 5,
            "record body checksum mismatch",
        ),
        (s + 2, "record header checksum mismatch"),
        (s + 17, "record header checksum mismatch"),
    ] {
        xor_byte(last, at, 0x40);
        let reason = expect_corruption(dir.path(), last, s);
        assert!(reason.contains(why), "flip at {at}: {reason}");
        xor_byte(last, at, 0x40);
    }
    // The last body byte of the record, too.
    let end = s + RECORD_HEADER_LEN as u64 + u64::from(h.body_len) - 1;
    xor_byte(last, end, 0x01);
    expect_corruption(dir.path(), last, s);
    xor_byte(last, end, 0x01);
    // Undamaged, it opens cleanly.
    expect_clean_end(dir.path(), records_end(last), 1200);
}

#[test]
fn any_segment_bit_flip_in_every_proven_record_of_the_last_segment_is_corruption() {
    let dir = log_with(200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let recs = records(last);
    // Every record but the last is followed by one whose watermark is
    // beyond it (each batch was waited for before the next was encoded).
    for (i, (s, h, _)) in recs[..recs.len() - 1].iter().enumerate() {
        assert!(recs[i + 1..].iter().any(|(_, l, _)| l.watermark > *s));
        let body_len = u64::from(h.body_len);
        for at in [
            *s,
            s + 9,
            s + 23,
            s + 24,
            s + 24 + body_len / 2,
            s + 23 + body_len,
        ] {
            xor_byte(last, at, 0x10);
            expect_corruption(dir.path(), last, *s);
            xor_byte(last, at, 0x10);
        }
    }
}

#[test]
fn any_segment_damage_inside_a_proven_write_names_the_damaged_record() {
    // Writes of several records (truncate, entries, hard state) with
    // writes after them that prove them durable, rotating through several
    // segments: damage to any record of such a write is corruption at that
    // record, in a sealed segment and in the last one.
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let mut next = 1;
    while wal.segment_count() < 3 || next % 40 != 1 {
        wal.write(WriteBatch {
            truncate_from: Some(next),
            entries: entries(next, next + 4, 1),
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: next,
            }),
            ..WriteBatch::default()
        })
        .unwrap()
        .wait()
        .unwrap();
        next += 4;
    }
    append_synced(&wal, next, next + 8, 4, 1);
    wal.close().unwrap();
    let segs = segments(dir.path());
    for seg in [&segs[0], segs.last().unwrap()] {
        let recs = records(seg);
        // The first write whose records all follow the checkpoint and
        // the segment's first write.
        let i = recs
            .iter()
            .position(|(o, h, _)| h.kind == RecordType::Truncate as u8 && *o > 200)
            .unwrap();
        let write = &recs[i..i + 3];
        assert!(write[0].1.more() && write[1].1.more() && !write[2].1.more());
        for (o, h, _) in write {
            let at = o + RECORD_HEADER_LEN as u64 + u64::from(h.body_len) - 1;
            xor_byte(seg, at, 0x20);
            expect_corruption(dir.path(), seg, *o);
            xor_byte(seg, at, 0x20);
        }
    }
    expect_clean_end(dir.path(), records_end(segs.last().unwrap()), next + 7);
}

// ---------------------------------------------------------------------
// Row: sealed (not last) | S == prev_end in the next segment's header |
// clean end of a sealed segment.

#[test]
fn sealed_segment_ending_at_prev_end_is_a_clean_end() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    for w in segs.windows(2) {
        assert_eq!(
            segment_header(&w[1]).prev_end,
            records_end(&w[0]),
            "each segment is sealed where its records end"
        );
    }
    // Whatever lies past the seal point of a sealed segment is not read:
    // garbage there changes nothing.
    let seal = segment_header(&segs[1]).prev_end;
    write_at(&segs[0], seal, &[0xA5; 200]);
    write_at(&segs[0], SEGMENT_SIZE - 64, &[0x5A; 64]);
    expect_clean_end(dir.path(), records_end(segs.last().unwrap()), 1200);
}

// ---------------------------------------------------------------------
// Row: sealed (not last) | S != prev_end | Corruption.

#[test]
fn sealed_segment_ending_before_prev_end_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let recs = entry_records(&segs[0]);
    let (s, _, _, _) = recs[recs.len() / 3];
    // A flipped byte in a record of a sealed segment.
    xor_byte(&segs[0], s + 30, 0x02);
    expect_corruption(dir.path(), &segs[0], s);
    xor_byte(&segs[0], s + 30, 0x02);
    // Zeroed from a record boundary to the end: a sealed segment is
    // complete, so this is not a clean end.
    let (z, _, _, _) = recs[recs.len() - 2];
    let saved = fs::read(&segs[0]).unwrap();
    write_at(&segs[0], z, &vec![0u8; (SEGMENT_SIZE - z) as usize]);
    expect_corruption(dir.path(), &segs[0], z);
    fs::write(&segs[0], &saved).unwrap();
    // Zeroed mid-record (a torn-looking write inside a sealed segment).
    let (t, h, _, _) = recs[recs.len() - 1];
    let mid = t + RECORD_HEADER_LEN as u64 + u64::from(h.body_len) / 2;
    write_at(&segs[0], mid, &vec![0u8; (SEGMENT_SIZE - mid) as usize]);
    expect_corruption(dir.path(), &segs[0], t);
    fs::write(&segs[0], &saved).unwrap();
    expect_clean_end(dir.path(), records_end(segs.last().unwrap()), 1200);
}

#[test]
fn sealed_segment_bit_flip_in_any_record_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let mut checked = 0;
    for seg in &segs[..2] {
        let recs = records(seg);
        assert!(recs.len() > 50);
        // Every record (checkpoint included), at several places each:
        // checksum, length, body checksum, type, watermark, first, middle
        // and last body byte.
        for (s, h, _) in &recs {
            let body_len = u64::from(h.body_len);
            let body = s + RECORD_HEADER_LEN as u64;
            for (at, bit) in [
                (*s, 0),
                (s + 5, 3),
                (s + 10, 7),
                (s + 12, 1),
                (s + 20, 6),
                (body, 0),
                (body + body_len / 2, 4),
                (body + body_len - 1, 7),
            ] {
                xor_byte(seg, at, 1 << bit);
                expect_corruption(dir.path(), seg, *s);
                xor_byte(seg, at, 1 << bit);
                checked += 1;
            }
        }
    }
    assert!(checked > 400);
    let wal = open(dir.path());
    assert_eq!(wal.read(1, 1201).unwrap(), entries(1, 1201, 1));
}

// ---------------------------------------------------------------------
// Row: last | zeros, or bytes that verify as no record of this
// incarnation (stale records of a recycled file, a header torn before any
// of it landed) | clean end: appends continue at S.

#[test]
fn last_segment_zeros_after_end_is_a_clean_end() {
    let dir = log_with(300);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    let tail = fs::read(last).unwrap()[end as usize..].to_vec();
    assert!(tail.iter().all(|&b| b == 0), "pre-written zeros after S");
    expect_clean_end(dir.path(), end, 300);
}

#[test]
fn last_segment_zero_header_then_stale_bytes_of_an_earlier_incarnation_is_a_clean_end() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    // Past the end, after a zeroed record header: the old incarnation's
    // records at their old offsets, under another salt.
    let old = fs::read(&segs[0]).unwrap();
    assert_ne!(segment_header(&segs[0]).salt, segment_header(last).salt);
    let from = end as usize + RECORD_HEADER_LEN;
    assert!(old[from..from + 64].iter().any(|&b| b != 0));
    write_at(last, from as u64, &old[from..]);
    expect_clean_end(dir.path(), end, 1200);
}

#[test]
fn last_segment_garbage_after_the_last_record_is_a_clean_end() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    // Bytes that verify as no record of this incarnation past the end.
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 131 + 7) as u8 | 1).collect();
    write_at(last, end, &garbage);
    expect_clean_end(dir.path(), end, 1200);
}

#[test]
fn last_segment_record_whose_header_never_landed_is_a_clean_end_without_it() {
    // The last write's body reached the disk but its header did not (the
    // sectors of one write land in any order): nothing there verifies as
    // a record of this incarnation, and the write is not in the log.
    let dir = log_with(100);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let (s, _, first, _) = *entry_records(last).last().unwrap();
    let stale: Vec<u8> = (0..RECORD_HEADER_LEN as u8).map(|i| i ^ 0x5c).collect();
    write_at(last, s, &stale);
    expect_clean_end(dir.path(), s, first - 1);
}

#[test]
fn last_segment_record_with_a_half_written_header_is_a_clean_end_without_it() {
    let dir = log_with(100);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let (s, _, first, _) = *entry_records(last).last().unwrap();
    // Only the first 8 bytes of the record header were written.
    write_at(last, s + 8, &[0u8; 16]);
    expect_clean_end(dir.path(), s, first - 1);
}

#[test]
fn last_segment_recycled_by_compaction_reopens_as_a_clean_end() {
    // The same situation produced by the WAL itself: with no pre-writer, a
    // compacted segment is recycled into the next new segment, whose end
    // then lies on the old incarnation's bytes.
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        spare_segments: 0,
        ..opts()
    };
    let wal = Wal::open(dir.path(), o.clone()).unwrap();
    append_synced(&wal, 1, 1201, 4, 1);
    let n = wal.segment_count();
    assert!(n >= 3);
    wal.save_snapshot(SnapshotMeta {
        index: 1000,
        term: 1,
        data: Bytes::from_static(b"state"),
    })
    .unwrap()
    .wait()
    .unwrap();
    assert!(wal.compact(1000).unwrap() >= 1);
    // Fill the current last segment and start a new one on the recycled
    // file; stop well short of the old incarnation's end.
    let before = wal.segment_count();
    let mut next = 1201;
    while wal.segment_count() == before {
        append_synced(&wal, next, next + 4, 4, 1);
        next += 4;
    }
    append_synced(&wal, next, next + 8, 4, 1);
    let last_index = wal.last_index();
    wal.close().unwrap();
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    let bytes = fs::read(last).unwrap();
    assert!(
        bytes[end as usize..].iter().any(|&b| b != 0),
        "the last segment is a recycled file with stale bytes past its end"
    );

    let wal = Wal::open(dir.path(), o.clone()).unwrap();
    assert_eq!(
        wal.recovery_report().truncated_tail,
        None,
        "stale bytes of an earlier incarnation are a clean end"
    );
    assert_eq!(wal.last_index(), last_index);
    let count = wal.segment_count();
    wal.append(entries(last_index + 1, last_index + 2, 1))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(wal.segment_count(), count, "appends continue in place");
}

// ---------------------------------------------------------------------
// Row: last | a record of this incarnation that fails (torn body), part of
// a write (its last record missing), or valid records with watermark <= S
// after it | torn tail: truncated at S; appends go to a new segment.

#[test]
fn last_segment_record_torn_mid_body_is_a_torn_tail() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let (s, h, first, _) = *entry_records(last).last().unwrap();
    // The second half of the last record's body never reached the disk.
    let mid = s + RECORD_HEADER_LEN as u64 + u64::from(h.body_len) / 2;
    write_at(
        last,
        mid,
        &vec![0u8; (h.framed_len() as u64 - (mid - s)) as usize],
    );
    expect_torn_tail(dir.path(), last, s, first - 1);
}

/// A log of `1..=100` whose last write is one batch of two records: the
/// entries `101..=104` (flagged MORE) and a hard state. Returns the
/// directory, the hard state before that write, and the two records'
/// (offset, header).
fn log_ending_with_a_two_record_write() -> (tempfile::TempDir, HardState, [(u64, RecordHeader); 2])
{
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    append_synced(&wal, 1, 101, 4, 1);
    let hs1 = HardState {
        term: 1,
        vote: 1,
        commit: 50,
    };
    wal.save_hard_state(hs1).unwrap().wait().unwrap();
    wal.write(WriteBatch {
        entries: entries(101, 105, 1),
        hard_state: Some(HardState {
            term: 2,
            vote: 2,
            commit: 100,
        }),
        ..WriteBatch::default()
    })
    .unwrap()
    .wait()
    .unwrap();
    wal.close().unwrap();
    let last = segments(dir.path()).last().unwrap().clone();
    let recs = records(&last);
    let n = recs.len();
    let (e, h) = (recs[n - 2].0, recs[n - 2].1);
    let (o, hh) = (recs[n - 1].0, recs[n - 1].1);
    assert_eq!(h.kind, RecordType::Entries as u8);
    assert!(
        h.more(),
        "the entries record links to the next of its write"
    );
    assert_eq!(hh.kind, RecordType::HardState as u8);
    assert!(!hh.more(), "the last record of a write ends it");
    assert_eq!(h.watermark, hh.watermark, "one write, one watermark");
    (dir, hs1, [(e, h), (o, hh)])
}

#[test]
fn last_segment_write_missing_its_last_record_is_a_torn_tail() {
    let (dir, hs1, [(s, _), (o, hh)]) = log_ending_with_a_two_record_write();
    let last = segments(dir.path()).last().unwrap().clone();
    // The write's first record landed, its last did not.
    write_at(&last, o, &vec![0u8; hh.framed_len()]);
    {
        let wal = open(dir.path());
        assert_eq!(
            wal.recovery_report().truncated_tail,
            Some((last.clone(), s))
        );
        assert_eq!(wal.last_index(), 100, "no part of the write is applied");
        assert_eq!(wal.hard_state(), hs1);
    }
    // The same with the last record torn in its body.
    let (dir, hs1, [(s, _), (o, hh)]) = log_ending_with_a_two_record_write();
    let last = segments(dir.path()).last().unwrap().clone();
    write_at(
        &last,
        o + RECORD_HEADER_LEN as u64 + 8,
        &vec![0u8; hh.framed_len() - 32],
    );
    let wal = open(dir.path());
    assert_eq!(
        wal.recovery_report().truncated_tail,
        Some((last.clone(), s))
    );
    assert_eq!(wal.last_index(), 100);
    assert_eq!(wal.hard_state(), hs1);
    drop(wal);
    expect_torn_tail(dir.path(), &last, s, 100);
}

#[test]
fn last_segment_valid_records_with_watermark_not_beyond_damage_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    append_synced(&wal, 1, 101, 4, 1);
    let hs1 = HardState {
        term: 1,
        vote: 1,
        commit: 50,
    };
    wal.save_hard_state(hs1).unwrap().wait().unwrap();
    // One write, several records: all carry the same watermark, the
    // write's own offset.
    let hs2 = HardState {
        term: 2,
        vote: 2,
        commit: 100,
    };
    wal.write(WriteBatch {
        entries: entries(101, 105, 1),
        hard_state: Some(hs2),
        ..WriteBatch::default()
    })
    .unwrap()
    .wait()
    .unwrap();
    wal.close().unwrap();

    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let recs = records(last);
    let n = recs.len();
    let (s, h, _) = &recs[n - 2];
    let (_, hs_rec, _) = &recs[n - 1];
    assert_eq!(h.kind, RecordType::Entries as u8);
    assert_eq!(hs_rec.kind, RecordType::HardState as u8);
    assert!(hs_rec.watermark <= *s, "the later record does not prove S");
    // Damage the entries record: the valid hard state after it is of the
    // same incarnation but proves nothing.
    xor_byte(last, s + 40, 0x08);
    let segs_before = segments(dir.path());
    let wal = open(dir.path());
    assert_eq!(
        wal.recovery_report().truncated_tail,
        Some((last.clone(), *s))
    );
    assert_eq!(wal.last_index(), 100);
    assert_eq!(wal.hard_state(), hs1, "records after S are cut off too");
    wal.append(entries(101, 102, 2)).unwrap().wait().unwrap();
    assert_eq!(wal.segment_count(), segs_before.len() + 1);
    wal.close().unwrap();
    let wal = open(dir.path());
    assert_eq!(wal.recovery_report().truncated_tail, None);
    assert_eq!(wal.hard_state(), hs1);
    assert_eq!(wal.read(100, 102).unwrap()[1], entries(101, 102, 2)[0]);
}

#[test]
fn last_segment_damage_to_the_very_last_record_is_truncated_not_returned() {
    // The one case recovery cannot tell from a torn write: damage to the
    // last durable record with nothing written after it.
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let (s, _, first, _) = *entry_records(last).last().unwrap();
    xor_byte(last, s + RECORD_HEADER_LEN as u64 + 3, 0x80);
    let wal = open(dir.path());
    assert_eq!(
        wal.recovery_report().truncated_tail,
        Some((last.clone(), s))
    );
    assert_eq!(wal.last_index(), first - 1, "the damaged entries are gone");
    assert!(matches!(
        wal.read(first, first + 1),
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(wal.term(first), Err(Error::Unavailable { .. })));
    drop(wal);

    // Zeroed instead of flipped: it reads as the end of the log.
    let dir = log_with(1200);
    let last = segments(dir.path()).last().unwrap().clone();
    let (s, h, first, _) = *entry_records(&last).last().unwrap();
    write_at(&last, s, &vec![0u8; h.framed_len()]);
    let wal = open(dir.path());
    assert_eq!(wal.recovery_report().truncated_tail, None);
    assert_eq!(wal.last_index(), first - 1, "the zeroed entries are gone");
    assert!(matches!(
        wal.read(first, first + 1),
        Err(Error::Unavailable { .. })
    ));
    assert_eq!(
        wal.read(1, first).unwrap(),
        entries(1, first, 1),
        "everything before is intact"
    );
}

// ---------------------------------------------------------------------
// Row: last, header | zeros, or a verified header of an earlier
// incarnation | never started: recycled as a spare.

#[test]
fn last_header_zeros_is_never_started_and_recycled_as_a_spare() {
    let dir = log_with(300);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    let seq = segment_header(last).seq;
    // A segment file whose header never became durable.
    let unstarted = dir.path().join(segment_name(seq + 1, 301));
    fs::write(&unstarted, vec![0u8; SEGMENT_SIZE as usize]).unwrap();
    let spares_before = names(dir.path())
        .iter()
        .filter(|n| n.starts_with("spare-"))
        .count();
    {
        let wal = open(dir.path());
        let r = wal.recovery_report();
        assert_eq!(r.unstarted_segments, 1, "{r:?}");
        assert_eq!(r.truncated_tail, None);
        assert_eq!(r.segments, segs.len());
        assert!(!unstarted.exists(), "the unstarted segment is gone");
        assert!(
            names(dir.path())
                .iter()
                .filter(|n| n.starts_with("spare-"))
                .count()
                > spares_before,
            "it became a spare: {:?}",
            names(dir.path())
        );
        wal.close().unwrap();
    }
    expect_clean_end(dir.path(), end, 300);
}

#[test]
fn last_header_short_file_is_never_started_and_removed() {
    let dir = log_with(300);
    let segs = segments(dir.path());
    let seq = segment_header(segs.last().unwrap()).seq;
    // Created, but not even its header's length reached the disk.
    let unstarted = dir.path().join(segment_name(seq + 1, 301));
    fs::write(&unstarted, [0u8; 20]).unwrap();
    let wal = open(dir.path());
    assert_eq!(wal.recovery_report().unstarted_segments, 1);
    assert!(!unstarted.exists());
    assert_eq!(wal.last_index(), 300);
    assert_eq!(wal.segment_count(), segs.len());
}

#[test]
fn last_header_of_an_earlier_incarnation_is_never_started_and_recycled() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let end = records_end(last);
    let seq = segment_header(last).seq;
    // A recycled file renamed into place, whose new header did not become
    // durable: it still holds a verified header (and records) of its old
    // incarnation, segment 1.
    let unstarted = dir.path().join(segment_name(seq + 1, 1201));
    fs::copy(&segs[0], &unstarted).unwrap();
    {
        let wal = open(dir.path());
        let r = wal.recovery_report();
        assert_eq!(r.unstarted_segments, 1, "{r:?}");
        assert_eq!(r.truncated_tail, None);
        assert!(!unstarted.exists());
        assert_eq!(wal.last_index(), 1200);
        wal.close().unwrap();
    }
    expect_clean_end(dir.path(), end, 1200);
}

// ---------------------------------------------------------------------
// Row: any, header | does not verify and is not zero |
// Corruption { offset: 0 }.

#[test]
fn any_header_that_does_not_verify_and_is_not_zero_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    for seg in [&segs[0], &segs[1], segs.last().unwrap()] {
        for at in [0u64, 9, 13, 20, 30, 36, 47] {
            xor_byte(seg, at, 0x04);
            expect_corruption(dir.path(), seg, 0);
            xor_byte(seg, at, 0x04);
        }
    }
    // A torn header write (its first half only) of the last segment.
    let last = segs.last().unwrap();
    let saved = fs::read(last).unwrap();
    write_at(last, 24, &[0u8; 24]);
    expect_corruption(dir.path(), last, 0);
    fs::write(last, &saved).unwrap();
    expect_clean_end(dir.path(), records_end(last), 1200);
}

// ---------------------------------------------------------------------
// Row: not last, header | does not verify, or seq/first index differ from
// its name | Corruption { offset: 0 }.

fn rewrite_header(path: &Path, f: impl FnOnce(&mut SegmentHeader)) {
    let mut h = segment_header(path);
    f(&mut h);
    write_at(path, 0, &h.encode());
}

#[test]
fn not_last_header_seq_differing_from_its_name_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let mid = &segs[1];
    let saved = fs::read(mid).unwrap();
    rewrite_header(mid, |h| h.seq += 5);
    expect_corruption(dir.path(), mid, 0);
    fs::write(mid, &saved).unwrap();
    // The first segment, too.
    let saved0 = fs::read(&segs[0]).unwrap();
    rewrite_header(&segs[0], |h| h.seq = 0);
    expect_corruption(dir.path(), &segs[0], 0);
    fs::write(&segs[0], &saved0).unwrap();
    expect_clean_end(dir.path(), records_end(segs.last().unwrap()), 1200);
}

#[test]
fn not_last_header_first_index_differing_from_its_name_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let mid = &segs[1];
    rewrite_header(mid, |h| h.first_index += 1);
    expect_corruption(dir.path(), mid, 0);
}

#[test]
fn not_last_header_of_an_earlier_incarnation_is_corruption() {
    // A middle segment holding another file's (verified) header.
    let dir = log_with(1200);
    let segs = segments(dir.path());
    fs::copy(&segs[0], &segs[1]).unwrap();
    expect_corruption(dir.path(), &segs[1], 0);
}

#[test]
fn not_last_header_zeroed_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    write_at(&segs[1], 0, &[0u8; SEGMENT_HEADER_LEN]);
    expect_corruption(dir.path(), &segs[1], 0);
}

#[test]
fn not_last_missing_middle_segment_is_corruption() {
    let dir = log_with(1200);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    fs::remove_file(&segs[1]).unwrap();
    // Reported at the segment after the gap.
    let reason = expect_corruption(dir.path(), &segs[2], 0);
    assert!(reason.contains("missing"), "{reason}");
}

// ---------------------------------------------------------------------
// Row: any | a verified record that does not decode or breaks contiguity |
// Corruption.

/// Writes `body` as a verified record of `path`'s incarnation at `at`.
fn forge(path: &Path, at: u64, watermark: u64, body: &Body) {
    let salt = segment_header(path).salt;
    let mut buf = Vec::new();
    frame_into(&mut buf, salt, watermark, body);
    write_at(path, at, &buf);
}

#[test]
fn any_verified_record_that_breaks_contiguity_is_corruption() {
    let dir = log_with(300);
    let last = segments(dir.path()).last().unwrap().clone();
    let end = records_end(&last);
    let saved = fs::read(&last).unwrap();
    // Entries that skip an index; entries that repeat one.
    for first in [305u64, 300, 1] {
        forge(&last, end, 0, &Body::entries(&entries(first, first + 2, 1)));
        let reason = expect_corruption(dir.path(), &last, end);
        assert!(reason.contains("index"), "{reason}");
        fs::write(&last, &saved).unwrap();
    }
    // An empty entries record.
    forge(&last, end, 0, &Body::entries(&[]));
    expect_corruption(dir.path(), &last, end);
    fs::write(&last, &saved).unwrap();
    // In a sealed segment, in place of a record: the same entries shifted
    // by one index (so the same length and the records after still line up).
    let dir = log_with(1200);
    let segs = segments(dir.path());
    let (s, h, body) = records(&segs[0])
        .into_iter()
        .filter(|(_, h, _)| h.kind == RecordType::Entries as u8)
        .nth(5)
        .unwrap();
    let shifted: Vec<Entry> = format::decode_entries(&body)
        .unwrap()
        .into_iter()
        .map(|e| Entry {
            index: e.index + 1,
            ..e
        })
        .collect();
    let forged = Body::entries(&shifted);
    assert_eq!(forged.framed_len(), h.framed_len());
    forge(&segs[0], s, h.watermark, &forged);
    let reason = expect_corruption(dir.path(), &segs[0], s);
    assert!(reason.contains("index"), "{reason}");
}

#[test]
fn any_verified_record_that_does_not_decode_is_corruption() {
    let dir = log_with(300);
    let last = segments(dir.path()).last().unwrap().clone();
    let end = records_end(&last);
    let saved = fs::read(&last).unwrap();
    let raw = |kind: RecordType, bytes: &[u8]| Body {
        kind,
        bytes: Bytes::copy_from_slice(bytes),
        crc: crc32c::crc32c(bytes),
    };
    let mut bad_count = Body::entries(&entries(301, 303, 1)).bytes.to_vec();
    bad_count[8..12].copy_from_slice(&7u32.to_le_bytes());
    let mut bad_snapshot = Body::snapshot(&SnapshotMeta {
        index: 10,
        term: 1,
        data: Bytes::from_static(b"abc"),
    })
    .bytes
    .to_vec();
    bad_snapshot[16..20].copy_from_slice(&9u32.to_le_bytes());
    for body in [
        raw(RecordType::HardState, &[1u8; 16]),
        raw(RecordType::Truncate, &[1u8; 4]),
        raw(RecordType::Entries, &[0u8; 8]),
        raw(RecordType::Entries, &bad_count),
        raw(RecordType::Snapshot, &bad_snapshot),
    ] {
        forge(&last, end, 0, &body);
        expect_corruption(dir.path(), &last, end);
        fs::write(&last, &saved).unwrap();
    }
    // A verified record with an unknown type stops the segment as a
    // record that does not verify: with nothing after it, a torn tail.
    let mut buf = Vec::new();
    frame_into(&mut buf, segment_header(&last).salt, 0, &Body::truncate(1));
    buf[12] = 9;
    let mut hcrc = segment_header(&last).salt.to_le_bytes().to_vec();
    hcrc.extend_from_slice(&buf[4..24]);
    buf[0..4].copy_from_slice(&crc32c::crc32c(&hcrc).to_le_bytes());
    write_at(&last, end, &buf);
    {
        let wal = open(dir.path());
        assert_eq!(
            wal.recovery_report().truncated_tail,
            Some((last.clone(), end))
        );
        assert_eq!(wal.last_index(), 300);
    }
    // ... and with a record after it that proves it durable, corruption.
    forge(
        &last,
        end + buf.len() as u64,
        end + buf.len() as u64,
        &Body::hard_state(&HardState::default()),
    );
    expect_corruption(dir.path(), &last, end);
}

// ---------------------------------------------------------------------
// Spares.

#[test]
fn partial_spare_tmp_files_are_removed() {
    let dir = log_with(100);
    let tmp1 = dir.path().join(format!("spare-{:020}.tmp", 90));
    let tmp2 = dir.path().join(format!("spare-{:020}.tmp", 91));
    fs::write(&tmp1, vec![0u8; 5000]).unwrap();
    fs::write(&tmp2, b"").unwrap();
    // A spare of the wrong size (its rename landed, its length did not).
    let short = dir.path().join(format!("spare-{:020}.wal", 92));
    fs::write(&short, vec![0u8; 4096]).unwrap();
    let wal = open(dir.path());
    let r = wal.recovery_report().clone();
    assert_eq!(r.partial_spares, 2, "{r:?}");
    assert_eq!(r.truncated_tail, None);
    assert!(!tmp1.exists() && !tmp2.exists());
    assert!(!short.exists(), "a spare of the wrong size is removed");
    assert_eq!(wal.read(1, 101).unwrap(), entries(1, 101, 1));
    wal.close().unwrap();
    assert!(
        !names(dir.path()).iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        names(dir.path())
    );
}

#[test]
fn full_size_spares_are_kept_and_used() {
    let dir = log_with(100);
    for n in names(dir.path()) {
        if n.starts_with("spare-") {
            fs::remove_file(dir.path().join(n)).unwrap();
        }
    }
    let spare = dir.path().join(format!("spare-{:020}.wal", 77));
    fs::write(&spare, vec![0u8; SEGMENT_SIZE as usize]).unwrap();
    let wal = Wal::open(
        dir.path(),
        Options {
            spare_segments: 0,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(wal.recovery_report().partial_spares, 0);
    // Fill until a new segment starts: it takes the ready spare.
    let n = wal.segment_count();
    let mut next = 101;
    while wal.segment_count() == n {
        append_synced(&wal, next, next + 4, 4, 1);
        next += 4;
    }
    assert!(!spare.exists(), "the spare became a segment");
}
