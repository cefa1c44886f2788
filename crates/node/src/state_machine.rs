//! The contract between the runtime and the service it replicates.
//!
//! A [`StateMachine`] is what the runtime keeps identical on every member:
//! the runtime orders commands through Raft, makes them durable in the WAL,
//! and hands the committed ones to [`StateMachine::apply`] in log order on
//! every member. It knows nothing of what a command means.
//!
//! # Threads, and what each method may block on
//!
//! | method                | thread                         | may block on / cost              |
//! |-----------------------|--------------------------------|----------------------------------|
//! | `encode_command`      | the event loop (propose)       | nothing; O(command)              |
//! | `check_command`       | the event loop (forwarded)     | nothing; O(command)              |
//! | `apply`               | the event loop                 | nothing; O(batch), no I/O        |
//! | `query`               | the event loop                 | nothing; O(answer), no I/O       |
//! | `snapshot`            | the event loop                 | nothing; O(1) or O(recent writes)|
//! | `background_step`     | the event loop, between passes | nothing; a bounded slice of work |
//! | `gauges`              | the event loop (metrics)       | nothing; O(1)                    |
//! | `Snapshot::write_to`  | the runtime's snapshot thread (nice 10) | the writer (disk I/O); O(state) |
//! | `restore`             | the starting thread; on install a restore thread (nice 10) | the reader; O(state) |
//! | `install`             | the event loop (start-up: the starting thread) | nothing; O(1)    |
//!
//! Everything that runs on the event loop delays heartbeats, elections and
//! every other client: it must be short and must never do I/O. Work in
//! proportion to the whole state belongs in `Snapshot::write_to` and
//! `restore`, which the runtime runs on other threads, or is cut into
//! slices with `background_step`.
//!
//! # Determinism
//!
//! `apply` must give the same state and the same responses on every member
//! for the same sequence of commands: no clocks, no randomness, no
//! iteration over hash maps with random seeds, no dependence on when
//! `background_step` ran. A snapshot written from the state after index
//! `i` and restored must equal the state after applying the log through
//! `i`.

use std::io::{Read, Write};

use bytes::{Bytes, BytesMut};
use skiff_raft::{Index, Term};

/// A committed log entry as the state machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub index: Index,
    pub term: Term,
    /// The bytes [`StateMachine::encode_command`] produced; `None` for an
    /// entry of the runtime's own (a leader's no-op, a membership change),
    /// which the state machine must count as applied and otherwise ignore.
    pub command: Option<Bytes>,
}

/// Why applying a committed entry failed. Fatal to the member: the log is
/// the same on every member, so an entry one member cannot apply is a bug
/// or corruption, never something to skip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {index}: {reason}")]
pub struct ApplyError {
    pub index: Index,
    pub reason: String,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a valid snapshot: {0}")]
    Corrupt(String),
}

/// A frozen, consistent view of a state machine, taken on the loop by
/// [`StateMachine::snapshot`] and written out on the runtime's snapshot
/// thread while the loop goes on applying.
pub trait SnapshotView: Send + 'static {
    /// Writes the whole view to `w` in the state machine's own format
    /// (what [`StateMachine::restore`] reads). The runtime buffers `w`,
    /// checksums the bytes, fsyncs and renames the file; an error here is
    /// logged and the snapshot retried later.
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()>;
}

/// A service replicated by the runtime. See the module docs for the
/// threads each method runs on.
pub trait StateMachine: Send + Sized + 'static {
    /// What a client proposes.
    type Command: Send + 'static;
    /// The answer to one applied command (errors of the service included:
    /// a command refused by the state machine is still applied).
    type Response: Send + 'static;
    /// A read served from the applied state.
    type Query: Send + 'static;
    /// The answer to a query.
    type QueryResponse: Send + 'static;
    /// What [`StateMachine::snapshot`] freezes.
    type Snapshot: SnapshotView;

    /// Appends the log form of `cmd` to `out`. Runs on the proposing
    /// member; what it writes is what `apply` gets on every member.
    fn encode_command(cmd: &Self::Command, out: &mut BytesMut);

    /// Whether `command`, forwarded by another member to this leader, is
    /// one this state machine can apply. A leader proposes nothing that
    /// fails this: a command every member then failed to apply would stop
    /// them all. The default accepts everything.
    fn check_command(command: &Bytes) -> Result<(), String> {
        let _ = command;
        Ok(())
    }

    /// Applies `batch` (consecutive committed entries, in log order) and
    /// pushes one response per entry that carries a command, in order.
    fn apply(
        &mut self,
        batch: &[Committed],
        responses: &mut Vec<Self::Response>,
    ) -> Result<(), ApplyError>;

    /// Serves a read from the applied state: after the read index was
    /// applied (linearizable reads), or at once (serializable ones).
    fn query(&self, query: &Self::Query) -> Self::QueryResponse;

    /// Freezes the applied state for a snapshot: O(1), or O(writes since
    /// the last snapshot) at most.
    fn snapshot(&self) -> Self::Snapshot;

    /// Reads a state written by [`SnapshotView::write_to`].
    fn restore(r: &mut dyn Read) -> Result<Self, RestoreError>;

    /// Takes the state of `restored` (what [`Self::restore`] read: a
    /// snapshot installed from the leader, or found at start) in place of
    /// this one's, and returns what it replaced, which the runtime drops off
    /// the loop. The default swaps the whole value; a state machine that
    /// holds more than its state (channels to subscribers, such as the KV
    /// store's watchers) keeps that part and tells it the state jumped.
    /// Runs on the loop thread: O(1).
    fn install(&mut self, restored: Self) -> Self {
        std::mem::replace(self, restored)
    }

    /// One bounded slice of deferred work (compaction, ...), called on the
    /// loop while it returns `true` and at least once after each applied
    /// batch. Must not change what any query or snapshot observes.
    fn background_step(&mut self) -> bool {
        false
    }

    /// Gauges for the metrics endpoint: (name, help, value); names are
    /// exported with a `skiff_` prefix.
    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}
