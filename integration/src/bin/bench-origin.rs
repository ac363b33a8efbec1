//! Benchmark of the origin (not a test): downloads of a 1 GiB file from
//! `imz origin` and from nginx (sendfile on) serving the same directory,
//! interleaved, with the same client (curl); then journal records appended
//! per second under bursts of small changes. Prints a table with ratios.
//!
//! `cargo build --release --bins && cargo run --release -p imz-integration --bin bench-origin`
//! (nginx: the Debian package; installed with apt-get if missing).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use imz_integration::Imz;

const FILE_SIZE: u64 = 1 << 30;
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let _hold = imz_integration::bench::PageReportingHold::start();
    let base = std::env::current_dir()?.join(".imz-bench");
    let root = base.join("root");
    std::fs::create_dir_all(&root)?;
    let big = root.join("big.bin");
    if std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0) != FILE_SIZE {
        eprintln!("writing a 1 GiB file...");
        let mut f = std::fs::File::create(&big)?;
        let mut block = vec![0u8; 1 << 20];
        for i in 0..(FILE_SIZE >> 20) {
            block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i as usize * 31 + j) as u8);
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    // Warm the page cache so both servers read from memory.
    std::io::copy(&mut std::fs::File::open(&big)?, &mut std::io::sink())?;

    let nginx = Nginx::start(&base, &root)?;
    let token_file = base.join("token");
    let mut rows = Vec::new();
    for chunk in [256usize << 10, 1 << 20, 4 << 20] {
        let (origin, url) =
            start_origin(&root, &token_file, &["--read-chunk", &chunk.to_string()])?;
        let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
        let (id, version) = lookup(&url, &token, "big.bin")?;
        let data_url = format!("{url}/v1/data/{id}/{version}");
        let nginx_url = format!("http://{}/big.bin", nginx.addr);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(curl_speed(&data_url, Some(&token))?);
            theirs.push(curl_speed(&nginx_url, None)?);
        }
        let (o, n) = (median(&mut ours), median(&mut theirs));
        rows.push((
            format!("1 GiB download, read chunk {} KiB", chunk >> 10),
            o,
            n,
        ));
        drop(origin);
    }
    drop(nginx);

    println!();
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "download (median of 3, MB/s)", "imz origin", "nginx", "ratio"
    );
    for (name, o, n) in &rows {
        println!(
            "{name:<44} {:>12.0} {:>12.0} {:>6.2}x",
            o / 1e6,
            n / 1e6,
            o / n
        );
    }

    // Journal: a burst of small reintegration creates from many clients.
    let (_origin, url) = start_origin(&root, &token_file, &[])?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    let run = format!("{}", std::process::id());
    let clients = 32;
    let per_client = 100;
    let before = last_seq(&url)?;
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, token, run) = (url.clone(), token.clone(), run.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let http = reqwest::blocking::Client::new();
                for i in 0..per_client {
                    let body = format!(
                        r#"{{"ops":[{{"key":"bench-{run}-{c}-{i}","op":"create","parent":{{"id":1}},"name":"b{run}-{c}-{i}","object":{{"kind":"dir"}}}}]}}"#
                    );
                    let resp = http
                        .post(format!("{url}/v1/reintegrate"))
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()?;
                    anyhow::ensure!(resp.status().is_success(), "reintegrate: {}", resp.status());
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let api_elapsed = t.elapsed();
    let api_records = last_seq(&url)? - before;

    // A burst of files created directly in the directory by another program.
    let ext_dir = root.join(format!("ext-{run}"));
    let n_ext = 5000u64;
    let before = last_seq(&url)?;
    let t = Instant::now();
    std::fs::create_dir(&ext_dir)?;
    for i in 0..n_ext {
        std::fs::write(ext_dir.join(format!("f{i}")), b"x")?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_seq(&url)? < before + n_ext + 1 {
        if Instant::now() > deadline {
            bail!("external changes not journaled within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ext_elapsed = t.elapsed();
    let ext_records = last_seq(&url)? - before;

    println!();
    println!(
        "{:<56} {:>9} {:>10} {:>10}",
        "journal burst", "records", "seconds", "records/s"
    );
    println!(
        "{:<56} {:>9} {:>10.2} {:>10.0}",
        format!("{clients} clients x {per_client} one-op reintegrate batches"),
        api_records,
        api_elapsed.as_secs_f64(),
        api_records as f64 / api_elapsed.as_secs_f64()
    );
    println!(
        "{:<56} {:>9} {:>10.2} {:>10.0}",
        format!("{n_ext} files created directly in the directory"),
        ext_records,
        ext_elapsed.as_secs_f64(),
        ext_records as f64 / ext_elapsed.as_secs_f64()
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn start_origin(root: &Path, token_file: &Path, extra: &[&str]) -> anyhow::Result<(Imz, String)> {
    let mut args = vec![
        "origin",
        "--root",
        root.to_str().context("utf8")?,
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token_file.to_str().context("utf8")?,
    ];
    args.extend_from_slice(extra);
    Imz::spawn(&args, imz_integration::process::ORIGIN_READY)
}

fn lookup(url: &str, token: &str, name: &str) -> anyhow::Result<(u64, u64)> {
    let v: serde_json::Value = reqwest::blocking::Client::new()
        .get(format!("{url}/v1/objects/1/lookup"))
        .query(&[("name", name)])
        .bearer_auth(token)
        .send()?
        .json()?;
    let id = v["attr"]["id"].as_u64().context("id")?;
    let version = v["attr"]["version"].as_u64().context("version")?;
    Ok((id, version))
}

fn last_seq(url: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = reqwest::blocking::get(format!("{url}/v1/health"))?.json()?;
    v["last_seq"].as_u64().context("last_seq")
}

/// Downloads `url` to /dev/null with curl; returns bytes per second.
fn curl_speed(url: &str, token: Option<&str>) -> anyhow::Result<f64> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().context("running curl")?;
    anyhow::ensure!(out.status.success(), "curl {url} failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let size: f64 = it.next().context("size")?.parse()?;
    let secs: f64 = it.next().context("time")?.parse()?;
    anyhow::ensure!(
        size as u64 == FILE_SIZE,
        "short download from {url}: {size}"
    );
    Ok(size / secs)
}

/// nginx run as our child on a loopback port, serving `root` with sendfile.
struct Nginx {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Nginx {
    fn start(base: &Path, root: &Path) -> anyhow::Result<Self> {
        let bin = find_nginx()?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let dir = base.join("nginx");
        std::fs::create_dir_all(dir.join("logs"))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr;\npid {pid};\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
                 client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
                 uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
                 server {{ listen {addr}; root {root}; location / {{ }} }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                d = dir.display(),
                root = root.display(),
            ),
        )?;
        let child = Command::new(bin)
            .args([
                "-p",
                dir.to_str().context("utf8")?,
                "-c",
                conf.to_str().context("utf8")?,
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not start listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, addr })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_nginx() -> anyhow::Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    eprintln!("nginx missing: installing the Debian package");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "nginx-light"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    anyhow::ensure!(ok, "could not install nginx");
    Ok(PathBuf::from("/usr/sbin/nginx"))
}
