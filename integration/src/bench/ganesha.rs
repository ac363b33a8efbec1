//! nfs-ganesha (Debian `nfs-ganesha` + `nfs-ganesha-vfs`) as a peer: a
//! child process with a generated config exporting a local directory as
//! `/imz` over NFSv3 on loopback, so the same libnfs URL works for it and
//! for the gateway. It needs a portmapper: [`Rpcbind`] starts Debian's
//! `rpcbind` unless one already answers on port 111.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::{ChildGuard, accepts, free_port, wait_accepting};

/// The portmapper ganesha registers with; stopped on drop if we started it.
pub struct Rpcbind {
    child: Option<ChildGuard>,
}

impl Rpcbind {
    pub fn ensure() -> anyhow::Result<Self> {
        let addr: SocketAddr = ([127, 0, 0, 1], 111).into();
        if accepts(addr) {
            return Ok(Self { child: None });
        }
        // `-h 127.0.0.1` aborts (double free); `-h 127.0.0.2` works and keeps
        // its UDP sockets on loopback. `-f`: stay in the foreground, our child.
        let mut child = ChildGuard::spawn(
            "rpcbind",
            Command::new("rpcbind")
                .args(["-f", "-h", "127.0.0.2"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_accepting(addr, Duration::from_secs(10), || child.is_running())
            .context("rpcbind did not start")?;
        Ok(Self { child: Some(child) })
    }

    pub fn started_by_us(&self) -> bool {
        self.child.is_some()
    }
}

/// A running `ganesha.nfsd` exporting one directory as `/imz`.
pub struct Ganesha {
    child: ChildGuard,
    /// NFS and MOUNT port (libnfs URL: `nfsport=`, `mountport=`).
    pub nfs_port: u16,
    pub mount_port: u16,
    pub log: PathBuf,
}

impl Ganesha {
    /// Starts ganesha exporting `export` read-only as `/imz`; its config,
    /// log and pid file go in `work`.
    pub fn start(export: &Path, work: &Path) -> anyhow::Result<Self> {
        Self::start_with(export, work, false)
    }

    /// Like [`start`](Self::start), exported read-write (for write
    /// benchmarks: WRITE UNSTABLE + COMMIT reach the local disk through
    /// the VFS FSAL, COMMIT being an fsync).
    pub fn start_rw(export: &Path, work: &Path) -> anyhow::Result<Self> {
        Self::start_with(export, work, true)
    }

    fn start_with(export: &Path, work: &Path, writable: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(work)?;
        let nfs_port = free_port()?;
        let mut mount_port = free_port()?;
        while mount_port == nfs_port {
            mount_port = free_port()?;
        }
        let conf = work.join("ganesha.conf");
        let log = work.join("ganesha.log");
        let pid_file = work.join("ganesha.pid");
        let export = export
            .canonicalize()
            .with_context(|| format!("resolving {}", export.display()))?;
        std::fs::write(&conf, config(&export, nfs_port, mount_port, writable))?;
        let _ = std::fs::remove_file(&log);
        let mut child = ChildGuard::spawn(
            "ganesha.nfsd",
            Command::new("ganesha.nfsd")
                .arg("-F")
                .arg("-L")
                .arg(&log)
                .arg("-f")
                .arg(&conf)
                .arg("-p")
                .arg(&pid_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let addr: SocketAddr = ([127, 0, 0, 1], nfs_port).into();
        let mnt: SocketAddr = ([127, 0, 0, 1], mount_port).into();
        let started = wait_accepting(addr, Duration::from_secs(30), || child.is_running())
            .and_then(|()| wait_accepting(mnt, Duration::from_secs(10), || child.is_running()));
        if let Err(e) = started {
            let tail = std::fs::read_to_string(&log)
                .map(|l| {
                    let lines: Vec<&str> = l.lines().collect();
                    lines[lines.len().saturating_sub(15)..].join("\n")
                })
                .unwrap_or_default();
            return Err(e.context(format!("nfs-ganesha did not start; log tail:\n{tail}")));
        }
        Ok(Self {
            child,
            nfs_port,
            mount_port,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `nfs://127.0.0.1/imz/PATH?version=3&nfsport=P&mountport=M`
    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1/imz/{}?version=3&nfsport={}&mountport={}",
            path.trim_start_matches('/'),
            self.nfs_port,
            self.mount_port
        )
    }

    pub fn stop(mut self) {
        self.child.stop(Duration::from_secs(10));
    }
}

/// Loopback only, NFSv3 over TCP only, read-only unless `writable`, no
/// NLM/RQUOTA, no grace period, and the pseudo path (`/imz`) as the MOUNT
/// path.
fn config(export: &Path, nfs_port: u16, mount_port: u16, writable: bool) -> String {
    let access = if writable { "RW" } else { "RO" };
    format!(
        r#"NFS_CORE_PARAM {{
    Protocols = 3;
    Bind_addr = 127.0.0.1;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    mount_path_pseudo = true;
}}
NFSV4 {{
    Graceless = true;
}}
EXPORT {{
    Export_Id = 77;
    Path = "{path}";
    Pseudo = /imz;
    Access_Type = {access};
    Squash = No_Root_Squash;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    FSAL {{
        Name = VFS;
    }}
}}
LOG {{
    Default_Log_Level = WARN;
}}
"#,
        path = export.display()
    )
}
