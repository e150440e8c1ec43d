//! `cargo xtask demo`: scale to zero end to end on one node, in network namespaces.
//!
//! It renders `redirector/config/demo.toml`, builds a node namespace (activator address on
//! lo) and a client namespace on a veth, runs the agent in the node namespace, and drives
//! traffic from the client namespace (threads that setns(2) into it, HTTP over std::net):
//! a cold start, warm traffic through the kernel, idle scale-down, a second cold start, and
//! a burst during a cold start. It ends with a summary table; everything it created is
//! removed on exit, also on errors and Ctrl-C.
mod env;
mod http;
mod observe;
mod steps;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::util::workspace_root;
use env::{Env, CLIENT_ADDR, CLIENT_NS, NODE_NS};
use steps::{ms, us_ms, Cold, Ctx};

/// Requests on one keep-alive connection in the warm step.
const WARM_REQUESTS: usize = 2000;
/// New connections in the warm step: clients x connections each.
const WARM_CLIENTS: usize = 8;
const WARM_PER_CLIENT: usize = 50;
/// Concurrent requests during the last cold start. With target_concurrency 100 this is one
/// instance's worth even though the agent counts a proxied request twice (activator
/// concurrency + its conntrack flow); 100 would sometimes start a second instance.
const BURST: usize = 50;

/// The rendered config and the values the demo needs from it.
pub struct DemoConfig {
    pub rendered: String,
    pub name: String,
    pub namespace: String,
    pub vip: SocketAddr,
    pub activator: SocketAddr,
    pub metrics: SocketAddr,
    pub pin_path: PathBuf,
    pub idle_timeout: Duration,
    pub startup_delay_ms: Option<u64>,
}

fn get<'a>(t: &'a toml::Value, k: &str) -> Result<&'a str> {
    first_str(t.get(k)).ok_or_else(|| anyhow!("demo.toml: {k} missing"))
}

fn first_str(v: Option<&toml::Value>) -> Option<&str> {
    match v? {
        toml::Value::String(s) => Some(s),
        toml::Value::Array(a) => a.first()?.as_str(),
        _ => None,
    }
}

