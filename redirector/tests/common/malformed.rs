//! Malformed variants of VIP packets that the datapath would otherwise rewrite: each has
//! exactly one defect (the IPv4 header checksum is kept valid) and must pass unchanged.
use super::{
    fixture,
    packet::{checksum, parse, Spec, ETH_LEN, TCP},
};

fn set16(p: &mut [u8], off: usize, v: u16) {
    p[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

/// Recomputes the IPv4 header checksum (header length from IHL, at least 20).
pub fn fix_ip4_csum(p: &mut [u8]) {
    let ihl = ((p[ETH_LEN] & 0x0f) as usize * 4).max(20);
    if p.len() < ETH_LEN + ihl {
        return;
    }
    set16(p, ETH_LEN + 10, 0);
    let c = checksum(&p[ETH_LEN..ETH_LEN + ihl]);
    set16(p, ETH_LEN + 10, c);
}

fn base(v4: bool, proto: u8, port: u16) -> Vec<u8> {
    let p = Spec::new(
        proto,
        fixture::client(v4, port),
        fixture::serve_vip(v4, proto),
    )
    .build();
    assert!(parse(&p).is_some(), "the base packet must be valid");
    p
}

/// (description, frame) pairs.
pub fn cases() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut port = 50_000;
    let mut next = || {
        port += 1;
        port
    };
    for v4 in fixture::FAMILIES {
        let fam = if v4 { "IPv4" } else { "IPv6" };
        let ip_hdr = if v4 { 20 } else { 40 };
        for proto in fixture::PROTOS {
            let l4_hdr = if proto == TCP { 20 } else { 8 };
            let name = |s: &str| format!("{s}, {fam} {}", fixture::proto_name(proto));
            let l4 = ETH_LEN + ip_hdr;
            // Truncated headers: inside the IP header, inside the L4 header.
            for cut in [ETH_LEN + 1, ETH_LEN + ip_hdr - 1, l4 + 4, l4 + l4_hdr - 1] {
                let mut p = base(v4, proto, next());
                p.truncate(cut);
                out.push((name(&format!("truncated to {cut}")), p));
            }
            // Frame shorter than the IP length says.
            let mut p = base(v4, proto, next());
            p.pop();
            out.push((name("frame one byte short of the IP length"), p));
            // IP length too large / too small for the L4 header.
            let mut p = base(v4, proto, next());
            let too_small = (ip_hdr + l4_hdr - 1) as u16;
            if v4 {
                let l = get16(&p, ETH_LEN + 2);
                set16(&mut p, ETH_LEN + 2, l + 1);
                fix_ip4_csum(&mut p);
                out.push((name("IP total length past the frame"), p));
                let mut p = base(v4, proto, next());
                set16(&mut p, ETH_LEN + 2, too_small);
                fix_ip4_csum(&mut p);
                out.push((name("IP total length shorter than L4 header"), p));
            } else {
                let l = get16(&p, ETH_LEN + 4);
                set16(&mut p, ETH_LEN + 4, l + 1);
                out.push((name("IPv6 payload length past the frame"), p));
                let mut p = base(v4, proto, next());
                set16(&mut p, ETH_LEN + 4, too_small - 40);
                out.push((name("IPv6 payload length shorter than L4 header"), p));
            }
            // Bad L4 lengths.
            if proto == TCP {
                for doff in [0u8, 4, 15] {
                    let mut p = base(v4, proto, next());
                    p[l4 + 12] = (doff << 4) | (p[l4 + 12] & 0x0f);
                    out.push((name(&format!("TCP data offset {doff}")), p));
                }
            } else {
                for ulen in [0u16, 7] {
                    let mut p = base(v4, proto, next());
                    set16(&mut p, l4 + 4, ulen);
                    out.push((name(&format!("UDP length {ulen}")), p));
                }
                let mut p = base(v4, proto, next());
                let ulen = get16(&p, l4 + 4);
                set16(&mut p, l4 + 4, ulen + 1);
                out.push((name("UDP length past the IP payload"), p));
            }
            // Wrong IP version for the ethertype.
            let mut p = base(v4, proto, next());
            p[ETH_LEN] = if v4 { 0x65 } else { 0x45 };
            if v4 {
                fix_ip4_csum(&mut p);
            }
            out.push((name("IP version does not match the ethertype"), p));
            if v4 {
                ipv4_specific(&mut out, proto, &mut next);
            } else {
                ipv6_specific(&mut out, proto, &mut next);
            }
        }
    }
    out
}

fn ipv4_specific(out: &mut Vec<(String, Vec<u8>)>, proto: u8, next: &mut impl FnMut() -> u16) {
    let name = |s: &str| format!("{s}, IPv4 {}", fixture::proto_name(proto));
    // IPv4 options (four NOPs, IHL 6) with every length and checksum consistent.
    let mut p = base(true, proto, next());
    p.splice(ETH_LEN + 20..ETH_LEN + 20, [1u8, 1, 1, 1]);
    p[ETH_LEN] = 0x46;
    let l = get16(&p, ETH_LEN + 2);
    set16(&mut p, ETH_LEN + 2, l + 4);
    fix_ip4_csum(&mut p);
    out.push((name("IPv4 options"), p));
    // IHL below 5.
    let mut p = base(true, proto, next());
    p[ETH_LEN] = 0x44;
    fix_ip4_csum(&mut p);
    out.push((name("IHL 4"), p));
    // Fragments: first fragment (MF), a later fragment (offset), the last (offset, no MF).
    for (what, frag) in [
        ("first fragment", 0x2000u16),
        ("middle fragment", 0x2001),
        ("last fragment", 0x00b9),
    ] {
        let mut p = base(true, proto, next());
        set16(&mut p, ETH_LEN + 6, frag);
        fix_ip4_csum(&mut p);
        out.push((name(what), p));
    }
}

fn ipv6_specific(out: &mut Vec<(String, Vec<u8>)>, proto: u8, next: &mut impl FnMut() -> u16) {
    let name = |s: &str| format!("{s}, IPv6 {}", fixture::proto_name(proto));
    // Extension headers before the L4 header: hop-by-hop (0), fragment (44).
    for (what, nh, ext) in [
        ("hop-by-hop header", 0u8, [proto, 0, 1, 4, 0, 0, 0, 0]),
        ("fragment header", 44, [proto, 0, 0, 0, 0, 0, 0, 7]),
    ] {
        let mut p = base(false, proto, next());
        p.splice(ETH_LEN + 40..ETH_LEN + 40, ext);
        p[ETH_LEN + 6] = nh;
        let l = get16(&p, ETH_LEN + 4);
        set16(&mut p, ETH_LEN + 4, l + 8);
        out.push((name(what), p));
    }
}
