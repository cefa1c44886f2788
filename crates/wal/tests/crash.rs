//! Crash-state enumeration on the simulated disk.
//!
//! Each scenario drives a WAL on a [`SimStorage`] through a scripted
//! workload, one record per write (a step), keeping a model of the log after
//! every step. The op log carries a mark before each step is submitted, and
//! the WAL's own record of each acknowledgement ([`Op::Acknowledged`], which
//! its driver logs just before it wakes the waiters: the exact point, not
//! when the test thread gets to notice). Then, for every prefix of the op
//! log, every disk image a crash right there could leave is opened, and the
//! recovered log must equal the model after some step between the last one
//! acknowledged and the last one submitted before the crash: nothing
//! acknowledged lost, nothing invented, nothing half-applied. Each recovered
//! WAL must also take new appends that survive a clean reopen.
//!
//! Every workload runs twice: on the pwritev backend, and on the io_uring
//! backend's logic over a simulated ring ([`skiff_wal::sim_ring`]), whose
//! fdatasyncs complete in a seeded, permuted order. There, each run of
//! writes submitted before an acknowledgement is held on the ring until the
//! test waits, so that groups pile up in flight and complete out of order.

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use skiff_wal::sim::{Op, SimStorage};
use skiff_wal::sim_ring::{self, RingStats, SimRing};
use skiff_wal::{
    Backend, Entry, HardState, Options, SnapshotMeta, Storage, Ticket, Wal, WriteBatch,
};

const DIR: &str = "/wal";
/// Mark ids: `SUBMITTED | k` says step `k` is about to be submitted,
/// `REOPENED | e` that the WAL was closed and is opened again, its write
/// sequence numbers (which [`Op::Acknowledged`] names) starting again in
/// epoch `e`.
const SUBMITTED: u64 = 1 << 40;
const REOPENED: u64 = 1 << 41;
/// Term of the entries appended to every recovered WAL: above any term a
/// workload uses.
const PROBE_TERM: u64 = 1 << 20;

/// The I/O path a WAL runs on.
#[derive(Debug, Clone)]
enum Io {
    Pwritev,
    /// The io_uring backend's logic over a simulated ring.
    Ring(SimRing),
}

impl Io {
    fn ring(seed: u64) -> Io {
        Io::Ring(SimRing::new(seed))
    }

    fn name(&self) -> String {
        match self {
            Io::Pwritev => "pwritev".into(),
            Io::Ring(r) => format!("io_uring path, ring seed {:#x}", r.seed()),
        }
    }

    fn stats(&self) -> Option<RingStats> {
        match self {
            Io::Pwritev => None,
            Io::Ring(r) => Some(r.stats()),
        }
    }
}

fn options(io: &Io) -> Options {
    match io {
        Io::Pwritev => pwritev_options(),
        Io::Ring(_) => Options {
            // The smallest group: writes queued together still go out as
            // several groups, in flight at once.
            group_bytes_max: 4096,
            backend: Backend::IoUring,
            ..pwritev_options()
        },
    }
}

fn pwritev_options() -> Options {
    Options {
        // The smallest segment `Options::validate` allows: many rotations
        // from few entries.
        segment_size: 16 << 10,
        // Spares are made on the writer's thread when needed: the op log is
        // the same from run to run, up to how writes group.
        spare_segments: 0,
        snapshot_meta_max: 256,
        backend: Backend::Pwritev,
        ..Options::default()
    }
}

fn open(storage: &SimStorage, io: &Io) -> skiff_wal::Result<Wal> {
    match io {
        Io::Pwritev => Wal::open_with_storage(DIR, options(io), Arc::new(storage.clone())),
        Io::Ring(ring) => sim_ring::open(DIR, options(io), storage, ring),
    }
}

/// A payload that differs by index and by term, so that an entry rewritten
/// after a conflict is told apart from the one it replaced.
fn payload(index: u64, term: u64) -> Bytes {
    let len = 8 + (index * 7919 + term * 104_729) % 600;
    let seed = index.wrapping_mul(0x9E37_79B9) ^ term.wrapping_mul(0x85EB_CA6B);
    Bytes::from(
        (0..len)
            .map(|i| (seed.wrapping_add(i * 31) >> (i % 7)) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Like [`payload`], `len` bytes long.
fn sized_payload(index: u64, term: u64, len: usize) -> Bytes {
    let seed = payload(index, term);
    (0..len)
        .map(|i| seed[i % seed.len()] ^ (i >> 3) as u8)
        .collect()
}

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..hi)
        .map(|index| Entry {
            index,
            term,
            payload: payload(index, term),
        })
        .collect()
}

/// The log as a WAL holds it, and as the model expects it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    first: u64,
    /// The live entries, `first..first + len`.
    entries: Vec<Entry>,
    hard_state: HardState,
    snapshot: Option<SnapshotMeta>,
}

