//! Program entry points.
use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
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
