//! Flow lifecycle and bookkeeping on the datapath: Serve without backends falls back to the
//! activator, idle flows expire and are picked again, and the counters add up.
use std::{net::SocketAddr, thread::sleep, time::Duration};

use redirector_common::{
    DatapathConfig, CONFIG_KEY, CT_REFRESH_JIFFIES, G_FRAGMENT_OR_OPTIONS, G_MALFORMED,
    G_NAT_FORWARD, G_NAT_REPLY, G_NOT_IP, G_NO_BACKEND, MODE_PROXY,
};

use super::{
    ct_key, fixture, malformed,
    packet::{diff, parse, Spec, TCP, UDP},
    service, service_key, tc_test_run_refuses, Bench, Hook,
};

fn dst_of(b: &mut Bench, hook: Hook, s: &Spec) -> SocketAddr {
    let out = b.run(hook, &s.build());
    assert_eq!(out.ret, hook.pass());
    parse(&out.pkt).expect("output parses").dst
}

/// Serve with no backends sends new flows to the activator; a Proxy service with no
/// activator of the packet's family leaves the packet alone.
pub fn serve_without_backends() {
    let mut b = Bench::new();
    b.apply(&[
        service("10.96.9.1:80", TCP, false, &[], &[], "10.0.0.1:8012"),
        service("10.96.9.2:80", TCP, true, &[], &[], "[fd00::1]:8012"),
    ]);
    for hook in [Hook::Xdp, Hook::TcIngress] {
        let s = Spec::tcp("10.244.1.5:41000", "10.96.9.1:80");
        assert_eq!(dst_of(&mut b, hook, &s), "10.0.0.1:8012".parse().unwrap());
        let s = Spec::tcp("10.244.1.5:41001", "10.96.9.2:80");
        let pkt = s.build();
        let out = b.run(hook, &pkt);
        assert!(
            out.pkt == pkt,
            "no activator: changed\n{}",
            diff(&out.pkt, &pkt)
        );
    }
    let g = b.prog.maps().global_stats();
    assert_eq!(g[G_NO_BACKEND as usize], 2);
}

/// A flow idle past its timeout is a new flow again and follows the current mode.
pub fn idle_flows_expire() {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let cfg = DatapathConfig {
        tcp_timeout_ns: 3_600_000_000_000,
        // The least the agent accepts: whole seconds, at least one (the datapath checks
        // expiry only on flows idle for more than a second).
        udp_timeout_ns: 1_000_000_000,
        closing_timeout_ns: 1_000_000_000,
    };
    b.prog.maps_mut().config.set(CONFIG_KEY, cfg, 0).unwrap();
    let vip = fixture::serve_vip(true, UDP);
    let key = service_key(vip, UDP);
    let udp = Spec::new(UDP, fixture::client(true, 41_100), vip);
    let tcp_vip = fixture::serve_vip(true, TCP);
    let tcp = Spec::new(TCP, fixture::client(true, 41_101), tcp_vip);
    let tcp_key = service_key(tcp_vip, TCP);
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &udp),
        fixture::serve_backend(true, UDP)
    );
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &tcp),
        fixture::serve_backend(true, TCP)
    );
    b.prog.set_mode(&key, MODE_PROXY).unwrap();
    b.prog.set_mode(&tcp_key, MODE_PROXY).unwrap();
    // Still within the timeout: pinned to its backend.
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &udp),
        fixture::serve_backend(true, UDP),
        "UDP flow within its timeout kept"
    );
    // Past it (the coarse clock ticks every few ms).
    sleep(Duration::from_millis(1_100));
    let act = fixture::activator(true);
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &udp),
        act,
        "idle UDP flow expired"
    );
    let ack = tcp.clone().with_flags(0x10);
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &ack),
        fixture::serve_backend(true, TCP),
        "TCP flow (6 h timeout) kept"
    );
}

