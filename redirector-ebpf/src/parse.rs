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

#[inline(always)]
pub fn load<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: bounds checked above; packet data may be unaligned.
    Some(unsafe { core::ptr::read_unaligned(p) })
}

/// Why a packet was not parsed (the counter to bump).
pub type Skip = u32;

/// Parses Ethernet + IP + L4 ports. `Err(counter)` means: pass unchanged.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Parsed, Skip> {
    let ethertype: u16 = load(data, data_end, 12).ok_or(G_MALFORMED)?;
    let avail = data_end - data;
    let mut key = CtKey::default();
    let l4_off;
    let ip_len;
    match u16::from_be(ethertype) {
        0x0800 => {
            let vihl: u8 = load(data, data_end, ETH_LEN).ok_or(G_MALFORMED)?;
            if vihl >> 4 != 4 {
                return Err(G_MALFORMED);
            }
            if vihl & 0x0f != 5 {
                return Err(G_FRAGMENT_OR_OPTIONS);
            }
            let tot_len: u16 = load(data, data_end, ETH_LEN + 2).ok_or(G_MALFORMED)?;
            let tot_len = u16::from_be(tot_len) as usize;
            if tot_len < IPV4_LEN + UDP_LEN || ETH_LEN + tot_len > avail {
                return Err(G_MALFORMED);
            }
            let frag: u16 = load(data, data_end, ETH_LEN + 6).ok_or(G_MALFORMED)?;
            if u16::from_be(frag) & 0x3fff != 0 {
                return Err(G_FRAGMENT_OR_OPTIONS);
            }
            key.proto = load(data, data_end, ETH_LEN + 9).ok_or(G_MALFORMED)?;
            key.saddr[0] = load(data, data_end, ETH_LEN + 12).ok_or(G_MALFORMED)?;
            key.daddr[0] = load(data, data_end, ETH_LEN + 16).ok_or(G_MALFORMED)?;
            key.family = FAMILY_V4;
            l4_off = ETH_LEN + IPV4_LEN;
            ip_len = tot_len;
        }
        0x86dd => {
            let v: u8 = load(data, data_end, ETH_LEN).ok_or(G_MALFORMED)?;
            if v >> 4 != 6 {
                return Err(G_MALFORMED);
            }
            let plen: u16 = load(data, data_end, ETH_LEN + 4).ok_or(G_MALFORMED)?;
            let plen = u16::from_be(plen) as usize;
            if plen < UDP_LEN || ETH_LEN + IPV6_LEN + plen > avail {
                return Err(G_MALFORMED);
            }
            key.proto = load(data, data_end, ETH_LEN + 6).ok_or(G_MALFORMED)?;
            key.saddr = load(data, data_end, ETH_LEN + 8).ok_or(G_MALFORMED)?;
            key.daddr = load(data, data_end, ETH_LEN + 24).ok_or(G_MALFORMED)?;
            key.family = FAMILY_V6;
            l4_off = ETH_LEN + IPV6_LEN;
            ip_len = IPV6_LEN + plen;
        }
        _ => return Err(G_NOT_IP),
    }
    let l4_len = ip_len - (l4_off - ETH_LEN);
    let mut tcp_flags = 0;
    match key.proto {
        PROTO_TCP => {
            if l4_len < TCP_LEN {
                return Err(G_MALFORMED);
            }
            let doff: u8 = load(data, data_end, l4_off + 12).ok_or(G_MALFORMED)?;
            let doff = ((doff >> 4) as usize) * 4;
            if doff < TCP_LEN || doff > l4_len {
                return Err(G_MALFORMED);
            }
            tcp_flags = load(data, data_end, l4_off + 13).ok_or(G_MALFORMED)?;
        }
        PROTO_UDP => {
            let ulen: u16 = load(data, data_end, l4_off + 4).ok_or(G_MALFORMED)?;
            let ulen = u16::from_be(ulen) as usize;
            if ulen < UDP_LEN || ulen > l4_len {
                return Err(G_MALFORMED);
            }
        }
        _ => return Err(G_NOT_IP),
    }
    key.sport = load(data, data_end, l4_off).ok_or(G_MALFORMED)?;
    key.dport = load(data, data_end, l4_off + 2).ok_or(G_MALFORMED)?;
    // The checksum field must be inside the packet too.
    let _: u16 = load(
        data,
        data_end,
        if key.proto == PROTO_TCP {
            l4_off + 16
        } else {
            l4_off + 6
        },
    )
    .ok_or(G_MALFORMED)?;
    Ok(Parsed {
        key,
        l4_off,
        tcp_flags,
        ip_len: ip_len as u32,
    })
}
