//! The sending side: [`SnapshotServer`] accepts snapshot connections and
//! answers chunk requests from files a [`SnapshotProvider`] names.
//!
//! Each connection is served on its own task, its requests one at a time
//! and in order: read the chunk with a positional read straight into the
//! frame buffer, checksum it, write the frame. The server never pushes:
//! the receiver's requests pace it, and TCP's flow control bounds what is
//! queued. Per connection it holds one frame buffer (one chunk) and one
//! open file; connections past `connections_max` are refused as `Busy`.
//! It must never read outside the file it declared, nor keep a connection
//! whose peer breaks the protocol (that peer is logged, and only that
//! connection closes).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use skiff_raft::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::conn::{tls_handshake, within, write_flushed, Conn};
use super::wire::{
    AckStatus, ChunkHeader, ChunkRequest, SnapshotAck, ACK_BODY_LEN, CHUNK_CRC_OFFSET,
    CHUNK_PREFIX_LEN, REQUEST_BODY_LEN,
};
use super::{blocking, Refusal, SnapshotError, SnapshotMeta, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN};
use crate::codec::{encode_hello_frame, Channel, Hello, HELLO_BODY_LEN};
use crate::frame::{FrameEncoder, FrameType, FRAME_HEADER_LEN};
use crate::tls::{PeerStream, PeerTls};

/// Largest frame a receiver sends (a request, an ack, a Hello).
const SMALL_FRAME_MAX: usize =
    FRAME_HEADER_LEN + max(REQUEST_BODY_LEN, HELLO_BODY_LEN, ACK_BODY_LEN);
/// Read room the server reserves: requests are small, so a flood of them
/// waits in the kernel, not in the server's memory.
const SERVER_READ_RESERVE: usize = 512;
/// After a refusal, how long and how much the server keeps reading (and
/// discarding) the receiver's pipelined requests before closing, so that
/// closing with unread bytes does not reset the connection before the
/// refusal is read.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
const LINGER_BYTES_MAX: usize = 64 << 10;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

const fn max(a: usize, b: usize, c: usize) -> usize {
    let ab = if a > b { a } else { b };
    if ab > c {
        ab
    } else {
        c
    }
}

/// Where the sender finds snapshot files.
pub trait SnapshotProvider: Send + Sync + 'static {
    /// The file holding snapshot `index` and what it is, or `None` if none
    /// is held. Called on a runtime thread whenever a connection asks for a
    /// snapshot it has not opened yet: it must not block (a map lookup).
    /// The file is opened then, so it may be unlinked or replaced afterwards
    /// without disturbing transfers under way.
    fn snapshot(&self, index: u64) -> Option<(PathBuf, SnapshotMeta)>;
}

impl<F> SnapshotProvider for F
where
    F: Fn(u64) -> Option<(PathBuf, SnapshotMeta)> + Send + Sync + 'static,
{
    fn snapshot(&self, index: u64) -> Option<(PathBuf, SnapshotMeta)> {
        self(index)
    }
}

/// A [`SnapshotProvider`] that is a map from index to file.
#[derive(Debug, Default)]
pub struct SnapshotFiles {
    files: Mutex<HashMap<u64, (PathBuf, SnapshotMeta)>>,
}

impl SnapshotFiles {
    pub fn new() -> SnapshotFiles {
        SnapshotFiles::default()
    }

    /// Serves `path` as snapshot `meta.index` (replacing any other).
    pub fn insert(&self, path: PathBuf, meta: SnapshotMeta) {
        self.lock().insert(meta.index, (path, meta));
    }

