//! `imz gateway`: serve an origin over NFSv3 from a local cache.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use imz_gateway::{Gateway, GatewayConfig, restart};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of the origin, e.g. http://origin.example:7070
    #[arg(long, value_parser = super::parse_origin_url)]
    pub origin: String,
    /// File holding the origin's bearer token (read again while the origin
    /// refuses it: a new token needs no restart).
    #[arg(long)]
    pub token_file: PathBuf,
    /// Directory of the persistent cache (created if missing).
    #[arg(long)]
    pub cache: PathBuf,
    /// Most file data the cache holds, e.g. 10GiB.
    #[arg(long, default_value = "10GiB", value_parser = super::parse_cache_size)]
    pub cache_size: u64,
    /// Address to serve NFS on (2049 is the standard port).
    #[arg(long, default_value = "127.0.0.1:2049")]
    pub listen: SocketAddr,
    /// on-demand: fetch what clients use; replicate: fetch the whole tree
    /// (progress shown) and keep it current, for use without the origin.
    #[arg(long, value_enum, default_value_t = imz_gateway::replicate::Mode::OnDemand)]
    pub mode: imz_gateway::replicate::Mode,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub writeback: super::WritebackArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let token = super::read_token(&args.token_file)?;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let mut signals = super::ShutdownSignals::install()?;
        let config = GatewayConfig {
            origin_url: args.origin,
            token,
            token_file: Some(args.token_file),
            cache_dir: args.cache,
            cache_size: args.cache_size,
            listen: restart::listen_addr("nfs", Some(args.listen)).unwrap_or(args.listen),
            timeouts: Default::default(),
            reintegration: args.writeback.settings(),
            mode: args.mode,
            metrics_listen: restart::listen_addr("metrics", args.metrics_listen),
        };
        let gateway = Gateway::start(config)
            .await
            .context("starting the gateway")?;
        super::announce_gateway(&gateway);
        let gateway = super::serve_until_stopped(gateway, None, &mut signals).await?;
        tracing::info!("shutting down");
        gateway.shutdown().await
    })
}
