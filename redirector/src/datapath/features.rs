//! What the running kernel offers the datapath, probed rather than assumed from a version
//! number or from files a DaemonSet may not mount: tcx links (6.6) or clsact filters before
//! them, the coarse clock helper (5.11) or `bpf_ktime_get_ns`, `bpf_probe_read_kernel`
//! (missing under lockdown=confidentiality) for in-place L4 checksums, the socket hooks
//! (cgroup sock_addr), sk_lookup, batched map operations, and the kernel's BTF with
//! `sk_buff::ip_summed`. The agent logs one line of it at start, `redirector probe` and
//! `redirector status` print it, and the loader chooses its fallbacks from it.
use aya::{
    maps::MapType,
    programs::{ProgramType, SchedClassifier, TcAttachType},
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

use super::skb_layout;

/// The kernel's answers; `None` where the probe itself failed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// tcx links on tc hooks (else clsact filters).
    pub tcx: bool,
    /// `bpf_ktime_get_coarse_ns` (else `bpf_ktime_get_ns`).
    pub coarse_clock: bool,
    /// `bpf_probe_read_kernel` from tc programs (lockdown=confidentiality removes it).
    pub probe_read_kernel: bool,
    /// cgroup sock_addr programs (connect/sendmsg/recvmsg/getpeername hooks).
    pub sock_addr: bool,
    /// sk_lookup programs.
    pub sk_lookup: bool,
    /// BPF_MAP_LOOKUP_BATCH / DELETE_BATCH on hash maps.
    pub batch_ops: bool,
    /// `/sys/kernel/btf/vmlinux`.
    pub btf: bool,
    /// Bit offset + 1 of `sk_buff::ip_summed` (0: unknown), from the BTF.
    pub ip_summed: u32,
}

impl KernelFeatures {
    /// Probes the running kernel (a few tiny program loads; no side effects).
    pub fn probe() -> Self {
        let helper = |h| is_helper_supported(ProgramType::SchedClassifier, h).unwrap_or(false);
        let btf = std::path::Path::new(skb_layout::VMLINUX_BTF).exists();
        Self {
            release: release(),
            tcx: SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok(),
            coarse_clock: helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
            probe_read_kernel: helper(BpfHelper::BPF_FUNC_probe_read_kernel),
            sock_addr: is_program_supported(ProgramType::CgroupSockAddr).unwrap_or(false),
            sk_lookup: is_program_supported(ProgramType::SkLookup).unwrap_or(false),
            batch_ops: batch_ops(),
            btf,
            ip_summed: skb_layout::ip_summed().map(|f| f.global()).unwrap_or(0),
        }
    }

    /// Whether the tc programs can update L4 checksums in place (else through the helper).
    pub fn in_place_checksums(&self) -> bool {
        self.probe_read_kernel && self.ip_summed != 0
    }

    /// Logs the line at start, and a warning on a kernel older than the oldest the kernel
    /// matrix proves ([`OLDEST_PROVEN`]).
    pub fn log(&self) {
        tracing::info!("{}", self.line());
        if let Some(v) = version(&self.release) {
            if v < OLDEST_PROVEN {
                tracing::warn!(
                    release = %self.release,
                    "kernel older than {}.{}, the oldest that `cargo xtask kernels` proves; \
                     programs the verifier refuses are reported with its reason",
                    OLDEST_PROVEN.0,
                    OLDEST_PROVEN.1
                );
            }
        }
    }

    /// One line for the log and `redirector probe`.
    pub fn line(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        format!(
            "kernel {}: tc={} clock={} checksums={} sock_addr={} sk_lookup={} batch_ops={} btf={} ip_summed={}",
            self.release,
            if self.tcx { "tcx" } else { "clsact" },
            if self.coarse_clock { "coarse" } else { "ktime_get_ns" },
            if self.in_place_checksums() {
                "in-place"
            } else if !self.probe_read_kernel {
                "helper (no bpf_probe_read_kernel: lockdown?)"
            } else {
                "helper (sk_buff layout unknown)"
            },
            yn(self.sock_addr),
            yn(self.sk_lookup),
            yn(self.batch_ops),
            yn(self.btf),
            match self.ip_summed {
                0 => "unknown".to_owned(),
                g => format!("bit {}", g - 1),
            },
        )
    }
}

/// The oldest kernel series the kernel matrix boots and passes (README "Kernels").
pub const OLDEST_PROVEN: (u32, u32) = (5, 10);

/// `major.minor` of a release string like `6.1.0-57-amd64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".to_owned();
    }
    // SAFETY: release is NUL-terminated by uname.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Batched lookups on a throw-away hash map: ENOENT (empty map, supported) or success.
fn batch_ops() -> bool {
    if !is_map_supported(MapType::Hash).unwrap_or(false) {
        return false;
    }
    super::batch::probe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_release_strings() {
        assert_eq!(version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(version("5.10.0-46-amd64"), Some((5, 10)));
        assert_eq!(version("6.18.2"), Some((6, 18)));
        assert_eq!(version("unknown"), None);
        assert!(version("5.4.0-1").is_some_and(|v| v < OLDEST_PROVEN));
        assert!(version("5.10.262").is_some_and(|v| v >= OLDEST_PROVEN));
    }
}
