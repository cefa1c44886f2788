//! Linearizability checker for histories of a key-value store.
//!
//! The deterministic cluster simulation records what its clients saw — which
//! operation each one called, when it was called, when (and whether) it
//! returned and with what answer — and asks [`check`] whether some single
//! order of those operations, consistent with real time, explains every
//! answer. This module owns that question and nothing else: it never runs a
//! cluster, never reads a clock and never makes up timestamps; time is
//! whatever logical number the caller records (simulation steps, ticks).
//!
//! # Model
//!
//! A map from `u64` keys to `Option<u64>` values, every key `None` at first:
//!
//! | [`Input`]                   | [`Output`]           | meaning                                   |
//! |-----------------------------|----------------------|-------------------------------------------|
//! | `Put { key, value }`        | `Ok`                 | `map[key] = Some(value)`                  |
//! | `Get { key }`               | `Value(v)`           | `v == map[key]`                           |
//! | `Cas { key, expect, new }`  | `Cas(true / false)`  | if `map[key] == expect` then `map[key] = Some(new)`, answer whether it did |
//!
//! # History
//!
//! An [`Operation`] is called at `call` and returns at `ret` with `output`.
//! Operation `a` happens before `b` only if `a.ret < b.call` (strictly): two
//! operations whose intervals touch (`a.ret == b.call`) are concurrent and may
//! be ordered either way. `ret == call` is allowed (an instantaneous operation).
//!
//! An operation whose outcome is unknown — the client timed out, the leader it
//! talked to crashed — has `ret == None` and `output == None`. It may have
//! taken effect at any time after its call, even after everything else, or
//! never: its return time is taken as +∞ and it may be left out of the order.
//! An unknown `Get` constrains nothing and is dropped up front; an unknown
//! `Cas` may have succeeded or failed, whichever the state allows.
//!
//! # Verdicts
//!
//! [`check`] answers [`Verdict::Linearizable`], [`Verdict::NotLinearizable`]
//! (with the key and a [`Failure`] explaining it), or [`Verdict::Unknown`]
//! when the search ran out of budget — never a wrong verdict because of the
//! budget. Keys are checked in ascending order and the check stops at the
//! first key that is not linearizable; a key that ran out of budget does not
//! stop it, so a definite failure on any key wins over `Unknown`.
//!
//! Invalid input is a bug in the test that recorded it, so `check` panics with
//! the operation's index and what is wrong: `ret < call`, `ret` and `output`
//! not both present or both absent, or an output that does not answer its
//! input (`Put` → `Ok`, `Get` → `Value`, `Cas` → `Cas`).
//!
//! # Algorithm
//!
//! 1. *P-compositionality*: every operation touches one key, and a history is
//!    linearizable iff each key's sub-history is, so each key is checked alone
//!    as a single register. This turns one search exponential in the whole
//!    history's concurrency into many small ones.
//! 2. *Wing & Gong search, as Lowe restructured it*, per key: the calls and
//!    returns of the completed operations sit in one doubly linked list
//!    sorted by time (a call sorts before a return at the same time, which
//!    makes touching intervals concurrent). Walking from the head, each call
//!    before the first return is a candidate to linearize next; if the
//!    register allows it, its call and return are unlinked and the walk
//!    restarts. Reaching a return means the last choice was wrong: it is
//!    undone (relinked) and the walk goes on after it.
//! 3. *Memoization* (Lowe): every configuration reached — the bitset of
//!    linearized operations plus the register value — goes into a hash set;
//!    reaching one again is pruned, since its whole subtree already failed.
//!    The bitset is stored without the full words of operations long since
//!    linearized, so an entry costs words for the operations in flight, not
//!    for the whole history. Values that nothing reads and no `Cas` expects
//!    are indistinguishable to the register, so they are merged into one
//!    first, and configurations that differ only in such a value coincide.
//! 4. *Reads commit*: a completed operation that never changes the value (a
//!    read, a failed `Cas`) and is legal now can go first in any extension
//!    of the configuration, so no alternative to it is tried.
//! 5. *Unknown outcomes* have no return, so they never force a backtrack and
//!    the search succeeds once every completed operation is placed. They are
//!    not walked either: only *canonical* linearizations are searched for,
//!    in which every unknown operation changes the value and is directly
//!    followed by an operation that needs it (one that would be illegal
//!    without it, or an unknown `Cas` that it makes succeed), and no chain of
//!    unknown operations runs before a completed operation that was legal
//!    before the chain. Any linearization can be made canonical by leaving
//!    unknown operations out or moving them later, which real time always
//!    allows for them. So a chain of unknown operations is only started when
//!    the walk meets a completed operation that cannot go from the current
//!    value, with the unknown operations that can lead to a value it needs,
//!    and continued only with unknown `Cas`es that expect the value just
//!    written. Unknown operations with the same effect are interchangeable,
//!    so only the earliest not yet placed of each kind is tried. Without
//!    this, every timed-out write would stay a candidate to the end of the
//!    history and the search space would double with each one.
//! 6. *Budget*: one step is one candidate examined (a call walked over, or
//!    an unknown operation tried). Each key's search gets `budget` steps of
//!    its own (the budget is per key, not shared), so one hard key cannot
//!    starve the others and the verdict of a key does not depend on the keys
//!    before it. A check therefore does at most `keys × budget` steps to
//!    decide, plus at most `budget` more to shrink the explanation of a
//!    failing key (below). As a guide, the test profile runs about five
//!    million steps a second. Accepting a history is usually quick: 10,000
//!    operations from 10 clients over 5 keys, 15% of them timed out, take
//!    under 20,000 steps. Rejecting one means trying every configuration
//!    before the failure — roughly the operations before it times
//!    2^(operations in flight) — so a bad read at the end of that history
//!    takes 0.2–1 million steps with the shrinking, and a key with 20 or more
//!    operations in flight at once can exhaust any budget.
//! 7. *Explanation*: a failing key's history is cut after each return event
//!    in turn (operations still running at the cut become unknown), and a
//!    binary search over the cuts finds the shortest prefix that already
//!    fails. Failure is monotone in the cut (a linearization of a longer
//!    prefix, truncated at the first operation outside the shorter one, is a
//!    linearization of the shorter), so the binary search is exact as long as
//!    its budget lasts; [`Failure::minimal`] says whether it did.
//!
//! # Examples
//!
//! ```
//! use skiff_raft::testing::linearizability::{check, Input, Operation, Output, Verdict};
//!
//! // Client 1 writes 7 while client 2 reads; the read may go either side.
//! let history = [
//!     Operation::completed(1, Input::Put { key: 0, value: 7 }, 0, 10, Output::Ok),
//!     Operation::completed(2, Input::Get { key: 0 }, 2, 4, Output::Value(None)),
//!     Operation::completed(2, Input::Get { key: 0 }, 5, 6, Output::Value(Some(7))),
//! ];
//! assert_eq!(check(&history, 10_000), Verdict::Linearizable);
//!
//! // Once the write has returned, a read must see it: a stale read fails.
//! let history = [
//!     Operation::completed(1, Input::Put { key: 0, value: 7 }, 0, 1, Output::Ok),
//!     Operation::completed(2, Input::Get { key: 0 }, 2, 3, Output::Value(None)),
//! ];
//! let verdict = check(&history, 10_000);
//! assert!(matches!(&verdict, Verdict::NotLinearizable { key: 0, failure } if failure.op == 1));
//! println!("{}", verdict.explain(&history));
//!
//! // A write whose leader crashed may still have been applied ...
//! let history = [
//!     Operation::unknown(1, Input::Put { key: 0, value: 7 }, 0),
//!     Operation::completed(2, Input::Get { key: 0 }, 5, 6, Output::Value(Some(7))),
//! ];
//! assert_eq!(check(&history, 10_000), Verdict::Linearizable);
//!
//! // ... or not: nothing forces it to have happened.
//! let history = [
//!     Operation::unknown(1, Input::Put { key: 0, value: 7 }, 0),
//!     Operation::completed(2, Input::Get { key: 0 }, 5, 6, Output::Value(None)),
//! ];
//! assert_eq!(check(&history, 10_000), Verdict::Linearizable);
//! ```
//!
//! [`check_with_stats`] also reports how much work the check did.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// What a client asked for. Every operation touches exactly one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Set `key` to `value`; answered by [`Output::Ok`].
    Put { key: u64, value: u64 },
    /// Read `key`; answered by [`Output::Value`].
    Get { key: u64 },
    /// If `key` holds `expect`, set it to `new`; answered by [`Output::Cas`]
    /// with whether it did.
    Cas {
        key: u64,
        expect: Option<u64>,
        new: u64,
    },
}

