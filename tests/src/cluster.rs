//! The standard test cluster: the two-node topology with a client pod and a backend pod on
//! node A, a backend pod on node B, stand-in activators in both node namespaces, an agent per
//! node, and a fixed set of services.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Result;

use crate::{
    agent::{service_mode_is, Agent, AgentBin, AgentConfig, Proto, ServiceSpec},
    kubeproxy::{KubeProxy, NetfilterMode},
    topo::Topology,
    traffic::{Bins, Server},
};

/// Port of the TCP services' VIPs / of the backends' HTTP servers.
pub const TCP_PORT: u16 = 80;
pub const TCP_BACKEND_PORT: u16 = 8080;
/// Port of the UDP services' VIPs / of the backends' UDP servers.
pub const UDP_PORT: u16 = 53;
pub const UDP_BACKEND_PORT: u16 = 5353;
/// The node-local activator's port (both protocols).
pub const ACTIVATOR_PORT: u16 = 8012;

/// Which backend pods a service has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// `bea` (node A) and `beb` (node B).
    Both,
    /// `bea` only (local to the client on node A).
    Local,
    /// `beb` only (remote from the client).
    Remote,
}

/// One of the standard services.
#[derive(Debug, Clone, Copy)]
pub struct Svc {
    pub name: &'static str,
    /// Last byte of the VIPs `10.96.0.N` / `fd00:96::N` (hex digits in v6).
    pub vip_id: u8,
    pub proto: Proto,
    pub proxy: bool,
    pub backends: Backends,
}

impl Svc {
    pub fn vip_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, self.vip_id as u16).into()
        } else {
            Ipv4Addr::new(10, 96, 0, self.vip_id).into()
        }
    }
    pub fn port(&self) -> u16 {
        match self.proto {
            Proto::Tcp => TCP_PORT,
            Proto::Udp => UDP_PORT,
        }
    }
    /// The VIP socket address clients use.
    pub fn vip(&self, v6: bool) -> SocketAddr {
        SocketAddr::new(self.vip_ip(v6), self.port())
    }
    pub fn udp(&self) -> bool {
        self.proto == Proto::Udp
    }

    /// Client arguments for this service's VIP of family `v6`, with its protocol.
    pub fn client(
        &self,
        v6: bool,
        new: usize,
        keepalive: usize,
        per_conn: usize,
    ) -> crate::traffic::ClientArgs {
        let make = if self.udp() {
            crate::traffic::ClientArgs::udp
        } else {
            crate::traffic::ClientArgs::tcp
        };
        make(self.vip(v6), new, keepalive, per_conn)
    }
}

const fn svc(name: &'static str, vip_id: u8, proto: Proto, proxy: bool, b: Backends) -> Svc {
    Svc {
        name,
        vip_id,
        proto,
        proxy,
        backends: b,
    }
}

pub const WEB: Svc = svc("web", 0x10, Proto::Tcp, false, Backends::Both);
pub const ECHO: Svc = svc("echo", 0x11, Proto::Udp, false, Backends::Both);
pub const WEB_LOCAL: Svc = svc("web-local", 0x12, Proto::Tcp, false, Backends::Local);
pub const WEB_REMOTE: Svc = svc("web-remote", 0x13, Proto::Tcp, false, Backends::Remote);
pub const ECHO_LOCAL: Svc = svc("echo-local", 0x14, Proto::Udp, false, Backends::Local);
pub const ECHO_REMOTE: Svc = svc("echo-remote", 0x15, Proto::Udp, false, Backends::Remote);
pub const WEB_PROXY: Svc = svc("web-proxy", 0x16, Proto::Tcp, true, Backends::Both);
pub const ECHO_PROXY: Svc = svc("echo-proxy", 0x17, Proto::Udp, true, Backends::Both);

pub const SERVICES: [Svc; 8] = [
    WEB,
    ECHO,
    WEB_LOCAL,
    WEB_REMOTE,
    ECHO_LOCAL,
    ECHO_REMOTE,
    WEB_PROXY,
    ECHO_PROXY,
];

/// Server identities.
pub const ID_BEA: &str = "be-a";
pub const ID_BEB: &str = "be-b";
pub const ID_ACT_A: &str = "act-a";
pub const ID_ACT_B: &str = "act-b";

