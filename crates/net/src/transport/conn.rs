//! What both ends of a Raft connection share: why a connection ended, and
//! the `Hello` exchange that opens it.
//!
//! ```text
//! connector                                  acceptor
//!   ── Hello{cluster, from: me, to: peer, Raft} ──►   checks cluster, to, channel
//!   ◄── Hello{cluster, from: peer, to: me, Raft} ──   (or closes, logging why)
//!   checks the reply
//!   ── Raft frames (and empty keepalive frames) ──►   (never writes again)
//! ```

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use skiff_raft::NodeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::metrics::{add, Counters};
use crate::codec::{encode_hello_frame, Channel, Hello, HELLO_BODY_LEN};
use crate::frame::{FrameDecoder, FrameEncoder, FrameType, FRAME_HEADER_LEN};
use crate::WireError;

/// A whole Hello frame: during the handshake nothing larger is buffered.
const HELLO_FRAME_LEN: usize = FRAME_HEADER_LEN + HELLO_BODY_LEN;

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The transport is shutting down, or the peer was removed.
    Stopped,
    /// The peer opened a newer connection (inbound only).
    Superseded,
    /// The peer closed the connection between frames.
    PeerClosed,
}

/// Why a connection was closed, or could not be opened. Logged with the
/// peer's address and id; never fatal beyond the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// Bytes that are not a valid frame or body.
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the peer closed the connection during {during}")]
    ClosedEarly { during: &'static str },
    /// A `Hello` that does not match what this end expects.
    #[error("handshake refused: {reason}")]
    Refused { reason: String },
    #[error("unexpected {got:?} frame (expected {expected})")]
    UnexpectedFrame {
        got: FrameType,
        expected: &'static str,
    },
    /// The peer wrote on a connection it should only read.
    #[error("unexpected bytes from the peer on an outbound connection")]
    UnexpectedBytes,
    /// A message not from the connection's peer or not for this node.
    #[error("misrouted message from {from} to {to} on a connection from peer {peer}")]
    Misrouted {
        peer: NodeId,
        from: NodeId,
        to: NodeId,
    },
    /// The node took no message for `after`: the rest of the frame is lost.
    #[error("inbox full for {after:?}: {lost} received messages dropped")]
    InboxStalled { lost: usize, after: Duration },
}

/// Appends our Hello to `stream`.
pub(crate) async fn write_hello<S: AsyncWrite + Unpin>(
    stream: &mut S,
    hello: &Hello,
    counters: &Counters,
) -> Result<(), ConnError> {
    let mut buf = BytesMut::with_capacity(HELLO_FRAME_LEN);
    let len = encode_hello_frame(&FrameEncoder::new(HELLO_FRAME_LEN), hello, &mut buf)?;
    stream.write_all(&buf).await?;
    stream.flush().await?;
    add(&counters.bytes_sent, len as u64);
    Ok(())
}

/// Reads the peer's Hello, the first frame on a connection. Bytes read past
/// it stay in `buf` (a connector may pipeline frames behind its Hello).
pub(crate) async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    counters: &Counters,
) -> Result<Hello, ConnError> {
    // Bounded to a Hello: a stream that starts with anything larger is
    // refused from its header, before its body is buffered.
    let decoder = FrameDecoder::new(HELLO_FRAME_LEN);
    loop {
        if let Some(frame) = decoder.decode(buf)? {
            if frame.ty != FrameType::Hello {
                return Err(ConnError::UnexpectedFrame {
                    got: frame.ty,
                    expected: "Hello",
                });
            }
            return Ok(Hello::decode(&frame.body)?);
        }
        buf.reserve(HELLO_FRAME_LEN);
        let n = stream.read_buf(buf).await?;
        if n == 0 {
            return Err(ConnError::ClosedEarly {
                during: "the handshake",
            });
        }
        add(&counters.bytes_received, n as u64);
    }
}

/// Checks a Hello received by `local` of cluster `cluster_id`: for this
/// cluster, this node, the Raft channel, from some other node; and, on a
/// connection we opened, from the peer we dialled (`expected_from`).
pub(crate) fn check_hello(
    hello: &Hello,
    cluster_id: u64,
    local: NodeId,
    expected_from: Option<NodeId>,
) -> Result<(), ConnError> {
    let refuse = |reason: String| Err(ConnError::Refused { reason });
    if hello.cluster_id != cluster_id {
        return refuse(format!(
            "peer {} is of cluster {:#x}, this node of cluster {cluster_id:#x}",
            hello.from, hello.cluster_id
        ));
    }
    if hello.to != local {
        return refuse(format!(
            "peer {} addressed node {}, this is node {local}",
            hello.from, hello.to
        ));
    }
    if hello.channel != Channel::Raft {
        return refuse(format!(
            "peer {} asked for the {:?} channel; this listener serves Raft messages",
            hello.from, hello.channel
        ));
    }
    if hello.from == 0 || hello.from == local {
        return refuse(format!("sender id {} is not another node", hello.from));
    }
    if let Some(expected) = expected_from {
        if hello.from != expected {
            return refuse(format!(
                "dialled node {expected}, node {} answered",
                hello.from
            ));
        }
    }
    Ok(())
}
