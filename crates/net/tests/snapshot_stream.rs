//! Snapshot streaming end to end, over loopback TCP into real files: a
//! large snapshot to two receivers at once with parallel chunks, a
//! corrupted chunk caught and asked for again, a cut connection resumed
//! without asking again for what was written, a sender serving another
//! file than it claims, refusals. No test asserts on timing.

mod snapshot_support;

use std::time::Duration;

use skiff_net::{fetch_snapshot, Refusal, ServerFaults, SnapshotError, SnapshotMeta};

use snapshot_support::*;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_snapshot_streams_to_two_receivers_at_once() {
    deadline(async {
        let source = Source::new();
        let (src, meta) = source.add(256 * MIB, 42, 1000, 3);
        let server = start_server(source.files.clone(), server_opts()).await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let opts = fetch_opts(1 << 20, 4, 4);

        let (a, b) = tokio::join!(
            fetch_snapshot(
                server.local_addr().into(),
                hello(2),
                meta,
                dir_a.path(),
                &opts
            ),
            fetch_snapshot(
                server.local_addr().into(),
                hello(3),
                meta,
                dir_b.path(),
                &opts
            ),
        );
        let (a, b) = (a.unwrap(), b.unwrap());

        for (fetched, dir) in [(&a, &dir_a), (&b, &dir_b)] {
            assert_eq!(fetched.path, dir.path().join(meta.file_name()));
            assert_same_file(&src, &fetched.path);
            assert_eq!(
                dir_entries(dir.path()),
                vec![meta.file_name()],
                "no temporary left"
            );
            let s = &fetched.stats;
            assert_eq!(s.chunks, 256);
            assert_eq!(s.requests_sent, 256, "each chunk asked for once");
            assert_eq!(s.bytes_received, 256 * MIB);
            assert_eq!((s.chunks_corrupt, s.chunks_lost, s.reconnects), (0, 0, 0));
            eprintln!(
                "256 MiB: transfer {:?} ({:.0} MB/s), verify {:?}, sync {:?}",
                s.transfer,
                (256 * MIB) as f64 / 1e6 / s.transfer.as_secs_f64(),
                s.verify,
                s.sync
            );
        }
        let stats = server.stats();
        assert_eq!(stats.chunks_served, 2 * 256);
        assert_eq!(stats.bytes_served, 2 * 256 * MIB);
        assert_eq!(stats.connection_errors, 0);
        // The Done acks are sent after the hand-over, without waiting.
        for _ in 0..1000 {
            if server.stats().transfers_completed == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.stats().transfers_completed, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_detected_and_asked_for_again() {
    deadline(async {
        let source = Source::new();
        let (src, meta) = source.add(8 * MIB + 123, 7, 50, 2);
        let mut opts = server_opts();
        opts.faults = ServerFaults {
            corrupt_chunk_once: Some(37),
            ..ServerFaults::default()
        };
        let server = start_server(source.files.clone(), opts).await;
        let dir = tempfile::tempdir().unwrap();

        let fetched = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &fetch_opts(64 << 10, 3, 2),
        )
        .await
        .unwrap();

        assert_same_file(&src, &fetched.path);
        let s = &fetched.stats;
        assert_eq!(s.chunks, 129, "128 full chunks and a short one");
        assert_eq!(s.chunks_corrupt, 1);
        assert_eq!(
            s.requests_sent,
            s.chunks + 1,
            "only the corrupted chunk asked again"
        );
        assert_eq!(server.stats().chunks_served, s.chunks + 1);
        assert_eq!(s.reconnects, 0, "a bad chunk does not break the connection");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_corrupted_chunks_fail_the_receive() {
    deadline(async {
        let source = Source::new();
        let (_, meta) = source.add(MIB, 8, 51, 2);
        let mut opts = server_opts();
        opts.faults.corrupt_chunk_once = Some(3);
        let server = start_server(source.files.clone(), opts).await;
        let dir = tempfile::tempdir().unwrap();
        let mut fetch = fetch_opts(64 << 10, 1, 1);
        fetch.chunk_retries_max = 0;

        let err = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &fetch,
        )
        .await
        .unwrap_err();

        assert!(
            matches!(err, SnapshotError::ChunkChecksum { chunk: 3, count: 1 }),
            "{err}"
        );
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    })
    .await;
}

/// Resumption: the connection is cut after `cut_after` chunks; the stream
/// reconnects and asks only for chunks not yet written. The sender serves
/// each chunk once, plus at most the chunks that were requested on the cut
/// connection and not received (at most `streams × inflight`).
async fn cut_and_resume(streams: usize, inflight: usize, cut_after: u64) {
    let source = Source::new();
    let (src, meta) = source.add(4 * MIB, 9, 60, 4);
    let mut opts = server_opts();
    opts.faults.cut_after_chunks_once = Some(cut_after);
    let server = start_server(source.files.clone(), opts).await;
    let dir = tempfile::tempdir().unwrap();

    let fetched = fetch_snapshot(
        server.local_addr().into(),
        hello(2),
        meta,
        dir.path(),
        &fetch_opts(32 << 10, streams, inflight),
    )
    .await
    .unwrap();

    assert_same_file(&src, &fetched.path);
    let s = &fetched.stats;
    let served = server.stats().chunks_served;
    eprintln!("streams {streams} × {inflight}, cut after {cut_after}: {s:?}, served {served}");
    assert_eq!(s.chunks, 128);
    assert_eq!(
        s.reconnects, 1,
        "exactly the one cut connection was reopened"
    );
    assert!(s.chunks_lost <= (streams * inflight) as u64, "{s:?}");
    assert!((s.chunks..=s.chunks + s.chunks_lost).contains(&s.requests_sent));
    assert!(
        (s.chunks..=s.chunks + s.chunks_lost).contains(&served),
        "served {served}: chunks written before the cut were served again"
    );
    assert!(
        served < s.chunks + cut_after,
        "the transfer restarted from the start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_without_asking_again_for_written_chunks() {
    deadline(cut_and_resume(1, 1, 40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_among_parallel_ones_resumes() {
    deadline(cut_and_resume(4, 4, 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_serving_another_file_than_it_claims_hands_nothing_over() {
    deadline(async {
        let source = Source::new();
        let (_, meta) = source.add(2 * MIB, 1, 70, 5);
        // Same length, other bytes; the provider still declares `meta`.
        let other = source.dir.path().join("other");
        write_snapshot(&other, 2 * MIB, 2, 70, 5);
        source.files.insert(other, meta);
        let server = start_server(source.files.clone(), server_opts()).await;
        let dir = tempfile::tempdir().unwrap();

        let err = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &fetch_opts(64 << 10, 2, 2),
        )
        .await
        .unwrap_err();

        match err {
            SnapshotError::SnapshotChecksum {
                index: 70,
                term: 5,
                expected,
                actual,
            } => {
                assert_eq!(expected, meta.crc);
                assert_ne!(actual, meta.crc);
            }
            other => panic!("expected a snapshot checksum error, got {other}"),
        }
        assert_eq!(
            dir_entries(dir.path()),
            Vec::<String>::new(),
            "nothing handed over"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_the_sender_does_not_hold_exactly_are_refused() {
    deadline(async {
        let source = Source::new();
        let (_, meta) = source.add(MIB, 1, 80, 6);
        let server = start_server(source.files.clone(), server_opts()).await;
        let dir = tempfile::tempdir().unwrap();
        let opts = fetch_opts(64 << 10, 2, 2);
        let addr = server.local_addr();

        let unknown = SnapshotMeta { index: 81, ..meta };
        let err = fetch_snapshot(addr.into(), hello(2), unknown, dir.path(), &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Refused {
                    reason: Refusal::Unavailable,
                    ..
                }
            ),
            "{err}"
        );

        let other_term = SnapshotMeta { term: 7, ..meta };
        let err = fetch_snapshot(addr.into(), hello(2), other_term, dir.path(), &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Refused {
                    reason: Refusal::Mismatch,
                    ..
                }
            ),
            "{err}"
        );

        let mut big_chunks = opts.clone();
        big_chunks.chunk_bytes = 8 << 20;
        let mut small_server = server_opts();
        small_server.chunk_bytes_max = 1 << 20;
        let small = start_server(source.files.clone(), small_server).await;
        let err = fetch_snapshot(
            small.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &big_chunks,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Refused {
                    reason: Refusal::BadRequest {
                        chunk_bytes_max: 1048576
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sender_is_retried() {
    deadline(async {
        let source = Source::new();
        let (src, meta) = source.add(2 * MIB, 3, 90, 1);
        let mut opts = server_opts();
        opts.connections_max = 1;
        let server = start_server(source.files.clone(), opts).await;
        let dir = tempfile::tempdir().unwrap();
        let mut fetch = fetch_opts(16 << 10, 4, 2);
        fetch.reconnects_max = 10_000;

        let fetched = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &fetch,
        )
        .await
        .unwrap();

        assert_same_file(&src, &fetched.path);
        let (s, served) = (&fetched.stats, server.stats().chunks_served);
        assert!(
            (s.chunks..=s.chunks + s.chunks_lost).contains(&served),
            "{s:?}"
        );
        assert!(server.stats().connections_busy + server.stats().connections >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_snapshot_and_a_single_short_chunk() {
    deadline(async {
        let source = Source::new();
        let (_, empty) = source.add(0, 1, 100, 1);
        let (src, short) = source.add(5, 1, 101, 1);
        let server = start_server(source.files.clone(), server_opts()).await;
        let dir = tempfile::tempdir().unwrap();
        let opts = fetch_opts(1 << 20, 4, 4);

        let e = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            empty,
            dir.path(),
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::metadata(&e.path).unwrap().len(), 0);
        assert_eq!(e.stats.requests_sent, 0);

        let s = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            short,
            dir.path(),
            &opts,
        )
        .await
        .unwrap();
        assert_same_file(&src, &s.path);
        assert_eq!(s.stats.chunks, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_replaces_an_older_copy_and_a_stale_partial_file() {
    deadline(async {
        let source = Source::new();
        let (src, meta) = source.add(MIB, 4, 110, 2);
        let server = start_server(source.files.clone(), server_opts()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(meta.file_name()), b"old").unwrap();
        std::fs::write(
            dir.path().join(format!("{}.partial", meta.file_name())),
            b"junk",
        )
        .unwrap();

        let fetched = fetch_snapshot(
            server.local_addr().into(),
            hello(2),
            meta,
            dir.path(),
            &fetch_opts(64 << 10, 2, 2),
        )
        .await
        .unwrap();

        assert_same_file(&src, &fetched.path);
        assert_eq!(dir_entries(dir.path()), vec![meta.file_name()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sender_is_an_error_after_the_retries() {
    deadline(async {
        // A port with nothing listening: bind, note it, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut opts = fetch_opts(64 << 10, 2, 1);
        opts.reconnects_max = 3;
        let meta = SnapshotMeta {
            index: 1,
            term: 1,
            len: MIB,
            crc: 0,
        };

        let err = fetch_snapshot(addr.into(), hello(2), meta, dir.path(), &opts)
            .await
            .unwrap_err();

        match err {
            SnapshotError::RetriesExhausted {
                reconnects: 3,
                last,
            } => {
                assert!(matches!(*last, SnapshotError::Connection { .. }), "{last}")
            }
            other => panic!("expected RetriesExhausted, got {other}"),
        }
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    })
    .await;
}
