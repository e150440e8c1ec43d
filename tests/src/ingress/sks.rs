//! A stand-in of Knative's SKS reconciler for the public side: it watches the
//! ServerlessServices and the EndpointSlices (kube-rs reflectors) and keeps each revision's
//! PUBLIC EndpointSlice (`<rev>-public-x`, label `kubernetes.io/service-name=<rev>`, port
//! `http` 8012) at Knative's activator endpoints in Proxy and at the ready private endpoints
//! in Serve (in Serve without a ready endpoint, at the activators, as Knative falls back).
//! Each change is written `delay` after it is seen, standing for the time a real ingress
//! takes to learn of it (default 1 s). IPv4 endpoints only.
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};

use super::{gateway, kube_client, Task};
use crate::kubeapi::{
    node::KubeNode,
    objects::{self, Ep, ACTIVATOR_SERVICE, KNATIVE_NS, QUEUE_PORT},
};

/// The default propagation delay.
pub const DEFAULT_DELAY: Duration = Duration::from_secs(1);

/// One write of a public EndpointSlice.
#[derive(Debug, Clone)]
pub struct PublicWrite {
    pub ns: String,
    pub revision: String,
    /// `spec.mode` when the change was seen.
    pub mode: String,
    pub ips: Vec<IpAddr>,
    /// When the reconciler saw the change, when it started writing the slice (the API
    /// server stored it after this) and when the write returned.
    pub seen: Instant,
    pub started: Instant,
    pub written: Instant,
}

/// The running reconciler; stops on drop.
pub struct Reconciler {
    writes: Arc<Mutex<Vec<PublicWrite>>>,
    _task: Task,
}

/// The public slice's name for revision `rev`.
pub fn public_slice_name(rev: &str) -> String {
    format!("{rev}-public-x")
}

fn sks_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            "networking.internal.knative.dev",
            "v1alpha1",
            "ServerlessService",
        ),
        "serverlessservices",
    )
}

fn ips(slices: &[Arc<EndpointSlice>], ns: &str, service: &str) -> Vec<IpAddr> {
    gateway::addresses(slices, ns, service)
        .into_iter()
        .map(|a| a.ip())
        .filter(IpAddr::is_ipv4)
        .collect()
}

/// What the public slice of each SKS should hold now: `(ns, rev) -> (mode, ips)`.
fn desired(
    sks: &[Arc<DynamicObject>],
    slices: &[Arc<EndpointSlice>],
) -> BTreeMap<(String, String), (String, Vec<IpAddr>)> {
    let activators = ips(slices, KNATIVE_NS, ACTIVATOR_SERVICE);
    let mut out = BTreeMap::new();
    for s in sks {
        let (Some(ns), Some(name)) = (s.metadata.namespace.clone(), s.metadata.name.clone()) else {
            continue;
        };
        let mode = s.data["spec"]["mode"]
            .as_str()
            .unwrap_or("Serve")
            .to_owned();
        let private = s.data["status"]["privateServiceName"]
            .as_str()
            .map_or_else(|| objects::private_name(&name), str::to_owned);
        let ready = ips(slices, &ns, &private);
        let target = if mode == "Proxy" || ready.is_empty() {
            activators.clone()
        } else {
            ready
        };
        out.insert((ns, name), (mode, target));
    }
    out
}

async fn write(client: &Client, ns: &str, rev: &str, ips: &[IpAddr]) -> Result<()> {
    let eps: Vec<Ep> = ips.iter().map(|ip| Ep::ready(*ip)).collect();
    let name = public_slice_name(rev);
    let obj = objects::endpoint_slice(ns, rev, &name, &eps, &[("http", QUEUE_PORT)]);
    let obj: EndpointSlice = serde_json::from_value(obj)?;
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    match api.replace(&name, &PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            api.create(&PostParams::default(), &obj).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

type Pending = VecDeque<(Instant, (String, String), String, Vec<IpAddr>, Instant)>;

impl Reconciler {
    /// Starts the reconciler against node `k`'s API server.
    pub fn start(k: &KubeNode, delay: Duration) -> Result<Reconciler> {
        let writes: Arc<Mutex<Vec<PublicWrite>>> = Arc::default();
        let w = writes.clone();
        let url = k.api.url();
        let task = Task::spawn("sks-reconciler", &k.node.name, move || {
            let client = kube_client(&url)?;
            let ar = sks_resource();
            let sks_w = reflector::store::Writer::<DynamicObject>::new(ar.clone());
            let sks = sks_w.as_reader();
            let sks_api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let sks_stream = reflector(sks_w, watcher(sks_api, Default::default()))
                .default_backoff()
                .touched_objects();
            let (eps, eps_w) = reflector::store::<EndpointSlice>();
            let eps_api: Api<EndpointSlice> = Api::all(client.clone());
            let eps_stream = reflector(eps_w, watcher(eps_api, Default::default()))
                .default_backoff()
                .touched_objects();
            Ok(async move {
                tokio::spawn(async move {
                    let mut s = std::pin::pin!(sks_stream);
                    while s.next().await.is_some() {}
                });
                tokio::spawn(async move {
                    let mut s = std::pin::pin!(eps_stream);
                    while s.next().await.is_some() {}
                });
                let _ = sks.wait_until_ready().await;
                let _ = eps.wait_until_ready().await;
                let mut scheduled: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
                let mut pending: Pending = VecDeque::new();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    for (key, (mode, ips)) in desired(&sks.state(), &eps.state()) {
                        if scheduled.get(&key) != Some(&ips) {
                            scheduled.insert(key.clone(), ips.clone());
                            pending.push_back((now + delay, key, mode, ips, now));
                        }
                    }
                    while pending.front().is_some_and(|p| p.0 <= Instant::now()) {
                        let Some((due, (ns, rev), mode, ips, seen)) = pending.pop_front() else {
                            break;
                        };
                        let started = Instant::now();
                        if let Err(e) = write(&client, &ns, &rev, &ips).await {
                            // Retried on the next tick, in order.
                            eprintln!("sks reconciler: writing {ns}/{rev}: {e:#}");
                            pending.push_front((due, (ns, rev), mode, ips, seen));
                            break;
                        }
                        let written = Instant::now();
                        w.lock().unwrap().push(PublicWrite {
                            ns,
                            revision: rev,
                            mode,
                            ips,
                            seen,
                            started,
                            written,
                        });
                    }
                }
            })
        })?;
        Ok(Reconciler {
            writes,
            _task: task,
        })
    }

    /// Every public slice write so far.
    pub fn writes(&self) -> Vec<PublicWrite> {
        self.writes.lock().unwrap().clone()
    }

    /// The first write of `ns/rev` in `mode` at or after `since`.
    pub fn write_after(
        &self,
        ns: &str,
        rev: &str,
        mode: &str,
        since: Instant,
    ) -> Option<PublicWrite> {
        self.writes()
            .into_iter()
            .find(|w| w.ns == ns && w.revision == rev && w.mode == mode && w.written >= since)
    }
}
