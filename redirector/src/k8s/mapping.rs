//! Pure functions from the watched objects (SKS, Services, EndpointSlices) to the agent's
//! desired state: map entries for the datapath and services for the node-local activator.
//!
//! For each SKS `ns/name`:
//! - VIPs: the ClusterIPs (both families) of the public Service (`status.serviceName`, else
//!   the SKS name) in the SKS's namespace; ports: its TCP ports.
//! - Serve backends: the ready endpoints of the private Service's EndpointSlices (label
//!   `kubernetes.io/service-name=<status.privateServiceName or <name>-private>`), on the
//!   endpoint port named like the public port (Knative: public `http` 80 → queue-proxy 8012,
//!   `http2` → 8013).
//! - Proxy: the node-local activator (`node.activator`), or with `--activator knative` the
//!   ready endpoints of `knative-serving/activator-service`, subset by `spec.numActivators`
//!   exactly as Knative's SKS reconciler does ([`choose_subset`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use redirector_common::{ServiceKey, MODE_PROXY, MODE_SERVE, PROTO_TCP};

use super::{
    revision::{Revision, RevisionSettings},
    sks::{ServerlessService, SksMode, SksProtocol},
};
use crate::{
    addr::{ip_words, port_wire},
    config::Protocol,
    control::{DesiredService, EntryKind},
};

/// Namespace and Service of Knative's activator.
pub const ACTIVATOR_NAMESPACE: &str = "knative-serving";
pub const ACTIVATOR_SERVICE: &str = "activator-service";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What Proxy mode leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivatorSource {
    /// The node-local activator (`node.activator` of the config file).
    #[default]
    Node,
    /// Knative's activators (`knative-serving/activator-service`), subset by numActivators.
    Knative,
}

/// The watched objects at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub sks: Vec<Arc<ServerlessService>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Knative Revisions, for their settings (may lag behind the rest, or stay empty).
    pub revisions: Vec<Arc<Revision>>,
}

/// A kube-sourced service as the node-local activator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivatorService {
    /// `namespace/revision` (what Knative-Serving-Namespace/Revision headers name).
    pub name: String,
    pub namespace: String,
    pub revision: String,
    /// `namespace/name` of the SKS.
    pub sks: String,
    pub protocol: Protocol,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    /// Ready private endpoints on the queue-proxy port of the protocol: where the activator
    /// forwards.
    pub instances: Vec<SocketAddr>,
    /// Endpoints Kubernetes doesn't report ready yet: the activator probes them
    /// (`K-Network-Probe: queue`) and forwards as soon as one answers. Empty when a startup
    /// or exec readiness probe gates the revision's readiness.
    pub pending: Vec<SocketAddr>,
    /// The Revision's settings; `None`: the Revision was not seen (Knative's defaults apply).
    pub settings: Option<RevisionSettings>,
    /// Its pods' addresses (what Knative's ingress sends to in Serve): switched to the
    /// activator, as the VIPs are, while the revision is proxied.
    pub endpoints: Vec<SocketAddr>,
}

/// One SKS in a line of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SksSummary {
    pub mode: SksMode,
    pub vips: usize,
    pub ready: usize,
    pub activators: usize,
}

/// Everything the agent programs from the cluster.
#[derive(Debug, Clone, Default)]
pub struct Mapped {
    pub desired: Vec<DesiredService>,
    pub activator: Vec<ActivatorService>,
    /// By SKS `namespace/name`.
    pub summary: BTreeMap<String, SksSummary>,
}

/// A slice's TCP ports by name.
type NamedPorts = Arc<Vec<(String, u16)>>;

/// Ready endpoints of one Service: `(address as written, address, named ports)`, and the
/// ones not ready yet (not terminating), which the activator probes itself.
#[derive(Debug, Default)]
struct Ready {
    addrs: Vec<(String, IpAddr, NamedPorts)>,
    pending: Vec<(String, IpAddr, NamedPorts)>,
}

impl Ready {
    /// Endpoints on the port named `name`; a slice with no port of that name but a single
    /// port uses that one.
    fn on_port(&self, name: &str, only: Option<&HashSet<String>>) -> BTreeSet<SocketAddr> {
        Self::select(&self.addrs, name, only)
    }

    /// Not-ready endpoints on the port named `name`.
    fn pending_on_port(&self, name: &str) -> BTreeSet<SocketAddr> {
        Self::select(&self.pending, name, None)
    }

