//! Deterministic cluster simulation: a cluster of [`Raft`] cores with
//! simulated disks, network, clocks, crashes and clients, all driven by one
//! seeded [`Rng`], with the safety properties checked after every step and
//! the clients' history checked for linearizability at the end.
//!
//! One seed gives one run, step for step: [`SimReport::trace_hash`] folds
//! every event and action, so two runs of a seed can be compared.
//!
//! # A run
//!
//! The seed also draws the run's character: drop, duplicate and delay
//! rates, disk latency, fault rate, how often the host snapshots, how many
//! reads use ReadIndex, how many writes are forwarded, pre-vote and
//! check-quorum on or off, small flow control windows and batches (often
//! one entry per message), lease reads (with clocks that tick together,
//! the assumption leases rest on; otherwise each tick is one random
//! node's), writes in bursts (writers pause every third phase), and short
//! reigns (most new leaders are crashed or isolated within
//! `REIGN_STEPS_MAX` steps: leaders that fail before their entries spread
//! leave the disagreeing logs of the paper's Figure 8).
//!
//! 1. *Faulty phase* ([`SimConfig::steps`] steps). Each step is one event:
//!    a node ticks; a message is delivered (any whose delay passed, so the
//!    network reorders); a node's oldest persists complete (in order, after
//!    a random delay); a client calls or retries; the host snapshots; or a
//!    fault: a crash (the node loses what was not durable and restarts
//!    later from its disk), sometimes of the whole cluster at once (every
//!    node restarts from its disk alone), a symmetric partition, a bridge
//!    (two sides that cannot talk and one node that talks to both), a
//!    one-way cut, a node (the leader) that hears nobody, sometimes while
//!    it hands leadership away, a leader isolated, a leadership transfer;
//!    partitions heal later. Or a membership change (see below). Messages are dropped and
//!    duplicated at random; a drop is sometimes reported with
//!    [`Raft::unreachable`] (a lost snapshot always: its transfer is a
//!    stream whose sender sees it fail).
//!    Messages sent with `after_persist` wait on their node until that
//!    persist completed, and die with it on a crash.
//! 2. *Settling*: everything heals and restarts, faults stop, clients
//!    call no more; the cluster must settle (one leader in a committed,
//!    non-joint membership, every member caught up and applied) within
//!    [`SimConfig::settle_steps_max`] steps. Nodes outside the final
//!    membership are exempt.
//! 3. *Calm*: clients call again for [`SimConfig::calm_steps`] steps, with
//!    no faults (the healed cluster must serve them:
//!    [`SimReport::calm_ops_ok`]); then the cluster settles again.
//! 4. *Final checks*: every acknowledged command is in the log the leader
//!    applied, the members' state machines and memberships agree, and the
//!    history is linearizable.
//!
//! After every step: election safety (a leader holds durable votes of a
//! quorum, its own included), log matching, leader completeness, state
//! machine safety (see [`Safety`]), that commitment is durable (no node
//! lacking the highest committed entry could win an election against the
//! logs the voters hold, or would hold after a crash:
//! [`Safety::commitment_durable`]), that each node's log is what its
//! persists described, and [`Raft::check_invariants`]. Every read index
//! handed out is checked against the highest commit index reached before
//! the read was asked for (a lower one could miss an acknowledged write,
//! whether or not a client happened to look).
//!
//! [`SimConfig::planted`] runs every core with a known bug
//! ([`PlantedBug`]): the tests show that these checks catch each one.
//!
//! # Membership
//!
//! The cluster starts with [`SimConfig::nodes`] voters and
//! [`SimConfig::spares`] more nodes that run from the start knowing no
//! membership (a joining node's `Config` has no voters). During the faulty
//! phase the node the simulation believes leads is asked for random
//! changes (`AddLearner`, `AddVoter`, `Remove`, `Joint`), valid or not:
//! each answer is checked against what the contract says it must be (the
//! refusals that apply, or exactly the new membership), and
//! `NotLeader`/`LeaderNotReady`/`ChangePending`/`Transferring` are normal.
//! Removed nodes keep running (a removed node that missed its removal may
//! disrupt the others), or are stopped once their removal committed, and
//! start again from their disk if added back.
//!
//! The checks that depend on the membership use the one in force: a node
//! elected leader holds durable votes from a quorum of its configuration
//! (each configuration while joint), and no node votes twice in a term;
//! each node's membership is the latest in the log its persists
//! described, or the one kept with its snapshot; the membership kept with
//! a snapshot (`Compact`, `InstallSnapshot`, `SendSnapshot`) is the one
//! committed at its index; committed memberships change one voter at a
//! time or through a joint configuration. Crashes of single nodes keep a
//! quorum of the leader's membership up (a whole-cluster restart does
//! not).

