//! `imz serve DIR`, the README's run command, as a user runs it: on the
//! standard NFS port, mountable by the bare `HOST:/imz` (the portmapper
//! says where NFS and MOUNT are), writes landing in DIR, `imz status`
//! finding it unasked, and a SIGTERM that leaves nothing registered.
//!
//! These tests need ports 2049 and 111 of 127.0.0.1, so they run one at a
//! time (nextest group `standard-ports`) and fail if someone else holds
//! 2049. Clients: libnfs (`nfs-cat`, `nfs-cp` with URLs naming no port:
//! libnfs asks the portmapper) and `rpcinfo` (Debian `rpcbind`).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use imz_integration::bench::accepts;
use imz_integration::bench::ganesha::Rpcbind;
use imz_integration::gateway::{control_unaddressed, eventually};
use imz_integration::guest::{self, GuestBuilder};
use imz_integration::{Imz, libnfs};

type Result = anyhow::Result<()>;

const PORTMAPPER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 111);

/// `nfs://127.0.0.1/imz/PATH?version=3`: no ports, as a user would write.
fn bare_url(path: &str) -> String {
    format!("nfs://127.0.0.1/imz/{path}?version=3")
}

/// `rpcinfo -p 127.0.0.1`: the (program, port) pairs of NFS and MOUNT v3
/// over TCP.
fn registered() -> anyhow::Result<Vec<(u32, u16)>> {
    let out = std::process::Command::new("rpcinfo")
        .args(["-p", "127.0.0.1"])
        .output()
        .context("running rpcinfo (install Debian's rpcbind)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [prog, "3", "tcp", port, ..] => Some((prog.parse().ok()?, port.parse().ok()?)),
                _ => None,
            }
        })
        .filter(|(prog, _)| [100_003, 100_005].contains(prog))
        .collect())
}

/// Starts `imz serve` over `dir` (holding `hello.txt`), checks it took
/// 2049; returns it and its printed Linux mount command.
fn start_serve(dir: &Path, runtime: &Path) -> anyhow::Result<(Imz, String)> {
    std::fs::write(dir.join("hello.txt"), "hello from the origin\n")?;
    TcpListener::bind("127.0.0.1:2049")
        .context("port 2049 is taken: these tests need the standard NFS port")?;
    let env = [(
        "IMZ_RUNTIME_DIR".to_owned(),
        runtime.to_str().context("runtime path")?.to_owned(),
    )];
    let dir_arg = dir.to_str().context("dir path")?;
    let (mut serve, addr) =
        Imz::spawn_full(&[], &env, &["serve", dir_arg], "imz gateway listening on ")?;
    anyhow::ensure!(
        addr.trim() == "127.0.0.1:2049",
        "serve listens on {addr}, not the standard port"
    );
    let mount = serve.wait_for_line("mount (Linux): ", Duration::from_secs(5))?;
    assert!(mount.contains("port=2049,mountport=2049"), "{mount}");
    let short = serve.wait_for_line("mount (Linux, short): ", Duration::from_secs(5))?;
    assert_eq!(short, "mount -t nfs -o nolock 127.0.0.1:/imz /mnt");
    Ok((serve, mount))
}

/// Waits until `dir/name` holds `want`.
fn lands(dir: &Path, name: &str, want: &[u8]) -> Result {
    let landed = eventually(Duration::from_secs(10), || {
        std::fs::read(dir.join(name)).ok().filter(|b| b == want)
    });
    anyhow::ensure!(landed.is_some(), "{name} did not reach {}", dir.display());
    Ok(())
}

