//! `imz origin`: run the origin server over a directory.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to serve (the master copy).
    #[arg(long)]
    pub root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// File holding the bearer token gateways must present; created with a
    /// random token (mode 0600) if it does not exist.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Journal records kept at least before older ones are compacted.
    #[arg(long, default_value_t = 1_000_000)]
    pub journal_keep: u64,
    /// Largest upload accepted, in bytes.
    #[arg(long, default_value_t = 1 << 40)]
    pub max_upload: u64,
    /// How long a connection may take to send a request's head, or stay
    /// idle between requests, before it is closed. Keep it above 30s, how
    /// long gateways keep an idle connection.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    pub header_timeout: std::time::Duration,
    /// HTTP connections open at once; more are closed as they arrive.
    #[arg(long, default_value_t = imz_origin::http::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// A client that reads nothing of a download (or a manifest) for this
    /// long loses it, freeing its download slot.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    pub send_timeout: std::time::Duration,
    /// When the system's inotify limit (fs.inotify.max_user_watches) leaves
    /// directories unwatched, how often the whole tree is rescanned to find
    /// changes other programs make in them.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    pub rescan_every: std::time::Duration,
    /// Where the origin keeps its own state (metadata store, staged
    /// uploads), outside the tree. Default: ROOT/.imz.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Never change the tree: gateways serve it read-only, and changes they
    /// logged before are refused (held as conflicts there). With --state, the
    /// tree itself may be read-only (a snapshot, a mounted image).
    #[arg(long)]
    pub read_only: bool,
    /// Bytes read from disk per chunk when serving file data.
    #[arg(long, default_value_t = 1 << 20, hide = true)]
    pub read_chunk: usize,
}

/// `state`, made absolute (and created), if it lies outside the tree at
/// `root`: the origin would otherwise journal its own store's writes.
/// Nothing is created when it does not.
pub(super) fn state_outside(root: &Path, state: &Path) -> anyhow::Result<PathBuf> {
    let resolved = super::resolve_unmade(state)?;
    let root = std::fs::canonicalize(root)
        .with_context(|| format!("resolving the tree {}", root.display()))?;
    let own = root.join(imz_origin::wire::STATE_DIR_NAME);
    anyhow::ensure!(
        !resolved.starts_with(&root) || resolved.starts_with(&own),
        "--state {} lies inside the tree it would serve ({}): choose a directory outside it",
        state.display(),
        root.display()
    );
    std::fs::create_dir_all(&resolved)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    Ok(resolved)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let token = read_or_create_token(&args.token_file)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut signals = super::ShutdownSignals::install()?;
        if imz_gateway::restart::restarted() {
            tracing::warn!("restarted after a storage failure: reopening the metadata store");
        }
        let listen =
            imz_gateway::restart::listen_addr("origin", Some(args.listen)).unwrap_or(args.listen);
        let mut config = imz_origin::OriginConfig::new(&args.root, listen, token);
        config.journal_keep = args.journal_keep.max(1);
        config.max_upload = args.max_upload;
        config.read_chunk = args.read_chunk.max(4096);
        config.header_timeout = args.header_timeout;
        config.max_connections = args.max_connections.max(1);
        config.send_timeout = args.send_timeout;
        config.rescan_every = args.rescan_every.max(std::time::Duration::from_millis(100));
        config.read_only = args.read_only;
        if let Some(state) = &args.state {
            config.state_dir = Some(state_outside(&args.root, state)?);
        }
        let origin = imz_origin::start(config)
            .await
            .with_context(|| format!("starting the origin over {}", args.root.display()))?;
        super::say(format_args!(
            "imz origin listening on http://{}",
            origin.local_addr()
        ));
        let why = tokio::select! {
            () = signals.wait() => None,
            why = origin.storage_failure() => Some(why),
        };
        if let Some(why) = why {
            tracing::error!(
                error = why,
                "the metadata store failed; the origin restarts to reopen it (nothing committed is lost)"
            );
            let rooms = [imz_gateway::restart::Room::for_origin(&origin)];
            let listening = [("origin", origin.local_addr())];
            return Err(
                super::restart_unless_stopped(&why, &rooms, &listening, &mut signals).await,
            );
        }
        tracing::info!("shutting down");
        origin.shutdown().await.context("shutting down")?;
        Ok(())
    })
}

/// Reads the token, or creates the file (mode 0600) with a random one.
fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return super::read_token(path);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the token file {}", path.display()))?;
    writeln!(f, "{token}").context("writing the token file")?;
    f.sync_all().context("syncing the token file")?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_must_lie_outside_the_tree() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("tree");
        std::fs::create_dir(&root)?;
        let inside = state_outside(&root, &root.join("sub/state"));
        assert!(format!("{:#}", inside.err().context("inside")?).contains("inside the tree"));
        assert!(!root.join("sub").exists(), "a refused --state was made");
        assert!(state_outside(&root, &root).is_err());
        let own = state_outside(&root, &root.join(imz_origin::wire::STATE_DIR_NAME))?;
        assert!(own.ends_with(".imz"));
        let outside = state_outside(&root, &dir.path().join("state"))?;
        assert!(outside.is_dir());
        let around = state_outside(&root, &root.join("../around"))?;
        assert_eq!(around, std::fs::canonicalize(dir.path())?.join("around"));
        assert!(state_outside(&root, &root.join("new/../state")).is_err());
        assert!(!root.join("new").exists() && !root.join("state").exists());
        Ok(())
    }
}
