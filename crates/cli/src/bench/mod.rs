//! The client side of `skiff bench` and `skiff status`.
//!
//! `skiff bench` is a closed-loop load generator over the etcd v3 KV API, so
//! the same command measures Skiff and etcd:
//!
//! 1. [`run_load`] opens `--clients` gRPC connections, round-robin over the
//!    endpoints, and runs `--concurrency` tasks per connection. Each task sends
//!    one `KV.Put` at a time (a random key out of `--key-space`, a
//!    `--value-size` value) and sends the next as soon as the reply lands.
//! 2. The first `--warmup` seconds are not measured; then every Put that
//!    *completes* inside the next `--duration` seconds counts, and its latency
//!    goes into the task's own HDR histogram (no lock on the hot path). The
//!    histograms are merged once at the end.
//! 3. Failed requests are counted by gRPC code, not fatal; a run in which
//!    nothing succeeds within [`NO_SUCCESS_LIMIT`] fails.
//! 4. [`LoadReport`] prints a table, the one-line `RESULT ...` summary that
//!    scripts grep, a JSON file and an SVG latency plot.
//!
//! `skiff status` ([`status`]) asks each endpoint for `Maintenance.Status` and
//! prints one row per member; an unreachable member is a row, not an error.

mod ceiling;
mod check;
mod leases;
mod load;
mod report;
mod status;
mod svg;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_kv::pb::etcdserverpb::auth_client::AuthClient;
use skiff_kv::pb::etcdserverpb::AuthenticateRequest;
use skiff_kv::tls::ClientTls;
use tonic::transport::Channel;

pub use ceiling::CeilingServer;
pub use check::{check_consistency, CheckArgs, Consistency, MemberHash};
pub use leases::{run_leases, LeaseReport, KEEPALIVE_STREAMS};
pub use load::run_load;
pub use report::{JsonReport, LoadReport, PercentilePoint};
pub use status::{
    format_status_table, print_status_table, status, MemberState, MemberStatus, StatusArgs,
};
pub use watch::{run_fanout, FanoutReport, WATCHERS_PER_STREAM};

/// Every Put (and every Status call) gives up after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Opening one connection (TCP + HTTP/2 handshake) gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A run in which no Put has succeeded after this long fails.
pub const NO_SUCCESS_LIMIT: Duration = Duration::from_secs(10);

/// Bound on `--clients` (connections).
pub const CLIENTS_MAX: usize = 1024;
/// Bound on `--concurrency` (requests in flight per connection).
pub const CONCURRENCY_MAX: usize = 1024;
/// Bound on `--clients` × `--concurrency`: one task and one histogram
/// (about 60 KiB) each.
pub const TASKS_MAX: usize = 4096;
/// Bound on `--value-size`: etcd refuses requests over 1.5 MiB by default.
pub const VALUE_SIZE_MAX: usize = 1024 * 1024;
/// Bound on `--duration` and `--warmup`, in seconds (keeps per-task u32
/// histogram counters far from overflow).
pub const DURATION_S_MAX: f64 = 3600.0;

/// `--quick`: measured seconds.
pub const QUICK_DURATION_S: f64 = 5.0;
/// `--quick`: warmup seconds.
pub const QUICK_WARMUP_S: f64 = 1.0;

