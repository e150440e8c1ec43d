//! node.md and node.json (and, for `NODE_PIN=ab`, the pinning experiment's own files).
use std::{fmt::Write as _, time::Instant};

use serde_json::{json, Value};

use super::{
    fmt_rate, fmt_us, machine, median, out_dir, pct,
    rounds::Results,
    scale::{self, Scale},
    summary::{head_to_head, paired, rows, values, Metric, Spread},
    Plan, Variant, VARIANTS,
};

fn get(rows: &[Value], v: &str, n: usize, k: &str) -> f64 {
    rows.iter()
        .find(|r| r["variant"] == v && r["services"] == n)
        .and_then(|r| r[k].as_f64())
        .unwrap_or(f64::NAN)
}

fn spread_of(rows: &[Value], v: &str, n: usize, k: &str) -> Spread {
    let r = rows
        .iter()
        .find(|r| r["variant"] == v && r["services"] == n);
    let f = |x: &str| r.and_then(|r| r[k][x].as_f64()).unwrap_or(f64::NAN);
    Spread {
        median: f("median"),
        min: f("min"),
        max: f("max"),
        n: r.and_then(|r| r[k]["rounds"].as_u64()).unwrap_or(0) as usize,
    }
}

fn abs_spread(rows: &[Value], v: &str, n: usize, k: &str) -> Spread {
    Spread {
        median: get(rows, v, n, k),
        min: get(rows, v, n, &format!("{k}_min")),
        max: get(rows, v, n, &format!("{k}_max")),
        n: rows
            .iter()
            .find(|r| r["variant"] == v && r["services"] == n)
            .and_then(|r| r[format!("{k}_rounds")].as_array().map(|a| a.len()))
            .unwrap_or(0),
    }
}

/// For a median below `line`: whether every round was below it too.
fn conclusive(s: &Spread, line: f64) -> &'static str {
    if s.n < 2 {
        ""
    } else if s.max < line {
        ", every round below"
    } else {
        ", some rounds above: within the noise"
    }
}

/// "1 service", "1000 services".
fn services(n: usize) -> String {
    format!("{n} service{}", if n == 1 { "" } else { "s" })
}

fn verdict(measured: bool, met: bool) -> &'static str {
    if !measured {
        "not measured"
    } else if met {
        "met"
    } else {
        "NOT met"
    }
}

