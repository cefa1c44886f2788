//! The KV state machine: an MVCC keyspace with etcd v3 revisions, its
//! compaction and its snapshots.
//!
//! Owns the keyspace and the meaning of Put, Range, DeleteRange, Txn and
//! Compact (etcd v3 semantics, `server/storage/mvcc`, written for Skiff). It
//! is applied in log order by one thread and must be deterministic: the same
//! sequence of [`KvStore::apply`]/[`KvStore::compact`]/
//! [`KvStore::mark_applied`] calls gives the same state and the same
//! responses on every replica. It must never do I/O of its own (the snapshot
//! functions read and write the streams they are given), never look at
//! clocks or randomness, and never panic on client input.
//!
//! # The MVCC model
//!
//! Revisions, as etcd: the store revision starts at [`REVISION_INITIAL`] and
//! grows by one for each applied write request that changed something; all
//! changes of one request (a whole Txn tree) share one revision.
//!
//! Every write adds a *version* of a key at the request's revision; nothing
//! already written is ever changed. The history is one persistent ordered
//! map `(key, mod_revision) -> Version` (`imbl::OrdMap`, a B-tree with
//! structurally shared nodes), so the versions of one key are adjacent and
//! ascend by revision. A version holds `create_revision`, `version` and
//! `value`; a delete writes a *tombstone* (`version == 0`). The versions
//! from a creation (version 1, `create_revision == mod_revision`) up to the
//! next tombstone form a *generation*; a key deleted and put again starts a
//! new generation at version 1, as etcd. All versions of a key share one
//! copy of its bytes (`Bytes` refcount).
//!
//! Reading key `k` at revision `R` is the last version in
//! `(k, MIN)..=(k, R)`, unless it is a tombstone. A Range `[a, b)` at `R`
//! seeks from key to key: for each distinct key, one seek to its latest
//! version `<= R` and one seek past all its versions, so a key with a long
//! history costs the same as one with a single version.
//!
//! # Compaction
//!
//! [`KvStore::compact`] (applied from the log) sets the compact revision `C`
//! at once: from then on reads below `C` are [`KvError::Compacted`] (a read
//! *at* `C` is allowed). Of each key, the versions that no read at `>= C`
//! can see — every version `<= C` except the latest one `<= C`, and that
//! one too if it is a tombstone — are *logically* gone at once and removed
//! *physically* later, in bounded steps ([`KvStore::compact_step`]), so that
//! a huge store never blocks its caller. Physical progress is invisible:
//! reads, [`KvStore::digest`], [`KvStore::hash_kv`] and snapshot bytes are
//! the same at any progress (the snapshot writer skips logically removed
//! versions), so replicas that compact at different speeds agree exactly.
//! Only [`KvStore::stats`] (memory held) sees it.
//!
//! # Cost of each operation (n: versions held, m: keys in the range)
//!
//! * Put, DeleteRange of one key: O(log n) — one seek for the key's latest
//!   version and one insert; no per-key history is copied.
//! * Range at any revision: O(m log n); count_only too.
//! * Txn: the sum of its ops; atomicity costs one undo entry per write.
//! * [`KvStore::freeze`]: O(1) (clones the map's root); the first write into
//!   a node still shared with a frozen view copies that node (16 entries).
//! * [`KvStore::compact`]: O(1); [`KvStore::compact_step`]`(budget)`:
//!   O(budget log n).
//! * [`KvStore::hash_kv`], [`KvStore::digest`], snapshots,
//!   [`KvStore::check_invariants`]: O(n).
//! * [`KvStore::stats`], [`KvStore::len`], [`KvStore::approx_bytes`]: O(1),
//!   kept incrementally.
//!
//! Submodules: `exec` (executing one request, atomically), `compact`
//! (physical compaction, the logical view and HashKV), `validate` (the
//! request checks shared by the proposer and `apply`), `snapshot` (the
//! snapshot format), `alarm` (the replicated alarms and what NOSPACE
//! refuses), `auth` (users, roles, permissions and tokens).

use bytes::Bytes;

use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, ResponseOp};
use crate::pb::mvccpb::{Event, KeyValue};

