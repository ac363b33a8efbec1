//! Write-path benchmark of the gateway (not a test), issue 5's Benchmark:
//! in one run, with one client, interleaving the servers round by round:
//!
//! - creating, writing and committing 10,000 files of 4 KiB through
//!   `imz gateway` versus nfs-ganesha (VFS FSAL) exporting a directory on
//!   local disk. The client is a Rust NFSv3 client (`nfs3_client`, see
//!   `src/nfs.rs`) doing per file what a program's open/write/close does
//!   over NFS: CREATE (UNCHECKED, mode 0644, size 0), WRITE 4 KiB
//!   UNSTABLE, COMMIT; over `--conns` connections (4) at once, so no
//!   process start-up is in the numbers;
//! - a 1 GiB sequential write: the same client, CREATE + 1 MiB UNSTABLE
//!   WRITEs one at a time + COMMIT; again with `--conns` WRITEs in flight
//!   (one per connection, pieces dealt round-robin: what the kernel
//!   client's write-behind does); and `nfs-cp` (Debian libnfs-utils) of a
//!   local file (1 MiB WRITEs, UNSTABLE, COMMIT at close);
//! - reintegration throughput: the gateway runs with a long
//!   `--reintegrate-delay`, so that what the writes above logged stays in
//!   its log; after each write phase `imz sync` ships the backlog to a
//!   reachable origin and is timed until the log is empty (the origin has
//!   every file, durably). The peer is a raw upload of the same bytes
//!   straight to an origin's API with the same HTTP client the gateway uses
//!   (reqwest): `PUT /v1/uploads/{id}` per file, eight at a time as the
//!   gateway does, then `POST /v1/reintegrate` batches creating the files
//!   (4,096 operations each, the API's limit); the big file in one PUT
//!   from memory.
//!
//! Every round starts fresh servers: an origin over an empty directory for
//! each gateway and one for the raw uploads, gateways with empty caches,
//! ganesha exporting an empty directory. Round 0 also checks, untimed, that
//! every byte arrived (at the origins and in ganesha's directory).
//!
//! Run (as root, loopback only; installs nfs-ganesha, nfs-ganesha-vfs,
//! rpcbind and libnfs-utils with apt-get if missing, and starts them as
//! children):
//!
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p imz-integration --bin bench-write -- [--rounds N] [--dir DIR]
//! ```
//!
//! `--compare OTHER_IMZ` also runs a gateway from another build of `imz`
//! in the same rounds, interleaved, and prints its table too. The 1 GiB
//! source file is made once under DIR (default `.imz-bench/write`, or
//! `$IMZ_BENCH_DIR/write`); everything else is removed after each round.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use imz_integration::bench::ganesha::{Ganesha, Rpcbind};
use imz_integration::bench::gateway::Gw;
use imz_integration::bench::table::{Row, f2, print_load, print_table};
use imz_integration::bench::{self, Server, median};
use imz_integration::nfs::{Attrs, CreateMode, Nfs, Stable};
use imz_integration::{OriginProc, data};

const MIB: usize = 1 << 20;
const SRC: &str = "src-1g.bin";
const SMALL_DIR: &str = "small";
const BIG_RUST: &str = "big.bin";
const BIG_CP: &str = "big-cp.bin";
const BIG_PAR: &str = "big-par.bin";
/// Gateway cache: holds everything a round writes (nothing is evicted
/// before it is reintegrated anyway).
const CACHE_SIZE: &str = "8GiB";
/// Long enough that nothing ships before `imz sync` asks.
const HOLD: &str = "30m";
/// The API's limit on operations per reintegration batch.
const MAX_BATCH_OPS: usize = 4096;
/// Uploads the gateway keeps in flight while reintegrating; the raw peer
/// does the same.
const UPLOADS_IN_FLIGHT: usize = 8;
/// The issue's absolute target for small-file reintegration.
const SMALL_TARGET_FILES_S: f64 = 2000.0;

