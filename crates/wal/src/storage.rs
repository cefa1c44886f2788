//! The file-system seam under the WAL.
//!
//! Every byte the WAL reads or writes and every metadata change (create,
//! rename, unlink, directory fsync) goes through [`Storage`]. The real
//! implementation is [`OsStorage`]; tests substitute a recording, simulated
//! disk (the `testing` feature) to enumerate crash states. The io_uring
//! backend writes, and syncs lone groups, through this seam too; only the
//! fdatasyncs it queues on the kernel's ring use the raw file descriptor
//! that [`StorageFile::raw_fd`] exposes, so it runs on the kernel's ring only
//! with [`OsStorage`]. Tests run the same backend over a simulated ring on
//! the simulated disk (`sim_ring`).

use crate::error::OP_SYNC_DIRECTORY;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory of files the WAL can use.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creates, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Whether its files have real descriptors the io_uring backend may use.
    fn has_raw_fds(&self) -> bool {
        false
    }

    /// Called by the I/O driver just before it tells waiters that every
    /// write up to `write_seq` (of this WAL's incarnation) is durable. Real
    /// storage has nothing to do; a simulated disk records the point, so
    /// that crash tests hold each acknowledgement to where it was made
    /// rather than to where a waiter noticed it.
    fn acknowledged(&self, _write_seq: u64) {}

    /// Writes `len` zero bytes from offset 0 of `file` (just created at
    /// `path`), not yet synced. Pre-writing spares goes through here so that
    /// a backend can do it without copying through the page cache.
    fn fill_zeros(&self, _path: &Path, file: &dyn StorageFile, len: u64) -> io::Result<()> {
        fill_zeros_buffered(file, len)
    }
}

