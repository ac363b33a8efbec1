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
    raise_open_files_limit();
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

/// Lifts the soft limit on open files to the hard one (at most 2^20). The
/// usual soft limit, 1,024, is below what a busy origin holds (512
/// connections, 256 downloads with their files): past it, opening a file
/// failed and the request got a 500, which gateways take for a lost
/// origin. Nothing here uses `select`, the reason that soft limit exists.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const CAP: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(CAP, |max| max.min(CAP));
    if limit.current.is_some_and(|current| current < want) {
        let raised = Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, ?limit, "cannot raise the open files limit");
        }
    }
}
