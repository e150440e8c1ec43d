//! Ties the activator and the scaler to the agent: builds the activator's registry from the
//! config, runs one scaler per scalable service, keeps what the scalers decided (mode and
//! ready instances) as overrides of the config, and feeds them datapath flow counts.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{atomic::AtomicUsize, atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use redirector_common::{CT_CLOSING, CT_PROXIED, CT_REPLY};
use tokio::sync::{mpsc, watch, Notify};

use crate::{
    activator::{Activator, Instance, Instances, ServiceState},
    config::{Config, Mode, Protocol, ServiceConfig},
    control::{desired_from_config, DesiredService, Programmer},
    scaler::{Addresses, Scaler, ScalerStatus, Update},
};

struct Scaled {
    cfg: ServiceConfig,
    stop: watch::Sender<bool>,
    flows: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Serving {
    pub activator: Arc<Activator>,
    scaled: HashMap<String, Scaled>,
    /// Services without a local scaler: what their state was made with (a change of either
    /// makes a new state), the state, and the sender of their instances (the backends).
    /// Not the whole `ServiceConfig`: at 100,000 services a copy of each cost 60 MiB.
    statics: HashMap<
        String,
        (
            Protocol,
            Duration,
            Arc<ServiceState>,
            watch::Sender<Instances>,
        ),
    >,
    states: HashMap<String, Arc<ServiceState>>,
    pub statuses: Arc<Mutex<BTreeMap<String, Arc<Mutex<ScalerStatus>>>>>,
    overrides: HashMap<String, (Mode, Vec<SocketAddr>)>,
    updates: mpsc::UnboundedSender<Update>,
    addresses: Arc<Addresses>,
    pin_path: std::path::PathBuf,
    /// Kube-sourced services (`--kubernetes`) and what they put in the registry.
    kube: crate::k8s::KubeServices,
    kube_registry: Vec<crate::k8s::registry::RegistryEntry>,
    /// One per scaler started: true once its first spare sandbox is prepared.
    spares: Vec<watch::Receiver<bool>>,
}

impl Serving {
    pub fn new(
        activator: Arc<Activator>,
        cfg: &Config,
        updates: mpsc::UnboundedSender<Update>,
    ) -> Self {
        let gw4 = cfg
            .node
            .activator
            .iter()
            .find(|a| a.is_ipv4())
            .map(|a| a.ip());
        Self {
            activator,
            scaled: HashMap::new(),
            statics: HashMap::new(),
            states: HashMap::new(),
            statuses: Arc::default(),
            overrides: HashMap::new(),
            updates,
            addresses: Arc::new(Addresses::new(
                cfg.node.instance_cidr,
                cfg.node.instance_cidr6,
                gw4,
            )),
            pin_path: cfg.node.pin_path.clone(),
            kube: Default::default(),
            kube_registry: Vec::new(),
            spares: Vec::new(),
        }
    }

    /// Brings the kube-sourced services of the activator in line with the cluster (their
    /// instances are the ready private endpoints), then the registry as [`Self::sync`].
    pub fn sync_kube(
        &mut self,
        cfg: &Config,
        services: &[crate::k8s::ActivatorService],
        waker: &Arc<dyn crate::k8s::Waker>,
    ) {
        self.kube_registry = self.kube.sync(services, waker);
        self.sync(cfg);
    }

    /// Brings scalers and the registry in line with `cfg` (restarting a scaler whose
    /// service changed); the registry also holds the kube-sourced services.
    pub fn sync(&mut self, cfg: &Config) {
        let mut registry = crate::activator::Registry::default();
        let mut keep = std::collections::HashSet::new();
        for s in &cfg.services {
            if s.protocol.is_udp() {
                continue;
            }
            let name = s.full_name();
            keep.insert(name.clone());
            let state = if s.scale.is_some() {
                let same = self.scaled.get(&name).is_some_and(|x| x.cfg == *s);
                if !same {
                    if let Some(old) = self.scaled.remove(&name) {
                        let _ = old.stop.send(true);
                        self.overrides.remove(&name);
                    }
                    self.start_scaler(s);
                }
                self.states[&name].clone()
            } else {
                self.scaled_remove(&name);
                let cc = 0;
                let instances: Instances =
                    Arc::new(s.backends.iter().map(|a| Instance::new(*a, cc)).collect());
                match self.statics.get(&name) {
                    Some((protocol, timeout, st, tx))
                        if *timeout == s.timeout && *protocol == s.protocol =>
                    {
                        let _ = tx.send(instances);
                        st.clone()
                    }
                    _ => {
                        let (tx, rx) = watch::channel(instances);
                        let st = Arc::new(ServiceState::new(
                            name.clone(),
                            s.protocol,
                            s.timeout,
                            cc,
                            rx,
                            Arc::new(Notify::new()),
                        ));
                        self.statics
                            .insert(name.clone(), (s.protocol, s.timeout, st.clone(), tx));
                        st
                    }
                }
            };
            self.states.insert(name.clone(), state.clone());
            registry.insert(state, &s.vips, s.port);
        }
        let gone: Vec<String> = self
            .states
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.scaled_remove(&n);
            self.statics.remove(&n);
            self.states.remove(&n);
        }
        for e in &self.kube_registry {
            registry.insert(e.state.clone(), &[], 0);
            for port in &e.ports {
                registry.insert(e.state.clone(), &e.vips, *port);
            }
            for ep in &e.endpoints {
                registry.insert(e.state.clone(), &[ep.ip()], ep.port());
            }
        }
        self.activator.set_registry(registry);
        if let Ok(mut l) = self.activator.limits.write() {
            *l = cfg.activator.clone();
        }
    }

