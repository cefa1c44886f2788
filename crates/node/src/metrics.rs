//! Prometheus text metrics over HTTP (`GET /metrics`).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection,
//! the request head bounded by `REQUEST_HEAD_MAX` bytes and `IO_TIMEOUT`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::node::NodeHandle;
use crate::state_machine::StateMachine;

/// Largest request head read.
pub const REQUEST_HEAD_MAX: usize = 8 << 10;
/// For reading the request and writing the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the accept queue.
pub const CONNECTIONS_MAX: usize = 16;

/// Starts serving on `addr` (on the current runtime); returns the bound
/// address.
pub async fn serve<S: StateMachine>(
    node: NodeHandle<S>,
    addr: SocketAddr,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (conn, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(IO_TIMEOUT, answer(conn, node)).await;
                drop(permit);
            });
        }
    });
    Ok(local)
}

async fn answer<S: StateMachine>(
    mut conn: tokio::net::TcpStream,
    node: NodeHandle<S>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_HEAD_MAX {
            return respond(&mut conn, "431 Request Header Fields Too Large", "").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => match node.metrics_text().await {
            Ok(text) => respond(&mut conn, "200 OK", &text).await,
            Err(e) => respond(&mut conn, "503 Service Unavailable", &e.to_string()).await,
        },
        (Some("GET"), Some(_)) => respond(&mut conn, "404 Not Found", "try /metrics\n").await,
        _ => respond(&mut conn, "405 Method Not Allowed", "").await,
    }
}

async fn respond(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// CPU time this process used so far, all threads, user + kernel
/// (`getrusage(RUSAGE_SELF)`): what benches divide by the work done.
pub fn process_cpu() -> std::io::Result<Duration> {
    // SAFETY: rusage is plain integers, for which all zeros is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}
