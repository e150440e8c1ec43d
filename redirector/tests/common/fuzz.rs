//! Randomized test: thousands of random packets (random bytes, random truncations of valid
//! packets, random header fields and byte flips) through XDP, tc ingress and tc egress. No
//! packet is ever aborted or dropped, and a packet that is neither VIP traffic nor part of a
//! known flow (per the model parser and the maps, looked up before the run) leaves
//! byte-for-byte unchanged. Packets that do change only change in their addresses, ports and
//! checksums (and MACs on a hairpin redirect), and keep valid checksums if they had them.
use super::{
    ct_key, fixture,
    packet::{diff, parse, rewritable, verify_checksums, Spec, ETH_LEN, TCP, UDP},
    service_key, tc_test_run_refuses, Bench, Hook, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_ABORTED,
    XDP_DROP, XDP_PASS,
};

/// SplitMix64: small, fixed-seed, good enough to pick bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// A random packet that the datapath would translate (VIP traffic or a reply of a flow).
fn valid(rng: &mut Rng, replies: &[Spec]) -> Spec {
    if !replies.is_empty() && rng.chance(1, 3) {
        let mut r = replies[rng.below(replies.len())].clone();
        r.payload = (0..rng.below(64)).map(|_| rng.byte()).collect();
        return r;
    }
    let v4 = rng.chance(1, 2);
    let proto = rng.pick(&[TCP, UDP]);
    let mut client = fixture::client(v4, 1024 + rng.below(60_000) as u16);
    if rng.chance(1, 10) {
        // Hairpin: the client is the service's backend.
        client.set_ip(fixture::serve_backend(v4, proto).ip());
    }
    let dst = match rng.below(5) {
        0 => fixture::serve_vip(v4, proto),
        1 => fixture::proxy_vip(v4, proto),
        2 if proto == TCP => fixture::pool_vip(v4),
        3 if proto == TCP => fixture::multi_vip(v4),
        _ => fixture::serve_vip(v4, proto),
    };
    let mut s = Spec::new(proto, client, dst);
    s.payload = (0..rng.below(80)).map(|_| rng.byte()).collect();
    s.tcp_flags = rng.byte() & 0x3f;
    s.udp_no_csum = rng.chance(1, 8);
    if rng.chance(1, 8) {
        s.pad_to = 60 + rng.below(30);
    }
    s
}

/// Sets a random header field to an interesting or random value.
fn mutate_field(rng: &mut Rng, p: &mut [u8]) {
    let v4 = p.len() > 13 && p[12] == 0x08;
    let l4 = ETH_LEN + if v4 { 20 } else { 40 };
    let vals16 = [0u16, 1, 7, 8, 19, 20, 39, 40, 0xffff, rng.next_u64() as u16];
    let (off, wide) = match rng.below(8) {
        0 => (12, true),                                      // ethertype
        1 => (ETH_LEN, false),                                // version / IHL
        2 => (ETH_LEN + if v4 { 2 } else { 4 }, true),        // IP length
        3 => (ETH_LEN + if v4 { 6 } else { 0 }, true),        // frag / version+class
        4 => (ETH_LEN + if v4 { 9 } else { 6 }, false),       // protocol / next header
        5 => (l4 + 12, false),                                // TCP data offset
        6 => (l4 + 4, true),                                  // UDP length / TCP seq
        _ => (rng.below(p.len().min(l4 + 20).max(1)), false), // anything in the headers
    };
    if wide && off + 2 <= p.len() {
        let v = rng.pick(&vals16);
        p[off..off + 2].copy_from_slice(&v.to_be_bytes());
    } else if off < p.len() {
        p[off] = if rng.chance(1, 2) {
            rng.byte()
        } else {
            rng.pick(&[0x45, 0x46, 0x44, 0x60, 0x50, 0xf0, 6, 17, 0, 44])
        };
    }
}

fn random_packet(rng: &mut Rng, replies: &[Spec]) -> Vec<u8> {
    match rng.below(4) {
        // Random bytes, usually with an IP ethertype and a plausible version.
        0 => {
            let len = 14 + rng.below(120);
            let mut p: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            match rng.below(3) {
                0 => {
                    p[12..14].copy_from_slice(&[0x08, 0x00]);
                    if len > 14 {
                        p[14] = 0x45;
                    }
                }
                1 => {
                    p[12..14].copy_from_slice(&[0x86, 0xdd]);
                    if len > 14 {
                        p[14] = 0x60 | (p[14] & 0x0f);
                    }
                }
                _ => {}
            }
            p
        }
        // A valid packet cut short.
        1 => {
            let mut p = valid(rng, replies).build();
            let n = 14 + rng.below(p.len() - 13);
            p.truncate(n);
            p
        }
        // A valid packet with random header fields.
        2 => {
            let mut p = valid(rng, replies).build();
            for _ in 0..1 + rng.below(3) {
                mutate_field(rng, &mut p);
            }
            p
        }
        // A valid packet.
        _ => valid(rng, replies).build(),
    }
}

