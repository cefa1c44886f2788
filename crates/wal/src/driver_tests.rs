//! The driver's acknowledgement rule under a scripted backend: groups whose
//! fdatasyncs are in flight together complete in whatever order, and with
//! whatever result, the test says.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Done, Failure, Group, IoBackend};
use crate::options::Options;
use crate::sim::SimStorage;
use crate::{Entry, Error, Wal};

/// How long a test waits for the driver to reach a point it scripts.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Script {
    /// Groups written, whose fdatasync has not completed: (id, group).
    inflight: Vec<(u64, Group)>,
    /// Ids of every group submitted, in order.
    submitted: Vec<u64>,
    /// Completions the test released, delivered in this order: (id, errno
    /// or 0).
    completions: VecDeque<(u64, i32)>,
    /// Calls of `reap` begun, and that count when the last completion was
    /// handed to the driver: once it grows past that, the driver has acted
    /// on the completion and come back for more.
    reaps: u64,
    reaps_at_delivery: u64,
    /// Complete everything in flight with success: the test is over (or
    /// failed), and the WAL's shutdown waits for what is in flight.
    release_all: bool,
}

/// Releases every group in flight when dropped: declared after the WAL, so
/// that a failing assertion does not leave the WAL's drop waiting forever.
struct ReleaseOnDrop(Control);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.lock().release_all = true;
        self.0 .0 .1.notify_all();
    }
}

/// The test's handle on a [`ScriptedBackend`].
#[derive(Clone, Default)]
struct Control(Arc<(Mutex<Script>, Condvar)>);

impl Control {
    fn lock(&self) -> MutexGuard<'_, Script> {
        self.0 .0.lock().unwrap()
    }

    /// Waits until `ready` holds of the script.
    fn wait_for(&self, what: &str, ready: impl Fn(&Script) -> bool) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut s = self.lock();
        while !ready(&s) {
            let now = Instant::now();
            assert!(now < deadline, "timed out waiting for {what}");
            s = self.0 .1.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    fn wait_submitted(&self, groups: usize) {
        self.wait_for("groups to be submitted", |s| s.submitted.len() >= groups);
    }

    /// Completes group `id`'s fdatasync with `errno` (0: success) and waits
    /// until the driver has acted on it: it came back for more (it does
    /// while groups are in flight), or stopped (an error).
    fn complete(&self, id: u64, errno: i32) {
        self.lock().completions.push_back((id, errno));
        self.0 .1.notify_all();
        self.wait_for("the driver to act on a completion", |s| {
            s.completions.is_empty()
                && (s.reaps > s.reaps_at_delivery || s.inflight.is_empty() || errno != 0)
        });
    }
}

/// Writes on the driver thread through the storage seam; completes
/// fdatasyncs only when the test says, in the order it says.
struct ScriptedBackend(Control);

impl IoBackend for ScriptedBackend {
    fn submit(&mut self, group: Group, _alone: bool) -> Result<(), Failure> {
        group
            .file
            .write_all_at(&[io::IoSlice::new(&group.buf)], group.offset)
            .map_err(|error| Failure {
                op: "write",
                path: group.path.clone(),
                error,
            })?;
        let mut s = self.0.lock();
        s.submitted.push(group.id);
        s.inflight.push((group.id, group));
        drop(s);
        self.0 .0 .1.notify_all();
        Ok(())
    }

    fn inflight(&self) -> usize {
        self.0.lock().inflight.len()
    }

    fn reap(
        &mut self,
        wait: bool,
        has_work: &dyn Fn() -> bool,
        out: &mut Vec<Done>,
    ) -> Result<(), Failure> {
        let control = self.0.clone();
        let mut s = control.lock();
        s.reaps += 1;
        control.0 .1.notify_all();
        loop {
            if s.release_all {
                let ids: Vec<u64> = s.inflight.iter().map(|(id, _)| *id).collect();
                s.completions.extend(ids.into_iter().map(|id| (id, 0)));
            }
            while let Some((id, errno)) = s.completions.pop_front() {
                s.reaps_at_delivery = s.reaps;
                control.0 .1.notify_all();
                let at = s
                    .inflight
                    .iter()
                    .position(|(i, _)| *i == id)
                    .expect("the test completes a group in flight");
                let (_, group) = s.inflight.remove(at);
                if errno != 0 {
                    return Err(Failure {
                        op: "fdatasync",
                        path: group.path,
                        error: io::Error::from_raw_os_error(errno),
                    });
                }
                out.push(Done {
                    id,
                    buf: group.buf,
                    write: Duration::ZERO,
                    fsync: Duration::ZERO,
                    inline: false,
                });
            }
            if !out.is_empty() || !wait || has_work() {
                return Ok(());
            }
            s = control
                .0
                 .1
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap()
                .0;
        }
    }
}

