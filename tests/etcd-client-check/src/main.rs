//! Drives a Skiff cluster through the `etcd-client` crate, a Rust client
//! library for etcd's v3 API that Skiff neither wrote nor controls. Run by
//! `tests/tests/etcd_client.rs`, which starts the cluster, builds this
//! program and checks what it prints.
//!
//! ```text
//! etcd-client-check kv-watch ENDPOINTS
//! etcd-client-check lease ENDPOINTS TTL_S
//! etcd-client-check lock ENDPOINTS NAME SESSION_TTL_S HOLD_MS
//! etcd-client-check campaign ENDPOINTS ELECTION VALUE SESSION_TTL_S
//! etcd-client-check observe ENDPOINTS ELECTION COUNT
//! ```
//!
//! ENDPOINTS is a comma-separated list of `http://HOST:PORT`. `kv-watch`
//! and `lease` check etcd's semantics themselves and print `ok <what>` for
//! each check passed; on the first wrong answer they print what they got
//! against what etcd answers, on stderr, and exit 1. `lock` and `campaign`
//! print timestamped lines (`LOCKED`, `UNLOCKED`, `LEADER`, ...: milliseconds
//! since the Unix epoch) for the test to compare between processes. Every
//! wait is bounded ([`WAIT`]).

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Error, EventType, GetOptions,
    LeaderKey, LockOptions, PutOptions, ResignOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};

/// Longest wait for any one answer, event or lock.
const WAIT: Duration = Duration::from_secs(30);
/// How long a wait for something that must *not* come lasts.
const QUIET: Duration = Duration::from_millis(500);
/// Longest life of `lock` and `campaign`: an orphan left by a failed test
/// exits on its own.
const LIFETIME_MAX: Duration = Duration::from_secs(300);
/// etcd's error for a put naming a lease it does not have.
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

type Result<T> = std::result::Result<T, String>;

/// Checks a condition; returns the message from the enclosing function
/// when it fails.
macro_rules! check {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(format!($($what)+));
        }
    };
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_millis()
}

fn ok(what: &str) {
    println!("ok {what}");
}

fn e(context: &str) -> impl FnOnce(Error) -> String + '_ {
    move |err| format!("{context}: {err}")
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .map_err(|_| format!("{what}: no answer within {WAIT:?}"))
}

async fn connect(endpoints: &str) -> Result<Client> {
    let endpoints: Vec<&str> = endpoints.split(',').collect();
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    bounded("connect", Client::connect(&endpoints, Some(options)))
        .await?
        .map_err(e("connect"))
}

// ---------------------------------------------------------------------------
// kv-watch

async fn next(stream: &mut WatchStream, what: &str) -> Result<WatchResponse> {
    bounded(what, stream.message())
        .await?
        .map_err(e(what))?
        .ok_or_else(|| format!("{what}: the watch stream ended"))
}

/// Events as (type, key, value, prev value, mod revision) until `n` events
/// came for `watch_id`.
async fn events(
    stream: &mut WatchStream,
    watch_id: i64,
    n: usize,
    what: &str,
) -> Result<Vec<(EventType, String, String, Option<String>, i64)>> {
    let mut out = Vec::new();
    while out.len() < n {
        let resp = next(stream, what).await?;
        check!(
            !resp.canceled(),
            "{what}: watch cancelled: {:?}",
            resp.cancel_reason()
        );
        if resp.watch_id() != watch_id {
            continue;
        }
        for ev in resp.events() {
            let kv = ev
                .kv()
                .ok_or_else(|| format!("{what}: an event without kv"))?;
            out.push((
                ev.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                ev.prev_kv()
                    .map(|p| String::from_utf8_lossy(p.value()).into_owned()),
                kv.mod_revision(),
            ));
        }
    }
    check!(
        out.len() == n,
        "{what}: {} events, expected {n}: {out:?}",
        out.len()
    );
    Ok(out)
}

/// Opens a watch on its own stream; returns it with its id once created.
async fn watch(
    client: &mut Client,
    key: &str,
    options: WatchOptions,
) -> Result<(WatchStream, i64)> {
    let mut stream = bounded("watch", client.watch(key, Some(options)))
        .await?
        .map_err(e("watch"))?;
    let created = next(&mut stream, "watch created").await?;
    check!(
        created.created(),
        "the first watch response is not `created`: {created:?}"
    );
    Ok((stream, created.watch_id()))
}

