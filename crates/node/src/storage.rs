//! Between the Raft core and the WAL: how entries, memberships and snapshot
//! records are stored, and how a node restarts from its data directory.
//!
//! A Raft entry's payload is stored as the WAL entry's bytes:
//!
//! ```text
//! empty                      Payload::Noop
//! 0xFE, membership           Payload::Membership
//! anything else              Payload::Normal (a client command; its first
//!                            byte is the command format version, never 0xFE)
//! membership: voters, outgoing, learners, each a u32 LE count then that
//!             many u64 LE node ids; then (absent in data written before
//!             member meta existed) a u32 LE count of meta entries, each
//!             u64 LE id, u32 LE length, that many bytes (see
//!             [`crate::members::MemberInfo`])
//! ```
//!
//! A snapshot is a file `snap/snapshot-{index:020}-{term:020}.snap` (the
//! KV store's snapshot format) made durable before the WAL records it; the
//! WAL's snapshot record carries the membership in force at its index.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use skiff_raft::{Entry, HardState, Membership, NodeId, Payload, Restored};
use skiff_wal::Wal;

/// First byte of a stored membership entry.
pub const MEMBERSHIP_TAG: u8 = 0xFE;
/// Members per set accepted when decoding (a corrupt count is an error,
/// not an allocation).
pub const MEMBERS_MAX: usize = 1024;
/// Bytes of one member's meta accepted when decoding.
pub const MEMBER_META_BYTES_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("WAL: {0}")]
    Wal(#[from] skiff_wal::Error),
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("snapshot file {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A writer that counts and checksums (CRC32C) what passes through:
/// snapshot files, backups, restored data directories.
pub struct CrcWriter<W> {
    pub inner: W,
    /// Bytes written.
    pub len: u64,
    /// CRC32C of them.
    pub crc: u32,
}

impl<W> CrcWriter<W> {
    pub fn new(inner: W) -> CrcWriter<W> {
        CrcWriter {
            inner,
            len: 0,
            crc: 0,
        }
    }
}

impl<W: std::io::Write> std::io::Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub fn encode_membership(m: &Membership, out: &mut BytesMut) {
    for set in [&m.voters, &m.outgoing, &m.learners] {
        out.put_u32_le(set.len() as u32);
        for id in set {
            out.put_u64_le(*id);
        }
    }
    out.put_u32_le(m.meta.len() as u32);
    for (id, meta) in &m.meta {
        out.put_u64_le(*id);
        out.put_u32_le(meta.len() as u32);
        out.put_slice(meta);
    }
}

pub fn decode_membership(mut b: &[u8]) -> Result<Membership, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        what: "membership",
        reason,
    };
    let mut sets: [BTreeSet<NodeId>; 3] = Default::default();
    for set in &mut sets {
        let Some((n, rest)) = b.split_first_chunk::<4>() else {
            return Err(corrupt("truncated count".into()));
        };
        let n = u32::from_le_bytes(*n) as usize;
        if n > MEMBERS_MAX || rest.len() < n * 8 {
            return Err(corrupt(format!("{n} members in {} bytes", rest.len())));
        }
        for chunk in rest[..n * 8].chunks_exact(8) {
            let mut id = [0u8; 8];
            id.copy_from_slice(chunk);
            set.insert(u64::from_le_bytes(id));
        }
        b = &rest[n * 8..];
    }
    let mut meta = BTreeMap::new();
    if !b.is_empty() {
        let Some((n, rest)) = b.split_first_chunk::<4>() else {
            return Err(corrupt("truncated meta count".into()));
        };
        let n = u32::from_le_bytes(*n) as usize;
        if n > MEMBERS_MAX {
            return Err(corrupt(format!("{n} meta entries")));
        }
        b = rest;
        for _ in 0..n {
            let Some((id, rest)) = b.split_first_chunk::<8>() else {
                return Err(corrupt("truncated meta id".into()));
            };
            let Some((len, rest)) = rest.split_first_chunk::<4>() else {
                return Err(corrupt("truncated meta length".into()));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if len > MEMBER_META_BYTES_MAX || rest.len() < len {
                return Err(corrupt(format!("meta of {len} bytes in {}", rest.len())));
            }
            meta.insert(
                u64::from_le_bytes(*id),
                Bytes::copy_from_slice(&rest[..len]),
            );
            b = &rest[len..];
        }
        if !b.is_empty() {
            return Err(corrupt(format!("{} trailing bytes", b.len())));
        }
    }
    let [voters, outgoing, learners] = sets;
    Ok(Membership {
        voters,
        outgoing,
        learners,
        meta,
    })
}

pub fn encode_payload(p: &Payload) -> Bytes {
    match p {
        Payload::Noop => Bytes::new(),
        Payload::Normal(b) => {
            debug_assert!(b.first() != Some(&MEMBERSHIP_TAG) && !b.is_empty());
            b.clone()
        }
        Payload::Membership(m) => {
            let mut out = BytesMut::with_capacity(
                1 + 16
                    + m.members().len() * 8
                    + m.meta.values().map(|b| 12 + b.len()).sum::<usize>(),
            );
            out.put_u8(MEMBERSHIP_TAG);
            encode_membership(m, &mut out);
            out.freeze()
        }
    }
}

pub fn decode_payload(b: Bytes) -> Result<Payload, StorageError> {
    match b.first() {
        None => Ok(Payload::Noop),
        Some(&MEMBERSHIP_TAG) => Ok(Payload::Membership(decode_membership(&b[1..])?)),
        Some(_) => Ok(Payload::Normal(b)),
    }
}

pub fn to_wal(e: &Entry) -> skiff_wal::Entry {
    skiff_wal::Entry {
        index: e.index,
        term: e.term,
        payload: encode_payload(&e.payload),
    }
}

pub fn from_wal(e: skiff_wal::Entry) -> Result<Entry, StorageError> {
    Ok(Entry {
        index: e.index,
        term: e.term,
        payload: decode_payload(e.payload)?,
    })
}

pub fn to_wal_hard_state(h: HardState) -> skiff_wal::HardState {
    skiff_wal::HardState {
        term: h.term,
        vote: h.vote,
        commit: h.commit,
    }
}

/// The snapshot file for `(index, term)` in `dir` (the name skiff-net gives
/// a received snapshot).
pub fn snapshot_path(dir: &Path, index: u64, term: u64) -> PathBuf {
    dir.join(
        skiff_net::SnapshotMeta {
            index,
            term,
            len: 0,
            crc: 0,
        }
        .file_name(),
    )
}

/// What a node restarts from.
#[derive(Debug)]
pub struct Recovered {
    pub restored: Restored,
    /// The snapshot the WAL records: (index, term, file).
    pub snapshot: Option<(u64, u64, PathBuf)>,
}

/// Reads the durable state back from `wal` (opened) and checks that the
/// snapshot file it names exists.
pub fn recover(wal: &Wal, snap_dir: &Path) -> Result<Recovered, StorageError> {
    let hs = wal.hard_state();
    let mut restored = Restored {
        hard_state: HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        },
        ..Restored::default()
    };
    let mut snapshot = None;
    if let Some(meta) = wal.snapshot() {
        let path = snapshot_path(snap_dir, meta.index, meta.term);
        if !path.exists() {
            return Err(StorageError::Snapshot {
                path,
                reason: "the WAL records this snapshot but the file is missing".into(),
            });
        }
        restored.base_index = meta.index;
        restored.base_term = meta.term;
        restored.membership = Some(decode_membership(&meta.data)?);
        snapshot = Some((meta.index, meta.term, path));
    }
    let first = restored.base_index + 1;
    let last = wal.last_index();
    if last >= first {
        restored.entries = wal
            .read(first, last + 1)?
            .into_iter()
            .map(from_wal)
            .collect::<Result<_, _>>()?;
    }
    Ok(Recovered { restored, snapshot })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let m = Membership {
            voters: [1, 2, 3].into(),
            outgoing: [1, 2].into(),
            learners: [9].into(),
            meta: [(1, Bytes::from_static(b"meta of 1")), (9, Bytes::new())].into(),
        };
        for p in [
            Payload::Noop,
            Payload::Normal(Bytes::from_static(b"\x01abc")),
            Payload::Membership(m),
            Payload::Membership(Membership::default()),
        ] {
            assert_eq!(decode_payload(encode_payload(&p)).unwrap(), p);
        }
    }

    #[test]
    fn corrupt_memberships_are_errors() {
        let mut b = BytesMut::new();
        let mut m = Membership::with_voters([1, 2]);
        m.meta.insert(2, Bytes::from_static(b"two"));
        encode_membership(&m, &mut b);
        // Without its meta section: as written before meta existed.
        let legacy = 4 + 16 + 4 + 4;
        for cut in 0..b.len() {
            if cut != legacy {
                assert!(decode_membership(&b[..cut]).is_err(), "cut at {cut}");
            }
        }
        assert_eq!(
            decode_membership(&b[..legacy]).unwrap(),
            Membership::with_voters([1, 2])
        );
        assert_eq!(decode_membership(&b).unwrap(), m);
        let mut huge = BytesMut::new();
        huge.put_u32_le(u32::MAX);
        assert!(decode_membership(&huge).is_err());
        let mut long = b.to_vec();
        long.push(0);
        assert!(decode_membership(&long).is_err());
    }
}
