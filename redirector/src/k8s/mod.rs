//! Kubernetes/Knative as the source of desired state (`redirector agent --kubernetes`):
//! kube-rs watches of ServerlessServices, Services, EndpointSlices and Revisions ([`watch`]), turned
//! into map entries and activator services by pure functions ([`mapping`]), handed to the
//! agent as [`Snapshot`]s over a watch channel (so a test can publish its own), and the
//! node-local activator's side of kube-sourced services ([`registry`]): their held requests
//! wake the revision through a [`Waker`].
pub mod autoscaler;
pub mod mapping;
pub mod registry;
pub mod revision;
pub mod sks;
pub mod source;
pub mod watch;

use std::sync::Arc;

pub use mapping::{map, ActivatorService, ActivatorSource, Mapped, Snapshot};
pub use registry::KubeServices;
pub use sks::ServerlessService;
pub use source::KubeSource;
pub use watch::{ClusterWatch, SnapshotRx, SnapshotTx};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster config): {0}")]
    Client(#[source] kube::Error),
}

/// Wakes a revision whose request the node-local activator holds while no endpoint is
/// ready: the hook for Knative's autoscaler (stat messages). Called at once when a request
/// is held with nothing ready, again as more arrive; `concurrency` is what the activator
/// holds plus has in flight for the revision.
pub trait Waker: Send + Sync {
    fn wake(&self, namespace: &str, revision: &str, concurrency: f64) {
        let _ = (namespace, revision, concurrency);
    }

    /// Called once when the node-local activator exists, before any wake: a waker that also
    /// reports periodically (Knative's activator reports every second) starts here.
    fn attach(&self, activator: &Arc<crate::activator::Activator>) {
        let _ = activator;
    }

    /// Whether its connection is up, for readiness (`None`: it has none).
    fn connected(&self) -> Option<bool> {
        None
    }
}

/// Wakes nobody (the revision scales up only by Knative's own means).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopWaker;

impl Waker for NoopWaker {}

/// `--kubernetes` settings.
#[derive(Clone)]
pub struct KubeOptions {
    /// What Proxy mode leads to (`--activator node|knative`).
    pub activator: ActivatorSource,
    /// This node (`--node-name`, env NODE_NAME); informational for now.
    pub node_name: Option<String>,
    pub waker: Arc<dyn Waker>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            activator: ActivatorSource::Node,
            node_name: None,
            waker: Arc::new(NoopWaker),
        }
    }
}

impl std::fmt::Debug for KubeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeOptions")
            .field("activator", &self.activator)
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// Connects with `kube::Client::try_default()` (KUBECONFIG or ~/.kube/config, else the
/// in-cluster service account; plain `http://` servers work) and starts the watches.
pub async fn connect() -> Result<ClusterWatch, KubeError> {
    let client = kube::Client::try_default()
        .await
        .map_err(KubeError::Client)?;
    Ok(watch::start(client))
}
