//! Raft message transport: the [`Transport`] trait the node sends through,
//! the [`Inbox`] it receives from, the TCP implementation
//! ([`TcpTransport`]) and a simulated network for the tests of other crates
//! ([`SimNetwork`], whose endpoints are [`SimTransport`]s).
//!
//! # The contract
//!
//! 1. [`Transport::send`] never blocks. `Ok` means the message was queued
//!    for its peer (`msg.to`), not that it arrived: the network may still
//!    lose it, as Raft assumes. An `Err` means it was not queued; the error
//!    names the peer ([`SendError::peer`]), which the caller reports to the
//!    core with `raft.unreachable(peer)`. A full per-peer send queue
//!    (`send_queue_max` messages) and a peer that is not connected are both
//!    reported this way, never waited on.
//! 2. Messages to one peer leave in the order they were sent, and are
//!    pipelined: nothing waits for a response.
//! 3. Received messages, from every peer, arrive in one [`Inbox`]: a bounded
//!    channel of `inbox_max` messages. When it is full, the transport stops
//!    reading from the sockets (backpressure travels back to the senders,
//!    whose queues then fill and report the peer unreachable). Nothing is
//!    dropped silently and nothing grows without bound.
//!
//! # What this module must never do
//!
//! * Judge a message's meaning. It checks only routing (`from` is the peer
//!   the connection was opened by, `to` is this node) and shape.
//! * Panic, or stall forever, on anything a peer sends: every wait has a
//!   timeout, every queue and buffer a named bound, and a bad byte closes
//!   only the connection it arrived on (logged with the peer's address and
//!   id).
//! * Block the caller of `send`.

mod config;
mod conn;
mod inbound;
mod metrics;
mod outbound;
mod sim;
mod tcp;

use skiff_raft::{Message, NodeId};
use tokio::sync::mpsc;

pub use self::config::{TcpConfig, TransportConfigError};
pub use self::metrics::TransportMetrics;
pub use self::sim::{
    SimDelivery, SimFaults, SimNetConfig, SimNetwork, SimOutcome, SimStats, SimTime, SimTransport,
};
pub use self::tcp::{ShutdownError, StartError, TcpTransport};

/// How a node sends Raft messages to its peers.
///
/// Implemented by [`TcpTransport`] (real sockets) and [`SimTransport`] (a
/// deterministic simulated network). Received messages are not part of the
/// trait: each implementation hands out an [`Inbox`] when it is created.
pub trait Transport: Send + Sync {
    /// The id of the node this transport sends from.
    fn local_id(&self) -> NodeId;

    /// Queues `msg` for `msg.to` without blocking. On error the message was
    /// not queued: report [`SendError::peer`] unreachable to the core.
    fn send(&self, msg: Message) -> Result<(), SendError>;

    /// Sends `msgs` as [`send`](Transport::send) would each, in order, and
    /// returns the errors of those not queued. A transport may write a
    /// peer's messages at once from the calling thread, as one frame, when
    /// that peer's link is idle (the TCP transport does): call it once per
    /// batch of messages that are ready together.
    /// From now on, sends to exactly these peers at these addresses (the
    /// membership changed): new ones are connected to, readdressed ones
    /// reconnected, missing ones dropped. A transport that routes by id
    /// alone (the simulated one) has nothing to do.
    fn set_peers(&self, peers: &std::collections::BTreeMap<NodeId, crate::PeerAddr>);

    fn send_batch(&self, msgs: Vec<Message>) -> Vec<SendError> {
        msgs.into_iter()
            .filter_map(|m| self.send(m).err())
            .collect()
    }
}

/// A message that was not queued. Every variant names the peer, so that the
/// caller can report it with `raft.unreachable(err.peer())`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The peer's send queue holds `send_queue_max` messages already: the
    /// peer (or the link) does not keep up.
    #[error("send queue to peer {peer} is full ({send_queue_max} messages)")]
    QueueFull { peer: NodeId, send_queue_max: usize },
    /// No connection to the peer is up (it is down, unreachable, or being
    /// reconnected to with backoff).
    #[error("peer {peer} is not connected")]
    Disconnected { peer: NodeId },
    /// `msg.to` is not a configured peer (or is this node).
    #[error("peer {peer} is not a configured peer")]
    UnknownPeer { peer: NodeId },
    /// The message alone would make a frame over `frame_bytes_max`: it can
    /// never be sent (the core's `batch_bytes_max` should be well below).
    #[error(
        "a message of {len} bytes for peer {peer} cannot fit in a frame \
         (frame_bytes_max = {frame_bytes_max})"
    )]
    TooLarge {
        peer: NodeId,
        len: usize,
        frame_bytes_max: usize,
    },
    /// The transport was shut down.
    #[error("the transport is shut down (message for peer {peer})")]
    ShutDown { peer: NodeId },
}

impl SendError {
    /// The peer the message was for: the one to report unreachable.
    pub fn peer(&self) -> NodeId {
        match *self {
            SendError::QueueFull { peer, .. }
            | SendError::Disconnected { peer }
            | SendError::UnknownPeer { peer }
            | SendError::TooLarge { peer, .. }
            | SendError::ShutDown { peer } => peer,
        }
    }
}

/// Where received messages arrive, from every peer, each peer's in the
/// order it sent them.
///
/// A bounded channel of `inbox_max` messages. While it is full the transport
/// stops reading from its sockets (and the simulated network keeps messages
/// in flight): take messages promptly. A message's payloads are slices of
/// the buffer its frame was read into, so a message held keeps that buffer
/// alive.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Message>,
    inbox_max: usize,
}

impl Inbox {
    /// A new inbox of `inbox_max` messages and the sender that fills it.
    pub(crate) fn channel(inbox_max: usize) -> (mpsc::Sender<Message>, Inbox) {
        let (tx, rx) = mpsc::channel(inbox_max);
        (tx, Inbox { rx, inbox_max })
    }

    /// The next message; `None` once the transport is shut down and every
    /// message received before was taken.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// Appends up to `limit` messages to `out`, waiting for at least one;
    /// returns how many (0: shut down and empty).
    pub async fn recv_many(&mut self, out: &mut Vec<Message>, limit: usize) -> usize {
        self.rx.recv_many(out, limit).await
    }

    /// The next message if one is waiting (never blocks; usable outside a
    /// runtime, as the simulated network's tests do).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Waits for the next message from a thread outside any runtime.
    ///
    /// # Panics
    ///
    /// If called from inside an asynchronous context (tokio's rule).
    pub fn blocking_recv(&mut self) -> Option<Message> {
        self.rx.blocking_recv()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The bound: messages the inbox holds before the transport stops
    /// reading.
    pub fn inbox_max(&self) -> usize {
        self.inbox_max
    }

    /// Whether the transport is gone (messages may still be waiting).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }
}
