//! Resizing pinned maps across agent restarts. A pinned map whose capacity or layout differs
//! from what this agent wants is moved aside (`retired/<NAME>`), the loader creates and pins a
//! new one in its place, and the old entries are copied over (what fits in the new size),
//! so services and established flows survive a `[maps]` change. The old pin is removed once
//! copied; the old programs keep the old maps alive until their links are switched to the
//! new programs.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Pod,
};
use redirector_common::{
    CtKey, CtValue, DatapathConfig, Endpoint, MaglevKey, MaglevSmallValue, MaglevValue, ServiceKey,
    ServiceMeta, ServiceStats, ServiceValue, SockFlow, SockUdpKey, G_COUNT, MAX_ACT_ADMIT,
    MAX_SOCK_FLOWS, MAX_SOCK_UDP,
};

use super::{DatapathError, MapSizes, Maps};

/// What a map should look like: key size, value size, capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub key: u32,
    pub value: u32,
    pub max_entries: u32,
}

fn shape<K, V>(max_entries: u32) -> Shape {
    Shape {
        key: std::mem::size_of::<K>() as u32,
        value: std::mem::size_of::<V>() as u32,
        max_entries,
    }
}

/// The shape this agent creates for each map.
pub fn wanted(name: &str, s: &MapSizes) -> Option<Shape> {
    Some(match name {
        "SERVICES" => shape::<ServiceKey, ServiceValue>(s.services),
        "MAGLEV" => shape::<MaglevKey, MaglevValue>(s.services.saturating_mul(2)),
        "MAGLEV_SMALL" => shape::<MaglevKey, MaglevSmallValue>(s.services.saturating_mul(2)),
        "BACKENDS" => shape::<u32, Endpoint>(s.backends),
        "CONNTRACK" => shape::<CtKey, CtValue>(s.conntrack),
        "SERVICE_STATS" => shape::<u32, ServiceStats>(s.services),
        "GLOBAL_STATS" => shape::<u32, u64>(G_COUNT),
        "CONFIG" => shape::<u32, DatapathConfig>(1),
        "SERVICE_META" => shape::<u32, ServiceMeta>(s.services),
        "SOCK_FLOWS" => shape::<u64, SockFlow>(MAX_SOCK_FLOWS),
        "SOCK_UDP" => shape::<SockUdpKey, SockFlow>(MAX_SOCK_UDP),
        "ACT_ADMIT" => shape::<CtKey, u32>(MAX_ACT_ADMIT),
        _ => return None,
    })
}

