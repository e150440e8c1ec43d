//! Attaching programs to interfaces with pinned links, so that programs stay attached when
//! the agent stops and a new agent replaces them atomically (`bpf_link_update`).
use std::{fmt, path::PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
    LinkOrder, TcAttachType, XdpMode,
};

use super::{Datapath, DatapathError, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP};
use crate::config::XdpModeCfg;

/// Where a program hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Hook {
    pub fn as_str(&self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Hook::Xdp, Hook::TcIngress, Hook::TcEgress]
            .into_iter()
            .find(|h| h.as_str() == s)
    }
}

/// File name of a pinned link: bpffs rejects '.', which interface names may contain.
fn pin_name(ifname: &str, hook: Hook) -> String {
    format!(
        "{}@{}",
        ifname.replace('%', "%25").replace('.', "%2e"),
        hook.as_str()
    )
}

fn parse_pin_name(name: &str) -> Option<(String, Hook)> {
    let (ifname, hook) = name.rsplit_once('@')?;
    Some((
        ifname.replace("%2e", ".").replace("%25", "%"),
        Hook::parse(hook)?,
    ))
}

/// Path of the pinned link of `hook` on `ifname`.
pub fn link_pin_path(pin_path: &std::path::Path, ifname: &str, hook: Hook) -> PathBuf {
    pin_path.join("links").join(pin_name(ifname, hook))
}

/// Priority of redirector's clsact filters (kernels without tcx): fixed, so that a
/// restarted agent replaces its predecessor's filter instead of adding one, and uninstall
/// removes it. ("RD"; CNIs use the low priorities, the kernel's default starts at 49152.)
pub const CLSACT_PRIORITY: u16 = 0x5244;
/// Handle of those filters.
pub const CLSACT_HANDLE: u16 = 1;

/// Attaches `prog` as the clsact filter of `ty` on `ifname` at [`CLSACT_PRIORITY`]: replaces
/// the program of our filter there if one exists, else removes filters of the same program
/// name that an older agent added at another priority, then adds ours.
fn attach_clsact(
    prog: &mut aya::programs::SchedClassifier,
    ifname: &str,
    ty: TcAttachType,
) -> Result<&'static str, String> {
    use aya::programs::tc::{NlOptions, TcHandle};
    let handle = TcHandle::new(0, CLSACT_HANDLE);
    // Ours, left by the previous agent: replace its program in place.
    if let Ok(existing) = SchedClassifierLink::attached(ifname, ty, CLSACT_PRIORITY, handle, None) {
        if let Ok(id) = prog.attach_to_link(existing) {
            let link = prog.take_link(id).map_err(|e| e.to_string())?;
            std::mem::forget(link);
            return Ok("clsact (replaced)");
        }
    }
    let _ = aya::programs::tc::qdisc_add_clsact(ifname);
    // Filters of an agent that did not use the fixed priority.
    let name = prog_name(ty);
    if aya::programs::tc::qdisc_detach_program(ifname, ty, name).is_ok() {
        tracing::info!(ifname, %name, "removed older clsact filters");
    }
    let id = prog
        .attach_with_options(
            ifname,
            ty,
            TcAttachOptions::Netlink(NlOptions {
                priority: CLSACT_PRIORITY,
                handle,
                ..NlOptions::default()
            }),
        )
        .map_err(|e| e.to_string())?;
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    // Dropping the link would detach the filter; it must outlive the agent.
    std::mem::forget(link);
    Ok("clsact")
}

fn prog_name(ty: TcAttachType) -> &'static str {
    if ty == TcAttachType::Ingress {
        PROG_TC_INGRESS
    } else {
        PROG_TC_EGRESS
    }
}

