//! The MVCC store's hot paths: Put of a 128-B value on a store of 100k keys
//! (a new key, and an overwrite that adds a version), Range of one key, and
//! freeze() (the O(1) snapshot view).
//!
//! `cargo bench -p skiff-kv --bench store`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::{PutRequest, RangeRequest, RequestOp};
use skiff_kv::store::KvStore;

const KEYS: u64 = 100_000;
const VALUE_BYTES: usize = 128;

fn key(i: u64) -> Bytes {
    Bytes::from(format!("key/{i:012}"))
}

fn put(key: Bytes, value: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value: value.clone(),
            ..Default::default()
        })),
    }
}

/// A store of `KEYS` keys, applied at indexes 1..=KEYS.
fn loaded(value: &Bytes) -> KvStore {
    let mut store = KvStore::new();
    for i in 0..KEYS {
        store.apply(i + 1, &put(key(i), value)).unwrap();
    }
    store
}

fn bench_store(c: &mut Criterion) {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let mut group = c.benchmark_group("store");

    let mut store = loaded(&value);
    let mut index = KEYS;
    group.bench_function("put_new_key_100k", |b| {
        // Requests are built outside the timing loop's hot part only as
        // much as a real apply would receive them ready.
        b.iter(|| {
            index += 1;
            let op = put(key(index + KEYS), &value);
            black_box(store.apply(index, &op).unwrap());
        })
    });

    let mut store = loaded(&value);
    let mut index = KEYS;
    group.bench_function("put_overwrite_100k", |b| {
        b.iter(|| {
            index += 1;
            let op = put(key(index % KEYS), &value);
            black_box(store.apply(index, &op).unwrap());
        })
    });

    let store = loaded(&value);
    let mut i = 0u64;
    group.bench_function("range_one_key_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let req = RangeRequest {
                key: key(i),
                ..Default::default()
            };
            black_box(store.range(&req).unwrap());
        })
    });

    group.bench_function("freeze_100k", |b| b.iter(|| black_box(store.freeze())));

    // A frozen view pins the nodes a Put would change: the first write
    // into each node after a freeze copies it.
    let mut store = loaded(&value);
    let mut index = KEYS;
    group.bench_function("put_overwrite_after_freeze_100k", |b| {
        b.iter(|| {
            let view = store.freeze();
            index += 1;
            let op = put(key(index % KEYS), &value);
            black_box(store.apply(index, &op).unwrap());
            drop(view);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
