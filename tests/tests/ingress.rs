//! Ingress traffic through the switch (issue 14): requests enter through a Kourier-like
//! gateway pod that sends them to the addresses of the revision's public EndpointSlices
//! (the revision's pod IPs:8012 in Serve, Knative's activator IPs:8012 in Proxy, rewritten
//! by an SKS reconciler stand-in 1 s after `spec.mode` flips), never to the public
//! ClusterIP. See `redirector_tests::ingress`.
//!
//! - `ingress_harness_*` checks the harness itself with no agent: the gateway follows the
//!   public slices, and only after the reconciler's delay. Passes today.
//! - `ingress_agent_*` run the real agent (node-local activator) and expect it to switch
//!   pod-IP:8012 connections to the node-local activator in Proxy and Knative's activator
//!   endpoints always. **They need the agent change of issue 14** (matching those
//!   destinations); against an agent without it they fail (requests reach Knative's
//!   activator stand-in, or the pod directly in Proxy).
//!
//! Root needed (without it they fail with "needs root: ...").
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use redirector_tests::{
    ingress::{
        backend::Backend,
        gateway::Gateway,
        host,
        load::{flip_rows, print_rows, request_in, Flip, Load, Rec, Side, Sides},
        sks::{Reconciler, DEFAULT_DELAY},
    },
    kubeapi::{
        node::{AgentOpts, KubeNode},
        objects::{self, Ep, Mode, QUEUE_PORT},
        Res,
    },
    netns::wait_for,
    require_root,
};
use serde_json::json;

const NS: &str = "rt";
const REV: &str = "hello-00001";
const LONG: Duration = Duration::from_secs(30);
const GATEWAY_HOST: u8 = 40;
const KNATIVE_ACTIVATOR_HOST: u8 = 31;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The node with Knative's activator stand-in, one revision, the SKS reconciler stand-in
/// and the gateway. Fields drop in order: servers and threads first, the node last.
struct Cluster {
    pods: Vec<Backend>,
    gw: Gateway,
    _sks: Reconciler,
    knative: Backend,
    k: KubeNode,
}

impl Cluster {
    /// The revision starts in `mode` with a ready pod `pod` (running) if given.
    fn new(tag: &str, mode: Mode, pod: Option<u8>) -> Cluster {
        let mut k = KubeNode::new(tag).unwrap();
        let i = k.add_pod(KNATIVE_ACTIVATOR_HOST).unwrap();
        let act = k.pods[i].v4();
        let knative = Backend::start(&k.pods[i].ns.name, act, QUEUE_PORT).unwrap();
        let api = &k.api;
        api.create(
            &Res::services(),
            objects::activator_service(ip("10.96.100.1")),
        )
        .unwrap();
        api.create(
            &Res::endpoint_slices(),
            objects::activator_slice("x1", &[Ep::ready(act)]),
        )
        .unwrap();
        let mut pods = Vec::new();
        let mut eps = Vec::new();
        if let Some(h) = pod {
            let b = start_pod(&mut k, h);
            eps.push(Ep::ready(b.ip));
            pods.push(b);
        }
        let api = &k.api;
        api.create(
            &Res::services(),
            objects::public_service(NS, REV, &[ip("10.96.0.50")]),
        )
        .unwrap();
        api.create(
            &Res::services(),
            objects::private_service(NS, REV, &[ip("10.96.200.1")]),
        )
        .unwrap();
        api.create(
            &Res::endpoint_slices(),
            objects::private_slice(NS, REV, "a", &eps),
        )
        .unwrap();
        api.create(&Res::sks(), objects::sks(NS, REV, mode, 0))
            .unwrap();
        let sks = Reconciler::start(&k, DEFAULT_DELAY).unwrap();
        let gw = Gateway::start(&mut k, GATEWAY_HOST).unwrap();
        gw.route(REV, NS);
        let c = Cluster {
            pods,
            gw,
            _sks: sks,
            knative,
            k,
        };
        let want = match (mode, pod) {
            (Mode::Serve, Some(_)) => c.pods[0].ip,
            _ => act,
        };
        c.wait_gateway(want);
        c
    }

    fn sks(&self) -> &Reconciler {
        &self._sks
    }

    fn sides(&self) -> Sides {
        Sides {
            gateway: self.gw.ip,
            knative_activator: self.knative.ip,
        }
    }

