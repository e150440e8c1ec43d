//! The control plane under real traffic: mode flips, backend changes, agent restarts, bad
//! config input and interfaces that appear after the agent started.
use std::{collections::BTreeSet, thread::sleep, time::Duration};

use redirector_tests::{
    agent::{service_entries, MapsSpec},
    bins,
    cluster::{Cluster, ECHO, ID_ACT_A, ID_BEA, ID_BEB, WEB},
    load::{flip_cycles, restart_rounds, start_loops, stop_loops},
    netns::wait_for,
    require_root,
    traffic::{run_client, ClientArgs, Summary},
};
use serde_json::Value;

/// The parts of a status that a restart or a rejected config must not change.
fn services_digest(st: &Value) -> BTreeSet<String> {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {} {} gen={} {} {}",
                s["name"],
                s["vip"],
                s["port"],
                s["protocol"],
                s["mode"],
                s["backends"],
                s["generation"],
                s["activator"],
                s["proxy_pool"]
            )
        })
        .collect()
}

/// Each agent's services digest, in agent order.
fn digests(c: &Cluster) -> Vec<BTreeSet<String>> {
    c.agents
        .iter()
        .map(|a| services_digest(&a.status().unwrap()))
        .collect()
}

#[test]
fn flip_under_load() {
    require_root!();
    let mut c = Cluster::new("flip", bins!()).expect("cluster");
    let results = flip_cycles(&mut c, 50);
    let web4 = &results[0].1;
    for id in [ID_BEA, ID_BEB, ID_ACT_A, "be-c"] {
        assert!(
            web4.identities.contains_key(id),
            "web v4: {id} never answered across the flips: {:?}",
            web4.identities
        );
    }
    for a in &mut c.agents {
        assert!(a.alive(), "agent {} died", a.label);
    }
}

#[test]
fn agent_restart_under_load() {
    require_root!();
    let mut c = Cluster::new("rst", bins!()).expect("cluster");
    let before = digests(&c);
    restart_rounds(&mut c, 3);
    for (a, before) in c.agents.iter_mut().zip(before) {
        assert!(a.alive(), "agent {} died", a.label);
        let after = services_digest(&a.status().unwrap());
        assert_eq!(
            after, before,
            "agent {}: services changed by restarts",
            a.label
        );
        assert!(
            a.log().contains("adopted pinned state"),
            "agent {} did not adopt the pins",
            a.label
        );
    }
}

/// Restarts both agents once per entry of `steps` with those `[maps]` sizes and checks
/// the capacities, the services and that conntrack entries were carried over.
fn resize_steps(c: &mut Cluster, before: &[BTreeSet<String>], steps: &[MapsSpec]) {
    for (step, sizes) in steps.iter().enumerate() {
        for a in c.agents.iter_mut() {
            a.stop()
                .unwrap_or_else(|e| panic!("step {step}: stopping: {e:#}"));
        }
        c.update_configs(|cfg| cfg.maps = Some(*sizes)).unwrap();
        for a in c.agents.iter_mut() {
            a.spawn()
                .unwrap_or_else(|e| panic!("step {step}: restarting: {e:#}"));
        }
        sleep(Duration::from_millis(700));
        let mut ct_entries = 0;
        for (a, before) in c.agents.iter_mut().zip(before) {
            assert!(a.alive(), "step {step}: agent {} died", a.label);
            let st = a.status().unwrap();
            let cap = &st["capacity"];
            assert_eq!(
                (
                    cap["services"].as_u64(),
                    cap["backends"].as_u64(),
                    cap["conntrack"].as_u64()
                ),
                (
                    Some(sizes.services.into()),
                    Some(sizes.backends.into()),
                    Some(sizes.conntrack.into())
                ),
                "step {step}: agent {}: capacities after the restart: {cap}",
                a.label
            );
            assert_eq!(
                &services_digest(&st),
                before,
                "step {step}: agent {}: services changed by the resize",
                a.label
            );
            ct_entries += st["conntrack_entries"].as_u64().unwrap_or(0);
        }
        // The client's node translates its flows: their entries were copied.
        assert!(
            ct_entries > 0,
            "step {step}: no conntrack entry after the resize"
        );
    }
}

