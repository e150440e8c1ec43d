//! The config parser: what it accepts and where its errors point.
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
    assert!(
        e.contains("conntrack.udp_timeout_secs: 0 is outside 1..="),
        "{e}"
    );
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

/// `[node]` plus `services`, each `(name, extra lines)`.
fn with(services: &[&str]) -> String {
    let mut s = String::from("[node]\n");
    for svc in services {
        s.push_str("[[service]]\n");
        s.push_str(svc);
        s.push('\n');
    }
    s
}

/// Asserts `e` names `line` of test.toml and contains `field`.
fn at(e: &str, line: usize, field: &str) {
    assert!(e.starts_with(&format!("test.toml:{line}:")), "{e}");
    assert!(e.contains(field), "{e}");
}

#[test]
fn duplicate_namespace_name_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nnamespace = \"ns\"\nvip = \"10.96.0.1\"\nport = 80",
        "name = \"a\"\nnamespace = \"ns\"\nvip = \"10.96.0.2\"\nport = 80",
    ]));
    at(&e, 8, "service[1] (a).name: ns/a is also service[0]");
    // Same name in another namespace is another service.
    parse(&with(&[
        "name = \"a\"\nnamespace = \"ns\"\nvip = \"10.96.0.1\"\nport = 80",
        "name = \"a\"\nnamespace = \"other\"\nvip = \"10.96.0.2\"\nport = 80",
    ]))
    .unwrap();
}

#[test]
fn same_vip_port_with_other_l7_protocol_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"http\"",
        "name = \"b\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"tcp\"",
    ]));
    at(
        &e,
        9,
        "service[1] (b).vip: 10.96.0.1 port 80/tcp is used by service a",
    );
    // UDP on the same VIP:port is another map key.
    parse(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"http\"",
        "name = \"b\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"udp\"",
    ]))
    .unwrap();
}

#[test]
fn more_services_than_the_maps_hold_refused() {
    let svcs: Vec<String> = (0..17)
        .map(|i| format!("name = \"s{i}\"\nvip = \"10.96.0.{i}\"\nport = 80"))
        .collect();
    let refs: Vec<&str> = svcs.iter().map(String::as_str).collect();
    let text = with(&refs).replacen("[node]\n", "[node]\n[maps]\nservices = 16\n", 1);
    let e = refused(&text);
    // service[16]'s vip: 3 + 4 lines per service, vip on the entry's third line.
    at(
        &e,
        4 + 16 * 4 + 2,
        "service[16] (s16).vip: service entry 17",
    );
    assert!(e.contains("maps.services"), "{e}");
    parse(&text.replace(&svcs[16], "name = \"s16\"\nvip = \"10.96.0.15\"\nport = 81")).unwrap_err();
    let exact = with(&refs[..16]).replacen("[node]\n", "[node]\n[maps]\nservices = 16\n", 1);
    assert_eq!(parse(&exact).unwrap().services.len(), 16);
}

#[test]
fn more_backends_than_the_maps_hold_refused() {
    let backends = |n: usize, base: usize| -> String {
        let list: Vec<String> = (0..n)
            .map(|i| format!("\"10.1.0.{}:80\"", base + i))
            .collect();
        format!("[{}]", list.join(", "))
    };
    let text = format!(
        "[node]\n[maps]\nbackends = 16\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = {}\n[[service]]\nname = \"b\"\nvip = \"10.96.0.2\"\nport = 80\nbackends = {}\n",
        backends(10, 0),
        backends(7, 10)
    );
    let e = refused(&text);
    at(&e, 13, "service[1] (b).backends: 17 distinct backends");
    // Shared backends count once.
    parse(&text.replace(&backends(7, 10), &backends(7, 3))).unwrap();
    // Scaled services count at max_scale.
    let e = refused(
        "[node]\n[maps]\nbackends = 16\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\nmax_scale = 17\n",
    );
    at(&e, 8, "service[0] (a).backends: 17 distinct");
}

#[test]
fn nan_and_inf_target_concurrency_refused() {
    for v in ["nan", "inf", "-inf", "0.0"] {
        let e = refused(&with(&[&format!(
            "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\ntarget_concurrency = {v}"
        )]));
        at(&e, 9, "service[0] (a).scale.target_concurrency");
    }
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\ntarget_burst_capacity = nan",
    ]));
    at(&e, 9, "scale.target_burst_capacity");
}

