//! Membership in the loop: changes proposed for clients (answered once
//! applied), leadership transfers (answered once the target leads), the
//! transport's peers kept equal to the membership's, and removal: a leader
//! tells a node its committed membership excludes that the node was
//! removed, and a removed node stops for good.

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_net::PeerAddr;
use skiff_raft::{
    Entry, Index, Membership, MembershipChange, Message, MessageBody, NodeId, Payload, Role, Term,
};
use tokio::sync::oneshot;

use super::{propose_error, EventLoop, RequestError};
use crate::members;
use crate::state_machine::StateMachine;

/// How long the transport keeps a removed member's address, so that the
/// leader can tell it it was removed when it calls (it campaigns once
/// it stops hearing from the leader).
pub const RETIRED_PEER_KEEP: Duration = Duration::from_secs(60);
/// How long a member that applied its own removal keeps running, so that
/// the messages of its last passes (the hand-over to a successor) leave.
pub const REMOVED_GRACE: Duration = Duration::from_millis(200);

pub type ChangeReply = oneshot::Sender<Result<Membership, RequestError>>;
pub type TransferReply = oneshot::Sender<Result<NodeId, RequestError>>;

/// The loop's membership bookkeeping.
#[derive(Default)]
pub(crate) struct Members {
    /// Changes proposed here, by the index of their entry.
    changes: BTreeMap<Index, (Term, ChangeReply)>,
    /// A transfer asked for: target and who waits.
    transfer: Option<(NodeId, TransferReply)>,
    /// The transport's peers.
    peers: BTreeMap<NodeId, PeerAddr>,
    /// Former members still reachable, and since when they are former.
    retired: BTreeMap<NodeId, (PeerAddr, Instant)>,
    /// The membership the peers were last set from.
    synced: Option<Membership>,
    /// This member applied a membership without itself after one with.
    removed_at: Option<Instant>,
    /// The memberships this member applied (or restored) included it: a
    /// node joining applies older memberships without itself first.
    was_member: bool,
}

impl<S: StateMachine> EventLoop<S> {
    /// A client asks for a membership change: proposed on the leader,
    /// answered when applied here.
    pub(super) fn change_membership(
        &mut self,
        change: MembershipChange,
        meta: Option<Bytes>,
        reply: ChangeReply,
    ) {
        if self.raft.role() != Role::Leader {
            let _ = reply.send(Err(RequestError::NotLeader {
                leader: self.raft.leader(),
            }));
            return;
        }
        if let MembershipChange::AddVoter(id) = &change {
            let id = *id;
            if self.raft.membership().learners.contains(&id) {
                // etcd's rule: a learner is promoted once it holds 90% of
                // what the leader committed.
                let matched = self.raft.progress(id).map_or(0, |p| p.match_index);
                if matched < self.raft.commit() / 10 * 9 || matched == 0 {
                    let _ = reply.send(Err(RequestError::Invalid(format!(
                        "can only promote a learner member which is in sync with leader \
                         (member {id} holds the log through {matched}, the leader committed {})",
                        self.raft.commit()
                    ))));
                    return;
                }
            }
        }
        match self.raft.propose_membership_with(change, meta) {
            Ok(index) => {
                self.members
                    .changes
                    .insert(index, (self.raft.term(), reply));
            }
            Err(e) => {
                let _ = reply.send(Err(match e {
                    skiff_raft::ProposeError::InvalidChange(why) => RequestError::Invalid(why),
                    skiff_raft::ProposeError::ChangePending { index } => RequestError::Invalid(
                        format!("a membership change (entry {index}) is still in progress"),
                    ),
                    other => propose_error(other),
                }));
            }
        }
    }

    /// A client asks this leader to hand over to `target` (or to the most
    /// caught-up voter): answered once the target leads.
    pub(super) fn transfer_leadership(&mut self, target: Option<NodeId>, reply: TransferReply) {
        if self.raft.role() != Role::Leader {
            let _ = reply.send(Err(RequestError::NotLeader {
                leader: self.raft.leader(),
            }));
            return;
        }
        let me = self.cfg.id;
        let m = self.raft.membership();
        let target = target.or_else(|| {
            m.all_voters()
                .into_iter()
                .filter(|id| *id != me)
                .max_by_key(|id| {
                    let matched = self.raft.progress(*id).map_or(0, |p| p.match_index);
                    (matched, std::cmp::Reverse(*id))
                })
        });
        let Some(target) = target else {
            let _ = reply.send(Err(RequestError::Invalid(
                "no other voter to hand leadership to".into(),
            )));
            return;
        };
        if let Err(e) = self.raft.transfer_leadership(target) {
            let _ = reply.send(Err(RequestError::Invalid(e.to_string())));
            return;
        }
        if let Some((_, old)) = self.members.transfer.replace((target, reply)) {
            let _ = old.send(Err(RequestError::Unavailable(
                "replaced by a newer transfer".into(),
            )));
        }
    }

    /// A leader answers a message from a node its committed membership
    /// does not include with `Removed` (and drops the message). Returns
    /// whether it did.
    pub(super) fn answer_removed(&mut self, msg: &Message) -> bool {
        if self.raft.role() != Role::Leader
            || self.raft.membership().members().contains(&msg.from)
            || self.raft.membership_index() > self.raft.commit()
        {
            return false;
        }
        tracing::info!(
            node = self.cfg.id,
            peer = msg.from,
            "a removed node called: telling it it was removed"
        );
        self.send(Message {
            from: self.cfg.id,
            to: msg.from,
            term: self.raft.term(),
            body: MessageBody::Removed,
        });
        true
    }

