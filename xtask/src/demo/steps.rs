//! The demo's traffic: a cold start, warm traffic, idle scale-down, and a burst during a cold
//! start. Each step drives the client namespace, reads the agent back and narrates.
use std::{
    net::SocketAddr,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Result};

use super::{
    env::{Env, CLIENT_NS},
    http::{get_once, in_netns, Conn},
    observe::{map_service, ColdStart, MapService, Poller, Snapshot, Target, Timeline},
    DemoConfig,
};

const TIMEOUT: Duration = Duration::from_secs(15);

/// What the steps share.
pub struct Ctx<'a> {
    pub env: &'a Env,
    pub cfg: &'a DemoConfig,
    pub target: Target,
}

impl Ctx<'_> {
    fn vip(&self) -> SocketAddr {
        self.cfg.vip
    }

    fn maps(&self) -> Result<MapService> {
        map_service(
            self.env,
            &self.cfg.vip.ip().to_string(),
            self.cfg.vip.port(),
        )
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub fn us_ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

fn backends(m: &MapService) -> String {
    if m.backends.is_empty() {
        "no backends".into()
    } else {
        format!("backends {}", m.backends.join(","))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// The result of one cold start.
#[derive(Debug, Clone)]
pub struct Cold {
    pub ttfb: Duration,
    pub cs: ColdStart,
}

/// One request while the service is at zero; narrates the stages.
pub fn cold_start(ctx: &Ctx) -> Result<Cold> {
    let before = ctx.target.fetch()?;
    let maps = ctx.maps()?;
    println!(
        "    before   scaler: mode {}, {} instances | SERVICES map: mode {}, {}",
        before.mode,
        before.instances.len(),
        maps.mode,
        backends(&maps)
    );
    ensure!(
        before.instances.is_empty(),
        "the service is not at zero: {:?}",
        before.instances
    );
    let t0 = Instant::now();
    let poller = Poller::start(&ctx.target, t0)?;
    let vip = ctx.vip();
    let sent = t0.elapsed();
    let resp = in_netns(CLIENT_NS, move || get_once(vip, "/", TIMEOUT));
    // The flip is published right after the forward; give it a moment to show (the poller
    // keeps watching meanwhile).
    let after = match &resp {
        Ok(_) => ctx
            .target
            .wait_until(Duration::from_millis(5), Duration::from_secs(5), |s| {
                s.mode == "serve" && s.last_cold_start.is_some_and(|c| c.flipped_us > 0)
            }),
        Err(_) => ctx.target.fetch(),
    };
    let tl = poller.finish()?;
    let resp = resp?;
    let after = after?;
    ensure!(resp.status == 200, "cold request got HTTP {}", resp.status);
    let cs = after
        .last_cold_start
        .ok_or_else(|| anyhow!("/status has no last_cold_start"))?;
    let maps_after = ctx.maps()?;
    println!(
        "    client   GET http://{vip}/ on a new connection (t = 0, sent at +{})",
        ms(sent)
    );
    println!("    agent    /status last_cold_start (µs since the wake, i.e. since the activator took the request):");
    println!(
        "               +{:>9}  request held by the activator, scale from zero{}",
        us_ms(0),
        observed(&tl.held, "held=1")
    );
    println!(
        "               +{:>9}  instance started: {} (own netns + veth, redirector-hello){}",
        us_ms(cs.started_us),
        after.instances.join(","),
        observed(&tl.instance, "instance")
    );
    println!(
        "               +{:>9}  instance ready; the activator forwards the held request{}",
        us_ms(cs.ready_us),
        observed(&tl.ready, "ready")
    );
    println!(
        "               +{:>9}  SERVICES flipped to Serve: new connections go direct{}",
        us_ms(cs.flipped_us),
        observed(&tl.serve, "mode=serve")
    );
    println!(
        "    client   first byte after {}: HTTP {} \"{}\"",
        ms(resp.ttfb),
        resp.status,
        first_line(&resp.body)
    );
    println!(
        "    after    activator: cold_requests {} (+{}), forwarded {} (+{}) | SERVICES: mode {}, {}",
        after.cold_requests,
        after.cold_requests - before.cold_requests,
        after.forwarded,
        after.forwarded - before.forwarded,
        maps_after.mode,
        backends(&maps_after)
    );
    Ok(Cold {
        ttfb: resp.ttfb,
        cs,
    })
}

fn observed(at: &Option<Duration>, what: &str) -> String {
    match at {
        Some(d) => format!("   [poll saw {what} at +{}]", ms(*d)),
        None => String::new(),
    }
}

/// Warm traffic results.
#[derive(Debug, Clone)]
pub struct Warm {
    pub keepalive_rps: f64,
    pub conn_rps: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Keep-alive requests and a burst of new connections, in Serve mode.
pub fn warm(ctx: &Ctx, requests: usize, clients: usize, per_client: usize) -> Result<Warm> {
    let snap0 = ctx.target.fetch()?;
    let maps0 = ctx.maps()?;
    ensure!(maps0.mode == "serve", "SERVICES is in mode {}", maps0.mode);
    let vip = ctx.vip();
    let (elapsed, mut lat, bodies) = in_netns(CLIENT_NS, move || {
        let mut c = Conn::connect(vip, TIMEOUT)?;
        let mut lat = Vec::with_capacity(requests);
        let mut bodies = std::collections::BTreeSet::new();
        let t0 = Instant::now();
        for _ in 0..requests {
            let r = c.get("/")?;
            ensure!(r.status == 200, "warm request got HTTP {}", r.status);
            lat.push(r.ttfb);
            bodies.insert(first_line(&r.body).to_owned());
        }
        Ok((t0.elapsed(), lat, bodies))
    })?;
    lat.sort();
    let keepalive_rps = requests as f64 / elapsed.as_secs_f64();
    println!(
        "    {requests} requests on one keep-alive connection: all 200 in {} = {:.0} req/s (p50 {}, p99 {})",
        ms(elapsed),
        keepalive_rps,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    let (elapsed, ok) = in_netns(CLIENT_NS, move || {
        let barrier = Arc::new(Barrier::new(clients));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    b.wait();
                    (0..per_client)
                        .filter(|_| get_once(vip, "/", TIMEOUT).is_ok_and(|r| r.status == 200))
                        .count()
                })
            })
            .collect();
        let ok: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        Ok((t0.elapsed(), ok))
    })?;
    let total = clients * per_client;
    ensure!(ok == total, "only {ok} of {total} new connections got 200");
    let conn_rps = total as f64 / elapsed.as_secs_f64();
    println!(
        "    {total} new connections ({clients} clients x {per_client}, Connection: close): all 200 in {} = {:.0} conn/s",
        ms(elapsed),
        conn_rps
    );
    println!(
        "    answered by: {}",
        bodies.into_iter().collect::<Vec<_>>().join(", ")
    );
    let snap1 = ctx.target.fetch()?;
    let maps1 = ctx.maps()?;
    println!(
        "    SERVICES map: mode {}, {}; counters packets +{}, reply packets +{}, new flows +{}, proxied flows +{}",
        maps1.mode,
        backends(&maps1),
        maps1.packets - maps0.packets,
        maps1.reply_packets - maps0.reply_packets,
        maps1.new_flows - maps0.new_flows,
        maps1.proxied_flows - maps0.proxied_flows
    );
    println!(
        "    activator: forwarded {} (+{}), cold_requests {} (+{}): the warm path never touched it",
        snap1.forwarded,
        snap1.forwarded - snap0.forwarded,
        snap1.cold_requests,
        snap1.cold_requests - snap0.cold_requests
    );
    Ok(Warm {
        keepalive_rps,
        conn_rps,
    })
}

/// Waits until the scaler is back at zero and the maps are in Proxy; returns the idle time.
pub fn back_to_zero(ctx: &Ctx, idle_since: Instant) -> Result<Duration> {
    let timeout = ctx.cfg.idle_timeout + Duration::from_secs(30);
    let s = ctx
        .target
        .wait_until(Duration::from_millis(50), timeout, |s| {
            s.mode == "proxy" && s.instances.is_empty()
        })?;
    let idle = idle_since.elapsed();
    let maps = ctx.maps()?;
    println!(
        "    after {} without traffic: scaler mode {}, {} instances | SERVICES map: mode {}, {}",
        ms(idle),
        s.mode,
        s.instances.len(),
        maps.mode,
        backends(&maps)
    );
    Ok(idle)
}

/// The result of the burst.
#[derive(Debug, Clone)]
pub struct Burst {
    pub n: usize,
    pub ok: usize,
    pub instances: usize,
    pub cold_starts: u64,
    pub p50: Duration,
    pub max: Duration,
}

/// `n` concurrent new connections while the service is at zero.
pub fn burst(ctx: &Ctx, n: usize) -> Result<Burst> {
    let before: Snapshot = ctx.target.fetch()?;
    ensure!(before.instances.is_empty(), "the service is not at zero");
    let t0 = Instant::now();
    let poller = Poller::start(&ctx.target, t0)?;
    let vip = ctx.vip();
    let results = in_netns(CLIENT_NS, move || {
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    b.wait();
                    get_once(vip, "/", TIMEOUT)
                })
            })
            .collect();
        Ok(handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked"))))
            .collect::<Vec<_>>())
    });
    let tl: Timeline = poller.finish()?;
    let results = results?;
    let wall = t0.elapsed();
    let after = ctx
        .target
        .wait_until(Duration::from_millis(10), Duration::from_secs(5), |s| {
            s.mode == "serve"
        })?;
    let mut ttfb: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == 200)
        .map(|r| r.ttfb)
        .collect();
    ttfb.sort();
    let ok = ttfb.len();
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        println!("    first failure: {e:#}");
    }
    let b = Burst {
        n,
        ok,
        instances: after.instances.len().max(tl.max_instances),
        cold_starts: after.cold_starts - before.cold_starts,
        p50: percentile(&ttfb, 0.5),
        max: ttfb.last().copied().unwrap_or_default(),
    };
    println!(
        "    {ok} of {n} got HTTP 200 in {} (TTFB min {}, median {}, max {})",
        ms(wall),
        ms(ttfb.first().copied().unwrap_or_default()),
        ms(b.p50),
        ms(b.max)
    );
    println!(
        "    activator: held up to {} at once (polled), cold_requests +{}, forwarded +{}",
        tl.max_held,
        after.cold_requests - before.cold_requests,
        after.forwarded - before.forwarded
    );
    println!(
        "    scaler: cold_starts +{}, instances {} ({}), mode {}",
        b.cold_starts,
        after.instances.len(),
        after.instances.join(","),
        after.mode
    );
    ensure!(ok == n, "only {ok} of {n} burst requests got 200");
    Ok(b)
}
