//! `skiff bench --leases N`: grants `N` leases, then keeps them all alive
//! as fast as keepalive streams allow for the measured time, and reports
//! keepalives/s and the process's CPU time per keepalive (for the
//! embedded cluster: the whole cluster and the client together).
//!
//! Streams: [`KEEPALIVE_STREAMS`], round-robin over the endpoints; a
//! follower forwards each keepalive to the leader, so the figure includes
//! the forwarding.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use skiff_kv::pb::etcdserverpb::lease_client::LeaseClient;
use skiff_kv::pb::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
use tokio::sync::mpsc;

use super::{connect, normalize_all, BenchArgs, BenchError, CONNECT_TIMEOUT};

/// Keepalive streams open at once.
pub const KEEPALIVE_STREAMS: usize = 16;
/// Grants in flight at once.
const GRANTS_IN_FLIGHT: usize = 128;
/// Keepalive requests queued per stream.
const STREAM_QUEUE: usize = 256;
/// TTL of the leases granted: longer than any run.
const LEASE_TTL_S: i64 = 3600;

/// What the run measured.
#[derive(Debug)]
pub struct LeaseReport {
    pub leases: usize,
    pub grant_s: f64,
    pub keepalives_per_s: f64,
    /// Keepalives/s answered through each endpoint.
    pub by_endpoint: Vec<f64>,
    /// Process CPU per keepalive, µs (None where it cannot be read).
    pub cpu_us_per_keepalive: Option<f64>,
    /// Keepalives answered with TTL 0 (lease not found): should be none.
    pub lost: u64,
}

impl LeaseReport {
    pub fn result_line(&self) -> String {
        format!(
            "RESULT leases={} grant_s={:.1} keepalives_per_s={:.0} cpu_us_per_keepalive={} lost={}",
            self.leases,
            self.grant_s,
            self.keepalives_per_s,
            self.cpu_us_per_keepalive
                .map_or("n/a".to_string(), |c| format!("{c:.1}")),
            self.lost
        )
    }
}

pub async fn run_leases(args: &BenchArgs, endpoints: &[String]) -> Result<LeaseReport, BenchError> {
    let access = args.tls.access(endpoints).await?;
    let mut channels = Vec::new();
    for e in normalize_all(endpoints, &access.tls)? {
        channels.push(connect(&e, &access, CONNECT_TIMEOUT).await?);
    }
    // Grant.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(args.leases)));
    let mut grants = Vec::new();
    for g in 0..GRANTS_IN_FLIGHT {
        let mut client = LeaseClient::new(channels[g % channels.len()].clone());
        let (next, ids, total) = (next.clone(), ids.clone(), args.leases as u64);
        grants.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let r = client
                    .lease_grant(LeaseGrantRequest {
                        ttl: LEASE_TTL_S,
                        id: 0,
                    })
                    .await
                    .map_err(|s| format!("grant: {s}"))?;
                ids.lock().expect("lock").push(r.into_inner().id);
            }
            Ok::<(), String>(())
        }));
    }
    for g in grants {
        g.await
            .map_err(|e| BenchError::Task(e.to_string()))?
            .map_err(BenchError::Task)?;
    }
    let grant_s = started.elapsed().as_secs_f64();
    let ids = std::mem::take(&mut *ids.lock().expect("lock"));

    // Keep alive.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    // Per endpoint: a follower forwards each keepalive to the leader.
    let per_endpoint: Arc<Vec<AtomicU64>> =
        Arc::new((0..channels.len()).map(|_| AtomicU64::new(0)).collect());
    let lost = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 0..KEEPALIVE_STREAMS {
        let mine: Vec<i64> = ids
            .iter()
            .skip(s)
            .step_by(KEEPALIVE_STREAMS)
            .copied()
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut client = LeaseClient::new(channels[s % channels.len()].clone());
        let mut responses = client
            .lease_keep_alive(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                rx,
            ))
            .await
            .map_err(|e| BenchError::Task(format!("keepalive stream: {e}")))?
            .into_inner();
        let stop_tx = stop.clone();
        tasks.push(tokio::spawn(async move {
            for id in mine.iter().cycle() {
                if stop_tx.load(Ordering::Relaxed)
                    || tx.send(LeaseKeepAliveRequest { id: *id }).await.is_err()
                {
                    break;
                }
            }
        }));
        let (answered, lost, stop) = (answered.clone(), lost.clone(), stop.clone());
        let (per_endpoint, ep) = (per_endpoint.clone(), s % channels.len());
        tasks.push(tokio::spawn(async move {
            loop {
                match responses.message().await {
                    Ok(Some(r)) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        per_endpoint[ep].fetch_add(1, Ordering::Relaxed);
                        if r.ttl == 0 {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => {
                        if !stop.load(Ordering::Relaxed) {
                            eprintln!("a keepalive stream ended early");
                        }
                        break;
                    }
                    Err(e) => {
                        if !stop.load(Ordering::Relaxed) {
                            eprintln!("a keepalive stream failed: {e}");
                        }
                        break;
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(args.warmup_time()).await;
    let p0: Vec<u64> = per_endpoint
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let (a0, cpu0, t0) = (
        answered.load(Ordering::Relaxed),
        skiff_node::metrics::process_cpu().ok(),
        Instant::now(),
    );
    tokio::time::sleep(args.measured()).await;
    let p1: Vec<u64> = per_endpoint
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let (a1, cpu1, elapsed) = (
        answered.load(Ordering::Relaxed),
        skiff_node::metrics::process_cpu().ok(),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let done = (a1 - a0).max(1);
    let by_endpoint = p0
        .iter()
        .zip(&p1)
        .map(|(b, a)| (a - b) as f64 / elapsed.as_secs_f64())
        .collect();
    Ok(LeaseReport {
        by_endpoint,
        leases: ids.len(),
        grant_s,
        keepalives_per_s: (a1 - a0) as f64 / elapsed.as_secs_f64(),
        cpu_us_per_keepalive: cpu0
            .zip(cpu1)
            .map(|(b, a)| a.saturating_sub(b).as_micros() as f64 / done as f64),
        lost: lost.load(Ordering::Relaxed),
    })
}
