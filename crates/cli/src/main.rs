//! `skiff`: serve a node, load a cluster, show a cluster's status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use skiff::bench::{BenchArgs, StatusArgs};
use skiff_node::config::{parse_cluster, NodeConfig, WalBackend};

#[derive(Parser, Debug)]
#[command(
    name = "skiff",
    version,
    about = "Skiff: a replicated KV store with the etcd v3 API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one node of a cluster.
    Serve(Box<ServeArgs>),
    /// Load a cluster with writes and report throughput and latency. With no
    /// --endpoints, starts an embedded 3-node cluster on loopback.
    Bench(BenchArgs),
    /// Leader, term, commit and applied index of each member.
    Status(StatusArgs),
}

/// Flags override the `--config` TOML file, which overrides the defaults.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML file with any of the fields below (names with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<u64>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    listen_client: Option<SocketAddr>,
    #[arg(long)]
    listen_peer: Option<SocketAddr>,
    #[arg(long)]
    listen_snapshot: Option<SocketAddr>,
    #[arg(long)]
    listen_metrics: Option<SocketAddr>,
    /// `1=host:port,2=host:port,...`: peer addresses of the voters.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `1=host:port,...`: client addresses of the members (forwarding, member list).
    #[arg(long)]
    initial_cluster_clients: Option<String>,
    #[arg(long)]
    cluster_id: Option<u64>,
    #[arg(long)]
    tick_interval_ms: Option<u64>,
    #[arg(long)]
    election_ticks_min: Option<u32>,
    #[arg(long)]
    election_ticks_max: Option<u32>,
    #[arg(long)]
    heartbeat_ticks: Option<u32>,
    #[arg(long)]
    pre_vote: Option<bool>,
    #[arg(long)]
    check_quorum: Option<bool>,
    #[arg(long)]
    lease_reads: Option<bool>,
    #[arg(long)]
    batch_entries_max: Option<usize>,
    #[arg(long)]
    batch_bytes_max: Option<usize>,
    #[arg(long)]
    batch_linger_us: Option<u64>,
    #[arg(long)]
    io_threads: Option<usize>,
    #[arg(long)]
    inflight_max: Option<usize>,
    #[arg(long)]
    inflight_bytes_max: Option<usize>,
    #[arg(long)]
    append_bytes_max: Option<usize>,
    #[arg(long)]
    uncommitted_bytes_max: Option<usize>,
    #[arg(long)]
    requests_pending_max: Option<usize>,
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    #[arg(long)]
    snapshot_entries: Option<u64>,
    #[arg(long)]
    snapshot_catchup_entries: Option<u64>,
    #[arg(long)]
    snapshot_bytes: Option<u64>,
    #[arg(long)]
    snapshot_streams: Option<usize>,
    #[arg(long)]
    snapshot_chunk_bytes: Option<u32>,
    #[arg(long, value_enum)]
    wal_backend: Option<WalBackend>,
    #[arg(long)]
    wal_segment_size: Option<u64>,
    /// How often, in ms, a watcher that asked for progress notifications
    /// hears the current revision while nothing happens to its keys
    /// (etcd's --experimental-watch-progress-notify-interval; default 10
    /// minutes).
    #[arg(long)]
    watch_progress_notify_interval_ms: Option<u64>,
    /// How often, in ms, the leader records the TTL left of every lease
    /// through Raft, so that a restart or a new leader counts from there
    /// (etcd's lease checkpoint interval; default 5 minutes).
    #[arg(long)]
    lease_checkpoint_interval_ms: Option<u64>,
}

macro_rules! override_fields {
    ($cfg:ident, $args:ident, $($f:ident),* $(,)?) => {
        $( if let Some(v) = $args.$f.clone() { $cfg.$f = v; } )*
    };
}

