//! The core's view of the log: entries in memory after a base `(index,
//! term)`, and how far they are durable, committed and applied.
//!
//! Invariant: `applied <= commit`, `commit <= last_index`, `applied <=
//! persisted` where the host applies only durable entries; `persisted <=
//! last_index`. The commit index never moves back, and the log is never
//! truncated at or below it (asserted).

use std::collections::VecDeque;

use crate::types::{Entry, Index, Term};

#[derive(Debug, Clone)]
pub struct RaftLog {
    /// Index and term of the entry just before `entries[0]` (0, 0 at the
    /// start; a snapshot's last entry later).
    base_index: Index,
    base_term: Term,
    entries: VecDeque<Entry>,
    /// [`Entry::size`] summed over `entries`.
    bytes: usize,
    /// Highest index known durable on this node (entries after a
    /// truncation point are not, until persisted again).
    persisted: Index,
    commit: Index,
    /// Highest index handed to the host to apply.
    applying: Index,
    /// Highest index the host reported applied.
    applied: Index,
}

impl RaftLog {
    /// A log restored from durable state: `entries` follow `(base_index,
    /// base_term)` and are all durable.
    pub fn restore(base_index: Index, base_term: Term, entries: Vec<Entry>, commit: Index) -> Self {
        let bytes = entries.iter().map(Entry::size).sum();
        let mut log = RaftLog {
            base_index,
            base_term,
            entries: entries.into(),
            bytes,
            persisted: 0,
            commit: 0,
            applying: base_index,
            applied: base_index,
        };
        log.persisted = log.last_index();
        log.commit = commit.clamp(base_index, log.last_index());
        log.check();
        log
    }

    pub fn first_index(&self) -> Index {
        self.base_index + 1
    }

    pub fn last_index(&self) -> Index {
        self.base_index + self.entries.len() as u64
    }

