//! `flip` (`--flip`, or no scenario flag): the time a request spends on the wrong side of a
//! mode flip, with ingress traffic (the `ingress` test cluster, `redirector_tests::ingress`:
//! a Kourier-like gateway that sends to the revision's public EndpointSlice addresses, an
//! SKS reconciler stand-in that rewrites them 1 s after `spec.mode` flips, Knative's
//! activator stand-in). Under load through the gateway, N flips Serve→Proxy and
//! Proxy→Serve, twice: first the gateway alone (no agent: the side changes when the public
//! slices do, Knative's propagation delay), then with the agent (its map write decides).
//! Per direction: median and max, over the flips, of the time from the SKS write to the
//! start of the last request served on the old mode's side. Reported, never asserted
//! (a timing); the scenario fails if any request fails. Results:
//! `target/perf/flip.{json,md}`.
use std::time::Duration;

use redirector_tests::{
    ingress::{
        cluster::Cluster,
        load::{flip_rows, print_rows, FlipRow, Rec, Side, Sides},
    },
    kubeapi::objects::Mode,
};
use serde_json::{json, Value};

/// The revision's pod (host number in the test cluster).
const POD_HOST: u8 = 25;
/// Client threads of the load through the gateway.
const CLIENTS: usize = 4;
/// How long each flip is held after the gateway followed it.
const HOLD: Duration = Duration::from_millis(300);

/// One phase's flips under load: the per-flip rows, and the requests.
struct Phase {
    rows: Vec<FlipRow>,
    requests: usize,
    failed: Vec<Rec>,
}

fn phase(c: &Cluster, flips: usize, agent: bool, sides: &Sides) -> Phase {
    let load = c.load(CLIENTS);
    std::thread::sleep(Duration::from_millis(300));
    let fl = c.flips(flips, agent, HOLD);
    let recs = load.stop();
    let fl = fl.unwrap_or_else(|e| panic!("flips (agent: {agent}): {e:#}"));
    let rows = flip_rows(&recs, &fl, sides);
    print_rows(
        if agent {
            "flip perf, with the agent: requests per flip"
        } else {
            "flip perf, the gateway alone (no agent): requests per flip"
        },
        &rows,
    );
    Phase {
        rows,
        requests: recs.len(),
        failed: recs
            .into_iter()
            .filter(|r| sides.of(r) == Side::Failed)
            .collect(),
    }
}

/// Median and max of the wrong-side times (ms) of the flips in one direction; a flip with
/// nothing on the wrong side after its write counts 0.
fn stats(rows: &[FlipRow], to_proxy: bool) -> (f64, f64, usize) {
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r.to_proxy == to_proxy)
        .map(|r| r.wrong_ms.unwrap_or(0) as f64)
        .collect();
    let n = v.len();
    let med = crate::median(&mut v);
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    (med, max, n)
}

/// Median of when the agent's status first showed the new mode (ms after the SKS write).
fn agent_median(rows: &[FlipRow], to_proxy: bool) -> f64 {
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r.to_proxy == to_proxy)
        .filter_map(|r| r.agent_ms.map(|m| m as f64))
        .collect();
    crate::median(&mut v)
}

fn direction(to_proxy: bool) -> &'static str {
    if to_proxy {
        "Serve→Proxy"
    } else {
        "Proxy→Serve"
    }
}