impl Model {
    fn new() -> Model {
        Model {
            first: 1,
            entries: Vec::new(),
            hard_state: HardState::default(),
            snapshot: None,
        }
    }

    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn last_term(&self) -> u64 {
        match (self.entries.last(), &self.snapshot) {
            (Some(e), _) => e.term,
            (None, Some(s)) => s.term,
            (None, None) => 0,
        }
    }

    fn term(&self, index: u64) -> Option<u64> {
        let at = index.checked_sub(self.first)?;
        self.entries.get(at as usize).map(|e| e.term)
    }

    /// What the WAL documents for a batch: truncate, snapshot, entries, hard
    /// state, in that order.
    fn apply(&mut self, batch: &WriteBatch) {
        if let Some(from) = batch.truncate_from {
            assert!(from >= self.first && from <= self.next());
            self.entries.truncate((from - self.first) as usize);
        }
        if let Some(meta) = &batch.snapshot {
            // A log that does not hold the snapshot's (index, term) is
            // discarded; entries the snapshot covers stop being served.
            if meta.index >= self.first && self.term(meta.index) != Some(meta.term) {
                self.entries.clear();
            }
            let first = self.first.max(meta.index + 1);
            let drop = (first - self.first).min(self.entries.len() as u64);
            self.entries.drain(..drop as usize);
            self.first = first;
            self.snapshot = Some(meta.clone());
        }
        if let Some(e) = batch.entries.first() {
            assert_eq!(e.index, self.next(), "the workload appends contiguously");
        }
        self.entries.extend(batch.entries.iter().cloned());
        if let Some(hs) = batch.hard_state {
            self.hard_state = hs;
        }
    }

    /// Reads everything back from `wal`, checking that its index (terms)
    /// agrees with the entries it reads.
    fn of(wal: &Wal) -> skiff_wal::Result<Model> {
        let first = wal.first_index();
        let next = wal.last_index() + 1;
        let entries = wal.read(first, next)?;
        for e in &entries {
            let term = wal.term(e.index)?;
            assert_eq!(term, e.term, "term({}) disagrees with the entry", e.index);
        }
        let snapshot = wal.snapshot();
        if let Some(s) = &snapshot {
            if s.index + 1 == first {
                assert_eq!(wal.term(s.index)?, s.term, "term of the snapshot index");
            }
        }
        Ok(Model {
            first,
            entries,
            hard_state: wal.hard_state(),
            snapshot,
        })
    }

    fn summary(&self) -> String {
        format!(
            "first={} last={} last_term={} hs={:?} snapshot={:?}",
            self.first,
            self.next() - 1,
            self.last_term(),
            self.hard_state,
            self.snapshot.as_ref().map(|s| (s.index, s.term)),
        )
    }
}

/// A workload in progress: the live WAL, the model and its history.
struct Run {
    name: &'static str,
    io: Io,
    sim: SimStorage,
    wal: Option<Wal>,
    model: Model,
    history: History,
    /// Opens since the first.
    epoch: u64,
    /// Submitted, not yet acknowledged.
    pending: Vec<(u64, Ticket)>,
}

/// The model after each step, and which write each step was.
struct History {
    /// `states[k]`: the model after step `k` (`states[0]`: empty).
    states: Vec<Model>,
    /// `writes[k]`: (epoch, write sequence number) of step `k`, increasing.
    writes: Vec<(u64, u64)>,
}

impl History {
    fn new() -> History {
        History {
            states: vec![Model::new()],
            writes: vec![(0, 0)],
        }
    }

    /// The last step acknowledged once the WAL of `epoch` acknowledged
    /// every write up to `seq`.
    fn acked_by(&self, epoch: u64, seq: u64) -> u64 {
        let steps = self.writes.partition_point(|&w| w <= (epoch, seq));
        steps as u64 - 1
    }
}

impl Run {
    fn new(name: &'static str, io: Io) -> Run {
        let sim = SimStorage::new();
        let wal = open(&sim, &io).expect("open an empty WAL");
        Run {
            name,
            io,
            sim,
            wal: Some(wal),
            model: Model::new(),
            history: History::new(),
            epoch: 0,
            pending: Vec::new(),
        }
    }

    fn wal(&self) -> &Wal {
        self.wal.as_ref().expect("the WAL is open")
    }

