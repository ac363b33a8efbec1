//! `imz status`: what a running gateway is doing, at a glance.

use bytesize::ByteSize;
use imz_gateway::control::{Request, Response, Status};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: super::control_args::Target,
    /// Print JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Response::Status(status) = args.target.ask(&Request::Status)? else {
        anyhow::bail!("unexpected answer from the gateway");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

fn ago(since: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(since);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// The human view.
pub fn render(s: &Status) -> String {
    let link = if s.connected {
        format!("connected for {}", ago(s.since))
    } else {
        format!(
            "DISCONNECTED for {} ({})",
            ago(s.since),
            s.disconnect_reason.as_deref().unwrap_or("unknown reason")
        )
    };
    let mut out = String::new();
    if let Some(why) = &s.storage_failure {
        out.push_str(&format!(
            "STORAGE     FAILED ({why}): restarting once the cache's disk has room\n"
        ));
    }
    let read_only = if s.read_only { "  read-only" } else { "" };
    out.push_str(&format!("origin      {}  {link}{read_only}\n", s.origin));
    if !s.nfs.is_empty() {
        out.push_str(&format!(
            "serving     NFS on {}, cache in {}\n",
            s.nfs, s.cache_dir
        ));
    }
    if !s.portmapper.is_empty() {
        out.push_str(&format!("portmapper  {}\n", s.portmapper));
    }
    out.push_str(&format!("mode        {}\n", s.mode));
    if let Some(r) = &s.replica {
        out.push_str(&replica_line(r));
    }
    out.push_str(&format!(
        "journal     at {} of {} (lag {})\n",
        s.journal_cursor, s.journal_origin_seq, s.journal_lag
    ));
    out.push_str(&format!(
        "to send     {} changes, {} of content\n",
        s.log_records,
        ByteSize(s.log_bytes)
    ));
    if s.unstable_files > 0 {
        out.push_str(&format!(
            "unstable    {} in {} file(s), written but not yet on disk (until COMMIT or 2 s idle)\n",
            ByteSize(s.unstable_bytes),
            s.unstable_files
        ));
    }
    out.push_str(&format!(
        "conflicts   {} ({} held for you: imz conflicts list)\n",
        s.conflicts, s.conflicts_held
    ));
    out.push_str(&format!(
        "cache       {} of {} used, {} dirty or pinned, {} pinned\n",
        ByteSize(s.cache_used),
        ByteSize(s.cache_capacity),
        ByteSize(s.cache_protected),
        ByteSize(s.pinned_bytes)
    ));
    out.push_str(&format!(
        "reads       {} ({:.1}% from cache), {} fetched at {}/s\n",
        s.reads,
        s.hit_ratio * 100.0,
        ByteSize(s.fetched_bytes),
        ByteSize(s.rates.fetch_bytes_per_sec as u64)
    ));
    out.push_str(&format!(
        "sent        {} changes, {} ({:.0} changes/s, {}/s)\n",
        s.reintegrated_ops,
        ByteSize(s.reintegrated_bytes),
        s.rates.reintegrate_ops_per_sec,
        ByteSize(s.rates.reintegrate_bytes_per_sec as u64)
    ));
    if let Some(e) = &s.last_error {
        out.push_str(&format!("last error  {e}\n"));
    }
    out
}

/// The replication line: progress, or why the gateway stays on demand.
fn replica_line(r: &imz_gateway::replicate::ReplicaStatus) -> String {
    use imz_gateway::replicate::ReplicaState;
    let pending = if r.pending > 0 {
        format!(", {} kept files waiting for the origin", r.pending)
    } else {
        String::new()
    };
    match r.state {
        ReplicaState::Off if r.pending == 0 => String::new(),
        ReplicaState::Off => format!("kept        {}\n", pending.trim_start_matches(", ")),
        ReplicaState::Waiting => format!("replica     waiting for the origin{pending}\n"),
        ReplicaState::Copying => format!(
            "replica     copying: {} of {} files, {} of {}{pending}\n",
            r.files_done,
            r.files_total,
            ByteSize(r.bytes_done),
            ByteSize(r.bytes_total)
        ),
        ReplicaState::Current => format!(
            "replica     current: {} files, {}{pending}\n",
            r.files_total,
            ByteSize(r.bytes_total)
        ),
        ReplicaState::Refused => format!(
            "replica     refused: {}\n",
            r.message
                .as_deref()
                .unwrap_or("the tree does not fit the cache")
        ),
    }
}
