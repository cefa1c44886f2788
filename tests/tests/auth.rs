//! etcd authentication on real `skiff serve` processes: users, roles with
//! key-range permissions, tokens, through the etcd gRPC API (the
//! generated etcd client) and through etcdctl (skipped, saying why, where
//! it is absent).
//!
//! * every permission boundary: a key inside and outside a role's range,
//!   a range that goes past it, READ against WRITE, prev_kv, txn compares
//!   and branches, watches, leases, administration;
//! * tokens: issued on one member, honoured on another, refused after
//!   their TTL, ended by a password change; a wrong password and an unknown
//!   user get the same answer;
//! * the common name of a verified client certificate is the user;
//! * auth survives a leader SIGKILL and reaches a lagging member through a
//!   snapshot install.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_kv::pb::authpb::{permission::Type as PermType, Permission, UserAddOptions};
use skiff_kv::pb::etcdserverpb::auth_client::AuthClient;
use skiff_kv::pb::etcdserverpb::cluster_client::ClusterClient;
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::kv_client::KvClient;
use skiff_kv::pb::etcdserverpb::lease_client::LeaseClient;
use skiff_kv::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use skiff_kv::pb::etcdserverpb::request_op::Request as Op;
use skiff_kv::pb::etcdserverpb::watch_client::WatchClient;
use skiff_kv::pb::etcdserverpb::watch_request::RequestUnion;
use skiff_kv::pb::etcdserverpb::*;
use skiff_tests::client::PutOptions;
use skiff_tests::tls::Pki;
use skiff_tests::{
    etcdctl_path, run_bounded, Client, ClientTls, Cluster, ClusterOptions, NodeId, CLIENT_OPTIONS,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(90);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Cheap hashes: the tests hash a few passwords on a busy 2-core machine.
const BCRYPT_COST: &str = "4";
const SNAPSHOT_ENTRIES: u64 = 200;
/// `--auth-token-ttl` of member 1 in the token test, seconds.
const TTL_SECS: u64 = 3;

/// A connection to one member and the token to send (None: anonymous).
#[derive(Clone)]
struct Conn {
    channel: Channel,
    token: Option<String>,
}

impl Conn {
    async fn to(cluster: &Cluster, id: NodeId) -> Conn {
        let channel = tonic::transport::Endpoint::from_shared(cluster.endpoint(id))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to member {id}: {e}"));
        Conn {
            channel,
            token: None,
        }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut()
                .insert("token", t.parse().expect("token is ASCII"));
        }
        r
    }

    fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(self.channel.clone())
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    /// This connection as `user` (Authenticate on this member).
    async fn login(&self, user: &str, password: &str) -> Result<Conn, Status> {
        let token = self
            .auth()
            .authenticate(AuthenticateRequest {
                name: user.into(),
                password: password.into(),
            })
            .await?
            .into_inner()
            .token;
        Ok(Conn {
            channel: self.channel.clone(),
            token: Some(token),
        })
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), Status> {
        self.kv()
            .put(self.req(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ..Default::default()
            }))
            .await
            .map(|_| ())
    }

    async fn put_prev(&self, key: &str) -> Result<(), Status> {
        self.kv()
            .put(self.req(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::from_static(b"v"),
                prev_kv: true,
                ..Default::default()
            }))
            .await
            .map(|_| ())
    }

    async fn range(&self, key: &str, end: &str) -> Result<Vec<String>, Status> {
        let r = self
            .kv()
            .range(self.req(RangeRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                range_end: Bytes::copy_from_slice(end.as_bytes()),
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok(r.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .collect())
    }

    async fn txn(&self, compare_key: &str, put_key: &str) -> Result<(), Status> {
        let put = RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(put_key.as_bytes()),
                value: Bytes::from_static(b"t"),
                ..Default::default()
            })),
        };
        self.kv()
            .txn(self.req(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Greater as i32,
                    target: CompareTarget::Version as i32,
                    key: Bytes::copy_from_slice(compare_key.as_bytes()),
                    target_union: Some(TargetUnion::Version(-1)),
                    ..Default::default()
                }],
                success: vec![put],
                failure: vec![],
            }))
            .await
            .map(|_| ())
    }
}

