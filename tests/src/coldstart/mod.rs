//! Harness for the activator / scale-from-zero tests: one node namespace running the agent
//! (activator on `10.244.0.1:8012`, metrics on `10.244.0.1:9090`, instances from
//! `10.244.1.0/24`), one client namespace attached by veth (`10.244.0.10`), a generated
//! config with `[service.scale]` sections, and cleanup of everything on drop (also on panic):
//! agent, instance processes and namespaces, client and node namespaces, pinned maps.
//!
//! Self-contained (only std, libc, serde_json): the names of namespaces and pin paths are
//! unique per process and call, so tests run in parallel.
pub mod net;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

pub use net::Resp;

pub const ACTIVATOR: &str = "10.244.0.1:8012";
pub const METRICS: &str = "10.244.0.1:9090";
pub const CLIENT_IP: &str = "10.244.0.10";
/// Kubernetes-style namespace of every service in the generated config.
pub const NAMESPACE: &str = "rt";

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The agent binary: `$REDIRECTOR_BIN`, else `<workspace>/target/debug/redirector`.
pub fn redirector_bin() -> PathBuf {
    match std::env::var_os("REDIRECTOR_BIN") {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirector"),
    }
}

/// The demo app, next to the agent binary (`<target>/debug/redirector-hello`).
pub fn hello_bin() -> PathBuf {
    let p = redirector_bin().with_file_name("redirector-hello");
    if p.exists() {
        p
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirector-hello")
    }
}

/// Fails clearly when the agent binary is not the agent: `redirector-ebpf` builds a host
/// stub also named `redirector` into the same target directory (`cargo build --workspace`),
/// and whichever is linked last wins.
pub fn check_agent_bin() -> Result<()> {
    let bin = redirector_bin();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let v = String::from_utf8_lossy(&out.stdout);
    if !v.starts_with("redirector ") {
        bail!(
            "{} is not the agent (`--version` printed {v:?}); it is probably the host stub of \
             redirector-ebpf, which has the same binary name: `cargo build -p redirector`",
            bin.display()
        );
    }
    Ok(())
}

/// A name unique to this process and call.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("rc{tag}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &str) -> Result<String> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Polls `f` every 25 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `[service.scale]`.
#[derive(Debug, Clone)]
pub struct Scale {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub port: u16,
    pub min_scale: u32,
    pub max_scale: u32,
    pub container_concurrency: u32,
    pub target_concurrency: f64,
    pub target_burst_capacity: f64,
    pub idle_timeout_secs: f64,
    pub stable_window_secs: f64,
    pub readiness: String,
    pub env: Vec<(String, String)>,
    /// `startup_timeout_secs` (the agent's default when `None`).
    pub startup_timeout_secs: Option<f64>,
}

impl Scale {
    /// The hello app on port 8080 with `env`; defaults otherwise (idle 30 s).
    pub fn hello(env: &[(&str, &str)]) -> Self {
        Self::of(hello_bin(), env)
    }

