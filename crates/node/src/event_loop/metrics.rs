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
    /// From a write's first offer to the WAL to the WAL taking it.
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
    /// Times the leader began holding back log compaction for followers
    /// catching up from a snapshot.
    pub(super) catchup_holds: u64,
    /// Holds given up for a follower (too long, or the log too large).
    pub(super) catchup_holds_ended: u64,
    /// WAL compactions that failed and were left to the next snapshot.
    pub(super) wal_compaction_failures: u64,
    /// Times the WAL ran out of space (a write dropped or refused).
    pub(super) wal_no_space: u64,
}

impl Stages {
    pub(super) fn new() -> Stages {
        // Two significant digits (values within 1 %): 3,328 counters, 26
        // KiB, so that the fresh set a scrape leaves costs the loop
        // microseconds (three digits: 188 KiB each, 0.1-2.8 ms a scrape).
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static bounds");
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
            catchup_holds: 0,
            catchup_holds_ended: 0,
            wal_compaction_failures: 0,
            wal_no_space: 0,
        }
    }
}

impl Stages {
    /// The stage histograms recorded since the last call, in
    /// [`STAGE_HISTOGRAMS`] order; fresh ones take their place (an
    /// allocation each, of zeroed memory: no walk of the counts here).
    fn take_histograms(&mut self) -> StageHistograms {
        let take = |h: &mut Histogram<u64>| {
            let fresh = Histogram::new_from(h);
            std::mem::replace(h, fresh)
        };
        StageHistograms([
            take(&mut self.loop_pass_us),
            take(&mut self.wal_submit_us),
            take(&mut self.propose_to_durable_us),
            take(&mut self.propose_to_commit_us),
            take(&mut self.commit_to_apply_us),
            take(&mut self.batch_entries),
            take(&mut self.read_index_us),
            take(&mut self.snapshot_write_us),
        ])
    }
}

impl Stages {
    /// Adds back the histograms of a sample nobody rendered.
    pub(super) fn give_back(&mut self, unsent: MetricsSample) {
        let [loop_pass, wal_submit, durable, commit, apply, batch, read, snapshot] =
            &unsent.stages.0;
        for (mine, back) in [
            (&mut self.loop_pass_us, loop_pass),
            (&mut self.wal_submit_us, wal_submit),
            (&mut self.propose_to_durable_us, durable),
            (&mut self.propose_to_commit_us, commit),
            (&mut self.commit_to_apply_us, apply),
            (&mut self.batch_entries, batch),
            (&mut self.read_index_us, read),
            (&mut self.snapshot_write_us, snapshot),
        ] {
            mine.add(back).expect("stage histograms share their bounds");
        }
    }
}

/// The loop's stage histograms as rendered: name and help, in the order of
/// [`StageHistograms`].
const STAGE_HISTOGRAMS: [(&str, &str); 8] = [
    ("loop_pass_us", "One pass of the event loop, µs."),
    (
        "wal_submit_us",
        "From a write's first offer to the WAL to the WAL taking it (a write the WAL's full \
         queue could not take waits in the loop's backlog; the loop does not wait), µs.",
    ),
    (
        "propose_to_durable_us",
        "Accepted to locally durable (leader), µs.",
    ),
    (
        "propose_to_commit_us",
        "Accepted to committed and applied, µs.",
    ),
    (
        "commit_to_apply_us",
        "Applying one batch of committed entries, µs.",
    ),
    ("batch_entries", "Proposals per Raft proposal batch."),
    (
        "read_index_us",
        "Linearizable read: accepted to served, µs.",
    ),
    (
        "snapshot_write_us",
        "Writing a state-machine snapshot (snapshot thread), µs.",
    ),
];

/// One value per entry of [`STAGE_HISTOGRAMS`].
pub(crate) struct StageHistograms([Histogram<u64>; 8]);

impl std::fmt::Debug for StageHistograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                STAGE_HISTOGRAMS
                    .iter()
                    .zip(&self.0)
                    .map(|((name, _), h)| (name, h.len())),
            )
            .finish()
    }
}

/// What one scrape takes from the loop. Rendering the histograms (five
/// quantiles each, every quantile a walk of the counts) took 0.4–1.8 ms,
/// too long for the loop at a fast scrape rate; the loop only formats its
/// few dozen gauges and counters and hands over the stage histograms it
/// recorded since the last scrape. [`MetricsSample::render`], on the
/// scraper's thread, adds them to the running totals and renders those and
/// the WAL's.
pub struct MetricsSample {
    head: String,
    stages: StageHistograms,
    wal: Arc<Wal>,
}