//! # Clients
//!
//! A client has at most one operation outstanding, on a small key space. A
//! `Put`, a `Cas` and a log `Get` are proposed (encoded as a [`Command`]) to
//! the node the client believes leads; a refusal (`NotLeader`,
//! `Backpressure`, ...) had no effect and is retried later. An accepted
//! command completes when that node applies the index `propose` returned
//! and the entry there is the client's (whether or not the node still
//! leads); another entry there, a crash or a timeout make the outcome
//! unknown, and the client moves on to a new operation (never reusing an
//! operation id: the old one may still commit). Some writes go through
//! [`Raft::forward`] on a random node instead (a client talking to a
//! follower): answered when that node applies the command, wherever it was
//! proposed; a [`Action::ProposeRefused`] is retried (the network never
//! duplicates a forwarded batch: the core would propose each copy). A `Get`
//! may instead go through [`Raft::read_index`], on the leader or a
//! follower, and is answered once that node applied through the read
//! index. [`SimConfig::readers`] more clients only read, through
//! ReadIndex.
//!
//! # What this module must never do
//!
//! Reach into a core's state other than through its public inputs and
//! read-only accessors, or repair anything it finds wrong: a violation ends
//! the run and is reported with the seed.

mod checks;
mod clients;
mod command;
mod membership;
mod network;
mod safety;
mod storage;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use self::command::{digest_entry, hash_bytes, mix, Command, Kv};
use self::safety::violation;
pub use self::safety::{Safety, Violation};
use crate::testing::linearizability::{self, Input, Operation, Output, Verdict};
use crate::{
    Action, Config, Entry, HardState, Index, Membership, Message, MessageBody, NodeId, Payload,
    PersistId, PlantedBug, ProposeError, Raft, ReadError, Restored, Rng, Role, Term, TransferError,
};

/// Messages in flight at once; more is a runaway (a bug in the core or here).
const NET_MAX: usize = 100_000;
/// Rounds of `take_actions` one input may take before it counts as a loop.
const DRIVE_ROUNDS_MAX: usize = 10_000;
/// Steps between full pairwise log comparisons (the incremental check runs
/// every step).
const LOGS_COMPARE_EVERY: u64 = 64;

/// What one run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Voters: 3 or 5 in the usual runs (ids `1..=nodes`).
    pub nodes: u64,
    /// Extra nodes (ids after the voters) that start empty, knowing no
    /// membership, and may be added.
    pub spares: u64,
    /// Propose membership changes during the faulty phase (with `faults`).
    pub membership: bool,
    /// Steps of the faulty phase.
    pub steps: u64,
    pub clients: u32,
    /// Clients (after the `clients`) that only read, through
    /// [`Raft::read_index`] on the node they believe leads or on any node.
    pub readers: u32,
    pub keys: u64,
    /// Steps a client waits for an answer before the outcome is unknown.
    pub op_timeout_steps: u64,
    /// Bound on the settling phase; not settling by then is a failure.
    pub settle_steps_max: u64,
    /// Steps of the calm phase after settling: clients call again, with no
    /// faults; the cluster must answer them.
    pub calm_steps: u64,
    /// Linearizability search budget, per key.
    pub check_budget: u64,
    /// Crashes, partitions, drops, duplicates and transfers.
    pub faults: bool,
    /// Test-only fault: on a crash the disk loses the last entries it
    /// acknowledged and forgets the vote (a lying fsync). Raft cannot be
    /// safe on such a disk; the checks must notice.
    pub lying_disk: bool,
    /// Test-only: every core runs with this known bug (see
    /// [`PlantedBug`]); the checks must notice.
    pub planted: Option<PlantedBug>,
    /// Keep the last this many events in [`SimReport::trace`] (0: none;
    /// formatting costs time).
    pub trace_lines: usize,
}