/// The shape of the map pinned at `path`, if one is.
pub fn pinned_shape(path: &Path) -> Option<Shape> {
    let data = MapData::from_pin(path).ok()?;
    let info = data.info().ok()?;
    Some(Shape {
        key: info.key_size(),
        value: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// Where a replaced map stays pinned until copied (bpffs allows no `.` in names and no
/// rename).
pub fn retired_path(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("retired").join(name)
}

/// Maps moved aside before loading, to be copied into the new ones.
#[derive(Debug, Default)]
pub struct Retired {
    /// map name → (pin of the old map, its shape)
    maps: BTreeMap<&'static str, (PathBuf, Shape)>,
}

impl Retired {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The old conntrack, if it is being replaced and its layout is this agent's (the new
    /// programs can then read it during the switch).
    pub fn conntrack(&self) -> Option<MapData> {
        let (path, have) = self.maps.get("CONNTRACK")?;
        let want = shape::<CtKey, CtValue>(have.max_entries);
        if *have != want {
            return None;
        }
        MapData::from_pin(path).ok()
    }
}

/// Before loading: moves every pinned map whose shape differs from the wanted one to
/// `<pin_path>/retired/<NAME>`. A retired map left by an agent that died mid-migration is used as the source
/// when no map is pinned under the real name, and removed otherwise.
pub fn retire_mismatched(
    names: &[&'static str],
    pin_path: &Path,
    sizes: &MapSizes,
) -> Result<Retired, DatapathError> {
    let mut out = Retired::default();
    for &name in names {
        let Some(want) = wanted(name, sizes) else {
            continue;
        };
        let path = pin_path.join(name);
        let old = retired_path(pin_path, name);
        let have = pinned_shape(&path);
        if old.exists() {
            if have.is_some() {
                let _ = std::fs::remove_file(&old);
            } else if let Some(s) = pinned_shape(&old) {
                out.maps.insert(name, (old.clone(), s));
                continue;
            }
        }
        let Some(have) = have else { continue };
        if have == want {
            continue;
        }
        tracing::warn!(
            map = name,
            pinned_entries = have.max_entries,
            wanted_entries = want.max_entries,
            pinned_key = have.key,
            pinned_value = have.value,
            "pinned map differs from this agent's; replacing it and copying its entries"
        );
        // bpffs has no rename: pin the map a second time under `retired/`, then unpin it.
        let moved = std::fs::create_dir_all(pin_path.join("retired"))
            .and_then(|()| {
                MapData::from_pin(&path).map_err(|e| std::io::Error::other(e.to_string()))
            })
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|m| {
                m.pin(&old)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .and_then(|()| std::fs::remove_file(&path));
        moved.map_err(|source| DatapathError::Io {
            op: "moving aside",
            path: path.clone(),
            source,
        })?;
        out.maps.insert(name, (old, have));
    }
    Ok(out)
}

/// What one map's copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub copied: usize,
    pub dropped: usize,
}

fn open_old(path: &Path) -> Option<Map> {
    Map::from_map_data(MapData::from_pin(path).ok()?).ok()
}

fn copy_hash<K: Pod, V: Pod>(
    old: Map,
    new: &mut HashMap<MapData, K, V>,
    keep: impl Fn(&K, &V) -> bool,
) -> Option<Copied> {
    let old: HashMap<MapData, K, V> = HashMap::try_from(old).ok()?;
    let mut c = Copied::default();
    let walked = super::batch::for_each(&old, |k, v| {
        if keep(k, v) && new.insert(k, v, 0).is_ok() {
            c.copied += 1;
        } else {
            c.dropped += 1;
        }
    });
    if let Err(e) = walked {
        tracing::warn!(error = %e, "reading a retired map");
    }
    Some(c)
}

/// An all-zero value: an array slot never written (nothing to copy).
fn is_zero<V: Pod>(v: &V) -> bool {
    // SAFETY: `Pod` values are plain bytes with no padding invariants.
    let bytes = unsafe {
        std::slice::from_raw_parts((v as *const V).cast::<u8>(), std::mem::size_of::<V>())
    };
    bytes.iter().all(|b| *b == 0)
}

/// Copies slots `0..old_len` that hold something (`get` gives `None` for an unwritten slot)
/// with `set`; slots beyond the new capacity are dropped.
fn copy_indexed<V>(
    old_len: u32,
    new_len: u32,
    get: impl Fn(u32) -> Option<V>,
    mut set: impl FnMut(u32, V) -> bool,
) -> Copied {
    let mut c = Copied::default();
    for i in 0..old_len {
        let Some(v) = get(i) else { continue };
        if i < new_len && set(i, v) {
            c.copied += 1;
        } else {
            c.dropped += 1;
        }
    }
    c
}

fn copy_array<V: Pod>(old: Map, new: &mut Array<MapData, V>) -> Option<Copied> {
    let old: Array<MapData, V> = Array::try_from(old).ok()?;
    Some(copy_indexed(
        old.len(),
        new.len(),
        |i| old.get(&i, 0).ok().filter(|v| !is_zero(v)),
        |i, v| new.set(i, v, 0).is_ok(),
    ))
}

fn copy_per_cpu<V: Pod>(old: Map, new: &mut PerCpuArray<MapData, V>) -> Option<Copied> {
    let old: PerCpuArray<MapData, V> = PerCpuArray::try_from(old).ok()?;
    Some(copy_indexed(
        old.len(),
        new.len(),
        |i| old.get(&i, 0).ok().filter(|v| !v.iter().all(is_zero)),
        |i, v| new.set(i, v, 0).is_ok(),
    ))
}

/// `bpf_map_update_elem` flag: only insert keys that are not there yet.
const BPF_NOEXIST: u64 = 1;

/// Empties `CONNTRACK_PREV` (aya has no delete for maps of maps): the old conntrack is
/// freed once its pin is removed too.
pub fn unlend_conntrack(prev: &MapData) -> Result<(), std::io::Error> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
    }
    let key: u32 = 0;
    let mut attr = Attr {
        map_fd: super::batch::fd(prev),
        _pad: 0,
        key: &key as *const u32 as u64,
    };
    // SAFETY: `attr` is the `bpf_attr` prefix BPF_MAP_DELETE_ELEM reads; `key` outlives the
    // call.
    match unsafe { super::batch::bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// After the new programs are attached: copies the flows the old programs created in the
/// retired conntrack since `copy_retired` (entries the new map already has are kept), then
/// removes the old pin. Returns how many were added.
pub fn copy_late_flows(pin_path: &Path) -> usize {
    let old_path = retired_path(pin_path, "CONNTRACK");
    if !old_path.exists() {
        return 0;
    }
    let open = |p: &Path| -> Option<HashMap<MapData, CtKey, CtValue>> {
        HashMap::try_from(open_old(p)?).ok()
    };
    let mut added = 0;
    if let (Some(old), Some(mut new)) = (open(&old_path), open(&pin_path.join("CONNTRACK"))) {
        let walked = super::batch::for_each(&old, |k, v| {
            if new.insert(k, v, BPF_NOEXIST).is_ok() {
                added += 1;
            }
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "reading the retired conntrack");
        }
    }
    let _ = std::fs::remove_file(&old_path);
    if let Some(d) = old_path.parent() {
        let _ = std::fs::remove_dir(d);
    }
    added
}

/// After loading: copies each retired map into its new counterpart, then removes the old
/// pin. Returns what each copy did (`None`: the layouts differ, the new map starts
/// empty). Entries that can't exist in the new maps (service ids at or above the new
/// service capacity) are dropped; the agent's next apply programs those services again.
pub fn copy_retired(
    retired: Retired,
    maps: &mut Maps,
    sizes: &MapSizes,
) -> BTreeMap<&'static str, Option<Copied>> {
    let mut report = BTreeMap::new();
    let svc_max = sizes.services;
    let dirs: std::collections::BTreeSet<PathBuf> = retired
        .maps
        .values()
        .filter_map(|(p, _)| p.parent().map(Path::to_owned))
        .collect();
    for (name, (path, have)) in retired.maps {
        let copied = open_old(&path).and_then(|old| match name {
            "SERVICES" => copy_hash(old, &mut maps.services, |_, v: &ServiceValue| {
                v.id < svc_max
            }),
            "MAGLEV" => copy_hash(old, &mut maps.maglev, |k: &MaglevKey, _| k.svc_id < svc_max),
            "MAGLEV_SMALL" => copy_hash(old, &mut maps.maglev_small, |k: &MaglevKey, _| {
                k.svc_id < svc_max
            }),
            "SERVICE_META" => copy_hash(old, &mut maps.meta, |k: &u32, _| *k < svc_max),
            "CONNTRACK" => copy_hash(old, &mut maps.conntrack, |_, _| true),
            "BACKENDS" => copy_array(old, &mut maps.backends),
            "CONFIG" => copy_array(old, &mut maps.config),
            "SERVICE_STATS" => copy_per_cpu(old, &mut maps.service_stats),
            "GLOBAL_STATS" => copy_per_cpu(old, &mut maps.global_stats),
            _ => None,
        });
        match copied {
            Some(c) => tracing::info!(
                map = name,
                copied = c.copied,
                dropped = c.dropped,
                old_entries = have.max_entries,
                "copied the old map's entries into the resized one"
            ),
            None => tracing::warn!(
                map = name,
                "old map's layout differs from this agent's: starting it empty"
            ),
        }
        report.insert(name, copied);
        // The running programs keep adding flows to the old conntrack until their links
        // are switched: it stays pinned for `copy_late_flows`.
        if name == "CONNTRACK" && copied.is_some() {
            continue;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing the old map's pin");
        }
    }
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
    report
}
