//! `imz sync`: send every pending change to the origin now and wait.

use imz_gateway::control::{Request, Response};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: super::control_args::Target,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: std::time::Duration,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let request = Request::Sync {
        timeout_ms: args.timeout.as_millis() as u64,
    };
    match args.target.ask(&request)? {
        Response::Synced { waited_ms } => {
            println!("in sync with the origin ({waited_ms} ms)");
            Ok(())
        }
        Response::NotSynced { reason, pending } => {
            anyhow::bail!("not in sync: {pending} change(s) still waiting: {reason}")
        }
        _ => anyhow::bail!("unexpected answer from the gateway"),
    }
}
