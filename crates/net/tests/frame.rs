//! Framing end to end: a stream of frames decodes the same however it is
//! cut into reads; a truncated stream waits, then reports the truncation at
//! its end; and no input — random, bit-flipped, with a bad header or an
//! oversized length — panics the decoder or gets past it as a frame.

mod common;

use bytes::{Buf, BufMut, BytesMut};
use proptest::prelude::*;
use skiff_net::{
    decode_messages, encode_raft_frame, raft_body_len, FrameDecoder, FrameEncoder, FrameHeader,
    FrameType, Hello, WireError, DEFAULT_FRAME_BYTES_MAX, FRAME_HEADER_LEN, FRAME_VERSION,
};
use skiff_raft::Message;

use common::*;

// ---------------------------------------------------------------------------
// Streams cut anywhere.

#[test]
fn a_stream_split_at_every_byte_decodes_identically() {
    let stream = stream();
    let whole = decode_whole(&stream).unwrap();
    assert_eq!(whole.len(), 4);
    for cut in 0..=stream.len() {
        assert_eq!(
            decode_in_pieces(&stream, &[cut]).unwrap(),
            whole,
            "cut at {cut}"
        );
    }
    let every_byte: Vec<usize> = (0..=stream.len()).collect();
    assert_eq!(decode_in_pieces(&stream, &every_byte).unwrap(), whole);

    assert_eq!(Hello::decode(&whole[0].body).unwrap(), hello());
    let msgs: Vec<Message> = whole[1..]
        .iter()
        .flat_map(|f| decode_messages(&f.body).unwrap())
        .collect();
    assert_eq!(msgs, every_variant());
}

#[test]
fn every_truncation_waits_then_is_truncated_at_eof() {
    let stream = raft_frame(&every_variant());
    let dec = FrameDecoder::default();
    for len in 1..stream.len() {
        let mut buf = BytesMut::from(&stream[..len]);
        assert_eq!(dec.decode(&mut buf), Ok(None), "prefix of {len}");
        assert_eq!(buf.len(), len, "a waiting decoder consumes nothing");
        assert!(
            matches!(dec.decode_eof(&mut buf), Err(WireError::Truncated { .. })),
            "prefix of {len}"
        );
    }
    assert_eq!(dec.decode_eof(&mut BytesMut::new()), Ok(None));
}

#[test]
fn missing_counts_what_the_front_frame_still_lacks() {
    let stream = stream();
    let dec = FrameDecoder::default();
    let first_len = dec
        .decode(&mut BytesMut::from(&stream[..]))
        .unwrap()
        .map(|f| FRAME_HEADER_LEN + f.body.len())
        .unwrap();
    for len in 0..=stream.len() {
        let want = if len < FRAME_HEADER_LEN {
            0
        } else {
            first_len.saturating_sub(len)
        };
        assert_eq!(dec.missing(&stream[..len]), Ok(want), "prefix of {len}");
    }
    // The same refusals as decode, from the header alone.
    let small = FrameDecoder::new(1024);
    let over = header_bytes(FrameType::Raft as u8, 1024);
    assert_eq!(
        small.missing(&over),
        Err(WireError::TooLarge {
            len: 1024 + FRAME_HEADER_LEN,
            max: 1024
        })
    );
    let mut bad = header_bytes(FrameType::Raft as u8, 8);
    bad[0] ^= 0xFF;
    assert_eq!(
        dec.missing(&bad),
        dec.decode(&mut BytesMut::from(&bad[..])).map(|_| 0)
    );
}

// ---------------------------------------------------------------------------
// Bad input: headers, bounds, checksums.

fn header_bytes(ty: u8, body_len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut h = FrameHeader {
        ty: FrameType::Raft,
        flags: 0,
        body_len,
        crc: 0,
    }
    .encode();
    h[5] = ty;
    h
}

#[test]
fn bad_headers_are_refused_from_the_header_alone() {
    let dec = FrameDecoder::default();
    let good = header_bytes(FrameType::Raft as u8, 10);
    let cases: Vec<([u8; FRAME_HEADER_LEN], WireError)> = vec![
        (
            {
                let mut h = good;
                h[0..4].copy_from_slice(b"GET ");
                h
            },
            WireError::BadMagic { found: *b"GET " },
        ),
        (
            {
                let mut h = good;
                h[4] = FRAME_VERSION + 1;
                h
            },
            WireError::UnsupportedVersion {
                version: FRAME_VERSION + 1,
            },
        ),
        (header_bytes(0, 10), WireError::UnknownType { ty: 0 }),
        (header_bytes(6, 10), WireError::UnknownType { ty: 6 }),
        (header_bytes(255, 10), WireError::UnknownType { ty: 255 }),
        (
            {
                let mut h = good;
                h[6] = 1;
                h
            },
            WireError::Malformed {
                what: "unknown frame flags",
            },
        ),
        ([0; FRAME_HEADER_LEN], WireError::BadMagic { found: [0; 4] }),
    ];
    for (h, want) in cases {
        // Only the header has arrived: the error comes without the body.
        let mut buf = BytesMut::from(&h[..]);
        assert_eq!(dec.decode(&mut buf), Err(want.clone()));
        assert_eq!(buf.len(), FRAME_HEADER_LEN, "an error consumes nothing");
    }
    let mut buf = BytesMut::from(&good[..]);
    assert_eq!(
        dec.decode(&mut buf),
        Ok(None),
        "a good header waits for its body"
    );
}

