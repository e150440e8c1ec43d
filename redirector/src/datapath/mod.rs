//! The kernel datapath: loads the eBPF object embedded in this binary, pins its maps and
//! links under the pin path (adopting what a previous agent left there), attaches the
//! programs to interfaces, and gives typed access to the maps (`maps`).
mod attach;
pub mod batch;
pub mod bpffs;
pub mod features;
pub mod maps;
pub mod migrate;
pub mod skb_layout;
pub mod sockets;
pub mod steer;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    programs::{ProgramError, SchedClassifier, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use redirector_common::{HOOKED_SLOTS, MAX_BACKENDS, MAX_CONNTRACK, MAX_SERVICES};

pub use attach::{
    detach_clsact_everywhere, link_pin_path, pinned_links as pinned_links_at, AttachReport, Hook,
};
pub use maps::{Maps, MapsError};

/// The eBPF object, built by build.rs and embedded: no path to a build folder at run time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

/// Program names in the object.
pub const PROG_XDP: &str = "redirector_xdp";
pub const PROG_TC_INGRESS: &str = "redirector_tc_ingress";
pub const PROG_TC_EGRESS: &str = "redirector_tc_egress";
pub const PROG_XDP_EMPTY: &str = "redirector_xdp_empty";
pub const PROG_TC_EMPTY: &str = "redirector_tc_empty";

/// The previous conntrack during a resize (not pinned, see the eBPF side).
const CONNTRACK_PREV: &str = "CONNTRACK_PREV";

fn lend_conntrack(ebpf: &mut Ebpf, old: &aya::maps::MapData) -> Result<(), DatapathError> {
    let err = |source| MapsError::Map {
        name: CONNTRACK_PREV,
        source,
    };
    let prev = ebpf.map_mut(CONNTRACK_PREV).ok_or(MapsError::Missing {
        name: CONNTRACK_PREV,
    })?;
    let mut prev: aya::maps::ArrayOfMaps<_> =
        aya::maps::ArrayOfMaps::try_from(prev).map_err(err)?;
    prev.set(0, old, 0).map_err(err)?;
    Ok(())
}

/// Every map, pinned as `<pin_path>/<NAME>`.
pub const MAP_NAMES: [&str; 12] = [
    "SERVICES",
    "MAGLEV",
    "MAGLEV_SMALL",
    "BACKENDS",
    "CONNTRACK",
    "SERVICE_STATS",
    "GLOBAL_STATS",
    "CONFIG",
    "SERVICE_META",
    "SOCK_FLOWS",
    "SOCK_UDP",
    "ACT_ADMIT",
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error(
        "another agent is running on pin path {path} (it holds the path's lock): two agents on \
         one pin path break each other; stop it first, or give this one another \
         node.pin_path / --pin-path"
    )]
    Locked { path: PathBuf },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    /// The verifier refused a program: the kernel lacks something it uses. The full
    /// verifier log is at debug level; this says which program, on which kernel, and the
    /// log's last lines (its verdict).
    #[error(
        "the kernel ({features}) refused program {name}: {reason}; the verifier's last \
         words: {tail} (the full log with RUST_LOG=redirector=debug)"
    )]
    Refused {
        name: &'static str,
        features: String,
        reason: std::io::Error,
        tail: String,
    },
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("{0}")]
    Maps(#[from] MapsError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("per-service activator ports: {message}")]
    Steer { message: String },
    #[error("socket hooks on cgroup {cgroup}: {message}")]
    Sockets { cgroup: PathBuf, message: String },
    #[error("attaching {hook} to {ifname}: {message}")]
    Attach {
        ifname: String,
        hook: Hook,
        message: String,
    },
}

/// Capacities of the sized maps (`[maps]` in the config). SERVICES, SERVICE_STATS and
/// SERVICE_META hold `services` entries, MAGLEV and MAGLEV_SMALL twice that (a Serve and a
/// Proxy table per service), BACKENDS `backends`, CONNTRACK `conntrack` (two entries per flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            conntrack: MAX_CONNTRACK,
        }
    }
}

impl MapSizes {
    /// Accepted ranges, checked by the config parser.
    pub const SERVICES: std::ops::RangeInclusive<u32> = 16..=4_194_304;
    pub const BACKENDS: std::ops::RangeInclusive<u32> = 16..=16_777_216;
    pub const CONNTRACK: std::ops::RangeInclusive<u32> = 1024..=134_217_728;

    fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for name in MAP_NAMES {
            if let Some(s) = migrate::wanted(name, self) {
                loader.map_max_entries(name, s.max_entries);
            }
        }
    }
}

/// How the tc programs update the L4 checksum of a packet they rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// In place when the skb's `ip_summed` (located through the kernel's BTF) is NONE,
    /// UNNECESSARY or PARTIAL; through `bpf_l4_csum_replace` for CHECKSUM_COMPLETE.
    InPlace,
    /// Always through `bpf_l4_csum_replace` (the CHECKSUM_COMPLETE path, for tests; also
    /// what happens when the BTF lookup fails).
    Helpers,
}

