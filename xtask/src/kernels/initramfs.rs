//! The test VM's initramfs: a newc cpio archive with a static busybox, the kernel's own
//! modules that mounting the host's root over virtio-9p needs (decompressed, in load order),
//! and `init.sh` as `/init`. Everything else the VM runs comes from the host's root.
use std::{io::Write as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use super::fetch::Kernel;

/// Modules the init loads before it can mount the host's root (their dependencies follow).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

const INIT: &str = include_str!("init.sh");

/// Writes the archive for `k` to `out`; `outdir` is the path (the same on host and guest)
/// where the guest mounts the run directory.
pub fn build(k: &Kernel, outdir: &Path, out: &Path) -> Result<()> {
    let busybox = std::fs::read("/usr/bin/busybox")
        .or_else(|_| std::fs::read("/bin/busybox"))
        .context("reading busybox (Debian package busybox-static)")?;
    let mut a = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules", "newroot"] {
        a.dir(d);
    }
    a.node("dev/console", 5, 1);
    a.file("bin/busybox", 0o755, &busybox);
    a.file("init", 0o755, INIT.as_bytes());
    a.file("outdir", 0o644, outdir.to_string_lossy().as_bytes());
    let mut order = String::new();
    for (i, path) in boot_modules(k)?.iter().enumerate() {
        let name = format!(
            "{i:02}-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
                .split(".ko")
                .next()
                .unwrap_or("module")
        ) + ".ko";
        a.file(&format!("modules/{name}"), 0o644, &decompress(path)?);
        order.push_str(&name);
        order.push('\n');
    }
    a.file("modules/order", 0o644, order.as_bytes());
    std::fs::write(out, a.finish())?;
    Ok(())
}

/// The files of `BOOT_MODULES` and their dependencies, in load order, without repeats and
/// without what the kernel has built in.
fn boot_modules(k: &Kernel) -> Result<Vec<std::path::PathBuf>> {
    let mut seen = Vec::new();
    for m in BOOT_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&k.root)
            .args(["-S", &k.release, "--show-depends", m])
            .output()
            .context("running modprobe --show-depends (Debian package kmod)")?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {m} for {}: {}",
                k.release,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.trim().strip_prefix("insmod ") {
                let p = std::path::PathBuf::from(p.split_whitespace().next().unwrap_or(p));
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
    }
    Ok(seen)
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => Ok(std::fs::read(path)?),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {t}"))?;
            if !out.status.success() {
                bail!("{t} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// A minimal writer of the "newc" cpio format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namez = name.len() + 1;
        let _ = write!(
            self.buf,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namez,
            0
        );
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn node(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}
