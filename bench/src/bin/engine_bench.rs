//! `engine-bench`: the replication engine alone, without gRPC: 3 members of
//! an [`EmbeddedCluster`] in this process (real WAL files, real TCP on
//! loopback) running a state machine that does nothing, and a closed loop
//! of `--proposers` × `--inflight` requests calling `NodeHandle::propose`
//! on the leader with `--value-bytes` commands.
//!
//! Prints committed entries/s over the measured window (after a warm-up),
//! the latency distribution, the process's CPU time per entry (all
//! threads, getrusage) and the CPU each thread used in the window (from
//! `/proc/self/task`: which of the loop, WAL and transport threads is the
//! bound). Last line:
//! `RESULT entries_per_s=<n> p50_us=<n> p99_us=<n> cpu_us_per_entry=<f>`.
//!
//! ```sh
//! cargo run --release -p skiff-bench --bin engine-bench -- --secs 10
//! cargo run --release -p skiff-bench --bin engine-bench -- --quick
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use skiff_bench::{fmt_rate, process_cpu};
use skiff_node::config::NodeConfig;
use skiff_node::embedded::EmbeddedCluster;
use skiff_node::{ApplyError, Committed, RequestError, RestoreError, SnapshotView, StateMachine};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Committed entries/s of the engine (3 members, real WAL, real TCP), no gRPC"
)]
struct Args {
    /// Concurrent proposers.
    #[arg(long, default_value_t = 4)]
    proposers: usize,
    /// Proposals in flight per proposer.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Short run: 3 s measured, 0.5 s warm-up.
    #[arg(long)]
    quick: bool,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Bytes per command.
    #[arg(long, default_value_t = 128)]
    value_bytes: usize,
    /// Worker threads of the proposers' runtime.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// NodeConfig.batch_entries_max: proposals per Raft proposal batch.
    #[arg(long)]
    batch_entries_max: Option<usize>,
    /// NodeConfig.batch_bytes_max.
    #[arg(long)]
    batch_bytes_max: Option<usize>,
    /// NodeConfig.batch_linger_us.
    #[arg(long)]
    batch_linger_us: Option<u64>,
    /// NodeConfig.inflight_max: AppendEntries in flight per follower.
    #[arg(long)]
    inflight_max: Option<usize>,
    /// NodeConfig.append_bytes_max: entry bytes per AppendEntries.
    #[arg(long)]
    append_bytes_max: Option<usize>,
    /// NodeConfig.io_threads of each member.
    #[arg(long)]
    io_threads: Option<usize>,
    /// NodeConfig.snapshot_entries.
    #[arg(long)]
    snapshot_entries: Option<u64>,
    /// Where the members' data directories go (a temporary directory is
    /// made inside); the system's temporary directory when unset.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// Does nothing with its commands: what the engine costs by itself.
#[derive(Default)]
struct Noop {
    applied: u64,
}

struct Frozen(u64);

impl SnapshotView for Frozen {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.0.to_le_bytes())
    }
}

impl StateMachine for Noop {
    type Command = Bytes;
    type Response = ();
    type Query = ();
    type QueryResponse = u64;
    type Snapshot = Frozen;

    fn encode_command(cmd: &Bytes, out: &mut BytesMut) {
        out.extend_from_slice(cmd);
    }

    fn apply(&mut self, batch: &[Committed], out: &mut Vec<()>) -> Result<(), ApplyError> {
        for entry in batch {
            if entry.command.is_some() {
                self.applied += 1;
                out.push(());
            }
        }
        Ok(())
    }

    fn query(&self, _: &()) -> u64 {
        self.applied
    }

    fn snapshot(&self) -> Frozen {
        Frozen(self.applied)
    }

    fn restore(r: &mut dyn Read) -> Result<Noop, RestoreError> {
        let mut b = [0; 8];
        r.read_exact(&mut b)?;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(RestoreError::Corrupt(format!(
                "{} bytes after the counter",
                rest.len()
            )));
        }
        Ok(Noop {
            applied: u64::from_le_bytes(b),
        })
    }
}

/// Shared between the proposers and the main thread.
struct Window {
    /// Set once the warm-up is over: samples count from then on.
    measuring: AtomicBool,
    stop: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
}

/// One request slot of a proposer: propose, wait, again, until stopped.
async fn slot(
    node: skiff_node::NodeHandle<Noop>,
    value: Bytes,
    w: Arc<Window>,
) -> Result<Histogram<u64>, String> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let mut last_error = None;
    while !w.stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        match node.propose(value.clone()).await {
            Ok(()) => {
                if w.measuring.load(Ordering::Relaxed) {
                    h.saturating_record(start.elapsed().as_micros().max(1) as u64);
                    w.done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(
                e
                @ (RequestError::Busy(_) | RequestError::Unavailable(_) | RequestError::NotYet(_)),
            ) => {
                w.errors.fetch_add(1, Ordering::Relaxed);
                last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => return Err(format!("{e} (last retryable error: {last_error:?})")),
        }
    }
    Ok(h)
}

/// CPU time per thread (name → µs) from `/proc/self/task/*/stat`;
/// threads of the same name are added up.
fn thread_cpu() -> BTreeMap<String, u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... field 14 utime, 15 stime; comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // After "comm", field 3 (state) is index 0: utime is 14 → 11.
        let us = (ticks(11) + ticks(12)) * 1_000_000 / hz;
        *out.entry(name).or_insert(0) += us;
    }
    out
}

