//! Finding the running gateways, so that `imz status`, `imz pin` and the
//! other control commands reach a gateway without being told its cache
//! directory.
//!
//! Each gateway links its control socket into a per-user runtime directory:
//! `$IMZ_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/imz`, else `/run/imz` for
//! root, else `$TMPDIR/imz-UID`. An entry is a symlink
//! `gateway-PID-N.sock` to the control socket. It goes when the gateway
//! stops; one left by a gateway that died is removed by the next lookup,
//! which finds nothing answering behind it.
//!
//! The directory is created 0700, and used only if it belongs to the user
//! and nobody else may write to it: a link planted by another user would
//! point control commands, `imz conflicts resolve` among them, at a socket
//! of their choosing.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix and suffix of an entry's name.
const ENTRY_PREFIX: &str = "gateway-";
const ENTRY_SUFFIX: &str = ".sock";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    // `cause`, not `source`: the message holds it, and a `source` would be
    // printed again by `anyhow`'s chain.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{} is not safe to use: {why}", dir.display())]
    Unsafe { dir: PathBuf, why: String },
    #[error("no running gateway found (gateways register in {} as they start)", dir.display())]
    NoneRunning { dir: PathBuf },
    #[error("{} gateways are running; pick one with --cache DIR or --control SOCKET:{}", sockets.len(), list(sockets))]
    Several { sockets: Vec<PathBuf> },
}

fn list(sockets: &[PathBuf]) -> String {
    sockets
        .iter()
        .map(|s| format!("\n  --control {}", s.display()))
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |cause| RegistryError::Io {
        path: path.to_owned(),
        cause,
    }
}

/// Where gateways of this user register.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMZ_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("imz");
    }
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        PathBuf::from("/run/imz")
    } else {
        std::env::temp_dir().join(format!("imz-{uid}"))
    }
}

/// Whether the runtime directory `dir` exists (created first if `create`);
/// checked to be ours alone.
fn checked_dir(dir: &Path, create: bool) -> Result<bool, RegistryError> {
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(dir)(e)),
        }
    }
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(false),
        Err(e) => return Err(io(dir)(e)),
    };
    let unsafe_because = |why: &str| RegistryError::Unsafe {
        dir: dir.to_owned(),
        why: why.to_owned(),
    };
    if !meta.is_dir() {
        return Err(unsafe_because("not a directory"));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(unsafe_because("it belongs to another user"));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(unsafe_because("others may write to it"));
    }
    Ok(true)
}

/// A gateway's entry; removed on drop.
#[derive(Debug)]
pub struct Registration {
    link: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
    }
}

/// Registers the gateway whose control socket is `socket`.
pub fn register(socket: &Path) -> Result<Registration, RegistryError> {
    register_in(&runtime_dir(), socket)
}

fn register_in(dir: &Path, socket: &Path) -> Result<Registration, RegistryError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let target = std::path::absolute(socket).map_err(io(socket))?;
    checked_dir(dir, true)?;
    let name = format!(
        "{ENTRY_PREFIX}{}-{}{ENTRY_SUFFIX}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let link = dir.join(name);
    // Entries to this socket are of gateways killed on this cache: the
    // socket is ours now (nobody answered on it when we bound it), and
    // they would make one gateway look like several. A pid reused after
    // a crash may also have left this very name behind.
    for (entry, points_to) in entries(dir)? {
        if points_to == target || entry == link {
            let _ = std::fs::remove_file(&entry);
        }
    }
    std::os::unix::fs::symlink(&target, &link).map_err(io(&link))?;
    Ok(Registration { link })
}

/// The control sockets of the gateways running now. Entries of gateways
/// that died are removed on the way.
fn running_in(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    if !checked_dir(dir, false)? {
        return Ok(Vec::new());
    }
    let mut live = Vec::new();
    for (link, target) in entries(dir)? {
        match UnixStream::connect(&link) {
            Ok(_) => live.push(target),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!(entry = %link.display(), "removing the entry of a gateway that is gone");
                let _ = std::fs::remove_file(&link);
            }
            // Permission or other trouble: not ours to judge, not listed.
            Err(_) => {}
        }
    }
    live.sort();
    live.dedup();
    Ok(live)
}

/// The registry's entries and where each points.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, RegistryError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(ENTRY_PREFIX) && name.ends_with(ENTRY_SUFFIX)) {
            continue;
        }
        let link = entry.path();
        if let Ok(target) = std::fs::read_link(&link) {
            out.push((link, target));
        }
    }
    Ok(out)
}

/// The control socket of the one running gateway.
pub fn the_running_gateway() -> Result<PathBuf, RegistryError> {
    the_one_in(&runtime_dir())
}

fn the_one_in(dir: &Path) -> Result<PathBuf, RegistryError> {
    let mut sockets = running_in(dir)?;
    match sockets.len() {
        0 => Err(RegistryError::NoneRunning {
            dir: dir.to_owned(),
        }),
        1 => Ok(sockets.remove(0)),
        _ => Err(RegistryError::Several { sockets }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_gateways_are_found_and_dead_ones_pruned() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let runtime = tmp.path().join("run");
        assert!(matches!(
            the_one_in(&runtime),
            Err(RegistryError::NoneRunning { .. })
        ));

        let a = tmp.path().join("a.sock");
        let b = tmp.path().join("b.sock");
        let _serving_a = std::os::unix::net::UnixListener::bind(&a)?;
        let serving_b = std::os::unix::net::UnixListener::bind(&b)?;
        let registered_a = register_in(&runtime, &a)?;
        let mode = std::fs::metadata(&runtime)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(the_one_in(&runtime)?, a);

        let registered_b = register_in(&runtime, &b)?;
        match the_one_in(&runtime) {
            Err(RegistryError::Several { sockets }) => {
                assert_eq!(sockets, vec![a.clone(), b.clone()])
            }
            other => anyhow::bail!("expected two gateways, got {other:?}"),
        }

        // b dies without unregistering: its entry is pruned by the lookup.
        drop(serving_b);
        std::fs::remove_file(&b)?;
        std::mem::forget(registered_b);
        assert_eq!(the_one_in(&runtime)?, a);
        assert_eq!(std::fs::read_dir(&runtime)?.count(), 1);

        drop(registered_a);
        assert_eq!(std::fs::read_dir(&runtime)?.count(), 0);
        Ok(())
    }

    #[test]
    fn a_gateway_restarted_on_its_cache_replaces_the_entry_of_the_one_killed() -> anyhow::Result<()>
    {
        let tmp = tempfile::tempdir()?;
        let runtime = tmp.path().join("run");
        let socket = tmp.path().join("control.sock");
        let killed = register_in(&runtime, &socket)?;
        std::mem::forget(killed);
        // The restarted gateway binds the same socket path.
        let _serving = std::os::unix::net::UnixListener::bind(&socket)?;
        let _registered = register_in(&runtime, &socket)?;
        assert_eq!(std::fs::read_dir(&runtime)?.count(), 1);
        assert_eq!(the_one_in(&runtime)?, socket);
        Ok(())
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let runtime = tmp.path().join("run");
        std::fs::create_dir(&runtime)?;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o777))?;
        let socket = tmp.path().join("s.sock");
        assert!(matches!(
            register_in(&runtime, &socket),
            Err(RegistryError::Unsafe { .. })
        ));
        assert!(matches!(
            running_in(&runtime),
            Err(RegistryError::Unsafe { .. })
        ));
        Ok(())
    }
}
