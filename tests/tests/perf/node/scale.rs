//! Scale: the agent's BPF map memory, kernel memory, RSS and idle CPU at 10,000 and
//! 100,000 services (map capacities set with `[maps]` where the defaults are too small).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Result;
use redirector_tests::{
    agent::redirector_bin,
    netns::{run, unique, Netns},
};
use serde_json::{json, Value};

use super::{
    bed::AgentRun,
    rules::{agent_toml, serve_eps, services},
};

pub(super) struct Scale {
    pub(super) services: usize,
    pub(super) ok: bool,
    pub(super) ready_ms: f64,
    pub(super) memlock: u64,
    pub(super) per_map: BTreeMap<String, u64>,
    pub(super) rss_kib: u64,
    /// Services the agent reports in its maps (`redirector status --json`).
    pub(super) programmed: usize,
    /// `[maps] services` capacity used.
    pub(super) capacity: u32,
    /// Growth of the kernel's unreclaimable slab while the agent programmed the maps (the
    /// non-preallocated hash elements: Maglev tables, service names).
    pub(super) slab_kib: i64,
    /// Agent CPU while idle after ready, ms per second.
    pub(super) idle_cpu_ms_per_s: f64,
    pub(super) error: String,
}

fn meminfo_kib(field: &str) -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// SUnreclaim once it has stopped moving (namespaces torn down just before are freed by a
/// kernel work queue, which would otherwise show up as negative growth): polled every
/// 200 ms until two readings are within 1 MiB, for at most 5 s.
fn settled_slab_kib() -> i64 {
    let mut last = meminfo_kib("SUnreclaim");
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        let now = meminfo_kib("SUnreclaim");
        if (now - last).abs() < 1024 {
            return now;
        }
        last = now;
    }
    last
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat (11 and 12 here).
    get(11) + get(12)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The `[maps]` capacities for `n` services of two backends each: the defaults up to
/// 65,536 services, else the next power of two.
fn capacities(n: usize) -> (u32, u32) {
    let d = redirector::datapath::MapSizes::default();
    let services = (n as u32).max(d.services).next_power_of_two();
    let backends = ((2 * n) as u32).max(d.backends).next_power_of_two();
    (services, backends)
}

/// memlock of every BPF map the process holds, by map name (bpftool for the names).
pub(super) fn map_memory(pid: i32) -> (u64, BTreeMap<String, u64>) {
    let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in rd.flatten() {
            let Ok(t) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let field = |k: &str| {
                t.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) {
                ids.insert(id, mem);
            }
        }
    }
    let names: BTreeMap<u64, String> = run("bpftool", &["-j", "map", "show"])
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| Some((m["id"].as_u64()?, m["name"].as_str()?.to_owned())))
        .collect();
    let mut per = BTreeMap::new();
    for (id, mem) in &ids {
        let n = names.get(id).cloned().unwrap_or_else(|| format!("id {id}"));
        *per.entry(n).or_insert(0) += mem;
    }
    (ids.values().sum(), per)
}

pub(super) fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(super) fn measure_scale(n: usize) -> Result<Scale> {
    let tag = unique("rs");
    let dir = PathBuf::from(format!("/tmp/{tag}"));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Scratch(dir.clone());
    let node = Netns::create(&format!("{tag}-node"))?;
    let svcs = services(n, &serve_eps());
    let label = format!("{tag}-agent");
    let pin = PathBuf::from(format!("/sys/fs/bpf/{label}"));
    let (capacity, backends) = capacities(n);
    let mut toml = agent_toml(&pin, &svcs, "");
    let _ = write!(
        toml,
        "\n[maps]\nservices = {capacity}\nbackends = {backends}\n"
    );
    let slab0 = settled_slab_kib();
    Ok(match AgentRun::start(&node, &dir, &label, &toml) {
        Ok((a, took)) => {
            std::thread::sleep(Duration::from_millis(500));
            let slab_kib = meminfo_kib("SUnreclaim") - slab0;
            let (memlock, per_map) = map_memory(a.pid());
            let t0 = cpu_ticks(a.pid());
            let idle = Duration::from_secs(3);
            std::thread::sleep(idle);
            let idle_cpu_ms_per_s =
                (cpu_ticks(a.pid()) - t0) as f64 / clock_ticks_per_s() * 1e3 / idle.as_secs_f64();
            let programmed = Command::new(redirector_bin())
                .args(["status", "--json", "--pin-path"])
                .arg(&pin)
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| Some(v["services"].as_array()?.len()))
                .unwrap_or(0);
            Scale {
                services: n,
                ok: programmed == n,
                ready_ms: took.as_secs_f64() * 1e3,
                memlock,
                per_map,
                rss_kib: rss_kib(a.pid()),
                programmed,
                capacity,
                slab_kib,
                idle_cpu_ms_per_s,
                error: if programmed == n {
                    String::new()
                } else {
                    format!("{programmed} of {n} services in the maps")
                },
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let short: Vec<&str> = msg.lines().take(1).collect();
            let _ = Command::new(redirector_bin())
                .args(["uninstall", "--pin-path"])
                .arg(&pin)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            Scale {
                services: n,
                ok: false,
                ready_ms: f64::NAN,
                memlock: 0,
                per_map: BTreeMap::new(),
                rss_kib: 0,
                programmed: 0,
                capacity,
                slab_kib: 0,
                idle_cpu_ms_per_s: f64::NAN,
                error: if short.is_empty() {
                    msg.lines().take(3).collect::<Vec<_>>().join(" / ")
                } else {
                    short.join(" / ")
                },
            }
        }
    })
}

