//! Holds for tests: points where a test can stop a gateway or an origin,
//! to change something in a window that no kill or timing reaches on
//! demand.
//!
//! A hold is named by an environment variable giving a directory `DIR`,
//! read once. While the file `DIR/hold` exists, the process waits at that
//! point (at most a minute), and `DIR/held` says it is there. Without the
//! variable a hold costs one atomic load.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const LONGEST: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// One hold point.
pub struct TestHold {
    var: &'static str,
    dir: OnceLock<Option<PathBuf>>,
}

impl TestHold {
    pub const fn new(var: &'static str) -> Self {
        Self {
            var,
            dir: OnceLock::new(),
        }
    }

    /// Waits here while the test asks to.
    pub async fn wait(&self) {
        let Some(dir) = self.armed() else { return };
        let deadline = Instant::now() + LONGEST;
        while dir.join("hold").exists() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        let _ = std::fs::remove_file(dir.join("held"));
    }

    /// [`wait`](Self::wait) for a thread outside the runtime.
    pub fn wait_blocking(&self) {
        let Some(dir) = self.armed() else { return };
        let deadline = Instant::now() + LONGEST;
        while dir.join("hold").exists() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let _ = std::fs::remove_file(dir.join("held"));
    }

    /// The hold's directory if the test holds the process here now, once
    /// it has said so.
    fn armed(&self) -> Option<&Path> {
        let dir = self
            .dir
            .get_or_init(|| {
                let dir = std::env::var_os(self.var).map(PathBuf::from);
                if let Some(d) = &dir {
                    tracing::warn!(var = self.var, dir = %d.display(), "this process may be held here for a test");
                }
                dir
            })
            .as_deref()?;
        if !dir.join("hold").exists() {
            return None;
        }
        if let Err(e) = std::fs::write(dir.join("held"), b"") {
            tracing::warn!(error = %e, "test hold: cannot say the process is held");
        }
        Some(dir)
    }
}
