//! Snapshot streaming: a snapshot file moved from a sender (the leader) to
//! receivers (followers) over dedicated connections, in checksummed chunks,
//! several chunks and several receivers at once, resumable after a broken
//! connection.
//!
//! This module owns the bodies of the [`FrameType::SnapshotRequest`],
//! [`FrameType::SnapshotChunk`] and [`FrameType::SnapshotAck`] frames
//! (drawn in [`wire`]), the sending side ([`SnapshotServer`], which reads
//! chunks of files a [`SnapshotProvider`] names) and the receiving side
//! ([`fetch_snapshot`], which writes chunks at their offsets into a
//! temporary file and hands over a verified, durable file).
//!
//! # The exchange
//!
//! The receiver pulls; the sender only answers. On each of
//! [`FetchOptions::streams`] connections:
//!
//! ```text
//! receiver                                   sender
//!    Hello{channel: Snapshot}        ──►
//!                                    ◄──     Hello{channel: Snapshot}
//!    SnapshotRequest{meta, chunk k}  ──►     (up to chunks_inflight_per_stream
//!    SnapshotRequest{meta, chunk m}  ──►      requests outstanding)
//!                                    ◄──     SnapshotChunk{k, crc, data}
//!    SnapshotRequest{meta, chunk n}  ──►
//!                                    ◄──     SnapshotChunk{m, crc, data}
//!    ...
//!    SnapshotAck{Done}               ──►     (once, on one connection, after
//!                                             the file is durable)
//! ```
//!
//! The sender answers the requests of one connection in order, one at a
//! time; a request it cannot serve gets a refusal [`SnapshotAck`] instead,
//! and the connection closes.
//!
//! # Parallelism
//!
//! Chunks in flight = `streams` connections × `chunks_inflight_per_stream`
//! requests outstanding on each. Separate connections let the sender read
//! and checksum, and the receiver verify and write, different chunks on
//! different cores; the outstanding requests on each hide the round trip
//! between a chunk and the next request. A chunk holds its slot until it
//! is written to the file, so a receiver buffers at most
//! `streams × chunks_inflight_per_stream × chunk_bytes` bytes of data. The
//! sender serves every connection on its own task, so several receivers
//! (and several streams of each) are served at once, up to
//! [`ServerOptions::connections_max`].
//!
//! # Resumption
//!
//! The receiver keeps a table of the chunks it has written. A broken
//! connection (I/O error, timeout, early close, a frame failing its frame
//! checksum) returns the chunks it had requested and not received to the
//! table; the stream reconnects after a backoff and asks for missing chunks
//! only — never for one already written. A chunk failing its own CRC32C is
//! likewise asked for again. It is the missing-chunks table, not a
//! contiguous offset, so that parallel streams can finish out of order.
//! Resumption lasts as long as one [`fetch_snapshot`] call: the table is
//! not persisted, and a new call starts from an empty temporary file.
//!
//! # Handing over
//!
//! Once every chunk is written: the file is read back and its CRC32C
//! compared with the snapshot's; the file is fsynced, renamed into place,
//! and the directory fsynced; only then is the final path returned. On any
//! error the temporary file is removed and nothing is handed over. An
//! fsync error ends the receive ([`SnapshotError::Fsync`]): it is never
//! retried.
//!
//! # What this module must never do
//!
//! * Trust a length or a count from the wire: a chunk's length is checked
//!   against what was asked before anything is buffered (the frame decoder's
//!   bound is one chunk), and nothing is allocated from a peer's numbers.
//! * Panic on anything a peer sends, or wait without a timeout.
//! * Hand over a file that has not been verified whole and made durable.
//! * Know Raft's rules: the snapshot is an opaque file named by
//!   [`SnapshotMeta`].

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod conn;
mod receiver;
mod server;
mod table;
pub mod wire;

pub use self::receiver::{fetch_snapshot, FetchOptions, FetchStats, Fetched};
pub use self::server::{
    ServerFaults, ServerOptions, ServerStats, SnapshotFiles, SnapshotProvider, SnapshotServer,
};
pub use self::wire::{AckStatus, ChunkHeader, ChunkRequest, SnapshotAck};

