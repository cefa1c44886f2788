//! TLS on the client port of real `skiff serve` processes, with
//! certificates made at run time: a 3-node cluster with
//! `--cert-file`/`--key-file`/`--trusted-ca-file`/`--client-cert-auth`
//! serves clients that present a certificate of its CA, over any member
//! (requests a follower forwards to the leader's client port go over TLS
//! too), and refuses, without harm to the cluster, a plaintext client, a
//! client without a certificate, one whose certificate another CA signed or
//! has expired, and one that does not trust the members' CA. Then the same through
//! etcdctl (skipped, saying why, where it is absent) and `skiff status`,
//! `skiff check consistency` and `skiff bench`.
//!
//! On the peer and snapshot ports: a cluster with `--peer-client-cert-auth`
//! lets in only connections whose certificate (of its CA) names the member
//! they claim to be, and a member restarted with a new certificate catches
//! up by a snapshot streamed over TLS. With host names in the peer URLs,
//! certificates that name only the host name serve (a member verifies the
//! one it dials by name, and an inbound member by the name of its URL), a
//! snapshot included.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use skiff_tests::tls::{CertFiles, Pki};
use skiff_tests::{
    etcdctl_path, run_bounded, Client, ClientTls, Cluster, ClusterOptions, NodeId, CLIENT_OPTIONS,
};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(60);

fn tls_cluster(pki: &Pki, member: &CertFiles, client: &CertFiles) -> Cluster {
    let options = ClusterOptions {
        client_tls: ClientTls::from_files(
            Some(&pki.ca_file()),
            Some(&client.cert),
            Some(&client.key),
        )
        .expect("client TLS"),
        ..ClusterOptions::default()
    };
    Cluster::start(
        options
            .arg("--cert-file", member.cert.display())
            .arg("--key-file", member.key.display())
            .arg("--trusted-ca-file", pki.ca_file().display())
            .arg("--client-cert-auth", "true"),
    )
}

