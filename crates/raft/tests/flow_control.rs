//! Per-follower flow control under a transport that drops, duplicates and
//! reorders: stale answers never rewind or restart a follower's stream,
//! and losses are detected per round trip (heartbeat rounds), so a slow
//! network gets fewer retries rather than a flood of them.

mod common;

use common::Cluster;
use skiff_raft::{
    Entry, Message, MessageBody, Payload, Progress, ProgressState, RaftLog, RejectHint,
};

/// A probe is answered at or past its previous entry; an older success
/// (reordered, duplicated, or sent before the follower was removed and
/// added back) moves the match but neither ends the probe nor lets a
/// second probe go. The answer that ends it streams on from its index.
#[test]
fn stale_success_does_not_end_a_probe() {
    let mut pr = Progress::new(11);
    pr.probe_from(8);
    pr.sent(7, 0, 1);
    assert!(pr.probe_sent);
    assert!(pr.acked(5), "the match moves");
    assert_eq!(pr.match_index, 5);
    assert_eq!(
        (pr.state, pr.next, pr.probe_sent),
        (ProgressState::Probe, 8, true)
    );
    assert!(!pr.can_send(8, 1 << 20), "the probe is still outstanding");
    // The probe's answer: the follower holds through 9.
    assert!(pr.acked(9));
    assert_eq!(
        (pr.state, pr.next, pr.match_index),
        (ProgressState::Replicate, 10, 9)
    );
    assert!(pr.can_send(8, 1 << 20));
}

/// A progress made afresh for a node added back: `next` is past the
/// leader's log. A success from before the removal is stale; the probe's
/// own answer sets `next` right after what it matched.
#[test]
fn leaving_probe_streams_from_the_match() {
    let mut pr = Progress::new(21);
    pr.sent(20, 0, 1);
    assert!(!pr.acked(0));
    assert_eq!(pr.state, ProgressState::Probe);
    assert!(pr.acked(20));
    assert_eq!((pr.state, pr.next), (ProgressState::Replicate, 21));
    // A later stale ack in Replicate changes nothing.
    pr.sent(25, 100, 2);
    assert!(!pr.acked(12));
    assert_eq!((pr.next, pr.match_index, pr.inflight_len()), (26, 20, 1));
}

/// While a snapshot is on its way, only an answer at or past its index
/// ends the Snapshot state.
#[test]
fn stale_success_does_not_end_a_snapshot_send() {
    let mut pr = Progress::new(3);
    pr.snapshot_sent(50, 1);
    assert!(pr.acked(20));
    assert_eq!((pr.state, pr.next), (ProgressState::Snapshot, 51));
    assert!(pr.acked(50));
    assert_eq!((pr.state, pr.next), (ProgressState::Replicate, 51));
}

/// Losses are detected by round trips: a message is taken as lost once a
/// heartbeat sent a whole round after it was answered, not on the first
/// heartbeat answer (which a reordering network may deliver first).
#[test]
fn losses_are_detected_per_round_trip() {
    // Replicate: the window's oldest message left during round 3.
    let mut pr = Progress::new(1);
    pr.sent(0, 0, 3);
    pr.acked(0);
    assert_eq!(pr.state, ProgressState::Replicate);
    pr.sent(4, 40, 3);
    pr.sent(8, 40, 4);
    assert!(!pr.heartbeat_answered(3));
    assert!(!pr.heartbeat_answered(4));
    assert_eq!(pr.state, ProgressState::Replicate);
    assert!(
        pr.heartbeat_answered(5),
        "round 5 left a round after round 3 ended"
    );
    assert_eq!(
        (pr.state, pr.next, pr.inflight_len()),
        (ProgressState::Probe, 1, 0)
    );
    // Probe: one probe per round trip, however many heartbeats answer.
    pr.sent(0, 0, 7);
    for round in [5, 6, 7, 8] {
        pr.heartbeat_answered(round);
        assert!(pr.probe_sent, "round {round}");
    }
    pr.heartbeat_answered(9);
    assert!(!pr.probe_sent);
    // Snapshot: asked about once per round trip.
    pr.snapshot_sent(40, 9);
    assert!(!pr.snapshot_probe_due(10));
    assert!(pr.snapshot_probe_due(11));
    assert!(!pr.snapshot_probe_due(12));
    assert!(pr.snapshot_probe_due(13));
}

