//! Read-path benchmark of the gateway (not a test), issue 4's Benchmark:
//! in one run, with one client (Debian libnfs-utils `nfs-cat`, `nfs-ls`),
//! interleaving the servers round by round:
//!
//! - sequential read of a 1 GiB file, cold and warm, through `imz gateway`
//!   versus nfs-ganesha (VFS FSAL) exporting the same directory from disk;
//! - `nfs-ls` of a 10,000-entry directory (READDIRPLUS, with attributes),
//!   cold and warm, gateway versus ganesha;
//! - the gateway's cold read versus a raw HTTP download (`curl`) of the same
//!   bytes from the origin's data URL;
//! - the gateway's peak RSS (VmHWM) over the 1 GiB rounds, and while a
//!   4 GiB file is read through a fresh gateway (bound: 256 MiB).
//!
//! What "cold" means: for the gateway, a new gateway process with an empty
//! cache and the page cache dropped (so the origin reads the file, and its
//! metadata store, from disk); for ganesha, a freshly started ganesha (empty
//! metadata cache) with the page cache dropped; for raw HTTP, the page cache
//! dropped. "Warm": the same server again after one untimed read (gateway:
//! data in its redb cache, redb file in the page cache; ganesha: file in the
//! page cache).
//!
//! Run (as root, loopback only; installs nfs-ganesha, nfs-ganesha-vfs,
//! rpcbind with apt-get if missing, and starts them as children):
//!
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p imz-integration --bin bench-read -- [--rounds N] [--dir DIR] [--skip-4g]
//! ```
//!
//! `--compare OTHER_IMZ` also runs a gateway from another build of `imz`
//! (e.g. a branch built in a scratch worktree) in the same rounds,
//! interleaved, and prints its table too: a before/after in one run.
//!
//! The data set (1 GiB, 4 GiB, 10k files) is made once under DIR (default
//! `.imz-bench/read`, or `$IMZ_BENCH_DIR`) and reused.

use std::fs::File;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use imz_integration::OriginProc;
use imz_integration::bench::ganesha::{Ganesha, Rpcbind};
use imz_integration::bench::gateway::Gw;
use imz_integration::bench::table::{Row, f2, print_load, print_table};
use imz_integration::bench::{self, Server, median};

const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;
const BIG: &str = "big-1g.bin";
const HUGE: &str = "big-4g.bin";
const DIR10K: &str = "dir10k";
const DIR_ENTRIES: usize = 10_000;
/// Warm repetitions per round (reads and listings).
const WARM_REPEATS: usize = 2;
/// The issue's bound on gateway memory while a 4 GiB file is read.
const RSS_BOUND_MIB: f64 = 256.0;
/// Gateway cache size for the benchmark (holds every file read).
const CACHE_SIZE: &str = "8GiB";

