//! HTTP through the activator: HTTP/1.1 keep-alive and h2c (so gRPC) on one port, WebSocket
//! and other upgrades, streamed bodies in both directions. Responses: 404 unknown service,
//! 503 + Retry-After when the hold is full, 504 past the service's timeout (queue time
//! counts), 502 when the instance fails mid-request.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::uri,
    Method, Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::Watcher},
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    deadline::{BodyFault, ClientBody, WriteTimeout},
    queue::Slot,
    upstream, wire, Activator, ServiceState,
};
use crate::config::ActivatorConfig;

/// Largest request head (and hyper's read buffer) per connection: the fast path's limit,
/// about Envoy's 60 KiB default (nginx: 4 × 8 KiB). Larger heads get 431.
pub const MAX_HEAD: usize = 64 * 1024;

const K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
/// The kubelet's readiness probe of Knative's activator pods. Connections to Knative's
/// activator endpoints come here (they are switched like the ingress's), so this node's
/// kubelet probing an activator pod on it is answered by the activator that serves them.
const K_KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");
const K_PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
const KNATIVE_REVISION: HeaderName = HeaderName::from_static("knative-serving-revision");
const KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static("knative-serving-namespace");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub(super) const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What one accepted connection's requests share.
struct Conn {
    act: Arc<Activator>,
    /// The service the connection was for (from conntrack), if known.
    svc: Option<Arc<ServiceState>>,
    /// The client's address as the `X-Forwarded-For` value.
    xff: Option<HeaderValue>,
}

/// Serves one accepted connection (from the fast path, with what it read put back) as HTTP
/// (h1 or h2c prior knowledge), watched by `watcher` so a drain waits for it. The caller
/// awaits it on the connection's own task (no second task per connection).
pub fn serve_conn<I>(
    act: Arc<Activator>,
    conn_svc: Option<Arc<ServiceState>>,
    stream: I,
    peer: SocketAddr,
    watcher: Watcher,
) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        act,
        svc: conn_svc,
        xff: HeaderValue::from_str(&peer.ip().to_string()).ok(),
    });
    let limits = conn.act.limits();
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let stream = WriteTimeout::new(stream, limits.write_timeout);
    let conn = builder(&limits)
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let conn = watcher.watch(conn);
    async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "activator connection ended");
        }
    }
}

/// hyper's server settings: the header read timeout (which also bounds a keep-alive
/// connection's idle time on this path), the head size limit, h2 keep-alive pings.
fn builder(limits: &ActivatorConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    b
}

/// The body of every response the activator sends: its own short text, an instance's
/// response (holding the instance slot and the upstream connection until done), or a
/// switching-protocols response as is.
pub enum RespBody {
    Text(Option<Bytes>),
    Proxied(Guarded),
    Raw(Incoming),
}

/// Why a proxied response body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum RespBodyError {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("the instance's response paused past idleTimeoutSeconds ({0:?})")]
    Idle(Duration),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = RespBodyError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RespBodyError>>> {
        match self.get_mut() {
            RespBody::Text(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Proxied(g) => {
                let r = Pin::new(&mut g.inner).poll_frame(cx);
                if matches!(r, Poll::Ready(None)) || g.inner.is_end_stream() {
                    g.finish();
                }
                if let Some((limit, timer)) = g.idle.as_mut() {
                    if r.is_ready() {
                        timer.as_mut().reset(tokio::time::Instant::now() + *limit);
                    } else if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(RespBodyError::Idle(*limit))));
                    }
                }
                r.map(|f| f.map(|f| f.map_err(RespBodyError::from)))
            }
            RespBody::Raw(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(RespBodyError::from))),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Text(b) => b.is_none(),
            RespBody::Proxied(g) => g.inner.is_end_stream(),
            RespBody::Raw(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Text(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Proxied(g) => g.inner.size_hint(),
            RespBody::Raw(b) => b.size_hint(),
        }
    }
}

