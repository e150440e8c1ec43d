//! The activator's reach: the `sk_lookup` program on this network namespace hands a
//! connection to the activator's address on any of the per-service ports to the
//! activator's listening socket (`ACT_SOCKS`), so that one listener serves a port per
//! service; guarded, the listener is bound to loopback and only the flows the datapath
//! delivered reach it (also on the address's own port). Its link is pinned
//! (`links/netns@sk_lookup`) and a restarted agent swaps its program in (`BPF_LINK_UPDATE`).
use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::PathBuf,
};

use aya::{
    maps::{Array, SockMap},
    programs::{links::FdLink, SkLookup},
};
use redirector_common::{ActivatorPorts, ACT_GUARDED, ACT_V4, ACT_V6};

use super::{sockets, Datapath, DatapathError};
use crate::addr::ip_words;

/// The program's name in the object.
pub const PROG_SK_LOOKUP: &str = "redirector_sk_lookup";

fn err(message: String) -> DatapathError {
    DatapathError::Steer { message }
}

impl Datapath {
    fn sk_lookup_pin(&self) -> PathBuf {
        self.pin_path.join("links").join("netns@sk_lookup")
    }

    /// Hands connections to each activator address on ports `first .. first + count` to
    /// that address's listener (one per family), and attaches the program to this
    /// namespace. `guarded`: the listeners are bound elsewhere (loopback), so connections
    /// to the address's own port are handed over too, and only flows the datapath
    /// delivered.
    pub fn steer_activator(
        &mut self,
        listeners: &[(SocketAddr, BorrowedFd<'_>)],
        (first, count): (u16, u16),
        guarded: bool,
    ) -> Result<(), DatapathError> {
        {
            let map = self
                .ebpf
                .map_mut("ACT_SOCKS")
                .ok_or_else(|| err("no ACT_SOCKS map".into()))?;
            let mut socks: SockMap<_> = SockMap::try_from(map).map_err(|e| err(e.to_string()))?;
            for (addr, fd) in listeners {
                let idx = if addr.is_ipv4() { ACT_V4 } else { ACT_V6 };
                socks
                    .set(idx, fd, 0)
                    .map_err(|e| err(format!("ACT_SOCKS[{idx}] = {addr}: {e}")))?;
            }
        }
        {
            let map = self
                .ebpf
                .map_mut("ACT_PORTS")
                .ok_or_else(|| err("no ACT_PORTS map".into()))?;
            let mut ports: Array<_, ActivatorPorts> =
                Array::try_from(map).map_err(|e| err(e.to_string()))?;
            for (addr, _) in listeners {
                let (words, family) = ip_words(addr.ip());
                let idx = if addr.is_ipv4() { ACT_V4 } else { ACT_V6 };
                let v = ActivatorPorts {
                    addr: words,
                    first,
                    count,
                    listen: if guarded { addr.port() } else { 0 },
                    family,
                    flags: if guarded { ACT_GUARDED } else { 0 },
                };
                ports
                    .set(idx, v, 0)
                    .map_err(|e| err(format!("ACT_PORTS[{idx}]: {e}")))?;
            }
        }
        self.attach_sk_lookup()
    }

    fn attach_sk_lookup(&mut self) -> Result<(), DatapathError> {
        let pin = self.sk_lookup_pin();
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(PROG_SK_LOOKUP)
            .ok_or(DatapathError::MissingProgram(PROG_SK_LOOKUP))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
        }
        let prog_fd = prog
            .fd()
            .map_err(|source| DatapathError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?
            .as_fd()
            .as_raw_fd();
        if pin.exists() {
            if let Ok(link) = sockets::obj_get(&pin) {
                if sockets::update_link(&link, prog_fd).is_ok() {
                    return Ok(());
                }
            }
            let _ = std::fs::remove_file(&pin);
        }
        let netns = std::fs::File::open("/proc/self/ns/net")
            .map_err(|e| err(format!("/proc/self/ns/net: {e}")))?;
        let id = prog.attach(&netns).map_err(|e| err(e.to_string()))?;
        let link: FdLink = prog.take_link(id).map_err(|e| err(e.to_string()))?.into();
        link.pin(&pin)
            .map_err(|e| err(format!("pinning {}: {e}", pin.display())))?;
        Ok(())
    }
}

/// Detaches the `sk_lookup` program pinned under `pin_path`. Returns whether one was.
pub fn detach_steering(pin_path: &std::path::Path) -> bool {
    std::fs::remove_file(pin_path.join("links").join("netns@sk_lookup")).is_ok()
}
