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
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

mod iptables;
mod nftables;
pub use iptables::{iptables_jumps, iptables_service_chains, iptables_sync};
pub use nftables::nft_ruleset;

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
pub(crate) const MASQ_MARK: &str = "0x4000";

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

    pub(crate) fn proto(&self) -> &'static str {
        match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// `namespace/name:port-name`.
    pub(crate) fn port_name(&self) -> String {
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
