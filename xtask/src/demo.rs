//! `cargo xtask demo`: the demo itself. Placeholder until the demo lands: runs
//! `tests/demo/demo.sh <redirector binary>` if that script exists.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::util::{run as run_cmd, workspace_root};

/// Runs the demo against an already built `redirector` binary.
pub fn run(redirector_bin: &Path) -> Result<()> {
    let script = workspace_root().join("tests/demo/demo.sh");
    if !script.exists() {
        bail!("demo not available yet ({} is missing)", script.display());
    }
    run_cmd(Command::new("bash").arg(&script).arg(redirector_bin))
}
