//! Executing one request against the store, atomically.
//!
//! A request runs in a [`WriteTxn`] that logs the previous record of every
//! key it changes; on error the log is replayed backwards, so a failed
//! request leaves no trace. All changes of one request share the revision
//! `begin + 1`, which becomes the store revision only if something changed.

use std::cmp::Ordering;
use std::collections::btree_map;
use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::{record_bytes, KvError, KvStore, Record};
use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::response_op::Response;
use crate::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};

/// The keys a request names with `key` and `range_end`, as etcd reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyRange<'a> {
    /// `range_end` empty: just `key`.
    Single(&'a [u8]),
    /// `range_end` is `"\0"`: every key `>= key` (with key `"\0"`: all keys).
    From(&'a [u8]),
    /// `[key, range_end)` with `key < range_end`.
    Between(&'a [u8], &'a [u8]),
    /// `range_end <= key` (and not `"\0"`): no key at all.
    Empty(&'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub(super) fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        if range_end.is_empty() {
            KeyRange::Single(key)
        } else if range_end == [0] {
            KeyRange::From(key)
        } else if key < range_end {
            KeyRange::Between(key, range_end)
        } else {
            KeyRange::Empty(key)
        }
    }

    /// Bounds for `BTreeMap::range`; never `start > end`, so it never panics.
    pub(super) fn bounds(&self) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        match *self {
            KeyRange::Single(k) => (Bound::Included(k), Bound::Included(k)),
            KeyRange::From(k) => (Bound::Included(k), Bound::Unbounded),
            KeyRange::Between(k, end) => (Bound::Included(k), Bound::Excluded(end)),
            KeyRange::Empty(k) => (Bound::Included(k), Bound::Excluded(k)),
        }
    }

    pub(super) fn contains(&self, key: &[u8]) -> bool {
        match *self {
            KeyRange::Single(k) => key == k,
            KeyRange::From(k) => key >= k,
            KeyRange::Between(k, end) => k <= key && key < end,
            KeyRange::Empty(_) => false,
        }
    }

    fn iter<'m>(&self, map: &'m BTreeMap<Bytes, Record>) -> btree_map::Range<'m, Bytes, Record> {
        map.range::<[u8], _>(self.bounds())
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Checks the `revision` of a read against the store's `current` one. Only
/// the latest version of each key is kept: `stale` says the request's own
/// earlier writes changed keys in the range since `current`.
pub(super) fn check_read_revision(revision: i64, current: i64, stale: bool) -> Result<(), KvError> {
    if revision == 0 {
        Ok(())
    } else if revision > current {
        Err(KvError::FutureRevision)
    } else if revision < current || stale {
        Err(KvError::Compacted)
    } else {
        Ok(())
    }
}

/// A Range over `map`, etcd's way:
/// * sort order NONE with a target other than KEY means ASCEND; ties keep
///   key order (the sort is stable, also for DESCEND);
/// * `count` is the number of keys in the range, before the min/max
///   revision filters and before `limit` (as etcd);
/// * `more` says matches were left out by `limit`; count_only returns no kvs.
pub(super) fn range(
    map: &BTreeMap<Bytes, Record>,
    req: &RangeRequest,
    header_revision: i64,
) -> RangeResponse {
    let keys = KeyRange::new(&req.key, &req.range_end);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let order = match SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None) {
        SortOrder::None if target != SortTarget::Key => SortOrder::Ascend,
        SortOrder::Ascend if target == SortTarget::Key => SortOrder::None,
        order => order,
    };
    if req.count_only {
        return RangeResponse {
            header: header(header_revision),
            kvs: Vec::new(),
            more: false,
            count: keys.iter(map).count() as i64,
        };
    }
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let limit = if req.limit > 0 {
        usize::try_from(req.limit).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    // Without sorting or filtering, the first limit+1 keys decide `more`.
    let collect_max = if order == SortOrder::None && !filtered {
        limit.saturating_add(1)
    } else {
        usize::MAX
    };
    let passes = |r: &Record| {
        (req.min_mod_revision == 0 || r.mod_revision >= req.min_mod_revision)
            && (req.max_mod_revision == 0 || r.mod_revision <= req.max_mod_revision)
            && (req.min_create_revision == 0 || r.create_revision >= req.min_create_revision)
            && (req.max_create_revision == 0 || r.create_revision <= req.max_create_revision)
    };
    let mut count = 0i64;
    let mut matched: Vec<(&Bytes, &Record)> = Vec::new();
    for (key, record) in keys.iter(map) {
        count += 1;
        if matched.len() < collect_max && passes(record) {
            matched.push((key, record));
        }
    }
    let by_target = |a: &(&Bytes, &Record), b: &(&Bytes, &Record)| match target {
        SortTarget::Key => a.0.cmp(b.0),
        SortTarget::Version => a.1.version.cmp(&b.1.version),
        SortTarget::Create => a.1.create_revision.cmp(&b.1.create_revision),
        SortTarget::Mod => a.1.mod_revision.cmp(&b.1.mod_revision),
        SortTarget::Value => a.1.value.cmp(&b.1.value),
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => matched.sort_by(by_target),
        SortOrder::Descend => matched.sort_by(|a, b| by_target(b, a)),
    }
    let more = matched.len() > limit;
    matched.truncate(limit);
    let kvs = matched
        .into_iter()
        .map(|(key, record)| {
            let mut kv = record.key_value(key);
            if req.keys_only {
                kv.value = Bytes::new();
            }
            kv
        })
        .collect();
    RangeResponse {
        header: header(header_revision),
        kvs,
        more,
        count,
    }
}

