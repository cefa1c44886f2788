//! Who is asking, and the Auth service (etcd's users, roles and simple
//! tokens).
//!
//! A request names its user by a token (gRPC metadata `token`, or
//! `authorization` with an optional `Bearer ` prefix, as etcd) or, when
//! the client port verifies client certificates (`--client-cert-auth`), by
//! the common name of its certificate; a token wins over a certificate.
//! With auth off every request is allowed and the user is "".
//!
//! Passwords: bcrypt ([`AuthOptions::bcrypt_cost`], etcd's
//! `--bcrypt-cost`), hashed and checked on blocking threads, at most
//! [`PASSWORD_CHECKS_MAX`] at once per member. An Authenticate for a user
//! that does not exist (or has no password) checks the password against a
//! dummy hash of the same cost, so that the answer takes as long as for a
//! wrong password: its timing does not tell whether the user exists.
//!
//! Tokens: 128 random bits (hex), issued through the log so that every
//! member knows them, valid for [`AuthOptions::token_ttl`] from issue
//! (etcd's `--auth-token-ttl`); deleting a user, changing its password or
//! disabling auth ends its tokens. A token this member does not know yet
//! (issued by another member a moment ago) is looked up again after one
//! ReadIndex round before it is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::{kv_status, unexpected, Api};
use crate::machine::{KvCommand, KvQuery, KvResponse};
use crate::pb::authpb::{permission::Type as PermType, Permission};
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::*;
use crate::store::auth::{AuthChange, AuthState, Perm, PermKind, ROOT};
use crate::store::KvError;

/// Password hashes or checks running at once on one member; more wait.
pub const PASSWORD_CHECKS_MAX: usize = 4;
/// etcd's default `--auth-token-ttl`.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(300);
/// etcd's default `--bcrypt-cost` (bcrypt's).
pub const BCRYPT_COST_DEFAULT: u32 = 10;
/// Longest password accepted, bytes (bcrypt reads at most 72).
pub const PASSWORD_BYTES_MAX: usize = 72;

/// A member's authentication settings (not replicated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthOptions {
    /// How long a token is valid from issue.
    pub token_ttl: Duration,
    /// bcrypt's cost for new passwords (4 ..= 31).
    pub bcrypt_cost: u32,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            token_ttl: TOKEN_TTL_DEFAULT,
            bcrypt_cost: BCRYPT_COST_DEFAULT,
        }
    }
}

/// Tokens this member keeps for users it forwards requests of, at most.
pub const FORWARD_TOKENS_MAX: usize = 1024;

/// What the API keeps for authentication.
#[derive(Debug)]
pub(super) struct AuthGate {
    /// Tokens issued for users who named themselves by certificate, so
    /// that a request forwarded to the leader carries who asked: by user,
    /// (token, valid until). Bounded by [`FORWARD_TOKENS_MAX`].
    forward_tokens: std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
    pub(super) view: Arc<crate::machine::AuthView>,
    pub(super) options: AuthOptions,
    /// Bounds the bcrypt work ([`PASSWORD_CHECKS_MAX`]).
    slots: tokio::sync::Semaphore,
    /// What an unknown user's password is checked against.
    dummy_hash: String,
}

impl AuthGate {
    pub(super) fn new(view: Arc<crate::machine::AuthView>, options: AuthOptions) -> Self {
        let mut options = options;
        if !(4..=31).contains(&options.bcrypt_cost) {
            tracing::warn!(
                cost = options.bcrypt_cost,
                "bcrypt cost outside 4..=31: using the default {BCRYPT_COST_DEFAULT}"
            );
            options.bcrypt_cost = BCRYPT_COST_DEFAULT;
        }
        let dummy_hash =
            bcrypt::hash("skiff: no such user", options.bcrypt_cost).expect("a cost in 4..=31");
        AuthGate {
            forward_tokens: std::sync::Mutex::default(),
            view,
            options,
            slots: tokio::sync::Semaphore::new(PASSWORD_CHECKS_MAX),
            dummy_hash,
        }
    }
}

