//! The node-local activator's view of kube-sourced services: one [`ServiceState`] per
//! revision (`namespace/revision`), kept across snapshots so held requests keep waiting on
//! the same state, with the ready private endpoints as instances (the activator forwards to
//! pods directly). A held request with nothing ready calls the [`Waker`].
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use super::{mapping::ActivatorService, revision::RevisionSettings, Waker};
use crate::{
    activator::{Instance, Instances, ServiceState},
    config::Protocol,
};

/// How long the activator holds and forwards a request for a revision whose Revision was
/// not seen (Knative's default revision timeout).
pub const REQUEST_TIMEOUT: Duration = super::revision::DEFAULT_TIMEOUT;

struct Entry {
    protocol: Protocol,
    /// The settings applied (`None`: Knative's defaults, the Revision not seen yet).
    settings: Option<RevisionSettings>,
    /// Told the feeder's containerConcurrency (instances are rebuilt when it changes).
    concurrency: watch::Sender<u32>,
    state: Arc<ServiceState>,
    /// Endpoints Kubernetes reports ready count at once; the others are probed
    /// (`K-Network-Probe: queue`) and join as soon as they answer, like Knative's activator.
    prober: crate::knative::probe::Prober,
    waker: JoinHandle<()>,
    feeder: JoinHandle<()>,
}

/// Kube-sourced services of the activator, by `namespace/revision`.
#[derive(Default)]
pub struct KubeServices {
    entries: HashMap<String, Entry>,
}

impl Drop for KubeServices {
    fn drop(&mut self) {
        for e in self.entries.values() {
            e.waker.abort();
        }
    }
}

/// What the activator registry needs of one service.
pub struct RegistryEntry {
    pub state: Arc<ServiceState>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    /// Its pods' addresses, switched like the VIPs while it is proxied.
    pub endpoints: Vec<SocketAddr>,
}

impl KubeServices {
    /// Brings the states in line with `services`; returns what the registry should hold.
    pub fn sync(
        &mut self,
        services: &[ActivatorService],
        waker: &Arc<dyn Waker>,
    ) -> Vec<RegistryEntry> {
        let mut out = Vec::with_capacity(services.len());
        let mut keep = std::collections::HashSet::new();
        for s in services {
            if !keep.insert(s.name.as_str()) {
                continue; // two SKS for one revision: the first (sorted) wins
            }
            let reuse = self
                .entries
                .get(&s.name)
                .is_some_and(|e| e.protocol == s.protocol);
            if !reuse {
                if let Some(old) = self.entries.remove(&s.name) {
                    old.waker.abort();
                    old.feeder.abort();
                }
                let (tx, rx) = watch::channel::<Instances>(Arc::new(Vec::new()));
                let wake = Arc::new(Notify::new());
                let state = Arc::new(ServiceState::new(
                    s.name.clone(),
                    s.protocol,
                    REQUEST_TIMEOUT,
                    0,
                    rx,
                    wake.clone(),
                ));
                // Knative's activator answers a queue timeout with 503.
                state.set_knative_queue_timeout();
                let (cc_tx, cc_rx) = watch::channel(0u32);
                let task = spawn_waker(
                    Arc::downgrade(&state),
                    wake,
                    s.namespace.clone(),
                    s.revision.clone(),
                    waker.clone(),
                );
                let prober =
                    crate::knative::probe::Prober::new(crate::knative::probe::ProbeConfig {
                        trust_ready: true,
                        ..Default::default()
                    });
                let feeder = spawn_feeder(prober.subscribe(), cc_rx, tx);
                self.entries.insert(
                    s.name.clone(),
                    Entry {
                        protocol: s.protocol,
                        settings: None,
                        concurrency: cc_tx,
                        state,
                        prober,
                        waker: task,
                        feeder,
                    },
                );
            }
            let Some(e) = self.entries.get_mut(&s.name) else {
                continue;
            };
            if e.settings != s.settings {
                let set = s.settings.unwrap_or_default();
                e.state.set_limits(
                    set.container_concurrency,
                    set.timeout,
                    set.response_start_timeout,
                    set.idle_timeout,
                );
                e.concurrency.send_replace(set.container_concurrency);
                if s.settings.is_some() {
                    tracing::debug!(
                        revision = %s.name,
                        container_concurrency = set.container_concurrency,
                        timeout_secs = set.timeout.as_secs(),
                        response_start_timeout_secs = set.response_start_timeout.as_secs(),
                        readiness_gated = set.readiness_gated,
                        "the Revision's settings applied"
                    );
                }
                e.settings = s.settings;
            }
            e.prober
                .set_endpoints(s.instances.iter().copied(), s.pending.iter().copied());
            out.push(RegistryEntry {
                state: e.state.clone(),
                vips: s.vips.clone(),
                ports: s.ports.clone(),
                endpoints: s.endpoints.clone(),
            });
        }
        self.entries.retain(|name, e| {
            let k = keep.contains(name.as_str());
            if !k {
                e.waker.abort();
                e.feeder.abort();
            }
            k
        });
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Feeds the prober's ready set to the activator, keeping the in-flight counts of instances
/// that stay; instances are made anew (with their slots) when containerConcurrency changes.
fn spawn_feeder(
    mut ready: watch::Receiver<Arc<Vec<SocketAddr>>>,
    mut concurrency: watch::Receiver<u32>,
    tx: watch::Sender<Instances>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let set = ready.borrow_and_update().clone();
            let cc = *concurrency.borrow_and_update();
            let current = tx.borrow().clone();
            let same = current.len() == set.len()
                && current
                    .iter()
                    .zip(set.iter())
                    .all(|(i, a)| i.addr == *a && i.concurrency == cc);
            if !same {
                let by_addr: HashMap<SocketAddr, &Arc<Instance>> = current
                    .iter()
                    .filter(|i| i.concurrency == cc)
                    .map(|i| (i.addr, i))
                    .collect();
                let next: Vec<Arc<Instance>> = set
                    .iter()
                    .map(|a| {
                        by_addr
                            .get(a)
                            .map(|i| Arc::clone(i))
                            .unwrap_or_else(|| Instance::new(*a, cc))
                    })
                    .collect();
                let _ = tx.send(Arc::new(next));
            }
            tokio::select! {
                r = ready.changed() => if r.is_err() { return },
                r = concurrency.changed() => if r.is_err() { return },
            }
        }
    })
}

