//! The loop's stage histograms and their Prometheus text.

use super::*;

/// Per-stage latency histograms (µs) and batch sizes, owned by the loop.
pub(super) struct Stages {
    pub(super) propose_to_durable_us: Histogram<u64>,
    pub(super) propose_to_commit_us: Histogram<u64>,
    pub(super) commit_to_apply_us: Histogram<u64>,
    pub(super) batch_entries: Histogram<u64>,
    pub(super) read_index_us: Histogram<u64>,
    pub(super) snapshot_write_us: Histogram<u64>,
    /// One pass of the loop, from the first input taken to the last send.
    pub(super) loop_pass_us: Histogram<u64>,
    /// Handing one write to the WAL, on the loop.
    pub(super) wal_submit_us: Histogram<u64>,
    /// Passes that took a heartbeat interval or longer.
    pub(super) passes_over_heartbeat: u64,
    /// Of those, passes that were that long only because the loop thread
    /// waited for a CPU (see `crate::cpu_wait`): the rest of the pass was
    /// under a heartbeat interval.
    pub(super) passes_over_heartbeat_cpu_wait: u64,
    pub(super) snapshots_started: u64,
    pub(super) snapshots_taken: u64,
    pub(super) snapshot_failures: u64,
    pub(super) snapshots_installed: u64,
    /// WAL compactions that failed and were left to the next snapshot.
    pub(super) wal_compaction_failures: u64,
    /// Times the WAL ran out of space (a write dropped or refused).
    pub(super) wal_no_space: u64,
}

impl Stages {
    pub(super) fn new() -> Stages {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds");
        Stages {
            propose_to_durable_us: h(),
            propose_to_commit_us: h(),
            commit_to_apply_us: h(),
            batch_entries: h(),
            read_index_us: h(),
            snapshot_write_us: h(),
            loop_pass_us: h(),
            wal_submit_us: h(),
            passes_over_heartbeat: 0,
            passes_over_heartbeat_cpu_wait: 0,
            snapshots_started: 0,
            snapshots_taken: 0,
            snapshot_failures: 0,
            snapshots_installed: 0,
            wal_compaction_failures: 0,
            wal_no_space: 0,
        }
    }
}

