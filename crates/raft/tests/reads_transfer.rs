//! Linearizable reads (ReadIndex, leases, follower reads) and leadership
//! transfer (thesis §6.4, §3.10).

mod common;

use common::{cmd, config, Cluster};
use skiff_raft::{
    Config, Message, MessageBody, ProposeError, Raft, ReadError, Restored, Role, TransferError,
};

fn read(c: &mut Cluster, id: u64, ctx: u64) -> Result<(), ReadError> {
    let r = c.nodes.get_mut(&id).unwrap().raft.read_index(ctx);
    c.drain(id);
    r
}

/// Delivers queued messages until none is left, except those `lost`
/// selects (dropped); returns what was delivered, in order.
fn deliver_all_but(c: &mut Cluster, mut lost: impl FnMut(&Message) -> bool) -> Vec<Message> {
    let mut delivered = Vec::new();
    for _ in 0..100_000 {
        let Some(msg) = c.net.pop_front() else {
            return delivered;
        };
        if lost(&msg) || c.cut.contains(&(msg.from, msg.to)) {
            continue;
        }
        delivered.push(msg.clone());
        c.net.push_front(msg);
        assert!(c.deliver_one());
    }
    panic!("the network did not go quiet");
}

/// Ticks leader `l` until it starts a heartbeat round (its heartbeats
/// queued, not delivered).
fn tick_until_a_round(c: &mut Cluster, l: u64) {
    while !c
        .net
        .iter()
        .any(|m| m.from == l && matches!(m.body, MessageBody::Heartbeat { .. }))
    {
        c.tick(l);
    }
}

/// Cuts leader `l` off and counts the reads it then answers at once, one a
/// tick, until one is not answered (its lease ran out). `l` must have
/// answered no read before.
fn reads_answered_cut_off(c: &mut Cluster, l: u64) -> u64 {
    c.isolate(l);
    let mut answered = 0;
    for ctx in 1..100 {
        if read(c, l, ctx).is_err() || c.nodes[&l].reads.len() != ctx as usize {
            break;
        }
        answered += 1;
        c.tick(l);
    }
    answered
}

/// ReadIndex: the read index is the commit index, released only after a
/// quorum answered a heartbeat round started after the request.
#[test]
fn read_index_waits_for_a_heartbeat_round() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, &["a"]);
    c.deliver_all();
    let commit = c.raft(1).commit();
    read(&mut c, 1, 7).unwrap();
    assert!(c.nodes[&1].reads.is_empty(), "not before the round");
    assert!(c
        .net
        .iter()
        .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    c.deliver_all();
    assert_eq!(c.nodes[&1].reads, vec![(7, Some(commit))]);
}

/// A new leader does not answer reads before an entry of its own term is
/// committed (its commit index may lag).
#[test]
fn new_leader_reads_wait_for_its_first_commit() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.isolate(1);
    c.expire_leases(&[2, 3]);
    c.heal();
    c.isolate(1);
    // 2 wins; read before anything of its term committed.
    while c.raft(2).role() != Role::Leader {
        c.tick(2);
        while c.raft(2).role() != Role::Leader && c.deliver_one() {}
    }
    read(&mut c, 2, 1).unwrap();
    assert!(c.nodes[&2].reads.is_empty());
    c.deliver_all();
    let (ctx, index) = c.nodes[&2].reads[0];
    assert_eq!(ctx, 1);
    let index = index.unwrap();
    assert_eq!(c.raft(2).log().term(index), Some(c.raft(2).term()));
}

/// A deposed leader that has not noticed never returns a read index: its
/// rounds are not confirmed, and the read fails when it steps down.
#[test]
fn partitioned_old_leader_never_serves_a_stale_read() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.isolate(1);
    c.expire_leases(&[2, 3]);
    c.elect(2);
    c.propose(2, &["new"]);
    c.deliver_all();
    read(&mut c, 1, 9).unwrap();
    for _ in 0..30 {
        c.tick(1);
        c.deliver_all();
    }
    assert_eq!(c.nodes[&1].reads, vec![(9, None)]);
    assert_ne!(c.raft(1).role(), Role::Leader);
}

