//! `cargo xtask test`: formatting, lints, a full build, then every test of the workspace
//! (unit tests and the network-namespace integration tests), as root.
use anyhow::{Context as _, Result};

use crate::{
    bootstrap,
    util::{cargo, redirector_bin, require_root, run},
};

/// Test threads per test binary; the integration tests use unique namespace names, so a
/// little parallelism is safe, and more would oversubscribe small CI machines.
pub const TEST_THREADS: u32 = 2;

pub fn run_all(filter: Option<&str>, kernels: &[String]) -> Result<()> {
    require_root("test")?;
    bootstrap::run_all().context("step `bootstrap` failed")?;

    step("fmt", &["fmt", "--all", "--", "--check"])?;
    step(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    step("build", &["build", "--workspace", "--all-targets"])?;

    let bin = redirector_bin("debug");
    println!("[test] tests (REDIRECTOR_BIN={})", bin.display());
    let threads = format!("--test-threads={TEST_THREADS}");
    // Every test binary runs even when one fails, so a CI log shows all failures at once.
    let mut args = vec![
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        threads.as_str(),
    ];
    if let Some(f) = filter {
        args.push(f);
    }
    let mut cmd = cargo(&args);
    cmd.env("REDIRECTOR_BIN", &bin).env("RUST_LOG", "info");
    // tests/manifests.rs `image_build`: `cargo xtask image --check` (static musl release
    // build + buildah image; ~5-9 min cold on 2 cores, seconds when built). On unless the
    // caller set REDIRECTOR_IMAGE_TEST (e.g. to 0).
    if std::env::var_os("REDIRECTOR_IMAGE_TEST").is_none() {
        cmd.env("REDIRECTOR_IMAGE_TEST", "1");
    }
    run(&mut cmd).context("step `test` failed")?;
    if filter.is_none() {
        fuzz(FUZZ_SECS).context("step `fuzz` failed")?;
    }
    // The same suites on the kernels users run, each in a VM (see `cargo xtask kernels`).
    let kernels: Vec<String> = if kernels.is_empty() {
        crate::kernels::DEFAULT
            .iter()
            .map(|k| k.to_string())
            .collect()
    } else {
        kernels.iter().filter(|k| *k != "none").cloned().collect()
    };
    if !kernels.is_empty() && filter.is_none() {
        println!("[test] kernels {}", kernels.join(", "));
        crate::kernels::run_all(&crate::kernels::KernelArgs {
            kernels,
            lockdown: vec!["6.12".to_owned()],
            budget_secs: 1200,
            list: false,
        })
        .context("step `kernels` failed")?;
    }
    println!("[test] all steps passed");
    Ok(())
}

/// How long the fuzz step runs.
pub const FUZZ_SECS: u32 = 60;

/// The fast path's parser against hyper under libFuzzer (fuzz/, nightly) for `secs`,
/// starting from the corpus kept in fuzz/corpus/wire; new inputs go to
/// fuzz/target/corpus-new (merge them into the kept corpus with `cargo fuzz cmin`).
fn fuzz(secs: u32) -> Result<()> {
    println!("[test] fuzz ({secs} s)");
    let dir = crate::util::workspace_root().join("fuzz");
    let new = dir.join("target/corpus-new");
    std::fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
    let time = format!("-max_total_time={secs}");
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(&dir).args([
        &format!("+{}", bootstrap::NIGHTLY),
        "fuzz",
        "run",
        // Unoptimised and without ASan: the target checks logic (the two parsers agree) in
        // safe code, and an optimised ASan build of the agent takes half an hour on 2 cores.
        "--dev",
        "--sanitizer",
        "none",
        "wire",
        new.to_str().context("non-UTF-8 path")?,
        "corpus/wire",
        "--",
        time.as_str(),
    ]);
    run(&mut cmd)
}

fn step(name: &str, args: &[&str]) -> Result<()> {
    println!("[test] {name}");
    run(&mut cargo(args)).with_context(|| format!("step `{name}` failed"))
}
