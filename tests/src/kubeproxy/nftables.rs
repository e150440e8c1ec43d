//! kube-proxy's nftables proxier layout: `table ip kube-proxy` / `table ip6 kube-proxy`
//! with the service-ips verdict map, service and endpoint chains, the filter hooks
//! (`filter-forward`'s `ct state invalid drop`) and masquerading.
use std::{fmt::Write as _, net::SocketAddr};

use super::{
    hash16, KpService, CLUSTER_CIDR4, CLUSTER_CIDR6, MASQ_MARK, SERVICE_CIDR4, SERVICE_CIDR6,
};

/// The family's nftables words: (table family, address keyword, address type).
fn nft_family(v6: bool) -> (&'static str, &'static str, &'static str) {
    if v6 {
        ("ip6", "ip6", "ipv6_addr")
    } else {
        ("ip", "ip", "ipv4_addr")
    }
}

fn nft_svc_chain(s: &KpService) -> String {
    let hash = hash16(&format!("{}{}", s.port_name(), s.proto()));
    let port = s.port_name();
    let (ns_name, port_name) = port.split_once(':').unwrap_or((&port, ""));
    format!("service-{}-{ns_name}/{}/{port_name}", &hash[..8], s.proto())
}

fn nft_ep_chain(s: &KpService, ep: SocketAddr) -> String {
    let hash = hash16(&format!("{}{}{ep}", s.port_name(), s.proto()));
    let port = s.port_name();
    let (ns_name, port_name) = port.split_once(':').unwrap_or((&port, ""));
    // IPv6 colons would end the name: kube-proxy writes them as dots.
    let ip = ep.ip().to_string().replace(':', ".");
    format!(
        "endpoint-{}-{ns_name}/{}/{port_name}__{ip}/{}",
        &hash[..8],
        s.proto(),
        ep.port()
    )
}

fn nft_service(s: &mut String, t: &str, af: &str, svc: &KpService, v6: bool) {
    let p = svc.proto();
    for ep in &svc.endpoints {
        let c = nft_ep_chain(svc, *ep);
        let _ = writeln!(s, "add chain {t} {c}");
        let _ = writeln!(
            s,
            "add rule {t} {c} {af} saddr {} jump mark-for-masquerade",
            ep.ip()
        );
        let _ = writeln!(s, "add rule {t} {c} meta l4proto {p} dnat to {ep}");
    }
    let c = nft_svc_chain(svc);
    let cidr = if v6 { CLUSTER_CIDR6 } else { CLUSTER_CIDR4 };
    let _ = writeln!(s, "add chain {t} {c}");
    for vip in &svc.vips {
        let _ = writeln!(s, "add rule {t} {c} {af} daddr {vip} {p} dport {} {af} saddr != {cidr} jump mark-for-masquerade", svc.port);
    }
    if !svc.endpoints.is_empty() {
        let vmap: Vec<String> = svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(svc, *ep)))
            .collect();
        let _ = writeln!(
            s,
            "add rule {t} {c} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            vmap.join(" , ")
        );
    }
}

/// A base chain: name, hook and priority, rules.
type Hook = (&'static str, &'static str, &'static [&'static str]);

/// The base chains and their rules: the conntrack-INVALID drop, the checks of new
/// connections, DNAT and masquerading.
const NFT_HOOKS: [Hook; 8] = [
    (
        "filter-prerouting",
        "filter hook prerouting priority -110",
        &["ct state new jump firewall-check"],
    ),
    (
        "filter-forward",
        "filter hook forward priority -110",
        &[
            "ct state invalid drop",
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ],
    ),
    (
        "filter-input",
        "filter hook input priority -110",
        &[
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ],
    ),
    (
        "filter-output",
        "filter hook output priority -110",
        &[
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ],
    ),
    (
        "filter-output-post-dnat",
        "filter hook output priority -90",
        &["ct state new jump firewall-check"],
    ),
    (
        "nat-prerouting",
        "nat hook prerouting priority -100",
        &["jump services"],
    ),
    (
        "nat-output",
        "nat hook output priority -100",
        &["jump services"],
    ),
    (
        "nat-postrouting",
        "nat hook postrouting priority 100",
        &["jump masquerading"],
    ),
];

