//! Wire frames: the envelope every byte on a Skiff connection travels in.
//!
//! This module owns the frame header (drawn on [`FrameHeader`]), its
//! checksum, the frame types, and the bound on a frame's size
//! (`frame_bytes_max`). [`FrameEncoder`] appends frames to a send buffer;
//! [`FrameDecoder`] cuts complete, verified frames out of a receive buffer.
//!
//! It must never interpret a frame's body (the codec does), never copy a
//! received body (a frame is split off the receive buffer), never buffer a
//! body it is going to refuse (the length is checked from the header alone),
//! and never panic on what a peer sends.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::WireError;

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"SKIF";
/// The frame layout this build speaks; a frame with another is refused.
pub const FRAME_VERSION: u8 = 2;
/// Bytes before the body.
pub const FRAME_HEADER_LEN: usize = 16;
/// Flag bits defined by this version; a frame carrying others is refused
/// (none are defined yet).
pub const FRAME_FLAGS_KNOWN: u16 = 0;
/// The default for `frame_bytes_max`, header included: well above one
/// coalesced batch of AppendEntries (the core's `batch_bytes_max` defaults
/// to 1 MiB per message), small enough that a forged length cannot make a
/// receiver buffer much.
pub const DEFAULT_FRAME_BYTES_MAX: usize = 64 << 20;

/// Offset of the checksum in the header; it covers every byte before it,
/// then the body.
const CRC_OFFSET: usize = 12;

const _: () = assert!(CRC_OFFSET + 4 == FRAME_HEADER_LEN);
const _: () = assert!(DEFAULT_FRAME_BYTES_MAX > FRAME_HEADER_LEN);
const _: () = assert!(DEFAULT_FRAME_BYTES_MAX - FRAME_HEADER_LEN <= u32::MAX as usize);

/// What a frame carries. Numbers are fixed on the wire; 0 is never a type
/// (a zeroed header is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// First frame on every connection, in both directions: who is talking
    /// and what the connection is for ([`crate::Hello`]).
    Hello = 1,
    /// A batch of Raft messages for one peer, in order
    /// ([`crate::encode_raft_frame`], [`crate::decode_messages`]).
    Raft = 2,
    /// Reserved for snapshot streaming: one chunk of a snapshot at an
    /// offset, with its own checksum. Body defined by that work.
    SnapshotChunk = 3,
    /// Reserved for snapshot streaming: the receiver asks for a snapshot
    /// from an offset (a new transfer, or a resumed one after a broken
    /// connection). Body defined by that work.
    SnapshotRequest = 4,
    /// Reserved for snapshot streaming: the receiver acknowledges chunks
    /// written, or the whole snapshot verified and durable. Body defined by
    /// that work.
    SnapshotAck = 5,
}

impl FrameType {
    pub fn from_u8(v: u8) -> Option<FrameType> {
        match v {
            1 => Some(FrameType::Hello),
            2 => Some(FrameType::Raft),
            3 => Some(FrameType::SnapshotChunk),
            4 => Some(FrameType::SnapshotRequest),
            5 => Some(FrameType::SnapshotAck),
            _ => None,
        }
    }
}

