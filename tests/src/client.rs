//! A small etcd v3 client over skiff-kv's generated tonic clients: what the
//! tests need, nothing more (no auth).
//!
//! A [`Client`] holds a list of endpoints and talks to one at a time. Every
//! request is bounded by the per-request timeout. Failover follows from
//! what the client can know about the request:
//!
//! * the connection to the current endpoint cannot be made: the request was
//!   never sent, so the client tries the next endpoint (each endpoint at
//!   most once per request);
//! * the connection broke while the request was in flight (a transport
//!   error, generated locally, as opposed to a status the server sent) or
//!   the request timed out: the request may or may not have been applied.
//!   Reads and other requests without effects are retried on the next
//!   endpoint; writes (put, delete, txn, compact) return the error, and the
//!   next request goes to the next endpoint.
//!
//! Statuses sent by the server (`etcdserver: ...`) are returned as they
//! are, never retried: the tests assert on them.
//!
//! It must never retry a write on its own: a test that checks acknowledged
//! writes relies on each put having been sent at most once.
//!
//! Watches ([`Client::watch`]) follow the etcd-client crate's API: a
//! [`Watcher`] sends requests on the stream (more watchers, cancels,
//! progress requests), a [`WatchStream`] yields its responses. Opening a
//! stream fails over like a read (it has no effects); once open, a stream
//! stays on its member and is never re-established behind the caller's
//! back: a test that resumes a watch does it itself, from the revision it
//! wants. Every wait on a stream is bounded.
//!
//! Leases ([`Client::lease_grant`] and the rest) follow the etcd-client
//! crate's API too. Grant and revoke are writes (never sent twice);
//! time-to-live and the lease list are reads. A keepalive stream
//! ([`Client::lease_keep_alive`]) opens like a watch stream (a keepalive
//! only renews a lease: sending it to another member is harmless), and is
//! split the same way: a [`LeaseKeeper`] sends keepalives, a
//! [`LeaseKeepAliveStream`] yields the answers. Unlike etcd-client, an
//! answer with TTL 0 (no such lease) is not an error: the tests look at it.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use skiff_kv::pb::etcdserverpb::cluster_client::ClusterClient;
use skiff_kv::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use skiff_kv::pb::etcdserverpb::kv_client::KvClient;
use skiff_kv::pb::etcdserverpb::lease_client::LeaseClient;
use skiff_kv::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use skiff_kv::pb::etcdserverpb::request_op::Request as Op;
use skiff_kv::pb::etcdserverpb::watch_client::WatchClient;
use skiff_kv::pb::etcdserverpb::watch_create_request::FilterType;
use skiff_kv::pb::etcdserverpb::watch_request::RequestUnion as WatchRequestUnion;
use skiff_kv::pb::etcdserverpb::{
    CompactionRequest, Compare as PbCompare, DeleteRangeRequest, HashKvRequest, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    MemberListRequest, PutRequest, RangeRequest, RequestOp, ResponseOp, StatusRequest, TxnRequest,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use skiff_kv::tls::ClientTls;
use tokio::sync::mpsc;
use tonic::codec::Streaming;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

pub use skiff_kv::pb::etcdserverpb::response_op::Response as TxnOpResponse;
pub use skiff_kv::pb::etcdserverpb::{
    CompactionResponse, DeleteRangeResponse, HashKvResponse, LeaseGrantResponse,
    LeaseKeepAliveResponse, LeaseLeasesResponse, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveResponse, Member, MemberListResponse, PutResponse, RangeResponse,
    ResponseHeader, StatusResponse, TxnResponse, WatchResponse,
};
pub use skiff_kv::pb::mvccpb::event::EventType;
pub use skiff_kv::pb::mvccpb::{Event, KeyValue};

/// Largest response the client decodes: a range over every key of a test
/// (thousands of 1 KiB values) is well above tonic's 4 MiB default.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// Timeouts of a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Bound on one request on one endpoint (connection excluded).
    pub request_timeout: Duration,
    /// Bound on establishing a connection to one endpoint.
    pub connect_timeout: Duration,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// No endpoint accepted a connection.
    Connect { endpoint: String, reason: String },
    /// The request got no answer within the request timeout.
    Timeout { endpoint: String, after: Duration },
    /// A gRPC status: sent by the server, or a transport error.
    Status {
        endpoint: String,
        status: tonic::Status,
    },
}

impl Error {
    /// The gRPC status, if the request got that far.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Status { status, .. } => Some(status),
            _ => None,
        }
    }

    /// Whether nothing came back within the timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether a member answered the request with an error (not a
    /// connection failure, not a timeout).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Status { status, .. } if !is_transport_error(status))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { endpoint, reason } => write!(f, "connect to {endpoint}: {reason}"),
            Error::Timeout { endpoint, after } => {
                write!(
                    f,
                    "{endpoint}: no answer within {:.1} s",
                    after.as_secs_f64()
                )
            }
            Error::Status { endpoint, status } => write!(
                f,
                "{endpoint}: status {:?}: {}",
                status.code(),
                status.message()
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Whether a request may be sent again after an error that leaves its fate
/// unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effects {
    /// Reads, status, member list, hash: safe to retry elsewhere.
    None,
    /// Writes: never sent twice by the client.
    Writes,
}