/// A conntrack entry reads the clock only once `CT_REFRESH_JIFFIES` have passed since it
/// last did: packets in between leave `last_seen` and `seen_jiffies` as they are; the first
/// one after moves both (`last_seen` on CLOCK_MONOTONIC_COARSE, the clock the agent's sweep
/// and activity checks compare it with).
pub fn conntrack_clock_refresh() {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let vip = fixture::serve_vip(true, TCP);
    let s = Spec::new(TCP, fixture::client(true, 41_150), vip).with_flags(0x10);
    let key = ct_key(s.src, s.dst, TCP);
    let entry = |b: &Bench| b.prog.maps().conntrack.get(&key, 0).expect("forward entry");
    use redirector::control::monotonic_coarse_ns;
    let t0 = monotonic_coarse_ns();
    dst_of(&mut b, Hook::TcIngress, &s);
    let first = entry(&b);
    assert!(
        first.last_seen >= t0 && first.last_seen <= monotonic_coarse_ns(),
        "last_seen {} is CLOCK_MONOTONIC_COARSE (from {t0})",
        first.last_seen
    );
    // Within the refresh interval (CT_REFRESH_JIFFIES is at least 100 ms): untouched.
    for _ in 0..3 {
        dst_of(&mut b, Hook::TcIngress, &s);
    }
    let same = entry(&b);
    assert_eq!(
        (same.last_seen, same.seen_jiffies),
        (first.last_seen, first.seen_jiffies),
        "no refresh within {CT_REFRESH_JIFFIES} jiffies"
    );
    // A second is at least 100 jiffies (HZ >= 100).
    sleep(Duration::from_millis(1_100));
    dst_of(&mut b, Hook::Xdp, &s);
    let later = entry(&b);
    assert!(
        later.last_seen >= first.last_seen + 1_000_000_000,
        "last_seen refreshed: {} -> {}",
        first.last_seen,
        later.last_seen
    );
    let ticks = later.seen_jiffies.wrapping_sub(first.seen_jiffies);
    assert!(
        (CT_REFRESH_JIFFIES..100 * CT_REFRESH_JIFFIES).contains(&ticks),
        "seen_jiffies moved by {ticks}"
    );
}

/// Per-service and global counters follow the traffic.
pub fn counters() {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let id = |b: &Bench, vip: SocketAddr, proto: u8| {
        let k = service_key(vip, proto);
        *b.prog.installed().find(|(key, _, _)| **key == k).unwrap().1
    };
    let serve = fixture::serve_vip(true, TCP);
    let proxy = fixture::proxy_vip(true, TCP);
    let mut fwd = 0;
    let mut replies = 0;
    for i in 0..5u16 {
        let c = fixture::client(true, 41_200 + i);
        let s = Spec::new(TCP, c, serve);
        let out = b.run(Hook::Xdp, &s.build());
        b.run(Hook::Xdp, &s.build()); // established
        fwd += 2;
        let be = parse(&out.pkt).unwrap().dst;
        b.run(Hook::TcEgress, &Spec::new(TCP, be, c).build());
        replies += 1;
        b.run(Hook::TcIngress, &Spec::new(TCP, c, proxy).build());
        fwd += 1;
    }
    let st = b.prog.maps().service_stats(id(&b, serve, TCP).id);
    assert_eq!((st.packets, st.new_flows, st.proxied_flows), (10, 5, 0));
    assert_eq!(st.reply_packets, 5);
    let len = Spec::new(TCP, fixture::client(true, 1), serve)
        .build()
        .len() as u64
        - 14;
    assert_eq!(st.bytes, 10 * len);
    let st = b.prog.maps().service_stats(id(&b, proxy, TCP).id);
    assert_eq!((st.packets, st.new_flows, st.proxied_flows), (5, 5, 5));

    let mut bad = 0;
    for (_, pkt) in malformed::cases() {
        if !tc_test_run_refuses(&pkt) {
            b.run(Hook::TcIngress, &pkt);
            bad += 1;
        }
    }
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    b.run(Hook::Xdp, &arp);
    let g = b.prog.maps().global_stats();
    assert_eq!(g[G_NAT_FORWARD as usize], fwd);
    assert_eq!(g[G_NAT_REPLY as usize], replies);
    assert!(g[G_NOT_IP as usize] >= 1);
    assert!(g[G_MALFORMED as usize] > 0 && g[G_FRAGMENT_OR_OPTIONS as usize] > 0);
    assert!(
        g[G_MALFORMED as usize] + g[G_FRAGMENT_OR_OPTIONS as usize] + g[G_NOT_IP as usize] > bad,
        "every malformed (and the ARP) packet packet is counted: {g:?}"
    );
}