impl SimConfig {
    /// The usual run for `seed`: 3 nodes for even seeds, 5 for odd ones;
    /// 0, 1 or 2 spares as `seed / 2` goes.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes: if seed % 2 == 0 { 3 } else { 5 },
            spares: (seed / 2) % 3,
            membership: true,
            steps: 10_000,
            clients: 4,
            readers: 2,
            keys: 3,
            op_timeout_steps: 600,
            settle_steps_max: 20_000,
            calm_steps: 300,
            check_budget: 200_000,
            faults: true,
            lying_disk: false,
            planted: None,
            trace_lines: 0,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    pub nodes: u64,
    pub spares: u64,
    /// Steps run, settling included.
    pub steps: u64,
    /// Every event and action folded: equal for two runs of one seed.
    pub trace_hash: u64,
    /// The clients' history (operations that may have taken effect).
    pub history: Vec<Operation>,
    /// Operations answered, and accepted but never answered.
    pub ops_ok: usize,
    pub ops_unknown: usize,
    /// `Get`s answered (through the log or ReadIndex), and those answered
    /// through ReadIndex.
    pub reads_ok: usize,
    pub read_index_ok: usize,
    /// Writes answered that went through [`Raft::forward`].
    pub forwards_ok: usize,
    /// Operations called in the calm phase and answered.
    pub calm_ops_ok: usize,
    /// Distinct (term, leader) pairs.
    pub leaders: usize,
    /// Node crashes, those of whole-cluster restarts included.
    pub crashes: usize,
    /// Times every node crashed at once.
    pub cluster_restarts: usize,
    pub partitions: usize,
    /// Snapshots the hosts took, and snapshots sent and installed.
    pub snapshots_taken: usize,
    pub snapshots_installed: usize,
    /// Membership changes proposed, and accepted (entries appended).
    pub changes_proposed: usize,
    pub changes_accepted: usize,
    /// Members of the final membership (voters, learners).
    pub final_voters: usize,
    pub final_learners: usize,
    /// The first broken property, if any (the run stops there).
    pub violation: Option<String>,
    /// The violation is that the cluster did not settle (liveness, not
    /// safety).
    pub stuck: bool,
    /// `None` when a violation stopped the run before the check.
    pub verdict: Option<Verdict>,
    /// The last [`SimConfig::trace_lines`] events.
    pub trace: Vec<String>,
}

impl SimReport {
    /// A safety violation, a failure to settle, or a history that is not
    /// linearizable. An `Unknown` verdict is not a failure.
    pub fn failed(&self) -> bool {
        self.violation.is_some() || matches!(self.verdict, Some(Verdict::NotLinearizable { .. }))
    }

    /// The failure in words, with the trace tail.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "seed {} ({} nodes, {} steps, {} leaders, {} crashes): ",
            self.seed, self.nodes, self.steps, self.leaders, self.crashes
        );
        match (&self.violation, &self.verdict) {
            (Some(v), _) => s.push_str(v),
            (None, Some(v)) => s.push_str(&v.explain(&self.history)),
            (None, None) => s.push_str("no verdict"),
        }
        if !self.trace.is_empty() {
            s.push_str("\nlast events:\n");
            s.push_str(&self.trace.join("\n"));
        }
        s
    }
}

/// Runs one simulation. Panics in the core are caught and reported as
/// violations.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut sim = Sim::new(cfg);
    let result = catch_unwind(AssertUnwindSafe(|| sim.run()));
    let (violation, verdict) = match result {
        Ok(Ok(verdict)) => (None, Some(verdict)),
        Ok(Err(v)) => (Some(v.0), None),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (Some(format!("panic at step {}: {msg}", sim.now)), None)
        }
    };
    SimReport {
        seed: cfg.seed,
        nodes: cfg.nodes,
        spares: cfg.spares,
        steps: sim.now,
        trace_hash: sim.hash,
        history: sim.history(),
        ops_ok: sim.ops.iter().filter(|o| o.ret.is_some()).count(),
        ops_unknown: sim.ops.iter().filter(|o| o.unknown()).count(),
        reads_ok: sim
            .ops
            .iter()
            .filter(|o| o.ret.is_some() && matches!(o.input, Input::Get { .. }))
            .count(),
        read_index_ok: sim.read_index_ok,
        calm_ops_ok: sim.calm_from.map_or(0, |from| {
            sim.ops
                .iter()
                .filter(|o| o.call >= from && o.ret.is_some())
                .count()
        }),
        forwards_ok: sim.forwards_ok,
        leaders: sim.safety.leaders(),
        crashes: sim.crashes,
        cluster_restarts: sim.cluster_restarts,
        partitions: sim.partitions,
        snapshots_taken: sim.snapshots_taken,
        snapshots_installed: sim.snapshots_installed,
        changes_proposed: sim.changes_proposed,
        changes_accepted: sim.changes_accepted,
        final_voters: sim.final_membership.voters.len(),
        final_learners: sim.final_membership.learners.len(),
        violation,
        stuck: sim.stuck,
        verdict,
        trace: sim.trace.into_iter().collect(),
    }
}

