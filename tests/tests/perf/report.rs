//! The perf report: merges every part found in `target/perf` (`datapath`, `node`, and any
//! other `<part>.json` + `<part>.md`, e.g. the activator's) into `report.md`, `report.json`
//! and hand-written SVG bar charts beside them.
use std::{fmt::Write as _, path::Path, time::SystemTime};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

use super::{machine, out_dir, LOCK};

const COLORS: [&str; 8] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d",
];

/// A grouped bar chart: `values[group][series]` (NaN = no bar).
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub groups: Vec<String>,
    pub series: Vec<String>,
    pub values: Vec<Vec<f64>>,
    pub log: bool,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn short(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{:.0}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// The chart as a standalone SVG document.
pub fn svg(c: &Chart) -> String {
    let ns = c.series.len().max(1);
    let bar = 26.0;
    let gap = 34.0;
    let (left, right, bottom) = (78.0, 20.0, 56.0);
    let longest = c.groups.iter().map(|g| g.len()).max().unwrap_or(0) as f64;
    let group_w = (ns as f64 * bar + gap).max(longest * 6.2 + 12.0);
    let width = (left + right + group_w * c.groups.len() as f64).max(640.0);
    // Legend entries, wrapped into rows that fit the width.
    let mut legend = Vec::new();
    let (mut lx, mut ly) = (left, 32.0);
    for name in &c.series {
        let w = 24.0 + 6.5 * name.len() as f64;
        if lx + w > width - right && lx > left {
            lx = left;
            ly += 16.0;
        }
        legend.push((lx, ly, name));
        lx += w;
    }
    let top = ly + 30.0;
    let height = top + 260.0 + bottom;
    let plot_h = height - top - bottom;
    let finite: Vec<f64> = c
        .values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let max = finite.iter().copied().fold(0.0f64, f64::max).max(1e-9);
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let (lo, hi) = if c.log {
        let lo = 10f64.powf(min.log10().floor()).max(1e-9);
        let hi = 10f64.powf(max.log10().ceil());
        (lo, if hi <= lo { lo * 10.0 } else { hi })
    } else {
        let step = nice_step(max / 5.0);
        (0.0, (max / step).ceil() * step)
    };
    let y = |v: f64| -> f64 {
        let f = if c.log {
            (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
        } else {
            v / hi
        };
        top + plot_h * (1.0 - f.clamp(0.0, 1.0))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{:.0}" y="20" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
        width / 2.0,
        esc(&c.title)
    );
    for (i, (lx, ly, name)) in legend.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="{ly:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
            COLORS[i % COLORS.len()],
            lx + 16.0,
            ly + 10.0,
            esc(name)
        );
    }
    // Axis and grid.
    let ticks: Vec<f64> = if c.log {
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        t
    } else {
        let step = nice_step(hi / 5.0);
        (0..=((hi / step).round() as usize))
            .map(|k| k as f64 * step)
            .collect()
    };
    for t in ticks {
        let ty = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - right,
            left - 6.0,
            ty + 4.0,
            short(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{:.0}" stroke="black"/><line x1="{left}" x2="{:.0}" y1="{:.0}" y2="{:.0}" stroke="black"/>"#,
        top + plot_h,
        width - right,
        top + plot_h,
        top + plot_h
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.0}) rotate(-90)" text-anchor="middle">{}{}</text>"#,
        top + plot_h / 2.0,
        esc(&c.unit),
        if c.log { " (log scale)" } else { "" }
    );
    // Bars.
    for (g, name) in c.groups.iter().enumerate() {
        let gx = left + (group_w - ns as f64 * bar) / 2.0 + g as f64 * group_w;
        for (k, v) in c.values.get(g).into_iter().flatten().enumerate() {
            let x = gx + k as f64 * bar;
            if !v.is_finite() || *v <= 0.0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">n/a</text>"##,
                    x + bar / 2.0,
                    top + plot_h - 4.0
                );
                continue;
            }
            let by = y(*v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                bar - 3.0,
                (top + plot_h - by).max(0.5),
                COLORS[k % COLORS.len()],
                esc(&c.series[k]),
                short(*v),
                x + (bar - 3.0) / 2.0,
                by - 3.0,
                short(*v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.0}" text-anchor="middle">{}</text>"#,
            gx + ns as f64 * bar / 2.0,
            top + plot_h + 18.0,
            esc(name)
        );
    }
    s += "</svg>\n";
    s
}

fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * p
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Charts of the node part.
fn node_charts(node: &Value) -> Vec<(String, Chart)> {
    let rows = node["rows"].as_array().cloned().unwrap_or_default();
    let mut counts: Vec<u64> = rows.iter().filter_map(|r| r["services"].as_u64()).collect();
    counts.sort();
    counts.dedup();
    // "direct-b" is the A/A control (a second direct bed): its ratio is the noise floor.
    let variants = ["direct", "direct-b", "redirector", "iptables", "nftables"];
    let nat = &variants[2..];
    let get = |v: &str, n: u64, k: &str| {
        rows.iter()
            .find(|r| r["variant"] == v && r["services"] == n)
            .map(|r| f(&r[k]))
            .unwrap_or(f64::NAN)
    };
    let groups: Vec<String> = counts.iter().map(|n| format!("{n} services")).collect();
    let by = |k: &str, vs: &[&str]| -> Vec<Vec<f64>> {
        counts
            .iter()
            .map(|&n| vs.iter().map(|v| get(v, n, k)).collect())
            .collect()
    };
    // Paired ratios: `k` is {"median", "min", "max", ...} per row.
    let ratio = |k: &str, vs: &[&str]| -> Vec<Vec<f64>> {
        counts
            .iter()
            .map(|&n| {
                vs.iter()
                    .map(|v| {
                        rows.iter()
                            .find(|r| r["variant"] == *v && r["services"] == n)
                            .map(|r| f(&r[k]["median"]))
                            .unwrap_or(f64::NAN)
                    })
                    .collect()
            })
            .collect()
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut out = vec![
        (
            "node-keepalive.svg".into(),
            Chart {
                title: "Kept-alive requests/s through the VIP (wrk)".into(),
                unit: "requests/s".into(),
                groups: groups.clone(),
                series: s(&variants),
                values: by("keepalive_rps", &variants),
                log: false,
            },
        ),
        (
            "node-newconn.svg".into(),
            Chart {
                title: "New connections/s through the VIP (connect + GET + close)".into(),
                unit: "connections/s".into(),
                groups: groups.clone(),
                series: s(&variants),
                values: by("newconn_cps", &variants),
                log: false,
            },
        ),
        (
            "node-keepalive-ratio.svg".into(),
            Chart {
                title: "Kept-alive req/s vs direct to the pod (median of per-round paired ratios)"
                    .into(),
                unit: "x direct".into(),
                groups: groups.clone(),
                series: s(&variants[1..]),
                values: ratio("keepalive_vs_direct", &variants[1..]),
                log: false,
            },
        ),
        (
            "node-newconn-ratio.svg".into(),
            Chart {
                title: "New connections/s vs direct to the pod (median of per-round paired ratios)"
                    .into(),
                unit: "x direct".into(),
                groups: groups.clone(),
                series: s(&variants[1..]),
                values: ratio("newconn_vs_direct", &variants[1..]),
                log: false,
            },
        ),
        (
            "node-newconn-p99.svg".into(),
            Chart {
                title: "New-connection latency p99 (whole connection)".into(),
                unit: "us".into(),
                groups: groups.clone(),
                series: s(&variants),
                values: by("newconn_p99_us", &variants),
                log: false,
            },
        ),
        (
            "node-program.svg".into(),
            Chart {
                title: "Programming N services from scratch".into(),
                unit: "ms".into(),
                groups: groups.clone(),
                series: s(nat),
                values: by("program_ms", nat),
                log: true,
            },
        ),
    ];
    let flips = node["flips"].as_array().cloned().unwrap_or_default();
    if !flips.is_empty() {
        let mut methods: Vec<String> = flips
            .iter()
            .filter_map(|r| r["method"].as_str().map(str::to_owned))
            .collect();
        methods.sort();
        methods.dedup();
        let mut fc: Vec<u64> = flips
            .iter()
            .filter_map(|r| r["services"].as_u64())
            .collect();
        fc.sort();
        fc.dedup();
        let values = fc
            .iter()
            .map(|&n| {
                methods
                    .iter()
                    .map(|m| {
                        flips
                            .iter()
                            .find(|r| r["method"] == m.as_str() && r["services"] == n)
                            .map(|r| f(&r["median_us"]))
                            .unwrap_or(f64::NAN)
                    })
                    .collect()
            })
            .collect();
        out.push((
            "node-flip.svg".into(),
            Chart {
                title: "Flip: decision to first new connection on the new target (median)".into(),
                unit: "us".into(),
                groups: fc.iter().map(|n| format!("{n} services")).collect(),
                series: methods,
                values,
                log: true,
            },
        ));
    }
    let scale: Vec<Value> = node["scale"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["ok"] == true)
        .collect();
    if !scale.is_empty() {
        out.push((
            "node-scale.svg".into(),
            Chart {
                title: "Agent: BPF map memory and RSS".into(),
                unit: "MiB".into(),
                groups: scale
                    .iter()
                    .map(|s| format!("{} services", s["services"]))
                    .collect(),
                series: vec!["map memlock".into(), "agent RSS".into()],
                values: scale
                    .iter()
                    .map(|s| {
                        vec![
                            f(&s["memlock_bytes"]) / 1048576.0,
                            f(&s["agent_rss_kib"]) / 1024.0,
                        ]
                    })
                    .collect(),
                log: false,
            },
        ));
    }
    out
}

/// Chart of the datapath part: ns/packet beside the empty program (repeat method).
fn datapath_charts(dp: &Value) -> Vec<(String, Chart)> {
    let rows: Vec<Value> = dp["paths"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["method"] == "repeat")
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    vec![(
        "datapath.svg".into(),
        Chart {
            title: "Datapath ns/packet (BPF_PROG_TEST_RUN, repeat) vs the empty program".into(),
            unit: "ns/packet".into(),
            groups: rows
                .iter()
                .map(|r| {
                    format!(
                        "{} @{}",
                        r["path"].as_str().unwrap_or(""),
                        r["hook"].as_str().unwrap_or("")
                    )
                })
                .collect(),
            series: vec!["redirector".into(), "empty program".into()],
            values: rows
                .iter()
                .map(|r| vec![f(&r["ns_per_packet"]), f(&r["empty_ns_per_packet"])])
                .collect(),
            log: false,
        },
    )]
}

/// Chart of the activator part: wrk throughput through the activator, nginx and haproxy,
/// and direct to the instance (median of the interleaved rounds).
fn activator_charts(act: &Value) -> Vec<(String, Chart)> {
    let m = &act["throughput"]["median"];
    if !m.is_object() {
        return Vec::new();
    }
    let cols = ["activator", "nginx", "haproxy", "direct"];
    vec![(
        "activator-throughput.svg".into(),
        Chart {
            title: "Throughput: activator vs nginx vs haproxy (wrk, kept-alive, median)".into(),
            unit: "req/s".into(),
            groups: vec!["GET / through the proxy".into()],
            series: cols.iter().map(|c| c.to_string()).collect(),
            values: vec![cols.iter().map(|c| f(&m[*c])).collect()],
            log: false,
        },
    )]
}

fn age(p: &Path) -> String {
    let secs = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if secs < 120 {
        format!("{secs} s ago")
    } else if secs < 7200 {
        format!("{} min ago", secs / 60)
    } else {
        format!("{} h ago", secs / 3600)
    }
}

/// Demotes markdown headings one level (parts are sections of the report).
fn demote(md: &str) -> String {
    md.lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("#{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Merges whatever parts exist in `target/perf` into `report.{md,json}` and SVG plots.
pub fn write_report() -> Result<()> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let stem = n.strip_suffix(".json")?.to_owned();
            (stem != "report").then_some(stem)
        })
        .collect();
    // The order parts appear in: datapath, activator, node, then the rest.
    let rank = |n: &str| match n {
        "datapath" => 0,
        "activator" => 1,
        "node" => 2,
        _ => 3,
    };
    names.sort_by_key(|n| (rank(n), n.clone()));
    let mut parts = Map::new();
    let mut targets = Vec::new();
    let mut plots: Vec<(String, String)> = Vec::new();
    let mut sections = String::new();
    for name in &names {
        let jp = dir.join(format!("{name}.json"));
        let Ok(v) = std::fs::read_to_string(&jp)
            .map_err(anyhow::Error::from)
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(Into::into))
        else {
            continue;
        };
        if let Some(t) = v["targets"].as_object() {
            for (k, tv) in t {
                let verdict = tv["verdict"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| match tv["met"].as_bool() {
                        Some(true) => "met".into(),
                        Some(false) => "NOT met".into(),
                        None => "?".into(),
                    });
                let mut detail = tv.clone();
                if let Some(o) = detail.as_object_mut() {
                    o.remove("met");
                    o.remove("verdict");
                }
                targets.push(json!({"part": name, "target": k, "verdict": verdict,
                    "met": tv["met"], "detail": detail}));
            }
        }
        let charts = match name.as_str() {
            "node" => node_charts(&v),
            "datapath" => datapath_charts(&v),
            "activator" => activator_charts(&v),
            _ => Vec::new(),
        };
        let _ = writeln!(
            sections,
            "\n## Part `{name}` ({}{})\n",
            age(&jp),
            if v["quick"] == true {
                ", --quick: numbers not meaningful"
            } else {
                ""
            }
        );
        for (file, chart) in &charts {
            std::fs::write(dir.join(file), svg(chart))
                .with_context(|| format!("writing {file}"))?;
            plots.push((file.clone(), chart.title.clone()));
            let _ = writeln!(sections, "![{}]({file})\n", chart.title);
        }
        match std::fs::read_to_string(dir.join(format!("{name}.md"))) {
            Ok(md) => sections += &demote(&md),
            Err(_) => sections += "(no markdown summary; see report.json)\n",
        }
        sections += "\n";
        parts.insert(name.clone(), v);
    }
    let m = machine();
    let mut md = String::new();
    md += "# redirector performance report\n\n";
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), {} MiB RAM, kernel {}; {}; {}; {}.\n",
        m["nproc"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["memory"].as_str().unwrap_or("?").trim_end_matches(" MiB"),
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
        m["wrk"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Parts found in `target/perf`: {}. Each part's age is shown in its heading: a part from \
         an earlier run is merged as it was.\n",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
    md += "## Targets\n\n| part | target | verdict | detail |\n|---|---|---|---|\n";
    for t in &targets {
        let _ = writeln!(
            md,
            "| {} | {} | **{}** | `{}` |",
            t["part"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            t["verdict"].as_str().unwrap_or(""),
            t["detail"].to_string().replace('|', "/")
        );
    }
    if !plots.is_empty() {
        md += "\nPlots: ";
        md += &plots
            .iter()
            .map(|(f, _)| format!("[{f}]({f})"))
            .collect::<Vec<_>>()
            .join(", ");
        md += "\n";
    }
    md += &sections;
    let report = json!({
        "generated_unix": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": m,
        "parts": parts,
        "targets": targets,
        "plots": plots.iter().map(|(f, t)| json!({"file": f, "title": t})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "wrote {} ({} parts, {} plots)",
        dir.join("report.{md,json}").display(),
        names.len(),
        plots.len()
    );
    Ok(())
}

/// Runs after the parts (tests run in name order with `--test-threads=1`, and this one sorts
/// after `node::node`), whichever were selected.
#[test]
#[ignore = "benchmark report: run by `cargo xtask perf`"]
fn report() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    write_report().expect("writing the report");
}

#[test]
fn svg_chart_is_well_formed() {
    let c = Chart {
        title: "t <x>".into(),
        unit: "u".into(),
        groups: vec!["a".into(), "b".into()],
        series: vec!["s1".into(), "s2".into()],
        values: vec![vec![1.0, 2.0], vec![f64::NAN, 1000.0]],
        log: true,
    };
    let s = svg(&c);
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    assert!(s.contains("t &lt;x&gt;") && s.contains("n/a"));
}
