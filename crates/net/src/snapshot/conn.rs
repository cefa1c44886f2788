//! One snapshot connection's framing: reading whole frames into a bounded
//! buffer, writing small frames, each wait under a timeout the caller
//! gives. Shared by the sender and the receiver.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SnapshotError;
use crate::frame::{Frame, FrameDecoder, FrameEncoder};
use crate::tls::PeerStream;
use crate::WireError;

/// Below this much free room in the read buffer, room is reserved before
/// reading (the decoder reserves a whole frame once its header is in).
const READ_SPARE_MIN: usize = 64;

pub(crate) struct Conn {
    pub(crate) stream: PeerStream,
    pub(crate) peer: SocketAddr,
    /// Received bytes not yet cut into frames. Bound: one frame
    /// (`dec.frame_bytes_max()`) plus `read_reserve`.
    rbuf: BytesMut,
    /// Room reserved for a read when the buffer is (nearly) full.
    read_reserve: usize,
    dec: FrameDecoder,
    pub(crate) enc: FrameEncoder,
    /// Small outgoing frames (handshake, requests, acks); cleared per frame.
    wbuf: BytesMut,
}

impl Conn {
    /// A connection receiving frames of at most `recv_frame_max` bytes and
    /// sending frames of at most `send_frame_max`.
    pub(crate) fn new(
        stream: PeerStream,
        peer: SocketAddr,
        recv_frame_max: usize,
        send_frame_max: usize,
        read_reserve: usize,
    ) -> Conn {
        Conn {
            stream,
            peer,
            rbuf: BytesMut::new(),
            read_reserve: read_reserve.max(READ_SPARE_MIN),
            dec: FrameDecoder::new(recv_frame_max),
            enc: FrameEncoder::new(send_frame_max),
            wbuf: BytesMut::new(),
        }
    }

    /// The next frame; `None` when the peer closed the connection between
    /// frames. Cancel safe: what was read stays in the buffer.
    pub(crate) async fn read_frame(&mut self) -> Result<Option<Frame>, SnapshotError> {
        loop {
            match self.dec.decode(&mut self.rbuf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(source) => {
                    return Err(SnapshotError::Wire {
                        peer: self.peer,
                        source,
                    })
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_SPARE_MIN {
                self.rbuf.reserve(self.read_reserve);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| self.error("read", source))?;
            if n == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(
                    self.error("closed inside a frame", io::ErrorKind::UnexpectedEof.into())
                );
            }
        }
    }

    /// [`read_frame`](Conn::read_frame) under a timeout; an early close is an
    /// error too (`waiting_for` says what was expected).
    pub(crate) async fn expect_frame(
        &mut self,
        limit: Duration,
        waiting_for: &'static str,
    ) -> Result<Frame, SnapshotError> {
        let peer = self.peer;
        match within(limit, peer, waiting_for, self.read_frame()).await?? {
            Some(frame) => Ok(frame),
            None => Err(SnapshotError::Connection {
                peer,
                what: waiting_for,
                source: io::ErrorKind::UnexpectedEof.into(),
            }),
        }
    }

    /// Encodes one small frame with `encode` and writes it within `limit`.
    pub(crate) async fn send(
        &mut self,
        limit: Duration,
        what: &'static str,
        encode: impl FnOnce(&FrameEncoder, &mut BytesMut) -> Result<usize, WireError>,
    ) -> Result<(), SnapshotError> {
        self.wbuf.clear();
        encode(&self.enc, &mut self.wbuf).map_err(|source| SnapshotError::Wire {
            peer: self.peer,
            source,
        })?;
        let peer = self.peer;
        within(
            limit,
            peer,
            what,
            write_flushed(&mut self.stream, &self.wbuf),
        )
        .await?
        .map_err(|source| SnapshotError::Connection { peer, what, source })
    }

    pub(crate) fn error(&self, what: &'static str, source: io::Error) -> SnapshotError {
        SnapshotError::Connection {
            peer: self.peer,
            what,
            source,
        }
    }

    pub(crate) fn protocol(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Protocol {
            peer: self.peer,
            what: what.into(),
        }
    }
}

/// Runs `fut` for at most `limit`; past it, a `TimedOut` connection error
/// saying what was awaited.
/// Writes `bytes` and flushes them (a TLS session buffers its records
/// until flushed; a plain socket has nothing to flush).
pub(crate) async fn write_flushed(stream: &mut PeerStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// A TLS handshake (either side) within `limit`.
pub(crate) async fn tls_handshake(
    limit: Duration,
    peer: SocketAddr,
    handshake: impl Future<Output = io::Result<PeerStream>>,
) -> Result<PeerStream, SnapshotError> {
    let what = "the TLS handshake";
    within(limit, peer, what, handshake)
        .await?
        .map_err(|source| SnapshotError::Connection { peer, what, source })
}

/// `fut` within `limit`, or a timed-out connection error.
pub(crate) async fn within<T>(
    limit: Duration,
    peer: SocketAddr,
    what: &'static str,
    fut: impl Future<Output = T>,
) -> Result<T, SnapshotError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| SnapshotError::Connection {
            peer,
            what,
            source: io::ErrorKind::TimedOut.into(),
        })
}
