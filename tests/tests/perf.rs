//! Benchmarks run by `cargo xtask perf` (`--ignored`, scenarios in `PERF_ARGS`).
//!
//! `flip` (`--flip`): the wrong side of a mode flip with ingress traffic, see `perf/flip.rs`.
//!
//! `datapath` (`--datapath`, or no scenario flag at all): ns/packet of each datapath path
//! through BPF_PROG_TEST_RUN, beside the empty XDP and tc programs measured in the same run,
//! interleaved, over several rounds (median). Then the mode-flip latency and the programming
//! time at 10,000 services. Results go to `target/perf/datapath.{json,md}`.
//!
//! How each path is measured (BPF_PROG_TEST_RUN keeps the packet between repetitions, so a
//! rewritten packet is what the next repetition sees):
//! - non-VIP: `repeat` over one packet (it never changes).
//! - established / reverse NAT: `repeat` over a ping-pong pair of conntrack entries: the
//!   flow's real entry rewrites the packet, a synthetic entry of the same shape rewrites it
//!   back, so every repetition is a conntrack hit plus a full rewrite.
//! - new flow (Serve, Proxy): a new flow can only be new once, so these are `repeat = 1`
//!   runs over thousands of distinct flows; the empty program is timed the same way on the
//!   same packets (each single run includes the kernel's timer overhead, which the ratio to
//!   the empty program shows). Established and non-VIP are also reported that way, to
//!   compare like with like.
#[path = "perf/activator.rs"]
mod activator;
#[path = "../../redirector/tests/common/mod.rs"]
mod common;
#[path = "perf/flip.rs"]
mod flip;
#[path = "perf/node.rs"]
mod node;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    ct_key, fixture,
    packet::{parse, Spec, TCP},
    scale::ten_thousand_services,
    service_key, Bench, Hook,
};
use redirector::control::monotonic_coarse_ns;
use redirector_common::{CtValue, CT_REPLY, MODE_PROXY, MODE_SERVE};
use serde_json::{json, Value};

/// Which benchmarks `PERF_ARGS` selects: a part runs when its flag is given or when no
/// part is named at all.
pub(crate) struct Selection {
    pub on: bool,
    pub quick: bool,
}

pub(crate) fn selection(part: &str) -> Selection {
    let env = std::env::var("PERF_ARGS").unwrap_or_default();
    let has = |f: &str| env.split_whitespace().any(|a| a == f);
    let any_scenario = ["--datapath", "--activator", "--node", "--flip"]
        .into_iter()
        .any(has);
    Selection {
        on: has(part) || !any_scenario,
        quick: has("--quick"),
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One measured path on one hook: per-round ns of the path and of the empty program.
#[derive(Default)]
struct Series {
    path: Vec<f64>,
    empty: Vec<f64>,
}

struct Row {
    path: &'static str,
    hook: &'static str,
    method: &'static str,
    ns: f64,
    empty_ns: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ns / self.empty_ns
    }
}

fn empty_of(hook: Hook) -> Hook {
    if hook == Hook::Xdp {
        Hook::XdpEmpty
    } else {
        Hook::TcEmpty
    }
}

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Xdp => "xdp",
        Hook::TcIngress => "tc-ingress",
        Hook::TcEgress => "tc-egress",
        Hook::XdpEmpty => "xdp-empty",
        Hook::TcEmpty => "tc-empty",
    }
}

/// Kernel-measured ns per repetition.
fn timed(b: &mut Bench, hook: Hook, pkt: &[u8], repeat: u32) -> f64 {
    let out = b
        .try_run(hook, pkt, repeat)
        .unwrap_or_else(|e| panic!("{hook:?}: {e}"));
    // XDP_PASS; tc: TC_ACT_OK or TC_ACT_UNSPEC (-1: the next program on the hook decides).
    let ok: &[u32] = if hook == Hook::Xdp || hook == Hook::XdpEmpty {
        &[2]
    } else {
        &[0, u32::MAX]
    };
    assert!(ok.contains(&out.ret), "{hook:?} returned {}", out.ret);
    out.ns as f64
}

fn client(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + n)) // 10.244.0.0/16
}