    fn scaled_remove(&mut self, name: &str) {
        if let Some(old) = self.scaled.remove(name) {
            let _ = old.stop.send(true);
            self.overrides.remove(name);
            if let Ok(mut s) = self.statuses.lock() {
                s.remove(name);
            }
        }
    }

    fn start_scaler(&mut self, s: &ServiceConfig) {
        let name = s.full_name();
        let cc = s
            .scale
            .as_ref()
            .map(|x| x.container_concurrency)
            .unwrap_or(0);
        let (tx, rx) = watch::channel::<Instances>(Arc::new(Vec::new()));
        let wake = Arc::new(Notify::new());
        let state = Arc::new(ServiceState::new(
            name.clone(),
            s.protocol,
            s.timeout,
            cc,
            rx,
            wake,
        ));
        let flows = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(Mutex::new(ScalerStatus::default()));
        if let Ok(mut m) = self.statuses.lock() {
            m.insert(name.clone(), status.clone());
        }
        let (stop, stop_rx) = watch::channel(false);
        let view = match crate::scaler::DatapathView::open(&self.pin_path, s) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "scaler can't read the datapath maps");
                None
            }
        };
        let (spare_ready, spare_rx) = watch::channel(false);
        self.spares.push(spare_rx);
        let scaler = Scaler {
            svc: s.clone(),
            act: state.clone(),
            instances_tx: tx,
            flows: flows.clone(),
            view,
            updates: self.updates.clone(),
            addresses: self.addresses.clone(),
            status,
            spare_ready,
        };
        let task = tokio::spawn(scaler.run(stop_rx));
        // Until the scaler says otherwise, the service is Proxy with no backends.
        self.overrides
            .insert(name.clone(), (Mode::Proxy, Vec::new()));
        self.states.insert(name.clone(), state);
        self.scaled.insert(
            name,
            Scaled {
                cfg: s.clone(),
                stop,
                flows,
                task,
            },
        );
    }

    /// Waits (at most `limit`) until every scaler has its first spare sandbox.
    pub async fn spares_prepared(&mut self, limit: std::time::Duration) {
        let all = async {
            for rx in &mut self.spares {
                let _ = rx.wait_for(|ready| *ready).await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
        self.spares.clear();
    }

    /// Records a scaler's decision.
    pub fn record(&mut self, u: &Update) {
        if self.scaled.contains_key(&u.name) {
            self.overrides
                .insert(u.name.clone(), (u.mode, u.backends.clone()));
        }
    }

    /// Desired map state: the config, with scaled services as their scalers decided.
    pub fn desired(&self, cfg: &Config) -> Vec<DesiredService> {
        let mut d = desired_from_config(cfg);
        for entry in &mut d {
            if let Some((mode, backends)) = self.overrides.get(&entry.name) {
                entry.mode = match mode {
                    Mode::Serve => redirector_common::MODE_SERVE,
                    Mode::Proxy => redirector_common::MODE_PROXY,
                };
                let v4 = entry.key.family == redirector_common::FAMILY_V4;
                entry.serve = backends
                    .iter()
                    .filter(|a| a.is_ipv4() == v4)
                    .copied()
                    .collect();
            }
        }
        d
    }

    /// Counts live (not closing, seen in the last ~2 s) direct datapath flows per scaled
    /// service: the concurrency that bypasses the activator in Serve mode (flows to the
    /// activator are already counted by it).
    pub fn update_flows(&self, prog: &Programmer) {
        if self.scaled.is_empty() {
            return;
        }
        let ids: HashMap<u32, &str> = prog.installed().map(|(_, v, n)| (v.id, n)).collect();
        let now = crate::control::monotonic_coarse_ns();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let walked = crate::datapath::batch::for_each(&prog.maps().conntrack, |_, v| {
            if v.flags & (CT_REPLY | CT_CLOSING | CT_PROXIED) != 0
                || now.saturating_sub(redirector_common::ct_time(v.last_seen)) > 2_500_000_000
            {
                return;
            }
            if let Some(n) = ids.get(&v.svc_id) {
                *counts.entry(n).or_default() += 1;
            }
        });
        if let Err(e) = walked {
            tracing::debug!(error = %e, "counting flows");
        }
        // Sockets the socket hooks sent to a backend (they never pass the NAT code): live
        // until released. (Proxied ones are the activator's to count.)
        let walked = crate::datapath::batch::for_each(&prog.maps().sock_flows, |_, f| {
            if f.flags & redirector_common::SOCK_PROXIED != 0 {
                return;
            }
            if let Some(n) = ids.get(&f.svc_id) {
                *counts.entry(n).or_default() += 1;
            }
        });
        if let Err(e) = walked {
            tracing::debug!(error = %e, "counting socket flows");
        }
        for (name, s) in &self.scaled {
            s.flows.store(
                counts.get(name.as_str()).copied().unwrap_or(0),
                Ordering::Relaxed,
            );
        }
    }

    /// Stops every scaler and waits for their instances to stop.
    pub async fn shutdown(&mut self) {
        for (_, s) in self.scaled.drain() {
            let _ = s.stop.send(true);
            let _ = s.task.await;
        }
    }

    pub fn states(&self) -> impl Iterator<Item = (&String, &Arc<ServiceState>)> {
        self.states.iter()
    }
}
