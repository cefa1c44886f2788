//! MVCC history end to end, on a 3-node cluster of `skiff serve`
//! processes: reads at past revisions, tombstones, prev_kv on put and
//! delete, compaction through Raft with etcd's errors below and above the
//! readable range, and HashKV equal on every member after compaction.
//! Once through the harness's client, once through the real `etcdctl`
//! (skipped, with the reason printed, where etcdctl is not installed).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use skiff_tests::client::{value_str, Client, DeleteOptions, GetOptions, PutOptions};
use skiff_tests::{etcdctl_path, run_bounded, Cluster, ClusterOptions, NodeId};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);
const COMPACTED: &str = "required revision has been compacted";
const FUTURE: &str = "required revision is a future revision";

/// `(value, version, create_revision, mod_revision)` of `key` at
/// `revision` (0: the latest), read on `client`; `None` when absent.
async fn at(client: &mut Client, key: &str, revision: i64) -> Option<(String, i64, i64, i64)> {
    let r = client
        .get(key, Some(GetOptions::new().with_revision(revision)))
        .await
        .unwrap_or_else(|e| panic!("get {key} at revision {revision}: {e}"));
    assert!(r.kvs.len() <= 1, "a point get returned {:?}", r.kvs);
    r.kvs.first().map(|kv| {
        let v = value_str(kv).to_string();
        (v, kv.version, kv.create_revision, kv.mod_revision)
    })
}

/// The error of a read of `key` at `revision`, which must fail.
async fn read_error(client: &mut Client, key: &str, revision: i64) -> String {
    match client
        .get(key, Some(GetOptions::new().with_revision(revision)))
        .await
    {
        Ok(r) => panic!("get {key} at revision {revision} succeeded: {r:?}"),
        Err(e) => {
            let status = e
                .status()
                .unwrap_or_else(|| panic!("not a gRPC status: {e}"));
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{e}");
            e.to_string()
        }
    }
}

/// Waits until every member applied the leader's commit index, then checks
/// that all hash the same store at the leader's revision; returns the
/// members' compact revision.
async fn assert_same_hash(cluster: &Cluster) -> i64 {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let status = cluster.status(leader).await.expect("status");
    let revision = status.header.expect("header").revision;
    for id in cluster.ids() {
        cluster
            .wait_applied(id, status.raft_index, CATCH_UP_TIMEOUT)
            .await;
    }
    let mut hashes = Vec::new();
    for id in cluster.ids() {
        let h = cluster
            .hash_kv(id, revision)
            .await
            .unwrap_or_else(|e| panic!("HashKV on member {id}: {e}"));
        assert_eq!(h.hash_revision, revision, "member {id}'s hash revision");
        hashes.push((h.hash, h.compact_revision));
    }
    eprintln!("HashKV at revision {revision}: (hash, compact revision) {hashes:x?}");
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "members hash differently at revision {revision}: {hashes:?}"
    );
    hashes[0].1
}

/// The leader and one follower.
async fn roles(cluster: &Cluster) -> (NodeId, NodeId) {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    (leader, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_tombstones_and_compaction_through_the_client() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, follower) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_follower = cluster.client(follower).await;

    // Three versions of k (one written through the follower).
    let mut revs = Vec::new();
    for (i, v) in ["v1", "v2", "v3"].into_iter().enumerate() {
        let client = if i == 1 {
            &mut on_follower
        } else {
            &mut on_leader
        };
        let r = client
            .put("k", v, Some(PutOptions::new().with_prev_key()))
            .await
            .expect("put");
        let prev = r.prev_kv.as_ref().map(|kv| value_str(kv).to_string());
        let want = (i > 0).then(|| format!("v{i}"));
        assert_eq!(prev, want, "prev_kv of put #{}", i + 1);
        revs.push(r.header.expect("header").revision);
    }
    let [r1, r2, r3] = revs[..] else {
        unreachable!()
    };
    assert!(r1 < r2 && r2 < r3, "revisions {revs:?}");
    for (i, &rev) in revs.iter().enumerate() {
        let version = i as i64 + 1;
        let want = Some((format!("v{version}"), version, r1, rev));
        assert_eq!(at(&mut on_follower, "k", rev).await, want, "k at {rev}");
        assert_eq!(at(&mut on_leader, "k", rev).await, want, "k at {rev}");
    }
    assert_eq!(at(&mut on_leader, "k", r1 - 1).await, None);

    // Delete: the tombstone hides k from the delete revision on.
    let r = on_follower
        .delete("k", Some(DeleteOptions::new().with_prev_key()))
        .await
        .expect("delete");
    assert_eq!(r.deleted, 1);
    let prev: Vec<&str> = r.prev_kvs.iter().map(value_str).collect();
    assert_eq!(prev, ["v3"]);
    let deleted_at = r.header.expect("header").revision;
    assert_eq!(deleted_at, r3 + 1);
    assert_eq!(at(&mut on_leader, "k", deleted_at).await, None);
    assert_eq!(at(&mut on_leader, "k", 0).await, None);
    assert_eq!(
        at(&mut on_follower, "k", deleted_at - 1).await,
        Some(("v3".into(), 3, r1, r3))
    );
    // Recreated: a new life, version 1 again.
    let r = on_leader.put("k", "v4", None).await.expect("put");
    let r4 = r.header.expect("header").revision;
    assert_eq!(
        at(&mut on_follower, "k", 0).await,
        Some(("v4".into(), 1, r4, r4))
    );

    // Compact at r2 (through a follower: compaction goes through Raft).
    on_follower.compact(r2, false).await.expect("compact");
    let e = read_error(&mut on_leader, "k", r1).await;
    assert!(
        e.contains(COMPACTED),
        "read below the compact revision: {e}"
    );
    let e = read_error(&mut on_follower, "k", r1).await;
    assert!(
        e.contains(COMPACTED),
        "read below the compact revision: {e}"
    );
    let e = read_error(&mut on_follower, "k", r4 + 1_000).await;
    assert!(e.contains(FUTURE), "read past the store revision: {e}");
    assert_eq!(
        at(&mut on_follower, "k", r2).await,
        Some(("v2".into(), 2, r1, r2)),
        "read at the compact revision"
    );
    assert_eq!(
        at(&mut on_leader, "k", r3).await,
        Some(("v3".into(), 3, r1, r3))
    );
    // Compacting again at or below the compact revision is refused.
    let e = on_leader
        .compact(r2, false)
        .await
        .expect_err("compact again");
    assert!(e.to_string().contains(COMPACTED), "{e}");
    let e = on_leader
        .compact(r4 + 1_000, false)
        .await
        .expect_err("compact ahead");
    assert!(e.to_string().contains(FUTURE), "{e}");
    assert_eq!(assert_same_hash(&cluster).await, r2);

    // A physical compaction answers once the versions are gone.
    on_leader.compact(r3, true).await.expect("physical compact");
    let e = read_error(&mut on_follower, "k", r2).await;
    assert!(e.contains(COMPACTED), "{e}");
    assert_eq!(
        at(&mut on_follower, "k", r3).await,
        Some(("v3".into(), 3, r1, r3))
    );
    assert_eq!(assert_same_hash(&cluster).await, r3);
}

