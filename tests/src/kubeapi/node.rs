//! One Kubernetes node for the agent's `--kubernetes` tests: a node namespace with the test
//! API server on its loopback, the agent (`nsenter --net=<node> redirector agent
//! --kubernetes`, `KUBECONFIG` pointing at the server), a client pod and revision pods
//! attached by veth, cleanup of everything on drop (also on panic).
//!
//! Addresses (inside the test's namespaces):
//! - node: `10.244.0.1/32` and `fd00:244::1/128` on `lo` (the node-local activator on port
//!   8012, the agent's metrics on `10.244.0.1:9090`), the API server on `127.0.0.1`;
//! - client pod `10.244.0.10`, `fd00:244::10` (veth `rdp-cli`);
//! - revision pod `h`: `10.244.2.h`, `fd00:244:2::h` (veth `rdp-p<h>`).
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::ApiServer;
use crate::{
    agent::{self, AgentBin},
    cluster::ScratchDir,
    netns::{unique, wait_for, Netns, Proc},
};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
/// The node-local activator's port (Knative's activator and queue-proxy port).
pub const ACTIVATOR_PORT: u16 = 8012;
pub const METRICS: &str = "10.244.0.1:9090";
/// What the agent is told its node is called (`NODE_NAME`).
pub const NODE_NAME: &str = "node-a";

/// A revision pod: its namespace and, once started, its app.
pub struct Pod {
    pub app: Option<Proc>,
    pub ns: Netns,
    pub host: u8,
}

impl Pod {
    pub fn v4(&self) -> IpAddr {
        Ipv4Addr::new(10, 244, 2, self.host).into()
    }
    pub fn v6(&self) -> IpAddr {
        Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, self.host as u16).into()
    }
}

/// How the agent is started.
#[derive(Debug, Clone, Default)]
pub struct AgentOpts {
    /// Extra command-line arguments after `agent --kubernetes` (e.g. `--activator knative`).
    pub args: Vec<String>,
    /// Extra TOML appended to the generated config.
    pub toml: String,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// The node. Fields drop in order: agent (SIGTERM, uninstall), pods, API server, client and
/// node namespaces, scratch directory.
pub struct KubeNode {
    agent: Option<Proc>,
    pub pods: Vec<Pod>,
    pub api: ApiServer,
    pub client: Netns,
    pub node: Netns,
    pub bin: AgentBin,
    pub dir: ScratchDir,
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    pub kubeconfig: PathBuf,
    pub log_path: PathBuf,
    ready_path: PathBuf,
}

/// The demo app (`redirector-hello`), next to the agent binary.
pub fn hello_bin() -> PathBuf {
    agent::redirector_bin().with_file_name("redirector-hello")
}

impl KubeNode {
    /// Creates the node and client namespaces and starts the API server in the node.
    /// The agent is started by [`Self::start_agent`] (objects can be created first).
    pub fn new(tag: &str) -> Result<Self> {
        let id = unique(&format!("rk{tag}"));
        let dir = ScratchDir(PathBuf::from(format!("/tmp/{id}")));
        std::fs::create_dir_all(&dir.0)?;
        let bin = AgentBin::new(&dir.0, &id)?;
        let node = Netns::create(&format!("{id}-n"))?;
        let client = Netns::create(&format!("{id}-c"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        node.ip(&format!("addr add {NODE_IP}/32 dev lo"))?;
        node.ip(&format!("-6 addr add {NODE_IP6}/128 dev lo nodad"))?;
        crate::netns::run(
            "ip",
            &[
                "link",
                "add",
                "rdp-cli",
                "netns",
                &node.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &client.name,
            ],
        )?;
        node.ip("link set rdp-cli up")?;
        node.ip(&format!("route add {CLIENT_IP}/32 dev rdp-cli"))?;
        node.ip("-6 addr add fe80::1/64 dev rdp-cli nodad")?;
        node.ip(&format!("-6 route add {CLIENT_IP6}/128 dev rdp-cli"))?;
        client.ip("link set eth0 up")?;
        client.ip(&format!("addr add {CLIENT_IP}/32 dev eth0"))?;
        client.ip(&format!("-6 addr add {CLIENT_IP6}/128 dev eth0 nodad"))?;
        client.ip(&format!("route add {NODE_IP} dev eth0"))?;
        client.ip(&format!("route add default via {NODE_IP} dev eth0"))?;
        client.ip("-6 route add default via fe80::1 dev eth0")?;
        let api = ApiServer::start_in(Some(&node.name))?;
        api.set_bookmark_interval(Duration::from_secs(1));
        let kubeconfig = dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Ok(KubeNode {
            agent: None,
            pods: Vec::new(),
            api,
            client,
            pin_path: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            config_path: dir.0.join("agent.toml"),
            log_path: dir.0.join("agent.log"),
            ready_path: dir.0.join("agent.ready"),
            kubeconfig,
            node,
            bin,
            dir,
        })
    }

    /// The agent's config: the node part (pod veths, pin path, activator, metrics).
    pub fn config_toml(&self, extra: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "[node]\nuplink = []\npod_interfaces = [\"rdp-*\"]\ncgroup = \"off\""
        );
        let _ = writeln!(s, "pin_path = \"{}\"", self.pin_path.display());
        let _ = writeln!(
            s,
            "activator = [\"{NODE_IP}:{ACTIVATOR_PORT}\", \"[{NODE_IP6}]:{ACTIVATOR_PORT}\"]"
        );
        let _ = writeln!(s, "metrics = \"{METRICS}\"");
        s.push_str(extra);
        s
    }

    /// Starts `redirector agent --kubernetes` in the node; waits for its ready file.
    pub fn start_agent(&mut self, opts: &AgentOpts) -> Result<()> {
        self.start_agent_unready(opts)?;
        let ready = self.ready_path.clone();
        let res = wait_for("the agent's ready file", Duration::from_secs(60), || {
            if ready.exists() {
                return Some(true);
            }
            let alive = self.agent.as_mut().is_some_and(|p| p.alive());
            (!alive).then_some(false)
        });
        match res {
            Ok(true) => Ok(()),
            _ => bail!("the agent did not become ready; log:\n{}", self.log()),
        }
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn start_agent_unready(&mut self, opts: &AgentOpts) -> Result<()> {
        std::fs::write(&self.config_path, self.config_toml(&opts.toml))?;
        let _ = std::fs::remove_file(&self.ready_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node.path()))
            .arg(&self.bin.0)
            .arg("agent")
            .arg("--kubernetes")
            .args(&opts.args)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&self.ready_path)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NODE_NAME", NODE_NAME)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,redirector=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.0.display()))?;
        self.agent = Some(Proc {
            child,
            what: "agent".into(),
        });
        Ok(())
    }

