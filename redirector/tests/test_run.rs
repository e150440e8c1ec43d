//! BPF_PROG_TEST_RUN tests of the datapath (needs root; fails with "needs root: ..."
//! otherwise). Every path — new Serve and Proxy flows, established flows across a mode flip,
//! reverse NAT, hairpin, non-VIP and malformed packets — through XDP and tc, IPv4 and IPv6,
//! TCP and UDP. Outputs are compared whole against packets built independently by
//! `common::packet`, and their checksums are recomputed from scratch.
mod common;

use std::net::SocketAddr;

use common::{
    fixture::{self, FAMILIES, PROTOS},
    packet::{diff, sa, verify_checksums, Spec, TCP, TCP_ACK, TCP_FIN, TCP_PSH, UDP},
    Bench, Hook, TC_ACT_REDIRECT,
};
use redirector_common::{MODE_PROXY, MODE_SERVE};

const NAT_HOOKS: [Hook; 2] = [Hook::Xdp, Hook::TcIngress];

/// A prepared datapath with the fixture's services installed.
fn bench() -> Bench {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    b
}

/// Runs `input` through `hook` and asserts the output is exactly `want`, with `ret`, and
/// with valid checksums.
#[track_caller]
fn check(b: &mut Bench, hook: Hook, input: &Spec, want: &Spec, ret: u32, what: &str) {
    let out = b.run(hook, &input.build());
    assert_eq!(out.ret, ret, "{what} via {hook:?}: return code");
    let want = want.build();
    assert!(
        out.pkt == want,
        "{what} via {hook:?}: output differs from the expected packet\n{}",
        diff(&out.pkt, &want)
    );
    verify_checksums(&out.pkt).unwrap_or_else(|e| panic!("{what} via {hook:?}: {e}"));
}

#[track_caller]
fn check_unchanged(b: &mut Bench, hook: Hook, pkt: &[u8], what: &str) {
    let out = b.run(hook, pkt);
    assert_eq!(out.ret, hook.pass(), "{what} via {hook:?}: return code");
    assert!(
        out.pkt == pkt,
        "{what} via {hook:?}: packet changed\n{}",
        diff(&out.pkt, pkt)
    );
}

fn label(v4: bool, proto: u8) -> String {
    format!(
        "{} {}",
        if v4 { "IPv4" } else { "IPv6" },
        fixture::proto_name(proto)
    )
}

#[test]
fn serve_new_flow_goes_to_backend() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 40_000;
    for hook in NAT_HOOKS {
        for v4 in FAMILIES {
            for proto in PROTOS {
                port += 1;
                let what = format!("new Serve flow, {}", label(v4, proto));
                let input = Spec::new(
                    proto,
                    fixture::client(v4, port),
                    fixture::serve_vip(v4, proto),
                );
                let want = input.clone().with_dst(fixture::serve_backend(v4, proto));
                check(&mut b, hook, &input, &want, hook.pass(), &what);
            }
        }
    }
    // Two conntrack entries per flow.
    assert_eq!(b.conntrack_len(), 2 * 8);
}

#[test]
fn proxy_new_flow_goes_to_activator() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 41_000;
    for hook in NAT_HOOKS {
        for v4 in FAMILIES {
            for proto in PROTOS {
                port += 1;
                let what = format!("new Proxy flow, {}", label(v4, proto));
                let input = Spec::new(
                    proto,
                    fixture::client(v4, port),
                    fixture::proxy_vip(v4, proto),
                );
                let want = input.clone().with_dst(fixture::activator(v4));
                check(&mut b, hook, &input, &want, hook.pass(), &what);
            }
            // Proxy pool: one of the pool's activators, consistently for the flow.
            port += 1;
            let input = Spec::tcp(
                &fixture::client(v4, port).to_string(),
                &fixture::pool_vip(v4).to_string(),
            );
            let out = b.run(hook, &input.build());
            assert_eq!(out.ret, hook.pass());
            let hit = fixture::pool(v4)
                .into_iter()
                .find(|a| out.pkt == input.clone().with_dst(*a).build());
            assert!(
                hit.is_some(),
                "pool flow via {hook:?} went to none of the pool"
            );
            verify_checksums(&out.pkt).unwrap();
        }
    }
}

