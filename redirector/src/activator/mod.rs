//! The node-local activator: the Proxy target of the datapath. It finds the service a
//! connection or request is for, holds it in a bounded buffer, wakes the scaler at once,
//! and forwards to an instance the moment one is ready (HTTP/1.1, h2c, gRPC, WebSocket
//! upgrades, or raw TCP for L4 services). Drains on shutdown.
#[cfg(test)]
mod bench;
mod chunks;
pub mod conns;
pub(crate) mod deadline;
#[doc(hidden)]
pub mod differential;
mod fast;
mod fast_io;
#[cfg(test)]
mod fast_tests;
#[cfg(test)]
mod hardening_tests;
mod http;
mod l4;
pub mod origdst;
pub mod queue;
mod upstream;
mod wire;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};

use crate::config::{ActivatorConfig, Protocol};
pub use queue::{Global, Instance, Instances, ServiceState};

/// Services the activator knows, by name and by VIP:port.
#[derive(Default)]
pub struct Registry {
    by_name: HashMap<String, Arc<ServiceState>>,
    by_vip: HashMap<SocketAddr, Arc<ServiceState>>,
}

impl Registry {
    pub fn insert(&mut self, svc: Arc<ServiceState>, vips: &[IpAddr], port: u16) {
        for ip in vips {
            self.by_vip.insert(SocketAddr::new(*ip, port), svc.clone());
        }
        self.by_name.insert(svc.name.clone(), svc);
    }
    pub fn get(&self, name: &str) -> Option<Arc<ServiceState>> {
        self.by_name.get(name).cloned()
    }
    pub fn by_vip(&self, vip: SocketAddr) -> Option<Arc<ServiceState>> {
        self.by_vip.get(&vip).cloned()
    }
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceState>> {
        self.by_name.values()
    }
}

/// Shared state of the activator.
pub struct Activator {
    pub registry: RwLock<Arc<Registry>>,
    pub global: Arc<Global>,
    pub limits: RwLock<ActivatorConfig>,
    /// Client connections open now (all threads), against `max_connections`.
    pub connections: Arc<conns::Count>,
    origdst: Option<origdst::OrigDst>,
    /// Per-service ports `(first, count)` and the id → VIP table behind them
    /// (`set_service_ports`).
    ports: RwLock<Option<((u16, u16), crate::control::VipsById)>>,
    shutdown: watch::Sender<bool>,
}

