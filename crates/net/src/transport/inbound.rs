//! Inbound connections: the accept loop, the handshake check, and the
//! reader that cuts frames out of the socket's bytes and hands their
//! messages to the inbox.
//!
//! Each connection is read into one `BytesMut`; [`FrameDecoder`] splits
//! each verified frame off it and [`decode_messages`] slices payloads out
//! of the frame (no copy). A bad byte ends only its connection, logged
//! with the peer's address and id. The reader waits for inbox room rather
//! than drop a message, and stops reading its socket meanwhile: that is the
//! backpressure.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use skiff_raft::{Message, NodeId};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::conn::{check_hello, read_hello, write_hello, ConnError, End};
use super::metrics::{add, inc};
use super::tcp::{stopped, Shared};
use crate::codec::{decode_messages, Channel, Hello};
use crate::frame::{FrameDecoder, FrameType};
use crate::tls::PeerStream;
use crate::WireError;

/// Pause after a failed `accept` (usually out of file descriptors), so that
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections until shutdown; each gets its own reader task.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(node = cfg.id, %error, "accept failed; pausing");
                tokio::select! {
                    biased;
                    () = stopped(&mut shutdown) => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&shared.conn_slots).try_acquire_owned() else {
            inc(&shared.counters.connections_rejected);
            tracing::warn!(
                node = cfg.id,
                peer_addr = %addr,
                inbound_connections_max = cfg.inbound_connections_max,
                "refusing connection: too many inbound connections"
            );
            continue;
        };
        shared
            .spawner
            .spawn(serve(Arc::clone(&shared), stream, addr, permit));
    }
    tracing::debug!(node = cfg.id, "accept loop stopped");
}

/// One inbound connection, from handshake to close. Holds its permit
/// (one of `inbound_connections_max`) until it ends.
async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    addr: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let cfg = &shared.cfg;
    let mut shutdown = shared.shutdown.subscribe();
    let mut buf = BytesMut::with_capacity(cfg.read_chunk_bytes);
    // TLS first (when on), then the Hellos: all within the handshake
    // timeout, and no frame is read before the peer authenticated.
    let opened = async {
        tcp.set_nodelay(true)?;
        let mut stream = match &cfg.tls {
            None => PeerStream::Plain(tcp),
            Some(tls) => tls.accept(tcp).await.map_err(|e| ConnError::Refused {
                reason: format!("TLS handshake: {e}"),
            })?,
        };
        let hello = handshake(&shared, &mut stream, &mut buf).await?;
        Ok::<_, ConnError>((stream, hello))
    };
    let handshake = tokio::select! {
        biased;
        () = stopped(&mut shutdown) => return,
        r = tokio::time::timeout(cfg.handshake_timeout, opened) => {
            r.unwrap_or(Err(ConnError::Timeout {
                what: "the peer's Hello",
                after: cfg.handshake_timeout,
            }))
        }
    };
    let (mut stream, hello) = match handshake {
        Ok(hello) => hello,
        Err(error) => {
            inc(&shared.counters.connections_rejected);
            tracing::warn!(
                node = cfg.id,
                peer_addr = %addr,
                %error,
                "rejecting inbound connection"
            );
            return;
        }
    };
    let peer = hello.from;
    inc(&shared.counters.connections_accepted);
    let (conn_id, mut superseded) = shared.register_inbound(peer);
    tracing::info!(node = cfg.id, peer_id = peer, peer_addr = %addr, conn_id, "accepted connection from peer");
    let end = read_loop(
        &shared,
        &mut stream,
        buf,
        peer,
        &mut shutdown,
        &mut superseded,
    )
    .await;
    shared.unregister_inbound(peer, conn_id);
    match end {
        Ok(end) => tracing::debug!(
            node = cfg.id,
            peer_id = peer,
            peer_addr = %addr,
            conn_id,
            ?end,
            "inbound connection closed"
        ),
        Err(error) => {
            inc(&shared.counters.connections_closed_on_error);
            tracing::warn!(
                node = cfg.id,
                peer_id = peer,
                peer_addr = %addr,
                conn_id,
                %error,
                "closing inbound connection"
            );
        }
    }
}

