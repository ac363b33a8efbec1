//! Gateways started by benchmarks: the `imz` under test (through the
//! harness, [`GatewayProc`]) or a second build given with `--compare`
//! (a before/after in one run), each with a fresh cache and registered so
//! that an interrupted benchmark kills it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{GatewayProc, OriginProc};

/// A running gateway with a fresh cache.
pub struct Gw {
    proc: GwProc,
    pub cache_dir: PathBuf,
    /// The `imz` binary it runs (for its control commands).
    pub bin: PathBuf,
}

enum GwProc {
    Harness(GatewayProc),
    Other { child: super::ChildGuard, port: u16 },
}

impl Gw {
    /// Starts `imz gateway` for `origin` with an empty cache in
    /// `cache_dir`: the binary under test when `other` is `None`, else
    /// `other`. `extra` are more gateway arguments.
    pub fn start(
        other: Option<&Path>,
        origin: &OriginProc,
        cache_dir: &Path,
        cache_size: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(cache_dir);
        let (proc, bin) = match other {
            Some(bin) => (
                start_other_gateway(bin, origin, cache_dir, cache_size, extra)?,
                bin.to_path_buf(),
            ),
            None => {
                let gw = GatewayProc::start(
                    &origin.url,
                    &origin.token_file,
                    cache_dir,
                    cache_size,
                    extra,
                )?;
                super::register(gw.proc.pid());
                (GwProc::Harness(gw), crate::imz_bin())
            }
        };
        Ok(Self {
            proc,
            cache_dir: cache_dir.to_path_buf(),
            bin,
        })
    }

    pub fn port(&self) -> u16 {
        match &self.proc {
            GwProc::Harness(g) => g.port,
            GwProc::Other { port, .. } => *port,
        }
    }

    pub fn pid(&self) -> u32 {
        match &self.proc {
            GwProc::Harness(g) => g.proc.pid(),
            GwProc::Other { child, .. } => child.pid(),
        }
    }

    /// Peak RSS so far (VmHWM), MiB.
    pub fn hwm_mib(&self) -> anyhow::Result<f64> {
        Ok(super::proc_status_kib(self.pid(), "VmHWM")? as f64 / 1024.0)
    }

    /// `BIN SUBCOMMAND... --control CACHE/control.sock` with this gateway's
    /// own binary; stdout, or an error with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::gateway::control(&self.bin, &self.cache_dir, args)
    }

    /// `imz status --json`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        crate::gateway::parse_status(&self.ctl(&["status", "--json"])?)
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let GwProc::Harness(g) = &self.proc {
            // GatewayProc's own drop kills it; ChildGuard's stops the other.
            super::unregister(g.proc.pid());
        }
    }
}

/// `BIN gateway ...` as the harness starts one, for `--compare`.
fn start_other_gateway(
    bin: &Path,
    origin: &OriginProc,
    cache_dir: &Path,
    cache_size: &str,
    extra: &[&str],
) -> anyhow::Result<GwProc> {
    let mut cmd = Command::new(bin);
    cmd.arg("gateway")
        .arg("--origin")
        .arg(&origin.url)
        .arg("--token-file")
        .arg(&origin.token_file)
        .arg("--cache")
        .arg(cache_dir)
        .args(["--cache-size", cache_size])
        .args(extra)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = super::ChildGuard::spawn("imz gateway (--compare)", &mut cmd)?;
    let stdout = child.take_stdout().context("no stdout pipe")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the ready line so the pipe never fills.
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .context("the --compare gateway did not say it was listening")?;
        if let Some(addr) = line.strip_prefix(crate::gateway::GATEWAY_READY) {
            let port = addr
                .trim()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("parsing the gateway address {addr:?}"))?;
            return Ok(GwProc::Other { child, port });
        }
    }
}
