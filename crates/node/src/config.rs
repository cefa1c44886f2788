//! A node's configuration: every tunable, from flags or a TOML file.
//!
//! Field names are the same in the TOML file and (with `-` for `_`) on the
//! command line. Every check names the field it rejects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use skiff_net::tls::PeerTlsFiles;
use skiff_net::PeerAddr;
use skiff_raft::NodeId;

/// A configuration error; `field` names the offending field or flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn bad<T>(field: &str, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    })
}

/// Which WAL backend to run (see `skiff_wal::Backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WalBackend {
    /// io_uring where the kernel allows it, else pwritev.
    Auto,
    IoUring,
    Pwritev,
}

/// The default free-space reserve: two default WAL segments.
pub const SPACE_RESERVE_BYTES_DEFAULT: u64 = 128 << 20;

/// Whether a node bootstraps a new cluster or joins one (etcd's
/// `--initial-cluster-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    /// The members of `initial_cluster` form a new cluster.
    #[default]
    New,
    /// This node was added to a running cluster (Cluster.MemberAdd): it
    /// does not vote until the leader's log tells it that it may, and it
    /// needs `cluster_id`.
    Existing,
}

/// A port's TLS files, checked by [`NodeConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate (chain) this member presents, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// CA certificates the other side's certificate must chain to, PEM
    /// (required: members verify each other with it).
    pub trusted_ca: PathBuf,
    /// Whether the other side must present a certificate.
    pub cert_auth: bool,
}

impl TlsFiles {
    /// `fields` names (cert, key, CA, auth) for errors.
    fn check(
        fields: [&str; 4],
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
        ca: &Option<PathBuf>,
        auth: bool,
    ) -> Result<Option<TlsFiles>, ConfigError> {
        let [cert_field, key_field, ca_field, auth_field] = fields;
        let (cert, key) = match (cert, key) {
            (None, None) => {
                if auth {
                    return bad(
                        auth_field,
                        format!("needs TLS: set {cert_field} and {key_field}"),
                    );
                }
                if ca.is_some() {
                    return bad(
                        ca_field,
                        format!("needs TLS: set {cert_field} and {key_field}"),
                    );
                }
                return Ok(None);
            }
            (Some(_), None) => return bad(key_field, format!("must be set with {cert_field}")),
            (None, Some(_)) => return bad(cert_field, format!("must be set with {key_field}")),
            (Some(c), Some(k)) => (c, k),
        };
        if ca.is_none() {
            return bad(
                ca_field,
                format!(
                    "must be set with {cert_field}: the CA the members' certificates chain to \
                     (members verify each other with it)"
                ),
            );
        }
        let ca = ca.as_ref().expect("checked above");
        for (field, path) in [(cert_field, cert), (key_field, key), (ca_field, ca)] {
            if let Err(e) = std::fs::metadata(path) {
                return bad(field, format!("cannot read {}: {e}", path.display()));
            }
        }
        Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            trusted_ca: ca.clone(),
            cert_auth: auth,
        }))
    }
}

/// Parses a node or cluster id: decimal, or hexadecimal with `0x` (as
/// etcdctl prints ids).
pub fn parse_id(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not an id (decimal, or hexadecimal with 0x)"))
}

