//! Helpers for benchmarks (not tests): peers run as child processes that
//! are always cleaned up, the page cache, process statistics, medians.
//!
//! Every child a benchmark starts is registered here; [`cleanup_on_signal`]
//! kills them if the benchmark is interrupted (SIGINT, SIGTERM, SIGHUP),
//! and [`ChildGuard`] stops them when dropped (normal exit, error, panic).

pub mod ganesha;
pub mod gateway;
pub mod table;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Pids of running children, killed on a signal.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Registers `pid` to be killed if the benchmark is interrupted.
pub fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

/// Forgets `pid` (it has been stopped).
pub fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| *p != pid);
}

fn kill(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Which server a measurement goes through (bench-read, bench-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Server {
    /// The gateway under test (`$IMZ_BIN`, started through the harness).
    Imz,
    /// A second gateway binary (`--compare BIN`), interleaved with the first.
    ImzB,
    Ganesha,
}

impl Server {
    /// The gateways a run measures: the one under test, and the
    /// `--compare` build if there is one.
    pub fn gateways(compare: Option<&Path>) -> Vec<Server> {
        let mut v = vec![Server::Imz];
        if compare.is_some() {
            v.push(Server::ImzB);
        }
        v
    }

    /// The binary this gateway runs: the `--compare` build's, or `None`
    /// for the harness's own.
    pub fn binary(self, compare: Option<&Path>) -> Option<&Path> {
        match self {
            Server::ImzB => compare,
            _ => None,
        }
    }
}

/// What every benchmark's `main` does first: run again with `IMZ_BIN` set
/// (see [`reexec_with_imz_bin`]; that never returns but on failure), or,
/// in the run that has it, clean up children on a signal and hold off the
/// VM's page reporting ([`PageReportingHold`]) until the guard is dropped.
pub fn prepare() -> anyhow::Result<PageReportingHold> {
    if std::env::var_os("IMZ_BIN").is_none() {
        reexec_with_imz_bin()?;
    }
    cleanup_on_signal();
    Ok(PageReportingHold::start())
}

/// On SIGINT, SIGTERM or SIGHUP: kills every registered child, puts back
/// what [`PageReportingHold`] changed, then exits.
pub fn cleanup_on_signal() {
    on_signals(|| {
        let pids = CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).clone();
        eprintln!("interrupted: killing {} child process(es)", pids.len());
        for pid in pids {
            kill("KILL", pid);
        }
        PageReportingHold::restore();
        std::process::exit(130);
    });
}

/// The guest kernel's free page reporting (virtio-balloon), where the
/// machine has it.
const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters";
/// What [`PageReportingHold`] sets: each parameter with the values to try,
/// first the one wanted (the kernel refuses a `min_free_ms` above its own
/// maximum).
const PAGE_REPORTING_HOLD: [(&str, &[&str]); 3] = [
    // How long a page must stay free before it is handed back.
    ("min_free_ms", &["3600000", "600000", "300000", "120000"]),
    // Off: the host no longer reads free pages from a shared bitmap (with
    // it, memory kept free for 90 s was taken back whatever min_free_ms).
    ("free_bitmap_enable", &["N"]),
    // Freed memory waiting past this much is handed back at once.
    ("max_waiting_mib", &["1048576", "65536"]),
];
/// The values [`PageReportingHold`] replaced (parameter, old value), to
/// be put back.
static PAGE_REPORTING_SAVED: Mutex<Vec<(&str, String)>> = Mutex::new(Vec::new());

/// Holds off the VM's free page reporting while a benchmark runs.
///
/// On the VMs these benchmarks run on, memory a process frees is handed
/// back to the host at once (`min_free_ms` 0, and a free-page bitmap the
/// host reads), and the next page that touches it waits for the host to
/// supply it again: writing 1 GiB into the page cache took 0.18 s on pages
/// the guest kept and 1.3-2.3 s on pages it had handed back. Every
/// `drop_caches`, every removed file and every exited server hands pages
/// back, so whichever server happened to run next paid for them, and
/// ratios swung by 2x from run to run. With reporting held off, and free
/// memory touched before each round ([`warm_memory`]), both servers meet
/// memory the guest holds. Put back when dropped or on a signal; a machine
/// without page reporting is left as it is.
#[must_use = "page reporting is put back when this is dropped"]
pub struct PageReportingHold(());

impl PageReportingHold {
    pub fn start() -> Self {
        let dir = Path::new(PAGE_REPORTING);
        if !dir.exists() {
            return Self(());
        }
        let mut saved = PAGE_REPORTING_SAVED
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (param, values) in PAGE_REPORTING_HOLD {
            let path = dir.join(param);
            let Ok(old) = std::fs::read_to_string(&path) else {
                continue;
            };
            let set = values
                .iter()
                .find(|v| std::fs::write(&path, format!("{v}\n")).is_ok());
            match set {
                Some(v) => {
                    eprintln!(
                        "free page reporting held off for this run: {param} {} -> {v} \
                         (put back at exit)",
                        old.trim()
                    );
                    saved.push((param, old.trim().to_owned()));
                }
                None => eprintln!(
                    "warning: cannot set {}: timings will swing with which server \
                     touches memory the host took back",
                    path.display()
                ),
            }
        }
        Self(())
    }

    fn restore() {
        let saved = std::mem::take(
            &mut *PAGE_REPORTING_SAVED
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (param, old) in saved {
            let path = Path::new(PAGE_REPORTING).join(param);
            if let Err(e) = std::fs::write(&path, format!("{old}\n")) {
                eprintln!("warning: cannot put back {} ({old}): {e}", path.display());
            }
        }
    }
}

impl PageReportingHold {
    /// Whether reporting is held off now (this machine has it, and it could
    /// be changed).
    pub fn active() -> bool {
        !PAGE_REPORTING_SAVED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Touches (and frees again) up to `bytes` of free memory, leaving at
    /// least [`WARM_LEAVES_FREE`] free (so no cached file is pushed out), so that a round that grows the
    /// page cache or a heap meets memory the guest holds, whichever server
    /// runs first. With reporting held off the pages stay held for the
    /// hold's time; without the hold (or without page reporting) this does
    /// nothing. Returns the bytes touched.
    pub fn warm(bytes: u64) -> u64 {
        if !Self::active() {
            return 0;
        }
        let free = mem_free().unwrap_or(0);
        let bytes = bytes.min(free.saturating_sub(WARM_LEAVES_FREE));
        // Written into an unlinked tmpfs file, not faulted into this
        // process: a page fault here costs about 5 us (1.3 s per GiB,
        // whether the host holds the page or not), a page written through
        // write(2) a quarter of that once held; closing the file frees them.
        let Ok(mut file) = tempfile::tempfile_in("/dev/shm") else {
            return 0;
        };
        let piece = vec![1u8; 64 << 20];
        let mut touched = 0;
        while touched < bytes && std::io::Write::write_all(&mut file, &piece).is_ok() {
            touched += piece.len() as u64;
        }
        touched
    }
}

/// Before a round: [`PageReportingHold::warm`] of all free memory but
/// [`WARM_LEAVES_FREE`], said on stderr.
pub fn warm_memory() {
    let start = Instant::now();
    let touched = PageReportingHold::warm(u64::MAX);
    if touched > 0 {
        eprintln!(
            "memory warmed: {:.1} GiB in {:.1} s",
            touched as f64 / (1u64 << 30) as f64,
            start.elapsed().as_secs_f64()
        );
    }
}

/// Memory [`PageReportingHold::warm`] leaves free.
const WARM_LEAVES_FREE: u64 = 1 << 30;

/// `MemFree` from /proc/meminfo, in bytes.
fn mem_free() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemFree:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

impl Drop for PageReportingHold {
    fn drop(&mut self) {
        Self::restore();
    }
}

/// Runs `handler` on a thread of its own for every SIGINT, SIGTERM or
/// SIGHUP this process receives.
fn on_signals(mut handler: impl FnMut() + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                handler();
            }
        });
    });
}