/// One compare of a txn, etcd's way: every key in the range must satisfy it;
/// with no key, version/create/mod/lease compare against 0 and a value
/// compare fails (a missing value cannot be told from an empty one).
fn compare_holds(map: &BTreeMap<Bytes, Record>, compare: &Compare) -> bool {
    let mut found = false;
    for (_, record) in KeyRange::new(&compare.key, &compare.range_end).iter(map) {
        found = true;
        if !compare_record(compare, Some(record)) {
            return false;
        }
    }
    if found {
        return true;
    }
    compare.target != CompareTarget::Value as i32 && compare_record(compare, None)
}

fn compare_record(compare: &Compare, record: Option<&Record>) -> bool {
    // As etcd: a target_union of the wrong kind compares as 0 / empty; an
    // unknown target compares equal, an unknown result holds.
    let ordering = match CompareTarget::try_from(compare.target) {
        Ok(CompareTarget::Value) => {
            let wanted: &[u8] = match &compare.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            record.map_or(&[][..], |r| &r.value[..]).cmp(wanted)
        }
        Ok(target) => {
            let wanted = match (target, &compare.target_union) {
                (CompareTarget::Version, Some(TargetUnion::Version(v)))
                | (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)))
                | (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)))
                | (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => *v,
                _ => 0,
            };
            let have = match (target, record) {
                (CompareTarget::Version, Some(r)) => r.version,
                (CompareTarget::Create, Some(r)) => r.create_revision,
                (CompareTarget::Mod, Some(r)) => r.mod_revision,
                // Leases are not served: every key has lease 0.
                _ => 0,
            };
            have.cmp(&wanted)
        }
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(compare.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Err(_) => true,
    }
}

/// Which branch each txn of the request takes, in execution order. As etcd,
/// all compares (nested ones too) see the state before the request.
fn compare_path(map: &BTreeMap<Bytes, Record>, txn: &TxnRequest, path: &mut Vec<bool>) {
    let succeeded = txn.compare.iter().all(|c| compare_holds(map, c));
    path.push(succeeded);
    let branch = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    for op in branch {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            compare_path(map, nested, path);
        }
    }
}

/// Executes `op` on `store`: all of it, or (on error) nothing.
pub(super) fn apply_atomically(store: &mut KvStore, op: &RequestOp) -> Result<ResponseOp, KvError> {
    let mut path = Vec::new();
    if let Some(Request::RequestTxn(txn)) = &op.request {
        compare_path(&store.map, txn, &mut path);
    }
    let mut txn = WriteTxn {
        begin_revision: store.revision,
        store,
        undo: Vec::new(),
    };
    let mut path = path.into_iter();
    match txn.exec(op, &mut path) {
        Ok(response) => {
            debug_assert!(path.next().is_none(), "every compare result was used");
            txn.commit();
            Ok(response)
        }
        Err(error) => {
            txn.rollback();
            Err(error)
        }
    }
}

struct WriteTxn<'s> {
    store: &'s mut KvStore,
    /// The store revision when the request started.
    begin_revision: i64,
    /// The previous record of each key changed so far, in change order.
    undo: Vec<(Bytes, Option<Record>)>,
}