/// A frame header. All integers are little-endian.
///
/// ```text
///  0        4       5       6        8          12       16
///  | magic  | ver   | type  | flags  | body_len | crc    | body[body_len] |
///  | "SKIF" | u8=1  | u8    | u16=0  | u32      | u32    |                |
/// ```
///
/// * `magic`: [`FRAME_MAGIC`]; anything else is [`WireError::BadMagic`].
/// * `ver`: [`FRAME_VERSION`]; anything else is
///   [`WireError::UnsupportedVersion`] (peers of different versions
///   refuse each other's first frame rather than guess).
/// * `type`: a [`FrameType`]; anything else is [`WireError::UnknownType`].
/// * `flags`: no bit is defined yet ([`FRAME_FLAGS_KNOWN`]); a set bit is
///   [`WireError::Malformed`].
/// * `body_len`: bytes after the header. `16 + body_len` must be at most
///   the receiver's `frame_bytes_max`, or [`WireError::TooLarge`] as soon
///   as the header is in, before any of the body is buffered.
/// * `crc`: CRC32C over header bytes `0..12` then the body: the whole frame
///   but itself. A mismatch is [`WireError::Checksum`].
///
/// The header is validated as soon as its 16 bytes arrive; the checksum
/// once the whole body has. A flipped bit in `body_len` that makes it
/// larger (but within the bound) is therefore seen only once enough
/// further bytes arrive (as a checksum mismatch) or the stream ends
/// ([`FrameDecoder::decode_eof`]: [`WireError::Truncated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ty: FrameType,
    pub flags: u16,
    pub body_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC);
        h[4] = FRAME_VERSION;
        h[5] = self.ty as u8;
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Parses and validates a header (all but the checksum, which needs the
    /// body). Checks run in layout order, so that a stream that is not Skiff
    /// at all reports `BadMagic` first.
    pub fn decode(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        if h[4] != FRAME_VERSION {
            return Err(WireError::UnsupportedVersion { version: h[4] });
        }
        let ty = FrameType::from_u8(h[5]).ok_or(WireError::UnknownType { ty: h[5] })?;
        let flags = u16::from_le_bytes([h[6], h[7]]);
        if flags & !FRAME_FLAGS_KNOWN != 0 {
            return Err(WireError::Malformed {
                what: "unknown frame flags",
            });
        }
        Ok(FrameHeader {
            ty,
            flags,
            body_len: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            crc: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        })
    }

    /// Bytes of the whole frame. Saturates rather than wraps where `usize`
    /// is narrower than 33 bits, so that the bound check still refuses it.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN.saturating_add(usize::try_from(self.body_len).unwrap_or(usize::MAX))
    }
}

/// The checksum of a frame: header bytes before the checksum, then the body.
fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_OFFSET]), body)
}

/// Refuses a frame length over `frame_bytes_max`.
fn check_frame_len(frame_len: usize, frame_bytes_max: usize) -> Result<(), WireError> {
    if frame_len > frame_bytes_max {
        return Err(WireError::TooLarge {
            len: frame_len,
            max: frame_bytes_max,
        });
    }
    Ok(())
}

/// Panics on a `frame_bytes_max` no frame fits in: a configuration error.
fn check_bound(frame_bytes_max: usize) {
    assert!(
        frame_bytes_max > FRAME_HEADER_LEN,
        "frame_bytes_max ({frame_bytes_max}) must exceed the {FRAME_HEADER_LEN}-byte frame header"
    );
}

/// A complete, verified frame cut out of a receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ty: FrameType,
    /// The body, a slice of the receive buffer's memory (no copy).
    pub body: Bytes,
}

/// Appends frames to a send buffer.
#[derive(Debug, Clone)]
pub struct FrameEncoder {
    frame_bytes_max: usize,
}

