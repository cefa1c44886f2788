//! The MVCC store as a [`skiff_node::StateMachine`]: how its commands sit in
//! log entries, what it answers, what it serves as reads.
//!
//! A command's bytes (inside the runtime's command header):
//!
//! ```text
//! 0x01, RequestOp (prost encoding)   a Put, DeleteRange or Txn
//! 0x02, revision i64 LE              a Compact to `revision`
//! 0x03, id i64 LE, ttl i64 LE        a LeaseGrant
//! 0x04, id i64 LE                    a LeaseRevoke
//! 0x05, n u32 LE, n × (id i64 LE, remaining i64 LE)
//!                                    a LeaseCheckpoint (n <= LEASE_CHECKPOINT_MAX)
//! 0x06, action u8, member u64 LE, kind u8
//!                                    raise (action 1) or disarm (2) alarm
//!                                    `kind` (1 NOSPACE, 2 CORRUPT) of `member`
//! 0x07, change u8, fields            an auth change (`encode_auth`: strings
//!                                    and byte strings u32-length-prefixed)
//! 0x08, user_len u16 LE, user, command
//!                                    `command` (any but 0x08) asked by a
//!                                    client as `user` ("": none): checked
//!                                    against its permissions at apply
//! ```
//!
//! A command without the 0x08 header is the member's own (lease expiry,
//! checkpoints, auto-compaction, its NOSPACE alarm) and is not checked.
//!
//! The first byte lets a later release add commands (leases, ...); a byte
//! it does not know is refused before proposing ([`KvMachine::check_command`])
//! and fatal at apply (a log that every member cannot apply is corruption).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use skiff_node::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};

use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, ResponseOp};
use crate::store::auth::{AuthChange, AuthState, Perm, PermKind};
use crate::store::{Alarm, AlarmKind, KvError, KvStore, StoreStats, StoreView};
use crate::watch::Hub;

/// Tag of a [`KvCommand::Op`].
pub const TAG_OP: u8 = 1;
/// Tag of a [`KvCommand::Compact`].
pub const TAG_COMPACT: u8 = 2;
/// Tag of a [`KvCommand::LeaseGrant`].
pub const TAG_LEASE_GRANT: u8 = 3;
/// Tag of a [`KvCommand::LeaseRevoke`].
pub const TAG_LEASE_REVOKE: u8 = 4;
/// Tag of a [`KvCommand::LeaseCheckpoint`].
pub const TAG_LEASE_CHECKPOINT: u8 = 5;
/// Tag of a [`KvCommand::Alarm`].
pub const TAG_ALARM: u8 = 6;
/// Tag of a [`KvCommand::Auth`].
pub const TAG_AUTH: u8 = 7;
/// Tag of a [`KvCommand::From`].
pub const TAG_FROM: u8 = 8;
/// Leases in one checkpoint command.
pub const LEASE_CHECKPOINT_MAX: usize = 10_000;
/// Versions visited by one slice of physical compaction on the loop.
pub const COMPACT_STEP_VERSIONS: usize = 10_000;

/// A write to the store, as proposed.
#[derive(Debug, Clone, PartialEq)]
pub enum KvCommand {
    /// Put, DeleteRange or Txn (validated by the API before proposing and
    /// again by the store at apply).
    Op(RequestOp),
    /// Compact the history below `revision` on every member at the same
    /// point of the log.
    Compact { revision: i64 },
    /// Grant lease `id` (chosen by the proposer) of `ttl` seconds.
    LeaseGrant { id: i64, ttl: i64 },
    /// Revoke lease `id`: delete its keys at one revision (an expiry is a
    /// revoke proposed by the leader).
    LeaseRevoke { id: i64 },
    /// The TTLs left, by the leader's clock: (id, seconds left).
    LeaseCheckpoint { remaining: Vec<(i64, i64)> },
    /// Raise (`activate`) or disarm alarm `kind` of `member`.
    Alarm {
        activate: bool,
        member: u64,
        kind: AlarmKind,
    },
    /// Change users, roles or tokens.
    Auth(AuthChange),
    /// `command`, asked by a client as `user` ("" when it named none):
    /// applied only if `user` may, when auth is on.
    From {
        user: String,
        command: Box<KvCommand>,
    },
}

/// What a [`KvCommand`] was answered with.
#[derive(Debug, Clone, PartialEq)]
pub enum KvResponse {
    Op(ResponseOp),
    /// Compaction accepted at this store revision: reads below the
    /// compact revision fail from now on; the physical removal goes on in
    /// slices.
    Compacted {
        revision: i64,
    },
    /// The lease was granted (store revision then).
    LeaseGranted {
        revision: i64,
    },
    /// The lease was revoked, its keys deleted (store revision after).
    LeaseRevoked {
        revision: i64,
    },
    LeaseCheckpointed,
    /// The alarm raised (whether it was already active or not), or the
    /// alarm disarmed (None: it was not active).
    Alarm(Option<Alarm>),
    /// The auth change was applied; the auth revision after it.
    Auth {
        auth_revision: u64,
    },
}