struct Options {
    rounds: usize,
    dir: PathBuf,
    files: usize,
    file_size: usize,
    conns: usize,
    big_mib: usize,
    nfs_cp: bool,
    compare: Option<PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        rounds: 5,
        dir: std::env::var_os("IMZ_BENCH_DIR")
            .map(|d| PathBuf::from(d).join("write"))
            .unwrap_or_else(|| PathBuf::from(".imz-bench/write")),
        files: 10_000,
        file_size: 4096,
        conns: 4,
        big_mib: 1024,
        nfs_cp: true,
        compare: None,
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> anyhow::Result<usize> {
        v.with_context(|| format!("{what} N"))?
            .parse()
            .with_context(|| format!("{what} N"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => o.rounds = num(args.next(), "--rounds")?,
            "--files" => o.files = num(args.next(), "--files")?,
            "--file-size" => o.file_size = num(args.next(), "--file-size")?,
            "--conns" => o.conns = num(args.next(), "--conns")?,
            "--big-mib" => o.big_mib = num(args.next(), "--big-mib")?,
            "--no-nfs-cp" => o.nfs_cp = false,
            "--dir" => o.dir = PathBuf::from(args.next().context("--dir DIR")?),
            "--compare" => {
                o.compare = Some(std::path::absolute(
                    args.next().context("--compare IMZ_BINARY")?,
                )?)
            }
            "-h" | "--help" => {
                println!(
                    "bench-write [--rounds N (5)] [--files N (10000)] [--file-size BYTES (4096)] \
                     [--conns N (4)] [--big-mib N (1024)] [--no-nfs-cp] [--dir DIR] \
                     [--compare OTHER_IMZ_BINARY]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(o.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        o.files >= 1 && o.conns >= 1 && o.big_mib >= 1,
        "counts must be positive"
    );
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let _hold = bench::prepare()?;
    run(&options()?)
}

/// Samples of one server.
#[derive(Default)]
struct PerServer {
    /// Small files: files per second.
    small: Vec<f64>,
    /// 1 GiB with the Rust client, MiB/s.
    big: Vec<f64>,
    /// 1 GiB with nfs-cp, MiB/s.
    big_cp: Vec<f64>,
    /// 1 GiB with several WRITEs in flight, MiB/s.
    big_par: Vec<f64>,
    /// CPU seconds of the server process per small-file run / per GiB.
    cpu_small: Vec<f64>,
    cpu_big: Vec<f64>,
    /// Reintegration (gateways) or raw upload: files/s, MiB/s.
    drain_small: Vec<f64>,
    drain_small_mib: Vec<f64>,
    drain_big: Vec<f64>,
    /// CPU seconds of the gateway and of its origin per drain.
    cpu_drain_small: Vec<(f64, f64)>,
    cpu_drain_big: Vec<(f64, f64)>,
}

#[derive(Default)]
struct Samples {
    per: HashMap<Server, PerServer>,
    raw: PerServer,
    load: Vec<f64>,
}

impl Samples {
    fn of(&mut self, server: Server) -> &mut PerServer {
        self.per.entry(server).or_default()
    }
}

/// The data written: the small files' contents and the big file.
struct Payload {
    small: Arc<Vec<Vec<u8>>>,
    big: Arc<Vec<u8>>,
    big_path: PathBuf,
}

fn run(opts: &Options) -> anyhow::Result<()> {
    bench::ensure_debian_packages(&[
        ("/usr/bin/ganesha.nfsd", "nfs-ganesha"),
        (
            "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
            "nfs-ganesha-vfs",
        ),
        ("/usr/sbin/rpcbind", "rpcbind"),
        ("/usr/bin/nfs-cp", "libnfs-utils"),
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
    std::fs::create_dir_all(&base)?;
    let big_path = base.join(SRC);
    bench::write_data_file(&big_path, (opts.big_mib * MIB) as u64, 5)?;
    let payload = Payload {
        small: Arc::new(
            (0..opts.files)
                .map(|i| data::bytes(7 << 32 | i as u64, opts.file_size))
                .collect(),
        ),
        big: Arc::new(std::fs::read(&big_path).context("reading the source file")?),
        big_path,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load_before = bench::load_average();
    let rpcbind = Rpcbind::ensure()?;
    eprintln!(
        "rpcbind: {}",
        if rpcbind.started_by_us() {
            "started (child)"
        } else {
            "already running, reused"
        }
    );
    let mut s = Samples::default();
    for round in 0..opts.rounds {
        bench::warm_memory();
        let load = bench::load_average();
        eprintln!("round {}/{} (load average {load})", round + 1, opts.rounds);
        if let Some(one) = load.split_whitespace().next().and_then(|l| l.parse().ok()) {
            s.load.push(one);
        }
        let work = base.join(format!("round-{round}"));
        let _ = std::fs::remove_dir_all(&work);
        let result = one_round(opts, &rt, round, &work, &payload, &mut s);
        let _ = std::fs::remove_dir_all(&work);
        result?;
    }
    let load_after = bench::load_average();
    drop(rpcbind);
    report(opts, &s, &load_before, &load_after);
    Ok(())
}

/// An origin with its own empty root, registered for cleanup.
struct Origin {
    proc: OriginProc,
}

impl Origin {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let root = dir.join("root");
        std::fs::create_dir_all(&root)?;
        let proc = OriginProc::start(&root, &dir.join("token"))?;
        bench::register(proc.proc.pid());
        Ok(Self { proc })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        // OriginProc's drop kills it.
        bench::unregister(self.proc.proc.pid());
    }
}

/// One round: fresh servers; small files, their reintegration; the big
/// file, its reintegration; nfs-cp. The order of the servers rotates.
fn one_round(
    opts: &Options,
    rt: &tokio::runtime::Runtime,
    round: usize,
    work: &Path,
    payload: &Payload,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let export = work.join("ganesha-export");
    std::fs::create_dir_all(&export)?;
    let ganesha = Ganesha::start_rw(&export, &work.join("ganesha"))?;
    let mut gws: Vec<(Server, Origin, Gw)> = Vec::new();
    for server in Server::gateways(opts.compare.as_deref()) {
        let origin = Origin::start(&work.join(format!("origin-{server:?}")))?;
        let other = server.binary(opts.compare.as_deref());
        let gw = Gw::start(
            other,
            &origin.proc,
            &work.join(format!("cache-{server:?}")),
            CACHE_SIZE,
            &["--reintegrate-delay", HOLD],
        )?;
        gws.push((server, origin, gw));
    }
    let raw = Origin::start(&work.join("origin-raw"))?;
    let gw = |server: Server| gws.iter().find(|(s, _, _)| *s == server);
    let ports = |server: Server| match gw(server) {
        Some((_, _, g)) => (g.port(), g.port()),
        None => (ganesha.nfs_port, ganesha.mount_port),
    };
    let pid = |server: Server| match gw(server) {
        Some((_, _, g)) => g.pid(),
        None => ganesha.pid(),
    };
    let url = |server: Server, path: &str| match gw(server) {
        Some((_, _, g)) => imz_integration::libnfs::url(g.port(), path),
        None => ganesha.url(path),
    };
    let mut servers = vec![Server::Ganesha];
    servers.extend(Server::gateways(opts.compare.as_deref()));
    let n = servers.len();
    servers.rotate_left(round % n);
    // Reintegration: the gateways and the raw upload (None) take turns.
    let mut drains: Vec<Option<Server>> = Server::gateways(opts.compare.as_deref())
        .into_iter()
        .map(Some)
        .collect();
    drains.push(None);
    let n = drains.len();
    drains.rotate_left(round % n);
    let small_bytes = (opts.files * opts.file_size) as f64;
    let big_bytes = payload.big.len() as f64;

    // 1. Small files.
    for &server in &servers {
        bench::sync();
        let (nfs_port, mount_port) = ports(server);
        let cpu = bench::cpu_time(pid(server))?;
        let secs = rt.block_on(small_files(
            nfs_port,
            mount_port,
            opts.conns,
            Arc::clone(&payload.small),
        ))?;
        let cpu = (bench::cpu_time(pid(server))? - cpu).as_secs_f64();
        let per = s.of(server);
        per.small.push(opts.files as f64 / secs);
        per.cpu_small.push(cpu);
    }
    // 2. Their reintegration, versus the raw upload.
    for &d in &drains {
        bench::sync();
        match d {
            Some(server) => {
                let (_, origin, g) = gw(server).context("no gateway")?;
                let (secs, cpu) = drain(g, origin, opts.files as u64 + 1)?;
                let per = s.of(server);
                per.drain_small.push(opts.files as f64 / secs);
                per.drain_small_mib.push(small_bytes / MIB as f64 / secs);
                per.cpu_drain_small.push(cpu);
            }
            None => {
                let cpu = bench::cpu_time(raw.proc.proc.pid())?;
                let secs = rt.block_on(raw_small(&raw.proc, round, &payload.small))?;
                let cpu = (bench::cpu_time(raw.proc.proc.pid())? - cpu).as_secs_f64();
                s.raw.drain_small.push(opts.files as f64 / secs);
                s.raw.drain_small_mib.push(small_bytes / MIB as f64 / secs);
                s.raw.cpu_drain_small.push((0.0, cpu));
            }
        }
    }
    // 3. The big file, Rust client.
    for &server in &servers {
        bench::sync();
        let (nfs_port, mount_port) = ports(server);
        let cpu = bench::cpu_time(pid(server))?;
        let secs = rt.block_on(big_file(nfs_port, mount_port, Arc::clone(&payload.big)))?;
        let cpu = (bench::cpu_time(pid(server))? - cpu).as_secs_f64();
        let per = s.of(server);
        per.big.push(big_bytes / MIB as f64 / secs);
        per.cpu_big.push(cpu / (big_bytes / (1u64 << 30) as f64));
    }
    // 4. Its reintegration, versus the raw upload.
    for &d in &drains {
        bench::sync();
        match d {
            Some(server) => {
                let (_, origin, g) = gw(server).context("no gateway")?;
                let (secs, cpu) = drain(g, origin, 1)?;
                let per = s.of(server);
                per.drain_big.push(big_bytes / MIB as f64 / secs);
                per.cpu_drain_big.push(cpu);
            }
            None => {
                let cpu = bench::cpu_time(raw.proc.proc.pid())?;
                let secs = rt.block_on(raw_big(&raw.proc, round, &payload.big_path))?;
                let cpu = (bench::cpu_time(raw.proc.proc.pid())? - cpu).as_secs_f64();
                s.raw.drain_big.push(big_bytes / MIB as f64 / secs);
                s.raw.cpu_drain_big.push((0.0, cpu));
            }
        }
    }
    // 5. The big file again, several WRITEs in flight (not reintegrated
    // until the final check).
    for &server in &servers {
        bench::sync();
        let (nfs_port, mount_port) = ports(server);
        let secs = rt.block_on(big_file_parallel(
            nfs_port,
            mount_port,
            opts.conns,
            Arc::clone(&payload.big),
        ))?;
        s.of(server).big_par.push(big_bytes / MIB as f64 / secs);
    }
    // 6. And with nfs-cp.
    if opts.nfs_cp {
        for &server in &servers {
            bench::sync();
            let secs = timed_nfs_cp(&payload.big_path, &url(server, BIG_CP))?;
            s.of(server).big_cp.push(big_bytes / MIB as f64 / secs);
        }
    }
    if round == 0 {
        eprintln!("checking that every byte arrived (untimed)...");
        for (server, origin, g) in &gws {
            g.ctl(&["sync", "--timeout", "10m"])?;
            verify_tree(&origin.proc.root, payload, opts.nfs_cp)
                .with_context(|| format!("at the origin of {server:?}"))?;
        }
        verify_tree(&export, payload, opts.nfs_cp).context("in ganesha's directory")?;
        verify_raw(&raw.proc.root, payload).context("at the raw uploads' origin")?;
    }
    ganesha.stop();
    drop(gws);
    drop(raw);
    Ok(())
}

/// Mounts `conns` connections, makes SMALL_DIR, then times CREATE +
/// WRITE (UNSTABLE) + COMMIT of every file, spread over the connections.
async fn small_files(
    nfs_port: u16,
    mount_port: u16,
    conns: usize,
    files: Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(Nfs::mount_ports(nfs_port, mount_port, "/imz").await?);
    }
    let dir = {
        let c = &mut clients[0];
        let root = c.root.clone();
        c.mkdir(&root, SMALL_DIR)
            .await
            .map_err(anyhow::Error::from)
            .context("MKDIR")?
    };
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut c) in clients.into_iter().enumerate() {
        let files = Arc::clone(&files);
        let dir = dir.clone();
        tasks.spawn(async move {
            let attrs = Attrs {
                mode: Some(0o644),
                size: Some(0),
                mtime: None,
            };
            for i in (k..files.len()).step_by(conns) {
                let name = small_name(i);
                let fh = c
                    .create(&dir, &name, CreateMode::Unchecked, &attrs)
                    .await
                    .with_context(|| format!("CREATE {name}"))?;
                let w = c
                    .write(&fh, 0, &files[i], Stable::UNSTABLE)
                    .await
                    .with_context(|| format!("WRITE {name}"))?;
                ensure!(w.count as usize == files[i].len(), "short WRITE of {name}");
                c.commit(&fh)
                    .await
                    .with_context(|| format!("COMMIT {name}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn small_name(i: usize) -> String {
    format!("f{i:05}")
}

/// CREATE + 1 MiB UNSTABLE WRITEs, one in flight, + COMMIT; seconds.
async fn big_file(nfs_port: u16, mount_port: u16, data: Arc<Vec<u8>>) -> anyhow::Result<f64> {
    let mut c = Nfs::mount_ports(nfs_port, mount_port, "/imz").await?;
    let root = c.root.clone();
    let attrs = Attrs {
        mode: Some(0o644),
        size: Some(0),
        mtime: None,
    };
    let start = Instant::now();
    let fh = c
        .create(&root, BIG_RUST, CreateMode::Unchecked, &attrs)
        .await
        .context("CREATE")?;
    for (i, piece) in data.chunks(MIB).enumerate() {
        let w = c
            .write(&fh, (i * MIB) as u64, piece, Stable::UNSTABLE)
            .await
            .context("WRITE")?;
        ensure!(w.count as usize == piece.len(), "short WRITE");
    }
    c.commit(&fh).await.context("COMMIT")?;
    Ok(start.elapsed().as_secs_f64())
}

/// CREATE + 1 MiB UNSTABLE WRITEs, `conns` in flight (one per
/// connection, pieces dealt round-robin), + COMMIT; seconds.
async fn big_file_parallel(
    nfs_port: u16,
    mount_port: u16,
    conns: usize,
    data: Arc<Vec<u8>>,
) -> anyhow::Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(Nfs::mount_ports(nfs_port, mount_port, "/imz").await?);
    }
    let attrs = Attrs {
        mode: Some(0o644),
        size: Some(0),
        mtime: None,
    };
    let start = Instant::now();
    let fh = {
        let c = &mut clients[0];
        let root = c.root.clone();
        c.create(&root, BIG_PAR, CreateMode::Unchecked, &attrs)
            .await
            .context("CREATE")?
    };
    let pieces = data.len().div_ceil(MIB);
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut c) in clients.into_iter().enumerate() {
        let data = Arc::clone(&data);
        let fh = fh.clone();
        tasks.spawn(async move {
            for i in (k..pieces).step_by(conns) {
                let piece = &data[i * MIB..((i + 1) * MIB).min(data.len())];
                let w = c
                    .write(&fh, (i * MIB) as u64, piece, Stable::UNSTABLE)
                    .await
                    .context("WRITE")?;
                ensure!(w.count as usize == piece.len(), "short WRITE");
            }
            anyhow::Ok(c)
        });
    }
    let mut last = None;
    while let Some(r) = tasks.join_next().await {
        last = Some(r??);
    }
    let mut c = last.context("no connection")?;
    c.commit(&fh).await.context("COMMIT")?;
    Ok(start.elapsed().as_secs_f64())
}

/// `imz sync` of a gateway whose log holds at least `min_records`; the
/// seconds it took until the log was empty, and the CPU seconds the
/// gateway and its origin spent meanwhile.
fn drain(g: &Gw, origin: &Origin, min_records: u64) -> anyhow::Result<(f64, (f64, f64))> {
    let status = g.status()?;
    let records = status["log_records"].as_u64().unwrap_or(0);
    ensure!(
        records >= min_records,
        "the gateway's log holds {records} records, expected at least {min_records}: \
         did something ship before `imz sync`?"
    );
    let opid = origin.proc.proc.pid();
    let (cpu_g, cpu_o) = (bench::cpu_time(g.pid())?, bench::cpu_time(opid)?);
    let start = Instant::now();
    g.ctl(&["sync", "--timeout", "10m"])?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = (
        (bench::cpu_time(g.pid())? - cpu_g).as_secs_f64(),
        (bench::cpu_time(opid)? - cpu_o).as_secs_f64(),
    );
    let status = g.status()?;
    ensure!(
        status["log_records"].as_u64() == Some(0) && status["conflicts"].as_u64() == Some(0),
        "after imz sync: {status}"
    );
    Ok((secs, cpu))
}

/// The HTTP client the gateway uses, configured the same way.
fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()?)
}

async fn put_upload(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    id: &str,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let resp = http
        .put(format!("{url}/v1/uploads/{id}"))
        .bearer_auth(token)
        .body(body)
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "PUT upload {id}: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

async fn reintegrate(
    http: &reqwest::Client,
    origin: &OriginProc,
    ops: Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    let n = ops.len();
    let resp = http
        .post(format!("{}/v1/reintegrate", origin.url))
        .bearer_auth(&origin.token)
        .json(&serde_json::json!({ "ops": ops }))
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "POST reintegrate: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    let answer: serde_json::Value = resp.json().await?;
    let results = answer["results"].as_array().context("no results")?;
    ensure!(
        results.len() == n && results.iter().all(|r| r["status"] == "applied"),
        "not every operation was applied: {}",
        results
            .iter()
            .find(|r| r["status"] != "applied")
            .map_or_else(
                || format!("{} of {n} answered", results.len()),
                |r| r.to_string()
            )
    );
    Ok(())
}

/// A create operation as the gateway sends one.
fn create_op(
    key: &str,
    parent: serde_json::Value,
    name: &str,
    object: serde_json::Value,
) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    serde_json::json!({
        "key": key,
        "op": "create",
        "parent": parent,
        "name": name,
        "object": object,
        "attrs": { "mode": 0o644, "uid": 0, "gid": 0, "atime": now, "mtime": now },
    })
}

/// Raw upload of the small files: a PUT each, eight at a time, then
/// batches creating SMALL_DIR and the files; seconds.
async fn raw_small(origin: &OriginProc, round: usize, files: &[Vec<u8>]) -> anyhow::Result<f64> {
    let http = http()?;
    let prefix = format!("raw-{round}");
    let dir_key = format!("{prefix}-dir");
    let start = Instant::now();
    let mut ops = vec![create_op(
        &dir_key,
        serde_json::json!({ "id": 1 }),
        SMALL_DIR,
        serde_json::json!({ "kind": "dir" }),
    )];
    // The gateway keeps this many uploads in flight; so does the peer.
    let mut puts = tokio::task::JoinSet::new();
    for (i, content) in files.iter().enumerate() {
        if puts.len() == UPLOADS_IN_FLIGHT
            && let Some(r) = puts.join_next().await
        {
            r??;
        }
        let id = format!("{prefix}-{i}");
        let (client, url, token) = (http.clone(), origin.url.clone(), origin.token.clone());
        let (upload, body) = (id.clone(), content.clone());
        puts.spawn(async move { put_upload(&client, &url, &token, &upload, body).await });
        ops.push(create_op(
            &id,
            serde_json::json!({ "created": dir_key }),
            &small_name(i),
            serde_json::json!({ "kind": "file", "upload": id }),
        ));
        if ops.len() == MAX_BATCH_OPS {
            while let Some(r) = puts.join_next().await {
                r??;
            }
            reintegrate(&http, origin, std::mem::take(&mut ops)).await?;
        }
    }
    while let Some(r) = puts.join_next().await {
        r??;
    }
    if !ops.is_empty() {
        reintegrate(&http, origin, ops).await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Raw upload of the big file, from memory, then one
/// create; seconds.
async fn raw_big(origin: &OriginProc, round: usize, path: &Path) -> anyhow::Result<f64> {
    let http = http()?;
    let id = format!("raw-{round}-big");
    // From memory, in one piece: the fastest a client can offer the bytes.
    let body = std::fs::read(path)?;
    let start = Instant::now();
    put_upload(&http, &origin.url, &origin.token, &id, body).await?;
    let op = create_op(
        &id,
        serde_json::json!({ "id": 1 }),
        BIG_RUST,
        serde_json::json!({ "kind": "file", "upload": id }),
    );
    reintegrate(&http, origin, vec![op]).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// `nfs-cp LOCAL URL`; seconds.
fn timed_nfs_cp(local: &Path, url: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("nfs-cp")
        .arg(local)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running nfs-cp")?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "nfs-cp {} {url}: {}",
        local.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(secs)
}

/// `dir` holds SMALL_DIR with every small file, BIG_RUST, BIG_PAR and
/// (with nfs-cp) BIG_CP, byte for byte.
fn verify_tree(dir: &Path, payload: &Payload, with_cp: bool) -> anyhow::Result<()> {
    verify_small(&dir.join(SMALL_DIR), payload)?;
    same_file(&dir.join(BIG_RUST), &payload.big_path)?;
    same_file(&dir.join(BIG_PAR), &payload.big_path)?;
    if with_cp {
        same_file(&dir.join(BIG_CP), &payload.big_path)?;
    }
    Ok(())
}

fn verify_raw(dir: &Path, payload: &Payload) -> anyhow::Result<()> {
    verify_small(&dir.join(SMALL_DIR), payload)?;
    same_file(&dir.join(BIG_RUST), &payload.big_path)
}

fn verify_small(dir: &Path, payload: &Payload) -> anyhow::Result<()> {
    let n = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .count();
    ensure!(
        n == payload.small.len(),
        "{} holds {n} entries, not {}",
        dir.display(),
        payload.small.len()
    );
    for (i, content) in payload.small.iter().enumerate() {
        let path = dir.join(small_name(i));
        let got = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(got == *content, "{} differs", path.display());
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<()> {
    let mut fa = std::fs::File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = std::fs::File::open(b)?;
    let (mut x, mut y) = (vec![0u8; MIB], vec![0u8; MIB]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut fa, &mut x)?;
        let m = read_full(&mut fb, &mut y)?;
        ensure!(
            n == m,
            "{} and {} differ in length",
            a.display(),
            b.display()
        );
        ensure!(
            x[..n] == y[..m],
            "{} differs near offset {offset}",
            a.display()
        );
        if n == 0 {
            return Ok(());
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The issue's table for one gateway against the peers.
fn rows(opts: &Options, g: &PerServer, s: &Samples) -> Vec<Row> {
    let m = |v: &[f64]| median(v);
    let gan = s.per.get(&Server::Ganesha);
    let gm = |f: fn(&PerServer) -> &Vec<f64>| gan.and_then(|p| m(f(p)));
    let mut rows = vec![
        Row::throughput(
            "create+write+commit 4 KiB files",
            "files/s",
            m(&g.small),
            gm(|p| &p.small),
            "ganesha",
            Some(1.0),
        ),
        Row::throughput(
            "seq write big file, 1 MiB WRITEs",
            "MiB/s",
            m(&g.big),
            gm(|p| &p.big),
            "ganesha",
            Some(1.0),
        ),
        Row::throughput(
            "seq write big file, WRITEs in flight",
            "MiB/s",
            m(&g.big_par),
            gm(|p| &p.big_par),
            "ganesha",
            Some(1.0),
        ),
    ];
    if opts.nfs_cp {
        rows.push(Row::throughput(
            "seq write big file, nfs-cp",
            "MiB/s",
            m(&g.big_cp),
            gm(|p| &p.big_cp),
            "ganesha",
            Some(1.0),
        ));
    }
    rows.extend([
        Row::throughput(
            "reintegrate small files",
            "files/s",
            m(&g.drain_small),
            m(&s.raw.drain_small),
            "raw PUT",
            None,
        ),
        Row::throughput(
            "reintegrate small files, bound",
            "files/s",
            m(&g.drain_small),
            Some(SMALL_TARGET_FILES_S),
            "target",
            Some(1.0),
        ),
        Row::throughput(
            "reintegrate small files",
            "MiB/s",
            m(&g.drain_small_mib),
            m(&s.raw.drain_small_mib),
            "raw PUT",
            None,
        ),
        Row::throughput(
            "reintegrate big file",
            "MiB/s",
            m(&g.drain_big),
            m(&s.raw.drain_big),
            "raw PUT",
            Some(0.8),
        ),
    ]);
    rows
}

fn report(opts: &Options, s: &Samples, load_before: &str, load_after: &str) {
    let empty = PerServer::default();
    let imz = imz_integration::imz_bin();
    let title = format!(
        "bench-write: {} rounds, medians; {} files of {} B over {} connections, {} MiB big file; \
         client: Rust nfs3_client (and nfs-cp); imz = {}",
        opts.rounds,
        opts.files,
        opts.file_size,
        opts.conns,
        opts.big_mib,
        imz.display()
    );
    print_table(
        &title,
        &rows(opts, s.per.get(&Server::Imz).unwrap_or(&empty), s),
    );
    if let Some(b) = &opts.compare {
        print_table(
            &format!(
                "the same, interleaved in the same rounds: imz = {}",
                b.display()
            ),
            &rows(opts, s.per.get(&Server::ImzB).unwrap_or(&empty), s),
        );
    }
    println!(
        "ratio: imz/peer (>1: imz better); the small-file bound row compares with the issue's 2,000 files/s"
    );
    println!();
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.1}..{hi:.1} (n={})", v.len())
    };
    let mut servers: Vec<(&str, &PerServer)> = vec![
        ("ganesha", s.per.get(&Server::Ganesha).unwrap_or(&empty)),
        ("imz", s.per.get(&Server::Imz).unwrap_or(&empty)),
    ];
    if opts.compare.is_some() {
        servers.push(("imz-b", s.per.get(&Server::ImzB).unwrap_or(&empty)));
    }
    println!("spread (min..max):");
    for (name, p) in &servers {
        println!("  {name:<8} small files/s      {}", spread(&p.small));
        println!("  {name:<8} big MiB/s          {}", spread(&p.big));
        println!("  {name:<8} big par MiB/s      {}", spread(&p.big_par));
        if opts.nfs_cp {
            println!("  {name:<8} nfs-cp MiB/s       {}", spread(&p.big_cp));
        }
        if *name != "ganesha" {
            println!("  {name:<8} reint small files/s {}", spread(&p.drain_small));
            println!("  {name:<8} reint big MiB/s    {}", spread(&p.drain_big));
        }
    }
    println!(
        "  raw      small files/s      {}",
        spread(&s.raw.drain_small)
    );
    println!("  raw      big MiB/s          {}", spread(&s.raw.drain_big));
    let m = |v: &[f64]| median(v);
    let pair = |v: &[(f64, f64)], second: bool| {
        let xs: Vec<f64> = v.iter().map(|p| if second { p.1 } else { p.0 }).collect();
        f2(m(&xs))
    };
    println!("CPU seconds (medians):");
    for (name, p) in &servers {
        println!(
            "  {name:<8} server: small-file run {}, per GiB written {}",
            f2(m(&p.cpu_small)),
            f2(m(&p.cpu_big))
        );
        if *name != "ganesha" {
            println!(
                "  {name:<8} reintegration small: gateway {} + origin {}; big: gateway {} + origin {}",
                pair(&p.cpu_drain_small, false),
                pair(&p.cpu_drain_small, true),
                pair(&p.cpu_drain_big, false),
                pair(&p.cpu_drain_big, true),
            );
        }
    }
    println!(
        "  raw upload: origin small {}, big {}",
        pair(&s.raw.cpu_drain_small, true),
        pair(&s.raw.cpu_drain_big, true)
    );
    println!(
        "reintegration: gateway with --reintegrate-delay {HOLD}, backlog shipped by `imz sync` (timed until the log is empty)"
    );
    print_load(load_before, load_after, &s.load);
}
