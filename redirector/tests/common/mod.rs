//! Shared harness of the BPF_PROG_TEST_RUN tests: a privately loaded datapath (unpinned
//! maps), a `Programmer` over its maps, and helpers to run a packet through one hook.
#![allow(dead_code)]

pub mod edge;
pub mod fixture;
pub mod fuzz;
pub mod lifecycle;
pub mod malformed;
pub mod packet;
pub mod scale;
pub mod tcp_state;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
};

use aya::programs::{TestRun, TestRunOptions};
use redirector::{
    addr::{ip_words, port_wire},
    control::{DesiredService, Programmer},
    datapath::{
        batch, Datapath, L4Checksum, PROG_TC_EGRESS, PROG_TC_EMPTY, PROG_TC_INGRESS, PROG_XDP,
        PROG_XDP_EMPTY,
    },
};
use redirector_common::{CtKey, ServiceKey, MODE_PROXY, MODE_SERVE};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
/// What the tc programs return for "carry on": TC_ACT_UNSPEC (TCX_NEXT), -1.
pub const TC_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// Tests load a datapath each (~100 MB of preallocated maps): run them one at a time.
static LOCK: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the test with "needs root: ..." when not running as root (a run without root is
/// never green).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            panic!(
                "needs root: BPF_PROG_TEST_RUN and pinned maps take CAP_SYS_ADMIN (run as root)"
            );
        }
    };
}

/// The hook a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
    XdpEmpty,
    TcEmpty,
}

impl Hook {
    /// The return code of "continue as usual".
    pub fn pass(self) -> u32 {
        match self {
            Hook::Xdp | Hook::XdpEmpty => XDP_PASS,
            _ => TC_NEXT,
        }
    }
    pub fn is_tc(self) -> bool {
        matches!(self, Hook::TcIngress | Hook::TcEgress | Hook::TcEmpty)
    }
}

/// Outcome of one test run.
#[derive(Debug)]
pub struct Out {
    pub ret: u32,
    pub pkt: Vec<u8>,
    /// Nanoseconds per repetition as measured by the kernel.
    pub ns: u64,
}

pub struct Bench {
    pub dp: Datapath,
    pub prog: Programmer,
}

impl Bench {
    pub fn new() -> Self {
        Self::with(L4Checksum::InPlace)
    }

    /// A bench whose tc programs update L4 checksums as `l4` says.
    pub fn with(l4: L4Checksum) -> Self {
        let mut dp = Datapath::open_unpinned_with(l4).expect("loading the datapath");
        let maps = dp.maps().expect("taking the maps");
        let prog = Programmer::adopt(maps, &redirector::datapath::MapSizes::default());
        Self { dp, prog }
    }

    pub fn run(&mut self, hook: Hook, pkt: &[u8]) -> Out {
        self.try_run(hook, pkt, 1)
            .unwrap_or_else(|e| panic!("test_run on {hook:?}: {e}"))
    }

    /// Runs `pkt` `repeat` times (the kernel keeps the packet between repetitions).
    pub fn try_run(&mut self, hook: Hook, pkt: &[u8], repeat: u32) -> Result<Out, String> {
        self.try_run_ctx(hook, pkt, repeat, None)
    }

    fn try_run_ctx(
        &mut self,
        hook: Hook,
        pkt: &[u8],
        repeat: u32,
        ctx_in: Option<&[u8]>,
    ) -> Result<Out, String> {
        let mut out = vec![0u8; pkt.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in,
            repeat,
            ..Default::default()
        };
        let r = match hook {
            Hook::Xdp | Hook::XdpEmpty => {
                let name = if hook == Hook::Xdp {
                    PROG_XDP
                } else {
                    PROG_XDP_EMPTY
                };
                self.dp.xdp(name).map_err(|e| e.to_string())?.test_run(opts)
            }
            Hook::TcIngress | Hook::TcEgress | Hook::TcEmpty => {
                let name = match hook {
                    Hook::TcIngress => PROG_TC_INGRESS,
                    Hook::TcEgress => PROG_TC_EGRESS,
                    _ => PROG_TC_EMPTY,
                };
                self.dp.tc(name).map_err(|e| e.to_string())?.test_run(opts)
            }
        }
        .map_err(|e| format!("{e:?}"))?;
        out.truncate(r.data_size_out as usize);
        Ok(Out {
            ret: r.return_value,
            pkt: out,
            ns: r.duration.as_nanos() as u64,
        })
    }

    pub fn apply(&mut self, services: &[DesiredService]) {
        self.prog.apply(services).expect("apply");
    }

    /// Removes every conntrack entry; returns how many there were.
    pub fn clear_conntrack(&mut self) -> usize {
        let ct = &mut self.prog.maps_mut().conntrack;
        let mut keys: Vec<CtKey> = Vec::new();
        batch::for_each(ct, |k, _| keys.push(*k)).expect("walking conntrack");
        batch::delete(ct, &keys).expect("removing conntrack entries")
    }

    pub fn conntrack_len(&self) -> usize {
        self.prog.maps().conntrack_len()
    }

    /// Ends a `Datapath::lend_conntrack` (none: no-op).
    pub fn return_conntrack(&self) {
        self.dp.return_conntrack().expect("emptying CONNTRACK_PREV");
    }
}

impl Default for Bench {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the kernel's skb test_run refuses a frame (EINVAL) before the program runs: it
/// wants the whole minimal IP header of an IPv4/IPv6 ethertype in the input.
pub fn tc_test_run_refuses(pkt: &[u8]) -> bool {
    if pkt.len() < packet::ETH_LEN {
        return true;
    }
    match u16::from_be_bytes([pkt[12], pkt[13]]) {
        0x0800 => pkt.len() < packet::ETH_LEN + 20,
        0x86dd => pkt.len() < packet::ETH_LEN + 40,
        _ => false,
    }
}

/// The map key of a VIP:port:proto.
pub fn service_key(vip: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, family) = ip_words(vip.ip());
    ServiceKey {
        addr,
        port: port_wire(vip.port()),
        proto,
        family,
    }
}

/// The conntrack key of a packet tuple.
pub fn ct_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> CtKey {
    let (saddr, family) = ip_words(src.ip());
    let (daddr, _) = ip_words(dst.ip());
    CtKey {
        saddr,
        daddr,
        sport: port_wire(src.port()),
        dport: port_wire(dst.port()),
        proto,
        family,
        _pad: 0,
    }
}

/// A desired service: `vip` (ip:port), Serve or Proxy, its backends, proxy pool and
/// node-local activator.
pub fn service(
    vip: &str,
    proto: u8,
    proxy_mode: bool,
    backends: &[&str],
    pool: &[&str],
    activator: &str,
) -> DesiredService {
    let vip = packet::sa(vip);
    let set = |l: &[&str]| l.iter().map(|s| packet::sa(s)).collect::<BTreeSet<_>>();
    DesiredService {
        key: service_key(vip, proto),
        name: format!("test/{vip}-{proto}"),
        mode: if proxy_mode { MODE_PROXY } else { MODE_SERVE },
        serve: set(backends),
        proxy: set(pool),
        activator: Some(packet::sa(activator)),
        kind: Default::default(),
    }
}
