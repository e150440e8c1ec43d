//! The socket path: clients in a node's cgroup are translated at `connect()` / `sendmsg()`
//! by that node's agent. Each test asserts what the application sees (the VIP as its peer,
//! the VIP as a datagram's source), what the servers see (the client's own address), and
//! that the packet path translated nothing of it, on nodes that drop conntrack-INVALID
//! packets in FORWARD as kube-proxy does.
use std::time::Duration;

use redirector_tests::{
    bins,
    cluster::{Cluster, ECHO, ID_ACT_A, ID_BEA, ID_BEB, WEB, WEB_LOCAL, WEB_PROXY, WEB_REMOTE},
    netns::wait_for,
    require_root,
    traffic::{run_client, ClientLoop},
};
use serde_json::Value;

fn counter(st: &Value, name: &str) -> u64 {
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {st}"))
}

/// kube-proxy's FORWARD drop of conntrack-INVALID packets (both its iptables and its
/// nftables mode install it), on both nodes, IPv4 and IPv6.
fn drop_invalid(c: &Cluster) {
    for i in 0..2 {
        let ns = &c.topo.node(i).ns;
        for tool in ["iptables", "ip6tables"] {
            ns.exec(
                tool,
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
            .expect(tool);
        }
        ns.sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
    }
}

/// `socket_flows` of the status entry of `vip` on node A.
fn socket_flows(c: &Cluster, vip: std::net::SocketAddr) -> u64 {
    let st = c.agents[0].status().unwrap();
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["vip"] == vip.ip().to_string() && e["port"] == vip.port())
        .and_then(|e| e["socket_flows"].as_u64())
        .unwrap_or_else(|| panic!("no socket_flows for {vip}: {st}"))
}

#[test]
fn serve_at_the_socket_tcp_udp_v4_v6() {
    require_root!();
    let c = Cluster::with_socket_hooks("sk", bins!()).expect("cluster");
    drop_invalid(&c);
    let cli = c.topo.pod("cli");
    let before = c.agents[0].status().unwrap();
    for v6 in [false, true] {
        for svc in [WEB, ECHO] {
            let args = svc.client(v6, 30, 2, 5).in_cgroup(&c.cgroups[0].path);
            let s = run_client(&c.bins, &cli.ns, &args).unwrap();
            let what = format!("{} v6={v6}", svc.name);
            s.assert_all_ok(&what);
            assert_eq!(
                s.identities(),
                [ID_BEA, ID_BEB].into(),
                "{what}: both backends must answer: {s:?}"
            );
            assert_eq!(
                s.socket_peers,
                [svc.vip(v6).to_string()].into(),
                "{what}: getpeername / recvfrom must show the VIP"
            );
            assert_eq!(
                s.server_peers,
                [cli.ip(v6).to_string()].into(),
                "{what}: servers must see the client's own address"
            );
            assert_eq!(s.unstable_conns, 0, "{what}: {s:?}");
        }
    }
    let after = c.agents[0].status().unwrap();
    assert!(
        counter(&after, "socket_translated") >= counter(&before, "socket_translated") + 4 * 32,
        "connect()/sendmsg() translated by the socket hooks: {after}"
    );
    assert!(counter(&after, "socket_reversed") > counter(&before, "socket_reversed"));
    assert_eq!(
        counter(&after, "nat_forward"),
        counter(&before, "nat_forward"),
        "the packet path must translate none of these flows: {after}"
    );
}

#[test]
fn host_processes_reach_vips() {
    require_root!();
    let c = Cluster::with_socket_hooks("skh", bins!()).expect("cluster");
    drop_invalid(&c);
    let node = &c.topo.node(0).ns;
    for v6 in [false, true] {
        for svc in [WEB, ECHO] {
            let args = svc.client(v6, 10, 1, 5).in_cgroup(&c.cgroups[0].path);
            let s = run_client(&c.bins, node, &args).unwrap();
            let what = format!("host {} v6={v6}", svc.name);
            s.assert_all_ok(&what);
            assert_eq!(s.identities(), [ID_BEA, ID_BEB].into(), "{what}: {s:?}");
            assert_eq!(s.socket_peers, [svc.vip(v6).to_string()].into(), "{what}");
        }
    }
}

