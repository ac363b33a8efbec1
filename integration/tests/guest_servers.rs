//! Web and FTP servers in a QEMU guest serving files from the guest's
//! kernel NFS mount of the gateway; the host is their client, through QEMU
//! port forwards on 127.0.0.1 (nothing leaves the machine).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::guest::{self, Ftp, Guest, GuestBuilder};

type Result<T = ()> = anyhow::Result<T>;

/// How long a change at the origin may take to show in a served page. The
/// gateway learns of it from the origin's journal at once; with
/// `actimeo=1` the guest's NFS client asks again within a second.
const CHANGE_DEADLINE: Duration = Duration::from_secs(15);

/// Runs the host side while the guest waits at step "serving"; any failure
/// comes back with the guest's output and console.
fn while_serving(mut g: Guest, host: impl FnOnce(&Guest) -> Result) -> Result {
    g.wait_step("serving")?;
    if let Err(e) = host(&g) {
        return Err(g.failure(&format!("{e:#}")));
    }
    g.resume("")?;
    g.finish()?.ok()?;
    Ok(())
}

fn http_client() -> Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// GET `url`: status and body.
fn get(client: &reqwest::blocking::Client, url: &str) -> Result<(u16, Vec<u8>)> {
    let resp = client.get(url).send()?;
    let status = resp.status().as_u16();
    Ok((status, resp.bytes()?.to_vec()))
}

