//! The socket hooks on a cgroup v2: finding the cgroup (`[node] cgroup`), loading the
//! socket programs and attaching them with pinned links (`links/cgroup@<hook>`), so they
//! stay attached while the agent restarts. All of them or none: a kernel that refuses one
//! of the required programs leaves the node on the packet path, and the caller logs that.
//! A restarted agent swaps its programs into the pinned links of the same cgroup
//! (`BPF_LINK_UPDATE`, no moment without a hook); links to another cgroup are replaced by
//! new ones (new first: two attached programs never translate twice, since a target is no
//! VIP).
use std::{
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps};

use super::{batch, Datapath, DatapathError};

/// The socket programs: (program name, pin name of its link, required).
pub const SOCKET_PROGRAMS: [(&str, &str, bool); 10] = [
    ("redirector_connect4", "connect4", true),
    ("redirector_connect6", "connect6", true),
    ("redirector_sendmsg4", "sendmsg4", true),
    ("redirector_sendmsg6", "sendmsg6", true),
    ("redirector_recvmsg4", "recvmsg4", true),
    ("redirector_recvmsg6", "recvmsg6", true),
    ("redirector_getpeername4", "getpeername4", true),
    ("redirector_getpeername6", "getpeername6", true),
    // Ends a socket's flow in SOCK_FLOWS; without it (a kernel refusing the socket cookie
    // there) entries age out by LRU and the live-flow count includes closed sockets.
    ("redirector_sock_release", "sock_release", false),
    // Admits a translated connect() to the node-local activator by its tuple (ACT_ADMIT):
    // without it the guarded activator would refuse those flows.
    ("redirector_sock_ops", "sock_ops", true),
];

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Where `[node] cgroup = "auto"` attaches: the first cgroup v2 mount of this mount
/// namespace (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn find_cgroup2() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Only a mount of the hierarchy's root (field 4): a bind mount of a subtree would
        // hook only part of the node.
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let point = f.next()?;
        (root == "/").then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// Whether `path` is a directory of a cgroup v2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == CGROUP2_MAGIC
}

/// What `attach_sockets` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketReport {
    /// Hooks whose pinned link now runs this agent's program.
    pub replaced: usize,
    /// Hooks attached anew.
    pub attached: usize,
    /// Optional hooks the kernel refused (program, reason).
    pub skipped: Vec<(&'static str, String)>,
}

fn pin_of(pin_path: &Path, hook: &str) -> PathBuf {
    pin_path.join("links").join(format!("cgroup@{hook}"))
}

/// Detaches the socket hooks pinned under `pin_path` (their links go with the pins).
/// Returns how many there were.
pub fn detach_sockets(pin_path: &Path) -> usize {
    SOCKET_PROGRAMS
        .iter()
        .filter(|(_, hook, _)| std::fs::remove_file(pin_of(pin_path, hook)).is_ok())
        .count()
}

/// `bpf_link_info` up to the cgroup member of its union.
#[repr(C)]
#[derive(Default)]
struct LinkInfoCgroup {
    ty: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD`'s attribute.
#[repr(C)]
struct InfoAttr {
    fd: u32,
    len: u32,
    info: u64,
}

/// `BPF_LINK_UPDATE`'s attribute.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_OBJ_GET`'s attribute.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Opens the pinned object at `path`.
pub(super) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the attribute is the command's prefix and `c` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The cgroup id a cgroup link is attached to.
fn link_cgroup(link: &OwnedFd) -> Option<u64> {
    let fd = link.as_raw_fd();
    let mut info = LinkInfoCgroup::default();
    let mut attr = InfoAttr {
        fd: fd as u32,
        len: std::mem::size_of::<LinkInfoCgroup>() as u32,
        info: &mut info as *mut LinkInfoCgroup as u64,
    };
    // SAFETY: the attribute is the command's prefix and `info` outlives the call.
    unsafe { batch::bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.ok()?;
    Some(info.cgroup_id)
}

/// Swaps `prog_fd` into the pinned `link` atomically.
pub(super) fn update_link(link: &OwnedFd, prog_fd: i32) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the attribute is the command's prefix.
    unsafe { batch::bpf(BPF_LINK_UPDATE, &mut attr) }
}

impl Datapath {
    /// Loads the socket programs and attaches them to `cgroup` (a cgroup v2 directory).
    /// On an error nothing of this call stays attached (links pinned before it stay).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<SocketReport, DatapathError> {
        let err = |message: String| DatapathError::Sockets {
            cgroup: cgroup.to_owned(),
            message,
        };
        if !is_cgroup2(cgroup) {
            return Err(err("not a cgroup v2 directory".into()));
        }
        let cg = std::fs::File::open(cgroup).map_err(|e| err(e.to_string()))?;
        let cg_id = cg.metadata().map_err(|e| err(e.to_string()))?.ino();
        let mut report = SocketReport {
            replaced: 0,
            attached: 0,
            skipped: Vec::new(),
        };
        // New links of this call: unpinned again if a later one fails.
        let mut fresh: Vec<PathBuf> = Vec::new();
        for (name, hook, required) in SOCKET_PROGRAMS {
            let pin = pin_of(&self.pin_path, hook);
            match self.attach_socket_program(name, &cg, cg_id, &pin) {
                Ok(Attached::Replaced) => report.replaced += 1,
                Ok(Attached::New) => {
                    report.attached += 1;
                    fresh.push(pin);
                }
                Err(e) if !required => {
                    let _ = std::fs::remove_file(&pin);
                    report.skipped.push((name, e));
                }
                Err(e) => {
                    for p in &fresh {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(err(format!("{name}: {e}")));
                }
            }
        }
        Ok(report)
    }

