//! A leader's in-memory log for the transport benches, and the
//! AppendEntries a leader sends out of it.

use bytes::Bytes;
use skiff_raft::{Entry, Message, MessageBody, Payload};

/// Payload bytes of the entries the sender cycles through: a leader's
/// in-memory log holds one payload allocation per entry, and sending clones
/// them out of it. (One payload shared by every entry would make each clone
/// and drop fight over one reference count across the sender's and the
/// writer's threads, a cost real traffic does not have.) Recent entries of
/// a leader are in cache; this fits the L3 of the machines we measure on.
pub const LOG_BYTES: usize = 4 << 20;

/// A log of [`LOG_BYTES`] of `size`-byte entries (at least `n` of them),
/// each its own allocation.
pub fn log_of(size: usize, n: usize) -> Vec<Entry> {
    let len = (LOG_BYTES / size.max(1)).max(n).max(1);
    (0..len as u64)
        .map(|i| Entry {
            index: i + 1,
            term: 1,
            payload: Payload::Normal(Bytes::from(vec![(i % 251) as u8; size])),
        })
        .collect()
}

/// The AppendEntries after `prev_index`: the next `n` entries of `log`
/// (wrapping around it), renumbered to continue from `prev_index`.
pub fn append(log: &[Entry], n: usize, prev_index: u64) -> Message {
    let start = prev_index as usize % log.len();
    let entries = (0..n)
        .map(|i| {
            let e = &log[(start + i) % log.len()];
            Entry {
                index: prev_index + 1 + i as u64,
                term: e.term,
                payload: e.payload.clone(),
            }
        })
        .collect();
    Message {
        from: 1,
        to: 2,
        term: 1,
        body: MessageBody::Append {
            prev_index,
            prev_term: 1,
            entries,
            commit: prev_index,
        },
    }
}
