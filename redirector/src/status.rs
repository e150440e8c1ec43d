//! `redirector status`: every service with mode, backends and counters, read from the
//! pinned maps (no running agent needed).
use std::path::Path;

use redirector_common::{MODE_PROXY, PROTO_TCP, SET_PROXY, SET_SERVE};
use serde::Serialize;

use crate::{
    addr::{endpoint_addr, wire_port, words_ip},
    datapath::{Maps, MapsError},
};

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: &'static str,
    pub mode: &'static str,
    pub generation: u32,
    pub backends: Vec<String>,
    pub proxy_pool: Vec<String>,
    pub activator: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    pub proxied_flows: u64,
    /// Open sockets of this node's clients whose `connect()` to this VIP the socket hooks
    /// translated.
    pub socket_flows: usize,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// The running agent's view (instances, held requests), when it is running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<serde_json::Value>,
    pub conntrack_entries: usize,
    /// The maps' capacities (`[maps]`), read from the pinned maps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// What the running kernel offers the datapath (probed by this command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::datapath::features::KernelFeatures>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

const COUNTER_NAMES: [(u32, &str); 15] = [
    (redirector_common::G_PACKETS, "packets"),
    (redirector_common::G_NOT_IP, "not_ip"),
    (redirector_common::G_MALFORMED, "malformed"),
    (
        redirector_common::G_FRAGMENT_OR_OPTIONS,
        "fragment_or_options",
    ),
    (redirector_common::G_NAT_FORWARD, "nat_forward"),
    (redirector_common::G_NAT_REPLY, "nat_reply"),
    (redirector_common::G_NO_BACKEND, "no_backend"),
    (redirector_common::G_CT_FULL, "conntrack_insert_failed"),
    (redirector_common::G_HAIRPIN, "hairpin"),
    (redirector_common::G_REWRITE_FAILED, "rewrite_failed"),
    (redirector_common::G_BIG_TCP, "big_tcp"),
    (redirector_common::G_ACT_REFUSED, "activator_refused"),
    (redirector_common::G_ACT_ADMITTED, "activator_admitted"),
    (redirector_common::G_SOCK_TRANSLATED, "socket_translated"),
    (redirector_common::G_SOCK_REVERSED, "socket_reversed"),
];

fn set_members(maps: &Maps, svc_id: u32, set: u32, count: u32, flags: u8) -> Vec<String> {
    if count == 0 {
        return Vec::new();
    }
    let Some(ids) = crate::control::table_members(maps, svc_id, set, flags) else {
        return Vec::new();
    };
    let mut out: Vec<String> = ids
        .into_iter()
        .filter_map(|id| maps.backends.get(&id, 0).ok())
        .filter_map(|e| endpoint_addr(&e))
        .map(|a| a.to_string())
        .collect();
    out.sort();
    out
}

/// Reads the status from the maps.
pub fn collect(maps: &Maps) -> Status {
    let sockets = maps.socket_flows();
    let mut services: Vec<ServiceStatus> = maps
        .services
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            let st = maps.service_stats(v.id);
            let socket_flows = sockets.get(&v.id).copied().unwrap_or(0);
            ServiceStatus {
                id: v.id,
                name: maps.service_name(v.id).unwrap_or_default(),
                vip: words_ip(&k.addr, k.family).to_string(),
                port: wire_port(k.port),
                protocol: if k.proto == PROTO_TCP { "tcp" } else { "udp" },
                mode: if v.mode == MODE_PROXY {
                    "proxy"
                } else {
                    "serve"
                },
                generation: v.generation,
                backends: set_members(maps, v.id, SET_SERVE, v.backend_count, v.flags),
                proxy_pool: set_members(maps, v.id, SET_PROXY, v.proxy_count, v.flags),
                activator: endpoint_addr(&v.activator).map(|a| a.to_string()),
                packets: st.packets,
                bytes: st.bytes,
                reply_packets: st.reply_packets,
                reply_bytes: st.reply_bytes,
                new_flows: st.new_flows,
                proxied_flows: st.proxied_flows,
                socket_flows,
            }
        })
        .collect();
    services.sort_by(|a, b| (&a.name, &a.vip).cmp(&(&b.name, &b.vip)));
    let g = maps.global_stats();
    Status {
        services,
        agent: None,
        conntrack_entries: maps.conntrack_len(),
        capacity: None,
        kernel: None,
        counters: COUNTER_NAMES
            .iter()
            .map(|(i, n)| (*n, g[*i as usize]))
            .collect(),
    }
}

/// Where the agent publishes its live state for `redirector status` (a file, so that it
/// is readable from any network namespace).
pub fn live_path(pin_path: &Path) -> std::path::PathBuf {
    let tag: String = pin_path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new("/run/redirector").join(format!("status{tag}.json"))
}

