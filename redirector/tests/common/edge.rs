//! Edge cases of the rewrite itself: real-world TCP SYNs (options, large payloads) and UDP
//! checksums whose rewritten value computes to zero (must be sent as 0xffff).
use super::{
    fixture,
    packet::{diff, l4_checksum, verify_checksums, Spec, TCP, UDP},
    Bench, Hook,
};

const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::TcIngress];

#[track_caller]
fn expect(b: &mut Bench, hook: Hook, input: &Spec, want: &Spec, what: &str) {
    let out = b.run(hook, &input.build());
    assert_eq!(out.ret, hook.pass(), "{what} via {hook:?}");
    let want = want.build();
    assert!(
        out.pkt == want,
        "{what} via {hook:?}\n{}",
        diff(&out.pkt, &want)
    );
    verify_checksums(&out.pkt).unwrap_or_else(|e| panic!("{what} via {hook:?}: {e}"));
}

/// A SYN with MSS, SACK-permitted, timestamps and window scale, a 1400-byte payload, and
/// its reply with options too.
pub fn tcp_options_and_large_payload() {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let opts = vec![
        2, 4, 0x05, 0xb4, // MSS 1460
        4, 2, // SACK permitted
        8, 10, 1, 2, 3, 4, 0, 0, 0, 0, // timestamps
        1, // NOP
        3, 3, 7, // window scale 7
    ];
    let mut port = 41_300;
    for hook in HOOKS {
        for v4 in fixture::FAMILIES {
            port += 1;
            let vip = fixture::serve_vip(v4, TCP);
            let be = fixture::serve_backend(v4, TCP);
            let c = fixture::client(v4, port);
            let mut syn = Spec::new(TCP, c, vip);
            syn.tcp_options = opts.clone();
            syn.payload = (0..1400u32).map(|i| (i * 7 + 3) as u8).collect();
            expect(
                &mut b,
                hook,
                &syn,
                &syn.clone().with_dst(be),
                "SYN with options",
            );
            let mut reply = Spec::new(TCP, be, c);
            reply.tcp_options = opts.clone();
            // Replies are translated at egress (see `nat::decide`).
            expect(
                &mut b,
                Hook::TcEgress,
                &reply,
                &reply.clone().with_src(vip),
                "SYN-ACK with options",
            );
        }
    }
}

/// Sets the last two payload bytes of `s` so that its UDP checksum, computed from scratch,
/// is 0 (so it must be sent as 0xffff).
fn force_zero_checksum(s: &mut Spec) {
    let n = s.payload.len();
    assert!(n >= 2 && n.is_multiple_of(2));
    s.payload[n - 2..].copy_from_slice(&[0, 0]);
    let mut seg = s.l4();
    seg[6..8].copy_from_slice(&[0, 0]);
    let folded = !l4_checksum(s.src.ip(), s.dst.ip(), UDP, &seg);
    let w = 0xffff - folded;
    s.payload[n - 2..].copy_from_slice(&w.to_be_bytes());
    let mut seg = s.l4();
    seg[6..8].copy_from_slice(&[0, 0]);
    assert_eq!(l4_checksum(s.src.ip(), s.dst.ip(), UDP, &seg), 0);
}

/// Forward and reply packets whose rewritten UDP checksum computes to zero: every hook must
/// send 0xffff (a 0 would mean "no checksum" on IPv4 and is invalid on IPv6).
pub fn udp_checksum_that_becomes_zero() {
    let mut b = Bench::new();
    b.apply(&fixture::services());
    let mut port = 41_400;
    for hook in HOOKS {
        for v4 in fixture::FAMILIES {
            port += 1;
            let vip = fixture::serve_vip(v4, UDP);
            let be = fixture::serve_backend(v4, UDP);
            let c = fixture::client(v4, port);
            let mut want = Spec::new(UDP, c, be);
            want.payload = b"abcdefgh--".to_vec();
            force_zero_checksum(&mut want);
            let input = want.clone().with_dst(vip);
            let built = want.build();
            assert_eq!(
                &built[built.len() - want.payload.len() - 2..][..2],
                &[0xff, 0xff]
            );
            expect(
                &mut b,
                hook,
                &input,
                &want,
                "UDP checksum rewritten to zero",
            );

            let mut want = Spec::new(UDP, vip, c);
            want.payload = b"reply-....".to_vec();
            force_zero_checksum(&mut want);
            let input = want.clone().with_src(be);
            expect(
                &mut b,
                Hook::TcEgress,
                &input,
                &want,
                "UDP reply checksum rewritten to zero",
            );
        }
    }
}