/// Per-seed fault rates and host behaviour, drawn from the seed.
#[derive(Debug, Clone)]
struct Knobs {
    drop_permille: u32,
    dup_permille: u32,
    delay_max: u32,
    long_delay_permille: u32,
    /// A dropped message is reported to its sender with this chance.
    unreachable_permille: u32,
    persist_delay_max: u32,
    fault_weight: u32,
    /// Applied entries beyond the snapshot before the host takes another
    /// (`None`: never).
    snapshot_gap: Option<u64>,
    snapshot_fail_permille: u32,
    /// Share of `Get`s served through ReadIndex instead of the log.
    read_index_permille: u32,
    /// Lease reads on. Their safety assumes clocks that do not drift, so
    /// every node ticks at once then (otherwise each tick is one node's).
    lease_reads: bool,
    /// The host applies committed entries in later steps, a few at a time,
    /// instead of at once.
    apply_lag: bool,
    /// Weight of membership events (like `fault_weight`).
    membership_weight: u32,
    /// Share of writes a client sends through [`Raft::forward`] on a
    /// random node (a follower, mostly) instead of proposing on the node
    /// it believes leads.
    forward_permille: u32,
    /// Share of new leaders deposed (crashed or isolated) within
    /// `REIGN_STEPS_MAX` steps of their election: leaders that fail before
    /// their entries spread leave logs that disagree (Figure 8's setting).
    short_reign_permille: u32,
    /// Writes come in bursts: the writers pause every third phase of this
    /// many steps (readers go on). An idle log lets a follower that lost
    /// touch with the leader stay up to date, so that it can be elected.
    quiet_phase_steps: Option<u64>,
}

/// A state-machine snapshot the host holds.
#[derive(Debug, Clone)]
struct Snapshot {
    index: Index,
    term: Term,
    membership: Membership,
    kv: Kv,
}

#[derive(Debug)]
enum Write {
    Log {
        hard_state: Option<HardState>,
        entries: Vec<Entry>,
    },
    Snapshot(Snapshot),
}

#[derive(Debug)]
struct Persist {
    id: PersistId,
    ready_at: u64,
    write: Write,
}

struct Node {
    id: NodeId,
    cfg: Config,
    raft: Raft,
    up: bool,
    restart_at: u64,
    /// Stopped after its removal committed: down until added back.
    stopped: bool,
    /// Incarnation: bumped by each crash.
    life: u64,
    // ---- The disk: what survives a crash.
    disk_hs: HardState,
    /// (index, term) the disk's log follows: its snapshot's.
    disk_base: (Index, Term),
    disk_log: Vec<Entry>,
    disk_snapshot: Option<Snapshot>,
    // ---- Volatile.
    /// Persists handed out, not yet durable, oldest first.
    pending: VecDeque<Persist>,
    /// Highest persist of this incarnation that is durable.
    durable_id: PersistId,
    /// Messages waiting for a persist.
    held: Vec<(PersistId, Message)>,
    kv: Kv,
    /// Entries handed out to apply, not yet applied (with `apply_lag`).
    to_apply: VecDeque<Entry>,
    /// The latest snapshot, to send (durable once its persist completes).
    snapshot: Option<Snapshot>,
    /// The log as this incarnation's persists described it: compared with
    /// the core's log every step.
    shadow_base: (Index, Term),
    shadow: Vec<Entry>,
    /// The membership in force at the shadow's base (the snapshot's, or
    /// the configured voters) with the index that set it (the base after a
    /// restart or a snapshot install, the entry's when it was compacted
    /// here), and the shadow's membership entries.
    shadow_base_membership: (Index, Membership),
    shadow_changes: Vec<(Index, Membership)>,
    seen_commit: Index,
    last_role: (Role, Term),
}

impl Node {
    /// The membership in force per the shadow log: its latest membership
    /// entry, or the base's.
    fn shadow_membership(&self) -> (Index, &Membership) {
        match self.shadow_changes.last() {
            Some((i, m)) => (*i, m),
            None => (
                self.shadow_base_membership.0,
                &self.shadow_base_membership.1,
            ),
        }
    }

    /// The membership in force at `index` (at or above the shadow's base)
    /// per the shadow log.
    fn shadow_membership_at(&self, index: Index) -> &Membership {
        self.shadow_changes
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.shadow_base_membership.1, |(_, m)| m)
    }

    fn shadow_term(&self, index: Index) -> Option<Term> {
        if index == self.shadow_base.0 {
            return Some(self.shadow_base.1);
        }
        index
            .checked_sub(self.shadow_base.0 + 1)
            .and_then(|i| self.shadow.get(i as usize))
            .map(|e| e.term)
    }
}

struct InFlight {
    at: u64,
    msg: Message,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Idle,
    /// Called; every attempt so far was refused, so it had no effect yet.
    Refused {
        op: usize,
    },
    /// Proposed on `node`, which gave it `index`: answered when `node`
    /// applies that index (led or not by then), lost if another entry is
    /// there.
    Proposed {
        op: usize,
        node: NodeId,
        life: u64,
        index: Index,
    },
    Reading {
        op: usize,
        node: NodeId,
        life: u64,
        ctx: u64,
        ready: Option<Index>,
        /// The highest commit index any node had reached before the read
        /// was asked for: a read index below it would miss a write that
        /// may have been acknowledged already.
        floor: Index,
    },
    /// Sent through [`Raft::forward`] on `node` as the batch `ctx`:
    /// answered when `node` applies the command, wherever it was proposed.
    Forwarded {
        op: usize,
        node: NodeId,
        life: u64,
        ctx: u64,
    },
}

