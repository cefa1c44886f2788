//! etcd's Lock and Election services, on the same primitives a client
//! library uses (etcd's `concurrency` package, written here for Skiff):
//! a holder is a key `name/<lease in hex>` put with its lease; keys under
//! `name/` queue by create revision, and the holder is the oldest. A waiter
//! watches the deletion of the key just ahead of it (not the holder's, so
//! a release wakes one waiter, not all). A lease that ends deletes its key,
//! which releases the lock or the leadership.
//!
//! Waiting ends when the caller goes away: the request's future is
//! dropped, and with it the internal watcher.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{kv_status, unexpected, Api};
use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchResponse,
};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::KeyValue;
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use crate::pb::v3lockpb::lock_server::Lock;
use crate::pb::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use crate::store::auth::PermKind;
use crate::watch::{Command, Hub, CONTROL_RESPONSES_MAX};

/// Responses queued for an internal watcher.
const INTERNAL_WATCH_QUEUE: usize = 16;
/// Leader responses queued for one Observe stream.
const OBSERVE_QUEUE: usize = 16;

fn not_leader() -> Status {
    Status::failed_precondition("election: not leader")
}

fn no_leader() -> Status {
    Status::not_found("election: no leader")
}

/// The key range after `prefix` (etcd's prefix end).
fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

fn holder_key(name: &[u8], lease: i64) -> Bytes {
    let mut k = BytesMut::from(name);
    k.extend_from_slice(format!("/{lease:x}").as_bytes());
    k.freeze()
}

fn prefix_of(name: &[u8]) -> Bytes {
    let mut p = BytesMut::from(name);
    p.extend_from_slice(b"/");
    p.freeze()
}

fn op(request: Op) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn create_revision_is(key: &Bytes, rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        range_end: Bytes::new(),
    }
}

/// One watcher on this member's hub, for the lock's own waits; closed
/// when dropped.
struct InternalWatch {
    hub: Hub,
    stream: u64,
    events: mpsc::Receiver<WatchResponse>,
    // Kept so that the control replies have somewhere to go.
    _control: mpsc::Receiver<WatchResponse>,
}

impl InternalWatch {
    async fn open(api: &Api, key: Bytes, range_end: Bytes, start: i64) -> Result<Self, Status> {
        let stream = api
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events_tx, events) = mpsc::channel(INTERNAL_WATCH_QUEUE);
        let (control_tx, control) = mpsc::channel(CONTROL_RESPONSES_MAX);
        let refuse = |e: crate::watch::CommandError| Status::unavailable(e.to_string());
        api.hub
            .command(Command::Open {
                stream,
                events: events_tx,
            })
            .map_err(refuse)?;
        let w = InternalWatch {
            hub: api.hub.clone(),
            stream,
            events,
            _control: control,
        };
        let reply = control_tx
            .reserve_owned()
            .await
            .map_err(|_| Status::unavailable("watch: stream closed"))?;
        api.hub
            .command(Command::Create {
                stream,
                req: WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: start,
                    ..WatchCreateRequest::default()
                },
                reply,
            })
            .map_err(refuse)?;
        Ok(w)
    }

    /// The next response with events; Err when the watcher ended.
    async fn next(&mut self) -> Result<WatchResponse, Status> {
        loop {
            let r = self
                .events
                .recv()
                .await
                .ok_or_else(|| Status::unavailable("watch: the member is stopping"))?;
            if r.canceled {
                return Err(Status::unavailable(format!(
                    "watch cancelled: {}",
                    r.cancel_reason
                )));
            }
            if !r.events.is_empty() {
                return Ok(r);
            }
        }
    }
}

impl Drop for InternalWatch {
    fn drop(&mut self) {
        let _ = self.hub.command(Command::Close {
            stream: self.stream,
        });
    }
}

