//! Flip latency: decision to the first new connection on the new target, per method.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use redirector::datapath::maps::Maps;
use redirector_common::{MODE_PROXY, MODE_SERVE};

use super::{
    bed::Bed,
    load::{answers, Prober},
    pin::{self, Pinning},
    rules::{
        act_eps, agent_toml, ipt_sep_chain, iptables_partial, iptables_rules, nft_ep_chain,
        nft_incremental, nft_rules, sa, Svc,
    },
    Variant, ACT_ID, BE_ID, VIP, VIP_PORT,
};

/// Puts the calling thread back on every CPU when dropped.
struct Unpin;

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = pin::this_thread(&None);
    }
}

/// Flip samples: (method, services) -> (landed µs, probe connections needed).
pub(super) type Flips = BTreeMap<(String, usize), Vec<(f64, u32)>>;

/// Flips the measured service between its Serve endpoints and the activator with each of
/// the variant's methods on a live bed; records the decision-to-landing times and leaves
/// the bed as it found it (checked: the VIP answers from the pods only).
pub(super) fn measure_flips(
    bed: &mut Bed,
    variant: Variant,
    svcs: &[Svc],
    n: usize,
    reps: usize,
    pinning: &Pinning,
    flips: &mut Flips,
) -> Result<()> {
    let prober = Prober::new(&bed.cli, pinning);
    // This thread makes the decisions: on a CPU of its own where there is one (else, on
    // the prober's CPU, a flip's landing time would include waiting for the prober to
    // yield the CPU), back on every CPU afterwards.
    pin::this_thread(&pinning.spare())?;
    let _unpin = Unpin;
    let mut to_act = svcs.to_vec();
    to_act.last_mut().unwrap().endpoints = act_eps();
    let (serve_svc, act_svc) = (svcs.last().unwrap(), to_act.last().unwrap());
    let chains = |s: &Svc, ipt: bool| -> Vec<String> {
        s.endpoints
            .iter()
            .map(|e| {
                if ipt {
                    ipt_sep_chain(s, *e)
                } else {
                    nft_ep_chain(s, *e)
                }
            })
            .collect()
    };
    let mut rec = |m: &str, (d, probes): (Duration, u32)| {
        println!(
            "    flip {m} at {n}: {:.0} us, {probes} probe(s)",
            d.as_secs_f64() * 1e6
        );
        flips
            .entry((m.to_owned(), n))
            .or_default()
            .push((d.as_secs_f64() * 1e6, probes))
    };
    // At 10,000 services one full iptables-restore takes tens of seconds: there the full
    // rewrite is measured towards the activator only, and the way back is the cheap method
    // (partial restore, incremental nft), which is measured too. Elsewhere every method is
    // measured both ways (the full rewrite's way back is put back unmeasured first). Every
    // variant ends as it started: the measured service in Serve.
    let light = n >= 10_000;
    for _ in 0..reps {
        for (want, want_id) in [(MODE_PROXY, ACT_ID), (MODE_SERVE, BE_ID)] {
            let to_proxy = want == MODE_PROXY;
            let from = if to_proxy { serve_svc } else { act_svc };
            let to: &[Svc] = if to_proxy { &to_act } else { svcs };
            let back: &[Svc] = if to_proxy { svcs } else { &to_act };
            let full = !light || to_proxy;
            let cheap = !light || !to_proxy;
            match variant {
                Variant::Direct
                | Variant::Control
                | Variant::Floor
                | Variant::RedirectorBpf
                | Variant::RedirectorSocket => {}
                Variant::Redirector => {
                    // One map write, the way the agent flips: SERVICES[vip].mode.
                    let a = bed.agent.as_ref().unwrap();
                    let mut maps = Maps::open_pinned(&a.pin)?;
                    let key = crate::common::service_key(sa(VIP, VIP_PORT), 6);
                    let mut v = maps.services.get(&key, 0)?;
                    v.mode = want;
                    v.generation = v.generation.wrapping_add(1);
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    maps.services.insert(key, v, 0)?;
                    let d = prober.landed()?;
                    rec("redirector: map write", d);
                    // The same flip through the agent: config file rewritten + SIGHUP.
                    // First put the map back, then let the agent flip it.
                    let mut old = maps.services.get(&key, 0)?;
                    old.mode = if to_proxy { MODE_SERVE } else { MODE_PROXY };
                    maps.services.insert(key, old, 0)?;
                    let toml = agent_toml(&a.pin, svcs, if to_proxy { "measured" } else { "" });
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    a.reload(&toml)?;
                    let d = prober.landed()?;
                    rec("redirector: config + SIGHUP", d);
                }
                Variant::Iptables => {
                    if full {
                        let text = iptables_rules(to, &chains(from, true));
                        let t0 = Instant::now();
                        prober.arm(t0, want_id);
                        bed.feed("iptables-restore", &["--noflush"], &text)?;
                        let d = prober.landed()?;
                        rec("iptables: full restore", d);
                    }
                    if full && cheap {
                        let text = iptables_rules(back, &chains(to.last().unwrap(), true));
                        bed.feed("iptables-restore", &["--noflush"], &text)?;
                    }
                    if cheap {
                        // The way kube-proxy >= 1.27 writes it (MinimizeIPTablesRestore).
                        let text = iptables_partial(to, to.last().unwrap(), &chains(from, true));
                        let t0 = Instant::now();
                        prober.arm(t0, want_id);
                        bed.feed("iptables-restore", &["--noflush"], &text)?;
                        let d = prober.landed()?;
                        rec("iptables: partial restore", d);
                    }
                }
                Variant::Nftables => {
                    if full {
                        let t0 = Instant::now();
                        prober.arm(t0, want_id);
                        bed.feed("nft", &["-f", "-"], &nft_rules(to))?;
                        let d = prober.landed()?;
                        rec("nftables: full ruleset", d);
                    }
                    if full && cheap {
                        bed.feed("nft", &["-f", "-"], &nft_rules(back))?;
                    }
                    if cheap {
                        let text = nft_incremental(to.last().unwrap(), &chains(from, false));
                        let t0 = Instant::now();
                        prober.arm(t0, want_id);
                        bed.feed("nft", &["-f", "-"], &text)?;
                        let d = prober.landed()?;
                        rec("nftables: incremental", d);
                    }
                }
            }
        }
    }
    // Back where it started: the measured service answers from its pods only.
    let ids = answers(&bed.cli, sa(VIP, VIP_PORT), 20)?;
    if !variant.is_direct() && ids.iter().any(|id| id != BE_ID) {
        bail!(
            "{} at {n}: after the flips the VIP answers {:?}, not only {BE_ID}",
            variant.name(),
            ids
        );
    }
    Ok(())
}
