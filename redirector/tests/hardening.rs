//! Hardening of the agent's state (needs root: fails with "needs root: ..." otherwise):
//! pinned state that is corrupt or not ours (adopt repairs it, uninstall leaves ordinary
//! files alone, a map of another layout is named the right way round), the pin path's lock,
//! maps filled exactly by the config, and the property that every config `check` accepts
//! is programmed whole through the real control path.
mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use proptest::prelude::*;
use redirector::{
    addr::{endpoint_addr, ip_words, port_wire},
    config::Config,
    control::{desired_from_config, DesiredService, Programmer},
    datapath::{Datapath, L4Checksum, MapSizes, Maps},
};
use redirector_common::{
    MaglevKey, ServiceKey, ServiceValue, FAMILY_V4, MODE_SERVE, PROTO_TCP, SET_PROXY, SET_SERVE,
    SVC_PROXY_SMALL, SVC_SERVE_SMALL,
};

const SMALL: MapSizes = MapSizes {
    services: 16,
    backends: 16,
    conntrack: 1024,
};

fn small_datapath() -> (Datapath, Programmer) {
    let mut dp =
        Datapath::open_unpinned_sized(L4Checksum::Helpers, &SMALL).expect("loading the datapath");
    let maps = dp.maps().expect("taking the maps");
    (dp, Programmer::adopt(maps, &SMALL))
}

/// The endpoints one set of a service entry leads to, read back from the maps.
fn members(maps: &Maps, v: &ServiceValue, set: u32) -> BTreeSet<SocketAddr> {
    let (count, small_bit) = if set == SET_SERVE {
        (v.backend_count, SVC_SERVE_SMALL)
    } else {
        (v.proxy_count, SVC_PROXY_SMALL)
    };
    if count == 0 {
        return BTreeSet::new();
    }
    let key = MaglevKey { svc_id: v.id, set };
    let ids: Vec<u32> = if v.flags & small_bit != 0 {
        maps.maglev_small.get(&key, 0).map(|t| t.slots.to_vec())
    } else {
        maps.maglev.get(&key, 0).map(|t| t.slots.to_vec())
    }
    .expect("the set's table");
    ids.into_iter()
        .map(|id| maps.backends.get(&id, 0).expect("backend id in range"))
        .filter_map(|e| endpoint_addr(&e))
        .collect()
}

/// Asserts the maps hold exactly `desired`: every entry, its mode and both sets.
fn assert_whole(maps: &Maps, desired: &[DesiredService], sizes: &MapSizes) {
    let installed: Vec<(ServiceKey, ServiceValue)> =
        maps.services.iter().map(|r| r.unwrap()).collect();
    assert_eq!(installed.len(), desired.len(), "entries in SERVICES");
    for d in desired {
        let v = maps
            .services
            .get(&d.key, 0)
            .unwrap_or_else(|e| panic!("{} missing from SERVICES: {e}", d.name));
        assert!(v.id < sizes.services, "{}: id {}", d.name, v.id);
        assert_eq!(v.mode, d.mode, "{}", d.name);
        assert_eq!(
            members(maps, &v, SET_SERVE),
            d.serve,
            "{} serve set",
            d.name
        );
        assert_eq!(
            members(maps, &v, SET_PROXY),
            d.proxy,
            "{} proxy set",
            d.name
        );
    }
}

fn key(ip: &str, port: u16) -> ServiceKey {
    let (addr, family) = ip_words(ip.parse().unwrap());
    ServiceKey {
        addr,
        port: port_wire(port),
        proto: PROTO_TCP,
        family,
    }
}

fn serve(name: &str, vip: &str, backends: &[SocketAddr]) -> DesiredService {
    DesiredService {
        key: key(vip, 80),
        name: name.into(),
        mode: MODE_SERVE,
        serve: backends.iter().copied().collect(),
        proxy: BTreeSet::new(),
        activator: None,
        kind: Default::default(),
    }
}

fn backend(i: usize) -> SocketAddr {
    format!("10.1.{}.{}:8080", i / 200, 1 + i % 200)
        .parse()
        .unwrap()
}