    pub fn remove(&self, index: u64) {
        self.lock().remove(&index);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (PathBuf, SnapshotMeta)>> {
        // The map is valid whatever a panicking holder was doing.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SnapshotProvider for SnapshotFiles {
    fn snapshot(&self, index: u64) -> Option<(PathBuf, SnapshotMeta)> {
        self.lock().get(&index).cloned()
    }
}

/// Faults the server injects, for tests that prove detection and
/// resumption. The default injects nothing.
#[derive(Debug, Clone, Default)]
pub struct ServerFaults {
    /// The first time this chunk is served, flip a bit of its data after
    /// its `data_crc` is computed (the frame checksum is computed over the
    /// flipped data, so only the chunk's own checksum can catch it).
    pub corrupt_chunk_once: Option<u64>,
    /// The first connection to have served this many chunks is closed
    /// abruptly right after the last of them.
    pub cut_after_chunks_once: Option<u64>,
}

/// How a [`SnapshotServer`] runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Receivers must announce this cluster in their Hello.
    pub cluster_id: u64,
    /// This node: receivers' Hellos must be addressed to it.
    pub node_id: NodeId,
    /// Connections served at once; more are refused as `Busy`.
    pub connections_max: usize,
    /// Largest chunk served (bounds the frame buffer of each connection).
    pub chunk_bytes_max: u32,
    /// For a new connection's Hello to arrive.
    pub handshake_timeout: Duration,
    /// For the next request on an open connection; past it, it is closed.
    pub idle_timeout: Duration,
    /// For one frame to be written.
    pub io_timeout: Duration,
    /// For one file operation (open, one chunk's read).
    pub disk_timeout: Duration,
    pub faults: ServerFaults,
    /// TLS on every connection (the handshake within `handshake_timeout`,
    /// before any frame); plaintext when `None`.
    pub tls: Option<PeerTls>,
}

impl ServerOptions {
    pub fn new(cluster_id: u64, node_id: NodeId) -> ServerOptions {
        ServerOptions {
            cluster_id,
            node_id,
            connections_max: 64,
            chunk_bytes_max: CHUNK_BYTES_MAX,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(30),
            disk_timeout: Duration::from_secs(30),
            faults: ServerFaults::default(),
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |what: String| Err(SnapshotError::Invalid(what));
        if self.connections_max == 0 {
            return bad("connections_max must be at least 1".into());
        }
        if !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&self.chunk_bytes_max) {
            return bad(format!(
                "chunk_bytes_max {} outside {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX}",
                self.chunk_bytes_max
            ));
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
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

/// What a [`SnapshotServer`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted and served (refused ones not included).
    pub connections: u64,
    /// Connections refused because `connections_max` were open.
    pub connections_busy: u64,
    /// Chunk frames written, repeats included.
    pub chunks_served: u64,
    /// Data bytes in them.
    pub bytes_served: u64,
    /// `Done` acks received: receivers holding a verified, durable copy.
    pub transfers_completed: u64,
    /// Connections that ended on an error (logged with the peer).
    pub connection_errors: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    connections_busy: AtomicU64,
    chunks_served: AtomicU64,
    bytes_served: AtomicU64,
    transfers_completed: AtomicU64,
    connection_errors: AtomicU64,
}

struct Shared {
    opts: ServerOptions,
    provider: Arc<dyn SnapshotProvider>,
    counters: Counters,
    corrupted: AtomicBool,
    cut: AtomicBool,
}

impl Shared {
    fn take_corrupt(&self, chunk: u64) -> bool {
        self.opts.faults.corrupt_chunk_once == Some(chunk)
            && !self.corrupted.swap(true, Ordering::SeqCst)
    }

    fn take_cut(&self, served_on_conn: u64) -> bool {
        self.opts.faults.cut_after_chunks_once == Some(served_on_conn)
            && !self.cut.swap(true, Ordering::SeqCst)
    }
}

/// Serves snapshot chunks on a listener until dropped (dropping it closes
/// the listener and every connection).
pub struct SnapshotServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl SnapshotServer {
    /// Starts serving `listener` on the current tokio runtime: snapshot
    /// connections addressed to `opts.node_id` in `opts.cluster_id`, files
    /// from `provider`.
    pub fn serve(
        listener: TcpListener,
        provider: Arc<dyn SnapshotProvider>,
        opts: ServerOptions,
    ) -> Result<SnapshotServer, SnapshotError> {
        opts.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| SnapshotError::Invalid(format!("listener has no local address: {e}")))?;
        let shared = Arc::new(Shared {
            opts,
            provider,
            counters: Counters::default(),
            corrupted: AtomicBool::new(false),
            cut: AtomicBool::new(false),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(SnapshotServer {
            local_addr,
            shared,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections: get(&c.connections),
            connections_busy: get(&c.connections_busy),
            chunks_served: get(&c.chunks_served),
            bytes_served: get(&c.bytes_served),
            transfers_completed: get(&c.transfers_completed),
            connection_errors: get(&c.connection_errors),
        }
    }
}

impl Drop for SnapshotServer {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it drops them.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.opts.connections_max));
    // Bound: `connections_max` tasks (each holds a slot).
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                        let shared = shared.clone();
                        conns.spawn(async move {
                            serve_connection(stream, peer, &shared).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        shared.counters.connections_busy.fetch_add(1, Ordering::Relaxed);
                        if shared.opts.tls.is_none() {
                            refuse_busy(&stream, peer);
                        }
                        // Under TLS no frame can go before the handshake:
                        // the connection is just closed (the receiver
                        // retries it like a broken one).
                    }
                },
                Err(e) => {
                    warn!(error = %e, "snapshot server: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Tells a connection over `connections_max` to come back later, without
/// waiting: a fresh socket's send buffer takes one small frame at once.
fn refuse_busy(stream: &TcpStream, peer: SocketAddr) {
    let mut buf = BytesMut::new();
    let ack = SnapshotAck {
        index: 0,
        term: 0,
        status: AckStatus::Busy,
        detail: 0,
    };
    if ack
        .encode(&FrameEncoder::new(SMALL_FRAME_MAX), &mut buf)
        .is_ok()
    {
        let _ = stream.try_write(&buf);
    }
    debug!(%peer, "snapshot server: busy, connection refused");
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    match serve(stream, peer, shared).await {
        Ok(()) => debug!(%peer, "snapshot connection closed"),
        Err(error) => {
            shared
                .counters
                .connection_errors
                .fetch_add(1, Ordering::Relaxed);
            warn!(%peer, %error, "snapshot connection closed on error");
        }
    }
}

/// A snapshot file a connection has open.
struct Open {
    meta: SnapshotMeta,
    path: PathBuf,
    file: Arc<File>,
}

async fn serve(tcp: TcpStream, peer: SocketAddr, shared: &Shared) -> Result<(), SnapshotError> {
    let opts = &shared.opts;
    tcp.set_nodelay(true)
        .map_err(|e| SnapshotError::Connection {
            peer,
            what: "setting TCP_NODELAY",
            source: e,
        })?;
    let stream = match &opts.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => tls_handshake(opts.handshake_timeout, peer, tls.accept(tcp)).await?,
    };
    let chunk_frame_max = FRAME_HEADER_LEN + CHUNK_PREFIX_LEN + opts.chunk_bytes_max as usize;
    let mut conn = Conn::new(
        stream,
        peer,
        SMALL_FRAME_MAX,
        chunk_frame_max,
        SERVER_READ_RESERVE,
    );

    let frame = conn
        .expect_frame(opts.handshake_timeout, "waiting for Hello")
        .await?;
    let hello = match frame.ty {
        FrameType::Hello => {
            Hello::decode(&frame.body).map_err(|source| SnapshotError::Wire { peer, source })?
        }
        ty => return Err(conn.protocol(format!("first frame is {ty:?}, not Hello"))),
    };
    if hello.channel != Channel::Snapshot
        || hello.cluster_id != opts.cluster_id
        || hello.to != opts.node_id
    {
        refuse(&mut conn, opts, 0, 0, bad_request(opts)).await;
        return Err(conn.protocol(format!(
            "Hello {hello:?} is not a snapshot connection to node {} of cluster {}",
            opts.node_id, opts.cluster_id
        )));
    }
    let reply = Hello {
        cluster_id: opts.cluster_id,
        from: opts.node_id,
        to: hello.from,
        channel: Channel::Snapshot,
    };
    conn.send(opts.io_timeout, "writing Hello", |enc, dst| {
        encode_hello_frame(enc, &reply, dst)
    })
    .await?;

    let mut open: Option<Open> = None;
    // The chunk frame under construction; capacity: one chunk frame.
    let mut frame_buf = BytesMut::new();
    let mut served = 0u64;
    loop {
        let peer = conn.peer;
        let Some(frame) = within(
            opts.idle_timeout,
            peer,
            "waiting for a request",
            conn.read_frame(),
        )
        .await??
        else {
            return Ok(());
        };
        match frame.ty {
            FrameType::SnapshotRequest => {
                let req = ChunkRequest::decode(&frame.body)
                    .map_err(|source| SnapshotError::Wire { peer, source })?;
                let Some(chunk_len) = check_request(&req, opts) else {
                    refuse(
                        &mut conn,
                        opts,
                        req.meta.index,
                        req.meta.term,
                        bad_request(opts),
                    )
                    .await;
                    return Err(conn.protocol(format!("unservable request {req:?}")));
                };
                if open.as_ref().is_none_or(|o| o.meta != req.meta) {
                    match open_snapshot(shared, &req.meta).await {
                        Ok(o) => open = Some(o),
                        Err(refusal) => {
                            refuse(&mut conn, opts, req.meta.index, req.meta.term, refusal).await;
                            debug!(%peer, ?refusal, meta = ?req.meta, "snapshot request refused");
                            return Ok(());
                        }
                    }
                }
                let o = open.as_ref().expect("opened above");
                frame_buf = serve_chunk(shared, &mut conn, o, &req, chunk_len, frame_buf).await?;
                served += 1;
                shared
                    .counters
                    .chunks_served
                    .fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .bytes_served
                    .fetch_add(u64::from(chunk_len), Ordering::Relaxed);
                if shared.take_cut(served) {
                    warn!(%peer, served, "fault injection: cutting the connection");
                    return Ok(());
                }
            }
            FrameType::SnapshotAck => {
                let ack = SnapshotAck::decode(&frame.body)
                    .map_err(|source| SnapshotError::Wire { peer, source })?;
                if ack.status != AckStatus::Done {
                    return Err(conn.protocol(format!("receiver sent {ack:?}")));
                }
                shared
                    .counters
                    .transfers_completed
                    .fetch_add(1, Ordering::Relaxed);
                info!(%peer, index = ack.index, term = ack.term, "snapshot transfer completed");
                return Ok(());
            }
            ty => return Err(conn.protocol(format!("unexpected {ty:?} frame"))),
        }
    }
}

fn bad_request(opts: &ServerOptions) -> Refusal {
    Refusal::BadRequest {
        chunk_bytes_max: u64::from(opts.chunk_bytes_max),
    }
}

/// The length of the requested chunk, if the request is one this server
/// serves: a chunk size within its bounds, a chunk inside the snapshot.
fn check_request(req: &ChunkRequest, opts: &ServerOptions) -> Option<u32> {
    if !(CHUNK_BYTES_MIN..=opts.chunk_bytes_max).contains(&req.chunk_bytes) {
        return None;
    }
    req.meta.chunk_len(req.chunk_bytes, req.chunk)
}

/// Opens the file the provider holds as `meta`, or says why not.
async fn open_snapshot(shared: &Shared, meta: &SnapshotMeta) -> Result<Open, Refusal> {
    let Some((path, held)) = shared.provider.snapshot(meta.index) else {
        return Err(Refusal::Unavailable);
    };
    if held != *meta {
        return Err(Refusal::Mismatch);
    }
    let p = path.clone();
    let opened = blocking(shared.opts.disk_timeout, move || {
        let file = File::open(&p)?;
        let len = file.metadata()?.len();
        Ok((file, len))
    })
    .await;
    match opened {
        Ok((file, len)) if len == held.len => Ok(Open {
            meta: held,
            path,
            file: Arc::new(file),
        }),
        Ok((_, len)) => {
            warn!(
                ?path,
                len,
                declared = held.len,
                "snapshot file is not the length declared"
            );
            Err(Refusal::Unavailable)
        }
        Err(error) => {
            warn!(?path, %error, "cannot open snapshot file");
            Err(Refusal::Unavailable)
        }
    }
}

/// Reads, frames and writes one chunk. `buf` is the connection's frame
/// buffer, handed to the blocking read and back.
async fn serve_chunk(
    shared: &Shared,
    conn: &mut Conn,
    open: &Open,
    req: &ChunkRequest,
    chunk_len: u32,
    mut buf: BytesMut,
) -> Result<BytesMut, SnapshotError> {
    let corrupt = shared.take_corrupt(req.chunk);
    if corrupt {
        warn!(peer = %conn.peer, chunk = req.chunk, "fault injection: corrupting a chunk");
    }
    let file = open.file.clone();
    let enc = conn.enc.clone();
    let meta = open.meta;
    let (chunk, chunk_bytes) = (req.chunk, req.chunk_bytes);
    let buf = blocking(shared.opts.disk_timeout, move || {
        fill_chunk_frame(
            &enc,
            &file,
            &meta,
            chunk,
            chunk_bytes,
            chunk_len,
            corrupt,
            &mut buf,
        )?;
        Ok(buf)
    })
    .await
    .map_err(|source| SnapshotError::Io {
        op: "reading",
        path: open.path.clone(),
        source,
    })?;
    let peer = conn.peer;
    within(
        shared.opts.io_timeout,
        peer,
        "writing a chunk",
        write_flushed(&mut conn.stream, &buf),
    )
    .await?
    .map_err(|e| conn.error("writing a chunk", e))?;
    Ok(buf)
}

/// Builds the frame of chunk `chunk` in `dst`: the data read from `file`
/// straight into the frame, its checksum, then (for a fault) a flipped bit.
#[allow(clippy::too_many_arguments)]
fn fill_chunk_frame(
    enc: &FrameEncoder,
    file: &File,
    meta: &SnapshotMeta,
    chunk: u64,
    chunk_bytes: u32,
    chunk_len: u32,
    corrupt: bool,
    dst: &mut BytesMut,
) -> io::Result<()> {
    let offset = chunk * u64::from(chunk_bytes);
    let data_len = chunk_len as usize;
    let header = ChunkHeader {
        index: meta.index,
        term: meta.term,
        chunk,
        data_crc: 0,
        data_len: chunk_len,
    };
    dst.clear();
    let mut read = Ok(());
    enc.encode_with(
        dst,
        FrameType::SnapshotChunk,
        CHUNK_PREFIX_LEN + data_len,
        |dst| {
            let start = dst.len();
            header.put(dst);
            dst.resize(start + CHUNK_PREFIX_LEN + data_len, 0);
            let body = &mut dst[start..];
            let (prefix, data) = body.split_at_mut(CHUNK_PREFIX_LEN);
            read = file.read_exact_at(data, offset);
            let crc = crc32c::crc32c(data);
            prefix[CHUNK_CRC_OFFSET..CHUNK_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
            if corrupt && !data.is_empty() {
                data[data_len / 2] ^= 0x10;
            }
        },
    )
    .map_err(io::Error::other)?;
    read
}

/// Sends a refusal and closes gracefully: stop writing, then read (and
/// drop) what the receiver had pipelined until it closes, within bounds,
/// so that the refusal is not lost to a reset.
async fn refuse(conn: &mut Conn, opts: &ServerOptions, index: u64, term: u64, refusal: Refusal) {
    let (status, detail) = match refusal {
        Refusal::Unavailable => (AckStatus::Unavailable, 0),
        Refusal::Mismatch => (AckStatus::Mismatch, 0),
        Refusal::Busy => (AckStatus::Busy, 0),
        Refusal::BadRequest { chunk_bytes_max } => (AckStatus::BadRequest, chunk_bytes_max),
    };
    let ack = SnapshotAck {
        index,
        term,
        status,
        detail,
    };
    if conn
        .send(opts.io_timeout, "writing a refusal", |enc, dst| {
            ack.encode(enc, dst)
        })
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIMEOUT, async {
        let _ = conn.stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES_MAX {
            match conn.stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
