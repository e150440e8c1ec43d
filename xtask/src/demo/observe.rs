//! What the demo reads back: the agent's `/status` (activator and scaler state, fetched from
//! inside the node namespace), the pinned maps (`redirector status --json`), and a poller
//! that records when a cold start passes each stage.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;

use super::{
    env::{Env, NODE_NS},
    http::{enter, get_once, in_netns},
};

/// The scaler's last cold start, µs since the wake (the first held request).
#[derive(Debug, Clone, Copy, Default)]
pub struct ColdStart {
    pub started_us: u64,
    pub ready_us: u64,
    pub flipped_us: u64,
}

/// One service's entry of the agent's `/status`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub instances: Vec<String>,
    pub ready: Vec<String>,
    pub mode: String,
    pub cold_starts: u64,
    pub last_cold_start: Option<ColdStart>,
    pub held: u64,
    pub forwarded: u64,
    pub cold_requests: u64,
}

fn entry<'a>(v: &'a Value, section: &str, name: &str, qualified: &str) -> Option<&'a Value> {
    let m = v.get(section)?.as_object()?;
    m.get(name)
        .or_else(|| m.get(qualified))
        .or_else(|| m.values().next())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn num(v: Option<&Value>, key: &str) -> u64 {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

impl Snapshot {
    pub fn parse(v: &Value, name: &str, qualified: &str) -> Self {
        let sc = entry(v, "scalers", name, qualified);
        let act = entry(v, "activator", name, qualified);
        let last_cold_start = sc
            .and_then(|s| s.get("last_cold_start"))
            .filter(|c| !c.is_null())
            .map(|c| ColdStart {
                started_us: num(Some(c), "started_us"),
                ready_us: num(Some(c), "ready_us"),
                flipped_us: num(Some(c), "flipped_us"),
            });
        Self {
            instances: strings(sc.and_then(|s| s.get("instances"))),
            ready: strings(sc.and_then(|s| s.get("ready"))),
            mode: sc
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            cold_starts: num(sc, "cold_starts"),
            last_cold_start,
            held: num(act, "held"),
            forwarded: num(act, "forwarded"),
            cold_requests: num(act, "cold_requests"),
        }
    }
}

/// Where and what to ask.
#[derive(Debug, Clone)]
pub struct Target {
    pub metrics: SocketAddr,
    pub name: String,
    pub qualified: String,
}

impl Target {
    fn fetch_here(&self) -> Result<Snapshot> {
        let r = get_once(self.metrics, "/status", Duration::from_secs(5))?;
        let v: Value = serde_json::from_str(&r.body).context("parsing /status")?;
        Ok(Snapshot::parse(&v, &self.name, &self.qualified))
    }

    /// The agent's `/status` for the service, fetched from inside the node namespace.
    pub fn fetch(&self) -> Result<Snapshot> {
        let me = self.clone();
        in_netns(NODE_NS, move || me.fetch_here())
    }

    /// Polls `/status` every `every` until `done` holds or `timeout` passes.
    pub fn wait_until(
        &self,
        every: Duration,
        timeout: Duration,
        done: impl Fn(&Snapshot) -> bool,
    ) -> Result<Snapshot> {
        let t0 = Instant::now();
        loop {
            let s = self.fetch()?;
            if done(&s) {
                return Ok(s);
            }
            if t0.elapsed() > timeout || super::env::interrupted() {
                return Err(anyhow!(
                    "timed out after {timeout:?}; last /status: mode {}, instances {:?}",
                    s.mode,
                    s.instances
                ));
            }
            std::thread::sleep(every);
        }
    }
}

/// The service's entry in the pinned maps.
#[derive(Debug, Clone, Default)]
pub struct MapService {
    pub mode: String,
    pub backends: Vec<String>,
    pub packets: u64,
    pub reply_packets: u64,
    pub new_flows: u64,
    pub proxied_flows: u64,
}

/// `redirector status --json`, the entry whose VIP and port are the demo's.
pub fn map_service(env: &Env, vip: &str, port: u16) -> Result<MapService> {
    let pin = env.pin_path.to_string_lossy().into_owned();
    let out = env.redirector(&["status", "--pin-path", &pin, "--json"])?;
    let v: Value = serde_json::from_str(&out).context("parsing `redirector status --json`")?;
    let svc = v
        .get("services")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter().find(|s| {
                s.get("vip").and_then(Value::as_str) == Some(vip)
                    && s.get("port").and_then(Value::as_u64) == Some(port.into())
            })
        })
        .ok_or_else(|| anyhow!("{vip}:{port} is not in the pinned SERVICES map"))?;
    Ok(MapService {
        mode: svc
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned(),
        backends: strings(svc.get("backends")),
        packets: num(Some(svc), "packets"),
        reply_packets: num(Some(svc), "reply_packets"),
        new_flows: num(Some(svc), "new_flows"),
        proxied_flows: num(Some(svc), "proxied_flows"),
    })
}

/// When a cold start was first seen at each stage, relative to the poller's `t0`.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub held: Option<Duration>,
    pub instance: Option<Duration>,
    pub ready: Option<Duration>,
    pub serve: Option<Duration>,
    pub max_held: u64,
    pub max_instances: usize,
    pub polls: u64,
}

/// Polls `/status` in the background (from its own thread in the node namespace).
pub struct Poller {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Timeline>>,
}

impl Poller {
    pub fn start(target: &Target, t0: Instant) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, target) = (stop.clone(), target.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || -> Result<Timeline> {
            let entered = enter(NODE_NS);
            let failed = entered.is_err();
            let _ = tx.send(entered);
            if failed {
                return Ok(Timeline::default());
            }
            let mut tl = Timeline::default();
            while !s.load(Ordering::Relaxed) {
                let snap = target.fetch_here()?;
                let at = t0.elapsed();
                tl.polls += 1;
                tl.max_held = tl.max_held.max(snap.held);
                tl.max_instances = tl.max_instances.max(snap.instances.len());
                let first = |slot: &mut Option<Duration>, cond: bool| {
                    if cond && slot.is_none() {
                        *slot = Some(at);
                    }
                };
                first(&mut tl.held, snap.held > 0);
                first(&mut tl.instance, !snap.instances.is_empty());
                first(&mut tl.ready, !snap.ready.is_empty());
                first(&mut tl.serve, snap.mode == "serve");
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(tl)
        });
        rx.recv().context("the poller thread died")??;
        Ok(Self { stop, handle })
    }

    pub fn finish(self) -> Result<Timeline> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow!("the poller panicked"))?
    }
}
