//! The local config source: the TOML file `redirector agent --config` reads (and the embedded
//! default), parsed into typed desired state. Every error names the file, line and field.
//! What it accepts the agent programs whole: `service` checks each `[[service]]`, `check`
//! what spans services (names, VIPs, map capacity).
mod check;
mod service;
#[cfg(test)]
mod tests;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

pub use crate::datapath::MapSizes;

/// The embedded default: one machine, the demo's node.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// What a service speaks. `http` and `h2c` are proxied per request by the activator;
/// `tcp` is the L4 mode (held connections spliced to the instance); all three are TCP in
/// the datapath. `udp` services have no activator path (Proxy has nothing to hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    H2c,
    Tcp,
    Udp,
}

impl Protocol {
    pub fn is_udp(self) -> bool {
        self == Protocol::Udp
    }
}

/// How the scaler tells an instance is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers 2xx.
    Http(String),
}

/// How to run instances of a service (the local stand-in for a Deployment + KPA).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub command: String,
    pub args: Vec<String>,
    pub port: u16,
    pub min_scale: u32,
    pub max_scale: u32,
    /// 0 = unlimited.
    pub container_concurrency: u32,
    pub target_concurrency: f64,
    /// Knative's target burst capacity: Proxy while spare capacity is below it (0: only
    /// while no instance is ready; negative: always Proxy).
    pub target_burst_capacity: f64,
    pub idle_timeout: Duration,
    pub stable_window: Duration,
    /// An instance not ready this long after it started is killed and replaced.
    pub startup_timeout: Duration,
    pub readiness: Readiness,
    pub env: Vec<(String, String)>,
}

/// Activator limits (Knative's queue is unbounded; this one is not).
#[derive(Debug, Clone, PartialEq)]
pub struct ActivatorConfig {
    pub max_held_per_service: usize,
    pub max_held_total: usize,
    pub max_held_bytes_per_service: u64,
    pub max_held_bytes_total: u64,
    pub drain_timeout: Duration,
    /// Whether the agent listens on `node.activator` (off when something else serves it).
    pub listen: bool,
    /// A client's request head must arrive within this (nginx `client_header_timeout`).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request is closed after this (nginx
    /// `keepalive_timeout`).
    pub idle_timeout: Duration,
    /// A request body with nothing received for this is abandoned (nginx
    /// `client_body_timeout`).
    pub body_timeout: Duration,
    /// A client that reads nothing of a response for this is dropped (nginx `send_timeout`).
    pub write_timeout: Duration,
    /// Client connections open at once; more are closed as accepted (Envoy's listener
    /// connection limit).
    pub max_connections: usize,
    /// Per-service ports of the node-local activator, `(first, count)`: the service with id
    /// `i < count` is sent to `first + i` and an `sk_lookup` program hands those
    /// connections to the listener (read at start). `None`: every service on the listener's
    /// own port.
    pub service_ports: Option<(u16, u16)>,
    /// Which connections the listener takes (`[activator] accept`).
    pub accept: Accept,
}

/// `[activator] accept`: which connections reach the activator's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accept {
    /// Only flows the datapath delivered (translated from a service, or one of Knative's
    /// endpoints): the listener is bound to loopback and `sk_lookup` hands it those flows;
    /// a connection to `node.activator` made directly, from outside the node or from a
    /// pod, is refused. Needs `sk_lookup` (5.9); without it the agent falls back to `Any`
    /// and says so.
    #[default]
    Delivered,
    /// Anything that reaches `node.activator` (the listener is bound there).
    Any,
}

/// `activator.service_ports` when not given: 10,000 ports below the kernel's ephemeral range
/// (32768–60999) and Kubernetes' NodePorts (30000–32767).
pub const DEFAULT_SERVICE_PORTS: (u16, u16) = (20000, 10000);

