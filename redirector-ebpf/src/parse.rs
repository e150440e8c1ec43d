//! Header parsing shared by the XDP and tc programs: Ethernet → IPv4/IPv6 → TCP/UDP, with
//! every access bounds-checked. Anything the datapath does not rewrite (non-IP, fragments,
//! IPv4 options, IPv6 extension headers, bad lengths) is reported so the caller passes it
//! unchanged.
use core::mem::size_of;

use redirector_common::{
    CtKey, FAMILY_V4, FAMILY_V6, G_FRAGMENT_OR_OPTIONS, G_MALFORMED, G_NOT_IP, PROTO_TCP, PROTO_UDP,
};

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// A hop-by-hop header holding only the jumbo payload option (RFC 2675).
pub const HBH_JUMBO_LEN: usize = 8;
const NEXTHDR_HOP: u8 = 0;
const IPV6_TLV_JUMBO: u8 = 0xc2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed packet: where its headers are and the tuple it carries.
pub struct Parsed {
    pub key: CtKey,
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// Bytes of the IP packet (header + payload), for counters.
    pub ip_len: u32,
    /// A BIG TCP packet (over 64 KiB, so its IP length field is 0): its length is the
    /// frame's (or the jumbo option's).
    pub big: bool,
}

impl Parsed {
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.key.family == FAMILY_V4
    }
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.key.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// Returns a pointer to a `T` at `offset`, or `None` if it does not fit in the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data.checked_add(offset)?;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// Writes `v` at `offset`, or `None` if it does not fit in the packet.
#[inline(always)]
pub fn store<T>(data: usize, data_end: usize, offset: usize, v: T) -> Option<()> {
    let p = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: bounds checked above; packet data may be unaligned.
    unsafe { core::ptr::write_unaligned(p, v) };
    Some(())
}

#[inline(always)]
pub fn load<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: bounds checked above; packet data may be unaligned.
    Some(unsafe { core::ptr::read_unaligned(p) })
}

/// Marks the branch it is called on as rarely taken: the compiler lays such blocks out
/// after the function's hot path, so the instructions an established flow's packet runs
/// stay on few cache lines (between two packets the rest of the network stack evicts them
/// from L1).
#[inline(always)]
pub fn cold() {
    core::hint::cold_path();
}

/// Reads a `T` at `base + off` without a bounds check: `base` must come from a `ptr_at`
/// covering the read.
#[inline(always)]
fn rd<T: Copy>(base: usize, off: usize) -> T {
    // SAFETY: the caller's ptr_at established that [base, base + size) is in the packet.
    unsafe { core::ptr::read_unaligned((base + off) as *const T) }
}

/// Why a packet was not parsed (the counter to bump).
pub type Skip = u32;

