//! Builders for the objects a Knative cluster has for one revision, as JSON: the
//! ServerlessService (SKS), the public Service (ClusterIPs of both families), the private
//! Service and its EndpointSlices; Knative's activator Service and EndpointSlices. And
//! Knative's activator subsetting (`ChooseSubset`), to compute which activators an SKS with
//! `numActivators` must get.
use std::{collections::BTreeSet, net::IpAddr};

use serde_json::{json, Value};

/// Knative's system namespace.
pub const KNATIVE_NS: &str = "knative-serving";
/// Knative's activator Service (in [`KNATIVE_NS`]).
pub const ACTIVATOR_SERVICE: &str = "activator-service";
/// The queue-proxy's HTTP/1 port (what the private service targets, and the activator's).
pub const QUEUE_PORT: u16 = 8012;
/// The queue-proxy's h2c port.
pub const QUEUE_H2C_PORT: u16 = 8013;
/// The queue-proxy's (and Knative's activator's) TLS port, behind the public `https` 443.
pub const QUEUE_HTTPS_PORT: u16 = 8112;

/// SKS operation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Proxy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Serve => "Serve",
            Mode::Proxy => "Proxy",
        }
    }
}

/// A ServerlessService for revision `name` in `ns`, with its status naming the public
/// (`name`) and private (`name-private`) services, as Knative's SKS reconciler writes it.
pub fn sks(ns: &str, name: &str, mode: Mode, num_activators: u32) -> Value {
    json!({
        "apiVersion": "networking.internal.knative.dev/v1alpha1",
        "kind": "ServerlessService",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "serving.knative.dev/revision": name,
                "serving.knative.dev/configuration": name.rsplit_once('-').map_or(name, |p| p.0),
            },
        },
        "spec": {
            "mode": mode.as_str(),
            "objectRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                          "name": format!("{name}-deployment")},
            "protocolType": "http1",
            "numActivators": num_activators,
        },
        "status": {
            "serviceName": name,
            "privateServiceName": private_name(name),
            "observedGeneration": 1,
            "conditions": [
                {"type": "ActivatorEndpointsPopulated", "status": "True"},
                {"type": "EndpointsPopulated", "status": if mode == Mode::Serve { "True" } else { "Unknown" }},
                {"type": "Ready", "status": "True"},
            ],
        },
    })
}

/// `<revision>-private`.
pub fn private_name(revision: &str) -> String {
    format!("{revision}-private")
}

fn families(ips: &[IpAddr]) -> Vec<&'static str> {
    ips.iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect()
}

/// The public Service of a revision: ClusterIP(s) `ips` (the first is `clusterIP`), port
/// `http` 80 → 8012 (and `https` 443 → 8112), as Knative creates it.
pub fn public_service(ns: &str, name: &str, ips: &[IpAddr]) -> Value {
    let ips_s: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "serving.knative.dev/revision": name,
                "networking.internal.knative.dev/serverlessservice": name,
                "networking.internal.knative.dev/serviceType": "Public",
            },
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips_s.first().cloned().unwrap_or_default(),
            "clusterIPs": ips_s,
            "ipFamilies": families(ips),
            "ipFamilyPolicy": if ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": QUEUE_PORT},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": QUEUE_HTTPS_PORT},
            ],
        },
    })
}

/// The private Service of a revision (`<name>-private`): selects the revision's pods,
/// `http` 80 → the queue-proxy port 8012, `https` 443 → 8112.
pub fn private_service(ns: &str, revision: &str, ips: &[IpAddr]) -> Value {
    let ips_s: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": private_name(revision),
            "namespace": ns,
            "labels": {
                "serving.knative.dev/revision": revision,
                "networking.internal.knative.dev/serverlessservice": revision,
                "networking.internal.knative.dev/serviceType": "Private",
            },
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips_s.first().cloned().unwrap_or_default(),
            "clusterIPs": ips_s,
            "ipFamilies": families(ips),
            "selector": {"serving.knative.dev/revision": revision},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": QUEUE_PORT},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": QUEUE_HTTPS_PORT},
                {"name": "queue-metrics", "protocol": "TCP", "port": 9090, "targetPort": "queue-metrics"},
                {"name": "http-usermetric", "protocol": "TCP", "port": 9091, "targetPort": "http-usermetric"},
                {"name": "http-queueadm", "protocol": "TCP", "port": 8022, "targetPort": 8022},
            ],
        },
    })
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone)]
pub struct Ep {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub pod: Option<String>,
}

