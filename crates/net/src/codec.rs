//! The bodies of [`FrameType::Raft`] and [`FrameType::Hello`] frames.
//!
//! This module owns the byte layout of a batch of [`skiff_raft::Message`]s
//! (every message kind, every payload kind) and of the handshake. All
//! integers are little-endian, fixed width; a `bool` is one byte, 0 or 1;
//! an `opt<T>` is a byte 0 (absent) or 1 followed by `T`.
//!
//! ```text
//! Raft body:  | count u32 | count × message |
//!
//! message:    | tag u8 | from u64 | to u64 | term u64 | fields by tag |
//!
//!  tag  MessageBody         fields
//!   1   PreVote             | last_index u64 | last_term u64 |
//!   2   PreVoteResponse     | granted bool |
//!   3   Vote                | last_index u64 | last_term u64 | transfer bool |
//!   4   VoteResponse        | granted bool |
//!   5   Append              | prev_index u64 | prev_term u64 | commit u64 | count u32 | count × entry |
//!   6   AppendResponse      | success bool | match_index u64 | reject opt<hint> |
//!   7   Heartbeat           | commit u64 | round u64 |
//!   8   HeartbeatResponse   | round u64 |
//!   9   ReadIndex           | ctx u64 |
//!  10   ReadIndexResponse   | ctx u64 | index opt<u64> |
//!  11   TimeoutNow          (no fields)
//!  12   InstallSnapshot     | index u64 | snapshot_term u64 | membership | len u32 | data[len] |
//!  13   Propose             | ctx u64 | count u32 | count × (len u32 | data[len]) |
//!  14   ProposeRefused      | ctx u64 |
//!  15   Removed             (no fields)
//!
//! entry:      | index u64 | term u64 | kind u8 | payload by kind |
//!               kind 1 Noop:        (nothing)
//!               kind 2 Normal:      | len u32 | data[len] |
//!               kind 3 Membership:  | membership |
//! membership: | n u32 | n × voter u64 | n u32 | n × outgoing u64 | n u32 | n × learner u64 |
//!             | n u32 | n × (id u64 | len u32 | meta[len]) |
//!               (each list strictly increasing, as a BTreeSet iterates;
//!               meta only of members, each at most MEMBER_META_BYTES_MAX)
//! hint:       | rejected u64 | conflict_term opt<u64> | conflict_index u64 |
//!
//! Hello body: | cluster_id u64 | from u64 | to u64 | channel u8 |
//! ```
//!
//! Tag and kind 0 are never used, so that zeroed bytes do not decode.
//! Each entry carries its own index: the codec encodes any `Message`
//! faithfully and relies on no Raft rule (such as consecutive indexes).
//!
//! Decoding is zero copy for payloads: `data` of a `Normal` entry and of an
//! `InstallSnapshot` are [`Bytes::slice`]s of the frame body, which is itself
//! a slice of the receive buffer.
//!
//! This module must never judge what a message means (terms, indexes and
//! memberships are checked for shape only), never do I/O, never panic on a
//! body, and never allocate for a count before checking that the bytes left
//! can hold that many items.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};
use skiff_raft::{Entry, Membership, Message, MessageBody, NodeId, Payload, RejectHint};

use crate::frame::{FrameEncoder, FrameType};
use crate::WireError;

/// Bytes of a Raft body before its messages (the count).
pub const RAFT_BODY_PREFIX_LEN: usize = 4;
/// Bytes of a Hello body.
pub const HELLO_BODY_LEN: usize = 25;

/// Tag, from, to, term: the smallest message (`TimeoutNow`).
const MESSAGE_LEN_MIN: usize = 1 + 8 + 8 + 8;
/// Index, term, kind: the smallest entry (`Noop`).
const ENTRY_LEN_MIN: usize = 8 + 8 + 1;
/// Three empty id lists.
const MEMBERSHIP_LEN_MIN: usize = 4 * 4;
/// Bytes of one member's meta accepted when decoding (the host's
/// addresses and name; a larger length means corrupt bytes).
pub const MEMBER_META_BYTES_MAX: usize = 4096;
const NODE_ID_LEN: usize = 8;

