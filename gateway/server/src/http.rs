//! `/metrics` (Prometheus text), `/healthz` and `/readyz` over plain HTTP/1.1 on their own TCP
//! port. Small on purpose: GET only, one request per connection, no body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// Binds `addr` and serves in the background; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    scheduler: Arc<Scheduler>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, scheduler, ready) = (metrics.clone(), scheduler.clone(), ready.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    handle(stream, &metrics, &scheduler, &ready),
                )
                .await;
            });
        }
    });
    Ok(bound)
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    scheduler: &Scheduler,
    ready: &AtomicBool,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() > 8 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = route(method, path, metrics, scheduler, ready);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(
    method: &str,
    path: &str,
    metrics: &Metrics,
    scheduler: &Scheduler,
    ready: &AtomicBool,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".into());
    }
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        // Alive: the process answers (the engine thread's health shows in /readyz and metrics).
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => {
            let load = scheduler.load();
            if ready.load(Ordering::Relaxed) && load.accepting {
                ("200 OK", TEXT, "ready\n".into())
            } else if ready.load(Ordering::Relaxed) {
                ("503 Service Unavailable", TEXT, "queue full\n".into())
            } else {
                ("503 Service Unavailable", TEXT, "shutting down\n".into())
            }
        }
        _ => ("404 Not Found", TEXT, "not found\n".into()),
    }
}