/// `reads_pending` counts every read a node holds: one waiting for the new
/// leader's first commit, one waiting for a heartbeat round, one a
/// follower forwarded to the leader.
#[test]
fn reads_pending_counts_every_kind_of_waiting_read() {
    let mut c = Cluster::new(3);
    // 1 wins the election, but its first entry reaches nobody.
    while c.raft(1).role() != Role::Leader {
        c.tick(1);
        deliver_all_but(&mut c, |m| matches!(m.body, MessageBody::Append { .. }));
    }
    assert!(c.raft(1).commit() < c.raft(1).last_index());
    read(&mut c, 1, 1).unwrap();
    assert_eq!(c.raft(1).reads_pending(), 1, "waiting for a commit");
    assert!(c.nodes[&1].reads.is_empty());
    // The lost entry goes out again; it commits and the read is answered.
    c.tick_all(4);
    assert_eq!(c.raft(1).commit(), c.raft(1).last_index());
    assert_eq!(c.nodes[&1].reads.len(), 1);
    read(&mut c, 1, 2).unwrap();
    assert_eq!(c.raft(1).reads_pending(), 1, "waiting for a round");
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.raft(1).reads_pending(), 0);
    assert_eq!(c.nodes[&1].reads.len(), 2);
    // A follower's read, forwarded to the leader.
    read(&mut c, 2, 3).unwrap();
    assert_eq!(c.raft(2).reads_pending(), 1, "forwarded");
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.raft(2).reads_pending(), 0);
    assert_eq!(c.nodes[&2].reads.len(), 1);
}

/// A follower that missed an election forwards a read to its old leader,
/// now a follower in a higher term: the read is refused at once (the
/// answer also brings the follower the new term), not left to time out.
#[test]
fn a_read_forwarded_in_an_old_term_is_refused_at_once() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.isolate(3);
    c.start_transfer(1, 2);
    c.deliver_all();
    assert_eq!(c.leaders(), vec![2]);
    c.heal();
    let old = c.raft(3).term();
    assert!(c.raft(1).term() > old);
    assert_eq!(c.raft(3).leader(), Some(1), "3 still follows 1");
    read(&mut c, 3, 9).unwrap();
    c.deliver_all();
    assert_eq!(c.nodes[&3].reads, vec![(9, None)]);
    assert_eq!(c.raft(3).reads_pending(), 0);
    assert!(c.raft(3).term() > old);
}

/// Lease reads: within the lease the leader answers at once, without a
/// round; after it lapses a round is needed again.
#[test]
fn lease_reads_skip_the_round_while_the_lease_holds() {
    let mut c = Cluster::with_config(3, |cfg| cfg.lease_reads = true);
    c.tick_all(30);
    let l = c.leaders()[0];
    c.tick_all(3); // a confirmed heartbeat round starts the lease
    read(&mut c, l, 1).unwrap();
    assert_eq!(c.nodes[&l].reads, vec![(1, Some(c.raft(l).commit()))]);
    assert!(c.net.is_empty(), "no round needed");
    // Cut off, the lease runs out and reads stall.
    c.isolate(l);
    for _ in 0..12 {
        c.tick(l);
        c.deliver_all();
    }
    if c.raft(l).role() == Role::Leader {
        read(&mut c, l, 2).unwrap();
        c.deliver_all();
        assert_eq!(c.nodes[&l].reads.len(), 1, "no read from an expired lease");
    }
}

/// The lease runs from the start of the last round a quorum answered, even
/// when an earlier round went unanswered (its heartbeats lost): a cut-off
/// leader then answers reads at once for as many ticks as when every
/// round was answered.
#[test]
fn an_unanswered_round_does_not_stop_the_lease_from_renewing() {
    let served = |lose_a_round: bool| {
        let mut c = Cluster::with_config(3, |cfg| cfg.lease_reads = true);
        c.tick_all(30);
        let l = c.leaders()[0];
        c.tick_all(3);
        for round in 0..2 {
            tick_until_a_round(&mut c, l);
            if round == 0 && lose_a_round {
                c.net
                    .retain(|m| !(m.from == l && matches!(m.body, MessageBody::Heartbeat { .. })));
            }
            c.deliver_all();
        }
        reads_answered_cut_off(&mut c, l)
    };
    let all = served(false);
    assert!(all > 0, "a lease at all");
    assert_eq!(served(true), all);
}

