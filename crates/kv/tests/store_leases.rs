//! Leases in the MVCC store, checked against etcd's semantics
//! (`server/lease/lessor.go`, `server/storage/mvcc/kvstore_txn.go`,
//! `server/etcdserver/txn`): grants, attaching keys with Put, detaching
//! with Put and DeleteRange, compares on LEASE, atomicity of failed txns,
//! revocation (all keys at one revision), checkpoints, snapshots (format v3,
//! v2 still read, forged lease tables refused), compaction, the command
//! encoding of the state machine, and a random walk against a naive model.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use skiff_kv::machine::{
    decode_command, KvCommand, KvMachine, KvQuery, KvQueryResponse, KvResponse, LeaseInfo,
    LEASE_CHECKPOINT_MAX, TAG_LEASE_CHECKPOINT, TAG_LEASE_GRANT, TAG_LEASE_REVOKE,
};
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::response_op::Response;
use skiff_kv::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use skiff_kv::pb::mvccpb::event::EventType;
use skiff_kv::pb::mvccpb::KeyValue;
use skiff_kv::store::{KvError, KvStore, SnapshotError, LEASE_TTL_MAX};
use skiff_node::{Committed, StateMachine};

// ---------------------------------------------------------------------------
// Helpers

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put_req(req: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(req)),
    }
}

/// A Put of `key` = `value` attached to `lease` (0: none).
fn put_op(key: &str, value: &str, lease: i64) -> RequestOp {
    put_req(PutRequest {
        key: b(key),
        value: b(value),
        lease,
        ..Default::default()
    })
}

fn del_op(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: b(key),
            range_end: b(range_end),
            prev_kv: true,
        })),
    }
}

/// A Range of `[key, range_end)` at `revision` (0: current).
fn range_op(key: &str, range_end: &str, revision: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: b(key),
            range_end: b(range_end),
            revision,
            ..Default::default()
        })),
    }
}

fn txn_op(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(TxnRequest {
            compare,
            success,
            failure,
        })),
    }
}

fn cmp_lease(key: &str, range_end: &str, result: CompareResult, lease: i64) -> Compare {
    Compare {
        result: result as i32,
        target: CompareTarget::Lease as i32,
        key: b(key),
        range_end: b(range_end),
        target_union: Some(TargetUnion::Lease(lease)),
    }
}

fn all_at(store: &KvStore, revision: i64) -> Vec<KeyValue> {
    store
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        })
        .unwrap()
        .kvs
}

/// The live key `key`, if any.
fn get(store: &KvStore, key: &str) -> Option<KeyValue> {
    store
        .range(&RangeRequest {
            key: b(key),
            ..Default::default()
        })
        .unwrap()
        .kvs
        .pop()
}

/// The lease `key` is attached to (None: no live key).
fn lease_of(store: &KvStore, key: &str) -> Option<i64> {
    get(store, key).map(|kv| kv.lease)
}

/// The keys of lease `id` (None: no such lease).
fn keys_of(store: &KvStore, id: i64) -> Option<Vec<String>> {
    store.lease(id).map(|l| {
        assert_eq!(l.key_count(), l.keys().count());
        l.keys()
            .map(|k| String::from_utf8(k.to_vec()).unwrap())
            .collect()
    })
}

/// Every lease as (id, ttl, remaining, keys).
type LeaseRow = (i64, i64, i64, Vec<Vec<u8>>);

fn lease_table(store: &KvStore) -> Vec<LeaseRow> {
    let rows: Vec<LeaseRow> = store
        .leases()
        .map(|(id, l)| {
            (
                id,
                l.ttl,
                l.remaining,
                l.keys().map(|k| k.to_vec()).collect(),
            )
        })
        .collect();
    assert_eq!(rows.len(), store.lease_count());
    assert!(
        rows.windows(2).all(|w| w[0].0 < w[1].0),
        "leases() in id order"
    );
    rows
}

fn snapshot_of(store: &KvStore) -> Vec<u8> {
    let mut out = Vec::new();
    let info = store.write_snapshot(&mut out).unwrap();
    assert_eq!(info.bytes, out.len() as u64);
    assert_eq!(info.crc32c, store.digest());
    out
}

fn read(bytes: &[u8]) -> Result<KvStore, SnapshotError> {
    KvStore::read_snapshot(&mut Cursor::new(bytes))
}

/// Writes `store` and reads it back: equal, invariants hold, the same bytes
/// again.
fn round_trip(store: &KvStore) -> KvStore {
    let bytes = snapshot_of(store);
    let back = read(&bytes).unwrap();
    back.check_invariants();
    assert_eq!(&back, store);
    assert_eq!(lease_table(&back), lease_table(store));
    assert_eq!(back.digest(), store.digest());
    assert_eq!(snapshot_of(&back), bytes, "reads back exactly");
    back
}

/// A store and the log index of the next entry; checks invariants and the
/// applied index after every step.
struct Harness {
    store: KvStore,
    index: u64,
}

impl Harness {
    fn new() -> Self {
        Harness {
            store: KvStore::new(),
            index: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn after(&self) {
        self.store.check_invariants();
        assert_eq!(self.store.applied_index(), self.index);
    }

    fn apply(&mut self, op: RequestOp) -> Result<ResponseOp, KvError> {
        let index = self.next();
        let result = self.store.apply(index, &op);
        self.after();
        result
    }

    fn put(&mut self, key: &str, value: &str, lease: i64) -> PutResponse {
        self.put_with(PutRequest {
            key: b(key),
            value: b(value),
            lease,
            ..Default::default()
        })
        .unwrap()
    }

    fn put_with(&mut self, req: PutRequest) -> Result<PutResponse, KvError> {
        self.apply(put_req(req)).map(|r| match r.response {
            Some(Response::ResponsePut(r)) => r,
            other => panic!("not a put response: {other:?}"),
        })
    }

    fn delete(&mut self, key: &str, range_end: &str) -> DeleteRangeResponse {
        match self.apply(del_op(key, range_end)).unwrap().response {
            Some(Response::ResponseDeleteRange(r)) => r,
            other => panic!("not a delete response: {other:?}"),
        }
    }

    fn txn(&mut self, op: RequestOp) -> Result<TxnResponse, KvError> {
        self.apply(op).map(|r| match r.response {
            Some(Response::ResponseTxn(r)) => r,
            other => panic!("not a txn response: {other:?}"),
        })
    }

    fn grant(&mut self, id: i64, ttl: i64) -> Result<(), KvError> {
        let index = self.next();
        let result = self.store.lease_grant(index, id, ttl);
        self.after();
        result
    }

    fn revoke(&mut self, id: i64) -> Result<i64, KvError> {
        let index = self.next();
        let result = self.store.lease_revoke(index, id);
        self.after();
        result
    }

    fn checkpoint(&mut self, remaining: &[(i64, i64)]) {
        let index = self.next();
        self.store.lease_checkpoint(index, remaining);
        self.after();
    }

    fn compact(&mut self, revision: i64) -> Result<(), KvError> {
        let index = self.next();
        let result = self.store.compact(index, revision);
        self.after();
        result
    }

    /// A copy of the store as it is now, to compare with the store after a
    /// step that must change nothing but the applied index.
    fn before(&self) -> KvStore {
        self.store.clone()
    }

    /// Asserts that only the applied index moved since `before`.
    fn unchanged_since(&self, mut before: KvStore) {
        before.mark_applied(self.index);
        assert_eq!(self.store, before, "the failed step changed the store");
        assert_eq!(lease_table(&self.store), lease_table(&before));
        assert_eq!(self.store.digest(), before.digest());
    }
}

// ---------------------------------------------------------------------------
// Grant

#[test]
fn grant_checks_the_id_the_ttl_and_duplicates() {
    let mut h = Harness::new();
    h.put("k", "v", 0);
    let revision = h.store.revision();

    // id 0 is "no lease"; a negative id is never granted either.
    for id in [0, -1, i64::MIN] {
        let before = h.before();
        assert_eq!(h.grant(id, 10), Err(KvError::LeaseNotFound), "id {id}");
        h.unchanged_since(before);
    }
    let before = h.before();
    assert_eq!(
        h.grant(1, LEASE_TTL_MAX + 1),
        Err(KvError::LeaseTtlTooLarge)
    );
    h.unchanged_since(before);
    let before = h.before();
    assert_eq!(h.grant(1, i64::MAX), Err(KvError::LeaseTtlTooLarge));
    h.unchanged_since(before);
    assert_eq!(h.store.lease_count(), 0);

    // The largest TTL is fine.
    h.grant(1, LEASE_TTL_MAX).unwrap();
    let l = h.store.lease(1).unwrap();
    assert_eq!((l.ttl, l.remaining, l.key_count()), (LEASE_TTL_MAX, 0, 0));

    // A duplicate is refused and the first grant is kept as it was.
    let before = h.before();
    assert_eq!(h.grant(1, 5), Err(KvError::LeaseExists));
    h.unchanged_since(before);
    assert_eq!(h.store.lease(1).unwrap().ttl, LEASE_TTL_MAX);
    // etcd checks the TTL before looking the id up.
    let before = h.before();
    assert_eq!(
        h.grant(1, LEASE_TTL_MAX + 1),
        Err(KvError::LeaseTtlTooLarge)
    );
    h.unchanged_since(before);

    h.grant(i64::MAX, 7).unwrap();
    h.grant(2, 30).unwrap();
    assert_eq!(h.store.lease_count(), 3);
    assert_eq!(
        lease_table(&h.store),
        vec![
            (1, LEASE_TTL_MAX, 0, vec![]),
            (2, 30, 0, vec![]),
            (i64::MAX, 7, 0, vec![]),
        ]
    );
    // Granting never writes a revision.
    assert_eq!(h.store.revision(), revision);
    assert_eq!(get(&h.store, "k").unwrap().lease, 0);
    round_trip(&h.store);
}

#[test]
fn a_ttl_below_one_is_raised_and_still_snapshots() {
    // etcd raises a TTL below the minimum to the minimum; the store's floor
    // is 1 s (a snapshot holds TTLs in 1 ..= LEASE_TTL_MAX).
    let mut h = Harness::new();
    h.grant(1, 0).unwrap();
    h.grant(2, -100).unwrap();
    h.grant(3, i64::MIN).unwrap();
    h.grant(4, 1).unwrap();
    for id in 1..=4 {
        let l = h.store.lease(id).unwrap();
        assert_eq!(l.ttl, 1, "lease {id}");
        assert_eq!(l.remaining, 0);
    }
    h.checkpoint(&[(1, 5), (2, -5), (4, 1)]);
    assert_eq!(h.store.lease(1).unwrap().remaining, 1);
    assert_eq!(h.store.lease(2).unwrap().remaining, 0);
    assert_eq!(h.store.lease(4).unwrap().remaining, 1);
    round_trip(&h.store);
}

// ---------------------------------------------------------------------------
// Put and DeleteRange

#[test]
fn put_attaches_moves_keeps_and_detaches() {
    let mut h = Harness::new();
    h.grant(1, 60).unwrap();
    h.grant(2, 60).unwrap();
    assert_eq!(h.store.revision(), 1);

    // Attach.
    let r = h.put("a", "v1", 1);
    assert_eq!(r.header.unwrap().revision, 2);
    assert_eq!(lease_of(&h.store, "a"), Some(1));
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["a"]);
    assert_eq!(keys_of(&h.store, 2).unwrap(), Vec::<String>::new());

    // Move to another lease; prev_kv shows the old attachment.
    let r = h
        .put_with(PutRequest {
            key: b("a"),
            value: b("v2"),
            lease: 2,
            prev_kv: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.prev_kv.unwrap().lease, 1);
    assert_eq!(lease_of(&h.store, "a"), Some(2));
    assert_eq!(keys_of(&h.store, 1).unwrap(), Vec::<String>::new());
    assert_eq!(keys_of(&h.store, 2).unwrap(), ["a"]);

    // ignore_lease keeps the lease, takes the new value.
    h.put_with(PutRequest {
        key: b("a"),
        value: b("v3"),
        ignore_lease: true,
        ..Default::default()
    })
    .unwrap();
    let kv = get(&h.store, "a").unwrap();
    assert_eq!((kv.value, kv.lease, kv.version), (b("v3"), 2, 3));
    assert_eq!(keys_of(&h.store, 2).unwrap(), ["a"]);

    // ignore_value with a lease: keeps the value, moves the key.
    h.put_with(PutRequest {
        key: b("a"),
        lease: 1,
        ignore_value: true,
        ..Default::default()
    })
    .unwrap();
    let kv = get(&h.store, "a").unwrap();
    assert_eq!((kv.value, kv.lease, kv.version), (b("v3"), 1, 4));
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["a"]);
    assert_eq!(keys_of(&h.store, 2).unwrap(), Vec::<String>::new());

    // ignore_value and ignore_lease together: only the version moves.
    h.put_with(PutRequest {
        key: b("a"),
        ignore_value: true,
        ignore_lease: true,
        ..Default::default()
    })
    .unwrap();
    let kv = get(&h.store, "a").unwrap();
    assert_eq!((kv.value, kv.lease, kv.version), (b("v3"), 1, 5));

    // Re-put with the same lease: stays attached (once).
    h.put("a", "v4", 1);
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["a"]);

