//! Pod readiness probing as Knative's activator does it
//! (`pkg/activator/net/revision_backends.go`, `revisionWatcher.probe`): `GET /healthz` on the
//! pod's queue-proxy port with `K-Network-Probe: queue` and
//! `User-Agent: Knative-Activator-Probe`; the pod is ready when the answer is 200 with the
//! body `queue`. As there, a pod probed ready stays ready (no re-probing) until it leaves
//! the endpoints, or until Kubernetes moves it from ready to not ready, which makes it a
//! candidate again; and a pod is usable as soon as its probe passes, before Kubernetes marks
//! it ready (Knative's probe optimisation). Knative probes every 200 ms with a 300 ms
//! timeout; the defaults here probe every 10 ms (a cold start is waiting on it) with the same
//! timeout.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    client::conn::http1::SendRequest,
    header::{HeaderValue, HOST, USER_AGENT},
    Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::watch, task::AbortHandle, time::Instant};

/// The probe header (`knative.dev/networking/pkg/http/header.ProbeKey`).
pub const PROBE_HEADER: &str = "K-Network-Probe";
/// Its value and the expected body for a queue-proxy (`queue.Name`).
pub const QUEUE_PROBE: &str = "queue";
/// `header.ActivatorUserAgent`.
pub const ACTIVATOR_USER_AGENT: &str = "Knative-Activator-Probe";
/// `knative.dev/networking/pkg/http.HealthCheckPath`.
pub const HEALTH_CHECK_PATH: &str = "/healthz";

/// How to probe.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Pause between two probes of a pod that is not ready yet.
    pub interval: Duration,
    /// Limit of one probe (connect, request, body).
    pub timeout: Duration,
    /// Trust Kubernetes: endpoints it reports ready count as ready without a probe (Knative
    /// does this unless its mesh compatibility mode is `auto`, the default).
    pub trust_ready: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(300),
            trust_ready: false,
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("timed out")]
    Timeout,
}

/// The outcome of a probe that got an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl ProbeAnswer {
    /// Knative's verdict: 200 and the body `queue`.
    pub fn ready(&self) -> bool {
        self.status == StatusCode::OK && self.body.as_ref() == QUEUE_PROBE.as_bytes()
    }
}

/// Probes one pod, reusing its keep-alive connection between probes.
#[derive(Debug)]
pub struct PodProbe {
    addr: SocketAddr,
    host: HeaderValue,
    timeout: Duration,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

impl PodProbe {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            addr,
            host,
            timeout,
            conn: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One probe within the timeout.
    pub async fn probe(&mut self) -> Result<ProbeAnswer, ProbeError> {
        match tokio::time::timeout(self.timeout, self.probe_inner()).await {
            Ok(r) => {
                if r.is_err() {
                    self.conn = None;
                }
                r
            }
            Err(_) => {
                self.conn = None;
                Err(ProbeError::Timeout)
            }
        }
    }

    /// True when the pod answered as a ready queue-proxy.
    pub async fn ready(&mut self) -> bool {
        match self.probe().await {
            Ok(a) => a.ready(),
            Err(e) => {
                tracing::trace!(addr = %self.addr, error = %e, "probe failed");
                false
            }
        }
    }

    async fn probe_inner(&mut self) -> Result<ProbeAnswer, ProbeError> {
        let reuse = self
            .conn
            .as_mut()
            .is_some_and(|c| !c.is_closed() && c.is_ready());
        if !reuse {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(ProbeError::Connect)?;
            let _ = stream.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(send);
        }
        let Some(send) = self.conn.as_mut() else {
            return Err(ProbeError::Body("no connection".into()));
        };
        let req = Request::get(HEALTH_CHECK_PATH)
            .header(HOST, self.host.clone())
            .header(PROBE_HEADER, QUEUE_PROBE)
            .header(USER_AGENT, ACTIVATOR_USER_AGENT)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| ProbeError::Body(e.to_string()))?
            .to_bytes();
        Ok(ProbeAnswer { status, body })
    }
}

/// Probes `addr` every `cfg.interval` until it answers ready (true) or `deadline` passes
/// (false).
pub async fn probe_until_ready_with(
    addr: SocketAddr,
    deadline: Instant,
    cfg: &ProbeConfig,
) -> bool {
    let mut p = PodProbe::new(addr, cfg.timeout);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        // A probe never runs past the deadline.
        p.timeout = cfg.timeout.min(deadline - now);
        if p.ready().await {
            return true;
        }
        if Instant::now() + cfg.interval >= deadline {
            tokio::time::sleep_until(deadline).await;
            return false;
        }
        tokio::time::sleep(cfg.interval).await;
    }
}