mod alarm;
pub mod auth;
mod compact;
mod events;
mod exec;
mod latest;
mod snapshot;
mod validate;

pub use alarm::{write_cost, Alarm, AlarmKind, LEASE_COST_BYTES};
pub use events::key_in_range;
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
/// What [`StoreStats::bytes`] counts for one version besides its value (and
/// its key's bytes, counted once per key): the map entry (key handle,
/// revision, version, value handle: 88 B) with its B-tree node's slack and
/// inner nodes.
///
/// With [`KEY_OVERHEAD_BYTES`], measured with a counting allocator
/// (`tests/store_memory.rs`, bytes requested, malloc's own slack not
/// included), 16-B keys, 128-B values: 1,000,000 versions cost 385.3 B each
/// besides key and value bytes with one version per key, 190.9 B with 10
/// versions per key; solving `version + key × keys / versions` for the two
/// gives 169 B and 216 B (200,000 versions: 177 B and 157 B).
pub const VERSION_OVERHEAD_BYTES: u64 = 170;
/// What [`StoreStats::bytes`] counts for each key held besides its bytes:
/// its entry in the latest-version index (key handle and 24 B, in hash
/// tables that are between half and seven eighths full). See
/// [`VERSION_OVERHEAD_BYTES`] for the measurement.
pub const KEY_OVERHEAD_BYTES: u64 = 185;
/// Kept for callers of the single-version store: the overhead per version.
pub const RECORD_OVERHEAD_BYTES: u64 = VERSION_OVERHEAD_BYTES;

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
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
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
    /// A request that would grow the store while a NOSPACE alarm is active
    /// (or, refused before proposing, that would take it over its quota).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    // Authentication and authorization (etcd's `rpctypes` messages).
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
}

/// The gRPC status code of a [`KvError`], without depending on tonic; the
/// numbers are gRPC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum GrpcCode {
    InvalidArgument = 3,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    OutOfRange = 11,
    Unauthenticated = 16,
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
            | KvError::RequestTooLarge
            | KvError::LeaseTtlTooLarge => GrpcCode::InvalidArgument,
            KvError::LeaseExists => GrpcCode::FailedPrecondition,
            KvError::LeaseNotFound => GrpcCode::NotFound,
            KvError::Compacted | KvError::FutureRevision => GrpcCode::OutOfRange,
            KvError::NoSpace => GrpcCode::ResourceExhausted,
            KvError::UserEmpty
            | KvError::RoleEmpty
            | KvError::AuthFailed
            | KvError::PermissionNotGiven
            | KvError::InvalidAuthMgmt
            | KvError::AuthOldRevision => GrpcCode::InvalidArgument,
            KvError::RootUserNotExist
            | KvError::RootRoleNotExist
            | KvError::UserAlreadyExist
            | KvError::UserNotFound
            | KvError::RoleAlreadyExist
            | KvError::RoleNotFound
            | KvError::RoleNotGranted
            | KvError::PermissionNotGranted
            | KvError::AuthNotEnabled => GrpcCode::FailedPrecondition,
            KvError::PermissionDenied => GrpcCode::PermissionDenied,
            KvError::InvalidAuthToken => GrpcCode::Unauthenticated,
        }
    }
}

/// What the store holds, for metrics and Status; O(1) to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Live keys at the current revision.
    pub keys: u64,
    /// Versions held, tombstones and versions not yet physically compacted
    /// included.
    pub versions: u64,
    /// Approximate bytes held: each distinct key's bytes once (its versions
    /// share them) and [`KEY_OVERHEAD_BYTES`], each version's value and
    /// [`VERSION_OVERHEAD_BYTES`].
    pub bytes: u64,
}

/// The map key: a key and the revision of one of its versions.
type At = (Bytes, i64);
/// Every version held, in (key, mod_revision) order.
type History = imbl::OrdMap<At, Version>;