impl WriteTxn<'_> {
    fn write_revision(&self) -> i64 {
        self.begin_revision + 1
    }

    /// The revision a response reports: the write revision once something
    /// changed, else the starting one (as etcd's write txns).
    fn view_revision(&self) -> i64 {
        self.begin_revision + i64::from(!self.undo.is_empty())
    }

    fn exec(
        &mut self,
        op: &RequestOp,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<ResponseOp, KvError> {
        let response = match &op.request {
            None => return Err(KvError::KeyNotFound),
            Some(Request::RequestRange(req)) => Response::ResponseRange(self.range(req)?),
            Some(Request::RequestPut(req)) => Response::ResponsePut(self.put(req)?),
            Some(Request::RequestDeleteRange(req)) => {
                Response::ResponseDeleteRange(self.delete_range(req))
            }
            Some(Request::RequestTxn(req)) => Response::ResponseTxn(self.txn(req, path)?),
        };
        Ok(ResponseOp {
            response: Some(response),
        })
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        // Reading at the starting revision after this request changed keys
        // in the range would need their previous versions, which are gone.
        let keys = KeyRange::new(&req.key, &req.range_end);
        let stale = self.undo.iter().any(|(key, _)| keys.contains(key));
        check_read_revision(req.revision, self.begin_revision, stale)?;
        Ok(range(&self.store.map, req, self.view_revision()))
    }

    /// One walk of the map for a key that exists (two for a new key).
    fn put(&mut self, req: &PutRequest) -> Result<PutResponse, KvError> {
        if req.lease != 0 {
            return Err(KvError::LeaseNotFound);
        }
        let revision = self.write_revision();
        let key = &req.key[..];
        let store = &mut *self.store;
        let (prev_kv, old) = match store.map.get_mut(key) {
            Some(slot) => {
                debug_assert!(
                    slot.mod_revision < revision,
                    "key written twice in one request"
                );
                let prev_kv = req.prev_kv.then(|| slot.key_value(&req.key));
                let value = if req.ignore_value {
                    slot.value.clone()
                } else {
                    // Copy: a slice of the request would pin the whole log
                    // entry.
                    Bytes::copy_from_slice(&req.value)
                };
                let record = Record {
                    value,
                    create_revision: slot.create_revision,
                    mod_revision: revision,
                    version: slot.version + 1,
                };
                store.approx_bytes += record_bytes(key, &record);
                let old = std::mem::replace(slot, record);
                store.approx_bytes -= record_bytes(key, &old);
                (prev_kv, Some(old))
            }
            None => {
                if req.ignore_value || req.ignore_lease {
                    return Err(KvError::KeyNotFound);
                }
                let record = Record {
                    value: Bytes::copy_from_slice(&req.value),
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                };
                store.approx_bytes += record_bytes(key, &record);
                store.map.insert(Bytes::copy_from_slice(key), record);
                (None, None)
            }
        };
        self.undo.push((req.key.clone(), old));
        Ok(PutResponse {
            header: header(self.view_revision()),
            prev_kv,
        })
    }

    fn delete_range(&mut self, req: &DeleteRangeRequest) -> DeleteRangeResponse {
        let keys: Vec<Bytes> = KeyRange::new(&req.key, &req.range_end)
            .iter(&self.store.map)
            .map(|(key, _)| key.clone())
            .collect();
        let mut prev_kvs = Vec::new();
        for key in &keys {
            let old = self
                .store
                .remove_record(key)
                .expect("key listed from the map just before");
            if req.prev_kv {
                prev_kvs.push(old.key_value(key));
            }
            self.undo.push((key.clone(), Some(old)));
        }
        DeleteRangeResponse {
            header: header(self.view_revision()),
            deleted: keys.len() as i64,
            prev_kvs,
        }
    }

    fn txn(
        &mut self,
        req: &TxnRequest,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<TxnResponse, KvError> {
        let succeeded = path
            .next()
            .expect("compare_path visits the same txns as exec");
        let branch = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            responses.push(self.exec(op, path)?);
        }
        Ok(TxnResponse {
            header: header(self.view_revision()),
            succeeded,
            responses,
        })
    }

    fn commit(self) {
        if self.undo.is_empty() {
            return;
        }
        let revision = self.write_revision();
        self.store.revision = revision;
        for (key, _) in &self.undo {
            if let Some(record) = self.store.map.get(&key[..]) {
                debug_assert_eq!(record.check(key, revision), Ok(()));
                debug_assert_eq!(record.mod_revision, revision);
            }
        }
    }

    fn rollback(self) {
        for (key, old) in self.undo.into_iter().rev() {
            match old {
                Some(record) => {
                    self.store.insert_record(&key, record);
                }
                None => {
                    self.store.remove_record(&key);
                }
            }
        }
    }
}
