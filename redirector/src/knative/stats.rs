//! Stat messages for Knative's autoscaler, and a reporter that sends them the way Knative's
//! activator does.
//!
//! Wire format: `knative.dev/serving/pkg/autoscaler/metrics/stat.proto` (package `metrics`),
//! hand-written here as `prost` derives. The activator sends one binary websocket frame per
//! batch, each frame a marshalled `WireStatMessages`, to the autoscaler service
//! (`ws://autoscaler.<system namespace>.svc.<cluster domain>:8080`).
//!
//! What Knative's activator sends (`pkg/activator/handler/concurrency_reporter.go`):
//! - `pod_name` is the activator's own pod name (`POD_NAME`); only
//!   `average_concurrent_requests` and `request_count` are set. The proxied fields stay 0:
//!   the queue-proxy reports requests carrying `K-Proxy-Request: activator` as proxied and
//!   the autoscaler subtracts them, so nothing is counted twice. `timestamp` stays 0 too;
//!   the autoscaler stamps a stat when it receives it.
//! - The first request for a revision the activator is not tracking is reported at once with
//!   concurrency 1 and request count 1: the autoscaler pokes a revision at scale 0 on any
//!   stat with non-zero concurrency, so this is what wakes it from zero.
//! - Every second, one frame with a stat per tracked revision: the average concurrency over
//!   the second and the requests that arrived in it, less what the immediate report already
//!   said (concurrency floored at 0). A revision whose average concurrency over a whole
//!   second was 0 is reported once more (with 0) and then no longer tracked.
//!
//! The connection follows `knative.dev/pkg/websocket` (`NewDurableSendingConnection`): 3 s
//! handshake timeout, reconnect with jittered exponential backoff from 100 ms (factor 1.3),
//! a ping every 10/3 s and a reconnect when no pong came for 10 s. Unlike Knative, a wake
//! that happens while the connection is down is kept (latest per revision) and sent as soon
//! as it is back; periodic reports made while it is down are dropped, as Knative does.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

/// `Stat` of `stat.proto`: a single measurement at a point in time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    /// The unique identity of the reporting pod (the activator's pod name).
    #[prost(string, tag = "1")]
    pub pod_name: String,
    /// Average number of requests currently being handled.
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    /// Part of `average_concurrent_requests`, for requests going through a proxy.
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    /// Number of requests received since the last stat.
    #[prost(double, tag = "4")]
    pub request_count: f64,
    /// Part of `request_count`, for requests going through a proxy.
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    /// Process uptime in seconds.
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    /// Seconds since the epoch when the stat was generated (0: the autoscaler stamps it).
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// `WireStatMessage` of `stat.proto`: a stat and the revision it belongs to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessage {
    /// Namespace of the revision.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Name of the revision.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The stat (the autoscaler skips messages without one).
    #[prost(message, optional, tag = "3")]
    pub stat: Option<Stat>,
}

/// `WireStatMessages` of `stat.proto`: what one websocket frame carries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessages {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<WireStatMessage>,
}

impl WireStatMessages {
    /// The frame payload (protobuf).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes a frame payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self, StatsError> {
        Ok(Self::decode(b)?)
    }
}

/// Errors of the stat reporter.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("decoding WireStatMessages: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("autoscaler websocket {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("autoscaler websocket {0}: handshake timed out")]
    HandshakeTimeout(String),
}

/// Knative's autoscaler service (system namespace `knative-serving`, cluster domain
/// `cluster.local`, port 8080).
pub const DEFAULT_AUTOSCALER_URL: &str = "ws://autoscaler.knative-serving.svc.cluster.local:8080";

/// Settings of a [`StatReporter`].
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Websocket URL of the autoscaler (plain `ws://`).
    pub url: String,
    /// `pod_name` of every stat: the activator's pod name.
    pub pod_name: String,
    /// How often tracked revisions are reported (Knative: 1 s).
    pub report_interval: Duration,
    /// How often [`StatReporter::run`] samples concurrency; the reported concurrency is the
    /// mean of the samples over a report interval.
    pub sample_interval: Duration,
    /// Websocket handshake timeout (Knative: 3 s).
    pub handshake_timeout: Duration,
    /// First reconnect delay (Knative: 100 ms), multiplied by `backoff_factor` per failed
    /// attempt up to `backoff_max`, each with up to 50% jitter added.
    pub backoff_initial: Duration,
    pub backoff_factor: f64,
    pub backoff_max: Duration,
    /// Ping period (Knative: 10 s / 3) and how long without a pong before reconnecting
    /// (Knative: 10 s).
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_AUTOSCALER_URL.to_owned(),
            pod_name: default_pod_name(),
            report_interval: Duration::from_secs(1),
            sample_interval: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(100),
            backoff_factor: 1.3,
            backoff_max: Duration::from_secs(5),
            ping_interval: Duration::from_millis(3333),
            pong_timeout: Duration::from_secs(10),
        }
    }
}