    /// Bytes held in memory by the entries after the base ([`Entry::size`]
    /// summed): what compaction gives back.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.base_term, |e| e.term)
    }

    pub fn commit(&self) -> Index {
        self.commit
    }

    pub fn persisted(&self) -> Index {
        self.persisted
    }

    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Term at `index`, if it is the base or a live entry.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.base_index {
            return None;
        }
        self.entries.get((index - self.base_index - 1) as usize)
    }

    /// Whether a log ending at `(last_index, last_term)` is at least as
    /// up to date as this one (§5.4.1).
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    /// Entries from `lo` on, at most `bytes_max` bytes (but at least one
    /// entry when any is there).
    pub fn slice(&self, lo: Index, bytes_max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = lo;
        while let Some(e) = self.entry(i) {
            if !out.is_empty() && bytes + e.size() > bytes_max {
                break;
            }
            bytes += e.size();
            out.push(e.clone());
            i += 1;
        }
        out
    }

    /// Appends entries that continue the log (a leader's own proposals).
    pub fn append(&mut self, entries: &[Entry]) {
        for e in entries {
            assert_eq!(e.index, self.last_index() + 1, "appends continue the log");
            assert!(e.term >= self.last_term(), "terms never go back in the log");
            self.entries.push_back(e.clone());
            self.bytes += e.size();
        }
    }

    /// Merges entries received from a leader after a matching `prev_index`.
    /// Returns the entries that are new to this log (to persist), which
    /// replace everything from their first index on.
    pub fn merge(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        let mut new_from = None;
        for (i, e) in entries.iter().enumerate() {
            match self.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(
                        e.index > self.commit,
                        "a leader never conflicts with committed entry {} (commit {})",
                        e.index,
                        self.commit
                    );
                    self.truncate_from(e.index);
                    new_from = Some(i);
                    break;
                }
                None if e.index <= self.base_index => continue,
                None => {
                    new_from = Some(i);
                    break;
                }
            }
        }
        let Some(from) = new_from else {
            return Vec::new();
        };
        let new = entries[from..].to_vec();
        self.append(&new);
        new
    }

    fn truncate_from(&mut self, index: Index) {
        assert!(index > self.commit, "never truncate committed entries");
        assert!(index > self.base_index);
        let keep = (index - self.base_index - 1) as usize;
        self.bytes -= self.entries.range(keep..).map(Entry::size).sum::<usize>();
        self.entries.truncate(keep);
        self.persisted = self.persisted.min(index - 1);
    }

    /// The host made entries through `index` durable, with `term` at
    /// `index`. Ignored when the log changed there since.
    pub fn persisted_to(&mut self, index: Index, term: Term) {
        if index > self.persisted && self.term(index) == Some(term) {
            self.persisted = index;
        }
    }

    pub fn commit_to(&mut self, index: Index) -> bool {
        if index > self.commit {
            assert!(index <= self.last_index(), "commit {index} past the log");
            self.commit = index;
            return true;
        }
        false
    }

    /// Committed, durable entries not yet handed out to apply.
    pub fn take_to_apply(&mut self) -> Vec<Entry> {
        let hi = self.commit.min(self.persisted);
        if hi <= self.applying {
            return Vec::new();
        }
        let out: Vec<Entry> = (self.applying + 1..=hi)
            .map(|i| {
                self.entry(i)
                    .expect("committed entries are in the log")
                    .clone()
            })
            .collect();
        self.applying = hi;
        out
    }

    pub fn applied_to(&mut self, index: Index) {
        assert!(
            index <= self.applying,
            "applied {index} beyond what was handed out ({})",
            self.applying
        );
        self.applied = self.applied.max(index);
    }

    /// First index of the term of the entry at `index` (walking back while
    /// the term is the same).
    pub fn first_index_of_term_at(&self, index: Index) -> Index {
        let term = self.term(index);
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == term {
            i -= 1;
        }
        i
    }

    /// Last index whose term is at most `term`, searching back from
    /// `from` (the leader's side of the conflict hint).
    pub fn last_index_with_term_at_most(&self, term: Term, from: Index) -> Index {
        let mut i = from.min(self.last_index());
        while i > self.base_index && self.term(i).is_some_and(|t| t > term) {
            i -= 1;
        }
        i
    }

    /// Index and term of the entry before the first one kept in memory.
    pub fn base(&self) -> (Index, Term) {
        (self.base_index, self.base_term)
    }

    /// Drops entries through `index` (covered by a snapshot the host took;
    /// at most what was applied).
    pub fn compact_to(&mut self, index: Index) {
        if index <= self.base_index {
            return;
        }
        assert!(
            index <= self.applied,
            "compaction at {index} beyond applied {}",
            self.applied
        );
        let term = self.term(index).expect("applied entries are in the log");
        let n = (index - self.base_index) as usize;
        self.bytes -= self.entries.drain(..n).map(|e| e.size()).sum::<usize>();
        self.base_index = index;
        self.base_term = term;
    }

    /// Replaces the log with a snapshot's `(index, term)`: committed and,
    /// once the host restored it, applied through `index`.
    pub fn reset_to_snapshot(&mut self, index: Index, term: Term) {
        assert!(
            index > self.commit,
            "a snapshot below commit is never installed"
        );
        self.entries.clear();
        self.bytes = 0;
        self.base_index = index;
        self.base_term = term;
        self.persisted = self.persisted.min(index.saturating_sub(1)).min(self.commit);
        self.commit = index;
        self.applying = index;
        self.applied = index;
    }

    pub fn check(&self) {
        assert!(self.applied <= self.applying, "applied <= applying");
        assert!(
            self.applying <= self.commit.max(self.base_index),
            "applying <= commit"
        );
        assert!(self.commit <= self.last_index(), "commit <= last index");
        assert!(
            self.persisted <= self.last_index(),
            "persisted <= last index"
        );
        let mut prev = (self.base_index, self.base_term);
        for e in &self.entries {
            assert_eq!(e.index, prev.0 + 1, "entries are contiguous");
            assert!(e.term >= prev.1, "terms never go back");
            prev = (e.index, e.term);
        }
        let bytes: usize = self.entries.iter().map(Entry::size).sum();
        assert_eq!(self.bytes, bytes, "bytes counts the entries held");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Payload, ENTRY_OVERHEAD_BYTES};
    use bytes::Bytes;

    fn entry(index: Index, term: Term, len: usize) -> Entry {
        Entry {
            index,
            term,
            payload: Payload::Normal(Bytes::from(vec![7u8; len])),
        }
    }

    /// `bytes` follows every change to the entries held: restore, append,
    /// a conflicting merge, compaction, a snapshot.
    #[test]
    fn bytes_counts_the_entries_held() {
        let o = ENTRY_OVERHEAD_BYTES;
        let mut log = RaftLog::restore(0, 0, vec![entry(1, 1, 10), entry(2, 1, 20)], 0);
        assert_eq!(log.bytes(), 2 * o + 30);
        log.append(&[entry(3, 1, 30), entry(4, 1, 40)]);
        assert_eq!(log.bytes(), 4 * o + 100);
        // Entries 3 and 4 give way to a new term's 3.
        let new = log.merge(vec![entry(2, 1, 20), entry(3, 2, 5)]);
        assert_eq!(new.len(), 1);
        assert_eq!(log.bytes(), 3 * o + 35);
        log.persisted_to(3, 2);
        log.commit_to(3);
        log.take_to_apply();
        log.applied_to(3);
        log.compact_to(2);
        assert_eq!(log.bytes(), o + 5);
        log.check();
        log.reset_to_snapshot(9, 2);
        assert_eq!(log.bytes(), 0);
    }
}
