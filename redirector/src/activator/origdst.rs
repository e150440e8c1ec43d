//! Which service a connection was for, without help from the client: the datapath's
//! conntrack reply entry (activator → client) holds the VIP:port the client dialled.
use std::{net::SocketAddr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use redirector_common::{CtKey, CtValue, PROTO_TCP};

use crate::addr::{ip_words, port_wire, wire_port, words_ip};

/// Read-only handle on the pinned CONNTRACK map.
pub struct OrigDst {
    ct: HashMap<MapData, CtKey, CtValue>,
}

impl OrigDst {
    pub fn open(pin_path: &Path) -> Result<Self, aya::maps::MapError> {
        let data = MapData::from_pin(pin_path.join("CONNTRACK"))?;
        let ct = HashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Self { ct })
    }

    /// The VIP:port a TCP connection from `peer` to our `local` address was sent to.
    pub fn lookup(&self, local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
        let (saddr, family) = ip_words(local.ip());
        let (daddr, _) = ip_words(peer.ip());
        let key = CtKey {
            saddr,
            daddr,
            sport: port_wire(local.port()),
            dport: port_wire(peer.port()),
            proto: PROTO_TCP,
            family,
            _pad: 0,
        };
        let v = self.ct.get(&key, 0).ok()?;
        Some(SocketAddr::new(
            words_ip(&v.nat_saddr, family),
            wire_port(v.nat_sport),
        ))
    }
}
