//! A full disk, for real: member 3's data directory is a small tmpfs the
//! test mounts (root only; skipped with the reason printed otherwise). A
//! ballast file takes most of it; writes fill the rest until member 3's
//! free space falls below `--space-reserve-bytes`. Then:
//!
//! * member 3 raises NOSPACE under its own id although no client writes
//!   through it, every member lists the alarm, and writes anywhere are
//!   refused with etcd's "database space exceeded";
//! * reads keep working on every member, nothing acknowledged is lost, and
//!   member 3 is still running (its WAL never ran out of space);
//! * once the ballast is deleted and the alarm disarmed, writes continue.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction;
use skiff_kv::pb::etcdserverpb::AlarmType;
use skiff_tests::client::GetOptions;
use skiff_tests::{poll_until, Cluster, ClusterOptions};
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const ALARM_TIMEOUT: Duration = Duration::from_secs(30);
/// The tmpfs under member 3.
const FS_BYTES: u64 = 48 << 20;
/// What member 3 keeps free: writes stop below it.
const RESERVE_BYTES: u64 = 16 << 20;
/// WAL segments of 1 MiB, so that the WAL grows in small steps.
const SEGMENT_BYTES: u64 = 1 << 20;
const VALUE_BYTES: usize = 16 << 10;
/// More writes than fit: the test fails if none is refused.
const WRITES_MAX: usize = 4_000;
const NOSPACE_TEXT: &str = "etcdserver: mvcc: database space exceeded";

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<Mount, String> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -t tmpfs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Mount(dir.to_path_buf()))
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("run cp");
    assert!(ok.success(), "copy {} to {}", from.display(), to.display());
}

fn write_ballast(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the ballast");
    let block = vec![0xA5u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        f.write_all(&block).expect("write the ballast");
    }
    f.sync_all().expect("sync the ballast");
}

/// A 3-member cluster with a leader, its members keeping `reserve` bytes
/// free; `None` (with the reason printed) unless this runs as root, which
/// mounting a tmpfs needs.
async fn start_as_root(reserve: u64) -> Option<Cluster> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return None;
    }
    let cluster = Cluster::start(
        ClusterOptions {
            wal_segment_bytes: SEGMENT_BYTES,
            ..ClusterOptions::default()
        }
        .arg("--space-reserve-bytes", reserve),
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    Some(cluster)
}

