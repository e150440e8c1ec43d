//! A gateway pod that routes as Kourier does: an HTTP/1.1 reverse proxy on the pod's
//! `IP:8080` that maps the `Host` header to a revision, sends each request to one of the
//! addresses of that revision's public Service EndpointSlices (per-request round-robin over
//! the ready endpoints, port `http`), adds `Knative-Serving-Revision` and
//! `Knative-Serving-Namespace`, and relays the answer (503 without an address, 502 when the
//! upstream fails). The addresses come from a kube-rs reflector over `discovery.k8s.io/v1`
//! EndpointSlices with a `kubernetes.io/service-name` label, like net-kourier's informer.
//!
//! Upstream connections are NEW per request (`Connection: close`): each request is a new
//! connection, so every request is a fresh decision of the data path (Envoy pools
//! connections; a pooled connection would keep its destination across a flip).
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api,
};

use super::{kube_client, Task};
use crate::kubeapi::node::KubeNode;

/// The gateway's HTTP port.
pub const GATEWAY_PORT: u16 = 8080;
/// How long the gateway waits for an upstream answer (a cold start is held that long).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// A route: requests with `Host: host` go to Service `ns/service` (revision `service`).
#[derive(Debug, Clone)]
pub struct Route {
    pub host: String,
    pub ns: String,
    pub service: String,
}

/// One forwarding decision: when, and to which address.
#[derive(Debug, Clone)]
pub struct Forward {
    pub at: Instant,
    pub upstream: SocketAddr,
}

struct State {
    slices: reflector::Store<EndpointSlice>,
    routes: Mutex<Vec<Route>>,
    rr: AtomicUsize,
    forwards: Mutex<Vec<Forward>>,
}

/// The gateway pod: its IP, the proxy thread (in the pod) and the informer thread (in the
/// node, where the API server listens).
pub struct Gateway {
    pub ip: IpAddr,
    state: Arc<State>,
    _proxy: Task,
    _informer: Task,
}

/// The ready `http` addresses of Service `ns/service` in `slices`, sorted.
pub fn addresses(slices: &[Arc<EndpointSlice>], ns: &str, service: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in slices {
        let labels = s.metadata.labels.as_ref();
        if s.metadata.namespace.as_deref() != Some(ns)
            || labels
                .and_then(|l| l.get(SERVICE_LABEL))
                .map(String::as_str)
                != Some(service)
        {
            continue;
        }
        let ports = s.ports.as_deref().unwrap_or_default();
        let Some(port) = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .or(ports.first())
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, port as u16));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
];

async fn forward(
    req: Request<Incoming>,
    up: SocketAddr,
    route: &Route,
) -> Result<Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(up))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connecting to {up}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut b = Request::builder().method(parts.method.clone()).uri(path);
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            b = b.header(k, v);
        }
    }
    let up_req = b
        .header("knative-serving-revision", &route.service)
        .header("knative-serving-namespace", &route.ns)
        .header("connection", "close")
        .header("content-length", body.len())
        .body(Full::new(body))?;
    let resp = tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(up_req))
        .await
        .context("upstream timed out")??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out.headers_mut().append(k, v.clone());
        }
    }
    out.headers_mut()
        .insert("x-upstream", up.to_string().parse()?);
    Ok(out)
}

async fn handle(req: Request<Incoming>, st: Arc<State>) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_owned())
        .unwrap_or_default();
    let route = st
        .routes
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.host == host)
        .cloned();
    let Some(route) = route else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no route for host {host:?}\n"),
        );
    };
    let addrs = addresses(&st.slices.state(), &route.ns, &route.service);
    if addrs.is_empty() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream\n".into(),
        );
    }
    let up = addrs[st.rr.fetch_add(1, Ordering::Relaxed) % addrs.len()];
    st.forwards.lock().unwrap().push(Forward {
        at: Instant::now(),
        upstream: up,
    });
    match forward(req, up, &route).await {
        Ok(r) => r,
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("upstream {up}: {e:#}\n")),
    }
}

