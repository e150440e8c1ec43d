//! `node` (`--node`, or no scenario flag): redirector side by side with kube-proxy's
//! iptables and nftables rule layouts, on one node, with real TCP through network namespaces.
//!
//! Topology (fresh for every measured block, so no conntrack or rule state carries over):
//! client namespace `cli` (10.1.0.10) --veth rdp-cli-- node namespace (10.1.0.1 on lo,
//! forwarding) --veth rdp-be-- backend namespace `be` (10.1.0.20, `rt-server` on :8080 and
//! :8081). A stand-in activator (`rt-server` named `act`) listens in the node namespace on
//! 10.1.0.1:8012. The measured service is VIP 10.95.0.10:80 with endpoints 10.1.0.20:8080
//! and :8081; the other services are VIPs 10.96.x.y:80 with two (unreachable) endpoints each.
//!
//! Variants (one active at a time, each in its own fresh namespaces):
//! - `direct`: the client talks to 10.1.0.20:8080 (no NAT at all; the limit);
//! - `redirector`: the agent in the node namespace, every service in Serve;
//! - `iptables`: kube-proxy's iptables layout (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP with
//!   `statistic` and DNAT), loaded with `iptables-restore --noflush`; the measured service is
//!   the last one in KUBE-SERVICES, so a new connection walks the whole chain;
//! - `nftables`: kube-proxy's nftables layout (table `kube-proxy`, `service-ips` verdict map,
//!   per-service chains with `numgen random mod N vmap`, DNAT), loaded with `nft -f`.
//!
//! Measured: kept-alive requests/s and latency with `wrk`; new connections/s (connect, one
//! request, close) and their latency with an in-process generator in the client namespace;
//! flip latency (decision -> first new connection on the new target); programming time;
//! map memory and agent RSS at 10,000 and 100,000 services.
//!
//! Results: `target/perf/node.{json,md}` and SVG plots; then [`write_report`] merges every
//! part found in `target/perf` into `report.{md,json}`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector::datapath::maps::Maps;
use redirector_common::{MODE_PROXY, MODE_SERVE};
use redirector_tests::{
    agent::redirector_bin,
    netns::{run, unique, wait_for, Netns, Proc},
};
use serde_json::{json, Value};

/// One node benchmark at a time, and the report after it.
static LOCK: Mutex<()> = Mutex::new(());

const VIP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 10);
const VIP_PORT: u16 = 80;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const BE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 20);
const BE_PORTS: [u16; 2] = [8080, 8081];
const ACT_PORT: u16 = 8012;
const BE_ID: &str = "be";
const ACT_ID: &str = "act";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Redirector,
    Iptables,
    Nftables,
}

const VARIANTS: [Variant; 4] = [
    Variant::Direct,
    Variant::Redirector,
    Variant::Iptables,
    Variant::Nftables,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Redirector => "redirector",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
        }
    }
}

/// Median (mean of the two middle values for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("perf")
}

#[path = "report.rs"]
pub mod report;

// ---------------------------------------------------------------------------------------
// Services and rule sets
// ---------------------------------------------------------------------------------------

