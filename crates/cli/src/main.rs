//! `skiff`: serve a node, load a cluster, show a cluster's status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use skiff::bench::{BenchArgs, StatusArgs};
use skiff_node::config::{parse_cluster, parse_id, ClusterState, NodeConfig, WalBackend};

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
    /// Role, term, commit and applied index, lag, learner flag and alarms of each member.
    Status(StatusArgs),
    /// Checks: `skiff check consistency` compares HashKV of every member at one revision
    /// (exits 1 when they differ or a member does not answer).
    #[command(subcommand)]
    Check(CheckCmd),
    /// Backups: `skiff snapshot restore` writes a new cluster's member from
    /// one (`etcdctl snapshot save` takes them).
    #[command(subcommand)]
    Snapshot(skiff::snapshot::SnapshotCmd),
}

#[derive(Subcommand, Debug)]
enum CheckCmd {
    /// HashKV of every member at one revision: equal, or which members differ.
    Consistency(skiff::bench::CheckArgs),
}

/// Flags override the `--config` TOML file, which overrides the defaults.
#[derive(clap::Args, Debug)]
#[command(mut_args = with_default_in_help)]
struct ServeArgs {
    /// TOML file with the node's settings: the flags below, `-` written `_`, except the KV
    /// ones (watch, lease, quota, auto-compaction).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This member's id: decimal, or hexadecimal with 0x (as etcdctl prints it).
    #[arg(long, value_parser = parse_id)]
    id: Option<u64>,
    /// Directory of this member's WAL and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the etcd v3 gRPC API.
    #[arg(long)]
    listen_client: Option<SocketAddr>,
    /// Address Raft messages from the other members come to.
    #[arg(long)]
    listen_peer: Option<SocketAddr>,
    /// Address snapshots are served from (port 0: any free port, announced in each offer).
    #[arg(long)]
    listen_snapshot: Option<SocketAddr>,
    /// Address of the Prometheus metrics endpoint (GET /metrics).
    #[arg(long)]
    listen_metrics: Option<SocketAddr>,
    /// `1=host:port,2=host:port,...`: peer addresses (IP or DNS name) of the voters, this member included.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `1=host:port,...`: client addresses of the members (forwarding, member list).
    #[arg(long)]
    initial_cluster_clients: Option<String>,
    /// `new`: the members of --initial-cluster form a new cluster; `existing`: join a
    /// running one (after `etcdctl member add`; needs --cluster-id).
    #[arg(long, value_enum)]
    initial_cluster_state: Option<ClusterState>,
    /// Cluster id: decimal, or hexadecimal with 0x (0: derived from --initial-cluster).
    #[arg(long, value_parser = parse_id)]
    cluster_id: Option<u64>,
    /// TLS on the client port: the certificate it serves (PEM; with --key-file and
    /// --trusted-ca-file).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates chain to; members also verify each
    /// other's client port with it.
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate that chains to --trusted-ca-file.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    client_cert_auth: Option<bool>,
    /// TLS on the peer and snapshot ports: the certificate (PEM) this member presents on
    /// both sides of every connection; it must name the member's peer IP address.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// The private key of --peer-cert-file (PEM).
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// CA certificates (PEM) the members' peer certificates chain to.
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Refuse peers without a certificate of --peer-trusted-ca-file, and a Raft connection
    /// whose certificate does not name the peer address of the member it claims to be.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    peer_client_cert_auth: Option<bool>,
    /// With --peer-client-cert-auth: the common name every peer certificate must carry
    /// (etcd's flag); other peers are refused after the handshake.
    #[arg(long)]
    peer_cert_allowed_cn: Option<String>,
    /// Length of a Raft tick, ms.
    #[arg(long)]
    tick_interval_ms: Option<u64>,
    /// Fewest ticks without a leader before an election.
    #[arg(long)]
    election_ticks_min: Option<u32>,
    /// Most ticks without a leader before an election (each member draws between min and max).
    #[arg(long)]
    election_ticks_max: Option<u32>,
    /// Ticks between the leader's heartbeats.
    #[arg(long)]
    heartbeat_ticks: Option<u32>,
    /// Ask for votes in a pre-vote round first, so that a partitioned member does not
    /// disrupt the cluster.
    #[arg(long)]
    pre_vote: Option<bool>,
    /// A leader that has not heard from a quorum for an election timeout steps down.
    #[arg(long)]
    check_quorum: Option<bool>,
    /// Serve linearizable reads from the leader's lease instead of a ReadIndex round
    /// (relies on bounded clock drift).
    #[arg(long)]
    lease_reads: Option<bool>,
    /// Clock-rate difference between members, in percent, that lease reads stay safe
    /// under: a lease lasts election-ticks-min × (100 − d)/(100 + d) ticks.
    #[arg(long)]
    lease_drift_pct: Option<u32>,
    /// Proposals per Raft proposal batch.
    #[arg(long)]
    batch_entries_max: Option<usize>,
    /// Bytes per Raft proposal batch.
    #[arg(long)]
    batch_bytes_max: Option<usize>,
    /// How long the first proposal of a batch may wait for more, µs (0: take what is queued
    /// and go).
    #[arg(long)]
    batch_linger_us: Option<u64>,
    /// Committed entry bytes applied in one event-loop pass (one entry at least); the rest
    /// follows in the next passes.
    #[arg(long)]
    apply_bytes_max: Option<usize>,
    /// Worker threads of the network runtime (client gRPC, peer transport, snapshot streams).
    #[arg(long)]
    io_threads: Option<usize>,
    /// AppendEntries in flight per follower.
    #[arg(long)]
    inflight_max: Option<usize>,
    /// Entry bytes in flight per follower.
    #[arg(long)]
    inflight_bytes_max: Option<usize>,
    /// Entry bytes per AppendEntries message.
    #[arg(long)]
    append_bytes_max: Option<usize>,
    /// Proposed but uncommitted bytes before proposals are refused.
    #[arg(long)]
    uncommitted_bytes_max: Option<usize>,
    /// Client requests waiting in the node before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long)]
    requests_pending_max: Option<usize>,
    /// Longest a client request waits for its answer, ms.
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Take a state-machine snapshot after this many applied entries.
    #[arg(long)]
    snapshot_entries: Option<u64>,
    /// Entries the log keeps behind a snapshot, so that a follower that far behind catches
    /// up from the log (etcd's 5,000).
    #[arg(long)]
    snapshot_catchup_entries: Option<u64>,
    /// ... or take one after this many payload bytes were applied.
    #[arg(long)]
    snapshot_bytes: Option<u64>,
    /// Parallel streams a follower fetches a snapshot with.
    #[arg(long)]
    snapshot_streams: Option<usize>,
    /// Bytes per snapshot chunk.
    #[arg(long)]
    snapshot_chunk_bytes: Option<u32>,
    /// Free bytes the data directory's filesystem keeps in reserve: below it writes are
    /// refused with a NOSPACE alarm while reads go on (0: no check).
    #[arg(long)]
    space_reserve_bytes: Option<u64>,
    /// WAL I/O: io-uring, pwritev, or auto (io_uring where the kernel allows it).
    #[arg(long, value_enum)]
    wal_backend: Option<WalBackend>,
    /// Bytes of a WAL segment file.
    #[arg(long)]
    wal_segment_size: Option<u64>,
    /// How often, ms, a watcher that asked for progress notifications hears the revision
    /// while its keys are quiet (etcd's --experimental-watch-progress-notify-interval).
    #[arg(long)]
    watch_progress_notify_interval_ms: Option<u64>,
    /// How often, ms, the leader records every lease's TTL left through Raft, so that a
    /// restart or a new leader counts from there.
    #[arg(long)]
    lease_checkpoint_interval_ms: Option<u64>,
    /// Space quota of the store, bytes (what Status reports as the db size: every version
    /// held, history and tombstones included): a write past it is refused and raises a
    /// NOSPACE alarm (etcd's --quota-backend-bytes; 0: the default).
    #[arg(long)]
    quota_backend_bytes: Option<u64>,
    /// Automatic compaction of the history: `periodic` (keep --auto-compaction-retention of
    /// time) or `revision` (keep that many revisions), as etcd.
    #[arg(long, value_parser = ["periodic", "revision"])]
    auto_compaction_mode: Option<String>,
    /// What auto-compaction keeps: for `periodic` a duration (1h, 30m, 90s) or a number of
    /// hours, for `revision` a number of revisions; 0 turns it off.
    #[arg(long)]
    auto_compaction_retention: Option<String>,
    /// How often, ms, the `revision` auto-compaction mode looks (etcd's 5 minutes).
    #[arg(long)]
    auto_compaction_check_interval_ms: Option<u64>,
    /// How long an auth token (from Authenticate) stays valid, seconds (etcd's
    /// --auth-token-ttl).
    #[arg(long)]
    auth_token_ttl: Option<u64>,
    /// bcrypt cost of the password hashes this member makes, 4 ..= 31 (etcd's
    /// --bcrypt-cost).
    #[arg(long)]
    bcrypt_cost: Option<u32>,
}

