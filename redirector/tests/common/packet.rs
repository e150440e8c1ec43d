//! A small, independent packet builder and checker for BPF_PROG_TEST_RUN tests: Ethernet +
//! IPv4/IPv6 + TCP/UDP with checksums computed from scratch (RFC 1071), and a parser that
//! models which packets the datapath may rewrite. Nothing here reuses the eBPF code.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const ETH_LEN: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// Everything a test packet is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ttl: u8,
    pub ip_id: u16,
    pub payload: Vec<u8>,
    /// IPv4 UDP: send without a checksum (field 0).
    pub udp_no_csum: bool,
    /// Pad the Ethernet frame with zeros up to this length (Ethernet minimum is 60).
    pub pad_to: usize,
    /// TCP options (padded to a multiple of 4 bytes; data offset follows).
    pub tcp_options: Vec<u8>,
}

impl Spec {
    pub fn new(proto: u8, src: SocketAddr, dst: SocketAddr) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed families");
        Self {
            eth_dst: MAC_A,
            eth_src: MAC_B,
            src,
            dst,
            proto,
            tcp_flags: if proto == TCP { TCP_SYN } else { 0 },
            seq: 0x0102_0304,
            ttl: 64,
            ip_id: 0x1234,
            payload: b"hello, redirector".to_vec(),
            udp_no_csum: false,
            pad_to: 0,
            tcp_options: Vec::new(),
        }
    }

    pub fn tcp(src: &str, dst: &str) -> Self {
        Self::new(TCP, sa(src), sa(dst))
    }

    pub fn udp(src: &str, dst: &str) -> Self {
        Self::new(UDP, sa(src), sa(dst))
    }

    pub fn with_src(mut self, src: SocketAddr) -> Self {
        self.src = src;
        self
    }

    pub fn with_dst(mut self, dst: SocketAddr) -> Self {
        self.dst = dst;
        self
    }

    pub fn with_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    pub fn swap_macs(mut self) -> Self {
        std::mem::swap(&mut self.eth_dst, &mut self.eth_src);
        self
    }

    /// The reply to this packet: addresses, ports and MACs swapped.
    pub fn reply(&self) -> Self {
        let mut r = self.clone();
        r.src = self.dst;
        r.dst = self.src;
        r = r.swap_macs();
        if r.proto == TCP {
            r.tcp_flags = TCP_SYN | TCP_ACK;
        }
        r.payload = b"reply".to_vec();
        r
    }

    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// The L4 segment with a correct checksum (or 0 for IPv4 UDP without one).
    pub fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src.port().to_be_bytes());
        l4.extend_from_slice(&self.dst.port().to_be_bytes());
        let csum_at = if self.proto == TCP {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
            let mut opts = self.tcp_options.clone();
            opts.resize(opts.len().div_ceil(4) * 4, 0);
            l4.push((5 + opts.len() as u8 / 4) << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0]); // checksum
            l4.extend_from_slice(&[0, 0]); // urgent
            l4.extend_from_slice(&opts);
            16
        } else {
            let len = (8 + self.payload.len()) as u16;
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        if !(self.proto == UDP && self.udp_no_csum && self.is_v4()) {
            let mut c = l4_checksum(self.src.ip(), self.dst.ip(), self.proto, &l4);
            if self.proto == UDP && c == 0 {
                c = 0xffff;
            }
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut p = Vec::with_capacity(ETH_LEN + 40 + l4.len());
        p.extend_from_slice(&self.eth_dst);
        p.extend_from_slice(&self.eth_src);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = self.ttl;
                ip[9] = self.proto;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let c = checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                p.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&0x86ddu16.to_be_bytes());
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p.push(self.proto);
                p.push(self.ttl);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            _ => unreachable!(),
        }
        p.extend_from_slice(&l4);
        if p.len() < self.pad_to {
            p.resize(self.pad_to, 0);
        }
        p
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// ---- checksums, from scratch ------------------------------------------------------------

/// One's-complement sum of big-endian 16-bit words (odd tail padded with zero), unfolded.
pub fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (with its checksum field zeroed by the caller).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum_words(&s.octets(), acc);
            acc = sum_words(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum_words(&s.octets(), acc);
            acc = sum_words(&d.octets(), acc);
        }
        _ => panic!("mixed families"),
    }
    acc + proto as u64 + len as u64
}

/// Checksum of an L4 segment (its checksum field zeroed) under the pseudo header.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> u16 {
    !fold(sum_words(seg, pseudo_sum(src, dst, proto, seg.len())))
}

// ---- parsing --------------------------------------------------------------------------

/// What the datapath sees in a packet it may rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub l4_off: usize,
    /// IP header + payload, from the IP length field(s).
    pub ip_len: usize,
    pub tcp_flags: u8,
}

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