impl Api {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        match self.write(op(Op::RequestTxn(txn))).await? {
            OpResponse::ResponseTxn(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    /// The oldest key under `prefix` (the holder), if any.
    async fn oldest(&self, prefix: &Bytes) -> Result<(Option<KeyValue>, i64), Status> {
        let r = self
            .query_range(
                RangeRequest {
                    key: prefix.clone(),
                    range_end: prefix_end(prefix),
                    limit: 1,
                    sort_order: SortOrder::Ascend as i32,
                    sort_target: SortTarget::Create as i32,
                    ..RangeRequest::default()
                },
                true,
            )
            .await?;
        let rev = r.header.as_ref().map_or(0, |h| h.revision);
        Ok((r.kvs.into_iter().next(), rev))
    }

    /// Puts `key` with `lease` unless it exists; returns its create
    /// revision and its value when it existed.
    async fn enqueue(
        &self,
        key: &Bytes,
        lease: i64,
        value: Bytes,
    ) -> Result<(i64, Option<Bytes>), Status> {
        let r = self
            .txn(TxnRequest {
                compare: vec![create_revision_is(key, 0)],
                success: vec![op(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value,
                    lease,
                    ..PutRequest::default()
                }))],
                failure: vec![op(Op::RequestRange(RangeRequest {
                    key: key.clone(),
                    ..RangeRequest::default()
                }))],
            })
            .await?;
        if r.succeeded {
            let rev = r.header.as_ref().map_or(0, |h| h.revision);
            return Ok((rev, None));
        }
        match r.responses.into_iter().next().and_then(|r| r.response) {
            Some(OpResponse::ResponseRange(range)) => match range.kvs.into_iter().next() {
                Some(kv) => Ok((kv.create_revision, Some(kv.value))),
                // Deleted between the compare and the read: not possible
                // within one txn.
                None => Err(unexpected()),
            },
            _ => Err(unexpected()),
        }
    }

