//! Recovery: rebuilding the log from the segment files at open.
//!
//! Segments are read in sequence order. Each record is verified (header
//! checksum seeded with the segment's salt, body checksum); the records of
//! one write (linked by `FLAG_MORE`) are applied together once the last one
//! verifies. The first record that does not verify stops the segment; `S`
//! is where the last complete write before it ends (the record that stopped
//! the scan is at or after `S`, and is the offset a `Corruption` names). The
//! decision is taken from this table (one test per row in
//! `tests/recovery.rs`):
//!
//! | where                 | what lies at / after `S`                                   | decision                                   |
//! |-----------------------|------------------------------------------------------------|--------------------------------------------|
//! | any segment           | a later valid record whose watermark is > `S`              | `Corruption { segment, offset: S }`: `S` had been durable |
//! | sealed (not last)     | `S` == `prev_end` in the next segment's header             | clean end of a sealed segment              |
//! | sealed (not last)     | `S` != `prev_end`                                          | `Corruption`: a sealed segment is complete |
//! | last                  | zeros, or bytes that verify as no record of this incarnation (stale records of a recycled file, a header torn before any of it landed) | clean end: appends continue at `S` |
//! | last                  | a record of this incarnation that fails (torn body), part of a write (its last record missing), or valid records with watermark <= `S` after it | torn tail: truncated at `S`; appends go to a new segment |
//! | last, header          | zeros, or a verified header of an earlier incarnation      | never started: recycled as a spare         |
//! | any, header           | does not verify and is not zero                            | `Corruption { offset: 0 }`                 |
//! | not last, header      | does not verify, or seq/first index differ from its name   | `Corruption { offset: 0 }`                 |
//! | any                   | a verified record that does not decode or breaks contiguity| `Corruption`                               |
//!
//! "Durable" comes from the writer: every record carries the offset below
//! which its segment was known durable when it was encoded, and a segment is
//! fdatasynced (sealed) before the next one is started, so nothing before
//! `S` in a sealed segment or before a later watermark can be a torn write.
//! The one case recovery cannot tell apart is damage to the very last
//! durable records of the last segment when nothing was written after them:
//! that is indistinguishable from a torn write and is truncated.

use crate::error::OP_SYNC_DIRECTORY;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::{
    self, RecordError, RecordHeader, RecordType, SegmentHeader, ALIGN, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use crate::index::{LogIndex, RecordLoc};
use crate::segment::{parse_segment_name, parse_spare_name, Spare};
use crate::storage::{create_dir_durable, Storage, StorageFile};
use crate::{HardState, SnapshotMeta};

/// A segment that recovery found intact.
#[derive(Debug, Clone)]
pub(crate) struct RecoveredSegment {
    pub seq: u64,
    pub salt: u64,
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
    /// Where its verified records end.
    pub end: u64,
}

/// The log as found on disk.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub index: LogIndex,
    pub hard_state: HardState,
    pub snapshot: Option<SnapshotMeta>,
    pub segments: Vec<RecoveredSegment>,
    /// Whether appends may continue in the last segment at its `end`.
    pub continue_last: bool,
    pub spares: Vec<Spare>,
    pub next_spare_name: u64,
    pub report: RecoveryReport,
}

/// What recovery found and did, for logs and for callers that check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in use after recovery.
    pub segments: usize,
    /// The segment whose torn tail was cut off, and the offset it was cut
    /// at. Appends then go to a new segment.
    pub truncated_tail: Option<(PathBuf, u64)>,
    /// Segments found never started (their header never became durable)
    /// and turned back into spares or removed.
    pub unstarted_segments: usize,
    /// Spares whose pre-write did not finish, removed.
    pub partial_spares: usize,
}

/// A segment file found at open, before its records are read.
struct Found {
    seq: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    header: Option<SegmentHeader>,
}

fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corruption {
        segment: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Applies a snapshot record to the index: entries it covers are dropped;
/// a log that does not contain the snapshot's (index, term) is discarded.
pub(crate) fn apply_snapshot(index: &mut LogIndex, meta: &SnapshotMeta) {
    // A snapshot at or below `first - 1` is already reflected (checkpoints
    // repeat the snapshot record at the start of every segment).
    if meta.index >= index.first()
        && index.term(meta.index) != Some(meta.term)
        && index.next() > index.first()
    {
        let first = index.first();
        index.truncate(first);
    }
    index.advance_first(meta.index + 1);
}

/// Applies a truncate record, clamped to the live log.
pub(crate) fn apply_truncate(index: &mut LogIndex, from: u64) {
    let from = from.max(index.first());
    if from < index.next() {
        index.truncate(from);
    }
}

pub(crate) fn recover(storage: &dyn Storage, dir: &Path, segment_size: u64) -> Result<Recovered> {
    create_dir_durable(storage, dir).map_err(|(op, path, e)| Error::io(op, path, e))?;
    let names = storage
        .list(dir)
        .map_err(|e| Error::io("list directory", dir, e))?;
    let mut segs: Vec<(u64, u64, PathBuf)> = Vec::new();
    let mut spares = Vec::new();
    let mut next_spare_name = 0u64;
    // Every unlink and rename below is made durable before the next one.
    let sync_dir = || {
        storage
            .sync_dir(dir)
            .map_err(|e| Error::io(OP_SYNC_DIRECTORY, dir, e))
    };
    let mut partial_spares = 0;
    for name in names {
        let path = dir.join(&name);
        if let Some((seq, first)) = parse_segment_name(&name) {
            segs.push((seq, first, path));
        } else if let Some(n) = parse_spare_name(&name) {
            next_spare_name = next_spare_name.max(n + 1);
            let file = storage
                .open(&path)
                .map_err(|e| Error::io("open spare", &path, e))?;
            let len = file.len().map_err(|e| Error::io("stat spare", &path, e))?;
            if len == segment_size {
                spares.push(Spare { path, file });
            } else {
                storage
                    .remove(&path)
                    .map_err(|e| Error::io("remove spare", &path, e))?;
                sync_dir()?;
            }
        } else if name.starts_with("spare-") && name.ends_with(".tmp") {
            // A spare whose pre-write did not finish.
            storage
                .remove(&path)
                .map_err(|e| Error::io("remove partial spare", &path, e))?;
            partial_spares += 1;
            sync_dir()?;
        }
    }
    segs.sort();
    spares.sort_by(|a, b| a.path.cmp(&b.path));

    // Read every segment's header; drop trailing ones that were never
    // started (their header write did not become durable).
    let mut report = RecoveryReport {
        partial_spares,
        ..RecoveryReport::default()
    };
    let mut loaded: Vec<Found> = Vec::new();
    for (seq, first, path) in segs {
        let file = storage
            .open(&path)
            .map_err(|e| Error::io("open segment", &path, e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("stat segment", &path, e))?;
        let mut buf = [0u8; SEGMENT_HEADER_LEN];
        let n = (len as usize).min(SEGMENT_HEADER_LEN);
        file.read_exact_at(&mut buf[..n], 0)
            .map_err(|e| Error::io("read segment header", &path, e))?;
        let header = match SegmentHeader::decode(&buf[..n]) {
            Ok(h) if h.seq == seq && h.first_index == first => Some(h),
            // Stale header of a recycled file, or never written: only
            // possible for a segment that was never started.
            Ok(_) => None,
            Err(_) if n < SEGMENT_HEADER_LEN || buf.iter().all(|&b| b == 0) => None,
            Err(reason) => return Err(corruption(&path, 0, reason)),
        };
        loaded.push(Found {
            seq,
            path,
            file,
            header,
        });
    }
    while loaded.last().is_some_and(|l| l.header.is_none()) {
        let Found { path, file, .. } = loaded.pop().expect("checked non-empty");
        let spare_path = dir.join(crate::segment::spare_name(next_spare_name));
        next_spare_name += 1;
        if file
            .len()
            .map_err(|e| Error::io("stat segment", &path, e))?
            == segment_size
        {
            storage
                .rename(&path, &spare_path)
                .map_err(|e| Error::io("recycle unstarted segment", &path, e))?;
            spares.push(Spare {
                path: spare_path,
                file,
            });
        } else {
            storage
                .remove(&path)
                .map_err(|e| Error::io("remove unstarted segment", &path, e))?;
        }
        report.unstarted_segments += 1;
        sync_dir()?;
    }
    for f in &loaded {
        if f.header.is_none() {
            return Err(corruption(
                &f.path,
                0,
                "segment header of a sealed segment does not verify",
            ));
        }
    }
    for w in loaded.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            return Err(corruption(
                &w[1].path,
                0,
                format!("segment {} is missing", w[0].seq + 1),
            ));
        }
    }

    let mut index: Option<LogIndex> = None;
    let mut hard_state = HardState::default();
    let mut snapshot: Option<SnapshotMeta> = None;
    let mut segments = Vec::new();
    let mut continue_last = false;
    let mut buf: Vec<u8> = Vec::new();
    for (i, found) in loaded.iter().enumerate() {
        let Found {
            seq,
            path,
            file,
            header,
        } = found;
        let header = header.expect("checked above");
        let seal = loaded
            .get(i + 1)
            .map(|next| next.header.expect("checked above").prev_end);
        // One segment in memory at a time, in one buffer reused for every
        // segment: a fresh one per segment would be zeroed and faulted in
        // page by page by the kernel's copy (that cost as much as the copy).
        // Nothing keeps a slice of it: what recovery keeps of a record
        // (snapshot data) is copied out.
        if let Some(next) = loaded.get(i + 1) {
            // Read ahead: the next segment comes from disk while this one is
            // checked (one segment ahead bounds the page cache used).
            next.file.will_need();
        }
        let len = file.len().map_err(|e| Error::io("stat segment", path, e))?;
        buf.resize(len as usize, 0);
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io("read segment", path, e))?;
        let bytes = &buf[..];
        let index = index.get_or_insert_with(|| LogIndex::new(header.first_index));
        let mut at = SEGMENT_HEADER_LEN;
        let limit = seal.map_or(bytes.len(), |s| (s as usize).min(bytes.len()));
        // Records of the write being read; applied together once its last
        // record verifies. `at` stays at the write's first record.
        let mut write: Vec<(RecordHeader, usize)> = Vec::new();
        let mut next = at;
        let stop = loop {
            if next >= limit {
                break (!write.is_empty()).then_some(RecordError::Eof);
            }
            match format::read_record(bytes, next, header.salt) {
                Ok((h, _)) if next + h.framed_len() > limit => {
                    break Some(RecordError::BadLength);
                }
                Ok((h, _)) => {
                    write.push((h, next));
                    next += h.framed_len();
                    if h.more() {
                        continue;
                    }
                    for (h, offset) in write.drain(..) {
                        let start = offset + RECORD_HEADER_LEN;
                        let body = &bytes[start..start + h.body_len as usize];
                        apply_record(
                            index,
                            &mut hard_state,
                            &mut snapshot,
                            h.kind,
                            body,
                            *seq,
                            offset as u64,
                            h.framed_len(),
                        )
                        .map_err(|reason| corruption(path, offset as u64, reason))?;
                    }
                    at = next;
                }
                Err(e) => break Some(e),
            }
        };
        // `at`: where the last complete write ends; `next`: the record that
        // stopped the scan (past `at` when a write was cut part way).
        let s = at as u64;
        let partial = !write.is_empty();
        if let Some(seal) = seal {
            if s != seal {
                let reason = stop.map_or(
                    "sealed segment ends before its seal point",
                    RecordError::reason,
                );
                return Err(corruption(path, next as u64, reason));
            }
        } else if let Some(stop) = stop {
            let tail = scan_tail(bytes, next, at, header.salt);
            if tail.proof {
                return Err(corruption(path, next as u64, stop.reason()));
            }
            // Zeros, or bytes that verify as no record of this incarnation
            // (a recycled file's stale records, or a header torn before any
            // of it landed): nothing after `at` can be mistaken for a record,
            // so appends may continue there.
            let clean = !partial
                && !tail.same_salt
                && matches!(
                    stop,
                    RecordError::Zero | RecordError::Eof | RecordError::BadHeader
                );
            if !clean {
                tracing::warn!(
                    segment = %path.display(),
                    offset = s,
                    reason = stop.reason(),
                    "truncating torn WAL tail"
                );
                report.truncated_tail = Some((path.clone(), s));
            }
            continue_last = clean;
        } else {
            continue_last = true;
        }
        segments.push(RecoveredSegment {
            seq: *seq,
            salt: header.salt,
            path: path.clone(),
            file: file.clone(),
            end: s,
        });
    }
    let mut index = index.unwrap_or_else(|| LogIndex::new(1));
    if let Some(meta) = &snapshot {
        index.advance_first(meta.index + 1);
    }
    index.check();
    report.segments = segments.len();
    Ok(Recovered {
        index,
        hard_state,
        snapshot,
        segments,
        continue_last,
        spares,
        next_spare_name,
        report,
    })
}

