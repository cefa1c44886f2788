//! Automatic compaction of the MVCC history (etcd's
//! `--auto-compaction-mode` and `--auto-compaction-retention`), so that a
//! member under sustained writes does not keep every version forever.
//!
//! * `periodic` with a retention `R`: every member records its applied
//!   revision every `min(R, 1 h) / 10`; the leader, every `min(R, 1 h)`,
//!   compacts to the revision it recorded `R` ago (keeps at least `R` of
//!   history).
//! * `revision` with a retention `N`: the leader, every
//!   [`REVISION_CHECK_INTERVAL`] (etcd's 5 minutes), compacts to the
//!   current revision minus `N` (keeps at least the last `N` revisions).
//!
//! A compaction is a `Compact` proposed through Raft like a client's
//! (logical: the removal runs off the loop, as for any compaction). Only
//! the leader proposes; a member that is not the leader only records.

use std::collections::VecDeque;
use std::time::Duration;

use skiff_node::NodeHandle;
use skiff_raft::Role;
use tokio::time::Instant;

use crate::machine::{KvCommand, KvMachine, KvResponse};
use crate::watch::Hub;

/// How often the `revision` mode looks by default (etcd's 5 minutes).
pub const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// The longest interval between two periodic compactions (etcd's 1 h).
pub const PERIODIC_INTERVAL_MAX: Duration = Duration::from_secs(3600);
/// Samples per periodic interval (etcd's 10).
pub const PERIODIC_SAMPLES: u32 = 10;
/// Shortest periodic retention accepted (the sampling interval is a tenth).
pub const PERIODIC_RETENTION_MIN: Duration = Duration::from_millis(100);

/// The automatic compaction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoCompaction {
    /// No automatic compaction (etcd's retention "0").
    #[default]
    Off,
    /// Keep at least this much time of history.
    Periodic(Duration),
    /// Keep at least this many revisions.
    Revision(i64),
}

impl AutoCompaction {
    /// Parses etcd's flags: `mode` is `periodic` or `revision`;
    /// `retention` is, for `periodic`, a duration (`90m`, `1h30m`, `10s`,
    /// `500ms`) or a bare number of hours, for `revision` a number of
    /// revisions; `0` turns it off.
    pub fn parse(mode: &str, retention: &str) -> Result<AutoCompaction, String> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                let d = parse_duration_or_hours(retention)?;
                if d.is_zero() {
                    return Ok(AutoCompaction::Off);
                }
                if d < PERIODIC_RETENTION_MIN {
                    return Err(format!(
                        "periodic retention {retention:?} is under {} ms",
                        PERIODIC_RETENTION_MIN.as_millis()
                    ));
                }
                Ok(AutoCompaction::Periodic(d))
            }
            "revision" => match retention.parse::<i64>() {
                Ok(0) => Ok(AutoCompaction::Off),
                Ok(n) if n > 0 => Ok(AutoCompaction::Revision(n)),
                _ => Err(format!(
                    "revision retention {retention:?} is not a number of revisions (>= 0)"
                )),
            },
            other => Err(format!(
                "auto-compaction mode {other:?} is neither `periodic` nor `revision`"
            )),
        }
    }
}