#[test]
fn new_flows_spread_over_all_backends() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    for hook in NAT_HOOKS {
        for v4 in FAMILIES {
            let backends = fixture::multi_backends(v4);
            let mut hits = vec![0usize; backends.len()];
            for i in 0..300u16 {
                let port = if hook == Hook::Xdp { 20_000 } else { 30_000 } + i;
                let input = Spec::new(TCP, fixture::client(v4, port), fixture::multi_vip(v4));
                let out = b.run(hook, &input.build());
                assert_eq!(out.ret, hook.pass());
                let idx = backends
                    .iter()
                    .position(|a| out.pkt == input.clone().with_dst(*a).build())
                    .unwrap_or_else(|| panic!("flow {i} via {hook:?} went to no backend"));
                hits[idx] += 1;
                verify_checksums(&out.pkt).unwrap();
            }
            assert!(hits.iter().all(|h| *h > 0), "unused backends: {hits:?}");
        }
    }
}

/// The second packet of a flow keeps its target after the service flips mode (both ways),
/// while new flows follow the new mode.
#[test]
fn established_flow_survives_flips() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 42_000;
    for hook in NAT_HOOKS {
        for v4 in FAMILIES {
            for proto in PROTOS {
                let what = format!("established flow, {}", label(v4, proto));
                let vip = fixture::serve_vip(v4, proto);
                let key = common::service_key(vip, proto);
                let backend = fixture::serve_backend(v4, proto);
                let act = fixture::activator(v4);
                port += 1;
                let first = Spec::new(proto, fixture::client(v4, port), vip);
                check(
                    &mut b,
                    hook,
                    &first,
                    &first.clone().with_dst(backend),
                    hook.pass(),
                    &what,
                );

                assert!(b.prog.set_mode(&key, MODE_PROXY).unwrap());
                let mut second = first.clone().with_flags(TCP_ACK | TCP_PSH);
                second.payload = b"second packet".to_vec();
                second.seq += 1;
                check(
                    &mut b,
                    hook,
                    &second,
                    &second.clone().with_dst(backend),
                    hook.pass(),
                    &what,
                );
                // A new flow follows the flip.
                port += 1;
                let newer = Spec::new(proto, fixture::client(v4, port), vip);
                check(
                    &mut b,
                    hook,
                    &newer,
                    &newer.clone().with_dst(act),
                    hook.pass(),
                    &what,
                );

                // Flip back: the proxied flow stays on the activator, the first on its backend.
                assert!(b.prog.set_mode(&key, MODE_SERVE).unwrap());
                let mut again = newer.clone().with_flags(TCP_ACK);
                again.payload = b"still proxied".to_vec();
                check(
                    &mut b,
                    hook,
                    &again,
                    &again.clone().with_dst(act),
                    hook.pass(),
                    &what,
                );
                check(
                    &mut b,
                    hook,
                    &second,
                    &second.clone().with_dst(backend),
                    hook.pass(),
                    &what,
                );
            }
        }
    }
}

/// A TCP flow that closed (FIN) and is reopened with a SYN on the same tuple is a new flow
/// and follows the current mode.
#[test]
fn closed_tcp_flow_reopens_as_new_flow() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    for v4 in FAMILIES {
        let vip = fixture::serve_vip(v4, TCP);
        let key = common::service_key(vip, TCP);
        let syn = Spec::new(TCP, fixture::client(v4, 43_000), vip);
        let backend = fixture::serve_backend(v4, TCP);
        check(
            &mut b,
            Hook::Xdp,
            &syn,
            &syn.clone().with_dst(backend),
            2,
            "syn",
        );
        let fin = syn.clone().with_flags(TCP_FIN | TCP_ACK);
        check(
            &mut b,
            Hook::Xdp,
            &fin,
            &fin.clone().with_dst(backend),
            2,
            "fin",
        );
        b.prog.set_mode(&key, MODE_PROXY).unwrap();
        let act = fixture::activator(v4);
        check(
            &mut b,
            Hook::Xdp,
            &syn,
            &syn.clone().with_dst(act),
            2,
            "syn after fin",
        );
        b.prog.set_mode(&key, MODE_SERVE).unwrap();
    }
}

