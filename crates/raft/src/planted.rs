//! Known Raft bugs that tests plant in a core, to show that the cluster
//! simulation catches each of them (a harness earns trust when it can
//! fail).
//!
//! The switch exists only with the `testing` feature (or in this crate's
//! own unit tests): without it [`planted!`] is the constant `false`, the
//! `Raft` field holding the bug is not compiled in, and production builds
//! carry none of this.

/// A bug [`crate::Raft::plant_bug`] can plant. Each one breaks a rule the
/// correct core keeps; the comments say which.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// A leader commits an entry of an earlier term as soon as a quorum
    /// holds it (the Figure 8 bug; §5.4.2 says count replicas only for
    /// entries of the leader's term).
    CommitEarlierTerm,
    /// A leader serves ReadIndex reads at its commit index without the
    /// heartbeat round that confirms it still leads (thesis §6.4 step 3).
    ReadWithoutRound,
    /// Entries count as held before they are durable: a leader counts its
    /// own log toward a quorum before the host reported it persisted, and
    /// followers acknowledge entries before their persist completed. An
    /// entry can then commit with fewer durable copies than a quorum.
    AckBeforePersist,
    /// A joint configuration needs only a majority of its incoming voters
    /// (elections, commits, read rounds, check-quorum): the outgoing
    /// configuration's majority is dropped (thesis §4.3).
    JointNewOnly,
    /// A leader with `lease_reads` serves reads from its lease without
    /// checking that the lease still runs: after its last confirmed round
    /// it may already have been replaced (thesis §6.4.1).
    LeaseUnchecked,
}

/// Whether `$raft` runs with the planted bug `PlantedBug::$bug`; `false`
/// (a constant) without the `testing` feature.
macro_rules! planted {
    ($raft:expr, $bug:ident) => {{
        #[cfg(any(test, feature = "testing"))]
        let on = $raft.planted == Some(crate::planted::PlantedBug::$bug);
        #[cfg(not(any(test, feature = "testing")))]
        let on = false;
        on
    }};
}
pub(crate) use planted;
