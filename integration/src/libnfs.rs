//! Debian's libnfs command-line clients (`nfs-ls`, `nfs-cat`, `nfs-cp`):
//! a second, independent NFS client implementation.

use std::process::Command;

use anyhow::{Context, bail};

/// `nfs://127.0.0.1/imz/PATH?version=3&nfsport=P&mountport=P`
pub fn url(port: u16, path: &str) -> String {
    format!(
        "nfs://127.0.0.1/imz/{}?version=3&nfsport={port}&mountport={port}",
        path.trim_start_matches('/')
    )
}

/// Whether the libnfs tools are installed.
pub fn available() -> bool {
    Command::new("nfs-ls").arg("--help").output().is_ok()
}

/// Runs a libnfs tool, returning stdout; fails with its stderr.
pub fn run(tool: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool} (install Debian's libnfs-utils)"))?;
    if !out.status.success() {
        bail!(
            "{tool} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `nfs-cat URL`: the file's bytes.
pub fn cat(port: u16, path: &str) -> anyhow::Result<Vec<u8>> {
    run("nfs-cat", &[&url(port, path)])
}

/// `nfs-ls URL`: the names listed (last column of each line).
pub fn ls(port: u16, path: &str) -> anyhow::Result<Vec<String>> {
    let out = run("nfs-ls", &[&url(port, path)])?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect())
}