    // A plain put detaches (as etcd: the lease of a Put is its lease field).
    h.put("a", "v5", 0);
    assert_eq!(lease_of(&h.store, "a"), Some(0));
    assert_eq!(keys_of(&h.store, 1).unwrap(), Vec::<String>::new());
    assert_eq!(keys_of(&h.store, 2).unwrap(), Vec::<String>::new());
    // ... and ignore_lease then keeps "no lease".
    h.put_with(PutRequest {
        key: b("a"),
        value: b("v6"),
        ignore_lease: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(lease_of(&h.store, "a"), Some(0));

    // Both leases attach several keys, each key once.
    h.put("b", "", 1);
    h.put("c", "", 1);
    h.put("a", "", 2);
    h.put("d", "", 2);
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["b", "c"]);
    assert_eq!(keys_of(&h.store, 2).unwrap(), ["a", "d"]);

    // History keeps the lease each version had.
    let at = |revision: i64| -> Vec<(String, i64)> {
        all_at(&h.store, revision)
            .into_iter()
            .map(|kv| (String::from_utf8(kv.key.to_vec()).unwrap(), kv.lease))
            .collect()
    };
    assert_eq!(at(2), [("a".to_string(), 1)]);
    assert_eq!(at(3), [("a".to_string(), 2)]);
    assert_eq!(at(4), [("a".to_string(), 2)]);
    assert_eq!(at(5), [("a".to_string(), 1)]);
    assert_eq!(at(7), [("a".to_string(), 1)]);
    assert_eq!(at(8), [("a".to_string(), 0)]);
    round_trip(&h.store);
}

#[test]
fn put_with_an_unknown_lease_changes_nothing() {
    let mut h = Harness::new();
    h.grant(1, 60).unwrap();
    h.put("a", "v", 1);
    h.put("b", "v", 0);

    // On a key attached elsewhere, on a plain key, on a new key.
    for (key, lease) in [("a", 9), ("b", 9), ("new", 9), ("a", -1), ("new", i64::MAX)] {
        let before = h.before();
        assert_eq!(
            h.put_with(PutRequest {
                key: b(key),
                value: b("x"),
                lease,
                prev_kv: true,
                ..Default::default()
            }),
            Err(KvError::LeaseNotFound),
            "{key} lease {lease}"
        );
        h.unchanged_since(before);
    }
    assert_eq!(get(&h.store, "new"), None);
    // As etcd, the lease is looked up before the key: ignore_value on a
    // missing key with an unknown lease is LeaseNotFound.
    let before = h.before();
    assert_eq!(
        h.put_with(PutRequest {
            key: b("new"),
            lease: 9,
            ignore_value: true,
            ..Default::default()
        }),
        Err(KvError::LeaseNotFound)
    );
    h.unchanged_since(before);

    // ignore_lease on a missing key is KeyNotFound; with a lease it is
    // LeaseProvided (checked before anything else).
    let before = h.before();
    assert_eq!(
        h.put_with(PutRequest {
            key: b("new"),
            ignore_lease: true,
            ..Default::default()
        }),
        Err(KvError::KeyNotFound)
    );
    assert_eq!(
        h.put_with(PutRequest {
            key: b("a"),
            lease: 1,
            ignore_lease: true,
            ..Default::default()
        }),
        Err(KvError::LeaseProvided)
    );
    h.unchanged_since(before);

    // A key of a revoked lease's id cannot be attached to it any more.
    h.revoke(1).unwrap();
    let before = h.before();
    assert_eq!(
        h.put_with(PutRequest {
            key: b("b"),
            value: b("x"),
            lease: 1,
            ..Default::default()
        }),
        Err(KvError::LeaseNotFound)
    );
    h.unchanged_since(before);
}

#[test]
fn delete_range_detaches() {
    let mut h = Harness::new();
    h.grant(1, 60).unwrap();
    h.grant(2, 60).unwrap();
    for key in ["a", "b", "c"] {
        h.put(key, "v", 1);
    }
    h.put("d", "v", 2);
    h.put("e", "v", 0);

    let r = h.delete("b", "e");
    assert_eq!(r.deleted, 3);
    let leases: Vec<i64> = r.prev_kvs.iter().map(|kv| kv.lease).collect();
    assert_eq!(leases, [1, 1, 2]);
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["a"]);
    assert_eq!(keys_of(&h.store, 2).unwrap(), Vec::<String>::new());
    // The leases themselves stay.
    assert_eq!(h.store.lease_count(), 2);

    // A deleted key put again starts unattached.
    h.put("b", "again", 0);
    assert_eq!(lease_of(&h.store, "b"), Some(0));
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["a"]);
    // ... or attached to the lease it names.
    h.put("c", "again", 2);
    assert_eq!(keys_of(&h.store, 2).unwrap(), ["c"]);

    // Deleting everything leaves every lease empty.
    h.delete("\0", "\0");
    assert!(h.store.leases().all(|(_, l)| l.key_count() == 0));
    assert!(h.store.is_empty());
    round_trip(&h.store);
}