fn open(control: &Control) -> (Wal, ReleaseOnDrop) {
    let opts = Options {
        segment_size: 16 << 10,
        spare_segments: 0,
        groups_inflight_max: 4,
        snapshot_meta_max: 256,
        submit_timeout: STEP_TIMEOUT,
        wait_timeout: STEP_TIMEOUT,
        ..Options::default()
    };
    let backend = Box::new(ScriptedBackend(control.clone()));
    let wal = Wal::open_with_backend(
        Path::new("/wal"),
        opts,
        Arc::new(SimStorage::new()),
        // Syncs on the driver's orders like pwritev.
        Some((backend, crate::Backend::Pwritev)),
    )
    .unwrap();
    (wal, ReleaseOnDrop(control.clone()))
}

fn entry(index: u64) -> Vec<Entry> {
    vec![Entry {
        index,
        term: 1,
        payload: Bytes::from(vec![index as u8; 100]),
    }]
}

/// Appends entry `index` and waits until the driver submitted it as group
/// `index - 1` (one write per group: each is queued after the driver took
/// the one before).
fn append(wal: &Wal, control: &Control, index: u64) -> crate::Ticket {
    let ticket = wal.append(entry(index)).unwrap();
    control.wait_submitted(index as usize);
    ticket
}

/// Groups 0 and 1 in flight together; 0's fdatasync succeeds, then 1's
/// fails. The error may be 0's (Linux hands a writeback error to whichever
/// fdatasync on the descriptor checks first), so 0 must not have been
/// acknowledged in between, and both fail.
#[test]
fn a_group_is_not_acknowledged_while_an_fsync_issued_with_it_is_outstanding() {
    let control = Control::default();
    let (wal, _release) = open(&control);
    let t1 = append(&wal, &control, 1);
    let t2 = append(&wal, &control, 2);
    control.complete(0, 0);
    assert!(
        !t1.is_durable().unwrap(),
        "group 0 acknowledged while the fdatasync of group 1, issued before \
         0's completed, could still return 0's error"
    );
    control.complete(1, libc::EIO);
    for t in [&t1, &t2] {
        let err = t.wait().unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    }
    assert!(wal.close().is_err());
}

/// The same pair, completed in the other order: 1 succeeds first, then 0
/// fails. Neither is acknowledged.
#[test]
fn an_error_of_an_earlier_group_fails_a_later_one_that_completed_first() {
    let control = Control::default();
    let (wal, _release) = open(&control);
    let t1 = append(&wal, &control, 1);
    let t2 = append(&wal, &control, 2);
    control.complete(1, 0);
    assert!(!t2.is_durable().unwrap());
    control.complete(0, libc::EIO);
    assert!(matches!(t1.wait(), Err(Error::Failed { .. })));
    assert!(matches!(t2.wait(), Err(Error::Failed { .. })));
}

/// The rule waits only for fdatasyncs issued before a group's completed:
/// group 2, issued after 0's completed, does not hold 0 back, but it holds
/// back 1, whose fdatasync completed after 2's was issued.
#[test]
fn a_group_waits_only_for_fsyncs_issued_before_its_own_completed() {
    let control = Control::default();
    let (wal, _release) = open(&control);
    let t1 = append(&wal, &control, 1);
    let t2 = append(&wal, &control, 2);
    control.complete(0, 0);
    let t3 = append(&wal, &control, 3);
    assert!(!t1.is_durable().unwrap());
    control.complete(1, 0);
    t1.wait().unwrap();
    assert!(
        !t2.is_durable().unwrap(),
        "group 2 was issued before 1 completed"
    );
    control.complete(2, 0);
    t2.wait().unwrap();
    t3.wait().unwrap();
    wal.close().unwrap();
}

/// What counts as "no room": ENOSPC and EDQUOT by errno, and errors of
/// those kinds that carry no errno; nothing else (an EIO dropped and
/// retried as if space had run out would hide a failing disk).
#[test]
fn only_space_errors_are_no_space() {
    use super::is_no_space;
    assert!(is_no_space(&io::Error::from_raw_os_error(libc::ENOSPC)));
    assert!(is_no_space(&io::Error::from_raw_os_error(libc::EDQUOT)));
    assert!(is_no_space(&io::Error::from(io::ErrorKind::StorageFull)));
    assert!(is_no_space(&io::Error::from(io::ErrorKind::QuotaExceeded)));
    assert!(!is_no_space(&io::Error::from_raw_os_error(libc::EIO)));
    assert!(!is_no_space(&io::Error::from(io::ErrorKind::Other)));
}
