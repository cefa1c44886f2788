//! KV snapshots (format version 2, with history): round trips give back an
//! equal store; truncated, flipped or forged input is an error, never a
//! panic and never a different store; the bytes do not depend on physical
//! compaction progress; a frozen view serializes the state it froze.

use std::io::{Cursor, Read};

use bytes::Bytes;
use proptest::prelude::*;
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::{DeleteRangeRequest, PutRequest, RequestOp};
use skiff_kv::store::{
    KvStore, SnapshotError, KEY_BYTES_MAX, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, VALUE_BYTES_MAX,
};

fn put(key: &[u8], value: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            ..Default::default()
        })),
    }
}

fn delete(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: Bytes::copy_from_slice(key),
            ..Default::default()
        })),
    }
}

fn snapshot_of(store: &KvStore) -> Vec<u8> {
    let mut out = Vec::new();
    let info = store.write_snapshot(&mut out).unwrap();
    assert_eq!(info.bytes, out.len() as u64);
    assert_eq!(info.applied_index, store.applied_index());
    assert_eq!(info.revision, store.revision());
    assert_eq!(info.key_count, store.len() as u64);
    assert_eq!(info.compact_revision, store.compact_revision());
    assert_eq!(info.crc32c, store.digest());
    out
}

/// Finishes physical compaction (what a restored store has done).
fn compacted(mut store: KvStore) -> KvStore {
    while store.compact_step(7) {}
    store
}

fn read(bytes: &[u8]) -> Result<KvStore, SnapshotError> {
    KvStore::read_snapshot(&mut Cursor::new(bytes))
}

/// Three keys, a deleted one and a modified one; applied index 7; history
/// (alpha@2, alpha@5, gone@4 and its tombstone @6).
fn small_store() -> KvStore {
    let mut store = KvStore::new();
    let ops = [
        put(b"alpha", b"1"),
        put(b"beta", b""),
        put(b"gone", b"x"),
        put(b"alpha", b"22"),
        delete(b"gone"),
        put(b"\xff\x00", b"\x00\x01"),
    ];
    for (i, op) in ops.iter().enumerate() {
        store.apply(i as u64 + 1, op).unwrap();
    }
    store.mark_applied(7);
    store
}

/// small_store, compacted at 5 (alpha@2 and gone's versions go) with the
/// physical removal only half done, then written on: beta deleted and
/// re-created, alpha updated.
fn compacted_store() -> KvStore {
    let mut store = small_store();
    store.compact(8, 5).unwrap();
    assert!(store.compact_step(2));
    let ops = [
        delete(b"beta"),
        put(b"beta", b"again"),
        put(b"alpha", b"333"),
    ];
    for (i, op) in ops.iter().enumerate() {
        store.apply(9 + i as u64, op).unwrap();
    }
    store
}

#[test]
fn round_trip_small_and_empty() {
    for store in [KvStore::new(), small_store(), compacted_store()] {
        let bytes = snapshot_of(&store);
        let back = read(&bytes).unwrap();
        back.check_invariants();
        assert_eq!(back, store);
        assert_eq!(back.digest(), store.digest());
        assert_eq!(back.hash_kv(0), store.hash_kv(0));
        assert_eq!(back.stats(), compacted(store.clone()).stats());
        assert_eq!(back.physically_compacted(), store.compact_revision());
        assert_eq!(snapshot_of(&back), bytes, "reads back exactly");
    }
}

#[test]
fn history_survives_a_round_trip() {
    let store = compacted_store();
    let back = read(&snapshot_of(&store)).unwrap();
    for revision in [5, 6, 7, 8, 9, 0] {
        let req = skiff_kv::pb::etcdserverpb::RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        };
        assert_eq!(back.range(&req), store.range(&req), "at {revision}");
    }
    let below = skiff_kv::pb::etcdserverpb::RangeRequest {
        key: Bytes::from_static(b"alpha"),
        revision: 4,
        ..Default::default()
    };
    assert!(back.range(&below).is_err());
    // Physical progress changes no byte of the snapshot.
    let bytes = snapshot_of(&store);
    let mut stepped = store.clone();
    while stepped.compact_step(1) {
        assert_eq!(snapshot_of(&stepped), bytes);
    }
    assert_eq!(snapshot_of(&stepped), bytes);
}