impl AuthGate {
    /// Whether `password` matches `stored` (a bcrypt hash; None: no such
    /// user, or one without a password). Blocking, and as slow either way:
    /// without a hash it checks against the dummy one of the same cost.
    fn verify(&self, stored: Option<&str>, password: &str) -> bool {
        let hash = stored.unwrap_or(&self.dummy_hash);
        let matches = bcrypt::verify(password, hash).unwrap_or(false);
        matches && stored.is_some()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn token_of<T>(req: &Request<T>) -> Option<String> {
    let meta = req.metadata();
    let raw = meta.get("token").or_else(|| meta.get("authorization"))?;
    let s = raw.to_str().ok()?;
    Some(s.strip_prefix("Bearer ").unwrap_or(s).to_string())
}

/// The common name of the request's verified client certificate.
fn common_name<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

fn status(e: KvError) -> Status {
    kv_status(&e)
}

impl Api {
    /// The auth state this member applied last.
    pub(super) fn auth_state(&self) -> Arc<AuthState> {
        self.auth.view.get()
    }

    /// Who asks `req` ("" with auth off or when it names no one). A token
    /// that is not valid is refused with etcd's "invalid auth token".
    pub(super) async fn user_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let state = self.auth_state();
        if !state.enabled() {
            return Ok(String::new());
        }
        if let Some(token) = token_of(req) {
            if let Some(user) = state.token_user(&token, now_ms()) {
                return Ok(user.to_string());
            }
            // Maybe issued by another member a moment ago.
            self.barrier().await?;
            return match self.auth_state().token_user(&token, now_ms()) {
                Some(user) => Ok(user.to_string()),
                None => Err(status(KvError::InvalidAuthToken)),
            };
        }
        if self.client_cert_auth {
            if let Some(cn) = common_name(req) {
                if cn.len() > crate::store::auth::NAME_BYTES_MAX {
                    return Err(Status::invalid_argument(
                        "etcdserver: the certificate's common name is too long for a user name",
                    ));
                }
                return Ok(cn);
            }
        }
        Ok(String::new())
    }

    /// The token a request of `user` forwarded to the leader carries: the
    /// caller's own (`token`), none with auth off or for no user, else (a
    /// user named by its certificate, which cannot be forwarded) one issued
    /// through the log for `user` and kept for reuse until half its TTL is
    /// left.
    pub(super) async fn forward_token(
        &self,
        user: &str,
        token: Option<String>,
    ) -> Result<Option<String>, Status> {
        if token.is_some() || user.is_empty() || !self.auth_state().enabled() {
            return Ok(token);
        }
        let now = now_ms();
        let ttl_ms = self.auth.options.token_ttl.as_millis() as u64;
        {
            let kept = self
                .auth
                .forward_tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((t, until)) = kept.get(user) {
                if *until > now + ttl_ms / 2 && self.auth_state().token_user(t, now) == Some(user) {
                    return Ok(Some(t.clone()));
                }
            }
        }
        let token = random_token()?;
        let change = AuthChange::Token {
            user: user.to_string(),
            token: token.clone(),
            issued_ms: now,
            expires_ms: now + ttl_ms,
            checked_revision: self.auth_state().revision(),
        };
        self.auth_change("", change).await?;
        let mut kept = self
            .auth
            .forward_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if kept.len() >= FORWARD_TOKENS_MAX {
            kept.clear();
        }
        kept.insert(user.to_string(), (token.clone(), now + ttl_ms));
        Ok(Some(token))
    }

    /// Refuses `req` unless it comes from an administrator (auth off:
    /// anyone).
    pub(super) async fn require_admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let user = self.user_of(req).await?;
        self.auth_state().check_admin(&user).map_err(status)?;
        Ok(user)
    }