/// A read of the store.
#[derive(Debug, Clone, PartialEq)]
pub enum KvQuery {
    Range(RangeRequest),
    /// Revisions and sizes (Status, metrics, waits for compaction).
    Status,
    /// The hash of the history through a revision (0: current).
    HashKv {
        revision: i64,
    },
    /// A frozen view of the store (O(1)), for watchers catching up.
    View,
    /// One lease, with its keys when asked.
    Lease {
        id: i64,
        keys: bool,
    },
    /// Every lease: (id, ttl, remaining at the last checkpoint).
    Leases,
    /// The active alarms.
    Alarms,
}

/// A lease as [`KvQuery::Lease`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    pub ttl: i64,
    /// TTL left at the last checkpoint (0: none).
    pub remaining: i64,
    pub keys: Vec<Bytes>,
}

/// The store's revisions and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStatus {
    pub revision: i64,
    pub compact_revision: i64,
    /// Physical removal is complete up to here.
    pub physically_compacted: i64,
    pub stats: StoreStats,
}

/// The answer to a [`KvQuery`].
#[derive(Debug, Clone)]
pub enum KvQueryResponse {
    Range(Result<RangeResponse, KvError>),
    Status(StoreStatus),
    /// (hash, compact revision, hash revision), and the store revision.
    HashKv(Result<(u32, i64, i64), KvError>, i64),
    View(StoreView),
    Lease(Option<LeaseInfo>),
    Leases(Vec<(i64, i64, i64)>),
    /// By member, then kind.
    Alarms(Vec<Alarm>),
}

/// Counters of the member's services kept beside the state machine, so
/// that the node's metrics endpoint exports them with its gauges.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Lease keepalives answered by this member's lessor (as leader).
    pub lease_keepalives: AtomicU64,
    /// Leases this member revoked as leader because they expired.
    pub lease_expired: AtomicU64,
}

/// What apply tells the member's lessor about leases, as it happens: a
/// lease granted or revoked on any member (through any API, or by the
/// leader's expiry) reaches the leader's deadlines at once, not at its next
/// resync. Drained by the lessor; bounded ([`LEASE_NOTES_MAX`]: past it the
/// oldest are dropped and the lessor reloads from the state).
#[derive(Debug, Default)]
pub struct LeaseNotes {
    pending: std::sync::Mutex<LeaseNoteQueue>,
}

#[derive(Debug, Default)]
struct LeaseNoteQueue {
    notes: std::collections::VecDeque<LeaseNote>,
    overflowed: bool,
}

/// Notes queued for the lessor at most.
pub const LEASE_NOTES_MAX: usize = 100_000;

/// One change of the lease table, as applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseNote {
    Granted {
        id: i64,
        ttl: i64,
        at: std::time::Instant,
    },
    Revoked {
        id: i64,
    },
}

impl LeaseNotes {
    fn push(&self, note: LeaseNote) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if q.notes.len() >= LEASE_NOTES_MAX {
            q.notes.pop_front();
            q.overflowed = true;
        }
        q.notes.push_back(note);
    }

    /// The whole table changed (a snapshot was installed): the lessor
    /// reloads it.
    fn jumped(&self) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.notes.clear();
        q.overflowed = true;
    }

    /// Takes the notes queued, and whether some were dropped.
    pub fn take(&self) -> (Vec<LeaseNote>, bool) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if q.notes.is_empty() && !q.overflowed {
            return (Vec::new(), false);
        }
        (
            q.notes.drain(..).collect(),
            std::mem::take(&mut q.overflowed),
        )
    }
}

/// The space quota when none is given (0): etcd's default, 2 GiB of
/// [`StoreStats::bytes`].
pub const QUOTA_BYTES_DEFAULT: u64 = 2 << 30;

/// A member's space quota (etcd's `--quota-backend-bytes`) and what apply
/// last told it: the store's size ([`StoreStats::bytes`]) and whether a
/// NOSPACE alarm is active. Not state: each member's own, kept across
/// snapshot installs; the API reads it before proposing a write
/// ([`Quota::check`]) without a trip through the event loop.
#[derive(Debug)]
pub struct Quota {
    limit: u64,
    bytes: AtomicU64,
    nospace: AtomicBool,
    /// A NOSPACE alarm of this member is being proposed.
    raising: AtomicBool,
}

/// What [`Quota::check`] says of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaCheck {
    /// Propose it.
    Fits,
    /// A NOSPACE alarm is active: refuse it.
    Alarmed,
    /// It would take the store over the quota: refuse it and raise NOSPACE.
    Exceeds,
}

impl Default for Quota {
    fn default() -> Self {
        Quota::new(0)
    }
}

impl Quota {
    /// A quota of `limit` bytes (0: [`QUOTA_BYTES_DEFAULT`]; `u64::MAX`:
    /// none).
    pub fn new(limit: u64) -> Self {
        Quota {
            limit: if limit == 0 {
                QUOTA_BYTES_DEFAULT
            } else {
                limit
            },
            bytes: AtomicU64::new(0),
            nospace: AtomicBool::new(false),
            raising: AtomicBool::new(false),
        }
    }

    /// The quota, bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The store's size as this member last applied it.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether a NOSPACE alarm is active, as this member last applied.
    pub fn nospace(&self) -> bool {
        self.nospace.load(Ordering::Acquire)
    }

