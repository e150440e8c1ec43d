//! The BPF maps: declared once here as BTF maps so `bpftool map dump` prints field names.
//! The agent pins them by name under its pin path; sizes are defaults it can override.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use redirector_common::{
    CtKey, CtValue, DatapathConfig, Endpoint, MaglevKey, MaglevSmallValue, MaglevValue, ServiceKey,
    ServiceMeta, ServiceStats, ServiceValue, G_COUNT, HOOKED_SLOTS, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_SERVICES,
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

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}
