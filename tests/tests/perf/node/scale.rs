//! Scale: the agent's BPF map memory and RSS at large service counts.
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
    pub(super) error: String,
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
    let toml = agent_toml(&pin, &svcs, "");
    Ok(match AgentRun::start(&node, &dir, &label, &toml) {
        Ok((a, took)) => {
            std::thread::sleep(Duration::from_millis(500));
            let (memlock, per_map) = map_memory(a.pid());
            Scale {
                services: n,
                ok: true,
                ready_ms: took.as_secs_f64() * 1e3,
                memlock,
                per_map,
                rss_kib: rss_kib(a.pid()),
                error: String::new(),
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

/// The scale points: 10,000 and 100,000 services (and one just under MAX_SERVICES when
/// 100,000 does not fit).
pub(super) fn run_all(a: &crate::Selection) -> Vec<Scale> {
    let scale_counts = [10_000usize, 100_000];
    let scale: Vec<Scale> = scale_counts
        .iter()
        .map(|&n| {
            let s = measure_scale(n).unwrap_or_else(|e| panic!("scale {n}: {e:#}"));
            println!(
                "  scale {n}: ok {} memlock {} RSS {} KiB {}",
                s.ok, s.memlock, s.rss_kib, s.error
            );
            s
        })
        .collect();
    // An extra point just under MAX_SERVICES when 100,000 did not fit.
    let mut scale = scale;
    if !a.quick && scale.last().is_some_and(|s| !s.ok) {
        let n = redirector_common::MAX_SERVICES as usize - 16;
        if let Ok(s) = measure_scale(n) {
            println!(
                "  scale {n}: ok {} memlock {} RSS {} KiB",
                s.ok, s.memlock, s.rss_kib
            );
            scale.push(s);
        }
    }
    scale
}

/// The scale section of node.md.
pub(super) fn markdown(md: &mut String, scale: &[Scale]) {
    *md += "\n## Scale: agent map memory and RSS\n\n| services | programmed | agent start to ready | BPF map memlock | agent RSS | largest maps |\n|---:|---|---:|---:|---:|---|\n";
    for s in scale {
        let mut top: Vec<(&String, &u64)> = s.per_map.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(4)
            .map(|(n, b)| format!("{n} {:.1} MiB", **b as f64 / 1048576.0))
            .collect();
        if s.ok {
            let _ = writeln!(
                md,
                "| {} | yes | {:.0} ms | {:.1} MiB | {:.1} MiB | {} |",
                s.services,
                s.ready_ms,
                s.memlock as f64 / 1048576.0,
                s.rss_kib as f64 / 1024.0,
                top.join(", ")
            );
        } else {
            let _ = writeln!(
                md,
                "| {} | **no**: {} | - | - | - | - |",
                s.services,
                s.error.replace('|', "/")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nMAX_SERVICES is {}; memlock is the kernel's per-map figure from /proc/<agent>/fdinfo \
         (for the non-preallocated MAGLEV map it follows the entries in use).",
        redirector_common::MAX_SERVICES
    );
}

/// The scale points in node.json.
pub(super) fn json(scale: &[Scale]) -> Vec<Value> {
    scale.iter().map(|s| json!({
        "services": s.services, "ok": s.ok, "ready_ms": s.ready_ms, "memlock_bytes": s.memlock,
        "per_map_bytes": s.per_map, "agent_rss_kib": s.rss_kib, "error": s.error,
    })).collect::<Vec<_>>()
}
