//! Snapshots (§7): compaction after a snapshot, a lagging follower brought
//! on by one, and restarts from a snapshot.

mod common;

use common::{cmd, Cluster};
use skiff_raft::{Action, ProgressState};

fn cmds(prefix: &str, n: usize) -> Vec<bytes::Bytes> {
    (0..n).map(|i| cmd(&format!("{prefix}{i}"))).collect()
}

/// Node 1 leads; 3 is cut off while 1 commits `a0..a30` and snapshots
/// them. Returns the snapshot's index (3 stays cut off).
fn leave_3_behind_a_snapshot(c: &mut Cluster) -> u64 {
    c.elect(1);
    c.deliver_all();
    c.isolate(3);
    for i in 0..30 {
        c.propose(1, &[&format!("a{i}")]);
    }
    c.deliver_all();
    c.tick_all(1);
    c.take_snapshot(1);
    c.raft(1).log().base().0
}

/// The leader compacts after a snapshot; a follower that missed the
/// compacted entries gets the snapshot, restores from it, and then follows
/// with entries again.
#[test]
fn s7_lagging_follower_catches_up_by_snapshot() {
    let mut c = Cluster::new(3);
    let base = leave_3_behind_a_snapshot(&mut c);
    assert!(base > 25, "compacted through {base}");
    assert_eq!(c.raft(1).log().first_index(), base + 1);
    assert!(c.raft(1).log().entry(1).is_none());
    c.heal();
    c.tick_all(6);
    assert_eq!(c.raft(3).log().base().0, base, "installed the snapshot");
    assert_eq!(c.applied_cmds(3), cmds("a", 30));
    assert_eq!(
        c.raft(1).progress(3).unwrap().state,
        ProgressState::Replicate
    );
    c.propose(1, &["after"]);
    c.deliver_all();
    c.tick_all(2);
    let mut want = cmds("a", 30);
    want.push(cmd("after"));
    assert_eq!(c.applied_cmds(3), want);
    // The follower restarts from its installed snapshot and its log.
    c.restart(3);
    c.tick_all(3);
    assert_eq!(c.applied_cmds(3), want);
}

/// Compaction is reported to the host, never beyond what was applied.
#[test]
fn snapshot_taken_asks_the_host_to_compact() {
    let mut c = Cluster::new(1);
    c.elect(1);
    c.propose(1, &["x", "y"]);
    let applied = c.raft(1).log().applied();
    let node = c.nodes.get_mut(&1).unwrap();
    node.raft.snapshot_taken(applied);
    let actions = node.raft.take_actions();
    assert_eq!(
        actions,
        vec![Action::Compact {
            upto: applied,
            membership: skiff_raft::Membership::with_voters([1]),
        }]
    );
    // Taking the same snapshot again asks for nothing.
    node.raft.snapshot_taken(applied);
    assert_eq!(node.raft.take_actions(), vec![]);
}

/// A snapshot the follower already covers changes nothing but is
/// acknowledged, and a snapshot whose last entry it holds keeps its log.
#[test]
fn stale_or_contained_snapshots_keep_the_log() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, &["a", "b", "c"]);
    c.deliver_all();
    c.tick_all(2);
    let last = c.raft(2).last_index();
    let term = c.raft(2).term();
    let commit = c.raft(2).commit();
    let node = c.nodes.get_mut(&2).unwrap();
    node.raft.step(skiff_raft::Message {
        from: 1,
        to: 2,
        term,
        body: skiff_raft::MessageBody::InstallSnapshot {
            index: commit.min(2),
            snapshot_term: term,
            membership: skiff_raft::Membership::with_voters([1, 2, 3]),
            data: bytes::Bytes::new(),
        },
    });
    let actions = node.raft.take_actions();
    assert!(actions
        .iter()
        .all(|a| !matches!(a, Action::InstallSnapshot { .. })));
    assert_eq!(c.raft(2).last_index(), last);
}

/// A snapshot lost on its way (the host's transfer failed without saying
/// so) is sent again once `snapshot_timeout_ticks` pass unanswered: the
/// follower's refusals of the leader's probes meanwhile do not end the
/// Snapshot state.
#[test]
fn a_lost_snapshot_is_sent_again_after_the_timeout() {
    let mut c = Cluster::with_config(3, |cfg| cfg.snapshot_timeout_ticks = 60);
    let base = leave_3_behind_a_snapshot(&mut c);
    c.heal();
    // Every snapshot sent to 3 in the next few ticks is lost.
    let mut lost = 0;
    for _ in 0..6 {
        for id in [1, 2, 3] {
            c.tick(id);
        }
        loop {
            let before = c.net.len();
            c.net.retain(|m| {
                !(m.to == 3 && matches!(m.body, skiff_raft::MessageBody::InstallSnapshot { .. }))
            });
            lost += before - c.net.len();
            if !c.deliver_one() {
                break;
            }
        }
    }
    assert!(lost > 0, "the leader sent 3 a snapshot");
    assert_eq!(
        c.raft(1).progress(3).unwrap().state,
        ProgressState::Snapshot
    );
    assert!(c.raft(3).log().base().0 < base, "3 has not installed it");
    // Without losses, the timeout sends it again and 3 catches up.
    c.tick_all(70);
    assert_eq!(c.raft(3).log().base().0, base, "installed the snapshot");
    assert_eq!(c.applied_cmds(3), cmds("a", 30));
}

/// A follower installed the snapshot but its answer was lost: the leader,
/// still in the Snapshot state for it, probes with an empty append at the
/// snapshot's index on a heartbeat answer, and streams on from there,
/// long before `snapshot_timeout_ticks` would send the snapshot again.
#[test]
fn a_lost_snapshot_answer_is_recovered_by_a_probe() {
    let mut c = Cluster::with_config(3, |cfg| cfg.snapshot_timeout_ticks = 60);
    let base = leave_3_behind_a_snapshot(&mut c);
    c.heal();
    let answer = |m: &skiff_raft::Message| {
        m.from == 3 && m.to == 1 && matches!(m.body, skiff_raft::MessageBody::AppendResponse { .. })
    };
    for _ in 0..20 {
        if c.raft(3).log().base().0 == base {
            break;
        }
        for id in [1, 2, 3] {
            c.tick(id);
        }
        loop {
            c.net.retain(|m| !answer(m));
            if !c.deliver_one() {
                break;
            }
        }
    }
    assert_eq!(c.raft(3).log().base().0, base, "3 installed the snapshot");
    assert_eq!(
        c.raft(1).progress(3).unwrap().state,
        ProgressState::Snapshot,
        "1 never heard so"
    );
    c.tick_all(10);
    assert_eq!(
        c.raft(1).progress(3).unwrap().state,
        ProgressState::Replicate
    );
    c.propose(1, &["after"]);
    c.deliver_all();
    let mut want = cmds("a", 30);
    want.push(cmd("after"));
    assert_eq!(c.applied_cmds(3), want);
}
