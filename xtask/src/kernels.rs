//! `cargo xtask kernels` / `cargo xtask test --kernel V`: the test suites on the kernels users
//! run, each booted under qemu (KVM when usable, TCG otherwise) with Debian's own kernel
//! package. The VM's root is the host's own root, shared read-only over virtio-9p (the way
//! virtme does it), so the test binaries, iproute2, bpftool and iptables are the ones this
//! machine built and installed; only the kernel and its modules come from the package. One
//! line per kernel; any failure fails the task.
mod fetch;
mod initramfs;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo, redirector_bin, run, target_dir, workspace_root};

pub use fetch::DEFAULT;

/// Debian packages the VMs need on the host.
pub const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

/// Modules the guest loads up front (the rest load on demand through the kernel's modprobe).
const GUEST_MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "nf_conntrack",
    "xt_conntrack",
    "iptable_filter",
    "iptable_nat",
    "ip6table_filter",
    "nf_tables",
];

#[derive(clap::Args, Debug, Clone)]
pub struct KernelArgs {
    /// Kernel series to run (repeatable or comma-separated); default: the whole matrix.
    #[arg(long = "kernel", value_delimiter = ',')]
    pub kernels: Vec<String>,
    /// Series that also boot once with `lockdown=confidentiality` (one more VM each, running
    /// the load and datapath suites).
    #[arg(long = "lockdown", value_delimiter = ',')]
    pub lockdown: Vec<String>,
    /// Time budget of one VM, boot and suites together, in seconds.
    #[arg(long, default_value_t = 1200)]
    pub budget_secs: u64,
    /// Print the matrix and exit.
    #[arg(long)]
    pub list: bool,
}

/// One suite: a test binary (by cargo target name) with its arguments.
struct Suite {
    name: &'static str,
    package: &'static str,
    test: &'static str,
    args: &'static str,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "test_run",
        package: "redirector",
        test: "test_run",
        args: "--test-threads=1",
    },
    Suite {
        name: "kernel",
        package: "redirector-tests",
        test: "kernel",
        args: "--test-threads=1",
    },
    Suite {
        name: "datapath",
        package: "redirector-tests",
        test: "datapath",
        args: "--test-threads=1",
    },
    Suite {
        name: "checksums",
        package: "redirector-tests",
        test: "checksums",
        args: "--test-threads=1",
    },
    // Two of the socket-path tests (each builds a cluster, ~1 min under TCG): the socket
    // hooks on both families and protocols beside kube-proxy's INVALID drop, and sk_lookup
    // with per-service activator ports on both paths.
    Suite {
        name: "sockets",
        package: "redirector-tests",
        test: "sockets",
        args: "--test-threads=1 serve_at_the_socket one_client_port_to_two_proxied_vips",
    },
];

/// Suites that run in the lockdown VM (no netns topology: only loading and the datapath).
const LOCKDOWN_SUITES: &[&str] = &["test_run", "kernel"];

pub fn run_all(args: &KernelArgs) -> Result<()> {
    if args.list {
        for s in fetch::MATRIX {
            println!("{:6} {:10} {}", s.name, s.suite, s.why);
        }
        return Ok(());
    }
    let names: Vec<String> = if args.kernels.is_empty() {
        fetch::MATRIX.iter().map(|s| s.name.to_owned()).collect()
    } else {
        args.kernels.clone()
    };
    let series: Vec<fetch::Series> = names
        .iter()
        .map(|n| fetch::series(n))
        .collect::<Result<_>>()?;
    crate::bootstrap::packages("kernel VM", PACKAGES)?;
    let bins = build_suites()?;
    let mut lines = Vec::new();
    let mut failed = false;
    for s in series {
        let mut variants = vec![false];
        if args.lockdown.iter().any(|l| l == s.name) {
            variants.push(true);
        }
        for lockdown in variants {
            let r = run_kernel(s, lockdown, &bins, Duration::from_secs(args.budget_secs));
            let line = match r {
                Ok(v) => {
                    failed |= !v.ok;
                    v.line
                }
                Err(e) => {
                    failed = true;
                    format!("{:6} FAILED: {e:#}", s.name)
                }
            };
            println!("[kernels] {line}");
            lines.push(line);
        }
    }
    println!("[kernels] summary");
    for l in &lines {
        println!("  {l}");
    }
    // Kept beside the runs, for the README's table and for CI's artifacts.
    let summary = target_dir().join("kernels").join("summary.txt");
    std::fs::write(&summary, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", summary.display()))?;
    if failed {
        bail!("a kernel of the matrix failed (logs under target/kernels/<series>/run*)");
    }
    Ok(())
}

/// Builds the suites' test binaries and the agent; returns suite name → executable.
fn build_suites() -> Result<Vec<(&'static str, PathBuf)>> {
    run(&mut cargo(&[
        "build",
        "-p",
        "redirector",
        "-p",
        "redirector-tests",
        "--bins",
    ]))?;
    let mut args = vec!["test", "--no-run", "--message-format=json"];
    for s in SUITES {
        args.extend(["-p", s.package, "--test", s.test]);
    }
    let out = cargo(&args)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            v.pointer("/target/name").and_then(|n| n.as_str()),
            v.get("executable").and_then(|e| e.as_str()),
        ) else {
            continue;
        };
        if let Some(s) = SUITES.iter().find(|s| s.test == name) {
            found.push((s.name, PathBuf::from(exe)));
        }
    }
    for s in SUITES {
        if !found.iter().any(|(n, _)| *n == s.name) {
            bail!("cargo built no executable for the suite {}", s.name);
        }
    }
    Ok(found)
}

