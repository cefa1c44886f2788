//! Linearizable reads (ReadIndex, leases, follower reads) and leadership
//! transfer (thesis §6.4, §3.10).

mod common;

use common::{cmd, Cluster};
use skiff_raft::{MessageBody, ProposeError, ReadError, Role, TransferError};

fn read(c: &mut Cluster, id: u64, ctx: u64) -> Result<(), ReadError> {
    let r = c.nodes.get_mut(&id).unwrap().raft.read_index(ctx);
    c.drain(id);
    r
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
    c.nodes
        .get_mut(&1)
        .unwrap()
        .raft
        .transfer_leadership(3)
        .unwrap();
    c.drain(1);
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
    c.nodes
        .get_mut(&1)
        .unwrap()
        .raft
        .transfer_leadership(2)
        .unwrap();
    c.drain(1);
    for _ in 0..20 {
        c.tick(1);
        c.deliver_all();
    }
    assert_eq!(c.raft(1).role(), Role::Leader);
    assert_eq!(c.raft(1).transferee(), None);
    c.propose(1, &["resumed"]);
}
