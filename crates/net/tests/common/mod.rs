//! What the wire-format tests share: one message of every kind, proptest
//! strategies for arbitrary messages, and helpers that drive a decoder the
//! way a connection does.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use skiff_net::{
    decode_messages, encode_hello_frame, encode_raft_frame, Channel, Frame, FrameDecoder,
    FrameEncoder, FrameType, Hello, WireError,
};
use skiff_raft::{Entry, Membership, Message, MessageBody, Payload, RejectHint};

// ---------------------------------------------------------------------------
// Helpers.

/// Which `MessageBody` variant, by number. Exhaustive on purpose: a new
/// variant fails to compile here until the tests (and the codec) cover it.
pub fn variant(body: &MessageBody) -> usize {
    match body {
        MessageBody::PreVote { .. } => 0,
        MessageBody::PreVoteResponse { .. } => 1,
        MessageBody::Vote { .. } => 2,
        MessageBody::VoteResponse { .. } => 3,
        MessageBody::Append { .. } => 4,
        MessageBody::AppendResponse { .. } => 5,
        MessageBody::Heartbeat { .. } => 6,
        MessageBody::HeartbeatResponse { .. } => 7,
        MessageBody::ReadIndex { .. } => 8,
        MessageBody::ReadIndexResponse { .. } => 9,
        MessageBody::TimeoutNow => 10,
        MessageBody::InstallSnapshot { .. } => 11,
        MessageBody::Propose { .. } => 12,
        MessageBody::ProposeRefused { .. } => 13,
        MessageBody::Removed => 14,
    }
}
pub const VARIANTS: usize = 15;

/// Which `Payload` variant, by number (exhaustive, as above).
pub fn payload_kind(p: &Payload) -> usize {
    match p {
        Payload::Noop => 0,
        Payload::Normal(_) => 1,
        Payload::Membership(_) => 2,
    }
}
pub const PAYLOAD_KINDS: usize = 3;

pub fn membership_example() -> Membership {
    Membership {
        voters: BTreeSet::from([1, 2, 3]),
        outgoing: BTreeSet::from([4]),
        learners: BTreeSet::from([9, u64::MAX]),
        meta: BTreeMap::from([
            (1, Bytes::from_static(b"name=a;peer=http://127.0.0.1:1")),
            (u64::MAX, Bytes::new()),
        ]),
    }
}

/// One message of every kind, with the optional parts both present and
/// absent, and every payload kind (empty payloads included).
pub fn every_variant() -> Vec<Message> {
    let m = |body| Message {
        from: 1,
        to: 2,
        term: 7,
        body,
    };
    vec![
        m(MessageBody::PreVote {
            last_index: 10,
            last_term: 3,
        }),
        m(MessageBody::PreVoteResponse { granted: true }),
        m(MessageBody::Vote {
            last_index: 10,
            last_term: 3,
            transfer: true,
        }),
        m(MessageBody::VoteResponse { granted: false }),
        m(MessageBody::Append {
            prev_index: 9,
            prev_term: 3,
            entries: vec![
                Entry {
                    index: 10,
                    term: 3,
                    payload: Payload::Noop,
                },
                Entry {
                    index: 11,
                    term: 7,
                    payload: Payload::Normal(Bytes::from_static(b"put k v")),
                },
                Entry {
                    index: 12,
                    term: 7,
                    payload: Payload::Normal(Bytes::new()),
                },
                Entry {
                    index: 13,
                    term: 7,
                    payload: Payload::Membership(membership_example()),
                },
                Entry {
                    index: 14,
                    term: 7,
                    payload: Payload::Membership(Membership::default()),
                },
            ],
            commit: 8,
        }),
        m(MessageBody::Append {
            prev_index: 14,
            prev_term: 7,
            entries: vec![],
            commit: 14,
        }),
        m(MessageBody::AppendResponse {
            success: true,
            match_index: 13,
            reject: None,
        }),
        m(MessageBody::AppendResponse {
            success: false,
            match_index: 0,
            reject: Some(RejectHint {
                rejected: 9,
                conflict_term: Some(2),
                conflict_index: 5,
            }),
        }),
        m(MessageBody::AppendResponse {
            success: false,
            match_index: 0,
            reject: Some(RejectHint {
                rejected: 9,
                conflict_term: None,
                conflict_index: 4,
            }),
        }),
        m(MessageBody::Heartbeat {
            commit: 13,
            round: 42,
        }),
        m(MessageBody::HeartbeatResponse { round: 42 }),
        m(MessageBody::ReadIndex { ctx: 5 }),
        m(MessageBody::ReadIndexResponse {
            ctx: 5,
            index: Some(13),
        }),
        m(MessageBody::ReadIndexResponse {
            ctx: 6,
            index: None,
        }),
        m(MessageBody::TimeoutNow),
        m(MessageBody::Removed),
        m(MessageBody::Propose {
            ctx: 77,
            commands: vec![Bytes::from_static(b"put k v"), Bytes::new()],
        }),
        m(MessageBody::Propose {
            ctx: 78,
            commands: Vec::new(),
        }),
        m(MessageBody::ProposeRefused { ctx: 77 }),
        m(MessageBody::InstallSnapshot {
            index: 100,
            snapshot_term: 6,
            membership: membership_example(),
            data: Bytes::from(vec![0xAB; 300]),
        }),
        Message {
            from: u64::MAX,
            to: 0,
            term: u64::MAX,
            body: MessageBody::Heartbeat {
                commit: u64::MAX,
                round: u64::MAX,
            },
        },
    ]
}

