//! redirector's eBPF programs: XDP on uplinks, tc ingress/egress on pod-facing interfaces
//! and egress on uplinks, and socket hooks on a cgroup. All of them run the same NAT core (`nat`) over the same maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod xdp;

/// On the host the crate is an empty binary (the workspace builds it for `cargo test`).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