/// An instance's response body: keeps the instance slot until the instance has sent the
/// whole body (not until the client has read it: the rest waits in buffers, bounded by the
/// write timeout), then gives the upstream connection back for the next request.
pub struct Guarded {
    inner: Incoming,
    conn: Option<upstream::H1>,
    slot: Option<Slot>,
    /// The revision's idleTimeoutSeconds and its timer, reset by every frame.
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl Guarded {
    fn finish(&mut self) {
        self.slot = None;
        if let Some(c) = self.conn.take() {
            c.release();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // A response not read to the end leaves the connection mid-message: not reusable.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::Text(Some(Bytes::from(msg.to_owned() + "\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn service_by_headers(act: &Activator, req: &Request<Incoming>) -> Option<Arc<ServiceState>> {
    let rev = req.headers().get(KNATIVE_REVISION)?.to_str().ok()?;
    let ns = req
        .headers()
        .get(KNATIVE_NAMESPACE)
        .and_then(|v| v.to_str().ok());
    act.service_by_revision(ns, rev)
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// Removes the hop-by-hop headers (but `te` when `keep_te`: gRPC needs `te: trailers` end
/// to end). One pass over the (few) names first: most messages have none.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_te: bool) {
    let hop = |k: &HeaderName| HOP_BY_HOP.contains(k) && !(keep_te && k == header::TE);
    if !h.keys().any(hop) {
        return;
    }
    for name in HOP_BY_HOP {
        if keep_te && name == header::TE {
            continue;
        }
        h.remove(name);
    }
}

async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<RespBody> {
    if req
        .headers()
        .get(K_NETWORK_PROBE)
        .is_some_and(|v| v == "activator")
        || req.headers().contains_key(K_KUBELET_PROBE)
    {
        return text(StatusCode::OK, "activator");
    }
    let Some(svc) = service_by_headers(&conn.act, &req).or_else(|| conn.svc.clone()) else {
        return text(
            StatusCode::NOT_FOUND,
            "redirector activator: no service for this request (no Knative-Serving-Namespace/Revision headers naming a known service, and the connection did not come through a service VIP)",
        );
    };
    let arrived = tokio::time::Instant::now();
    let deadline = arrived + svc.timeout();
    // Warm: an instance has a free slot now, the request is never held.
    let (slot, cold) = match svc.try_acquire() {
        Some(slot) => (slot, false),
        None => match hold(conn, &svc, &req, deadline).await {
            Ok(x) => x,
            Err(r) => return r,
        },
    };
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let h2 = req.version() == Version::HTTP_2 || svc.protocol == crate::config::Protocol::H2c;
    let addr = slot.instance.addr;
    let limits = conn.act.limits();
    let (req, fault) = {
        let (parts, body) = req.into_parts();
        let (body, fault) = ClientBody::new(body, limits.body_timeout);
        (Request::from_parts(parts, body), fault)
    };
    let out = match outgoing(req, addr, conn.xff.as_ref(), upgrade, h2) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("redirector activator: {e}"),
            )
        }
    };
    let inst = &slot.instance;
    let sent = async {
        if h2 {
            upstream::send_h2(inst, out).await.map(|r| (r, None))
        } else {
            upstream::send_h1(inst, out)
                .await
                .map(|(r, c)| (r, Some(c)))
        }
    };
    // The response must start within responseStartTimeoutSeconds of going out, and the
    // whole request within timeoutSeconds of arriving.
    let head_deadline = deadline.min(tokio::time::Instant::now() + svc.response_start_timeout());
    let (mut resp, upstream_conn) = match tokio::time::timeout_at(head_deadline, sent).await {
        Err(_) => {
            svc.timed_out.fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                "redirector activator: instance did not answer in time",
            );
        }
        Ok(Err(e)) => return failed(&svc, &slot, &fault, h2, &e),
        Ok(Ok(r)) => r,
    };
    if !h2 {
        let check = wire::check_response(
            resp.version(),
            resp.status().as_u16(),
            client_upgrade.is_some(),
            resp.headers(),
        );
        if let Err(e) = check {
            slot.instance.mark_failed();
            tracing::debug!(service = %svc.name, instance = %addr, error = %e, "refused response");
            return text(
                StatusCode::BAD_GATEWAY,
                "redirector activator: the instance sent a malformed response",
            );
        }
    }
    svc.forwarded.fetch_add(1, Ordering::Relaxed);
    if cold {
        svc.cold_ttfb.observe(arrived.elapsed());
    }
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
            return resp.map(RespBody::Raw);
        }
    }
    if !h2 {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|inner| {
        RespBody::Proxied(Guarded {
            inner,
            conn: upstream_conn,
            slot: Some(slot),
            idle: svc
                .idle_timeout()
                .map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        })
    })
}

