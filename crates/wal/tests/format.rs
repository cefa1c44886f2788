//! Property tests of every on-disk layout in `skiff_wal::format`: the
//! segment header and each record body, framed under a random salt and
//! watermark, read back and decoded to the same values; damage is always
//! detected and arbitrary bytes never panic the reader.

use bytes::Bytes;
use proptest::prelude::*;
use skiff_wal::format::{
    self, align_up, frame_into, frame_write, read_record, record_size, Body, RecordError,
    RecordType, SegmentHeader, ALIGN, FLAG_MORE, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use skiff_wal::{Entry, HardState, SnapshotMeta};

/// A decoded record body, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decoded {
    Entries(Vec<Entry>),
    HardState(HardState),
    Snapshot(SnapshotMeta),
    Truncate(u64),
}

impl Decoded {
    fn body(&self) -> Body {
        match self {
            Decoded::Entries(e) => Body::entries(e),
            Decoded::HardState(hs) => Body::hard_state(hs),
            Decoded::Snapshot(m) => Body::snapshot(m),
            Decoded::Truncate(from) => Body::truncate(*from),
        }
    }

    fn kind(&self) -> RecordType {
        match self {
            Decoded::Entries(_) => RecordType::Entries,
            Decoded::HardState(_) => RecordType::HardState,
            Decoded::Snapshot(_) => RecordType::Snapshot,
            Decoded::Truncate(_) => RecordType::Truncate,
        }
    }
}

/// Decodes a verified body by its record type, as recovery does.
fn decode(kind: u8, body: &[u8]) -> Result<Decoded, format::BodyError> {
    let body = Bytes::copy_from_slice(body);
    match RecordType::from_u8(kind) {
        Some(RecordType::Entries) => format::decode_entries(&body).map(Decoded::Entries),
        Some(RecordType::HardState) => format::decode_hard_state(&body).map(Decoded::HardState),
        Some(RecordType::Snapshot) => format::decode_snapshot(&body).map(Decoded::Snapshot),
        Some(RecordType::Truncate) => format::decode_truncate(&body).map(Decoded::Truncate),
        None => Err(format::BodyError("unknown record type")),
    }
}

fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        // Empty payloads are legal and easy to get wrong.
        2 => Just(Bytes::new()),
        8 => proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from),
    ]
}

fn entries() -> impl Strategy<Value = Vec<Entry>> {
    (
        1u64..u64::MAX / 2,
        any::<u64>(),
        proptest::collection::vec((0u64..4, payload(300)), 1..20),
    )
        .prop_map(|(first, term0, items)| {
            let mut term = term0 % (u64::MAX / 2);
            items
                .into_iter()
                .enumerate()
                .map(|(i, (bump, payload))| {
                    term += bump;
                    Entry {
                        index: first + i as u64,
                        term,
                        payload,
                    }
                })
                .collect()
        })
}

fn decoded() -> impl Strategy<Value = Decoded> {
    prop_oneof![
        entries().prop_map(Decoded::Entries),
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(term, vote, commit)| Decoded::HardState(HardState { term, vote, commit })),
        (any::<u64>(), any::<u64>(), payload(600))
            .prop_map(|(index, term, data)| Decoded::Snapshot(SnapshotMeta { index, term, data })),
        any::<u64>().prop_map(Decoded::Truncate),
    ]
}

fn header() -> impl Strategy<Value = SegmentHeader> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(seq, first_index, salt, prev_end)| SegmentHeader {
            seq,
            first_index,
            salt,
            prev_end,
        },
    )
}

/// Recomputes a record header's checksum after an edit, as a forger would.
fn reseal(record: &mut [u8], salt: u64) {
    let mut input = salt.to_le_bytes().to_vec();
    input.extend_from_slice(&record[4..RECORD_HEADER_LEN]);
    record[0..4].copy_from_slice(&crc32c::crc32c(&input).to_le_bytes());
}