#[cfg(doc)]
use crate::FrameType;
use crate::WireError;

/// The default chunk size: large enough that per-chunk costs (a request, a
/// frame, a positional write) are small next to moving the data.
pub const DEFAULT_CHUNK_BYTES: u32 = 1 << 20;
/// The smallest chunk a receiver may ask for or a sender serves.
pub const CHUNK_BYTES_MIN: u32 = 4 << 10;
/// The largest chunk a receiver may ask for: a chunk frame must fit the
/// default `frame_bytes_max` of [`crate::FrameDecoder`].
pub const CHUNK_BYTES_MAX: u32 = 16 << 20;
/// Most chunks one snapshot may have: bounds the receiver's table of chunks
/// written (one bit each), whatever length it is told.
pub const CHUNKS_MAX: u64 = 1 << 24;
/// Most parallel connections one receive may open.
pub const STREAMS_MAX: usize = 64;
/// Most requests one connection may have outstanding.
pub const CHUNKS_INFLIGHT_PER_STREAM_MAX: usize = 64;

const _: () = assert!(CHUNK_BYTES_MIN <= DEFAULT_CHUNK_BYTES);
const _: () = assert!(DEFAULT_CHUNK_BYTES <= CHUNK_BYTES_MAX);
const _: () = assert!(
    crate::FRAME_HEADER_LEN + wire::CHUNK_PREFIX_LEN + CHUNK_BYTES_MAX as usize
        <= crate::DEFAULT_FRAME_BYTES_MAX
);

/// What names a snapshot file, on both sides: its Raft position (`index`,
/// `term`), its length in bytes and the CRC32C of all its bytes. The
/// receiver is told this (by the Raft message that makes it fetch); the
/// sender's [`SnapshotProvider`] declares it for the file it holds; a
/// request whose meta differs in any field is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotMeta {
    /// The last log index the snapshot covers; identifies the snapshot.
    pub index: u64,
    pub term: u64,
    /// Bytes in the file.
    pub len: u64,
    /// CRC32C of the whole file.
    pub crc: u32,
}

impl SnapshotMeta {
    /// Chunks of `chunk_bytes` the file cuts into (the last may be short).
    pub fn chunk_count(&self, chunk_bytes: u32) -> u64 {
        self.len.div_ceil(u64::from(chunk_bytes.max(1)))
    }

    /// Bytes of chunk `chunk` (`None` past the end). The offset is
    /// `chunk × chunk_bytes`.
    pub fn chunk_len(&self, chunk_bytes: u32, chunk: u64) -> Option<u32> {
        let offset = chunk.checked_mul(u64::from(chunk_bytes))?;
        if offset >= self.len {
            return None;
        }
        let len = (self.len - offset).min(u64::from(chunk_bytes));
        // At most `chunk_bytes`, which is a u32.
        Some(len as u32)
    }

    /// The name a received snapshot gets in its directory.
    pub fn file_name(&self) -> String {
        format!("snapshot-{:020}-{:020}.snap", self.index, self.term)
    }

    /// The meta of the file at `path` as snapshot (`index`, `term`): reads
    /// the whole file to checksum it. Blocking.
    pub fn of_file(index: u64, term: u64, path: &Path) -> io::Result<SnapshotMeta> {
        let (len, crc) = file_crc(&std::fs::File::open(path)?)?;
        Ok(SnapshotMeta {
            index,
            term,
            len,
            crc,
        })
    }
}

/// Length and CRC32C of a whole file, read with positional reads in pieces
/// of [`VERIFY_BUF_BYTES`]. Blocking.
pub(crate) fn file_crc(file: &std::fs::File) -> io::Result<(u64, u32)> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; VERIFY_BUF_BYTES];
    let mut crc = 0u32;
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok((offset, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        offset += n as u64;
    }
}

/// The read buffer for checksumming a whole file.
pub(crate) const VERIFY_BUF_BYTES: usize = 1 << 20;

