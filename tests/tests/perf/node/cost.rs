//! The datapath's own CPU per request, beside the whole system's: the kernel's BPF run-time
//! statistics (`kernel.bpf_stats_enabled`) of the programs the agent attached, over one
//! kept-alive and one new-connection run on the redirector bed, after the rounds (the
//! statistics add two clock reads to every program run, so they are never on during the
//! rounds), and the machine's busy CPU time (`/proc/stat`) over the same runs.
//!
//! This is what the throughput ratios cannot show on a 2-CPU machine where client, server
//! and forwarding share the CPUs: how much of a request's CPU the programs themselves take.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    bed::Bed,
    load::{new_conns, wrk, Load},
    pin::Pinning,
    summary::Metric,
    Plan, Variant,
};

/// One measured run with the statistics on.
#[derive(Clone, Debug)]
pub(super) struct PerOp {
    /// Requests (kept-alive) or connections (new).
    pub(super) ops: u64,
    pub(super) runs_per_op: f64,
    pub(super) ns_per_run: f64,
    /// The programs' run time per request / connection.
    pub(super) prog_ns_per_op: f64,
    /// Busy CPU time per request / connection of the CPUs the run is pinned to (every CPU
    /// when unpinned): user, system, softirq; client, server and forwarding together.
    pub(super) cpu_ns_per_op: f64,
    /// The agent process's own CPU time per request / connection (its periodic work, e.g.
    /// the conntrack sweep, while the run goes on).
    pub(super) agent_ns_per_op: f64,
    /// Per program (by name, summed over the interfaces it is attached to): runs per
    /// request / connection and ns per run.
    pub(super) by_prog: Vec<(String, f64, f64)>,
}

impl PerOp {
    pub(super) fn share(&self) -> f64 {
        self.prog_ns_per_op / self.cpu_ns_per_op
    }

