//! `cargo xtask image`: the container image the DaemonSet in deploy/ runs.
//!
//! 1. A static binary: `cargo build --release --target <arch>-unknown-linux-musl` (the usual
//!    build.rs embeds the eBPF object); ring's C code is compiled with Debian's `musl-gcc`.
//! 2. An image FROM scratch with buildah (no Docker engine needed; runs as root):
//!    `buildah from scratch`, `buildah copy`, `buildah config --entrypoint '["/redirector"]'`,
//!    `buildah commit`, tagged `localhost/redirector:<crate version>`. The overlay storage
//!    driver is used where it works, vfs otherwise (e.g. inside a container).
//!
//! `--check` then verifies the result: the binary is static (no ELF interpreter) and embeds an
//! eBPF ELF object, the image's entrypoint, OS and architecture, that it holds nothing but
//! `/redirector`, and that the binary inside runs and reports the crate version.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    bootstrap,
    util::{cargo, require_root, run, target_dir},
};

/// The image's repository name; the tag is the crate version.
pub const IMAGE_NAME: &str = "redirector";
/// buildah's working container while building (removed afterwards, and before a new build).
const BUILD_CONTAINER: &str = "redirector-image-build";
const CHECK_CONTAINER: &str = "redirector-image-check";

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// After building, verify the binary and the image (static, eBPF embedded, entrypoint,
    /// contents, `--version`).
    #[arg(long)]
    pub check: bool,
}

/// `x86_64-unknown-linux-musl` on x86_64, `aarch64-unknown-linux-musl` on arm64.
pub fn musl_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The OCI architecture name of this machine.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn version() -> &'static str {
    // xtask takes the workspace version, like redirector.
    env!("CARGO_PKG_VERSION")
}

/// `localhost/redirector:<version>`, as buildah names a local image.
pub fn image_ref() -> String {
    format!("localhost/{IMAGE_NAME}:{}", version())
}

pub fn run_all(args: &ImageArgs) -> Result<()> {
    require_root("image")?;
    let started = Instant::now();
    bootstrap::run_all()?;
    let target = musl_target();
    bootstrap::image_tools(&target)?;
    let t_tools = started.elapsed();

    let t = Instant::now();
    let bin = build_static(&target)?;
    let t_build = t.elapsed();
    let elf = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    check_static(&elf).with_context(|| format!("{} is not a static binary", bin.display()))?;
    ensure!(
        embeds_bpf_object(&elf),
        "{} embeds no eBPF object (EM_BPF ELF): was redirector-ebpf built?",
        bin.display()
    );

    let t = Instant::now();
    let buildah = Buildah::detect()?;
    buildah.build(&bin)?;
    let t_image = t.elapsed();
    if args.check {
        buildah.check()?;
    }

    let size = buildah
        .output(&["images", "--format", "{{.Size}}", &image_ref()])
        .unwrap_or_default();
    let flag = buildah.flag();
    let v = version();
    println!(
        "[image] {} ({}, {} bytes binary) in {:.0?} (tools {:.0?}, static binary {:.0?}, image {:.0?})",
        image_ref(),
        size.trim(),
        elf.len(),
        started.elapsed(),
        t_tools,
        t_build,
        t_image,
    );
    println!(
        "[image] push it to a registry and point deploy/ at it:\n\
         \x20   buildah{flag} push {img} docker://REGISTRY/{IMAGE_NAME}:{v}\n\
         \x20   # deploy/base/kustomization.yaml (or an overlay): images: [{{name: {IMAGE_NAME}, newName: REGISTRY/{IMAGE_NAME}, newTag: \"{v}\"}}]\n\
         [image] or, without a registry, load it on each node as {IMAGE_NAME}:{v}:\n\
         \x20   buildah{flag} push {img} docker-archive:{IMAGE_NAME}-{v}.tar:{IMAGE_NAME}:{v}\n\
         \x20   ctr -n k8s.io images import {IMAGE_NAME}-{v}.tar     # containerd nodes\n\
         \x20   kind load image-archive {IMAGE_NAME}-{v}.tar         # kind",
        img = image_ref(),
    );
    Ok(())
}