async fn put(client: &mut Client, key: &str, value: &str) -> Result<i64> {
    let resp = bounded("put", client.put(key, value, None))
        .await?
        .map_err(e("put"))?;
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

async fn kv_watch(endpoints: &str) -> Result<()> {
    let mut client = connect(endpoints).await?;

    // Put, get, prev_kv, txn compare-and-set.
    put(&mut client, "cas", "1").await?;
    let resp = bounded(
        "put prev_kv",
        client.put("cas", "2", Some(PutOptions::new().with_prev_key())),
    )
    .await?
    .map_err(e("put prev_kv"))?;
    let prev = resp.prev_key().map(|kv| kv.value().to_vec());
    check!(
        prev.as_deref() == Some(&b"1"[..]),
        "put prev_kv gave {prev:?}, expected 1"
    );
    let txn = |expect: &str, new: &str| {
        Txn::new()
            .when([Compare::value("cas", CompareOp::Equal, expect)])
            .and_then([TxnOp::put("cas", new, None)])
            .or_else([TxnOp::get("cas", None)])
    };
    let won = bounded("txn", client.txn(txn("2", "3")))
        .await?
        .map_err(e("txn"))?;
    check!(won.succeeded(), "txn comparing the current value failed");
    let lost = bounded("txn", client.txn(txn("2", "4")))
        .await?
        .map_err(e("txn"))?;
    check!(!lost.succeeded(), "txn comparing a stale value succeeded");
    let got = bounded("get", client.get("cas", None))
        .await?
        .map_err(e("get"))?;
    let value: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.value()).collect();
    check!(
        value == [&b"3"[..]],
        "get after the txns: {value:?}, expected [3]"
    );
    ok("put get prev_kv txn");

    // A prefix watch from now, with prev_kv: puts and a delete in order,
    // a key outside the prefix never.
    let (mut live, live_id) = watch(
        &mut client,
        "w/",
        WatchOptions::new().with_prefix().with_prev_key(),
    )
    .await?;
    let first = put(&mut client, "w/a", "1").await?;
    put(&mut client, "w/a", "2").await?;
    put(&mut client, "x/outside", "1").await?;
    bounded("delete", client.delete("w/a", None))
        .await?
        .map_err(e("delete"))?;
    let last = put(&mut client, "w/b", "1").await?;
    let seen = events(&mut live, live_id, 4, "prefix watch from now").await?;
    let shape: Vec<_> = seen
        .iter()
        .map(|(t, k, v, p, _)| (*t, k.as_str(), v.as_str(), p.as_deref()))
        .collect();
    let expected = [
        (EventType::Put, "w/a", "1", None),
        (EventType::Put, "w/a", "2", Some("1")),
        (EventType::Delete, "w/a", "", Some("2")),
        (EventType::Put, "w/b", "1", None),
    ];
    check!(
        shape == expected,
        "prefix watch saw {shape:?}, expected {expected:?}"
    );
    let revisions: Vec<i64> = seen.iter().map(|s| s.4).collect();
    check!(
        revisions.first() == Some(&first)
            && revisions.last() == Some(&last)
            && revisions.windows(2).all(|w| w[0] < w[1]),
        "event revisions {revisions:?} not increasing from {first} to {last}"
    );
    ok("prefix watch from now with prev_kv");

    // The same history again, from a past revision.
    let (mut past, past_id) = watch(
        &mut client,
        "w/",
        WatchOptions::new().with_prefix().with_start_revision(first),
    )
    .await?;
    let replay = events(&mut past, past_id, 4, "watch from a past revision").await?;
    let replay_revisions: Vec<i64> = replay.iter().map(|s| s.4).collect();
    check!(
        replay_revisions == revisions,
        "a watch from revision {first} replayed {replay_revisions:?}, expected {revisions:?}"
    );
    ok("watch from a past revision");

    // A filter that drops puts; then cancel.
    let (mut deletes, deletes_id) = watch(
        &mut client,
        "w/",
        WatchOptions::new()
            .with_prefix()
            .with_filters([WatchFilterType::NoPut]),
    )
    .await?;
    put(&mut client, "w/c", "1").await?;
    bounded(
        "delete",
        client.delete("w/", Some(DeleteOptions::new().with_prefix())),
    )
    .await?
    .map_err(e("delete prefix"))?;
    let only = events(&mut deletes, deletes_id, 2, "watch without puts").await?;
    check!(
        only.iter().all(|s| s.0 == EventType::Delete),
        "a NoPut watch saw {only:?}"
    );
    ok("watch filter without puts");

    bounded("cancel", live.cancel(live_id))
        .await?
        .map_err(e("cancel"))?;
    loop {
        let resp = next(&mut live, "cancel").await?;
        if resp.canceled() {
            check!(
                resp.watch_id() == live_id,
                "cancelled watch {}, expected {live_id}",
                resp.watch_id()
            );
            break;
        }
    }
    put(&mut client, "w/after-cancel", "1").await?;
    match tokio::time::timeout(QUIET, live.message()).await {
        Err(_) => {}
        Ok(Ok(None)) => {}
        Ok(Ok(Some(resp))) => check!(
            resp.events().is_empty(),
            "a cancelled watch still got {:?}",
            resp.events()
        ),
        Ok(Err(err)) => return Err(format!("after cancel: {err}")),
    }
    ok("cancel");

    // Progress: a response with no events at the current revision.
    let now = put(&mut client, "x/progress", "1").await?;
    bounded("progress", past.request_progress())
        .await?
        .map_err(e("request progress"))?;
    loop {
        let resp = next(&mut past, "progress").await?;
        if resp.events().is_empty() && !resp.created() {
            let at = resp.header().map(|h| h.revision()).unwrap_or(0);
            check!(
                at >= now,
                "progress at revision {at}, the store is at {now}"
            );
            break;
        }
    }
    ok("request progress");

    // Compact, then watch from below the compaction: etcd cancels the watch
    // and says where history starts.
    let compact_at = put(&mut client, "x/compact", "1").await?;
    bounded("compact", client.compact(compact_at, None))
        .await?
        .map_err(e("compact"))?;
    let mut stream = bounded(
        "watch",
        client.watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(first)),
        ),
    )
    .await?
    .map_err(e("watch below the compaction"))?;
    loop {
        let resp = next(&mut stream, "watch below the compaction").await?;
        if resp.canceled() {
            check!(
                resp.compact_revision() == compact_at,
                "compact_revision {}, expected {compact_at}",
                resp.compact_revision()
            );
            break;
        }
        check!(
            resp.events().is_empty(),
            "a watch below the compaction got {:?}",
            resp.events()
        );
    }
    let below = client
        .get("x/compact", Some(GetOptions::new().with_revision(first)))
        .await;
    match below {
        Err(Error::GRpcStatus(s)) => check!(
            s.message().contains("required revision has been compacted"),
            "get below the compaction: {s:?}"
        ),
        other => return Err(format!("get below the compaction answered {other:?}")),
    }
    ok("compacted start");
    Ok(())
}

