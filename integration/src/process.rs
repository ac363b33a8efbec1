//! Spawning, watching and killing `imz` processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

/// When set, `imz` processes started from now on verify the cache's
/// invariants on every commit (`IMZ_CACHE_CHECK`): slow, for tests that hunt
/// bugs (the model test).
pub static CHECK_CACHE_INVARIANTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Path of the `imz` binary under test: `$IMZ_BIN`, or the one cargo built
/// beside this test executable (`target/<profile>/imz`).
pub fn imz_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("IMZ_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/test-hash -> target/<profile>/imz
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join("imz")
}

/// A running `imz` process whose stdout is read line by line.
pub struct Imz {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl Imz {
    /// Starts `imz ARGS...` and waits until it prints a line starting with
    /// `ready_prefix`; returns the process and the rest of that line.
    pub fn spawn(args: &[&str], ready_prefix: &str) -> anyhow::Result<(Self, String)> {
        Self::spawn_wrapped(&[], args, ready_prefix)
    }

    /// Like [`spawn`](Self::spawn), run through `wrapper` (e.g. `ip netns
    /// exec NS`, which execs imz so that the pid is imz's own).
    pub fn spawn_wrapped(
        wrapper: &[String],
        args: &[&str],
        ready_prefix: &str,
    ) -> anyhow::Result<(Self, String)> {
        Self::spawn_full(wrapper, &[], args, ready_prefix)
    }

    /// The general form: through `wrapper`, with `env` added to the
    /// environment.
    pub fn spawn_full(
        wrapper: &[String],
        env: &[(String, String)],
        args: &[&str],
        ready_prefix: &str,
    ) -> anyhow::Result<(Self, String)> {
        let bin = imz_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} does not exist: build it first (cargo build --release --bins)",
            bin.display()
        );
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if CHECK_CACHE_INVARIANTS.load(std::sync::atomic::Ordering::Relaxed) {
            command.env("IMZ_CACHE_CHECK", "1");
        }
        let mut child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut imz = Self {
            child,
            lines: rx,
            name: args.first().copied().unwrap_or("imz").to_owned(),
        };
        let rest = imz.wait_for_line(ready_prefix, Duration::from_secs(60))?;
        Ok((imz, rest))
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "imz {}: no line starting with {prefix:?} within {timeout:?}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "imz {} exited ({status:?}) before printing {prefix:?}",
                        self.name
                    )
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. 19 = SIGSTOP, 18 = SIGCONT) without waiting.
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// kill -9: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `libc::SIGTERM` = 15) and waits for the exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                bail!(
                    "imz {} did not exit within {timeout:?} of signal {signal}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Imz {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `imz origin`.
pub struct OriginProc {
    pub proc: Imz,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    pub addr: SocketAddr,
    pub token: String,
    pub token_file: PathBuf,
    pub root: PathBuf,
    /// How it was started (empty: directly).
    pub wrapper: Vec<String>,
    /// More arguments it was started with.
    pub extra: Vec<String>,
}

/// What `imz origin` prints on stdout once it accepts requests.
pub const ORIGIN_READY: &str = "imz origin listening on ";

impl OriginProc {
    /// Starts `imz origin --root ROOT` on an ephemeral loopback port, with
    /// the token in `token_file` (created by imz if missing).
    pub fn start(root: &Path, token_file: &Path) -> anyhow::Result<Self> {
        Self::start_on(root, token_file, "127.0.0.1:0")
    }

    /// Like [`start`](Self::start) on a given listen address (to restart an
    /// origin on the port its gateways know).
    pub fn start_on(root: &Path, token_file: &Path, listen: &str) -> anyhow::Result<Self> {
        Self::start_wrapped(&[], root, token_file, listen)
    }

    /// Starts the origin through `wrapper` (e.g. inside a network namespace:
    /// see `netns.rs`).
    pub fn start_wrapped(
        wrapper: &[String],
        root: &Path,
        token_file: &Path,
        listen: &str,
    ) -> anyhow::Result<Self> {
        Self::start_full(wrapper, root, token_file, listen, &[])
    }

    /// Starts the origin with more command-line arguments (kept for restarts).
    pub fn start_with_args(root: &Path, token_file: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_full(&[], root, token_file, "127.0.0.1:0", &extra)
    }

    /// The general form: through `wrapper`, with more arguments (both kept
    /// for restarts).
    pub fn start_full(
        wrapper: &[String],
        root: &Path,
        token_file: &Path,
        listen: &str,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let root_s = root.to_str().context("root path is not UTF-8")?;
        let token_s = token_file.to_str().context("token path is not UTF-8")?;
        let mut args = vec![
            "origin",
            "--root",
            root_s,
            "--listen",
            listen,
            "--token-file",
            token_s,
        ];
        args.extend(extra.iter().map(String::as_str));
        let (proc, url) = Imz::spawn_wrapped(wrapper, &args, ORIGIN_READY)?;
        let addr: SocketAddr = url
            .strip_prefix("http://")
            .context("origin URL is not http://")?
            .trim_end_matches('/')
            .parse()
            .context("parsing the origin address")?;
        let token = std::fs::read_to_string(token_file)
            .context("reading the token file")?
            .trim()
            .to_owned();
        Ok(Self {
            proc,
            url,
            addr,
            token,
            token_file: token_file.to_path_buf(),
            root: root.to_path_buf(),
            wrapper: wrapper.to_vec(),
            extra: extra.to_vec(),
        })
    }

    /// Starts the origin as the user `nobody` (root may read everything)
    /// over `root`, inside `dir`: `dir` is opened to others, `root` and
    /// everything in it given to `nobody` (modes kept), and `dir/token`
    /// written for it.
    pub fn start_as_nobody(dir: &Path, root: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        const NOBODY: u32 = 65534;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let token = dir.join("token");
        std::fs::write(&token, "a-token-for-nobody")?;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
        let mut give = vec![token.clone(), root.to_path_buf()];
        while let Some(path) = give.pop() {
            std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY))
                .with_context(|| format!("chown {}", path.display()))?;
            if path.symlink_metadata()?.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    give.push(entry?.path());
                }
            }
        }
        let as_nobody = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
        .map(String::from);
        Self::start_full(&as_nobody, root, &token, "127.0.0.1:0", &[])
    }

    /// Restarts on the same address after a kill, through `wrapper` from
    /// now on (none, say, where it started with a test's pause).
    pub fn restart_through(&mut self, wrapper: &[String]) -> anyhow::Result<()> {
        self.wrapper = wrapper.to_vec();
        self.restart()
    }

    /// Restarts on the same address after a kill.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        let addr = self.addr.to_string();
        let fresh = Self::start_full(
            &self.wrapper,
            &self.root,
            &self.token_file,
            &addr,
            &self.extra,
        )?;
        *self = fresh;
        Ok(())
    }
}