#[test]
fn adopt_repairs_service_ids_outside_the_maps() {
    require_root!();
    let _g = common::serial();
    let (_dp, mut prog) = small_datapath();
    let a = serve("a", "10.96.0.1", &[backend(0)]);
    let b = serve("b", "10.96.0.2", &[backend(1)]);
    let c = serve("c", "10.96.0.3", &[backend(2)]);
    let report = prog.apply(&[a.clone(), b.clone(), c.clone()]).unwrap();
    assert_eq!(report.added, 3);
    // Corrupt the pinned state as a foreign or broken writer would.
    let maps = prog.maps_mut();
    for (d, id) in [(&a, u32::MAX), (&b, 30_000_000)] {
        let mut v = maps.services.get(&d.key, 0).unwrap();
        v.id = id;
        maps.services.insert(d.key, v, 0).unwrap();
    }
    // And a table slot naming a backend id outside BACKENDS.
    let cv = maps.services.get(&c.key, 0).unwrap();
    let small = MaglevKey {
        svc_id: cv.id,
        set: SET_SERVE,
    };
    let mut t = maps.maglev_small.get(&small, 0).unwrap();
    t.slots[7] = 0xffff_fff0;
    maps.maglev_small.insert(small, t, 0).unwrap();
    let maps = prog.into_maps();
    // Before: "attempt to add with overflow" (id u32::MAX) or a 30M-entry free list.
    let mut prog = Programmer::adopt(maps, &SMALL);
    assert_eq!(prog.repaired(), 3);
    assert!(
        prog.maps().services.get(&a.key, 0).is_err(),
        "bad entry removed"
    );
    let report = prog.apply(&[a.clone(), b.clone(), c.clone()]).unwrap();
    assert_eq!((report.added, report.skipped), (2, 0), "{report:?}");
    assert_eq!(report.updated, 1, "the table with a bad slot is rewritten");
    assert_whole(prog.maps(), &[a, b, c], &SMALL);
}

#[test]
fn adopting_healthy_state_rewrites_nothing() {
    require_root!();
    let _g = common::serial();
    let (_dp, mut prog) = small_datapath();
    let all: Vec<SocketAddr> = (0..14).map(backend).collect();
    let mut proxied = serve("p", "10.96.0.3", &all[..3]);
    proxied.proxy = all[12..].iter().copied().collect();
    let desired = vec![
        serve("large", "10.96.0.1", &all[..10]),
        serve("small", "10.96.0.2", &all[8..12]),
        proxied,
        serve("empty", "10.96.0.4", &[]),
    ];
    assert_eq!(prog.apply(&desired).unwrap().added, 4);
    let mut prog = Programmer::adopt(prog.into_maps(), &SMALL);
    assert_eq!(prog.repaired(), 0);
    let r = prog.apply(&desired).unwrap();
    assert_eq!((r.unchanged, r.updated, r.added), (4, 0, 0), "{r:?}");
    assert_whole(prog.maps(), &desired, &SMALL);
}

#[test]
fn full_maps_converge_on_a_backend_change() {
    require_root!();
    let _g = common::serial();
    let (_dp, mut prog) = small_datapath();
    let all: Vec<SocketAddr> = (0..16).map(backend).collect();
    let first = vec![
        serve("a", "10.96.0.1", &all[..10]),
        serve("b", "10.96.0.2", &all[10..]),
    ];
    let r = prog.apply(&first).unwrap();
    assert_eq!((r.added, r.skipped), (2, 0));
    // One backend replaced: its id is needed while the old one is still referenced.
    let mut changed = all.clone();
    changed[15] = backend(16);
    let second = vec![
        serve("a", "10.96.0.1", &changed[..10]),
        serve("b", "10.96.0.2", &changed[10..]),
    ];
    let r = prog.apply(&second).unwrap();
    assert_eq!(r.skipped, 0, "{r:?}");
    assert_whole(prog.maps(), &second, &SMALL);
    // Every service replaced by another (their ids cool down before reuse).
    let third: Vec<DesiredService> = (0..16)
        .map(|i| serve(&format!("s{i}"), &format!("10.96.1.{i}"), &[backend(i)]))
        .collect();
    let r = prog.apply(&third).unwrap();
    assert_eq!(r.skipped, 0, "{r:?}");
    assert_whole(prog.maps(), &third, &SMALL);
    // More than the maps hold (what `check` refuses, e.g. from the cluster): the rest is
    // programmed, the one that doesn't fit is counted.
    let mut over = third.clone();
    over.push(serve("s16", "10.96.1.16", &[backend(0)]));
    let r = prog.apply(&over).unwrap();
    assert_eq!((r.unchanged, r.skipped), (16, 1), "{r:?}");
    assert_whole(prog.maps(), &third, &SMALL);
}

