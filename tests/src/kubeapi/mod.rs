//! A test Kubernetes API server: the real list/watch protocol over plain HTTP for the
//! resources a real cluster with Knative serves, backed by an in-memory store (see
//! [`store`]).
//!
//! - Served resources ([`registry`]): the built-ins the agent and the tests use (core v1
//!   services, endpoints, pods, nodes, namespaces, configmaps, events; discovery.k8s.io/v1
//!   endpointslices; coordination.k8s.io/v1 leases; events.k8s.io/v1 events) and Knative's
//!   CRDs read from their real files (`KNATIVE_CRD_DIR`, default
//!   `<workspace>/../shared/knative`; a missing file fails [`ApiServer::start`]): SKS
//!   (networking.internal.knative.dev/v1alpha1) and Revision (serving.knative.dev/v1). Any
//!   other resource, group or version answers 404 with a `NotFound` `Status`, like the real
//!   server; [`ApiServer::register`] serves more.
//! - The status subresource: a write to the main resource keeps the stored `.status` (a
//!   create drops it), `PUT`/`PATCH .../status` changes only `.status`
//!   ([`ApiServer::update_status`], [`ApiServer::patch_status`]); 404 on `/status` of a
//!   resource without one.
//! - CRD schemas ([`schema`]): unknown fields are pruned, a wrong type or a missing
//!   required field answers 422 `Invalid`.
//!
//! - `GET /api/v1/{resource}`, `/api/v1/namespaces/{ns}/{resource}`,
//!   `/apis/{group}/{version}/{resource}` and the namespaced form: `{kind}List` with
//!   `metadata.resourceVersion` (one global, monotonically increasing counter; every object
//!   carries the version of its last write), `limit`/`continue` paging, `labelSelector` and
//!   `fieldSelector`.
//! - `?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T`:
//!   newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":...}` events after
//!   N, replayed from a bounded history, then live; a BOOKMARK every
//!   [`ApiServer::set_bookmark_interval`]; an `ERROR` event with a `Status` of code 410 when N
//!   is older than the history (or [`ApiServer::force_gone`] says so), the way the real API
//!   server answers a too-old resourceVersion. `sendInitialEvents=true` (streaming lists) is
//!   supported too.
//! - get / create (POST) / replace (PUT, also `/status`) / merge patch / delete of single
//!   objects, so an agent that records Events or patches status does not fail.
//! - `GET /version`, `/api`, `/apis`, `/apis/{group}`, `/api/v1`, `/apis/{group}/{version}`
//!   list exactly the served resources (verbs, scope, kind, `*/status` entries).
//!
//! The server runs on its own thread with a current-thread tokio runtime, optionally inside a
//! network namespace (`setns` before binding `127.0.0.1`), so an agent started with
//! `nsenter --net=/run/netns/<node>` reaches it on its loopback. [`ApiServer::stop`] and
//! [`ApiServer::start_again`] simulate an API server restart (same port, same store: every
//! open watch is cut).
pub mod autoscaler;
pub mod error;
pub mod http;
pub mod node;
pub mod objects;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod store;
pub mod watches;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

pub use store::{ApiError, Res, Store, TypeInfo};

/// One request the server answered (for assertions on what the client asked).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

impl RequestRecord {
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

/// State shared by the server thread(s) and the test.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Bumped (to the store's resourceVersion) on every write; watches wait on it.
    pub changed: watch::Sender<u64>,
    pub bookmark_interval: Mutex<Duration>,
    /// Answer a too-old watch with HTTP 410 instead of a 200 + ERROR event.
    pub gone_as_http: Mutex<bool>,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub active_watches: AtomicUsize,
    /// Watches answered with 410 Gone so far.
    pub gone: AtomicUsize,
    /// Resources (plural names) whose requests are answered 403 Forbidden, as RBAC would.
    pub forbidden: Mutex<Vec<String>>,
}

