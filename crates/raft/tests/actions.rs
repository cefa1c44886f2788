//! Exact action lists: what one input makes the core ask for, in order.

mod common;

use common::{cmd, config};
use skiff_raft::{
    Action, Entry, HardState, Message, MessageBody, Payload, Raft, RejectHint, Restored, Role,
};

fn msg(from: u64, to: u64, term: u64, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

fn send(m: Message, after_persist: Option<u64>) -> Action {
    Action::Send {
        msg: m,
        after_persist,
    }
}

fn ticks_until_campaign(r: &mut Raft) -> Vec<Action> {
    for _ in 0..100 {
        r.tick();
        let a = r.take_actions();
        if !a.is_empty() {
            return a;
        }
    }
    panic!("no campaign");
}

/// A follower that times out pre-campaigns: pre-vote requests for the next
/// term, sent at once (nothing to persist: no state changed).
#[test]
fn timeout_sends_pre_votes_without_persisting() {
    let mut r = Raft::new(config(1, 3), Restored::default(), 1).unwrap();
    let actions = ticks_until_campaign(&mut r);
    let pv = |to| {
        msg(
            1,
            to,
            1,
            MessageBody::PreVote {
                last_index: 0,
                last_term: 0,
            },
        )
    };
    assert_eq!(
        actions,
        vec![
            send(pv(2), None),
            send(pv(3), None),
            Action::RoleChanged {
                role: Role::PreCandidate,
                term: 0,
                leader: None
            },
        ]
    );
    assert_eq!(r.term(), 0);
}

/// Winning the pre-vote: the term and self-vote are persisted, and the vote
/// requests wait for that persist.
#[test]
fn pre_vote_quorum_persists_term_before_vote_requests() {
    let mut r = Raft::new(config(1, 3), Restored::default(), 1).unwrap();
    ticks_until_campaign(&mut r);
    r.step(msg(2, 1, 1, MessageBody::PreVoteResponse { granted: true }));
    let hs = HardState {
        term: 1,
        vote: 1,
        commit: 0,
    };
    let v = |to| {
        msg(
            1,
            to,
            1,
            MessageBody::Vote {
                last_index: 0,
                last_term: 0,
                transfer: false,
            },
        )
    };
    assert_eq!(
        r.take_actions(),
        vec![
            Action::Persist {
                id: 1,
                hard_state: Some(hs),
                entries: vec![]
            },
            send(v(2), Some(1)),
            send(v(3), Some(1)),
            Action::RoleChanged {
                role: Role::Candidate,
                term: 1,
                leader: None
            },
        ]
    );
}

/// Granting a vote: the new term and vote are persisted first and the
/// answer waits for them.
#[test]
fn granting_a_vote_waits_for_its_persist() {
    let mut r = Raft::new(config(2, 3), Restored::default(), 1).unwrap();
    r.step(msg(
        1,
        2,
        1,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    ));
    assert_eq!(
        r.take_actions(),
        vec![
            Action::Persist {
                id: 1,
                hard_state: Some(HardState {
                    term: 1,
                    vote: 1,
                    commit: 0
                }),
                entries: vec![]
            },
            send(
                msg(2, 1, 1, MessageBody::VoteResponse { granted: true }),
                Some(1)
            ),
            Action::RoleChanged {
                role: Role::Follower,
                term: 1,
                leader: None
            },
        ]
    );
    // A second candidate in the same term is refused.
    r.step(msg(
        3,
        2,
        1,
        MessageBody::Vote {
            last_index: 5,
            last_term: 1,
            transfer: false,
        },
    ));
    assert_eq!(
        r.take_actions(),
        vec![send(
            msg(2, 3, 1, MessageBody::VoteResponse { granted: false }),
            Some(1)
        )]
    );
}

/// Becoming leader: the no-op entry is persisted and sent to every
/// follower in the same step; the sends do not wait for the persist.
#[test]
fn new_leader_persists_and_sends_its_noop_in_one_step() {
    let mut r = Raft::new(config(1, 3), Restored::default(), 1).unwrap();
    ticks_until_campaign(&mut r);
    r.step(msg(2, 1, 1, MessageBody::PreVoteResponse { granted: true }));
    r.take_actions();
    // The vote requests left once the candidate's own vote was durable.
    r.persisted(1);
    assert_eq!(r.take_actions(), vec![]);
    r.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }));
    let noop = Entry {
        index: 1,
        term: 1,
        payload: Payload::Noop,
    };
    let append = |to| {
        msg(
            1,
            to,
            1,
            MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![noop.clone()],
                commit: 0,
            },
        )
    };
    assert_eq!(
        r.take_actions(),
        vec![
            Action::Persist {
                id: 2,
                hard_state: None,
                entries: vec![noop.clone()]
            },
            send(append(2), None),
            send(append(3), None),
            Action::RoleChanged {
                role: Role::Leader,
                term: 1,
                leader: Some(1)
            },
        ]
    );
    assert_eq!(r.persisted_index(), 0, "the no-op is not durable yet");
    // The follower's acknowledgement alone does not commit: the leader's
    // own copy is not durable yet.
    r.step(msg(
        2,
        1,
        1,
        MessageBody::AppendResponse {
            success: true,
            match_index: 1,
            reject: None,
        },
    ));
    assert_eq!(r.commit(), 0);
    assert_eq!(r.take_actions(), vec![]);
    // Its persist completes: committed, applied, and the new commit index
    // goes at once, on a heartbeat of the current round, to the follower
    // known to match (node 3 has not answered yet: it learns it later).
    r.persisted(2);
    assert_eq!(r.persisted_index(), 1);
    assert_eq!(r.commit(), 1);
    assert_eq!(
        r.take_actions(),
        vec![
            send(
                msg(
                    1,
                    2,
                    1,
                    MessageBody::Heartbeat {
                        commit: 1,
                        round: 0
                    }
                ),
                None
            ),
            Action::Apply {
                entries: vec![noop]
            }
        ]
    );
}