/// An etcd v3 client over a list of endpoints (see the module docs).
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<String>,
    /// The connection to each endpoint, made when first needed.
    channels: Vec<Option<Channel>>,
    /// The endpoint the next request goes to.
    at: usize,
    options: ConnectOptions,
    /// Plaintext, or TLS with the roots and certificate to use.
    tls: ClientTls,
}

impl Client {
    /// A client for `endpoints` (`http://host:port`); connects to the first
    /// one that accepts a connection, or fails if none does.
    pub async fn connect(endpoints: &[String], options: ConnectOptions) -> Result<Client, Error> {
        Client::connect_with(endpoints, options, ClientTls::plaintext()).await
    }

    /// [`Client::connect`] over TLS (`https://` endpoints) when `tls` says.
    pub async fn connect_with(
        endpoints: &[String],
        options: ConnectOptions,
        tls: ClientTls,
    ) -> Result<Client, Error> {
        assert!(!endpoints.is_empty(), "a client needs an endpoint");
        let mut client = Client {
            endpoints: endpoints.to_vec(),
            channels: vec![None; endpoints.len()],
            at: 0,
            options,
            tls,
        };
        let mut last = None;
        for _ in 0..endpoints.len() {
            match client.channel().await {
                Ok(_) => return Ok(client),
                Err(e) => {
                    last = Some(e);
                    client.at = (client.at + 1) % endpoints.len();
                }
            }
        }
        Err(last.expect("at least one endpoint was tried"))
    }

    /// The endpoint the next request goes to.
    pub fn current_endpoint(&self) -> &str {
        &self.endpoints[self.at]
    }

