//! The test's side of a hold point (`imz_origin::test_hold`): while it is
//! armed, the process waits there, and says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One hold point, by its directory.
pub struct Hold {
    dir: PathBuf,
}

impl Hold {
    /// A hold in `dir` (created), for the process started with the hold's
    /// variable set to it.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// `VAR=DIR`, to set in the environment of the process to hold.
    pub fn env(&self, var: &str) -> String {
        format!("{var}={}", self.dir.display())
    }

    /// From now on the process waits when it comes to the point.
    pub fn arm(&self) -> anyhow::Result<()> {
        Ok(std::fs::write(self.dir.join("hold"), b"")?)
    }

    /// Waits until the process waits at the point (at most 30 s).
    pub async fn reached(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_held() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the process never came to the hold point"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// [`reached`](Self::reached), from a thread outside a runtime.
    pub fn reached_blocking(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_held() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the process never came to the hold point"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn is_held(&self) -> bool {
        self.dir.join("held").exists()
    }

    /// Lets the process go on.
    pub fn release(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.dir.join("hold"))?)
    }
}