struct Etcdctl {
    bin: PathBuf,
    /// `host:port` endpoints (see tests/etcdctl.rs on why not URLs).
    endpoints: String,
}

impl Etcdctl {
    fn output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--command-timeout=10s")
            .arg("--dial-timeout=5s")
            .args(args);
        run_bounded(&mut cmd, ETCDCTL_TIMEOUT)
    }

    /// Runs `etcdctl <args>`, which must succeed; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Runs `etcdctl <args>`, which must fail; returns its stderr.
    fn fail(&self, args: &[&str]) -> String {
        let out = self.output(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "etcdctl {args:?} succeeded:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_tombstones_and_compaction_through_etcdctl() {
    let Some(bin) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl not found (install Debian's etcd-client or set $ETCDCTL)");
        return;
    };
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, _) = roles(&cluster).await;
    let ctl = Etcdctl {
        bin,
        endpoints: cluster
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    // Revisions come from the harness's client: etcdctl's simple output
    // does not show them.
    let mut client = cluster.client(leader).await;
    let mod_revision = |r: skiff_tests::client::RangeResponse| r.kvs[0].mod_revision;

    assert_eq!(ctl.run(&["put", "k", "v1"]).trim(), "OK");
    let r1 = mod_revision(client.get("k", None).await.expect("get"));
    assert_eq!(ctl.run(&["put", "--prev-kv", "k", "v2"]), "OK\nk\nv1\n");
    let r2 = mod_revision(client.get("k", None).await.expect("get"));
    assert_eq!(ctl.run(&["put", "--prev-kv", "k", "v3"]), "OK\nk\nv2\n");
    let r3 = mod_revision(client.get("k", None).await.expect("get"));
    assert!(r1 < r2 && r2 < r3, "revisions {r1} {r2} {r3}");
    for (rev, v) in [(r1, "v1"), (r2, "v2"), (r3, "v3")] {
        assert_eq!(
            ctl.run(&["get", "k", &format!("--rev={rev}")]),
            format!("k\n{v}\n"),
            "k at {rev}"
        );
    }

    // Delete with prev_kv; the tombstone from the delete revision on.
    assert_eq!(ctl.run(&["del", "--prev-kv", "k"]), "1\nk\nv3\n");
    let deleted_at = client
        .get("k", None)
        .await
        .expect("get")
        .header
        .expect("header")
        .revision;
    assert_eq!(deleted_at, r3 + 1);
    assert_eq!(ctl.run(&["get", "k", &format!("--rev={deleted_at}")]), "");
    assert_eq!(ctl.run(&["get", "k"]), "");
    assert_eq!(
        ctl.run(&["get", "k", &format!("--rev={}", deleted_at - 1)]),
        "k\nv3\n"
    );

    // Compact at r2: below fails, at r2 works, past the store fails.
    assert_eq!(
        ctl.run(&["compact", &r2.to_string()]).trim(),
        format!("compacted revision {r2}")
    );
    let e = ctl.fail(&["get", "k", &format!("--rev={r1}")]);
    assert!(
        e.contains(COMPACTED),
        "etcdctl get below the compact revision: {e}"
    );
    let e = ctl.fail(&["get", "k", &format!("--rev={}", deleted_at + 1_000)]);
    assert!(
        e.contains(FUTURE),
        "etcdctl get past the store revision: {e}"
    );
    assert_eq!(ctl.run(&["get", "k", &format!("--rev={r2}")]), "k\nv2\n");
    assert_eq!(assert_same_hash(&cluster).await, r2);

    // A physical compaction answers.
    assert_eq!(
        ctl.run(&["compact", "--physical", &r3.to_string()]).trim(),
        format!("compacted revision {r3}")
    );
    let e = ctl.fail(&["get", "k", &format!("--rev={r2}")]);
    assert!(e.contains(COMPACTED), "{e}");
    assert_eq!(ctl.run(&["get", "k", &format!("--rev={r3}")]), "k\nv3\n");
    assert_eq!(assert_same_hash(&cluster).await, r3);
}
