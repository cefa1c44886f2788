//! Maintenance.Snapshot: a consistent backup of the store, streamed; and
//! the backup file format, which `skiff snapshot restore` reads back.
//!
//! # Taking one
//!
//! A linearizable [`KvQuery::View`] freezes the store (an O(1) clone of its
//! persistent maps, served by the loop after a ReadIndex round, so the
//! backup holds every write acknowledged before the request). A blocking
//! thread (never the async runtime, never the loop) serializes the view
//! with the store's own snapshot writer into chunks of
//! [`BACKUP_CHUNK_BYTES`], handed to the gRPC stream through a channel of
//! [`BACKUP_CHUNKS_IN_FLIGHT`]: a slow client slows only its own backup,
//! and a client that goes away closes the channel, which stops the
//! serializer at its next chunk. At most [`BACKUPS_MAX`] backups run at
//! once in a process; more are refused with `RESOURCE_EXHAUSTED`. A backup
//! that fails part way ends its stream with an error status, never with a
//! clean end of stream.
//!
//! The view is serialized twice: once into a counter (no memory, no I/O) to
//! learn the length that the header and each message's `remaining_bytes`
//! announce, then into the stream. The view is frozen, so both passes
//! write the same bytes (checked).
//!
//! # The backup file
//!
//! What `etcdctl snapshot save` writes is the concatenation of the blobs:
//!
//! ```text
//! header (72 bytes)
//!   magic            [u8; 8] = "SKIFFBAK"
//!   version          u8      = 1
//!   reserved         [u8; 3] = 0
//!   revision         i64     store revision of the backup
//!   compact_revision i64     reads below it were refused when taken
//!   applied_index    u64     last Raft index the store had applied
//!   raft_term        u64     the serving member's term when taken (the
//!                            applied entry's term is at most this)
//!   cluster_id       u64     the cluster it was taken from
//!   member_id        u64     the member that served it
//!   snapshot_len     u64     bytes of the store snapshot that follows
//!   header_crc32c    u32     over the 68 bytes before it
//! snapshot           [u8; snapshot_len]  the KV store's snapshot format
//!                    (crates/kv/src/store/snapshot.rs; its own CRC32C
//!                    trailer included)
//! padding            zero bytes up to the next multiple of 512
//! trailer (32 bytes)
//!   crc32c           u32     over every byte before it (header, snapshot
//!                            and padding)
//!   reserved         [u8; 28] = 0
//! ```
//!
//! Integers are little-endian. A file is exactly
//! `align_up(72 + snapshot_len, 512) + 32` bytes ([`BackupHeader::total_len`]):
//! a shorter one is truncated, a longer one corrupt. The padding and the
//! trailer's size are etcd's shape: etcd's backup is a bbolt file (a
//! multiple of its 512-byte pages) and its SHA-256 (32 bytes), and
//! `etcdctl snapshot save` refuses a download of any other length ("sha256
//! checksum not found"). The checksum itself is CRC32C (no SHA-2 crate is
//! in the workspace): it detects truncation, bit rot and transfer errors,
//! not tampering; etcd's tools cannot restore a Skiff backup, nor Skiff an
//! etcd one.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Response, Status};

use super::{status_of, unexpected, Api, API_VERSION};
use crate::machine::{KvQuery, KvQueryResponse};
use crate::pb::etcdserverpb::{ResponseHeader, SnapshotRequest, SnapshotResponse};
use crate::store::{KvStore, SnapshotError, StoreView};

pub(super) type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// First bytes of a backup file.
pub const BACKUP_MAGIC: [u8; 8] = *b"SKIFFBAK";
/// The backup layout this build writes and reads.
pub const BACKUP_VERSION: u8 = 1;
/// Bytes of the header, its checksum included.
pub const BACKUP_HEADER_BYTES: usize = 72;
/// Bytes of the trailer (the whole file's CRC32C, then zeros: the size of
/// etcd's SHA-256).
pub const BACKUP_TRAILER_BYTES: usize = 32;
/// The trailer starts at a multiple of this (etcd's page-sized files).
pub const BACKUP_ALIGN_BYTES: u64 = 512;
/// Blob bytes per `SnapshotResponse` (the last one may hold fewer).
pub const BACKUP_CHUNK_BYTES: usize = 1 << 20;
/// Chunks serialized ahead of what the client has taken.
pub const BACKUP_CHUNKS_IN_FLIGHT: usize = 4;
/// Backups running at once in a process (each holds a frozen view, which
/// keeps the versions it shares from being freed, and a thread).
pub const BACKUPS_MAX: usize = 2;