/// A TCP flow that the *server* ended (RST in the reply direction) is dead: a later SYN on
/// the same tuple is a new connection and must follow the current mode.
pub fn syn_after_server_reset_is_a_new_flow() {
    use super::packet::{TCP_ACK, TCP_RST, TCP_SYN};
    let mut b = Bench::new();
    b.apply(&fixture::services());
    for hook in [Hook::Xdp, Hook::TcIngress] {
        for v4 in fixture::FAMILIES {
            let vip = fixture::serve_vip(v4, TCP);
            let key = service_key(vip, TCP);
            let be = fixture::serve_backend(v4, TCP);
            let c = fixture::client(v4, if hook == Hook::Xdp { 41_500 } else { 41_501 });
            let syn = Spec::new(TCP, c, vip).with_flags(TCP_SYN);
            assert_eq!(dst_of(&mut b, hook, &syn), be);
            let synack = Spec::new(TCP, be, c).with_flags(TCP_SYN | TCP_ACK);
            b.run(Hook::TcEgress, &synack.build());
            let ack = syn.clone().with_flags(TCP_ACK);
            assert_eq!(dst_of(&mut b, hook, &ack), be);
            // The server resets the connection (e.g. the pod shuts down) ...
            let rst = Spec::new(TCP, be, c).with_flags(TCP_RST | TCP_ACK);
            b.run(Hook::TcEgress, &rst.build());
            // ... the service scales to zero and flips to Proxy ...
            b.prog.set_mode(&key, MODE_PROXY).unwrap();
            // ... and the client reuses its port for a new connection.
            let mut again = syn.clone();
            again.seq = 0x7777_0000;
            assert_eq!(
                dst_of(&mut b, hook, &again),
                fixture::activator(v4),
                "SYN after a server RST via {hook:?} (v4={v4}) stayed on the old backend"
            );
            b.prog
                .set_mode(&key, redirector_common::MODE_SERVE)
                .unwrap();
        }
    }
}

/// A flow that completed its handshake and then went silent (the pod vanished, the client
/// gave up): a SYN on the same tuple is a new connection, not a retransmission (those only
/// happen before the SYN-ACK), and must follow the current mode.
pub fn syn_after_established_is_a_new_flow() {
    use super::packet::{TCP_ACK, TCP_SYN};
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let vip = fixture::serve_vip(true, TCP);
    let key = service_key(vip, TCP);
    let be = fixture::serve_backend(true, TCP);
    let c = fixture::client(true, 41_502);
    let syn = Spec::new(TCP, c, vip).with_flags(TCP_SYN);
    assert_eq!(dst_of(&mut b, Hook::Xdp, &syn), be);
    // A retransmitted SYN before any reply stays pinned, even across a flip.
    b.prog.set_mode(&key, MODE_PROXY).unwrap();
    assert_eq!(dst_of(&mut b, Hook::Xdp, &syn), be, "SYN retransmission");
    b.prog
        .set_mode(&key, redirector_common::MODE_SERVE)
        .unwrap();
    let synack = Spec::new(TCP, be, c).with_flags(TCP_SYN | TCP_ACK);
    b.run(Hook::TcEgress, &synack.build());
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &syn.clone().with_flags(TCP_ACK)),
        be
    );
    b.prog.set_mode(&key, MODE_PROXY).unwrap();
    let mut again = syn.clone();
    again.seq = 0x7777_0000;
    assert_eq!(
        dst_of(&mut b, Hook::Xdp, &again),
        fixture::activator(true),
        "SYN on an established, silent flow stayed on the old backend"
    );
}

/// The agent's conntrack sweep (batched lookups and deletes) over more entries than one
/// batch holds: every expired entry goes, every live one stays, and entries that vanish
/// between the walk and the delete are skipped.
pub fn conntrack_sweep_in_batches() {
    use redirector::{config::ConntrackConfig, control::monotonic_coarse_ns, datapath::batch};
    use redirector_common::{CtKey, CtValue, PROTO_TCP, PROTO_UDP};

    let mut b = Bench::new();
    let now = monotonic_coarse_ns();
    let key = |i: u32, proto: u8| CtKey {
        saddr: [0x0a00_0000 | i, 0, 0, 0],
        daddr: [0x0a5f_000a, 0, 0, 0],
        sport: (i % 60_000) as u16,
        dport: 80,
        proto,
        family: 4,
        _pad: 0,
    };
    // 9,000 TCP entries (a third of them idle for an hour) and 3,000 UDP entries idle for a
    // minute: more than two batches of 4,096.
    let mut want_live = 0;
    {
        let ct = &mut b.prog.maps_mut().conntrack;
        for i in 0..12_000u32 {
            let (proto, idle) = if i < 9_000 {
                (PROTO_TCP, if i % 3 == 0 { 3_600 } else { 0 })
            } else {
                (PROTO_UDP, 60)
            };
            if idle == 0 {
                want_live += 1;
            }
            let v = CtValue {
                last_seen: now.saturating_sub(idle * 1_000_000_000),
                svc_id: i,
                ..CtValue::default()
            };
            ct.insert(key(i, proto), v, 0).expect("conntrack insert");
        }
    }
    let mut seen = std::collections::HashSet::new();
    batch::for_each(&b.prog.maps().conntrack, |k: &CtKey, v: &CtValue| {
        assert!(seen.insert(v.svc_id), "entry {} seen twice", v.svc_id);
        assert_eq!(k.saddr[0] & 0xffff, v.svc_id & 0xffff);
    })
    .expect("batched walk");
    assert_eq!(seen.len(), 12_000, "the walk saw every entry once");

    // Deleting keys of which some are already gone removes the rest.
    let gone: Vec<CtKey> = (0..10).map(|i| key(i * 3, PROTO_TCP)).collect();
    for k in &gone[..5] {
        b.prog.maps_mut().conntrack.remove(k).expect("remove");
    }
    assert_eq!(
        batch::delete(&mut b.prog.maps_mut().conntrack, &gone).expect("batched delete"),
        5
    );

    let removed = b.prog.gc_conntrack(&ConntrackConfig {
        tcp_timeout: Duration::from_secs(600),
        udp_timeout: Duration::from_secs(30),
        closing_timeout: Duration::from_secs(10),
    });
    assert_eq!(
        removed,
        3_000 - 10 + 3_000,
        "expired TCP and UDP entries removed"
    );
    assert_eq!(b.conntrack_len(), want_live, "live entries kept");
    batch::for_each(&b.prog.maps().conntrack, |k: &CtKey, v: &CtValue| {
        assert_eq!(k.proto, PROTO_TCP);
        assert!(!v.svc_id.is_multiple_of(3), "an expired entry survived");
    })
    .expect("batched walk");
}