/// Parses Ethernet + IP + L4 ports. `Err(counter)` means: pass unchanged. `frame_len` is
/// the whole frame's length (an skb's data may extend past its linear part).
///
/// BIG TCP: a GSO or GRO packet longer than 64 KiB has an IPv4 total length of 0, or an
/// IPv6 payload length of 0, either with a hop-by-hop header holding only the jumbo option
/// (RFC 2675; kernels before 6.x put it in) or without one. Its length is then the frame's
/// (the jumbo option's when there is one). The stack drops such a header on any other
/// packet, so taking it at its word is harmless.
///
/// All bounds checks of header reads come first and length validation last, so that the
/// compiler cannot fold a packet-bounds check into a length comparison the verifier does not
/// track.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, frame_len: usize) -> Result<Parsed, Skip> {
    let eth = ptr_at::<[u8; ETH_LEN]>(data, data_end, 0).ok_or(G_MALFORMED)? as usize;
    let ethertype = u16::from_be(rd::<u16>(eth, 12));
    let mut key = CtKey::default();
    let l4_off;
    let ip_len;
    let mut big = false;
    match ethertype {
        0x0800 => {
            let ip = ptr_at::<[u8; IPV4_LEN]>(data, data_end, ETH_LEN).ok_or(G_MALFORMED)? as usize;
            let vihl: u8 = rd(ip, 0);
            if vihl >> 4 != 4 {
                return Err(G_MALFORMED);
            }
            if vihl & 0x0f != 5 {
                return Err(G_FRAGMENT_OR_OPTIONS);
            }
            if u16::from_be(rd::<u16>(ip, 6)) & 0x3fff != 0 {
                return Err(G_FRAGMENT_OR_OPTIONS);
            }
            ip_len = match u16::from_be(rd::<u16>(ip, 2)) {
                0 => {
                    cold();
                    big = true;
                    frame_len - ETH_LEN
                }
                n => n as usize,
            };
            key.proto = rd(ip, 9);
            key.saddr[0] = rd(ip, 12);
            key.daddr[0] = rd(ip, 16);
            key.family = FAMILY_V4;
            l4_off = ETH_LEN + IPV4_LEN;
        }
        0x86dd => {
            let ip = ptr_at::<[u8; IPV6_LEN]>(data, data_end, ETH_LEN).ok_or(G_MALFORMED)? as usize;
            let v: u8 = rd(ip, 0);
            if v >> 4 != 6 {
                return Err(G_MALFORMED);
            }
            let payload = u16::from_be(rd::<u16>(ip, 4)) as usize;
            key.proto = rd(ip, 6);
            key.saddr = rd(ip, 8);
            key.daddr = rd(ip, 24);
            key.family = FAMILY_V6;
            if payload != 0 {
                ip_len = IPV6_LEN + payload;
                l4_off = ETH_LEN + IPV6_LEN;
            } else if key.proto == NEXTHDR_HOP {
                cold();
                big = true;
                // Next header, length 0 (8 bytes), the jumbo option: type, length 4, value.
                let hbh = ptr_at::<[u8; 8]>(data, data_end, ETH_LEN + IPV6_LEN)
                    .ok_or(G_MALFORMED)? as usize;
                if rd::<[u8; 3]>(hbh, 1) != [0, IPV6_TLV_JUMBO, 4] {
                    return Err(G_FRAGMENT_OR_OPTIONS);
                }
                key.proto = rd(hbh, 0);
                ip_len = IPV6_LEN + u32::from_be(rd::<u32>(hbh, 4)) as usize;
                l4_off = ETH_LEN + IPV6_LEN + HBH_JUMBO_LEN;
            } else {
                cold();
                big = true;
                ip_len = frame_len - ETH_LEN;
                l4_off = ETH_LEN + IPV6_LEN;
            }
        }
        _ => return Err(G_NOT_IP),
    }
    let mut tcp_flags = 0;
    let l4_min;
    match key.proto {
        PROTO_TCP => {
            let l4 = ptr_at::<[u8; TCP_LEN]>(data, data_end, l4_off).ok_or(G_MALFORMED)? as usize;
            key.sport = rd(l4, 0);
            key.dport = rd(l4, 2);
            let doff = ((rd::<u8>(l4, 12) >> 4) as usize) * 4;
            tcp_flags = rd(l4, 13);
            if doff < TCP_LEN {
                return Err(G_MALFORMED);
            }
            l4_min = doff;
        }
        PROTO_UDP => {
            let l4 = ptr_at::<[u8; UDP_LEN]>(data, data_end, l4_off).ok_or(G_MALFORMED)? as usize;
            key.sport = rd(l4, 0);
            key.dport = rd(l4, 2);
            let ulen = u16::from_be(rd::<u16>(l4, 4)) as usize;
            if ulen < UDP_LEN {
                return Err(G_MALFORMED);
            }
            l4_min = ulen;
        }
        _ => return Err(G_NOT_IP),
    }
    // Lengths last: the IP length must cover the L4 header (or UDP length) and fit in the
    // frame (Ethernet padding may follow it).
    let hdr = l4_off - ETH_LEN;
    if ip_len < hdr + l4_min || ETH_LEN + ip_len > frame_len || (big && key.proto != PROTO_TCP) {
        return Err(G_MALFORMED);
    }
    Ok(Parsed {
        key,
        l4_off,
        tcp_flags,
        ip_len: ip_len as u32,
        big,
    })
}