    /// Submits one write without waiting for it.
    fn submit(&mut self, batch: WriteBatch) {
        if let (Io::Ring(ring), true) = (&self.io, self.pending.is_empty()) {
            // Nothing waited for until `ack`: keep the groups in flight.
            ring.hold();
        }
        let k = self.history.states.len() as u64;
        self.sim.mark(SUBMITTED | k);
        let ticket = self
            .wal()
            .write(batch.clone())
            .unwrap_or_else(|e| panic!("{}: step {k} refused: {e}", self.name));
        self.model.apply(&batch);
        self.history.states.push(self.model.clone());
        self.history.writes.push((self.epoch, ticket.seq()));
        self.pending.push((k, ticket));
    }

    fn append(&mut self, n: u64, term: u64) {
        let next = self.model.next();
        self.submit(WriteBatch {
            entries: entries(next, next + n, term),
            ..WriteBatch::default()
        });
    }

    fn truncate(&mut self, from: u64) {
        self.submit(WriteBatch {
            truncate_from: Some(from),
            ..WriteBatch::default()
        });
    }

    fn hard_state(&mut self, term: u64, vote: u64, commit: u64) {
        self.submit(WriteBatch {
            hard_state: Some(HardState { term, vote, commit }),
            ..WriteBatch::default()
        });
    }

    fn snapshot(&mut self, index: u64, term: u64) {
        let data = Bytes::from(format!("snapshot at {index}/{term}: members=1,2,3"));
        self.submit(WriteBatch {
            snapshot: Some(SnapshotMeta { index, term, data }),
            ..WriteBatch::default()
        });
    }

    /// Waits for every submitted step, marking each as acknowledged.
    fn ack(&mut self) {
        if let Io::Ring(ring) = &self.io {
            ring.release();
        }
        for (k, ticket) in self.pending.drain(..) {
            ticket
                .wait()
                .unwrap_or_else(|e| panic!("{}: step {k} failed: {e}", self.name));
        }
    }

    /// Compacts up to `upto` (after acknowledging everything: compaction
    /// needs the snapshot durable). Returns the segments removed.
    fn compact(&mut self, upto: u64) -> usize {
        self.ack();
        self.wal()
            .compact(upto)
            .unwrap_or_else(|e| panic!("{}: compact({upto}): {e}", self.name))
    }

    fn segments(&self) -> usize {
        self.wal().segment_count()
    }

    /// Closes the WAL and opens it again on the same disk.
    fn reopen(&mut self) {
        self.ack();
        self.wal
            .take()
            .expect("open")
            .close()
            .unwrap_or_else(|e| panic!("{}: close: {e}", self.name));
        self.epoch += 1;
        self.sim.mark(REOPENED | self.epoch);
        let wal =
            open(&self.sim, &self.io).unwrap_or_else(|e| panic!("{}: reopen: {e}", self.name));
        // A clean close leaves no torn tail; that is checked on its own by
        // `clean_reopen_after_recycling_reports_no_torn_tail`.
        self.wal = Some(wal);
        self.check_live();
    }

    fn check_live(&self) {
        let got = Model::of(self.wal()).unwrap_or_else(|e| panic!("{}: read: {e}", self.name));
        assert_eq!(
            got, self.model,
            "{}: live WAL differs from model",
            self.name
        );
    }

    /// Acknowledges and closes; returns the disk, the model history and how
    /// the WAL ran.
    fn finish(mut self) -> (SimStorage, History, Io) {
        self.ack();
        self.check_live();
        self.wal
            .take()
            .expect("open")
            .close()
            .unwrap_or_else(|e| panic!("{}: close: {e}", self.name));
        (self.sim, self.history, self.io)
    }
}

/// Opens the WAL on every crash image of every prefix of `sim`'s op log and
/// checks it, recovering each on the I/O path `io`. Returns the number of
/// images checked.
fn check_all_prefixes(
    name: &str,
    sim: &SimStorage,
    history: &History,
    seed: u64,
    io: &Io,
) -> usize {
    let ops = sim.ops();
    let states = &history.states;
    let mut acked = 0u64;
    let mut submitted = 0u64;
    let mut epoch = 0;
    let mut checked = 0;
    for prefix in 0..=ops.len() {
        match prefix.checked_sub(1).map(|i| &ops[i]) {
            Some(Op::Mark(m)) if m & SUBMITTED != 0 => submitted = m & !SUBMITTED,
            Some(Op::Mark(m)) if m & REOPENED != 0 => epoch = m & !REOPENED,
            Some(Op::Acknowledged(seq)) => acked = acked.max(history.acked_by(epoch, *seq)),
            _ => {}
        }
        assert!(
            acked <= submitted,
            "{name}: step {acked} acknowledged before it was submitted"
        );
        for state in sim.crash_states(prefix, seed) {
            let ctx = || {
                format!(
                    "{name} ({}): crash after {prefix} of {} ops (last: {}), image {:?}, \
                     acknowledged {acked}, submitted {submitted}",
                    io.name(),
                    ops.len(),
                    prefix
                        .checked_sub(1)
                        .map_or("none".into(), |i| describe(&ops[i])),
                    state.kind,
                )
            };
            check_image(&state.storage, states, acked..=submitted, io, &ctx);
            checked += 1;
        }
    }
    checked
}

