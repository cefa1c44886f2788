//! The task of one peer: connect, handshake, then write everything queued
//! for the peer, coalesced, until the connection breaks; then back off and
//! reconnect.
//!
//! Pipelined: the writer never waits for a response, only for the socket
//! to take its bytes. Whatever queued while a write was in progress goes
//! into the next frame, so the busier the link, the fewer and larger the
//! writes. While no connection is up `send` refuses messages, and what was
//! queued when a connection broke is dropped (counted): Raft retransmits,
//! and a backlog delivered late after an outage would be stale anyway.
//!
//! The write side is shared with the direct path of `send_batch` (see
//! `tcp::Direct`): a batch for an idle link is written by the sending
//! thread; this task finishes a frame the socket took only in part
//! (`Queued::Flush`) and counts what it wrote off `Direct::queued`.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::tls::PeerStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, Instant};

use super::conn::{check_hello, read_hello, write_hello, ConnError, End};
use super::metrics::{add, inc};
use super::tcp::{stopped, PeerSlot, Queued, Shared};

/// Consecutive failed connects to a peer after which the outage is logged
/// as a warning (with the default backoff, about 1.5 s of it).
const CONNECT_FAILURES_WARNED: u64 = 5;
use crate::codec::{
    encode_raft_frame, encode_raft_frame_sized, Channel, Hello, RAFT_BODY_PREFIX_LEN,
};
use crate::frame::{FrameEncoder, FRAME_HEADER_LEN};

/// A write buffer grown past this (by one large message) is released after
/// the write rather than kept for the connection's life.
const WRITE_BUF_KEEP_MAX: usize = 4 << 20;
/// Bytes read at once from an outbound connection, where the peer should
/// send nothing: only its close is expected.
const PROBE_LEN: usize = 64;

/// Runs peer `slot` until it is stopped (removed, or shutdown).
pub(crate) async fn run_peer(
    shared: Arc<Shared>,
    slot: Arc<PeerSlot>,
    mut queue: mpsc::Receiver<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let mut backoff = cfg.reconnect_backoff_min;
    let mut failures: u64 = 0;
    loop {
        let attempt = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            r = connect(&shared, &slot) => r,
        };
        match attempt {
            Ok(stream) => {
                inc(&shared.counters.connects);
                tracing::info!(
                    node = cfg.id,
                    peer_id = slot.id,
                    peer_addr = %slot.addr,
                    failed_attempts = failures,
                    "connected to peer"
                );
                backoff = cfg.reconnect_backoff_min;
                failures = 0;
                // A send that saw the last connection up just before it
                // broke may have queued since the drain: stale, drop it.
                let mut lost = drain(&mut queue);
                // Plaintext: the write side is shared with the direct path.
                // TLS: a session's writes go through this task alone.
                let (rd, mut wr, direct) = match stream {
                    PeerStream::Plain(tcp) => {
                        let (rd, wr) = tcp.into_split();
                        let wr = Arc::new(wr);
                        (
                            PeerRead::Plain(rd),
                            PeerWrite::Plain(Arc::clone(&wr)),
                            Some(wr),
                        )
                    }
                    tls => {
                        let (rd, wr) = tokio::io::split(tls);
                        (PeerRead::Tls(rd), PeerWrite::Tls(wr), None)
                    }
                };
                // Before sends see the link up: nothing queued, nothing owed.
                slot.direct().reset(direct);
                slot.set_connected(true);
                let end = write_loop(
                    &shared, &slot, rd, &mut wr, &mut queue, &mut stop, &mut lost,
                )
                .await;
                slot.set_connected(false);
                lost += drain(&mut queue);
                slot.direct().reset(None);
                add(&shared.counters.messages_dropped_on_disconnect, lost as u64);
                match end {
                    Ok(End::Stopped) => break,
                    Ok(end) => tracing::info!(
                        node = cfg.id,
                        peer_id = slot.id,
                        peer_addr = %slot.addr,
                        ?end,
                        messages_dropped = lost,
                        "connection to peer closed; reconnecting"
                    ),
                    Err(error) => {
                        inc(&shared.counters.connections_closed_on_error);
                        tracing::warn!(
                            node = cfg.id,
                            peer_id = slot.id,
                            peer_addr = %slot.addr,
                            %error,
                            messages_dropped = lost,
                            "connection to peer failed; reconnecting"
                        );
                    }
                }
            }
            Err(error) => {
                inc(&shared.counters.connect_failures);
                // Peers starting one after another refuse the first tries:
                // the first failure is news, an outage that lasts
                // (`CONNECT_FAILURES_WARNED`) a warning, the rest debug.
                if failures == 0 || failures == CONNECT_FAILURES_WARNED {
                    if failures == CONNECT_FAILURES_WARNED {
                        tracing::warn!(
                            node = cfg.id,
                            peer_id = slot.id,
                            peer_addr = %slot.addr,
                            %error,
                            failures = failures + 1,
                            "cannot connect to peer; retrying with backoff"
                        );
                    } else {
                        tracing::info!(
                            node = cfg.id,
                            peer_id = slot.id,
                            peer_addr = %slot.addr,
                            %error,
                            "cannot connect to peer yet; retrying with backoff"
                        );
                    }
                } else {
                    tracing::debug!(
                        node = cfg.id,
                        peer_id = slot.id,
                        peer_addr = %slot.addr,
                        %error,
                        failures,
                        ?backoff,
                        "cannot connect to peer"
                    );
                }
                failures += 1;
            }
        }
        // After a failure, and after a broken connection too: a peer that
        // accepts and at once drops connections must not make this spin.
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            () = sleep(backoff) => {}
        }
        if failures > 0 {
            backoff = backoff.saturating_mul(2).min(cfg.reconnect_backoff_max);
        }
    }
    slot.set_connected(false);
    drain(&mut queue);
    slot.direct().reset(None);
    tracing::debug!(node = cfg.id, peer_id = slot.id, "peer task stopped");
}

