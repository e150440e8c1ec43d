//! Developer tasks for redirector, run as `cargo xtask <task>` (alias in .cargo/config.toml).
mod bootstrap;
mod demo;
mod image;
mod kernels;
mod perf;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::util::{cargo, redirector_bin, require_root, run, target_dir};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for redirector"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install what building and testing need (apt packages, nightly + rust-src, bpf-linker,
    /// bpffs). Each step is skipped when already satisfied.
    Bootstrap,
    /// Bootstrap, then build the workspace.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Bootstrap, fmt check, clippy, build, then run every test (as root).
    Test {
        /// Only run tests whose name contains this string.
        #[arg(long)]
        filter: Option<String>,
        /// Kernel series to run the VM suites on afterwards (repeatable or comma-separated;
        /// default: 5.10, 6.1 and 6.12). `--kernel none` skips the VMs.
        #[arg(long = "kernel", value_delimiter = ',')]
        kernels: Vec<String>,
    },
    /// The kernel matrix: boots Debian's kernels under qemu and runs the BPF_PROG_TEST_RUN
    /// suite, the agent's kernel tests, and the netns datapath and checksum tests in each.
    Kernels(kernels::KernelArgs),
    /// Bootstrap, build, then run the demo (as root): cold start, warm traffic, scale to
    /// zero, a burst during a cold start, and a summary.
    Demo {
        /// Wait for Enter before cleaning up (to inspect the maps and namespaces).
        #[arg(long)]
        pause: bool,
    },
    /// Bootstrap, release build, then run the perf test (as root).
    Perf(perf::PerfArgs),
    /// Bootstrap (plus buildah, musl-tools and the musl target), build a static musl binary
    /// with the eBPF object embedded, and an image FROM scratch with buildah, tagged
    /// `redirector:<version>` (as root).
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Bootstrap => bootstrap::run_all(),
        Task::Build { release } => {
            bootstrap::run_all()?;
            let mut args = vec!["build", "--workspace"];
            if release {
                args.push("--release");
            }
            run(&mut cargo(&args))
        }
        Task::Test { filter, kernels } => test::run_all(filter.as_deref(), &kernels),
        Task::Kernels(args) => kernels::run_all(&args),
        Task::Demo { pause } => {
            require_root("demo")?;
            bootstrap::run_all()?;
            // The agent and demo-app's `redirector-hello` (the app the demo scales); not
            // `--workspace`: redirector-ebpf's host build is also a binary named `redirector`
            // and may overwrite target/debug/redirector.
            run(&mut cargo(&[
                "build",
                "-p",
                "redirector",
                "-p",
                "redirector-hello",
            ]))?;
            let hello = target_dir().join("debug").join("redirector-hello");
            demo::run(&redirector_bin("debug"), &hello, pause)
        }
        Task::Perf(args) => perf::run_all(&args),
        Task::Image(args) => image::run_all(&args),
    }
}
