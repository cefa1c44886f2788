//! The simulated network: each control does what it says, and the same
//! seed with the same calls gives the same run, message for message. No
//! runtime and no clock: plain tests driving it by hand.

use proptest::prelude::*;
use skiff_net::{
    Inbox, SendError, SimDelivery, SimFaults, SimNetConfig, SimNetwork, SimOutcome, SimTransport,
    Transport,
};
use skiff_raft::{Message, MessageBody, NodeId};

/// A small message numbered `n` (its heartbeat round).
fn msg(from: NodeId, to: NodeId, n: u64) -> Message {
    Message {
        from,
        to,
        term: 1,
        body: MessageBody::Heartbeat {
            commit: 0,
            round: n,
        },
    }
}

fn num(m: &Message) -> u64 {
    match m.body {
        MessageBody::Heartbeat { round, .. } => round,
        _ => panic!("not a numbered message"),
    }
}

fn drain(inbox: &mut Inbox) -> Vec<(NodeId, u64)> {
    std::iter::from_fn(|| inbox.try_recv())
        .map(|m| (m.from, num(&m)))
        .collect()
}

/// A network of nodes 1..=n.
fn network(cfg: SimNetConfig, n: u64) -> (SimNetwork, Vec<SimTransport>, Vec<Inbox>) {
    let net = SimNetwork::new(cfg).unwrap();
    let (ts, inboxes) = (1..=n).map(|id| net.endpoint(id)).unzip();
    (net, ts, inboxes)
}

fn faulty(seed: u64) -> SimNetConfig {
    SimNetConfig {
        faults: SimFaults {
            drop_rate: 0.2,
            duplicate_rate: 0.2,
            reorder_rate: 0.3,
            reorder_delay_max: 5,
            delay_min: 0,
            delay_max: 10,
        },
        ..SimNetConfig::new(seed)
    }
}

#[test]
fn a_perfect_network_delivers_everything_once_in_order() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(1), 3);
    for n in 0..100 {
        ts[0].send(msg(1, 2, n)).unwrap();
        ts[2].send(msg(3, 2, n)).unwrap();
    }
    assert_eq!(net.in_flight(), 200);
    assert_eq!(net.deliver_due(0), 200);
    let got = drain(&mut inboxes[1]);
    let from = |id| got.iter().filter(move |(f, _)| *f == id).map(|(_, n)| *n);
    assert!(from(1).eq(0..100));
    assert!(from(3).eq(0..100));
    assert_eq!(net.stats().delivered, 200);
    assert_eq!(net.in_flight(), 0);
}

#[test]
fn messages_arrive_only_when_due() {
    let cfg = SimNetConfig {
        faults: SimFaults {
            delay_min: 5,
            delay_max: 5,
            ..SimFaults::NONE
        },
        ..SimNetConfig::new(1)
    };
    let (net, ts, mut inboxes) = network(cfg, 2);
    ts[0].send(msg(1, 2, 0)).unwrap();
    assert_eq!(net.next_due(), Some(5));
    assert_eq!(net.deliver_due(4), 0);
    assert!(inboxes[1].try_recv().is_none());
    assert_eq!(net.deliver_due(5), 1);
    assert_eq!(net.now(), 5);
    // Sent at 5, due at 10; time never goes back.
    ts[0].send(msg(1, 2, 1)).unwrap();
    assert_eq!(net.deliver_due(3), 0);
    assert_eq!(net.now(), 5);
    let d = net.step().unwrap();
    assert_eq!(
        d,
        SimDelivery {
            from: 1,
            to: 2,
            at: 10,
            outcome: SimOutcome::Delivered
        }
    );
    assert_eq!(net.now(), 10);
    assert_eq!(drain(&mut inboxes[1]), vec![(1, 0), (1, 1)]);
    assert_eq!(net.step(), None);
}

/// A run on a faulty network: every delivery and every inbox's contents.
fn run(seed: u64) -> (Vec<SimDelivery>, Vec<Vec<(NodeId, u64)>>) {
    let (net, ts, mut inboxes) = network(faulty(seed), 3);
    let mut trace = Vec::new();
    for n in 0..300 {
        let from = (n % 3) as usize;
        let to = ((n + 1 + n / 3 % 2) % 3) as usize;
        let _ = ts[from].send(msg(from as u64 + 1, to as u64 + 1, n));
        if n % 7 == 0 {
            if let Some(d) = net.step() {
                trace.push(d);
            }
        }
        if n == 150 {
            net.partition(&[1], &[2, 3]);
        }
        if n == 200 {
            net.heal();
        }
    }
    while let Some(d) = net.step() {
        trace.push(d);
    }
    (trace, inboxes.iter_mut().map(drain).collect())
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a.1, run(8).1);
    // The faults did happen.
    assert!(a.0.len() > 100);
}