    /// Waits until no key under `prefix` is older than `my_rev`: each
    /// round watches the deletion of the newest key older than it.
    async fn wait_turn(&self, prefix: &Bytes, my_rev: i64) -> Result<i64, Status> {
        loop {
            let r = self
                .query_range(
                    RangeRequest {
                        key: prefix.clone(),
                        range_end: prefix_end(prefix),
                        limit: 1,
                        sort_order: SortOrder::Descend as i32,
                        sort_target: SortTarget::Create as i32,
                        max_create_revision: my_rev - 1,
                        ..RangeRequest::default()
                    },
                    true,
                )
                .await?;
            let rev = r.header.as_ref().map_or(0, |h| h.revision);
            let Some(ahead) = r.kvs.into_iter().next() else {
                return Ok(rev);
            };
            let mut w = InternalWatch::open(self, ahead.key.clone(), Bytes::new(), rev + 1).await?;
            loop {
                let resp = w.next().await?;
                if resp
                    .events
                    .iter()
                    .any(|e| e.r#type == EventType::Delete as i32)
                {
                    break;
                }
            }
        }
    }

    /// A header at the revision this member applied.
    fn current_header(&self) -> Option<crate::pb::etcdserverpb::ResponseHeader> {
        self.header(self.hub.revision())
    }
}

#[tonic::async_trait]
impl Lock for Api {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let user = self.user_of(&request).await?;
        let req = request.into_inner();
        let prefix = prefix_of(&req.name);
        self.check_under(&user, &prefix, true)?;
        let key = holder_key(&req.name, req.lease);
        let (my_rev, _) = self.enqueue(&key, req.lease, Bytes::new()).await?;
        let rev = self.wait_turn(&prefix, my_rev).await?;
        Ok(Response::new(LockResponse {
            header: self.header(rev),
            key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let user = self.user_of(&request).await?;
        let key = request.into_inner().key;
        self.check_key(&user, &key)?;
        let r = self
            .write(op(Op::RequestDeleteRange(DeleteRangeRequest {
                key,
                ..DeleteRangeRequest::default()
            })))
            .await?;
        let header = match r {
            OpResponse::ResponseDeleteRange(d) => d.header,
            _ => return Err(unexpected()),
        };
        Ok(Response::new(UnlockResponse { header }))
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for Api {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let user = self.user_of(&request).await?;
        let req = request.into_inner();
        let prefix = prefix_of(&req.name);
        self.check_under(&user, &prefix, true)?;
        let key = holder_key(&req.name, req.lease);
        let (my_rev, existing) = self.enqueue(&key, req.lease, req.value.clone()).await?;
        if existing.is_some_and(|v| v != req.value) {
            // Campaigning again with the same lease: its value is the new one.
            self.proclaim_value(&key, my_rev, req.lease, req.value)
                .await?;
        }
        let rev = self.wait_turn(&prefix, my_rev).await?;
        Ok(Response::new(CampaignResponse {
            header: self.header(rev),
            leader: Some(LeaderKey {
                name: req.name,
                key,
                rev: my_rev,
                lease: req.lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let user = self.user_of(&request).await?;
        let req = request.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::invalid_argument("election: missing leader key"))?;
        self.check_key(&user, &leader.key)?;
        let header = self
            .proclaim_value(&leader.key, leader.rev, leader.lease, req.value)
            .await?;
        Ok(Response::new(ProclaimResponse { header }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let user = self.user_of(&request).await?;
        let prefix = prefix_of(&request.into_inner().name);
        self.check_under(&user, &prefix, false)?;
        let (kv, rev) = self.oldest(&prefix).await?;
        let kv = kv.ok_or_else(no_leader)?;
        Ok(Response::new(LeaderResponse {
            header: self.header(rev),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<ObserveStream>, Status> {
        let user = self.user_of(&request).await?;
        let prefix = prefix_of(&request.into_inner().name);
        self.check_under(&user, &prefix, false)?;
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        let api = self.clone();
        tokio::spawn(async move {
            let result: Result<(), Status> = async {
                let mut last: Option<(Bytes, i64)> = None;
                loop {
                    let (kv, rev) = api.oldest(&prefix).await?;
                    if let Some(kv) = kv {
                        let now = (kv.key.clone(), kv.mod_revision);
                        if last.as_ref() != Some(&now) {
                            last = Some(now);
                            let resp = LeaderResponse {
                                header: api.header(rev),
                                kv: Some(kv),
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    // Anything under the prefix may change the leader.
                    let mut w =
                        InternalWatch::open(&api, prefix.clone(), prefix_end(&prefix), rev + 1)
                            .await?;
                    tokio::select! {
                        r = w.next() => { r?; }
                        _ = tx.closed() => return Ok(()),
                    }
                }
            }
            .await;
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let user = self.user_of(&request).await?;
        let leader = request
            .into_inner()
            .leader
            .ok_or_else(|| Status::invalid_argument("election: missing leader key"))?;
        self.check_key(&user, &leader.key)?;
        let r = self
            .txn(TxnRequest {
                compare: vec![create_revision_is(&leader.key, leader.rev)],
                success: vec![op(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: leader.key.clone(),
                    ..DeleteRangeRequest::default()
                }))],
                failure: vec![],
            })
            .await?;
        Ok(Response::new(ResignResponse {
            header: r.header.or_else(|| self.current_header()),
        }))
    }
}

impl Api {
    /// Refuses unless `user` may read (and, with `write`, write) every key
    /// under `prefix`: what a lock or an election on it touches. Its
    /// writes are then made by this member on the user's behalf.
    fn check_under(&self, user: &str, prefix: &[u8], write: bool) -> Result<(), Status> {
        let state = self.auth_state();
        let end = prefix_end(prefix);
        state
            .check_range(user, prefix, &end, PermKind::Read)
            .and_then(|()| {
                if write {
                    state.check_range(user, prefix, &end, PermKind::Write)
                } else {
                    Ok(())
                }
            })
            .map_err(|e| kv_status(&e))
    }

    /// Refuses unless `user` may read and write `key` (a holder's key).
    fn check_key(&self, user: &str, key: &[u8]) -> Result<(), Status> {
        let state = self.auth_state();
        state
            .check_range(user, key, &[], PermKind::Read)
            .and_then(|()| state.check_range(user, key, &[], PermKind::Write))
            .map_err(|e| kv_status(&e))
    }

    /// Puts the leader's new value, only while `key` is still the one
    /// created at `rev` (else not leader).
    async fn proclaim_value(
        &self,
        key: &Bytes,
        rev: i64,
        lease: i64,
        value: Bytes,
    ) -> Result<Option<crate::pb::etcdserverpb::ResponseHeader>, Status> {
        let r = self
            .txn(TxnRequest {
                compare: vec![create_revision_is(key, rev)],
                success: vec![op(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value,
                    lease,
                    ..PutRequest::default()
                }))],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(not_leader());
        }
        Ok(r.header)
    }
}
