//! `skiff bench --ceiling`: the load against an in-process etcd-API server
//! that answers every Put at once and keeps nothing: no consensus, no disk,
//! no state machine. No server reached through the same client and gRPC
//! stack on the same machine can be faster, so its figures are the ceiling
//! the cluster runs are read against, as `wal-bench` and `net-bench`
//! compare with their raw ceilings in the same run.
//!
//! The server runs the real server's gRPC settings (TCP_NODELAY, the same
//! message bound) on a runtime of its own with a node's `io_threads`
//! default, as a separate process would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tonic::{Request, Response, Status};

use skiff_kv::api::GRPC_MESSAGE_BYTES_MAX;
use skiff_kv::pb::etcdserverpb::kv_server::{Kv, KvServer};
use skiff_kv::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use skiff_node::config::NodeConfig;

/// How long [`CeilingServer::start`] waits for the server to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's runtime, stopped and joined on drop.
pub struct CeilingServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CeilingServer {
    /// Starts the server on a free loopback port.
    pub fn start() -> Result<CeilingServer, String> {
        let threads = NodeConfig::default().io_threads;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("skiff-ceiling")
            .enable_all()
            .build()
            .map_err(|e| format!("ceiling server runtime: {e}"))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("skiff-ceiling".into())
            .spawn(move || {
                rt.block_on(async move {
                    let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await;
                    let listener = match bound.and_then(|l| l.local_addr().map(|a| (l, a))) {
                        Ok((listener, addr)) => {
                            let _ = addr_tx.send(Ok(addr));
                            listener
                        }
                        Err(e) => {
                            let _ = addr_tx.send(Err(format!("ceiling server: bind: {e}")));
                            return;
                        }
                    };
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true));
                    let served = tonic::transport::Server::builder()
                        .add_service(
                            KvServer::new(NullKv::default())
                                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
                        )
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stop_rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "ceiling server failed");
                    }
                });
            })
            .map_err(|e| format!("ceiling server thread: {e}"))?;
        let mut server = CeilingServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server.addr = addr_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| "the ceiling server did not start listening within 10 s".to_string())??;
        Ok(server)
    }

    /// The endpoint to load, as `skiff bench --endpoints` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for CeilingServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers Put with a header and a new revision; nothing else is served.
#[derive(Default)]
struct NullKv {
    revision: AtomicI64,
}

fn put_only() -> Status {
    Status::unimplemented("the bench's ceiling server answers KV.Put only")
}

#[tonic::async_trait]
impl Kv for NullKv {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Err(put_only())
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        // Decoded like any request (the value is in `req`), then dropped.
        drop(req.into_inner());
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Response::new(PutResponse {
            header: Some(ResponseHeader {
                cluster_id: 0,
                member_id: 0,
                revision,
                raft_term: 0,
            }),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(put_only())
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(put_only())
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(put_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_kv::pb::etcdserverpb::kv_client::KvClient;

    #[tokio::test]
    async fn puts_are_answered_with_rising_revisions_and_nothing_else_is_served() {
        let server = tokio::task::spawn_blocking(CeilingServer::start)
            .await
            .unwrap()
            .unwrap();
        let mut client = KvClient::connect(server.endpoint()).await.unwrap();
        let mut last = 0;
        for i in 0..3u8 {
            let resp = client
                .put(PutRequest {
                    key: vec![i].into(),
                    value: vec![i; 128].into(),
                    ..PutRequest::default()
                })
                .await
                .unwrap()
                .into_inner();
            let revision = resp.header.unwrap().revision;
            assert!(revision > last);
            last = revision;
        }
        let err = client.range(RangeRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        drop(client);
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
    }
}
