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
    /// Measure recovery instead of the append load: write this many GiB of
    /// log (framed records) with `Wal::write` batches of `--recovery-batch`
    /// entries of `--entry-size` bytes plus a hard state, close the WAL,
    /// drop the segments from the page cache (fsync + POSIX_FADV_DONTNEED),
    /// then time `Wal::open`, reading every entry back and the first append;
    /// then again with the cache warm. With `--quick`, at most 0.25.
    #[arg(long, value_name = "GIB")]
    recovery_gib: Option<f64>,
    /// Entries per write (one `WriteBatch`) in the recovery measurement.
    #[arg(long, default_value_t = 64)]
    recovery_batch: usize,
}

/// Most GiB of log `--quick` writes for the recovery measurement.
const QUICK_RECOVERY_GIB: f64 = 0.25;

impl Args {
    /// GiB of log the recovery measurement writes, if it was asked for.
    fn recovery_gib(&self) -> Result<Option<f64>, String> {
        let Some(gib) = self.recovery_gib else {
            return Ok(None);
        };
        if !(gib.is_finite() && gib > 0.0) {
            return Err(format!("--recovery-gib {gib} is not a positive number"));
        }
        if self.recovery_batch == 0 {
            return Err("--recovery-batch must be at least 1".into());
        }
        Ok(Some(if self.quick {
            gib.min(QUICK_RECOVERY_GIB)
        } else {
            gib
        }))
    }
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
    if let Some(gib) = args.recovery_gib()? {
        return recovery::run(&args, gib);
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

/// `--recovery-gib`: how fast a restarting node gets its log back.
mod recovery {
    use std::collections::VecDeque;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use bytes::Bytes;
    use skiff_wal::format::{record_size, ENTRIES_PREFIX, ENTRY_OVERHEAD};
    use skiff_wal::{Entry, HardState, Options, Ticket, Wal, WriteBatch};

    use super::Args;

    type BoxError = Box<dyn std::error::Error>;

    /// Writes in flight while the log is written (below the WAL's queue
    /// bound, so that writers never block on it).
    const WRITES_INFLIGHT: usize = 512;
    const GIB: f64 = (1u64 << 30) as f64;

    /// One restart, timed.
    struct Pass {
        open_s: f64,
        read_s: f64,
        first_append_ms: f64,
        entries: u64,
    }

    pub fn run(args: &Args, gib: f64) -> Result<(), BoxError> {
        let tmp = tempfile::Builder::new()
            .prefix("wal-bench-")
            .tempdir_in(&args.dir)?;
        let dir = tmp.path().join("wal");
        let opts = Options {
            segment_size: args.segment_size,
            backend: args.backend,
            queue_depth: args.queue_depth,
            group_bytes_max: args.group_bytes_max,
            groups_inflight_max: args.groups_inflight_max,
            ..Options::default()
        };
        let target = (gib * GIB) as u64;
        let wal = Wal::open(&dir, opts.clone())?;
        println!(
            "wal-bench recovery: backend={} gib={gib} entry_size={}B entries/write={} segment_size={} dir={}",
            wal.backend(),
            args.entry_size,
            args.recovery_batch,
            args.segment_size,
            tmp.path().display()
        );
        let t = Instant::now();
        let (log_bytes, last) = write_log(&wal, target, args.entry_size, args.recovery_batch)?;
        wal.close()?;
        let write_s = t.elapsed().as_secs_f64();
        let segments = segment_files(&dir)?;
        let file_bytes: u64 = segments
            .iter()
            .map(|p| p.metadata().map(|m| m.len()))
            .sum::<std::io::Result<u64>>()?;
        println!(
            "log: {last} entries, {:.3} GiB framed in {} segments ({:.3} GiB of files), written in {write_s:.2} s ({:.0} MB/s)",
            log_bytes as f64 / GIB,
            segments.len(),
            file_bytes as f64 / GIB,
            log_bytes as f64 / write_s / 1e6
        );

        let dropped = drop_cache(&segments);
        match &dropped {
            Ok(resident) => println!(
                "page cache: dropped (fsync + POSIX_FADV_DONTNEED per segment; {:.1}% of the segment bytes still resident)",
                resident * 100.0
            ),
            Err(e) => println!("page cache: NOT dropped ({e}): the cold pass reads from memory"),
        }
        let cold = restart(&dir, &opts, last, args.entry_size)?;
        report("cold", &cold, log_bytes);
        // The files were just read: now they are in the page cache.
        let warm = restart(&dir, &opts, last + 1, args.entry_size)?;
        report("warm", &warm, log_bytes);

        let rate = |p: &Pass| {
            let s = p.open_s + p.read_s;
            (log_bytes as f64 / s / 1e9, s / (log_bytes as f64 / GIB))
        };
        let line = |p: &Pass| {
            let (gb_per_s, s_per_gib) = rate(p);
            format!(
                "gib={:.3} open_s={:.3} read_s={:.3} first_append_ms={:.3} gb_per_s={gb_per_s:.3} s_per_gib={s_per_gib:.3}",
                log_bytes as f64 / GIB,
                p.open_s,
                p.read_s,
                p.first_append_ms
            )
        };
        println!("RECOVERY_WARM {}", line(&warm));
        // The headline is the cold pass when the cache could be dropped.
        println!(
            "RECOVERY {}",
            line(if dropped.is_ok() { &cold } else { &warm })
        );
        Ok(())
    }

    /// Framed bytes of one write of `n` entries of `size` bytes plus a hard
    /// state.
    fn write_bytes(n: usize, size: usize) -> u64 {
        (record_size(ENTRIES_PREFIX + n * (ENTRY_OVERHEAD + size)) + record_size(24)) as u64
    }

    /// Writes batches as a node persists them (entries and its hard state in
    /// one `WriteBatch`) until `target` framed bytes; returns the bytes and
    /// the last index.
    fn write_log(
        wal: &Wal,
        target: u64,
        entry_size: usize,
        batch: usize,
    ) -> Result<(u64, u64), BoxError> {
        let payload = Bytes::from(
            (0..entry_size)
                .map(|i| (i as u8).wrapping_mul(31) ^ 0x5A)
                .collect::<Vec<u8>>(),
        );
        let per_write = write_bytes(batch, entry_size);
        let mut inflight: VecDeque<Ticket> = VecDeque::with_capacity(WRITES_INFLIGHT);
        let mut bytes = 0u64;
        let mut next = 1u64;
        while bytes < target {
            let entries: Vec<Entry> = (0..batch as u64)
                .map(|i| Entry {
                    index: next + i,
                    term: 1,
                    payload: payload.clone(),
                })
                .collect();
            next += batch as u64;
            if inflight.len() >= WRITES_INFLIGHT {
                inflight.pop_front().expect("non-empty").wait()?;
            }
            inflight.push_back(wal.write(WriteBatch {
                entries,
                hard_state: Some(HardState {
                    term: 1,
                    vote: 1,
                    commit: next.saturating_sub(1 + batch as u64),
                }),
                ..WriteBatch::default()
            })?);
            bytes += per_write;
        }
        for t in inflight {
            t.wait()?;
        }
        Ok((bytes, next - 1))
    }

    /// Segment files (not spares) of the WAL in `dir`.
    fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, BoxError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".wal") && !name.starts_with("spare-") {
                out.push(dir.join(name));
            }
        }
        out.sort();
        Ok(out)
    }

    /// fsync + `POSIX_FADV_DONTNEED` on every file; returns the fraction of
    /// their pages still in the page cache afterwards (by `mincore`).
    fn drop_cache(files: &[PathBuf]) -> Result<f64, String> {
        let (mut resident, mut total) = (0u64, 0u64);
        for path in files {
            let f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
            f.sync_all()
                .map_err(|e| format!("fsync {}: {e}", path.display()))?;
            // SAFETY: a valid descriptor; advice only, no memory is touched.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(format!(
                    "posix_fadvise {}: {}",
                    path.display(),
                    std::io::Error::from_raw_os_error(rc)
                ));
            }
            let (r, t) = resident_pages(&f)?;
            resident += r;
            total += t;
        }
        if total > 0 && resident * 10 > total {
            return Err(format!(
                "{:.0}% of the pages stayed resident after POSIX_FADV_DONTNEED",
                resident as f64 * 100.0 / total as f64
            ));
        }
        Ok(if total == 0 {
            0.0
        } else {
            resident as f64 / total as f64
        })
    }

    /// (resident, total) pages of `f` in the page cache.
    fn resident_pages(f: &File) -> Result<(u64, u64), String> {
        let len = f.metadata().map_err(|e| e.to_string())?.len() as usize;
        if len == 0 {
            return Ok((0, 0));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a read-only shared mapping of a file we keep open; it is
        // never dereferenced, only passed to mincore, and unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `map` is a mapping of `len` bytes and `vec` has one byte
        // per page of it.
        let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: unmaps exactly what was mapped above.
        unsafe { libc::munmap(map, len) };
        if rc != 0 {
            return Err(format!("mincore: {err}"));
        }
        let resident = vec.iter().filter(|&&b| b & 1 != 0).count();
        Ok((resident as u64, pages as u64))
    }

    /// Opens the WAL, reads the whole log back as a restarting node does,
    /// then appends one entry (with a hard state) and waits until durable.
    fn restart(dir: &Path, opts: &Options, last: u64, entry_size: usize) -> Result<Pass, BoxError> {
        let t = Instant::now();
        let wal = Wal::open(dir, opts.clone())?;
        let open_s = t.elapsed().as_secs_f64();
        let (first, last_found) = (wal.first_index(), wal.last_index());
        if last_found != last {
            return Err(format!("recovered up to index {last_found}, wrote up to {last}").into());
        }
        let t = Instant::now();
        let entries = wal.read(first, last_found + 1)?;
        let read_s = t.elapsed().as_secs_f64();
        if entries.len() as u64 != last_found + 1 - first
            || entries
                .last()
                .is_some_and(|e| e.index != last || e.payload.len() != entry_size)
        {
            return Err("read back a different log than was written".into());
        }
        let t = Instant::now();
        wal.write(WriteBatch {
            entries: vec![Entry {
                index: last + 1,
                term: 1,
                payload: Bytes::from(vec![0x5Au8; entry_size]),
            }],
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: last,
            }),
            ..WriteBatch::default()
        })?
        .wait()?;
        let first_append_ms = t.elapsed().as_secs_f64() * 1e3;
        let n = entries.len() as u64;
        // Freeing the entries is not part of the restart.
        drop(entries);
        wal.close()?;
        Ok(Pass {
            open_s,
            read_s,
            first_append_ms,
            entries: n,
        })
    }

    fn report(name: &str, p: &Pass, log_bytes: u64) {
        let gb = log_bytes as f64 / 1e9;
        let gib = log_bytes as f64 / GIB;
        let total = p.open_s + p.read_s;
        println!("recovery, {name} cache ({} entries):", p.entries);
        println!(
            "  open (scan + index)  {:.3} s  {:.2} GB/s  {:.3} s/GiB",
            p.open_s,
            gb / p.open_s,
            p.open_s / gib
        );
        println!(
            "  read all entries     {:.3} s  {:.2} GB/s  {:.3} s/GiB",
            p.read_s,
            gb / p.read_s,
            p.read_s / gib
        );
        println!(
            "  open + read          {:.3} s  {:.2} GB/s  {:.3} s/GiB",
            total,
            gb / total,
            total / gib
        );
        println!("  first append→durable {:.3} ms", p.first_append_ms);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("wal-bench").chain(args.iter().copied()))
    }

    #[test]
    fn recovery_gib_is_off_unless_given() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.recovery_gib, None);
        assert_eq!(a.recovery_gib().unwrap(), None);
    }

    #[test]
    fn recovery_gib_parses_and_quick_caps_it() {
        let a = parse(&["--recovery-gib", "1.5"]).unwrap();
        assert_eq!(a.recovery_gib().unwrap(), Some(1.5));
        assert_eq!(a.recovery_batch, 64);
        let a = parse(&["--recovery-gib", "1", "--quick"]).unwrap();
        assert_eq!(a.recovery_gib().unwrap(), Some(0.25));
        let a = parse(&["--quick", "--recovery-gib=0.1", "--recovery-batch", "8"]).unwrap();
        assert_eq!(a.recovery_gib().unwrap(), Some(0.1));
        assert_eq!(a.recovery_batch, 8);
    }

    #[test]
    fn recovery_gib_rejects_bad_values() {
        assert!(parse(&["--recovery-gib"]).is_err());
        assert!(parse(&["--recovery-gib", "lots"]).is_err());
        for bad in ["0", "-1", "NaN", "inf"] {
            let a = parse(&[&format!("--recovery-gib={bad}")]).unwrap();
            assert!(a.recovery_gib().is_err(), "{bad} accepted");
        }
        let a = parse(&["--recovery-gib", "1", "--recovery-batch", "0"]).unwrap();
        assert!(a.recovery_gib().is_err());
    }
}
