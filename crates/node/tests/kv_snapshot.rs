//! KV snapshots: round trips give back an equal store; truncated, flipped or
//! forged input is an error, never a panic and never a different store.

use std::io::{Cursor, Read};

use bytes::Bytes;
use proptest::prelude::*;
use skiff_node::kv::{KvStore, SnapshotError, KEY_BYTES_MAX, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
use skiff_node::pb::etcdserverpb::request_op::Request;
use skiff_node::pb::etcdserverpb::{DeleteRangeRequest, PutRequest, RequestOp};

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
    assert_eq!(info.crc32c, store.digest());
    out
}

fn read(bytes: &[u8]) -> Result<KvStore, SnapshotError> {
    KvStore::read_snapshot(&mut Cursor::new(bytes))
}

/// Three keys, a deleted one and a modified one; applied index 7.
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

#[test]
fn round_trip_small_and_empty() {
    for store in [KvStore::new(), small_store()] {
        let bytes = snapshot_of(&store);
        let back = read(&bytes).unwrap();
        back.check_invariants();
        assert_eq!(back, store);
        assert_eq!(back.digest(), store.digest());
        assert_eq!(back.approx_bytes(), store.approx_bytes());
    }
}

#[test]
fn header_layout() {
    let store = small_store();
    let bytes = snapshot_of(&store);
    assert_eq!(&bytes[..8], &SNAPSHOT_MAGIC);
    assert_eq!(bytes[8], SNAPSHOT_VERSION);
    assert_eq!(&bytes[9..17], &7u64.to_le_bytes());
    assert_eq!(&bytes[17..25], &store.revision().to_le_bytes());
    assert_eq!(&bytes[25..33], &3u64.to_le_bytes());
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
            } else if at == 8 {
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

/// Header + one record, with a valid checksum: the semantic checks alone
/// must catch what is wrong.
fn forged(key: &[u8], value_len: u32, create: i64, modr: i64, version: i64) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.push(SNAPSHOT_VERSION);
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&10i64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&value_len.to_le_bytes());
    for n in [create, modr, version] {
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    bytes.extend_from_slice(key);
    bytes.extend(std::iter::repeat_n(b'v', value_len as usize));
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn forged_records_are_corrupt() {
    let good = forged(b"k", 1, 3, 5, 2);
    let store = read(&good).unwrap();
    assert_eq!(
        (store.len(), store.revision(), store.applied_index()),
        (1, 10, 1)
    );

    let corrupt = |bytes: Vec<u8>, what: &str| match read(&bytes) {
        Err(SnapshotError::Corrupt { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    corrupt(forged(b"", 1, 3, 5, 2), "empty key");
    corrupt(forged(b"k", 1, 6, 5, 1), "create after mod");
    corrupt(forged(b"k", 1, 3, 11, 1), "mod after store revision");
    corrupt(forged(b"k", 1, 1, 5, 1), "create at the initial revision");
    corrupt(forged(b"k", 1, 3, 5, 0), "version 0");
    corrupt(forged(b"k", 1, 3, 5, 4), "more versions than revisions");

    // A key length beyond the bound is refused before reading the key.
    let mut long = good[..33].to_vec();
    long.extend_from_slice(&(KEY_BYTES_MAX as u32 + 1).to_le_bytes());
    long.extend_from_slice(&[0u8; 28]);
    corrupt(long, "key length beyond KEY_BYTES_MAX");
    let mut huge_value = good[..33].to_vec();
    huge_value.extend_from_slice(&1u32.to_le_bytes());
    huge_value.extend_from_slice(&u32::MAX.to_le_bytes());
    huge_value.extend_from_slice(&[0u8; 24]);
    corrupt(huge_value, "value length beyond VALUE_BYTES_MAX");

    // Keys out of order (two records, valid checksum).
    let mut two = Vec::new();
    two.extend_from_slice(&good[..25]);
    two.extend_from_slice(&2u64.to_le_bytes());
    let record = &good[33..good.len() - 4];
    two.extend_from_slice(record);
    two.extend_from_slice(record);
    let crc = crc32c::crc32c(&two);
    two.extend_from_slice(&crc.to_le_bytes());
    corrupt(two, "same key twice");

    // A key count far beyond the stream ends in Truncated, not an allocation.
    let mut many = good.clone();
    many[25..33].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(read(&many), Err(SnapshotError::Truncated { .. })));
}

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Noop,
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop::collection::vec(any::<u8>(), 1..6);
    prop_oneof![
        4 => (key.clone(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, v)| Op::Put(k, v)),
        1 => key.prop_map(Op::Delete),
        1 => Just(Op::Noop),
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
            }
        }
        let bytes = snapshot_of(&store);
        let back = read(&bytes).unwrap();
        back.check_invariants();
        prop_assert_eq!(&back, &store);
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
