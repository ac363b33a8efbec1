//! Serves the API's HTTP connections with the limits a server reachable by
//! anyone needs: a connection must send a request's head within a timeout
//! (a connection idle between requests counts too), and only so many are
//! open at once, so that clients holding connections open without a token
//! cannot take every descriptor (probing found 20,000 silent connections
//! locked every gateway out).
//!
//! `axum::serve` sets neither limit; this is its accept loop with them,
//! TCP_NODELAY (a small response's body would otherwise wait behind its
//! headers for the client's delayed ACK, ~40 ms a request), and a graceful
//! stop.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// How long a connection may take, by default, to send a request's head,
/// or stay idle between requests. Gateways drop idle connections sooner (see
/// `CLIENT_IDLE`), so that they never reuse one the origin is closing.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long clients of this API should keep an idle connection.
pub const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// Connections open at once, by default; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 512;

/// The limits [`serve`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// How long a stop waits for requests in progress.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stopping` turns true.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: pause rather than spin.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&open).try_acquire_owned() else {
            tracing::warn!(
                %peer,
                "{} connections open: closing a new one",
                limits.max_connections
            );
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let connection =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("requests still in progress at stop");
    }
}