    /// Waits until the gateway sends the revision's requests to `ip:8012` only.
    fn wait_gateway(&self, ip: IpAddr) -> Instant {
        let want = vec![SocketAddr::new(ip, QUEUE_PORT)];
        wait_for("the gateway's addresses", LONG, || {
            (self.gw.addresses(NS, REV) == want).then(Instant::now)
        })
        .unwrap()
    }

    fn set_mode(&self, mode: Mode) -> Instant {
        let at = Instant::now();
        self.k
            .api
            .patch(
                &Res::sks(),
                NS,
                REV,
                json!({"spec": {"mode": mode.as_str()}}),
            )
            .unwrap();
        at
    }

    fn set_endpoints(&self, eps: &[Ep]) {
        self.k
            .api
            .apply(
                &Res::endpoint_slices(),
                objects::private_slice(NS, REV, "a", eps),
            )
            .unwrap();
    }

    fn start_agent(&mut self) {
        self.k.start_agent(&AgentOpts::default()).unwrap();
    }

    /// Waits until the agent's entry of the public Service is in `mode` ("serve"/"proxy").
    fn wait_agent(&self, mode: &str) -> Instant {
        wait_for("the agent's maps", LONG, || {
            let e = self.k.entries(NS, REV).ok()?;
            e.iter()
                .any(|s| s["port"] == 80 && s["mode"] == mode)
                .then(Instant::now)
        })
        .unwrap()
    }

    fn request(&self) -> Rec {
        request_in(&self.k.client.name, self.gw.addr(), &host(REV, NS), LONG)
            .join()
            .unwrap()
    }

    fn load(&self, n: usize) -> Load {
        Load::start(
            &self.k.client.name,
            self.gw.addr(),
            &host(REV, NS),
            n,
            Duration::from_millis(5),
        )
    }

    /// `n` flips starting from Serve (odd flips to Proxy), each held until the gateway has
    /// followed the public slice plus `hold`; with `agent`, also when the maps showed it.
    fn flips(&self, n: usize, agent: bool, hold: Duration) -> Vec<Flip> {
        let (pod, act) = (self.pods[0].ip, self.knative.ip);
        (0..n)
            .map(|i| {
                let to_proxy = i % 2 == 0;
                let at = self.set_mode(if to_proxy { Mode::Proxy } else { Mode::Serve });
                let agent_at =
                    agent.then(|| self.wait_agent(if to_proxy { "proxy" } else { "serve" }));
                let gateway_at = Some(self.wait_gateway(if to_proxy { act } else { pod }));
                std::thread::sleep(hold);
                Flip {
                    at,
                    to_proxy,
                    agent_at,
                    gateway_at,
                }
            })
            .collect()
    }
}

/// A revision pod `h`: its namespace and a server on the queue-proxy port.
fn start_pod(k: &mut KubeNode, h: u8) -> Backend {
    let i = k.add_pod(h).unwrap();
    Backend::start(&k.pods[i].ns.name, k.pods[i].v4(), QUEUE_PORT).unwrap()
}

/// Asserts no request in `recs` was served as `bad` says; the message has the count and
/// the first three.
#[track_caller]
fn assert_none(recs: &[Rec], sides: &Sides, what: &str, bad: impl Fn(Side) -> bool) {
    let hits: Vec<&Rec> = recs.iter().filter(|r| bad(sides.of(r))).collect();
    assert!(
        hits.is_empty(),
        "{} of {} requests {what}; first: {:#?}",
        hits.len(),
        recs.len(),
        &hits[..hits.len().min(3)]
    );
}

