//! `sk_lookup` on the node's network namespace: a TCP connection to the node-local
//! activator's address, on its listener's port or one of the per-service ports
//! (`ACT_PORTS`), is handed to the activator's one listening socket (`ACT_SOCKS`), which then
//! sees the port it was sent to as its local address and knows the service from it. With
//! `ACT_GUARDED` the listener is bound to loopback, and only a connection the datapath
//! delivered is handed to it: the packet path's (a conntrack reply entry leads back from
//! this tuple) or the socket hooks' (`ACT_ADMIT`). Anything else is left to the kernel's own
//! lookup, which finds no socket on that address: a request made to the activator's address
//! directly, from outside the node or from a pod, is refused.
use aya_ebpf::programs::SkLookupContext;
use redirector_common::{
    CtKey, ACT_GUARDED, ACT_V4, ACT_V6, FAMILY_V4, FAMILY_V6, G_ACT_REFUSED, PROTO_TCP,
};

use crate::maps::{count, ACT_ADMIT, ACT_PORTS, ACT_SOCKS, CONNTRACK, CONNTRACK_PREV};

/// `SK_PASS`: go on (with the socket assigned, if one was).
pub const SK_PASS: u32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
pub fn run(ctx: &SkLookupContext) -> u32 {
    let _ = try_steer(ctx);
    SK_PASS
}

#[inline(always)]
fn try_steer(ctx: &SkLookupContext) -> Option<()> {
    let l = ctx.lookup;
    // SAFETY: context field reads, valid for the program's lifetime.
    let (family, proto, port) = unsafe { ((*l).family, (*l).protocol, (*l).local_port) };
    if proto != PROTO_TCP as u32 {
        return None;
    }
    let idx = match family {
        AF_INET => ACT_V4,
        AF_INET6 => ACT_V6,
        _ => return None,
    };
    let cfg = ACT_PORTS.get(idx)?;
    let first = cfg.first as u32;
    let per_service = port >= first && port < first + cfg.count as u32;
    if !per_service && (cfg.listen == 0 || port != cfg.listen as u32) {
        return None;
    }
    let (local, remote, remote_port) = read_tuple(ctx, idx == ACT_V4);
    if local != cfg.addr {
        return None;
    }
    if cfg.flags & ACT_GUARDED != 0 {
        // The tuple as the activator's side sees it, ports in network byte order.
        let key = CtKey {
            saddr: local,
            daddr: remote,
            sport: (port as u16).to_be(),
            dport: remote_port,
            proto: PROTO_TCP,
            family: if idx == ACT_V4 { FAMILY_V4 } else { FAMILY_V6 },
            _pad: 0,
        };
        if !delivered(&key) {
            count(G_ACT_REFUSED);
            return None;
        }
    }
    ACT_SOCKS.redirect_sk_lookup(ctx, idx, 0).ok()
}

/// (local address, remote address, remote port in network byte order) of the lookup. Both
/// families' fields are read unconditionally, each at its fixed offset: a load whose
/// address depends on the family would be a modified context pointer to the verifier.
#[inline(always)]
fn read_tuple(ctx: &SkLookupContext, v4: bool) -> ([u32; 4], [u32; 4], u16) {
    let l = ctx.lookup;
    // SAFETY: context field reads (`remote_port` is a 16-bit field in network byte order).
    let (l4, r4, l6, r6, port) = unsafe {
        (
            core::ptr::read_volatile(&(*l).local_ip4),
            core::ptr::read_volatile(&(*l).remote_ip4),
            [
                core::ptr::read_volatile(&(*l).local_ip6[0]),
                core::ptr::read_volatile(&(*l).local_ip6[1]),
                core::ptr::read_volatile(&(*l).local_ip6[2]),
                core::ptr::read_volatile(&(*l).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*l).remote_ip6[0]),
                core::ptr::read_volatile(&(*l).remote_ip6[1]),
                core::ptr::read_volatile(&(*l).remote_ip6[2]),
                core::ptr::read_volatile(&(*l).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*l).remote_port),
        )
    };
    if v4 {
        ([l4, 0, 0, 0], [r4, 0, 0, 0], port)
    } else {
        (l6, r6, port)
    }
}

/// Whether the datapath made the flow `k` (activator → client): the socket hooks admitted
/// its client's `connect()` (keyed client → activator), or the packet path translated it
/// (its reply entry is keyed activator → client, also in the previous conntrack during a
/// resize).
#[inline(always)]
fn delivered(k: &CtKey) -> bool {
    let admit = CtKey {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        ..*k
    };
    // SAFETY: map lookups; only presence is read.
    unsafe {
        if ACT_ADMIT.get(&admit).is_some() || CONNTRACK.get(k).is_some() {
            return true;
        }
        match CONNTRACK_PREV.get(0) {
            Some(prev) => prev.get(k).is_some(),
            None => false,
        }
    }
}
