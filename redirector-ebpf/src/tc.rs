//! tc (TCX) on pod-facing interfaces and on egress. Ingress: DNAT of pod-originated VIP
//! traffic and hairpin. Egress (pod-facing interfaces and uplinks): reverse NAT of every
//! reply that is not hairpinned, after the node's netfilter and routing saw it with its
//! real tuple (see `nat::decide`), whether it was forwarded or generated on the node (the
//! node-local activator). Checksums are updated in place or through the skb-aware helpers.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT,
        TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_probe_read_kernel, bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use redirector_common::{
    CtValue, CT_HAIRPIN, CT_REPLY, G_MALFORMED, G_PACKETS, G_REWRITE_FAILED, HOOKED_SLOTS,
    PROTO_UDP,
};

use crate::{
    csum,
    maps::{count, PEERS},
    nat::decide,
    parse::{cold, load, parse, store, Parsed, ETH_LEN, IPV6_LEN, TCP_LEN},
};

/// `TC_ACT_UNSPEC`, which TCX calls `TCX_NEXT`: the next program on the hook (e.g. a CNI's)
/// still sees the packet, and with none left the stack carries on as usual.
pub const TC_NEXT: i32 = -1;

/// Runs the NAT core on an skb. `ingress`: new flows start here and the original direction
/// is translated (pod-facing ingress); egress translates replies (see `nat::decide`).
#[inline(always)]
pub fn run(ctx: &TcContext, ingress: bool) -> i32 {
    count(G_PACKETS);
    let len = ctx.len() as usize;
    let mut parsed = parse(ctx.data(), ctx.data_end(), len);
    // The headers reach past the linear part (the rest in page fragments): pull just the
    // headers in and parse again. Never up front: pulling a cloned skb (every TCP data
    // segment is one, its payload shared with the retransmit queue) reallocates its head.
    if matches!(parsed, Err(G_MALFORMED)) && ctx.data() + len > ctx.data_end() {
        cold();
        let want = ETH_LEN + IPV6_LEN + TCP_LEN;
        let _ = ctx.pull_data(if len < want { len } else { want } as u32);
        parsed = parse(ctx.data(), ctx.data_end(), len);
    }
    let p = match parsed {
        Ok(p) => p,
        Err(c) => {
            cold();
            count(c);
            return TC_NEXT;
        }
    };
    // SAFETY: reading a global.
    let bpf_routing = ingress && unsafe { core::ptr::read_volatile(&HOST_ROUTING_BPF) } != 0;
    // With host routing in BPF, a reply whose route leads to a pod veth is translated and
    // handed over here: the node's stack (netfilter included) never sees it, as it never
    // saw the request. Any other reply is left to egress.
    let mut route = None;
    let take_reply = |v: &CtValue| {
        if !bpf_routing {
            return false;
        }
        cold();
        route = peer_route(ctx, &p, v);
        route.is_some()
    };
    let Some(to) = decide(&p, !ingress, take_reply) else {
        return TC_NEXT;
    };
    if try_rewrite(ctx, &p, &to).is_err() {
        cold();
        count(G_REWRITE_FAILED);
        return TC_ACT_SHOT as i32;
    }
    if ingress && to.flags & CT_HAIRPIN != 0 {
        cold();
        // Back out of the interface it came from: swap MACs and redirect to its egress.
        return hairpin(ctx);
    }
    if bpf_routing {
        let route = if to.flags & CT_REPLY != 0 {
            route
        } else {
            peer_route(ctx, &p, &to)
        };
        if let Some(r) = route.and_then(|r| to_peer(ctx, &p, r)) {
            return r;
        }
    }
    TC_NEXT
}

/// `[node] host_routing = "bpf"`: set by the agent at load time (read-only, so with the
/// default 0 the verifier drops `to_peer`).
#[no_mangle]
static HOST_ROUTING_BPF: u32 = 0;

/// `bpf_fib_lookup` results and families (uapi).
const FIB_SUCCESS: i64 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A pod veth to hand a packet straight to, with the MACs to write (`peer_route`).
#[derive(Clone, Copy)]
struct PeerRoute {
    oif: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}

