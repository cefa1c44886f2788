//! Membership changes (thesis ch. 4): learners, single-server changes with
//! the new-leader guard, joint consensus, and a removed leader stepping
//! down.

mod common;

use std::collections::BTreeSet;

use common::{cmd, Cluster};
use skiff_raft::{Membership, MembershipChange, Message, MessageBody, ProposeError, Role};

fn change(c: &mut Cluster, id: u64, ch: MembershipChange) -> Result<u64, ProposeError> {
    let r = c.nodes.get_mut(&id).unwrap().raft.propose_membership(ch);
    c.drain(id);
    r
}

fn change_with(
    c: &mut Cluster,
    id: u64,
    ch: MembershipChange,
    meta: Option<bytes::Bytes>,
) -> Result<u64, ProposeError> {
    let r = c
        .nodes
        .get_mut(&id)
        .unwrap()
        .raft
        .propose_membership_with(ch, meta);
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

/// The removed leader hands over at once: the most caught-up remaining
/// voter campaigns as soon as the removal commits, without waiting out an
/// election timeout.
#[test]
fn removed_leader_hands_over_at_once() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    change(&mut c, 1, MembershipChange::Remove(1)).unwrap();
    for _ in 0..4 {
        c.deliver_all();
        c.tick_all(1);
    }
    c.deliver_all();
    let leaders = c.leaders();
    assert_eq!(leaders.len(), 1, "a new leader within 4 ticks");
    assert_ne!(leaders[0], 1);
}

/// The leader whose removal commits first sends the new commit index to
/// the remaining voters, then `TimeoutNow` to the most caught-up of them,
/// and steps down: they learn that the change committed from it, and elect
/// a leader without a single tick.
#[test]
fn removed_leader_sends_its_commit_before_timeout_now() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let index = change(&mut c, 1, MembershipChange::Remove(1)).unwrap();
    // Deliver one message at a time until 1 steps down; keep what it sent
    // in that step.
    let mut last_words = Vec::new();
    while c.raft(1).role() == Role::Leader {
        let before = c.net.len();
        assert!(c.deliver_one(), "the removal never committed");
        if c.raft(1).role() != Role::Leader {
            last_words = c.net.iter().skip(before - 1).cloned().collect();
        }
    }
    assert_eq!(c.raft(1).commit(), index);
    let carries_commit = |m: &Message| match m.body {
        MessageBody::Heartbeat { commit, .. } | MessageBody::Append { commit, .. } => {
            commit >= index
        }
        _ => false,
    };
    let timeout_now = last_words
        .iter()
        .position(|m| m.body == MessageBody::TimeoutNow)
        .expect("a TimeoutNow");
    let successor = last_words[timeout_now].to;
    for peer in [2, 3] {
        let commit_at = last_words
            .iter()
            .position(|m| m.from == 1 && m.to == peer && carries_commit(m))
            .unwrap_or_else(|| panic!("no commit for {peer} in {last_words:?}"));
        if peer == successor {
            assert!(commit_at < timeout_now, "the commit goes first");
        }
    }
    // No tick: the successor campaigns on TimeoutNow and wins.
    c.deliver_all();
    assert_eq!(c.leaders(), vec![successor]);
    assert!(c.raft(2).commit() >= index && c.raft(3).commit() >= index);
}