/// [`probe_until_ready_with`] with the default cadence (10 ms) and probe timeout (300 ms).
pub async fn probe_until_ready(addr: SocketAddr, deadline: Instant) -> bool {
    probe_until_ready_with(addr, deadline, &ProbeConfig::default()).await
}

#[derive(Debug)]
struct Candidate {
    k8s_ready: bool,
    healthy: bool,
    task: Option<AbortHandle>,
}

struct ProberInner {
    cfg: ProbeConfig,
    cands: Mutex<HashMap<SocketAddr, Candidate>>,
    ready: watch::Sender<Arc<Vec<SocketAddr>>>,
}

impl ProberInner {
    fn publish(&self, cands: &HashMap<SocketAddr, Candidate>) {
        let mut set: Vec<SocketAddr> = cands
            .iter()
            .filter(|(_, c)| c.healthy)
            .map(|(a, _)| *a)
            .collect();
        set.sort();
        self.ready.send_if_modified(|cur| {
            if **cur == set {
                false
            } else {
                *cur = Arc::new(set);
                true
            }
        });
    }
}

impl Drop for ProberInner {
    fn drop(&mut self) {
        if let Ok(c) = self.cands.get_mut() {
            for cand in c.values_mut() {
                if let Some(t) = cand.task.take() {
                    t.abort();
                }
            }
        }
    }
}

/// Watches a revision's candidate endpoints (the queue-proxy addresses of its pods) and
/// publishes the subset that probed ready, sorted. Dropping it stops its probes.
pub struct Prober {
    inner: Arc<ProberInner>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("ready", &*self.inner.ready.borrow())
            .finish()
    }
}

impl Prober {
    pub fn new(cfg: ProbeConfig) -> Self {
        Self {
            inner: Arc::new(ProberInner {
                cfg,
                cands: Mutex::new(HashMap::new()),
                ready: watch::channel(Arc::new(Vec::new())).0,
            }),
        }
    }

    /// The ready subset, updated whenever it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<SocketAddr>>> {
        self.inner.ready.subscribe()
    }

    /// The ready subset now.
    pub fn ready(&self) -> Arc<Vec<SocketAddr>> {
        self.inner.ready.borrow().clone()
    }

    /// Replaces the candidates: the endpoints Kubernetes reports ready and those it reports
    /// not ready yet (both are probed; see the module docs). Needs a Tokio runtime.
    pub fn set_endpoints(
        &self,
        ready: impl IntoIterator<Item = SocketAddr>,
        not_ready: impl IntoIterator<Item = SocketAddr>,
    ) {
        let mut want: HashMap<SocketAddr, bool> =
            not_ready.into_iter().map(|a| (a, false)).collect();
        want.extend(ready.into_iter().map(|a| (a, true)));
        let inner = &self.inner;
        let mut cands = inner.cands.lock().unwrap_or_else(|e| e.into_inner());
        cands.retain(|addr, c| {
            let keep = want.contains_key(addr);
            if !keep {
                if let Some(t) = c.task.take() {
                    t.abort();
                }
            }
            keep
        });
        for (addr, k8s_ready) in want {
            let c = cands.entry(addr).or_insert(Candidate {
                k8s_ready,
                healthy: false,
                task: None,
            });
            if c.k8s_ready && !k8s_ready {
                // Became not ready: probe it again.
                c.healthy = false;
            }
            c.k8s_ready = k8s_ready;
            if k8s_ready && inner.cfg.trust_ready {
                c.healthy = true;
            }
            if c.healthy {
                if let Some(t) = c.task.take() {
                    t.abort();
                }
            } else if c.task.is_none() {
                c.task = Some(spawn_probe(Arc::downgrade(inner), addr));
            }
        }
        inner.publish(&cands);
    }
}

fn spawn_probe(inner: Weak<ProberInner>, addr: SocketAddr) -> AbortHandle {
    tokio::spawn(async move {
        let (interval, timeout) = match inner.upgrade() {
            Some(i) => (i.cfg.interval, i.cfg.timeout),
            None => return,
        };
        let mut p = PodProbe::new(addr, timeout);
        loop {
            if p.ready().await {
                let Some(i) = inner.upgrade() else { return };
                let mut cands = i.cands.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = cands.get_mut(&addr) {
                    c.healthy = true;
                    c.task = None;
                }
                i.publish(&cands);
                tracing::debug!(%addr, "pod probed ready");
                return;
            }
            if inner.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    })
    .abort_handle()
}