    /// The channel to the current endpoint, connecting if needed.
    async fn channel(&mut self) -> Result<Channel, Error> {
        if let Some(ch) = &self.channels[self.at] {
            return Ok(ch.clone());
        }
        let endpoint = self.endpoints[self.at].clone();
        let connect_error = |reason: String| Error::Connect {
            endpoint: endpoint.clone(),
            reason,
        };
        let builder = self
            .tls
            .endpoint(&endpoint)
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true);
        let channel =
            match tokio::time::timeout(self.options.connect_timeout, builder.connect()).await {
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) => return Err(connect_error(error_chain(&e))),
                Err(_) => return Err(connect_error("connect timed out".into())),
            };
        self.channels[self.at] = Some(channel.clone());
        Ok(channel)
    }

    /// Sends the next request to the next endpoint (after an error the
    /// caller suspects is the member's: it is paused, cut off, has no
    /// leader).
    pub fn next_endpoint(&mut self) {
        self.fail_over();
    }

    /// Forgets the current endpoint's connection and moves on to the next.
    fn fail_over(&mut self) {
        self.channels[self.at] = None;
        self.at = (self.at + 1) % self.endpoints.len();
    }

    /// Runs `call` on the current endpoint, failing over as the module docs
    /// say. At most one attempt per endpoint.
    async fn call<T, F, Fut>(&mut self, effects: Effects, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempts_max = self.endpoints.len();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last_attempt = attempt >= attempts_max;
            let endpoint = self.endpoints[self.at].clone();
            let channel = match self.channel().await {
                Ok(ch) => ch,
                Err(e) => {
                    self.fail_over();
                    if last_attempt {
                        return Err(e);
                    }
                    continue;
                }
            };
            let timeout = self.options.request_timeout;
            let error = match tokio::time::timeout(timeout, call(channel)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if !is_transport_error(&status) => {
                    return Err(Error::Status { endpoint, status });
                }
                Ok(Err(status)) => Error::Status { endpoint, status },
                Err(_) => Error::Timeout {
                    endpoint,
                    after: timeout,
                },
            };
            self.fail_over();
            let sent = !matches!(&error, Error::Status { status, .. } if never_sent(status));
            if last_attempt || (effects == Effects::Writes && sent) {
                return Err(error);
            }
        }
    }

    /// `KV.Put`.
    pub async fn put(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, Error> {
        let request = put_request(key, value, options);
        self.call(Effects::Writes, |ch| {
            let request = request.clone();
            async move { kv_client(ch).put(request).await }
        })
        .await
    }

    /// `KV.Range` over `key` (and what `options` add to it).
    pub async fn get(
        &mut self,
        key: impl AsRef<[u8]>,
        options: Option<GetOptions>,
    ) -> Result<RangeResponse, Error> {
        let request = range_request(key, options);
        self.call(Effects::None, |ch| {
            let request = request.clone();
            async move { kv_client(ch).range(request).await }
        })
        .await
    }

    /// `KV.DeleteRange`.
    pub async fn delete(
        &mut self,
        key: impl AsRef<[u8]>,
        options: Option<DeleteOptions>,
    ) -> Result<DeleteRangeResponse, Error> {
        let request = delete_request(key, options);
        self.call(Effects::Writes, |ch| {
            let request = request.clone();
            async move { kv_client(ch).delete_range(request).await }
        })
        .await
    }

    /// `KV.Txn`.
    pub async fn txn(&mut self, txn: Txn) -> Result<TxnResponse, Error> {
        let request = txn.request;
        self.call(Effects::Writes, |ch| {
            let request = request.clone();
            async move { kv_client(ch).txn(request).await }
        })
        .await
    }

    /// `KV.Compact` up to `revision`; with `physical`, the answer waits
    /// until the compacted versions are gone.
    pub async fn compact(
        &mut self,
        revision: i64,
        physical: bool,
    ) -> Result<CompactionResponse, Error> {
        let request = CompactionRequest { revision, physical };
        self.call(Effects::Writes, |ch| async move {
            kv_client(ch).compact(request).await
        })
        .await
    }

    /// `Cluster.MemberList`.
    pub async fn member_list(&mut self) -> Result<MemberListResponse, Error> {
        self.call(Effects::None, |ch| async move {
            ClusterClient::new(ch)
                .member_list(MemberListRequest::default())
                .await
        })
        .await
    }

    /// `Maintenance.Status` of the current endpoint.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        self.call(Effects::None, |ch| async move {
            MaintenanceClient::new(ch)
                .status(StatusRequest::default())
                .await
        })
        .await
    }

    /// `Maintenance.HashKV` at `revision` (0: the latest) of the current
    /// endpoint.
    pub async fn hash_kv(&mut self, revision: i64) -> Result<HashKvResponse, Error> {
        self.call(Effects::None, |ch| async move {
            MaintenanceClient::new(ch)
                .hash_kv(HashKvRequest { revision })
                .await
        })
        .await
    }

    /// `Watch.Watch`: opens a watch stream on the current endpoint (failing
    /// over as a read does while the stream cannot be opened), creates a
    /// watcher on `key` and waits (bounded by the request timeout) for the
    /// server's answer to that creation, which [`Watcher::create_response`]
    /// keeps; everything after it comes from the [`WatchStream`]. A refused
    /// creation (`canceled`, or no `created`) is not an error here: the
    /// caller looks at the create response.
    pub async fn watch(
        &mut self,
        key: impl AsRef<[u8]>,
        options: Option<WatchOptions>,
    ) -> Result<(Watcher, WatchStream), Error> {
        let create = watch_create_request(key, options);
        let (sender, stream, first) = self
            .call(Effects::None, |ch| {
                let create = create.clone();
                async move {
                    let (sender, receiver) = mpsc::unbounded_channel();
                    sender
                        .send(WatchRequest {
                            request_union: Some(WatchRequestUnion::CreateRequest(create)),
                        })
                        .expect("the receiver is still here");
                    let response = WatchClient::new(ch)
                        .max_decoding_message_size(RESPONSE_BYTES_MAX)
                        .watch(UnboundedReceiverStream::new(receiver))
                        .await?;
                    let mut stream = response.into_inner();
                    let first = stream.message().await?;
                    Ok(tonic::Response::new((sender, stream, first)))
                }
            })
            .await?;
        let endpoint = self.current_endpoint().to_string();
        let Some(first) = first else {
            return Err(Error::Status {
                endpoint,
                status: tonic::Status::unknown(
                    "the server ended the watch stream without answering the create request",
                ),
            });
        };
        let watcher = Watcher {
            watch_id: first.watch_id,
            created: first,
            sender,
            endpoint: endpoint.clone(),
        };
        let stream = ResponseStream {
            stream,
            endpoint,
            timeout: self.options.request_timeout,
        };
        Ok((watcher, stream))
    }

    /// `Lease.LeaseGrant`: a lease of `ttl` seconds; `id` `None` (or
    /// `Some(0)`) lets the server choose the id. A write: never sent twice.
    pub async fn lease_grant(
        &mut self,
        ttl: i64,
        id: Option<i64>,
    ) -> Result<LeaseGrantResponse, Error> {
        let request = LeaseGrantRequest {
            ttl,
            id: id.unwrap_or(0),
        };
        self.call(Effects::Writes, |ch| async move {
            LeaseClient::new(ch).lease_grant(request).await
        })
        .await
    }

    /// `Lease.LeaseRevoke`: ends lease `id` and deletes its keys. A write.
    pub async fn lease_revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        let request = LeaseRevokeRequest { id };
        self.call(Effects::Writes, |ch| async move {
            LeaseClient::new(ch).lease_revoke(request).await
        })
        .await
    }

    /// `Lease.LeaseTimeToLive` of `id` (TTL -1: no such lease); with
    /// `keys`, the keys attached to it.
    pub async fn lease_time_to_live(
        &mut self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        let request = LeaseTimeToLiveRequest { id, keys };
        self.call(Effects::None, |ch| async move {
            LeaseClient::new(ch).lease_time_to_live(request).await
        })
        .await
    }

    /// `Lease.LeaseLeases`: every lease held.
    pub async fn lease_leases(&mut self) -> Result<LeaseLeasesResponse, Error> {
        self.call(Effects::None, |ch| async move {
            LeaseClient::new(ch)
                .lease_leases(LeaseLeasesRequest {})
                .await
        })
        .await
    }

    /// `Lease.LeaseKeepAlive` for `id`: opens a keepalive stream on the
    /// current endpoint (failing over as a read does while it cannot be
    /// opened) and sends one keepalive on it, as etcd-client does; that
    /// keepalive's answer is the [`LeaseKeepAliveStream`]'s first message
    /// (TTL 0 when the lease is not found). [`LeaseKeeper::keep_alive`]
    /// sends more.
    pub async fn lease_keep_alive(
        &mut self,
        id: i64,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Error> {
        let (sender, stream) = self
            .call(Effects::None, |ch| async move {
                let (sender, receiver) = mpsc::unbounded_channel();
                sender
                    .send(LeaseKeepAliveRequest { id })
                    .expect("the receiver is still here");
                let response = LeaseClient::new(ch)
                    .lease_keep_alive(UnboundedReceiverStream::new(receiver))
                    .await?;
                Ok(tonic::Response::new((sender, response.into_inner())))
            })
            .await?;
        let endpoint = self.current_endpoint().to_string();
        let keeper = LeaseKeeper {
            id,
            sender,
            endpoint: endpoint.clone(),
        };
        let stream = ResponseStream {
            stream,
            endpoint,
            timeout: self.options.request_timeout,
        };
        Ok((keeper, stream))
    }
}