// ---------------------------------------------------------------------------
// Txns

#[test]
fn compare_on_lease() {
    let mut h = Harness::new();
    h.grant(5, 60).unwrap();
    h.grant(6, 60).unwrap();
    h.put("k", "v", 5);
    h.put("k2", "v", 5);
    h.put("plain", "v", 0);
    use CompareResult::{Equal, Greater, Less, NotEqual};
    let cases = [
        (cmp_lease("k", "", Equal, 5), true),
        (cmp_lease("k", "", Equal, 6), false),
        (cmp_lease("k", "", NotEqual, 6), true),
        (cmp_lease("k", "", Greater, 4), true),
        (cmp_lease("k", "", Greater, 5), false),
        (cmp_lease("k", "", Less, 6), true),
        (cmp_lease("plain", "", Equal, 0), true),
        (cmp_lease("plain", "", Greater, 0), false),
        // A missing key compares as lease 0 (etcd's compareKV of an empty
        // KeyValue).
        (cmp_lease("missing", "", Equal, 0), true),
        (cmp_lease("missing", "", Equal, 5), false),
        // A range: every key must satisfy it.
        (cmp_lease("k", "l", Equal, 5), true),
        (cmp_lease("k", "\0", Equal, 5), false),
        (cmp_lease("k", "\0", Greater, -1), true),
    ];
    for (compare, want) in cases {
        let r = h
            .txn(txn_op(vec![compare.clone()], vec![], vec![]))
            .unwrap();
        assert_eq!(r.succeeded, want, "{compare:?}");
    }
    // A compare of another target with a lease union compares as 0 (etcd).
    let odd = Compare {
        target: CompareTarget::Version as i32,
        ..cmp_lease("k", "", Equal, 5)
    };
    assert!(!h.txn(txn_op(vec![odd], vec![], vec![])).unwrap().succeeded);

    // Compare-and-move: attach k to 6 only while it is on 5.
    let move_k = || {
        txn_op(
            vec![cmp_lease("k", "", Equal, 5)],
            vec![put_op("k", "moved", 6)],
            vec![put_op("k", "unchanged", 0)],
        )
    };
    assert!(h.txn(move_k()).unwrap().succeeded);
    assert_eq!(keys_of(&h.store, 5).unwrap(), ["k2"]);
    assert_eq!(keys_of(&h.store, 6).unwrap(), ["k"]);
    assert!(!h.txn(move_k()).unwrap().succeeded);
    assert_eq!(lease_of(&h.store, "k"), Some(0));
    assert_eq!(keys_of(&h.store, 6).unwrap(), Vec::<String>::new());

    // A branch not taken may name an unknown lease: it is never checked.
    let r = h
        .txn(txn_op(
            vec![cmp_lease("k2", "", Equal, 5)],
            vec![put_op("x", "", 6)],
            vec![put_op("x", "", 99)],
        ))
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(keys_of(&h.store, 6).unwrap(), ["x"]);

    // Compares see the state before the txn, also in nested txns.
    let r = h
        .txn(txn_op(
            vec![],
            vec![
                put_op("y", "", 5),
                txn_op(
                    vec![cmp_lease("y", "", Equal, 0)],
                    vec![range_op("y", "", 0)],
                    vec![],
                ),
            ],
            vec![],
        ))
        .unwrap();
    let Some(Response::ResponseTxn(nested)) = &r.responses[1].response else {
        panic!("not a txn response: {:?}", r.responses[1]);
    };
    assert!(nested.succeeded, "y had no lease before the txn");
    let Some(Response::ResponseRange(read)) = &nested.responses[0].response else {
        panic!("not a range response");
    };
    assert_eq!(read.kvs[0].lease, 5, "a Range in the txn reads its writes");
    round_trip(&h.store);
}

#[test]
fn a_failed_txn_restores_every_attachment() {
    let mut h = Harness::new();
    h.grant(1, 60).unwrap();
    h.grant(2, 60).unwrap();
    h.put("a", "v", 1);
    h.put("b", "v", 2);
    h.put("c", "v", 0);
    h.put("f", "v", 1);
    let table = lease_table(&h.store);

    // Every kind of lease change, then an op that fails.
    let changes = || {
        vec![
            put_op("a", "moved", 2),
            put_op("c", "attached", 1),
            del_op("b", ""),
            put_op("d", "new", 1),
            put_req(PutRequest {
                key: b("f"),
                value: b("detached"),
                ..Default::default()
            }),
        ]
    };
    let failing_ops = [
        (put_op("e", "x", 99), KvError::LeaseNotFound),
        (range_op("a", "", 1_000), KvError::FutureRevision),
        (
            put_req(PutRequest {
                key: b("missing"),
                ignore_lease: true,
                ..Default::default()
            }),
            KvError::KeyNotFound,
        ),
    ];
    for (failing, error) in failing_ops {
        let mut ops = changes();
        ops.push(failing.clone());
        let before = h.before();
        assert_eq!(h.txn(txn_op(vec![], ops, vec![])), Err(error.clone()));
        h.unchanged_since(before);
        assert_eq!(lease_table(&h.store), table);

        // The same failure in a nested txn, after the outer level changed
        // leases, and in the failure branch.
        let mut inner = changes();
        let outer = inner.split_off(2);
        let nested = txn_op(
            vec![cmp_lease("zz", "", CompareResult::Equal, 7)],
            vec![],
            [inner, vec![failing]].concat(),
        );
        let before = h.before();
        assert_eq!(
            h.txn(txn_op(
                vec![cmp_lease("a", "", CompareResult::Equal, 99)],
                vec![],
                [outer, vec![nested]].concat(),
            )),
            Err(error)
        );
        h.unchanged_since(before);
        assert_eq!(lease_table(&h.store), table);
    }

    // The same txn without the failing op goes through.
    let r = h.txn(txn_op(vec![], changes(), vec![])).unwrap();
    assert!(r.succeeded);
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["c", "d"]);
    assert_eq!(keys_of(&h.store, 2).unwrap(), ["a"]);
    assert_eq!(lease_of(&h.store, "f"), Some(0));
    round_trip(&h.store);
}

// ---------------------------------------------------------------------------
// Revoke