#[allow(clippy::too_many_arguments)]
fn apply_record(
    index: &mut LogIndex,
    hard_state: &mut HardState,
    snapshot: &mut Option<SnapshotMeta>,
    kind: u8,
    body: &[u8],
    seq: u64,
    offset: u64,
    framed_len: usize,
) -> std::result::Result<(), String> {
    match RecordType::from_u8(kind) {
        Some(RecordType::Entries) => {
            // Checked without allocating (no `Entry` per entry: only the
            // terms are kept), then walked again for the terms.
            let (first, count) =
                format::for_each_entry(body, |_, _, _| {}).map_err(|e| e.0.to_string())?;
            if count == 0 {
                return Err("empty entries record".into());
            }
            if first != index.next() {
                return Err(format!(
                    "entries record starts at index {} but the log continues at {}",
                    first,
                    index.next()
                ));
            }
            let loc = RecordLoc {
                first_index: first,
                count,
                segment_seq: seq,
                offset,
                framed_len: framed_len as u32,
                body: None,
                write_seq: 0,
            };
            index.push(loc, format::entry_terms(body));
        }
        Some(RecordType::HardState) => {
            *hard_state = format::decode_hard_state(body).map_err(|e| e.0.to_string())?;
        }
        Some(RecordType::Snapshot) => {
            // Kept after the segment's buffer is reused: a copy (bounded by
            // `snapshot_meta_max`).
            let meta = format::decode_snapshot(&Bytes::copy_from_slice(body))
                .map_err(|e| e.0.to_string())?;
            apply_snapshot(index, &meta);
            *snapshot = Some(meta);
        }
        Some(RecordType::Truncate) => {
            let from = format::decode_truncate(body).map_err(|e| e.0.to_string())?;
            if from < index.first() {
                // The conflict reached below where the oldest remaining
                // segment started: what lay below `from` was compacted away
                // (under a snapshot), so the log now restarts at `from`.
                *index = LogIndex::new(from);
            } else {
                apply_truncate(index, from);
            }
        }
        None => return Err(format!("unknown record type {kind}")),
    }
    Ok(())
}

struct TailScan {
    /// A verified record with a watermark beyond the stop: it was durable.
    proof: bool,
    /// Any verified record of this incarnation after the stop.
    same_salt: bool,
}

/// Looks past the record at `stop` for records of this segment's
/// incarnation; one whose watermark is beyond `durable_end` (where the last
/// complete write ends) proves that what lies there had been durable.
fn scan_tail(seg: &[u8], stop: usize, durable_end: usize, salt: u64) -> TailScan {
    let mut out = TailScan {
        proof: false,
        same_salt: false,
    };
    let mut at = stop + ALIGN;
    while at + RECORD_HEADER_LEN <= seg.len() {
        // Pre-written zeros are the common case: skip them a word at a time.
        if seg[at..at + 8].iter().all(|&b| b == 0) {
            at += ALIGN;
            continue;
        }
        if let Ok((h, _)) = format::read_record(seg, at, salt) {
            out.same_salt = true;
            if h.watermark > durable_end as u64 {
                out.proof = true;
                return out;
            }
        }
        at += ALIGN;
    }
    out
}
