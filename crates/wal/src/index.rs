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

/// The inverse of one change to a [`LogIndex`], for undoing writes that
/// were placed but never written (a write that ran out of space is undone
/// with every write queued after it).
#[derive(Debug, Clone)]
enum Step {
    /// `first`, `next` and `popped` before a change (noted first, so undone
    /// last).
    Bounds {
        first: u64,
        next: u64,
        popped: u64,
    },
    Pushed,
    TermPushed,
    PoppedBack(RecordLoc),
    /// The last record's count before a truncation cut it.
    Trimmed {
        count: u64,
    },
    TermPoppedBack((u64, u64)),
    PoppedFront(RecordLoc),
    TermPoppedFront((u64, u64)),
    Cleared {
        records: Chunked<RecordLoc>,
        terms: VecDeque<(u64, u64)>,
    },
}

/// Steps noted since journaling started, oldest first; `base` is the
/// number of steps forgotten from the front, so that a mark (an absolute
/// step number) stays valid as the front is trimmed.
#[derive(Debug, Clone, Default)]
struct Journal {
    steps: VecDeque<Step>,
    base: u64,
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
    /// Inverse steps of recent changes; `None` until the WAL starts it
    /// (recovery builds an index it never undoes).
    journal: Option<Journal>,
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
            journal: None,
        }
    }

    /// Starts noting the inverse of every change, so that changes after a
    /// [`mark`](Self::journal_mark) can be undone. The caller must
    /// [`forget`](Self::forget_journal_before) what it will never undo:
    /// the journal holds every step until then.
    pub fn start_journal(&mut self) {
        self.journal.get_or_insert_with(Journal::default);
    }

    /// The journal's position now: `rollback_to` it undoes every later
    /// change.
    pub fn journal_mark(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.base + j.steps.len() as u64)
    }

    /// Forgets the steps before `mark`: those changes are final.
    pub fn forget_journal_before(&mut self, mark: u64) {
        if let Some(j) = &mut self.journal {
            while j.base < mark && j.steps.pop_front().is_some() {
                j.base += 1;
            }
        }
    }

    /// Undoes every change since `mark`, newest first.
    ///
    /// # Panics
    ///
    /// If steps before `mark` were forgotten already.
    pub fn rollback_to(&mut self, mark: u64) {
        let Some(mut j) = self.journal.take() else {
            return;
        };
        assert!(j.base <= mark, "rollback past forgotten steps");
        while j.base + j.steps.len() as u64 > mark {
            match j.steps.pop_back().expect("non-empty") {
                Step::Bounds {
                    first,
                    next,
                    popped,
                } => {
                    self.first = first;
                    self.next = next;
                    self.popped = popped;
                }
                Step::Pushed => {
                    self.records.pop_back().expect("undo a push");
                }
                Step::TermPushed => {
                    self.terms.pop_back().expect("undo a term push");
                }
                Step::PoppedBack(r) => self.records.push_back(r),
                Step::Trimmed { count } => {
                    self.records.back_mut().expect("undo a trim").count = count;
                }
                Step::TermPoppedBack(t) => self.terms.push_back(t),
                Step::PoppedFront(r) => self.records.push_front(r),
                Step::TermPoppedFront(t) => self.terms.push_front(t),
                Step::Cleared { records, terms } => {
                    self.records = records;
                    self.terms = terms;
                }
            }
        }
        self.journal = Some(j);
    }

    fn note(&mut self, step: Step) {
        if let Some(j) = &mut self.journal {
            j.steps.push_back(step);
        }
    }

    fn note_bounds(&mut self) {
        self.note(Step::Bounds {
            first: self.first,
            next: self.next,
            popped: self.popped,
        });
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
        self.note_bounds();
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
                    self.note(Step::TermPushed);
                }
                None => {
                    self.terms.push_back((index, term));
                    self.note(Step::TermPushed);
                }
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
        self.note(Step::Pushed);
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
        self.note_bounds();
        while let Some(last) = self.records.back_mut() {
            if last.first_index >= from {
                let r = self.records.pop_back().expect("checked");
                self.note(Step::PoppedBack(r));
            } else {
                if last.end() > from {
                    let count = last.count;
                    last.count = from - last.first_index;
                    self.note(Step::Trimmed { count });
                }
                break;
            }
        }
        // A record cut down to entries below `first` (covered by a
        // snapshot) holds nothing live any more.
        if self.records.back().is_some_and(|r| r.end() <= self.first) {
            let r = self.records.pop_back().expect("checked");
            self.note(Step::PoppedBack(r));
        }
        while self.terms.back().is_some_and(|&(start, _)| start >= from) {
            let t = self.terms.pop_back().expect("checked");
            self.note(Step::TermPoppedBack(t));
        }
        self.next = from;
    }

    /// Drops entries below `first` (they are covered by a snapshot). When
    /// `first` is past the end, the log becomes empty and starts there.
    pub fn advance_first(&mut self, first: u64) {
        if first <= self.first {
            return;
        }
        self.note_bounds();
        if first >= self.next {
            self.popped += self.records.len() as u64;
            let records = std::mem::replace(&mut self.records, Chunked::new());
            let terms = std::mem::take(&mut self.terms);
            self.note(Step::Cleared { records, terms });
            self.first = first;
            self.next = first;
            return;
        }
        self.first = first;
        while self.records.front().is_some_and(|r| r.end() <= first) {
            let r = self.records.pop_front().expect("checked");
            self.popped += 1;
            self.note(Step::PoppedFront(r));
        }
        // Keep the run that covers `first`.
        while self.terms.len() > 1 && self.terms[1].0 <= first {
            let t = self.terms.pop_front().expect("checked");
            self.note(Step::TermPoppedFront(t));
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

    pub fn push_front(&mut self, v: T) {
        if self.chunks.front().is_none_or(|c| c.len() == CHUNK_RECORDS) {
            self.chunks
                .push_front(VecDeque::with_capacity(CHUNK_RECORDS));
        }
        self.chunks.front_mut().expect("pushed").push_front(v);
        self.len += 1;
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

    use super::{Chunked, LogIndex, RecordLoc, CHUNK_RECORDS};

    /// first, next, popped, (first index, count, offset, write seq) of
    /// each record, term runs.
    type View = (u64, u64, u64, Vec<(u64, u64, u64, u64)>, Vec<(u64, u64)>);

    /// What a reader can observe of an index, to compare two.
    fn view(ix: &LogIndex) -> View {
        let records = ix
            .records
            .iter()
            .map(|r| (r.first_index, r.count, r.offset, r.write_seq))
            .collect();
        let terms = ix.terms.iter().copied().collect();
        (ix.first, ix.next, ix.popped, records, terms)
    }

    /// `record_pos` and `term` answer for live indexes only: below the
    /// first or at and past the next, `None`.
    #[test]
    fn lookups_outside_the_live_range_find_nothing() {
        let mut ix = LogIndex::new(10);
        for (op, first) in [(0u64, 10u64), (1, 13)] {
            let loc = RecordLoc {
                first_index: first,
                count: 3,
                segment_seq: 1,
                offset: op,
                framed_len: 1,
                body: None,
                write_seq: op + 1,
            };
            ix.push(loc, std::iter::repeat_n(1 + op, 3));
        }
        assert_eq!((ix.first(), ix.next()), (10, 16));
        for index in [0, 9, 16, 17, u64::MAX] {
            assert_eq!(ix.record_pos(index), None, "index {index}");
            assert_eq!(ix.term(index), None, "index {index}");
        }
        assert_eq!(ix.record_pos(10), Some(0));
        assert_eq!(ix.record_pos(12), Some(0));
        assert_eq!(ix.record_pos(13), Some(1));
        assert_eq!(ix.record_pos(15), Some(1));
        assert_eq!(ix.term(12), Some(1));
        assert_eq!(ix.term(15), Some(2));
    }

    /// Random pushes, truncations and snapshot advances; rolled back to a
    /// mark, the index equals a copy taken at that mark (numbers of
    /// records included), and goes on as that copy does.
    #[test]
    fn rollback_restores_the_index_at_the_mark() {
        let mut x = 11u64;
        let mut rand = move |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for round in 0..300u64 {
            let mut ix = LogIndex::new(1);
            ix.start_journal();
            let mut term = 1;
            let mut saved = None;
            let ops = 1 + rand(60);
            let mark_at = rand(ops);
            for op in 0..ops {
                if op == mark_at {
                    saved = Some((ix.clone(), ix.journal_mark()));
                    // What is before the mark is never undone.
                    ix.forget_journal_before(ix.journal_mark());
                }
                match rand(8) {
                    0..=4 => {
                        let count = 1 + rand(5000);
                        term += rand(2);
                        let loc = RecordLoc {
                            first_index: ix.next(),
                            count,
                            segment_seq: 1,
                            offset: op,
                            framed_len: 1,
                            body: None,
                            write_seq: op,
                        };
                        ix.push(loc, std::iter::repeat_n(term, count as usize));
                    }
                    5 | 6 if ix.next() > ix.first() => {
                        let from = ix.first() + rand(ix.next() - ix.first() + 1);
                        ix.truncate(from);
                    }
                    _ => ix.advance_first(ix.first() + rand(ix.next() - ix.first() + 9000)),
                }
                ix.check();
            }
            let (want, mark) = saved.expect("a mark was taken");
            ix.rollback_to(mark);
            ix.check();
            assert_eq!(view(&ix), view(&want), "round {round}");
            // Record numbers are the same: the one at position 0 is found
            // by the same number in both.
            assert_eq!(
                ix.record_by_number(ix.popped).map(|r| r.offset),
                want.clone().record_by_number(want.popped).map(|r| r.offset),
            );
        }
    }

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
                    c.push_back(step as i64);
                    v.push_back(step as i64);
                }
                4 => assert_eq!(c.pop_back(), v.pop_back()),
                5 => assert_eq!(c.pop_front(), v.pop_front()),
                7 if step % 3 == 0 => {
                    // Below the front, to stay sorted.
                    let e = v.front().map_or(step as i64, |f| f - 1);
                    c.push_front(e);
                    v.push_front(e);
                }
                6 if !v.is_empty() => {
                    let i = (x as usize >> 8) % v.len();
                    assert_eq!(c.get(i), v.get(i));
                    // Kept sorted so that partition_point is well defined.
                    assert_eq!(c.get_mut(i).copied(), v.get(i).copied());
                }
                _ => {
                    let cut = step as i64 / 2;
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