struct Options {
    rounds: usize,
    dir: PathBuf,
    skip_4g: bool,
    /// A second imz binary whose gateway runs interleaved with the first.
    compare: Option<PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        rounds: 5,
        dir: std::env::var_os("IMZ_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".imz-bench/read")),
        skip_4g: false,
        compare: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                o.rounds = args
                    .next()
                    .context("--rounds N")?
                    .parse()
                    .context("--rounds N")?;
            }
            "--dir" => o.dir = PathBuf::from(args.next().context("--dir DIR")?),
            "--skip-4g" => o.skip_4g = true,
            "--compare" => {
                o.compare = Some(std::path::absolute(
                    args.next().context("--compare IMZ_BINARY")?,
                )?)
            }
            "-h" | "--help" => {
                println!(
                    "bench-read [--rounds N (5)] [--dir DIR] [--skip-4g] [--compare OTHER_IMZ_BINARY]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(o.rounds >= 1, "--rounds must be at least 1");
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let _hold = bench::prepare()?;
    run(&options()?)
}

/// Samples of one server.
#[derive(Default)]
struct PerServer {
    read_cold: Vec<f64>,
    read_warm: Vec<f64>,
    ls_cold: Vec<f64>,
    ls_warm: Vec<f64>,
    /// CPU seconds per GiB read, cold and warm.
    cpu_cold: Vec<f64>,
    cpu_warm: Vec<f64>,
    /// Peak RSS over a round (gateways).
    hwm_mib: Vec<f64>,
    four: Option<FourGig>,
}

#[derive(Default)]
struct Samples {
    imz: PerServer,
    imz_b: PerServer,
    ganesha: PerServer,
    http_cold: Vec<f64>,
    /// Origin CPU seconds per GiB of gateway cold reads.
    cpu_cold_origin: Vec<f64>,
    /// 1-minute load average at the start of each round.
    load: Vec<f64>,
}

impl Samples {
    fn of(&mut self, server: Server) -> &mut PerServer {
        match server {
            Server::Imz => &mut self.imz,
            Server::ImzB => &mut self.imz_b,
            Server::Ganesha => &mut self.ganesha,
        }
    }
}

struct FourGig {
    mib_s: f64,
    hwm_mib: f64,
    cpu_s: f64,
}

fn run(opts: &Options) -> anyhow::Result<()> {
    bench::ensure_debian_packages(&[
        ("/usr/bin/ganesha.nfsd", "nfs-ganesha"),
        (
            "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
            "nfs-ganesha-vfs",
        ),
        ("/usr/sbin/rpcbind", "rpcbind"),
        ("/usr/bin/nfs-cat", "libnfs-utils"),
        ("/usr/bin/curl", "curl"),
    ])?;
    let imz = imz_integration::imz_bin();
    ensure!(
        imz.exists(),
        "{} is missing: run `cargo build --release --bins` first",
        imz.display()
    );
    if let Some(b) = &opts.compare {
        ensure!(b.exists(), "--compare {}: no such file", b.display());
    }
    let base = std::path::absolute(&opts.dir)?;
    let root = base.join("root");
    prepare_data(&root, !opts.skip_4g)?;
    let load_before = bench::load_average();
    let cold_ok = bench::drop_page_cache();
    if !cold_ok {
        eprintln!("warning: cannot write /proc/sys/vm/drop_caches: cold runs are not cold");
    }

    let rpcbind = Rpcbind::ensure()?;
    eprintln!(
        "rpcbind: {}",
        if rpcbind.started_by_us() {
            "started (child)"
        } else {
            "already running, reused"
        }
    );
    let token_file = base.join("token");
    let origin = OriginProc::start(&root, &token_file)?;
    bench::register(origin.proc.pid());
    let data_url = data_url(&origin, BIG)?;

    let mut s = Samples::default();
    for round in 0..opts.rounds {
        bench::warm_memory();
        let load = bench::load_average();
        eprintln!("round {}/{} (load average {load})", round + 1, opts.rounds);
        if let Some(one) = load.split_whitespace().next().and_then(|l| l.parse().ok()) {
            s.load.push(one);
        }
        one_round(opts, round, &base, &root, &origin, &data_url, &mut s)?;
    }

    if !opts.skip_4g {
        for server in Server::gateways(opts.compare.as_deref()) {
            bench::warm_memory();
            eprintln!("4 GiB read through a fresh gateway ({server:?})");
            s.of(server).four = Some(four_gig(opts, server, &base, &origin)?);
        }
    }
    let load_after = bench::load_average();
    bench::unregister(origin.proc.pid());
    drop(origin);
    drop(rpcbind);

    report(opts, &s, cold_ok, &load_before, &load_after);
    Ok(())
}

/// One round: a fresh ganesha and fresh gateways, listings cold then warm,
/// reads cold then warm; the order of the servers rotates by round.
fn one_round(
    opts: &Options,
    round: usize,
    base: &Path,
    root: &Path,
    origin: &OriginProc,
    data_url: &str,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let ganesha = Ganesha::start(root, &base.join("ganesha"))?;
    let mut gws = Vec::new();
    for server in Server::gateways(opts.compare.as_deref()) {
        let dir = base.join(format!("cache-{server:?}-{round}"));
        gws.push((server, start_gw(opts, server, origin, &dir)?));
    }
    let gw = |server: Server| gws.iter().find(|(s, _)| *s == server).map(|(_, g)| g);
    let pid = |server: Server| match gw(server) {
        Some(g) => g.pid(),
        None => ganesha.pid(),
    };
    let url = |server: Server, path: &str| match gw(server) {
        Some(g) => imz_integration::libnfs::url(g.port(), path),
        None => ganesha.url(path),
    };
    let mut servers = vec![Server::Ganesha];
    servers.extend(Server::gateways(opts.compare.as_deref()));
    let n = servers.len();
    servers.rotate_left(round % n);

    // Listing, cold: first listing through a fresh server, page cache dropped.
    for &server in &servers {
        bench::drop_page_cache();
        let ms = timed_ls(&url(server, DIR10K))?;
        s.of(server).ls_cold.push(ms);
    }
    for _ in 0..WARM_REPEATS {
        for &server in &servers {
            let ms = timed_ls(&url(server, DIR10K))?;
            s.of(server).ls_warm.push(ms);
        }
    }

    // Read, cold. The raw HTTP download takes its turn in the rotation.
    let mut cold: Vec<Option<Server>> = servers.iter().copied().map(Some).collect();
    cold.push(None);
    let n = cold.len();
    cold.rotate_left(round % n);
    for &server in &cold {
        bench::drop_page_cache();
        let Some(server) = server else {
            let secs = timed_curl(data_url, &origin.token, GIB)?;
            s.http_cold.push(GIB as f64 / MIB / secs);
            continue;
        };
        let (cpu, origin_cpu) = (
            bench::cpu_time(pid(server))?,
            bench::cpu_time(origin.proc.pid())?,
        );
        let secs = timed_cat(&url(server, BIG))?;
        let cpu = (bench::cpu_time(pid(server))? - cpu).as_secs_f64();
        let origin_cpu = (bench::cpu_time(origin.proc.pid())? - origin_cpu).as_secs_f64();
        let per = s.of(server);
        per.read_cold.push(GIB as f64 / MIB / secs);
        per.cpu_cold.push(cpu);
        if server == Server::Imz {
            s.cpu_cold_origin.push(origin_cpu);
        }
    }
    // The gateways' storers may still be writing what they fetched.
    bench::sync();
    std::thread::sleep(Duration::from_millis(500));

    // Read, warm: after one untimed read per server, because the page
    // cache drops of later cold runs evicted what the earlier ones loaded
    // (the gateway's redb file, ganesha's file).
    for &server in &servers {
        timed_cat(&url(server, BIG))?;
    }
    for _ in 0..WARM_REPEATS {
        for &server in &servers {
            let cpu = bench::cpu_time(pid(server))?;
            let secs = timed_cat(&url(server, BIG))?;
            let cpu = (bench::cpu_time(pid(server))? - cpu).as_secs_f64();
            let per = s.of(server);
            per.read_warm.push(GIB as f64 / MIB / secs);
            per.cpu_warm.push(cpu);
        }
    }
    for (server, g) in &gws {
        s.of(*server).hwm_mib.push(g.hwm_mib()?);
    }

    if round == 0 {
        // Untimed: every server gives exactly the file's bytes.
        for &server in &servers {
            verify_cat(&url(server, BIG), &root.join(BIG))
                .with_context(|| format!("verifying {BIG} through {server:?}"))?;
        }
    }
    for (_, g) in gws {
        let dir = g.cache_dir.clone();
        drop(g);
        let _ = std::fs::remove_dir_all(&dir);
    }
    ganesha.stop();
    Ok(())
}

/// The 4 GiB file read once through a fresh gateway: throughput, peak RSS.
fn four_gig(
    opts: &Options,
    server: Server,
    base: &Path,
    origin: &OriginProc,
) -> anyhow::Result<FourGig> {
    let cache_dir = base.join(format!("cache-{server:?}-4g"));
    let gw = start_gw(opts, server, origin, &cache_dir)?;
    bench::drop_page_cache();
    let cpu = bench::cpu_time(gw.pid())?;
    let secs = timed_cat(&imz_integration::libnfs::url(gw.port(), HUGE))?;
    let result = FourGig {
        mib_s: (4 * GIB) as f64 / MIB / secs,
        hwm_mib: gw.hwm_mib()?,
        cpu_s: (bench::cpu_time(gw.pid())? - cpu).as_secs_f64(),
    };
    drop(gw);
    let _ = std::fs::remove_dir_all(&cache_dir);
    Ok(result)
}

/// A fresh gateway: the one under test, or the `--compare` build.
fn start_gw(
    opts: &Options,
    server: Server,
    origin: &OriginProc,
    cache_dir: &Path,
) -> anyhow::Result<Gw> {
    Gw::start(
        server.binary(opts.compare.as_deref()),
        origin,
        cache_dir,
        CACHE_SIZE,
        &[],
    )
}

/// `GET /v1/objects/1/lookup?name=NAME` -> the data URL of its current version.
fn data_url(origin: &OriginProc, name: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "-f", "-H"])
        .arg(format!("Authorization: Bearer {}", origin.token))
        .arg(format!("{}/v1/objects/1/lookup?name={name}", origin.url))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "origin lookup of {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing the lookup answer")?;
    let attr = &entry["attr"];
    let (Some(id), Some(version)) = (attr["id"].as_u64(), attr["version"].as_u64()) else {
        bail!("no attr.id/attr.version in the lookup answer {entry}");
    };
    Ok(format!("{}/v1/data/{id}/{version}", origin.url))
}

