//! The datapath on nodes whose netfilter drops what its conntrack calls INVALID (kube-proxy
//! installs `-A FORWARD -m conntrack --ctstate INVALID -j DROP`) and whose rp_filter is
//! strict: Serve TCP to a local and to a remote backend, IPv4 and IPv6. Replies must cross
//! the node's stack with the tuple its conntrack saw the request leave with (backend →
//! client), and be given the VIP as source only after it (tc egress).
use redirector_tests::{
    bins,
    cluster::{Cluster, ID_BEA, ID_BEB, WEB_LOCAL, WEB_REMOTE},
    require_root,
    traffic::{run_client, ClientArgs},
};

/// kube-proxy's INVALID drop in FORWARD (both families) and strict reverse-path filtering
/// on every interface of the node.
fn harden(c: &Cluster) {
    for node in &c.topo.nodes {
        for ipt in ["iptables", "ip6tables"] {
            node.ns
                .exec(
                    ipt,
                    &[
                        "-A",
                        "FORWARD",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "INVALID",
                        "-j",
                        "DROP",
                    ],
                )
                .unwrap_or_else(|e| panic!("{ipt} in node {}: {e:#}", node.index));
        }
        node.ns.sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
        node.ns
            .sysctl("net.ipv4.conf.default.rp_filter", "1")
            .unwrap();
        for ifname in node.interfaces().unwrap() {
            node.ns
                .sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "1")
                .unwrap();
        }
    }
}

#[test]
fn serve_tcp_through_conntrack_invalid_drop_and_strict_rp_filter() {
    require_root!();
    let c = Cluster::new("nf", bins!()).expect("cluster");
    harden(&c);
    let cli = &c.topo.pod("cli").ns;
    for (svc, id) in [(WEB_LOCAL, ID_BEA), (WEB_REMOTE, ID_BEB)] {
        for v6 in [false, true] {
            let what = format!("{} v6={v6}", svc.name);
            let s = run_client(&c.bins, cli, &ClientArgs::tcp(svc.vip(v6), 10, 2, 5)).unwrap();
            println!("{what}: {} of {} succeeded", s.ok, 10 + 2 * 5);
            s.assert_all_ok(&what);
            assert_eq!(s.ok, 10 + 2 * 5, "{what}: {s:?}");
            assert_eq!(s.identities(), [id].into(), "{what}: {s:?}");
        }
    }
    // The rules stayed in place for the whole run.
    for node in &c.topo.nodes {
        let rules = node.ns.exec("iptables", &["-S", "FORWARD"]).unwrap();
        assert!(rules.contains("INVALID"), "node {}: {rules}", node.index);
    }
}