/// Calls the waker whenever the activator rings the service's wake bell with nothing ready.
fn spawn_waker(
    state: Weak<ServiceState>,
    wake: Arc<Notify>,
    namespace: String,
    revision: String,
    waker: Arc<dyn Waker>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let Some(st) = state.upgrade() else { return };
            if st.cold() {
                tracing::debug!(service = %st.name, concurrency = st.concurrency(), "waking the revision");
                waker.wake(&namespace, &revision, st.concurrency() as f64);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, String, f64)>>);
    impl Waker for Recorder {
        fn wake(&self, namespace: &str, revision: &str, concurrency: f64) {
            self.0
                .lock()
                .unwrap()
                .push((namespace.into(), revision.into(), concurrency));
        }
    }

    fn svc(instances: &[&str]) -> ActivatorService {
        ActivatorService {
            name: "ns/rev-1".into(),
            namespace: "ns".into(),
            revision: "rev-1".into(),
            sks: "ns/rev-1".into(),
            protocol: Protocol::Http,
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![80],
            instances: instances.iter().map(|a| a.parse().unwrap()).collect(),
            pending: Vec::new(),
            settings: None,
            endpoints: Vec::new(),
        }
    }

    #[tokio::test]
    async fn states_persist_and_held_requests_wake_the_revision() {
        let rec = Arc::new(Recorder::default());
        let waker: Arc<dyn Waker> = rec.clone();
        let mut k = KubeServices::default();
        let first = k.sync(&[svc(&[])], &waker);
        let st = first[0].state.clone();
        assert!(st.cold());
        // A held request: acquire() rings the bell and waits.
        let held = {
            let st = st.clone();
            tokio::spawn(async move { st.acquire().await.instance.addr })
        };
        for _ in 0..100 {
            if !rec.0.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rec.0.lock().unwrap()[0].0, "ns");
        assert_eq!(rec.0.lock().unwrap()[0].1, "rev-1");
        // Endpoints become ready: same state, the held request goes through.
        let second = k.sync(&[svc(&["10.244.1.5:8012"])], &waker);
        assert!(Arc::ptr_eq(&second[0].state, &st));
        let addr = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(addr, "10.244.1.5:8012".parse().unwrap());
        // Gone from the cluster: gone from the registry.
        assert!(k.sync(&[], &waker).is_empty());
        assert!(k.is_empty());
    }

    /// A Revision's containerConcurrency seen after the SKS: the same state takes the limit,
    /// its instances get their slots, and the timeouts follow.
    #[tokio::test]
    async fn revision_settings_apply_in_place() {
        let waker: Arc<dyn Waker> = Arc::new(Recorder::default());
        let mut k = KubeServices::default();
        let first = k.sync(&[svc(&["10.244.1.5:8012"])], &waker);
        let st = first[0].state.clone();
        let mut with = svc(&["10.244.1.5:8012"]);
        with.settings = Some(RevisionSettings {
            container_concurrency: 1,
            timeout: Duration::from_secs(30),
            response_start_timeout: Duration::from_secs(5),
            ..Default::default()
        });
        let second = k.sync(&[with], &waker);
        assert!(Arc::ptr_eq(&second[0].state, &st));
        assert_eq!(st.container_concurrency(), 1);
        assert_eq!(st.timeout(), Duration::from_secs(30));
        assert_eq!(st.response_start_timeout(), Duration::from_secs(5));
        for _ in 0..200 {
            let set = st.instances.borrow().clone();
            if !set.is_empty() && set.iter().all(|i| i.concurrency == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let one = st.try_acquire().expect("a free slot");
        assert!(st.try_acquire().is_none(), "one request in flight per pod");
        drop(one);
        assert!(st.try_acquire().is_some());
    }
}
