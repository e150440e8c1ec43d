//! XDP on uplinks: DNAT of VIP traffic arriving from the network. Replies from remote
//! targets pass untranslated: the node's stack must see them as they are, and tc egress
//! translates them on their way out (see `nat::decide`). Packets from the wire carry full
//! checksums, so the checksums are updated incrementally in place.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use redirector_common::{CtValue, G_PACKETS, PROTO_UDP};

use crate::{
    csum,
    maps::count,
    nat::decide,
    parse::{cold, load, parse, store, Parsed, ETH_LEN},
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    count(G_PACKETS);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let p = match parse(data, data_end, data_end - data) {
        Ok(p) => p,
        Err(c) => {
            cold();
            count(c);
            return xdp_action::XDP_PASS;
        }
    };
    if let Some(to) = decide(&p, false, |_| false) {
        let _ = try_rewrite(data, data_end, &p, &to);
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_rewrite(data: usize, data_end: usize, p: &Parsed, to: &CtValue) -> Option<()> {
    let k = &p.key;
    let mut l4 = 0u32;
    if p.is_v4() {
        let mut ip = csum::diff32(0, k.saddr[0], to.nat_saddr[0]);
        ip = csum::diff32(ip, k.daddr[0], to.nat_daddr[0]);
        let ipc: u16 = load(data, data_end, ETH_LEN + 10)?;
        store(data, data_end, ETH_LEN + 10, csum::apply(ipc, ip))?;
        store(data, data_end, ETH_LEN + 12, to.nat_saddr[0])?;
        store(data, data_end, ETH_LEN + 16, to.nat_daddr[0])?;
        l4 = ip;
    } else {
        for i in 0..4 {
            l4 = csum::diff32(l4, k.saddr[i], to.nat_saddr[i]);
            l4 = csum::diff32(l4, k.daddr[i], to.nat_daddr[i]);
        }
        store(data, data_end, ETH_LEN + 8, to.nat_saddr)?;
        store(data, data_end, ETH_LEN + 24, to.nat_daddr)?;
    }
    l4 = csum::diff16(l4, k.sport, to.nat_sport);
    l4 = csum::diff16(l4, k.dport, to.nat_dport);
    store(data, data_end, p.l4_off, to.nat_sport)?;
    store(data, data_end, p.l4_off + 2, to.nat_dport)?;
    let off = p.l4_csum_off();
    let old: u16 = load(data, data_end, off)?;
    let udp = k.proto == PROTO_UDP;
    if udp && old == 0 && p.is_v4() {
        // IPv4 UDP without checksum stays without one.
        return Some(());
    }
    let mut new = csum::apply(old, l4);
    if udp && new == 0 {
        new = 0xffff;
    }
    store(data, data_end, off, new)
}