/// Why a sender refused a request (the status of its [`SnapshotAck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It holds no snapshot with the requested index (or cannot read it).
    Unavailable,
    /// It holds that index with another term, length or checksum.
    Mismatch,
    /// It serves `connections_max` connections already; try again later.
    Busy,
    /// The request or handshake is not one it can serve (a chunk size
    /// outside its bounds — `chunk_bytes_max` is given —, a chunk past the
    /// end, another cluster or node).
    BadRequest { chunk_bytes_max: u64 },
}

/// Why a snapshot receive failed. Nothing was handed over, and the
/// temporary file was removed.
///
/// Retried inside [`fetch_snapshot`] (up to
/// [`FetchOptions::reconnects_max`]), reported only once retries run out
/// ([`SnapshotError::RetriesExhausted`]): [`Connection`] errors, a frame
/// failing its checksum, [`Refusal::Busy`]. Everything else ends the
/// receive at once.
///
/// [`Connection`]: SnapshotError::Connection
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Connecting, reading or writing failed, the peer closed early, or it
    /// did not answer within a timeout (`source` is then `TimedOut`).
    #[error("snapshot connection with {peer}: {what}: {source}")]
    Connection {
        peer: SocketAddr,
        what: &'static str,
        source: io::Error,
    },
    /// The sender's host name did not resolve (within the connect
    /// timeout).
    #[error("snapshot sender {peer}: cannot resolve its host: {source}")]
    Resolve {
        peer: crate::PeerAddr,
        source: io::Error,
    },
    /// The peer sent bytes that are not a valid frame or frame body.
    #[error("malformed frame from {peer}: {source}")]
    Wire { peer: SocketAddr, source: WireError },
    /// The peer sent valid frames that break the exchange: a chunk not
    /// asked for, of the wrong length or snapshot, an unexpected frame
    /// type, a handshake from the wrong cluster or node.
    #[error("snapshot protocol violation by {peer}: {what}")]
    Protocol { peer: SocketAddr, what: String },
    #[error("{peer} refused the snapshot request: {reason:?}")]
    Refused { peer: SocketAddr, reason: Refusal },
    /// Chunks failed their CRC32C more often than
    /// [`FetchOptions::chunk_retries_max`] allows.
    #[error("chunk {chunk} failed its checksum: {count} corrupted chunks in this transfer")]
    ChunkChecksum { chunk: u64, count: u32 },
    /// Every chunk arrived intact, but the file they make does not have the
    /// snapshot's checksum: the sender serves another file than it claims.
    #[error(
        "snapshot {index} (term {term}): file checksum {actual:#010x}, expected {expected:#010x}"
    )]
    SnapshotChecksum {
        index: u64,
        term: u64,
        expected: u32,
        actual: u32,
    },
    /// Retryable errors kept happening; `last` is the last of them.
    #[error("snapshot receive gave up after {reconnects} reconnects; last error: {last}")]
    RetriesExhausted {
        reconnects: u32,
        last: Box<SnapshotError>,
    },
    /// A local file operation failed (or timed out: `TimedOut`).
    #[error("snapshot {op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// fsync of the snapshot file or its directory failed: the receive is
    /// over and must not be retried on this file (what reached the disk is
    /// unknown).
    #[error("snapshot fsync {path:?} failed (fatal): {source}")]
    Fsync { path: PathBuf, source: io::Error },
    /// The call's arguments cannot work (options out of bounds, a snapshot
    /// too large, a Hello for another channel).
    #[error("invalid snapshot receive: {0}")]
    Invalid(String),
}

impl SnapshotError {
    /// Whether a fresh connection may fix it.
    pub fn is_retryable(&self) -> bool {
        match self {
            SnapshotError::Connection { .. } => true,
            SnapshotError::Wire { source, .. } => matches!(source, WireError::Checksum { .. }),
            SnapshotError::Refused { reason, .. } => *reason == Refusal::Busy,
            _ => false,
        }
    }
}

/// Runs blocking file work `f` on tokio's blocking pool and waits for it at
/// most `limit` (past it: a `TimedOut` error; the work itself cannot be
/// stopped and finishes on its own). A panic in `f` is resumed here.
pub(crate) async fn blocking<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("file operation took longer than {limit:?}"),
        )),
        Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Ok(Err(_)) => Err(io::Error::other("file operation cancelled")),
        Ok(Ok(result)) => result,
    }
}