impl Default for ActivatorConfig {
    fn default() -> Self {
        Self {
            max_held_per_service: 10_000,
            max_held_total: 20_000,
            max_held_bytes_per_service: 64 << 20,
            max_held_bytes_total: 256 << 20,
            drain_timeout: Duration::from_secs(30),
            listen: true,
            header_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            max_connections: 50_000,
            service_ports: Some(DEFAULT_SERVICE_PORTS),
            accept: Accept::Delivered,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Serve,
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeCfg {
    /// Native where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// How translated packets to a pod on this node leave the node's side of the pod veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HostRouting {
    /// Through the node's IP stack, as any forwarded packet (routing, netfilter, neighbours).
    #[default]
    Kernel,
    /// Straight into the pod's namespace from tc (`bpf_fib_lookup` + `bpf_redirect_peer`),
    /// skipping the node's forwarding path, netfilter included: only where no policy on the
    /// node's FORWARD path must see pod traffic.
    Bpf,
}

/// Where the socket hooks (`connect()` translation for the node's own clients) attach:
/// `[node] cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SocketCgroup {
    /// The root of the cgroup v2 hierarchy this agent sees (the first cgroup2 mount of the
    /// hierarchy's root in its mount namespace); the packet path alone if there is none.
    #[default]
    Auto,
    /// No socket hooks: every client goes through the packet path.
    Off,
    /// This cgroup v2 directory (and everything below it).
    Path(PathBuf),
}

/// One string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Splits a spanned one-or-many into items that carry the field's span.
fn spanned_items(v: Spanned<OneOrMany>) -> Vec<(std::ops::Range<usize>, String)> {
    let span = v.span();
    match v.into_inner() {
        OneOrMany::One(s) => vec![(span, s)],
        OneOrMany::Many(list) => list.into_iter().map(|s| (span.clone(), s)).collect(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    node: RawNode,
    #[serde(default)]
    conntrack: Option<RawConntrack>,
    #[serde(default)]
    maps: Option<RawMaps>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default)]
    activator: Option<RawActivator>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivator {
    max_held_per_service: Option<usize>,
    max_held_total: Option<usize>,
    max_held_bytes_per_service: Option<u64>,
    max_held_bytes_total: Option<u64>,
    drain_timeout_secs: Option<u64>,
    listen: Option<bool>,
    header_read_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    service_ports: Option<Spanned<String>>,
    accept: Option<Accept>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScale {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    port: Spanned<u16>,
    #[serde(default)]
    min_scale: u32,
    #[serde(default = "default_max_scale")]
    max_scale: u32,
    #[serde(default)]
    container_concurrency: u32,
    #[serde(default)]
    target_concurrency: Option<Spanned<f64>>,
    #[serde(default)]
    target_burst_capacity: Option<Spanned<f64>>,
    #[serde(default)]
    idle_timeout_secs: Option<Spanned<f64>>,
    #[serde(default)]
    stable_window_secs: Option<Spanned<f64>>,
    #[serde(default)]
    startup_timeout_secs: Option<Spanned<f64>>,
    #[serde(default)]
    readiness: Option<Spanned<String>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
}

fn default_max_scale() -> u32 {
    10
}

/// `scale.startup_timeout_secs` when not given.
pub const DEFAULT_STARTUP_TIMEOUT_SECS: f64 = 120.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    uplink: Vec<Spanned<String>>,
    #[serde(default)]
    pod_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pin_path: Option<PathBuf>,
    #[serde(default)]
    activator: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    xdp_mode: XdpModeCfg,
    #[serde(default)]
    host_routing: HostRouting,
    #[serde(default)]
    cgroup: Option<Spanned<String>>,
    #[serde(default)]
    metrics: Option<Spanned<String>>,
    #[serde(default)]
    instance_cidr: Option<Spanned<String>>,
    #[serde(default)]
    instance_cidr6: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    tcp_timeout_secs: Option<Spanned<u64>>,
    udp_timeout_secs: Option<Spanned<u64>>,
    closing_timeout_secs: Option<Spanned<u64>>,
}

/// Map capacities; a change takes effect at the next agent start (the maps are resized
/// and their entries copied).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaps {
    services: Option<Spanned<u32>>,
    backends: Option<Spanned<u32>>,
    conntrack: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    #[serde(default)]
    namespace: Option<String>,
    vip: Spanned<OneOrMany>,
    port: Spanned<u16>,
    #[serde(default = "default_proto")]
    protocol: Protocol,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    /// Knative activators to use in Proxy mode instead of the node-local one.
    #[serde(default)]
    activators: Vec<Spanned<String>>,
    /// Request timeout through the activator (queue time counts).
    #[serde(default)]
    timeout_secs: Option<Spanned<f64>>,
    #[serde(default)]
    scale: Option<Spanned<RawScale>>,
}

fn default_proto() -> Protocol {
    Protocol::Http
}
fn default_mode() -> Mode {
    Mode::Serve
}

/// Node-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub uplink: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub pin_path: PathBuf,
    pub activator: Vec<SocketAddr>,
    pub xdp_mode: XdpModeCfg,
    /// Read when the programs are loaded: a change takes a restart.
    pub host_routing: HostRouting,
    /// Where the socket hooks attach (a change takes a restart).
    pub cgroup: SocketCgroup,
    pub metrics: Option<SocketAddr>,
    /// Addresses for instances the agent starts (one /32 or /128 each).
    pub instance_cidr: Option<(IpAddr, u8)>,
    pub instance_cidr6: Option<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConntrackConfig {
    pub tcp_timeout: Duration,
    pub udp_timeout: Duration,
    pub closing_timeout: Duration,
}

/// One service as the agent programs it: a name, its VIPs and where Serve/Proxy lead.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: Option<String>,
    pub vips: Vec<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub backends: Vec<SocketAddr>,
    pub activators: Vec<SocketAddr>,
    pub timeout: Duration,
    pub scale: Option<ScaleConfig>,
}

impl ServiceConfig {
    /// `namespace/name` or `name`.
    pub fn full_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub conntrack: ConntrackConfig,
    pub maps: MapSizes,
    pub activator: ActivatorConfig,
    pub services: Vec<ServiceConfig>,
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/redirector";

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_for(path, None)
    }

