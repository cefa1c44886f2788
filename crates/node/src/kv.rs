//! The KV state machine: an ordered map with etcd v3 revisions, and its
//! snapshots.
//!
//! Owns the keyspace and the meaning of Put, Range, DeleteRange and Txn
//! (etcd v3 semantics, written for Skiff). It is applied in log order by one
//! thread and must be deterministic: the same sequence of
//! [`KvStore::apply`]/[`KvStore::mark_applied`] calls gives the same state and
//! the same responses on every replica. It must never do I/O of its own (the
//! snapshot functions read and write the streams they are given), never look
//! at clocks or randomness, and never panic on client input.
//!
//! Revisions, as etcd: the store revision starts at 1 and grows by one for
//! each applied write request that changed something; all changes of one Txn
//! share one revision. Only the latest version of each key is kept, so a read
//! at an older revision is [`KvError::Compacted`].
//!
//! Submodules: `exec` (executing one request, atomically), `validate` (the
//! request checks shared by the proposer and `apply`), `snapshot` (the
//! snapshot format).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, ResponseOp};
use crate::pb::mvccpb::KeyValue;

mod exec;
mod snapshot;
mod validate;

pub use snapshot::{SnapshotError, SnapshotInfo, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
pub use validate::validate_request;

/// The revision of an empty store, as etcd (the first write is revision 2).
pub const REVISION_INITIAL: i64 = 1;
/// The most ops at one level of a txn (max of compares, success, failure),
/// as etcd's `--max-txn-ops` default; a nested txn gets what its parent left.
pub const TXN_OPS_MAX: usize = 128;
/// The most request ops in a whole txn tree, all levels together: bounds the
/// work of validating and applying one txn.
pub const TXN_TREE_OPS_MAX: usize = 1024;
/// The deepest nesting of txns (a top-level txn is depth 1).
pub const TXN_DEPTH_MAX: usize = 16;
/// Longest key a Put may write (etcd's default request size limit, 1.5 MiB).
/// Snapshots treat a longer key as corruption.
pub const KEY_BYTES_MAX: usize = 1536 * 1024;
/// Longest value a Put may write; see [`KEY_BYTES_MAX`].
pub const VALUE_BYTES_MAX: usize = 1536 * 1024;
/// What [`KvStore::approx_bytes`] counts for one record besides its key and
/// value (map node, revisions, version).
pub const RECORD_OVERHEAD_BYTES: u64 = 64;

/// A request the KV store refuses. Nothing is changed when one is returned.
/// Messages are etcd's, so that etcd clients recognise them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A Put with ignore_value/ignore_lease on a missing key, or an op with
    /// no request in it (as etcd).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// Leases are not served: any lease id is unknown.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: txn nesting deeper than {TXN_DEPTH_MAX}")]
    TxnTooDeep,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
}

/// The gRPC status code of a [`KvError`], without depending on tonic; the
/// numbers are gRPC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum GrpcCode {
    InvalidArgument = 3,
    NotFound = 5,
    OutOfRange = 11,
}

impl GrpcCode {
    /// The numeric gRPC code (`tonic::Code::from_i32` takes it).
    pub fn as_i32(self) -> i32 {
        self as i32
    }
}

impl KvError {
    /// The code etcd answers this error with.
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            KvError::EmptyKey
            | KvError::KeyNotFound
            | KvError::ValueProvided
            | KvError::LeaseProvided
            | KvError::DuplicateKey
            | KvError::TooManyOps
            | KvError::TxnTooDeep
            | KvError::RequestTooLarge => GrpcCode::InvalidArgument,
            KvError::LeaseNotFound => GrpcCode::NotFound,
            KvError::Compacted | KvError::FutureRevision => GrpcCode::OutOfRange,
        }
    }
}

/// What the store keeps for one live key.
///
/// Invariants: `1 <= create_revision <= mod_revision <= store revision`,
/// `1 <= version <= mod_revision - create_revision + 1` (each modification
/// since creation has its own revision).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    value: Bytes,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

impl Record {
    fn key_value(&self, key: &Bytes) -> KeyValue {
        KeyValue {
            key: key.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: 0,
        }
    }

    fn check(&self, key: &[u8], revision: i64) -> Result<(), &'static str> {
        if key.is_empty() {
            return Err("empty key");
        }
        if key.len() > KEY_BYTES_MAX {
            return Err("key longer than KEY_BYTES_MAX");
        }
        if self.value.len() > VALUE_BYTES_MAX {
            return Err("value longer than VALUE_BYTES_MAX");
        }
        if !(REVISION_INITIAL < self.create_revision
            && self.create_revision <= self.mod_revision
            && self.mod_revision <= revision)
        {
            return Err("revisions out of order");
        }
        let modifications_max = self.mod_revision - self.create_revision + 1;
        if !(1 <= self.version && self.version <= modifications_max) {
            return Err("version out of range");
        }
        Ok(())
    }
}

