//! Snapshot transfer throughput over loopback, by number of parallel
//! streams and requests in flight per stream. Ignored by default: it is a
//! measurement, not a check. Run it in release mode:
//!
//! ```sh
//! cargo test --release -p skiff-net --test snapshot_throughput -- --ignored --nocapture
//! ```
//!
//! `SNAPSHOT_MIB` sets the snapshot size (default 256), `SNAPSHOT_RUNS` the
//! runs per shape (default 3; the median is reported). One warm-up fetch
//! runs first: on a VM, the first writes into never-used guest memory are
//! several times slower than later ones (the host backs pages on first
//! touch), whatever writes them.

mod snapshot_support;

use std::time::{Duration, Instant};

use skiff_net::fetch_snapshot;

use snapshot_support::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run with --release -- --ignored --nocapture"]
async fn snapshot_throughput_by_streams() {
    let mib = env_or("SNAPSHOT_MIB", 256);
    let runs = env_or("SNAPSHOT_RUNS", 3).max(1) as usize;
    let source = Source::new();
    let (src, meta) = source.add(mib << 20, 5, 1, 1);
    let server = start_server(source.files.clone(), server_opts()).await;
    let mb = meta.len as f64 / 1e6;

    let fetch = |streams: usize, inflight: usize| {
        let opts = fetch_opts(1 << 20, streams, inflight);
        let addr = server.local_addr();
        let src = src.clone();
        async move {
            let dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let fetched = fetch_snapshot(addr, hello(2), meta, dir.path(), &opts)
                .await
                .unwrap();
            let total = started.elapsed();
            assert_same_file(&src, &fetched.path);
            (fetched.stats.transfer, total)
        }
    };

    let (warm, _) = fetch(4, 4).await;
    eprintln!(
        "snapshot of {mib} MiB, 1 MiB chunks, median of {runs}; MB/s = 10^6 bytes/s \
         (warm-up: {:.0} MB/s)",
        mb / warm.as_secs_f64()
    );
    eprintln!("streams × inflight | transfer MB/s | end-to-end MB/s (+ read-back, fsync, rename)");
    for (streams, inflight) in [
        (1, 1),
        (1, 2),
        (1, 4),
        (2, 2),
        (4, 1),
        (4, 2),
        (4, 4),
        (8, 2),
    ] {
        let mut samples: Vec<(Duration, Duration)> = Vec::new();
        for _ in 0..runs {
            samples.push(fetch(streams, inflight).await);
        }
        samples.sort();
        let (transfer, total) = samples[runs / 2];
        eprintln!(
            "{streams:>7} × {inflight:<8} | {:>13.0} | {:>6.0}",
            mb / transfer.as_secs_f64(),
            mb / total.as_secs_f64(),
        );
    }
}
