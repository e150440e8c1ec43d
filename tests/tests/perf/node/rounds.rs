//! The measured rounds: for each service count, one live bed per variant (built and
//! programmed once), then `rounds` rounds over the live beds with the variant order rotated
//! per round, then the flips, then the beds are torn down.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    bed::Bed,
    cost::{self, Cost},
    flips::{measure_flips, Flips},
    fmt_rate,
    load::{answers, new_conns, wrk, Load},
    rules::{serve_eps, services},
    summary::Metric,
    Plan, Variant, BE_ID, VARIANTS,
};

/// One variant's measurement in one round.
#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub(super) round: usize,
    /// The new-connection run was pinned (in `NODE_PIN=ab`: the whole slot).
    pub(super) pinned: bool,
    /// Position in the round's order (0 = first).
    pub(super) position: usize,
    pub(super) keepalive: Option<Load>,
    pub(super) newconn: Option<Load>,
}

#[derive(Default)]
pub(super) struct Results {
    /// (variant, services) -> one slot per round, in round order.
    pub(super) slots: BTreeMap<(Variant, usize), Vec<Slot>>,
    /// (variant, services) -> programming time from scratch (ms).
    pub(super) program_ms: BTreeMap<(Variant, usize), f64>,
    pub(super) flips: Flips,
    /// services -> the datapath's own CPU per request / connection (redirector bed).
    pub(super) costs: BTreeMap<usize, Cost>,
    /// services -> (seconds building + programming, measuring, flipping, tearing down).
    pub(super) phases: BTreeMap<usize, [f64; 4]>,
    /// Everything that failed without stopping the run.
    pub(super) errors: Vec<String>,
}

/// A live bed: one variant, programmed with the count's services.
struct Live {
    variant: Variant,
    bed: Bed,
}

/// Runs every count of the plan.
pub(super) fn run(plan: &Plan) -> Results {
    let mut res = Results::default();
    for (ci, &n) in plan.counts.iter().enumerate() {
        if let Err(e) = one_count(plan, ci, n, &mut res) {
            println!("  {n} services: {e:#}");
            res.errors.push(format!("{n} services: {e:#}"));
        }
    }
    res
}