/// `nfs-cat URL > /dev/null`; seconds taken.
fn timed_cat(url: &str) -> anyhow::Result<f64> {
    let null = File::create("/dev/null")?;
    let start = Instant::now();
    let out = Command::new("nfs-cat")
        .arg(url)
        .stdout(null)
        .stderr(Stdio::piped())
        .output()
        .context("running nfs-cat")?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "nfs-cat {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(secs)
}

/// `curl -o /dev/null` of the origin's data URL; seconds taken.
fn timed_curl(url: &str, token: &str, expect: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .context("running curl")?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    ensure!(got == expect, "curl got {got} bytes, expected {expect}");
    Ok(secs)
}

/// `nfs-ls URL` of the 10k directory; milliseconds taken.
fn timed_ls(url: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("nfs-ls")
        .arg(url)
        .stderr(Stdio::piped())
        .output()
        .context("running nfs-ls")?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    ensure!(
        out.status.success(),
        "nfs-ls {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let n = out.stdout.lines().filter(|l| l.is_ok()).count();
    ensure!(
        n == DIR_ENTRIES,
        "nfs-ls {url} listed {n} entries, not {DIR_ENTRIES}"
    );
    Ok(ms)
}

/// Reads the file through `nfs-cat URL` and compares it with `local`.
fn verify_cat(url: &str, local: &Path) -> anyhow::Result<()> {
    let mut child = Command::new("nfs-cat")
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .context("running nfs-cat")?;
    let mut pipe = child.stdout.take().context("no pipe")?;
    let mut file = File::open(local)?;
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let n = pipe.read(&mut a)?;
        if n == 0 {
            break;
        }
        file.read_exact(&mut b[..n])
            .with_context(|| format!("the file is shorter than what was read ({offset})"))?;
        ensure!(a[..n] == b[..n], "bytes differ near offset {offset}");
        offset += n as u64;
    }
    ensure!(child.wait()?.success(), "nfs-cat failed");
    ensure!(
        file.read(&mut b)? == 0,
        "read {offset} bytes, the file is longer"
    );
    Ok(())
}

