//! The services the path tests install, and the addresses they use, per family and protocol.
#![allow(dead_code)]

use std::net::SocketAddr;

use redirector::control::DesiredService;

use super::{
    packet::{sa, TCP, UDP},
    service,
};

pub const FAMILIES: [bool; 2] = [true, false];
pub const PROTOS: [u8; 2] = [TCP, UDP];

fn pick(v4: bool, a4: &str, a6: &str, port: u16) -> SocketAddr {
    let ip = if v4 { a4 } else { a6 };
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn svc_port(proto: u8) -> u16 {
    if proto == TCP {
        80
    } else {
        53
    }
}

fn be_port(proto: u8) -> u16 {
    if proto == TCP {
        8080
    } else {
        5353
    }
}

pub fn client(v4: bool, port: u16) -> SocketAddr {
    pick(v4, "10.244.1.5", "fd00:244::5", port)
}

/// A Serve service with one backend.
pub fn serve_vip(v4: bool, proto: u8) -> SocketAddr {
    pick(v4, "10.96.0.10", "fd00:96::10", svc_port(proto))
}

pub fn serve_backend(v4: bool, proto: u8) -> SocketAddr {
    pick(v4, "10.1.0.2", "fd00:1::2", be_port(proto))
}

/// A Proxy service (with a Serve backend it does not use while in Proxy).
pub fn proxy_vip(v4: bool, proto: u8) -> SocketAddr {
    pick(v4, "10.96.0.20", "fd00:96::20", svc_port(proto))
}

pub fn proxy_backend(v4: bool, proto: u8) -> SocketAddr {
    pick(v4, "10.1.0.4", "fd00:1::4", be_port(proto))
}

/// The node-local activator.
pub fn activator(v4: bool) -> SocketAddr {
    pick(v4, "10.0.0.1", "fd00::1", 8012)
}

/// A Proxy service with an activator pool of two.
pub fn pool_vip(v4: bool) -> SocketAddr {
    pick(v4, "10.96.0.21", "fd00:96::21", 80)
}

pub fn pool(v4: bool) -> [SocketAddr; 2] {
    [
        pick(v4, "10.0.0.5", "fd00::5", 8012),
        pick(v4, "10.0.0.6", "fd00::6", 8012),
    ]
}

/// A Serve service with ten backends.
pub fn multi_vip(v4: bool) -> SocketAddr {
    pick(v4, "10.96.0.30", "fd00:96::30", 80)
}

pub fn multi_backends(v4: bool) -> Vec<SocketAddr> {
    (1..=10)
        .map(|i| {
            if v4 {
                sa(&format!("10.2.0.{i}:8080"))
            } else {
                sa(&format!("[fd00:2::{i}]:8080"))
            }
        })
        .collect()
}

fn s(a: SocketAddr) -> String {
    a.to_string()
}

/// Every service above, both families, both protocols.
pub fn services() -> Vec<DesiredService> {
    let mut out = Vec::new();
    for v4 in FAMILIES {
        let act = s(activator(v4));
        for proto in PROTOS {
            out.push(service(
                &s(serve_vip(v4, proto)),
                proto,
                false,
                &[&s(serve_backend(v4, proto))],
                &[],
                &act,
            ));
            out.push(service(
                &s(proxy_vip(v4, proto)),
                proto,
                true,
                &[&s(proxy_backend(v4, proto))],
                &[],
                &act,
            ));
        }
        let pool: Vec<String> = pool(v4).iter().map(|a| s(*a)).collect();
        let pool: Vec<&str> = pool.iter().map(String::as_str).collect();
        out.push(service(&s(pool_vip(v4)), TCP, true, &[], &pool, &act));
        let multi: Vec<String> = multi_backends(v4).iter().map(|a| s(*a)).collect();
        let multi: Vec<&str> = multi.iter().map(String::as_str).collect();
        out.push(service(&s(multi_vip(v4)), TCP, false, &multi, &[], &act));
    }
    out
}

/// Whether `proto` is UDP (for messages).
pub fn proto_name(proto: u8) -> &'static str {
    if proto == UDP {
        "udp"
    } else {
        "tcp"
    }
}
