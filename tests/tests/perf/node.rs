//! `node` (`--node`, or no scenario flag): redirector side by side with kube-proxy's
//! iptables and nftables rule layouts, on one node, with real TCP through network namespaces.
//!
//! Topology of one bed: client namespace `cli` (10.1.0.10) --veth rdp-cli-- node namespace
//! (10.1.0.1 on lo, forwarding) --veth rdp-be-- backend namespace `be` (10.1.0.20,
//! `rt-server` on :8080 and :8081). A stand-in activator (`rt-server` named `act`) listens in
//! the node namespace on 10.1.0.1:8012. The measured service is VIP 10.95.0.10:80 with
//! endpoints 10.1.0.20:8080 and :8081; the other services are VIPs 10.96.x.y:80 with two
//! (unreachable) endpoints each.
//!
//! Variants, each in its own bed (so no rule of one sits in the path of another):
//! - `direct`: the client talks to 10.1.0.20:8080 (no NAT at all; the limit);
//! - `redirector`: the agent in the node namespace, every service in Serve;
//! - `iptables`: kube-proxy's iptables layout (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP with
//!   `statistic` and DNAT), loaded with `iptables-restore --noflush`; the measured service is
//!   the last one in KUBE-SERVICES, so a new connection walks the whole chain;
//! - `nftables`: kube-proxy's nftables layout (table `kube-proxy`, `service-ips` verdict map,
//!   per-service chains with `numgen random mod N vmap`, DNAT), loaded with `nft -f`.
//!
//! Discipline (`rounds.rs`): for each service count the five beds are built and programmed
//! once (programming timed), then the rounds run over the live beds, one slot per variant per
//! round with the order rotated every round; each slot empties the connection tracking on
//! its path and warms up before measuring. Ratios are paired per round (`summary.rs`); the
//! targets are judged on their medians (`render.rs`). CPU pinning (`pin.rs`): load side and
//! serving side all on one CPU by default, chosen by experiment (see [`PIN_REASON`]).
//!
//! Measured: kept-alive requests/s and latency with `wrk`; new connections/s (connect, one
//! request, close) and their latency with an in-process generator in the client namespace;
//! flip latency (decision -> first new connection on the new target) on the live beds after
//! the rounds (`flips.rs`); programming time; map memory and agent RSS at 10,000 and 100,000
//! services (`scale.rs`).
//!
//! Files: `rules.rs` (service sets, iptables / nft / agent config generators), `bed.rs`
//! (namespaces, servers, agent), `load.rs` (wrk, new-connection generator, prober).
//!
//! Results: `target/perf/node.{json,md}` and SVG plots; then [`report::write_report`] merges
//! every part found in `target/perf` into `report.{md,json}`.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
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
    /// A second direct bed: the A/A control. Its ratio to direct is the noise floor of
    /// the paired ratios (two identical paths measured the same way).
    Control,
    /// Direct, with the empty tc program on the same four hooks as redirector's (ingress
    /// and egress of both pod interfaces): what hooking the path costs before any work.
    Floor,
    Redirector,
    /// Redirector with `host_routing = "bpf"`: translated packets to the pod skip the
    /// node's forwarding path.
    RedirectorBpf,
    /// Redirector's default for the node's own clients: the client runs in the cgroup the
    /// agent's socket hooks are on, so `connect()` to the VIP goes straight to the pod.
    RedirectorSocket,
    Iptables,
    Nftables,
}

const VARIANTS: [Variant; 8] = [
    Variant::Direct,
    Variant::Control,
    Variant::Floor,
    Variant::Redirector,
    Variant::RedirectorBpf,
    Variant::RedirectorSocket,
    Variant::Iptables,
    Variant::Nftables,
];

