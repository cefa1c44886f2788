//! The bodies of the snapshot frames. All integers are little-endian,
//! fixed width; the frame header's version covers these layouts too.
//!
//! ```text
//! SnapshotRequest (receiver → sender), 40 bytes: send me one chunk
//!  0        8       16      24      28            32       40
//!  | index  | term  | len   | crc   | chunk_bytes | chunk  |
//!  | u64    | u64   | u64   | u32   | u32         | u64    |
//!    └──────── SnapshotMeta ───────┘
//!
//! SnapshotChunk (sender → receiver), 32 + data_len bytes
//!  0        8       16       24         28         32
//!  | index  | term  | chunk  | data_crc | data_len | data[data_len] |
//!  | u64    | u64   | u64    | u32      | u32      |                |
//!
//! SnapshotAck (either way), 25 bytes
//!  0        8       16       17       25
//!  | index  | term  | status | detail |
//!  | u64    | u64   | u8     | u64    |
//! ```
//!
//! * A request names the whole snapshot (`index`, `term`, `len`, `crc`:
//!   a [`SnapshotMeta`]) so that the sender can refuse one it does not hold
//!   exactly, and is otherwise stateless: chunk `chunk` is the `data_len`
//!   bytes at offset `chunk × chunk_bytes` (`chunk_bytes`, except for the
//!   last chunk).
//! * A chunk's `data_crc` is the CRC32C of `data` as the sender read it
//!   from its file, computed before framing: an end-to-end check, separate
//!   from the frame checksum (which covers the bytes on the wire).
//! * `status` ([`AckStatus`]): 1 `Done` (receiver → sender: the snapshot is
//!   verified and durable; `detail` = its length); 2 `Unavailable`,
//!   3 `Mismatch`, 4 `Busy`, 5 `BadRequest` (sender → receiver, refusing a
//!   request or handshake, then closing; `detail` = the sender's
//!   `chunk_bytes_max` for `BadRequest`, else 0). Status 0 is never used.
//!
//! Decoding checks shape only (lengths, the status byte); whether a chunk
//! is the one asked for is the receiver's business. This module must never
//! panic on a body nor allocate from a length in one: a chunk's data is a
//! slice of the frame body.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Refusal, SnapshotMeta};
use crate::frame::{FrameEncoder, FrameType};
use crate::WireError;

/// Bytes of a SnapshotRequest body.
pub const REQUEST_BODY_LEN: usize = 40;
/// Bytes of a SnapshotChunk body before its data.
pub const CHUNK_PREFIX_LEN: usize = 32;
/// Bytes of a SnapshotAck body.
pub const ACK_BODY_LEN: usize = 25;
/// Offset of `data_crc` in a SnapshotChunk body.
pub(crate) const CHUNK_CRC_OFFSET: usize = 24;

/// A receiver's request for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    pub meta: SnapshotMeta,
    pub chunk_bytes: u32,
    pub chunk: u64,
}

impl ChunkRequest {
    pub fn decode(body: &[u8]) -> Result<ChunkRequest, WireError> {
        let b =
            exact::<REQUEST_BODY_LEN>(body, "a SnapshotRequest", "bytes after a SnapshotRequest")?;
        Ok(ChunkRequest {
            meta: SnapshotMeta {
                index: le_u64(b, 0),
                term: le_u64(b, 8),
                len: le_u64(b, 16),
                crc: le_u32(b, 24),
            },
            chunk_bytes: le_u32(b, 28),
            chunk: le_u64(b, 32),
        })
    }

    /// Appends a SnapshotRequest frame to `dst`; returns its length.
    pub fn encode(&self, enc: &FrameEncoder, dst: &mut BytesMut) -> Result<usize, WireError> {
        enc.encode_with(dst, FrameType::SnapshotRequest, REQUEST_BODY_LEN, |dst| {
            dst.put_u64_le(self.meta.index);
            dst.put_u64_le(self.meta.term);
            dst.put_u64_le(self.meta.len);
            dst.put_u32_le(self.meta.crc);
            dst.put_u32_le(self.chunk_bytes);
            dst.put_u64_le(self.chunk);
        })
    }
}

/// The fixed part of a SnapshotChunk body; `data_len` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub index: u64,
    pub term: u64,
    pub chunk: u64,
    pub data_crc: u32,
    pub data_len: u32,
}

