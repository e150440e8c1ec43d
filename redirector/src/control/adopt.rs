//! Adopting what a previous agent left in the pinned maps, so a restart rewrites nothing
//! that holds; entries that can't be this agent's (corrupt or foreign) are removed.
use std::collections::{BTreeSet, HashMap};

use redirector_common::{Endpoint, MaglevKey, ServiceKey, ServiceValue, SET_PROXY, SET_SERVE};

use super::{table_members, DesiredService, Ids, Installed, Programmer};
use crate::{
    addr::endpoint_addr,
    datapath::{MapSizes, Maps},
};

impl Programmer {
    /// Adopts the services found in the maps (left by a previous agent, or none); ids are
    /// allocated below the maps' capacities.
    ///
    /// Entries that can't be this agent's (a service id outside the capacity or used twice:
    /// corrupt or foreign state) are removed with a warning; the next `apply` programs
    /// those services again.
    pub fn adopt(mut maps: Maps, sizes: &MapSizes) -> Self {
        let mut services = HashMap::new();
        let mut backend_ids: HashMap<Endpoint, (u32, usize)> = HashMap::new();
        let mut used_svc = BTreeSet::new();
        let mut used_be = BTreeSet::new();
        let entries: Vec<(ServiceKey, ServiceValue)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let mut repaired = 0;
        for (key, value) in entries {
            if value.id >= sizes.services || !used_svc.insert(value.id) {
                if repaired == 0 {
                    tracing::warn!(
                        id = value.id,
                        capacity = sizes.services,
                        "pinned SERVICES entry with an id outside the map's capacity or used \
                         twice (corrupt or foreign state): removing such entries; the config \
                         programs their services again"
                    );
                }
                repaired += 1;
                let _ = maps.services.remove(&key);
                if value.id >= sizes.services {
                    for set in [SET_SERVE, SET_PROXY] {
                        let key = MaglevKey {
                            svc_id: value.id,
                            set,
                        };
                        let _ = maps.maglev.remove(&key);
                        let _ = maps.maglev_small.remove(&key);
                    }
                    let _ = maps.meta.remove(&value.id);
                }
                continue;
            }
            // A table that is missing, names ids outside BACKENDS or unwritten slots, or has
            // another member count than the entry says: rewritten by the next `apply`.
            let mut stale = false;
            let mut sets = [BTreeSet::new(), BTreeSet::new()];
            for (set, out) in [SET_SERVE, SET_PROXY].into_iter().zip(sets.iter_mut()) {
                let count = if set == SET_SERVE {
                    value.backend_count
                } else {
                    value.proxy_count
                };
                if count == 0 {
                    continue;
                }
                let Some(ids) = table_members(&maps, value.id, set, value.flags) else {
                    stale = true;
                    continue;
                };
                stale |= ids.len() != count as usize;
                for id in ids {
                    let ep = (id < sizes.backends)
                        .then(|| maps.backends.get(&id, 0).ok())
                        .flatten();
                    let Some((ep, sa)) = ep.and_then(|ep| Some((ep, endpoint_addr(&ep)?))) else {
                        stale = true;
                        continue;
                    };
                    used_be.insert(id);
                    backend_ids.entry(ep).or_insert((id, 0)).1 += 1;
                    out.insert(sa);
                }
            }
            let [serve, proxy] = sets;
            let desired = DesiredService {
                key,
                name: maps.service_name(value.id).unwrap_or_default(),
                mode: value.mode,
                serve,
                proxy,
                activator: endpoint_addr(&value.activator),
                kind: crate::control::EntryKind::from_flags(value.flags),
            };
            if stale {
                tracing::warn!(service = %desired.name, id = value.id, "pinned Maglev table doesn't match its service entry: rewriting it");
                repaired += 1;
            }
            services.insert(
                key,
                Installed {
                    value,
                    desired,
                    stale,
                },
            );
        }
        if !services.is_empty() {
            tracing::info!(
                services = services.len(),
                backends = backend_ids.len(),
                "adopted pinned state"
            );
        }
        let p = Self {
            maps,
            services,
            backend_ids,
            svc_ids: Ids::new(sizes.services, &used_svc),
            be_ids: Ids::new(sizes.backends, &used_be),
            repaired,
            service_ports: None,
            vips: Default::default(),
        };
        p.publish_vips();
        p
    }

    /// How many invalid pinned entries `adopt` removed.
    pub fn repaired(&self) -> usize {
        self.repaired
    }
}
