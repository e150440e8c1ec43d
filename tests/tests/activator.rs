//! The activator and the scaler with real traffic: cold starts from zero (HTTP/1.1, h2c with
//! gRPC trailers, WebSocket upgrades, L4), the bounded hold (503), timeouts (504), clients
//! that leave while held, instances that die mid-request (502), idle scale-down with traffic
//! in flight, unknown services (404) and bad configs.
//!
//! Each test builds its own node + client namespaces (see `redirector_tests::coldstart`) and
//! needs root; without it, it fails with "needs root: ...".
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use redirector_tests::coldstart::{
    is_root, net, net::Tally, redirector_bin, wait_for, Config, Env, Scale, Svc, ACTIVATOR,
};
use serde_json::Value;

macro_rules! require_root {
    () => {
        if !is_root() {
            panic!("needs root: node and client namespaces and the agent (run as root)");
        }
    };
}

const LONG: Duration = Duration::from_secs(30);

fn len(v: &Value) -> usize {
    v.as_array().map_or(0, |a| a.len())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The scaler's section of a whole /status.
fn sc<'a>(st: &'a Value, svc: &Svc) -> &'a Value {
    &st["scalers"][svc.full_name()]
}

/// The activator's section of a whole /status.
fn act<'a>(st: &'a Value, svc: &Svc) -> &'a Value {
    &st["activator"][svc.full_name()]
}

fn hello(name: &str, vip: &str, env: &[(&str, &str)]) -> Svc {
    Svc::new(name, vip, Scale::hello(env))
}

fn wait_proxy_at_zero(env: &Env, svc: &Svc) -> Value {
    env.wait_status("the scaler in proxy mode at zero", LONG, |s| {
        sc(s, svc)["mode"] == "proxy" && len(&sc(s, svc)["instances"]) == 0
    })
    .unwrap()
}

/// Writes a request on a connection from the client namespace and keeps it open.
fn held_connection(env: &Env, svc: &Svc, body: &str) -> std::net::TcpStream {
    let mut s = net::connect(&env.client, svc.addr(), Duration::from_secs(5)).unwrap();
    let len = body.len().to_string();
    let req = net::request_text(
        "POST",
        "/",
        "svc",
        &[("Content-Length", &len), ("Content-Type", "text/plain")],
    );
    s.write_all(format!("{req}{body}").as_bytes()).unwrap();
    s
}

#[test]
fn first_request_from_zero_returns_200_and_flips_to_serve() {
    require_root!();
    let svc = hello("hello", "10.96.0.20", &[("STARTUP_DELAY_MS", "300")]);
    let env = Env::start("fr", &Config::one(svc.clone())).unwrap();
    let st = wait_proxy_at_zero(&env, &svc);
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 0, "{st}");

    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.starts_with("hello from ") && r.body.contains("10.244.1."),
        "{r:?}"
    );

    let st = env
        .wait_status("serve with one ready instance", LONG, |s| {
            let x = sc(s, &svc);
            x["mode"] == "serve" && len(&x["instances"]) == 1 && len(&x["ready"]) == 1
        })
        .unwrap();
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 1, "{st}");
    assert_eq!(
        u(&act(&st, &svc)["forwarded"]),
        1,
        "cold request via the activator: {st}"
    );
    assert_eq!(u(&act(&st, &svc)["cold_requests"]), 1, "{st}");
    // Warm: straight to the instance, not through the activator.
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let st = env.status().unwrap();
    assert_eq!(
        u(&act(&st, &svc)["forwarded"]),
        1,
        "warm request must go direct: {st}"
    );
    assert_eq!(len(&sc(&st, &svc)["instances"]), 1, "{st}");
}