impl ServeArgs {
    fn config(&self) -> Result<NodeConfig, String> {
        let mut cfg = match &self.config {
            Some(path) => NodeConfig::from_toml_file(path).map_err(|e| e.to_string())?,
            None => NodeConfig::default(),
        };
        let args = self;
        override_fields!(
            cfg,
            args,
            id,
            data_dir,
            listen_client,
            listen_peer,
            listen_snapshot,
            cluster_id,
            tick_interval_ms,
            election_ticks_min,
            election_ticks_max,
            heartbeat_ticks,
            pre_vote,
            check_quorum,
            lease_reads,
            batch_entries_max,
            batch_bytes_max,
            batch_linger_us,
            io_threads,
            inflight_max,
            inflight_bytes_max,
            append_bytes_max,
            uncommitted_bytes_max,
            requests_pending_max,
            request_timeout_ms,
            snapshot_entries,
            snapshot_catchup_entries,
            snapshot_bytes,
            snapshot_streams,
            snapshot_chunk_bytes,
            wal_backend,
            wal_segment_size,
        );
        if let Some(m) = self.listen_metrics {
            cfg.listen_metrics = Some(m);
        }
        if let Some(c) = &self.initial_cluster {
            cfg.initial_cluster =
                parse_cluster(c).map_err(|e| format!("invalid --initial-cluster: {e}"))?;
        }
        if let Some(c) = &self.initial_cluster_clients {
            cfg.initial_cluster_clients =
                parse_cluster(c).map_err(|e| format!("invalid --initial-cluster-clients: {e}"))?;
        }
        cfg.validate().map_err(|e| {
            format!(
                "invalid configuration: --{} ({}): {}",
                e.field.replace('_', "-"),
                e.field,
                e.reason
            )
        })?;
        Ok(cfg)
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: &ServeArgs) -> Result<(), String> {
    init_tracing("info");
    let cfg = args.config()?;
    let mut kv = skiff_kv::server::KvOptions::default();
    if let Some(ms) = args.watch_progress_notify_interval_ms {
        if ms == 0 {
            return Err("--watch-progress-notify-interval-ms must be at least 1".into());
        }
        kv.watch_progress_interval = std::time::Duration::from_millis(ms);
    }
    if let Some(ms) = args.lease_checkpoint_interval_ms {
        if ms == 0 {
            return Err("--lease-checkpoint-interval-ms must be at least 1".into());
        }
        kv.lease_checkpoint_interval = std::time::Duration::from_millis(ms);
    }
    let node = skiff_kv::server::start_with(cfg, kv).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        register_signal(sig, stop.clone());
    }
    let result = node.wait(|| stop.load(Ordering::Acquire));
    tracing::info!("stopped");
    result
}

/// Sets `flag` when `sig` arrives (graceful shutdown on SIGTERM/SIGINT).
fn register_signal(sig: libc::c_int, flag: Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(rt) = rt else {
        return;
    };
    std::thread::spawn(move || {
        rt.block_on(async move {
            let kind = tokio::signal::unix::SignalKind::from_raw(sig);
            if let Ok(mut s) = tokio::signal::unix::signal(kind) {
                s.recv().await;
                tracing::info!(signal = sig, "shutting down");
                flag.store(true, Ordering::Release);
            }
        });
    });
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    init_tracing("warn");
    args.validate().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let load = |endpoints: &[String]| {
        rt.block_on(skiff::bench::run_and_report(args, endpoints))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    if !args.endpoints.is_empty() {
        return load(&args.endpoints);
    }
    if args.ceiling {
        let server = skiff::bench::CeilingServer::start()?;
        eprintln!(
            "ceiling: an in-process server that answers every Put at once and keeps nothing ({})",
            server.endpoint()
        );
        return load(&[server.endpoint()]);
    }
    eprintln!("starting an embedded 3-node cluster on loopback (temporary directory)");
    let cluster =
        skiff_kv::server::embedded_cluster(3, &NodeConfig::default()).map_err(|e| e.to_string())?;
    let leader = cluster
        .wait_leader(Duration::from_secs(10))
        .ok_or("the embedded cluster elected no leader within 10 s")?;
    eprintln!(
        "leader: node {leader}; endpoints: {}",
        cluster.endpoints().join(",")
    );
    let result = load(&cluster.endpoints());
    drop(rt);
    cluster.shutdown()?;
    result
}

fn status(args: &StatusArgs) -> Result<(), String> {
    init_tracing("warn");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let rows = rt
        .block_on(skiff::bench::status(&args.endpoints))
        .map_err(|e| e.to_string())?;
    skiff::bench::print_status_table(&rows);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The event loop builds AppendEntries that the transport's writers
    // free: keep that memory in the process (see skiff_net::heap).
    skiff_net::heap::keep_freed_heap_memory();
    let result = match &cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Status(a) => status(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff: {e}");
            ExitCode::FAILURE
        }
    }
}
