//! Checksums stay right through every rewrite, with veth checksum offload on (partial
//! checksums cross the veths) and off (full checksums, verified by the receiver): TCP and UDP,
//! IPv4 and IPv6, local backend, remote backend (XDP reverse NAT on the uplink), the
//! node-local activator (tc egress reverse NAT) and hairpin.
use std::collections::BTreeMap;

use redirector_tests::{
    bins,
    cluster::{
        Cluster, Svc, ECHO_LOCAL, ECHO_PROXY, ECHO_REMOTE, ID_ACT_A, ID_BEA, ID_BEB, WEB_LOCAL,
        WEB_PROXY, WEB_REMOTE,
    },
    require_root,
    traffic::{csum_errors, run_client, ClientArgs},
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
                let mut args = if svc.udp() {
                    ClientArgs::udp(svc.vip(v6), 10, 2, 5)
                } else {
                    ClientArgs::tcp(svc.vip(v6), 10, 2, 5)
                };
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

#[test]
fn checksums_offload_on_and_off() {
    require_root!();
    let c = Cluster::new("cs", bins!()).expect("cluster");

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
}