fn denied(r: Result<impl std::fmt::Debug, Status>, code: Code, text: &str, what: &str) {
    match r {
        Err(s) => assert!(
            s.code() == code && s.message().contains(text),
            "{what}: expected {code:?} \"{text}\", got {:?} \"{}\"",
            s.code(),
            s.message()
        ),
        Ok(v) => panic!("{what}: allowed ({v:?}), expected {code:?} \"{text}\""),
    }
}

fn perm(kind: PermType, key: &str, end: &str) -> Permission {
    Permission {
        perm_type: kind as i32,
        key: Bytes::copy_from_slice(key.as_bytes()),
        range_end: Bytes::copy_from_slice(end.as_bytes()),
    }
}

/// Users `root` (root role), `alice` (READWRITE on [a/, a0)), `bob` (READ
/// on every key from r/ on), `carol` (no password); auth on. Through
/// `admin` (anonymous while auth is off).
async fn set_up_users(admin: &Conn) {
    let mut a = admin.auth();
    for (name, password) in [("root", "rootpw"), ("alice", "alicepw"), ("bob", "bobpw")] {
        a.user_add(AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UserAdd {name}: {e}"));
    }
    a.user_add(AuthUserAddRequest {
        name: "carol".into(),
        options: Some(UserAddOptions { no_password: true }),
        ..Default::default()
    })
    .await
    .expect("UserAdd carol");
    denied(
        a.auth_enable(AuthEnableRequest {}).await,
        Code::FailedPrecondition,
        "root user does not have root role",
        "AuthEnable before root has its role",
    );
    for (role, p) in [
        ("rw-a", perm(PermType::Readwrite, "a/", "a0")),
        ("ro-r", perm(PermType::Read, "r/", "\0")),
    ] {
        a.role_add(AuthRoleAddRequest { name: role.into() })
            .await
            .expect("RoleAdd");
        a.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(p),
        })
        .await
        .expect("RoleGrantPermission");
    }
    for (user, role) in [
        ("root", "root"),
        ("alice", "rw-a"),
        ("bob", "ro-r"),
        ("carol", "rw-a"),
    ] {
        a.user_grant_role(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("grant {role} to {user}: {e}"));
    }
    a.auth_enable(AuthEnableRequest {})
        .await
        .expect("AuthEnable");
}

