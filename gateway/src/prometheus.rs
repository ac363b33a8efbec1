//! Metrics in the Prometheus text format, served on `--metrics-listen`.
//!
//! Counters only grow (rates are the scraper's business); gauges describe
//! the moment. Everything comes from the same snapshot `imz status` shows.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::control::{Control, Status};

/// Renders one snapshot.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP imz_{name} {help}");
        let _ = writeln!(out, "# TYPE imz_{name} {kind}");
        let _ = writeln!(out, "imz_{name} {value}");
    };
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    metric(
        "connected",
        "gauge",
        "1 while the origin is reachable.",
        b(s.connected),
    );
    metric(
        "journal_lag_records",
        "gauge",
        "Origin journal records not yet applied.",
        s.journal_lag as f64,
    );
    metric(
        "log_records",
        "gauge",
        "Changes waiting to be sent to the origin.",
        s.log_records as f64,
    );
    metric(
        "log_bytes",
        "gauge",
        "Content bytes waiting to be sent to the origin.",
        s.log_bytes as f64,
    );
    metric(
        "unstable_files",
        "gauge",
        "Files with UNSTABLE writes acknowledged but not yet durable.",
        s.unstable_files as f64,
    );
    metric(
        "unstable_bytes",
        "gauge",
        "Bytes of UNSTABLE writes acknowledged but not yet durable.",
        s.unstable_bytes as f64,
    );
    metric(
        "conflicts",
        "gauge",
        "Conflicts recorded.",
        s.conflicts as f64,
    );
    metric(
        "conflicts_held",
        "gauge",
        "Conflicts waiting for a person.",
        s.conflicts_held as f64,
    );
    metric(
        "storage_failed",
        "gauge",
        "1 while the cache's storage has failed and the gateway waits to restart.",
        if s.storage_failure.is_some() {
            1.0
        } else {
            0.0
        },
    );
    metric(
        "cache_used_bytes",
        "gauge",
        "File data in the cache.",
        s.cache_used as f64,
    );
    metric(
        "cache_capacity_bytes",
        "gauge",
        "Most file data the cache holds.",
        s.cache_capacity as f64,
    );
    metric(
        "cache_protected_bytes",
        "gauge",
        "Dirty or pinned data, never evicted.",
        s.cache_protected as f64,
    );
    metric(
        "pinned_bytes",
        "gauge",
        "Bytes of pinned files.",
        s.pinned_bytes as f64,
    );
    metric(
        "reads_total",
        "counter",
        "NFS reads answered.",
        s.reads as f64,
    );
    metric(
        "read_hits_total",
        "counter",
        "NFS reads answered from the cache alone.",
        s.read_hits as f64,
    );
    metric(
        "fetched_bytes_total",
        "counter",
        "Bytes fetched from the origin.",
        s.fetched_bytes as f64,
    );
    metric(
        "written_bytes_total",
        "counter",
        "Bytes written by clients.",
        s.written_bytes as f64,
    );
    metric(
        "reintegrated_ops_total",
        "counter",
        "Changes the origin applied.",
        s.reintegrated_ops as f64,
    );
    metric(
        "reintegrated_bytes_total",
        "counter",
        "Content bytes sent to the origin.",
        s.reintegrated_bytes as f64,
    );
    metric(
        "nfs_listener_restarts_total",
        "counter",
        "Times the NFS listener stopped (an accept error, or a connection reset before it was accepted) and was bound again.",
        s.nfs_listener_restarts as f64,
    );
    out
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, control: Arc<Control>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let control = Arc::clone(&control);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&control.snapshot(false)),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(local)
}
