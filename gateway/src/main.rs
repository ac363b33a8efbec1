//! `imz`: the one binary. Parses the command line and hands each subcommand
//! to its module under `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_big_buffers_mapped();
    imz_gateway::listener::quiet_accept_panics();
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

/// Every READ and WRITE moves buffers of about 1 MiB. glibc serves those
/// with a fresh mmap each and unmaps them on free, so each request paid for
/// page faults and the kernel zeroing the pages (a sixth of the gateway's
/// CPU in a sequential write). From the heap instead, they are reused.
#[allow(unsafe_code)]
fn keep_big_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