    /// Whether a request that adds at most `cost` bytes
    /// ([`crate::store::write_cost`], [`crate::store::LEASE_COST_BYTES`])
    /// may be proposed. A request of cost 0 always may.
    pub fn check(&self, cost: u64) -> QuotaCheck {
        if cost == 0 {
            QuotaCheck::Fits
        } else if self.nospace() {
            QuotaCheck::Alarmed
        } else if self.bytes().saturating_add(cost) > self.limit {
            QuotaCheck::Exceeds
        } else {
            QuotaCheck::Fits
        }
    }

    /// Claims the proposal of this member's NOSPACE alarm: true when no
    /// other request is proposing it ([`Self::raised`] when done).
    pub fn begin_raise(&self) -> bool {
        !self.raising.swap(true, Ordering::AcqRel)
    }

    /// The proposal claimed by [`Self::begin_raise`] is done.
    pub fn raised(&self) {
        self.raising.store(false, Ordering::Release);
    }

    fn observe(&self, store: &KvStore) {
        self.bytes.store(store.approx_bytes(), Ordering::Relaxed);
        self.nospace
            .store(store.alarm_active(AlarmKind::NoSpace), Ordering::Release);
    }
}

/// The auth state as this member last applied it, for the API's checks
/// without a trip through the event loop. Not state: published by apply
/// (an `Arc` swap when it changed), kept across snapshot installs.
#[derive(Debug, Default)]
pub struct AuthView(std::sync::RwLock<Arc<AuthState>>);

impl AuthView {
    /// The state last applied (an O(1) clone).
    pub fn get(&self) -> Arc<AuthState> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn observe(&self, store: &KvStore) {
        if !Arc::ptr_eq(&self.get(), store.auth()) {
            *self.0.write().unwrap_or_else(|e| e.into_inner()) = store.auth().clone();
        }
    }
}

/// The KV store run by the runtime, and the feed of its watchers.
#[derive(Debug)]
pub struct KvMachine {
    store: KvStore,
    /// Not state: survives [`StateMachine::install`], never snapshotted.
    hub: Hub,
    /// Not state, as `hub`.
    counters: Arc<ServiceCounters>,
    /// Not state, as `hub`.
    lease_notes: Arc<LeaseNotes>,
    /// Not state, as `hub`.
    quota: Arc<Quota>,
    /// Not state, as `hub`.
    auth_view: Arc<AuthView>,
}

impl Default for KvMachine {
    fn default() -> Self {
        let store = KvStore::new();
        KvMachine {
            hub: Hub::at_revision(store.revision()),
            store,
            counters: Arc::default(),
            lease_notes: Arc::default(),
            quota: Arc::default(),
            auth_view: Arc::default(),
        }
    }
}

impl KvMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A machine whose member has a space quota of `limit` bytes (0:
    /// [`QUOTA_BYTES_DEFAULT`]).
    pub fn with_quota(limit: u64) -> Self {
        KvMachine {
            quota: Arc::new(Quota::new(limit)),
            ..Self::default()
        }
    }

    /// The member's space quota, kept up to date by apply.
    pub fn quota(&self) -> &Arc<Quota> {
        &self.quota
    }

    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// The auth state as last applied, for the API.
    pub fn auth_view(&self) -> &Arc<AuthView> {
        &self.auth_view
    }

    /// What apply tells the lessor.
    pub fn lease_notes(&self) -> &Arc<LeaseNotes> {
        &self.lease_notes
    }

    /// The counters its services update.
    pub fn counters(&self) -> &Arc<ServiceCounters> {
        &self.counters
    }

    /// The watch hub this machine feeds (start its dispatcher to serve
    /// watchers: [`Hub::start`]).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn status(&self) -> StoreStatus {
        StoreStatus {
            revision: self.store.revision(),
            compact_revision: self.store.compact_revision(),
            physically_compacted: self.store.physically_compacted(),
            stats: self.store.stats(),
        }
    }
}

