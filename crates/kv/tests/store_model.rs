//! The MVCC store against a naive model: random ops (requests, Range at any
//! revision, compactions, physical compaction steps with random budgets,
//! HashKV) on a small key space; the store and the model must agree on every
//! response, every error and the whole history after each step. A second
//! store fed the same log but compacting physically at another pace must
//! have the same digest, HashKV and snapshot bytes.
//!
//! The model is written for clarity, not speed: a list of every version ever
//! written, scanned linearly (compaction only moves a floor; nothing is
//! removed), txns run on a copy that is kept or dropped, duplicate keys
//! found by enumerating every execution path.

use bytes::Bytes;
use proptest::prelude::*;
use skiff_kv::pb::etcdserverpb::compare::{CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::response_op::Response;
use skiff_kv::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use skiff_kv::pb::mvccpb::KeyValue;
use skiff_kv::store::{KvError, KvStore};
use std::collections::BTreeSet;

/// One version; `version == 0` is a tombstone.
#[derive(Debug, Clone, PartialEq)]
struct MRecord {
    key: Vec<u8>,
    value: Vec<u8>,
    create: i64,
    modr: i64,
    version: i64,
}

impl MRecord {
    fn tombstone(&self) -> bool {
        self.version == 0
    }
}

impl MRecord {
    fn kv(&self) -> KeyValue {
        KeyValue {
            key: Bytes::from(self.key.clone()),
            create_revision: self.create,
            mod_revision: self.modr,
            version: self.version,
            value: Bytes::from(self.value.clone()),
            lease: 0,
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

fn hdr(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

#[derive(Debug, Clone, Default)]
struct Model {
    /// Every version ever written, in write order.
    history: Vec<MRecord>,
    revision: i64,
    compact: i64,
}

/// One write on an execution path, for the duplicate-key rule.
#[derive(Clone)]
enum Write {
    Put(Vec<u8>),
    Delete(Vec<u8>, Vec<u8>),
}

/// Every execution path of a branch: the writes it makes, in order.
fn paths(ops: &[RequestOp]) -> Vec<Vec<Write>> {
    let mut all = vec![Vec::new()];
    for op in ops {
        let choices: Vec<Vec<Write>> = match &op.request {
            Some(Request::RequestPut(p)) => vec![vec![Write::Put(p.key.to_vec())]],
            Some(Request::RequestDeleteRange(d)) => {
                vec![vec![Write::Delete(d.key.to_vec(), d.range_end.to_vec())]]
            }
            Some(Request::RequestTxn(t)) => {
                let mut c = paths(&t.success);
                c.extend(paths(&t.failure));
                c
            }
            _ => vec![Vec::new()],
        };
        let mut next = Vec::new();
        for prefix in &all {
            for choice in &choices {
                let mut p = prefix.clone();
                p.extend(choice.iter().cloned());
                next.push(p);
            }
        }
        all = next;
    }
    all
}

fn path_has_duplicate(path: &[Write]) -> bool {
    for (i, a) in path.iter().enumerate() {
        for (j, b) in path.iter().enumerate() {
            if i == j {
                continue;
            }
            match (a, b) {
                (Write::Put(x), Write::Put(y)) if x == y => return true,
                (Write::Put(x), Write::Delete(k, e)) if in_range(k, e, x) => return true,
                _ => {}
            }
        }
    }
    false
}

fn any_value_provided(op: &RequestOp) -> bool {
    match &op.request {
        Some(Request::RequestPut(p)) => p.ignore_value && !p.value.is_empty(),
        Some(Request::RequestTxn(t)) => t.success.iter().chain(&t.failure).any(any_value_provided),
        _ => false,
    }
}

impl Model {
    fn new() -> Self {
        Model {
            history: Vec::new(),
            revision: 1,
            compact: 0,
        }
    }

    /// The key's version at revision `at`, if live.
    fn get_at(&self, key: &[u8], at: i64) -> Option<&MRecord> {
        self.history
            .iter()
            .filter(|r| r.key == key && r.modr <= at)
            .max_by_key(|r| r.modr)
            .filter(|r| !r.tombstone())
    }

    /// Live keys in the range at revision `at`, by key.
    fn sorted_in(&self, key: &[u8], range_end: &[u8], at: i64) -> Vec<MRecord> {
        let keys: BTreeSet<&Vec<u8>> = self
            .history
            .iter()
            .filter(|r| in_range(key, range_end, &r.key))
            .map(|r| &r.key)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.get_at(k, at).cloned())
            .collect()
    }

    /// etcd's rule for a read at `revision` checked against `current`.
    fn read_at(&self, revision: i64, current: i64) -> Result<i64, KvError> {
        if revision == 0 {
            Ok(current)
        } else if revision > current {
            Err(KvError::FutureRevision)
        } else if revision < self.compact || revision < 0 {
            Err(KvError::Compacted)
        } else {
            Ok(revision)
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

    /// HashKV as documented: versions with compact < mod <= at, in (key,
    /// mod) order.
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), KvError> {
        let at = self.read_at(revision, self.revision)?;
        let mut versions: Vec<&MRecord> = self
            .history
            .iter()
            .filter(|r| self.compact < r.modr && r.modr <= at)
            .collect();
        versions.sort_by(|a, b| (&a.key, a.modr).cmp(&(&b.key, b.modr)));
        let mut crc = 0;
        for r in versions {
            let mut buf = Vec::new();
            buf.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
            buf.extend_from_slice(&r.key);
            buf.extend_from_slice(&r.modr.to_le_bytes());
            buf.push(u8::from(r.tombstone()));
            buf.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
            buf.extend_from_slice(&r.value);
            buf.extend_from_slice(&r.create.to_le_bytes());
            buf.extend_from_slice(&r.version.to_le_bytes());
            crc = crc32c::crc32c_append(crc, &buf);
        }
        Ok((crc, self.compact, at))
    }

    fn range(&self, req: &RangeRequest, at: i64, header_revision: i64) -> RangeResponse {
        let matches = self.sorted_in(&req.key, &req.range_end, at);
        let count = matches.len() as i64;
        if req.count_only {
            return RangeResponse {
                header: hdr(header_revision),
                kvs: vec![],
                more: false,
                count,
            };
        }
        let mut kept: Vec<MRecord> = matches
            .into_iter()
            .filter(|r| req.min_mod_revision == 0 || r.modr >= req.min_mod_revision)
            .filter(|r| req.max_mod_revision == 0 || r.modr <= req.max_mod_revision)
            .filter(|r| req.min_create_revision == 0 || r.create >= req.min_create_revision)
            .filter(|r| req.max_create_revision == 0 || r.create <= req.max_create_revision)
            .collect();
        // Sort keys per target as bytes (big-endian for the non-negative
        // numbers), so that one comparator serves all.
        let value_of = |r: &MRecord| -> Vec<u8> {
            match req.sort_target {
                0 => r.key.clone(),
                1 => r.version.to_be_bytes().to_vec(),
                2 => r.create.to_be_bytes().to_vec(),
                3 => r.modr.to_be_bytes().to_vec(),
                _ => r.value.clone(),
            }
        };
        match (req.sort_order, req.sort_target) {
            (0, 0) | (1, 0) => {}
            (2, _) => kept.sort_by_key(|a| std::cmp::Reverse(value_of(a))),
            _ => kept.sort_by_key(|a| value_of(a)),
        }
        let limit = if req.limit > 0 {
            req.limit as usize
        } else {
            usize::MAX
        };
        let more = kept.len() > limit;
        kept.truncate(limit);
        RangeResponse {
            header: hdr(header_revision),
            kvs: kept
                .iter()
                .map(|r| {
                    let mut kv = r.kv();
                    if req.keys_only {
                        kv.value = Bytes::new();
                    }
                    kv
                })
                .collect(),
            more,
            count,
        }
    }

    fn compare(&self, c: &Compare) -> bool {
        let matches = self.sorted_in(&c.key, &c.range_end, self.revision);
        let check = |r: Option<&MRecord>| -> bool {
            let ord = if c.target == CompareTarget::Value as i32 {
                let want = match &c.target_union {
                    Some(TargetUnion::Value(v)) => v.to_vec(),
                    _ => vec![],
                };
                r.map(|r| r.value.clone()).unwrap_or_default().cmp(&want)
            } else {
                let have = match (c.target, r) {
                    (0, Some(r)) => r.version,
                    (1, Some(r)) => r.create,
                    (2, Some(r)) => r.modr,
                    _ => 0,
                };
                let want = match &c.target_union {
                    Some(TargetUnion::Version(v)) if c.target == 0 => *v,
                    Some(TargetUnion::CreateRevision(v)) if c.target == 1 => *v,
                    Some(TargetUnion::ModRevision(v)) if c.target == 2 => *v,
                    Some(TargetUnion::Lease(v)) if c.target == 4 => *v,
                    _ => 0,
                };
                have.cmp(&want)
            };
            match c.result {
                0 => ord.is_eq(),
                1 => ord.is_gt(),
                2 => ord.is_lt(),
                _ => ord.is_ne(),
            }
        };
        if matches.is_empty() {
            c.target != CompareTarget::Value as i32 && check(None)
        } else {
            matches.iter().all(|r| check(Some(r)))
        }
    }

    /// Applies `op`; on error the model is left as it was.
    fn apply(&mut self, op: &RequestOp) -> Result<ResponseOp, KvError> {
        if any_value_provided(op) {
            return Err(KvError::ValueProvided);
        }
        if let Some(Request::RequestTxn(t)) = &op.request {
            let dup = |ops: &[RequestOp]| paths(ops).iter().any(|p| path_has_duplicate(p));
            if dup(&t.success) || dup(&t.failure) {
                return Err(KvError::DuplicateKey);
            }
        }
        let begin = self.clone();
        let mut scratch = self.clone();
        let mut exec = Exec {
            begin: &begin,
            changed: false,
        };
        let resp = exec.op(&mut scratch, op)?;
        if exec.changed {
            scratch.revision += 1;
        }
        *self = scratch;
        Ok(resp)
    }
}

struct Exec<'a> {
    begin: &'a Model,
    changed: bool,
}

impl Exec<'_> {
    fn view(&self) -> i64 {
        self.begin.revision + i64::from(self.changed)
    }

    fn op(&mut self, m: &mut Model, op: &RequestOp) -> Result<ResponseOp, KvError> {
        let rev = self.begin.revision + 1;
        let response = match &op.request {
            Some(Request::RequestRange(r)) => {
                // Revision 0 reads this request's writes so far; others are
                // checked against the starting revision and read history.
                let at = match r.revision {
                    0 => self.view(),
                    revision => self.begin.read_at(revision, self.begin.revision)?,
                };
                Response::ResponseRange(m.range(r, at, self.view()))
            }
            Some(Request::RequestPut(p)) => {
                if p.lease != 0 {
                    return Err(KvError::LeaseNotFound);
                }
                let old = m.get_at(&p.key, i64::MAX).cloned();
                if (p.ignore_value || p.ignore_lease) && old.is_none() {
                    return Err(KvError::KeyNotFound);
                }
                let value = if p.ignore_value {
                    old.as_ref().unwrap().value.clone()
                } else {
                    p.value.to_vec()
                };
                m.history.push(MRecord {
                    key: p.key.to_vec(),
                    value,
                    create: old.as_ref().map_or(rev, |o| o.create),
                    modr: rev,
                    version: old.as_ref().map_or(1, |o| o.version + 1),
                });
                self.changed = true;
                Response::ResponsePut(PutResponse {
                    header: hdr(self.view()),
                    prev_kv: if p.prev_kv { old.map(|o| o.kv()) } else { None },
                })
            }
            Some(Request::RequestDeleteRange(d)) => {
                let gone = m.sorted_in(&d.key, &d.range_end, i64::MAX);
                for r in &gone {
                    m.history.push(MRecord {
                        key: r.key.clone(),
                        value: vec![],
                        create: 0,
                        modr: rev,
                        version: 0,
                    });
                }
                if !gone.is_empty() {
                    self.changed = true;
                }
                Response::ResponseDeleteRange(DeleteRangeResponse {
                    header: hdr(self.view()),
                    deleted: gone.len() as i64,
                    prev_kvs: if d.prev_kv {
                        gone.iter().map(|r| r.kv()).collect()
                    } else {
                        vec![]
                    },
                })
            }
            Some(Request::RequestTxn(t)) => {
                let succeeded = t.compare.iter().all(|c| self.begin.compare(c));
                let branch = if succeeded { &t.success } else { &t.failure };
                let mut responses = Vec::new();
                for op in branch {
                    responses.push(self.op(m, op)?);
                }
                Response::ResponseTxn(TxnResponse {
                    header: hdr(self.view()),
                    succeeded,
                    responses,
                })
            }
            None => return Err(KvError::KeyNotFound),
        };
        Ok(ResponseOp {
            response: Some(response),
        })
    }
}

const KEYS: &[&str] = &["a", "b", "bb", "c", "d"];
const ENDS: &[&str] = &["", "", "\0", "b", "c", "e", "a"];

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(KEYS).prop_map(|k| Bytes::from_static(k.as_bytes()))
}
fn range_end() -> impl Strategy<Value = Bytes> {
    prop::sample::select(ENDS).prop_map(|k| Bytes::from_static(k.as_bytes()))
}
fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(&["", "x", "y", "zz"][..]).prop_map(|v| Bytes::from_static(v.as_bytes()))
}

/// A Range whose `revision` is filled in relative to the current revision
/// when it runs (negative: history, maybe compacted; 0: current; 1:
/// future; None: 0).
#[derive(Debug, Clone)]
enum GenOp {
    Op(RequestOp),
    RangeAt(RangeRequest, Option<i64>),
    Txn(Vec<Compare>, Vec<GenOp>, Vec<GenOp>),
}

/// One step of a test: a log entry or a physical compaction step.
#[derive(Debug, Clone)]
enum Step {
    Request(GenOp),
    /// Compact at the current revision minus this much.
    Compact(i64),
    /// compact_step on the first store with this budget (the second store
    /// uses another).
    Physical(usize),
    /// HashKV at the current revision minus this much (None: 0).
    HashKv(Option<i64>),
}

fn put_gen() -> impl Strategy<Value = GenOp> {
    (
        key(),
        value(),
        any::<bool>(),
        prop::sample::select(&[0u8, 0, 0, 0, 1, 2][..]),
    )
        .prop_map(|(key, value, prev_kv, flavour)| {
            let req = match flavour {
                0 => PutRequest {
                    key,
                    value,
                    prev_kv,
                    ..Default::default()
                },
                // ignore_value, with or without (rejected) value
                1 => PutRequest {
                    key,
                    value,
                    prev_kv,
                    ignore_value: true,
                    ..Default::default()
                },
                _ => PutRequest {
                    key,
                    value,
                    lease: 7,
                    ..Default::default()
                },
            };
            GenOp::Op(RequestOp {
                request: Some(Request::RequestPut(req)),
            })
        })
}

fn delete_gen() -> impl Strategy<Value = GenOp> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
        GenOp::Op(RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key,
                range_end,
                prev_kv,
            })),
        })
    })
}