/// A lease ends `lease_ticks` after the tick its round started, less one
/// tick of margin (the round's heartbeats may leave at the end of that
/// tick): cut off right after a confirmed round, the leader answers reads
/// at once on exactly `lease_ticks - 1` ticks, never more.
#[test]
fn the_lease_ends_lease_ticks_after_its_round_less_a_tick() {
    let mut c = Cluster::with_config(3, |cfg| cfg.lease_reads = true);
    c.tick_all(30);
    let l = c.leaders()[0];
    c.tick_all(3);
    // A round starts on this tick and a quorum answers it at once.
    tick_until_a_round(&mut c, l);
    c.deliver_all();
    let answered = reads_answered_cut_off(&mut c, l);
    assert_eq!(c.raft(l).role(), Role::Leader, "still leading at the end");
    // The cluster's configuration (the same on every node).
    assert_eq!(answered, config(l, 3).lease_ticks() - 1);
}

/// A lease is shortened for clock drift: `lease_ticks` =
/// `election_ticks_min * (100 - d) / (100 + d)` (10 ticks: 10 with no
/// drift allowed, 8 with 10%). Counted as the ticks a cut-off leader
/// answers reads at once after its last confirmed round.
#[test]
fn the_lease_is_shortened_for_clock_drift() {
    let served = |drift: u32| {
        let mut c = Cluster::with_config(3, |cfg| {
            cfg.lease_reads = true;
            cfg.lease_drift_pct = drift;
        });
        c.tick_all(30);
        let l = c.leaders()[0];
        c.tick_all(3);
        let answered = reads_answered_cut_off(&mut c, l);
        (answered, c.raft(l).role())
    };
    let cfg = |d| Config {
        lease_drift_pct: d,
        ..Config::new(1, vec![1, 2, 3])
    };
    assert_eq!((cfg(0).lease_ticks(), cfg(10).lease_ticks()), (10, 8));
    let (zero, role) = served(0);
    assert_eq!(role, Role::Leader, "still leading when its lease ran out");
    let (ten, _) = served(10);
    assert!(ten > 0, "a lease at all");
    assert_eq!(
        zero - ten,
        2,
        "{zero} ticks of lease with no drift, {ten} with 10%"
    );
}

/// Follower reads: the follower asks the leader for the index and reports
/// it; a follower without a leader refuses at once.
#[test]
fn follower_read_gets_the_leaders_index() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, &["a", "b"]);
    c.deliver_all();
    read(&mut c, 3, 5).unwrap();
    c.deliver_all();
    assert_eq!(c.nodes[&3].reads, vec![(5, Some(c.raft(1).commit()))]);
    let mut lone = Cluster::new(3);
    assert_eq!(read(&mut lone, 2, 1), Err(ReadError::NoLeader));
}

/// Reads pending are bounded.
#[test]
fn reads_pending_are_bounded() {
    let mut c = Cluster::with_config(3, |cfg| cfg.reads_pending_max = 2);
    c.elect(1);
    c.deliver_all();
    c.isolate(1);
    read(&mut c, 1, 1).unwrap();
    read(&mut c, 1, 2).unwrap();
    assert!(matches!(
        read(&mut c, 1, 3),
        Err(ReadError::Backpressure { pending: 2, max: 2 })
    ));
}

/// §3.10: the target is caught up, then campaigns at once and wins while
/// the others still hear the old leader; proposals stop meanwhile.
#[test]
fn leadership_transfer_hands_over_without_an_election_timeout() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let term = c.raft(1).term();
    // 3 lags behind.
    c.cut.insert((1, 3));
    c.propose(1, &["a", "b", "c"]);
    c.deliver_all();
    c.heal();
    c.start_transfer(1, 3);
    assert_eq!(
        c.nodes
            .get_mut(&1)
            .unwrap()
            .raft
            .propose(vec![cmd("x")])
            .unwrap_err(),
        ProposeError::Transferring { to: 3 }
    );
    c.deliver_all();
    // Heartbeat rounds find the lost appends and catch 3 up.
    for _ in 0..6 {
        c.tick(1);
        c.deliver_all();
    }
    assert_eq!(c.raft(3).role(), Role::Leader);
    assert_eq!(c.raft(3).term(), term + 1);
    assert_eq!(c.raft(1).leader(), Some(3));
    c.propose(3, &["after"]);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.applied_cmds(1).last(), Some(&cmd("after")));
}

