//! Membership changes (thesis ch. 4): learners, single-server changes with
//! the new-leader guard, joint consensus, and a removed leader stepping
//! down.

mod common;

use std::collections::BTreeSet;

use common::{cmd, Cluster};
use skiff_raft::{Membership, MembershipChange, ProposeError, Role};

fn change(c: &mut Cluster, id: u64, ch: MembershipChange) -> Result<u64, ProposeError> {
    let r = c.nodes.get_mut(&id).unwrap().raft.propose_membership(ch);
    c.drain(id);
    r
}

fn set(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

/// A learner receives and applies the log but never counts toward a
/// quorum; promoted, it does.
#[test]
fn learner_follows_without_voting_then_is_promoted() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.add_node(4);
    change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    c.propose(1, &["a"]);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.applied_cmds(4), vec![cmd("a")]);
    assert_eq!(c.raft(4).membership().learners, set(&[4]));
    // 1 and the learner alone are no quorum.
    c.isolate(2);
    c.isolate(3);
    let before = c.raft(1).commit();
    c.propose(1, &["b"]);
    c.deliver_all();
    assert_eq!(c.raft(1).commit(), before);
    c.heal();
    c.tick_all(3);
    change(&mut c, 1, MembershipChange::AddVoter(4)).unwrap();
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.raft(1).membership().voters, set(&[1, 2, 3, 4]));
    assert!(c.raft(4).membership().learners.is_empty());
    // Now 1, 4 and one more are needed: 1 + 4 alone still cannot commit,
    // but 1 + 2 + 4 can.
    c.isolate(3);
    c.propose(1, &["c"]);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.applied_cmds(4).last(), Some(&cmd("c")));
}

/// The single-server change guard: a new leader must commit an entry of
/// its own term first, and only one change is in flight at a time.
#[test]
fn one_change_at_a_time_and_only_after_the_leaders_first_commit() {
    let mut c = Cluster::new(3);
    for _ in 0..30 {
        c.tick(1);
        if c.raft(1).role() == Role::Leader {
            break;
        }
        while c.raft(1).role() != Role::Leader && c.deliver_one() {}
    }
    assert_eq!(c.raft(1).role(), Role::Leader);
    assert_eq!(
        change(&mut c, 1, MembershipChange::AddLearner(4)),
        Err(ProposeError::LeaderNotReady)
    );
    c.deliver_all();
    let index = change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    assert_eq!(
        change(&mut c, 1, MembershipChange::AddLearner(5)),
        Err(ProposeError::ChangePending { index })
    );
    assert!(matches!(
        change(&mut c, 2, MembershipChange::AddLearner(5)),
        Err(ProposeError::NotLeader { .. })
    ));
    c.deliver_all();
    c.tick_all(2);
    change(&mut c, 1, MembershipChange::AddLearner(5)).unwrap();
    for bad in [
        MembershipChange::AddLearner(5),
        MembershipChange::Remove(9),
        MembershipChange::AddVoter(2),
    ] {
        c.deliver_all();
        c.tick_all(2);
        assert!(matches!(
            change(&mut c, 1, bad),
            Err(ProposeError::InvalidChange(_))
        ));
    }
}

/// Joint consensus: {1,2,3} -> {1,4,5}. While joint, commits need a
/// majority of both; the leader leaves the joint configuration itself.
#[test]
fn joint_consensus_replaces_a_majority() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.add_node(4);
    c.add_node(5);
    // New voters must not be needed for the old majority: block 4 and 5
    // first, so that the joint entry cannot commit without them.
    c.isolate(4);
    c.isolate(5);
    change(
        &mut c,
        1,
        MembershipChange::Joint {
            voters: set(&[1, 4, 5]),
            learners: BTreeSet::new(),
        },
    )
    .unwrap();
    c.deliver_all();
    c.tick_all(2);
    let m = c.raft(1).membership().clone();
    assert!(m.is_joint(), "still joint: {m:?}");
    let joint_commit = c.raft(1).commit();
    c.propose(1, &["x"]);
    c.deliver_all();
    assert_eq!(
        c.raft(1).commit(),
        joint_commit,
        "old majority alone is not enough"
    );
    c.heal();
    c.tick_all(6);
    assert_eq!(*c.raft(1).membership(), Membership::with_voters([1, 4, 5]));
    assert_eq!(*c.raft(4).membership(), Membership::with_voters([1, 4, 5]));
    assert_eq!(c.applied_cmds(5), vec![cmd("x")]);
    // The old members are gone: 1, 4, 5 decide alone.
    c.isolate(2);
    c.isolate(3);
    c.propose(1, &["y"]);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.applied_cmds(4).last(), Some(&cmd("y")));
}

/// A leader that removes itself steps down once the change commits; the
/// rest elect a leader and it never campaigns again.
#[test]
fn removed_leader_steps_down() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    change(&mut c, 1, MembershipChange::Remove(1)).unwrap();
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.raft(1).role(), Role::Follower);
    assert!(!c.raft(1).membership().is_voter(1));
    c.tick_all(40);
    let leaders = c.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 1);
    c.propose(leaders[0], &["after"]);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.applied_cmds(2).last(), Some(&cmd("after")));
}

/// A change is in force as soon as it is in the log, and reverted when a
/// new leader truncates it away.
#[test]
fn truncated_change_is_reverted() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.isolate(1);
    change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    assert_eq!(c.raft(1).membership().learners, set(&[4]));
    c.expire_leases(&[2, 3]);
    c.elect(2);
    c.propose(2, &["z"]);
    c.deliver_all();
    c.heal();
    c.tick_all(6);
    assert_eq!(c.raft(1).role(), Role::Follower);
    assert_eq!(*c.raft(1).membership(), Membership::with_voters([1, 2, 3]));
}

/// A node joining after compaction gets the membership with the snapshot.
#[test]
fn snapshot_carries_the_membership() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.add_node(4);
    change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    c.isolate(4);
    for i in 0..10 {
        c.propose(1, &[&format!("p{i}")]);
    }
    c.deliver_all();
    c.tick_all(2);
    c.take_snapshot(1);
    c.heal();
    c.tick_all(6);
    assert_eq!(c.raft(4).membership().learners, set(&[4]));
    assert_eq!(c.applied_cmds(4).len(), 10);
}
