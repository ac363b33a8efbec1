//! The guest harness itself: exit statuses, results, steps, failure
//! reports and the hard timeout (see `imz_integration::guest`).

use std::time::{Duration, Instant};

use imz_integration::Fixture;
use imz_integration::guest::{self, GuestBuilder};

#[test]
fn guest_reports_status_results_steps_and_times_out_hard() -> anyhow::Result<()> {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        std::fs::write(root.join("hello.txt"), "hello\n")?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;

    // Results, a step with a reply, and a failing exit status.
    let mut g = GuestBuilder::new(&printed, &[])?
        .script(
            "kv hello \"$(cat hello.txt)\"\nkv quoted \"$QUOTED\"\nstep ask\nkv reply \"$REPLY_TEXT\"\nexit 3\n",
        )
        .env("QUOTED", "it's $quoted")
        .boot()?;
    g.wait_step("ask")?;
    g.resume("over and out")?;
    let run = g.finish()?;
    assert_eq!(run.status, 3);
    assert_eq!(run.kv("hello"), Some("hello"));
    assert_eq!(run.kv("reply"), Some("over and out"));
    assert_eq!(run.kv("quoted"), Some("it's $quoted"));
    assert!(run.mount_time.is_some());
    let err = format!("{:#}", run.ok().err().expect("exit 3 is a failure"));
    assert!(err.contains("guest exit status 3") && err.contains("@@IMZ:KV hello=hello"));

    // A guest that never finishes is stopped at the hard limit, and the
    // error says so and carries the console.
    let start = Instant::now();
    let g = GuestBuilder::new(&printed, &[])?
        .script("echo waiting forever\nsleep 100000\n")
        .timeout(Duration::from_secs(15))
        .boot()?;
    let err = format!(
        "{:#}",
        g.finish().err().expect("a hanging guest is an error")
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("waiting forever"), "{err}");
    assert!(err.contains("guest console"), "{err}");
    Ok(())
}
