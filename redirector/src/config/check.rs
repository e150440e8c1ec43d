//! Checks that span services: one service per `namespace/name`, no backend that is another
//! service's VIP:port, and everything fitting in the maps `[maps]` sizes (service entries,
//! distinct backends, scaled instances at their maximum), so the agent programs a config
//! it accepts whole.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
};

use super::{service::Spans, At, ConfigError, MapSizes, ServiceConfig};

/// Refuses what the services together can't be: duplicate names, chained VIPs, more
/// entries than `sizes` hold.
pub(super) fn services(
    at: &At<'_>,
    services: &[ServiceConfig],
    spans: &[Spans],
    sizes: &MapSizes,
) -> Result<(), ConfigError> {
    let label = |i: usize, f: &str| format!("service[{i}] ({}).{f}", services[i].name);
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(j) = names.insert(s.full_name(), i) {
            return Err(at.err(
                Some(spans[i].name.clone()),
                format!(
                    "{}: {} is also service[{j}] (each namespace/name once)",
                    label(i, "name"),
                    s.full_name()
                ),
            ));
        }
    }
    let vips: HashMap<(SocketAddr, bool), usize> = services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.vips
                .iter()
                .map(move |v| ((SocketAddr::new(*v, s.port), s.protocol.is_udp()), i))
        })
        .collect();
    for (i, s) in services.iter().enumerate() {
        for (b, span) in s.backends.iter().zip(&spans[i].backends) {
            if let Some(j) = vips.get(&(*b, s.protocol.is_udp())) {
                return Err(at.err(
                    Some(span.clone()),
                    format!(
                        "{}: {b} is the VIP of service[{j}] ({}); backends are real endpoints \
                         (the datapath translates once)",
                        label(i, "backends"),
                        services[*j].full_name()
                    ),
                ));
            }
        }
    }
    capacity(at, services, spans, sizes)
}

/// What one service adds to the BACKENDS map: its serve and proxy endpoints of its VIPs'
/// families (the others are never programmed), or for a scaled service its instances at
/// `max_scale` (one address per VIP family each, all distinct).
fn endpoints(s: &ServiceConfig) -> (BTreeSet<SocketAddr>, usize) {
    let families: BTreeSet<bool> = s.vips.iter().map(|v| v.is_ipv4()).collect();
    let of_vips = |a: &&SocketAddr| families.contains(&a.is_ipv4());
    let mut set: BTreeSet<SocketAddr> = s.activators.iter().filter(of_vips).copied().collect();
    let instances = match &s.scale {
        Some(sc) => sc.max_scale as usize * families.len(),
        None => {
            set.extend(s.backends.iter().filter(of_vips));
            0
        }
    };
    (set, instances)
}

fn capacity(
    at: &At<'_>,
    services: &[ServiceConfig],
    spans: &[Spans],
    sizes: &MapSizes,
) -> Result<(), ConfigError> {
    let mut entries = 0usize;
    let mut distinct: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut instances = 0usize;
    for (i, s) in services.iter().enumerate() {
        for span in &spans[i].vips {
            entries += 1;
            if entries > sizes.services as usize {
                return Err(at.err(
                    Some(span.clone()),
                    format!(
                        "service[{i}] ({}).vip: service entry {entries} (one per VIP); the maps \
                         hold {} (raise maps.services)",
                        s.name, sizes.services
                    ),
                ));
            }
        }
        let (set, n) = endpoints(s);
        distinct.extend(set);
        instances += n;
        let total = distinct.len() + instances;
        if total > sizes.backends as usize {
            let span = spans[i]
                .scale
                .clone()
                .or_else(|| spans[i].backends.first().cloned())
                .unwrap_or_else(|| spans[i].name.clone());
            return Err(at.err(
                Some(span),
                format!(
                    "service[{i}] ({}).backends: {total} distinct backends and activators so \
                     far (scaled services at max_scale); the maps hold {} (raise \
                     maps.backends)",
                    s.name, sizes.backends
                ),
            ));
        }
    }
    Ok(())
}