/// The model of the datapath's parser: returns the tuple of a packet it would translate, or
/// `None` for one it must pass unchanged (not IPv4/IPv6 + TCP/UDP, IPv4 options, fragments,
/// IPv6 extension headers, truncated headers, bad lengths, TCP data offset < 5, UDP
/// length < 8).
pub fn parse(p: &[u8]) -> Option<View> {
    if p.len() < ETH_LEN {
        return None;
    }
    let (src, dst, proto, l4_off, ip_len);
    match be16(p, 12) {
        0x0800 => {
            let ip = p.get(ETH_LEN..ETH_LEN + 20)?;
            if ip[0] != 0x45 {
                return None;
            }
            if be16(ip, 6) & 0x3fff != 0 {
                return None;
            }
            ip_len = be16(ip, 2) as usize;
            proto = ip[9];
            src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            l4_off = ETH_LEN + 20;
        }
        0x86dd => {
            let ip = p.get(ETH_LEN..ETH_LEN + 40)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            ip_len = 40 + be16(ip, 4) as usize;
            proto = ip[6];
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            src = IpAddr::V6(Ipv6Addr::from(s));
            dst = IpAddr::V6(Ipv6Addr::from(d));
            l4_off = ETH_LEN + 40;
        }
        _ => return None,
    }
    let (l4_min, tcp_flags) = match proto {
        TCP => {
            let h = p.get(l4_off..l4_off + 20)?;
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 {
                return None;
            }
            (doff, h[13])
        }
        UDP => {
            let h = p.get(l4_off..l4_off + 8)?;
            let ulen = be16(h, 4) as usize;
            if ulen < 8 {
                return None;
            }
            (ulen, 0)
        }
        _ => return None,
    };
    if ip_len < (l4_off - ETH_LEN) + l4_min || ETH_LEN + ip_len > p.len() {
        return None;
    }
    let sport = be16(p, l4_off);
    let dport = be16(p, l4_off + 2);
    Some(View {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        proto,
        l4_off,
        ip_len,
        tcp_flags,
    })
}

/// Offset of the L4 checksum field.
pub fn l4_csum_off(v: &View) -> usize {
    v.l4_off + if v.proto == TCP { 16 } else { 6 }
}

/// Verifies, from scratch, the IPv4 header checksum and the L4 checksum of a packet the
/// model parses (IPv4 UDP may carry no checksum). The L4 segment is the IP payload.
pub fn verify_checksums(p: &[u8]) -> Result<(), String> {
    let v = parse(p).ok_or("packet does not parse")?;
    if v.src.is_ipv4() {
        let hdr = &p[ETH_LEN..ETH_LEN + 20];
        let s = fold(sum_words(hdr, 0));
        if s != 0xffff {
            return Err(format!("bad IPv4 header checksum (sum {s:#06x})"));
        }
    }
    let seg = &p[v.l4_off..ETH_LEN + v.ip_len];
    let field = be16(p, l4_csum_off(&v));
    if v.proto == UDP && field == 0 {
        return if v.src.is_ipv4() {
            Ok(())
        } else {
            Err("IPv6 UDP without checksum".into())
        };
    }
    let s = fold(sum_words(
        seg,
        pseudo_sum(v.src.ip(), v.dst.ip(), v.proto, seg.len()),
    ));
    if s != 0xffff {
        return Err(format!(
            "bad L4 checksum (sum {s:#06x}, field {field:#06x})"
        ));
    }
    Ok(())
}

/// Byte ranges the datapath may change when it translates a parsed packet: the addresses,
/// the ports and the checksums.
pub fn rewritable(v: &View) -> Vec<std::ops::Range<usize>> {
    let mut r = Vec::new();
    if v.src.is_ipv4() {
        r.push(ETH_LEN + 10..ETH_LEN + 20);
    } else {
        r.push(ETH_LEN + 8..ETH_LEN + 40);
    }
    r.push(v.l4_off..v.l4_off + 4);
    let c = l4_csum_off(v);
    r.push(c..c + 2);
    r
}

/// Hex dump of the differing bytes of two packets, for assertion messages.
pub fn diff(got: &[u8], want: &[u8]) -> String {
    let mut out = format!("len got {} want {}\n", got.len(), want.len());
    for i in 0..got.len().max(want.len()) {
        let (g, w) = (got.get(i), want.get(i));
        if g != w {
            out += &format!("  @{i}: got {g:02x?} want {w:02x?}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's example: the sum of 0001 f203 f4f5 f6f7 is ddf2.
    #[test]
    fn rfc1071_example() {
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&d, 0)), 0xddf2);
    }
}
