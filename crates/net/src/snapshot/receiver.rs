//! The receiving side: [`fetch_snapshot`] pulls a snapshot's chunks over
//! parallel connections into a temporary file, then verifies, syncs and
//! renames it.
//!
//! Each stream (one connection at a time) keeps up to
//! `chunks_inflight_per_stream` chunks claimed from the shared
//! [`ChunkTable`]: requested, or received and being written with a
//! positional write on the blocking pool. A chunk is written only after its
//! CRC32C matched, and marked done only once the write returned. A broken
//! connection gives its unanswered chunks back and the stream reconnects;
//! chunks already received are still written and kept.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::conn::{tls_handshake, within, Conn};
use super::table::ChunkTable;
use super::wire::{AckStatus, ChunkHeader, ChunkRequest, SnapshotAck, CHUNK_PREFIX_LEN};
use super::{
    blocking, SnapshotError, SnapshotMeta, CHUNKS_INFLIGHT_PER_STREAM_MAX, CHUNKS_MAX,
    CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, DEFAULT_CHUNK_BYTES, STREAMS_MAX,
};
use crate::addr::{Host, PeerAddr};
use crate::codec::{encode_hello_frame, Channel, Hello};
use crate::frame::{FrameType, FRAME_HEADER_LEN};
use crate::tls::PeerStream;

/// Largest frame a receiver sends (a request).
const SEND_FRAME_MAX: usize = 128;
/// Read room reserved per read beyond the frame being received.
const RECV_READ_RESERVE: usize = 64 << 10;
/// The longest pause between reconnects of one stream.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// For the `Done` ack after the hand-over: best effort, so short.
const DONE_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// How [`fetch_snapshot`] runs.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes per chunk ([`CHUNK_BYTES_MIN`]..=[`CHUNK_BYTES_MAX`]; the
    /// sender may serve less: see [`Refusal::BadRequest`](super::Refusal::BadRequest)).
    pub chunk_bytes: u32,
    /// Connections in parallel (1..=[`STREAMS_MAX`]).
    pub streams: usize,
    /// Chunks each connection has requested and not yet written
    /// (1..=[`CHUNKS_INFLIGHT_PER_STREAM_MAX`]).
    pub chunks_inflight_per_stream: usize,
    /// For a connection and its Hello exchange.
    pub connect_timeout: Duration,
    /// For the next frame while chunks are requested, or one request to be
    /// written; past it the connection counts as broken.
    pub io_timeout: Duration,
    /// For one file operation: a chunk's write, the read-back, an fsync.
    pub disk_timeout: Duration,
    /// Reconnects (of all streams together) before giving up.
    pub reconnects_max: u32,
    /// The first pause before a stream reconnects; doubled on each
    /// reconnect of that stream, up to 1 s (`RECONNECT_BACKOFF_MAX`).
    pub reconnect_backoff: Duration,
    /// Chunks failing their checksum tolerated per transfer (each is asked
    /// for again); one more is [`SnapshotError::ChunkChecksum`].
    pub chunk_retries_max: u32,
    /// Largest snapshot accepted.
    pub snapshot_bytes_max: u64,
    /// Source address of the connections to the sender (see
    /// [`crate::TcpConfig::local_ip`]); `None` lets the kernel choose.
    pub local_ip: Option<std::net::IpAddr>,
    /// TLS to the sender (it must present a certificate naming the address
    /// dialled); plaintext when `None`.
    pub tls: Option<crate::tls::PeerTls>,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            streams: 4,
            chunks_inflight_per_stream: 2,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            disk_timeout: Duration::from_secs(60),
            reconnects_max: 16,
            reconnect_backoff: Duration::from_millis(20),
            chunk_retries_max: 8,
            snapshot_bytes_max: 1 << 40,
            local_ip: None,
            tls: None,
        }
    }
}

impl FetchOptions {
    fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |what: String| Err(SnapshotError::Invalid(what));
        if !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&self.chunk_bytes) {
            return bad(format!(
                "chunk_bytes {} outside {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX}",
                self.chunk_bytes
            ));
        }
        if !(1..=STREAMS_MAX).contains(&self.streams) {
            return bad(format!(
                "streams {} outside 1..={STREAMS_MAX}",
                self.streams
            ));
        }
        if !(1..=CHUNKS_INFLIGHT_PER_STREAM_MAX).contains(&self.chunks_inflight_per_stream) {
            return bad(format!(
                "chunks_inflight_per_stream {} outside 1..={CHUNKS_INFLIGHT_PER_STREAM_MAX}",
                self.chunks_inflight_per_stream
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("io_timeout", self.io_timeout),
            ("disk_timeout", self.disk_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must not be zero"));
            }
        }
        Ok(())
    }
}

