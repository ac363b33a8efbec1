//! Restarting in place once the cache's storage (or, for `imz origin` and
//! `imz serve`, the origin's metadata store) has failed.
//!
//! redb stops at the first write that fails, a full disk included: from
//! then on every transaction fails, reads too, until the database is opened
//! again (see [`imz_cache::Cache::storage_failure`],
//! [`imz_origin::store::Store::failure`]). Reopening it inside a
//! running process would mean rebuilding every piece that holds it; a
//! restart already does exactly that, and is what the crash tests prove
//! loses nothing. So the process restarts itself, without needing a
//! supervisor: it waits until the disk has room for a restart's recovery,
//! then executes its own program again in the same process (same pid, same
//! arguments), listening on the same addresses even where the system chose
//! the port. Clients see a pause of a second or so; the file handles they
//! hold stay valid, and what they were told is stable, or written
//! unstable, is recovered as after `kill -9`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Carries the addresses a process listened on to the program it restarts
/// as: `role=address` pairs separated by commas.
pub const ADDRS_ENV: &str = "IMZ_RESTART_ADDRS";
/// When this process last restarted itself, in seconds since the epoch.
const RESTARTED_AT_ENV: &str = "IMZ_RESTARTED_AT";
/// Restarts come at most this often: a disk that fails every write must
/// not turn the process into a restart loop.
const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(10);
/// How often the disk is looked at while waiting for room.
const ROOM_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often the wait for room is reported.
const ROOM_WARNING_EVERY: Duration = Duration::from_secs(30);

/// Whether this process restarted itself (after a storage failure).
pub fn restarted() -> bool {
    std::env::var_os(ADDRS_ENV).is_some()
}

/// The address to listen on for `role`: `configured`, unless its port is
/// left to the system (0 or none given) and the process this one
/// restarted from listened on `role` (then that address, so that clients
/// find it again).
pub fn listen_addr(role: &str, configured: Option<SocketAddr>) -> Option<SocketAddr> {
    let previous = std::env::var(ADDRS_ENV)
        .ok()
        .and_then(|value| addr_of(&value, role));
    choose(configured, previous)
}

fn choose(configured: Option<SocketAddr>, previous: Option<SocketAddr>) -> Option<SocketAddr> {
    if configured.is_some_and(|a| a.port() != 0) {
        return configured;
    }
    previous.or(configured)
}

/// The address of `role` in a value of [`ADDRS_ENV`].
fn addr_of(value: &str, role: &str) -> Option<SocketAddr> {
    value.split(',').find_map(|pair| {
        let (r, addr) = pair.split_once('=')?;
        (r == role).then(|| addr.parse().ok()).flatten()
    })
}

/// Room a restart needs: `bytes` free on the filesystem holding `dir`.
#[derive(Debug, Clone)]
pub struct Room {
    pub dir: PathBuf,
    pub bytes: u64,
}

/// Bytes free the origin's state directory needs for it to restart (its
/// metadata store's recovery writes little).
const ORIGIN_ROOM: u64 = 16 << 20;

impl Room {
    /// What `origin` needs to restart: room beside its metadata store.
    pub fn for_origin(origin: &imz_origin::RunningOrigin) -> Self {
        Self {
            dir: origin.state_dir(),
            bytes: ORIGIN_ROOM,
        }
    }
}

/// Restarts this process in place: waits until 10 s have passed since its
/// last restart, if any, and for every `room`, then runs this program
/// again, telling it the addresses `listening`. Returns only if that could
/// not be done.
pub async fn restart_in_place(rooms: &[Room], listening: &[(&str, SocketAddr)]) -> std::io::Error {
    pace().await;
    for room in rooms {
        wait_for_room(room).await;
    }
    exec_self(listening)
}

/// Waits until the filesystem holding `room.dir` has `room.bytes` free.
async fn wait_for_room(room: &Room) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match imz_cache::disk::available(&room.dir) {
            Ok(available) if available >= room.bytes => return,
            Err(_) => return, // cannot tell: let the restart try
            Ok(available) => {
                if last_warning.is_none_or(|t| t.elapsed() >= ROOM_WARNING_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::error!(
                        "waiting for the disk holding {} to have {} free (it has {}) before restarting",
                        room.dir.display(),
                        bytesize::ByteSize(room.bytes).display().iec(),
                        bytesize::ByteSize(available).display().iec(),
                    );
                }
            }
        }
        tokio::time::sleep(ROOM_CHECK_EVERY).await;
    }
}

/// Waits until [`MIN_RESTART_INTERVAL`] has passed since this process
/// last restarted itself, if it did.
async fn pace() {
    let Some(at) = std::env::var(RESTARTED_AT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let since = unix_now().saturating_sub(at);
    if let Some(wait) = MIN_RESTART_INTERVAL.checked_sub(Duration::from_secs(since)) {
        tracing::warn!(
            "the last restart was {since} s ago; waiting {} s before the next",
            wait.as_secs()
        );
        tokio::time::sleep(wait).await;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Replaces this process with a fresh run of its own program and
/// arguments, telling it the addresses `listening` (role, address). Returns
/// only if that could not be done.
fn exec_self(listening: &[(&str, SocketAddr)]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let addrs = listening
        .iter()
        .map(|(role, addr)| format!("{role}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    // /proc/self/exe is this very program even if its file was replaced
    // since it started.
    let program = if Path::new("/proc/self/exe").exists() {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => return e,
        }
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(program);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command
        .args(args)
        .env(ADDRS_ENV, addrs)
        .env(RESTARTED_AT_ENV, unix_now().to_string())
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ports_left_to_the_system_are_taken_from_before_the_restart() {
        let addr = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        let before = addr("127.0.0.1:41613");
        assert_eq!(
            choose(addr("127.0.0.1:2049"), before),
            addr("127.0.0.1:2049")
        );
        assert_eq!(choose(addr("127.0.0.1:0"), before), before);
        assert_eq!(choose(None, before), before);
        assert_eq!(choose(addr("127.0.0.1:0"), None), addr("127.0.0.1:0"));
        assert_eq!(choose(None, None), None);
    }

    #[test]
    fn addresses_are_found_by_role() {
        let value = "nfs=127.0.0.1:41613,metrics=[::1]:9100";
        assert_eq!(addr_of(value, "nfs"), "127.0.0.1:41613".parse().ok());
        assert_eq!(addr_of(value, "metrics"), "[::1]:9100".parse().ok());
        assert_eq!(addr_of(value, "origin"), None);
        assert_eq!(addr_of("nfs=garbage", "nfs"), None);
    }
}
