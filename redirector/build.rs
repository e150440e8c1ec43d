//! Builds the eBPF object (redirector-ebpf) with the nightly toolchain and bpf-linker, so
//! that the `redirector` binary embeds it. `cargo xtask bootstrap` installs what this needs.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../redirector-ebpf");
    println!("cargo:rerun-if-changed=../redirector-common/src");
    // The programs read and write packet fields at whatever alignment the packet gives
    // (`read_unaligned`/`write_unaligned`). Told that the target cannot do misaligned
    // accesses, LLVM splits each into byte loads, shifts and ors (a 4-byte address: 10
    // instructions instead of 1); the kernel allows misaligned packet and map-value access
    // on the architectures that handle it (x86-64, arm64), so say so. Profile rustflags
    // are the one way to add a flag to aya-build's cargo, which sets the rest itself;
    // these variables only reach that nightly cargo.
    // SAFETY: the build script is single-threaded here.
    unsafe {
        std::env::set_var("CARGO_UNSTABLE_PROFILE_RUSTFLAGS", "true");
        std::env::set_var(
            "CARGO_PROFILE_RELEASE_RUSTFLAGS",
            "-Ctarget-feature=+allows-misaligned-mem-access",
        );
        // Not for that build's host-side proc-macros.
        std::env::set_var("CARGO_PROFILE_RELEASE_BUILD_OVERRIDE_RUSTFLAGS", "");
    }
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
