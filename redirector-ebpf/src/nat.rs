//! The NAT core shared by every program: conntrack lookup, service lookup, target choice
//! (Maglev for Serve, the activator for Proxy) and conntrack creation. It decides the
//! rewrite; the XDP and tc programs apply it with the checksum method their hook allows.
use core::cmp::min;

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use redirector_common::{
    ct_time, CtKey, CtValue, DatapathConfig, Endpoint, MaglevKey, ServiceKey, ServiceValue,
    CLOCK_EPOCH_NS, CONFIG_KEY, CT_CLOSING, CT_FIN, CT_HAIRPIN, CT_PROXIED, CT_REFRESH_JIFFIES,
    CT_REPLY, CT_SEEN_REPLY, CT_SYN_TIMEOUT_NS, G_BIG_TCP, G_CT_FULL, G_HAIRPIN, G_NAT_FORWARD,
    G_NAT_REPLY, G_NO_BACKEND, MAGLEV_M, MAGLEV_M_SMALL, MODE_PROXY, PROTO_TCP, SET_PROXY,
    SET_SERVE, SVC_ENDPOINT, SVC_PROXY_SMALL, SVC_SERVE_SMALL,
};

use crate::{
    maps::{
        count, BACKENDS, CONFIG, CONNTRACK, CONNTRACK_PREV, MAGLEV, MAGLEV_SMALL, SERVICES,
        SERVICE_STATS,
    },
    parse::{cold, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const SECOND: u64 = 1_000_000_000;

/// Set by the agent to 0 on kernels without `bpf_ktime_get_coarse_ns` (before 5.11): a
/// read-only global, so the verifier prunes the call the kernel does not have.
#[no_mangle]
static CLOCK_COARSE: u32 = 1;

/// The datapath clock, what `CtValue::last_seen` holds: CLOCK_MONOTONIC_COARSE (or
/// CLOCK_MONOTONIC, see `CLOCK_COARSE`) plus `CLOCK_EPOCH_NS`; the agent reads the same.
#[inline(always)]
fn clock() -> u64 {
    // SAFETY: helpers without arguments; the global is only read.
    let raw = unsafe {
        if core::ptr::read_volatile(&CLOCK_COARSE) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    };
    raw + CLOCK_EPOCH_NS
}

#[inline(always)]
fn config() -> DatapathConfig {
    match CONFIG.get(CONFIG_KEY) {
        Some(c) if c.tcp_timeout_ns != 0 => *c,
        _ => DatapathConfig::default(),
    }
}

#[inline(always)]
fn timeout(cfg: &DatapathConfig, proto: u8, flags: u16) -> u64 {
    if flags & CT_CLOSING != 0 {
        cfg.closing_timeout_ns
    } else if proto == PROTO_TCP && flags & CT_SEEN_REPLY == 0 {
        // Never answered: a SYN to a target that is gone.
        min(CT_SYN_TIMEOUT_NS, cfg.tcp_timeout_ns)
    } else if proto == PROTO_TCP {
        cfg.tcp_timeout_ns
    } else {
        cfg.udp_timeout_ns
    }
}

/// Decides what happens to a parsed packet: the tuple to rewrite it to, or `None` to pass
/// it as it is.
///
/// Where each direction is translated: ingress hooks (`egress` false) start flows and
/// translate the original direction, and both directions of hairpinned flows (which they
/// bounce straight back, past the node's stack). A reply of any other flow passes ingress
/// untranslated, so that the node's netfilter conntrack and rp_filter see the tuple the
/// request left with (target → client); egress (`egress` true, after netfilter) gives it
/// the VIP as source, and never translates anything else or starts a flow. An ingress hook
/// may still take a reply it can deliver past the stack itself: `take_reply` is asked
/// (tc ingress with `host_routing = "bpf"`, when the reply's route leads to a pod veth).
///
/// The rewrite is returned by value, never written through a pointer: a copy into a
/// `&mut CtValue` (or its zeroing) compiles to calls of the byte-at-a-time `memmove` /
/// `memset` of compiler-builtins, hundreds of instructions per packet. The object test
/// `no_mem_calls_in_programs` fails the build on any such call.
#[inline(always)]
pub fn decide(
    p: &Parsed,
    egress: bool,
    take_reply: impl FnOnce(&CtValue) -> bool,
) -> Option<CtValue> {
    // The verifier inlines this helper into one load of `jiffies`; the clock itself (a
    // real helper call, ~40 ns per packet in the kept-alive benchmark) is read only on the
    // rare paths below.
    let jiffies = unsafe { bpf_jiffies64() } as u32;
    let is_tcp = p.key.proto == PROTO_TCP;
    let ct = match CONNTRACK.get_ptr_mut(&p.key) {
        Some(ct) => Some(ct),
        None => from_prev(&p.key),
    };
    if let Some(ct) = ct {
        // SAFETY: LRU value; concurrent writers only touch `flags`, `seen_jiffies` and
        // `last_seen`, and a torn read of those is harmless (they are hints).
        let v = unsafe { *ct };
        // Egress applies exactly the reply entries of flows that are not hairpinned; ingress
        // everything else (and such a reply only if it delivers it itself).
        let late_reply = v.flags & (CT_REPLY | CT_HAIRPIN) == CT_REPLY;
        if late_reply != egress && (egress || !take_reply(&v)) {
            return None;
        }
        // An entry is refreshed every `CT_REFRESH_JIFFIES` (at most a second) while packets
        // flow, and timeouts are whole seconds of at least one (the agent refuses less):
        // only an entry not refreshed for that long can have expired, so only then are the
        // clock and the config read. (`wrapping_sub`: `seen_jiffies` is jiffies' low half.)
        let stale = jiffies.wrapping_sub(v.seen_jiffies) >= CT_REFRESH_JIFFIES;
        let mut now = 0;
        let mut expired = false;
        if stale {
            cold();
            now = clock();
            let idle = now.saturating_sub(ct_time(v.last_seen));
            expired = idle > SECOND && idle > timeout(&config(), p.key.proto, v.flags);
        }
        let is_reply = v.flags & CT_REPLY != 0;
        let bare_syn = is_tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if expired && bare_syn {
            cold();
        } else if expired && is_tcp && v.flags & (CT_FIN | CT_CLOSING) != 0 {
            // A straggler of a flow that closed (or half-closed) long ago, e.g. a
            // retransmitted last ACK: it keeps its target. Only a bare SYN starts a new
            // connection on the tuple.
            cold();
            expired = false;
        }
        // A bare SYN on a flow that was answered, or that the client closed, is a new
        // connection reusing the client port: it follows the current mode. (A SYN
        // retransmitted before any reply stays pinned.)
        let reopened =
            bare_syn && !is_reply && v.flags & (CT_CLOSING | CT_SEEN_REPLY | CT_FIN) != 0;
        if !expired && !reopened {
            let mut flags = v.flags;
            if is_reply {
                flags |= CT_SEEN_REPLY;
            }
            // FIN: this direction is done (the flow closes once both are). RST: closed.
            // Either is news only once per entry (a retransmitted FIN is not).
            let closes = is_tcp
                && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
                && v.flags & CT_CLOSING == 0
                && (p.tcp_flags & TCP_RST != 0 || v.flags & CT_FIN == 0);
            // First reply, the flow closing, or the entry's periodic refresh: the flow's
            // other entry hears of it (and is put back if the LRU evicted it).
            if flags != v.flags || closes || stale {
                cold();
                if now == 0 {
                    now = clock();
                }
                let tcp_flags = if closes { p.tcp_flags } else { 0 };
                flags = sync_partner(&p.key, &v, flags, tcp_flags, now, jiffies);
                unsafe {
                    (*ct).flags = flags;
                    (*ct).last_seen = now;
                    (*ct).seen_jiffies = jiffies;
                }
            }
            if p.big {
                cold();
                count(G_BIG_TCP);
            }
            account(v.svc_id, p.ip_len, is_reply, false, false);
            count(if is_reply { G_NAT_REPLY } else { G_NAT_FORWARD });
            return Some(v);
        }
        // Expired, or a new connection on the same tuple.
        cold();
        if egress {
            return None;
        }
        let opened = open_flow(p, jiffies);
        if opened.is_none() {
            // No flow opened in its place (the address is no service any more, or a real
            // endpoint's entry was deleted by a flip back to Serve): the old flow's entry
            // must not give this connection's next packets the old target.
            let _ = CONNTRACK.remove(&p.key);
        }
        return opened;
    }
    if egress {
        return None;
    }
    open_flow(p, jiffies)
}

/// During a conntrack resize: the entry `k` of the previous conntrack, moved into
/// `CONNTRACK` (the old programs created it after the agent copied the old map, or a
/// resize is switching links right now). `None` outside a resize.
#[inline(always)]
fn from_prev(k: &CtKey) -> Option<*mut CtValue> {
    let prev = CONNTRACK_PREV.get(0)?;
    cold();
    // SAFETY: LRU value copied out at once (its hints may be torn, see `decide`).
    let v = unsafe { *prev.get(k)? };
    CONNTRACK.insert(k, &v, 0).ok()?;
    CONNTRACK.get_ptr_mut(k)
}

/// A packet without conntrack state: if its destination is a service, picks the target,
/// creates the flow's two conntrack entries and returns the rewrite.
#[inline(always)]
fn open_flow(p: &Parsed, jiffies: u32) -> Option<CtValue> {
    let skey = ServiceKey {
        addr: p.key.daddr,
        port: p.key.dport,
        proto: p.key.proto,
        family: p.key.family,
    };
    let svc = unsafe { SERVICES.get(&skey) }?;
    // A service's first packet of a flow: rare next to the flow's others.
    cold();
    // A FIN or RST belongs to a flow that is over (a new target would only reset it), and
    // a BIG TCP packet to one well under way: neither starts a flow.
    if p.big || (p.key.proto == PROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0) {
        if p.big {
            count(G_BIG_TCP);
        }
        return None;
    }
    // One copy: the agent may replace the element while we read it.
    let svc = *svc;
    // A real endpoint's address: a packet of a connection made to it directly (not a new
    // one) is not ours.
    if svc.flags & SVC_ENDPOINT != 0
        && p.key.proto == PROTO_TCP
        && p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return None;
    }
    new_flow(p, &svc, jiffies)
}

/// Keeps the flow's two entries in step, from the entry `k` → `v` whose flags become
/// `flags` (returned, with what `tcp_flags` adds: FIN and RST, 0 for none): the other
/// entry (the partner, keyed by `v`'s rewrite reversed) learns that a reply was seen and
/// that the flow is closing, which it is at a RST or once both directions sent a FIN (the
/// partner's `CT_FIN`). A partner the LRU evicted (or the agent swept: a one-way flow
/// leaves its other entry idle) is put back, built from `k` and `v`, so a flow is never
/// left with one entry: the reply of a flow without its reply entry would leave with the
/// target's address, and a flow without its forward entry would be picked again.
///
/// Two FINs crossing on two CPUs may each miss the other's `CT_FIN`: the flow then keeps
/// the established timeout instead of the closing one (a later bare SYN still starts a new
/// connection: `CT_FIN` allows that on its own).
#[inline(always)]
fn sync_partner(
    k: &CtKey,
    v: &CtValue,
    mut flags: u16,
    tcp_flags: u8,
    now: u64,
    jiffies: u32,
) -> u16 {
    let pkey = CtKey {
        saddr: v.nat_daddr,
        daddr: v.nat_saddr,
        sport: v.nat_dport,
        dport: v.nat_sport,
        proto: k.proto,
        family: k.family,
        _pad: 0,
    };
    if tcp_flags & TCP_FIN != 0 {
        flags |= CT_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= CT_CLOSING;
    }
    let found = match CONNTRACK.get_ptr_mut(&pkey) {
        Some(f) => Some(f),
        None => from_prev(&pkey),
    };
    if let Some(f) = found {
        // SAFETY: LRU value; flag and timestamp updates are hints (see `decide`).
        unsafe {
            // The tuple may belong to a newer flow by now (the client reopened it after
            // this one closed, to another target): that one is not ours to touch.
            if (*f).nat_daddr != k.saddr
                || (*f).nat_saddr != k.daddr
                || (*f).nat_dport != k.sport
                || (*f).nat_sport != k.dport
            {
                return flags;
            }
            let theirs = (*f).flags;
            if flags & CT_FIN != 0 && theirs & CT_FIN != 0 {
                flags |= CT_CLOSING;
            }
            let want = theirs | (flags & (CT_SEEN_REPLY | CT_CLOSING));
            if want != theirs {
                (*f).flags = want;
                if want & CT_CLOSING != theirs & CT_CLOSING {
                    (*f).last_seen = now;
                    (*f).seen_jiffies = jiffies;
                }
            }
        }
    } else {
        cold();
        let partner = CtValue {
            nat_saddr: k.daddr,
            nat_daddr: k.saddr,
            nat_sport: k.dport,
            nat_dport: k.sport,
            svc_id: v.svc_id,
            flags: (flags ^ CT_REPLY)
                & (CT_REPLY | CT_PROXIED | CT_HAIRPIN | CT_SEEN_REPLY | CT_CLOSING),
            seen_jiffies: jiffies,
            last_seen: now,
            ..CtValue::default()
        };
        if CONNTRACK.insert(&pkey, &partner, 0).is_err() {
            count(G_CT_FULL);
        }
    }
    flags
}

/// Picks the target of a new flow of `svc`, creates the two conntrack entries and returns
/// the rewrite. `None`: no usable target (the packet passes unchanged).
#[inline(always)]
fn new_flow(p: &Parsed, svc: &ServiceValue, jiffies: u32) -> Option<CtValue> {
    let now = clock();
    let (target, proxied) = pick_target(svc, &p.key)?;
    let hairpin = target.addr == p.key.saddr;
    let mut flags = 0;
    if proxied {
        flags |= CT_PROXIED;
    }
    if hairpin {
        flags |= CT_HAIRPIN;
        count(G_HAIRPIN);
    }
    // A hairpinned flow must come back through us: its source becomes the VIP.
    let client_as_seen = if hairpin { p.key.daddr } else { p.key.saddr };
    let fwd = CtValue {
        nat_saddr: client_as_seen,
        nat_daddr: target.addr,
        nat_sport: p.key.sport,
        nat_dport: target.port,
        svc_id: svc.id,
        flags,
        seen_jiffies: jiffies,
        last_seen: now,
        ..CtValue::default()
    };
    let rkey = CtKey {
        saddr: target.addr,
        daddr: client_as_seen,
        sport: target.port,
        dport: p.key.sport,
        proto: p.key.proto,
        family: p.key.family,
        _pad: 0,
    };
    let rev = CtValue {
        nat_saddr: p.key.daddr,
        nat_daddr: p.key.saddr,
        nat_sport: p.key.dport,
        nat_dport: p.key.sport,
        svc_id: svc.id,
        flags: flags | CT_REPLY,
        seen_jiffies: jiffies,
        last_seen: now,
        ..CtValue::default()
    };
    // Reply entry first: a reply can never arrive before its translation exists.
    if CONNTRACK.insert(&rkey, &rev, 0).is_err() || CONNTRACK.insert(&p.key, &fwd, 0).is_err() {
        count(G_CT_FULL);
    }
    // During a resize the old programs may see this flow's next packets: give them it too.
    if let Some(prev) = CONNTRACK_PREV.get(0) {
        cold();
        let _ = prev.insert(&rkey, &rev, 0);
        let _ = prev.insert(&p.key, &fwd, 0);
    }
    account(svc.id, p.ip_len, false, true, proxied);
    count(G_NAT_FORWARD);
    Some(fwd)
}

/// The target of a new flow of `svc` and whether it is an activator: the Maglev pick among
/// the Serve backends, or (Proxy, or Serve without backends) the activator pool's pick or
/// the node-local activator. `k` is hashed for the pick. `None` (counted): no usable target
/// of the flow's family. Shared by the packet path and the socket hooks, so both make the
/// same decision from the same maps.
#[inline(always)]
pub fn pick_target(svc: &ServiceValue, k: &CtKey) -> Option<(Endpoint, bool)> {
    let proxied = is_proxied(svc);
    let target = if proxied {
        if svc.proxy_count > 0 {
            maglev_pick(svc.id, SET_PROXY, svc.flags & SVC_PROXY_SMALL != 0, k)
        } else {
            Some(svc.activator)
        }
    } else {
        maglev_pick(svc.id, SET_SERVE, svc.flags & SVC_SERVE_SMALL != 0, k)
    };
    match target {
        Some(t) if t.family == k.family && t.port != 0 => Some((t, proxied)),
        _ => {
            count(G_NO_BACKEND);
            None
        }
    }
}

/// Whether new flows of `svc` go to an activator: Proxy, or Serve without backends.
#[inline(always)]
pub fn is_proxied(svc: &ServiceValue) -> bool {
    svc.mode == MODE_PROXY || svc.backend_count == 0
}

/// Flow hash: stable for a flow's lifetime so that a packet without conntrack state (e.g.
/// a lost entry) still maps to the same Maglev slot while the backend set is unchanged.
#[inline(always)]
fn flow_hash(k: &CtKey) -> u32 {
    let mut h: u32 = 0x9e37_79b9 ^ (k.proto as u32);
    let words = [
        k.saddr[0],
        k.saddr[1],
        k.saddr[2],
        k.saddr[3],
        ((k.sport as u32) << 16) | k.dport as u32,
    ];
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
    }
    h
}