impl Variant {
    /// No NAT on the path: the client talks to the pod's address.
    fn is_direct(self) -> bool {
        matches!(self, Variant::Direct | Variant::Control | Variant::Floor)
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Control => "direct-b",
            Variant::Floor => "empty-tc",
            Variant::Redirector => "redirector",
            Variant::RedirectorBpf => "redirector-bpf",
            Variant::RedirectorSocket => "redirector-socket",
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

#[path = "node/bed.rs"]
mod bed;
#[path = "node/cost.rs"]
mod cost;
#[path = "node/flips.rs"]
mod flips;
#[path = "node/load.rs"]
mod load;
#[path = "node/pin.rs"]
mod pin;
#[path = "node/render.rs"]
mod render;
#[path = "node/rounds.rs"]
mod rounds;
#[path = "node/rules.rs"]
mod rules;
/// The scale part (agent map memory and RSS at 10,000+ services): `node/scale.rs`.
#[path = "node/scale.rs"]
mod scale;
#[path = "node/summary.rs"]
mod summary;

use pin::Pinning;
use summary::Metric;

/// CPU pinning of the measured rounds (`NODE_PIN=split|on|off|ab` overrides; `ab` is the
/// experiment that chose this).
const PIN_DEFAULT: PinMode = PinMode::Fixed {
    keepalive: Layout::One,
    newconn: Layout::One,
};

/// Why: written into the report's method paragraph.
const PIN_REASON: &str = "Chosen by experiment on this 2-vCPU VM, with the A/A control bed \
     (direct-b) as the yardstick. Unpinned (8 rounds, ABBA), kept-alive direct-b / direct \
     spanned 0.84-1.29 and new connections 0.84-1.00: wrk, the server threads and the softirq \
     work land on either CPU, and every wake-up across CPUs costs a VM exit. Load and \
     serving sides on separate CPUs made that worse for kept-alive (one wake-up across CPUs \
     per request: 15-19k req/s instead of 45-50k, p99 15-31 ms). Everything on one CPU \
     (2 runs of 3 rounds) gave A/A spans of 0.92-1.11 (kept-alive) and 0.93-1.10 (new \
     connections): the rate is then the inverse of the whole path's CPU cost per request, \
     which is what differs between the variants. So every measurement runs on CPU 0 and the \
     other CPU only takes the rest of the machine's work.";

/// Where the load and serving sides run (see `pin.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The scheduler decides.
    Off,
    /// Load side on the first half of the CPUs, serving side on the rest.
    Split,
    /// Everything on the first CPU.
    One,
}

impl Layout {
    fn pinning(self) -> Pinning {
        match self {
            Layout::Off => Pinning::off(),
            Layout::Split => Pinning::split(),
            Layout::One => Pinning::one(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinMode {
    /// Every round the same: kept-alive runs as `keepalive`, new connections and the flip
    /// probes as `newconn`.
    Fixed { keepalive: Layout, newconn: Layout },
    /// Experiment: rounds alternate ABBA between the layout (both measurements) and
    /// unpinned; 1 and 1,000 services, no flips, no scale; written to
    /// `target/perf/experiments/`.
    Ab(Layout),
}

/// What one run measures.
struct Plan {
    quick: bool,
    rounds: usize,
    counts: Vec<usize>,
    flip_counts: Vec<usize>,
    /// Measured duration of each kept-alive and new-connection run.
    run: Duration,
    /// wrk warm-up before each kept-alive run (whole seconds: wrk's -d).
    warm: Duration,
    /// Warm-up before each new-connection run.
    warm_newconn: Duration,
    flips: usize,
    wrk_conns: usize,
    gen_threads: usize,
    pin: PinMode,
}

impl Plan {
    /// `--quick`: one round at 1,000 services, 2 s runs (with the other parts, `cargo xtask
    /// perf --quick` stays under two minutes).
    /// Full: 7 rounds at 1, 1,000 and 10,000 services, 3 s runs (126 slots of ~8 s; with
    /// the 10,000-service programming and flips, ~22 minutes on 2 CPUs). Seven, not five:
    /// a single slot drifts by up to ±5-10% even between identical beds, and the
    /// kept-alive target is a 3% margin.
    /// For experiments: `NODE_PIN`, `NODE_ROUNDS`, `NODE_COUNTS` (e.g. `1,1000`) and
    /// `NODE_RUN_SECS` override; `NODE_SCALE=0` skips the scale part.
    fn new(quick: bool) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let fixed = |keepalive, newconn| PinMode::Fixed { keepalive, newconn };
        let pin = match env("NODE_PIN").as_deref() {
            Some("off") => fixed(Layout::Off, Layout::Off),
            Some("on") => fixed(Layout::Split, Layout::Split),
            Some("split") => fixed(Layout::Off, Layout::Split),
            Some("one") => fixed(Layout::One, Layout::One),
            Some("one-split") => fixed(Layout::One, Layout::Split),
            Some("ab") => PinMode::Ab(Layout::Split),
            Some("ab-one") => PinMode::Ab(Layout::One),
            Some(o) => panic!("NODE_PIN={o}: off, on, split, one, one-split, ab or ab-one"),
            None => PIN_DEFAULT,
        };
        let full = Plan {
            quick,
            rounds: 7,
            counts: vec![1, 1000, 10_000],
            flip_counts: vec![1000, 10_000],
            run: Duration::from_secs(3),
            warm: Duration::from_secs(1),
            warm_newconn: Duration::from_millis(500),
            flips: 1,
            wrk_conns: 16,
            gen_threads: 4,
            pin,
        };
        let mut p = if quick {
            Plan {
                rounds: 1,
                counts: vec![1000],
                flip_counts: vec![1000],
                run: Duration::from_secs(2),
                ..full
            }
        } else {
            full
        };
        if matches!(pin, PinMode::Ab(_)) {
            p.rounds = 8;
            p.counts = vec![1, 1000];
            p.flip_counts.clear();
        }
        if let Some(r) = env("NODE_ROUNDS").and_then(|v| v.parse().ok()) {
            p.rounds = r;
        }
        if let Some(c) = env("NODE_COUNTS") {
            p.counts = c.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        }
        if let Some(s) = env("NODE_RUN_SECS").and_then(|v| v.parse().ok()) {
            p.run = Duration::from_secs(s);
        }
        p
    }

    /// The pinning of round `r` for `metric` (the flips use the new-connection one).
    fn pinning(&self, r: usize, metric: Metric) -> Pinning {
        match self.pin {
            PinMode::Fixed { keepalive, .. } if metric == Metric::Keepalive => keepalive.pinning(),
            PinMode::Fixed { newconn, .. } => newconn.pinning(),
            PinMode::Ab(l) if matches!(r % 4, 0 | 3) => l.pinning(),
            PinMode::Ab(_) => Pinning::off(),
        }
    }

    /// How the rounds are pinned, for the report.
    fn describe_pinning(&self) -> String {
        let (ka, nc) = (
            self.pinning(0, Metric::Keepalive),
            self.pinning(0, Metric::Newconn),
        );
        match self.pin {
            PinMode::Ab(l) => format!(
                "rounds alternating (ABBA) between {} and unpinned",
                l.pinning().describe()
            ),
            _ if ka == nc => nc.describe(),
            _ => format!(
                "kept-alive runs {}; new connections and flip probes: {}",
                ka.describe(),
                nc.describe()
            ),
        }
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
    let plan = Plan::new(a.quick);
    let started = Instant::now();
    println!(
        "node perf: {} round(s) x {:?} services x {} variants on live beds, {:?} runs, {:?} \
         warm-up, {}",
        plan.rounds,
        plan.counts,
        VARIANTS.len(),
        plan.run,
        plan.warm,
        plan.describe_pinning()
    );
    let res = rounds::run(&plan);
    if matches!(plan.pin, PinMode::Ab(_)) {
        render::pin_experiment(&plan, &res, started);
        return;
    }
    // `NODE_SCALE=0` (experiments): no scale part.
    let with_scale = std::env::var("NODE_SCALE").map_or(true, |v| v != "0");
    let scale = if with_scale {
        scale::run_all(&a)
    } else {
        Vec::new()
    };
    let out = render::write(&plan, &res, &scale, started);

    // Every benchmark must have produced numbers (all that --quick asserts).
    let rows = out["rows"].as_array().cloned().unwrap_or_default();
    for &n in &plan.counts {
        for v in VARIANTS {
            let r = rows
                .iter()
                .find(|r| r["variant"] == v.name() && r["services"] == n);
            for k in ["keepalive_rps", "newconn_cps"] {
                assert!(
                    r.and_then(|r| r[k].as_f64()).is_some_and(|x| x > 0.0),
                    "no {k} for {} at {n}; errors: {:?}",
                    v.name(),
                    res.errors
                );
            }
        }
    }
    for &n in &plan.counts {
        assert!(
            res.costs
                .get(&n)
                .is_some_and(|c| c.keepalive.is_some() && c.newconn.is_some() && c.floor.is_some()),
            "no datapath cost numbers (redirector and the empty-tc floor) at {n}; errors: {:?}",
            res.errors
        );
    }
    for &n in plan.flip_counts.iter().filter(|n| plan.counts.contains(n)) {
        for m in [
            "redirector: map write",
            "redirector: config + SIGHUP",
            "iptables: full restore",
            "iptables: partial restore",
            "nftables: full ruleset",
            "nftables: incremental",
        ] {
            assert!(
                res.flips
                    .get(&(m.to_owned(), n))
                    .is_some_and(|v| !v.is_empty()),
                "no flip numbers for {m} at {n}; errors: {:?}",
                res.errors
            );
        }
    }
    assert!(
        !with_scale || scale.iter().any(|s| s.ok && s.memlock > 0),
        "scale numbers"
    );
    report::write_report().expect("writing the report");
}