fn kv_client(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

/// A status tonic made up locally from a transport failure (it carries the
/// error as its source), as opposed to one the server sent.
fn is_transport_error(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status.source().is_some()
}

/// Whether a transport error says the request never reached the server: the
/// connection was refused (a member that stopped), the server refused the
/// stream before processing it (HTTP/2 REFUSED_STREAM, after a graceful
/// GOAWAY), or the connection stopped taking requests before this one was
/// handed to it (hyper's "canceled": on HTTP/2 it is given only to a request
/// still queued for a connection that closed or was not ready, as after a
/// GOAWAY; grpc-go retries such a request transparently). Such a write is
/// safe to send elsewhere.
fn never_sent(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    let mut source = status.source();
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        let text = e.to_string();
        if text.contains("refused stream") || text.contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The end of the range of every key that starts with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff
/// incremented and what follows dropped; `\0` (to the end of the key
/// space) when there is no such byte.
pub fn prefix_range_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

fn bytes_of(b: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(b.as_ref())
}

/// Options of [`Client::put`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    prev_kv: bool,
    lease: i64,
}

impl PutOptions {
    pub fn new() -> PutOptions {
        PutOptions::default()
    }

    /// Return the key's previous version.
    pub fn with_prev_key(mut self) -> PutOptions {
        self.prev_kv = true;
        self
    }

    /// Attach the key to lease `id` (0: no lease): the key is deleted when
    /// the lease is revoked or expires.
    pub fn with_lease(mut self, id: i64) -> PutOptions {
        self.lease = id;
        self
    }
}

fn put_request(
    key: impl AsRef<[u8]>,
    value: impl AsRef<[u8]>,
    o: Option<PutOptions>,
) -> PutRequest {
    let o = o.unwrap_or_default();
    PutRequest {
        key: bytes_of(key),
        value: bytes_of(value),
        prev_kv: o.prev_kv,
        lease: o.lease,
        ..PutRequest::default()
    }
}

/// Options of [`Client::get`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    prefix: bool,
    revision: i64,
    serializable: bool,
    limit: i64,
    count_only: bool,
    keys_only: bool,
}

impl GetOptions {
    pub fn new() -> GetOptions {
        GetOptions::default()
    }

    /// Every key that starts with the key.
    pub fn with_prefix(mut self) -> GetOptions {
        self.prefix = true;
        self
    }

    /// The store as of `revision` (0: the latest).
    pub fn with_revision(mut self, revision: i64) -> GetOptions {
        self.revision = revision;
        self
    }

    /// Served from the member's own state, without a ReadIndex.
    pub fn with_serializable(mut self) -> GetOptions {
        self.serializable = true;
        self
    }

    /// At most `limit` keys (0: no limit).
    pub fn with_limit(mut self, limit: i64) -> GetOptions {
        self.limit = limit;
        self
    }

    /// Only the count.
    pub fn with_count_only(mut self) -> GetOptions {
        self.count_only = true;
        self
    }

    /// Keys without values.
    pub fn with_keys_only(mut self) -> GetOptions {
        self.keys_only = true;
        self
    }
}

fn range_request(key: impl AsRef<[u8]>, o: Option<GetOptions>) -> RangeRequest {
    let o = o.unwrap_or_default();
    let key = bytes_of(key);
    RangeRequest {
        range_end: if o.prefix {
            prefix_range_end(&key)
        } else {
            Bytes::new()
        },
        key,
        limit: o.limit,
        revision: o.revision,
        serializable: o.serializable,
        keys_only: o.keys_only,
        count_only: o.count_only,
        ..RangeRequest::default()
    }
}

/// Options of [`Client::delete`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteOptions {
    prefix: bool,
    prev_kv: bool,
}

impl DeleteOptions {
    pub fn new() -> DeleteOptions {
        DeleteOptions::default()
    }

    /// Every key that starts with the key.
    pub fn with_prefix(mut self) -> DeleteOptions {
        self.prefix = true;
        self
    }

    /// Return the deleted keys' last versions.
    pub fn with_prev_key(mut self) -> DeleteOptions {
        self.prev_kv = true;
        self
    }
}

fn delete_request(key: impl AsRef<[u8]>, o: Option<DeleteOptions>) -> DeleteRangeRequest {
    let o = o.unwrap_or_default();
    let key = bytes_of(key);
    DeleteRangeRequest {
        range_end: if o.prefix {
            prefix_range_end(&key)
        } else {
            Bytes::new()
        },
        key,
        prev_kv: o.prev_kv,
    }
}

/// The comparison of a [`Compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    Greater,
    Less,
    NotEqual,
}

impl CompareOp {
    fn result(self) -> CompareResult {
        match self {
            CompareOp::Equal => CompareResult::Equal,
            CompareOp::Greater => CompareResult::Greater,
            CompareOp::Less => CompareResult::Less,
            CompareOp::NotEqual => CompareResult::NotEqual,
        }
    }
}

/// One condition of a [`Txn`].
#[derive(Debug, Clone)]
pub struct Compare(PbCompare);

