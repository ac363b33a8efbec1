//! The `imz` command line: one module per subcommand.

mod conflicts;
mod control_args;
mod gateway;
mod origin;
mod pin;
mod serve;
mod status;
mod sync;

use clap::{Parser, Subcommand};

/// imz: an InterMezzo-style caching NFSv3 gateway in front of an origin server.
#[derive(Debug, Parser)]
#[command(
    name = "imz",
    version,
    about = "imz: an InterMezzo-style NFSv3 gateway that caches an origin server, works disconnected and reintegrates"
)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve DIR through NFS: an origin and a gateway in one process (the
    /// embedded default). Prints the mount command.
    Serve(serve::Args),
    /// Serve a directory as the origin (master copy) over HTTP.
    Origin(origin::Args),
    /// Serve an origin over NFSv3 from a local persistent cache.
    Gateway(gateway::Args),
    /// Show what a running gateway is doing.
    Status(status::Args),
    /// Send pending changes to the origin now and wait until they are there.
    Sync(sync::Args),
    /// List or resolve conflicts.
    Conflicts(conflicts::Args),
    /// Keep a file or subtree in the cache for use without the origin.
    Pin(pin::PinArgs),
    /// Stop keeping a file or subtree (it may be evicted again).
    Unpin(pin::UnpinArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Origin(args) => origin::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Status(args) => status::run(args),
        Command::Sync(args) => sync::run(args),
        Command::Conflicts(args) => conflicts::run(args),
        Command::Pin(args) => pin::run_pin(args),
        Command::Unpin(args) => pin::run_unpin(args),
    }
}

/// Logs go to stderr, so that stdout carries only what a user or script
/// reads (addresses, mount commands, status), coloured only on a terminal.
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // nfs3_server logs every accepted connection at info, and every answer
    // other than OK at error (a client's lookup of a name not there, a read
    // of a file removed meanwhile): keep it quiet. The gateway logs its own
    // failures where they happen (cache, origin).
    let default = format!("{default},nfs3_server=warn,nfs3_server::nfs_handlers=off");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal: a log file, a pipe or the
    // journal gets plain text (and NO_COLOR is honoured).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

/// The multi-threaded runtime every long-running subcommand uses.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imz")
        .build()
        .context("starting the async runtime")
}

/// `path` with its existing part resolved (symlinks followed) and the rest,
/// which is yet to be made, appended.
pub fn resolve_unmade(path: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let absolute =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut existing = absolute.as_path();
    let mut unmade = Vec::new();
    while !existing.exists() {
        // `file_name` is `None` for a `..`: the path goes through a
        // directory yet to be made and back out of it.
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            anyhow::bail!(
                "{} goes through a directory that does not exist: give it without `..`",
                path.display()
            );
        };
        unmade.push(name.to_owned());
        existing = parent;
    }
    let mut resolved = std::fs::canonicalize(existing)
        .with_context(|| format!("resolving {}", existing.display()))?;
    resolved.extend(unmade.iter().rev());
    Ok(resolved)
}

/// Parses sizes like `10GiB`, `500MB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("not a size ({e}); try e.g. 10GiB or 512MiB"))
}

/// Smallest `--cache-size`: two chunks, the data one WRITE can touch.
pub const MIN_CACHE_SIZE: u64 = 2 << 20;

/// A `--cache-size`: a size of at least [`MIN_CACHE_SIZE`]. Smaller, a
/// gateway would answer every write with NOSPC and keep nothing it
/// fetched: surely not what was meant (`0` for "no limit", say).
pub fn parse_cache_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size < MIN_CACHE_SIZE {
        return Err(format!(
            "the cache must hold at least {} (file data is kept in chunks of about 1 MiB); try e.g. 10GiB",
            bytesize::ByteSize(MIN_CACHE_SIZE).display().iec()
        ));
    }
    Ok(size)
}