/// Installs the ping-pong pair for a packet `from` that the datapath rewrites to `to`: a
/// synthetic entry of the same kind rewrites `to` back to `from`.
fn ping_pong(b: &mut Bench, from: &Spec, to: &Spec, reply: bool) {
    let fwd = b
        .prog
        .maps()
        .conntrack
        .get(&ct_key(from.src, from.dst, from.proto), 0)
        .expect("the flow's entry exists");
    let back = CtValue {
        nat_saddr: ct_key(from.src, from.dst, from.proto).saddr,
        nat_daddr: ct_key(from.src, from.dst, from.proto).daddr,
        nat_sport: from.src.port().to_be(),
        nat_dport: from.dst.port().to_be(),
        svc_id: fwd.svc_id,
        flags: if reply { CT_REPLY } else { 0 },
        last_seen: monotonic_coarse_ns(),
        ..CtValue::default()
    };
    b.prog
        .maps_mut()
        .conntrack
        .insert(ct_key(to.src, to.dst, to.proto), back, 0)
        .expect("inserting the ping-pong entry");
}

/// Measures every path for one round; returns (name, hook, method, path ns, empty ns).
fn round(
    b: &mut Bench,
    r: u32,
    repeat: u32,
    flows: u32,
    out: &mut Vec<(&'static str, Hook, &'static str, f64, f64)>,
) {
    b.clear_conntrack();
    let vip = fixture::serve_vip(true, TCP);
    let backend = fixture::serve_backend(true, TCP);
    let pvip = fixture::proxy_vip(true, TCP);
    let hooks = [Hook::Xdp, Hook::TcIngress];

    // Repeat-based paths, one flow per hook.
    for (h, hook) in hooks.into_iter().enumerate() {
        let c = SocketAddr::new(client(r * 16 + h as u32), 40_000);
        // non-VIP
        let other = Spec::tcp(&c.to_string(), "10.97.0.1:80")
            .with_flags(0x10)
            .build();
        // established (ping-pong)
        let est = Spec::new(TCP, c, vip).with_flags(0x10);
        let est_to = est.clone().with_dst(backend);
        b.run(hook, &est.build());
        ping_pong(b, &est, &est_to, false);
        assert_eq!(b.run(hook, &est.build()).pkt, est_to.build());
        assert_eq!(b.try_run(hook, &est.build(), 2).unwrap().pkt, est.build());
        // A backend's reply: ingress hooks look it up and pass it as it is; tc egress
        // translates it, after the node's netfilter (measured below).
        let rep = Spec::new(TCP, backend, c).with_flags(0x10);
        let rep_to = rep.clone().with_src(vip);
        ping_pong(b, &rep, &rep_to, true);
        assert_eq!(b.run(hook, &rep.build()).pkt, rep.build());
        assert_eq!(b.run(Hook::TcEgress, &rep.build()).pkt, rep_to.build());
        let (other, est, rep) = (other, est.build(), rep.build());
        for (name, pkt) in [
            ("non-VIP", &other),
            ("established", &est),
            ("reply (passed to egress)", &rep),
        ] {
            let e1 = timed(b, empty_of(hook), pkt, repeat);
            let p = timed(b, hook, pkt, repeat);
            let e2 = timed(b, empty_of(hook), pkt, repeat);
            out.push((name, hook, "repeat", p, (e1 + e2) / 2.0));
        }
    }
    // Reverse NAT on tc egress (where every reply is translated), of the node-local
    // activator's replies.
    {
        let c = SocketAddr::new(client(r * 16 + 8), 40_000);
        let req = Spec::new(TCP, c, pvip);
        b.run(Hook::TcIngress, &req.build());
        let act = fixture::activator(true);
        let rep = Spec::new(TCP, act, c).with_flags(0x10);
        let rep_to = rep.clone().with_src(pvip);
        ping_pong(b, &rep, &rep_to, true);
        assert_eq!(b.run(Hook::TcEgress, &rep.build()).pkt, rep_to.build());
        let pkt = rep.build();
        let e1 = timed(b, Hook::TcEmpty, &pkt, repeat);
        let p = timed(b, Hook::TcEgress, &pkt, repeat);
        let e2 = timed(b, Hook::TcEmpty, &pkt, repeat);
        out.push(("reverse NAT", Hook::TcEgress, "repeat", p, (e1 + e2) / 2.0));
    }

    // Single-shot paths over distinct flows: new Serve, new Proxy, and (for comparison)
    // established and non-VIP.
    for (h, hook) in hooks.into_iter().enumerate() {
        let mut s: [Series; 4] = Default::default();
        let base = r * 16 + 4 + h as u32 * 2;
        for i in 0..flows {
            let c = SocketAddr::new(client(base), 1024 + i as u16);
            let c2 = SocketAddr::new(client(base + 1), 1024 + i as u16);
            let serve = Spec::new(TCP, c, vip).build();
            let proxy = Spec::new(TCP, c2, pvip).build();
            let other = Spec::new(TCP, c, "10.97.0.1:80".parse().unwrap()).build();
            for (k, pkt) in [&serve, &proxy].into_iter().enumerate() {
                let e = timed(b, empty_of(hook), pkt, 1);
                let p = timed(b, hook, pkt, 1);
                s[k].path.push(p);
                s[k].empty.push(e);
            }
            // The serve flow now exists: its second packet is established.
            let e = timed(b, empty_of(hook), &serve, 1);
            let p = timed(b, hook, &serve, 1);
            s[2].path.push(p);
            s[2].empty.push(e);
            let e = timed(b, empty_of(hook), &other, 1);
            let p = timed(b, hook, &other, 1);
            s[3].path.push(p);
            s[3].empty.push(e);
        }
        let names = [
            "new flow (Serve)",
            "new flow (Proxy)",
            "established",
            "non-VIP",
        ];
        for (name, mut ser) in names.into_iter().zip(s) {
            out.push((
                name,
                hook,
                "single",
                median(&mut ser.path),
                median(&mut ser.empty),
            ));
        }
    }
}

