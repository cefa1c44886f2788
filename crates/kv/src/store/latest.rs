//! The latest-version index: key → its latest version held, in
//! [`SHARDS`] hash maps chosen by the key's hash.
//!
//! One hash map would grow by rehashing every key at once: at 115,000
//! keys that is one ~40 ms apply on the event loop (measured in
//! `crates/kv/tests/snapshot_stall.rs`, where it was the longest loop pass),
//! and it grows with the keyspace. Split in [`SHARDS`], a growth rehashes
//! one shard: 1/256 of the keys (~40,000 keys, ~10 ms, at 10 million keys).
//! Lookups cost one more hash of the key.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use bytes::Bytes;

/// Shards of the index (a power of two).
pub(super) const SHARDS: usize = 256;

#[derive(Debug, Clone)]
pub(super) struct LatestIndex<V> {
    /// Picks the shard; each shard hashes with its own state.
    pick: RandomState,
    shards: Vec<HashMap<Bytes, V>>,
    len: usize,
}

impl<V> Default for LatestIndex<V> {
    fn default() -> Self {
        LatestIndex {
            pick: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }
}

impl<V> LatestIndex<V> {
    fn shard(&self, key: &[u8]) -> usize {
        // The high bits: the shard maps use the low ones of their own hash.
        (self.pick.hash_one(key) >> 56) as usize & (SHARDS - 1)
    }

    pub(super) fn get<Q: Borrow<[u8]>>(&self, key: &Q) -> Option<&V> {
        let key = key.borrow();
        self.shards[self.shard(key)].get(key)
    }

    pub(super) fn get_key_value(&self, key: &[u8]) -> Option<(&Bytes, &V)> {
        self.shards[self.shard(key)].get_key_value(key)
    }

    pub(super) fn insert(&mut self, key: Bytes, v: V) -> Option<V> {
        let s = self.shard(&key);
        let before = self.shards[s].insert(key, v);
        if before.is_none() {
            self.len += 1;
        }
        before
    }

    pub(super) fn remove<Q: Borrow<[u8]>>(&mut self, key: &Q) -> Option<V> {
        let key = key.borrow();
        let s = self.shard(key);
        let before = self.shards[s].remove(key);
        if before.is_some() {
            self.len -= 1;
        }
        before
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Every entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Bytes, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    #[cfg(test)]
    fn capacities(&self) -> Vec<usize> {
        self.shards.iter().map(HashMap::capacity).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// No insert rehashes more than one shard's keys: where one hash map
    /// would move all n keys at once, a growth here moves about n/256.
    #[test]
    fn a_growth_rehashes_one_shard_not_the_whole_index() {
        let n = 200_000usize;
        let mut index = LatestIndex::default();
        let mut caps = index.capacities();
        let mut most_moved = 0usize;
        for k in 0..n {
            index.insert(Bytes::from(format!("key-{k:012}")), k);
            let now = index.capacities();
            let grown: Vec<usize> = (0..SHARDS).filter(|&s| now[s] != caps[s]).collect();
            assert!(grown.len() <= 1, "one insert grew shards {grown:?}");
            if let Some(&s) = grown.first() {
                most_moved = most_moved.max(index.shards[s].len() - 1);
            }
            caps = now;
        }
        assert_eq!(index.len(), n);
        // A shard holds n/256 keys on average (781 here); leave room for an
        // uneven spread, far below n.
        assert!(
            most_moved <= 2 * n / SHARDS,
            "a growth moved {most_moved} keys ({n} held)"
        );
    }

    proptest! {
        /// The same answers as one hash map.
        #[test]
        fn answers_as_one_map(ops in proptest::collection::vec((0u8..3, 0u16..300, any::<u32>()), 0..2000)) {
            let mut index = LatestIndex::default();
            let mut model: HashMap<Bytes, u32> = HashMap::new();
            for (op, k, v) in ops {
                let key = Bytes::from(format!("k{k}"));
                match op {
                    0 => prop_assert_eq!(index.insert(key.clone(), v), model.insert(key, v)),
                    1 => prop_assert_eq!(index.remove(&key), model.remove(&key)),
                    _ => {
                        prop_assert_eq!(index.get(&key), model.get(&key));
                        prop_assert_eq!(index.get_key_value(&key[..]), model.get_key_value(&key[..]));
                    }
                }
                prop_assert_eq!(index.len(), model.len());
            }
            let mut all: Vec<(Bytes, u32)> = index.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let mut want: Vec<(Bytes, u32)> = model.into_iter().collect();
            all.sort();
            want.sort();
            prop_assert_eq!(all, want);
        }
    }
}
