//! Criterion benches of skiff-net's codec, one core, no sockets: the CPU a
//! side of the transport spends per AppendEntries entry, by entry size.
//! - `encode`: 16 AppendEntries of 64 entries into one Raft frame (header,
//!   length prefixes, payload copies, the frame's CRC32C), as the writer
//!   coalesces them;
//! - `decode`: that frame checked (CRC32C) and decoded into messages whose
//!   payloads are slices of the frame, then dropped, as the reader and the
//!   node's loop do.
//!
//! With `net-bench`'s raw TCP ceiling in entries/s, these bound its
//! `ratio_to_raw`: a side that must also copy every byte through the kernel
//! cannot go faster than one entry per (kernel copy + this) on its core.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use skiff_bench::log::{append, log_of};
use skiff_net::{decode_messages, encode_raft_frame, FrameDecoder, FrameEncoder};
use skiff_raft::Message;

const MESSAGES: usize = 16;
const ENTRIES: usize = 64;

/// `MESSAGES` AppendEntries of `ENTRIES` entries of `size` bytes out of a
/// leader's log (each payload its own allocation).
fn appends(size: usize) -> Vec<Message> {
    let log = log_of(size, MESSAGES * ENTRIES);
    (0..MESSAGES)
        .map(|m| append(&log, ENTRIES, (m * ENTRIES) as u64))
        .collect()
}

fn codec(c: &mut Criterion) {
    let enc = FrameEncoder::default();
    let dec = FrameDecoder::default();
    for size in [128usize, 4096] {
        let msgs = appends(size);
        let mut frame = BytesMut::new();
        encode_raft_frame(&enc, &msgs, &mut frame).expect("encode");
        let frame = frame.freeze();

        let mut g = c.benchmark_group("codec");
        g.throughput(Throughput::Elements((MESSAGES * ENTRIES) as u64));
        let mut buf = BytesMut::with_capacity(frame.len());
        g.bench_with_input(BenchmarkId::new("encode", size), &msgs, |b, msgs| {
            b.iter(|| {
                buf.clear();
                encode_raft_frame(&enc, msgs, &mut buf).expect("encode")
            })
        });
        // The frame lands in a fresh buffer outside the timing, as the
        // kernel's copy fills the reader's.
        g.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, frame| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |mut buf| {
                    let f = dec.decode(&mut buf).expect("valid").expect("whole");
                    decode_messages(&f.body).expect("valid").len()
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
