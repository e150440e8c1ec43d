//! Typed handles on the datapath's maps, either taken from a freshly loaded object or
//! opened from their pins (for `redirector status`, with no agent running).
use std::path::Path;

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use redirector_common::{
    CtKey, CtValue, DatapathConfig, Endpoint, MaglevKey, MaglevSmallValue, MaglevValue, ServiceKey,
    ServiceMeta, ServiceStats, ServiceValue, SockFlow, G_COUNT,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} missing from the object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// A pinned map of another layout (another version's, or not ours).
    #[error(
        "map {name}: the pinned map's {what} size is {pinned} bytes, this agent's is {ours} \
         (pinned by another version?)"
    )]
    Shape {
        name: &'static str,
        what: &'static str,
        pinned: usize,
        ours: usize,
    },
}

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevValue>,
    pub maglev_small: HashMap<MapData, MaglevKey, MaglevSmallValue>,
    pub backends: Array<MapData, Endpoint>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, DatapathConfig>,
    pub meta: HashMap<MapData, u32, ServiceMeta>,
    /// Socket cookie → the flow its `connect()` was translated to (socket hooks).
    pub sock_flows: HashMap<MapData, u64, SockFlow>,
}

fn conv<T: TryFrom<Map, Error = MapError>>(name: &'static str, m: Map) -> Result<T, MapsError> {
    T::try_from(m).map_err(|source| shape_error(name, source))
}

/// aya's size errors name our type's size "size" and the map's "expected": said the right
/// way round here.
fn shape_error(name: &'static str, source: MapError) -> MapsError {
    match source {
        MapError::InvalidKeySize { size, expected } => MapsError::Shape {
            name,
            what: "key",
            pinned: expected,
            ours: size,
        },
        MapError::InvalidValueSize { size, expected } => MapsError::Shape {
            name,
            what: "value",
            pinned: expected,
            ours: size,
        },
        source => MapsError::Map { name, source },
    }
}

impl Maps {
    /// Takes the maps out of a loaded object (the programs keep their references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { name });
        Ok(Self {
            services: conv("SERVICES", take("SERVICES")?)?,
            maglev: conv("MAGLEV", take("MAGLEV")?)?,
            maglev_small: conv("MAGLEV_SMALL", take("MAGLEV_SMALL")?)?,
            backends: conv("BACKENDS", take("BACKENDS")?)?,
            conntrack: conv("CONNTRACK", take("CONNTRACK")?)?,
            service_stats: conv("SERVICE_STATS", take("SERVICE_STATS")?)?,
            global_stats: conv("GLOBAL_STATS", take("GLOBAL_STATS")?)?,
            config: conv("CONFIG", take("CONFIG")?)?,
            meta: conv("SERVICE_META", take("SERVICE_META")?)?,
            sock_flows: conv("SOCK_FLOWS", take("SOCK_FLOWS")?)?,
        })
    }

    /// Opens the maps pinned under `pin_path`.
    pub fn open_pinned(pin_path: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| -> Result<Map, MapsError> {
            let data = MapData::from_pin(pin_path.join(name))
                .map_err(|source| MapsError::Map { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })
        };
        Ok(Self {
            services: conv("SERVICES", open("SERVICES")?)?,
            maglev: conv("MAGLEV", open("MAGLEV")?)?,
            maglev_small: conv("MAGLEV_SMALL", open("MAGLEV_SMALL")?)?,
            backends: conv("BACKENDS", open("BACKENDS")?)?,
            conntrack: conv("CONNTRACK", open("CONNTRACK")?)?,
            service_stats: conv("SERVICE_STATS", open("SERVICE_STATS")?)?,
            global_stats: conv("GLOBAL_STATS", open("GLOBAL_STATS")?)?,
            config: conv("CONFIG", open("CONFIG")?)?,
            meta: conv("SERVICE_META", open("SERVICE_META")?)?,
            sock_flows: conv("SOCK_FLOWS", open("SOCK_FLOWS")?)?,
        })
    }

    /// A service's counters summed over CPUs.
    pub fn service_stats(&self, id: u32) -> ServiceStats {
        let mut sum = ServiceStats::default();
        if let Ok(per_cpu) = self.service_stats.get(&id, 0) {
            for s in per_cpu.iter() {
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.reply_packets += s.reply_packets;
                sum.reply_bytes += s.reply_bytes;
                sum.new_flows += s.new_flows;
                sum.proxied_flows += s.proxied_flows;
            }
        }
        sum
    }

    /// Zeroes a service's counters (when its id is given to a new service).
    pub fn reset_service_stats(&mut self, id: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            })
        })?;
        let zero = aya::maps::PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(
            |e| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "per-cpu values",
                    io_error: e,
                })
            },
        )?;
        self.service_stats.set(id, zero, 0)
    }

    /// Datapath-wide counters (`G_*`) summed over CPUs.
    pub fn global_stats(&self) -> [u64; G_COUNT as usize] {
        let mut out = [0u64; G_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.global_stats.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }

    /// Number of conntrack entries (two per flow).
    pub fn conntrack_len(&self) -> usize {
        let mut n = 0;
        let _ = super::batch::for_each(&self.conntrack, |_, _| n += 1);
        n
    }

    /// Live sockets whose `connect()` the socket hooks translated, per service id (the
    /// entries go when the socket is released).
    pub fn socket_flows(&self) -> std::collections::HashMap<u32, usize> {
        let mut n = std::collections::HashMap::new();
        let _ = super::batch::for_each(&self.sock_flows, |_, f| {
            *n.entry(f.svc_id).or_insert(0) += 1
        });
        n
    }

    /// The name recorded for a service id.
    pub fn service_name(&self, id: u32) -> Option<String> {
        let m = self.meta.get(&id, 0).ok()?;
        let end = m.name.iter().position(|b| *b == 0).unwrap_or(m.name.len());
        Some(String::from_utf8_lossy(&m.name[..end]).into_owned())
    }
}
