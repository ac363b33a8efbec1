//! Connectivity: whether the origin is believed reachable, and since when.
//!
//! Any part of the gateway that fails to reach the origin reports it here
//! ([`Link::down`]); from then on, reads of uncached data fail at once
//! instead of waiting for timeouts. The prober ([`run_prober`]) notices when
//! the origin answers again, and whoever waits for the link
//! ([`Link::wait_up`]: the journal follower, the reintegrator) resumes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::origin_client::{OriginClient, OriginError};

/// The link's state as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connected { since: SystemTime },
    Disconnected { since: SystemTime, reason: String },
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }
}

#[derive(Debug)]
pub struct Link {
    state: watch::Sender<LinkState>,
}

impl Link {
    /// A link that starts in the given state.
    pub fn new(up: bool) -> Arc<Self> {
        let now = SystemTime::now();
        let state = if up {
            LinkState::Connected { since: now }
        } else {
            LinkState::Disconnected {
                since: now,
                reason: "not yet connected".into(),
            }
        };
        Arc::new(Self {
            state: watch::Sender::new(state),
        })
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().is_up()
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// The origin could not be reached.
    pub fn down(&self, reason: &str) {
        self.state.send_if_modified(|s| {
            if s.is_up() {
                tracing::warn!(reason, "origin unreachable: working disconnected");
                *s = LinkState::Disconnected {
                    since: SystemTime::now(),
                    reason: reason.to_owned(),
                };
                true
            } else {
                false
            }
        });
    }

    /// Marks the link down if `err` says the origin cannot be used;
    /// returns whether it does.
    pub fn down_if_unreachable(&self, err: &OriginError) -> bool {
        match err.unreachable_reason() {
            Some(reason) => {
                self.down(&reason);
                true
            }
            None => false,
        }
    }

    /// The origin still cannot be used, now for `reason` (shown by
    /// `imz status`). A reason that needs someone to act (a refused token,
    /// another store) is logged when it appears; a plain outage is not
    /// logged again.
    pub fn still_down(&self, reason: &str, act: bool) {
        self.state.send_if_modified(|s| match s {
            LinkState::Disconnected { reason: old, .. } if old != reason => {
                if act {
                    tracing::warn!(reason, "origin unusable: working disconnected");
                }
                *old = reason.to_owned();
                true
            }
            _ => false,
        });
    }

    /// The origin answered.
    pub fn up(&self) {
        self.state.send_if_modified(|s| {
            if s.is_up() {
                false
            } else {
                tracing::info!("origin reachable again: connected");
                *s = LinkState::Connected {
                    since: SystemTime::now(),
                };
                true
            }
        });
    }

    /// Waits until the link is up.
    pub async fn wait_up(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(LinkState::is_up).await;
    }

    /// A receiver that sees every change of the link's state from now on.
    pub fn changes(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Waits until the link goes down.
    pub async fn wait_down(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| !s.is_up()).await;
    }
}

/// While the link is down, asks the origin for its info every `interval`
/// and brings the link up when it answers. The request carries the token,
/// so an origin that refuses it keeps the link down; the token file is
/// then read again before each try (the origin may have been given a new
/// token, and the file too).
pub async fn run_prober(link: Arc<Link>, origin: OriginClient, interval: Duration) {
    loop {
        link.wait_down().await;
        loop {
            tokio::time::sleep(interval).await;
            match origin.info().await {
                Ok(_) => {
                    link.up();
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "origin still unusable");
                    if let Some(reason) = e.unreachable_reason() {
                        link.still_down(&reason, !matches!(e, OriginError::Unreachable(_)));
                    }
                    if matches!(e, OriginError::TokenRefused) {
                        origin.reload_token();
                    }
                }
            }
        }
    }
}