/// Host routing in BPF for a packet that will be translated to `to`: looks the route up
/// (`bpf_fib_lookup`, which also checks the MTU and wants a resolved neighbour) and returns
/// it when it leaves through a pod interface the agent listed in `PEERS` (a veth whose peer
/// is the pod's) and the TTL / hop limit allows forwarding. `None`: the packet takes the
/// stack's way (no route, neighbour unresolved, too big, TTL expiring, another interface).
#[inline(always)]
fn peer_route(ctx: &TcContext, p: &Parsed, to: &CtValue) -> Option<PeerRoute> {
    let v4 = p.is_v4();
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let ttl = if v4 {
        load::<u8>(data, data_end, ETH_LEN + 8)?
    } else {
        load::<u8>(data, data_end, ETH_LEN + 7)?
    };
    if ttl <= 1 {
        return None;
    }
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Zeroed word by word and filled through the pointer: a struct literal, `zeroed()` or
    // `assume_init()` compiles to a `memset` call.
    let mut fib = core::mem::MaybeUninit::<FibLookup>::uninit();
    let f = fib.as_mut_ptr();
    let words = f.cast::<u64>();
    for i in 0..core::mem::size_of::<FibLookup>() / 8 {
        // SAFETY: within `fib`, which is 8-byte aligned and a multiple of 8 bytes long.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: `f` points to `fib`, every byte of which is initialised above; the helper
    // reads and writes it whole.
    let r = unsafe {
        (*f).family = if v4 { AF_INET } else { AF_INET6 };
        (*f).l4_protocol = p.key.proto;
        (*f).sport = to.nat_sport;
        (*f).dport = to.nat_dport;
        (*f).__bindgen_anon_1.tot_len = p.ip_len as u16;
        (*f).ifindex = ifindex;
        if v4 {
            (*f).__bindgen_anon_3.ipv4_src = to.nat_saddr[0];
            (*f).__bindgen_anon_4.ipv4_dst = to.nat_daddr[0];
        } else {
            (*f).__bindgen_anon_3.ipv6_src = to.nat_saddr;
            (*f).__bindgen_anon_4.ipv6_dst = to.nat_daddr;
        }
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            f,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    if r != FIB_SUCCESS {
        return None;
    }
    // SAFETY: as above.
    let (oif, dmac, smac) = unsafe { ((*f).ifindex, (*f).dmac, (*f).smac) };
    if PEERS.get(oif & (HOOKED_SLOTS - 1)) != Some(&oif) {
        return None;
    }
    Some(PeerRoute { oif, dmac, smac })
}

/// Hands a translated packet to the pod's side of the veth `peer_route` found: writes the
/// MACs, takes one off the TTL / hop limit as forwarding would, and `bpf_redirect_peer`s
/// it, skipping the node's IP stack (routing, netfilter, the neighbour layer, the veth
/// queue). `None`: the headers are not where they were (the packet takes the stack's way).
#[inline(always)]
fn to_peer(ctx: &TcContext, p: &Parsed, r: PeerRoute) -> Option<i32> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if p.is_v4() {
        // TTL and protocol share a 16-bit word of the header checksum.
        let word: u16 = load(data, data_end, ETH_LEN + 8)?;
        let ttl = load::<u8>(data, data_end, ETH_LEN + 8)?;
        if ttl <= 1 {
            return None;
        }
        let ipc: u16 = load(data, data_end, ETH_LEN + 10)?;
        store(data, data_end, ETH_LEN + 8, ttl - 1)?;
        let new_word: u16 = load(data, data_end, ETH_LEN + 8)?;
        let d = csum::diff16(0, word, new_word);
        store(data, data_end, ETH_LEN + 10, csum::apply(ipc, d))?;
    } else {
        let hop = load::<u8>(data, data_end, ETH_LEN + 7)?;
        if hop <= 1 {
            return None;
        }
        store(data, data_end, ETH_LEN + 7, hop - 1)?;
    }
    store(data, data_end, 0, r.dmac)?;
    store(data, data_end, 6, r.smac)?;
    // SAFETY: a helper taking plain values.
    Some(unsafe { bpf_redirect_peer(r.oif, 0) } as i32)
}

#[inline(always)]
fn hairpin(ctx: &TcContext) -> i32 {
    let (Ok(dst), Ok(src)) = (ctx.load::<[u8; 6]>(0), ctx.load::<[u8; 6]>(6)) else {
        return TC_NEXT;
    };
    if ctx.store(0, &src, 0).is_err() || ctx.store(6, &dst, 0).is_err() {
        return TC_NEXT;
    }
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let r = unsafe { bpf_redirect(ifindex, 0) };
    if r == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT as i32
    } else {
        TC_NEXT
    }
}