/// A snapshot received: its final path (verified, fsynced, renamed into
/// place, directory fsynced) and how the transfer went.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub stats: FetchStats,
}

/// How a transfer went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub chunks: u64,
    /// Chunk requests written, repeats included: at least `chunks` +
    /// `chunks_corrupt`, at most that + `chunks_lost`.
    pub requests_sent: u64,
    /// Chunks that failed their CRC32C (and were asked for again).
    pub chunks_corrupt: u64,
    /// Chunks claimed by a connection that broke before they arrived (their
    /// request may or may not have gone out), asked for again. Chunks
    /// already received are never asked for again.
    pub chunks_lost: u64,
    /// Data bytes of the chunks received intact.
    pub bytes_received: u64,
    pub reconnects: u32,
    /// From the first connection to the last chunk written.
    pub transfer: Duration,
    /// Reading the file back to checksum it.
    pub verify: Duration,
    /// fsync of the file, rename, fsync of the directory.
    pub sync: Duration,
}

/// Fetches snapshot `meta` from the sender at `addr` into `dest_dir`, and
/// returns the path of the file once it is complete, verified against
/// `meta.crc`, and durable under its final name ([`SnapshotMeta::file_name`]
/// in `dest_dir`, replacing any file of that name).
///
/// `hello` is this node's Hello (`from` itself, `to` the sender, channel
/// [`Channel::Snapshot`]); the sender's must answer it. The temporary file
/// is that name with `.partial` appended, in `dest_dir`: one fetch of a
/// given snapshot into a given directory at a time. On error, or if the
/// future is dropped, the temporary file is removed and nothing is handed
/// over. See the [module docs](super) for retries and resumption.
///
/// `sender` is the sender's snapshot address; a host name there is resolved
/// once, at the start, and the streams use the first of its addresses that
/// takes a connection. With peer TLS the sender's certificate must name
/// `sender`'s host.
pub async fn fetch_snapshot(
    sender: PeerAddr,
    hello: Hello,
    meta: SnapshotMeta,
    dest_dir: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, SnapshotError> {
    opts.validate()?;
    if hello.channel != Channel::Snapshot {
        return Err(SnapshotError::Invalid(format!(
            "Hello for channel {:?}, not Snapshot",
            hello.channel
        )));
    }
    if meta.len > opts.snapshot_bytes_max {
        return Err(SnapshotError::Invalid(format!(
            "snapshot of {} bytes exceeds snapshot_bytes_max = {}",
            meta.len, opts.snapshot_bytes_max
        )));
    }
    let chunks = meta.chunk_count(opts.chunk_bytes);
    if chunks > CHUNKS_MAX {
        return Err(SnapshotError::Invalid(format!(
            "{chunks} chunks of {} bytes exceed CHUNKS_MAX = {CHUNKS_MAX}",
            opts.chunk_bytes
        )));
    }

    let addrs = tokio::time::timeout(opts.connect_timeout, sender.resolve())
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
        .map_err(|source| SnapshotError::Resolve {
            peer: sender.clone(),
            source,
        })?;

    let final_path = dest_dir.join(meta.file_name());
    let tmp_path = dest_dir.join(format!("{}.partial", meta.file_name()));
    let mut tmp = TmpFile {
        path: Some(tmp_path.clone()),
    };
    let file = create_tmp(&tmp_path, meta.len, opts.disk_timeout).await?;

    let transfer = Arc::new(Transfer {
        addrs,
        addr_at: AtomicUsize::new(0),
        host: sender.host().clone(),
        hello,
        meta,
        opts: opts.clone(),
        file: Arc::new(file),
        tmp_path: tmp_path.clone(),
        table: Mutex::new(ChunkTable::new(
            chunks,
            opts.streams * opts.chunks_inflight_per_stream,
        )),
        reconnects: AtomicU32::new(0),
        corrupt: AtomicU32::new(0),
        requests_sent: AtomicU64::new(0),
        chunks_lost: AtomicU64::new(0),
        bytes_received: AtomicU64::new(0),
        chunk_crcs: Mutex::new(vec![0; chunks as usize]),
    });
    let started = Instant::now();
    let conns = run_streams(&transfer).await?;
    assert!(
        transfer.table().all_done(),
        "every stream ended without error, yet chunks are missing"
    );
    let transfer_time = started.elapsed();

    // Every chunk's bytes matched the sender's checksum before they were
    // written, and every write succeeded: the file's checksum is theirs
    // combined, which must be the sender's file checksum (reading the file
    // back would read the page cache, no closer to the disk).
    let verified = Instant::now();
    let crc = {
        let crcs = transfer
            .chunk_crcs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        crcs.iter().enumerate().fold(0u32, |acc, (i, &c)| {
            let len = meta
                .chunk_len(opts.chunk_bytes, i as u64)
                .expect("every chunk is inside the snapshot");
            crc32c::crc32c_combine(acc, c, len as usize)
        })
    };
    if crc != meta.crc {
        warn!(peer = %sender, ?meta, crc, "received snapshot fails its checksum");
        return Err(SnapshotError::SnapshotChecksum {
            index: meta.index,
            term: meta.term,
            expected: meta.crc,
            actual: crc,
        });
    }
    let verify_time = verified.elapsed();

    let synced = Instant::now();
    let file = transfer.file.clone();
    blocking(opts.disk_timeout, move || file.sync_all())
        .await
        .map_err(|source| SnapshotError::Fsync {
            path: tmp_path.clone(),
            source,
        })?;
    let (from, to) = (tmp_path.clone(), final_path.clone());
    blocking(opts.disk_timeout, move || std::fs::rename(from, to))
        .await
        .map_err(|source| SnapshotError::Io {
            op: "renaming",
            path: tmp_path.clone(),
            source,
        })?;
    // Renamed: on failure from here on, it is the final file to remove.
    tmp.path = Some(final_path.clone());
    let dir = dest_dir.to_path_buf();
    blocking(opts.disk_timeout, move || File::open(&dir)?.sync_all())
        .await
        .map_err(|source| SnapshotError::Fsync {
            path: dest_dir.to_path_buf(),
            source,
        })?;
    tmp.path = None;
    let sync_time = synced.elapsed();

    send_done(&transfer, conns).await;
    let t = &transfer;
    let stats = FetchStats {
        chunks,
        requests_sent: t.requests_sent.load(Ordering::Relaxed),
        chunks_corrupt: u64::from(t.corrupt.load(Ordering::Relaxed)),
        chunks_lost: t.chunks_lost.load(Ordering::Relaxed),
        bytes_received: t.bytes_received.load(Ordering::Relaxed),
        reconnects: t.reconnects.load(Ordering::Relaxed),
        transfer: transfer_time,
        verify: verify_time,
        sync: sync_time,
    };
    info!(peer = %sender, path = ?final_path, ?stats, "snapshot received");
    Ok(Fetched {
        path: final_path,
        stats,
    })
}

/// Removes the file at `path` when dropped, unless `path` was taken: the
/// receive failed or was abandoned, and nothing may be handed over.
struct TmpFile {
    path: Option<PathBuf>,
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != io::ErrorKind::NotFound {
                    warn!(?path, %error, "cannot remove abandoned snapshot file");
                }
            }
        }
    }
}