impl Compare {
    fn new(key: impl AsRef<[u8]>, op: CompareOp, target: CompareTarget, t: TargetUnion) -> Compare {
        Compare(PbCompare {
            result: op.result() as i32,
            target: target as i32,
            key: bytes_of(key),
            target_union: Some(t),
            range_end: Bytes::new(),
        })
    }

    /// The key's value `op` `value`.
    pub fn value(key: impl AsRef<[u8]>, op: CompareOp, value: impl AsRef<[u8]>) -> Compare {
        let t = TargetUnion::Value(bytes_of(value));
        Compare::new(key, op, CompareTarget::Value, t)
    }

    /// The key's version (0 when absent) `op` `version`.
    pub fn version(key: impl AsRef<[u8]>, op: CompareOp, version: i64) -> Compare {
        let t = TargetUnion::Version(version);
        Compare::new(key, op, CompareTarget::Version, t)
    }

    /// The key's creation revision `op` `revision`.
    pub fn create_revision(key: impl AsRef<[u8]>, op: CompareOp, revision: i64) -> Compare {
        let t = TargetUnion::CreateRevision(revision);
        Compare::new(key, op, CompareTarget::Create, t)
    }

    /// The key's last modification revision `op` `revision`.
    pub fn mod_revision(key: impl AsRef<[u8]>, op: CompareOp, revision: i64) -> Compare {
        let t = TargetUnion::ModRevision(revision);
        Compare::new(key, op, CompareTarget::Mod, t)
    }
}

/// One operation of a [`Txn`] branch.
#[derive(Debug, Clone)]
pub struct TxnOp(Op);

impl TxnOp {
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, o: Option<PutOptions>) -> TxnOp {
        TxnOp(Op::RequestPut(put_request(key, value, o)))
    }

    pub fn get(key: impl AsRef<[u8]>, o: Option<GetOptions>) -> TxnOp {
        TxnOp(Op::RequestRange(range_request(key, o)))
    }

    pub fn delete(key: impl AsRef<[u8]>, o: Option<DeleteOptions>) -> TxnOp {
        TxnOp(Op::RequestDeleteRange(delete_request(key, o)))
    }
}

/// A transaction: if every compare holds, the `and_then` branch runs, else
/// the `or_else` branch.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    request: TxnRequest,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.request
            .compare
            .extend(compares.into_iter().map(|c| c.0));
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Txn {
        self.request.success.extend(ops.into_iter().map(request_op));
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Txn {
        self.request.failure.extend(ops.into_iter().map(request_op));
        self
    }
}

fn request_op(op: TxnOp) -> RequestOp {
    RequestOp {
        request: Some(op.0),
    }
}

/// The responses of the branch a transaction ran, in order.
pub fn op_responses(r: &TxnResponse) -> Vec<&TxnOpResponse> {
    r.responses
        .iter()
        .map(|ResponseOp { response }| response.as_ref().expect("a response in every op"))
        .collect()
}

/// A key as UTF-8 (panics otherwise: test keys are text).
pub fn key_str(kv: &KeyValue) -> &str {
    std::str::from_utf8(&kv.key).expect("a UTF-8 key")
}

/// A value as UTF-8 (panics otherwise: test values are text).
pub fn value_str(kv: &KeyValue) -> &str {
    std::str::from_utf8(&kv.value).expect("a UTF-8 value")
}

/// Options of [`Client::watch`] and [`Watcher::watch`] (the etcd-client
/// crate's names).
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    range_end: Option<Bytes>,
    prefix: bool,
    start_revision: i64,
    progress_notify: bool,
    filters: Vec<FilterType>,
    prev_kv: bool,
    watch_id: i64,
    fragment: bool,
}

impl WatchOptions {
    pub fn new() -> WatchOptions {
        WatchOptions::default()
    }

    /// Every key that starts with the key.
    pub fn with_prefix(mut self) -> WatchOptions {
        self.prefix = true;
        self
    }

    /// Every key in `[key, end)` (`"\0"`: every key from the key on).
    pub fn with_range(mut self, end: impl AsRef<[u8]>) -> WatchOptions {
        self.range_end = Some(bytes_of(end));
        self
    }

    /// Every key from the key on.
    pub fn with_from_key(self) -> WatchOptions {
        self.with_range([0])
    }

    /// Events from `revision` on (0: from the next revision).
    pub fn with_start_revision(mut self, revision: i64) -> WatchOptions {
        self.start_revision = revision;
        self
    }

    /// Each event carries the key's previous version (none on a create).
    pub fn with_prev_key(mut self) -> WatchOptions {
        self.prev_kv = true;
        self
    }

    /// Periodic empty responses while nothing happens.
    pub fn with_progress_notify(mut self) -> WatchOptions {
        self.progress_notify = true;
        self
    }

    /// Leave PUT events out (etcd's `NOPUT` filter).
    pub fn with_filter_put(mut self) -> WatchOptions {
        self.filters.push(FilterType::Noput);
        self
    }

    /// Leave DELETE events out (etcd's `NODELETE` filter).
    pub fn with_filter_delete(mut self) -> WatchOptions {
        self.filters.push(FilterType::Nodelete);
        self
    }

    /// A watch id chosen by the client (0, the default, lets the server
    /// choose, as etcd's `AutoWatchID`).
    pub fn with_watch_id(mut self, watch_id: i64) -> WatchOptions {
        self.watch_id = watch_id;
        self
    }