impl Waiting {
    /// The operation waited for, if any.
    fn op(self) -> Option<usize> {
        match self {
            Waiting::Idle => None,
            Waiting::Refused { op }
            | Waiting::Proposed { op, .. }
            | Waiting::Reading { op, .. }
            | Waiting::Forwarded { op, .. } => Some(op),
        }
    }

    /// The node whose answer is waited for, if any.
    fn node(self) -> Option<NodeId> {
        match self {
            Waiting::Idle | Waiting::Refused { .. } => None,
            Waiting::Proposed { node, .. }
            | Waiting::Reading { node, .. }
            | Waiting::Forwarded { node, .. } => Some(node),
        }
    }
}

struct Client {
    id: u32,
    /// Only reads, through ReadIndex.
    reader: bool,
    guess: NodeId,
    next_op: u64,
    waiting: Waiting,
}

#[derive(Debug, Clone)]
struct OpRecord {
    client: u32,
    op: u64,
    input: Input,
    call: u64,
    deadline: u64,
    read_index: bool,
    /// Some attempt was accepted: it may have taken effect.
    accepted: bool,
    /// Log operations: the index `propose` returned.
    index: Option<Index>,
    ret: Option<u64>,
    output: Option<Output>,
    /// Finished without an answer.
    gave_up: bool,
}

