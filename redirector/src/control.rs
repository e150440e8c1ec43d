//! Turns desired services (from the config file, or later Kubernetes) into map entries:
//! service ids, backend ids, Maglev tables. Writes are ordered so no packet ever sees a
//! half-written service: backends, then the Maglev table, then the service entry (a mode
//! flip is that one write); ids are reused only after a grace period. On start it adopts
//! what a previous agent left in the pinned maps, so a restart rewrites nothing that holds.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    time::Duration,
};

use aya::maps::MapError;
use redirector_common::{
    DatapathConfig, Endpoint, MaglevKey, MaglevSmallValue, MaglevValue, ServiceKey, ServiceMeta,
    ServiceValue, CONFIG_KEY, MAGLEV_M, MAGLEV_M_SMALL, MAGLEV_SMALL_MAX, MODE_PROXY, MODE_SERVE,
    PROTO_TCP, PROTO_UDP, SET_PROXY, SET_SERVE, SVC_ACT_PORT, SVC_ENDPOINT, SVC_PROXY_SMALL,
    SVC_SERVE_SMALL, SVC_SHARED,
};

use crate::{
    addr::{endpoint, ip_words, port_wire, wire_port, words_ip},
    config::{Config, ConntrackConfig, Mode},
    datapath::Maps,
    maglev,
};

mod adopt;
mod ids;

use ids::Ids;

/// How long a released id stays unused (packets in flight may still hold it).
const ID_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("writing {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("out of {0} ids")]
    Exhausted(&'static str),
}

fn werr(map: &'static str) -> impl FnOnce(MapError) -> ControlError {
    move |source| ControlError::Map { map, source }
}

/// What a service entry's key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// A VIP (a ClusterIP): every flow to it is translated.
    #[default]
    Vip,
    /// A revision's pod address (where Knative's ingress sends in Serve): only new
    /// connections are switched (`SVC_ENDPOINT`), and only while the revision is proxied.
    Endpoint,
    /// Knative's activator address, shared by every revision: new connections go to the
    /// node-local activator's listener, which reads the revision from the headers
    /// (`SVC_ENDPOINT | SVC_SHARED`).
    Shared,
}

impl EntryKind {
    /// Its `ServiceValue::flags` bits.
    pub fn flags(self) -> u8 {
        match self {
            EntryKind::Vip => 0,
            EntryKind::Endpoint => SVC_ENDPOINT,
            EntryKind::Shared => SVC_ENDPOINT | SVC_SHARED,
        }
    }

    /// From `ServiceValue::flags`.
    pub fn from_flags(flags: u8) -> Self {
        match (flags & SVC_ENDPOINT != 0, flags & SVC_SHARED != 0) {
            (false, _) => EntryKind::Vip,
            (true, false) => EntryKind::Endpoint,
            (true, true) => EntryKind::Shared,
        }
    }
}

/// One map entry's worth of desired state: a VIP:port:proto and where it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub key: ServiceKey,
    pub name: String,
    pub mode: u8,
    /// Serve backends (same family as the VIP).
    pub serve: BTreeSet<SocketAddr>,
    /// Proxy pool (Knative activators); empty → the node-local activator.
    pub proxy: BTreeSet<SocketAddr>,
    pub activator: Option<SocketAddr>,
    pub kind: EntryKind,
}

/// Fills a Maglev table's slots with backend ids (`ids[k]` is the id of `names[k]`).
fn fill(slots: &mut [u32], ids: &[u32], names: &[String]) {
    let table = maglev::build_table(names, slots.len()).unwrap_or_default();
    for (slot, idx) in slots.iter_mut().zip(table) {
        *slot = ids[idx as usize];
    }
}

/// The backend ids in a set's table, from the map `flags` name.
pub(crate) fn table_members(
    maps: &Maps,
    svc_id: u32,
    set: u32,
    flags: u8,
) -> Option<BTreeSet<u32>> {
    let key = MaglevKey { svc_id, set };
    let small_bit = if set == SET_SERVE {
        SVC_SERVE_SMALL
    } else {
        SVC_PROXY_SMALL
    };
    if flags & small_bit != 0 {
        let t = maps.maglev_small.get(&key, 0).ok()?;
        Some(t.slots.iter().copied().collect())
    } else {
        let t = maps.maglev.get(&key, 0).ok()?;
        Some(t.slots.iter().copied().collect())
    }
}

