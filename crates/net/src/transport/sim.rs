//! A simulated network implementing [`Transport`], for the tests of the
//! crates above this one: deterministic from a seed, driven by explicit
//! calls, never by the wall clock.
//!
//! A [`SimNetwork`] holds every message in flight. Each node takes an
//! endpoint ([`SimNetwork::endpoint`]): a [`SimTransport`] to send with and
//! an [`Inbox`] to receive from, the same types a node uses over TCP. Time
//! is a number ([`SimTime`], in whatever unit the test likes) that only
//! moves when the test says so: [`SimNetwork::deliver_due`] delivers every
//! message due by a given time, [`SimNetwork::step`] the next one.
//!
//! # What happens to a message
//!
//! At `send` (one seeded draw after another, in this order):
//! 1. Refused, as [`SendError`]: the sender is down (`ShutDown`), the
//!    destination has no endpoint or is the sender (`UnknownPeer`), is down
//!    (`Disconnected`, as TCP reports a peer it cannot connect to), or its
//!    link already has `send_queue_max` messages in flight (`QueueFull`).
//! 2. Lost silently (`send` returns `Ok`, as TCP does before it notices):
//!    the link is cut (a partition), or the `drop_rate` draw says so.
//! 3. Otherwise it is in flight, due at `now + delay` (`delay` uniform in
//!    `delay_min..=delay_max`) and never before an earlier message on its
//!    link (links are FIFO) — unless the `reorder_rate` draw holds it back
//!    by `1..=reorder_delay_max` more, letting later messages on the link
//!    overtake it. The `duplicate_rate` draw puts a second copy in flight.
//!
//! At delivery, in order of due time (ties in order of sending): a message
//! whose link has been cut since, or whose destination is down, is lost; a
//! message whose destination inbox is full stays in flight, and so do the
//! later ones to that destination (backpressure, no loss), until a later
//! call finds room.
//!
//! Same seed, same configuration, same calls: same outcome, message for
//! message.
//!
//! This module must never read the clock, spawn a thread, or need a
//! runtime: tests drive it from plain code.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use skiff_raft::{Message, NodeId, Rng};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::config::{check_queue_bound, TransportConfigError};
use super::tcp::lock;
use super::{Inbox, SendError, Transport};

/// Simulated time, in the unit the test chooses (ticks, milliseconds).
pub type SimTime = u64;

/// The largest delay accepted, so that due times never overflow.
const SIM_DELAY_LIMIT: SimTime = 1 << 48;

/// What the network does to messages; see the module docs for when each
/// applies. Rates are probabilities in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimFaults {
    pub drop_rate: f64,
    pub duplicate_rate: f64,
    pub reorder_rate: f64,
    /// A reordered message is held back by `1..=reorder_delay_max` beyond
    /// its place in its link's order (at least 1 when `reorder_rate > 0`).
    pub reorder_delay_max: SimTime,
    pub delay_min: SimTime,
    pub delay_max: SimTime,
}

impl SimFaults {
    /// A perfect network: no loss, no delay, in order.
    pub const NONE: SimFaults = SimFaults {
        drop_rate: 0.0,
        duplicate_rate: 0.0,
        reorder_rate: 0.0,
        reorder_delay_max: 0,
        delay_min: 0,
        delay_max: 0,
    };

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        let err = |field: &'static str, reason: String| Err(TransportConfigError { field, reason });
        for (field, rate) in [
            ("drop_rate", self.drop_rate),
            ("duplicate_rate", self.duplicate_rate),
            ("reorder_rate", self.reorder_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return err(field, format!("must be in 0.0..=1.0, got {rate}"));
            }
        }
        for (field, d) in [
            ("delay_min", self.delay_min),
            ("delay_max", self.delay_max),
            ("reorder_delay_max", self.reorder_delay_max),
        ] {
            if d > SIM_DELAY_LIMIT {
                return err(field, format!("must be at most {SIM_DELAY_LIMIT}, got {d}"));
            }
        }
        if self.delay_max < self.delay_min {
            return err(
                "delay_max",
                format!(
                    "must be at least delay_min ({}), got {}",
                    self.delay_min, self.delay_max
                ),
            );
        }
        if self.reorder_rate > 0.0 && self.reorder_delay_max == 0 {
            return err(
                "reorder_delay_max",
                "must be at least 1 when reorder_rate is above 0".into(),
            );
        }
        Ok(())
    }
}

