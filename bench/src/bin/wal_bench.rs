//! `wal-bench`: load the WAL with many concurrent appenders, then measure the
//! raw `pwritev` + `fdatasync` ceiling of the same group bytes in the same
//! run, and print the ratio.
//!
//! Each appender is an async task that appends one entry at a time and keeps
//! up to `--window` appends in flight (a Raft leader pipelines the same way),
//! awaiting its oldest ticket when the window is full. Latency is measured
//! per entry from `append` to its ticket resolving (accepted → durable).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use skiff_bench::raw::{raw_ceiling, RawCeiling};
use skiff_bench::{fmt_rate, percentiles};
use skiff_wal::{Backend, Entry, Histogram, Options, Ticket, Wal};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load the Skiff WAL and compare with the raw pwritev+fdatasync ceiling"
)]
struct Args {
    /// Concurrent appenders (async tasks).
    #[arg(long, default_value_t = 256)]
    appenders: usize,
    /// Appends each appender keeps in flight before awaiting the oldest.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128)]
    entry_size: usize,
    /// Seconds of load (after a short warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Short run: 3 s of load and 2 s of raw ceiling (well under 20 s).
    #[arg(long)]
    quick: bool,
    /// auto, io-uring or pwritev.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Bytes per segment file.
    #[arg(long, default_value_t = 64 << 20)]
    segment_size: u64,
    /// Upper bound of one group (one write + one fdatasync), in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    group_bytes_max: usize,
    /// Groups in flight at once (io_uring).
    #[arg(long, default_value_t = 8)]
    groups_inflight_max: usize,
    /// Bound of the writers → driver queue, in writes.
    #[arg(long, default_value_t = 4096)]
    queue_depth: usize,
    /// Worker threads of the appenders' runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where to put the WAL (a temporary directory is made inside and
    /// removed). Defaults to the current directory, to measure its disk.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// Longest the bench waits without any entry becoming durable before it
/// gives up (the watchdog's bound on every ticket wait).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

thread_local! {
    /// Latency samples of the appenders running on this worker thread: one
    /// histogram per thread (not per appender) stays in cache.
    static LATENCY: Arc<Mutex<Histogram>> = {
        let h = Arc::new(Mutex::new(latency_histogram()));
        REGISTRY.lock().expect("registry lock").push(h.clone());
        h
    };
}

static REGISTRY: Mutex<Vec<Arc<Mutex<Histogram>>>> = Mutex::new(Vec::new());

fn latency_histogram() -> Histogram {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

struct Shared {
    wal: Wal,
    /// The next log index: taken under the same lock as the append, as a
    /// Raft leader assigns indexes.
    next_index: Mutex<u64>,
    stop: AtomicBool,
    measuring: AtomicBool,
    entries_measured: AtomicU64,
    /// Entries that became durable since start, measured or not: the
    /// watchdog's sign of progress.
    entries_durable: AtomicU64,
    payload: Bytes,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("wal-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.appenders == 0 || args.window == 0 || args.threads == 0 {
        return Err("--appenders, --window and --threads must be at least 1".into());
    }
    let (load_s, raw_s, warmup_s) = if args.quick {
        (3.0, 2.0, 0.5)
    } else {
        (args.duration, (args.duration / 2.0).max(2.0), 1.0)
    };
    let tmp = tempfile::Builder::new()
        .prefix("wal-bench-")
        .tempdir_in(&args.dir)?;
    let opts = Options {
        segment_size: args.segment_size,
        backend: args.backend,
        queue_depth: args.queue_depth,
        group_bytes_max: args.group_bytes_max,
        groups_inflight_max: args.groups_inflight_max,
        ..Options::default()
    };
    let wal = Wal::open(tmp.path().join("wal"), opts)?;
    println!(
        "wal-bench: backend={} appenders={} window={} entry_size={}B segment_size={} group_bytes_max={} dir={}",
        wal.backend(),
        args.appenders,
        args.window,
        args.entry_size,
        args.segment_size,
        args.group_bytes_max,
        tmp.path().display()
    );
    let shared = Arc::new(Shared {
        wal,
        next_index: Mutex::new(1),
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        entries_measured: AtomicU64::new(0),
        entries_durable: AtomicU64::new(0),
        payload: Bytes::from(vec![0xA5u8; args.entry_size]),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_time()
        .build()?;
    let tasks: Vec<_> = (0..args.appenders)
        .map(|_| rt.spawn(appender(shared.clone(), args.window)))
        .collect();

    watch(&shared, Duration::from_secs_f64(warmup_s))?;
    let m0 = shared.wal.metrics();
    shared.measuring.store(true, Ordering::Release);
    let t0 = Instant::now();
    watch(&shared, Duration::from_secs_f64(load_s))?;
    shared.measuring.store(false, Ordering::Release);
    let elapsed = t0.elapsed().as_secs_f64();
    let m1 = shared.wal.metrics();
    shared.stop.store(true, Ordering::Release);

    for t in tasks {
        rt.block_on(async { tokio::time::timeout(STALL_TIMEOUT, t).await })
            .map_err(|_| "an appender did not finish within the stall timeout")???;
    }
    drop(rt);
    let mut latency = latency_histogram();
    for h in REGISTRY.lock().expect("registry lock").iter() {
        latency.add(&*h.lock().expect("latency lock"))?;
    }
    let shared = Arc::into_inner(shared).ok_or("appenders still hold the WAL")?;
    let wal_metrics = shared.wal.metrics();
    shared.wal.close()?;

    let entries = shared.entries_measured.load(Ordering::Acquire);
    let groups = m1.groups_total - m0.groups_total;
    let fsyncs = m1.fsyncs_total - m0.fsyncs_total;
    let bytes = m1.bytes_total - m0.bytes_total;
    if entries == 0 || groups == 0 {
        return Err("no entry became durable while measuring".into());
    }
    let entries_per_s = entries as f64 / elapsed;
    let mb_per_s = entries_per_s * args.entry_size as f64 / 1e6;
    let disk_mb_per_s = bytes as f64 / elapsed / 1e6;
    let group_bytes_mean = bytes / groups;
    println!("load: {elapsed:.2} s");
    println!("  entries/s        {}", fmt_rate(entries_per_s));
    println!("  payload MB/s     {mb_per_s:.1}  (framed, to disk: {disk_mb_per_s:.1} MB/s)");
    println!("  fsyncs/s         {}", fmt_rate(fsyncs as f64 / elapsed));
    println!(
        "  entries/fsync    {:.1} (mean)",
        entries as f64 / fsyncs.max(1) as f64
    );
    println!("  bytes/group      {group_bytes_mean} (mean)");
    println!("  append→durable   {}", percentiles(&latency));
    println!("  WAL stages (whole run):");
    println!(
        "    queue wait     {}",
        percentiles(&wal_metrics.queue_wait_us)
    );
    println!("    write          {}", percentiles(&wal_metrics.write_us));
    println!("    fsync          {}", percentiles(&wal_metrics.fsync_us));
    println!(
        "    group entries  p50={} p99={} max={}",
        wal_metrics.group_entries.value_at_quantile(0.5),
        wal_metrics.group_entries.value_at_quantile(0.99),
        wal_metrics.group_entries.max()
    );

    let raw: RawCeiling = raw_ceiling(
        tmp.path(),
        group_bytes_mean as usize,
        args.segment_size,
        Duration::from_secs_f64(raw_s),
    )?;
    let raw_mb_per_s = raw.bytes_per_s / 1e6;
    let ratio = disk_mb_per_s / raw_mb_per_s;
    println!(
        "raw ceiling: pwritev+fdatasync of {group_bytes_mean}-byte groups on a zero-filled file: {raw_mb_per_s:.1} MB/s, {} fsyncs/s, fsync {}",
        fmt_rate(raw.syncs_per_s),
        percentiles(&raw.sync_us)
    );
    println!("ratio to raw: {ratio:.3}");
    println!(
        "RESULT entries_per_s={:.0} mb_per_s={:.1} ratio_to_raw={:.3} p99_us={}",
        entries_per_s,
        mb_per_s,
        ratio,
        latency.value_at_quantile(0.99)
    );
    Ok(())
}

/// Sleeps for `d` while checking that entries keep becoming durable.
fn watch(shared: &Shared, d: Duration) -> Result<(), Box<dyn std::error::Error>> {
    let end = Instant::now() + d;
    let mut last = (
        shared.entries_durable.load(Ordering::Acquire),
        Instant::now(),
    );
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())),
        );
        let now = shared.entries_durable.load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL_TIMEOUT {
            return Err(format!("no entry became durable for {STALL_TIMEOUT:?}").into());
        }
    }
    Ok(())
}

