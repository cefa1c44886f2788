//! Proposals forwarded by a follower to the leader (`Raft::forward`): the
//! leader proposes them as they are; a refusal comes back as
//! `Action::ProposeRefused`; nothing is ever passed on twice.

mod common;

use common::{cmd, Cluster};
use skiff_raft::{Action, Message, MessageBody, ProposeError, Role};

fn forward(c: &mut Cluster, id: u64, ctx: u64, cmds: &[&str]) -> Result<(), ProposeError> {
    let r = c
        .nodes
        .get_mut(&id)
        .unwrap()
        .raft
        .forward(ctx, cmds.iter().map(|s| cmd(s)).collect());
    c.drain(id);
    r
}

#[test]
fn a_follower_forwards_to_the_leader_which_proposes() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    forward(&mut c, 2, 5, &["x", "y"]).unwrap();
    // One Propose to the leader, sent at once (nothing to persist first).
    let sent: Vec<&Message> = c.net.iter().collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].from, sent[0].to), (2, 1));
    assert_eq!(
        sent[0].body,
        MessageBody::Propose {
            ctx: 5,
            commands: vec![cmd("x"), cmd("y")]
        }
    );
    c.deliver_all();
    // Followers learn the commit index with the next heartbeat.
    c.tick(1);
    c.tick(1);
    c.deliver_all();
    for id in 1..=3 {
        assert_eq!(c.applied_cmds(id), vec![cmd("x"), cmd("y")], "node {id}");
    }
    assert!(c.nodes[&2].refused.is_empty());
}

#[test]
fn forward_on_the_leader_proposes_locally() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let before = c.raft(1).log().last_index();
    forward(&mut c, 1, 1, &["z"]).unwrap();
    assert_eq!(c.raft(1).log().last_index(), before + 1);
    c.deliver_all();
    c.tick(1);
    c.tick(1);
    c.deliver_all();
    assert_eq!(c.applied_cmds(3), vec![cmd("z")]);
}

#[test]
fn forward_without_a_leader_is_refused_at_once() {
    let mut c = Cluster::new(3);
    let r = forward(&mut c, 2, 1, &["x"]);
    assert_eq!(r, Err(ProposeError::NotLeader { leader_hint: None }));
    assert!(c.net.is_empty());
    c.elect(1);
    c.deliver_all();
    assert_eq!(forward(&mut c, 2, 2, &[]), Err(ProposeError::Empty));
}

/// A Propose reaching a node that does not lead is refused, not passed on.
#[test]
fn a_non_leader_refuses_and_never_passes_on() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let term = c.raft(2).term();
    c.net.push_back(Message {
        from: 2,
        to: 3,
        term,
        body: MessageBody::Propose {
            ctx: 9,
            commands: vec![cmd("x")],
        },
    });
    let last = c.raft(1).log().last_index();
    c.deliver_all();
    assert_eq!(c.nodes[&2].refused, vec![9]);
    assert_eq!(c.raft(1).log().last_index(), last, "nothing proposed");
    assert!(c.applied_cmds(1).is_empty());
}

/// A Propose from an older term is refused (its sender learns the term).
#[test]
fn a_stale_term_propose_is_refused() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let term = c.raft(1).term();
    c.net.push_back(Message {
        from: 2,
        to: 1,
        term: term - 1,
        body: MessageBody::Propose {
            ctx: 4,
            commands: vec![cmd("old")],
        },
    });
    c.deliver_one();
    let answer: Vec<&Message> = c.net.iter().collect();
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].body, MessageBody::ProposeRefused { ctx: 4 });
    assert_eq!(answer[0].term, term);
    c.deliver_all();
    assert_eq!(c.nodes[&2].refused, vec![4]);
    assert!(c.applied_cmds(1).is_empty());
}

/// A refusal from an older term still reaches the host: a follower that
/// forwarded a batch and then became leader itself (the batch crossed a
/// leadership transfer to it) learns the batch was not proposed instead
/// of waiting for it forever.
#[test]
fn a_refusal_from_an_older_term_is_reported() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let term = c.raft(1).term();
    c.start_transfer(1, 2);
    c.deliver_all();
    assert_eq!(c.raft(2).role(), Role::Leader);
    assert!(c.raft(2).term() > term);
    c.net.push_back(Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::ProposeRefused { ctx: 9 },
    });
    c.deliver_all();
    assert_eq!(c.nodes[&2].refused, vec![9]);
}

/// A leader handing leadership over refuses forwarded batches (as it
/// refuses its own proposals) and says so.
#[test]
fn a_transferring_leader_refuses() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    // Cut the target off so that the transfer stays under way.
    c.cut.insert((1, 3));
    c.start_transfer(1, 3);
    forward(&mut c, 2, 6, &["x"]).unwrap();
    c.deliver_all();
    assert_eq!(c.nodes[&2].refused, vec![6]);
    let actions_after: Vec<Action> = c.nodes.get_mut(&2).unwrap().raft.take_actions();
    assert!(actions_after.is_empty());
}

/// A commit index that moves reaches the followers at once (they answer
/// the writes forwarded through them when they apply), not with the next
/// heartbeat: no tick here.
#[test]
fn followers_learn_a_new_commit_without_a_tick() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    forward(&mut c, 2, 1, &["a"]).unwrap();
    c.deliver_all();
    for id in 1..=3 {
        assert_eq!(c.applied_cmds(id), vec![cmd("a")], "node {id}");
    }
    c.propose(1, &["b"]);
    c.deliver_all();
    for id in 1..=3 {
        assert_eq!(c.applied_cmds(id), vec![cmd("a"), cmd("b")], "node {id}");
    }
}
