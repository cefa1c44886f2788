//! The TCP transport facing bad peers: garbage, corrupted and oversized
//! frames, misrouted messages, wrong Hellos, stalled frames. Each closes
//! only its own connection; the transport keeps serving everyone else and
//! no task panics.

mod transport_common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use skiff_net::{
    Channel, FrameEncoder, FrameHeader, FrameType, Hello, SendError, TcpTransport, Transport,
    FRAME_HEADER_LEN,
};
use skiff_raft::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use transport_common::*;

/// Node 2 serving, node 1 connected to it.
async fn serving_pair() -> (TcpTransport, skiff_net::Inbox, TcpTransport) {
    let (b, b_inbox) = start(config(2)).await;
    let (a, _a_inbox) = start(config(1).with_peer(2, b.local_addr())).await;
    assert!(a.wait_connected(2, WAIT).await);
    (b, b_inbox, a)
}

/// `a`'s traffic to `b` still flows, in order.
async fn still_serving(a: &TcpTransport, b_inbox: &mut skiff_net::Inbox, first: u64) {
    for seq in first..first + 10 {
        a.send(append(1, 2, seq, 40)).unwrap();
    }
    for seq in first..first + 10 {
        let m = recv(b_inbox).await;
        assert_eq!((m.from, seq_of(&m)), (1, seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let (b, mut b_inbox, a) = serving_pair().await;
    let addr = b.local_addr();

    // Not Skiff at all.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: skiff\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(closed_by_peer(&mut s).await, 0, "no Hello back");

    // A Raft frame before any Hello.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&raft_frame(&[append(3, 2, 0, 8)]))
        .await
        .unwrap();
    assert_eq!(closed_by_peer(&mut s).await, 0);

    // After a good Hello: a flipped bit in a frame's body.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    let mut frame = raft_frame(&[append(3, 2, 0, 64)]);
    let last = frame.len() - 1;
    frame[last] ^= 0x10;
    s.write_all(&frame).await.unwrap();
    closed_by_peer(&mut s).await;

    // A header declaring a body over frame_bytes_max: refused from the
    // header, before any body is buffered.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    let header = FrameHeader {
        ty: FrameType::Raft,
        flags: 0,
        body_len: u32::MAX,
        crc: 0,
    };
    s.write_all(&header.encode()).await.unwrap();
    closed_by_peer(&mut s).await;

    // A checksummed frame whose body does not parse.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    let mut frame = BytesMut::new();
    FrameEncoder::default()
        .encode(&mut frame, FrameType::Raft, &[1, 0, 0, 0, 99, 1, 2, 3])
        .unwrap();
    s.write_all(&frame).await.unwrap();
    closed_by_peer(&mut s).await;

    // A message that is not for this node, or not from the connection's
    // peer.
    for (from, to) in [(3, 5), (4, 2)] {
        let mut s = raw_handshaken(addr, hello(3, 2)).await;
        s.write_all(&raft_frame(&[append(from, to, 0, 8)]))
            .await
            .unwrap();
        closed_by_peer(&mut s).await;
    }

    // A second Hello.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    s.write_all(&hello_frame(&hello(3, 2))).await.unwrap();
    closed_by_peer(&mut s).await;

    // A frame cut short by the close.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    let frame = raft_frame(&[append(3, 2, 0, 64)]);
    s.write_all(&frame[..frame.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    closed_by_peer(&mut s).await;

    // None of it reached the node, and the established link never broke.
    still_serving(&a, &mut b_inbox, 0).await;
    assert!(b_inbox.is_empty());
    let bm = b.metrics();
    assert_eq!(bm.connections_rejected, 2, "{bm:?}");
    assert_eq!(bm.connections_closed_on_error, 7, "{bm:?}");
    assert_eq!(a.metrics().connects, 1);

    // A well-behaved raw peer is served too.
    let mut s = raw_handshaken(addr, hello(3, 2)).await;
    s.write_all(&raft_frame(&[append(3, 2, 42, 8), append(3, 2, 43, 8)]))
        .await
        .unwrap();
    let m = recv(&mut b_inbox).await;
    assert_eq!((m.from, seq_of(&m)), (3, 42));
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 43);

    b.shutdown(WAIT).await.unwrap();
    assert_eq!(b.metrics().task_panics, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_after_a_hello_never_panic_and_never_disturb_others() {
    let (b, mut b_inbox, a) = serving_pair().await;
    let addr = b.local_addr();
    let mut rng = Rng::new(0x5EED);
    for round in 0..40u64 {
        // A peer id each, so that no connection replaces another.
        let mut s = raw_handshaken(addr, hello(3 + round, 2)).await;
        let len = 1 + (rng.next_u64() % 600) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Half the time, start with a plausible header so that the
        // decoder gets past the magic.
        if round % 2 == 0 && junk.len() >= FRAME_HEADER_LEN {
            junk[..4].copy_from_slice(b"SKIF");
            junk[4] = 1;
            junk[5] = FrameType::Raft as u8;
            junk[6] = 0;
            junk[7] = 0;
        }
        s.write_all(&junk).await.unwrap();
        // Whatever it is, the writer then goes away; the reader must end.
        drop(s);
    }
    still_serving(&a, &mut b_inbox, 100).await;
    // Junk then a close is always an error: a bad header, a bad checksum,
    // or a frame cut short.
    eventually("every junk connection to end", || {
        b.metrics().connections_closed_on_error >= 40
    })
    .await;
    b.shutdown(WAIT).await.unwrap();
    assert_eq!(b.metrics().task_panics, 0);
    assert_eq!(a.metrics().task_panics, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hello_is_rejected() {
    let (b, mut b_inbox, a) = serving_pair().await;
    let addr = b.local_addr();
    let bad = [
        Hello {
            cluster_id: CLUSTER + 1,
            ..hello(3, 2)
        },
        hello(3, 7),
        Hello {
            channel: Channel::Snapshot,
            ..hello(3, 2)
        },
        hello(2, 2),
        hello(0, 2),
    ];
    for h in bad {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello_frame(&h)).await.unwrap();
        assert_eq!(closed_by_peer(&mut s).await, 0, "{h:?} got an answer");
    }
    assert_eq!(b.metrics().connections_rejected, 5);

    // A transport of another cluster never gets through.
    let mut cfg = config(3).with_peer(2, addr);
    cfg.cluster_id = CLUSTER + 1;
    let (c, _c_inbox) = start(cfg).await;
    eventually("c's Hello to be rejected", || {
        c.metrics().connect_failures >= 1
    })
    .await;
    assert!(!c.is_connected(2));
    assert_eq!(
        c.send(append(3, 2, 0, 8)),
        Err(SendError::Disconnected { peer: 2 })
    );
    assert!(b.metrics().connections_rejected >= 6);

    // Nor does one that dials the wrong node at this address.
    let (d, _d_inbox) = start(config(4).with_peer(5, addr)).await;
    eventually("d's Hello to be rejected", || {
        d.metrics().connect_failures >= 1
    })
    .await;
    assert!(!d.is_connected(5));

    still_serving(&a, &mut b_inbox, 0).await;
    assert_eq!(a.metrics().connects, 1);
    assert_eq!(b.metrics().connections_accepted, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_answering_with_the_wrong_id_is_not_connected_to() {
    // Something at the peer's address that answers as node 9.
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, _a_inbox) = start(config(1).with_peer(2, addr)).await;
    let (mut s, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (ty, body) = read_frame(&mut s).await.unwrap();
    assert_eq!(ty, FrameType::Hello);
    assert_eq!(Hello::decode(&body).unwrap(), hello(1, 2));
    s.write_all(&hello_frame(&hello(9, 1))).await.unwrap();
    closed_by_peer(&mut s).await;
    eventually("the failure to be counted", || {
        a.metrics().connect_failures >= 1
    })
    .await;
    assert!(!a.is_connected(2));
    assert_eq!(a.metrics().connects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_frame_times_out_while_an_idle_link_stays_up() {
    let mut cfg = config(2);
    cfg.read_idle_timeout = Duration::from_secs(3);
    let (b, mut b_inbox) = start(cfg).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.keepalive_interval = Duration::from_millis(100);
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);

    // A header whose length was corrupted upward: the body never comes.
    let mut s = raw_handshaken(b.local_addr(), hello(3, 2)).await;
    let mut frame = raft_frame(&[append(3, 2, 0, 8)]);
    let declared = u32::from_le_bytes(frame[8..12].try_into().unwrap()) + 1000;
    frame[8..12].copy_from_slice(&declared.to_le_bytes());
    s.write_all(&frame).await.unwrap();
    closed_by_peer(&mut s).await;
    assert_eq!(b.metrics().connections_closed_on_error, 1);

    // Meanwhile the link from a, with nothing to say but keepalives, was
    // never closed (the stalled connection took at least 3 s to go).
    assert!(a.metrics().keepalives_sent > 0);
    assert!(a.is_connected(2));
    assert_eq!(a.metrics().connects, 1);
    still_serving(&a, &mut b_inbox, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_new_connection_replaces_its_old_one() {
    let (b, mut b_inbox, _a) = serving_pair().await;
    let mut old = raw_handshaken(b.local_addr(), hello(3, 2)).await;
    let mut new = raw_handshaken(b.local_addr(), hello(3, 2)).await;
    closed_by_peer(&mut old).await;
    let mut frame = raft_frame(&[append(3, 2, 5, 8)]);
    frame.put_slice(&raft_frame(&[append(3, 2, 6, 8)]));
    new.write_all(&frame).await.unwrap();
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 5);
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 6);
    assert_eq!(b.metrics().connections_closed_on_error, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn connections_past_the_bound_are_refused() {
    let mut cfg = config(2);
    cfg.inbound_connections_max = 2;
    let (b, mut b_inbox) = start(cfg).await;
    let _one = raw_handshaken(b.local_addr(), hello(3, 2)).await;
    let mut two = raw_handshaken(b.local_addr(), hello(4, 2)).await;
    let mut three = TcpStream::connect(b.local_addr()).await.unwrap();
    closed_by_peer(&mut three).await;
    assert_eq!(b.metrics().connections_rejected, 1);
    // The ones admitted still work.
    two.write_all(&raft_frame(&[append(4, 2, 1, 8)]))
        .await
        .unwrap();
    assert_eq!(recv(&mut b_inbox).await.from, 4);
}