/// Flags of `skiff bench`.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchArgs {
    /// Client endpoints, comma separated (host:port or http://host:port).
    /// Empty: start an embedded cluster and load it.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// gRPC connections, round-robin over the endpoints.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests in flight per connection (closed loop).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Number of distinct keys written.
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts (not measured).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Short run: 5 s measured after 1 s warmup (overrides --duration and
    /// --warmup).
    #[arg(long)]
    pub quick: bool,
    /// Seed of the key generator (same seed ⇒ same key sequence per task).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the latency distribution as SVG to this file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No live progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Load an in-process server that answers every Put at once and keeps
    /// nothing, instead of a cluster: the most this client and gRPC stack
    /// reach on this machine, the baseline to read cluster runs against.
    #[arg(long, conflicts_with = "endpoints")]
    pub ceiling: bool,
    /// Embedded cluster only: take a snapshot after this many applied
    /// entries (the members' `snapshot_entries`; default: the node's).
    /// Low values measure the cost of snapshots under load.
    #[arg(long, conflicts_with = "endpoints")]
    #[serde(default)]
    pub snapshot_entries: Option<u64>,
    /// Run the load three times: without watchers, with this many open
    /// (watcher i on key i mod --key-space, 1,000 per stream), without them
    /// again; prints each, the p99 with them over the mean p99 without, and
    /// events/s delivered. 0: one run, no watchers.
    #[arg(long, default_value_t = 0, conflicts_with = "ceiling")]
    #[serde(default)]
    pub watchers: usize,
    /// With --watchers: open every watch stream on the first endpoint
    /// (one member serves them all) instead of round-robin.
    #[arg(long, requires = "watchers")]
    #[serde(default)]
    pub watchers_on_one_member: bool,
    /// Instead of writes: grant this many leases, then keep them all alive
    /// for the measured time (16 keepalive streams); prints keepalives/s
    /// and the CPU time per keepalive. 0: the write load.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["ceiling", "watchers"])]
    #[serde(default)]
    pub leases: usize,
    #[command(flatten)]
    #[serde(default)]
    pub tls: ClientArgs,
}

/// How to reach the client ports: TLS and credentials (etcdctl's flag
/// names). With none, plaintext and anonymous.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientArgs {
    /// CA certificates (PEM) the servers' certificates chain to: connect with TLS
    /// (endpoints given as host:port then mean https://).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present, with --key (for --client-cert-auth servers).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// User for authentication, `name` or `name:password` (etcdctl's --user): one token
    /// is obtained and sent with every request.
    #[arg(long)]
    pub user: Option<String>,
    /// Password of --user (instead of `name:password`).
    #[arg(long, requires = "user")]
    pub password: Option<String>,
}

/// A token sent with every request (gRPC metadata `token`), when logged in.
#[derive(Debug, Clone, Default)]
pub struct AddToken(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("token", token.clone());
        }
        Ok(req)
    }
}

/// A connection to a member that sends the token of its [`Access`].
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, AddToken>;

/// What a command connects with: TLS (or not) and a token (or none).
#[derive(Debug, Clone)]
pub struct Access {
    pub tls: ClientTls,
    pub token: AddToken,
}

impl Access {
    /// Plaintext or TLS, anonymous.
    pub fn anonymous(tls: ClientTls) -> Access {
        Access {
            tls,
            token: AddToken::default(),
        }
    }
}