/// The pod name from `POD_NAME` (the downward API, as Knative's activator reads it), else
/// the host name, else `redirector-activator`.
pub fn default_pod_name() -> String {
    if let Ok(n) = std::env::var("POD_NAME") {
        if !n.is_empty() {
            return n;
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // when the name fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..len]) {
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    "redirector-activator".to_owned()
}

/// One revision as the activator sees it at a sampling instant.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSample {
    pub namespace: String,
    pub revision: String,
    /// Requests held plus requests in flight through the activator, now.
    pub concurrency: f64,
    /// Requests seen so far (a cumulative counter; the reporter sends its increase).
    pub requests: u64,
}

impl RevisionSample {
    /// Samples an activator service whose name is `namespace/revision` (services named
    /// otherwise have no Knative revision and give `None`). Requests counts those the
    /// activator has finished with: forwarded, timed out, or turned away.
    pub fn from_service(svc: &crate::activator::ServiceState) -> Option<Self> {
        let (ns, rev) = svc.name.split_once('/')?;
        Some(Self {
            namespace: ns.to_owned(),
            revision: rev.to_owned(),
            concurrency: svc.concurrency() as f64,
            requests: svc.forwarded.load(Ordering::Relaxed)
                + svc.timed_out.load(Ordering::Relaxed)
                + svc.rejected_full.load(Ordering::Relaxed),
        })
    }
}

/// Samples every Knative revision the activator holds (see [`RevisionSample::from_service`]).
pub fn activator_samples(act: &crate::activator::Activator) -> Vec<RevisionSample> {
    act.registry()
        .services()
        .filter_map(|s| RevisionSample::from_service(s))
        .collect()
}

/// Counters of a reporter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReporterCounters {
    /// Websocket connections established.
    pub connects: u64,
    /// Frames (one `WireStatMessages` each) written.
    pub frames_sent: u64,
    /// Stat messages written.
    pub messages_sent: u64,
    /// Immediate (wake) reports made.
    pub wakes: u64,
    /// Stat messages dropped (periodic reports while disconnected, or a full queue).
    pub dropped: u64,
}

type Key = (String, String);

/// Per-revision accounting between two reports.
#[derive(Debug, Default)]
struct Rev {
    /// Reported to the autoscaler (first activity seen and not yet idle for a period).
    active: bool,
    /// What the immediate report already said, subtracted from the next periodic one.
    first_conc: f64,
    first_count: f64,
    /// Last cumulative request counter seen (None until the first sample).
    last_requests: Option<u64>,
    /// Requests that arrived in this period.
    requests: f64,
    conc_sum: f64,
    samples: u32,
    /// In the latest sample.
    seen: bool,
}

struct Frame {
    msgs: Vec<WireStatMessage>,
    /// A wake: kept while disconnected and sent once connected.
    urgent: bool,
}

struct Inner {
    cfg: ReporterConfig,
    tx: mpsc::Sender<Frame>,
    revs: Mutex<HashMap<Key, Rev>>,
    connected: AtomicBool,
    connects: AtomicU64,
    frames_sent: AtomicU64,
    messages_sent: AtomicU64,
    wakes: AtomicU64,
    dropped: AtomicU64,
    stop: watch::Sender<bool>,
}

/// Sends the activator's stats to Knative's autoscaler over a durable websocket.
///
/// Cheap to clone (an `Arc`). [`StatReporter::start`] spawns the connection task;
/// [`StatReporter::run`] samples and reports every second; [`StatReporter::wake`] reports a
/// revision at once.
#[derive(Clone)]
pub struct StatReporter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StatReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatReporter")
            .field("url", &self.inner.cfg.url)
            .field("pod_name", &self.inner.cfg.pod_name)
            .field("connected", &self.connected())
            .finish()
    }
}

