//! Criterion benches of the WAL:
//! - `encode`: encoding + CRC32C of one entries record and its framing, by
//!   entry size (what a writer's thread and the I/O driver spend per batch);
//! - `append_sync`: append a batch and wait until it is durable, at batch
//!   sizes 1, 16 and 256 (128-byte entries), on the default backend, in a
//!   temporary directory under the current one (the disk being measured).

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_wal::format::{frame_into, Body};
use skiff_wal::{Entry, Options, Wal};

fn entries(first: u64, count: usize, size: usize) -> Vec<Entry> {
    let payload = Bytes::from(vec![0x5Au8; size]);
    (0..count as u64)
        .map(|i| Entry {
            index: first + i,
            term: 1,
            payload: payload.clone(),
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    const BATCH: usize = 64;
    for size in [16usize, 128, 1024, 4096, 65536] {
        let batch = entries(1, BATCH, size);
        let mut buf = Vec::with_capacity(BATCH * (size + 64) + 64);
        g.throughput(Throughput::Bytes((BATCH * size) as u64));
        g.bench_with_input(BenchmarkId::new("entries_x64", size), &batch, |b, batch| {
            b.iter(|| {
                buf.clear();
                let body = Body::entries(batch);
                frame_into(&mut buf, 0x1234_5678, 4096, &body);
                buf.len()
            })
        });
    }
    g.finish();
}

fn append_sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("append_sync");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(20);
    let dir = tempfile::Builder::new()
        .prefix("wal-criterion-")
        .tempdir_in(".")
        .expect("temporary directory in the current one");
    for batch in [1usize, 16, 256] {
        let wal =
            Wal::open(dir.path().join(format!("b{batch}")), Options::default()).expect("open WAL");
        let mut next = 1u64;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new(wal.backend().to_string(), batch), |b| {
            b.iter(|| {
                let t = wal.append(entries(next, batch, 128)).expect("append");
                next += batch as u64;
                t.wait().expect("durable");
            })
        });
        wal.close().expect("close");
    }
    g.finish();
}

criterion_group!(benches, encode, append_sync);
criterion_main!(benches);
