//! Authentication state (etcd's auth store, `server/auth`, written for
//! Skiff): whether auth is on, users (bcrypt password hashes, roles), roles
//! (key-range permissions), the simple tokens issued, and the auth
//! revision. Replicated state: changed only through the log
//! ([`AuthState::apply`]), kept in snapshots, deterministic (no clock, no
//! randomness: a token and its expiry are chosen by the proposer and travel
//! in the command). Checked on every request twice: by the API before
//! proposing (fast refusal, reads) and again at apply (writes), so a
//! permission revoked between the two is honoured.
//!
//! The rules, as etcd's:
//! * `root` is the administrator: a user with the `root` role may do
//!   anything; user and role management, enabling and disabling auth and
//!   maintenance need it. Auth can be enabled only when the `root` user
//!   exists and has the `root` role; while it is on, the `root` user cannot
//!   be deleted or lose the role, and the `root` role cannot be deleted.
//! * A permission is READ, WRITE or READWRITE on one key (`range_end`
//!   empty), on `[key, range_end)`, or on every key from `key` on
//!   (`range_end` = `"\0"`). A request on a range is allowed when the union
//!   of the user's roles' permissions of its kind covers the whole range.
//! * Range needs READ; Put WRITE on its key (and READ with `prev_kv`);
//!   DeleteRange WRITE on its range (and READ with `prev_kv`); Txn READ on
//!   each compared key and what each op of both branches needs; a Put that
//!   attaches a key to a lease needs WRITE on the keys already attached;
//!   LeaseRevoke WRITE on every key attached.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::KvError;
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::RequestOp;

/// The administrator's user and role name.
pub const ROOT: &str = "root";
/// Longest user or role name, bytes.
pub const NAME_BYTES_MAX: usize = 1024;
/// Longest password hash stored, bytes (a bcrypt hash is 60).
pub const HASH_BYTES_MAX: usize = 256;
/// Users held at most; a UserAdd past it is refused.
pub const USERS_MAX: usize = 100_000;
/// Roles held at most, as [`USERS_MAX`].
pub const ROLES_MAX: usize = 100_000;
/// Roles one user holds at most.
pub const ROLES_PER_USER_MAX: usize = 1_000;
/// Permissions one role holds at most.
pub const PERMS_PER_ROLE_MAX: usize = 10_000;
/// Tokens held at most: past it the one that expires first is dropped.
pub const TOKENS_MAX: usize = 100_000;
/// Longest token, bytes.
pub const TOKEN_BYTES_MAX: usize = 128;
/// Largest encoded auth state a snapshot may carry.
pub const AUTH_SECTION_BYTES_MAX: usize = 256 << 20;

/// A permission's kind; the numbers are etcd's `authpb.Permission.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PermKind {
    Read = 0,
    Write = 1,
    ReadWrite = 2,
}

impl PermKind {
    pub fn from_i32(n: i32) -> Option<PermKind> {
        match n {
            0 => Some(PermKind::Read),
            1 => Some(PermKind::Write),
            2 => Some(PermKind::ReadWrite),
            _ => None,
        }
    }

    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// Whether a permission of this kind grants `want` (Read or Write).
    fn grants(self, want: PermKind) -> bool {
        self == PermKind::ReadWrite || self == want
    }
}

/// One permission of a role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Perm {
    pub key: Bytes,
    /// Empty: `key` alone; `"\0"`: every key from `key` on.
    pub range_end: Bytes,
    pub kind: PermKind,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// The bcrypt hash of its password; None: a user without a password
    /// (authenticates only by a client certificate).
    pub password: Option<String>,
    pub roles: BTreeSet<String>,
}

/// A role: its permissions, by (key, range_end), unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Role {
    pub perms: Vec<Perm>,
}

/// A simple token: whose, and until when (Unix milliseconds, by the
/// issuing member's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub user: String,
    pub expires_ms: u64,
}