/// Two appends in flight arrive in the wrong order: the follower rejects
/// the second ("log too short"). That reject is inside the window and the
/// first fills the gap: the leader keeps streaming instead of probing and
/// sending the window again.
#[test]
fn reordered_too_short_reject_keeps_the_stream() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(
        c.raft(1).progress(2).unwrap().state,
        ProgressState::Replicate
    );
    c.cut.insert((1, 3));
    c.propose(1, &["a"]);
    c.propose(1, &["b"]);
    let appends: Vec<usize> = (0..c.net.len())
        .filter(|&i| c.net[i].to == 2 && matches!(c.net[i].body, MessageBody::Append { .. }))
        .collect();
    assert_eq!(appends.len(), 2);
    c.net.swap(appends[0], appends[1]);
    // The second append, then its reject, reach their ends first.
    assert!(c.deliver_one());
    let reject = c.net.pop_back().unwrap();
    assert!(matches!(
        reject.body,
        MessageBody::AppendResponse { success: false, .. }
    ));
    let sent_before = c.net.len();
    c.nodes.get_mut(&1).unwrap().raft.step(reject);
    c.drain(1);
    let pr = c.raft(1).progress(2).unwrap();
    assert_eq!(pr.state, ProgressState::Replicate, "{pr:?}");
    assert_eq!(pr.inflight_len(), 2);
    assert_eq!(c.net.len(), sent_before, "nothing sent again");
    // The first arrives; the second is sent again only once the stall is
    // seen over a round trip.
    c.deliver_all();
    assert_eq!(
        c.raft(1).progress(2).unwrap().match_index,
        c.raft(1).last_index() - 1
    );
    c.tick_all(8);
    assert_eq!(
        c.raft(1).progress(2).unwrap().match_index,
        c.raft(1).last_index()
    );
    assert_eq!(c.raft(1).commit(), c.raft(1).last_index());
}

/// The bytes in flight go down by what each acknowledgement covers, and
/// back to zero once everything sent is acknowledged: `can_send`'s byte
/// bound depends on it.
#[test]
fn acknowledged_bytes_leave_the_window() {
    let mut p = Progress::new(1);
    // The probe's answer (an empty log matched) starts the stream.
    p.acked(0);
    assert_eq!(p.state, ProgressState::Replicate);
    p.sent(10, 1_000, 1);
    p.sent(20, 3_000, 1);
    p.sent(30, 500, 1);
    assert_eq!((p.inflight_len(), p.inflight_bytes()), (3, 4_500));
    assert!(!p.can_send(8, 4_500), "the byte bound is reached");
    p.acked(20);
    assert_eq!((p.inflight_len(), p.inflight_bytes()), (1, 500));
    assert!(p.can_send(8, 4_500));
    p.acked(30);
    assert_eq!((p.inflight_len(), p.inflight_bytes()), (0, 0));
}

/// What an entry counts against the batch and flow-control bounds: its
/// payload plus the fixed overhead.
#[test]
fn an_entry_counts_its_payload_and_the_overhead() {
    use skiff_raft::{Entry, Payload, ENTRY_OVERHEAD_BYTES};
    let e = |payload| Entry {
        index: 1,
        term: 1,
        payload,
    };
    let p = Payload::Normal(bytes::Bytes::from(vec![7u8; 100]));
    assert_eq!(e(p.clone()).size(), ENTRY_OVERHEAD_BYTES + p.size());
    assert!(p.size() >= 100);
    assert_eq!(
        e(Payload::Noop).size(),
        ENTRY_OVERHEAD_BYTES + Payload::Noop.size()
    );
    // A membership counts 8 bytes a member and each member's meta with a
    // 12-byte overhead.
    let mut m = skiff_raft::Membership::with_voters([1, 2, 3]);
    m.learners.insert(4);
    m.meta.insert(1, bytes::Bytes::from(vec![0u8; 40]));
    m.meta.insert(4, bytes::Bytes::from(vec![0u8; 100]));
    assert_eq!(
        Payload::Membership(m).size(),
        8 * 4 + (12 + 40) + (12 + 100)
    );
}

/// Node 1 leads and has streamed five entries to 2, which holds them all;
/// returns the cluster and the leader's last index.
fn streaming_to_2() -> (Cluster, u64) {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.deliver_all();
    for i in 0..5 {
        c.propose(1, &[&format!("e{i}")]);
        c.deliver_all();
    }
    c.tick_all(2);
    let last = c.raft(1).last_index();
    (c, last)
}

/// Node 2 answers leader 1, in 1's term, with a reject carrying `hint`;
/// 1 handles it (what it sends is queued).
fn reject_from_2(c: &mut Cluster, hint: RejectHint) {
    let reject = Message {
        from: 2,
        to: 1,
        term: c.raft(1).term(),
        body: MessageBody::AppendResponse {
            success: false,
            match_index: 0,
            reject: Some(hint),
        },
    };
    c.nodes.get_mut(&1).unwrap().raft.step(reject);
    c.drain(1);
}

