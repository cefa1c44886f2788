//! skiff-net: framed transport between Skiff nodes.
//!
//! This crate moves bytes and messages between peers. Today it holds the
//! wire format:
//!
//! * [`frame`]: the frame every byte on a Skiff connection travels in —
//!   magic, version, type, length, CRC32C (drawn on [`FrameHeader`]) — the
//!   [`FrameEncoder`], and the [`FrameDecoder`] that cuts frames out of a
//!   receive buffer without copying them.
//! * [`codec`]: the body of a [`FrameType::Raft`] frame, a batch of
//!   [`skiff_raft::Message`]s whose entry payloads decode as slices of the
//!   receive buffer ([`encode_raft_frame`], [`decode_messages`]); and the
//!   body of the [`FrameType::Hello`] frame that opens a connection.
//! * [`transport`]: the [`Transport`] trait a node sends Raft messages
//!   through and the [`Inbox`] it receives them from; [`TcpTransport`] (one
//!   pipelined, coalescing connection per peer, reconnects with backoff) and
//!   [`SimNetwork`] (a seeded simulated network for tests).
//! * [`addr`]: a peer's address, an IP or a host name and a port
//!   ([`PeerAddr`]); a name is resolved at each connect, never at start.
//! * [`tls`]: TLS on peer and snapshot connections ([`tls::PeerTls`],
//!   [`tls::PeerStream`]) and the check that a peer is the member it claims;
//! * [`snapshot`]: snapshot streaming — the bodies of the snapshot frames,
//!   the [`SnapshotServer`] that serves chunks of snapshot files, and
//!   [`fetch_snapshot`], which pulls one over parallel connections into a
//!   verified, durable file.
//!
//! Their items are re-exported here.
//!
//! The TCP transport (one pipelined stream per peer, coalesced writes,
//! reconnects) and snapshot streaming build on these.
//!
//! # What this crate must never do
//!
//! * Know Raft's rules: it encodes and decodes the shape of messages, never
//!   judges their meaning (terms, indexes, quorums are the core's business).
//! * Panic, or allocate beyond what the bytes received can hold, on anything
//!   a peer sends: every malformed input is a [`WireError`], which closes
//!   only the connection it came from.
//! * Copy payload bytes on the receive path: a payload is a `Bytes` slice of
//!   the buffer the socket filled.

pub mod addr;
pub mod codec;
pub mod frame;
pub mod heap;
pub mod snapshot;
pub mod tls;
pub mod transport;

pub use crate::addr::{Host, PeerAddr};
pub use crate::codec::{
    decode_messages, encode_hello_frame, encode_raft_frame, message_encoded_len, raft_body_len,
    Channel, Hello, HELLO_BODY_LEN, RAFT_BODY_PREFIX_LEN,
};
pub use crate::frame::{
    Frame, FrameDecoder, FrameEncoder, FrameHeader, FrameType, DEFAULT_FRAME_BYTES_MAX,
    FRAME_FLAGS_KNOWN, FRAME_HEADER_LEN, FRAME_MAGIC, FRAME_VERSION,
};
pub use crate::snapshot::{
    fetch_snapshot, FetchOptions, FetchStats, Fetched, Refusal, ServerFaults, ServerOptions,
    ServerStats, SnapshotError, SnapshotFiles, SnapshotMeta, SnapshotProvider, SnapshotServer,
    DEFAULT_CHUNK_BYTES,
};
pub use crate::transport::{
    Inbox, SendError, ShutdownError, SimDelivery, SimFaults, SimNetConfig, SimNetwork, SimOutcome,
    SimStats, SimTime, SimTransport, StartError, TcpConfig, TcpTransport, Transport,
    TransportConfigError, TransportMetrics,
};

/// Bytes from a peer that are not a valid frame or frame body, or a frame
/// too large to send. Every variant received from the network means the
/// stream can no longer be trusted: close that connection (and log the
/// peer); nothing else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stream does not start a frame here: not a Skiff peer, or the
    /// stream lost its place.
    #[error("bad frame magic {found:02x?}, expected {FRAME_MAGIC:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported frame version {version} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion { version: u8 },
    #[error("unknown frame type {ty}")]
    UnknownType { ty: u8 },
    /// A frame of `len` bytes (header included) is over the bound `max`
    /// (`frame_bytes_max`). Received: detected from the header alone, before
    /// any of the body is buffered. Sent: nothing was written.
    #[error("frame of {len} bytes exceeds frame_bytes_max = {max}")]
    TooLarge { len: usize, max: usize },
    #[error(
        "frame checksum mismatch: header carries {expected:#010x}, frame gives {actual:#010x}"
    )]
    Checksum { expected: u32, actual: u32 },
    /// The bytes end inside `what`: a stream closed mid-frame, or a frame
    /// body shorter than what it declares.
    #[error("truncated: the bytes end inside {what}")]
    Truncated { what: &'static str },
    /// A checksummed frame whose contents do not parse: a bug or a forgery.
    #[error("malformed: {what}")]
    Malformed { what: &'static str },
    /// A message or payload tag this build does not know.
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
}

/// The source IP for connections leaving a node that listens on `listen`:
/// its IP when that is a specific address, `None` (the kernel's choice)
/// for a wildcard listener.
pub fn source_ip_for(listen: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let ip = listen.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Connects to `addr` (a host name is resolved now; each address it
/// resolves to is tried in turn, and the last failure is returned), from
/// `local` (any port) when given and of the same address family; otherwise
/// from the kernel's choice of address.
pub async fn connect_from(
    addr: &PeerAddr,
    local: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for a in addr.resolve().await? {
        match connect_socket_from(a, local).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("resolve gives at least one address"))
}

async fn connect_socket_from(
    addr: std::net::SocketAddr,
    local: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    match local {
        Some(ip) if ip.is_ipv4() == addr.is_ipv4() => {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            socket.connect(addr).await
        }
        _ => tokio::net::TcpStream::connect(addr).await,
    }
}
