//! Set-up shared by the tests that run the WAL on the simulated disk.

use std::sync::Arc;
use std::time::Duration;

use skiff_wal::sim::SimStorage;
use skiff_wal::sim_ring::{self, SimRing};
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

/// The I/O path a WAL runs on.
#[derive(Debug, Clone)]
#[allow(dead_code)] // not every test binary runs both
pub enum Io {
    Pwritev,
    /// The io_uring backend's logic over a simulated ring (see
    /// [`skiff_wal::sim_ring`]).
    Ring(SimRing),
}

#[allow(dead_code)]
impl Io {
    pub fn ring(seed: u64) -> Io {
        Io::Ring(SimRing::new(seed))
    }

    pub fn is_ring(&self) -> bool {
        matches!(self, Io::Ring(_))
    }
}

/// Opens the WAL on `sim` on the I/O path `io`.
#[allow(dead_code)]
pub fn open_on(sim: &SimStorage, opts: Options, io: &Io) -> skiff_wal::Result<Wal> {
    match io {
        Io::Pwritev => open_with(sim, opts),
        Io::Ring(ring) => sim_ring::open(DIR, opts, sim, ring),
    }
}