/// Frames `d` after `lead` aligned bytes of filler; returns the buffer and
/// the record's offset.
fn framed(d: &Decoded, salt: u64, watermark: u64, lead: usize, filler: u8) -> (Vec<u8>, usize) {
    let mut buf = vec![filler; lead * ALIGN];
    let at = buf.len();
    frame_into(&mut buf, salt, watermark, &d.body());
    (buf, at)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn segment_header_round_trips(h in header()) {
        let b = h.encode();
        prop_assert_eq!(b.len(), SEGMENT_HEADER_LEN);
        prop_assert_eq!(&b[0..8], format::SEGMENT_MAGIC);
        prop_assert_eq!(SegmentHeader::decode(&b), Ok(h));
        // Trailing bytes after the header are not its business.
        let mut longer = b.to_vec();
        longer.extend_from_slice(&[0xAB; 16]);
        prop_assert_eq!(SegmentHeader::decode(&longer), Ok(h));
    }

    #[test]
    fn segment_header_any_bit_flip_or_truncation_fails(
        h in header(),
        bit in 0..SEGMENT_HEADER_LEN * 8,
        cut in 0..SEGMENT_HEADER_LEN,
    ) {
        let mut b = h.encode();
        b[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(SegmentHeader::decode(&b).is_err(), "flipped bit {} decoded", bit);
        prop_assert!(SegmentHeader::decode(&h.encode()[..cut]).is_err());
    }

    #[test]
    fn every_body_kind_round_trips(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
        lead in 0usize..8,
    ) {
        let body = d.body();
        prop_assert_eq!(body.kind, d.kind());
        prop_assert_eq!(body.crc, crc32c::crc32c(&body.bytes));
        let (buf, at) = framed(&d, salt, watermark, lead, 0xEE);
        let len = buf.len() - at;
        prop_assert_eq!(len % ALIGN, 0, "framed records are 8-byte aligned");
        prop_assert_eq!(len, body.framed_len());
        prop_assert_eq!(len, record_size(body.bytes.len()));
        prop_assert_eq!(len, align_up(RECORD_HEADER_LEN + body.bytes.len()));
        prop_assert!(buf[at + RECORD_HEADER_LEN + body.bytes.len()..].iter().all(|&b| b == 0), "padding is zero");

        let (h, got) = read_record(&buf, at, salt).expect("a framed record reads back");
        prop_assert_eq!(h.kind, d.kind() as u8);
        prop_assert_eq!(h.watermark, watermark);
        prop_assert_eq!(h.body_len as usize, body.bytes.len());
        prop_assert_eq!(h.body_crc, body.crc);
        prop_assert_eq!(h.framed_len(), len);
        prop_assert_eq!(got, &body.bytes[..]);
        prop_assert_eq!(decode(h.kind, got), Ok(d.clone()));
        if let Decoded::Entries(e) = &d {
            prop_assert_eq!(
                format::entries_span(got),
                Ok((e[0].index, e.len() as u64))
            );
        }
    }

    #[test]
    fn records_follow_each_other(
        ds in proptest::collection::vec(decoded(), 1..6),
        salt in any::<u64>(),
        watermark in any::<u64>(),
    ) {
        let mut buf = vec![0u8; SEGMENT_HEADER_LEN];
        for d in &ds {
            frame_into(&mut buf, salt, watermark, &d.body());
        }
        // Trailing zeros read as "nothing written here".
        buf.resize(buf.len() + 64, 0);
        let mut at = SEGMENT_HEADER_LEN;
        for d in &ds {
            let (h, body) = read_record(&buf, at, salt).expect("reads back");
            prop_assert_eq!(decode(h.kind, body), Ok(d.clone()));
            at += h.framed_len();
        }
        prop_assert_eq!(read_record(&buf, at, salt), Err(RecordError::Zero));
        prop_assert_eq!(read_record(&buf, buf.len() - 8, salt), Err(RecordError::Eof));
    }

    #[test]
    fn a_write_of_several_records_round_trips(
        ds in proptest::collection::vec(decoded(), 1..6),
        salt in any::<u64>(),
        watermark in any::<u64>(),
    ) {
        let bodies: Vec<Body> = ds.iter().map(Decoded::body).collect();
        let mut buf = vec![0u8; SEGMENT_HEADER_LEN];
        frame_write(&mut buf, salt, watermark, &bodies);
        let total: usize = bodies.iter().map(Body::framed_len).sum();
        prop_assert_eq!(buf.len(), SEGMENT_HEADER_LEN + total);
        let mut at = SEGMENT_HEADER_LEN;
        for (i, d) in ds.iter().enumerate() {
            let (h, body) = read_record(&buf, at, salt).expect("reads back");
            let last = i + 1 == ds.len();
            prop_assert_eq!(h.more(), !last, "MORE on every record but the last");
            prop_assert_eq!(h.flags, if last { 0 } else { FLAG_MORE });
            prop_assert_eq!(h.watermark, watermark, "one watermark per write");
            prop_assert_eq!(decode(h.kind, body), Ok(d.clone()));
            at += h.framed_len();
        }
        // A one-record write frames exactly as `frame_into` does.
        let mut one = Vec::new();
        frame_write(&mut one, salt, watermark, &bodies[..1]);
        let mut into = Vec::new();
        frame_into(&mut into, salt, watermark, &bodies[0]);
        prop_assert_eq!(one, into);
    }

    #[test]
    fn unknown_flags_in_a_verified_header_are_refused(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
        flags in 2u16..,
    ) {
        let (mut buf, at) = framed(&d, salt, watermark, 0, 0);
        buf[at + 14..at + 16].copy_from_slice(&flags.to_le_bytes());
        reseal(&mut buf[at..], salt);
        prop_assert_eq!(read_record(&buf, at, salt), Err(RecordError::BadType));
    }

    #[test]
    fn another_salt_does_not_verify(
        d in decoded(),
        salt in any::<u64>(),
        other in any::<u64>(),
        watermark in any::<u64>(),
    ) {
        prop_assume!(salt != other);
        let (buf, at) = framed(&d, salt, watermark, 1, 0);
        prop_assert_eq!(read_record(&buf, at, other), Err(RecordError::BadHeader));
    }

    #[test]
    fn any_bit_flip_is_detected(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
        bit_seed in any::<usize>(),
    ) {
        let (buf, at) = framed(&d, salt, watermark, 2, 0);
        let body_len = d.body().bytes.len();
        let bit = bit_seed % ((buf.len() - at) * 8);
        let mut bad = buf.clone();
        bad[at + bit / 8] ^= 1 << (bit % 8);
        let covered = bit / 8 < RECORD_HEADER_LEN + body_len;
        match read_record(&bad, at, salt) {
            Ok((h, body)) => {
                // Only padding is outside the checksums, and it is no data.
                prop_assert!(!covered, "flip of covered bit {} went unnoticed", bit);
                prop_assert_eq!(decode(h.kind, body), Ok(d.clone()));
                prop_assert_eq!(h.watermark, watermark);
            }
            Err(e) => {
                prop_assert!(covered);
                let expected = if bit / 8 < RECORD_HEADER_LEN {
                    RecordError::BadHeader
                } else {
                    RecordError::BadBody
                };
                prop_assert_eq!(e, expected);
            }
        }
    }

    #[test]
    fn every_bit_flip_of_a_small_record_is_detected(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
    ) {
        // The exhaustive version of the property above, on one record.
        let (buf, at) = framed(&d, salt, watermark, 0, 0);
        let covered = RECORD_HEADER_LEN + d.body().bytes.len();
        for bit in 0..covered.min(160) * 8 {
            let mut bad = buf.clone();
            bad[at + bit / 8] ^= 1 << (bit % 8);
            prop_assert!(read_record(&bad, at, salt).is_err(), "bit {} flipped unnoticed", bit);
        }
    }

    #[test]
    fn cut_records_do_not_read(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
        cut_seed in any::<usize>(),
    ) {
        // A segment that ends inside a record (a torn or short file).
        let (buf, at) = framed(&d, salt, watermark, 0, 0);
        let body_end = at + RECORD_HEADER_LEN + d.body().bytes.len();
        let cut = cut_seed % body_end;
        let r = read_record(&buf[..cut], at, salt);
        if cut < RECORD_HEADER_LEN {
            prop_assert_eq!(r, Err(RecordError::Eof));
        } else {
            prop_assert_eq!(r, Err(RecordError::BadLength));
        }
    }

    #[test]
    fn read_record_on_random_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        offset in 0usize..600,
        salt in any::<u64>(),
    ) {
        match read_record(&bytes, offset, salt) {
            Ok((h, body)) => {
                // Astronomically unlikely, but then it must be consistent.
                prop_assert_eq!(body.len(), h.body_len as usize);
                let _ = decode(h.kind, body);
            }
            Err(RecordError::Eof) => prop_assert!(offset + RECORD_HEADER_LEN > bytes.len()),
            Err(RecordError::Zero) => {
                prop_assert!(bytes[offset..offset + RECORD_HEADER_LEN].iter().all(|&b| b == 0));
            }
            Err(_) => {}
        }
    }

    #[test]
    fn mangled_records_never_panic_or_lie(
        d in decoded(),
        salt in any::<u64>(),
        watermark in any::<u64>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut_seed in any::<usize>(),
    ) {
        // Several random byte overwrites and a random cut: the reader either
        // fails or returns exactly what was written.
        let (mut buf, at) = framed(&d, salt, watermark, 1, 0x55);
        for (pos, val) in edits {
            let pos = pos % buf.len();
            buf[pos] = val;
        }
        let cut = cut_seed % (buf.len() + 1);
        buf.truncate(cut);
        if let Ok((h, body)) = read_record(&buf, at, salt) {
            prop_assert_eq!(decode(h.kind, body), Ok(d.clone()));
        }
    }

    #[test]
    fn decoders_on_random_bodies_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        count in any::<u32>(),
    ) {
        let mut b = bytes.clone();
        // Often give the entries decoder a plausible prefix with a hostile count.
        if b.len() >= 16 {
            b[8..12].copy_from_slice(&count.to_le_bytes());
        }
        for body in [bytes, b] {
            let body = Bytes::from(body);
            if let Ok(es) = format::decode_entries(&body) {
                let (first, n) = format::entries_span(&body).expect("decoded");
                prop_assert_eq!(n, es.len() as u64);
                for (i, e) in es.iter().enumerate() {
                    prop_assert_eq!(e.index, first.wrapping_add(i as u64));
                }
            }
            let _ = format::decode_hard_state(&body);
            let _ = format::decode_snapshot(&body);
            let _ = format::decode_truncate(&body);
            let _ = format::entries_span(&body);
        }
    }
}

