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
use std::time::Duration;

use redirector_tests::{
    ingress::{
        cluster::{start_pod, Cluster, NS, REV},
        host,
        load::{flip_rows, print_rows, request_in, Rec, Side, Sides},
        sks::DEFAULT_DELAY,
    },
    kubeapi::objects::{Ep, Mode},
    require_root,
};

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
    let c = Cluster::new("ih", Mode::Serve, Some(21)).unwrap();
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
    let flips = c.flips(4, false, Duration::from_millis(500)).unwrap();
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
    let mut c = Cluster::new("ic", Mode::Proxy, None).unwrap();
    let sides = c.sides();
    c.start_agent().unwrap();
    c.wait_agent("proxy").unwrap();
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

    let pod = start_pod(&mut c.k, 20).unwrap();
    let pod_ip = pod.ip;
    c.pods.push(pod);
    c.set_endpoints(&[Ep::ready(pod_ip)]).unwrap();
    c.set_mode(Mode::Serve).unwrap();
    let r = held.join().unwrap();
    assert!(
        matches!(sides.of(&r), Side::ViaNode(p) | Side::Direct(p) if p == pod_ip),
        "{r:?}"
    );

    // Warm: once the public slice lists the pod, straight from the gateway.
    c.wait_agent("serve").unwrap();
    c.wait_gateway(pod_ip).unwrap();
    for _ in 0..5 {
        let r = c.request();
        assert_eq!(sides.of(&r), Side::Direct(pod_ip), "{r:?}");
    }

    // Scale to zero: Proxy; while the public slice still names the pod (the reconciler's
    // delay) the switch sends its address to the node-local activator. Then, as Knative's
    // scale-to-zero grace period waits for the activator to be in the path, the pod goes
    // once the public slice names Knative's activator, and requests are held again.
    c.set_mode(Mode::Proxy).unwrap();
    c.wait_agent("proxy").unwrap();
    let r = c.request();
    assert_eq!(
        sides.of(&r),
        Side::ViaNode(pod_ip),
        "Proxy: through the node-local activator: {r:?}"
    );
    c.wait_gateway(c.knative.ip).unwrap();
    // Kubernetes takes a deleted pod's endpoint out first; the pod's process goes after
    // its grace period (queue-proxy drains), by which time every agent has seen it.
    let seen = c.k.log().matches("ready_endpoints=0").count();
    c.set_endpoints(&[]).unwrap();
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

    let pod = start_pod(&mut c.k, 22).unwrap();
    let pod_ip = pod.ip;
    c.pods.push(pod);
    c.set_endpoints(&[Ep::ready(pod_ip)]).unwrap();
    c.set_mode(Mode::Serve).unwrap();
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
    let mut c = Cluster::new("if", Mode::Serve, Some(23)).unwrap();
    let sides = c.sides();
    c.start_agent().unwrap();
    c.wait_agent("serve").unwrap();
    let load = c.load(4);
    std::thread::sleep(Duration::from_millis(300));
    let flips = c.flips(20, false, Duration::from_millis(200)).unwrap();
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
    let mut c = Cluster::new("iw", Mode::Serve, Some(24)).unwrap();
    let sides = c.sides();
    c.start_agent().unwrap();
    c.wait_agent("serve").unwrap();
    let load = c.load(3);
    std::thread::sleep(Duration::from_millis(300));
    let flips = c.flips(6, true, Duration::from_millis(300)).unwrap();
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
