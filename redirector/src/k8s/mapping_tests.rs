use serde_json::json;

use super::*;

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn fnv64a_reference_values() {
    // Offset basis for the empty input; "a" from the FNV reference test vectors.
    assert_eq!(fnv64a(b""), 0xcbf29ce484222325);
    assert_eq!(fnv64a(b"a"), 0xaf63dc4c8601ec8c);
    assert_eq!(fnv64a(b"foobar"), 0x85944171f73967e8);
}

/// knative.dev/pkg/hash TestChooseSubset: the same inputs pick the same subsets.
#[test]
fn choose_subset_matches_knative() {
    let from = set(&["sun", "moon", "mars", "mercury"]);
    assert_eq!(choose_subset(&from, 4, "a target!"), from);
    assert_eq!(
        choose_subset(&from, 2, "a target!"),
        set(&["mercury", "moon"])
    );
    assert_eq!(
        choose_subset(&from, 2, "something else entirely"),
        set(&["mercury", "mars"])
    );
    assert_eq!(
        choose_subset(&from, 3, "something else entirely"),
        set(&["mars", "mercury", "sun"])
    );
}

/// knative.dev/pkg/hash TestCollisionHandling: two keys that collide both get a slot.
#[test]
fn choose_subset_resolves_collisions() {
    let (k1, k2) = (
        "b08006d4-81f9-42ee-808b-ea18a39cbd83",
        "c9dc8df4-8c8d-4077-8750-6d2c2113a23b",
    );
    let target = "e68a64e1-19d8-4855-9ffa-04f49223a059";
    assert_eq!(
        fnv64a(format!("{k1}{target}").as_bytes()) % UNIVERSE,
        fnv64a(format!("{k2}{target}").as_bytes()) % UNIVERSE
    );
    let from = set(&[k1, k2]);
    assert_eq!(choose_subset(&from, 1, target).len(), 1);
    // Both present in the pool: picking 1 from a 3-set never loses one to the collision.
    let from3 = set(&[k1, k2, "x"]);
    let mut seen = BTreeSet::new();
    for t in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"] {
        seen.extend(choose_subset(&from3, 2, &format!("{target}{t}")));
    }
    assert_eq!(seen, from3);
}

#[test]
fn choose_subset_is_consistent_and_sized() {
    let from: BTreeSet<String> = (1..=20).map(|i| format!("10.0.0.{i}")).collect();
    for n in 1..20 {
        let a = choose_subset(&from, n, "hello-00001");
        assert_eq!(a.len(), n);
        assert_eq!(a, choose_subset(&from, n, "hello-00001"));
        assert!(a.is_subset(&from));
    }
    // Growing the pool by one moves few picks.
    let mut more = from.clone();
    more.insert("10.0.0.99".into());
    let a = choose_subset(&from, 5, "rev");
    let b = choose_subset(&more, 5, "rev");
    assert!(a.intersection(&b).count() >= 3);
}

pub(crate) fn sks(ns: &str, name: &str, mode: &str, proto: &str, n: i32) -> Arc<ServerlessService> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"mode": mode, "protocolType": proto, "numActivators": n},
            "status": {"serviceName": name, "privateServiceName": format!("{name}-private")},
        }))
        .unwrap(),
    )
}

pub(crate) fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, u16)]) -> Arc<Service> {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ips.first(), "clusterIPs": ips, "ports": ports},
        }))
        .unwrap(),
    )
}

/// `eps`: (address, ready, terminating).
pub(crate) fn slice(
    ns: &str,
    svc: &str,
    family: &str,
    ports: &[(&str, u16)],
    eps: &[(&str, bool, bool)],
) -> Arc<EndpointSlice> {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let eps: Vec<_> = eps
        .iter()
        .map(|(a, r, t)| {
            json!({"addresses": [a], "conditions": {"ready": r, "serving": *r || *t, "terminating": t}})
        })
        .collect();
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": format!("{svc}-{family}"), "namespace": ns,
                         "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": family,
            "ports": ports,
            "endpoints": eps,
        }))
        .unwrap(),
    )
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn node() -> Vec<SocketAddr> {
    vec![sa("10.244.0.1:8012"), sa("[fd00::1]:8012")]
}

