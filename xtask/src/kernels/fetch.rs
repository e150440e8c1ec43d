//! Kernels for the matrix: Debian's own `linux-image` packages, taken with `apt-get download`
//! (never installed on the host) and unpacked under `target/kernels/<series>/root`, with
//! `depmod` run over their modules so that `modprobe -d` finds them inside the VM.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{probe, run};

/// One kernel series of the matrix and where Debian keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    /// What `--kernel` names (`6.1`).
    pub name: &'static str,
    /// The Debian suite whose packages hold it.
    pub suite: &'static str,
    /// The metapackage that depends on the newest image of the series there.
    pub meta: &'static str,
    /// Why it is in the matrix (printed by `cargo xtask kernels --list`).
    pub why: &'static str,
}

/// The matrix, oldest first. 6.6 is not here: Debian never shipped a 6.6 kernel in a
/// stable suite, and the backports of that time are gone from its archive.
pub const MATRIX: &[Series] = &[
    Series {
        name: "5.10",
        suite: "bullseye",
        meta: "linux-image-amd64",
        why: "Debian 11, Amazon Linux 2: no tcx, no bpf_ktime_get_coarse_ns",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        meta: "linux-image-amd64",
        why: "Debian 12 and many cloud images: no tcx (clsact filters)",
    },
    Series {
        name: "6.12",
        suite: "bookworm",
        meta: "linux-image-6.12-amd64",
        why: "the newest LTS Debian ships: tcx",
    },
];

/// The series of the matrix that CI runs by default: all of it (5.10 proves the minimum).
pub const DEFAULT: &[&str] = &["5.10", "6.1", "6.12"];

pub fn series(name: &str) -> Result<Series> {
    MATRIX
        .iter()
        .find(|s| s.name == name)
        .copied()
        .with_context(|| {
            let known: Vec<&str> = MATRIX.iter().map(|s| s.name).collect();
            format!("no kernel series {name} (known: {})", known.join(", "))
        })
}

/// An unpacked kernel: `root` holds `boot/vmlinuz-<release>` and `lib/modules/<release>`.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub package: String,
    pub release: String,
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// Downloads (once) and unpacks the newest image of `s` under `dir`.
pub fn fetch(s: Series, dir: &Path) -> Result<Kernel> {
    std::fs::create_dir_all(dir)?;
    let apt = AptContext::for_suite(s.suite, &dir.join("..").join("apt"))?;
    let package = apt.depends_on(s.meta)?;
    let root = dir.join("root");
    let stamp = dir.join("package");
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have.trim() != package || !root.join("boot").exists() {
        println!("[kernels] {}: downloading {package}", s.name);
        let dl = dir.join("deb");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        run(apt
            .command("apt-get")
            .current_dir(&dl)
            .args(["download", &package]))?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::remove_dir_all(&dl)?;
        std::fs::write(&stamp, &package)?;
    }
    let modules = root.join("lib").join("modules");
    let release = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{package} has no modules directory"))?;
    if !modules.join(&release).join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    let k = Kernel {
        package,
        release,
        root,
    };
    if !k.vmlinuz().exists() {
        bail!("{} has no {}", k.package, k.vmlinuz().display());
    }
    Ok(k)
}

/// apt for one suite: the host's own lists when the host runs that suite, otherwise a
/// private set of lists under `target/kernels/apt/<suite>` made from the host's Debian
/// mirror (read from its sources, so the same mirror the machine already uses).
struct AptContext {
    opts: Vec<String>,
}

impl AptContext {
    fn for_suite(suite: &str, base: &Path) -> Result<Self> {
        let host =
            probe("sh", &["-c", ". /etc/os-release && echo $VERSION_CODENAME"]).unwrap_or_default();
        if host == suite {
            return Ok(Self { opts: Vec::new() });
        }
        let dir = base.join(suite);
        let lists = dir.join("lists");
        std::fs::create_dir_all(lists.join("partial"))?;
        std::fs::create_dir_all(dir.join("cache").join("archives").join("partial"))?;
        let (main, security) = host_mirrors()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources = format!(
            "deb [signed-by={keyring}] {main} {suite} main\n\
             deb [signed-by={keyring}] {security} {suite}-security main\n"
        );
        let list = dir.join("sources.list");
        std::fs::write(&list, sources)?;
        let opts = vec![
            format!("-oDir::Etc::SourceList={}", list.display()),
            "-oDir::Etc::SourceParts=/nonexistent".to_owned(),
            format!("-oDir::State::Lists={}", lists.display()),
            format!("-oDir::Cache={}", dir.join("cache").display()),
            format!("-oDir::State::Status={}", dir.join("status").display()),
        ];
        std::fs::write(dir.join("status"), "")?;
        let fresh = std::fs::metadata(lists.join("lock"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 24 * 3600);
        let ctx = Self { opts };
        if !fresh {
            run(ctx.command("apt-get").args(["update", "-q"]))?;
            std::fs::write(lists.join("lock"), "")?;
        }
        Ok(ctx)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.opts);
        c
    }

    /// The image package a metapackage depends on.
    fn depends_on(&self, meta: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["depends", meta])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(|p| p.trim().to_owned())
            .with_context(|| {
                format!(
                    "apt-cache depends {meta}: no linux-image dependency (run apt-get update?): {}",
                    text.trim()
                )
            })
    }
}

/// The Debian archive and security mirrors the host's apt sources name.
fn host_mirrors() -> Result<(String, String)> {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            text.push('\n');
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    let uris: Vec<String> = text
        .lines()
        .flat_map(|l| {
            let l = l.trim();
            let words: Vec<&str> = if let Some(rest) = l.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if l.starts_with("deb ") {
                l.split_whitespace().filter(|w| w.contains("://")).collect()
            } else {
                Vec::new()
            };
            words
                .into_iter()
                .map(|w| w.trim_end_matches('/').to_owned())
        })
        .collect();
    let security = uris.iter().find(|u| u.ends_with("/debian-security"));
    let main = uris.iter().find(|u| u.ends_with("/debian"));
    match (main, security) {
        (Some(m), Some(s)) => Ok((m.clone(), s.clone())),
        _ => bail!("no Debian mirror in the host's apt sources (found: {uris:?})"),
    }
}