fn one_count(plan: &Plan, ci: usize, n: usize, res: &mut Results) -> Result<()> {
    let t0 = Instant::now();
    let svcs = services(n, &serve_eps());
    // Build and program every variant's bed, one after the other (each programming time
    // is taken alone).
    let mut live = Vec::new();
    for v in VARIANTS {
        let mut bed = Bed::new().with_context(|| format!("{} bed", v.name()))?;
        if let Some(d) = bed
            .program(v, &svcs)
            .with_context(|| format!("programming {} with {n} services", v.name()))?
        {
            res.program_ms.insert((v, n), d.as_secs_f64() * 1e3);
            println!(
                "  {n:>6} services: {:>10} programmed in {:.1} ms",
                v.name(),
                d.as_secs_f64() * 1e3
            );
        }
        live.push(Live { variant: v, bed });
    }
    // Each bed answers through its target, from the pods.
    for l in &live {
        let ids = answers(&l.bed.cli, l.bed.target(l.variant), 5)?;
        if ids.iter().any(|id| id != BE_ID) {
            bail!("{} at {n}: the target answers {ids:?}", l.variant.name());
        }
    }
    let built = t0.elapsed();

    let t1 = Instant::now();
    for r in 0..plan.rounds {
        // Rotate the variant order every round (and count): no variant always first.
        for k in 0..live.len() {
            let l = &live[(k + r + ci) % live.len()];
            let t = Instant::now();
            let (ka, nc) = match slot(plan, l, r) {
                Ok((ka, nc)) => (Some(ka), Some(nc)),
                Err(e) => {
                    let msg = format!("round {r} {} at {n}: {e:#}", l.variant.name());
                    println!("  {msg}");
                    res.errors.push(msg);
                    (None, None)
                }
            };
            println!(
                "  round {r} {:>10} {n:>6} services{}: keep-alive {:>8} req/s, new {:>8} conn/s ({:.1} s)",
                l.variant.name(),
                match (
                    plan.pinning(r, Metric::Keepalive).is_on(),
                    plan.pinning(r, Metric::Newconn).is_on()
                ) {
                    (true, true) => " pinned",
                    (false, true) => " (new conn pinned)",
                    _ => "",
                },
                fmt_rate(ka.as_ref().map_or(f64::NAN, |l| l.rate)),
                fmt_rate(nc.as_ref().map_or(f64::NAN, |l| l.rate)),
                t.elapsed().as_secs_f64()
            );
            res.slots.entry((l.variant, n)).or_default().push(Slot {
                round: r,
                pinned: plan.pinning(r, Metric::Newconn).is_on(),
                position: k,
                keepalive: ka,
                newconn: nc,
            });
        }
    }
    // The programs' own CPU per request, with the BPF statistics on (never during rounds).
    if let Some(l) = live.iter().find(|l| l.variant == Variant::Redirector) {
        match cost::measure(plan, &l.bed) {
            Ok(mut c) => {
                if let Some(f) = live.iter().find(|l| l.variant == Variant::Floor) {
                    match cost::measure_floor(plan, &f.bed) {
                        Ok(p) => c.floor = Some(p),
                        Err(e) => {
                            let msg = format!("empty-program cost at {n}: {e:#}");
                            println!("  {msg}");
                            res.errors.push(msg);
                        }
                    }
                }
                res.costs.insert(n, c);
            }
            Err(e) => {
                let msg = format!("datapath cost at {n}: {e:#}");
                println!("  {msg}");
                res.errors.push(msg);
            }
        }
    }
    let measured = t1.elapsed();

    let t2 = Instant::now();
    if plan.flip_counts.contains(&n) {
        let pinning = plan.pinning(0, Metric::Newconn);
        for l in live.iter_mut().filter(|l| !l.variant.is_direct()) {
            l.bed.pin(&pinning)?;
            if let Err(e) = measure_flips(
                &mut l.bed,
                l.variant,
                &svcs,
                n,
                plan.flips,
                &pinning,
                &mut res.flips,
            ) {
                let msg = format!("flips {} at {n}: {e:#}", l.variant.name());
                println!("  {msg}");
                res.errors.push(msg);
            }
        }
    }
    let flipped = t2.elapsed();

    let t3 = Instant::now();
    drop(live);
    let down = t3.elapsed();
    println!(
        "  {n} services: built + programmed {:.0} s, rounds {:.0} s, flips {:.0} s, teardown {:.0} s",
        built.as_secs_f64(),
        measured.as_secs_f64(),
        flipped.as_secs_f64(),
        down.as_secs_f64()
    );
    res.phases.insert(
        n,
        [built, measured, flipped, down].map(|d: Duration| d.as_secs_f64()),
    );
    Ok(())
}

/// One variant in round `r`: empty the connection tracking, then kept-alive (wrk) and new
/// connections, each pinned as the plan says and after its own warm-up.
fn slot(plan: &Plan, l: &Live, r: usize) -> Result<(Load, Load)> {
    if l.variant != Variant::RedirectorSocket {
        return measure(plan, l, r);
    }
    // The socket hooks translate sockets by the cgroup they were made in: this process
    // (the new-connection threads) and wrk (its child) join the bed's cgroup for the slot.
    let home = redirector_tests::cgroup::join(&l.bed.cgroup.path)?;
    let res = measure(plan, l, r);
    redirector_tests::cgroup::join(&home)?;
    res
}

fn measure(plan: &Plan, l: &Live, r: usize) -> Result<(Load, Load)> {
    let bed = &l.bed;
    bed.reset_tracking(l.variant)?;
    let to = bed.target(l.variant);
    let pinning = plan.pinning(r, Metric::Keepalive);
    bed.pin(&pinning)?;
    wrk(&bed.cli, to, plan.wrk_conns, plan.warm, &pinning)?;
    let ka = wrk(&bed.cli, to, plan.wrk_conns, plan.run, &pinning)?;
    let pinning = plan.pinning(r, Metric::Newconn);
    bed.pin(&pinning)?;
    new_conns(&bed.cli, to, plan.gen_threads, plan.warm_newconn, &pinning)?;
    let nc = new_conns(&bed.cli, to, plan.gen_threads, plan.run, &pinning)?;
    Ok((ka, nc))
}