    /// Large responses may be split into fragments.
    pub fn with_fragment(mut self) -> WatchOptions {
        self.fragment = true;
        self
    }
}

fn watch_create_request(key: impl AsRef<[u8]>, o: Option<WatchOptions>) -> WatchCreateRequest {
    let o = o.unwrap_or_default();
    let key = bytes_of(key);
    let range_end = match (&o.range_end, o.prefix) {
        (Some(end), _) => end.clone(),
        (None, true) => prefix_range_end(&key),
        (None, false) => Bytes::new(),
    };
    WatchCreateRequest {
        key,
        range_end,
        start_revision: o.start_revision,
        progress_notify: o.progress_notify,
        filters: o.filters.iter().map(|&f| f as i32).collect(),
        prev_kv: o.prev_kv,
        watch_id: o.watch_id,
        fragment: o.fragment,
    }
}

/// The sending half of a watch stream (see [`Client::watch`]): creates
/// more watchers on it, cancels them, asks for progress. Their answers
/// arrive on the [`WatchStream`]. Dropping it half-closes the stream (etcd
/// keeps the watchers running); dropping the [`WatchStream`] ends it.
#[derive(Debug, Clone)]
pub struct Watcher {
    watch_id: i64,
    created: WatchResponse,
    sender: mpsc::UnboundedSender<WatchRequest>,
    endpoint: String,
}

impl Watcher {
    /// The id the server gave the stream's first watcher (-1 when refused).
    pub fn watch_id(&self) -> i64 {
        self.watch_id
    }

    /// The server's answer to the stream's first create request.
    pub fn create_response(&self) -> &WatchResponse {
        &self.created
    }

    /// The endpoint the stream is open on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn send(&self, request: WatchRequestUnion) -> Result<(), Error> {
        self.sender
            .send(WatchRequest {
                request_union: Some(request),
            })
            .map_err(|_| Error::Status {
                endpoint: self.endpoint.clone(),
                status: tonic::Status::cancelled("the watch stream has ended"),
            })
    }

    /// Creates another watcher on this stream; the server's answer (a
    /// response with `created`) arrives on the [`WatchStream`].
    pub async fn watch(
        &mut self,
        key: impl AsRef<[u8]>,
        options: Option<WatchOptions>,
    ) -> Result<(), Error> {
        self.send(WatchRequestUnion::CreateRequest(watch_create_request(
            key, options,
        )))
    }

    /// Cancels the stream's first watcher.
    pub async fn cancel(&mut self) -> Result<(), Error> {
        let watch_id = self.watch_id;
        self.cancel_by_id(watch_id).await
    }

    /// Cancels watcher `watch_id` of this stream.
    pub async fn cancel_by_id(&mut self, watch_id: i64) -> Result<(), Error> {
        self.send(WatchRequestUnion::CancelRequest(WatchCancelRequest {
            watch_id,
        }))
    }

    /// Asks for a progress notification (etcd answers once every watcher
    /// of the stream has caught up, with watch id -1).
    pub async fn request_progress(&mut self) -> Result<(), Error> {
        self.send(WatchRequestUnion::ProgressRequest(WatchProgressRequest {}))
    }
}

/// The receiving half of a watch stream (see [`Client::watch`]).
pub type WatchStream = ResponseStream<WatchResponse>;

/// The receiving half of a server stream, read with a timeout.
#[derive(Debug)]
pub struct ResponseStream<T> {
    stream: Streaming<T>,
    endpoint: String,
    timeout: Duration,
}

impl<T> ResponseStream<T> {
    /// The next response; `None` once the server ended the stream; an
    /// [`Error::Timeout`] when none came within the stream's timeout (the
    /// client's request timeout unless [`ResponseStream::set_timeout`]
    /// changed it).
    pub async fn message(&mut self) -> Result<Option<T>, Error> {
        self.message_within(self.timeout).await
    }

    /// [`ResponseStream::message`], waiting at most `timeout`.
    pub async fn message_within(&mut self, timeout: Duration) -> Result<Option<T>, Error> {
        match tokio::time::timeout(timeout, self.stream.message()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(status)) => Err(Error::Status {
                endpoint: self.endpoint.clone(),
                status,
            }),
            Err(_) => Err(Error::Timeout {
                endpoint: self.endpoint.clone(),
                after: timeout,
            }),
        }
    }

    /// How long [`ResponseStream::message`] waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The endpoint the stream is open on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// The sending half of a keepalive stream (see [`Client::lease_keep_alive`]).
/// Dropping it half-closes the stream.
#[derive(Debug, Clone)]
pub struct LeaseKeeper {
    id: i64,
    sender: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    endpoint: String,
}

impl LeaseKeeper {
    /// The lease this keeper renews.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The endpoint the stream is open on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one keepalive; its answer arrives on the
    /// [`LeaseKeepAliveStream`].
    pub async fn keep_alive(&mut self) -> Result<(), Error> {
        self.sender
            .send(LeaseKeepAliveRequest { id: self.id })
            .map_err(|_| Error::Status {
                endpoint: self.endpoint.clone(),
                status: tonic::Status::cancelled("the keepalive stream has ended"),
            })
    }
}

