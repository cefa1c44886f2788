//! Scripted scenarios for the KV state machine, each checked against what
//! etcd v3 documents (revisions, versions, range options, txn compares,
//! errors).

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::response_op::Response;
use skiff_kv::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use skiff_kv::pb::mvccpb::KeyValue;
use skiff_kv::store::{
    validate_request, GrpcCode, KvError, KvStore, StoreStats, TXN_DEPTH_MAX, TXN_OPS_MAX,
    VALUE_BYTES_MAX,
};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put_op(key: &str, value: &str) -> RequestOp {
    put_req(PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    })
}

fn put_req(req: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(req)),
    }
}

fn del_op(key: &str, range_end: &str, prev_kv: bool) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: b(key),
            range_end: b(range_end),
            prev_kv,
        })),
    }
}

fn range_req(key: &str, range_end: &str) -> RangeRequest {
    RangeRequest {
        key: b(key),
        range_end: b(range_end),
        ..Default::default()
    }
}

fn range_op(req: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(req)),
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

fn cmp(key: &str, result: CompareResult, target: TargetUnion) -> Compare {
    let target_kind = match target {
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    Compare {
        result: result as i32,
        target: target_kind as i32,
        key: b(key),
        range_end: Bytes::new(),
        target_union: Some(target),
    }
}

fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64) -> KeyValue {
    KeyValue {
        key: b(key),
        create_revision: create,
        mod_revision: modr,
        version,
        value: b(value),
        lease: 0,
    }
}