#[test]
fn revoke_deletes_every_key_at_one_revision() {
    let mut h = Harness::new();
    h.store.collect_events(true);
    h.grant(1, 60).unwrap();
    h.grant(2, 60).unwrap();
    h.put("c", "3", 1);
    h.put("a", "1", 1);
    h.put("b", "2", 1);
    h.put("d", "4", 2);
    h.put("e", "5", 0);
    // One key attached and detached again: not deleted by the revoke.
    h.put("x", "x", 1);
    h.put("x", "y", 0);
    let revision = h.store.revision();
    let _ = h.store.take_events();

    let got = h.revoke(1).unwrap();
    assert_eq!(got, revision + 1, "one revision for all the keys");
    assert_eq!(h.store.revision(), revision + 1);
    assert!(h.store.lease(1).is_none());
    assert_eq!(h.store.lease_count(), 1);
    let live: Vec<(Bytes, i64)> = all_at(&h.store, 0)
        .into_iter()
        .map(|kv| (kv.key, kv.lease))
        .collect();
    assert_eq!(live, [(b("d"), 2), (b("e"), 0), (b("x"), 0)]);
    // One delete event per key at that revision, in key order, each with
    // the version it deleted.
    let events = h.store.take_events();
    assert_eq!(events.len(), 3);
    for (event, (key, value)) in events.iter().zip([("a", "1"), ("b", "2"), ("c", "3")]) {
        assert_eq!(event.r#type, EventType::Delete as i32);
        let kv = event.kv.as_ref().unwrap();
        assert_eq!((&kv.key, kv.mod_revision), (&b(key), revision + 1));
        let prev = event.prev_kv.as_ref().unwrap();
        assert_eq!((&prev.value, prev.lease), (&b(value), 1));
    }
    // A watcher catching up from the history sees the same events.
    let (replayed, next) = h.store.freeze().changes(b"\0", b"\0", revision + 1, 100);
    assert_eq!(replayed, events);
    assert_eq!(next, revision + 2);
    // History still shows the attachment.
    let before: Vec<i64> = all_at(&h.store, revision)
        .iter()
        .map(|kv| kv.lease)
        .collect();
    assert_eq!(before, [1, 1, 1, 2, 0, 0]);

    // Revoking again, an unknown lease, "no lease": LeaseNotFound.
    for id in [1, 3, 0, -2] {
        let before = h.before();
        assert_eq!(h.revoke(id), Err(KvError::LeaseNotFound), "lease {id}");
        h.unchanged_since(before);
    }
    assert!(h.store.take_events().is_empty());

    // A lease without keys: revoked without a new revision.
    h.put("d", "4", 0);
    let revision = h.store.revision();
    let _ = h.store.take_events();
    assert_eq!(h.revoke(2), Ok(revision));
    assert_eq!(h.store.revision(), revision);
    assert_eq!(h.store.lease_count(), 0);
    assert!(h.store.take_events().is_empty());
    assert_eq!(lease_of(&h.store, "d"), Some(0));

    // The id may be granted again, empty.
    h.grant(1, 5).unwrap();
    assert_eq!(keys_of(&h.store, 1).unwrap(), Vec::<String>::new());
    assert_eq!(h.store.lease(1).unwrap().ttl, 5);
    round_trip(&h.store);
}

#[test]
fn revoke_of_many_keys_is_one_revision() {
    let mut h = Harness::new();
    h.grant(7, 60).unwrap();
    h.grant(8, 60).unwrap();
    let n: usize = 300;
    for i in 0..n {
        h.put(&format!("key/{i:04}"), "v", if i % 3 == 0 { 8 } else { 7 });
    }
    let revision = h.store.revision();
    let on_7 = keys_of(&h.store, 7).unwrap().len();
    assert_eq!(on_7, n - n.div_ceil(3));
    assert_eq!(h.revoke(7), Ok(revision + 1));
    assert_eq!(h.store.len(), n.div_ceil(3));
    assert!(all_at(&h.store, 0).iter().all(|kv| kv.lease == 8));
    // All of them were live just before and gone at that one revision.
    assert_eq!(all_at(&h.store, revision).len(), n);
    assert_eq!(all_at(&h.store, revision + 1).len(), n.div_ceil(3));
    assert_eq!(h.revoke(8), Ok(revision + 2));
    assert!(h.store.is_empty());
    round_trip(&h.store);
}

// ---------------------------------------------------------------------------
// Checkpoint

#[test]
fn checkpoint_sets_remaining_clamped_and_skips_unknown_ids() {
    let mut h = Harness::new();
    h.grant(1, 100).unwrap();
    h.grant(2, 10).unwrap();
    h.put("k", "v", 1);
    let revision = h.store.revision();
    let count = h.store.lease_count();

    h.checkpoint(&[(1, 40), (2, 50), (3, 7), (0, 1), (-1, 5)]);
    assert_eq!(h.store.lease(1).unwrap().remaining, 40);
    assert_eq!(
        h.store.lease(2).unwrap().remaining,
        10,
        "clamped to the TTL"
    );
    assert!(h.store.lease(3).is_none(), "a checkpoint grants nothing");
    assert_eq!(h.store.lease_count(), count);
    assert_eq!(h.store.revision(), revision, "no revision");
    assert_eq!(keys_of(&h.store, 1).unwrap(), ["k"]);

    h.checkpoint(&[(1, -5), (2, i64::MAX)]);
    assert_eq!(h.store.lease(1).unwrap().remaining, 0, "clamped to 0");
    assert_eq!(h.store.lease(2).unwrap().remaining, 10);

    // Later entries win, also within one checkpoint; the TTL is kept.
    h.checkpoint(&[(1, 20), (1, 30)]);
    let l = h.store.lease(1).unwrap();
    assert_eq!((l.ttl, l.remaining), (100, 30));
    // An empty checkpoint is applied (index) and changes nothing.
    let before = h.before();
    h.checkpoint(&[]);
    h.unchanged_since(before);
    // Only unknown ids: nothing either.
    let before = h.before();
    h.checkpoint(&[(4, 1), (5, 2)]);
    h.unchanged_since(before);

    // A checkpoint is state: snapshots keep it, digests see it.
    let back = round_trip(&h.store);
    assert_eq!(back.lease(1).unwrap().remaining, 30);
    let mut unchecked = h.store.clone();
    h.checkpoint(&[(2, 3)]);
    unchecked.mark_applied(h.index);
    assert_ne!(h.store, unchecked);
    assert_ne!(h.store.digest(), unchecked.digest());
    // A checkpoint of a revoked lease is skipped.
    h.revoke(2).unwrap();
    let before = h.before();
    h.checkpoint(&[(2, 3)]);
    h.unchanged_since(before);
}

// ---------------------------------------------------------------------------
// Snapshots and compaction

/// Leases with keys, checkpoints, a revoked lease whose keys are in the
/// history, a re-granted id, a compaction half done physically.
fn leased_store() -> Harness {
    let mut h = Harness::new();
    h.grant(1, 100).unwrap();
    h.grant(2, 200).unwrap();
    h.grant(3, 300).unwrap();
    h.grant(1 << 40, 5).unwrap();
    h.put("a", "1", 1);
    h.put("b", "2", 1);
    h.put("c", "3", 2);
    h.put("d", "4", 0);
    h.put("a", "11", 2);
    h.put("e", "5", 3);
    h.put("long/\u{ff}", "6", 1 << 40);
    h.revoke(3).unwrap();
    h.grant(3, 30).unwrap();
    h.put("f", "7", 3);
    h.checkpoint(&[(1, 50), (3, 10)]);
    h.put("b", "22", 0);
    let revision = h.store.revision();
    h.compact(revision - 2).unwrap();
    assert!(h.store.compact_step(2));
    h.put("g", "8", 1);
    h.delete("c", "");
    h
}

#[test]
fn snapshots_keep_leases_attachments_and_checkpoints() {
    let h = leased_store();
    let store = &h.store;
    assert_eq!(keys_of(store, 1).unwrap(), ["g"]);
    assert_eq!(keys_of(store, 2).unwrap(), ["a"]);
    assert_eq!(keys_of(store, 3).unwrap(), ["f"]);
    assert_eq!(keys_of(store, 1 << 40).unwrap(), ["long/\u{ff}"]);
    let back = round_trip(store);
    assert_eq!(back.lease(1).unwrap().remaining, 50);
    assert_eq!(back.lease(3).unwrap().ttl, 30);
    assert_eq!(back.lease(3).unwrap().remaining, 10);
    for revision in [0, store.compact_revision(), store.revision() - 1] {
        assert_eq!(all_at(&back, revision), all_at(store, revision));
    }

    // The restored store goes on as the original would.
    let mut original = Harness {
        store: store.clone(),
        index: h.index,
    };
    let mut restored = Harness {
        store: back,
        index: h.index,
    };
    for h in [&mut original, &mut restored] {
        let revision = h.store.revision();
        assert_eq!(h.revoke(2), Ok(revision + 1));
        h.put("g", "9", 3);
        assert_eq!(
            h.put_with(PutRequest {
                key: b("x"),
                lease: 2,
                ..Default::default()
            }),
            Err(KvError::LeaseNotFound)
        );
        h.checkpoint(&[(1, 7)]);
        let revision = h.store.revision();
        assert_eq!(h.revoke(1), Ok(revision), "g moved away");
    }
    assert_eq!(original.store, restored.store);
    assert_eq!(snapshot_of(&original.store), snapshot_of(&restored.store));
    round_trip(&restored.store);

    // A frozen view serializes the leases it froze.
    let mut h = leased_store();
    let view = h.store.freeze();
    let bytes = snapshot_of(&h.store);
    h.revoke(1).unwrap();
    h.checkpoint(&[(2, 1)]);
    h.grant(77, 1).unwrap();
    let mut frozen = Vec::new();
    view.write_snapshot(&mut frozen).unwrap();
    assert_eq!(frozen, bytes);
    assert_ne!(snapshot_of(&h.store), bytes);
}

#[test]
fn compaction_does_not_touch_leases() {
    let mut h = leased_store();
    let table = lease_table(&h.store);
    // Compact at the current revision: every older version (some naming
    // leases, some naming the revoked lease 3) goes, logically and then
    // physically.
    let revision = h.store.revision();
    let bytes_before = snapshot_of(&h.store);
    h.compact(revision).unwrap();
    assert_eq!(lease_table(&h.store), table);
    while h.store.compact_step(1) {
        h.store.check_invariants();
        assert_eq!(lease_table(&h.store), table);
    }
    assert_ne!(snapshot_of(&h.store), bytes_before, "the history was cut");
    let back = round_trip(&h.store);
    assert_eq!(lease_table(&back), table);
    // Revocation after compaction still finds and deletes the keys.
    let n = keys_of(&h.store, 2).unwrap().len();
    assert_eq!(n, 1);
    assert_eq!(h.revoke(2), Ok(revision + 1));
    assert_eq!(lease_of(&h.store, "a"), None);
    round_trip(&h.store);
}

/// Byte offsets of the parts of a snapshot (v5: v3, an alarm count and an
/// auth section before the trailer; these tests hold no alarms and never
/// use auth).
struct Layout {
    /// Start of each record (at its kind byte) and its key_len.
    records: Vec<(usize, u32)>,
    /// The end marker's kind byte.
    end: usize,
    /// The lease count.
    leases: usize,
}

const HEADER: usize = 33;
/// A record's header (v6: with lease and sub), from its kind byte.
const RECORD_HEADER: usize = 1 + 4 + 4 + 8 + 8 + 8 + 8 + 4;
/// Where a record's lease field starts, from its kind byte (its sub follows).
const RECORD_LEASE: usize = 1 + 4 + 4 + 8 + 8 + 8;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn layout(bytes: &[u8]) -> Layout {
    assert_eq!(bytes[8], 6, "a v6 snapshot");
    let mut at = HEADER;
    let mut records = Vec::new();
    while bytes[at] != 0 {
        let key_len = u32_at(bytes, at + 1);
        let value_len = u32_at(bytes, at + 5);
        records.push((at, key_len));
        at += RECORD_HEADER + key_len as usize + value_len as usize;
    }
    Layout {
        records,
        end: at,
        leases: at + 17,
    }
}

/// A change to a snapshot's bytes.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

/// Puts the right checksum back after an edit.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let crc = crc32c::crc32c(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
}