#[test]
fn port_zero_refused() {
    let e = refused(&with(&["name = \"a\"\nvip = \"10.96.0.1\"\nport = 0"]));
    at(&e, 5, "service[0] (a).port: must not be 0");
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 0",
    ]));
    at(&e, 8, "service[0] (a).scale.port: must not be 0");
}

#[test]
fn vip_without_a_backend_of_its_family_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nvip = [\"10.96.0.1\", \"fd00:96::1\"]\nport = 80\nbackends = [\"[fd00:1::2]:80\"]",
    ]));
    at(&e, 4, "service[0] (a).vip: 10.96.0.1 has no IPv4 backend");
}

#[test]
fn vip_as_its_own_backend_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = [\"10.1.0.1:80\", \"10.96.0.1:80\"]",
    ]));
    at(
        &e,
        6,
        "service[0] (a).backends: 10.96.0.1:80 is one of the service's own VIPs",
    );
    // Another service's VIP:port: the datapath translates once.
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = [\"10.96.0.2:80\"]",
        "name = \"b\"\nvip = \"10.96.0.2\"\nport = 80\nbackends = [\"10.1.0.1:80\"]",
    ]));
    at(
        &e,
        6,
        "service[0] (a).backends: 10.96.0.2:80 is the VIP of service[1] (b)",
    );
}

#[test]
fn ipv6_zone_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"fd00:96::1\"\nport = 80\nbackends = [\"[fe80::2%2]:80\"]",
    ]));
    at(
        &e,
        6,
        "service[0] (a).backends: \"[fe80::2%2]:80\" has an IPv6 zone",
    );
    let e = refused("[node]\nactivator = [\"10.0.0.1:8012\", \"[fe80::1%3]:8012\"]\n");
    at(
        &e,
        2,
        "node.activator: \"[fe80::1%3]:8012\" has an IPv6 zone",
    );
}

#[test]
fn crlf_in_readiness_path_refused() {
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\nreadiness = \"/ok\\r\\nX-Evil: 1\"",
    ]));
    at(&e, 9, "service[0] (a).scale.readiness");
    let c = parse(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\nreadiness = \"/healthz?x=1\"",
    ]))
    .unwrap();
    assert_eq!(
        c.services[0].scale.as_ref().unwrap().readiness,
        Readiness::Http("/healthz?x=1".into())
    );
}

#[test]
fn overflowing_timeouts_refused() {
    let e = refused("[node]\n[conntrack]\ntcp_timeout_secs = 9223372036854775807\n");
    at(
        &e,
        3,
        "conntrack.tcp_timeout_secs: 9223372036854775807 is outside",
    );
    let c = parse("[node]\n[conntrack]\ntcp_timeout_secs = 3153600000\n").unwrap();
    assert!(c.conntrack.tcp_timeout.as_nanos() < u64::MAX as u128);
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\ntimeout_secs = 1e300",
    ]));
    at(&e, 6, "service[0] (a).timeout_secs");
}

#[test]
fn more_backends_than_a_maglev_table_refused() {
    let list: Vec<String> = (0..998)
        .map(|i| format!("\"10.{}.{}.1:80\"", 1 + i / 256, i % 256))
        .collect();
    let e = refused(&format!(
        "[node]\n[maps]\nbackends = 4096\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = [{}]\n",
        list.join(", ")
    ));
    at(
        &e,
        8,
        "service[0] (a).backends: 998 IPv4 addresses; a set holds at most 997",
    );
    let e = refused(&with(&[
        "name = \"a\"\nvip = \"10.96.0.1\"\nport = 80\n[service.scale]\ncommand = \"x\"\nport = 8080\nmax_scale = 998",
    ]));
    at(&e, 6, "scale.max_scale");
}

#[test]
fn errors_point_at_their_field() {
    let e = refused("[node]\nuplink = [\"eth0\", \"[\"]\n");
    at(&e, 2, "node.uplink: interface pattern \"[\"");
    let e = refused("[node]\n[conntrack]\n\nudp_timeout_secs = 0\n");
    at(&e, 4, "conntrack.udp_timeout_secs");
    let e = refused(&with(&["name = \"\"\nvip = \"10.96.0.1\"\nport = 80"]));
    at(&e, 3, "service[0].name: must not be empty");
}

