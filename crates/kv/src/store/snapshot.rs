//! The snapshot format of the KV store: what a follower installs instead of
//! replaying the log, and what a node restores on restart.
//!
//! ```text
//! header (33 bytes)
//!   magic            [u8; 8] = "SKIFFKV\0"
//!   version          u8      = 6 (5: written before `sub`, read with
//!                            every sub 0; 4: written before auth, read with auth
//!                            off and empty; 3: written before alarms, read
//!                            as a snapshot without alarms; 2: written
//!                            before leases, read without leases and alarms)
//!   applied_index    u64     last Raft index applied
//!   revision         i64     store revision (>= 1)
//!   compact_revision i64     0 ..= revision (0: never compacted)
//! record × version_count, in (key, mod_revision) order, strictly ascending
//!   kind             u8      1: live version, 2: tombstone
//!   key_len          u32     1 ..= KEY_BYTES_MAX: a new key, greater than
//!                            the previous record's; 0: the previous
//!                            record's key (no key bytes follow)
//!   value_len        u32     0 ..= VALUE_BYTES_MAX; 0 for a tombstone
//!   mod_rev          i64     \  the history invariants hold against
//!   create_rev       i64      } `revision` and `compact_revision`;
//!   version          i64     /   a tombstone has create_rev = version = 0
//!   lease            i64     the lease the version attaches its key to
//!                            (0: none; 0 for a tombstone); absent in v2
//!   sub              u32     its place among its revision's writes, 0
//!                            first (a Txn's op order: watch events of a
//!                            revision come in this order); absent before v6
//!   key              [u8; key_len]
//!   value            [u8; value_len]
//! end
//!   kind             u8      = 0
//!   version_count    u64     records written
//!   key_count        u64     live keys (keys whose last record is live)
//! leases (absent in v2)
//!   lease_count      u64
//!   lease × lease_count, ids strictly ascending
//!     id             i64     > 0
//!     ttl            i64     1 ..= LEASE_TTL_MAX
//!     remaining      i64     0 ..= ttl (0: no checkpoint)
//!   (a lease's keys are the live keys whose latest version names it;
//!   every lease a live key names is in the table)
//! alarms (absent in v2 and v3)
//!   alarm_count      u64
//!   alarm × alarm_count, (member, kind) strictly ascending
//!     member         u64     the member that raised it
//!     kind           u8      1: NOSPACE, 2: CORRUPT (etcd's AlarmType)
//! auth (absent before v5)
//!   auth_len         u32     <= AUTH_SECTION_BYTES_MAX
//!   auth             [u8; auth_len]  `AuthState::encode`: enabled u8,
//!                            revision u64, users (name, password hash,
//!                            roles), roles (name, permissions), tokens
//!                            (token, user, expiry); counts u32, strings
//!                            u32-length-prefixed
//! trailer
//!   crc32c           u32     over every byte before it
//! ```
//!
//! Only versions readable at or above `compact_revision` are written: of
//! each key, nothing below its latest version `<= compact_revision`, and
//! that one only if it is live. So the bytes do not depend on how far
//! physical compaction got, and the reader refuses any version compaction
//! would have dropped. A key's versions share one copy of its bytes, in the
//! stream (`key_len` 0) and in the store read back.
//!
//! Integers are little-endian. Both sides stream: the writer holds one
//! batch of records (about [`WRITE_BATCH_BYTES`]) at a time, the reader one
//! record (and the store it builds). The reader consumes exactly the snapshot's bytes, so a snapshot
//! can sit inside a larger stream; give it a buffered reader. Anything that
//! does not read back as exactly what was written is a [`SnapshotError`],
//! never a panic and never a different store.

use std::io::{self, Read, Write};

use bytes::Bytes;

use super::{
    check_chain, compact, Alarm, AlarmKind, History, KvStore, Prev, StoreStats, StoreView, Version,
    KEY_BYTES_MAX, REVISION_INITIAL, VALUE_BYTES_MAX,
};

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"SKIFFKV\0";
pub const SNAPSHOT_VERSION: u8 = 6;
/// The version before the records' `sub`, still read.
const SNAPSHOT_VERSION_NO_SUB: u8 = 5;
/// The version before auth, still read.
const SNAPSHOT_VERSION_NO_AUTH: u8 = 4;
/// The version before alarms, still read.
const SNAPSHOT_VERSION_NO_ALARMS: u8 = 3;
/// The version before leases, still read.
const SNAPSHOT_VERSION_NO_LEASES: u8 = 2;
const HEADER_BYTES: usize = 8 + 1 + 8 + 8 + 8;
/// A record after its kind byte.
const RECORD_HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 8 + 8 + 4;
/// A v3–v5 record after its kind byte (no sub).
const RECORD_HEADER_BYTES_V5: usize = RECORD_HEADER_BYTES - 4;
/// A v2 record after its kind byte (no lease, no sub).
const RECORD_HEADER_BYTES_V2: usize = RECORD_HEADER_BYTES_V5 - 8;
const LEASE_BYTES: usize = 8 + 8 + 8;
const ALARM_BYTES: usize = 8 + 1;
const END_BYTES: usize = 8 + 8;
const KIND_END: u8 = 0;
const KIND_LIVE: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// The writer hands the stream batches of about this size.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

