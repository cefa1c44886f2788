//! `net-bench`: AppendEntries throughput over loopback through skiff-net's
//! TCP transport, for 128-byte and 4-KiB entries, against the raw ceiling of
//! the same bytes (the same encoded frames) through a plain socket in the
//! same run; then snapshot transfer with 1 and with N parallel chunk streams.
//!
//! The sending and the receiving side run on runtimes of their own (one
//! worker thread each, the sender's messages built on the main thread), as
//! they would in two nodes: on one shared runtime the scheduler keeps the
//! writer and the reader on one worker and the run measures one core. The
//! raw ceiling's writer and reader are two threads as well.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use skiff_bench::log::{append, log_of};
use skiff_bench::{fmt_rate, process_cpu};
use skiff_net::{encode_raft_frame, FrameEncoder, SendError, TcpConfig, TcpTransport, Transport};
use skiff_raft::{Entry, Message, MessageBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Loopback throughput of skiff-net against a raw TCP ceiling"
)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Short run (well under 20 s).
    #[arg(long)]
    quick: bool,
    /// Entries per AppendEntries message.
    #[arg(long, default_value_t = 64)]
    entries_per_message: usize,
    /// Snapshot size in MiB.
    #[arg(long, default_value_t = 256)]
    snapshot_mib: u64,
    /// Parallel chunk streams for the parallel snapshot run.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Where snapshot files go (a temporary directory is made inside).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// How long the sender waits when the transport refuses a message because
/// the peer's send queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(1);

/// Bound of each transport's shutdown at the end of a run.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// One measured AppendEntries run.
struct Rate {
    payload_bytes_per_s: f64,
    entries_per_s: f64,
    /// CPU time of the whole process (sender, receiver, kernel work done in
    /// their threads) while sending, per entry received: what an entry costs
    /// end to end, to compare with the cores the machine has.
    cpu_ns_per_entry: f64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // As a node does (see skiff_net::heap): the sender builds messages the
    // transport's writer frees.
    skiff_net::heap::keep_freed_heap_memory();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let (send_rt, recv_rt) = (runtime(), runtime());
    if let Err(e) = send_rt.block_on(run(args, recv_rt.handle().clone())) {
        eprintln!("net-bench: {e}");
        std::process::exit(1);
    }
}

/// `recv` is the receiving side's runtime; everything else runs on the
/// caller's.
async fn run(args: Args, recv: Handle) -> Result<(), Box<dyn std::error::Error>> {
    let secs = if args.quick { 2.0 } else { args.duration };
    let d = Duration::from_secs_f64(secs);
    let mut ratio_128 = 0.0;
    let mut ae_128 = 0.0;
    for size in [128usize, 4096] {
        let log = log_of(size, args.entries_per_message);
        let n = args.entries_per_message;
        let ae = transport_run(&log, n, d, &recv).await?;
        let raw = raw_run(&log, n, d, &recv).await?;
        let ratio = ae.payload_bytes_per_s / raw.payload_bytes_per_s;
        println!(
            "AppendEntries {size:>5} B entries: {} entries/s, {:.1} MB/s | raw TCP, same frames: {:.1} MB/s | ratio {:.3}",
            fmt_rate(ae.entries_per_s),
            ae.payload_bytes_per_s / 1e6,
            raw.payload_bytes_per_s / 1e6,
            ratio
        );
        // With every core busy and no wait anywhere, this CPU cost per entry
        // allows at most `cores / cost` entries/s: the ratio no scheduling
        // could beat on this machine.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "  CPU per entry, all threads: {:.0} ns (raw TCP {:.0} ns); {cores} cores at this cost allow at most {:.2} of raw",
            ae.cpu_ns_per_entry,
            raw.cpu_ns_per_entry,
            cores * 1e9 / ae.cpu_ns_per_entry / raw.entries_per_s
        );
        if size == 128 {
            ratio_128 = ratio;
            ae_128 = ae.payload_bytes_per_s / 1e6;
        }
    }
    let snapshot_mb_per_s = snapshot_runs(&args).await?;
    println!(
        "RESULT ae_mb_per_s={:.1} ratio_to_raw={:.3} snapshot_mb_per_s={:.1}",
        ae_128, ratio_128, snapshot_mb_per_s
    );
    Ok(())
}