pub fn raft_frame(msgs: &[Message]) -> BytesMut {
    let mut buf = BytesMut::new();
    let len = encode_raft_frame(&FrameEncoder::default(), msgs, &mut buf).unwrap();
    assert_eq!(len, buf.len());
    buf
}

pub fn hello() -> Hello {
    Hello {
        cluster_id: 0x5eed,
        from: 3,
        to: 1,
        channel: Channel::Raft,
    }
}

/// A stream of several frames: a Hello, every message kind, an empty batch.
pub fn stream() -> Vec<u8> {
    let enc = FrameEncoder::default();
    let mut buf = BytesMut::new();
    encode_hello_frame(&enc, &hello(), &mut buf).unwrap();
    let msgs = every_variant();
    encode_raft_frame(&enc, &msgs[..6], &mut buf).unwrap();
    encode_raft_frame(&enc, &msgs[6..], &mut buf).unwrap();
    encode_raft_frame(&enc, &[], &mut buf).unwrap();
    buf.to_vec()
}

/// Feeds `stream` to a decoder in pieces ending at `cuts` (sorted), taking
/// every frame as soon as it is complete, then ends the stream.
pub fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, WireError> {
    let dec = FrameDecoder::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([&stream.len()]) {
        buf.extend_from_slice(&stream[at..cut]);
        at = cut;
        while let Some(frame) = dec.decode(&mut buf)? {
            frames.push(frame);
        }
    }
    assert_eq!(dec.decode_eof(&mut buf)?, None);
    Ok(frames)
}

/// Decodes `stream` fed whole; what a decoder makes of it at any cut must
/// be the same.
pub fn decode_whole(stream: &[u8]) -> Result<Vec<Frame>, WireError> {
    decode_in_pieces(stream, &[])
}