#[test]
fn leadership_transfer_errors_and_timeout() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    let r = &mut c.nodes.get_mut(&2).unwrap().raft;
    assert_eq!(
        r.transfer_leadership(3),
        Err(TransferError::NotLeader {
            leader_hint: Some(1)
        })
    );
    let r = &mut c.nodes.get_mut(&1).unwrap().raft;
    assert_eq!(r.transfer_leadership(1), Err(TransferError::NotAVoter(1)));
    assert_eq!(r.transfer_leadership(9), Err(TransferError::NotAVoter(9)));
    // The target is unreachable: the transfer lapses and proposals resume.
    c.isolate(2);
    c.start_transfer(1, 2);
    for _ in 0..20 {
        c.tick(1);
        c.deliver_all();
    }
    assert_eq!(c.raft(1).role(), Role::Leader);
    assert_eq!(c.raft(1).transferee(), None);
    c.propose(1, &["resumed"]);
}

/// Lease reads rest on the followers' promise not to vote for
/// `election_ticks_min` ticks after they heard the leader. A message of a
/// higher term that names no leader (here a stray VoteResponse from a node
/// that campaigns without pre-vote) makes a follower adopt that term and
/// forget its leader; it must not release the follower from the promise,
/// since the old leader, which has not heard of the new term, still serves
/// reads from its lease.
#[test]
fn lease_promise_outlives_a_higher_term_message() {
    // 3 campaigns without pre-vote (so without lease reads): its term rises.
    let mut c = Cluster::with_config(3, |cfg| {
        if cfg.id == 3 {
            cfg.pre_vote = false;
        } else {
            cfg.lease_reads = true;
        }
    });
    c.elect(1);
    c.propose(1, &["a"]);
    c.deliver_all();
    c.tick_all(3); // a confirmed heartbeat round starts the lease
    let term = c.raft(1).term();
    read(&mut c, 1, 1).unwrap();
    assert_eq!(c.nodes[&1].reads, vec![(1, Some(c.raft(1).commit()))]);
    assert!(c.net.is_empty(), "served from the lease");
    // 3 stops hearing 1 and campaigns; 2 heard 1 within the lease.
    c.cut.insert((1, 3));
    c.cut.insert((3, 1));
    while c.raft(3).role() != Role::Candidate {
        c.tick(3);
    }
    assert_eq!(c.raft(3).term(), term + 1);
    c.net.push_front(Message {
        from: 3,
        to: 2,
        term: term + 1,
        body: MessageBody::VoteResponse { granted: false },
    });
    let delivered = deliver_all_but(&mut c, |_| false);
    assert_eq!(c.raft(2).term(), term + 1, "2 took the higher term");
    assert_eq!(c.raft(2).leader(), None);
    assert_ne!(c.raft(2).vote(), 3, "2 voted inside the lease");
    assert!(!delivered
        .iter()
        .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true })));
    assert_eq!(c.leaders(), vec![1], "a second leader beside a lease");
    read(&mut c, 1, 2).unwrap();
    assert_eq!(c.nodes[&1].reads[1], (2, Some(c.raft(1).commit())));
    // Once the lease ran out, the cluster elects a leader again.
    c.heal();
    c.tick_all(60);
    assert_eq!(c.leaders().len(), 1);
    assert!(c.raft(c.leaders()[0]).term() > term);
}

/// A leader refuses pre-votes, as a follower that hears it does (thesis
/// §9.6): otherwise a node that stops hearing it wins a pre-vote with the
/// leader's own grant, and its vote request then deposes the leader.
#[test]
fn leader_refuses_pre_votes() {
    let mut c = Cluster::with_config(3, |cfg| cfg.lease_reads = true);
    c.tick_all(30);
    let l = c.leaders()[0];
    let term = c.raft(l).term();
    let p = if l == 3 { 2 } else { 3 };
    // p no longer hears the leader (its appends and heartbeats to p are
    // lost); every other message arrives.
    while c.raft(p).role() != Role::PreCandidate {
        c.tick(p);
    }
    let delivered = deliver_all_but(&mut c, |m| {
        m.from == l
            && m.to == p
            && matches!(
                m.body,
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
            )
    });
    let answers: Vec<_> = delivered
        .iter()
        .filter(|m| m.from == l && m.to == p)
        .map(|m| &m.body)
        .collect();
    assert_eq!(
        answers,
        vec![&MessageBody::PreVoteResponse { granted: false }]
    );
    assert_eq!(c.leaders(), vec![l]);
    assert_eq!(c.raft(l).term(), term);
    assert_eq!(c.raft(p).term(), term, "p never campaigned");
}

