//! The ingress test cluster on one [`KubeNode`]: Knative's activator stand-in, one revision
//! (`rt/hello-00001`, public VIP 10.96.0.50), the SKS reconciler stand-in, the gateway with a
//! route to the revision, and optionally a ready pod; then the agent on demand, load through
//! the gateway and mode flips. Shared by the `ingress` netns tests and the `flip` perf
//! scenario.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use serde_json::json;

use super::{
    backend::Backend,
    gateway::Gateway,
    host,
    load::{request_in, Flip, Load, Rec, Sides},
    sks::{Reconciler, DEFAULT_DELAY},
};
use crate::{
    kubeapi::{
        node::{AgentOpts, KubeNode},
        objects::{self, Ep, Mode, QUEUE_PORT},
        Res,
    },
    netns::wait_for,
};

/// The revision's namespace and name (its public Service, SKS and route).
pub const NS: &str = "rt";
pub const REV: &str = "hello-00001";
/// How long the cluster's waits last.
pub const LONG: Duration = Duration::from_secs(30);
const GATEWAY_HOST: u8 = 40;
const KNATIVE_ACTIVATOR_HOST: u8 = 31;
const PUBLIC_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 50));
const PRIVATE_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 200, 1));
const ACTIVATOR_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 100, 1));

/// The node with Knative's activator stand-in, one revision, the SKS reconciler stand-in
/// and the gateway. Fields drop in order: servers and threads first, the node last.
pub struct Cluster {
    pub pods: Vec<Backend>,
    pub gw: Gateway,
    sks: Reconciler,
    pub knative: Backend,
    pub k: KubeNode,
}

impl Cluster {
    /// The revision starts in `mode` with a ready pod `pod` (running) if given; returns once
    /// the gateway sends to the pod (Serve with a pod) or to Knative's activator.
    pub fn new(tag: &str, mode: Mode, pod: Option<u8>) -> Result<Cluster> {
        let mut k = KubeNode::new(tag)?;
        let i = k.add_pod(KNATIVE_ACTIVATOR_HOST)?;
        let act = k.pods[i].v4();
        let knative = Backend::start(&k.pods[i].ns.name, act, QUEUE_PORT)?;
        let api = &k.api;
        api.create(&Res::services(), objects::activator_service(ACTIVATOR_VIP))?;
        api.create(
            &Res::endpoint_slices(),
            objects::activator_slice("x1", &[Ep::ready(act)]),
        )?;
        let mut pods = Vec::new();
        let mut eps = Vec::new();
        if let Some(h) = pod {
            let b = start_pod(&mut k, h)?;
            eps.push(Ep::ready(b.ip));
            pods.push(b);
        }
        let api = &k.api;
        api.create(
            &Res::services(),
            objects::public_service(NS, REV, &[PUBLIC_VIP]),
        )?;
        api.create(
            &Res::services(),
            objects::private_service(NS, REV, &[PRIVATE_VIP]),
        )?;
        api.create(
            &Res::endpoint_slices(),
            objects::private_slice(NS, REV, "a", &eps),
        )?;
        api.create(&Res::sks(), objects::sks(NS, REV, mode, 0))?;
        let sks = Reconciler::start(&k, DEFAULT_DELAY)?;
        let gw = Gateway::start(&mut k, GATEWAY_HOST)?;
        gw.route(REV, NS);
        let c = Cluster {
            pods,
            gw,
            sks,
            knative,
            k,
        };
        let want = match (mode, c.pods.first()) {
            (Mode::Serve, Some(p)) => p.ip,
            _ => act,
        };
        c.wait_gateway(want)?;
        Ok(c)
    }

    /// The SKS reconciler stand-in.
    pub fn sks(&self) -> &Reconciler {
        &self.sks
    }

    pub fn sides(&self) -> Sides {
        Sides {
            gateway: self.gw.ip,
            knative_activator: self.knative.ip,
        }
    }

    /// Waits until the gateway sends the revision's requests to `ip:8012` only.
    pub fn wait_gateway(&self, ip: IpAddr) -> Result<Instant> {
        let want = vec![SocketAddr::new(ip, QUEUE_PORT)];
        wait_for("the gateway's addresses", LONG, || {
            (self.gw.addresses(NS, REV) == want).then(Instant::now)
        })
    }

    /// Writes the SKS's `spec.mode`; returns when the write started.
    pub fn set_mode(&self, mode: Mode) -> Result<Instant> {
        let at = Instant::now();
        self.k.api.patch(
            &Res::sks(),
            NS,
            REV,
            json!({"spec": {"mode": mode.as_str()}}),
        )?;
        Ok(at)
    }

    /// Replaces the private EndpointSlice's endpoints.
    pub fn set_endpoints(&self, eps: &[Ep]) -> Result<()> {
        self.k.api.apply(
            &Res::endpoint_slices(),
            objects::private_slice(NS, REV, "a", eps),
        )?;
        Ok(())
    }

    pub fn start_agent(&mut self) -> Result<()> {
        self.k.start_agent(&AgentOpts::default())
    }

    /// Waits until the agent's entry of the public Service is in `mode` ("serve"/"proxy").
    pub fn wait_agent(&self, mode: &str) -> Result<Instant> {
        wait_for("the agent's maps", LONG, || {
            let e = self.k.entries(NS, REV).ok()?;
            e.iter()
                .any(|s| s["port"] == 80 && s["mode"] == mode)
                .then(Instant::now)
        })
    }

    /// One request through the gateway from the client pod.
    pub fn request(&self) -> Rec {
        request_in(&self.k.client.name, self.gw.addr(), &host(REV, NS), LONG)
            .join()
            .unwrap_or_else(|_| {
                let now = Instant::now();
                Rec {
                    start: now,
                    end: now,
                    status: 0,
                    body: String::new(),
                    peer: None,
                    upstream: None,
                    error: Some("the request's thread panicked".into()),
                }
            })
    }

    /// `n` client threads sending through the gateway back to back (5 ms apart).
    pub fn load(&self, n: usize) -> Load {
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
    /// Needs a pod (the first of [`Cluster::pods`]).
    pub fn flips(&self, n: usize, agent: bool, hold: Duration) -> Result<Vec<Flip>> {
        let pod = self
            .pods
            .first()
            .ok_or_else(|| anyhow!("flips need a pod"))?
            .ip;
        let act = self.knative.ip;
        (0..n)
            .map(|i| {
                let to_proxy = i % 2 == 0;
                let at = self.set_mode(if to_proxy { Mode::Proxy } else { Mode::Serve })?;
                let agent_at = if agent {
                    Some(self.wait_agent(if to_proxy { "proxy" } else { "serve" })?)
                } else {
                    None
                };
                let gateway_at = Some(self.wait_gateway(if to_proxy { act } else { pod })?);
                std::thread::sleep(hold);
                Ok(Flip {
                    at,
                    to_proxy,
                    agent_at,
                    gateway_at,
                })
            })
            .collect()
    }
}

/// A revision pod `h`: its namespace and a server on the queue-proxy port.
pub fn start_pod(k: &mut KubeNode, h: u8) -> Result<Backend> {
    let i = k.add_pod(h)?;
    Backend::start(&k.pods[i].ns.name, k.pods[i].v4(), QUEUE_PORT)
}