    pub fn of(command: PathBuf, env: &[(&str, &str)]) -> Self {
        Self {
            command,
            args: Vec::new(),
            port: 8080,
            min_scale: 0,
            max_scale: 10,
            container_concurrency: 0,
            target_concurrency: 100.0,
            target_burst_capacity: 0.0,
            idle_timeout_secs: 30.0,
            stable_window_secs: 10.0,
            readiness: "tcp".into(),
            startup_timeout_secs: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// One `[[service]]` (always in namespace [`NAMESPACE`], starting in Proxy mode).
#[derive(Debug, Clone)]
pub struct Svc {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub timeout_secs: Option<f64>,
    pub scale: Option<Scale>,
}

impl Svc {
    pub fn new(name: &str, vip: &str, scale: Scale) -> Self {
        Self {
            name: name.into(),
            vip: vip.into(),
            port: 80,
            protocol: "http".into(),
            timeout_secs: None,
            scale: Some(scale),
        }
    }

    /// `rt/<name>`, the key in /status.
    pub fn full_name(&self) -> String {
        format!("{NAMESPACE}/{}", self.name)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("{}:{}", self.vip, self.port).parse().unwrap()
    }
}

/// The whole config: services plus `[activator]` settings (raw `key = value` lines).
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub services: Vec<Svc>,
    pub activator: Vec<String>,
}

impl Config {
    pub fn one(svc: Svc) -> Self {
        Self {
            services: vec![svc],
            activator: Vec::new(),
        }
    }

    pub fn to_toml(&self, pin_path: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "[node]\nuplink = []\npod_interfaces = [\"rdp-*\"]\ncgroup = \"off\""
        );
        let _ = writeln!(s, "pin_path = \"{}\"", pin_path.display());
        let _ = writeln!(s, "activator = \"{ACTIVATOR}\"\nmetrics = \"{METRICS}\"");
        let _ = writeln!(s, "instance_cidr = \"10.244.1.0/24\"");
        if !self.activator.is_empty() {
            let _ = writeln!(s, "\n[activator]\n{}", self.activator.join("\n"));
        }
        for svc in &self.services {
            let _ = writeln!(s, "\n[[service]]\nname = \"{}\"", svc.name);
            let _ = writeln!(s, "namespace = \"{NAMESPACE}\"\nvip = \"{}\"", svc.vip);
            let _ = writeln!(s, "port = {}\nprotocol = \"{}\"", svc.port, svc.protocol);
            let _ = writeln!(s, "mode = \"proxy\"");
            if let Some(t) = svc.timeout_secs {
                let _ = writeln!(s, "timeout_secs = {t:?}");
            }
            let Some(sc) = &svc.scale else { continue };
            let _ = writeln!(s, "\n[service.scale]\ncommand = {:?}", sc.command.display());
            let _ = writeln!(s, "args = {:?}\nport = {}", sc.args, sc.port);
            let _ = writeln!(
                s,
                "min_scale = {}\nmax_scale = {}\ncontainer_concurrency = {}",
                sc.min_scale, sc.max_scale, sc.container_concurrency
            );
            let _ = writeln!(
                s,
                "target_concurrency = {:?}\ntarget_burst_capacity = {:?}",
                sc.target_concurrency, sc.target_burst_capacity
            );
            let _ = writeln!(
                s,
                "idle_timeout_secs = {:?}\nstable_window_secs = {:?}\nreadiness = {:?}",
                sc.idle_timeout_secs, sc.stable_window_secs, sc.readiness
            );
            if let Some(t) = sc.startup_timeout_secs {
                let _ = writeln!(s, "startup_timeout_secs = {t:?}");
            }
            let env: Vec<String> = sc.env.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
            let _ = writeln!(s, "env = {{ {} }}", env.join(", "));
        }
        s
    }
}

/// Node and client namespaces with the agent running in the node. Drop cleans up.
pub struct Env {
    pub node: String,
    pub client: String,
    pub dir: PathBuf,
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    agent: Option<Child>,
    agent_pid: u32,
}

impl Env {
    /// Creates the namespaces and starts the agent on `cfg`; waits for its ready file.
    pub fn start(tag: &str, cfg: &Config) -> Result<Self> {
        check_agent_bin()?;
        let id = unique(tag);
        let dir = std::env::temp_dir().join(format!("{id}-dir"));
        std::fs::create_dir_all(&dir)?;
        let mut env = Env {
            node: format!("{id}-n"),
            client: format!("{id}-c"),
            config_path: dir.join("agent.toml"),
            log_path: dir.join("agent.log"),
            dir,
            pin_path: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            agent: None,
            agent_pid: 0,
        };
        env.topology()?;
        env.write_config(&cfg.to_toml(&env.pin_path))?;
        env.spawn_agent()?;
        Ok(env)
    }