/// Stops member 3, moves its data directory onto a tmpfs of `FS_BYTES`
/// and starts it again; `None` (with the reason printed) where mounting is
/// not allowed.
fn member_3_on_tmpfs(cluster: &mut Cluster) -> Option<Mount> {
    let status = cluster.terminate(3);
    assert!(status.success(), "member 3 stopped cleanly: {status}");
    let dir = cluster.data_dir(3);
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old).expect("move member 3's data aside");
    std::fs::create_dir(&dir).expect("a mount point");
    let mount = match mount_tmpfs(&dir, FS_BYTES) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    copy_dir(&old, &dir);
    Some(mount)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_raises_nospace_keeps_reads_and_recovers() {
    let Some(mut cluster) = start_as_root(RESERVE_BYTES).await else {
        return;
    };

    let Some(_mount) = member_3_on_tmpfs(&mut cluster) else {
        return;
    };
    let dir = cluster.data_dir(3);
    // The ballast leaves about 24 MiB: 8 MiB above the reserve.
    let ballast = dir.join("ballast");
    write_ballast(&ballast, 24 << 20);
    cluster.restart(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;

    // Write through the leader until refused.
    let mut client = cluster.client(leader).await;
    let value = vec![b'v'; VALUE_BYTES];
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..WRITES_MAX {
        let key = format!("fill/{i:05}");
        match client.put(&key, &value, None).await {
            Ok(_) => acked.push(key),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.unwrap_or_else(|| {
        cluster.print_logs();
        panic!("{WRITES_MAX} writes of {VALUE_BYTES} bytes all fit in the reserve")
    });
    let status = refused
        .status()
        .unwrap_or_else(|| panic!("a gRPC status, not {refused}"));
    assert_eq!(status.code(), Code::ResourceExhausted, "{refused}");
    assert_eq!(status.message(), NOSPACE_TEXT);
    eprintln!(
        "{} writes acknowledged before the refusal ({} KiB each)",
        acked.len(),
        VALUE_BYTES >> 10
    );

    // Member 3 raised it, every member lists it.
    for id in cluster.ids() {
        let cluster = &cluster;
        let alarms = poll_until("NOSPACE of member 3 listed", ALARM_TIMEOUT, || async move {
            let mut c = cluster.client(id).await;
            let a = c.alarm_list().await.ok()?;
            a.contains(&(3, AlarmType::Nospace as i32)).then_some(a)
        })
        .await;
        assert!(
            alarms
                .iter()
                .all(|(_, kind)| *kind == AlarmType::Nospace as i32),
            "{alarms:?}"
        );
    }
    assert!(
        cluster.running().contains(&3),
        "member 3 still runs: its WAL never ran out of space"
    );

    // Writes are refused everywhere; reads go on and nothing is lost.
    for id in cluster.ids() {
        let mut c = cluster.client(id).await;
        let e = c
            .put("after", "x", None)
            .await
            .expect_err("refused while NOSPACE is active");
        assert_eq!(e.status().map(|s| s.message()), Some(NOSPACE_TEXT), "{e}");
        let got = c
            .get(
                "fill/",
                Some(GetOptions::default().with_prefix().with_serializable()),
            )
            .await
            .expect("a read while NOSPACE is active");
        let keys: Vec<String> = got
            .kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        for k in &acked {
            assert!(keys.contains(k), "member {id} lost acknowledged {k}");
        }
    }

    // Space freed, alarm disarmed: writes continue.
    std::fs::remove_file(&ballast).expect("delete the ballast");
    let metrics = cluster.metrics_addr(3);
    poll_until(
        "member 3 sees the space back",
        ALARM_TIMEOUT,
        || async move {
            let text = skiff_tests::fetch_metrics(metrics).ok()?;
            (skiff_tests::metric(&text, "skiff_disk_space_low") == Some(0.0)).then_some(())
        },
    )
    .await;
    let mut c = cluster.client(leader).await;
    c.alarm(AlarmAction::Deactivate, 3, AlarmType::Nospace)
        .await
        .expect("disarm");
    let cluster_ref = &cluster;
    poll_until("a write after the disarm", ALARM_TIMEOUT, || async move {
        let mut c = cluster_ref.client(leader).await;
        c.put("after", "x", None).await.ok()
    })
    .await;
    poll_until("member 3 applied it", ALARM_TIMEOUT, || async move {
        let mut c3 = cluster_ref.client(3).await;
        let r = c3
            .get("after", Some(GetOptions::default().with_serializable()))
            .await
            .ok()?;
        (!r.kvs.is_empty()).then_some(())
    })
    .await;
    cluster.kill(3);
}

/// Fills the file system of `path` to the last byte; returns the bytes
/// written.
fn fill_up(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the ballast");
    let mut written = 0u64;
    for size in [1 << 20, 4096, 512] {
        let block = vec![0xA5u8; size];
        while f.write_all(&block).is_ok() {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    written
}

/// The disk fills faster than the reserve check can see (here: no
/// reserve, `--space-reserve-bytes 0`), so member 3's WAL itself runs out
/// of space — while member 3 leads. It goes on: it hands leadership to a
/// member with room, the majority with room commits, member 3 raises
/// NOSPACE so writes are refused and reads go on, and once the space is
/// back it writes what it owed and takes writes again; after a SIGKILL it
/// restarts from its WAL with everything acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_out_of_space_is_not_fatal_even_on_the_leader() {
    let Some(mut cluster) = start_as_root(0).await else {
        return;
    };
    let Some(_mount) = member_3_on_tmpfs(&mut cluster) else {
        return;
    };
    cluster.restart(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    if leader != 3 {
        let mut c = cluster.client(leader).await;
        c.move_leader(3).await.expect("leadership to member 3");
    }
    let cluster_ref = &cluster;
    poll_until("member 3 leads", LEADER_TIMEOUT, || async move {
        (cluster_ref.wait_leader(LEADER_TIMEOUT).await.0 == 3).then_some(())
    })
    .await;

    let ballast = cluster.data_dir(3).join("ballast");
    let filled = fill_up(&ballast);
    eprintln!("ballast of {} MiB: member 3's disk is full", filled >> 20);

    // Write through member 3 until refused. A write in flight when the
    // WAL ran out of space may go unanswered (it waits to be applied on
    // member 3, which applies nothing until it has room): such a timeout
    // is not a refusal.
    let mut client = cluster.client(3).await;
    let value = vec![b'v'; VALUE_BYTES];
    let mut acked = Vec::new();
    let mut refused = None;
    let mut unanswered = 0;
    for i in 0..WRITES_MAX {
        let key = format!("full/{i:05}");
        match client.put(&key, &value, None).await {
            Ok(_) => acked.push(key),
            Err(e) if e.status().is_none() && unanswered < 2 => {
                unanswered += 1;
                eprintln!("write {key} unanswered: {e}");
                client = cluster.client(3).await;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.unwrap_or_else(|| {
        cluster.print_logs();
        panic!("{WRITES_MAX} writes of {VALUE_BYTES} bytes all fit on a full disk")
    });
    if refused.status().map(|s| s.message()) != Some(NOSPACE_TEXT) {
        cluster.print_logs();
        panic!("refused with {refused}, not {NOSPACE_TEXT}");
    }
    eprintln!("{} writes acknowledged after the disk filled", acked.len());
    assert!(
        cluster.running().contains(&3),
        "member 3 stopped: {}",
        cluster.log(3)
    );
    assert_eq!(cluster.metric(3, "skiff_wal_out_of_space"), Ok(1.0));
    assert!(cluster.metric(3, "skiff_wal_no_space_total").unwrap() >= 1.0);
    // A leader that cannot make its entries durable applies nothing: it
    // handed leadership over.
    let cluster_ref = &cluster;
    let new_leader = poll_until("a leader with room", LEADER_TIMEOUT, || async move {
        let (l, _) = cluster_ref.wait_leader(LEADER_TIMEOUT).await;
        (l != 3).then_some(l)
    })
    .await;

    // Reads go on everywhere (serializable: member 3 applies nothing until
    // it has room), with everything acknowledged; a linearizable one
    // through the new leader.
    let mut c = cluster.client(new_leader).await;
    c.get("full/00000", None)
        .await
        .expect("a linearizable read while member 3 is full");
    for id in cluster.ids() {
        let keys = cluster
            .keys_with_prefix(id, "full/")
            .await
            .unwrap_or_else(|e| panic!("a read on member {id} while full: {e}"));
        for k in &acked {
            assert!(keys.contains(k), "member {id} lacks acknowledged {k}");
        }
    }

    // Space back: member 3 writes what it owed; disarmed, writes go on.
    std::fs::remove_file(&ballast).expect("delete the ballast");
    poll_until(
        "member 3 wrote what it owed",
        ALARM_TIMEOUT,
        || async move {
            (cluster_ref.metric(3, "skiff_wal_out_of_space") == Ok(0.0)).then_some(())
        },
    )
    .await;
    let mut c = cluster.client(3).await;
    c.alarm(AlarmAction::Deactivate, 3, AlarmType::Nospace)
        .await
        .expect("disarm");
    poll_until("a write after the disarm", ALARM_TIMEOUT, || async move {
        let mut c = cluster_ref.client(3).await;
        c.put("full/after", "x", None).await.ok()
    })
    .await;

    // Member 3's WAL holds a log it restarts from.
    cluster.kill(3);
    cluster.restart(3);
    let cluster_ref = &cluster;
    let keys = poll_until(
        "member 3 back with the writes",
        ALARM_TIMEOUT,
        || async move {
            let keys = cluster_ref.keys_with_prefix(3, "full/").await.ok()?;
            keys.contains("full/after").then_some(keys)
        },
    )
    .await;
    for k in &acked {
        assert!(
            keys.contains(k),
            "member 3 lost acknowledged {k} after a restart"
        );
    }
    cluster.kill(3);
}