#[test]
fn dropping_everything_delivers_nothing() {
    let cfg = SimNetConfig {
        faults: SimFaults {
            drop_rate: 1.0,
            ..SimFaults::NONE
        },
        ..SimNetConfig::new(3)
    };
    let (net, ts, mut inboxes) = network(cfg, 2);
    for n in 0..50 {
        // Lost silently, like a network: the send succeeds.
        ts[0].send(msg(1, 2, n)).unwrap();
    }
    assert_eq!(net.deliver_due(100), 0);
    assert!(drain(&mut inboxes[1]).is_empty());
    assert_eq!(net.stats().dropped_random, 50);
}

#[test]
fn a_drop_rate_loses_about_that_share() {
    let cfg = SimNetConfig {
        faults: SimFaults {
            drop_rate: 0.25,
            ..SimFaults::NONE
        },
        ..SimNetConfig::new(4)
    };
    let (net, ts, mut inboxes) = network(cfg, 2);
    for n in 0..4000 {
        ts[0].send(msg(1, 2, n)).unwrap();
    }
    net.deliver_due(0);
    let got = drain(&mut inboxes[1]);
    assert!((2700..3300).contains(&got.len()), "{}", got.len());
    // What arrives is still in order.
    assert!(got.windows(2).all(|w| w[0].1 < w[1].1));
}

#[test]
fn duplicating_everything_delivers_everything_twice() {
    let cfg = SimNetConfig {
        faults: SimFaults {
            duplicate_rate: 1.0,
            ..SimFaults::NONE
        },
        ..SimNetConfig::new(5)
    };
    let (net, ts, mut inboxes) = network(cfg, 2);
    for n in 0..20 {
        ts[0].send(msg(1, 2, n)).unwrap();
    }
    assert_eq!(net.deliver_due(0), 40);
    let got: Vec<u64> = drain(&mut inboxes[1]).into_iter().map(|(_, n)| n).collect();
    let twice: Vec<u64> = (0..20).flat_map(|n| [n, n]).collect();
    assert_eq!(got, twice);
    assert_eq!(net.stats().duplicated, 20);
}

#[test]
fn reordering_lets_later_messages_overtake() {
    let cfg = SimNetConfig {
        faults: SimFaults {
            reorder_rate: 0.3,
            reorder_delay_max: 4,
            ..SimFaults::NONE
        },
        ..SimNetConfig::new(6)
    };
    let (net, ts, mut inboxes) = network(cfg, 2);
    for n in 0..200 {
        ts[0].send(msg(1, 2, n)).unwrap();
        if n % 10 == 9 {
            net.step();
        }
    }
    net.deliver_due(u64::MAX);
    let got: Vec<u64> = drain(&mut inboxes[1]).into_iter().map(|(_, n)| n).collect();
    // All of them, once, but not in order.
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    assert_ne!(got, sorted);
    assert!(net.stats().reordered > 0);
}

#[test]
fn a_symmetric_partition_cuts_both_ways_and_heals() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(8), 3);
    ts[0].send(msg(1, 2, 0)).unwrap(); // in flight when the cut comes
    net.partition(&[1], &[2]);
    assert!(!net.is_link_up(1, 2) && !net.is_link_up(2, 1));
    assert!(net.is_link_up(1, 3));
    ts[0].send(msg(1, 2, 1)).unwrap();
    ts[1].send(msg(2, 1, 2)).unwrap();
    ts[0].send(msg(1, 3, 3)).unwrap();
    net.deliver_due(0);
    assert!(drain(&mut inboxes[1]).is_empty());
    assert!(drain(&mut inboxes[0]).is_empty());
    assert_eq!(drain(&mut inboxes[2]), vec![(1, 3)]);
    assert_eq!(net.stats().dropped_partition, 3);

    net.heal();
    ts[0].send(msg(1, 2, 4)).unwrap();
    ts[1].send(msg(2, 1, 5)).unwrap();
    net.deliver_due(0);
    assert_eq!(drain(&mut inboxes[1]), vec![(1, 4)]);
    assert_eq!(drain(&mut inboxes[0]), vec![(2, 5)]);
}