/// A follower appending entries persists them and acknowledges only after
/// the persist; the commit index it learns is bounded by what it matched.
#[test]
fn follower_acknowledges_after_persist() {
    let mut r = Raft::new(config(2, 3), Restored::default(), 1).unwrap();
    let e1 = Entry {
        index: 1,
        term: 1,
        payload: Payload::Noop,
    };
    let e2 = Entry {
        index: 2,
        term: 1,
        payload: Payload::Normal(cmd("x")),
    };
    r.step(msg(
        1,
        2,
        1,
        MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![e1.clone(), e2.clone()],
            commit: 9,
        },
    ));
    assert_eq!(
        r.take_actions(),
        vec![
            Action::Persist {
                id: 1,
                hard_state: Some(HardState {
                    term: 1,
                    vote: 0,
                    commit: 2
                }),
                entries: vec![e1.clone(), e2.clone()],
            },
            send(
                msg(
                    2,
                    1,
                    1,
                    MessageBody::AppendResponse {
                        success: true,
                        match_index: 2,
                        reject: None
                    }
                ),
                Some(1)
            ),
            Action::RoleChanged {
                role: Role::Follower,
                term: 1,
                leader: Some(1)
            },
        ]
    );
    // Committed but not durable here: nothing to apply until the persist.
    r.persisted(1);
    assert_eq!(
        r.take_actions(),
        vec![Action::Apply {
            entries: vec![e1, e2]
        }]
    );
}

/// A mismatch is rejected with a hint naming the follower's conflicting
/// term and where it starts.
#[test]
fn conflict_reject_carries_the_term_hint() {
    let entries: Vec<Entry> = (1..=6)
        .map(|i| Entry {
            index: i,
            term: if i <= 3 { 1 } else { 2 },
            payload: Payload::Noop,
        })
        .collect();
    let restored = Restored {
        hard_state: HardState {
            term: 2,
            vote: 0,
            commit: 2,
        },
        entries,
        ..Restored::default()
    };
    let mut r = Raft::new(config(2, 3), restored, 1).unwrap();
    r.step(msg(
        1,
        2,
        3,
        MessageBody::Append {
            prev_index: 6,
            prev_term: 3,
            entries: vec![],
            commit: 2,
        },
    ));
    let actions = r.take_actions();
    let reject = actions.iter().find_map(|a| match a {
        Action::Send {
            msg:
                Message {
                    body: MessageBody::AppendResponse { reject, .. },
                    ..
                },
            ..
        } => *reject,
        _ => None,
    });
    let reject = reject.expect("a rejection");
    assert_eq!(reject.rejected, 6);
    assert_eq!(reject.conflict_term, Some(2));
    assert_eq!(reject.conflict_index, 4);
}

