//! Prometheus text on `/metrics`, liveness on `/healthz`, and the agent's live state as JSON
//! on `/status` (instances, held requests), served on `node.metrics` (loopback by default).
//! The endpoint (`endpoint.rs`) keeps answering its probes under abuse.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::activator::Activator;

mod endpoint;
pub use endpoint::serve;

/// Histogram buckets, seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free Prometheus histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the series for `name` with `labels` (e.g. `service="a"`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {n}");
    }
}

/// The `# HELP` text of a metric family.
fn help(name: &str) -> &'static str {
    match name {
        "redirector_activator_connections" => "Client connections open on the activator.",
        "redirector_activator_connections_overflow_total" => {
            "Client connections closed as accepted: the activator was at max_connections."
        }
        "redirector_activator_forwarded_total" => "Requests answered through the activator.",
        "redirector_activator_held_bytes" => "Declared request body bytes held.",
        "redirector_activator_held_requests" => "Requests held waiting for an instance.",
        "redirector_activator_node_held_bytes" => "Declared request body bytes held, all services.",
        "redirector_activator_node_held_requests" => "Requests held, all services.",
        "redirector_activator_in_flight" => "Requests in flight on instances.",
        "redirector_activator_rejected_full_total" => "Requests refused because the hold was full.",
        "redirector_activator_timeouts_total" => "Requests answered 504.",
        "redirector_cold_start_ttfb_seconds" => "Time to first byte of cold-start requests.",
        "redirector_cold_starts_total" => "Instances started from zero.",
        "redirector_conntrack_entries" => "Datapath conntrack entries.",
        "redirector_desired_instances" => "Instances the scaler wants.",
        "redirector_flips_total" => "Serve/Proxy mode changes.",
        "redirector_instance_restarts_total" => "Instances replaced after dying.",
        "redirector_instances" => "Instances running.",
        "redirector_map_update_seconds" => "Time to write a service's datapath entry.",
        "redirector_ready_instances" => "Instances ready.",
        "redirector_service_bytes_total" => "Bytes through the datapath, both directions.",
        "redirector_service_new_flows_total" => "New flows seen by the datapath.",
        "redirector_service_packets_total" => "Packets through the datapath, both directions.",
        "redirector_service_proxied_flows_total" => "Flows sent to the activator.",
        _ => "redirector metric.",
    }
}

/// A label value in the text format's escaping.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the HTTP endpoint needs from the agent.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> String;
    fn status_json(&self) -> String;
    /// `/readyz`: `Err(why)` while the agent is not ready.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What `/readyz` waits for: the first full programming of the maps (the config file's
/// services, or the cluster's state after every watch listed), and, when the agent reports to
/// Knative's autoscaler, a connected websocket. `/healthz` (liveness) waits for nothing.
#[derive(Default)]
pub struct Readiness {
    synced: std::sync::atomic::AtomicBool,
    /// Whether the autoscaler's websocket is up (`None`: no autoscaler configured).
    autoscaler: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Readiness {
    pub fn new(autoscaler: Option<Box<dyn Fn() -> bool + Send + Sync>>) -> Self {
        Self {
            synced: Default::default(),
            autoscaler,
        }
    }

    /// The maps hold the first full state.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    pub fn check(&self) -> Result<(), String> {
        if !self.synced.load(Ordering::Relaxed) {
            return Err("waiting for the first full sync of the maps".into());
        }
        match &self.autoscaler {
            Some(up) if !up() => Err("the autoscaler's websocket is down".into()),
            _ => Ok(()),
        }
    }
}

/// The agent's /metrics and /status.
pub struct AgentMetrics {
    pub activator: Arc<Activator>,
    pub statuses: Arc<Mutex<BTreeMap<String, Arc<Mutex<crate::scaler::ScalerStatus>>>>>,
    pub flips: AtomicU64,
    pub map_update: Histogram,
    pub pin_path: PathBuf,
    pub readiness: Readiness,
}

