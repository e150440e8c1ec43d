//! TCP flow state on the datapath, as a real conntrack keeps it: a half-closed flow keeps
//! its target until both sides have sent FIN, a SYN nobody answered expires after a minute,
//! a RST closes both entries, a flow that lost one of its two entries gets it back, and BIG
//! TCP packets (IP length 0) are translated. Time is simulated by moving an entry's
//! `last_seen` / `seen_jiffies` back.
use std::net::SocketAddr;

use redirector_common::{
    ct_time, CtKey, CtValue, DatapathConfig, CONFIG_KEY, CT_CLOSING, CT_FIN, CT_REFRESH_JIFFIES,
    CT_REPLY, CT_SEEN_REPLY, G_BIG_TCP, MODE_PROXY, MODE_SERVE,
};

use super::{
    ct_key, fixture,
    malformed::fix_ip4_csum,
    packet::{diff, parse, Spec, ETH_LEN, TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    service_key, Bench, Hook,
};

const SECOND: u64 = 1_000_000_000;

fn bench() -> Bench {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let cfg = DatapathConfig {
        tcp_timeout_ns: 3_600 * SECOND,
        udp_timeout_ns: 60 * SECOND,
        closing_timeout_ns: SECOND,
    };
    b.prog.maps_mut().config.set(CONFIG_KEY, cfg, 0).unwrap();
    b
}

fn dst_of(b: &mut Bench, hook: Hook, s: &Spec) -> SocketAddr {
    let out = b.run(hook, &s.build());
    assert_eq!(out.ret, hook.pass());
    parse(&out.pkt).expect("output parses").dst
}

fn src_of(b: &mut Bench, hook: Hook, s: &Spec) -> SocketAddr {
    let out = b.run(hook, &s.build());
    assert_eq!(out.ret, hook.pass());
    parse(&out.pkt).expect("output parses").src
}

fn entry(b: &Bench, k: &CtKey) -> Option<CtValue> {
    b.prog.maps().conntrack.get(k, 0).ok()
}

/// Makes entry `k` look idle for `ns` (0: only due for its periodic refresh).
fn age(b: &mut Bench, k: &CtKey, ns: u64) {
    let mut v = entry(b, k).expect("entry to age");
    v.last_seen = ct_time(v.last_seen) - ns;
    v.seen_jiffies = v.seen_jiffies.wrapping_sub(10 * CT_REFRESH_JIFFIES);
    b.prog.maps_mut().conntrack.insert(k, v, 0).unwrap();
}

/// One TCP flow of the fixture's Serve service: client → VIP, answered by the backend.
struct Flow {
    c: SocketAddr,
    vip: SocketAddr,
    be: SocketAddr,
}

impl Flow {
    fn new(v4: bool, port: u16) -> Self {
        Flow {
            c: fixture::client(v4, port),
            vip: fixture::serve_vip(v4, TCP),
            be: fixture::serve_backend(v4, TCP),
        }
    }
    fn fwd(&self, flags: u8) -> Spec {
        Spec::new(TCP, self.c, self.vip).with_flags(flags)
    }
    fn reply(&self, flags: u8) -> Spec {
        Spec::new(TCP, self.be, self.c).with_flags(flags)
    }
    fn fwd_key(&self) -> CtKey {
        ct_key(self.c, self.vip, TCP)
    }
    fn reply_key(&self) -> CtKey {
        ct_key(self.be, self.c, TCP)
    }
    /// SYN, SYN-ACK, ACK.
    fn open(&self, b: &mut Bench) {
        assert_eq!(dst_of(b, Hook::TcIngress, &self.fwd(TCP_SYN)), self.be);
        let synack = self.reply(TCP_SYN | TCP_ACK);
        assert_eq!(src_of(b, Hook::TcEgress, &synack), self.vip);
        assert_eq!(dst_of(b, Hook::TcIngress, &self.fwd(TCP_ACK)), self.be);
    }
    fn flip(&self, b: &mut Bench, mode: u8) {
        b.prog.set_mode(&service_key(self.vip, TCP), mode).unwrap();
    }
}

/// The client closes its side (FIN) and the server keeps sending for longer than the
/// closing timeout: both directions keep their translation. Only once the server has sent
/// FIN too is the flow closing (both entries); a straggler ACK after that keeps the
/// target, a bare SYN starts a new connection.
pub fn half_close() {
    let mut b = bench();
    for (v4, port) in [(true, 42_600), (false, 42_601)] {
        let f = Flow::new(v4, port);
        f.open(&mut b);
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_FIN | TCP_ACK)),
            f.be
        );
        f.flip(&mut b, MODE_PROXY);
        for k in [f.fwd_key(), f.reply_key()] {
            assert_eq!(
                entry(&b, &k).unwrap().flags & CT_CLOSING,
                0,
                "one FIN: not closing"
            );
            age(&mut b, &k, 5 * SECOND);
        }
        let data = f.reply(TCP_ACK | TCP_PSH);
        assert_eq!(
            src_of(&mut b, Hook::TcEgress, &data),
            f.vip,
            "half-closed: reply"
        );
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_ACK)),
            f.be,
            "half-closed flow past the closing timeout: the client's ACK changed target"
        );
        // The server closes too: closing, both entries.
        let fin = f.reply(TCP_FIN | TCP_ACK);
        assert_eq!(src_of(&mut b, Hook::TcEgress, &fin), f.vip);
        for k in [f.fwd_key(), f.reply_key()] {
            let v = entry(&b, &k).unwrap();
            assert_ne!(
                v.flags & CT_CLOSING,
                0,
                "both FINs: closing ({:#x})",
                v.flags
            );
            age(&mut b, &k, 5 * SECOND);
        }
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_ACK)),
            f.be,
            "the last ACK after the closing timeout changed target"
        );
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_SYN)),
            fixture::activator(v4),
            "a new connection on the tuple follows the mode"
        );
        // A late retransmission of the old backend's FIN leaves the new connection alone.
        src_of(&mut b, Hook::TcEgress, &f.reply(TCP_FIN | TCP_ACK));
        let v = entry(&b, &f.fwd_key()).unwrap();
        assert_eq!(
            v.flags & (CT_CLOSING | CT_SEEN_REPLY | CT_FIN),
            0,
            "the old flow's reply entry marked the new connection ({:#x})",
            v.flags
        );
        f.flip(&mut b, MODE_SERVE);
    }
}