/// Splits a command's bytes into its tag and body, refusing what this
/// build cannot apply.
pub fn decode_command(mut bytes: Bytes) -> Result<KvCommand, String> {
    let Some(&tag) = bytes.first() else {
        return Err("empty KV command".into());
    };
    bytes.advance(1);
    match tag {
        TAG_OP => RequestOp::decode(bytes)
            .map(KvCommand::Op)
            .map_err(|e| format!("KV op is not a valid RequestOp: {e}")),
        TAG_COMPACT => {
            let raw: [u8; 8] = bytes[..]
                .try_into()
                .map_err(|_| format!("compact command of {} bytes, need 8", bytes.len()))?;
            Ok(KvCommand::Compact {
                revision: i64::from_le_bytes(raw),
            })
        }
        TAG_LEASE_GRANT | TAG_LEASE_REVOKE => {
            let want = if tag == TAG_LEASE_GRANT { 16 } else { 8 };
            if bytes.len() != want {
                return Err(format!(
                    "lease command of {} bytes, need {want}",
                    bytes.len()
                ));
            }
            let id = bytes.get_i64_le();
            Ok(if tag == TAG_LEASE_GRANT {
                KvCommand::LeaseGrant {
                    id,
                    ttl: bytes.get_i64_le(),
                }
            } else {
                KvCommand::LeaseRevoke { id }
            })
        }
        TAG_LEASE_CHECKPOINT => {
            if bytes.len() < 4 {
                return Err("lease checkpoint without a count".into());
            }
            let n = bytes.get_u32_le() as usize;
            if n > LEASE_CHECKPOINT_MAX || bytes.len() != n * 16 {
                return Err(format!(
                    "lease checkpoint of {n} leases in {} bytes",
                    bytes.len()
                ));
            }
            let remaining = (0..n)
                .map(|_| (bytes.get_i64_le(), bytes.get_i64_le()))
                .collect();
            Ok(KvCommand::LeaseCheckpoint { remaining })
        }
        TAG_ALARM => {
            if bytes.len() != 10 {
                return Err(format!("alarm command of {} bytes, need 10", bytes.len()));
            }
            let activate = match bytes.get_u8() {
                1 => true,
                2 => false,
                other => return Err(format!("alarm action {other} is not known")),
            };
            let member = bytes.get_u64_le();
            let kind = bytes.get_u8();
            let kind = AlarmKind::from_u8(kind)
                .ok_or_else(|| format!("alarm kind {kind} is not known"))?;
            Ok(KvCommand::Alarm {
                activate,
                member,
                kind,
            })
        }
        TAG_AUTH => decode_auth(bytes).map(KvCommand::Auth),
        TAG_FROM => {
            if bytes.len() < 2 {
                return Err("client command without its user".into());
            }
            let len = bytes.get_u16_le() as usize;
            if bytes.len() < len {
                return Err("client command shorter than its user".into());
            }
            let user = String::from_utf8(bytes.split_to(len).to_vec())
                .map_err(|_| "client command's user is not UTF-8".to_string())?;
            if bytes.first() == Some(&TAG_FROM) {
                return Err("client command inside a client command".into());
            }
            let command = Box::new(decode_command(bytes)?);
            Ok(KvCommand::From { user, command })
        }
        other => Err(format!("KV command tag {other} is not known")),
    }
}

// Sub-tags of an auth change.
const AUTH_ENABLE: u8 = 1;
const AUTH_DISABLE: u8 = 2;
const AUTH_USER_ADD: u8 = 3;
const AUTH_USER_DELETE: u8 = 4;
const AUTH_USER_PASSWORD: u8 = 5;
const AUTH_USER_GRANT: u8 = 6;
const AUTH_USER_REVOKE: u8 = 7;
const AUTH_ROLE_ADD: u8 = 8;
const AUTH_ROLE_DELETE: u8 = 9;
const AUTH_ROLE_GRANT: u8 = 10;
const AUTH_ROLE_REVOKE: u8 = 11;
const AUTH_TOKEN: u8 = 12;