/// Writes node.{md,json}; returns the JSON.
pub(super) fn write(plan: &Plan, res: &Results, scale: &[Scale], started: Instant) -> Value {
    let counts = &plan.counts;
    let rows = rows(res, counts);
    let flip_rows: Vec<Value> = res
        .flips
        .iter()
        .map(|((m, n), v)| {
            let us: Vec<f64> = v.iter().map(|x| x.0).collect();
            let probes: Vec<f64> = v.iter().map(|x| x.1 as f64).collect();
            json!({"method": m, "services": n, "median_us": median(&us), "p99_us": pct(&us, 0.99),
                   "max_us": pct(&us, 1.0), "count": v.len(), "samples_us": us,
                   "max_probes": pct(&probes, 1.0)})
        })
        .collect();
    let flip = |m: &str, n: usize| -> f64 {
        res.flips
            .get(&(m.to_owned(), n))
            .map(|v| median(&v.iter().map(|x| x.0).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    };
    let dp: Option<Value> = std::fs::read_to_string(out_dir().join("datapath.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());

    // ---- targets, on the median paired ratios
    let ka: Vec<(usize, Spread)> = counts
        .iter()
        .map(|&n| (n, spread_of(&rows, "redirector", n, "keepalive_vs_direct")))
        .collect();
    let ka_measured = ka.iter().all(|(_, s)| s.median.is_finite());
    let t_ka = ka_measured && ka.iter().all(|(_, s)| s.median >= 0.97);
    let kab: Vec<(usize, Spread)> = counts
        .iter()
        .map(|&n| {
            (
                n,
                spread_of(&rows, "redirector-bpf", n, "keepalive_vs_direct"),
            )
        })
        .collect();
    let kab_measured = kab.iter().all(|(_, s)| s.median.is_finite());
    let t_kab = kab_measured && kab.iter().all(|(_, s)| s.median >= 0.97);
    let h2h = |n: usize, v: Variant| head_to_head(res, n, v, Metric::Newconn);
    let (ri10, rn10) = (
        h2h(10_000, Variant::Iptables),
        h2h(10_000, Variant::Nftables),
    );
    let m10 = ri10.median.is_finite() && rn10.median.is_finite();
    let t_10k = m10 && ri10.median >= 2.0 && rn10.median >= 1.0;
    let (ri1, rn1) = (h2h(1, Variant::Iptables), h2h(1, Variant::Nftables));
    let m1 = ri1.median.is_finite() && rn1.median.is_finite();
    let t_1 = m1 && ri1.median >= 1.0 && rn1.median >= 1.0;
    let flip_x = flip("iptables: full restore", 10_000) / flip("redirector: map write", 10_000);
    let t_flip = flip_x >= 100.0;
    let nc = |v: &str, n| get(&rows, v, n, "newconn_cps");
    let targets = json!({
        "keepalive_ge_97pct_of_direct": {"met": t_ka, "verdict": verdict(ka_measured, t_ka),
            "judged_on": "median over rounds of redirector / direct of the same round, every count",
            "per_count": ka.iter().map(|(n, s)| (n.to_string(), s.json())).collect::<serde_json::Map<_, _>>()},
        "keepalive_ge_97pct_of_direct_bpf_host_routing": {"met": t_kab, "verdict": verdict(kab_measured, t_kab),
            "judged_on": "median over rounds of redirector-bpf (host_routing = bpf) / direct of the same round, every count",
            "per_count": kab.iter().map(|(n, s)| (n.to_string(), s.json())).collect::<serde_json::Map<_, _>>()},
        "newconn_10k_ge_2x_iptables_and_ge_nftables": {"met": t_10k, "verdict": verdict(m10, t_10k),
            "vs_iptables": ri10.json(), "vs_nftables": rn10.json(),
            "redirector_cps": nc("redirector", 10_000), "iptables_cps": nc("iptables", 10_000),
            "nftables_cps": nc("nftables", 10_000)},
        "newconn_1_ge_iptables_and_nftables": {"met": t_1, "verdict": verdict(m1, t_1),
            "vs_iptables": ri1.json(), "vs_nftables": rn1.json(),
            "redirector_cps": nc("redirector", 1), "iptables_cps": nc("iptables", 1),
            "nftables_cps": nc("nftables", 1)},
        "flip_ge_100x_faster_than_iptables_restore_10k": {"met": t_flip, "ratio": flip_x,
            "verdict": verdict(flip_x.is_finite(), t_flip)},
    });

    // ---- markdown
    let m = machine();
    let mut md = String::new();
    md += "# Node: redirector vs kube-proxy iptables / nftables\n\n";
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}, {} (Debian's iptables is the nf_tables backend: \
         iptables-nft; the rules are the same kube-proxy layout), {}, {}.\n",
        m["nproc"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
        m["wrk"].as_str().unwrap_or("?"),
    );
    md += &method(plan, &m);
    md += "## Throughput and latency through the VIP\n\n";
    md += "Median over rounds (min–max over rounds in brackets). `vs direct`: redirector, \
           iptables or nftables divided by direct of the same round, median of those ratios \
           (min–max). p50/p99: each run's percentiles, median over rounds. errors: failed \
           requests or connections, all rounds.\n\n";
    md += "| services | variant | kept-alive req/s | vs direct | p50 | p99 | new conn/s | vs direct | p50 | p99 | errors |\n";
    md += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for &n in counts {
        for v in VARIANTS {
            let name = v.name();
            let g = |k: &str| get(&rows, name, n, k);
            let _ = writeln!(
                md,
                "| {n} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                abs_spread(&rows, name, n, "keepalive_rps").abs(fmt_rate),
                spread_of(&rows, name, n, "keepalive_vs_direct").ratio(),
                fmt_us(g("keepalive_p50_us")),
                fmt_us(g("keepalive_p99_us")),
                abs_spread(&rows, name, n, "newconn_cps").abs(fmt_rate),
                spread_of(&rows, name, n, "newconn_vs_direct").ratio(),
                fmt_us(g("newconn_p50_us")),
                fmt_us(g("newconn_p99_us")),
                g("keepalive_errors") + g("newconn_errors"),
            );
        }
    }
    md += "\n## Redirector against kube-proxy's layouts, paired per round\n\n\
           redirector / iptables and redirector / nftables of the same round: median (min–max). \
           Above 1: redirector ahead.\n\n\
           | services | kept-alive vs iptables | kept-alive vs nftables | new conn/s vs iptables | new conn/s vs nftables |\n\
           |---:|---:|---:|---:|---:|\n";
    let mut losses = Vec::new();
    for &n in counts {
        let mut cells = Vec::new();
        for (mname, mt) in [
            ("kept-alive", Metric::Keepalive),
            ("new conn/s", Metric::Newconn),
        ] {
            for other in [Variant::Iptables, Variant::Nftables] {
                let s = head_to_head(res, n, other, mt);
                if s.median < 1.0 {
                    losses.push(format!(
                        "{mname} at {}: {:.3} of {} (median; rounds {:.3}–{:.3}{})",
                        services(n),
                        s.median,
                        other.name(),
                        s.min,
                        s.max,
                        conclusive(&s, 1.0)
                    ));
                }
                cells.push(s.ratio());
            }
        }
        let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        for (mname, key) in [
            ("kept-alive", "keepalive_vs_direct"),
            ("new conn/s", "newconn_vs_direct"),
        ] {
            let s = spread_of(&rows, "redirector", n, key);
            if s.median < 0.97 {
                losses.push(format!(
                    "{mname} at {}: {:.3} of direct (median; rounds {:.3}–{:.3}{})",
                    services(n),
                    s.median,
                    s.min,
                    s.max,
                    conclusive(&s, 0.97)
                ));
            }
        }
    }
    md += "\n### Where redirector loses\n\n";
    if losses.is_empty() {
        md += "Nowhere in this run: every median paired ratio is at least 1 against iptables and \
               nftables and at least 0.97 against direct.\n";
    } else {
        md += "Median paired ratio below 1 against a kube-proxy layout, or below 0.97 against \
               direct:\n\n";
        for l in &losses {
            let _ = writeln!(md, "- {l}");
        }
    }
    md += &cost_section(res);
    md += "\n## Programming N services from scratch\n\nOnce per service count (the beds are \
           then measured as programmed).\n\n| services | redirector (agent start to ready) | \
           iptables-restore | nft -f |\n|---:|---:|---:|---:|\n";
    for &n in counts {
        let _ = writeln!(
            md,
            "| {n} | {:.1} ms | {:.1} ms | {:.1} ms |",
            get(&rows, "redirector", n, "program_ms"),
            get(&rows, "iptables", n, "program_ms"),
            get(&rows, "nftables", n, "program_ms")
        );
    }
    md += "\nThe agent's time includes process start, loading and attaching the eBPF programs and \
           parsing the TOML config.\n";
    md += "\n## Flip: decision to the first new connection on the new target\n\n\
           On the live beds, after the rounds, with the prober pinned like the load and the decision (map write, rule rewrite, signal to the agent) made on a CPU of its own when one is left. The measured service moves between its two pod \
           endpoints and the node-local activator (and back); a prober in the client namespace \
           opens new connections back to back from the decision on. `redirector: map write` \
           writes `SERVICES[vip].mode` in the pinned map (what the agent does); `config + \
           SIGHUP` rewrites the agent's config file and signals it (parse + diff + write); \
           `full` rewrites kube-proxy's whole rule set with the one service changed; `partial` \
           is kube-proxy's MinimizeIPTablesRestore (KUBE-SERVICES in full + the changed \
           chains); `incremental` is the nftables proxier's transaction for one changed \
           service. At 10,000 services the full rewrites are timed towards the activator only \
           (one iptables-restore takes tens of seconds) and the way back is the partial / \
           incremental one. Each bed ends as it started (checked: the VIP answers from the \
           pods only).\n\n";
    md += "| services | method | median | p99 | max | flips | probes needed (max) | vs redirector map write |\n|---:|---|---:|---:|---:|---:|---:|---:|\n";
    for r in &flip_rows {
        let n = r["services"].as_u64().unwrap_or(0) as usize;
        let med = r["median_us"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} | {} | {:.0}x |",
            r["method"].as_str().unwrap_or(""),
            fmt_us(med),
            fmt_us(r["p99_us"].as_f64().unwrap_or(f64::NAN)),
            fmt_us(r["max_us"].as_f64().unwrap_or(f64::NAN)),
            r["count"],
            r["max_probes"],
            med / flip("redirector: map write", n)
        );
    }
    if let Some(dp) = &dp {
        let _ = writeln!(
            md,
            "\nIn-kernel figure from `datapath.json` (BPF_PROG_TEST_RUN, {} services): map write \
             {:.1} us, write to first packet on the new target {:.1} us (median). The \
             end-to-end numbers above add a real TCP connection (SYN..response) per probe.",
            dp["services"],
            dp["flip_us"]["write_median"].as_f64().unwrap_or(f64::NAN),
            dp["flip_us"]["median"].as_f64().unwrap_or(f64::NAN)
        );
    } else {
        md += "\n(`datapath.json` not present: run `--datapath` for the in-kernel map-write figure.)\n";
    }
    scale::markdown(&mut md, scale);
    md += "\n## Targets\n\nJudged on the median paired ratios above.\n\n";
    let t = |k: &str| targets[k]["verdict"].as_str().unwrap_or("?").to_owned();
    let _ = writeln!(
        md,
        "- kept-alive req/s through the VIP >= 97% of direct to the pod, at every count \
         (`host_routing = \"kernel\"`, the default): **{}** — {}",
        t("keepalive_ge_97pct_of_direct"),
        ka.iter()
            .map(|(n, s)| format!("{n}: {}", s.ratio()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "- the same with `host_routing = \"bpf\"` (redirector-bpf): **{}** — {}",
        t("keepalive_ge_97pct_of_direct_bpf_host_routing"),
        kab.iter()
            .map(|(n, s)| format!("{n}: {}", s.ratio()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "- new connections/s at 10,000 services >= 2x iptables and >= nftables: **{}** — \
         redirector / iptables {}, redirector / nftables {} (medians: redirector {}, iptables \
         {}, nftables {} conn/s)",
        t("newconn_10k_ge_2x_iptables_and_ge_nftables"),
        ri10.ratio(),
        rn10.ratio(),
        fmt_rate(nc("redirector", 10_000)),
        fmt_rate(nc("iptables", 10_000)),
        fmt_rate(nc("nftables", 10_000))
    );
    let _ = writeln!(
        md,
        "- new connections/s at 1 service >= iptables and >= nftables: **{}** — redirector / \
         iptables {}, redirector / nftables {} (medians: redirector {}, iptables {}, nftables \
         {} conn/s)",
        t("newconn_1_ge_iptables_and_nftables"),
        ri1.ratio(),
        rn1.ratio(),
        fmt_rate(nc("redirector", 1)),
        fmt_rate(nc("iptables", 1)),
        fmt_rate(nc("nftables", 1))
    );
    let _ = writeln!(
        md,
        "- flip >= 100x faster than iptables-restore at 10,000 services: **{}** — {}",
        t("flip_ge_100x_faster_than_iptables_restore_10k"),
        if flip_x.is_finite() {
            format!(
                "{flip_x:.0}x (iptables full restore {} vs redirector map write {})",
                fmt_us(flip("iptables: full restore", 10_000)),
                fmt_us(flip("redirector: map write", 10_000))
            )
        } else {
            "-".into()
        }
    );
    if !res.errors.is_empty() {
        md += "\n## Errors (the run went on)\n\n";
        for e in &res.errors {
            let _ = writeln!(md, "- {}", e.replace('\n', " / "));
        }
    }
    md += "\n## Time\n\n| services | build + program beds | rounds | flips | teardown |\n|---:|---:|---:|---:|---:|\n";
    for (n, p) in &res.phases {
        let _ = writeln!(
            md,
            "| {n} | {:.0} s | {:.0} s | {:.0} s | {:.0} s |",
            p[0], p[1], p[2], p[3]
        );
    }
    let _ = writeln!(
        md,
        "\nTotal time of this part: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    println!("\n{md}");

    let out = json!({
        "quick": plan.quick,
        "machine": m,
        "rounds": plan.rounds,
        "run_secs": plan.run.as_secs_f64(),
        "warmup_secs": plan.warm.as_secs_f64(),
        "newconn_warmup_secs": plan.warm_newconn.as_secs_f64(),
        "wrk_connections": plan.wrk_conns,
        "newconn_threads": plan.gen_threads,
        "pinning": plan.describe_pinning(),
        "pinning_reason": pin_reason(plan),
        "rows": rows,
        "head_to_head": counts.iter().map(|&n| json!({
            "services": n,
            "keepalive_vs_iptables": head_to_head(res, n, Variant::Iptables, Metric::Keepalive).json(),
            "keepalive_vs_nftables": head_to_head(res, n, Variant::Nftables, Metric::Keepalive).json(),
            "newconn_vs_iptables": head_to_head(res, n, Variant::Iptables, Metric::Newconn).json(),
            "newconn_vs_nftables": head_to_head(res, n, Variant::Nftables, Metric::Newconn).json(),
        })).collect::<Vec<_>>(),
        "redirector_loses": losses,
        "datapath_cost": res.costs.iter().map(|(n, c)| json!({"services": n,
            "keepalive": c.keepalive.as_ref().map(|p| p.json()),
            "newconn": c.newconn.as_ref().map(|p| p.json()),
            "floor_keepalive": c.floor.as_ref().map(|p| p.json())})).collect::<Vec<_>>(),
        "flips": flip_rows,
        "scale": scale::json(scale),
        "phases_secs": res.phases.iter().map(|(n, p)| json!({"services": n, "build_program": p[0],
            "rounds": p[1], "flips": p[2], "teardown": p[3]})).collect::<Vec<_>>(),
        "errors": res.errors,
        "targets": targets,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/perf");
    std::fs::write(
        dir.join("node.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .expect("writing node.json");
    std::fs::write(dir.join("node.md"), &md).expect("writing node.md");
    out
}

/// The programs' own CPU per request beside the whole machine's (`cost.rs`).
fn cost_section(res: &Results) -> String {
    let mut md = String::from(
        "\n## The datapath's own cost per request\n\nOn the redirector bed after the rounds (kept-alive: the median of three runs by program time), \
         with the kernel's BPF run-time statistics on (`kernel.bpf_stats_enabled`; they add \
         two clock reads to each program run, so they are off during the rounds): the run time \
         of the agent's attached programs (tc ingress and egress on both pod interfaces) per \
         request or connection, beside the busy CPU time over the same run of the CPUs the run \
         is pinned to (/proc/stat: user, system, irq, softirq; client, server and forwarding \
         together; every CPU when unpinned). The share is what the programs can take from a CPU-bound throughput: a \
         kept-alive ratio to direct much below 1 - share is the beds' noise, not the \
         datapath. The agent's own CPU over the run (its periodic work) is shown apart. `by \
         program`: runs each x ns per run of each program, over the interfaces it is attached \
         to. `empty-tc (the floor)`: the same kept-alive measurement on the `empty-tc` bed, \
         whose four hooks run the empty program: its ns per run is what the statistics add \
         to every run (two clock reads) plus an empty program, so redirector's programs \
         cost about their ns per run minus that.\n\n\
         | services | run | completed | program runs each | ns per run | program time each | \
         CPU each | programs' share | agent CPU each | by program |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    if res.costs.is_empty() {
        md += "| - | not measured | | | | | | | | |\n";
    }
    for (n, c) in &res.costs {
        for (name, p) in [
            ("kept-alive requests", &c.keepalive),
            ("new connections", &c.newconn),
            ("kept-alive, empty-tc (the floor)", &c.floor),
        ] {
            if let Some(p) = p {
                let by = p
                    .by_prog
                    .iter()
                    .map(|(prog, runs, ns)| format!("{prog}: {runs:.1} x {ns:.0} ns"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = writeln!(
                    md,
                    "| {n} | {name} | {} | {:.1} | {:.0} ns | {:.0} ns | {:.1} us | {:.2}% | {:.0} ns | {by} |",
                    p.ops,
                    p.runs_per_op,
                    p.ns_per_run,
                    p.prog_ns_per_op,
                    p.cpu_ns_per_op / 1e3,
                    p.share() * 100.0,
                    p.agent_ns_per_op,
                );
            }
        }
    }
    md
}

/// Why the rounds are pinned as they are.
fn pin_reason(plan: &Plan) -> String {
    if plan.pin == super::PIN_DEFAULT {
        super::PIN_REASON.into()
    } else {
        format!(
            "Set by NODE_PIN={:?} for this run (the default's reason: {})",
            plan.pin,
            super::PIN_REASON
        )
    }
}

/// The method paragraph.
fn method(plan: &Plan, m: &Value) -> String {
    format!(
        "Client, node and backend in three network namespaces on this one machine ({} CPUs; \
         client, server and forwarding share the CPUs the pinning below names, so a rate is \
         the whole path's: the load generator's, the server's and the forwarding's). For each \
         service count every variant gets its own client, node and backend namespaces (so \
         iptables / nftables rules are never in another variant's path), all built and \
         programmed once; then {} round(s) run over these live beds, one slot per variant per \
         round, the variant order rotated every round; then the flips; then the beds are torn \
         down. `direct-b` is a second direct bed measured the same way: the A/A control, \
         whose ratio to direct shows how far two identical paths drift apart in this run. \
         `empty-tc` is direct with an empty tc program on the four hooks redirector uses \
         (TCX ingress and egress of both pod interfaces): the floor of any tc datapath, what \
         hooking the path costs before a program does any work. `redirector` runs the agent \
         with its default `host_routing = \"kernel\"` (translated packets are forwarded by the \
         node's IP stack, as direct's are); `redirector-bpf` with `host_routing = \"bpf\"` \
         (translated packets to the pod go from tc straight into the pod's namespace, \
         `bpf_fib_lookup` + `bpf_redirect_peer`, skipping the node's forwarding path that \
         direct still takes). A slot: the connection tracking on the bed's path is emptied (the node \
         namespace's kernel conntrack table for iptables / nftables, the agent's CONNTRACK map \
         for redirector), then `wrk -t{} -c{}` for {} s as warm-up and {} s measured \
         (kept-alive), then {} in-process clients doing connect + GET + close for {} s as \
         warm-up and {} s measured (new connections; latency = the whole connection). CPU \
         pinning: {}. {} Ratios are paired: each round's variant divided by direct (or \
         redirector by iptables / nftables) of the same round; tables give the median of \
         those ratios with their min–max, beside the medians of the absolute numbers. The \
         measured service is the last of N in KUBE-SERVICES.\n\n",
        m["nproc"].as_str().unwrap_or("?"),
        plan.rounds,
        super::load::wrk_threads(&plan.pinning(0, Metric::Keepalive)),
        plan.wrk_conns,
        plan.warm.as_secs(),
        plan.run.as_secs(),
        plan.gen_threads,
        plan.warm_newconn.as_secs_f64(),
        plan.run.as_secs(),
        plan.describe_pinning(),
        pin_reason(plan),
    )
}

/// `NODE_PIN=ab`: pinned and unpinned rounds alternate (ABBA) over the same live beds; the
/// spread across rounds of each, to choose. Written to `target/perf/experiments/`.
pub(super) fn pin_experiment(plan: &Plan, res: &Results, started: Instant) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# CPU pinning experiment (NODE_PIN=ab)\n\n{} rounds per count, pinned ({}) and \
         unpinned alternating ABBA; run {} s, warm-up {} s. Spread = (max - min) / median over \
         that mode's rounds.\n",
        plan.rounds,
        match plan.pin {
            super::PinMode::Ab(l) => l.pinning().describe(),
            _ => super::pin::Pinning::split().describe(),
        },
        plan.run.as_secs(),
        plan.warm.as_secs()
    );
    md += "| services | variant | metric | pinned median | pinned spread | unpinned median | unpinned spread | pinned vs-direct ratio (min–max) | unpinned vs-direct ratio (min–max) | p99 pinned / unpinned |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let mut rows = Vec::new();
    let mut sums = [[0.0f64; 2]; 2]; // [mode][abs spread, ratio range], summed
    let mut cnt = [[0usize; 2]; 2]; // [mode][rates, ratios]
    for &n in &plan.counts {
        for v in VARIANTS {
            for (mname, mt) in [
                ("kept-alive", Metric::Keepalive),
                ("new conn", Metric::Newconn),
            ] {
                let mut cells = Vec::new();
                let mut js = json!({"services": n, "variant": v.name(), "metric": mname});
                for (i, pinned) in [true, false].into_iter().enumerate() {
                    let keep = move |s: &super::rounds::Slot| s.pinned == pinned;
                    let abs = Spread::of(&values(res, v, n, mt, |l| l.rate, &keep));
                    let ratio = Spread::of(&paired(res, v, Variant::Direct, n, mt, &keep));
                    let p99 = median(&values(res, v, n, mt, |l| l.p99_us, &keep));
                    cells.push((abs, ratio, p99));
                    js[if pinned { "pinned" } else { "unpinned" }] = json!({
                        "rate": abs.json(), "rel_range": abs.rel_range(), "vs_direct": ratio.json(),
                        "p99_us": p99});
                    if abs.rel_range().is_finite() {
                        sums[i][0] += abs.rel_range();
                        cnt[i][0] += 1;
                        if v != Variant::Direct {
                            sums[i][1] += ratio.max - ratio.min;
                            cnt[i][1] += 1;
                        }
                    }
                }
                let _ = writeln!(
                    md,
                    "| {n} | {} | {mname} | {} | {:.1}% | {} | {:.1}% | {} | {} | {} / {} |",
                    v.name(),
                    fmt_rate(cells[0].0.median),
                    cells[0].0.rel_range() * 100.0,
                    fmt_rate(cells[1].0.median),
                    cells[1].0.rel_range() * 100.0,
                    if v == Variant::Direct {
                        "-".into()
                    } else {
                        cells[0].1.ratio()
                    },
                    if v == Variant::Direct {
                        "-".into()
                    } else {
                        cells[1].1.ratio()
                    },
                    fmt_us(cells[0].2),
                    fmt_us(cells[1].2),
                );
                rows.push(js);
            }
        }
    }
    let _ = writeln!(
        md,
        "\nMean spread of the absolute rates: pinned {:.1}%, unpinned {:.1}%. Mean min–max \
         width of the paired vs-direct ratios: pinned {:.3}, unpinned {:.3}. Total {:.0} s.",
        sums[0][0] / cnt[0][0].max(1) as f64 * 100.0,
        sums[1][0] / cnt[1][0].max(1) as f64 * 100.0,
        sums[0][1] / cnt[0][1].max(1) as f64,
        sums[1][1] / cnt[1][1].max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    println!("\n{md}");
    let dir = out_dir().join("experiments");
    std::fs::create_dir_all(&dir).expect("creating target/perf/experiments");
    std::fs::write(dir.join("node-pin.md"), &md).expect("writing node-pin.md");
    std::fs::write(
        dir.join("node-pin.json"),
        serde_json::to_string_pretty(&json!({"rows": rows, "errors": res.errors})).unwrap(),
    )
    .expect("writing node-pin.json");
    println!("wrote {}", dir.join("node-pin.{md,json}").display());
}