/// Removes redirector's clsact filters (kernels without tcx) from every interface of this
/// network namespace. Returns how many hooks had one.
pub fn detach_clsact_everywhere() -> usize {
    let mut n = 0;
    for link in crate::netlink::links().unwrap_or_default() {
        for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
            if aya::programs::tc::qdisc_detach_program(&link.name, ty, prog_name(ty)).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// What an attach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachReport {
    /// A pinned link of a previous agent now runs this agent's program.
    Replaced,
    /// A new link. `mode` says native/generic for XDP.
    Attached { mode: &'static str },
}

impl Datapath {
    fn link_pin(&self, ifname: &str, hook: Hook) -> PathBuf {
        link_pin_path(&self.pin_path, ifname, hook)
    }

    /// Attaches `hook` on `ifname`, adopting a pinned link left by a previous agent.
    pub fn attach(
        &mut self,
        ifname: &str,
        hook: Hook,
        xdp_mode: XdpModeCfg,
    ) -> Result<AttachReport, DatapathError> {
        let pin = self.link_pin(ifname, hook);
        let err = |message: String| DatapathError::Attach {
            ifname: ifname.to_owned(),
            hook,
            message,
        };
        if pin.exists() {
            match self.replace_pinned(&pin, hook) {
                Ok(()) => return Ok(AttachReport::Replaced),
                Err(e) => {
                    // The interface it belonged to is gone (or the link is otherwise stale).
                    tracing::debug!(ifname, %hook, error = %e, "dropping stale pinned link");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let (fd_link, mode): (FdLink, &'static str) = match hook {
            Hook::Xdp => {
                let prog = self.xdp(PROG_XDP)?;
                let try_modes: &[(XdpMode, &'static str)] = match xdp_mode {
                    XdpModeCfg::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
                    XdpModeCfg::Native => &[(XdpMode::Driver, "native")],
                    XdpModeCfg::Generic => &[(XdpMode::Skb, "generic")],
                };
                let mut last = String::new();
                let mut done = None;
                for (m, label) in try_modes {
                    match prog.attach(ifname, *m) {
                        Ok(id) => {
                            let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                            let fd: FdLink = link
                                .try_into()
                                .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
                            done = Some((fd, *label));
                            break;
                        }
                        Err(e) => last = format!("{label}: {e}"),
                    }
                }
                done.ok_or_else(|| err(last))?
            }
            Hook::TcIngress | Hook::TcEgress => {
                let (name, ty) = if hook == Hook::TcIngress {
                    (PROG_TC_INGRESS, TcAttachType::Ingress)
                } else {
                    (PROG_TC_EGRESS, TcAttachType::Egress)
                };
                let prog = self.tc(name)?;
                match prog.attach_with_options(
                    ifname,
                    ty,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                ) {
                    Ok(id) => {
                        let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                        let fd: FdLink = link
                            .try_into()
                            .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
                        (fd, "tcx")
                    }
                    Err(tcx_err) => {
                        // Kernels before 6.6: a clsact filter, which can't be pinned but
                        // outlives the agent. It sits at a fixed priority and handle, so the
                        // next agent replaces its program in place (no moment without one)
                        // and `uninstall` finds it.
                        let mode = attach_clsact(prog, ifname, ty)
                            .map_err(|e| err(format!("tcx: {tcx_err}; clsact: {e}")))?;
                        return Ok(AttachReport::Attached { mode });
                    }
                }
            }
        };
        fd_link
            .pin(&pin)
            .map_err(|e| err(format!("pinning link at {}: {e}", pin.display())))?;
        Ok(AttachReport::Attached { mode })
    }

    fn replace_pinned(&mut self, pin: &std::path::Path, hook: Hook) -> Result<(), String> {
        let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
        let fd: FdLink = pinned.into();
        match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.xdp(PROG_XDP).map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                // The link stays pinned; release our handle without detaching.
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
            }
            Hook::TcIngress | Hook::TcEgress => {
                let name = if hook == Hook::TcIngress {
                    PROG_TC_INGRESS
                } else {
                    PROG_TC_EGRESS
                };
                let link = SchedClassifierLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.tc(name).map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }

    /// Detaches `hook` from `ifname` (removes the pinned link).
    pub fn detach(&self, ifname: &str, hook: Hook) -> bool {
        std::fs::remove_file(self.link_pin(ifname, hook)).is_ok()
    }

    /// Interfaces with a pinned link (`(ifname, hook)`), e.g. left by a previous agent.
    pub fn pinned_links(&self) -> Vec<(String, Hook)> {
        pinned_links(&self.pin_path)
    }
}

/// Lists pinned links under `pin_path/links`.
pub fn pinned_links(pin_path: &std::path::Path) -> Vec<(String, Hook)> {
    let Ok(dir) = std::fs::read_dir(pin_path.join("links")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| parse_pin_name(&e.file_name().to_string_lossy()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_roundtrip_without_dots() {
        for ifname in ["eth0", "eth0.100", "we%rd.x"] {
            for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
                let n = pin_name(ifname, hook);
                assert!(!n.contains('.'), "{n}");
                assert_eq!(parse_pin_name(&n), Some((ifname.to_owned(), hook)));
            }
        }
    }
}