    /// `load`, checking capacity against the `running` maps (see `parse_for`).
    pub fn load_for(path: &Path, running: Option<&MapSizes>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_for(&text, path, running)
    }

    /// Parses `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_for(text, path, None)
    }

    /// `parse`, checking that the services fit in maps of `running` sizes instead of the
    /// file's `[maps]` (a reload: a `[maps]` change waits for the next start).
    pub fn parse_for(
        text: &str,
        path: &Path,
        running: Option<&MapSizes>,
    ) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, path, running, &|k| std::env::var(k).ok())
    }

    /// `parse_for`, with `env` for the variables the file may name (`$NODE_IP`).
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        running: Option<&MapSizes>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let at = At { text, path, env };
        let raw: RawFile =
            toml::from_str(text).map_err(|e| at.err(e.span(), e.message().to_owned()))?;
        let node = node(&at, raw.node)?;
        let conntrack = conntrack(&at, raw.conntrack)?;
        let maps = maps(&at, raw.maps)?;
        let mut services = Vec::new();
        let mut spans = Vec::new();
        let mut seen = service::Seen::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let (s, sp) = service::parse(&at, i, s, &mut seen)?;
            services.push(s);
            spans.push(sp);
        }
        check::services(&at, &services, &spans, running.unwrap_or(&maps))?;

        let a = raw.activator.unwrap_or_default();
        let d = ActivatorConfig::default();
        let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
        let activator = ActivatorConfig {
            max_held_per_service: a.max_held_per_service.unwrap_or(d.max_held_per_service),
            max_held_total: a.max_held_total.unwrap_or(d.max_held_total),
            max_held_bytes_per_service: a
                .max_held_bytes_per_service
                .unwrap_or(d.max_held_bytes_per_service),
            max_held_bytes_total: a.max_held_bytes_total.unwrap_or(d.max_held_bytes_total),
            drain_timeout: a
                .drain_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(d.drain_timeout),
            listen: a.listen.unwrap_or(d.listen),
            header_read_timeout: secs(a.header_read_timeout_secs, d.header_read_timeout),
            idle_timeout: secs(a.idle_timeout_secs, d.idle_timeout),
            body_timeout: secs(a.body_timeout_secs, d.body_timeout),
            write_timeout: secs(a.write_timeout_secs, d.write_timeout),
            max_connections: a.max_connections.unwrap_or(d.max_connections),
            service_ports: service_ports(&at, a.service_ports, &node.activator)?,
            accept: a.accept.unwrap_or_default(),
        };
        Ok(Config {
            node,
            conntrack,
            maps,
            activator,
            services,
        })
    }
}

/// The environment variable a node address may name as its host (`"$NODE_IP:8012"`): the
/// DaemonSet sets it from the downward API (`status.hostIP`).
pub const NODE_IP_VAR: &str = "NODE_IP";

