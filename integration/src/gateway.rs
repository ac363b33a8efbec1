//! Running `imz gateway` processes, and a fixture of one origin plus one
//! gateway over a fresh directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::hold::Hold;
use crate::process::{Imz, OriginProc};

/// What `imz gateway` prints on stdout once it serves NFS.
pub const GATEWAY_READY: &str = "imz gateway listening on ";

/// A running `imz gateway`.
pub struct GatewayProc {
    pub proc: Imz,
    pub port: u16,
    pub cache_dir: PathBuf,
    args: Vec<String>,
    /// Environment the gateway starts with (and restarts with).
    env: Vec<(String, String)>,
}

impl GatewayProc {
    /// Starts a gateway for `origin_url` on an ephemeral loopback port.
    /// `extra` are more command-line arguments.
    pub fn start(
        origin_url: &str,
        token_file: &Path,
        cache_dir: &Path,
        cache_size: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec![
            "gateway".into(),
            "--origin".into(),
            origin_url.into(),
            "--token-file".into(),
            token_file.to_str().context("token path")?.into(),
            "--cache".into(),
            cache_dir.to_str().context("cache path")?.into(),
            "--cache-size".into(),
            cache_size.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Gateways whose caches share a directory find each other there,
        // and nowhere else: tests stay out of the machine's /run/imz.
        let registry = registry_dir(cache_dir);
        let env = vec![(
            "IMZ_RUNTIME_DIR".to_owned(),
            registry.to_str().context("registry path")?.to_owned(),
        )];
        Self::spawn(args, env, "127.0.0.1:0", cache_dir)
    }

    /// Sets `key=value` in the environment of every later (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Restarts the gateway with the hold point `var` (an `IMZ_TEST_*_HOLD`
    /// of the gateway) in directory `dir`, and returns it.
    pub fn with_hold(&mut self, var: &str, dir: &Path) -> anyhow::Result<Hold> {
        let hold = Hold::new(dir)?;
        self.set_env(var, dir.to_str().context("hold path")?);
        self.restart_graceful()?;
        Ok(hold)
    }

    fn spawn(
        args: Vec<String>,
        env: Vec<(String, String)>,
        listen: &str,
        cache_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut full = args.clone();
        full.push("--listen".into());
        full.push(listen.into());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let (proc, addr) = Imz::spawn_full(&[], &env, &refs, GATEWAY_READY)?;
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("parsing the gateway address {addr:?}"))?;
        Ok(Self {
            proc,
            port,
            cache_dir: cache_dir.to_path_buf(),
            args,
            env,
        })
    }

    /// kill -9, then start again on the same port with the same cache.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        self.start_again()
    }

    /// SIGTERM (which must exit 0), then start again on the same port.
    pub fn restart_graceful(&mut self) -> anyhow::Result<()> {
        let status = self.proc.signal_and_wait(15, Duration::from_secs(20))?;
        anyhow::ensure!(status.success(), "gateway exited with {status} on SIGTERM");
        self.start_again()
    }

    fn start_again(&mut self) -> anyhow::Result<()> {
        let listen = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::spawn(
                self.args.clone(),
                self.env.clone(),
                &listen,
                &self.cache_dir,
            ) {
                Ok(fresh) => {
                    *self = fresh;
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("gateway restart failed, retrying: {e:#}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl GatewayProc {
    /// Runs `imz SUBCOMMAND... --control SOCKET` against this gateway;
    /// returns stdout, or fails with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        control(&crate::imz_bin(), &self.cache_dir, args)
    }

    /// `imz status --json`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        parse_status(&self.ctl(&["status", "--json"])?)
    }
}

/// Where gateways started by [`GatewayProc::start`] with caches in
/// `cache_dir`'s parent register (`IMZ_RUNTIME_DIR`).
pub fn registry_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.parent().unwrap_or(cache_dir).join("imz-run")
}

/// Runs `imz SUBCOMMAND...` without saying which gateway, as a user would
/// with only the gateways registered in `registry` running.
pub fn control_unaddressed(registry: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let bin = crate::imz_bin();
    std::process::Command::new(&bin)
        .args(args)
        .env("IMZ_RUNTIME_DIR", registry)
        .env_remove("IMZ_CACHE")
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// Runs `BIN SUBCOMMAND... --control SOCKET` against the gateway whose
/// cache is `cache_dir`; returns stdout, or fails with stderr.
pub fn control(bin: &Path, cache_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--control")
        .arg(cache_dir.join("control.sock"))
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "imz {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The output of `imz status --json`, parsed.
pub fn parse_status(out: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(out).context("parsing imz status --json")
}

/// One origin and one gateway over a fresh temporary directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub origin: OriginProc,
    pub gateway: GatewayProc,
}

impl Fixture {
    /// `populate` fills the origin's directory before anything starts.
    pub fn new(populate: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<Self> {
        Self::with_cache_size("1GiB", &[], populate)
    }

    pub fn with_cache_size(
        cache_size: &str,
        gateway_args: &[&str],
        populate: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root)?;
        populate(&root)?;
        let token_file = dir.path().join("token");
        let origin = OriginProc::start(&root, &token_file)?;
        let gateway = GatewayProc::start(
            &origin.url,
            &token_file,
            &dir.path().join("cache"),
            cache_size,
            gateway_args,
        )?;
        Ok(Self {
            dir,
            root,
            origin,
            gateway,
        })
    }

    pub fn port(&self) -> u16 {
        self.gateway.port
    }

    /// Path of `rel` in the origin's directory.
    pub fn origin_path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
