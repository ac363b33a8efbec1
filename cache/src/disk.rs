//! Room on the filesystem that holds the cache.
//!
//! redb latches its first failed write, ENOSPC included: every later
//! transaction fails, reads too, until the database is opened again (a
//! gateway restart). So the capacity the cache fills must fit the disk; the
//! gateway lowers `--cache-size` at start to what the filesystem takes,
//! keeping [`RESERVE`] free for metadata and redb's own growth.
//!
//! The disk can still fill later, from other programs. Then, with less
//! than [`FLOOR`] left, changes that add data are refused (NOSPC) and
//! fetched data is served without being kept, until there is room again.
//! Filled to the last byte, a commit can still fail and latch redb:
//! [`crate::Cache::storage_failure`] says so, and the gateway restarts.

use std::path::Path;

/// Bytes kept free on the cache's filesystem.
pub const RESERVE: u64 = 64 << 20;

/// Below this many free bytes, nothing that adds data is stored.
pub const FLOOR: u64 = 32 << 20;

/// Whether the filesystem holding `dir` takes `bytes` more and still has
/// [`FLOOR`] left; yes if it cannot be asked.
pub fn takes(dir: &Path, bytes: u64) -> bool {
    available(dir).map_or(true, |a| a >= bytes.saturating_add(FLOOR))
}

/// Bytes available to this process on the filesystem holding `dir`.
pub fn available(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_directory_has_room_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(available(dir.path()).expect("statvfs") > 0);
        assert!(available(&dir.path().join("missing")).is_err());
        assert!(takes(dir.path(), 1));
        assert!(!takes(dir.path(), u64::MAX));
        assert!(takes(&dir.path().join("missing"), u64::MAX));
    }
}
