//! The closed loop: connections, one task per in-flight slot, the progress
//! bar and the merge of per-task results.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::report::LoadReport;
use super::{
    connect, normalize_all, BenchArgs, BenchError, CONNECT_TIMEOUT, NO_SUCCESS_LIMIT,
    REQUEST_TIMEOUT,
};
use skiff_kv::pb::etcdserverpb::kv_client::KvClient;
use skiff_kv::pb::etcdserverpb::PutRequest;

/// Smallest latency the histograms resolve, in µs.
const LATENCY_US_MIN: u64 = 1;
/// Largest latency the histograms hold, in µs: twice the request timeout
/// (a reply cannot take longer; larger values saturate).
const LATENCY_US_MAX: u64 = 2 * REQUEST_TIMEOUT.as_micros() as u64;
/// Significant decimal digits of the histograms (0.1 % resolution).
const LATENCY_SIGFIG: u8 = 3;
/// After a failed request a task pauses this long, so that a dead server
/// is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How often the coordinator wakes: progress bar and the no-success check.
const TICK: Duration = Duration::from_millis(200);
/// Samples kept for the live writes/s (over the last TICK × this).
const RATE_SAMPLES_MAX: usize = 5;

const _: () = assert!(LATENCY_US_MAX > LATENCY_US_MIN);

/// Opens the connections and runs the closed loop for warmup + duration
/// (see the module docs of [`crate::bench`]). `endpoints` are the ones to
/// load (`args.endpoints` is not read, so that the caller can pass an
/// embedded cluster's).
pub async fn run_load(args: &BenchArgs, endpoints: &[String]) -> Result<LoadReport, BenchError> {
    args.validate()?;
    if endpoints.is_empty() {
        return Err(BenchError::NoEndpoints);
    }
    let access = args.tls.access(endpoints).await?;
    let endpoints = normalize_all(endpoints, &access.tls)?;

    let mut channels = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        channels.push(connect(&endpoints[i % endpoints.len()], &access, CONNECT_TIMEOUT).await?);
    }

    let warmup = args.warmup_time();
    let measured = args.measured();
    let began = Instant::now();
    let window = Window {
        start: began + warmup,
        end: began + warmup + measured,
    };
    let shared = Arc::new(Shared::default());
    let value = make_value(args.value_size, args.seed);

    let mut tasks = JoinSet::new();
    for (c, channel) in channels.iter().enumerate() {
        for slot in 0..args.concurrency {
            let task_index = (c * args.concurrency + slot) as u64;
            let worker = Worker {
                client: KvClient::new(channel.clone()),
                rng: XorShift::new(args.seed ^ task_index.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                key_space: args.key_space,
                value: value.clone(),
                window,
                shared: Arc::clone(&shared),
            };
            tasks.spawn(worker.run());
        }
    }
    debug_assert_eq!(tasks.len(), args.clients * args.concurrency);

    // The process's CPU time over the measured window: for the embedded
    // cluster that is the whole cluster and the client together.
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window.start).await;
        let before = skiff_node::metrics::process_cpu().ok()?;
        tokio::time::sleep_until(window.end).await;
        let after = skiff_node::metrics::process_cpu().ok()?;
        Some(after.saturating_sub(before))
    });
    let progress = Progress::new(args.no_progress, warmup + measured);
    let watch = watch(&shared, &progress, began, window, &endpoints).await;
    if let Err(err) = watch {
        shared.stop.store(true, Ordering::Relaxed);
        tasks.abort_all();
        progress.bar.finish_and_clear();
        return Err(err);
    }

    // Tasks issue nothing after window.end; the last replies land within
    // REQUEST_TIMEOUT.
    let mut histogram = new_histogram::<u64>();
    let mut writes = 0u64;
    let mut errors = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        writes += result.writes;
        for (code, n) in result.errors {
            *errors.entry(code.to_string()).or_insert(0) += n;
        }
        for v in result.histogram.iter_recorded() {
            histogram.saturating_record_n(v.value_iterated_to(), v.count_at_value() as u64);
        }
    }
    progress.bar.finish_and_clear();
    assert_eq!(
        histogram.len(),
        writes,
        "every measured write is in the histogram"
    );

    if shared.ok_total.load(Ordering::Relaxed) == 0 {
        return Err(no_success(&shared, began.elapsed(), &endpoints));
    }
    let cpu = cpu.await.ok().flatten();
    let mut report = LoadReport::new(args.clone(), endpoints, writes, errors, measured, histogram);
    report.cpu_us_per_write = cpu
        .filter(|_| writes > 0)
        .map(|c| c.as_secs_f64() * 1e6 / writes as f64);
    Ok(report)
}

/// Wakes every TICK until the window ends: updates the progress bar and
/// fails the run if nothing has succeeded after NO_SUCCESS_LIMIT.
async fn watch(
    shared: &Shared,
    progress: &Progress,
    began: Instant,
    window: Window,
    endpoints: &[String],
) -> Result<(), BenchError> {
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::with_capacity(RATE_SAMPLES_MAX + 1);
    samples.push_back((began, 0));
    loop {
        let now = Instant::now();
        if now >= window.end {
            return Ok(());
        }
        tokio::time::sleep_until((now + TICK).min(window.end)).await;
        let now = Instant::now();
        let ok = shared.ok_total.load(Ordering::Relaxed);
        if ok == 0 && now.duration_since(began) >= NO_SUCCESS_LIMIT {
            return Err(no_success(shared, now.duration_since(began), endpoints));
        }
        samples.push_back((now, ok));
        if samples.len() > RATE_SAMPLES_MAX {
            samples.pop_front();
        }
        let (t0, ok0) = samples[0];
        let span_s = now.duration_since(t0).as_secs_f64();
        let rate = if span_s > 0.0 {
            (ok - ok0) as f64 / span_s
        } else {
            0.0
        };
        let phase = if now < window.start {
            "warmup "
        } else {
            "measure"
        };
        progress
            .bar
            .set_position(now.duration_since(began).as_millis() as u64);
        progress.bar.set_message(format!(
            "{phase} {rate:>10.0} writes/s  {} errors",
            shared.error_total.load(Ordering::Relaxed)
        ));
    }
}