/// A change of the auth state, as the log carries it. Passwords arrive
/// hashed: the proposer hashes, apply only stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChange {
    Enable,
    Disable,
    UserAdd {
        name: String,
        /// None: a user without a password.
        password: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        role: String,
        perm: Perm,
    },
    RoleRevokePermission {
        role: String,
        key: Bytes,
        range_end: Bytes,
    },
    /// Issue `token` to `user` (its password was checked by the proposer
    /// against auth revision `checked_revision`), valid until
    /// `expires_ms`; tokens that expired by `issued_ms` are dropped.
    Token {
        user: String,
        token: String,
        issued_ms: u64,
        expires_ms: u64,
        checked_revision: u64,
    },
}

impl AuthChange {
    /// Whether only the root role may make it ([`AuthChange::Token`] is
    /// anyone's who knows the password).
    pub fn needs_admin(&self) -> bool {
        !matches!(self, AuthChange::Token { .. })
    }
}

/// The replicated auth state.
#[derive(Debug, Clone)]
pub struct AuthState {
    enabled: bool,
    /// Grows by one with every change but a token issued (etcd's auth
    /// revision); starts at 1.
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    tokens: BTreeMap<String, Token>,
    /// Each user's grants merged into disjoint spans, for the checks:
    /// derived from `users` and `roles` after every change, never
    /// serialized or compared.
    merged: std::collections::HashMap<String, std::sync::Arc<MergedPerms>>,
}

impl PartialEq for AuthState {
    fn eq(&self, other: &Self) -> bool {
        self.enabled == other.enabled
            && self.revision == other.revision
            && self.users == other.users
            && self.roles == other.roles
            && self.tokens == other.tokens
    }
}

impl Eq for AuthState {}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            tokens: BTreeMap::new(),
            merged: std::collections::HashMap::new(),
        }
    }
}

/// `[start, end)`, `end` None: unbounded.
type Span = (Bytes, Option<Bytes>);

/// The span a permission's (key, range_end) grants: one key (`[key,
/// key\0)`), a range, or every key from `key` on (`"\0"`).
fn span_of(key: &Bytes, range_end: &Bytes) -> Span {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.clone(), Some(Bytes::from(end)))
    } else if range_end.as_ref() == [0] {
        (key.clone(), None)
    } else {
        (key.clone(), Some(range_end.clone()))
    }
}

/// `spans` sorted by start and merged where they overlap or touch:
/// disjoint, ascending, gaps between them.
fn merge_spans(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        if let Some((_, last_end)) = out.last_mut() {
            match last_end {
                None => continue,
                Some(e) if start <= *e => {
                    if end.as_ref().is_none_or(|end| end > e) {
                        *last_end = end;
                    }
                    continue;
                }
                Some(_) => {}
            }
        }
        out.push((start, end));
    }
    out
}

/// One user's permissions, merged (derived from users and roles).
#[derive(Debug, Default)]
struct MergedPerms {
    root: bool,
    read: Vec<Span>,
    write: Vec<Span>,
}

impl AuthState {
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn users(&self) -> impl Iterator<Item = (&String, &User)> {
        self.users.iter()
    }