fn measure_paths(b: &mut Bench, rounds: u32, repeat: u32, flows: u32) -> Vec<Row> {
    let mut all = Vec::new();
    for r in 0..rounds {
        round(b, r, repeat, flows, &mut all);
    }
    let mut keys: Vec<(&'static str, Hook, &'static str)> = Vec::new();
    for (n, h, m, _, _) in &all {
        if !keys.contains(&(*n, *h, *m)) {
            keys.push((*n, *h, *m));
        }
    }
    keys.into_iter()
        .map(|(n, h, m)| {
            let mut p: Vec<f64> = all
                .iter()
                .filter(|x| (x.0, x.1, x.2) == (n, h, m))
                .map(|x| x.3)
                .collect();
            let mut e: Vec<f64> = all
                .iter()
                .filter(|x| (x.0, x.1, x.2) == (n, h, m))
                .map(|x| x.4)
                .collect();
            Row {
                path: n,
                hook: hook_name(h),
                method: m,
                ns: median(&mut p),
                empty_ns: median(&mut e),
            }
        })
        .collect()
}

struct Flips {
    program: Duration,
    write_us: Vec<f64>,
    land_us: Vec<f64>,
    packets: Vec<f64>,
}

/// Programs 10,000 services from scratch, then flips services one at a time and times
/// from the map write to the first new-flow packet that lands on the new target.
fn measure_flips(flips: u32) -> Flips {
    let mut b = Bench::new();
    let services = ten_thousand_services();
    let t = Instant::now();
    let report = b
        .prog
        .apply(&services)
        .expect("programming 10,000 services");
    let program = t.elapsed();
    assert_eq!(report.added, services.len());
    let act: SocketAddr = "10.0.0.1:8012".parse().unwrap();
    let mut f = Flips {
        program,
        write_us: Vec::new(),
        land_us: Vec::new(),
        packets: Vec::new(),
    };
    let mut port = 1024u16;
    for k in 0..flips {
        let i = (k as usize * 7919) % services.len();
        let d = &services[i];
        let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32)), 80);
        assert_eq!(d.key, service_key(vip, TCP));
        for mode in [MODE_PROXY, MODE_SERVE] {
            let c = client(100 + k % 1000);
            let t0 = Instant::now();
            b.prog.set_mode(&d.key, mode).expect("flip");
            let written = t0.elapsed();
            let mut n = 0;
            loop {
                port = port.wrapping_add(1).max(1024);
                let pkt = Spec::new(TCP, SocketAddr::new(c, port), vip).build();
                let out = b.run(Hook::Xdp, &pkt);
                n += 1;
                let dst = parse(&out.pkt).expect("parses").dst;
                let landed = if mode == MODE_PROXY {
                    dst == act
                } else {
                    d.serve.contains(&dst)
                };
                if landed {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(1), "flip never landed");
            }
            let landed = t0.elapsed();
            f.write_us.push(written.as_secs_f64() * 1e6);
            f.land_us.push(landed.as_secs_f64() * 1e6);
            f.packets.push(n as f64);
        }
        if k % 64 == 63 {
            b.clear_conntrack();
        }
    }
    f
}

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("perf")
}