/// A node address: `"10.0.0.1:80"`, `"[fd00::1]:80"`, or `"$NODE_IP:80"` (also
/// `"${NODE_IP}:80"`), the host taken from the environment (an IPv6 one needs no brackets).
fn parse_node_addr(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<SocketAddr, String> {
    let var = format!("${NODE_IP_VAR}");
    let braced = format!("${{{NODE_IP_VAR}}}");
    let Some(rest) = s.strip_prefix(&braced).or_else(|| s.strip_prefix(&var)) else {
        if s.contains('$') {
            return Err(format!(
                "{s:?}: only ${NODE_IP_VAR} is expanded, as the whole host (\"${NODE_IP_VAR}:8012\")"
            ));
        }
        return parse_sockaddr(s);
    };
    let port = rest
        .strip_prefix(':')
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| format!("{s:?}: a port must follow, as in \"${NODE_IP_VAR}:8012\""))?;
    let value = env(NODE_IP_VAR)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            format!(
                "{s:?}: {NODE_IP_VAR} is not set in the environment (the DaemonSet sets it from status.hostIP)"
            )
        })?;
    let ip: std::net::IpAddr = value
        .parse()
        .map_err(|_| format!("{s:?}: {NODE_IP_VAR}={value:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_sockaddr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not an address with a port (\"10.0.0.1:80\" or \"[fd00::1]:80\")")
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|p| p + 1).unwrap_or(0) + 1;
    (line, column)
}

/// Where errors point: the file's text and its name.
pub(crate) struct At<'a> {
    text: &'a str,
    path: &'a Path,
    /// The environment, for `$NODE_IP`.
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl At<'_> {
    /// An error at `span` (`None` only for what has no place in the file).
    fn err(&self, span: Option<std::ops::Range<usize>>, message: String) -> ConfigError {
        let (line, column) = span.map(|s| line_col(self.text, s.start)).unwrap_or((1, 1));
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message,
        }
    }
}

fn node(at: &At<'_>, raw: RawNode) -> Result<NodeConfig, ConfigError> {
    let mut activator = Vec::new();
    for (span, a) in raw.activator.map(spanned_items).unwrap_or_default() {
        let sa = parse_node_addr(&a, at.env)
            .map_err(|m| at.err(Some(span.clone()), format!("node.activator: {m}")))?;
        // Service entries carry it as a datapath endpoint, which keeps no zone.
        if a.contains('%') {
            return Err(at.err(
                Some(span),
                format!("node.activator: {a:?} has an IPv6 zone: the datapath keeps no zone"),
            ));
        }
        activator.push(sa);
    }
    let metrics = match raw.metrics {
        Some(m) => Some(
            parse_node_addr(m.get_ref(), at.env)
                .map_err(|e| at.err(Some(m.span()), format!("node.metrics: {e}")))?,
        ),
        None => None,
    };
    for (f, list) in [
        ("uplink", &raw.uplink),
        ("pod_interfaces", &raw.pod_interfaces),
    ] {
        for p in list {
            glob::Pattern::new(p.get_ref()).map_err(|e| {
                at.err(
                    Some(p.span()),
                    format!("node.{f}: interface pattern {:?}: {e}", p.get_ref()),
                )
            })?;
        }
    }
    let cidr = |v: Option<Spanned<String>>,
                f: &str,
                v6: bool|
     -> Result<Option<(IpAddr, u8)>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let parsed = v.get_ref().split_once('/').and_then(|(a, l)| {
            let a: IpAddr = a.parse().ok()?;
            let l: u8 = l.parse().ok()?;
            (a.is_ipv6() == v6 && l <= if v6 { 128 } else { 32 }).then_some((a, l))
        });
        parsed.map(Some).ok_or_else(|| {
            at.err(
                Some(v.span()),
                format!(
                    "node.{f}: {:?} is not an IPv{} CIDR",
                    v.get_ref(),
                    if v6 { 6 } else { 4 }
                ),
            )
        })
    };
    let cgroup = match raw.cgroup {
        None => SocketCgroup::Auto,
        Some(v) => match v.get_ref().as_str() {
            "auto" => SocketCgroup::Auto,
            "off" => SocketCgroup::Off,
            p if p.starts_with('/') => SocketCgroup::Path(PathBuf::from(p)),
            other => {
                return Err(at.err(
                    Some(v.span()),
                    format!(
                        "node.cgroup: {other:?} is not \"auto\", \"off\" or an absolute path \
                         of a cgroup v2 directory"
                    ),
                ))
            }
        },
    };
    Ok(NodeConfig {
        cgroup,
        instance_cidr: cidr(raw.instance_cidr, "instance_cidr", false)?,
        instance_cidr6: cidr(raw.instance_cidr6, "instance_cidr6", true)?,
        uplink: raw.uplink.into_iter().map(Spanned::into_inner).collect(),
        pod_interfaces: raw
            .pod_interfaces
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        pin_path: raw.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into()),
        activator,
        xdp_mode: raw.xdp_mode,
        host_routing: raw.host_routing,
        metrics,
    })
}