    /// Bookkeeping for an applied entry (before the state machine sees it).
    pub(super) fn membership_entry_applied(&mut self, e: &Entry) {
        if let Some((term, reply)) = self.members.changes.remove(&e.index) {
            let _ = reply.send(match &e.payload {
                Payload::Membership(m) if e.term == term => Ok(m.clone()),
                _ => Err(super::lost()),
            });
        }
        if let Payload::Membership(m) = &e.payload {
            let member = m.members().contains(&self.cfg.id);
            if member {
                self.members.was_member = true;
            } else if self.members.was_member
                && self.raft.membership_index() == e.index
                && self.members.removed_at.is_none()
            {
                // The latest membership this member knows, committed, and
                // without it (an older one replayed, or one applied while
                // joining, is not a removal).
                tracing::warn!(
                    node = self.cfg.id,
                    index = e.index,
                    "this member was removed from the cluster; stopping"
                );
                self.members.removed_at = Some(Instant::now());
            }
        }
    }

    /// Each pass: answer transfers, keep the transport's peers equal to
    /// the membership, forget retired peers, and end a removed member.
    /// `Err` stops the loop.
    pub(super) fn membership_pass(&mut self) -> Result<(), String> {
        if self.members.synced.is_none() {
            // First pass: a restarted member starts from what it restored.
            self.members.was_member = self.raft.membership().members().contains(&self.cfg.id);
        }
        if let Some((target, _)) = &self.members.transfer {
            let target = *target;
            let done = self.raft.leader() == Some(target);
            let abandoned = self.raft.role() == Role::Leader && self.raft.transferee().is_none();
            let lost = self.raft.role() != Role::Leader && self.raft.leader().is_some();
            if done || abandoned || lost {
                let (_, reply) = self.members.transfer.take().expect("checked");
                let _ = reply.send(if done {
                    Ok(target)
                } else if abandoned {
                    Err(RequestError::Unavailable(format!(
                        "member {target} did not take over within an election timeout"
                    )))
                } else {
                    Err(RequestError::Unavailable(format!(
                        "member {:?} leads, not {target}",
                        self.raft.leader()
                    )))
                });
            }
        }
        if self.members.synced.as_ref() != Some(self.raft.membership()) {
            self.sync_peers();
        }
        let now = Instant::now();
        let before = self.members.retired.len();
        self.members
            .retired
            .retain(|_, (_, since)| now.duration_since(*since) < RETIRED_PEER_KEEP);
        if self.members.retired.len() != before {
            self.set_transport_peers();
        }
        if let Some(at) = self.members.removed_at {
            if at.elapsed() >= REMOVED_GRACE {
                return Err(self.removed("it applied a membership without itself"));
            }
        }
        Ok(())
    }

    /// A `Removed` message arrived: this member stops for good.
    pub(super) fn removed(&mut self, how: &str) -> String {
        let why = format!(
            "member {} was removed from the cluster ({how}); it will not start again on this \
             data directory",
            self.cfg.id
        );
        if let Err(e) = members::mark_removed(&self.cfg.data_dir, &why) {
            tracing::error!(error = %e, "could not record the removal in the data directory");
        }
        why
    }

    fn sync_peers(&mut self) {
        let m = self.raft.membership().clone();
        let me = self.cfg.id;
        let mut peers = BTreeMap::new();
        if m.members().is_empty() {
            // Joining: the membership is not known yet; answer those the
            // configuration names.
            peers.extend(
                self.cfg
                    .initial_cluster
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .map(|(id, a)| (*id, a.clone())),
            );
        } else {
            for id in m.members() {
                if id == me {
                    continue;
                }
                match members::peer_addr(&m, &self.cfg, id) {
                    Some(a) => {
                        peers.insert(id, a);
                    }
                    None => tracing::warn!(
                        node = me,
                        peer = id,
                        "no peer address known for member; it cannot be reached"
                    ),
                }
            }
        }
        let now = Instant::now();
        for (id, addr) in std::mem::take(&mut self.members.peers) {
            if !peers.contains_key(&id) {
                self.members.retired.insert(id, (addr, now));
            }
        }
        for id in peers.keys() {
            self.members.retired.remove(id);
        }
        self.members.peers = peers;
        self.members.synced = Some(m);
        self.set_transport_peers();
    }

    fn set_transport_peers(&self) {
        let mut all = self.members.peers.clone();
        for (id, (addr, _)) in &self.members.retired {
            all.entry(*id).or_insert_with(|| addr.clone());
        }
        self.transport.set_peers(&all);
    }

    /// Fails what waits on membership when the loop stops.
    pub(super) fn membership_stop(&mut self, why: &str) {
        for (_, (_, reply)) in std::mem::take(&mut self.members.changes) {
            let _ = reply.send(Err(RequestError::Stopped(why.to_string())));
        }
        if let Some((_, reply)) = self.members.transfer.take() {
            let _ = reply.send(Err(RequestError::Stopped(why.to_string())));
        }
    }
}