fn record_bytes(key: &[u8], record: &Record) -> u64 {
    (key.len() + record.value.len()) as u64 + RECORD_OVERHEAD_BYTES
}

/// The KV state machine. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStore {
    map: BTreeMap<Bytes, Record>,
    /// Invariant: `revision >= REVISION_INITIAL`; never moves back.
    revision: i64,
    /// The last Raft log index applied (writes, no-ops, membership entries).
    /// Invariant: strictly increases with each apply/mark_applied.
    applied_index: u64,
    /// Sum of `record_bytes` over `map`, kept incrementally.
    approx_bytes: u64,
}

impl Default for KvStore {
    fn default() -> Self {
        Self::new()
    }
}

impl KvStore {
    pub fn new() -> Self {
        KvStore {
            map: BTreeMap::new(),
            revision: REVISION_INITIAL,
            applied_index: 0,
            approx_bytes: 0,
        }
    }

    /// The store revision: that of the last change.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The last Raft log index applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Approximate memory held by keys and values, with a fixed overhead per
    /// key ([`RECORD_OVERHEAD_BYTES`]).
    pub fn approx_bytes(&self) -> u64 {
        self.approx_bytes
    }

    /// Records that the log entry at `index` (a no-op or membership entry)
    /// was applied without touching the keyspace.
    ///
    /// Panics if `index` does not move forward: applying twice would break
    /// determinism, so it is a bug in the caller, loudly.
    pub fn mark_applied(&mut self, index: u64) {
        self.advance_applied(index);
    }

    /// Applies the client request of the log entry at `index`.
    ///
    /// Deterministic. On error nothing in the keyspace changes (the revision
    /// neither), but `applied_index` still becomes `index`: the entry was
    /// applied, its answer is the error. The request is validated again
    /// ([`validate_request`]) so that a replica never depends on the
    /// proposer's checks. Response headers carry only `revision`; the caller
    /// fills cluster_id, member_id and raft_term.
    ///
    /// Panics if `index` does not move forward (see [`Self::mark_applied`]).
    pub fn apply(&mut self, index: u64, op: &RequestOp) -> Result<ResponseOp, KvError> {
        self.advance_applied(index);
        validate_request(op)?;
        let revision_before = self.revision;
        let result = exec::apply_atomically(self, op);
        assert!(
            self.revision == revision_before
                || (result.is_ok() && self.revision == revision_before + 1),
            "one request moves the revision by at most one, and only on success"
        );
        result
    }

    /// Serves a read at the current state. `req.revision` other than 0 must
    /// be the current revision (older ones are compacted, as only the latest
    /// version of each key is kept).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        validate::validate_range(req)?;
        exec::check_read_revision(req.revision, self.revision, false)?;
        Ok(exec::range(&self.map, req, self.revision))
    }

    /// A checksum of the whole state (keys, records, revision, applied
    /// index): the CRC32C of its snapshot. Replicas that applied the same
    /// log prefix have the same digest.
    pub fn digest(&self) -> u32 {
        self.write_snapshot(&mut std::io::sink())
            .expect("writing to io::sink cannot fail")
            .crc32c
    }

    /// Checks every invariant of the store (O(n)); tests call it after
    /// each step.
    pub fn check_invariants(&self) {
        assert!(self.revision >= REVISION_INITIAL);
        let mut bytes = 0;
        for (key, record) in &self.map {
            if let Err(reason) = record.check(key, self.revision) {
                panic!("record {key:?} breaks an invariant: {reason}: {record:?}");
            }
            bytes += record_bytes(key, record);
        }
        assert_eq!(bytes, self.approx_bytes, "approx_bytes drifted");
    }

    fn advance_applied(&mut self, index: u64) {
        assert!(
            index > self.applied_index,
            "log index {index} applied after {}",
            self.applied_index
        );
        self.applied_index = index;
    }

    /// Stores `record` under `key` (copied only when the key is new) and
    /// returns the record it replaced.
    fn insert_record(&mut self, key: &[u8], record: Record) -> Option<Record> {
        self.approx_bytes += record_bytes(key, &record);
        let old = match self.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, record)),
            None => {
                self.map.insert(Bytes::copy_from_slice(key), record);
                None
            }
        };
        if let Some(old) = &old {
            self.approx_bytes -= record_bytes(key, old);
        }
        old
    }

    fn remove_record(&mut self, key: &[u8]) -> Option<Record> {
        let old = self.map.remove(key);
        if let Some(old) = &old {
            self.approx_bytes -= record_bytes(key, old);
        }
        old
    }
}
