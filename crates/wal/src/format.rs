//! On-disk layouts: the segment header and the record framing.
//!
//! All integers are little-endian. Every record starts on an 8-byte boundary.
//!
//! ## Segment header (48 bytes, at offset 0 of every segment file)
//!
//! ```text
//!  0          8          12         16         24            32       40         48
//!  | magic    | version  | hcrc     | seq      | first_index | salt   | prev_end |
//!  | SKIFFWAL | u32 = 1  | u32      | u64      | u64         | u64    | u64      |
//! ```
//!
//! `hcrc` is CRC32C over bytes `0..12` and `16..48` (all but itself). `seq` orders segments
//! (it is also in the file name), `first_index` is the next log index when
//! the segment was opened, `salt` is random per incarnation of the file (a
//! recycled segment gets a new one, so its stale records no longer verify),
//! and `prev_end` is the byte offset at which the previous segment was sealed
//! (fsynced for the last time) before this one was started: recovery must
//! parse the previous segment cleanly up to exactly that offset.
//!
//! ## Record (24-byte header, body, zero padding to 8 bytes)
//!
//! ```text
//!  0      4      8      12     13     14      16          24
//!  | hcrc | len  | bcrc | type | ver  | flags | watermark | body[len] | pad |
//!  | u32  | u32  | u32  | u8   | u8=1 | u16   | u64       |           |     |
//! ```
//!
//! * `flags`: bit 0 `MORE` — the next record belongs to the same write. A
//!   write (a [`crate::WriteBatch`]: truncate, snapshot, entries, hard state)
//!   becomes several records; recovery applies them only once the last one
//!   (without `MORE`) verifies, so a crash never leaves part of a write.
//!   Other bits must be zero.
//! * `hcrc`: CRC32C over the segment's salt (8 bytes) then header bytes
//!   `4..24`. A record from an earlier incarnation of a recycled file fails it.
//! * `bcrc`: CRC32C of the body.
//! * `watermark`: the offset in this segment below which every byte was known
//!   durable (fdatasync completed) when this record was encoded. A valid
//!   record whose watermark lies beyond a damaged record proves the damaged
//!   one had been durable: that is corruption, not a torn tail.
//!
//! Bodies by `type`:
//!
//! ```text
//!  1 Entries   | first_index u64 | count u32 | 0u32 | count × { term u64 | len u32 | payload[len] } |
//!  2 HardState | term u64 | vote u64 | commit u64 |
//!  3 Snapshot  | index u64 | term u64 | len u32 | 0u32 | data[len] |
//!  4 Truncate  | from_index u64 |   (entries at and above from_index are removed)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Entry, HardState, SnapshotMeta};

pub const SEGMENT_MAGIC: &[u8; 8] = b"SKIFFWAL";
pub const FORMAT_VERSION: u32 = 1;
pub const RECORD_VERSION: u8 = 1;
pub const SEGMENT_HEADER_LEN: usize = 48;
pub const RECORD_HEADER_LEN: usize = 24;
pub const ALIGN: usize = 8;
/// Per-entry overhead inside an Entries body.
pub const ENTRY_OVERHEAD: usize = 12;
/// Fixed part of an Entries body.
pub const ENTRIES_PREFIX: usize = 16;

const _: () = assert!(SEGMENT_HEADER_LEN % ALIGN == 0);
const _: () = assert!(RECORD_HEADER_LEN % ALIGN == 0);

/// Rounds up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// Bytes a record with a body of `body_len` bytes occupies on disk.
pub const fn record_size(body_len: usize) -> usize {
    align_up(RECORD_HEADER_LEN + body_len)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    Entries = 1,
    HardState = 2,
    Snapshot = 3,
    Truncate = 4,
}

impl RecordType {
    pub fn from_u8(v: u8) -> Option<RecordType> {
        match v {
            1 => Some(RecordType::Entries),
            2 => Some(RecordType::HardState),
            3 => Some(RecordType::Snapshot),
            4 => Some(RecordType::Truncate),
            _ => None,
        }
    }
}

/// The segment header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub first_index: u64,
    pub salt: u64,
    pub prev_end: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_index.to_le_bytes());
        b[32..40].copy_from_slice(&self.salt.to_le_bytes());
        b[40..48].copy_from_slice(&self.prev_end.to_le_bytes());
        let crc = header_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header; `Err` says why it is not one.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, &'static str> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err("short segment header");
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic");
        }
        if u32_at(b, 12) != header_crc(b) {
            return Err("segment header checksum mismatch");
        }
        if u32_at(b, 8) != FORMAT_VERSION {
            return Err("unsupported segment format version");
        }
        Ok(SegmentHeader {
            seq: u64_at(b, 16),
            first_index: u64_at(b, 24),
            salt: u64_at(b, 32),
            prev_end: u64_at(b, 40),
        })
    }
}

fn header_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..SEGMENT_HEADER_LEN])
}

/// An encoded record body with its checksum, computed by the appending
/// thread so that the I/O driver only frames and copies.
#[derive(Debug, Clone)]
pub struct Body {
    pub kind: RecordType,
    pub bytes: Bytes,
    pub crc: u32,
}