    fn select(
        addrs: &[(String, IpAddr, NamedPorts)],
        name: &str,
        only: Option<&HashSet<String>>,
    ) -> BTreeSet<SocketAddr> {
        let mut out = BTreeSet::new();
        for (raw, ip, ports) in addrs {
            if only.is_some_and(|o| !o.contains(raw)) {
                continue;
            }
            let port = ports
                .iter()
                .find(|(n, _)| n == name)
                .or_else(|| (ports.len() == 1).then(|| &ports[0]))
                .map(|(_, p)| *p);
            if let Some(p) = port {
                out.insert(SocketAddr::new(*ip, p));
            }
        }
        out
    }

    fn raw_addresses(&self) -> BTreeSet<String> {
        self.addrs.iter().map(|(r, _, _)| r.clone()).collect()
    }
}

/// An endpoint takes traffic when ready (nil = ready) and not terminating.
fn endpoint_ready(c: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>) -> bool {
    let Some(c) = c else { return true };
    c.ready.or(c.serving).unwrap_or(true) && !c.terminating.unwrap_or(false)
}

fn ready_by_service(slices: &[Arc<EndpointSlice>]) -> HashMap<(String, String), Ready> {
    let mut out: HashMap<(String, String), Ready> = HashMap::new();
    for s in slices {
        if s.address_type == "FQDN" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let ports: NamedPorts = Arc::new(
            s.ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    let port = u16::try_from(p.port?).ok()?;
                    Some((p.name.clone().unwrap_or_default(), port))
                })
                .collect(),
        );
        let entry = out.entry((ns, svc.clone())).or_default();
        for ep in &s.endpoints {
            let ready = endpoint_ready(ep.conditions.as_ref());
            let terminating = ep
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if !ready && terminating {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    let list = if ready {
                        &mut entry.addrs
                    } else {
                        &mut entry.pending
                    };
                    list.push((a.clone(), ip, ports.clone()));
                }
            }
        }
    }
    out
}

/// The Service's addresses (both families; "None" and "" skipped) and TCP ports.
fn vips_and_ports(svc: &Service) -> (Vec<IpAddr>, Vec<(String, u16)>) {
    let Some(spec) = &svc.spec else {
        return (Vec::new(), Vec::new());
    };
    let mut vips = Vec::new();
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port).ok()?,
            ))
        })
        .collect();
    (vips, ports)
}

/// Whether a public port carries TLS (Knative's `https` port, 443 → 8112 on the
/// activator; `https-*` names too).
fn is_tls_port(name: &str) -> bool {
    name == "https" || name.starts_with("https-")
}

/// The ports of Knative's activators whose endpoints lead to the node-local activator's
/// listener (`EntryKind::Shared`): the plaintext ones, HTTP/1.1 and h2c.
const SHARED_PORTS: [&str; 2] = ["http", "http2"];

/// Knative's port name for a protocol (`networking.ServicePortName`).
fn protocol_port_name(p: SksProtocol) -> &'static str {
    match p {
        SksProtocol::Http1 => "http",
        SksProtocol::H2c => "http2",
    }
}

