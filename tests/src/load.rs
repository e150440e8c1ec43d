//! Client load across control-plane changes: client loops against the cluster's WEB and
//! ECHO VIPs from the client pod, mode flips with backend changes and agent restarts while
//! they run, and the check that no request failed.
use std::{thread::sleep, time::Duration};

use crate::{
    agent::service_mode_is,
    cluster::{Cluster, ECHO, TCP_BACKEND_PORT, UDP_BACKEND_PORT, WEB},
    traffic::{ClientArgs, ClientLoop, Server, Summary},
};

/// Client loops against WEB (v4, v6) and ECHO (v4, v6) from the client pod: new connections
/// and kept-alive connections of `per_conn` requests.
pub fn start_loops(c: &Cluster, per_conn: usize) -> Vec<(String, ClientLoop)> {
    let cli = &c.topo.pod("cli").ns;
    let mut loops = Vec::new();
    for (svc, v6) in [(WEB, false), (WEB, true), (ECHO, false), (ECHO, true)] {
        let mut args = if svc.udp() {
            ClientArgs::udp(svc.vip(v6), 1, 2, per_conn)
        } else {
            ClientArgs::tcp(svc.vip(v6), 2, 3, per_conn)
        };
        args.interval_ms = 10;
        let name = format!("{} v6={v6}", svc.name);
        let stop = c.path(&format!("stop-{}-{v6}", svc.name));
        loops.push((
            name,
            ClientLoop::start(&c.bins, cli, &args, stop).expect("client loop"),
        ));
    }
    loops
}

/// Stops the loops; every request must have succeeded and every kept-alive connection must
/// have been answered by one server only.
#[track_caller]
pub fn stop_loops(loops: Vec<(String, ClientLoop)>) -> Vec<(String, Summary)> {
    let mut out = Vec::new();
    for (name, l) in loops {
        let s = l.stop().expect("client loop summary");
        eprintln!(
            "{name}: ok={} failed={} conns={} keepalive_conns={} ids={:?}",
            s.ok, s.failed, s.conns, s.keepalive_conns, s.identities
        );
        s.assert_all_ok(&name);
        assert_eq!(
            s.unstable_conns, 0,
            "{name}: kept-alive connections changed server: {:?}",
            s.unstable
        );
        assert!(
            s.keepalive_conns > 0,
            "{name}: no kept-alive connection: {s:?}"
        );
        out.push((name, s));
    }
    out
}

/// `cycles` flips of WEB and ECHO to Proxy and back on both nodes under client load, with a
/// spare backend pod `bec` (server `be-c`, node B) joining the services for five cycles of
/// every ten; each flip waits until both agents report the mode. Every request must succeed
/// (see [`stop_loops`]); returns the loops' summaries (WEB v4 first).
pub fn flip_cycles(c: &mut Cluster, cycles: usize) -> Vec<(String, Summary)> {
    // A spare backend on node B, added to and removed from the services during the flips.
    let bec = c.topo.add_pod("bec", 1, 30).expect("pod bec");
    let (v4, v6) = (bec.ip(false), bec.ip(true));
    let spare = [
        (v4, TCP_BACKEND_PORT),
        (v6, TCP_BACKEND_PORT),
        (v4, UDP_BACKEND_PORT),
        (v6, UDP_BACKEND_PORT),
    ]
    .map(|(ip, port)| std::net::SocketAddr::new(ip, port));
    let srv = Server::start(&c.bins, &bec.ns, "be-c", &spare[..2], &spare[2..]).unwrap();
    c.servers.push(srv);

    let loops = start_loops(c, 40);
    sleep(Duration::from_millis(500));
    for i in 0..cycles {
        for proxy in [true, false] {
            c.update_configs(|cfg| {
                for s in [WEB.name, ECHO.name] {
                    cfg.service_mut(s).proxy = proxy;
                }
                // Every tenth cycle the spare backend joins; five cycles later it leaves.
                let with_spare = i % 10 >= 5;
                for (name, addrs) in [(WEB.name, &spare[..2]), (ECHO.name, &spare[2..])] {
                    let b = &mut cfg.service_mut(name).backends;
                    b.retain(|a| !addrs.contains(a));
                    if with_spare {
                        b.extend_from_slice(addrs);
                    }
                }
            })
            .unwrap();
            let mode = if proxy { "proxy" } else { "serve" };
            for a in &c.agents {
                a.wait_status(
                    &format!("flip {i}: web and echo in mode {mode}"),
                    Duration::from_secs(15),
                    |s| service_mode_is(s, WEB.name, mode) && service_mode_is(s, ECHO.name, mode),
                )
                .unwrap();
            }
            sleep(Duration::from_millis(100));
        }
    }
    stop_loops(loops)
}

/// `rounds` stop/start rounds of each agent in turn under client load; every request must
/// succeed. Returns the loops' summaries.
pub fn restart_rounds(c: &mut Cluster, rounds: usize) -> Vec<(String, Summary)> {
    let loops = start_loops(c, 30);
    sleep(Duration::from_millis(500));
    for round in 0..rounds {
        for a in c.agents.iter_mut() {
            a.stop()
                .unwrap_or_else(|e| panic!("round {round}: stopping: {e:#}"));
            // Programs stay attached while no agent runs.
            sleep(Duration::from_millis(300));
            a.spawn()
                .unwrap_or_else(|e| panic!("round {round}: restarting: {e:#}"));
            sleep(Duration::from_millis(300));
        }
    }
    sleep(Duration::from_millis(500));
    stop_loops(loops)
}