impl ClientArgs {
    /// The client these flags describe (reads the files).
    pub fn client(&self) -> Result<ClientTls, BenchError> {
        ClientTls::from_files(
            self.cacert.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .map_err(|e| BenchError::Tls(e.to_string()))
    }

    /// Whether any TLS flag was given.
    pub fn given(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// TLS per the flags and, with --user, a token from Authenticate on the
    /// first of `endpoints` that answers.
    pub async fn access(&self, endpoints: &[String]) -> Result<Access, BenchError> {
        let mut access = Access::anonymous(self.client()?);
        let Some(user) = &self.user else {
            return Ok(access);
        };
        let (name, password) = match (user.split_once(':'), &self.password) {
            (Some((name, password)), None) => (name.to_string(), password.to_string()),
            (None, Some(password)) => (user.clone(), password.clone()),
            _ => {
                return Err(BenchError::Auth(
                    "--user needs a password: --user name:password or --password".into(),
                ))
            }
        };
        let mut last = String::from("no endpoint given");
        for e in normalize_all(endpoints, &access.tls)? {
            let channel = match connect_channel(&e, &access.tls, LOGIN_TIMEOUT).await {
                Ok(c) => c,
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            let request = AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            };
            match AuthClient::new(channel).authenticate(request).await {
                Ok(r) => {
                    let token = r.into_inner().token;
                    let value = token
                        .parse()
                        .map_err(|_| BenchError::Auth("the token is not ASCII".into()))?;
                    access.token = AddToken(Some(value));
                    return Ok(access);
                }
                // A refusal is the cluster's answer: another member would
                // say the same.
                Err(s) if s.code() != tonic::Code::Unavailable => {
                    return Err(BenchError::Auth(format!("{e}: {}", s.message())))
                }
                Err(s) => last = format!("{e}: {}", s.message()),
            }
        }
        Err(BenchError::Auth(format!(
            "could not authenticate {name}: {last}"
        )))
    }
}

/// Bound on connecting and authenticating for the token.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Normalizes `endpoints` for a client that uses TLS or not.
pub(crate) fn normalize_all(
    endpoints: &[String],
    tls: &ClientTls,
) -> Result<Vec<String>, BenchError> {
    endpoints
        .iter()
        .map(|e| normalize_endpoint(e, tls.is_tls()))
        .collect()
}

/// Opens a connection to `endpoint` (normalized) within `timeout` that
/// sends `access`'s token.
pub(crate) async fn connect(
    endpoint: &str,
    access: &Access,
    timeout: Duration,
) -> Result<Conn, BenchError> {
    let channel = connect_channel(endpoint, &access.tls, timeout).await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        access.token.clone(),
    ))
}