/// The release build for the musl target; returns the binary's path.
fn build_static(target: &str) -> Result<PathBuf> {
    let mut cmd = cargo(&[
        "build",
        "--release",
        "-p",
        "redirector",
        "--bin",
        "redirector",
        "--target",
        target,
    ]);
    // cc-rs looks for `<arch>-linux-musl-gcc`; Debian's musl-tools ships `musl-gcc`.
    let cc_var = format!("CC_{}", target.replace('-', "_"));
    if std::env::var_os(&cc_var).is_none() {
        cmd.env(&cc_var, "musl-gcc");
    }
    run(&mut cmd).context("building the static binary")?;
    let bin = target_dir().join(target).join("release").join("redirector");
    ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}

/// Little-endian readers for the ELF header fields.
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const PT_INTERP: u32 = 3;
const EM_BPF: u16 = 247;

/// Fails unless `elf` is a 64-bit little-endian ELF without a program interpreter (i.e. it
/// needs no dynamic loader and no shared libraries: runs FROM scratch).
pub fn check_static(elf: &[u8]) -> Result<()> {
    ensure!(elf.starts_with(b"\x7fELF"), "not an ELF file");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF"
    );
    let bad = || anyhow::anyhow!("truncated ELF header");
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(elf, 0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let p_type = u32_at(elf, phoff + i * phentsize).ok_or_else(bad)?;
        if p_type == PT_INTERP {
            bail!("it has an ELF interpreter (PT_INTERP): dynamically linked");
        }
    }
    Ok(())
}

/// True when an eBPF ELF object (e_machine EM_BPF) is embedded past the start of `elf`.
pub fn embeds_bpf_object(elf: &[u8]) -> bool {
    elf.windows(4)
        .enumerate()
        .skip(1)
        .filter(|(_, w)| *w == b"\x7fELF")
        .any(|(i, _)| u16_at(elf, i + 18) == Some(EM_BPF))
}

/// buildah with the storage driver that works on this machine.
struct Buildah {
    driver: String,
}

impl Buildah {
    /// overlay when a scratch container can be created and mounted with it, vfs otherwise
    /// (overlay on overlay, e.g. inside a container). `STORAGE_DRIVER` overrides.
    fn detect() -> Result<Self> {
        if let Ok(d) = std::env::var("STORAGE_DRIVER") {
            if !d.is_empty() {
                println!("[image] buildah storage driver: {d} (STORAGE_DRIVER)");
                return Ok(Self { driver: d });
            }
        }
        for driver in ["overlay", "vfs"] {
            let b = Self {
                driver: driver.to_owned(),
            };
            b.remove(BUILD_CONTAINER);
            let works = b
                .output(&["from", "--name", BUILD_CONTAINER, "scratch"])
                .is_some()
                && b.output(&["mount", BUILD_CONTAINER]).is_some();
            b.remove(BUILD_CONTAINER);
            if works {
                println!("[image] buildah storage driver: {driver}");
                return Ok(b);
            }
        }
        bail!("buildah can't create a container with the overlay or vfs storage driver (try `buildah info`)")
    }

    /// ` --storage-driver X`, for printed commands.
    fn flag(&self) -> String {
        format!(" --storage-driver {}", self.driver)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("buildah");
        c.args(["--storage-driver", &self.driver]).args(args);
        c
    }