fn fill_zeros_buffered(file: &dyn StorageFile, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&[IoSlice::new(&zeros[..n])], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Creates `dir` and any missing parents, and makes each durable: a new
/// directory's name lives in its parent, and only an fsync of the parent
/// makes it survive a power loss (with every file in it, however durable
/// those are themselves).
///
/// The parent of `dir` is synced even when `dir` exists: an earlier open
/// may have created it and stopped before syncing. Returns which step
/// failed, for the error.
pub(crate) fn create_dir_durable(
    storage: &dyn Storage,
    dir: &Path,
) -> Result<(), (&'static str, PathBuf, io::Error)> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .take_while(|a| storage.list(a).is_err())
        .collect();
    storage
        .create_dir_all(dir)
        .map_err(|e| ("create directory", dir.to_path_buf(), e))?;
    let mut parents: Vec<&Path> = Vec::new();
    for d in std::iter::once(dir).chain(missing) {
        if let Some(parent) = d.parent() {
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
    }
    for parent in parents {
        storage
            .sync_dir(parent)
            .map_err(|e| (OP_SYNC_DIRECTORY, parent.to_path_buf(), e))?;
    }
    Ok(())
}

/// Zeros written per call while pre-writing a spare.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Alignment O_DIRECT needs of buffers, offsets and lengths (the largest
/// logical block size in use).
const DIRECT_ALIGN: usize = 4096;

/// One open file.
#[allow(clippy::len_without_is_empty)] // a file's length is a size, not a collection's
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `bufs` at `offset` (short writes are continued).
    fn write_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// The descriptor for the io_uring backend; `None` for simulated files.
    fn raw_fd(&self) -> Option<RawFd>;

    /// Hints that the whole file will be read soon, so that the reads can
    /// start in the background. Only a hint: nothing to report.
    fn will_need(&self) {}

    /// Reads exactly `buf.len()` bytes at `offset`, or fails with
    /// `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsStorage;

#[derive(Debug)]
struct OsFile {
    file: File,
}

impl Storage for OsStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(OsFile { file }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(OsFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // The parent of a relative path's first component is "".
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn has_raw_fds(&self) -> bool {
        true
    }

    /// Writes the zeros with O_DIRECT: DMA from one aligned buffer instead of
    /// a CPU copy of every byte into the page cache (the copy would cost as
    /// much CPU as the WAL's own writes). The file's blocks are then not in
    /// the page cache; the driver pads every write to a block boundary so
    /// that the kernel never reads one back (an earlier
    /// `POSIX_FADV_WILLNEED` here read all 64 MiB of each spare back from the
    /// device, competing with the WAL's fdatasyncs, and did not keep the
    /// reads off the write path). Falls back to buffered writes where
    /// O_DIRECT is refused (tmpfs).
    fn fill_zeros(&self, path: &Path, file: &dyn StorageFile, len: u64) -> io::Result<()> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let direct = match direct {
            Ok(f) if len % DIRECT_ALIGN as u64 == 0 => f,
            Ok(_) | Err(_) => return fill_zeros_buffered(file, len),
        };
        let backing = vec![0u8; ZERO_CHUNK_BYTES + DIRECT_ALIGN];
        let start = backing.as_ptr().align_offset(DIRECT_ALIGN);
        let zeros = &backing[start..start + ZERO_CHUNK_BYTES];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(ZERO_CHUNK_BYTES as u64) as usize;
            match pwritev_all(direct.as_raw_fd(), &[IoSlice::new(&zeros[..n])], off) {
                Ok(()) => off += n as u64,
                // Some file systems accept the flag at open but not the I/O.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && off == 0 => {
                    return fill_zeros_buffered(file, len);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl StorageFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        pwritev_all(self.file.as_raw_fd(), bufs, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    /// `POSIX_FADV_WILLNEED`: the kernel starts reading the file into the
    /// page cache without waiting. Recovery uses it on the next segment
    /// while it checks one, so that a cold disk reads while the CPU works.
    fn will_need(&self) {
        // SAFETY: a valid descriptor; advice only, no memory is touched. An
        // error only means no read-ahead.
        let _ =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// `pwritev` until every byte of `bufs` is written at `offset`.
fn pwritev_all(fd: RawFd, bufs: &[IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    // Short writes are rare on regular files but legal: continue from where
    // the kernel stopped. `IoSlice::advance_slices` needs a mutable copy.
    let mut owned: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
    let mut slices: &mut [IoSlice<'_>] = &mut owned;
    while !slices.is_empty() {
        let count = slices.len().min(1024) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; the slices borrow
        // live buffers for the duration of the call and `count` does not exceed
        // their number.
        let n = unsafe {
            libc::pwritev(
                fd,
                slices.as_ptr() as *const libc::iovec,
                count,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        IoSlice::advance_slices(&mut slices, n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{self, IoSlice};
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::StorageFile;

    /// A file that hands out its bytes a few at a time, with an `EINTR`
    /// before every read that succeeds, and then an end of file.
    #[derive(Debug)]
    struct Choppy {
        data: Vec<u8>,
        interrupt_next: AtomicBool,
    }

    impl StorageFile for Choppy {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            if self.interrupt_next.swap(false, Ordering::Relaxed) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.interrupt_next.store(true, Ordering::Relaxed);
            let at = (offset as usize).min(self.data.len());
            let n = buf.len().min(3).min(self.data.len() - at);
            buf[..n].copy_from_slice(&self.data[at..at + n]);
            Ok(n)
        }
        fn write_all_at(&self, _: &[IoSlice<'_>], _: u64) -> io::Result<()> {
            unreachable!("read-only")
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.data.len() as u64)
        }
        fn raw_fd(&self) -> Option<RawFd> {
            None
        }
    }

    /// Short reads are continued and `EINTR` is retried; running out of
    /// bytes is `UnexpectedEof`.
    #[test]
    fn read_exact_at_retries_interrupts_and_short_reads() {
        let f = Choppy {
            data: (0u8..20).collect(),
            interrupt_next: AtomicBool::new(true),
        };
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, 5).expect("read through EINTRs");
        assert_eq!(buf, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        let mut past = [0u8; 10];
        let err = f
            .read_exact_at(&mut past, 15)
            .expect_err("only 5 bytes left");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
