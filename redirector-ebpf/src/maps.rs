//! The BPF maps: declared once here as BTF maps so `bpftool map dump` prints field names.
//! The agent pins them by name under its pin path; sizes are defaults it can override.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, SockMap},
    macros::btf_map,
};
use redirector_common::{
    ActivatorPorts, CtKey, CtValue, DatapathConfig, Endpoint, MaglevKey, MaglevSmallValue,
    MaglevValue, ServiceKey, ServiceMeta, ServiceStats, ServiceValue, SockFlow, SockUdpKey,
    G_COUNT, HOOKED_SLOTS, MAX_ACT_ADMIT, MAX_BACKENDS, MAX_CONNTRACK, MAX_SERVICES,
    MAX_SOCK_FLOWS, MAX_SOCK_UDP,
};

/// VIP:port:proto → service (mode, backend count, activator).
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// (service id, set) → Maglev table of backend ids. Not preallocated: memory follows the
/// services that exist. Replacing a value is atomic for readers.
#[btf_map]
pub static MAGLEV: HashMap<
    MaglevKey,
    MaglevValue,
    { MAX_SERVICES as usize * 2 },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// (service id, set) → Maglev table of a set of at most `MAGLEV_SMALL_MAX` backends (1 KiB
/// per table instead of 4 KiB). `ServiceValue::flags` says which map holds a set's table.
#[btf_map]
pub static MAGLEV_SMALL: HashMap<
    MaglevKey,
    MaglevSmallValue,
    { MAX_SERVICES as usize * 2 },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Backend id → endpoint. Written before any table references the id.
#[btf_map]
pub static BACKENDS: Array<Endpoint, { MAX_BACKENDS as usize }> = Array::new();

/// Flow tuple → rewrite. One global LRU shared by all CPUs and all programs.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { MAX_CONNTRACK as usize }> = LruHashMap::new();

/// During a conntrack resize, slot 0 holds the previous conntrack (the map the old
/// programs still use on the hooks not switched yet); empty otherwise. A flow missing from
/// `CONNTRACK` is looked up there and moved over on its first packet, and new flows are
/// written to both, so a flow keeps its translation whichever program sees its next
/// packet while the links are switched one by one. Not pinned: each agent fills its own,
/// and empties it once every link runs its programs (`Datapath::finish_migration`).
/// (The template's size does not matter: hash inner maps of any size are accepted.)
#[btf_map]
pub static CONNTRACK_PREV: ArrayOfMaps<LruHashMap<CtKey, CtValue, 64>, 1> = ArrayOfMaps::new();

/// Per-service counters, index = service id.
#[btf_map]
pub static SERVICE_STATS: PerCpuArray<ServiceStats, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Datapath-wide counters, index = `G_*`.
#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<u64, { G_COUNT as usize }> = PerCpuArray::new();

/// Tunables (timeouts), index `CONFIG_KEY`.
#[btf_map]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Service id → name, for `redirector status` and bpftool (not read by the programs).
#[btf_map]
pub static SERVICE_META: HashMap<
    u32,
    ServiceMeta,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Pod interfaces (ifindex) that are veths whose peer is the pod's, a direct-mapped set
/// (`HOOKED_SLOTS`: an array lookup, which the verifier inlines, instead of a hash): with
/// `[node] host_routing = "bpf"`, translated packets routed out of one of them are handed
/// to the pod's side directly (`tc::to_peer`). Not pinned: each agent fills its own.
#[btf_map]
pub static PEERS: Array<u32, { HOOKED_SLOTS as usize }> = Array::new();

/// Socket cookie → what `connect()` translated (socket hooks): read back by `getpeername()`
/// and `recvmsg()`, counted by the agent as the service's live socket flows, removed when
/// the socket is released.
#[btf_map]
pub static SOCK_FLOWS: LruHashMap<u64, SockFlow, { MAX_SOCK_FLOWS as usize }> = LruHashMap::new();

/// (socket cookie, target) → what an unconnected UDP socket's `sendmsg()` translated, for
/// `recvmsg()` to show the VIP as the datagrams' source. Entries age out by LRU.
#[btf_map]
pub static SOCK_UDP: LruHashMap<SockUdpKey, SockFlow, { MAX_SOCK_UDP as usize }> =
    LruHashMap::new();

/// The node-local activator's address and per-service port range, per family (`ACT_V4`,
/// `ACT_V6`). Not pinned: each agent fills its own.
#[btf_map]
pub static ACT_PORTS: Array<ActivatorPorts, 2> = Array::new();

/// Translated `connect()`s to the node-local activator, keyed by their tuple as the
/// activator will see it (`saddr`/`sport`: the client, `daddr`/`dport`: the activator; ports
/// in network byte order), value the service id. Written by `sock_ops` when the SYN is about
/// to leave (the source port is known only then), read by `sk_lookup`: these flows have no
/// conntrack entry, and this is how the activator tells them from a connection made to its
/// address directly. Entries age out by LRU.
#[btf_map]
pub static ACT_ADMIT: LruHashMap<CtKey, u32, { MAX_ACT_ADMIT as usize }> = LruHashMap::new();

/// The activator's listening sockets (`ACT_V4`, `ACT_V6`), for `sk_lookup`. Not pinned.
#[btf_map]
pub static ACT_SOCKS: SockMap<2> = SockMap::new();

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}
