//! The raw ceiling a WAL is compared with: the same group bytes written with
//! `pwritev` and made durable with `fdatasync`, one group after another, on a
//! zero-filled (pre-written) file of the segment size — what a WAL with
//! perfect batching and no overhead would do on this disk.

use std::fs::OpenOptions;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What the raw loop reached.
#[derive(Debug)]
pub struct RawCeiling {
    pub bytes_per_s: f64,
    pub syncs_per_s: f64,
    /// fdatasync latency.
    pub sync_us: Histogram<u64>,
}

/// Writes `group_bytes`-sized groups sequentially into a zero-filled file of
/// `file_bytes` in `dir` (wrapping to the start when full) with one
/// `pwritev` + `fdatasync` each, for `duration`.
pub fn raw_ceiling(
    dir: &Path,
    group_bytes: usize,
    file_bytes: u64,
    duration: Duration,
) -> io::Result<RawCeiling> {
    let group_bytes = group_bytes.clamp(1, file_bytes as usize);
    let path = dir.join("raw-ceiling.dat");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Zero-fill and sync, as the WAL's pre-writer does for a spare segment.
    let zeros = vec![0u8; 1 << 20];
    let mut left = file_bytes;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    let buf = vec![0x5Au8; group_bytes];
    let mut sync_us = Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let fd = file.as_raw_fd();
    let mut offset = 0u64;
    let mut bytes = 0u64;
    let mut syncs = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        if offset + group_bytes as u64 > file_bytes {
            offset = 0;
        }
        pwritev_all(fd, &buf, offset)?;
        let t = Instant::now();
        // SAFETY: `fd` is an open descriptor owned by `file`, alive here.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
        sync_us.saturating_record(t.elapsed().as_micros().max(1) as u64);
        offset += group_bytes as u64;
        bytes += group_bytes as u64;
        syncs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(RawCeiling {
        bytes_per_s: bytes as f64 / secs,
        syncs_per_s: syncs as f64 / secs,
        sync_us,
    })
}

fn pwritev_all(fd: i32, buf: &[u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let iov = [IoSlice::new(&buf[done..])];
        // SAFETY: `iov` points at live memory for the call's duration and
        // IoSlice is ABI-compatible with `struct iovec`.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr().cast(), 1, offset as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
        offset += n as u64;
    }
    Ok(())
}