/// Loaded programs plus their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    /// Maps already taken out of the object (to copy a resized map's old entries).
    maps: Option<Maps>,
    /// Maps that replaced pinned ones of another layout and start empty.
    recreated_empty: Vec<&'static str>,
    /// What `PEERS` holds: slot → ifindex (the map is this agent's own, so this is exact).
    peers: BTreeMap<u32, u32>,
}

impl Datapath {
    /// Loads the programs and pins (or adopts pinned) maps under `pin_path`, mounting a
    /// bpffs there first if none is mounted. Pinned maps of another size or layout are
    /// replaced by maps of `sizes`, with their entries copied over (`migrate`).
    /// `host_routing`: whether translated packets to local pods skip the node's stack
    /// (`[node] host_routing = "bpf"`, the pods' veths given by `set_peers`).
    pub fn open(
        pin_path: &Path,
        sizes: &MapSizes,
        host_routing: bool,
    ) -> Result<Self, DatapathError> {
        bpffs::ensure(pin_path)?;
        std::fs::create_dir_all(pin_path.join("links")).map_err(|source| DatapathError::Io {
            op: "creating",
            path: pin_path.join("links"),
            source,
        })?;
        let paths: Vec<(&'static str, PathBuf)> =
            MAP_NAMES.iter().map(|n| (*n, pin_path.join(n))).collect();
        let retired = migrate::retire_mismatched(&MAP_NAMES, pin_path, sizes)?;
        let mut loader = EbpfLoader::new();
        let ip_summed = ip_summed_global();
        loader.override_global("SKB_IP_SUMMED", &ip_summed, true);
        let coarse = coarse_clock() as u32;
        loader.override_global("CLOCK_COARSE", &coarse, true);
        let host_routing = host_routing as u32;
        loader.override_global("HOST_ROUTING_BPF", &host_routing, true);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        sizes.apply(&mut loader);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        load_programs(&mut ebpf)?;
        if let Some(old) = retired.conntrack() {
            lend_conntrack(&mut ebpf, &old)?;
            tracing::info!("the new programs share the old conntrack until every link is switched");
        }
        let mut maps = None;
        let mut recreated_empty = Vec::new();
        if !retired.is_empty() {
            let mut m = Maps::from_ebpf(&mut ebpf)?;
            let report = migrate::copy_retired(retired, &mut m, sizes);
            recreated_empty = report
                .into_iter()
                .filter(|(_, c)| c.is_none())
                .map(|(n, _)| n)
                .collect();
            maps = Some(m);
        }
        Ok(Self {
            ebpf,
            pin_path: pin_path.to_owned(),
            maps,
            recreated_empty,
            peers: BTreeMap::new(),
        })
    }

    /// Loads the programs with private, unpinned maps (tests and benchmarks).
    pub fn open_unpinned() -> Result<Self, DatapathError> {
        Self::open_unpinned_with(L4Checksum::InPlace)
    }

    /// `open_unpinned`, choosing how the tc programs update L4 checksums.
    pub fn open_unpinned_with(l4: L4Checksum) -> Result<Self, DatapathError> {
        Self::open_unpinned_sized(l4, &MapSizes::default())
    }

    /// `open_unpinned_with`, with maps of `sizes` (tests of full maps).
    pub fn open_unpinned_sized(l4: L4Checksum, sizes: &MapSizes) -> Result<Self, DatapathError> {
        let ip_summed = match l4 {
            L4Checksum::InPlace => ip_summed_global(),
            L4Checksum::Helpers => 0,
        };
        let coarse = coarse_clock() as u32;
        let mut loader = EbpfLoader::new();
        loader
            .override_global("SKB_IP_SUMMED", &ip_summed, true)
            .override_global("CLOCK_COARSE", &coarse, true);
        sizes.apply(&mut loader);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        load_programs(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_path: PathBuf::new(),
            maps: None,
            recreated_empty: Vec::new(),
            peers: BTreeMap::new(),
        })
    }

    /// After the programs are attached: completes a conntrack resize with the flows the
    /// previous programs created meanwhile (no-op without one).
    pub fn finish_migration(&self) {
        let n = migrate::copy_late_flows(&self.pin_path);
        if n > 0 {
            tracing::info!(
                flows = n,
                "copied conntrack entries created during the switch"
            );
        }
        if let Err(e) = self.return_conntrack() {
            tracing::warn!(error = %e, "emptying CONNTRACK_PREV");
        }
    }

    /// Lets the programs read (and add flows to) `old`, a conntrack the programs of the
    /// previous agent still use, until `return_conntrack`: see `CONNTRACK_PREV`.
    pub fn lend_conntrack(&mut self, old: &aya::maps::MapData) -> Result<(), DatapathError> {
        lend_conntrack(&mut self.ebpf, old)
    }

