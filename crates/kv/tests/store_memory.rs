//! Measures what one key version really costs in memory, with a counting
//! global allocator, and checks that `VERSION_OVERHEAD_BYTES` and
//! `KEY_OVERHEAD_BYTES` (the fixed overheads `StoreStats::bytes` counts per
//! version and per key) predict it.
//!
//! `cargo test -p skiff-kv --test store_memory -- --nocapture` prints the
//! figure; set `SKIFF_MEMORY_VERSIONS=1000000` for the full-size
//! measurement (the default is smaller to keep the test quick).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::{PutRequest, RequestOp};
use skiff_kv::store::{KvStore, KEY_OVERHEAD_BYTES, VERSION_OVERHEAD_BYTES};

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 128;

/// Heap bytes per version besides key and value bytes, for `versions`
/// versions spread over `keys` keys.
fn overhead_per_version(versions: usize, keys: usize) -> f64 {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let mut store = KvStore::new();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..versions {
        let key = format!("{:016}", i % keys);
        let op = RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from(key),
                value: value.clone(),
                ..Default::default()
            })),
        };
        store.apply(i as u64 + 1, &op).unwrap();
    }
    let held = LIVE_BYTES.load(Ordering::Relaxed) - before;
    assert_eq!(store.stats().versions as usize, versions);
    let payload = versions * VALUE_BYTES + keys * KEY_BYTES;
    let per_version = (held as f64 - payload as f64) / versions as f64;
    println!(
        "{versions} versions over {keys} keys: {held} B held, {:.1} B per version \
         ({per_version:.1} B besides key and value bytes); counted {} B",
        held as f64 / versions as f64,
        store.stats().bytes
    );
    drop(store);
    per_version
}

#[test]
fn version_overhead_matches_the_measurement() {
    let versions: usize = std::env::var("SKIFF_MEMORY_VERSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // Distinct keys (each key once) and a hot-key history (10 versions per
    // key): the two ends of what a store holds.
    let distinct = overhead_per_version(versions, versions);
    let history = overhead_per_version(versions, versions / 10);
    // Overhead per version = version overhead + key overhead × keys/versions.
    let key_overhead = (distinct - history) / 0.9;
    let version_overhead = distinct - key_overhead;
    println!(
        "solved: {version_overhead:.1} B per version, {key_overhead:.1} B per key \
         (constants: {VERSION_OVERHEAD_BYTES}, {KEY_OVERHEAD_BYTES})"
    );
    for (keys_per_version, measured) in [(1.0, distinct), (0.1, history)] {
        let predicted =
            VERSION_OVERHEAD_BYTES as f64 + KEY_OVERHEAD_BYTES as f64 * keys_per_version;
        assert!(
            measured * 0.6 <= predicted && predicted <= measured * 1.4,
            "{keys_per_version} keys per version: the constants predict {predicted:.1} B, \
             measured {measured:.1} B"
        );
    }
}