/// `[maps]` changed between agent runs, shrinking then growing every sized map: the
/// restarted agent replaces the pinned maps with maps of the new capacities (as the kernel
/// reports them) and copies services, backends and conntrack over.
///
/// No request fails and no kept-alive connection changes backend, in either phase. A
/// conntrack resize switches the programs interface by interface between two conntrack
/// maps; during the switch the new programs also read and write the old map
/// (`CONNTRACK_PREV`), so a flow whose request and reply are seen by different program
/// generations keeps its translation.
#[test]
fn resize_maps_under_load() {
    require_root!();
    let mut c = Cluster::new("rsz", bins!()).expect("cluster");
    let before = digests(&c);
    let ct = redirector::datapath::MapSizes::default().conntrack;
    let phases: [[MapsSpec; 2]; 2] = [
        [
            MapsSpec {
                services: 256,
                backends: 1024,
                conntrack: ct,
            },
            MapsSpec {
                services: 131_072,
                backends: 300_000,
                conntrack: ct,
            },
        ],
        [
            MapsSpec {
                services: 131_072,
                backends: 300_000,
                conntrack: 16_384,
            },
            MapsSpec {
                services: 131_072,
                backends: 300_000,
                conntrack: 262_144,
            },
        ],
    ];
    for steps in phases {
        let loops = start_loops(&c, 30);
        sleep(Duration::from_millis(500));
        resize_steps(&mut c, &before, &steps);
        sleep(Duration::from_millis(500));
        stop_loops(loops);
    }
    for a in &c.agents {
        let log = a.log();
        assert!(
            log.contains("copied the old map's entries into the resized one"),
            "agent {}: no map was copied:\n{log}",
            a.label
        );
        // Every sized map was replaced (no retired pin left behind).
        let pin = &a.pin_path;
        for name in [
            "SERVICES",
            "MAGLEV",
            "BACKENDS",
            "CONNTRACK",
            "SERVICE_STATS",
            "SERVICE_META",
        ] {
            assert!(
                !pin.join("retired").join(name).exists(),
                "agent {}: retired/{name} left behind",
                a.label
            );
        }
    }
}