impl DemoConfig {
    fn load(hello_bin: &Path) -> Result<Self> {
        let path = workspace_root().join("redirector/config/demo.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let rendered = text.replace("@HELLO_BIN@", &hello_bin.to_string_lossy());
        let v: toml::Value = toml::from_str(&rendered).context("parsing demo.toml")?;
        let node = v
            .get("node")
            .ok_or_else(|| anyhow!("demo.toml: no [node]"))?;
        let svc = v
            .get("service")
            .and_then(|s| s.as_array())
            .and_then(|a| a.first())
            .ok_or_else(|| anyhow!("demo.toml: no [[service]]"))?;
        let scale = svc
            .get("scale")
            .ok_or_else(|| anyhow!("demo.toml: the service has no [service.scale]"))?;
        let vip: std::net::IpAddr = get(svc, "vip")?.parse().context("vip")?;
        let port = svc.get("port").and_then(|p| p.as_integer()).unwrap_or(80) as u16;
        let idle = match scale.get("idle_timeout_secs") {
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(toml::Value::Float(f)) => *f,
            _ => 30.0,
        };
        Ok(Self {
            name: get(svc, "name")?.to_owned(),
            namespace: first_str(svc.get("namespace"))
                .unwrap_or("default")
                .to_owned(),
            vip: SocketAddr::new(vip, port),
            activator: get(node, "activator")?.parse().context("node.activator")?,
            metrics: get(node, "metrics")?.parse().context("node.metrics")?,
            pin_path: get(node, "pin_path")?.into(),
            idle_timeout: Duration::from_secs_f64(idle),
            startup_delay_ms: scale
                .get("env")
                .and_then(|e| first_str(e.get("STARTUP_DELAY_MS")))
                .and_then(|d| d.parse().ok()),
            rendered,
        })
    }
}

/// Runs the demo with already built `redirector` and `redirector-hello` binaries.
pub fn run(redirector_bin: &Path, hello_bin: &Path, pause: bool) -> Result<()> {
    for b in [redirector_bin, hello_bin] {
        if !b.exists() {
            return Err(anyhow!("{} is missing (build first)", b.display()));
        }
    }
    // redirector-ebpf's host build is also a binary named `redirector`; a
    // `cargo build --workspace` can leave that empty program at target/debug/redirector.
    let version = crate::util::probe(&redirector_bin.to_string_lossy(), &["--version"]);
    if !version.as_deref().unwrap_or("").starts_with("redirector") {
        return Err(anyhow!(
            "{} is not the agent (`--version` printed {version:?}); run `cargo build -p redirector`",
            redirector_bin.display()
        ));
    }
    let cfg = DemoConfig::load(hello_bin)?;
    env::install_signal_handlers();
    println!("\n=== redirector demo: scale to zero with an eBPF data plane ===\n");
    println!(
        "node namespace {NODE_NS}: activator {}, pod interfaces rdp-*, maps pinned at {}",
        cfg.activator,
        cfg.pin_path.display()
    );
    println!("client namespace {CLIENT_NS}: {CLIENT_ADDR} on eth0 <-> rdp-cli");
    println!(
        "service {}/{}: VIP {} -> redirector-hello instances started on demand (STARTUP_DELAY_MS={}, idle_timeout {} s)",
        cfg.namespace,
        cfg.name,
        cfg.vip,
        cfg.startup_delay_ms.map_or("-".into(), |d| d.to_string()),
        cfg.idle_timeout.as_secs_f64()
    );
    let env = match Env::create(redirector_bin, &cfg) {
        Ok(env) => env,
        Err(e) => {
            env::teardown();
            if env::interrupted() {
                std::process::exit(130);
            }
            return Err(e);
        }
    };
    println!(
        "agent: nsenter --net=/run/netns/{NODE_NS} {} agent ... (pid {}, log {})",
        redirector_bin.display(),
        env.agent_pid,
        env.agent_log().display()
    );
    let ctx = Ctx {
        env: &env,
        cfg: &cfg,
        target: observe::Target {
            metrics: cfg.metrics,
            name: cfg.name.clone(),
            qualified: format!("{}/{}", cfg.namespace, cfg.name),
        },
    };
    let result = steps_and_summary(&ctx, pause);
    if env::interrupted() {
        // The signal watcher is tearing down; dropping `env` waits for it to finish.
        drop(env);
        std::process::exit(130);
    }
    if let Err(e) = &result {
        eprintln!("demo failed: {e:#}");
        env.print_agent_log_tail(40);
    }
    drop(env);
    result
}

fn steps_and_summary(ctx: &Ctx, pause: bool) -> Result<()> {
    let vip = ctx.cfg.vip;
    println!("\n[1] Cold start: one request to http://{vip}/ while no instance runs");
    let cold1 = steps::cold_start(ctx)?;

    println!("\n[2] Warm traffic: new connections go to the instance directly (DNAT in tc)");
    let warm = steps::warm(ctx, WARM_REQUESTS, WARM_CLIENTS, WARM_PER_CLIENT)?;
    let idle_since = Instant::now();

    println!(
        "\n[3] Idle: back to zero after idle_timeout ({} s)",
        ctx.cfg.idle_timeout.as_secs_f64()
    );
    steps::back_to_zero(ctx, idle_since)?;

    println!("\n[4] A second cold start");
    let cold2 = steps::cold_start(ctx)?;
    let idle_since = Instant::now();
    println!("    (waiting for scale to zero again)");
    steps::back_to_zero(ctx, idle_since)?;

    println!("\n[5] A burst: {BURST} concurrent new connections while the service is at zero");
    let burst = steps::burst(ctx, BURST)?;

    summary(ctx, &[cold1, cold2], &warm, &burst);
    // `redirector status` shows the agent's live state from a file it rewrites every second.
    std::thread::sleep(Duration::from_millis(1100));
    inspect(ctx);
    if pause {
        println!(
            "\n--pause: the node is still up (bpftool works as printed; for `redirector status` run it as root).\n\
             Press Enter to clean up."
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    Ok(())
}

fn summary(ctx: &Ctx, cold: &[Cold], warm: &steps::Warm, burst: &steps::Burst) {
    let row = |label: &str, vals: Vec<String>| {
        let cells: Vec<String> = vals.iter().map(|v| format!("{v:>12}")).collect();
        println!("  {label:<58}{}", cells.join(""));
    };
    println!("\n=== Summary ===\n");
    row("", (1..=cold.len()).map(|i| format!("cold #{i}")).collect());
    row(
        "time to first byte, client view",
        cold.iter().map(|c| ms(c.ttfb)).collect(),
    );
    row(
        "instance start -> ready (status: ready_us - started_us)",
        cold.iter()
            .map(|c| us_ms(c.cs.ready_us.saturating_sub(c.cs.started_us)))
            .collect(),
    );
    if let Some(d) = ctx.cfg.startup_delay_ms {
        row(
            "  of which the app's own STARTUP_DELAY_MS",
            cold.iter().map(|_| format!("{d}.0 ms")).collect(),
        );
    }
    row(
        "wake -> instance started (netns, veth, spawn)",
        cold.iter().map(|c| us_ms(c.cs.started_us)).collect(),
    );
    row(
        "redirector overhead (TTFB - instance start -> ready)",
        cold.iter()
            .map(|c| {
                let own = Duration::from_micros(c.cs.ready_us.saturating_sub(c.cs.started_us));
                ms(c.ttfb.saturating_sub(own))
            })
            .collect(),
    );
    row(
        "flip to Serve after ready (flipped_us - ready_us)",
        cold.iter()
            .map(|c| us_ms(c.cs.flipped_us.saturating_sub(c.cs.ready_us)))
            .collect(),
    );
    if cold.iter().all(|c| c.cs.flipped_us == c.cs.ready_us) {
        println!(
            "  (the agent stamps ready_us when it publishes the ready instance, right after\n   \
             programming the maps, so ready_us and flipped_us coincide)"
        );
    }
    println!();
    row(
        &format!("warm, {WARM_REQUESTS} requests on one keep-alive connection"),
        vec![format!("{:.0} req/s", warm.keepalive_rps)],
    );
    row(
        &format!(
            "warm, {} new connections ({WARM_CLIENTS} clients)",
            WARM_CLIENTS * WARM_PER_CLIENT
        ),
        vec![format!("{:.0} conn/s", warm.conn_rps)],
    );
    row(
        &format!("burst of {} during a cold start: HTTP 200", burst.n),
        vec![format!("{}/{}", burst.ok, burst.n)],
    );
    row(
        "  cold starts / instances started",
        vec![format!("{} / {}", burst.cold_starts, burst.instances)],
    );
    row(
        "  TTFB median / max",
        vec![format!("{} / {}", ms(burst.p50), ms(burst.max))],
    );
}

/// Shows the maps the way a user would look at them, while they still exist.
fn inspect(ctx: &Ctx) {
    let pin = ctx.env.pin_path.display().to_string();
    println!("\n=== Inspecting the datapath (removed again on exit) ===\n");
    println!("$ bpftool map dump pinned {pin}/SERVICES");
    match std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned", &format!("{pin}/SERVICES")])
        .output()
    {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("(bpftool: {e})"),
    }
    println!("\n$ redirector status --pin-path {pin}");
    match ctx.env.redirector(&["status", "--pin-path", &pin]) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("({e:#})"),
    }
}
