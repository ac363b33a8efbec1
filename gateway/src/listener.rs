//! Keeps NFS served for as long as the gateway runs.
//!
//! `nfs3_server`'s accept loop ends on an accept error (such as running out
//! of file descriptors), and panics when a client resets its connection
//! before it is accepted: it asks the accepted socket for its peer's
//! address, which a reset socket no longer has. A port scan is enough
//! (measured: about 130 connect-then-reset attempts stopped a gateway's NFS
//! service for good). Here the accept loop runs under `catch_unwind` and is
//! started again on the same listening socket, so that no client is
//! refused meanwhile; connections already accepted live in their own tasks
//! and are not affected.
//!
//! Each start of the loop also starts a housekeeping task of
//! `nfs3_server`'s (its retransmission cache cleaner) that only ends with
//! the listener, so after [`RESTARTS_BEFORE_REBIND`] restarts the listener
//! is dropped and its address bound again.
//!
//! The gateway's own accept loops (control socket, portmapper) share
//! [`pause_after_accept_error`].

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};

use crate::metrics::Metrics;
use crate::nfs::NfsAdapter;
use crate::vfs::Vfs;

/// Accept loop restarts on one listening socket before it is bound anew.
pub const RESTARTS_BEFORE_REBIND: u32 = 1000;
/// The first pause after an accept error (or a failed bind); it doubles up
/// to [`MAX_PAUSE`] while errors follow each other.
const PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// The pause of the gateway's own accept loops after an accept error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub type Listener = NFSTcpListener<NfsAdapter>;

/// Binds NFS (and MOUNT) on `addr`; file handles carry `generation`.
pub async fn bind(addr: SocketAddr, vfs: &Arc<Vfs>, generation: u64) -> std::io::Result<Listener> {
    NFSTcpListener::bind_with_generation(
        &addr.to_string(),
        NfsAdapter::new(Arc::clone(vfs)),
        generation,
    )
    .await
}

/// Serves `listener`, bound at `addr`, until the task running this is
/// aborted.
pub async fn keep_serving(
    mut listener: Listener,
    addr: SocketAddr,
    vfs: Arc<Vfs>,
    generation: u64,
) {
    let mut restarts = 0;
    let mut pause = PAUSE;
    loop {
        let started = Instant::now();
        let ended = AssertUnwindSafe(listener.handle_forever())
            .catch_unwind()
            .await;
        Metrics::add(&vfs.metrics.nfs_listener_restarts, 1);
        if started.elapsed() > MAX_PAUSE {
            pause = PAUSE;
        }
        match ended {
            Err(panic) => tracing::warn!(
                %addr,
                "NFS accept loop panicked ({}): a client probably reset its connection before it was accepted; accepting again",
                panic_message(panic.as_ref())
            ),
            Ok(result) => {
                let why = result
                    .err()
                    .map_or_else(|| "it returned".into(), |e| e.to_string());
                tracing::warn!(%addr, "NFS accept loop stopped ({why}); accepting again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
        restarts += 1;
        if restarts >= RESTARTS_BEFORE_REBIND {
            drop(listener);
            listener = rebind(addr, &vfs, generation).await;
            restarts = 0;
        }
    }
}

/// Binds `addr` again, retrying until it works (the address was ours a
/// moment ago, so failures are passing: descriptors running out, say).
async fn rebind(addr: SocketAddr, vfs: &Arc<Vfs>, generation: u64) -> Listener {
    let mut pause = PAUSE;
    loop {
        match bind(addr, vfs, generation).await {
            Ok(listener) => return listener,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "binding NFS again failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// What the gateway's own accept loops (control socket, portmapper) do on
/// an accept error: an error like running out of descriptors repeats at
/// once, so pause rather than spin.
pub async fn pause_after_accept_error(e: &std::io::Error) {
    tracing::debug!(error = %e, "accept failed");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Keeps the panic of `nfs3_server`'s accept loop over a connection reset
/// before it was accepted off stderr: [`keep_serving`] logs it in one line,
/// where the default hook would print a backtrace per reset connection.
/// Every other panic still reaches the default hook.
pub fn quiet_accept_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_accept_loop = info
            .location()
            .is_some_and(|l| l.file().contains("nfs3_server") && l.file().ends_with("tcp.rs"));
        if in_accept_loop && panic_message(info.payload()).starts_with(PEER_ADDRESS_PANIC) {
            return;
        }
        default(info);
    }));
}

/// How `nfs3_server`'s accept loop words that panic.
const PEER_ADDRESS_PANIC: &str = "failed to get peer address";

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}
