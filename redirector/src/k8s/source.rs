//! The agent's side of `--kubernetes`: the latest snapshot from the watches (or from a
//! test's channel), mapped with the node's settings, and logged per SKS as it changes.
use std::{net::SocketAddr, sync::Arc};

use super::{
    mapping::{self, Mapped, SksSummary, Snapshot},
    watch::{ClusterWatch, SnapshotRx},
    KubeError, KubeOptions,
};
use crate::{config::Config, control::DesiredService, serving::Serving};

/// More changed SKS than this in one snapshot are logged as a count only.
const LOG_EACH_UP_TO: usize = 50;

pub struct KubeSource {
    pub opts: KubeOptions,
    watch: ClusterWatch,
    snapshot: Option<Arc<Snapshot>>,
    mapped: Option<Mapped>,
    /// Revisions without a Revision object at the last mapping (logged when it changes).
    unseen: usize,
}

impl KubeSource {
    /// Connects to the API server (`kube::Client::try_default()`) and starts the watches.
    pub async fn connect(opts: KubeOptions) -> Result<Self, KubeError> {
        tracing::info!(activator = ?opts.activator, node = opts.node_name.as_deref().unwrap_or("-"), "watching ServerlessServices, Services and EndpointSlices");
        let watch = super::connect().await?;
        Ok(Self::new(opts, watch))
    }

    /// A source fed by `snapshots` (a test's, or [`super::watch::start`]'s).
    pub fn from_channel(opts: KubeOptions, snapshots: SnapshotRx) -> Self {
        Self::new(opts, ClusterWatch::from_receiver(snapshots))
    }

    fn new(opts: KubeOptions, watch: ClusterWatch) -> Self {
        Self {
            opts,
            watch,
            snapshot: None,
            mapped: None,
            unseen: 0,
        }
    }

    /// Waits for the next published snapshot (forever once the publisher is gone).
    pub async fn changed(&mut self) {
        if self.watch.snapshots.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.snapshot = self.watch.snapshots.borrow_and_update().clone();
    }

    /// Maps the latest snapshot with the node's activator addresses. False while nothing
    /// was listed yet.
    pub fn remap(&mut self, node_activators: &[SocketAddr]) -> bool {
        let Some(snap) = &self.snapshot else {
            return false;
        };
        let m = mapping::map(snap, node_activators, self.opts.activator);
        log_changes(self.mapped.as_ref().map(|m| &m.summary), &m.summary);
        let unseen = m.activator.iter().filter(|a| a.settings.is_none()).count();
        if unseen != self.unseen {
            if unseen > 0 {
                tracing::info!(
                    revisions = unseen,
                    "Revision objects not seen (yet): Knative's defaults for them (containerConcurrency 0, timeoutSeconds 300)"
                );
            } else {
                tracing::info!("every revision's settings come from its Revision object");
            }
            self.unseen = unseen;
        }
        self.mapped = Some(m);
        true
    }

    /// Shutdown: the proxied services' entries leading to Knative's activators
    /// (`knative-serving/activator-service`) instead of this node's, which is about to stop
    /// listening, so that new Proxy connections are not refused until the next agent listens.
    /// The desired state and how many services were handed over; `None` when there is
    /// nothing to hand over to (already Knative's, nothing listed, no ready activator).
    pub fn hand_over(
        &self,
        node_activators: &[SocketAddr],
    ) -> Option<(Vec<DesiredService>, usize)> {
        if self.opts.activator != mapping::ActivatorSource::Node {
            return None;
        }
        let snap = self.snapshot.as_ref()?;
        let m = mapping::map(snap, node_activators, mapping::ActivatorSource::Knative);
        let handed = m
            .desired
            .iter()
            .filter(|d| d.mode == redirector_common::MODE_PROXY && !d.proxy.is_empty())
            .count();
        (handed > 0).then_some((m.desired, handed))
    }

    /// The desired map state; `None` until the cluster has been listed (never an empty
    /// state for lack of data).
    pub fn desired(&self) -> Option<&[DesiredService]> {
        self.mapped.as_ref().map(|m| m.desired.as_slice())
    }

    /// Feeds the activator registry with the kube-sourced services.
    pub fn sync_serving(&self, serving: &mut Serving, cfg: &Config) {
        let services = self
            .mapped
            .as_ref()
            .map(|m| m.activator.as_slice())
            .unwrap_or_default();
        serving.sync_kube(cfg, services, &self.opts.waker);
    }

    /// How many SKS the last mapping holds (`None` before the first list).
    pub fn sks_count(&self) -> Option<usize> {
        self.mapped.as_ref().map(|m| m.summary.len())
    }
}

/// Desired map state: the cluster's (`None` until it has been listed: never an empty state
/// for lack of data), or without `--kubernetes` the config's.
pub fn desired(
    kube: &Option<KubeSource>,
    serving: &Serving,
    cfg: &Config,
) -> Option<Vec<DesiredService>> {
    match kube {
        Some(k) => k.desired().map(<[DesiredService]>::to_vec),
        None => Some(serving.desired(cfg)),
    }
}

/// Waits for the cluster's next snapshot; never returns without `--kubernetes`.
pub async fn kube_changed(kube: &mut Option<KubeSource>) {
    match kube {
        Some(k) => k.changed().await,
        None => std::future::pending().await,
    }
}

fn log_changes(
    old: Option<&std::collections::BTreeMap<String, SksSummary>>,
    new: &std::collections::BTreeMap<String, SksSummary>,
) {
    let empty = Default::default();
    let old = old.unwrap_or(&empty);
    let changed: Vec<(&String, &SksSummary)> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .collect();
    let removed: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    if changed.len() + removed.len() > LOG_EACH_UP_TO {
        tracing::info!(
            changed = changed.len(),
            removed = removed.len(),
            total = new.len(),
            "SKS changed"
        );
        return;
    }
    for (name, s) in changed {
        let was = old.get(name);
        tracing::info!(
            sks = %name,
            mode = ?s.mode,
            was = ?was.map(|w| w.mode),
            vips = s.vips,
            ready_endpoints = s.ready,
            activators = s.activators,
            "SKS {}",
            match was {
                None => "added",
                Some(w) if w.mode != s.mode => "flipped",
                Some(_) => "updated",
            }
        );
    }
    for name in removed {
        tracing::info!(sks = %name, "SKS removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test drives the source through its channel; nothing (not even an empty state) is
    /// desired before the first snapshot.
    #[tokio::test]
    async fn nothing_desired_before_the_first_snapshot() {
        let (tx, rx) = super::super::watch::channel();
        let mut s = KubeSource::from_channel(KubeOptions::default(), rx);
        assert!(!s.remap(&[]));
        assert!(s.desired().is_none());
        let snap = Snapshot {
            sks: vec![crate::k8s::mapping::tests::sks(
                "ns", "r-1", "Proxy", "http1", 0,
            )],
            services: vec![crate::k8s::mapping::tests::service(
                "ns",
                "r-1",
                &["10.96.0.9"],
                &[("http", 80)],
            )],
            slices: vec![],
            revisions: vec![],
        };
        tx.send(Some(Arc::new(snap))).unwrap();
        s.changed().await;
        assert!(s.remap(&["10.244.0.1:8012".parse().unwrap()]));
        let d = s.desired().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "ns/r-1");
        assert_eq!(s.sks_count(), Some(1));
    }
}