/// An op without its data bytes, for failure messages.
fn describe(op: &Op) -> String {
    match op {
        Op::Write { ino, offset, data } => {
            format!(
                "Write {{ ino: {ino}, offset: {offset}, len: {} }}",
                data.len()
            )
        }
        Op::Mark(m) if m & SUBMITTED != 0 => format!("Mark(submitted {})", m & !SUBMITTED),
        Op::Mark(m) if m & REOPENED != 0 => format!("Mark(reopened, epoch {})", m & !REOPENED),
        other => format!("{other:?}"),
    }
}

fn check_image(
    image: &SimStorage,
    states: &[Model],
    allowed: RangeInclusive<u64>,
    io: &Io,
    ctx: &dyn Fn() -> String,
) {
    let wal = match open(image, io) {
        Ok(wal) => wal,
        Err(e) => panic!("{}: open failed: {e}", ctx()),
    };
    let got = Model::of(&wal).unwrap_or_else(|e| panic!("{}: read failed: {e}", ctx()));
    let matches = allowed
        .clone()
        .any(|k| states.get(k as usize) == Some(&got));
    if !matches {
        let candidates: Vec<String> = allowed
            .map(|k| format!("  step {k}: {}", states[k as usize].summary()))
            .collect();
        panic!(
            "{}: recovered a log that is no allowed step's\n  got:    {}\n{}",
            ctx(),
            got.summary(),
            candidates.join("\n"),
        );
    }

    // The recovered WAL takes appends, and they survive a clean reopen.
    let next = got.next();
    let probe = entries(next, next + 3, PROBE_TERM);
    if let Err(e) = wal.append(probe.clone()).and_then(|t| t.wait()) {
        panic!("{}: append after recovery failed: {e}", ctx());
    }
    if let Err(e) = wal.close() {
        panic!("{}: close after recovery failed: {e}", ctx());
    }
    let wal = open(image, io).unwrap_or_else(|e| panic!("{}: second reopen failed: {e}", ctx()));
    let mut want = got;
    want.entries.extend(probe);
    let again = Model::of(&wal).unwrap_or_else(|e| panic!("{}: read failed: {e}", ctx()));
    assert_eq!(
        again,
        want,
        "{}: appends after recovery were not kept",
        ctx()
    );
    drop(wal);
}

/// Appends in batches of 1..=4 entries, some waited one by one, some
/// submitted two or three at a time so that they may share a group; hard
/// states now and then; two reopens.
fn appends_across_segments(io: Io) -> Run {
    let mut run = Run::new("appends_across_segments", io);
    let mut commit = 0;
    for i in 0..240u64 {
        let term = 1 + i / 80;
        run.append(1 + i % 4, term);
        if i % 3 != 1 && i % 8 != 6 {
            run.ack();
        }
        if i % 11 == 5 {
            commit = run.model.next() - 1 - i % 3;
            run.hard_state(term, 1 + i % 3, commit);
        }
        if i == 80 || i == 161 {
            run.reopen();
        }
    }
    assert!(commit > 0);
    assert!(
        run.segments() >= 12,
        "rotates across many segments: {}",
        run.segments()
    );
    run
}

