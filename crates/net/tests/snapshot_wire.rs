//! The snapshot frames' bodies, and what either side does with input that
//! is not what it should be: round trips of every body; decoders fed
//! arbitrary bytes never panic; a receiver facing a hostile or broken
//! sender, and a sender facing a hostile receiver, report a clear error,
//! never panic, never buffer beyond one chunk, and leave nothing behind.

mod snapshot_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use skiff_net::snapshot::wire::{
    AckStatus, ChunkHeader, ChunkRequest, SnapshotAck, ACK_BODY_LEN, CHUNK_PREFIX_LEN,
    REQUEST_BODY_LEN,
};
use skiff_net::{
    encode_hello_frame, fetch_snapshot, Channel, FetchOptions, Frame, FrameDecoder, FrameEncoder,
    FrameHeader, FrameType, Hello, Refusal, SnapshotError, SnapshotMeta, WireError,
    FRAME_HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use snapshot_support::*;

fn decode_one(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    frame
}

// ---------------------------------------------------------------------------
// Bodies.

fn meta_strategy() -> impl Strategy<Value = SnapshotMeta> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(index, term, len, crc)| {
        SnapshotMeta {
            index,
            term,
            len,
            crc,
        }
    })
}

fn status_strategy() -> impl Strategy<Value = AckStatus> {
    prop_oneof![
        Just(AckStatus::Done),
        Just(AckStatus::Unavailable),
        Just(AckStatus::Mismatch),
        Just(AckStatus::Busy),
        Just(AckStatus::BadRequest),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(meta in meta_strategy(), chunk_bytes in any::<u32>(), chunk in any::<u64>()) {
        let req = ChunkRequest { meta, chunk_bytes, chunk };
        let mut buf = BytesMut::new();
        let n = req.encode(&FrameEncoder::default(), &mut buf).unwrap();
        prop_assert_eq!(n, FRAME_HEADER_LEN + REQUEST_BODY_LEN);
        let frame = decode_one(&buf);
        prop_assert_eq!(frame.ty, FrameType::SnapshotRequest);
        prop_assert_eq!(ChunkRequest::decode(&frame.body).unwrap(), req);
    }

    #[test]
    fn chunks_round_trip(
        index in any::<u64>(), term in any::<u64>(), chunk in any::<u64>(), data_crc in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let header = ChunkHeader { index, term, chunk, data_crc, data_len: 0 };
        let mut buf = BytesMut::new();
        header.encode(&FrameEncoder::default(), &data, &mut buf).unwrap();
        let frame = decode_one(&buf);
        prop_assert_eq!(frame.ty, FrameType::SnapshotChunk);
        let (decoded, payload) = ChunkHeader::decode(&frame.body).unwrap();
        prop_assert_eq!(decoded, ChunkHeader { data_len: data.len() as u32, ..header });
        prop_assert_eq!(&payload[..], &data[..]);
    }

    #[test]
    fn acks_round_trip(index in any::<u64>(), term in any::<u64>(), status in status_strategy(), detail in any::<u64>()) {
        let ack = SnapshotAck { index, term, status, detail };
        let mut buf = BytesMut::new();
        let n = ack.encode(&FrameEncoder::default(), &mut buf).unwrap();
        prop_assert_eq!(n, FRAME_HEADER_LEN + ACK_BODY_LEN);
        let frame = decode_one(&buf);
        prop_assert_eq!(frame.ty, FrameType::SnapshotAck);
        prop_assert_eq!(SnapshotAck::decode(&frame.body).unwrap(), ack);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bodies(body in proptest::collection::vec(any::<u8>(), 0..128)) {
        let body = Bytes::from(body);
        let req = ChunkRequest::decode(&body);
        prop_assert_eq!(req.is_ok(), body.len() == REQUEST_BODY_LEN);
        let ack = SnapshotAck::decode(&body);
        if ack.is_ok() {
            prop_assert_eq!(body.len(), ACK_BODY_LEN);
        }
        if let Ok((header, data)) = ChunkHeader::decode(&body) {
            prop_assert_eq!(header.data_len as usize, data.len());
            prop_assert_eq!(body.len(), CHUNK_PREFIX_LEN + data.len());
        }
    }
}

#[test]
fn bodies_of_the_wrong_length_are_errors() {
    let req = [0u8; REQUEST_BODY_LEN + 1];
    assert!(matches!(
        ChunkRequest::decode(&req[..REQUEST_BODY_LEN - 1]),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        ChunkRequest::decode(&req),
        Err(WireError::Malformed { .. })
    ));
    let mut chunk = BytesMut::new();
    ChunkHeader {
        index: 1,
        term: 1,
        chunk: 0,
        data_crc: 0,
        data_len: 10,
    }
    .put(&mut chunk);
    chunk.put_slice(&[0; 9]);
    assert!(matches!(
        ChunkHeader::decode(&chunk.clone().freeze()),
        Err(WireError::Truncated { .. })
    ));
    chunk.put_slice(&[0; 2]);
    assert!(matches!(
        ChunkHeader::decode(&chunk.freeze()),
        Err(WireError::Malformed { .. })
    ));
    let mut ack = [0u8; ACK_BODY_LEN];
    ack[16] = 0;
    assert!(matches!(
        SnapshotAck::decode(&ack),
        Err(WireError::UnknownTag { tag: 0, .. })
    ));
    ack[16] = 6;
    assert!(matches!(
        SnapshotAck::decode(&ack),
        Err(WireError::UnknownTag { tag: 6, .. })
    ));
}

// ---------------------------------------------------------------------------
// A receiver facing a hostile sender.

const META: SnapshotMeta = SnapshotMeta {
    index: 5,
    term: 2,
    len: 1 << 20,
    crc: 0x1234_5678,
};

/// Options that give up quickly: these senders never get better.
fn quick_opts() -> FetchOptions {
    FetchOptions {
        chunk_bytes: 64 << 10,
        streams: 2,
        chunks_inflight_per_stream: 2,
        connect_timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(20),
        reconnects_max: 2,
        reconnect_backoff: Duration::from_millis(1),
        ..FetchOptions::default()
    }
}

/// The Hello a well-behaved sender answers `theirs` with.
fn reply_to(theirs: &Hello) -> Hello {
    Hello {
        cluster_id: theirs.cluster_id,
        from: theirs.to,
        to: theirs.from,
        channel: Channel::Snapshot,
    }
}

/// Writes a fake sender's last answer and closes its writing half (so that
/// a partial frame is seen as one at once), then keeps reading until the
/// receiver closes: closing with its requests unread would reset the
/// connection, possibly before it reads the answer.
async fn answer(conn: &mut FakeConn, bytes: &[u8]) {
    let _ = conn.stream.write_all(bytes).await;
    let _ = conn.stream.shutdown().await;
    while conn.read_frame().await.is_some() {}
}

/// Reads the receiver's Hello and answers it with `reply(theirs)`; then
/// reads its first request.
async fn handshake(conn: &mut FakeConn, reply: impl Fn(&Hello) -> Hello) -> Option<ChunkRequest> {
    let hello = Hello::decode(&conn.read_frame().await?.body).unwrap();
    let mut buf = BytesMut::new();
    encode_hello_frame(&FrameEncoder::default(), &reply(&hello), &mut buf).unwrap();
    let _ = conn.stream.write_all(&buf).await;
    let frame = conn.read_frame().await?;
    assert_eq!(frame.ty, FrameType::SnapshotRequest);
    Some(ChunkRequest::decode(&frame.body).unwrap())
}

/// A chunk frame answering `req` with `data` (checksummed), altered by
/// `edit` before framing.
fn chunk_frame(req: &ChunkRequest, data: &[u8], edit: impl Fn(&mut ChunkHeader)) -> BytesMut {
    let mut header = ChunkHeader {
        index: req.meta.index,
        term: req.meta.term,
        chunk: req.chunk,
        data_crc: crc32c::crc32c(data),
        data_len: data.len() as u32,
    };
    edit(&mut header);
    let mut buf = BytesMut::new();
    FrameEncoder::default()
        .encode_with(
            &mut buf,
            FrameType::SnapshotChunk,
            CHUNK_PREFIX_LEN + data.len(),
            |dst| {
                header.put(dst);
                dst.put_slice(data);
            },
        )
        .unwrap();
    buf
}

/// Runs a fetch of [`META`] against a fake sender running `script`;
/// returns the error (a success is a test failure) and checks that nothing
/// was left in the directory.
async fn fetch_from<F, Fut>(opts: FetchOptions, script: F) -> SnapshotError
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (addr, task) = fake_sender(script).await;
    let dir = tempfile::tempdir().unwrap();
    let result = deadline(fetch_snapshot(
        addr.into(),
        hello(2),
        META,
        dir.path(),
        &opts,
    ))
    .await;
    task.abort();
    assert_eq!(
        dir_entries(dir.path()),
        Vec::<String>::new(),
        "a file was left"
    );
    match result {
        Ok(f) => panic!("a hostile sender's snapshot was handed over: {f:?}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_frames_end_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        let _ = conn.read_frame().await;
        answer(&mut conn, b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await;
    assert!(
        matches!(
            err,
            SnapshotError::Wire {
                source: WireError::BadMagic { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_from_another_node_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        handshake(&mut conn, |h| Hello {
            from: 99,
            ..reply_to(h)
        })
        .await;
    })
    .await;
    assert!(matches!(err, SnapshotError::Protocol { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_from_its_header() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if handshake(&mut conn, reply_to).await.is_some() {
            // A header announcing 1 GiB, and no body: refused at once,
            // nothing of that size reserved.
            let header = FrameHeader {
                ty: FrameType::SnapshotChunk,
                flags: 0,
                body_len: 1 << 30,
                crc: 0,
            };
            answer(&mut conn, &header.encode()).await;
        }
    })
    .await;
    assert!(
        matches!(
            err,
            SnapshotError::Wire {
                source: WireError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_bigger_than_asked_is_refused_from_its_header() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let data = vec![7u8; req.chunk_bytes as usize + 1];
            answer(&mut conn, &chunk_frame(&req, &data, |_| {})).await;
        }
    })
    .await;
    assert!(
        matches!(
            err,
            SnapshotError::Wire {
                source: WireError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_not_asked_for_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let data = vec![1u8; req.chunk_bytes as usize];
            answer(&mut conn, &chunk_frame(&req, &data, |h| h.chunk += 1)).await;
        }
    })
    .await;
    assert!(matches!(err, SnapshotError::Protocol { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_another_snapshot_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let data = vec![1u8; req.chunk_bytes as usize];
            answer(&mut conn, &chunk_frame(&req, &data, |h| h.term += 1)).await;
        }
    })
    .await;
    assert!(matches!(err, SnapshotError::Protocol { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chunk_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let data = vec![1u8; req.chunk_bytes as usize - 1];
            answer(&mut conn, &chunk_frame(&req, &data, |_| {})).await;
        }
    })
    .await;
    assert!(matches!(err, SnapshotError::Protocol { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_body_shorter_than_it_says_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let data = vec![1u8; 100];
            answer(&mut conn, &chunk_frame(&req, &data, |h| h.data_len = 1000)).await;
        }
    })
    .await;
    assert!(
        matches!(
            err,
            SnapshotError::Wire {
                source: WireError::Truncated { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_failing_their_checksum_are_retried_then_reported() {
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    let err = fetch_from(quick_opts(), move |mut conn| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if let Some(req) = handshake(&mut conn, reply_to).await {
                let mut frame = chunk_frame(&req, &vec![3u8; 64 << 10], |_| {});
                let last = frame.len() - 1;
                frame[last] ^= 1;
                answer(&mut conn, &frame).await;
            }
        }
    })
    .await;
    match err {
        SnapshotError::RetriesExhausted {
            reconnects: 2,
            last,
        } => assert!(
            matches!(
                *last,
                SnapshotError::Wire {
                    source: WireError::Checksum { .. },
                    ..
                }
            ),
            "{last}"
        ),
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    assert!(connections.load(Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_with_an_unknown_status_ends_the_receive() {
    let err = fetch_from(quick_opts(), |mut conn| async move {
        if let Some(req) = handshake(&mut conn, reply_to).await {
            let mut body = [0u8; ACK_BODY_LEN];
            body[..8].copy_from_slice(&req.meta.index.to_le_bytes());
            body[16] = 200;
            let mut buf = BytesMut::new();
            FrameEncoder::default()
                .encode(&mut buf, FrameType::SnapshotAck, &body)
                .unwrap();
            answer(&mut conn, &buf).await;
        }
    })
    .await;
    assert!(
        matches!(
            err,
            SnapshotError::Wire {
                source: WireError::UnknownTag { tag: 200, .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sender_times_out() {
    let opts = FetchOptions {
        connect_timeout: Duration::from_millis(300),
        io_timeout: Duration::from_millis(300),
        reconnects_max: 1,
        ..quick_opts()
    };
    let err = fetch_from(opts, |mut conn| async move {
        handshake(&mut conn, reply_to).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    match err {
        SnapshotError::RetriesExhausted { last, .. } => match *last {
            SnapshotError::Connection { ref source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{last}")
            }
            other => panic!("expected a timeout, got {other}"),
        },
        other => panic!("expected RetriesExhausted, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_receive_leaves_no_file() {
    let (addr, task) = fake_sender(|mut conn| async move {
        handshake(&mut conn, reply_to).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let opts = quick_opts();
    let fetch = fetch_snapshot(addr.into(), hello(2), META, dir.path(), &opts);
    // Dropped while waiting for chunks that never come.
    assert!(tokio::time::timeout(Duration::from_millis(300), fetch)
        .await
        .is_err());
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    task.abort();
}

/// Whatever a sender answers a request with after a valid handshake, the
/// receive fails cleanly (the bytes are never exactly the chunk asked for).
#[test]
fn arbitrary_answers_to_a_request_never_panic_the_receiver() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just(3u8), Just(5u8), any::<u8>()],
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(ty, body, framed)| {
            let err = rt.block_on(async {
                let opts = FetchOptions {
                    reconnects_max: 0,
                    ..quick_opts()
                };
                fetch_from(opts, move |mut conn| {
                    let body = body.clone();
                    async move {
                        if handshake(&mut conn, reply_to).await.is_none() {
                            return;
                        }
                        let mut buf = BytesMut::new();
                        match FrameType::from_u8(ty) {
                            Some(ty) if framed => {
                                FrameEncoder::default().encode(&mut buf, ty, &body).unwrap();
                            }
                            _ => buf.put_slice(&body),
                        }
                        answer(&mut conn, &buf).await;
                    }
                })
                .await
            });
            // Any error will do; a hang is caught by the deadline.
            let _ = err.to_string();
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// A sender facing a hostile receiver.

/// Writes `bytes` to the sender and closes its writing half, then reads
/// what it answers until it closes (bounded by the test deadline): the
/// frames it sent.
async fn poke(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<Frame> {
    deadline(async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(bytes).await;
        let _ = stream.shutdown().await;
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        let mut buf = BytesMut::from(&got[..]);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = FrameDecoder::default().decode(&mut buf) {
            frames.push(f);
        }
        frames
    })
    .await
}

fn hello_frame(h: &Hello) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_hello_frame(&FrameEncoder::default(), h, &mut buf).unwrap();
    buf
}

fn request_frame(req: &ChunkRequest) -> BytesMut {
    let mut buf = BytesMut::new();
    req.encode(&FrameEncoder::default(), &mut buf).unwrap();
    buf
}

fn refusal_in(frames: &[Frame]) -> Option<Refusal> {
    let last = frames.last()?;
    assert_eq!(last.ty, FrameType::SnapshotAck);
    SnapshotAck::decode(&last.body).unwrap().refusal()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_survives_hostile_receivers_and_keeps_serving() {
    let source = Source::new();
    let (src, meta) = source.add(1 << 20, 11, 5, 2);
    let server = start_server(source.files.clone(), server_opts()).await;
    let addr = server.local_addr();
    let max = Refusal::BadRequest {
        chunk_bytes_max: 16 << 20,
    };

    // Not frames at all; a header announcing 4 GiB; a request before Hello.
    assert!(poke(addr, b"GET / HTTP/1.1\r\n\r\n").await.is_empty());
    let huge = FrameHeader {
        ty: FrameType::SnapshotRequest,
        flags: 0,
        body_len: u32::MAX,
        crc: 0,
    };
    assert!(poke(addr, &huge.encode()).await.is_empty());
    let req = ChunkRequest {
        meta,
        chunk_bytes: 64 << 10,
        chunk: 0,
    };
    assert!(poke(addr, &request_frame(&req)).await.is_empty());

    // Another cluster, another node, another channel: refused.
    for h in [
        Hello {
            cluster_id: 8,
            ..hello(2)
        },
        Hello { to: 9, ..hello(2) },
        Hello {
            channel: Channel::Raft,
            ..hello(2)
        },
    ] {
        assert_eq!(refusal_in(&poke(addr, &hello_frame(&h)).await), Some(max));
    }

    // Requests it cannot serve: a chunk size out of bounds, a chunk past
    // the end.
    for bad in [
        ChunkRequest {
            chunk_bytes: 1,
            ..req
        },
        ChunkRequest {
            chunk_bytes: u32::MAX,
            ..req
        },
        ChunkRequest { chunk: 16, ..req },
        ChunkRequest {
            chunk: u64::MAX,
            ..req
        },
    ] {
        let mut bytes = hello_frame(&hello(2));
        bytes.extend_from_slice(&request_frame(&bad));
        let frames = poke(addr, &bytes).await;
        assert_eq!(frames[0].ty, FrameType::Hello);
        assert_eq!(refusal_in(&frames), Some(max), "{bad:?}");
    }

    // A receiver claiming to be the sender's peer but acking nonsense.
    let mut bytes = hello_frame(&hello(2));
    let mut ack = BytesMut::new();
    SnapshotAck {
        index: 5,
        term: 2,
        status: AckStatus::Busy,
        detail: 0,
    }
    .encode(&FrameEncoder::default(), &mut ack)
    .unwrap();
    bytes.extend_from_slice(&ack);
    assert_eq!(poke(addr, &bytes).await.len(), 1, "only its Hello");

    // Arbitrary bytes after a valid Hello.
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..200), |junk| {
            let mut bytes = hello_frame(&hello(2));
            bytes.extend_from_slice(&junk);
            let frames = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(poke(addr, &bytes))
            });
            prop_assert!(!frames.is_empty());
            Ok(())
        })
        .unwrap();

    assert!(server.stats().connection_errors >= 10);
    assert_eq!(server.stats().chunks_served, 0);

    // And it still serves a well-behaved receiver.
    let dir = tempfile::tempdir().unwrap();
    let fetched = deadline(fetch_snapshot(
        addr.into(),
        hello(2),
        meta,
        dir.path(),
        &fetch_opts(64 << 10, 2, 2),
    ))
    .await
    .unwrap();
    assert_same_file(&src, &fetched.path);
}
