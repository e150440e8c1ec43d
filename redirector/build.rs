//! Builds the eBPF object (redirector-ebpf) with the nightly toolchain and bpf-linker, so
//! that the `redirector` binary embeds it. `cargo xtask bootstrap` installs what this needs.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../redirector-ebpf");
    println!("cargo:rerun-if-changed=../redirector-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "redirector-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask bootstrap` if bpf-linker or rust-src is missing)")
}