impl MetricsSample {
    /// The Prometheus text: the head, then each stage histogram's running
    /// total in `book` (this sample added to it), then the WAL's
    /// histograms.
    pub(crate) fn render(self, book: &Mutex<Option<StageHistograms>>) -> String {
        let mut out = self.head;
        {
            let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
            let totals = match book.as_mut() {
                Some(totals) => {
                    for (total, new) in totals.0.iter_mut().zip(&self.stages.0) {
                        // Same bounds (both made by `Stages::new`): cannot fail.
                        total.add(new).expect("stage histograms share their bounds");
                    }
                    totals
                }
                None => book.insert(self.stages),
            };
            for ((name, help), h) in STAGE_HISTOGRAMS.iter().zip(&totals.0) {
                histogram(&mut out, name, help, h);
            }
        }
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

impl<S: StateMachine> EventLoop<S> {
    /// What a scrape takes from the loop (see [`MetricsSample`]): the
    /// gauges and counters as text, the stage histograms recorded since
    /// the last scrape (fresh ones take their place), and the WAL handle.
    pub(super) fn metrics_sample(&mut self) -> MetricsSample {
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
            "log_compaction_holds_total",
            "Times this leader began holding back log compaction for followers catching up from a snapshot.",
            st.catchup_holds,
        );
        counter(
            &mut out,
            "log_compaction_holds_given_up_total",
            "Followers this leader stopped holding log compaction for (catch-up too long, or the log too large).",
            st.catchup_holds_ended,
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
            "wal_backlog_writes",
            "Writes waiting in the loop for the WAL to take them (its queue was full).",
            self.wal_backlog.len() as u64,
        );
        gauge(
            &mut out,
            "requests_pending",
            "Client requests waiting in the node.",
            self.pending_requests() as u64,
        );
        MetricsSample {
            head: out,
            stages: self.stages.take_histograms(),
            wal: self.wal.clone(),
        }
    }

    /// The whole Prometheus text, rendered here (tests).
    #[cfg(test)]
    pub(super) fn render_metrics(&mut self) -> String {
        let sample = self.metrics_sample();
        sample.render(&self.shared.metrics_book)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::test_support::one_member_loop;

    /// `skiff_{name}_count` in `text`.
    fn count(text: &str, name: &str) -> u64 {
        let prefix = format!("skiff_{name}_count ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in the metrics"))
            .parse()
            .unwrap()
    }

    /// The loop hands over what it recorded since the last scrape and keeps
    /// nothing of it; the renderer's running totals count every value once,
    /// across scrapes, whichever sample they came in.
    #[test]
    fn scrapes_take_the_new_values_and_the_totals_keep_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let (mut lp, _tx) = one_member_loop(dir.path(), None);
        let book = Mutex::new(None);
        for v in [5, 7, 9] {
            lp.stages.read_index_us.saturating_record(v);
        }
        lp.stages.batch_entries.saturating_record(3);
        let first = lp.metrics_sample();
        assert!(
            lp.stages.read_index_us.is_empty(),
            "the loop kept its values"
        );
        assert!(lp.stages.batch_entries.is_empty());
        let text = first.render(&book);
        assert_eq!(count(&text, "read_index_us"), 3);
        assert_eq!(count(&text, "batch_entries"), 1);
        assert!(
            text.contains("skiff_read_index_us{quantile=\"1\"} 9\n"),
            "{text}"
        );

        // (Exact below 256 at two significant digits.)
        lp.stages.read_index_us.saturating_record(200);
        let text = lp.metrics_sample().render(&book);
        assert_eq!(count(&text, "read_index_us"), 4);
        assert_eq!(count(&text, "batch_entries"), 1);
        assert!(text.contains("skiff_read_index_us{quantile=\"1\"} 200\n"));
        assert!(text.contains("skiff_read_index_us_sum 221\n"), "{text}");
        // Every stage histogram and the loop's counters are there.
        for (name, _) in STAGE_HISTOGRAMS {
            count(&text, name);
        }
        assert!(text.contains("skiff_raft_term "));
        assert!(text.contains("skiff_wal_fsync_us_count "));
        // A scrape with nothing new renders the same totals.
        let again = lp.metrics_sample().render(&book);
        assert_eq!(count(&again, "read_index_us"), 4);
        // A sample nobody rendered goes back to the loop, values kept.
        lp.stages.read_index_us.saturating_record(2);
        let unsent = lp.metrics_sample();
        lp.stages.read_index_us.saturating_record(3);
        lp.stages.give_back(unsent);
        assert_eq!(lp.stages.read_index_us.len(), 2);
        let text = lp.metrics_sample().render(&book);
        assert_eq!(count(&text, "read_index_us"), 6);
        lp.stop(None);
    }
}
