//! `sk_lookup` on the node's network namespace: a TCP connection to the node-local
//! activator's address on one of the per-service ports (`ACT_PORTS`) is handed to the
//! activator's one listening socket (`ACT_SOCKS`), which then sees the port it was sent to as
//! its local address and knows the service from it. Anything else is left to the kernel's
//! own lookup.
use aya_ebpf::programs::SkLookupContext;
use redirector_common::{ACT_V4, ACT_V6, PROTO_TCP};

use crate::maps::{ACT_PORTS, ACT_SOCKS};

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
    // SAFETY: context field reads (4-byte loads), valid for the program's lifetime.
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
    if port < first || port >= first + cfg.count as u32 {
        return None;
    }
    // SAFETY: as above.
    let same = unsafe {
        if idx == ACT_V4 {
            (*l).local_ip4 == cfg.addr[0]
        } else {
            (*l).local_ip6[0] == cfg.addr[0]
                && (*l).local_ip6[1] == cfg.addr[1]
                && (*l).local_ip6[2] == cfg.addr[2]
                && (*l).local_ip6[3] == cfg.addr[3]
        }
    };
    if !same {
        return None;
    }
    ACT_SOCKS.redirect_sk_lookup(ctx, idx, 0).ok()
}