impl Input {
    /// The one key this operation touches.
    pub fn key(&self) -> u64 {
        match *self {
            Input::Put { key, .. } | Input::Get { key } | Input::Cas { key, .. } => key,
        }
    }
}

/// What a client was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// A `Put` was applied.
    Ok,
    /// A `Get` read this value (`None`: the key was never written).
    Value(Option<u64>),
    /// Whether a `Cas` swapped.
    Cas(bool),
}

/// One client operation as the history recorded it.
///
/// `call` and `ret` are logical timestamps. `ret == None` and
/// `output == None` together mean the outcome is unknown (see the module
/// docs); `ret` and `output` must be both present or both absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// Who issued it; only used in explanations.
    pub client: u64,
    pub input: Input,
    pub call: u64,
    pub ret: Option<u64>,
    pub output: Option<Output>,
}

impl Operation {
    /// An operation that returned `output` at `ret`.
    pub fn completed(client: u64, input: Input, call: u64, ret: u64, output: Output) -> Self {
        Operation {
            client,
            input,
            call,
            ret: Some(ret),
            output: Some(output),
        }
    }

    /// An operation called at `call` whose outcome the client never learned.
    pub fn unknown(client: u64, input: Input, call: u64) -> Self {
        Operation {
            client,
            input,
            call,
            ret: None,
            output: None,
        }
    }
}

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some order of the operations, consistent with real time, explains every
    /// answer.
    Linearizable,
    /// No order explains the sub-history of `key` (the smallest key found
    /// so).
    NotLinearizable { key: u64, failure: Failure },
    /// The search for `key` (the smallest such key) ran out of budget, and no
    /// key was found not linearizable.
    Unknown { key: u64 },
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }

    /// A human-readable account of the verdict, for test failure messages.
    /// `history` must be the one that was checked.
    pub fn explain(&self, history: &[Operation]) -> String {
        match self {
            Verdict::Linearizable => "linearizable".to_string(),
            Verdict::Unknown { key } => {
                format!("unknown: the search for key {key} ran out of budget")
            }
            Verdict::NotLinearizable { key, failure } => failure.explain(*key, history),
        }
    }
}

/// Why a key is not linearizable. All operation numbers are indices into the
/// checked history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The completed operation whose return ends the shortest failing prefix
    /// found: if `minimal`, cut just before it returns, the key's history is
    /// still linearizable.
    pub op: usize,
    /// The return time of `op`.
    pub at: u64,
    /// The operations of that prefix, in history order: those of the key
    /// called at or before `at`, less reads that had not returned by then
    /// (they constrain nothing).
    pub prefix: Vec<usize>,
    /// The longest partial linearization the search found for the prefix, in
    /// order: the furthest it got before every way on failed.
    pub linearized: Vec<usize>,
    /// The register's value after `linearized`.
    pub state: Option<u64>,
    /// Whether the shrinking finished within its budget; if not, `prefix`
    /// fails but a shorter one might too.
    pub minimal: bool,
}

impl Failure {
    /// Long lists are cut to this many operations in explanations.
    const EXPLAIN_OPS_MAX: usize = 12;

    fn explain(&self, key: u64, history: &[Operation]) -> String {
        use fmt::Write as _;
        let describe = |index: usize| match history.get(index) {
            Some(op) => format!("#{index} {op}"),
            None => format!("#{index} (not in this history)"),
        };
        let mut text = format!(
            "key {key} is not linearizable: no order of its {} operations called up to t={} explains {}",
            self.prefix.len(),
            self.at,
            describe(self.op),
        );
        if !self.minimal {
            text.push_str(" (a shorter failing prefix may exist: shrinking ran out of budget)");
        }
        let placed = self.linearized.len();
        let skip = placed.saturating_sub(Self::EXPLAIN_OPS_MAX);
        let _ = write!(
            text,
            "\nlongest order found ({placed} ops{}):",
            if skip > 0 { ", last ones shown" } else { "" }
        );
        for &index in &self.linearized[skip..] {
            let _ = write!(text, "\n  {}", describe(index));
        }
        let _ = write!(text, "\nvalue after it: {:?}", self.state);
        let unplaced: Vec<usize> = self
            .prefix
            .iter()
            .copied()
            .filter(|index| !self.linearized.contains(index))
            .filter(|&index| history.get(index).is_some_and(|op| op.ret.is_some()))
            .collect();
        let _ = write!(text, "\ncompleted ops of the prefix not in it:");
        for &index in unplaced.iter().take(Self::EXPLAIN_OPS_MAX) {
            let _ = write!(text, "\n  {}", describe(index));
        }
        if unplaced.len() > Self::EXPLAIN_OPS_MAX {
            let _ = write!(
                text,
                "\n  ... and {} more",
                unplaced.len() - Self::EXPLAIN_OPS_MAX
            );
        }
        text
    }
}

/// How much work [`check_with_stats`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Search steps (candidates examined) over all keys, including the
    /// shrinking of a failure.
    pub steps: u64,
    /// Keys searched (keys with at least one operation left after dropping
    /// unknown reads). Fewer than all keys if a key failed.
    pub keys: usize,
    /// Operations searched.
    pub ops: usize,
    /// Unknown `Get`s dropped up front.
    pub dropped_reads: usize,
    /// Keys whose search ran out of budget.
    pub keys_unknown: usize,
    /// The most configurations one search memoized.
    pub cache_entries_max: usize,
}

/// Checks `history` with at most `budget` search steps per key (see the
/// module docs). Panics on invalid input.
pub fn check(history: &[Operation], budget: u64) -> Verdict {
    check_with_stats(history, budget).0
}

/// [`check`], also reporting how much work it did.
pub fn check_with_stats(history: &[Operation], budget: u64) -> (Verdict, CheckStats) {
    let mut stats = CheckStats::default();
    let mut keys: BTreeMap<u64, Vec<KeyOp>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        match validate(index, op) {
            Some(effect) => keys.entry(op.input.key()).or_default().push(KeyOp {
                index,
                effect,
                call: op.call,
                ret: op.ret,
            }),
            None => stats.dropped_reads += 1,
        }
    }

    let mut first_unknown = None;
    for (&key, ops) in &mut keys {
        merge_unobserved_values(ops);
        // By call time: the order the search walks in, which keeps its
        // bitsets packed (see `Linearized`).
        ops.sort_by_key(|op| op.call);
        stats.keys += 1;
        stats.ops += ops.len();
        let result = search(ops, budget);
        stats.record(&result);
        match result.outcome {
            Outcome::Linearizable => {}
            Outcome::OutOfBudget => {
                stats.keys_unknown += 1;
                first_unknown.get_or_insert(key);
            }
            Outcome::NotLinearizable => {
                let mut failure = shrink(ops, budget, result, &mut stats);
                failure.state = replay(history, &failure.linearized);
                return (Verdict::NotLinearizable { key, failure }, stats);
            }
        }
    }
    let verdict = match first_unknown {
        Some(key) => Verdict::Unknown { key },
        None => Verdict::Linearizable,
    };
    (verdict, stats)
}

impl CheckStats {
    fn record(&mut self, result: &SearchResult) {
        self.steps += result.steps;
        self.cache_entries_max = self.cache_entries_max.max(result.cache_entries);
    }
}

/// What an operation does to its key's register, as the search sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Effect {
    /// A `Put`, known or not: always allowed.
    Write(u64),
    /// A completed `Get` that read this value.
    Read(Option<u64>),
    /// A `Cas`; `succeeded` is `None` when the outcome is unknown.
    Cas {
        expect: Option<u64>,
        new: u64,
        succeeded: Option<bool>,
    },
}

impl Effect {
    /// The register's value after this operation, or `None` if the operation
    /// cannot have answered what it did from `state`.
    fn apply(self, state: Option<u64>) -> Option<Option<u64>> {
        match self {
            Effect::Write(value) => Some(Some(value)),
            Effect::Read(value) => (value == state).then_some(state),
            Effect::Cas {
                expect,
                new,
                succeeded,
            } => match (state == expect, succeeded) {
                (true, Some(true) | None) => Some(Some(new)),
                (false, Some(false) | None) => Some(state),
                (true, Some(false)) | (false, Some(true)) => None,
            },
        }
    }