/// Whether the maps say the datapath may translate this packet on this hook.
fn may_change(b: &Bench, hook: Hook, pkt: &[u8]) -> bool {
    let Some(v) = parse_any(pkt) else {
        return false;
    };
    let maps = b.prog.maps();
    if maps
        .conntrack
        .get(&ct_key(v.src, v.dst, v.proto), 0)
        .is_ok()
    {
        return true;
    }
    hook != Hook::TcEgress && maps.services.get(&service_key(v.dst, v.proto), 0).is_ok()
}

/// `parse`, also of a BIG TCP packet (IP length 0: the frame's length), which the
/// datapath translates when its flow exists.
fn parse_any(p: &[u8]) -> Option<super::packet::View> {
    parse(p).or_else(|| {
        let mut q = p.to_vec();
        let rest = q.len().checked_sub(14)?;
        match q.get(12..14)? {
            [0x08, 0x00] if q.get(16..18)? == [0, 0] && *q.get(23)? == TCP => {
                q[16..18].copy_from_slice(&u16::try_from(rest).ok()?.to_be_bytes());
            }
            [0x86, 0xdd] if q.get(18..20)? == [0, 0] && *q.get(20)? == TCP => {
                let payload = u16::try_from(rest.checked_sub(40)?).ok()?;
                q[18..20].copy_from_slice(&payload.to_be_bytes());
            }
            _ => return None,
        }
        parse(&q)
    })
}

/// The reply a target would send to a translated packet.
fn reply_of(out: &[u8]) -> Option<Spec> {
    let v = parse(out)?;
    let mut s = Spec::new(v.proto, v.dst, v.src);
    s.tcp_flags = 0x10;
    Some(s)
}

#[derive(Default, Debug)]
struct Tally {
    runs: usize,
    refused: usize,
    changed: usize,
    redirected: usize,
}

pub fn run(packets: usize, seed: u64) {
    run_on(Bench::new(), packets, seed)
}

/// `run` on a given bench (e.g. one whose tc programs use only the checksum helpers).
pub fn run_on(mut b: Bench, packets: usize, seed: u64) {
    b.apply(&fixture::services());
    let mut rng = Rng::new(seed);
    let mut replies: Vec<Spec> = Vec::new();
    let mut t = Tally::default();
    for i in 0..packets {
        let pkt = random_packet(&mut rng, &replies);
        let input_csums_ok = verify_checksums(&pkt).is_ok();
        for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
            if hook.is_tc() && tc_test_run_refuses(&pkt) {
                t.refused += 1;
                continue;
            }
            let allowed = may_change(&b, hook, &pkt);
            let out = b
                .try_run(hook, &pkt, 1)
                .unwrap_or_else(|e| panic!("packet {i} via {hook:?}: {e}\n{pkt:02x?}"));
            t.runs += 1;
            let ctx = || format!("packet {i} via {hook:?} (seed {seed}): {pkt:02x?}");
            if hook == Hook::Xdp {
                assert!(
                    out.ret != XDP_ABORTED && out.ret != XDP_DROP,
                    "aborted/dropped: {}",
                    ctx()
                );
                assert_eq!(out.ret, XDP_PASS, "{}", ctx());
            } else {
                assert_ne!(out.ret, TC_ACT_SHOT, "shot: {}", ctx());
                assert!(
                    out.ret == hook.pass() || (out.ret == TC_ACT_REDIRECT && allowed),
                    "return {}: {}",
                    out.ret,
                    ctx()
                );
                if out.ret == TC_ACT_REDIRECT {
                    t.redirected += 1;
                }
            }
            if out.pkt == pkt {
                continue;
            }
            assert!(
                allowed,
                "non-VIP, unknown-flow packet changed: {}\n{}",
                ctx(),
                diff(&out.pkt, &pkt)
            );
            t.changed += 1;
            // Only addresses, ports and checksums (and swapped MACs on a redirect) change.
            let v = parse_any(&pkt).expect("allowed implies parsed");
            assert_eq!(out.pkt.len(), pkt.len(), "length changed: {}", ctx());
            let mut masked_in = pkt.clone();
            let mut masked_out = out.pkt.clone();
            let mut ranges = rewritable(&v);
            if out.ret == TC_ACT_REDIRECT {
                ranges.push(0..12);
            }
            for r in ranges {
                masked_in[r.clone()].fill(0);
                masked_out[r].fill(0);
            }
            assert!(
                masked_in == masked_out,
                "bytes outside the NAT fields changed: {}\n{}",
                ctx(),
                diff(&out.pkt, &pkt)
            );
            if input_csums_ok {
                verify_checksums(&out.pkt)
                    .unwrap_or_else(|e| panic!("checksum broken: {e}: {}", ctx()));
            }
            if let Some(r) = reply_of(&out.pkt) {
                if replies.len() < 2000 {
                    replies.push(r);
                }
            }
        }
    }
    println!(
        "fuzz: {packets} packets, {} runs, {} refused by test_run (short IP header on tc), \
         {} changed, {} redirected, {} flows in conntrack",
        t.runs,
        t.refused,
        t.changed,
        t.redirected,
        b.conntrack_len() / 2
    );
    assert!(
        t.changed > packets / 10,
        "too few packets exercised the NAT"
    );
}