/// One service: VIP:80/TCP with its endpoints.
#[derive(Clone)]
struct Svc {
    name: String,
    vip: Ipv4Addr,
    endpoints: Vec<SocketAddr>,
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `n` services; the measured one is the last. Endpoints of service `i` (other than the
/// measured one) are 10.2.0.0 + 2i (+1), port 8080: real-looking, never reached.
fn services(n: usize, measured_eps: &[SocketAddr]) -> Vec<Svc> {
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

fn serve_eps() -> Vec<SocketAddr> {
    BE_PORTS.iter().map(|p| sa(BE_IP, *p)).collect()
}

fn act_eps() -> Vec<SocketAddr> {
    vec![sa(NODE_IP, ACT_PORT)]
}

/// kube-proxy's chain-name hash: 16 base32 characters of a hash of the name (kube-proxy
/// uses SHA-256; any stable hash gives the same rule shapes).
fn hash16(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for b in s.bytes() {
        h1 = (h1 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        h2 = (h2 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x5bd1_e995);
    }
    let mut out = String::new();
    for i in 0..16 {
        let v = if i < 12 {
            h1 >> (i * 5)
        } else {
            h2 >> ((i - 12) * 5)
        };
        out.push(A[(v & 31) as usize] as char);
    }
    out
}

fn svc_port_name(s: &Svc) -> String {
    format!("rt/{}:http", s.name)
}

fn ipt_svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", svc_port_name(s))))
}

fn ipt_sep_chain(s: &Svc, ep: SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}tcp{ep}", svc_port_name(s)))
    )
}

/// The jump rules kube-proxy ensures in the built-in chains (installed once, by hand).
const IPT_JUMPS: &str = "*filter\n\
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
fn iptables_rules(svcs: &[Svc], delete: &[String]) -> String {
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
fn iptables_partial(svcs: &[Svc], changed: &Svc, delete: &[String]) -> String {
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

fn nft_svc_chain(s: &Svc) -> String {
    format!(
        "service-{}-rt/{}/tcp/http",
        &hash16(&format!("{}tcp", svc_port_name(s)))[..8],
        s.name
    )
}

fn nft_ep_chain(s: &Svc, ep: SocketAddr) -> String {
    format!(
        "endpoint-{}-rt/{}/tcp/http__{}/{}",
        &hash16(&format!("{}tcp{ep}", svc_port_name(s)))[..8],
        s.name,
        ep.ip(),
        ep.port()
    )
}

fn nft_service_rules(s: &mut String, svc: &Svc) {
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
fn nft_rules(svcs: &[Svc]) -> String {
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
fn nft_incremental(changed: &Svc, delete: &[String]) -> String {
    let mut s = String::new();
    nft_service_rules(&mut s, changed);
    for c in delete {
        let _ = writeln!(s, "delete chain ip kube-proxy {c}");
    }
    s
}

fn agent_toml(pin: &Path, svcs: &[Svc], proxy: &str) -> String {
    let mut s = String::with_capacity(svcs.len() * 160);
    let _ = writeln!(
        s,
        "[node]\nuplink = [\"rdu-none*\"]\npod_interfaces = [\"rdp-*\"]"
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

// ---------------------------------------------------------------------------------------
// The test bed
// ---------------------------------------------------------------------------------------

/// The agent, started by hand (custom TOML, and the pid for RSS). Drop: SIGTERM, uninstall.
struct AgentRun {
    proc: Option<Proc>,
    pin: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl AgentRun {
    /// Starts the agent on `toml` in `ns`; returns it and the time to its ready file.
    fn start(ns: &Netns, dir: &Path, label: &str, toml: &str) -> Result<(Self, Duration)> {
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

    fn pid(&self) -> i32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    fn log_tail(&self, n: usize) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let raw = redirector_tests::agent::strip_ansi(&raw);
        let v: Vec<&str> = raw.lines().collect();
        v[v.len().saturating_sub(n)..].join("\n")
    }

    /// Replaces the config and sends SIGHUP (the agent also polls the file's mtime).
    fn reload(&self, toml: &str) -> Result<()> {
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
struct Bed {
    agent: Option<AgentRun>,
    servers: Vec<Proc>,
    cli: Netns,
    be: Netns,
    node: Netns,
    dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.agent = None;
        self.servers.clear();
        let _ = self.node.exec("nft", &["flush", "ruleset"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Result<Proc> {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_rt-server"));
    cmd.args(["--name", name]);
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
    fn new() -> Result<Self> {
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
        let mut bed = Bed {
            agent: None,
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
    fn feed(&self, prog: &str, args: &[&str], input: &str) -> Result<Duration> {
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
    fn program(&mut self, variant: Variant, svcs: &[Svc]) -> Result<Option<Duration>> {
        Ok(match variant {
            Variant::Direct => None,
            Variant::Redirector => {
                let label = format!("{}-agent", self.node.name);
                let pin = PathBuf::from(format!("/sys/fs/bpf/{label}"));
                let toml = agent_toml(&pin, svcs, "");
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

    fn target(&self, variant: Variant) -> SocketAddr {
        if variant == Variant::Direct {
            sa(BE_IP, BE_PORTS[0])
        } else {
            sa(VIP, VIP_PORT)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Load and probes
// ---------------------------------------------------------------------------------------

/// Runs `f` on a thread inside the network namespace at `path`.
fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One short connection: connect, GET with `Connection: close`, read to EOF. The answering
/// server's id.
fn one_request(to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: rt\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer: {}", text.lines().next().unwrap_or(""));
    }
    let id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
        .to_owned();
    Ok(id)
}

#[derive(Debug, Clone, Default)]
struct Load {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// New connections: `threads` clients in the client namespace, each in a loop of
/// connect + request + close for `dur`.
fn new_conns(ns: &Netns, to: SocketAddr, threads: usize, dur: Duration) -> Result<Load> {
    let path = ns.path();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for _ in 0..threads {
        let (path, stop) = (path.clone(), stop.clone());
        hs.push(std::thread::spawn(move || -> Result<(Vec<f64>, u64)> {
            enter(&path)?;
            let mut lat = Vec::with_capacity(200_000);
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match one_request(to, Duration::from_secs(2)) {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(_) => errors += 1,
                }
            }
            Ok((lat, errors))
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in hs {
        let (l, e) = h.join().expect("load thread")?;
        all.extend(l);
        errors += e;
    }
    let el = t0.elapsed().as_secs_f64();
    Ok(Load {
        rate: all.len() as f64 / el,
        p50_us: pct(&all, 0.5),
        p99_us: pct(&all, 0.99),
        errors,
    })
}

fn wrk_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

/// Kept-alive connections: `wrk --latency` in the client namespace.
fn wrk(ns: &Netns, to: SocketAddr, conns: usize, dur: Duration) -> Result<Load> {
    let url = format!("http://{to}/");
    let d = format!("{}s", dur.as_secs().max(1));
    let c = conns.to_string();
    let out = ns.exec("wrk", &["-t2", "-c", &c, "-d", &d, "--latency", &url])?;
    let mut l = Load::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            l.rate = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("50%") {
            l.p50_us = wrk_dur_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            l.p99_us = wrk_dur_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            l.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            l.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if l.rate.is_nan() || l.rate <= 0.0 {
        bail!("wrk produced no rate:\n{out}");
    }
    Ok(l)
}

/// A thread in the client namespace that, once armed, opens new connections to the VIP
/// until one is answered by `want`; reports the time since the arming instant.
struct Prober {
    tx: mpsc::Sender<(Instant, &'static str)>,
    rx: mpsc::Receiver<Result<(Duration, u32)>>,
}

impl Prober {
    fn new(ns: &Netns) -> Self {
        let (tx, jobs) = mpsc::channel::<(Instant, &'static str)>();
        let (done, rx) = mpsc::channel();
        let path = ns.path();
        std::thread::spawn(move || {
            if let Err(e) = enter(&path) {
                let _ = done.send(Err(e));
                return;
            }
            for (t0, want) in jobs {
                let mut n = 0u32;
                let r = loop {
                    n += 1;
                    if let Ok(id) = one_request(sa(VIP, VIP_PORT), Duration::from_millis(500)) {
                        if id == want {
                            break Ok((t0.elapsed(), n));
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(600) {
                        break Err(anyhow::anyhow!("no connection reached {want} in 600 s"));
                    }
                };
                if done.send(r).is_err() {
                    return;
                }
            }
        });
        Prober { tx, rx }
    }

    /// Arms the prober at `t0` (just before the flip starts).
    fn arm(&self, t0: Instant, want: &'static str) {
        self.tx.send((t0, want)).expect("prober alive");
    }

    fn landed(&self) -> Result<(Duration, u32)> {
        self.rx.recv()?
    }
}

// ---------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Samples {
    keepalive: Vec<Load>,
    newconn: Vec<Load>,
    program_ms: Vec<f64>,
}

/// Flip methods: name -> landed µs samples.
/// Flip samples: (method, services) -> (landed µs, probe connections needed).
type Flips = BTreeMap<(String, usize), Vec<(f64, u32)>>;

struct Plan {
    rounds: usize,
    /// Rounds that include 10,000 services (each iptables block there takes minutes).
    rounds_10k: usize,
    counts: Vec<usize>,
    flip_counts: Vec<usize>,
    run: Duration,
    warm: Duration,
    flips: usize,
    wrk_conns: usize,
    gen_threads: usize,
}

/// Flips the measured service between its Serve endpoints and the activator with each of
/// the variant's methods; records the decision-to-landing times.
fn measure_flips(
    bed: &mut Bed,
    variant: Variant,
    svcs: &[Svc],
    n: usize,
    reps: usize,
    flips: &mut Flips,
) -> Result<()> {
    let prober = Prober::new(&bed.cli);
    let mut to_act = svcs.to_vec();
    to_act.last_mut().unwrap().endpoints = act_eps();
    let (serve_svc, act_svc) = (svcs.last().unwrap(), to_act.last().unwrap());
    let chains = |s: &Svc, ipt: bool| -> Vec<String> {
        s.endpoints
            .iter()
            .map(|e| {
                if ipt {
                    ipt_sep_chain(s, *e)
                } else {
                    nft_ep_chain(s, *e)
                }
            })
            .collect()
    };
    let mut rec = |m: &str, (d, probes): (Duration, u32)| {
        println!(
            "    flip {m} at {n}: {:.0} us, {probes} probe(s)",
            d.as_secs_f64() * 1e6
        );
        flips
            .entry((m.to_owned(), n))
            .or_default()
            .push((d.as_secs_f64() * 1e6, probes))
    };
    // At 10,000 services one iptables-restore takes tens of seconds: one flip there.
    let light = n >= 10_000;
    let dirs: &[(u8, &str)] = if light {
        &[(MODE_PROXY, ACT_ID)]
    } else {
        &[(MODE_PROXY, ACT_ID), (MODE_SERVE, BE_ID)]
    };
    for _ in 0..reps {
        for &(want, want_id) in dirs {
            let to_proxy = want == MODE_PROXY;
            match variant {
                Variant::Direct => {}
                Variant::Redirector => {
                    // One map write, the way the agent flips: SERVICES[vip].mode.
                    let a = bed.agent.as_ref().unwrap();
                    let mut maps = Maps::open_pinned(&a.pin)?;
                    let key = crate::common::service_key(sa(VIP, VIP_PORT), 6);
                    let mut v = maps.services.get(&key, 0)?;
                    v.mode = want;
                    v.generation = v.generation.wrapping_add(1);
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    maps.services.insert(key, v, 0)?;
                    let d = prober.landed()?;
                    rec("redirector: map write", d);
                    // The same flip through the agent: config file rewritten + SIGHUP.
                    // First put the map back, then let the agent flip it.
                    let mut back = maps.services.get(&key, 0)?;
                    back.mode = if to_proxy { MODE_SERVE } else { MODE_PROXY };
                    maps.services.insert(key, back, 0)?;
                    let toml = agent_toml(&a.pin, svcs, if to_proxy { "measured" } else { "" });
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    a.reload(&toml)?;
                    let d = prober.landed()?;
                    rec("redirector: config + SIGHUP", d);
                }
                Variant::Iptables => {
                    let from = if to_proxy { serve_svc } else { act_svc };
                    let to: &[Svc] = if to_proxy { &to_act } else { svcs };
                    let text = iptables_rules(to, &chains(from, true));
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("iptables-restore", &["--noflush"], &text)?;
                    let d = prober.landed()?;
                    rec("iptables: full restore", d);
                    if light {
                        continue;
                    }
                    // Back, then the same flip the way kube-proxy >= 1.27 writes it.
                    let back = if to_proxy {
                        svcs.to_vec()
                    } else {
                        to_act.clone()
                    };
                    bed.feed(
                        "iptables-restore",
                        &["--noflush"],
                        &iptables_rules(&back, &chains(to.last().unwrap(), true)),
                    )?;
                    let text = iptables_partial(to, to.last().unwrap(), &chains(from, true));
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("iptables-restore", &["--noflush"], &text)?;
                    let d = prober.landed()?;
                    rec("iptables: partial restore", d);
                }
                Variant::Nftables => {
                    let from = if to_proxy { serve_svc } else { act_svc };
                    let to: &[Svc] = if to_proxy { &to_act } else { svcs };
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("nft", &["-f", "-"], &nft_rules(to))?;
                    let d = prober.landed()?;
                    rec("nftables: full ruleset", d);
                    let back = if to_proxy {
                        svcs.to_vec()
                    } else {
                        to_act.clone()
                    };
                    bed.feed("nft", &["-f", "-"], &nft_rules(&back))?;
                    let text = nft_incremental(to.last().unwrap(), &chains(from, false));
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("nft", &["-f", "-"], &text)?;
                    let d = prober.landed()?;
                    rec("nftables: incremental", d);
                }
            }
        }
    }
    Ok(())
}

/// One block: fresh bed, program, warm up, keep-alive, new connections, flips.
fn block(
    plan: &Plan,
    variant: Variant,
    n: usize,
    s: &mut Samples,
    flips: &mut Flips,
) -> Result<()> {
    let mut bed = Bed::new()?;
    let svcs = services(n, &serve_eps());
    if let Some(d) = bed.program(variant, &svcs)? {
        s.program_ms.push(d.as_secs_f64() * 1e3);
    }
    let to = bed.target(variant);
    // Reachability and the right server before measuring anything.
    {
        let p = Prober::new(&bed.cli);
        if variant != Variant::Direct {
            p.arm(Instant::now(), BE_ID);
            p.landed()
                .with_context(|| format!("{} at {n}: the VIP answers", variant.name()))?;
        }
    }
    wrk(&bed.cli, to, plan.wrk_conns, plan.warm)?;
    let _ = new_conns(&bed.cli, to, plan.gen_threads, plan.warm)?;
    s.keepalive
        .push(wrk(&bed.cli, to, plan.wrk_conns, plan.run)?);
    s.newconn
        .push(new_conns(&bed.cli, to, plan.gen_threads, plan.run)?);
    if plan.flip_counts.contains(&n) {
        measure_flips(&mut bed, variant, &svcs, n, plan.flips, flips)?;
    }
    Ok(())
}

struct Scale {
    services: usize,
    ok: bool,
    ready_ms: f64,
    memlock: u64,
    per_map: BTreeMap<String, u64>,
    rss_kib: u64,
    error: String,
}

/// memlock of every BPF map the process holds, by map name (bpftool for the names).
fn map_memory(pid: i32) -> (u64, BTreeMap<String, u64>) {
    let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in rd.flatten() {
            let Ok(t) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let field = |k: &str| {
                t.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) {
                ids.insert(id, mem);
            }
        }
    }
    let names: BTreeMap<u64, String> = run("bpftool", &["-j", "map", "show"])
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| Some((m["id"].as_u64()?, m["name"].as_str()?.to_owned())))
        .collect();
    let mut per = BTreeMap::new();
    for (id, mem) in &ids {
        let n = names.get(id).cloned().unwrap_or_else(|| format!("id {id}"));
        *per.entry(n).or_insert(0) += mem;
    }
    (ids.values().sum(), per)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn measure_scale(n: usize) -> Result<Scale> {
    let tag = unique("rs");
    let dir = PathBuf::from(format!("/tmp/{tag}"));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Scratch(dir.clone());
    let node = Netns::create(&format!("{tag}-node"))?;
    let svcs = services(n, &serve_eps());
    let label = format!("{tag}-agent");
    let pin = PathBuf::from(format!("/sys/fs/bpf/{label}"));
    let toml = agent_toml(&pin, &svcs, "");
    Ok(match AgentRun::start(&node, &dir, &label, &toml) {
        Ok((a, took)) => {
            std::thread::sleep(Duration::from_millis(500));
            let (memlock, per_map) = map_memory(a.pid());
            Scale {
                services: n,
                ok: true,
                ready_ms: took.as_secs_f64() * 1e3,
                memlock,
                per_map,
                rss_kib: rss_kib(a.pid()),
                error: String::new(),
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let short: Vec<&str> = msg.lines().take(1).collect();
            let _ = Command::new(redirector_bin())
                .args(["uninstall", "--pin-path"])
                .arg(&pin)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            Scale {
                services: n,
                ok: false,
                ready_ms: f64::NAN,
                memlock: 0,
                per_map: BTreeMap::new(),
                rss_kib: 0,
                error: if short.is_empty() {
                    msg.lines().take(3).collect::<Vec<_>>().join(" / ")
                } else {
                    short.join(" / ")
                },
            }
        }
    })
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    json!({
        "nproc": sh("nproc", &[]),
        "cpu": cpu,
        "kernel": sh("uname", &["-r"]),
        "iptables": sh("iptables", &["--version"]),
        "nft": sh("nft", &["--version"]),
        "wrk": sh("sh", &["-c", "wrk --version 2>&1 | head -1"]),
        "memory": sh("sh", &["-c", "free -m | awk '/Mem:/ {print $2 \" MiB\"}'"]),
    })
}

fn ensure_tools() {
    let missing: Vec<&str> = [
        ("wrk", "wrk"),
        ("iptables-restore", "iptables"),
        ("nft", "nftables"),
        ("bpftool", "bpftool"),
    ]
    .into_iter()
    .filter(|(bin, _)| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        println!("installing {missing:?}");
        let mut c = Command::new("apt-get");
        c.args(["install", "-y"]).args(&missing);
        let _ = c.status();
    }
}

fn fmt_rate(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.0}", v)
    } else {
        format!("{:.1}", v)
    }
}

fn fmt_us(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1e3)
    } else {
        format!("{:.0} us", v)
    }
}

#[test]
#[ignore = "benchmark: run by `cargo xtask perf --node`"]
fn node() {
    let a = crate::selection("--node");
    if !a.on {
        println!("skipped: PERF_ARGS selects no node benchmark");
        return;
    }
    crate::require_root!();
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ensure_tools();
    let plan = if a.quick {
        Plan {
            rounds: 1,
            rounds_10k: 1,
            counts: vec![1, 1000],
            flip_counts: vec![1000],
            run: Duration::from_secs(2),
            warm: Duration::from_millis(1000),
            flips: 1,
            wrk_conns: 16,
            gen_threads: 4,
        }
    } else {
        Plan {
            rounds: 2,
            rounds_10k: 1,
            counts: vec![1, 1000, 10_000],
            flip_counts: vec![1000, 10_000],
            run: Duration::from_secs(5),
            warm: Duration::from_secs(1),
            flips: 1,
            wrk_conns: 16,
            gen_threads: 4,
        }
    };
    let scale_counts = [10_000usize, 100_000];
    let started = Instant::now();
    println!(
        "node perf: {} rounds x {:?} services x {} variants, {:?} runs",
        plan.rounds,
        plan.counts,
        VARIANTS.len(),
        plan.run
    );
    let mut samples: BTreeMap<(Variant, usize), Samples> = BTreeMap::new();
    let mut flips: Flips = BTreeMap::new();
    for r in 0..plan.rounds {
        for (ci, &n) in plan.counts.iter().enumerate() {
            if n >= 10_000 && r >= plan.rounds_10k {
                continue;
            }
            // Rotate the variant order every round and count: interleaved, no fixed order.
            for k in 0..VARIANTS.len() {
                let v = VARIANTS[(k + r + ci) % VARIANTS.len()];
                let s = samples.entry((v, n)).or_default();
                let t = Instant::now();
                block(&plan, v, n, s, &mut flips)
                    .unwrap_or_else(|e| panic!("{} at {n} services: {e:#}", v.name()));
                println!(
                    "  round {r} {:>10} {n:>6} services: keep-alive {:>8} req/s, new {:>8} conn/s ({:.1} s)",
                    v.name(),
                    fmt_rate(s.keepalive.last().unwrap().rate),
                    fmt_rate(s.newconn.last().unwrap().rate),
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    let scale: Vec<Scale> = scale_counts
        .iter()
        .map(|&n| {
            let s = measure_scale(n).unwrap_or_else(|e| panic!("scale {n}: {e:#}"));
            println!(
                "  scale {n}: ok {} memlock {} RSS {} KiB {}",
                s.ok, s.memlock, s.rss_kib, s.error
            );
            s
        })
        .collect();
    // An extra point just under MAX_SERVICES when 100,000 did not fit.
    let mut scale = scale;
    if !a.quick && scale.last().is_some_and(|s| !s.ok) {
        let n = redirector_common::MAX_SERVICES as usize - 16;
        if let Ok(s) = measure_scale(n) {
            println!(
                "  scale {n}: ok {} memlock {} RSS {} KiB",
                s.ok, s.memlock, s.rss_kib
            );
            scale.push(s);
        }
    }

    // ---- summarise
    let agg = |l: &[Load], f: fn(&Load) -> f64| median(&l.iter().map(f).collect::<Vec<_>>());
    let mut rows = Vec::new();
    for ((v, n), s) in &samples {
        rows.push(json!({
            "variant": v.name(), "services": n,
            "keepalive_rps": agg(&s.keepalive, |l| l.rate),
            "keepalive_p50_us": agg(&s.keepalive, |l| l.p50_us),
            "keepalive_p99_us": agg(&s.keepalive, |l| l.p99_us),
            "keepalive_errors": s.keepalive.iter().map(|l| l.errors).sum::<u64>(),
            "newconn_cps": agg(&s.newconn, |l| l.rate),
            "newconn_p50_us": agg(&s.newconn, |l| l.p50_us),
            "newconn_p99_us": agg(&s.newconn, |l| l.p99_us),
            "newconn_errors": s.newconn.iter().map(|l| l.errors).sum::<u64>(),
            "program_ms": median(&s.program_ms),
            "rounds": s.keepalive.len(),
            "keepalive_rps_rounds": s.keepalive.iter().map(|l| l.rate).collect::<Vec<_>>(),
            "newconn_cps_rounds": s.newconn.iter().map(|l| l.rate).collect::<Vec<_>>(),
        }));
    }
    let get = |v: &str, n: usize, k: &str| -> f64 {
        rows.iter()
            .find(|r| r["variant"] == v && r["services"] == n)
            .and_then(|r| r[k].as_f64())
            .unwrap_or(f64::NAN)
    };
    let flip_rows: Vec<Value> = flips
        .iter()
        .map(|((m, n), v)| {
            let us: Vec<f64> = v.iter().map(|x| x.0).collect();
            let probes: Vec<f64> = v.iter().map(|x| x.1 as f64).collect();
            json!({"method": m, "services": n, "median_us": median(&us), "p99_us": pct(&us, 0.99),
                   "max_us": pct(&us, 1.0), "count": v.len(), "samples_us": us,
                   "max_probes": pct(&probes, 1.0)})
        })
        .collect();
    let flip = |m: &str, n: usize| -> f64 {
        flips
            .get(&(m.to_owned(), n))
            .map(|v| median(&v.iter().map(|x| x.0).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    };
    let dp: Option<Value> = std::fs::read_to_string(out_dir().join("datapath.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());

    // ---- targets
    let counts = &plan.counts;
    let ka_ratio = counts
        .iter()
        .map(|&n| get("redirector", n, "keepalive_rps") / get("direct", n, "keepalive_rps"))
        .fold(f64::INFINITY, f64::min);
    let nc = |v: &str, n| get(v, n, "newconn_cps");
    let has10k = counts.contains(&10_000);
    let t_ka = ka_ratio >= 0.97;
    let (r10, i10, n10) = (
        nc("redirector", 10_000),
        nc("iptables", 10_000),
        nc("nftables", 10_000),
    );
    let t_10k = has10k && r10 >= 2.0 * i10 && r10 >= n10;
    let (r1, i1, n1) = (nc("redirector", 1), nc("iptables", 1), nc("nftables", 1));
    let t_1 = r1 >= i1 && r1 >= n1;
    let flip_x = flip("iptables: full restore", 10_000) / flip("redirector: map write", 10_000);
    let t_flip = flip_x >= 100.0;
    let verdict = |measured: bool, m: bool| {
        if !measured {
            "not measured"
        } else if m {
            "met"
        } else {
            "NOT met"
        }
    };
    let targets = json!({
        "keepalive_ge_97pct_of_direct": {"met": t_ka, "min_ratio": ka_ratio,
            "verdict": verdict(true, t_ka)},
        "newconn_10k_ge_2x_iptables_and_ge_nftables": {"met": t_10k, "redirector": r10,
            "iptables": i10, "nftables": n10, "verdict": verdict(has10k, t_10k)},
        "newconn_1_ge_iptables_and_nftables": {"met": t_1, "redirector": r1, "iptables": i1,
            "nftables": n1, "verdict": verdict(true, t_1)},
        "flip_ge_100x_faster_than_iptables_restore_10k": {"met": t_flip, "ratio": flip_x,
            "verdict": verdict(has10k, t_flip)},
    });

    // ---- markdown
    let m = machine();
    let mut md = String::new();
    md += "# Node: redirector vs kube-proxy iptables / nftables\n\n";
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}, {} (Debian's iptables is the nf_tables backend: \
         iptables-nft; the rules are the same kube-proxy layout), {}, {}.\n",
        m["nproc"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
        m["wrk"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Client, node and backend in three network namespaces on this one machine (client, \
         server and forwarding share the {} CPUs, so rates are whole-system rates). Each block \
         (variant x service count) gets fresh namespaces; {} round(s) ({} at 10,000 services, \
         with one flip there: each iptables-restore takes long), variant order rotated per round, warm-up {:?} before each; kept-alive: `wrk -t2 -c{}` for {:?}; new \
         connections: {} in-process clients doing connect + GET + close for {:?} (latency = \
         the whole connection). Values are medians over rounds (p50/p99 are the run's \
         percentiles, median over rounds). `vs direct` = ratio to the direct-to-pod run of \
         the same service count. The measured service is the last of N in KUBE-SERVICES.\n",
        m["nproc"].as_str().unwrap_or("?"),
        plan.rounds,
        plan.rounds_10k,
        plan.warm,
        plan.wrk_conns,
        plan.run,
        plan.gen_threads,
        plan.run
    );
    md += "## Throughput and latency through the VIP\n\n";
    md += "| services | variant | kept-alive req/s | vs direct | p50 | p99 | new conn/s | vs direct | p50 | p99 | errors |\n";
    md += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for &n in counts {
        for v in VARIANTS {
            let g = |k: &str| get(v.name(), n, k);
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {:.3} | {} | {} | {} | {:.3} | {} | {} | {} |",
                v.name(),
                fmt_rate(g("keepalive_rps")),
                g("keepalive_rps") / get("direct", n, "keepalive_rps"),
                fmt_us(g("keepalive_p50_us")),
                fmt_us(g("keepalive_p99_us")),
                fmt_rate(g("newconn_cps")),
                g("newconn_cps") / get("direct", n, "newconn_cps"),
                fmt_us(g("newconn_p50_us")),
                fmt_us(g("newconn_p99_us")),
                g("keepalive_errors") + g("newconn_errors"),
            );
        }
    }
    md += "\n## Programming N services from scratch\n\n| services | redirector (agent start to ready) | iptables-restore | nft -f |\n|---:|---:|---:|---:|\n";
    for &n in counts {
        let _ = writeln!(
            md,
            "| {n} | {:.1} ms | {:.1} ms | {:.1} ms |",
            get("redirector", n, "program_ms"),
            get("iptables", n, "program_ms"),
            get("nftables", n, "program_ms")
        );
    }
    md += "\nThe agent's time includes process start, loading and attaching the eBPF programs and \
           parsing the TOML config.\n";
    md += "\n## Flip: decision to the first new connection on the new target\n\n\
           The measured service moves between its two pod endpoints and the node-local activator \
           (and back); a prober in the client namespace opens new connections back to back from \
           the decision on. `redirector: map write` writes `SERVICES[vip].mode` in the pinned map \
           (what the agent does); `config + SIGHUP` rewrites the agent's config file and signals \
           it (parse + diff + write); `full` rewrites kube-proxy's whole rule set with the one \
           service changed; `partial` is kube-proxy's MinimizeIPTablesRestore (KUBE-SERVICES in \
           full + the changed chains); `incremental` is the nftables proxier's transaction for one \
           changed service.\n\n";
    md += "| services | method | median | p99 | max | flips | probes needed (max) | vs redirector map write |\n|---:|---|---:|---:|---:|---:|---:|---:|\n";
    for r in &flip_rows {
        let n = r["services"].as_u64().unwrap_or(0) as usize;
        let med = r["median_us"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} | {} | {:.0}x |",
            r["method"].as_str().unwrap_or(""),
            fmt_us(med),
            fmt_us(r["p99_us"].as_f64().unwrap_or(f64::NAN)),
            fmt_us(r["max_us"].as_f64().unwrap_or(f64::NAN)),
            r["count"],
            r["max_probes"],
            med / flip("redirector: map write", n)
        );
    }
    if let Some(dp) = &dp {
        let _ = writeln!(
            md,
            "\nIn-kernel figure from `datapath.json` (BPF_PROG_TEST_RUN, {} services): map write \
             {:.1} us, write to first packet on the new target {:.1} us (median). The \
             end-to-end numbers above add a real TCP connection (SYN..response) per probe.",
            dp["services"],
            dp["flip_us"]["write_median"].as_f64().unwrap_or(f64::NAN),
            dp["flip_us"]["median"].as_f64().unwrap_or(f64::NAN)
        );
    } else {
        md += "\n(`datapath.json` not present: run `--datapath` for the in-kernel map-write figure.)\n";
    }
    md += "\n## Scale: agent map memory and RSS\n\n| services | programmed | agent start to ready | BPF map memlock | agent RSS | largest maps |\n|---:|---|---:|---:|---:|---|\n";
    for s in &scale {
        let mut top: Vec<(&String, &u64)> = s.per_map.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(4)
            .map(|(n, b)| format!("{n} {:.1} MiB", **b as f64 / 1048576.0))
            .collect();
        if s.ok {
            let _ = writeln!(
                md,
                "| {} | yes | {:.0} ms | {:.1} MiB | {:.1} MiB | {} |",
                s.services,
                s.ready_ms,
                s.memlock as f64 / 1048576.0,
                s.rss_kib as f64 / 1024.0,
                top.join(", ")
            );
        } else {
            let _ = writeln!(
                md,
                "| {} | **no**: {} | - | - | - | - |",
                s.services,
                s.error.replace('|', "/")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nMAX_SERVICES is {}; memlock is the kernel's per-map figure from /proc/<agent>/fdinfo \
         (for the non-preallocated MAGLEV map it follows the entries in use).",
        redirector_common::MAX_SERVICES
    );
    md += "\n## Targets\n\n";
    for (k, v) in targets.as_object().unwrap() {
        let _ = writeln!(
            md,
            "- {k}: **{}** — {}",
            v["verdict"].as_str().unwrap_or(""),
            {
                let mut o = v.clone();
                o.as_object_mut().unwrap().remove("verdict");
                o.as_object_mut().unwrap().remove("met");
                o.to_string()
            }
        );
    }
    let _ = writeln!(
        md,
        "\nTotal time of this part: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    println!("\n{md}");

    let out = json!({
        "quick": a.quick,
        "machine": m,
        "rounds": plan.rounds,
        "run_secs": plan.run.as_secs_f64(),
        "rows": rows,
        "flips": flip_rows,
        "scale": scale.iter().map(|s| json!({
            "services": s.services, "ok": s.ok, "ready_ms": s.ready_ms, "memlock_bytes": s.memlock,
            "per_map_bytes": s.per_map, "agent_rss_kib": s.rss_kib, "error": s.error,
        })).collect::<Vec<_>>(),
        "targets": targets,
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/perf");
    std::fs::write(
        dir.join("node.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .expect("writing node.json");
    std::fs::write(dir.join("node.md"), &md).expect("writing node.md");

    // Every benchmark must have produced numbers (all that --quick asserts).
    for r in &rows {
        for k in ["keepalive_rps", "newconn_cps"] {
            assert!(
                r[k].as_f64().is_some_and(|v| v > 0.0),
                "no {k} for {} at {}",
                r["variant"],
                r["services"]
            );
        }
    }
    for r in &flip_rows {
        assert!(r["median_us"].as_f64().is_some_and(|v| v > 0.0), "flip {r}");
    }
    assert!(scale.iter().any(|s| s.ok && s.memlock > 0), "scale numbers");
    report::write_report().expect("writing the report");
}
