//! Alarms and the space quota end to end, on a 3-node cluster of `skiff
//! serve` processes started with a tiny `--quota-backend-bytes`, with etcd's
//! behaviour as the reference (server/etcdserver/api/v3rpc/quota.go,
//! server/etcdserver/apply/capped.go, etcdctl's `alarm list` / `alarm
//! disarm`):
//!
//! * puts through a follower until one is refused with etcd's "etcdserver:
//!   mvcc: database space exceeded" (RESOURCE_EXHAUSTED), at the point the
//!   quota predicts; the follower raised NOSPACE under its own id, and every
//!   member lists it (Alarm RPC, Status errors, `etcdctl alarm list`);
//! * while it is active every member refuses Put, a Txn with a put and
//!   LeaseGrant, and serves Range, a Txn without puts and DeleteRange;
//!   nothing acknowledged is lost;
//! * the alarm survives a SIGKILL of the whole cluster (it is in the
//!   snapshots and the log);
//! * delete + compact free the space, `etcdctl alarm disarm` (or the RPC)
//!   clears the alarm, writes work again on every member;
//! * the Alarm RPC raises, lists (filtered by type and member) and disarms
//!   alarms of any member.
//!
//! The `etcdctl` steps are skipped, with the reason printed, where etcdctl
//! is not installed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction;
use skiff_kv::pb::etcdserverpb::AlarmType;
use skiff_kv::store::{KEY_OVERHEAD_BYTES, VERSION_OVERHEAD_BYTES};
use skiff_tests::client::{Client, Compare, CompareOp, Error, GetOptions, Txn, TxnOp};
use skiff_tests::{etcdctl_path, poll_until, run_bounded, Cluster, ClusterOptions, NodeId};
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// The cluster's space quota: about 60 of the puts below.
const QUOTA: u64 = 256 * 1024;
const VALUE_BYTES: usize = 4000;
const NOSPACE_TEXT: &str = "etcdserver: mvcc: database space exceeded";
const NOSPACE: i32 = AlarmType::Nospace as i32;
const CORRUPT: i32 = AlarmType::Corrupt as i32;

fn fill_key(i: usize) -> String {
    format!("fill/{i:05}")
}

fn fill_value(i: usize) -> Vec<u8> {
    let mut v = format!("{i:05}:").into_bytes();
    v.resize(VALUE_BYTES, b'.');
    v
}

/// Asserts that `r` is etcd's NOSPACE refusal.
fn assert_nospace<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    let e = r.expect_err(&format!("{what}: refused while NOSPACE is active"));
    let status = e
        .status()
        .unwrap_or_else(|| panic!("{what}: a gRPC status, not {e}"));
    assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {e}");
    assert_eq!(status.message(), NOSPACE_TEXT, "{what}");
}

struct Etcdctl {
    bin: PathBuf,
}

impl Etcdctl {
    /// Runs `etcdctl --endpoints=<endpoint> <args>`; returns (success,
    /// stdout, stderr).
    fn run(&self, endpoint: &str, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--command-timeout=10s")
            .arg("--dial-timeout=5s")
            .args(args);
        let out = run_bounded(&mut cmd, ETCDCTL_TIMEOUT);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, endpoint: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.run(endpoint, args);
        assert!(
            ok,
            "etcdctl {args:?} on {endpoint} failed:\nstdout: {out}\nstderr: {err}"
        );
        out
    }
}

/// Trims each line (etcdctl prints an AlarmMember with a trailing space).
fn lines(s: &str) -> Vec<String> {
    s.lines().map(|l| l.trim().to_string()).collect()
}

/// Waits until every member lists exactly `want` (linearizable GET).
async fn wait_alarms(cluster: &Cluster, want: &[(u64, i32)]) {
    for id in cluster.ids() {
        poll_until(
            &format!("member {id} to list alarms {want:?}"),
            APPLY_TIMEOUT,
            || async move {
                let mut c = cluster.client(id).await;
                let listed = c.alarm_list().await.ok()?;
                (listed == want).then_some(())
            },
        )
        .await;
    }
}

