//! Checksums stay right through every rewrite, with veth checksum offload on (partial
//! checksums cross the veths) and off (full checksums, verified by the receiver): TCP and UDP,
//! IPv4 and IPv6, local backend, remote backend and the node-local activator (their replies
//! reverse-translated at tc egress) and hairpin. Run twice: with the node's
//! forwarding (`host_routing = "kernel"`) and with translated packets handed straight to
//! the local pod (`host_routing = "bpf"`), where the node must forward none of them. Both
//! on nodes that carry kube-proxy's iptables rule set (its FORWARD drop of conntrack-INVALID
//! packets included), as real nodes do.
use std::collections::BTreeMap;

use redirector_tests::{
    bins,
    cluster::{
        Cluster, Svc, ECHO_LOCAL, ECHO_PROXY, ECHO_REMOTE, ID_ACT_A, ID_BEA, ID_BEB, WEB_LOCAL,
        WEB_PROXY, WEB_REMOTE,
    },
    kubeproxy::{KubeProxy, NetfilterMode},
    require_root,
    traffic::{csum_errors, run_client},
};

type Counters = BTreeMap<String, BTreeMap<String, u64>>;

fn counters(c: &Cluster) -> Counters {
    c.topo
        .namespaces()
        .into_iter()
        .map(|ns| (ns.name.clone(), csum_errors(ns).expect("counters")))
        .collect()
}

fn assert_no_new_errors(before: &Counters, after: &Counters, phase: &str) {
    let mut grown = Vec::new();
    for (ns, m) in after {
        for (k, v) in m {
            let old = before.get(ns).and_then(|b| b.get(k)).copied().unwrap_or(0);
            if *v > old {
                grown.push(format!("{ns} {k}: {old} -> {v}"));
            }
        }
    }
    assert!(
        grown.is_empty(),
        "{phase}: checksum errors counted: {grown:?}"
    );
}

/// Every path, both families, both protocols; all requests must succeed and be answered by
/// the expected server.
fn traffic(c: &Cluster, phase: &str) {
    let cases: [(Svc, &str, &str); 6] = [
        (WEB_LOCAL, "cli", ID_BEA),
        (WEB_REMOTE, "cli", ID_BEB),
        (ECHO_LOCAL, "cli", ID_BEA),
        (ECHO_REMOTE, "cli", ID_BEB),
        (WEB_PROXY, "cli", ID_ACT_A),
        (ECHO_PROXY, "cli", ID_ACT_A),
    ];
    let hairpin = [(WEB_LOCAL, "bea", ID_BEA), (ECHO_LOCAL, "bea", ID_BEA)];
    for v6 in [false, true] {
        for (svc, pod, id) in cases.iter().chain(&hairpin) {
            let ns = &c.topo.pod(pod).ns;
            for pad in [0, if svc.udp() { 1200 } else { 200_000 }] {
                let mut args = svc.client(v6, 10, 2, 5);
                args.pad = pad;
                let what = format!("{phase}: {} from {pod} v6={v6} pad={pad}", svc.name);
                let s = run_client(&c.bins, ns, &args).expect("client");
                s.assert_all_ok(&what);
                assert_eq!(s.identities(), [*id].into(), "{what}: {s:?}");
                assert_eq!(
                    s.socket_peers,
                    [svc.vip(v6).to_string()].into(),
                    "{what}: the VIP must be the peer"
                );
            }
        }
    }
}

/// IPv4 + IPv6 datagrams node A forwarded (`Ip.ForwDatagrams`, `Ip6OutForwDatagrams`).
fn forwarded(c: &Cluster) -> u64 {
    let ns = &c.topo.node(0).ns;
    let snmp = ns.exec("cat", &["/proc/net/snmp"]).expect("snmp");
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Ip: ")).collect();
    let v4 = match lines.as_slice() {
        [names, values] => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "ForwDatagrams")
            .and_then(|(_, v)| v.parse::<u64>().ok()),
        _ => None,
    };
    let snmp6 = ns.exec("cat", &["/proc/net/snmp6"]).expect("snmp6");
    let v6 = snmp6.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("Ip6OutForwDatagrams"))
            .then(|| it.next().and_then(|v| v.parse::<u64>().ok()))
            .flatten()
    });
    v4.expect("Ip.ForwDatagrams") + v6.expect("Ip6OutForwDatagrams")
}

/// Requests to the local backend (both families, TCP and UDP): how many datagrams node A
/// forwarded meanwhile, and how many requests were made.
fn local_forwarding(c: &Cluster) -> (u64, u64) {
    let before = forwarded(c);
    let ns = &c.topo.pod("cli").ns;
    let mut requests = 0;
    for v6 in [false, true] {
        for svc in [WEB_LOCAL, ECHO_LOCAL] {
            let args = svc.client(v6, 10, 2, 5);
            let s = run_client(&c.bins, ns, &args).expect("client");
            s.assert_all_ok(svc.name);
            requests += s.ok;
        }
    }
    (forwarded(c) - before, requests as u64)
}

#[test]
fn checksums_offload_on_and_off() {
    require_root!();
    checksums(false);
}

#[test]
fn checksums_offload_on_and_off_bpf_host_routing() {
    require_root!();
    checksums(true);
}

fn checksums(host_routing_bpf: bool) {
    let tag = if host_routing_bpf { "csb" } else { "cs" };
    let mut c = Cluster::new_with(tag, bins!(), |cfg| cfg.host_routing_bpf = host_routing_bpf)
        .expect("cluster");
    for (n, cfg) in c.topo.nodes.iter().zip(&c.configs) {
        let kp = KubeProxy::install(&n.ns, NetfilterMode::Iptables, &cfg.services)
            .expect("kube-proxy's rules");
        c.kube_proxy.push(kp);
    }

    let before = counters(&c);
    traffic(&c, "offload on");
    let mid = counters(&c);
    assert_no_new_errors(&before, &mid, "offload on");

    // Software checksums on send, verification on receive: every veth end, every namespace.
    for ns in c.topo.namespaces() {
        for dev in ns.interfaces().expect("interfaces") {
            ns.exec("ethtool", &["-K", &dev, "tx", "off", "rx", "off"])
                .expect("ethtool");
            let k = ns.exec("ethtool", &["-k", &dev]).expect("ethtool -k");
            assert!(
                k.contains("tx-checksumming: off") && k.contains("rx-checksumming: off"),
                "{} {dev}: offloads still on:\n{k}",
                ns.name
            );
        }
    }
    traffic(&c, "offload off");
    let after = counters(&c);
    assert_no_new_errors(&mid, &after, "offload off");

    // Who carried the local backend's packets: the node's forwarding, or the programs.
    let (forwarded, requests) = local_forwarding(&c);
    if host_routing_bpf {
        assert!(
            forwarded <= 4,
            "host_routing = bpf: node A forwarded {forwarded} datagrams for {requests} requests to its own pod"
        );
    } else {
        assert!(
            forwarded >= 2 * requests,
            "host_routing = kernel: node A forwarded only {forwarded} datagrams for {requests} requests"
        );
    }
    assert_no_new_errors(&after, &counters(&c), "local backend");
}