fn put_field(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

fn encode_auth(change: &AuthChange, out: &mut BytesMut) {
    out.put_u8(TAG_AUTH);
    match change {
        AuthChange::Enable => out.put_u8(AUTH_ENABLE),
        AuthChange::Disable => out.put_u8(AUTH_DISABLE),
        AuthChange::UserAdd { name, password } => {
            out.put_u8(AUTH_USER_ADD);
            put_field(out, name.as_bytes());
            match password {
                Some(p) => {
                    out.put_u8(1);
                    put_field(out, p.as_bytes());
                }
                None => out.put_u8(0),
            }
        }
        AuthChange::UserDelete { name } => {
            out.put_u8(AUTH_USER_DELETE);
            put_field(out, name.as_bytes());
        }
        AuthChange::UserChangePassword { name, password } => {
            out.put_u8(AUTH_USER_PASSWORD);
            put_field(out, name.as_bytes());
            put_field(out, password.as_bytes());
        }
        AuthChange::UserGrantRole { user, role } | AuthChange::UserRevokeRole { user, role } => {
            out.put_u8(if matches!(change, AuthChange::UserGrantRole { .. }) {
                AUTH_USER_GRANT
            } else {
                AUTH_USER_REVOKE
            });
            put_field(out, user.as_bytes());
            put_field(out, role.as_bytes());
        }
        AuthChange::RoleAdd { name } => {
            out.put_u8(AUTH_ROLE_ADD);
            put_field(out, name.as_bytes());
        }
        AuthChange::RoleDelete { name } => {
            out.put_u8(AUTH_ROLE_DELETE);
            put_field(out, name.as_bytes());
        }
        AuthChange::RoleGrantPermission { role, perm } => {
            out.put_u8(AUTH_ROLE_GRANT);
            put_field(out, role.as_bytes());
            out.put_u8(perm.kind as u8);
            put_field(out, &perm.key);
            put_field(out, &perm.range_end);
        }
        AuthChange::RoleRevokePermission {
            role,
            key,
            range_end,
        } => {
            out.put_u8(AUTH_ROLE_REVOKE);
            put_field(out, role.as_bytes());
            put_field(out, key);
            put_field(out, range_end);
        }
        AuthChange::Token {
            user,
            token,
            issued_ms,
            expires_ms,
            checked_revision,
        } => {
            out.put_u8(AUTH_TOKEN);
            put_field(out, user.as_bytes());
            put_field(out, token.as_bytes());
            out.put_u64_le(*issued_ms);
            out.put_u64_le(*expires_ms);
            out.put_u64_le(*checked_revision);
        }
    }
}

/// Reads the body of an auth change (after its tag). Bounds: a string
/// can be no longer than the command.
fn decode_auth(mut b: Bytes) -> Result<AuthChange, String> {
    fn field(b: &mut Bytes) -> Result<Bytes, String> {
        if b.len() < 4 {
            return Err("auth change truncated".into());
        }
        let n = b.get_u32_le() as usize;
        if b.len() < n {
            return Err("auth change field past its end".into());
        }
        Ok(b.split_to(n))
    }
    fn text(b: &mut Bytes) -> Result<String, String> {
        String::from_utf8(field(b)?.to_vec()).map_err(|_| "auth name is not UTF-8".to_string())
    }
    fn u64_of(b: &mut Bytes) -> Result<u64, String> {
        if b.len() < 8 {
            return Err("auth change truncated".into());
        }
        Ok(b.get_u64_le())
    }
    fn byte(b: &mut Bytes) -> Result<u8, String> {
        if b.is_empty() {
            return Err("auth change truncated".into());
        }
        Ok(b.get_u8())
    }
    let change = match byte(&mut b)? {
        AUTH_ENABLE => AuthChange::Enable,
        AUTH_DISABLE => AuthChange::Disable,
        AUTH_USER_ADD => {
            let name = text(&mut b)?;
            let password = match byte(&mut b)? {
                0 => None,
                1 => Some(text(&mut b)?),
                _ => return Err("password flag not 0 or 1".into()),
            };
            AuthChange::UserAdd { name, password }
        }
        AUTH_USER_DELETE => AuthChange::UserDelete {
            name: text(&mut b)?,
        },
        AUTH_USER_PASSWORD => AuthChange::UserChangePassword {
            name: text(&mut b)?,
            password: text(&mut b)?,
        },
        t @ (AUTH_USER_GRANT | AUTH_USER_REVOKE) => {
            let user = text(&mut b)?;
            let role = text(&mut b)?;
            if t == AUTH_USER_GRANT {
                AuthChange::UserGrantRole { user, role }
            } else {
                AuthChange::UserRevokeRole { user, role }
            }
        }
        AUTH_ROLE_ADD => AuthChange::RoleAdd {
            name: text(&mut b)?,
        },
        AUTH_ROLE_DELETE => AuthChange::RoleDelete {
            name: text(&mut b)?,
        },
        AUTH_ROLE_GRANT => {
            let role = text(&mut b)?;
            let kind = byte(&mut b)?;
            let kind = PermKind::from_i32(kind as i32)
                .ok_or_else(|| format!("permission kind {kind} is not known"))?;
            let key = field(&mut b)?;
            let range_end = field(&mut b)?;
            AuthChange::RoleGrantPermission {
                role,
                perm: Perm {
                    key,
                    range_end,
                    kind,
                },
            }
        }
        AUTH_ROLE_REVOKE => AuthChange::RoleRevokePermission {
            role: text(&mut b)?,
            key: field(&mut b)?,
            range_end: field(&mut b)?,
        },
        AUTH_TOKEN => AuthChange::Token {
            user: text(&mut b)?,
            token: text(&mut b)?,
            issued_ms: u64_of(&mut b)?,
            expires_ms: u64_of(&mut b)?,
            checked_revision: u64_of(&mut b)?,
        },
        other => return Err(format!("auth change {other} is not known")),
    };
    if !b.is_empty() {
        return Err("bytes after an auth change".into());
    }
    Ok(change)
}

/// The snapshot of a [`KvMachine`]: a frozen store.
pub struct KvSnapshot(StoreView);

impl SnapshotView for KvSnapshot {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        self.0.write_snapshot(&mut &mut *w).map(|_| ())
    }
}

impl StateMachine for KvMachine {
    type Command = KvCommand;
    type Response = Result<KvResponse, KvError>;
    type Query = KvQuery;
    type QueryResponse = KvQueryResponse;
    type Snapshot = KvSnapshot;

    fn encode_command(cmd: &KvCommand, out: &mut BytesMut) {
        match cmd {
            KvCommand::Op(op) => {
                out.reserve(1 + op.encoded_len());
                out.put_u8(TAG_OP);
                op.encode(out).expect("BytesMut grows on demand");
            }
            KvCommand::Compact { revision } => {
                out.put_u8(TAG_COMPACT);
                out.put_i64_le(*revision);
            }
            KvCommand::LeaseGrant { id, ttl } => {
                out.put_u8(TAG_LEASE_GRANT);
                out.put_i64_le(*id);
                out.put_i64_le(*ttl);
            }
            KvCommand::LeaseRevoke { id } => {
                out.put_u8(TAG_LEASE_REVOKE);
                out.put_i64_le(*id);
            }
            KvCommand::LeaseCheckpoint { remaining } => {
                assert!(
                    remaining.len() <= LEASE_CHECKPOINT_MAX,
                    "a checkpoint holds at most LEASE_CHECKPOINT_MAX leases"
                );
                out.put_u8(TAG_LEASE_CHECKPOINT);
                out.put_u32_le(remaining.len() as u32);
                for (id, left) in remaining {
                    out.put_i64_le(*id);
                    out.put_i64_le(*left);
                }
            }
            KvCommand::Alarm {
                activate,
                member,
                kind,
            } => {
                out.put_u8(TAG_ALARM);
                out.put_u8(if *activate { 1 } else { 2 });
                out.put_u64_le(*member);
                out.put_u8(kind.as_u8());
            }
            KvCommand::Auth(change) => encode_auth(change, out),
            KvCommand::From { user, command } => {
                assert!(
                    user.len() <= u16::MAX as usize,
                    "a user name is at most NAME_BYTES_MAX bytes"
                );
                assert!(
                    !matches!(**command, KvCommand::From { .. }),
                    "one client per command"
                );
                out.put_u8(TAG_FROM);
                out.put_u16_le(user.len() as u16);
                out.put_slice(user.as_bytes());
                Self::encode_command(command, out);
            }
        }
    }