    pub fn roles(&self) -> impl Iterator<Item = (&String, &Role)> {
        self.roles.iter()
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The user `token` names, if it is held and unexpired at `now_ms`.
    pub fn token_user(&self, token: &str, now_ms: u64) -> Option<&str> {
        self.tokens
            .get(token)
            .filter(|t| t.expires_ms > now_ms)
            .map(|t| t.user.as_str())
    }

    fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// Whether `user` may administer (root role). Ok when auth is off.
    pub fn check_admin(&self, user: &str) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(KvError::UserEmpty);
        }
        match self.users.get(user) {
            None => Err(KvError::UserNotFound),
            Some(u) if u.roles.contains(ROOT) => Ok(()),
            Some(_) => Err(KvError::PermissionDenied),
        }
    }

    /// Whether `user` is someone (any user, when auth is on).
    pub fn check_user(&self, user: &str) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(KvError::UserEmpty);
        }
        if self.users.contains_key(user) {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }

    /// Whether `user` may `want` (Read or Write) on `key` .. `range_end`
    /// (a request's encoding: empty, a range end, or `"\0"`): the union of
    /// the user's grants of that kind must cover the whole range. O(log p)
    /// on the user's merged spans, no allocation.
    pub fn check_range(
        &self,
        user: &str,
        key: &[u8],
        range_end: &[u8],
        want: PermKind,
    ) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(KvError::UserEmpty);
        }
        let Some(perms) = self.merged.get(user) else {
            return Err(KvError::PermissionDenied);
        };
        if perms.root {
            return Ok(());
        }
        let spans = if want == PermKind::Read {
            &perms.read
        } else {
            &perms.write
        };
        // The last span starting at or before `key`.
        let i = spans.partition_point(|(start, _)| start.as_ref() <= key);
        let covered = i > 0 && {
            let (_, end) = &spans[i - 1];
            match end {
                None => true,
                // One key: the span must reach past it.
                Some(end) if range_end.is_empty() => end.as_ref() > key,
                // Every key from `key` on: only an unbounded span covers.
                Some(_) if range_end == [0] => false,
                Some(end) => end.as_ref() >= range_end,
            }
        };
        if covered {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }

    /// Rebuilds [`Self::merged`] from the users and roles.
    fn merge(&mut self) {
        self.merged = self
            .users
            .iter()
            .map(|(name, u)| {
                let mut read = Vec::new();
                let mut write = Vec::new();
                for role in u.roles.iter().filter_map(|r| self.roles.get(r)) {
                    for p in &role.perms {
                        let (start, end) = span_of(&p.key, &p.range_end);
                        if p.kind.grants(PermKind::Read) {
                            read.push((start.clone(), end.clone()));
                        }
                        if p.kind.grants(PermKind::Write) {
                            write.push((start, end));
                        }
                    }
                }
                let perms = MergedPerms {
                    root: u.roles.contains(ROOT),
                    read: merge_spans(read),
                    write: merge_spans(write),
                };
                (name.clone(), std::sync::Arc::new(perms))
            })
            .collect();
    }

    /// Whether `user` may make request `op`; `lease_keys(id)` lists the
    /// keys attached to lease `id` (a Put attaching a key to a lease needs
    /// WRITE on them).
    pub fn check_op(
        &self,
        user: &str,
        op: &RequestOp,
        lease_keys: &dyn Fn(i64) -> Vec<Bytes>,
    ) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        match &op.request {
            Some(Request::RequestRange(r)) => {
                self.check_range(user, &r.key, &r.range_end, PermKind::Read)
            }
            Some(Request::RequestPut(p)) => {
                self.check_range(user, &p.key, &[], PermKind::Write)?;
                if p.prev_kv {
                    self.check_range(user, &p.key, &[], PermKind::Read)?;
                }
                if p.lease != 0 && !self.is_root(user) {
                    for k in lease_keys(p.lease) {
                        self.check_range(user, &k, &[], PermKind::Write)?;
                    }
                }
                Ok(())
            }
            Some(Request::RequestDeleteRange(d)) => {
                self.check_range(user, &d.key, &d.range_end, PermKind::Write)?;
                if d.prev_kv {
                    self.check_range(user, &d.key, &d.range_end, PermKind::Read)?;
                }
                Ok(())
            }
            Some(Request::RequestTxn(t)) => {
                for c in &t.compare {
                    self.check_range(user, &c.key, &c.range_end, PermKind::Read)?;
                }
                for op in t.success.iter().chain(&t.failure) {
                    self.check_op(user, op, lease_keys)?;
                }
                Ok(())
            }
            None => self.check_user(user),
        }
    }

    /// Whether `user` may `want` every key attached to a lease: Write to
    /// revoke it or keep it alive, Read to look at it (TimeToLive with
    /// keys, Leases).
    pub fn check_lease(&self, user: &str, keys: &[Bytes], want: PermKind) -> Result<(), KvError> {
        self.check_user(user)?;
        if !self.enabled || self.is_root(user) {
            return Ok(());
        }
        keys.iter()
            .try_for_each(|k| self.check_range(user, k, &[], want))
    }

    /// Whether `user` has `role` (RoleGet of one's own role needs no root).
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(role))
    }

    /// Applies `change`. Deterministic; on error nothing changes.
    pub fn apply(&mut self, change: &AuthChange) -> Result<(), KvError> {
        match change {
            AuthChange::Enable => {
                if self.enabled {
                    return Ok(());
                }
                let root = self.users.get(ROOT).ok_or(KvError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(KvError::RootRoleNotExist);
                }
                self.enabled = true;
            }
            AuthChange::Disable => {
                if !self.enabled {
                    return Ok(());
                }
                self.enabled = false;
                self.tokens.clear();
            }
            AuthChange::UserAdd { name, password } => {
                check_name(name, KvError::UserEmpty)?;
                if self.users.contains_key(name) {
                    return Err(KvError::UserAlreadyExist);
                }
                if self.users.len() >= USERS_MAX {
                    return Err(KvError::InvalidAuthMgmt);
                }
                if password.as_ref().is_some_and(|p| p.len() > HASH_BYTES_MAX) {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.users.insert(
                    name.clone(),
                    User {
                        password: password.clone(),
                        roles: BTreeSet::new(),
                    },
                );
            }
            AuthChange::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(KvError::UserNotFound)?;
                self.tokens.retain(|_, t| &t.user != name);
            }
            AuthChange::UserChangePassword { name, password } => {
                if password.len() > HASH_BYTES_MAX {
                    return Err(KvError::InvalidAuthMgmt);
                }
                let user = self.users.get_mut(name).ok_or(KvError::UserNotFound)?;
                // A user without a password stays one (as etcd).
                if user.password.is_some() {
                    user.password = Some(password.clone());
                }
                self.tokens.retain(|_, t| &t.user != name);
            }
            AuthChange::UserGrantRole { user, role } => {
                if role != ROOT && !self.roles.contains_key(role) {
                    if !self.users.contains_key(user) {
                        return Err(KvError::UserNotFound);
                    }
                    return Err(KvError::RoleNotFound);
                }
                let u = self.users.get_mut(user).ok_or(KvError::UserNotFound)?;
                if u.roles.contains(role) {
                    return Ok(());
                }
                if u.roles.len() >= ROLES_PER_USER_MAX {
                    return Err(KvError::InvalidAuthMgmt);
                }
                u.roles.insert(role.clone());
            }
            AuthChange::UserRevokeRole { user, role } => {
                if self.enabled && user == ROOT && role == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                let u = self.users.get_mut(user).ok_or(KvError::UserNotFound)?;
                if !u.roles.remove(role) {
                    return Err(KvError::RoleNotGranted);
                }
            }
            AuthChange::RoleAdd { name } => {
                check_name(name, KvError::RoleEmpty)?;
                if self.roles.contains_key(name) {
                    return Err(KvError::RoleAlreadyExist);
                }
                if self.roles.len() >= ROLES_MAX {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.roles.insert(name.clone(), Role::default());
            }
            AuthChange::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(KvError::RoleNotFound)?;
                for u in self.users.values_mut() {
                    u.roles.remove(name);
                }
            }
            AuthChange::RoleGrantPermission { role, perm } => {
                if !valid_perm_range(&perm.key, &perm.range_end) {
                    return Err(KvError::InvalidAuthMgmt);
                }
                let r = self.roles.get_mut(role).ok_or(KvError::RoleNotFound)?;
                match r
                    .perms
                    .binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)))
                {
                    Ok(i) => r.perms[i].kind = perm.kind,
                    Err(i) => {
                        if r.perms.len() >= PERMS_PER_ROLE_MAX {
                            return Err(KvError::InvalidAuthMgmt);
                        }
                        r.perms.insert(i, perm.clone());
                    }
                }
            }
            AuthChange::RoleRevokePermission {
                role,
                key,
                range_end,
            } => {
                let r = self.roles.get_mut(role).ok_or(KvError::RoleNotFound)?;
                let before = r.perms.len();
                r.perms
                    .retain(|p| !(p.key == *key && p.range_end == *range_end));
                if r.perms.len() == before {
                    return Err(KvError::PermissionNotGranted);
                }
            }
            AuthChange::Token {
                user,
                token,
                issued_ms,
                expires_ms,
                checked_revision,
            } => {
                if !self.enabled {
                    return Err(KvError::AuthNotEnabled);
                }
                if *checked_revision != self.revision {
                    return Err(KvError::AuthOldRevision);
                }
                if !self.users.contains_key(user) {
                    return Err(KvError::AuthFailed);
                }
                if token.is_empty() || token.len() > TOKEN_BYTES_MAX {
                    return Err(KvError::InvalidAuthToken);
                }
                self.tokens.retain(|_, t| t.expires_ms > *issued_ms);
                while self.tokens.len() >= TOKENS_MAX {
                    let first = self
                        .tokens
                        .iter()
                        .min_by_key(|(k, t)| (t.expires_ms, (*k).clone()))
                        .map(|(k, _)| k.clone())
                        .expect("the table is not empty");
                    self.tokens.remove(&first);
                }
                self.tokens.insert(
                    token.clone(),
                    Token {
                        user: user.clone(),
                        expires_ms: *expires_ms,
                    },
                );
                // Issuing a token changes no user or role: no new revision.
                return Ok(());
            }
        }
        self.revision += 1;
        self.merge();
        Ok(())
    }

    /// The state in the snapshot's auth section (see `store::snapshot`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.enabled as u8);
        out.extend_from_slice(&self.revision.to_le_bytes());
        put_len(out, self.users.len());
        for (name, u) in &self.users {
            put_bytes(out, name.as_bytes());
            match &u.password {
                Some(p) => {
                    out.push(1);
                    put_bytes(out, p.as_bytes());
                }
                None => out.push(0),
            }
            put_len(out, u.roles.len());
            for r in &u.roles {
                put_bytes(out, r.as_bytes());
            }
        }
        put_len(out, self.roles.len());
        for (name, r) in &self.roles {
            put_bytes(out, name.as_bytes());
            put_len(out, r.perms.len());
            for p in &r.perms {
                out.push(p.kind as u8);
                put_bytes(out, &p.key);
                put_bytes(out, &p.range_end);
            }
        }
        put_len(out, self.tokens.len());
        for (token, t) in &self.tokens {
            put_bytes(out, token.as_bytes());
            put_bytes(out, t.user.as_bytes());
            out.extend_from_slice(&t.expires_ms.to_le_bytes());
        }
    }

    /// Reads what [`Self::encode`] wrote; anything else is an error naming
    /// what is wrong.
    pub fn decode(mut b: &[u8]) -> Result<AuthState, &'static str> {
        let r = &mut b;
        let enabled = match take::<1>(r)? {
            [0] => false,
            [1] => true,
            _ => return Err("auth enabled flag not 0 or 1"),
        };
        let revision = u64::from_le_bytes(take::<8>(r)?);
        let mut s = AuthState {
            enabled,
            revision,
            ..AuthState::default()
        };
        for _ in 0..take_len(r, USERS_MAX)? {
            let name = take_str(r, NAME_BYTES_MAX)?;
            let password = match take::<1>(r)? {
                [0] => None,
                [1] => Some(take_str(r, HASH_BYTES_MAX)?),
                _ => return Err("password flag not 0 or 1"),
            };
            let mut roles = BTreeSet::new();
            for _ in 0..take_len(r, ROLES_PER_USER_MAX)? {
                roles.insert(take_str(r, NAME_BYTES_MAX)?);
            }
            if s.users.insert(name, User { password, roles }).is_some() {
                return Err("a user twice");
            }
        }
        for _ in 0..take_len(r, ROLES_MAX)? {
            let name = take_str(r, NAME_BYTES_MAX)?;
            let mut perms: Vec<Perm> = Vec::new();
            for _ in 0..take_len(r, PERMS_PER_ROLE_MAX)? {
                let [kind] = take::<1>(r)?;
                let kind = PermKind::from_i32(kind as i32).ok_or("unknown permission kind")?;
                let key = Bytes::from(take_vec(r, super::KEY_BYTES_MAX)?);
                let range_end = Bytes::from(take_vec(r, super::KEY_BYTES_MAX)?);
                if perms
                    .last()
                    .is_some_and(|l| (&l.key, &l.range_end) >= (&key, &range_end))
                {
                    return Err("permissions not in ascending order");
                }
                perms.push(Perm {
                    key,
                    range_end,
                    kind,
                });
            }
            if s.roles.insert(name, Role { perms }).is_some() {
                return Err("a role twice");
            }
        }
        for _ in 0..take_len(r, TOKENS_MAX)? {
            let token = take_str(r, TOKEN_BYTES_MAX)?;
            let user = take_str(r, NAME_BYTES_MAX)?;
            let expires_ms = u64::from_le_bytes(take::<8>(r)?);
            s.tokens.insert(token, Token { user, expires_ms });
        }
        if !r.is_empty() {
            return Err("bytes after the auth state");
        }
        s.merge();
        Ok(s)
    }
}