/// Frames queued for the connection task (wakes and reports).
const QUEUE: usize = 1024;
/// Wakes kept while disconnected (latest per revision).
const MAX_PENDING: usize = 4096;

impl StatReporter {
    /// Starts the connection task (needs a Tokio runtime). It connects at once and keeps
    /// reconnecting until [`StatReporter::shutdown`].
    pub fn start(cfg: ReporterConfig) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            cfg,
            tx,
            revs: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: watch::channel(false).0,
        });
        tokio::spawn(connection(inner.clone(), rx));
        Self { inner }
    }

    pub fn config(&self) -> &ReporterConfig {
        &self.inner.cfg
    }

    /// True while the websocket to the autoscaler is up.
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> ReporterCounters {
        let i = &self.inner;
        ReporterCounters {
            connects: i.connects.load(Ordering::Relaxed),
            frames_sent: i.frames_sent.load(Ordering::Relaxed),
            messages_sent: i.messages_sent.load(Ordering::Relaxed),
            wakes: i.wakes.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
        }
    }

    /// Stops sampling and closes the websocket.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
    }

    fn stat(&self, concurrency: f64, count: f64) -> Stat {
        Stat {
            pod_name: self.inner.cfg.pod_name.clone(),
            average_concurrent_requests: concurrency,
            request_count: count,
            ..Default::default()
        }
    }

    fn msg(&self, key: &Key, concurrency: f64, count: f64) -> WireStatMessage {
        WireStatMessage {
            namespace: key.0.clone(),
            name: key.1.clone(),
            stat: Some(self.stat(concurrency, count)),
        }
    }

    fn enqueue(&self, frame: Frame) {
        let n = frame.msgs.len() as u64;
        if self.inner.tx.try_send(frame).is_err() {
            self.inner.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reports a revision to the autoscaler at once, as Knative's activator does on the first
    /// request for a revision it is not tracking: a stat with `concurrency` (at least 1) and
    /// one request. That is what makes the autoscaler scale a revision up from zero without
    /// waiting for its next tick. A revision already tracked is not reported again here: the
    /// next periodic report (at most a second away) carries its concurrency.
    pub fn wake(&self, namespace: &str, revision: &str, concurrency: f64) {
        let key = (namespace.to_owned(), revision.to_owned());
        let conc = if concurrency.is_finite() {
            concurrency.max(1.0)
        } else {
            1.0
        };
        {
            let mut revs = self.inner.revs.lock().unwrap_or_else(|e| e.into_inner());
            let rev = revs.entry(key.clone()).or_default();
            if rev.active {
                return;
            }
            rev.active = true;
            rev.first_conc = conc;
            rev.first_count = 1.0;
        }
        self.inner.wakes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(namespace, revision, concurrency = conc, "waking revision");
        let m = self.msg(&key, conc, 1.0);
        self.enqueue(Frame {
            msgs: vec![m],
            urgent: true,
        });
    }

    /// Feeds one sample of the revisions: a revision with activity that is not tracked yet
    /// is reported at once (the first-request report). A revision missing from `samples`
    /// counts as idle (concurrency 0, no new requests); an untracked one that is missing is
    /// forgotten, so its request counter restarts from its next sample. Called by
    /// [`StatReporter::run`].
    pub fn sample(&self, samples: Vec<RevisionSample>) {
        let mut urgent = Vec::new();
        {
            let mut revs = self.inner.revs.lock().unwrap_or_else(|e| e.into_inner());
            for r in revs.values_mut() {
                r.seen = false;
            }
            for s in samples {
                let key = (s.namespace, s.revision);
                let rev = revs.entry(key.clone()).or_default();
                rev.seen = true;
                let arrived = match rev.last_requests {
                    Some(last) => s.requests.saturating_sub(last),
                    None => 0,
                };
                rev.last_requests = Some(s.requests);
                let conc = if s.concurrency.is_finite() {
                    s.concurrency.max(0.0)
                } else {
                    0.0
                };
                if !rev.active && (conc > 0.0 || arrived > 0) {
                    rev.active = true;
                    rev.first_conc = 1.0;
                    rev.first_count = 1.0;
                    urgent.push(key.clone());
                }
                rev.requests += arrived as f64;
                rev.conc_sum += conc;
                rev.samples += 1;
            }
            // A revision missing from the sample is idle: a tracked one counts a sample of 0
            // (it gets its idle report and is then untracked), an untracked one is forgotten.
            revs.retain(|_, r| {
                if !r.seen && r.active {
                    r.samples += 1;
                }
                r.seen || r.active
            });
        }
        if !urgent.is_empty() {
            self.inner
                .wakes
                .fetch_add(urgent.len() as u64, Ordering::Relaxed);
            let msgs = urgent.iter().map(|k| self.msg(k, 1.0, 1.0)).collect();
            self.enqueue(Frame { msgs, urgent: true });
        }
    }

    /// Cuts the periodic report: one stat per tracked revision. Revisions idle for the whole
    /// period are reported with 0 and then untracked. Called by [`StatReporter::run`].
    pub fn report(&self) -> Vec<WireStatMessage> {
        let mut out = Vec::new();
        let mut revs = self.inner.revs.lock().unwrap_or_else(|e| e.into_inner());
        for (key, r) in revs.iter_mut() {
            let avg = if r.samples > 0 {
                r.conc_sum / r.samples as f64
            } else {
                0.0
            };
            let requests = r.requests;
            let first_conc = std::mem::take(&mut r.first_conc);
            let first_count = std::mem::take(&mut r.first_count);
            r.conc_sum = 0.0;
            r.samples = 0;
            r.requests = 0.0;
            if !r.active {
                continue;
            }
            if avg == 0.0 && requests == 0.0 && first_conc == 0.0 {
                r.active = false;
            }
            out.push(self.msg(
                key,
                (avg - first_conc).max(0.0),
                (requests - first_count).max(0.0),
            ));
        }
        out
    }

    /// Samples `states` every `sample_interval` and reports every `report_interval` until
    /// [`StatReporter::shutdown`]. `states` returns the revisions the activator holds (one
    /// missing from a sample counts as idle, see [`StatReporter::sample`]).
    pub async fn run<F>(&self, states: F)
    where
        F: Fn() -> Vec<RevisionSample>,
    {
        let cfg = &self.inner.cfg;
        let mut stop = self.inner.stop.subscribe();
        let mut sample = tokio::time::interval(cfg.sample_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report =
            tokio::time::interval_at(Instant::now() + cfg.report_interval, cfg.report_interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sample.tick() => self.sample(states()),
                _ = report.tick() => {
                    let msgs = self.report();
                    if !msgs.is_empty() {
                        self.enqueue(Frame { msgs, urgent: false });
                    }
                }
                _ = stop.changed() => break,
            }
        }
    }
}

/// Jittered exponential backoff (as `k8s.io/apimachinery` `wait.Backoff` with jitter 0.5).
struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    fn new(cfg: &ReporterConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Self {
            next: cfg.backoff_initial,
            seed,
        }
    }

    fn step(&mut self, cfg: &ReporterConfig) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = (self.seed % 1000) as f64 / 1000.0 * 0.5;
        let d = self.next.mul_f64(1.0 + jitter);
        self.next = self.next.mul_f64(cfg.backoff_factor).min(cfg.backoff_max);
        d
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn dial(cfg: &ReporterConfig) -> Result<Ws, StatsError> {
    let fut = tokio_tungstenite::connect_async_with_config(cfg.url.as_str(), None, true);
    match tokio::time::timeout(cfg.handshake_timeout, fut).await {
        Err(_) => Err(StatsError::HandshakeTimeout(cfg.url.clone())),
        Ok(Err(e)) => Err(StatsError::Connect {
            url: cfg.url.clone(),
            source: Box::new(e),
        }),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// Keeps frames that must survive a disconnect: the latest wake per revision.
fn keep_pending(inner: &Inner, pending: &mut HashMap<Key, WireStatMessage>, f: Frame) {
    if !f.urgent {
        inner
            .dropped
            .fetch_add(f.msgs.len() as u64, Ordering::Relaxed);
        return;
    }
    for m in f.msgs {
        if pending.len() >= MAX_PENDING
            && !pending.contains_key(&(m.namespace.clone(), m.name.clone()))
        {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        pending.insert((m.namespace.clone(), m.name.clone()), m);
    }
}

/// The durable connection: connect, send queued frames, ping, reconnect on any failure.
async fn connection(inner: Arc<Inner>, mut rx: mpsc::Receiver<Frame>) {
    let cfg = &inner.cfg;
    let mut stop = inner.stop.subscribe();
    let mut pending: HashMap<Key, WireStatMessage> = HashMap::new();
    let mut backoff = Backoff::new(cfg);
    let mut logged_down = false;
    loop {
        if *stop.borrow() {
            return;
        }
        // Connect, keeping wakes that arrive meanwhile.
        let ws = {
            let dial = dial(cfg);
            tokio::pin!(dial);
            loop {
                tokio::select! {
                    r = &mut dial => break r,
                    f = rx.recv() => match f {
                        Some(f) => keep_pending(&inner, &mut pending, f),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        };
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                if !logged_down {
                    tracing::warn!(error = %e, "autoscaler stat websocket is down; retrying");
                    logged_down = true;
                } else {
                    tracing::debug!(error = %e, "autoscaler stat websocket: connect failed");
                }
                if !idle(&inner, &mut rx, &mut pending, &mut stop, backoff.step(cfg)).await {
                    return;
                }
                continue;
            }
        };
        logged_down = false;
        let since = Instant::now();
        inner.connects.fetch_add(1, Ordering::Relaxed);
        inner.connected.store(true, Ordering::Relaxed);
        tracing::info!(url = %cfg.url, "connected to the autoscaler");
        let r = session(&inner, ws, &mut rx, &mut pending, &mut stop).await;
        inner.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Closed) => {
                tracing::info!(url = %cfg.url, "autoscaler closed the stat websocket; reconnecting")
            }
            Err(e) => {
                tracing::warn!(url = %cfg.url, error = %e, "autoscaler stat websocket broke; reconnecting")
            }
        }
        if since.elapsed() >= Duration::from_secs(1) {
            backoff = Backoff::new(cfg);
        } else if !idle(&inner, &mut rx, &mut pending, &mut stop, backoff.step(cfg)).await {
            // A peer that drops every connection at once is not hammered.
            return;
        }
    }
}

/// Waits `d` while keeping the wakes that arrive; false when the reporter stops.
async fn idle(
    inner: &Inner,
    rx: &mut mpsc::Receiver<Frame>,
    pending: &mut HashMap<Key, WireStatMessage>,
    stop: &mut watch::Receiver<bool>,
    d: Duration,
) -> bool {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            f = rx.recv() => match f {
                Some(f) => keep_pending(inner, pending, f),
                None => return false,
            },
            _ = stop.changed() => return false,
        }
    }
}

type WsError = tokio_tungstenite::tungstenite::Error;

/// Writes one frame; a write stuck for `limit` (the peer stopped reading) breaks the
/// connection.
async fn write<S>(sink: &mut S, m: Message, limit: Duration) -> Result<(), WsError>
where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    match tokio::time::timeout(limit, sink.send(m)).await {
        Ok(r) => r,
        Err(_) => Err(WsError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "writing to the autoscaler timed out",
        ))),
    }
}

