//! Per-stage histograms of the I/O driver, readable by callers.
//!
//! The driver records into the shared [`Metrics`] under one short lock per
//! group (never per entry); readers clone it. Names carry their unit last.

use std::time::Duration;

/// An HDR histogram of `u64` values (microseconds, entries or bytes).
pub type Histogram = hdrhistogram::Histogram<u64>;

/// What the WAL measured since it was opened.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// From a write being queued to its group being submitted.
    pub queue_wait_us: Histogram,
    /// Submission of a group's write to its completion.
    pub write_us: Histogram,
    /// The fdatasync of a group (from write completion to sync completion).
    pub fsync_us: Histogram,
    /// Writes (tickets) per group.
    pub group_writes: Histogram,
    /// Log entries per group.
    pub group_entries: Histogram,
    /// Bytes per group, framing included.
    pub group_bytes: Histogram,
    pub groups_total: u64,
    pub fsyncs_total: u64,
    /// Fdatasyncs run on the driver thread itself: every one with the
    /// `pwritev` backend; with io_uring, those of groups that had nothing
    /// to overlap with (nothing else in flight or queued).
    pub fsyncs_inline_total: u64,
    pub bytes_total: u64,
    pub entries_total: u64,
}

fn histogram(max: u64) -> Histogram {
    Histogram::new_with_bounds(1, max, 3).expect("static histogram bounds are valid")
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            queue_wait_us: histogram(60_000_000),
            write_us: histogram(60_000_000),
            fsync_us: histogram(60_000_000),
            group_writes: histogram(1 << 24),
            group_entries: histogram(1 << 32),
            group_bytes: histogram(1 << 40),
            groups_total: 0,
            fsyncs_total: 0,
            fsyncs_inline_total: 0,
            bytes_total: 0,
            entries_total: 0,
        }
    }
}

impl Metrics {
    pub(crate) fn record_us(h: &mut Histogram, d: Duration) {
        h.saturating_record((d.as_micros() as u64).max(1));
    }

    pub(crate) fn record(h: &mut Histogram, v: u64) {
        h.saturating_record(v.max(1));
    }
}