    fn check_command(command: &Bytes) -> Result<(), String> {
        decode_command(command.clone()).map(|_| ())
    }

    fn apply(
        &mut self,
        batch: &[Committed],
        responses: &mut Vec<Self::Response>,
    ) -> Result<(), ApplyError> {
        let collect = self.hub.collecting();
        self.store.collect_events(collect);
        let from = self.store.revision() + 1;
        let result = self.apply_entries(batch, responses);
        let events = collect.then(|| self.store.take_events());
        self.hub.applied(from, self.store.revision(), events);
        self.quota.observe(&self.store);
        self.auth_view.observe(&self.store);
        result
    }

    fn query(&self, query: &KvQuery) -> KvQueryResponse {
        match query {
            KvQuery::Range(req) => KvQueryResponse::Range(self.store.range(req)),
            KvQuery::Status => KvQueryResponse::Status(self.status()),
            KvQuery::HashKv { revision } => {
                KvQueryResponse::HashKv(self.store.hash_kv(*revision), self.store.revision())
            }
            KvQuery::View => KvQueryResponse::View(self.store.freeze()),
            KvQuery::Lease { id, keys } => {
                KvQueryResponse::Lease(self.store.lease(*id).map(|l| LeaseInfo {
                    id: *id,
                    ttl: l.ttl,
                    remaining: l.remaining,
                    keys: if *keys {
                        l.keys().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }))
            }
            KvQuery::Leases => KvQueryResponse::Leases(
                self.store
                    .leases()
                    .map(|(id, l)| (id, l.ttl, l.remaining))
                    .collect(),
            ),
            KvQuery::Alarms => KvQueryResponse::Alarms(self.store.alarms().collect()),
        }
    }

    fn snapshot(&self) -> KvSnapshot {
        KvSnapshot(self.store.freeze())
    }

    fn restore(r: &mut dyn Read) -> Result<Self, RestoreError> {
        let store = KvStore::read_snapshot(&mut &mut *r)
            .map_err(|e| RestoreError::Corrupt(e.to_string()))?;
        Ok(KvMachine {
            store,
            ..KvMachine::default()
        })
    }

    /// Keeps this machine's watch hub; its watchers catch up from the
    /// restored history (or learn that what they need was compacted).
    fn install(&mut self, restored: Self) -> Self {
        let from = self.store.revision() + 1;
        let old = std::mem::replace(&mut self.store, restored.store);
        self.hub.jumped(from, self.store.revision());
        self.lease_notes.jumped();
        self.quota.observe(&self.store);
        self.auth_view.observe(&self.store);
        KvMachine {
            store: old,
            ..KvMachine::default()
        }
    }

    fn background_step(&mut self) -> bool {
        let more = self.store.compact_step(COMPACT_STEP_VERSIONS);
        // Physical compaction is what frees space.
        self.quota.observe(&self.store);
        more
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        let s = self.status();
        let mut g = vec![
            (
                "kv_revision",
                "KV store revision.",
                s.revision.max(0) as u64,
            ),
            (
                "kv_compact_revision",
                "KV compact revision: reads below it are refused.",
                s.compact_revision.max(0) as u64,
            ),
            ("kv_keys", "Live keys.", s.stats.keys),
            (
                "kv_leases",
                "Leases granted and not revoked.",
                self.store.lease_count() as u64,
            ),
            (
                "kv_versions",
                "Key versions held (history and tombstones included).",
                s.stats.versions,
            ),
            (
                "kv_bytes",
                "Approximate memory held by the store, bytes.",
                s.stats.bytes,
            ),
            (
                "kv_quota_bytes",
                "Space quota of the store (--quota-backend-bytes): past it, NOSPACE is raised.",
                self.quota.limit(),
            ),
            (
                "kv_alarms",
                "Active alarms (any member, any kind).",
                self.store.alarms().count() as u64,
            ),
        ];
        g.extend(self.hub.gauges());
        let c = &self.counters;
        g.push((
            "lease_keepalives_total",
            "Lease keepalives answered by this member as leader.",
            c.lease_keepalives.load(Ordering::Relaxed),
        ));
        g.push((
            "lease_expired_total",
            "Leases this member revoked as leader because they expired.",
            c.lease_expired.load(Ordering::Relaxed),
        ));
        g
    }
}

impl KvMachine {
    fn apply_entries(
        &mut self,
        batch: &[Committed],
        responses: &mut Vec<Result<KvResponse, KvError>>,
    ) -> Result<(), ApplyError> {
        for entry in batch {
            let Some(bytes) = &entry.command else {
                self.store.mark_applied(entry.index);
                continue;
            };
            let cmd = decode_command(bytes.clone()).map_err(|reason| ApplyError {
                index: entry.index,
                reason,
            })?;
            let response = self.apply_one(entry.index, cmd);
            responses.push(response);
        }
        Ok(())
    }

