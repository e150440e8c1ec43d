//! The per-node agent: loads and pins the datapath, programs it from the config file,
//! attaches to interfaces as they appear, reloads on file change or SIGHUP (keeping the maps
//! as they were on bad input), and garbage-collects conntrack. On exit it leaves programs
//! and maps pinned so traffic keeps flowing and the next agent adopts them.
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    activator::{origdst::OrigDst, Activator},
    config::{Config, ConfigError, HostRouting, MapSizes, NodeConfig, DEFAULT_CONFIG},
    control::{ControlError, DesiredService, Programmer},
    datapath::{AttachReport, Datapath, DatapathError, Hook},
    k8s::{
        source::{desired, kube_changed},
        KubeError, KubeOptions, KubeSource,
    },
    metrics::Histogram,
    netlink,
    scaler::Update,
    serving::Serving,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// Where the agent's services come from.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Config file; `None` = the embedded default.
    pub config: Option<PathBuf>,
    /// Overrides `node.pin_path`.
    pub pin_path: Option<PathBuf>,
    /// Touched once the agent has programmed the maps and attached (with `kubernetes`:
    /// once the cluster's state is programmed).
    pub ready_file: Option<PathBuf>,
    /// Services from Kubernetes/Knative instead of the file's `[[service]]` entries (the
    /// file still gives the node settings).
    pub kubernetes: Option<KubeOptions>,
}

/// Reads the config; `running`: the sizes of the maps in use (a reload), which the services
/// must fit.
fn load(opts: &AgentOptions, running: Option<&MapSizes>) -> Result<Config, ConfigError> {
    let mut cfg = match &opts.config {
        Some(p) => Config::load_for(p, running)?,
        None => Config::parse_for(DEFAULT_CONFIG, Path::new("<embedded default>"), running)?,
    };
    if let Some(p) = &opts.pin_path {
        cfg.node.pin_path = p.clone();
    }
    if opts.kubernetes.is_some() && !cfg.services.is_empty() {
        tracing::warn!(
            services = cfg.services.len(),
            "[[service]] entries are ignored with --kubernetes"
        );
        cfg.services.clear();
    }
    Ok(cfg)
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Hooks for an interface under the node config: uplinks get XDP + tc egress, pod-facing
/// interfaces tc ingress + egress.
fn hooks_for(node: &NodeConfig, ifname: &str) -> &'static [Hook] {
    let matches = |pats: &[String]| {
        pats.iter().any(|p| {
            glob::Pattern::new(p)
                .map(|g| g.matches(ifname))
                .unwrap_or(false)
        })
    };
    if matches(&node.uplink) {
        &[Hook::Xdp, Hook::TcEgress]
    } else if matches(&node.pod_interfaces) {
        &[Hook::TcIngress, Hook::TcEgress]
    } else {
        &[]
    }
}

struct Attachments {
    /// ifname → (ifindex, hooks attached).
    current: HashMap<String, (u32, Vec<Hook>)>,
    /// Programs are not attached (the previous agent's stay) until the maps are
    /// programmed: set when maps were recreated empty and the state comes from the cluster.
    held: bool,
    /// With `host_routing = "bpf"`: what `PEERS` holds (`None`: not written yet, or off);
    /// written again only when it changes.
    peers: Option<BTreeSet<u32>>,
    /// `[node] host_routing` as loaded (a change takes a restart).
    host_routing: bool,
}