/// Message tags on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    PreVote = 1,
    PreVoteResponse = 2,
    Vote = 3,
    VoteResponse = 4,
    Append = 5,
    AppendResponse = 6,
    Heartbeat = 7,
    HeartbeatResponse = 8,
    ReadIndex = 9,
    ReadIndexResponse = 10,
    TimeoutNow = 11,
    InstallSnapshot = 12,
    Propose = 13,
    ProposeRefused = 14,
    Removed = 15,
}

impl Tag {
    fn of(body: &MessageBody) -> Tag {
        match body {
            MessageBody::PreVote { .. } => Tag::PreVote,
            MessageBody::PreVoteResponse { .. } => Tag::PreVoteResponse,
            MessageBody::Vote { .. } => Tag::Vote,
            MessageBody::VoteResponse { .. } => Tag::VoteResponse,
            MessageBody::Append { .. } => Tag::Append,
            MessageBody::AppendResponse { .. } => Tag::AppendResponse,
            MessageBody::Heartbeat { .. } => Tag::Heartbeat,
            MessageBody::HeartbeatResponse { .. } => Tag::HeartbeatResponse,
            MessageBody::ReadIndex { .. } => Tag::ReadIndex,
            MessageBody::ReadIndexResponse { .. } => Tag::ReadIndexResponse,
            MessageBody::TimeoutNow => Tag::TimeoutNow,
            MessageBody::InstallSnapshot { .. } => Tag::InstallSnapshot,
            MessageBody::Propose { .. } => Tag::Propose,
            MessageBody::ProposeRefused { .. } => Tag::ProposeRefused,
            MessageBody::Removed => Tag::Removed,
        }
    }

    fn from_u8(v: u8) -> Option<Tag> {
        Some(match v {
            1 => Tag::PreVote,
            2 => Tag::PreVoteResponse,
            3 => Tag::Vote,
            4 => Tag::VoteResponse,
            5 => Tag::Append,
            6 => Tag::AppendResponse,
            7 => Tag::Heartbeat,
            8 => Tag::HeartbeatResponse,
            9 => Tag::ReadIndex,
            10 => Tag::ReadIndexResponse,
            11 => Tag::TimeoutNow,
            12 => Tag::InstallSnapshot,
            13 => Tag::Propose,
            14 => Tag::ProposeRefused,
            15 => Tag::Removed,
            _ => return None,
        })
    }
}

/// Entry payload kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Noop = 1,
    Normal = 2,
    Membership = 3,
}

