//! skiff-tests: end-to-end tests that use Skiff's public APIs the way a user
//! would — real files, real fsync, real processes. Shared helpers live here;
//! the tests are in `tests/`.
//!
//! # The cluster harness
//!
//! [`Cluster`] runs `skiff serve` child processes on loopback, each with its
//! own data directory under one temporary directory, its stdout and stderr
//! appended to `node-<id>.log` there. Nodes can be killed (`SIGKILL`),
//! terminated (`SIGTERM`, then a bounded wait for a clean exit) and restarted
//! from their data directory. Every wait is bounded; a test that fails prints
//! the tail of every node's log and keeps the directory (its path is
//! printed). Dropping a cluster kills its children.
//!
//! With [`ClusterOptions::lying_disks`] each member's data directory is on a
//! [`lying_disk::LyingDisk`] of its own (an in-memory FUSE file system that
//! keeps only what was fsynced through a power loss): the fault campaigns
//! ([`nemesis`]) cut members' power and fail their WAL fsyncs with it. A
//! failing test copies each disk's contents next to its mount point
//! (`disk-<id>.copy`) before unmounting it.
//!
//! Clients are [`client::Client`]s: a small etcd v3 client over skiff-kv's
//! generated gRPC stubs (no system `protoc` needed to build the tests).
//!
//! # Which `skiff` binary
//!
//! `CARGO_BIN_EXE_skiff` exists only inside the skiff package (crates/cli), so
//! [`skiff_bin`] finds the binary itself: `$SKIFF_BIN` when set; otherwise it
//! runs `cargo build --bin skiff` once per test process, into the target
//! directory the test binary itself lives in (`<target>/<dir>/deps/<test>`),
//! with the profile that directory belongs to (`debug` → `test`, the profile
//! `cargo test` builds with; `release` → `release`; any other directory name
//! is taken as a profile name). Cargo makes that a no-op when the binary is
//! fresh, and it never runs a stale one. This crate depends on skiff
//! (and on skiff-raft and skiff-wal with `testing`, as `cargo test
//! --workspace` unifies them) so that the binary's dependencies are already
//! built, with the same features, by the time the tests run.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use skiff_kv::tls::ClientTls;

pub mod background;
pub mod client;
pub mod lying_disk;
pub mod nemesis;
pub mod tls;

pub use client::{Client, ConnectOptions};
pub use skiff_kv::pb::etcdserverpb::{HashKvResponse, StatusResponse};

/// A member's id (the `--id` flag).
pub type NodeId = u64;

/// Longest a node may take from spawn to accepting client connections.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a node may take to exit after SIGTERM.
pub const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Per-request timeout of the clients this harness hands out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout of those clients.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Between two polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of each node's log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 120;
/// WAL segment size the nodes run with by default: small, so that
/// preallocating segments costs little.
pub const WAL_SEGMENT_BYTES: u64 = 4 << 20;
/// Cluster starts attempted when a node cannot bind its ports (another
/// process took a port between the probe and the node's bind).
const START_ATTEMPTS_MAX: usize = 3;

/// Path of the `skiff` binary under test (see the crate docs).
pub fn skiff_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SKIFF_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_skiff(),
    })
}

