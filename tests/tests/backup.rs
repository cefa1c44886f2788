//! Backup and restore end to end (etcd's `Maintenance.Snapshot` and
//! `etcdutl snapshot restore`), Maintenance.Hash and Defragment, on
//! clusters of `skiff serve` processes:
//!
//! * a backup taken from a member while clients write: it holds every
//!   write acknowledged before it was asked for (a linearizable view), its
//!   stream counts down `remaining_bytes` exactly; restored with `skiff
//!   snapshot restore` into a new 3-member cluster (new processes, new
//!   addresses, new data directories), the new cluster has the old one's
//!   keys, values, revisions, versions, leases, compact revision and
//!   HashKV at the backup's revision, a new cluster id, and takes writes;
//!   Hash is equal on every member of both clusters;
//! * refusals: a truncated and a corrupted backup, a data directory that
//!   holds anything (left untouched), the old cluster's addresses without a
//!   new `--cluster-id`;
//! * the real `etcdctl snapshot save` writes a file that `skiff snapshot
//!   restore` accepts and a member starts from (skipped, with the reason
//!   printed, where etcdctl is not installed); `etcdctl defrag` succeeds.
//!
//! Every wait is bounded; no assertion is on timing (the time and size of
//! the backup and the restore are printed).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_kv::api::backup::{read_backup_header, BackupHeader};
use skiff_tests::client::{Client, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use skiff_tests::{
    connect, etcdctl_path, free_addr, poll_until, run_bounded, skiff_bin, strip_ansi, Cluster,
    ClusterOptions, NodeId, CLIENT_OPTIONS, NODE_START_TIMEOUT, POLL_INTERVAL, WAL_SEGMENT_BYTES,
};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Keys written before the load (in txns of [`PRELOAD_TXN_KEYS`]), with
/// values of [`PRELOAD_VALUE_BYTES`]: a backup of several chunks.
const PRELOAD_KEYS: usize = 3_000;
const PRELOAD_TXN_KEYS: usize = 100;
const PRELOAD_VALUE_BYTES: usize = 600;
/// Writers of the load, each over its own keys.
const WRITERS: usize = 3;
/// Keys per writer (overwritten in turn: history).
const WRITER_KEYS: usize = 50;
/// The load goes on this long after the backup ended.
const LOAD_AFTER_BACKUP: Duration = Duration::from_millis(500);
/// Lease attached to a key: long enough to outlive the test.
const LEASE_TTL: i64 = 3_600;

// ---------------------------------------------------------------------------
// A cluster restored from a backup: its members' processes, started by the
// test (the harness's `Cluster` makes its own data directories).

struct Restored {
    dir: Option<tempfile::TempDir>,
    members: BTreeMap<NodeId, RestoredMember>,
    /// `--cluster-id` given to restore and serve, if any.
    cluster_id: Option<u64>,
}

struct RestoredMember {
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Restored {
    /// New addresses and (missing) data directories for `n` members.
    fn plan(n: usize, cluster_id: Option<u64>) -> Restored {
        let dir = tempfile::Builder::new()
            .prefix("skiff-restored-")
            .tempdir()
            .expect("a temporary directory");
        let members = (1..=n as NodeId)
            .map(|id| {
                (
                    id,
                    RestoredMember {
                        client: free_addr(),
                        peer: free_addr(),
                        data_dir: dir.path().join(format!("node-{id}")),
                        log: dir.path().join(format!("node-{id}.log")),
                        child: None,
                    },
                )
            })
            .collect();
        Restored {
            dir: Some(dir),
            members,
            cluster_id,
        }
    }

    fn list(&self, f: fn(&RestoredMember) -> SocketAddr) -> String {
        self.members
            .iter()
            .map(|(id, m)| format!("{id}={}", f(m)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn initial_cluster(&self) -> String {
        self.list(|m| m.peer)
    }

    fn data_dir(&self, id: NodeId) -> &Path {
        &self.members[&id].data_dir
    }

    /// `skiff snapshot restore` of `backup` for member `id`; panics unless
    /// it succeeds; returns its stdout.
    fn restore(&self, backup: &Path, id: NodeId) -> String {
        let mut args = vec![
            "snapshot".to_string(),
            "restore".into(),
            backup.display().to_string(),
            "--data-dir".into(),
            self.data_dir(id).display().to_string(),
            "--id".into(),
            id.to_string(),
            "--initial-cluster".into(),
            self.initial_cluster(),
            "--wal-segment-size".into(),
            WAL_SEGMENT_BYTES.to_string(),
        ];
        if let Some(c) = self.cluster_id {
            args.extend(["--cluster-id".into(), c.to_string()]);
        }
        let out = skiff(&args);
        assert!(
            out.status.success(),
            "skiff {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts every member and waits until each accepts client
    /// connections.
    fn start(&mut self) {
        let (peers, clients) = (self.initial_cluster(), self.list(|m| m.client));
        let cluster_id = self.cluster_id;
        for (id, m) in &mut self.members {
            let mut args = vec![
                "serve".to_string(),
                "--id".into(),
                id.to_string(),
                "--data-dir".into(),
                m.data_dir.display().to_string(),
                "--listen-client".into(),
                m.client.to_string(),
                "--listen-peer".into(),
                m.peer.to_string(),
                "--initial-cluster".into(),
                peers.clone(),
                "--initial-cluster-clients".into(),
                clients.clone(),
                "--wal-segment-size".into(),
                WAL_SEGMENT_BYTES.to_string(),
            ];
            if let Some(c) = cluster_id {
                args.extend(["--cluster-id".into(), c.to_string()]);
            }
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&m.log)
                .expect("open the member's log");
            let err = log.try_clone().expect("clone the log handle");
            m.child = Some(
                Command::new(skiff_bin())
                    .args(&args)
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(err)
                    .spawn()
                    .expect("start skiff serve"),
            );
        }
        for (id, m) in &mut self.members {
            let deadline = Instant::now() + NODE_START_TIMEOUT;
            while TcpStream::connect_timeout(&m.client, Duration::from_secs(1)).is_err() {
                let child = m.child.as_mut().expect("started");
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!("restored member {id} exited at start ({status})");
                }
                assert!(
                    Instant::now() < deadline,
                    "restored member {id} did not serve within {NODE_START_TIMEOUT:?}"
                );
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    fn endpoint(&self, id: NodeId) -> String {
        format!("http://{}", self.members[&id].client)
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.keys().map(|&id| self.endpoint(id)).collect()
    }

    /// Waits until every member names the same leader; returns it.
    async fn wait_leader(&self) -> NodeId {
        poll_until(
            "a leader of the restored cluster",
            LEADER_TIMEOUT,
            || async {
                let mut leader = None;
                for &id in self.members.keys() {
                    let mut c = Client::connect(&[self.endpoint(id)], CLIENT_OPTIONS)
                        .await
                        .ok()?;
                    let s = c.status().await.ok()?;
                    if s.leader == 0 || leader.is_some_and(|l| l != s.leader) {
                        return None;
                    }
                    leader = Some(s.leader);
                }
                leader
            },
        )
        .await
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (id, m) in &self.members {
                let log = strip_ansi(&std::fs::read_to_string(&m.log).unwrap_or_default());
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("----- restored member {id}: last lines of its log -----");
                for line in &lines[lines.len().saturating_sub(80)..] {
                    eprintln!("{line}");
                }
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("----- restored cluster kept: {}", dir.keep().display());
            }
        }
    }
}

fn skiff(args: &[String]) -> Output {
    run_bounded(Command::new(skiff_bin()).args(args), COMMAND_TIMEOUT)
}

/// `skiff snapshot restore` that must fail; returns its stderr.
fn restore_fails(backup: &Path, data_dir: &Path, initial_cluster: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "snapshot".to_string(),
        "restore".into(),
        backup.display().to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--id".into(),
        "1".into(),
        "--initial-cluster".into(),
        initial_cluster.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = skiff(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "skiff {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The names of everything under `dir`, recursively, with sizes.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("list a directory") {
            let e = e.expect("an entry");
            let m = e.metadata().expect("stat");
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), if m.is_dir() { 0 } else { m.len() }));
        }
    }
    out.sort();
    out
}

fn header_of(path: &Path) -> BackupHeader {
    let mut f = std::fs::File::open(path).expect("open the backup");
    let len = f.metadata().expect("stat the backup").len();
    read_backup_header(&mut f, Some(len)).expect("a backup header")
}

/// Every key at `revision` (0: the latest), as one member serves it.
async fn all_keys(client: &mut Client, revision: i64) -> (i64, Vec<KeyValue>) {
    let r = client
        .get_range("\0", "\0", revision)
        .await
        .expect("a range over every key");
    (r.header.expect("a header").revision, r.kvs)
}

/// Waits until every endpoint answers the same Hash; returns it.
async fn hashes_agree(what: &str, endpoints: &[String]) -> u32 {
    poll_until(
        &format!("Hash to agree on {what}"),
        CONVERGE_TIMEOUT,
        || async {
            let mut seen = None;
            for e in endpoints {
                let mut c = Client::connect(std::slice::from_ref(e), CLIENT_OPTIONS)
                    .await
                    .ok()?;
                let h = c.hash().await.ok()?.hash;
                if seen.is_some_and(|s| s != h) {
                    return None;
                }
                seen = Some(h);
            }
            seen
        },
    )
    .await
}

/// An acknowledged write of the load.
struct Ack {
    revision: i64,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_new_cluster() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut client = connect(&cluster.endpoints()).await;

    // History: keys in txns, overwrites, deletes, a compaction, a lease.
    let value = "v".repeat(PRELOAD_VALUE_BYTES);
    for t in 0..PRELOAD_KEYS / PRELOAD_TXN_KEYS {
        let ops = (0..PRELOAD_TXN_KEYS)
            .map(|i| TxnOp::put(format!("pre/{:05}", t * PRELOAD_TXN_KEYS + i), &value, None));
        client.txn(Txn::new().and_then(ops)).await.expect("preload");
    }
    for i in 0..20 {
        client
            .put(format!("pre/{i:05}"), format!("second-{i}"), None)
            .await
            .unwrap();
    }
    let compact_at = client
        .delete("pre/00020", None)
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    client.compact(compact_at, false).await.expect("compact");
    let lease = client
        .lease_grant(LEASE_TTL, None)
        .await
        .expect("a lease")
        .id;
    client
        .put(
            "leased",
            "by a lease",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();

    // The load: each writer overwrites its own keys until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (stop, endpoints) = (stop.clone(), cluster.endpoints());
        writers.push(tokio::spawn(async move {
            let mut c = connect(&endpoints).await;
            let mut acks = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load/{w}/{:03}", i % WRITER_KEYS);
                if let Ok(r) = c.put(&key, format!("{w}-{i}"), None).await {
                    acks.push(Ack {
                        revision: r.header.unwrap().revision,
                        at: Instant::now(),
                    });
                }
                i += 1;
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The backup, from a follower, while the writers write.
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.db");
    let asked = Instant::now();
    let mut from_follower = cluster.client(follower).await;
    let download = from_follower.snapshot_to(&backup).await.expect("a backup");
    let backup_took = asked.elapsed();
    tokio::time::sleep(LOAD_AFTER_BACKUP).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for w in writers {
        acks.extend(w.await.unwrap());
    }
    let header = header_of(&backup);
    let size = std::fs::metadata(&backup).unwrap().len();
    eprintln!(
        "backup: {size} bytes in {} messages, {:.0} ms, revision {}, index {}",
        download.messages,
        backup_took.as_secs_f64() * 1e3,
        header.revision,
        header.applied_index
    );
    assert_eq!(download.bytes, size);
    assert_eq!(size, header.total_len());
    assert!(download.messages >= 2, "{} messages", download.messages);
    assert!(
        download.remaining_exact,
        "remaining_bytes did not count down exactly"
    );
    assert!(!download.version.is_empty());
    let h = download.header.expect("a header");
    assert_eq!(h.revision, header.revision);
    assert_eq!((h.member_id, header.member_id), (follower, follower));
    assert_eq!(header.compact_revision, compact_at);
    let old_cluster_id = h.cluster_id;
    assert_eq!(header.cluster_id, old_cluster_id);
    // Linearizable: every write acknowledged before the backup was asked
    // for is in it; the load went on past it.
    let before: Vec<&Ack> = acks.iter().filter(|a| a.at < asked).collect();
    assert!(
        !before.is_empty(),
        "no write acknowledged before the backup"
    );
    for a in &before {
        assert!(
            a.revision <= header.revision,
            "revision {} acknowledged before the backup at {}",
            a.revision,
            header.revision
        );
    }
    assert!(
        acks.iter().any(|a| a.revision > header.revision),
        "no write after the backup's revision: not under load"
    );

    // What the old cluster had at the backup's revision.
    let (_, expected) = all_keys(&mut client, header.revision).await;
    assert!(expected.len() > PRELOAD_KEYS, "{} keys", expected.len());
    let old_hash_kv = client.hash_kv(header.revision).await.expect("HashKV");
    assert_eq!(old_hash_kv.compact_revision, compact_at);

    // Hash: equal on every member of the old cluster once writes stopped.
    let old_hash = hashes_agree("the old cluster", &cluster.endpoints()).await;

    // Restore into a new cluster: new addresses, new directories.
    let mut restored = Restored::plan(3, None);
    let started = Instant::now();
    for id in 1..=3 {
        let out = restored.restore(&backup, id);
        assert!(
            out.contains(&format!("restored revision {}", header.revision)),
            "{out}"
        );
    }
    let restore_took = started.elapsed();
    let data_bytes: u64 = tree(restored.data_dir(1)).iter().map(|(_, n)| n).sum();
    eprintln!(
        "restore: 3 members in {:.0} ms ({data_bytes} bytes per data directory, WAL segment included)",
        restore_took.as_secs_f64() * 1e3
    );
    restored.start();
    let new_leader = restored.wait_leader().await;
    let mut new_client = connect(&restored.endpoints()).await;

    // The same keys, values, revisions and versions; the same history
    // hash; the compact revision and the lease came along.
    for id in 1..=3 {
        let mut c = connect(&[restored.endpoint(id)]).await;
        let (revision, kvs) = all_keys(&mut c, 0).await;
        assert_eq!(revision, header.revision, "member {id}");
        assert!(
            kvs == expected,
            "member {id}: the restored keys differ from the backup's"
        );
        let hk = c.hash_kv(header.revision).await.expect("HashKV");
        assert_eq!(
            (hk.hash, hk.compact_revision),
            (old_hash_kv.hash, old_hash_kv.compact_revision),
            "member {id}"
        );
        let status = c.status().await.unwrap();
        let h = status.header.unwrap();
        assert_ne!(
            h.cluster_id, old_cluster_id,
            "the restored cluster kept the old id"
        );
        let recorded = std::fs::read_to_string(restored.data_dir(id).join("cluster_id")).unwrap();
        assert_eq!(
            recorded.trim(),
            format!("{:#x}", h.cluster_id),
            "member {id}"
        );
        assert_eq!(status.leader, new_leader);
    }
    let err = new_client
        .get(
            "pre/00000",
            Some(GetOptions::new().with_revision(compact_at - 1)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");
    let ttl = new_client.lease_time_to_live(lease, true).await.unwrap();
    assert!(ttl.ttl > 0, "the lease did not come along: {ttl:?}");
    assert_eq!(ttl.keys, [&b"leased"[..]]);
    let members = new_client.member_list().await.unwrap().members;
    assert_eq!(members.len(), 3);

    // The new cluster takes writes, from the backup's revision on.
    let r = new_client.put("after-restore", "yes", None).await.unwrap();
    assert_eq!(r.header.unwrap().revision, header.revision + 1);
    let new_hash = hashes_agree("the restored cluster", &restored.endpoints()).await;
    assert_ne!(new_hash, old_hash);
    new_client.defragment().await.expect("Defragment");

    // Refusals. A data directory that holds anything is left untouched.
    let used = restored.data_dir(1).to_path_buf();
    let before = tree(&used);
    let e = restore_fails(&backup, &used, &restored.initial_cluster(), &[]);
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(tree(&used), before);
    // A truncated backup.
    let bytes = std::fs::read(&backup).unwrap();
    let short = dir.path().join("short.db");
    std::fs::write(&short, &bytes[..bytes.len() / 2]).unwrap();
    let target = dir.path().join("never");
    let e = restore_fails(&short, &target, "1=127.0.0.1:1", &[]);
    assert!(e.contains("truncated"), "{e}");
    // A flipped byte in the store's bytes, then in the trailer.
    for at in [bytes.len() / 2, bytes.len() - 32] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        let corrupt = dir.path().join("corrupt.db");
        std::fs::write(&corrupt, &bad).unwrap();
        let e = restore_fails(&corrupt, &target, "1=127.0.0.1:1", &[]);
        assert!(e.contains("corrupt"), "byte {at}: {e}");
    }
    assert!(!target.exists());
    // On the old cluster's own addresses, the restored cluster still gets
    // a new id (recorded in the data directory); the old id is refused.
    let old_peers = {
        let args = cluster.serve_args(1);
        let at = args.iter().position(|a| a == "--initial-cluster").unwrap();
        args[at + 1].clone()
    };
    let e = restore_fails(
        &backup,
        &target,
        &old_peers,
        &["--cluster-id", &format!("{old_cluster_id:#x}")],
    );
    assert!(e.contains("choose another"), "{e}");
    assert!(!target.exists());
    let args: Vec<String> = [
        "snapshot",
        "restore",
        &backup.display().to_string(),
        "--data-dir",
        &target.display().to_string(),
        "--id",
        "1",
        "--initial-cluster",
        &old_peers,
    ]
    .map(String::from)
    .into();
    let out = skiff(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded = std::fs::read_to_string(target.join("cluster_id")).unwrap();
    let recorded = u64::from_str_radix(recorded.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(recorded, old_cluster_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_is_restorable() {
    let Some(etcdctl) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    });
    cluster.wait_leader(LEADER_TIMEOUT).await;
    // host:port, not a URL (see tests/etcdctl.rs).
    let endpoint = cluster
        .endpoint(1)
        .trim_start_matches("http://")
        .to_string();
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--command-timeout=30s")
            .args(args);
        let out = run_bounded(&mut cmd, COMMAND_TIMEOUT);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for i in 0..10 {
        ctl(&["put", &format!("k{i}"), &format!("v{i}")]);
    }
    ctl(&["del", "k3"]);
    assert!(ctl(&["defrag"]).contains("Finished defragmenting"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcdctl.db");
    ctl(&["snapshot", "save", &file.display().to_string()]);
    let header = header_of(&file);
    assert_eq!(header.revision, 12);

    let mut restored = Restored::plan(1, None);
    restored.restore(&file, 1);
    restored.start();
    restored.wait_leader().await;
    let mut c = connect(&restored.endpoints()).await;
    let (revision, kvs) = all_keys(&mut c, 0).await;
    assert_eq!(revision, 12);
    let keys: Vec<&[u8]> = kvs.iter().map(|kv| &kv.key[..]).collect();
    assert_eq!(keys.len(), 9, "{keys:?}");
    assert!(!keys.contains(&&b"k3"[..]));
    let old = cluster.client(1).await.get("k7", None).await.unwrap().kvs;
    assert_eq!(c.get("k7", None).await.unwrap().kvs, old);
}