/// The receiving half of a keepalive stream (see
/// [`Client::lease_keep_alive`]).
pub type LeaseKeepAliveStream = ResponseStream<LeaseKeepAliveResponse>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_is_etcds() {
        assert_eq!(prefix_range_end(b"k/"), &b"k0"[..]);
        assert_eq!(prefix_range_end(b"a\xff"), &b"b"[..]);
        assert_eq!(prefix_range_end(b"a\xfe\xff\xff"), &b"a\xff"[..]);
        assert_eq!(prefix_range_end(b"\xff\xff"), &b"\0"[..]);
        assert_eq!(prefix_range_end(b""), &b"\0"[..]);
    }

    #[test]
    fn options_build_etcds_requests() {
        let r = range_request("k/", Some(GetOptions::new().with_prefix().with_revision(7)));
        assert_eq!(
            (&r.key[..], &r.range_end[..], r.revision),
            (&b"k/"[..], &b"k0"[..], 7)
        );
        assert!(!r.serializable && !r.count_only && r.limit == 0);
        let p = put_request("k", "v", Some(PutOptions::new().with_lease(7)));
        assert!(p.lease == 7 && !p.prev_kv);
        assert_eq!(put_request("k", "v", None).lease, 0);
        let d = delete_request("k", Some(DeleteOptions::new().with_prev_key()));
        assert!(d.range_end.is_empty() && d.prev_kv);
        let t = Txn::new()
            .when([Compare::version("k", CompareOp::Greater, 0)])
            .and_then([TxnOp::put("k", "v", None)])
            .or_else([TxnOp::get("k", None), TxnOp::delete("k", None)]);
        assert_eq!(t.request.compare[0].result, CompareResult::Greater as i32);
        assert_eq!(t.request.compare[0].target, CompareTarget::Version as i32);
        assert_eq!((t.request.success.len(), t.request.failure.len()), (1, 2));
    }

    #[test]
    fn watch_options_build_etcds_requests() {
        let w = watch_create_request("k/", None);
        assert!(w.range_end.is_empty() && w.start_revision == 0 && w.watch_id == 0);
        assert!(w.filters.is_empty() && !w.prev_kv && !w.progress_notify && !w.fragment);
        let w = watch_create_request(
            "k/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(5)
                    .with_prev_key()
                    .with_filter_put()
                    .with_filter_delete()
                    .with_watch_id(7)
                    .with_progress_notify()
                    .with_fragment(),
            ),
        );
        assert_eq!(
            (&w.key[..], &w.range_end[..], w.start_revision, w.watch_id),
            (&b"k/"[..], &b"k0"[..], 5, 7)
        );
        assert_eq!(
            w.filters,
            [FilterType::Noput as i32, FilterType::Nodelete as i32]
        );
        assert!(w.prev_kv && w.progress_notify && w.fragment);
        let w = watch_create_request("a", Some(WatchOptions::new().with_range("c")));
        assert_eq!(&w.range_end[..], b"c");
        let w = watch_create_request("a", Some(WatchOptions::new().with_from_key()));
        assert_eq!(&w.range_end[..], b"\0");
    }
}

/// What [`Client::snapshot_to`] downloaded.
#[derive(Debug, Clone)]
pub struct SnapshotDownload {
    /// Blob bytes written.
    pub bytes: u64,
    /// `SnapshotResponse`s received.
    pub messages: u64,
    /// The first message's header.
    pub header: Option<ResponseHeader>,
    /// The first message's `version`.
    pub version: String,
    /// Whether each message's `remaining_bytes` was exactly the blob bytes
    /// that came after it.
    pub remaining_exact: bool,
}

impl Client {
    /// `Maintenance.Snapshot` of the current endpoint (failing over while
    /// the stream cannot be opened, as a read does), its blobs written to
    /// `out` (created or truncated). Each message must come within the
    /// request timeout; a stream that ends with an error status is an
    /// error (what was written to `out` then is partial).
    pub async fn snapshot_to(&mut self, out: &std::path::Path) -> Result<SnapshotDownload, Error> {
        use skiff_kv::pb::etcdserverpb::SnapshotRequest;
        use std::io::Write as _;
        let mut stream = self
            .call(Effects::None, |ch| async move {
                MaintenanceClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .snapshot(SnapshotRequest::default())
                    .await
            })
            .await?;
        let endpoint = self.current_endpoint().to_string();
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(out)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", out.display())),
        );
        let mut download = SnapshotDownload {
            bytes: 0,
            messages: 0,
            header: None,
            version: String::new(),
            remaining_exact: true,
        };
        let mut announced = Vec::new();
        loop {
            let timeout = self.options.request_timeout;
            let message = match tokio::time::timeout(timeout, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(status)) => return Err(Error::Status { endpoint, status }),
                Err(_) => {
                    return Err(Error::Timeout {
                        endpoint,
                        after: timeout,
                    })
                }
            };
            if download.messages == 0 {
                download.header = message.header;
                download.version = message.version.clone();
            }
            download.messages += 1;
            download.bytes += message.blob.len() as u64;
            announced.push((download.bytes, message.remaining_bytes));
            file.write_all(&message.blob)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
        }
        file.flush()
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
        download.remaining_exact = announced
            .iter()
            .all(|&(so_far, remaining)| so_far + remaining == download.bytes);
        Ok(download)
    }

    /// `KV.Range` over `[key, range_end)` at `revision` (0: the latest);
    /// `range_end` `\0` with key `\0` is every key.
    pub async fn get_range(
        &mut self,
        key: impl AsRef<[u8]>,
        range_end: impl AsRef<[u8]>,
        revision: i64,
    ) -> Result<RangeResponse, Error> {
        let request = RangeRequest {
            key: bytes_of(key),
            range_end: bytes_of(range_end),
            revision,
            ..RangeRequest::default()
        };
        self.call(Effects::None, |ch| {
            let request = request.clone();
            async move { kv_client(ch).range(request).await }
        })
        .await
    }

    /// `Maintenance.Hash` of the current endpoint.
    pub async fn hash(&mut self) -> Result<skiff_kv::pb::etcdserverpb::HashResponse, Error> {
        self.call(Effects::None, |ch| async move {
            MaintenanceClient::new(ch)
                .hash(skiff_kv::pb::etcdserverpb::HashRequest::default())
                .await
        })
        .await
    }

    /// `Maintenance.Defragment` of the current endpoint.
    pub async fn defragment(
        &mut self,
    ) -> Result<skiff_kv::pb::etcdserverpb::DefragmentResponse, Error> {
        self.call(Effects::None, |ch| async move {
            MaintenanceClient::new(ch)
                .defragment(skiff_kv::pb::etcdserverpb::DefragmentRequest::default())
                .await
        })
        .await
    }
}

