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
//!
//! Directories: a directory the node creates, and a file it creates,
//! renames or removes where the result must survive a power loss, is only
//! durable once the directory holding its entry is fsynced.
//! [`create_dir_durable`] and [`sync_dir`] are the one place that does it.

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

/// An I/O error on a directory: what was done (`op`) and to which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct DirError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl From<DirError> for std::io::Error {
    /// Keeps the kind; the message names the operation and the path.
    fn from(e: DirError) -> std::io::Error {
        std::io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Makes the entries of `dir` durable: files and directories created,
/// renamed or removed in it survive a power loss once this returns.
pub fn sync_dir(dir: &Path) -> Result<(), DirError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DirError {
            op: "fsync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// The directory holding `path`'s entry (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `dir` and whichever of its ancestors are missing, durably: each
/// directory created is fsynced, then the directory holding its entry, top
/// down (a file made durable inside a directory whose own entry was not
/// could vanish with it). An existing directory is left as it is; a path
/// that exists and is not a directory, or one under a file, is an error
/// naming the path.
pub fn create_dir_durable(dir: &Path) -> Result<(), DirError> {
    let error = |path: &Path, source| DirError {
        op: "create directory",
        path: path.to_path_buf(),
        source,
    };
    // Missing components, deepest first. Bounded by the path's length.
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(error(
                    at,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a directory",
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(at);
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    // A relative path's first component: `.` exists.
                    _ => break,
                }
            }
            Err(e) => return Err(error(at, e)),
        }
    }
    for &new in missing.iter().rev() {
        match std::fs::create_dir(new) {
            Ok(()) => {}
            // Created meanwhile by another (the WAL, a concurrent start):
            // still fsynced below, as its creator may not have.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && new.is_dir() => {}
            Err(e) => return Err(error(new, e)),
        }
        sync_dir(new)?;
        sync_dir(parent_dir(new))?;
    }
    Ok(())
}

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
/// The snapshot files in `dir` (`snapshot-<index>-<term>.snap`), by index.
pub fn snapshot_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name.strip_prefix("snapshot-")?.get(..20)?.parse().ok()?;
            name.ends_with(".snap").then(|| (index, e.path()))
        })
        .collect();
    files.sort();
    files
}

/// At start: removes the snapshot files above the one the WAL records
/// (`recorded`; all of them when it records none). Such a file was written
/// but not yet told to the core (the loop tells a snapshot only once it is
/// `snapshot_catchup_entries` behind what is applied), so nothing durable
/// refers to it and the member replays its log from the recorded one; a
/// member restarted more often than that would otherwise leave one more
/// file behind at every start. Returns how many were removed.
pub fn remove_unrecorded_snapshots(dir: &Path, recorded: Option<u64>) -> usize {
    let mut removed = 0;
    for (index, path) in snapshot_files(dir) {
        if recorded.is_some_and(|r| index <= r) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "an unrecorded snapshot file could not be removed"),
        }
    }
    removed
}

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
    fn snapshots_above_the_recorded_one_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: u64, t: u64| snapshot_path(dir.path(), i, t);
        for (i, t) in [(10, 1), (20, 2), (30, 2), (31, 3)] {
            std::fs::write(name(i, t), b"x").unwrap();
        }
        std::fs::write(dir.path().join("snapshot-fetch.tmp"), b"x").unwrap();
        assert_eq!(remove_unrecorded_snapshots(dir.path(), Some(20)), 2);
        let left: Vec<u64> = snapshot_files(dir.path()).iter().map(|f| f.0).collect();
        assert_eq!(left, [10, 20]);
        assert!(
            dir.path().join("snapshot-fetch.tmp").exists(),
            "not a snapshot file"
        );
        assert_eq!(remove_unrecorded_snapshots(dir.path(), None), 2);
        assert!(snapshot_files(dir.path()).is_empty());
    }

    #[test]
    fn create_dir_durable_makes_every_missing_component() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("data").join("snap").join("incoming");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        // Existing: nothing to do, no error.
        create_dir_durable(&deep).unwrap();
        create_dir_durable(root.path()).unwrap();
        sync_dir(&deep).unwrap();
    }

    #[test]
    fn create_dir_durable_names_the_path_it_could_not_create() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();

        let under = file.join("sub").join("deeper");
        let e = create_dir_durable(&under).unwrap_err();
        assert_eq!(e.op, "create directory");
        assert_eq!(e.path, under);
        assert_eq!(e.source.kind(), std::io::ErrorKind::NotADirectory, "{e}");
        assert!(e.to_string().contains(&*under.to_string_lossy()), "{e}");
        assert!(!file.join("sub").exists());

        let e = create_dir_durable(&file).unwrap_err();
        assert_eq!(e.path, file);
        assert!(e.to_string().contains("not a directory"), "{e}");

        // Through io::Error (the snapshot thread's path): kind and path kept.
        let missing = root.path().join("missing");
        let e = std::io::Error::from(sync_dir(&missing).unwrap_err());
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        let text = e.to_string();
        assert!(text.starts_with("fsync directory "), "{text}");
        assert!(text.contains(&*missing.to_string_lossy()), "{text}");
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
