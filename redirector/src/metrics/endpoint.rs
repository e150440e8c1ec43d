//! The HTTP endpoint: `/metrics`, `/status`, `/healthz` and `/readyz` on `node.metrics`, kept
//! answering under abuse: accept errors (out of file descriptors) are waited out, request
//! heads and idle connections time out, a client that does not read is dropped, and past
//! `MAX_CONNS` connections the oldest is closed (after any answer in progress), so a
//! liveness probe always gets through.
use std::{collections::VecDeque, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::sync::oneshot;

use super::Source;
use crate::activator::deadline::WriteTimeout;

/// Connections the endpoint keeps open at once.
pub const MAX_CONNS: usize = 256;
/// A request head (or the next one on a kept-alive connection) must come within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that reads nothing of an answer for this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the endpoints until the process ends.
pub async fn serve(addr: SocketAddr, source: Arc<dyn Source>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics, /status, /healthz, /readyz");
    // Close requests for the open connections, oldest first.
    let mut open: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    loop {
        open.retain(|tx| !tx.is_closed());
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Transient (EMFILE, ENFILE, ECONNABORTED...): free one of ours, wait, go on.
                tracing::warn!(error = %e, "metrics accept");
                for tx in open.drain(..open.len().div_ceil(8)) {
                    let _ = tx.send(());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        while open.len() >= MAX_CONNS {
            if let Some(tx) = open.pop_front() {
                let _ = tx.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        open.push_back(tx);
        tokio::spawn(serve_conn(stream, source.clone(), rx));
    }
}

/// Serves one connection until it ends, times out, or `close` fires (then it finishes the
/// answer in progress, if any, and closes).
async fn serve_conn(
    stream: tokio::net::TcpStream,
    source: Arc<dyn Source>,
    close: oneshot::Receiver<()>,
) {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(answer(&*source, req.uri().path())) }
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HEADER_TIMEOUT)
        .keep_alive_timeout(HEADER_TIMEOUT);
    let io = TokioIo::new(WriteTimeout::new(stream, WRITE_TIMEOUT));
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn).await;
}

pub(super) fn answer(source: &dyn Source, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            source.metrics(),
        ),
        "/status" => (StatusCode::OK, "application/json", source.status_json()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => match source.ready() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}