/// The v2 form of a current snapshot without leases whose revisions wrote
/// one key each: no lease or sub field in the records, no lease table.
fn to_v2(bytes: &[u8]) -> Vec<u8> {
    let l = layout(bytes);
    let mut out = bytes[..HEADER].to_vec();
    out[8] = 2;
    for (i, &(start, _)) in l.records.iter().enumerate() {
        let stop = l.records.get(i + 1).map_or(l.end, |r| r.0);
        assert_eq!(
            &bytes[start + RECORD_LEASE..start + RECORD_LEASE + 8],
            &[0; 8]
        );
        assert_eq!(
            &bytes[start + RECORD_LEASE + 8..start + RECORD_LEASE + 12],
            &[0; 4]
        );
        out.extend_from_slice(&bytes[start..start + RECORD_LEASE]);
        out.extend_from_slice(&bytes[start + RECORD_LEASE + 12..stop]);
    }
    out.extend_from_slice(&bytes[l.end..l.leases]);
    assert_eq!(&bytes[l.leases..l.leases + 8], &0u64.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    reseal(&mut out);
    out
}

#[test]
fn a_v2_snapshot_is_read_as_one_without_leases() {
    let mut h = Harness::new();
    h.put("a", "1", 0);
    h.put("b", "2", 0);
    h.put("a", "3", 0);
    h.delete("b", "");
    h.put("c", "", 0);
    h.compact(3).unwrap();
    let v3 = snapshot_of(&h.store);
    let v2 = to_v2(&v3);
    // No lease or sub fields, no lease count, no alarm count, no auth
    // section (length, enabled, revision, three counts).
    let auth_section = 4 + 1 + 8 + 12;
    assert_eq!(
        v2.len(),
        v3.len() - 12 * layout(&v3).records.len() - 16 - auth_section
    );
    let back = read(&v2).unwrap();
    back.check_invariants();
    assert_eq!(back, h.store);
    assert_eq!(back.lease_count(), 0);
    // Written back in the current format.
    assert_eq!(snapshot_of(&back), v3);

    // A v2 snapshot with a lease table appended is not a v2 snapshot.
    let mut longer = v2.clone();
    let n = longer.len() - 4;
    longer.splice(n..n, 0u64.to_le_bytes());
    reseal(&mut longer);
    assert!(read(&longer).is_err());
}

#[test]
fn forged_lease_data_is_refused() {
    // Lease 5 (ttl 50, remaining 20) with key "k"; lease 9 without keys.
    let mut h = Harness::new();
    h.grant(5, 50).unwrap();
    h.grant(9, 90).unwrap();
    h.put("k", "v", 5);
    h.put("t", "v", 0);
    h.delete("t", "");
    h.checkpoint(&[(5, 20)]);
    let good = snapshot_of(&h.store);
    read(&good).unwrap();
    let l = layout(&good);
    assert_eq!(&good[l.leases..l.leases + 8], &2u64.to_le_bytes());
    let table = l.leases + 8;
    let lease_at = move |i: usize| table + 24 * i;
    assert_eq!(&good[lease_at(0)..lease_at(0) + 8], &5i64.to_le_bytes());
    assert_eq!(&good[lease_at(1)..lease_at(1) + 8], &9i64.to_le_bytes());
    let k = l.records[0].0;
    let t_live = l.records[1].0;
    let t_gone = l.records[2].0;
    assert_eq!(u32_at(&good, t_gone + 1), 0, "t's tombstone shares its key");

    let edits: Vec<(&str, Edit)> = vec![
        (
            "a key names a lease not in the table",
            Box::new(move |s| {
                s[k + RECORD_LEASE..k + RECORD_LEASE + 8].copy_from_slice(&7i64.to_le_bytes())
            }),
        ),
        (
            "the key's lease left out of the table",
            Box::new(move |s| s[lease_at(0)..lease_at(0) + 8].copy_from_slice(&6i64.to_le_bytes())),
        ),
        (
            "a negative lease",
            Box::new(move |s| {
                s[t_live + RECORD_LEASE..t_live + RECORD_LEASE + 8]
                    .copy_from_slice(&(-1i64).to_le_bytes())
            }),
        ),
        (
            "a tombstone with a lease",
            Box::new(move |s| {
                s[t_gone + RECORD_LEASE..t_gone + RECORD_LEASE + 8]
                    .copy_from_slice(&9i64.to_le_bytes())
            }),
        ),
        (
            "ids not ascending",
            Box::new(move |s| s[lease_at(1)..lease_at(1) + 8].copy_from_slice(&5i64.to_le_bytes())),
        ),
        (
            "id 0",
            Box::new(move |s| {
                s[lease_at(0)..lease_at(0) + 8].copy_from_slice(&0i64.to_le_bytes());
                s[k + RECORD_LEASE..k + RECORD_LEASE + 8].copy_from_slice(&0i64.to_le_bytes());
            }),
        ),
        (
            "ttl 0",
            Box::new(move |s| {
                s[lease_at(1) + 8..lease_at(1) + 16].copy_from_slice(&0i64.to_le_bytes())
            }),
        ),
        (
            "ttl over the maximum",
            Box::new(move |s| {
                s[lease_at(1) + 8..lease_at(1) + 16]
                    .copy_from_slice(&(LEASE_TTL_MAX + 1).to_le_bytes())
            }),
        ),
        (
            "remaining over the ttl",
            Box::new(move |s| {
                s[lease_at(0) + 16..lease_at(0) + 24].copy_from_slice(&51i64.to_le_bytes())
            }),
        ),
        (
            "negative remaining",
            Box::new(move |s| {
                s[lease_at(0) + 16..lease_at(0) + 24].copy_from_slice(&(-1i64).to_le_bytes())
            }),
        ),
        (
            "lease count over the table",
            Box::new(move |s| s[l.leases..l.leases + 8].copy_from_slice(&3u64.to_le_bytes())),
        ),
        (
            "lease count under the table",
            Box::new(move |s| s[l.leases..l.leases + 8].copy_from_slice(&1u64.to_le_bytes())),
        ),
        (
            "a huge lease count",
            Box::new(move |s| s[l.leases..l.leases + 8].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
    ];
    for (what, edit) in edits {
        let mut bytes = good.clone();
        edit(&mut bytes);
        reseal(&mut bytes);
        assert!(read(&bytes).is_err(), "{what}: read back");
        // Unsealed, it is a checksum mismatch at worst.
        let mut bytes = good.clone();
        edit(&mut bytes);
        assert!(read(&bytes).is_err(), "{what}: read back unsealed");
    }

    // Sanity of the edits: an edit that keeps the data valid reads back,
    // with the change (remaining 20 -> 50 = ttl).
    let mut bytes = good.clone();
    bytes[lease_at(0) + 16..lease_at(0) + 24].copy_from_slice(&50i64.to_le_bytes());
    reseal(&mut bytes);
    let back = read(&bytes).unwrap();
    back.check_invariants();
    assert_eq!(back.lease(5).unwrap().remaining, 50);
    // ... and moving k to lease 9 moves it in the lease table too.
    let mut bytes = good.clone();
    bytes[k + RECORD_LEASE..k + RECORD_LEASE + 8].copy_from_slice(&9i64.to_le_bytes());
    reseal(&mut bytes);
    let back = read(&bytes).unwrap();
    back.check_invariants();
    assert_eq!(keys_of(&back, 9).unwrap(), ["k"]);
    assert_eq!(keys_of(&back, 5).unwrap(), Vec::<String>::new());

    // Every truncation is an error, never a panic.
    for n in 0..good.len() {
        assert!(read(&good[..n]).is_err(), "truncated at {n}");
    }
}

#[test]
fn old_versions_may_name_revoked_leases() {
    // The history keeps versions naming a lease that is gone; only a live
    // key's latest version must name a lease held.
    let mut h = Harness::new();
    h.grant(1, 10).unwrap();
    h.put("a", "1", 1);
    h.put("a", "2", 0);
    h.put("b", "1", 1);
    h.revoke(1).unwrap();
    let at_4: Vec<(Bytes, i64)> = all_at(&h.store, 4)
        .into_iter()
        .map(|kv| (kv.key, kv.lease))
        .collect();
    assert_eq!(at_4, [(b("a"), 0), (b("b"), 1)]);
    assert_eq!(all_at(&h.store, 2)[0].lease, 1);
    assert!(all_at(&h.store, 0).iter().all(|kv| kv.lease == 0));
    let back = round_trip(&h.store);
    assert_eq!(all_at(&back, 2)[0].lease, 1);
    assert_eq!(back.lease_count(), 0);
}

// ---------------------------------------------------------------------------
// The state machine's commands

fn encoded(cmd: &KvCommand) -> Bytes {
    let mut out = BytesMut::new();
    KvMachine::encode_command(cmd, &mut out);
    out.freeze()
}

#[test]
fn lease_commands_round_trip() {
    let many: Vec<(i64, i64)> = (0..LEASE_CHECKPOINT_MAX as i64)
        .map(|i| (i + 1, i * 7 - 3))
        .collect();
    let cmds = [
        KvCommand::LeaseGrant { id: 1, ttl: 60 },
        KvCommand::LeaseGrant {
            id: i64::MAX,
            ttl: LEASE_TTL_MAX,
        },
        // The encoding carries any value; the store judges them.
        KvCommand::LeaseGrant {
            id: -1,
            ttl: i64::MIN,
        },
        KvCommand::LeaseRevoke { id: 1 },
        KvCommand::LeaseRevoke { id: i64::MIN },
        KvCommand::LeaseCheckpoint { remaining: vec![] },
        KvCommand::LeaseCheckpoint {
            remaining: vec![(1, 30)],
        },
        KvCommand::LeaseCheckpoint {
            remaining: vec![(3, -1), (1, i64::MAX), (3, 0)],
        },
        KvCommand::LeaseCheckpoint { remaining: many },
    ];
    for cmd in cmds {
        let bytes = encoded(&cmd);
        assert_eq!(decode_command(bytes.clone()).unwrap(), cmd);
        assert!(KvMachine::check_command(&bytes).is_ok());
    }

    // The documented layout.
    let bytes = encoded(&KvCommand::LeaseGrant {
        id: 0x0102,
        ttl: -2,
    });
    let mut want = vec![TAG_LEASE_GRANT];
    want.extend_from_slice(&0x0102i64.to_le_bytes());
    want.extend_from_slice(&(-2i64).to_le_bytes());
    assert_eq!(&bytes[..], &want[..]);
    assert_eq!(TAG_LEASE_GRANT, 3);

    let bytes = encoded(&KvCommand::LeaseRevoke { id: 9 });
    let mut want = vec![TAG_LEASE_REVOKE];
    want.extend_from_slice(&9i64.to_le_bytes());
    assert_eq!(&bytes[..], &want[..]);
    assert_eq!(TAG_LEASE_REVOKE, 4);

    let bytes = encoded(&KvCommand::LeaseCheckpoint {
        remaining: vec![(4, 5), (6, 7)],
    });
    let mut want = vec![TAG_LEASE_CHECKPOINT];
    want.extend_from_slice(&2u32.to_le_bytes());
    for n in [4i64, 5, 6, 7] {
        want.extend_from_slice(&n.to_le_bytes());
    }
    assert_eq!(&bytes[..], &want[..]);
    assert_eq!(TAG_LEASE_CHECKPOINT, 5);
}

#[test]
fn malformed_lease_commands_are_refused() {
    let grant = encoded(&KvCommand::LeaseGrant { id: 1, ttl: 60 });
    let revoke = encoded(&KvCommand::LeaseRevoke { id: 1 });
    let checkpoint = encoded(&KvCommand::LeaseCheckpoint {
        remaining: vec![(1, 2), (3, 4)],
    });
    let with = |bytes: &Bytes, extra: &[u8]| -> Vec<u8> { [&bytes[..], extra].concat() };
    let checkpoint_of = |n: u32, pairs: usize| -> Vec<u8> {
        let mut v = vec![TAG_LEASE_CHECKPOINT];
        v.extend_from_slice(&n.to_le_bytes());
        v.resize(v.len() + pairs * 16, 0);
        v
    };
    let max = LEASE_CHECKPOINT_MAX as u32;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("grant, no body", vec![TAG_LEASE_GRANT]),
        ("grant, id only", grant[..9].to_vec()),
        ("grant, a byte short", grant[..16].to_vec()),
        ("grant, a byte over", with(&grant, &[0])),
        ("grant, 8 bytes over", with(&grant, &[0; 8])),
        ("revoke, no body", vec![TAG_LEASE_REVOKE]),
        ("revoke, a byte short", revoke[..8].to_vec()),
        ("revoke, a byte over", with(&revoke, &[0])),
        ("revoke, with a ttl", with(&revoke, &[0; 8])),
        ("checkpoint, no count", vec![TAG_LEASE_CHECKPOINT]),
        (
            "checkpoint, short count",
            vec![TAG_LEASE_CHECKPOINT, 0, 0, 0],
        ),
        (
            "checkpoint, a byte short",
            checkpoint[..checkpoint.len() - 1].to_vec(),
        ),
        ("checkpoint, a byte over", with(&checkpoint, &[0])),
        ("checkpoint, a pair over", with(&checkpoint, &[0; 16])),
        ("checkpoint, count 1, 2 pairs", checkpoint_of(1, 2)),
        ("checkpoint, count 3, 2 pairs", checkpoint_of(3, 2)),
        ("checkpoint, count 1, no pair", checkpoint_of(1, 0)),
        ("checkpoint, count 0, a pair", checkpoint_of(0, 1)),
        (
            "checkpoint, over the max",
            checkpoint_of(max + 1, max as usize + 1),
        ),
        ("checkpoint, huge count", checkpoint_of(u32::MAX, 2)),
        (
            "checkpoint, count wrapping to the bytes",
            checkpoint_of(0x1000_0001, 1),
        ),
    ];
    for (what, bytes) in bad {
        let bytes = Bytes::from(bytes);
        assert!(KvMachine::check_command(&bytes).is_err(), "{what}");
        assert!(decode_command(bytes).is_err(), "{what}");
    }
    // The largest checkpoint is accepted.
    let bytes = Bytes::from(checkpoint_of(max, max as usize));
    assert!(KvMachine::check_command(&bytes).is_ok());
    // Other tags stay unknown.
    for tag in [0u8, 6, 255] {
        let bytes = Bytes::from(vec![tag; 17]);
        assert!(KvMachine::check_command(&bytes).is_err(), "tag {tag}");
    }
}

#[test]
#[should_panic(expected = "LEASE_CHECKPOINT_MAX")]
fn encoding_an_oversized_checkpoint_panics() {
    let remaining = vec![(1, 1); LEASE_CHECKPOINT_MAX + 1];
    encoded(&KvCommand::LeaseCheckpoint { remaining });
}

#[test]
fn the_machine_applies_lease_commands() {
    let put = KvCommand::Op(put_op("k", "v", 4));
    let commands = [
        Some(KvCommand::LeaseGrant { id: 4, ttl: 40 }),
        Some(KvCommand::LeaseGrant { id: 4, ttl: 40 }),
        Some(put.clone()),
        None,
        Some(KvCommand::LeaseCheckpoint {
            remaining: vec![(4, 12), (5, 1)],
        }),
        Some(KvCommand::LeaseGrant { id: 5, ttl: 50 }),
        Some(KvCommand::LeaseRevoke { id: 4 }),
        Some(KvCommand::LeaseRevoke { id: 4 }),
        Some(KvCommand::LeaseRevoke { id: 5 }),
        Some(KvCommand::LeaseGrant {
            id: 6,
            ttl: LEASE_TTL_MAX + 1,
        }),
        Some(KvCommand::LeaseGrant { id: 6, ttl: 60 }),
        Some(put),
    ];
    let batch: Vec<Committed> = commands
        .iter()
        .enumerate()
        .map(|(i, cmd)| Committed {
            index: i as u64 + 1,
            term: 1,
            command: cmd.as_ref().map(encoded),
        })
        .collect();

    // Apply the first half, look, then the rest.
    let mut m = KvMachine::new();
    let mut out = Vec::new();
    m.apply(&batch[..5], &mut out).unwrap();
    assert_eq!(out.len(), 4, "one response per command, none for the no-op");
    assert_eq!(out[0], Ok(KvResponse::LeaseGranted { revision: 1 }));
    assert_eq!(out[1], Err(KvError::LeaseExists));
    assert!(matches!(out[2], Ok(KvResponse::Op(_))));
    assert_eq!(out[3], Ok(KvResponse::LeaseCheckpointed));
    let KvQueryResponse::Lease(info) = m.query(&KvQuery::Lease { id: 4, keys: true }) else {
        panic!("not a lease answer");
    };
    assert_eq!(
        info,
        Some(LeaseInfo {
            id: 4,
            ttl: 40,
            remaining: 12,
            keys: vec![b("k")],
        })
    );
    let KvQueryResponse::Lease(info) = m.query(&KvQuery::Lease { id: 4, keys: false }) else {
        panic!("not a lease answer");
    };
    assert!(info.unwrap().keys.is_empty());
    let KvQueryResponse::Lease(info) = m.query(&KvQuery::Lease { id: 5, keys: true }) else {
        panic!("not a lease answer");
    };
    assert_eq!(info, None);

    out.clear();
    m.apply(&batch[5..], &mut out).unwrap();
    assert_eq!(
        out,
        vec![
            Ok(KvResponse::LeaseGranted { revision: 2 }),
            Ok(KvResponse::LeaseRevoked { revision: 3 }),
            Err(KvError::LeaseNotFound),
            Ok(KvResponse::LeaseRevoked { revision: 3 }),
            Err(KvError::LeaseTtlTooLarge),
            Ok(KvResponse::LeaseGranted { revision: 3 }),
            Err(KvError::LeaseNotFound),
        ]
    );
    assert_eq!(m.store().applied_index(), batch.len() as u64);
    let KvQueryResponse::Leases(all) = m.query(&KvQuery::Leases) else {
        panic!("not a leases answer");
    };
    assert_eq!(all, vec![(6, 60, 0)]);
    m.store().check_invariants();

    // The machine's snapshot carries the leases.
    let mut bytes = Vec::new();
    skiff_node::SnapshotView::write_to(&m.snapshot(), &mut bytes).unwrap();
    let back = KvMachine::restore(&mut &bytes[..]).unwrap();
    assert_eq!(back.store(), m.store());
    assert_eq!(back.store().lease(6).unwrap().ttl, 60);
}

// ---------------------------------------------------------------------------
// Random walks against a model

const KEYS: &[&str] = &["a", "b", "c", "d"];
const ENDS: &[&str] = &["", "", "\0", "c"];
/// Lease ids used; 4 is granted rarely, 0 is "none".
const IDS: &[i64] = &[0, 1, 2, 3, 1, 2, 3, 4];

#[derive(Debug, Clone, PartialEq)]
struct MLease {
    ttl: i64,
    remaining: i64,
    keys: BTreeSet<Vec<u8>>,
}

/// Live keys: value, lease.
type MKvs = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

#[derive(Debug, Clone, PartialEq)]
struct Model {
    kvs: MKvs,
    leases: BTreeMap<i64, MLease>,
    revision: i64,
    compact: i64,
}

/// What the model checks of a response.
#[derive(Debug, Clone, PartialEq)]
enum Summary {
    Put { prev_lease: Option<i64> },
    Delete { deleted: i64, leases: Vec<i64> },
    Range(Vec<(Vec<u8>, i64)>),
    Txn(bool, Vec<Summary>),
}

fn summarize(r: &ResponseOp) -> Summary {
    match r.response.as_ref().unwrap() {
        Response::ResponsePut(p) => Summary::Put {
            prev_lease: p.prev_kv.as_ref().map(|kv| kv.lease),
        },
        Response::ResponseDeleteRange(d) => Summary::Delete {
            deleted: d.deleted,
            leases: d.prev_kvs.iter().map(|kv| kv.lease).collect(),
        },
        Response::ResponseRange(r) => {
            Summary::Range(r.kvs.iter().map(|kv| (kv.key.to_vec(), kv.lease)).collect())
        }
        Response::ResponseTxn(t) => {
            Summary::Txn(t.succeeded, t.responses.iter().map(summarize).collect())
        }
    }
}

fn in_range(key: &[u8], range_end: &[u8], k: &[u8]) -> bool {
    if range_end.is_empty() {
        k == key
    } else if range_end == [0] {
        k >= key
    } else {
        key <= k && k < range_end
    }
}

impl Model {
    fn new() -> Self {
        Model {
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            revision: 1,
            compact: 0,
        }
    }

    fn grant(&mut self, id: i64, ttl: i64) -> Result<(), KvError> {
        if id <= 0 {
            return Err(KvError::LeaseNotFound);
        }
        if ttl > LEASE_TTL_MAX {
            return Err(KvError::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists);
        }
        self.leases.insert(
            id,
            MLease {
                ttl: ttl.max(1),
                remaining: 0,
                keys: BTreeSet::new(),
            },
        );
        Ok(())
    }

    fn revoke(&mut self, id: i64) -> Result<i64, KvError> {
        let lease = self.leases.remove(&id).ok_or(KvError::LeaseNotFound)?;
        for key in &lease.keys {
            assert!(self.kvs.remove(key).is_some());
        }
        if !lease.keys.is_empty() {
            self.revision += 1;
        }
        Ok(self.revision)
    }

    fn checkpoint(&mut self, remaining: &[(i64, i64)]) {
        for &(id, left) in remaining {
            if let Some(l) = self.leases.get_mut(&id) {
                l.remaining = left.clamp(0, l.ttl);
            }
        }
    }

    fn compact(&mut self, revision: i64) -> Result<(), KvError> {
        if revision <= self.compact {
            return Err(KvError::Compacted);
        }
        if revision > self.revision {
            return Err(KvError::FutureRevision);
        }
        self.compact = revision;
        Ok(())
    }

    fn set_lease(&mut self, key: &[u8], from: i64, to: i64) {
        if from != 0 {
            assert!(self.leases.get_mut(&from).unwrap().keys.remove(key));
        }
        if to != 0 {
            self.leases.get_mut(&to).unwrap().keys.insert(key.to_vec());
        }
    }

    /// Applies a request (flat txns only); on error nothing changes.
    fn apply(&mut self, op: &RequestOp) -> Result<Summary, KvError> {
        validate(op)?;
        let mut scratch = self.clone();
        let mut changed = false;
        let summary = scratch.exec(op, self, &mut changed)?;
        if changed {
            scratch.revision += 1;
        }
        *self = scratch;
        Ok(summary)
    }

    /// Runs `op` on `self`; `begin` is the state before the request.
    fn exec(
        &mut self,
        op: &RequestOp,
        begin: &Model,
        changed: &mut bool,
    ) -> Result<Summary, KvError> {
        match op.request.as_ref().unwrap() {
            Request::RequestPut(p) => {
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(KvError::LeaseNotFound);
                }
                let old = self.kvs.get(&p.key[..]).cloned();
                if (p.ignore_value || p.ignore_lease) && old.is_none() {
                    return Err(KvError::KeyNotFound);
                }
                let value = if p.ignore_value {
                    old.as_ref().unwrap().0.clone()
                } else {
                    p.value.to_vec()
                };
                let lease = if p.ignore_lease {
                    old.as_ref().unwrap().1
                } else {
                    p.lease
                };
                self.set_lease(&p.key, old.as_ref().map_or(0, |o| o.1), lease);
                self.kvs.insert(p.key.to_vec(), (value, lease));
                *changed = true;
                Ok(Summary::Put {
                    prev_lease: if p.prev_kv { old.map(|o| o.1) } else { None },
                })
            }
            Request::RequestDeleteRange(d) => {
                let gone: Vec<(Vec<u8>, i64)> = self
                    .kvs
                    .iter()
                    .filter(|(k, _)| in_range(&d.key, &d.range_end, k))
                    .map(|(k, (_, lease))| (k.clone(), *lease))
                    .collect();
                for (key, lease) in &gone {
                    self.set_lease(key, *lease, 0);
                    self.kvs.remove(key);
                }
                *changed |= !gone.is_empty();
                Ok(Summary::Delete {
                    deleted: gone.len() as i64,
                    leases: if d.prev_kv {
                        gone.iter().map(|g| g.1).collect()
                    } else {
                        vec![]
                    },
                })
            }
            Request::RequestRange(r) => {
                // Only at the current revision (0) or in the future.
                if r.revision > begin.revision {
                    return Err(KvError::FutureRevision);
                }
                assert_eq!(r.revision, 0);
                Ok(Summary::Range(
                    self.kvs
                        .iter()
                        .filter(|(k, _)| in_range(&r.key, &r.range_end, k))
                        .map(|(k, (_, lease))| (k.clone(), *lease))
                        .collect(),
                ))
            }
            Request::RequestTxn(t) => {
                let succeeded = t.compare.iter().all(|c| begin.compare(c));
                let branch = if succeeded { &t.success } else { &t.failure };
                let mut responses = Vec::new();
                for op in branch {
                    responses.push(self.exec(op, begin, changed)?);
                }
                Ok(Summary::Txn(succeeded, responses))
            }
        }
    }

    /// A compare on LEASE, or on VERSION against 0 (the generator's only
    /// version compare: any live version is above 0, so 1 stands for it).
    fn compare(&self, c: &Compare) -> bool {
        let have: Vec<i64> = self
            .kvs
            .iter()
            .filter(|(k, _)| in_range(&c.key, &c.range_end, k))
            .map(|(_, (_, lease))| *lease)
            .collect();
        let check = |found: Option<i64>| {
            let (have, want) = match (&c.target_union, found) {
                (Some(TargetUnion::Lease(want)), found) => (found.unwrap_or(0), *want),
                (Some(TargetUnion::Version(want)), found) => (i64::from(found.is_some()), *want),
                _ => unreachable!(),
            };
            match CompareResult::try_from(c.result).unwrap() {
                CompareResult::Equal => have == want,
                CompareResult::NotEqual => have != want,
                CompareResult::Greater => have > want,
                CompareResult::Less => have < want,
            }
        };
        if have.is_empty() {
            check(None)
        } else {
            have.into_iter().all(|lease| check(Some(lease)))
        }
    }
}

/// The request checks that matter here, in the store's order.
fn validate(op: &RequestOp) -> Result<(), KvError> {
    let ops: Vec<&RequestOp> = match op.request.as_ref().unwrap() {
        Request::RequestTxn(t) => t.success.iter().chain(&t.failure).collect(),
        _ => vec![op],
    };
    for op in &ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            if p.ignore_value && !p.value.is_empty() {
                return Err(KvError::ValueProvided);
            }
            if p.ignore_lease && p.lease != 0 {
                return Err(KvError::LeaseProvided);
            }
        }
    }
    if let Some(Request::RequestTxn(t)) = &op.request {
        for branch in [&t.success, &t.failure] {
            let mut puts: Vec<&[u8]> = Vec::new();
            let mut deletes: Vec<(&[u8], &[u8])> = Vec::new();
            for op in branch {
                match &op.request {
                    Some(Request::RequestPut(p)) => puts.push(&p.key),
                    Some(Request::RequestDeleteRange(d)) => deletes.push((&d.key, &d.range_end)),
                    _ => {}
                }
            }
            let mut seen = BTreeSet::new();
            if !puts.iter().all(|k| seen.insert(*k))
                || puts
                    .iter()
                    .any(|k| deletes.iter().any(|(s, e)| in_range(s, e, k)))
            {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Step {
    Grant(i64, i64),
    Revoke(i64),
    Checkpoint(Vec<(i64, i64)>),
    Op(RequestOp),
    /// Compact at the current revision minus this much.
    Compact(i64),
    Physical(usize),
}

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(KEYS).prop_map(|k| Bytes::from_static(k.as_bytes()))
}

fn lease_id() -> impl Strategy<Value = i64> {
    prop::sample::select(IDS)
}

fn put_gen() -> impl Strategy<Value = RequestOp> {
    (
        key(),
        prop::sample::select(&["", "x", "y"][..]),
        lease_id(),
        prop::sample::select(&[0u8, 0, 0, 0, 1, 1, 2, 3][..]),
        any::<bool>(),
    )
        .prop_map(|(key, value, lease, flavour, prev_kv)| {
            let value = Bytes::from_static(value.as_bytes());
            put_req(match flavour {
                0 => PutRequest {
                    key,
                    value,
                    lease,
                    prev_kv,
                    ..Default::default()
                },
                // ignore_lease; with a lease: LeaseProvided.
                1 => PutRequest {
                    key,
                    value,
                    prev_kv,
                    ignore_lease: true,
                    lease: if lease == 4 { 1 } else { 0 },
                    ..Default::default()
                },
                // ignore_value (with a value: ValueProvided).
                2 => PutRequest {
                    key,
                    value: if lease == 4 { value } else { Bytes::new() },
                    lease,
                    prev_kv,
                    ignore_value: true,
                    ..Default::default()
                },
                _ => PutRequest {
                    key,
                    prev_kv,
                    ignore_value: true,
                    ignore_lease: true,
                    ..Default::default()
                },
            })
        })
}

fn delete_gen() -> impl Strategy<Value = RequestOp> {
    (key(), prop::sample::select(ENDS), any::<bool>()).prop_map(|(key, end, prev_kv)| RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key,
            range_end: Bytes::from_static(end.as_bytes()),
            prev_kv,
        })),
    })
}