async fn connect_channel(
    endpoint: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<Channel, BenchError> {
    let connect_error = |reason: String| BenchError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    let builder = tls
        .endpoint(endpoint)
        .map_err(|e| connect_error(e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    match tokio::time::timeout(timeout, builder.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(connect_error(error_chain(&e))),
        Err(_) => Err(connect_error(format!(
            "timed out after {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            clients: 8,
            concurrency: 16,
            value_size: 128,
            key_space: 100_000,
            duration: 10.0,
            warmup: 1.0,
            quick: false,
            seed: 0x5eed,
            json: None,
            plot: None,
            no_progress: false,
            ceiling: false,
            snapshot_entries: None,
            watchers: 0,
            watchers_on_one_member: false,
            leases: 0,
            tls: ClientArgs::default(),
        }
    }
}

impl BenchArgs {
    /// Measured time, after `--quick` is applied.
    pub fn measured(&self) -> Duration {
        Duration::from_secs_f64(if self.quick {
            QUICK_DURATION_S
        } else {
            self.duration
        })
    }

    /// Warmup time, after `--quick` is applied.
    pub fn warmup_time(&self) -> Duration {
        Duration::from_secs_f64(if self.quick {
            QUICK_WARMUP_S
        } else {
            self.warmup
        })
    }

    /// Checks every flag; the error names the flag. Does not require
    /// `--endpoints` (empty means an embedded cluster), but checks the syntax
    /// of those given.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |flag: &'static str, reason: String| Err(BenchError::InvalidArg { flag, reason });
        if self.clients == 0 || self.clients > CLIENTS_MAX {
            return bad(
                "clients",
                format!("must be in 1..={CLIENTS_MAX} (got {})", self.clients),
            );
        }
        if self.concurrency == 0 || self.concurrency > CONCURRENCY_MAX {
            return bad(
                "concurrency",
                format!(
                    "must be in 1..={CONCURRENCY_MAX} (got {})",
                    self.concurrency
                ),
            );
        }
        let tasks = self.clients * self.concurrency;
        if tasks > TASKS_MAX {
            return bad(
                "concurrency",
                format!(
                    "--clients × --concurrency must be at most {TASKS_MAX} (got {} × {} = {tasks})",
                    self.clients, self.concurrency
                ),
            );
        }
        if self.value_size > VALUE_SIZE_MAX {
            return bad(
                "value-size",
                format!(
                    "must be at most {VALUE_SIZE_MAX} bytes (got {})",
                    self.value_size
                ),
            );
        }
        if self.key_space == 0 {
            return bad("key-space", "must be at least 1 (got 0)".to_string());
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= DURATION_S_MAX) {
            return bad(
                "duration",
                format!(
                    "must be > 0 and <= {DURATION_S_MAX} seconds (got {})",
                    self.duration
                ),
            );
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0 && self.warmup <= DURATION_S_MAX) {
            return bad(
                "warmup",
                format!(
                    "must be >= 0 and <= {DURATION_S_MAX} seconds (got {})",
                    self.warmup
                ),
            );
        }
        if self.tls.given() && self.endpoints.is_empty() {
            return bad(
                "cacert",
                "TLS options need --endpoints (the embedded cluster serves plaintext)".into(),
            );
        }
        for endpoint in &self.endpoints {
            normalize_endpoint(endpoint, self.tls.cacert.is_some())?;
        }
        Ok(())
    }
}

/// What can go wrong in `skiff bench` and `skiff status`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has a value out of range.
    #[error("invalid --{flag}: {reason}")]
    InvalidArg {
        /// The flag, without the leading dashes.
        flag: &'static str,
        /// What is wrong and what was given.
        reason: String,
    },
    /// No endpoint to send to.
    #[error("no endpoints: pass --endpoints host:port[,host:port...]")]
    NoEndpoints,
    /// An endpoint that cannot be parsed.
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS options cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// --user could not log in.
    #[error("authentication: {0}")]
    Auth(String),
    /// Could not open a connection to an endpoint.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The normalized endpoint (http(s)://host:port).
        endpoint: String,
        /// The error chain, or the timeout.
        reason: String,
    },
    /// No Put succeeded in the first seconds of the run.
    #[error(
        "no Put succeeded in the first {:.1} s against {endpoints}: {errors} errors, first: {first_error}",
        waited.as_secs_f64()
    )]
    NoSuccess {
        /// How long the run waited.
        waited: Duration,
        /// The endpoints, comma separated.
        endpoints: String,
        /// Requests that failed so far.
        errors: u64,
        /// The first failure seen (code and message), or "none".
        first_error: String,
    },
    /// Writing an output file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("write", "read").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON report could not be encoded or decoded.
    #[error("bad JSON report {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A load task panicked or was cancelled (a bug).
    #[error("load task failed: {0}")]
    Task(String),
}

