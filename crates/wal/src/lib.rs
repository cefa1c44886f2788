//! skiff-wal: a segmented, checksummed write-ahead log with group commit.
//!
//! The WAL owns a directory of fixed-size, pre-written segment files and the
//! log stored in them: entries `(index, term, payload)`, the Raft hard state
//! (term, vote, commit) and snapshot metadata. It knows nothing of Raft's
//! rules: it stores what it is given, in order, and says when it is durable.
//!
//! # The write path
//!
//! 1. [`Wal::write`] (or `append`, `save_hard_state`, ...) encodes and
//!    checksums the records on the caller's thread, places them at the next
//!    offset of the active segment under one short lock, and queues them on a
//!    bounded queue (`queue_depth`). It returns a [`Ticket`] at once; it
//!    waits (up to `submit_timeout`) only when the queue is full or a new
//!    segment finds no pre-written spare ready. [`Wal::try_write`] never
//!    waits: it hands the batch back instead ([`TryWriteError::Busy`]), for
//!    a caller that must not block, such as an event loop.
//! 2. One I/O driver thread takes every queued write (up to
//!    `group_bytes_max`), frames them into one contiguous buffer padded to a
//!    4 KiB boundary (no write ends inside a block the kernel would first
//!    have to read), writes it with one `pwritev` and then issues one
//!    fdatasync — on io_uring, with up to `groups_inflight_max` fdatasyncs
//!    in flight while later groups are written, or on the driver thread
//!    where io_uring is not allowed. The io_uring backend's decisions live
//!    in `ring.rs`, run over the kernel's ring (`uring.rs`) and, in the
//!    crash-state and fault tests, over a simulated one whose fdatasyncs
//!    complete out of order (`sim_ring`, with the `testing` feature).
//! 3. When a group's fdatasync lands, every earlier group's has, and every
//!    fdatasync issued before it landed has returned too (one of those may
//!    have been handed an error of this group's pages: see the rule on
//!    `Driver::releasable`), all its tickets become durable:
//!    [`Ticket::wait`] returns, and the ticket as a future resolves.
//!
//! An fdatasync or write error puts the WAL in a failed state: every waiter
//! gets [`Error::Failed`] and nothing more is accepted. It is never retried.
//! Also an fsync while making a spare segment (in the background or not),
//! and the directory fsync after compaction removed or recycled a segment.
//!
//! One exception: a group's write that runs out of space (ENOSPC, EDQUOT)
//! drops that write and every write queued after it, each ticket answering
//! [`Error::NoSpace`]: the bytes it may have left are cleared durably, the
//! in-memory log is rolled back to before it, and the next write is placed
//! where it was. Nothing acknowledged is lost and the WAL stays usable; the
//! caller sees the log as it is with [`Wal::last_index`] and friends.
//!
//! # Files
//!
//! `NNNNNNNNNNNNNNNNNNNN-IIIIIIIIIIIIIIIIIIII.wal`: a segment, by sequence
//! number and the first log index it was opened for (fixed width). Spare
//! segments (`spare-N.wal`) are pre-written with zeros by a background thread
//! ahead of need — fdatasync on a pre-written file is about twice as fast as
//! on a growing one — and compacted segments are recycled into spares.
//!
//! See [`format`] for the byte layouts and [`recovery`] for the decision
//! table applied at open.

mod driver;
mod durable;
mod error;
pub mod format;
mod index;
mod metrics;
mod options;
pub mod recovery;
mod ring;
mod segment;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
#[cfg(any(test, feature = "testing"))]
pub mod sim_ring;
mod storage;
mod uring;
mod wal;

pub use durable::Ticket;
pub use error::{Error, Result, OP_FDATASYNC, OP_SYNC_DIRECTORY};
pub use metrics::{Histogram, Metrics};
pub use options::{Backend, Options};
pub use recovery::RecoveryReport;
pub use storage::{OsStorage, Storage, StorageFile};
pub use wal::{TryWriteError, Wal, WriteBatch};

use bytes::Bytes;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub payload: Bytes,
}

/// Raft's durable state besides the log. `vote == 0` means no vote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// What the WAL records of a snapshot: the last index and term it covers and
/// opaque application data (for example the membership at that index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub data: Bytes,
}
