//! redirector on nodes that run kube-proxy (issue 13): each node namespace carries
//! kube-proxy's own rules for the cluster's services (iptables mode in one cluster,
//! nftables mode in another), including the FORWARD drop of conntrack-INVALID packets, and
//! the topology's traffic matrix (local, remote and both backends, Proxy, hairpin; TCP and
//! UDP; IPv4 and IPv6) runs with `rp_filter` strict and loose, then 50 flips and agent
//! restarts under load. No request may fail.
//!
//! kube-proxy's DNAT would deliver Serve traffic by itself if redirector did nothing, so
//! every case also asserts that redirector translated the flows: the service's `new_flows`
//! counter on the client's node rose by at least the flows the client opened, Proxy flows
//! reached the node-local activator (kube-proxy's rules point at the backends only), and
//! hairpin flows were counted as such.
use std::collections::BTreeSet;

use redirector_tests::{
    agent::service_entries,
    bins,
    cluster::{
        Cluster, Svc, ECHO, ECHO_LOCAL, ECHO_PROXY, ECHO_REMOTE, ID_ACT_A, ID_BEA, ID_BEB, WEB,
        WEB_LOCAL, WEB_PROXY, WEB_REMOTE,
    },
    kubeproxy::NetfilterMode,
    load::{flip_cycles, restart_rounds},
    require_root,
    traffic::run_client,
};
use serde_json::Value;

/// `new_flows` of `svc`'s VIP of family `v6` in a status.
fn new_flows(st: &Value, svc: &Svc, v6: bool) -> u64 {
    let vip = svc.vip_ip(v6).to_string();
    service_entries(st, svc.name)
        .into_iter()
        .find(|e| e["vip"] == vip.as_str())
        .and_then(|e| e["new_flows"].as_u64())
        .unwrap_or_else(|| panic!("{}: no entry for {vip} in {st}", svc.name))
}

fn hairpins(st: &Value) -> u64 {
    st["counters"]["hairpin"].as_u64().unwrap_or(0)
}

/// One row of the matrix: a service called from a pod, and who must answer.
struct Case {
    svc: Svc,
    from: &'static str,
    answer: &'static [&'static str],
}

const CASES: [Case; 10] = [
    Case {
        svc: WEB,
        from: "cli",
        answer: &[ID_BEA, ID_BEB],
    },
    Case {
        svc: ECHO,
        from: "cli",
        answer: &[ID_BEA, ID_BEB],
    },
    Case {
        svc: WEB_LOCAL,
        from: "cli",
        answer: &[ID_BEA],
    },
    Case {
        svc: ECHO_LOCAL,
        from: "cli",
        answer: &[ID_BEA],
    },
    Case {
        svc: WEB_REMOTE,
        from: "cli",
        answer: &[ID_BEB],
    },
    Case {
        svc: ECHO_REMOTE,
        from: "cli",
        answer: &[ID_BEB],
    },
    Case {
        svc: WEB_PROXY,
        from: "cli",
        answer: &[ID_ACT_A],
    },
    Case {
        svc: ECHO_PROXY,
        from: "cli",
        answer: &[ID_ACT_A],
    },
    // Hairpin: the only backend calls its own service.
    Case {
        svc: WEB_LOCAL,
        from: "bea",
        answer: &[ID_BEA],
    },
    Case {
        svc: ECHO_LOCAL,
        from: "bea",
        answer: &[ID_BEA],
    },
];

/// Client sockets whose tuple may repeat an earlier one's within a run (see `matrix`).
const REUSED_TUPLES: u64 = 3;

/// Every case in both families; all requests succeed, the right servers answer, the client
/// sees the VIP, and node A's agent counted the flows.
fn matrix(c: &Cluster, what: &str) {
    for case in &CASES {
        let pod = c.topo.pod(case.from);
        for v6 in [false, true] {
            let name = format!("{what}: {} from {} v6={v6}", case.svc.name, case.from);
            let before = c.agents[0].status().unwrap();
            let s = run_client(&c.bins, &pod.ns, &case.svc.client(v6, 30, 2, 5)).unwrap();
            s.assert_all_ok(&name);
            let want: BTreeSet<&str> = case.answer.iter().copied().collect();
            assert_eq!(s.identities(), want, "{name}: who answered: {s:?}");
            assert_eq!(
                s.socket_peers,
                [case.svc.vip(v6).to_string()].into(),
                "{name}: the client must see the VIP as its peer"
            );
            if case.from == "cli" {
                assert_eq!(
                    s.server_peers,
                    [pod.ip(v6).to_string()].into(),
                    "{name}: servers must see the client's own address (nothing masqueraded)"
                );
            }
            let after = c.agents[0].status().unwrap();
            let flows = new_flows(&after, &case.svc, v6) - new_flows(&before, &case.svc, v6);
            // A new socket can reuse an earlier one's source port (UDP ports are random)
            // while its entry lives: a few flows then count once.
            assert!(
                s.conns > 0 && flows + REUSED_TUPLES >= s.conns as u64,
                "{name}: redirector translated {flows} new flows of the client's {} \
                 (kube-proxy's DNAT did the rest?)",
                s.conns
            );
            if case.from == "bea" {
                assert!(
                    hairpins(&after) > hairpins(&before),
                    "{name}: no hairpin counted: {}",
                    after["counters"]
                );
            }
        }
    }
}

