//! [`TcpConfig`]: every bound and timeout of the TCP transport, with
//! defaults and validation whose errors name the field.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use skiff_raft::NodeId;

use crate::addr::PeerAddr;
use crate::codec::RAFT_BODY_PREFIX_LEN;
use crate::frame::{DEFAULT_FRAME_BYTES_MAX, FRAME_HEADER_LEN};

/// The largest `send_queue_max` and `inbox_max` accepted: far above any
/// sensible setting, far below what the channels themselves refuse.
pub(crate) const QUEUE_BOUND_LIMIT: usize = 1 << 24;

/// An invalid transport configuration: `field` names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transport config `{field}`: {reason}")]
pub struct TransportConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// Settings of a [`crate::TcpTransport`]. Sizes in bytes or messages,
/// as their names say; every queue and buffer the transport keeps is bounded
/// by one of them.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Both ends of every connection must agree on it (checked in the
    /// `Hello`): nodes of different clusters never exchange messages.
    pub cluster_id: u64,
    /// This node.
    pub id: NodeId,
    /// Where to accept peers' connections. Port 0 picks a free port (see
    /// [`crate::TcpTransport::local_addr`]).
    pub listen_addr: SocketAddr,
    /// Source address of the connections this node opens to its peers;
    /// `None` lets the kernel choose. [`TcpConfig::new`] sets it to
    /// `listen_addr`'s IP when that is a specific address, so that every
    /// peer connection of a member, in either direction, is between its
    /// peer address and the other's: what firewall rules (and the fault
    /// tests' partitions) identify members by.
    pub local_ip: Option<IpAddr>,
    /// Peers to keep a connection to, by id. More can be added later
    /// ([`crate::TcpTransport::add_peer`]).
    pub peers: BTreeMap<NodeId, PeerAddr>,
    /// Messages queued per peer, not yet written; a send past it is
    /// [`crate::SendError::QueueFull`].
    pub send_queue_max: usize,
    /// A writer coalesces queued messages into one frame (one write) up to
    /// this many body bytes. A single larger message goes alone.
    pub coalesce_bytes_max: usize,
    /// Largest frame sent or accepted, header included; a larger frame
    /// received closes the connection.
    pub frame_bytes_max: usize,
    /// Received messages waiting for the node ([`crate::Inbox`]); when it
    /// is full, sockets are not read.
    pub inbox_max: usize,
    /// Free space ensured in a receive buffer before each read. A buffer
    /// holds at most one frame in progress plus this.
    pub read_chunk_bytes: usize,
    /// Inbound connections open at once; more are closed at once (logged).
    pub inbound_connections_max: usize,
    /// For a TCP connect to a peer.
    pub connect_timeout: Duration,
    /// For the `Hello` exchange that opens a connection, in both directions.
    pub handshake_timeout: Duration,
    /// Wait before the first reconnect attempt after a failed one; doubled
    /// after each failure up to `reconnect_backoff_max`, and reset once a
    /// connection is up; a broken connection is retried after
    /// `reconnect_backoff_min`.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// For one frame to be written; past it the connection is dropped and
    /// reopened (a peer that stopped reading).
    pub write_timeout: Duration,
    /// A writer with nothing to send sends an empty frame this often, so
    /// that an idle link is not mistaken for a stalled one.
    pub keepalive_interval: Duration,
    /// An inbound connection with no complete frame for this long is
    /// closed: the peer is gone, or a corrupted length makes the reader wait
    /// for bytes that will never come. Must exceed `keepalive_interval`.
    pub read_idle_timeout: Duration,
    /// A reader that could not hand a message to a full inbox for this long
    /// closes its connection (logged with the messages lost): the node has
    /// stopped taking messages.
    pub inbox_stall_timeout: Duration,
    /// TLS on every connection (both sides), with the peer identity check
    /// when it requires client certificates; plaintext when `None`.
    pub tls: Option<crate::tls::PeerTls>,
}

