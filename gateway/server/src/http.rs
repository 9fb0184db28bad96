//! `/metrics` (Prometheus text), `/healthz` and `/readyz` over plain HTTP/1.1 on their own TCP
//! port. Small on purpose: GET only, one request per connection, no body.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// Connections served at once, at most; one more is closed at once. Scrapers and probes send one
/// request each, so a few are plenty; the cap keeps a client that holds connections open from
/// making tasks and file descriptors grow.
const MAX_HANDLERS: usize = 64;

/// How long one connection may take to send its request and read the answer.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause after a failed accept. With the descriptor table full (`EMFILE`) the listener stays
/// readable and `accept` fails at once, forever: without a pause the loop spins on a core the
/// engine needs.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line this often about failing accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

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
    let listener = Arc::new(listener);
    let accept = move || {
        let listener = listener.clone();
        async move { listener.accept().await.map(|(stream, _)| stream) }
    };
    let handler = move |stream: TcpStream| {
        let (metrics, scheduler, ready) = (metrics.clone(), scheduler.clone(), ready.clone());
        async move {
            let _ = tokio::time::timeout(
                HANDLER_TIMEOUT,
                handle(stream, &metrics, &scheduler, &ready),
            )
            .await;
        }
    };
    tokio::spawn(accept_loop(
        accept,
        MAX_HANDLERS,
        || tokio::time::sleep(ACCEPT_BACKOFF),
        handler,
    ));
    Ok(bound)
}

/// Accepts connections with `accept` and serves each with `handler` on its own task, at most
/// `max_handlers` at once: a connection beyond them is dropped (closed) at once. After a failed
/// accept it logs (at most once per [`ACCEPT_LOG_EVERY`]) and awaits `pause` before the next.
async fn accept_loop<S, A, AF, P, PF, H, HF>(
    mut accept: A,
    max_handlers: usize,
    mut pause: P,
    handler: H,
) where
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<S>>,
    P: FnMut() -> PF,
    PF: Future<Output = ()>,
    H: Fn(S) -> HF,
    HF: Future<Output = ()> + Send + 'static,
{
    let handlers = Arc::new(Semaphore::new(max_handlers));
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        match accept().await {
            Ok(stream) => {
                let Ok(permit) = handlers.clone().try_acquire_owned() else {
                    tracing::debug!(max_handlers, "metrics connection over the cap: closed");
                    drop(stream);
                    continue;
                };
                let served = handler(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            Err(e) => {
                unlogged += 1;
                if last_log.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                    tracing::warn!(error = %e, failures = unlogged, "accepting a metrics connection failed");
                    last_log = Some(Instant::now());
                    unlogged = 0;
                }
                pause().await;
            }
        }
    }
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

pub(crate) fn route(
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
        // Alive: the process answers (the engine's health shows in /readyz and `dx_engine_up`).
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => {
            let load = scheduler.load();
            if scheduler.engine_failed() {
                ("503 Service Unavailable", TEXT, "engine failed\n".into())
            } else if ready.load(Ordering::Relaxed) && load.accepting {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// A connection as the loop sees it: dropping it closes the receiver's side.
    type Conn = (u32, oneshot::Sender<()>);

    #[tokio::test]
    async fn accept_errors_are_paused_on_and_handlers_are_capped() {
        let (tx1, _rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        // Ten `EMFILE`s, then two connections, then nothing more.
        let mut script: VecDeque<std::io::Result<Conn>> = (0..10)
            .map(|_| Err(std::io::Error::from_raw_os_error(24)))
            .collect();
        script.extend([Ok((1, tx1)), Ok((2, tx2))]);
        let script = Mutex::new(script);
        let accept = move || {
            let next = script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(accepted) => accepted,
                    None => std::future::pending().await,
                }
            }
        };
        let pauses = Arc::new(AtomicUsize::new(0));
        let counted = pauses.clone();
        let pause = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        };
        // A handler records its connection and the pauses before it, then holds its slot.
        let (handled_tx, mut handled) = mpsc::unbounded_channel();
        let handler = move |(n, open): Conn| {
            let _ = handled_tx.send((n, pauses.load(Ordering::SeqCst)));
            async move {
                std::future::pending::<()>().await;
                drop(open);
            }
        };
        tokio::spawn(accept_loop(accept, 1, pause, handler));

        // The second connection found the one handler busy: closed at once, never served.
        assert!(rx2.await.is_err());
        assert_eq!(
            handled.recv().await,
            Some((1, 10)),
            "one pause per failed accept"
        );
        assert!(handled.try_recv().is_err());
    }
}
