//! Helpers shared by the fleet simulator's integration tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diffusionx_fleet::SessionReport;
use diffusionx_testkit::{Collector, Received};

pub(crate) const FLEET: &str = "museum";
pub(crate) const WAIT: Duration = Duration::from_secs(20);
const PROBE: &[u8] = b"probe";

/// A persistent-session subscriber on every kiosk's sessions, returned once it is subscribed
/// (it received its own probe message).
pub(crate) async fn subscriber(port: u16, client_id: &str) -> Result<Collector> {
    let collector = Collector::start(port, client_id, &format!("kiosk/v1/{FLEET}/+/sessions"));
    let deadline = Instant::now() + WAIT;
    loop {
        collector
            .publish(
                &format!("kiosk/v1/{FLEET}/probe/sessions"),
                PROBE.to_vec(),
                false,
            )
            .await;
        let got = collector
            .wait(Duration::from_millis(500), |r| {
                r.iter().any(|m| m.payload == PROBE)
            })
            .await;
        if got.iter().any(|m| m.payload == PROBE) {
            return Ok(collector);
        }
        anyhow::ensure!(Instant::now() < deadline, "the subscriber never subscribed");
    }
}

/// Session report ids in arrival order (probes left out), and the messages that were not
/// session reports.
pub(crate) fn arrivals(received: &[Received]) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut malformed = 0;
    for message in received.iter().filter(|m| m.payload != PROBE) {
        match serde_json::from_slice::<SessionReport>(&message.payload) {
            Ok(report)
                if message
                    .topic
                    .ends_with(&format!("/{}/sessions", device(&report.id))) =>
            {
                ids.push(report.id)
            }
            _ => malformed += 1,
        }
    }
    (ids, malformed)
}

fn device(id: &str) -> &str {
    id.rsplitn(3, '-').nth(2).unwrap_or("")
}

/// Distinct ids and how many arrivals repeated one.
pub(crate) fn distinct(ids: &[String]) -> (BTreeSet<String>, usize) {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *count.entry(id).or_default() += 1;
    }
    let duplicates = count.values().map(|n| n - 1).sum();
    (count.into_keys().map(String::from).collect(), duplicates)
}

/// The ids of the reports in an outbox folder (torn `.tmp` files left out).
pub(crate) fn outbox_ids(dir: &Path) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(ids);
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let report: SessionReport = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is a session report", path.display()))?;
            ids.insert(report.id);
        }
    }
    Ok(ids)
}

/// Polls `done` every 20 ms until it holds or `WAIT` passes.
pub(crate) async fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
