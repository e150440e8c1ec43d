//! The local config source: the TOML file `redirector agent --config` reads (and the embedded
//! default), parsed into typed desired state. Every error names the file, line and field.
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
}

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScale {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    port: u16,
    #[serde(default)]
    min_scale: u32,
    #[serde(default = "default_max_scale")]
    max_scale: u32,
    #[serde(default)]
    container_concurrency: u32,
    #[serde(default = "default_target")]
    target_concurrency: f64,
    #[serde(default)]
    target_burst_capacity: f64,
    #[serde(default = "default_idle")]
    idle_timeout_secs: f64,
    #[serde(default = "default_stable")]
    stable_window_secs: f64,
    #[serde(default)]
    readiness: Option<Spanned<String>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
}

fn default_max_scale() -> u32 {
    10
}
fn default_target() -> f64 {
    100.0
}
fn default_idle() -> f64 {
    30.0
}
fn default_stable() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    uplink: Vec<String>,
    #[serde(default)]
    pod_interfaces: Vec<String>,
    #[serde(default)]
    pin_path: Option<PathBuf>,
    #[serde(default)]
    activator: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    xdp_mode: XdpModeCfg,
    #[serde(default)]
    host_routing: HostRouting,
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
    tcp_timeout_secs: Option<u64>,
    udp_timeout_secs: Option<u64>,
    closing_timeout_secs: Option<u64>,
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
    port: u16,
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
    timeout_secs: Option<f64>,
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawFile =
            toml::from_str(text).map_err(|e| err(e.span(), e.message().to_owned()))?;

        let mut activator = Vec::new();
        for (span, a) in raw.node.activator.map(spanned_items).unwrap_or_default() {
            activator.push(
                parse_sockaddr(&a).map_err(|m| err(Some(span), format!("node.activator: {m}")))?,
            );
        }
        let metrics = match raw.node.metrics {
            Some(m) => Some(
                parse_sockaddr(m.get_ref())
                    .map_err(|e| err(Some(m.span()), format!("node.metrics: {e}")))?,
            ),
            None => None,
        };
        for pattern in raw.node.uplink.iter().chain(&raw.node.pod_interfaces) {
            glob::Pattern::new(pattern)
                .map_err(|e| err(None, format!("node: interface pattern {pattern:?}: {e}")))?;
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
                err(
                    Some(v.span()),
                    format!(
                        "node.{f}: {:?} is not an IPv{} CIDR",
                        v.get_ref(),
                        if v6 { 6 } else { 4 }
                    ),
                )
            })
        };
        let instance_cidr = cidr(raw.node.instance_cidr, "instance_cidr", false)?;
        let instance_cidr6 = cidr(raw.node.instance_cidr6, "instance_cidr6", true)?;
        let node = NodeConfig {
            instance_cidr,
            instance_cidr6,
            uplink: raw.node.uplink,
            pod_interfaces: raw.node.pod_interfaces,
            pin_path: raw.node.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into()),
            activator,
            xdp_mode: raw.node.xdp_mode,
            host_routing: raw.node.host_routing,
            metrics,
        };
        let ct = raw.conntrack.unwrap_or(RawConntrack {
            tcp_timeout_secs: None,
            udp_timeout_secs: None,
            closing_timeout_secs: None,
        });
        // The datapath checks expiry only on flows idle for more than a second.
        for (field, v) in [
            ("conntrack.tcp_timeout_secs", ct.tcp_timeout_secs),
            ("conntrack.udp_timeout_secs", ct.udp_timeout_secs),
            ("conntrack.closing_timeout_secs", ct.closing_timeout_secs),
        ] {
            if v == Some(0) {
                return Err(err(None, format!("{field}: at least 1")));
            }
        }
        let conntrack = ConntrackConfig {
            tcp_timeout: Duration::from_secs(ct.tcp_timeout_secs.unwrap_or(6 * 3600)),
            udp_timeout: Duration::from_secs(ct.udp_timeout_secs.unwrap_or(60)),
            closing_timeout: Duration::from_secs(ct.closing_timeout_secs.unwrap_or(10)),
        };
        let mut maps = MapSizes::default();
        if let Some(m) = raw.maps {
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
                    return Err(err(
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
        }

        let mut services = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let field = |f: &str| format!("service[{i}] ({}).{f}", s.name.get_ref());
            let mut vips = Vec::new();
            for (span, v) in spanned_items(s.vip) {
                let ip: IpAddr = v.parse().map_err(|_| {
                    err(
                        Some(span.clone()),
                        format!("{}: {v:?} is not an IP address", field("vip")),
                    )
                })?;
                if !seen.insert((ip, s.port, s.protocol)) {
                    return Err(err(
                        Some(span),
                        format!(
                            "{}: {ip} port {} is used by another service",
                            field("vip"),
                            s.port
                        ),
                    ));
                }
                vips.push(ip);
            }
            if vips.is_empty() {
                return Err(err(
                    Some(s.name.span()),
                    format!("{}: at least one VIP", field("vip")),
                ));
            }
            let list =
                |items: Vec<Spanned<String>>, f: &str| -> Result<Vec<SocketAddr>, ConfigError> {
                    items
                        .into_iter()
                        .map(|b| {
                            parse_sockaddr(b.get_ref())
                                .map_err(|m| err(Some(b.span()), format!("{}: {m}", field(f))))
                        })
                        .collect()
                };
            let backends = list(s.backends, "backends")?;
            let scale = match s.scale {
                None => None,
                Some(sc) => {
                    let span = sc.span();
                    let sc = sc.into_inner();
                    let readiness = match sc.readiness {
                        None => Readiness::Tcp,
                        Some(r) => match r.get_ref().as_str() {
                            "tcp" => Readiness::Tcp,
                            p if p.starts_with('/') => Readiness::Http(p.to_owned()),
                            other => {
                                return Err(err(
                                    Some(r.span()),
                                    format!("{}: {other:?} is neither \"tcp\" nor an HTTP path like \"/healthz\"", field("scale.readiness")),
                                ))
                            }
                        },
                    };
                    if sc.max_scale == 0 || sc.min_scale > sc.max_scale {
                        return Err(err(
                            Some(span),
                            format!(
                                "{}: need 0 <= min_scale <= max_scale, max_scale >= 1",
                                field("scale")
                            ),
                        ));
                    }
                    if sc.target_concurrency <= 0.0 {
                        return Err(err(
                            Some(span),
                            format!("{}: must be > 0", field("scale.target_concurrency")),
                        ));
                    }
                    if s.protocol.is_udp() {
                        return Err(err(
                            Some(span),
                            format!(
                                "{}: UDP services can't scale to zero (nothing to hold)",
                                field("scale")
                            ),
                        ));
                    }
                    let secs = |v: f64, f: &str| -> Result<Duration, ConfigError> {
                        Duration::try_from_secs_f64(v).map_err(|_| {
                            err(
                                Some(span.clone()),
                                format!("{}: bad duration {v}", field(f)),
                            )
                        })
                    };
                    Some(ScaleConfig {
                        command: sc.command,
                        args: sc.args,
                        port: sc.port,
                        min_scale: sc.min_scale,
                        max_scale: sc.max_scale,
                        container_concurrency: sc.container_concurrency,
                        target_concurrency: sc.target_concurrency,
                        target_burst_capacity: sc.target_burst_capacity,
                        idle_timeout: secs(sc.idle_timeout_secs, "scale.idle_timeout_secs")?,
                        stable_window: secs(sc.stable_window_secs, "scale.stable_window_secs")?,
                        readiness,
                        env: sc.env.into_iter().collect(),
                    })
                }
            };
            let timeout =
                Duration::try_from_secs_f64(s.timeout_secs.unwrap_or(30.0)).map_err(|_| {
                    err(
                        Some(s.name.span()),
                        format!("{}: bad duration", field("timeout_secs")),
                    )
                })?;
            let activators = list(s.activators, "activators")?;
            let name = s.name.into_inner();
            if name.is_empty() {
                return Err(err(None, format!("service[{i}].name: must not be empty")));
            }
            services.push(ServiceConfig {
                name,
                namespace: s.namespace,
                vips,
                port: s.port,
                protocol: s.protocol,
                mode: s.mode,
                backends,
                activators,
                timeout,
                scale,
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    /// The error message of a config that must be refused.
    fn refused(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn default_config_parses() {
        let c = parse(DEFAULT_CONFIG).expect("embedded default");
        assert!(!c.services.is_empty());
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
[node]
uplink = ["eth0"]
pod_interfaces = ["veth*"]
activator = ["10.0.0.1:8012", "[fd00::1]:8012"]
[[service]]
name = "hello"
namespace = "default"
vip = ["10.96.0.10", "fd00:96::10"]
port = 80
mode = "proxy"
backends = ["10.1.0.2:8080", "[fd00:1::2]:8080"]
"#,
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.full_name(), "default/hello");
        assert_eq!(s.vips.len(), 2);
        assert_eq!(s.mode, Mode::Proxy);
        assert_eq!(s.protocol, Protocol::Http);
        assert_eq!(c.node.activator.len(), 2);
        assert_eq!(c.node.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
    }

    #[test]
    fn bad_backend_names_line_and_field() {
        let e = refused(
            "[node]\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = [\"10.1.0.1:80\", \"nope\"]\n",
        );
        assert!(e.starts_with("test.toml:6:"), "{e}");
        assert!(e.contains("service[0] (a).backends"), "{e}");
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn bad_mode_names_line() {
        let e = refused(
            "[node]\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nmode = \"fast\"\n",
        );
        assert!(e.starts_with("test.toml:6:"), "{e}");
        assert!(e.contains("fast"), "{e}");
    }

    #[test]
    fn unknown_field_rejected() {
        let e = refused("[node]\nuplinks = [\"eth0\"]\n");
        assert!(e.starts_with("test.toml:2:"), "{e}");
        assert!(e.contains("uplinks"), "{e}");
    }

    #[test]
    fn duplicate_vip_rejected() {
        let e = refused(
            "[node]\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[[service]]\nname = \"b\"\nvip = \"10.96.0.1\"\nport = 80\n",
        );
        assert!(e.starts_with("test.toml:8:"), "{e}");
    }

    #[test]
    fn zero_conntrack_timeout_rejected() {
        let e = refused("[node]\n[conntrack]\nudp_timeout_secs = 0\n");
        assert!(e.contains("conntrack.udp_timeout_secs: at least 1"), "{e}");
        let c = parse("[node]\n[conntrack]\nclosing_timeout_secs = 1\n").unwrap();
        assert_eq!(c.conntrack.closing_timeout, Duration::from_secs(1));
    }

    #[test]
    fn map_sizes() {
        let c = parse("[node]\n[maps]\nservices = 131072\nconntrack = 1048576\n").unwrap();
        assert_eq!(c.maps.services, 131_072);
        assert_eq!(c.maps.conntrack, 1_048_576);
        assert_eq!(c.maps.backends, MapSizes::default().backends);
        assert_eq!(parse("[node]\n").unwrap().maps, MapSizes::default());
        let e = refused("[node]\n[maps]\nservices = 8\n");
        assert!(
            e.contains(":3:") && e.contains("maps.services: 8 is outside"),
            "{e}"
        );
    }
}
