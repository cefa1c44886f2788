//! Watch events: made while applying (see [`KvStore::collect_events`]) and
//! read back from a frozen view's history ([`StoreView::changes`]), the two
//! giving the same events for the same revisions.

use std::ops::Bound;

use bytes::Bytes;

use super::exec::KeyRange;
use super::{At, StoreView, Version};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::{Event, KeyValue};

#[cfg(doc)]
use super::KvStore;

/// Whether `key` is among the keys `start`/`range_end` name, as in a Range
/// or a watch: `range_end` empty names `start` alone, `"\0"` every key
/// `>= start`, else `[start, range_end)`.
pub fn key_in_range(start: &[u8], range_end: &[u8], key: &[u8]) -> bool {
    KeyRange::new(start, range_end).contains(key)
}

/// The event of version `v` of `key` at `mod_revision`.
pub(super) fn event(key: &Bytes, mod_revision: i64, v: &Version, prev: Option<KeyValue>) -> Event {
    if v.is_tombstone() {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: key.clone(),
                mod_revision,
                ..KeyValue::default()
            }),
            prev_kv: prev,
        }
    } else {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(v.key_value(key, mod_revision)),
            prev_kv: prev,
        }
    }
}

impl StoreView {
    /// The events on the keys `key`/`range_end` name with revisions from
    /// `from` through this view's revision, in revision order (the order
    /// written within a revision: a Txn's operations in order), each with the key's previous live version as
    /// `prev_kv`; the same events [`KvStore::collect_events`] made when
    /// they were applied. At most about `max_events`: the list stops at a
    /// revision boundary (never inside a revision), after the first
    /// revision that reaches `max_events`. Returns the events and the next
    /// revision to ask for (this view's revision + 1 once complete).
    ///
    /// `from` must not be below the compact revision: what compaction
    /// removed cannot be listed (the caller cancels such a watcher). At the
    /// compact revision itself, its deletions are gone (as in etcd).
    ///
    /// O(versions held of the named keys): the history is ordered by key,
    /// not by revision.
    pub fn changes(
        &self,
        key: &[u8],
        range_end: &[u8],
        from: i64,
        max_events: usize,
    ) -> (Vec<Event>, i64) {
        debug_assert!(
            from >= self.compact_revision,
            "changes below the compact revision"
        );
        let keys = KeyRange::new(key, range_end);
        let start: At = (Bytes::copy_from_slice(key), i64::MIN);
        let mut found: Vec<(i64, u32, Event)> = Vec::new();
        let mut prev: Option<(&At, &Version)> = None;
        for (at, v) in self
            .history
            .range::<_, At>((Bound::Included(&start), Bound::Unbounded))
        {
            if !keys.contains(&at.0) {
                // The scan starts at `key` and keys ascend: the first key
                // not named is past the end.
                break;
            }
            let same_key_prev = prev.filter(|(p, _)| p.0 == at.0);
            prev = Some((at, v));
            if at.1 < from || at.1 > self.revision {
                continue;
            }
            if v.is_tombstone() && at.1 <= self.compact_revision {
                // Logically removed by compaction.
                continue;
            }
            let prev_kv = same_key_prev
                .filter(|(p, pv)| !pv.is_tombstone() && at.1 > self.compact_revision && p.1 < at.1)
                .map(|(p, pv)| pv.key_value(&p.0, p.1));
            found.push((at.1, v.sub, event(&at.0, at.1, v, prev_kv)));
        }
        // Revision order, and within a revision the order written; the
        // scan was in key order, which a stable sort keeps where versions
        // read from an old snapshot all have sub 0.
        found.sort_by_key(|(rev, sub, _)| (*rev, *sub));
        let mut next = self.revision + 1;
        if found.len() > max_events {
            let cut_rev = found[max_events.max(1) - 1].0;
            let keep = found.partition_point(|(rev, _, _)| *rev <= cut_rev);
            found.truncate(keep);
            next = cut_rev + 1;
        }
        (found.into_iter().map(|(_, _, e)| e).collect(), next)
    }
}