enum Ended {
    Stopped,
    Closed,
}

async fn session(
    inner: &Inner,
    ws: Ws,
    rx: &mut mpsc::Receiver<Frame>,
    pending: &mut HashMap<Key, WireStatMessage>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ended, tokio_tungstenite::tungstenite::Error> {
    let cfg = &inner.cfg;
    let (mut sink, mut stream) = ws.split();
    let send = |msgs: Vec<WireStatMessage>| {
        let n = msgs.len() as u64;
        let bytes = WireStatMessages { messages: msgs }.to_bytes();
        (n, Message::binary(bytes))
    };
    if !pending.is_empty() {
        let (n, m) = send(pending.values().cloned().collect());
        write(&mut sink, m, cfg.pong_timeout).await?;
        pending.clear();
        inner.frames_sent.fetch_add(1, Ordering::Relaxed);
        inner.messages_sent.fetch_add(n, Ordering::Relaxed);
    }
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_pong = Instant::now();
    loop {
        tokio::select! {
            f = rx.recv() => {
                let Some(f) = f else {
                    let _ = sink.close().await;
                    return Ok(Ended::Stopped);
                };
                let (n, m) = send(f.msgs);
                if let Err(e) = write(&mut sink, m, cfg.pong_timeout).await {
                    inner.dropped.fetch_add(n, Ordering::Relaxed);
                    return Err(e);
                }
                inner.frames_sent.fetch_add(1, Ordering::Relaxed);
                inner.messages_sent.fetch_add(n, Ordering::Relaxed);
            }
            _ = ping.tick() => {
                if last_pong.elapsed() > cfg.pong_timeout {
                    return Err(tokio_tungstenite::tungstenite::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no pong from the autoscaler",
                    )));
                }
                write(&mut sink, Message::Ping(Default::default()), cfg.pong_timeout).await?;
            }
            m = stream.next() => match m {
                None => return Ok(Ended::Closed),
                Some(Err(e)) => return Err(e),
                Some(Ok(Message::Close(_))) => return Ok(Ended::Closed),
                // Any traffic (pongs, or pings the library answers) shows the peer is alive.
                Some(Ok(_)) => last_pong = Instant::now(),
            },
            _ = stop.changed() => {
                let _ = sink.close().await;
                return Ok(Ended::Stopped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Hand-computed encoding of one message (field order and wire types as protoc emits
    /// them for stat.proto).
    #[test]
    fn encodes_like_stat_proto() {
        let wsms = WireStatMessages {
            messages: vec![WireStatMessage {
                namespace: "default".into(),
                name: "hello-00001".into(),
                stat: Some(Stat {
                    pod_name: "activator-x".into(),
                    average_concurrent_requests: 1.0,
                    request_count: 1.0,
                    ..Default::default()
                }),
            }],
        };
        let mut want = String::new();
        want += "0a37"; // messages (1, LEN) of 55 bytes
        want += "0a07"; // namespace (1, LEN) 7
        want += &hex(b"default");
        want += "120b"; // name (2, LEN) 11
        want += &hex(b"hello-00001");
        want += "1a1f"; // stat (3, LEN) 31
        want += "0a0b"; // pod_name (1, LEN) 11
        want += &hex(b"activator-x");
        want += "11000000000000f03f"; // average_concurrent_requests (2, I64) 1.0
        want += "21000000000000f03f"; // request_count (4, I64) 1.0
        assert_eq!(hex(&wsms.to_bytes()), want);
        assert_eq!(
            WireStatMessages::from_bytes(&wsms.to_bytes()).unwrap(),
            wsms
        );
    }

    #[test]
    fn encodes_every_stat_field() {
        let s = Stat {
            pod_name: "p".into(),
            average_concurrent_requests: 2.5,
            average_proxied_concurrent_requests: 0.5,
            request_count: 1.0,
            proxied_request_count: 2.5,
            process_uptime: 0.5,
            timestamp: 1_700_000_000,
        };
        let want = concat!(
            "0a0170",             // pod_name "p"
            "110000000000000440", // 2: 2.5
            "19000000000000e03f", // 3: 0.5
            "21000000000000f03f", // 4: 1.0
            "290000000000000440", // 5: 2.5
            "31000000000000e03f", // 6: 0.5
            "3880e2cfaa06",       // 7 (VARINT): 1700000000
        );
        assert_eq!(hex(&s.encode_to_vec()), want);
    }

    /// An empty stat is still present on the wire (`1a 00`): the autoscaler drops messages
    /// whose stat is nil.
    #[test]
    fn empty_stat_is_kept() {
        let m = WireStatMessage {
            namespace: String::new(),
            name: "r".into(),
            stat: Some(Stat::default()),
        };
        assert_eq!(hex(&m.encode_to_vec()), "1201721a00");
        let back = WireStatMessage::decode(&m.encode_to_vec()[..]).unwrap();
        assert!(back.stat.is_some());
    }

    #[test]
    fn decodes_unknown_fields_and_rejects_garbage() {
        // namespace "a", then an unknown field 9 (VARINT 1), then name "b".
        let b = [0x0a, 0x01, b'a', 0x48, 0x01, 0x12, 0x01, b'b'];
        let m = WireStatMessage::decode(&b[..]).unwrap();
        assert_eq!((m.namespace.as_str(), m.name.as_str()), ("a", "b"));
        assert!(WireStatMessages::from_bytes(&[0x0a, 0x05, 0x01]).is_err());
    }

    fn reporter() -> (StatReporter, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let cfg = ReporterConfig {
            pod_name: "act".into(),
            ..Default::default()
        };
        let inner = Arc::new(Inner {
            cfg,
            tx,
            revs: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: watch::channel(false).0,
        });
        (StatReporter { inner }, rx)
    }

    fn sample(conc: f64, requests: u64) -> Vec<RevisionSample> {
        vec![RevisionSample {
            namespace: "ns".into(),
            revision: "rev".into(),
            concurrency: conc,
            requests,
        }]
    }

    fn conc_and_count(m: &WireStatMessage) -> (f64, f64) {
        let s = m.stat.as_ref().unwrap();
        (s.average_concurrent_requests, s.request_count)
    }

    #[test]
    fn first_activity_is_reported_at_once_then_adjusted() {
        let (r, mut rx) = reporter();
        r.sample(sample(0.0, 0));
        assert!(rx.try_recv().is_err(), "idle revisions are not reported");
        assert!(r.report().is_empty());
        // One request arrives and is held.
        r.sample(sample(1.0, 0));
        let f = rx.try_recv().unwrap();
        assert!(f.urgent);
        assert_eq!(f.msgs.len(), 1);
        assert_eq!(f.msgs[0].stat.as_ref().unwrap().pod_name, "act");
        assert_eq!(conc_and_count(&f.msgs[0]), (1.0, 1.0));
        // Not again while tracked.
        r.sample(sample(3.0, 1));
        assert!(rx.try_recv().is_err());
        // Mean of 1 and 3 less the 1 already reported; 1 request less the 1 reported.
        let rep = r.report();
        assert_eq!(rep.len(), 1);
        assert_eq!(conc_and_count(&rep[0]), (1.0, 0.0));
        // Next period: plain numbers.
        r.sample(sample(2.0, 5));
        assert_eq!(conc_and_count(&r.report()[0]), (2.0, 4.0));
        // Idle for a whole period: reported with 0 once, then untracked.
        r.sample(sample(0.0, 5));
        assert_eq!(conc_and_count(&r.report()[0]), (0.0, 0.0));
        r.sample(sample(0.0, 5));
        assert!(r.report().is_empty());
        // Activity again is a first request again.
        r.sample(sample(1.0, 5));
        assert!(rx.try_recv().unwrap().urgent);
    }

    #[test]
    fn wake_reports_once_per_activity() {
        let (r, mut rx) = reporter();
        r.wake("ns", "rev", 4.0);
        let f = rx.try_recv().unwrap();
        assert_eq!(f.msgs[0].namespace, "ns");
        assert_eq!(f.msgs[0].name, "rev");
        assert_eq!(conc_and_count(&f.msgs[0]), (4.0, 1.0));
        r.wake("ns", "rev", 4.0);
        assert!(
            rx.try_recv().is_err(),
            "a tracked revision is not woken twice"
        );
        // Sampling does not report it again either, and a wake before any sample survives
        // the sampler's pruning.
        r.sample(sample(5.0, 1));
        assert!(rx.try_recv().is_err());
        assert_eq!(conc_and_count(&r.report()[0]), (1.0, 0.0));
        assert_eq!(r.counters().wakes, 1);
        // Zero concurrency still wakes with 1 (the autoscaler pokes on non-zero only).
        r.wake("ns", "other", 0.0);
        assert_eq!(conc_and_count(&rx.try_recv().unwrap().msgs[0]), (1.0, 1.0));
    }

    #[test]
    fn revisions_that_disappear_are_idle() {
        let (r, mut rx) = reporter();
        r.sample(sample(4.0, 0));
        assert!(rx.try_recv().unwrap().urgent);
        r.sample(sample(4.0, 0));
        // Gone for the rest of the period: the mean includes the missing sample as 0.
        r.sample(Vec::new());
        r.sample(Vec::new());
        assert_eq!(conc_and_count(&r.report()[0]), (1.0, 0.0)); // (4+4+0+0)/4 - 1
        r.sample(Vec::new());
        // Idle for a whole period: one report with 0, then forgotten.
        assert_eq!(conc_and_count(&r.report()[0]), (0.0, 0.0));
        r.sample(Vec::new());
        assert!(r.report().is_empty());
        assert!(r.inner.revs.lock().unwrap().is_empty());
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let cfg = ReporterConfig::default();
        let mut b = Backoff::new(&cfg);
        let first = b.step(&cfg);
        assert!(first >= cfg.backoff_initial && first <= cfg.backoff_initial.mul_f64(1.5));
        for _ in 0..50 {
            assert!(b.step(&cfg) <= cfg.backoff_max.mul_f64(1.5));
        }
    }
}