/// Opens a connection to the peer and exchanges Hellos, each step within
/// its timeout.
async fn connect(shared: &Shared, slot: &PeerSlot) -> Result<PeerStream, ConnError> {
    let cfg = &shared.cfg;
    let tcp = tokio::time::timeout(
        cfg.connect_timeout,
        crate::connect_from(&slot.addr, cfg.local_ip),
    )
    .await
    .map_err(|_| ConnError::Timeout {
        what: "the TCP connect",
        after: cfg.connect_timeout,
    })??;
    // Frames are coalesced here; Nagle would only add latency.
    tcp.set_nodelay(true)?;
    let mut stream = match &cfg.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => {
            tokio::time::timeout(cfg.handshake_timeout, tls.connect(slot.addr.host(), tcp))
                .await
                .map_err(|_| ConnError::Timeout {
                    what: "the TLS handshake",
                    after: cfg.handshake_timeout,
                })?
                .map_err(|e| ConnError::Refused {
                    reason: format!("TLS handshake: {e}"),
                })?
        }
    };
    let hello = Hello {
        cluster_id: cfg.cluster_id,
        from: cfg.id,
        to: slot.id,
        channel: Channel::Raft,
    };
    let mut buf = BytesMut::new();
    let reply = tokio::time::timeout(cfg.handshake_timeout, async {
        write_hello(&mut stream, &hello, &shared.counters).await?;
        read_hello(&mut stream, &mut buf, &shared.counters).await
    })
    .await
    .map_err(|_| ConnError::Timeout {
        what: "the peer's Hello",
        after: cfg.handshake_timeout,
    })??;
    check_hello(&reply, cfg.cluster_id, cfg.id, Some(slot.id))?;
    if !buf.is_empty() {
        return Err(ConnError::UnexpectedBytes);
    }
    Ok(stream)
}

