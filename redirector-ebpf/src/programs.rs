//! Program entry points.
use aya_ebpf::{
    bindings::xdp_action,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, sk_lookup, sock_ops, xdp},
    programs::{
        SkLookupContext, SockAddrContext, SockContext, SockOpsContext, TcContext, XdpContext,
    },
};

/// Uplink ingress: DNAT from the network (replies pass, tc egress translates them).
#[xdp]
pub fn redirector_xdp(ctx: XdpContext) -> u32 {
    crate::xdp::run(&ctx)
}

/// Pod-facing ingress: DNAT of pod traffic to VIPs, hairpin.
#[classifier]
pub fn redirector_tc_ingress(ctx: TcContext) -> i32 {
    crate::tc::run(&ctx, true)
}

/// Egress (pods and uplinks): reverse NAT of replies, after the node's netfilter.
#[classifier]
pub fn redirector_tc_egress(ctx: TcContext) -> i32 {
    crate::tc::run(&ctx, false)
}

/// Socket hooks (attached to the configured cgroup): `connect()` to a VIP goes to its target.
#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    crate::sock::connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn redirector_connect6(ctx: SockAddrContext) -> i32 {
    crate::sock::connect(&ctx, true)
}

/// Unconnected UDP `sendmsg()` to a VIP.
#[cgroup_sock_addr(sendmsg4)]
pub fn redirector_sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::sock::sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirector_sendmsg6(ctx: SockAddrContext) -> i32 {
    crate::sock::sendmsg(&ctx, true)
}

/// UDP `recvmsg()`: datagrams from a translated target come from the VIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn redirector_recvmsg4(ctx: SockAddrContext) -> i32 {
    crate::sock::reverse(&ctx, false, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirector_recvmsg6(ctx: SockAddrContext) -> i32 {
    crate::sock::reverse(&ctx, true, true)
}

/// `getpeername()` of a translated socket names the VIP.
#[cgroup_sock_addr(getpeername4)]
pub fn redirector_getpeername4(ctx: SockAddrContext) -> i32 {
    crate::sock::reverse(&ctx, false, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirector_getpeername6(ctx: SockAddrContext) -> i32 {
    crate::sock::reverse(&ctx, true, false)
}

/// A socket is released: its translated flow ends.
#[cgroup_sock(sock_release)]
pub fn redirector_sock_release(ctx: SockContext) -> i32 {
    crate::sock::release(&ctx)
}

/// A translated socket's SYN leaves: a flow sent to the activator is admitted by its tuple.
#[sock_ops]
pub fn redirector_sock_ops(ctx: SockOpsContext) -> u32 {
    crate::sock::sock_ops(&ctx)
}

/// The node's namespace: per-service activator ports lead to the activator's socket.
#[sk_lookup]
pub fn redirector_sk_lookup(ctx: SkLookupContext) -> u32 {
    crate::lookup::run(&ctx)
}

/// Empty XDP program: the floor for `cargo xtask perf --datapath`.
#[xdp]
pub fn redirector_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Empty tc program: the floor for tc paths.
#[classifier]
pub fn redirector_tc_empty(_ctx: TcContext) -> i32 {
    crate::tc::TC_NEXT
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
