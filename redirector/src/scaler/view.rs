//! The scaler's read-only view of the datapath: is the service seeing traffic (its packet
//! counters move), and which flows are still pinned to given instances (conntrack).
use std::{net::IpAddr, path::Path};

use redirector_common::{ServiceKey, CT_CLOSING, CT_REPLY, PROTO_TCP, PROTO_UDP};

use crate::{
    addr::{ip_words, port_wire},
    config::ServiceConfig,
    control::monotonic_coarse_ns,
    datapath::{Maps, MapsError},
};

pub struct DatapathView {
    maps: Maps,
    keys: Vec<ServiceKey>,
}

impl DatapathView {
    pub fn open(pin_path: &Path, svc: &ServiceConfig) -> Result<Self, MapsError> {
        let proto = if svc.protocol.is_udp() {
            PROTO_UDP
        } else {
            PROTO_TCP
        };
        let keys = svc
            .vips
            .iter()
            .map(|ip| {
                let (addr, family) = ip_words(*ip);
                ServiceKey {
                    addr,
                    port: port_wire(svc.port),
                    proto,
                    family,
                }
            })
            .collect();
        Ok(Self {
            maps: Maps::open_pinned(pin_path)?,
            keys,
        })
    }

    /// Packets seen for the service (both directions, all its VIPs): any change is activity,
    /// even when requests are too short to be caught by a concurrency sample.
    pub fn packets(&self) -> u64 {
        self.keys
            .iter()
            .filter_map(|k| self.maps.services.get(k, 0).ok())
            .map(|v| {
                let s = self.maps.service_stats(v.id);
                s.packets + s.reply_packets
            })
            .sum()
    }

    /// Open flows pinned to any of `ips`: packet-path flows that saw a packet in the last
    /// 1.5 s, and open sockets the socket hooks connected there.
    pub fn flows_to(&self, ips: &[IpAddr]) -> usize {
        let targets: Vec<[u32; 4]> = ips.iter().map(|ip| ip_words(*ip).0).collect();
        let now = monotonic_coarse_ns();
        let mut sockets = 0;
        let _ = crate::datapath::batch::for_each(&self.maps.sock_flows, |_, f| {
            if targets.contains(&f.target) {
                sockets += 1;
            }
        });
        sockets
            + self
                .maps
                .conntrack
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| {
                    v.flags & (CT_REPLY | CT_CLOSING) == 0
                        && targets.contains(&v.nat_daddr)
                        && now.saturating_sub(redirector_common::ct_time(v.last_seen))
                            < 1_500_000_000
                })
                .count()
    }
}