/// Everything a node needs. `NodeConfig::default()` holds the defaults; the
/// identity and addresses have no useful default and are checked by
/// [`NodeConfig::validate`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    /// etcd v3 gRPC API.
    pub listen_client: SocketAddr,
    /// Raft messages between nodes.
    pub listen_peer: SocketAddr,
    /// Snapshot streaming; port 0 picks a free port (it is announced to
    /// followers in each snapshot offer).
    pub listen_snapshot: SocketAddr,
    /// Prometheus text metrics over HTTP; none when unset.
    pub listen_metrics: Option<SocketAddr>,
    /// `id=peer-addr` for every voter of a new cluster, this node included.
    /// An address is `IP:PORT` or `HOST:PORT` (resolved each time a peer
    /// connection opens).
    #[serde(deserialize_with = "de_cluster")]
    pub initial_cluster: BTreeMap<NodeId, PeerAddr>,
    /// `id=client-addr` of the members: where writes sent to a follower are
    /// forwarded and what `member list` shows. Optional.
    #[serde(deserialize_with = "de_cluster")]
    pub initial_cluster_clients: BTreeMap<NodeId, PeerAddr>,
    /// Derived from `initial_cluster` when 0 (a node that joins an
    /// existing cluster must be given it). Recorded in the data directory
    /// on first start; later starts use the recorded one.
    pub cluster_id: u64,
    /// `new` bootstraps a cluster of `initial_cluster`; `existing` joins a
    /// cluster this node was added to with MemberAdd.
    pub initial_cluster_state: ClusterState,

    // ---- TLS (etcd's flag names). Paths to PEM files.
    /// The certificate the client port serves (with `key_file`); the
    /// client port speaks TLS only when it is set.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// CA certificates that client certificates must chain to; also the
    /// roots this member trusts when it calls another member's client port
    /// (requests forwarded to the leader).
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate that chains to
    /// `trusted_ca_file`.
    pub client_cert_auth: bool,
    /// The certificate this member presents on the peer and snapshot ports,
    /// both when it accepts and when it connects (with `peer_key_file`);
    /// those ports speak TLS only when it is set. It must name the
    /// member's peer and snapshot IP addresses.
    pub peer_cert_file: Option<PathBuf>,
    /// The private key of `peer_cert_file`.
    pub peer_key_file: Option<PathBuf>,
    /// CA certificates the other members' peer certificates chain to.
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Refuse peers without a certificate of `peer_trusted_ca_file`, and
    /// refuse a Raft connection whose certificate does not name the peer
    /// address of the member it claims to be.
    pub peer_client_cert_auth: bool,
    /// With `peer_client_cert_auth`: the common name every peer
    /// certificate must carry (etcd's `--peer-cert-allowed-cn`); an
    /// inbound peer or snapshot connection with another is closed after
    /// the handshake, before any frame is read.
    pub peer_cert_allowed_cn: Option<String>,

    // ---- Raft timing.
    pub tick_interval_ms: u64,
    pub election_ticks_min: u32,
    pub election_ticks_max: u32,
    pub heartbeat_ticks: u32,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub lease_reads: bool,
    /// The clock-rate difference between members, in percent, that lease
    /// reads stay safe under (`skiff_raft::Config::lease_drift_pct`).
    pub lease_drift_pct: u32,

    // ---- Batching and flow control.
    /// Proposals per Raft proposal batch.
    pub batch_entries_max: usize,
    /// Bytes per Raft proposal batch.
    pub batch_bytes_max: usize,
    /// How long the first proposal of a batch may wait for more; 0 takes
    /// what is queued and goes.
    pub batch_linger_us: u64,
    /// Committed entry bytes the state machine applies in one loop pass
    /// (one entry at least); the rest waits for the next passes, which
    /// come at once. Bounds a pass when a large backlog commits at once (a
    /// follower catching up, a burst of large writes) so heartbeats keep
    /// going out.
    pub apply_bytes_max: usize,
    /// AppendEntries in flight per follower.
    pub inflight_max: usize,
    /// Entry bytes in flight per follower.
    pub inflight_bytes_max: usize,
    /// Entry bytes per AppendEntries message.
    pub append_bytes_max: usize,
    /// Proposed but uncommitted bytes before proposals are refused.
    pub uncommitted_bytes_max: usize,
    /// Client requests waiting in the node (proposals and reads) before new
    /// ones are refused with RESOURCE_EXHAUSTED.
    pub requests_pending_max: usize,
    /// Longest a client request waits for its answer.
    pub request_timeout_ms: u64,

    // ---- Snapshots.
    /// Take a state-machine snapshot after this many applied entries.
    pub snapshot_entries: u64,
    /// Entries the log keeps behind a snapshot before it is compacted away
    /// (as etcd's 5,000): a follower at most this far behind catches up
    /// from the log, not from a whole snapshot.
    pub snapshot_catchup_entries: u64,
    /// ... or once this many payload bytes were applied since the last one.
    pub snapshot_bytes: u64,
    /// Parallel streams a follower fetches a snapshot with.
    pub snapshot_streams: usize,
    /// Bytes per snapshot chunk.
    pub snapshot_chunk_bytes: u32,

    // ---- Disk space.
    /// Free bytes the data directory's filesystem keeps in reserve: below
    /// it the node reports its space low (`NodeHandle::space_low`) and a
    /// service refuses writes that grow its state (the KV raises a NOSPACE
    /// alarm) while reads go on; the reserve is what Raft's own entries,
    /// snapshots and a new WAL segment still need. 0 disables the check.
    pub space_reserve_bytes: u64,

    // ---- Threads.
    /// Worker threads of the node's network runtime (client gRPC, peer
    /// transport, snapshot streams).
    pub io_threads: usize,

    // ---- WAL.
    pub wal_backend: WalBackend,
    pub wal_segment_size: u64,
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        NodeConfig {
            id: 0,
            data_dir: PathBuf::new(),
            listen_client: ([127, 0, 0, 1], 2379).into(),
            listen_peer: ([127, 0, 0, 1], 2380).into(),
            listen_snapshot: any,
            listen_metrics: None,
            initial_cluster: BTreeMap::new(),
            initial_cluster_clients: BTreeMap::new(),
            cluster_id: 0,
            initial_cluster_state: ClusterState::New,
            cert_file: None,
            key_file: None,
            trusted_ca_file: None,
            client_cert_auth: false,
            peer_cert_file: None,
            peer_key_file: None,
            peer_trusted_ca_file: None,
            peer_client_cert_auth: false,
            peer_cert_allowed_cn: None,
            tick_interval_ms: 10,
            election_ticks_min: 30,
            election_ticks_max: 60,
            heartbeat_ticks: 5,
            pre_vote: true,
            check_quorum: true,
            lease_reads: false,
            lease_drift_pct: 10,
            batch_entries_max: 4096,
            batch_bytes_max: 4 << 20,
            batch_linger_us: 0,
            apply_bytes_max: 1 << 20,
            io_threads: 2,
            inflight_max: 256,
            inflight_bytes_max: 64 << 20,
            append_bytes_max: 1 << 20,
            uncommitted_bytes_max: 256 << 20,
            requests_pending_max: 65_536,
            request_timeout_ms: 10_000,
            snapshot_entries: 100_000,
            snapshot_catchup_entries: 5_000,
            snapshot_bytes: 256 << 20,
            snapshot_streams: 4,
            snapshot_chunk_bytes: 1 << 20,
            space_reserve_bytes: SPACE_RESERVE_BYTES_DEFAULT,
            wal_backend: WalBackend::Auto,
            wal_segment_size: 64 << 20,
        }
    }
}

