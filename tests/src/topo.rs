//! The two-node topology: node namespaces A and B joined by a veth "wire" (uplinks, named
//! `rdu-*`), pod namespaces attached to their node by veth (node side `rdp-<pod>`), IPv4 and
//! IPv6 everywhere.
//!
//! Addresses (node index i = 0 for A, 1 for B; all inside the test's namespaces):
//! - node i on the wire: `10.100.0.(i+1)/24`, `fd00:100::(i+1)/64`; gateway for its pods
//!   `10.(i+1).0.1` (on `lo`) and `fe80::1` (on every pod-facing veth);
//! - pod `h` on node i: `10.(i+1).0.h/32`, `fd00:(i+1)::h/128`; pod CIDRs `10.(i+1).0.0/24`,
//!   `fd00:(i+1)::/64`, routed over the wire by the other node.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _, Result};

use crate::netns::{unique, Netns};

/// One node: a network namespace with forwarding on.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pub index: u8,
    /// Uplink (wire end) name in this node.
    pub uplink: String,
}

impl Node {
    /// The node's address on the wire.
    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 100, 0, self.index + 1)
    }
    pub fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, self.index as u16 + 1)
    }
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.v6().into()
        } else {
            self.v4().into()
        }
    }
    /// Every veth end in this namespace.
    pub fn interfaces(&self) -> Result<Vec<String>> {
        self.ns.interfaces()
    }

    /// Reverse-path filtering (`rp_filter`, 0 off, 1 strict, 2 loose) on `all`, on
    /// `default` (interfaces created later, such as pods added afterwards) and on every
    /// interface now in the node namespace, `lo` included.
    pub fn set_rp_filter(&self, mode: u8) -> Result<()> {
        let mut keys = vec!["all".to_owned(), "default".to_owned(), "lo".to_owned()];
        keys.extend(self.interfaces()?);
        for k in keys {
            self.ns
                .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), &mode.to_string())?;
        }
        Ok(())
    }
}

/// One pod: a namespace with `eth0`, attached to a node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub node: u8,
    pub host: u8,
    /// Node-side veth end.
    pub host_if: String,
}

impl Pod {
    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.node + 1, 0, self.host)
    }
    pub fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            self.node as u16 + 1,
            0,
            0,
            0,
            0,
            0,
            self.host as u16,
        )
    }
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.v6().into()
        } else {
            self.v4().into()
        }
    }
}

/// Nodes and pods; dropping it deletes every namespace (pods first).
#[derive(Debug)]
pub struct Topology {
    pub tag: String,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
}

const NODE_LETTERS: [char; 2] = ['a', 'b'];

impl Topology {
    /// Creates nodes A and B and the wire between them. `tag` (a few letters) makes the
    /// namespace names unique together with the process id.
    pub fn two_nodes(tag: &str) -> Result<Self> {
        let tag = unique(&format!("rt{tag}"));
        let mut nodes = Vec::new();
        for (i, letter) in NODE_LETTERS.iter().enumerate() {
            let ns = Netns::create(&format!("{tag}-n{letter}"))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            let other = NODE_LETTERS[1 - i];
            nodes.push(Node {
                ns,
                index: i as u8,
                uplink: format!("rdu-{other}"),
            });
        }
        let topo = Topology {
            tag,
            pods: Vec::new(),
            nodes,
        };
        let (a, b) = (&topo.nodes[0], &topo.nodes[1]);
        crate::netns::run(
            "ip",
            &[
                "link", "add", &a.uplink, "netns", &a.ns.name, "type", "veth", "peer", "name",
                &b.uplink, "netns", &b.ns.name,
            ],
        )?;
        for (me, peer) in [(a, b), (b, a)] {
            let up = &me.uplink;
            me.ns.ip(&format!("link set {up} up"))?;
            me.ns.ip(&format!("addr add {}/24 dev {up}", me.v4()))?;
            me.ns
                .ip(&format!("-6 addr add {}/64 dev {up} nodad", me.v6()))?;
            let n = me.index + 1;
            me.ns.ip(&format!("addr add 10.{n}.0.1/32 dev lo"))?;
            let pn = peer.index + 1;
            me.ns.ip(&format!(
                "route add 10.{pn}.0.0/24 via {} dev {up}",
                peer.v4()
            ))?;
            me.ns.ip(&format!(
                "-6 route add fd00:{pn}::/64 via {} dev {up}",
                peer.v6()
            ))?;
        }
        Ok(topo)
    }

    pub fn node(&self, i: u8) -> &Node {
        &self.nodes[i as usize]
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Adds pod `name` (≤ 11 characters) with host number `host` on node `node`.
    pub fn add_pod(&mut self, name: &str, node: u8, host: u8) -> Result<&Pod> {
        if name.len() > 11 {
            bail!("pod name {name:?} too long for an interface name");
        }
        let ns = Netns::create(&format!("{}-{name}", self.tag))?;
        let host_if = format!("rdp-{name}");
        let pod = Pod {
            name: name.to_owned(),
            ns,
            node,
            host,
            host_if,
        };
        let n = &self.nodes[node as usize];
        crate::netns::run(
            "ip",
            &[
                "link",
                "add",
                &pod.host_if,
                "netns",
                &n.ns.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.ns.name,
            ],
        )
        .with_context(|| format!("creating the veth of pod {name}"))?;
        let g = node + 1;
        let p = &pod.ns;
        p.ip("link set eth0 up")?;
        p.ip(&format!("addr add {}/32 dev eth0", pod.v4()))?;
        p.ip(&format!("-6 addr add {}/128 dev eth0 nodad", pod.v6()))?;
        p.ip(&format!("route add 10.{g}.0.1 dev eth0"))?;
        p.ip(&format!("route add default via 10.{g}.0.1"))?;
        p.ip("-6 route add default via fe80::1 dev eth0")?;
        let hi = &pod.host_if;
        n.ns.ip(&format!("link set {hi} up"))?;
        n.ns.ip(&format!("-6 addr add fe80::1/64 dev {hi} nodad"))?;
        n.ns.ip(&format!("route add {}/32 dev {hi}", pod.v4()))?;
        n.ns.ip(&format!("-6 route add {}/128 dev {hi}", pod.v6()))?;
        self.pods.push(pod);
        Ok(self.pods.last().unwrap())
    }

    /// Every namespace (nodes and pods) with its interfaces, for offload settings and
    /// counters.
    pub fn namespaces(&self) -> Vec<&Netns> {
        self.nodes
            .iter()
            .map(|n| &n.ns)
            .chain(self.pods.iter().map(|p| &p.ns))
            .collect()
    }
}