fn build_skiff() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/<dir>/deps/<test binary>
    let mut dir = exe.parent().expect("the test binary has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let dir_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("the profile directory has a name");
    let profile = match dir_name {
        "debug" => "test",
        "release" => "release",
        other => other,
    };
    let target_dir = dir.parent().expect("the profile directory has a parent");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let output = Command::new(&cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--bin", "skiff", "--profile", profile])
        .args(["-p", "skiff", "-p", "skiff-tests"])
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build skiff: {e}"));
    assert!(
        output.status.success(),
        "`cargo build --bin skiff --profile {profile}` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let bin = dir.join("skiff");
    assert!(
        bin.is_file(),
        "cargo built skiff but {} is missing",
        bin.display()
    );
    eprintln!(
        "skiff-tests: using {} (cargo build took {:.1} s)",
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    bin
}

/// A loopback address whose port was free a moment ago, from below the
/// kernel's ephemeral range (see [`skiff_node::embedded::free_loopback_addr`]).
pub fn free_addr() -> SocketAddr {
    skiff_node::embedded::free_loopback_addr().expect("a free loopback port")
}

/// A free port on loopback address `ip` (any of 127.0.0.0/8), from the
/// kernel's ephemeral range.
pub fn free_addr_on(ip: std::net::Ipv4Addr) -> SocketAddr {
    assert!(ip.is_loopback(), "{ip} is not a loopback address");
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns `Some`, or panics
/// with `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:.1} s waiting for {what}",
            timeout.as_secs_f64()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs `cmd` to completion with its output captured; panics if it runs
/// longer than `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran longer than {:.1} s", timeout.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Removes ANSI colour sequences (in case a node's log has them).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// `GET /metrics` on `addr`; the body of a 200 answer.
pub fn fetch_metrics(addr: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_secs(5);
    let mut conn = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("metrics answered {head:?}: {body}"));
    }
    Ok(body.to_string())
}

/// The labelled sample `name{labels}` in Prometheus text, `labels` as
/// written there (`quantile="1"`).
pub fn metric_labelled(text: &str, name: &str, labels: &str) -> Option<f64> {
    metric(text, &format!("{name}{{{labels}}}"))
}

/// The harness's client timeouts.
pub const CLIENT_OPTIONS: ConnectOptions = ConnectOptions {
    request_timeout: REQUEST_TIMEOUT,
    connect_timeout: CONNECT_TIMEOUT,
};

/// Connects an etcd client to `endpoints` with the harness's timeouts;
/// panics if no endpoint accepts a connection.
pub async fn connect(endpoints: &[String]) -> Client {
    Client::connect(endpoints, CLIENT_OPTIONS)
        .await
        .unwrap_or_else(|e| panic!("cannot create a client for {endpoints:?}: {e}"))
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Members (ids 1..=nodes).
    pub nodes: usize,
    /// `--wal-segment-size` of every node.
    pub wal_segment_bytes: u64,
    /// Extra `skiff serve` flags for every node.
    pub args: Vec<String>,
    /// Give member `id` the peer address `127.a.b.id` (this pair `(a,
    /// b)`) instead of 127.0.0.1: its peer connections then leave from its
    /// own IP, so packet-filter rules can single out the traffic between
    /// two members (see [`nemesis::Firewall`]). Client and metrics
    /// addresses stay on 127.0.0.1.
    pub peer_ip_prefix: Option<(u8, u8)>,
    /// Write every member's peer address in the `--initial-cluster` lists
    /// with this host name instead of its IP (the name must resolve to
    /// that IP: `localhost` for 127.0.0.1).
    pub peer_host_name: Option<String>,
    /// Extra `skiff serve` flags of one member, after `args`.
    pub member_args: BTreeMap<NodeId, Vec<String>>,
    /// How the harness's own clients (status, waits, [`Cluster::client`])
    /// reach the members: TLS when they serve it (`--cert-file` among
    /// `args`), and then endpoints are `https://`.
    pub client_tls: ClientTls,
    /// Put each member's data directory on a [`lying_disk::LyingDisk`] of
    /// its own (see [`Cluster::disk`]). Probe with
    /// [`lying_disk::available`] first: the start panics where FUSE cannot
    /// be mounted.
    pub lying_disks: bool,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            nodes: 3,
            wal_segment_bytes: WAL_SEGMENT_BYTES,
            args: Vec::new(),
            peer_ip_prefix: None,
            peer_host_name: None,
            member_args: BTreeMap::new(),
            client_tls: ClientTls::plaintext(),
            lying_disks: false,
        }
    }
}

impl ClusterOptions {
    /// Adds `--flag value` to every node's command line.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> ClusterOptions {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }
}

/// One member: its addresses, its directory and, while it runs, its
/// process.
struct Member {
    client: SocketAddr,
    peer: SocketAddr,
    metrics: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Processes started for this member so far.
    starts: u32,
    /// Flags of this member alone, after the cluster's (a member added
    /// with MemberAdd: how it joins).
    extra_args: Vec<String>,
    /// Left out of every member's `--initial-cluster` lists (a member
    /// removed from the cluster) but its own; see [`Cluster::retire`].
    retired: bool,
}

/// Addresses for a member that is not registered yet: allocate them with
/// [`Cluster::new_member_addrs`], give [`MemberAddrs::peer_url`] to
/// MemberAdd, then start the member with [`Cluster::add_member_process`].
#[derive(Debug, Clone, Copy)]
pub struct MemberAddrs {
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub metrics: SocketAddr,
}

impl MemberAddrs {
    /// `http://host:port` of the peer address (MemberAdd's peer URL).
    pub fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    /// `http://host:port` of the client address.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }
}

