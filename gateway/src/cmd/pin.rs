//! `imz pin` and `imz unpin`: keep files and subtrees in a running
//! gateway's cache for use without the origin (Coda's hoarding).

use bytesize::ByteSize;
use imz_gateway::control::{Request, Response};
use imz_origin::names;

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// Path inside the export, e.g. projects/report.pdf or /photos.
    pub path: std::ffi::OsString,
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
    pub path: std::ffi::OsString,
    #[command(flatten)]
    pub target: super::control_args::Target,
}

pub fn run_pin(args: PinArgs) -> anyhow::Result<()> {
    let request = Request::Pin {
        path: names::from_os(&args.path),
        recursive: args.recursive,
    };
    match args.target.ask(&request)? {
        Response::Pinned {
            path,
            objects,
            bytes,
        } => {
            println!(
                "pinned {}: {objects} objects, {} in the cache and kept current",
                names::display(&path),
                ByteSize(bytes)
            );
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the gateway: {other:?}"),
    }
}

pub fn run_unpin(args: UnpinArgs) -> anyhow::Result<()> {
    let path = names::from_os(&args.path);
    match args.target.ask(&Request::Unpin { path })? {
        Response::Unpinned { path, objects } => {
            println!(
                "unpinned {}: {objects} objects may be evicted again",
                names::display(&path)
            );
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the gateway: {other:?}"),
    }
}
