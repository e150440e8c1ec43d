//! `cargo xtask perf`: release build, then the ignored `perf` integration test, which reads
//! the selected scenarios from `PERF_ARGS` (no scenario flag: all of them). `--quick` is what
//! CI runs (`.ci/run`): every part, short; it fails only when a benchmark produced no
//! numbers, never on a missed target.
use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap,
    util::{cargo, redirector_bin, require_root, run, workspace_root},
};

#[derive(clap::Args, Debug, Default)]
pub struct PerfArgs {
    /// Measure the datapath itself (eBPF programs against empty-program floors).
    #[arg(long)]
    pub datapath: bool,
    /// Measure the Proxy path through the activator.
    #[arg(long)]
    pub activator: bool,
    /// Node level: redirector beside kube-proxy's iptables and nftables rules, through the VIP.
    #[arg(long)]
    pub node: bool,
    /// The wrong side of a mode flip with ingress traffic: per direction, the time from the
    /// SKS write to the last request on the old side, with the agent and with the gateway
    /// alone (Knative's propagation delay).
    #[arg(long)]
    pub flip: bool,
    /// Short runs for CI: every selected part (all by default) in about two minutes; fails only
    /// when a benchmark produced no numbers (numbers not meaningful, targets not asserted).
    #[arg(long)]
    pub quick: bool,
}

impl PerfArgs {
    /// The flags as given, space-separated, for `PERF_ARGS`.
    fn to_env(&self) -> String {
        [
            (self.datapath, "--datapath"),
            (self.activator, "--activator"),
            (self.node, "--node"),
            (self.flip, "--flip"),
            (self.quick, "--quick"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, flag)| *flag)
        .collect::<Vec<_>>()
        .join(" ")
    }
}

pub fn run_all(args: &PerfArgs) -> Result<()> {
    let perf_rs = workspace_root().join("tests/tests/perf.rs");
    if !perf_rs.exists() {
        bail!(
            "{} does not exist yet: no perf test to run",
            perf_rs.display()
        );
    }
    require_root("perf")?;
    bootstrap::run_all()?;
    run(&mut cargo(&["build", "--workspace", "--release"])).context("release build failed")?;

    let bin = redirector_bin("release");
    let mut cmd = cargo(&[
        "test",
        "--release",
        "-p",
        "redirector-tests",
        "--test",
        "perf",
        "--",
        "--ignored",
        "--nocapture",
        // One benchmark at a time: they share the machine's two cores.
        "--test-threads=1",
    ]);
    cmd.env("REDIRECTOR_BIN", &bin)
        .env("PERF_ARGS", args.to_env());
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::PerfArgs;

    #[test]
    fn env() {
        assert_eq!(PerfArgs::default().to_env(), "");
        let a = PerfArgs {
            datapath: true,
            activator: false,
            node: false,
            flip: false,
            quick: true,
        };
        assert_eq!(a.to_env(), "--datapath --quick");
        let a = PerfArgs {
            flip: true,
            quick: true,
            ..PerfArgs::default()
        };
        assert_eq!(a.to_env(), "--flip --quick");
    }
}