/// Creates (truncating) the temporary file and reserves its length, so
/// that a full disk shows at once rather than halfway through.
async fn create_tmp(path: &Path, len: u64, limit: Duration) -> Result<File, SnapshotError> {
    let p = path.to_path_buf();
    blocking(limit, move || {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)?;
        preallocate(&file, len)?;
        Ok(file)
    })
    .await
    .map_err(|source| SnapshotError::Io {
        op: "creating",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(target_os = "linux")]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let Ok(len) = libc::off_t::try_from(len) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "snapshot too large",
        ));
    };
    // SAFETY: `fallocate` takes a file descriptor and integers; the
    // descriptor is open for as long as `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        // The file system cannot reserve: set the length, sparse.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len as u64),
        _ => Err(error),
    }
}

#[cfg(not(target_os = "linux"))]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)
}

/// One transfer, shared by its streams.
struct Transfer {
    /// The sender's addresses (its host resolved), and which of them took
    /// the last connection (tried first by the next).
    addrs: Vec<SocketAddr>,
    addr_at: AtomicUsize,
    /// The name the sender's TLS certificate must carry.
    host: Host,
    hello: Hello,
    meta: SnapshotMeta,
    opts: FetchOptions,
    file: Arc<File>,
    tmp_path: PathBuf,
    table: Mutex<ChunkTable>,
    reconnects: AtomicU32,
    corrupt: AtomicU32,
    requests_sent: AtomicU64,
    chunks_lost: AtomicU64,
    bytes_received: AtomicU64,
    /// The CRC32C of each chunk written (checked against the sender's):
    /// combined in order, the file's, without reading it back.
    chunk_crcs: Mutex<Vec<u32>>,
}

