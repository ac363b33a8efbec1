//! `imz pin` and `imz unpin`: keep files and subtrees in a running
//! gateway's cache for use without the origin (Coda's hoarding).

use bytesize::ByteSize;
use imz_gateway::control::{Request, Response};

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// Path inside the export, e.g. projects/report.pdf or /photos.
    pub path: String,
    /// Pin a directory's whole subtree, including what is created in it
    /// later (without it, a directory's files are pinned, not its subdirectories).
    #[arg(short, long)]
    pub recursive: bool,
    #[command(flatten)]
    pub target: super::control_args::Target,
}

#[derive(Debug, clap::Args)]
pub struct UnpinArgs {
    /// Path inside the export; a directory is unpinned with all below it.
    pub path: String,
    #[command(flatten)]
    pub target: super::control_args::Target,
}

pub fn run_pin(args: PinArgs) -> anyhow::Result<()> {
    let request = Request::Pin {
        path: args.path,
        recursive: args.recursive,
    };
    match args.target.ask(&request)? {
        Response::Pinned {
            path,
            objects,
            bytes,
        } => {
            println!(
                "pinned {path}: {objects} objects, {} in the cache and kept current",
                ByteSize(bytes)
            );
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the gateway: {other:?}"),
    }
}

pub fn run_unpin(args: UnpinArgs) -> anyhow::Result<()> {
    match args.target.ask(&Request::Unpin { path: args.path })? {
        Response::Unpinned { path, objects } => {
            println!("unpinned {path}: {objects} objects may be evicted again");
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the gateway: {other:?}"),
    }
}
