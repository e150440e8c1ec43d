//! Flip latency: decision to the first new connection on the new target, per method.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use redirector::datapath::maps::Maps;
use redirector_common::{MODE_PROXY, MODE_SERVE};

use super::{
    bed::Bed,
    load::Prober,
    rules::{
        act_eps, agent_toml, ipt_sep_chain, iptables_partial, iptables_rules, nft_ep_chain,
        nft_incremental, nft_rules, sa, Svc,
    },
    Variant, ACT_ID, BE_ID, VIP, VIP_PORT,
};

/// Flip methods: name -> landed µs samples.
/// Flip samples: (method, services) -> (landed µs, probe connections needed).
pub(super) type Flips = BTreeMap<(String, usize), Vec<(f64, u32)>>;

/// Flips the measured service between its Serve endpoints and the activator with each of
/// the variant's methods; records the decision-to-landing times.
pub(super) fn measure_flips(
    bed: &mut Bed,
    variant: Variant,
    svcs: &[Svc],
    n: usize,
    reps: usize,
    flips: &mut Flips,
) -> Result<()> {
    let prober = Prober::new(&bed.cli);
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
    // At 10,000 services one iptables-restore takes tens of seconds: one flip there.
    let light = n >= 10_000;
    let dirs: &[(u8, &str)] = if light {
        &[(MODE_PROXY, ACT_ID)]
    } else {
        &[(MODE_PROXY, ACT_ID), (MODE_SERVE, BE_ID)]
    };
    for _ in 0..reps {
        for &(want, want_id) in dirs {
            let to_proxy = want == MODE_PROXY;
            match variant {
                Variant::Direct => {}
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
                    let mut back = maps.services.get(&key, 0)?;
                    back.mode = if to_proxy { MODE_SERVE } else { MODE_PROXY };
                    maps.services.insert(key, back, 0)?;
                    let toml = agent_toml(&a.pin, svcs, if to_proxy { "measured" } else { "" });
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    a.reload(&toml)?;
                    let d = prober.landed()?;
                    rec("redirector: config + SIGHUP", d);
                }
                Variant::Iptables => {
                    let from = if to_proxy { serve_svc } else { act_svc };
                    let to: &[Svc] = if to_proxy { &to_act } else { svcs };
                    let text = iptables_rules(to, &chains(from, true));
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("iptables-restore", &["--noflush"], &text)?;
                    let d = prober.landed()?;
                    rec("iptables: full restore", d);
                    if light {
                        continue;
                    }
                    // Back, then the same flip the way kube-proxy >= 1.27 writes it.
                    let back = if to_proxy {
                        svcs.to_vec()
                    } else {
                        to_act.clone()
                    };
                    bed.feed(
                        "iptables-restore",
                        &["--noflush"],
                        &iptables_rules(&back, &chains(to.last().unwrap(), true)),
                    )?;
                    let text = iptables_partial(to, to.last().unwrap(), &chains(from, true));
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("iptables-restore", &["--noflush"], &text)?;
                    let d = prober.landed()?;
                    rec("iptables: partial restore", d);
                }
                Variant::Nftables => {
                    let from = if to_proxy { serve_svc } else { act_svc };
                    let to: &[Svc] = if to_proxy { &to_act } else { svcs };
                    let t0 = Instant::now();
                    prober.arm(t0, want_id);
                    bed.feed("nft", &["-f", "-"], &nft_rules(to))?;
                    let d = prober.landed()?;
                    rec("nftables: full ruleset", d);
                    let back = if to_proxy {
                        svcs.to_vec()
                    } else {
                        to_act.clone()
                    };
                    bed.feed("nft", &["-f", "-"], &nft_rules(&back))?;
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
    Ok(())
}
