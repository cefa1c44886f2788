//! Compaction: which versions a compact revision makes unreadable, their
//! physical removal in bounded steps, and the views that must not see the
//! difference (the logical history behind snapshots and equality, and
//! etcd's HashKV).
//!
//! The rule, as etcd: at compact revision `C`, a version `(k, r)` with
//! `r <= C` is gone when a later version of `k` is also `<= C` (no read at
//! `>= C` can reach it), or when it is the latest `<= C` and a tombstone.
//! It depends only on versions `<= C`, which never change once `C` is
//! reached (writes add versions above the store revision), so removal can
//! proceed in any number of steps between writes. Within a key, versions
//! are removed in revision order, so a read never finds an older version
//! whose successor was removed before it.

use std::ops::Bound;

use super::{At, History, KvStore, Version};

/// Whether the version at `at` is compacted away at `compact_revision`,
/// given the version that follows it in the map (of any key).
fn compacted_away(at: &At, v: &Version, next: Option<&At>, compact_revision: i64) -> bool {
    at.1 <= compact_revision
        && (v.is_tombstone() || next.is_some_and(|n| n.0 == at.0 && n.1 <= compact_revision))
}

/// The versions readable at or above `compact_revision`, in map order:
/// the same whatever the physical compaction progress.
pub(super) fn logical(
    history: &History,
    compact_revision: i64,
) -> impl Iterator<Item = (&At, &Version)> + '_ {
    let mut iter = history.iter().peekable();
    std::iter::from_fn(move || loop {
        let (at, v) = iter.next()?;
        let next = iter.peek().map(|(n, _)| *n);
        if !compacted_away(at, v, next, compact_revision) {
            return Some((at, v));
        }
    })
}

/// etcd's HashKV over the versions with `compact_revision < mod_revision
/// <= at`. Each version is hashed as `key_len u32 | key | mod_revision i64
/// | tombstone u8 | value_len u32 | value | create_revision i64 | version
/// i64`, little-endian.
pub(super) fn hash(history: &History, compact_revision: i64, at: i64) -> u32 {
    let mut crc = 0;
    for ((key, mod_revision), v) in history {
        if *mod_revision <= compact_revision || *mod_revision > at {
            continue;
        }
        crc = crc32c::crc32c_append(crc, &(key.len() as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, key);
        crc = crc32c::crc32c_append(crc, &mod_revision.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &[u8::from(v.is_tombstone())]);
        crc = crc32c::crc32c_append(crc, &(v.value.len() as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, &v.value);
        crc = crc32c::crc32c_append(crc, &v.create_revision.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &v.version.to_le_bytes());
        if v.lease != 0 {
            // Only when set: stores without leases hash as before leases.
            crc = crc32c::crc32c_append(crc, &v.lease.to_le_bytes());
        }
    }
    crc
}

/// One bounded step of physical compaction (see [`KvStore::compact_step`]):
/// visits at most `budget` versions from where the last step stopped,
/// removes those compacted away, and skips in one seek the versions of a
/// key above the target.
pub(super) fn step(store: &mut KvStore, budget: usize) -> bool {
    let Some(compaction) = &store.compaction else {
        return false;
    };
    let target = compaction.target;
    // (version, whether it is the last version held of its key).
    let mut removals: Vec<(At, bool)> = Vec::new();
    let resume = {
        let history = &store.history;
        let seek = |from: Bound<&At>| history.range::<_, At>((from, Bound::Unbounded)).peekable();
        let mut iter = match &compaction.resume {
            Some(resume) => seek(Bound::Included(resume)),
            None => seek(Bound::Unbounded),
        };
        let mut visited = 0;
        loop {
            if visited == budget {
                break iter.peek().map(|(at, _)| (*at).clone());
            }
            let Some((at, v)) = iter.next() else {
                break None;
            };
            visited += 1;
            if at.1 > target {
                // This and the key's later versions are all kept.
                let past = (at.0.clone(), i64::MAX);
                iter = seek(Bound::Excluded(&past));
                continue;
            }
            let next = iter.peek().map(|(n, _)| *n);
            if compacted_away(at, v, next, target) {
                let last_of_key = next.is_none_or(|n| n.0 != at.0);
                removals.push((at.clone(), last_of_key));
            }
        }
    };
    for (at, last_of_key) in removals {
        let v = store
            .history
            .remove(&at)
            .expect("a version listed just before is held");
        store.stats.versions -= 1;
        store.stats.bytes -= v.bytes();
        if last_of_key {
            // Every version of the key before it was at or below the target
            // and not the latest there: all removed, in this step or before.
            debug_assert!(store
                .history
                .get_next(&(at.0.clone(), i64::MIN))
                .is_none_or(|(n, _)| n.0 != at.0));
            store.stats.bytes -= at.0.len() as u64 + super::KEY_OVERHEAD_BYTES;
            // Its last version went: the key is gone from the history.
            let latest = store.latest.remove(&at.0);
            debug_assert_eq!(latest.map(|l| l.mod_revision), Some(at.1));
        }
    }
    match resume {
        Some(resume) => {
            store.compaction = Some(super::Compaction {
                target,
                resume: Some(resume),
            });
            true
        }
        None => {
            store.compaction = None;
            store.physically_compacted = target;
            false
        }
    }
}