/// What a backup's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupHeader {
    pub revision: i64,
    pub compact_revision: i64,
    pub applied_index: u64,
    pub raft_term: u64,
    pub cluster_id: u64,
    pub member_id: u64,
    pub snapshot_len: u64,
}

/// Where a backup comes from: what the header records beside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackupSource {
    pub raft_term: u64,
    pub cluster_id: u64,
    pub member_id: u64,
}

/// Why a backup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup read failed: {0}")]
    Io(#[source] io::Error),
    #[error("not a Skiff backup (bad magic; a Skiff backup starts with \"SKIFFBAK\")")]
    BadMagic,
    #[error("backup format version {0} is not known (this build reads {BACKUP_VERSION})")]
    UnsupportedVersion(u8),
    #[error("backup header corrupt: checksum {computed:#010x}, header says {stored:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("backup truncated: it should be {expected} bytes, it ends after {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("backup corrupt: it should be {expected} bytes, it has {actual}")]
    TooLong { expected: u64, actual: u64 },
    #[error("backup corrupt: checksum {computed:#010x}, trailer says {stored:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("backup corrupt: its store snapshot does not read back: {0}")]
    Snapshot(#[source] SnapshotError),
    #[error("backup corrupt: {0}")]
    Inconsistent(String),
}

impl BackupHeader {
    /// Bytes of the whole file.
    pub fn total_len(&self) -> u64 {
        self.trailer_at() + BACKUP_TRAILER_BYTES as u64
    }

    /// Where the trailer starts: after the snapshot and the padding.
    fn trailer_at(&self) -> u64 {
        (BACKUP_HEADER_BYTES as u64 + self.snapshot_len).next_multiple_of(BACKUP_ALIGN_BYTES)
    }

    /// Zero bytes between the snapshot and the trailer.
    fn padding(&self) -> u64 {
        self.trailer_at() - BACKUP_HEADER_BYTES as u64 - self.snapshot_len
    }

    pub fn encode(&self) -> [u8; BACKUP_HEADER_BYTES] {
        let mut b = [0u8; BACKUP_HEADER_BYTES];
        b[..8].copy_from_slice(&BACKUP_MAGIC);
        b[8] = BACKUP_VERSION;
        let fields = [
            self.revision as u64,
            self.compact_revision as u64,
            self.applied_index,
            self.raft_term,
            self.cluster_id,
            self.member_id,
            self.snapshot_len,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[12 + 8 * i..20 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..BACKUP_HEADER_BYTES - 4]);
        b[BACKUP_HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; BACKUP_HEADER_BYTES]) -> Result<BackupHeader, BackupError> {
        if b[..8] != BACKUP_MAGIC {
            return Err(BackupError::BadMagic);
        }
        if b[8] != BACKUP_VERSION {
            return Err(BackupError::UnsupportedVersion(b[8]));
        }
        let stored = u32::from_le_bytes(b[BACKUP_HEADER_BYTES - 4..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&b[..BACKUP_HEADER_BYTES - 4]);
        if stored != computed {
            return Err(BackupError::HeaderChecksum { stored, computed });
        }
        let field = |i: usize| u64::from_le_bytes(b[12 + 8 * i..20 + 8 * i].try_into().expect("8"));
        let h = BackupHeader {
            revision: field(0) as i64,
            compact_revision: field(1) as i64,
            applied_index: field(2),
            raft_term: field(3),
            cluster_id: field(4),
            member_id: field(5),
            snapshot_len: field(6),
        };
        if h.revision < 1 || !(0..=h.revision).contains(&h.compact_revision) {
            return Err(BackupError::Inconsistent(format!(
                "revision {} with compact revision {}",
                h.revision, h.compact_revision
            )));
        }
        if h.snapshot_len > u64::MAX / 2 {
            return Err(BackupError::Inconsistent(format!(
                "snapshot length {}",
                h.snapshot_len
            )));
        }
        Ok(h)
    }
}

/// The header of a backup of `view`: serializes the view once into a
/// counter to learn its length (O(state) CPU, no memory).
pub fn backup_header(view: &StoreView, source: BackupSource) -> io::Result<BackupHeader> {
    let info = view.write_snapshot(&mut io::sink())?;
    Ok(BackupHeader {
        revision: view.revision(),
        compact_revision: view.compact_revision(),
        applied_index: view.applied_index(),
        raft_term: source.raft_term,
        cluster_id: source.cluster_id,
        member_id: source.member_id,
        snapshot_len: info.bytes,
    })
}

/// Writes the backup of `view` whose header is `header` (from
/// [`backup_header`] of the same view) to `w`.
pub fn write_backup_with(
    view: &StoreView,
    header: &BackupHeader,
    w: &mut impl Write,
) -> io::Result<()> {
    let mut out = skiff_node::storage::CrcWriter::new(&mut *w);
    out.write_all(&header.encode())?;
    let info = view.write_snapshot(&mut out)?;
    if info.bytes != header.snapshot_len {
        return Err(io::Error::other(format!(
            "the store snapshot wrote {} bytes, {} were announced",
            info.bytes, header.snapshot_len
        )));
    }
    out.write_all(&vec![0u8; header.padding() as usize])?;
    debug_assert_eq!(out.len, header.trailer_at());
    let mut trailer = [0u8; BACKUP_TRAILER_BYTES];
    trailer[..4].copy_from_slice(&out.crc.to_le_bytes());
    w.write_all(&trailer)?;
    w.flush()
}

/// Writes a backup of `view` to `w` (both passes); returns its header.
pub fn write_backup(
    view: &StoreView,
    source: BackupSource,
    w: &mut impl Write,
) -> io::Result<BackupHeader> {
    let header = backup_header(view, source)?;
    write_backup_with(view, &header, w)?;
    Ok(header)
}

/// A reader that checksums and counts what passes through, and reports a
/// short stream as [`BackupError::Truncated`].
struct CrcReader<R: Read> {
    inner: R,
    crc: u32,
    len: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

fn read_exact_or_truncated(
    r: &mut impl Read,
    buf: &mut [u8],
    at: u64,
    expected: u64,
) -> Result<(), BackupError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(BackupError::Truncated {
                    expected,
                    actual: at + got as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BackupError::Io(e)),
        }
    }
    Ok(())
}

/// Reads the header at the start of `r`. `file_len`, when known, is
/// checked against the length the header announces (a truncated file is
/// refused before anything else is read).
pub fn read_backup_header(
    r: &mut impl Read,
    file_len: Option<u64>,
) -> Result<BackupHeader, BackupError> {
    let mut b = [0u8; BACKUP_HEADER_BYTES];
    let min = (BACKUP_HEADER_BYTES + BACKUP_TRAILER_BYTES) as u64;
    read_exact_or_truncated(r, &mut b, 0, min)?;
    let header = BackupHeader::decode(&b)?;
    match file_len {
        Some(actual) if actual < header.total_len() => Err(BackupError::Truncated {
            expected: header.total_len(),
            actual,
        }),
        Some(actual) if actual > header.total_len() => Err(BackupError::TooLong {
            expected: header.total_len(),
            actual,
        }),
        _ => Ok(header),
    }
}

/// Reads a whole backup: checks its header, its checksum, and that its
/// store snapshot reads back as the store the header describes; returns
/// both. `r` must end where the backup ends; give it a buffered reader.
pub fn read_backup(
    r: &mut impl Read,
    file_len: Option<u64>,
) -> Result<(BackupHeader, KvStore), BackupError> {
    let mut input = CrcReader {
        inner: r,
        crc: 0,
        len: 0,
    };
    let header = read_backup_header(&mut input, file_len)?;
    let expected = header.total_len();
    let mut body = CrcReader {
        inner: (&mut input).take(header.snapshot_len),
        crc: 0,
        len: 0,
    };
    let store = KvStore::read_snapshot(&mut body).map_err(|e| match e {
        SnapshotError::Truncated { offset, .. } if body.len < header.snapshot_len => {
            BackupError::Truncated {
                expected,
                actual: BACKUP_HEADER_BYTES as u64 + offset,
            }
        }
        e => BackupError::Snapshot(e),
    })?;
    if body.len != header.snapshot_len {
        return Err(BackupError::Inconsistent(format!(
            "the store snapshot ends after {} bytes, the header says {}",
            body.len, header.snapshot_len
        )));
    }
    finish(&mut input, &header)?;
    if store.revision() != header.revision
        || store.compact_revision() != header.compact_revision
        || store.applied_index() != header.applied_index
    {
        return Err(BackupError::Inconsistent(format!(
            "the store snapshot is at revision {} (compacted {}, index {}), the header says \
             revision {} (compacted {}, index {})",
            store.revision(),
            store.compact_revision(),
            store.applied_index(),
            header.revision,
            header.compact_revision,
            header.applied_index
        )));
    }
    Ok((header, store))
}

/// Reads the padding and the trailer after the snapshot and checks them,
/// and that nothing follows.
fn finish<R: Read>(input: &mut CrcReader<R>, header: &BackupHeader) -> Result<(), BackupError> {
    let expected = header.total_len();
    let mut padding = vec![0u8; header.padding() as usize];
    let at = input.len;
    read_exact_or_truncated(input, &mut padding, at, expected)?;
    let computed = input.crc;
    let mut trailer = [0u8; BACKUP_TRAILER_BYTES];
    let at = input.len;
    read_exact_or_truncated(&mut input.inner, &mut trailer, at, expected)?;
    let stored = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    if stored != computed {
        return Err(BackupError::Checksum { stored, computed });
    }
    if padding.iter().chain(&trailer[4..]).any(|&b| b != 0) {
        return Err(BackupError::Inconsistent(
            "padding or reserved trailer bytes are not zero".into(),
        ));
    }
    let mut extra = [0u8; 1];
    loop {
        match input.inner.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(BackupError::TooLong {
                    expected,
                    actual: expected + 1,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BackupError::Io(e)),
        }
    }
}

/// Copies the store snapshot out of the backup in `r` to `w`, checking
/// the header and the whole backup's checksum as it goes (the snapshot
/// bytes are written before the checksum is known: a caller that gets an
/// error must discard what `w` received). Returns the header.
pub fn copy_backup_snapshot(
    r: &mut impl Read,
    file_len: Option<u64>,
    w: &mut dyn Write,
) -> Result<BackupHeader, BackupError> {
    let mut input = CrcReader {
        inner: r,
        crc: 0,
        len: 0,
    };
    let header = read_backup_header(&mut input, file_len)?;
    let expected = header.total_len();
    let mut buf = vec![0u8; BACKUP_CHUNK_BYTES];
    let mut left = header.snapshot_len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let at = input.len;
        read_exact_or_truncated(&mut input, &mut buf[..n], at, expected)?;
        w.write_all(&buf[..n]).map_err(BackupError::Io)?;
        left -= n as u64;
    }
    finish(&mut input, &header)?;
    Ok(header)
}