/// Turns `host:port`, `http://host:port[/]` or `https://host:port[/]` into
/// `scheme://host:port`: a bare `host:port` takes `https` when `tls`.
/// Refused: `https://` without TLS (no CA to verify with: --cacert) and
/// `http://` with it.
pub fn normalize_endpoint(endpoint: &str, tls: bool) -> Result<String, BenchError> {
    let bad = |reason: &str| BenchError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = endpoint.trim();
    if trimmed.is_empty() {
        return Err(bad("empty (check for a stray comma)"));
    }
    let (scheme, authority) = if let Some(rest) = trimmed.strip_prefix("https://") {
        if !tls {
            return Err(bad(
                "https:// needs --cacert (the CA the server's certificate chains to)",
            ));
        }
        ("https", rest)
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        if tls {
            return Err(bad("TLS options were given: use https:// or host:port"));
        }
        ("http", rest)
    } else if tls {
        ("https", trimmed)
    } else {
        ("http", trimmed)
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains("://") || authority.contains('/') {
        return Err(bad("expected host:port or http(s)://host:port"));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(bad("missing :port"));
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("port must be a number in 1..=65535")),
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Runs the load, prints the table and the `RESULT` line to stdout, and
/// writes `--json` / `--plot` if given: everything `skiff bench` does once it
/// knows its endpoints.
pub async fn run_and_report(
    args: &BenchArgs,
    endpoints: &[String],
) -> Result<LoadReport, BenchError> {
    if args.leases > 0 {
        let r = run_leases(args, endpoints).await?;
        println!(
            "skiff bench: {} leases granted in {:.1} s; kept alive for {:.1} s over {KEEPALIVE_STREAMS} streams",
            r.leases,
            r.grant_s,
            args.measured().as_secs_f64()
        );
        println!(
            "  {:.0} keepalives/s, {} µs of process CPU per keepalive, {} answered not found",
            r.keepalives_per_s,
            r.cpu_us_per_keepalive
                .map_or("n/a".to_string(), |c| format!("{c:.1}")),
            r.lost
        );
        let per: Vec<String> = endpoints
            .iter()
            .zip(&r.by_endpoint)
            .map(|(e, k)| format!("{e}: {k:.0}/s"))
            .collect();
        println!("  by endpoint: {}", per.join(", "));
        println!("{}", r.result_line());
        return Ok(LoadReport::new(
            args.clone(),
            endpoints.to_vec(),
            0,
            Default::default(),
            args.measured(),
            hdrhistogram::Histogram::new(3).expect("histogram"),
        ));
    }
    if args.watchers > 0 {
        let fanout = run_fanout(args, endpoints).await?;
        println!("without watchers:");
        fanout.without.print_human();
        println!("with {} watchers:", args.watchers);
        fanout.with.print_human();
        println!("without watchers again:");
        fanout.after.print_human();
        println!(
            "  events delivered to watchers: {:.0}/s",
            fanout.events_per_s
        );
        println!("{}", fanout.result_line(args.watchers));
        return Ok(fanout.with);
    }
    let report = run_load(args, endpoints).await?;
    report.print_human();
    println!("{}", report.result_line());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "skiff bench: {} clients × {} in flight, {} B values",
            args.clients, args.concurrency, args.value_size
        );
        report.write_svg(path, &title)?;
    }
    Ok(report)
}

