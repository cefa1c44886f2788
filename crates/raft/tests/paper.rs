//! Tests named after the sections of the Raft paper (Ongaro & Ousterhout,
//! "In Search of an Understandable Consensus Algorithm") and the thesis.

mod common;

use common::{cmd, Cluster};
use skiff_raft::{MessageBody, Payload, ProposeError, Role};

/// §5.2: a follower that hears nothing campaigns; one leader wins, and the
/// others follow it in its term.
#[test]
fn s5_2_election_elects_exactly_one_leader() {
    let mut c = Cluster::new(3);
    c.tick_all(25);
    let leaders = c.leaders();
    assert_eq!(leaders.len(), 1, "one leader: {leaders:?}");
    let l = leaders[0];
    let term = c.raft(l).term();
    for id in 1..=3 {
        assert_eq!(c.raft(id).term(), term);
        assert_eq!(c.raft(id).leader(), Some(l));
    }
}

/// §5.2: each node votes for at most one candidate per term, and the vote
/// survives a restart (it was persisted before the answer left).
#[test]
fn s5_2_vote_once_per_term_and_durably() {
    let mut c = Cluster::new(3);
    c.elect(1);
    let term = c.raft(1).term();
    for id in 2..=3 {
        assert_eq!(c.raft(id).vote(), 1);
        assert_eq!(c.nodes[&id].durable_hs.vote, 1, "vote persisted");
        assert_eq!(c.nodes[&id].durable_hs.term, term);
        c.restart(id);
        assert_eq!((c.raft(id).term(), c.raft(id).vote()), (term, 1));
    }
}

/// §5.2 with pre-vote (thesis §9.6): a partitioned node does not inflate its
/// term, so rejoining does not depose a healthy leader.
#[test]
fn s9_6_prevote_keeps_a_rejoining_node_from_disrupting() {
    let mut c = Cluster::new(3);
    c.elect(1);
    let term = c.raft(1).term();
    c.isolate(3);
    for _ in 0..100 {
        c.tick(3);
        c.deliver_all();
        c.tick(1);
        c.tick(2);
        c.deliver_all();
    }
    assert_eq!(c.raft(3).term(), term, "pre-vote never raised the term");
    c.heal();
    c.tick_all(30);
    assert_eq!(c.leaders(), vec![1]);
    assert_eq!(c.raft(1).term(), term);
}

/// §5.4.1: a candidate whose log is behind cannot win.
#[test]
fn s5_4_1_election_restriction() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.isolate(3);
    c.propose(1, &["a", "b"]);
    c.deliver_all();
    c.tick_all(1);
    assert!(c.raft(2).last_index() > c.raft(3).last_index());
    c.heal();
    // 1 goes away; 3 (behind) campaigns first but 2 refuses it.
    c.isolate(1);
    for _ in 0..40 {
        c.tick(3);
        c.deliver_all();
    }
    assert_ne!(c.raft(3).role(), Role::Leader);
    c.elect(2);
    assert_eq!(c.raft(2).role(), Role::Leader);
}

/// §5.3: proposals are replicated, committed and applied on every node, in
/// order.
#[test]
fn s5_3_log_replication_commits_and_applies_everywhere() {
    let mut c = Cluster::new(5);
    c.elect(1);
    for i in 0..20 {
        c.propose(1, &[&format!("x{i}"), &format!("y{i}")]);
    }
    c.deliver_all();
    c.tick_all(3);
    let expect: Vec<_> = (0..20)
        .flat_map(|i| [cmd(&format!("x{i}")), cmd(&format!("y{i}"))])
        .collect();
    for id in 1..=5 {
        assert_eq!(c.applied_cmds(id), expect, "node {id}");
        assert_eq!(c.raft(id).commit(), c.raft(1).last_index());
    }
}