/// The harness without an agent: the gateway follows the public EndpointSlices — requests
/// reach the pod straight from the gateway in Serve and Knative's activator stand-in in
/// Proxy, with both Knative headers — and after a flip only once the SKS reconciler
/// stand-in has written the public slice, at least its delay after the SKS write.
#[test]
fn ingress_harness_gateway_follows_public_slices_without_agent() {
    require_root!();
    let c = Cluster::new("ih", Mode::Serve, Some(21));
    let sides = c.sides();
    let pod = c.pods[0].ip;
    let r = c.request();
    assert_eq!(sides.of(&r), Side::Direct(pod), "{r:?}");
    let hit = c.pods[0].hits().into_iter().find(|h| !h.probe).unwrap();
    assert_eq!(
        (hit.revision.as_deref(), hit.namespace.as_deref()),
        (Some(REV), Some(NS))
    );
    assert_eq!(hit.peer, c.gw.ip);

    let load = c.load(2);
    std::thread::sleep(Duration::from_millis(300));
    let flips = c.flips(4, false, Duration::from_millis(500));
    let recs = load.stop();
    print_rows(
        "harness (no agent): requests through the gateway per flip",
        &flip_rows(&recs, &flips, &sides),
    );
    assert_none(&recs, &sides, "failed", |s| s == Side::Failed);

    for (i, f) in flips.iter().enumerate() {
        let mode = if f.to_proxy { "Proxy" } else { "Serve" };
        let w = c
            .sks()
            .write_after(NS, REV, mode, f.at)
            .expect("the public slice write");
        assert!(
            w.started.duration_since(f.at) >= DEFAULT_DELAY,
            "flip {i}: the reconciler wrote before its delay"
        );
        let (old, new) = if f.to_proxy {
            (Side::Direct(pod), Side::Knative)
        } else {
            (Side::Knative, Side::Direct(pod))
        };
        let next = flips.get(i + 1).map(|n| n.at);
        for r in &recs {
            if r.start >= f.at && r.end < w.started {
                assert_eq!(
                    sides.of(r),
                    old,
                    "flip {i}: before the public slice changed: {r:?}"
                );
            }
            let gw_at = f.gateway_at.unwrap();
            if r.start >= gw_at && next.is_none_or(|n| r.end < n) {
                assert_eq!(
                    sides.of(r),
                    new,
                    "flip {i}: after the gateway followed: {r:?}"
                );
            }
        }
    }
    assert!(
        c.knative.requests() > 0,
        "Proxy requests reach Knative's activator"
    );
    for h in c.knative.hits() {
        assert_eq!(
            (h.revision.as_deref(), h.namespace.as_deref()),
            (Some(REV), Some(NS))
        );
    }
}

/// **Needs the agent change of issue 14.** Cold start, warm traffic and scale to zero,
/// all through the gateway: in Proxy with no pod the public slice lists Knative's
/// activator, yet the request is held by the node-local activator (it never reaches
/// Knative's); the pod comes up, the SKS flips to Serve and the held request gets the pod's
/// answer; warm requests go to the pod; after the flip back to Proxy and the pod's exit,
/// requests are held again and the next pod answers them.
#[test]
fn ingress_agent_cold_start_warm_and_scale_to_zero() {
    require_root!();
    let mut c = Cluster::new("ic", Mode::Proxy, None);
    let sides = c.sides();
    c.start_agent();
    c.wait_agent("proxy");
    let (client, gw, h) = (c.k.client.name.clone(), c.gw.addr(), host(REV, NS));
    let held = request_in(&client, gw, &h, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !held.is_finished(),
        "held while no pod exists: {:?}",
        held.join().unwrap()
    );
    assert_eq!(
        c.knative.requests(),
        0,
        "Knative's activator got the request"
    );

    let pod = start_pod(&mut c.k, 20);
    let pod_ip = pod.ip;
    c.pods.push(pod);
    c.set_endpoints(&[Ep::ready(pod_ip)]);
    c.set_mode(Mode::Serve);
    let r = held.join().unwrap();
    assert!(
        matches!(sides.of(&r), Side::ViaNode(p) | Side::Direct(p) if p == pod_ip),
        "{r:?}"
    );

    // Warm: once the public slice lists the pod, straight from the gateway.
    c.wait_agent("serve");
    c.wait_gateway(pod_ip);
    for _ in 0..5 {
        let r = c.request();
        assert_eq!(sides.of(&r), Side::Direct(pod_ip), "{r:?}");
    }

    // Scale to zero: Proxy; while the public slice still names the pod (the reconciler's
    // delay) the switch sends its address to the node-local activator. Then, as Knative's
    // scale-to-zero grace period waits for the activator to be in the path, the pod goes
    // once the public slice names Knative's activator, and requests are held again.
    c.set_mode(Mode::Proxy);
    c.wait_agent("proxy");
    let r = c.request();
    assert_eq!(
        sides.of(&r),
        Side::ViaNode(pod_ip),
        "Proxy: through the node-local activator: {r:?}"
    );
    c.wait_gateway(c.knative.ip);
    // Kubernetes takes a deleted pod's endpoint out first; the pod's process goes after
    // its grace period (queue-proxy drains), by which time every agent has seen it.
    let seen = c.k.log().matches("ready_endpoints=0").count();
    c.set_endpoints(&[]);
    redirector_tests::netns::wait_for(
        "the agent sees the endpoint gone",
        Duration::from_secs(10),
        || (c.k.log().matches("ready_endpoints=0").count() > seen).then_some(()),
    )
    .unwrap();
    c.pods.clear();
    let held = request_in(&client, gw, &h, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !held.is_finished(),
        "held after scale to zero: {:?}",
        held.join().unwrap()
    );
    assert_eq!(
        c.knative.requests(),
        0,
        "Knative's activator got the request"
    );

    let pod = start_pod(&mut c.k, 22);
    let pod_ip = pod.ip;
    c.pods.push(pod);
    c.set_endpoints(&[Ep::ready(pod_ip)]);
    c.set_mode(Mode::Serve);
    let r = held.join().unwrap();
    assert!(
        matches!(sides.of(&r), Side::ViaNode(p) | Side::Direct(p) if p == pod_ip),
        "{r:?}"
    );
    assert_eq!(c.knative.requests(), 0, "Knative's activator got requests");
}