#[test]
fn a_frozen_view_serializes_what_it_froze() {
    let mut store = compacted_store();
    let view = store.freeze();
    let before = snapshot_of(&store);
    store.apply(20, &put(b"alpha", b"later")).unwrap();
    store.apply(21, &delete(b"\xff\x00")).unwrap();
    store.compact(22, store.revision()).unwrap();
    while store.compact_step(1) {}
    let mut after = Vec::new();
    view.write_snapshot(&mut after).unwrap();
    assert_eq!(after, before);
    assert_ne!(snapshot_of(&store), before);
}

/// The auth section of a store whose auth was never used: length 21,
/// disabled, auth revision 1, no users, roles or tokens.
const AUTH_SECTION_EMPTY: [u8; 25] = [
    21, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn header_layout() {
    let store = small_store();
    let bytes = snapshot_of(&store);
    assert_eq!(&bytes[..8], &SNAPSHOT_MAGIC);
    assert_eq!(bytes[8], SNAPSHOT_VERSION);
    assert_eq!(&bytes[9..17], &7u64.to_le_bytes());
    assert_eq!(&bytes[17..25], &store.revision().to_le_bytes());
    assert_eq!(&bytes[25..33], &0i64.to_le_bytes(), "never compacted");
    // First record: alpha@2, a live version with its key.
    assert_eq!(bytes[33], 1);
    assert_eq!(&bytes[34..38], &5u32.to_le_bytes());
    assert_eq!(&bytes[38..42], &1u32.to_le_bytes());
    assert_eq!(&bytes[42..50], &2i64.to_le_bytes());
    assert_eq!(&bytes[50..58], &2i64.to_le_bytes());
    assert_eq!(&bytes[58..66], &1i64.to_le_bytes());
    assert_eq!(&bytes[66..74], &0i64.to_le_bytes(), "no lease");
    assert_eq!(
        &bytes[74..78],
        &0u32.to_le_bytes(),
        "the revision's first write"
    );
    assert_eq!(&bytes[78..84], b"alpha1");
    // Second: alpha@5, the same key (key_len 0, no key bytes).
    assert_eq!(bytes[84], 1);
    assert_eq!(&bytes[85..89], &0u32.to_le_bytes());
    // Leases: none; alarms: none; auth never used.
    let auth = bytes.len() - 4 - AUTH_SECTION_EMPTY.len();
    assert_eq!(&bytes[auth..bytes.len() - 4], &AUTH_SECTION_EMPTY);
    assert_eq!(&bytes[auth - 16..auth - 8], &0u64.to_le_bytes());
    assert_eq!(&bytes[auth - 8..auth], &0u64.to_le_bytes());
    // End: kind 0, 7 versions (alpha ×2, beta, gone ×2, \xff\x00), 3 keys.
    let end = auth - 8 - 8 - 17;
    assert_eq!(bytes[end], 0);
    assert_eq!(&bytes[end + 1..end + 9], &6u64.to_le_bytes());
    assert_eq!(&bytes[end + 9..end + 17], &3u64.to_le_bytes());
    let body = &bytes[..bytes.len() - 4];
    assert_eq!(
        &bytes[bytes.len() - 4..],
        &crc32c::crc32c(body).to_le_bytes()
    );
}

#[test]
fn reader_stops_after_the_trailer() {
    let store = small_store();
    let mut bytes = snapshot_of(&store);
    let len = bytes.len();
    bytes.extend_from_slice(b"next thing in the stream");
    let mut cursor = Cursor::new(&bytes[..]);
    assert_eq!(KvStore::read_snapshot(&mut cursor).unwrap(), store);
    assert_eq!(cursor.position(), len as u64);
    let mut rest = String::new();
    cursor.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "next thing in the stream");
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = snapshot_of(&small_store());
    for len in 0..bytes.len() {
        match read(&bytes[..len]) {
            Err(SnapshotError::Truncated { offset, .. }) => assert!(offset <= len as u64),
            other => panic!("truncated to {len}: {other:?}"),
        }
    }
}

#[test]
fn every_bit_flip_is_an_error() {
    let bytes = snapshot_of(&small_store());
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << bit;
            let result = read(&bad);
            assert!(result.is_err(), "flip of bit {bit} at {at} read back");
            if at < 8 {
                assert!(matches!(result, Err(SnapshotError::BadMagic)));
            } else if at == 8 && bad[8] != 2 && bad[8] != 4 {
                // (2 and 4 are older versions, read with their layouts.)
                assert!(matches!(result, Err(SnapshotError::UnsupportedVersion(_))));
            }
        }
    }
}

