//! The Raft codec end to end: messages of every kind through
//! `encode_raft_frame`, a `FrameDecoder` and `decode_messages` come back
//! equal; payloads come back as slices of the receive buffer; and bodies
//! that never met a checksum — forged, truncated, mutated, random — are
//! refused without a panic or an allocation their size does not justify.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use skiff_net::{
    decode_messages, encode_hello_frame, encode_raft_frame, message_encoded_len, raft_body_len,
    Channel, FrameDecoder, FrameEncoder, FrameType, Hello, WireError, FRAME_HEADER_LEN,
    HELLO_BODY_LEN, RAFT_BODY_PREFIX_LEN,
};
use skiff_raft::{MessageBody, Payload};

use common::*;

// ---------------------------------------------------------------------------
// Round trips.

#[test]
fn strategies_reach_every_variant() {
    let mut runner = TestRunner::deterministic();
    let mut bodies = [0usize; VARIANTS];
    let mut payloads = [0usize; PAYLOAD_KINDS];
    for _ in 0..2_000 {
        let m = message().new_tree(&mut runner).unwrap().current();
        bodies[variant(&m.body)] += 1;
        if let MessageBody::Append { entries, .. } = &m.body {
            for e in entries {
                payloads[payload_kind(&e.payload)] += 1;
            }
        }
    }
    assert!(bodies.iter().all(|&n| n > 0), "variants seen: {bodies:?}");
    assert!(
        payloads.iter().all(|&n| n > 0),
        "payloads seen: {payloads:?}"
    );

    let mut covered = [false; VARIANTS];
    for m in every_variant() {
        covered[variant(&m.body)] = true;
    }
    assert!(covered.iter().all(|&c| c), "every_variant misses one");
}

#[test]
fn every_variant_round_trips() {
    let msgs = every_variant();
    let mut buf = raft_frame(&msgs);
    assert_eq!(buf.len(), FRAME_HEADER_LEN + raft_body_len(&msgs));
    let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.ty, FrameType::Raft);
    assert_eq!(decode_messages(&frame.body).unwrap(), msgs);
}

#[test]
fn one_message_per_frame_round_trips_and_lengths_agree() {
    for m in every_variant() {
        let msgs = vec![m];
        let mut buf = raft_frame(&msgs);
        assert_eq!(
            buf.len(),
            FRAME_HEADER_LEN + RAFT_BODY_PREFIX_LEN + message_encoded_len(&msgs[0])
        );
        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(decode_messages(&frame.body).unwrap(), msgs);
    }
}

