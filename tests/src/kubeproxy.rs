//! kube-proxy's own rule sets on a test node: the ClusterIP services of a test cluster
//! rendered as kube-proxy's iptables proxier writes them (`iptables-restore` /
//! `ip6tables-restore` input: `KUBE-SERVICES` → `KUBE-SVC-*` → `KUBE-SEP-*` DNAT,
//! `KUBE-MARK-MASQ`, `KUBE-POSTROUTING`, `KUBE-NODEPORTS`, and in the filter table
//! `KUBE-FORWARD` with its conntrack-INVALID drop, `KUBE-FIREWALL` etc.) or as its nftables
//! proxier writes them (`table ip kube-proxy` / `table ip6 kube-proxy`: the `service-ips`
//! verdict map, service and endpoint chains, `filter-forward` with `ct state invalid drop`,
//! masquerading), installed into a node namespace and re-synced when the services change.
//! The endpoints are the services' real backends, as kube-proxy would have them from the
//! EndpointSlices; a node running redirector keeps these rules, so redirector must work
//! with them in place.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent::{Proto, ServiceSpec},
    netns::Netns,
};

/// Which proxier's rules a node carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetfilterMode {
    /// No netfilter rules (the namespaces as created).
    None,
    /// kube-proxy `--proxy-mode=iptables`.
    Iptables,
    /// kube-proxy `--proxy-mode=nftables`.
    Nftables,
}

/// The cluster CIDRs (`--cluster-cidr`: pod traffic from outside them is masqueraded) and
/// the service CIDRs of the test topology.
pub const CLUSTER_CIDR4: &str = "10.0.0.0/14";
pub const CLUSTER_CIDR6: &str = "fd00::/30";
pub const SERVICE_CIDR4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR6: &str = "fd00:96::/108";

/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";

/// One service port as kube-proxy sees it: the ClusterIPs of one family and its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpService {
    pub name: String,
    pub proto: Proto,
    pub vips: Vec<IpAddr>,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

impl KpService {
    /// The service's family-`v6` part (ClusterIP and endpoints), if it has one.
    pub fn from_spec(s: &ServiceSpec, v6: bool) -> Option<KpService> {
        let vips: Vec<IpAddr> = s
            .vips
            .iter()
            .filter(|v| v.is_ipv6() == v6)
            .copied()
            .collect();
        if vips.is_empty() {
            return None;
        }
        Some(KpService {
            name: s.name.clone(),
            proto: s.proto,
            vips,
            port: s.port,
            endpoints: s
                .backends
                .iter()
                .filter(|b| b.is_ipv6() == v6)
                .copied()
                .collect(),
        })
    }

    fn proto(&self) -> &'static str {
        match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// `namespace/name:port-name`.
    fn port_name(&self) -> String {
        let port = match self.proto {
            Proto::Tcp => "http",
            Proto::Udp => "dns",
        };
        format!("rt/{}:{port}", self.name)
    }
}