#[test]
fn every_frame_type_number_is_what_the_layout_says() {
    for (n, ty) in [
        (1, FrameType::Hello),
        (2, FrameType::Raft),
        (3, FrameType::SnapshotChunk),
        (4, FrameType::SnapshotRequest),
        (5, FrameType::SnapshotAck),
    ] {
        assert_eq!(ty as u8, n);
        assert_eq!(FrameType::from_u8(n), Some(ty));
    }
    assert_eq!(FrameType::from_u8(0), None);
    assert_eq!(FrameType::from_u8(6), None);
}

#[test]
fn an_oversized_length_is_refused_before_the_body_arrives() {
    let max = 1024;
    let dec = FrameDecoder::new(max);
    let body_max = (max - FRAME_HEADER_LEN) as u32;

    // One byte over: refused with only the header buffered, and nothing
    // reserved for the body.
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN);
    buf.put_slice(&header_bytes(FrameType::Raft as u8, body_max + 1));
    assert_eq!(
        dec.decode(&mut buf),
        Err(WireError::TooLarge { len: max + 1, max })
    );
    assert!(buf.capacity() < max, "room was reserved for a refused body");

    // The largest length a 32-bit field can claim, against the default bound.
    let mut buf = BytesMut::from(&header_bytes(FrameType::Raft as u8, u32::MAX)[..]);
    assert_eq!(
        FrameDecoder::default().decode(&mut buf),
        Err(WireError::TooLarge {
            len: FRAME_HEADER_LEN + u32::MAX as usize,
            max: DEFAULT_FRAME_BYTES_MAX
        })
    );

    // Exactly at the bound: waits for its body.
    let mut buf = BytesMut::from(&header_bytes(FrameType::Raft as u8, body_max)[..]);
    assert_eq!(dec.decode(&mut buf), Ok(None));
}

#[test]
fn the_encoder_refuses_a_batch_over_the_bound_and_writes_nothing() {
    let msgs = every_variant();
    let frame_len = FRAME_HEADER_LEN + raft_body_len(&msgs);
    let mut buf = BytesMut::from(&b"earlier frames"[..]);

    let tight = FrameEncoder::new(frame_len - 1);
    assert_eq!(
        encode_raft_frame(&tight, &msgs, &mut buf),
        Err(WireError::TooLarge {
            len: frame_len,
            max: frame_len - 1
        })
    );
    assert_eq!(&buf[..], b"earlier frames");

    let exact = FrameEncoder::new(frame_len);
    assert_eq!(encode_raft_frame(&exact, &msgs, &mut buf), Ok(frame_len));
    // And a decoder with the same bound takes it.
    buf.advance(b"earlier frames".len());
    let frame = FrameDecoder::new(frame_len)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(decode_messages(&frame.body).unwrap(), msgs);
}

#[test]
fn every_single_bit_flip_is_caught() {
    let frame = raft_frame(&every_variant());
    let dec = FrameDecoder::default();
    for bit in 0..frame.len() * 8 {
        let mut bytes = frame.to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let mut buf = BytesMut::from(&bytes[..]);
        match dec.decode(&mut buf) {
            Err(_) => {}
            // The length grew: the frame looks incomplete until the
            // stream ends.
            Ok(None) => assert!(
                matches!(dec.decode_eof(&mut buf), Err(WireError::Truncated { .. })),
                "bit {bit}"
            ),
            Ok(Some(_)) => panic!("flipped bit {bit} decoded as a frame"),
        }
    }
}

#[test]
fn a_checksum_mismatch_names_both_values() {
    let mut buf = raft_frame(&every_variant());
    let last = buf.len() - 1;
    buf[last] ^= 0x40;
    assert!(matches!(
        FrameDecoder::default().decode(&mut buf),
        Err(WireError::Checksum { expected, actual }) if expected != actual
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes: never a panic; they almost never even pass the magic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (frames, _) = drain(&FrameDecoder::default(), &bytes);
        frames.iter().for_each(decode_any);
    }

    /// Random bytes behind a plausible header: they get as far as the
    /// checksum, and stop there.
    #[test]
    fn random_bodies_behind_a_plausible_header_are_refused(
        ty in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..512),
        slack in 0u32..4,
    ) {
        let mut bytes = header_bytes(ty, body.len() as u32 + slack).to_vec();
        bytes.extend_from_slice(&body);
        let (frames, end) = drain(&FrameDecoder::default(), &bytes);
        prop_assert!(frames.is_empty());
        prop_assert!(end.is_err());
    }

    /// A valid frame with one bit flipped anywhere, fed in two pieces, never
    /// decodes.
    #[test]
    fn bit_flipped_frames_never_decode(
        msgs in batch(),
        bit in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = raft_frame(&msgs).to_vec();
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let cut = cut.index(bytes.len() + 1);
        prop_assert!(decode_in_pieces(&bytes, &[cut]).is_err());
    }

    /// Truncated streams of random batches: nothing decodes past the cut,
    /// and the end of the stream reports the truncation.
    #[test]
    fn truncated_frames_report_truncation(msgs in batch(), len in any::<prop::sample::Index>()) {
        let bytes = raft_frame(&msgs);
        let len = len.index(bytes.len());
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..len]);
        prop_assert_eq!(dec.decode(&mut buf), Ok(None));
        let eof = dec.decode_eof(&mut buf);
        if len == 0 {
            prop_assert_eq!(eof, Ok(None));
        } else {
            let truncated = matches!(eof, Err(WireError::Truncated { .. }));
            prop_assert!(truncated, "{:?}", eof);
        }
    }
}