impl Body {
    fn new(kind: RecordType, bytes: Bytes) -> Body {
        let crc = crc32c::crc32c(&bytes);
        Body { kind, bytes, crc }
    }

    /// Bytes this body occupies on disk once framed.
    pub fn framed_len(&self) -> usize {
        record_size(self.bytes.len())
    }

    pub fn entries(entries: &[Entry]) -> Body {
        let payload: usize = entries.iter().map(|e| e.payload.len()).sum();
        let mut b =
            BytesMut::with_capacity(ENTRIES_PREFIX + entries.len() * ENTRY_OVERHEAD + payload);
        b.put_u64_le(entries.first().map_or(0, |e| e.index));
        b.put_u32_le(entries.len() as u32);
        b.put_u32_le(0);
        for e in entries {
            b.put_u64_le(e.term);
            b.put_u32_le(e.payload.len() as u32);
            b.put_slice(&e.payload);
        }
        Body::new(RecordType::Entries, b.freeze())
    }

    pub fn hard_state(hs: &HardState) -> Body {
        let mut b = BytesMut::with_capacity(24);
        b.put_u64_le(hs.term);
        b.put_u64_le(hs.vote);
        b.put_u64_le(hs.commit);
        Body::new(RecordType::HardState, b.freeze())
    }

    pub fn snapshot(meta: &SnapshotMeta) -> Body {
        let mut b = BytesMut::with_capacity(24 + meta.data.len());
        b.put_u64_le(meta.index);
        b.put_u64_le(meta.term);
        b.put_u32_le(meta.data.len() as u32);
        b.put_u32_le(0);
        b.put_slice(&meta.data);
        Body::new(RecordType::Snapshot, b.freeze())
    }

    pub fn truncate(from_index: u64) -> Body {
        Body::new(
            RecordType::Truncate,
            Bytes::copy_from_slice(&from_index.to_le_bytes()),
        )
    }
}

/// Record flag: the next record belongs to the same write.
pub const FLAG_MORE: u16 = 1;
const FLAGS_KNOWN: u16 = FLAG_MORE;

/// Appends the framed record (header, body, padding) of a single-record
/// write to `out`.
pub fn frame_into(out: &mut Vec<u8>, salt: u64, watermark: u64, body: &Body) {
    frame_record(out, salt, watermark, 0, body);
}

/// Appends the records of one write: every record but the last carries
/// [`FLAG_MORE`].
pub fn frame_write<'a>(
    out: &mut Vec<u8>,
    salt: u64,
    watermark: u64,
    bodies: impl IntoIterator<Item = &'a Body>,
) {
    let mut bodies = bodies.into_iter().peekable();
    while let Some(body) = bodies.next() {
        let flags = if bodies.peek().is_some() {
            FLAG_MORE
        } else {
            0
        };
        frame_record(out, salt, watermark, flags, body);
    }
}

fn frame_record(out: &mut Vec<u8>, salt: u64, watermark: u64, flags: u16, body: &Body) {
    let start = out.len();
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[4..8].copy_from_slice(&(body.bytes.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&body.crc.to_le_bytes());
    h[12] = body.kind as u8;
    h[13] = RECORD_VERSION;
    h[14..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&watermark.to_le_bytes());
    let hcrc = record_header_crc(salt, &h);
    h[0..4].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&body.bytes);
    out.resize(start + record_size(body.bytes.len()), 0);
}

fn record_header_crc(salt: u64, h: &[u8]) -> u32 {
    crc32c::crc32c_append(
        crc32c::crc32c(&salt.to_le_bytes()),
        &h[4..RECORD_HEADER_LEN],
    )
}

/// A record header that verified against the segment's salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub body_len: u32,
    pub body_crc: u32,
    pub kind: u8,
    pub flags: u16,
    pub watermark: u64,
}

impl RecordHeader {
    pub fn framed_len(&self) -> usize {
        record_size(self.body_len as usize)
    }

    /// Whether the next record belongs to the same write.
    pub fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

/// Why a record could not be read at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer than a header's bytes remain in the segment.
    Eof,
    /// The header is all zeros: nothing was ever written here.
    Zero,
    /// The header does not verify (torn, stale or flipped).
    BadHeader,
    /// The header verifies but the body runs past the end of the segment.
    BadLength,
    /// The header verifies but the body does not.
    BadBody,
    /// Unknown type, version or flags in a verified header.
    BadType,
}

impl RecordError {
    pub fn reason(self) -> &'static str {
        match self {
            RecordError::Eof => "segment ends inside a record header",
            RecordError::Zero => "zeroed record header",
            RecordError::BadHeader => "record header checksum mismatch",
            RecordError::BadLength => "record length runs past the segment",
            RecordError::BadBody => "record body checksum mismatch",
            RecordError::BadType => "unknown record type, version or flags",
        }
    }
}