pub(super) struct Scratch(pub(super) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The scale points: 10,000 and 100,000 services.
pub(super) fn run_all(_a: &crate::Selection) -> Vec<Scale> {
    [10_000usize, 100_000]
        .iter()
        .map(|&n| {
            let s = measure_scale(n).unwrap_or_else(|e| panic!("scale {n}: {e:#}"));
            println!(
                "  scale {n}: programmed {} memlock {} slab {} KiB RSS {} KiB idle CPU {:.1} ms/s {}",
                s.programmed, s.memlock, s.slab_kib, s.rss_kib, s.idle_cpu_ms_per_s, s.error
            );
            s
        })
        .collect()
}

/// The scale section of node.md.
pub(super) fn markdown(md: &mut String, scale: &[Scale]) {
    *md += "\n## Scale: map memory, agent memory and idle CPU\n\n| services | in the maps | `[maps] services` | agent start to ready | BPF map memlock | kernel slab growth | agent RSS | agent idle CPU | largest maps (memlock) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for s in scale {
        let mut top: Vec<(&String, &u64)> = s.per_map.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(4)
            .map(|(n, b)| format!("{n} {:.1} MiB", **b as f64 / 1048576.0))
            .collect();
        if s.memlock > 0 {
            let _ = writeln!(
                md,
                "| {} | {}{} | {} | {:.0} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} ms/s | {} |",
                s.services,
                s.programmed,
                if s.ok { "" } else { " (**not all**)" },
                s.capacity,
                s.ready_ms,
                s.memlock as f64 / 1048576.0,
                s.slab_kib as f64 / 1024.0,
                s.rss_kib as f64 / 1024.0,
                s.idle_cpu_ms_per_s,
                top.join(", ")
            );
        } else {
            let _ = writeln!(
                md,
                "| {} | **no**: {} | {} | - | - | - | - | - | - |",
                s.services,
                s.error.replace('|', "/"),
                s.capacity
            );
        }
    }
    *md += "\nServices have two backends each (Maglev tables in MAGLEV_SMALL, 1 KiB each). \
        memlock is the kernel's per-map figure from /proc/<agent>/fdinfo (preallocated maps: \
        their full capacity; MAGLEV/MAGLEV_SMALL: the entries in use). Kernel slab growth is \
        SUnreclaim in /proc/meminfo from before the agent started to after it was ready \
        (the non-preallocated hash elements; other activity on the machine adds noise). \
        Idle CPU: the agent's utime+stime over 3 s after ready, with nothing to do.\n";
}

/// The scale points in node.json.
pub(super) fn json(scale: &[Scale]) -> Vec<Value> {
    scale.iter().map(|s| json!({
        "services": s.services, "ok": s.ok, "ready_ms": s.ready_ms, "memlock_bytes": s.memlock,
        "per_map_bytes": s.per_map, "agent_rss_kib": s.rss_kib, "error": s.error,
        "programmed": s.programmed, "maps_services": s.capacity, "kernel_slab_kib": s.slab_kib,
        "idle_cpu_ms_per_s": s.idle_cpu_ms_per_s,
    })).collect::<Vec<_>>()
}