/// Meta rides with the membership: set by the change that adds or updates
/// a member, kept by changes that do not name it, dropped with the member.
#[test]
fn member_meta_is_replicated_and_dropped_with_the_member() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.tick_all(2);
    let meta = bytes::Bytes::from_static(b"addr-of-1");
    change_with(&mut c, 1, MembershipChange::Update(1), Some(meta.clone())).unwrap();
    c.deliver_all();
    c.tick_all(2);
    c.deliver_all();
    for id in 1..=3 {
        assert_eq!(c.raft(id).membership().meta.get(&1), Some(&meta), "on {id}");
    }
    // Update needs meta; Remove cannot carry it.
    assert!(change_with(&mut c, 1, MembershipChange::Update(2), None).is_err());
    assert!(change_with(&mut c, 1, MembershipChange::Remove(2), Some(meta.clone())).is_err());
    change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    c.deliver_all();
    c.tick_all(2);
    c.deliver_all();
    assert_eq!(c.raft(2).membership().meta.get(&1), Some(&meta), "kept");
    change(&mut c, 1, MembershipChange::Remove(1)).unwrap();
    c.deliver_all();
    c.tick_all(2);
    c.deliver_all();
    for id in 2..=3 {
        assert!(c.raft(id).membership().meta.is_empty(), "dropped on {id}");
    }
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

/// Leaves a joint configuration with its leave entry delivered to `only`:
/// proposes `Joint { voters, learners }` on leader 1, lets it commit, and
/// cuts the leader's links to every other node the moment it appends the
/// entry that leaves the joint configuration (so only `only` receives it).
fn leave_joint_seen_only_by(c: &mut Cluster, voters: &[u64], learners: &[u64], only: u64) {
    change(
        c,
        1,
        MembershipChange::Joint {
            voters: set(voters),
            learners: set(learners),
        },
    )
    .unwrap();
    while c.raft(1).membership().is_joint() {
        assert!(c.deliver_one(), "the joint configuration never committed");
    }

    let others: Vec<u64> = c.nodes.keys().copied().filter(|&id| id != 1).collect();
    for id in others {
        if id != only {
            c.cut.insert((1, id));
        }
    }
    c.deliver_all();
}

/// A node demoted by the latest, still uncommitted, configuration is a
/// voter of the one before, and may be the only node that can be elected:
/// here {1,2,3} -> joint -> {1,2,4} with 3 a learner, the entry leaving the
/// joint configuration reached only 3, and the leader died. 2 and 4 need
/// 3's vote (in the joint configuration), and 3 refuses them (its log is
/// longer): 3 must campaign, and win in {1,2,4}.
#[test]
fn node_excluded_by_an_uncommitted_change_still_campaigns() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.add_node(4);
    leave_joint_seen_only_by(&mut c, &[1, 2, 4], &[3], 3);
    let m3 = c.raft(3).membership().clone();
    assert_eq!(m3.voters, set(&[1, 2, 4]));
    assert!(!m3.is_joint() && m3.learners == set(&[3]));
    let leave = c.raft(3).last_index();
    assert!(c.raft(3).commit() < leave, "uncommitted at 3");
    assert!(c.raft(3).can_campaign(), "3 votes in the joint config");
    assert!(c.raft(2).membership().is_joint());
    // The leader dies.
    c.isolate(1);
    let mut leaders = Vec::new();
    'outer: for _ in 0..200 {
        for id in [2, 3, 4] {
            c.tick(id);
        }
        loop {
            for id in [2, 3, 4] {
                if c.raft(id).role() == Role::Leader && leaders.last() != Some(&id) {
                    leaders.push(id);
                }
            }
            if [2, 4].iter().any(|&id| c.raft(id).role() == Role::Leader) {
                break 'outer;
            }
            if !c.deliver_one() {
                break;
            }
        }
    }
    assert_eq!(leaders.first(), Some(&3), "3 is elected first: {leaders:?}");
    // 3 commits the change that removes it, steps down, never campaigns
    // again; 2 or 4 takes over in {1,2,4}.
    let leader = *leaders.last().unwrap();
    assert!(leader == 2 || leader == 4, "{leaders:?}");
    assert_eq!(*c.raft(leader).membership(), m3);
    assert!(!c.raft(3).can_campaign());
    c.propose(leader, &["after"]);
    c.tick_all(3);
    assert!(c.raft(leader).commit() > leave);
    assert_eq!(c.applied_cmds(4).last(), Some(&cmd("after")));
}