impl Ep {
    /// A ready, serving endpoint.
    pub fn ready(ip: IpAddr) -> Self {
        Self {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            pod: None,
        }
    }

    /// Not ready (starting).
    pub fn not_ready(ip: IpAddr) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(ip)
        }
    }

    /// Terminating (still serving, not ready), as during a graceful shutdown.
    pub fn terminating(ip: IpAddr) -> Self {
        Self {
            ready: false,
            serving: true,
            terminating: true,
            ..Self::ready(ip)
        }
    }

    fn to_json(&self, ns: &str) -> Value {
        let mut e = json!({
            "addresses": [self.ip.to_string()],
            "conditions": {"ready": self.ready, "serving": self.serving,
                           "terminating": self.terminating},
        });
        if let Some(n) = &self.node {
            e["nodeName"] = json!(n);
        }
        if let Some(p) = &self.pod {
            e["targetRef"] = json!({"kind": "Pod", "namespace": ns, "name": p});
        }
        e
    }
}

/// An EndpointSlice `slice` of Service `service` (label `kubernetes.io/service-name`) with
/// `eps` of one address family (taken from the first endpoint; IPv4 when empty) and ports
/// `(name, port)`.
pub fn endpoint_slice(
    ns: &str,
    service: &str,
    slice: &str,
    eps: &[Ep],
    ports: &[(&str, u16)],
) -> Value {
    let v6 = eps.first().is_some_and(|e| e.ip.is_ipv6());
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": "00000000-0000-4000-8000-000000000000",
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": eps.iter().map(|e| e.to_json(ns)).collect::<Vec<_>>(),
        "ports": ports,
    })
}

/// The private EndpointSlice of a revision (`<rev>-private-<suffix>`): queue-proxy ports.
pub fn private_slice(ns: &str, revision: &str, suffix: &str, eps: &[Ep]) -> Value {
    let svc = private_name(revision);
    endpoint_slice(
        ns,
        &svc,
        &format!("{svc}-{suffix}"),
        eps,
        &[
            ("http", QUEUE_PORT),
            ("https", QUEUE_HTTPS_PORT),
            ("queue-metrics", 9090),
            ("http-usermetric", 9091),
            ("http-queueadm", 8022),
        ],
    )
}

/// Knative's activator Service.
pub fn activator_service(ip: IpAddr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ACTIVATOR_SERVICE, "namespace": KNATIVE_NS,
                     "labels": {"app": "activator"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "selector": {"app": "activator"},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": QUEUE_PORT},
                {"name": "http2", "protocol": "TCP", "port": 81, "targetPort": QUEUE_H2C_PORT},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": QUEUE_HTTPS_PORT},
                {"name": "http-metrics", "protocol": "TCP", "port": 9090, "targetPort": 9090},
            ],
        },
    })
}

/// An EndpointSlice of Knative's activator Service.
pub fn activator_slice(suffix: &str, eps: &[Ep]) -> Value {
    endpoint_slice(
        KNATIVE_NS,
        ACTIVATOR_SERVICE,
        &format!("{ACTIVATOR_SERVICE}-{suffix}"),
        eps,
        &[
            ("http", QUEUE_PORT),
            ("http2", QUEUE_H2C_PORT),
            ("https", QUEUE_HTTPS_PORT),
            ("http-metrics", 9090),
        ],
    )
}

const START_SALT: &str = "start-angle-salt";
const STEP_SALT: &str = "step-angle-salt";
const UNIVERSE: u64 = 1 << 11;

