//! `skiff snapshot restore`: bootstrap a new cluster's member from a backup
//! taken with Maintenance.Snapshot (`etcdctl snapshot save`).
//!
//! As etcd's `etcdutl snapshot restore`, a restore makes a *new* cluster:
//! run it once per member, with the same backup and the same
//! `--initial-cluster`, then start each member with `skiff serve` and that
//! list. Each member starts with the store at the backup's revision (its
//! history and leases included), a membership of exactly the listed voters
//! (not the old cluster's), and a cluster id other than the old cluster's,
//! so that members of the old cluster (their peer connections carry the
//! cluster id) can never join the new one, even on the same addresses.
//! The id is recorded in the data directory (`cluster_id`), which `skiff
//! serve` runs with (a `--cluster-id` it is given must be that one): it is
//! `--cluster-id` when given (refused if it is the old cluster's), else
//! derived from the backup's header and `--initial-cluster` (see
//! [`restored_cluster_id`]), the same for every member restored from the
//! same backup with the same list.
//!
//! The backup is checked whole first (header, length, checksum, and that
//! its store reads back: a truncated or corrupt file is refused with the
//! reason), the data directory must be missing or empty (anything else is
//! refused untouched), and the directory is built under a temporary name
//! and renamed into place once durable (see `skiff_node::bootstrap`).

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use skiff_kv::api::backup::{copy_backup_snapshot, read_backup, BackupHeader};
use skiff_node::bootstrap::{bootstrap, check_unused, Seed};
use skiff_node::config::{parse_cluster, parse_id, NodeConfig};

/// The term the restored log starts in: a new cluster's first (etcd's
/// restore starts at term 1 too). The old cluster's terms mean nothing to
/// the new one.
pub const RESTORED_TERM: u64 = 1;

/// `skiff snapshot ...`.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Write a new cluster member's data directory from a backup (`etcdctl
    /// snapshot save`); run it for every member of the new cluster with the
    /// same backup and --initial-cluster, then start each with `skiff serve`.
    Restore(RestoreArgs),
}

/// Arguments of `skiff snapshot restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The backup file written by `etcdctl snapshot save`.
    pub file: PathBuf,
    /// The new member's data directory: missing or empty (a directory that
    /// holds anything is refused and left as it is).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// This member's id in the new cluster.
    #[arg(long)]
    pub id: u64,
    /// `1=host:port,2=host:port,...`: peer addresses of the new cluster's
    /// voters, exactly as every member's `skiff serve --initial-cluster`
    /// will give them.
    #[arg(long)]
    pub initial_cluster: String,
    /// The new cluster's id (decimal, or hexadecimal with 0x), recorded in
    /// the data directory: give every member the same. Default: derived
    /// from the backup and --initial-cluster (the same on every member);
    /// never the backed-up cluster's id.
    #[arg(long, value_parser = parse_id)]
    pub cluster_id: Option<u64>,
    /// WAL segment size, bytes: the one the member will run with (`skiff
    /// serve --wal-segment-size`). Default: skiff serve's default.
    #[arg(long)]
    pub wal_segment_size: Option<u64>,
}

/// Runs `skiff snapshot ...`.
pub fn run(cmd: &SnapshotCmd) -> Result<(), String> {
    match cmd {
        SnapshotCmd::Restore(args) => restore(args).map(|done| println!("{done}")),
    }
}

/// What [`restore`] did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub header: BackupHeader,
    /// The new cluster's id (recorded in the data directory).
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    pub id: u64,
    pub initial_cluster: String,
    pub snapshot_len: u64,
    /// Checking the backup, then writing the directory, ms.
    pub verify_ms: u64,
    pub write_ms: u64,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "restored revision {} (Raft index {}, compact revision {}) of cluster {:#x} \
             (served by member {:x}) into {}: member {} of a new cluster {:#x}; \
             backup checked in {} ms, {} snapshot bytes written in {} ms",
            h.revision,
            h.applied_index,
            h.compact_revision,
            h.cluster_id,
            h.member_id,
            self.data_dir.display(),
            self.id,
            self.cluster_id,
            self.verify_ms,
            self.snapshot_len,
            self.write_ms
        )?;
        write!(
            f,
            "start it with: skiff serve --id {} --data-dir {} --initial-cluster {} \
             (and its listen addresses)",
            self.id,
            self.data_dir.display(),
            self.initial_cluster
        )
    }
}