/// The sets and verdict maps of the table.
fn nft_maps(s: &mut String, t: &str, addr: &str) {
    let maps = [
        (
            "service-ips",
            true,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        ("service-nodeports", false, "NodePort traffic"),
        (
            "no-endpoint-services",
            true,
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "no-endpoint-nodeports",
            false,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "firewall-ips",
            true,
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
    ];
    for (name, with_addr, comment) in maps {
        let key = if with_addr {
            format!("{addr} . inet_proto . inet_service")
        } else {
            "inet_proto . inet_service".to_owned()
        };
        let _ = writeln!(
            s,
            "add map {t} {name} {{ type {key} : verdict ; comment \"{comment}\" ; }}"
        );
    }
}

/// The regular chains every sync writes whatever the services.
fn nft_plain_chains(af: &str, v6: bool) -> [(&'static str, Vec<String>); 7] {
    let service_cidr = if v6 { SERVICE_CIDR6 } else { SERVICE_CIDR4 };
    [
        ("firewall-check", vec![format!("{af} daddr . meta l4proto . th dport vmap @firewall-ips")]),
        ("cluster-ips-check", vec![
            format!("{af} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
            format!("{af} daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        ]),
        ("service-endpoints-check", vec![format!("{af} daddr . meta l4proto . th dport vmap @no-endpoint-services")]),
        ("nodeport-endpoints-check", vec![format!("{af} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports")]),
        ("mark-for-masquerade", vec![format!("meta mark set meta mark or {MASQ_MARK}")]),
        ("masquerading", vec![
            format!("meta mark & {MASQ_MARK} == 0 return"),
            format!("meta mark set meta mark xor {MASQ_MARK}"),
            "masquerade fully-random".to_owned(),
        ]),
        ("services", vec![
            format!("{af} daddr . meta l4proto . th dport vmap @service-ips"),
            format!("{af} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
        ]),
    ]
}

/// The nftables proxier's table of family `v6`, as one transaction that replaces it.
pub fn nft_ruleset(svcs: &[KpService], v6: bool) -> String {
    let (fam, af, addr) = nft_family(v6);
    let t = format!("{fam} kube-proxy");
    let t = t.as_str();
    let mut s = String::new();
    let _ = writeln!(s, "add table {t}\ndelete table {t}");
    let _ = writeln!(s, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(
        s,
        "add set {t} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(s, "add set {t} nodeport-ips {{ type {addr} ; comment \"IPs that accept NodePort traffic\" ; }}");
    nft_maps(&mut s, t, addr);
    let plain = nft_plain_chains(af, v6);
    for (chain, rules) in &plain {
        let _ = writeln!(s, "add chain {t} {chain}");
        for r in rules {
            let _ = writeln!(s, "add rule {t} {chain} {r}");
        }
    }
    for svc in svcs {
        nft_service(&mut s, t, af, svc, v6);
    }
    for (chain, hook, rules) in NFT_HOOKS {
        let _ = writeln!(
            s,
            "add chain {t} {chain} {{ type {hook} ; policy accept ; }}"
        );
        for r in rules {
            let _ = writeln!(s, "add rule {t} {chain} {r}");
        }
    }
    for svc in svcs {
        for vip in &svc.vips {
            let _ = writeln!(s, "add element {t} cluster-ips {{ {vip} }}");
            let (p, port, c) = (svc.proto(), svc.port, nft_svc_chain(svc));
            let _ = writeln!(
                s,
                "add element {t} service-ips {{ {vip} . {p} . {port} : goto {c} }}"
            );
        }
    }
    s
}