/// Every acknowledged fill key reads back with its value from `id`.
async fn check_acked(cluster: &Cluster, id: NodeId, acked: usize) {
    let mut c = cluster.client(id).await;
    let r = c
        .get("fill/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_or_else(|e| panic!("range on member {id}: {e}"));
    assert_eq!(r.kvs.len(), acked, "fill keys on member {id}");
    for (i, kv) in r.kvs.iter().enumerate() {
        assert_eq!(kv.key, fill_key(i + 1).as_bytes(), "member {id}");
        assert_eq!(kv.value, fill_value(i + 1), "member {id}, key {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_end_to_end() {
    let etcdctl = match etcdctl_path() {
        Some(bin) => Some(Etcdctl { bin }),
        None => {
            eprintln!(
                "etcdctl steps SKIPPED: etcdctl not found (install Debian's etcd-client or set \
                 $ETCDCTL)"
            );
            None
        }
    };
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .arg("--quota-backend-bytes", QUOTA)
            // Snapshots (and their alarms) every few entries, recorded in
            // the WAL soon after: a restart starts from one.
            .arg("--snapshot-entries", 20)
            .arg("--snapshot-catchup-entries", 10),
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let ids = cluster.ids();
    let writer: NodeId = ids.iter().copied().find(|&id| id != leader).unwrap();

    // 1. Fill through a follower until refused.
    let per_put =
        (fill_key(1).len() + VALUE_BYTES) as u64 + VERSION_OVERHEAD_BYTES + KEY_OVERHEAD_BYTES;
    let mut client = cluster.client(writer).await;
    let mut acked = 0usize;
    let refused = loop {
        let i = acked + 1;
        assert!(i < 10_000, "no refusal after {acked} puts");
        match client.put(fill_key(i), fill_value(i), None).await {
            Ok(_) => acked = i,
            Err(e) => break e,
        }
    };
    eprintln!("{acked} puts of {per_put} B acknowledged before the refusal: {refused}");
    assert_nospace::<()>(Err(refused), "the put past the quota");
    // Refused exactly when the next put would pass the quota.
    assert!(acked as u64 * per_put <= QUOTA, "{acked} puts");
    assert!((acked as u64 + 1) * per_put > QUOTA, "{acked} puts");

    // 2. The follower raised NOSPACE under its id; every member lists it.
    let alarm = [(writer, NOSPACE)];
    wait_alarms(&cluster, &alarm).await;
    // The alarm's log entry is at or below this index.
    let alarm_index = cluster.status(writer).await.unwrap().raft_applied_index;
    let text = format!("memberID:{writer} alarm:NOSPACE");
    for &id in &ids {
        let s = cluster.status(id).await.unwrap();
        assert_eq!(
            s.errors,
            std::slice::from_ref(&text),
            "Status errors of member {id}"
        );
        assert!(s.db_size as u64 <= QUOTA, "member {id}: {s:?}");
    }

    // 3. Every member refuses what grows the store and serves the rest.
    for &id in &ids {
        let mut c = cluster.client(id).await;
        assert_nospace(c.put("one/more", "v", None).await, "put");
        assert_nospace(c.put(fill_key(1), "smaller", None).await, "overwrite");
        let txn = Txn::new()
            .when([Compare::version("one/more", CompareOp::Equal, 0)])
            .and_then([TxnOp::get("fill/00001", None)])
            .or_else([TxnOp::put("one/more", "v", None)]);
        assert_nospace(c.txn(txn).await, "txn with a put on a branch");
        assert_nospace(c.lease_grant(60, None).await, "lease grant");
        let read_only = Txn::new()
            .when([Compare::version("fill/00001", CompareOp::Greater, 0)])
            .and_then([TxnOp::get("fill/00001", None)]);
        let r = c.txn(read_only).await.expect("a txn without puts");
        assert!(r.succeeded);
        // DeleteRange goes on (of a key that is not there: nothing freed).
        c.delete(format!("absent/{id}"), None)
            .await
            .expect("delete under NOSPACE");
        check_acked(&cluster, id, acked).await;
    }
    if let Some(ctl) = &etcdctl {
        for &id in &ids {
            let endpoint = cluster.endpoint(id);
            let out = ctl.ok(&endpoint, &["alarm", "list"]);
            assert_eq!(
                lines(&out),
                std::slice::from_ref(&text),
                "etcdctl alarm list on {id}"
            );
            let (ok, out, err) = ctl.run(&endpoint, &["put", "from/etcdctl", "v"]);
            assert!(!ok, "etcdctl put under NOSPACE: {out}");
            assert!(err.contains(NOSPACE_TEXT), "etcdctl put: {err}");
        }
    }

    // 4. Log entries after the alarm (deletes of absent keys) so that the
    // snapshots hold it, then the whole cluster is SIGKILLed and restarted.
    for i in 0..60 {
        client
            .delete(format!("absent/{i}"), None)
            .await
            .expect("delete");
    }
    for &id in &ids {
        cluster.kill(id);
    }
    for &id in &ids {
        cluster.restart(id);
    }
    cluster.wait_leader(LEADER_TIMEOUT).await;
    wait_alarms(&cluster, &alarm).await;
    for &id in &ids {
        // It started from a snapshot taken after the alarm.
        let log = cluster.log_since_start(id);
        let restored = log
            .lines()
            .find(|l| l.contains("state restored from snapshot"))
            .unwrap_or_else(|| panic!("member {id} restarted from no snapshot"));
        let index: u64 = restored
            .split_whitespace()
            .find_map(|w| w.strip_prefix("index="))
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("no index in {restored:?}"));
        assert!(
            index > alarm_index,
            "member {id} restored the snapshot at {index}, the alarm is at or below {alarm_index}"
        );
        let mut c = cluster.client(id).await;
        assert_nospace(c.put("after/restart", "v", None).await, "put after restart");
        check_acked(&cluster, id, acked).await;
    }

    // 5. Free the space: delete, compact, wait until every member removed
    // the versions.
    let mut client = cluster.client(writer).await;
    let deleted = client
        .delete(
            "fill/",
            Some(skiff_tests::client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("delete under NOSPACE");
    assert_eq!(deleted.deleted, acked as i64);
    let revision = deleted.header.expect("a header").revision;
    client.compact(revision, true).await.expect("compact");
    for &id in &ids {
        let cluster = &cluster;
        poll_until(
            &format!("member {id} to free the space"),
            APPLY_TIMEOUT,
            || async move {
                let s = cluster.status(id).await.ok()?;
                ((s.db_size as u64) < QUOTA / 10).then_some(s.db_size)
            },
        )
        .await;
    }
    // Still refused: the alarm stays until disarmed (as etcd).
    assert_nospace(client.put("still", "no", None).await, "put before disarm");

    // 6. Disarm (etcdctl's way: list, then deactivate each).
    match &etcdctl {
        Some(ctl) => {
            let out = ctl.ok(&cluster.endpoint(leader), &["alarm", "disarm"]);
            assert_eq!(
                lines(&out),
                std::slice::from_ref(&text),
                "etcdctl alarm disarm"
            );
        }
        None => {
            let r = client
                .alarm(AlarmAction::Deactivate, writer, AlarmType::Nospace)
                .await
                .expect("disarm");
            assert_eq!(r.alarms.len(), 1);
        }
    }
    wait_alarms(&cluster, &[]).await;
    for &id in &ids {
        let s = cluster.status(id).await.unwrap();
        assert!(s.errors.is_empty(), "member {id}: {:?}", s.errors);
        let mut c = cluster.client(id).await;
        c.put(format!("again/{id}"), "yes", None)
            .await
            .unwrap_or_else(|e| panic!("put on member {id} after disarm: {e}"));
        c.lease_grant(60, None)
            .await
            .unwrap_or_else(|e| panic!("lease grant on member {id} after disarm: {e}"));
    }
    if let Some(ctl) = &etcdctl {
        assert!(ctl
            .ok(&cluster.endpoint(writer), &["alarm", "list"])
            .trim()
            .is_empty());
        assert_eq!(
            ctl.ok(&cluster.endpoint(writer), &["put", "from/etcdctl", "v"])
                .trim(),
            "OK"
        );
    }

    // 7. The Alarm RPC: raise for any member, list filtered, disarm.
    rpc_alarms(&cluster, &ids).await;
}

async fn rpc_alarms(cluster: &Cluster, ids: &[NodeId]) {
    let mut c: Client = cluster.client(ids[2]).await;
    let r = c
        .alarm(AlarmAction::Activate, 42, AlarmType::Nospace)
        .await
        .expect("activate");
    assert_eq!(
        r.alarms
            .iter()
            .map(|a| (a.member_id, a.alarm))
            .collect::<Vec<_>>(),
        [(42, NOSPACE)]
    );
    c.alarm(AlarmAction::Activate, 42, AlarmType::Corrupt)
        .await
        .expect("activate");
    c.alarm(AlarmAction::Activate, 7, AlarmType::Corrupt)
        .await
        .expect("activate");
    // NONE activates nothing (as etcd).
    let r = c
        .alarm(AlarmAction::Activate, 9, AlarmType::None)
        .await
        .expect("activate NONE");
    assert!(r.alarms.is_empty());
    wait_alarms(cluster, &[(7, CORRUPT), (42, NOSPACE), (42, CORRUPT)]).await;
    let listed = |r: skiff_kv::pb::etcdserverpb::AlarmResponse| {
        let mut v: Vec<(u64, i32)> = r.alarms.iter().map(|a| (a.member_id, a.alarm)).collect();
        v.sort_unstable();
        v
    };
    let mut other = cluster.client(ids[0]).await;
    let by_type = other
        .alarm(AlarmAction::Get, 0, AlarmType::Corrupt)
        .await
        .expect("get");
    assert_eq!(listed(by_type), [(7, CORRUPT), (42, CORRUPT)]);
    let by_member = other
        .alarm(AlarmAction::Get, 42, AlarmType::None)
        .await
        .expect("get");
    assert_eq!(listed(by_member), [(42, NOSPACE), (42, CORRUPT)]);
    let none = other
        .alarm(AlarmAction::Get, 8, AlarmType::None)
        .await
        .expect("get");
    assert!(none.alarms.is_empty());
    // NOSPACE from any member refuses writes on every member.
    for &id in ids {
        let mut c = cluster.client(id).await;
        assert_nospace(
            c.put("rpc", "v", None).await,
            "put under member 42's NOSPACE",
        );
    }
    // Disarm answers what it disarmed; a second time nothing.
    let r = other
        .alarm(AlarmAction::Deactivate, 42, AlarmType::Nospace)
        .await
        .expect("deactivate");
    assert_eq!(listed(r), [(42, NOSPACE)]);
    let r = other
        .alarm(AlarmAction::Deactivate, 42, AlarmType::Nospace)
        .await
        .expect("deactivate again");
    assert!(r.alarms.is_empty());
    wait_alarms(cluster, &[(7, CORRUPT), (42, CORRUPT)]).await;
    // CORRUPT alone refuses nothing here (see skiff_kv::store::alarm).
    for &id in ids {
        let mut c = cluster.client(id).await;
        c.put("rpc", format!("{id}"), None)
            .await
            .unwrap_or_else(|e| panic!("put on member {id} with only CORRUPT alarms: {e}"));
    }
    for (member, kind) in [(42, AlarmType::Corrupt), (7, AlarmType::Corrupt)] {
        other
            .alarm(AlarmAction::Deactivate, member, kind)
            .await
            .expect("deactivate");
    }
    wait_alarms(cluster, &[]).await;
}
