//! The `fleetsim` binary killed with SIGKILL between writing reports and publishing them, then
//! started again on the same state folder: every report it said was committed (on disk)
//! arrives, once, before the new boot's reports.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{FLEET, WAIT, arrivals, distinct, outbox_ids, subscriber, wait_until};
use diffusionx_fleet::SessionReport;
use diffusionx_testkit::Mosquitto;

/// Starts `fleetsim run` for kiosk `sim-0001` with `--print-committed`.
fn fleetsim(url: &str, dir: &Path, sessions: u64, interval_ms: u64, log: &str) -> Result<Child> {
    let log = std::fs::File::create(dir.join(log))?;
    Command::new(env!("CARGO_BIN_EXE_fleetsim"))
        .args(["run", "--broker", url, "--fleet", FLEET, "--kiosks", "1"])
        .args(["--sessions", &sessions.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()])
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--print-committed", "--telemetry-s", "3600"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting fleetsim")
}

/// `(device, boot, number)` of a well-formed id `{device}-{boot}-{number}`.
fn parse_id(id: &str) -> Option<(String, u64, u64)> {
    let mut parts = id.rsplitn(3, '-');
    let number = parts.next()?.parse().ok()?;
    let boot = parts.next()?.parse().ok()?;
    let device = parts.next()?;
    (device.starts_with("sim-") && device.len() == 8 && number >= 1 && boot >= 1)
        .then(|| (device.to_string(), boot, number))
}

/// `sim-0001-{boot}-{n}` for `n` in `numbers`.
fn ids(boot: u64, numbers: std::ops::RangeInclusive<u64>) -> BTreeSet<String> {
    numbers
        .map(|n| SessionReport::make_id("sim-0001", boot, n))
        .collect()
}

/// Reads `committed` lines until `count` arrived, SIGKILLs the child, then reads what was
/// still in the pipe: returns every committed id, in order.
/// Kills `child` once it has printed `count` committed lines and `ready` holds (checked while
/// it keeps writing).
fn kill_after(mut child: Child, count: usize, ready: impl Fn() -> bool) -> Result<Vec<String>> {
    let stdout = child.stdout.take().context("stdout")?;
    let (lines, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut committed = Vec::new();
    while committed.len() < count || !ready() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not ready after {} committed lines",
            committed.len()
        );
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(line) => committed.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("fleetsim ended after {} committed lines", committed.len())
            }
        }
    }
    child.kill()?;
    child.wait()?;
    reader.join().ok();
    committed.extend(rx.try_iter());
    committed
        .iter()
        .map(|line| {
            line.strip_prefix("committed ")
                .map(String::from)
                .with_context(|| format!("unexpected line {line:?}"))
        })
        .collect()
}

/// Waits for a child to exit successfully.
async fn finished(mut child: Child) -> Result<()> {
    let mut status = None;
    wait_until("fleetsim to finish", || {
        status = child.try_wait()?;
        Ok(status.is_some())
    })
    .await?;
    let status = status.context("exited")?;
    anyhow::ensure!(status.success(), "fleetsim exited with {status}");
    Ok(())
}

fn boot_counter(dir: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(dir.join("state/sim-0001/boot"))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_committed_before_a_sigkill_are_replayed_once_after_the_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = subscriber(broker.port(), "watcher").await?;
    // The broker is down: reports pile up in the outbox, none is in flight.
    broker.stop()?;
    let child = fleetsim(&broker.url(), dir.path(), 100_000, 10, "first.log")?;
    let committed = kill_after(child, 8, || true)?;
    assert!(committed.len() >= 8);
    assert_eq!(boot_counter(dir.path())?, "1");
    let outbox = dir.path().join("state/sim-0001/outbox");
    let on_disk = outbox_ids(&outbox)?;
    let committed_set: BTreeSet<String> = committed.iter().cloned().collect();
    assert!(on_disk.len() >= 8, "{} files in the outbox", on_disk.len());
    assert!(
        committed_set.is_subset(&on_disk),
        "every committed report is on disk"
    );
    // At most the one written but not yet printed when the kill landed.
    assert!(on_disk.len() - committed_set.len() <= 1);
    assert_eq!(on_disk, ids(1, 1..=on_disk.len() as u64), "no gaps");

    broker.restart()?;
    finished(fleetsim(&broker.url(), dir.path(), 3, 10, "second.log")?).await?;
    assert_eq!(boot_counter(dir.path())?, "2");
    assert!(outbox_ids(&outbox)?.is_empty(), "everything acknowledged");

    let mut expected = on_disk.clone();
    expected.extend(ids(2, 1..=3));
    let got = watcher
        .wait(WAIT, |r| distinct(&arrivals(r).0).0.is_superset(&expected))
        .await;
    let (arrived, malformed) = arrivals(&got);
    let (seen, duplicates) = distinct(&arrived);
    assert_eq!(seen, expected, "{}", broker.log());
    assert_eq!((duplicates, malformed), (0, 0));
    // The old boot's outbox went first, in order, then the new boot's reports.
    let order: Vec<(u64, u64)> = arrived
        .iter()
        .map(|id| {
            parse_id(id)
                .map(|(_, boot, n)| (boot, n))
                .context(id.clone())
        })
        .collect::<Result<_>>()?;
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_publishing_loses_nothing_and_duplicates_at_most_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = subscriber(broker.port(), "watcher").await?;
    let child = fleetsim(&broker.url(), dir.path(), 100_000, 2, "first.log")?;
    // Kill once the watcher has seen reports arrive, so the kill lands mid-stream: the agent
    // sends a report only after the PUBACK of the one before, so five arrivals mean at least
    // four reports acknowledged and gone from the outbox.
    let committed = kill_after(child, 40, || arrivals(&watcher.received()).0.len() >= 5)?;
    let outbox = dir.path().join("state/sim-0001/outbox");
    let on_disk = outbox_ids(&outbox)?;
    let mut written: BTreeSet<String> = committed.iter().cloned().collect();
    written.extend(on_disk.iter().cloned());
    assert!(
        on_disk.len() < written.len(),
        "the kill landed while reports were being acknowledged"
    );

    finished(fleetsim(&broker.url(), dir.path(), 2, 10, "second.log")?).await?;
    assert_eq!(boot_counter(dir.path())?, "2");
    assert!(outbox_ids(&outbox)?.is_empty(), "everything acknowledged");

    let mut expected = written.clone();
    expected.extend(ids(2, 1..=2));
    let got = watcher
        .wait(WAIT, |r| distinct(&arrivals(r).0).0.is_superset(&expected))
        .await;
    let (arrived, malformed) = arrivals(&got);
    let (seen, duplicates) = distinct(&arrived);
    assert!(
        seen.is_superset(&expected),
        "missing: {:?}",
        expected.difference(&seen).collect::<Vec<_>>()
    );
    // Anything else that arrived was written by boot 1 (before the kill) and never printed:
    // at most the one report between its write and its line.
    let extra: Vec<&String> = seen.difference(&expected).collect();
    assert!(extra.len() <= 1, "{extra:?}");
    for id in &seen {
        let (device, boot, _) = parse_id(id).with_context(|| format!("malformed id {id}"))?;
        assert_eq!(device, "sim-0001");
        assert!(boot == 1 || boot == 2, "{id}");
    }
    assert_eq!(malformed, 0);
    assert!(duplicates <= 1, "{duplicates} duplicates");
    Ok(())
}