/// The rules kube-proxy left in node `i`, as the kernel lists them.
fn listed_rules(c: &Cluster, i: u8, mode: NetfilterMode) -> String {
    let ns = &c.topo.node(i).ns;
    match mode {
        NetfilterMode::Iptables => {
            ns.exec("iptables-save", &[]).unwrap() + &ns.exec("ip6tables-save", &[]).unwrap()
        }
        NetfilterMode::Nftables => ns.exec("nft", &["list", "ruleset"]).unwrap(),
        NetfilterMode::None => String::new(),
    }
}

/// kube-proxy's rules are in place on both nodes: the INVALID drop, a DNAT to each backend
/// and masquerading, in both families.
fn assert_rules(c: &Cluster, mode: NetfilterMode) {
    for i in 0..2 {
        let rules = listed_rules(c, i, mode);
        let needles: &[&str] = match mode {
            NetfilterMode::Iptables => &[
                "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                "-j DNAT --to-destination 10.1.0.20:8080",
                "-j DNAT --to-destination [fd00:2::14]:5353",
                "-j MASQUERADE --random-fully",
                "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            ],
            NetfilterMode::Nftables => &[
                "table ip kube-proxy",
                "table ip6 kube-proxy",
                "ct state invalid drop",
                "dnat to 10.1.0.20:8080",
                "dnat to [fd00:2::14]:5353",
                "masquerade fully-random",
            ],
            NetfilterMode::None => &[],
        };
        for n in needles {
            let count = rules.matches(n).count();
            let want = if n.contains("INVALID") || n.contains("FORWARD -m") {
                2
            } else {
                1
            };
            assert!(
                count >= want,
                "node {i}: {n:?} missing from the rules:\n{rules}"
            );
        }
    }
}

/// One cluster with kube-proxy's rules of `mode`: the matrix with rp_filter strict and
/// loose, then 50 flips (strict) and agent restarts (loose) under load.
fn with_kube_proxy(mode: NetfilterMode, tag: &str) {
    let mut c = Cluster::with_netfilter(tag, bins!(), mode).expect("cluster");
    assert_rules(&c, mode);
    for rp in [1, 2] {
        c.set_rp_filter(rp).unwrap();
        matrix(&c, &format!("{mode:?} rp_filter={rp}"));
    }

    c.set_rp_filter(1).unwrap();
    let before = c.agents[0].status().unwrap();
    let syncs: u32 = c.kube_proxy.iter().map(|k| k.syncs).sum();
    let results = flip_cycles(&mut c, 50);
    let web4 = &results[0].1;
    for id in [ID_BEA, ID_BEB, ID_ACT_A, "be-c"] {
        assert!(
            web4.identities.contains_key(id),
            "{mode:?}: web v4: {id} never answered across the flips: {:?}",
            web4.identities
        );
    }
    let after = c.agents[0].status().unwrap();
    for (svc, v6) in [(WEB, false), (WEB, true), (ECHO, false), (ECHO, true)] {
        let flows = new_flows(&after, &svc, v6) - new_flows(&before, &svc, v6);
        assert!(
            flows > 0,
            "{mode:?}: {} v6={v6}: no flow translated",
            svc.name
        );
    }
    // kube-proxy followed the spare backend in and out; the pod added later got rp_filter.
    let synced: u32 = c.kube_proxy.iter().map(|k| k.syncs).sum();
    assert!(
        synced > syncs,
        "{mode:?}: kube-proxy's rules never followed the backends"
    );
    let bec = c.topo.pod("bec");
    assert!(
        listed_rules(&c, 0, mode).contains(&bec.v4().to_string()),
        "{mode:?}: the spare backend is not in kube-proxy's rules"
    );
    let rp = c
        .topo
        .node(1)
        .ns
        .exec(
            "sysctl",
            &["-n", &format!("net.ipv4.conf.{}.rp_filter", bec.host_if)],
        )
        .unwrap();
    assert_eq!(
        rp.trim(),
        "1",
        "{mode:?}: rp_filter of the later pod's veth"
    );

    c.set_rp_filter(2).unwrap();
    let before = c.agents[0].status().unwrap();
    let results = restart_rounds(&mut c, 3);
    let after = c.agents[0].status().unwrap();
    for (name, s) in &results {
        eprintln!("{mode:?} restarts: {name}: {} ok", s.ok);
    }
    for (svc, v6) in [(WEB, false), (WEB, true), (ECHO, false), (ECHO, true)] {
        let flows = new_flows(&after, &svc, v6).saturating_sub(new_flows(&before, &svc, v6));
        assert!(
            flows > 0,
            "{mode:?} restarts: {} v6={v6}: no flow translated",
            svc.name
        );
    }
    for a in &mut c.agents {
        assert!(a.alive(), "{mode:?}: agent {} died", a.label);
    } // The agents left kube-proxy's rules alone.
    assert_rules(&c, mode);
}

#[test]
fn iptables_mode() {
    require_root!();
    with_kube_proxy(NetfilterMode::Iptables, "kpi");
}

#[test]
fn nftables_mode() {
    require_root!();
    with_kube_proxy(NetfilterMode::Nftables, "kpn");
}
