//! Writing a new member's data directory from a state machine's snapshot:
//! what `skiff snapshot restore` builds a restored cluster's members with.
//!
//! The directory is what a member that installed that snapshot would have
//! (see [`crate::storage`]):
//!
//! ```text
//! <data-dir>/snap/snapshot-{index:020}-{term:020}.snap   the snapshot bytes
//! <data-dir>/wal/                                       one segment holding
//!     a Snapshot record (index, term, the membership given) and a
//!     HardState record (term, no vote, commit = index)
//! <data-dir>/cluster_id                                 the cluster id, when
//!     the seed names one (`crate::node::CLUSTER_ID_FILE`: the member runs
//!     with it whatever its configuration derives, and refuses another
//!     configured one)
//! ```
//!
//! so [`crate::Node::start`] restores the state machine from the file,
//! takes the membership from the WAL's record (not from its
//! `initial_cluster`), and starts its log after `index`. Every member of a
//! new cluster is bootstrapped from the same snapshot with the same
//! (index, term, membership): their logs agree at `index`, one of them is
//! elected and appends from there.
//!
//! Knows nothing of what the state machine holds: it takes the snapshot's
//! bytes from a writer callback. It never touches a directory that holds
//! anything: the whole directory is built under a temporary name beside
//! it, checked (the WAL reopened and read back, the file's length and
//! checksum), made durable (every file and directory fsynced), and only
//! then renamed into place; a failure leaves nothing behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use skiff_raft::{Membership, NodeId};
use skiff_wal::{Wal, WriteBatch};

use crate::storage;

/// What a bootstrapped member starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The last log index the snapshot covers (its state machine applied
    /// through it); the member's log starts after it. At least 1.
    pub index: u64,
    /// The term of that index in the new cluster's log; the members' term
    /// starts there. At least 1.
    pub term: u64,
    /// The membership in force at `index`: the new cluster's voters.
    pub membership: Membership,
    /// The cluster id to record; `None`: the member records the one its
    /// configuration gives at its first start.
    pub cluster_id: Option<u64>,
}

impl Seed {
    /// A seed whose membership is exactly `voters`.
    pub fn with_voters(index: u64, term: u64, voters: impl IntoIterator<Item = NodeId>) -> Seed {
        Seed {
            index,
            term,
            membership: Membership::with_voters(voters),
            cluster_id: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrapped {
    /// The snapshot file, under its final name.
    pub snapshot_path: PathBuf,
    pub snapshot_len: u64,
    pub snapshot_crc32c: u32,
}

/// Why a data directory could not be bootstrapped. Nothing was left behind.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "data directory {path} is not empty ({what}): refusing to touch it; \
         bootstrap writes a new member's directory, give a missing or empty one"
    )]
    NotEmpty { path: PathBuf, what: String },
    #[error("invalid seed: {0}")]
    InvalidSeed(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("writing the snapshot: {0}")]
    Snapshot(#[source] io::Error),
    #[error("WAL in {path}: {source}")]
    Wal {
        path: PathBuf,
        source: skiff_wal::Error,
    },
    #[error("the data directory does not read back as written: {0}")]
    Verify(String),
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> BootstrapError + 'a {
    move |source| BootstrapError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `dir` is missing or an empty directory.
pub fn check_unused(dir: &Path) -> Result<(), BootstrapError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("inspect", dir)(e)),
        Ok(m) if !m.is_dir() => Err(BootstrapError::NotEmpty {
            path: dir.to_path_buf(),
            what: "it is not a directory".into(),
        }),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir).map_err(io_error("list", dir))?;
            match entries.next() {
                None => Ok(()),
                Some(entry) => {
                    let name = entry
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .unwrap_or_else(|e| format!("unreadable entry: {e}"));
                    Err(BootstrapError::NotEmpty {
                        path: dir.to_path_buf(),
                        what: format!("it holds {name}"),
                    })
                }
            }
        }
    }
}

