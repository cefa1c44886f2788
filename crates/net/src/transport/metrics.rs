//! Counters of the TCP transport: atomics bumped on the hot paths, read as
//! a [`TransportMetrics`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A snapshot of a [`crate::TcpTransport`]'s counters, totals since
        /// it started, over all peers.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct TransportMetrics {
            $($(#[$doc])* pub $name: u64,)*
        }

        /// The live counters behind [`TransportMetrics`].
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> TransportMetrics {
                TransportMetrics {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Messages written to a socket.
    messages_sent,
    /// Raft frames written that carried at least one message; with
    /// `messages_sent`, how well writes were coalesced.
    frames_sent,
    /// Of `frames_sent`, those written at once by the sending thread
    /// (`send_batch` to an idle link) rather than by the writer task.
    frames_sent_direct,
    /// Of `frames_sent_direct`, those the socket took only part of (its
    /// buffer was full): the writer task sent the rest.
    frames_sent_direct_partial,
    /// Bytes written on Raft connections (frames, keepalives, handshakes).
    bytes_sent,
    /// Empty frames written to keep an idle link alive.
    keepalives_sent,
    /// Messages handed to the inbox.
    messages_received,
    /// Raft frames received that carried at least one message.
    frames_received,
    /// Bytes read on inbound connections.
    bytes_received,
    /// Sends refused because the peer's queue was full.
    sends_queue_full,
    /// Sends refused because the peer was not connected.
    sends_disconnected,
    /// Messages accepted by `send` but dropped, unwritten, when their
    /// connection broke.
    messages_dropped_on_disconnect,
    /// Outbound connections that completed the handshake.
    connects,
    /// Outbound connection attempts that failed (connect or handshake).
    connect_failures,
    /// Inbound connections whose `Hello` was accepted.
    connections_accepted,
    /// Inbound connections refused: a bad `Hello`, or too many connections.
    connections_rejected,
    /// Connections closed for an error: malformed or oversized frames,
    /// misrouted messages, timeouts, I/O errors, a stalled inbox.
    connections_closed_on_error,
    /// Times a reader found the inbox full and had to wait (backpressure).
    inbox_full_waits,
    /// Transport tasks that panicked (a bug: nothing a peer sends should
    /// make one). Counted as finished tasks are reaped, and at shutdown.
    task_panics,
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds 1 to a counter.
pub(crate) fn inc(c: &AtomicU64) {
    add(c, 1);
}
