//! `cargo xtask bootstrap`: makes a fresh Debian bookworm machine ready to build and test
//! redirector. Every step checks first and does nothing when already satisfied, so this is
//! cheap to run before every build or test.
use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, probe, run};

/// The nightly toolchain aya-build compiles the eBPF crate with (`cargo +nightly`). Only
/// installed when absent, never updated: newer nightlies may break the pinned aya.
pub const NIGHTLY: &str = "nightly";
/// bpf-linker release that links the eBPF object.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Cargo feature of bpf-linker selecting the LLVM it links against.
pub const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Where the Debian LLVM packages below install LLVM.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages bpf-linker builds against (only needed when it must be installed).
pub const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages the tests, the demo and the perf runs use.
pub const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "ethtool",
    "iproute2",
    "iptables",
    "nftables",
    "wrk",
    "nginx",
    "haproxy",
    "iperf3",
    "tshark",
    "curl",
    "procps",
    "util-linux",
    // promtool: the /metrics test checks the real output with Prometheus's own parser
    "prometheus",
];
/// Where bpffs must be mounted (the agent pins its maps below it).
pub const BPFFS: &str = "/sys/fs/bpf";

fn step(msg: impl std::fmt::Display) {
    println!("[bootstrap] {msg}");
}

pub fn run_all() -> Result<()> {
    let linker_ok = bpf_linker_version().is_some_and(|v| same_minor(&v, BPF_LINKER_VERSION));
    apt_packages(!linker_ok)?;
    nightly()?;
    rust_src()?;
    bpf_linker(linker_ok)?;
    cargo_fuzz()?;
    bpffs()?;
    step("done");
    Ok(())
}

/// Debian packages only `cargo xtask image` needs: buildah (images without a Docker engine)
/// and musl-tools (`musl-gcc`, for ring's C code in the static binary).
pub const IMAGE_PACKAGES: &[&str] = &["buildah", "musl-tools"];

/// What `cargo xtask image` needs beyond [`run_all`]: [`IMAGE_PACKAGES`] and the rustup
/// target of the static binary (`<arch>-unknown-linux-musl`).
pub fn image_tools(musl_target: &str) -> Result<()> {
    packages("image", IMAGE_PACKAGES)?;
    let installed = probe("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == musl_target) {
        step(format_args!("rust target {musl_target}: present"));
        return Ok(());
    }
    step(format_args!("rust target {musl_target}: installing…"));
    run(Command::new("rustup").args(["target", "add", musl_target]))
}

/// Installs the Debian packages of `list` that are missing (for tasks beyond the common set).
pub fn packages(what: &str, list: &[&str]) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        step(format_args!(
            "{what} packages ({}): present",
            list.join(" ")
        ));
        return Ok(());
    }
    step(format_args!(
        "{what} packages: installing {}…",
        missing.join(" ")
    ));
    need_root("installing apt packages")?;
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"])
        .args(&missing))
}

/// Fails with a clear message when a step has work to do but we are not root.
fn need_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run `cargo xtask bootstrap` as root");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    probe("dpkg-query", &["-W", "-f=${Status}", pkg]).is_some_and(|s| s.ends_with("ok installed"))
}

/// Step (a): Debian packages, with one `apt-get update` when anything is missing.
fn apt_packages(with_llvm: bool) -> Result<()> {
    let mut wanted: Vec<&str> = TOOL_PACKAGES.to_vec();
    if with_llvm {
        wanted.extend_from_slice(LLVM_PACKAGES);
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        step(format_args!("apt packages ({}): present", wanted.len()));
        return Ok(());
    }
    step(format_args!(
        "apt packages: installing {}…",
        missing.join(" ")
    ));
    need_root("installing apt packages")?;
    if missing.contains(&"tshark") {
        // Otherwise wireshark-common asks whether non-root users may capture.
        debconf_set("wireshark-common wireshark-common/install-setuid boolean false\n")?;
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"])
        .args(&missing);
    run(&mut install).with_context(|| {
        if with_llvm {
            format!(
                "installing {} (bpf-linker needs LLVM 22 from the Debian archive)",
                missing.join(" ")
            )
        } else {
            format!("installing {}", missing.join(" "))
        }
    })?;
    Ok(())
}

fn debconf_set(selection: &str) -> Result<()> {
    println!("+ echo {:?} | debconf-set-selections", selection.trim_end());
    let mut child = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("failed to start debconf-set-selections")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(selection.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("debconf-set-selections failed ({status})");
    }
    Ok(())
}

/// True when rustup knows a toolchain that `+nightly` resolves to (`nightly-<host>`, not a
/// dated `nightly-YYYY-MM-DD-<host>`).
fn nightly_installed() -> Result<bool> {
    let list = probe("rustup", &["toolchain", "list"])
        .context("`rustup toolchain list` failed: is rustup installed (https://rustup.rs)?")?;
    Ok(list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name == NIGHTLY
            || name
                .strip_prefix("nightly-")
                .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    }))
}

