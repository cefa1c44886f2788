//! The WAL's error type, split by what the caller can do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the WAL.
///
/// * `Io` and `Failed` are fatal for the node: the WAL refuses further work.
/// * `Corruption` is returned by recovery: durable data failed its checksum.
/// * `Full` is a clean refusal: nothing acknowledged was lost and the caller
///   may retry after compaction frees a segment.
/// * `NoSpace` (a ticket's answer): the write ran out of space (ENOSPC or
///   EDQUOT) and was dropped, with every write queued after it; the log is
///   as it was before them, and the WAL takes new writes (which succeed once
///   space is freed). Nothing acknowledged was lost.
/// * `InvalidOption`, `NonContiguous`, `TooLarge`, `Compacted`,
///   `SnapshotNotDurable` are caller mistakes; the WAL is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corruption in segment {segment} at offset {offset}: {reason}")]
    Corruption {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("no space left for a new segment in {dir}")]
    Full { dir: PathBuf },
    /// Write `seq` (this ticket's, or one before it) could not be written
    /// for want of space: it and every write queued after it were dropped
    /// whole. [`crate::Wal::last_index`], `hard_state` and `snapshot` show
    /// the log as it is again; the caller decides what to write next.
    #[error("no space to write {path} (write {first_seq} and every write queued after it were dropped; the log is as before them): {source}")]
    NoSpace {
        path: PathBuf,
        /// The first write dropped (see [`crate::Ticket::seq`]).
        first_seq: u64,
        #[source]
        source: io::Error,
    },
    #[error("the WAL has failed and accepts no more work: {reason}")]
    Failed { reason: String },
    #[error("invalid option `{field}`: {reason}")]
    InvalidOption { field: &'static str, reason: String },
    #[error("entries must be contiguous: expected index {expected}, got {got}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("record of {bytes} bytes exceeds the largest a segment holds ({max} bytes)")]
    TooLarge { bytes: u64, max: u64 },
    #[error("index {index} is compacted (first index is {first_index})")]
    Compacted { index: u64, first_index: u64 },
    #[error("index {index} is beyond the last index {last_index}")]
    Unavailable { index: u64, last_index: u64 },
    #[error("truncation at {index} would remove the snapshot at {snapshot_index}")]
    BelowSnapshot { index: u64, snapshot_index: u64 },
    #[error("entry {index} has term {term}, below the term {previous} before it")]
    TermRegression {
        index: u64,
        term: u64,
        previous: u64,
    },
    #[error("snapshot at {index} is older than the current one at {current}")]
    StaleSnapshot { index: u64, current: u64 },
    #[error("no durable snapshot covers index {index}")]
    SnapshotNotDurable { index: u64 },
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout { what: &'static str, waited_ms: u64 },
    #[error("the WAL is closed")]
    Closed,
}

/// Result alias for the WAL.
pub type Result<T> = std::result::Result<T, Error>;

/// `op` of an [`Error::Io`] from syncing a segment's data.
pub const OP_FDATASYNC: &str = "fdatasync";
/// `op` of an [`Error::Io`] from syncing a directory (creates, renames,
/// removals).
pub const OP_SYNC_DIRECTORY: &str = "sync directory";

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the WAL can not go on after this error (fsync or write
    /// failures, a failed WAL): the node must stop.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::Failed { .. })
    }

    /// True for a failed fsync ([`OP_FDATASYNC`], [`OP_SYNC_DIRECTORY`]) or
    /// a WAL failed by an earlier error: never retried, fatal even where
    /// other I/O errors are not (a compaction's unlink or rename, which the
    /// next compaction tries again).
    pub fn is_sync_failure(&self) -> bool {
        match self {
            Error::Failed { .. } => true,
            Error::Io { op, .. } => *op == OP_FDATASYNC || *op == OP_SYNC_DIRECTORY,
            _ => false,
        }
    }
}