impl Kind {
    fn of(payload: &Payload) -> Kind {
        match payload {
            Payload::Noop => Kind::Noop,
            Payload::Normal(_) => Kind::Normal,
            Payload::Membership(_) => Kind::Membership,
        }
    }

    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Noop,
            2 => Kind::Normal,
            3 => Kind::Membership,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------
// Lengths. Each `*_len` mirrors its `put_*` below; `encode_raft_frame`
// asserts that they agree.

/// Bytes `msg` takes in a Raft body. A writer coalescing messages bounds a
/// frame with it: the frame of messages `ms` is [`crate::FRAME_HEADER_LEN`] +
/// [`RAFT_BODY_PREFIX_LEN`] + the sum of their lengths.
pub fn message_encoded_len(msg: &Message) -> usize {
    MESSAGE_LEN_MIN
        + match &msg.body {
            MessageBody::PreVote { .. } => 16,
            MessageBody::PreVoteResponse { .. } => 1,
            MessageBody::Vote { .. } => 17,
            MessageBody::VoteResponse { .. } => 1,
            MessageBody::Append { entries, .. } => {
                28 + entries.iter().map(entry_len).sum::<usize>()
            }
            MessageBody::AppendResponse { reject, .. } => 9 + opt_len(reject.as_ref(), hint_len),
            MessageBody::Heartbeat { .. } => 16,
            MessageBody::HeartbeatResponse { .. } => 8,
            MessageBody::ReadIndex { .. } => 8,
            MessageBody::ReadIndexResponse { index, .. } => 8 + opt_len(index.as_ref(), |_| 8),
            MessageBody::TimeoutNow | MessageBody::Removed => 0,
            MessageBody::InstallSnapshot {
                membership, data, ..
            } => 16 + membership_len(membership) + 4 + data.len(),
            MessageBody::Propose { commands, .. } => {
                12 + commands.iter().map(|c| 4 + c.len()).sum::<usize>()
            }
            MessageBody::ProposeRefused { .. } => 8,
        }
}

/// Bytes of the body of a Raft frame carrying `msgs`.
pub fn raft_body_len(msgs: &[Message]) -> usize {
    RAFT_BODY_PREFIX_LEN + msgs.iter().map(message_encoded_len).sum::<usize>()
}

fn entry_len(e: &Entry) -> usize {
    ENTRY_LEN_MIN
        + match &e.payload {
            Payload::Noop => 0,
            Payload::Normal(data) => 4 + data.len(),
            Payload::Membership(m) => membership_len(m),
        }
}

fn membership_len(m: &Membership) -> usize {
    MEMBERSHIP_LEN_MIN
        + NODE_ID_LEN * (m.voters.len() + m.outgoing.len() + m.learners.len())
        + m.meta
            .values()
            .map(|b| NODE_ID_LEN + 4 + b.len())
            .sum::<usize>()
}

fn hint_len(h: &RejectHint) -> usize {
    8 + opt_len(h.conflict_term.as_ref(), |_| 8) + 8
}

fn opt_len<T>(v: Option<&T>, len: impl FnOnce(&T) -> usize) -> usize {
    1 + v.map_or(0, len)
}

// ---------------------------------------------------------------------------
// Encoding.

/// Appends one Raft frame carrying `msgs`, in order, to `dst`; returns the
/// frame's length. A batch over the encoder's `frame_bytes_max` is
/// [`WireError::TooLarge`] and leaves `dst` unchanged: the writer should
/// have bounded it with [`message_encoded_len`] (a single message over the
/// bound cannot be sent at all).
pub fn encode_raft_frame(
    enc: &FrameEncoder,
    msgs: &[Message],
    dst: &mut BytesMut,
) -> Result<usize, WireError> {
    encode_raft_frame_sized(enc, msgs, raft_body_len(msgs), dst)
}

/// [`encode_raft_frame`] for a caller that summed the messages' lengths
/// already (the writer, as it takes them from the queue): `body_len` must
/// be [`raft_body_len`] of `msgs`.
pub(crate) fn encode_raft_frame_sized(
    enc: &FrameEncoder,
    msgs: &[Message],
    body_len: usize,
    dst: &mut BytesMut,
) -> Result<usize, WireError> {
    debug_assert_eq!(body_len, raft_body_len(msgs));
    enc.encode_with(dst, FrameType::Raft, body_len, |dst| {
        put_len(dst, msgs.len());
        for m in msgs {
            put_message(dst, m);
        }
    })
}

/// Writes a count or a length. The frame's body length was checked to fit
/// a `u32` before any body was written, so every count and length inside
/// it does.
fn put_len(dst: &mut BytesMut, n: usize) {
    let n = u32::try_from(n).expect("inside a frame body, whose length fits a u32");
    dst.put_u32_le(n);
}

fn put_bool(dst: &mut BytesMut, b: bool) {
    dst.put_u8(u8::from(b));
}

fn put_opt_u64(dst: &mut BytesMut, v: Option<u64>) {
    match v {
        None => dst.put_u8(0),
        Some(v) => {
            dst.put_u8(1);
            dst.put_u64_le(v);
        }
    }
}

fn put_message(dst: &mut BytesMut, m: &Message) {
    dst.put_u8(Tag::of(&m.body) as u8);
    dst.put_u64_le(m.from);
    dst.put_u64_le(m.to);
    dst.put_u64_le(m.term);
    match &m.body {
        MessageBody::PreVote {
            last_index,
            last_term,
        } => {
            dst.put_u64_le(*last_index);
            dst.put_u64_le(*last_term);
        }
        MessageBody::PreVoteResponse { granted } | MessageBody::VoteResponse { granted } => {
            put_bool(dst, *granted);
        }
        MessageBody::Vote {
            last_index,
            last_term,
            transfer,
        } => {
            dst.put_u64_le(*last_index);
            dst.put_u64_le(*last_term);
            put_bool(dst, *transfer);
        }
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => {
            dst.put_u64_le(*prev_index);
            dst.put_u64_le(*prev_term);
            dst.put_u64_le(*commit);
            put_len(dst, entries.len());
            for e in entries {
                put_entry(dst, e);
            }
        }
        MessageBody::AppendResponse {
            success,
            match_index,
            reject,
        } => {
            put_bool(dst, *success);
            dst.put_u64_le(*match_index);
            match reject {
                None => dst.put_u8(0),
                Some(h) => {
                    dst.put_u8(1);
                    dst.put_u64_le(h.rejected);
                    put_opt_u64(dst, h.conflict_term);
                    dst.put_u64_le(h.conflict_index);
                }
            }
        }
        MessageBody::Heartbeat { commit, round } => {
            dst.put_u64_le(*commit);
            dst.put_u64_le(*round);
        }
        MessageBody::HeartbeatResponse { round } => dst.put_u64_le(*round),
        MessageBody::ReadIndex { ctx } => dst.put_u64_le(*ctx),
        MessageBody::ReadIndexResponse { ctx, index } => {
            dst.put_u64_le(*ctx);
            put_opt_u64(dst, *index);
        }
        MessageBody::TimeoutNow | MessageBody::Removed => {}
        MessageBody::InstallSnapshot {
            index,
            snapshot_term,
            membership,
            data,
        } => {
            dst.put_u64_le(*index);
            dst.put_u64_le(*snapshot_term);
            put_membership(dst, membership);
            put_len(dst, data.len());
            dst.put_slice(data);
        }
        MessageBody::Propose { ctx, commands } => {
            dst.put_u64_le(*ctx);
            put_len(dst, commands.len());
            for c in commands {
                put_len(dst, c.len());
                dst.put_slice(c);
            }
        }
        MessageBody::ProposeRefused { ctx } => dst.put_u64_le(*ctx),
    }
}

fn put_entry(dst: &mut BytesMut, e: &Entry) {
    dst.put_u64_le(e.index);
    dst.put_u64_le(e.term);
    dst.put_u8(Kind::of(&e.payload) as u8);
    match &e.payload {
        Payload::Noop => {}
        Payload::Normal(data) => {
            put_len(dst, data.len());
            dst.put_slice(data);
        }
        Payload::Membership(m) => put_membership(dst, m),
    }
}

fn put_membership(dst: &mut BytesMut, m: &Membership) {
    for ids in [&m.voters, &m.outgoing, &m.learners] {
        put_len(dst, ids.len());
        for id in ids {
            dst.put_u64_le(*id);
        }
    }
    put_len(dst, m.meta.len());
    for (id, meta) in &m.meta {
        dst.put_u64_le(*id);
        put_len(dst, meta.len());
        dst.put_slice(meta);
    }
}

// ---------------------------------------------------------------------------
// Decoding.

/// Decodes the body of a Raft frame into its messages, in order. `Normal`
/// payloads and snapshot data are slices of `body` (no copy).
pub fn decode_messages(body: &Bytes) -> Result<Vec<Message>, WireError> {
    let mut r = Reader { body, pos: 0 };
    let count = r.count(MESSAGE_LEN_MIN, "the message count")?;
    let mut msgs = Vec::with_capacity(count);
    for _ in 0..count {
        msgs.push(read_message(&mut r)?);
    }
    r.finish("bytes after the last message")?;
    Ok(msgs)
}

/// A cursor over a frame body; every read is bounds-checked.
struct Reader<'a> {
    body: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated { what });
        }
        let body: &'a Bytes = self.body;
        let s = &body[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed {
                what: "a bool that is neither 0 nor 1",
            }),
        }
    }

    fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, WireError> {
        if self.present(what)? {
            Ok(Some(self.u64(what)?))
        } else {
            Ok(None)
        }
    }

    /// Reads an `opt<T>` presence byte.
    fn present(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed {
                what: "an option marker that is neither 0 nor 1",
            }),
        }
    }

    /// Reads a count of items of at least `item_len_min` bytes each, and
    /// refuses it unless the bytes left can hold that many: what is then
    /// allocated for them is bounded by the body's size, whatever the count
    /// says.
    fn count(&mut self, item_len_min: usize, what: &'static str) -> Result<usize, WireError> {
        debug_assert!(item_len_min > 0);
        let n = self.u32(what)?;
        let n = usize::try_from(n).map_err(|_| WireError::Truncated { what })?;
        if n > self.remaining() / item_len_min {
            return Err(WireError::Truncated { what });
        }
        Ok(n)
    }

    /// Reads `len u32 | data[len]` as a slice of the body (no copy).
    fn bytes(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| WireError::Truncated { what })?;
        if len > self.remaining() {
            return Err(WireError::Truncated { what });
        }
        let data = self.body.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(data)
    }

    /// Refuses bytes left over after the last item.
    fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(WireError::Malformed { what });
        }
        Ok(())
    }
}

