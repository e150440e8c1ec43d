//! Makes sure the pin path lives on a bpffs: mounts one when none is mounted there.
use std::{ffi::CString, path::Path};

use super::DatapathError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
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
