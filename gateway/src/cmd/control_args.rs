//! How the control subcommands find a running gateway.

use std::path::PathBuf;

use imz_gateway::control::{self, Request, Response};

/// Which gateway to talk to: without either option, the one running
/// (see [`imz_gateway::registry`]).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The gateway's --cache directory (its control socket is in it).
    /// Without this or --control: the one gateway running
    #[arg(long, env = "IMZ_CACHE", conflicts_with = "control")]
    pub cache: Option<PathBuf>,
    /// The gateway's control socket, as it printed at start.
    #[arg(long)]
    pub control: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.control, &self.cache) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(dir)) => Ok(control::socket_path(dir)),
            (None, None) => Ok(imz_gateway::registry::the_running_gateway()?),
        }
    }

    /// Sends one request; a gateway's error answer becomes an error.
    pub fn ask(&self, request: &Request) -> anyhow::Result<Response> {
        let socket = self.socket()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match runtime.block_on(control::request(&socket, request))? {
            Response::Error { message } => anyhow::bail!("{message}"),
            other => Ok(other),
        }
    }
}
