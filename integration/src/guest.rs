//! The real Linux kernel NFS client, in a throw-away QEMU guest.
//!
//! The host kernel of our machines has no NFS client, so tests boot Debian's
//! stock cloud kernel under QEMU (software emulation, TCG) with a busybox
//! initramfs (`integration/guest/`: `prepare.sh` builds and caches it, `init`
//! is PID 1, `lib.sh` has the helpers guest scripts use). The guest mounts a
//! gateway with the exact command the gateway prints, runs a shell script
//! with the mount as its working directory, and powers off; the host gets the
//! script's output and exit status.
//!
//! Network: QEMU user networking with `restrict=on`: the guest can reach
//! nothing but one `guestfwd` address, [`GUEST_NFS_ADDR`]:PORT, which QEMU
//! relays per connection to 127.0.0.1:PORT (`imz-guest-relay`, run on the
//! host; it connects to loopback only),
//! and the host reaches guest servers only through `hostfwd` on 127.0.0.1.
//! No traffic leaves the machine.
//!
//! Host ↔ guest: the guest's second serial port is the QEMU process's
//! stdin/stdout. The script's output streams there; `step NAME` in the guest
//! prints `@@IMZ:STEP NAME` and blocks until the host, having acted (restart
//! a gateway, stop the origin, change a file), answers with
//! [`Guest::resume`]. The first serial port (kernel console) goes to a log
//! that every failure message quotes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::gateway::GatewayProc;

/// The address the guest mounts: QEMU's `guestfwd` relays it to the host's
/// 127.0.0.1 on the same port.
pub const GUEST_NFS_ADDR: &str = "10.0.2.100";

/// What the gateway prints before its Linux mount command.
pub const MOUNT_LINE: &str = "mount (Linux): ";

/// Directory of the guest's shell part (`integration/guest`).
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

/// A binary built by this workspace (`target/<profile>/NAME`), e.g. the
/// guest-side checker `imz-guest-fsx`.
pub fn workspace_bin(name: &str) -> PathBuf {
    crate::process::imz_bin().with_file_name(name)
}

/// Why guest tests cannot run here, if they cannot. `IMZ_GUEST_SKIP=1`
/// makes callers skip instead of failing (for machines without QEMU).
pub fn unavailable() -> Option<String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    (!found).then(|| {
        "qemu-system-x86_64 not found: apt-get install qemu-system-x86 kmod cpio \
         (.ci/run does), or set IMZ_GUEST_SKIP=1 to skip guest tests"
            .to_owned()
    })
}

/// True when guest tests should be skipped (`IMZ_GUEST_SKIP=1` and QEMU
/// missing); panics with the reason when QEMU is missing and skipping was
/// not asked for, so CI cannot pass without running them.
pub fn skip() -> bool {
    match unavailable() {
        None => false,
        Some(why) if std::env::var("IMZ_GUEST_SKIP").as_deref() == Ok("1") => {
            eprintln!("skipping guest test: {why}");
            true
        }
        Some(why) => panic!("{why}"),
    }
}

/// Reads the Linux mount command a freshly started gateway printed.
pub fn printed_mount_command(gateway: &mut GatewayProc) -> anyhow::Result<String> {
    gateway
        .proc
        .wait_for_line(MOUNT_LINE, Duration::from_secs(10))
}

/// Turns the gateway's printed command (`mount -t nfs -o OPTS
/// 127.0.0.1:/imz /mnt`) into the guest's: the server address becomes
/// [`GUEST_NFS_ADDR`], `extra` options are appended, everything else stays.
/// Returns the command and the NFS port it names.
pub fn guest_mount_command(printed: &str, extra: &[&str]) -> anyhow::Result<(String, u16)> {
    let mut words: Vec<String> = printed.split_whitespace().map(str::to_owned).collect();
    anyhow::ensure!(
        words.first().map(String::as_str) == Some("mount"),
        "not a mount command: {printed:?}"
    );
    let o = words
        .iter()
        .position(|w| w == "-o")
        .with_context(|| format!("no -o in {printed:?}"))?;
    let opts = words.get_mut(o + 1).context("-o without options")?;
    let port = opts
        .split(',')
        .find_map(|kv| kv.strip_prefix("port="))
        .map(|p| p.parse::<u16>())
        .transpose()
        .context("port= option")?
        .unwrap_or(2049);
    for e in extra {
        opts.push(',');
        opts.push_str(e);
    }
    let spec = words
        .iter_mut()
        .find(|w| w.contains(":/"))
        .with_context(|| format!("no HOST:/EXPORT in {printed:?}"))?;
    let export = spec
        .split_once(":/")
        .map(|(_, e)| e.to_owned())
        .unwrap_or_default();
    *spec = format!("{GUEST_NFS_ADDR}:/{export}");
    let last = words.len() - 1;
    words[last] = "/mnt".into();
    Ok((words.join(" "), port))
}