/// A scratch directory under /tmp, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The standard cluster. Fields drop in order: agents (stopped, uninstalled), servers,
/// namespaces, scratch directory.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub servers: Vec<Server>,
    /// kube-proxy's rules on each node (empty without netfilter rules).
    pub kube_proxy: Vec<KubeProxy>,
    pub topo: Topology,
    pub agent_bin: AgentBin,
    pub dir: ScratchDir,
    pub bins: Bins,
    /// The config each agent was last given.
    pub configs: Vec<AgentConfig>,
    /// Each node's cgroup (index = node), for clients whose sockets its agent translates
    /// (agents attach there only when built by [`Cluster::with_socket_hooks`]).
    pub cgroups: Vec<crate::cgroup::TestCgroup>,
}

fn both(ip4: IpAddr, ip6: IpAddr, port: u16) -> [SocketAddr; 2] {
    [SocketAddr::new(ip4, port), SocketAddr::new(ip6, port)]
}

impl Cluster {
    /// Builds the topology (pods `cli`, `bea` on A, `beb` on B), starts the servers and both
    /// agents with the standard services.
    pub fn new(tag: &str, bins: Bins) -> Result<Self> {
        Self::new_with(tag, bins, |_| {})
    }

    /// `new`, with each node's agent hooking the sockets of its node's cgroup
    /// (`cgroups[i]`): clients run there (`ClientArgs::in_cgroup`) are translated at
    /// `connect()`, others take the packet path.
    pub fn with_socket_hooks(tag: &str, bins: Bins) -> Result<Self> {
        Self::build(tag, bins, true, true, |_| {})
    }

    /// `with_socket_hooks`, with each agent's own activator listening on the node address
    /// (no stand-in server there: Proxy flows reach the real activator, which forwards them to
    /// the service's backends), and each config changed by `f`.
    pub fn with_node_activators(
        tag: &str,
        bins: Bins,
        f: impl Fn(&mut AgentConfig),
    ) -> Result<Self> {
        Self::build(tag, bins, true, false, f)
    }

    /// `new`, with each agent's standard config changed by `f` before it starts.
    pub fn new_with(tag: &str, bins: Bins, f: impl Fn(&mut AgentConfig)) -> Result<Self> {
        Self::build(tag, bins, false, true, f)
    }

    fn build(
        tag: &str,
        bins: Bins,
        sockets: bool,
        stand_ins: bool,
        f: impl Fn(&mut AgentConfig),
    ) -> Result<Self> {
        let mut topo = Topology::two_nodes(tag)?;
        topo.add_pod("cli", 0, 10)?;
        topo.add_pod("bea", 0, 20)?;
        topo.add_pod("beb", 1, 20)?;
        let dir = PathBuf::from(format!("/tmp/{}", topo.tag));
        std::fs::create_dir_all(&dir)?;
        let dir = ScratchDir(dir);
        let agent_bin = AgentBin::new(&dir.0, &topo.tag)?;
        let cgroups = ["a", "b"]
            .iter()
            .map(|n| crate::cgroup::TestCgroup::create(&format!("{}-{n}", topo.tag)))
            .collect::<Result<Vec<_>>>()?;
        let mut c = Cluster {
            cgroups,
            agents: Vec::new(),
            servers: Vec::new(),
            kube_proxy: Vec::new(),
            topo,
            agent_bin,
            dir,
            bins,
            configs: Vec::new(),
        };
        for (pod, id) in [("bea", ID_BEA), ("beb", ID_BEB)] {
            let p = c.topo.pod(pod);
            let (v4, v6) = (p.ip(false), p.ip(true));
            let s = Server::start(
                &c.bins,
                &p.ns,
                id,
                &both(v4, v6, TCP_BACKEND_PORT),
                &both(v4, v6, UDP_BACKEND_PORT),
            )?;
            c.servers.push(s);
        }
        let stand_ins: &[&str] = if stand_ins {
            &[ID_ACT_A, ID_ACT_B]
        } else {
            &[]
        };
        for (i, id) in stand_ins.iter().copied().enumerate() {
            let n = c.topo.node(i as u8);
            let addrs = both(n.ip(false), n.ip(true), ACTIVATOR_PORT);
            let s = Server::start(&c.bins, &n.ns, id, &addrs, &addrs)?;
            c.servers.push(s);
        }
        for i in 0..2u8 {
            let mut cfg = c.standard_config(i);
            cfg.activator_listen = stand_ins.is_empty();
            if sockets {
                cfg.cgroup = Some(c.cgroups[i as usize].path.clone());
            }
            f(&mut cfg);
            let n = c.topo.node(i);
            let label = format!("agent-{}", ['a', 'b'][i as usize]);
            let agent = Agent::start(&c.agent_bin.0, &n.ns, &c.dir.0, &label, &cfg)?;
            c.agents.push(agent);
            c.configs.push(cfg);
        }
        Ok(c)
    }