#[test]
fn every_byte_replacement_is_an_error() {
    let bytes = snapshot_of(&small_store());
    for at in 0..bytes.len() {
        for value in [0x00u8, 0xff, 0x80, 0x7f] {
            if bytes[at] == value {
                continue;
            }
            let mut bad = bytes.clone();
            bad[at] = value;
            assert!(read(&bad).is_err(), "byte {at} = {value:#x} read back");
        }
    }
}

/// One record of a forged snapshot.
struct Rec<'a> {
    kind: u8,
    key: &'a [u8],
    value_len: u32,
    modr: i64,
    create: i64,
    version: i64,
}

fn live<'a>(key: &'a [u8], modr: i64, create: i64, version: i64) -> Rec<'a> {
    Rec {
        kind: 1,
        key,
        value_len: 1,
        modr,
        create,
        version,
    }
}

fn tomb(key: &[u8], modr: i64) -> Rec<'_> {
    Rec {
        kind: 2,
        key,
        value_len: 0,
        modr,
        create: 0,
        version: 0,
    }
}

/// A snapshot at revision 10, compact revision `compact`, with the given
/// records and counts and a valid checksum: the semantic checks alone must
/// catch what is wrong.
fn forged_with(compact: i64, records: &[Rec<'_>], versions: u64, keys: u64) -> Vec<u8> {
    forged_leases(compact, records, versions, keys, &[], SNAPSHOT_VERSION)
}

/// [`forged_with`] with leases: each record's lease is `leases[i].0` when
/// given ((lease of record i, ...)), the lease table `table` (id, ttl,
/// remaining); `format` 2 writes the layout before leases.
fn forged_leases(
    compact: i64,
    records: &[Rec<'_>],
    versions: u64,
    keys: u64,
    record_leases: &[i64],
    format: u8,
) -> Vec<u8> {
    forged_table(compact, records, versions, keys, record_leases, &[], format)
}

fn forged_table(
    compact: i64,
    records: &[Rec<'_>],
    versions: u64,
    keys: u64,
    record_leases: &[i64],
    table: &[(i64, i64, i64)],
    format: u8,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.push(format);
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&10i64.to_le_bytes());
    bytes.extend_from_slice(&compact.to_le_bytes());
    for (i, r) in records.iter().enumerate() {
        bytes.push(r.kind);
        bytes.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&r.value_len.to_le_bytes());
        for n in [r.modr, r.create, r.version] {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        if format >= 3 {
            let lease = record_leases.get(i).copied().unwrap_or(0);
            bytes.extend_from_slice(&lease.to_le_bytes());
        }
        if format >= 6 {
            // Sub 0: each revision here wrote one key.
            bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        bytes.extend_from_slice(r.key);
        bytes.extend(std::iter::repeat_n(b'v', r.value_len as usize));
    }
    bytes.push(0);
    bytes.extend_from_slice(&versions.to_le_bytes());
    bytes.extend_from_slice(&keys.to_le_bytes());
    if format >= 3 {
        bytes.extend_from_slice(&(table.len() as u64).to_le_bytes());
        for (id, ttl, remaining) in table {
            for n in [id, ttl, remaining] {
                bytes.extend_from_slice(&n.to_le_bytes());
            }
        }
    }
    if format >= 4 {
        // No alarms.
        bytes.extend_from_slice(&0u64.to_le_bytes());
    }
    if format >= 5 {
        bytes.extend_from_slice(&AUTH_SECTION_EMPTY);
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn forged(compact: i64, records: &[Rec<'_>]) -> Vec<u8> {
    // Counts as a correct writer computes them.
    let mut keys = 0;
    for (i, r) in records.iter().enumerate() {
        let last_of_key = records.get(i + 1).is_none_or(|n| !n.key.is_empty());
        if last_of_key && r.kind == 1 {
            keys += 1;
        }
    }
    forged_with(compact, records, records.len() as u64, keys)
}

#[test]
fn forged_records_are_corrupt() {
    let good = forged(0, &[live(b"k", 5, 5, 1)]);
    let store = read(&good).unwrap();
    assert_eq!(
        (store.len(), store.revision(), store.applied_index()),
        (1, 10, 1)
    );
    // A history that reads back: a generation, a tombstone, a new one, a
    // compaction at 4 that kept k@4 (its latest version <= 4).
    let history = [
        live(b"k", 4, 3, 2),
        live(b"", 5, 3, 3),
        tomb(b"", 6),
        live(b"", 8, 8, 1),
        live(b"m", 9, 9, 1),
        tomb(b"", 10),
    ];
    let store = read(&forged(4, &history)).unwrap();
    store.check_invariants();
    assert_eq!((store.len(), store.stats().versions), (1, 6));

    let corrupt = |bytes: Vec<u8>, what: &str| match read(&bytes) {
        Err(SnapshotError::Corrupt { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    corrupt(
        forged(0, &[live(b"", 5, 3, 2)]),
        "first record without a key",
    );
    corrupt(forged(0, &[live(b"k", 5, 6, 1)]), "create after mod");
    corrupt(
        forged(0, &[live(b"k", 11, 3, 1)]),
        "mod after store revision",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 1, 1)]),
        "create at the initial revision",
    );
    corrupt(forged(0, &[live(b"k", 5, 3, 0)]), "live version 0");
    corrupt(
        forged(0, &[live(b"k", 5, 3, 4)]),
        "more versions than revisions",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 3, 2)]),
        "version 2 without compaction",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), tomb(b"", 5)]),
        "same revision twice",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), tomb(b"", 4)]),
        "revisions backwards",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), live(b"", 6, 5, 3)]),
        "version skipped",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), live(b"", 6, 6, 2)]),
        "create changed",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), tomb(b"", 6), tomb(b"", 7)]),
        "two tombstones",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), tomb(b"", 6), live(b"", 7, 5, 2)]),
        "generation not restarted",
    );
    corrupt(forged(0, &[tomb(b"k", 5)]), "tombstone first");
    corrupt(
        forged(
            0,
            &[
                live(b"k", 5, 5, 1),
                Rec {
                    value_len: 1,
                    ..tomb(b"", 6)
                },
            ],
        ),
        "tombstone with a value",
    );
    corrupt(
        forged(
            0,
            &[
                live(b"k", 5, 5, 1),
                Rec {
                    kind: 1,
                    ..tomb(b"", 6)
                },
            ],
        ),
        "live kind with version 0",
    );
    corrupt(
        forged(
            0,
            &[Rec {
                kind: 3,
                ..live(b"k", 5, 5, 1)
            }],
        ),
        "unknown kind",
    );
    // Versions compaction would have dropped.
    corrupt(
        forged(6, &[live(b"k", 4, 4, 1), live(b"", 5, 4, 2)]),
        "two versions at or below the compact revision",
    );
    corrupt(
        forged(7, &[live(b"k", 4, 4, 1), tomb(b"", 7)]),
        "a tombstone at or below the compact revision",
    );
    corrupt(
        forged(2, &[live(b"k", 5, 2, 2)]),
        "versions compacted away above the compact revision",
    );
    // Keys out of order, repeated, and wrong counts.
    corrupt(
        forged(0, &[live(b"m", 5, 5, 1), live(b"k", 6, 6, 1)]),
        "keys out of order",
    );
    corrupt(
        forged(0, &[live(b"k", 5, 5, 1), live(b"k", 6, 6, 1)]),
        "same key twice with its bytes",
    );
    corrupt(
        forged_with(0, &[live(b"k", 5, 5, 1)], 2, 1),
        "version count",
    );
    corrupt(forged_with(0, &[live(b"k", 5, 5, 1)], 1, 0), "key count");
    // Header fields.
    let mut bad_compact = forged(0, &[]);
    bad_compact[25..33].copy_from_slice(&11i64.to_le_bytes());
    let n = bad_compact.len() - 4;
    let crc = crc32c::crc32c(&bad_compact[..n]);
    bad_compact[n..].copy_from_slice(&crc.to_le_bytes());
    corrupt(bad_compact, "compact revision above the revision");

    // Lengths beyond the bounds are refused before reading the bytes.
    let mut long = good[..34].to_vec();
    long.extend_from_slice(&(KEY_BYTES_MAX as u32 + 1).to_le_bytes());
    long.extend_from_slice(&[0u8; 40]);
    corrupt(long, "key length beyond KEY_BYTES_MAX");
    let mut huge_value = good[..34].to_vec();
    huge_value.extend_from_slice(&1u32.to_le_bytes());
    huge_value.extend_from_slice(&(VALUE_BYTES_MAX as u32 + 1).to_le_bytes());
    huge_value.extend_from_slice(&[0u8; 36]);
    corrupt(huge_value, "value length beyond VALUE_BYTES_MAX");

    // No end marker: the stream runs out, Truncated, not an allocation.
    let records_only = &good[..good.len() - 4 - 8 - 17];
    assert!(matches!(
        read(records_only),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Noop,
    /// Compact at the current revision minus this much.
    Compact(i64),
    Step(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop::collection::vec(any::<u8>(), 1..3);
    prop_oneof![
        4 => (key.clone(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, v)| Op::Put(k, v)),
        1 => key.prop_map(Op::Delete),
        1 => Just(Op::Noop),
        1 => (0i64..4).prop_map(Op::Compact),
        1 => (0usize..5).prop_map(Op::Step),
    ]
}

proptest! {
    #[test]
    fn round_trip(ops in prop::collection::vec(op(), 0..80)) {
        let mut store = KvStore::new();
        for (i, op) in ops.iter().enumerate() {
            let index = i as u64 + 1;
            match op {
                Op::Put(k, v) => { store.apply(index, &put(k, v)).unwrap(); }
                Op::Delete(k) => { store.apply(index, &delete(k)).unwrap(); }
                Op::Noop => store.mark_applied(index),
                Op::Compact(back) => {
                    let _ = store.compact(index, store.revision() - back);
                }
                Op::Step(budget) => {
                    store.mark_applied(index);
                    store.compact_step(*budget);
                }
            }
            store.check_invariants();
        }
        let bytes = snapshot_of(&store);
        let back = read(&bytes).unwrap();
        back.check_invariants();
        prop_assert_eq!(&back, &store);
        prop_assert_eq!(snapshot_of(&back), bytes.clone());
        prop_assert_eq!(snapshot_of(&compacted(store.clone())), bytes);
        prop_assert_eq!(back.stats(), compacted(store.clone()).stats());
        // The restored store goes on exactly like the original.
        let mut a = store.clone();
        let mut b = back;
        let next = store.applied_index() + 1;
        prop_assert_eq!(a.apply(next, &put(b"k", b"v")), b.apply(next, &put(b"k", b"v")));
        prop_assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = read(&data);
        let mut with_header = SNAPSHOT_MAGIC.to_vec();
        with_header.push(SNAPSHOT_VERSION);
        with_header.extend_from_slice(&data);
        let _ = read(&with_header);
    }
}

#[test]
fn leases_read_back_and_forged_lease_tables_are_corrupt() {
    let recs = [live(b"a", 5, 5, 1), live(b"b", 6, 6, 1)];
    // v2 (before leases) still reads, with no leases.
    let old = read(&forged_leases(0, &recs, 2, 2, &[], 2)).unwrap();
    assert_eq!(old.leases().count(), 0);
    old.check_invariants();
    // v3: b attached to lease 7.
    let ok = forged_table(0, &recs, 2, 2, &[0, 7], &[(7, 60, 30)], 3);
    let store = read(&ok).unwrap();
    store.check_invariants();
    let lease = store.lease(7).expect("lease 7 read back");
    assert_eq!((lease.ttl, lease.remaining), (60, 30));
    assert_eq!(
        lease.keys().collect::<Vec<_>>(),
        [&bytes::Bytes::from_static(b"b")]
    );
    let corrupt = |bytes: Vec<u8>, what: &str| match read(&bytes) {
        Err(SnapshotError::Corrupt { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    corrupt(
        forged_table(0, &recs, 2, 2, &[0, 8], &[(7, 60, 0)], 3),
        "a key names a lease not held",
    );
    corrupt(
        forged_table(0, &recs, 2, 2, &[], &[(7, 60, 0), (7, 60, 0)], 3),
        "lease ids repeat",
    );
    corrupt(
        forged_table(0, &recs, 2, 2, &[], &[(7, 0, 0)], 3),
        "a TTL of 0",
    );
    corrupt(
        forged_table(0, &recs, 2, 2, &[], &[(7, 60, 61)], 3),
        "more remaining than granted",
    );
    corrupt(
        forged_table(0, &recs, 2, 2, &[-1, 0], &[], 3),
        "a negative lease id",
    );
}