/// A file placed into the guest's initramfs.
struct GuestFile {
    path: String,
    mode: u32,
    data: Vec<u8>,
}

/// What to boot: build with [`GuestBuilder::new`], start with
/// [`GuestBuilder::boot`].
pub struct GuestBuilder {
    mount_cmd: String,
    nfs_port: u16,
    script: String,
    files: Vec<GuestFile>,
    binaries: Vec<PathBuf>,
    forwards: Vec<u16>,
    /// Also relay the guestfwd address's port 111 (the portmapper).
    portmapper: bool,
    env: Vec<(String, String)>,
    timeout: Duration,
    mem_mib: u32,
}

impl GuestBuilder {
    /// `printed` is the gateway's Linux mount command (see
    /// [`printed_mount_command`]); `extra_opts` are appended to its `-o`.
    pub fn new(printed: &str, extra_opts: &[&str]) -> anyhow::Result<Self> {
        let (mount_cmd, nfs_port) = guest_mount_command(printed, extra_opts)?;
        Ok(Self {
            mount_cmd,
            nfs_port,
            script: String::new(),
            files: Vec::new(),
            binaries: Vec::new(),
            forwards: Vec::new(),
            portmapper: false,
            env: Vec::new(),
            timeout: Duration::from_secs(180),
            mem_mib: 512,
        })
    }

    /// The shell script (busybox sh) the guest runs in /mnt.
    pub fn script(mut self, script: &str) -> Self {
        self.script = script.to_owned();
        self
    }

    /// A file at `path` in the guest.
    pub fn file(mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push(GuestFile {
            path: path.to_owned(),
            mode,
            data: data.into(),
        });
        self
    }

    /// A host binary, placed in /imz/bin (on the guest's PATH) with the
    /// shared libraries `ldd` says it needs.
    pub fn binary(mut self, host_path: impl Into<PathBuf>) -> Self {
        self.binaries.push(host_path.into());
        self
    }

    /// Forwards a fresh port on the host's 127.0.0.1 to `guest_port`; see
    /// [`Guest::host_port`].
    pub fn forward(mut self, guest_port: u16) -> Self {
        self.forwards.push(guest_port);
        self
    }

    /// Lets the guest reach the host's portmapper too: [`GUEST_NFS_ADDR`]:111
    /// is relayed to 127.0.0.1:111 (TCP only, like every guestfwd).
    pub fn portmapper(mut self) -> Self {
        self.portmapper = true;
        self
    }

    /// A shell variable set for the script.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    /// Hard limit for the whole run (boot to power-off); default 180 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Builds the per-run initramfs and starts QEMU.
    pub fn boot(self) -> anyhow::Result<Guest> {
        Guest::boot(self)
    }
}

/// What the guest sent, line by line.
enum Event {
    Step(String),
    Exit(i32),
    Closed,
}

struct Shared {
    output: Vec<String>,
    mounted_at: Option<Duration>,
}

/// A running guest. Dropping it kills QEMU.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Event>,
    shared: Arc<Mutex<Shared>>,
    stderr: Arc<Mutex<String>>,
    console: PathBuf,
    forwards: HashMap<u16, u16>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    exit: Option<i32>,
    _run: tempfile::TempDir,
}

/// A finished guest run.
pub struct GuestRun {
    /// The script's exit status (200+: guest setup failed, see `init`).
    pub status: i32,
    /// Everything the script printed, protocol lines included.
    pub output: Vec<String>,
    pub console: String,
    /// Wall time from QEMU's start to the mount being up, and to power-off.
    pub mount_time: Option<Duration>,
    pub total_time: Duration,
}

impl GuestRun {
    /// The value of `@@IMZ:KV key=value`, the last one if repeated.
    pub fn kv(&self, key: &str) -> Option<&str> {
        let prefix = format!("@@IMZ:KV {key}=");
        self.output
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// Like [`kv`](Self::kv), an error naming the key when absent.
    pub fn get(&self, key: &str) -> anyhow::Result<&str> {
        self.kv(key)
            .with_context(|| format!("the guest reported no {key}\n{}", self.report()))
    }

    /// Lines of the output that start with `prefix`, prefix removed.
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.output
            .iter()
            .filter_map(move |l| l.strip_prefix(prefix))
    }

