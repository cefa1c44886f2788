//! The lessor: when leases expire, decided by the leader's clock alone.
//!
//! What every member must agree on (which leases exist, their TTLs, their
//! keys, the TTL left at the last checkpoint) is replicated state in the
//! store. When a lease expires is not: only the leader keeps deadlines,
//! here, and an expiry is a `LeaseRevoke` it proposes through Raft, so
//! followers never expire anything by their own clocks.
//!
//! * Becoming leader, a member loads every lease from its applied state
//!   (once it applied everything committed) and gives each its
//!   checkpointed TTL left (or its full TTL) *plus an election timeout*
//!   from now, as etcd does: no lease expires because of an election.
//! * Keepalives reach the leader (a follower forwards them, see
//!   `crate::api::lease`) and push the deadline to now + TTL.
//! * Every [`LESSOR_TICK`] the leader proposes revokes for the leases past
//!   their deadline (at most [`REVOKES_PER_TICK`]), and every checkpoint
//!   interval a `LeaseCheckpoint` of the TTLs left, so that a restart or a
//!   new leader counts from there (etcd's lease checkpointing).
//! * A full resync with the applied state every [`RESYNC_INTERVAL`] adds
//!   leases this leader did not see granted and drops revoked ones.
//!
//! Runs as one tokio task per member; its state is behind a mutex that the
//! lease API also takes (short sections, never across an await).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use skiff_node::NodeHandle;
use skiff_raft::Role;

use crate::machine::{
    KvCommand, KvMachine, KvQuery, KvQueryResponse, LeaseNote, LeaseNotes, ServiceCounters,
    LEASE_CHECKPOINT_MAX,
};

/// How often the leader looks for expired leases.
pub const LESSOR_TICK: Duration = Duration::from_millis(250);
/// Revokes proposed per tick at most (etcd revokes 1,000 per second).
pub const REVOKES_PER_TICK: usize = 250;
/// How often the leader reloads the lease list from its applied state.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// etcd's default checkpoint interval.
pub const CHECKPOINT_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    ttl: i64,
    /// The replicated state holds a checkpoint (a TTL left) for it.
    checkpointed: bool,
    /// When the lessor learned of it (a resync keeps what it learned
    /// after its query).
    noted: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// The term this member leads in, once loaded; None: not leading (or
    /// not loaded yet).
    leading: Option<u64>,
    deadlines: HashMap<i64, Deadline>,
    /// Revokes proposed and not yet known applied.
    revoking: HashSet<i64>,
    /// Leading but not loaded yet: grants applied meanwhile (their TTL
    /// counts from when they were applied, with no election extension)
    /// and revokes applied meanwhile.
    early_grants: HashMap<i64, (i64, Instant)>,
    early_revokes: HashSet<i64>,
    /// Notes were dropped (or the table replaced): reload.
    stale: bool,
    /// Revokes applied lately: a resync whose query predates one must not
    /// bring the lease back. Pruned after [`RECENT_REVOKES_KEPT`].
    recent_revokes: HashMap<i64, Instant>,
}

/// How long a revoke is remembered against resyncs that started before it.
const RECENT_REVOKES_KEPT: Duration = Duration::from_secs(60);

/// A member's lessor; cheap to clone.
#[derive(Clone)]
pub struct Lessor {
    state: Arc<Mutex<State>>,
    node: NodeHandle<KvMachine>,
    /// What a new leader adds to every deadline: an election timeout.
    extend: Duration,
    checkpoint_interval: Duration,
    counters: Arc<ServiceCounters>,
    notes: Arc<LeaseNotes>,
}

impl std::fmt::Debug for Lessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lessor")
            .field("leases", &self.lock().deadlines.len())
            .finish()
    }
}

/// Why the lessor cannot answer on this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Not the leader (forward to it).
    NotLeader,
    /// Leader, but the lease list is not loaded yet.
    Loading,
}