const _: () = assert!(KEY_BYTES_MAX <= u32::MAX as usize && VALUE_BYTES_MAX <= u32::MAX as usize);

/// What [`StoreView::write_snapshot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub applied_index: u64,
    pub revision: i64,
    pub compact_revision: i64,
    /// Live keys.
    pub key_count: u64,
    /// Versions written (tombstones included).
    pub version_count: u64,
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
    #[error(
        "snapshot format version {0} is not known (expected {SNAPSHOT_VERSION}, \
         {SNAPSHOT_VERSION_NO_SUB}, {SNAPSHOT_VERSION_NO_AUTH}, {SNAPSHOT_VERSION_NO_ALARMS} or \
         {SNAPSHOT_VERSION_NO_LEASES})"
    )]
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

impl StoreView {
    /// Writes the frozen state to `w` in the snapshot format (module docs
    /// of `store::snapshot`) and flushes it.
    pub fn write_snapshot(&self, w: &mut impl Write) -> io::Result<SnapshotInfo> {
        let mut out = CrcWriter {
            inner: w,
            crc: 0,
            bytes: 0,
        };
        let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES + 1 + RECORD_HEADER_BYTES);
        buf.extend_from_slice(&SNAPSHOT_MAGIC);
        buf.push(SNAPSHOT_VERSION);
        buf.extend_from_slice(&self.applied_index.to_le_bytes());
        buf.extend_from_slice(&self.revision.to_le_bytes());
        buf.extend_from_slice(&self.compact_revision.to_le_bytes());
        debug_assert_eq!(buf.len(), HEADER_BYTES);
        let mut version_count = 0u64;
        let mut prev_key: Option<&Bytes> = None;
        for ((key, mod_revision), v) in compact::logical(&self.history, self.compact_revision) {
            let same_key = prev_key == Some(key);
            buf.push(if v.is_tombstone() {
                KIND_TOMBSTONE
            } else {
                KIND_LIVE
            });
            let key_len = if same_key { 0 } else { key.len() as u32 };
            buf.extend_from_slice(&key_len.to_le_bytes());
            buf.extend_from_slice(&(v.value.len() as u32).to_le_bytes());
            buf.extend_from_slice(&mod_revision.to_le_bytes());
            buf.extend_from_slice(&v.create_revision.to_le_bytes());
            buf.extend_from_slice(&v.version.to_le_bytes());
            buf.extend_from_slice(&v.lease.to_le_bytes());
            buf.extend_from_slice(&v.sub.to_le_bytes());
            if !same_key {
                buf.extend_from_slice(key);
            }
            buf.extend_from_slice(&v.value);
            if buf.len() >= WRITE_BATCH_BYTES {
                out.write_all(&buf)?;
                buf.clear();
            }
            version_count += 1;
            prev_key = Some(key);
        }
        buf.push(KIND_END);
        buf.extend_from_slice(&version_count.to_le_bytes());
        buf.extend_from_slice(&self.stats.keys.to_le_bytes());
        buf.extend_from_slice(&(self.leases.len() as u64).to_le_bytes());
        for (id, lease) in &self.leases {
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&lease.ttl.to_le_bytes());
            buf.extend_from_slice(&lease.remaining.to_le_bytes());
            if buf.len() >= WRITE_BATCH_BYTES {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        buf.extend_from_slice(&(self.alarms.len() as u64).to_le_bytes());
        for alarm in &self.alarms {
            buf.extend_from_slice(&alarm.member.to_le_bytes());
            buf.push(alarm.kind.as_u8());
        }
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        self.auth.encode(&mut buf);
        let auth_len = buf.len() - at - 4;
        if auth_len > super::auth::AUTH_SECTION_BYTES_MAX {
            return Err(io::Error::other("auth state over AUTH_SECTION_BYTES_MAX"));
        }
        buf[at..at + 4].copy_from_slice(&(auth_len as u32).to_le_bytes());
        out.write_all(&buf)?;
        let (crc, bytes) = (out.crc, out.bytes);
        w.write_all(&crc.to_le_bytes())?;
        w.flush()?;
        Ok(SnapshotInfo {
            applied_index: self.applied_index,
            revision: self.revision,
            compact_revision: self.compact_revision,
            key_count: self.stats.keys,
            version_count,
            bytes: bytes + 4,
            crc32c: crc,
        })
    }