#[test]
fn hello_round_trips() {
    for channel in [Channel::Raft, Channel::Snapshot] {
        let h = Hello { channel, ..hello() };
        let mut buf = BytesMut::new();
        let len = encode_hello_frame(&FrameEncoder::default(), &h, &mut buf).unwrap();
        assert_eq!(len, FRAME_HEADER_LEN + HELLO_BODY_LEN);
        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.ty, FrameType::Hello);
        assert_eq!(Hello::decode(&frame.body).unwrap(), h);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn batches_round_trip(msgs in batch()) {
        let mut buf = raft_frame(&msgs);
        prop_assert_eq!(buf.len(), FRAME_HEADER_LEN + raft_body_len(&msgs));
        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(frame.ty, FrameType::Raft);
        prop_assert_eq!(decode_messages(&frame.body).unwrap(), msgs);
    }

    /// Several frames cut into random pieces decode as the whole stream does.
    #[test]
    fn random_pieces_decode_like_the_whole(
        batches in proptest::collection::vec(batch(), 1..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let enc = FrameEncoder::default();
        let mut stream = BytesMut::new();
        for msgs in &batches {
            encode_raft_frame(&enc, msgs, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        let frames = decode_in_pieces(&stream, &cuts).unwrap();
        prop_assert_eq!(frames.len(), batches.len());
        for (frame, msgs) in frames.iter().zip(&batches) {
            prop_assert_eq!(&decode_messages(&frame.body).unwrap(), msgs);
        }
    }
}

// ---------------------------------------------------------------------------
// Zero copy.

/// Whether `inner` lies inside the memory of `outer`.
fn within(inner: &[u8], outer: std::ops::Range<usize>) -> bool {
    let start = inner.as_ptr() as usize;
    outer.contains(&start) && start + inner.len() <= outer.end
}

#[test]
fn payloads_are_slices_of_the_receive_buffer() {
    let msgs = every_variant();
    let mut buf = BytesMut::with_capacity(64 << 10);
    // Two frames, so that the second body does not start at the buffer's
    // start either.
    encode_raft_frame(&FrameEncoder::default(), &msgs[..4], &mut buf).unwrap();
    encode_raft_frame(&FrameEncoder::default(), &msgs, &mut buf).unwrap();
    let base = buf.as_ptr() as usize;
    let received = base..base + buf.len();

    let dec = FrameDecoder::default();
    let _first = dec.decode(&mut buf).unwrap().unwrap();
    let frame = dec.decode(&mut buf).unwrap().unwrap();
    assert!(
        within(&frame.body, received.clone()),
        "frame body was copied"
    );
    let body = frame.body.as_ptr() as usize..frame.body.as_ptr() as usize + frame.body.len();

    let mut checked = 0;
    for m in decode_messages(&frame.body).unwrap() {
        let mut data = Vec::new();
        match &m.body {
            MessageBody::Append { entries, .. } => {
                for e in entries {
                    if let Payload::Normal(d) = &e.payload {
                        data.push(d.clone());
                    }
                }
            }
            MessageBody::InstallSnapshot { data: d, .. } => data.push(d.clone()),
            _ => {}
        }
        for d in data.iter().filter(|d| !d.is_empty()) {
            assert!(within(d, body.clone()), "payload was copied");
            assert!(within(d, received.clone()));
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "the Normal payload and the snapshot data");
}

// ---------------------------------------------------------------------------
// Bad input: bodies. A valid checksum proves nothing against a buggy or
// hostile peer, so the codec is tested on bodies that never met a checksum.

/// A one-message body: count 1, then `tail` after the message header.
fn one_message(tag: u8, tail: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32_le(1);
    b.put_u8(tag);
    b.put_u64_le(1);
    b.put_u64_le(2);
    b.put_u64_le(3);
    b.put_slice(tail);
    b.freeze()
}

#[test]
fn forged_counts_are_refused_before_allocating() {
    // A count of four billion messages in an 8-byte body.
    let mut b = BytesMut::new();
    b.put_u32_le(u32::MAX);
    b.put_u32_le(0);
    assert!(matches!(
        decode_messages(&b.freeze()),
        Err(WireError::Truncated { .. })
    ));

    // Four billion entries in an Append.
    let mut tail = BytesMut::new();
    tail.put_u64_le(0);
    tail.put_u64_le(0);
    tail.put_u64_le(0);
    tail.put_u32_le(u32::MAX);
    tail.put_bytes(0, 64);
    assert!(matches!(
        decode_messages(&one_message(5, &tail)),
        Err(WireError::Truncated { .. })
    ));

    // Four billion voters in a snapshot's membership.
    let mut tail = BytesMut::new();
    tail.put_u64_le(0);
    tail.put_u64_le(0);
    tail.put_u32_le(u32::MAX);
    tail.put_bytes(0, 64);
    assert!(matches!(
        decode_messages(&one_message(12, &tail)),
        Err(WireError::Truncated { .. })
    ));

    // A 4 GiB payload in a small body.
    let mut tail = BytesMut::new();
    tail.put_u64_le(0);
    tail.put_u64_le(0);
    tail.put_u64_le(0);
    tail.put_u32_le(1);
    tail.put_u64_le(10);
    tail.put_u64_le(1);
    tail.put_u8(2);
    tail.put_u32_le(u32::MAX);
    tail.put_bytes(7, 32);
    assert!(matches!(
        decode_messages(&one_message(5, &tail)),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn unknown_tags_are_refused() {
    for tag in [0u8, 16, 200, 255] {
        assert_eq!(
            decode_messages(&one_message(tag, &[])),
            Err(WireError::UnknownTag {
                what: "message",
                tag
            })
        );
    }
    // An Append with one entry of payload kind 0, then 4.
    for kind in [0u8, 4] {
        let mut tail = BytesMut::new();
        tail.put_u64_le(0);
        tail.put_u64_le(0);
        tail.put_u64_le(0);
        tail.put_u32_le(1);
        tail.put_u64_le(1);
        tail.put_u64_le(1);
        tail.put_u8(kind);
        assert_eq!(
            decode_messages(&one_message(5, &tail)),
            Err(WireError::UnknownTag {
                what: "entry payload",
                tag: kind
            })
        );
    }
    let mut hello = BytesMut::new();
    hello.put_bytes(0, 24);
    hello.put_u8(3);
    assert_eq!(
        Hello::decode(&hello.freeze()),
        Err(WireError::UnknownTag {
            what: "Hello channel",
            tag: 3
        })
    );
}

#[test]
fn non_canonical_bodies_are_malformed() {
    // A bool that is 2.
    assert!(matches!(
        decode_messages(&one_message(2, &[2])),
        Err(WireError::Malformed { .. })
    ));
    // An option marker that is 2.
    let mut tail = BytesMut::new();
    tail.put_u64_le(5);
    tail.put_u8(2);
    tail.put_u64_le(9);
    assert!(matches!(
        decode_messages(&one_message(10, &tail)),
        Err(WireError::Malformed { .. })
    ));
    // Membership ids repeated, then out of order.
    for ids in [[4u64, 4], [5, 4]] {
        let mut tail = BytesMut::new();
        tail.put_u64_le(0);
        tail.put_u64_le(0);
        tail.put_u32_le(2);
        ids.iter().for_each(|&id| tail.put_u64_le(id));
        tail.put_u32_le(0);
        tail.put_u32_le(0);
        tail.put_u32_le(0);
        assert_eq!(
            decode_messages(&one_message(12, &tail)),
            Err(WireError::Malformed {
                what: "membership ids not strictly increasing"
            })
        );
    }
    // Bytes after the last message, and after a Hello.
    let mut b = BytesMut::from(&raft_body(&every_variant())[..]);
    b.put_u8(0);
    assert!(matches!(
        decode_messages(&b.freeze()),
        Err(WireError::Malformed { .. })
    ));
    let mut hello = BytesMut::new();
    hello.put_bytes(0, 24);
    hello.put_u8(1);
    hello.put_u8(0);
    assert!(matches!(
        Hello::decode(&hello.freeze()),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn every_body_truncation_is_truncated() {
    let body = raft_body(&every_variant());
    for len in 0..body.len() {
        assert!(
            matches!(
                decode_messages(&body.slice(..len)),
                Err(WireError::Truncated { .. })
            ),
            "body cut at {len}"
        );
    }
    let mut hello_frame = BytesMut::new();
    encode_hello_frame(&FrameEncoder::default(), &hello(), &mut hello_frame).unwrap();
    let hello_body = FrameDecoder::default()
        .decode(&mut hello_frame)
        .unwrap()
        .unwrap()
        .body;
    for len in 0..hello_body.len() {
        assert!(matches!(
            Hello::decode(&hello_body.slice(..len)),
            Err(WireError::Truncated { .. })
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bodies straight into the codec: errors, never panics.
    #[test]
    fn random_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let body = Bytes::from(bytes);
        let _ = decode_messages(&body);
        let _ = Hello::decode(&body);
    }

    /// Valid bodies with bytes overwritten, re-framed with a correct
    /// checksum (as a buggy peer would send them): the decoder passes them
    /// and the codec either decodes something or refuses; never panics.
    #[test]
    fn mutated_bodies_behind_a_good_checksum_never_panic(
        msgs in batch(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut body = raft_body(&msgs).to_vec();
        for (at, byte) in edits {
            let at = at.index(body.len());
            body[at] = byte;
        }
        let mut buf = BytesMut::new();
        FrameEncoder::default().encode(&mut buf, FrameType::Raft, &body).unwrap();
        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        if let Ok(decoded) = decode_messages(&frame.body) {
            // Whatever decoded re-encodes to exactly the same bytes: the
            // layout has one encoding per value.
            prop_assert_eq!(&raft_body(&decoded)[..], &body[..]);
        }
    }
}