    /// Applies one decoded command of the log entry at `index`.
    fn apply_one(&mut self, index: u64, cmd: KvCommand) -> Result<KvResponse, KvError> {
        match cmd {
            KvCommand::Op(op) => self.store.apply(index, &op).map(KvResponse::Op),
            KvCommand::Compact { revision } => {
                self.store
                    .compact(index, revision)
                    .map(|()| KvResponse::Compacted {
                        revision: self.store.revision(),
                    })
            }
            KvCommand::LeaseGrant { id, ttl } => {
                let r = self.store.lease_grant(index, id, ttl);
                if r.is_ok() {
                    let at = std::time::Instant::now();
                    self.lease_notes.push(LeaseNote::Granted { id, ttl, at });
                }
                r.map(|()| KvResponse::LeaseGranted {
                    revision: self.store.revision(),
                })
            }
            KvCommand::LeaseRevoke { id } => {
                let r = self.store.lease_revoke(index, id);
                if r.is_ok() {
                    self.lease_notes.push(LeaseNote::Revoked { id });
                }
                r.map(|revision| KvResponse::LeaseRevoked { revision })
            }
            KvCommand::LeaseCheckpoint { remaining } => {
                self.store.lease_checkpoint(index, &remaining);
                Ok(KvResponse::LeaseCheckpointed)
            }
            KvCommand::Alarm {
                activate,
                member,
                kind,
            } => {
                let was = self.store.alarms().any(|a| a == Alarm { member, kind });
                let alarm = if activate {
                    Some(self.store.alarm_activate(index, member, kind))
                } else {
                    self.store.alarm_deactivate(index, member, kind)
                };
                if was != activate {
                    let what = if activate { "raised" } else { "disarmed" };
                    tracing::warn!(member, alarm = kind.name(), "alarm {what}");
                }
                Ok(KvResponse::Alarm(alarm))
            }
            KvCommand::Auth(change) => {
                self.store
                    .auth_apply(index, &change)
                    .map(|()| KvResponse::Auth {
                        auth_revision: self.store.auth().revision(),
                    })
            }
            KvCommand::From { user, command } => {
                if let Err(e) = self.check_client(&user, &command) {
                    self.store.mark_applied(index);
                    return Err(e);
                }
                self.apply_one(index, *command)
            }
        }
    }

    /// Whether `user` may have `command` applied (always, with auth off).
    fn check_client(&self, user: &str, command: &KvCommand) -> Result<(), KvError> {
        let auth = self.store.auth();
        if !auth.enabled() {
            return Ok(());
        }
        let lease_keys = |id: i64| -> Vec<Bytes> {
            self.store
                .lease(id)
                .map(|l| l.keys().cloned().collect())
                .unwrap_or_default()
        };
        match command {
            KvCommand::Op(op) => auth.check_op(user, op, &lease_keys),
            KvCommand::Compact { .. } | KvCommand::LeaseGrant { .. } => auth.check_user(user),
            KvCommand::LeaseRevoke { id } => {
                auth.check_lease(user, &lease_keys(*id), PermKind::Write)
            }
            KvCommand::LeaseCheckpoint { .. } | KvCommand::Alarm { .. } => auth.check_admin(user),
            KvCommand::Auth(change) if change.needs_admin() => auth.check_admin(user),
            KvCommand::Auth(_) => Ok(()),
            KvCommand::From { .. } => Err(KvError::InvalidAuthMgmt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::request_op::Request;
    use crate::pb::etcdserverpb::PutRequest;

    fn put(k: &str, v: &str) -> KvCommand {
        KvCommand::Op(RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::copy_from_slice(v.as_bytes()),
                ..Default::default()
            })),
        })
    }

    fn encoded(cmd: &KvCommand) -> Bytes {
        let mut b = BytesMut::new();
        KvMachine::encode_command(cmd, &mut b);
        b.freeze()
    }