/// The harness finds `imz` through `$IMZ_BIN` or beside a test executable
/// (`target/<profile>/deps/..`); a benchmark binary lives in
/// `target/<profile>/` itself, so it runs itself again with `IMZ_BIN`
/// pointing beside it (signals passed on as SIGTERM, so the child cleans up
/// its own children). Returns only on failure to start; exits with the
/// child's status.
pub fn reexec_with_imz_bin() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let imz = exe.with_file_name("imz");
    let mut child = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("IMZ_BIN", &imz)
        .spawn()
        .context("re-running with IMZ_BIN set")?;
    let pid = child.id();
    on_signals(move || kill("TERM", pid));
    let status = child.wait()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Writes `len` bytes (whole MiB) of seeded data to `path`, unless a file
/// of that length is already there (benchmarks keep their inputs between
/// runs).
pub fn write_data_file(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == len {
        return Ok(());
    }
    eprintln!("writing {} ({} MiB)...", path.display(), len >> 20);
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for i in 0..len >> 20 {
        std::io::Write::write_all(&mut f, &crate::data::bytes(seed << 32 | i, 1 << 20))?;
    }
    f.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A child process stopped (SIGTERM, then SIGKILL) and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        register(child.id());
        Ok(Self {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if self.is_running() {
            kill("TERM", self.child.id());
            let deadline = Instant::now() + grace;
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() {
                eprintln!("{} ignored SIGTERM: killing it", self.name);
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        unregister(self.child.id());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// A TCP port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(l.local_addr()?.port())
}

/// Whether something accepts TCP connections on `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until `addr` accepts connections, while `alive` says the server runs.
pub fn wait_accepting(
    addr: SocketAddr,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !accepts(addr) {
        if !alive() {
            bail!("the server exited before accepting connections on {addr}");
        }
        if Instant::now() > deadline {
            bail!("nothing accepts connections on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`. Returns false if not permitted.
pub fn drop_page_cache() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// `sync`: dirty pages written back (so one run's writeback does not land
/// in the next run's time).
pub fn sync() {
    let _ = Command::new("sync").status();
}

/// A `kB` field of /proc/PID/status (e.g. `VmHWM`, `VmRSS`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib = rest.trim().trim_end_matches("kB").trim();
            return kib
                .parse()
                .with_context(|| format!("parsing {field} {kib:?}"));
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// User + system CPU time of process `pid` so far (all its threads).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after field 3.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    let hz = clock_ticks_per_second();
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn clock_ticks_per_second() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100u64)
            .max(1)
    })
}

/// The median of `samples` (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The 1-, 5- and 15-minute load averages, as `uptime` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Installs the Debian `packages` whose `probe` program is missing, with
/// service start-up blocked (policy-rc.d) so that nothing starts as a
/// system service. Each item is (probe path, package).
pub fn ensure_debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(probe, _)| !Path::new(probe).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {missing:?} with apt-get...");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        let _ = Command::new("chmod").arg("755").arg(policy).status();
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    let status = status.context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed ({status}); try apt-get update first");
    }
    Ok(())
}
