//! A test cluster that carries traffic the way Knative's data path does (issue 14, "ingress
//! traffic through the switch"): a Kourier-like gateway pod ([`gateway`]) that routes by
//! `Host` to the addresses of a revision's *public* EndpointSlices (watched with kube-rs's
//! reflector, as net-kourier's informer does) and adds `Knative-Serving-Revision` /
//! `Knative-Serving-Namespace`; a stand-in of Knative's SKS reconciler ([`sks`]) that
//! rewrites those public slices after a propagation delay when `spec.mode` flips (Knative's
//! activator endpoints in Proxy, the ready private endpoints in Serve); in-process HTTP
//! servers for revision pods and for Knative's activator ([`backend`]) that count requests
//! and report the peer; and a load loop through the gateway with a per-flip analysis
//! ([`load`]). [`cluster`] puts them together on one node (the `ingress` tests and the
//! `flip` perf scenario). Everything runs on threads `setns`ed into the [`KubeNode`]'s
//! namespaces.
//!
//! [`KubeNode`]: crate::kubeapi::node::KubeNode
pub mod backend;
pub mod cluster;
pub mod gateway;
pub mod load;
pub mod sks;

use std::{future::Future, thread::JoinHandle, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use tokio::sync::oneshot;

/// A future running on its own thread (a current-thread tokio runtime) inside a network
/// namespace; stopped and joined on drop.
pub struct Task {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Task {
    /// Spawns thread `name`, `setns`es it into `/run/netns/<netns>`, builds a runtime and
    /// runs `make` inside it (sockets it opens belong to that namespace); the future it
    /// returns then runs until the task is dropped. An error from `make` is returned here.
    pub fn spawn<Fut>(
        name: &str,
        netns: &str,
        make: impl FnOnce() -> Result<Fut> + Send + 'static,
    ) -> Result<Task>
    where
        Fut: Future<Output = ()> + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let netns = netns.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, Fut)> {
                    crate::coldstart::net::enter(&netns)
                        .with_context(|| format!("setns into {netns}"))?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let fut = {
                        let _g = rt.enter();
                        make()?
                    };
                    Ok((rt, fut))
                };
                let (rt, fut) = match setup() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                rt.block_on(async move {
                    tokio::select! {
                        _ = fut => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("thread {name} died while starting"))??;
        Ok(Task {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A kube-rs client for the test API server at `url` (plain HTTP, no auth). Call inside a
/// runtime (as in [`Task::spawn`]'s `make`).
pub fn kube_client(url: &str) -> Result<kube::Client> {
    let uri: hyper::Uri = url.parse().context("the API server's URL")?;
    let mut cfg = kube::Config::new(uri);
    cfg.read_timeout = Some(Duration::from_secs(300));
    Ok(kube::Client::try_from(cfg)?)
}

/// The host a route of revision `rev` in `ns` answers to (`<rev>.<ns>.example.com`).
pub fn host(rev: &str, ns: &str) -> String {
    format!("{rev}.{ns}.example.com")
}