/// Rewrites the tuple in place. Addresses, ports and the IPv4 header checksum are written
/// directly (the headers are in the linear area, see `run`); the L4 checksum goes through
/// `bpf_l4_csum_replace`, twice at most: the address change as a pseudo-header change
/// (right for CHECKSUM_PARTIAL packets, whose field holds only the pseudo-header sum) and
/// the port change as a plain one. Two helper calls per packet instead of one per field.
#[inline(always)]
fn try_rewrite(ctx: &TcContext, p: &Parsed, to: &CtValue) -> Result<(), i64> {
    let k = &p.key;
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let addr_changed = k.saddr != to.nat_saddr || k.daddr != to.nat_daddr;
    let mut addr = 0u32;
    if addr_changed && p.is_v4() {
        addr = csum::diff32(addr, k.saddr[0], to.nat_saddr[0]);
        addr = csum::diff32(addr, k.daddr[0], to.nat_daddr[0]);
        let ipc: u16 = load(data, data_end, ETH_LEN + 10).ok_or(-1i64)?;
        put(data, data_end, ETH_LEN + 10, csum::apply(ipc, addr))?;
        put(data, data_end, ETH_LEN + 12, to.nat_saddr[0])?;
        put(data, data_end, ETH_LEN + 16, to.nat_daddr[0])?;
    } else if addr_changed {
        addr = addr6_diff(addr, &k.saddr, &to.nat_saddr);
        addr = addr6_diff(addr, &k.daddr, &to.nat_daddr);
        put(data, data_end, ETH_LEN + 8, to.nat_saddr)?;
        put(data, data_end, ETH_LEN + 24, to.nat_daddr)?;
    }
    let ports_changed = k.sport != to.nat_sport || k.dport != to.nat_dport;
    let mut port = 0u32;
    if ports_changed {
        port = csum::diff16(port, k.sport, to.nat_sport);
        port = csum::diff16(port, k.dport, to.nat_dport);
        put(data, data_end, p.l4_off, to.nat_sport)?;
        put(data, data_end, p.l4_off + 2, to.nat_dport)?;
    }
    // Helpers last: they may move the packet data (the pointers above are not used again).
    let mangled = if k.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let off = p.l4_csum_off();
    match ip_summed(ctx) {
        Some(summed @ (CHECKSUM_NONE | CHECKSUM_UNNECESSARY | CHECKSUM_PARTIAL)) => {
            // What `bpf_l4_csum_replace` would do for these, without two helper calls: a
            // full checksum takes both changes; the pseudo-header sum of a
            // CHECKSUM_PARTIAL packet only the address change (its ports are summed by
            // whoever completes the checksum).
            let (data, data_end) = (ctx.data(), ctx.data_end());
            let old: u16 = load(data, data_end, off).ok_or(-1i64)?;
            if mangled != 0 && old == 0 {
                // UDP without a checksum stays without one (BPF_F_MARK_MANGLED_0).
                return Ok(());
            }
            let mut new = if summed == CHECKSUM_PARTIAL {
                !csum::apply(!old, addr)
            } else {
                csum::apply(old, addr + port)
            };
            if mangled != 0 && new == 0 {
                new = 0xffff;
            }
            put(data, data_end, off, new)
        }
        _ => {
            // CHECKSUM_COMPLETE (skb->csum must follow the change) or an unknown layout.
            cold();
            if addr_changed {
                ctx.l4_csum_replace(off, 0, addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled)?;
            }
            if ports_changed {
                ctx.l4_csum_replace(off, 0, port as u64, mangled)?;
            }
            Ok(())
        }
    }
}

/// `ip_summed` values (include/linux/skbuff.h).
const CHECKSUM_NONE: u8 = 0;
const CHECKSUM_UNNECESSARY: u8 = 1;
const CHECKSUM_PARTIAL: u8 = 3;

/// Where `sk_buff::ip_summed` is, as its bit offset plus one; 0: unknown. Set by the agent
/// at load time from the kernel's BTF (`datapath::skb_layout`); read-only to the programs,
/// so the verifier sees a constant.
#[no_mangle]
static SKB_IP_SUMMED: u32 = 0;

/// The packet's `ip_summed`, read from the kernel's `struct sk_buff` behind the context
/// (a tc program's context pointer is the skb itself). `None`: the layout is unknown.
#[inline(always)]
fn ip_summed(ctx: &TcContext) -> Option<u8> {
    // SAFETY: reading a global.
    let at = unsafe { core::ptr::read_volatile(&SKB_IP_SUMMED) };
    if at == 0 {
        return None;
    }
    let bit = at - 1;
    let ptr = (ctx.skb.skb as *const u8).wrapping_add((bit / 8) as usize);
    // SAFETY: a fault-tolerant kernel read of one byte inside the skb.
    let byte = unsafe { bpf_probe_read_kernel(ptr) }.ok()?;
    Some((byte >> (bit % 8)) & 3)
}

/// `parse::store` for the `?` of `try_rewrite`.
#[inline(always)]
fn put<T>(data: usize, data_end: usize, off: usize, v: T) -> Result<(), i64> {
    store(data, data_end, off, v).ok_or(-1)
}

/// Adds the checksum difference of a 16-byte address change to `acc`.
#[inline(always)]
fn addr6_diff(acc: u32, old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let mut d = acc;
    for i in 0..4 {
        d = csum::diff32(d, old[i], new[i]);
    }
    d
}