/// Reads and checks the peer's Hello (with peer TLS, also that the
/// connection's certificate is the claimed member's), then answers with
/// ours.
async fn handshake(
    shared: &Shared,
    stream: &mut PeerStream,
    buf: &mut BytesMut,
) -> Result<Hello, ConnError> {
    let cfg = &shared.cfg;
    let hello = read_hello(stream, buf, &shared.counters).await?;
    check_hello(&hello, cfg.cluster_id, cfg.id, None)?;
    if let Some(tls) = &cfg.tls {
        if tls.client_cert_auth() {
            let Some(claimed) = shared.peer_addr(hello.from) else {
                return Err(ConnError::Refused {
                    reason: format!(
                        "node {} is not a known member: its certificate cannot be checked",
                        hello.from
                    ),
                });
            };
            tls.check_identity(stream, claimed.host())
                .map_err(|reason| ConnError::Refused {
                    reason: format!("node {}: {reason}", hello.from),
                })?;
        }
    }
    let ours = Hello {
        cluster_id: cfg.cluster_id,
        from: cfg.id,
        to: hello.from,
        channel: Channel::Raft,
    };
    write_hello(stream, &ours, &shared.counters).await?;
    Ok(hello)
}

/// Reads frames from `peer` into the inbox until the connection ends.
async fn read_loop(
    shared: &Shared,
    stream: &mut PeerStream,
    mut buf: BytesMut,
    peer: NodeId,
    shutdown: &mut watch::Receiver<bool>,
    superseded: &mut watch::Receiver<bool>,
) -> Result<End, ConnError> {
    let cfg = &shared.cfg;
    let Some(inbox) = shared.inbox_sender() else {
        return Ok(End::Stopped);
    };
    let decoder = FrameDecoder::new(cfg.frame_bytes_max);
    let mut buffers = RecvBuffers::default();
    // Idle is measured between complete frames, not between reads: a
    // length field corrupted upward makes the decoder wait for a body that
    // never comes, while keepalives behind it keep the socket busy.
    let mut deadline = Instant::now() + cfg.read_idle_timeout;
    loop {
        // Every complete frame already buffered (the handshake may have
        // read some) before reading more.
        loop {
            // Room for the rest of a frame whose header is in, so that the
            // decoder need not allocate it.
            let missing = decoder.missing(&buf)?;
            buffers.make_room(&mut buf, missing);
            let Some(frame) = decoder.decode(&mut buf)? else {
                break;
            };
            if frame.ty != FrameType::Raft {
                return Err(ConnError::UnexpectedFrame {
                    got: frame.ty,
                    expected: "Raft",
                });
            }
            let msgs = decode_messages(&frame.body)?;
            // An empty frame is a keepalive.
            if !msgs.is_empty() {
                check_routing(&msgs, peer, cfg.id)?;
                inc(&shared.counters.frames_received);
                if let Some(end) = deliver(shared, &inbox, msgs, shutdown).await? {
                    return Ok(end);
                }
            }
            deadline = Instant::now() + cfg.read_idle_timeout;
        }
        let want = decoder.missing(&buf)?.max(cfg.read_chunk_bytes);
        buffers.make_room(&mut buf, want);
        let read = tokio::select! {
            biased;
            () = stopped(shutdown) => return Ok(End::Stopped),
            () = stopped(superseded) => return Ok(End::Superseded),
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
        };
        match read {
            Err(_) => {
                return Err(ConnError::Timeout {
                    what: "a complete frame",
                    after: cfg.read_idle_timeout,
                })
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) if buf.is_empty() => return Ok(End::PeerClosed),
            Ok(Ok(0)) => return Err(WireError::Truncated { what: "a frame" }.into()),
            Ok(Ok(n)) => add(&shared.counters.bytes_received, n as u64),
        }
    }
}

/// Receive buffers a connection has moved on from, kept to be reused: the
/// messages decoded from a frame are slices of its buffer, so a buffer comes
/// back (its memory warm and already faulted in) once they are all dropped.
/// Without this every frame of a busy connection lands in fresh memory
/// (for large frames, a fresh mapping: page faults and zeroing).
#[derive(Default)]
struct RecvBuffers {
    /// Retired buffers with the size of their memory, oldest first.
    spares: VecDeque<(BytesMut, usize)>,
    /// The size of the memory behind the buffer in use (0: not known, the
    /// buffer came from elsewhere; it is not kept).
    current: usize,
}

/// Retired buffers kept per connection.
const RECV_BUFFERS_KEPT: usize = 4;
/// A buffer larger than this is not kept (a rare huge frame does not pin
/// its memory for the connection's life).
const RECV_BUFFER_KEEP_BYTES_MAX: usize = 4 << 20;