    /// Refuses `req` unless it names a user (auth off: anyone).
    pub(super) async fn require_user<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let user = self.user_of(req).await?;
        self.auth_state().check_user(&user).map_err(status)?;
        Ok(user)
    }

    /// Waits until this member applied everything committed before now
    /// (one ReadIndex round).
    async fn barrier(&self) -> Result<(), Status> {
        self.node
            .query(KvQuery::Status, true)
            .await
            .map(|_| ())
            .map_err(super::status_of)
    }

    async fn auth_change(&self, user: &str, change: AuthChange) -> Result<i64, Status> {
        match self.propose_as(user, KvCommand::Auth(change)).await? {
            KvResponse::Auth { .. } => Ok(self.hub.revision()),
            _ => Err(unexpected()),
        }
    }

    /// Runs bcrypt `work` on a blocking thread, at most
    /// [`PASSWORD_CHECKS_MAX`] at once, waiting for a slot no longer than
    /// the request timeout.
    async fn bcrypt<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Status> {
        let timeout = self.node.config().request_timeout();
        let _slot = tokio::time::timeout(timeout, self.auth.slots.acquire())
            .await
            .map_err(|_| Status::resource_exhausted("etcdserver: too many password checks"))?
            .map_err(|_| Status::unavailable("etcdserver: stopped"))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| Status::internal(format!("password hashing failed: {e}")))
    }

    /// The bcrypt hash a UserAdd or UserChangePassword stores: the client's
    /// own hash when it sent one, else the password hashed here.
    async fn hash_password(&self, password: String, hashed: String) -> Result<String, Status> {
        if !hashed.is_empty() {
            // A hash made by the client; it must parse as bcrypt.
            return if bcrypt::verify("", &hashed).is_ok() && hashed.len() <= 256 {
                Ok(hashed)
            } else {
                Err(Status::invalid_argument(
                    "etcdserver: hashedPassword is not a bcrypt hash",
                ))
            };
        }
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "etcdserver: password longer than {PASSWORD_BYTES_MAX} bytes"
            )));
        }
        let cost = self.auth.options.bcrypt_cost;
        self.bcrypt(move || bcrypt::hash(password, cost))
            .await?
            .map_err(|e| Status::internal(format!("bcrypt: {e}")))
    }

    fn role_perms(&self, state: &AuthState, role: &str) -> Result<Vec<Permission>, Status> {
        if role == ROOT {
            // The root role may do anything: etcd shows READWRITE on all.
            return Ok(vec![Permission {
                perm_type: PermType::Readwrite as i32,
                key: Bytes::from_static(b"\0"),
                range_end: Bytes::from_static(b"\0"),
            }]);
        }
        let r = state
            .role(role)
            .ok_or_else(|| status(KvError::RoleNotFound))?;
        Ok(r.perms
            .iter()
            .map(|p| Permission {
                perm_type: p.kind.as_i32(),
                key: p.key.clone(),
                range_end: p.range_end.clone(),
            })
            .collect())
    }
}

/// `msg` as a request to the leader carrying the caller's token (tokens
/// are valid on every member).
pub(super) fn with_token<T>(msg: T, token: &Option<String>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(value) = token
        .as_deref()
        .and_then(|t| tonic::metadata::MetadataValue::try_from(t).ok())
    {
        req.metadata_mut().insert("token", value);
    }
    req
}