/// A SYN nobody answers keeps its target for about a minute (its retransmissions stay
/// pinned), not for the established timeout; an answered flow idle as long keeps it.
pub fn syn_only_expires() {
    let mut b = bench();
    for (v4, port) in [(true, 42_610), (false, 42_612)] {
        let lone = Flow::new(v4, port);
        let answered = Flow::new(v4, port + 1);
        assert_eq!(dst_of(&mut b, Hook::TcIngress, &lone.fwd(TCP_SYN)), lone.be);
        answered.open(&mut b);
        lone.flip(&mut b, MODE_PROXY);
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &lone.fwd(TCP_SYN)),
            lone.be,
            "SYN retransmission stays pinned"
        );
        age(&mut b, &lone.fwd_key(), 30 * SECOND);
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &lone.fwd(TCP_SYN)),
            lone.be,
            "SYN-only flow idle 30 s"
        );
        age(&mut b, &lone.fwd_key(), 61 * SECOND);
        age(&mut b, &answered.fwd_key(), 61 * SECOND);
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &lone.fwd(TCP_SYN)),
            fixture::activator(v4),
            "SYN-only flow idle 61 s: expired"
        );
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &answered.fwd(TCP_ACK)),
            answered.be,
            "answered flow idle 61 s: kept"
        );
        lone.flip(&mut b, MODE_SERVE);
    }
}

/// A RST, from either side, marks both entries closing.
pub fn rst_closes_both() {
    let mut b = bench();
    let mut port = 42_620;
    for v4 in fixture::FAMILIES {
        for from_client in [true, false] {
            port += 1;
            let f = Flow::new(v4, port);
            f.open(&mut b);
            if from_client {
                dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_RST | TCP_ACK));
            } else {
                src_of(&mut b, Hook::TcEgress, &f.reply(TCP_RST | TCP_ACK));
            }
            for k in [f.fwd_key(), f.reply_key()] {
                let v = entry(&b, &k).unwrap();
                assert_ne!(
                    v.flags & CT_CLOSING,
                    0,
                    "RST from client={from_client}, v4={v4}: entry {:#x} not closing",
                    v.flags
                );
            }
        }
    }
}