    pub(super) fn json(&self) -> Value {
        json!({"ops": self.ops, "runs_per_op": self.runs_per_op, "ns_per_run": self.ns_per_run,
               "prog_ns_per_op": self.prog_ns_per_op, "cpu_ns_per_op": self.cpu_ns_per_op,
               "agent_ns_per_op": self.agent_ns_per_op,
               "by_program": self.by_prog.iter().map(|(n, r, ns)| json!({"program": n,
                   "runs_per_op": r, "ns_per_run": ns})).collect::<Vec<_>>(),
               "share": self.share()})
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct Cost {
    pub(super) keepalive: Option<PerOp>,
    pub(super) newconn: Option<PerOp>,
    /// Kept-alive on the `empty-tc` bed: the empty program on the same four hooks. Its ns
    /// per run is what the statistics themselves add to every run (their two clock reads;
    /// tens of ns on a VM) plus an empty program: the floor under the figures above.
    pub(super) floor: Option<PerOp>,
}

/// Measures both runs on the redirector bed; the statistics are switched off again even
/// when a run fails.
pub(super) fn measure(plan: &Plan, bed: &Bed) -> Result<Cost> {
    let agent = bed
        .agent
        .as_ref()
        .context("redirector bed without an agent")?;
    let progs = program_ids(&agent.pin)?;
    if progs.is_empty() {
        bail!("no pinned links under {}", agent.pin.display());
    }
    with_stats(|| {
        let to = bed.target(Variant::Redirector);
        let pid = agent.pid();
        let keepalive = keepalive_cost(plan, bed, &progs, pid, to)?;
        let nc = plan.pinning(0, Metric::Newconn);
        bed.pin(&nc)?;
        new_conns(&bed.cli, to, plan.gen_threads, plan.warm_newconn, &nc)?;
        let newconn = one(&progs, pid, &nc, || {
            new_conns(&bed.cli, to, plan.gen_threads, plan.run, &nc)
        })?;
        Ok(Cost {
            keepalive: Some(keepalive),
            newconn: Some(newconn),
            floor: None,
        })
    })
}

/// Kept-alive through the `empty-tc` bed with the statistics on (see `Cost::floor`).
pub(super) fn measure_floor(plan: &Plan, bed: &Bed) -> Result<PerOp> {
    let (_, id) = bed
        .floor
        .as_ref()
        .context("empty-tc bed without its programs")?;
    let progs: BTreeSet<u64> = [u64::from(*id)].into();
    with_stats(|| keepalive_cost(plan, bed, &progs, 0, bed.target(Variant::Floor)))
}

/// Runs `f` with the kernel's BPF run-time statistics on, and puts the setting back as it
/// was even when `f` fails.
fn with_stats<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let was = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
    let r = f();
    let _ = std::fs::write(STATS, was.trim());
    r
}

/// After a warm-up, three kept-alive runs (one with `--quick`); the one of median program
/// time (one run can catch the agent's periodic sweep or other work on the machine).
fn keepalive_cost(
    plan: &Plan,
    bed: &Bed,
    progs: &BTreeSet<u64>,
    pid: i32,
    to: std::net::SocketAddr,
) -> Result<PerOp> {
    let ka = plan.pinning(0, Metric::Keepalive);
    bed.pin(&ka)?;
    wrk(&bed.cli, to, plan.wrk_conns, plan.warm, &ka)?;
    let mut runs = (0..if plan.quick { 1 } else { 3 })
        .map(|_| {
            one(progs, pid, &ka, || {
                wrk(&bed.cli, to, plan.wrk_conns, plan.run, &ka)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.prog_ns_per_op.total_cmp(&b.prog_ns_per_op));
    Ok(runs.swap_remove(runs.len() / 2))
}

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn one(
    progs: &BTreeSet<u64>,
    pid: i32,
    pinning: &Pinning,
    f: impl FnOnce() -> Result<Load>,
) -> Result<PerOp> {
    let cpus = pinned_cpus(pinning);
    let cpus = cpus.as_deref();
    let (t0, c0, a0) = (prog_stats(progs)?, busy_ns(cpus)?, agent_ns(pid)?);
    let load = f()?;
    let (t1, c1, a1) = (prog_stats(progs)?, busy_ns(cpus)?, agent_ns(pid)?);
    if load.count == 0 {
        bail!("the run completed nothing");
    }
    let ops = load.count as f64;
    let mut by_prog: Vec<(String, f64, f64)> = Vec::new();
    for (name, (ns1, r1)) in &t1.2 {
        let (ns0, r0) = t0.2.get(name).copied().unwrap_or((0, 0));
        let runs = r1.saturating_sub(r0) as f64;
        let ns = ns1.saturating_sub(ns0) as f64;
        by_prog.push((
            name.clone(),
            runs / ops,
            if runs > 0.0 { ns / runs } else { f64::NAN },
        ));
    }
    let (ns, runs) = ((t1.0 - t0.0) as f64, (t1.1 - t0.1) as f64);
    Ok(PerOp {
        ops: load.count,
        runs_per_op: runs / ops,
        ns_per_run: if runs > 0.0 { ns / runs } else { f64::NAN },
        prog_ns_per_op: ns / ops,
        cpu_ns_per_op: (c1 - c0) as f64 / ops,
        agent_ns_per_op: (a1 - a0) as f64 / ops,
        by_prog,
    })
}

/// Every CPU the load and serving sides are pinned to (`None` when either is not pinned).
fn pinned_cpus(p: &Pinning) -> Option<Vec<usize>> {
    let mut v = p.load.clone()?;
    v.extend(p.serve.clone()?);
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// The ids of the programs behind the agent's pinned links (`<pin>/links/*`).
fn program_ids(pin: &Path) -> Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(pin.join("links"))?.flatten() {
        let v = bpftool(&["link", "show", "pinned", &e.path().to_string_lossy()])?;
        if let Some(id) = v["prog_id"].as_u64() {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// Summed (run_time_ns, run_cnt) of `progs`, and the same per program name.
type ProgStats = (u64, u64, BTreeMap<String, (u64, u64)>);

fn prog_stats(progs: &BTreeSet<u64>) -> Result<ProgStats> {
    let mut sum = (0, 0, BTreeMap::new());
    for id in progs {
        let v = bpftool(&["prog", "show", "id", &id.to_string()])?;
        let (ns, cnt) = (
            v["run_time_ns"].as_u64().unwrap_or(0),
            v["run_cnt"].as_u64().unwrap_or(0),
        );
        sum.0 += ns;
        sum.1 += cnt;
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let e = sum.2.entry(name).or_insert((0, 0));
        e.0 += ns;
        e.1 += cnt;
    }
    Ok(sum)
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf with a constant name.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// `process_ns` of the agent; 0 when there is none (`pid` 0).
fn agent_ns(pid: i32) -> Result<u64> {
    if pid == 0 {
        return Ok(0);
    }
    process_ns(pid)
}

/// utime + stime of process `pid` (every thread), in ns.
fn process_ns(pid: i32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .map(|x| x.1)
        .context("unexpected stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((t(11) + t(12)) * 1_000_000_000 / clk_tck())
}

/// Busy CPU time (user, nice, system, irq, softirq in /proc/stat) of `cpus` (the CPUs the
/// run is pinned to, so other work on the machine does not count), or of the whole machine
/// when the run is not pinned, in ns.
fn busy_ns(cpus: Option<&[usize]>) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let Some(cpus) = cpus else {
        return busy_line(text.lines().next().context("empty /proc/stat")?);
    };
    let mut sum = 0;
    for c in cpus {
        let tag = format!("cpu{c} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&tag))
            .with_context(|| format!("no {tag}in /proc/stat"))?;
        sum += busy_line(line)?;
    }
    Ok(sum)
}

fn busy_line(line: &str) -> Result<u64> {
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 8 {
        bail!("unexpected /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal (guest times are inside user); time
    // stolen by a hypervisor is not this machine's work.
    let busy = f[0] + f[1] + f[2] + f[5] + f[6];
    Ok(busy * 1_000_000_000 / clk_tck())
}
