//! `skiff snapshot restore`: bootstrap a new cluster's member from a backup
//! taken with Maintenance.Snapshot (`etcdctl snapshot save`).

use std::path::PathBuf;

/// Arguments of `skiff snapshot restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The backup file written by `etcdctl snapshot save`.
    pub file: PathBuf,
}

/// Runs `skiff snapshot restore`.
pub fn restore(_args: &RestoreArgs) -> Result<(), String> {
    Err("skiff snapshot restore: not built yet".into())
}
