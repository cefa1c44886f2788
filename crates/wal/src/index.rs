//! The in-memory index of the live log: where each entry's record lies and
//! the term of every index.
//!
//! Invariants (checked by `check`): records are sorted and contiguous by
//! index and cover exactly `first..next`; term runs start at or before
//! `first` and are strictly increasing in both start index and term.

use std::collections::VecDeque;

use bytes::Bytes;

/// Where one Entries record lies and which of its entries are live.
#[derive(Debug, Clone)]
pub(crate) struct RecordLoc {
    /// Index of the record's first entry (it may be below `first`).
    pub first_index: u64,
    /// Live entries from `first_index` (reduced by truncation).
    pub count: u64,
    pub segment_seq: u64,
    /// Offset of the record header in the segment.
    pub offset: u64,
    pub framed_len: u32,
    /// The body while it may not be on disk yet (released once durable).
    pub body: Option<Bytes>,
    /// Sequence number of the write that carried it.
    pub write_seq: u64,
}

impl RecordLoc {
    pub fn end(&self) -> u64 {
        self.first_index + self.count
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LogIndex {
    /// First live index (entries below are compacted or covered by the
    /// snapshot).
    first: u64,
    /// One past the last index.
    next: u64,
    records: VecDeque<RecordLoc>,
    /// Records ever removed from the front: `popped + position` is a
    /// record's stable number while it stays in `records`.
    popped: u64,
    /// (first index of the run, term), increasing in both.
    terms: VecDeque<(u64, u64)>,
}

impl LogIndex {
    pub fn new(first: u64) -> LogIndex {
        assert!(first >= 1, "log indexes start at 1");
        LogIndex {
            first,
            next: first,
            records: VecDeque::new(),
            popped: 0,
            terms: VecDeque::new(),
        }
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn records(&self) -> &VecDeque<RecordLoc> {
        &self.records
    }

    /// The record with stable number `number` (see [`LogIndex::push`]), if it
    /// is still there. A number can be reused after a truncation: callers
    /// check the record is the one they meant.
    pub fn record_by_number(&mut self, number: u64) -> Option<&mut RecordLoc> {
        let pos = number.checked_sub(self.popped)?;
        self.records.get_mut(usize::try_from(pos).ok()?)
    }

    /// Adds a record of `terms.len()` entries starting at `next`; returns
    /// its stable number.
    pub fn push(&mut self, loc: RecordLoc, terms: impl IntoIterator<Item = u64>) -> u64 {
        assert_eq!(loc.first_index, self.next, "records must be contiguous");
        let mut n = 0;
        for term in terms {
            let index = self.next + n;
            match self.terms.back() {
                Some(&(_, t)) if t == term => {}
                Some(&(_, t)) => {
                    assert!(
                        term > t,
                        "term went back from {t} to {term} at index {index}"
                    );
                    self.terms.push_back((index, term));
                }
                None => self.terms.push_back((index, term)),
            }
            n += 1;
        }
        assert_eq!(n, loc.count, "record count matches its terms");
        let number = self.popped + self.records.len() as u64;
        if n == 0 {
            return number;
        }
        self.next += n;
        self.records.push_back(loc);
        number
    }

    /// Removes entries at and above `from` (`first <= from <= next`).
    pub fn truncate(&mut self, from: u64) {
        assert!(
            from >= self.first && from <= self.next,
            "truncate {from} outside {}..={}",
            self.first,
            self.next
        );
        while let Some(last) = self.records.back_mut() {
            if last.first_index >= from {
                self.records.pop_back();
            } else {
                if last.end() > from {
                    last.count = from - last.first_index;
                }
                break;
            }
        }
        // A record cut down to entries below `first` (covered by a
        // snapshot) holds nothing live any more.
        if self.records.back().is_some_and(|r| r.end() <= self.first) {
            self.records.pop_back();
        }
        while self.terms.back().is_some_and(|&(start, _)| start >= from) {
            self.terms.pop_back();
        }
        self.next = from;
    }

    /// Drops entries below `first` (they are covered by a snapshot). When
    /// `first` is past the end, the log becomes empty and starts there.
    pub fn advance_first(&mut self, first: u64) {
        if first <= self.first {
            return;
        }
        if first >= self.next {
            self.popped += self.records.len() as u64;
            self.records.clear();
            self.terms.clear();
            self.first = first;
            self.next = first;
            return;
        }
        self.first = first;
        while self.records.front().is_some_and(|r| r.end() <= first) {
            self.records.pop_front();
            self.popped += 1;
        }
        // Keep the run that covers `first`.
        while self.terms.len() > 1 && self.terms[1].0 <= first {
            self.terms.pop_front();
        }
    }

    /// Term of a live index.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index < self.first || index >= self.next {
            return None;
        }
        let at = self.terms.partition_point(|&(start, _)| start <= index);
        debug_assert!(at > 0, "a term run covers every live index");
        Some(self.terms[at - 1].1)
    }

    /// Position in `records` of the record holding `index`.
    pub fn record_pos(&self, index: u64) -> Option<usize> {
        if index < self.first || index >= self.next {
            return None;
        }
        let at = self.records.partition_point(|r| r.first_index <= index);
        (at > 0).then(|| at - 1)
    }

    /// Segment holding the first live entry at or above `index`, if any.
    pub fn first_segment_above(&self, index: u64) -> Option<u64> {
        let at = self.records.partition_point(|r| r.end() <= index);
        self.records.get(at).map(|r| r.segment_seq)
    }

    /// Checks the invariants in the module docs.
    pub fn check(&self) {
        assert!(self.first <= self.next);
        let mut expect = None;
        for r in &self.records {
            assert!(r.count > 0, "empty record kept");
            if let Some(e) = expect {
                assert_eq!(r.first_index, e, "records not contiguous");
            }
            expect = Some(r.end());
        }
        if let (Some(front), Some(back)) = (self.records.front(), self.records.back()) {
            assert!(front.first_index <= self.first && front.end() > self.first);
            assert_eq!(back.end(), self.next);
        } else {
            assert_eq!(self.first, self.next, "records cover the live log");
        }
        for w in self.terms.iter().collect::<Vec<_>>().windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "term runs increase");
        }
        if self.first < self.next {
            assert!(self.terms.front().is_some_and(|&(s, _)| s <= self.first));
        }
    }
}
