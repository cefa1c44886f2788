//! The lying disk itself (`skiff_tests::lying_disk`): what survives its
//! power loss is what was fsynced, file contents and directory entries
//! alike, and an injected fsync error loses the writes it covered.
//! Skipped, with the reason, where this process may not mount FUSE.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use skiff_tests::lying_disk::{is_wal_segment, LyingDisk};

fn mounted() -> Option<(tempfile::TempDir, LyingDisk)> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    match LyingDisk::mount(dir.path()) {
        Ok(disk) => Some((dir, disk)),
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

fn sync_dir(path: &Path) {
    File::open(path)
        .and_then(|d| d.sync_all())
        .expect("fsync a directory");
}

#[test]
fn a_power_loss_keeps_what_was_fsynced_and_nothing_else() {
    let Some((_dir, disk)) = mounted() else {
        return;
    };
    let root = disk.mountpoint().to_path_buf();
    fs::create_dir(root.join("d")).expect("mkdir");
    sync_dir(&root);

    // A file fsynced and linked durably, then written to again.
    let kept = root.join("d/kept");
    let mut f = File::create(&kept).expect("create");
    f.write_all(b"durable").expect("write");
    f.sync_data().expect("fdatasync");
    sync_dir(&root.join("d"));
    f.write_all_at(b"LOST", 2).expect("overwrite");
    f.write_all_at(b"+tail", 7).expect("append");
    assert_eq!(fs::read(&kept).expect("read"), b"duLOSTe+tail");
    drop(f);

    // Large zero runs cost nothing and read back as zeros.
    let zeros = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("d/zeros"))
        .expect("create");
    zeros
        .write_all_at(&vec![0u8; 8 << 20], 0)
        .expect("write zeros");
    zeros.sync_all().expect("fsync");
    sync_dir(&root.join("d"));
    drop(zeros);

    // A rename not made durable.
    let renamed = root.join("d/renamed");
    let mut h = File::create(root.join("d/tmp")).expect("create");
    h.write_all(b"v2").expect("write");
    h.sync_all().expect("fsync");
    sync_dir(&root.join("d"));
    fs::rename(root.join("d/tmp"), &renamed).expect("rename");

    // Last: a file fsynced whose directory entry never was.
    let unlinked = root.join("d/never-linked");
    let mut g = File::create(&unlinked).expect("create");
    g.write_all(b"data").expect("write");
    g.sync_all().expect("fsync");
    drop(g);

    let loss = disk.lose_power();
    disk.power_on();
    assert_eq!(fs::read(&kept).expect("read after power loss"), b"durable");
    assert_eq!(
        fs::metadata(&unlinked).map_err(|e| e.kind()).err(),
        Some(ErrorKind::NotFound),
        "a file whose entry was never fsynced is gone"
    );
    assert!(!renamed.exists(), "the rename was undone");
    assert_eq!(fs::read(root.join("d/tmp")).expect("the old name"), b"v2");
    let z = fs::read(root.join("d/zeros")).expect("zeros");
    assert_eq!(z.len(), 8 << 20);
    assert!(z.iter().all(|&b| b == 0));
    assert!(loss.files_reverted >= 1, "{loss:?}");
    assert!(loss.entries_reverted >= 2, "{loss:?}");
    assert_eq!(disk.stats().power_losses, 1);
}

