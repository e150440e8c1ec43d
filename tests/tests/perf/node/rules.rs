//! The services of a node benchmark and their rule sets: kube-proxy's iptables layout
//! (`iptables-restore` input, full and MinimizeIPTablesRestore-style partial), its nftables
//! layout (full transaction and the incremental one for a changed service), and the agent's
//! TOML config for the same services.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use super::{ACT_PORT, BE_IP, BE_PORTS, NODE_IP, VIP, VIP_PORT};

/// One service: VIP:80/TCP with its endpoints.
#[derive(Clone)]
pub(super) struct Svc {
    pub(super) name: String,
    pub(super) vip: Ipv4Addr,
    pub(super) endpoints: Vec<SocketAddr>,
}

pub(super) fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `n` services; the measured one is the last. Endpoints of service `i` (other than the
/// measured one) are 10.2.0.0 + 2i (+1), port 8080: real-looking, never reached.
pub(super) fn services(n: usize, measured_eps: &[SocketAddr]) -> Vec<Svc> {
    let mut v: Vec<Svc> = (0..n.saturating_sub(1))
        .map(|i| {
            let base = u32::from(Ipv4Addr::new(10, 2, 0, 0)) + 2 * i as u32;
            Svc {
                name: format!("svc{i}"),
                vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32),
                endpoints: vec![
                    sa(Ipv4Addr::from(base), 8080),
                    sa(Ipv4Addr::from(base + 1), 8080),
                ],
            }
        })
        .collect();
    v.push(Svc {
        name: "measured".into(),
        vip: VIP,
        endpoints: measured_eps.to_vec(),
    });
    v
}

pub(super) fn serve_eps() -> Vec<SocketAddr> {
    BE_PORTS.iter().map(|p| sa(BE_IP, *p)).collect()
}

pub(super) fn act_eps() -> Vec<SocketAddr> {
    vec![sa(NODE_IP, ACT_PORT)]
}

/// kube-proxy's chain-name hash, shared with the netns tests' kube-proxy rules.
use redirector_tests::kubeproxy::hash16;

pub(super) fn svc_port_name(s: &Svc) -> String {
    format!("rt/{}:http", s.name)
}

pub(super) fn ipt_svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", svc_port_name(s))))
}

pub(super) fn ipt_sep_chain(s: &Svc, ep: SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}tcp{ep}", svc_port_name(s)))
    )
}

/// The jump rules kube-proxy ensures in the built-in chains (installed once, by hand).
pub(super) const IPT_JUMPS: &str = "*filter\n\
:KUBE-FORWARD - [0:0]\n\
:KUBE-SERVICES - [0:0]\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
COMMIT\n\
*nat\n\
:KUBE-SERVICES - [0:0]\n\
:KUBE-POSTROUTING - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
COMMIT\n";

