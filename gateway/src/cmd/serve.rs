//! `imz serve DIR`: the embedded default. An origin over DIR and a gateway
//! in front of it, in one process, ready to mount.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use imz_gateway::{Gateway, GatewayConfig, restart};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to serve.
    pub dir: PathBuf,
    /// Directory of the gateway's cache [default: STATE/gateway-cache].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Where the origin keeps its own state (metadata store, staged
    /// uploads), outside DIR [default: DIR/.imz].
    #[arg(long, value_name = "STATE")]
    pub state: Option<PathBuf>,
    /// Never change DIR: every change through the mount gets "read-only
    /// file system". With --state, DIR itself may be read-only (a
    /// snapshot, a mounted image).
    #[arg(long)]
    pub read_only: bool,
    /// Most file data the cache holds.
    #[arg(long, default_value = "10GiB", value_parser = super::parse_cache_size)]
    pub cache_size: u64,
    /// Address to serve NFS on. The standard port 2049 lets clients mount
    /// without naming a port; if it is taken, any free port is used.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
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

const STANDARD_NFS: &str = "127.0.0.1:2049";

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dir.is_dir(),
        "{} is not a directory",
        args.dir.display()
    );
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let own_state = dir.join(imz_origin::wire::STATE_DIR_NAME);
    let state_dir = match &args.state {
        Some(state) => Some(super::origin::state_outside(&dir, state)?),
        None => None,
    };
    let cache_dir = args.cache.unwrap_or_else(|| {
        state_dir
            .as_deref()
            .unwrap_or(&own_state)
            .join("gateway-cache")
    });
    let resolved = super::resolve_unmade(&cache_dir)?;
    // Inside the served tree, the cache would be served and followed by
    // itself: each commit a change at the origin, journaled, followed.
    anyhow::ensure!(
        !resolved.starts_with(&dir) || resolved.starts_with(&own_state),
        "the cache {} is inside {}, the directory being served: the gateway would serve its \
         own cache. Put it elsewhere, or leave --cache out (it then lives in {})",
        cache_dir.display(),
        dir.display(),
        own_state.display()
    );
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let mut signals = super::ShutdownSignals::install()?;
        // The two halves talk over loopback HTTP with a token that lives
        // only in this process.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let origin_listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut origin_config = imz_origin::OriginConfig::new(&dir, origin_listen, token.clone());
        origin_config.read_only = args.read_only;
        origin_config.state_dir = state_dir;
        let origin = imz_origin::start(origin_config)
            .await
            .with_context(|| format!("starting the origin over {}", dir.display()))?;
        let origin_url = format!("http://{}", origin.local_addr());

        let mut config = GatewayConfig {
            origin_url: origin_url.clone(),
            token,
            token_file: None,
            cache_dir,
            cache_size: args.cache_size,
            listen: restart::listen_addr("nfs", args.listen).unwrap_or(STANDARD_NFS.parse()?),
            timeouts: Default::default(),
            reintegration: args.writeback.settings(),
            mode: args.mode,
            metrics_listen: restart::listen_addr("metrics", args.metrics_listen),
        };
        let gateway = match Gateway::start(config.clone()).await {
            Ok(g) => g,
            Err(e) if args.listen.is_none() => {
                tracing::info!(error = %format!("{e:#}"), "the standard NFS port is not available; using any free port");
                config.listen = ([127, 0, 0, 1], 0).into();
                Gateway::start(config).await.context("starting the gateway")?
            }
            Err(e) => return Err(e.context("starting the gateway")),
        };
        super::say(format_args!(
            "imz serve: serving {} (origin at {origin_url})",
            dir.display()
        ));
        super::announce_gateway(&gateway);
        let gateway = super::serve_until_stopped(gateway, Some(&origin), &mut signals).await?;
        tracing::info!("shutting down");
        gateway.shutdown().await?;
        origin.shutdown().await.context("stopping the origin")?;
        Ok(())
    })
}
