//! The demo's world: a node namespace running the agent, a client namespace on a veth, and
//! their removal. Everything created is recorded in one global teardown list, emptied by
//! `teardown()`: on the normal path, on errors (Drop) and on SIGINT/SIGTERM (a watcher
//! thread), whichever comes first; the others then find nothing left to do.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::DemoConfig;

pub const NODE_NS: &str = "rdemo-node";
pub const CLIENT_NS: &str = "rdemo-cli";
/// The client's address (the node side of its veth is `rdp-cli`, a pod interface).
pub const CLIENT_ADDR: &str = "10.244.0.10";

/// What is left to remove, in reverse order of creation.
#[derive(Default)]
struct Teardown {
    redirector: PathBuf,
    agent: Option<Child>,
    pin_path: Option<PathBuf>,
    netns: Vec<String>,
    tmp: Option<PathBuf>,
}

static STATE: Mutex<Option<Teardown>> = Mutex::new(None);
static TEARDOWN: Mutex<()> = Mutex::new(());
static SIGNALED: AtomicBool = AtomicBool::new(false);

fn track(f: impl FnOnce(&mut Teardown)) {
    let mut g = STATE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Teardown::default));
}

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag; a watcher thread then tears everything down and exits
/// 130 (the main thread may be blocked in a request or a sleep).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(50));
        if SIGNALED.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: cleaning up");
            teardown();
            std::process::exit(130);
        }
    });
}

