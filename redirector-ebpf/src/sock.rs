//! Translation at the socket for the node's own clients (pods and host processes in the
//! hooked cgroup), the way Cilium's socket load balancer does it. A `connect()` (or an
//! unconnected UDP `sendmsg()`) to VIP:port is rewritten to the target the NAT core would
//! pick, before any packet exists: the flow then carries its real tuple everywhere (the
//! node's conntrack, netfilter, rp_filter see nothing translated, and the kernel picks a
//! source port unique toward the real target), and a connected socket keeps its target
//! across flips by construction. `getpeername()` and `recvmsg()` turn the target back into
//! the VIP, so the application never sees it. Flows to the node-local activator stay on the
//! packet path (the activator finds their service through conntrack).
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::bpf_get_socket_cookie,
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use redirector_common::{
    CtKey, Endpoint, ServiceKey, SockFlow, SockUdpKey, FAMILY_V4, FAMILY_V6, G_ACT_ADMITTED,
    G_SOCK_REVERSED, G_SOCK_TRANSLATED, PROTO_TCP, PROTO_UDP, SOCK_PROXIED, SVC_ACT_PORT,
    SVC_ENDPOINT,
};

use crate::{
    maps::{count, ACT_ADMIT, SERVICES, SOCK_FLOWS, SOCK_UDP},
    nat::{account, is_proxied, pick_target},
};

/// What a `cgroup/*` sock_addr program returns to let the call go on.
pub const ALLOW: i32 = 1;

/// Words 0..3 of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as the context holds them.
const MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// An address as the socket call named it: the service family's words, and whether it
/// came as an IPv4-mapped address on an IPv6 socket.
struct Named {
    addr: [u32; 4],
    family: u8,
    mapped: bool,
}

/// The user address of the call (`user_ip4` / `user_ip6`).
#[inline(always)]
fn read_user(sa: *const bpf_sock_addr, v6: bool) -> Named {
    // SAFETY: the context is valid for the program's lifetime; 4-byte loads of these
    // fields are what the verifier allows.
    unsafe {
        if !v6 {
            return Named {
                addr: [(*sa).user_ip4, 0, 0, 0],
                family: FAMILY_V4,
                mapped: false,
            };
        }
        let w = [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ];
        if w[0] == MAPPED_PREFIX[0] && w[1] == MAPPED_PREFIX[1] && w[2] == MAPPED_PREFIX[2] {
            Named {
                addr: [w[3], 0, 0, 0],
                family: FAMILY_V4,
                mapped: true,
            }
        } else {
            Named {
                addr: w,
                family: FAMILY_V6,
                mapped: false,
            }
        }
    }
}

/// Writes `addr`:`port` as the call's user address, in the form it came in.
#[inline(always)]
fn write_user(sa: *mut bpf_sock_addr, v6: bool, mapped: bool, addr: &[u32; 4], port: u16) {
    // SAFETY: as in `read_user`; these fields are writable in every hook used here.
    unsafe {
        if !v6 {
            (*sa).user_ip4 = addr[0];
        } else if mapped {
            (*sa).user_ip6[0] = MAPPED_PREFIX[0];
            (*sa).user_ip6[1] = MAPPED_PREFIX[1];
            (*sa).user_ip6[2] = MAPPED_PREFIX[2];
            (*sa).user_ip6[3] = addr[0];
        } else {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        }
        (*sa).user_port = port as u32;
    }
}

#[inline(always)]
fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The service the call names and the target to give it instead. `None`: not a service,
/// a flow for the node-local activator (the packet path's), or no usable target.
#[inline(always)]
fn translate(ctx: &SockAddrContext, v6: bool, ck: u64) -> Option<(Named, SockFlow)> {
    let sa = ctx.sock_addr;
    // SAFETY: context field reads (4-byte loads).
    let (proto, port) = unsafe { ((*sa).protocol as u8, (*sa).user_port as u16) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let named = read_user(sa, v6);
    let key = ServiceKey {
        addr: named.addr,
        port,
        proto,
        family: named.family,
    };
    // One copy: the agent may replace the element while we read it.
    let svc = unsafe { *SERVICES.get(&key)? };
    // The node-local activator finds a flow's service from its own port (SVC_ACT_PORT);
    // without one it needs the packet path's conntrack entry.
    if is_proxied(&svc) && svc.proxy_count == 0 && svc.flags & SVC_ACT_PORT == 0 {
        return None;
    }
    // A real endpoint (a pod's address, Knative's activator's) is switched by the packet
    // path, at the client's interface: the node-local activator's own connections to the
    // pods, made from this cgroup too, must reach them.
    if svc.flags & SVC_ENDPOINT != 0 {
        return None;
    }
    // The pick hashes the socket and the VIP: stable for a socket's datagrams to one VIP
    // while the backend set is unchanged, spread over sockets.
    let pseudo = CtKey {
        saddr: [ck as u32, (ck >> 32) as u32, 0, 0],
        daddr: named.addr,
        sport: 0,
        dport: port,
        proto,
        family: named.family,
        _pad: 0,
    };
    let (target, proxied): (Endpoint, bool) = pick_target(&svc, &pseudo)?;
    let flow = SockFlow {
        vip: named.addr,
        target: target.addr,
        vip_port: port,
        target_port: target.port,
        svc_id: svc.id,
        family: named.family,
        proto,
        flags: if proxied { SOCK_PROXIED } else { 0 },
        _pad: [0; 5],
    };
    Some((named, flow))
}

/// `connect()`: rewrite a VIP to its target and remember the socket's flow.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let ck = cookie(ctx);
    if let Some((named, flow)) = translate(ctx, v6, ck) {
        write_user(
            ctx.sock_addr,
            v6,
            named.mapped,
            &flow.target,
            flow.target_port,
        );
        let _ = SOCK_FLOWS.insert(&ck, &flow, 0);
        account(flow.svc_id, 0, false, true, flow.flags & SOCK_PROXIED != 0);
        count(G_SOCK_TRANSLATED);
    }
    ALLOW
}