/// **Needs the agent change of issue 14.** 20 flips Serve↔Proxy through the API (the pod
/// stays up and ready) under load through the gateway: no request fails and none is
/// answered by Knative's activator stand-in, whatever the public slices say meanwhile.
#[test]
fn ingress_agent_flips_under_load_without_failures() {
    require_root!();
    let mut c = Cluster::new("if", Mode::Serve, Some(23));
    let sides = c.sides();
    c.start_agent();
    c.wait_agent("serve");
    let load = c.load(4);
    std::thread::sleep(Duration::from_millis(300));
    let flips = c.flips(20, false, Duration::from_millis(200));
    let recs = load.stop();
    let rows = flip_rows(&recs, &flips, &sides);
    print_rows("agent: 20 flips under load through the gateway", &rows);
    assert!(recs.len() > 100, "load ran: {} requests", recs.len());
    assert_none(&recs, &sides, "failed", |s| s == Side::Failed);
    assert_none(&recs, &sides, "answered by Knative's activator", |s| {
        s == Side::Knative
    });
    assert_eq!(c.knative.requests(), 0);
}

/// **Needs the agent change of issue 14.** How long requests keep reaching the pod straight
/// from the gateway after a Serve→Proxy write (printed, not asserted: with the switch it is
/// the agent's map write, not the reconciler's 1 s delay), and which side served each
/// request: after the agent's maps show Proxy, no new request reaches the pod straight from
/// the gateway, and none reaches Knative's activator.
#[test]
fn ingress_agent_map_write_decides_after_each_flip() {
    require_root!();
    let mut c = Cluster::new("iw", Mode::Serve, Some(24));
    let sides = c.sides();
    c.start_agent();
    c.wait_agent("serve");
    let load = c.load(3);
    std::thread::sleep(Duration::from_millis(300));
    let flips = c.flips(6, true, Duration::from_millis(300));
    let recs = load.stop();
    let rows = flip_rows(&recs, &flips, &sides);
    print_rows(
        "agent: time until requests stop reaching the pod directly",
        &rows,
    );
    assert_none(&recs, &sides, "failed", |s| s == Side::Failed);
    assert_none(&recs, &sides, "answered by Knative's activator", |s| {
        s == Side::Knative
    });
    for (i, f) in flips.iter().enumerate().filter(|(_, f)| f.to_proxy) {
        let (agent_at, next) = (f.agent_at.unwrap(), flips.get(i + 1).map(|n| n.at));
        let after: Vec<Rec> = recs
            .iter()
            .filter(|r| r.start >= agent_at && next.is_none_or(|n| r.start < n))
            .cloned()
            .collect();
        let what = format!(
            "started after the maps showed Proxy (flip {}) and not through the node-local activator",
            i + 1
        );
        assert_none(&after, &sides, &what, |s| !matches!(s, Side::ViaNode(_)));
    }
    assert_eq!(c.knative.requests(), 0);
}