/// Expands a config into map-level desired state (one entry per VIP).
pub fn desired_from_config(cfg: &Config) -> Vec<DesiredService> {
    let mut out = Vec::new();
    for s in &cfg.services {
        for vip in &s.vips {
            let (addr, family) = ip_words(*vip);
            let same = |a: &&SocketAddr| a.is_ipv4() == vip.is_ipv4();
            out.push(DesiredService {
                key: ServiceKey {
                    addr,
                    port: port_wire(s.port),
                    proto: if s.protocol.is_udp() {
                        PROTO_UDP
                    } else {
                        PROTO_TCP
                    },
                    family,
                },
                name: s.full_name(),
                mode: match s.mode {
                    Mode::Serve => MODE_SERVE,
                    Mode::Proxy => MODE_PROXY,
                },
                serve: s.backends.iter().filter(same).copied().collect(),
                proxy: s.activators.iter().filter(same).copied().collect(),
                activator: cfg.node.activator.iter().find(same).copied(),
                kind: EntryKind::Vip,
            });
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Installed {
    value: ServiceValue,
    desired: DesiredService,
    /// Adopted tables that don't match the entry: both sets are rewritten by the next write.
    stale: bool,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Entries that did not fit (out of ids).
    pub skipped: usize,
}

impl ApplyReport {
    fn count(&mut self, change: Change) {
        match change {
            Change::Added => self.added += 1,
            Change::Updated => self.updated += 1,
            Change::Unchanged => self.unchanged += 1,
        }
    }
}

/// What `upsert` did to one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Unchanged,
}

/// Owns the maps' contents.
pub struct Programmer {
    maps: Maps,
    services: HashMap<ServiceKey, Installed>,
    backend_ids: HashMap<Endpoint, (u32, usize)>,
    svc_ids: Ids,
    be_ids: Ids,
    /// Pinned entries `adopt` found invalid and removed.
    repaired: usize,
    /// Per-service activator ports `(first, count)`: see `set_service_ports`.
    service_ports: Option<(u16, u16)>,
    /// Service id → VIP:port of what is installed (`vips_by_id`).
    vips: VipsById,
}

/// Service id → VIP:port, shared with the activator.
pub type VipsById = std::sync::Arc<std::sync::RwLock<HashMap<u32, SocketAddr>>>;

impl Programmer {
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Gives each service whose id is below `count` the node-local activator on a port of
    /// its own, `first + id` (`SVC_ACT_PORT`), instead of the listener's port: flows to the
    /// activator then never share a tuple across services, and the activator reads the
    /// service from the port. `None`: the listener's port for all. Entries whose activator
    /// differs are rewritten at the next `apply`.
    pub fn set_service_ports(&mut self, ports: Option<(u16, u16)>) {
        self.service_ports = ports;
    }

    /// Whether the installed `old` already is what `d` asks for. The activator is compared
    /// as written (on the service's own port or not), so an adopted entry (whose recorded
    /// activator is the written one) is not rewritten by a restart.
    fn same_entry(&self, old: &Installed, d: &DesiredService) -> bool {
        let (activator, flag) = self.activator_of(d, old.value.id);
        let mut want = d.clone();
        want.activator = old.desired.activator;
        old.desired == want
            && old.value.activator == activator
            && old.value.flags & SVC_ACT_PORT == flag
    }

    /// The activator endpoint and flag of `d` as service `id`: a shared endpoint's always
    /// on the listener's port.
    fn activator_of(&self, d: &DesiredService, id: u32) -> (Endpoint, u8) {
        let Some(base) = d.activator else {
            return (Endpoint::default(), 0);
        };
        match self.service_ports {
            Some((first, count)) if id < count as u32 && d.kind != EntryKind::Shared => (
                endpoint(SocketAddr::new(base.ip(), first + id as u16)),
                SVC_ACT_PORT,
            ),
            _ => (endpoint(base), 0),
        }
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Gives the maps back (for another `adopt`, as a restarted agent does).
    pub fn into_maps(self) -> Maps {
        self.maps
    }

    /// Writes the conntrack timeouts.
    pub fn set_conntrack(&mut self, ct: &ConntrackConfig) -> Result<(), ControlError> {
        let cfg = DatapathConfig {
            tcp_timeout_ns: ct.tcp_timeout.as_nanos() as u64,
            udp_timeout_ns: ct.udp_timeout.as_nanos() as u64,
            closing_timeout_ns: ct.closing_timeout.as_nanos() as u64,
        };
        self.maps
            .config
            .set(CONFIG_KEY, cfg, 0)
            .map_err(werr("CONFIG"))
    }

    fn backend_ref(&mut self, sa: SocketAddr) -> Result<u32, ControlError> {
        let ep = endpoint(sa);
        if let Some((id, refs)) = self.backend_ids.get_mut(&ep) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self.be_ids.alloc("backend")?;
        self.maps
            .backends
            .set(id, ep, 0)
            .map_err(werr("BACKENDS"))?;
        self.backend_ids.insert(ep, (id, 1));
        Ok(id)
    }

    fn backend_unref(&mut self, sa: SocketAddr) {
        let ep = endpoint(sa);
        if let Some((id, refs)) = self.backend_ids.get_mut(&ep) {
            *refs -= 1;
            if *refs == 0 {
                let id = *id;
                self.backend_ids.remove(&ep);
                self.be_ids.release(id);
            }
        }
    }

    /// Writes one Maglev table (backends first, then the table) into `MAGLEV_SMALL` for
    /// sets of up to `MAGLEV_SMALL_MAX` backends, else `MAGLEV`. Returns the count and
    /// whether the small table was used.
    fn write_set(
        &mut self,
        svc_id: u32,
        set: u32,
        members: &BTreeSet<SocketAddr>,
    ) -> Result<(u32, bool), ControlError> {
        if members.is_empty() {
            return Ok((0, false));
        }
        let mut ids = Vec::with_capacity(members.len());
        let mut names = Vec::with_capacity(members.len());
        for sa in members {
            match self.backend_ref(*sa) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for done in members.iter().take(ids.len()) {
                        self.backend_unref(*done);
                    }
                    return Err(e);
                }
            }
            names.push(sa.to_string());
        }
        let small = members.len() <= MAGLEV_SMALL_MAX;
        let key = MaglevKey { svc_id, set };
        let written = if small {
            let mut value = MaglevSmallValue {
                slots: [0; MAGLEV_M_SMALL],
            };
            fill(&mut value.slots, &ids, &names);
            self.maps
                .maglev_small
                .insert(key, value, 0)
                .map_err(werr("MAGLEV_SMALL"))
        } else {
            let mut value = MaglevValue {
                slots: [0; MAGLEV_M],
            };
            fill(&mut value.slots, &ids, &names);
            self.maps
                .maglev
                .insert(key, value, 0)
                .map_err(werr("MAGLEV"))
        };
        if let Err(e) = written {
            for sa in members {
                self.backend_unref(*sa);
            }
            return Err(e);
        }
        Ok((members.len() as u32, small))
    }

    /// Removes a set's table from the map(s) it is not in (`keep_small`: `None` = from
    /// both).
    fn drop_tables(&mut self, svc_id: u32, set: u32, keep_small: Option<bool>) {
        let key = MaglevKey { svc_id, set };
        if keep_small != Some(true) {
            let _ = self.maps.maglev_small.remove(&key);
        }
        if keep_small != Some(false) {
            let _ = self.maps.maglev.remove(&key);
        }
    }

    /// Makes the maps hold exactly `desired`. Idempotent; only changed entries are written.
    /// Maps that are full make room first (`make_room`); entries that still don't fit (out of
    /// service or backend ids) are skipped and counted; the rest is programmed.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<ApplyReport, ControlError> {
        let mut report = ApplyReport::default();
        let keep: std::collections::HashSet<ServiceKey> = desired.iter().map(|d| d.key).collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        for key in gone {
            self.remove(&key)?;
            report.removed += 1;
        }
        let mut short = Vec::new();
        for d in desired {
            match self.upsert(d) {
                Ok(change) => report.count(change),
                Err(ControlError::Exhausted(_)) => short.push(d),
                Err(e) => return Err(e),
            }
        }
        if !short.is_empty() {
            self.make_room(desired, &short)?;
        }
        for d in short {
            match self.upsert(d) {
                Ok(change) => report.count(change),
                Err(ControlError::Exhausted(what)) => {
                    if report.skipped == 0 {
                        tracing::error!(service = %d.name, "out of {what} ids: skipping services that don't fit");
                    }
                    report.skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        self.publish_vips();
        Ok(report)
    }

    /// A table of service id → VIP:port, kept current by `apply`: the activator reads a
    /// connection's service from its per-service port (`set_service_ports`) through it.
    pub fn vips_by_id(&self) -> VipsById {
        self.vips.clone()
    }

    pub(crate) fn publish_vips(&self) {
        let table: HashMap<u32, SocketAddr> = self
            .services
            .iter()
            .map(|(k, i)| {
                let vip = SocketAddr::new(words_ip(&k.addr, k.family), wire_port(k.port));
                (i.value.id, vip)
            })
            .collect();
        if let Ok(mut v) = self.vips.write() {
            *v = table;
        }
    }

    /// Full maps: an entry changing its backends needs ids for the new ones while the old
    /// ones are still referenced, and released ids wait out `ID_GRACE`. So entries first drop
    /// the members they lose (a write that needs no new id), then the released ids' grace
    /// period is waited out (blocking, at most `ID_GRACE`, and only when the ids that come
    /// free are enough for the `short` entries): a config that fills the maps exactly still
    /// converges, at the cost of a short window with fewer backends.
    fn make_room(
        &mut self,
        desired: &[DesiredService],
        short: &[&DesiredService],
    ) -> Result<(), ControlError> {
        for d in desired {
            let Some(old) = self.services.get(&d.key) else {
                continue;
            };
            let mid = DesiredService {
                serve: old.desired.serve.intersection(&d.serve).copied().collect(),
                proxy: old.desired.proxy.intersection(&d.proxy).copied().collect(),
                ..old.desired.clone()
            };
            if mid != old.desired {
                self.upsert(&mid)?;
            }
        }
        let new_services = short
            .iter()
            .filter(|d| !self.services.contains_key(&d.key))
            .count();
        let new_backends: std::collections::HashSet<Endpoint> = short
            .iter()
            .flat_map(|d| d.serve.iter().chain(&d.proxy))
            .map(|a| endpoint(*a))
            .filter(|e| !self.backend_ids.contains_key(e))
            .collect();
        let enough =
            new_services <= self.svc_ids.left() && new_backends.len() <= self.be_ids.left();
        if enough && (self.svc_ids.cooling() || self.be_ids.cooling()) {
            tracing::warn!(
                "maps full: waiting {ID_GRACE:?} for released ids before programming the rest"
            );
            std::thread::sleep(ID_GRACE);
        }
        Ok(())
    }

    /// Programs one entry (backends, then the table, then the service entry).
    pub fn upsert(&mut self, d: &DesiredService) -> Result<Change, ControlError> {
        let old = self.services.get(&d.key).cloned();
        if let Some(old) = &old {
            if !old.stale && self.same_entry(old, d) {
                return Ok(Change::Unchanged);
            }
        }
        let (id, generation) = match &old {
            Some(o) => (o.value.id, o.value.generation.wrapping_add(1)),
            None => {
                let id = self.svc_ids.alloc("service")?;
                let _ = self.maps.reset_service_stats(id);
                (id, 1)
            }
        };
        let r = self.write_entry(d, old.as_ref(), id, generation);
        if r.is_err() && old.is_none() {
            self.svc_ids.release(id);
        }
        r
    }

    fn write_entry(
        &mut self,
        d: &DesiredService,
        old: Option<&Installed>,
        id: u32,
        generation: u32,
    ) -> Result<Change, ControlError> {
        if old.map(|o| &o.desired.name) != Some(&d.name) {
            let mut meta = ServiceMeta { name: [0; 128] };
            let n = d.name.len().min(127);
            meta.name[..n].copy_from_slice(&d.name.as_bytes()[..n]);
            self.maps
                .meta
                .insert(id, meta, 0)
                .map_err(werr("SERVICE_META"))?;
        }
        // 1. backends and tables (only the sets that changed).
        let serve_changed = old.is_none_or(|o| o.stale || o.desired.serve != d.serve);
        let proxy_changed = old.is_none_or(|o| o.stale || o.desired.proxy != d.proxy);
        let old_flags = old.map(|o| o.value.flags).unwrap_or(0);
        let (backend_count, serve_small) = match old {
            Some(o) if !serve_changed => (o.value.backend_count, old_flags & SVC_SERVE_SMALL != 0),
            _ => self.write_set(id, SET_SERVE, &d.serve)?,
        };
        let (proxy_count, proxy_small) = match old {
            Some(o) if !proxy_changed => (o.value.proxy_count, old_flags & SVC_PROXY_SMALL != 0),
            _ => match self.write_set(id, SET_PROXY, &d.proxy) {
                Ok(n) => n,
                Err(e) => {
                    if serve_changed {
                        for sa in &d.serve {
                            self.backend_unref(*sa);
                        }
                    }
                    return Err(e);
                }
            },
        };
        // 2. the service entry: one write (a flip is exactly this).
        let (activator, mut flags) = self.activator_of(d, id);
        flags |= d.kind.flags();
        if serve_small {
            flags |= SVC_SERVE_SMALL;
        }
        if proxy_small {
            flags |= SVC_PROXY_SMALL;
        }
        let value = ServiceValue {
            id,
            mode: d.mode,
            flags,
            backend_count,
            proxy_count,
            generation,
            activator,
            ..ServiceValue::default()
        };
        self.maps
            .services
            .insert(d.key, value, 0)
            .map_err(werr("SERVICES"))?;
        // 3. release what the old entry referenced.
        let change = if let Some(o) = old {
            if serve_changed {
                for sa in &o.desired.serve {
                    self.backend_unref(*sa);
                }
                // The table the entry no longer points at (a set that emptied, or moved
                // between the small and the large map).
                self.drop_tables(id, SET_SERVE, (!d.serve.is_empty()).then_some(serve_small));
            }
            if proxy_changed {
                for sa in &o.desired.proxy {
                    self.backend_unref(*sa);
                }
                self.drop_tables(id, SET_PROXY, (!d.proxy.is_empty()).then_some(proxy_small));
            }
            Change::Updated
        } else {
            Change::Added
        };
        self.services.insert(
            d.key,
            Installed {
                value,
                desired: d.clone(),
                stale: false,
            },
        );
        Ok(change)
    }

    fn remove(&mut self, key: &ServiceKey) -> Result<(), ControlError> {
        let Some(old) = self.services.remove(key) else {
            return Ok(());
        };
        // Entry first: from here no new flow reaches the tables.
        match self.maps.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(werr("SERVICES")(e)),
        }
        let id = old.value.id;
        for set in [SET_SERVE, SET_PROXY] {
            self.drop_tables(id, set, None);
        }
        let _ = self.maps.meta.remove(&id);
        for sa in old.desired.serve.iter().chain(&old.desired.proxy) {
            self.backend_unref(*sa);
        }
        self.svc_ids.release(id);
        Ok(())
    }

    /// Changes only the mode of one entry: the single map write a flip is.
    pub fn set_mode(&mut self, key: &ServiceKey, mode: u8) -> Result<bool, ControlError> {
        let Some(inst) = self.services.get_mut(key) else {
            return Ok(false);
        };
        if inst.value.mode == mode {
            return Ok(true);
        }
        let mut value = inst.value;
        value.mode = mode;
        value.generation = value.generation.wrapping_add(1);
        self.maps
            .services
            .insert(*key, value, 0)
            .map_err(werr("SERVICES"))?;
        inst.value = value;
        inst.desired.mode = mode;
        Ok(true)
    }

    /// Installed entries with their values.
    pub fn installed(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceValue, &str)> {
        self.services
            .iter()
            .map(|(k, i)| (k, &i.value, i.desired.name.as_str()))
    }

    /// Removes conntrack entries idle past their timeout. Returns how many were removed.
    /// Batched (a few syscalls per thousand entries): the sweep runs every few seconds over
    /// a map that can hold millions of flows.
    pub fn gc_conntrack(&mut self, ct: &ConntrackConfig) -> usize {
        let now = monotonic_coarse_ns();
        let mut expired = Vec::new();
        let walked = crate::datapath::batch::for_each(&self.maps.conntrack, |k, v| {
            let timeout = if v.flags & redirector_common::CT_CLOSING != 0 {
                ct.closing_timeout
            } else if k.proto == PROTO_TCP && v.flags & redirector_common::CT_SEEN_REPLY == 0 {
                // Never answered (the datapath's rule too).
                ct.tcp_timeout
                    .min(Duration::from_nanos(redirector_common::CT_SYN_TIMEOUT_NS))
            } else if k.proto == PROTO_TCP {
                ct.tcp_timeout
            } else {
                ct.udp_timeout
            };
            if now.saturating_sub(redirector_common::ct_time(v.last_seen))
                > timeout.as_nanos() as u64
            {
                expired.push(*k);
            }
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "conntrack sweep");
        }
        match crate::datapath::batch::delete(&mut self.maps.conntrack, &expired) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "conntrack sweep: removing expired entries");
                0
            }
        }
    }
}

/// The datapath clock (`CtValue::last_seen`): CLOCK_MONOTONIC_COARSE, or CLOCK_MONOTONIC on
/// kernels whose programs read `bpf_ktime_get_ns` (see `datapath::features`), plus
/// `redirector_common::CLOCK_EPOCH_NS`.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let clock = if crate::datapath::coarse_clock() {
        libc::CLOCK_MONOTONIC_COARSE
    } else {
        libc::CLOCK_MONOTONIC
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 + redirector_common::CLOCK_EPOCH_NS
}