    /// Whether it leaves the value as it is in every state it is legal in.
    fn is_pure(self) -> bool {
        match self {
            Effect::Read(_)
            | Effect::Cas {
                succeeded: Some(false),
                ..
            } => true,
            Effect::Cas {
                expect,
                new,
                succeeded: Some(true),
            } => expect == Some(new),
            Effect::Write(_)
            | Effect::Cas {
                succeeded: None, ..
            } => false,
        }
    }

    /// The same operation with its outcome unknown; `None` for a read, which
    /// then constrains nothing.
    fn forget_outcome(self) -> Option<Effect> {
        match self {
            Effect::Write(_) => Some(self),
            Effect::Read(_) => None,
            Effect::Cas { expect, new, .. } => Some(Effect::Cas {
                expect,
                new,
                succeeded: None,
            }),
        }
    }
}

/// Checks one operation's shape and turns it into its effect; `None` for an
/// unknown `Get`, which is dropped.
fn validate(index: usize, op: &Operation) -> Option<Effect> {
    if let Some(ret) = op.ret {
        assert!(
            ret >= op.call,
            "linearizability: operation #{index} ({op}) returns at {ret}, before its call at {}",
            op.call
        );
    }
    assert_eq!(
        op.ret.is_some(),
        op.output.is_some(),
        "linearizability: operation #{index} ({op:?}) must have both `ret` and `output` or neither"
    );
    match (op.input, op.output) {
        (Input::Put { value, .. }, None | Some(Output::Ok)) => Some(Effect::Write(value)),
        (Input::Get { .. }, None) => None,
        (Input::Get { .. }, Some(Output::Value(value))) => Some(Effect::Read(value)),
        (Input::Cas { expect, new, .. }, None) => Some(Effect::Cas {
            expect,
            new,
            succeeded: None,
        }),
        (Input::Cas { expect, new, .. }, Some(Output::Cas(succeeded))) => Some(Effect::Cas {
            expect,
            new,
            succeeded: Some(succeeded),
        }),
        (input, Some(output)) => panic!(
            "linearizability: operation #{index} has output {output:?}, which does not answer {input:?}"
        ),
    }
}

/// Replaces every value that no read returns and no `Cas` expects by one
/// value that none does either.
///
/// The register's answers depend only on whether its value equals a value
/// read or expected, so values that are neither are interchangeable; merging
/// them lets the memo table (and [`Unknowns`]) treat configurations that
/// differ only in such a value as one.
fn merge_unobserved_values(ops: &mut [KeyOp]) {
    let mut observed = HashSet::new();
    for op in ops.iter() {
        match op.effect {
            Effect::Read(Some(value))
            | Effect::Cas {
                expect: Some(value),
                ..
            } => {
                observed.insert(value);
            }
            Effect::Read(None) | Effect::Write(_) | Effect::Cas { expect: None, .. } => {}
        }
    }
    // At most `observed.len()` values are taken, so this finds a free one.
    let Some(unobserved) = (0..=u64::MAX).rev().find(|value| !observed.contains(value)) else {
        return;
    };
    let merge = |value: u64| {
        if observed.contains(&value) {
            value
        } else {
            unobserved
        }
    };
    for op in ops.iter_mut() {
        match &mut op.effect {
            Effect::Write(value) | Effect::Cas { new: value, .. } => *value = merge(*value),
            Effect::Read(_) => {}
        }
    }
}

/// The register's value after running `order` (history indices, a legal
/// sequence) on it.
fn replay(history: &[Operation], order: &[usize]) -> Option<u64> {
    order
        .iter()
        .fold(None, |state, &index| match history[index].input {
            Input::Put { value, .. } => Some(value),
            Input::Get { .. } => state,
            Input::Cas { expect, new, .. } => {
                if state == expect {
                    Some(new)
                } else {
                    state
                }
            }
        })
}

/// One operation of a key's sub-history.
#[derive(Clone, Copy, Debug)]
struct KeyOp {
    /// Index in the checked history.
    index: usize,
    effect: Effect,
    call: u64,
    /// `None`: unknown outcome, returns at +∞.
    ret: Option<u64>,
}

impl KeyOp {
    /// The value this operation writes if it writes (a `Cas` only if it
    /// succeeds).
    fn written(&self) -> Option<u64> {
        match self.effect {
            Effect::Write(value) | Effect::Cas { new: value, .. } => Some(value),
            Effect::Read(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Linearizable,
    NotLinearizable,
    OutOfBudget,
}

struct SearchResult {
    outcome: Outcome,
    steps: u64,
    cache_entries: usize,
    /// The longest partial linearization seen (history indices).
    deepest: Vec<usize>,
}

/// End of the event list.
const NIL: usize = usize::MAX;

/// The calls and returns of a key's completed operations, sorted by time, as
/// a doubly linked list that operations are lifted out of and put back into
/// in LIFO order. Node `2i` is the call of operation `i`, node `2i + 1` its
/// return, node `2n` the head. Operations with unknown outcomes are not
/// listed: the search places them only on demand (see [`Unknowns`]).
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
}

impl Events {
    fn new(ops: &[KeyOp]) -> Self {
        // Kind 0 (call) before kind 1 (return) at the same time: an operation
        // returning at t does not happen before one called at t.
        let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            if let Some(ret) = op.ret {
                order.push((op.call, 0, 2 * i));
                order.push((ret, 1, 2 * i + 1));
            }
        }
        order.sort_unstable();
        let head = 2 * ops.len();
        let mut events = Events {
            next: vec![NIL; head + 1],
            prev: vec![NIL; head + 1],
            head,
        };
        let mut last = head;
        for &(_, _, node) in &order {
            events.next[last] = node;
            events.prev[node] = last;
            last = node;
        }
        events
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes `unlink(node)`; valid only in reverse order of the unlinks.
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(2 * op);
        self.unlink(2 * op + 1);
    }

    fn unlift(&mut self, op: usize) {
        self.relink(2 * op + 1);
        self.relink(2 * op);
    }

    /// The operation whose return is the earliest still listed: nothing
    /// called after that return can be linearized yet.
    fn first_return(&self) -> Option<usize> {
        let mut node = self.next[self.head];
        while node != NIL && node % 2 == 0 {
            node = self.next[node];
        }
        (node != NIL).then_some(node / 2)
    }
}

/// A fast hasher for the memo table's keys (bitset words and a value); the
/// table only ever holds the search's own configurations, so no protection
/// against adversarial keys is needed.
#[derive(Default)]
struct WordHasher(u64);

impl WordHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // Fold the well-mixed high bits into the low ones too.
        self.0 ^ (self.0 >> 29)
    }
}

/// A configuration: which operations are linearized ([`Linearized::key`]),
/// the value after them, and, if the last of them has an unknown outcome, the
/// value before it (which limits what may come next: see [`candidate`]).
type Config = (SetKey, Option<u64>, Option<Option<u64>>);

/// A compact copy of a [`Linearized`] set: the number of leading full words
/// of the completed part left out, the number of completed words kept, and
/// the words kept.
type SetKey = (u32, u32, Box<[u64]>);

/// The set of linearized operations, as a bitset laid out to pack small in
/// the memo table: completed operations first, by call time, so that the
/// operations long since linearized make leading full words; then unknown
/// operations, by call time, most of which are never linearized.
struct Linearized {
    bits: Vec<u64>,
    /// Per operation, its bit.
    slot: Vec<usize>,
    /// Words holding completed operations.
    completed_words: usize,
}

impl Linearized {
    fn new(ops: &[KeyOp]) -> Self {
        let mut order: Vec<usize> = (0..ops.len()).collect();
        order.sort_by_key(|&i| (ops[i].ret.is_none(), ops[i].call, i));
        let completed = ops.iter().filter(|op| op.ret.is_some()).count();
        let completed_words = completed.div_ceil(64);
        let mut slot = vec![0; ops.len()];
        for (position, &i) in order.iter().enumerate() {
            // Unknown operations start on a fresh word.
            slot[i] = if position < completed {
                position
            } else {
                completed_words * 64 + (position - completed)
            };
        }
        let unknown_words = (ops.len() - completed).div_ceil(64);
        Linearized {
            bits: vec![0; completed_words + unknown_words],
            slot,
            completed_words,
        }
    }

    fn insert(&mut self, op: usize) {
        let slot = self.slot[op];
        self.bits[slot / 64] |= 1 << (slot % 64);
    }