#[test]
fn pin_path_lock_refuses_a_second_agent() {
    require_root!();
    let pin = PathBuf::from(format!("/sys/fs/bpf/rdlock{}", std::process::id()));
    let first = redirector::datapath::bpffs::lock(&pin).unwrap();
    let e = redirector::datapath::bpffs::lock(&pin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another agent is running on pin path"), "{e}");
    drop(first);
    let again = redirector::datapath::bpffs::lock(&pin).expect("free once the first is gone");
    drop(again);
    std::fs::remove_dir(&pin).unwrap();
}

#[test]
fn uninstall_leaves_a_non_bpffs_path_alone() {
    require_root!();
    let dir = std::env::temp_dir().join(format!("rduninst{}", std::process::id()));
    std::fs::create_dir_all(dir.join("links")).unwrap();
    for f in ["SERVICES", "CONNTRACK", "links/eth0_xdp"] {
        std::fs::write(dir.join(f), "user data").unwrap();
    }
    let e = redirector::agent::uninstall(&dir).unwrap_err().to_string();
    assert!(e.contains("not a bpffs"), "{e}");
    for f in ["SERVICES", "CONNTRACK", "links/eth0_xdp"] {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), "user data");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Nothing there: nothing removed (the binary says so instead of "removed").
    let missing = PathBuf::from(format!("/sys/fs/bpf/rdnothing{}", std::process::id()));
    let done = redirector::agent::uninstall(&missing).unwrap();
    assert_eq!(done.maps, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_redirector"))
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&missing)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("nothing to remove") && !said.contains("removed"),
        "{said}"
    );
}