impl Attachments {
    /// Attaches to every matching interface not attached yet; forgets vanished ones; detaches
    /// links for interfaces that no longer match.
    fn sync(&mut self, dp: &mut Datapath, node: &NodeConfig) {
        if self.held {
            return;
        }
        let links = match netlink::links() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing interfaces");
                return;
            }
        };
        let present: HashMap<&str, u32> =
            links.iter().map(|l| (l.name.as_str(), l.index)).collect();
        // Interfaces gone or renamed/recreated: forget (the kernel detached their links).
        self.current.retain(|name, (idx, _)| {
            let keep = present.get(name.as_str()) == Some(idx);
            if !keep {
                tracing::info!(ifname = %name, "interface gone");
                for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
                    dp.detach(name, hook);
                }
            }
            keep
        });
        for (ifname, hook) in dp.pinned_links() {
            let stale =
                !present.contains_key(ifname.as_str()) || !hooks_for(node, &ifname).contains(&hook);
            if stale && dp.detach(&ifname, hook) {
                tracing::info!(%ifname, %hook, "detached (no longer configured)");
            }
        }
        for netlink::Link {
            index: ifindex,
            name: ifname,
            ..
        } in &links
        {
            let hooks = hooks_for(node, ifname);
            let entry = self
                .current
                .entry(ifname.clone())
                .or_insert((*ifindex, Vec::new()));
            entry.1.retain(|h| hooks.contains(h));
            for hook in hooks {
                if entry.1.contains(hook) {
                    continue;
                }
                match dp.attach(ifname, *hook, node.xdp_mode) {
                    Ok(AttachReport::Replaced) => {
                        tracing::info!(%ifname, %hook, "adopted pinned link, program replaced")
                    }
                    Ok(AttachReport::Attached { mode }) => {
                        tracing::info!(%ifname, %hook, mode, "attached")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "attach failed");
                        continue;
                    }
                }
                entry.1.push(*hook);
            }
        }
        self.current.retain(|_, (_, h)| !h.is_empty());
        if self.host_routing {
            // Pod interfaces (tc ingress, no XDP) that are veths or netkits: the kinds
            // `bpf_redirect_peer` can hand a packet across.
            let peers: BTreeSet<u32> = links
                .iter()
                .filter(|l| matches!(l.kind.as_deref(), Some("veth" | "netkit")))
                .filter(|l| {
                    self.current.get(&l.name).is_some_and(|(i, h)| {
                        *i == l.index && h.contains(&Hook::TcIngress) && !h.contains(&Hook::Xdp)
                    })
                })
                .map(|l| l.index)
                .collect();
            if self.peers.as_ref() != Some(&peers) {
                match dp.set_peers(&peers) {
                    Ok(left_out) => {
                        tracing::info!(
                            peers = peers.len(),
                            ?left_out,
                            "pod interfaces that translated packets reach directly"
                        );
                        self.peers = Some(peers);
                    }
                    Err(e) => tracing::warn!(error = %e, "recording the pod interfaces"),
                }
            }
        }
    }
}