#[test]
fn serve_maps_public_ports_to_ready_private_endpoints() {
    let snap = Snapshot {
        sks: vec![sks("default", "hello-00001", "Serve", "http1", 0)],
        services: vec![
            service(
                "default",
                "hello-00001",
                &["10.96.0.20", "fd00:96::20"],
                &[("http", 80)],
            ),
            service(
                "default",
                "hello-00001-private",
                &["10.96.0.21"],
                &[("http", 80)],
            ),
        ],
        slices: vec![
            slice(
                "default",
                "hello-00001-private",
                "IPv4",
                &[("http", 8012), ("http-autometric", 9090), ("http2", 8013)],
                &[
                    ("10.244.1.5", true, false),
                    ("10.244.1.6", false, false),
                    ("10.244.1.7", false, true),
                ],
            ),
            slice(
                "default",
                "hello-00001-private",
                "IPv6",
                &[("http", 8012)],
                &[("fd00:244::5", true, false)],
            ),
        ],
        revisions: vec![],
    };
    let m = map(&snap, &node(), ActivatorSource::Node);
    assert_eq!(m.desired.len(), 2);
    let v4 = m.desired.iter().find(|d| d.key.family == 4).unwrap();
    assert_eq!(v4.name, "default/hello-00001");
    assert_eq!(v4.mode, MODE_SERVE);
    assert_eq!(v4.serve, [sa("10.244.1.5:8012")].into());
    assert!(v4.proxy.is_empty());
    assert_eq!(v4.activator, Some(sa("10.244.0.1:8012")));
    assert_eq!(v4.key.port, port_wire(80));
    let v6 = m.desired.iter().find(|d| d.key.family == 6).unwrap();
    assert_eq!(v6.serve, [sa("[fd00:244::5]:8012")].into());
    assert_eq!(v6.activator, Some(sa("[fd00::1]:8012")));
    let a = &m.activator[0];
    assert_eq!(a.name, "default/hello-00001");
    assert_eq!(a.protocol, Protocol::Http);
    assert_eq!(a.ports, vec![80]);
    assert_eq!(
        a.instances,
        vec![sa("10.244.1.5:8012"), sa("[fd00:244::5]:8012")]
    );
    assert_eq!(m.summary["default/hello-00001"].ready, 2);
}

#[test]
fn h2c_uses_http2_ports_and_none_cluster_ip_is_skipped() {
    let snap = Snapshot {
        sks: vec![
            sks("ns", "grpc-1", "Serve", "h2c", 0),
            sks("ns", "headless", "Serve", "http1", 0),
        ],
        services: vec![
            service("ns", "grpc-1", &["10.96.0.30"], &[("http2", 81)]),
            service("ns", "headless", &["None"], &[("http", 80)]),
        ],
        slices: vec![slice(
            "ns",
            "grpc-1-private",
            "IPv4",
            &[("http", 8012), ("http2", 8013)],
            &[("10.244.2.2", true, false)],
        )],
        revisions: vec![],
    };
    let m = map(&snap, &node(), ActivatorSource::Node);
    assert_eq!(m.desired.len(), 1);
    assert_eq!(m.desired[0].serve, [sa("10.244.2.2:8013")].into());
    assert_eq!(m.desired[0].key.port, port_wire(81));
    let g = m.activator.iter().find(|a| a.revision == "grpc-1").unwrap();
    assert_eq!(g.protocol, Protocol::H2c);
    assert_eq!(g.instances, vec![sa("10.244.2.2:8013")]);
    // The headless one still routes by header in the activator.
    assert!(m
        .activator
        .iter()
        .any(|a| a.name == "ns/headless" && a.vips.is_empty()));
}