impl Lessor {
    pub fn new(
        node: NodeHandle<KvMachine>,
        checkpoint_interval: Duration,
        counters: Arc<ServiceCounters>,
        notes: Arc<LeaseNotes>,
    ) -> Lessor {
        let cfg = node.config();
        let extend = cfg.tick_interval() * cfg.election_ticks_max;
        Lessor {
            state: Arc::new(Mutex::new(State::default())),
            node,
            extend,
            checkpoint_interval,
            counters,
            notes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, with what apply noted since the last look taken in.
    fn current(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        let (notes, overflowed) = self.notes.take();
        if overflowed {
            st.stale = true;
        }
        let loading = st.leading.is_none() && self.node.status().role == Role::Leader;
        for note in notes {
            match note {
                LeaseNote::Granted { id, ttl, at } => {
                    st.recent_revokes.remove(&id);
                    if st.leading.is_some() {
                        st.deadlines.insert(
                            id,
                            Deadline {
                                at: at + secs(ttl),
                                ttl,
                                checkpointed: false,
                                noted: Instant::now(),
                            },
                        );
                    } else if loading {
                        st.early_grants.insert(id, (ttl, at));
                        st.early_revokes.remove(&id);
                    }
                }
                LeaseNote::Revoked { id } => {
                    st.recent_revokes.insert(id, Instant::now());
                    st.deadlines.remove(&id);
                    st.revoking.remove(&id);
                    if loading {
                        st.early_grants.remove(&id);
                        st.early_revokes.insert(id);
                    }
                }
            }
        }
        st
    }

    /// The smallest TTL granted, seconds: a lease must outlive an election
    /// (etcd: 1.5 election timeouts, rounded up).
    pub fn min_ttl(&self) -> i64 {
        let ms = self.extend.as_millis() as i64 * 3 / 2;
        ((ms + 999) / 1000).max(1)
    }

    fn ready(&self, st: &State) -> Result<(), NotReady> {
        let s = self.node.status();
        match st.leading {
            Some(term) if s.role == Role::Leader && s.term == term => Ok(()),
            _ if s.role == Role::Leader => Err(NotReady::Loading),
            _ => Err(NotReady::NotLeader),
        }
    }

    /// A lease found gone when its expiry was proposed.
    fn revoked(&self, id: i64) {
        let mut st = self.lock();
        st.deadlines.remove(&id);
        st.revoking.remove(&id);
    }

    /// A keepalive on the leader: the new TTL (0: no such lease), and
    /// whether a checkpoint must be reset (the caller proposes it).
    pub fn renew(&self, id: i64) -> Result<(i64, bool), NotReady> {
        let mut st = self.current();
        self.ready(&st)?;
        if st.revoking.contains(&id) {
            return Ok((0, false));
        }
        let Some(d) = st.deadlines.get_mut(&id) else {
            return Ok((0, false));
        };
        if d.at <= Instant::now() {
            // Expired: its revoke is on its way.
            return Ok((0, false));
        }
        d.at = Instant::now() + secs(d.ttl);
        self.counters
            .lease_keepalives
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reset = std::mem::take(&mut d.checkpointed);
        Ok((d.ttl, reset))
    }

    /// Seconds left of a lease on the leader (None: not found).
    pub fn remaining(&self, id: i64) -> Result<Option<i64>, NotReady> {
        let st = self.current();
        self.ready(&st)?;
        Ok(st.deadlines.get(&id).map(|d| {
            // Whole seconds, truncated, as etcd reports it.
            d.at.saturating_duration_since(Instant::now()).as_secs() as i64
        }))
    }

    /// Runs until the node stops: expiry, checkpoints, resyncs.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(LESSOR_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_resync = Instant::now();
        let mut last_checkpoint = Instant::now();
        loop {
            tick.tick().await;
            if self.node.stopped().is_some() {
                return;
            }
            let s = self.node.status();
            if s.role != Role::Leader {
                let mut st = self.current();
                st.leading = None;
                st.deadlines.clear();
                st.revoking.clear();
                st.early_grants.clear();
                st.early_revokes.clear();
                st.stale = false;
                continue;
            }
            let (loaded, stale) = {
                let st = self.current();
                (st.leading == Some(s.term), st.stale)
            };
            if !loaded || stale || last_resync.elapsed() >= RESYNC_INTERVAL {
                // Load once everything committed is applied here.
                if s.applied < s.commit {
                    continue;
                }
                if self.resync(s.term, !loaded).await {
                    last_resync = Instant::now();
                    last_checkpoint = last_checkpoint.min(Instant::now());
                }
                continue;
            }
            self.expire().await;
            if last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.checkpoint().await;
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Loads the leases from the applied state. `fresh`: this member just
    /// became leader, every deadline starts over (extended).
    async fn resync(&self, term: u64, fresh: bool) -> bool {
        let asked = Instant::now();
        let Ok(KvQueryResponse::Leases(all)) = self.node.query(KvQuery::Leases, false).await else {
            return false;
        };
        let now = Instant::now();
        let mut st = self.current();
        st.stale = false;
        if fresh {
            st.deadlines.clear();
            st.revoking.clear();
        }
        let held: HashSet<i64> = all.iter().map(|(id, ..)| *id).collect();
        // Granted after the query: not in its answer, but held.
        st.deadlines
            .retain(|id, d| held.contains(id) || d.noted >= asked);
        st.revoking.retain(|id| held.contains(id));
        st.recent_revokes
            .retain(|_, at| at.elapsed() < RECENT_REVOKES_KEPT);
        for (id, ttl, remaining) in all {
            if st.recent_revokes.contains_key(&id) {
                continue;
            }
            let left = if remaining > 0 { remaining } else { ttl };
            st.deadlines.entry(id).or_insert(Deadline {
                at: now + secs(left) + self.extend,
                ttl,
                checkpointed: remaining > 0,
                noted: now,
            });
        }
        // What was applied while loading: grants count from when they were
        // applied (no extension: they are not older than this term), and
        // the query may have missed the latest of them and of the revokes.
        let early: Vec<(i64, (i64, Instant))> = st.early_grants.drain().collect();
        for (id, (ttl, at)) in early {
            st.deadlines.insert(
                id,
                Deadline {
                    at: at + secs(ttl),
                    ttl,
                    checkpointed: false,
                    noted: now,
                },
            );
        }
        let revoked: Vec<i64> = st.early_revokes.drain().collect();
        for id in revoked {
            st.deadlines.remove(&id);
        }
        st.leading = Some(term);
        true
    }

    async fn expire(&self) {
        let now = Instant::now();
        let due: Vec<i64> = {
            let mut st = self.lock();
            let due: Vec<i64> = st
                .deadlines
                .iter()
                .filter(|(id, d)| d.at <= now && !st.revoking.contains(id))
                .map(|(id, _)| *id)
                .take(REVOKES_PER_TICK)
                .collect();
            st.revoking.extend(due.iter().copied());
            due
        };
        for id in due {
            let node = self.node.clone();
            let lessor = self.clone();
            tokio::spawn(async move {
                match node.propose(KvCommand::LeaseRevoke { id }).await {
                    // Revoked: apply's note removes the deadline.
                    Ok(Ok(_)) => {
                        lessor
                            .counters
                            .lease_expired
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Revoked already, by someone else: forget it here.
                    Ok(Err(_)) => lessor.revoked(id),
                    Err(e) => {
                        tracing::debug!(id, error = %e, "lease expiry not proposed");
                        lessor.lock().revoking.remove(&id);
                    }
                }
            });
        }
    }

    async fn checkpoint(&self) {
        let now = Instant::now();
        let remaining: Vec<(i64, i64)> = {
            let mut st = self.lock();
            st.deadlines
                .iter_mut()
                .filter(|(_, d)| d.at > now)
                .map(|(id, d)| {
                    d.checkpointed = true;
                    let left =
                        d.at.saturating_duration_since(now)
                            .as_millis()
                            .div_ceil(1000);
                    (*id, (left as i64).min(d.ttl))
                })
                .collect()
        };
        for chunk in remaining.chunks(LEASE_CHECKPOINT_MAX) {
            let cmd = KvCommand::LeaseCheckpoint {
                remaining: chunk.to_vec(),
            };
            if let Err(e) = self.node.propose(cmd).await {
                tracing::debug!(error = %e, "lease checkpoint not proposed");
                return;
            }
        }
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}
