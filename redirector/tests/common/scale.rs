//! Scale checks on the real datapath: Maglev disruption when a backend goes away, and
//! programming 10,000 services × 10 backends (map capacities, map memory).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use redirector::{control::DesiredService, datapath::MAP_NAMES};
use redirector_common::{MAGLEV_SMALL_MAX, MODE_SERVE};

use super::{
    packet::{parse, Spec, TCP},
    service_key, Bench, Hook,
};

fn v4(a: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

/// Sends one new flow per client port through XDP, returns each flow's target.
fn targets(b: &mut Bench, vip: SocketAddr, ports: &[u16]) -> Vec<SocketAddr> {
    ports
        .iter()
        .map(|p| {
            let client = SocketAddr::new("10.244.7.7".parse().unwrap(), *p);
            let out = b.run(Hook::Xdp, &Spec::new(TCP, client, vip).build());
            parse(&out.pkt).expect("output parses").dst
        })
        .collect()
}

pub fn maglev_consistency() {
    const N: usize = 10;
    const FLOWS: usize = 10_000;
    let mut b = Bench::new();
    let vip: SocketAddr = "10.96.5.5:80".parse().unwrap();
    let backends: Vec<SocketAddr> = (0..N as u32)
        .map(|i| SocketAddr::new(v4(0x0a03_0001 + i), 8080))
        .collect();
    let desired = |bes: &[SocketAddr]| DesiredService {
        key: service_key(vip, TCP),
        name: "test/maglev".into(),
        mode: MODE_SERVE,
        serve: bes.iter().copied().collect(),
        proxy: BTreeSet::new(),
        activator: Some("10.0.0.1:8012".parse().unwrap()),
        kind: Default::default(),
    };
    b.apply(&[desired(&backends)]);
    let ports: Vec<u16> = (0..FLOWS as u16).map(|i| 20_000 + i).collect();
    let before = targets(&mut b, vip, &ports);
    let mut per_backend: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for t in &before {
        assert!(backends.contains(t), "flow went to {t}, not a backend");
        *per_backend.entry(*t).or_default() += 1;
    }
    assert_eq!(per_backend.len(), N, "every backend gets flows");
    let ideal = FLOWS / N;
    for (be, n) in &per_backend {
        assert!(
            *n > ideal * 7 / 10 && *n < ideal * 13 / 10,
            "{be}: {n} flows, ideal {ideal}"
        );
    }
    // Same tuples again, established: nothing moves.
    assert_eq!(targets(&mut b, vip, &ports[..500]), before[..500]);

    // Remove one backend, forget every flow, replay the same tuples as new flows.
    let removed = backends[3];
    let rest: Vec<SocketAddr> = backends.iter().copied().filter(|a| *a != removed).collect();
    b.apply(&[desired(&rest)]);
    let cleared = b.clear_conntrack();
    assert_eq!(cleared, 2 * FLOWS);
    let after = targets(&mut b, vip, &ports);
    let mut moved = 0;
    let mut moved_off_removed = 0;
    let mut moved_others = 0;
    for (x, y) in before.iter().zip(&after) {
        assert_ne!(*y, removed, "a new flow went to the removed backend");
        if x != y {
            moved += 1;
            if *x == removed {
                moved_off_removed += 1;
            } else {
                moved_others += 1;
            }
        }
    }
    let on_removed = per_backend[&removed];
    let frac = moved as f64 / FLOWS as f64;
    let one_nth = 1.0 / N as f64;
    println!(
        "maglev on the datapath: N={N}, {FLOWS} flows; {moved} moved ({:.2}%, 1/N = {:.2}%): \
         {moved_off_removed} of the {on_removed} on the removed backend, {moved_others} others \
         ({:.2}% of the flows not on it)",
        frac * 100.0,
        one_nth * 100.0,
        moved_others as f64 * 100.0 / (FLOWS - on_removed) as f64
    );
    assert_eq!(moved_off_removed, on_removed);
    assert!(
        frac >= 0.5 * one_nth && frac <= 2.0 * one_nth,
        "moved fraction {frac:.4} outside [0.5/N, 2/N]"
    );
    // Flows not on the removed backend mostly stay: Maglev's extra disruption is small.
    assert!(
        (moved_others as f64) < 0.5 * on_removed as f64,
        "{moved_others} flows moved off surviving backends ({on_removed} on the removed one)"
    );
}

/// Sets of up to `MAGLEV_SMALL_MAX` backends live in `MAGLEV_SMALL`, larger ones in
/// `MAGLEV`; a set that grows or shrinks across the limit moves between the two maps
/// (new table, then the service entry, then the old table removed) and new flows follow
/// the set on the datapath at every step.
pub fn maglev_tiers() {
    let mut b = Bench::new();
    let vip: SocketAddr = "10.96.6.6:80".parse().unwrap();
    let backends: Vec<SocketAddr> = (0..12u32)
        .map(|i| SocketAddr::new(v4(0x0a04_0001 + i), 8080))
        .collect();
    let desired = |bes: &[SocketAddr]| DesiredService {
        key: service_key(vip, TCP),
        name: "test/tiers".into(),
        mode: MODE_SERVE,
        serve: bes.iter().copied().collect(),
        proxy: BTreeSet::new(),
        activator: Some("10.0.0.1:8012".parse().unwrap()),
        kind: Default::default(),
    };
    let mut next_port = 30_000u16;
    for (step, n) in [3usize, 12, 2, 9, 8].into_iter().enumerate() {
        let set = &backends[..n];
        b.apply(&[desired(set)]);
        let small = n <= MAGLEV_SMALL_MAX;
        let maps = b.prog.maps();
        let (small_tables, large_tables) = (
            maps.maglev_small.keys().filter(|k| k.is_ok()).count(),
            maps.maglev.keys().filter(|k| k.is_ok()).count(),
        );
        assert_eq!(
            (small_tables, large_tables),
            if small { (1, 0) } else { (0, 1) },
            "step {step}: {n} backends: tables in MAGLEV_SMALL / MAGLEV"
        );
        let flows = 200 * n;
        let ports: Vec<u16> = (0..flows as u16).map(|i| next_port + i).collect();
        next_port += flows as u16;
        let mut per: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for t in targets(&mut b, vip, &ports) {
            assert!(
                set.contains(&t),
                "step {step}: flow went to {t}, not one of {n}"
            );
            *per.entry(t).or_default() += 1;
        }
        assert_eq!(
            per.len(),
            n,
            "step {step}: every backend gets flows: {per:?}"
        );
        for (be, c) in &per {
            assert!(
                *c > 200 / 2 && *c < 200 * 2,
                "step {step}: {be} got {c} of {flows} flows"
            );
        }
    }
}

/// Memory of this process's datapath maps, from /proc/self/fdinfo (`memlock`, which for
/// hash maps without preallocation follows the entries that exist). Returns (name, bytes,
/// max entries), one row per map (deduplicated by map id).
pub fn map_memory() -> Vec<(String, u64, u32)> {
    let mut rows: BTreeMap<u32, (String, u64, u32)> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |k: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let max = field("max_entries:").unwrap_or(0) as u32;
        let Ok(info) = aya::maps::MapInfo::from_id(id as u32) else {
            continue;
        };
        let name = info.name_as_str().unwrap_or("").to_string();
        if MAP_NAMES.iter().any(|n| name == n[..n.len().min(15)]) {
            rows.insert(id as u32, (name, memlock, max));
        }
    }
    rows.into_values().collect()
}