    /// Runs quietly; stdout when it exits 0.
    fn output(&self, args: &[&str]) -> Option<String> {
        let out = self
            .cmd(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn remove(&self, container: &str) {
        let _ = self.output(&["umount", container]);
        let _ = self.output(&["rm", container]);
    }

    fn build(&self, bin: &Path) -> Result<()> {
        self.remove(BUILD_CONTAINER);
        let v = version();
        let bin = bin.to_string_lossy();
        run(&mut self.cmd(&["from", "--name", BUILD_CONTAINER, "scratch"]))?;
        let result = (|| {
            run(&mut self.cmd(&[
                "copy",
                "--chmod",
                "0755",
                BUILD_CONTAINER,
                &bin,
                "/redirector",
            ]))?;
            let version_label = format!("org.opencontainers.image.version={v}");
            run(&mut self.cmd(&[
                "config",
                "--entrypoint",
                r#"["/redirector"]"#,
                "--os",
                "linux",
                "--arch",
                oci_arch(),
                "--label",
                "org.opencontainers.image.title=redirector",
                "--label",
                "org.opencontainers.image.description=eBPF data plane for Knative-style scale-to-zero (per-node agent)",
                "--label",
                &version_label,
                "--label",
                "org.opencontainers.image.licenses=Apache-2.0",
                BUILD_CONTAINER,
            ]))?;
            // The previous build of this tag, left untagged by the commit: removed after it
            // (ignored if something still uses it).
            let previous = self.output(&["images", "-q", "--no-trunc", &image_ref()]);
            run(&mut self.cmd(&["commit", "--rm", BUILD_CONTAINER, &image_ref()]))?;
            let current = self.output(&["images", "-q", "--no-trunc", &image_ref()]);
            if let Some(prev) = previous.as_deref().map(str::trim) {
                if !prev.is_empty() && Some(prev) != current.as_deref().map(str::trim) {
                    let _ = self.output(&["rmi", prev]);
                }
            }
            Ok(())
        })();
        if result.is_err() {
            self.remove(BUILD_CONTAINER);
        }
        result
    }

    /// Verifies the committed image: config, contents, and the binary inside.
    fn check(&self) -> Result<()> {
        let img = image_ref();
        let json = self
            .output(&["inspect", "--type", "image", &img])
            .with_context(|| format!("buildah inspect {img}"))?;
        let v: serde_json::Value = serde_json::from_str(&json).context("buildah inspect output")?;
        let oci = &v["OCIv1"];
        ensure!(
            oci["config"]["Entrypoint"] == serde_json::json!(["/redirector"]),
            "entrypoint is {}",
            oci["config"]["Entrypoint"]
        );
        ensure!(oci["os"] == "linux", "os is {}", oci["os"]);
        ensure!(
            oci["architecture"] == oci_arch(),
            "architecture is {}",
            oci["architecture"]
        );
        ensure!(
            oci["config"]["Labels"]["org.opencontainers.image.version"] == version(),
            "version label is {}",
            oci["config"]["Labels"]["org.opencontainers.image.version"]
        );

        self.remove(CHECK_CONTAINER);
        run(&mut self.cmd(&["from", "--name", CHECK_CONTAINER, &img]))?;
        let result = (|| {
            let root = self
                .output(&["mount", CHECK_CONTAINER])
                .context("buildah mount")?;
            let root = PathBuf::from(root.trim());
            let mut entries: Vec<String> = std::fs::read_dir(&root)
                .with_context(|| format!("reading {}", root.display()))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            entries.sort();
            ensure!(
                entries == ["redirector"],
                "the image holds {entries:?}, expected only redirector"
            );
            let bin = root.join("redirector");
            let elf = std::fs::read(&bin)?;
            check_static(&elf)?;
            ensure!(
                embeds_bpf_object(&elf),
                "no eBPF object in the image's binary"
            );
            let out = Command::new(&bin)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {} --version", bin.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && text.trim() == format!("redirector {}", version()),
                "`redirector --version` in the image printed {text:?} ({})",
                out.status
            );
            println!("[image] check: {img}: entrypoint /redirector, linux/{}, only /redirector (static, eBPF embedded), {}", oci_arch(), text.trim());
            Ok(())
        })();
        self.remove(CHECK_CONTAINER);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with one program header of type `p_type`.
    fn elf(p_type: u32, machine: u16) -> Vec<u8> {
        let mut b = vec![0u8; 0x40 + 0x38];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[0x40..0x44].copy_from_slice(&p_type.to_le_bytes());
        b
    }

    #[test]
    fn static_and_dynamic() {
        assert!(check_static(&elf(1, 62)).is_ok());
        assert!(check_static(&elf(PT_INTERP, 62)).is_err());
        assert!(check_static(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn embedded_bpf() {
        let mut host = elf(1, 62);
        assert!(!embeds_bpf_object(&host));
        host.extend(elf(1, EM_BPF));
        assert!(embeds_bpf_object(&host));
    }

    #[test]
    fn target_names() {
        assert!(musl_target().ends_with("-unknown-linux-musl"));
        assert_eq!(image_ref(), format!("localhost/redirector:{}", version()));
    }
}
