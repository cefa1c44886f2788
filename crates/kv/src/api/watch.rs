//! The etcd v3 Watch service: one bidirectional stream per client
//! connection's watch session, any number of watchers on it. The stream's
//! requests become [`Command`]s for the member's dispatcher
//! ([`crate::watch`]); its responses come from two bounded queues, control
//! (created, cancelled) read before events, so that a watcher's created
//! response always precedes its events.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use crate::pb::etcdserverpb::watch_request::RequestUnion;
use crate::pb::etcdserverpb::watch_server::Watch;
use crate::pb::etcdserverpb::{WatchRequest, WatchResponse};
use crate::store::auth::PermKind;
use crate::watch::{Command, CommandError, CONTROL_RESPONSES_MAX, STREAM_RESPONSES_MAX};

/// Responses between the stream's forwarder and gRPC's writer.
const GRPC_QUEUE: usize = 16;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

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
        let (events_tx, mut events_rx) = mpsc::channel(STREAM_RESPONSES_MAX);
        let (control_tx, mut control_rx) = mpsc::channel::<WatchResponse>(CONTROL_RESPONSES_MAX);
        let (out_tx, out_rx) = mpsc::channel(GRPC_QUEUE);
        self.hub
            .command(Command::Open {
                stream,
                events: events_tx,
            })
            .map_err(refused)?;

        // Requests → dispatcher, while the client sends.
        let hub = self.hub.clone();
        let errors = out_tx.clone();
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
            // the stream ends when the client goes, which the forwarder
            // below sees.
            if let Err(status) = result {
                let _ = errors.send(Err(status)).await;
                let _ = hub.command(Command::Close { stream });
            }
        });

        // Dispatcher → gRPC, control first; fills the header's member
        // fields.
        let node = self.node.clone();
        let hub = self.hub.clone();
        tokio::spawn(async move {
            loop {
                let resp = tokio::select! {
                    biased;
                    Some(r) = control_rx.recv() => r,
                    Some(r) = events_rx.recv() => r,
                    // The client went away: no response to wait for.
                    _ = out_tx.closed() => break,
                    else => break,
                };
                let mut resp = resp;
                let status = node.status();
                let header = resp.header.get_or_insert_with(Default::default);
                header.cluster_id = node.cluster_id();
                header.member_id = node.id();
                header.raft_term = status.term;
                if out_tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            let _ = hub.command(Command::Close { stream });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