impl Default for SimFaults {
    fn default() -> SimFaults {
        SimFaults::NONE
    }
}

/// Settings of a [`SimNetwork`].
#[derive(Debug, Clone, PartialEq)]
pub struct SimNetConfig {
    /// Every random draw comes from it.
    pub seed: u64,
    /// Messages in flight per link (one direction between two nodes),
    /// counting those waiting for inbox room; a send past it is
    /// [`SendError::QueueFull`].
    pub send_queue_max: usize,
    /// Each endpoint's [`Inbox`] bound.
    pub inbox_max: usize,
    pub faults: SimFaults,
}

impl SimNetConfig {
    /// A perfect network seeded with `seed`, with the TCP transport's
    /// default bounds.
    pub fn new(seed: u64) -> SimNetConfig {
        SimNetConfig {
            seed,
            send_queue_max: 4096,
            inbox_max: 4096,
            faults: SimFaults::NONE,
        }
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        check_queue_bound("send_queue_max", self.send_queue_max)?;
        check_queue_bound("inbox_max", self.inbox_max)?;
        self.faults.validate()
    }
}

/// Counts of what happened to messages, since the network was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Calls to `send`.
    pub sent: u64,
    /// Messages put in an inbox (duplicates included).
    pub delivered: u64,
    /// Lost by the `drop_rate` draw.
    pub dropped_random: u64,
    /// Lost to a cut link, at send or at delivery.
    pub dropped_partition: u64,
    /// Lost at delivery because the destination was down.
    pub dropped_down: u64,
    /// Lost at delivery because the destination's inbox was dropped.
    pub dropped_closed: u64,
    /// Extra copies put in flight.
    pub duplicated: u64,
    /// Messages held back to be overtaken.
    pub reordered: u64,
    /// Sends refused: link full.
    pub refused_queue_full: u64,
    /// Sends refused: sender or destination down.
    pub refused_down: u64,
    /// Sends refused: no such endpoint.
    pub refused_unknown: u64,
    /// Deliveries put off because the destination's inbox was full.
    pub deferred_inbox_full: u64,
}

/// What became of a message the network handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOutcome {
    Delivered,
    /// The link was cut by the time it was due.
    DroppedPartition,
    /// The destination was down by the time it was due.
    DroppedDown,
    /// The destination's inbox was dropped.
    DroppedClosed,
}

/// One message the network handled: delivered or lost at its due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimDelivery {
    pub from: NodeId,
    pub to: NodeId,
    /// When it was due.
    pub at: SimTime,
    pub outcome: SimOutcome,
}

/// The simulated network: a handle, cheap to clone, on state shared with
/// every endpoint.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

/// One node's side of a [`SimNetwork`].
#[derive(Debug, Clone)]
pub struct SimTransport {
    id: NodeId,
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug)]
struct SimState {
    cfg: SimNetConfig,
    rng: Rng,
    now: SimTime,
    /// Orders messages sent at the same time; increasing.
    seq: u64,
    endpoints: BTreeMap<NodeId, Endpoint>,
    /// By (due, seq): the delivery order.
    in_flight: BTreeMap<(SimTime, u64), InFlight>,
    links: BTreeMap<(NodeId, NodeId), Link>,
    /// One-way cuts (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Nodes cut from everyone, both ways.
    isolated: BTreeSet<NodeId>,
    stats: SimStats,
}

