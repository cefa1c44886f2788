//! Where a seccomp filter forbids io_uring (Docker's default profile does),
//! a WAL that asks for io_uring fails to open with a clear error, and one
//! on `Auto` falls back to the pwritev backend and works.
//!
//! The filter is installed on the test's own thread only (seccomp filters
//! are per thread, and inherited by the threads it starts: the WAL's
//! driver). This binary holds this one test so that nothing else runs
//! beside it.

use bytes::Bytes;
use skiff_wal::{Backend, Entry, Error, Options, Wal};

/// Makes every later `io_uring_setup` of this thread, and of the threads
/// it starts, fail with EPERM (its number, 425, is the same on every
/// architecture). Err: this kernel takes no seccomp filter.
fn forbid_io_uring_on_this_thread() -> std::io::Result<()> {
    let ld_nr = libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        // offsetof(struct seccomp_data, nr)
        k: 0,
    };
    let is_setup = libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf: 1,
        k: libc::SYS_io_uring_setup as u32,
    };
    let refuse = libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
    };
    let allow = libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    };
    let filter = [ld_nr, is_setup, refuse, allow];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls; the program outlives the call (the kernel
    // copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn forbidden_io_uring_is_refused_when_asked_for_and_avoided_on_auto() {
    if let Err(e) = forbid_io_uring_on_this_thread() {
        eprintln!("SKIPPED: no seccomp filter can be installed here: {e}");
        return;
    }
    // SAFETY: a plain syscall with no memory passed: it must fail now.
    let probe = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, std::ptr::null_mut::<u8>()) };
    assert_eq!(probe, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM),
        "the filter refuses io_uring_setup"
    );

    let dir = tempfile::tempdir().unwrap();
    let asked = Options {
        backend: Backend::IoUring,
        ..Options::default()
    };
    match Wal::open(dir.path(), asked) {
        Err(Error::InvalidOption { field, reason }) => {
            assert_eq!(field, "backend");
            assert!(reason.contains("io_uring"), "{reason}");
        }
        Ok(_) => panic!("io_uring was asked for and forbidden, yet the WAL opened"),
        Err(e) => panic!("expected InvalidOption backend, got {e:?}"),
    }

    let wal = Wal::open(dir.path(), Options::default()).unwrap();
    assert_eq!(wal.backend(), Backend::Pwritev);
    let entries: Vec<Entry> = (1..=3)
        .map(|index| Entry {
            index,
            term: 1,
            payload: Bytes::from(format!("entry {index}")),
        })
        .collect();
    wal.append(entries.clone()).unwrap().wait().unwrap();
    assert_eq!(wal.read(1, 4).unwrap(), entries);
    wal.close().unwrap();
}