fn read_message(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let tag = r.u8("a message tag")?;
    let tag = Tag::from_u8(tag).ok_or(WireError::UnknownTag {
        what: "message",
        tag,
    })?;
    let from = r.u64("a message header")?;
    let to = r.u64("a message header")?;
    let term = r.u64("a message header")?;
    let body = match tag {
        Tag::PreVote => MessageBody::PreVote {
            last_index: r.u64("PreVote")?,
            last_term: r.u64("PreVote")?,
        },
        Tag::PreVoteResponse => MessageBody::PreVoteResponse {
            granted: r.bool("PreVoteResponse")?,
        },
        Tag::Vote => MessageBody::Vote {
            last_index: r.u64("Vote")?,
            last_term: r.u64("Vote")?,
            transfer: r.bool("Vote")?,
        },
        Tag::VoteResponse => MessageBody::VoteResponse {
            granted: r.bool("VoteResponse")?,
        },
        Tag::Append => {
            let prev_index = r.u64("Append")?;
            let prev_term = r.u64("Append")?;
            let commit = r.u64("Append")?;
            let count = r.count(ENTRY_LEN_MIN, "the entry count of an Append")?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(read_entry(r)?);
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            }
        }
        Tag::AppendResponse => {
            let success = r.bool("AppendResponse")?;
            let match_index = r.u64("AppendResponse")?;
            let reject = if r.present("AppendResponse")? {
                Some(RejectHint {
                    rejected: r.u64("a reject hint")?,
                    conflict_term: r.opt_u64("a reject hint")?,
                    conflict_index: r.u64("a reject hint")?,
                })
            } else {
                None
            };
            MessageBody::AppendResponse {
                success,
                match_index,
                reject,
            }
        }
        Tag::Heartbeat => MessageBody::Heartbeat {
            commit: r.u64("Heartbeat")?,
            round: r.u64("Heartbeat")?,
        },
        Tag::HeartbeatResponse => MessageBody::HeartbeatResponse {
            round: r.u64("HeartbeatResponse")?,
        },
        Tag::ReadIndex => MessageBody::ReadIndex {
            ctx: r.u64("ReadIndex")?,
        },
        Tag::ReadIndexResponse => MessageBody::ReadIndexResponse {
            ctx: r.u64("ReadIndexResponse")?,
            index: r.opt_u64("ReadIndexResponse")?,
        },
        Tag::TimeoutNow => MessageBody::TimeoutNow,
        Tag::Removed => MessageBody::Removed,
        Tag::InstallSnapshot => MessageBody::InstallSnapshot {
            index: r.u64("InstallSnapshot")?,
            snapshot_term: r.u64("InstallSnapshot")?,
            membership: read_membership(r)?,
            data: r.bytes("InstallSnapshot data")?,
        },
        Tag::Propose => {
            let ctx = r.u64("Propose")?;
            let count = r.count(4, "the command count of a Propose")?;
            let mut commands = Vec::with_capacity(count);
            for _ in 0..count {
                commands.push(r.bytes("a proposed command")?);
            }
            MessageBody::Propose { ctx, commands }
        }
        Tag::ProposeRefused => MessageBody::ProposeRefused {
            ctx: r.u64("ProposeRefused")?,
        },
    };
    Ok(Message {
        from,
        to,
        term,
        body,
    })
}