/// True once a signal asked the demo to stop.
pub fn interrupted() -> bool {
    SIGNALED.load(Ordering::SeqCst)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// The running demo environment; dropping it tears everything down.
pub struct Env {
    pub redirector: PathBuf,
    pub pin_path: PathBuf,
    pub tmp: PathBuf,
    pub agent_pid: u32,
}

impl Env {
    /// Removes leftovers of an earlier run, builds the namespaces, starts the agent and waits
    /// until it is ready.
    pub fn create(redirector: &Path, cfg: &DemoConfig) -> Result<Self> {
        track(|t| t.redirector = redirector.to_path_buf());
        remove_leftovers(redirector, &cfg.pin_path);
        let tmp = std::env::temp_dir().join(format!("rdemo-{}", std::process::id()));
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        track(|t| t.tmp = Some(tmp.clone()));
        // A private link to the agent binary: another `cargo build` in the workspace may
        // replace target/debug/redirector while the demo runs.
        let private = tmp.join("redirector");
        if fs::hard_link(redirector, &private).is_err() {
            fs::copy(redirector, &private).context("copying the redirector binary")?;
        }
        let redirector = private.as_path();
        track(|t| t.redirector = redirector.to_path_buf());
        let config = tmp.join("demo.toml");
        fs::write(&config, &cfg.rendered)?;

        let node_ip = cfg.activator.ip().to_string();
        for ns in [NODE_NS, CLIENT_NS] {
            ip(&["netns", "add", ns])?;
            track(|t| t.netns.push(ns.to_owned()));
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let n = NODE_NS;
        let c = CLIENT_NS;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{node_ip}/32"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n", n, "link", "add", "rdp-cli", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])?;
        ip(&["-n", n, "link", "set", "rdp-cli", "up"])?;
        ip(&[
            "-n",
            n,
            "route",
            "add",
            &format!("{CLIENT_ADDR}/32"),
            "dev",
            "rdp-cli",
        ])?;
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", c, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            c,
            "route",
            "add",
            &format!("{node_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n", c, "route", "add", "default", "via", &node_ip, "dev", "eth0",
        ])?;
        let sysctl = Command::new("ip")
            .args(["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status()?;
        if !sysctl.success() {
            bail!("enabling ip_forward in {n} failed");
        }

        // nsenter, not `ip netns exec`: the latter remounts /sys and hides the host's bpffs.
        let log = tmp.join("agent.log");
        let ready = tmp.join("agent.ready");
        let logf = fs::File::create(&log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{n}"))
            .arg(redirector)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        // Its own process group: a Ctrl-C reaches only the demo, which stops it in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("starting the agent")?;
        let agent_pid = child.id();
        track(|t| {
            t.agent = Some(child);
            t.pin_path = Some(cfg.pin_path.clone());
        });
        let env = Env {
            redirector: redirector.to_path_buf(),
            pin_path: cfg.pin_path.clone(),
            tmp,
            agent_pid,
        };
        let t0 = Instant::now();
        while !ready.exists() {
            if let Some(status) = agent_exited() {
                env.print_agent_log_tail(30);
                bail!("the agent exited during startup ({status})");
            }
            if t0.elapsed() > Duration::from_secs(60) {
                env.print_agent_log_tail(30);
                bail!("the agent was not ready after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(env)
    }

    pub fn agent_log(&self) -> PathBuf {
        self.tmp.join("agent.log")
    }

    pub fn print_agent_log_tail(&self, lines: usize) {
        let text = fs::read_to_string(self.agent_log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        eprintln!("--- last lines of the agent log ---");
        for l in &all[all.len().saturating_sub(lines)..] {
            eprintln!("{l}");
        }
        eprintln!("-----------------------------------");
    }

    /// Runs `redirector <args>` in the node namespace and returns its stdout.
    pub fn redirector(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NODE_NS}"))
            .arg(&self.redirector)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running redirector")?;
        if !out.status.success() {
            bail!(
                "`redirector {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        teardown();
    }
}

/// The exit status of the agent if it has exited.
fn agent_exited() -> Option<std::process::ExitStatus> {
    let mut g = STATE.lock().unwrap_or_else(|e| e.into_inner());
    g.as_mut()?.agent.as_mut()?.try_wait().ok().flatten()
}

/// Namespaces and pins that a killed earlier run may have left.
fn remove_leftovers(redirector: &Path, pin_path: &Path) {
    let mut found = false;
    if pin_path.exists() {
        found = true;
        uninstall(redirector, pin_path);
    }
    remove_live_status(pin_path);
    for ns in [NODE_NS, CLIENT_NS] {
        if netns_exists(ns) {
            found = true;
            let _ = ip(&["netns", "del", ns]);
        }
    }
    if found {
        println!("(removed leftovers of an earlier demo run)");
    }
}

fn uninstall(redirector: &Path, pin_path: &Path) {
    let mut cmd = if netns_exists(NODE_NS) {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{NODE_NS}")).arg(redirector);
        c
    } else {
        Command::new(redirector)
    };
    let out = cmd
        .arg("uninstall")
        .arg("--pin-path")
        .arg(pin_path)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            print!("  {}", String::from_utf8_lossy(&o.stdout));
        }
        Ok(o) => eprintln!(
            "  redirector uninstall failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("  redirector uninstall: {e}"),
    }
    if pin_path.exists() {
        // Unpinning is unlinking on bpffs.
        let _ = fs::remove_dir_all(pin_path);
    }
}

/// Stops the agent, removes the pins, instance and demo namespaces and the temporary
/// directory. Idempotent: the first caller takes the list, later callers find it empty.
pub fn teardown() {
    // Held for the whole teardown: a second caller (Drop on the main thread while the signal
    // watcher tears down) waits until the first one is done instead of exiting early.
    let _serial = TEARDOWN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = STATE.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    if t.agent.is_none() && t.netns.is_empty() && t.tmp.is_none() {
        return;
    }
    println!("\ncleaning up");
    let mut agent_tag = None;
    if let Some(mut child) = t.agent.take() {
        let pid = child.id();
        agent_tag = Some(pid % 100_000);
        if child.try_wait().ok().flatten().is_none() {
            println!("  stopping the agent (pid {pid}, SIGTERM)");
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    println!("  the agent did not stop in 10 s: SIGKILL; the end of its log:");
                    if let Some(tmp) = &t.tmp {
                        let log = fs::read_to_string(tmp.join("agent.log")).unwrap_or_default();
                        let lines: Vec<&str> = log.lines().collect();
                        for l in &lines[lines.len().saturating_sub(12)..] {
                            println!("    {l}");
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if let Some(pin) = t.pin_path.take() {
        remove_live_status(&pin);
        if pin.exists() {
            println!("  redirector uninstall --pin-path {}", pin.display());
            uninstall(&t.redirector, &pin);
        }
    }
    // Instance namespaces the agent did not remove (it names them rdi-<pid % 100000>-<n>).
    if let Some(tag) = agent_tag {
        let prefix = format!("rdi-{tag}-");
        let names: Vec<String> = fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        for ns in names {
            println!("  removing the leftover instance namespace {ns}");
            kill_netns_pids(&ns);
            let _ = ip(&["netns", "del", &ns]);
        }
    }
    for ns in t.netns.drain(..).rev() {
        println!("  ip netns del {ns}");
        kill_netns_pids(&ns);
        if let Err(e) = ip(&["netns", "del", &ns]) {
            eprintln!("  {e:#}");
        }
    }
    if let Some(tmp) = t.tmp.take() {
        let _ = fs::remove_dir_all(&tmp);
    }
}

/// The agent publishes its live state for `redirector status` to
/// /run/redirector/status<pin path with non-alphanumerics as '_'>.json and leaves it there.
fn remove_live_status(pin_path: &Path) {
    let tag: String = pin_path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = Path::new("/run/redirector");
    let _ = fs::remove_file(dir.join(format!("status{tag}.json")));
    let _ = fs::remove_dir(dir); // only if empty
}

fn kill_netns_pids(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: a plain kill(2) of a process left in a namespace this demo created.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