impl OpRecord {
    fn unknown(&self) -> bool {
        self.gave_up && self.accepted && self.ret.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Tick,
    Deliver,
    Persist,
    Apply,
    /// A writer calls or retries.
    Client,
    /// A reader calls or retries.
    Reader,
    Snapshot,
    Fault,
    Membership,
}

struct Sim {
    cfg: SimConfig,
    knobs: Knobs,
    rng: Rng,
    now: u64,
    /// Faults stopped (settling, and the calm phase after it).
    settling: bool,
    /// Clients call no more (settling).
    clients_stopped: bool,
    /// The step the calm phase started at.
    calm_from: Option<u64>,
    stuck: bool,
    nodes: Vec<Node>,
    net: Vec<InFlight>,
    /// Directed links that drop everything: (from, to).
    cuts: BTreeSet<(NodeId, NodeId)>,
    heal_at: u64,
    /// (sender, peer): drops to report with `unreachable`.
    unreachable: Vec<(NodeId, NodeId)>,
    clients: Vec<Client>,
    ops: Vec<OpRecord>,
    next_value: u64,
    next_ctx: u64,
    last_written: BTreeMap<u64, u64>,
    last_read: BTreeMap<u64, Option<u64>>,
    /// (client, op) → index it was applied at.
    applied_ops: HashMap<(u32, u64), Index>,
    safety: Safety,
    /// Batches forwarded with [`Raft::forward`]: ctx → the forwarding node
    /// (a refusal must come back to it).
    forwarded: HashMap<u64, NodeId>,
    read_index_ok: usize,
    forwards_ok: usize,
    crashes: usize,
    cluster_restarts: usize,
    partitions: usize,
    snapshots_taken: usize,
    snapshots_installed: usize,
    changes_proposed: usize,
    changes_accepted: usize,
    /// Leaders to depose: (node, term, step).
    reigns_ending: Vec<(NodeId, Term, u64)>,
    /// The leader's membership once settled.
    final_membership: Membership,
    hash: u64,
    trace: VecDeque<String>,
}

impl Sim {
    fn new(cfg: &SimConfig) -> Sim {
        assert!(cfg.nodes >= 1 && cfg.clients >= 1 && cfg.keys >= 1);
        let mut rng = Rng::new(cfg.seed);
        let mut knobs = Knobs {
            drop_permille: rng.range(0, 100),
            dup_permille: rng.range(0, 40),
            delay_max: rng.range(1, 10),
            long_delay_permille: rng.range(0, 20),
            unreachable_permille: rng.range(0, 500),
            persist_delay_max: rng.range(0, 15),
            fault_weight: rng.range(2, 20),
            snapshot_gap: match rng.range(0, 3) {
                0 => None,
                _ => Some(u64::from(rng.range(3, 40))),
            },
            snapshot_fail_permille: rng.range(0, 200),
            read_index_permille: rng.range(0, 1000),
            lease_reads: rng.range(0, 1) == 0,
            apply_lag: rng.range(0, 1) == 0,
            membership_weight: rng.range(1, 12),
            forward_permille: match rng.range(0, 3) {
                0 => 0,
                _ => rng.range(50, 300),
            },
            short_reign_permille: match rng.range(0, 1) {
                0 => rng.range(300, 900),
                _ => 0,
            },
            quiet_phase_steps: match rng.range(0, 1) {
                0 => Some(u64::from(rng.range(100, 1_000))),
                _ => None,
            },
        };
        if !cfg.faults {
            knobs.drop_permille = 0;
            knobs.dup_permille = 0;
            knobs.fault_weight = 0;
            knobs.short_reign_permille = 0;
        }
        if !cfg.faults || !cfg.membership {
            knobs.membership_weight = 0;
        }
        let voters: Vec<NodeId> = (1..=cfg.nodes).collect();
        let raft_cfg = {
            let mut c = Config::new(1, voters.clone());
            c.election_ticks_min = 10;
            c.election_ticks_max = 20;
            c.heartbeat_ticks = rng.range(1, 3);
            c.pre_vote = rng.range(0, 3) > 0;
            c.check_quorum = rng.range(0, 3) > 0;
            c.inflight_max = rng.range(1, 8) as usize;
            // Often one or two entries per message: a new leader's old
            // entries and its own then reach a follower in separate ones.
            c.batch_bytes_max = rng.range(1, 400) as usize;
            c.inflight_bytes_max = rng.range(100, 4_000) as usize;
            c.uncommitted_bytes_max = rng.range(200, 3_000) as usize;
            c.lease_reads = knobs.lease_reads;
            c.check_quorum |= knobs.lease_reads;
            c.pre_vote |= knobs.lease_reads;
            c
        };
        let nodes = (1..=cfg.nodes + cfg.spares)
            .map(|id| {
                let mut c = raft_cfg.clone();
                c.id = id;
                if id > cfg.nodes {
                    // Joining later: it learns its membership from the leader.
                    c.voters.clear();
                }
                let seed = rng.next_u64();
                let base_membership = Membership::with_voters(c.voters.iter().copied());
                let mut raft = Raft::new(c.clone(), Restored::default(), seed)
                    .expect("the simulation's config is valid");
                raft.plant_bug(cfg.planted);
                Node {
                    id,
                    raft,
                    cfg: c,
                    up: true,
                    restart_at: 0,
                    stopped: false,
                    life: 0,
                    disk_hs: HardState::default(),
                    disk_base: (0, 0),
                    disk_log: Vec::new(),
                    disk_snapshot: None,
                    pending: VecDeque::new(),
                    durable_id: 0,
                    held: Vec::new(),
                    kv: Kv::default(),
                    to_apply: VecDeque::new(),
                    snapshot: None,
                    shadow_base: (0, 0),
                    shadow: Vec::new(),
                    shadow_base_membership: (0, base_membership),
                    shadow_changes: Vec::new(),
                    seen_commit: 0,
                    last_role: (Role::Follower, 0),
                }
            })
            .collect();
        let clients = (1..=cfg.clients + cfg.readers)
            .map(|id| Client {
                id,
                reader: id > cfg.clients,
                guess: 1 + u64::from(id) % cfg.nodes,
                next_op: 1,
                waiting: Waiting::Idle,
            })
            .collect();
        Sim {
            cfg: cfg.clone(),
            knobs,
            rng,
            now: 0,
            settling: false,
            clients_stopped: false,
            calm_from: None,
            stuck: false,
            nodes,
            net: Vec::new(),
            cuts: BTreeSet::new(),
            heal_at: 0,
            unreachable: Vec::new(),
            clients,
            ops: Vec::new(),
            next_value: 1,
            next_ctx: 1,
            last_written: BTreeMap::new(),
            last_read: BTreeMap::new(),
            applied_ops: HashMap::new(),
            safety: Safety::with_initial_membership(Membership::with_voters(voters)),
            forwarded: HashMap::new(),
            read_index_ok: 0,
            forwards_ok: 0,
            crashes: 0,
            cluster_restarts: 0,
            partitions: 0,
            snapshots_taken: 0,
            snapshots_installed: 0,
            changes_proposed: 0,
            changes_accepted: 0,
            reigns_ending: Vec::new(),
            final_membership: Membership::default(),
            hash: mix(cfg.seed),
            trace: VecDeque::new(),
        }
    }

    fn run(&mut self) -> Result<Verdict, Violation> {
        let knobs = format!("knobs {:?}", self.knobs);
        self.note(|| knobs);
        while self.now < self.cfg.steps {
            self.step()?;
        }
        self.settle()?;
        self.calm()?;
        self.settle()?;
        self.final_checks()?;
        let history = self.history();
        Ok(linearizability::check(&history, self.cfg.check_budget))
    }

