//! `imz origin`: run the origin server over a directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to serve (the master copy).
    #[arg(long)]
    pub root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// File holding the bearer token gateways must present; created with a
    /// random token (mode 0600) if it does not exist.
    #[arg(long)]
    pub token_file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let _ = args;
        anyhow::bail!("the origin server is not built yet")
    })
}