#[test]
fn an_injected_fsync_error_loses_the_writes_it_covered() {
    let Some((_dir, disk)) = mounted() else {
        return;
    };
    let root = disk.mountpoint().to_path_buf();
    let other = root.join("notes.txt");
    let wal = root.join("00000000000000000001-00000000000000000001.wal");
    let mut o = File::create(&other).expect("create");
    let mut w = File::create(&wal).expect("create");
    w.write_all(b"first").expect("write");
    w.sync_data().expect("fdatasync");
    sync_dir(&root);

    disk.fail_next_fsync(is_wal_segment);
    // A file the fault does not match syncs as usual.
    o.write_all(b"x").expect("write");
    o.sync_data().expect("fdatasync of another file");
    assert!(disk.fsync_fault_armed());

    w.write_all(b"+second").expect("write");
    let err = w.sync_data().expect_err("the armed fsync fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(!disk.fsync_fault_armed(), "the fault fires once");
    assert_eq!(
        fs::read(&wal).expect("read"),
        b"first",
        "the writes it covered are gone"
    );
    w.write_all_at(b"+third", 5).expect("write again");
    w.sync_data().expect("the next fsync succeeds");
    assert_eq!(disk.stats().failed_fsyncs, 1);
    disk.lose_power();
    assert_eq!(fs::read(&wal).expect("read"), b"first+third");
}

#[test]
fn a_power_cut_at_an_fsync_holds_it_and_loses_its_writes() {
    let Some((_dir, disk)) = mounted() else {
        return;
    };
    let root = disk.mountpoint().to_path_buf();
    let wal = root.join("00000000000000000001-00000000000000000001.wal");
    let mut w = File::create(&wal).expect("create");
    w.write_all(b"synced").expect("write");
    w.sync_data().expect("fdatasync");
    sync_dir(&root);

    disk.cut_power_at_next_fsync(is_wal_segment);
    assert!(!disk.is_dark());
    let writer = std::thread::spawn(move || {
        w.write_all(b"+in-flight").expect("write");
        w.sync_data()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !disk.is_dark() {
        assert!(
            std::time::Instant::now() < deadline,
            "the power was never cut"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The fsync is held: it has not returned while the power is off.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !writer.is_finished(),
        "an fsync completed with the power off"
    );
    assert_eq!(fs::read(&wal).expect("read"), b"synced+in-flight");

    let loss = disk.lose_power();
    assert_eq!(loss.fsyncs_in_flight, 1, "{loss:?}");
    assert_eq!(loss.files_reverted, 1, "{loss:?}");
    let err = writer
        .join()
        .expect("the writer thread")
        .expect_err("the held fsync fails once the power is gone");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(&wal).expect("read"), b"synced");
    // Off until it is switched on: nothing a dying process sends lands.
    let late = fs::write(root.join("late"), b"x").expect_err("a change with the power off");
    assert_eq!(late.raw_os_error(), Some(libc::EIO), "{late}");
    disk.power_on();
    assert!(!disk.is_dark(), "the power is back");
    fs::write(root.join("late"), b"x").expect("a change once the power is on");
}

/// Not a test of its own: the process whose death
/// `a_disk_left_by_a_killed_test_process_is_swept` needs (it mounts a disk
/// where `SKIFF_LYING_DISK_HELPER` says, then waits to be killed).
#[test]
#[ignore = "a helper run by another test"]
fn helper_mount_and_wait() {
    let Some(dir) = std::env::var_os("SKIFF_LYING_DISK_HELPER") else {
        return;
    };
    let _disk = LyingDisk::mount(Path::new(&dir)).expect("mount");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_disk_left_by_a_killed_test_process_is_swept() {
    if let Err(why) = skiff_tests::lying_disk::available() {
        println!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mount = dir.path().join("abandoned");
    fs::create_dir(&mount).expect("a mount point");
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "helper_mount_and_wait",
            "--ignored",
            "--nocapture",
        ])
        .env("SKIFF_LYING_DISK_HELPER", &mount)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the helper");
    let mounted = || {
        fs::read_to_string("/proc/mounts")
            .expect("/proc/mounts")
            .contains(&mount.display().to_string())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mounted() {
        assert!(
            std::time::Instant::now() < deadline,
            "the helper never mounted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL the helper");
    child.wait().expect("reap the helper");
    let err = fs::metadata(&mount).expect_err("an abandoned FUSE mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert!(skiff_tests::lying_disk::sweep_abandoned() >= 1);
    assert!(!mounted(), "the abandoned disk is still mounted");
    assert!(
        fs::metadata(&mount).is_ok(),
        "the mount point is a plain directory again"
    );
}
