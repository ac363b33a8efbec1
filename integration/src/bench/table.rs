//! The table every benchmark prints: one row per workload, imz against a
//! peer, with the ratio and the target.

/// One workload's medians.
pub struct Row {
    pub name: &'static str,
    pub unit: &'static str,
    pub imz: Option<f64>,
    pub peer: Option<f64>,
    pub peer_name: &'static str,
    /// imz/peer for throughput; peer/imz for times and for RSS vs its bound.
    pub ratio: Option<f64>,
    pub target: Option<f64>,
}

impl Row {
    /// A throughput row (higher is better): ratio imz/peer.
    pub fn throughput(
        name: &'static str,
        unit: &'static str,
        imz: Option<f64>,
        peer: Option<f64>,
        peer_name: &'static str,
        target: Option<f64>,
    ) -> Self {
        Self {
            name,
            unit,
            imz,
            peer,
            peer_name,
            ratio: imz.zip(peer).map(|(a, b)| a / b),
            target,
        }
    }
}

/// One decimal, or `-`.
pub fn f1(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

/// Two decimals, or `-`.
pub fn f2(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

/// Prints `title` and the rows; `met` says whether the ratio reaches the
/// target (a row whose target is absolute has the bound as its peer).
pub fn print_table(title: &str, rows: &[Row]) {
    println!();
    println!("{title}");
    println!(
        "{:<34} {:>6} {:>9} {:>9} {:<8} {:>7} {:>7} {:>4}",
        "workload", "unit", "imz", "peer", "(peer)", "ratio", "target", "met"
    );
    for r in rows {
        let met = match (r.ratio, r.target) {
            (Some(ratio), Some(t)) if ratio >= t => "yes",
            (Some(_), Some(_)) => "NO",
            _ => "",
        };
        println!(
            "{:<34} {:>6} {:>9} {:>9} {:<8} {:>7} {:>7} {:>4}",
            r.name,
            r.unit,
            f1(r.imz),
            f1(r.peer),
            r.peer_name,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            r.target.map_or("-".into(), |x| format!(">={x:.1}x")),
            met
        );
    }
}

/// The machine's load around a run, and the caveat that goes with it.
pub fn print_load(before: &str, after: &str, at_round_starts: &[f64]) {
    println!(
        "load average before: {before}; after: {after}; 1-min at round starts (includes this bench): {}",
        at_round_starts
            .iter()
            .map(|l| format!("{l:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "2 cores shared with other work: compare ratios within a run, not absolute numbers across runs"
    );
    if let Some(note) = free_page_reporting() {
        println!("{note}");
    }
}

/// A note when this machine is a VM that hands freed memory back to its
/// host at once: then touching memory the guest freed earlier costs a
/// fault on the host (measured here: about 3 s per GiB, against 0.3 s
/// for memory still held), so any run that grows the page cache or the
/// heap pays for it, by luck of what was freed when. It is the main source
/// of the run-to-run swings of write and cold-read figures here, and why
/// benchmarks hold it off ([`super::PageReportingHold`]).
fn free_page_reporting() -> Option<String> {
    let dir = std::path::Path::new("/sys/module/page_reporting/parameters");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let reported_kib: u64 = read("reported_kib")?.trim().parse().ok()?;
    if reported_kib == 0 {
        return None;
    }
    let delay = read("min_free_ms").map_or_else(|| "?".into(), |v| v.trim().to_owned());
    if super::PageReportingHold::active() {
        let bitmap = read("free_bitmap_enable").map_or_else(|| "?".into(), |v| v.trim().to_owned());
        return Some(format!(
            "this VM returns freed memory to its host (free page reporting, {} GiB so far): \
             held off for this run (min_free_ms {delay}, free_bitmap_enable {bitmap}) and free \
             memory touched before each round, so that both servers meet memory the guest holds",
            reported_kib >> 20
        ));
    }
    Some(format!(
        "this VM returns freed memory to its host (free page reporting, {} GiB so far, \
         min_free_ms {delay}): memory first touched again costs a host fault, so figures \
         that grow the page cache swing from run to run",
        reported_kib >> 20
    ))
}
