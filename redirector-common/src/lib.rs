//! Map types shared by the eBPF programs (`redirector-ebpf`) and the userspace agent
//! (`redirector`). Defined once, `#[repr(C)]`, with explicit padding so both sides and
//! `bpftool` agree on every byte.
//!
//! Addresses are stored as four `u32` words in network byte order (IPv4 uses word 0 and
//! leaves the rest zero); ports are stored in network byte order as they appear on the wire.
#![no_std]

/// Maglev lookup-table size for sets of more than `MAGLEV_SMALL_MAX` backends (a prime;
/// Maglev wants it well above the backend count: with 997 slots, up to ~100 backends per
/// service stay within a few % of even). 997 keeps a `MAGLEV` element (4 B per slot plus the
/// kernel's ~64 B of element header) inside one 4 KiB allocation; 1021 slots took 8 KiB.
pub const MAGLEV_M: usize = 997;
/// Table size for sets of at most `MAGLEV_SMALL_MAX` backends (`MAGLEV_SMALL`): a 1 KiB
/// kernel allocation instead of 4 KiB; with 8 backends each gets 29 or 30 slots.
pub const MAGLEV_M_SMALL: usize = 239;
/// Largest set that uses the small table.
pub const MAGLEV_SMALL_MAX: usize = 8;

/// Default capacity of the services map (VIP:port:proto entries).
pub const MAX_SERVICES: u32 = 65_536;
/// Default capacity of the backends array (global backend ids).
pub const MAX_BACKENDS: u32 = 262_144;
/// Default capacity of the conntrack LRU (two entries per flow).
pub const MAX_CONNTRACK: u32 = 524_288;

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ServiceValue::mode`: new flows go to a Maglev pick among the backends.
pub const MODE_SERVE: u8 = 0;
/// `ServiceValue::mode`: new flows go to the activator.
pub const MODE_PROXY: u8 = 1;

/// `MaglevKey::set` of the Serve backends.
pub const SET_SERVE: u32 = 0;
/// `MaglevKey::set` of an activator pool (Knative's activators, subset by numActivators).
pub const SET_PROXY: u32 = 1;

/// `ServiceValue::flags`: the Serve set's table is in `MAGLEV_SMALL` (else `MAGLEV`).
pub const SVC_SERVE_SMALL: u8 = 1 << 0;
/// `ServiceValue::flags`: the Proxy set's table is in `MAGLEV_SMALL` (else `MAGLEV`).
pub const SVC_PROXY_SMALL: u8 = 1 << 1;
/// `ServiceValue::flags`: `activator` is the node-local activator on a port of this service's
/// own (`ACT_PORTS`): flows to it never share a tuple with another service's, and the
/// activator knows the service from the port.
pub const SVC_ACT_PORT: u8 = 1 << 2;
/// `ServiceValue::flags`: the key is a real endpoint (a revision's pod, or Knative's
/// activator), not a VIP: connections to it that were never translated exist (opened before
/// the entry, or while it said Serve), so only a bare SYN opens a flow here, and any other
/// packet without conntrack state passes as it is.
pub const SVC_ENDPOINT: u8 = 1 << 3;
/// `ServiceValue::flags` (with `SVC_ENDPOINT`): an endpoint shared by every revision
/// (Knative's activator): the node-local activator finds the revision from the request's
/// headers, so the entry leads to its listener, never to a port of the service's own.
pub const SVC_SHARED: u8 = 1 << 4;

/// Conntrack flags.
pub const CT_REPLY: u16 = 1 << 0;
pub const CT_PROXIED: u16 = 1 << 1;
pub const CT_HAIRPIN: u16 = 1 << 2;
pub const CT_CLOSING: u16 = 1 << 3;
/// On the original-direction entry: the peer has answered (a later bare SYN is a new flow).
pub const CT_SEEN_REPLY: u16 = 1 << 4;
/// This entry's direction has sent a FIN (TCP half-close). The flow is `CT_CLOSING` (and
/// its closing timeout starts) once both directions have, or at a RST.
pub const CT_FIN: u16 = 1 << 5;
/// Idle timeout of a TCP flow that was never answered (no `CT_SEEN_REPLY`: a SYN to a
/// target that is gone or filtered), instead of the established timeout (the TCP timeout
/// when that is shorter).
pub const CT_SYN_TIMEOUT_NS: u64 = 60 * 1_000_000_000;

/// Jiffies between two clock reads of a conntrack entry while packets flow (see
/// `CtValue::seen_jiffies`): 100 ms at HZ=1000, one second at HZ=100, the slowest tick
/// Linux offers. Timeouts are whole seconds, so an entry can only have expired once this
/// has passed, and `last_seen` is never more than a second behind.
pub const CT_REFRESH_JIFFIES: u32 = 100;

/// Slots of `PEERS`, a direct-mapped set of interface indexes: ifindex `i` lives in slot
/// `i & (HOOKED_SLOTS - 1)` and the slot holds `i` itself (0: empty). A power of two.
pub const HOOKED_SLOTS: u32 = 1 << 16;

/// Index of the single `DatapathConfig` entry in the `CONFIG` array.
pub const CONFIG_KEY: u32 = 0;

/// Global counters (`GLOBAL_STATS` per-CPU array index).
/// Packets the programs examined, per hook (a forwarded packet counts at its ingress and at
/// its egress).
pub const G_PACKETS: u32 = 0;
pub const G_NOT_IP: u32 = 1;
pub const G_MALFORMED: u32 = 2;
pub const G_FRAGMENT_OR_OPTIONS: u32 = 3;
pub const G_NAT_FORWARD: u32 = 4;
pub const G_NAT_REPLY: u32 = 5;
pub const G_NO_BACKEND: u32 = 6;
pub const G_CT_FULL: u32 = 7;
pub const G_HAIRPIN: u32 = 8;
pub const G_REWRITE_FAILED: u32 = 9;
/// BIG TCP packets (GSO/GRO packets over 64 KiB: IPv4 total length 0, IPv6 payload length 0
/// with or without a hop-by-hop jumbo option). Translated when their flow exists; they
/// never start one.
pub const G_BIG_TCP: u32 = 10;
/// `sk_lookup`: a connection to the node-local activator's address and ports that the
/// datapath did not deliver (no translated flow leads there), left to the kernel's own
/// lookup, which finds no listener: refused.
pub const G_ACT_REFUSED: u32 = 11;
/// `sock_ops`: a translated `connect()` to the node-local activator, admitted by its tuple
/// (`ACT_ADMIT`) before its SYN leaves.
pub const G_ACT_ADMITTED: u32 = 12;
/// Socket hooks: a `connect()` or `sendmsg()` to a VIP rewritten to its target.
pub const G_SOCK_TRANSLATED: u32 = 14;
/// Socket hooks: a `getpeername()` or `recvmsg()` answered with the VIP instead of the target.
pub const G_SOCK_REVERSED: u32 = 15;
pub const G_COUNT: u32 = 16;

/// An L3 address plus L4 port: a backend, the activator, or a NAT rewrite target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Key of `SERVICES`: what a packet's destination is matched on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of `SERVICES`. A mode flip is one write of this value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Dense id, index into `SERVICE_STATS` and part of `MaglevKey`.
    pub id: u32,
    /// `MODE_SERVE` or `MODE_PROXY`.
    pub mode: u8,
    /// `SVC_SERVE_SMALL` / `SVC_PROXY_SMALL`: which map holds each set's table.
    pub flags: u8,
    pub _pad0: u16,
    /// Number of Serve backends (0 → Serve falls back to the activator).
    pub backend_count: u32,
    /// Number of activators in the proxy pool (0 → the node-local `activator`).
    pub proxy_count: u32,
    /// Incremented by the agent on every write (for diagnostics).
    pub generation: u32,
    /// The node-local activator (Proxy target when `proxy_count` is 0).
    pub activator: Endpoint,
}

/// Key of `MAGLEV`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    pub svc_id: u32,
    /// `SET_SERVE` or `SET_PROXY`.
    pub set: u32,
}

/// Value of `MAGLEV`: the lookup table, each slot a global backend id (index in `BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevValue {
    pub slots: [u32; MAGLEV_M],
}