fn apply(
    prog: &mut Programmer,
    cfg: &Config,
    desired: Option<Vec<DesiredService>>,
) -> Result<Option<crate::control::ApplyReport>, ControlError> {
    prog.set_conntrack(&cfg.conntrack)?;
    let Some(desired) = desired else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    let r = prog.apply(&desired)?;
    let took_us = started.elapsed().as_micros() as u64;
    if r.added + r.updated + r.removed + r.skipped > 0 {
        tracing::info!(
            added = r.added,
            updated = r.updated,
            removed = r.removed,
            unchanged = r.unchanged,
            skipped = r.skipped,
            took_us,
            "maps programmed"
        );
    } else {
        tracing::debug!(unchanged = r.unchanged, took_us, "maps unchanged");
    }
    Ok(Some(r))
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    raise_nofile_limit();
    let mut cfg = load(&opts, None)?;
    let pin_path = cfg.node.pin_path.clone();
    let host_routing = cfg.node.host_routing == HostRouting::Bpf;
    // Before anything is touched: a second agent on this pin path stops here.
    let _lock = crate::datapath::bpffs::lock(&pin_path)?;
    crate::datapath::kernel().log();
    let mut dp = Datapath::open(&pin_path, &cfg.maps, host_routing)?;
    tracing::info!(
        pin_path = %pin_path.display(),
        services = cfg.maps.services,
        host_routing = ?cfg.node.host_routing,
        backends = cfg.maps.backends,
        conntrack = cfg.maps.conntrack,
        "datapath loaded, maps pinned"
    );
    let mut prog = Programmer::adopt(dp.maps()?, &cfg.maps);
    let origdst = match OrigDst::open(&pin_path) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "activator can't read conntrack; only header routing");
            None
        }
    };
    let activator = Activator::new(cfg.activator.clone(), origdst);
    let (upd_tx, mut upd_rx) = mpsc::unbounded_channel::<Update>();
    let mut serving = Serving::new(activator.clone(), &cfg, upd_tx);
    serving.sync(&cfg);
    let mut kube = match &opts.kubernetes {
        Some(k) => {
            k.waker.attach(&activator);
            Some(KubeSource::connect(k.clone()).await?)
        }
        None => None,
    };
    // The listeners first: whether services get ports of their own depends on them, and
    // the first write of the maps must already say (a restart rewrites nothing).
    let (listeners, service_ports) =
        crate::node_hooks::start_activator(&activator, &cfg, &mut dp).await;
    prog.set_service_ports(service_ports);
    apply(&mut prog, &cfg, desired(&kube, &serving, &cfg))?;
    if let Some(ports) = service_ports {
        activator.set_service_ports(ports, prog.vips_by_id());
    }
    // A map that could not be copied (its layout changed) starts empty: with the state
    // coming from the cluster, the old programs keep serving until it is programmed.
    let mut att = Attachments {
        current: HashMap::new(),
        held: kube.is_some() && !dp.recreated_empty().is_empty(),
        peers: None,
        host_routing,
    };
    if att.held {
        tracing::warn!(
            maps = ?dp.recreated_empty(),
            "maps recreated empty: keeping the running programs until the cluster's state is programmed"
        );
    }
    att.sync(&mut dp, &cfg.node);
    if !att.held {
        dp.finish_migration();
        crate::node_hooks::hook_sockets(&mut dp, &cfg.node);
    }

    let agent_metrics = Arc::new(crate::metrics::AgentMetrics {
        activator: activator.clone(),
        statuses: serving.statuses.clone(),
        flips: AtomicU64::new(0),
        map_update: Histogram::default(),
        pin_path: pin_path.clone(),
        readiness: crate::metrics::Readiness::new(opts.kubernetes.as_ref().and_then(|k| {
            let waker = k.waker.clone();
            waker.connected().map(|_| {
                Box::new(move || waker.connected().unwrap_or(true))
                    as Box<dyn Fn() -> bool + Send + Sync>
            })
        })),
    });
    if let Some(addr) = cfg.node.metrics {
        let src: Arc<dyn crate::metrics::Source> = agent_metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, src).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }

    let (link_tx, mut link_rx) = mpsc::channel::<()>(1);
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            if let Err(e) = netlink::watch_links(|| {
                !matches!(
                    link_tx.try_send(()),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            }) {
                tracing::warn!(error = %e, "link events unavailable; relying on periodic rescans");
            }
        })
        .map_err(|e| AgentError::Io("spawning the netlink thread", e))?;

    // With --kubernetes, ready once the cluster's state is programmed.
    let mut ready_file = opts.ready_file.clone();
    let mut announced = kube.is_none();
    if kube.is_none() {
        serving.spares_prepared(Duration::from_secs(5)).await;
        write_ready(&mut ready_file)?;
        agent_metrics.readiness.set_synced();
        tracing::info!(
            services = cfg.services.len(),
            interfaces = att.current.len(),
            "agent ready"
        );
    }

    let mut hup = signal(SignalKind::hangup()).map_err(|e| AgentError::Io("SIGHUP", e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Io("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| AgentError::Io("SIGINT", e))?;
    let mut file_tick = tokio::time::interval(Duration::from_millis(250));
    let mut rescan_tick = tokio::time::interval(Duration::from_secs(5));
    let mut gc_tick = tokio::time::interval(Duration::from_secs(10));
    let mut flows_tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_mtime = opts.config.as_deref().and_then(mtime);
    let mut last_live = String::new();
    let mut last_live_at = std::time::Instant::now();

    loop {
        let reload = tokio::select! {
            _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); true }
            _ = file_tick.tick() => {
                let m = opts.config.as_deref().and_then(mtime);
                if m != last_mtime { last_mtime = m; tracing::info!("config file changed: reloading"); true } else { false }
            }
            _ = link_rx.recv() => { att.sync(&mut dp, &cfg.node); false }
            Some(u) = upd_rx.recv() => {
                serving.record(&u);
                // A new instance's veth must carry the programs before traffic goes direct.
                att.sync(&mut dp, &cfg.node);
                let t0 = std::time::Instant::now();
                match desired(&kube, &serving, &cfg).map(|d| prog.apply(&d)) {
                    Some(Ok(r)) if r.updated + r.added > 0 => {
                        agent_metrics.map_update.observe(t0.elapsed());
                        agent_metrics.flips.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(e)) => tracing::error!(service = %u.name, error = %e, "programming the scaler's decision failed"),
                }
                let _ = u.done.send(());
                false
            }
            _ = kube_changed(&mut kube) => {
                if let Some(k) = &mut kube {
                    k.remap(&cfg.node.activator);
                    k.sync_serving(&mut serving, &cfg);
                }
                let t0 = std::time::Instant::now();
                match apply(&mut prog, &cfg, desired(&kube, &serving, &cfg)) {
                    Ok(r) => {
                        if r.as_ref().is_some_and(|r| r.updated + r.added + r.removed > 0) {
                            agent_metrics.map_update.observe(t0.elapsed());
                            agent_metrics.flips.fetch_add(1, Ordering::Relaxed);
                        }
                        if !announced && r.is_some() {
                            announced = true;
                            if att.held {
                                att.held = false;
                                att.sync(&mut dp, &cfg.node);
                                dp.finish_migration();
                                crate::node_hooks::hook_sockets(&mut dp, &cfg.node);
                            }
                            write_ready(&mut ready_file)?;
                            agent_metrics.readiness.set_synced();
                            tracing::info!(
                                sks = kube.as_ref().and_then(KubeSource::sks_count).unwrap_or(0),
                                interfaces = att.current.len(),
                                "agent ready"
                            );
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "programming the cluster's state failed; maps left as they were"),
                }
                false
            }
            _ = flows_tick.tick() => {
                serving.update_flows(&prog);
                // Rewritten when it changes, and every second (readers want it fresh).
                let live = agent_metrics.live_json();
                if live != last_live || last_live_at.elapsed() >= Duration::from_secs(1) {
                    crate::status::write_live(&pin_path, &live);
                    last_live = live;
                    last_live_at = std::time::Instant::now();
                }
                false
            }
            _ = rescan_tick.tick() => { att.sync(&mut dp, &cfg.node); false }
            _ = gc_tick.tick() => {
                let n = prog.gc_conntrack(&cfg.conntrack);
                if n > 0 { tracing::debug!(removed = n, "conntrack gc"); }
                false
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if reload {
            match load(&opts, Some(&cfg.maps)) {
                Ok(mut new) => {
                    if new.maps != cfg.maps {
                        tracing::warn!(
                            "[maps] changes take effect at the next agent start (the maps are resized and their entries copied)"
                        );
                        // The services were checked against the maps in use; later reloads too.
                        new.maps = cfg.maps;
                    }
                    if new.node.host_routing != cfg.node.host_routing {
                        tracing::warn!(
                            "node.host_routing changes take effect at the next agent start; keeping {:?}",
                            cfg.node.host_routing
                        );
                    }
                    if new.node.pin_path != cfg.node.pin_path {
                        tracing::warn!(
                            "node.pin_path changes need a restart; keeping {}",
                            cfg.node.pin_path.display()
                        );
                    }
                    match &mut kube {
                        Some(k) => {
                            k.remap(&new.node.activator);
                            k.sync_serving(&mut serving, &new);
                        }
                        None => serving.sync(&new),
                    }
                    match apply(&mut prog, &new, desired(&kube, &serving, &new)) {
                        Ok(_) => {
                            cfg = new;
                            att.sync(&mut dp, &cfg.node);
                        }
                        Err(e) => tracing::error!(error = %e, "applying the new config failed"),
                    }
                }
                Err(e) => tracing::error!(error = %e, "bad config; maps left as they were"),
            }
        }
    }
    if let Some(k) = &kube {
        hand_over(k, &mut prog, &cfg);
    }
    tracing::info!("stopping: draining the activator, stopping instances");
    // Scalers still report while they drain; acknowledge (the maps stay as they are).
    tokio::spawn(async move {
        while let Some(u) = upd_rx.recv().await {
            let _ = u.done.send(());
        }
    });
    activator.shutdown();
    for l in listeners {
        let _ = tokio::task::spawn_blocking(move || l.join()).await;
    }
    serving.shutdown().await;
    let _ = std::fs::remove_file(crate::status::live_path(&pin_path));
    tracing::info!(
        "stopped; programs and maps stay pinned under {}",
        pin_path.display()
    );
    Ok(())
}

/// Before the listener closes: Proxy to Knative's activators while no node-local activator
/// listens (the next agent takes it back with its first write). Established flows keep
/// their target and drain here.
fn hand_over(k: &KubeSource, prog: &mut Programmer, cfg: &Config) {
    let proxied = k
        .desired()
        .unwrap_or_default()
        .iter()
        .filter(|d| d.mode == redirector_common::MODE_PROXY)
        .count();
    match k.hand_over(&cfg.node.activator) {
        Some((desired, n)) => match prog.apply(&desired) {
            Ok(_) => tracing::info!(
                services = n,
                "Proxy handed over to Knative's activators until the next agent listens"
            ),
            Err(e) => tracing::error!(error = %e, "handing Proxy over to Knative's activators failed"),
        },
        None if proxied > 0 => tracing::warn!(
            services = proxied,
            "no ready Knative activator to hand Proxy over to: new Proxy connections are refused until the next agent listens"
        ),
        None => {}
    }
}

/// Writes the ready file (once).
fn write_ready(f: &mut Option<PathBuf>) -> Result<(), AgentError> {
    if let Some(f) = f.take() {
        std::fs::write(&f, format!("{}\n", std::process::id()))
            .map_err(|e| AgentError::Io("writing the ready file", e))?;
    }
    Ok(())
}

/// Every held request and proxied connection is a socket: lift the soft open-files limit
/// to the hard one (the default 1024 would cap the activator at about a thousand).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::info!(from = old, to = lim.rlim_max, "raised the open-files limit");
            }
        }
    }
}