    fn remove(&mut self, op: usize) {
        let slot = self.slot[op];
        self.bits[slot / 64] &= !(1 << (slot % 64));
    }

    /// The set without its leading full words of completed operations and
    /// the trailing empty words of either part.
    fn key(&self) -> SetKey {
        let (completed, unknown) = self.bits.split_at(self.completed_words);
        let full = completed
            .iter()
            .take_while(|&&word| word == u64::MAX)
            .count();
        let completed = &completed[full..];
        let completed_len = completed
            .iter()
            .rposition(|&word| word != 0)
            .map_or(0, |i| i + 1);
        let unknown_len = unknown
            .iter()
            .rposition(|&word| word != 0)
            .map_or(0, |i| i + 1);
        let words = [&completed[..completed_len], &unknown[..unknown_len]].concat();
        // Counts of words of at most `ops.len() / 64 + 2`, far below 2^32.
        (full as u32, completed_len as u32, words.into_boxed_slice())
    }
}

/// The value after `op` if it may be linearized next, from `state`, in a
/// canonical linearization; `after_unknown` is the value before the last
/// operation linearized if that one has an unknown outcome.
///
/// Canonical: if any linearization exists, one exists in which every unknown
/// operation changes the value and is directly followed by an operation that
/// needs it — a completed one that would not be legal without it, or an
/// unknown `Cas` it makes succeed. Otherwise it can be left out (it changes
/// nothing, or a write follows) or moved one place later (the operation after
/// it reads or fails the same either way and changes nothing, so the value
/// after both is unchanged); an unknown operation imposes no real-time order,
/// so moving it later is always allowed. Each step takes an unknown operation
/// out or later, so this ends. Among canonical linearizations, one with the
/// fewest unknown operations also never runs a chain of unknown operations
/// before a completed operation that was legal before the chain (it could go
/// first), which is why chains are only started for a [`Need`].
fn candidate(
    op: &KeyOp,
    state: Option<u64>,
    after_unknown: Option<Option<u64>>,
) -> Option<Option<u64>> {
    let next_state = op.effect.apply(state)?;
    let completed = op.ret.is_some();
    if !completed && next_state == state {
        return None;
    }
    match after_unknown {
        None => Some(next_state),
        Some(_) if matches!(op.effect, Effect::Write(_)) => None,
        Some(before) if completed && op.effect.apply(before).is_some() => None,
        Some(_) => Some(next_state),
    }
}

/// What a completed operation that cannot go next from the current value
/// needs a chain of unknown operations to set first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// This value: a read of it, a successful `Cas` expecting it.
    Value(u64),
    /// Anything but this value: a `Cas` that failed although it expected the
    /// current value.
    AnythingBut(Option<u64>),
}

impl Need {
    /// What completed `op` needs to be placed from `state`, or `None` if it
    /// can go now or no write can help.
    fn of(op: &KeyOp, state: Option<u64>) -> Option<Need> {
        match op.effect {
            Effect::Read(value) => value.filter(|_| value != state).map(Need::Value),
            Effect::Cas {
                expect,
                succeeded: Some(true),
                ..
            } if expect != state => expect.map(Need::Value),
            Effect::Cas {
                expect,
                succeeded: Some(false),
                ..
            } if expect == state => Some(Need::AnythingBut(expect)),
            Effect::Write(_) | Effect::Cas { .. } => None,
        }
    }
}

/// A key's operations with unknown outcomes, indexed for on-demand placing.
/// Lists hold `(call, operation)`, by call time.
struct Unknowns {
    /// All of them: any one may start a chain meeting `AnythingBut`.
    all: Vec<(u64, usize)>,
    /// The unknown `Cas`es, by the value they expect: what may continue a
    /// chain.
    by_expect: HashMap<u64, Vec<(u64, usize)>>,
    /// For a needed value `v`, those that may start a chain ending in `v`:
    /// writing `v`, or writing what a path of unknown `Cas`es leads from to
    /// `v`. Filled on first use.
    towards: HashMap<u64, Vec<(u64, usize)>>,
}

impl Unknowns {
    fn new(ops: &[KeyOp]) -> Self {
        let mut all: Vec<(u64, usize)> = (0..ops.len())
            .filter(|&i| ops[i].ret.is_none())
            .map(|i| (ops[i].call, i))
            .collect();
        all.sort_unstable();
        let mut by_expect: HashMap<u64, Vec<(u64, usize)>> = HashMap::new();
        for &(call, i) in &all {
            if let Effect::Cas {
                expect: Some(expect),
                ..
            } = ops[i].effect
            {
                by_expect.entry(expect).or_default().push((call, i));
            }
        }
        Unknowns {
            all,
            by_expect,
            towards: HashMap::new(),
        }
    }

    /// The operations that may start a chain meeting `need`.
    fn starting(&mut self, need: Need, ops: &[KeyOp]) -> &[(u64, usize)] {
        let Unknowns {
            all,
            by_expect,
            towards,
        } = self;
        match need {
            Need::AnythingBut(_) => all,
            Need::Value(value) => towards.entry(value).or_insert_with(|| {
                // Values from which unknown `Cas`es can lead to `value`.
                let mut sources = HashSet::from([value]);
                let mut frontier = vec![value];
                while let Some(target) = frontier.pop() {
                    for list in by_expect.values() {
                        for &(_, i) in list {
                            if let Effect::Cas {
                                expect: Some(expect),
                                new,
                                ..
                            } = ops[i].effect
                            {
                                if new == target && sources.insert(expect) {
                                    frontier.push(expect);
                                }
                            }
                        }
                    }
                }
                all.iter()
                    .copied()
                    .filter(|&(_, i)| ops[i].written().is_some_and(|w| sources.contains(&w)))
                    .collect()
            }),
        }
    }

    /// The unknown `Cas`es that may follow an unknown operation that left
    /// `state`.
    fn continuing(&self, state: Option<u64>) -> &[(u64, usize)] {
        state
            .and_then(|value| self.by_expect.get(&value))
            .map_or(&[], Vec::as_slice)
    }
}

/// Unknown operations with the same effect: any one of them may stand for
/// another, since all that are callable now stay callable. So only the first
/// one not yet linearized of each class (by call time) is ever tried, which
/// keeps the search from trying every subset of, say, a burst of timed-out
/// writes of values nothing reads.
struct Twins {
    /// Per operation, its class (unknown operations only).
    class: Vec<usize>,
    /// Per operation, its position in its class (unknown operations only).
    rank: Vec<usize>,
    classes: usize,
}

impl Twins {
    fn new(ops: &[KeyOp], unknown_by_call: &[(u64, usize)]) -> Self {
        let mut twins = Twins {
            class: vec![usize::MAX; ops.len()],
            rank: vec![usize::MAX; ops.len()],
            classes: 0,
        };
        let mut classes: HashMap<Effect, (usize, usize)> = HashMap::new();
        for &(_, op) in unknown_by_call {
            let fresh = classes.len();
            let (class, size) = classes.entry(ops[op].effect).or_insert((fresh, 0));
            twins.class[op] = *class;
            twins.rank[op] = *size;
            *size += 1;
        }
        twins.classes = classes.len();
        twins
    }
}

/// Where the search goes on from.
#[derive(Clone, Copy, Debug)]
enum Cursor {
    /// Walking the event list at this node.
    Walk(usize),
    /// Trying, as the start of a chain before completed operation `needy`,
    /// the unknown operations from position `next` of its
    /// [`Unknowns::starting`] list.
    Start { needy: usize, next: usize },
    /// Trying, right after an unknown operation, the unknown `Cas`es from
    /// position `next` of the [`Unknowns::continuing`] list; then the walk.
    Continue { next: usize },
    /// Nothing else to try here: undo the last choice.
    Backtrack,
}

/// One linearized operation, and what to restore when it is undone.
struct Frame {
    op: usize,
    state: Option<u64>,
    after_unknown: Option<Option<u64>>,
    /// Where to go on from once it is undone.
    resume: Cursor,
}