    /// The store revision when frozen.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The last Raft log index applied when frozen.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The compact revision when frozen: reads and events below it are
    /// gone.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }
}

impl KvStore {
    /// Writes the whole state to `w` in the snapshot format (module docs of
    /// `store::snapshot`) and flushes it; `self.freeze().write_snapshot(w)`.
    pub fn write_snapshot(&self, w: &mut impl Write) -> io::Result<SnapshotInfo> {
        self.freeze().write_snapshot(w)
    }

    /// Reads a snapshot written by [`StoreView::write_snapshot`]; the store
    /// it returns equals the one that wrote it, fully compacted.
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
        if ![
            SNAPSHOT_VERSION,
            SNAPSHOT_VERSION_NO_SUB,
            SNAPSHOT_VERSION_NO_AUTH,
            SNAPSHOT_VERSION_NO_ALARMS,
            SNAPSHOT_VERSION_NO_LEASES,
        ]
        .contains(&version)
        {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let with_leases = version >= SNAPSHOT_VERSION_NO_ALARMS;
        let with_alarms = version >= SNAPSHOT_VERSION_NO_AUTH;
        let with_auth = version >= SNAPSHOT_VERSION_NO_SUB;
        let with_sub = version >= SNAPSHOT_VERSION;
        let record_header_bytes = if with_sub {
            RECORD_HEADER_BYTES
        } else if with_leases {
            RECORD_HEADER_BYTES_V5
        } else {
            RECORD_HEADER_BYTES_V2
        };
        let applied_index = fields.u64();
        let revision = fields.i64();
        let compact_revision = fields.i64();
        if revision < REVISION_INITIAL {
            return Err(input.corrupt("revision below the initial revision"));
        }
        if !(0 <= compact_revision && compact_revision <= revision) {
            return Err(input.corrupt("compact revision out of range"));
        }
        let mut history = History::new();
        let mut stats = StoreStats::default();
        // The previous record: its key, mod revision and version.
        let mut prev: Option<(Bytes, i64, Version)> = None;
        // Bounded by the stream: records end at the end marker.
        loop {
            let mut kind = [0u8; 1];
            input.read(&mut kind, "record kind")?;
            let tombstone = match kind[0] {
                KIND_END => break,
                KIND_LIVE => false,
                KIND_TOMBSTONE => true,
                _ => return Err(input.corrupt("unknown record kind")),
            };
            let mut record_header = [0u8; RECORD_HEADER_BYTES];
            let record_header = &mut record_header[..record_header_bytes];
            input.read(record_header, "record header")?;
            let mut fields = Fields(record_header);
            let key_len = fields.u32() as usize;
            let value_len = fields.u32() as usize;
            let (mod_revision, create_revision, version) =
                (fields.i64(), fields.i64(), fields.i64());
            let lease = if with_leases { fields.i64() } else { 0 };
            let sub = if with_sub { fields.u32() } else { 0 };
            if lease < 0 || (version == 0 && lease != 0) {
                return Err(input.corrupt("lease id out of range"));
            }
            if key_len > KEY_BYTES_MAX {
                return Err(input.corrupt("key length out of bounds"));
            }
            if value_len > VALUE_BYTES_MAX {
                return Err(input.corrupt("value length out of bounds"));
            }
            if tombstone != (version == 0) {
                return Err(input.corrupt("record kind does not match its version"));
            }
            let key = match (&prev, key_len) {
                (None, 0) => return Err(input.corrupt("first record without a key")),
                (Some((prev_key, ..)), 0) => prev_key.clone(),
                (_, _) => {
                    let mut key = vec![0u8; key_len];
                    input.read(&mut key, "key")?;
                    let key = Bytes::from(key);
                    if prev.as_ref().is_some_and(|(prev_key, ..)| *prev_key >= key) {
                        return Err(input.corrupt("keys not in ascending order"));
                    }
                    key
                }
            };
            let mut value = vec![0u8; value_len];
            input.read(&mut value, "value")?;
            let v = Version {
                create_revision,
                version,
                value: Bytes::from(value),
                lease,
                sub,
            };
            let same_key = prev.as_ref().filter(|(prev_key, ..)| *prev_key == key);
            let chain = same_key.map(|(_, prev_revision, prev_version)| Prev {
                mod_revision: *prev_revision,
                version: prev_version,
            });
            check_chain(
                &key,
                mod_revision,
                &v,
                chain,
                revision,
                compact_revision,
                compact_revision,
            )
            .map_err(|reason| input.corrupt(reason))?;
            if same_key.is_none() {
                if let Some((_, _, prev_version)) = &prev {
                    stats.keys += u64::from(!prev_version.is_tombstone());
                }
                stats.bytes += key.len() as u64 + super::KEY_OVERHEAD_BYTES;
            }
            stats.versions += 1;
            stats.bytes += v.bytes();
            history.insert((key.clone(), mod_revision), v.clone());
            prev = Some((key, mod_revision, v));
        }
        if let Some((_, _, prev_version)) = &prev {
            stats.keys += u64::from(!prev_version.is_tombstone());
        }
        let mut end = [0u8; END_BYTES];
        input.read(&mut end, "record counts")?;
        let mut fields = Fields(&end);
        if fields.u64() != stats.versions {
            return Err(input.corrupt("version count does not match the records"));
        }
        if fields.u64() != stats.keys {
            return Err(input.corrupt("key count does not match the records"));
        }
        let mut leases = super::Leases::new();
        if with_leases {
            let mut count = [0u8; 8];
            input.read(&mut count, "lease count")?;
            let count = u64::from_le_bytes(count);
            let mut last = 0i64;
            // Bounded by the stream: a count larger than what follows ends
            // in Truncated.
            for _ in 0..count {
                let mut raw = [0u8; LEASE_BYTES];
                input.read(&mut raw, "lease")?;
                let mut f = Fields(&raw);
                let (id, ttl, remaining) = (f.i64(), f.i64(), f.i64());
                if id <= last {
                    return Err(input.corrupt("lease ids not positive and ascending"));
                }
                if !(1..=super::LEASE_TTL_MAX).contains(&ttl) || !(0..=ttl).contains(&remaining) {
                    return Err(input.corrupt("lease TTL out of range"));
                }
                last = id;
                leases.insert(
                    id,
                    super::Lease {
                        ttl,
                        remaining,
                        keys: imbl::OrdSet::new(),
                    },
                );
            }
        }
        let mut alarms = super::alarm::Alarms::new();
        if with_alarms {
            let mut count = [0u8; 8];
            input.read(&mut count, "alarm count")?;
            let count = u64::from_le_bytes(count);
            let mut last: Option<Alarm> = None;
            // Bounded by the stream, as the leases.
            for _ in 0..count {
                let mut raw = [0u8; ALARM_BYTES];
                input.read(&mut raw, "alarm")?;
                let mut f = Fields(&raw);
                let member = f.u64();
                let [kind] = f.take::<1>();
                let kind =
                    AlarmKind::from_u8(kind).ok_or_else(|| input.corrupt("unknown alarm kind"))?;
                let alarm = Alarm { member, kind };
                if last.is_some_and(|last| last >= alarm) {
                    return Err(input.corrupt("alarms not in ascending order"));
                }
                last = Some(alarm);
                alarms.insert(alarm);
            }
        }
        let mut auth = super::auth::AuthState::default();
        if with_auth {
            let mut len = [0u8; 4];
            input.read(&mut len, "auth length")?;
            let len = u32::from_le_bytes(len) as usize;
            if len > super::auth::AUTH_SECTION_BYTES_MAX {
                return Err(input.corrupt("auth section over AUTH_SECTION_BYTES_MAX"));
            }
            let mut raw = vec![0u8; len];
            input.read(&mut raw, "auth state")?;
            auth = super::auth::AuthState::decode(&raw).map_err(|reason| input.corrupt(reason))?;
        }
        let computed = input.crc;
        let mut trailer = [0u8; 4];
        input.read_raw(&mut trailer, "checksum")?;
        let stored = u32::from_le_bytes(trailer);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let mut store = KvStore::new();
        // Versions come in (key, revision) order: the last one seen of a
        // key is its latest.
        for (at, v) in &history {
            store
                .latest
                .insert(at.0.clone(), super::LatestVersion::of(at.1, v));
        }
        for (key, l) in store.latest.iter() {
            if l.version != 0 && l.lease != 0 {
                match leases.get_mut(&l.lease) {
                    Some(lease) => {
                        lease.keys.insert(key.clone());
                    }
                    None => return Err(input.corrupt("a key names a lease not held")),
                }
            }
        }
        store.leases = leases;
        store.alarms = alarms;
        store.auth = std::sync::Arc::new(auth);
        store.history = history;
        store.revision = revision;
        store.compact_revision = compact_revision;
        store.physically_compacted = compact_revision;
        store.applied_index = applied_index;
        store.stats = stats;
        Ok(store)
    }
}
