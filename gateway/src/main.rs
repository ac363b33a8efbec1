//! `imz`: the one binary. Parses the command line and hands each subcommand
//! to its module under `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    cmd::init_logging(cli.verbose);
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imz: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