/// Step (b1): the nightly toolchain.
fn nightly() -> Result<()> {
    if nightly_installed()? {
        let version = probe("rustc", &[&format!("+{NIGHTLY}"), "--version"]).unwrap_or_default();
        step(format_args!("{NIGHTLY} toolchain: present ({version})"));
        return Ok(());
    }
    step(format_args!("{NIGHTLY} toolchain: installing…"));
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

/// Step (b2): rust-src for nightly (the eBPF target has no prebuilt std/core).
fn rust_src() -> Result<()> {
    let installed = probe(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    )
    .unwrap_or_default();
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        step(format_args!("rust-src for {NIGHTLY}: present"));
        return Ok(());
    }
    step(format_args!("rust-src for {NIGHTLY}: installing…"));
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The version `bpf-linker --version` reports, if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = probe("bpf-linker", &["--version"])?;
    // "bpf-linker 0.13.0"
    out.split_whitespace().nth(1).map(str::to_string)
}

/// Same major.minor ("0.13.x" matches "0.13.0").
fn same_minor(have: &str, want: &str) -> bool {
    fn major_minor(v: &str) -> Vec<&str> {
        v.split('.').take(2).collect()
    }
    major_minor(have) == major_minor(want)
}

/// Step (c): bpf-linker, built against the Debian LLVM 22.
fn bpf_linker(ok: bool) -> Result<()> {
    if ok {
        let v = bpf_linker_version().unwrap_or_default();
        step(format_args!("bpf-linker {v}: present"));
        return Ok(());
    }
    match bpf_linker_version() {
        Some(v) => step(format_args!(
            "bpf-linker: found {v}, installing {BPF_LINKER_VERSION}…"
        )),
        None => step(format_args!("bpf-linker {BPF_LINKER_VERSION}: installing…")),
    }
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        BPF_LINKER_LLVM_FEATURE,
    ]);
    run(&mut cmd)?;
    match bpf_linker_version() {
        Some(v) if same_minor(&v, BPF_LINKER_VERSION) => Ok(()),
        Some(v) => bail!("bpf-linker on PATH is still {v}: is ~/.cargo/bin first on PATH?"),
        None => bail!("bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH"),
    }
}

/// Step (c2): cargo-fuzz, for the fuzz step of `cargo xtask test` (fuzz/).
fn cargo_fuzz() -> Result<()> {
    if let Some(v) = probe("cargo", &["fuzz", "--version"]) {
        step(format_args!("{}: present", v.trim()));
        return Ok(());
    }
    step("cargo-fuzz: installing…");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Step (d): bpffs at /sys/fs/bpf.
fn bpffs() -> Result<()> {
    if probe("stat", &["-f", "-c", "%T", BPFFS]).as_deref() == Some("bpf_fs") {
        step(format_args!("bpffs at {BPFFS}: mounted"));
        return Ok(());
    }
    step(format_args!("bpffs at {BPFFS}: mounting…"));
    need_root("mounting bpffs")?;
    if !Path::new(BPFFS).is_dir() {
        std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

#[cfg(test)]
mod tests {
    use super::same_minor;

    #[test]
    fn versions() {
        assert!(same_minor("0.13.0", "0.13.0"));
        assert!(same_minor("0.13.2", "0.13.0"));
        assert!(!same_minor("0.12.9", "0.13.0"));
        assert!(!same_minor("0.1", "0.13.0"));
    }
}