/// A flow whose reply entry was evicted gets it back at its forward entry's next refresh
/// (its replies are translated again); one whose forward entry was evicted gets it back
/// at its reply entry's, and keeps its target across a flip.
pub fn lost_entry_repaired() {
    let mut b = bench();
    for (v4, port) in [(true, 42_630), (false, 42_632)] {
        let f = Flow::new(v4, port);
        f.open(&mut b);
        b.prog.maps_mut().conntrack.remove(&f.reply_key()).unwrap();
        age(&mut b, &f.fwd_key(), 0);
        assert_eq!(dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_ACK)), f.be);
        let v = entry(&b, &f.reply_key()).expect("reply entry put back");
        assert_eq!(v.flags & (CT_REPLY | CT_FIN), CT_REPLY);
        let data = f.reply(TCP_ACK | TCP_PSH);
        assert_eq!(
            src_of(&mut b, Hook::TcEgress, &data),
            f.vip,
            "reply translated"
        );

        let f = Flow::new(v4, port + 1);
        f.open(&mut b);
        b.prog.maps_mut().conntrack.remove(&f.fwd_key()).unwrap();
        age(&mut b, &f.reply_key(), 0);
        let data = f.reply(TCP_ACK | TCP_PSH);
        assert_eq!(src_of(&mut b, Hook::TcEgress, &data), f.vip);
        let v = entry(&b, &f.fwd_key()).expect("forward entry put back");
        assert_eq!(v.flags & CT_REPLY, 0);
        f.flip(&mut b, MODE_PROXY);
        assert_eq!(
            dst_of(&mut b, Hook::TcIngress, &f.fwd(TCP_ACK)),
            f.be,
            "flow with a repaired forward entry changed target"
        );
        f.flip(&mut b, MODE_SERVE);
    }
}

/// `pkt` as a BIG TCP packet: IPv4 total length 0, or IPv6 payload length 0 with (`jumbo`)
/// or without a hop-by-hop jumbo option.
fn big(mut pkt: Vec<u8>, jumbo: bool) -> Vec<u8> {
    if pkt[12..14] == [0x08, 0x00] {
        pkt[ETH_LEN + 2..ETH_LEN + 4].fill(0);
        fix_ip4_csum(&mut pkt);
    } else {
        let payload = u16::from_be_bytes([pkt[ETH_LEN + 4], pkt[ETH_LEN + 5]]) as u32;
        pkt[ETH_LEN + 4..ETH_LEN + 6].fill(0);
        if jumbo {
            let mut hbh = vec![pkt[ETH_LEN + 6], 0, 0xc2, 4];
            hbh.extend_from_slice(&(payload + 8).to_be_bytes());
            pkt.splice(ETH_LEN + 40..ETH_LEN + 40, hbh);
            pkt[ETH_LEN + 6] = 0;
        }
    }
    pkt
}

/// BIG TCP packets of an established flow are translated both ways (their length fields
/// left as they are); one to a VIP without a flow passes and starts none. All are counted.
pub fn big_tcp() {
    let mut b = bench();
    let mut port = 42_640;
    let mut bigs = 0;
    for v4 in fixture::FAMILIES {
        for jumbo in if v4 { vec![false] } else { vec![false, true] } {
            for hook in [Hook::Xdp, Hook::TcIngress] {
                port += 1;
                let what = format!("BIG TCP v4={v4} jumbo={jumbo} via {hook:?}");
                let f = Flow::new(v4, port);
                assert_eq!(dst_of(&mut b, hook, &f.fwd(TCP_SYN)), f.be);
                let mut data = f.fwd(TCP_ACK | TCP_PSH);
                data.payload = (0..3000u32).map(|i| (i * 13) as u8).collect();
                let cases = [
                    (hook, data.clone(), data.clone().with_dst(f.be)),
                    (
                        Hook::TcEgress,
                        f.reply(TCP_ACK),
                        f.reply(TCP_ACK).with_src(f.vip),
                    ),
                ];
                for (h, input, want) in cases {
                    let out = b.run(h, &big(input.build(), jumbo));
                    bigs += 1;
                    assert_eq!(out.ret, h.pass(), "{what}");
                    let want = big(want.build(), jumbo);
                    assert!(out.pkt == want, "{what}, {h:?}\n{}", diff(&out.pkt, &want));
                }
            }
            // No flow: passes, starts none.
            port += 1;
            let f = Flow::new(v4, port);
            let pkt = big(f.fwd(TCP_ACK).build(), jumbo);
            let before = b.conntrack_len();
            let out = b.run(Hook::TcIngress, &pkt);
            bigs += 1;
            assert!(out.pkt == pkt, "BIG TCP without a flow changed");
            assert_eq!(b.conntrack_len(), before, "BIG TCP started a flow");
        }
    }
    let g = b.prog.maps().global_stats();
    assert_eq!(g[G_BIG_TCP as usize], bigs);
}
