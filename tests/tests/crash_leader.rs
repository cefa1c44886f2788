//! SIGKILL the leader of a 3-node cluster under write load: a new leader
//! takes over, the writers carry on against the survivors, the killed node
//! comes back from its WAL and catches up, and every write a client saw
//! acknowledged is readable, with its value, on every member.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_tests::client::{key_str, value_str, Client, GetOptions};
use skiff_tests::{connect, poll_until, Cluster, ClusterOptions, NodeId};

const WRITERS: usize = 4;
/// Acknowledged writes wanted in each phase (before the kill, under the
/// new leader, after the restart).
const ACKS_PER_PHASE: usize = 250;
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the writers saw: every put attempted, and those acknowledged.
#[derive(Default, Clone)]
struct Ledger {
    attempted: BTreeMap<String, String>,
    acked: Vec<(String, String)>,
    errors: usize,
}

/// Puts `w<writer>/<seq>` keys, one at a time, on one member until an
/// error, then moves on to the next member. Never reuses a key.
async fn writer(
    w: usize,
    endpoints: Vec<String>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let mut clients: Vec<Client> = Vec::new();
    for e in &endpoints {
        clients.push(connect(std::slice::from_ref(e)).await);
    }
    let mut at = w % clients.len();
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let key = format!("w{w}/{seq:08}");
        let value = format!("value-{w}-{seq}");
        seq += 1;
        ledger
            .lock()
            .unwrap()
            .attempted
            .insert(key.clone(), value.clone());
        match clients[at].put(key.clone(), value.clone(), None).await {
            Ok(_) => ledger.lock().unwrap().acked.push((key, value)),
            Err(_) => {
                ledger.lock().unwrap().errors += 1;
                at = (at + 1) % clients.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn acked(ledger: &Mutex<Ledger>) -> usize {
    ledger.lock().unwrap().acked.len()
}

async fn wait_acks(ledger: &Mutex<Ledger>, target: usize, what: &str) {
    poll_until(
        &format!("{target} acknowledged writes ({what})"),
        PHASE_TIMEOUT,
        || async { (acked(ledger) >= target).then_some(()) },
    )
    .await;
}

/// Every `w*` key on `id`, by a linearizable range read there.
async fn contents(cluster: &Cluster, id: NodeId) -> BTreeMap<String, String> {
    let mut client = cluster.client(id).await;
    let r = client
        .get("w", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_or_else(|e| panic!("range read on member {id}: {e}"));
    r.kvs
        .iter()
        .map(|kv| (key_str(kv).to_string(), value_str(kv).to_string()))
        .collect()
}

/// The `entries=` and `base=` of the latest "recovered" log line.
fn recovered_counts(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains(" recovered"))?;
    let field = |name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((field("entries")?, field("base")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_crash() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let (old_leader, old_term) = cluster.wait_leader(LEADER_TIMEOUT).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, cluster.endpoints(), ledger.clone(), stop.clone())))
        .collect();

    wait_acks(&ledger, ACKS_PER_PHASE, "before the crash").await;
    cluster.kill(old_leader);
    let acked_at_kill = acked(&ledger);
    eprintln!("killed leader {old_leader} (term {old_term}) after {acked_at_kill} acks");

    let (new_leader, new_term) = cluster.wait_leader(LEADER_TIMEOUT).await;
    assert_ne!(new_leader, old_leader);
    assert!(new_term > old_term, "term {new_term} after {old_term}");
    let acked_at_election = acked(&ledger);
    wait_acks(
        &ledger,
        acked_at_election + ACKS_PER_PHASE,
        "under the new leader",
    )
    .await;

    cluster.restart(old_leader);
    let acked_at_restart = acked(&ledger);
    wait_acks(
        &ledger,
        acked_at_restart + ACKS_PER_PHASE,
        "after the restart",
    )
    .await;
    stop.store(true, Ordering::Release);
    for w in writers {
        w.await.expect("writer task");
    }

    // The restarted member replayed its WAL: it came back with the entries
    // it had made durable before the kill (or a snapshot of them).
    let log = cluster.log_since_start(old_leader);
    let (entries, base) = recovered_counts(&log)
        .unwrap_or_else(|| panic!("no \"recovered\" line in member {old_leader}'s log:\n{log}"));
    assert!(
        entries + base > 0,
        "member {old_leader} recovered nothing (entries={entries} base={base})"
    );

    // Everyone catches up with the leader's commit index...
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let commit = cluster
        .status(leader)
        .await
        .expect("leader status")
        .raft_index;
    for id in cluster.ids() {
        cluster.wait_applied(id, commit, CATCH_UP_TIMEOUT).await;
    }

    // ... and serves every acknowledged write, and nothing never attempted.
    // Members agree on the writes whose fate the writers did not learn too
    // (a put that timed out at the client may still commit a little later).
    let deadline = std::time::Instant::now() + CATCH_UP_TIMEOUT;
    let stored = loop {
        let mut all = Vec::new();
        for id in cluster.ids() {
            all.push(contents(&cluster, id).await);
        }
        if all.windows(2).all(|w| w[0] == w[1]) {
            break all.remove(0);
        }
        if std::time::Instant::now() >= deadline {
            let diff = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
                a.iter()
                    .filter(|(k, v)| b.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .take(10)
                    .collect::<Vec<_>>()
            };
            panic!(
                "members still differ after {CATCH_UP_TIMEOUT:?}: sizes {:?}; \
                 on member 1 not elsewhere: {:?} / {:?}; on 2 or 3 not on 1: {:?} / {:?}",
                all.iter().map(BTreeMap::len).collect::<Vec<_>>(),
                diff(&all[0], &all[1]),
                diff(&all[0], &all[2]),
                diff(&all[1], &all[0]),
                diff(&all[2], &all[0]),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ledger = ledger.lock().unwrap().clone();
    eprintln!(
        "{} writes attempted, {} acknowledged, {} errors; acks at kill {acked_at_kill}, \
         at election {acked_at_election}, at restart {acked_at_restart}",
        ledger.attempted.len(),
        ledger.acked.len(),
        ledger.errors
    );
    for (key, value) in &ledger.acked {
        assert_eq!(
            stored.get(key),
            Some(value),
            "acknowledged write {key} lost or changed"
        );
    }
    for (key, value) in &stored {
        assert_eq!(
            ledger.attempted.get(key),
            Some(value),
            "{key} was never written with this value"
        );
    }
    let mut client = cluster.client(old_leader).await;
    let (key, value) = &ledger.acked[0];
    let r = client.get(key.as_str(), None).await.expect("get");
    assert_eq!(value_str(&r.kvs[0]), value);
}
