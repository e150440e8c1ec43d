//! From the rounds to numbers: medians and spreads over rounds, ratios paired per round
//! (a variant against direct, or redirector against iptables / nftables, of the SAME
//! round), the targets judged on the median paired ratios.
use serde_json::{json, Value};

use super::{
    median,
    rounds::{Results, Slot},
    Variant, VARIANTS,
};

/// Median and range over rounds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
}

impl Spread {
    pub(super) fn of(v: &[f64]) -> Self {
        let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        Spread {
            median: median(&f),
            min: f.iter().copied().fold(f64::NAN, f64::min),
            max: f.iter().copied().fold(f64::NAN, f64::max),
            n: f.len(),
        }
    }

    /// (max - min) / median.
    pub(super) fn rel_range(&self) -> f64 {
        (self.max - self.min) / self.median
    }

    pub(super) fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "rounds": self.n})
    }

    /// "0.981 (0.950–1.003)".
    pub(super) fn ratio(&self) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        if self.n < 2 {
            return format!("{:.3}", self.median);
        }
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
    }

    /// "71234 (69k–73k)" with `f` for the numbers.
    pub(super) fn abs(&self, f: fn(f64) -> String) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        if self.n < 2 {
            return f(self.median);
        }
        format!("{} ({}–{})", f(self.median), f(self.min), f(self.max))
    }
}

/// Which measurement of a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Metric {
    Keepalive,
    Newconn,
}

impl Metric {
    fn of(self, s: &Slot) -> Option<&super::load::Load> {
        match self {
            Metric::Keepalive => s.keepalive.as_ref(),
            Metric::Newconn => s.newconn.as_ref(),
        }
    }
}

/// The slots of `v` at `n` that `keep` selects.
fn slots<'a>(
    res: &'a Results,
    v: Variant,
    n: usize,
    keep: &'a dyn Fn(&Slot) -> bool,
) -> impl Iterator<Item = &'a Slot> + 'a {
    res.slots
        .get(&(v, n))
        .into_iter()
        .flatten()
        .filter(move |s| keep(s))
}

/// Per-round values of `metric` (`field` of its Load) for `v` at `n`.
pub(super) fn values(
    res: &Results,
    v: Variant,
    n: usize,
    metric: Metric,
    field: fn(&super::load::Load) -> f64,
    keep: &dyn Fn(&Slot) -> bool,
) -> Vec<f64> {
    slots(res, v, n, keep)
        .map(|s| metric.of(s).map_or(f64::NAN, field))
        .collect()
}

/// Per-round ratios of `a`'s rate to `b`'s rate at `n`, rounds paired by number.
pub(super) fn paired(
    res: &Results,
    a: Variant,
    b: Variant,
    n: usize,
    metric: Metric,
    keep: &dyn Fn(&Slot) -> bool,
) -> Vec<f64> {
    slots(res, a, n, keep)
        .filter_map(|sa| {
            let sb = slots(res, b, n, keep).find(|sb| sb.round == sa.round)?;
            let (x, y) = (metric.of(sa)?.rate, metric.of(sb)?.rate);
            (x > 0.0 && y > 0.0).then_some(x / y)
        })
        .collect()
}

pub(super) fn all(_: &Slot) -> bool {
    true
}

/// One row per (count, variant): medians and ranges over rounds, paired ratios to direct.
pub(super) fn rows(res: &Results, counts: &[usize]) -> Vec<Value> {
    let mut rows = Vec::new();
    for &n in counts {
        for v in VARIANTS {
            if !res.slots.contains_key(&(v, n)) {
                continue;
            }
            let mut row = json!({"variant": v.name(), "services": n});
            for (m, key, unit) in [
                (Metric::Keepalive, "keepalive", "rps"),
                (Metric::Newconn, "newconn", "cps"),
            ] {
                let rate = values(res, v, n, m, |l| l.rate, &all);
                let sp = Spread::of(&rate);
                let p50 = values(res, v, n, m, |l| l.p50_us, &all);
                let p99 = values(res, v, n, m, |l| l.p99_us, &all);
                let errors: u64 = slots(res, v, n, &all)
                    .filter_map(|s| m.of(s))
                    .map(|l| l.errors)
                    .sum();
                let failed = slots(res, v, n, &all).filter(|s| m.of(s).is_none()).count();
                let ratio = paired(res, v, Variant::Direct, n, m, &all);
                let o = row.as_object_mut().unwrap();
                o.insert(format!("{key}_{unit}"), json!(sp.median));
                o.insert(format!("{key}_{unit}_min"), json!(sp.min));
                o.insert(format!("{key}_{unit}_max"), json!(sp.max));
                o.insert(format!("{key}_{unit}_rounds"), json!(rate));
                o.insert(format!("{key}_p50_us"), json!(median(&p50)));
                o.insert(format!("{key}_p99_us"), json!(median(&p99)));
                o.insert(format!("{key}_p99_us_max"), json!(Spread::of(&p99).max));
                o.insert(format!("{key}_p50_us_rounds"), json!(p50));
                o.insert(format!("{key}_p99_us_rounds"), json!(p99));
                o.insert(format!("{key}_errors"), json!(errors));
                o.insert(format!("{key}_failed_rounds"), json!(failed));
                let mut r = Spread::of(&ratio).json();
                r["per_round"] = json!(ratio);
                o.insert(format!("{key}_vs_direct"), r);
            }
            let o = row.as_object_mut().unwrap();
            o.insert(
                "program_ms".into(),
                json!(res.program_ms.get(&(v, n)).copied().unwrap_or(f64::NAN)),
            );
            o.insert(
                "rounds".into(),
                json!(res.slots.get(&(v, n)).map_or(0, |s| s.len())),
            );
            o.insert(
                "positions".into(),
                json!(slots(res, v, n, &all)
                    .map(|s| s.position)
                    .collect::<Vec<_>>()),
            );
            rows.push(row);
        }
    }
    rows
}

/// Redirector against each kube-proxy layout, paired per round: (against, metric) ->
/// spread of redirector / other.
pub(super) fn head_to_head(res: &Results, n: usize, other: Variant, m: Metric) -> Spread {
    Spread::of(&paired(res, Variant::Redirector, other, n, m, &all))
}
