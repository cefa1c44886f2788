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
    records: Chunked<RecordLoc>,
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
            records: Chunked::new(),
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

    pub fn records(&self) -> &Chunked<RecordLoc> {
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
        for r in self.records.iter() {
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

/// Records per chunk of [`Chunked`].
const CHUNK_RECORDS: usize = 4096;

/// A deque stored in fixed-size chunks: it grows without ever copying what
/// it holds (a plain `VecDeque` of millions of records would copy hundreds
/// of megabytes under the WAL's lock each time it doubles).
///
/// Invariant: every chunk but the first and the last is full.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chunked<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Chunked<T> {
    pub fn new() -> Self {
        Chunked {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn locate(&self, i: usize) -> Option<(usize, usize)> {
        if i >= self.len {
            return None;
        }
        let first = self.chunks.front()?.len();
        if i < first {
            return Some((0, i));
        }
        let rest = i - first;
        Some((1 + rest / CHUNK_RECORDS, rest % CHUNK_RECORDS))
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        let (c, o) = self.locate(i)?;
        self.chunks[c].get(o)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let (c, o) = self.locate(i)?;
        self.chunks[c].get_mut(o)
    }

    pub fn push_back(&mut self, v: T) {
        if self.chunks.back().is_none_or(|c| c.len() == CHUNK_RECORDS) {
            self.chunks
                .push_back(VecDeque::with_capacity(CHUNK_RECORDS));
        }
        self.chunks.back_mut().expect("pushed").push_back(v);
        self.len += 1;
    }

    pub fn pop_back(&mut self) -> Option<T> {
        let chunk = self.chunks.back_mut()?;
        let v = chunk.pop_back();
        if chunk.is_empty() {
            self.chunks.pop_back();
        }
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let chunk = self.chunks.front_mut()?;
        let v = chunk.pop_front();
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|c| c.front())
    }

    pub fn back(&self) -> Option<&T> {
        self.chunks.back().and_then(|c| c.back())
    }

    pub fn back_mut(&mut self) -> Option<&mut T> {
        self.chunks.back_mut().and_then(|c| c.back_mut())
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The first position where `pred` is false (it must be true then
    /// false along the deque).
    pub fn partition_point(&self, pred: impl Fn(&T) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.get(mid).expect("mid < len")) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::{Chunked, CHUNK_RECORDS};

    #[test]
    fn chunked_behaves_like_a_vecdeque() {
        let mut c = Chunked::new();
        let mut v = VecDeque::new();
        let mut x = 7u64;
        for step in 0..100_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match x >> 61 {
                0..=3 => {
                    c.push_back(step);
                    v.push_back(step);
                }
                4 => assert_eq!(c.pop_back(), v.pop_back()),
                5 => assert_eq!(c.pop_front(), v.pop_front()),
                6 if !v.is_empty() => {
                    let i = (x as usize >> 8) % v.len();
                    assert_eq!(c.get(i), v.get(i));
                    // Kept sorted so that partition_point is well defined.
                    assert_eq!(c.get_mut(i).copied(), v.get(i).copied());
                }
                _ => {
                    let cut = step / 2;
                    assert_eq!(
                        c.partition_point(|&e| e < cut),
                        v.partition_point(|&e| e < cut)
                    );
                }
            }
            assert_eq!(c.len(), v.len());
            assert_eq!(c.front(), v.front());
            assert_eq!(c.back(), v.back());
        }
        assert!(c.iter().eq(v.iter()));
        assert!(v.len() > 2 * CHUNK_RECORDS, "exercised several chunks");
    }
}