/// `1h30m`, `90s`, `250ms`, or a bare number of hours (etcd's rule).
fn parse_duration_or_hours(s: &str) -> Result<Duration, String> {
    if let Ok(hours) = s.parse::<u64>() {
        return hours
            .checked_mul(3600)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("retention {s:?} is too long"));
    }
    let bad = || format!("retention {s:?} is not a duration (e.g. 1h, 30m, 90s, 500ms) or hours");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(u32::try_from(n).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

/// The periodic mode's record of (time, revision) samples: what revision
/// to compact to, `retention` after it was current.
#[derive(Debug)]
pub struct PeriodicWindow {
    retention: Duration,
    /// Oldest first; bounded by `samples_max`.
    samples: VecDeque<(Instant, i64)>,
    samples_max: usize,
}

impl PeriodicWindow {
    pub fn new(retention: Duration) -> PeriodicWindow {
        let interval = retention.min(PERIODIC_INTERVAL_MAX);
        let sample_every = interval / PERIODIC_SAMPLES;
        // Enough samples to reach `retention` back, plus one.
        let samples_max =
            (retention.as_nanos() / sample_every.as_nanos().max(1)).min(100_000) as usize + 2;
        PeriodicWindow {
            retention,
            samples: VecDeque::with_capacity(samples_max.min(1024)),
            samples_max,
        }
    }

    /// How often to record a sample.
    pub fn sample_every(&self) -> Duration {
        self.retention.min(PERIODIC_INTERVAL_MAX) / PERIODIC_SAMPLES
    }

    /// How often the leader compacts.
    pub fn compact_every(&self) -> Duration {
        self.retention.min(PERIODIC_INTERVAL_MAX)
    }

    pub fn record(&mut self, now: Instant, revision: i64) {
        if self.samples.len() == self.samples_max {
            self.samples.pop_front();
        }
        self.samples.push_back((now, revision));
    }

    /// The newest revision recorded at least `retention` before `now`.
    pub fn target(&self, now: Instant) -> Option<i64> {
        self.samples
            .iter()
            .rev()
            .find(|(at, _)| now.saturating_duration_since(*at) >= self.retention)
            .map(|&(_, rev)| rev)
    }
}

/// Runs `policy` for a member until it stops (see the module docs);
/// `revision_every` is how often the `revision` mode looks.
pub async fn run(
    node: NodeHandle<KvMachine>,
    hub: Hub,
    policy: AutoCompaction,
    revision_every: Duration,
) {
    let mut window = match policy {
        AutoCompaction::Off => return,
        AutoCompaction::Periodic(r) => Some(PeriodicWindow::new(r)),
        AutoCompaction::Revision(_) => None,
    };
    let tick = match &window {
        Some(w) => w.sample_every(),
        None => revision_every,
    };
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_compaction = Instant::now();
    let mut compacted = 0i64;
    loop {
        ticker.tick().await;
        if node.stopped().is_some() {
            return;
        }
        let now = Instant::now();
        let revision = hub.revision();
        let target = match (&mut window, policy) {
            (Some(w), _) => {
                w.record(now, revision);
                if now.duration_since(last_compaction) < w.compact_every() {
                    continue;
                }
                w.target(now)
            }
            (None, AutoCompaction::Revision(keep)) => Some(revision - keep),
            (None, _) => None,
        };
        let Some(target) = target.filter(|&t| t > compacted.max(0)) else {
            continue;
        };
        if node.status().role != Role::Leader {
            continue;
        }
        match node.propose(KvCommand::Compact { revision: target }).await {
            Ok(Ok(KvResponse::Compacted { .. })) => {
                tracing::info!(revision = target, ?policy, "auto-compaction: compacted");
                compacted = target;
                last_compaction = now;
            }
            Ok(Ok(_)) => tracing::warn!(revision = target, "auto-compaction: unexpected answer"),
            // Compacted further already (a client's Compact): nothing to do.
            Ok(Err(e)) => {
                tracing::debug!(revision = target, error = %e, "auto-compaction: refused");
                compacted = target;
                last_compaction = now;
            }
            Err(e) => tracing::warn!(revision = target, error = %e, "auto-compaction: not done"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcds_flags() {
        let p = AutoCompaction::parse;
        assert_eq!(p("periodic", "0"), Ok(AutoCompaction::Off));
        assert_eq!(
            p("periodic", "1"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            p("periodic", "1h30m"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(
            p("periodic", "500ms"),
            Ok(AutoCompaction::Periodic(Duration::from_millis(500)))
        );
        assert_eq!(p("revision", "1000"), Ok(AutoCompaction::Revision(1000)));
        assert_eq!(p("revision", "0"), Ok(AutoCompaction::Off));
        for (mode, bad) in [
            ("periodic", "1x"),
            ("periodic", "h"),
            ("periodic", ""),
            ("periodic", "10ms"),
            ("revision", "-1"),
            ("revision", "1h"),
            ("hourly", "1"),
        ] {
            assert!(p(mode, bad).is_err(), "{mode} {bad:?} was accepted");
        }
    }

    #[test]
    fn the_periodic_window_compacts_to_the_revision_of_one_retention_ago() {
        let retention = Duration::from_secs(10);
        let mut w = PeriodicWindow::new(retention);
        assert_eq!(w.sample_every(), Duration::from_secs(1));
        assert_eq!(w.compact_every(), Duration::from_secs(10));
        let t0 = Instant::now();
        for s in 0..=30u64 {
            w.record(t0 + Duration::from_secs(s), 100 + s as i64 * 10);
        }
        // At t0+30 s the sample of t0+20 s is exactly one retention old.
        assert_eq!(w.target(t0 + Duration::from_secs(30)), Some(300));
        assert_eq!(w.target(t0 + Duration::from_millis(30_500)), Some(300));
        assert_eq!(w.target(t0 + Duration::from_secs(31)), Some(310));
        // Bounded: old samples are dropped.
        assert!(w.samples.len() <= w.samples_max);
        let fresh = PeriodicWindow::new(retention);
        assert_eq!(fresh.target(t0), None);
        // Hours-long retentions sample every 6 min and compact hourly.
        let long = PeriodicWindow::new(Duration::from_secs(5 * 3600));
        assert_eq!(long.sample_every(), Duration::from_secs(360));
        assert_eq!(long.compact_every(), PERIODIC_INTERVAL_MAX);
        assert_eq!(long.samples_max, 52);
    }
}