/// Raft conflicts: suffixes truncated within the active segment and into an
/// earlier one, each followed by appends of a later term; hard states.
fn conflicts(io: Io) -> Run {
    let mut run = Run::new("conflicts", io);
    let mut term = 1;
    for round in 0..3 {
        for _ in 0..14 {
            run.append(3, term);
        }
        run.ack();
        run.hard_state(term, 2, run.model.next() - 20);
        // Within the active segment.
        term += 1;
        let next = run.model.next();
        run.truncate(next - 5);
        run.append(2, term);
        run.ack();
        for _ in 0..14 {
            run.append(2, term);
        }
        run.ack();
        // Into the previous segment (which is kept, so the log's start is
        // known).
        term += 1;
        let next = run.model.next();
        run.truncate(next - 30);
        run.hard_state(term, 3, next - 40);
        run.append(4, term);
        run.ack();
        for _ in 0..6 {
            run.append(3, term);
            run.append(1, term);
            run.ack();
        }
        if round == 1 {
            run.reopen();
        }
        // A truncate and its appends queued behind one another,
        // unacknowledged.
        term += 1;
        let next = run.model.next();
        run.truncate(next - 2);
        run.append(3, term);
        run.hard_state(term, 1, next - 3);
        run.ack();
    }
    assert!(run.segments() >= 6, "{}", run.segments());
    // Truncate everything live, then start again.
    term += 1;
    let first = run.model.first;
    run.truncate(first);
    run.append(4, term);
    run.ack();
    for _ in 0..8 {
        run.append(4, term);
        run.ack();
    }
    run
}

/// Snapshots and compaction: segments deleted and recycled as spares, the
/// spares reused, a snapshot beyond the log that discards it, a snapshot
/// whose term disagrees with the log, reopens.
fn snapshots_and_compaction(io: Io) -> Run {
    let mut run = Run::new("snapshots_and_compaction", io);
    let mut term = 1;
    for round in 0..2 {
        let segs = run.segments();
        while run.segments() < segs + 4 {
            run.append(3, term);
            run.ack();
        }
        run.hard_state(term, 1, run.model.next() - 1);
        let snap = run.model.next() - 10;
        run.snapshot(snap, term);
        let removed = run.compact(snap);
        assert!(removed >= 2, "compaction removes segments: {removed}");
        // New segments start from the recycled spare.
        term += 1;
        let segs = run.segments();
        while run.segments() < segs + 2 {
            run.append(2, term);
            run.append(2, term);
            run.ack();
        }
        if round == 0 {
            run.reopen();
        }
        let snap = run.model.next() - 3;
        run.snapshot(snap, term);
        run.hard_state(term, 1, snap);
        let removed = run.compact(snap);
        assert!(removed >= 1, "compaction removes segments: {removed}");
        for _ in 0..10 {
            run.append(3, term);
            run.ack();
        }
        // A snapshot beyond the log (installed from a leader): the log is
        // discarded and restarts after it.
        term += 1;
        let snap = run.model.next() + 20;
        run.snapshot(snap, term);
        run.append(3, term);
        run.ack();
        assert_eq!(run.model.first, snap + 1);
        run.compact(snap);
        // A snapshot whose term disagrees with the live log at its index.
        for _ in 0..12 {
            run.append(4, term);
            run.ack();
        }
        term += 1;
        let snap = run.model.next() - 5;
        run.snapshot(snap, term);
        assert!(run.model.entries.is_empty());
        run.append(2, term);
        run.ack();
        run.compact(snap);
        run.reopen();
        for _ in 0..6 {
            run.append(3, term);
            run.ack();
        }
    }
    run
}

/// Reopens often: appends continue in the last segment after a clean
/// close, across rotations and compactions.
fn reopen_often(io: Io) -> Run {
    let mut run = Run::new("reopen_often", io);
    for round in 0..24u64 {
        let term = 1 + round / 3;
        for i in 0..8 {
            run.append(1 + (i + round) % 3, term);
            if i % 2 == 1 {
                run.ack();
            }
        }
        run.hard_state(term, round % 3, run.model.next() - 2);
        if round % 5 == 4 {
            let snap = run.model.next() - 4;
            run.snapshot(snap, term);
            run.compact(snap);
        }
        run.reopen();
    }
    run
}

/// Deep pipelines: six writes queued before any is waited for, so that
/// groups carry several writes and a torn group write tears between (and
/// inside) them; hard states and a truncate inside the pipeline.
fn pipelined(io: Io) -> Run {
    let mut run = Run::new("pipelined", io);
    let mut term = 1;
    for round in 0..80u64 {
        for i in 0..6 {
            run.append(1 + (round + i) % 2, term);
        }
        if round % 4 == 3 {
            run.hard_state(term, 2, run.model.next() - 3);
        }
        if round % 10 == 9 {
            term += 1;
            let next = run.model.next();
            run.truncate(next - 4);
            run.append(2, term);
        }
        run.ack();
        if round == 40 {
            run.reopen();
        }
    }
    run
}

