//! The `imz` command line: one module per subcommand.

mod origin;

use clap::{Parser, Subcommand};

/// imz: an InterMezzo-style caching NFSv3 gateway in front of an origin server.
#[derive(Debug, Parser)]
#[command(name = "imz", version, about, long_about = None)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a directory as the origin (master copy) over HTTP.
    Origin(origin::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Origin(args) => origin::run(args),
    }
}

/// Logs go to stderr, so that stdout carries only what a user or script
/// reads (addresses, mount commands, status).
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