/// A reject that answers an older message (its `prev_index` below what the
/// follower is known to match) changes nothing, whatever it says of the
/// follower's terms: the leader neither rewinds nor resends.
#[test]
fn a_reject_below_the_match_is_stale() {
    let (mut c, last) = streaming_to_2();
    let pr = c.raft(1).progress(2).unwrap().clone();
    assert_eq!(
        (pr.state, pr.match_index, pr.next),
        (ProgressState::Replicate, last, last + 1)
    );
    let term = c.raft(1).term();
    let sent_before = c.net.len();
    reject_from_2(
        &mut c,
        RejectHint {
            rejected: last - 3,
            conflict_term: Some(term),
            conflict_index: 2,
        },
    );
    let after = c.raft(1).progress(2).unwrap();
    assert_eq!(
        (after.state, after.match_index, after.next),
        (ProgressState::Replicate, last, last + 1),
        "a stale reject moved the follower's progress"
    );
    assert_eq!(
        c.net.len(),
        sent_before,
        "a stale reject made the leader send"
    );
}

/// A "log too short" reject inside the window that ends the follower's log
/// at or below its match (it lost entries it had acknowledged: a disk
/// that lied) is not stale: the leader stops streaming and probes, from
/// its match (as etcd's raft, never below it: Raft assumes acknowledged
/// entries stay).
#[test]
fn a_too_short_reject_ending_at_the_match_probes_again() {
    // The follower's log ends one entry, then two, before its match.
    for lost in [1, 2] {
        short_reject_below_the_match(lost);
    }
}

fn short_reject_below_the_match(lost: u64) {
    let (mut c, last) = streaming_to_2();
    c.propose(1, &["x"]);
    c.propose(1, &["y"]);
    c.net.retain(|m| m.to != 2);
    let pr = c.raft(1).progress(2).unwrap().clone();
    assert_eq!(
        (pr.state, pr.match_index, pr.next),
        (ProgressState::Replicate, last, last + 3)
    );
    let sent_before = c.net.len();
    reject_from_2(
        &mut c,
        RejectHint {
            rejected: last + 1,
            conflict_term: None,
            conflict_index: last + 1 - lost,
        },
    );
    let after = c.raft(1).progress(2).unwrap();
    assert_eq!((after.state, after.next), (ProgressState::Probe, last + 1));
    let probes: Vec<_> = c
        .net
        .iter()
        .skip(sent_before)
        .filter_map(|m| match m.body {
            MessageBody::Append { prev_index, .. } if m.to == 2 => Some(prev_index),
            _ => None,
        })
        .collect();
    assert_eq!(probes, vec![last], "one probe, from the match");
}

/// An acknowledgement past what was sent (the follower already held those
/// entries) moves the stream on past it.
#[test]
fn an_ack_past_what_was_sent_moves_next_past_it() {
    let mut pr = Progress::new(1);
    pr.sent(0, 0, 1);
    pr.acked(0);
    assert_eq!(pr.state, ProgressState::Replicate);
    pr.sent(4, 40, 1);
    assert_eq!(pr.next, 5);
    assert!(pr.acked(9));
    assert_eq!((pr.next, pr.match_index, pr.inflight_len()), (10, 9, 0));
}

/// The leader's side of a conflict hint: the last index whose term is at
/// most the follower's, searching back from where the follower rejected.
#[test]
fn last_index_with_term_at_most_searches_back_by_term() {
    let entry = |index, term| Entry {
        index,
        term,
        payload: Payload::Noop,
    };
    let log = RaftLog::restore(
        2,
        1,
        vec![
            entry(3, 1),
            entry(4, 2),
            entry(5, 2),
            entry(6, 4),
            entry(7, 4),
        ],
        2,
    );
    assert_eq!(log.last_index_with_term_at_most(4, 7), 7);
    assert_eq!(log.last_index_with_term_at_most(3, 7), 5);
    assert_eq!(log.last_index_with_term_at_most(2, 7), 5);
    assert_eq!(log.last_index_with_term_at_most(2, 4), 4);
    assert_eq!(log.last_index_with_term_at_most(1, 7), 3);
    // Nothing at or below term 0 above the base: the base.
    assert_eq!(log.last_index_with_term_at_most(0, 7), 2);
    // From past the end: from the last index.
    assert_eq!(log.last_index_with_term_at_most(3, 100), 5);
}