#[test]
fn socket_cgroup_and_service_ports() {
    use crate::config::{SocketCgroup, DEFAULT_SERVICE_PORTS};
    let c = parse("[node]\n").unwrap();
    assert_eq!(c.node.cgroup, SocketCgroup::Auto);
    assert_eq!(c.activator.service_ports, Some(DEFAULT_SERVICE_PORTS));
    let c = parse("[node]\ncgroup = \"off\"\n[activator]\nservice_ports = \"off\"\n").unwrap();
    assert_eq!(c.node.cgroup, SocketCgroup::Off);
    assert_eq!(c.activator.service_ports, None);
    let c = parse(
        "[node]\ncgroup = \"/sys/fs/cgroup/x\"\n[activator]\nservice_ports = \"9000-9009\"\n",
    )
    .unwrap();
    assert_eq!(c.node.cgroup, SocketCgroup::Path("/sys/fs/cgroup/x".into()));
    assert_eq!(c.activator.service_ports, Some((9000, 10)));
    let e = refused("[node]\ncgroup = \"sys/fs/cgroup\"\n");
    at(
        &e,
        2,
        "node.cgroup: \"sys/fs/cgroup\" is not \"auto\", \"off\" or an absolute path",
    );
    let e = refused("[node]\n[activator]\nservice_ports = \"9000-8000\"\n");
    at(
        &e,
        3,
        "activator.service_ports: \"9000-8000\" is not \"off\" or a range",
    );
    let e = refused(
        "[node]\nactivator = \"10.0.0.1:8012\"\n[activator]\nservice_ports = \"8000-8100\"\n",
    );
    at(
        &e,
        4,
        "activator.service_ports: the range holds the listener's port (10.0.0.1:8012)",
    );
}

fn with_node_ip(text: &str, ip: Option<&str>) -> Result<Config, ConfigError> {
    let ip = ip.map(str::to_owned);
    Config::parse_with_env(text, Path::new("t.toml"), None, &move |k| {
        (k == "NODE_IP").then(|| ip.clone()).flatten()
    })
}

#[test]
fn node_ip_from_the_environment() {
    let text = "[node]\nactivator = [\"$NODE_IP:8012\"]\nmetrics = \"${NODE_IP}:9469\"\n";
    for (ip, act, metrics) in [
        ("192.0.2.10", "192.0.2.10:8012", "192.0.2.10:9469"),
        ("2001:db8::10", "[2001:db8::10]:8012", "[2001:db8::10]:9469"),
    ] {
        let c = with_node_ip(text, Some(ip)).unwrap();
        assert_eq!(c.node.activator, vec![act.parse().unwrap()]);
        assert_eq!(c.node.metrics, Some(metrics.parse().unwrap()));
    }
    let e = with_node_ip(text, None).unwrap_err().to_string();
    assert!(e.contains(":2:") && e.contains("NODE_IP is not set"), "{e}");
    let e = with_node_ip(text, Some("node-a")).unwrap_err().to_string();
    assert!(e.contains("is not an IP address"), "{e}");
    for bad in ["$NODE_IP", "$NODE_IP:x", "$HOST_IP:80", "$NODE_IP8012"] {
        let t = format!("[node]\nactivator = [\"{bad}\"]\n");
        let e = with_node_ip(&t, Some("192.0.2.10"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2:") && e.contains("node.activator"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn activator_accept() {
    use crate::config::Accept;
    let c = parse("[node]\n").unwrap();
    assert_eq!(c.activator.accept, Accept::Delivered);
    let c = parse("[node]\n[activator]\naccept = \"any\"\n").unwrap();
    assert_eq!(c.activator.accept, Accept::Any);
    let c = parse("[node]\n[activator]\naccept = \"delivered\"\n").unwrap();
    assert_eq!(c.activator.accept, Accept::Delivered);
    let e = refused("[node]\n[activator]\naccept = \"all\"\n");
    assert!(e.contains(":3:") && e.contains("delivered"), "{e}");
}
