//! `imz conflicts list|resolve`: see and settle conflicts.

use imz_gateway::conflict::ConflictPolicy;
use imz_gateway::control::{Request, Response};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Every conflict met, how it was settled, and those held for you.
    List {
        #[command(flatten)]
        target: super::control_args::Target,
        #[arg(long)]
        json: bool,
    },
    /// Settle a held conflict.
    Resolve {
        /// The path (as `imz conflicts list` shows it) or the conflict id.
        path: std::ffi::OsString,
        /// mine: the gateway's version wins; theirs: the origin's; both:
        /// keep both, the gateway's under a conflict name.
        #[arg(long, value_enum)]
        keep: Keep,
        #[command(flatten)]
        target: super::control_args::Target,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Keep {
    Mine,
    Theirs,
    Both,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::List { target, json } => {
            let Response::Conflicts { conflicts } = target.ask(&Request::ConflictsList)? else {
                anyhow::bail!("unexpected answer from the gateway");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&conflicts)?);
                return Ok(());
            }
            if conflicts.is_empty() {
                println!("no conflicts");
            }
            for c in conflicts {
                let state = match (c.held, c.decision) {
                    (Some(_), None) => "HELD".to_owned(),
                    (Some(_), Some(d)) => format!("decided: {d}"),
                    (None, _) => "settled".to_owned(),
                };
                println!(
                    "{:>6}  {:<12} {:<10} {}  [{}] {}",
                    c.id,
                    c.case,
                    state,
                    imz_origin::names::display(&c.path),
                    c.policy,
                    c.outcome
                );
                if let Some(copy) = c.saved_copy {
                    println!("        saved copy: {}", imz_origin::names::display(&copy));
                }
            }
            Ok(())
        }
        Action::Resolve { path, keep, target } => {
            let keep = match keep {
                Keep::Mine => ConflictPolicy::GatewayWins,
                Keep::Theirs => ConflictPolicy::OriginWins,
                Keep::Both => ConflictPolicy::KeepBoth,
            };
            let Response::Resolved { conflict } = target.ask(&Request::ConflictsResolve {
                which: imz_origin::names::from_os(&path),
                keep,
            })?
            else {
                anyhow::bail!("unexpected answer from the gateway");
            };
            println!(
                "{}: will be settled as {keep} on the next reintegration",
                imz_origin::names::display(&conflict.path)
            );
            Ok(())
        }
    }
}