/// A conntrack resize switches the links one by one: a flow the old programs opened in the
/// old conntrack (lent as `CONNTRACK_PREV`) keeps its translation when the new programs see
/// its next packet, and a flow the new programs open is also written where the old programs
/// look. Without the loan, the reply of the old flow would leave with the backend's address.
pub fn conntrack_lent_during_resize() {
    let mut old = Bench::new();
    let mut new = Bench::new();
    old.apply(&fixture::services());
    new.apply(&fixture::services());
    let old_ct = {
        use aya::maps::IterableMap as _;
        let id = old
            .prog
            .maps()
            .conntrack
            .map()
            .info()
            .expect("map info")
            .id();
        aya::maps::MapData::from_id(id).expect("opening the old conntrack")
    };
    let vip = fixture::serve_vip(true, TCP);
    let backend = fixture::serve_backend(true, TCP);
    let mut port = 43_000;
    // Replies are translated at egress (see `nat::decide`), whichever hook took the request.
    let reply_hook = Hook::TcEgress;
    for req_hook in [Hook::Xdp, Hook::TcIngress] {
        port += 1;
        let client = fixture::client(true, port);
        let req = Spec::new(TCP, client, vip);
        assert_eq!(dst_of(&mut old, req_hook, &req), backend);
        let reply = Spec::new(TCP, backend, client).with_flags(super::packet::TCP_ACK);
        // Control: without the loan the new programs don't know the flow.
        new.return_conntrack();
        let out = new.run(reply_hook, &reply.build());
        assert!(
            out.pkt == reply.build(),
            "{reply_hook:?}: reply translated without the old conntrack"
        );
        new.dp.lend_conntrack(&old_ct).expect("lending");
        let out = new.run(reply_hook, &reply.build());
        assert_eq!(out.ret, reply_hook.pass());
        let want = reply.clone().with_src(vip).build();
        assert!(
            out.pkt == want,
            "{reply_hook:?}: reply of a flow in the lent conntrack\n{}",
            diff(&out.pkt, &want)
        );
        // The entry moved over (and the flow's forward entry with it, on the first reply).
        let ct = &new.prog.maps().conntrack;
        assert!(ct.get(&ct_key(backend, client, TCP), 0).is_ok());
        assert!(ct.get(&ct_key(client, vip, TCP), 0).is_ok());
        // The next request is the flow's, on the new side too.
        assert_eq!(dst_of(&mut new, Hook::TcIngress, &req), backend);
    }
    // A flow the new programs open during the loan reaches the old conntrack as well.
    let before = old.conntrack_len();
    let client = fixture::client(true, port + 1);
    let req = Spec::new(TCP, client, vip);
    assert_eq!(dst_of(&mut new, Hook::Xdp, &req), backend);
    assert_eq!(old.conntrack_len(), before + 2, "new flow not lent back");
    let reply = Spec::new(TCP, backend, client).with_flags(super::packet::TCP_ACK);
    let out = old.run(Hook::TcEgress, &reply.build());
    assert!(out.pkt == reply.clone().with_src(vip).build());
    // After the loan, new flows stay in the new conntrack only.
    new.return_conntrack();
    let req = Spec::new(TCP, fixture::client(true, port + 2), vip);
    assert_eq!(dst_of(&mut new, Hook::Xdp, &req), backend);
    assert_eq!(old.conntrack_len(), before + 2);
}
