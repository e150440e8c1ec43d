//! Knative's autoscaler as the [`Waker`] of kube-sourced revisions: the stat reporter of
//! [`crate::knative`] (a websocket to the autoscaler) reports a held request at once, and
//! every second the concurrency the node-local activator sees.
use std::sync::Arc;

use super::{NoopWaker, Waker};
use crate::{
    activator::Activator,
    knative::{activator_samples, ReporterConfig, StatReporter, DEFAULT_AUTOSCALER_URL},
};

impl Waker for StatReporter {
    fn wake(&self, namespace: &str, revision: &str, concurrency: f64) {
        StatReporter::wake(self, namespace, revision, concurrency);
    }

    fn attach(&self, activator: &Arc<Activator>) {
        let (reporter, act) = (self.clone(), activator.clone());
        tokio::spawn(async move { reporter.run(move || activator_samples(&act)).await });
    }

    fn connected(&self) -> Option<bool> {
        Some(StatReporter::connected(self))
    }
}

/// The waker for `--autoscaler-url`: a stat reporter to `url`; without one, to Knative's
/// autoscaler (`ws://autoscaler.knative-serving.svc.cluster.local:8080`) when running in a
/// cluster (`KUBERNETES_SERVICE_HOST` set), else nobody. Call inside the runtime.
pub fn waker(url: Option<String>) -> Arc<dyn Waker> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
    let url = url.or_else(|| in_cluster.then(|| DEFAULT_AUTOSCALER_URL.to_owned()));
    match url {
        Some(url) => {
            tracing::info!(%url, "stat reports to Knative's autoscaler");
            Arc::new(StatReporter::start(ReporterConfig {
                url,
                ..ReporterConfig::default()
            }))
        }
        None => Arc::new(NoopWaker),
    }
}