/// `BPF_MAP_CREATE` + `BPF_OBJ_PIN` of a hash map with the given sizes.
fn pin_hash_map(path: &Path, key: u32, value: u32) {
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[1 /* BPF_MAP_TYPE_HASH */, key, value, 16]);
    // SAFETY: bpf(2) with a zeroed bpf_attr prefix for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 4];
    pin[0] = c.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN with pathname and bpf_fd; `c` outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            pin.as_mut_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(r, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: our fd.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn wrong_shape_map_error_names_pinned_and_our_sizes() {
    require_root!();
    let pin = PathBuf::from(format!("/sys/fs/bpf/rdshape{}", std::process::id()));
    std::fs::create_dir_all(&pin).unwrap();
    let ours = std::mem::size_of::<ServiceValue>() as u32;
    let key = std::mem::size_of::<ServiceKey>() as u32;
    pin_hash_map(&pin.join("SERVICES"), key, ours + 8);
    let e = Maps::open_pinned(&pin).err().expect("refused").to_string();
    let _ = std::fs::remove_file(pin.join("SERVICES"));
    let _ = std::fs::remove_dir(&pin);
    assert!(
        e.contains(&format!(
            "the pinned map's value size is {} bytes, this agent's is {ours}",
            ours + 8
        )),
        "{e}"
    );
}

// --- property: what `check` accepts is programmed whole ---------------------------------

/// VIPs: mostly IPv4 (a service with an IPv6 VIP needs an IPv6 backend too).
fn vip_pool(i: usize) -> String {
    match i {
        0..38 => format!("10.96.0.{}", i % 12 + 1),
        _ => format!("fd00:96::{}", i - 37),
    }
}
/// Port 0 one time in forty.
fn port_pool(i: usize) -> u16 {
    if i == 0 {
        0
    } else {
        [80, 443, 8080][i % 3]
    }
}
const PROTOCOLS: [&str; 4] = ["http", "h2c", "tcp", "udp"];

/// Backend addresses: 14 IPv4, 5 IPv6 (more than the 16 the maps hold), now and then a VIP
/// or an address with a zone.
fn backend_pool(i: usize) -> String {
    match i {
        0..14 => format!("\"10.1.0.{}:8080\"", i + 1),
        14..19 => format!("\"[fd00:1::{}]:8080\"", i - 13),
        19..118 => format!("\"10.1.0.{}:8080\"", i % 14 + 1),
        118 => "\"10.96.0.1:80\"".into(),
        _ => "\"[fe80::1%2]:8080\"".into(),
    }
}

#[derive(Debug, Clone)]
struct GenService {
    name: usize,
    namespace: bool,
    vips: Vec<usize>,
    port: usize,
    protocol: usize,
    proxy: bool,
    backends: Vec<usize>,
}

fn gen_service() -> impl Strategy<Value = GenService> {
    (
        0..12usize,
        any::<bool>(),
        prop::collection::vec(0..40usize, 1..3),
        0..40usize,
        0..PROTOCOLS.len(),
        any::<bool>(),
        prop::collection::vec(0..120usize, 0..7),
    )
        .prop_map(
            |(name, namespace, vips, port, protocol, proxy, backends)| GenService {
                name,
                namespace,
                vips,
                port,
                protocol,
                proxy,
                backends,
            },
        )
}

fn render(services: &[GenService]) -> String {
    let mut s = String::from(
        "[node]\nactivator = [\"10.244.0.1:8012\", \"[fd00:244::1]:8012\"]\n[maps]\nservices = 16\nbackends = 16\n",
    );
    for g in services {
        let vips: Vec<String> = g
            .vips
            .iter()
            .map(|v| format!("{:?}", vip_pool(*v)))
            .collect();
        let backends: Vec<String> = g.backends.iter().map(|b| backend_pool(*b)).collect();
        s.push_str(&format!(
            "[[service]]\nname = \"s{}\"\n{}vip = [{}]\nport = {}\nprotocol = \"{}\"\nmode = \"{}\"\nbackends = [{}]\n",
            g.name,
            if g.namespace { "namespace = \"ns\"\n" } else { "" },
            vips.join(", "),
            port_pool(g.port),
            PROTOCOLS[g.protocol],
            if g.proxy { "proxy" } else { "serve" },
            backends.join(", "),
        ));
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Two configs in turn (a start, then a reload): each one `check` accepts is in the maps
    /// whole after `apply` — every entry, its mode, both sets — with nothing skipped.
    #[test]
    fn configs_check_accepts_are_programmed_whole(
        first in prop::collection::vec(gen_service(), 0..10),
        second in prop::collection::vec(gen_service(), 0..10),
    ) {
        require_root!();
        let _g = common::serial();
        let (_dp, mut prog) = small_datapath();
        for services in [first, second] {
            let text = render(&services);
            let Ok(cfg) = Config::parse(&text, Path::new("gen.toml")) else { continue };
            let desired = desired_from_config(&cfg);
            let r = prog.apply(&desired).unwrap();
            prop_assert_eq!(r.skipped, 0, "{:?}\n{}", r, text);
            assert_whole(prog.maps(), &desired, &SMALL);
            for d in &desired {
                // A VIP of a service with backends has some of its family (none dropped).
                let svc = cfg.services.iter().find(|s| s.full_name() == d.name).unwrap();
                let v4 = d.key.family == FAMILY_V4;
                prop_assert_eq!(
                    d.serve.len(),
                    svc.backends.iter().filter(|b| b.is_ipv4() == v4).collect::<BTreeSet<_>>().len(),
                    "{}\n{}", d.name, text
                );
                if !svc.backends.is_empty() {
                    prop_assert!(!d.serve.is_empty(), "{} lost its backends\n{}", d.name, text);
                }
            }
        }
    }
}