#[derive(Debug)]
struct Endpoint {
    inbox: mpsc::Sender<Message>,
    down: bool,
}

#[derive(Debug)]
struct InFlight {
    from: NodeId,
    to: NodeId,
    msg: Message,
}

#[derive(Debug, Default)]
struct Link {
    /// Messages in flight on the link; at most `send_queue_max`.
    in_flight: usize,
    /// The latest due time of a message kept in link order: the next one
    /// is due no earlier.
    last_due: SimTime,
}

impl SimNetwork {
    pub fn new(cfg: SimNetConfig) -> Result<SimNetwork, TransportConfigError> {
        cfg.validate()?;
        Ok(SimNetwork {
            state: Arc::new(Mutex::new(SimState {
                rng: Rng::new(cfg.seed),
                cfg,
                now: 0,
                seq: 0,
                endpoints: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                links: BTreeMap::new(),
                cut: BTreeSet::new(),
                isolated: BTreeSet::new(),
                stats: SimStats::default(),
            })),
        })
    }

    /// Node `id`'s endpoint. Calling it again for the same node (a restart)
    /// replaces the inbox: the old one ends, and messages still in flight
    /// go to the new one. The node is up.
    ///
    /// # Panics
    ///
    /// If `id` is 0 (never a node).
    pub fn endpoint(&self, id: NodeId) -> (SimTransport, Inbox) {
        assert_ne!(id, 0, "node ids start at 1");
        let mut st = lock(&self.state);
        let (tx, inbox) = Inbox::channel(st.cfg.inbox_max);
        st.endpoints.insert(
            id,
            Endpoint {
                inbox: tx,
                down: false,
            },
        );
        let transport = SimTransport {
            id,
            state: Arc::clone(&self.state),
        };
        (transport, inbox)
    }

    /// Replaces the fault settings (for messages sent from now on).
    pub fn set_faults(&self, faults: SimFaults) -> Result<(), TransportConfigError> {
        faults.validate()?;
        lock(&self.state).cfg.faults = faults;
        Ok(())
    }

    pub fn faults(&self) -> SimFaults {
        lock(&self.state).cfg.faults
    }

    /// Cuts every link between a node of `a` and a node of `b`, both ways.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut st = lock(&self.state);
        for &x in a {
            for &y in b {
                st.cut.insert((x, y));
                st.cut.insert((y, x));
            }
        }
    }

    /// Cuts the link from `from` to `to` only: `to` still reaches `from`.
    pub fn cut(&self, from: NodeId, to: NodeId) {
        lock(&self.state).cut.insert((from, to));
    }

    /// Restores the link from `from` to `to` (one way).
    pub fn heal_link(&self, from: NodeId, to: NodeId) {
        lock(&self.state).cut.remove(&(from, to));
    }

    /// Cuts `id` from every other node, both ways, until [`heal`](Self::heal).
    pub fn isolate(&self, id: NodeId) {
        lock(&self.state).isolated.insert(id);
    }

    /// Restores every link (cuts and isolations; not nodes down).
    pub fn heal(&self) {
        let mut st = lock(&self.state);
        st.cut.clear();
        st.isolated.clear();
    }

    /// Takes node `id` down (sends to it are refused as `Disconnected`,
    /// sends from it as `ShutDown`, messages in flight to it are lost) or
    /// brings it back up.
    pub fn set_down(&self, id: NodeId, down: bool) {
        if let Some(ep) = lock(&self.state).endpoints.get_mut(&id) {
            ep.down = down;
        }
    }

    /// Whether a message from `from` to `to` would get through the cuts.
    pub fn is_link_up(&self, from: NodeId, to: NodeId) -> bool {
        !lock(&self.state).is_cut(from, to)
    }

    /// The latest time delivery was driven to.
    pub fn now(&self) -> SimTime {
        lock(&self.state).now
    }

    /// When the next message in flight is due.
    pub fn next_due(&self) -> Option<SimTime> {
        lock(&self.state)
            .in_flight
            .keys()
            .next()
            .map(|&(due, _)| due)
    }

    /// Messages in flight (including those waiting for inbox room).
    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight.len()
    }

    pub fn stats(&self) -> SimStats {
        lock(&self.state).stats
    }

    /// Moves time to `now` (never back) and handles every message due by
    /// then, in order; returns how many were delivered. Messages to a full
    /// inbox stay in flight.
    pub fn deliver_due(&self, now: SimTime) -> usize {
        let mut st = lock(&self.state);
        st.now = st.now.max(now);
        let mut delivered = 0;
        st.drive(Some(now), |d| {
            delivered += usize::from(d.outcome == SimOutcome::Delivered);
            true
        });
        delivered
    }

    /// Handles the one next message (delivered or lost), whatever its due
    /// time, moving time to it. `None` when nothing in flight can move
    /// (nothing is, or every destination's inbox is full).
    pub fn step(&self) -> Option<SimDelivery> {
        let mut st = lock(&self.state);
        let mut handled = None;
        st.drive(None, |d| {
            handled = Some(d);
            false
        });
        if let Some(d) = handled {
            st.now = st.now.max(d.at);
        }
        handled
    }
}