/// A forwarded read whose request or answer is lost fails after
/// `election_ticks_min` ticks (the host retries it); lost reads do not take
/// the `reads_pending_max` places for good.
#[test]
fn lost_forwarded_reads_expire() {
    let mut c = Cluster::with_config(3, |cfg| cfg.reads_pending_max = 2);
    c.elect(1);
    c.propose(1, &["a"]);
    c.deliver_all();
    // Read 1: the request is lost.
    read(&mut c, 3, 1).unwrap();
    deliver_all_but(&mut c, |m| matches!(m.body, MessageBody::ReadIndex { .. }));
    // Read 2: the answer is lost.
    read(&mut c, 3, 2).unwrap();
    let answer = |m: &Message| matches!(m.body, MessageBody::ReadIndexResponse { .. });
    let mut lost: Vec<Message> = c.net.iter().filter(|m| answer(m)).cloned().collect();
    deliver_all_but(&mut c, |m| {
        let hit = answer(m);
        if hit {
            lost.push(m.clone());
        }
        hit
    });
    assert_eq!(lost.len(), 1, "the leader answered read 2");
    assert_eq!(
        read(&mut c, 3, 3),
        Err(ReadError::Backpressure { pending: 2, max: 2 })
    );
    let ticks = c.nodes[&3].config.election_ticks_min as usize;
    c.tick_all(ticks - 1);
    assert!(c.nodes[&3].reads.is_empty(), "not before the deadline");
    c.tick_all(1);
    assert_eq!(c.nodes[&3].reads, vec![(1, None), (2, None)]);
    assert_eq!(c.raft(3).reads_pending(), 0);
    assert_eq!(c.raft(3).leader(), Some(1), "the leader never changed");
    // A late answer is ignored; new reads are served.
    c.net.extend(lost);
    c.deliver_all();
    assert_eq!(c.nodes[&3].reads.len(), 2);
    read(&mut c, 3, 4).unwrap();
    read(&mut c, 3, 5).unwrap();
    c.deliver_all();
    let commit = c.raft(1).commit();
    assert_eq!(
        c.nodes[&3].reads[2..],
        [(4, Some(commit)), (5, Some(commit))]
    );
}

/// Heartbeats must come at least every tick and more often than an
/// election timeout.
#[test]
fn heartbeat_ticks_must_be_below_the_election_timeout() {
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.validate().unwrap();
    for bad in [0, cfg.election_ticks_min, cfg.election_ticks_min + 1] {
        cfg.heartbeat_ticks = bad;
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, "heartbeat_ticks", "{bad}: {err}");
    }
    cfg.heartbeat_ticks = cfg.election_ticks_min - 1;
    cfg.validate().unwrap();
}

/// Lease reads need pre-vote as well as check-quorum.
#[test]
fn lease_reads_need_pre_vote() {
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.lease_reads = true;
    cfg.validate().unwrap();
    cfg.pre_vote = false;
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.field, "lease_reads");
    assert!(err.reason.contains("pre_vote"), "{err}");
    assert!(Raft::new(cfg, Restored::default(), 1).is_err());
}

/// A drift bound of 100% or more, or one that leaves no lease, is refused.
#[test]
fn lease_drift_must_leave_a_lease() {
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.lease_reads = true;
    cfg.lease_drift_pct = 100;
    assert_eq!(cfg.validate().unwrap_err().field, "lease_drift_pct");
    cfg.election_ticks_min = 3;
    cfg.election_ticks_max = 6;
    cfg.heartbeat_ticks = 1;
    cfg.lease_drift_pct = 60; // 3 * 40 / 160 = 0 ticks
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.field, "lease_drift_pct");
    assert!(err.reason.contains("no lease"), "{err}");
    cfg.lease_reads = false;
    cfg.validate().unwrap();
}
