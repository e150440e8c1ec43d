//! Real traffic through the two-node cluster: Serve (TCP and UDP, IPv4 and IPv6, backends on
//! both nodes), Proxy to the node-local activator, hairpin, and the status counters.
use std::collections::BTreeSet;

use redirector_tests::{
    agent::service_entries,
    bins,
    cluster::{
        Cluster, ECHO, ECHO_PROXY, ID_ACT_A, ID_BEA, ID_BEB, SERVICES, WEB, WEB_LOCAL, WEB_PROXY,
    },
    require_root,
    traffic::{run_client, ClientArgs, Summary},
};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The client pod's address and the VIP as the client must see them.
fn assert_peers(c: &Cluster, s: &Summary, svc: &redirector_tests::cluster::Svc, v6: bool) {
    let cli = c.topo.pod("cli").ip(v6).to_string();
    assert_eq!(
        s.server_peers,
        set(&[&cli]),
        "{} v6={v6}: servers must see the client's own address",
        svc.name
    );
    assert_eq!(
        s.socket_peers,
        set(&[&svc.vip(v6).to_string()]),
        "{} v6={v6}: the client must see the VIP as its peer",
        svc.name
    );
}

#[test]
fn serve_tcp_http_v4_v6() {
    require_root!();
    let c = Cluster::new("tcp", bins!()).expect("cluster");
    let cli = &c.topo.pod("cli").ns;
    for v6 in [false, true] {
        let s = run_client(&c.bins, cli, &ClientArgs::tcp(WEB.vip(v6), 60, 4, 10)).unwrap();
        s.assert_all_ok(&format!("web v6={v6}"));
        assert_eq!(s.ok, 60 + 4 * 10);
        assert_eq!(
            s.identities(),
            [ID_BEA, ID_BEB].into(),
            "web v6={v6}: both backends (node A and node B) must answer: {s:?}"
        );
        assert_eq!(
            s.unstable_conns, 0,
            "kept-alive connections changed backend: {s:?}"
        );
        assert_eq!(s.keepalive_conns, 4);
        assert_peers(&c, &s, &WEB, v6);
    }
}

#[test]
fn serve_udp_v4_v6() {
    require_root!();
    let c = Cluster::new("udp", bins!()).expect("cluster");
    let cli = &c.topo.pod("cli").ns;
    for v6 in [false, true] {
        let s = run_client(&c.bins, cli, &ClientArgs::udp(ECHO.vip(v6), 60, 4, 10)).unwrap();
        s.assert_all_ok(&format!("echo v6={v6}"));
        assert_eq!(s.ok, 60 + 4 * 10);
        assert_eq!(
            s.identities(),
            [ID_BEA, ID_BEB].into(),
            "echo v6={v6}: both backends must answer: {s:?}"
        );
        assert_eq!(s.unstable_conns, 0, "a UDP flow changed backend: {s:?}");
        assert_peers(&c, &s, &ECHO, v6);
    }
}

#[test]
fn proxy_mode_reaches_activator() {
    require_root!();
    let c = Cluster::new("prx", bins!()).expect("cluster");
    let cli = &c.topo.pod("cli").ns;
    for v6 in [false, true] {
        for svc in [WEB_PROXY, ECHO_PROXY] {
            let args = svc.client(v6, 20, 2, 10);
            let s = run_client(&c.bins, cli, &args).unwrap();
            s.assert_all_ok(&format!("{} v6={v6}", svc.name));
            assert_eq!(
                s.identities(),
                [ID_ACT_A].into(),
                "{} v6={v6}: only node A's activator may answer: {s:?}",
                svc.name
            );
            assert_peers(&c, &s, &svc, v6);
        }
    }
    let st = c.agents[0].status().unwrap();
    for e in service_entries(&st, WEB_PROXY.name) {
        assert_eq!(e["mode"], "proxy", "{e}");
        assert!(e["proxied_flows"].as_u64().unwrap() > 0, "{e}");
    }
}

#[test]
fn hairpin() {
    require_root!();
    let c = Cluster::new("hp", bins!()).expect("cluster");
    let bea = c.topo.pod("bea");
    for v6 in [false, true] {
        let s = run_client(
            &c.bins,
            &bea.ns,
            &ClientArgs::tcp(WEB_LOCAL.vip(v6), 20, 2, 10),
        )
        .unwrap();
        s.assert_all_ok(&format!("hairpin tcp v6={v6}"));
        assert_eq!(s.identities(), [ID_BEA].into(), "{s:?}");
        assert_eq!(
            s.socket_peers,
            set(&[&WEB_LOCAL.vip(v6).to_string()]),
            "hairpin v6={v6}: the pod must see the VIP as its peer"
        );
    }
    let st = c.agents[0].status().unwrap();
    assert!(
        st["counters"]["hairpin"].as_u64().unwrap() > 0,
        "hairpin counter: {}",
        st["counters"]
    );
}

#[test]
fn status_lists_services_and_counters() {
    require_root!();
    let c = Cluster::new("st", bins!()).expect("cluster");
    let cli = &c.topo.pod("cli").ns;
    for v6 in [false, true] {
        for svc in SERVICES {
            let args = svc.client(v6, 5, 0, 0);
            run_client(&c.bins, cli, &args)
                .unwrap()
                .assert_all_ok(svc.name);
        }
    }
    let st = c.agents[0].status().unwrap();
    for svc in SERVICES {
        let entries = service_entries(&st, svc.name);
        assert_eq!(entries.len(), 2, "{}: one entry per VIP: {st}", svc.name);
        let vips: BTreeSet<String> = entries
            .iter()
            .map(|e| e["vip"].as_str().unwrap().to_owned())
            .collect();
        let want: BTreeSet<String> = [svc.vip_ip(false), svc.vip_ip(true)]
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(vips, want);
        for e in entries {
            let v6 = e["vip"].as_str().unwrap().contains(':');
            assert_eq!(e["name"], format!("rt/{}", svc.name), "{e}");
            assert_eq!(e["mode"], if svc.proxy { "proxy" } else { "serve" }, "{e}");
            assert_eq!(e["port"], svc.port(), "{e}");
            assert_eq!(e["protocol"], if svc.udp() { "udp" } else { "tcp" }, "{e}");
            let backends: BTreeSet<String> = e["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_owned())
                .collect();
            let want: BTreeSet<String> = c
                .backend_addrs(svc.backends, svc.proto)
                .into_iter()
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| a.to_string())
                .collect();
            assert_eq!(backends, want, "{e}");
            for k in [
                "packets",
                "bytes",
                "reply_packets",
                "reply_bytes",
                "new_flows",
            ] {
                assert!(e[k].as_u64().unwrap() > 0, "{}: {k} is zero: {e}", svc.name);
            }
            if svc.proxy {
                assert!(e["proxied_flows"].as_u64().unwrap() > 0, "{e}");
            }
        }
    }
    assert!(st["counters"]["nat_forward"].as_u64().unwrap() > 0);
    assert!(st["counters"]["nat_reply"].as_u64().unwrap() > 0);
}