/// A store and the log index of the next entry; checks invariants after
/// every step.
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

    fn apply(&mut self, op: RequestOp) -> Result<ResponseOp, KvError> {
        self.index += 1;
        let result = self.store.apply(self.index, &op);
        self.store.check_invariants();
        assert_eq!(self.store.applied_index(), self.index);
        result
    }

    fn put(&mut self, key: &str, value: &str) -> PutResponse {
        match self.apply(put_op(key, value)).unwrap().response {
            Some(Response::ResponsePut(r)) => r,
            other => panic!("not a put response: {other:?}"),
        }
    }

    fn put_with(&mut self, req: PutRequest) -> Result<PutResponse, KvError> {
        self.apply(put_req(req)).map(|r| match r.response {
            Some(Response::ResponsePut(r)) => r,
            other => panic!("not a put response: {other:?}"),
        })
    }

    fn delete(&mut self, key: &str, range_end: &str) -> DeleteRangeResponse {
        match self.apply(del_op(key, range_end, true)).unwrap().response {
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

    fn range(&self, req: RangeRequest) -> Result<RangeResponse, KvError> {
        self.store.range(&req)
    }

    fn get(&self, key: &str) -> Option<KeyValue> {
        let resp = self.range(range_req(key, "")).unwrap();
        assert!(resp.kvs.len() <= 1);
        resp.kvs.into_iter().next()
    }

    fn keys(&self, req: RangeRequest) -> Vec<String> {
        self.range(req)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect()
    }
}

fn rev_of(header: &Option<skiff_kv::pb::etcdserverpb::ResponseHeader>) -> i64 {
    header.as_ref().expect("responses carry a header").revision
}

#[test]
fn revisions_and_versions_follow_etcd() {
    let mut h = Harness::new();
    assert_eq!(h.store.revision(), 1, "etcd starts at revision 1");
    assert_eq!(h.store.applied_index(), 0);

    // put foo; put foo; delete foo; put foo
    assert_eq!(rev_of(&h.put("foo", "v1").header), 2);
    assert_eq!(h.get("foo"), Some(kv("foo", "v1", 2, 2, 1)));
    assert_eq!(rev_of(&h.put("foo", "v2").header), 3);
    assert_eq!(h.get("foo"), Some(kv("foo", "v2", 2, 3, 2)));
    let deleted = h.delete("foo", "");
    assert_eq!(
        (rev_of(&deleted.header), deleted.deleted),
        (4, 1),
        "a delete is a change"
    );
    assert_eq!(deleted.prev_kvs, vec![kv("foo", "v2", 2, 3, 2)]);
    assert_eq!(h.get("foo"), None);
    assert_eq!(rev_of(&h.put("foo", "v3").header), 5);
    assert_eq!(
        h.get("foo"),
        Some(kv("foo", "v3", 5, 5, 1)),
        "re-created: new create revision, version 1"
    );

    // Deleting nothing changes nothing, not even the revision.
    let nothing = h.delete("bar", "");
    assert_eq!((rev_of(&nothing.header), nothing.deleted), (5, 0));
    assert_eq!(h.store.revision(), 5);

    // Another key moves the store revision, not foo's.
    h.put("bar", "x");
    assert_eq!(h.store.revision(), 6);
    assert_eq!(h.get("foo"), Some(kv("foo", "v3", 5, 5, 1)));
    // The same value again is still a modification.
    h.put("bar", "x");
    assert_eq!(h.get("bar"), Some(kv("bar", "x", 6, 7, 2)));
    assert_eq!(h.store.len(), 2);
    assert_eq!(
        h.range(range_req("a", ""))
            .unwrap()
            .header
            .unwrap()
            .revision,
        7
    );
}

#[test]
fn put_options() {
    let mut h = Harness::new();
    let first = h
        .put_with(PutRequest {
            key: b("k"),
            value: b("v1"),
            prev_kv: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(first.prev_kv, None, "no previous kv for a new key");
    let second = h
        .put_with(PutRequest {
            key: b("k"),
            value: b("v2"),
            prev_kv: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(second.prev_kv, Some(kv("k", "v1", 2, 2, 1)));

    // ignore_value keeps the value and still counts as a modification.
    h.put_with(PutRequest {
        key: b("k"),
        ignore_value: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(h.get("k"), Some(kv("k", "v2", 2, 4, 3)));
    h.put_with(PutRequest {
        key: b("k"),
        value: b("v3"),
        ignore_lease: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(h.get("k"), Some(kv("k", "v3", 2, 5, 4)));

    let before = h.store.clone();
    let cases = [
        (
            PutRequest {
                key: b("missing"),
                ignore_value: true,
                ..Default::default()
            },
            KvError::KeyNotFound,
        ),
        (
            PutRequest {
                key: b("missing"),
                ignore_lease: true,
                ..Default::default()
            },
            KvError::KeyNotFound,
        ),
        (
            PutRequest {
                key: b("k"),
                value: b("v"),
                lease: 42,
                ..Default::default()
            },
            KvError::LeaseNotFound,
        ),
        (
            PutRequest {
                value: b("v"),
                ..Default::default()
            },
            KvError::EmptyKey,
        ),
        (
            PutRequest {
                key: b("k"),
                value: b("v"),
                ignore_value: true,
                ..Default::default()
            },
            KvError::ValueProvided,
        ),
        (
            PutRequest {
                key: b("k"),
                lease: 1,
                ignore_lease: true,
                ..Default::default()
            },
            KvError::LeaseProvided,
        ),
        (
            PutRequest {
                key: b("k"),
                value: Bytes::from(vec![0u8; VALUE_BYTES_MAX + 1]),
                ..Default::default()
            },
            KvError::RequestTooLarge,
        ),
    ];
    for (req, want) in cases {
        let index = h.index + 1;
        assert_eq!(h.put_with(req), Err(want));
        assert_eq!(h.store.applied_index(), index, "an error still applies");
        let mut unchanged = before.clone();
        unchanged.mark_applied(index);
        assert_eq!(h.store, unchanged, "an error changes nothing else");
    }
}

fn abc_store() -> Harness {
    let mut h = Harness::new();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("c2", "0"), ("d", "4")] {
        h.put(k, v);
    }
    h.put("b", "1"); // b: version 2, mod 7
    h
}

#[test]
fn range_key_forms() {
    let h = abc_store();
    assert_eq!(h.keys(range_req("c", "")), ["c"], "key alone is one key");
    assert_eq!(h.keys(range_req("zz", "")), Vec::<String>::new());
    assert_eq!(h.keys(range_req("b", "c2")), ["b", "c"], "[key, range_end)");
    assert_eq!(
        h.keys(range_req("c", "d")),
        ["c", "c2"],
        "prefix c = [c, d)"
    );
    assert_eq!(h.keys(range_req("c", "\0")), ["c", "c2", "d"], "from key");
    assert_eq!(
        h.keys(range_req("\0", "\0")),
        ["a", "b", "c", "c2", "d"],
        "all keys"
    );
    assert_eq!(h.keys(range_req("c", "c")), Vec::<String>::new());
    assert_eq!(
        h.keys(range_req("d", "a")),
        Vec::<String>::new(),
        "end before key"
    );
    assert_eq!(h.range(range_req("", "")), Err(KvError::EmptyKey));
    assert_eq!(h.range(range_req("", "\0")), Err(KvError::EmptyKey));
}

#[test]
fn range_limit_count_and_flags() {
    let h = abc_store();
    let all = || range_req("\0", "\0");
    let resp = h.range(RangeRequest { limit: 2, ..all() }).unwrap();
    assert_eq!(
        resp.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        [b("a"), b("b")]
    );
    assert!(resp.more);
    assert_eq!(resp.count, 5, "count is before limit");
    let resp = h.range(RangeRequest { limit: 5, ..all() }).unwrap();
    assert!(!resp.more);
    assert_eq!(resp.kvs.len(), 5);
    let resp = h.range(RangeRequest { limit: -3, ..all() }).unwrap();
    assert_eq!(
        (resp.kvs.len(), resp.more),
        (5, false),
        "negative limit is none"
    );

    let resp = h
        .range(RangeRequest {
            count_only: true,
            limit: 1,
            ..all()
        })
        .unwrap();
    assert_eq!((resp.kvs.len(), resp.count, resp.more), (0, 5, false));

    let resp = h
        .range(RangeRequest {
            keys_only: true,
            ..range_req("b", "")
        })
        .unwrap();
    assert_eq!(resp.kvs, vec![kv("b", "", 3, 7, 2)]);
}

#[test]
fn range_sorting() {
    let h = abc_store();
    let sorted = |order: SortOrder, target: SortTarget| {
        h.keys(RangeRequest {
            sort_order: order as i32,
            sort_target: target as i32,
            ..range_req("\0", "\0")
        })
    };
    assert_eq!(
        sorted(SortOrder::Descend, SortTarget::Key),
        ["d", "c2", "c", "b", "a"]
    );
    assert_eq!(
        sorted(SortOrder::Ascend, SortTarget::Key),
        ["a", "b", "c", "c2", "d"]
    );
    assert_eq!(
        sorted(SortOrder::Ascend, SortTarget::Value),
        ["c2", "b", "c", "a", "d"]
    );
    assert_eq!(
        sorted(SortOrder::Descend, SortTarget::Value),
        ["d", "a", "c", "b", "c2"]
    );
    // NONE with a target other than KEY sorts ascending (etcd).
    assert_eq!(
        sorted(SortOrder::None, SortTarget::Mod),
        ["a", "c", "c2", "d", "b"]
    );
    assert_eq!(
        sorted(SortOrder::Descend, SortTarget::Create),
        ["d", "c2", "c", "b", "a"]
    );
    // Ties keep key order.
    assert_eq!(
        sorted(SortOrder::Descend, SortTarget::Version),
        ["b", "a", "c", "c2", "d"]
    );
    // Limit applies after sorting.
    let resp = h
        .range(RangeRequest {
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Value as i32,
            limit: 1,
            ..range_req("\0", "\0")
        })
        .unwrap();
    assert_eq!((resp.kvs[0].key.clone(), resp.more), (b("d"), true));
}

#[test]
fn range_revision_filters() {
    // create revisions: a 2, b 3, c 4, c2 5, d 6; b modified at 7.
    let h = abc_store();
    let filtered = |req: RangeRequest| {
        let resp = h.range(req).unwrap();
        assert_eq!(resp.count, 5, "count ignores the revision filters (etcd)");
        resp.kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect::<Vec<_>>()
    };
    let all = || range_req("\0", "\0");
    assert_eq!(
        filtered(RangeRequest {
            min_mod_revision: 5,
            ..all()
        }),
        ["b", "c2", "d"]
    );
    assert_eq!(
        filtered(RangeRequest {
            max_mod_revision: 4,
            ..all()
        }),
        ["a", "c"]
    );
    assert_eq!(
        filtered(RangeRequest {
            min_create_revision: 3,
            max_create_revision: 5,
            ..all()
        }),
        ["b", "c", "c2"]
    );
    let resp = h
        .range(RangeRequest {
            min_create_revision: 3,
            limit: 2,
            ..all()
        })
        .unwrap();
    assert!(resp.more);
    assert_eq!(resp.kvs.len(), 2);
}

#[test]
fn range_at_a_revision() {
    let h = abc_store();
    let at = |revision| {
        h.range(RangeRequest {
            revision,
            ..range_req("a", "")
        })
    };
    assert_eq!(
        at(7).unwrap().kvs.len(),
        1,
        "the current revision is served"
    );
    assert_eq!(at(0).unwrap().kvs.len(), 1);
    // Older revisions read history; the header still says the current one.
    let old = at(2).unwrap();
    assert_eq!(old.kvs, vec![kv("a", "3", 2, 2, 1)]);
    assert_eq!(rev_of(&old.header), 7);
    assert_eq!(at(1).unwrap().kvs, vec![], "before the first write");
    assert_eq!(at(-1), Err(KvError::Compacted));
    assert_eq!(at(8), Err(KvError::FutureRevision));
}

#[test]
fn delete_range_forms() {
    let mut h = abc_store();
    let resp = h.delete("c", "d");
    assert_eq!(resp.deleted, 2);
    assert_eq!(
        resp.prev_kvs,
        vec![kv("c", "2", 4, 4, 1), kv("c2", "0", 5, 5, 1)]
    );
    assert_eq!(rev_of(&resp.header), 8, "one revision for the whole delete");
    assert_eq!(h.store.revision(), 8);
    let resp = match h.apply(del_op("\0", "\0", false)).unwrap().response {
        Some(Response::ResponseDeleteRange(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((resp.deleted, resp.prev_kvs.len()), (3, 0));
    assert!(h.store.is_empty());
    // History stays until compacted; then nothing is held.
    assert!(h.store.approx_bytes() > 0);
    h.index += 1;
    h.store.compact(h.index, h.store.revision()).unwrap();
    while h.store.compact_step(3) {
        h.store.check_invariants();
    }
    h.store.check_invariants();
    assert_eq!(h.store.stats(), StoreStats::default());
    assert_eq!(h.store.approx_bytes(), 0);
    assert_eq!(h.apply(del_op("", "", false)), Err(KvError::EmptyKey));
}

#[test]
fn txn_compare_targets_and_results() {
    let mut h = abc_store(); // b: create 3, mod 7, version 2, value "1"
    use CompareResult::*;
    use TargetUnion::*;
    let holds =
        |h: &mut Harness, c: Compare| h.txn(txn_op(vec![c], vec![], vec![])).unwrap().succeeded;
    let cases = [
        (cmp("b", Equal, Version(2)), true),
        (cmp("b", Greater, Version(1)), true),
        (cmp("b", Less, Version(2)), false),
        (cmp("b", NotEqual, Version(2)), false),
        (cmp("b", Equal, CreateRevision(3)), true),
        (cmp("b", Less, ModRevision(8)), true),
        (cmp("b", Greater, ModRevision(7)), false),
        (cmp("b", Equal, Value(b("1"))), true),
        (cmp("b", Greater, Value(b("0"))), true),
        (cmp("b", Less, Value(b("10"))), true),
        (cmp("b", Equal, Lease(0)), true),
        (cmp("b", NotEqual, Lease(5)), true),
        // A missing key has version/create/mod 0 ...
        (cmp("zz", Equal, Version(0)), true),
        (cmp("zz", Equal, CreateRevision(0)), true),
        (cmp("zz", Less, ModRevision(1)), true),
        (cmp("zz", Equal, Lease(0)), true),
        // ... and fails every value compare, even with an empty value.
        (cmp("zz", Equal, Value(Bytes::new())), false),
        (cmp("zz", NotEqual, Value(b("x"))), false),
        (cmp("zz", Less, Value(b("x"))), false),
    ];
    for (compare, want) in cases {
        assert_eq!(holds(&mut h, compare.clone()), want, "{compare:?}");
    }
    // Several compares: all must hold.
    let resp = h
        .txn(txn_op(
            vec![cmp("a", Equal, Version(1)), cmp("b", Equal, Version(1))],
            vec![],
            vec![],
        ))
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(h.store.revision(), 7, "read-only txns change nothing");
}

#[test]
fn txn_compare_over_a_range() {
    let mut h = abc_store();
    use CompareResult::*;
    use TargetUnion::*;
    let holds = |h: &mut Harness, mut c: Compare, end: &str| {
        c.range_end = b(end);
        h.txn(txn_op(vec![c], vec![], vec![])).unwrap().succeeded
    };
    // versions: a 1, b 2, c 1, c2 1, d 1
    assert!(holds(&mut h, cmp("c", Equal, Version(1)), "d"));
    assert!(
        !holds(&mut h, cmp("a", Equal, Version(1)), "c"),
        "b has version 2"
    );
    assert!(holds(&mut h, cmp("a", Greater, Version(0)), "\0"));
    assert!(holds(&mut h, cmp("\0", Less, ModRevision(8)), "\0"));
    assert!(!holds(&mut h, cmp("\0", Less, ModRevision(7)), "\0"));
    // An empty range compares like a missing key.
    assert!(holds(&mut h, cmp("x", Equal, Version(0)), "z"));
    assert!(!holds(&mut h, cmp("x", Equal, Value(Bytes::new())), "z"));
}

#[test]
fn txn_writes_share_one_revision() {
    let mut h = abc_store();
    use CompareResult::*;
    use TargetUnion::*;
    let resp = h
        .txn(txn_op(
            vec![cmp("a", Equal, Value(b("3")))],
            vec![
                range_op(range_req("a", "")),
                put_op("a", "new"),
                range_op(range_req("a", "")),
                put_op("n", "1"),
                del_op("c", "d", true),
                range_op(range_req("\0", "\0")),
            ],
            vec![put_op("fail", "1")],
        ))
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(rev_of(&resp.header), 8);
    assert_eq!(h.store.revision(), 8);
    let r = |i: usize| match &resp.responses[i].response {
        Some(Response::ResponseRange(r)) => r.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(r(0).kvs, vec![kv("a", "3", 2, 2, 1)]);
    assert_eq!(rev_of(&r(0).header), 7, "nothing written yet");
    assert_eq!(
        r(2).kvs,
        vec![kv("a", "new", 2, 8, 2)],
        "sees the txn's own write"
    );
    assert_eq!(rev_of(&r(2).header), 8);
    assert_eq!(
        r(5).kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        [b("a"), b("b"), b("d"), b("n")]
    );
    match &resp.responses[4].response {
        Some(Response::ResponseDeleteRange(d)) => assert_eq!(d.deleted, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.get("n"), Some(kv("n", "1", 8, 8, 1)));
    assert_eq!(h.get("fail"), None);

    // The failure branch runs when a compare fails.
    let resp = h
        .txn(txn_op(
            vec![cmp("a", Equal, Value(b("3")))],
            vec![put_op("ok", "1")],
            vec![put_op("fail", "1")],
        ))
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(h.get("fail"), Some(kv("fail", "1", 9, 9, 1)));
    assert_eq!(h.get("ok"), None);

    // A txn whose executed branch deletes nothing changes nothing.
    let resp = h
        .txn(txn_op(vec![], vec![del_op("nothing", "", false)], vec![]))
        .unwrap();
    assert_eq!((resp.succeeded, rev_of(&resp.header)), (true, 9));
    assert_eq!(h.store.revision(), 9);
}

#[test]
fn nested_txns() {
    let mut h = abc_store();
    use CompareResult::*;
    use TargetUnion::*;
    let resp = h
        .txn(txn_op(
            vec![],
            vec![
                put_op("a", "changed"),
                // Nested compares see the state before the whole txn (etcd).
                txn_op(
                    vec![cmp("a", Equal, Value(b("3")))],
                    vec![put_op("x", "then"), range_op(range_req("a", ""))],
                    vec![put_op("x", "else")],
                ),
            ],
            vec![],
        ))
        .unwrap();
    assert_eq!(h.get("x").unwrap().value, b("then"));
    let nested = match &resp.responses[1].response {
        Some(Response::ResponseTxn(t)) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert!(nested.succeeded);
    assert_eq!(rev_of(&nested.header), 8);
    match &nested.responses[1].response {
        Some(Response::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b("changed")),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.store.revision(), 8);
}

#[test]
fn txn_errors_change_nothing() {
    let mut h = abc_store();
    let before = h.store.clone();
    let failing = [
        (
            txn_op(
                vec![],
                vec![
                    put_op("new", "1"),
                    del_op("a", "b", false),
                    put_req(PutRequest {
                        key: b("z"),
                        lease: 9,
                        ..Default::default()
                    }),
                ],
                vec![],
            ),
            KvError::LeaseNotFound,
        ),
        (
            txn_op(
                vec![],
                vec![
                    put_op("b", "2"),
                    put_req(PutRequest {
                        key: b("missing"),
                        ignore_value: true,
                        ..Default::default()
                    }),
                ],
                vec![],
            ),
            KvError::KeyNotFound,
        ),
        (
            txn_op(
                vec![],
                vec![
                    put_op("b", "2"),
                    range_op(RangeRequest {
                        revision: 99,
                        ..range_req("a", "")
                    }),
                ],
                vec![],
            ),
            KvError::FutureRevision,
        ),
    ];
    for (op, want) in failing {
        assert_eq!(h.txn(op), Err(want.clone()), "{want}");
        let mut expected = before.clone();
        expected.mark_applied(h.index);
        assert_eq!(h.store, expected);
    }
    // With history, a Range at the starting revision reads it, also for
    // keys this txn already changed; revision 0 reads the txn's own writes.
    let resp = h
        .txn(txn_op(
            vec![],
            vec![
                put_op("b", "2"),
                range_op(RangeRequest {
                    revision: 7,
                    ..range_req("b", "")
                }),
                range_op(range_req("b", "")),
            ],
            vec![],
        ))
        .unwrap();
    let ranges: Vec<Vec<KeyValue>> = resp.responses[1..]
        .iter()
        .map(|r| match &r.response {
            Some(Response::ResponseRange(r)) => {
                assert_eq!(rev_of(&r.header), 8);
                r.kvs.clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        ranges,
        vec![vec![kv("b", "1", 3, 7, 2)], vec![kv("b", "2", 3, 8, 3)]]
    );
}

#[test]
fn validation_rejects_what_etcd_rejects() {
    let nested = |success, failure| txn_op(vec![], success, failure);
    let dup = [
        nested(vec![put_op("a", "1"), put_op("a", "2")], vec![]),
        nested(vec![put_op("b", "1"), del_op("a", "c", false)], vec![]),
        nested(vec![del_op("\0", "\0", false), put_op("b", "1")], vec![]),
        nested(
            vec![put_op("a", "1"), nested(vec![put_op("a", "2")], vec![])],
            vec![],
        ),
        nested(
            vec![nested(vec![], vec![put_op("a", "2")]), put_op("a", "1")],
            vec![],
        ),
        // A put in one nested txn and a delete in a later one (etcd lets
        // this through; one path would write the key twice).
        nested(
            vec![
                nested(vec![put_op("a", "1")], vec![]),
                nested(vec![del_op("a", "", false)], vec![]),
            ],
            vec![],
        ),
    ];
    for op in dup {
        assert_eq!(validate_request(&op), Err(KvError::DuplicateKey), "{op:?}");
        let mut h = abc_store();
        let before = h.store.clone();
        assert_eq!(h.apply(op), Err(KvError::DuplicateKey));
        assert_eq!(h.store.revision(), before.revision());
    }
    let fine = [
        // Branches of one txn are separate requests.
        txn_op(vec![], vec![put_op("a", "1")], vec![put_op("a", "2")]),
        // The branches of a nested txn exclude each other.
        nested(
            vec![nested(vec![put_op("a", "1")], vec![del_op("a", "", false)])],
            vec![],
        ),
        nested(
            vec![nested(vec![put_op("a", "1")], vec![put_op("a", "2")])],
            vec![],
        ),
        // Deletes may overlap deletes; reads overlap anything.
        nested(
            vec![
                del_op("a", "c", false),
                del_op("b", "", false),
                range_op(range_req("b", "")),
                put_op("c", "1"),
            ],
            vec![],
        ),
    ];
    for op in fine {
        assert_eq!(validate_request(&op), Ok(()), "{op:?}");
    }

    let many = |n: usize| {
        nested(
            (0..n).map(|i| put_op(&format!("k{i}"), "v")).collect(),
            vec![],
        )
    };
    assert_eq!(validate_request(&many(TXN_OPS_MAX)), Ok(()));
    assert_eq!(
        validate_request(&many(TXN_OPS_MAX + 1)),
        Err(KvError::TooManyOps)
    );
    let compares = txn_op(
        (0..=TXN_OPS_MAX)
            .map(|_| cmp("a", CompareResult::Equal, TargetUnion::Version(0)))
            .collect(),
        vec![],
        vec![],
    );
    assert_eq!(validate_request(&compares), Err(KvError::TooManyOps));
    // A nested txn gets what its parent left: parent uses 100, child 29.
    let mut ops: Vec<RequestOp> = (0..99).map(|i| put_op(&format!("p{i}"), "v")).collect();
    ops.push(many(29));
    assert_eq!(
        validate_request(&nested(ops.clone(), vec![])),
        Err(KvError::TooManyOps)
    );
    ops.pop();
    ops.push(many(28));
    assert_eq!(validate_request(&nested(ops, vec![])), Ok(()));

    let mut deep = put_op("a", "1");
    for _ in 0..TXN_DEPTH_MAX {
        deep = nested(vec![deep], vec![]);
    }
    assert_eq!(validate_request(&deep), Ok(()));
    assert_eq!(
        validate_request(&nested(vec![deep], vec![])),
        Err(KvError::TxnTooDeep)
    );

    let empty_compare = txn_op(
        vec![cmp("", CompareResult::Equal, TargetUnion::Version(0))],
        vec![],
        vec![],
    );
    assert_eq!(validate_request(&empty_compare), Err(KvError::EmptyKey));
    assert_eq!(
        validate_request(&nested(vec![put_op("", "v")], vec![])),
        Err(KvError::EmptyKey)
    );
    assert_eq!(
        validate_request(&nested(vec![range_op(range_req("", ""))], vec![])),
        Err(KvError::EmptyKey)
    );
    let no_request = RequestOp { request: None };
    assert_eq!(validate_request(&no_request), Err(KvError::KeyNotFound));
    assert_eq!(
        validate_request(&nested(vec![], vec![no_request.clone()])),
        Err(KvError::KeyNotFound)
    );
    let mut h = Harness::new();
    assert_eq!(h.apply(no_request), Err(KvError::KeyNotFound));
}

#[test]
fn error_messages_and_codes_are_etcds() {
    let cases = [
        (
            KvError::EmptyKey,
            "etcdserver: key is not provided",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::KeyNotFound,
            "etcdserver: key not found",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::ValueProvided,
            "etcdserver: value is provided",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::LeaseProvided,
            "etcdserver: lease is provided",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::LeaseNotFound,
            "etcdserver: requested lease not found",
            GrpcCode::NotFound,
        ),
        (
            KvError::DuplicateKey,
            "etcdserver: duplicate key given in txn request",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::TooManyOps,
            "etcdserver: too many operations in txn request",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::RequestTooLarge,
            "etcdserver: request is too large",
            GrpcCode::InvalidArgument,
        ),
        (
            KvError::Compacted,
            "etcdserver: mvcc: required revision has been compacted",
            GrpcCode::OutOfRange,
        ),
        (
            KvError::FutureRevision,
            "etcdserver: mvcc: required revision is a future revision",
            GrpcCode::OutOfRange,
        ),
    ];
    for (error, message, code) in cases {
        assert_eq!(error.to_string(), message);
        assert_eq!(error.grpc_code(), code);
    }
    assert_eq!(GrpcCode::InvalidArgument.as_i32(), 3);
    assert_eq!(GrpcCode::NotFound.as_i32(), 5);
    assert_eq!(GrpcCode::OutOfRange.as_i32(), 11);
}

#[test]
fn applied_index_counts_every_entry() {
    let mut h = Harness::new();
    h.store.mark_applied(1);
    h.index = 1;
    h.put("a", "1");
    assert_eq!(h.store.applied_index(), 2);
    h.store.mark_applied(5);
    assert_eq!(h.store.applied_index(), 5);
    assert_eq!(h.store.revision(), 2);
    let top_range = h.store.apply(6, &range_op(range_req("a", ""))).unwrap();
    match top_range.response {
        Some(Response::ResponseRange(r)) => assert_eq!(r.kvs.len(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!((h.store.applied_index(), h.store.revision()), (6, 2));
}

#[test]
#[should_panic(expected = "applied after")]
fn applying_an_index_twice_is_a_bug() {
    let mut store = KvStore::new();
    store.apply(3, &put_op("a", "1")).unwrap();
    let _ = store.apply(3, &put_op("a", "1"));
}

#[test]
fn approx_bytes_follows_the_keyspace() {
    let mut h = Harness::new();
    h.put("key", "value");
    let one = h.store.approx_bytes();
    assert!(one >= 8);
    h.put("key", "a much longer value than before");
    assert!(h.store.approx_bytes() > one);
    // Versions accumulate until a compaction removes them: the second one
    // adds its value and its overhead, not the key again.
    assert!(h.store.approx_bytes() >= one + skiff_kv::store::VERSION_OVERHEAD_BYTES);
    assert_eq!(h.store.stats().versions, 2);
    h.put("key", "value");
    assert_eq!(h.store.stats().versions, 3);
    h.index += 1;
    h.store.compact(h.index, h.store.revision()).unwrap();
    while h.store.compact_step(1) {}
    h.store.check_invariants();
    assert_eq!(h.store.approx_bytes(), one);
    h.delete("key", "");
    assert!(h.store.approx_bytes() > one, "the tombstone is held");
    h.index += 1;
    h.store.compact(h.index, h.store.revision()).unwrap();
    assert!(!h.store.compact_step(10));
    h.store.check_invariants();
    assert_eq!(h.store.approx_bytes(), 0);
    assert_eq!(h.store.stats(), StoreStats::default());
}

// ---- MVCC: history, tombstones, generations, compaction ----

fn get_at(h: &Harness, key: &str, revision: i64) -> Result<Vec<KeyValue>, KvError> {
    h.range(RangeRequest {
        revision,
        ..range_req(key, "")
    })
    .map(|r| r.kvs)
}

#[test]
fn tombstones_hide_a_key_only_from_later_revisions() {
    let mut h = Harness::new();
    h.put("k", "v1"); // 2
    h.put("k", "v2"); // 3
    let resp = h.delete("k", ""); // 4
    assert_eq!(resp.prev_kvs, vec![kv("k", "v2", 2, 3, 2)]);
    h.put("other", "x"); // 5
    assert_eq!(get_at(&h, "k", 0).unwrap(), vec![]);
    assert_eq!(get_at(&h, "k", 5).unwrap(), vec![]);
    assert_eq!(get_at(&h, "k", 4).unwrap(), vec![]);
    assert_eq!(get_at(&h, "k", 3).unwrap(), vec![kv("k", "v2", 2, 3, 2)]);
    assert_eq!(get_at(&h, "k", 2).unwrap(), vec![kv("k", "v1", 2, 2, 1)]);
    assert_eq!(get_at(&h, "k", 1).unwrap(), vec![]);
    assert_eq!(h.store.len(), 1);
    assert_eq!(h.store.stats().versions, 4);
    // Deleting a missing key writes nothing (no second tombstone).
    let resp = h.delete("k", "");
    assert_eq!(resp.deleted, 0);
    assert_eq!(h.store.revision(), 5);
}

#[test]
fn a_recreated_key_starts_a_new_generation() {
    let mut h = Harness::new();
    h.put("k", "a"); // 2
    h.put("k", "b"); // 3
    h.delete("k", ""); // 4
    let resp = h.put_with(PutRequest {
        key: b("k"),
        value: b("c"),
        prev_kv: true,
        ..Default::default()
    });
    assert_eq!(resp.unwrap().prev_kv, None, "a tombstone is no previous kv");
    assert_eq!(h.get("k"), Some(kv("k", "c", 5, 5, 1)));
    h.put("k", "d"); // 6
    assert_eq!(h.get("k"), Some(kv("k", "d", 5, 6, 2)));
    assert_eq!(get_at(&h, "k", 3).unwrap(), vec![kv("k", "b", 2, 3, 2)]);
    // ignore_value on a deleted key: not found, as on a missing one.
    h.delete("k", "");
    assert_eq!(
        h.put_with(PutRequest {
            key: b("k"),
            ignore_value: true,
            ..Default::default()
        }),
        Err(KvError::KeyNotFound)
    );
}

#[test]
fn history_reads_honour_filters_and_count() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("b", "1"); // 3
    h.put("a", "2"); // 4
    h.put("c", "1"); // 5
    h.delete("b", ""); // 6
    let at4 = |req: RangeRequest| h.range(RangeRequest { revision: 4, ..req }).unwrap();
    let all = at4(range_req("\0", "\0"));
    assert_eq!(all.count, 2);
    assert_eq!(all.kvs, vec![kv("a", "2", 2, 4, 2), kv("b", "1", 3, 3, 1)]);
    let recent = at4(RangeRequest {
        min_mod_revision: 4,
        ..range_req("\0", "\0")
    });
    assert_eq!((recent.count, recent.kvs.len()), (2, 1));
    let created_late = at4(RangeRequest {
        min_create_revision: 3,
        ..range_req("\0", "\0")
    });
    assert_eq!(created_late.kvs, vec![kv("b", "1", 3, 3, 1)]);
    let limited = at4(RangeRequest {
        limit: 1,
        ..range_req("\0", "\0")
    });
    assert!(limited.more);
    assert_eq!(limited.kvs.len(), 1);
    let counted = at4(RangeRequest {
        count_only: true,
        ..range_req("\0", "\0")
    });
    assert_eq!((counted.count, counted.kvs.len()), (2, 0));
    let by_mod = at4(RangeRequest {
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Mod as i32,
        ..range_req("\0", "\0")
    });
    assert_eq!(by_mod.kvs[0].key, b("a"));
    // Now: b is gone, c exists.
    let now = h.range(range_req("\0", "\0")).unwrap();
    assert_eq!(now.count, 2);
    assert_eq!(now.kvs[1], kv("c", "1", 5, 5, 1));
}

#[test]
fn compaction_follows_etcd() {
    let mut h = Harness::new();
    h.put("k", "1"); // 2
    h.put("k", "2"); // 3
    h.put("gone", "x"); // 4
    h.delete("gone", ""); // 5
    h.put("k", "3"); // 6
    let compact = |h: &mut Harness, revision| {
        h.index += 1;
        let result = h.store.compact(h.index, revision);
        assert_eq!(h.store.applied_index(), h.index);
        h.store.check_invariants();
        result
    };
    assert_eq!(compact(&mut h, 7), Err(KvError::FutureRevision));
    assert_eq!(compact(&mut h, 0), Err(KvError::Compacted));
    let digest = h.store.digest();
    let hash = h.store.hash_kv(0).unwrap();
    assert_eq!(compact(&mut h, 5), Ok(()));
    assert_eq!(h.store.compact_revision(), 5);
    assert_eq!(h.store.physically_compacted(), 0, "removal not done yet");
    // Logically compacted at once.
    let err = get_at(&h, "k", 4).unwrap_err();
    assert_eq!(err, KvError::Compacted);
    assert_eq!(
        err.to_string(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        get_at(&h, "k", 7).unwrap_err().to_string(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(err.grpc_code(), GrpcCode::OutOfRange);
    // A read exactly at the compact revision is served.
    assert_eq!(get_at(&h, "k", 5).unwrap(), vec![kv("k", "2", 2, 3, 2)]);
    assert_eq!(get_at(&h, "gone", 5).unwrap(), vec![]);
    assert_eq!(h.store.hash_kv(4), Err(KvError::Compacted));
    assert_eq!(h.store.hash_kv(7), Err(KvError::FutureRevision));
    let hash_after = h.store.hash_kv(0).unwrap();
    assert_eq!((hash_after.1, hash_after.2), (5, 6));
    assert_ne!(
        hash_after.0, hash.0,
        "versions at or below 5 leave the hash"
    );
    let digest_logical = h.store.digest();
    assert_ne!(digest_logical, digest);
    let versions_before = h.store.stats().versions;
    assert_eq!(versions_before, 5);
    // Physical removal in steps of one version: invisible to every read.
    let mut steps = 0;
    while h.store.compact_step(1) {
        steps += 1;
        h.store.check_invariants();
        assert_eq!(h.store.digest(), digest_logical);
        assert_eq!(h.store.hash_kv(0).unwrap(), hash_after);
        assert_eq!(get_at(&h, "k", 5).unwrap(), vec![kv("k", "2", 2, 3, 2)]);
    }
    assert!(steps >= 4, "{steps} steps");
    assert_eq!(h.store.physically_compacted(), 5);
    // k@2, gone@4 and its tombstone @5 are gone; k@3 (read at 5) and k@6 stay.
    assert_eq!(h.store.stats().versions, 2);
    assert_eq!(h.store.stats().keys, 1);
    assert_eq!(h.store.digest(), digest_logical);
    assert_eq!(compact(&mut h, 5), Err(KvError::Compacted));
    assert_eq!(compact(&mut h, 4), Err(KvError::Compacted));
    assert_eq!(compact(&mut h, 6), Ok(()));
    assert!(!h.store.compact_step(100));
    assert_eq!(h.store.stats().versions, 1);
    assert_eq!(h.get("k"), Some(kv("k", "3", 2, 6, 3)));
}

#[test]
fn a_second_compaction_takes_over_the_first() {
    let mut h = Harness::new();
    for i in 0..20 {
        h.put(&format!("k{}", i % 4), &i.to_string());
    }
    h.delete("k1", "");
    h.index += 1;
    h.store.compact(h.index, 10).unwrap();
    assert!(h.store.compact_step(3));
    h.put("k2", "late");
    h.index += 1;
    h.store.compact(h.index, 18).unwrap();
    assert_eq!(h.store.physically_compacted(), 0);
    h.store.check_invariants();
    let digest = h.store.digest();
    while h.store.compact_step(2) {
        h.store.check_invariants();
    }
    assert_eq!(h.store.physically_compacted(), 18);
    assert_eq!(h.store.digest(), digest);
    assert!(!h.store.compact_step(0));
    // Each key keeps its latest version <= 18 and what came later.
    assert_eq!(get_at(&h, "k0", 18).unwrap()[0].mod_revision, 18);
}

#[test]
fn compaction_is_an_applied_entry() {
    let mut h = Harness::new();
    h.put("a", "1");
    h.index += 1;
    h.store.compact(h.index, 2).unwrap();
    assert_eq!(h.store.applied_index(), h.index);
    assert_eq!(h.store.revision(), 2, "compaction writes no revision");
}

#[test]
#[should_panic(expected = "applied after")]
fn compacting_at_an_old_index_is_a_bug() {
    let mut store = KvStore::new();
    store.apply(3, &put_op("a", "1")).unwrap();
    let _ = store.compact(3, 2);
}

#[test]
fn a_frozen_view_keeps_its_state() {
    let mut h = Harness::new();
    h.put("a", "1");
    h.put("b", "2");
    let view = h.store.freeze();
    let mut before = Vec::new();
    view.write_snapshot(&mut before).unwrap();
    assert_eq!(before, {
        let mut v = Vec::new();
        h.store.write_snapshot(&mut v).unwrap();
        v
    });
    h.put("a", "3");
    h.delete("b", "");
    h.index += 1;
    h.store.compact(h.index, h.store.revision()).unwrap();
    while h.store.compact_step(1) {}
    let mut after = Vec::new();
    let info = view.write_snapshot(&mut after).unwrap();
    assert_eq!(after, before, "the view serializes the state it froze");
    assert_eq!((info.revision, info.key_count), (3, 2));
    let thread_view = view.clone();
    let bytes = std::thread::spawn(move || {
        let mut out = Vec::new();
        thread_view.write_snapshot(&mut out).unwrap();
        out
    })
    .join()
    .unwrap();
    assert_eq!(bytes, before);
}

#[test]
fn a_hot_key_keeps_one_version_per_put() {
    // Complexity lives in the code (one seek and one insert per Put); this
    // checks the accounting of a long history and its compaction.
    let mut h = Harness::new();
    for i in 0..2_000 {
        h.index += 1;
        h.store
            .apply(h.index, &put_op("hot", &i.to_string()))
            .unwrap();
    }
    h.store.check_invariants();
    assert_eq!(h.store.stats().versions, 2_000);
    assert_eq!(h.get("hot").unwrap().version, 2_000);
    assert_eq!(get_at(&h, "hot", 1_000).unwrap()[0].version, 999);
    h.index += 1;
    h.store.compact(h.index, 1_500).unwrap();
    while h.store.compact_step(64) {}
    h.store.check_invariants();
    // Revisions 1,500 (read at 1,500) to 2,001 stay.
    assert_eq!(h.store.stats().versions, 502);
}

/// The keys of `events`, in order, `-` before a deletion's.
fn event_keys(events: &[skiff_kv::pb::mvccpb::Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let key = String::from_utf8(e.kv.as_ref().unwrap().key.to_vec()).unwrap();
            if e.r#type == skiff_kv::pb::mvccpb::event::EventType::Delete as i32 {
                format!("-{key}")
            } else {
                key
            }
        })
        .collect()
}

/// A Txn's watch events come in the order of its operations (nested ones
/// in place, a range deletion's keys in key order), as etcd sends them
/// (its sub-revisions): when applied, when read back from the history for
/// a watcher catching up, and after a snapshot round trip.
#[test]
fn a_txns_events_come_in_op_order() {
    let mut h = abc_store();
    let from = h.store.revision() + 1;
    h.store.collect_events(true);
    h.txn(txn_op(
        vec![],
        vec![
            put_op("z", "1"),
            put_op("a", "new"),
            txn_op(vec![], vec![put_op("m", "1")], vec![]),
            del_op("b", "d", false),
            put_op("n", "1"),
        ],
        vec![],
    ))
    .unwrap();
    let want = ["z", "a", "m", "-b", "-c", "-c2", "n"];
    assert_eq!(event_keys(&h.store.take_events()), want, "when applied");
    let (replayed, _) = h.store.freeze().changes(b"\0", b"\0", from, 100);
    assert_eq!(event_keys(&replayed), want, "from the history");
    let mut bytes = Vec::new();
    h.store.write_snapshot(&mut bytes).unwrap();
    let back = KvStore::read_snapshot(&mut std::io::Cursor::new(&bytes)).unwrap();
    let (restored, _) = back.freeze().changes(b"\0", b"\0", from, 100);
    assert_eq!(event_keys(&restored), want, "after a snapshot round trip");
    // A range of the keys keeps the order among those it names.
    let (some, _) = back.freeze().changes(b"a", b"n", from, 100);
    assert_eq!(event_keys(&some), ["a", "m", "-b", "-c", "-c2"]);
}