fn range_gen() -> impl Strategy<Value = GenOp> {
    (
        (key(), range_end(), -1i64..4, 0i32..3, 0i32..5),
        (any::<bool>(), any::<bool>(), 0i64..8, 0i64..8),
        prop::option::weighted(0.3, -6i64..=1),
    )
        .prop_map(
            |(
                (key, range_end, limit, sort_order, sort_target),
                (keys_only, count_only, min_mod, max_create),
                at,
            )| {
                GenOp::RangeAt(
                    RangeRequest {
                        key,
                        range_end,
                        limit,
                        sort_order,
                        sort_target,
                        keys_only,
                        count_only: count_only && keys_only,
                        min_mod_revision: min_mod,
                        max_create_revision: max_create,
                        ..Default::default()
                    },
                    at,
                )
            },
        )
}

fn compare_gen() -> impl Strategy<Value = Compare> {
    (key(), range_end(), 0i32..4, 0i32..5, 0i64..8, value()).prop_map(
        |(key, range_end, result, target, n, v)| Compare {
            result,
            target,
            key,
            range_end,
            target_union: Some(match target {
                0 => TargetUnion::Version(n % 3),
                1 => TargetUnion::CreateRevision(n),
                2 => TargetUnion::ModRevision(n),
                3 => TargetUnion::Value(v),
                _ => TargetUnion::Lease(n % 2),
            }),
        },
    )
}

