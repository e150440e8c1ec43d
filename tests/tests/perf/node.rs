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
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
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

#[path = "node/bed.rs"]
mod bed;
#[path = "node/flips.rs"]
mod flips;
#[path = "node/load.rs"]
mod load;
#[path = "node/rules.rs"]
mod rules;
/// The scale part (agent map memory and RSS at 10,000+ services): `node/scale.rs`.
#[path = "node/scale.rs"]
mod scale;

use bed::Bed;
use flips::{measure_flips, Flips};
use load::{new_conns, wrk, Load, Prober};
use rules::{serve_eps, services};
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Samples {
    keepalive: Vec<Load>,
    newconn: Vec<Load>,
    program_ms: Vec<f64>,
}

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
    let scale = scale::run_all(&a);

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
    scale::markdown(&mut md, &scale);
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
        "scale": scale::json(&scale),
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