fn payload_bytes(m: &Message) -> (u64, u64) {
    match &m.body {
        MessageBody::Append { entries, .. } => (
            entries.len() as u64,
            entries.iter().map(|e| e.payload.size() as u64).sum(),
        ),
        _ => (0, 0),
    }
}

async fn transport_run(
    log: &[Entry],
    n: usize,
    d: Duration,
    recv: &Handle,
) -> Result<Rate, Box<dyn std::error::Error>> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let (receiver, mut inbox) = recv
        .spawn(TcpTransport::start(TcpConfig::new(7, 2, any)))
        .await??;
    let (sender, _sender_inbox) =
        TcpTransport::start(TcpConfig::new(7, 1, any).with_peer(2, receiver.local_addr())).await?;
    if !sender.wait_connected(2, Duration::from_secs(10)).await {
        return Err("the sender did not connect within 10 s".into());
    }
    let stop = Instant::now() + d;
    // Counts what arrives until `stop`, then drains without counting until
    // the receiver shuts down, so that the sender can finish its queue and
    // close cleanly.
    let counter = recv.spawn(async move {
        let (mut entries, mut bytes) = (0u64, 0u64);
        let mut buf = Vec::with_capacity(1024);
        let start = Instant::now();
        let mut measured = None;
        loop {
            buf.clear();
            let got =
                tokio::time::timeout(Duration::from_millis(200), inbox.recv_many(&mut buf, 1024))
                    .await;
            if measured.is_none() {
                for m in &buf {
                    let (e, b) = payload_bytes(m);
                    entries += e;
                    bytes += b;
                }
                if Instant::now() >= stop {
                    measured = Some((entries, bytes, start.elapsed()));
                }
            }
            if got == Ok(0) {
                break;
            }
        }
        measured.unwrap_or((entries, bytes, start.elapsed()))
    });
    let mut prev = 0u64;
    let (cpu_start, start) = (process_cpu()?, Instant::now());
    while Instant::now() < stop {
        match sender.send(append(log, n, prev)) {
            Ok(()) => prev += n as u64,
            // The queue holds `send_queue_max` messages (tens of ms of
            // work): back off instead of building messages to drop, as a
            // leader stops sending to a peer reported unreachable.
            Err(SendError::QueueFull { .. }) => tokio::time::sleep(QUEUE_FULL_BACKOFF).await,
            Err(e) => return Err(format!("send failed: {e}").into()),
        }
    }
    let (cpu, sending) = (process_cpu()? - cpu_start, start.elapsed());
    sender.shutdown(SHUTDOWN_TIMEOUT).await?;
    recv.spawn(async move { receiver.shutdown(SHUTDOWN_TIMEOUT).await })
        .await??;
    let (entries, bytes, elapsed) = tokio::time::timeout(SHUTDOWN_TIMEOUT, counter)
        .await
        .map_err(|_| "the receiver's inbox did not close after shutdown")??;
    let secs = elapsed.as_secs_f64();
    let entries_per_s = entries as f64 / secs;
    Ok(Rate {
        payload_bytes_per_s: bytes as f64 / secs,
        entries_per_s,
        cpu_ns_per_entry: cpu.as_secs_f64() * 1e9 / (entries_per_s * sending.as_secs_f64()),
    })
}

