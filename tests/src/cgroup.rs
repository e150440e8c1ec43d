//! Test cgroups: one cgroup v2 directory per simulated node, so that each node's agent hooks
//! the sockets of its own pods only (socket hooks attach to a cgroup, not a namespace), and
//! the placement of a test process into one before it runs.
use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

/// The root of the cgroup v2 hierarchy (the first cgroup2 mount of the hierarchy's root).
pub fn root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let point = f.next()?;
            (root == "/").then(|| PathBuf::from(point))
        })
        .context("no cgroup2 mount of the hierarchy's root")
}

/// A cgroup made for a test, removed on drop (once its processes are gone).
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = root()?.join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes placed here may take a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Makes `cmd`'s process join `cgroup` before it executes (`None`: stays where it is).
pub fn place(cmd: &mut Command, cgroup: Option<&Path>) -> Result<()> {
    let Some(cg) = cgroup else {
        return Ok(());
    };
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?;
    let fd = procs.as_raw_fd();
    // SAFETY: only `write(2)` between fork and exec (async-signal-safe); "0" moves the
    // writing process. The file stays open in the parent until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &procs;
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Moves this whole process into `cgroup`; returns the cgroup it was in (to come back).
/// Sockets it makes from then on belong to `cgroup` (the socket hooks go by that).
pub fn join(cgroup: &Path) -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    let home = root()?.join(rel.trim_start_matches('/'));
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining {}", cgroup.display()))?;
    Ok(home)
}