/// One version of a key; its key and mod_revision are the map key.
///
/// Invariants (checked by [`check_chain`]): a live version has
/// `REVISION_INITIAL < create_revision <= mod_revision` and
/// `1 <= version <= mod_revision - create_revision + 1`; a tombstone has
/// `version == 0`, `create_revision == 0` and an empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    create_revision: i64,
    /// 0: tombstone.
    version: i64,
    value: Bytes,
    /// The lease the key is attached to by this version (0: none).
    lease: i64,
    /// Its place among the writes of its revision, 0 first: the order of
    /// a Txn's operations (etcd's sub-revision). Watch events of one
    /// revision come in this order. Not hashed, and 0 for versions read
    /// from a snapshot older than v6 (their events come in key order).
    sub: u32,
}

impl Version {
    const TOMBSTONE: Version = Version {
        create_revision: 0,
        version: 0,
        value: Bytes::new(),
        lease: 0,
        sub: 0,
    };

    fn is_tombstone(&self) -> bool {
        self.version == 0
    }

    fn key_value(&self, key: &Bytes, mod_revision: i64) -> KeyValue {
        debug_assert!(!self.is_tombstone());
        KeyValue {
            key: key.clone(),
            create_revision: self.create_revision,
            mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }

    fn bytes(&self) -> u64 {
        self.value.len() as u64 + VERSION_OVERHEAD_BYTES
    }
}

/// The previous version of the same key, for [`check_chain`].
struct Prev<'a> {
    mod_revision: i64,
    version: &'a Version,
}

/// Checks one version against the previous version of the same key (None:
/// it is the first version held of its key). `floor`: the revision up to
/// which compaction removed every version it may (each key keeps at most
/// one version `<= floor`, and a live one).
fn check_chain(
    key: &[u8],
    mod_revision: i64,
    v: &Version,
    prev: Option<Prev<'_>>,
    revision: i64,
    compact_revision: i64,
    floor: i64,
) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > KEY_BYTES_MAX {
        return Err("key longer than KEY_BYTES_MAX");
    }
    if v.value.len() > VALUE_BYTES_MAX {
        return Err("value longer than VALUE_BYTES_MAX");
    }
    if !(REVISION_INITIAL < mod_revision && mod_revision <= revision) {
        return Err("mod revision out of range");
    }
    if v.is_tombstone() {
        if v.create_revision != 0 || !v.value.is_empty() {
            return Err("tombstone with a create revision or a value");
        }
        if mod_revision <= floor {
            return Err("tombstone kept below the compacted revision");
        }
    } else {
        if !(REVISION_INITIAL < v.create_revision && v.create_revision <= mod_revision) {
            return Err("create revision out of range");
        }
        if !(1 <= v.version && v.version <= mod_revision - v.create_revision + 1) {
            return Err("version out of range");
        }
    }
    match prev {
        Some(prev) => {
            if prev.mod_revision >= mod_revision {
                return Err("versions of a key not in revision order");
            }
            if mod_revision <= floor {
                return Err("version kept below the compacted revision");
            }
            match (prev.version.is_tombstone(), v.is_tombstone()) {
                (true, true) => return Err("two tombstones in a row"),
                (true, false) if v.version != 1 || v.create_revision != mod_revision => {
                    return Err("generation does not start at version 1")
                }
                (false, false)
                    if v.create_revision != prev.version.create_revision
                        || v.version != prev.version.version + 1 =>
                {
                    return Err("version does not follow its predecessor")
                }
                _ => {}
            }
        }
        // The first version held: either a generation's start, or its
        // predecessors were compacted away, which needs a version after
        // them at or below the compact revision: this one.
        None if v.version == 1 => {
            if v.create_revision != mod_revision {
                return Err("version 1 not at its create revision");
            }
        }
        None => {
            if mod_revision > compact_revision {
                return Err("first version held starts no generation");
            }
        }
    }
    Ok(())
}

/// Physical compaction under way: versions up to `target` (the compact
/// revision) are being removed, in key order, from `resume` (inclusive;
/// None: from the first key).
#[derive(Debug, Clone)]
struct Compaction {
    target: i64,
    resume: Option<At>,
}

