//! The agent under test: a generated TOML config, `nsenter --net=<node> redirector agent`
//! with a unique pin path, the ready file, SIGTERM, `status --json`, uninstall on drop.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::netns::{wait_for, Netns, Proc};

/// The agent binary: `$REDIRECTOR_BIN`, else `<workspace>/target/debug/redirector`.
pub fn redirector_bin() -> PathBuf {
    match std::env::var_os("REDIRECTOR_BIN") {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirector"),
    }
}

/// A private, checked copy of the agent binary for one test: a hard link next to it (a copy
/// in `dir` if linking fails), so a concurrent rebuild of `target/debug/redirector` (or the
/// `redirector-ebpf` host stub of the same name overwriting it) can't change the binary
/// under a running test. Removed on drop.
pub struct AgentBin(pub PathBuf);

impl AgentBin {
    pub fn new(dir: &Path, tag: &str) -> Result<Self> {
        let src = redirector_bin();
        let linked = src.with_file_name(format!(".{tag}-redirector"));
        let _ = std::fs::remove_file(&linked);
        let path = if std::fs::hard_link(&src, &linked).is_ok() {
            linked
        } else {
            let copy = dir.join("redirector");
            std::fs::copy(&src, &copy)
                .with_context(|| format!("copying {} to {}", src.display(), copy.display()))?;
            copy
        };
        let bin = AgentBin(path);
        let out = Command::new(&bin.0).arg("--version").output()?;
        let v = String::from_utf8_lossy(&out.stdout);
        if !v.starts_with("redirector ") {
            bail!(
                "{} is not the agent (`--version` printed {v:?}); build it with \
                 `cargo build -p redirector` or set REDIRECTOR_BIN",
                src.display()
            );
        }
        Ok(bin)
    }
}

impl Drop for AgentBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One `[[service]]`.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub port: u16,
    pub proto: Proto,
    pub proxy: bool,
    pub backends: Vec<SocketAddr>,
}

/// A whole agent config file.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub uplink: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub pin_path: PathBuf,
    pub activator: Vec<SocketAddr>,
    pub services: Vec<ServiceSpec>,
    /// `[maps]` capacities; `None` leaves the defaults.
    pub maps: Option<MapsSpec>,
    /// `host_routing = "bpf"` (else the default, kernel).
    pub host_routing_bpf: bool,
    /// `cgroup`: where the socket hooks attach; `None`: "off" (a test agent must never hook
    /// the whole machine's sockets: other tests run beside it).
    pub cgroup: Option<PathBuf>,
    /// `[activator] listen`: false where a stand-in server holds the activator's address
    /// (the agent's own listener, on loopback and steered there, would take its flows).
    pub activator_listen: bool,
}

/// The `[maps]` section: map capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsSpec {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

fn quoted<T: ToString>(items: &[T]) -> String {
    let v: Vec<String> = items
        .iter()
        .map(|i| format!("\"{}\"", i.to_string()))
        .collect();
    format!("[{}]", v.join(", "))
}

impl AgentConfig {
    pub fn service_mut(&mut self, name: &str) -> &mut ServiceSpec {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[node]");
        let _ = writeln!(s, "uplink = {}", quoted(&self.uplink));
        let _ = writeln!(s, "pod_interfaces = {}", quoted(&self.pod_interfaces));
        let _ = writeln!(s, "pin_path = \"{}\"", self.pin_path.display());
        let _ = writeln!(s, "activator = {}", quoted(&self.activator));
        if self.host_routing_bpf {
            let _ = writeln!(s, "host_routing = \"bpf\"");
        }
        match &self.cgroup {
            Some(p) => writeln!(s, "cgroup = \"{}\"", p.display()),
            None => writeln!(s, "cgroup = \"off\""),
        }
        .ok();
        if let Some(m) = &self.maps {
            let _ = writeln!(s, "\n[maps]");
            let _ = writeln!(s, "services = {}", m.services);
            let _ = writeln!(s, "backends = {}", m.backends);
            let _ = writeln!(s, "conntrack = {}", m.conntrack);
        }
        if !self.activator_listen {
            let _ = writeln!(s, "\n[activator]\nlisten = false");
        }
        for svc in &self.services {
            let _ = writeln!(s, "\n[[service]]");
            let _ = writeln!(s, "name = \"{}\"", svc.name);
            let _ = writeln!(s, "namespace = \"rt\"");
            let _ = writeln!(s, "vip = {}", quoted(&svc.vips));
            let _ = writeln!(s, "port = {}", svc.port);
            let proto = if svc.proto == Proto::Tcp {
                "tcp"
            } else {
                "udp"
            };
            let _ = writeln!(s, "protocol = \"{proto}\"");
            let mode = if svc.proxy { "proxy" } else { "serve" };
            let _ = writeln!(s, "mode = \"{mode}\"");
            let _ = writeln!(s, "backends = {}", quoted(&svc.backends));
        }
        s
    }
}

