//! What the transport tests share: configurations with generous timeouts,
//! numbered messages, and raw-socket helpers that play a misbehaving peer.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use skiff_net::{
    encode_hello_frame, encode_raft_frame, Channel, FrameDecoder, FrameEncoder, FrameType, Hello,
    Inbox, StartError, TcpConfig, TcpTransport,
};
use skiff_raft::{Entry, Message, MessageBody, NodeId, Payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const CLUSTER: u64 = 0x5C1F_F000_0001;
/// How long a test waits for anything to happen before it fails. Generous:
/// the tests must pass on a busy two-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A configuration for tests: an ephemeral port, quick reconnects, and
/// timeouts far above any scheduling hiccup.
pub fn config(id: NodeId) -> TcpConfig {
    let mut cfg = TcpConfig::new(CLUSTER, id, localhost());
    cfg.reconnect_backoff_min = Duration::from_millis(10);
    cfg.reconnect_backoff_max = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg.write_timeout = Duration::from_secs(20);
    cfg.read_idle_timeout = Duration::from_secs(20);
    cfg.inbox_stall_timeout = Duration::from_secs(60);
    cfg
}

pub async fn start(cfg: TcpConfig) -> (TcpTransport, Inbox) {
    TcpTransport::start(cfg).await.expect("transport starts")
}

/// Starts a transport on `cfg.listen_addr`, retrying while the port is
/// still held (a peer restarting on its old port).
pub async fn start_on_same_port(cfg: TcpConfig) -> (TcpTransport, Inbox) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpTransport::start(cfg.clone()).await {
            Ok(started) => return started,
            Err(StartError::Bind { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot restart on {}: {e}", cfg.listen_addr),
        }
    }
}

/// An AppendEntries-like message numbered `seq`: one entry of
/// `payload_len` bytes whose first eight bytes are `seq`.
pub fn append(from: NodeId, to: NodeId, seq: u64, payload_len: usize) -> Message {
    let mut data = vec![0xA5u8; payload_len.max(8)];
    data[..8].copy_from_slice(&seq.to_le_bytes());
    Message {
        from,
        to,
        term: 3,
        body: MessageBody::Append {
            prev_index: seq,
            prev_term: 3,
            entries: vec![Entry {
                index: seq + 1,
                term: 3,
                payload: Payload::Normal(Bytes::from(data)),
            }],
            commit: seq,
        },
    }
}

/// The number `append` gave a message.
pub fn seq_of(msg: &Message) -> u64 {
    match &msg.body {
        MessageBody::Append { prev_index, .. } => *prev_index,
        other => panic!("not a numbered append: {other:?}"),
    }
}

/// The next message, or a failure after [`WAIT`].
pub async fn recv(inbox: &mut Inbox) -> Message {
    tokio::time::timeout(WAIT, inbox.recv())
        .await
        .expect("a message within the wait")
        .expect("the inbox is open")
}

/// Polls `cond` until it holds, failing after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// A raw peer.

pub fn hello(from: NodeId, to: NodeId) -> Hello {
    Hello {
        cluster_id: CLUSTER,
        from,
        to,
        channel: Channel::Raft,
    }
}

pub fn hello_frame(h: &Hello) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_hello_frame(&FrameEncoder::default(), h, &mut buf).unwrap();
    buf
}

pub fn raft_frame(msgs: &[Message]) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_raft_frame(&FrameEncoder::default(), msgs, &mut buf).unwrap();
    buf
}

/// A connection that sent `h` and got the listener's Hello back (checked).
pub async fn raw_handshaken(addr: SocketAddr, h: Hello) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello_frame(&h)).await.unwrap();
    let reply = read_frame(&mut s).await.expect("a Hello back");
    assert_eq!(reply.0, FrameType::Hello);
    let reply = Hello::decode(&reply.1).unwrap();
    assert_eq!(
        reply,
        Hello {
            cluster_id: h.cluster_id,
            from: h.to,
            to: h.from,
            channel: Channel::Raft,
        }
    );
    s
}

/// Reads one frame; `None` if the stream closes first.
pub async fn read_frame(s: &mut TcpStream) -> Option<(FrameType, Bytes)> {
    let dec = FrameDecoder::default();
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            return Some((f.ty, f.body));
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("a frame or a close within the wait")
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

/// Waits until the other end closes `s` (EOF or reset), reading and
/// discarding anything it sends; fails after [`WAIT`]. Returns the bytes
/// read before the close.
pub async fn closed_by_peer(s: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!("the connection was not closed within the wait"),
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}
