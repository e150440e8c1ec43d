//! Minimal rtnetlink: list the interfaces of the current network namespace and wake up on
//! link events (a new pod's veth appearing). Uses netlink, not /sys, so it is right when the
//! agent entered a network namespace with `nsenter --net` (sysfs still shows the host).
use std::{io, mem::size_of};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const RTMGRP_LINK: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFO_LEN: usize = 16;

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn open(groups: u32) -> io::Result<Socket> {
    // SAFETY: plain socket(2)/bind(2) calls with valid arguments.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Socket(fd);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        if libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }
}

fn recv(s: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::recv(s.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// An interface of this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The link kind (`IFLA_INFO_KIND`: "veth", "netkit", "bridge", ...); `None` for
    /// devices without one (physical NICs, loopback).
    pub kind: Option<String>,
}

fn attr_str(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The attributes of `buf` as (type, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16_at(buf, off)? as usize;
        let ty = u16_at(buf, off + 2)? & 0x3fff;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + 4..off + len];
        off += (len + 3) & !3;
        Some((ty, payload))
    })
}

/// Parses one RTM_NEWLINK payload.
fn parse_link(msg: &[u8]) -> Option<Link> {
    let index = u32_at(msg, 4)?;
    let mut name = None;
    let mut kind = None;
    for (ty, payload) in attrs(msg.get(IFINFO_LEN..)?) {
        match ty {
            IFLA_IFNAME => name = Some(attr_str(payload)),
            IFLA_LINKINFO => {
                kind = attrs(payload)
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, k)| attr_str(k));
            }
            _ => {}
        }
    }
    Some(Link {
        index,
        name: name?,
        kind,
    })
}

/// Interfaces of this network namespace, with their kinds.
pub fn links() -> io::Result<Vec<Link>> {
    let s = open(0)?;
    let mut req = [0u8; NLMSG_HDRLEN + IFINFO_LEN];
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDRLEN] = libc::AF_UNSPEC as u8;
    // SAFETY: req is valid for its length.
    if unsafe { libc::send(s.0, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&s, &mut buf)?;
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, off).unwrap_or(0) as usize;
            let ty = u16_at(&buf, off + 4).unwrap_or(0);
            if len < NLMSG_HDRLEN || off + len > n {
                break;
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = u32_at(&buf, off + NLMSG_HDRLEN).unwrap_or(0) as i32;
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                RTM_NEWLINK => {
                    if let Some(l) = parse_link(&buf[off + NLMSG_HDRLEN..off + len]) {
                        out.push(l);
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Blocks the calling thread, calling `on_event` after every link event batch. Returns when
/// `on_event` returns false or the socket fails.
pub fn watch_links(mut on_event: impl FnMut() -> bool) -> io::Result<()> {
    let s = open(RTMGRP_LINK)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv(&s, &mut buf) {
            Ok(_) => {}
            // Overrun: we missed events; a rescan covers them.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e),
        }
        if !on_event() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_loopback() {
        let links = super::links().expect("netlink dump");
        let lo = links.iter().find(|l| l.index == 1).expect("lo");
        assert_eq!((lo.name.as_str(), lo.kind.as_deref()), ("lo", None));
    }
}