/// What `uninstall` found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Uninstalled {
    /// Links detached (pinned links plus clsact filters).
    pub links: usize,
    /// Pinned maps removed.
    pub maps: usize,
}

/// Uninstalls: detaches every pinned link and removes the pinned maps. Removes nothing from
/// a pin path that is not on a bpffs (there, files are ordinary files: not ours).
pub fn uninstall(pin_path: &Path) -> Result<Uninstalled, AgentError> {
    // clsact filters (kernels without tcx) are not pinned: found by name and priority.
    let mut done = Uninstalled {
        links: crate::datapath::detach_clsact_everywhere(),
        maps: 0,
    };
    let _ = std::fs::remove_file(crate::status::live_path(pin_path));
    if !pin_path.exists() {
        return Ok(done);
    }
    if !crate::datapath::bpffs::is_bpffs(pin_path) {
        return Err(DatapathError::Bpffs {
            path: pin_path.to_owned(),
            message: "not a bpffs: nothing of the agent's can be there, so uninstall removes \
                      nothing (is the pin path right?)"
                .into(),
        }
        .into());
    }
    for (ifname, hook) in crate::datapath::pinned_links_at(pin_path) {
        let p = crate::datapath::link_pin_path(pin_path, &ifname, hook);
        if std::fs::remove_file(&p).is_ok() {
            done.links += 1;
        }
    }
    done.links += crate::datapath::sockets::detach_sockets(pin_path);
    done.links += crate::datapath::steer::detach_steering(pin_path) as usize;
    let _ = std::fs::remove_dir(pin_path.join("links"));
    for name in crate::datapath::MAP_NAMES {
        if std::fs::remove_file(pin_path.join(name)).is_ok() {
            done.maps += 1;
        }
    }
    let _ = std::fs::remove_dir(pin_path);
    Ok(done)
}
