//! The test bed of one variant: client, node and backend namespaces, the servers, the agent.
use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{tc::TcAttachOptions, LinkOrder, TcAttachType};
use redirector::datapath::{batch, maps::Maps, Datapath, PROG_TC_EMPTY};
use redirector_common::CtKey;
use redirector_tests::{
    agent::redirector_bin,
    cgroup::TestCgroup,
    netns::{run, unique, wait_for, Netns, Proc},
};

use super::{
    load::enter,
    pin::{self, Pinning},
    rules::{agent_toml, iptables_rules, nft_rules, sa, serve_eps, Svc, IPT_JUMPS},
    Variant, ACT_ID, ACT_PORT, BE_ID, BE_IP, BE_PORTS, CLI_IP, NODE_IP, VIP, VIP_PORT,
};

/// The agent, started by hand (custom TOML, and the pid for RSS). Drop: SIGTERM, uninstall.
pub(super) struct AgentRun {
    pub(super) proc: Option<Proc>,
    pub(super) pin: PathBuf,
    pub(super) config: PathBuf,
    pub(super) log: PathBuf,
}

impl AgentRun {
    /// Starts the agent on `toml` in `ns`; returns it and the time to its ready file.
    pub(super) fn start(
        ns: &Netns,
        dir: &Path,
        label: &str,
        toml: &str,
    ) -> Result<(Self, Duration)> {
        let pin = PathBuf::from(format!("/sys/fs/bpf/{label}"));
        let config = dir.join(format!("{label}.toml"));
        let log = dir.join(format!("{label}.log"));
        let ready = dir.join(format!("{label}.ready"));
        std::fs::write(&config, toml)?;
        let logf = std::fs::File::create(&log)?;
        let t0 = Instant::now();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(redirector_bin())
            .args(["agent", "--config"])
            .arg(&config)
            .arg("--pin-path")
            .arg(&pin)
            .arg("--ready-file")
            .arg(&ready)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {}", redirector_bin().display()))?;
        let mut a = AgentRun {
            proc: Some(Proc {
                child,
                what: label.into(),
            }),
            pin,
            config,
            log,
        };
        let r = wait_for("the agent's ready file", Duration::from_secs(120), || {
            if ready.exists() {
                return Some(true);
            }
            (!a.proc.as_mut()?.alive()).then_some(false)
        });
        let took = t0.elapsed();
        match r {
            Ok(true) => Ok((a, took)),
            _ => {
                let raw = std::fs::read_to_string(&a.log).unwrap_or_default();
                let raw = redirector_tests::agent::strip_ansi(&raw);
                let first_error = raw
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with("Error:") || l.contains("ERROR"))
                    .unwrap_or("")
                    .to_owned();
                bail!(
                    "agent {label} did not become ready after {:.1} s: {first_error}\nlog:\n{}",
                    t0.elapsed().as_secs_f64(),
                    a.log_tail(15)
                )
            }
        }
    }

    pub(super) fn pid(&self) -> i32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub(super) fn log_tail(&self, n: usize) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let raw = redirector_tests::agent::strip_ansi(&raw);
        let v: Vec<&str> = raw.lines().collect();
        v[v.len().saturating_sub(n)..].join("\n")
    }

    /// Replaces the config and sends SIGHUP (the agent also polls the file's mtime).
    pub(super) fn reload(&self, toml: &str) -> Result<()> {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, toml)?;
        std::fs::rename(&tmp, &self.config)?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGHUP) };
        Ok(())
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if !p.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)) {
                let _ = p.child.kill();
            }
        }
        let _ = Command::new(redirector_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// Client, node and backend namespaces with the servers. Drop order: agent, servers,
/// rules (flushed), namespaces, scratch directory.
pub(super) struct Bed {
    pub(super) agent: Option<AgentRun>,
    /// `empty-tc`: the loaded object whose empty program is attached (dropping it
    /// detaches), and that program's id.
    pub(super) floor: Option<(Datapath, u32)>,
    pub(super) servers: Vec<Proc>,
    pub(super) cli: Netns,
    pub(super) be: Netns,
    pub(super) node: Netns,
    pub(super) dir: PathBuf,
    /// The bed's cgroup: `redirector-socket`'s agent hooks it, and that variant's clients
    /// run in it (`rounds::slot`). Dropped last (after the processes in it).
    pub(super) cgroup: TestCgroup,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.agent = None;
        self.floor = None;
        self.servers.clear();
        let _ = self.node.exec("nft", &["flush", "ruleset"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn start_server(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Result<Proc> {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_rt-server"));
    // Threads started up front (none created per connection): 16 kept-alive connections,
    // 4 new-connection clients and the prober fit many times over.
    cmd.args(["--name", name, "--threads", "32"]);
    for a in addrs {
        cmd.args(["--tcp", &a.to_string()]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rt-server")?;
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf)
        .context("rt-server did not start")?;
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    if &buf != b"ready\n" {
        bail!("rt-server {name}: unexpected {buf:?}");
    }
    Ok(Proc {
        child,
        what: format!("rt-server {name}"),
    })
}

impl Bed {
    pub(super) fn new() -> Result<Self> {
        let tag = unique("rn");
        let dir = PathBuf::from(format!("/tmp/{tag}"));
        std::fs::create_dir_all(&dir)?;
        let node = Netns::create(&format!("{tag}-node"))?;
        let cli = Netns::create(&format!("{tag}-cli"))?;
        let be = Netns::create(&format!("{tag}-be"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.ip(&format!("addr add {NODE_IP}/32 dev lo"))?;
        for (pod, ip, ifname) in [(&cli, CLI_IP, "rdp-cli"), (&be, BE_IP, "rdp-be")] {
            run(
                "ip",
                &[
                    "link", "add", ifname, "netns", &node.name, "type", "veth", "peer", "name",
                    "eth0", "netns", &pod.name,
                ],
            )?;
            pod.ip("link set eth0 up")?;
            pod.ip(&format!("addr add {ip}/32 dev eth0"))?;
            pod.ip(&format!("route add {NODE_IP} dev eth0"))?;
            pod.ip(&format!("route add default via {NODE_IP}"))?;
            node.ip(&format!("link set {ifname} up"))?;
            node.ip(&format!("route add {ip}/32 dev {ifname}"))?;
        }
        cli.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let cgroup = TestCgroup::create(&format!("{tag}-cg"))?;
        let mut bed = Bed {
            cgroup,
            agent: None,
            floor: None,
            servers: Vec::new(),
            cli,
            be,
            node,
            dir,
        };
        bed.servers
            .push(start_server(&bed.be, BE_ID, &serve_eps())?);
        bed.servers
            .push(start_server(&bed.node, ACT_ID, &[sa(NODE_IP, ACT_PORT)])?);
        Ok(bed)
    }

    /// Runs a program with stdin from `input` in the node namespace; the wall time.
    pub(super) fn feed(&self, prog: &str, args: &[&str], input: &str) -> Result<Duration> {
        let t0 = Instant::now();
        let mut c = self
            .node
            .command(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        c.stdin.take().unwrap().write_all(input.as_bytes())?;
        let out = c.wait_with_output()?;
        let took = t0.elapsed();
        if !out.status.success() {
            bail!(
                "{prog} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        Ok(took)
    }

    /// Programs `variant` with `svcs`; the programming time (None for direct).
    pub(super) fn program(&mut self, variant: Variant, svcs: &[Svc]) -> Result<Option<Duration>> {
        Ok(match variant {
            Variant::Direct | Variant::Control => None,
            Variant::Floor => {
                let t0 = Instant::now();
                self.floor = Some(attach_empty(&self.node)?);
                Some(t0.elapsed())
            }
            Variant::Redirector | Variant::RedirectorBpf | Variant::RedirectorSocket => {
                let label = format!("{}-agent", self.node.name);
                let pin = PathBuf::from(format!("/sys/fs/bpf/{label}"));
                let mut toml = agent_toml(&pin, svcs, "");
                if variant == Variant::RedirectorBpf {
                    toml = toml.replacen("[node]\n", "[node]\nhost_routing = \"bpf\"\n", 1);
                }
                if variant == Variant::RedirectorSocket {
                    let cg = format!("cgroup = \"{}\"", self.cgroup.path.display());
                    toml = toml.replacen("cgroup = \"off\"", &cg, 1);
                }
                let (a, took) = AgentRun::start(&self.node, &self.dir, &label, &toml)?;
                self.agent = Some(a);
                Some(took)
            }
            Variant::Iptables => {
                self.feed("iptables-restore", &["--noflush"], IPT_JUMPS)?;
                Some(self.feed(
                    "iptables-restore",
                    &["--noflush"],
                    &iptables_rules(svcs, &[]),
                )?)
            }
            Variant::Nftables => Some(self.feed("nft", &["-f", "-"], &nft_rules(svcs))?),
        })
    }

    /// Pins this bed's serving side (the rt-servers, the agent) where `pinning` says.
    pub(super) fn pin(&self, pinning: &Pinning) -> Result<()> {
        for s in &self.servers {
            pin::process(s.pid(), &pinning.serve)?;
        }
        if let Some(a) = &self.agent {
            pin::process(a.pid(), &pinning.serve)?;
        }
        Ok(())
    }

    /// Empties the connection tracking on this bed's path, so every measured slot starts
    /// from the same state: the kernel's conntrack table of the node namespace (iptables,
    /// nftables) or the agent's CONNTRACK map (redirector); direct has none. Returns the
    /// entries removed from the agent's map (0 for the kernel's: a flush does not count).
    pub(super) fn reset_tracking(&self, variant: Variant) -> Result<usize> {
        match variant {
            Variant::Direct | Variant::Control | Variant::Floor => Ok(0),
            Variant::Redirector | Variant::RedirectorBpf | Variant::RedirectorSocket => {
                let a = self
                    .agent
                    .as_ref()
                    .context("redirector bed without an agent")?;
                let mut maps = Maps::open_pinned(&a.pin)?;
                let mut keys: Vec<CtKey> = Vec::new();
                batch::for_each(&maps.conntrack, |k, _| keys.push(*k))?;
                Ok(batch::delete(&mut maps.conntrack, &keys)?)
            }
            Variant::Iptables | Variant::Nftables => {
                flush_nf_conntrack(&self.node)?;
                Ok(0)
            }
        }
    }

    pub(super) fn target(&self, variant: Variant) -> SocketAddr {
        if variant.is_direct() {
            sa(BE_IP, BE_PORTS[0])
        } else {
            sa(VIP, VIP_PORT)
        }
    }
}

/// Loads the programs (private maps) and attaches the empty tc program with TCX on the
/// ingress and egress of both pod interfaces of namespace `ns`, as the agent attaches its
/// own; the links last as long as the returned object.
fn attach_empty(ns: &Netns) -> Result<(Datapath, u32)> {
    let path = ns.path();
    std::thread::spawn(move || -> Result<(Datapath, u32)> {
        enter(&path)?;
        let mut dp = Datapath::open_unpinned()?;
        let prog = dp.tc(PROG_TC_EMPTY)?;
        for ifname in ["rdp-cli", "rdp-be"] {
            for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
                prog.attach_with_options(
                    ifname,
                    ty,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching the empty program to {ifname} {ty:?}"))?;
            }
        }
        let id = prog.info().context("the empty program's info")?.id();
        Ok((dp, id))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
}

/// Flushes the kernel's IPv4 conntrack table of namespace `ns`: ctnetlink
/// IPCTNL_MSG_CT_DELETE without a tuple (what `conntrack -F` sends).
fn flush_nf_conntrack(ns: &Netns) -> Result<()> {
    let path = ns.path();
    std::thread::spawn(move || -> Result<()> {
        enter(&path)?;
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            bail!("netlink socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        const NFNL_SUBSYS_CTNETLINK: u16 = 1;
        const IPCTNL_MSG_CT_DELETE: u16 = 2;
        // nlmsghdr (16 bytes) + nfgenmsg (family, version, res_id).
        let mut msg = [0u8; 20];
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        msg[4..6]
            .copy_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        msg[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
        msg[16] = libc::AF_INET as u8;
        // SAFETY: a zeroed sockaddr_nl is valid; msg and buf outlive the calls.
        let (sent, got, buf) = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            let sent = libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            let mut buf = [0u8; 4096];
            let got = if sent < 0 {
                -1
            } else {
                libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
            };
            (sent, got, buf)
        };
        if sent < 0 || got < 0 {
            bail!("ctnetlink flush: {}", std::io::Error::last_os_error());
        }
        // The ack: NLMSG_ERROR with error 0.
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if got < 20 || kind != libc::NLMSG_ERROR as u16 || err != 0 {
            bail!(
                "ctnetlink flush: {}",
                std::io::Error::from_raw_os_error(-err)
            );
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("conntrack flush thread panicked"))?
}
