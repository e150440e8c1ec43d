//! Batched reads and deletes of hash maps (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! Linux 5.6+): the agent's periodic sweeps over the conntrack map take a few syscalls per
//! thousand entries instead of two per entry (`get_next_key` + lookup), which at a few
//! hundred thousand flows is the difference between a sweep costing milliseconds and costing
//! most of a CPU. Kernels without batch operations get the per-entry walk.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Pod,
};

/// Entries asked for per lookup call.
const CHUNK: usize = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `bpf_attr.batch` of the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch operation on a map: {0}")]
    Sys(#[source] std::io::Error),
    #[error("walking a map: {0}")]
    Walk(#[from] aya::maps::MapError),
}

pub(super) fn fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// The `bpf(2)` syscall with `attr` as its `bpf_attr` (the command's prefix of it).
///
/// # Safety
/// `attr` must be the `#[repr(C)]` prefix of `bpf_attr` that `cmd` reads, and every buffer
/// it points to must be valid for what `cmd` reads or writes there.
pub(super) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> Result<(), std::io::Error> {
    // SAFETY: the caller's contract.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `e` says the kernel (or this map type) has no batch operations.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524 /* ENOTSUPP */)
    )
}

/// Calls `f` on every entry of `map` (a snapshot per chunk: entries added or removed while
/// the walk goes on may or may not be seen, as with any walk of a live map).
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(&K, &V),
) -> Result<(), BatchError> {
    let data = map.map();
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    let mut cap = CHUNK;
    // The position in the map: for hash maps the kernel's bucket index.
    let mut token = [0u64; 1];
    let mut first = true;
    loop {
        let mut next = [0u64; 1];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: cap as u32,
            map_fd: fd(data),
            ..Default::default()
        };
        // SAFETY: a batch `bpf_attr`; its key and value buffers hold `attr.count` entries.
        let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = (attr.count as usize).min(cap);
        let done = match r {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                // One bucket holds more entries than the buffer: a bigger one.
                cap *= 2;
                keys.reserve(cap);
                values.reserve(cap);
                continue;
            }
            Err(e) if first && unsupported(&e) => return walk(map, f),
            Err(e) => return Err(BatchError::Sys(e)),
        };
        // SAFETY: the kernel wrote `got` entries of the map's key and value sizes, which are
        // those of K and V (the typed map checked them when it was created).
        unsafe {
            keys.set_len(got);
            values.set_len(got);
        }
        for (k, v) in keys.iter().zip(values.iter()) {
            f(k, v);
        }
        if done {
            return Ok(());
        }
        token = next;
        first = false;
        keys.clear();
        values.clear();
    }
}

/// The per-entry walk, for kernels without batch lookups.
fn walk<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(&K, &V),
) -> Result<(), BatchError> {
    for r in map.iter() {
        match r {
            Ok((k, v)) => f(&k, &v),
            // An entry removed between get_next_key and lookup.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Removes `keys` from `map`; keys already gone are skipped. Returns how many were removed.
pub fn delete<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
) -> Result<usize, BatchError> {
    let map_fd = fd(map.map());
    let mut removed = 0;
    let mut at = 0;
    while at < keys.len() {
        let chunk = &keys[at..(at + CHUNK).min(keys.len())];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd,
            ..Default::default()
        };
        // SAFETY: a batch `bpf_attr`; its key buffer holds `attr.count` keys.
        match unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) } {
            Ok(()) => {
                removed += chunk.len();
                at += chunk.len();
            }
            // The key at `count` was not there (expired or evicted since): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = (attr.count as usize).min(chunk.len());
                removed += done;
                at += done + 1;
            }
            Err(e) if removed == 0 && at == 0 && unsupported(&e) => {
                return Ok(keys.iter().filter(|k| map.remove(k).is_ok()).count());
            }
            Err(e) => return Err(BatchError::Sys(e)),
        }
    }
    Ok(removed)
}

/// Whether the kernel has batched lookups on hash maps: one on a throw-away empty hash map
/// answers ENOENT (nothing to return) where they exist and EINVAL where they don't.
pub fn probe() -> bool {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut create = CreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: CreateAttr is the prefix of bpf_attr that BPF_MAP_CREATE reads.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut create as *mut CreateAttr,
            std::mem::size_of::<CreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return false;
    }
    let mut keys = [0u32; 1];
    let mut values = [0u32; 1];
    let mut out = 0u32;
    let mut attr = BatchAttr {
        out_batch: &mut out as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: 1,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: the buffers hold `count` keys and values of the map's sizes.
    let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
    // SAFETY: fd is the map created above, closed once.
    unsafe { libc::close(fd as i32) };
    match r {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::ENOENT),
    }
}