/// The full chain of an error's causes, joined by ": " (tonic's transport
/// error alone says only "transport error").
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    // Bound: causes chains are short; stop at 8 to be safe against cycles.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut argv = vec!["skiff"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parse").bench
    }

    fn invalid_flag(args: &BenchArgs) -> &'static str {
        match args.validate() {
            Err(BenchError::InvalidArg { flag, .. }) => flag,
            other => panic!("expected InvalidArg, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let args = parse(&[]);
        assert_eq!(args, BenchArgs::default());
        args.validate().expect("defaults are valid");
        assert_eq!(args.measured(), Duration::from_secs(10));
        assert_eq!(args.warmup_time(), Duration::from_secs(1));
    }

    #[test]
    fn ceiling_is_a_flag_that_excludes_endpoints() {
        assert!(parse(&["--ceiling"]).ceiling);
        assert!(!parse(&[]).ceiling);
        let err = Cli::try_parse_from(["skiff", "--ceiling", "--endpoints", "127.0.0.1:2379"])
            .expect_err("--ceiling with --endpoints");
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn flags_parse() {
        let args = parse(&[
            "--endpoints",
            "127.0.0.1:2379,http://127.0.0.1:2380",
            "--clients",
            "2",
            "--concurrency",
            "4",
            "--value-size",
            "256",
            "--key-space",
            "10",
            "--duration",
            "2.5",
            "--warmup",
            "0",
            "--json",
            "out.json",
            "--plot",
            "out.svg",
            "--no-progress",
        ]);
        assert_eq!(
            args.endpoints,
            vec![
                "127.0.0.1:2379".to_string(),
                "http://127.0.0.1:2380".to_string()
            ]
        );
        assert_eq!((args.clients, args.concurrency), (2, 4));
        assert_eq!((args.value_size, args.key_space), (256, 10));
        assert_eq!(args.measured(), Duration::from_millis(2500));
        assert_eq!(args.warmup_time(), Duration::ZERO);
        assert_eq!(args.json, Some(PathBuf::from("out.json")));
        assert_eq!(args.plot, Some(PathBuf::from("out.svg")));
        assert!(args.no_progress);
        args.validate().expect("valid");
    }

    #[test]
    fn quick_overrides_duration_and_warmup() {
        let args = parse(&["--quick", "--duration", "60", "--warmup", "9"]);
        assert_eq!(args.measured(), Duration::from_secs(5));
        assert_eq!(args.warmup_time(), Duration::from_secs(1));
        // Well under the 30 s budget, leaving room for connecting and the
        // last requests to drain (REQUEST_TIMEOUT at worst).
        assert!(args.measured() + args.warmup_time() + REQUEST_TIMEOUT < Duration::from_secs(30));
    }

    #[test]
    fn validation_names_the_flag() {
        let ok = BenchArgs::default();
        let cases: Vec<(BenchArgs, &str)> = vec![
            (
                BenchArgs {
                    clients: 0,
                    ..ok.clone()
                },
                "clients",
            ),
            (
                BenchArgs {
                    clients: CLIENTS_MAX + 1,
                    ..ok.clone()
                },
                "clients",
            ),
            (
                BenchArgs {
                    concurrency: 0,
                    ..ok.clone()
                },
                "concurrency",
            ),
            (
                BenchArgs {
                    clients: 1024,
                    concurrency: 1024,
                    ..ok.clone()
                },
                "concurrency",
            ),
            (
                BenchArgs {
                    value_size: VALUE_SIZE_MAX + 1,
                    ..ok.clone()
                },
                "value-size",
            ),
            (
                BenchArgs {
                    key_space: 0,
                    ..ok.clone()
                },
                "key-space",
            ),
            (
                BenchArgs {
                    duration: 0.0,
                    ..ok.clone()
                },
                "duration",
            ),
            (
                BenchArgs {
                    duration: f64::NAN,
                    ..ok.clone()
                },
                "duration",
            ),
            (
                BenchArgs {
                    duration: 1e9,
                    ..ok.clone()
                },
                "duration",
            ),
            (
                BenchArgs {
                    warmup: -1.0,
                    ..ok.clone()
                },
                "warmup",
            ),
        ];
        for (args, flag) in cases {
            assert_eq!(invalid_flag(&args), flag, "{args:?}");
            let message = args.validate().unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("invalid --{flag}:")),
                "{message}"
            );
        }
        let message = BenchArgs { clients: 0, ..ok }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("got 0"), "{message}");
    }

    #[test]
    fn endpoints_are_normalized_or_rejected_by_name() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_endpoint("http://localhost:2379/", false).unwrap(),
            "http://localhost:2379"
        );
        assert_eq!(
            normalize_endpoint("[::1]:2379", false).unwrap(),
            "http://[::1]:2379"
        );
        assert_eq!(
            normalize_endpoint("127.0.0.1:2379", true).unwrap(),
            "https://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_endpoint("https://localhost:2379/", true).unwrap(),
            "https://localhost:2379"
        );
        for (bad, tls) in [("https://h:1", false), ("http://h:1", true)] {
            match normalize_endpoint(bad, tls) {
                Err(BenchError::BadEndpoint { endpoint, .. }) => assert_eq!(endpoint, bad),
                other => panic!("{bad:?}: expected BadEndpoint, got {other:?}"),
            }
        }
        for bad in ["", "localhost", ":2379", "host:0", "host:x", "h:1/path"] {
            match normalize_endpoint(bad, false) {
                Err(BenchError::BadEndpoint { endpoint, .. }) => assert_eq!(endpoint, bad),
                other => panic!("{bad:?}: expected BadEndpoint, got {other:?}"),
            }
        }
        let args = BenchArgs {
            endpoints: vec!["nope".to_string()],
            ..BenchArgs::default()
        };
        assert!(args
            .validate()
            .unwrap_err()
            .to_string()
            .contains("\"nope\""));
    }
}
