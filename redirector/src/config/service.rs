//! One `[[service]]` entry: parsed and checked on its own (addresses, ports, families, set
//! sizes, the scale section), so that whatever `check` accepts the datapath can hold as
//! written: nothing is dropped or cut silently later.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    ops::Range,
    time::Duration,
};

use redirector_common::MAGLEV_M;
use toml::Spanned;

use super::{
    parse_sockaddr, spanned_items, At, ConfigError, Protocol, RawService, Readiness, ScaleConfig,
    ServiceConfig,
};

/// Where a service's fields are in the file (for the checks that span services).
#[derive(Debug, Clone)]
pub(super) struct Spans {
    pub name: Range<usize>,
    pub vips: Vec<Range<usize>>,
    pub backends: Vec<Range<usize>>,
    pub scale: Option<Range<usize>>,
}

/// Longest timeout accepted anywhere (100 years): its nanoseconds plus the datapath clock's
/// epoch still fit in a u64.
pub(super) const MAX_TIMEOUT_SECS: u64 = 100 * 365 * 86_400;

/// VIP:port:L4 protocol → the service that has it.
pub(super) type Seen = HashMap<(IpAddr, u16, bool), String>;

/// Parses service `i`; `seen` collects its VIP:port:protocol keys.
pub(super) fn parse(
    at: &At<'_>,
    i: usize,
    s: RawService,
    seen: &mut Seen,
) -> Result<(ServiceConfig, Spans), ConfigError> {
    let label = format!("service[{i}] ({})", s.name.get_ref());
    let field = |f: &str| format!("{label}.{f}");
    let name_span = s.name.span();
    if s.name.get_ref().is_empty() {
        return Err(at.err(
            Some(name_span),
            format!("service[{i}].name: must not be empty"),
        ));
    }
    let port = *s.port.get_ref();
    if port == 0 {
        return Err(at.err(
            Some(s.port.span()),
            format!("{}: must not be 0", field("port")),
        ));
    }
    let udp = s.protocol.is_udp();
    let mut vips = Vec::new();
    let mut vip_spans = Vec::new();
    for (span, v) in spanned_items(s.vip) {
        let ip: IpAddr = v.parse().map_err(|_| {
            at.err(
                Some(span.clone()),
                format!("{}: {v:?} is not an IP address", field("vip")),
            )
        })?;
        let full = match &s.namespace {
            Some(ns) => format!("{ns}/{}", s.name.get_ref()),
            None => s.name.get_ref().clone(),
        };
        if let Some(other) = seen.insert((ip, port, udp), full) {
            return Err(at.err(
                Some(span),
                format!(
                    "{}: {ip} port {port}/{} is used by service {other} (one VIP:port:protocol \
                     leads to one service, whatever it speaks above TCP)",
                    field("vip"),
                    if udp { "udp" } else { "tcp" }
                ),
            ));
        }
        vips.push(ip);
        vip_spans.push(span);
    }
    if vips.is_empty() {
        return Err(at.err(
            Some(name_span),
            format!("{}: at least one VIP", field("vip")),
        ));
    }
    let (backends, backend_spans) = endpoints(at, s.backends, &field("backends"), &vips)?;
    let (activators, _) = endpoints(at, s.activators, &field("activators"), &vips)?;
    // A VIP whose family has no backend would sit in Serve with none.
    if !backends.is_empty() && s.scale.is_none() {
        for (vip, span) in vips.iter().zip(&vip_spans) {
            if !backends.iter().any(|b| b.is_ipv4() == vip.is_ipv4()) {
                return Err(at.err(
                    Some(span.clone()),
                    format!(
                        "{}: {vip} has no IPv{} backend (the backends are all IPv{})",
                        field("vip"),
                        if vip.is_ipv4() { 4 } else { 6 },
                        if vip.is_ipv4() { 6 } else { 4 }
                    ),
                ));
            }
        }
    }
    let scale_span = s.scale.as_ref().map(Spanned::span);
    let scale = match s.scale {
        None => None,
        Some(sc) => Some(scale(at, sc, &field, s.protocol)?),
    };
    let timeout = match s.timeout_secs {
        None => Duration::from_secs(30),
        Some(t) => duration(at, &t, &field("timeout_secs"))?,
    };
    Ok((
        ServiceConfig {
            name: s.name.into_inner(),
            namespace: s.namespace,
            vips,
            port,
            protocol: s.protocol,
            mode: s.mode,
            backends,
            activators,
            timeout,
            scale,
        },
        Spans {
            name: name_span,
            vips: vip_spans,
            backends: backend_spans,
            scale: scale_span,
        },
    ))
}