/// Value of `MAGLEV_SMALL`: the table of a set of at most `MAGLEV_SMALL_MAX` backends.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevSmallValue {
    pub slots: [u32; MAGLEV_M_SMALL],
}

/// Key of `CONNTRACK`: the packet's tuple as seen by the datapath before rewriting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Value of `CONNTRACK`: the tuple to rewrite the packet to.
///
/// A flow has two entries: the original direction (client → VIP, rewritten to the target)
/// and the reply direction (`CT_REPLY`: target → client, rewritten to come from the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_saddr: [u32; 4],
    pub nat_daddr: [u32; 4],
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub svc_id: u32,
    pub flags: u16,
    pub _pad0: u16,
    /// Low 32 bits of `jiffies` when the datapath last looked at the clock for this entry.
    /// A packet reads the clock (`bpf_ktime_get_coarse_ns`, a helper call) only when at
    /// least `CT_REFRESH_JIFFIES` have passed since; otherwise it costs one inlined load of
    /// `jiffies`.
    pub seen_jiffies: u32,
    /// The datapath clock (see [`CLOCK_EPOCH_NS`]) at the last packet, refreshed at most
    /// every `CT_REFRESH_JIFFIES` (at most a second behind while packets flow).
    pub last_seen: u64,
}

/// Per-service counters (`SERVICE_STATS`, per-CPU, index = service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets and bytes towards the service (original direction).
    pub packets: u64,
    pub bytes: u64,
    /// Packets and bytes of replies (reply direction).
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// New flows, and the part of them that went to an activator.
    pub new_flows: u64,
    pub proxied_flows: u64,
}

/// Value of `SERVICE_META` (service id → name): read by `redirector status` and bpftool,
/// never by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// `namespace/name`, NUL-padded.
    pub name: [u8; 128],
}