/// Records of up to a third of a segment: a new segment every few writes,
/// the seal of the last one checked each time, compaction and recycling
/// every few segments.
fn large_records(io: Io) -> Run {
    let mut run = Run::new("large_records", io);
    let mut term = 1;
    for i in 0..140u64 {
        let next = run.model.next();
        let len = 1500 + (i * 2039) % 4000;
        let batch = (next..next + 1 + i % 2)
            .map(|index| Entry {
                index,
                term,
                payload: Bytes::from(vec![(index * 13 + term) as u8; len as usize / 2]),
            })
            .collect();
        run.submit(WriteBatch {
            entries: batch,
            ..WriteBatch::default()
        });
        if i % 3 != 0 {
            run.ack();
        }
        if i % 10 == 9 {
            run.hard_state(term, 1, run.model.next() - 2);
        }
        if i % 35 == 34 {
            let snap = run.model.next() - 3;
            run.snapshot(snap, term);
            run.compact(snap);
            term += 1;
        }
        if i == 70 {
            run.reopen();
        }
    }
    run
}

/// Bursts of 6 to 11 writes of 0.4 to 3 KB queued before any is waited
/// for: several groups' worth (on the io_uring path, several groups in
/// flight at once, their fdatasyncs completing out of order), crossing
/// segment boundaries (a new segment waits for every group before it); a
/// conflict truncating inside a burst, hard states, snapshots and
/// compaction between bursts, a reopen.
fn bursts(io: Io) -> Run {
    let mut run = Run::new("bursts", io);
    let mut term = 1;
    for round in 0..36u64 {
        for i in 0..6 + round % 6 {
            let next = run.model.next();
            let len = 400 + ((round * 7 + i) * 1327) % 2600;
            run.submit(WriteBatch {
                entries: (next..next + 1 + i % 2)
                    .map(|index| Entry {
                        index,
                        term,
                        payload: sized_payload(index, term, len as usize / 2),
                    })
                    .collect(),
                ..WriteBatch::default()
            });
            if i % 4 == 3 {
                run.hard_state(term, 1, run.model.next() - 2);
            }
        }
        if round % 5 == 4 {
            term += 1;
            let next = run.model.next();
            run.truncate(next - 3);
            run.append(2, term);
            run.append(1, term);
        }
        run.ack();
        if round % 12 == 11 {
            let snap = run.model.next() - 3;
            run.snapshot(snap, term);
            let removed = run.compact(snap);
            assert!(removed >= 2, "compaction removes segments: {removed}");
        }
        if round == 20 {
            run.reopen();
        }
    }
    run
}

fn enumerate(run: Run, seed: u64) -> (usize, Option<RingStats>) {
    let name = run.name;
    let t0 = Instant::now();
    let (sim, history, io) = run.finish();
    let ring = io.stats();
    let ops = sim.op_count();
    let n = check_all_prefixes(name, &sim, &history, seed, &io);
    eprintln!(
        "{name} ({}): {} steps, {ops} ops ({} group writes), {n} crash states in {:.1?}{}",
        io.name(),
        history.states.len() - 1,
        sim.ops()
            .iter()
            .filter(|o| matches!(o, Op::Write { .. }))
            .count(),
        t0.elapsed(),
        ring.map_or(String::new(), |r| format!(", ring {r:?}")),
    );
    (n, ring)
}

/// A scripted workload, run on an I/O path.
type Workload = fn(Io) -> Run;

/// The workloads, each with the seed of its crash images.
const WORKLOADS: [(Workload, u64); 7] = [
    (appends_across_segments, 1),
    (conflicts, 2),
    (snapshots_and_compaction, 3),
    (reopen_often, 4),
    (pipelined, 5),
    (large_records, 6),
    (bursts, 8),
];

