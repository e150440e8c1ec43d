//! HTTP through the activator: HTTP/1.1 keep-alive and h2c (so gRPC) on one port, WebSocket
//! and other upgrades, streamed bodies in both directions. Responses: 404 unknown service,
//! 503 + Retry-After when the hold is full, 504 past the service's timeout (queue time
//! counts), 502 when the instance fails mid-request.
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    header::{self, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpStream;

use super::{queue::Slot, Activator, ServiceState};

type RespBody = BoxBody<Bytes, hyper::Error>;

struct Clients {
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
}

thread_local! {
    /// Per thread: each activator thread has its own runtime, so its upstream connections
    /// (and their tasks) stay on that thread.
    static CLIENTS: Clients = {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        Clients {
            h1: Client::builder(TokioExecutor::new()).build(conn.clone()),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(conn),
        }
    };
}

/// Serves one accepted connection as HTTP (h1 or h2c prior knowledge), tracked by
/// `graceful` so a drain waits for it.
pub fn serve_conn(
    act: Arc<Activator>,
    conn_svc: Option<Arc<ServiceState>>,
    stream: TcpStream,
    peer: SocketAddr,
    graceful: &GracefulShutdown,
    tracker: Arc<()>,
) {
    let service = hyper::service::service_fn(move |req| {
        let act = act.clone();
        let conn_svc = conn_svc.clone();
        async move { Ok::<_, Infallible>(handle(act, conn_svc, peer, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _t = tracker;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "activator connection ended");
        }
    });
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_owned() + "\n"))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn service_by_headers(act: &Activator, req: &Request<Incoming>) -> Option<Arc<ServiceState>> {
    let rev = req
        .headers()
        .get("knative-serving-revision")?
        .to_str()
        .ok()?;
    let reg = act.registry();
    match req
        .headers()
        .get("knative-serving-namespace")
        .and_then(|v| v.to_str().ok())
    {
        Some(ns) => reg.get(&format!("{ns}/{rev}")),
        None => reg.get(rev),
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn handle(
    act: Arc<Activator>,
    conn_svc: Option<Arc<ServiceState>>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    if req
        .headers()
        .get("k-network-probe")
        .is_some_and(|v| v == "activator")
    {
        return text(StatusCode::OK, "activator");
    }
    let Some(svc) = service_by_headers(&act, &req).or(conn_svc) else {
        return text(
            StatusCode::NOT_FOUND,
            "redirector activator: no service for this request (no Knative-Serving-Namespace/Revision headers naming a known service, and the connection did not come through a service VIP)",
        );
    };
    let arrived = tokio::time::Instant::now();
    let cold = svc.cold();
    let deadline = arrived + svc.timeout;
    let bytes = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let limits = act.limits();
    let held = match svc.admit(&act.global, &limits, bytes) {
        Ok(h) => h,
        Err(_) => {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "redirector activator: hold is full, retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    let slot = match tokio::time::timeout_at(deadline, svc.acquire()).await {
        Ok(slot) => slot,
        Err(_) => {
            svc.timed_out.fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                "redirector activator: no instance became ready in time",
            );
        }
    };
    drop(held);
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let h2 = req.version() == Version::HTTP_2 || svc.protocol == crate::config::Protocol::H2c;
    let out = match outgoing(req, slot.instance.addr, peer, upgrade, h2) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("redirector activator: {e}"),
            )
        }
    };
    let client = CLIENTS.with(|c| if h2 { c.h2.clone() } else { c.h1.clone() });
    let resp = match tokio::time::timeout_at(deadline, client.request(out)).await {
        Err(_) => {
            svc.timed_out.fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                "redirector activator: instance did not answer in time",
            );
        }
        Ok(Err(e)) => {
            slot.instance.mark_failed();
            tracing::debug!(service = %svc.name, instance = %slot.instance.addr, error = %e, "forwarding failed");
            return text(
                StatusCode::BAD_GATEWAY,
                "redirector activator: the instance failed",
            );
        }
        Ok(Ok(r)) => r,
    };
    svc.forwarded.fetch_add(1, Ordering::Relaxed);
    if cold {
        svc.cold_ttfb.observe(arrived.elapsed());
    }
    let mut resp = resp;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(cu) = client_upgrade {
            let su = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _slot = slot;
                if let (Ok(c), Ok(s)) = tokio::join!(cu, su) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s))
                            .await;
                }
            });
            return resp.map(|b| b.boxed());
        }
    }
    if !h2 {
        for h in HOP_BY_HOP {
            resp.headers_mut().remove(h);
        }
    }
    resp.map(|b| {
        Guarded {
            inner: b,
            _slot: slot,
        }
        .boxed()
    })
}

fn outgoing(
    req: Request<Incoming>,
    addr: SocketAddr,
    peer: SocketAddr,
    upgrade: bool,
    h2: bool,
) -> Result<Request<Incoming>, String> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    parts.uri = Uri::try_from(format!("http://{addr}{pq}")).map_err(|e| e.to_string())?;
    if !upgrade {
        for h in HOP_BY_HOP {
            // gRPC needs `te: trailers` end to end.
            if h == "te" && h2 {
                continue;
            }
            parts.headers.remove(h);
        }
    }
    if let Some(a) = authority {
        if let Ok(v) = HeaderValue::from_str(&a) {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.version = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if h2 {
        parts.headers.remove(header::HOST);
    }
    parts.headers.insert(
        HeaderName::from_static("k-proxy-request"),
        HeaderValue::from_static("activator"),
    );
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts
            .headers
            .append(HeaderName::from_static("x-forwarded-for"), v);
    }
    Ok(Request::from_parts(parts, body))
}

/// A response body that keeps the instance slot until the body is done.
struct Guarded {
    inner: Incoming,
    _slot: Slot,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