impl Transport for SimTransport {
    fn local_id(&self) -> NodeId {
        self.id
    }

    fn send(&self, msg: Message) -> Result<(), SendError> {
        lock(&self.state).send(self.id, msg)
    }

    /// The simulated network routes by node id: addresses mean nothing.
    fn set_peers(&self, _: &std::collections::BTreeMap<NodeId, crate::PeerAddr>) {}
}

impl SimState {
    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&(from, to))
            || self.isolated.contains(&from)
            || self.isolated.contains(&to)
    }

    fn send(&mut self, from: NodeId, msg: Message) -> Result<(), SendError> {
        let to = msg.to;
        self.stats.sent += 1;
        if self.endpoints.get(&from).is_some_and(|ep| ep.down) {
            self.stats.refused_down += 1;
            return Err(SendError::ShutDown { peer: to });
        }
        let dest_down = match self.endpoints.get(&to) {
            Some(ep) if to != from => ep.down,
            _ => {
                self.stats.refused_unknown += 1;
                return Err(SendError::UnknownPeer { peer: to });
            }
        };
        if dest_down {
            self.stats.refused_down += 1;
            return Err(SendError::Disconnected { peer: to });
        }
        let send_queue_max = self.cfg.send_queue_max;
        if self.link_in_flight(from, to) >= send_queue_max {
            self.stats.refused_queue_full += 1;
            return Err(SendError::QueueFull {
                peer: to,
                send_queue_max,
            });
        }
        if self.is_cut(from, to) {
            self.stats.dropped_partition += 1;
            return Ok(());
        }
        let faults = self.cfg.faults;
        if chance(&mut self.rng, faults.drop_rate) {
            self.stats.dropped_random += 1;
            return Ok(());
        }
        if chance(&mut self.rng, faults.duplicate_rate) {
            let copy = msg.clone();
            self.enqueue(from, to, msg);
            // The copy needs room on the link like any message.
            if self.link_in_flight(from, to) < send_queue_max {
                self.stats.duplicated += 1;
                self.enqueue(from, to, copy);
            }
        } else {
            self.enqueue(from, to, msg);
        }
        Ok(())
    }

    fn link_in_flight(&self, from: NodeId, to: NodeId) -> usize {
        self.links.get(&(from, to)).map_or(0, |l| l.in_flight)
    }

    /// Puts a message in flight, at its due time.
    fn enqueue(&mut self, from: NodeId, to: NodeId, msg: Message) {
        let faults = self.cfg.faults;
        let delay = uniform(&mut self.rng, faults.delay_min, faults.delay_max);
        let held = if chance(&mut self.rng, faults.reorder_rate) {
            self.stats.reordered += 1;
            Some(uniform(&mut self.rng, 1, faults.reorder_delay_max))
        } else {
            None
        };
        let now = self.now;
        let link = self.links.entry((from, to)).or_default();
        let in_order = now.saturating_add(delay).max(link.last_due);
        let due = match held {
            // Not recorded as the link's last: later messages may pass it.
            Some(extra) => in_order.saturating_add(extra),
            None => {
                link.last_due = in_order;
                in_order
            }
        };
        link.in_flight += 1;
        debug_assert!(link.in_flight <= self.cfg.send_queue_max);
        self.seq += 1;
        self.in_flight
            .insert((due, self.seq), InFlight { from, to, msg });
    }

    /// Handles messages in delivery order, up to due time `until` (all,
    /// when `None`), skipping destinations whose inbox is full; `on` is
    /// told of each handled message and returns whether to go on.
    fn drive(&mut self, until: Option<SimTime>, mut on: impl FnMut(SimDelivery) -> bool) {
        let mut full: BTreeSet<NodeId> = BTreeSet::new();
        let mut after: Option<(SimTime, u64)> = None;
        loop {
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            let Some((&key, item)) = self.in_flight.range((lower, Bound::Unbounded)).next() else {
                return;
            };
            if until.is_some_and(|t| key.0 > t) {
                return;
            }
            let to = item.to;
            after = Some(key);
            if full.contains(&to) {
                continue;
            }
            match self.deliver(key) {
                Some(d) => {
                    if !on(d) {
                        return;
                    }
                }
                None => {
                    full.insert(to);
                }
            }
        }
    }

    /// Delivers or loses the message at `key`; `None` (and it stays) if its
    /// destination's inbox is full.
    fn deliver(&mut self, key: (SimTime, u64)) -> Option<SimDelivery> {
        let InFlight { from, to, msg } = self.in_flight.remove(&key)?;
        let outcome = match self.endpoints.get(&to) {
            _ if self.is_cut(from, to) => SimOutcome::DroppedPartition,
            Some(ep) if ep.down => SimOutcome::DroppedDown,
            Some(ep) => match ep.inbox.try_send(msg) {
                Ok(()) => SimOutcome::Delivered,
                Err(TrySendError::Full(msg)) => {
                    self.stats.deferred_inbox_full += 1;
                    self.in_flight.insert(key, InFlight { from, to, msg });
                    return None;
                }
                Err(TrySendError::Closed(_)) => SimOutcome::DroppedClosed,
            },
            // Endpoints are never removed once made.
            None => SimOutcome::DroppedClosed,
        };
        match outcome {
            SimOutcome::Delivered => self.stats.delivered += 1,
            SimOutcome::DroppedPartition => self.stats.dropped_partition += 1,
            SimOutcome::DroppedDown => self.stats.dropped_down += 1,
            SimOutcome::DroppedClosed => self.stats.dropped_closed += 1,
        }
        if let Some(link) = self.links.get_mut(&(from, to)) {
            link.in_flight -= 1;
        }
        Some(SimDelivery {
            from,
            to,
            at: key.0,
            outcome,
        })
    }
}

/// A draw that is true with probability `p`; no draw for 0 or 1.
fn chance(rng: &mut Rng, p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    if p >= 1.0 {
        return true;
    }
    // 53 random bits: a uniform f64 in [0, 1).
    let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    x < p
}

/// Uniform in `lo..=hi` (`hi - lo` is below [`SIM_DELAY_LIMIT`]).
fn uniform(rng: &mut Rng, lo: SimTime, hi: SimTime) -> SimTime {
    debug_assert!(lo <= hi && hi - lo < SIM_DELAY_LIMIT);
    if lo == hi {
        return lo;
    }
    lo + rng.next_u64() % (hi - lo + 1)
}