/// `sendmsg()` with a destination on an unconnected UDP socket: the same rewrite per
/// datagram; the target is remembered per (socket, target) for `recvmsg()`.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let ck = cookie(ctx);
    if let Some((named, flow)) = translate(ctx, v6, ck) {
        write_user(
            ctx.sock_addr,
            v6,
            named.mapped,
            &flow.target,
            flow.target_port,
        );
        let key = udp_key(ck, &flow.target, flow.target_port, flow.family);
        // SAFETY: LRU value read by copy.
        let known = unsafe { SOCK_UDP.get(&key) }.is_some_and(|f| *f == flow);
        if !known {
            let _ = SOCK_UDP.insert(&key, &flow, 0);
        }
        account(
            flow.svc_id,
            0,
            false,
            !known,
            flow.flags & SOCK_PROXIED != 0,
        );
        count(G_SOCK_TRANSLATED);
    }
    ALLOW
}

#[inline(always)]
fn udp_key(cookie: u64, target: &[u32; 4], port: u16, family: u8) -> SockUdpKey {
    SockUdpKey {
        cookie,
        target: *target,
        port,
        family,
        _pad: [0; 5],
    }
}

/// `getpeername()` / `recvmsg()`: a peer that is the target of this socket's translated
/// flow is shown as the VIP. `udp`: unconnected UDP sockets' targets are looked up too.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool, udp: bool) -> i32 {
    let ck = cookie(ctx);
    let sa = ctx.sock_addr;
    let named = read_user(sa, v6);
    // SAFETY: context field read.
    let port = unsafe { (*sa).user_port } as u16;
    // SAFETY: LRU values read by copy.
    let mut flow = unsafe { SOCK_FLOWS.get(&ck) }.copied();
    if udp && !flow.is_some_and(|f| f.target == named.addr && f.target_port == port) {
        let key = udp_key(ck, &named.addr, port, named.family);
        flow = unsafe { SOCK_UDP.get(&key) }.copied();
    }
    if let Some(f) = flow {
        if f.target == named.addr && f.target_port == port && f.family == named.family {
            write_user(sa, v6, named.mapped, &f.vip, f.vip_port);
            count(G_SOCK_REVERSED);
        }
    }
    ALLOW
}

/// A socket is released: its flow is no longer live.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: context field read.
    let ty = unsafe { (*sk).type_ };
    // SOCK_STREAM or SOCK_DGRAM: only those can have been translated.
    if ty == 1 || ty == 2 {
        let ck = cookie(ctx);
        let _ = SOCK_FLOWS.remove(&ck);
    }
    ALLOW
}

/// `sock_ops`, when a translated socket's SYN is about to leave (`TCP_CONNECT_CB`: its
/// source port is chosen by then): a flow `connect()` sent to an activator is admitted by
/// its tuple (`ACT_ADMIT`), so that the node-local activator's `sk_lookup` hands it to the
/// listener, which refuses connections made to its address directly.
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let _ = admit(ctx);
    }
    1
}

#[inline(always)]
fn admit(ctx: &SockOpsContext) -> Option<()> {
    let ck = cookie(ctx);
    // SAFETY: LRU value read by copy.
    let flow = unsafe { *SOCK_FLOWS.get(&ck)? };
    if flow.flags & SOCK_PROXIED == 0 {
        return None;
    }
    // `remote_port`: network byte order in the upper half on little-endian (the kernel
    // shifts it there); `local_port`: host byte order.
    let dport = u32::from_be(ctx.remote_port()) as u16;
    let sport = ctx.local_port() as u16;
    let (saddr, daddr) = if ctx.family() == 2 {
        ([ctx.local_ip4(), 0, 0, 0], [ctx.remote_ip4(), 0, 0, 0])
    } else {
        let (l, r) = (ctx.local_ip6(), ctx.remote_ip6());
        // An IPv4 flow on an IPv6 socket: the activator sees it as IPv4.
        if r[0] == MAPPED_PREFIX[0] && r[1] == MAPPED_PREFIX[1] && r[2] == MAPPED_PREFIX[2] {
            ([l[3], 0, 0, 0], [r[3], 0, 0, 0])
        } else {
            (l, r)
        }
    };
    if daddr != flow.target || dport.to_be() != flow.target_port {
        return None;
    }
    let key = CtKey {
        saddr,
        daddr,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        family: flow.family,
        _pad: 0,
    };
    ACT_ADMIT.insert(&key, &flow.svc_id, 0).ok()?;
    count(G_ACT_ADMITTED);
    Some(())
}