impl Transfer {
    /// The sender's address that took the last connection (for logs).
    fn peer(&self) -> SocketAddr {
        self.addrs[self.addr_at.load(Ordering::Relaxed)]
    }

    fn table(&self) -> MutexGuard<'_, ChunkTable> {
        // Table methods assert before they change anything: a panicking
        // holder leaves it consistent.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the streams to the end; on the first error that is not retried,
/// stops the others and returns it. Returns the connections of the streams
/// that ended cleanly with one open.
async fn run_streams(t: &Arc<Transfer>) -> Result<Vec<Conn>, SnapshotError> {
    let mut streams = JoinSet::new();
    for stream in 0..t.opts.streams {
        streams.spawn(run_stream(t.clone(), stream));
    }
    let mut conns = Vec::new();
    while let Some(joined) = streams.join_next().await {
        match joined {
            Ok(Ok(Some(conn))) => conns.push(conn),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                // Dropping the set aborts the other streams.
                return Err(e);
            }
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => unreachable!("streams are only aborted by dropping the set"),
        }
    }
    Ok(conns)
}

/// One stream: connects, pumps chunks until none is left to claim, and
/// reconnects after retryable errors. Returns its open connection, if it
/// opened one.
async fn run_stream(t: Arc<Transfer>, stream: usize) -> Result<Option<Conn>, SnapshotError> {
    let mut backoff = t.opts.reconnect_backoff.min(RECONNECT_BACKOFF_MAX);
    loop {
        if !t.table().has_claimable() {
            return Ok(None);
        }
        let error = match connect(&t).await {
            Ok(mut conn) => match pump(&t, &mut conn).await {
                Ok(()) => return Ok(Some(conn)),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !error.is_retryable() {
            return Err(error);
        }
        let reconnects = t.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
        if reconnects > t.opts.reconnects_max {
            return Err(SnapshotError::RetriesExhausted {
                reconnects: reconnects - 1,
                last: Box::new(error),
            });
        }
        warn!(peer = %t.peer(), stream, %error, ?backoff, "snapshot stream broken, reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(RECONNECT_BACKOFF_MAX);
    }
}

/// Opens a connection and exchanges Hellos.
async fn connect(t: &Transfer) -> Result<Conn, SnapshotError> {
    let limit = t.opts.connect_timeout;
    // The address that took the last connection first, then the others.
    let at = t.addr_at.load(Ordering::Relaxed);
    let mut tried = 0;
    let (peer, stream) = loop {
        let i = (at + tried) % t.addrs.len();
        let peer = t.addrs[i];
        tried += 1;
        let result = within(
            limit,
            peer,
            "connecting",
            crate::connect_from(&PeerAddr::from(peer), t.opts.local_ip),
        )
        .await
        .and_then(|r| {
            r.map_err(|source| SnapshotError::Connection {
                peer,
                what: "connecting",
                source,
            })
        });
        match result {
            Ok(stream) => {
                t.addr_at.store(i, Ordering::Relaxed);
                break (peer, stream);
            }
            Err(e) if tried >= t.addrs.len() => return Err(e),
            Err(_) => {}
        }
    };
    stream
        .set_nodelay(true)
        .map_err(|source| SnapshotError::Connection {
            peer,
            what: "setting TCP_NODELAY",
            source,
        })?;
    let stream = match &t.opts.tls {
        None => PeerStream::Plain(stream),
        Some(tls) => tls_handshake(limit, peer, tls.connect(&t.host, stream)).await?,
    };
    let frame_max = FRAME_HEADER_LEN + CHUNK_PREFIX_LEN + t.opts.chunk_bytes as usize;
    let mut conn = Conn::new(stream, peer, frame_max, SEND_FRAME_MAX, RECV_READ_RESERVE);
    let hello = t.hello;
    conn.send(limit, "writing Hello", |enc, dst| {
        encode_hello_frame(enc, &hello, dst)
    })
    .await?;
    let frame = conn.expect_frame(limit, "waiting for Hello").await?;
    match frame.ty {
        FrameType::Hello => {
            let theirs = Hello::decode(&frame.body)
                .map_err(|source| SnapshotError::Wire { peer, source })?;
            let expected = Hello {
                cluster_id: hello.cluster_id,
                from: hello.to,
                to: hello.from,
                channel: Channel::Snapshot,
            };
            if theirs != expected {
                return Err(conn.protocol(format!(
                    "handshake: peer sent {theirs:?}, expected {expected:?}"
                )));
            }
            Ok(conn)
        }
        FrameType::SnapshotAck => Err(refused(&conn, &frame.body)),
        ty => Err(conn.protocol(format!("{ty:?} frame instead of Hello"))),
    }
}

/// The error an ack from the sender makes.
fn refused(conn: &Conn, body: &[u8]) -> SnapshotError {
    match SnapshotAck::decode(body) {
        Err(source) => SnapshotError::Wire {
            peer: conn.peer,
            source,
        },
        Ok(ack) => match ack.refusal() {
            Some(reason) => SnapshotError::Refused {
                peer: conn.peer,
                reason,
            },
            None => conn.protocol("the sender sent Done"),
        },
    }
}

/// What one connection has claimed: requested (answered in order), and
/// received and being written.
struct Inflight {
    requested: VecDeque<u64>,
    writes: JoinSet<(u64, u32, io::Result<()>)>,
}

/// Requests and receives chunks on `conn` until none is left to claim and
/// all it received are written. On error, chunks it received are still
/// written (and kept); those it had requested are given back.
async fn pump(t: &Transfer, conn: &mut Conn) -> Result<(), SnapshotError> {
    let mut inflight = Inflight {
        requested: VecDeque::with_capacity(t.opts.chunks_inflight_per_stream),
        writes: JoinSet::new(),
    };
    let result = pump_chunks(t, conn, &mut inflight).await;
    let mut written = Ok(());
    while !inflight.writes.is_empty() {
        if let Err(e) = wait_write(t, &mut inflight.writes).await {
            // Fatal to the receive: the table no longer matters, and a
            // write that timed out may never finish.
            written = Err(e);
            break;
        }
    }
    if !inflight.requested.is_empty() {
        let lost = inflight.requested.len();
        debug!(peer = %t.peer(), lost, "giving back chunks of a broken connection");
        t.chunks_lost.fetch_add(lost as u64, Ordering::Relaxed);
        let mut table = t.table();
        for chunk in inflight.requested.drain(..) {
            table.release(chunk);
        }
    }
    // A failed write is fatal; report it before whatever broke the stream.
    written?;
    result
}

async fn pump_chunks(
    t: &Transfer,
    conn: &mut Conn,
    inflight: &mut Inflight,
) -> Result<(), SnapshotError> {
    let window = t.opts.chunks_inflight_per_stream;
    let peer = conn.peer;
    loop {
        while inflight.requested.len() + inflight.writes.len() < window {
            let Some(chunk) = t.table().claim() else {
                break;
            };
            inflight.requested.push_back(chunk);
            let req = ChunkRequest {
                meta: t.meta,
                chunk_bytes: t.opts.chunk_bytes,
                chunk,
            };
            conn.send(t.opts.io_timeout, "writing a request", |enc, dst| {
                req.encode(enc, dst)
            })
            .await?;
            t.requests_sent.fetch_add(1, Ordering::Relaxed);
        }
        if inflight.requested.is_empty() && inflight.writes.is_empty() {
            return Ok(());
        }
        tokio::select! {
            written = wait_write(t, &mut inflight.writes), if !inflight.writes.is_empty() => {
                written?;
            }
            frame = within(t.opts.io_timeout, peer, "waiting for a chunk", conn.read_frame()),
                if !inflight.requested.is_empty() =>
            {
                let Some(frame) = frame?? else {
                    return Err(conn.error(
                        "closed with chunks requested",
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                };
                match frame.ty {
                    FrameType::SnapshotChunk => receive_chunk(t, conn, inflight, &frame.body)?,
                    FrameType::SnapshotAck => return Err(refused(conn, &frame.body)),
                    ty => return Err(conn.protocol(format!("unexpected {ty:?} frame"))),
                }
            }
        }
    }
}

/// Checks a chunk frame against the request it answers; writes it if its
/// checksum holds, gives it back if not.
fn receive_chunk(
    t: &Transfer,
    conn: &Conn,
    inflight: &mut Inflight,
    body: &bytes::Bytes,
) -> Result<(), SnapshotError> {
    let (header, data) = ChunkHeader::decode(body).map_err(|source| SnapshotError::Wire {
        peer: conn.peer,
        source,
    })?;
    let expected = *inflight
        .requested
        .front()
        .expect("a chunk is read only while one is requested");
    if header.index != t.meta.index || header.term != t.meta.term || header.chunk != expected {
        return Err(conn.protocol(format!(
            "chunk {} of snapshot ({}, {}) arrived; chunk {expected} of ({}, {}) was asked for next",
            header.chunk, header.index, header.term, t.meta.index, t.meta.term
        )));
    }
    let want = t
        .meta
        .chunk_len(t.opts.chunk_bytes, expected)
        .expect("only chunks inside the snapshot are claimed");
    if data.len() != want as usize {
        return Err(conn.protocol(format!(
            "chunk {expected} carries {} bytes, not {want}",
            data.len()
        )));
    }
    inflight.requested.pop_front();
    let actual = crc32c::crc32c(&data);
    if actual != header.data_crc {
        let count = t.corrupt.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(peer = %conn.peer, chunk = expected, expected = header.data_crc, actual,
            "snapshot chunk fails its checksum; asking again");
        // Given back before any error, so that the table stays whole.
        t.table().release(expected);
        if count > t.opts.chunk_retries_max {
            return Err(SnapshotError::ChunkChecksum {
                chunk: expected,
                count,
            });
        }
        return Ok(());
    }
    t.bytes_received
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    let file = t.file.clone();
    let offset = expected * u64::from(t.opts.chunk_bytes);
    inflight.writes.spawn_blocking(move || {
        let written = file.write_all_at(&data, offset);
        if written.is_ok() {
            start_writeback(&file, offset, data.len() as u64);
        }
        (expected, actual, written)
    });
    Ok(())
}

/// Waits for one of the stream's chunk writes (there must be one) and
/// records it; a failed write is fatal to the receive.
async fn wait_write(
    t: &Transfer,
    writes: &mut JoinSet<(u64, u32, io::Result<()>)>,
) -> Result<(), SnapshotError> {
    let io_error = |source| SnapshotError::Io {
        op: "writing",
        path: t.tmp_path.clone(),
        source,
    };
    let joined = tokio::time::timeout(t.opts.disk_timeout, writes.join_next())
        .await
        .map_err(|_| io_error(io::ErrorKind::TimedOut.into()))?;
    match joined.expect("waited only with writes in flight") {
        Ok((chunk, crc, Ok(()))) => {
            t.chunk_crcs.lock().unwrap_or_else(|e| e.into_inner())[chunk as usize] = crc;
            t.table().complete(chunk);
            Ok(())
        }
        Ok((_, _, Err(e))) => Err(io_error(e)),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(io_error(io::Error::other("chunk write cancelled"))),
    }
}

/// Starts writing `len` bytes at `offset` of `file` back to the disk now,
/// without waiting, so that the fsync at the end finds little left to
/// write. Only a hint: its errors are the final fsync's to report.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor for the call's duration; the kernel only
    // reads the arguments.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// Tells the sender the snapshot is safe here, on one open connection;
/// best effort (the receive is complete either way).
async fn send_done(t: &Transfer, mut conns: Vec<Conn>) {
    let Some(conn) = conns.first_mut() else {
        return;
    };
    let ack = SnapshotAck {
        index: t.meta.index,
        term: t.meta.term,
        status: AckStatus::Done,
        detail: t.meta.len,
    };
    if let Err(error) = conn
        .send(DONE_ACK_TIMEOUT, "writing Done", |enc, dst| {
            ack.encode(enc, dst)
        })
        .await
    {
        debug!(peer = %t.peer(), %error, "could not acknowledge the snapshot");
    }
}