/// §5.3: a follower's conflicting suffix is replaced by the leader's, and
/// the conflict hint finds the divergence point in few round trips.
#[test]
fn s5_3_conflicting_entries_are_overwritten_with_few_round_trips() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, &["base"]);
    c.deliver_all();
    // 1 keeps appending alone (uncommitted), then loses leadership.
    c.isolate(1);
    for i in 0..50 {
        c.propose(1, &[&format!("lost{i}")]);
    }
    c.expire_leases(&[2, 3]);
    c.elect(2);
    for i in 0..50 {
        c.propose(2, &[&format!("kept{i}")]);
    }
    c.deliver_all();
    c.heal();
    let before = c.delivered;
    c.tick_all(4);
    let trips = c.delivered - before;
    assert_eq!(c.raft(1).role(), Role::Follower);
    assert_eq!(c.raft(1).last_index(), c.raft(2).last_index());
    let applied = c.applied_cmds(1);
    assert!(
        applied.iter().all(|b| !b.starts_with(b"lost")),
        "lost entries never apply"
    );
    assert_eq!(applied.len(), 51);
    assert!(trips < 60, "fast back-off: {trips} messages");
}

/// §5.4.2 (Figure 8): a leader never commits an entry of an earlier term by
/// counting replicas; it commits it only with an entry of its own term.
#[test]
fn s5_4_2_leader_commits_only_entries_of_its_own_term() {
    // One entry per message, so that an earlier-term entry can reach a
    // majority before the new leader's own entry does.
    let mut c = Cluster::with_config(3, |cfg| cfg.batch_bytes_max = 1);
    c.elect(1);
    c.deliver_all();
    let t1 = c.raft(1).term();
    // An entry of term t1 reaches only node 1.
    c.isolate(1);
    c.propose(1, &["old"]);
    let old = c.raft(1).last_index();
    // Check-quorum makes the isolated leader step down.
    for _ in 0..25 {
        c.tick(1);
    }
    assert_eq!(c.raft(1).role(), Role::Follower);
    c.net.clear();
    c.expire_leases(&[2, 3]);
    c.heal();
    // 1 campaigns again; its log (with `old`) is the most up to date.
    for round in 0.. {
        assert!(round < 100, "node 1 did not win");
        if c.raft(1).role() == Role::Leader {
            break;
        }
        c.tick(1);
        while c.raft(1).role() != Role::Leader && c.deliver_one() {}
    }
    let t2 = c.raft(1).term();
    assert!(t2 > t1);
    let mut saw_majority_without_commit = false;
    while c.deliver_one() {
        let r = c.raft(1);
        let with_old = 1 + [2, 3]
            .iter()
            .filter(|&&p| r.progress(p).is_some_and(|pr| pr.match_index >= old))
            .count();
        let with_new = 1 + [2, 3]
            .iter()
            .filter(|&&p| r.progress(p).is_some_and(|pr| pr.match_index > old))
            .count();
        if with_old >= 2 && with_new < 2 {
            saw_majority_without_commit = true;
            assert!(
                r.commit() < old,
                "committed a term-{t1} entry by counting replicas"
            );
        }
        if r.commit() >= old {
            assert_eq!(
                r.log().term(r.commit()),
                Some(t2),
                "commit point is of the leader's term"
            );
        }
    }
    assert!(
        saw_majority_without_commit,
        "the scenario reached the Figure 8 state"
    );
    assert!(c.raft(1).commit() > old);
}

/// §5.4.3 / thesis §10.2.1: the leader's own log counts only once persisted.
#[test]
fn leader_counts_itself_only_after_its_persist() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let start = c.raft(1).commit();
    c.nodes.get_mut(&1).unwrap().auto_persist = false;
    c.isolate(3);
    c.propose(1, &["a"]);
    c.deliver_all();
    // Only follower 2 has it durably; with the leader's copy not yet durable
    // there is no quorum.
    assert_eq!(c.raft(1).commit(), start);
    c.complete_persists(1);
    assert_eq!(c.raft(1).commit(), c.raft(1).last_index());
}

/// Proposals on a follower name the leader; a full window is refused with
/// backpressure and nothing is appended.
#[test]
fn proposals_not_leader_and_backpressure() {
    let mut c = Cluster::with_config(3, |cfg| cfg.uncommitted_bytes_max = 200);
    c.elect(1);
    c.deliver_all();
    let err = c
        .nodes
        .get_mut(&2)
        .unwrap()
        .raft
        .propose(vec![cmd("x")])
        .unwrap_err();
    assert_eq!(
        err,
        ProposeError::NotLeader {
            leader_hint: Some(1)
        }
    );
    c.isolate(1);
    let raft = &mut c.nodes.get_mut(&1).unwrap().raft;
    raft.propose(vec![cmd(&"p".repeat(150))]).unwrap();
    let last = raft.last_index();
    let err = raft.propose(vec![cmd(&"q".repeat(100))]).unwrap_err();
    assert!(matches!(err, ProposeError::Backpressure { max: 200, .. }));
    assert_eq!(raft.last_index(), last, "nothing appended");
    // Commits free the window.
    c.heal();
    c.drain(1);
    c.deliver_all();
    c.tick_all(2);
    let raft = &mut c.nodes.get_mut(&1).unwrap().raft;
    assert_eq!(raft.uncommitted_bytes(), 0);
    raft.propose(vec![cmd(&"q".repeat(100))]).unwrap();
}