/// Starts `imz serve`, mounts by the bare URL, writes through it, and
/// stops it with SIGTERM.
fn serve_and_mount_by_bare_url(dir: &Path, runtime: &Path) -> Result {
    let rpcbind_ran = accepts(PORTMAPPER);
    let (mut serve, _) = start_serve(dir, runtime)?;
    assert_eq!(
        registered()?,
        vec![(100_003, 2049), (100_005, 2049)],
        "the portmapper does not know NFS and MOUNT at 2049"
    );
    // rpcbind v4/v3 GETADDR, then a NULL call where it points, over TCP
    // (mount.nfs and the kernel ask so); and the portmapper over UDP.
    for (transport, program) in [("tcp", "100005"), ("tcp", "100003"), ("udp", "100000")] {
        let out = std::process::Command::new("rpcinfo")
            .args([
                "-T",
                transport,
                "127.0.0.1",
                program,
                if program == "100000" { "2" } else { "3" },
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success() && text.contains("ready and waiting"),
            "rpcinfo -T {transport} {program}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got = libnfs::run("nfs-cat", &[&bare_url("hello.txt")])?;
    assert_eq!(got, b"hello from the origin\n");

    let local = runtime.with_file_name("upload.txt");
    std::fs::write(&local, "written through the bare mount\n")?;
    let local_arg = local.to_str().context("upload path")?;
    libnfs::run("nfs-cp", &[local_arg, &bare_url("upload.txt")])?;
    let landed = eventually(Duration::from_secs(10), || {
        std::fs::read(dir.join("upload.txt"))
            .ok()
            .filter(|b| b == b"written through the bare mount\n")
    });
    anyhow::ensure!(
        landed.is_some(),
        "the write did not reach {}",
        dir.display()
    );

    let out = control_unaddressed(runtime, &["status", "--json"])?;
    anyhow::ensure!(
        out.status.success(),
        "imz status found no gateway: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let way = if rpcbind_ran {
        "registered with the running rpcbind"
    } else {
        "answering portmapper queries on port 111"
    };
    assert_eq!(status["portmapper"], way);

    let status = serve.signal_and_wait(15, Duration::from_secs(20))?;
    assert!(
        status.success(),
        "imz serve exited with {status} on SIGTERM"
    );
    Ok(())
}

/// No rpcbind on the machine: the gateway answers port 111 itself, and
/// lets go of it when it stops.
#[test]
fn standard_port_serve_answers_the_portmapper_itself() -> Result {
    if accepts(PORTMAPPER) {
        // Someone else's rpcbind (the other test starts and stops its own).
        eprintln!(
            "skipped: an rpcbind runs on this machine, so the gateway registers with it instead (the other test)"
        );
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("served");
    std::fs::create_dir(&dir)?;
    serve_and_mount_by_bare_url(&dir, &tmp.path().join("run"))?;
    assert!(
        !accepts(PORTMAPPER),
        "port 111 still answers after the gateway stopped"
    );
    Ok(())
}

/// An rpcbind runs (as on any machine with the NFS client tools): the
/// gateway registers with it and unregisters on SIGTERM.
#[test]
fn standard_port_serve_registers_with_a_running_rpcbind() -> Result {
    let rpcbind = Rpcbind::ensure().context("starting rpcbind (install Debian's rpcbind)")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("served");
    std::fs::create_dir(&dir)?;
    // A gateway killed leaves its registration behind; the next one
    // replaces it.
    let (mut killed, _) = start_serve(&dir, &tmp.path().join("run"))?;
    killed.kill9();
    assert_eq!(registered()?, vec![(100_003, 2049), (100_005, 2049)]);
    serve_and_mount_by_bare_url(&dir, &tmp.path().join("run"))?;
    assert_eq!(registered()?, vec![], "still registered after SIGTERM");
    drop(rpcbind);
    Ok(())
}

/// The Linux kernel client through `mount.nfs` (nfs-utils, what `mount -t
/// nfs` runs), as a real machine mounts with the printed short command
/// `mount -t nfs -o nolock HOST:/imz /mnt`: no version, no ports. mount.nfs tries NFSv4 (refused), then asks the portmapper
/// (whichever of the two ways the gateway uses here) for NFS and MOUNT v3.
/// The guest reaches the host over TCP only, so mount.nfs's UDP query for
/// MOUNT times out first (about 3 s) before its TCP one answers.
#[test]
fn standard_port_kernel_client_mounts_without_naming_ports() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("served");
    std::fs::create_dir(&dir)?;
    let (mut serve, printed) = start_serve(&dir, &tmp.path().join("run"))?;
    let run = GuestBuilder::new(&printed, &[])?
        .portmapper()
        .script(
            r#"mkdir -p /mnt2
t=$(now)
# -n: the guest has no /etc/mtab. nolock: no statd in the guest.
mount.nfs imz-host:/imz /mnt2 -n -o nolock > /tmp/mount.out 2>&1
kv bare_rc "$?"
kv bare_secs "$(since "$t")"
kv bare_mount "$(grep ' /mnt2 ' /proc/mounts)"
kv bare_read "$(cat /mnt2/hello.txt)"
echo "written through mount.nfs" > /mnt2/bare.txt && sync
kv mount_out "$(tr '\n' ' ' < /tmp/mount.out)"
"#,
        )
        .timeout(Duration::from_secs(120))
        .boot()?
        .finish()?
        .ok()?;
    let report = run.report();
    anyhow::ensure!(run.get("bare_rc")? == "0", "mount.nfs failed\n{report}");
    anyhow::ensure!(
        run.get("bare_read")? == "hello from the origin",
        "read through the bare mount\n{report}"
    );
    lands(&dir, "bare.txt", b"written through mount.nfs\n")?;
    eprintln!(
        "mount.nfs took {} s: {}",
        run.get("bare_secs")?,
        run.get("bare_mount")?
    );
    let status = serve.signal_and_wait(15, Duration::from_secs(20))?;
    assert!(
        status.success(),
        "imz serve exited with {status} on SIGTERM"
    );
    Ok(())
}