/// The KV state machine. See the module docs.
///
/// Equality is logical: two stores are equal when they hold the same
/// readable history and the same revisions, whatever their physical
/// compaction progress.
#[derive(Debug, Clone)]
pub struct KvStore {
    history: History,
    /// Invariant: `revision >= REVISION_INITIAL`; never moves back.
    revision: i64,
    /// Reads below it are refused. Invariant: `0 <= compact_revision <=
    /// revision`; never moves back.
    compact_revision: i64,
    /// Invariant: `physically_compacted <= compact_revision`, equal when
    /// `compaction` is None.
    physically_compacted: i64,
    /// Invariant: when Some, its target is `compact_revision`.
    compaction: Option<Compaction>,
    /// The last Raft log index applied (writes, no-ops, membership entries,
    /// compactions). Invariant: strictly increases with each apply.
    applied_index: u64,
    /// Kept incrementally; `check_invariants` recounts it.
    stats: StoreStats,
    /// Each key's latest version held (tombstones included), by key: a Put
    /// finds what it replaces with one hash lookup instead of an ordered
    /// seek. Derived from `history` (never serialized; rebuilt by
    /// `read_snapshot`) and not part of a frozen view, so `freeze` stays
    /// O(1). Lookups only, never iterated: no effect on determinism.
    latest: Latest,
    /// The watch events of the requests applied since the last
    /// [`KvStore::take_events`], while collecting
    /// ([`KvStore::collect_events`]); None: not collecting. Not state:
    /// never serialized, compared or frozen.
    events: Option<Vec<Event>>,
    /// The leases granted and not revoked, by id.
    leases: Leases,
    /// The active alarms.
    alarms: alarm::Alarms,
    /// Users, roles, tokens; shared with frozen views and with the API
    /// (copied on change).
    auth: std::sync::Arc<auth::AuthState>,
}

/// Leases by id: a persistent map, so that a frozen view shares it.
type Leases = imbl::OrdMap<i64, Lease>;

/// A lease as the replicated state holds it. When it expires is decided by
/// the leader's clock, outside the state (see `crate::lease`); the state
/// holds what every member must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The TTL granted, seconds.
    pub ttl: i64,
    /// The TTL left at the last checkpoint, seconds (0: none since the
    /// grant or the last keepalive): what a new leader counts from.
    pub remaining: i64,
    /// The live keys attached to it.
    keys: imbl::OrdSet<Bytes>,
}

impl Lease {
    /// The keys attached, in order.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.keys.iter()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// The longest TTL a lease may be granted, seconds (etcd's MaxLeaseTTL).
pub const LEASE_TTL_MAX: i64 = 9_000_000_000;

/// Key → its latest version held, without the value (the history has it):
/// the key's bytes (shared with the history) and 24 bytes. Sharded, so
/// that it never grows by rehashing every key on one apply (see
/// [`latest`]).
type Latest = latest::LatestIndex<LatestVersion>;

/// What [`KvStore::latest`] keeps of a key's latest version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LatestVersion {
    mod_revision: i64,
    create_revision: i64,
    /// 0: tombstone.
    version: i64,
    lease: i64,
}

impl LatestVersion {
    fn of(mod_revision: i64, v: &Version) -> Self {
        LatestVersion {
            mod_revision,
            create_revision: v.create_revision,
            version: v.version,
            lease: v.lease,
        }
    }
}

/// A frozen copy of the store, taken in O(1) by [`KvStore::freeze`]; it
/// shares the history with the store and can be serialized on another
/// thread while the store goes on.
#[derive(Debug, Clone)]
pub struct StoreView {
    history: History,
    leases: Leases,
    alarms: alarm::Alarms,
    auth: std::sync::Arc<auth::AuthState>,
    revision: i64,
    compact_revision: i64,
    applied_index: u64,
    stats: StoreStats,
}

const _: () = {
    const fn send_sync_static<T: Send + Sync + 'static>() {}
    send_sync_static::<StoreView>();
    send_sync_static::<KvStore>();
};

impl Default for KvStore {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for KvStore {
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision
            && self.compact_revision == other.compact_revision
            && self.applied_index == other.applied_index
            && self.stats.keys == other.stats.keys
            && self.leases == other.leases
            && self.alarms == other.alarms
            && self.auth == other.auth
            && compact::logical(&self.history, self.compact_revision)
                .eq(compact::logical(&other.history, other.compact_revision))
    }
}

