//! In-process HTTP/1.1 (or h2c) servers for the ingress cluster: a revision pod (standing in for the
//! queue-proxy + app) and Knative's activator. Each answers `hello from <its ip>` with an
//! `X-Peer: <peer ip>` header (so a test can tell a request that reached a pod straight
//! from the gateway from one forwarded by the node-local activator), answers Knative's
//! `K-Network-Probe: queue` with `queue` as queue-proxy does, and counts what it got,
//! with the `Knative-Serving-Revision` / `-Namespace` headers the gateway added.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Task;

/// One request a backend answered.
#[derive(Debug, Clone)]
pub struct Hit {
    pub peer: IpAddr,
    pub path: String,
    pub revision: Option<String>,
    pub namespace: Option<String>,
    /// A `K-Network-Probe: queue` probe (not a user request).
    pub probe: bool,
}

/// A server on `ip:port` in a pod's namespace; stops on drop.
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    _task: Task,
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn answer(
    req: &Request<Incoming>,
    me: IpAddr,
    peer: IpAddr,
    hits: &Mutex<Vec<Hit>>,
) -> Response<Full<Bytes>> {
    let probe = header(req, "k-network-probe").is_some_and(|v| v == "queue");
    let path = req.uri().path().to_owned();
    hits.lock().unwrap().push(Hit {
        peer,
        path: path.clone(),
        revision: header(req, "knative-serving-revision"),
        namespace: header(req, "knative-serving-namespace"),
        probe,
    });
    let text = if probe {
        "queue".to_owned()
    } else {
        format!("hello from {me}\n")
    };
    Response::builder()
        .header("content-type", "text/plain")
        .header("x-peer", peer.to_string())
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_default()
}

impl Backend {
    /// Starts the server in namespace `netns` on `ip:port` (bound to `0.0.0.0:port`).
    pub fn start(netns: &str, ip: IpAddr, port: u16) -> Result<Backend> {
        Self::start_with(netns, ip, port, false)
    }

    /// The same server speaking h2c with prior knowledge (as Knative's activator does on
    /// its `http2` port, 8013) instead of HTTP/1.1.
    pub fn start_h2c(netns: &str, ip: IpAddr, port: u16) -> Result<Backend> {
        Self::start_with(netns, ip, port, true)
    }

    fn start_with(netns: &str, ip: IpAddr, port: u16, h2c: bool) -> Result<Backend> {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let h = hits.clone();
        let task = Task::spawn(&format!("backend-{ip}"), netns, move || {
            let l = std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
                .with_context(|| format!("binding port {port}"))?;
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            Ok(async move {
                loop {
                    let Ok((stream, peer)) = l.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let h = h.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let r = answer(&req, ip, peer.ip(), &h);
                            async move { Ok::<_, Infallible>(r) }
                        });
                        let io = TokioIo::new(stream);
                        if h2c {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                    });
                }
            })
        })?;
        Ok(Backend {
            ip,
            port,
            hits,
            _task: task,
        })
    }

    /// Every request so far (probes included).
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// User requests (not probes) so far.
    pub fn requests(&self) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| !h.probe)
            .count()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}
