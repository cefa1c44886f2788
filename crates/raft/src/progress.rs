//! What a leader knows of each follower, and its flow control.
//!
//! - `Probe`: the leader does not know where the follower's log matches;
//!   it sends one AppendEntries and waits for the answer (or the next
//!   heartbeat response) before sending another.
//! - `Replicate`: the follower matched; the leader streams entries
//!   optimistically (`next` runs ahead of `match`) within a window of
//!   `inflight_max` messages and `inflight_bytes_max` bytes.

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
    /// (last index, bytes) of each AppendEntries in flight, oldest first.
    inflight: VecDeque<(Index, usize)>,
    inflight_bytes: usize,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// `match_index` at the previous heartbeat response: a full window
    /// that made no progress over a heartbeat round lost its messages.
    match_at_heartbeat: Index,
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
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            recent_active: false,
            match_at_heartbeat: 0,
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
    /// them) as sent.
    pub fn sent(&mut self, last: Index, bytes: usize) {
        match self.state {
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => {}
            ProgressState::Replicate => {
                if last >= self.next {
                    self.next = last + 1;
                    self.inflight.push_back((last, bytes));
                    self.inflight_bytes += bytes;
                }
            }
        }
    }

    /// The follower matched through `index`. Returns whether `match` moved.
    pub fn acked(&mut self, index: Index) -> bool {
        self.probe_sent = false;
        while self
            .inflight
            .front()
            .is_some_and(|&(last, _)| last <= index)
        {
            let (_, bytes) = self.inflight.pop_front().expect("checked");
            self.inflight_bytes -= bytes;
        }
        if self.state != ProgressState::Replicate {
            self.state = ProgressState::Replicate;
        }
        self.next = self.next.max(index + 1);
        if index > self.match_index {
            self.match_index = index;
            return true;
        }
        false
    }

    /// Back to probing from `next`.
    pub fn probe_from(&mut self, next: Index) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.next = next.max(self.match_index + 1);
    }

    /// A heartbeat response arrived. In `Probe`, the outstanding probe may
    /// have been lost: allow another. In `Replicate`, messages in flight
    /// whose match did not move over a whole heartbeat round were lost, or
    /// their answers were (the transport drops): probe again from the match
    /// (at worst a slow disk gets duplicates). Returns whether it fell back.
    pub fn heartbeat_answered(&mut self) -> bool {
        let stalled = self.state == ProgressState::Replicate
            && !self.inflight.is_empty()
            && self.match_index == self.match_at_heartbeat;
        self.match_at_heartbeat = self.match_index;
        self.probe_sent = false;
        if stalled {
            let next = self.match_index + 1;
            self.probe_from(next);
        }
        stalled
    }

    /// A snapshot through `index` is being sent.
    pub fn snapshot_sent(&mut self, index: Index) {
        self.state = ProgressState::Snapshot;
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