fn range_gen() -> impl Strategy<Value = RequestOp> {
    (key(), prop::sample::select(ENDS), prop::bool::weighted(0.3)).prop_map(|(key, end, future)| {
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key,
                range_end: Bytes::from_static(end.as_bytes()),
                revision: if future { 1_000_000 } else { 0 },
                ..Default::default()
            })),
        }
    })
}

fn compare_gen() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop::sample::select(ENDS),
        0i32..4,
        lease_id(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(key, end, result, lease, on_version)| Compare {
            result,
            target: if on_version {
                CompareTarget::Version as i32
            } else {
                CompareTarget::Lease as i32
            },
            key,
            range_end: Bytes::from_static(end.as_bytes()),
            target_union: Some(if on_version {
                TargetUnion::Version(0)
            } else {
                TargetUnion::Lease(lease)
            }),
        })
}

fn leaf_gen() -> impl Strategy<Value = RequestOp> {
    prop_oneof![4 => put_gen(), 2 => delete_gen(), 1 => range_gen()]
}

fn op_gen() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        4 => put_gen(),
        1 => delete_gen(),
        3 => (
            prop::collection::vec(compare_gen(), 0..3),
            prop::collection::vec(leaf_gen(), 0..4),
            prop::collection::vec(leaf_gen(), 0..4),
        )
            .prop_map(|(c, s, f)| txn_op(c, s, f)),
    ]
}