#[test]
fn a_connected_socket_keeps_its_target_across_a_flip() {
    require_root!();
    let mut c = Cluster::with_socket_hooks("skf", bins!()).expect("cluster");
    let args = WEB_LOCAL
        .client(false, 0, 2, 0)
        .in_cgroup(&c.cgroups[0].path);
    let stop = c.dir.0.join("stop-flip");
    let lp = ClientLoop::start(&c.bins, &c.topo.pod("cli").ns, &args, stop).unwrap();
    // The scaler's signal for these flows: open sockets, counted from SOCK_FLOWS.
    wait_for("two live socket flows", Duration::from_secs(5), || {
        (socket_flows(&c, WEB_LOCAL.vip(false)) == 2).then_some(())
    })
    .unwrap();
    c.update_configs(|cfg| cfg.service_mut(WEB_LOCAL.name).proxy = true)
        .unwrap();
    wait_for("web-local in proxy", Duration::from_secs(10), || {
        let st = c.agents[0].status().ok()?;
        redirector_tests::agent::service_mode_is(&st, WEB_LOCAL.name, "proxy").then_some(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let s = lp.stop().unwrap();
    // Released sockets are no longer live flows (sock_release).
    wait_for("socket flows released", Duration::from_secs(5), || {
        (socket_flows(&c, WEB_LOCAL.vip(false)) == 0).then_some(())
    })
    .unwrap();
    s.assert_all_ok("kept-alive across the flip");
    assert!(s.ok > 20, "{s:?}");
    assert_eq!(
        s.identities(),
        [ID_BEA].into(),
        "connected sockets must keep their backend after the flip: {s:?}"
    );
    // New connections follow the new mode (the node-local activator).
    let s = run_client(
        &c.bins,
        &c.topo.pod("cli").ns,
        &WEB_LOCAL
            .client(false, 10, 0, 0)
            .in_cgroup(&c.cgroups[0].path),
    )
    .unwrap();
    s.assert_all_ok("new flows after the flip");
    assert_eq!(s.identities(), [ID_ACT_A].into(), "{s:?}");
}

#[test]
fn a_cgroup_that_is_not_cgroup2_leaves_the_packet_path() {
    require_root!();
    let c = Cluster::new_with("skx", bins!(), |cfg| {
        cfg.cgroup = Some("/proc".into());
    })
    .expect("cluster");
    let log = c.agents[0].log();
    assert!(
        log.contains("socket hooks not attached") && log.contains("not a cgroup v2 directory"),
        "{log}"
    );
    let s = run_client(&c.bins, &c.topo.pod("cli").ns, &WEB.client(false, 10, 0, 0)).unwrap();
    s.assert_all_ok("packet path");
    assert!(
        !c.agents[0].pin_path.join("links/cgroup@connect4").exists(),
        "no socket hook may be left attached"
    );
}

/// Runs `rt-collide` in `ns` (in `cgroup` if given): two connections from one local port to
/// `to[0]` and `to[1]` at once, `rounds` times.
fn collide(
    ns: &redirector_tests::netns::Netns,
    cgroup: Option<&std::path::Path>,
    bind: std::net::SocketAddr,
    to: [std::net::SocketAddr; 2],
) -> Value {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_rt-collide"));
    redirector_tests::cgroup::place(&mut cmd, cgroup).unwrap();
    let out = cmd
        .args(["--bind", &bind.to_string(), "--rounds", "10"])
        .args(["--to", &to[0].to_string(), "--to", &to[1].to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "rt-collide: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two proxied VIPs, one client port: the flows go to the node-local activator on a port of
/// each service's own, so they never share a tuple, on the socket path and on the packet
/// path alike; the activator knows each flow's service from its port (these services are
/// raw TCP: no header could name them).
#[test]
fn one_client_port_to_two_proxied_vips() {
    require_root!();
    let c = Cluster::with_node_activators("skc", bins!(), |cfg| {
        cfg.service_mut(WEB_LOCAL.name).proxy = true;
    })
    .expect("cluster");
    drop_invalid(&c);
    let log = c.agents[0].log();
    assert!(
        log.contains("activator ports per service"),
        "per-service ports must be on: {log}"
    );
    let cli = c.topo.pod("cli");
    for v6 in [false, true] {
        let to = [WEB_PROXY.vip(v6), WEB_LOCAL.vip(v6)];
        for (path, cg) in [
            ("socket", Some(c.cgroups[0].path.as_path())),
            ("packet", None),
        ] {
            let bind =
                std::net::SocketAddr::new(cli.ip(v6), if cg.is_some() { 41000 } else { 42000 });
            let r = collide(&cli.ns, cg, bind, to);
            let what = format!("{path} path v6={v6}");
            assert_eq!(r["failed"], 0, "{what}: {r}");
            assert_eq!(r["ok"], 20, "{what}: {r}");
            assert_eq!(r["ids"][1], serde_json::json!([ID_BEA]), "{what}: {r}");
            let first: Vec<&str> = r["ids"][0]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                first.iter().all(|id| [ID_BEA, ID_BEB].contains(id)),
                "{what}: {r}"
            );
            assert_eq!(
                r["peers"][0],
                serde_json::json!([to[0].to_string()]),
                "{what}"
            );
            assert_eq!(
                r["peers"][1],
                serde_json::json!([to[1].to_string()]),
                "{what}"
            );
        }
    }
    // The activator takes only delivered flows: the socket path's were admitted by tuple
    // (2 flows × 10 rounds × 2 families), the packet path's by their conntrack entry, and
    // none was refused.
    let st = c.agents[0].status().unwrap();
    assert!(log.contains("activator on loopback"), "{log}");
    assert!(counter(&st, "activator_admitted") >= 40, "{st}");
    assert_eq!(counter(&st, "activator_refused"), 0, "{st}");
    // A restart rewrites no entry (the ports are decided before the first write) and the
    // new agent's listener takes the ports over (the pinned sk_lookup link is updated).
    let generations = |c: &Cluster| -> Vec<Value> {
        let st = c.agents[0].status().unwrap();
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| serde_json::json!([e["vip"], e["generation"], e["activator"]]))
            .collect()
    };
    let before = generations(&c);
    let mut c = c;
    c.agents[0].stop().unwrap();
    c.agents[0].spawn().unwrap();
    assert_eq!(
        generations(&c),
        before,
        "a restart must not rewrite the services"
    );
    let cli = c.topo.pod("cli");
    let bind = std::net::SocketAddr::new(cli.ip(false), 44000);
    let to = [WEB_PROXY.vip(false), WEB_LOCAL.vip(false)];
    let r = collide(&cli.ns, Some(c.cgroups[0].path.as_path()), bind, to);
    assert_eq!(r["ok"], 20, "after the restart: {r}");
}

/// Agents restarted three times under load from the node's cgroup (new connections and
/// kept-alive ones, TCP and UDP): no request fails, the restarted agent swaps its programs
/// into the pinned cgroup links, and uninstall leaves no program on the cgroup.
#[test]
fn agent_restart_under_socket_load() {
    require_root!();
    let mut c = Cluster::with_socket_hooks("skr", bins!()).expect("cluster");
    drop_invalid(&c);
    let mut loops = Vec::new();
    for (svc, v6) in [(WEB, false), (WEB, true), (ECHO, false), (ECHO, true)] {
        let mut args = svc.client(v6, 2, 2, 0).in_cgroup(&c.cgroups[0].path);
        args.interval_ms = 10;
        let stop = c.dir.0.join(format!("stop-{}-{v6}", svc.name));
        let name = format!("{} v6={v6}", svc.name);
        loops.push((
            name,
            ClientLoop::start(&c.bins, &c.topo.pod("cli").ns, &args, stop).unwrap(),
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        for a in c.agents.iter_mut() {
            a.stop()
                .unwrap_or_else(|e| panic!("round {round}: stopping: {e:#}"));
            std::thread::sleep(Duration::from_millis(300));
            a.spawn()
                .unwrap_or_else(|e| panic!("round {round}: restarting: {e:#}"));
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (name, lp) in loops {
        let s = lp.stop().unwrap();
        s.assert_all_ok(&name);
        assert!(s.ok > 50, "{name}: {s:?}");
    }
    let log = c.agents[0].log();
    assert!(
        log.contains("replaced=10 attached=0"),
        "links not updated in place: {log}"
    );
    let st = c.agents[0].status().unwrap();
    assert_eq!(
        counter(&st, "nat_forward"),
        0,
        "all of it on the socket path: {st}"
    );
    // Uninstall: no program left on the node's cgroup.
    let cg = c.cgroups[0].path.clone();
    let pin = c.agents[0].pin_path.clone();
    c.agents[0].stop().unwrap();
    let out = std::process::Command::new(&c.agents[0].bin)
        .args(["uninstall", "--pin-path"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let show =
        redirector_tests::netns::run("bpftool", &["cgroup", "show", cg.to_str().unwrap()]).unwrap();
    assert!(
        !show.contains("connect"),
        "programs left on {}: {show}",
        cg.display()
    );
}

/// Two Serve VIPs whose pick is the same backend, from one bound client port at once: the
/// real tuples are the same, so on the socket path the kernel refuses the second
/// `connect()` (EADDRNOTAVAIL), exactly as for two direct connections; the first is never
/// disturbed.
#[test]
fn one_client_port_to_two_serve_vips_with_one_backend() {
    require_root!();
    let c = Cluster::with_node_activators("sks", bins!(), |cfg| {
        let b = cfg.service_mut(WEB_LOCAL.name).backends.clone();
        cfg.service_mut(WEB_REMOTE.name).backends = b;
    })
    .expect("cluster");
    let cli = c.topo.pod("cli");
    let bind = std::net::SocketAddr::new(cli.ip(false), 43000);
    let to = [WEB_LOCAL.vip(false), WEB_REMOTE.vip(false)];
    let r = collide(&cli.ns, Some(c.cgroups[0].path.as_path()), bind, to);
    assert_eq!(r["ok"], 10, "one of each pair is answered: {r}");
    assert_eq!(r["failed"], 10, "{r}");
    for e in r["errors"].as_array().unwrap() {
        let e = e.as_str().unwrap();
        assert!(e.contains("connect") && e.contains("os error 99"), "{e}");
    }
    let ids: Vec<&Value> = [&r["ids"][0], &r["ids"][1]]
        .into_iter()
        .flat_map(|v| v.as_array().unwrap())
        .collect();
    assert!(ids.iter().all(|i| *i == ID_BEA), "{r}");
}
