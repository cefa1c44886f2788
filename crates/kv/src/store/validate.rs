//! Request checks shared by the proposer (before a request enters the log)
//! and [`super::KvStore::apply`] (after it left it). They look only at the
//! request, never at the store, so both sides reach the same verdict.

use std::collections::BTreeMap;

use super::exec::KeyRange;
use super::{
    KvError, KEY_BYTES_MAX, TXN_DEPTH_MAX, TXN_OPS_MAX, TXN_TREE_OPS_MAX, VALUE_BYTES_MAX,
};
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};

/// Checks a request as etcd does before proposing it:
/// * every key (of ops and compares) is non-empty ([`KvError::EmptyKey`]);
///   an op with no request in it is [`KvError::KeyNotFound`] (etcd's answer);
/// * a Put's key and value fit [`KEY_BYTES_MAX`] / [`VALUE_BYTES_MAX`];
///   ignore_value comes without a value, ignore_lease without a lease;
/// * a txn level has at most [`TXN_OPS_MAX`] compares, success ops and
///   failure ops each, a nested txn at most what its parent left (etcd's
///   rule); the whole tree at most [`TXN_TREE_OPS_MAX`] ops and
///   [`TXN_DEPTH_MAX`] levels;
/// * a txn never writes a key twice on any path: two puts of one key, or a
///   put inside a delete range ([`KvError::DuplicateKey`]). The two branches
///   of a nested txn exclude each other, so they may write the same keys.
///   This is etcd's rule, a little stricter: etcd misses a put in one nested
///   txn and a delete in a later sibling.
pub fn validate_request(op: &RequestOp) -> Result<(), KvError> {
    let mut tree_ops = 0;
    validate_op(op, TXN_OPS_MAX, 0, &mut tree_ops)?;
    if let Some(Request::RequestTxn(txn)) = &op.request {
        branch_writes(&txn.success)?;
        branch_writes(&txn.failure)?;
    }
    Ok(())
}

pub(super) fn validate_range(req: &RangeRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

fn validate_put(req: &PutRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if req.key.len() > KEY_BYTES_MAX || req.value.len() > VALUE_BYTES_MAX {
        return Err(KvError::RequestTooLarge);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

/// `depth` is the number of txns around `op`.
fn validate_op(
    op: &RequestOp,
    ops_max: usize,
    depth: usize,
    tree_ops: &mut usize,
) -> Result<(), KvError> {
    match &op.request {
        None => Err(KvError::KeyNotFound),
        Some(Request::RequestRange(req)) => validate_range(req),
        Some(Request::RequestPut(req)) => validate_put(req),
        Some(Request::RequestDeleteRange(req)) if req.key.is_empty() => Err(KvError::EmptyKey),
        Some(Request::RequestDeleteRange(_)) => Ok(()),
        Some(Request::RequestTxn(txn)) => validate_txn(txn, ops_max, depth + 1, tree_ops),
    }
}

fn validate_txn(
    txn: &TxnRequest,
    ops_max: usize,
    depth: usize,
    tree_ops: &mut usize,
) -> Result<(), KvError> {
    if depth > TXN_DEPTH_MAX {
        return Err(KvError::TxnTooDeep);
    }
    let level_ops = txn
        .compare
        .len()
        .max(txn.success.len())
        .max(txn.failure.len());
    if level_ops > ops_max {
        return Err(KvError::TooManyOps);
    }
    *tree_ops += txn.success.len() + txn.failure.len();
    if *tree_ops > TXN_TREE_OPS_MAX {
        return Err(KvError::TooManyOps);
    }
    if txn.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KvError::EmptyKey);
    }
    for op in txn.success.iter().chain(&txn.failure) {
        validate_op(op, ops_max - level_ops, depth, tree_ops)?;
    }
    Ok(())
}

/// What one branch of a txn may write, all paths below it together.
#[derive(Default)]
struct Writes<'a> {
    /// Without repeats.
    puts: Vec<&'a [u8]>,
    deletes: Vec<KeyRange<'a>>,
}

/// The writes of `ops` (one branch), or [`KvError::DuplicateKey`] when two of
/// its ops could write the same key on one path.
fn branch_writes(ops: &[RequestOp]) -> Result<Writes<'_>, KvError> {
    // One group per op; ops of a branch all run, so groups must not overlap.
    let mut groups: Vec<Writes<'_>> = Vec::new();
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(req)) => groups.push(Writes {
                puts: vec![&req.key[..]],
                deletes: Vec::new(),
            }),
            Some(Request::RequestDeleteRange(req)) => groups.push(Writes {
                puts: Vec::new(),
                deletes: vec![KeyRange::new(&req.key, &req.range_end)],
            }),
            Some(Request::RequestTxn(txn)) => {
                let mut writes = branch_writes(&txn.success)?;
                let failure = branch_writes(&txn.failure)?;
                writes.puts.extend(failure.puts);
                writes.puts.sort_unstable();
                writes.puts.dedup();
                writes.deletes.extend(failure.deletes);
                groups.push(writes);
            }
            Some(Request::RequestRange(_)) | None => {}
        }
    }
    let mut put_group: BTreeMap<&[u8], usize> = BTreeMap::new();
    for (group, writes) in groups.iter().enumerate() {
        for key in &writes.puts {
            if put_group.insert(key, group).is_some() {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    for (group, writes) in groups.iter().enumerate() {
        for range in &writes.deletes {
            let bounds = range.bounds();
            if put_group
                .range::<[u8], _>(bounds)
                .any(|(_, &put_in)| put_in != group)
            {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    let mut all = Writes::default();
    for writes in groups {
        all.puts.extend(writes.puts);
        all.deletes.extend(writes.deletes);
    }
    Ok(all)
}