    fn attach_socket_program(
        &mut self,
        name: &'static str,
        cg: &std::fs::File,
        cg_id: u64,
        pin: &Path,
    ) -> Result<Attached, String> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name} in the object"))?;
        let kind = Kind::of(prog);
        // Loaded here, not with the packet programs: a kernel without these hooks still
        // runs the packet path.
        macro_rules! load {
            ($t:ty) => {{
                let p: &mut $t = prog.try_into().map_err(|e| format!("{e}"))?;
                if p.fd().is_err() {
                    p.load().map_err(load_error)?;
                }
                p.fd().map_err(|e| e.to_string())?.as_fd().as_raw_fd()
            }};
        }
        let prog_fd = match kind {
            Kind::Sock => load!(CgroupSock),
            Kind::SockOps => load!(SockOps),
            Kind::SockAddr => load!(CgroupSockAddr),
        };
        let mut old = None;
        if pin.exists() {
            match obj_get(pin) {
                Ok(fd) => {
                    let linked = link_cgroup(&fd);
                    if linked == Some(cg_id) {
                        match update_link(&fd, prog_fd) {
                            Ok(()) => return Ok(Attached::Replaced),
                            Err(e) => {
                                tracing::debug!(pin = %pin.display(), error = %e, "socket link not updated")
                            }
                        }
                    } else {
                        tracing::debug!(pin = %pin.display(), ?linked, cg_id, "socket link of another cgroup");
                    }
                    // Another cgroup (or a link that can't be updated): it stays attached
                    // (this fd) until the new one is, then goes with the fd.
                    old = Some(fd);
                }
                Err(e) => tracing::debug!(pin = %pin.display(), error = %e, "stale socket link"),
            }
            let _ = std::fs::remove_file(pin);
        }
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name}"))?;
        macro_rules! attach {
            ($t:ty) => {{
                let p: &mut $t = prog.try_into().map_err(|e| format!("{e}"))?;
                let id = p
                    .attach(cg, CgroupAttachMode::Single)
                    .map_err(|e| e.to_string())?;
                p.take_link(id)
                    .map_err(|e| e.to_string())?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| e.to_string())?
            }};
        }
        let link: FdLink = match kind {
            Kind::Sock => attach!(CgroupSock),
            Kind::SockOps => attach!(SockOps),
            Kind::SockAddr => attach!(CgroupSockAddr),
        };
        link.pin(pin)
            .map_err(|e| format!("pinning {}: {e}", pin.display()))?;
        drop(old);
        Ok(Attached::New)
    }
}

enum Attached {
    Replaced,
    New,
}

/// The program types of `SOCKET_PROGRAMS`.
#[derive(Clone, Copy)]
enum Kind {
    Sock,
    SockOps,
    SockAddr,
}

impl Kind {
    fn of(prog: &aya::programs::Program) -> Kind {
        match prog {
            aya::programs::Program::CgroupSock(_) => Kind::Sock,
            aya::programs::Program::SockOps(_) => Kind::SockOps,
            _ => Kind::SockAddr,
        }
    }
}

fn load_error(e: aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            format!(
                "the kernel refused it ({io_error}): {}",
                last[last.len().saturating_sub(2)..].join(" / ")
            )
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cgroup2_mount_that_is_cgroup2() {
        // Every machine this runs on has one (the project needs cgroup v2).
        let p = find_cgroup2().expect("a cgroup2 mount in /proc/self/mountinfo");
        assert!(is_cgroup2(&p), "{}", p.display());
        assert!(!is_cgroup2(Path::new("/proc")));
    }
}