    /// Backend addresses (both families) of a backend set.
    pub fn backend_addrs(&self, b: Backends, proto: Proto) -> Vec<SocketAddr> {
        let port = match proto {
            Proto::Tcp => TCP_BACKEND_PORT,
            Proto::Udp => UDP_BACKEND_PORT,
        };
        let pods: &[&str] = match b {
            Backends::Both => &["bea", "beb"],
            Backends::Local => &["bea"],
            Backends::Remote => &["beb"],
        };
        pods.iter()
            .flat_map(|p| {
                let p = self.topo.pod(p);
                both(p.ip(false), p.ip(true), port)
            })
            .collect()
    }

    /// The standard config of node `i`: its uplink and pod veths, its own activator, every
    /// service of [`SERVICES`].
    pub fn standard_config(&self, i: u8) -> AgentConfig {
        let n = self.topo.node(i);
        AgentConfig {
            uplink: vec!["rdu-*".into()],
            pod_interfaces: vec!["rdp-*".into()],
            pin_path: PathBuf::from(format!(
                "/sys/fs/bpf/{}-{}",
                self.topo.tag,
                ['a', 'b'][i as usize]
            )),
            activator: both(n.ip(false), n.ip(true), ACTIVATOR_PORT).to_vec(),
            services: SERVICES
                .iter()
                .map(|s| ServiceSpec {
                    name: s.name.into(),
                    vips: vec![s.vip_ip(false), s.vip_ip(true)],
                    port: s.port(),
                    proto: s.proto,
                    proxy: s.proxy,
                    backends: self.backend_addrs(s.backends, s.proto),
                })
                .collect(),
            maps: None,
            host_routing_bpf: false,
            cgroup: None,
            activator_listen: true,
        }
    }

    /// Applies `f` to both nodes' configs and writes them (the agents reload on mtime);
    /// kube-proxy's rules follow changed services as kube-proxy would.
    pub fn update_configs(&mut self, f: impl Fn(&mut AgentConfig)) -> Result<()> {
        for (cfg, agent) in self.configs.iter_mut().zip(&self.agents) {
            f(cfg);
            agent.write_config(cfg)?;
        }
        self.sync_kube_proxy()
    }

    /// `new`, with kube-proxy's rules of `mode` for the cluster's services on both node
    /// namespaces (installed before any traffic runs), re-synced whenever
    /// [`Cluster::update_configs`] changes the services' VIPs, ports or backends.
    pub fn with_netfilter(tag: &str, bins: Bins, mode: NetfilterMode) -> Result<Self> {
        let mut c = Self::new(tag, bins)?;
        if mode != NetfilterMode::None {
            for (n, cfg) in c.topo.nodes.iter().zip(&c.configs) {
                c.kube_proxy
                    .push(KubeProxy::install(&n.ns, mode, &cfg.services)?);
            }
        }
        Ok(c)
    }

    /// Writes kube-proxy's rules again on each node whose services changed.
    fn sync_kube_proxy(&mut self) -> Result<()> {
        let nodes = self.configs.iter().zip(&self.topo.nodes);
        for (kp, (cfg, n)) in self.kube_proxy.iter_mut().zip(nodes) {
            kp.sync(&n.ns, &cfg.services)?;
        }
        Ok(())
    }

    /// Sets `rp_filter` (1 strict, 2 loose) on both node namespaces: `all`, `default` and
    /// every interface.
    pub fn set_rp_filter(&self, mode: u8) -> Result<()> {
        for n in &self.topo.nodes {
            n.set_rp_filter(mode)?;
        }
        Ok(())
    }

    /// Sets the mode of service `name` on both nodes and waits until both agents' status
    /// shows it.
    pub fn set_mode(&mut self, name: &str, proxy: bool) -> Result<()> {
        self.update_configs(|c| c.service_mut(name).proxy = proxy)?;
        let mode = if proxy { "proxy" } else { "serve" };
        for a in &self.agents {
            a.wait_status(
                &format!("{name} in mode {mode}"),
                Duration::from_secs(15),
                |s| service_mode_is(s, name, mode),
            )?;
        }
        Ok(())
    }

    /// A file path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}