impl Activator {
    pub fn new(limits: ActivatorConfig, origdst: Option<origdst::OrigDst>) -> Arc<Self> {
        Arc::new(Self {
            registry: RwLock::new(Arc::new(Registry::default())),
            global: Arc::new(Global::default()),
            limits: RwLock::new(limits),
            connections: Arc::default(),
            origdst,
            ports: RwLock::new(None),
            shutdown: watch::channel(false).0,
        })
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// The service named by a request's Knative-Serving-Revision (and -Namespace) headers.
    pub fn service_by_revision(
        &self,
        namespace: Option<&str>,
        revision: &str,
    ) -> Option<Arc<ServiceState>> {
        let reg = self.registry();
        match namespace {
            Some(ns) => reg.get(&format!("{ns}/{revision}")),
            None => reg.get(revision),
        }
    }

    pub fn set_registry(&self, r: Registry) {
        if let Ok(mut g) = self.registry.write() {
            *g = Arc::new(r);
        }
    }

    fn limits(&self) -> ActivatorConfig {
        self.limits.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Connections arriving on port `first + id` are for service `id` (the datapath sends
    /// each service's flows to a port of its own: `Programmer::set_service_ports`).
    pub fn set_service_ports(&self, ports: (u16, u16), vips: crate::control::VipsById) {
        if let Ok(mut p) = self.ports.write() {
            *p = Some((ports, vips));
        }
    }

    /// The service a connection was for: from the local port it arrived on, or from the
    /// packet path's conntrack.
    fn service_of_conn(&self, local: SocketAddr, peer: SocketAddr) -> Option<Arc<ServiceState>> {
        if let Some(vip) = self.vip_of_port(local.port()) {
            return self.registry().by_vip(vip);
        }
        let vip = self.origdst.as_ref()?.lookup(local, peer)?;
        self.registry().by_vip(vip)
    }

    fn vip_of_port(&self, port: u16) -> Option<SocketAddr> {
        let p = self.ports.read().ok()?;
        let ((first, count), vips) = p.as_ref()?;
        let id = port.checked_sub(*first).filter(|i| i < count)?;
        let table = vips.read().ok()?;
        let vip = table.get(&(id as u32)).copied();
        vip
    }

    /// Accepts on `listener` until shutdown; each connection is raw TCP (L4 services) or
    /// HTTP (everything else).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.shutdown.subscribe();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let conns = tokio_util_tracker();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let (stream, peer) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of fds (or similar): back off instead of spinning.
                            tracing::warn!(error = %e, "accept");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(open) = self.connections.open(self.limits().max_connections) else {
                        drop(stream); // over the cap: closed at once (Envoy's overflow)
                        continue;
                    };
                    let guard = (conns.clone(), open);
                    let _ = stream.set_nodelay(true);
                    let local = match stream.local_addr() { Ok(a) => a, Err(_) => continue };
                    let svc = self.service_of_conn(local, peer);
                    match svc {
                        Some(svc) if svc.protocol == Protocol::Tcp => {
                            let me = self.clone();
                            tokio::spawn(async move { let _g = guard; l4::handle(me, svc, stream).await });
                        }
                        svc => fast::spawn(self.clone(), svc, stream, peer, graceful.watcher(), guard),
                    }
                }
                _ = stop.changed() => break,
            }
        }
        drop(listener);
        let deadline = self.limits().drain_timeout;
        tracing::info!(?deadline, "activator draining");
        let _ = tokio::time::timeout(deadline, graceful.shutdown()).await;
        let _ = tokio::time::timeout(deadline, wait_conns(conns)).await;
    }

    /// Stops accepting and drains (held and in-flight requests finish within the deadline).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Serves `addr` on one thread per CPU, each with its own single-threaded runtime and its
/// own `SO_REUSEPORT` listener: a request, its upstream connection and their tasks stay on
/// one thread (no cross-thread wakeups per request). Returns once every thread listens.
pub async fn spawn_listeners(act: Arc<Activator>, addr: SocketAddr) -> std::io::Result<Listeners> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = Vec::with_capacity(n);
    let mut socket = None;
    for i in 0..n {
        let (tx, rx) = tokio::sync::oneshot::channel::<std::io::Result<OwnedFd>>();
        let act = act.clone();
        let t = std::thread::Builder::new()
            .name(format!("activator-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = (|| {
                        let sock = if addr.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        sock.set_reuseaddr(true)?;
                        sock.set_reuseport(true)?;
                        sock.bind(addr)?;
                        sock.listen(4096)
                    })();
                    match listener.and_then(|l| Ok((l.as_fd().try_clone_to_owned()?, l))) {
                        Ok((fd, l)) => {
                            let _ = tx.send(Ok(fd));
                            act.serve(l).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        match rx.await {
            Ok(Ok(fd)) => {
                threads.push(t);
                socket.get_or_insert(fd);
            }
            Ok(Err(e)) => {
                let _ = t.join();
                if threads.is_empty() {
                    return Err(e);
                }
                break;
            }
            Err(_) => break,
        }
    }
    let socket = socket.ok_or_else(|| std::io::Error::other("no listener started"))?;
    Ok(Listeners { threads, socket })
}

/// The threads of `spawn_listeners` and one of their `SO_REUSEPORT` sockets (a duplicate):
/// the kernel's reuseport selection spreads what is handed to it over all of them.
pub struct Listeners {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub socket: OwnedFd,
}

/// Counts live connection tasks (an Arc held by each).
fn tokio_util_tracker() -> Arc<()> {
    Arc::new(())
}

async fn wait_conns(tracker: Arc<()>) {
    while Arc::strong_count(&tracker) > 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
