//! What a leader knows of each follower, and its flow control.
//!
//! - `Probe`: the leader does not know where the follower's log matches;
//!   it sends one AppendEntries and waits for the answer before sending
//!   another (or, the probe or its answer lost, for a round trip).
//! - `Replicate`: the follower matched; the leader streams entries
//!   optimistically (`next` runs ahead of `match`) within a window of
//!   `inflight_max` messages and `inflight_bytes_max` bytes.
//!
//! Loss is detected by round trips, never by elapsed ticks: messages are
//! stamped with the leader's heartbeat round current when they left, and
//! the answer to a later heartbeat round shows how long a round trip takes
//! right now. A slow or reordering network then gets fewer retries, not
//! more (retries on a timer would flood a congested one).

use std::collections::VecDeque;

use crate::types::Index;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    /// The follower needs compacted entries: a snapshot is on its way;
    /// nothing else is sent until it is acknowledged or reported failed.
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest index known to match the leader's log, durably.
    pub match_index: Index,
    /// Next index to send.
    pub next: Index,
    pub state: ProgressState,
    /// Probe: an AppendEntries is outstanding.
    pub probe_sent: bool,
    /// Probe: the heartbeat round current when the outstanding probe left.
    probe_round: u64,
    /// (last index, bytes, heartbeat round when it left) of each
    /// AppendEntries in flight, oldest first.
    inflight: VecDeque<(Index, usize, u64)>,
    inflight_bytes: usize,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The highest commit index sent to the follower that it can use (an
    /// `Append`'s bounded by its last entry, a heartbeat's by the match).
    pub commit_sent: Index,
    /// Ticks since the snapshot being sent was asked for.
    pub snapshot_ticks: u32,
}

impl Progress {
    pub fn new(next: Index) -> Progress {
        Progress {
            match_index: 0,
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            probe_round: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            recent_active: false,
            commit_sent: 0,
            snapshot_ticks: 0,
        }
    }

    /// Whether another AppendEntries with entries may go now.
    pub fn can_send(&self, inflight_max: usize, inflight_bytes_max: usize) -> bool {
        match self.state {
            ProgressState::Probe => !self.probe_sent,
            ProgressState::Replicate => {
                self.inflight.len() < inflight_max && self.inflight_bytes < inflight_bytes_max
            }
            ProgressState::Snapshot => false,
        }
    }

    /// Records an AppendEntries carrying entries up to `last` (`bytes` of
    /// them) as sent while heartbeat round `round` was the leader's latest.
    pub fn sent(&mut self, last: Index, bytes: usize, round: u64) {
        match self.state {
            ProgressState::Probe => {
                self.probe_sent = true;
                self.probe_round = round;
            }
            ProgressState::Snapshot => {}
            ProgressState::Replicate => {
                if last >= self.next {
                    self.next = last + 1;
                    self.inflight.push_back((last, bytes, round));
                    self.inflight_bytes += bytes;
                }
            }
        }
    }

    /// The follower matched through `index`. Returns whether `match` moved.
    ///
    /// In `Probe` and `Snapshot` the answer that ends the state matches at
    /// least `next - 1` (the probe's previous entry, the snapshot's index).
    /// A lower one is stale (an older message answered late, reordered or
    /// duplicated, or sent before the follower was removed and added back):
    /// it moves `match` but leaves the state, and the outstanding probe,
    /// alone, since the follower's log beyond it is still unknown.
    pub fn acked(&mut self, index: Index) -> bool {
        let moved = index > self.match_index;
        if moved {
            self.match_index = index;
        }
        match self.state {
            ProgressState::Replicate => {
                while self
                    .inflight
                    .front()
                    .is_some_and(|&(last, _, _)| last <= index)
                {
                    let (_, bytes, _) = self.inflight.pop_front().expect("checked");
                    self.inflight_bytes -= bytes;
                }
                self.next = self.next.max(index + 1);
            }
            ProgressState::Probe | ProgressState::Snapshot => {
                if index + 1 >= self.next {
                    self.state = ProgressState::Replicate;
                    self.probe_sent = false;
                    self.inflight.clear();
                    self.inflight_bytes = 0;
                    self.next = self.match_index + 1;
                }
                // Below: stale. `next` stays above the raised match.
                self.next = self.next.max(self.match_index + 1);
            }
        }
        moved
    }

    /// Back to probing from `next`.
    pub fn probe_from(&mut self, next: Index) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.next = next.max(self.match_index + 1);
    }

    /// The follower answered heartbeat round `round`. A message that left
    /// before round `round - 1` started and is still unanswered was lost,
    /// or its answer was (the transport drops): a heartbeat sent a whole
    /// round after it made the trip. In `Probe`, another probe may go. In
    /// `Replicate`, probe again from the match (at worst a slow disk or a
    /// reordering network gets duplicates). Returns whether it fell back.
    pub fn heartbeat_answered(&mut self, round: u64) -> bool {
        let lost = |sent: u64| sent + 1 < round;
        match self.state {
            ProgressState::Probe => {
                if self.probe_sent && lost(self.probe_round) {
                    self.probe_sent = false;
                }
                false
            }
            ProgressState::Replicate => {
                let stalled = self.inflight.front().is_some_and(|&(_, _, r)| lost(r));
                if stalled {
                    let next = self.match_index + 1;
                    self.probe_from(next);
                }
                stalled
            }
            ProgressState::Snapshot => false,
        }
    }

    /// Snapshot: whether to ask the follower, on its answer to round
    /// `round`, if it installed the snapshot (the answer may have been
    /// lost): once per round trip.
    pub fn snapshot_probe_due(&mut self, round: u64) -> bool {
        let due = self.state == ProgressState::Snapshot && self.probe_round + 1 < round;
        if due {
            self.probe_round = round;
        }
        due
    }

    /// A snapshot through `index` is being sent while heartbeat round
    /// `round` is the leader's latest.
    pub fn snapshot_sent(&mut self, index: Index, round: u64) {
        self.state = ProgressState::Snapshot;
        self.probe_round = round;
        self.snapshot_ticks = 0;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.next = index + 1;
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes
    }
}
