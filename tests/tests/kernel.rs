//! What depends on the kernel the agent runs on, checked on this machine's kernel and, by
//! `cargo xtask kernels`, on each kernel of the matrix in a VM: each tc hook holds exactly
//! one redirector program across agent restarts (a tcx link where the kernel has tcx, a
//! clsact filter before 6.6) and none after `redirector uninstall`; the probe the agent logs
//! agrees with what the kernel is; and a request through a Serve VIP still works after the
//! restarts.
use std::process::Command;

use aya::programs::{SchedClassifier, TcAttachType};
use redirector_tests::{
    bins,
    cluster::{Cluster, ID_BEA, ID_BEB, WEB},
    coldstart::net::in_netns,
    require_root,
    traffic::{run_client, ClientArgs},
};

/// redirector's programs on `ifname` in namespace `ns`: (tcx links, clsact filters) for
/// ingress and egress together.
fn programs_on(ns: &redirector_tests::netns::Netns, ifname: &str) -> (usize, usize) {
    let mut clsact = 0;
    for dir in ["ingress", "egress"] {
        let out = ns
            .exec("tc", &["filter", "show", "dev", ifname, dir])
            .unwrap_or_default();
        clsact += out.lines().filter(|l| l.contains("redirector_tc_")).count();
    }
    let name = ifname.to_owned();
    let tcx = in_netns(&ns.name, move || {
        let mut n = 0;
        for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
            // Kernels without tcx answer EINVAL: no tcx programs.
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&name, ty) {
                n += progs
                    .iter()
                    .filter(|p| {
                        p.name_as_str()
                            .is_some_and(|s| s.starts_with("redirector_tc"))
                    })
                    .count();
            }
        }
        Ok(n)
    })
    .expect("querying tcx in the node namespace");
    (tcx, clsact)
}

fn kernel_version() -> (u32, u32) {
    let out = Command::new("uname").arg("-r").output().expect("uname");
    let r = String::from_utf8_lossy(&out.stdout);
    let mut it = r
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn one_program_per_tc_hook_across_restarts_and_none_after_uninstall() {
    require_root!();
    let mut c = Cluster::new("khook", bins!()).expect("cluster");
    let pod_if = c.topo.pod("cli").host_if.clone();
    let has_tcx = kernel_version() >= (6, 6);
    let want = if has_tcx { (2, 0) } else { (0, 2) };
    assert_eq!(
        programs_on(&c.topo.node(0).ns, &pod_if),
        want,
        "after the first start: (tcx, clsact) programs on {pod_if} (ingress + egress)"
    );
    for round in 0..2 {
        c.agents[0].stop().expect("stopping agent A");
        assert_eq!(
            programs_on(&c.topo.node(0).ns, &pod_if),
            want,
            "round {round}: programs stay attached while no agent runs"
        );
        c.agents[0].spawn().expect("restarting agent A");
        assert_eq!(
            programs_on(&c.topo.node(0).ns, &pod_if),
            want,
            "round {round}: a restart replaces the programs, never adds one"
        );
    }
    let cli = &c.topo.pod("cli").ns;
    let s = run_client(&c.bins, cli, &ClientArgs::tcp(WEB.vip(false), 20, 2, 5)).unwrap();
    s.assert_all_ok("web after restarts");
    assert!(
        s.identities().is_subset(&[ID_BEA, ID_BEB].into()),
        "answered by the backends: {s:?}"
    );

    c.agents[0].stop().expect("stopping agent A");
    let pin = c.configs[0].pin_path.clone();
    // nsenter, not `ip netns exec`: that one remounts /sys, hiding the bpffs with the pins.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", c.topo.node(0).ns.path()))
        .arg(&c.agent_bin.0)
        .args(["uninstall", "--pin-path"])
        .arg(&pin)
        .output()
        .expect("redirector uninstall");
    assert!(out.status.success(), "redirector uninstall: {out:?}");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        programs_on(&c.topo.node(0).ns, &pod_if),
        (0, 0),
        "uninstall leaves no program on {pod_if}: {out}"
    );
    let uplink = c.topo.node(0).uplink.clone();
    assert_eq!(
        programs_on(&c.topo.node(0).ns, &uplink),
        (0, 0),
        "uninstall leaves no tc program on the uplink {uplink}"
    );
}

#[test]
fn probe_matches_the_kernel() {
    require_root!();
    let bin = redirector_tests::agent::redirector_bin();
    let out = Command::new(&bin)
        .args(["probe", "--json"])
        .output()
        .expect("redirector probe");
    assert!(out.status.success(), "redirector probe failed: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
    let version = kernel_version();
    let flag = |k: &str| v[k].as_bool().unwrap_or_else(|| panic!("{k} in {v}"));
    assert_eq!(flag("tcx"), version >= (6, 6), "tcx: {v}");
    assert_eq!(
        flag("coarse_clock"),
        version >= (5, 11),
        "coarse clock: {v}"
    );
    assert!(flag("batch_ops"), "batch map operations (5.6+): {v}");
    assert!(flag("sock_addr") && flag("sk_lookup"), "socket hooks: {v}");
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    assert_eq!(
        flag("probe_read_kernel"),
        !lockdown.contains("[confidentiality]"),
        "bpf_probe_read_kernel must be missing exactly under lockdown=confidentiality \
         ({lockdown:?}): {v}"
    );
    if flag("btf") {
        assert_ne!(v["ip_summed"], 0, "ip_summed from BTF: {v}");
    }
    // The agent's status shows the same line.
    let text = String::from_utf8_lossy(
        &Command::new(&bin)
            .args(["probe"])
            .output()
            .expect("redirector probe")
            .stdout,
    )
    .into_owned();
    assert!(
        text.starts_with("kernel ")
            && text.contains(if flag("tcx") { "tc=tcx" } else { "tc=clsact" }),
        "{text}"
    );
}
