//! WAL configuration, checked before anything touches the disk.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::format::SEGMENT_HEADER_LEN;

/// Which I/O backend writes and syncs groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring where the kernel allows it, else `Pwritev`.
    Auto,
    /// io_uring only; opening fails if it cannot be set up.
    IoUring,
    /// `pwritev` + `fdatasync` from the driver thread.
    Pwritev,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "io-uring" | "io_uring" | "uring" => Ok(Backend::IoUring),
            "pwritev" | "sync" => Ok(Backend::Pwritev),
            other => Err(format!(
                "unknown WAL backend `{other}` (auto, io-uring, pwritev)"
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io-uring",
            Backend::Pwritev => "pwritev",
        })
    }
}

/// Tunables. `Options::default()` suits a server; tests shrink segments.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per segment file (a multiple of 4096, 16 KiB ..= 4 GiB - 4 KiB).
    pub segment_size: u64,
    pub backend: Backend,
    /// Bound of the queue between writers and the I/O driver, in writes.
    /// A writer finding it full blocks (up to `submit_timeout`).
    pub queue_depth: usize,
    /// Upper bound of one group (one write + one fdatasync), in bytes.
    pub group_bytes_max: usize,
    /// Groups whose fdatasync may be in flight at once on io_uring: each
    /// group is written, then its fdatasync queued while earlier ones still
    /// run. The pwritev backend syncs one group at a time.
    ///
    /// Default 8: this project's disk completes more fdatasyncs per second
    /// when several overlap, and under load the fdatasyncs of io_uring's
    /// worker threads wait for CPU, so more of them in flight keeps the disk
    /// busy. wal-bench, 256 appenders, on the 2-core VM, ratio to the serial
    /// raw loop: 2 in flight 0.64-0.81; 4: 0.83-1.05, below 0.9 in a third
    /// of the runs when the machine was noisy; 8: 1.15-1.29 in every run,
    /// for ~5% fewer entries/s. Each group in flight may keep its buffer
    /// (at most `group_bytes_max`) for reuse.
    pub groups_inflight_max: usize,
    /// Pre-written spare segments kept ready by the background thread; 0
    /// creates each new segment on the writer's thread when it is needed.
    /// Also bounds how many compacted segments are kept for recycling.
    pub spare_segments: usize,
    /// Longest a writer waits for room in the queue or for a spare segment.
    pub submit_timeout: Duration,
    /// Longest [`crate::Ticket::wait`] waits for durability.
    pub wait_timeout: Duration,
    /// Largest snapshot metadata (`SnapshotMeta::data`) in bytes.
    pub snapshot_meta_max: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_size: 64 << 20,
            backend: Backend::Auto,
            queue_depth: 4096,
            group_bytes_max: 4 << 20,
            groups_inflight_max: 8,
            spare_segments: 1,
            submit_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(30),
            snapshot_meta_max: 1 << 20,
        }
    }
}

impl Options {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidOption { field, reason });
        if self.segment_size % 4096 != 0
            || self.segment_size < 16 << 10
            || self.segment_size >= 1 << 32
        {
            return bad(
                "segment_size",
                format!(
                    "{} is not a multiple of 4096 between 16 KiB and 4 GiB",
                    self.segment_size
                ),
            );
        }
        if self.queue_depth == 0 || self.queue_depth > 1 << 20 {
            return bad(
                "queue_depth",
                format!("{} is not in 1..=1048576", self.queue_depth),
            );
        }
        if self.group_bytes_max < 4096 || self.group_bytes_max > 256 << 20 {
            return bad(
                "group_bytes_max",
                format!("{} is not in 4 KiB..=256 MiB", self.group_bytes_max),
            );
        }
        if self.groups_inflight_max == 0 || self.groups_inflight_max > 64 {
            return bad(
                "groups_inflight_max",
                format!("{} is not in 1..=64", self.groups_inflight_max),
            );
        }
        if self.spare_segments > 64 {
            return bad(
                "spare_segments",
                format!("{} is more than 64", self.spare_segments),
            );
        }
        if self.submit_timeout.is_zero() {
            return bad("submit_timeout", "must be positive".into());
        }
        if self.wait_timeout.is_zero() {
            return bad("wait_timeout", "must be positive".into());
        }
        // A new segment starts with its header and a checkpoint holding the
        // snapshot metadata: leave at least half the segment for entries.
        if (self.snapshot_meta_max as u64 + SEGMENT_HEADER_LEN as u64 + 256) * 2 > self.segment_size
        {
            return bad(
                "snapshot_meta_max",
                format!(
                    "{} leaves too little room in a {}-byte segment",
                    self.snapshot_meta_max, self.segment_size
                ),
            );
        }
        Ok(())
    }
}