fn read_entry(r: &mut Reader<'_>) -> Result<Entry, WireError> {
    let index = r.u64("an entry")?;
    let term = r.u64("an entry")?;
    let kind = r.u8("an entry")?;
    let payload = match Kind::from_u8(kind) {
        Some(Kind::Noop) => Payload::Noop,
        Some(Kind::Normal) => Payload::Normal(r.bytes("an entry payload")?),
        Some(Kind::Membership) => Payload::Membership(read_membership(r)?),
        None => {
            return Err(WireError::UnknownTag {
                what: "entry payload",
                tag: kind,
            })
        }
    };
    Ok(Entry {
        index,
        term,
        payload,
    })
}

fn read_membership(r: &mut Reader<'_>) -> Result<Membership, WireError> {
    let voters = read_ids(r)?;
    let outgoing = read_ids(r)?;
    let learners = read_ids(r)?;
    let n = r.count(NODE_ID_LEN + 4, "a membership's meta")?;
    let mut meta = std::collections::BTreeMap::new();
    let mut last = 0;
    for _ in 0..n {
        let id = r.u64("a membership's meta")?;
        if id <= last {
            return Err(WireError::Malformed {
                what: "membership meta ids not strictly increasing",
            });
        }
        last = id;
        let b = r.bytes("a membership's meta")?;
        if b.len() > MEMBER_META_BYTES_MAX {
            return Err(WireError::Malformed {
                what: "a member's meta over MEMBER_META_BYTES_MAX",
            });
        }
        meta.insert(id, b);
    }
    Ok(Membership {
        voters,
        outgoing,
        learners,
        meta,
    })
}