/// kube-proxy's iptables-restore input (`--noflush`): every KUBE-* chain declared (and so
/// flushed) and rewritten. `delete` names chains to remove (stale endpoints), as kube-proxy
/// does with `-X`.
pub(super) fn iptables_rules(svcs: &[Svc], delete: &[String]) -> String {
    let mut s = String::with_capacity(svcs.len() * 900);
    s += "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n";
    s += "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n";
    s += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n";
    s += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    s += "COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";
    for svc in svcs {
        let _ = writeln!(s, ":{} - [0:0]", ipt_svc_chain(svc));
        for ep in &svc.endpoints {
            let _ = writeln!(s, ":{} - [0:0]", ipt_sep_chain(svc, *ep));
        }
    }
    for c in delete {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
    s += "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n";
    s += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    s += "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";
    for svc in svcs {
        let name = svc_port_name(svc);
        let chain = ipt_svc_chain(svc);
        let vip = svc.vip;
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -d {vip}/32 -p tcp -m tcp --dport {VIP_PORT} -j {chain}"
        );
        let _ = writeln!(
            s,
            "-A {chain} -m comment --comment \"{name} cluster IP\" -d {vip}/32 -p tcp -m tcp --dport {VIP_PORT} ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"
        );
        let n = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let sep = ipt_sep_chain(svc, *ep);
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {ep}\" -m statistic --mode random --probability {p:.11} -j {sep}"
                );
            } else {
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {ep}\" -j {sep}"
                );
            }
        }
        for ep in &svc.endpoints {
            let sep = ipt_sep_chain(svc, *ep);
            let _ = writeln!(
                s,
                "-A {sep} -m comment --comment {name} -s {}/32 -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                s,
                "-A {sep} -m comment --comment {name} -p tcp -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
    s += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    for c in delete {
        let _ = writeln!(s, "-X {c}");
    }
    s += "COMMIT\n";
    s
}

/// kube-proxy (MinimizeIPTablesRestore, the default since 1.27) rewrites KUBE-SERVICES in
/// full but only the chains of changed services.
pub(super) fn iptables_partial(svcs: &[Svc], changed: &Svc, delete: &[String]) -> String {
    let mut s = String::with_capacity(svcs.len() * 200);
    s += "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n";
    let chain = ipt_svc_chain(changed);
    let _ = writeln!(s, ":{chain} - [0:0]");
    for ep in &changed.endpoints {
        let _ = writeln!(s, ":{} - [0:0]", ipt_sep_chain(changed, *ep));
    }
    for c in delete {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for svc in svcs {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -d {}/32 -p tcp -m tcp --dport {VIP_PORT} -j {}",
            svc_port_name(svc),
            svc.vip,
            ipt_svc_chain(svc)
        );
    }
    s += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    let name = svc_port_name(changed);
    let n = changed.endpoints.len();
    for (i, ep) in changed.endpoints.iter().enumerate() {
        let sep = ipt_sep_chain(changed, *ep);
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(s, "-A {chain} -m comment --comment \"{name} -> {ep}\" -m statistic --mode random --probability {p:.11} -j {sep}");
        } else {
            let _ = writeln!(
                s,
                "-A {chain} -m comment --comment \"{name} -> {ep}\" -j {sep}"
            );
        }
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {name} -s {}/32 -j KUBE-MARK-MASQ",
            ep.ip()
        );
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {name} -p tcp -m tcp -j DNAT --to-destination {ep}"
        );
    }
    for c in delete {
        let _ = writeln!(s, "-X {c}");
    }
    s += "COMMIT\n";
    s
}

pub(super) fn nft_svc_chain(s: &Svc) -> String {
    format!(
        "service-{}-rt/{}/tcp/http",
        &hash16(&format!("{}tcp", svc_port_name(s)))[..8],
        s.name
    )
}

pub(super) fn nft_ep_chain(s: &Svc, ep: SocketAddr) -> String {
    format!(
        "endpoint-{}-rt/{}/tcp/http__{}/{}",
        &hash16(&format!("{}tcp{ep}", svc_port_name(s)))[..8],
        s.name,
        ep.ip(),
        ep.port()
    )
}

pub(super) fn nft_service_rules(s: &mut String, svc: &Svc) {
    const T: &str = "ip kube-proxy";
    for ep in &svc.endpoints {
        let c = nft_ep_chain(svc, *ep);
        let _ = writeln!(s, "add chain {T} {c}");
        let _ = writeln!(s, "flush chain {T} {c}");
        let _ = writeln!(
            s,
            "add rule {T} {c} ip saddr {} jump mark-for-masquerade",
            ep.ip()
        );
        let _ = writeln!(s, "add rule {T} {c} meta l4proto tcp dnat to {ep}");
    }
    let c = nft_svc_chain(svc);
    let _ = writeln!(s, "add chain {T} {c}");
    let _ = writeln!(s, "flush chain {T} {c}");
    let _ = writeln!(
        s,
        "add rule {T} {c} ip daddr {} tcp dport {VIP_PORT} ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        svc.vip
    );
    let vmap: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(svc, *ep)))
        .collect();
    let _ = writeln!(
        s,
        "add rule {T} {c} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        vmap.join(" , ")
    );
}

