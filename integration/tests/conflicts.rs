//! Conflicts under every policy: the gateway changes files while the origin
//! is down, the origin's directory is changed meanwhile by another program,
//! and when the origin returns the policy decides, losing nothing.

use std::path::Path;
use std::time::Duration;

use imz_integration::Fixture;
use imz_integration::gateway::eventually;
use imz_integration::nfs::{Nfs, Stable};

type Result = anyhow::Result<()>;

const OURS: &[u8] = b"ours: written at the gateway";
const THEIRS: &[u8] = b"theirs: written at the origin";

/// Sets up every conflict case and returns once the origin is back.
async fn make_conflicts(policy: &str) -> anyhow::Result<Fixture> {
    let mut fx = Fixture::with_cache_size(
        "1GiB",
        &["--reintegrate-delay", "100ms", "--conflict-policy", policy],
        |root| {
            std::fs::write(root.join("shared.txt"), "v1")?;
            std::fs::write(root.join("removed-by-us.txt"), "v1")?;
            std::fs::write(root.join("removed-by-them.txt"), "v1")?;
            std::fs::write(root.join("moved-by-us.txt"), "v1")?;
            std::fs::write(root.join("renamed-by-them.txt"), "v1")?;
            std::fs::create_dir(root.join("doomed"))?;
            std::fs::write(root.join("doomed/old.txt"), "v1")?;
            Ok(())
        },
    )?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    for f in [
        "shared.txt",
        "removed-by-us.txt",
        "removed-by-them.txt",
        "moved-by-us.txt",
        "renamed-by-them.txt",
        "doomed/old.txt",
    ] {
        nfs.read_path(f).await?;
    }
    let doomed = nfs.lookup_path("doomed").await?;
    nfs.readdir(&doomed, 4096).await?;

    fx.origin.proc.kill9();
    // The gateway's side, disconnected.
    let shared = nfs.lookup_path("shared.txt").await?;
    nfs.setattr(
        &shared,
        &imz_integration::nfs::Attrs {
            size: Some(0),
            ..Default::default()
        },
    )
    .await?;
    nfs.write(&shared, 0, OURS, Stable::FILE_SYNC).await?;
    nfs.remove(&root, "removed-by-us.txt").await?;
    let them = nfs.lookup_path("removed-by-them.txt").await?;
    nfs.write(&them, 0, OURS, Stable::FILE_SYNC).await?;
    nfs.put_file("both.txt", OURS).await?;
    nfs.put_file("doomed/new.txt", OURS).await?;
    // Moved, then changed (the move is logged first).
    nfs.rename(&root, "moved-by-us.txt", &root, "moved-here.txt")
        .await?;
    nfs.put_file("moved-here.txt", OURS).await?;
    nfs.put_file("renamed-by-them.txt", OURS).await?;

    // The origin's side, changed by another program meanwhile.
    let r = &fx.root;
    std::fs::write(r.join("shared.txt"), THEIRS)?;
    std::fs::write(r.join("removed-by-us.txt"), THEIRS)?;
    std::fs::remove_file(r.join("removed-by-them.txt"))?;
    std::fs::write(r.join("both.txt"), THEIRS)?;
    std::fs::write(r.join("moved-by-us.txt"), THEIRS)?;
    std::fs::remove_dir_all(r.join("doomed"))?;
    std::fs::rename(r.join("renamed-by-them.txt"), r.join("renamed-there.txt"))?;

    fx.origin.restart()?;
    Ok(fx)
}

fn read(fx: &Fixture, rel: &str) -> Option<Vec<u8>> {
    std::fs::read(fx.origin_path(rel)).ok()
}

/// Waits until `check` holds for the origin's directory.
fn settle(fx: &Fixture, what: &str, check: impl Fn(&Fixture) -> bool) -> Result {
    eventually(Duration::from_secs(30), || check(fx).then_some(()))
        .map(|_| ())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "origin never reached: {what}; conflicts: {:?}",
                fx.gateway.ctl(&["conflicts", "list"])
            )
        })
}