impl Source for AgentMetrics {
    fn ready(&self) -> Result<(), String> {
        self.readiness.check()
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let reg = self.activator.registry();
        let mut gauges: Vec<(&str, &str, String, f64)> = Vec::new();
        for svc in reg.services() {
            let l = format!("service=\"{}\"", esc(&svc.name));
            for (name, kind, v) in [
                (
                    "redirector_activator_held_requests",
                    "gauge",
                    svc.held.load(Ordering::Relaxed) as f64,
                ),
                (
                    "redirector_activator_held_bytes",
                    "gauge",
                    svc.held_bytes.load(Ordering::Relaxed) as f64,
                ),
                (
                    "redirector_activator_in_flight",
                    "gauge",
                    svc.in_flight.load(Ordering::Relaxed) as f64,
                ),
                (
                    "redirector_activator_forwarded_total",
                    "counter",
                    svc.forwarded.load(Ordering::Relaxed) as f64,
                ),
                (
                    "redirector_activator_rejected_full_total",
                    "counter",
                    svc.rejected_full.load(Ordering::Relaxed) as f64,
                ),
                (
                    "redirector_activator_timeouts_total",
                    "counter",
                    svc.timed_out.load(Ordering::Relaxed) as f64,
                ),
            ] {
                gauges.push((name, kind, l.clone(), v));
            }
        }
        gauges.push((
            "redirector_activator_node_held_requests",
            "gauge",
            String::new(),
            self.activator.global.held.load(Ordering::Relaxed) as f64,
        ));
        gauges.push((
            "redirector_activator_node_held_bytes",
            "gauge",
            String::new(),
            self.activator.global.held_bytes.load(Ordering::Relaxed) as f64,
        ));
        if let Ok(st) = self.statuses.lock() {
            for (name, s) in st.iter() {
                let Ok(s) = s.lock() else { continue };
                let l = format!("service=\"{}\"", esc(name));
                for (name, kind, v) in [
                    ("redirector_instances", "gauge", s.instances.len() as f64),
                    ("redirector_ready_instances", "gauge", s.ready.len() as f64),
                    ("redirector_desired_instances", "gauge", s.desired as f64),
                    (
                        "redirector_cold_starts_total",
                        "counter",
                        s.cold_starts as f64,
                    ),
                    (
                        "redirector_instance_restarts_total",
                        "counter",
                        s.restarts as f64,
                    ),
                ] {
                    gauges.push((name, kind, l.clone(), v));
                }
            }
        }
        gauges.push((
            "redirector_flips_total",
            "counter",
            String::new(),
            self.flips.load(Ordering::Relaxed) as f64,
        ));
        if let Ok(st) = crate::status::read(&self.pin_path) {
            for s in &st.services {
                let l = format!(
                    "service=\"{}\",vip=\"{}\",port=\"{}\"",
                    esc(&s.name),
                    s.vip,
                    s.port
                );
                for (name, kind, v) in [
                    (
                        "redirector_service_packets_total",
                        "counter",
                        (s.packets + s.reply_packets) as f64,
                    ),
                    (
                        "redirector_service_bytes_total",
                        "counter",
                        (s.bytes + s.reply_bytes) as f64,
                    ),
                    (
                        "redirector_service_new_flows_total",
                        "counter",
                        s.new_flows as f64,
                    ),
                    (
                        "redirector_service_proxied_flows_total",
                        "counter",
                        s.proxied_flows as f64,
                    ),
                ] {
                    gauges.push((name, kind, l.clone(), v));
                }
            }
            gauges.push((
                "redirector_conntrack_entries",
                "gauge",
                String::new(),
                st.conntrack_entries as f64,
            ));
        }
        gauges.push((
            "redirector_activator_connections",
            "gauge",
            String::new(),
            self.activator.connections.now() as f64,
        ));
        gauges.push((
            "redirector_activator_connections_overflow_total",
            "counter",
            String::new(),
            self.activator.connections.overflowed() as f64,
        ));
        // One `# TYPE` per family, its series together (strict parsers refuse repeats).
        gauges.sort_by(|a, b| a.0.cmp(b.0));
        let mut last = "";
        for (name, kind, labels, v) in &gauges {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}", help(name));
                let _ = writeln!(out, "# TYPE {name} {kind}");
                last = name;
            }
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP redirector_cold_start_ttfb_seconds {}",
            help("redirector_cold_start_ttfb_seconds")
        );
        let _ = writeln!(out, "# TYPE redirector_cold_start_ttfb_seconds histogram");
        for svc in reg.services().filter(|s| s.cold_ttfb.count() > 0) {
            svc.cold_ttfb.render(
                &mut out,
                "redirector_cold_start_ttfb_seconds",
                &format!("service=\"{}\"", esc(&svc.name)),
            );
        }
        let _ = writeln!(
            out,
            "# HELP redirector_map_update_seconds {}",
            help("redirector_map_update_seconds")
        );
        let _ = writeln!(out, "# TYPE redirector_map_update_seconds histogram");
        self.map_update
            .render(&mut out, "redirector_map_update_seconds", "");
        out
    }

    fn status_json(&self) -> String {
        self.status_json_filtered(false)
    }
}

impl AgentMetrics {
    /// The status with only the services the activator has seen traffic for (what
    /// `redirector status` needs; cheap with 100,000 idle services).
    pub fn live_json(&self) -> String {
        self.status_json_filtered(true)
    }

    fn status_json_filtered(&self, active_only: bool) -> String {
        let reg = self.activator.registry();
        let held: BTreeMap<&str, serde_json::Value> = reg
            .services()
            .filter(|s| {
                !active_only
                    || s.held.load(Ordering::Relaxed) > 0
                    || s.in_flight.load(Ordering::Relaxed) > 0
                    || s.forwarded.load(Ordering::Relaxed) > 0
                    || s.cold_ttfb.count() > 0
            })
            .map(|s| {
                (
                    s.name.as_str(),
                    serde_json::json!({
                        "held": s.held.load(Ordering::Relaxed),
                        "held_bytes": s.held_bytes.load(Ordering::Relaxed),
                        "in_flight": s.in_flight.load(Ordering::Relaxed),
                        "forwarded": s.forwarded.load(Ordering::Relaxed),
                        "cold_requests": s.cold_ttfb.count(),
                    }),
                )
            })
            .collect();
        let scalers: BTreeMap<String, crate::scaler::ScalerStatus> = self
            .statuses
            .lock()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.lock().ok()?.clone())))
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "activator": held, "scalers": scalers, "flips": self.flips.load(Ordering::Relaxed) }).to_string()
    }
}

#[cfg(test)]
mod tests;
