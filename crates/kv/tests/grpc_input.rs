//! What a client sends over gRPC, decoded from any bytes: the checks and
//! the store that take the decoded requests answer (an error or a result),
//! never panic, and leave the store consistent. Inputs are arbitrary bytes
//! and byte-mutated encodings of real requests (a nested txn, a ranged
//! delete, a watch), so that decoding gets past the first field.
//! (The gRPC layer bounds a message at `GRPC_MESSAGE_BYTES_MAX` before
//! prost sees it; prost allocates no more than the message holds.)

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::request_op::Request as Op;
use skiff_kv::pb::etcdserverpb::*;
use skiff_kv::store::auth::{AuthChange, AuthState, Perm, PermKind};
use skiff_kv::store::{validate_request, KvStore};

fn put(key: &'static [u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: Bytes::from_static(key),
            value: Bytes::from_static(b"value"),
            lease,
            prev_kv: true,
            ..Default::default()
        })),
    }
}

/// Real requests, encoded: what the mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    let txn = RequestOp {
        request: Some(Op::RequestTxn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: Bytes::from_static(b"a"),
                range_end: Bytes::from_static(b"b"),
                target_union: Some(TargetUnion::Value(Bytes::from_static(b"v"))),
            }],
            success: vec![
                put(b"a/1", 0),
                RequestOp {
                    request: Some(Op::RequestTxn(TxnRequest {
                        compare: vec![],
                        success: vec![put(b"a/2", 7)],
                        failure: vec![],
                    })),
                },
            ],
            failure: vec![RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: Bytes::from_static(b"a"),
                    range_end: Bytes::from_static(b"\0"),
                    prev_kv: true,
                })),
            }],
        })),
    };
    vec![
        txn.encode_to_vec(),
        put(b"k", 0).encode_to_vec(),
        RangeRequest {
            key: Bytes::from_static(b"a"),
            range_end: Bytes::from_static(b"z"),
            limit: 3,
            revision: 1,
            ..Default::default()
        }
        .encode_to_vec(),
    ]
}

/// An auth state with a user who may read and write `a/`..`a0`.
fn auth() -> AuthState {
    let mut s = AuthState::default();
    for c in [
        AuthChange::UserAdd {
            name: "root".into(),
            password: None,
        },
        AuthChange::UserGrantRole {
            user: "root".into(),
            role: "root".into(),
        },
        AuthChange::UserAdd {
            name: "u".into(),
            password: None,
        },
        AuthChange::RoleAdd { name: "r".into() },
        AuthChange::RoleGrantPermission {
            role: "r".into(),
            perm: Perm {
                key: Bytes::from_static(b"a/"),
                range_end: Bytes::from_static(b"a0"),
                kind: PermKind::ReadWrite,
            },
        },
        AuthChange::UserGrantRole {
            user: "u".into(),
            role: "r".into(),
        },
        AuthChange::Enable,
    ] {
        s.apply(&c).expect("setup");
    }
    s
}

/// Feeds `bytes`, decoded as each request kind, to what checks and applies
/// it.
fn feed(bytes: &[u8], auth: &AuthState) {
    if let Ok(op) = RequestOp::decode(bytes) {
        let _ = validate_request(&op);
        let _ = auth.check_op("u", &op, &|_| vec![Bytes::from_static(b"a/x")]);
        let mut store = KvStore::new();
        let before = store.revision();
        let result = store.apply(1, &op);
        assert!(result.is_ok() || store.revision() == before);
        store.check_invariants();
    }
    if let Ok(r) = RangeRequest::decode(bytes) {
        let store = KvStore::new();
        let _ = store.range(&r);
        let _ = auth.check_range("u", &r.key, &r.range_end, PermKind::Read);
    }
    if let Ok(w) = WatchRequest::decode(bytes) {
        if let Some(watch_request::RequestUnion::CreateRequest(c)) = w.request_union {
            let _ = auth.check_range("u", &c.key, &c.range_end, PermKind::Read);
        }
    }
    if let Ok(p) = AuthRoleGrantPermissionRequest::decode(bytes) {
        if let Some(perm) = p.perm {
            if let Some(kind) = PermKind::from_i32(perm.perm_type) {
                let mut s = auth.clone();
                let _ = s.apply(&AuthChange::RoleGrantPermission {
                    role: p.name,
                    perm: Perm {
                        key: perm.key,
                        range_end: perm.range_end,
                        kind,
                    },
                });
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        feed(&bytes, &auth());
    }

    #[test]
    fn mutated_requests(
        seed in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = seeds()[seed].clone();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let keep = cut.index(bytes.len() + 1);
        feed(&bytes[..keep], &auth());
        feed(&bytes, &auth());
    }
}