impl Eq for KvStore {}

impl KvStore {
    pub fn new() -> Self {
        KvStore {
            history: History::new(),
            revision: REVISION_INITIAL,
            compact_revision: 0,
            physically_compacted: 0,
            compaction: None,
            applied_index: 0,
            stats: StoreStats::default(),
            latest: Latest::default(),
            events: None,
            leases: Leases::new(),
            alarms: alarm::Alarms::new(),
            auth: std::sync::Arc::default(),
        }
    }

    /// The store revision: that of the last change.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Reads below this revision are [`KvError::Compacted`] (0: never
    /// compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// The revision up to which compaction has physically removed what it
    /// may; lags [`Self::compact_revision`] while [`Self::compact_step`] has
    /// work left.
    pub fn physically_compacted(&self) -> i64 {
        self.physically_compacted
    }

    /// The last Raft log index applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.stats.keys as usize
    }

    pub fn is_empty(&self) -> bool {
        self.stats.keys == 0
    }

    /// What the store holds (O(1)).
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Approximate memory held ([`StoreStats::bytes`]).
    pub fn approx_bytes(&self) -> u64 {
        self.stats.bytes
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
    /// proposer's checks. While a NOSPACE alarm is active a request that
    /// would grow the store ([`write_cost`] > 0) is [`KvError::NoSpace`].
    /// Response headers carry only `revision`; the caller fills cluster_id,
    /// member_id and raft_term.
    ///
    /// Panics if `index` does not move forward (see [`Self::mark_applied`]).
    pub fn apply(&mut self, index: u64, op: &RequestOp) -> Result<ResponseOp, KvError> {
        self.advance_applied(index);
        validate_request(op)?;
        self.check_space(write_cost(op))?;
        let revision_before = self.revision;
        let result = exec::apply_atomically(self, op);
        assert!(
            self.revision == revision_before
                || (result.is_ok() && self.revision == revision_before + 1),
            "one request moves the revision by at most one, and only on success"
        );
        result
    }

    /// Serves a read: at `req.revision`, or at the current revision when it
    /// is 0. A revision above the current one is
    /// [`KvError::FutureRevision`]; one below the compact revision (any
    /// negative one included) is [`KvError::Compacted`]. The header carries
    /// the current revision, as etcd.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        validate::validate_range(req)?;
        let at = read_revision(req.revision, self.revision, self.compact_revision)?;
        Ok(exec::range(&self.history, req, at, self.revision))
    }

    /// Applies the compaction of the log entry at `index`: reads below
    /// `revision` are refused from now on, and [`Self::compact_step`]
    /// removes what they alone could see. `revision` at or below the
    /// compact revision is [`KvError::Compacted`], above the store revision
    /// [`KvError::FutureRevision`] (etcd's errors); either way the entry is
    /// applied. A compaction still being physically applied is taken over
    /// by the new one.
    ///
    /// Panics if `index` does not move forward (see [`Self::mark_applied`]).
    pub fn compact(&mut self, index: u64, revision: i64) -> Result<(), KvError> {
        self.advance_applied(index);
        if revision <= self.compact_revision {
            return Err(KvError::Compacted);
        }
        if revision > self.revision {
            return Err(KvError::FutureRevision);
        }
        self.compact_revision = revision;
        // What was removed for an older target is a subset of what this one
        // removes: start over from the first key.
        self.compaction = Some(Compaction {
            target: revision,
            resume: None,
        });
        Ok(())
    }

    /// Physically removes versions compacted away, visiting at most
    /// `budget` versions; returns true while work remains. Invisible to
    /// reads, digests and snapshots.
    pub fn compact_step(&mut self, budget: usize) -> bool {
        compact::step(self, budget)
    }

    /// etcd's HashKV: a CRC32C over every version (key, mod revision,
    /// tombstone flag, value, create revision, version, and the lease when
    /// the version has one) with
    /// `compact_revision < mod_revision <= revision` (0: the current
    /// revision). Returns the hash, the compact revision and the revision
    /// hashed. Errors as [`Self::range`]. Equal on replicas that applied
    /// the same log, whatever their physical compaction progress.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), KvError> {
        let at = read_revision(revision, self.revision, self.compact_revision)?;
        Ok((
            compact::hash(&self.history, self.compact_revision, at),
            self.compact_revision,
            at,
        ))
    }

    /// The auth state (shared: an O(1) clone).
    pub fn auth(&self) -> &std::sync::Arc<auth::AuthState> {
        &self.auth
    }

    /// Applies an auth change from the log entry at `index` (see
    /// [`auth::AuthState::apply`]). Changes no revision of the keyspace.
    pub fn auth_apply(&mut self, index: u64, change: &auth::AuthChange) -> Result<(), KvError> {
        self.advance_applied(index);
        let mut next = (*self.auth).clone();
        next.apply(change)?;
        self.auth = std::sync::Arc::new(next);
        Ok(())
    }

    /// An O(1) frozen copy for snapshots.
    pub fn freeze(&self) -> StoreView {
        StoreView {
            history: self.history.clone(),
            leases: self.leases.clone(),
            alarms: self.alarms.clone(),
            auth: self.auth.clone(),
            revision: self.revision,
            compact_revision: self.compact_revision,
            applied_index: self.applied_index,
            stats: self.stats,
        }
    }

    /// Grants lease `id` (non-zero) with `ttl` seconds, from the log entry
    /// at `index`. The TTL is the one decided by the proposer (raised to
    /// the cluster's minimum there): applying is deterministic. Refused
    /// with [`KvError::NoSpace`] while a NOSPACE alarm is active.
    pub fn lease_grant(&mut self, index: u64, id: i64, ttl: i64) -> Result<(), KvError> {
        self.advance_applied(index);
        self.check_space(LEASE_COST_BYTES)?;
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
            Lease {
                ttl: ttl.max(1),
                remaining: 0,
                keys: imbl::OrdSet::new(),
            },
        );
        Ok(())
    }

    /// Revokes lease `id`, from the log entry at `index`: deletes every key
    /// attached to it, all at one new revision (none when it has no keys),
    /// and forgets it. Returns the store revision after.
    pub fn lease_revoke(&mut self, index: u64, id: i64) -> Result<i64, KvError> {
        self.advance_applied(index);
        let lease = self.leases.get(&id).ok_or(KvError::LeaseNotFound)?;
        let keys: Vec<Bytes> = lease.keys.iter().cloned().collect();
        exec::delete_keys(self, &keys);
        self.leases.remove(&id);
        Ok(self.revision)
    }

    /// Records the TTL left of each lease (a checkpoint by the leader, from
    /// the log entry at `index`); leases no longer held are skipped.
    pub fn lease_checkpoint(&mut self, index: u64, remaining: &[(i64, i64)]) {
        self.advance_applied(index);
        for &(id, left) in remaining {
            if let Some(l) = self.leases.get_mut(&id) {
                l.remaining = left.clamp(0, l.ttl);
            }
        }
    }

    /// Lease `id`, when held.
    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Leases held (O(1)).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease held, by id.
    pub fn leases(&self) -> impl Iterator<Item = (i64, &Lease)> {
        self.leases.iter().map(|(id, l)| (*id, l))
    }

    /// Starts (`true`) or stops collecting the watch events of applied
    /// requests. While collecting, each request that changes something
    /// records one [`Event`] per key it wrote (a delete's `kv` holds the key
    /// and mod_revision only), with the key's previous live version as
    /// `prev_kv`; the events of one revision are in the order written (a
    /// Txn's operations in order, a range's keys in key order). Costs one
    /// lookup per written key.
    pub fn collect_events(&mut self, on: bool) {
        match (on, &self.events) {
            (true, None) => self.events = Some(Vec::new()),
            (false, Some(_)) => self.events = None,
            _ => {}
        }
    }

    /// Whether events are being collected.
    pub fn collecting_events(&self) -> bool {
        self.events.is_some()
    }

    /// The events collected since the last call (empty when not
    /// collecting), in revision order.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// A checksum of the whole state (history, revisions, applied index):
    /// the CRC32C of its snapshot. Replicas that applied the same log
    /// prefix have the same digest.
    pub fn digest(&self) -> u32 {
        self.write_snapshot(&mut std::io::sink())
            .expect("writing to io::sink cannot fail")
            .crc32c
    }

    /// Checks every invariant of the store, history included (O(n)); tests
    /// call it after each step.
    pub fn check_invariants(&self) {
        assert!(self.revision >= REVISION_INITIAL);
        assert!(0 <= self.compact_revision && self.compact_revision <= self.revision);
        assert!(self.physically_compacted <= self.compact_revision);
        match &self.compaction {
            Some(c) => assert_eq!(c.target, self.compact_revision),
            None => assert_eq!(self.physically_compacted, self.compact_revision),
        }
        let mut stats = StoreStats::default();
        let mut prev: Option<(&At, &Version)> = None;
        for (at, v) in &self.history {
            let same_key = prev.filter(|(p, _)| p.0 == at.0);
            let chain = same_key.map(|(p, pv)| Prev {
                mod_revision: p.1,
                version: pv,
            });
            if let Err(reason) = check_chain(
                &at.0,
                at.1,
                v,
                chain,
                self.revision,
                self.compact_revision,
                self.physically_compacted,
            ) {
                panic!("version {at:?} breaks an invariant: {reason}: {v:?}");
            }
            if same_key.is_none() {
                if let Some((_, pv)) = prev {
                    stats.keys += u64::from(!pv.is_tombstone());
                }
                stats.bytes += at.0.len() as u64 + KEY_OVERHEAD_BYTES;
            }
            stats.versions += 1;
            stats.bytes += v.bytes();
            prev = Some((at, v));
        }
        if let Some((_, pv)) = prev {
            stats.keys += u64::from(!pv.is_tombstone());
        }
        assert_eq!(stats, self.stats, "stats drifted");
        let mut keys = 0;
        for (at, v) in &self.history {
            let is_last = self
                .history
                .get_next(&(at.0.clone(), at.1 + 1))
                .is_none_or(|(n, _)| n.0 != at.0);
            if is_last {
                keys += 1;
                assert_eq!(
                    self.latest.get(&at.0),
                    Some(&LatestVersion::of(at.1, v)),
                    "latest index of {at:?}"
                );
            }
        }
        assert_eq!(keys, self.latest.len(), "latest index holds other keys");
        let mut attached: std::collections::BTreeMap<i64, Vec<Bytes>> = Default::default();
        for (key, l) in self.latest.iter() {
            if l.version != 0 && l.lease != 0 {
                attached.entry(l.lease).or_default().push(key.clone());
            }
        }
        for (id, lease) in &self.leases {
            let mut want = attached.remove(id).unwrap_or_default();
            want.sort();
            let have: Vec<Bytes> = lease.keys.iter().cloned().collect();
            assert_eq!(have, want, "keys of lease {id}");
        }
        assert!(
            attached.is_empty(),
            "keys attached to leases not held: {attached:?}"
        );
    }

    fn advance_applied(&mut self, index: u64) {
        assert!(
            index > self.applied_index,
            "log index {index} applied after {}",
            self.applied_index
        );
        self.applied_index = index;
    }
}

/// The revision a read at `revision` sees (0: `current`), or why it cannot
/// be served.
fn read_revision(revision: i64, current: i64, compact_revision: i64) -> Result<i64, KvError> {
    if revision == 0 {
        Ok(current)
    } else if revision > current {
        Err(KvError::FutureRevision)
    } else if revision < compact_revision || revision < 0 {
        Err(KvError::Compacted)
    } else {
        Ok(revision)
    }
}

/// The latest version of `key` at or below `at`, tombstones included.
fn version_at<'h>(history: &'h History, key: &Bytes, at: i64) -> Option<(&'h At, &'h Version)> {
    history
        .get_prev(&(key.clone(), at))
        .filter(|(found, _)| found.0 == *key)
}
