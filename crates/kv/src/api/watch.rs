//! The etcd v3 Watch service: one bidirectional stream per client
//! connection's watch session, any number of watchers on it. The stream's
//! requests become [`Command`]s for the member's dispatcher
//! ([`crate::watch`]); its responses come from two bounded queues, control
//! (created, cancelled) read before events, so that a watcher's created
//! response always precedes its events. gRPC's writer reads the queues
//! itself ([`Responses`]): no task stands between the dispatcher and the
//! connection.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use skiff_node::NodeHandle;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use crate::machine::KvMachine;
use crate::pb::etcdserverpb::watch_request::RequestUnion;
use crate::pb::etcdserverpb::watch_server::Watch;
use crate::pb::etcdserverpb::{WatchRequest, WatchResponse};
use crate::store::auth::PermKind;
use crate::watch::{Command, CommandError, Hub, CONTROL_RESPONSES_MAX, STREAM_RESPONSES_MAX};

/// The error that ends a stream (one: the stream ends after it).
const ERRORS_MAX: usize = 1;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// What gRPC's writer sends on one watch stream: an error that ended the
/// request side, else control responses, else events; each response's
/// header gets the member's fields as it goes out. Dropped when the client
/// goes away (or the stream ends): the dispatcher then drops the stream's
/// watchers.
struct Responses {
    errors: mpsc::Receiver<Status>,
    control: mpsc::Receiver<WatchResponse>,
    events: mpsc::Receiver<WatchResponse>,
    node: NodeHandle<KvMachine>,
    hub: Hub,
    stream: u64,
    /// The error went out: nothing follows it.
    ended: bool,
}

impl Responses {
    fn stamped(&self, mut resp: WatchResponse) -> WatchResponse {
        let header = resp.header.get_or_insert_with(Default::default);
        header.cluster_id = self.node.cluster_id();
        header.member_id = self.node.id();
        header.raft_term = self.node.status().term;
        resp
    }
}

impl Stream for Responses {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Some(status)) = self.errors.poll_recv(cx) {
            self.ended = true;
            return Poll::Ready(Some(Err(status)));
        }
        let control = self.control.poll_recv(cx);
        if let Poll::Ready(Some(resp)) = control {
            return Poll::Ready(Some(Ok(self.stamped(resp))));
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(resp)) => Poll::Ready(Some(Ok(self.stamped(resp)))),
            // Both queues closed: nothing more can come.
            Poll::Ready(None) if control.is_ready() => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        let _ = self.hub.command(Command::Close {
            stream: self.stream,
        });
    }
}

fn refused(e: CommandError) -> Status {
    match e {
        CommandError::Busy => Status::resource_exhausted(e.to_string()),
        CommandError::Stopped => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl Watch for Api {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let user = self.user_of(&request).await?;
        let mut inbound = request.into_inner();
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = mpsc::channel(STREAM_RESPONSES_MAX);
        let (control_tx, control_rx) = mpsc::channel::<WatchResponse>(CONTROL_RESPONSES_MAX);
        let (errors_tx, errors_rx) = mpsc::channel(ERRORS_MAX);
        self.hub
            .command(Command::Open {
                stream,
                events: events_tx,
            })
            .map_err(refused)?;

        // Requests → dispatcher, while the client sends.
        let hub = self.hub.clone();
        let auth = self.auth.view.clone();
        tokio::spawn(async move {
            let result: Result<(), Status> = async {
                while let Some(req) = inbound.message().await? {
                    let cmd = match req.request_union {
                        Some(RequestUnion::CreateRequest(req)) => {
                            let Ok(reply) = control_tx.clone().reserve_owned().await else {
                                break;
                            };
                            // As etcd: checked when created, answered
                            // created and cancelled when not allowed.
                            let allowed = auth.get().check_range(
                                &user,
                                &req.key,
                                &req.range_end,
                                PermKind::Read,
                            );
                            if let Err(e) = allowed {
                                reply.send(WatchResponse {
                                    watch_id: -1,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: e.to_string(),
                                    ..Default::default()
                                });
                                continue;
                            }
                            Command::Create { stream, req, reply }
                        }
                        Some(RequestUnion::CancelRequest(c)) => {
                            let Ok(reply) = control_tx.clone().reserve_owned().await else {
                                break;
                            };
                            Command::Cancel {
                                stream,
                                watch_id: c.watch_id,
                                reply,
                            }
                        }
                        Some(RequestUnion::ProgressRequest(_)) => Command::Progress { stream },
                        // As etcd: a request of no known kind is ignored.
                        None => continue,
                    };
                    hub.command(cmd).map_err(refused)?;
                }
                Ok(())
            }
            .await;
            // A client that only half-closes keeps its watchers (as etcd):
            // the stream ends when the client goes, which drops its
            // `Responses`.
            if let Err(status) = result {
                let _ = errors_tx.send(status).await;
                let _ = hub.command(Command::Close { stream });
            }
        });

        Ok(Response::new(Box::pin(Responses {
            errors: errors_rx,
            control: control_rx,
            events: events_rx,
            node: self.node.clone(),
            hub: self.hub.clone(),
            stream,
            ended: false,
        })))
    }
}