/// Polls `url` until it answers `status` with `body` (any body if None);
/// returns how long that took.
fn poll_until(
    client: &reqwest::blocking::Client,
    url: &str,
    status: u16,
    body: Option<&[u8]>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = (0, Vec::new());
    while start.elapsed() < CHANGE_DEADLINE {
        // While a page is being replaced, the server may stat the old file
        // and read the new one (the client's attribute cache): a response
        // cut short is a transient state of the page, not an error.
        match get(client, url) {
            Ok(got) => last = got,
            Err(e) if format!("{e:#}").contains("end of file before message length") => {}
            Err(e) => return Err(e),
        }
        if last.0 == status && body.is_none_or(|b| last.1 == b) {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "{url}: not {status} with the new content within {CHANGE_DEADLINE:?}; last {} {:?}",
        last.0,
        String::from_utf8_lossy(&last.1[..last.1.len().min(200)])
    )
}

/// Replaces `path` the way a deployment does: write a temporary, rename.
fn replace(path: &Path, content: &[u8]) -> Result {
    let tmp = path.with_extension("tmp-imz");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Boots a guest whose busybox httpd serves `www/` of the mount (mounted
/// with `actimeo=1`, as the README recommends for servers), checks every
/// page against the origin, then runs `changes` with the base URL.
fn with_httpd(changes: impl FnOnce(&Path, &str) -> Result) -> Result {
    let mut fx = Fixture::new(|root| {
        std::fs::create_dir_all(root.join("www/sub"))?;
        std::fs::write(root.join("www/index.html"), "<h1>version 1</h1>\n")?;
        std::fs::write(root.join("www/same.html"), "AAAA\n")?;
        std::fs::write(root.join("www/sub/page.html"), "<p>sub page</p>\n")?;
        data::write_file(&root.join("www/big.bin"), 9, 2 * 1024 * 1024 + 1)?;
        Ok(())
    })?;
    let root = fx.root.clone();
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let g = GuestBuilder::new(&printed, &["actimeo=1"])?
        .script(include_str!("../guest/scripts/www.sh"))
        .forward(8080)
        .timeout(Duration::from_secs(180))
        .boot()?;
    while_serving(g, |g| {
        let base = format!("http://127.0.0.1:{}", g.host_port(8080));
        let client = http_client()?;
        // The origin's bytes, through httpd, NFS and the gateway.
        for page in ["index.html", "same.html", "sub/page.html", "big.bin"] {
            let (status, body) = get(&client, &format!("{base}/{page}"))?;
            anyhow::ensure!(status == 200, "{page}: HTTP {status}");
            anyhow::ensure!(
                body == std::fs::read(root.join("www").join(page))?,
                "{page}: served bytes differ from the origin's"
            );
        }
        let (status, _) = get(&client, &format!("{base}/new.html"))?;
        anyhow::ensure!(status == 404, "new.html before it exists: HTTP {status}");
        changes(&root, &base)
    })
}

#[test]
fn busybox_httpd_serves_the_mount_and_shows_origin_changes() -> Result {
    if guest::skip() {
        return Ok(());
    }
    with_httpd(|root, base| {
        let client = http_client()?;
        let v2 = b"<h1>version 2, longer than the first</h1>\n";
        std::fs::write(root.join("www/index.html"), v2)?;
        let edit = poll_until(&client, &format!("{base}/index.html"), 200, Some(v2))?;
        // Same size, new bytes: only the mtime tells.
        std::fs::write(root.join("www/same.html"), b"BBBB\n")?;
        let same = poll_until(&client, &format!("{base}/same.html"), 200, Some(b"BBBB\n"))?;
        // A page that was 404 a moment ago.
        std::fs::write(root.join("www/new.html"), b"<p>new</p>\n")?;
        let new = poll_until(
            &client,
            &format!("{base}/new.html"),
            200,
            Some(b"<p>new</p>\n"),
        )?;
        // A removed page.
        std::fs::remove_file(root.join("www/sub/page.html"))?;
        let gone = poll_until(&client, &format!("{base}/sub/page.html"), 404, None)?;
        eprintln!(
            "origin change visible through httpd after: edit {:.1}s, same-size edit {:.1}s, \
             new page {:.1}s, removed page {:.1}s",
            edit.as_secs_f64(),
            same.as_secs_f64(),
            new.as_secs_f64(),
            gone.as_secs_f64()
        );
        Ok(())
    })
}

#[test]
fn busybox_httpd_shows_a_page_replaced_by_rename_at_the_origin() -> Result {
    if guest::skip() {
        return Ok(());
    }
    with_httpd(|root, base| {
        let client = http_client()?;
        replace(&root.join("www/same.html"), b"BBBB\n")?;
        let took = poll_until(&client, &format!("{base}/same.html"), 200, Some(b"BBBB\n"))?;
        replace(&root.join("www/index.html"), b"<h1>v3</h1>\n")?;
        poll_until(
            &client,
            &format!("{base}/index.html"),
            200,
            Some(b"<h1>v3</h1>\n"),
        )?;
        eprintln!("replaced page visible after {:.1}s", took.as_secs_f64());
        Ok(())
    })
}

#[test]
fn pure_ftpd_serves_the_mount_to_anonymous_downloads() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        data::write_file(&root.join("pub/big.bin"), 11, 3 * 1024 * 1024 + 7)?;
        data::write_file(&root.join("pub/sub/small.txt"), 12, 100)?;
        data::write_file(&root.join("pub/empty"), 13, 0)?;
        Ok(())
    })?;
    let root = fx.root.clone();
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let mut b = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/ftp.sh"))
        .timeout(Duration::from_secs(180))
        .forward(21);
    for p in 30000..=30003 {
        b = b.forward(p);
    }
    let g = b.boot()?;
    while_serving(g, |g| {
        let passive: HashMap<u16, u16> = (30000..=30003).map(|p| (p, g.host_port(p))).collect();
        let mut ftp = Ftp::connect_anonymous(g.host_port(21), passive)?;
        let mut names = ftp.nlst("/pub")?;
        names.sort();
        let names: Vec<&str> = names
            .iter()
            .map(|n| n.rsplit('/').next().unwrap_or(n))
            .collect();
        anyhow::ensure!(names == ["big.bin", "empty", "sub"], "NLST /pub: {names:?}");
        for rel in ["pub/big.bin", "pub/sub/small.txt", "pub/empty"] {
            let want = std::fs::read(root.join(rel))?;
            anyhow::ensure!(
                ftp.size(&format!("/{rel}"))? == want.len() as u64,
                "SIZE /{rel}"
            );
            let got = ftp.retr(&format!("/{rel}"))?;
            anyhow::ensure!(
                got == want,
                "RETR /{rel}: {} bytes, differing from the origin's {}",
                got.len(),
                want.len()
            );
        }
        ftp.quit()
    })
}