    /// Ends `lend_conntrack` (no-op without one).
    pub fn return_conntrack(&self) -> Result<(), DatapathError> {
        match self.ebpf.map(CONNTRACK_PREV) {
            Some(aya::maps::Map::ArrayOfMaps(data)) => {
                migrate::unlend_conntrack(data).map_err(|source| DatapathError::Io {
                    op: "emptying",
                    path: PathBuf::from(CONNTRACK_PREV),
                    source,
                })
            }
            _ => Err(MapsError::Missing {
                name: CONNTRACK_PREV,
            }
            .into()),
        }
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// Maps that replaced pinned maps of another layout (an upgrade) and could not take
    /// their entries: they start empty.
    pub fn recreated_empty(&self) -> &[&'static str] {
        &self.recreated_empty
    }

    /// Typed handles on the maps (clones of the map fds: valid as long as needed). The maps
    /// can be taken once.
    pub fn maps(&mut self) -> Result<Maps, DatapathError> {
        match self.maps.take() {
            Some(m) => Ok(m),
            None => Ok(Maps::from_ebpf(&mut self.ebpf)?),
        }
    }

    /// Makes `PEERS` hold exactly `ifindexes`: the pod veths that translated packets may be
    /// handed to directly with `[node] host_routing = "bpf"` (a direct-mapped set: of two
    /// interfaces with the same slot only the lower is recorded; one left out takes the
    /// stack's way). Returns the interfaces left out.
    pub fn set_peers(&mut self, ifindexes: &BTreeSet<u32>) -> Result<Vec<u32>, DatapathError> {
        write_slots(&mut self.ebpf, "PEERS", &mut self.peers, ifindexes)
    }

    pub fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, name)
    }

    pub fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }
}

/// Writes a direct-mapped interface set (`PEERS`: slot = ifindex mod
/// `HOOKED_SLOTS`) so that it holds `ifindexes`, `current` mirroring every write (so a
/// failed one leaves it exact). Of two interfaces with the same slot only the lower is
/// recorded; returns the others.
fn write_slots(
    ebpf: &mut Ebpf,
    name: &'static str,
    current: &mut BTreeMap<u32, u32>,
    ifindexes: &BTreeSet<u32>,
) -> Result<Vec<u32>, DatapathError> {
    let err = |source| MapsError::Map { name, source };
    let mut want = BTreeMap::new();
    let mut left_out = Vec::new();
    for &i in ifindexes.iter().filter(|&&i| i != 0) {
        match want.entry(i & (HOOKED_SLOTS - 1)) {
            std::collections::btree_map::Entry::Occupied(_) => left_out.push(i),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(i);
            }
        }
    }
    let map = ebpf.map_mut(name).ok_or(MapsError::Missing { name })?;
    let mut m: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).map_err(err)?;
    let stale: Vec<u32> = (current.keys())
        .filter(|s| !want.contains_key(s))
        .copied()
        .collect();
    for slot in stale {
        m.set(slot, 0, 0).map_err(err)?;
        current.remove(&slot);
    }
    for (slot, i) in want {
        if current.get(&slot) != Some(&i) {
            m.set(slot, i, 0).map_err(err)?;
            current.insert(slot, i);
        }
    }
    Ok(left_out)
}

/// The running kernel's features, probed once per process (`features::KernelFeatures`).
pub fn kernel() -> &'static features::KernelFeatures {
    static FEATURES: std::sync::OnceLock<features::KernelFeatures> = std::sync::OnceLock::new();
    FEATURES.get_or_init(features::KernelFeatures::probe)
}

/// Whether the programs read CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`, 5.11+) or,
/// without that helper, CLOCK_MONOTONIC; the agent's side of the clock follows.
pub fn coarse_clock() -> bool {
    kernel().coarse_clock
}

/// A program of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let err = |name| {
        move |source| match source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                let log = verifier_log.to_string();
                tracing::debug!(program = name, "verifier log:\n{log}");
                let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
                DatapathError::Refused {
                    name,
                    features: kernel().line(),
                    reason: io_error,
                    tail: lines[lines.len().saturating_sub(3)..].join(" / "),
                }
            }
            source => DatapathError::Program { name, source },
        }
    };
    for name in [PROG_XDP, PROG_XDP_EMPTY] {
        program::<Xdp>(ebpf, name)?.load().map_err(err(name))?;
    }
    for name in [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_TC_EMPTY] {
        program::<SchedClassifier>(ebpf, name)?
            .load()
            .map_err(err(name))?;
    }
    Ok(())
}

/// The programs' `SKB_IP_SUMMED`: where the kernel keeps `sk_buff::ip_summed` (from its
/// BTF), or 0, with which the tc programs update every L4 checksum through the helper.
fn ip_summed_global() -> u32 {
    // Kernel lockdown in confidentiality mode takes bpf_probe_read_kernel away (probed by
    // loading a program that calls it, not read from securityfs, which a DaemonSet need not
    // mount); with the global at 0 the verifier never reaches that call (it prunes the
    // branch).
    if !kernel().probe_read_kernel {
        tracing::warn!(
            "no bpf_probe_read_kernel (kernel lockdown?): tc programs update L4 checksums \
             through the helper"
        );
        return 0;
    }
    match skb_layout::ip_summed() {
        Ok(f) => {
            tracing::debug!(byte = f.byte, shift = f.shift, "sk_buff.ip_summed from BTF");
            f.global()
        }
        Err(e) => {
            tracing::warn!("{e}: tc programs update L4 checksums through bpf_l4_csum_replace only");
            0
        }
    }
}