fn step_gen() -> impl Strategy<Value = Step> {
    let ttl = prop::sample::select(&[-1, 0, 1, 10, 60, LEASE_TTL_MAX, LEASE_TTL_MAX + 1][..]);
    prop_oneof![
        3 => (prop::sample::select(&[-1i64, 0, 1, 2, 3, 1, 2, 3, 4][..]), ttl)
            .prop_map(|(id, ttl)| Step::Grant(id, ttl)),
        2 => lease_id().prop_map(Step::Revoke),
        1 => prop::collection::vec((lease_id(), -5i64..80), 0..4).prop_map(Step::Checkpoint),
        8 => op_gen().prop_map(Step::Op),
        1 => (-1i64..4).prop_map(Step::Compact),
        1 => (0usize..5).prop_map(Step::Physical),
    ]
}

/// The store's state as the model holds it.
fn observe(store: &KvStore) -> (MKvs, BTreeMap<i64, MLease>) {
    let kvs = all_at(store, 0)
        .into_iter()
        .map(|kv| (kv.key.to_vec(), (kv.value.to_vec(), kv.lease)))
        .collect();
    let leases = store
        .leases()
        .map(|(id, l)| {
            (
                id,
                MLease {
                    ttl: l.ttl,
                    remaining: l.remaining,
                    keys: l.keys().map(|k| k.to_vec()).collect(),
                },
            )
        })
        .collect();
    (kvs, leases)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn leases_agree_with_the_model(steps in prop::collection::vec(step_gen(), 1..64)) {
        let mut store = KvStore::new();
        let mut model = Model::new();
        // Leases 1 and 2 from the start, so that most puts find theirs.
        for (index, id) in [(1, 1), (2, 2)] {
            store.lease_grant(index, id, id * 10).unwrap();
            model.grant(id, id * 10).unwrap();
        }
        let mut index = 2;
        for (i, step) in steps.iter().enumerate() {
            index += 1;
            match step {
                Step::Grant(id, ttl) => {
                    prop_assert_eq!(
                        store.lease_grant(index, *id, *ttl),
                        model.grant(*id, *ttl),
                        "step {}: grant {} {}", i, id, ttl
                    );
                }
                Step::Revoke(id) => {
                    prop_assert_eq!(
                        store.lease_revoke(index, *id),
                        model.revoke(*id),
                        "step {}: revoke {}", i, id
                    );
                }
                Step::Checkpoint(remaining) => {
                    store.lease_checkpoint(index, remaining);
                    model.checkpoint(remaining);
                }
                Step::Op(op) => {
                    let got = store.apply(index, op).map(|r| summarize(&r));
                    prop_assert_eq!(got, model.apply(op), "step {}: {:?}", i, op);
                }
                Step::Compact(back) => {
                    let revision = store.revision() - back;
                    prop_assert_eq!(
                        store.compact(index, revision),
                        model.compact(revision),
                        "step {}: compact {}", i, revision
                    );
                }
                Step::Physical(budget) => {
                    index -= 1;
                    store.compact_step(*budget);
                }
            }
            store.check_invariants();
            prop_assert_eq!(store.applied_index(), index);
            prop_assert_eq!(store.revision(), model.revision, "step {}", i);
            prop_assert_eq!(store.compact_revision(), model.compact);
            let (kvs, leases) = observe(&store);
            prop_assert_eq!(&kvs, &model.kvs, "step {}: keys", i);
            prop_assert_eq!(&leases, &model.leases, "step {}: leases", i);
            prop_assert_eq!(store.lease_count(), model.leases.len());
            for (id, l) in &model.leases {
                let held = store.lease(*id).unwrap();
                prop_assert_eq!(held.key_count(), l.keys.len());
            }
        }
        let bytes = snapshot_of(&store);
        let back = read(&bytes).unwrap();
        back.check_invariants();
        prop_assert_eq!(&back, &store);
        prop_assert_eq!(observe(&back), (model.kvs.clone(), model.leases.clone()));
        prop_assert_eq!(snapshot_of(&back), bytes);
        // Finishing physical compaction changes nothing visible.
        while store.compact_step(3) {}
        store.check_invariants();
        prop_assert_eq!(&back, &store);
    }
}

/// HashKV covers the lease of each version (etcd hashes the stored
/// KeyValue, lease included): two stores that differ only in a key's lease
/// hash differently; stores without leases hash as before leases.
#[test]
fn hash_kv_covers_leases() {
    use skiff_kv::pb::etcdserverpb::request_op::Request;
    use skiff_kv::pb::etcdserverpb::{PutRequest, RequestOp};
    let put = |lease: i64| RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: bytes::Bytes::from_static(b"k"),
            value: bytes::Bytes::from_static(b"v"),
            lease,
            ..PutRequest::default()
        })),
    };
    let mut a = skiff_kv::store::KvStore::new();
    a.lease_grant(1, 1, 10).unwrap();
    a.apply(2, &put(1)).unwrap();
    let mut b = skiff_kv::store::KvStore::new();
    b.mark_applied(1);
    b.apply(2, &put(0)).unwrap();
    assert_ne!(a.hash_kv(0).unwrap().0, b.hash_kv(0).unwrap().0);
}