/// The conflict copies of `name` at the origin.
fn copies(fx: &Fixture, dir: &str, name: &str) -> Vec<Vec<u8>> {
    let prefix = format!("{name}.conflict-");
    std::fs::read_dir(fx.origin_path(dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Theirs holds the name `name` at the origin's root, and ours is beside
/// it as the one conflict copy.
fn theirs_named_ours_beside(fx: &Fixture, name: &str) -> bool {
    read(fx, name).as_deref() == Some(THEIRS) && copies(fx, "", name) == vec![OURS.to_vec()]
}

/// Changed here, only renamed there: no conflict under any policy; ours
/// is at the new name, and no copy of it anywhere.
fn ours_where_they_renamed_it(fx: &Fixture) -> bool {
    read(fx, "renamed-there.txt").as_deref() == Some(OURS)
        && read(fx, "renamed-by-them.txt").is_none()
        && copies(fx, "", "renamed-there.txt").is_empty()
        && copies(fx, "", "renamed-by-them.txt").is_empty()
}

fn saved_copies(fx: &Fixture) -> Vec<Vec<u8>> {
    let dir = fx.gateway.cache_dir.join("conflicts");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_both_keeps_both_versions() -> Result {
    let fx = make_conflicts("keep-both").await?;
    settle(
        &fx,
        "update/update: theirs at the name, ours beside it",
        |fx| theirs_named_ours_beside(fx, "shared.txt"),
    )?;
    settle(
        &fx,
        "create/create: theirs at the name, ours beside it",
        |fx| theirs_named_ours_beside(fx, "both.txt"),
    )?;
    settle(&fx, "remove/update: their change survives", |fx| {
        read(fx, "removed-by-us.txt").as_deref() == Some(THEIRS)
    })?;
    settle(&fx, "update/remove: ours comes back", |fx| {
        read(fx, "removed-by-them.txt").as_deref() == Some(OURS)
    })?;
    settle(&fx, "new file in a removed directory lands", |fx| {
        read(fx, "doomed/new.txt").as_deref() == Some(OURS)
    })?;
    settle(
        &fx,
        "moved and changed here, changed there: theirs moved, ours beside it",
        |fx| {
            theirs_named_ours_beside(fx, "moved-here.txt") && read(fx, "moved-by-us.txt").is_none()
        },
    )?;
    settle(
        &fx,
        "changed here, renamed there: ours at their name",
        ours_where_they_renamed_it,
    )?;
    let listed = fx.gateway.ctl(&["conflicts", "list"])?;
    for case in [
        "update/update",
        "create/create",
        "remove/update",
        "update/remove",
        "create/remove-parent",
    ] {
        assert!(listed.contains(case), "{case} not listed:\n{listed}");
    }
    // The gateway's own view agrees with the origin's.
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let seen = eventually(Duration::from_secs(10), || {
        let got = block(nfs.read_path("shared.txt")).ok()?;
        (got == THEIRS).then_some(())
    });
    assert!(
        seen.is_some(),
        "gateway still shows its own version at the name"
    );
    let moved = eventually(Duration::from_secs(10), || {
        let got = block(nfs.read_path("renamed-there.txt")).ok()?;
        let old = block(nfs.lookup_path("renamed-by-them.txt"));
        (got == OURS && old.is_err()).then_some(())
    });
    assert!(
        moved.is_some(),
        "gateway does not show the renamed file where the origin has it"
    );
    let listed = fx.gateway.ctl(&["conflicts", "list"])?;
    assert!(
        !listed.contains("/renamed-"),
        "a rename alone made a conflict:\n{listed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_wins_overwrites_the_origin() -> Result {
    let fx = make_conflicts("gateway-wins").await?;
    settle(&fx, "all ours", |fx| {
        read(fx, "shared.txt").as_deref() == Some(OURS)
            && read(fx, "both.txt").as_deref() == Some(OURS)
            && read(fx, "removed-by-them.txt").as_deref() == Some(OURS)
            && read(fx, "doomed/new.txt").as_deref() == Some(OURS)
            && read(fx, "removed-by-us.txt").is_none()
            && read(fx, "moved-here.txt").as_deref() == Some(OURS)
            && read(fx, "moved-by-us.txt").is_none()
            && ours_where_they_renamed_it(fx)
    })?;
    assert!(copies(&fx, "", "moved-here.txt").is_empty());
    assert!(copies(&fx, "", "shared.txt").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_wins_keeps_ours_in_the_conflicts_area() -> Result {
    let fx = make_conflicts("origin-wins").await?;
    settle(&fx, "all theirs", |fx| {
        read(fx, "shared.txt").as_deref() == Some(THEIRS)
            && read(fx, "both.txt").as_deref() == Some(THEIRS)
            && read(fx, "removed-by-us.txt").as_deref() == Some(THEIRS)
            && read(fx, "removed-by-them.txt").is_none()
            && !fx.origin_path("doomed").exists()
            && read(fx, "moved-here.txt").as_deref() == Some(THEIRS)
            && read(fx, "moved-by-us.txt").is_none()
            && ours_where_they_renamed_it(fx)
    })?;
    // Nothing of ours is lost: each version sits in the conflicts area.
    let saved = eventually(Duration::from_secs(10), || {
        let s = saved_copies(&fx);
        (s.iter().filter(|c| c.as_slice() == OURS).count() >= 5).then_some(s)
    });
    assert!(
        saved.is_some(),
        "saved copies: {:?}; conflicts: {:?}",
        saved_copies(&fx)
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>(),
        fx.gateway.ctl(&["conflicts", "list"])
    );
    assert!(copies(&fx, "", "shared.txt").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_holds_until_a_person_decides() -> Result {
    let fx = make_conflicts("manual").await?;
    // Held: sync says why, the origin keeps its versions.
    let held = eventually(Duration::from_secs(30), || {
        let list = fx.gateway.ctl(&["conflicts", "list"]).ok()?;
        (list.matches("HELD").count() >= 3).then_some(list)
    })
    .ok_or_else(|| anyhow::anyhow!("conflicts never held"))?
    .0;
    let err = fx
        .gateway
        .ctl(&["sync", "--timeout", "5s"])
        .expect_err("sync with held conflicts");
    assert!(err.to_string().contains("held"), "{err}");
    assert_eq!(read(&fx, "shared.txt").as_deref(), Some(THEIRS));
    assert!(held.contains("/shared.txt"), "{held}");

    fx.gateway
        .ctl(&["conflicts", "resolve", "/shared.txt", "--keep", "mine"])?;
    fx.gateway
        .ctl(&["conflicts", "resolve", "/both.txt", "--keep", "both"])?;
    fx.gateway.ctl(&[
        "conflicts",
        "resolve",
        "/removed-by-them.txt",
        "--keep",
        "theirs",
    ])?;
    settle(&fx, "decisions applied", |fx| {
        read(fx, "shared.txt").as_deref() == Some(OURS)
            && theirs_named_ours_beside(fx, "both.txt")
            && read(fx, "removed-by-them.txt").is_none()
            && ours_where_they_renamed_it(fx)
    })?;
    let _ = Path::new("");
    Ok(())
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A name the origin's directory holds as a FIFO (or a socket, a device
/// node), which imz does not serve and so no gateway sees: a file created
/// under it through a gateway cannot land. It is held for a person at once,
/// saying why, and the changes after it still reach the origin. Before, the
/// gateway retried it once a second until its refusal limit, holding every
/// later change behind it, then held it as a "create/create" conflict with
/// no reason given (there was no origin object to show).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_by_something_not_served_is_held_and_the_rest_goes_on() -> Result {
    // keep-both, the default (manual held it at once before too).
    let args = [
        "--reintegrate-delay",
        "100ms",
        "--conflict-policy",
        "keep-both",
    ];
    let fx = Fixture::with_cache_size("1GiB", &args, |root| {
        let status = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status()?;
        anyhow::ensure!(status.success(), "mkfifo failed");
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    assert!(
        nfs.readdir(&root, 4096).await?.is_empty(),
        "a FIFO was served"
    );
    nfs.put_file("pipe", OURS).await?;
    nfs.put_file("after.txt", OURS).await?;
    let landed = eventually(Duration::from_secs(20), || {
        (read(&fx, "after.txt").as_deref() == Some(OURS)).then_some(())
    });
    assert!(
        landed.is_some(),
        "the change after the refused one never reached the origin"
    );
    let listed = eventually(Duration::from_secs(10), || {
        let list = fx.gateway.ctl(&["conflicts", "list"]).ok()?;
        (list.contains("/pipe") && list.contains("HELD") && list.contains("does not serve"))
            .then_some(list)
    });
    assert!(
        listed.is_some(),
        "no held conflict saying why: {:?}",
        fx.gateway.ctl(&["conflicts", "list"])
    );
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(fx.origin_path("pipe"))?.file_type();
    assert!(kind.is_fifo(), "the origin's FIFO was replaced");
    // Ours is still readable through the gateway, nothing lost.
    assert_eq!(nfs.read_path("pipe").await?, OURS);
    Ok(())
}

/// A long backlog goes to the origin in several requests (the reintegrator
/// sends a batch in parts while the next part's content uploads): files in
/// a directory made offline name it by the key of its creation, across
/// those requests, and a conflict deep in the backlog stops it there, is
/// settled, and what follows it still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_deep_in_a_long_backlog_is_settled_and_the_rest_follows() -> Result {
    let mut fx = Fixture::with_cache_size(
        "1GiB",
        &[
            "--reintegrate-delay",
            "100ms",
            "--conflict-policy",
            "keep-both",
        ],
        |root| Ok(std::fs::write(root.join("shared.txt"), "v1")?),
    )?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    nfs.read_path("shared.txt").await?;

    fx.origin.proc.kill9();
    let many = nfs.mkdir(&root, "many").await?;
    make_files(&mut nfs, &many, 0..300).await?;
    let shared = nfs.lookup_path("shared.txt").await?;
    nfs.write(&shared, 0, OURS, Stable::FILE_SYNC).await?;
    make_files(&mut nfs, &many, 300..350).await?;
    std::fs::write(fx.root.join("shared.txt"), THEIRS)?;
    fx.origin.restart()?;

    settle(&fx, "every file of the backlog at the origin", |fx| {
        (0..350).all(|i| read(fx, &format!("many/f{i:03}")) == Some(backlog_body(i)))
    })?;
    settle(
        &fx,
        "update/update: theirs at the name, ours beside it",
        |fx| theirs_named_ours_beside(fx, "shared.txt"),
    )?;
    let names = std::fs::read_dir(fx.origin_path("many"))?.count();
    assert_eq!(names, 350, "strays or duplicates in the directory");
    Ok(())
}

fn backlog_body(i: usize) -> Vec<u8> {
    format!("file {i} of the backlog").into_bytes()
}

/// Files `f000`... numbered `range` in `dir`, each with its `backlog_body`.
async fn make_files(
    nfs: &mut Nfs,
    dir: &nfs3_client::nfs3_types::nfs3::nfs_fh3,
    range: std::ops::Range<usize>,
) -> Result {
    let attrs = imz_integration::nfs::Attrs {
        size: Some(0),
        ..Default::default()
    };
    for i in range {
        let name = format!("f{i:03}");
        let fh = nfs
            .create(
                dir,
                &name,
                imz_integration::nfs::CreateMode::Unchecked,
                &attrs,
            )
            .await?;
        nfs.write_all(&fh, &backlog_body(i)).await?;
    }
    Ok(())
}