fn auth_cluster(extra: &[(&str, &str)]) -> Cluster {
    let mut options = ClusterOptions::default().arg("--bcrypt-cost", BCRYPT_COST);
    for (flag, value) in extra {
        options = options.arg(flag, value);
    }
    Cluster::start(options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_tokens_and_their_boundaries() {
    // Tokens issued by member 1 live 3 s; by the others, etcd's 300 s.
    let mut options = ClusterOptions::default().arg("--bcrypt-cost", BCRYPT_COST);
    options
        .member_args
        .insert(1, vec!["--auth-token-ttl".into(), TTL_SECS.to_string()]);
    let cluster = Cluster::start(options);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let anon = Conn::to(&cluster, 2).await;
    set_up_users(&anon).await;

    // Anonymous requests, wrong passwords, unknown users.
    denied(
        anon.put("a/1", "x").await,
        Code::InvalidArgument,
        "user name is empty",
        "anonymous put",
    );
    denied(
        anon.range("a/", "a0").await,
        Code::InvalidArgument,
        "user name is empty",
        "anonymous range",
    );
    for (user, password) in [("alice", "wrong"), ("nobody", "alicepw"), ("carol", "")] {
        denied(
            anon.login(user, password).await.map(|_| ()),
            Code::InvalidArgument,
            "authentication failed, invalid user ID or password",
            &format!("Authenticate {user}"),
        );
    }

    // A token issued by one member works on another at once.
    let alice_here = anon.login("alice", "alicepw").await.expect("alice logs in");
    let mut alice = Conn::to(&cluster, 3).await;
    alice.token = alice_here.token.clone();
    alice.put("a/1", "one").await.expect("alice writes a/1");
    assert_eq!(alice.range("a/1", "").await.expect("read a/1"), ["one"]);
    assert_eq!(
        alice.range("a/", "a0").await.expect("read [a/, a0)"),
        ["one"]
    );
    alice
        .put_prev("a/2")
        .await
        .expect("put with prev_kv in range");
    denied(
        alice.put("b", "x").await,
        Code::PermissionDenied,
        "permission denied",
        "alice put b",
    );
    denied(
        alice.range("b", "").await,
        Code::PermissionDenied,
        "permission denied",
        "alice get b",
    );
    denied(
        alice.range("a/", "a1").await,
        Code::PermissionDenied,
        "permission denied",
        "a range past the role's end",
    );
    denied(
        alice.range("a/", "\0").await,
        Code::PermissionDenied,
        "permission denied",
        "an open-ended range",
    );
    denied(
        alice.txn("b", "a/3").await,
        Code::PermissionDenied,
        "permission denied",
        "txn comparing b",
    );
    denied(
        alice.txn("a/1", "b").await,
        Code::PermissionDenied,
        "permission denied",
        "txn putting b",
    );
    alice.txn("a/1", "a/3").await.expect("txn inside the range");
    denied(
        alice
            .auth()
            .user_list(alice.req(AuthUserListRequest {}))
            .await,
        Code::PermissionDenied,
        "permission denied",
        "alice lists users",
    );
    denied(
        MaintenanceClient::new(alice.channel.clone())
            .hash_kv(alice.req(HashKvRequest { revision: 0 }))
            .await,
        Code::PermissionDenied,
        "permission denied",
        "alice asks for HashKV",
    );
    let roles = alice
        .auth()
        .user_get(alice.req(AuthUserGetRequest {
            name: "alice".into(),
        }))
        .await
        .expect("alice reads herself")
        .into_inner()
        .roles;
    assert_eq!(roles, ["rw-a"]);

    // A watch outside the range is created cancelled.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(b"b"),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = WatchClient::new(alice.channel.clone())
        .watch(alice.req(tokio_stream_of(rx)))
        .await
        .expect("watch stream")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch answer")
        .expect("stream ok")
        .expect("a message");
    assert!(
        first.canceled && first.cancel_reason.contains("permission denied"),
        "watch on b: {first:?}"
    );

    // Leases: alice's keys are hers to keep alive and revoke; bob, who may
    // only read, may not revoke them.
    let lease = LeaseClient::new(alice.channel.clone())
        .lease_grant(alice.req(LeaseGrantRequest { ttl: 60, id: 0 }))
        .await
        .expect("alice grants a lease")
        .into_inner()
        .id;
    alice
        .kv()
        .put(alice.req(PutRequest {
            key: Bytes::from_static(b"a/leased"),
            value: Bytes::from_static(b"l"),
            lease,
            ..Default::default()
        }))
        .await
        .expect("alice attaches a/leased");
    let bob = anon.login("bob", "bobpw").await.expect("bob logs in");
    denied(
        LeaseClient::new(bob.channel.clone())
            .lease_revoke(bob.req(LeaseRevokeRequest { id: lease }))
            .await,
        Code::PermissionDenied,
        "permission denied",
        "bob revokes alice's lease",
    );
    bob.range("r/x", "").await.expect("bob reads r/");
    bob.range("r/", "\0")
        .await
        .expect("bob reads everything from r/ on");
    denied(
        bob.put("r/x", "1").await,
        Code::PermissionDenied,
        "permission denied",
        "bob writes r/x",
    );
    LeaseClient::new(alice.channel.clone())
        .lease_revoke(alice.req(LeaseRevokeRequest { id: lease }))
        .await
        .expect("alice revokes her lease");

    // Root may do anything; revoking a permission takes effect at once.
    let root = anon.login("root", "rootpw").await.expect("root logs in");
    root.put("b", "root was here").await.expect("root writes b");
    root.auth()
        .role_revoke_permission(root.req(AuthRoleRevokePermissionRequest {
            role: "rw-a".into(),
            key: Bytes::from_static(b"a/"),
            range_end: Bytes::from_static(b"a0"),
        }))
        .await
        .expect("revoke rw-a's permission");
    denied(
        alice.put("a/1", "x").await,
        Code::PermissionDenied,
        "permission denied",
        "after the revoke",
    );
    root.auth()
        .role_grant_permission(root.req(AuthRoleGrantPermissionRequest {
            name: "rw-a".into(),
            perm: Some(perm(PermType::Readwrite, "a/", "a0")),
        }))
        .await
        .expect("grant it back");
    alice.put("a/1", "again").await.expect("granted back");
    denied(
        root.auth()
            .user_delete(root.req(AuthUserDeleteRequest {
                name: "root".into(),
            }))
            .await,
        Code::InvalidArgument,
        "invalid auth management",
        "deleting root while auth is on",
    );

    // A password change ends the user's tokens; a token's TTL ends it too.
    let bob_again = anon.login("bob", "bobpw").await.expect("bob logs in");
    root.auth()
        .user_change_password(root.req(AuthUserChangePasswordRequest {
            name: "bob".into(),
            password: "bobpw2".into(),
            ..Default::default()
        }))
        .await
        .expect("change bob's password");
    denied(
        bob_again.range("r/x", "").await,
        Code::Unauthenticated,
        "invalid auth token",
        "old token",
    );
    let bob = anon.login("bob", "bobpw2").await.expect("the new password");
    bob.range("r/x", "").await.expect("new token");
    let short = Conn::to(&cluster, 1).await;
    let issued = Instant::now();
    let bob = short
        .login("bob", "bobpw2")
        .await
        .expect("bob logs in on member 1");
    bob.range("r/x", "").await.expect("fresh token");
    let ttl = Duration::from_secs(TTL_SECS);
    tokio::time::sleep(ttl.saturating_sub(issued.elapsed()) + Duration::from_millis(500)).await;
    denied(
        bob.range("r/x", "").await,
        Code::Unauthenticated,
        "invalid auth token",
        "expired token",
    );

    // The command line logs in with --user.
    let endpoints = cluster.endpoints().join(",");
    let bench = |user: &[&str]| {
        let mut args = vec![
            "bench",
            "--endpoints",
            &endpoints,
            "--duration",
            "1",
            "--warmup",
            "0",
            "--clients",
            "2",
            "--no-progress",
        ];
        args.extend(user);
        cluster.skiff(&args)
    };
    let out = bench(&["--user", "root:rootpw"]);
    assert!(
        out.status.success(),
        "skiff bench --user root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bench(&[]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("user name is empty"),
        "anonymous skiff bench wrote with auth on: {text}"
    );
    let out = bench(&["--user", "root:nope"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "skiff bench with a wrong password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.skiff(&[
        "check",
        "consistency",
        "--endpoints",
        &endpoints,
        "--user",
        "root",
        "--password",
        "rootpw",
    ]);
    assert!(
        out.status.success(),
        "skiff check consistency --user root: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.skiff(&[
        "status",
        "--endpoints",
        &endpoints,
        "--user",
        "alice:alicepw",
    ]);
    assert!(
        out.status.success(),
        "skiff status --user alice: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Auth off again: anyone may.
    root.auth()
        .auth_disable(root.req(AuthDisableRequest {}))
        .await
        .expect("AuthDisable");
    anon.put("b", "anyone")
        .await
        .expect("anonymous put with auth off");
}

fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_survives_a_leader_sigkill_and_a_snapshot_install() {
    let snapshot_entries = SNAPSHOT_ENTRIES.to_string();
    let mut cluster = auth_cluster(&[
        ("--snapshot-entries", &snapshot_entries),
        ("--snapshot-catchup-entries", "100"),
    ]);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let anon = Conn::to(&cluster, leader).await;
    set_up_users(&anon).await;
    let lagging = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let stopped_at = cluster.status(lagging).await.unwrap().raft_applied_index;
    cluster.kill(lagging);

    // Enough writes (as root) for snapshots and log compaction past where
    // the lagging member stopped.
    let root = anon.login("root", "rootpw").await.expect("root logs in");
    for i in 0..(SNAPSHOT_ENTRIES * 4) {
        root.put(&format!("k/{i}"), "v").await.expect("root writes");
    }
    let target = cluster.status(leader).await.unwrap().raft_index;

    // The leader dies; the lagging member comes back and, with the third,
    // elects a leader that sends it a snapshot.
    cluster.kill(leader);
    cluster.restart(lagging);
    cluster
        .wait_applied(lagging, target, CATCH_UP_TIMEOUT)
        .await;
    let log = cluster.log_since_start(lagging);
    assert!(
        log.contains("snapshot installed"),
        "member {lagging} caught up without a snapshot install; its log:\n{log}"
    );

    for id in [lagging] {
        let conn = Conn::to(&cluster, id).await;
        check_survived(&conn, id).await;
    }
    cluster.restart(leader);
    let target = cluster.status(lagging).await.unwrap().raft_index;
    cluster.wait_applied(leader, target, CATCH_UP_TIMEOUT).await;
    let conn = Conn::to(&cluster, leader).await;
    check_survived(&conn, leader).await;
    assert!(stopped_at < target);
}

/// Auth is on and alice's boundary holds, as seen through member `id`.
async fn check_survived(conn: &Conn, id: NodeId) {
    denied(
        conn.put("a/1", "x").await,
        Code::InvalidArgument,
        "user name is empty",
        &format!("anonymous put on member {id}"),
    );
    let alice = conn
        .login("alice", "alicepw")
        .await
        .unwrap_or_else(|e| panic!("alice logs in on member {id}: {e}"));
    alice
        .put("a/1", "x")
        .await
        .unwrap_or_else(|e| panic!("alice writes a/1 on member {id}: {e}"));
    denied(
        alice.put("b", "x").await,
        Code::PermissionDenied,
        "permission denied",
        &format!("alice writes b on member {id}"),
    );
    denied(
        conn.login("alice", "wrong").await.map(|_| ()),
        Code::InvalidArgument,
        "authentication failed",
        &format!("wrong password on member {id}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "skiff-test-ca");
    let member = pki.issue("member", &["127.0.0.1", "localhost"]);
    let harness = pki.issue("root", &[]);
    let alice_cert = pki.issue("alice", &[]);
    let tls = |c: &skiff_tests::tls::CertFiles| {
        ClientTls::from_files(Some(&pki.ca_file()), Some(&c.cert), Some(&c.key)).expect("TLS")
    };
    let options = ClusterOptions {
        client_tls: tls(&harness),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(
        options
            .arg("--bcrypt-cost", BCRYPT_COST)
            .arg("--cert-file", member.cert.display())
            .arg("--key-file", member.key.display())
            .arg("--trusted-ca-file", pki.ca_file().display())
            .arg("--client-cert-auth", "true"),
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoints = cluster.endpoints();

    // Users and roles, through the harness's client (auth still off).
    let channel = tls(&harness)
        .endpoint(&endpoints[0])
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let admin = Conn {
        channel,
        token: None,
    };
    set_up_users(&admin).await;

    // No token: the certificate's common name is the user.
    let mut as_alice = Client::connect_with(&endpoints, CLIENT_OPTIONS, tls(&alice_cert))
        .await
        .expect("alice connects");
    as_alice
        .put("a/cn", "by certificate", None)
        .await
        .expect("alice (CN) writes a/cn");
    let err = as_alice
        .put("b", "x", None)
        .await
        .expect_err("alice (CN) writes b");
    assert!(err.to_string().contains("permission denied"), "{err}");
    // Lease requests a follower forwards to the leader stay alice's (the
    // follower has a token issued for her: a certificate cannot be
    // forwarded).
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let mut via_follower = Client::connect_with(
        &[cluster.endpoint(follower)],
        CLIENT_OPTIONS,
        tls(&alice_cert),
    )
    .await
    .expect("alice connects to a follower");
    let lease = via_follower
        .lease_grant(60, None)
        .await
        .expect("alice (CN) grants a lease through a follower")
        .id;
    via_follower
        .put("a/leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("alice (CN) attaches a key");
    let ttl = via_follower
        .lease_time_to_live(lease, true)
        .await
        .expect("alice (CN) reads her lease through a follower");
    assert_eq!(ttl.keys.len(), 1, "{ttl:?}");
    let (_keeper, mut stream) = via_follower
        .lease_keep_alive(lease)
        .await
        .expect("a keepalive stream through a follower");
    let kept = stream
        .message()
        .await
        .expect("alice (CN) keeps her lease alive through a follower")
        .expect("a keepalive answer");
    assert!(kept.ttl > 0, "{kept:?}");

    let mut as_root = Client::connect_with(&endpoints, CLIENT_OPTIONS, tls(&harness))
        .await
        .expect("root connects");
    as_root
        .put("b", "root by certificate", None)
        .await
        .expect("root (CN) writes b");

    let Some(etcdctl) = etcdctl_path() else {
        eprintln!("SKIPPED the etcdctl part: etcdctl is not installed (Debian: etcd-client)");
        return;
    };
    let ca = pki.ca_file().display().to_string();
    let run = |cert: &skiff_tests::tls::CertFiles, args: &[&str]| {
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=10s")
            .args(["--cacert", &ca])
            .args(["--cert", &cert.cert.display().to_string()])
            .args(["--key", &cert.key.display().to_string()])
            .args(args);
        run_bounded(&mut cmd, ETCDCTL_TIMEOUT)
    };
    let out = run(&alice_cert, &["put", "a/ctl", "1"]);
    assert!(
        out.status.success(),
        "etcdctl as alice (CN): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&alice_cert, &["put", "b", "1"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "etcdctl as alice (CN) wrote b: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A password still works over TLS, and wins over the certificate.
    let out = run(&alice_cert, &["--user", "root:rootpw", "put", "b", "2"]);
    assert!(
        out.status.success(),
        "etcdctl --user root over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_users_roles_and_permissions() {
    let Some(etcdctl) = etcdctl_path() else {
        eprintln!("SKIPPED: etcdctl is not installed (Debian: etcd-client)");
        return;
    };
    let cluster = auth_cluster(&[]);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoints = cluster
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--command-timeout=10s")
            .args(args);
        let out = run_bounded(&mut cmd, ETCDCTL_TIMEOUT);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (success, stdout, stderr) = run(args);
        assert!(success, "etcdctl {args:?}: {stderr}");
        stdout
    };
    let fails = |args: &[&str], text: &str| {
        let (success, stdout, stderr) = run(args);
        assert!(
            !success && stderr.contains(text),
            "etcdctl {args:?} should fail with \"{text}\": {stdout} {stderr}"
        );
    };
    ok(&["user", "add", "root:rootpw"]);
    ok(&["user", "add", "dave:davepw"]);
    ok(&["role", "add", "logs"]);
    ok(&[
        "role",
        "grant-permission",
        "logs",
        "readwrite",
        "logs/",
        "--prefix",
    ]);
    ok(&["role", "add", "cfg-reader"]);
    ok(&[
        "role",
        "grant-permission",
        "cfg-reader",
        "read",
        "cfg/",
        "cfg0",
    ]);
    ok(&["user", "grant-role", "dave", "logs"]);
    ok(&["user", "grant-role", "dave", "cfg-reader"]);
    // etcdctl adds the root role and grants it when it is missing.
    ok(&["auth", "enable"]);
    fails(&["put", "logs/1", "x"], "user name is empty");
    ok(&["--user", "dave:davepw", "put", "logs/1", "x"]);
    let out = ok(&[
        "--user",
        "dave:davepw",
        "get",
        "logs/",
        "--prefix",
        "--print-value-only",
    ]);
    assert_eq!(out.trim(), "x");
    ok(&["--user", "root:rootpw", "put", "cfg/a", "1"]);
    let out = ok(&[
        "--user",
        "dave:davepw",
        "get",
        "cfg/a",
        "--print-value-only",
    ]);
    assert_eq!(out.trim(), "1");
    fails(
        &["--user", "dave:davepw", "put", "cfg/a", "2"],
        "permission denied",
    );
    fails(
        &["--user", "dave:davepw", "get", "other"],
        "permission denied",
    );
    fails(
        &["--user", "dave:davepw", "get", "", "--prefix"],
        "permission denied",
    );
    fails(
        &["--user", "dave:wrong", "get", "logs/1"],
        "authentication failed",
    );
    fails(
        &["--user", "dave:davepw", "user", "list"],
        "permission denied",
    );
    let users = ok(&["--user", "root:rootpw", "user", "list"]);
    assert!(users.contains("dave") && users.contains("root"), "{users}");
    let role = ok(&["--user", "root:rootpw", "role", "get", "cfg-reader"]);
    assert!(role.contains("cfg/"), "{role}");
    ok(&[
        "--user",
        "root:rootpw",
        "role",
        "revoke-permission",
        "logs",
        "logs/",
        "--prefix",
    ]);
    fails(
        &["--user", "dave:davepw", "put", "logs/2", "x"],
        "permission denied",
    );
    ok(&[
        "--user",
        "root:rootpw",
        "user",
        "revoke-role",
        "dave",
        "cfg-reader",
    ]);
    fails(
        &["--user", "dave:davepw", "get", "cfg/a"],
        "permission denied",
    );
    ok(&["--user", "root:rootpw", "user", "delete", "dave"]);
    fails(
        &["--user", "dave:davepw", "get", "logs/1"],
        "authentication failed",
    );
    ok(&["--user", "root:rootpw", "auth", "disable"]);
    ok(&["put", "anyone", "1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_with_auth_on() {
    let mut cluster = auth_cluster(&[]);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let anon = Conn::to(&cluster, follower).await;
    set_up_users(&anon).await;
    let cluster_id = cluster
        .status(leader)
        .await
        .expect("status")
        .header
        .expect("header")
        .cluster_id;
    let addrs = cluster.new_member_addrs();
    let add = || MemberAddRequest {
        peer_ur_ls: vec![addrs.peer_url()],
        is_learner: false,
    };
    let members = |c: &Conn| ClusterClient::new(c.channel.clone());
    denied(
        members(&anon).member_add(anon.req(add())).await,
        Code::InvalidArgument,
        "user name is empty",
        "anonymous MemberAdd",
    );
    let alice = anon.login("alice", "alicepw").await.expect("alice logs in");
    denied(
        members(&alice).member_add(alice.req(add())).await,
        Code::PermissionDenied,
        "permission denied",
        "MemberAdd by alice",
    );
    // Root, through a follower: forwarded to the leader with root's token.
    let root = anon.login("root", "rootpw").await.expect("root logs in");
    let added = members(&root)
        .member_add(root.req(add()))
        .await
        .expect("MemberAdd by root through a follower")
        .into_inner()
        .member
        .expect("the new member");
    cluster.add_member_process(added.id, cluster_id, addrs);
    // The new member publishes its client URL itself (a MemberUpdate made
    // as root, forwarded to the leader).
    let url = addrs.endpoint();
    skiff_tests::poll_until(
        "the new member's client URL in MemberList",
        CATCH_UP_TIMEOUT,
        || {
            let root = root.clone();
            let url = url.clone();
            async move {
                let list = members(&root)
                    .member_list(root.req(MemberListRequest::default()))
                    .await
                    .ok()?
                    .into_inner();
                list.members
                    .iter()
                    .any(|m| m.id == added.id && m.client_ur_ls.contains(&url))
                    .then_some(())
            }
        },
    )
    .await;
    // MoveLeader through a follower, to the other follower.
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let via = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let target = cluster
        .ids()
        .into_iter()
        .find(|&i| i != leader && i != via && i != added.id)
        .unwrap_or(added.id);
    let mut through = Conn::to(&cluster, via).await;
    through.token = root.token.clone();
    MaintenanceClient::new(through.channel.clone())
        .move_leader(through.req(MoveLeaderRequest { target_id: target }))
        .await
        .expect("MoveLeader by root through a follower");
    let new_member = Conn::to(&cluster, added.id).await;
    let alice_there = new_member
        .login("alice", "alicepw")
        .await
        .expect("alice logs in on the new member");
    alice_there
        .put("a/new", "x")
        .await
        .expect("alice writes through the new member");
    denied(
        alice_there.put("b", "x").await,
        Code::PermissionDenied,
        "permission denied",
        "alice writes b through the new member",
    );
}