fn de_cluster<'de, D>(d: D) -> Result<BTreeMap<NodeId, PeerAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    parse_cluster(&s).map_err(serde::de::Error::custom)
}

/// Parses `1=127.0.0.1:2380,2=node-2.example:2380,...` (an `http://` or
/// `https://` prefix is accepted: whether a port speaks TLS is this
/// member's own setting).
pub fn parse_cluster(s: &str) -> Result<BTreeMap<NodeId, PeerAddr>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((id, addr)) = part.split_once('=') else {
            return Err(format!("`{part}` is not id=host:port"));
        };
        let id: NodeId = parse_id(id)
            .map_err(|_| format!("`{id}` in `{part}` is not a node id (a positive integer)"))?;
        if id == 0 {
            return Err(format!("node ids start at 1 (`{part}`)"));
        }
        let addr = addr.trim();
        let addr = addr
            .strip_prefix("http://")
            .or_else(|| addr.strip_prefix("https://"))
            .unwrap_or(addr);
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        let addr: PeerAddr = addr
            .parse()
            .map_err(|e| format!("`{addr}` in `{part}` is not host:port: {e}"))?;
        if out.insert(id, addr).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    Ok(out)
}

impl NodeConfig {
    /// Reads a TOML file; unknown keys and bad values are errors naming the
    /// field.
    pub fn from_toml_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "config".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        NodeConfig::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<NodeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let reason = e.message().to_string();
            // toml reports the key for unknown fields in the message; for a
            // bad value the span points at the value, so the field is the
            // key on the line where the span starts.
            let field = e
                .span()
                .and_then(|span| {
                    let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
                    let line = text[start..].lines().next()?;
                    let key = line.split('=').next()?.trim();
                    (!key.is_empty()).then(|| key.to_string())
                })
                .unwrap_or_else(|| "config".into());
            ConfigError { field, reason }
        })
    }

    /// The cluster id: configured, or a hash of the initial cluster (so
    /// that nodes given the same `initial_cluster` agree).
    pub fn cluster_id(&self) -> u64 {
        if self.cluster_id != 0 {
            return self.cluster_id;
        }
        let mut text = String::new();
        for (id, addr) in &self.initial_cluster {
            text.push_str(&format!("{id}={addr},"));
        }
        u64::from(crc32c::crc32c(text.as_bytes())) << 32 | 0x5_4B1F
    }

    pub fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.tick_interval_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return bad("id", "node ids start at 1");
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must be set");
        }
        if self.initial_cluster.is_empty() {
            return bad(
                "initial_cluster",
                "must list the voters, this node included",
            );
        }
        match self.initial_cluster.get(&self.id) {
            None => {
                return bad(
                    "initial_cluster",
                    format!("does not list this node (id {})", self.id),
                )
            }
            Some(addr) if addr.port() != self.listen_peer.port() => {
                return bad(
                    "listen_peer",
                    format!(
                        "port {} differs from this node's initial_cluster entry {addr}",
                        self.listen_peer.port()
                    ),
                )
            }
            Some(_) => {}
        }
        for id in self.initial_cluster_clients.keys() {
            if !self.initial_cluster.contains_key(id) {
                return bad(
                    "initial_cluster_clients",
                    format!("node {id} is not in initial_cluster"),
                );
            }
        }
        if self.initial_cluster_state == ClusterState::Existing && self.cluster_id == 0 {
            return bad(
                "cluster_id",
                "a node joining an existing cluster needs the cluster's id (`etcdctl member add` \
                 prints it)",
            );
        }
        self.client_tls_files()?;
        self.peer_tls_files()?;
        if self.tick_interval_ms == 0 {
            return bad("tick_interval_ms", "must be at least 1");
        }
        let positive = [
            ("batch_entries_max", self.batch_entries_max),
            ("batch_bytes_max", self.batch_bytes_max),
            ("apply_bytes_max", self.apply_bytes_max),
            ("requests_pending_max", self.requests_pending_max),
            ("snapshot_streams", self.snapshot_streams),
        ];
        for (field, v) in positive {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be at least 1");
        }
        if self.snapshot_entries == 0 {
            return bad("snapshot_entries", "must be at least 1");
        }
        if self.io_threads == 0 || self.io_threads > 256 {
            return bad("io_threads", "must be between 1 and 256");
        }
        if self.batch_linger_us > 1_000_000 {
            return bad("batch_linger_us", "must be at most 1 s (1000000)");
        }
        self.raft_config().validate().map_err(|e| ConfigError {
            field: e.field.to_string(),
            reason: e.reason,
        })?;
        self.wal_options().validate().map_err(|e| ConfigError {
            field: "wal".into(),
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// The Raft core's configuration.
    /// The client port's TLS files, `None` when it serves plaintext.
    /// Checks that they go together (a certificate needs its key; client
    /// certificate authentication needs TLS and a CA) and exist.
    pub fn client_tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        TlsFiles::check(
            [
                "cert_file",
                "key_file",
                "trusted_ca_file",
                "client_cert_auth",
            ],
            &self.cert_file,
            &self.key_file,
            &self.trusted_ca_file,
            self.client_cert_auth,
        )
    }

    /// The peer and snapshot ports' TLS files, `None` when they speak
    /// plaintext; checked as [`NodeConfig::client_tls_files`].
    pub fn peer_tls_files(&self) -> Result<Option<PeerTlsFiles>, ConfigError> {
        let files = TlsFiles::check(
            [
                "peer_cert_file",
                "peer_key_file",
                "peer_trusted_ca_file",
                "peer_client_cert_auth",
            ],
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
            self.peer_client_cert_auth,
        )?;
        if let Some(cn) = &self.peer_cert_allowed_cn {
            let reason = if cn.is_empty() {
                Some("must not be empty")
            } else if !self.peer_client_cert_auth {
                Some("needs peer_client_cert_auth (peers must present certificates)")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(ConfigError {
                    field: "peer_cert_allowed_cn".into(),
                    reason: reason.into(),
                });
            }
        }
        Ok(files.map(|f| PeerTlsFiles {
            cert: f.cert,
            key: f.key,
            trusted_ca: f.trusted_ca,
            client_cert_auth: f.cert_auth,
            allowed_cn: self.peer_cert_allowed_cn.clone(),
        }))
    }

    pub fn raft_config(&self) -> skiff_raft::Config {
        // A joining node learns its membership from the leader's log.
        let voters = match self.initial_cluster_state {
            ClusterState::New => self.initial_cluster.keys().copied().collect(),
            ClusterState::Existing => Vec::new(),
        };
        let mut c = skiff_raft::Config::new(self.id, voters);
        c.election_ticks_min = self.election_ticks_min;
        c.election_ticks_max = self.election_ticks_max;
        c.heartbeat_ticks = self.heartbeat_ticks;
        c.pre_vote = self.pre_vote;
        c.check_quorum = self.check_quorum;
        c.lease_reads = self.lease_reads;
        c.lease_drift_pct = self.lease_drift_pct;
        c.inflight_max = self.inflight_max;
        c.inflight_bytes_max = self.inflight_bytes_max;
        c.batch_bytes_max = self.append_bytes_max;
        c.uncommitted_bytes_max = self.uncommitted_bytes_max;
        // A snapshot offer unanswered for longer than an election timeout
        // is offered again; keep Raft's default unless elections are
        // slower than it.
        c.snapshot_timeout_ticks = c
            .snapshot_timeout_ticks
            .max(self.election_ticks_max.saturating_mul(2));
        c
    }

    /// The WAL's options.
    pub fn wal_options(&self) -> skiff_wal::Options {
        skiff_wal::Options {
            segment_size: self.wal_segment_size,
            backend: match self.wal_backend {
                WalBackend::Auto => skiff_wal::Backend::Auto,
                WalBackend::IoUring => skiff_wal::Backend::IoUring,
                WalBackend::Pwritev => skiff_wal::Backend::Pwritev,
            },
            // The WAL's snapshot record holds only the membership.
            snapshot_meta_max: 64 << 10,
            ..skiff_wal::Options::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> NodeConfig {
        NodeConfig {
            id: 1,
            data_dir: "/tmp/x".into(),
            listen_peer: "127.0.0.1:7001".parse().unwrap(),
            initial_cluster: parse_cluster("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003")
                .unwrap(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn parses_cluster_lists() {
        let c = parse_cluster("1=127.0.0.1:1, 2=http://127.0.0.1:2").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[&2], "127.0.0.1:2".parse().unwrap());
        assert!(parse_cluster("1=127.0.0.1:1,1=127.0.0.1:2")
            .unwrap_err()
            .contains("twice"));
        assert!(parse_cluster("0=127.0.0.1:1")
            .unwrap_err()
            .contains("start at 1"));
        assert!(parse_cluster("x=127.0.0.1:1")
            .unwrap_err()
            .contains("node id"));
        assert!(parse_cluster("1=nowhere")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse_cluster("1=bad_name:1")
            .unwrap_err()
            .contains("host:port"));
        // Host names, kept as names (resolved at each connect).
        let c = parse_cluster("1=https://node-1.example:2380/,2=[::1]:2380").unwrap();
        assert_eq!(c[&1].to_string(), "node-1.example:2380");
        assert_eq!(c[&1].socket_addr(), None);
        assert_eq!(c[&2].to_string(), "[::1]:2380");
    }

    #[test]
    fn a_cluster_of_host_names_validates_and_keeps_ip_cluster_ids() {
        let mut c = three();
        let by_ip = c.cluster_id();
        c.initial_cluster = parse_cluster("1=a.example:7001,2=b.example:7002").unwrap();
        c.validate().unwrap();
        assert_ne!(c.cluster_id(), by_ip);
        c.listen_peer = "127.0.0.1:7009".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().field, "listen_peer");
        // The id derived from a list of IPs is what it was when the list
        // was parsed as socket addresses: the text `1=127.0.0.1:7001,...`.
        let text = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003,";
        assert_eq!(
            by_ip,
            u64::from(crc32c::crc32c(text.as_bytes())) << 32 | 0x5_4B1F
        );
    }

    #[test]
    fn tls_files_go_together_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.pem");
        std::fs::write(&file, "x").unwrap();
        let some = || Some(file.clone());
        let field = |c: NodeConfig| c.validate().unwrap_err().field;
        let mut c = three();
        c.validate().unwrap();
        assert_eq!(c.client_tls_files().unwrap(), None);
        c.cert_file = some();
        assert_eq!(field(c.clone()), "key_file");
        c.key_file = some();
        assert_eq!(field(c.clone()), "trusted_ca_file");
        c.trusted_ca_file = some();
        c.validate().unwrap();
        assert!(!c.client_tls_files().unwrap().unwrap().cert_auth);
        c.client_cert_auth = true;
        assert!(c.client_tls_files().unwrap().unwrap().cert_auth);
        c.key_file = Some(dir.path().join("missing.pem"));
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "key_file");
        assert!(e.reason.contains("missing.pem"), "{e}");
        let mut c = three();
        c.client_cert_auth = true;
        assert_eq!(field(c), "client_cert_auth");
        let mut c = three();
        c.key_file = some();
        assert_eq!(field(c), "cert_file");
        let mut c = three();
        c.trusted_ca_file = some();
        assert_eq!(field(c), "trusted_ca_file");
        // The peer ports' files are checked the same way, under their names.
        let mut c = three();
        c.peer_cert_file = some();
        assert_eq!(field(c.clone()), "peer_key_file");
        c.peer_key_file = some();
        assert_eq!(field(c.clone()), "peer_trusted_ca_file");
        c.peer_trusted_ca_file = some();
        c.peer_client_cert_auth = true;
        c.validate().unwrap();
        let peer = c.peer_tls_files().unwrap().unwrap();
        assert!(peer.client_cert_auth);
        assert_eq!(c.client_tls_files().unwrap(), None);
        let mut c = three();
        c.peer_client_cert_auth = true;
        assert_eq!(field(c), "peer_client_cert_auth");
    }

    #[test]
    fn slow_elections_are_valid() {
        let mut c = three();
        c.election_ticks_min = 200;
        c.election_ticks_max = 400;
        c.heartbeat_ticks = 190;
        c.validate().unwrap();
        assert!(c.raft_config().snapshot_timeout_ticks > 400);
    }

    #[test]
    fn validate_names_the_field() {
        three().validate().unwrap();
        type Change = Box<dyn Fn(&mut NodeConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("id", Box::new(|c| c.id = 0)),
            ("data_dir", Box::new(|c| c.data_dir = PathBuf::new())),
            ("initial_cluster", Box::new(|c| c.id = 9)),
            (
                "listen_peer",
                Box::new(|c| c.listen_peer = "127.0.0.1:9".parse().unwrap()),
            ),
            ("heartbeat_ticks", Box::new(|c| c.heartbeat_ticks = 100)),
            ("election_ticks_max", Box::new(|c| c.election_ticks_max = 1)),
            ("batch_entries_max", Box::new(|c| c.batch_entries_max = 0)),
            ("tick_interval_ms", Box::new(|c| c.tick_interval_ms = 0)),
            ("wal", Box::new(|c| c.wal_segment_size = 1000)),
        ];
        for (field, change) in cases {
            let mut c = three();
            change(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn toml_round_trip_and_errors() {
        let c = NodeConfig::from_toml(
            "id = 2\ndata_dir = \"/d\"\nlisten_peer = \"127.0.0.1:7002\"\n\
             initial_cluster = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"\n\
             batch_linger_us = 50\nwal_backend = \"pwritev\"\n",
        )
        .unwrap();
        assert_eq!(c.id, 2);
        assert_eq!(c.batch_linger_us, 50);
        assert_eq!(c.wal_backend, WalBackend::Pwritev);
        c.validate().unwrap();

        let err = NodeConfig::from_toml("id = 1\nbatch_size = 3\n").unwrap_err();
        assert!(err.reason.contains("batch_size"), "{err}");
        let err = NodeConfig::from_toml("election_ticks_min = \"many\"\n").unwrap_err();
        assert_eq!(err.field, "election_ticks_min", "{err}");
        let err = NodeConfig::from_toml("initial_cluster = \"1=x\"\n").unwrap_err();
        assert!(err.reason.contains("host:port"), "{err}");
    }

    #[test]
    fn cluster_id_is_shared_by_members() {
        let a = three();
        let mut b = three();
        b.id = 2;
        assert_eq!(a.cluster_id(), b.cluster_id());
        let mut c = three();
        c.cluster_id = 7;
        assert_eq!(c.cluster_id(), 7);
    }
}
