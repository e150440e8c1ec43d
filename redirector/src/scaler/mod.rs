//! The local scaler: runs instances of services that declare `[service.scale]`, from zero on
//! the first held request (at once, no tick), by observed concurrency (activator + datapath
//! flows) within [min, max], back to zero after the idle timeout. It publishes ready
//! instances to the activator first, then asks the agent to program the datapath (Serve
//! when ready, Proxy otherwise), and stops instances only after the flip is in effect.
mod instance;
mod view;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    activator::{Instance, Instances, ServiceState},
    config::{Mode, ServiceConfig},
};
pub use instance::Placement;
pub use view::DatapathView;

/// How long an instance gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long scale-down waits for flows pinned to an instance to finish after the flip.
const DRAIN_MAX: Duration = Duration::from_secs(5);
/// The least it waits: connections that picked the instance just before the flip.
const DRAIN_MIN: Duration = Duration::from_millis(300);

/// A request to program the datapath for one service.
#[derive(Debug)]
pub struct Update {
    pub name: String,
    pub mode: Mode,
    pub backends: Vec<SocketAddr>,
    /// Answered once the maps hold the new state.
    pub done: oneshot::Sender<()>,
}

/// Timestamps of the last cold start, in µs since the wake.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColdStart {
    pub started_us: u64,
    pub ready_us: u64,
    pub flipped_us: u64,
}

/// What `redirector status` and /metrics show of a scaled service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScalerStatus {
    pub desired: u32,
    pub instances: Vec<String>,
    pub ready: Vec<String>,
    pub mode: String,
    pub cold_starts: u64,
    pub last_cold_start: Option<ColdStart>,
    pub restarts: u64,
}

/// Hands out instance addresses and names on this node.
#[derive(Debug)]
pub struct Addresses {
    tag: String,
    next: AtomicUsize,
    cidr4: Option<(IpAddr, u8)>,
    cidr6: Option<(IpAddr, u8)>,
    gw4: Option<IpAddr>,
    free: Mutex<Vec<usize>>,
}

impl Addresses {
    pub fn new(
        cidr4: Option<(IpAddr, u8)>,
        cidr6: Option<(IpAddr, u8)>,
        gw4: Option<IpAddr>,
    ) -> Self {
        Self {
            tag: format!("{}", std::process::id() % 100_000),
            next: AtomicUsize::new(2),
            cidr4,
            cidr6,
            gw4,
            free: Mutex::new(Vec::new()),
        }
    }

    fn nth(base: (IpAddr, u8), n: usize) -> Option<IpAddr> {
        match base.0 {
            IpAddr::V4(a) => {
                let host_bits = 32 - base.1 as u32;
                (n < (1usize << host_bits.min(24)) - 1)
                    .then(|| IpAddr::V4((u32::from(a) + n as u32).into()))
            }
            IpAddr::V6(a) => Some(IpAddr::V6((u128::from(a) + n as u128).into())),
        }
    }

    fn alloc(&self) -> Option<(usize, Placement)> {
        let n = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed));
        let v4 = self.cidr4.and_then(|c| Self::nth(c, n));
        let v6 = self.cidr6.and_then(|c| Self::nth(c, n));
        if v4.is_none() && v6.is_none() {
            return None;
        }
        Some((
            n,
            Placement {
                netns: format!("rdi-{}-{n}", self.tag),
                host_if: format!("rdp-i{n}"),
                v4,
                v6,
                gw4: self.gw4,
            },
        ))
    }

    fn release(&self, n: usize) {
        if let Ok(mut f) = self.free.lock() {
            f.push(n);
        }
    }
}