/// The same frames (as the transport's writer would coalesce them, 1 MiB
/// each) written through a plain socket to a reader that discards them.
async fn raw_run(
    log: &[Entry],
    n: usize,
    d: Duration,
    recv: &Handle,
) -> Result<Rate, Box<dyn std::error::Error>> {
    let enc = FrameEncoder::default();
    let mut frame = BytesMut::new();
    let mut msgs = Vec::new();
    let mut prev = 0;
    let (mut entries_per_frame, mut bytes_per_frame) = (0u64, 0u64);
    while frame.is_empty() || skiff_net::raft_body_len(&msgs) < (1 << 20) {
        let m = append(log, n, prev);
        prev += n as u64;
        let (e, b) = payload_bytes(&m);
        entries_per_frame += e;
        bytes_per_frame += b;
        msgs.push(m);
        frame.clear();
        encode_raft_frame(&enc, &msgs, &mut frame)?;
    }
    let frame = frame.freeze();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = recv.spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<u64, std::io::Error>(total);
            }
            total += n as u64;
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (cpu_start, start) = (process_cpu()?, Instant::now());
    let mut frames = 0u64;
    while start.elapsed() < d {
        s.write_all(&frame).await?;
        frames += 1;
    }
    let cpu = process_cpu()? - cpu_start;
    s.shutdown().await?;
    drop(s);
    let total = reader.await??;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, frames * frame.len() as u64, "reader got every byte");
    Ok(Rate {
        payload_bytes_per_s: (frames * bytes_per_frame) as f64 / secs,
        entries_per_s: (frames * entries_per_frame) as f64 / secs,
        cpu_ns_per_entry: cpu.as_secs_f64() * 1e9 / (frames * entries_per_frame) as f64,
    })
}

/// Streams a snapshot file of `--snapshot-mib` over loopback with one
/// stream, then with `--streams` parallel streams (a warm-up fetch first:
/// on a VM the first writes into fresh memory are much slower). Returns
/// the parallel run's MB/s, measured end to end (verified, fsynced and
/// renamed into place).
async fn snapshot_runs(args: &Args) -> Result<f64, Box<dyn std::error::Error>> {
    use skiff_net::{
        fetch_snapshot, Channel, FetchOptions, Hello, ServerOptions, SnapshotFiles, SnapshotMeta,
        SnapshotServer,
    };
    use std::io::Write;
    use std::sync::Arc;

    let mib = if args.quick {
        args.snapshot_mib.min(128)
    } else {
        args.snapshot_mib
    };
    let tmp = tempfile::Builder::new()
        .prefix("net-bench-")
        .tempdir_in(&args.dir)?;
    let src = tmp.path().join("source.snap");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for w in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let meta = SnapshotMeta::of_file(1, 1, &src)?;
    let files = Arc::new(SnapshotFiles::new());
    files.insert(src, meta);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = SnapshotServer::serve(listener, files, ServerOptions::new(7, 1))?;
    let hello = Hello {
        cluster_id: 7,
        from: 2,
        to: 1,
        channel: Channel::Snapshot,
    };
    let fetch = |streams: usize, n: usize| {
        let opts = FetchOptions {
            streams,
            chunks_inflight_per_stream: 2,
            ..FetchOptions::default()
        };
        let dest = tmp.path().join(format!("dest-{n}"));
        let addr = server.local_addr();
        async move {
            std::fs::create_dir_all(&dest)?;
            let started = Instant::now();
            let fetched = fetch_snapshot(addr.into(), hello, meta, &dest, &opts).await?;
            let secs = started.elapsed().as_secs_f64();
            std::fs::remove_dir_all(&dest)?;
            Ok::<f64, Box<dyn std::error::Error>>(fetched.stats.bytes_received as f64 / secs / 1e6)
        }
    };
    let warm = fetch(args.streams, 0).await?;
    let one = fetch(1, 1).await?;
    let many = fetch(args.streams, 2).await?;
    println!(
        "snapshot {mib} MiB, 1 MiB chunks, end to end (verified, fsynced): 1 stream {one:.0} MB/s, {} streams {many:.0} MB/s (warm-up {warm:.0} MB/s)",
        args.streams
    );
    Ok(many)
}