/// A sole voter wins its election on its own vote, but only once that vote
/// is durable: had it led on a vote a crash then lost, it would campaign
/// for the same term again and lead it twice, with two different logs.
#[test]
fn sole_voter_leads_once_its_vote_is_durable() {
    let mut r = Raft::new(config(1, 1), Restored::default(), 1).unwrap();
    ticks_until_campaign(&mut r);
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.term(), 1);
    assert_eq!(r.log().last_index(), 0, "no entry of term 1 yet");
    r.persisted(1);
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.log().last_index(), 1);
}

/// A message not addressed to this node, or claiming to come from it or
/// from no node, is dropped before it can change anything (here a vote
/// request of a higher term, which would otherwise raise the term).
#[test]
fn misaddressed_messages_are_ignored() {
    let mut r = Raft::new(config(2, 3), Restored::default(), 1).unwrap();
    let vote = MessageBody::Vote {
        last_index: 5,
        last_term: 4,
        transfer: false,
    };
    for (from, to) in [(1, 3), (2, 2), (0, 2), (1, 0)] {
        r.step(msg(from, to, 7, vote.clone()));
        assert_eq!(r.term(), 0, "from {from} to {to}");
        assert_eq!(r.take_actions(), vec![], "from {from} to {to}");
    }
    // Addressed right, it is heard.
    r.step(msg(1, 2, 7, vote));
    assert_eq!(r.term(), 7);
}

/// A pre-vote is granted only for a term above the voter's own (and a log
/// at least as up to date): one for the voter's current term comes from a
/// node that is behind, and is refused in that term.
#[test]
fn pre_votes_are_granted_only_for_a_higher_term() {
    let restored = Restored {
        hard_state: HardState {
            term: 5,
            vote: 0,
            commit: 0,
        },
        ..Restored::default()
    };
    let mut r = Raft::new(config(1, 3), restored, 1).unwrap();
    let pre_vote = |term| {
        msg(
            2,
            1,
            term,
            MessageBody::PreVote {
                last_index: 0,
                last_term: 0,
            },
        )
    };
    let answer = |term, granted| {
        send(
            msg(1, 2, term, MessageBody::PreVoteResponse { granted }),
            None,
        )
    };
    r.step(pre_vote(5));
    assert_eq!(r.take_actions(), vec![answer(5, false)]);
    r.step(pre_vote(6));
    assert_eq!(r.take_actions(), vec![answer(6, true)]);
    assert_eq!(r.term(), 5, "a pre-vote changes no state");
}

/// A follower's rejection hint never points at or below its commit index:
/// committed entries match the leader's, so the leader resends from the
/// first index after them even when the conflicting term starts earlier.
#[test]
fn a_rejection_hint_stays_above_the_commit_index() {
    let restored = Restored {
        hard_state: HardState {
            term: 2,
            vote: 0,
            commit: 3,
        },
        entries: (1..=6)
            .map(|i| Entry {
                index: i,
                term: 1,
                payload: Payload::Normal(cmd("x")),
            })
            .collect(),
        ..Restored::default()
    };
    let mut r = Raft::new(config(1, 3), restored, 1).unwrap();
    r.step(msg(
        2,
        1,
        2,
        MessageBody::Append {
            prev_index: 5,
            prev_term: 2,
            entries: vec![],
            commit: 3,
        },
    ));
    let hints: Vec<_> = r
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Send {
                msg:
                    Message {
                        body: MessageBody::AppendResponse { reject, .. },
                        ..
                    },
                ..
            } => Some(reject),
            _ => None,
        })
        .collect();
    assert_eq!(
        hints,
        vec![Some(RejectHint {
            rejected: 5,
            conflict_term: Some(1),
            conflict_index: 4,
        })]
    );
}