#[test]
fn layout_constants_match_the_module_doc() {
    assert_eq!(SEGMENT_HEADER_LEN, 48);
    assert_eq!(RECORD_HEADER_LEN, 24);
    assert_eq!(ALIGN, 8);
    assert_eq!(format::ENTRY_OVERHEAD, 12);
    assert_eq!(format::ENTRIES_PREFIX, 16);
    assert_eq!(RecordType::Entries as u8, 1);
    assert_eq!(RecordType::HardState as u8, 2);
    assert_eq!(RecordType::Snapshot as u8, 3);
    assert_eq!(RecordType::Truncate as u8, 4);
    for k in [0u8, 5, 255] {
        assert_eq!(RecordType::from_u8(k), None);
    }

    // The header's fields sit where the drawing puts them.
    let h = SegmentHeader {
        seq: 0x1111_1111_1111_1111,
        first_index: 0x2222_2222_2222_2222,
        salt: 0x3333_3333_3333_3333,
        prev_end: 0x4444_4444_4444_4444,
    };
    let b = h.encode();
    assert_eq!(format::u32_at(&b, 8), format::FORMAT_VERSION);
    assert_eq!(format::u64_at(&b, 16), h.seq);
    assert_eq!(format::u64_at(&b, 24), h.first_index);
    assert_eq!(format::u64_at(&b, 32), h.salt);
    assert_eq!(format::u64_at(&b, 40), h.prev_end);
    let mut crc_input = b[0..12].to_vec();
    crc_input.extend_from_slice(&b[16..48]);
    assert_eq!(format::u32_at(&b, 12), crc32c::crc32c(&crc_input));
    assert!(SegmentHeader::decode(&[0u8; SEGMENT_HEADER_LEN]).is_err());

    // And the record's.
    let salt = 0x0123_4567_89ab_cdef_u64;
    let mut r = Vec::new();
    frame_into(&mut r, salt, 0x77, &Body::truncate(9));
    assert_eq!(r.len(), 32);
    assert_eq!(format::u32_at(&r, 4), 8);
    assert_eq!(format::u32_at(&r, 8), crc32c::crc32c(&9u64.to_le_bytes()));
    assert_eq!(r[12], RecordType::Truncate as u8);
    assert_eq!(r[13], format::RECORD_VERSION);
    assert_eq!(&r[14..16], &[0, 0]);
    assert_eq!(format::u64_at(&r, 16), 0x77);
    assert_eq!(format::u64_at(&r, 24), 9);
    let mut hcrc_input = salt.to_le_bytes().to_vec();
    hcrc_input.extend_from_slice(&r[4..24]);
    assert_eq!(format::u32_at(&r, 0), crc32c::crc32c(&hcrc_input));

    // A verified header with an unknown type, version or flag is refused.
    for (pos, val) in [(12usize, 9u8), (13, 2), (14, 2), (15, 0x80)] {
        let mut bad = r.clone();
        bad[pos] = val;
        reseal(&mut bad, salt);
        assert_eq!(read_record(&bad, 0, salt), Err(RecordError::BadType));
    }
    // A verified header whose length runs past the bytes given.
    let mut long = r.clone();
    long[4..8].copy_from_slice(&1000u32.to_le_bytes());
    reseal(&mut long, salt);
    assert_eq!(read_record(&long, 0, salt), Err(RecordError::BadLength));

    // The MORE flag is bit 0 of the u16 at 14.
    assert_eq!(FLAG_MORE, 1);
    let mut w = Vec::new();
    frame_write(&mut w, salt, 5, &[Body::truncate(9), Body::truncate(10)]);
    assert_eq!(w.len(), 64);
    assert_eq!(&w[14..16], &[1, 0]);
    assert_eq!(&w[32 + 14..32 + 16], &[0, 0]);
    assert!(read_record(&w, 0, salt).unwrap().0.more());
    assert!(!read_record(&w, 32, salt).unwrap().0.more());

    // An empty entries body frames and decodes to no entries.
    let empty = Body::entries(&[]);
    assert_eq!(empty.bytes.len(), format::ENTRIES_PREFIX);
    assert_eq!(format::decode_entries(&empty.bytes), Ok(Vec::new()));
}

/// An Entries body whose count claims more entries than its bytes could
/// hold is refused by the count check itself, before any entry is walked.
#[test]
fn an_entry_count_beyond_the_body_is_refused_up_front() {
    // Prefix (first index 1, count 5, reserved), then one empty entry
    // (term 1, length 0): room for one entry, not five.
    let mut body = Vec::new();
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&5u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 4]);
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(body.len(), format::ENTRIES_PREFIX + format::ENTRY_OVERHEAD);
    let err = format::for_each_entry(&body, |_, _, _| panic!("no entry is walked"))
        .expect_err("five entries cannot fit");
    assert_eq!(err, format::BodyError("entry count exceeds body"));
    // With the right count it decodes.
    body[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(format::for_each_entry(&body, |_, _, _| {}), Ok((1, 1)));
}