/// Counts the backups running (see [`BACKUPS_MAX`]).
static BACKUPS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// One of the [`BACKUPS_MAX`] backup slots, freed on drop.
struct BackupSlot;

impl BackupSlot {
    fn take() -> Option<BackupSlot> {
        BACKUPS_RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < BACKUPS_MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| BackupSlot)
    }
}

impl Drop for BackupSlot {
    fn drop(&mut self) {
        BACKUPS_RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Cuts what the serializer writes into `SnapshotResponse`s and hands them
/// to the gRPC stream, blocking while [`BACKUP_CHUNKS_IN_FLIGHT`] wait.
/// Fails once the stream is gone (the client went away). Dropped before
/// [`ChunkSender::finish`] (an error, a panic), it ends the stream with an
/// error status, so that the client never takes a partial backup for a
/// whole one.
struct ChunkSender {
    tx: mpsc::Sender<Result<SnapshotResponse, Status>>,
    buf: BytesMut,
    header: Option<ResponseHeader>,
    total: u64,
    sent: u64,
    messages: u64,
    finished: bool,
    client_gone: bool,
}

impl ChunkSender {
    fn send(&mut self, n: usize) -> io::Result<()> {
        let blob = self.buf.split_to(n).freeze();
        self.sent += blob.len() as u64;
        let response = SnapshotResponse {
            header: self.header,
            remaining_bytes: self.total.saturating_sub(self.sent),
            blob,
            version: if self.messages == 0 {
                API_VERSION.into()
            } else {
                String::new()
            },
        };
        self.messages += 1;
        if self.tx.blocking_send(Ok(response)).is_err() {
            self.client_gone = true;
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client went away",
            ));
        }
        Ok(())
    }