/// Tunables written by the agent into `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Idle timeout of an established TCP flow.
    pub tcp_timeout_ns: u64,
    /// Idle timeout of a UDP flow.
    pub udp_timeout_ns: u64,
    /// How long a TCP flow that saw FIN or RST keeps its target.
    pub closing_timeout_ns: u64,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            tcp_timeout_ns: 6 * 3600 * 1_000_000_000,
            udp_timeout_ns: 60 * 1_000_000_000,
            closing_timeout_ns: 10 * 1_000_000_000,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers, with every
    // padding byte an explicit field.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevValue {}
    unsafe impl aya::Pod for MaglevSmallValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for SockFlow {}
    unsafe impl aya::Pod for SockUdpKey {}
    unsafe impl aya::Pod for ActivatorPorts {}
}

// Layouts are part of the pinned-map ABI: a change must be deliberate.
const _: () = {
    assert!(core::mem::size_of::<Endpoint>() == 20);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 40);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<MaglevValue>() == 4 * MAGLEV_M);
    assert!(core::mem::size_of::<MaglevSmallValue>() == 4 * MAGLEV_M_SMALL);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 56);
    assert!(core::mem::size_of::<ServiceStats>() == 48);
    assert!(core::mem::size_of::<DatapathConfig>() == 24);
    assert!(core::mem::size_of::<SockFlow>() == 48);
    assert!(core::mem::size_of::<SockUdpKey>() == 32);
    assert!(core::mem::size_of::<ActivatorPorts>() == 24);
};

/// The datapath clock is CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`; on kernels
/// before 5.11 `bpf_ktime_get_ns`, CLOCK_MONOTONIC) plus this offset, in `CtValue::last_seen`
/// and wherever the agent compares with it. A freshly booted node has a clock of a few
/// seconds, so "an hour ago" would not exist on the raw clock (it saturates at 0); with the
/// offset every past instant since long before boot has a value. In hex the offset is the
/// leading `0x4`: `0x4000_0000_0000_0000 + ns since boot`.
pub const CLOCK_EPOCH_NS: u64 = 1 << 62;

/// A `last_seen` read from conntrack on the datapath clock. Values below half the offset
/// were written on the raw clock (by a release before the offset, or never set): they get
/// the offset added, so flows survive an upgrade with their age.
#[inline(always)]
pub fn ct_time(last_seen: u64) -> u64 {
    if last_seen < CLOCK_EPOCH_NS / 2 {
        last_seen + CLOCK_EPOCH_NS
    } else {
        last_seen
    }
}

/// Default capacity of `SOCK_FLOWS` (sockets whose `connect()` was translated).
pub const MAX_SOCK_FLOWS: u32 = 262_144;
/// Default capacity of `SOCK_UDP` (unconnected UDP sockets' translated destinations).
pub const MAX_SOCK_UDP: u32 = 65_536;

/// `SockFlow::flags`: the socket was sent to an activator (Proxy).
pub const SOCK_PROXIED: u8 = 1 << 0;

/// What the socket hooks translated: the VIP:port the application named and the target it
/// was given instead. Value of `SOCK_FLOWS` (key: the socket's cookie, for a `connect()`)
/// and of `SOCK_UDP` (an unconnected UDP socket's `sendmsg()`). `getpeername()` and
/// `recvmsg()` turn `target` back into `vip`, so the application only ever sees the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockFlow {
    pub vip: [u32; 4],
    pub target: [u32; 4],
    pub vip_port: u16,
    pub target_port: u16,
    pub svc_id: u32,
    /// `FAMILY_V4` / `FAMILY_V6` of the VIP and the target (an IPv4 service named through
    /// an IPv4-mapped IPv6 address is `FAMILY_V4`).
    pub family: u8,
    pub proto: u8,
    /// `SOCK_PROXIED`.
    pub flags: u8,
    pub _pad: [u8; 5],
}

/// Key of `SOCK_UDP`: a socket (cookie) and one target it sent datagrams to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockUdpKey {
    pub cookie: u64,
    pub target: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// `ACT_PORTS` index of the IPv4 and the IPv6 activator listener (also their `ACT_SOCKS`
/// index).
pub const ACT_V4: u32 = 0;
pub const ACT_V6: u32 = 1;

/// Value of `ACT_PORTS`: the node-local activator's address of one family, its range of
/// per-service ports (`first .. first + count`, host byte order; `count` 0: none) and its
/// listener's own port (`listen`, 0: not steered). The `sk_lookup` program hands a
/// connection to any of these ports to the activator's listening socket (`ACT_SOCKS`); with
/// `ACT_GUARDED` only a connection the datapath delivered (`ACT_ADMIT` or a conntrack
/// entry), since the listener itself is bound to loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivatorPorts {
    pub addr: [u32; 4],
    pub first: u16,
    pub count: u16,
    pub listen: u16,
    pub family: u8,
    pub flags: u8,
}

/// `ActivatorPorts::flags`: the listener is on loopback; only delivered flows reach it.
pub const ACT_GUARDED: u8 = 1 << 0;

/// Default capacity of `ACT_ADMIT` (translated `connect()`s to the node-local activator,
/// by tuple; entries age out by LRU).
pub const MAX_ACT_ADMIT: u32 = 65_536;