    /// SIGTERM to the agent; true once it exited (within 40 s, its drain included).
    pub fn stop_agent(&mut self) -> bool {
        self.agent
            .take()
            .is_some_and(|mut p| p.signal_and_wait(libc::SIGTERM, Duration::from_secs(40)))
    }

    pub fn agent_alive(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|p| p.alive())
    }

    pub fn log(&self) -> String {
        agent::strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// `redirector status --json` of the pinned maps.
    pub fn status(&self) -> Result<Value> {
        agent::status(&self.bin.0, &self.pin_path)
    }

    /// The status entries of service `ns/name`.
    pub fn entries(&self, ns: &str, name: &str) -> Result<Vec<Value>> {
        let full = format!("{ns}/{name}");
        let st = self.status()?;
        Ok(st["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| s["name"] == full.as_str())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until `pred` holds for the whole status; the error has the last status and
    /// the agent's log tail.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(what, timeout, || {
            let s = self.status().ok()?;
            let ok = pred(&s);
            last = s.clone();
            ok.then_some(s)
        })
        .with_context(|| {
            format!(
                "last status: {last}\nagent log (tail):\n{}",
                tail(&self.log(), 40)
            )
        })
    }

    /// The agent's /status (from inside the node).
    pub fn agent_status(&self) -> Result<Value> {
        let r = crate::coldstart::net::get(
            &self.node.name,
            METRICS.parse()?,
            "/status",
            Duration::from_secs(5),
        )?;
        if r.status != 200 {
            bail!("/status answered {}: {}", r.status, r.body);
        }
        Ok(serde_json::from_str(&r.body)?)
    }

    /// The status code of `GET path` on the agent's metrics endpoint (from inside the node).
    pub fn agent_probe(&self, path: &str) -> Result<u16> {
        let r = crate::coldstart::net::get(
            &self.node.name,
            METRICS.parse()?,
            path,
            Duration::from_secs(5),
        )?;
        Ok(r.status)
    }

    /// Adds revision pod `h` (namespace + veth, both families); no app yet.
    pub fn add_pod(&mut self, h: u8) -> Result<usize> {
        let ns = Netns::create(&format!("{}-p{h}", self.node.name.trim_end_matches("-n")))?;
        let pod = Pod {
            app: None,
            ns,
            host: h,
        };
        let host_if = format!("rdp-p{h}");
        crate::netns::run(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.node.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.ns.name,
            ],
        )?;
        let p = &pod.ns;
        p.ip("link set eth0 up")?;
        p.ip(&format!("addr add {}/32 dev eth0", pod.v4()))?;
        p.ip(&format!("-6 addr add {}/128 dev eth0 nodad", pod.v6()))?;
        p.ip(&format!("route add {NODE_IP} dev eth0"))?;
        p.ip(&format!("route add default via {NODE_IP}"))?;
        p.ip("-6 route add default via fe80::1 dev eth0")?;
        let n = &self.node;
        n.ip(&format!("link set {host_if} up"))?;
        n.ip(&format!("-6 addr add fe80::1/64 dev {host_if} nodad"))?;
        n.ip(&format!("route add {}/32 dev {host_if}", pod.v4()))?;
        n.ip(&format!("-6 route add {}/128 dev {host_if}", pod.v6()))?;
        self.pods.push(pod);
        Ok(self.pods.len() - 1)
    }

    /// Starts `redirector-hello` on `port` in pod `i` and waits until it accepts.
    pub fn start_hello(&mut self, i: usize, port: u16, env: &[(&str, &str)]) -> Result<()> {
        let pod = &mut self.pods[i];
        let mut cmd = pod
            .ns
            .command(hello_bin().to_str().unwrap_or("redirector-hello"));
        cmd.env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting redirector-hello")?;
        pod.app = Some(Proc {
            child,
            what: "redirector-hello".into(),
        });
        let (ns, addr) = (pod.ns.name.clone(), SocketAddr::new(pod.v4(), port));
        wait_for("the pod's app", Duration::from_secs(20), || {
            crate::coldstart::net::get(&ns, addr, "/healthz", Duration::from_secs(1))
                .ok()
                .filter(|r| r.status == 200)
        })?;
        Ok(())
    }

    /// `GET path` from the client pod.
    pub fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<crate::coldstart::Resp> {
        crate::coldstart::net::get(&self.client.name, addr, path, timeout)
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log (tail) ---\n{}", tail(&self.log(), 60));
        }
        if let Some(mut p) = self.agent.take() {
            if !p.signal_and_wait(libc::SIGTERM, Duration::from_secs(15)) {
                let _ = p.child.kill();
            }
        }
        let _ = Command::new(&self.bin.0)
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_path);
        self.pods.clear();
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
