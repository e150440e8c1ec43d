//! kube-proxy's iptables proxier layout: the jumps in the built-in chains and the
//! `iptables-restore --noflush` input of each sync (filter `KUBE-FORWARD` with the
//! conntrack-INVALID drop, `KUBE-FIREWALL`; nat `KUBE-SERVICES` → `KUBE-SVC-*` →
//! `KUBE-SEP-*`, `KUBE-MARK-MASQ`, `KUBE-POSTROUTING`, `KUBE-NODEPORTS`).
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use super::{hash16, KpService, CLUSTER_CIDR4, CLUSTER_CIDR6, MASQ_MARK};

fn svc_chain(s: &KpService) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&format!("{}{}", s.port_name(), s.proto()))
    )
}

fn sep_chain(s: &KpService, ep: SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}{}{ep}", s.port_name(), s.proto()))
    )
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// The jumps kube-proxy ensures in the built-in chains (it checks and inserts them with
/// `iptables -C/-I` before each sync; here restored once with the tables flushed), with the
/// mangle-table canaries.
pub fn iptables_jumps() -> String {
    let mut s = String::new();
    s += "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n";
    s += "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n";
    for c in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-KUBELET-CANARY",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-CANARY",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    const NEW: &str = "-m conntrack --ctstate NEW -m comment --comment";
    let _ = writeln!(
        s,
        "-A INPUT {NEW} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    );
    s += "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n";
    let _ = writeln!(s, "-A INPUT {NEW} \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES");
    s += "-A INPUT -j KUBE-FIREWALL\n";
    let _ = writeln!(
        s,
        "-A FORWARD {NEW} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    );
    s += "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n";
    let _ = writeln!(
        s,
        "-A FORWARD {NEW} \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(s, "-A FORWARD {NEW} \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES");
    let _ = writeln!(
        s,
        "-A OUTPUT {NEW} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    );
    let _ = writeln!(
        s,
        "-A OUTPUT {NEW} \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    s += "-A OUTPUT -j KUBE-FIREWALL\nCOMMIT\n";
    s += "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n";
    s += ":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n";
    s += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";
    s += "COMMIT\n";
    s
}

/// Every `KUBE-SVC-*` / `KUBE-SEP-*` chain of `svcs`.
pub fn iptables_service_chains(svcs: &[KpService]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for svc in svcs {
        out.insert(svc_chain(svc));
        for ep in &svc.endpoints {
            out.insert(sep_chain(svc, *ep));
        }
    }
    out
}

fn iptables_service(s: &mut String, svc: &KpService, v6: bool) {
    let name = svc.port_name();
    let chain = svc_chain(svc);
    let (p, port) = (svc.proto(), svc.port);
    let cidr = if v6 { CLUSTER_CIDR6 } else { CLUSTER_CIDR4 };
    for vip in &svc.vips {
        let d = host_prefix(*vip);
        let _ = writeln!(s, "-A KUBE-SERVICES -d {d} -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {port} -j {chain}");
        let _ = writeln!(s, "-A {chain} ! -s {cidr} -d {d} -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {port} -j KUBE-MARK-MASQ");
    }
    let n = svc.endpoints.len();
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let sep = sep_chain(svc, *ep);
        let pick = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "-A {chain} -m comment --comment \"{name} -> {ep}\"{pick} -j {sep}"
        );
    }
    for ep in &svc.endpoints {
        let sep = sep_chain(svc, *ep);
        let src = host_prefix(ep.ip());
        let _ = writeln!(
            s,
            "-A {sep} -s {src} -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            s,
            "-A {sep} -p {p} -m comment --comment \"{name}\" -m {p} -j DNAT --to-destination {ep}"
        );
    }
}

/// kube-proxy's sync (`iptables-restore --noflush`): every KUBE-* chain it owns declared
/// (so flushed) and written again; `stale` chains (services or endpoints gone) deleted.
pub fn iptables_sync(svcs: &[KpService], v6: bool, stale: &BTreeSet<String>) -> String {
    let mut s = String::new();
    s += "*filter\n";
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    if !v6 {
        s += "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n";
    }
    s += "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n";
    let _ = writeln!(s, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT");
    s += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    s += "COMMIT\n*nat\n";
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let live = iptables_service_chains(svcs);
    for c in live.iter().chain(stale.difference(&live)) {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let _ = writeln!(
        s,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(s, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    s += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    let _ = writeln!(s, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    for svc in svcs {
        iptables_service(&mut s, svc, v6);
    }
    s += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    for c in stale.difference(&live) {
        let _ = writeln!(s, "-X {c}");
    }
    s += "COMMIT\n";
    s
}
