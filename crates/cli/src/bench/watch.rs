//! `skiff bench --watchers N`: the write load three times in one run,
//! without watchers, with `N` watchers open on the members, and without
//! them again, to read the cost of watch fan-out on writes as a ratio
//! against a baseline measured the same way, and the events per second
//! delivered. The baseline is the mean of the runs before and after:
//! a cluster drifts as it runs (its history grows, snapshots come at
//! intervals of entries), and a baseline taken only before the watchers
//! charged that drift to them (A-B-A).
//!
//! Watcher `i` watches the single key `key-<i mod key_space>` (the keys the
//! load writes), so every write reaches `N / key_space` watchers on average
//! (at least one when `N >= key_space`); streams of
//! [`WATCHERS_PER_STREAM`] watchers each, round-robin over the endpoints
//! (or all on the first with `--watchers-on-one-member`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::watch_client::WatchClient;
use skiff_kv::pb::etcdserverpb::watch_request::RequestUnion;
use skiff_kv::pb::etcdserverpb::{WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;

use super::{connect, normalize_all, run_load, BenchArgs, BenchError, LoadReport, CONNECT_TIMEOUT};

/// Watchers on one gRPC watch stream.
pub const WATCHERS_PER_STREAM: usize = 1000;
/// How long opening every watcher may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);

/// What the three runs measured.
#[derive(Debug)]
pub struct FanoutReport {
    /// Without watchers, before they are opened.
    pub without: LoadReport,
    pub with: LoadReport,
    /// Without watchers, after they are closed.
    pub after: LoadReport,
    /// Events received by the watchers per second during the second run
    /// (its warmup included).
    pub events_per_s: f64,
}

impl FanoutReport {
    /// The baseline's writes/s and p99 (µs): the means of the runs
    /// without watchers before and after.
    pub fn baseline(&self) -> (f64, u64) {
        (
            (self.without.writes_per_s + self.after.writes_per_s) / 2.0,
            (self.without.p99_us + self.after.p99_us).div_ceil(2),
        )
    }

    /// The p99 with watchers over the baseline's.
    pub fn p99_ratio(&self) -> f64 {
        self.with.p99_us as f64 / self.baseline().1.max(1) as f64
    }

    pub fn result_line(&self, watchers: usize) -> String {
        let (writes_per_s, p99_us) = self.baseline();
        format!(
            "RESULT watchers={watchers} writes_per_s_without={writes_per_s:.0} \
             p99_us_without={p99_us} writes_per_s_with={:.0} p99_us_with={} p99_ratio={:.2} \
             events_per_s={:.0} p99_us_before={} p99_us_after={}",
            self.with.writes_per_s,
            self.with.p99_us,
            self.p99_ratio(),
            self.events_per_s,
            self.without.p99_us,
            self.after.p99_us,
        )
    }
}

/// Opens `watchers` watchers; returns the event counter and a guard that
/// closes them when dropped.
async fn open_watchers(
    args: &BenchArgs,
    endpoints: &[String],
) -> Result<(Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>), BenchError> {
    let access = args.tls.access(endpoints).await?;
    let endpoints = normalize_all(endpoints, &access.tls)?;
    let events = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let streams = args.watchers.div_ceil(WATCHERS_PER_STREAM);
    for s in 0..streams {
        let endpoint = if args.watchers_on_one_member {
            &endpoints[0]
        } else {
            &endpoints[s % endpoints.len()]
        };
        let channel = connect(endpoint, &access, CONNECT_TIMEOUT).await?;
        let (tx, rx) = mpsc::channel(WATCHERS_PER_STREAM);
        let first = s * WATCHERS_PER_STREAM;
        let last = (first + WATCHERS_PER_STREAM).min(args.watchers);
        for i in first..last {
            let key = format!("key-{:016}", i as u64 % args.key_space);
            let req = WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(key),
                    ..WatchCreateRequest::default()
                })),
            };
            tx.send(req)
                .await
                .map_err(|_| BenchError::Task("watch queue closed".into()))?;
        }
        let mut stream = WatchClient::new(channel)
            .watch(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                rx,
            ))
            .await
            .map_err(|e| BenchError::Connect {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?
            .into_inner();
        let (events, created) = (events.clone(), created.clone());
        tasks.push(tokio::spawn(async move {
            // Keeps the request side open while the stream lives.
            let _tx = tx;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.created {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                events.fetch_add(resp.events.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let deadline = Instant::now() + OPEN_TIMEOUT;
    while created.load(Ordering::Relaxed) < args.watchers as u64 {
        if Instant::now() > deadline {
            return Err(BenchError::Task(format!(
                "{} of {} watchers created within {OPEN_TIMEOUT:?}",
                created.load(Ordering::Relaxed),
                args.watchers
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((events, tasks))
}

/// The load without watchers, with `args.watchers` of them, and without
/// them again.
pub async fn run_fanout(
    args: &BenchArgs,
    endpoints: &[String],
) -> Result<FanoutReport, BenchError> {
    let without = run_load(args, endpoints).await?;
    let (events, tasks) = open_watchers(args, endpoints).await?;
    let before = events.load(Ordering::Relaxed);
    let started = Instant::now();
    let with = run_load(args, endpoints).await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = events.load(Ordering::Relaxed) - before;
    for t in tasks {
        // Dropping a stream closes its watchers on the member.
        t.abort();
    }
    let with = with?;
    let after = run_load(args, endpoints).await?;
    Ok(FanoutReport {
        without,
        with,
        after,
        events_per_s: delivered as f64 / elapsed.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    fn report(writes_per_s: f64, p99_us: u64) -> LoadReport {
        LoadReport {
            writes_per_s,
            p99_us,
            ..sample_report()
        }
    }

    #[test]
    fn the_baseline_is_the_mean_of_the_runs_before_and_after() {
        // The cluster slowed down as it ran: 10 ms before, 14 ms after.
        // With watchers, 13 ms: over the mean (12 ms), not over the run
        // before alone (1.3).
        let fanout = FanoutReport {
            without: report(20_000.0, 10_000),
            with: report(16_000.0, 13_000),
            after: report(18_000.0, 14_000),
            events_per_s: 150_000.0,
        };
        assert_eq!(fanout.baseline(), (19_000.0, 12_000));
        assert!((fanout.p99_ratio() - 13.0 / 12.0).abs() < 1e-9);
        assert_eq!(
            fanout.result_line(10_000),
            "RESULT watchers=10000 writes_per_s_without=19000 p99_us_without=12000 \
             writes_per_s_with=16000 p99_us_with=13000 p99_ratio=1.08 events_per_s=150000 \
             p99_us_before=10000 p99_us_after=14000"
        );
    }
}