#[test]
fn concurrent_requests_during_one_cold_start_start_one_instance() {
    require_root!();
    let mut scale = Scale::hello(&[("STARTUP_DELAY_MS", "1500")]);
    scale.target_concurrency = 1000.0;
    scale.max_scale = 20;
    let svc = Svc::new("burst", "10.96.0.21", scale);
    let env = Env::start("cc", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    const N: usize = 200;
    let (client, addr) = (env.client.clone(), svc.addr());
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || net::get(&client, addr, "/", Duration::from_secs(60)))
        })
        .collect();
    // Watch the hold fill while the one instance starts.
    let mut max_held = 0;
    let t0 = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < Duration::from_secs(60) {
        if let Ok(st) = env.status() {
            max_held = max_held.max(u(&act(&st, &svc)["held"]));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut bad = Vec::new();
    for t in threads {
        match t.join().unwrap() {
            Ok(r) if r.status == 200 => {}
            other => bad.push(format!("{other:?}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {N} failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(max_held > 0, "requests were never held by the activator");
    let st = env.status().unwrap();
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 1, "{st}");
    assert_eq!(
        len(&sc(&st, &svc)["instances"]),
        1,
        "exactly one instance: {st}"
    );
    eprintln!("max held observed: {max_held}");
}

#[test]
fn full_hold_answers_503_with_retry_after_at_once() {
    require_root!();
    let mut svc = hello("full", "10.96.0.22", &[("STARTUP_DELAY_MS", "10000")]);
    svc.timeout_secs = Some(60.0);
    let mut cfg = Config::one(svc.clone());
    cfg.activator.push("max_held_per_service = 2".into());
    let env = Env::start("of", &cfg).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let _a = held_connection(&env, &svc, "");
    let _b = held_connection(&env, &svc, "");
    env.wait_status("two requests held", LONG, |s| u(&act(s, &svc)["held"]) == 2)
        .unwrap();
    let t0 = Instant::now();
    let r = env.get(svc.addr(), "/", Duration::from_secs(15)).unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(took < Duration::from_secs(2), "503 took {took:?}");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    let st = env.status().unwrap();
    assert_eq!(
        len(&sc(&st, &svc)["ready"]),
        0,
        "no instance was ready yet: {st}"
    );
    assert_eq!(
        u(&act(&st, &svc)["held"]),
        2,
        "the rejected request is not counted: {st}"
    );
}

#[test]
fn queue_time_past_the_timeout_answers_504() {
    require_root!();
    let mut svc = hello("slow", "10.96.0.23", &[("STARTUP_DELAY_MS", "6000")]);
    svc.timeout_secs = Some(1.0);
    let env = Env::start("to", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let t0 = Instant::now();
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took < Duration::from_secs(5), "504 only after {took:?}");
    let st = env
        .wait_status("hold empty", Duration::from_secs(5), |s| {
            u(&act(s, &svc)["held"]) == 0
        })
        .unwrap();
    assert_eq!(u(&act(&st, &svc)["held_bytes"]), 0, "{st}");
}

#[test]
fn client_leaving_while_held_leaks_nothing_and_is_not_forwarded() {
    require_root!();
    let svc = hello("gone", "10.96.0.24", &[("STARTUP_DELAY_MS", "4000")]);
    let env = Env::start("dc", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let body = "x".repeat(100);
    let s = held_connection(&env, &svc, &body);
    env.wait_status("one request held with its body bytes", LONG, |st| {
        u(&act(st, &svc)["held"]) == 1 && u(&act(st, &svc)["held_bytes"]) == 100
    })
    .unwrap();
    drop(s); // the client goes away while its request is held
    let st = env
        .wait_status(
            "the hold to empty after the client left (before the instance is ready)",
            Duration::from_secs(2),
            |st| u(&act(st, &svc)["held"]) == 0 && u(&act(st, &svc)["held_bytes"]) == 0,
        )
        .unwrap();
    assert_eq!(len(&sc(&st, &svc)["ready"]), 0, "{st}");
    // The instance (woken by the request) comes up; the abandoned request must not reach it.
    env.wait_status("the instance ready", LONG, |st| {
        len(&sc(st, &svc)["ready"]) == 1
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let st = env.status().unwrap();
    assert_eq!(
        u(&act(&st, &svc)["forwarded"]),
        0,
        "abandoned request forwarded: {st}"
    );
    assert_eq!(u(&act(&st, &svc)["in_flight"]), 0, "{st}");
}

#[test]
fn instance_killed_mid_request_gives_502_and_is_replaced() {
    require_root!();
    let mut scale = Scale::hello(&[]);
    scale.target_burst_capacity = -1.0; // always Proxy: every request through the activator
    let svc = Svc::new("crash", "10.96.0.25", scale);
    let env = Env::start("kl", &Config::one(svc.clone())).unwrap();
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let st = env
        .wait_status("one ready instance, proxy", LONG, |s| {
            len(&sc(s, &svc)["ready"]) == 1 && sc(s, &svc)["mode"] == "proxy"
        })
        .unwrap();
    let inst = sc(&st, &svc)["instances"][0].as_str().unwrap().to_owned();

    let (client, addr) = (env.client.clone(), svc.addr());
    let slow = std::thread::spawn(move || {
        net::get(&client, addr, "/sleep?ms=3000", Duration::from_secs(20))
    });
    env.wait_status("the slow request in flight", LONG, |s| {
        u(&act(s, &svc)["in_flight"]) == 1
    })
    .unwrap();
    let pids = Env::instance_pids(&inst);
    assert!(!pids.is_empty(), "no process in {inst}");
    for p in pids {
        // SAFETY: plain kill(2) of the instance's process.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let r = slow.join().unwrap().unwrap();
    assert_eq!(r.status, 502, "{r:?}");

    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "request after the crash: {r:?}");
    let st = env
        .wait_status("a restart counted, one ready instance", LONG, |s| {
            u(&sc(s, &svc)["restarts"]) >= 1 && len(&sc(s, &svc)["ready"]) == 1
        })
        .unwrap();
    assert_eq!(u(&act(&st, &svc)["in_flight"]), 0, "{st}");
}

#[test]
fn idle_service_scales_to_zero_and_cold_starts_again() {
    require_root!();
    let mut scale = Scale::hello(&[("STARTUP_DELAY_MS", "100")]);
    scale.idle_timeout_secs = 1.0;
    scale.stable_window_secs = 1.0;
    let svc = Svc::new("idle", "10.96.0.26", scale);
    let env = Env::start("id", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);
    assert_eq!(env.get(svc.addr(), "/", LONG).unwrap().status, 200);
    env.wait_status("serve", LONG, |s| sc(s, &svc)["mode"] == "serve")
        .unwrap();
    let st = wait_proxy_at_zero(&env, &svc);
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 1, "{st}");
    let t0 = Instant::now();
    while !env.running_instances().is_empty() && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        env.running_instances().is_empty(),
        "{:?}",
        env.running_instances()
    );
    // At most the prepared spare sandbox is left.
    assert!(
        env.instance_netns().len() <= 1,
        "{:?}",
        env.instance_netns()
    );

    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let st = env
        .wait_status("serve again", LONG, |s| sc(s, &svc)["mode"] == "serve")
        .unwrap();
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 2, "{st}");
}

#[test]
fn requests_during_scale_down_all_succeed() {
    require_root!();
    // Phase 1: three clients send short requests on fresh connections every ~40 ms. The
    // scaler samples concurrency, which such traffic rarely shows, so the 0.5 s idle timeout
    // expires under the traffic: flips to Proxy, stops and cold starts happen while requests
    // arrive. Phase 2 (independent of how idleness is measured): one client waits
    // idle_timeout + d between requests, d sweeping -50..+100 ms, so a request lands right at
    // each scale-down (flip to Proxy, then the instance stopped).
    let mut scale = Scale::hello(&[]);
    scale.idle_timeout_secs = 0.5;
    scale.stable_window_secs = 0.5;
    let svc = Svc::new("churn", "10.96.0.27", scale);
    let env = Env::start("sd", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let tally = Arc::new(Tally::default());
    let phase1_end = Instant::now() + Duration::from_secs(6);
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let tally = tally.clone();
            let (client, addr) = (env.client.clone(), svc.addr());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(7 * i));
                while Instant::now() < phase1_end {
                    tally.request((&client, addr));
                    std::thread::sleep(Duration::from_millis(40));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let cold_starts_phase1 = u(&env.scaler(&svc).unwrap()["cold_starts"]);
    for k in 0..16u64 {
        tally.request((&env.client, svc.addr()));
        std::thread::sleep(Duration::from_millis(450 + 10 * k));
    }
    let cold_starts = u(&env.scaler(&svc).unwrap()["cold_starts"]);
    let failures = tally.failures.lock().unwrap();
    let n_ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "ok {n_ok}, failed {}, cold starts {cold_starts_phase1} in phase 1, {cold_starts} in all",
        failures.len()
    );
    assert!(
        cold_starts >= 3,
        "the service hardly scaled down under traffic (cold starts {cold_starts})"
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed around scale-down: {:?}",
        failures.len(),
        n_ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn h2c_grpc_request_through_the_activator_gets_trailers() {
    require_root!();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rt-h2"));
    let mut svc = Svc::new("grpc", "10.96.0.28", Scale::of(bin, &[]));
    svc.protocol = "h2c".into();
    let env = Env::start("h2", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let msg = b"\0\0\0\0\x05hello";
    let r = net::grpc_call(&env.client, svc.addr(), "/echo.Echo/Say", msg, LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, msg, "{r:?}");
    assert_eq!(r.headers.get("content-type").unwrap(), "application/grpc");
    assert_eq!(r.headers.get("x-seen-path").unwrap(), "/echo.Echo/Say");
    assert_eq!(
        r.headers.get("x-seen-te").unwrap(),
        "trailers",
        "te must reach the server"
    );
    let tr = r.trailers.as_ref().expect("trailers");
    assert_eq!(tr.get("grpc-status").unwrap(), "0", "{r:?}");
    assert_eq!(tr.get("grpc-message").unwrap(), "echo", "{r:?}");
    let st = env.status().unwrap();
    assert_eq!(
        u(&act(&st, &svc)["forwarded"]),
        1,
        "via the activator: {st}"
    );

    // Warm (Serve): the same call straight to the instance.
    env.wait_status("serve", LONG, |s| sc(s, &svc)["mode"] == "serve")
        .unwrap();
    let r = net::grpc_call(&env.client, svc.addr(), "/echo.Echo/Say", msg, LONG).unwrap();
    assert_eq!(r.trailers.unwrap().get("grpc-status").unwrap(), "0");
}

#[test]
fn websocket_upgrade_through_the_activator_echoes() {
    require_root!();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rt-ws"));
    let svc = Svc::new("ws", "10.96.0.29", Scale::of(bin, &[]));
    let env = Env::start("ws", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let mut s = net::connect(&env.client, svc.addr(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let req = "GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "closed during the handshake: {head:?}"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"\x81\x05hello"[..], b"raw bytes after the upgrade"] {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }
    let st = env.status().unwrap();
    assert_eq!(
        u(&act(&st, &svc)["forwarded"]),
        1,
        "via the activator: {st}"
    );
}

#[test]
fn l4_connection_held_at_zero_then_spliced() {
    require_root!();
    let mut svc = hello(
        "line",
        "10.96.0.30",
        &[("MODE", "line"), ("STARTUP_DELAY_MS", "300")],
    );
    svc.protocol = "tcp".into();
    let env = Env::start("l4", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);

    let s = net::connect(&env.client, svc.addr(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"hello world\nsecond line\n").unwrap();
    let mut r = BufReader::new(s);
    for want in ["HELLO WORLD\n", "SECOND LINE\n"] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, want);
    }
    w.write_all(b"after the splice\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "AFTER THE SPLICE\n");
    let st = env.status().unwrap();
    assert_eq!(u(&act(&st, &svc)["forwarded"]), 1, "{st}");
    assert_eq!(u(&sc(&st, &svc)["cold_starts"]), 1, "{st}");
}

/// What `connect()` to `to` from inside namespace `ns` gives: `Ok` or the error's kind.
fn connect_kind(ns: &str, to: SocketAddr) -> std::io::Result<()> {
    net::in_netns(ns, move || {
        Ok(std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).map(|_| ()))
    })
    .unwrap()
}

/// A datapath counter, from `redirector status` on the agent's pinned maps.
fn counter(env: &Env, name: &str) -> u64 {
    let st = redirector_tests::agent::status(&redirector_bin(), &env.pin_path).unwrap();
    st["counters"][name].as_u64().unwrap_or(0)
}

/// The activator takes only what the datapath delivered: a connection made to its address
/// directly (its listener's port, a service's own port) from outside the node is refused,
/// while the same service through its VIP is served. On the node itself the listener is on
/// loopback, where requests name the revision by Knative's headers (404 for unknown ones).
#[test]
fn activator_refuses_direct_connections_and_names_services_by_header_on_the_node() {
    require_root!();
    let svc = hello("known", "10.96.0.31", &[]);
    let env = Env::start("nf", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);
    let a: SocketAddr = ACTIVATOR.parse().unwrap();
    assert!(env.log().contains("activator on loopback"), "{}", env.log());

    // From outside the node: the listener's port and every service's own port are refused.
    let before = counter(&env, "activator_refused");
    for port in [a.port(), 20000, 20001, 20002] {
        let to = SocketAddr::new(a.ip(), port);
        let r = connect_kind(&env.client, to);
        assert_eq!(
            r.as_ref().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused),
            "a direct connection to the activator at {to} must be refused: {r:?}"
        );
    }
    let refused = counter(&env, "activator_refused") - before;
    assert!(refused >= 4, "activator_refused rose by {refused}");
    let st = env.status().unwrap();
    assert_eq!(
        u(&sc(&st, &svc)["cold_starts"]),
        0,
        "a refused connection must not wake anything: {st}"
    );

    // Through the VIP, delivered by the datapath: served.
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");

    // On the node, on loopback: Knative's headers name the revision.
    let local: SocketAddr = format!("127.0.0.1:{}", a.port()).parse().unwrap();
    let r = net::get(&env.node, local, "/", LONG).unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("no service"), "{r:?}");
    let hdrs = [
        ("Knative-Serving-Namespace", "rt"),
        ("Knative-Serving-Revision", "nope"),
    ];
    let r = net::http(&env.node, local, "GET", "/", &hdrs, LONG).unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    let hdrs = [
        ("Knative-Serving-Namespace", "rt"),
        ("Knative-Serving-Revision", "known"),
    ];
    let r = net::http(&env.node, local, "GET", "/", &hdrs, LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("hello from"), "{r:?}");
}

/// `accept = "any"`: the listener is on `node.activator` itself and takes a direct
/// connection (the operator's choice, said in the log).
#[test]
fn activator_accept_any_takes_direct_connections() {
    require_root!();
    let svc = hello("anyacc", "10.96.0.33", &[]);
    let mut cfg = Config::one(svc.clone());
    cfg.activator.push("accept = \"any\"".into());
    let env = Env::start("aa", &cfg).unwrap();
    wait_proxy_at_zero(&env, &svc);
    assert!(
        env.log().contains("activator.accept = \"any\""),
        "{}",
        env.log()
    );
    let a: SocketAddr = ACTIVATOR.parse().unwrap();
    let hdrs = [
        ("Knative-Serving-Namespace", "rt"),
        ("Knative-Serving-Revision", "anyacc"),
    ];
    let r = net::http(&env.client, a, "GET", "/", &hdrs, LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn bad_config_is_rejected_naming_the_field_and_changes_nothing() {
    require_root!();
    let svc = hello("cfg", "10.96.0.32", &[]);
    let env = Env::start("bc", &Config::one(svc.clone())).unwrap();
    assert_eq!(env.get(svc.addr(), "/", LONG).unwrap().status, 200);
    let before = env
        .wait_status("serve", LONG, |s| sc(s, &svc)["mode"] == "serve")
        .unwrap();

    let mut bad = Config::one(svc.clone());
    bad.services[0].scale.as_mut().unwrap().readiness = "bogus".into();
    let text = bad.to_toml(&env.pin_path);
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("readiness"))
        .unwrap();
    let path = env.dir.join("bad.toml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(redirector_bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted a bad config: {err}");
    assert!(
        err.contains(&format!("{}:{line}:", path.display())),
        "{err}"
    );
    assert!(err.contains("service[0] (cfg).scale.readiness"), "{err}");
    let ok = std::process::Command::new(redirector_bin())
        .arg("check")
        .arg("--config")
        .arg(&env.config_path)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The running agent is given the bad file: it says so and keeps everything as it was.
    env.write_config(&text).unwrap();
    let t0 = Instant::now();
    while !env.log().contains("bad config") && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env.log().contains("bad config"), "no complaint in the log");
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let after = env.status().unwrap();
    for k in ["mode", "instances", "cold_starts", "restarts"] {
        assert_eq!(
            sc(&after, &svc)[k],
            sc(&before, &svc)[k],
            "{k} changed: {after}"
        );
    }
}

/// SIGTERM: the activator stops accepting, a held request is still forwarded once its
/// instance is ready, and the agent then exits by itself with its instances stopped.
#[test]
fn sigterm_drains_held_requests_then_exits() {
    require_root!();
    let svc = Svc::new(
        "drain",
        "10.96.0.29",
        Scale::hello(&[("STARTUP_DELAY_MS", "1500")]),
    );
    let mut env = Env::start("dr", &Config::one(svc.clone())).unwrap();
    wait_proxy_at_zero(&env, &svc);
    let (client, addr) = (env.client.clone(), svc.addr());
    let held = std::thread::spawn(move || net::get(&client, addr, "/", Duration::from_secs(30)));
    env.wait_status("the request held", LONG, |s| u(&act(s, &svc)["held"]) == 1)
        .unwrap();
    // SAFETY: plain kill(2) of the agent we started.
    unsafe { libc::kill(env.agent_pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    // The listener itself, on the node's loopback (a direct connection from outside is
    // refused anyway).
    let port = ACTIVATOR.parse::<SocketAddr>().unwrap().port();
    let activator: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        net::get(&env.node, activator, "/", Duration::from_secs(2)).is_err(),
        "the activator must stop accepting on SIGTERM"
    );
    let r = held.join().unwrap().unwrap();
    assert_eq!(r.status, 200, "held request during the drain: {r:?}");
    wait_for("the agent to exit", Duration::from_secs(40), || {
        (!env.agent_alive()).then_some(())
    })
    .unwrap();
    assert!(
        env.running_instances().is_empty(),
        "{:?}",
        env.running_instances()
    );
    assert!(env.log().contains("stopped;"), "{}", env.log());
}
