//! Makes sure the pin path lives on a bpffs (mounts one when none is mounted there), and
//! locks it: one agent per pin path.
use std::{ffi::CString, os::fd::AsRawFd, path::Path};

use super::DatapathError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub(crate) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Ensures `pin_path` is on a bpffs. Mounts at `/sys/fs/bpf` when the pin path is below it,
/// at the pin path itself otherwise.
pub fn ensure(pin_path: &Path) -> Result<(), DatapathError> {
    let mut probe = pin_path;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe) {
        return Ok(());
    }
    let target = if pin_path.starts_with("/sys/fs/bpf") {
        Path::new("/sys/fs/bpf")
    } else {
        pin_path
    };
    std::fs::create_dir_all(target).map_err(|e| DatapathError::Bpffs {
        path: target.to_owned(),
        message: format!("no bpffs mounted and the mount point can't be created: {e}"),
    })?;
    let t =
        CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| DatapathError::Bpffs {
            path: target.to_owned(),
            message: "path contains a NUL byte".into(),
        })?;
    // SAFETY: valid C strings; mount(2) with no data.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            t.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(DatapathError::Bpffs {
            path: target.to_owned(),
            message: format!(
                "no bpffs mounted and mounting one failed: {e} (run as root with CAP_SYS_ADMIN, or mount bpffs on the host and share it)"
            ),
        });
    }
    tracing::info!(path = %target.display(), "mounted bpffs");
    Ok(())
}

/// An exclusive `flock` on the pin directory, held while the agent runs (released when the
/// process exits, however it exits).
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

/// Takes the pin path's lock (creating the directory, on a bpffs, first). A second agent on
/// one pin path would adopt the pins, swap the programs, share the activator's port and
/// remove the first one's instances: it is refused instead.
pub fn lock(pin_path: &Path) -> Result<PinLock, DatapathError> {
    ensure(pin_path)?;
    let io = |op| {
        move |source| DatapathError::Io {
            op,
            path: pin_path.to_owned(),
            source,
        }
    };
    std::fs::create_dir_all(pin_path).map_err(io("creating"))?;
    let dir = std::fs::File::open(pin_path).map_err(io("opening"))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DatapathError::Locked {
                path: pin_path.to_owned(),
            });
        }
        return Err(io("locking")(e));
    }
    Ok(PinLock { _dir: dir })
}
