//! The snapshot format of the KV store: what a follower installs instead of
//! replaying the log, and what a node restores on restart.
//!
//! ```text
//! header (33 bytes)
//!   magic         [u8; 8] = "SKIFFKV\0"
//!   version       u8      = 1
//!   applied_index u64     last Raft index applied
//!   revision      i64     store revision (>= 1)
//!   key_count     u64
//! record × key_count, keys strictly ascending
//!   key_len       u32     1 ..= KEY_BYTES_MAX
//!   value_len     u32     0 ..= VALUE_BYTES_MAX
//!   create_rev    i64     \
//!   mod_rev       i64      } the Record invariants hold against `revision`
//!   version       i64     /
//!   key           [u8; key_len]
//!   value         [u8; value_len]
//! trailer
//!   crc32c        u32     over every byte of header and records
//! ```
//!
//! Integers are little-endian. Both sides stream: the writer holds one
//! batch of records (about [`WRITE_BATCH_BYTES`]) at a time, the reader one
//! record. The reader consumes exactly the snapshot's bytes, so a snapshot
//! can sit inside a larger stream; give it a buffered reader. Anything that
//! does not read back as exactly what was written is a [`SnapshotError`],
//! never a panic and never a different store.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use bytes::Bytes;

use super::{KvStore, Record, KEY_BYTES_MAX, REVISION_INITIAL, VALUE_BYTES_MAX};

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"SKIFFKV\0";
pub const SNAPSHOT_VERSION: u8 = 1;
const HEADER_BYTES: usize = 8 + 1 + 8 + 8 + 8;
const RECORD_HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 8;
/// The writer hands the stream batches of about this size.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

const _: () = assert!(KEY_BYTES_MAX <= u32::MAX as usize && VALUE_BYTES_MAX <= u32::MAX as usize);

/// What [`KvStore::write_snapshot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub applied_index: u64,
    pub revision: i64,
    pub key_count: u64,
    /// Everything written, trailer included.
    pub bytes: u64,
    pub crc32c: u32,
}

/// Why a snapshot could not be read. `offset` counts bytes from the start
/// of the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot read failed: {0}")]
    Io(#[source] io::Error),
    #[error("snapshot truncated: stream ended at offset {offset} reading {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("not a skiff KV snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not known (expected {SNAPSHOT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("snapshot corrupt at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: &'static str },
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

struct CrcWriter<'w, W: Write> {
    inner: &'w mut W,
    crc: u32,
    bytes: u64,
}

impl<W: Write> CrcWriter<'_, W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

struct CrcReader<'r, R: Read> {
    inner: &'r mut R,
    crc: u32,
    offset: u64,
}

impl<R: Read> CrcReader<'_, R> {
    /// Reads exactly `buf.len()` bytes, outside the checksum (the trailer).
    fn read_raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotError::Truncated {
                offset: self.offset,
                what,
            },
            _ => SnapshotError::Io(e),
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        self.read_raw(buf, what)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }

    fn corrupt(&self, reason: &'static str) -> SnapshotError {
        SnapshotError::Corrupt {
            offset: self.offset,
            reason,
        }
    }
}

/// Little-endian field reader over a fixed buffer; lengths are known, so
/// the slicing cannot fail.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at gave N bytes")
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
}

impl KvStore {
    /// Writes the whole state to `w` in the snapshot format (module docs of
    /// `kv::snapshot`) and flushes it.
    pub fn write_snapshot(&self, w: &mut impl Write) -> io::Result<SnapshotInfo> {
        let mut out = CrcWriter {
            inner: w,
            crc: 0,
            bytes: 0,
        };
        let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES + RECORD_HEADER_BYTES);
        buf.extend_from_slice(&SNAPSHOT_MAGIC);
        buf.push(SNAPSHOT_VERSION);
        buf.extend_from_slice(&self.applied_index.to_le_bytes());
        buf.extend_from_slice(&self.revision.to_le_bytes());
        buf.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        debug_assert_eq!(buf.len(), HEADER_BYTES);
        for (key, record) in &self.map {
            // Check before writing what the reader will check after reading.
            debug_assert_eq!(record.check(key, self.revision), Ok(()));
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
            buf.extend_from_slice(&record.create_revision.to_le_bytes());
            buf.extend_from_slice(&record.mod_revision.to_le_bytes());
            buf.extend_from_slice(&record.version.to_le_bytes());
            buf.extend_from_slice(key);
            buf.extend_from_slice(&record.value);
            if buf.len() >= WRITE_BATCH_BYTES {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        out.write_all(&buf)?;
        let (crc, bytes) = (out.crc, out.bytes);
        w.write_all(&crc.to_le_bytes())?;
        w.flush()?;
        Ok(SnapshotInfo {
            applied_index: self.applied_index,
            revision: self.revision,
            key_count: self.map.len() as u64,
            bytes: bytes + 4,
            crc32c: crc,
        })
    }

    /// Reads a snapshot written by [`KvStore::write_snapshot`]; the store it
    /// returns equals the one that wrote it.
    pub fn read_snapshot(r: &mut impl Read) -> Result<KvStore, SnapshotError> {
        let mut input = CrcReader {
            inner: r,
            crc: 0,
            offset: 0,
        };
        let mut header = [0u8; HEADER_BYTES];
        input.read(&mut header, "header")?;
        let mut fields = Fields(&header);
        if fields.take::<8>() != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let [version] = fields.take::<1>();
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let applied_index = fields.u64();
        let revision = fields.i64();
        let key_count = fields.u64();
        if revision < REVISION_INITIAL {
            return Err(input.corrupt("revision below the initial revision"));
        }
        let mut store = KvStore::new();
        store.applied_index = applied_index;
        store.revision = revision;
        let mut map = BTreeMap::new();
        let mut approx_bytes = 0;
        let mut last_key: Option<Bytes> = None;
        // Bounded by the stream: a corrupt key_count ends in Truncated.
        for _ in 0..key_count {
            let mut record_header = [0u8; RECORD_HEADER_BYTES];
            input.read(&mut record_header, "record header")?;
            let mut fields = Fields(&record_header);
            let key_len = fields.u32() as usize;
            let value_len = fields.u32() as usize;
            let (create_revision, mod_revision, version) =
                (fields.i64(), fields.i64(), fields.i64());
            if key_len == 0 || key_len > KEY_BYTES_MAX {
                return Err(input.corrupt("key length out of bounds"));
            }
            if value_len > VALUE_BYTES_MAX {
                return Err(input.corrupt("value length out of bounds"));
            }
            let mut key = vec![0u8; key_len];
            input.read(&mut key, "key")?;
            let mut value = vec![0u8; value_len];
            input.read(&mut value, "value")?;
            let key = Bytes::from(key);
            if last_key.as_ref().is_some_and(|last| *last >= key) {
                return Err(input.corrupt("keys not in ascending order"));
            }
            let record = Record {
                value: Bytes::from(value),
                create_revision,
                mod_revision,
                version,
            };
            record
                .check(&key, revision)
                .map_err(|reason| input.corrupt(reason))?;
            approx_bytes += super::record_bytes(&key, &record);
            map.insert(key.clone(), record);
            last_key = Some(key);
        }
        let computed = input.crc;
        let mut trailer = [0u8; 4];
        input.read_raw(&mut trailer, "checksum")?;
        let stored = u32::from_le_bytes(trailer);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        store.map = map;
        store.approx_bytes = approx_bytes;
        Ok(store)
    }
}