impl Shared {
    /// Runs a write on the store and wakes the watches.
    pub fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut st = self.store.lock().unwrap();
        let r = f(&mut st);
        let rv = st.resource_version();
        drop(st);
        self.changed.send_replace(rv);
        r
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// The test API server. Dropping it stops the server thread.
pub struct ApiServer {
    pub shared: Arc<Shared>,
    netns: Option<String>,
    port: u16,
    running: Mutex<Option<Running>>,
}

fn enter_netns(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening /run/netns/{ns}"))?;
    // SAFETY: setns on an open namespace fd; only this (server) thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kubeapi: listener: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::handle(shared, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` (a free port) in the current network namespace.
    pub fn start() -> Result<Self> {
        Self::start_in(None)
    }

    /// Starts a server on `127.0.0.1` inside network namespace `/run/netns/<netns>`.
    pub fn start_in(netns: Option<&str>) -> Result<Self> {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()?),
            changed,
            bookmark_interval: Mutex::new(Duration::from_secs(2)),
            gone_as_http: Mutex::new(false),
            requests: Mutex::new(Vec::new()),
            active_watches: AtomicUsize::new(0),
            gone: AtomicUsize::new(0),
            forbidden: Mutex::new(Vec::new()),
        });
        let mut s = ApiServer {
            shared,
            netns: netns.map(str::to_owned),
            port: 0,
            running: Mutex::new(None),
        };
        s.port = s.spawn()?;
        Ok(s)
    }

    fn spawn(&self) -> Result<u16> {
        let (tx, rx) = std_mpsc::channel::<Result<u16>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = self.shared.clone();
        let netns = self.netns.clone();
        let port = self.port;
        let thread = std::thread::Builder::new()
            .name("kubeapi".into())
            .spawn(move || {
                let setup = || -> Result<(TcpListener, tokio::runtime::Runtime)> {
                    if let Some(ns) = &netns {
                        enter_netns(ns)?;
                    }
                    let addr = SocketAddr::from(([127, 0, 0, 1], port));
                    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
                    l.set_nonblocking(true)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    Ok((l, rt))
                };
                let (listener, rt) = match setup() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(listener.local_addr().map(|a| a.port()).unwrap_or(0)));
                rt.block_on(serve(shared, listener, stop_rx));
                // Dropping the runtime drops every connection task: open watches are cut.
                rt.shutdown_timeout(Duration::from_millis(200));
            })?;
        let port = rx
            .recv()
            .context("the API server thread died")?
            .context("starting the test API server")?;
        *self.running.lock().unwrap() = Some(Running {
            stop: stop_tx,
            thread,
        });
        Ok(port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Stops the server: the listener closes and every connection (open watches too) is
    /// cut. The store is kept.
    pub fn stop(&self) {
        if let Some(r) = self.running.lock().unwrap().take() {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }

    /// Starts the server again on the same port (after [`Self::stop`]).
    pub fn start_again(&self) -> Result<()> {
        if self.is_running() {
            bail!("the API server is running");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops, compacts the history (every resourceVersion handed out so far answers 410 Gone
    /// to a watch, like a real API server whose watch cache restarted), and starts again.
    pub fn restart_with_gone(&self) -> Result<()> {
        self.stop();
        self.expire_history();
        self.start_again()
    }

    // --- knobs ---------------------------------------------------------------------------

    /// The next `n` watches that name a resourceVersion get 410 Gone.
    pub fn force_gone(&self, n: u32) {
        self.shared.store.lock().unwrap().force_gone = n;
    }

    /// Compacts the history now (see [`Store::expire_history`]).
    pub fn expire_history(&self) {
        self.shared
            .mutate(|s| {
                s.expire_history();
                Ok(())
            })
            .ok();
    }

    /// How many watch events are kept for resuming watches (default 1000).
    pub fn set_history_limit(&self, n: usize) {
        self.shared.store.lock().unwrap().history_limit = n;
    }

    /// Interval of BOOKMARK events on watches that allow them (default 2 s; applies to new
    /// watches).
    pub fn set_bookmark_interval(&self, d: Duration) {
        *self.shared.bookmark_interval.lock().unwrap() = d;
    }

    /// Answer too-old watches with an HTTP 410 response instead of a 200 + ERROR event.
    /// Answers every request for `resource` (plural) with 403 Forbidden while `on`, as the
    /// real API server does without an RBAC grant.
    pub fn set_forbidden(&self, resource: &str, on: bool) {
        let mut f = self.shared.forbidden.lock().unwrap();
        f.retain(|r| r != resource);
        if on {
            f.push(resource.to_owned());
        }
    }

    pub fn set_gone_as_http(&self, on: bool) {
        *self.shared.gone_as_http.lock().unwrap() = on;
    }

    /// Serves one more resource (kind, scope; no status subresource, no schema), for lists,
    /// watches, writes and discovery. Unregistered resources answer 404.
    pub fn register(&self, res: Res, kind: &str, namespaced: bool) {
        self.shared
            .store
            .lock()
            .unwrap()
            .register(res, TypeInfo::simple(kind, namespaced, &[], false));
    }

    /// Serves the resource versions of a CRD file (YAML), as `kubectl apply -f` of it would.
    pub fn register_crd(&self, path: &Path) -> Result<()> {
        let types = registry::load_crd(path)?;
        let mut st = self.shared.store.lock().unwrap();
        for (res, ty) in types {
            st.register(res, ty);
        }
        Ok(())
    }

    // --- objects -------------------------------------------------------------------------

    /// Creates an object (namespace from `metadata.namespace`, else "default").
    pub fn create(&self, res: &Res, obj: Value) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.create(res, "", obj))?)
    }

    /// Creates an object and then writes its `.status` through the status subresource, as
    /// a controller does (a create alone drops the status of a resource with `/status`).
    pub fn create_with_status(&self, res: &Res, obj: Value) -> Result<Value> {
        let created = self.create(res, obj.clone())?;
        if obj.get("status").is_none() || !self.shared.store.lock().unwrap().type_of(res)?.status {
            return Ok(created);
        }
        let mut with_status = created;
        with_status["status"] = obj["status"].clone();
        self.update_status(res, with_status)
    }

    /// Creates or replaces an object.
    pub fn apply(&self, res: &Res, obj: Value) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.apply(res, "", obj))?)
    }

    /// Replaces an existing object (a `metadata.resourceVersion` in `obj` must match).
    pub fn update(&self, res: &Res, obj: Value) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.update(res, "", obj))?)
    }

    /// Replaces the `.status` of an existing object (the `/status` subresource: nothing
    /// else changes), as a controller writes status.
    pub fn update_status(&self, res: &Res, obj: Value) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.update_status(res, "", obj))?)
    }

    /// JSON merge patch of the `/status` subresource (only `.status` changes).
    pub fn patch_status(&self, res: &Res, ns: &str, name: &str, patch: Value) -> Result<Value> {
        Ok(self
            .shared
            .mutate(|s| s.patch_status(res, ns, name, &patch))?)
    }

    /// JSON merge patch of an existing object.
    pub fn patch(&self, res: &Res, ns: &str, name: &str, patch: Value) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.patch(res, ns, name, &patch))?)
    }

    pub fn delete(&self, res: &Res, ns: &str, name: &str) -> Result<Value> {
        Ok(self.shared.mutate(|s| s.delete(res, ns, name))?)
    }

    pub fn get(&self, res: &Res, ns: &str, name: &str) -> Option<Value> {
        self.shared.store.lock().unwrap().get(res, ns, name)
    }

    /// Objects of `res` (in `ns`, or all namespaces).
    pub fn list(&self, res: &Res, ns: Option<&str>) -> Vec<Value> {
        let st = self.shared.store.lock().unwrap();
        st.select(res, ns, &Default::default(), None)
            .into_iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    // --- observation ---------------------------------------------------------------------

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Watches answered with 410 Gone (too old a resourceVersion, or forced) so far.
    pub fn gone_count(&self) -> usize {
        self.shared.gone.load(Ordering::Relaxed)
    }

    /// Watches currently streaming.
    pub fn active_watches(&self) -> usize {
        self.shared.active_watches.load(Ordering::Relaxed)
    }

    /// A kubeconfig (JSON, which is YAML) for this server: one cluster at [`Self::url`],
    /// no auth, namespace "default".
    pub fn kubeconfig(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url()}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test",
                          "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
            "current-context": "test",
            "preferences": {},
        })
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.kubeconfig())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