    /// Sends what is left; checks that exactly the announced bytes went.
    fn finish(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() || self.messages == 0 {
            self.send(self.buf.len())?;
        }
        if self.sent != self.total {
            return Err(io::Error::other(format!(
                "{} bytes sent, {} announced",
                self.sent, self.total
            )));
        }
        self.finished = true;
        Ok(())
    }
}

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        while self.buf.len() >= BACKUP_CHUNK_BYTES {
            self.send(BACKUP_CHUNK_BYTES)?;
        }
        Ok(buf.len())
    }

    /// Chunks go when full (or at [`ChunkSender::finish`]), not on flush.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChunkSender {
    fn drop(&mut self) {
        if !self.finished && !self.client_gone {
            let _ = self.tx.blocking_send(Err(Status::internal(
                "etcdserver: the backup failed part way",
            )));
        }
    }
}

pub(super) async fn snapshot(
    api: &Api,
    _req: SnapshotRequest,
) -> Result<Response<SnapshotStream>, Status> {
    let slot = BackupSlot::take().ok_or_else(|| {
        Status::resource_exhausted(format!(
            "etcdserver: too many backups in progress (BACKUPS_MAX = {BACKUPS_MAX})"
        ))
    })?;
    let view = match api.node.query(KvQuery::View, true).await {
        Ok(KvQueryResponse::View(view)) => view,
        Ok(_) => return Err(unexpected()),
        Err(e) => return Err(status_of(e)),
    };
    let source = BackupSource {
        raft_term: api.node.status().term,
        cluster_id: api.node.cluster_id(),
        member_id: api.node.id(),
    };
    let header = api.header(view.revision());
    let (tx, rx) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT);
    // Work in proportion to the state: on a blocking thread.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let started = Instant::now();
        let mut out = ChunkSender {
            tx,
            buf: BytesMut::with_capacity(BACKUP_CHUNK_BYTES),
            header,
            total: 0,
            sent: 0,
            messages: 0,
            finished: false,
            client_gone: false,
        };
        let result = backup_header(&view, source).and_then(|h| {
            out.total = h.total_len();
            write_backup_with(&view, &h, &mut out)?;
            out.finish()?;
            Ok(h)
        });
        drop(view);
        match result {
            Ok(h) => tracing::info!(
                revision = h.revision,
                index = h.applied_index,
                bytes = h.total_len(),
                ms = started.elapsed().as_millis() as u64,
                "backup streamed"
            ),
            Err(_) if out.client_gone => {
                tracing::info!(sent = out.sent, "backup abandoned: the client went away")
            }
            Err(e) => tracing::warn!(error = %e, "backup failed"),
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::request_op::Request;
    use crate::pb::etcdserverpb::{PutRequest, RequestOp};

    fn store(puts: usize) -> KvStore {
        let mut s = KvStore::new();
        for i in 0..puts {
            let op = RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: format!("key-{}", i % 7).into_bytes().into(),
                    value: vec![i as u8; i % 300].into(),
                    ..Default::default()
                })),
            };
            s.apply(i as u64 + 1, &op).unwrap();
        }
        s
    }

    const SOURCE: BackupSource = BackupSource {
        raft_term: 9,
        cluster_id: 0xC1,
        member_id: 2,
    };

    #[test]
    fn a_backup_round_trips() {
        let s = store(100);
        let mut bytes = Vec::new();
        let h = write_backup(&s.freeze(), SOURCE, &mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, h.total_len());
        // The length `etcdctl snapshot save` accepts: 512·n + 32.
        assert_eq!(bytes.len() % 512, 32);
        assert_eq!(h.revision, s.revision());
        assert_eq!(h.applied_index, 100);
        assert_eq!((h.raft_term, h.cluster_id, h.member_id), (9, 0xC1, 2));
        let (back, restored) = read_backup(&mut &bytes[..], Some(bytes.len() as u64)).unwrap();
        assert_eq!(back, h);
        assert_eq!(&restored, &s);
        // Without the file length, as from a pipe.
        let (back, _) = read_backup(&mut &bytes[..], None).unwrap();
        assert_eq!(back, h);
        // The copied snapshot is the store's own snapshot.
        let mut snap = Vec::new();
        copy_backup_snapshot(&mut &bytes[..], None, &mut snap).unwrap();
        let mut direct = Vec::new();
        s.write_snapshot(&mut direct).unwrap();
        assert_eq!(snap, direct);
        assert_eq!(&KvStore::read_snapshot(&mut &snap[..]).unwrap(), &s);
    }

    #[test]
    fn the_stream_cuts_chunks_and_counts_down() {
        let s = store(50);
        let view = s.freeze();
        let (tx, mut rx) = mpsc::channel(1000);
        let mut out = ChunkSender {
            tx,
            buf: BytesMut::new(),
            header: None,
            total: 0,
            sent: 0,
            messages: 0,
            finished: false,
            client_gone: false,
        };
        let h = backup_header(&view, SOURCE).unwrap();
        out.total = h.total_len();
        write_backup_with(&view, &h, &mut out).unwrap();
        out.finish().unwrap();
        drop(out);
        let mut all = Vec::new();
        let mut remaining = h.total_len();
        while let Ok(m) = rx.try_recv() {
            let m = m.unwrap();
            remaining -= m.blob.len() as u64;
            assert_eq!(m.remaining_bytes, remaining);
            all.extend_from_slice(&m.blob);
        }
        assert_eq!(remaining, 0);
        assert!(read_backup(&mut &all[..], None).is_ok());
    }

    #[test]
    fn the_serializer_stops_when_the_client_goes_away() {
        let s = store(20_000);
        let view = s.freeze();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let h = backup_header(&view, SOURCE).unwrap();
        let mut out = ChunkSender {
            tx,
            buf: BytesMut::new(),
            header: None,
            total: h.total_len(),
            sent: 0,
            messages: 0,
            finished: false,
            client_gone: false,
        };
        let e = write_backup_with(&view, &h, &mut out)
            .and_then(|()| out.finish())
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert!(out.client_gone);
        assert!(h.total_len() > 2 * BACKUP_CHUNK_BYTES as u64);
        assert_eq!(out.messages, 1, "one chunk tried, then it stopped");
    }

    #[test]
    fn a_sender_dropped_part_way_ends_the_stream_with_an_error() {
        let (tx, mut rx) = mpsc::channel(10);
        let out = ChunkSender {
            tx,
            buf: BytesMut::new(),
            header: None,
            total: 10,
            sent: 0,
            messages: 0,
            finished: false,
            client_gone: false,
        };
        drop(out);
        assert!(rx.try_recv().unwrap().is_err());
    }

    #[test]
    fn damaged_backups_are_refused() {
        let s = store(60);
        let mut bytes = Vec::new();
        write_backup(&s.freeze(), SOURCE, &mut bytes).unwrap();
        let len = bytes.len();
        // Every truncation, with and without the file's length known.
        for cut in (0..len).step_by(7).chain([len - 1, len - 32, len - 33]) {
            let short = &bytes[..cut];
            let e = read_backup(&mut &short[..], Some(cut as u64)).unwrap_err();
            assert!(matches!(e, BackupError::Truncated { .. }), "cut {cut}: {e}");
            let e = read_backup(&mut &short[..], None).unwrap_err();
            assert!(
                matches!(e, BackupError::Truncated { .. }),
                "cut {cut}, length unknown: {e}"
            );
            let e = copy_backup_snapshot(&mut &short[..], None, &mut io::sink()).unwrap_err();
            assert!(
                matches!(e, BackupError::Truncated { .. }),
                "copy, cut {cut}: {e}"
            );
        }
        // A flipped bit anywhere.
        for at in (0..len).step_by(5).chain([len - 1]) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                read_backup(&mut &bad[..], Some(len as u64)).is_err(),
                "bit at {at}"
            );
            assert!(
                copy_backup_snapshot(&mut &bad[..], None, &mut io::sink()).is_err(),
                "copy, bit at {at}"
            );
        }
        // A byte too many.
        let mut long = bytes.clone();
        long.push(0);
        let e = read_backup(&mut &long[..], None).unwrap_err();
        assert!(matches!(e, BackupError::TooLong { .. }), "{e}");
        let e = read_backup(&mut &long[..], Some(len as u64 + 1)).unwrap_err();
        assert!(matches!(e, BackupError::TooLong { .. }), "{e}");
        // Not a backup at all, or a newer format.
        let e = read_backup(&mut &b"SQLite format 3\0................"[..], None).unwrap_err();
        assert!(matches!(
            e,
            BackupError::Truncated { .. } | BackupError::BadMagic
        ));
        let mut other = bytes.clone();
        other[..8].copy_from_slice(b"SQLite f");
        assert!(matches!(
            read_backup(&mut &other[..], None).unwrap_err(),
            BackupError::BadMagic
        ));
        let mut newer = bytes.clone();
        newer[8] = BACKUP_VERSION + 1;
        assert!(matches!(
            read_backup(&mut &newer[..], None).unwrap_err(),
            BackupError::UnsupportedVersion(_)
        ));
    }
}
