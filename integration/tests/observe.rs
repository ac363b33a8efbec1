//! Watching and controlling a running gateway: `imz status`, Prometheus
//! metrics, `imz sync`, and a SIGTERM that loses nothing.

use std::time::Duration;

use imz_integration::Fixture;
use imz_integration::GatewayProc;
use imz_integration::gateway::{control_unaddressed, eventually, registry_dir};
use imz_integration::nfs::{Nfs, Stable};

type Result = anyhow::Result<()>;

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("imz_{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_follow_what_happens() -> Result {
    let mut fx = Fixture::with_cache_size(
        "1GiB",
        &[
            "--reintegrate-delay",
            "100ms",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        |root| {
            std::fs::write(root.join("shared.txt"), "v1")?;
            Ok(())
        },
    )?;
    let metrics = fx
        .gateway
        .proc
        .wait_for_line("metrics: http://", Duration::from_secs(10))?
        .trim_end_matches("/metrics")
        .to_owned();
    let s = fx.gateway.status()?;
    assert_eq!(s["connected"], true);
    assert_eq!(num(&s, "log_records"), 0);
    let text = scrape(&metrics)?;
    assert_eq!(metric(&text, "connected"), Some(1.0));
    assert_eq!(metric(&text, "storage_failed"), Some(0.0));

    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let shared = nfs.lookup_path("shared.txt").await?;
    nfs.read_all(&shared).await?;
    fx.origin.proc.kill9();
    nfs.put_file("offline.txt", &[7u8; 50_000]).await?;
    nfs.write(&shared, 0, b"ours", Stable::FILE_SYNC).await?;
    // Disconnected, with work waiting: status and metrics say so.
    let seen = eventually(Duration::from_secs(10), || {
        let s = fx.gateway.status().ok()?;
        (s["connected"] == false && num(&s, "log_records") >= 2 && num(&s, "log_bytes") >= 50_000)
            .then_some(s)
    });
    let (s, _) = seen.ok_or_else(|| {
        anyhow::anyhow!("status never showed the disconnection and the waiting log")
    })?;
    assert!(
        s["disconnect_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    let text = scrape(&metrics)?;
    assert_eq!(metric(&text, "connected"), Some(0.0));
    assert!(
        metric(&text, "log_records").is_some_and(|n| n >= 2.0),
        "{text}"
    );
    let human = fx.gateway.ctl(&["status"])?;
    assert!(human.contains("DISCONNECTED"), "{human}");
    // sync cannot finish without the origin, and says why.
    let err = fx
        .gateway
        .ctl(&["sync", "--timeout", "2s"])
        .expect_err("sync while disconnected");
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert_eq!(
        err.to_string().matches("unreachable").count(),
        1,
        "the reason, once: {err}"
    );

    // Meanwhile another program changes the file at the origin's side.
    std::fs::write(fx.origin_path("shared.txt"), "theirs")?;
    fx.origin.restart()?;
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    let s = fx.gateway.status()?;
    assert_eq!(s["connected"], true);
    assert_eq!(num(&s, "log_records"), 0);
    assert!(
        num(&s, "conflicts") >= 1,
        "the update/update conflict is not counted: {s}"
    );
    assert!(num(&s, "reintegrated_ops") >= 2);
    let text = scrape(&metrics)?;
    assert!(
        metric(&text, "conflicts").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        metric(&text, "reintegrated_ops_total").is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert!(
        fx.gateway
            .ctl(&["conflicts", "list"])?
            .contains("update/update")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_loses_nothing() -> Result {
    let mut fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "100ms"], |_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    fx.origin.proc.kill9();
    let mut files = Vec::new();
    for i in 0..20u64 {
        let body = imz_integration::data::bytes(i, 10_000 + i as usize * 1000);
        nfs.put_file(&format!("f{i}"), &body).await?;
        files.push((format!("f{i}"), body));
    }
    drop(nfs);
    // SIGTERM: exit 0 (restart_graceful checks the status), then a new
    // gateway still has every change and sends it once the origin is back.
    fx.gateway.restart_graceful()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for (name, body) in &files {
        assert!(
            nfs.read_path(name).await? == *body,
            "{name} lost by a graceful stop"
        );
    }
    fx.origin.restart()?;
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    for (name, body) in &files {
        assert_eq!(std::fs::read(fx.origin_path(name))?, *body);
    }
    Ok(())
}

/// `imz sync` ships everything now, even under a long aging window and a
/// backlog bigger than one batch (a thousand operations): every batch, not
/// only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_ships_a_backlog_of_many_batches_at_once() -> Result {
    let fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "30m"], |_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    nfs.mkdir(&root, "many").await?;
    for i in 0..700u64 {
        nfs.put_file(&format!("many/f{i}"), &i.to_le_bytes())
            .await?;
    }
    // 1,401 records: the directory, and a create and a store per file.
    let s = fx.gateway.status()?;
    assert!(num(&s, "log_records") > 1000, "{s}");
    fx.gateway.ctl(&["sync", "--timeout", "60s"])?;
    assert_eq!(num(&fx.gateway.status()?, "log_records"), 0);
    for i in 0..700u64 {
        assert_eq!(
            std::fs::read(fx.origin_path(&format!("many/f{i}")))?,
            i.to_le_bytes()
        );
    }
    Ok(())
}

/// `imz status` (and every control command) without `--cache` or
/// `--control` talks to the one running gateway; with several running it
/// names them instead of guessing; a killed gateway is forgotten.
#[test]
fn control_commands_find_the_running_gateway_unasked() -> Result {
    let mut fx = Fixture::new(|root| {
        std::fs::write(root.join("a.txt"), "a")?;
        Ok(())
    })?;
    let registry = registry_dir(&fx.gateway.cache_dir);
    let ask = |args: &[&str]| control_unaddressed(&registry, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    let out = ask(&["status", "--json"])?;
    anyhow::ensure!(out.status.success(), "status: {}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s["origin"], fx.origin.url.as_str());
    assert_eq!(s["nfs"], format!("127.0.0.1:{}", fx.port()).as_str());
    assert_eq!(s["portmapper"], "", "off the standard port, no portmapper");
    let cache = std::path::absolute(&fx.gateway.cache_dir)?;
    assert_eq!(s["cache_dir"], cache.to_str().unwrap_or_default());
    let out = ask(&["pin", "a.txt"])?;
    anyhow::ensure!(out.status.success(), "pin: {}", text(&out.stderr));
    assert_eq!(num(&fx.gateway.status()?, "pinned_bytes"), 1);

    let mut second = GatewayProc::start(
        &fx.origin.url,
        &fx.origin.token_file,
        &fx.dir.path().join("cache-2"),
        "1GiB",
        &[],
    )?;
    let out = ask(&["status"])?;
    let err = text(&out.stderr);
    assert!(!out.status.success(), "two gateways, yet status chose one");
    assert!(err.contains("2 gateways are running"), "{err}");
    for g in [&fx.gateway, &second] {
        let socket = g.cache_dir.join("control.sock");
        assert!(
            err.contains(&format!("--control {}", socket.display())),
            "{err}"
        );
    }

    let status = second.proc.signal_and_wait(15, Duration::from_secs(20))?;
    assert!(status.success(), "second gateway exited with {status}");
    let out = ask(&["status", "--json"])?;
    anyhow::ensure!(out.status.success(), "status: {}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s["nfs"], format!("127.0.0.1:{}", fx.port()).as_str());
    assert_eq!(num(&s, "pinned_bytes"), 1, "answered by the first gateway");

    fx.gateway.proc.kill9();
    let out = ask(&["status"])?;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no running gateway found"), "{err}");
    assert_eq!(
        std::fs::read_dir(&registry)?.count(),
        0,
        "the killed gateway's entry was not removed"
    );
    Ok(())
}

/// A gateway's stdout may close under it (`imz gateway ... | head -1`, a
/// supervisor that stops reading): it goes on serving. It used to die at
/// its next line of output (`println!` panics on a closed pipe), taking
/// a replica's fill with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_stdout_is_closed_keeps_serving() -> Result {
    let fx = Fixture::new(|root| Ok(std::fs::write(root.join("a.txt"), b"still here")?))?;
    let cache = fx.dir.path().join("closed-stdout");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = std::process::Command::new(imz_integration::imz_bin())
        .args(["gateway", "--origin", &fx.origin.url, "--token-file"])
        .arg(&fx.origin.token_file)
        .arg("--cache")
        .arg(&cache)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Closed before the gateway has printed anything.
    drop(child.stdout.take());
    let answered = eventually(Duration::from_secs(10), || {
        imz_integration::gateway::control(
            &imz_integration::imz_bin(),
            &cache,
            &["status", "--json"],
        )
        .ok()
    });
    let served = match Nfs::mount(port, "/imz").await {
        Ok(mut nfs) => nfs.read_path("a.txt").await.ok(),
        Err(_) => None,
    };
    // It stops as asked, exit 0: a gateway that died of its closed stdout
    // exits 101 (a panic), whenever the panic came.
    let stopped = send_sigterm(child.id()).and_then(|()| Ok(child.wait()?));
    let _ = child.kill();
    assert!(answered.is_some(), "the gateway never answered imz status");
    assert_eq!(served.as_deref(), Some(&b"still here"[..]));
    let status = stopped?;
    assert!(
        status.success(),
        "the gateway with a closed stdout ended with {status}, not 0 on SIGTERM"
    );
    Ok(())
}

fn send_sigterm(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
    Ok(())
}