impl<S: StateMachine> EventLoop<S> {
    pub(super) fn render_metrics(&self) -> String {
        let mut out = String::new();
        let s = &self.shared;
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP skiff_{name} {help}\n# TYPE skiff_{name} gauge\nskiff_{name} {v}\n"
            ));
        };
        gauge(
            &mut out,
            "disk_available_bytes",
            "Free bytes on the data directory's filesystem (0: not looked at).",
            s.disk_available.load(Ordering::Acquire),
        );
        gauge(
            &mut out,
            "disk_space_low",
            "1 while the free space is below space_reserve_bytes (writes refused).",
            u64::from(s.space_low.load(Ordering::Acquire)),
        );
        gauge(
            &mut out,
            "raft_term",
            "Current Raft term.",
            self.raft.term(),
        );
        gauge(
            &mut out,
            "is_leader",
            "1 on the leader.",
            u64::from(self.raft.role() == Role::Leader),
        );
        gauge(
            &mut out,
            "commit_index",
            "Raft commit index.",
            self.raft.commit(),
        );
        gauge(
            &mut out,
            "applied_index",
            "Last index applied to the state machine.",
            s.applied.load(Ordering::Acquire),
        );
        for (name, help, v) in self.sm.gauges() {
            gauge(&mut out, name, help, v);
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP skiff_{name} {help}\n# TYPE skiff_{name} counter\nskiff_{name} {v}\n"
            ));
        };
        let st = &self.stages;
        counter(
            &mut out,
            "loop_passes_over_heartbeat_total",
            "Event-loop passes that took a heartbeat interval or longer.",
            st.passes_over_heartbeat,
        );
        counter(
            &mut out,
            "loop_passes_over_heartbeat_cpu_wait_total",
            "Of loop_passes_over_heartbeat_total, passes the scheduler made that long: the loop \
             thread waited for a CPU, and without that wait the pass was under a heartbeat \
             interval (the machine lacks CPU; the others are the loop's own work or waits).",
            st.passes_over_heartbeat_cpu_wait,
        );
        counter(
            &mut out,
            "snapshots_started_total",
            "Snapshots handed to the snapshot thread.",
            st.snapshots_started,
        );
        counter(
            &mut out,
            "snapshots_taken_total",
            "Snapshots written durably.",
            st.snapshots_taken,
        );
        counter(
            &mut out,
            "snapshot_failures_total",
            "Snapshot writes that failed (retried later).",
            st.snapshot_failures,
        );
        counter(
            &mut out,
            "snapshots_installed_total",
            "Snapshots from the leader installed on this member.",
            st.snapshots_installed,
        );
        counter(
            &mut out,
            "wal_compaction_failures_total",
            "WAL compactions that failed without harm (old segments kept; retried with the next snapshot).",
            st.wal_compaction_failures,
        );
        counter(
            &mut out,
            "wal_no_space_total",
            "Times the WAL ran out of space (the member went on, and wrote what it owed once there was room).",
            st.wal_no_space,
        );
        gauge(
            &mut out,
            "wal_out_of_space",
            "1 while the WAL is out of space and what Raft asked to persist waits.",
            u64::from(self.wal_out_of_space()),
        );
        counter(
            &mut out,
            "peer_messages_dropped_total",
            "Peer messages dropped because the loop's input queue stayed full (Raft resends).",
            s.peer_messages_dropped.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "requests_pending",
            "Client requests waiting in the node.",
            self.pending_requests() as u64,
        );
        histogram(
            &mut out,
            "loop_pass_us",
            "One pass of the event loop, µs.",
            &st.loop_pass_us,
        );
        histogram(
            &mut out,
            "wal_submit_us",
            "Handing one write to the WAL (the loop's wait for queue room or a segment), µs.",
            &st.wal_submit_us,
        );
        histogram(
            &mut out,
            "propose_to_durable_us",
            "Accepted to locally durable (leader), µs.",
            &st.propose_to_durable_us,
        );
        histogram(
            &mut out,
            "propose_to_commit_us",
            "Accepted to committed and applied, µs.",
            &st.propose_to_commit_us,
        );
        histogram(
            &mut out,
            "commit_to_apply_us",
            "Applying one batch of committed entries, µs.",
            &st.commit_to_apply_us,
        );
        histogram(
            &mut out,
            "batch_entries",
            "Proposals per Raft proposal batch.",
            &st.batch_entries,
        );
        histogram(
            &mut out,
            "read_index_us",
            "Linearizable read: accepted to served, µs.",
            &st.read_index_us,
        );
        histogram(
            &mut out,
            "snapshot_write_us",
            "Writing a state-machine snapshot (snapshot thread), µs.",
            &st.snapshot_write_us,
        );
        let wal = self.wal.metrics();
        histogram(
            &mut out,
            "wal_fsync_us",
            "WAL fdatasync, µs.",
            &wal.fsync_us,
        );
        histogram(
            &mut out,
            "wal_write_us",
            "WAL group write, µs.",
            &wal.write_us,
        );
        histogram(
            &mut out,
            "wal_queue_wait_us",
            "WAL queue wait, µs.",
            &wal.queue_wait_us,
        );
        histogram(
            &mut out,
            "wal_group_bytes",
            "WAL group size, bytes.",
            &wal.group_bytes,
        );
        out
    }
}

/// Prometheus summary-style quantiles plus count and sum.
fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    out.push_str(&format!(
        "# HELP skiff_{name} {help}\n# TYPE skiff_{name} summary\n"
    ));
    for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
        out.push_str(&format!(
            "skiff_{name}{{quantile=\"{q}\"}} {}\n",
            h.value_at_quantile(q)
        ));
    }
    let sum = (h.mean() * h.len() as f64) as u64;
    out.push_str(&format!(
        "skiff_{name}_sum {sum}\nskiff_{name}_count {}\n",
        h.len()
    ));
}