fn op_gen() -> impl Strategy<Value = GenOp> {
    let leaf = prop_oneof![4 => put_gen(), 2 => delete_gen(), 2 => range_gen()];
    leaf.prop_recursive(2, 16, 3, |inner| {
        prop_oneof![
            1 => inner.clone(),
            1 => (
                prop::collection::vec(compare_gen(), 0..3),
                prop::collection::vec(inner.clone(), 0..3),
                prop::collection::vec(inner, 0..3),
            )
                .prop_map(|(c, s, f)| GenOp::Txn(c, s, f)),
        ]
    })
}

/// Fills in revisions relative to `begin` (the revision the op starts at).
fn realize(op: &GenOp, begin: i64) -> RequestOp {
    match op {
        GenOp::Op(op) => op.clone(),
        GenOp::RangeAt(req, at) => RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                revision: at.map_or(0, |d| begin + d),
                ..req.clone()
            })),
        },
        GenOp::Txn(c, s, f) => RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: c.clone(),
                success: s.iter().map(|o| realize(o, begin)).collect(),
                failure: f.iter().map(|o| realize(o, begin)).collect(),
            })),
        },
    }
}

fn step_gen() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => op_gen().prop_map(Step::Request),
        1 => (-1i64..5).prop_map(Step::Compact),
        2 => (0usize..6).prop_map(Step::Physical),
        1 => prop::option::of(-3i64..=1).prop_map(Step::HashKv),
    ]
}