/// A positive, finite number of seconds no longer than `MAX_TIMEOUT_SECS`.
pub(super) fn duration(
    at: &At<'_>,
    v: &Spanned<f64>,
    field: &str,
) -> Result<Duration, ConfigError> {
    let secs = *v.get_ref();
    if !(secs.is_finite() && secs >= 0.0 && secs <= MAX_TIMEOUT_SECS as f64) {
        return Err(at.err(
            Some(v.span()),
            format!("{field}: {secs} is not a duration in 0..={MAX_TIMEOUT_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Backends or activators: addresses with a port and without an IPv6 zone, not one of the
/// service's own VIPs, at most `MAGLEV_M` of each family.
fn endpoints(
    at: &At<'_>,
    items: Vec<Spanned<String>>,
    field: &str,
    vips: &[IpAddr],
) -> Result<(Vec<SocketAddr>, Vec<Range<usize>>), ConfigError> {
    let mut out = Vec::with_capacity(items.len());
    let mut spans = Vec::with_capacity(items.len());
    for b in items {
        let span = b.span();
        let sa = parse_sockaddr(b.get_ref())
            .map_err(|m| at.err(Some(span.clone()), format!("{field}: {m}")))?;
        if let SocketAddr::V6(v6) = sa {
            if v6.scope_id() != 0 || b.get_ref().contains('%') {
                return Err(at.err(
                    Some(span),
                    format!(
                        "{field}: {:?} has an IPv6 zone: the datapath keeps no zone (use a \
                         global or unique-local address)",
                        b.get_ref()
                    ),
                ));
            }
        }
        if vips.contains(&sa.ip()) {
            return Err(at.err(
                Some(span),
                format!("{field}: {sa} is one of the service's own VIPs (a loop)"),
            ));
        }
        out.push(sa);
        spans.push(span);
    }
    for v4 in [true, false] {
        let distinct: std::collections::BTreeSet<_> =
            out.iter().filter(|a| a.is_ipv4() == v4).collect();
        if distinct.len() > MAGLEV_M {
            return Err(at.err(
                spans.first().cloned(),
                format!(
                    "{field}: {} IPv{} addresses; a set holds at most {MAGLEV_M} (the Maglev \
                     table's size)",
                    distinct.len(),
                    if v4 { 4 } else { 6 }
                ),
            ));
        }
    }
    Ok((out, spans))
}

fn scale(
    at: &At<'_>,
    sc: Spanned<super::RawScale>,
    field: &dyn Fn(&str) -> String,
    protocol: Protocol,
) -> Result<ScaleConfig, ConfigError> {
    let span = sc.span();
    let sc = sc.into_inner();
    let readiness = match sc.readiness {
        None => Readiness::Tcp,
        Some(r) => match r.get_ref().as_str() {
            "tcp" => Readiness::Tcp,
            p if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) => {
                Readiness::Http(p.to_owned())
            }
            other => {
                return Err(at.err(
                    Some(r.span()),
                    format!(
                        "{}: {other:?} is neither \"tcp\" nor an HTTP path like \"/healthz\" \
                         (visible ASCII, no spaces or line breaks)",
                        field("scale.readiness")
                    ),
                ))
            }
        },
    };
    if sc.max_scale == 0 || sc.min_scale > sc.max_scale {
        return Err(at.err(
            Some(span),
            format!(
                "{}: need 0 <= min_scale <= max_scale, max_scale >= 1",
                field("scale")
            ),
        ));
    }
    if sc.max_scale as usize > MAGLEV_M {
        return Err(at.err(
            Some(span),
            format!(
                "{}: {} instances; a service's backends are at most {MAGLEV_M} (the Maglev \
                 table's size)",
                field("scale.max_scale"),
                sc.max_scale
            ),
        ));
    }
    let port = *sc.port.get_ref();
    if port == 0 {
        return Err(at.err(
            Some(sc.port.span()),
            format!("{}: must not be 0", field("scale.port")),
        ));
    }
    let target = match &sc.target_concurrency {
        None => 100.0,
        Some(t) => {
            let v = *t.get_ref();
            if !(v.is_finite() && v > 0.0) {
                return Err(at.err(
                    Some(t.span()),
                    format!(
                        "{}: {v} is not a finite number > 0",
                        field("scale.target_concurrency")
                    ),
                ));
            }
            v
        }
    };
    let burst = match &sc.target_burst_capacity {
        None => 0.0,
        Some(t) if t.get_ref().is_nan() => {
            return Err(at.err(
                Some(t.span()),
                format!("{}: not a number", field("scale.target_burst_capacity")),
            ))
        }
        Some(t) => *t.get_ref(),
    };
    if protocol.is_udp() {
        return Err(at.err(
            Some(span),
            format!(
                "{}: UDP services can't scale to zero (nothing to hold)",
                field("scale")
            ),
        ));
    }
    let secs = |v: &Option<Spanned<f64>>, default: f64, f: &str| match v {
        None => Ok(Duration::from_secs_f64(default)),
        Some(v) => duration(at, v, &field(f)),
    };
    Ok(ScaleConfig {
        command: sc.command,
        args: sc.args,
        port,
        min_scale: sc.min_scale,
        max_scale: sc.max_scale,
        container_concurrency: sc.container_concurrency,
        target_concurrency: target,
        target_burst_capacity: burst,
        idle_timeout: secs(&sc.idle_timeout_secs, 30.0, "scale.idle_timeout_secs")?,
        stable_window: secs(&sc.stable_window_secs, 10.0, "scale.stable_window_secs")?,
        startup_timeout: secs(
            &sc.startup_timeout_secs,
            super::DEFAULT_STARTUP_TIMEOUT_SECS,
            "scale.startup_timeout_secs",
        )?,
        readiness,
        env: sc.env.into_iter().collect(),
    })
}