fn no_success(shared: &Shared, waited: Duration, endpoints: &[String]) -> BenchError {
    BenchError::NoSuccess {
        waited,
        endpoints: endpoints.join(","),
        errors: shared.error_total.load(Ordering::Relaxed),
        first_error: shared
            .first_error
            .get()
            .cloned()
            .unwrap_or_else(|| "none (requests still pending)".to_string()),
    }
}

/// The measurement window: Puts that complete in `[start, end)` count.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        self.start <= t && t < self.end
    }
}

/// State every task sees. Touched on the hot path only through relaxed
/// atomic adds; `first_error` is written once.
#[derive(Default)]
struct Shared {
    /// Successful Puts since the start, warmup included.
    ok_total: AtomicU64,
    /// Failed Puts since the start, warmup included.
    error_total: AtomicU64,
    /// The first failure, for the no-success error.
    first_error: OnceLock<String>,
    /// Set when the run is abandoned.
    stop: AtomicBool,
}

/// What one task brings back.
struct TaskResult {
    writes: u64,
    errors: BTreeMap<&'static str, u64>,
    histogram: Histogram<u32>,
}

struct Worker {
    client: KvClient<super::Conn>,
    rng: XorShift,
    key_space: u64,
    value: Bytes,
    window: Window,
    shared: Arc<Shared>,
}

impl Worker {
    async fn run(mut self) -> TaskResult {
        // u32 counters: one task completes far fewer than 2^32 requests in
        // DURATION_S_MAX, and this halves the memory of TASKS_MAX histograms.
        let mut histogram = new_histogram::<u32>();
        let mut writes = 0u64;
        let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
        loop {
            let sent = Instant::now();
            if sent >= self.window.end || self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let key = format!("key-{:016}", self.rng.next_u64() % self.key_space);
            let mut request = tonic::Request::new(PutRequest {
                key: Bytes::from(key),
                value: self.value.clone(),
                ..PutRequest::default()
            });
            request.set_timeout(REQUEST_TIMEOUT);
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.client.put(request)).await;
            let done = Instant::now();
            let failure = match outcome {
                Ok(Ok(_)) => {
                    self.shared.ok_total.fetch_add(1, Ordering::Relaxed);
                    if self.window.contains(done) {
                        let latency_us = done.duration_since(sent).as_micros() as u64;
                        histogram.saturating_record(latency_us.max(LATENCY_US_MIN));
                        writes += 1;
                    }
                    continue;
                }
                Ok(Err(status)) => (
                    code_name(status.code()),
                    format!("{:?}: {}", status.code(), status.message()),
                ),
                Err(_) => (
                    "DeadlineExceeded",
                    format!(
                        "DeadlineExceeded: no reply within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                ),
            };
            self.shared.error_total.fetch_add(1, Ordering::Relaxed);
            if self.shared.first_error.get().is_none() {
                let _ = self.shared.first_error.set(failure.1);
            }
            if self.window.contains(done) {
                *errors.entry(failure.0).or_insert(0) += 1;
            }
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
        TaskResult {
            writes,
            errors,
            histogram,
        }
    }
}

/// gRPC code names as etcd and grpc-go spell them (bounded key set).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

pub(super) fn new_histogram<T: hdrhistogram::Counter>() -> Histogram<T> {
    Histogram::new_with_bounds(LATENCY_US_MIN, LATENCY_US_MAX, LATENCY_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// One value shared by every Put (a `Bytes` clone is a refcount bump):
/// pseudo-random bytes, so that nothing on the way can compress it away.
fn make_value(size: usize, seed: u64) -> Bytes {
    let mut rng = XorShift::new(seed ^ 0x0076_616c_7565);
    let mut value = Vec::with_capacity(size);
    while value.len() < size {
        let word = rng.next_u64().to_le_bytes();
        let take = (size - value.len()).min(word.len());
        value.extend_from_slice(&word[..take]);
    }
    Bytes::from(value)
}

struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(no_progress: bool, total: Duration) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total.as_millis() as u64),
            if no_progress || !std::io::stderr().is_terminal() {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        if let Ok(style) = ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {msg}") {
            bar.set_style(style);
        }
        Self { bar }
    }
}

/// xorshift64* (Vigna): tiny, fast, good enough to spread keys.
#[derive(Clone, Debug)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// Seeds through splitmix64 so that nearby seeds give unrelated streams
    /// and seed 0 is fine.
    pub(crate) fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        debug_assert_ne!(x, 0, "xorshift state never reaches 0");
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_deterministic_and_spreads_keys() {
        let mut a = XorShift::new(0);
        let mut b = XorShift::new(0);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            let x = a.next_u64();
            assert_eq!(x, b.next_u64());
            seen[(x % 16) as usize] += 1;
        }
        // Each of 16 buckets expects 1000; allow a wide margin.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_ne!(XorShift::new(1).next_u64(), XorShift::new(2).next_u64());
    }

    #[test]
    fn value_has_the_requested_size() {
        for size in [0, 1, 7, 8, 9, 128, 1000] {
            assert_eq!(make_value(size, 1).len(), size);
        }
    }

    #[test]
    fn histogram_holds_the_timeout() {
        let mut h = new_histogram::<u32>();
        h.record(REQUEST_TIMEOUT.as_micros() as u64)
            .expect("in range");
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 2);
    }
}