fn all_keys_at(store: &KvStore, revision: i64) -> Result<Vec<KeyValue>, KvError> {
    store
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        })
        .map(|r| r.kvs)
}

fn snapshot_bytes(store: &KvStore) -> Vec<u8> {
    let mut out = Vec::new();
    store.write_snapshot(&mut out).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_model(steps in prop::collection::vec(step_gen(), 1..48), other_budget in 1usize..4) {
        let mut store = KvStore::new();
        // Same log, other physical compaction pace.
        let mut twin = KvStore::new();
        let mut model = Model::new();
        let mut index = 0;
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Request(gen) => {
                    let op = realize(gen, store.revision());
                    index += 1;
                    let got = store.apply(index, &op);
                    let want = model.apply(&op);
                    prop_assert_eq!(&got, &want, "step {}: {:?}", i, op);
                    prop_assert_eq!(&twin.apply(index, &op), &got);
                    // A read-only Range answers the same through range()
                    // and apply().
                    if let Some(Request::RequestRange(req)) = &op.request {
                        let direct = store.range(req).map(|r| ResponseOp {
                            response: Some(Response::ResponseRange(r)),
                        });
                        prop_assert_eq!(direct, got);
                    }
                }
                Step::Compact(back) => {
                    index += 1;
                    let revision = store.revision() - back;
                    let got = store.compact(index, revision);
                    prop_assert_eq!(&got, &model.compact(revision), "step {}: compact {}", i, revision);
                    prop_assert_eq!(twin.compact(index, revision), got);
                }
                Step::Physical(budget) => {
                    let more = store.compact_step(*budget);
                    prop_assert_eq!(more, store.physically_compacted() < store.compact_revision());
                    twin.compact_step(other_budget);
                }
                Step::HashKv(back) => {
                    let revision = back.map_or(0, |b| store.revision() - b);
                    prop_assert_eq!(store.hash_kv(revision), model.hash_kv(revision), "step {}", i);
                }
            }
            store.check_invariants();
            twin.check_invariants();
            prop_assert_eq!(store.applied_index(), index);
            prop_assert_eq!(store.revision(), model.revision);
            prop_assert_eq!(store.compact_revision(), model.compact);
            // The whole readable history agrees, revision by revision.
            for revision in model.compact.max(1)..=model.revision {
                let want: Vec<KeyValue> = model
                    .sorted_in(b"\0", b"\0", revision)
                    .iter()
                    .map(MRecord::kv)
                    .collect();
                prop_assert_eq!(all_keys_at(&store, revision), Ok(want), "at {}", revision);
            }
            if model.compact > 1 {
                prop_assert_eq!(all_keys_at(&store, model.compact - 1), Err(KvError::Compacted));
            }
            prop_assert_eq!(store.len(), model.sorted_in(b"\0", b"\0", i64::MAX).len());
            // Physical progress is invisible.
            prop_assert_eq!(store.digest(), twin.digest());
            prop_assert_eq!(store.hash_kv(0), twin.hash_kv(0));
            prop_assert_eq!(&store, &twin);
        }
        prop_assert_eq!(snapshot_bytes(&store), snapshot_bytes(&twin));
        while twin.compact_step(1) {}
        prop_assert_eq!(snapshot_bytes(&store), snapshot_bytes(&twin));
        prop_assert_eq!(store.hash_kv(0), twin.hash_kv(0));
    }
}