/// The nftables proxier's layout, as one full transaction (the table is replaced).
pub(super) fn nft_rules(svcs: &[Svc]) -> String {
    const T: &str = "ip kube-proxy";
    let mut s = String::with_capacity(svcs.len() * 1000);
    let _ = writeln!(s, "add table {T}\ndelete table {T}");
    let _ = writeln!(s, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(s, "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(s, "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    let _ = writeln!(s, "add chain {T} mark-for-masquerade");
    let _ = writeln!(
        s,
        "add rule {T} mark-for-masquerade meta mark set meta mark or 0x4000"
    );
    let _ = writeln!(s, "add chain {T} masquerading");
    let _ = writeln!(
        s,
        "add rule {T} masquerading meta mark & 0x4000 == 0 return"
    );
    let _ = writeln!(
        s,
        "add rule {T} masquerading meta mark set meta mark xor 0x4000"
    );
    let _ = writeln!(s, "add rule {T} masquerading masquerade fully-random");
    for svc in svcs {
        nft_service_rules(&mut s, svc);
    }
    let _ = writeln!(s, "add chain {T} services");
    let _ = writeln!(
        s,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(s, "add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports");
    let _ = writeln!(s, "add chain {T} nat-prerouting {{ type nat hook prerouting priority dstnat ; policy accept ; }}");
    let _ = writeln!(s, "add rule {T} nat-prerouting jump services");
    let _ = writeln!(
        s,
        "add chain {T} nat-output {{ type nat hook output priority -100 ; policy accept ; }}"
    );
    let _ = writeln!(s, "add rule {T} nat-output jump services");
    let _ = writeln!(s, "add chain {T} nat-postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}");
    let _ = writeln!(s, "add rule {T} nat-postrouting jump masquerading");
    let _ = writeln!(s, "add chain {T} filter-forward {{ type filter hook forward priority -110 ; policy accept ; }}");
    let _ = writeln!(s, "add rule {T} filter-forward ct state invalid drop");
    for chunk in svcs.chunks(1000) {
        let el: Vec<String> = chunk
            .iter()
            .map(|svc| {
                format!(
                    "{} . tcp . {VIP_PORT} : goto {}",
                    svc.vip,
                    nft_svc_chain(svc)
                )
            })
            .collect();
        let _ = writeln!(s, "add element {T} service-ips {{ {} }}", el.join(" , "));
    }
    s
}

/// What the nftables proxier actually sends on an endpoint change: the changed chains only.
pub(super) fn nft_incremental(changed: &Svc, delete: &[String]) -> String {
    let mut s = String::new();
    nft_service_rules(&mut s, changed);
    for c in delete {
        let _ = writeln!(s, "delete chain ip kube-proxy {c}");
    }
    s
}

pub(super) fn agent_toml(pin: &Path, svcs: &[Svc], proxy: &str) -> String {
    let mut s = String::with_capacity(svcs.len() * 160);
    let _ = writeln!(
        s,
        "[node]\nuplink = [\"rdu-none*\"]\npod_interfaces = [\"rdp-*\"]\ncgroup = \"off\""
    );
    let _ = writeln!(s, "pin_path = \"{}\"", pin.display());
    let _ = writeln!(s, "activator = [\"{NODE_IP}:{ACT_PORT}\"]");
    let _ = writeln!(s, "\n[activator]\nlisten = false");
    for svc in svcs {
        let eps: Vec<String> = svc.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let mode = if svc.name == proxy { "proxy" } else { "serve" };
        let _ = writeln!(
            s,
            "\n[[service]]\nname = \"{}\"\nnamespace = \"rt\"\nvip = [\"{}\"]\nport = {VIP_PORT}\nprotocol = \"tcp\"\nmode = \"{mode}\"\nbackends = [{}]",
            svc.name,
            svc.vip,
            eps.join(", ")
        );
    }
    s
}