    fn step(&mut self) -> Result<(), Violation> {
        self.now += 1;
        self.due()?;
        let event = self.pick_event();
        self.fold(&[0xE0, event as u64]);
        match event {
            Event::Tick if self.knobs.lease_reads => {
                self.note(|| "tick all".to_string());
                for i in 0..self.nodes.len() {
                    if self.nodes[i].up {
                        let id = self.nodes[i].id;
                        self.node_mut(id).raft.tick();
                        self.drive(id)?;
                    }
                }
            }
            Event::Tick => {
                let id = self.random_up_node();
                if let Some(id) = id {
                    self.note(|| format!("tick {id}"));
                    self.node_mut(id).raft.tick();
                    self.drive(id)?;
                }
            }
            Event::Deliver => self.deliver()?,
            Event::Persist => self.complete_persists()?,
            Event::Apply => self.apply_event()?,
            Event::Client => self.client_event(false)?,
            Event::Reader => self.client_event(true)?,
            Event::Snapshot => self.snapshot_event()?,
            Event::Fault => self.fault()?,
            Event::Membership => self.membership_event()?,
        }
        self.flush_unreachable()?;
        self.check_step()
    }

    /// Restarts, heals and client timeouts that are due.
    fn due(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up && self.nodes[i].restart_at <= self.now {
                self.restart(self.nodes[i].id)?;
            }
        }
        self.restart_readded()?;
        self.end_reigns();
        if !self.cuts.is_empty() && self.heal_at <= self.now {
            self.note(|| "heal".to_string());
            self.cuts.clear();
        }
        for c in 0..self.clients.len() {
            let Some(op) = self.clients[c].waiting.op() else {
                continue;
            };
            if self.ops[op].deadline <= self.now {
                self.note(|| format!("client {} op {op} timed out", c + 1));
                self.give_up(c);
            }
        }
        Ok(())
    }

    fn pick_event(&mut self) -> Event {
        let now = self.now;
        let ready_msgs = self.net.iter().any(|m| m.at <= now);
        let to_apply = self.nodes.iter().any(|n| n.up && !n.to_apply.is_empty());
        let ready_persists = self
            .nodes
            .iter()
            .any(|n| n.up && n.pending.front().is_some_and(|p| p.ready_at <= now));
        let free = |reader: bool| {
            !self.clients_stopped
                && (0..self.clients.len())
                    .any(|c| self.clients[c].reader == reader && self.may_call(c))
        };
        let (writers_free, readers_free) = (free(false), free(true));
        // Synchronized clocks tick every node at once.
        let tick_weight = if self.knobs.lease_reads {
            200 / self.nodes.len() as u32
        } else {
            200
        };
        // Per mille of a step, roughly.
        let weights = [
            (Event::Tick, tick_weight),
            (Event::Deliver, if ready_msgs { 500 } else { 0 }),
            (Event::Persist, if ready_persists { 200 } else { 0 }),
            (Event::Apply, if to_apply { 200 } else { 0 }),
            (Event::Client, if writers_free { 80 } else { 0 }),
            (Event::Reader, if readers_free { 40 } else { 0 }),
            (
                Event::Snapshot,
                if self.knobs.snapshot_gap.is_some() {
                    20
                } else {
                    0
                },
            ),
            (
                Event::Fault,
                if self.settling {
                    0
                } else {
                    self.knobs.fault_weight
                },
            ),
            (
                Event::Membership,
                if self.settling {
                    0
                } else {
                    self.knobs.membership_weight
                },
            ),
        ];
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut x = self.rng.range(0, total - 1);
        for (event, w) in weights {
            if x < w {
                return event;
            }
            x -= w;
        }
        unreachable!("x < total")
    }

    /// Runs `id`'s actions until it has nothing more to say.
    fn drive(&mut self, id: NodeId) -> Result<(), Violation> {
        for _ in 0..DRIVE_ROUNDS_MAX {
            let actions = self.node_mut(id).raft.take_actions();
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions {
                self.handle(id, action)?;
            }
        }
        violation!("node {id} kept producing actions")
    }

