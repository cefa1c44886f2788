//! The TCP transport on loopback: pipelined order and coalescing, reconnect
//! after a peer restarts, bounded queues and inbox backpressure, shutdown,
//! configuration.
//!
//! Tests that need to know what is queued when the writer runs use a
//! current-thread runtime: `send` does not yield, so everything sent in a
//! loop is queued before the writer task gets to run. None of them assert
//! on timing; every wait fails only after a generous [`WAIT`].

mod transport_common;

use std::time::Duration;

use skiff_net::{
    SendError, StartError, TcpConfig, TcpTransport, Transport, DEFAULT_FRAME_BYTES_MAX,
};
use skiff_raft::{Message, MessageBody};
use transport_common::*;

#[tokio::test(flavor = "current_thread")]
async fn pipelined_appends_arrive_in_order_in_fewer_frames_than_messages() {
    const N: u64 = 5000;
    let (b, mut b_inbox) = start(config(2)).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.send_queue_max = N as usize;
    cfg.coalesce_bytes_max = 64 << 10;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);

    // No await in this loop: all of it is queued before the writer runs,
    // and nothing waits for an answer.
    for seq in 0..N {
        a.send(append(1, 2, seq, 128)).unwrap();
    }
    for seq in 0..N {
        let m = recv(&mut b_inbox).await;
        assert_eq!(m, append(1, 2, seq, 128), "message {seq}");
    }

    let (am, bm) = (a.metrics(), b.metrics());
    assert_eq!(am.messages_sent, N);
    assert_eq!(bm.messages_received, N);
    // ~200 bytes a message, 64 KiB a frame: about 16 frames.
    assert!(
        am.frames_sent * 50 < N,
        "{} frames for {N} messages: not coalesced",
        am.frames_sent
    );
    assert_eq!(bm.frames_received, am.frames_sent);
    assert_eq!(am.task_panics + bm.task_panics, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_for_an_idle_peer_is_written_at_once_and_queued_sends_stay_ahead() {
    let (b, mut b_inbox) = start(config(2)).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.send_queue_max = 1000;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);

    // Idle link: written by this call, as one frame, before any task runs.
    let errors = a.send_batch((0..10).map(|seq| append(1, 2, seq, 128)).collect());
    assert!(errors.is_empty(), "{errors:?}");
    let am = a.metrics();
    assert_eq!((am.frames_sent_direct, am.messages_sent), (1, 10));

    // Queued sends, then a batch: the writer has not run, so the batch
    // queues behind them instead of overtaking them.
    for seq in 10..110 {
        a.send(append(1, 2, seq, 128)).unwrap();
    }
    let errors = a.send_batch((110..120).map(|seq| append(1, 2, seq, 128)).collect());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(a.metrics().frames_sent_direct, 1);
    for seq in 0..120 {
        assert_eq!(seq_of(&recv(&mut b_inbox).await), seq);
    }
    // Once everything is written the link is idle again.
    eventually("the queued messages to be written", || {
        a.metrics().messages_sent == 120
    })
    .await;
    assert!(a.send_batch(vec![append(1, 2, 120, 128)]).is_empty());
    assert_eq!(a.metrics().frames_sent_direct, 2);
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 120);

    // Errors are per message and name the peer.
    let errors = a.send_batch(vec![append(1, 3, 0, 8), append(1, 2, 121, 8)]);
    assert_eq!(errors, vec![SendError::UnknownPeer { peer: 3 }]);
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 121);
    assert_eq!(a.metrics().task_panics + b.metrics().task_panics, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_direct_frame_the_socket_takes_in_part_is_finished_first() {
    const BATCH: u64 = 16;
    const ROUNDS_MAX: usize = 50;
    let (b, mut b_inbox) = start(config(2)).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.send_queue_max = 4096;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);

    // Each round sends batches without yielding, so that nobody reads:
    // the socket buffer fills, one direct write stops mid-frame or finds
    // no room, and the later batches queue behind it. Then everything is
    // received in order. Until a round has stopped mid-frame.
    let mut seq = 0u64;
    for round in 0.. {
        assert!(round < ROUNDS_MAX, "no direct write was ever partial");
        let first = seq;
        let queued_before = a.metrics().sends_queue_full;
        while seq - first < 2048 {
            let batch = (seq..seq + BATCH).map(|s| append(1, 2, s, 4093)).collect();
            assert!(a.send_batch(batch).is_empty());
            seq += BATCH;
        }
        assert_eq!(a.metrics().sends_queue_full, queued_before);
        for want in first..seq {
            assert_eq!(seq_of(&recv(&mut b_inbox).await), want);
        }
        if a.metrics().frames_sent_direct_partial > 0 {
            break;
        }
    }
    let (am, bm) = (a.metrics(), b.metrics());
    assert_eq!(am.messages_sent, seq);
    assert!(am.frames_sent > am.frames_sent_direct, "{am:?}");
    assert_eq!(bm.messages_received, seq);
    assert_eq!(
        am.connections_closed_on_error + bm.connections_closed_on_error,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once_keep_each_peers_order() {
    const N: u64 = 20_000;
    let (a, mut a_inbox) = start(config(1)).await;
    let (b, mut b_inbox) = start(config(2).with_peer(1, a.local_addr())).await;
    a.add_peer(2, b.local_addr()).unwrap();
    assert!(a.wait_connected(2, WAIT).await);
    assert!(b.wait_connected(1, WAIT).await);
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));

    // A sender that retries a message refused for a full queue (the
    // message was not queued, so order is kept).
    async fn send_all(t: std::sync::Arc<TcpTransport>, from: u64, to: u64) -> u64 {
        let mut full = 0;
        for seq in 0..N {
            loop {
                match t.send(append(from, to, seq, 64)) {
                    Ok(()) => break,
                    Err(SendError::QueueFull { .. }) => {
                        full += 1;
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("send {seq}: {e}"),
                }
            }
        }
        full
    }
    let ab = tokio::spawn(send_all(a.clone(), 1, 2));
    let ba = tokio::spawn(send_all(b.clone(), 2, 1));
    for seq in 0..N {
        assert_eq!(seq_of(&recv(&mut b_inbox).await), seq);
        assert_eq!(seq_of(&recv(&mut a_inbox).await), seq);
    }
    ab.await.unwrap();
    ba.await.unwrap();
    let (am, bm) = (a.metrics(), b.metrics());
    assert_eq!((am.messages_sent, bm.messages_received), (N, N));
    assert_eq!((bm.messages_sent, am.messages_received), (N, N));
    assert_eq!(am.messages_dropped_on_disconnect, 0);
    assert_eq!(am.task_panics + bm.task_panics, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_resumes_after_the_peer_restarts_on_its_port() {
    let (b, mut b_inbox) = start(config(2)).await;
    let b_addr = b.local_addr();
    let (a, _a_inbox) = start(config(1).with_peer(2, b_addr)).await;
    assert!(a.wait_connected(2, WAIT).await);
    for seq in 0..100 {
        a.send(append(1, 2, seq, 100)).unwrap();
    }
    for seq in 0..100 {
        assert_eq!(seq_of(&recv(&mut b_inbox).await), seq);
    }

    // The peer goes away; its inbox ends once drained.
    b.shutdown(WAIT).await.unwrap();
    drop(b);
    assert!(tokio::time::timeout(WAIT, b_inbox.recv())
        .await
        .unwrap()
        .is_none());

    // The sender notices, and from then on reports the peer unreachable
    // instead of queueing.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match a.send(append(1, 2, 0, 100)) {
            Err(SendError::Disconnected { peer: 2 }) => break,
            Ok(()) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never noticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..10 {
        let err = a.send(append(1, 2, 0, 100)).unwrap_err();
        assert_eq!(err, SendError::Disconnected { peer: 2 });
        assert_eq!(err.peer(), 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!a.is_connected(2));

    // Back on the same port: the sender reconnects by itself.
    let mut cfg = config(2);
    cfg.listen_addr = b_addr;
    let (b2, mut b2_inbox) = start_on_same_port(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);
    for seq in 1000..1100 {
        a.send(append(1, 2, seq, 100)).unwrap();
    }
    for seq in 1000..1100 {
        assert_eq!(seq_of(&recv(&mut b2_inbox).await), seq);
    }
    let am = a.metrics();
    assert!(am.connects >= 2, "{am:?}");
    assert!(am.sends_disconnected >= 11, "{am:?}");
    assert_eq!(am.task_panics + b2.metrics().task_panics, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_send_queue_is_reported_not_waited_on() {
    let (b, mut b_inbox) = start(config(2)).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.send_queue_max = 8;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);

    // The writer cannot run until this task awaits: the queue fills.
    for seq in 0..8 {
        a.send(append(1, 2, seq, 32)).unwrap();
    }
    let err = a.send(append(1, 2, 8, 32)).unwrap_err();
    assert_eq!(
        err,
        SendError::QueueFull {
            peer: 2,
            send_queue_max: 8
        }
    );
    assert_eq!(err.peer(), 2);
    assert_eq!(a.metrics().sends_queue_full, 1);

    // Once written, there is room again; the refused message never left.
    for seq in 0..8 {
        assert_eq!(seq_of(&recv(&mut b_inbox).await), seq);
    }
    a.send(append(1, 2, 9, 32)).unwrap();
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 9);
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_inbox_stops_the_reader_without_losing_messages() {
    const N: u64 = 1000;
    let mut cfg = config(2);
    cfg.inbox_max = 4;
    let (b, mut b_inbox) = start(cfg).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.send_queue_max = N as usize;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);
    for seq in 0..N {
        a.send(append(1, 2, seq, 64)).unwrap();
    }
    // Nobody takes messages: the reader waits at the bound.
    eventually("the reader to wait for inbox room", || {
        b.metrics().inbox_full_waits > 0
    })
    .await;
    assert_eq!(b_inbox.len(), 4);
    assert_eq!(b_inbox.inbox_max(), 4);
    assert!(b.metrics().messages_received < N);

    for seq in 0..N {
        assert_eq!(seq_of(&recv(&mut b_inbox).await), seq);
    }
    let bm = b.metrics();
    assert_eq!(bm.messages_received, N);
    assert_eq!(bm.connections_closed_on_error, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_everything_and_frees_the_port() {
    let (a, mut a_inbox) = start(config(1)).await;
    let (b, mut b_inbox) = start(config(2).with_peer(1, a.local_addr())).await;
    a.add_peer(2, b.local_addr()).unwrap();
    assert!(a.wait_connected(2, WAIT).await);
    assert!(b.wait_connected(1, WAIT).await);
    b.send(append(2, 1, 7, 16)).unwrap();
    assert_eq!(seq_of(&recv(&mut a_inbox).await), 7);

    let a_addr = a.local_addr();
    a.shutdown(WAIT).await.unwrap();
    assert_eq!(
        a.send(append(1, 2, 0, 16)),
        Err(SendError::ShutDown { peer: 2 })
    );
    assert!(!a.is_connected(2));
    // Everything received was taken: the inbox ends.
    assert!(tokio::time::timeout(WAIT, a_inbox.recv())
        .await
        .unwrap()
        .is_none());
    // Again: nothing to do.
    a.shutdown(WAIT).await.unwrap();
    assert_eq!(a.metrics().task_panics, 0);

    // The peer sees the connection go and reports it.
    eventually("b to see a gone", || !b.is_connected(1)).await;
    assert_eq!(
        b.send(append(2, 1, 0, 16)),
        Err(SendError::Disconnected { peer: 1 })
    );
    // The port is free for a successor.
    let mut cfg = config(1);
    cfg.listen_addr = a_addr;
    let (a2, _a2_inbox) = start_on_same_port(cfg).await;
    assert!(b.wait_connected(1, WAIT).await);
    drop(a2);
    b.shutdown(WAIT).await.unwrap();
    assert!(tokio::time::timeout(WAIT, b_inbox.recv())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn peers_can_be_added_and_removed() {
    let (b, mut b_inbox) = start(config(2)).await;
    let (a, _a_inbox) = start(config(1)).await;
    assert_eq!(
        a.send(append(1, 2, 0, 8)),
        Err(SendError::UnknownPeer { peer: 2 })
    );
    a.add_peer(2, b.local_addr()).unwrap();
    assert_eq!(a.peers(), vec![(2, b.local_addr().into())]);
    assert!(a.wait_connected(2, WAIT).await);
    a.send(append(1, 2, 1, 8)).unwrap();
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 1);

    assert!(a.remove_peer(2));
    assert!(!a.remove_peer(2));
    assert_eq!(
        a.send(append(1, 2, 2, 8)),
        Err(SendError::UnknownPeer { peer: 2 })
    );
    assert!(!a.wait_connected(2, Duration::from_millis(1)).await);
    // Not a peer: this node, or no node.
    assert_eq!(a.add_peer(1, b.local_addr()).unwrap_err().field, "peers");
    assert_eq!(a.add_peer(0, b.local_addr()).unwrap_err().field, "peers");
    assert_eq!(
        a.send(append(1, 1, 0, 8)),
        Err(SendError::UnknownPeer { peer: 1 })
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_too_large_for_a_frame_is_refused_at_send() {
    let (b, mut b_inbox) = start(config(2)).await;
    let mut cfg = config(1).with_peer(2, b.local_addr());
    cfg.frame_bytes_max = 4096;
    cfg.coalesce_bytes_max = 2048;
    cfg.read_chunk_bytes = 1024;
    let (a, _a_inbox) = start(cfg).await;
    assert!(a.wait_connected(2, WAIT).await);
    match a.send(append(1, 2, 0, 8000)) {
        Err(SendError::TooLarge {
            peer: 2,
            len,
            frame_bytes_max: 4096,
        }) => assert!(len > 8000),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // One over the coalescing bound but within a frame goes alone.
    a.send(append(1, 2, 1, 3000)).unwrap();
    a.send(append(1, 2, 2, 10)).unwrap();
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 1);
    assert_eq!(seq_of(&recv(&mut b_inbox).await), 2);
    assert_eq!(a.metrics().frames_sent, 2);
}

#[tokio::test(flavor = "current_thread")]
async fn every_message_kind_crosses_the_wire() {
    let (b, mut b_inbox) = start(config(2)).await;
    let (a, _a_inbox) = start(config(1).with_peer(2, b.local_addr())).await;
    assert!(a.wait_connected(2, WAIT).await);
    let bodies = [
        MessageBody::PreVote {
            last_index: 1,
            last_term: 2,
        },
        MessageBody::VoteResponse { granted: true },
        MessageBody::Heartbeat {
            commit: 5,
            round: 9,
        },
        MessageBody::TimeoutNow,
        MessageBody::InstallSnapshot {
            index: 10,
            snapshot_term: 2,
            membership: skiff_raft::Membership::with_voters([1, 2, 3]),
            data: bytes::Bytes::from_static(b"snapshot bytes"),
        },
    ];
    let msgs: Vec<Message> = bodies
        .into_iter()
        .map(|body| Message {
            from: 1,
            to: 2,
            term: 4,
            body,
        })
        .collect();
    for m in &msgs {
        a.send(m.clone()).unwrap();
    }
    for m in &msgs {
        assert_eq!(&recv(&mut b_inbox).await, m);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn start_refuses_a_bad_config_and_a_taken_port() {
    let mut cfg = config(1);
    cfg.send_queue_max = 0;
    match TcpTransport::start(cfg).await {
        Err(StartError::Config(e)) => {
            assert_eq!(e.field, "send_queue_max");
            assert!(e.to_string().contains("send_queue_max"), "{e}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    let (a, _a_inbox) = start(config(1)).await;
    let mut cfg = config(2);
    cfg.listen_addr = a.local_addr();
    match TcpTransport::start(cfg).await {
        Err(StartError::Bind { addr, .. }) => assert_eq!(addr, a.local_addr()),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[test]
fn config_errors_name_the_field() {
    let ok = config(1);
    ok.validate().unwrap();
    TcpConfig::new(1, 1, localhost()).validate().unwrap();
    type Breaks = Box<dyn Fn(&mut TcpConfig)>;
    let cases: Vec<(&str, Breaks)> = vec![
        ("id", Box::new(|c| c.id = 0)),
        (
            "peers",
            Box::new(|c| {
                c.peers.insert(1, localhost().into());
            }),
        ),
        (
            "peers",
            Box::new(|c| {
                c.peers.insert(0, localhost().into());
            }),
        ),
        ("send_queue_max", Box::new(|c| c.send_queue_max = 0)),
        (
            "send_queue_max",
            Box::new(|c| c.send_queue_max = usize::MAX),
        ),
        ("inbox_max", Box::new(|c| c.inbox_max = 0)),
        ("frame_bytes_max", Box::new(|c| c.frame_bytes_max = 20)),
        (
            "coalesce_bytes_max",
            Box::new(|c| c.coalesce_bytes_max = DEFAULT_FRAME_BYTES_MAX),
        ),
        ("coalesce_bytes_max", Box::new(|c| c.coalesce_bytes_max = 0)),
        ("read_chunk_bytes", Box::new(|c| c.read_chunk_bytes = 1)),
        (
            "inbound_connections_max",
            Box::new(|c| c.inbound_connections_max = 0),
        ),
        (
            "connect_timeout",
            Box::new(|c| c.connect_timeout = Duration::ZERO),
        ),
        (
            "handshake_timeout",
            Box::new(|c| c.handshake_timeout = Duration::MAX),
        ),
        (
            "reconnect_backoff_max",
            Box::new(|c| c.reconnect_backoff_max = Duration::from_millis(1)),
        ),
        (
            "write_timeout",
            Box::new(|c| c.write_timeout = Duration::ZERO),
        ),
        (
            "read_idle_timeout",
            Box::new(|c| c.read_idle_timeout = c.keepalive_interval),
        ),
        (
            "inbox_stall_timeout",
            Box::new(|c| c.inbox_stall_timeout = Duration::ZERO),
        ),
    ];
    for (field, break_it) in cases {
        let mut cfg = ok.clone();
        break_it(&mut cfg);
        let err = cfg.validate().expect_err(field);
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}