/// Checks an origin URL given on the command line: http or https, with a
/// host, and nothing after the path (the API's paths are appended to it).
pub fn parse_origin_url(s: &str) -> Result<String, String> {
    if !s.contains("://") {
        return Err(format!("not a URL: give the scheme too, e.g. http://{s}"));
    }
    let url = reqwest::Url::parse(s)
        .map_err(|e| format!("not a URL ({e}); e.g. http://origin.example:7070"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the origin is reached over http or https, not {}:",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must end at its path (no ?query or #fragment)".into());
    }
    Ok(s.to_owned())
}

/// Reads a bearer token from a file (surrounding whitespace ignored).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use imz_gateway::origin_client::{TokenProblem, token_in};
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    match token_in(&text) {
        Ok(token) => Ok(token.to_owned()),
        Err(TokenProblem::Empty) => anyhow::bail!("the token file {} is empty", path.display()),
        Err(TokenProblem::NotHeaderSafe) => anyhow::bail!(
            "the token in {} has spaces, line breaks or characters that are not printable ASCII; an HTTP header cannot carry it",
            path.display()
        ),
    }
}

/// Writes one line to stdout for people and scripts, and flushes it. A
/// server's stdout may be closed under it (`imz serve DIR | head -1`, a
/// supervisor that stops reading): the line is then lost, not the server
/// (`println!` panics on a closed pipe, which ended a gateway mid-way).
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
    let _ = out.flush();
}