/// Writes what `queue` holds to `stream` until the connection breaks or
/// the peer is stopped. Messages taken from the queue but not written are
/// added to `lost`.
async fn write_loop(
    shared: &Shared,
    slot: &PeerSlot,
    mut rd: PeerRead,
    wr: &mut PeerWrite,
    queue: &mut mpsc::Receiver<Queued>,
    stop: &mut watch::Receiver<bool>,
    lost: &mut usize,
) -> Result<End, ConnError> {
    let cfg = &shared.cfg;
    let enc = FrameEncoder::new(cfg.frame_bytes_max);
    let mut buf = BytesMut::with_capacity(cfg.coalesce_bytes_max.min(WRITE_BUF_KEEP_MAX));
    let mut batch = Vec::new();
    // A message taken from the queue that did not fit in the last frame.
    let mut carry: Option<Queued> = None;
    let mut probe = [0u8; PROBE_LEN];
    let keepalive = sleep(cfg.keepalive_interval);
    tokio::pin!(keepalive);
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => tokio::select! {
                biased;
                () = stopped(stop) => return Ok(End::Stopped),
                q = queue.recv() => match q {
                    Some(q) => q,
                    // The slot (holding the sender) outlives this task.
                    None => return Ok(End::Stopped),
                },
                r = rd.read(&mut probe) => return match r {
                    Ok(0) => Ok(End::PeerClosed),
                    Ok(_) => Err(ConnError::UnexpectedBytes),
                    Err(e) => Err(e.into()),
                },
                () = &mut keepalive => {
                    keepalive.as_mut().reset(Instant::now() + cfg.keepalive_interval);
                    {
                        let mut direct = slot.direct();
                        // Something is queued or owed: that goes first, and
                        // keeps the link alive as well.
                        if direct.queued > 0 || direct.rest.is_some() {
                            continue;
                        }
                        direct.writer_busy = true;
                    }
                    buf.clear();
                    let written = match encode_raft_frame(&enc, &[], &mut buf) {
                        Ok(len) => write_frame(shared, wr, &buf, stop).await.map(|end| (len, end)),
                        Err(e) => Err(e.into()),
                    };
                    slot.direct().writer_busy = false;
                    let (len, end) = written?;
                    if let Some(end) = end {
                        return Ok(end);
                    }
                    inc(&shared.counters.keepalives_sent);
                    add(&shared.counters.bytes_sent, len as u64);
                    continue;
                }
            },
        };
        let (msg, len) = match first {
            Queued::Msg { msg, len } => (msg, len),
            Queued::Flush => {
                // The end of a frame a direct write began: nothing was
                // queued before it, and nothing may go out before it.
                let rest = slot.direct().rest.take();
                if let Some(rest) = rest {
                    if let Some(end) = write_frame(shared, wr, &rest, stop).await? {
                        return Ok(end);
                    }
                }
                let mut direct = slot.direct();
                direct.queued = direct.queued.saturating_sub(1);
                drop(direct);
                continue;
            }
        };
        // Everything queued, up to the byte bound; a message that would
        // cross it starts the next frame (alone, if it is over the bound by
        // itself: `send` checked that it fits a frame).
        let mut body_len = RAFT_BODY_PREFIX_LEN + len;
        batch.push(msg);
        while body_len < cfg.coalesce_bytes_max {
            match queue.try_recv() {
                Ok(Queued::Msg { msg, len }) if body_len + len <= cfg.coalesce_bytes_max => {
                    body_len += len;
                    batch.push(msg);
                }
                Ok(q) => {
                    carry = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        buf.clear();
        let encoded = encode_raft_frame_sized(&enc, &batch, body_len, &mut buf);
        let count = batch.len();
        batch.clear();
        let frame_len = match encoded {
            Ok(len) => len,
            Err(e) => {
                *lost += count + usize::from(carry.is_some());
                return Err(e.into());
            }
        };
        debug_assert_eq!(frame_len, FRAME_HEADER_LEN + body_len);
        match write_frame(shared, wr, &buf, stop).await {
            Ok(None) => {}
            Ok(Some(end)) => return Ok(end),
            Err(e) => {
                *lost += count + usize::from(carry.is_some());
                return Err(e);
            }
        }
        // Written: the direct path may go once nothing else is owed.
        {
            let mut direct = slot.direct();
            direct.queued = direct.queued.saturating_sub(count);
        }
        add(&shared.counters.messages_sent, count as u64);
        inc(&shared.counters.frames_sent);
        add(&shared.counters.bytes_sent, frame_len as u64);
        tracing::trace!(peer_id = slot.id, count, frame_len, "frame written");
        keepalive
            .as_mut()
            .reset(Instant::now() + cfg.keepalive_interval);
        if buf.capacity() > WRITE_BUF_KEEP_MAX {
            buf = BytesMut::with_capacity(cfg.coalesce_bytes_max.min(WRITE_BUF_KEEP_MAX));
        }
    }
}

/// Writes one frame (or the rest of one) within `write_timeout`;
/// `Some(End::Stopped)` if the peer was stopped meanwhile. The write side
/// is shared with the direct path, which writes only while this task has
/// nothing in hand.
async fn write_frame(
    shared: &Shared,
    wr: &mut PeerWrite,
    frame: &[u8],
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<End>, ConnError> {
    let after = shared.cfg.write_timeout;
    tokio::select! {
        biased;
        () = stopped(stop) => Ok(Some(End::Stopped)),
        r = tokio::time::timeout(after, wr.write_all(frame)) => match r {
            Ok(Ok(())) => Ok(None),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ConnError::Timeout { what: "a frame to be written", after }),
        },
    }
}

async fn write_all(wr: &OwnedWriteHalf, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        wr.writable().await?;
        match wr.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The read side of an outbound connection (only its close is expected).
enum PeerRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<PeerStream>),
}

impl PeerRead {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PeerRead::Plain(rd) => rd.read(buf).await,
            PeerRead::Tls(rd) => rd.read(buf).await,
        }
    }
}

/// The write side of an outbound connection.
enum PeerWrite {
    /// Shared with the direct path of `send_batch`.
    Plain(Arc<OwnedWriteHalf>),
    Tls(WriteHalf<PeerStream>),
}

impl PeerWrite {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            PeerWrite::Plain(wr) => write_all(wr, bytes).await,
            PeerWrite::Tls(wr) => {
                wr.write_all(bytes).await?;
                // The session buffers records: push them to the socket.
                wr.flush().await
            }
        }
    }
}

/// Empties the queue; returns how many messages were in it.
fn drain(queue: &mut mpsc::Receiver<Queued>) -> usize {
    let mut n = 0;
    while queue.try_recv().is_ok() {
        n += 1;
    }
    n
}
