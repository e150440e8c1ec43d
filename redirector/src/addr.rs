//! Conversions between std addresses and the datapath's wire-order representation.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use redirector_common::{Endpoint, FAMILY_V4, FAMILY_V6};

/// IP address → four u32 words holding the address bytes in network order.
pub fn ip_words(ip: IpAddr) -> ([u32; 4], u8) {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(v4) => {
            w[0] = u32::from_ne_bytes(v4.octets());
            (w, FAMILY_V4)
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            for (i, c) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            (w, FAMILY_V6)
        }
    }
}

/// The inverse of `ip_words`.
pub fn words_ip(w: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// Port (host order) → the datapath's representation (network order, as on the wire).
pub fn port_wire(p: u16) -> u16 {
    p.to_be()
}

pub fn wire_port(p: u16) -> u16 {
    u16::from_be(p)
}

pub fn endpoint(sa: SocketAddr) -> Endpoint {
    let (addr, family) = ip_words(sa.ip());
    Endpoint {
        addr,
        port: port_wire(sa.port()),
        family,
        _pad: 0,
    }
}

pub fn endpoint_addr(e: &Endpoint) -> Option<SocketAddr> {
    if e.family != FAMILY_V4 && e.family != FAMILY_V6 {
        return None;
    }
    Some(SocketAddr::new(
        words_ip(&e.addr, e.family),
        wire_port(e.port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for s in ["10.1.2.3:8080", "[fd00::1:2]:80"] {
            let sa: SocketAddr = s.parse().unwrap();
            assert_eq!(endpoint_addr(&endpoint(sa)), Some(sa));
        }
        let (w, _) = ip_words("10.0.0.1".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 0, 0, 1]);
    }
}