/// The backend for flow `k` from the set's Maglev table: `MAGLEV_SMALL` (239 slots) when
/// `small`, else `MAGLEV` (997 slots).
#[inline(always)]
fn maglev_pick(svc_id: u32, set: u32, small: bool, k: &CtKey) -> Option<Endpoint> {
    let key = MaglevKey { svc_id, set };
    let h = flow_hash(k);
    let backend = if small {
        let table = MAGLEV_SMALL.get_ptr(key)?;
        // SAFETY: `slot` checked below; hash values are replaced atomically (NO_PREALLOC).
        unsafe { (*table).slots[bounded(h % MAGLEV_M_SMALL as u32, MAGLEV_M_SMALL)?] }
    } else {
        let table = MAGLEV.get_ptr(key)?;
        // SAFETY: as above.
        unsafe { (*table).slots[bounded(h % MAGLEV_M as u32, MAGLEV_M)?] }
    };
    BACKENDS.get(backend).copied()
}

/// `v` as an index below `m`. The compiler knows `v < m` after a `%` and would drop the
/// check; the verifier does not know it. Launder the value so the check stays.
#[inline(always)]
fn bounded(v: u32, m: usize) -> Option<usize> {
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&(v as usize)) };
    (slot < m).then_some(slot)
}

#[inline(always)]
pub fn account(svc_id: u32, bytes: u32, reply: bool, new: bool, proxied: bool) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            if reply {
                (*s).reply_packets += 1;
                (*s).reply_bytes += bytes as u64;
            } else {
                (*s).packets += 1;
                (*s).bytes += bytes as u64;
            }
            if new {
                (*s).new_flows += 1;
                if proxied {
                    (*s).proxied_flows += 1;
                }
            }
        }
    }
}