    /// Carries out one action of `id`, as its host would.
    fn handle(&mut self, id: NodeId, action: Action) -> Result<(), Violation> {
        match action {
            Action::Persist {
                id: pid,
                hard_state,
                entries,
            } => {
                self.fold(&[1, id, pid, entries.len() as u64]);
                self.note(|| {
                    let changes: Vec<_> = entries
                        .iter()
                        .filter_map(|e| match &e.payload {
                            Payload::Membership(m) => Some((e.index, m)),
                            _ => None,
                        })
                        .collect();
                    format!(
                        "  {id} persist #{pid} hs={hard_state:?} entries={:?}{}",
                        span(&entries),
                        if changes.is_empty() {
                            String::new()
                        } else {
                            format!(" changes={changes:?}")
                        }
                    )
                });
                self.shadow_replace(id, &entries)?;
                let write = Write::Log {
                    hard_state,
                    entries,
                };
                self.queue_persist(id, pid, write);
            }
            Action::InstallSnapshot {
                id: pid,
                index,
                term,
                membership,
                data,
            } => {
                self.fold(&[2, id, pid, index, term]);
                self.note(|| format!("  {id} install snapshot #{pid} at {index}/{term}"));
                self.install_snapshot(id, pid, index, term, membership, &data)?;
            }
            Action::Send { msg, after_persist } => {
                self.fold(&[3, msg.from, msg.to, msg.term, body_tag(&msg.body)]);
                let node = self.node_mut(id);
                match after_persist {
                    Some(p) if p > node.durable_id => node.held.push((p, msg)),
                    _ => self.send(msg),
                }
            }
            Action::Apply { entries } => {
                self.fold(&[4, id, entries.last().map_or(0, |e| e.index)]);
                if self.knobs.apply_lag {
                    self.node_mut(id).to_apply.extend(entries);
                } else {
                    self.apply_entries(id, &entries)?;
                }
            }
            Action::SendSnapshot {
                to,
                index,
                membership,
            } => {
                self.fold(&[5, id, to, index]);
                self.check_snapshot_membership(id, index, &membership, "sends a snapshot")?;
                self.send_snapshot(id, to, index, &membership)?;
            }
            Action::Compact { upto, membership } => {
                self.fold(&[6, id, upto]);
                self.compact(id, upto, membership)?;
            }
            Action::ReadReady { ctx, index } => {
                self.fold(&[7, id, ctx, index]);
                self.read_ready(id, ctx, index)?;
            }
            Action::ReadFailed { ctx } => {
                self.fold(&[8, id, ctx]);
                self.read_failed(id, ctx);
            }
            Action::ProposeRefused { ctx } => {
                self.fold(&[10, id, ctx]);
                self.forward_refused(id, ctx)?;
            }
            Action::RoleChanged { role, term, leader } => {
                self.fold(&[9, id, role as u64, term, leader.unwrap_or(0)]);
                self.note(|| format!("  {id} is {role:?} in term {term}, leader {leader:?}"));
            }
        }
        Ok(())
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn random_node(&mut self) -> NodeId {
        u64::from(self.rng.range(1, self.nodes.len() as u32))
    }

    fn random_up_node(&mut self) -> Option<NodeId> {
        let up: Vec<NodeId> = self.nodes.iter().filter(|n| n.up).map(|n| n.id).collect();
        if up.is_empty() {
            return None;
        }
        Some(up[self.rng.range(0, up.len() as u32 - 1) as usize])
    }

    /// The up leader of the highest term, if any.
    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.up && n.raft.role() == Role::Leader)
            .max_by_key(|n| n.raft.term())
            .map(|n| n.id)
    }

    fn chance(&mut self, permille: u32) -> bool {
        permille > 0 && self.rng.range(0, 999) < permille
    }

    fn fold(&mut self, words: &[u64]) {
        for &w in words {
            self.hash = mix(self.hash ^ w);
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if self.cfg.trace_lines == 0 {
            return;
        }
        if self.trace.len() == self.cfg.trace_lines {
            self.trace.pop_front();
        }
        let line = format!("{:>6} {}", self.now, line());
        self.trace.push_back(line);
    }
}

/// First and last index of `entries`, for traces.
fn span(entries: &[Entry]) -> Option<(Index, Index)> {
    Some((entries.first()?.index, entries.last()?.index))
}

/// A snapshot travels as a stream whose sender learns when it fails: its
/// loss is always reported with `unreachable` (other drops only sometimes).
fn is_snapshot(msg: &Message) -> bool {
    matches!(msg.body, MessageBody::InstallSnapshot { .. })
}

/// A batch a follower forwards to the leader ([`Raft::forward`]).
fn is_forward(msg: &Message) -> bool {
    matches!(msg.body, MessageBody::Propose { .. })
}

fn body_tag(body: &MessageBody) -> u64 {
    match body {
        MessageBody::PreVote { .. } => 1,
        MessageBody::PreVoteResponse { .. } => 2,
        MessageBody::Vote { .. } => 3,
        MessageBody::VoteResponse { .. } => 4,
        MessageBody::Append { .. } => 5,
        MessageBody::AppendResponse { .. } => 6,
        MessageBody::Heartbeat { .. } => 7,
        MessageBody::HeartbeatResponse { .. } => 8,
        MessageBody::ReadIndex { .. } => 9,
        MessageBody::ReadIndexResponse { .. } => 10,
        MessageBody::TimeoutNow => 11,
        MessageBody::InstallSnapshot { .. } => 12,
        MessageBody::Propose { .. } => 13,
        MessageBody::ProposeRefused { .. } => 14,
        MessageBody::Removed => 15,
    }
}

fn body_name(body: &MessageBody) -> String {
    match body {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => format!(
            "Append prev={prev_index}/{prev_term} entries={:?} commit={commit}",
            span(entries)
        ),
        MessageBody::InstallSnapshot {
            index,
            snapshot_term,
            ..
        } => format!("InstallSnapshot {index}/{snapshot_term}"),
        other => format!("{other:?}"),
    }
}