/// A running (or stopped) agent in a node namespace. Drop stops it and uninstalls.
pub struct Agent {
    pub label: String,
    /// The agent binary (see [`AgentBin`]).
    pub bin: PathBuf,
    pub ns_path: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub pin_path: PathBuf,
    pub log_path: PathBuf,
    ready_path: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Agent {
    /// Writes the config into `dir` and starts the agent in `node`; waits for the ready file.
    pub fn start(
        bin: &Path,
        node: &Netns,
        dir: &Path,
        label: &str,
        cfg: &AgentConfig,
    ) -> Result<Self> {
        let mut a = Agent {
            label: label.to_owned(),
            bin: bin.to_owned(),
            ns_path: node.path(),
            dir: dir.to_owned(),
            config_path: dir.join(format!("{label}.toml")),
            pin_path: cfg.pin_path.clone(),
            log_path: dir.join(format!("{label}.log")),
            ready_path: dir.join(format!("{label}.ready")),
            proc: None,
            starts: 0,
        };
        a.write_config(cfg)?;
        a.spawn()?;
        Ok(a)
    }

    /// Starts the agent process (again) on the same config and pin path.
    pub fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.ready_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        self.starts += 1;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .arg(&self.bin)
            .arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--ready-file")
            .arg(&self.ready_path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,redirector::datapath::sockets=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.proc = Some(Proc {
            child,
            what: format!("agent {}", self.label),
        });
        let ready = self.ready_path.clone();
        let res = wait_for("the agent's ready file", Duration::from_secs(60), || {
            if ready.exists() {
                return Some(Ok(()));
            }
            let p = self.proc.as_mut()?;
            if !p.alive() {
                return Some(Err(()));
            }
            None
        });
        match res {
            Ok(Ok(())) => Ok(()),
            _ => bail!(
                "agent {} did not become ready; log:\n{}",
                self.label,
                self.log()
            ),
        }
    }

    /// SIGTERM and wait for the exit (programs stay attached).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            if !p.signal_and_wait(libc::SIGTERM, Duration::from_secs(20)) {
                bail!("agent {} ignored SIGTERM", self.label);
            }
            let st = p.child.wait()?;
            if !st.success() {
                bail!(
                    "agent {} exited with {st}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
        }
        Ok(())
    }

    /// Is the agent process running?
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.alive())
    }

    /// Replaces the config file atomically (write + rename: the agent never reads half a file).
    pub fn write_config(&self, cfg: &AgentConfig) -> Result<()> {
        self.write_raw_config(&cfg.to_toml())
    }

    pub fn write_raw_config(&self, text: &str) -> Result<()> {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// The agent's log so far (ANSI escapes removed).
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        strip_ansi(&raw)
    }

    /// `redirector status --pin-path P --json`.
    pub fn status(&self) -> Result<Value> {
        status(&self.bin, &self.pin_path)
    }

    /// Waits until `pred` holds for the status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_for(what, timeout, || self.status().ok().filter(|s| pred(s)))
            .with_context(|| format!("agent {} log:\n{}", self.label, self.log()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- agent {} log (last lines) ---\n{}",
                self.label,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut p) = self.proc.take() {
            if !p.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)) {
                let _ = p.child.kill();
            }
        }
        let _ = Command::new(&self.bin)
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `redirector status --pin-path P --json`, parsed.
pub fn status(bin: &Path, pin_path: &Path) -> Result<Value> {
    let out = Command::new(bin)
        .arg("status")
        .arg("--pin-path")
        .arg(pin_path)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!(
            "redirector status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The status entries of service `name` (one per VIP), matched on `namespace/name` or name.
pub fn service_entries<'a>(status: &'a Value, name: &str) -> Vec<&'a Value> {
    status["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| {
                    let n = s["name"].as_str().unwrap_or("");
                    n == name || n.rsplit('/').next() == Some(name)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// True when every entry of service `name` is in `mode` ("serve"/"proxy") and there is at
/// least one.
pub fn service_mode_is(status: &Value, name: &str, mode: &str) -> bool {
    let e = service_entries(status, name);
    !e.is_empty() && e.iter().all(|s| s["mode"] == mode)
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