/// Writes a member's data directory at `data_dir` (missing or empty) that
/// starts from `seed` with the state machine snapshot that `write` writes.
/// `wal` are the options of the WAL (its segment size should be the one the
/// member will run with). An error from `write` (a backup found corrupt
/// while it is copied) aborts, leaving nothing.
pub fn bootstrap(
    data_dir: &Path,
    seed: &Seed,
    wal: skiff_wal::Options,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Bootstrapped, BootstrapError> {
    if seed.index == 0 || seed.term == 0 {
        return Err(BootstrapError::InvalidSeed(format!(
            "index {} and term {} must be at least 1",
            seed.index, seed.term
        )));
    }
    if seed.cluster_id == Some(0) {
        return Err(BootstrapError::InvalidSeed("cluster id 0".into()));
    }
    if seed.membership.voters.is_empty() || seed.membership.is_joint() {
        return Err(BootstrapError::InvalidSeed(format!(
            "the membership must name the voters and not be joint: {:?}",
            seed.membership
        )));
    }
    check_unused(data_dir)?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    storage::create_dir_durable(&parent).map_err(dir_error)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| BootstrapError::InvalidSeed(format!("{} has no name", data_dir.display())))?
        .to_string_lossy()
        .into_owned();
    // Removed on any error (dropped); kept and renamed on success.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.bootstrap-"))
        .tempdir_in(&parent)
        .map_err(io_error("create a temporary directory in", &parent))?;
    let written = build(tmp.path(), seed, wal, write)?;
    let tmp_path = tmp.keep();
    let result = (|| {
        check_unused(data_dir)?;
        // Replaces an empty directory, fails on one that got something in
        // the meantime (ENOTEMPTY): never overwrites.
        std::fs::rename(&tmp_path, data_dir).map_err(io_error("rename into", data_dir))?;
        fsync_dir(&parent)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(e);
    }
    let file_name = written
        .snapshot_path
        .file_name()
        .expect("the snapshot file has a name");
    Ok(Bootstrapped {
        snapshot_path: data_dir.join("snap").join(file_name),
        ..written
    })
}

/// Builds the directory's contents in `dir` and checks them.
fn build(
    dir: &Path,
    seed: &Seed,
    wal_options: skiff_wal::Options,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Bootstrapped, BootstrapError> {
    let snap_dir = dir.join("snap");
    let wal_dir = dir.join("wal");
    for d in [&snap_dir, &wal_dir] {
        std::fs::create_dir(d).map_err(io_error("create", d))?;
    }
    let path = storage::snapshot_path(&snap_dir, seed.index, seed.term);
    let file = std::fs::File::create(&path).map_err(io_error("create", &path))?;
    let mut w = storage::CrcWriter::new(io::BufWriter::with_capacity(1 << 20, file));
    write(&mut w).map_err(BootstrapError::Snapshot)?;
    w.flush().map_err(io_error("write", &path))?;
    let (len, crc) = (w.len, w.crc);
    let file = w
        .inner
        .into_inner()
        .map_err(|e| io_error("write", &path)(e.into_error()))?;
    file.sync_all().map_err(io_error("fsync", &path))?;
    drop(file);
    fsync_dir(&snap_dir)?;

    let mut data = BytesMut::new();
    storage::encode_membership(&seed.membership, &mut data);
    let wal_error = |source| BootstrapError::Wal {
        path: wal_dir.clone(),
        source,
    };
    let wal_options = skiff_wal::Options {
        // A spare segment would be preallocated for nothing.
        spare_segments: 0,
        ..wal_options
    };
    let wal = Wal::open(&wal_dir, wal_options.clone()).map_err(wal_error)?;
    let ticket = wal
        .write(WriteBatch {
            snapshot: Some(skiff_wal::SnapshotMeta {
                index: seed.index,
                term: seed.term,
                data: data.freeze(),
            }),
            hard_state: Some(skiff_wal::HardState {
                term: seed.term,
                vote: 0,
                commit: seed.index,
            }),
            ..WriteBatch::default()
        })
        .map_err(wal_error)?;
    ticket.wait().map_err(wal_error)?;
    wal.close().map_err(wal_error)?;
    fsync_dir(&wal_dir)?;

    // Read it back as a starting member would.
    let wal = Wal::open(&wal_dir, wal_options).map_err(wal_error)?;
    let recovered =
        storage::recover(&wal, &snap_dir).map_err(|e| BootstrapError::Verify(e.to_string()))?;
    wal.close().map_err(wal_error)?;
    let r = &recovered.restored;
    let expected = Some((seed.index, seed.term, path.clone()));
    if recovered.snapshot != expected
        || r.membership.as_ref() != Some(&seed.membership)
        || !r.entries.is_empty()
        || (r.hard_state.term, r.hard_state.vote, r.hard_state.commit) != (seed.term, 0, seed.index)
    {
        return Err(BootstrapError::Verify(format!(
            "expected snapshot {expected:?} with {:?}, read {recovered:?}",
            seed.membership
        )));
    }
    if let Some(id) = seed.cluster_id {
        let file = dir.join(crate::node::CLUSTER_ID_FILE);
        write_durably(&file, format!("{id:#x}\n").as_bytes())?;
        let text = std::fs::read_to_string(&file).map_err(io_error("read back", &file))?;
        if crate::config::parse_id(text.trim()) != Ok(id) {
            return Err(BootstrapError::Verify(format!(
                "{} reads {text:?}, {id:#x} was written",
                file.display()
            )));
        }
    }
    let on_disk = crate::event_loop::file_crc(&path).map_err(io_error("read back", &path))?;
    let on_disk_len = std::fs::metadata(&path)
        .map_err(io_error("stat", &path))?
        .len();
    if (on_disk_len, on_disk) != (len, crc) {
        return Err(BootstrapError::Verify(format!(
            "{}: {on_disk_len} bytes with CRC32C {on_disk:#010x}, {len} bytes with \
             {crc:#010x} were written",
            path.display()
        )));
    }
    fsync_dir(dir)?;
    Ok(Bootstrapped {
        snapshot_path: path,
        snapshot_len: len,
        snapshot_crc32c: crc,
    })
}

/// Writes `bytes` to a new file at `path` and fsyncs it (the directory is
/// fsynced by the caller).
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BootstrapError> {
    let mut f = std::fs::File::create(path).map_err(io_error("create", path))?;
    f.write_all(bytes).map_err(io_error("write", path))?;
    f.sync_all().map_err(io_error("fsync", path))
}

fn fsync_dir(dir: &Path) -> Result<(), BootstrapError> {
    storage::sync_dir(dir).map_err(dir_error)
}

fn dir_error(e: storage::DirError) -> BootstrapError {
    BootstrapError::Io {
        what: e.op,
        path: e.path,
        source: e.source,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use super::*;
    use crate::config::NodeConfig;
    use crate::embedded::EmbeddedCluster;
    use crate::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};

    /// A sum of the commands, snapshotted as 8 bytes.
    #[derive(Default)]
    struct Sum(u64);

    struct Frozen(u64);

    impl SnapshotView for Frozen {
        fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
            w.write_all(&self.0.to_le_bytes())
        }
    }

    impl StateMachine for Sum {
        type Command = u64;
        type Response = u64;
        type Query = ();
        type QueryResponse = u64;
        type Snapshot = Frozen;

        fn encode_command(add: &u64, out: &mut BytesMut) {
            out.extend_from_slice(&add.to_le_bytes());
        }

        fn apply(&mut self, batch: &[Committed], out: &mut Vec<u64>) -> Result<(), ApplyError> {
            for e in batch {
                let Some(cmd) = &e.command else { continue };
                let add: [u8; 8] = cmd[..].try_into().map_err(|_| ApplyError {
                    index: e.index,
                    reason: "not a u64".into(),
                })?;
                self.0 += u64::from_le_bytes(add);
                out.push(self.0);
            }
            Ok(())
        }

        fn query(&self, _: &()) -> u64 {
            self.0
        }

        fn snapshot(&self) -> Frozen {
            Frozen(self.0)
        }

        fn restore(r: &mut dyn Read) -> Result<Self, RestoreError> {
            let mut b = [0; 8];
            r.read_exact(&mut b)?;
            Ok(Sum(u64::from_le_bytes(b)))
        }
    }

    /// What a member with 1 MiB segments runs its WAL with.
    fn small_wal() -> skiff_wal::Options {
        NodeConfig {
            wal_segment_size: 1 << 20,
            ..NodeConfig::default()
        }
        .wal_options()
    }

    #[test]
    fn refuses_used_directories_and_leaves_nothing_on_error() {
        let root = tempfile::tempdir().unwrap();
        let used = root.path().join("used");
        std::fs::create_dir(&used).unwrap();
        std::fs::write(used.join("keep-me"), b"x").unwrap();
        let seed = Seed::with_voters(10, 1, [1, 2, 3]);
        let e = bootstrap(&used, &seed, small_wal(), |w| w.write_all(b"12345678")).unwrap_err();
        assert!(matches!(e, BootstrapError::NotEmpty { .. }), "{e}");
        assert_eq!(std::fs::read(used.join("keep-me")).unwrap(), b"x");
        let file = root.path().join("file");
        std::fs::write(&file, b"y").unwrap();
        assert!(matches!(
            bootstrap(&file, &seed, small_wal(), |_| Ok(())).unwrap_err(),
            BootstrapError::NotEmpty { .. }
        ));
        // A writer that fails: nothing is left, not even the temporary
        // directory.
        let fresh = root.path().join("fresh");
        let e = bootstrap(&fresh, &seed, small_wal(), |_| {
            Err(io::Error::other("corrupt backup"))
        })
        .unwrap_err();
        assert!(matches!(e, BootstrapError::Snapshot(_)), "{e}");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(!fresh.exists());
        for bad in [
            Seed::with_voters(0, 1, [1]),
            Seed::with_voters(1, 0, [1]),
            Seed::with_voters(1, 1, []),
        ] {
            assert!(matches!(
                bootstrap(&fresh, &bad, small_wal(), |_| Ok(())).unwrap_err(),
                BootstrapError::InvalidSeed(_)
            ));
        }
    }

    #[test]
    fn a_bootstrapped_cluster_starts_from_the_snapshot() {
        let root = tempfile::tempdir().unwrap();
        // Empty directories are fine.
        std::fs::create_dir(root.path().join("node-1")).unwrap();
        let seed = Seed {
            cluster_id: Some(0xB00),
            ..Seed::with_voters(1_000, 1, [1, 2, 3])
        };
        for id in 1..=3u64 {
            let dir = root.path().join(format!("node-{id}"));
            let done = bootstrap(&dir, &seed, small_wal(), |w| {
                w.write_all(&41u64.to_le_bytes())
            })
            .unwrap();
            assert_eq!(done.snapshot_len, 8);
            assert!(done.snapshot_path.starts_with(&dir), "{done:?}");
            assert!(done.snapshot_path.is_file());
        }
        let cfg = NodeConfig {
            snapshot_entries: 1_000_000,
            wal_segment_size: small_wal().segment_size,
            ..NodeConfig::default()
        };
        let cluster = EmbeddedCluster::start_in(
            3,
            &cfg,
            root.path(),
            Box::new(|cfg: NodeConfig| crate::Node::start(cfg, Sum::default())),
        )
        .unwrap();
        let leader = cluster
            .wait_leader(Duration::from_secs(20))
            .expect("a leader");
        let node = cluster.node(leader).unwrap().handle().clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(node.query((), true).await.unwrap(), 41);
            assert_eq!(node.propose(1).await.unwrap(), 42);
        });
        let s = node.status();
        assert!(s.applied > 1_000 && s.commit > 1_000, "{s:?}");
        assert_eq!(node.membership().voters, [1, 2, 3].into());
        assert_eq!(node.cluster_id(), 0xB00);
        cluster.shutdown().unwrap();
    }
}