/// An upgrade that changes a map's layout: the agent finds `MAGLEV` pinned with another
/// value size (made here with bpftool, as an older agent would have left it), recreates
/// it empty, programs the tables again before its programs replace the running ones, and
/// traffic running across the restart never fails.
#[test]
fn restart_over_a_map_of_another_layout() {
    require_root!();
    let mut c = Cluster::new("lay", bins!()).expect("cluster");
    let before = digests(&c);
    let loops = start_loops(&c, 30);
    sleep(Duration::from_millis(500));
    for a in c.agents.iter_mut() {
        a.stop().expect("stopping");
        // The running programs keep their map; the pin now names a map of another layout.
        let pin = a.pin_path.join("MAGLEV");
        std::fs::remove_file(&pin).expect("unpinning MAGLEV");
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args([
                "type", "hash", "key", "8", "value", "4084", "entries", "1024", "name", "MAGLEV",
                "flags", "1",
            ])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        a.spawn().expect("restarting");
    }
    sleep(Duration::from_millis(700));
    stop_loops(loops);
    for (a, before) in c.agents.iter_mut().zip(before) {
        assert!(a.alive(), "agent {} died", a.label);
        assert_eq!(
            services_digest(&a.status().unwrap()),
            before,
            "agent {}: services after the restart",
            a.label
        );
        let log = a.log();
        assert!(
            log.contains("old map's layout differs from this agent's: starting it empty"),
            "agent {}: the foreign MAGLEV was not replaced:\n{log}",
            a.label
        );
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
}

fn web_traffic_ok(c: &Cluster, what: &str) -> Summary {
    let cli = &c.topo.pod("cli").ns;
    let mut last = None;
    for v6 in [false, true] {
        let s = run_client(&c.bins, cli, &ClientArgs::tcp(WEB.vip(v6), 20, 2, 5)).unwrap();
        s.assert_all_ok(&format!("{what} v6={v6}"));
        last = Some(s);
    }
    last.unwrap()
}

#[test]
fn config_reload_bad_input() {
    require_root!();
    let mut c = Cluster::new("bad", bins!()).expect("cluster");
    let agent = &c.agents[0];
    let before = services_digest(&agent.status().unwrap());
    let good = c.configs[0].to_toml();
    let path = agent.config_path.display().to_string();

    // 1. A backend address without a port (the first backend of the first service, web).
    let good_backend = c.configs[0].clone().service_mut(WEB.name).backends[0];
    let bad_backend = good_backend.ip().to_string();
    let text = good.replacen(
        &format!("\"{good_backend}\""),
        &format!("\"{bad_backend}\""),
        1,
    );
    assert_ne!(text, good);
    let line = line_of(&text, &format!("\"{bad_backend}\""));
    agent.write_raw_config(&text).unwrap();
    let want = format!("{path}:{line}:");
    let log = wait_for(
        "the bad-config error in the log",
        Duration::from_secs(10),
        || {
            let log = agent.log();
            log.lines()
                .find(|l| l.contains(&want) && l.contains("ERROR"))
                .map(str::to_owned)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    assert!(
        log.contains("backends"),
        "the error must name the field: {log}"
    );
    assert!(
        log.contains(&bad_backend),
        "the error must name the value: {log}"
    );
    web_traffic_ok(&c, "after a bad backend address");
    assert_eq!(services_digest(&agent.status().unwrap()), before);

    // 2. Broken TOML.
    let broken = good.replacen("mode = \"serve\"", "mode = \"serve", 1);
    let line = broken.lines().position(|l| l == "mode = \"serve").unwrap() + 1;
    agent.write_raw_config(&broken).unwrap();
    let want = format!("{path}:{line}:");
    wait_for("the TOML error in the log", Duration::from_secs(10), || {
        agent.log().contains(&want).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    web_traffic_ok(&c, "after broken TOML");
    assert_eq!(services_digest(&agent.status().unwrap()), before);
    assert!(c.agents[0].alive(), "the agent died on bad input");

    // 3. A good config is still picked up afterwards.
    c.set_mode(WEB.name, true).unwrap();
    let s = web_traffic_ok(&c, "after a good config");
    assert_eq!(s.identities(), [ID_ACT_A].into(), "{s:?}");
}

#[test]
fn new_interface_attached() {
    require_root!();
    let mut c = Cluster::new("nif", bins!()).expect("cluster");
    let pin = c.agents[0].pin_path.clone();
    let pod = c.topo.add_pod("late", 0, 30).expect("late pod");
    let link = pin
        .join("links")
        .join(format!("{}@tc-ingress", pod.host_if));
    wait_for(
        "the agent to attach to the new pod's veth",
        Duration::from_secs(15),
        || link.exists().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", c.agents[0].log()));
    for v6 in [false, true] {
        for svc in [WEB, ECHO] {
            let args = svc.client(v6, 30, 2, 5);
            let s = run_client(&c.bins, &pod.ns, &args).unwrap();
            let what = format!("{} from the new pod v6={v6}", svc.name);
            s.assert_all_ok(&what);
            assert_eq!(s.identities(), [ID_BEA, ID_BEB].into(), "{what}: {s:?}");
            assert_eq!(
                s.server_peers,
                [pod.ip(v6).to_string()].into(),
                "{what}: servers must see the new pod's address"
            );
            assert_eq!(s.socket_peers, [svc.vip(v6).to_string()].into(), "{what}");
        }
    }
    let st = c.agents[0].status().unwrap();
    assert!(!service_entries(&st, WEB.name).is_empty());
}
