//! tc (TCX) on pod-facing interfaces and on egress: DNAT of pod-originated VIP traffic and
//! reverse NAT of replies, including replies generated on the node itself (the node-local
//! activator) that no XDP hook sees. Checksums go through the skb-aware helpers, which are
//! right for CHECKSUM_PARTIAL packets from veth (`BPF_F_PSEUDO_HDR`).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use redirector_common::{CtValue, CT_HAIRPIN, G_PACKETS, G_REWRITE_FAILED, PROTO_UDP};

use crate::{
    csum,
    maps::count,
    nat::{decide, Verdict},
    parse::{parse, Parsed, ETH_LEN, IPV6_LEN, TCP_LEN},
};

/// `TC_ACT_UNSPEC`, which TCX calls `TCX_NEXT`: the next program on the hook (e.g. a CNI's)
/// still sees the packet, and with none left the stack carries on as usual.
pub const TC_NEXT: i32 = -1;

/// Runs the NAT core on an skb. `ingress`: new flows may start here (pod-facing ingress);
/// otherwise only existing flows are translated.
#[inline(always)]
pub fn run(ctx: &TcContext, ingress: bool) -> i32 {
    count(G_PACKETS);
    // Make sure the headers are in the linear area before direct access.
    let want = (ETH_LEN + IPV6_LEN + TCP_LEN) as u32;
    if ctx.data() + want as usize > ctx.data_end() {
        let len = ctx.len();
        let _ = ctx.pull_data(if len < want { len } else { want });
    }
    let p = match parse(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        Ok(p) => p,
        Err(c) => {
            count(c);
            return TC_NEXT;
        }
    };
    let Verdict::Rewrite { to } = decide(&p, ingress) else {
        return TC_NEXT;
    };
    if try_rewrite(ctx, &p, &to).is_err() {
        count(G_REWRITE_FAILED);
        return TC_ACT_SHOT as i32;
    }
    if ingress && to.flags & CT_HAIRPIN != 0 {
        // Back out of the interface it came from: swap MACs and redirect to its egress.
        return hairpin(ctx);
    }
    TC_NEXT
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

#[inline(always)]
fn try_rewrite(ctx: &TcContext, p: &Parsed, to: &CtValue) -> Result<(), i64> {
    let k = &p.key;
    let csum_off = p.l4_csum_off();
    let mangled = if k.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    if p.is_v4() {
        let fields = [
            (ETH_LEN + 12, k.saddr[0], to.nat_saddr[0]),
            (ETH_LEN + 16, k.daddr[0], to.nat_daddr[0]),
        ];
        for (off, old, new) in fields {
            if old != new {
                ctx.l4_csum_replace(csum_off, old as u64, new as u64, pseudo | 4)?;
                ctx.l3_csum_replace(ETH_LEN + 10, old as u64, new as u64, 4)?;
                ctx.store(off, &new, 0)?;
            }
        }
    } else {
        if k.saddr != to.nat_saddr {
            ctx.l4_csum_replace(
                csum_off,
                0,
                addr6_diff(&k.saddr, &to.nat_saddr) as u64,
                pseudo,
            )?;
            ctx.store(ETH_LEN + 8, &to.nat_saddr, 0)?;
        }
        if k.daddr != to.nat_daddr {
            ctx.l4_csum_replace(
                csum_off,
                0,
                addr6_diff(&k.daddr, &to.nat_daddr) as u64,
                pseudo,
            )?;
            ctx.store(ETH_LEN + 24, &to.nat_daddr, 0)?;
        }
    }
    let ports = [
        (p.l4_off, k.sport, to.nat_sport),
        (p.l4_off + 2, k.dport, to.nat_dport),
    ];
    for (off, old, new) in ports {
        if old != new {
            ctx.l4_csum_replace(csum_off, old as u64, new as u64, mangled | 2)?;
            ctx.store(off, &new, 0)?;
        }
    }
    Ok(())
}

/// Checksum difference of a 16-byte address change (for `l4_csum_replace` by diff).
#[inline(always)]
fn addr6_diff(old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let mut d = 0;
    for i in 0..4 {
        d = csum::diff32(d, old[i], new[i]);
    }
    d
}