    fn topology(&self) -> Result<()> {
        let (n, c) = (&self.node, &self.client);
        for ns in [n, c] {
            let _ = ip(&format!("netns del {ns}"));
            ip(&format!("netns add {ns}"))?;
            ip(&format!("-n {ns} link set lo up"))?;
        }
        run(
            "ip",
            &["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )?;
        ip(&format!("-n {n} addr add 10.244.0.1/32 dev lo"))?;
        ip(&format!(
            "link add rdp-cli netns {n} type veth peer name eth0 netns {c}"
        ))?;
        ip(&format!("-n {n} link set rdp-cli up"))?;
        ip(&format!("-n {n} route add {CLIENT_IP}/32 dev rdp-cli"))?;
        ip(&format!("-n {c} link set eth0 up"))?;
        ip(&format!("-n {c} addr add {CLIENT_IP}/32 dev eth0"))?;
        ip(&format!("-n {c} route add 10.244.0.1 dev eth0"))?;
        ip(&format!("-n {c} route add default via 10.244.0.1 dev eth0"))?;
        Ok(())
    }

    fn spawn_agent(&mut self) -> Result<()> {
        let ready = self.dir.join("agent.ready");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg(redirector_bin())
            .arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&ready)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,redirector=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", redirector_bin().display()))?;
        self.agent_pid = child.id();
        self.agent = Some(child);
        let res = wait_for("the agent's ready file", Duration::from_secs(60), || {
            if ready.exists() {
                return Some(true);
            }
            (!self.agent_alive()).then_some(false)
        });
        match res {
            Ok(true) => Ok(()),
            _ => bail!("agent did not become ready; log:\n{}", self.log()),
        }
    }

    /// The agent's pid (nsenter execs it).
    pub fn agent_pid(&self) -> u32 {
        self.agent_pid
    }

    pub fn agent_alive(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Replaces the config file atomically.
    pub fn write_config(&self, text: &str) -> Result<()> {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's /status (fetched from inside the node namespace).
    pub fn status(&self) -> Result<Value> {
        let r = net::get(
            &self.node,
            METRICS.parse()?,
            "/status",
            Duration::from_secs(5),
        )?;
        if r.status != 200 {
            bail!("/status answered {}: {}", r.status, r.body);
        }
        Ok(serde_json::from_str(&r.body)?)
    }

    /// The scaler's part of /status for `svc` (`rt/<name>`).
    pub fn scaler(&self, svc: &Svc) -> Result<Value> {
        Ok(self.status()?["scalers"][svc.full_name()].clone())
    }

    /// The activator's part of /status for `svc`.
    pub fn activator(&self, svc: &Svc) -> Result<Value> {
        Ok(self.status()?["activator"][svc.full_name()].clone())
    }

    /// Waits until `pred` holds for the whole /status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(what, timeout, || {
            let s = self.status().ok()?;
            let ok = pred(&s);
            last = s.clone();
            ok.then_some(s)
        })
        .with_context(|| format!("last /status: {last}"))
    }

    /// `GET path` to `addr` from the client namespace.
    pub fn get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<Resp> {
        net::get(&self.client, addr, path, timeout)
    }

    /// PIDs of the processes in instance namespace `ns`.
    pub fn instance_pids(ns: &str) -> Vec<i32> {
        run("ip", &["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Instance namespaces of this agent (`rdi-<pid tag>-<n>`).
    pub fn instance_netns(&self) -> Vec<String> {
        let prefix = format!("rdi-{}-", self.agent_pid % 100_000);
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Instance namespaces that have a process in them (the agent also keeps one empty,
    /// prepared sandbox per scaled service so a cold start only starts the process).
    pub fn running_instances(&self) -> Vec<String> {
        self.instance_netns()
            .into_iter()
            .filter(|ns| {
                std::process::Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                    .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- agent log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut c) = self.agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever the agent left behind: instance processes and their namespaces.
        for ns in self.instance_netns() {
            for pid in Self::instance_pids(&ns) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = ip(&format!("netns del {ns}"));
        }
        let _ = Command::new(redirector_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // If the binary could not run (e.g. being rebuilt), remove the pins by hand.
        let _ = std::fs::remove_dir_all(&self.pin_path);
        let _ = ip(&format!("netns del {}", self.client));
        let _ = ip(&format!("netns del {}", self.node));
        if std::thread::panicking() {
            eprintln!("agent log kept: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