/// kube-proxy's chain-name hash: 16 base32 characters of a hash of the name (kube-proxy
/// uses SHA-256; any stable hash gives the same rule shapes).
pub fn hash16(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for b in s.bytes() {
        h1 = (h1 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        h2 = (h2 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x5bd1_e995);
    }
    (0..16)
        .map(|i| {
            let v = if i < 12 {
                h1 >> (i * 5)
            } else {
                h2 >> ((i - 12) * 5)
            };
            A[(v & 31) as usize] as char
        })
        .collect()
}

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
    // Filter hooks: conntrack-INVALID drop and the checks of new connections.
    let hooks = [
        (
            "filter-prerouting",
            "filter hook prerouting priority -110",
            &["ct state new jump firewall-check"][..],
        ),
        (
            "filter-forward",
            "filter hook forward priority -110",
            &[
                "ct state invalid drop",
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ][..],
        ),
        (
            "filter-input",
            "filter hook input priority -110",
            &[
                "ct state new jump nodeport-endpoints-check",
                "ct state new jump service-endpoints-check",
            ][..],
        ),
        (
            "filter-output",
            "filter hook output priority -110",
            &[
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ][..],
        ),
        (
            "filter-output-post-dnat",
            "filter hook output priority -90",
            &["ct state new jump firewall-check"][..],
        ),
        (
            "nat-prerouting",
            "nat hook prerouting priority -100",
            &["jump services"][..],
        ),
        (
            "nat-output",
            "nat hook output priority -100",
            &["jump services"][..],
        ),
        (
            "nat-postrouting",
            "nat hook postrouting priority 100",
            &["jump masquerading"][..],
        ),
    ];
    let service_cidr = if v6 { SERVICE_CIDR6 } else { SERVICE_CIDR4 };
    let plain: [(&str, Vec<String>); 7] = [
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
    ];
    for (chain, rules) in &plain {
        let _ = writeln!(s, "add chain {t} {chain}");
        for r in rules {
            let _ = writeln!(s, "add rule {t} {chain} {r}");
        }
    }
    for svc in svcs {
        nft_service(&mut s, t, af, svc, v6);
    }
    for (chain, hook, rules) in hooks {
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

/// Runs `prog args` in `ns` with `input` on stdin.
fn run_stdin(ns: &Netns, prog: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, prog])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {prog}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} {} in {} failed ({}): {}\ninput:\n{input}",
            args.join(" "),
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// kube-proxy on one node: the rules it last wrote, re-synced when the services change.
#[derive(Debug)]
pub struct KubeProxy {
    pub mode: NetfilterMode,
    /// The services of the last sync, per family (v4, v6).
    last: [Vec<KpService>; 2],
    /// iptables chains of the last sync, per family.
    chains: [BTreeSet<String>; 2],
    pub syncs: u32,
}

impl KubeProxy {
    /// Installs `mode`'s rules for `services` into the node namespace `ns`.
    pub fn install(ns: &Netns, mode: NetfilterMode, services: &[ServiceSpec]) -> Result<Self> {
        let mut kp = KubeProxy {
            mode,
            last: [Vec::new(), Vec::new()],
            chains: [BTreeSet::new(), BTreeSet::new()],
            syncs: 0,
        };
        if mode == NetfilterMode::Iptables {
            for prog in ["iptables-restore", "ip6tables-restore"] {
                run_stdin(ns, prog, &["-w"], &iptables_jumps())?;
            }
        }
        kp.write(ns, services, true)?;
        Ok(kp)
    }

    /// Writes the rules again if the services (VIPs, ports, endpoints) changed.
    pub fn sync(&mut self, ns: &Netns, services: &[ServiceSpec]) -> Result<()> {
        self.write(ns, services, false)
    }

    fn write(&mut self, ns: &Netns, services: &[ServiceSpec], force: bool) -> Result<()> {
        for (i, v6) in [false, true].into_iter().enumerate() {
            let svcs: Vec<KpService> = services
                .iter()
                .filter_map(|s| KpService::from_spec(s, v6))
                .collect();
            if !force && svcs == self.last[i] {
                continue;
            }
            match self.mode {
                NetfilterMode::None => {}
                NetfilterMode::Iptables => {
                    let prog = if v6 {
                        "ip6tables-restore"
                    } else {
                        "iptables-restore"
                    };
                    let text = iptables_sync(&svcs, v6, &self.chains[i]);
                    run_stdin(ns, prog, &["-w", "--noflush", "--counters"], &text)?;
                    self.chains[i] = iptables_service_chains(&svcs);
                }
                NetfilterMode::Nftables => {
                    run_stdin(ns, "nft", &["-f", "-"], &nft_ruleset(&svcs, v6))?;
                }
            }
            self.syncs += 1;
            self.last[i] = svcs;
        }
        Ok(())
    }
}