/// A transfer to a node that stops being a voter is cancelled: here the
/// target is an outgoing voter of a joint configuration that the leader
/// leaves while the transfer waits for it to catch up. A TimeoutNow that
/// reaches a node that may not campaign is ignored.
#[test]
fn transfer_to_a_demoted_voter_is_cancelled_and_timeout_now_ignored() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.add_node(4);
    // 3 lags: the transfer waits for it.
    c.cut.insert((1, 3));
    change(
        &mut c,
        1,
        MembershipChange::Joint {
            voters: set(&[1, 2, 4]),
            learners: set(&[3]),
        },
    )
    .unwrap();
    c.start_transfer(1, 3);
    assert_eq!(c.raft(1).transferee(), Some(3));
    // The joint configuration commits (1, 2 and 4) and the leader leaves
    // it: 3 is a learner now.
    c.deliver_all();
    c.tick_all(2);
    let m = c.raft(1).membership().clone();
    assert!(!m.is_joint() && !m.is_voter(3), "{m:?}");
    assert_eq!(c.raft(1).transferee(), None);
    c.propose(1, &["not transferring"]);
    // 3 catches up; a TimeoutNow (say, sent before the demotion) changes
    // nothing there.
    c.heal();
    c.tick_all(4);
    assert_eq!(*c.raft(3).membership(), m);
    assert!(!c.raft(3).can_campaign());
    let term = c.raft(3).term();
    let node = c.nodes.get_mut(&3).unwrap();
    node.raft.step(skiff_raft::Message {
        from: 1,
        to: 3,
        term,
        body: skiff_raft::MessageBody::TimeoutNow,
    });
    assert_eq!(node.raft.role(), Role::Follower);
    assert_eq!(node.raft.term(), term);
    assert!(node.raft.take_actions().is_empty());
    assert_eq!(c.raft(1).role(), Role::Leader);
}

/// A node that joined knowing no membership learns it from the log; a
/// snapshot through entries it received before any membership entry has
/// no known membership, so the log is not compacted there (a restart from
/// such a snapshot would have no voters). Past the membership entry it is.
#[test]
fn joining_node_compacts_only_where_it_knows_the_membership() {
    let mut c = Cluster::with_config(3, |cfg| cfg.batch_bytes_max = 1);
    c.elect(1);
    c.propose(1, &["a", "b", "c", "d"]);
    c.deliver_all();
    c.tick_all(2);
    c.add_node(4);
    let index = change(&mut c, 1, MembershipChange::AddLearner(4)).unwrap();
    // One entry per message: 4 applies entries before the change's.
    let mut before_change = None;
    for _ in 0..10_000 {
        if !c.deliver_one() {
            c.tick_all(1);
        }
        let r = c.raft(4);
        let applied = r.log().applied();
        if before_change.is_none() && applied > 0 && applied < index {
            before_change = Some(applied);
            assert!(r.membership().voters.is_empty());
            c.take_snapshot(4);
            assert_eq!(c.raft(4).log().base().0, 0, "not compacted");
            assert_eq!(c.nodes[&4].durable_base.0, 0);
        }
        if c.raft(4).log().applied() >= index {
            break;
        }
    }
    assert!(
        before_change.is_some(),
        "4 applied nothing before the change"
    );
    assert!(c.raft(4).log().applied() >= index);
    // Past the change: compacted, with the membership in force there.
    c.take_snapshot(4);
    let applied = c.raft(4).log().applied();
    assert_eq!(c.raft(4).log().base().0, applied);
    let node = &c.nodes[&4];
    assert_eq!(node.durable_base.0, applied);
    assert_eq!(node.snapshot.as_ref().unwrap().2.learners, set(&[4]));
    c.restart(4);
    assert_eq!(c.raft(4).membership().learners, set(&[4]));
    assert_eq!(
        c.raft(4).membership().voters,
        set(&[1, 2, 3]),
        "restarted from the compacted snapshot"
    );
}