/// Searches for a linearization of one key's operations in at most `budget`
/// steps (Wing & Gong with Lowe's memoization; see the module docs).
fn search(ops: &[KeyOp], budget: u64) -> SearchResult {
    let mut result = SearchResult {
        outcome: Outcome::Linearizable,
        steps: 0,
        cache_entries: 0,
        deepest: Vec::new(),
    };
    // Completed operations not yet linearized; unknown ones may be left out.
    let mut remaining = ops.iter().filter(|op| op.ret.is_some()).count();
    if remaining == 0 {
        return result;
    }
    let mut events = Events::new(ops);
    let mut unknowns = Unknowns::new(ops);
    let twins = Twins::new(ops, &unknowns.all);
    // Per class of twins, how many are linearized: always the first ones.
    let mut placed = vec![0usize; twins.classes];
    let mut linearized = Linearized::new(ops);
    let mut cache: HashSet<Config, BuildHasherDefault<WordHasher>> = HashSet::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut state: Option<u64> = None;
    let mut after_unknown: Option<Option<u64>> = None;
    let mut cursor = Cursor::Walk(events.next[events.head]);

    // The first of `list[next..]` that may go now (called by `horizon`, the
    // first of its twins not linearized, allowed by `candidate` from `at`),
    // with its position and the value after it.
    let first_placeable = |list: &[(u64, usize)],
                           next: usize,
                           horizon: u64,
                           placed: &[usize],
                           at: (Option<u64>, Option<Option<u64>>)| {
        list.iter()
            .enumerate()
            .skip(next)
            .take_while(|(_, &(call, _))| call <= horizon)
            .filter(|(_, &(_, op))| twins.rank[op] == placed[twins.class[op]])
            .find_map(|(position, &(_, op))| {
                candidate(&ops[op], at.0, at.1).map(|next_state| (position, op, next_state))
            })
    };
    // Only an operation called by the earliest pending return may go now.
    let horizon = |events: &Events| {
        events
            .first_return()
            .and_then(|op| ops[op].ret)
            .unwrap_or(u64::MAX)
    };

    result.outcome = loop {
        if remaining == 0 {
            break Outcome::Linearizable;
        }
        if result.steps >= budget {
            break Outcome::OutOfBudget;
        }
        // The choice to try next, if any: (operation, value after it, where
        // to go on from once it is undone).
        let mut choice = None;
        match cursor {
            Cursor::Walk(entry) if entry != NIL && entry % 2 == 0 => {
                result.steps += 1;
                let op = entry / 2;
                cursor = Cursor::Walk(events.next[entry]);
                if let Some(next_state) = candidate(&ops[op], state, after_unknown) {
                    // An operation that never changes the value and may go
                    // now can go first in any extension of this
                    // configuration: nothing left returns before its call,
                    // and it changes nothing for the others. So if placing
                    // it now fails, all else fails too. (Not so for a write
                    // of the current value: elsewhere it would change it.)
                    let resume = if ops[op].effect.is_pure() {
                        Cursor::Backtrack
                    } else {
                        cursor
                    };
                    choice = Some((op, next_state, resume));
                } else if after_unknown.is_none() && Need::of(&ops[op], state).is_some() {
                    cursor = Cursor::Start { needy: op, next: 0 };
                }
            }
            Cursor::Start { needy, next } => {
                result.steps += 1;
                cursor = Cursor::Walk(events.next[2 * needy]);
                if let Some(need) = Need::of(&ops[needy], state) {
                    let list = unknowns.starting(need, ops);
                    let found =
                        first_placeable(list, next, horizon(&events), &placed, (state, None));
                    if let Some((position, op, next_state)) = found {
                        let next = position + 1;
                        choice = Some((op, next_state, Cursor::Start { needy, next }));
                    }
                }
            }
            Cursor::Continue { next } => {
                result.steps += 1;
                cursor = Cursor::Walk(events.next[events.head]);
                let list = unknowns.continuing(state);
                let at = (state, after_unknown);
                let found = first_placeable(list, next, horizon(&events), &placed, at);
                if let Some((position, op, next_state)) = found {
                    choice = Some((op, next_state, Cursor::Continue { next: position + 1 }));
                }
            }
            Cursor::Walk(_) | Cursor::Backtrack => {
                // At the earliest pending return (a completed operation's
                // return is still listed, so the walk meets one before
                // running off the end), what is linearized so far cannot be
                // extended past it. Undo the last choice.
                debug_assert!(
                    !matches!(cursor, Cursor::Walk(NIL)),
                    "walked past every return"
                );
                if stack.len() > result.deepest.len() {
                    result.deepest = stack.iter().map(|frame| ops[frame.op].index).collect();
                }
                let Some(frame) = stack.pop() else {
                    break Outcome::NotLinearizable;
                };
                linearized.remove(frame.op);
                state = frame.state;
                after_unknown = frame.after_unknown;
                if ops[frame.op].ret.is_some() {
                    events.unlift(frame.op);
                    remaining += 1;
                } else {
                    placed[twins.class[frame.op]] -= 1;
                }
                // The list is back as it was when the choice was made.
                cursor = frame.resume;
            }
        }

        if let Some((op, next_state, resume)) = choice {
            let completed = ops[op].ret.is_some();
            let next_after_unknown = (!completed).then_some(state);
            linearized.insert(op);
            let config = (linearized.key(), next_state, next_after_unknown);
            if cache.insert(config) {
                stack.push(Frame {
                    op,
                    state,
                    after_unknown,
                    resume,
                });
                state = next_state;
                after_unknown = next_after_unknown;
                if completed {
                    events.lift(op);
                    remaining -= 1;
                    cursor = Cursor::Walk(events.next[events.head]);
                } else {
                    debug_assert_eq!(twins.rank[op], placed[twins.class[op]]);
                    placed[twins.class[op]] += 1;
                    cursor = Cursor::Continue { next: 0 };
                }
            } else {
                linearized.remove(op);
                cursor = resume;
            }
        }
    };
    result.cache_entries = cache.len();
    result
}

/// The key's history cut just after the return event `returns[cut]`:
/// operations called after it are left out, and those still running at it
/// lose their outcome.
fn prefix(ops: &[KeyOp], returns: &[(u64, usize)], cut: usize) -> Vec<KeyOp> {
    let end = returns[cut];
    ops.iter()
        .enumerate()
        .filter(|(_, op)| op.call <= end.0)
        .filter_map(|(i, op)| match op.ret {
            Some(ret) if (ret, i) <= end => Some(*op),
            _ => op.effect.forget_outcome().map(|effect| KeyOp {
                effect,
                ret: None,
                ..*op
            }),
        })
        .collect()
}