fn activator_slice(n: usize) -> Arc<EndpointSlice> {
    let addrs: Vec<String> = (1..=n).map(|i| format!("10.244.9.{i}")).collect();
    let eps: Vec<(&str, bool, bool)> = addrs.iter().map(|a| (a.as_str(), true, false)).collect();
    slice(
        ACTIVATOR_NAMESPACE,
        ACTIVATOR_SERVICE,
        "IPv4",
        &[("http", 8012), ("http2", 8013), ("https", 8112)],
        &eps,
    )
}

#[test]
fn knative_activators_subset_by_num_activators() {
    let snap = Snapshot {
        sks: vec![
            sks("default", "hello-00001", "Proxy", "http1", 3),
            sks("default", "all-00001", "Proxy", "h2c", 0),
        ],
        services: vec![
            service("default", "hello-00001", &["10.96.0.20"], &[("http", 80)]),
            service("default", "all-00001", &["10.96.0.40"], &[("http2", 81)]),
        ],
        slices: vec![activator_slice(8)],
        revisions: vec![],
    };
    let m = map(&snap, &node(), ActivatorSource::Knative);
    let hello = m
        .desired
        .iter()
        .find(|d| d.name == "default/hello-00001")
        .unwrap();
    assert_eq!(hello.mode, MODE_PROXY);
    let all: BTreeSet<String> = (1..=8).map(|i| format!("10.244.9.{i}")).collect();
    let want: BTreeSet<SocketAddr> = choose_subset(&all, 3, "hello-00001")
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), 8012))
        .collect();
    assert_eq!(hello.proxy, want);
    assert_eq!(hello.proxy.len(), 3);
    // numActivators 0: every activator, on the h2c port.
    let every = m
        .desired
        .iter()
        .find(|d| d.name == "default/all-00001")
        .unwrap();
    assert_eq!(every.proxy.len(), 8);
    assert!(every.proxy.iter().all(|a| a.port() == 8013));
    // Node-local mode ignores Knative's activators.
    let m = map(&snap, &node(), ActivatorSource::Node);
    assert!(m.desired.iter().all(|d| d.proxy.is_empty()));
}

#[test]
fn missing_public_service_programs_nothing_and_output_is_stable() {
    let snap = Snapshot {
        sks: vec![
            sks("b", "two", "Proxy", "http1", 0),
            sks("a", "one", "Proxy", "http1", 0),
        ],
        services: vec![service(
            "b",
            "two",
            &["10.96.0.2"],
            &[("http", 80), ("http2", 81)],
        )],
        slices: vec![],
        revisions: vec![],
    };
    let m = map(&snap, &node(), ActivatorSource::Node);
    assert_eq!(m.desired.len(), 2);
    assert!(m.desired.iter().all(|d| d.name == "b/two"));
    assert_eq!(
        m.activator
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["a/one", "b/two"]
    );
    let again = map(&snap, &node(), ActivatorSource::Node);
    assert_eq!(m.desired, again.desired);
}

/// https in Proxy passes through to Knative's activators (443 → 8112), in both activator
/// modes: never to the node-local plaintext listener. With no Knative activator the port is
/// not programmed (the node's own path carries it); in Serve it goes to the pods.
#[test]
fn https_in_proxy_passes_through_to_knatives_activators() {
    let ports = [("http", 80), ("https", 443)];
    let snap = |mode: &str, slices: Vec<Arc<EndpointSlice>>| Snapshot {
        sks: vec![sks("default", "tls-00001", mode, "http1", 0)],
        services: vec![service("default", "tls-00001", &["10.96.0.50"], &ports)],
        slices,
        revisions: vec![],
    };
    let port = |m: &Mapped, p: u16| {
        m.desired
            .iter()
            .find(|d| d.key.port == u16::to_be(p))
            .cloned()
    };
    for source in [ActivatorSource::Node, ActivatorSource::Knative] {
        let m = map(&snap("Proxy", vec![activator_slice(2)]), &node(), source);
        let tls = port(&m, 443).expect("443 programmed");
        assert_eq!(tls.mode, MODE_PROXY);
        assert_eq!(
            tls.proxy,
            [sa("10.244.9.1:8112"), sa("10.244.9.2:8112")].into(),
            "{source:?}"
        );
        let plain = port(&m, 80).expect("80 programmed");
        assert_eq!(plain.proxy.is_empty(), source == ActivatorSource::Node);
    }
    let m = map(&snap("Proxy", vec![]), &node(), ActivatorSource::Node);
    assert!(
        port(&m, 443).is_none(),
        "no activator for TLS: not programmed"
    );
    assert!(port(&m, 80).is_some());
    let private = slice(
        "default",
        "tls-00001-private",
        "IPv4",
        &[("http", 8012), ("https", 8112)],
        &[("10.244.5.1", true, false)],
    );
    let m = map(
        &snap("Serve", vec![private]),
        &node(),
        ActivatorSource::Node,
    );
    assert_eq!(
        port(&m, 443).expect("443 in Serve").serve,
        [sa("10.244.5.1:8112")].into()
    );
}