/// Maps the cluster into desired state. `node_activators`: the node-local activator per
/// family; `source`: what Proxy leads to.
pub fn map(snap: &Snapshot, node_activators: &[SocketAddr], source: ActivatorSource) -> Mapped {
    let ready = ready_by_service(&snap.slices);
    let services: HashMap<(&str, &str), &Service> = snap
        .services
        .iter()
        .filter_map(|s| {
            Some((
                (
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref()?,
                ),
                s.as_ref(),
            ))
        })
        .collect();
    let empty = Ready::default();
    let activators = ready
        .get(&(ACTIVATOR_NAMESPACE.into(), ACTIVATOR_SERVICE.into()))
        .unwrap_or(&empty);
    let settings_of: HashMap<(&str, &str), RevisionSettings> = snap
        .revisions
        .iter()
        .map(|r| ((r.namespace(), r.name()), r.settings()))
        .collect();
    let mut sks_sorted: Vec<&ServerlessService> = snap
        .sks
        .iter()
        .map(Arc::as_ref)
        .filter(|s| s.metadata.name.is_some() && s.metadata.deletion_timestamp.is_none())
        .collect();
    sks_sorted.sort_by_key(|s| s.full_name());

    let mut out = Mapped::default();
    let mut keys = HashSet::new();
    for sks in sks_sorted {
        let ns = sks.namespace();
        let name = sks.full_name();
        let proto = sks.protocol();
        let proto_port = protocol_port_name(proto);
        let private = ready
            .get(&(ns.to_owned(), sks.private_service()))
            .unwrap_or(&empty);
        let (vips, ports) = services
            .get(&(ns, sks.public_service()))
            .map(|s| vips_and_ports(s))
            .unwrap_or_default();
        // Knative subsets by address, seeded by the SKS name; 0 = all.
        let subset = (source == ActivatorSource::Knative && sks.num_activators() > 0).then(|| {
            choose_subset(
                &activators.raw_addresses(),
                sks.num_activators(),
                sks.name(),
            )
            .into_iter()
            .collect::<HashSet<String>>()
        });
        let mode = sks.mode();
        let mut summary = SksSummary {
            mode,
            vips: vips.len(),
            ready: 0,
            activators: 0,
        };
        for (port_name, port) in &ports {
            let pname = if port_name.is_empty() {
                proto_port
            } else {
                port_name.as_str()
            };
            let serve = private.on_port(pname, None);
            // TLS is never sent to the node-local activator's plaintext listener: in Proxy,
            // https passes through to Knative's activators (which terminate it), and with
            // none ready the port is left to the node's own path (Knative's public
            // endpoints), not programmed.
            let tls = is_tls_port(pname);
            let proxy = match source {
                _ if tls => activators.on_port(pname, subset.as_ref()),
                ActivatorSource::Node => BTreeSet::new(),
                ActivatorSource::Knative => {
                    let by_name = activators.on_port(pname, subset.as_ref());
                    if by_name.is_empty() {
                        activators.on_port(proto_port, subset.as_ref())
                    } else {
                        by_name
                    }
                }
            };
            if tls && mode == SksMode::Proxy && proxy.is_empty() {
                continue;
            }
            summary.ready = summary.ready.max(serve.len());
            summary.activators = summary.activators.max(proxy.len());
            for vip in &vips {
                let (addr, family) = ip_words(*vip);
                let key = ServiceKey {
                    addr,
                    port: port_wire(*port),
                    proto: PROTO_TCP,
                    family,
                };
                if !keys.insert(key) {
                    continue; // another SKS (sorted first) claimed this VIP:port
                }
                let same = |a: &&SocketAddr| a.is_ipv4() == vip.is_ipv4();
                out.desired.push(DesiredService {
                    key,
                    name: name.clone(),
                    mode: match mode {
                        SksMode::Serve => MODE_SERVE,
                        SksMode::Proxy => MODE_PROXY,
                    },
                    serve: serve.iter().filter(same).copied().collect(),
                    proxy: proxy.iter().filter(same).copied().collect(),
                    activator: node_activators.iter().find(same).copied(),
                    kind: EntryKind::Vip,
                });
            }
        }
        // Knative's ingress sends to the pods (the public EndpointSlices in Serve), not to
        // the VIP: while redirector says Proxy, new connections to them are switched too.
        let endpoints: BTreeSet<SocketAddr> = private
            .on_port(proto_port, None)
            .union(&private.pending_on_port(proto_port))
            .copied()
            .collect();
        if mode == SksMode::Proxy {
            let proxy = match source {
                ActivatorSource::Node => BTreeSet::new(),
                ActivatorSource::Knative => activators.on_port(proto_port, subset.as_ref()),
            };
            for ep in &endpoints {
                push_endpoint(
                    &mut out,
                    &mut keys,
                    *ep,
                    &name,
                    &proxy,
                    node_activators,
                    EntryKind::Endpoint,
                );
            }
        }
        let settings = settings_of.get(&(ns, sks.revision())).copied();
        out.activator.push(ActivatorService {
            name: format!("{ns}/{}", sks.revision()),
            namespace: ns.to_owned(),
            revision: sks.revision().to_owned(),
            sks: name.clone(),
            protocol: match proto {
                SksProtocol::Http1 => Protocol::Http,
                SksProtocol::H2c => Protocol::H2c,
            },
            vips,
            ports: ports.iter().map(|(_, p)| *p).collect(),
            instances: private.on_port(proto_port, None).into_iter().collect(),
            pending: if settings.is_some_and(|s| s.readiness_gated) {
                Vec::new()
            } else {
                private.pending_on_port(proto_port).into_iter().collect()
            },
            settings,
            endpoints: endpoints.into_iter().collect(),
        });
        out.summary.insert(name, summary);
    }
    // The ingress's other destination, Knative's activators (the public EndpointSlices in
    // Proxy): with the node-local activator, new connections to them go to its listener,
    // which reads the revision from the ingress's headers. Both plaintext ports: `http`
    // (8012) and `http2` (8013, h2c prior knowledge, what the ingress uses for h2c and gRPC
    // revisions); the listener speaks HTTP/1.1 and h2c on one port.
    if source == ActivatorSource::Node {
        let shared: BTreeSet<SocketAddr> = SHARED_PORTS
            .iter()
            .flat_map(|p| {
                activators
                    .on_port(p, None)
                    .into_iter()
                    .chain(activators.pending_on_port(p))
            })
            .collect();
        let name = format!("{ACTIVATOR_NAMESPACE}/{ACTIVATOR_SERVICE}");
        for ep in shared {
            push_endpoint(
                &mut out,
                &mut keys,
                ep,
                &name,
                &BTreeSet::new(),
                node_activators,
                EntryKind::Shared,
            );
        }
    }
    out
}