impl TcpConfig {
    /// Defaults for node `id` of cluster `cluster_id`, listening on
    /// `listen_addr`, with no peers yet.
    pub fn new(cluster_id: u64, id: NodeId, listen_addr: SocketAddr) -> TcpConfig {
        TcpConfig {
            cluster_id,
            id,
            listen_addr,
            local_ip: crate::source_ip_for(listen_addr),
            peers: BTreeMap::new(),
            send_queue_max: 4096,
            coalesce_bytes_max: 1 << 20,
            frame_bytes_max: DEFAULT_FRAME_BYTES_MAX,
            inbox_max: 4096,
            read_chunk_bytes: 64 << 10,
            inbound_connections_max: 256,
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(1),
            read_idle_timeout: Duration::from_secs(10),
            inbox_stall_timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    /// Adds (or readdresses) a peer.
    pub fn with_peer(mut self, id: NodeId, addr: impl Into<PeerAddr>) -> TcpConfig {
        self.peers.insert(id, addr.into());
        self
    }

    /// Checks the configuration; the error names the field.
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        if self.id == 0 {
            return err("id", "node ids start at 1".into());
        }
        for &peer in self.peers.keys() {
            check_peer_id(self.id, peer)?;
        }
        check_queue_bound("send_queue_max", self.send_queue_max)?;
        check_queue_bound("inbox_max", self.inbox_max)?;
        // A frame must hold at least one empty batch (the keepalive), and
        // no more than its header can declare.
        let frame_min = FRAME_HEADER_LEN + RAFT_BODY_PREFIX_LEN;
        let frame_limit = FRAME_HEADER_LEN + u32::MAX as usize;
        if self.frame_bytes_max <= frame_min || self.frame_bytes_max > frame_limit {
            return err(
                "frame_bytes_max",
                format!(
                    "must be in {}..={frame_limit}, got {}",
                    frame_min + 1,
                    self.frame_bytes_max
                ),
            );
        }
        let coalesce_limit = self.frame_bytes_max - FRAME_HEADER_LEN;
        if self.coalesce_bytes_max <= RAFT_BODY_PREFIX_LEN
            || self.coalesce_bytes_max > coalesce_limit
        {
            return err(
                "coalesce_bytes_max",
                format!(
                    "must be in {}..={coalesce_limit} (a frame body within frame_bytes_max), got {}",
                    RAFT_BODY_PREFIX_LEN + 1,
                    self.coalesce_bytes_max
                ),
            );
        }
        if self.read_chunk_bytes < FRAME_HEADER_LEN || self.read_chunk_bytes > self.frame_bytes_max
        {
            return err(
                "read_chunk_bytes",
                format!(
                    "must be in {FRAME_HEADER_LEN}..={} (frame_bytes_max), got {}",
                    self.frame_bytes_max, self.read_chunk_bytes
                ),
            );
        }
        if self.inbound_connections_max == 0 {
            return err("inbound_connections_max", "must be at least 1".into());
        }
        for (field, d) in [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("reconnect_backoff_min", self.reconnect_backoff_min),
            ("reconnect_backoff_max", self.reconnect_backoff_max),
            ("write_timeout", self.write_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("read_idle_timeout", self.read_idle_timeout),
            ("inbox_stall_timeout", self.inbox_stall_timeout),
        ] {
            if d.is_zero() {
                return err(field, "must be above zero".into());
            }
            // Deadlines are computed as now + d; keep them representable.
            if d > DURATION_LIMIT {
                return err(
                    field,
                    format!("must be at most {DURATION_LIMIT:?}, got {d:?}"),
                );
            }
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            return err(
                "reconnect_backoff_max",
                format!(
                    "must be at least reconnect_backoff_min ({:?}), got {:?}",
                    self.reconnect_backoff_min, self.reconnect_backoff_max
                ),
            );
        }
        if self.read_idle_timeout <= self.keepalive_interval {
            return err(
                "read_idle_timeout",
                format!(
                    "must exceed keepalive_interval ({:?}), or idle links are closed; got {:?}",
                    self.keepalive_interval, self.read_idle_timeout
                ),
            );
        }
        Ok(())
    }
}

/// The longest timeout accepted (a year): longer is a unit mistake.
const DURATION_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

fn err(field: &'static str, reason: String) -> Result<(), TransportConfigError> {
    Err(TransportConfigError { field, reason })
}

/// A peer must be a node (not 0) other than this one.
pub(crate) fn check_peer_id(local: NodeId, peer: NodeId) -> Result<(), TransportConfigError> {
    if peer == 0 {
        return err("peers", "node ids start at 1".into());
    }
    if peer == local {
        return err(
            "peers",
            format!("lists this node ({local}) as its own peer"),
        );
    }
    Ok(())
}

/// A channel bound: at least 1, at most [`QUEUE_BOUND_LIMIT`].
pub(crate) fn check_queue_bound(field: &'static str, v: usize) -> Result<(), TransportConfigError> {
    if v == 0 || v > QUEUE_BOUND_LIMIT {
        return err(
            field,
            format!("must be in 1..={QUEUE_BOUND_LIMIT}, got {v}"),
        );
    }
    Ok(())
}