/// A put through `endpoint` with `tls`: the error text, or `None` when it
/// succeeded.
async fn put_error(endpoint: &str, tls: ClientTls) -> Option<String> {
    let mut client = match Client::connect_with(&[endpoint.to_string()], CLIENT_OPTIONS, tls).await
    {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    client
        .put("probe", "x", None)
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_port_serves_tls_and_refuses_who_it_must() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "skiff");
    let member = pki.issue("member", &["127.0.0.1", "localhost"]);
    let client = pki.issue("client", &["127.0.0.1"]);
    let rogue = Pki::new(dir.path(), "rogue");
    let rogue_client = rogue.issue("client", &["127.0.0.1"]);
    let expired = pki.issue_expired("expired", &["127.0.0.1"]);

    let cluster = tls_cluster(&pki, &member, &client);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower: NodeId = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    let good = ClientTls::from_files(Some(&pki.ca_file()), Some(&client.cert), Some(&client.key))
        .expect("client TLS");

    // Writes and reads through a follower; a lease grant there is forwarded
    // to the leader's client port, which needs the member's own TLS client.
    let mut c = cluster.client(follower).await;
    c.put("k", "v", None).await.expect("put over TLS");
    let got = c.get("k", None).await.expect("get over TLS");
    assert_eq!(&got.kvs[0].value[..], b"v");
    let lease = c
        .lease_grant(60, None)
        .await
        .expect("a lease granted on a follower (forwarded over TLS)");
    assert!(lease.id != 0);

    // Refused: plaintext to the TLS port.
    let https = cluster.endpoint(follower);
    let plain = https.replace("https://", "http://");
    let why = put_error(&plain, ClientTls::plaintext()).await;
    assert!(why.is_some(), "a plaintext client was served");
    // Refused: TLS without a client certificate (--client-cert-auth).
    let anonymous = ClientTls::from_files(Some(&pki.ca_file()), None, None).expect("TLS");
    let why = put_error(&https, anonymous).await;
    assert!(why.is_some(), "a client without a certificate was served");
    // Refused: a certificate another CA signed.
    let foreign = ClientTls::from_files(
        Some(&pki.ca_file()),
        Some(&rogue_client.cert),
        Some(&rogue_client.key),
    )
    .expect("TLS");
    let why = put_error(&https, foreign).await;
    assert!(why.is_some(), "a certificate of another CA was accepted");
    // Refused: an expired certificate of the right CA.
    let stale = ClientTls::from_files(
        Some(&pki.ca_file()),
        Some(&expired.cert),
        Some(&expired.key),
    )
    .expect("TLS");
    let why = put_error(&https, stale).await;
    assert!(why.is_some(), "an expired certificate was accepted");
    // Refused by the client: it does not trust the members' CA.
    let distrustful = ClientTls::from_files(
        Some(&rogue.ca_file()),
        Some(&client.cert),
        Some(&client.key),
    )
    .expect("TLS");
    let why = put_error(&https, distrustful).await.expect("refused");
    assert!(
        why.to_lowercase().contains("certificate") || why.to_lowercase().contains("issuer"),
        "a client that does not trust the CA failed for another reason: {why}"
    );

    // None of that hurt the cluster.
    assert_eq!(put_error(&https, good.clone()).await, None);
    let mut c = cluster.client(leader).await;
    let got = c.get("probe", None).await.expect("get on the leader");
    assert_eq!(got.kvs.len(), 1);

    // The command line's client commands take etcdctl's TLS flags.
    let endpoints = cluster.endpoints().join(",");
    let ca = pki.ca_file().display().to_string();
    let (cert, key) = (
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    let tls_flags = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let mut args = vec!["status", "--endpoints", &endpoints];
    args.extend(tls_flags);
    let out = cluster.skiff(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skiff status over TLS: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.matches("leader").count() + stdout.matches("follower").count() >= 3,
        "skiff status does not show every member: {stdout}"
    );
    let mut args = vec!["check", "consistency", "--endpoints", &endpoints];
    args.extend(tls_flags);
    let out = cluster.skiff(&args);
    assert!(
        out.status.success(),
        "skiff check consistency over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    args.extend(tls_flags);
    let out = cluster.skiff(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("RESULT"),
        "skiff bench over TLS: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.skiff(&["status", "--endpoints", &endpoints]);
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("unreachable"),
        "skiff status without TLS flags reached a TLS cluster"
    );

    let Some(etcdctl) = etcdctl_path() else {
        eprintln!("SKIPPED the etcdctl part: etcdctl is not installed (Debian: etcd-client)");
        return;
    };
    let run = |flags: &[&str], args: &[&str]| {
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--command-timeout=10s")
            .arg("--dial-timeout=5s")
            .args(flags)
            .args(args);
        run_bounded(&mut cmd, ETCDCTL_TIMEOUT)
    };
    let out = run(&tls_flags, &["put", "from-etcdctl", "yes"]);
    assert!(
        out.status.success(),
        "etcdctl put over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&tls_flags, &["get", "from-etcdctl", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    let out = run(&["--cacert", &ca], &["get", "from-etcdctl"]);
    assert!(
        !out.status.success(),
        "etcdctl without a client certificate was served"
    );
    let insecure_flags = ["--insecure-transport=true"];
    let out = run(&insecure_flags, &["get", "from-etcdctl"]);
    assert!(!out.status.success(), "plaintext etcdctl was served");
}

#[test]
fn bad_tls_files_stop_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "skiff");
    let member = pki.issue("member", &["127.0.0.1"]);
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let serve = |extra: &[&str]| {
        let data = dir.path().join("data");
        let data = data.display().to_string();
        let mut args = vec![
            "serve",
            "--id",
            "1",
            "--data-dir",
            &data,
            "--listen-client",
            "127.0.0.1:0",
            "--listen-peer",
            "127.0.0.1:1",
            "--initial-cluster",
            "1=127.0.0.1:1",
        ];
        args.extend(extra);
        let out = run_bounded(
            Command::new(skiff_tests::skiff_bin()).args(&args),
            Duration::from_secs(30),
        );
        assert!(!out.status.success(), "skiff serve {extra:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let path = |p: &Path| p.display().to_string();
    let (cert, key, ca, bad) = (
        path(&member.cert),
        path(&member.key),
        path(&pki.ca_file()),
        path(&not_pem),
    );
    let why = serve(&["--cert-file", &cert, "--trusted-ca-file", &ca]);
    assert!(why.contains("key-file"), "{why}");
    let why = serve(&["--cert-file", &cert, "--key-file", &key]);
    assert!(why.contains("trusted-ca-file"), "{why}");
    let why = serve(&["--client-cert-auth"]);
    assert!(why.contains("client-cert-auth"), "{why}");
    let why = serve(&[
        "--cert-file",
        &bad,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &ca,
    ]);
    assert!(why.contains("not.pem"), "{why}");
    let missing = dir.path().join("missing.pem");
    let missing = path(&missing);
    let why = serve(&[
        "--cert-file",
        &cert,
        "--key-file",
        &missing,
        "--trusted-ca-file",
        &ca,
    ]);
    assert!(why.contains("missing.pem"), "{why}");
    // The peer ports' files: the same checks, under the peer flags' names.
    let why = serve(&["--peer-cert-file", &cert, "--peer-trusted-ca-file", &ca]);
    assert!(why.contains("peer-key-file"), "{why}");
    let why = serve(&[
        "--peer-cert-file",
        &bad,
        "--peer-key-file",
        &key,
        "--peer-trusted-ca-file",
        &ca,
    ]);
    assert!(why.contains("not.pem"), "{why}");
}

/// The peer IP of member `id` in [`peer_tls_cluster`]: its own loopback
/// address, so that its certificate names it alone.
const PEER_IP_PREFIX: (u8, u8) = (0, 17);

fn member_peer_ip(id: NodeId) -> String {
    format!("127.{}.{}.{id}", PEER_IP_PREFIX.0, PEER_IP_PREFIX.1)
}

/// A 3-node cluster whose peer and snapshot ports speak TLS with
/// `--peer-client-cert-auth`: member `id` presents a certificate naming its
/// own peer IP (and 127.0.0.1, where its snapshot port listens).
fn peer_tls_cluster(pki: &Pki, extra: &[(&str, &str)]) -> Cluster {
    peer_tls_cluster_named(pki, None, extra)
}

/// [`peer_tls_cluster`], every member's certificate with common name `cn`
/// when given (else `member-<id>`).
fn peer_tls_cluster_named(pki: &Pki, cn: Option<&str>, extra: &[(&str, &str)]) -> Cluster {
    let mut options = ClusterOptions {
        peer_ip_prefix: Some(PEER_IP_PREFIX),
        ..ClusterOptions::default()
    };
    for id in 1..=3 {
        let ip = member_peer_ip(id);
        let file = format!("member-{id}");
        let cert = pki.issue_named(&file, cn.unwrap_or(&file), &[&ip, "127.0.0.1"]);
        options.member_args.insert(id, peer_cert_args(&cert));
    }
    let mut options = options
        .arg("--peer-trusted-ca-file", pki.ca_file().display())
        .arg("--peer-client-cert-auth", "true");
    for (flag, value) in extra {
        options = options.arg(flag, value);
    }
    Cluster::start(options)
}

/// `--peer-cert-file` and `--peer-key-file` of `cert`.
fn peer_cert_args(cert: &CertFiles) -> Vec<String> {
    vec![
        "--peer-cert-file".into(),
        cert.cert.display().to_string(),
        "--peer-key-file".into(),
        cert.key.display().to_string(),
    ]
}

/// The peer TLS of a probe presenting `cert` (of `pki`'s CA).
fn probe_tls(pki: &Pki, cert: CertFiles) -> skiff_net::tls::PeerTls {
    skiff_net::tls::PeerTls::from_files(&skiff_net::tls::PeerTlsFiles {
        cert: cert.cert,
        key: cert.key,
        trusted_ca: pki.ca_file(),
        client_cert_auth: true,
        allowed_cn: None,
    })
    .expect("peer TLS")
}

/// The cluster id, as member `id` reports it.
async fn cluster_id_of(cluster: &Cluster, id: NodeId) -> u64 {
    cluster
        .status(id)
        .await
        .expect("status")
        .header
        .expect("header")
        .cluster_id
}

/// Opens a peer connection to `addr` (an IP or a host name, which the
/// member's certificate must name) as `from` (TLS with `tls`, or
/// plaintext) and sends a Hello: whether the member answered with its own.
async fn peer_hello_answered(
    addr: impl Into<skiff_net::PeerAddr>,
    tls: Option<&skiff_net::tls::PeerTls>,
    cluster_id: u64,
    from: NodeId,
    to: NodeId,
) -> bool {
    use skiff_net::tls::PeerStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = addr.into();
    let attempt = async {
        let tcp = skiff_net::connect_from(&addr, None).await?;
        let mut stream = match tls {
            None => PeerStream::Plain(tcp),
            Some(tls) => tls.connect(addr.host(), tcp).await?,
        };
        let hello = skiff_net::Hello {
            cluster_id,
            from,
            to,
            channel: skiff_net::Channel::Raft,
        };
        let mut buf = bytes::BytesMut::new();
        skiff_net::encode_hello_frame(&skiff_net::FrameEncoder::new(1024), &hello, &mut buf)
            .map_err(std::io::Error::other)?;
        stream.write_all(&buf).await?;
        stream.flush().await?;
        // A Hello frame back, not just bytes: a TLS port answers a
        // plaintext client with an alert record before it closes.
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await?;
        Ok::<bool, std::io::Error>(reply[..n].starts_with(&skiff_net::FRAME_MAGIC))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), attempt).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ports_speak_tls_and_let_only_members_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "peers");
    let rogue = Pki::new(dir.path(), "rogue");
    let mut cluster = peer_tls_cluster(
        &pki,
        &[
            ("--snapshot-entries", "200"),
            ("--snapshot-catchup-entries", "20"),
        ],
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(leader).await;
    c.put("before", "1", None)
        .await
        .expect("put over TLS peers");
    let cluster_id = cluster_id_of(&cluster, leader).await;

    // Raw peer connections to member 1, each claiming to be member 3.
    let target = 1;
    let addr = cluster.peer_addr(target);
    let files = |cert: &CertFiles, ca: &Path| skiff_net::tls::PeerTlsFiles {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        trusted_ca: ca.to_path_buf(),
        client_cert_auth: true,
        allowed_cn: None,
    };
    let as_member = |id: NodeId| {
        let cert = pki.issue(&format!("probe-{id}"), &[&member_peer_ip(id)]);
        skiff_net::tls::PeerTls::from_files(&files(&cert, &pki.ca_file())).expect("peer TLS")
    };
    // The positive control: member 3's own name gets an answer.
    assert!(
        peer_hello_answered(addr, Some(&as_member(3)), cluster_id, 3, target).await,
        "a certificate naming member 3 was refused as member 3"
    );
    // Refused: plaintext.
    assert!(!peer_hello_answered(addr, None, cluster_id, 3, target).await);
    // Refused: a certificate of another CA.
    let foreign = rogue.issue("intruder", &[&member_peer_ip(3)]);
    let foreign =
        skiff_net::tls::PeerTls::from_files(&files(&foreign, &pki.ca_file())).expect("peer TLS");
    assert!(!peer_hello_answered(addr, Some(&foreign), cluster_id, 3, target).await);
    // Refused: the right CA, but the certificate of member 2 claiming 3.
    assert!(
        !peer_hello_answered(addr, Some(&as_member(2)), cluster_id, 3, target).await,
        "member 2's certificate was accepted as member 3"
    );
    skiff_tests::poll_until(
        &format!("member {target} to log why it refused the impostor"),
        Duration::from_secs(10),
        || async { cluster.log(target).contains("does not name").then_some(()) },
    )
    .await;

    // The cluster still serves, and a member far behind, restarted with a
    // new certificate, catches up by a snapshot streamed over TLS.
    let lagging = leave_a_follower_behind(&mut cluster, leader).await;
    // It comes back with a new certificate of the same CA (a rotation:
    // new files at the same paths, a new key).
    let before = std::fs::read(dir.path().join(format!("peers-member-{lagging}.pem")))
        .expect("the member's certificate");
    pki.issue(
        &format!("member-{lagging}"),
        &[&member_peer_ip(lagging), "127.0.0.1"],
    );
    let after = std::fs::read(dir.path().join(format!("peers-member-{lagging}.pem")))
        .expect("the new certificate");
    assert_ne!(before, after, "the certificate was not replaced");
    cluster.restart(lagging);
    wait_caught_up_by_snapshot(&cluster, lagging, "snapshot TLS").await;
}

/// Kills a follower of `leader` and writes 600 keys without it (past the
/// `--snapshot-entries 200` of these clusters, so that it catches up by a
/// snapshot); returns the follower.
async fn leave_a_follower_behind(cluster: &mut Cluster, leader: NodeId) -> NodeId {
    let lagging = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    cluster.kill(lagging);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..600 {
        c.put(format!("k{i}"), "v", None).await.expect("put");
    }
    lagging
}

/// Waits until `lagging`, restarted after [`leave_a_follower_behind`],
/// holds the last key written without it, and checks that it caught up by
/// a snapshot (`covering`: what the test meant that snapshot to cover).
async fn wait_caught_up_by_snapshot(cluster: &Cluster, lagging: NodeId, covering: &str) {
    skiff_tests::poll_until(
        &format!("the restarted member {lagging} to catch up ({covering})"),
        Duration::from_secs(60),
        || async move {
            let keys = cluster.keys_with_prefix(lagging, "k599").await.ok()?;
            (!keys.is_empty()).then_some(())
        },
    )
    .await;
    assert!(
        cluster.log(lagging).contains("snapshot fetched"),
        "member {lagging} caught up without a snapshot: the test did not cover {covering}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_cert_allowed_cn_lets_in_only_that_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "peers");
    let cluster = peer_tls_cluster_named(
        &pki,
        Some("skiff-peer"),
        &[("--peer-cert-allowed-cn", "skiff-peer")],
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(leader).await;
    c.put("k", "v", None)
        .await
        .expect("members with the allowed name replicate");
    let cluster_id = cluster_id_of(&cluster, leader).await;
    let target = 1;
    let addr = cluster.peer_addr(target);
    let probe =
        |file: &str, cn: &str| probe_tls(&pki, pki.issue_named(file, cn, &[&member_peer_ip(3)]));
    assert!(
        peer_hello_answered(
            addr,
            Some(&probe("probe-ok", "skiff-peer")),
            cluster_id,
            3,
            target
        )
        .await,
        "the allowed name, member 3's address: refused"
    );
    assert!(
        !peer_hello_answered(
            addr,
            Some(&probe("probe-bad", "intruder")),
            cluster_id,
            3,
            target
        )
        .await,
        "the cluster's CA and member 3's address but another name: accepted"
    );
    skiff_tests::poll_until(
        &format!("member {target} to log why it refused the other name"),
        Duration::from_secs(10),
        || async {
            cluster
                .log(target)
                .contains("--peer-cert-allowed-cn")
                .then_some(())
        },
    )
    .await;
    c.put("k", "still", None)
        .await
        .expect("the cluster still serves");

    // A name without client certificate authentication is a configuration
    // error that names the flag.
    let out = cluster.skiff(&[
        "serve",
        "--id",
        "1",
        "--data-dir",
        &dir.path().join("bad").display().to_string(),
        "--initial-cluster",
        "1=127.0.0.1:1",
        "--listen-peer",
        "127.0.0.1:1",
        "--peer-cert-allowed-cn",
        "x",
    ]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("peer-cert-allowed-cn"),
        "--peer-cert-allowed-cn without --peer-client-cert-auth: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Peer URLs with a host name (`localhost`; the only name every machine
/// resolves) and certificates that carry that name alone, no IP: the
/// members dial each other by name and verify the certificates by it, with
/// `--peer-client-cert-auth`; a member that fell behind catches up by a
/// snapshot fetched by name over TLS; `member list` shows the URLs as
/// given; a connection whose certificate names another host is refused as
/// a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_urls_with_host_names_and_certificates_naming_only_them() {
    const HOST: &str = "localhost";
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "named");
    let mut options = ClusterOptions {
        peer_host_name: Some(HOST.into()),
        ..ClusterOptions::default()
    };
    for id in 1..=3 {
        let cert = pki.issue(&format!("member-{id}"), &[HOST]);
        options.member_args.insert(id, peer_cert_args(&cert));
    }
    let mut cluster = Cluster::start(
        options
            .arg("--peer-trusted-ca-file", pki.ca_file().display())
            .arg("--peer-client-cert-auth", "true")
            .arg("--snapshot-entries", "200")
            .arg("--snapshot-catchup-entries", "20"),
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let mut c = cluster.client(leader).await;
    c.put("before", "1", None)
        .await
        .expect("put with peers reached by name");
    let list = c.member_list().await.expect("member list");
    let mut urls: Vec<String> = list
        .members
        .iter()
        .flat_map(|m| m.peer_ur_ls.clone())
        .collect();
    urls.sort();
    let mut expected: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| format!("http://{HOST}:{}", cluster.peer_addr(id).port()))
        .collect();
    expected.sort();
    assert_eq!(urls, expected, "member list: {list:?}");

    // Member 1's peer port, dialled by name, as member 3: a certificate of
    // the CA naming the host is taken, one naming another host is not.
    let cluster_id = cluster_id_of(&cluster, leader).await;
    let target = 1;
    let by_name = skiff_net::PeerAddr::new(
        skiff_net::Host::Name(HOST.into()),
        cluster.peer_addr(target).port(),
    );
    let probe = |file: &str, san: &str| probe_tls(&pki, pki.issue(file, &[san]));
    assert!(
        peer_hello_answered(
            by_name.clone(),
            Some(&probe("probe-named", HOST)),
            cluster_id,
            3,
            target
        )
        .await,
        "a certificate naming member 3's host was refused as member 3"
    );
    assert!(
        !peer_hello_answered(
            by_name,
            Some(&probe("probe-elsewhere", "elsewhere.example")),
            cluster_id,
            3,
            target
        )
        .await,
        "a certificate naming another host was accepted as member 3"
    );

    let lagging = leave_a_follower_behind(&mut cluster, leader).await;
    cluster.restart(lagging);
    wait_caught_up_by_snapshot(&cluster, lagging, "a snapshot fetched by name").await;
}
