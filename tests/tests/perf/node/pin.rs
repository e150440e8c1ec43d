//! CPU pinning: the load side (wrk, the new-connection generator, the flip prober) on one
//! set of CPUs, the serving side (rt-server, the stand-in activator, the agent) on the
//! other. Affinity is set per slot, so pinned and unpinned rounds can alternate over the
//! same live processes (`NODE_PIN=ab`).
use anyhow::{bail, Result};

/// Where each side runs. `None`: every online CPU (the scheduler decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pinning {
    pub(super) load: Option<Vec<usize>>,
    pub(super) serve: Option<Vec<usize>>,
}

impl Pinning {
    pub(super) fn off() -> Self {
        Pinning {
            load: None,
            serve: None,
        }
    }

    /// The first half of the online CPUs for the load side, the rest for the serving side
    /// (CPU 0 and CPU 1 on two cores). `off()` on a single CPU.
    pub(super) fn split() -> Self {
        let cpus = online();
        if cpus.len() < 2 {
            return Self::off();
        }
        let (load, serve) = cpus.split_at(cpus.len() / 2);
        Pinning {
            load: Some(load.to_vec()),
            serve: Some(serve.to_vec()),
        }
    }

    /// Everything on the first online CPU: client, forwarding and server serialised on one
    /// CPU, so a run's rate is the inverse of the whole path's CPU cost per request, without
    /// the cross-CPU wake-ups whose latency varies from run to run.
    pub(super) fn one() -> Self {
        let first = online()[..1].to_vec();
        Pinning {
            load: Some(first.clone()),
            serve: Some(first),
        }
    }

    /// The online CPUs neither side is pinned to (`None` when there are none, or when
    /// unpinned): where the flips' decision (the map write, the rule rewrite, the agent's
    /// signal) is made, so that it does not wait behind the prober for the CPU.
    pub(super) fn spare(&self) -> Option<Vec<usize>> {
        let (l, s) = (self.load.as_ref()?, self.serve.as_ref()?);
        let v: Vec<usize> = online()
            .into_iter()
            .filter(|c| !l.contains(c) && !s.contains(c))
            .collect();
        (!v.is_empty()).then_some(v)
    }

    pub(super) fn is_on(&self) -> bool {
        self.load.is_some()
    }

    /// "load on CPU 0, servers and agent on CPU 1" or "unpinned".
    pub(super) fn describe(&self) -> String {
        match (&self.load, &self.serve) {
            (Some(l), Some(s)) if l == s => format!(
                "load generators, rt-server and agent all on CPU {}",
                list(l)
            ),
            (Some(l), Some(s)) => format!(
                "load generators on CPU {}, rt-server and agent on CPU {}",
                list(l),
                list(s)
            ),
            _ => "unpinned".into(),
        }
    }

    /// `taskset -c <load CPUs>` as a command prefix (empty when unpinned).
    pub(super) fn load_prefix(&self) -> Vec<String> {
        match &self.load {
            Some(c) => vec!["taskset".into(), "-c".into(), list(c)],
            None => Vec::new(),
        }
    }
}

fn list(c: &[usize]) -> String {
    c.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The online CPUs (`/sys/devices/system/cpu/online`, e.g. `0-1`).
pub(super) fn online() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut v = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|x| x.parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), Some(Ok(b))) => v.extend(a..=b),
            (Some(Ok(a)), None) => v.push(a),
            _ => {}
        }
    }
    if v.is_empty() {
        v.push(0);
    }
    v
}

fn set(tid: i32, cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within CPU_SETSIZE.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c < libc::CPU_SETSIZE as usize {
                libc::CPU_SET(c, &mut set);
            }
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        bail!(
            "sched_setaffinity({tid}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Pins the calling thread (`None`: every online CPU).
pub(super) fn this_thread(cpus: &Option<Vec<usize>>) -> Result<()> {
    match cpus {
        Some(c) => set(0, c),
        None => set(0, &online()),
    }
}

/// Pins every thread of process `pid` (threads it starts later inherit the mask of the
/// thread that starts them).
pub(super) fn process(pid: i32, cpus: &Option<Vec<usize>>) -> Result<()> {
    let all = online();
    let cpus = cpus.as_deref().unwrap_or(&all);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            // A thread may exit between the listing and the call.
            let _ = set(tid, cpus);
        }
    }
    Ok(())
}