/// A proposal answers with the indexes its entries got: the first after
/// the log's end through one per command.
#[test]
fn a_proposal_returns_the_indexes_of_its_entries() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let end = c.raft(1).last_index();
    assert_eq!(c.propose(1, &["a", "b", "c"]), (end + 1, end + 3));
    assert_eq!(c.propose(1, &["d"]), (end + 4, end + 4));
    assert_eq!(c.raft(1).last_index(), end + 4);
}

/// The window holds exactly `uncommitted_bytes_max`: a proposal that fills
/// it to the byte is taken, one byte more is refused.
#[test]
fn a_proposal_that_exactly_fills_the_window_is_taken() {
    let mut c = Cluster::with_config(3, |cfg| cfg.uncommitted_bytes_max = 400);
    c.elect(1);
    c.deliver_all();
    c.isolate(1);
    let raft = &mut c.nodes.get_mut(&1).unwrap().raft;
    let before = raft.uncommitted_bytes();
    raft.propose(vec![cmd(&"p".repeat(150))]).unwrap();
    let used = raft.uncommitted_bytes();
    let overhead = used - before - 150;
    let fill = 400 - used - overhead;
    let last = raft.last_index();
    let err = raft.propose(vec![cmd(&"q".repeat(fill + 1))]).unwrap_err();
    assert!(matches!(err, ProposeError::Backpressure { max: 400, .. }));
    assert_eq!(raft.last_index(), last, "nothing appended");
    raft.propose(vec![cmd(&"q".repeat(fill))]).unwrap();
    assert_eq!(raft.uncommitted_bytes(), 400);
}

/// Thesis §6.2: a leader that hears from no quorum steps down.
#[test]
fn check_quorum_deposes_an_isolated_leader() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.isolate(1);
    for _ in 0..25 {
        c.tick(1);
        c.deliver_all();
    }
    assert_eq!(c.raft(1).role(), Role::Follower);
    assert_eq!(c.raft(1).leader(), None);
}

/// Flow control: in `Replicate`, at most `inflight_max` AppendEntries are
/// outstanding, each at most `batch_bytes_max` (one entry at least).
#[test]
fn replication_window_bounds_messages_in_flight() {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.inflight_max = 4;
        cfg.batch_bytes_max = 64;
    });
    c.elect(1);
    c.deliver_all();
    // Responses from 2 are lost: the leader must stop at the window.
    c.cut.insert((2, 1));
    for i in 0..40 {
        c.propose(1, &[&format!("{i:040}")]);
    }
    let appends_to_2 = c
        .net
        .iter()
        .filter(|m| {
            m.to == 2
                && matches!(&m.body, MessageBody::Append { entries, .. } if !entries.is_empty())
        })
        .count();
    assert_eq!(appends_to_2, 4, "{:?}", c.raft(1).progress(2));
    assert_eq!(c.raft(1).progress(2).unwrap().inflight_len(), 4);
    c.deliver_all();
    c.heal();
    c.tick_all(10);
    assert_eq!(c.raft(2).last_index(), c.raft(1).last_index());
    assert!(c.nodes[&2]
        .applied
        .iter()
        .any(|e| matches!(e.payload, Payload::Normal(_))));
}

/// A restarted node keeps its durable log and term and catches up.
#[test]
fn restart_recovers_durable_state_and_catches_up() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, &["a", "b", "c"]);
    c.deliver_all();
    c.tick_all(2);
    c.restart(3);
    assert_eq!(c.raft(3).last_index(), c.raft(1).last_index());
    c.propose(1, &["d"]);
    c.deliver_all();
    c.tick_all(3);
    assert_eq!(
        c.applied_cmds(3),
        vec![cmd("a"), cmd("b"), cmd("c"), cmd("d")]
    );
}