/// A proxied entry for the real endpoint `ep` (`kind`: a revision's pod, or Knative's
/// activator), unless its address is taken or no node-local activator has its family.
fn push_endpoint(
    out: &mut Mapped,
    keys: &mut HashSet<ServiceKey>,
    ep: SocketAddr,
    name: &str,
    proxy: &BTreeSet<SocketAddr>,
    node_activators: &[SocketAddr],
    kind: EntryKind,
) {
    let same = |a: &&SocketAddr| a.is_ipv4() == ep.is_ipv4();
    let activator = node_activators.iter().find(same).copied();
    let proxy: BTreeSet<SocketAddr> = proxy.iter().filter(same).copied().collect();
    if activator.is_none() && proxy.is_empty() {
        return;
    }
    let (addr, family) = ip_words(ep.ip());
    let key = ServiceKey {
        addr,
        port: port_wire(ep.port()),
        proto: PROTO_TCP,
        family,
    };
    if !keys.insert(key) {
        return;
    }
    out.desired.push(DesiredService {
        key,
        name: name.to_owned(),
        mode: MODE_PROXY,
        serve: BTreeSet::new(),
        proxy,
        activator,
        kind,
    });
}

const START_SALT: &str = "start-angle-salt";
const STEP_SALT: &str = "step-angle-salt";
/// Angles range over [0, UNIVERSE).
const UNIVERSE: u64 = 1 << 11;

fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Knative's consistent subset (knative.dev/pkg/hash.ChooseSubset, used by the SKS
/// reconciler with the SKS name as `target` to pick `numActivators` activators): every
/// candidate gets an angle from FNV-64a(candidate + target) mod 2048 (collisions re-hashed
/// with the previous hash appended in hex); starting at FNV-64a(target + start salt), each
/// pick takes the first free candidate at or after the angle, then the angle advances by
/// FNV-64a(target + step salt). `n >= len` returns everything.
pub fn choose_subset(from: &BTreeSet<String>, n: usize, target: &str) -> BTreeSet<String> {
    if n >= from.len() {
        return from.clone();
    }
    let start = fnv64a(format!("{target}{START_SALT}").as_bytes()) % UNIVERSE;
    let step = fnv64a(format!("{target}{STEP_SALT}").as_bytes()) % UNIVERSE;
    // `from` iterates sorted (bytewise), as Go's sets.List.
    let mut lookup: HashMap<u64, &str> = HashMap::with_capacity(from.len());
    let mut pool = Vec::with_capacity(from.len());
    for f in from {
        let mut buf = format!("{f}{target}");
        let mut h = fnv64a(buf.as_bytes());
        let mut hs = h % UNIVERSE;
        while lookup.contains_key(&hs) {
            buf.push_str(&format!("{h:x}"));
            h = fnv64a(buf.as_bytes());
            hs = h % UNIVERSE;
        }
        pool.push(hs);
        lookup.insert(hs, f);
    }
    pool.sort_unstable();
    let mut selected = BTreeSet::new();
    let mut angle = start;
    while selected.len() < n {
        let mut root = pool.partition_point(|h| *h < angle);
        if root == pool.len() {
            root = 0;
        }
        while selected.contains(&root) {
            root = (root + 1) % pool.len();
        }
        selected.insert(root);
        angle = (angle + step) % UNIVERSE;
    }
    selected
        .into_iter()
        .map(|i| lookup[&pool[i]].to_owned())
        .collect()
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
pub(crate) mod tests;
