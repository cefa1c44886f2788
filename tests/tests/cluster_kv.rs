//! The etcd v3 KV API of a 3-node cluster of `skiff serve` processes,
//! driven by the harness's client (`skiff_tests::client`): put, get, delete and txn; writes sent
//! to followers (forwarded to the leader); linearizable reads on another
//! member; response headers; member list; `skiff status`.

use std::time::Duration;

use skiff_tests::client::{
    key_str, op_responses, Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions,
    ResponseHeader, Txn, TxnOp, TxnOpResponse,
};
use skiff_tests::{Cluster, ClusterOptions, NodeId};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

fn header(h: Option<&ResponseHeader>) -> (i64, u64) {
    let h = h.expect("every response carries a header");
    assert!(h.revision > 0, "header revision {} not > 0", h.revision);
    assert!(h.raft_term > 0, "header raft_term {} not > 0", h.raft_term);
    (h.revision, h.raft_term)
}

async fn value_of(client: &mut Client, key: &str) -> Option<String> {
    let r = client.get(key, None).await.expect("get");
    header(r.header.as_ref());
    assert!(r.kvs.len() <= 1, "a point get returned {:?}", r.kvs);
    r.kvs
        .first()
        .map(|kv| String::from_utf8(kv.value.to_vec()).expect("utf-8 value"))
}

async fn put(client: &mut Client, key: &str, value: &str) -> i64 {
    let r = client.put(key, value, None).await.expect("put");
    header(r.header.as_ref()).0
}