/// `activator.service_ports`: "off", or "FIRST-LAST" not holding a listener's port.
fn service_ports(
    at: &At<'_>,
    raw: Option<Spanned<String>>,
    listeners: &[SocketAddr],
) -> Result<Option<(u16, u16)>, ConfigError> {
    let Some(v) = raw else {
        return Ok(Some(DEFAULT_SERVICE_PORTS));
    };
    if v.get_ref() == "off" {
        return Ok(None);
    }
    let range = v.get_ref().split_once('-').and_then(|(a, b)| {
        let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (a >= 1024 && a <= b).then(|| (a, b - a + 1))
    });
    let Some((first, count)) = range else {
        return Err(at.err(
            Some(v.span()),
            format!(
                "activator.service_ports: {:?} is not \"off\" or a range \"FIRST-LAST\" of \
                 ports from 1024 up",
                v.get_ref()
            ),
        ));
    };
    if let Some(l) = listeners
        .iter()
        .find(|l| (first as u32..first as u32 + count as u32).contains(&(l.port() as u32)))
    {
        return Err(at.err(
            Some(v.span()),
            format!("activator.service_ports: the range holds the listener's port ({l})"),
        ));
    }
    Ok(Some((first, count)))
}

fn conntrack(at: &At<'_>, raw: Option<RawConntrack>) -> Result<ConntrackConfig, ConfigError> {
    let ct = raw.unwrap_or(RawConntrack {
        tcp_timeout_secs: None,
        udp_timeout_secs: None,
        closing_timeout_secs: None,
    });
    // At least 1: the datapath checks expiry only on flows idle for more than a second; at
    // most `MAX_TIMEOUT_SECS`: the nanoseconds must fit the datapath's u64 clock.
    let secs = |field: &str, v: Option<Spanned<u64>>, default: u64| match v {
        None => Ok(Duration::from_secs(default)),
        Some(v) if (1..=service::MAX_TIMEOUT_SECS).contains(v.get_ref()) => {
            Ok(Duration::from_secs(*v.get_ref()))
        }
        Some(v) => Err(at.err(
            Some(v.span()),
            format!(
                "conntrack.{field}: {} is outside 1..={}",
                v.get_ref(),
                service::MAX_TIMEOUT_SECS
            ),
        )),
    };
    Ok(ConntrackConfig {
        tcp_timeout: secs("tcp_timeout_secs", ct.tcp_timeout_secs, 6 * 3600)?,
        udp_timeout: secs("udp_timeout_secs", ct.udp_timeout_secs, 60)?,
        closing_timeout: secs("closing_timeout_secs", ct.closing_timeout_secs, 10)?,
    })
}

fn maps(at: &At<'_>, raw: Option<RawMaps>) -> Result<MapSizes, ConfigError> {
    let mut maps = MapSizes::default();
    let Some(m) = raw else { return Ok(maps) };
    for (field, value, range, out) in [
        (
            "services",
            m.services,
            MapSizes::SERVICES,
            &mut maps.services,
        ),
        (
            "backends",
            m.backends,
            MapSizes::BACKENDS,
            &mut maps.backends,
        ),
        (
            "conntrack",
            m.conntrack,
            MapSizes::CONNTRACK,
            &mut maps.conntrack,
        ),
    ] {
        let Some(v) = value else { continue };
        if !range.contains(v.get_ref()) {
            return Err(at.err(
                Some(v.span()),
                format!(
                    "maps.{field}: {} is outside {}..={}",
                    v.get_ref(),
                    range.start(),
                    range.end()
                ),
            ));
        }
        *out = *v.get_ref();
    }
    Ok(maps)
}