impl ChunkHeader {
    /// The header and the data (a slice of `body`, no copy).
    pub fn decode(body: &Bytes) -> Result<(ChunkHeader, Bytes), WireError> {
        let Some(b) = body.first_chunk::<CHUNK_PREFIX_LEN>() else {
            return Err(WireError::Truncated {
                what: "a SnapshotChunk header",
            });
        };
        let header = ChunkHeader {
            index: le_u64(b, 0),
            term: le_u64(b, 8),
            chunk: le_u64(b, 16),
            data_crc: le_u32(b, 24),
            data_len: le_u32(b, 28),
        };
        let data_len = usize::try_from(header.data_len).unwrap_or(usize::MAX);
        let rest = body.len() - CHUNK_PREFIX_LEN;
        if data_len > rest {
            return Err(WireError::Truncated {
                what: "SnapshotChunk data",
            });
        }
        if data_len < rest {
            return Err(WireError::Malformed {
                what: "bytes after SnapshotChunk data",
            });
        }
        Ok((header, body.slice(CHUNK_PREFIX_LEN..)))
    }

    /// Appends the header to `dst` (the data must follow: `data_len` bytes).
    pub fn put(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.index);
        dst.put_u64_le(self.term);
        dst.put_u64_le(self.chunk);
        dst.put_u32_le(self.data_crc);
        dst.put_u32_le(self.data_len);
    }

    /// Appends a SnapshotChunk frame carrying `data` (copied) to `dst`;
    /// `data_len` is taken from `data`. Returns the frame's length.
    pub fn encode(
        &self,
        enc: &FrameEncoder,
        data: &[u8],
        dst: &mut BytesMut,
    ) -> Result<usize, WireError> {
        let Ok(data_len) = u32::try_from(data.len()) else {
            return Err(WireError::TooLarge {
                len: data.len(),
                max: enc.frame_bytes_max(),
            });
        };
        let header = ChunkHeader { data_len, ..*self };
        enc.encode_with(
            dst,
            FrameType::SnapshotChunk,
            CHUNK_PREFIX_LEN + data.len(),
            |dst| {
                header.put(dst);
                dst.put_slice(data);
            },
        )
    }
}

/// [`SnapshotAck`] statuses on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    Done = 1,
    Unavailable = 2,
    Mismatch = 3,
    Busy = 4,
    BadRequest = 5,
}

impl AckStatus {
    pub fn from_u8(v: u8) -> Option<AckStatus> {
        Some(match v {
            1 => AckStatus::Done,
            2 => AckStatus::Unavailable,
            3 => AckStatus::Mismatch,
            4 => AckStatus::Busy,
            5 => AckStatus::BadRequest,
            _ => return None,
        })
    }
}

/// A transfer's end: the receiver's `Done`, or the sender's refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotAck {
    pub index: u64,
    pub term: u64,
    pub status: AckStatus,
    pub detail: u64,
}

impl SnapshotAck {
    pub fn decode(body: &[u8]) -> Result<SnapshotAck, WireError> {
        let b = exact::<ACK_BODY_LEN>(body, "a SnapshotAck", "bytes after a SnapshotAck")?;
        let status = AckStatus::from_u8(b[16]).ok_or(WireError::UnknownTag {
            what: "SnapshotAck status",
            tag: b[16],
        })?;
        Ok(SnapshotAck {
            index: le_u64(b, 0),
            term: le_u64(b, 8),
            status,
            detail: le_u64(b, 17),
        })
    }

    /// Appends a SnapshotAck frame to `dst`; returns its length.
    pub fn encode(&self, enc: &FrameEncoder, dst: &mut BytesMut) -> Result<usize, WireError> {
        enc.encode_with(dst, FrameType::SnapshotAck, ACK_BODY_LEN, |dst| {
            dst.put_u64_le(self.index);
            dst.put_u64_le(self.term);
            dst.put_u8(self.status as u8);
            dst.put_u64_le(self.detail);
        })
    }

    /// The sender's refusal this ack carries (`None` for `Done`).
    pub fn refusal(&self) -> Option<Refusal> {
        Some(match self.status {
            AckStatus::Done => return None,
            AckStatus::Unavailable => Refusal::Unavailable,
            AckStatus::Mismatch => Refusal::Mismatch,
            AckStatus::Busy => Refusal::Busy,
            AckStatus::BadRequest => Refusal::BadRequest {
                chunk_bytes_max: self.detail,
            },
        })
    }
}

/// `body` as an array of exactly `N` bytes: shorter is `Truncated { what:
/// short }`, longer `Malformed { what: long }`.
fn exact<'a, const N: usize>(
    body: &'a [u8],
    short: &'static str,
    long: &'static str,
) -> Result<&'a [u8; N], WireError> {
    match body.len().cmp(&N) {
        std::cmp::Ordering::Less => Err(WireError::Truncated { what: short }),
        std::cmp::Ordering::Greater => Err(WireError::Malformed { what: long }),
        std::cmp::Ordering::Equal => Ok(body.first_chunk::<N>().expect("length checked")),
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

const _: () = assert!(CHUNK_CRC_OFFSET + 8 == CHUNK_PREFIX_LEN);
