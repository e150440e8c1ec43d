//! BPF_PROG_TEST_RUN of entries keyed by a real endpoint's address (a revision's pod, or
//! Knative's activator: where Knative's ingress sends) instead of a VIP (needs root; fails
//! with "needs root: ..." otherwise). Connections made to the address before the entry
//! existed were never translated, so only a new connection (a bare SYN) is switched; any
//! other packet without conntrack state passes unchanged, and the switched flow keeps its
//! target. Through XDP and tc ingress, IPv4 and IPv6.
mod common;

use common::{
    packet::{sa, Spec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    Bench, Hook,
};
use redirector::control::EntryKind;

/// (pod address, node-local activator, client) per family.
const CASES: [(&str, &str, &str); 2] = [
    ("10.244.7.7:8012", "10.0.0.1:8012", "10.244.1.10"),
    ("[fd00:244::7]:8012", "[fd00::1]:8012", "[fd00:244:1::10]"),
];

#[test]
fn endpoint_entries_switch_only_new_connections() {
    require_root!();
    let _g = common::serial();
    for kind in [EntryKind::Endpoint, EntryKind::Shared] {
        let mut b = Bench::new();
        let services: Vec<_> = CASES
            .iter()
            .map(|(pod, act, _)| {
                let mut d = common::service(pod, common::packet::TCP, true, &[], &[], act);
                d.kind = kind;
                d
            })
            .collect();
        b.apply(&services);
        let mut port = 42_000;
        for hook in [Hook::Xdp, Hook::TcIngress] {
            for (pod, act, client) in CASES {
                let what = format!("{kind:?} {pod} via {hook:?}");
                // A connection made before the entry: its packets pass as they are.
                port += 1;
                let from = sa(&format!("{client}:{port}"));
                for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_FIN] {
                    let pkt = Spec::new(common::packet::TCP, from, sa(pod))
                        .with_flags(flags)
                        .build();
                    let out = b.run(hook, &pkt);
                    assert_eq!(out.ret, hook.pass(), "{what}");
                    assert!(
                        out.pkt == pkt,
                        "{what}: an established packet was rewritten"
                    );
                }
                // A new connection: switched to the activator, and its next packets follow.
                port += 1;
                let from = sa(&format!("{client}:{port}"));
                let syn = Spec::new(common::packet::TCP, from, sa(pod)).with_flags(TCP_SYN);
                let out = b.run(hook, &syn.build());
                assert_eq!(out.ret, hook.pass(), "{what}");
                assert!(
                    out.pkt == syn.clone().with_dst(sa(act)).build(),
                    "{what}: the SYN was not sent to the activator"
                );
                let ack = syn.with_flags(TCP_ACK | TCP_PSH);
                let out = b.run(hook, &ack.build());
                assert!(
                    out.pkt == ack.with_dst(sa(act)).build(),
                    "{what}: the switched flow lost its target"
                );
            }
        }
    }
}

/// A switched connection closes, the flip back to Serve deletes the endpoint's entry, and
/// the client reuses its port for a new connection to the pod: the SYN and every packet
/// after it reach the pod, none follows the old flow's entry to the activator.
#[test]
fn reused_port_after_the_entry_is_gone_reaches_the_pod() {
    require_root!();
    let _g = common::serial();
    let mut port = 43_000;
    for hook in [Hook::Xdp, Hook::TcIngress] {
        for (pod, act, client) in CASES {
            let what = format!("{pod} via {hook:?}");
            let mut b = Bench::new();
            let mut d = common::service(pod, common::packet::TCP, true, &[], &[], act);
            d.kind = EntryKind::Endpoint;
            b.apply(std::slice::from_ref(&d));
            port += 1;
            let from = sa(&format!("{client}:{port}"));
            let syn = Spec::new(common::packet::TCP, from, sa(pod)).with_flags(TCP_SYN);
            let out = b.run(hook, &syn.build());
            assert!(
                out.pkt == syn.clone().with_dst(sa(act)).build(),
                "{what}: switched"
            );
            // The activator answers, then resets the flow (closed on both entries).
            let reply = syn
                .clone()
                .with_dst(sa(act))
                .reply()
                .with_flags(TCP_SYN | TCP_ACK);
            b.run(Hook::TcEgress, &reply.build());
            let rst = syn.clone().with_flags(TCP_RST | TCP_ACK);
            b.run(hook, &rst.build());
            // Serve again: the entry is deleted.
            b.apply(&[]);
            for (flags, name) in [
                (TCP_SYN, "SYN"),
                (TCP_ACK, "ACK"),
                (TCP_ACK | TCP_PSH, "data"),
            ] {
                let pkt = syn.clone().with_flags(flags).build();
                let out = b.run(hook, &pkt);
                assert_eq!(out.ret, hook.pass(), "{what}: {name}");
                assert!(
                    out.pkt == pkt,
                    "{what}: the new connection's {name} was rewritten"
                );
            }
        }
    }
}