/// Finds the shortest failing prefix of a key whose full `search` failed
/// (see the module docs), spending at most `budget` steps.
fn shrink(ops: &[KeyOp], budget: u64, full: SearchResult, stats: &mut CheckStats) -> Failure {
    // Return events in list order: by time, then by position.
    let mut returns: Vec<(u64, usize)> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| op.ret.map(|ret| (ret, i)))
        .collect();
    returns.sort_unstable();
    assert!(
        !returns.is_empty(),
        "a key without completed operations cannot fail"
    );

    // Invariant: the prefix cut at `returns[hi]` fails, and `witness` is the
    // search that showed it; every cut before `lo` is linearizable.
    let (mut lo, mut hi) = (0, returns.len() - 1);
    let mut witness = full;
    let mut left = budget;
    let mut minimal = true;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let result = search(&prefix(ops, &returns, mid), left);
        stats.record(&result);
        left -= result.steps;
        match result.outcome {
            Outcome::NotLinearizable => {
                hi = mid;
                witness = result;
            }
            Outcome::Linearizable => lo = mid + 1,
            Outcome::OutOfBudget => {
                minimal = false;
                break;
            }
        }
    }
    let (at, last) = returns[hi];
    Failure {
        op: ops[last].index,
        at,
        prefix: {
            let mut prefix: Vec<usize> = prefix(ops, &returns, hi)
                .iter()
                .map(|op| op.index)
                .collect();
            prefix.sort_unstable();
            prefix
        },
        linearized: witness.deepest,
        // Filled in from the history: `ops` carry merged values.
        state: None,
        minimal,
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Input::Put { key, value } => write!(f, "put({key}, {value})"),
            Input::Get { key } => write!(f, "get({key})"),
            Input::Cas { key, expect, new } => write!(f, "cas({key}, {expect:?} -> {new})"),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Output::Ok => write!(f, "ok"),
            Output::Value(value) => write!(f, "{value:?}"),
            Output::Cas(swapped) => write!(f, "{swapped}"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}: {} -> ", self.client, self.input)?;
        match self.output {
            Some(output) => write!(f, "{output}")?,
            None => write!(f, "?")?,
        }
        match self.ret {
            Some(ret) => write!(f, " [{}, {ret}]", self.call),
            None => write!(f, " [{}, ∞)", self.call),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: u64 = 1_000_000;

    fn put(client: u64, key: u64, value: u64, call: u64, ret: u64) -> Operation {
        Operation::completed(client, Input::Put { key, value }, call, ret, Output::Ok)
    }

    fn get(client: u64, key: u64, value: Option<u64>, call: u64, ret: u64) -> Operation {
        Operation::completed(client, Input::Get { key }, call, ret, Output::Value(value))
    }

    fn cas(
        client: u64,
        key: u64,
        expect: Option<u64>,
        new: u64,
        span: (u64, u64),
        ok: bool,
    ) -> Operation {
        let input = Input::Cas { key, expect, new };
        Operation::completed(client, input, span.0, span.1, Output::Cas(ok))
    }

    fn put_unknown(client: u64, key: u64, value: u64, call: u64) -> Operation {
        Operation::unknown(client, Input::Put { key, value }, call)
    }

    fn cas_unknown(client: u64, key: u64, expect: Option<u64>, new: u64, call: u64) -> Operation {
        Operation::unknown(client, Input::Cas { key, expect, new }, call)
    }

    #[track_caller]
    fn assert_linearizable(history: &[Operation]) {
        let verdict = check(history, BUDGET);
        assert!(verdict.is_linearizable(), "{}", verdict.explain(history));
    }

    /// Asserts the history fails on `key` and returns the failure.
    #[track_caller]
    fn assert_fails(history: &[Operation], key: u64) -> Failure {
        match check(history, BUDGET) {
            Verdict::NotLinearizable { key: k, failure } if k == key => {
                assert!(failure.minimal);
                failure
            }
            other => panic!("expected key {key} to fail, got {other:?}"),
        }
    }

    #[test]
    fn empty_and_unknown_only_histories_are_linearizable() {
        assert_linearizable(&[]);
        assert_linearizable(&[
            put_unknown(1, 0, 1, 0),
            Operation::unknown(2, Input::Get { key: 0 }, 1),
            cas_unknown(3, 0, None, 2, 2),
        ]);
    }

    #[test]
    fn sequential_history() {
        let history = [
            get(1, 0, None, 0, 1),
            put(1, 0, 1, 2, 3),
            get(2, 0, Some(1), 4, 5),
            put(2, 0, 2, 6, 7),
            get(1, 0, Some(2), 8, 9),
            cas(1, 0, Some(2), 3, (10, 11), true),
            cas(2, 0, Some(2), 4, (12, 13), false),
            get(2, 0, Some(3), 14, 15),
        ];
        assert_linearizable(&history);
        let (_, stats) = check_with_stats(&history, BUDGET);
        assert_eq!((stats.keys, stats.ops, stats.dropped_reads), (1, 8, 0));
        // A sequential history never backtracks: one step per operation.
        assert_eq!(stats.steps, 8);
    }

    #[test]
    fn concurrent_ops_can_be_ordered_either_way() {
        // The write overlaps both reads: each read may fall on either side.
        for (first, second) in [(None, None), (None, Some(1)), (Some(1), Some(1))] {
            assert_linearizable(&[
                put(1, 0, 1, 0, 10),
                get(2, 0, first, 1, 2),
                get(3, 0, second, 3, 4),
            ]);
        }
        // Two overlapping writes, then a read of either.
        for last in [1, 2] {
            assert_linearizable(&[
                put(1, 0, 1, 0, 5),
                put(2, 0, 2, 1, 6),
                get(3, 0, Some(last), 7, 8),
            ]);
        }
        // But a completed read of the new value pins the write before it.
        assert_fails(
            &[
                put(1, 0, 1, 0, 10),
                get(2, 0, Some(1), 1, 2),
                get(3, 0, None, 3, 4),
            ],
            0,
        );
    }

    #[test]
    fn touching_intervals_are_concurrent() {
        // The write returns at 5 and the read is called at 5: either order.
        assert_linearizable(&[put(1, 0, 1, 0, 5), get(2, 0, None, 5, 6)]);
        // One tick later the write happens before the read.
        assert_fails(&[put(1, 0, 1, 0, 5), get(2, 0, None, 6, 7)], 0);
        // An instantaneous operation (ret == call) is fine.
        assert_linearizable(&[put(1, 0, 1, 3, 3), get(2, 0, Some(1), 3, 3)]);
    }

    #[test]
    fn stale_read_after_completed_write() {
        let history = [
            put(1, 0, 1, 0, 1),
            put(1, 0, 2, 2, 3),
            get(2, 0, Some(1), 4, 5),
            put(1, 0, 3, 6, 7),
            get(2, 0, Some(3), 8, 9),
        ];
        let failure = assert_fails(&history, 0);
        assert_eq!((failure.op, failure.at), (2, 5));
        assert_eq!(failure.prefix, vec![0, 1, 2]);
        assert_eq!(failure.linearized, vec![0, 1]);
        assert_eq!(failure.state, Some(2));
        let text = check(&history, BUDGET).explain(&history);
        assert!(
            text.contains("#2 client 2: get(0) -> Some(1) [4, 5]"),
            "{text}"
        );
    }

    #[test]
    fn new_old_inversion() {
        // The write is still running, but once one read has seen the new
        // value a later read cannot see the old one.
        let history = [
            put(1, 0, 1, 0, 100),
            get(2, 0, Some(1), 10, 20),
            get(3, 0, None, 30, 40),
        ];
        let failure = assert_fails(&history, 0);
        assert_eq!(failure.op, 2);
        // Overlapping reads may disagree.
        assert_linearizable(&[
            put(1, 0, 1, 0, 100),
            get(2, 0, Some(1), 10, 30),
            get(3, 0, None, 20, 40),
        ]);
        // Two readers seeing two writes in opposite orders.
        assert_fails(
            &[
                put(1, 0, 1, 0, 100),
                put(2, 0, 2, 0, 100),
                get(3, 0, Some(1), 10, 11),
                get(3, 0, Some(2), 12, 13),
                get(4, 0, Some(2), 14, 15),
                get(4, 0, Some(1), 16, 17),
            ],
            0,
        );
    }

    #[test]
    fn read_of_a_value_never_written() {
        let failure = assert_fails(
            &[
                put(1, 0, 1, 0, 10),
                get(2, 0, Some(7), 2, 4),
                put(1, 0, 7, 20, 21),
            ],
            0,
        );
        assert_eq!((failure.op, failure.prefix.clone()), (1, vec![0, 1]));
        assert!(failure.linearized.is_empty() || failure.linearized == vec![0]);
    }

    #[test]
    fn unknown_put_assumed_applied_to_explain_a_read() {
        assert_linearizable(&[put_unknown(1, 0, 1, 0), get(2, 0, Some(1), 5, 6)]);
        // And it stays applied.
        assert_fails(
            &[
                put_unknown(1, 0, 1, 0),
                get(2, 0, Some(1), 5, 6),
                get(2, 0, None, 7, 8),
            ],
            0,
        );
    }

    #[test]
    fn unknown_put_assumed_never_applied() {
        // Nothing ever reads 1: the write may never have happened (or happen
        // after the end of the history).
        assert_linearizable(&[
            put_unknown(1, 0, 1, 0),
            get(2, 0, None, 10, 11),
            put(2, 0, 2, 12, 13),
            get(3, 0, Some(2), 20, 21),
        ]);
    }

    #[test]
    fn unknown_put_cannot_take_effect_before_its_call() {
        assert_fails(&[get(2, 0, Some(1), 0, 5), put_unknown(1, 0, 1, 10)], 0);
    }

    #[test]
    fn unknown_put_linearized_late() {
        // The lost write of 1 can only explain the last read if it lands
        // after the completed write of 2 and the read of 2.
        let history = [
            put_unknown(1, 0, 1, 0),
            put(2, 0, 2, 1, 2),
            get(3, 0, Some(2), 3, 4),
            get(3, 0, Some(1), 5, 6),
        ];
        assert_linearizable(&history);
        // It applies at most once: it cannot explain 1, then 2, then 1 again.
        assert_fails(
            &[
                put_unknown(1, 0, 1, 0),
                get(3, 0, Some(1), 3, 4),
                put(2, 0, 2, 5, 6),
                get(3, 0, Some(1), 7, 8),
            ],
            0,
        );
    }

    #[test]
    fn unknown_operations_chain() {
        // The lost write of 1 makes the lost swap of 1 for 2 succeed, which
        // explains the read of 2.
        let swap = cas_unknown(2, 0, Some(1), 2, 0);
        assert_linearizable(&[put_unknown(1, 0, 1, 0), swap, get(3, 0, Some(2), 5, 6)]);
        assert_fails(&[swap, get(3, 0, Some(2), 5, 6)], 0);
        // A failed swap is explained by a lost write that changed the value.
        let failed = cas(2, 0, Some(1), 2, (3, 4), false);
        assert_linearizable(&[put(1, 0, 1, 1, 2), put_unknown(3, 0, 9, 0), failed]);
        assert_fails(&[put(1, 0, 1, 1, 2), failed], 0);
    }

    #[test]
    fn many_lost_writes_stay_cheap() {
        // 60 timed-out writes of values nothing reads: any one of them could
        // explain the failed swap, and all are alike, so one is tried.
        let mut history: Vec<Operation> = (0..60).map(|i| put_unknown(i, 0, 100 + i, 0)).collect();
        history.extend([
            put(60, 0, 1, 1, 2),
            cas(60, 0, Some(1), 2, (3, 4), false),
            get(60, 0, Some(1), 5, 6),
        ]);
        // Not linearizable: after the write that fails the swap, nothing
        // writes 1 again.
        let (verdict, stats) = check_with_stats(&history, BUDGET);
        assert!(
            matches!(verdict, Verdict::NotLinearizable { key: 0, .. }),
            "{verdict:?}"
        );
        assert!(stats.steps < 100, "{stats:?}");
        // One more lost write, of 1, fixes it.
        history.push(put_unknown(61, 0, 1, 0));
        let (verdict, stats) = check_with_stats(&history, BUDGET);
        assert_eq!(verdict, Verdict::Linearizable);
        assert!(stats.steps < 100, "{stats:?}");
    }

    #[test]
    fn writing_the_current_value_is_not_a_read() {
        // Regression: placing put(3) while the value is already 3 changes
        // nothing now, but it must still be free to go later, where it
        // changes 1 back to 3 for the last swap.
        assert_linearizable(&[
            cas(0, 1, Some(1), 1, (0, 5), true),
            cas(1, 1, Some(3), 3, (8, 10), true),
            cas(2, 1, None, 3, (5, 5), true),
            put(3, 1, 3, 1, 6),
            put(5, 1, 1, 3, 5),
        ]);
    }

    #[test]
    fn unknown_reads_are_dropped() {
        let history = [
            put(1, 0, 1, 0, 1),
            Operation::unknown(2, Input::Get { key: 0 }, 2),
        ];
        let (verdict, stats) = check_with_stats(&history, BUDGET);
        assert_eq!(verdict, Verdict::Linearizable);
        assert_eq!((stats.ops, stats.dropped_reads), (1, 1));
    }

    #[test]
    fn compare_and_swap() {
        // Two concurrent swaps from None: only one can succeed.
        assert_linearizable(&[
            cas(1, 0, None, 1, (0, 10), true),
            cas(2, 0, None, 2, (0, 10), false),
            get(3, 0, Some(1), 11, 12),
        ]);
        assert_fails(
            &[
                cas(1, 0, None, 1, (0, 10), true),
                cas(2, 0, None, 2, (0, 10), true),
            ],
            0,
        );
        // A failed swap saw a value other than `expect`.
        assert_fails(&[cas(1, 0, None, 1, (0, 1), false)], 0);
        assert_linearizable(&[
            put(1, 0, 5, 0, 1),
            cas(1, 0, None, 1, (2, 3), false),
            get(1, 0, Some(5), 4, 5),
        ]);
        // An unknown swap may have happened or not, as the state allows.
        let unknown = cas_unknown(1, 0, None, 1, 0);
        assert_linearizable(&[unknown, get(2, 0, Some(1), 5, 6)]);
        assert_fails(&[put(3, 0, 2, 0, 1), unknown, get(2, 0, Some(1), 5, 6)], 0);
    }

    #[test]
    fn keys_are_independent() {
        // Read as one register this would fail (the read of key 1 would have
        // to see the write to key 0).
        assert_linearizable(&[
            put(1, 0, 1, 0, 1),
            get(2, 1, None, 2, 3),
            put(2, 1, 2, 4, 5),
            get(1, 0, Some(1), 6, 7),
        ]);
        // A stale read on key 3 alone fails, and is reported against key 3.
        let history = [
            put(1, 2, 1, 0, 1),
            put(1, 3, 1, 0, 1),
            get(2, 2, Some(1), 2, 3),
            get(2, 3, None, 2, 3),
        ];
        let failure = assert_fails(&history, 3);
        assert_eq!((failure.op, failure.prefix.clone()), (3, vec![1, 3]));
        // The smallest failing key is reported.
        let history = [
            put(1, 9, 1, 0, 1),
            get(1, 9, None, 2, 3),
            put(1, 4, 1, 0, 1),
            get(1, 4, None, 2, 3),
        ];
        assert_fails(&history, 4);
    }

    #[test]
    fn memo_keys_are_compact_and_distinct() {
        // 200 completed operations (4 words), then 100 unknown ones (2 words).
        let ops: Vec<KeyOp> = (0..300)
            .map(|i| KeyOp {
                index: i,
                effect: Effect::Write(1),
                call: i as u64,
                ret: (i < 200).then_some(i as u64 + 1),
            })
            .collect();
        let mut set = Linearized::new(&ops);
        assert_eq!(set.key(), (0, 0, Box::from([])));
        (0..128).for_each(|op| set.insert(op));
        // Two full words are left out.
        assert_eq!(set.key(), (2, 0, Box::from([])));
        set.insert(128);
        let next_completed = set.key();
        set.remove(128);
        set.insert(200);
        let first_unknown = set.key();
        assert_eq!(next_completed, (2, 1, Box::from([1])));
        assert_eq!(first_unknown, (2, 0, Box::from([1])));
        set.remove(200);
        set.insert(299);
        assert_eq!(set.key(), (2, 0, Box::from([0, 1 << 35])));
    }

    /// `puts` concurrent writes of distinct values, then two reads, one after
    /// the other, of two of them: not linearizable (nothing writes between
    /// the reads), but proving it means trying every subset of the writes.
    fn wide_history(key: u64, puts: u64) -> Vec<Operation> {
        let mut history: Vec<Operation> = (0..puts).map(|i| put(i, key, i + 1, 0, 100)).collect();
        history.push(get(puts, key, Some(1), 200, 201));
        history.push(get(puts, key, Some(2), 202, 203));
        history
    }

    #[test]
    fn budget_exhaustion_returns_unknown() {
        let history = wide_history(0, 40);
        let (verdict, stats) = check_with_stats(&history, 5_000);
        assert_eq!(verdict, Verdict::Unknown { key: 0 });
        assert_eq!((stats.steps, stats.keys_unknown), (5_000, 1));
        assert_eq!(check(&history, 0), Verdict::Unknown { key: 0 });
        // With enough budget the same shape gets its true verdict.
        let (verdict, stats) = check_with_stats(&wide_history(0, 8), BUDGET);
        assert!(
            matches!(verdict, Verdict::NotLinearizable { key: 0, .. }),
            "{verdict:?}"
        );
        assert!(stats.steps > 100, "{stats:?}");
        // A failing key is reported even if an earlier one ran out of budget.
        let mut history = wide_history(0, 40);
        history.extend([put(1, 5, 1, 0, 1), get(1, 5, None, 2, 3)]);
        let (verdict, stats) = check_with_stats(&history, 5_000);
        assert!(
            matches!(verdict, Verdict::NotLinearizable { key: 5, .. }),
            "{verdict:?}"
        );
        assert_eq!(stats.keys_unknown, 1);
    }

    #[test]
    fn memoization_keeps_wide_linearizable_histories_cheap() {
        // 40 concurrent writes read back in a consistent order: found at once.
        let mut history: Vec<Operation> = (0..40).map(|i| put(i, 0, i + 1, 0, 100)).collect();
        history.push(get(40, 0, Some(40), 200, 201));
        let (verdict, stats) = check_with_stats(&history, BUDGET);
        assert_eq!(verdict, Verdict::Linearizable);
        assert!(stats.steps < 2_000, "{stats:?}");
    }

    #[test]
    #[should_panic(expected = "returns at 3, before its call at 5")]
    fn return_before_call_panics() {
        check(&[put(1, 0, 1, 5, 3)], BUDGET);
    }

    #[test]
    #[should_panic(expected = "does not answer")]
    fn mismatched_output_panics() {
        check(
            &[Operation::completed(
                1,
                Input::Get { key: 0 },
                0,
                1,
                Output::Ok,
            )],
            BUDGET,
        );
    }

    #[test]
    #[should_panic(expected = "both `ret` and `output` or neither")]
    fn return_without_output_panics() {
        let op = Operation {
            output: None,
            ..put(1, 0, 1, 0, 1)
        };
        check(&[op], BUDGET);
    }

    /// splitmix64: a small deterministic generator for the randomized tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    /// A history made by really running the operations, one at a time, on a
    /// map, each at a random point inside its client's interval; so it is
    /// linearizable by construction. Some operations lose their outcome:
    /// those either still take effect (possibly long after the client gave
    /// up) or never do.
    fn recorded_history(
        rng: &mut Rng,
        clients: u64,
        ops_per_client: u64,
        keys: u64,
    ) -> Vec<Operation> {
        let mut history = Vec::new();
        let mut points = Vec::new();
        let mut fresh = 0;
        for client in 0..clients {
            let mut now = rng.below(5);
            for _ in 0..ops_per_client {
                let key = rng.below(keys);
                let input = match rng.below(10) {
                    0..=3 => {
                        fresh += 1;
                        Input::Put { key, value: fresh }
                    }
                    4..=7 => Input::Get { key },
                    _ => Input::Cas {
                        key,
                        expect: [None, Some(fresh), Some(fresh.saturating_sub(1))]
                            [rng.below(3) as usize],
                        new: {
                            fresh += 1;
                            fresh
                        },
                    },
                };
                let length = rng.below(20);
                let unknown = rng.percent(15);
                let point = if unknown {
                    now + rng.below(60)
                } else {
                    now + rng.below(length + 1)
                };
                if !(unknown && rng.percent(50)) {
                    points.push((point, history.len()));
                }
                history.push(Operation {
                    client,
                    input,
                    call: now,
                    ret: (!unknown).then_some(now + length),
                    output: None,
                });
                now += length + rng.below(5);
            }
        }
        points.sort_unstable();
        let mut map: BTreeMap<u64, u64> = BTreeMap::new();
        for (_, index) in points {
            let output = match history[index].input {
                Input::Put { key, value } => {
                    map.insert(key, value);
                    Output::Ok
                }
                Input::Get { key } => Output::Value(map.get(&key).copied()),
                Input::Cas { key, expect, new } => {
                    let swapped = map.get(&key).copied() == expect;
                    if swapped {
                        map.insert(key, new);
                    }
                    Output::Cas(swapped)
                }
            };
            if history[index].ret.is_some() {
                history[index].output = Some(output);
            }
        }
        history
    }

    #[test]
    fn recorded_histories_are_accepted_and_corrupted_reads_rejected() {
        let mut rejected = 0;
        for seed in 0..300 {
            let mut rng = Rng(seed);
            // Up to a few hundred operations on a key: bitsets of many words.
            let (clients, ops_per_client, keys) =
                (2 + rng.below(4), 10 + rng.below(50), 1 + rng.below(3));
            let mut history = recorded_history(&mut rng, clients, ops_per_client, keys);
            let verdict = check(&history, BUDGET);
            assert!(
                verdict.is_linearizable(),
                "seed {seed}: {}",
                verdict.explain(&history)
            );

            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| matches!(history[i].output, Some(Output::Value(_))))
                .collect();
            if reads.is_empty() {
                continue;
            }
            let victim = reads[rng.below(reads.len() as u64) as usize];
            history[victim].output = Some(Output::Value(Some(u64::MAX)));
            let key = history[victim].input.key();
            match check(&history, BUDGET) {
                Verdict::NotLinearizable { key: k, failure } => {
                    assert_eq!(k, key, "seed {seed}");
                    assert!(failure.minimal, "seed {seed}");
                    // Cut just before the corrupted read returns, the rest is
                    // a real execution: the corrupted read ends the prefix.
                    assert_eq!(failure.op, victim, "seed {seed}");
                    rejected += 1;
                }
                other => panic!("seed {seed}: corrupted read of #{victim} accepted: {other:?}"),
            }
        }
        assert!(rejected > 250, "{rejected}");
    }

    /// Tries every order of every subset holding all completed operations.
    fn brute_force(history: &[Operation]) -> bool {
        fn extend(
            history: &[Operation],
            used: &mut Vec<bool>,
            state: &mut BTreeMap<u64, u64>,
        ) -> bool {
            let done = history
                .iter()
                .zip(used.iter())
                .all(|(op, &used)| used || op.ret.is_none());
            if done {
                return true;
            }
            for i in 0..history.len() {
                // Everything completed before `i` was called must come first.
                let ready = !used[i]
                    && history.iter().zip(used.iter()).all(|(before, &placed)| {
                        placed || before.ret.is_none_or(|ret| ret >= history[i].call)
                    });
                if !ready {
                    continue;
                }
                let key = history[i].input.key();
                let value = state.get(&key).copied();
                let after = match (history[i].input, history[i].output) {
                    (Input::Put { value, .. }, _) => Some(Some(value)),
                    (Input::Get { .. }, None) => Some(value),
                    (Input::Get { .. }, Some(output)) => {
                        (output == Output::Value(value)).then_some(value)
                    }
                    (Input::Cas { expect, new, .. }, output) => {
                        let swapped = value == expect;
                        match output {
                            None => Some(if swapped { Some(new) } else { value }),
                            Some(output) if output == Output::Cas(swapped) => {
                                Some(if swapped { Some(new) } else { value })
                            }
                            Some(_) => None,
                        }
                    }
                };
                let Some(after) = after else { continue };
                used[i] = true;
                let saved = state.clone();
                match after {
                    Some(v) => state.insert(key, v),
                    None => state.remove(&key),
                };
                if extend(history, used, state) {
                    return true;
                }
                *state = saved;
                used[i] = false;
            }
            false
        }
        extend(
            history,
            &mut vec![false; history.len()],
            &mut BTreeMap::new(),
        )
    }

    /// A small random history, mostly nonsense: values from a tiny range so
    /// that reads, `Cas`es and unknown operations interact.
    fn small_history(
        rng: &mut Rng,
        ops: u64,
        keys: u64,
        unknown_pct: u64,
        cas_pct: u64,
    ) -> Vec<Operation> {
        let value = |rng: &mut Rng| 1 + rng.below(3);
        let maybe = |rng: &mut Rng| (!rng.percent(30)).then(|| 1 + rng.below(3));
        (0..ops)
            .map(|client| {
                let key = rng.below(keys);
                let (input, output) = if rng.percent(cas_pct) {
                    let (expect, new) = (maybe(rng), value(rng));
                    (
                        Input::Cas { key, expect, new },
                        Output::Cas(rng.percent(50)),
                    )
                } else if rng.percent(50) {
                    (
                        Input::Put {
                            key,
                            value: value(rng),
                        },
                        Output::Ok,
                    )
                } else {
                    (Input::Get { key }, Output::Value(maybe(rng)))
                };
                let call = rng.below(10);
                if rng.percent(unknown_pct) {
                    Operation::unknown(client, input, call)
                } else {
                    Operation::completed(client, input, call, call + rng.below(6), output)
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        // (cases, most ops, keys, % unknown, % Cas)
        let regimes = [
            (20_000, 7, 2, 20, 33),
            (10_000, 8, 1, 50, 60),
            (10_000, 8, 1, 10, 0),
            (10_000, 8, 1, 70, 80),
        ];
        for (regime, &(cases, ops_max, keys, unknown_pct, cas_pct)) in regimes.iter().enumerate() {
            let mut rng = Rng(0x5eed + regime as u64);
            let (mut yes, mut no) = (0, 0);
            for case in 0..cases {
                let ops = 1 + rng.below(ops_max);
                let history = small_history(&mut rng, ops, keys, unknown_pct, cas_pct);
                let expected = brute_force(&history);
                let verdict = check(&history, BUDGET);
                assert_eq!(
                    verdict.is_linearizable(),
                    expected,
                    "regime {regime} case {case}: {history:#?}\n{verdict:?}"
                );
                if expected {
                    yes += 1;
                } else {
                    no += 1;
                }
            }
            // Both answers are well represented, or the comparison proves
            // little.
            assert!(
                yes > cases / 8 && no > cases / 8,
                "regime {regime}: {yes} linearizable, {no} not"
            );
        }
    }
}