/// The leader and the two followers.
async fn roles(cluster: &Cluster) -> (NodeId, NodeId, NodeId) {
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let followers: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    (leader, followers[0], followers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_across_members() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, f1, f2) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_f1 = cluster.client(f1).await;
    let mut on_f2 = cluster.client(f2).await;

    // A write sent to a follower is forwarded; a linearizable read on the
    // other follower sees it at once.
    let rev1 = put(&mut on_f1, "greeting", "hello").await;
    assert_eq!(
        value_of(&mut on_f2, "greeting").await.as_deref(),
        Some("hello")
    );
    assert_eq!(
        value_of(&mut on_leader, "greeting").await.as_deref(),
        Some("hello")
    );

    // Overwrite through the leader; read on the follower that forwarded.
    let r = on_leader
        .put("greeting", "hi", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put with prev_kv");
    let (rev2, _) = header(r.header.as_ref());
    assert!(rev2 > rev1, "revision went from {rev1} to {rev2}");
    let prev = r.prev_kv.as_ref().expect("prev_kv was asked for");
    assert_eq!(prev.value, "hello");
    assert_eq!(
        value_of(&mut on_f1, "greeting").await.as_deref(),
        Some("hi")
    );

    // The stored key's metadata.
    let r = on_f2.get("greeting", None).await.expect("get");
    let kv = &r.kvs[0];
    assert_eq!(kv.create_revision, rev1);
    assert_eq!(kv.mod_revision, rev2);
    assert_eq!(kv.version, 2);
    assert!(header(r.header.as_ref()).0 >= rev2);

    // Prefix ranges, count_only, keys_only, limit, serializable.
    for (k, v) in [
        ("fruit/apple", "red"),
        ("fruit/banana", "yellow"),
        ("fruit/cherry", "dark"),
    ] {
        put(&mut on_f2, k, v).await;
    }
    put(&mut on_f1, "fruitless", "x").await;
    let r = on_f1
        .get("fruit/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("prefix get");
    let keys: Vec<&str> = r.kvs.iter().map(key_str).collect();
    assert_eq!(keys, ["fruit/apple", "fruit/banana", "fruit/cherry"]);
    assert_eq!(r.count, 3);
    assert_eq!(r.kvs[1].value, "yellow");

    let r = on_leader
        .get(
            "fruit/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count_only");
    assert_eq!(r.count, 3);
    assert!(r.kvs.is_empty(), "count_only returned {:?}", r.kvs);

    let r = on_f2
        .get(
            "fruit/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("keys_only");
    assert_eq!(r.kvs.len(), 3);
    assert!(
        r.kvs.iter().all(|kv| kv.value.is_empty()),
        "keys_only returned values"
    );
    assert_eq!(r.kvs[2].key, "fruit/cherry");

    let r = on_f1
        .get(
            "fruit/",
            Some(GetOptions::new().with_prefix().with_limit(2)),
        )
        .await
        .expect("limit");
    assert_eq!(r.kvs.len(), 2);
    assert_eq!(r.count, 3);
    assert!(r.more);

    // A serializable read is served from the member's own state; after a
    // linearizable read there it has everything.
    let r = on_f2
        .get(
            "fruit/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .expect("serializable get");
    assert_eq!(r.kvs.len(), 3);

    // Deletes: one key through a follower, then the rest of the prefix.
    let r = on_f1
        .delete("fruit/banana", Some(DeleteOptions::new().with_prev_key()))
        .await
        .expect("delete");
    assert_eq!(r.deleted, 1);
    assert_eq!(r.prev_kvs[0].value, "yellow");
    header(r.header.as_ref());
    assert_eq!(value_of(&mut on_f2, "fruit/banana").await, None);
    let r = on_f2
        .delete("fruit/", Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("prefix delete");
    assert_eq!(r.deleted, 2);
    let r = on_leader
        .get("fruit", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get after delete");
    let keys: Vec<&str> = r.kvs.iter().map(key_str).collect();
    assert_eq!(keys, ["fruitless"]);
    let r = on_leader.delete("no-such-key", None).await.expect("delete");
    assert_eq!(r.deleted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_compares_and_branches() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, f1, f2) = roles(&cluster).await;
    let mut on_leader = cluster.client(leader).await;
    let mut on_f1 = cluster.client(f1).await;
    let mut on_f2 = cluster.client(f2).await;

    let created = put(&mut on_leader, "account", "100").await;

    // Compare on value; success branch writes (sent to a follower).
    let txn = Txn::new()
        .when([Compare::value("account", CompareOp::Equal, "100")])
        .and_then([
            TxnOp::put("account", "90", None),
            TxnOp::put("ledger", "-10", None),
        ])
        .or_else([TxnOp::get("account", None)]);
    let r = on_f1.txn(txn).await.expect("txn");
    let (rev, _) = header(r.header.as_ref());
    assert!(r.succeeded);
    assert_eq!(r.responses.len(), 2);
    assert!(matches!(op_responses(&r)[0], TxnOpResponse::ResponsePut(_)));
    assert_eq!(value_of(&mut on_f2, "account").await.as_deref(), Some("90"));
    assert_eq!(value_of(&mut on_f2, "ledger").await.as_deref(), Some("-10"));

    // The same compare now fails: the failure branch runs, nothing changes.
    let txn = Txn::new()
        .when([Compare::value("account", CompareOp::Equal, "100")])
        .and_then([TxnOp::put("account", "80", None)])
        .or_else([TxnOp::get("account", None)]);
    let r = on_f2.txn(txn).await.expect("txn");
    assert!(!r.succeeded);
    match &op_responses(&r)[..] {
        [TxnOpResponse::ResponseRange(g)] => assert_eq!(g.kvs[0].value, "90"),
        other => panic!("expected one get response, got {other:?}"),
    }
    assert_eq!(
        value_of(&mut on_leader, "account").await.as_deref(),
        Some("90")
    );

    // Version: "account" was written twice.
    let txn = Txn::new()
        .when([Compare::version("account", CompareOp::Equal, 2)])
        .and_then([TxnOp::put("account", "75", None)]);
    let r = on_leader.txn(txn).await.expect("txn");
    assert!(r.succeeded);

    // Mod revision: the old one fails, the current one succeeds.
    let current = on_f1.get("account", None).await.expect("get").kvs[0].mod_revision;
    assert!(
        current > rev.max(created),
        "mod revision {current} not past {rev}"
    );
    let stale = Txn::new()
        .when([Compare::mod_revision("account", CompareOp::Equal, created)])
        .and_then([TxnOp::delete("account", None)])
        .or_else([TxnOp::put("stale", "yes", None)]);
    let r = on_f1.txn(stale).await.expect("txn");
    assert!(!r.succeeded);
    assert_eq!(value_of(&mut on_f2, "stale").await.as_deref(), Some("yes"));
    assert_eq!(value_of(&mut on_f2, "account").await.as_deref(), Some("75"));
    let fresh = Txn::new()
        .when([
            Compare::mod_revision("account", CompareOp::Equal, current),
            Compare::version("ledger", CompareOp::Greater, 0),
        ])
        .and_then([TxnOp::delete("account", None)]);
    let r = on_f2.txn(fresh).await.expect("txn");
    assert!(r.succeeded);
    match &op_responses(&r)[..] {
        [TxnOpResponse::ResponseDeleteRange(d)] => assert_eq!(d.deleted, 1),
        other => panic!("expected one delete response, got {other:?}"),
    }
    assert_eq!(value_of(&mut on_leader, "account").await, None);

    // A missing key has version 0.
    let txn = Txn::new()
        .when([Compare::version("account", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("account", "reopened", None)]);
    assert!(on_f1.txn(txn).await.expect("txn").succeeded);
    assert_eq!(
        value_of(&mut on_f2, "account").await.as_deref(),
        Some("reopened")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_and_skiff_status() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (leader, term) = cluster.wait_leader(LEADER_TIMEOUT).await;

    let mut client = cluster.client(leader).await;
    let members = client.member_list().await.expect("member list");
    let mut ids: Vec<u64> = members.members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, cluster.ids());
    for m in &members.members {
        assert_eq!(m.client_ur_ls, [cluster.endpoint(m.id)], "member {}", m.id);
        assert!(!m.is_learner);
    }

    for id in cluster.ids() {
        let s = cluster.status(id).await.expect("status");
        assert_eq!(s.leader, leader, "member {id}'s leader");
        assert!(s.raft_term >= term);
        assert_eq!(s.header.expect("header").member_id, id);
    }

    // `skiff status` prints one row per endpoint and a summary line.
    let endpoints = cluster.endpoints().join(",");
    let out = cluster.skiff(&["status", "--endpoints", &endpoints]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skiff status failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert_eq!(
        summary,
        format!("members=3 reachable=3 leader={leader:x}"),
        "{stdout}"
    );
    let leader_row = stdout
        .lines()
        .find(|l| l.starts_with(&cluster.endpoint(leader)))
        .unwrap_or_else(|| panic!("no row for the leader's endpoint in\n{stdout}"));
    // ENDPOINT, MEMBER ID, LEADER ID, ROLE, TERM, INDEX, APPLIED, LAG,
    // IS LEADER, IS LEARNER, ALARMS.
    let cols: Vec<&str> = leader_row.split_whitespace().collect();
    assert_eq!(cols[3], "leader", "{leader_row}");
    assert_eq!(&cols[8..], ["true", "false", "-"], "{leader_row}");
    for id in cluster.ids().into_iter().filter(|&id| id != leader) {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&cluster.endpoint(id)))
            .unwrap_or_else(|| panic!("no row for member {id} in\n{stdout}"));
        assert!(row.contains(" follower "), "{row}");
    }

    // `skiff check consistency`: every member's HashKV at one revision.
    let out = cluster.skiff(&["check", "consistency", "--endpoints", &endpoints]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skiff check consistency failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict = stdout.lines().last().unwrap_or_default();
    assert!(
        verdict.starts_with("revision=") && verdict.ends_with("members=3 consistent"),
        "{stdout}"
    );
    let hashes: std::collections::BTreeSet<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("http://"))
        .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
        .collect();
    assert_eq!(hashes.len(), 1, "one hash on every member:\n{stdout}");
    // A member that does not answer makes the check fail.
    let unreachable = format!("{endpoints},127.0.0.1:1");
    let out = cluster.skiff(&["check", "consistency", "--endpoints", &unreachable]);
    assert!(
        !out.status.success(),
        "an unreachable member fails the check"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("incomplete"));
}
