//! Kiosks whose disk is full: reports are not durable (`report()` says so and the write errors
//! are counted), are written once space is free again, and arrive exactly once.
//!
//! The state folder is a 256 KiB tmpfs filled to the last byte; mounting it needs root or
//! CAP_SYS_ADMIN (the test says so when it is refused).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{FLEET, WAIT, arrivals, distinct, outbox_ids, subscriber, wait_until};
use diffusionx_fleet::Telemetry;
use diffusionx_fleetsim::fleet::{FleetConfig, start_agents};
use diffusionx_fleetsim::synth::Sessions;
use diffusionx_testkit::{Collector, Mosquitto};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        anyhow::ensure!(
            output.status.success(),
            "this test mounts a tiny tmpfs to fill it and needs root or CAP_SYS_ADMIN: mount \
             said {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(Tmpfs(dir.into()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        Command::new("umount").arg("-l").arg(&self.0).status().ok();
    }
}

/// Writes a filler file until the disk is full; returns the error that stopped it.
fn fill(path: &Path) -> Result<std::io::Error> {
    let mut file = std::fs::File::create(path)?;
    let block = [0x55u8; 4096];
    for _ in 0..1_000 {
        if let Err(error) = file.write_all(&block).and_then(|()| file.sync_all()) {
            return Ok(error);
        }
    }
    anyhow::bail!("4 MB written to a 256 KiB tmpfs without an error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_made_while_the_disk_is_full_reach_it_later_and_arrive_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let tmpfs = Tmpfs::mount(&state, "256k")?;
    let mut broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = subscriber(broker.port(), "watcher").await?;
    broker.stop()?;

    let config = FleetConfig {
        broker: broker.url(),
        fleet: FLEET.into(),
        kiosks: 2,
        state: state.clone(),
        sync: true,
        // The outbox retries failed writes at every telemetry tick.
        telemetry_interval_s: 5,
        ..FleetConfig::default()
    };
    let agents = start_agents(&config)?;
    let error = fill(&state.join("filler"))?;
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");

    let mut expected = BTreeSet::new();
    for (device, agent) in &agents {
        let mut sessions = Sessions::new(device, agent.boot(), 7);
        for n in 1..=3 {
            let report = sessions.next_report(1_700_000_000_000 + n);
            assert!(!agent.report(&report), "{} cannot be durable", report.id);
            expected.insert(report.id);
        }
        let status = agent.status();
        assert_eq!((status.write_errors, status.outbox_pending), (3, 3));
    }
    let outboxes: Vec<PathBuf> = agents
        .iter()
        .map(|(device, _)| state.join(device).join("outbox"))
        .collect();
    let on_disk = || -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for outbox in &outboxes {
            ids.extend(outbox_ids(outbox)?);
        }
        Ok(ids)
    };
    assert!(on_disk()?.is_empty(), "nothing reached the full disk");

    // Space again: the next telemetry tick writes them (broker still down).
    std::fs::remove_file(state.join("filler"))?;
    wait_until("the reports to be written", || Ok(on_disk()? == expected)).await?;

    broker.restart()?;
    let got = watcher
        .wait(WAIT, |r| distinct(&arrivals(r).0).0.is_superset(&expected))
        .await;
    let (arrived, malformed) = arrivals(&got);
    let (seen, duplicates) = distinct(&arrived);
    assert_eq!(seen, expected, "{}", broker.log());
    assert_eq!((duplicates, malformed), (0, 0));
    wait_until("empty outboxes", || {
        Ok(agents.iter().all(|(_, a)| a.status().outbox_pending == 0) && on_disk()?.is_empty())
    })
    .await?;

    // Telemetry tells operators about the failed writes (its retained sample per kiosk).
    let telemetry = Collector::start(
        broker.port(),
        "telemetry",
        &format!("kiosk/v1/{FLEET}/+/telemetry"),
    );
    let got = telemetry
        .wait(WAIT, |r| {
            r.iter()
                .map(|m| m.topic.clone())
                .collect::<BTreeSet<_>>()
                .len()
                == 2
        })
        .await;
    let write_errors: Vec<u64> = got
        .iter()
        .map(|m| serde_json::from_slice::<Telemetry>(&m.payload).map(|t| t.outbox_write_errors))
        .collect::<Result<_, _>>()?;
    assert_eq!(write_errors, [3, 3]);

    for (_, agent) in agents {
        agent.shutdown("test over", Duration::from_secs(5)).await;
    }
    drop(tmpfs);
    Ok(())
}
