//! Holds for tests: points where a test can stop the gateway, to change
//! something in a window that no kill or timing reaches on demand.
//!
//! A hold is named by an environment variable giving a directory `DIR`,
//! read once. While the file `DIR/hold` exists, the gateway waits at that
//! point (at most a minute), and `DIR/held` says it is there. Without the
//! variable a hold costs one atomic load.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
        let Some(dir) = self.dir.get_or_init(|| {
            let dir = std::env::var_os(self.var).map(PathBuf::from);
            if let Some(d) = &dir {
                tracing::warn!(var = self.var, dir = %d.display(), "the gateway may be held here for a test");
            }
            dir
        }) else {
            return;
        };
        let (hold, held) = (dir.join("hold"), dir.join("held"));
        if !hold.exists() {
            return;
        }
        if let Err(e) = std::fs::write(&held, b"") {
            tracing::warn!(error = %e, "test hold: cannot say the gateway is held");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while hold.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(&held);
    }
}