#[test]
fn a_one_way_cut_leaves_the_other_direction() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(9), 2);
    net.cut(1, 2);
    ts[0].send(msg(1, 2, 0)).unwrap();
    ts[1].send(msg(2, 1, 1)).unwrap();
    net.deliver_due(0);
    assert!(drain(&mut inboxes[1]).is_empty());
    assert_eq!(drain(&mut inboxes[0]), vec![(2, 1)]);
    net.heal_link(1, 2);
    ts[0].send(msg(1, 2, 2)).unwrap();
    net.deliver_due(0);
    assert_eq!(drain(&mut inboxes[1]), vec![(1, 2)]);
}

#[test]
fn an_isolated_node_hears_and_is_heard_by_no_one() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(10), 3);
    net.isolate(2);
    ts[0].send(msg(1, 2, 0)).unwrap();
    ts[1].send(msg(2, 3, 1)).unwrap();
    ts[0].send(msg(1, 3, 2)).unwrap();
    net.deliver_due(0);
    assert!(drain(&mut inboxes[1]).is_empty());
    assert_eq!(drain(&mut inboxes[2]), vec![(1, 2)]);
}

#[test]
fn a_down_node_is_reported_unreachable() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(11), 2);
    ts[0].send(msg(1, 2, 0)).unwrap(); // in flight when it goes down
    net.set_down(2, true);
    assert_eq!(
        ts[0].send(msg(1, 2, 1)),
        Err(SendError::Disconnected { peer: 2 })
    );
    assert_eq!(
        ts[1].send(msg(2, 1, 2)),
        Err(SendError::ShutDown { peer: 1 })
    );
    assert_eq!(net.step().map(|d| d.outcome), Some(SimOutcome::DroppedDown));
    net.set_down(2, false);
    ts[0].send(msg(1, 2, 3)).unwrap();
    net.deliver_due(0);
    assert_eq!(drain(&mut inboxes[1]), vec![(1, 3)]);
    // Nobody there, or itself: not a peer.
    assert_eq!(
        ts[0].send(msg(1, 9, 0)),
        Err(SendError::UnknownPeer { peer: 9 })
    );
    assert_eq!(
        ts[0].send(msg(1, 1, 0)),
        Err(SendError::UnknownPeer { peer: 1 })
    );
}

#[test]
fn a_full_link_is_reported() {
    let cfg = SimNetConfig {
        send_queue_max: 3,
        ..SimNetConfig::new(12)
    };
    let (net, ts, mut inboxes) = network(cfg, 3);
    for n in 0..3 {
        ts[0].send(msg(1, 2, n)).unwrap();
    }
    let err = ts[0].send(msg(1, 2, 3)).unwrap_err();
    assert_eq!(
        err,
        SendError::QueueFull {
            peer: 2,
            send_queue_max: 3
        }
    );
    assert_eq!(err.peer(), 2);
    // Per link: another destination is not affected.
    ts[0].send(msg(1, 3, 0)).unwrap();
    net.step();
    ts[0].send(msg(1, 2, 4)).unwrap();
    net.deliver_due(0);
    assert_eq!(drain(&mut inboxes[1]), vec![(1, 0), (1, 1), (1, 2), (1, 4)]);
}

#[test]
fn a_full_inbox_holds_messages_in_flight_without_loss() {
    let cfg = SimNetConfig {
        inbox_max: 2,
        ..SimNetConfig::new(13)
    };
    let (net, ts, mut inboxes) = network(cfg, 3);
    for n in 0..5 {
        ts[0].send(msg(1, 2, n)).unwrap();
    }
    ts[0].send(msg(1, 3, 9)).unwrap();
    // Node 2's inbox takes two; node 3 is not held up by it.
    assert_eq!(net.deliver_due(0), 3);
    assert_eq!(net.in_flight(), 3);
    assert_eq!(inboxes[1].len(), 2);
    assert_eq!(drain(&mut inboxes[2]), vec![(1, 9)]);
    assert_eq!(net.step(), None);
    let mut got = drain(&mut inboxes[1]);
    while net.deliver_due(0) > 0 {
        got.extend(drain(&mut inboxes[1]));
    }
    assert_eq!(got, (0..5).map(|n| (1, n)).collect::<Vec<_>>());
    assert!(net.stats().deferred_inbox_full > 0);
}