async fn appender(shared: Arc<Shared>, window: usize) -> Result<(), skiff_wal::Error> {
    let latency = LATENCY.with(|h| h.clone());
    let mut inflight: VecDeque<(Ticket, Instant)> = VecDeque::with_capacity(window);
    loop {
        if inflight.len() >= window || (shared.stop.load(Ordering::Acquire) && !inflight.is_empty())
        {
            let (ticket, at) = inflight.pop_front().expect("non-empty");
            // Bounded by the watchdog in `watch`: a timer per entry would
            // cost more than the append.
            ticket.await?;
            shared.entries_durable.fetch_add(1, Ordering::Relaxed);
            if shared.measuring.load(Ordering::Acquire) {
                let us = at.elapsed().as_micros().max(1) as u64;
                latency.lock().expect("latency lock").saturating_record(us);
                shared.entries_measured.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let at = Instant::now();
        let ticket = {
            let mut next = shared.next_index.lock().expect("index lock");
            let entry = Entry {
                index: *next,
                term: 1,
                payload: shared.payload.clone(),
            };
            let t = shared.wal.append(vec![entry])?;
            *next += 1;
            t
        };
        inflight.push_back((ticket, at));
        // Let the other appenders run between appends, as independent
        // clients would.
        tokio::task::yield_now().await;
    }
}