/// Writes the agent's live state (best effort).
pub fn write_live(pin_path: &Path, json: &str) {
    let p = live_path(pin_path);
    if let Some(d) = p.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let tmp = p.with_extension("tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, &p);
    }
}

/// The agent's live state if it was written in the last 5 seconds.
fn read_live(pin_path: &Path) -> Option<serde_json::Value> {
    let p = live_path(pin_path);
    let age = std::fs::metadata(&p)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    if age > std::time::Duration::from_secs(5) {
        return None;
    }
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Opens the pinned maps under `pin_path` and reads the status.
pub fn read(pin_path: &Path) -> Result<Status, MapsError> {
    let mut s = collect(&Maps::open_pinned(pin_path)?);
    s.agent = read_live(pin_path);
    s.kernel = Some(crate::datapath::kernel().clone());
    let cap = |name: &str| crate::datapath::migrate::pinned_shape(&pin_path.join(name));
    if let (Some(svc), Some(be), Some(ct)) = (cap("SERVICES"), cap("BACKENDS"), cap("CONNTRACK")) {
        s.capacity = Some(Capacity {
            services: svc.max_entries,
            backends: be.max_entries,
            conntrack: ct.max_entries,
        });
    }
    Ok(s)
}

/// Human-readable table.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(k) = &s.kernel {
        let _ = writeln!(out, "{}", k.line());
    }
    let _ = writeln!(
        out,
        "{:<24} {:<28} {:<6} {:<34} {:>10} {:>12} {:>8} {:>8}",
        "SERVICE", "VIP", "MODE", "BACKENDS", "PACKETS", "BYTES", "FLOWS", "PROXIED"
    );
    for svc in &s.services {
        let vip = if svc.vip.contains(':') {
            format!("[{}]:{}/{}", svc.vip, svc.port, svc.protocol)
        } else {
            format!("{}:{}/{}", svc.vip, svc.port, svc.protocol)
        };
        let backends = if svc.backends.is_empty() {
            "-".to_owned()
        } else {
            svc.backends.join(",")
        };
        let _ = writeln!(
            out,
            "{:<24} {:<28} {:<6} {:<34} {:>10} {:>12} {:>8} {:>8}",
            svc.name,
            vip,
            svc.mode,
            backends,
            svc.packets + svc.reply_packets,
            svc.bytes + svc.reply_bytes,
            svc.new_flows,
            svc.proxied_flows
        );
    }
    if let Some(agent) = &s.agent {
        if let Some(scalers) = agent.get("scalers").and_then(|v| v.as_object()) {
            let _ = writeln!(
                out,
                "\n{:<24} {:<6} {:>8} {:>6} {:>6} {:>11}  READY",
                "SCALED SERVICE", "MODE", "DESIRED", "INST", "HELD", "COLDSTARTS"
            );
            for (name, sc) in scalers {
                let held = agent
                    .pointer(&format!("/activator/{}/held", name.replace('/', "~1")))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                let ready: Vec<String> = sc
                    .get("ready")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<24} {:<6} {:>8} {:>6} {:>6} {:>11}  {}",
                    name,
                    sc.get("mode").and_then(|v| v.as_str()).unwrap_or("-"),
                    sc.get("desired").and_then(|v| v.as_u64()).unwrap_or(0),
                    sc.get("instances")
                        .and_then(|v| v.as_array())
                        .map(|a| a.len())
                        .unwrap_or(0),
                    held,
                    sc.get("cold_starts").and_then(|v| v.as_u64()).unwrap_or(0),
                    if ready.is_empty() {
                        "-".to_owned()
                    } else {
                        ready.join(",")
                    }
                );
            }
        }
        if let Some(act) = agent.get("activator").and_then(|v| v.as_object()) {
            let held: u64 = act
                .values()
                .filter_map(|v| v.get("held").and_then(|h| h.as_u64()))
                .sum();
            let _ = writeln!(out, "activator: {held} requests held");
        }
    } else {
        let _ = writeln!(
            out,
            "\n(no running agent found for this pin path: maps only)"
        );
    }
    match s.capacity {
        Some(c) => {
            let _ = writeln!(
                out,
                "\nservices: {} of {}; conntrack entries: {} of {}; backend slots: {}",
                s.services.len(),
                c.services,
                s.conntrack_entries,
                c.conntrack,
                c.backends
            );
        }
        None => {
            let _ = writeln!(out, "\nconntrack entries: {}", s.conntrack_entries);
        }
    }
    let counters: Vec<String> = s.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "counters: {}", counters.join(" "));
    out
}
