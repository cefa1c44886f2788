//! The receiver's table of chunks: which are written, which are free to
//! ask for. It is what makes a transfer resumable: a stream that loses its
//! connection hands its unanswered chunks back, and whoever asks next gets
//! them — never a chunk already written.

use std::collections::VecDeque;

/// Chunks of one transfer. Every chunk is, at any time, exactly one of:
/// fresh (`>= next_fresh`, never handed out), queued for retry, claimed by
/// a stream (requested, or received and being written), or done.
#[derive(Debug)]
pub(crate) struct ChunkTable {
    chunks: u64,
    /// Chunks from here on were never handed out.
    next_fresh: u64,
    /// Chunks handed out, then given back (lost with a connection, or
    /// corrupted). Bound: `retry_max`, the chunks that can be claimed at
    /// once (streams × in-flight per stream).
    retry: VecDeque<u64>,
    retry_max: usize,
    /// One bit per chunk: written to the file.
    done: Vec<u64>,
    done_count: u64,
    claimed: u64,
}

impl ChunkTable {
    /// A table of `chunks` chunks, of which at most `claimed_max` may be
    /// handed out at once. The caller bounds `chunks` (to
    /// [`super::CHUNKS_MAX`]): the table takes one bit per chunk.
    pub(crate) fn new(chunks: u64, claimed_max: usize) -> ChunkTable {
        assert!(
            chunks <= super::CHUNKS_MAX,
            "{chunks} chunks is over CHUNKS_MAX"
        );
        let words = usize::try_from(chunks.div_ceil(64)).expect("bounded by CHUNKS_MAX");
        ChunkTable {
            chunks,
            next_fresh: 0,
            retry: VecDeque::with_capacity(claimed_max),
            retry_max: claimed_max,
            done: vec![0; words],
            done_count: 0,
            claimed: 0,
        }
    }

    /// A chunk to ask for: one given back first, else the next fresh one.
    pub(crate) fn claim(&mut self) -> Option<u64> {
        let chunk = match self.retry.pop_front() {
            Some(chunk) => chunk,
            None if self.next_fresh < self.chunks => {
                self.next_fresh += 1;
                self.next_fresh - 1
            }
            None => return None,
        };
        debug_assert!(!self.is_done(chunk));
        self.claimed += 1;
        debug_assert!(self.claimed <= self.retry_max as u64);
        Some(chunk)
    }

    /// Whether [`claim`](ChunkTable::claim) would hand out a chunk.
    pub(crate) fn has_claimable(&self) -> bool {
        !self.retry.is_empty() || self.next_fresh < self.chunks
    }

    /// Gives back a claimed chunk that was not written: it will be asked
    /// for again.
    pub(crate) fn release(&mut self, chunk: u64) {
        assert!(
            chunk < self.next_fresh && !self.is_done(chunk),
            "released chunk {chunk} was not claimed"
        );
        assert!(self.claimed > 0);
        self.claimed -= 1;
        self.retry.push_back(chunk);
        debug_assert!(self.retry.len() <= self.retry_max);
    }

    /// Records a claimed chunk as written.
    pub(crate) fn complete(&mut self, chunk: u64) {
        assert!(
            chunk < self.next_fresh,
            "completed chunk {chunk} was not claimed"
        );
        assert!(!self.is_done(chunk), "chunk {chunk} written twice");
        assert!(self.claimed > 0);
        self.claimed -= 1;
        self.done[(chunk / 64) as usize] |= 1 << (chunk % 64);
        self.done_count += 1;
    }

    pub(crate) fn is_done(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.done[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    pub(crate) fn all_done(&self) -> bool {
        self.done_count == self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_chunk_once_and_lost_ones_again() {
        let mut t = ChunkTable::new(130, 4);
        let a = t.claim().unwrap();
        let b = t.claim().unwrap();
        assert_eq!((a, b), (0, 1));
        t.complete(a);
        t.release(b);
        assert_eq!(
            t.claim(),
            Some(1),
            "a lost chunk is asked for before fresh ones"
        );
        t.complete(1);
        let mut n = 2;
        while let Some(c) = t.claim() {
            assert!(!t.is_done(c));
            t.complete(c);
            n += 1;
        }
        assert_eq!(n, 130);
        assert!(t.all_done());
        assert!(!t.has_claimable());
    }

    #[test]
    #[should_panic(expected = "written twice")]
    fn a_chunk_is_never_written_twice() {
        let mut t = ChunkTable::new(2, 2);
        let c = t.claim().unwrap();
        t.complete(c);
        t.claimed += 1;
        t.complete(c);
    }

    #[test]
    fn an_empty_snapshot_has_nothing_to_claim() {
        let mut t = ChunkTable::new(0, 1);
        assert!(t.all_done());
        assert_eq!(t.claim(), None);
    }
}