/// Seed of the simulated rings; `SKIFF_WAL_RING_SEED` replaces it to
/// replay a failure (each workload's ring seed is this xor its own seed).
fn ring_seed() -> u64 {
    std::env::var("SKIFF_WAL_RING_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_5EED_5EED)
}

/// Runs every workload on the I/O path `io_of(seed)` gives and checks every
/// crash image of each: returns the number of images checked and, on the
/// io_uring path, what the rings did.
fn enumerate_all(io_of: fn(u64) -> Io) -> (usize, RingStats) {
    let t0 = Instant::now();
    // One thread per workload: the enumeration is CPU-bound and each
    // image's WAL runs its own driver thread.
    let handles: Vec<_> = WORKLOADS
        .into_iter()
        .map(|(workload, seed)| std::thread::spawn(move || enumerate(workload(io_of(seed)), seed)))
        .collect();
    let mut n = 0;
    let mut ring = RingStats::default();
    let mut panics = Vec::new();
    for h in handles {
        match h.join() {
            Ok((k, r)) => {
                n += k;
                if let Some(r) = r {
                    ring.fsyncs += r.fsyncs;
                    ring.out_of_order += r.out_of_order;
                    ring.deferred += r.deferred;
                    ring.failed += r.failed;
                    ring.inflight_max = ring.inflight_max.max(r.inflight_max);
                }
            }
            Err(p) => panics.push(p),
        }
    }
    if let Some(p) = panics.pop() {
        std::panic::resume_unwind(p);
    }
    eprintln!("crash-state enumeration took {:.1?}", t0.elapsed());
    (n, ring)
}

/// Every crash image of every prefix of seven workloads on the pwritev
/// backend recovers an allowed log and stays usable.
#[test]
fn crash_states_recover_an_acknowledged_prefix() {
    let (n, _) = enumerate_all(|_| Io::Pwritev);
    println!("CRASH-STATES checked={n}");
    assert!(n >= 10_000, "only {n} crash states checked");
}

/// The same on the io_uring backend's logic: groups in flight together,
/// their fdatasyncs completing in a seeded, permuted order, a success
/// durable only once every fdatasync in flight with it has succeeded. The
/// run must have had groups in flight together and out-of-order
/// completions to count.
#[test]
fn crash_states_recover_an_acknowledged_prefix_on_the_io_uring_path() {
    let base = ring_seed();
    let (n, ring) = enumerate_all(|seed| Io::ring(ring_seed() ^ seed));
    println!(
        "CRASH-STATES io_uring-path checked={n} ring_seed={base:#x} ring_fsyncs={} \
         out_of_order={} deferred={} inflight_max={}",
        ring.fsyncs, ring.out_of_order, ring.deferred, ring.inflight_max
    );
    assert!(n >= 10_000, "only {n} crash states checked");
    assert!(
        ring.inflight_max >= 3 && ring.out_of_order >= 20 && ring.deferred >= 40,
        "the io_uring path had too little in flight to test: {ring:?}"
    );
}

/// A WAL opened and closed without a write: every crash image of that
/// opens as the empty log.
#[test]
fn crash_before_anything_is_written_opens_empty() {
    let sim = SimStorage::new();
    let wal = open(&sim, &Io::Pwritev).unwrap();
    assert_eq!(Model::of(&wal).unwrap(), Model::new());
    wal.close().unwrap();
    let n = check_all_prefixes("empty", &sim, &History::new(), 0, &Io::Pwritev);
    assert!(n >= 2);
}

/// The WAL's directory, and each parent it had to create, is made durable
/// in its parent before the WAL is used: a power loss must not take the
/// directory (and every durable segment in it) away. Also when the
/// directory already exists: the open that created it may have stopped
/// before syncing its parent.
#[test]
fn opening_makes_the_wal_directory_durable_in_its_parent() {
    let sim = SimStorage::new();
    let dir = Path::new("/data/node-1/wal");
    let wal = Wal::open_with_storage(dir, pwritev_options(), Arc::new(sim.clone())).unwrap();
    assert_eq!(sim.unsynced_dirs(), Vec::<std::path::PathBuf>::new());
    for parent in ["/", "/data", "/data/node-1"] {
        assert!(
            sim.ops()
                .iter()
                .any(|op| matches!(op, Op::SyncDir { dir } if dir == Path::new(parent))),
            "{parent} synced"
        );
    }
    wal.close().unwrap();

    let sim = SimStorage::new();
    sim.create_dir_all(Path::new(DIR)).unwrap();
    assert_eq!(sim.unsynced_dirs(), vec![Path::new(DIR).to_path_buf()]);
    let wal = open(&sim, &Io::Pwritev).unwrap();
    assert_eq!(sim.unsynced_dirs(), Vec::<std::path::PathBuf>::new());
    wal.close().unwrap();
}

/// The decision table's row "last segment, stale bytes of an earlier
/// incarnation only: clean end, appends continue at S": after a clean close,
/// a last segment that was recycled from a compacted one is not a torn tail.
#[test]
fn clean_reopen_after_recycling_reports_no_torn_tail() {
    let mut run = Run::new("clean_reopen_after_recycling", Io::Pwritev);
    while run.segments() < 4 {
        run.append(3, 1);
        run.ack();
    }
    let snap = run.model.next() - 2;
    run.snapshot(snap, 1);
    assert!(run.compact(snap) >= 2);
    // The next segment starts on the recycled spare: its bytes past the new
    // records are the old incarnation's records.
    let segs = run.segments();
    while run.segments() == segs {
        run.append(3, 1);
        run.ack();
    }
    run.append(1, 1);
    run.ack();
    let live = run.sim.file_names(Path::new(DIR));
    run.wal.take().unwrap().close().unwrap();

    let wal = open(&run.sim, &Io::Pwritev).unwrap();
    assert_eq!(Model::of(&wal).unwrap(), run.model);
    assert_eq!(
        wal.recovery_report().truncated_tail,
        None,
        "a clean close left no torn tail"
    );
    // Appends continue in the same segment.
    let next = run.model.next();
    wal.append(entries(next, next + 1, 1))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(wal.segment_count(), segs + 1);
    wal.close().unwrap();
    assert_eq!(run.sim.file_names(Path::new(DIR)), live);
}

/// A conflict truncates into an earlier segment, so the log's records in
/// the later segment start below that segment's first index; then the
/// earlier segment is compacted away. The log must reopen, and every crash
/// image along the way must recover.
#[test]
fn truncate_below_a_segment_start_then_compact() {
    truncate_below_a_segment_start_then_compact_on(Io::Pwritev);
}

#[test]
fn truncate_below_a_segment_start_then_compact_on_the_io_uring_path() {
    truncate_below_a_segment_start_then_compact_on(Io::ring(ring_seed() ^ 7));
}

fn truncate_below_a_segment_start_then_compact_on(io: Io) {
    let mut run = Run::new("truncate_below_a_segment_start_then_compact", io);
    // Fill the first segment; remember where the second one starts.
    let mut second_first = 0;
    while run.segments() < 2 {
        second_first = run.model.next();
        run.append(3, 1);
        run.ack();
    }
    run.append(3, 1);
    run.ack();
    assert_eq!(run.segments(), 2);
    // A conflict three entries before the second segment's first index.
    run.truncate(second_first - 3);
    run.append(8, 2);
    run.ack();
    // A snapshot that covers everything the first segment still holds.
    let snap = second_first - 1;
    run.snapshot(snap, 2);
    run.hard_state(2, 1, snap);
    assert_eq!(run.compact(snap), 1, "the first segment is compacted");
    run.append(2, 2);
    run.ack();
    let (sim, history, io) = run.finish();
    // A plain reopen first: the clearest failure if it breaks.
    let wal = open(&sim, &io).unwrap_or_else(|e| panic!("reopen after compaction: {e}"));
    assert_eq!(Model::of(&wal).unwrap(), *history.states.last().unwrap());
    wal.close().unwrap();
    let n = check_all_prefixes(
        "truncate_below_a_segment_start_then_compact",
        &sim,
        &history,
        7,
        &io,
    );
    assert!(n > 100);
}

/// A batch is one write ("everything one write makes durable together"):
/// a crash never leaves part of it, such as a conflict's truncation without
/// the entries that replace the suffix, or entries without the hard state
/// written with them.
#[test]
fn crash_never_leaves_part_of_a_write_batch() {
    crash_never_leaves_part_of_a_write_batch_on(Io::Pwritev);
}

#[test]
fn crash_never_leaves_part_of_a_write_batch_on_the_io_uring_path() {
    crash_never_leaves_part_of_a_write_batch_on(Io::ring(ring_seed() ^ 11));
}

fn crash_never_leaves_part_of_a_write_batch_on(io: Io) {
    let mut run = Run::new("write_batches", io);
    let mut term = 1;
    for round in 0..12u64 {
        let next = run.model.next();
        run.submit(WriteBatch {
            entries: entries(next, next + 4, term),
            hard_state: Some(HardState {
                term,
                vote: 1,
                commit: next.saturating_sub(2),
            }),
            ..WriteBatch::default()
        });
        run.ack();
        if round % 3 == 2 {
            term += 1;
            let from = run.model.next() - 3;
            run.submit(WriteBatch {
                truncate_from: Some(from),
                entries: entries(from, from + 5, term),
                hard_state: Some(HardState {
                    term,
                    vote: 2,
                    commit: from - 1,
                }),
                ..WriteBatch::default()
            });
            run.ack();
        }
        if round % 4 == 3 {
            let index = run.model.next() + 2;
            run.submit(WriteBatch {
                snapshot: Some(SnapshotMeta {
                    index,
                    term,
                    data: Bytes::from_static(b"members=1,2,3"),
                }),
                entries: entries(index + 1, index + 4, term),
                ..WriteBatch::default()
            });
            run.ack();
        }
    }
    let (sim, history, io) = run.finish();
    let n = check_all_prefixes("write_batches", &sim, &history, 11, &io);
    assert!(n > 100);
}
