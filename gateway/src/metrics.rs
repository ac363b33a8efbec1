//! Counters of what the gateway does, for `imz status` and Prometheus.
//!
//! Plain atomics bumped on the hot paths; rates are derived by whoever
//! reads them (see [`Rates`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Metrics {
    /// NFS READs answered.
    pub reads: AtomicU64,
    /// Of which answered from the cache without fetching.
    pub read_hits: AtomicU64,
    /// Bytes returned by READs.
    pub read_bytes: AtomicU64,
    /// Bytes fetched from the origin.
    pub fetched_bytes: AtomicU64,
    /// Bytes written by clients.
    pub written_bytes: AtomicU64,
    /// Operations the origin applied from our log.
    pub reintegrated_ops: AtomicU64,
    /// Content bytes uploaded to the origin.
    pub reintegrated_bytes: AtomicU64,
    /// Conflicts met.
    pub conflicts: AtomicU64,
    /// Journal records applied.
    pub journal_records: AtomicU64,
    /// The origin's newest journal sequence as last seen.
    pub origin_seq: AtomicU64,
    /// Times the NFS listener stopped and was bound again (see
    /// `listener`).
    pub nfs_listener_restarts: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Per-second rates of a few counters, measured between two looks.
#[derive(Debug)]
pub struct Rates {
    last: Mutex<(Instant, u64, u64, u64)>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            last: Mutex::new((Instant::now(), 0, 0, 0)),
        }
    }
}

/// Bytes per second fetched, and operations and bytes per second reintegrated.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RateSample {
    pub fetch_bytes_per_sec: f64,
    pub reintegrate_ops_per_sec: f64,
    pub reintegrate_bytes_per_sec: f64,
}

impl Rates {
    /// Rates since the previous call (at least 100 ms apart to mean anything).
    pub fn sample(&self, m: &Metrics) -> RateSample {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let fetched = Metrics::get(&m.fetched_bytes);
        let ops = Metrics::get(&m.reintegrated_ops);
        let bytes = Metrics::get(&m.reintegrated_bytes);
        let secs = now.duration_since(last.0).as_secs_f64().max(0.1);
        let sample = RateSample {
            fetch_bytes_per_sec: fetched.saturating_sub(last.1) as f64 / secs,
            reintegrate_ops_per_sec: ops.saturating_sub(last.2) as f64 / secs,
            reintegrate_bytes_per_sec: bytes.saturating_sub(last.3) as f64 / secs,
        };
        *last = (now, fetched, ops, bytes);
        sample
    }
}