impl RecvBuffers {
    /// Makes room in `buf` for `want` more bytes: in place if its memory is
    /// no longer shared, else in a retired buffer whose messages are all
    /// gone, else in a new one. What `buf` holds moves along.
    fn make_room(&mut self, buf: &mut BytesMut, want: usize) {
        if buf.capacity() - buf.len() >= want || buf.try_reclaim(want) {
            return;
        }
        let need = buf.len() + want;
        let reusable = self
            .spares
            .iter_mut()
            .position(|(spare, _)| spare.try_reclaim(need));
        let (mut next, size) = match reusable.and_then(|i| self.spares.remove(i)) {
            Some(spare) => spare,
            None => {
                let fresh = BytesMut::with_capacity(need);
                let size = fresh.capacity();
                (fresh, size)
            }
        };
        next.extend_from_slice(buf);
        let mut old = std::mem::replace(buf, next);
        let old_size = std::mem::replace(&mut self.current, size);
        old.clear();
        if old_size > 0 && old_size <= RECV_BUFFER_KEEP_BYTES_MAX {
            if self.spares.len() == RECV_BUFFERS_KEPT {
                self.spares.pop_front();
            }
            self.spares.push_back((old, old_size));
        }
    }
}

/// Refuses a frame holding a message that is not from `peer` to `local`:
/// the connection's Hello said who talks to whom.
fn check_routing(msgs: &[Message], peer: NodeId, local: NodeId) -> Result<(), ConnError> {
    match msgs.iter().find(|m| m.from != peer || m.to != local) {
        Some(m) => Err(ConnError::Misrouted {
            peer,
            from: m.from,
            to: m.to,
        }),
        None => Ok(()),
    }
}

/// Hands `msgs` to the inbox in order, waiting for room when it is full
/// (at most `inbox_stall_timeout` per message). `Some(End::Stopped)` if the
/// transport shut down meanwhile.
async fn deliver(
    shared: &Shared,
    inbox: &mpsc::Sender<Message>,
    msgs: Vec<Message>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<End>, ConnError> {
    let total = msgs.len();
    let mut delivered = 0;
    let mut result = Ok(None);
    for msg in msgs {
        let msg = match inbox.try_send(msg) {
            Ok(()) => {
                delivered += 1;
                continue;
            }
            Err(TrySendError::Full(msg)) => msg,
            Err(TrySendError::Closed(_)) => {
                result = Ok(Some(End::Stopped));
                break;
            }
        };
        inc(&shared.counters.inbox_full_waits);
        let after = shared.cfg.inbox_stall_timeout;
        let sent = tokio::select! {
            biased;
            () = stopped(shutdown) => {
                result = Ok(Some(End::Stopped));
                break;
            }
            r = tokio::time::timeout(after, inbox.send(msg)) => r,
        };
        match sent {
            Ok(Ok(())) => delivered += 1,
            Ok(Err(_closed)) => {
                result = Ok(Some(End::Stopped));
                break;
            }
            Err(_) => {
                result = Err(ConnError::InboxStalled {
                    lost: total - delivered,
                    after,
                });
                break;
            }
        }
    }
    add(&shared.counters.messages_received, delivered as u64);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_once_its_frames_are_dropped() {
        let mut buffers = RecvBuffers::default();
        let mut buf = BytesMut::new();
        buffers.make_room(&mut buf, 4000);
        let first = buf.as_ptr();
        buf.extend_from_slice(&[7; 1000]);
        // A frame decoded from it is still held: more room than is left
        // comes from new memory, and the unread bytes move along.
        let frame = buf.split_to(600).freeze();
        buffers.make_room(&mut buf, 3500);
        let second = buf.as_ptr();
        assert_ne!(second, first);
        assert_eq!(&buf[..], &[7; 400][..]);
        assert!(buf.capacity() >= 3900);
        // Once that frame is gone, the first buffer is reused.
        drop(frame);
        let frame = buf.split_to(400).freeze();
        buffers.make_room(&mut buf, 3600);
        assert_eq!(buf.as_ptr(), first);
        assert!(buf.is_empty());
        // Room that is there already is used in place.
        drop(frame);
        buf.extend_from_slice(&[1; 10]);
        buffers.make_room(&mut buf, 100);
        assert_eq!(buf.as_ptr(), first);
        assert_eq!(&buf[..], &[1; 10][..]);
    }

    #[test]
    fn spares_are_bounded_in_number_and_size() {
        let mut buffers = RecvBuffers::default();
        let mut buf = BytesMut::new();
        let mut held = Vec::new();
        for _ in 0..3 * RECV_BUFFERS_KEPT {
            buffers.make_room(&mut buf, 1024);
            buf.extend_from_slice(&[0; 16]);
            held.push(buf.split().freeze());
        }
        assert_eq!(buffers.spares.len(), RECV_BUFFERS_KEPT);
        buffers.make_room(&mut buf, RECV_BUFFER_KEEP_BYTES_MAX + 1);
        buf.extend_from_slice(&[0; 16]);
        held.push(buf.split().freeze());
        buffers.make_room(&mut buf, 1024);
        assert!(buffers
            .spares
            .iter()
            .all(|(_, size)| *size <= RECV_BUFFER_KEEP_BYTES_MAX));
    }
}