/// Replies from the target get the VIP as source at tc egress, after the node's netfilter:
/// XDP and tc ingress pass them as they are (the node's conntrack saw the request leave as
/// client → target and must see target → client come back), whichever hook took the
/// request and whether the target is a backend or an activator.
#[test]
fn replies_are_translated_at_egress_only() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 44_000;
    for v4 in FAMILIES {
        for proto in PROTOS {
            for req_hook in NAT_HOOKS {
                for proxied in [false, true] {
                    port += 1;
                    let what = format!(
                        "reply to a request via {req_hook:?}, proxied={proxied}, {}",
                        label(v4, proto)
                    );
                    let (vip, target) = if proxied {
                        (fixture::proxy_vip(v4, proto), fixture::activator(v4))
                    } else {
                        (
                            fixture::serve_vip(v4, proto),
                            fixture::serve_backend(v4, proto),
                        )
                    };
                    let client = fixture::client(v4, port);
                    let req = Spec::new(proto, client, vip);
                    check(
                        &mut b,
                        req_hook,
                        &req,
                        &req.clone().with_dst(target),
                        req_hook.pass(),
                        &what,
                    );
                    let reply = Spec::new(proto, target, client).with_flags(TCP_ACK);
                    for hook in NAT_HOOKS {
                        check_unchanged(&mut b, hook, &reply.build(), &what);
                    }
                    let want = reply.clone().with_src(vip);
                    check(
                        &mut b,
                        Hook::TcEgress,
                        &reply,
                        &want,
                        Hook::TcEgress.pass(),
                        &what,
                    );
                }
            }
        }
    }
}

/// Egress translates nothing but replies, and each once: the request it sees (already
/// translated at ingress, or still addressed to the VIP) and a reply it already gave the
/// VIP pass unchanged.
#[test]
fn egress_translates_replies_once_and_nothing_else() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 46_000;
    for v4 in FAMILIES {
        for proto in PROTOS {
            port += 1;
            let what = format!("egress, {}", label(v4, proto));
            let vip = fixture::serve_vip(v4, proto);
            let backend = fixture::serve_backend(v4, proto);
            let client = fixture::client(v4, port);
            let req = Spec::new(proto, client, vip);
            let translated = req.clone().with_dst(backend);
            check(
                &mut b,
                Hook::TcIngress,
                &req,
                &translated,
                Hook::TcIngress.pass(),
                &what,
            );
            check_unchanged(&mut b, Hook::TcEgress, &translated.build(), &what);
            check_unchanged(&mut b, Hook::TcEgress, &req.build(), &what);
            let reply = Spec::new(proto, backend, client).with_flags(TCP_ACK);
            let want = reply.clone().with_src(vip);
            check(
                &mut b,
                Hook::TcEgress,
                &reply,
                &want,
                Hook::TcEgress.pass(),
                &what,
            );
            check_unchanged(&mut b, Hook::TcEgress, &want.build(), &what);
        }
    }
    assert_eq!(b.conntrack_len(), 2 * 4, "egress created flows");
}

/// tc egress never starts a flow: VIP traffic it sees passes unchanged.
#[test]
fn egress_does_not_start_flows() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    for v4 in FAMILIES {
        for proto in PROTOS {
            let input = Spec::new(
                proto,
                fixture::client(v4, 45_000),
                fixture::serve_vip(v4, proto),
            );
            check_unchanged(
                &mut b,
                Hook::TcEgress,
                &input.build(),
                "VIP traffic on egress",
            );
        }
    }
    assert_eq!(b.conntrack_len(), 0);
}

/// A client that is the backend it is sent to: the source becomes the VIP so the reply
/// comes back through us; tc bounces the packet back out of its interface (MACs swapped,
/// TC_ACT_REDIRECT), XDP passes it on. Both directions are translated at ingress (the
/// node's stack never sees them), none at egress.
#[test]
fn hairpin_flows() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 46_000;
    for hook in NAT_HOOKS {
        for v4 in FAMILIES {
            for proto in PROTOS {
                port += 1;
                let what = format!("hairpin, {}", label(v4, proto));
                let vip = fixture::serve_vip(v4, proto);
                let backend = fixture::serve_backend(v4, proto);
                let client = SocketAddr::new(backend.ip(), port);
                let seen_as = SocketAddr::new(vip.ip(), port);
                let req = Spec::new(proto, client, vip);
                let mut want = req.clone().with_src(seen_as).with_dst(backend);
                let ret = if hook.is_tc() {
                    want = want.swap_macs();
                    TC_ACT_REDIRECT
                } else {
                    hook.pass()
                };
                check(&mut b, hook, &req, &want, ret, &what);
                // The backend's reply to the VIP goes back to itself, from the VIP.
                let reply = Spec::new(proto, backend, seen_as).with_flags(TCP_ACK);
                let mut want = reply.clone().with_src(vip).with_dst(client);
                if hook.is_tc() {
                    want = want.swap_macs();
                }
                check(&mut b, hook, &reply, &want, ret, &what);
                // Both were translated at ingress: the egress they are bounced to (or
                // forwarded through) leaves them alone, and so it does the untranslated ones.
                for pkt in [&req, &reply] {
                    check_unchanged(&mut b, Hook::TcEgress, &pkt.build(), &what);
                }
                let translated = req.clone().with_src(seen_as).with_dst(backend);
                check_unchanged(&mut b, Hook::TcEgress, &translated.build(), &what);
                check_unchanged(
                    &mut b,
                    Hook::TcEgress,
                    &reply.clone().with_src(vip).with_dst(client).build(),
                    &what,
                );
            }
        }
    }
}

