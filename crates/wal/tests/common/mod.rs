//! Set-up shared by the tests that run the WAL on the simulated disk.

use std::sync::Arc;
use std::time::Duration;

use skiff_wal::sim::SimStorage;
use skiff_wal::{Backend, Options, Wal};

/// Where the WAL lives on the simulated disk.
pub const DIR: &str = "/wal";

/// Small segments (16 KiB) so that short workloads rotate, the pwritev
/// backend (the simulated disk has no descriptors), generous timeouts.
pub fn options(spare_segments: usize) -> Options {
    Options {
        segment_size: 16 << 10,
        spare_segments,
        snapshot_meta_max: 256,
        backend: Backend::Pwritev,
        submit_timeout: Duration::from_secs(10),
        wait_timeout: Duration::from_secs(10),
        ..Options::default()
    }
}

pub fn open_with(sim: &SimStorage, opts: Options) -> skiff_wal::Result<Wal> {
    Wal::open_with_storage(DIR, opts, Arc::new(sim.clone()))
}