fn read_ids(r: &mut Reader<'_>) -> Result<BTreeSet<NodeId>, WireError> {
    let n = r.count(NODE_ID_LEN, "a membership")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.u64("a membership")?;
        // Strictly increasing, as the encoder writes a set: a duplicate or
        // out-of-order id means the bytes are not what a sender wrote.
        if ids.last().is_some_and(|&last| id <= last) {
            return Err(WireError::Malformed {
                what: "membership ids not strictly increasing",
            });
        }
        ids.push(id);
    }
    Ok(ids.into_iter().collect())
}

// ---------------------------------------------------------------------------
// Handshake.

/// What a connection carries, announced in its [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// The ordered stream of Raft messages between two peers.
    Raft = 1,
    /// A snapshot transfer (one of possibly several parallel streams).
    Snapshot = 2,
}

impl Channel {
    pub fn from_u8(v: u8) -> Option<Channel> {
        match v {
            1 => Some(Channel::Raft),
            2 => Some(Channel::Snapshot),
            _ => None,
        }
    }
}

/// The body of the [`FrameType::Hello`] frame that opens every connection,
/// sent by both ends: the receiver checks that the cluster and its own id
/// are what the sender expects before anything else is accepted.
///
/// ```text
/// | cluster_id u64 | from u64 | to u64 | channel u8 |
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: u64,
    pub from: NodeId,
    pub to: NodeId,
    pub channel: Channel,
}

impl Hello {
    pub fn decode(body: &Bytes) -> Result<Hello, WireError> {
        let mut r = Reader { body, pos: 0 };
        let cluster_id = r.u64("Hello")?;
        let from = r.u64("Hello")?;
        let to = r.u64("Hello")?;
        let channel = r.u8("Hello")?;
        let channel = Channel::from_u8(channel).ok_or(WireError::UnknownTag {
            what: "Hello channel",
            tag: channel,
        })?;
        r.finish("bytes after a Hello")?;
        Ok(Hello {
            cluster_id,
            from,
            to,
            channel,
        })
    }

    fn put(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.cluster_id);
        dst.put_u64_le(self.from);
        dst.put_u64_le(self.to);
        dst.put_u8(self.channel as u8);
    }
}

/// Appends a Hello frame to `dst`; returns the frame's length.
pub fn encode_hello_frame(
    enc: &FrameEncoder,
    hello: &Hello,
    dst: &mut BytesMut,
) -> Result<usize, WireError> {
    enc.encode_with(dst, FrameType::Hello, HELLO_BODY_LEN, |dst| hello.put(dst))
}