#[test]
#[ignore = "benchmark: run by `cargo xtask perf` (all parts) or `--flip`"]
fn flip() {
    let a = crate::selection("--flip");
    if !a.on {
        println!("skipped: PERF_ARGS selects no flip benchmark");
        return;
    }
    redirector_tests::require_root!();
    // Flips per phase: half each direction.
    let flips = if a.quick { 4 } else { 20 };
    println!(
        "flip perf: {flips} flips per phase (gateway alone, then with the agent), {CLIENTS} \
         clients through the gateway, each flip held {HOLD:?} after the gateway followed"
    );
    let mut c = Cluster::new("pf", Mode::Serve, Some(POD_HOST))
        .unwrap_or_else(|e| panic!("the ingress cluster: {e:#}"));
    let sides = c.sides();
    let alone = phase(&c, flips, false, &sides);
    c.start_agent()
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    c.wait_agent("serve")
        .unwrap_or_else(|e| panic!("the agent's maps: {e:#}"));
    let agent = phase(&c, flips, true, &sides);

    let mut md = String::new();
    md += "# Wrong side of a flip (ingress traffic)\n\n";
    md += &format!(
        "{flips} flips per phase (half each direction) under load ({CLIENTS} clients, a new \
         upstream connection per request) through a Kourier-like gateway that sends to the \
         revision's public EndpointSlice addresses, rewritten by an SKS reconciler stand-in \
         {} ms after `spec.mode` flips (a real ingress's propagation). Wrong side: Serve→Proxy, \
         the pod straight from the gateway; Proxy→Serve, through an activator (node-local or \
         Knative's). Time: from the SKS write to the start of the last request on the wrong \
         side (0 when none); median and max over the flips. Reported, not asserted.\n\n",
        redirector_tests::ingress::sks::DEFAULT_DELAY.as_millis()
    );
    md += "| direction | setup | flips | median ms | max ms | agent's status showed it (median ms) |\n\
           |---|---|---:|---:|---:|---:|\n";
    let mut dirs = Vec::new();
    for to_proxy in [true, false] {
        let (am, ax, an) = stats(&agent.rows, to_proxy);
        let (gm, gx, gn) = stats(&alone.rows, to_proxy);
        let status = agent_median(&agent.rows, to_proxy);
        md += &format!(
            "| {} | agent (map write) | {an} | {am:.0} | {ax:.0} | {status:.0} |\n",
            direction(to_proxy)
        );
        md += &format!(
            "| {} | gateway alone (propagation) | {gn} | {gm:.0} | {gx:.0} | - |\n",
            direction(to_proxy)
        );
        dirs.push(json!({
            "direction": direction(to_proxy),
            "to_proxy": to_proxy,
            "agent": {"flips": an, "median_ms": am, "max_ms": ax, "status_median_ms": status},
            "gateway_alone": {"flips": gn, "median_ms": gm, "max_ms": gx},
        }));
    }
    md += &format!(
        "\nRequests: {} with the gateway alone, {} with the agent; failed: {} and {}. \
         Proxy→Serve with the agent: requests the gateway still addresses to Knative's \
         activator go to the node-local activator (its address is always switched), which \
         forwards them to the ready pod, until the gateway follows the public slice.\n",
        alone.requests,
        agent.requests,
        alone.failed.len(),
        agent.failed.len()
    );
    println!("\n{md}");
    let rows_json = |rows: &[FlipRow]| -> Value {
        rows.iter()
            .map(|r| {
                json!({"to_proxy": r.to_proxy, "wrong_ms": r.wrong_ms, "agent_ms": r.agent_ms,
                    "gateway_ms": r.gateway_ms, "direct": r.direct, "via_node": r.via_node,
                    "knative": r.knative, "failed": r.failed})
            })
            .collect()
    };
    let out = json!({
        "quick": a.quick,
        "flips_per_phase": flips,
        "clients": CLIENTS,
        "propagation_delay_ms": redirector_tests::ingress::sks::DEFAULT_DELAY.as_millis() as u64,
        "directions": dirs,
        "requests": {"gateway_alone": alone.requests, "agent": agent.requests},
        "failed": {"gateway_alone": alone.failed.len(), "agent": agent.failed.len()},
        "flips": {"gateway_alone": rows_json(&alone.rows), "agent": rows_json(&agent.rows)},
    });
    let dir = crate::out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/perf");
    std::fs::write(
        dir.join("flip.json"),
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )
    .expect("writing flip.json");
    std::fs::write(dir.join("flip.md"), &md).expect("writing flip.md");
    println!("wrote {}", dir.join("flip.{json,md}").display());

    // No timed assertion; requests must not fail, and the load must have run.
    for (what, p) in [("the gateway alone", &alone), ("with the agent", &agent)] {
        assert!(
            p.failed.is_empty(),
            "{} of {} requests failed ({what}); first: {:#?}",
            p.failed.len(),
            p.requests,
            &p.failed[..p.failed.len().min(3)]
        );
        assert!(p.requests > 0, "no requests ran ({what})");
        assert_eq!(p.rows.len(), flips, "one row per flip ({what})");
    }
}