/// Prints where the gateway listens and how to mount it (stdout, for
/// people and scripts).
pub fn announce_gateway(gateway: &imz_gateway::Gateway) {
    say(format_args!(
        "imz gateway listening on {}",
        gateway.nfs_addr
    ));
    say(format_args!(
        "mount (Linux): {}",
        gateway.linux_mount_command("/mnt")
    ));
    if let Some(short) = gateway.linux_short_mount_command("/mnt") {
        say(format_args!("mount (Linux, short): {short}"));
    }
    say(format_args!(
        "mount (macOS): {}",
        gateway.macos_mount_command("/Volumes/imz")
    ));
    say(format_args!(
        "control: imz status --control {}",
        gateway.control_path.display()
    ));
    if let Some(addr) = gateway.metrics_addr {
        say(format_args!("metrics: http://{addr}/metrics"));
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made. Made before a
/// server announces itself, so that a signal sent right after the ready
/// line still gets a clean shutdown (not the default action: death).
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Must run inside the tokio runtime.
    pub fn install() -> anyhow::Result<Self> {
        use anyhow::Context;
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Serves `gateway` (and `origin`, the one of `imz serve`) until SIGINT
/// or SIGTERM. If the cache's storage or the origin's metadata store fails
/// meanwhile, restarts the process in place (see `imz_gateway::restart`); a
/// signal while that waits for room on the disk stops it instead.
pub async fn serve_until_stopped(
    gateway: imz_gateway::Gateway,
    origin: Option<&imz_origin::RunningOrigin>,
    signals: &mut ShutdownSignals,
) -> anyhow::Result<imz_gateway::Gateway> {
    use imz_gateway::restart;
    let origin_failure = async {
        match origin {
            Some(o) => o.storage_failure().await,
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        () = signals.wait() => return Ok(gateway),
        why = gateway.storage_failure() => why,
        why = origin_failure => why,
    };
    tracing::error!(
        error = why,
        "storage failed; restarting in place to reopen it (nothing durable is lost)"
    );
    gateway.abort();
    let mut rooms = vec![gateway.restart_room()];
    rooms.extend(origin.map(restart::Room::for_origin));
    Err(restart_unless_stopped(&why, &rooms, &gateway.listening(), signals).await)
}

/// Restarts the process in place after a storage failure (`why`), once
/// every one of `rooms` has room, listening again on `listening`; a
/// signal meanwhile stops it instead. Returns why it did not restart.
pub async fn restart_unless_stopped(
    why: &str,
    rooms: &[imz_gateway::restart::Room],
    listening: &[(&str, std::net::SocketAddr)],
    signals: &mut ShutdownSignals,
) -> anyhow::Error {
    tokio::select! {
        () = signals.wait() => anyhow::anyhow!(
            "stopped while waiting to restart after a storage failure ({why}); the next start recovers"
        ),
        err = imz_gateway::restart::restart_in_place(rooms, listening) => {
            anyhow::Error::new(err).context("restarting after a storage failure")
        }
    }
}

/// How written data goes back to the origin (shared by `gateway` and `serve`).
#[derive(Debug, clap::Args)]
pub struct WritebackArgs {
    /// How conflicts with changes made at the origin are settled.
    #[arg(long, value_enum, default_value_t = imz_gateway::conflict::ConflictPolicy::KeepBoth)]
    pub conflict_policy: imz_gateway::conflict::ConflictPolicy,
    /// How long a change waits before it is sent to the origin, so that a
    /// burst of writes to one file travels once (e.g. 3s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reintegrate_delay: std::time::Duration,
}

impl WritebackArgs {
    pub fn settings(&self) -> imz_gateway::reintegrate::Settings {
        imz_gateway::reintegrate::Settings {
            aging: self.reintegrate_delay,
            policy: self.conflict_policy,
            ..Default::default()
        }
    }
}

/// Parses `3s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 3s or 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{parse_cache_size, parse_duration};
    use std::time::Duration;

    #[test]
    fn a_cache_too_small_to_hold_a_write_is_refused() {
        assert_eq!(parse_cache_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_cache_size("2MiB"), Ok(2 << 20));
        for tiny in ["0", "1KiB", "1MiB"] {
            let err = parse_cache_size(tiny).expect_err(tiny);
            assert!(err.contains("at least 2.0 MiB"), "{tiny}: {err}");
        }
        assert!(parse_cache_size("10XB").is_err());
    }

    #[test]
    fn durations_read_with_their_units_or_as_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn a_token_must_fit_an_http_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "  abc123-XYZ\n").expect("write");
        assert_eq!(super::read_token(&file).expect("token"), "abc123-XYZ");
        std::fs::write(&file, "abc\ndef\n").expect("write");
        let err = super::read_token(&file).expect_err("a line break inside");
        assert!(err.to_string().contains("HTTP header"), "{err}");
        std::fs::write(&file, "\n").expect("write");
        assert!(super::read_token(&file).is_err());
    }

    #[test]
    fn origin_urls_are_checked_before_anything_starts() {
        use super::parse_origin_url as parse;
        assert_eq!(
            parse("http://10.0.0.1:7070"),
            Ok("http://10.0.0.1:7070".into())
        );
        assert!(parse("https://origin.example/base/").is_ok());
        assert!(parse("origin.example:7070").is_err_and(|e| e.contains("scheme")));
        assert!(parse("10.0.0.1:7070").is_err_and(|e| e.contains("http://10.0.0.1:7070")));
        assert!(parse("ftp://origin.example").is_err_and(|e| e.contains("not ftp")));
        assert!(parse("http://origin.example/?x=1").is_err_and(|e| e.contains("query")));
    }

    #[test]
    fn paths_resolve_as_the_filesystem_will_follow_them() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let base = std::fs::canonicalize(dir.path())?;
        std::fs::create_dir_all(base.join("real/sub"))?;
        std::os::unix::fs::symlink(base.join("real/sub"), base.join("link"))?;
        // `..` after a symlink leaves the link's target, not the link:
        // where the directory will really be made.
        let got = super::resolve_unmade(&base.join("link/../cache/new"))?;
        assert_eq!(got, base.join("real/cache/new"));
        assert!(
            !base.join("real/cache").exists(),
            "resolving made something"
        );
        let err = super::resolve_unmade(&base.join("unmade/../cache"))
            .expect_err("`..` out of a directory that does not exist");
        assert!(err.to_string().contains("without `..`"), "{err}");
        Ok(())
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert!(parse_duration("1d").is_err_and(|e| e.contains("ms, s, m or h")));
        assert!(parse_duration("soon").is_err_and(|e| e.contains("not a duration")));
        assert!(parse_duration("-1s").is_err());
    }
}