/// Knative's activators' plaintext ports, `http` (8012) and `http2` (8013, h2c prior
/// knowledge: the ingress's destination for h2c and gRPC revisions in Proxy), both lead to
/// the node-local activator's listener (`EntryKind::Shared`), ready and not-ready endpoints
/// alike, whatever the revisions' modes; `https` (8112) never does. With `--activator
/// knative` Knative's activators are left alone.
#[test]
fn knatives_activators_http_and_http2_ports_are_shared() {
    let mut act = activator_slice(2);
    // A third activator, not ready yet (the kubelet's probe reaches it through the switch).
    Arc::make_mut(&mut act).endpoints.push(
        serde_json::from_value(json!({
            "addresses": ["10.244.9.3"],
            "conditions": {"ready": false, "serving": false, "terminating": false}
        }))
        .unwrap(),
    );
    let snap = Snapshot {
        sks: vec![
            sks("default", "grpc-00001", "Serve", "h2c", 0),
            sks("default", "hello-00001", "Proxy", "http1", 0),
        ],
        services: vec![
            service("default", "grpc-00001", &["10.96.0.30"], &[("http2", 81)]),
            service("default", "hello-00001", &["10.96.0.20"], &[("http", 80)]),
        ],
        slices: vec![act],
        revisions: vec![],
    };
    let m = map(&snap, &node(), ActivatorSource::Node);
    let shared: Vec<&DesiredService> = m
        .desired
        .iter()
        .filter(|d| d.kind == EntryKind::Shared)
        .collect();
    let mut got: Vec<SocketAddr> = shared
        .iter()
        .map(|d| {
            let ip = crate::addr::words_ip(&d.key.addr, d.key.family);
            SocketAddr::new(ip, crate::addr::wire_port(d.key.port))
        })
        .collect();
    got.sort();
    let mut want: Vec<SocketAddr> = Vec::new();
    for i in 1..=3 {
        for port in [8012, 8013] {
            want.push(SocketAddr::new(
                format!("10.244.9.{i}").parse().unwrap(),
                port,
            ));
        }
    }
    want.sort();
    assert_eq!(got, want);
    for d in &shared {
        assert_eq!(d.name, format!("{ACTIVATOR_NAMESPACE}/{ACTIVATOR_SERVICE}"));
        assert_eq!(d.mode, MODE_PROXY);
        assert!(d.serve.is_empty() && d.proxy.is_empty(), "{d:?}");
        assert_eq!(d.activator, Some(sa("10.244.0.1:8012")), "{d:?}");
    }
    // https (8112) is not shared: TLS passes through to Knative's activators.
    assert!(m
        .desired
        .iter()
        .all(|d| d.kind != EntryKind::Shared || crate::addr::wire_port(d.key.port) != 8112));
    // --activator knative: no shared entries.
    let m = map(&snap, &node(), ActivatorSource::Knative);
    assert!(m.desired.iter().all(|d| d.kind != EntryKind::Shared));
}