/// Runs the decoder over `bytes` until it stops, as a connection would.
/// Returns the frames it accepted and how it stopped.
pub fn drain(dec: &FrameDecoder, bytes: &[u8]) -> (Vec<Frame>, Result<(), WireError>) {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match dec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, Ok(())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// Everything the codec can be asked to decode, decoded, never panicking.
pub fn decode_any(frame: &Frame) {
    match frame.ty {
        FrameType::Raft => drop(decode_messages(&frame.body)),
        FrameType::Hello => drop(Hello::decode(&frame.body)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Strategies.

pub fn node_id() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..8, 1 => any::<u64>()]
}

pub fn ids() -> impl Strategy<Value = BTreeSet<u64>> {
    proptest::collection::btree_set(node_id(), 0..6)
}

pub fn membership() -> impl Strategy<Value = Membership> {
    (
        ids(),
        ids(),
        ids(),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
    )
        .prop_map(|(voters, outgoing, learners, metas)| {
            let meta = voters
                .iter()
                .filter(|id| **id != 0)
                .zip(metas)
                .map(|(id, m)| (*id, Bytes::from(m)))
                .collect();
            Membership {
                voters,
                outgoing,
                learners,
                meta,
            }
        })
}

/// Payload bytes: often empty, mostly small, sometimes large. Large ones
/// are a pattern from a seed so that generating them stays cheap.
pub fn data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        2 => Just(Bytes::new()),
        8 => proptest::collection::vec(any::<u8>(), 0..160).prop_map(Bytes::from),
        1 => (1usize..300_000, any::<u8>()).prop_map(|(len, seed)| {
            Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect::<Vec<u8>>())
        }),
    ]
}

pub fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        1 => Just(Payload::Noop),
        6 => data().prop_map(Payload::Normal),
        1 => membership().prop_map(Payload::Membership),
    ]
}

pub fn entry() -> impl Strategy<Value = Entry> {
    (any::<u64>(), any::<u64>(), payload()).prop_map(|(index, term, payload)| Entry {
        index,
        term,
        payload,
    })
}

pub fn reject_hint() -> impl Strategy<Value = RejectHint> {
    (
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        any::<u64>(),
    )
        .prop_map(|(rejected, conflict_term, conflict_index)| RejectHint {
            rejected,
            conflict_term,
            conflict_index,
        })
}

pub fn body() -> impl Strategy<Value = MessageBody> {
    let u = any::<u64>;
    prop_oneof![
        (u(), u()).prop_map(|(last_index, last_term)| MessageBody::PreVote {
            last_index,
            last_term
        }),
        any::<bool>().prop_map(|granted| MessageBody::PreVoteResponse { granted }),
        (u(), u(), any::<bool>()).prop_map(|(last_index, last_term, transfer)| {
            MessageBody::Vote {
                last_index,
                last_term,
                transfer,
            }
        }),
        any::<bool>().prop_map(|granted| MessageBody::VoteResponse { granted }),
        (u(), u(), proptest::collection::vec(entry(), 0..8), u()).prop_map(
            |(prev_index, prev_term, entries, commit)| MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            }
        ),
        (any::<bool>(), u(), proptest::option::of(reject_hint())).prop_map(
            |(success, match_index, reject)| MessageBody::AppendResponse {
                success,
                match_index,
                reject,
            }
        ),
        (u(), u()).prop_map(|(commit, round)| MessageBody::Heartbeat { commit, round }),
        u().prop_map(|round| MessageBody::HeartbeatResponse { round }),
        u().prop_map(|ctx| MessageBody::ReadIndex { ctx }),
        (u(), proptest::option::of(u()))
            .prop_map(|(ctx, index)| MessageBody::ReadIndexResponse { ctx, index }),
        Just(MessageBody::TimeoutNow),
        Just(MessageBody::Removed),
        (u(), proptest::collection::vec(data(), 0..6))
            .prop_map(|(ctx, commands)| MessageBody::Propose { ctx, commands }),
        u().prop_map(|ctx| MessageBody::ProposeRefused { ctx }),
        (u(), u(), membership(), data()).prop_map(|(index, snapshot_term, membership, data)| {
            MessageBody::InstallSnapshot {
                index,
                snapshot_term,
                membership,
                data,
            }
        }),
    ]
}

pub fn message() -> impl Strategy<Value = Message> {
    (node_id(), node_id(), any::<u64>(), body()).prop_map(|(from, to, term, body)| Message {
        from,
        to,
        term,
        body,
    })
}

pub fn batch() -> impl Strategy<Value = Vec<Message>> {
    proptest::collection::vec(message(), 0..6)
}

/// The body of the Raft frame carrying `msgs`.
pub fn raft_body(msgs: &[Message]) -> Bytes {
    let mut buf = raft_frame(msgs);
    FrameDecoder::default()
        .decode(&mut buf)
        .unwrap()
        .unwrap()
        .body
}