/// IPv4 UDP without a checksum keeps none, on both directions and every hook.
#[test]
fn udp_v4_without_checksum_stays_without() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 47_000;
    for (req_hook, reply_hook) in [
        (Hook::Xdp, Hook::TcEgress),
        (Hook::TcIngress, Hook::TcEgress),
    ] {
        port += 1;
        let vip = fixture::serve_vip(true, UDP);
        let backend = fixture::serve_backend(true, UDP);
        let client = fixture::client(true, port);
        let mut req = Spec::new(UDP, client, vip);
        req.udp_no_csum = true;
        check(
            &mut b,
            req_hook,
            &req,
            &req.clone().with_dst(backend),
            req_hook.pass(),
            "udp csum 0",
        );
        let mut reply = Spec::new(UDP, backend, client);
        reply.udp_no_csum = true;
        check(
            &mut b,
            reply_hook,
            &reply,
            &reply.clone().with_src(vip),
            reply_hook.pass(),
            "udp csum 0 reply",
        );
    }
}

/// Ethernet padding after the IP packet is left alone and not mistaken for payload.
#[test]
fn ethernet_padding_is_kept() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut port = 48_000;
    for hook in NAT_HOOKS {
        for proto in PROTOS {
            port += 1;
            let mut req = Spec::new(
                proto,
                fixture::client(true, port),
                fixture::serve_vip(true, proto),
            );
            req.payload = b"x".to_vec();
            req.pad_to = 60;
            let mut input = req.build();
            let n = input.len();
            input[n - 3..].copy_from_slice(&[0xde, 0xad, 0xbf]);
            let out = b.run(hook, &input);
            assert_eq!(out.ret, hook.pass());
            let mut want = req
                .clone()
                .with_dst(fixture::serve_backend(true, proto))
                .build();
            want[n - 3..].copy_from_slice(&[0xde, 0xad, 0xbf]);
            assert!(
                out.pkt == want,
                "padding via {hook:?}\n{}",
                diff(&out.pkt, &want)
            );
            verify_checksums(&out.pkt).unwrap();
        }
    }
}

#[test]
fn non_vip_traffic_is_untouched() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let mut pkts: Vec<(String, Vec<u8>)> = Vec::new();
    for v4 in FAMILIES {
        for proto in PROTOS {
            let client = fixture::client(v4, 49_000);
            let vip = fixture::serve_vip(v4, proto);
            let l = label(v4, proto);
            let other = if v4 {
                sa("10.96.0.99:80")
            } else {
                sa("[fd00:96::99]:80")
            };
            pkts.push((
                format!("other address, {l}"),
                Spec::new(proto, client, other).build(),
            ));
            let wrong_port = SocketAddr::new(vip.ip(), 81);
            pkts.push((
                format!("VIP, other port, {l}"),
                Spec::new(proto, client, wrong_port).build(),
            ));
            let other_proto = if proto == TCP { UDP } else { TCP };
            pkts.push((
                format!("VIP, other protocol, {l}"),
                Spec::new(other_proto, client, vip).build(),
            ));
            // A backend talking to a client with no flow: not a reply of a known flow.
            let be = fixture::serve_backend(v4, proto);
            pkts.push((
                format!("unknown reply, {l}"),
                Spec::new(proto, be, client).build(),
            ));
        }
    }
    // Not IP: ARP, and a VLAN-tagged frame.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&common::packet::MAC_B);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    pkts.push(("ARP".into(), arp));
    let mut vlan = Spec::tcp("10.244.1.5:49001", "10.96.0.10:80").build();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    pkts.push(("VLAN-tagged VIP".into(), vlan));
    // ICMP to the VIP.
    let mut icmp = Spec::tcp("10.244.1.5:49002", "10.96.0.10:80").build();
    icmp[14 + 9] = 1;
    pkts.push(("ICMP to VIP".into(), icmp));
    for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
        for (what, pkt) in &pkts {
            check_unchanged(&mut b, hook, pkt, what);
        }
    }
    assert_eq!(b.conntrack_len(), 0, "non-VIP traffic created flows");
}