fn random_token() -> Result<String, Status> {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| Status::internal("no randomness for a token"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

#[tonic::async_trait]
impl Auth for Api {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let revision = self.auth_change(&user, AuthChange::Enable).await?;
        tracing::warn!(by = %user, "authentication enabled");
        Ok(Response::new(AuthEnableResponse {
            header: self.header(revision),
        }))
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let revision = self.auth_change(&user, AuthChange::Disable).await?;
        tracing::warn!(by = %user, "authentication disabled");
        Ok(Response::new(AuthDisableResponse {
            header: self.header(revision),
        }))
    }

    async fn auth_status(
        &self,
        _req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.barrier().await?;
        let state = self.auth_state();
        Ok(Response::new(AuthStatusResponse {
            header: self.header(self.hub.revision()),
            enabled: state.enabled(),
            auth_revision: state.revision(),
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let AuthenticateRequest { name, password } = req.into_inner();
        self.barrier().await?;
        let state = self.auth_state();
        if !state.enabled() {
            return Err(status(KvError::AuthNotEnabled));
        }
        let stored = state.user(&name).and_then(|u| u.password.clone());
        let gate = self.auth.clone();
        let ok = self
            .bcrypt(move || gate.verify(stored.as_deref(), &password))
            .await?;
        if !ok {
            return Err(status(KvError::AuthFailed));
        }
        let token = random_token()?;
        let issued_ms = now_ms();
        let change = AuthChange::Token {
            user: name,
            token: token.clone(),
            issued_ms,
            expires_ms: issued_ms + self.auth.options.token_ttl.as_millis() as u64,
            checked_revision: state.revision(),
        };
        let revision = self.auth_change("", change).await?;
        Ok(Response::new(AuthenticateResponse {
            header: self.header(revision),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(status(KvError::UserEmpty));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password = if no_password {
            None
        } else {
            Some(self.hash_password(r.password, r.hashed_password).await?)
        };
        let revision = self
            .auth_change(
                &user,
                AuthChange::UserAdd {
                    name: r.name,
                    password,
                },
            )
            .await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.header(revision),
        }))
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let user = self.user_of(&req).await?;
        let name = req.into_inner().name;
        self.barrier().await?;
        let state = self.auth_state();
        if name != user {
            state.check_admin(&user).map_err(status)?;
        }
        let u = state
            .user(&name)
            .ok_or_else(|| status(KvError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(self.hub.revision()),
            roles: u.roles.iter().cloned().collect(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.require_admin(&req).await?;
        self.barrier().await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(self.hub.revision()),
            users: self.auth_state().users().map(|(n, _)| n.clone()).collect(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let name = req.into_inner().name;
        let revision = self
            .auth_change(&user, AuthChange::UserDelete { name })
            .await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: self.header(revision),
        }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        let password = self.hash_password(r.password, r.hashed_password).await?;
        let revision = self
            .auth_change(
                &user,
                AuthChange::UserChangePassword {
                    name: r.name,
                    password,
                },
            )
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.header(revision),
        }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        let revision = self
            .auth_change(
                &user,
                AuthChange::UserGrantRole {
                    user: r.user,
                    role: r.role,
                },
            )
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: self.header(revision),
        }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        let revision = self
            .auth_change(
                &user,
                AuthChange::UserRevokeRole {
                    user: r.name,
                    role: r.role,
                },
            )
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: self.header(revision),
        }))
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let name = req.into_inner().name;
        let revision = self
            .auth_change(&user, AuthChange::RoleAdd { name })
            .await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: self.header(revision),
        }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let user = self.user_of(&req).await?;
        let role = req.into_inner().role;
        self.barrier().await?;
        let state = self.auth_state();
        if !state.has_role(&user, &role) {
            state.check_admin(&user).map_err(status)?;
        }
        let perm = self.role_perms(&state, &role)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(self.hub.revision()),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.require_admin(&req).await?;
        self.barrier().await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(self.hub.revision()),
            roles: self.auth_state().roles().map(|(n, _)| n.clone()).collect(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let name = req.into_inner().role;
        let revision = self
            .auth_change(&user, AuthChange::RoleDelete { name })
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: self.header(revision),
        }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        let p = r.perm.ok_or_else(|| status(KvError::PermissionNotGiven))?;
        let kind = PermKind::from_i32(p.perm_type)
            .ok_or_else(|| Status::invalid_argument("etcdserver: unknown permission type"))?;
        let change = AuthChange::RoleGrantPermission {
            role: r.name,
            perm: Perm {
                key: p.key,
                range_end: p.range_end,
                kind,
            },
        };
        let revision = self.auth_change(&user, change).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: self.header(revision),
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let user = self.require_admin(&req).await?;
        let r = req.into_inner();
        let change = AuthChange::RoleRevokePermission {
            role: r.role,
            key: r.key,
            range_end: r.range_end,
        };
        let revision = self.auth_change(&user, change).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: self.header(revision),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The time of `f`, the median of five runs.
    fn median_time(mut f: impl FnMut() -> bool) -> Duration {
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                assert!(!f(), "a wrong password matched");
                t.elapsed()
            })
            .collect();
        times.sort();
        times[2]
    }

    #[test]
    fn an_unknown_user_takes_as_long_as_a_wrong_password() {
        let options = AuthOptions {
            bcrypt_cost: 8,
            ..AuthOptions::default()
        };
        let gate = AuthGate::new(Arc::default(), options);
        let stored = bcrypt::hash("right", 8).unwrap();
        assert!(gate.verify(Some(&stored), "right"));
        let wrong = median_time(|| gate.verify(Some(&stored), "wrong"));
        let unknown = median_time(|| gate.verify(None, "right"));
        // Without the dummy hash an unknown user answers in microseconds,
        // a bcrypt check of cost 8 takes milliseconds: a factor of 3 either
        // way leaves room for a busy machine and none for that.
        let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
        assert!(
            (1.0 / 3.0..=3.0).contains(&ratio),
            "unknown user {unknown:?}, wrong password {wrong:?}"
        );
        // A hash of another cost would tell the two apart too.
        assert!(
            gate.dummy_hash.starts_with("$2b$08$"),
            "{}",
            gate.dummy_hash
        );
    }
}