fn fnv64a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Knative's consistent subset (`knative.dev/serving/pkg/hash.ChooseSubset`): `n` of
/// `from` seeded by `target` (the SKS name). `n == 0` or `n >= len` → all. Written from
/// the algorithm's description independently of the agent's implementation: items sorted,
/// each hashed (FNV-64a of item + target, collisions re-hashed with the hex hash appended)
/// into a universe of 2048 angles; start and step angles from the target with their salts;
/// walk the sorted angles from the start angle, skipping taken ones, advancing by step.
pub fn choose_subset(from: &[String], n: usize, target: &str) -> BTreeSet<String> {
    let set: BTreeSet<String> = from.iter().cloned().collect();
    if n == 0 || n >= set.len() {
        return set;
    }
    let start = fnv64a(format!("{target}{START_SALT}").as_bytes()) % UNIVERSE;
    let step = fnv64a(format!("{target}{STEP_SALT}").as_bytes()) % UNIVERSE;
    let mut lookup = std::collections::HashMap::new();
    let mut pool = Vec::new();
    for f in &set {
        let mut buf = format!("{f}{target}");
        let mut h = fnv64a(buf.as_bytes());
        let mut hs = h % UNIVERSE;
        while lookup.contains_key(&hs) {
            buf.push_str(&format!("{h:x}"));
            h = fnv64a(buf.as_bytes());
            hs = h % UNIVERSE;
        }
        pool.push(hs);
        lookup.insert(hs, f.clone());
    }
    pool.sort_unstable();
    let mut chosen = BTreeSet::new();
    let mut angle = start;
    while chosen.len() < n {
        let mut root = pool.partition_point(|&h| h < angle);
        if root == pool.len() {
            root = 0;
        }
        while chosen.contains(&root) {
            root = (root + 1) % pool.len();
        }
        chosen.insert(root);
        angle = (angle + step) % UNIVERSE;
    }
    chosen
        .into_iter()
        .map(|i| lookup[&pool[i]].clone())
        .collect()
}

/// A Knative Revision `name` in `ns` (`serving.knative.dev/v1`) with `spec` merged over a
/// minimal one (one user container on 8080), as Knative's configuration reconciler writes it.
pub fn revision(ns: &str, name: &str, spec: Value) -> Value {
    let mut s = json!({
        "containerConcurrency": 0,
        "timeoutSeconds": 300,
        "containers": [{"name": "user-container", "image": "example.com/hello",
                        "ports": [{"containerPort": 8080}]}],
    });
    if let (Some(base), Some(over)) = (s.as_object_mut(), spec.as_object()) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Revision",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"serving.knative.dev/configuration": name.rsplit_once('-').map_or(name, |p| p.0)},
        },
        "spec": s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_vectors() {
        // FNV-1a 64 reference values.
        assert_eq!(fnv64a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv64a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv64a(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn subsets() {
        let from: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}")).collect();
        assert_eq!(choose_subset(&from, 0, "x").len(), 10);
        assert_eq!(choose_subset(&from, 12, "x").len(), 10);
        let a = choose_subset(&from, 3, "hello-00001");
        assert_eq!(a.len(), 3);
        assert_eq!(a, choose_subset(&from, 3, "hello-00001"), "deterministic");
        // Order of the input does not matter.
        let mut rev = from.clone();
        rev.reverse();
        assert_eq!(a, choose_subset(&rev, 3, "hello-00001"));
        // Different targets spread over the activators.
        let all: BTreeSet<String> = (0..50)
            .flat_map(|i| choose_subset(&from, 2, &format!("rev-{i}")))
            .collect();
        assert!(all.len() >= 8, "{all:?}");
    }

    #[test]
    fn builders() {
        let ips: Vec<IpAddr> = vec!["10.96.0.5".parse().unwrap(), "fd00:96::5".parse().unwrap()];
        let s = public_service("ns", "hello-00001", &ips);
        assert_eq!(s["spec"]["clusterIPs"][1], "fd00:96::5");
        assert_eq!(s["spec"]["ipFamilies"][1], "IPv6");
        let e = private_slice("ns", "hello-00001", "a", &[Ep::ready(ips[0])]);
        assert_eq!(
            e["metadata"]["labels"]["kubernetes.io/service-name"],
            "hello-00001-private"
        );
        assert_eq!(e["endpoints"][0]["conditions"]["ready"], true);
        let k = sks("ns", "hello-00001", Mode::Proxy, 2);
        assert_eq!(k["spec"]["numActivators"], 2);
        assert_eq!(k["status"]["privateServiceName"], "hello-00001-private");
    }
}
