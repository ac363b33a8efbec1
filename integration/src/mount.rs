//! Filesystems mounted for one test (needs root): a small disk to fill, or
//! a filesystem of its own beside or inside a tree.

use std::path::{Path, PathBuf};

/// A tmpfs mounted for one test, unmounted when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `path` (created if missing). tmpfs
    /// takes memory only as it fills.
    pub fn mount(path: &Path, bytes: u64) -> anyhow::Result<Self> {
        Self::mount_with(path, bytes, "")
    }

    /// [`mount`](Self::mount) with more mount options (`-o`), e.g.
    /// `inode64`: each such tmpfs numbers its inodes from 1, so two of
    /// them share inode numbers as two disks would.
    pub fn mount_with(path: &Path, bytes: u64, options: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        let mut all = format!("size={bytes}");
        if !options.is_empty() {
            all = format!("{all},{options}");
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &all, "tmpfs"])
            .arg(path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mount -t tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(path.to_owned()))
    }

    /// Takes every byte left, as another program would, with file `name`.
    pub fn fill(&self, name: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.0.join(name))?;
        let zeros = vec![0u8; 1 << 20];
        while filler.write(&zeros).is_ok_and(|n| n > 0) {}
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