/// Makes the data set once: the 1 GiB and 4 GiB files and the 10k directory.
fn prepare_data(root: &Path, with_4g: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(root)?;
    bench::write_data_file(&root.join(BIG), GIB, 1)?;
    if with_4g {
        bench::write_data_file(&root.join(HUGE), 4 * GIB, 4)?;
    }
    let dir = root.join(DIR10K);
    let count = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    if count != DIR_ENTRIES {
        eprintln!("making {DIR_ENTRIES} files in {}...", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for i in 0..DIR_ENTRIES {
            std::fs::write(dir.join(format!("f{i:05}")), format!("file {i}\n"))?;
        }
    }
    Ok(())
}

/// The issue's table for one gateway against the peers.
fn rows(g: &PerServer, s: &Samples) -> Vec<Row> {
    let m = |v: &[f64]| median(v);
    let thr = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let time = |a: Option<f64>, b: Option<f64>| Some(b? / a?);
    let gan = &s.ganesha;
    let mut rows = vec![
        Row {
            name: "seq read 1 GiB, cold",
            unit: "MiB/s",
            imz: m(&g.read_cold),
            peer: m(&gan.read_cold),
            peer_name: "ganesha",
            ratio: thr(m(&g.read_cold), m(&gan.read_cold)),
            target: None,
        },
        Row {
            name: "seq read 1 GiB, warm",
            unit: "MiB/s",
            imz: m(&g.read_warm),
            peer: m(&gan.read_warm),
            peer_name: "ganesha",
            ratio: thr(m(&g.read_warm), m(&gan.read_warm)),
            target: Some(1.0),
        },
        Row {
            name: "cold read vs raw HTTP GET",
            unit: "MiB/s",
            imz: m(&g.read_cold),
            peer: m(&s.http_cold),
            peer_name: "curl",
            ratio: thr(m(&g.read_cold), m(&s.http_cold)),
            target: Some(0.8),
        },
        Row {
            name: "nfs-ls 10k entries, cold",
            unit: "ms",
            imz: m(&g.ls_cold),
            peer: m(&gan.ls_cold),
            peer_name: "ganesha",
            ratio: time(m(&g.ls_cold), m(&gan.ls_cold)),
            target: Some(1.0),
        },
        Row {
            name: "nfs-ls 10k entries, warm",
            unit: "ms",
            imz: m(&g.ls_warm),
            peer: m(&gan.ls_warm),
            peer_name: "ganesha",
            ratio: time(m(&g.ls_warm), m(&gan.ls_warm)),
            target: Some(1.0),
        },
        Row {
            name: "gateway peak RSS, 1 GiB rounds",
            unit: "MiB",
            imz: m(&g.hwm_mib),
            peer: None,
            peer_name: "",
            ratio: None,
            target: None,
        },
    ];
    if let Some(f) = &g.four {
        rows.push(Row {
            name: "gateway peak RSS, 4 GiB read",
            unit: "MiB",
            imz: Some(f.hwm_mib),
            peer: Some(RSS_BOUND_MIB),
            peer_name: "bound",
            ratio: Some(RSS_BOUND_MIB / f.hwm_mib),
            target: Some(1.0),
        });
    }
    rows
}

fn report(opts: &Options, s: &Samples, cold_ok: bool, load_before: &str, load_after: &str) {
    let imz = imz_integration::imz_bin();
    print_table(
        &format!(
            "bench-read: {} rounds, medians; same client (libnfs-utils nfs-cat/nfs-ls, curl); imz = {}",
            opts.rounds,
            imz.display()
        ),
        &rows(&s.imz, s),
    );
    if let Some(b) = &opts.compare {
        print_table(
            &format!(
                "the same, interleaved in the same rounds: imz = {}",
                b.display()
            ),
            &rows(&s.imz_b, s),
        );
    }
    println!(
        "ratio: imz/peer for throughput; peer/imz for times and for RSS vs its bound (>1: imz better)"
    );
    println!();
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.1}..{hi:.1} (n={})", v.len())
    };
    println!("spread (min..max):");
    let mut lines = vec![("curl read cold MiB/s", &s.http_cold)];
    let mut servers = vec![("ganesha", &s.ganesha), ("imz", &s.imz)];
    if opts.compare.is_some() {
        servers.push(("imz-b", &s.imz_b));
    }
    let names: Vec<(String, &Vec<f64>)> = servers
        .iter()
        .flat_map(|(n, p)| {
            [
                (format!("{n} read cold MiB/s"), &p.read_cold),
                (format!("{n} read warm MiB/s"), &p.read_warm),
                (format!("{n} ls cold ms"), &p.ls_cold),
                (format!("{n} ls warm ms"), &p.ls_warm),
            ]
        })
        .collect();
    for (name, v) in names.iter().map(|(n, v)| (n.as_str(), *v)) {
        lines.push((name, v));
    }
    for (name, v) in lines {
        println!("  {name:<26} {}", spread(v));
    }
    let m = |v: &[f64]| median(v);
    for (name, p) in &servers {
        println!(
            "CPU s per GiB read (median), {name}: cold {}, warm {}",
            f2(m(&p.cpu_cold)),
            f2(m(&p.cpu_warm)),
        );
        if let Some(f) = &p.four {
            println!(
                "  4 GiB cold read through a fresh gateway: {:.1} MiB/s, CPU {:.1} s, peak RSS {:.1} MiB",
                f.mib_s, f.cpu_s, f.hwm_mib
            );
        }
    }
    println!(
        "origin CPU s per GiB of gateway cold reads (median): {}",
        f2(m(&s.cpu_cold_origin))
    );
    println!(
        "cold: page cache {}dropped before each cold run; gateway: new process, empty cache; ganesha: new process",
        if cold_ok { "" } else { "NOT " }
    );
    print_load(load_before, load_after, &s.load);
}