impl Gateway {
    /// Adds gateway pod `h` (`10.244.2.h`) to node `k` and starts the proxy in it and the
    /// EndpointSlice informer; returns once the informer has listed.
    pub fn start(k: &mut KubeNode, h: u8) -> Result<Gateway> {
        let i = k.add_pod(h)?;
        let (ip, pod_ns) = (k.pods[i].v4(), k.pods[i].ns.name.clone());
        let (reader, writer) = reflector::store::<EndpointSlice>();
        let state = Arc::new(State {
            slices: reader,
            routes: Mutex::default(),
            rr: AtomicUsize::new(0),
            forwards: Mutex::default(),
        });
        let url = k.api.url();
        let informer = Task::spawn("gateway-informer", &k.node.name, move || {
            let api: Api<EndpointSlice> = Api::all(kube_client(&url)?);
            let cfg = watcher::Config::default().labels(SERVICE_LABEL);
            let stream = reflector(writer, watcher(api, cfg))
                .default_backoff()
                .touched_objects();
            Ok(async move {
                let mut stream = std::pin::pin!(stream);
                while stream.next().await.is_some() {}
            })
        })?;
        let st = state.clone();
        let proxy = Task::spawn("gateway-proxy", &pod_ns, move || {
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, GATEWAY_PORT))
                .with_context(|| format!("binding {ip}:{GATEWAY_PORT}"))?;
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            Ok(async move {
                loop {
                    let Ok((stream, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(req, st).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(&state.slices) {
            if Instant::now() > deadline {
                bail!("the gateway's EndpointSlice informer did not list");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Gateway {
            ip,
            state,
            _proxy: proxy,
            _informer: informer,
        })
    }

    /// Routes `Host: <rev>.<ns>.example.com` ([`super::host`]) to revision `rev` in `ns`
    /// (its public Service is named `rev`).
    pub fn route(&self, rev: &str, ns: &str) {
        self.state.routes.lock().unwrap().push(Route {
            host: super::host(rev, ns),
            ns: ns.to_owned(),
            service: rev.to_owned(),
        });
    }

    /// The addresses the gateway currently sends `ns/service`'s requests to.
    pub fn addresses(&self, ns: &str, service: &str) -> Vec<SocketAddr> {
        addresses(&self.state.slices.state(), ns, service)
    }

    /// `IP:8080`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, GATEWAY_PORT)
    }

    /// Every forwarding decision so far.
    pub fn forwards(&self) -> Vec<Forward> {
        self.state.forwards.lock().unwrap().clone()
    }
}

/// True once the reflector store has had its initial list (empty or not).
fn ready(store: &reflector::Store<EndpointSlice>) -> bool {
    futures_util::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeapi::objects::{self, Ep};

    #[test]
    fn ready_http_addresses_of_the_service() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let slice = |ns: &str, svc: &str, name: &str, eps: &[Ep]| {
            let v =
                objects::endpoint_slice(ns, svc, name, eps, &[("metrics", 9090), ("http", 8012)]);
            Arc::new(serde_json::from_value::<EndpointSlice>(v).unwrap())
        };
        let slices = vec![
            slice(
                "rt",
                "rev",
                "rev-a",
                &[Ep::ready(ip("10.0.0.2")), Ep::not_ready(ip("10.0.0.3"))],
            ),
            slice("rt", "rev", "rev-b", &[Ep::ready(ip("10.0.0.1"))]),
            slice("rt", "other", "other-a", &[Ep::ready(ip("10.0.0.9"))]),
            slice("ns2", "rev", "rev-a", &[Ep::ready(ip("10.0.0.8"))]),
        ];
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:8012".parse().unwrap(),
            "10.0.0.2:8012".parse().unwrap(),
        ];
        assert_eq!(addresses(&slices, "rt", "rev"), want);
        assert!(addresses(&slices, "rt", "none").is_empty());
    }
}