/// The name `--help` shows for `v`.
fn value_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// The default of a `skiff serve` flag (by its id, the field name), as
/// `--help` shows it: read from `NodeConfig::default()` and
/// `KvOptions::default()`, so that the text cannot drift from the values.
fn serve_default(id: &str) -> Option<String> {
    let n = NodeConfig::default();
    let kv = skiff_kv::server::KvOptions::default();
    let required = |empty: bool, text: String| {
        if empty {
            "none, required".to_string()
        } else {
            text
        }
    };
    let cluster = |c: &std::collections::BTreeMap<u64, skiff_node::PeerAddr>| {
        c.iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    Some(match id {
        "config" => "none".into(),
        "id" => required(n.id == 0, n.id.to_string()),
        "data_dir" => required(
            n.data_dir.as_os_str().is_empty(),
            n.data_dir.display().to_string(),
        ),
        "listen_client" => n.listen_client.to_string(),
        "listen_peer" => n.listen_peer.to_string(),
        "listen_snapshot" => n.listen_snapshot.to_string(),
        "listen_metrics" => n
            .listen_metrics
            .map_or_else(|| "none".into(), |a| a.to_string()),
        "initial_cluster" => required(n.initial_cluster.is_empty(), cluster(&n.initial_cluster)),
        "initial_cluster_clients" if n.initial_cluster_clients.is_empty() => "none".into(),
        "initial_cluster_clients" => cluster(&n.initial_cluster_clients),
        "initial_cluster_state" => value_name(&n.initial_cluster_state),
        "cluster_id" => n.cluster_id.to_string(),
        "cert_file"
        | "key_file"
        | "trusted_ca_file"
        | "peer_cert_file"
        | "peer_key_file"
        | "peer_trusted_ca_file" => "none (plaintext)".into(),
        "peer_cert_allowed_cn" => "none (any name the peer CA signed)".into(),
        "client_cert_auth" => n.client_cert_auth.to_string(),
        "peer_client_cert_auth" => n.peer_client_cert_auth.to_string(),
        "tick_interval_ms" => n.tick_interval_ms.to_string(),
        "election_ticks_min" => n.election_ticks_min.to_string(),
        "election_ticks_max" => n.election_ticks_max.to_string(),
        "heartbeat_ticks" => n.heartbeat_ticks.to_string(),
        "pre_vote" => n.pre_vote.to_string(),
        "check_quorum" => n.check_quorum.to_string(),
        "lease_reads" => n.lease_reads.to_string(),
        "lease_drift_pct" => n.lease_drift_pct.to_string(),
        "batch_entries_max" => n.batch_entries_max.to_string(),
        "batch_bytes_max" => n.batch_bytes_max.to_string(),
        "batch_linger_us" => n.batch_linger_us.to_string(),
        "apply_bytes_max" => n.apply_bytes_max.to_string(),
        "io_threads" => n.io_threads.to_string(),
        "inflight_max" => n.inflight_max.to_string(),
        "inflight_bytes_max" => n.inflight_bytes_max.to_string(),
        "append_bytes_max" => n.append_bytes_max.to_string(),
        "uncommitted_bytes_max" => n.uncommitted_bytes_max.to_string(),
        "requests_pending_max" => n.requests_pending_max.to_string(),
        "request_timeout_ms" => n.request_timeout_ms.to_string(),
        "snapshot_entries" => n.snapshot_entries.to_string(),
        "snapshot_catchup_entries" => n.snapshot_catchup_entries.to_string(),
        "snapshot_bytes" => n.snapshot_bytes.to_string(),
        "snapshot_streams" => n.snapshot_streams.to_string(),
        "snapshot_chunk_bytes" => n.snapshot_chunk_bytes.to_string(),
        "space_reserve_bytes" => n.space_reserve_bytes.to_string(),
        "wal_backend" => value_name(&n.wal_backend),
        "wal_segment_size" => n.wal_segment_size.to_string(),
        "watch_progress_notify_interval_ms" => kv.watch_progress_interval.as_millis().to_string(),
        "lease_checkpoint_interval_ms" => kv.lease_checkpoint_interval.as_millis().to_string(),
        "quota_backend_bytes" => kv.quota_backend_bytes.to_string(),
        "auto_compaction_mode" => "periodic".into(),
        "auto_compaction_retention" => "0 (off)".into(),
        "auto_compaction_check_interval_ms" => {
            kv.revision_compaction_interval.as_millis().to_string()
        }
        "auth_token_ttl" => kv.auth.token_ttl.as_secs().to_string(),
        "bcrypt_cost" => kv.auth.bcrypt_cost.to_string(),
        _ => return None,
    })
}

/// Appends `[default: …]` ([`serve_default`]) to a `skiff serve` flag's
/// help. The flags have no clap default: an unset flag must leave the
/// `--config` file's value alone.
fn with_default_in_help(arg: clap::Arg) -> clap::Arg {
    let Some(default) = serve_default(arg.get_id().as_str()) else {
        return arg;
    };
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let long = arg.get_long_help().map(ToString::to_string);
    let arg = arg.help(format!("{help} [default: {default}]"));
    match long {
        Some(long) => arg.long_help(format!("{long}\n\n[default: {default}]")),
        None => arg,
    }
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
            initial_cluster_state,
            cluster_id,
            client_cert_auth,
            peer_client_cert_auth,
            tick_interval_ms,
            election_ticks_min,
            election_ticks_max,
            heartbeat_ticks,
            pre_vote,
            check_quorum,
            lease_reads,
            lease_drift_pct,
            batch_entries_max,
            batch_bytes_max,
            batch_linger_us,
            apply_bytes_max,
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
            space_reserve_bytes,
            wal_backend,
            wal_segment_size,
        );
        for (flag, field) in [
            (&self.cert_file, &mut cfg.cert_file),
            (&self.key_file, &mut cfg.key_file),
            (&self.trusted_ca_file, &mut cfg.trusted_ca_file),
            (&self.peer_cert_file, &mut cfg.peer_cert_file),
            (&self.peer_key_file, &mut cfg.peer_key_file),
            (&self.peer_trusted_ca_file, &mut cfg.peer_trusted_ca_file),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if let Some(m) = self.listen_metrics {
            cfg.listen_metrics = Some(m);
        }
        if self.peer_cert_allowed_cn.is_some() {
            cfg.peer_cert_allowed_cn
                .clone_from(&self.peer_cert_allowed_cn);
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
    if let Some(bytes) = args.quota_backend_bytes {
        // 0: the default, as etcd's flag.
        kv.quota_backend_bytes = bytes;
    }
    if let Some(retention) = &args.auto_compaction_retention {
        let mode = args.auto_compaction_mode.as_deref().unwrap_or("periodic");
        kv.auto_compaction = skiff_kv::compactor::AutoCompaction::parse(mode, retention)
            .map_err(|e| format!("invalid --auto-compaction-retention: {e}"))?;
    } else if args.auto_compaction_mode.is_some() {
        return Err("--auto-compaction-mode needs --auto-compaction-retention".into());
    }
    if let Some(ms) = args.auto_compaction_check_interval_ms {
        if ms == 0 {
            return Err("--auto-compaction-check-interval-ms must be at least 1".into());
        }
        kv.revision_compaction_interval = std::time::Duration::from_millis(ms);
    }
    if let Some(secs) = args.auth_token_ttl {
        if secs == 0 {
            return Err("--auth-token-ttl must be at least 1".into());
        }
        kv.auth.token_ttl = std::time::Duration::from_secs(secs);
    }
    if let Some(cost) = args.bcrypt_cost {
        if !(4..=31).contains(&cost) {
            return Err(format!("--bcrypt-cost must be 4 ..= 31, not {cost}"));
        }
        kv.auth.bcrypt_cost = cost;
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
    let access = rt
        .block_on(args.tls.access(&args.endpoints))
        .map_err(|e| e.to_string())?;
    let rows = rt
        .block_on(skiff::bench::status(&args.endpoints, &access))
        .map_err(|e| e.to_string())?;
    skiff::bench::print_status_table(&rows);
    Ok(())
}

fn check(cmd: &CheckCmd) -> Result<(), String> {
    init_tracing("warn");
    let CheckCmd::Consistency(args) = cmd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let access = rt
        .block_on(args.tls.access(&args.endpoints))
        .map_err(|e| e.to_string())?;
    let found = rt
        .block_on(skiff::bench::check_consistency(&args.endpoints, &access))
        .map_err(|e| e.to_string())?;
    print!("{}", found.report());
    if found.consistent() {
        Ok(())
    } else {
        Err("the members are not (all) consistent".into())
    }
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
        Cmd::Check(c) => check(c),
        Cmd::Snapshot(c) => skiff::snapshot::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff: {e}");
            ExitCode::FAILURE
        }
    }
}