impl FrameEncoder {
    /// An encoder refusing frames over `frame_bytes_max` bytes (header
    /// included). It should not exceed the peers' decoders' bound.
    ///
    /// # Panics
    ///
    /// If `frame_bytes_max` is not larger than [`FRAME_HEADER_LEN`].
    pub fn new(frame_bytes_max: usize) -> FrameEncoder {
        check_bound(frame_bytes_max);
        FrameEncoder { frame_bytes_max }
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Appends a frame of type `ty` whose body `fill` appends to `dst`; the
    /// body must be exactly `body_len` bytes (asserted: a mismatch is a bug
    /// in the caller's length computation). The bound is checked before
    /// anything is written, so that a refused frame costs no encoding and
    /// leaves `dst` unchanged. Returns the frame's length.
    pub fn encode_with(
        &self,
        dst: &mut BytesMut,
        ty: FrameType,
        body_len: usize,
        fill: impl FnOnce(&mut BytesMut),
    ) -> Result<usize, WireError> {
        let frame_len = FRAME_HEADER_LEN.saturating_add(body_len);
        check_frame_len(frame_len, self.frame_bytes_max)?;
        let Ok(body_len_u32) = u32::try_from(body_len) else {
            return Err(WireError::TooLarge {
                len: frame_len,
                max: FRAME_HEADER_LEN + u32::MAX as usize,
            });
        };
        dst.reserve(frame_len);
        let start = dst.len();
        let header = FrameHeader {
            ty,
            flags: 0,
            body_len: body_len_u32,
            crc: 0,
        };
        dst.put_slice(&header.encode());
        fill(dst);
        let written = dst.len() - start - FRAME_HEADER_LEN;
        assert_eq!(
            written, body_len,
            "{ty:?} frame body: declared {body_len} bytes, wrote {written}"
        );
        let frame = &mut dst[start..];
        let crc = frame_crc(&frame[..FRAME_HEADER_LEN], &frame[FRAME_HEADER_LEN..]);
        frame[CRC_OFFSET..FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(frame_len)
    }

    /// Appends a frame of type `ty` carrying `body` (copied).
    pub fn encode(
        &self,
        dst: &mut BytesMut,
        ty: FrameType,
        body: &[u8],
    ) -> Result<usize, WireError> {
        self.encode_with(dst, ty, body.len(), |dst| dst.put_slice(body))
    }
}

impl Default for FrameEncoder {
    fn default() -> FrameEncoder {
        FrameEncoder::new(DEFAULT_FRAME_BYTES_MAX)
    }
}

/// Cuts complete, verified frames out of a receive buffer.
///
/// The socket reader appends what it reads to a `BytesMut` and calls
/// [`decode`](FrameDecoder::decode) until it returns `Ok(None)`. Each frame
/// is split off the front of the buffer: its body shares the buffer's
/// memory, so payloads decoded from it are never copied.
///
/// After an error the buffer is left as it was and the stream has lost its
/// place: close the connection.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frame_bytes_max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames over `frame_bytes_max` bytes (header
    /// included).
    ///
    /// # Panics
    ///
    /// If `frame_bytes_max` is not larger than [`FRAME_HEADER_LEN`].
    pub fn new(frame_bytes_max: usize) -> FrameDecoder {
        check_bound(frame_bytes_max);
        FrameDecoder { frame_bytes_max }
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// The next complete frame at the front of `buf`, removed from it;
    /// `Ok(None)` when more bytes are needed. Once a valid header is in and
    /// its body is not, reserves room in `buf` for the rest of the frame
    /// (at most `frame_bytes_max`), so that the reader fills it without
    /// reallocating.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(header) = self.header(buf)? else {
            return Ok(None);
        };
        let frame_len = header.frame_len();
        if buf.len() < frame_len {
            buf.reserve(frame_len - buf.len());
            return Ok(None);
        }
        let actual = frame_crc(&buf[..FRAME_HEADER_LEN], &buf[FRAME_HEADER_LEN..frame_len]);
        if actual != header.crc {
            return Err(WireError::Checksum {
                expected: header.crc,
                actual,
            });
        }
        let mut frame = buf.split_to(frame_len);
        frame.advance(FRAME_HEADER_LEN);
        Ok(Some(Frame {
            ty: header.ty,
            body: frame.freeze(),
        }))
    }

    /// How many bytes the frame at the front of `buf` still lacks: 0 when
    /// it is complete or its header is not in yet. Errors as
    /// [`decode`](FrameDecoder::decode) would (a bad header, a frame over
    /// the bound), so a reader can make room before decoding.
    pub fn missing(&self, buf: &[u8]) -> Result<usize, WireError> {
        Ok(self
            .header(buf)?
            .map_or(0, |h| h.frame_len().saturating_sub(buf.len())))
    }

    /// The checked header at the front of `buf`, if it is in.
    fn header(&self, buf: &[u8]) -> Result<Option<FrameHeader>, WireError> {
        let Some(header_bytes) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::decode(header_bytes)?;
        check_frame_len(header.frame_len(), self.frame_bytes_max)?;
        Ok(Some(header))
    }

    /// Like [`decode`](FrameDecoder::decode), once the stream has ended:
    /// bytes left that do not make a whole frame are
    /// [`WireError::Truncated`].
    pub fn decode_eof(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated { what: "a frame" }),
        }
    }
}

impl Default for FrameDecoder {
    fn default() -> FrameDecoder {
        FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX)
    }
}