/// A cluster of `skiff serve` processes (see the crate docs).
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    options: ClusterOptions,
    members: BTreeMap<NodeId, Member>,
    /// Each member's lying disk, where [`ClusterOptions::lying_disks`].
    disks: BTreeMap<NodeId, lying_disk::LyingDisk>,
}

impl Cluster {
    /// Starts every member and waits until each accepts client connections
    /// (not for a leader: see [`Cluster::wait_leader`]).
    pub fn start(options: ClusterOptions) -> Cluster {
        let mut attempt = 1;
        loop {
            match Cluster::try_start(options.clone()).map_err(|failed| *failed) {
                Ok(cluster) => return cluster,
                Err((cluster, why)) if attempt < START_ATTEMPTS_MAX && why.contains("listen") => {
                    eprintln!("cluster start attempt {attempt} failed ({why}); new ports");
                    drop(cluster);
                    attempt += 1;
                }
                Err((cluster, why)) => {
                    cluster.print_logs();
                    panic!("cluster did not start: {why}");
                }
            }
        }
    }

    /// The cluster comes back with the error, for its logs.
    fn try_start(options: ClusterOptions) -> Result<Cluster, Box<(Cluster, String)>> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-tests-")
            .tempdir()
            .expect("a temporary directory");
        let mut members = BTreeMap::new();
        let mut disks = BTreeMap::new();
        for id in 1..=options.nodes as NodeId {
            let data_dir = if options.lying_disks {
                let mount = dir.path().join(format!("disk-{id}"));
                std::fs::create_dir(&mount).expect("create a mount point");
                let disk = lying_disk::LyingDisk::mount(&mount)
                    .unwrap_or_else(|e| panic!("member {id}'s lying disk: {e}"));
                disks.insert(id, disk);
                mount.join("data")
            } else {
                dir.path().join(format!("node-{id}"))
            };
            members.insert(
                id,
                Member {
                    client: free_addr(),
                    peer: match options.peer_ip_prefix {
                        Some((a, b)) => free_addr_on(std::net::Ipv4Addr::new(127, a, b, id as u8)),
                        None => free_addr(),
                    },
                    metrics: free_addr(),
                    data_dir,
                    log: dir.path().join(format!("node-{id}.log")),
                    child: None,
                    starts: 0,
                    extra_args: Vec::new(),
                    retired: false,
                },
            );
        }
        let mut cluster = Cluster {
            dir: Some(dir),
            options,
            members,
            disks,
        };
        let ids = cluster.ids();
        for &id in &ids {
            cluster.spawn(id);
        }
        for &id in &ids {
            if let Err(why) = cluster.wait_serving(id) {
                return Err(Box::new((cluster, why)));
            }
        }
        Ok(cluster)
    }

    /// Every member's id.
    pub fn ids(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// Members whose process runs.
    pub fn running(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.child.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    fn member(&self, id: NodeId) -> &Member {
        self.members
            .get(&id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    fn member_mut(&mut self, id: NodeId) -> &mut Member {
        self.members
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    /// `http://host:port` of `id`'s client API (`https://` when the
    /// harness connects with TLS).
    pub fn endpoint(&self, id: NodeId) -> String {
        format!(
            "{}://{}",
            self.options.client_tls.scheme(),
            self.member(id).client
        )
    }

    /// A client of `endpoints` as the harness connects ([`ClusterOptions::client_tls`]).
    async fn try_connect(&self, endpoints: &[String]) -> Result<Client, String> {
        Client::connect_with(endpoints, CLIENT_OPTIONS, self.options.client_tls.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// Every member's endpoint, in id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.ids().into_iter().map(|id| self.endpoint(id)).collect()
    }

    /// `id`'s metrics address.
    pub fn metrics_addr(&self, id: NodeId) -> SocketAddr {
        self.member(id).metrics
    }

    /// `id`'s data directory.
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.member(id).data_dir.clone()
    }

    /// The `skiff serve` arguments of `id`.
    pub fn serve_args(&self, id: NodeId) -> Vec<String> {
        let list = |f: &dyn Fn(&Member) -> String| {
            self.members
                .iter()
                .filter(|(&mid, m)| !m.retired || mid == id)
                .map(|(id, m)| format!("{id}={}", f(m)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let peer = |m: &Member| match &self.options.peer_host_name {
            Some(name) => format!("{name}:{}", m.peer.port()),
            None => m.peer.to_string(),
        };
        let m = self.member(id);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--listen-client".into(),
            m.client.to_string(),
            "--listen-peer".into(),
            m.peer.to_string(),
            "--listen-metrics".into(),
            m.metrics.to_string(),
            "--initial-cluster".into(),
            list(&peer),
            "--initial-cluster-clients".into(),
            list(&|m| m.client.to_string()),
            "--wal-segment-size".into(),
            self.options.wal_segment_bytes.to_string(),
        ];
        args.extend(self.options.args.iter().cloned());
        args.extend(
            self.options
                .member_args
                .get(&id)
                .into_iter()
                .flatten()
                .cloned(),
        );
        args.extend(m.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self, id: NodeId) {
        let args = self.serve_args(id);
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "member {id} already runs");
        m.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open the node's log");
        writeln!(
            log,
            "==== harness: start {} of member {id}: skiff {}",
            m.starts,
            args.join(" ")
        )
        .expect("write the node's log");
        let err = log.try_clone().expect("clone the log handle");
        let child = Command::new(skiff_bin())
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", skiff_bin().display()));
        m.child = Some(child);
    }

    /// Waits until `id` accepts TCP connections on its client address, or
    /// reports why not (it exited, or took too long).
    fn wait_serving(&mut self, id: NodeId) -> Result<(), String> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            let client = self.member(id).client;
            if TcpStream::connect_timeout(&client, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            let m = self.member_mut(id);
            let child = m.child.as_mut().expect("waiting on a running member");
            if let Some(status) = child.try_wait().expect("try_wait") {
                m.child = None;
                let log = self.log(id);
                let last = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!("member {id} exited at start ({status}): {last}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "member {id} did not accept client connections on {client} within {:.0} s",
                    NODE_START_TIMEOUT.as_secs_f64()
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `SIGKILL` to `id` without reaping it (see [`Cluster::kill`],
    /// which reaps): for a process that cannot exit before something else
    /// happens (a lying disk answering its held fsync).
    pub fn sigkill(&self, id: NodeId) {
        if let Some(child) = &self.member(id).child {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own child, not reaped yet (so the
                // pid cannot have been reused).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// `SIGKILL`s `id` and reaps it: no chance to flush or say goodbye.
    pub fn kill(&mut self, id: NodeId) {
        let m = self.member_mut(id);
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        let _ = child.kill();
        child.wait().expect("reap a killed member");
    }

    /// Sends `signal` to `id`'s running process.
    fn signal(&self, id: NodeId, signal: libc::c_int) {
        let child = self
            .member(id)
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, not reaped yet (so the
        // pid cannot have been reused).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) on member {id} failed");
    }

    /// Stops `id` with `SIGSTOP`: it holds its sockets and files but does
    /// nothing until [`Cluster::resume`] (a long GC pause, a frozen VM).
    pub fn pause(&self, id: NodeId) {
        self.signal(id, libc::SIGSTOP);
    }

    /// Lets a paused member go on (`SIGCONT`).
    pub fn resume(&self, id: NodeId) {
        self.signal(id, libc::SIGCONT);
    }

    /// Members whose process exited on its own (not by [`Cluster::kill`]
    /// or [`Cluster::terminate`]) since the last look, with their status;
    /// they count as not running from now on.
    pub fn exited(&mut self) -> Vec<(NodeId, ExitStatus)> {
        let mut gone = Vec::new();
        for (&id, m) in self.members.iter_mut() {
            if let Some(child) = m.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    m.child = None;
                    gone.push((id, status));
                }
            }
        }
        gone
    }

    /// The IP of `id`'s peer address.
    pub fn peer_ip(&self, id: NodeId) -> std::net::IpAddr {
        self.member(id).peer.ip()
    }

    /// `id`'s peer address (Raft messages).
    pub fn peer_addr(&self, id: NodeId) -> SocketAddr {
        self.member(id).peer
    }

    /// The directory holding every member's data directory and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the cluster's directory").path()
    }

    /// Sends `SIGTERM` to `id` and waits (bounded) for it to exit; returns
    /// its exit status.
    pub fn terminate(&mut self, id: NodeId) -> ExitStatus {
        let m = self.member_mut(id);
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which has not been reaped
        // yet (so the pid cannot have been reused).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) on member {id} failed");
        let deadline = Instant::now() + NODE_STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "member {id} did not exit within {:.0} s of SIGTERM",
                    NODE_STOP_TIMEOUT.as_secs_f64()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts `id` again from its data directory, with the same flags, and
    /// waits until it accepts client connections.
    pub fn restart(&mut self, id: NodeId) {
        self.spawn(id);
        if let Err(why) = self.wait_serving(id) {
            panic!("restart of member {id} failed: {why}");
        }
    }

    /// Flags of `id` alone, after the cluster's, from its next start on.
    pub fn set_member_args(&mut self, id: NodeId, args: Vec<String>) {
        self.member_mut(id).extra_args = args;
    }

    /// `id`'s log so far (every start of it), without colour codes.
    pub fn log(&self, id: NodeId) -> String {
        let raw = std::fs::read(&self.member(id).log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// The lines `id` logged since its latest start.
    pub fn log_since_start(&self, id: NodeId) -> String {
        let log = self.log(id);
        match log.rfind("==== harness: start ") {
            Some(at) => log[at..].to_string(),
            None => log,
        }
    }

    /// Prints the tail of every member's log to stderr.
    pub fn print_logs(&self) {
        for &id in self.members.keys() {
            let log = self.log(id);
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "----- member {id}: last {} of {} log lines -----",
                lines.len() - from,
                lines.len()
            );
            for line in &lines[from..] {
                eprintln!("{line}");
            }
        }
    }

    /// A client for `id` alone.
    pub async fn client(&self, id: NodeId) -> Client {
        let endpoints = [self.endpoint(id)];
        self.try_connect(&endpoints)
            .await
            .unwrap_or_else(|e| panic!("cannot create a client for {endpoints:?}: {e}"))
    }

    /// Every key under `prefix` that `id` has applied (a serializable
    /// read on `id` alone, keys only).
    pub async fn keys_with_prefix(
        &self,
        id: NodeId,
        prefix: &str,
    ) -> Result<std::collections::BTreeSet<String>, String> {
        let mut c = self.try_connect(&[self.endpoint(id)]).await?;
        let options = client::GetOptions::new()
            .with_prefix()
            .with_serializable()
            .with_keys_only();
        let r = c
            .get(prefix, Some(options))
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect())
    }

    /// `Maintenance.Status` of `id` (an error, not a panic, when `id` is
    /// down: callers poll it).
    pub async fn status(&self, id: NodeId) -> Result<StatusResponse, String> {
        let mut client = self.try_connect(&[self.endpoint(id)]).await?;
        client.status().await.map_err(|e| e.to_string())
    }

    /// `Maintenance.HashKV` of `id` at `revision` (0: its latest).
    pub async fn hash_kv(&self, id: NodeId, revision: i64) -> Result<HashKvResponse, String> {
        let mut client = self.try_connect(&[self.endpoint(id)]).await?;
        client.hash_kv(revision).await.map_err(|e| e.to_string())
    }

    /// Prometheus sample `name` of `id` (unlabelled; see [`metric`]).
    pub fn metric(&self, id: NodeId, name: &str) -> Result<f64, String> {
        let text = self.metrics(id)?;
        metric(&text, name).ok_or_else(|| format!("member {id} exports no {name}"))
    }

    /// Waits until exactly one running member leads and every running
    /// member knows it; returns the leader and its term.
    pub async fn wait_leader(&self, timeout: Duration) -> (NodeId, u64) {
        let running = self.running();
        let (members, cluster) = (&running, self);
        poll_until(
            &format!("a leader that members {running:?} agree on"),
            timeout,
            move || async move {
                let mut leader = None;
                let mut term = 0;
                for &id in members {
                    let s = cluster.status(id).await.ok()?;
                    if s.leader == 0 || leader.is_some_and(|l| l != s.leader) {
                        return None;
                    }
                    leader = Some(s.leader);
                    if s.leader == id {
                        term = s.raft_term;
                    }
                }
                let leader = leader?;
                // The leader must be one of the running members and answer
                // as the leader itself.
                (term > 0).then_some((leader, term))
            },
        )
        .await
    }

    /// Waits until `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: NodeId, index: u64, timeout: Duration) {
        poll_until(
            &format!("member {id} to apply index {index}"),
            timeout,
            move || async move {
                let s = self.status(id).await.ok()?;
                (s.raft_applied_index >= index).then_some(())
            },
        )
        .await
    }

    /// `GET /metrics` on `id`.
    pub fn metrics(&self, id: NodeId) -> Result<String, String> {
        fetch_metrics(self.metrics_addr(id))
    }

    /// Runs the `skiff` binary with `args` (bounded); returns its output.
    pub fn skiff(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(skiff_bin()).args(args),
            Duration::from_secs(60),
        )
    }
}

/// Growing and shrinking a cluster (Cluster.MemberAdd / MemberRemove).
impl Cluster {
    /// Fresh loopback addresses for a member to be added.
    pub fn new_member_addrs(&self) -> MemberAddrs {
        MemberAddrs {
            client: free_addr(),
            peer: free_addr(),
            metrics: free_addr(),
        }
    }

    /// Registers member `id` (the id MemberAdd assigned) with `addrs`, and
    /// starts it on an empty data directory to join the running cluster
    /// `cluster_id` (`--initial-cluster-state existing`, `--cluster-id`;
    /// its `--initial-cluster` lists every registered, unretired member,
    /// itself included); waits until it accepts client connections.
    pub fn add_member_process(&mut self, id: NodeId, cluster_id: u64, addrs: MemberAddrs) {
        if let Err(why) = self.try_add_member_process(id, cluster_id, addrs) {
            panic!("member {id} did not start: {why}");
        }
    }

    /// [`Cluster::add_member_process`], reporting a failed start.
    pub fn try_add_member_process(
        &mut self,
        id: NodeId,
        cluster_id: u64,
        addrs: MemberAddrs,
    ) -> Result<(), String> {
        assert!(
            !self.members.contains_key(&id),
            "member {id} exists already"
        );
        let dir = self.dir.as_ref().expect("the cluster directory").path();
        let member = Member {
            client: addrs.client,
            peer: addrs.peer,
            metrics: addrs.metrics,
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}.log")),
            child: None,
            starts: 0,
            extra_args: vec![
                "--initial-cluster-state".into(),
                "existing".into(),
                // Hex, as etcdctl prints it.
                "--cluster-id".into(),
                format!("{cluster_id:#x}"),
            ],
            retired: false,
        };
        self.members.insert(id, member);
        self.spawn(id);
        self.wait_serving(id)
    }

    /// `http://host:port` of `id`'s peer address.
    pub fn peer_url(&self, id: NodeId) -> String {
        format!("http://{}", self.member(id).peer)
    }

    /// Leaves `id` (removed from the cluster) out of the other members' `--initial-cluster`
    /// lists in later starts; it stays registered (its log, its data).
    pub fn retire(&mut self, id: NodeId) {
        self.member_mut(id).retired = true;
    }

    /// Waits (up to `timeout`) for `id`'s process to exit on its own and
    /// reaps it; `None` if it still runs then (it keeps running).
    pub fn wait_exit(&mut self, id: NodeId, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let m = self.member_mut(id);
        let child = m
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                m.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `id`'s lying disk, where the cluster has them
    /// ([`ClusterOptions::lying_disks`]).
    pub fn disk(&self, id: NodeId) -> Option<&lying_disk::LyingDisk> {
        self.disks.get(&id)
    }

    /// Starts `id` again from its data directory, like
    /// [`Cluster::restart`], but reports a failed start (it exited, or did
    /// not accept client connections in time) instead of panicking.
    pub fn try_restart(&mut self, id: NodeId) -> Result<(), String> {
        self.spawn(id);
        self.wait_serving(id)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A member whose lying disk holds its fsync (a power cut) exits only
        // once the disk answers.
        for id in self.ids() {
            self.sigkill(id);
        }
        for disk in self.disks.values() {
            if disk.is_dark() {
                disk.lose_power();
            }
        }
        for m in self.members.values_mut() {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.print_logs();
            // A lying disk's contents go with its mount: keep a copy.
            for (id, disk) in &self.disks {
                let copy = disk.mountpoint().with_extension("copy");
                if let Err(e) = nemesis::copy_tree(disk.mountpoint(), &copy) {
                    eprintln!("----- member {id}'s lying disk not copied: {e}");
                }
            }
        }
        // Unmounted before the directory holding the mount points goes.
        self.disks.clear();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("----- cluster directory kept: {}", kept.display());
            }
        }
    }
}

/// The `etcdctl` binary the tests drive: `$ETCDCTL`, or `etcdctl` on the
/// `PATH`; `None` when neither exists (those tests then skip, saying why).
pub fn etcdctl_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ETCDCTL") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("etcdctl"))
        .find(|p| p.is_file())
}