/// Runs `skiff snapshot restore` (see the module docs).
pub fn restore(args: &RestoreArgs) -> Result<Restored, String> {
    let peers = parse_cluster(&args.initial_cluster)
        .map_err(|e| format!("invalid --initial-cluster: {e}"))?;
    if !peers.contains_key(&args.id) {
        return Err(format!(
            "--id {} is not in --initial-cluster {}",
            args.id, args.initial_cluster
        ));
    }
    if args.cluster_id == Some(0) {
        return Err("--cluster-id must not be 0".into());
    }
    check_unused(&args.data_dir).map_err(|e| e.to_string())?;
    let file_error = |e: &dyn std::fmt::Display| format!("{}: {e}", args.file.display());
    let started = Instant::now();
    let (file, len) = open(&args.file).map_err(|e| file_error(&e))?;
    let (header, store) = read_backup(&mut BufReader::with_capacity(1 << 20, file), Some(len))
        .map_err(|e| file_error(&e))?;
    drop(store);
    let verify_ms = started.elapsed().as_millis() as u64;

    let cfg = NodeConfig {
        initial_cluster: peers.clone(),
        wal_segment_size: args
            .wal_segment_size
            .unwrap_or(NodeConfig::default().wal_segment_size),
        ..NodeConfig::default()
    };
    let cluster_id = match args.cluster_id {
        Some(id) if id == header.cluster_id => {
            return Err(format!(
                "--cluster-id {id:#x} is the id of the cluster the backup was taken from; a \
                 restored cluster is a new one (so that the old one's members can never join \
                 it): choose another"
            ))
        }
        Some(id) => id,
        None => restored_cluster_id(&header, &cfg),
    };

    let started = Instant::now();
    let seed = Seed {
        cluster_id: Some(cluster_id),
        ..Seed::with_voters(
            header.applied_index.max(1),
            RESTORED_TERM,
            peers.keys().copied(),
        )
    };
    let done = bootstrap(&args.data_dir, &seed, cfg.wal_options(), |w| {
        let (file, len) = open(&args.file)?;
        let copied =
            copy_backup_snapshot(&mut BufReader::with_capacity(1 << 20, file), Some(len), w)
                .map_err(io::Error::other)?;
        if copied != header {
            return Err(io::Error::other(
                "the backup file changed while it was restored",
            ));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(Restored {
        header,
        cluster_id,
        data_dir: args.data_dir.clone(),
        id: args.id,
        initial_cluster: args.initial_cluster.clone(),
        snapshot_len: done.snapshot_len,
        verify_ms,
        write_ms: started.elapsed().as_millis() as u64,
    })
}

/// The id of a cluster restored from the backup `header` describes onto
/// the addresses of `cfg.initial_cluster`: a 64-bit FNV-1a hash of both, so
/// that every member restored from the same backup with the same list
/// gets the same id, and another backup or another list another one. Never
/// the backed-up cluster's id, never the id `cfg` derives from its list
/// alone (a fresh cluster on those addresses), never 0.
pub fn restored_cluster_id(header: &BackupHeader, cfg: &NodeConfig) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fresh = cfg.cluster_id();
    let bytes = header
        .encode()
        .into_iter()
        .chain(*b"skiff-restore")
        .chain(fresh.to_le_bytes());
    let mut id = bytes.fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    while id == 0 || id == header.cluster_id || id == fresh {
        id = id.wrapping_add(1);
    }
    id
}

fn open(path: &Path) -> io::Result<(File, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cluster_id: u64) -> BackupHeader {
        BackupHeader {
            revision: 10,
            compact_revision: 0,
            applied_index: 12,
            raft_term: 3,
            cluster_id,
            member_id: 1,
            snapshot_len: 100,
        }
    }

    fn cfg(list: &str) -> NodeConfig {
        NodeConfig {
            initial_cluster: parse_cluster(list).unwrap(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn a_restored_cluster_gets_a_new_id_the_same_on_every_member() {
        let list = cfg("1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3");
        // The backed-up cluster ran on these very addresses.
        let old = header(list.cluster_id());
        let id = restored_cluster_id(&old, &list);
        assert_eq!(id, restored_cluster_id(&old, &list));
        assert!(id != 0 && id != old.cluster_id && id != list.cluster_id());
        // Another backup, another list: another id.
        let other = BackupHeader {
            revision: 11,
            ..old
        };
        assert_ne!(restored_cluster_id(&other, &list), id);
        assert_ne!(
            restored_cluster_id(&old, &cfg("1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:4")),
            id
        );
    }
}