struct Verdict {
    ok: bool,
    line: String,
}

fn run_kernel(
    s: fetch::Series,
    lockdown: bool,
    bins: &[(&'static str, PathBuf)],
    budget: Duration,
) -> Result<Verdict> {
    let dir = target_dir().join("kernels").join(s.name);
    let k = fetch::fetch(s, &dir)?;
    let run_dir = dir.join(if lockdown { "run-lockdown" } else { "run" });
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let initrd = dir.join("initrd.cpio");
    initramfs::build(&k, &run_dir, &initrd)?;
    write_guest(&run_dir, bins, lockdown)?;
    let console = run_dir.join("console.log");
    let mut cmdline = String::from("console=ttyS0 panic=-1 oops=panic loglevel=4 rdinit=/init");
    if lockdown {
        cmdline.push_str(" lockdown=confidentiality");
    }
    let start = Instant::now();
    // KVM when /dev/kvm opens and qemu can start a guest on it (a nested or restricted
    // /dev/kvm can refuse the CPU's MSRs at once); TCG otherwise.
    let mut accel = if kvm_usable() { "kvm" } else { "tcg" };
    // A guest kernel that panics gets one more boot. Seen twice under TCG on 6.12, both
    // an int3 Oops at a static key being patched (sched_clock_cpu in an initcall;
    // hash_conntrack_raw as nf_conntrack's hooks came up): emulation faults, not results
    // (the programs are verified and cannot panic the kernel). Both consoles are kept.
    let mut panic_retries = 1;
    let status = loop {
        println!(
            "[kernels] {}: booting {} ({accel}{})",
            s.name,
            k.package,
            if lockdown { ", lockdown" } else { "" }
        );
        let mut qemu = qemu_command(&k, &initrd, &run_dir, &console, &cmdline, accel)?;
        let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
        let status = wait_within(&mut child, budget.saturating_sub(start.elapsed()))?;
        let booted = run_dir.join("vm.txt").exists();
        if accel == "kvm" && !booted && status.is_some_and(|st| !st.success()) {
            println!("[kernels] {}: KVM refused the guest; using TCG", s.name);
            accel = "tcg";
            continue;
        }
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        if panic_retries > 0 && guest_panicked(&console_text) {
            panic_retries -= 1;
            let kept = run_dir.join("console-panic.log");
            let _ = std::fs::rename(&console, &kept);
            clear_results(&run_dir);
            println!(
                "[kernels] {}: the guest kernel panicked{} (console: {}); booting again",
                s.name,
                if booted { "" } else { " before our init ran" },
                kept.display()
            );
            continue;
        }
        break status;
    };
    let took = start.elapsed().as_secs();
    let label = format!(
        "{:6} {}{}",
        s.name,
        k.release,
        if lockdown { " lockdown" } else { "" }
    );
    if status.is_none() {
        return Ok(Verdict {
            ok: false,
            line: format!(
                "{label}: over its budget of {} s (console: {})",
                budget.as_secs(),
                console.display()
            ),
        });
    }
    let suites: Vec<&str> = bins
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !lockdown || LOCKDOWN_SUITES.contains(n))
        .collect();
    let mut ok = true;
    let mut parts = Vec::new();
    for name in suites {
        let rc = std::fs::read_to_string(run_dir.join(format!("{name}.rc"))).ok();
        let log = std::fs::read_to_string(run_dir.join(format!("{name}.log"))).unwrap_or_default();
        let (passed, failed) = libtest_counts(&log);
        let good = rc
            .as_deref()
            .is_some_and(|r| r.split_whitespace().next() == Some("0"))
            && failed == 0
            && passed > 0;
        ok &= good;
        let secs = rc
            .as_deref()
            .and_then(|r| r.split_whitespace().nth(1))
            .unwrap_or("?");
        parts.push(format!(
            "{name} {passed}/{} {}s{}",
            passed + failed,
            secs,
            if good { "" } else { " FAILED" }
        ));
    }
    let hooks = hooks_used(&run_dir);
    Ok(Verdict {
        ok,
        line: format!("{label}: {} | {hooks} | {took} s", parts.join(", ")),
    })
}

/// Writes the guest script and its suite list into the run directory.
fn write_guest(run_dir: &Path, bins: &[(&'static str, PathBuf)], lockdown: bool) -> Result<()> {
    std::fs::write(run_dir.join("guest.sh"), include_str!("kernels/guest.sh"))?;
    std::fs::write(run_dir.join("modules"), GUEST_MODULES.join("\n"))?;
    let agent = redirector_bin("debug");
    let root = workspace_root();
    let mut suites = String::new();
    // The kernel's features as the agent probes them, first.
    suites.push_str(&format!("probe\t{} probe\n", agent.display()));
    for (name, exe) in bins {
        if lockdown && !LOCKDOWN_SUITES.contains(name) {
            continue;
        }
        let args = SUITES
            .iter()
            .find(|s| s.name == *name)
            .map(|s| s.args)
            .unwrap_or("");
        suites.push_str(&format!(
            "{name}\tcd {} && REDIRECTOR_BIN={} RUST_LOG=info {} {args}\n",
            root.display(),
            agent.display(),
            exe.display()
        ));
    }
    std::fs::write(run_dir.join("suites"), suites)?;
    Ok(())
}

/// `test result: ok. 12 passed; 0 failed; ...` lines of a libtest log, summed.
fn libtest_counts(log: &str) -> (u32, u32) {
    let mut passed = 0;
    let mut failed = 0;
    for line in log.lines().filter(|l| l.starts_with("test result:")) {
        let num = |what: &str| -> u32 {
            line.split(';')
                .find(|p| p.trim_end().ends_with(what))
                .and_then(|p| p.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        passed += num("passed");
        failed += num("failed");
    }
    (passed, failed)
}

/// What the agent's probe said about the kernel (`redirector probe` output, one line).
fn hooks_used(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("probe.log"))
        .ok()
        .and_then(|t| t.lines().find(|l| l.contains("tc=")).map(str::to_owned))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "probe: no output".to_owned())
}

/// The qemu command of one boot: the host's root read-only as `hostroot`, the run
/// directory writable as `out`, no network device, the console into `console`.
fn qemu_command(
    k: &fetch::Kernel,
    initrd: &Path,
    run_dir: &Path,
    console: &Path,
    cmdline: &str,
    accel: &str,
) -> Result<Command> {
    let (accel, cpu) = if accel == "kvm" {
        ("kvm", "host")
    } else {
        ("tcg,thread=multi", "max")
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-accel", accel, "-cpu", cpu, "-smp", "2", "-m", "3072"])
    .arg("-kernel")
    .arg(k.vmlinuz())
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=out,security_model=none,multidevs=remap",
        run_dir.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(run_dir.join("qemu.log"))?);
    Ok(qemu)
}

/// Whether the guest kernel panicked (its console says so).
fn guest_panicked(console: &str) -> bool {
    console.contains("Kernel panic")
}

/// Removes a run's results (the suites' logs and return codes, `vm.txt`) before it runs
/// again; the guest script, its suite list and the kept consoles stay.
fn clear_results(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let result = name == "vm.txt"
            || name.ends_with(".rc")
            || (name.ends_with(".log") && !name.starts_with("console"));
        if result {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Waits for the VM to power off; kills it past `budget` (then `None`).
fn wait_within(
    child: &mut std::process::Child,
    budget: Duration,
) -> Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if start.elapsed() > budget {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::{clear_results, guest_panicked};

    #[test]
    fn a_panicked_guest_is_retried_with_its_results_cleared() {
        assert!(guest_panicked(
            "[  179.02] Kernel panic - not syncing: Fatal exception in interrupt"
        ));
        // A guest that powered off without a panic (a missing module, say) is not retried.
        assert!(!guest_panicked("reboot: Power down"));
        let dir = std::env::temp_dir().join(format!("xtask-clear-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keep = ["guest.sh", "suites", "console-panic.log", "console.log"];
        let gone = ["vm.txt", "probe.rc", "datapath.log", "qemu.log"];
        for f in keep.iter().chain(&gone) {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        clear_results(&dir);
        for f in keep {
            assert!(dir.join(f).exists(), "{f} kept");
        }
        for f in gone {
            assert!(!dir.join(f).exists(), "{f} removed");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