#[test]
fn malformed_vip_packets_are_untouched() {
    require_root!();
    let _g = common::serial();
    let mut b = bench();
    let pkts = common::malformed::cases();
    assert!(pkts.len() > 20);
    for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
        for (what, pkt) in &pkts {
            if hook.is_tc() && common::tc_test_run_refuses(pkt) {
                assert!(b.try_run(hook, pkt, 1).is_err(), "{what}: expected EINVAL");
                continue;
            }
            check_unchanged(&mut b, hook, pkt, what);
        }
    }
    assert_eq!(b.conntrack_len(), 0, "malformed packets created flows");
}

#[test]
fn random_packets_never_dropped_and_non_vip_untouched() {
    require_root!();
    let _g = common::serial();
    for seed in [0x5eed_0001, 0x5eed_0002, 0x5eed_0003] {
        common::fuzz::run(10_000, seed);
    }
}

/// The same with the tc programs updating L4 checksums only through
/// `bpf_l4_csum_replace`: the path of CHECKSUM_COMPLETE packets, which test_run (whose
/// packets are CHECKSUM_NONE) cannot produce. Every rewritten packet's checksums verify.
#[test]
fn random_packets_with_checksum_helpers_only() {
    require_root!();
    let _g = common::serial();
    let b = common::Bench::with(redirector::datapath::L4Checksum::Helpers);
    common::fuzz::run_on(b, 10_000, 0x5eed_0004);
}

/// Removing one of 10 backends moves ~1/N of new-flow assignments, and those are the
/// removed backend's flows (plus few others).
#[test]
fn maglev_removal_moves_about_one_nth() {
    require_root!();
    let _g = common::serial();
    common::scale::maglev_consistency();
}

/// Small sets in MAGLEV_SMALL, large in MAGLEV; sets move between them as they grow and
/// shrink, and new flows follow.
#[test]
fn maglev_tables_small_and_large() {
    require_root!();
    let _g = common::serial();
    common::scale::maglev_tiers();
}

/// 10,000 services × 10 backends fit the maps; prints the programming time and the map
/// memory.
#[test]
fn ten_thousand_services_fit() {
    require_root!();
    let _g = common::serial();
    common::scale::memory_at_scale();
}

#[test]
fn serve_without_backends_falls_back_to_activator() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::serve_without_backends();
}

#[test]
fn idle_flows_expire_and_follow_the_mode() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::idle_flows_expire();
}

#[test]
fn conntrack_reads_the_clock_once_per_refresh() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::conntrack_clock_refresh();
}

#[test]
fn flows_keep_their_translation_across_a_conntrack_switch() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::conntrack_lent_during_resize();
}

#[test]
fn counters_follow_traffic() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::counters();
}

#[test]
fn tcp_options_and_large_payload_are_rewritten() {
    require_root!();
    let _g = common::serial();
    common::edge::tcp_options_and_large_payload();
}

#[test]
fn udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    require_root!();
    let _g = common::serial();
    common::edge::udp_checksum_that_becomes_zero();
}

/// A RST/FIN in the reply direction closes the original-direction entry too, so a later SYN
/// reusing the tuple is a new flow and follows the current mode.
#[test]
fn syn_after_server_reset_follows_the_mode() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::syn_after_server_reset_is_a_new_flow();
}

/// A bare SYN on a flow that has seen replies (so not a retransmission) is a new flow, not
/// pinned to the old target for the whole TCP timeout.
#[test]
fn syn_after_established_follows_the_mode() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::syn_after_established_is_a_new_flow();
}

#[test]
fn conntrack_sweep_in_batches() {
    require_root!();
    let _g = common::serial();
    common::lifecycle::conntrack_sweep_in_batches();
}