fn print_memory(title: &str, rows: &[(String, u64, u32)]) -> u64 {
    let total: u64 = rows.iter().map(|r| r.1).sum();
    println!(
        "{title}: {:.1} MiB in {} maps",
        total as f64 / 1048576.0,
        rows.len()
    );
    for (name, bytes, max) in rows {
        println!(
            "  {name:<16} {:>10.1} KiB  (max_entries {max})",
            *bytes as f64 / 1024.0
        );
    }
    total
}

/// 10,000 services × 10 distinct backends each, programmed from scratch.
pub fn ten_thousand_services() -> Vec<DesiredService> {
    (0..10_000u32)
        .map(|i| {
            let vip = SocketAddr::new(v4(0x0a60_0000 + i), 80); // 10.96.0.0/16
            DesiredService {
                key: service_key(vip, TCP),
                name: format!("ns/svc-{i}"),
                mode: MODE_SERVE,
                serve: (0..10)
                    .map(|j| SocketAddr::new(v4(0x0a80_0000 + i * 10 + j), 8080)) // 10.128/9
                    .collect(),
                proxy: BTreeSet::new(),
                activator: Some("10.0.0.1:8012".parse().unwrap()),
                kind: Default::default(),
            }
        })
        .collect()
}

pub fn memory_at_scale() {
    let mut b = Bench::new();
    let empty = print_memory("map memory, empty", &map_memory());
    let services = ten_thousand_services();
    let t = Instant::now();
    let report = b
        .prog
        .apply(&services)
        .expect("10,000 services fit the maps");
    let took = t.elapsed();
    assert_eq!(report.added, 10_000);
    println!("programmed 10,000 services x 10 backends in {took:.2?}");
    let full = print_memory("map memory, 10,000 services x 10 backends", &map_memory());
    println!(
        "map memory: {:.1} MiB empty, {:.1} MiB at 10k x 10 (+{:.1} MiB)",
        empty as f64 / 1048576.0,
        full as f64 / 1048576.0,
        (full - empty) as f64 / 1048576.0
    );
    let maps = b.prog.maps();
    assert_eq!(maps.services.keys().filter(|k| k.is_ok()).count(), 10_000);
    assert_eq!(maps.maglev.keys().filter(|k| k.is_ok()).count(), 10_000);
    // Spot checks: a few services route to one of their own backends.
    for i in [0usize, 4_321, 9_999] {
        let d = &services[i];
        let vip = SocketAddr::new(v4(0x0a60_0000 + i as u32), 80);
        let client: SocketAddr = "10.244.0.9:33333".parse().unwrap();
        let out = b.run(Hook::Xdp, &Spec::new(TCP, client, vip).build());
        let dst = parse(&out.pkt).unwrap().dst;
        assert!(d.serve.contains(&dst), "service {i} went to {dst}");
    }
    // Idempotent: a second apply writes nothing.
    let again = b.prog.apply(&services).unwrap();
    assert_eq!(again.unchanged, 10_000);
}