    #[test]
    fn commands_round_trip_and_bad_ones_are_refused() {
        for cmd in [put("a", "1"), KvCommand::Compact { revision: 7 }] {
            assert_eq!(decode_command(encoded(&cmd)).unwrap(), cmd);
            assert!(KvMachine::check_command(&encoded(&cmd)).is_ok());
        }
        for bad in [
            &b""[..],
            &[9, 1, 2],
            &[TAG_COMPACT, 1, 2],
            &[TAG_OP, 0x12, 50, 1],
        ] {
            let bad = Bytes::copy_from_slice(bad);
            assert!(KvMachine::check_command(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn applies_answers_and_snapshots_round_trip() {
        let mut m = KvMachine::new();
        let batch: Vec<Committed> = [
            None,
            Some(encoded(&put("a", "1"))),
            Some(encoded(&put("a", "2"))),
            Some(encoded(&KvCommand::Compact { revision: 3 })),
            Some(encoded(&KvCommand::Compact { revision: 99 })),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, command)| Committed {
            index: i as u64 + 1,
            term: 1,
            command,
        })
        .collect();
        let mut out = Vec::new();
        m.apply(&batch, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert!(matches!(out[0], Ok(KvResponse::Op(_))));
        assert_eq!(out[2], Ok(KvResponse::Compacted { revision: 3 }));
        assert_eq!(out[3], Err(KvError::FutureRevision));
        let mut bytes = Vec::new();
        m.snapshot().write_to(&mut bytes).unwrap();
        let back = KvMachine::restore(&mut &bytes[..]).unwrap();
        assert_eq!(back.store(), m.store());
        let bad = KvMachine::restore(&mut &bytes[..bytes.len() - 1]);
        assert!(matches!(bad, Err(RestoreError::Corrupt(_))));
    }

    fn committed(cmds: &[KvCommand], first: u64) -> Vec<Committed> {
        cmds.iter()
            .enumerate()
            .map(|(i, c)| Committed {
                index: first + i as u64,
                term: 1,
                command: Some(encoded(c)),
            })
            .collect()
    }

    fn from(user: &str, command: KvCommand) -> KvCommand {
        KvCommand::From {
            user: user.into(),
            command: Box::new(command),
        }
    }

    #[test]
    fn auth_commands_round_trip_and_are_checked_at_apply() {
        let perm = Perm {
            key: Bytes::from_static(b"a/"),
            range_end: Bytes::from_static(b"a0"),
            kind: PermKind::ReadWrite,
        };
        let setup = [
            KvCommand::Auth(AuthChange::UserAdd {
                name: "root".into(),
                password: Some("$2b$04$hash".into()),
            }),
            KvCommand::Auth(AuthChange::UserGrantRole {
                user: "root".into(),
                role: "root".into(),
            }),
            KvCommand::Auth(AuthChange::UserAdd {
                name: "alice".into(),
                password: None,
            }),
            KvCommand::Auth(AuthChange::RoleAdd { name: "r".into() }),
            KvCommand::Auth(AuthChange::RoleGrantPermission {
                role: "r".into(),
                perm,
            }),
            KvCommand::Auth(AuthChange::UserGrantRole {
                user: "alice".into(),
                role: "r".into(),
            }),
            from("", KvCommand::Auth(AuthChange::Enable)),
        ];
        for cmd in &setup {
            assert_eq!(&decode_command(encoded(cmd)).unwrap(), cmd);
        }
        let token = KvCommand::Auth(AuthChange::Token {
            user: "alice".into(),
            token: "t".into(),
            issued_ms: 1,
            expires_ms: 2,
            checked_revision: 3,
        });
        assert_eq!(decode_command(encoded(&token)).unwrap(), token);
        let mut m = KvMachine::new();
        let mut out = Vec::new();
        m.apply(&committed(&setup, 1), &mut out).unwrap();
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        assert!(m.auth_view().get().enabled(), "published to the API");
        let checked = [
            from("alice", put("a/1", "x")),
            from("alice", put("b", "x")),
            from("", put("a/1", "x")),
            from("alice", KvCommand::Auth(AuthChange::Disable)),
            from("root", put("b", "x")),
            // The member's own commands are not checked.
            put("c", "x"),
        ];
        out.clear();
        m.apply(&committed(&checked, 100), &mut out).unwrap();
        assert!(matches!(out[0], Ok(KvResponse::Op(_))));
        assert_eq!(out[1], Err(KvError::PermissionDenied));
        assert_eq!(out[2], Err(KvError::UserEmpty));
        assert_eq!(out[3], Err(KvError::PermissionDenied));
        assert!(matches!(out[4], Ok(KvResponse::Op(_))));
        assert!(matches!(out[5], Ok(KvResponse::Op(_))));
        assert_eq!(m.store().applied_index(), 105);
        // Auth state travels in snapshots.
        let mut bytes = Vec::new();
        m.snapshot().write_to(&mut bytes).unwrap();
        let back = KvMachine::restore(&mut &bytes[..]).unwrap();
        assert_eq!(back.store().auth(), m.store().auth());
        // Nested or cut client commands are refused.
        let mut nested = BytesMut::new();
        nested.put_u8(TAG_FROM);
        nested.put_u16_le(0);
        nested.extend_from_slice(&encoded(&from("x", put("a", "b"))));
        assert!(decode_command(nested.freeze()).is_err());
        let whole = encoded(&from("alice", KvCommand::Auth(AuthChange::Disable)));
        for cut in 0..whole.len() {
            assert!(decode_command(whole.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        /// Whatever bytes a log entry holds, decoding answers without
        /// panicking.
        #[test]
        fn decoding_any_bytes_never_panics(
            tag in 0u8..10,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut b = vec![tag];
            b.extend_from_slice(&body);
            let _ = decode_command(Bytes::from(b));
        }
    }

    #[test]
    fn an_undecodable_entry_is_fatal() {
        let mut m = KvMachine::new();
        let batch = [Committed {
            index: 1,
            term: 1,
            command: Some(Bytes::from_static(&[77])),
        }];
        let err = m.apply(&batch, &mut Vec::new()).unwrap_err();
        assert_eq!(err.index, 1);
    }
}