fn config(a: &Args) -> NodeConfig {
    let d = NodeConfig::default();
    NodeConfig {
        batch_entries_max: a.batch_entries_max.unwrap_or(d.batch_entries_max),
        batch_bytes_max: a.batch_bytes_max.unwrap_or(d.batch_bytes_max),
        batch_linger_us: a.batch_linger_us.unwrap_or(d.batch_linger_us),
        inflight_max: a.inflight_max.unwrap_or(d.inflight_max),
        append_bytes_max: a.append_bytes_max.unwrap_or(d.append_bytes_max),
        io_threads: a.io_threads.unwrap_or(1),
        snapshot_entries: a.snapshot_entries.unwrap_or(d.snapshot_entries),
        ..d
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    if args.quick {
        args.secs = args.secs.min(3.0);
        args.warmup_secs = args.warmup_secs.min(0.5);
    }
    let cfg = config(&args);
    let slots = args.proposers.max(1) * args.inflight.max(1);
    if slots > cfg.requests_pending_max {
        return Err(format!(
            "{slots} requests in flight over requests_pending_max {}",
            cfg.requests_pending_max
        )
        .into());
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("engine-bench-")
        .tempdir_in(&parent)?;
    let cluster = EmbeddedCluster::start_in(
        3,
        &cfg,
        dir.path(),
        Box::new(|c| skiff_node::Node::start(c, Noop::default())),
    )?;
    let leader = cluster
        .wait_leader(Duration::from_secs(20))
        .ok_or("no leader elected within 20 s")?;
    let node = cluster.node(leader).expect("leader runs").handle().clone();
    println!(
        "engine-bench: 3 members, leader {leader}; {} proposers x {} in flight, {}-byte commands, \
         {} proposer worker(s); batch_entries_max={} batch_bytes_max={} batch_linger_us={} \
         inflight_max={} append_bytes_max={} io_threads={}",
        args.proposers,
        args.inflight,
        args.value_bytes,
        args.workers,
        cfg.batch_entries_max,
        cfg.batch_bytes_max,
        cfg.batch_linger_us,
        cfg.inflight_max,
        cfg.append_bytes_max,
        cfg.io_threads
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .thread_name("bench-proposer")
        .enable_all()
        .build()?;
    let w = Arc::new(Window {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let value = Bytes::from(vec![0xa5u8; args.value_bytes]);
    let tasks: Vec<_> = (0..slots)
        .map(|_| rt.spawn(slot(node.clone(), value.clone(), w.clone())))
        .collect();

    std::thread::sleep(Duration::from_secs_f64(args.warmup_secs));
    let commit0 = node.status().commit;
    let cpu0 = process_cpu()?;
    let threads0 = thread_cpu();
    let t0 = Instant::now();
    w.measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(args.secs));
    w.measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let cpu = process_cpu()? - cpu0;
    let threads1 = thread_cpu();
    let commit1 = node.status().commit;
    let entries = w.done.load(Ordering::Relaxed);
    w.stop.store(true, Ordering::Relaxed);

    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failed = None;
    rt.block_on(async {
        for t in tasks {
            match t.await {
                Ok(Ok(th)) => h.add(th).expect("same bounds"),
                Ok(Err(e)) => failed = Some(e),
                Err(e) => failed = Some(format!("proposer panicked: {e}")),
            }
        }
    });
    drop(rt);
    let metrics = cluster
        .node(leader)
        .expect("leader runs")
        .runtime()
        .block_on(node.metrics_text())
        .unwrap_or_default();
    cluster.shutdown()?;
    if let Some(e) = failed {
        return Err(format!("a proposer failed: {e}").into());
    }

    let secs = elapsed.as_secs_f64();
    let per_s = entries as f64 / secs;
    let cpu_us_per_entry = if entries == 0 {
        0.0
    } else {
        cpu.as_secs_f64() * 1e6 / entries as f64
    };
    println!(
        "committed {} entries in {secs:.2} s: {} entries/s ({} /s by the leader's commit index); \
         {} refused and retried",
        entries,
        fmt_rate(per_s),
        fmt_rate((commit1 - commit0) as f64 / secs),
        w.errors.load(Ordering::Relaxed)
    );
    if !h.is_empty() {
        println!(
            "latency: p50={}us p90={}us p99={}us p999={}us max={}us",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    println!(
        "cpu: {:.2} s of {secs:.2} s wall ({:.0}% of one core), {cpu_us_per_entry:.2} us/entry",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 100.0 / secs
    );
    let mut by_thread: Vec<(u64, String)> = threads1
        .iter()
        .map(|(name, us)| {
            (
                us.saturating_sub(*threads0.get(name).unwrap_or(&0)),
                name.clone(),
            )
        })
        .filter(|(us, _)| *us > 0)
        .collect();
    by_thread.sort_unstable_by(|a, b| b.cmp(a));
    let list: Vec<String> = by_thread
        .iter()
        .take(12)
        .map(|(us, name)| format!("{name} {:.0}%", *us as f64 / 1e4 / secs))
        .collect();
    println!("cpu by thread (% of one core): {}", list.join(", "));
    let leader_line = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("quantile=\"0.5\""))
            .map(|l| l.rsplit(' ').next().unwrap_or("?").to_string())
            .next()
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "leader (whole run, p50): batch_entries={} loop_pass_us={} wal_group_bytes={} \
         wal_fsync_us={}",
        leader_line("skiff_batch_entries"),
        leader_line("skiff_loop_pass_us"),
        leader_line("skiff_wal_group_bytes"),
        leader_line("skiff_wal_fsync_us")
    );
    println!(
        "RESULT entries_per_s={} p50_us={} p99_us={} cpu_us_per_entry={cpu_us_per_entry:.2}",
        per_s.round() as u64,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99)
    );
    Ok(())
}