/// Kills instances not ready `deadline` after they started: their exit is handled as any
/// other (`Exited`: replaced while instances are wanted).
fn kill_overdue(insts: &mut BTreeMap<u64, Inst>, deadline: Duration, now: Instant, name: &str) {
    for i in insts.values_mut() {
        if i.ready || i.stopping || i.timed_out || now.duration_since(i.started) < deadline {
            continue;
        }
        i.timed_out = true;
        tracing::warn!(
            service = %name,
            instance = %i.placement.netns,
            deadline_secs = deadline.as_secs_f64(),
            "instance not ready by its startup deadline; killing and replacing it"
        );
        if let Some(pid) = i.pid {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

enum Event {
    Ready(u64),
    Exited(u64),
    /// A spare sandbox is ready (or failed: None).
    Prepared(usize, Option<Placement>),
}

struct Inst {
    id: u64,
    slot: usize,
    placement: Placement,
    pid: Option<u32>,
    ready: bool,
    stopping: bool,
    started: Instant,
    /// Killed for missing its startup deadline (its exit is a restart).
    timed_out: bool,
}

/// Everything the scaler of one service needs.
pub struct Scaler {
    pub svc: ServiceConfig,
    pub act: Arc<ServiceState>,
    pub instances_tx: watch::Sender<Instances>,
    /// Active datapath flows to the service's instances (updated by the agent).
    pub flows: Arc<AtomicUsize>,
    /// Counters and conntrack, read directly (None: maps not pinned).
    pub view: Option<Arc<DatapathView>>,
    pub updates: mpsc::UnboundedSender<Update>,
    pub addresses: Arc<Addresses>,
    pub status: Arc<Mutex<ScalerStatus>>,
    /// Set once the first spare sandbox is prepared (or could not be): the agent reports
    /// ready after that, so even the first cold start only has to start the process.
    pub spare_ready: watch::Sender<bool>,
}

impl Scaler {
    fn addrs(&self, i: &Inst) -> Vec<SocketAddr> {
        let Some(sc) = &self.svc.scale else {
            return Vec::new();
        };
        [i.placement.v4, i.placement.v6]
            .into_iter()
            .flatten()
            .map(|ip| SocketAddr::new(ip, sc.port))
            .collect()
    }

    async fn program(&self, mode: Mode, ready: &[&Inst]) {
        let backends = ready.iter().flat_map(|i| self.addrs(i)).collect();
        let (done, wait) = oneshot::channel();
        if self
            .updates
            .send(Update {
                name: self.svc.full_name(),
                mode,
                backends,
                done,
            })
            .is_ok()
        {
            let _ = wait.await;
        }
    }

    fn publish(&self, insts: &BTreeMap<u64, Inst>) {
        let cc = self
            .svc
            .scale
            .as_ref()
            .map(|s| s.container_concurrency)
            .unwrap_or(0);
        let set: Vec<Arc<Instance>> = insts
            .values()
            .filter(|i| i.ready && !i.stopping)
            .flat_map(|i| self.addrs(i).into_iter().take(1))
            .map(|a| Instance::new(a, cc))
            .collect();
        let _ = self.instances_tx.send(Arc::new(set));
    }

    /// Runs until `stop` flips; then stops every instance.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(sc) = self.svc.scale.clone() else {
            return;
        };
        let name = self.svc.full_name();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        let mut insts: BTreeMap<u64, Inst> = BTreeMap::new();
        let mut next_id = 0u64;
        let mut last_active = Instant::now();
        let mut last_needed_all = Instant::now();
        let mut mode = Mode::Proxy;
        let mut published_ready: Vec<u64> = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let mut backoff_until = Instant::now();
        let mut last_packets = 0u64;
        // A sandbox (netns, veth, addresses, routes) made ahead of time, so that a cold start
        // only has to start the process.
        let mut spare: Option<(usize, Placement)> = None;
        let mut preparing = false;
        let mut last_forwarded = 0u64;
        instance::reap_stale().await;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The service starts in Proxy with no backends (Serving's initial override): nothing
        // to program before the first decision.
        loop {
            tokio::select! {
                _ = self.act.wake.notified() => {}
                _ = tick.tick() => {}
                Some(ev) = ev_rx.recv() => match ev {
                    Event::Ready(id) => {
                        if let Some(i) = insts.get_mut(&id) {
                            i.ready = true;
                            if let (Some(w), Ok(mut s)) = (wake_at, self.status.lock()) {
                                if let Some(cs) = s.last_cold_start.as_mut() {
                                    if cs.ready_us == 0 {
                                        cs.ready_us = w.elapsed().as_micros() as u64;
                                    }
                                }
                            }
                            tracing::info!(service = %name, instance = %i.placement.netns, "instance ready");
                        }
                    }
                    Event::Prepared(slot, p) => {
                        preparing = false;
                        self.spare_ready.send_replace(true);
                        match p {
                            Some(p) => spare = Some((slot, p)),
                            None => {
                                self.addresses.release(slot);
                                backoff_until = Instant::now() + Duration::from_secs(1);
                            }
                        }
                    }
                    Event::Exited(id) => {
                        if let Some(i) = insts.remove(&id) {
                            if !i.stopping {
                                tracing::warn!(service = %name, instance = %i.placement.netns, "instance exited; replacing");
                                if let Ok(mut s) = self.status.lock() { s.restarts += 1; }
                            }
                            // Out of the activator's set and the maps before the namespace goes.
                            self.publish(&insts);
                            let addresses = self.addresses.clone();
                            let slot = i.slot;
                            let p = i.placement.clone();
                            tokio::spawn(async move { instance::cleanup(&p).await; addresses.release(slot); });
                        }
                    }
                },
                _ = stop.changed() => break,
            }
            let now = Instant::now();
            kill_overdue(&mut insts, sc.startup_timeout, now, &name);
            let conc = self.act.concurrency() + self.flows.load(Ordering::Relaxed);
            let packets = self.view.as_ref().map(|v| v.packets()).unwrap_or(0);
            let forwarded = self.act.forwarded.load(Ordering::Relaxed);
            if conc > 0 || packets != last_packets || forwarded != last_forwarded {
                last_active = now;
            }
            last_packets = packets;
            last_forwarded = forwarded;
            let mut want = (conc as f64 / sc.target_concurrency).ceil() as u32;
            want = want.clamp(sc.min_scale, sc.max_scale);
            let live: Vec<u64> = insts
                .values()
                .filter(|i| !i.stopping)
                .map(|i| i.id)
                .collect();
            if want as usize >= live.len() {
                last_needed_all = now;
            }
            // Scale up: immediately.
            if want as usize > live.len() && now >= backoff_until {
                if live.is_empty() && wake_at.is_none() {
                    wake_at = Some(now);
                    if let Ok(mut s) = self.status.lock() {
                        s.cold_starts += 1;
                    }
                }
                for _ in live.len()..want as usize {
                    let (slot, placement, started) = match spare.take() {
                        Some((slot, p)) => {
                            let r = instance::spawn(&p, &sc);
                            if r.is_err() {
                                instance::cleanup(&p).await;
                            }
                            (slot, p, r)
                        }
                        None => {
                            let Some((slot, p)) = self.addresses.alloc() else {
                                tracing::error!(service = %name, "no instance address configured (node.instance_cidr)");
                                break;
                            };
                            let r = instance::start(&p, &sc).await;
                            (slot, p, r)
                        }
                    };
                    match started {
                        Ok(mut running) => {
                            let id = next_id;
                            next_id += 1;
                            let pid = running.child.id();
                            tracing::info!(service = %name, instance = %placement.netns, ip = ?placement.v4, "instance started");
                            if let (Some(w), Ok(mut s)) = (wake_at, self.status.lock()) {
                                s.last_cold_start = Some(ColdStart {
                                    started_us: w.elapsed().as_micros() as u64,
                                    ..Default::default()
                                });
                            }
                            let probe_addr = [placement.v4, placement.v6]
                                .into_iter()
                                .flatten()
                                .next()
                                .map(|ip| SocketAddr::new(ip, sc.port));
                            let (tx1, tx2) = (ev_tx.clone(), ev_tx.clone());
                            let readiness = sc.readiness.clone();
                            let child_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
                            let gone = child_gone.clone();
                            tokio::spawn(async move {
                                let _ = running.child.wait().await;
                                gone.store(true, Ordering::Relaxed);
                                let _ = tx2.send(Event::Exited(id));
                            });
                            if let Some(addr) = probe_addr {
                                tokio::spawn(async move {
                                    while !child_gone.load(Ordering::Relaxed) {
                                        if instance::probe(addr, &readiness).await {
                                            let _ = tx1.send(Event::Ready(id));
                                            return;
                                        }
                                        tokio::time::sleep(Duration::from_millis(2)).await;
                                    }
                                });
                            }
                            insts.insert(
                                id,
                                Inst {
                                    id,
                                    slot,
                                    placement,
                                    pid,
                                    ready: false,
                                    stopping: false,
                                    started: Instant::now(),
                                    timed_out: false,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::error!(service = %name, error = %e, "starting an instance failed; retrying in 1 s");
                            self.addresses.release(slot);
                            backoff_until = now + Duration::from_secs(1);
                            break;
                        }
                    }
                }
            }
            if spare.is_none() && !preparing && now >= backoff_until {
                if let Some((slot, p)) = self.addresses.alloc() {
                    preparing = true;
                    let tx = ev_tx.clone();
                    tokio::spawn(async move {
                        let ok = match instance::prepare(&p).await {
                            Ok(()) => Some(p),
                            Err(e) => {
                                tracing::warn!(error = %e, "preparing a spare sandbox failed");
                                None
                            }
                        };
                        let _ = tx.send(Event::Prepared(slot, ok));
                    });
                }
            }
            // Scale down: to zero after the idle timeout, otherwise after the stable window.
            let idle = now.duration_since(last_active) >= sc.idle_timeout;
            let target_live = if want == 0 {
                if idle {
                    0
                } else {
                    live.len()
                }
            } else if (want as usize) < live.len()
                && now.duration_since(last_needed_all) >= sc.stable_window
            {
                want as usize
            } else {
                live.len()
            };
            let mut victims: Vec<u64> = Vec::new();
            if target_live < live.len() {
                // Not-ready and newest first.
                let mut order: Vec<&Inst> = insts.values().filter(|i| !i.stopping).collect();
                order.sort_by_key(|i| (i.ready, std::cmp::Reverse(i.id)));
                victims = order
                    .iter()
                    .take(live.len() - target_live)
                    .map(|i| i.id)
                    .collect();
                for v in &victims {
                    if let Some(i) = insts.get_mut(v) {
                        i.stopping = true;
                    }
                }
            }
            // Publish: activator first, then the maps.
            let ready: Vec<&Inst> = insts.values().filter(|i| i.ready && !i.stopping).collect();
            let ready_ids: Vec<u64> = ready.iter().map(|i| i.id).collect();
            let spare = ready.len() as f64 * sc.target_concurrency - conc as f64;
            let new_mode = if ready.is_empty()
                || sc.target_burst_capacity < 0.0
                || (sc.target_burst_capacity > 0.0 && spare < sc.target_burst_capacity)
            {
                Mode::Proxy
            } else {
                Mode::Serve
            };
            if ready_ids != published_ready || new_mode != mode {
                self.publish(&insts);
                let ready_now: Vec<&Inst> =
                    insts.values().filter(|i| i.ready && !i.stopping).collect();
                self.program(new_mode, &ready_now).await;
                if new_mode != mode {
                    tracing::info!(service = %name, mode = ?new_mode, ready = ready_now.len(), "flipped");
                }
                if let Some(w) = wake_at {
                    if new_mode == Mode::Serve || !ready_now.is_empty() {
                        if let Ok(mut s) = self.status.lock() {
                            if let Some(cs) = s.last_cold_start.as_mut() {
                                if cs.ready_us == 0 {
                                    cs.ready_us = w.elapsed().as_micros() as u64;
                                }
                                if new_mode == Mode::Serve {
                                    cs.flipped_us = w.elapsed().as_micros() as u64;
                                }
                            }
                        }
                        if new_mode == Mode::Serve {
                            wake_at = None;
                        }
                    }
                }
                mode = new_mode;
                published_ready = ready_ids;
            }
            // Victims stop only now that the flip is in effect; pinned flows get a moment.
            if !victims.is_empty() {
                let pids: Vec<(String, Option<u32>)> = victims
                    .iter()
                    .filter_map(|v| insts.get(v))
                    .map(|i| (i.placement.netns.clone(), i.pid))
                    .collect();
                let ips: Vec<IpAddr> = victims
                    .iter()
                    .filter_map(|v| insts.get(v))
                    .flat_map(|i| [i.placement.v4, i.placement.v6])
                    .flatten()
                    .collect();
                let view = self.view.clone();
                let svc_name = name.clone();
                tokio::spawn(async move {
                    // Flows pinned to the victims (conntrack) end first, within DRAIN_MAX.
                    let t0 = Instant::now();
                    tokio::time::sleep(DRAIN_MIN).await;
                    while let Some(v) = &view {
                        let left = v.flows_to(&ips);
                        if left == 0 || t0.elapsed() >= DRAIN_MAX {
                            if left > 0 {
                                tracing::info!(service = %svc_name, flows = left, "drain deadline reached");
                            }
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    for (ns, pid) in pids {
                        tracing::info!(service = %svc_name, instance = %ns, "stopping instance");
                        if let Some(pid) = pid {
                            // SAFETY: signalling our own child.
                            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                            tokio::spawn(async move {
                                tokio::time::sleep(STOP_GRACE).await;
                                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                            });
                        }
                    }
                });
            }
            if let Ok(mut s) = self.status.lock() {
                s.desired = want;
                s.instances = insts.values().map(|i| i.placement.netns.clone()).collect();
                s.ready = insts
                    .values()
                    .filter(|i| i.ready && !i.stopping)
                    .flat_map(|i| self.addrs(i))
                    .map(|a| a.to_string())
                    .collect();
                s.mode = format!("{mode:?}").to_lowercase();
            }
        }
        // Shutdown: stop everything (and drop the spare sandbox).
        if preparing {
            if let Ok(Some(Event::Prepared(_, Some(p)))) =
                tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        match ev_rx.recv().await {
                            Some(Event::Prepared(s, p)) => return Some(Event::Prepared(s, p)),
                            Some(_) => continue,
                            None => return None,
                        }
                    }
                })
                .await
            {
                instance::cleanup(&p).await;
            }
        }
        if let Some((_, p)) = spare.take() {
            instance::cleanup(&p).await;
        }
        for i in insts.values() {
            if let Some(pid) = i.pid {
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let t0 = Instant::now();
        while !insts.is_empty() && t0.elapsed() < STOP_GRACE {
            if let Ok(Some(Event::Exited(id))) =
                tokio::time::timeout(Duration::from_millis(100), ev_rx.recv()).await
            {
                if let Some(i) = insts.remove(&id) {
                    instance::cleanup(&i.placement).await;
                }
            }
        }
        for i in insts.values() {
            if let Some(pid) = i.pid {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            instance::cleanup(&i.placement).await;
        }
    }
}