#[test]
fn a_restarted_endpoint_gets_a_new_inbox() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(14), 2);
    ts[0].send(msg(1, 2, 0)).unwrap();
    let (_t2, mut inbox2) = net.endpoint(2);
    net.deliver_due(0);
    assert!(inboxes[1].try_recv().is_none());
    assert!(inboxes[1].is_closed());
    assert_eq!(drain(&mut inbox2), vec![(1, 0)]);
}

#[test]
fn it_is_a_transport_like_any_other() {
    let (net, ts, mut inboxes) = network(SimNetConfig::new(15), 2);
    let t: Box<dyn Transport> = Box::new(ts[0].clone());
    assert_eq!(t.local_id(), 1);
    t.send(msg(1, 2, 0)).unwrap();
    net.deliver_due(0);
    assert_eq!(inboxes[1].blocking_recv().map(|m| num(&m)), Some(0));
}

#[test]
fn bad_settings_name_the_field() {
    let cases = [
        (
            "drop_rate",
            SimFaults {
                drop_rate: 1.5,
                ..SimFaults::NONE
            },
        ),
        (
            "duplicate_rate",
            SimFaults {
                duplicate_rate: -0.1,
                ..SimFaults::NONE
            },
        ),
        (
            "reorder_rate",
            SimFaults {
                reorder_rate: f64::NAN,
                ..SimFaults::NONE
            },
        ),
        (
            "delay_max",
            SimFaults {
                delay_min: 5,
                delay_max: 4,
                ..SimFaults::NONE
            },
        ),
        (
            "delay_max",
            SimFaults {
                delay_max: u64::MAX,
                ..SimFaults::NONE
            },
        ),
        (
            "reorder_delay_max",
            SimFaults {
                reorder_rate: 0.5,
                ..SimFaults::NONE
            },
        ),
    ];
    let net = SimNetwork::new(SimNetConfig::new(0)).unwrap();
    for (field, faults) in cases {
        assert_eq!(faults.validate().unwrap_err().field, field);
        assert_eq!(net.set_faults(faults).unwrap_err().field, field);
    }
    assert_eq!(net.faults(), SimFaults::NONE);
    let bad = SimNetConfig {
        inbox_max: 0,
        ..SimNetConfig::new(0)
    };
    assert_eq!(SimNetwork::new(bad).unwrap_err().field, "inbox_max");
    let bad = SimNetConfig {
        send_queue_max: 0,
        ..SimNetConfig::new(0)
    };
    assert_eq!(SimNetwork::new(bad).unwrap_err().field, "send_queue_max");
}

proptest! {
    /// Without drop, duplication or reordering, any delays and any
    /// interleaving of sends and deliveries deliver every message exactly
    /// once, each link in order.
    #[test]
    fn links_are_fifo_and_lossless_under_any_delay(
        seed in any::<u64>(),
        delay_min in 0u64..20,
        spread in 0u64..50,
        sends in proptest::collection::vec((0usize..3, 0usize..3, 0u64..30), 1..200),
    ) {
        let cfg = SimNetConfig {
            faults: SimFaults { delay_min, delay_max: delay_min + spread, ..SimFaults::NONE },
            ..SimNetConfig::new(seed)
        };
        let (net, ts, mut inboxes) = network(cfg, 3);
        let mut sent = [[0u64; 3]; 3];
        let mut now = 0;
        for (from, to, advance) in sends {
            if from != to {
                let n = sent[from][to];
                ts[from].send(msg(from as u64 + 1, to as u64 + 1, n)).unwrap();
                sent[from][to] += 1;
            }
            now += advance;
            net.deliver_due(now);
        }
        while net.step().is_some() {}
        for (to, inbox) in inboxes.iter_mut().enumerate() {
            let got = drain(inbox);
            for (from, row) in sent.iter().enumerate() {
                let from_id = from as u64 + 1;
                let nums: Vec<u64> = got.iter().filter(|(f, _)| *f == from_id).map(|(_, n)| *n).collect();
                prop_assert_eq!(nums, (0..row[to]).collect::<Vec<_>>());
            }
        }
    }
}