// ---------------------------------------------------------------------------
// lease

async fn exists(client: &mut Client, key: &str) -> Result<bool> {
    let got = bounded("get", client.get(key, None))
        .await?
        .map_err(e("get"))?;
    Ok(!got.kvs().is_empty())
}

async fn lease(endpoints: &str, ttl: i64) -> Result<()> {
    let mut client = connect(endpoints).await?;

    let granted = bounded("grant", client.lease_grant(ttl, None))
        .await?
        .map_err(e("lease grant"))?;
    let id = granted.id();
    check!(
        granted.ttl() == ttl,
        "granted TTL {}, asked {ttl}",
        granted.ttl()
    );
    client
        .put("l/a", "1", Some(PutOptions::new().with_lease(id)))
        .await
        .map_err(e("put with lease"))?;
    client
        .put("l/b", "1", Some(PutOptions::new().with_lease(id)))
        .await
        .map_err(e("put with lease"))?;
    let ttl_resp = client
        .lease_time_to_live(
            id,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .map_err(e("time to live"))?;
    let mut keys: Vec<String> = ttl_resp
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    check!(keys == ["l/a", "l/b"], "time-to-live keys {keys:?}");
    check!(
        ttl_resp.granted_ttl() == ttl && (0..=ttl).contains(&ttl_resp.ttl()),
        "time-to-live: granted {} left {}, granted {ttl}",
        ttl_resp.granted_ttl(),
        ttl_resp.ttl()
    );
    let listed = client.leases().await.map_err(e("leases"))?;
    check!(
        listed.leases().iter().any(|l| l.id() == id),
        "lease {id:x} not listed"
    );
    ok("grant attach time-to-live list");

    let (mut keeper, mut responses) = client.lease_keep_alive(id).await.map_err(e("keep alive"))?;
    keeper.keep_alive().await.map_err(e("keep alive"))?;
    let renewed = bounded("keep alive", responses.message())
        .await?
        .map_err(e("keep alive"))?
        .ok_or("the keepalive stream ended")?;
    check!(
        renewed.id() == id && renewed.ttl() == ttl,
        "keepalive answered id {:x} TTL {}",
        renewed.id(),
        renewed.ttl()
    );
    ok("keepalive");

    let revoked = client.lease_revoke(id).await.map_err(e("revoke"))?;
    let at = revoked.header().map(|h| h.revision()).unwrap_or(0);
    check!(
        !exists(&mut client, "l/a").await? && !exists(&mut client, "l/b").await?,
        "keys of a revoked lease remain"
    );
    let history = client
        .get(
            "l/",
            Some(GetOptions::new().with_prefix().with_revision(at - 1)),
        )
        .await
        .map_err(e("get before the revoke"))?;
    check!(
        history.kvs().len() == 2,
        "both keys at the revision before the revoke"
    );
    let gone = client
        .lease_time_to_live(id, None)
        .await
        .map_err(e("time to live of a revoked lease"))?;
    check!(
        gone.ttl() == -1,
        "a revoked lease's TTL is {}, etcd answers -1",
        gone.ttl()
    );
    ok("revoke");

    match client
        .put("l/c", "1", Some(PutOptions::new().with_lease(id)))
        .await
    {
        Err(Error::GRpcStatus(s)) => check!(
            s.message() == LEASE_NOT_FOUND,
            "put with a revoked lease: {s:?}"
        ),
        other => return Err(format!("put with a revoked lease answered {other:?}")),
    }
    ok("put with an unknown lease refused");

    // Expiry: a lease nobody keeps alive goes with its key after its TTL,
    // not before.
    let granted = client.lease_grant(ttl, None).await.map_err(e("grant"))?;
    let start = Instant::now();
    client
        .put(
            "l/expiring",
            "1",
            Some(PutOptions::new().with_lease(granted.id())),
        )
        .await
        .map_err(e("put with lease"))?;
    let ttl_d = Duration::from_secs(ttl as u64);
    tokio::time::sleep(ttl_d / 2).await;
    check!(
        exists(&mut client, "l/expiring").await?,
        "the key went before half its lease's TTL"
    );
    let deadline = start + ttl_d + WAIT;
    while exists(&mut client, "l/expiring").await? {
        check!(
            Instant::now() < deadline,
            "the lease did not expire within TTL + {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = start.elapsed();
    check!(
        took >= ttl_d.saturating_sub(Duration::from_millis(200)),
        "the key went {took:?} after the grant, before the TTL"
    );
    println!("expired after {} ms", took.as_millis());
    ok("expiry");
    Ok(())
}

// ---------------------------------------------------------------------------
// lock and campaign: a session lease kept alive in the background.

/// Grants a lease and renews it every third of its TTL until the process
/// ends.
async fn session(client: &mut Client, ttl: i64) -> Result<i64> {
    let id = client
        .lease_grant(ttl, None)
        .await
        .map_err(e("session lease"))?
        .id();
    let (mut keeper, mut responses) = client.lease_keep_alive(id).await.map_err(e("keep alive"))?;
    tokio::spawn(async move {
        let period = Duration::from_millis(ttl as u64 * 1000 / 3);
        loop {
            if let Err(err) = keeper.keep_alive().await {
                eprintln!("keepalive: {err}");
            } else {
                match tokio::time::timeout(WAIT, responses.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    other => eprintln!("keepalive answered {other:?}"),
                }
            }
            tokio::time::sleep(period).await;
        }
    });
    Ok(id)
}

async fn lock(endpoints: &str, name: &str, ttl: i64, hold: Duration) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let lease = session(&mut client, ttl).await?;
    println!("SESSION {lease:x} {}", now_ms());
    let locked = tokio::time::timeout(
        LIFETIME_MAX,
        client.lock(name, Some(LockOptions::new().with_lease(lease))),
    )
    .await
    .map_err(|_| format!("no lock within {LIFETIME_MAX:?}"))?
    .map_err(e("lock"))?;
    let key = String::from_utf8_lossy(locked.key()).into_owned();
    println!("LOCKED {key} {}", now_ms());
    tokio::time::sleep(hold).await;
    // Printed before the unlock is sent, so a waiter that gets the lock
    // next always prints its LOCKED after this.
    println!("UNLOCKING {key} {}", now_ms());
    bounded("unlock", client.unlock(key.clone()))
        .await?
        .map_err(e("unlock"))?;
    println!("UNLOCKED {key} {}", now_ms());
    Ok(())
}

async fn campaign(endpoints: &str, election: &str, value: &str, ttl: i64) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let lease = session(&mut client, ttl).await?;
    println!("SESSION {lease:x} {}", now_ms());
    let won = tokio::time::timeout(LIFETIME_MAX, client.campaign(election, value, lease))
        .await
        .map_err(|_| format!("not elected within {LIFETIME_MAX:?}"))?
        .map_err(e("campaign"))?;
    let leader: LeaderKey = won
        .leader()
        .cloned()
        .ok_or("campaign answered no leader key")?;
    let key = String::from_utf8_lossy(leader.key()).into_owned();
    println!("LEADER {key} {}", now_ms());
    let current = bounded("leader", client.leader(election))
        .await?
        .map_err(e("leader"))?;
    let shown = current.kv().map(|kv| kv.value().to_vec());
    check!(
        shown.as_deref() == Some(value.as_bytes()),
        "Leader answered {shown:?}, expected {value:?}"
    );
    let proclaimed = format!("{value}-proclaimed");
    bounded(
        "proclaim",
        client.proclaim(
            proclaimed.clone(),
            Some(etcd_client::ProclaimOptions::new().with_leader(leader.clone())),
        ),
    )
    .await?
    .map_err(e("proclaim"))?;
    println!("PROCLAIMED {proclaimed} {}", now_ms());
    // Leads until stdin closes (the test's signal to resign) or it is
    // killed.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(LIFETIME_MAX, async {
        use tokio::io::AsyncReadExt;
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    bounded(
        "resign",
        client.resign(Some(ResignOptions::new().with_leader(leader))),
    )
    .await?
    .map_err(e("resign"))?;
    println!("RESIGNED {}", now_ms());
    Ok(())
}

async fn observe(endpoints: &str, election: &str, count: usize) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let mut stream = bounded("observe", client.observe(election))
        .await?
        .map_err(e("observe"))?;
    let mut last: Option<Vec<u8>> = None;
    let mut seen = 0;
    while seen < count {
        let resp = tokio::time::timeout(LIFETIME_MAX, stream.message())
            .await
            .map_err(|_| format!("nothing observed within {LIFETIME_MAX:?}"))?
            .map_err(e("observe"))?
            .ok_or("the observe stream ended")?;
        let Some(kv) = resp.kv() else { continue };
        if last.as_deref() != Some(kv.value()) {
            last = Some(kv.value().to_vec());
            seen += 1;
            println!(
                "OBSERVED {} {}",
                String::from_utf8_lossy(kv.value()),
                now_ms()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn usage() -> String {
    "usage: etcd-client-check kv-watch ENDPOINTS | lease ENDPOINTS TTL_S | \
     lock ENDPOINTS NAME SESSION_TTL_S HOLD_MS | \
     campaign ENDPOINTS ELECTION VALUE SESSION_TTL_S | observe ENDPOINTS ELECTION COUNT"
        .into()
}

fn number<T: std::str::FromStr>(arg: &str, what: &str) -> Result<T> {
    arg.parse()
        .map_err(|_| format!("{what} must be a number, got {arg:?}"))
}

async fn run(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["kv-watch", endpoints] => kv_watch(endpoints).await,
        ["lease", endpoints, ttl] => lease(endpoints, number(ttl, "TTL_S")?).await,
        ["lock", endpoints, name, ttl, hold] => {
            let hold = Duration::from_millis(number(hold, "HOLD_MS")?);
            lock(endpoints, name, number(ttl, "SESSION_TTL_S")?, hold).await
        }
        ["campaign", endpoints, election, value, ttl] => {
            campaign(endpoints, election, value, number(ttl, "SESSION_TTL_S")?).await
        }
        ["observe", endpoints, election, count] => {
            observe(endpoints, election, number(count, "COUNT")?).await
        }
        _ => Err(usage()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "etcd-client-check {}: {err}",
                args.first().map_or("", String::as_str)
            );
            ExitCode::from(1)
        }
    }
}