fn check_name(name: &str, empty: KvError) -> Result<(), KvError> {
    if name.is_empty() {
        Err(empty)
    } else if name.len() > NAME_BYTES_MAX {
        Err(KvError::InvalidAuthMgmt)
    } else {
        Ok(())
    }
}

/// etcd's rule: a key is given, and a range end, when given, is after it
/// (or `"\0"`).
fn valid_perm_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= super::KEY_BYTES_MAX
        && (range_end.is_empty() || range_end == [0] || range_end > key)
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], &'static str> {
    if r.len() < N {
        return Err("auth state truncated");
    }
    let (head, rest) = r.split_at(N);
    *r = rest;
    Ok(head.try_into().expect("N bytes"))
}

fn take_len(r: &mut &[u8], max: usize) -> Result<usize, &'static str> {
    let n = u32::from_le_bytes(take::<4>(r)?) as usize;
    if n > max {
        return Err("auth state count over its bound");
    }
    Ok(n)
}

fn take_vec(r: &mut &[u8], max: usize) -> Result<Vec<u8>, &'static str> {
    let n = take_len(r, max)?;
    if r.len() < n {
        return Err("auth state truncated");
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Ok(head.to_vec())
}

fn take_str(r: &mut &[u8], max: usize) -> Result<String, &'static str> {
    String::from_utf8(take_vec(r, max)?).map_err(|_| "auth name not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn with_user(perms: &[(&str, &str, PermKind)]) -> AuthState {
        let mut s = AuthState::default();
        for c in [
            AuthChange::UserAdd {
                name: ROOT.into(),
                password: Some("h".into()),
            },
            AuthChange::UserGrantRole {
                user: ROOT.into(),
                role: ROOT.into(),
            },
            AuthChange::UserAdd {
                name: "u".into(),
                password: Some("h".into()),
            },
            AuthChange::RoleAdd { name: "r".into() },
            AuthChange::UserGrantRole {
                user: "u".into(),
                role: "r".into(),
            },
        ] {
            s.apply(&c).unwrap();
        }
        for (k, e, kind) in perms {
            s.apply(&AuthChange::RoleGrantPermission {
                role: "r".into(),
                perm: Perm {
                    key: b(k),
                    range_end: b(e),
                    kind: *kind,
                },
            })
            .unwrap();
        }
        s.apply(&AuthChange::Enable).unwrap();
        s
    }

    #[test]
    fn ranges_are_allowed_only_when_covered() {
        use PermKind::*;
        let s = with_user(&[("a", "c", Read), ("c", "e", ReadWrite), ("k", "", Write)]);
        let ok = |k: &str, e: &str, w| s.check_range("u", k.as_bytes(), e.as_bytes(), w).is_ok();
        assert!(ok("a", "", Read));
        assert!(ok("a", "e", Read), "two adjacent spans cover it");
        assert!(!ok("a", "f", Read));
        assert!(!ok("a", "c", Write));
        assert!(ok("c", "d", Write));
        assert!(ok("k", "", Write));
        assert!(!ok("k", "", Read));
        assert!(
            !ok("k", "k\0\0", Write),
            "a single-key grant covers only the key"
        );
        assert!(!ok("a", "\0", Read), "open-ended needs an open-ended grant");
        assert!(!ok("0", "", Read));
        assert!(s.check_range("root", b"zz", b"\0", Write).is_ok());
        assert_eq!(s.check_range("", b"a", b"", Read), Err(KvError::UserEmpty));
        assert_eq!(
            s.check_range("nobody", b"a", b"", Read),
            Err(KvError::PermissionDenied)
        );
        let open = with_user(&[("p/", "\0", Read)]);
        assert!(open.check_range("u", b"p/x", b"\0", Read).is_ok());
        assert!(open.check_range("u", b"p/", b"q", Read).is_ok());
        assert!(open.check_range("u", b"o", b"q", Read).is_err());
    }

    #[test]
    fn root_rules_and_round_trip() {
        let mut s = with_user(&[("a", "b", PermKind::Read)]);
        assert_eq!(
            s.apply(&AuthChange::UserDelete { name: ROOT.into() }),
            Err(KvError::InvalidAuthMgmt)
        );
        assert_eq!(
            s.apply(&AuthChange::RoleDelete { name: ROOT.into() }),
            Err(KvError::InvalidAuthMgmt)
        );
        assert_eq!(s.check_admin("u"), Err(KvError::PermissionDenied));
        assert!(s.check_admin(ROOT).is_ok());
        let rev = s.revision();
        s.apply(&AuthChange::Token {
            user: "u".into(),
            token: "t1".into(),
            issued_ms: 10,
            expires_ms: 100,
            checked_revision: rev,
        })
        .unwrap();
        assert_eq!(s.revision(), rev, "a token is no new revision");
        assert_eq!(s.token_user("t1", 50), Some("u"));
        assert_eq!(s.token_user("t1", 100), None, "expired");
        let mut bytes = Vec::new();
        s.encode(&mut bytes);
        assert_eq!(AuthState::decode(&bytes).unwrap(), s);
        for cut in 0..bytes.len() {
            assert!(AuthState::decode(&bytes[..cut]).is_err());
        }
        s.apply(&AuthChange::UserChangePassword {
            name: "u".into(),
            password: "h2".into(),
        })
        .unwrap();
        assert_eq!(s.token_user("t1", 50), None, "a new password ends tokens");
        let mut fresh = AuthState::default();
        fresh
            .apply(&AuthChange::UserAdd {
                name: ROOT.into(),
                password: None,
            })
            .unwrap();
        assert_eq!(
            fresh.apply(&AuthChange::Enable),
            Err(KvError::RootRoleNotExist)
        );
    }

    /// The coverage rule by a plain sweep over the grants, without merging.
    fn covered_by_sweep(grants: &[(Vec<u8>, Vec<u8>)], key: &[u8], range_end: &[u8]) -> bool {
        let bound = |k: &[u8], e: &[u8]| -> (Vec<u8>, Option<Vec<u8>>) {
            if e.is_empty() {
                let mut end = k.to_vec();
                end.push(0);
                (k.to_vec(), Some(end))
            } else if e == [0] {
                (k.to_vec(), None)
            } else {
                (k.to_vec(), Some(e.to_vec()))
            }
        };
        let (mut at, want_end) = bound(key, range_end);
        let mut spans: Vec<_> = grants.iter().map(|(k, e)| bound(k, e)).collect();
        spans.sort();
        for (start, end) in spans {
            if start > at {
                break;
            }
            match end {
                None => return true,
                Some(end) if end > at => at = end,
                Some(_) => {}
            }
            if want_end.as_ref().is_some_and(|w| at >= *w) {
                return true;
            }
        }
        false
    }

    fn small_key() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', b'c', 0u8]), 1..3)
    }

    fn small_end() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![Just(Vec::new()), Just(vec![0u8]), small_key()]
    }

    proptest::proptest! {
        /// The merged spans answer as a sweep over every grant does.
        #[test]
        fn merged_spans_answer_as_the_sweep(
            grants in proptest::collection::vec((small_key(), small_end()), 0..6),
            key in small_key(),
            end in small_end(),
        ) {
            let grants: Vec<_> = grants
                .into_iter()
                .filter(|(k, e)| valid_perm_range(k, e))
                .collect();
            let mut s = AuthState::default();
            s.apply(&AuthChange::UserAdd { name: "u".into(), password: None }).unwrap();
            s.apply(&AuthChange::RoleAdd { name: "r".into() }).unwrap();
            s.apply(&AuthChange::UserGrantRole { user: "u".into(), role: "r".into() }).unwrap();
            for (k, e) in &grants {
                s.apply(&AuthChange::RoleGrantPermission {
                    role: "r".into(),
                    perm: Perm {
                        key: Bytes::from(k.clone()),
                        range_end: Bytes::from(e.clone()),
                        kind: PermKind::Read,
                    },
                })
                .unwrap();
            }
            s.enabled = true;
            if end.is_empty() || end == [0] || end > key {
                let merged = s.check_range("u", &key, &end, PermKind::Read).is_ok();
                proptest::prop_assert_eq!(merged, covered_by_sweep(&grants, &key, &end));
            }
        }
    }
}