/// Reads and verifies the record at `offset` of `seg` (a whole segment's
/// bytes). Returns its header and body.
pub fn read_record(
    seg: &[u8],
    offset: usize,
    salt: u64,
) -> Result<(RecordHeader, &[u8]), RecordError> {
    let Some(h) = seg.get(offset..offset + RECORD_HEADER_LEN) else {
        return Err(RecordError::Eof);
    };
    if h.iter().all(|&b| b == 0) {
        return Err(RecordError::Zero);
    }
    if u32_at(h, 0) != record_header_crc(salt, h) {
        return Err(RecordError::BadHeader);
    }
    let header = RecordHeader {
        body_len: u32_at(h, 4),
        body_crc: u32_at(h, 8),
        kind: h[12],
        flags: u16::from_le_bytes([h[14], h[15]]),
        watermark: u64_at(h, 16),
    };
    if h[13] != RECORD_VERSION
        || RecordType::from_u8(header.kind).is_none()
        || header.flags & !FLAGS_KNOWN != 0
    {
        return Err(RecordError::BadType);
    }
    let body_start = offset + RECORD_HEADER_LEN;
    let Some(body) = seg.get(body_start..body_start + header.body_len as usize) else {
        return Err(RecordError::BadLength);
    };
    if crc32c::crc32c(body) != header.body_crc {
        return Err(RecordError::BadBody);
    }
    Ok((header, body))
}

/// Why a verified body does not decode: a bug or a forged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyError(pub &'static str);

/// Decodes an Entries body into entries whose payloads slice `body`.
pub fn decode_entries(body: &Bytes) -> Result<Vec<Entry>, BodyError> {
    let mut out = Vec::new();
    let mut first = true;
    for_each_entry(body, |index, term, payload| {
        if first {
            // `for_each_entry` bounded the count by the body size.
            let (_, count) = entries_span(body).expect("checked by for_each_entry");
            out.reserve_exact(count as usize);
            first = false;
        }
        out.push(Entry {
            index,
            term,
            payload: body.slice(payload),
        });
    })?;
    Ok(out)
}

/// Walks an Entries body without allocating: checks its framing as a whole
/// before calling `f` for any entry, then calls `f(index, term, payload
/// range in body)` for each entry in order. Returns `(first index, count)`.
pub fn for_each_entry(
    body: &[u8],
    mut f: impl FnMut(u64, u64, std::ops::Range<usize>),
) -> Result<(u64, u64), BodyError> {
    let (first, count) = entries_span(body)?;
    let count = count as usize;
    // Each entry needs at least its overhead: bound `count` by the body size.
    if count > (body.len() - ENTRIES_PREFIX) / ENTRY_OVERHEAD {
        return Err(BodyError("entry count exceeds body"));
    }
    // Check first, so that `f` never sees part of a body that does not
    // decode.
    let mut at = ENTRIES_PREFIX;
    for _ in 0..count {
        if at + ENTRY_OVERHEAD > body.len() {
            return Err(BodyError("entry header runs past body"));
        }
        let len = u32_at(body, at + 8) as usize;
        at += ENTRY_OVERHEAD;
        if at + len > body.len() {
            return Err(BodyError("entry payload runs past body"));
        }
        at += len;
    }
    if at != body.len() {
        return Err(BodyError("trailing bytes after entries"));
    }
    let mut at = ENTRIES_PREFIX;
    for i in 0..count {
        let term = u64_at(body, at);
        let len = u32_at(body, at + 8) as usize;
        at += ENTRY_OVERHEAD;
        f(first + i as u64, term, at..at + len);
        at += len;
    }
    Ok((first, count as u64))
}

/// The terms of an Entries body that [`for_each_entry`] accepted, in order
/// (it panics on one that was not checked).
pub fn entry_terms(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let count = u32_at(body, 8) as usize;
    let mut at = ENTRIES_PREFIX;
    (0..count).map(move |_| {
        let term = u64_at(body, at);
        at += ENTRY_OVERHEAD + u32_at(body, at + 8) as usize;
        term
    })
}

/// Reads only the (first index, count) of an Entries body.
pub fn entries_span(body: &[u8]) -> Result<(u64, u64), BodyError> {
    if body.len() < ENTRIES_PREFIX {
        return Err(BodyError("short entries body"));
    }
    Ok((u64_at(body, 0), u64::from(u32_at(body, 8))))
}

pub fn decode_hard_state(body: &[u8]) -> Result<HardState, BodyError> {
    if body.len() != 24 {
        return Err(BodyError("hard state body is not 24 bytes"));
    }
    Ok(HardState {
        term: u64_at(body, 0),
        vote: u64_at(body, 8),
        commit: u64_at(body, 16),
    })
}

pub fn decode_snapshot(body: &Bytes) -> Result<SnapshotMeta, BodyError> {
    if body.len() < 24 {
        return Err(BodyError("short snapshot body"));
    }
    let len = u32_at(body, 16) as usize;
    if 24 + len != body.len() {
        return Err(BodyError("snapshot data length mismatch"));
    }
    Ok(SnapshotMeta {
        index: u64_at(body, 0),
        term: u64_at(body, 8),
        data: body.slice(24..),
    })
}

pub fn decode_truncate(body: &[u8]) -> Result<u64, BodyError> {
    if body.len() != 8 {
        return Err(BodyError("truncate body is not 8 bytes"));
    }
    Ok(u64_at(body, 0))
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