/// The answer to a request that could not be forwarded. Only the instance's own failure
/// marks it (skipped for a while by everyone): not a client's broken, aborted or stalled
/// upload, nor h2c sent to a service whose instance speaks HTTP/1.1 only.
fn failed(
    svc: &ServiceState,
    slot: &Slot,
    fault: &super::deadline::Fault,
    h2: bool,
    e: &upstream::Error,
) -> Response<RespBody> {
    let addr = slot.instance.addr;
    tracing::debug!(service = %svc.name, instance = %addr, error = %e, "forwarding failed");
    match fault.get() {
        BodyFault::Broken => {
            return text(
                StatusCode::BAD_REQUEST,
                "redirector activator: the request body was malformed or cut off",
            )
        }
        BodyFault::Stalled => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "redirector activator: the request body stalled",
            )
        }
        BodyFault::None => {}
    }
    if h2 && svc.protocol != crate::config::Protocol::H2c && !e.is_connect() {
        return text(
            StatusCode::BAD_GATEWAY,
            "redirector activator: the instance does not speak h2c",
        );
    }
    slot.instance.mark_failed();
    text(
        StatusCode::BAD_GATEWAY,
        "redirector activator: the instance failed",
    )
}

/// Holds a request (bounded) until an instance has a slot for it or its deadline passes;
/// whether it was a cold start (no instance ready when it arrived).
async fn hold(
    conn: &Conn,
    svc: &Arc<ServiceState>,
    req: &Request<Incoming>,
    deadline: tokio::time::Instant,
) -> Result<(Slot, bool), Response<RespBody>> {
    let cold = svc.cold();
    let bytes = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let admitted = match conn.act.limits.read() {
        Ok(l) => svc.admit(&conn.act.global, &l, bytes),
        Err(_) => svc.admit(&conn.act.global, &Default::default(), bytes),
    };
    let Ok(held) = admitted else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "redirector activator: hold is full, retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    };
    match tokio::time::timeout_at(deadline, svc.acquire()).await {
        Ok(slot) => {
            drop(held);
            Ok((slot, cold))
        }
        Err(_) => {
            svc.timed_out.fetch_add(1, Ordering::Relaxed);
            Err(text(
                StatusCode::from_u16(svc.queue_timeout_status())
                    .unwrap_or(StatusCode::GATEWAY_TIMEOUT),
                "redirector activator: no instance became ready in time",
            ))
        }
    }
}

/// The request as it goes to the instance at `addr`: HTTP/1.1 in origin form with the
/// client's Host (or h2 with an absolute URI), hop-by-hop headers removed (unless it is an
/// upgrade), `K-Proxy-Request: activator` and the client in `X-Forwarded-For`.
fn outgoing(
    req: Request<ClientBody>,
    addr: SocketAddr,
    xff: Option<&HeaderValue>,
    upgrade: bool,
    h2: bool,
) -> Result<Request<ClientBody>, String> {
    let (mut parts, body) = req.into_parts();
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers, h2);
    }
    if h2 {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::try_from(format!("http://{addr}{pq}")).map_err(|e| e.to_string())?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        if !parts.headers.contains_key(header::HOST) {
            let host = match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()),
                None => HeaderValue::from_str(&addr.to_string()),
            };
            if let Ok(v) = host {
                parts.headers.insert(header::HOST, v);
            }
        }
        if parts.method != Method::CONNECT
            && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        {
            let mut p = uri::Parts::default();
            p.path_and_query = parts.uri.path_and_query().cloned();
            parts.uri = match p.path_and_query {
                Some(_) => Uri::from_parts(p).map_err(|e| e.to_string())?,
                None => Uri::default(),
            };
        }
        parts.version = Version::HTTP_11;
    }
    parts
        .headers
        .insert(K_PROXY_REQUEST, HeaderValue::from_static("activator"));
    if let Some(v) = xff {
        parts.headers.append(X_FORWARDED_FOR, v.clone());
    }
    Ok(Request::from_parts(parts, body))
}