#[test]
#[ignore = "benchmark: run by `cargo xtask perf --datapath`"]
fn datapath() {
    let a = selection("--datapath");
    if !a.on {
        println!("skipped: PERF_ARGS selects no datapath benchmark");
        return;
    }
    require_root!();
    let (rounds, repeat, flows, flips) = if a.quick {
        (3, 100_000, 500, 50)
    } else {
        (7, 1_000_000, 4_000, 500)
    };
    println!("datapath perf: {rounds} rounds, repeat {repeat}, {flows} single-shot flows per round, {flips} flips");
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let rows = measure_paths(&mut b, rounds, repeat, flows);
    drop(b);
    let mut fl = measure_flips(flips);
    let flip_median = median(&mut fl.land_us);
    let flip_p99 = percentile(&mut fl.land_us, 0.99);
    let flip_max = percentile(&mut fl.land_us, 1.0);
    let write_median = median(&mut fl.write_us);
    let packets_max = percentile(&mut fl.packets, 1.0);

    let est = |hook: &str| {
        rows.iter()
            .find(|r| r.path == "established" && r.hook == hook && r.method == "repeat")
            .map(|r| r.ratio())
            .unwrap_or(f64::NAN)
    };
    let est_met = est("xdp") <= 3.0 && est("tc-ingress") <= 3.0;
    let flip_met = flip_median <= 1000.0;
    let verdict = |m: bool| if m { "met" } else { "NOT met" };

    let mut md = String::new();
    md += "# Datapath performance (BPF_PROG_TEST_RUN)\n\n";
    md += &format!(
        "{rounds} rounds, interleaved with the empty programs; median of rounds. `repeat`: kernel \
         average over {repeat} repetitions (established and reverse NAT via a ping-pong conntrack \
         pair: every repetition is a conntrack hit and a full rewrite). `single`: median of \
         {flows} single runs per round over distinct flows (includes the kernel timer overhead).\n\n"
    );
    md += "| path | hook | method | ns/packet | empty program ns | ratio |\n|---|---|---|---:|---:|---:|\n";
    for r in &rows {
        md += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2}x |\n",
            r.path,
            r.hook,
            r.method,
            r.ns,
            r.empty_ns,
            r.ratio()
        );
    }
    md += &format!(
        "\n## 10,000 services\n\n- programming 10,000 services x 10 backends from scratch: {:.1} ms\n\
         - flip (set_mode write to the first packet on the new target), median of {}: {:.1} us \
         (p99 {:.1} us, max {:.1} us); the map write alone: {:.1} us; packets needed: at most {}\n",
        fl.program.as_secs_f64() * 1e3,
        fl.land_us.len(),
        flip_median,
        flip_p99,
        flip_max,
        write_median,
        packets_max
    );
    md += &format!(
        "\n## Targets\n\n- established <= 3x empty program: {} (xdp {:.2}x, tc-ingress {:.2}x)\n\
         - one flip <= 1 ms at 10,000 services: {} (median {:.1} us)\n",
        verdict(est_met),
        est("xdp"),
        est("tc-ingress"),
        verdict(flip_met),
        flip_median
    );
    println!("\n{md}");

    let json: Value = json!({
        "rounds": rounds,
        "repeat": repeat,
        "single_flows_per_round": flows,
        "quick": a.quick,
        "paths": rows.iter().map(|r| json!({
            "path": r.path, "hook": r.hook, "method": r.method,
            "ns_per_packet": r.ns, "empty_ns_per_packet": r.empty_ns, "ratio": r.ratio(),
        })).collect::<Vec<_>>(),
        "services": 10_000,
        "backends_per_service": 10,
        "program_ms": fl.program.as_secs_f64() * 1e3,
        "flip_us": { "median": flip_median, "p99": flip_p99, "max": flip_max,
                     "write_median": write_median, "count": fl.land_us.len(),
                     "max_packets_to_land": packets_max },
        "targets": {
            "established_le_3x_empty": { "met": est_met, "xdp_ratio": est("xdp"), "tc_ratio": est("tc-ingress") },
            "flip_le_1ms": { "met": flip_met, "median_us": flip_median },
        },
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/perf");
    std::fs::write(
        dir.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("writing datapath.json");
    std::fs::write(dir.join("datapath.md"), &md).expect("writing datapath.md");
    println!("wrote {}", dir.join("datapath.{json,md}").display());
    // Every benchmark must have produced numbers (all that --quick asserts; targets never).
    for r in &rows {
        assert!(
            r.ns.is_finite() && r.ns > 0.0 && r.empty_ns.is_finite() && r.empty_ns > 0.0,
            "no ns/packet for {} @{} ({})",
            r.path,
            r.hook,
            r.method
        );
    }
    assert!(
        flip_median.is_finite() && flip_median > 0.0,
        "no flip numbers"
    );
}