/// The Cluster service and Maintenance.MoveLeader. Every change is a
/// write: never sent twice (a failed one returns its error).
impl Client {
    /// `Cluster.MemberAdd` of a member at `peer_urls` (a learner with
    /// `is_learner`); the answer's `member.id` is the id the server chose.
    pub async fn member_add(
        &mut self,
        peer_urls: &[String],
        is_learner: bool,
    ) -> Result<skiff_kv::pb::etcdserverpb::MemberAddResponse, Error> {
        let request = skiff_kv::pb::etcdserverpb::MemberAddRequest {
            peer_ur_ls: peer_urls.to_vec(),
            is_learner,
        };
        self.call(Effects::Writes, |ch| {
            let request = request.clone();
            async move { ClusterClient::new(ch).member_add(request).await }
        })
        .await
    }

    /// `Cluster.MemberRemove` of member `id`.
    pub async fn member_remove(
        &mut self,
        id: u64,
    ) -> Result<skiff_kv::pb::etcdserverpb::MemberRemoveResponse, Error> {
        let request = skiff_kv::pb::etcdserverpb::MemberRemoveRequest { id };
        self.call(Effects::Writes, |ch| async move {
            ClusterClient::new(ch).member_remove(request).await
        })
        .await
    }

    /// `Cluster.MemberUpdate`: member `id`'s peer URLs become `peer_urls`.
    pub async fn member_update(
        &mut self,
        id: u64,
        peer_urls: &[String],
    ) -> Result<skiff_kv::pb::etcdserverpb::MemberUpdateResponse, Error> {
        let request = skiff_kv::pb::etcdserverpb::MemberUpdateRequest {
            id,
            peer_ur_ls: peer_urls.to_vec(),
            client_ur_ls: Vec::new(),
        };
        self.call(Effects::Writes, |ch| {
            let request = request.clone();
            async move { ClusterClient::new(ch).member_update(request).await }
        })
        .await
    }

    /// `Cluster.MemberPromote` of learner `id`.
    pub async fn member_promote(
        &mut self,
        id: u64,
    ) -> Result<skiff_kv::pb::etcdserverpb::MemberPromoteResponse, Error> {
        let request = skiff_kv::pb::etcdserverpb::MemberPromoteRequest { id };
        self.call(Effects::Writes, |ch| async move {
            ClusterClient::new(ch).member_promote(request).await
        })
        .await
    }

    /// `Maintenance.MoveLeader`: leadership to voter `target`.
    pub async fn move_leader(
        &mut self,
        target: u64,
    ) -> Result<skiff_kv::pb::etcdserverpb::MoveLeaderResponse, Error> {
        let request = skiff_kv::pb::etcdserverpb::MoveLeaderRequest { target_id: target };
        self.call(Effects::Writes, |ch| async move {
            MaintenanceClient::new(ch).move_leader(request).await
        })
        .await
    }
}

/// `Maintenance.Alarm`.
impl Client {
    /// `Maintenance.Alarm`: `action` GET lists the active alarms (of type
    /// `alarm`, 0 = every type), ACTIVATE raises `alarm` for `member_id`,
    /// DEACTIVATE disarms it. GET is a read (retried elsewhere); the others
    /// are writes (never sent twice).
    pub async fn alarm(
        &mut self,
        action: skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction,
        member_id: u64,
        alarm: skiff_kv::pb::etcdserverpb::AlarmType,
    ) -> Result<skiff_kv::pb::etcdserverpb::AlarmResponse, Error> {
        use skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction;
        let request = skiff_kv::pb::etcdserverpb::AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        };
        let effects = if action == AlarmAction::Get {
            Effects::None
        } else {
            Effects::Writes
        };
        self.call(effects, |ch| async move {
            MaintenanceClient::new(ch).alarm(request).await
        })
        .await
    }

    /// The active alarms of the current endpoint, as (member id, etcd
    /// AlarmType number), sorted.
    pub async fn alarm_list(&mut self) -> Result<Vec<(u64, i32)>, Error> {
        use skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction;
        use skiff_kv::pb::etcdserverpb::AlarmType;
        let r = self.alarm(AlarmAction::Get, 0, AlarmType::None).await?;
        let mut alarms: Vec<(u64, i32)> = r.alarms.iter().map(|a| (a.member_id, a.alarm)).collect();
        alarms.sort_unstable();
        Ok(alarms)
    }
}