    /// Output and console, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "guest exit status {}\n----- guest output -----\n{}\n----- guest console (tail) -----\n{}",
            self.status,
            self.output.join("\n"),
            tail(&self.console, 60)
        )
    }

    /// Ok when the script exited 0; otherwise an error with the output and
    /// the console.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.status == 0 {
            Ok(self)
        } else {
            bail!("guest script failed\n{}", self.report())
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `integration/guest/prepare.sh` (cached: milliseconds once built)
/// and returns the base directory (vmlinuz, base.cpio.gz).
pub fn prepare() -> anyhow::Result<PathBuf> {
    let script = guest_dir().join("prepare.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({}); see its messages above",
        script.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let base = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .context("prepare.sh printed no base directory")?;
    Ok(PathBuf::from(base))
}

/// `IMZ_GUEST_VERBOSE=1`: stream the guest's output to stderr as it comes
/// and print the whole report at the end.
fn verbose_env() -> bool {
    std::env::var_os("IMZ_GUEST_VERBOSE").is_some_and(|v| v != "0")
}

/// A free port on 127.0.0.1 (bound and released: QEMU binds it next).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Single-quotes `s` for the guest shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Shared libraries of a dynamic binary (absolute paths), from `ldd`.
fn ldd(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: library missing on the host: {line}", bin.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs; it
/// accepts an uncompressed one after the compressed base).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: std::collections::HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                let dir = acc.clone();
                self.entry(&dir, 0o040755, &[]);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | (mode & 0o7777), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

impl Guest {
    fn boot(b: GuestBuilder) -> anyhow::Result<Self> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        let base = prepare()?;
        let run = tempfile::Builder::new()
            .prefix("imz-guest-")
            .tempdir()
            .context("run directory")?;

        // Per-run overlay: env, script, files, binaries and their libraries.
        let mut cpio = Cpio::default();
        let mut env = format!("IMZ_MOUNT={}\n", shell_quote(&b.mount_cmd));
        for (k, v) in &b.env {
            anyhow::ensure!(
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad variable name {k:?}"
            );
            env.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        cpio.file("/imz/env", 0o644, env.as_bytes());
        cpio.file("/imz/script.sh", 0o755, b.script.as_bytes());
        let mut libs = std::collections::BTreeSet::new();
        for bin in &b.binaries {
            let data = std::fs::read(bin).with_context(|| {
                format!(
                    "reading {} (build it: cargo build --release --bins)",
                    bin.display()
                )
            })?;
            let name = bin
                .file_name()
                .and_then(|n| n.to_str())
                .context("binary name")?;
            cpio.file(&format!("/imz/bin/{name}"), 0o755, &data);
            libs.extend(ldd(bin)?);
        }
        for lib in libs {
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            let path = lib.to_str().context("library path")?;
            cpio.file(path, 0o755, &data);
        }
        for f in &b.files {
            cpio.file(&f.path, f.mode, &f.data);
        }
        let mut initrd = std::fs::read(base.join("base.cpio.gz")).context("base initramfs")?;
        // The kernel takes an archive that follows a compressed one only at a
        // 4-byte boundary; it skips the zeros in between.
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        initrd.extend_from_slice(&cpio.finish());
        let initrd_path = run.path().join("initrd");
        std::fs::write(&initrd_path, &initrd)?;

        // Network: one guestfwd (NFS), hostfwds as asked. QEMU runs the
        // relay once per guest connection, without a shell.
        let relay = workspace_bin("imz-guest-relay");
        anyhow::ensure!(
            relay.is_file(),
            "{} missing: cargo build --release --bins",
            relay.display()
        );
        let relay = relay.to_str().context("relay path is not UTF-8")?;
        anyhow::ensure!(
            !relay.contains([' ', ',']),
            "the relay's path must not contain spaces or commas: {relay}"
        );
        let mut netdev = format!(
            "user,id=n0,restrict=on,guestfwd=tcp:{GUEST_NFS_ADDR}:{port}-cmd:{relay} {port}",
            port = b.nfs_port,
        );
        if b.portmapper {
            netdev.push_str(&format!(
                ",guestfwd=tcp:{GUEST_NFS_ADDR}:111-cmd:{relay} 111"
            ));
        }
        let mut forwards = HashMap::new();
        for gp in &b.forwards {
            let hp = free_port()?;
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{hp}-:{gp}"));
            forwards.insert(*gp, hp);
        }
        let console = run.path().join("console.log");
        // Under coreutils `timeout`, so that QEMU goes away by itself even
        // if this process is killed before it can clean up.
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5"])
            .arg((b.timeout + Duration::from_secs(30)).as_secs().to_string())
            .arg("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "qemu64", "-smp", "1"])
            .args(["-m", &b.mem_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(base.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd_path)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 rdinit=/init",
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args([
                "-chardev",
                "stdio,id=ctl,signal=off",
                "-serial",
                "chardev:ctl",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .context("starting qemu-system-x86_64 (under timeout)")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let mut stderr_pipe = child.stderr.take().context("qemu stderr")?;
        let stdin = child.stdin.take();

        let shared = Arc::new(Mutex::new(Shared {
            output: Vec::new(),
            mounted_at: None,
        }));
        let (tx, events) = mpsc::channel();
        let sh = Arc::clone(&shared);
        let verbose = verbose_env();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                if verbose {
                    eprintln!("guest| {line}");
                }
                let event = if let Some(name) = line.strip_prefix("@@IMZ:STEP ") {
                    Some(Event::Step(name.trim().to_owned()))
                } else {
                    line.strip_prefix("@@IMZ:RC ")
                        .map(|rc| Event::Exit(rc.trim().parse().unwrap_or(-1)))
                };
                if let Ok(mut s) = sh.lock() {
                    if line.starts_with("@@IMZ:T mount=") {
                        s.mounted_at = Some(started.elapsed());
                    }
                    s.output.push(line);
                }
                if let Some(e) = event
                    && tx.send(e).is_err()
                {
                    break;
                }
            }
            let _ = tx.send(Event::Closed);
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let se = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            if let Ok(mut s) = se.lock() {
                *s = text;
            }
        });
        Ok(Self {
            child,
            stdin,
            events,
            shared,
            stderr,
            console,
            forwards,
            started,
            deadline: started + b.timeout,
            timeout: b.timeout,
            exit: None,
            _run: run,
        })
    }

    /// Stops QEMU: SIGTERM to `timeout`, which passes it on to QEMU (a
    /// SIGKILL would orphan QEMU), then SIGKILL if that did not work.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The host port (on 127.0.0.1) forwarded to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> u16 {
        self.forwards.get(&guest_port).copied().unwrap_or_else(|| {
            panic!("guest port {guest_port} was not forwarded (GuestBuilder::forward)")
        })
    }

    /// Every forwarded port: guest port → host port.
    pub fn forwards(&self) -> HashMap<u16, u16> {
        self.forwards.clone()
    }

    /// The output so far.
    pub fn output(&self) -> Vec<String> {
        self.shared
            .lock()
            .map(|s| s.output.clone())
            .unwrap_or_default()
    }

    /// The latest `@@IMZ:KV key=value` printed so far.
    pub fn kv(&self, key: &str) -> Option<String> {
        let prefix = format!("@@IMZ:KV {key}=");
        self.output()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
    }

    fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// An error carrying `what`, the guest's output, console and QEMU's
    /// stderr.
    pub fn failure(&mut self, what: &str) -> anyhow::Error {
        self.stop();
        // The reader threads finish once QEMU is gone.
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        anyhow::anyhow!(
            "{what} (after {:.1}s)\n----- guest output -----\n{}\n----- guest console (tail) -----\n{}\n----- qemu stderr -----\n{}",
            self.started.elapsed().as_secs_f64(),
            self.output().join("\n"),
            tail(&self.console_text(), 60),
            stderr.trim()
        )
    }

    fn next_event(&mut self) -> anyhow::Result<Event> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(e) => Ok(e),
            Err(RecvTimeoutError::Timeout) => {
                let msg = format!("guest timed out (hard limit {:?})", self.timeout);
                Err(self.failure(&msg))
            }
            Err(RecvTimeoutError::Disconnected) => Ok(Event::Closed),
        }
    }

    /// Waits until the guest script calls `step NAME`; it then waits for
    /// [`resume`](Self::resume).
    pub fn wait_step(&mut self, name: &str) -> anyhow::Result<()> {
        match self.next_event()? {
            Event::Step(got) if got == name => Ok(()),
            Event::Step(got) => {
                let msg = format!("guest reached step {got:?}, expected {name:?}");
                Err(self.failure(&msg))
            }
            Event::Exit(rc) => {
                self.exit = Some(rc);
                let msg = format!("guest exited with {rc} before step {name:?}");
                Err(self.failure(&msg))
            }
            Event::Closed => {
                let msg = format!("guest stopped before step {name:?}");
                Err(self.failure(&msg))
            }
        }
    }

    /// Lets the guest go on past its current step; `text` ends up in the
    /// guest's `$REPLY_TEXT` (one line).
    pub fn resume(&mut self, text: &str) -> anyhow::Result<()> {
        anyhow::ensure!(!text.contains('\n'), "resume text must be one line");
        let stdin = self.stdin.as_mut().context("guest stdin closed")?;
        let sent = stdin
            .write_all(format!("@@IMZ:GO {text}\n").as_bytes())
            .and_then(|()| stdin.flush());
        if let Err(e) = sent {
            let msg = format!("cannot talk to the guest: {e}");
            return Err(self.failure(&msg));
        }
        Ok(())
    }

    /// Waits for the script to end and QEMU to exit (within the hard
    /// limit), and returns what happened. A script failure is not an error
    /// here; see [`GuestRun::ok`].
    pub fn finish(mut self) -> anyhow::Result<GuestRun> {
        while self.exit.is_none() {
            match self.next_event()? {
                Event::Exit(rc) => self.exit = Some(rc),
                Event::Step(name) => {
                    let msg = format!("guest waits at step {name:?} that the test does not handle");
                    return Err(self.failure(&msg));
                }
                Event::Closed => return Err(self.failure("guest stopped without an exit status")),
            }
        }
        // /init reboots right after the status line; give QEMU a moment.
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > until {
                self.stop();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let total_time = self.started.elapsed();
        let (output, mount_time) = self
            .shared
            .lock()
            .map(|s| (s.output.clone(), s.mounted_at))
            .unwrap_or_default();
        let status = self.exit.unwrap_or(-1);
        let run = GuestRun {
            status,
            output,
            console: self.console_text(),
            mount_time,
            total_time,
        };
        if verbose_env() {
            eprintln!("{}", run.report());
        }
        eprintln!(
            "guest: mounted after {}, finished after {:.1}s, status {status}",
            run.mount_time
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            total_time.as_secs_f64()
        );
        Ok(run)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The md5 of `data` as hex, by the host's `md5sum` (coreutils), the same
/// digest guest scripts print with busybox `md5sum`.
pub fn host_md5(data: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running md5sum")?;
    let mut stdin = child.stdin.take().context("md5sum stdin")?;
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("md5sum writer panicked"))??;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .context("md5sum printed nothing")?
        .to_owned())
}

/// md5 of every regular file under `dir` (symlinks not followed), keyed by
/// `./relative/path` as `find . -type f | xargs md5sum` prints it.
pub fn host_md5_tree(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = format!("{rel}/{name}");
            let ty = e.file_type()?;
            if ty.is_dir() {
                walk(&e.path(), &r, out)?;
            } else if ty.is_file() {
                out.push((r, e.path()));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, ".", &mut files).with_context(|| format!("walking {}", dir.display()))?;
    let mut sums = std::collections::BTreeMap::new();
    for (rel, path) in files {
        let data = std::fs::read(&path)?;
        sums.insert(rel, host_md5(&data)?);
    }
    Ok(sums)
}

/// A minimal FTP client for tests, talking to a server in the guest through
/// QEMU `hostfwd`s: passive mode via EPSV, whose reply names a guest port;
/// `data_ports` maps it to the forwarded host port.
pub struct Ftp {
    ctrl: BufReader<std::net::TcpStream>,
    host: String,
    data_ports: HashMap<u16, u16>,
}

impl Ftp {
    /// Connects to 127.0.0.1:`port` and logs in as anonymous.
    pub fn connect_anonymous(port: u16, data_ports: HashMap<u16, u16>) -> anyhow::Result<Self> {
        let sock = std::net::TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to FTP on 127.0.0.1:{port}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut ftp = Self {
            ctrl: BufReader::new(sock),
            host: "127.0.0.1".into(),
            data_ports,
        };
        ftp.expect(220)?;
        ftp.ctrl.get_mut().write_all(b"USER anonymous\r\n")?;
        match ftp.reply()? {
            (230, _) => {}
            (331, _) => {
                ftp.cmd("PASS imz@example.invalid", 230)?;
            }
            (_, text) => bail!("FTP USER anonymous: {}", text.trim()),
        }
        ftp.cmd("TYPE I", 200)?;
        Ok(ftp)
    }

    /// Reads one (possibly multi-line) reply: its code and text.
    fn reply(&mut self) -> anyhow::Result<(u32, String)> {
        let mut text = String::new();
        let mut first = String::new();
        self.ctrl.read_line(&mut first).context("FTP reply")?;
        anyhow::ensure!(first.len() >= 4, "short FTP reply {first:?}");
        let code: u32 = first[..3].parse().context("FTP reply code")?;
        text.push_str(&first);
        if first.as_bytes()[3] == b'-' {
            let end = format!("{code} ");
            loop {
                let mut line = String::new();
                anyhow::ensure!(
                    self.ctrl.read_line(&mut line)? > 0,
                    "FTP connection closed mid-reply"
                );
                text.push_str(&line);
                if line.starts_with(&end) {
                    break;
                }
            }
        }
        Ok((code, text))
    }

    fn expect(&mut self, want: u32) -> anyhow::Result<String> {
        let (code, text) = self.reply()?;
        anyhow::ensure!(code == want, "FTP: expected {want}, got {}", text.trim());
        Ok(text)
    }

    /// Sends a command and checks the reply code.
    pub fn cmd(&mut self, line: &str, want: u32) -> anyhow::Result<String> {
        let sock = self.ctrl.get_mut();
        sock.write_all(format!("{line}\r\n").as_bytes())?;
        self.expect(want)
            .with_context(|| format!("FTP command {line:?}"))
    }

    /// Opens a passive data connection (EPSV).
    fn data(&mut self) -> anyhow::Result<std::net::TcpStream> {
        let text = self.cmd("EPSV", 229)?;
        let port: u16 = text
            .split("|||")
            .nth(1)
            .and_then(|rest| rest.split('|').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("parsing EPSV reply {text:?}"))?;
        let host_port = *self
            .data_ports
            .get(&port)
            .with_context(|| format!("the server chose passive port {port}, not forwarded"))?;
        let s = std::net::TcpStream::connect((self.host.as_str(), host_port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(s)
    }

    /// Runs a transfer command (`RETR x`, `LIST`) and returns the data.
    fn transfer(&mut self, command: &str) -> anyhow::Result<Vec<u8>> {
        let mut data = self.data()?;
        let sock = self.ctrl.get_mut();
        sock.write_all(format!("{command}\r\n").as_bytes())?;
        let (code, text) = self.reply()?;
        anyhow::ensure!(
            code == 150 || code == 125,
            "FTP {command:?}: {}",
            text.trim()
        );
        let mut out = Vec::new();
        data.read_to_end(&mut out)
            .with_context(|| format!("FTP {command:?}: data connection"))?;
        self.expect(226)
            .with_context(|| format!("FTP {command:?}: completion"))?;
        Ok(out)
    }

    /// Downloads `path`.
    pub fn retr(&mut self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.transfer(&format!("RETR {path}"))
    }

    /// Names in directory `path` (NLST).
    pub fn nlst(&mut self, path: &str) -> anyhow::Result<Vec<String>> {
        let raw = self.transfer(&format!("NLST {path}"))?;
        Ok(String::from_utf8_lossy(&raw)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// The size the server reports for `path` (SIZE).
    pub fn size(&mut self, path: &str) -> anyhow::Result<u64> {
        let text = self.cmd(&format!("SIZE {path}"), 213)?;
        Ok(text[4..].trim().parse()?)
    }

    /// Uploads `data` as `path` (STOR).
    pub fn stor(&mut self, path: &str, data: &[u8]) -> anyhow::Result<()> {
        let mut conn = self.data()?;
        self.ctrl
            .get_mut()
            .write_all(format!("STOR {path}\r\n").as_bytes())?;
        let (code, text) = self.reply()?;
        anyhow::ensure!(
            code == 150 || code == 125,
            "FTP STOR {path}: {}",
            text.trim()
        );
        conn.write_all(data)?;
        drop(conn);
        self.expect(226)
            .with_context(|| format!("FTP STOR {path}: completion"))?;
        Ok(())
    }

    pub fn quit(mut self) -> anyhow::Result<()> {
        self.cmd("QUIT", 221).map(|_| ())
    }
}
