//! Executing one request against the store, atomically.
//!
//! A request runs in a [`WriteTxn`]. Writes only ever add versions, all at
//! the revision `begin + 1`, which becomes the store revision only if
//! something changed; the txn logs each version it adds, and on error
//! removes them again and restores the counters, so a failed request leaves
//! no trace.

use std::cmp::Ordering;
use std::ops::Bound;

use bytes::Bytes;

use super::{
    read_revision, version_at, At, History, KvError, KvStore, LatestVersion, Leases, StoreStats,
    Version,
};
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
}

/// Calls `f` with each key named by `key`/`range_end` that is live at
/// revision `at` (its mod revision and version), in key order, until `f`
/// returns false. Per key: one seek to its latest version `<= at` and one
/// past all its versions, whatever the length of its history.
pub(super) fn for_each_live<'h>(
    history: &'h History,
    key: &Bytes,
    range_end: &[u8],
    at: i64,
    mut f: impl FnMut(&'h Bytes, i64, &'h Version) -> bool,
) {
    let keys = KeyRange::new(key, range_end);
    match keys {
        KeyRange::Empty(_) => return,
        KeyRange::Single(_) => {
            if let Some((found, v)) = version_at(history, key, at) {
                if !v.is_tombstone() {
                    f(&found.0, found.1, v);
                }
            }
            return;
        }
        KeyRange::From(_) | KeyRange::Between(..) => {}
    }
    let mut next = history.get_next(&(key.clone(), i64::MIN));
    while let Some((first, _)) = next {
        if !keys.contains(&first.0) {
            break;
        }
        if let Some((found, v)) = version_at(history, &first.0, at) {
            if !v.is_tombstone() && !f(&found.0, found.1, v) {
                break;
            }
        }
        let past = (first.0.clone(), i64::MAX);
        next = history
            .range::<_, At>((Bound::Excluded(&past), Bound::Unbounded))
            .next();
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// One version found by a Range: key, mod revision, version.
type Found<'h> = (&'h Bytes, i64, &'h Version);

/// A Range over `history` at revision `at`, etcd's way:
/// * sort order NONE with a target other than KEY means ASCEND; ties keep
///   key order (the sort is stable, also for DESCEND);
/// * `count` is the number of keys in the range at `at`, before the
///   min/max revision filters and before `limit` (as etcd);
/// * `more` says matches were left out by `limit`; count_only returns no kvs.
pub(super) fn range(
    history: &History,
    req: &RangeRequest,
    at: i64,
    header_revision: i64,
) -> RangeResponse {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let order = match SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None) {
        SortOrder::None if target != SortTarget::Key => SortOrder::Ascend,
        SortOrder::Ascend if target == SortTarget::Key => SortOrder::None,
        order => order,
    };
    if req.count_only {
        let mut count = 0i64;
        for_each_live(history, &req.key, &req.range_end, at, |_, _, _| {
            count += 1;
            true
        });
        return RangeResponse {
            header: header(header_revision),
            kvs: Vec::new(),
            more: false,
            count,
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
    let passes = |mod_revision: i64, v: &Version| {
        (req.min_mod_revision == 0 || mod_revision >= req.min_mod_revision)
            && (req.max_mod_revision == 0 || mod_revision <= req.max_mod_revision)
            && (req.min_create_revision == 0 || v.create_revision >= req.min_create_revision)
            && (req.max_create_revision == 0 || v.create_revision <= req.max_create_revision)
    };
    let mut count = 0i64;
    let mut matched: Vec<Found<'_>> = Vec::new();
    for_each_live(
        history,
        &req.key,
        &req.range_end,
        at,
        |key, mod_revision, v| {
            count += 1;
            if matched.len() < collect_max && passes(mod_revision, v) {
                matched.push((key, mod_revision, v));
            }
            true
        },
    );
    let by_target = |a: &Found<'_>, b: &Found<'_>| match target {
        SortTarget::Key => a.0.cmp(b.0),
        SortTarget::Version => a.2.version.cmp(&b.2.version),
        SortTarget::Create => a.2.create_revision.cmp(&b.2.create_revision),
        SortTarget::Mod => a.1.cmp(&b.1),
        SortTarget::Value => a.2.value.cmp(&b.2.value),
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
        .map(|(key, mod_revision, v)| {
            let mut kv = v.key_value(key, mod_revision);
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

/// One compare of a txn at revision `at`, etcd's way: every key in the
/// range must satisfy it; with no key, version/create/mod/lease compare
/// against 0 and a value compare fails (a missing value cannot be told from
/// an empty one).
fn compare_holds(history: &History, compare: &Compare, at: i64) -> bool {
    let mut found = false;
    let mut holds = true;
    for_each_live(
        history,
        &compare.key,
        &compare.range_end,
        at,
        |_, mod_revision, v| {
            found = true;
            holds = compare_version(compare, Some((mod_revision, v)));
            holds
        },
    );
    if found {
        return holds;
    }
    compare.target != CompareTarget::Value as i32 && compare_version(compare, None)
}

fn compare_version(compare: &Compare, found: Option<(i64, &Version)>) -> bool {
    // As etcd: a target_union of the wrong kind compares as 0 / empty; an
    // unknown target compares equal, an unknown result holds.
    let ordering = match CompareTarget::try_from(compare.target) {
        Ok(CompareTarget::Value) => {
            let wanted: &[u8] = match &compare.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            found.map_or(&[][..], |(_, v)| &v.value[..]).cmp(wanted)
        }
        Ok(target) => {
            let wanted = match (target, &compare.target_union) {
                (CompareTarget::Version, Some(TargetUnion::Version(v)))
                | (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)))
                | (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)))
                | (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => *v,
                _ => 0,
            };
            let have = match (target, found) {
                (CompareTarget::Version, Some((_, v))) => v.version,
                (CompareTarget::Create, Some((_, v))) => v.create_revision,
                (CompareTarget::Mod, Some((mod_revision, _))) => mod_revision,
                (CompareTarget::Lease, Some((_, v))) => v.lease,
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
/// all compares (nested ones too) see the state at revision `at`, before
/// the request.
fn compare_path(history: &History, txn: &TxnRequest, at: i64, path: &mut Vec<bool>) {
    let succeeded = txn.compare.iter().all(|c| compare_holds(history, c, at));
    path.push(succeeded);
    let branch = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    for op in branch {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            compare_path(history, nested, at, path);
        }
    }
}

/// Executes `op` on `store`: all of it, or (on error) nothing.
pub(super) fn apply_atomically(store: &mut KvStore, op: &RequestOp) -> Result<ResponseOp, KvError> {
    let mut path = Vec::new();
    if let Some(Request::RequestTxn(txn)) = &op.request {
        compare_path(&store.history, txn, store.revision, &mut path);
    }
    let mut txn = WriteTxn::new(store);
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

/// Deletes `keys` (live keys) at one new revision: a lease's revocation.
pub(super) fn delete_keys(store: &mut KvStore, keys: &[Bytes]) {
    let mut txn = WriteTxn::new(store);
    for key in keys {
        txn.delete_range(&DeleteRangeRequest {
            key: key.clone(),
            ..DeleteRangeRequest::default()
        });
    }
    txn.commit();
}

struct WriteTxn<'s> {
    store: &'s mut KvStore,
    /// The store revision when the request started.
    begin_revision: i64,
    /// The counters when the request started, restored on rollback.
    stats_before: StoreStats,
    /// Every version added so far (all at the write revision), with the
    /// key's latest version before it (restored on rollback).
    written: Vec<(At, Option<LatestVersion>)>,
    /// The leases when the request started (an O(1) clone), restored on
    /// rollback.
    leases_before: Leases,
}

impl<'s> WriteTxn<'s> {
    fn new(store: &'s mut KvStore) -> Self {
        WriteTxn {
            begin_revision: store.revision,
            stats_before: store.stats,
            leases_before: store.leases.clone(),
            store,
            written: Vec::new(),
        }
    }

    /// Moves `key` from lease `from` to lease `to` (0: none).
    fn attach(&mut self, key: &Bytes, from: i64, to: i64) {
        if from == to {
            return;
        }
        if from != 0 {
            if let Some(l) = self.store.leases.get_mut(&from) {
                l.keys.remove(key);
            }
        }
        if to != 0 {
            if let Some(l) = self.store.leases.get_mut(&to) {
                l.keys.insert(key.clone());
            }
        }
    }

    fn write_revision(&self) -> i64 {
        self.begin_revision + 1
    }

    /// The revision a response reports and a Range at revision 0 reads: the
    /// write revision once something changed, else the starting one (as
    /// etcd's write txns).
    fn view_revision(&self) -> i64 {
        self.begin_revision + i64::from(!self.written.is_empty())
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

    /// As etcd: revision 0 reads the request's own writes so far; any other
    /// revision is checked against the starting revision and reads history.
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        let at = match req.revision {
            0 => self.view_revision(),
            revision => read_revision(revision, self.begin_revision, self.store.compact_revision)?,
        };
        Ok(range(&self.store.history, req, at, self.view_revision()))
    }

    /// Adds `version` of `key` at the write revision. O(log n).
    fn add_version(&mut self, key: Bytes, mut version: Version, key_is_new: bool) {
        let revision = self.write_revision();
        // Its place among this request's writes: the op order.
        version.sub = self.written.len() as u32;
        let store = &mut *self.store;
        store.stats.versions += 1;
        store.stats.bytes += version.bytes();
        if key_is_new {
            store.stats.bytes += key.len() as u64 + super::KEY_OVERHEAD_BYTES;
        }
        let before = store
            .latest
            .insert(key.clone(), LatestVersion::of(revision, &version));
        let at = (key, revision);
        let replaced = store.history.insert(at.clone(), version);
        assert!(replaced.is_none(), "a key written twice in one request");
        self.written.push((at, before));
    }

    /// One seek for the key's latest version and one insert.
    fn put(&mut self, req: &PutRequest) -> Result<PutResponse, KvError> {
        if req.lease != 0 && !self.store.leases.contains_key(&req.lease) {
            return Err(KvError::LeaseNotFound);
        }
        // The key's latest version: one hash lookup (see `KvStore::latest`);
        // its value only when asked for (one exact lookup in the history).
        let latest = self
            .store
            .latest
            .get_key_value(&req.key[..])
            .map(|(key, l)| ((key.clone(), l.mod_revision), *l));
        let (key, version, prev_kv, key_is_new) = match latest {
            Some((at, l)) if l.version != 0 => {
                let held = || {
                    self.store
                        .history
                        .get(&at)
                        .expect("the latest index names a held version")
                };
                let value = if req.ignore_value {
                    held().value.clone()
                } else {
                    // Copy: a slice of the request would pin the whole log
                    // entry.
                    Bytes::copy_from_slice(&req.value)
                };
                let version = Version {
                    create_revision: l.create_revision,
                    version: l.version + 1,
                    value,
                    lease: if req.ignore_lease { l.lease } else { req.lease },
                    sub: 0,
                };
                let prev_kv = req.prev_kv.then(|| held().key_value(&at.0, at.1));
                self.attach(&at.0, l.lease, version.lease);
                (at.0.clone(), version, prev_kv, false)
            }
            latest => {
                let latest = latest.as_ref();
                if req.ignore_value || req.ignore_lease {
                    return Err(KvError::KeyNotFound);
                }
                let version = Version {
                    create_revision: self.write_revision(),
                    version: 1,
                    value: Bytes::copy_from_slice(&req.value),
                    lease: req.lease,
                    sub: 0,
                };
                // A new generation shares the key's bytes with the older
                // ones when any are still held.
                let made = match latest {
                    Some((at, _)) => (at.0.clone(), version, None, false),
                    None => (Bytes::copy_from_slice(&req.key), version, None, true),
                };
                self.attach(&made.0, 0, made.1.lease);
                made
            }
        };
        if version.version == 1 {
            self.store.stats.keys += 1;
        }
        self.add_version(key, version, key_is_new);
        Ok(PutResponse {
            header: header(self.view_revision()),
            prev_kv,
        })
    }

    fn delete_range(&mut self, req: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut gone: Vec<(Bytes, i64, Version)> = Vec::new();
        for_each_live(
            &self.store.history,
            &req.key,
            &req.range_end,
            i64::MAX,
            |key, mod_revision, v| {
                gone.push((key.clone(), mod_revision, v.clone()));
                true
            },
        );
        let deleted = gone.len() as i64;
        let mut prev_kvs = Vec::new();
        for (key, mod_revision, v) in gone {
            if req.prev_kv {
                prev_kvs.push(v.key_value(&key, mod_revision));
            }
            self.store.stats.keys -= 1;
            self.attach(&key, v.lease, 0);
            self.add_version(key, Version::TOMBSTONE, false);
        }
        DeleteRangeResponse {
            header: header(self.view_revision()),
            deleted,
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
        if self.written.is_empty() {
            return;
        }
        self.store.revision = self.write_revision();
        let store = &mut *self.store;
        if let Some(events) = &mut store.events {
            let first = events.len();
            for (at, before) in &self.written {
                let v = store.history.get(at).expect("a version written is held");
                let prev = before.filter(|b| b.version != 0).and_then(|b| {
                    let prev_at = (at.0.clone(), b.mod_revision);
                    store
                        .history
                        .get(&prev_at)
                        .map(|p| p.key_value(&at.0, b.mod_revision))
                });
                events.push(super::events::event(&at.0, at.1, v, prev));
            }
            // In the order written: a Txn's operations in order, a
            // DeleteRange's keys in key order (as etcd).
            debug_assert!(events[first..].len() == self.written.len());
        }
        debug_assert!(self
            .written
            .iter()
            .all(|(at, _)| at.1 == self.store.revision && self.store.history.contains_key(at)));
    }

    fn rollback(self) {
        for (at, before) in self.written.into_iter().rev() {
            let removed = self.store.history.remove(&at);
            assert!(removed.is_some(), "a version this request added is held");
            match before {
                Some(before) => self.store.latest.insert(at.0, before),
                None => self.store.latest.remove(&at.0),
            };
        }
        self.store.stats = self.stats_before;
        self.store.leases = self.leases_before;
    }
}
