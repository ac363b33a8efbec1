//! The imz gateway: serves an origin's tree over NFSv3 from a persistent
//! cache, filled on demand and kept coherent by the origin's journal.
//!
//! Map (see ARCHITECTURE.md for the whole picture):
//! - [`nfs`]: the thin adapter to the NFS layer (`nfs3_server`);
//!   [`listener`]: keeps its listener up;
//! - [`vfs`]: the protocol-neutral filesystem over the cache;
//! - [`fetch`]: on-demand data transfers with readahead;
//! - [`follow`]: the journal follower; [`coherence`]: folding origin state
//!   into the cache;
//! - [`replicate`]: replication mode and keeping replicated and pinned
//!   content current; [`pin`]: `imz pin`; [`fill`]: fetching whole files
//!   and subtrees for both;
//! - [`origin_client`]: the origin's HTTP API; [`link`]: connectivity;
//! - [`control`]: the control socket behind `imz status` and friends;
//!   [`registry`]: how those find a gateway unasked;
//! - [`portmap`]: the portmapper side of the bare `mount -t nfs HOST:/imz`;
//! - [`gateway`]: start-up, tying the pieces together.

pub mod coherence;
pub mod conflict;
pub mod control;
pub mod fetch;
pub mod fill;
pub mod follow;
pub mod gateway;
pub mod link;
pub mod listener;
pub mod metrics;
pub mod nfs;
pub mod origin_client;
pub mod pin;
pub mod portmap;
pub mod preload;
pub mod prometheus;
pub mod registry;
pub mod reintegrate;
pub mod replicate;
pub mod restart;
pub mod resync;
pub mod unchanged;
pub mod unstable;
pub mod vfs;
pub mod writer;

pub use gateway::{Gateway, GatewayConfig};
