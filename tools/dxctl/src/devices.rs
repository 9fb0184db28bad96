//! `dxctl devices`: the fleet's kiosks from their retained `status`, `info` and `telemetry`.
//!
//! [`Fleet`] folds messages in arrival order (pure, no clock); [`read`] subscribes and feeds it
//! until the retained messages stop arriving.

use std::collections::BTreeMap;
use std::time::Duration;

use diffusionx_fleet::topic::{self, Leaf, Topic};
use diffusionx_fleet::{Info, Presence, PresenceState, Telemetry};
use serde::Serialize;
use tokio::time::Instant;

use crate::broker::{DxError, Link};
use crate::table::{Table, age};

/// How long without a new message means the broker has sent every retained one.
pub const QUIET: Duration = Duration::from_millis(300);

/// What is known of one kiosk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceState {
    /// The presence in force (stale last wills ignored).
    pub presence: Option<Presence>,
    /// Birth facts.
    pub info: Option<Info>,
    /// The latest telemetry.
    pub telemetry: Option<Telemetry>,
}

/// The fleet as read so far: device -> state, plus what could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fleet {
    /// Device name -> what its messages say.
    pub devices: BTreeMap<String, DeviceState>,
    /// `topic: why` for each payload that did not parse (reported, never fatal).
    pub malformed: Vec<String>,
}

impl Fleet {
    /// Takes one message into account. A presence replaces the one in force unless it is
    /// from an older connection ([`Presence::is_newer_than`]): a last will that the broker
    /// delivers after the next connection's `online` must not mark the kiosk offline.
    pub fn apply(&mut self, topic: &Topic, payload: &[u8]) {
        let state = || DeviceState::default();
        let result = match &topic.leaf {
            Leaf::Status => serde_json::from_slice::<Presence>(payload).map(|presence| {
                let entry = self
                    .devices
                    .entry(topic.device.clone())
                    .or_insert_with(state);
                let stale = entry
                    .presence
                    .as_ref()
                    .is_some_and(|current| current.is_newer_than(&presence));
                if !stale {
                    entry.presence = Some(presence);
                }
            }),
            Leaf::Info => serde_json::from_slice::<Info>(payload).map(|info| {
                let entry = self
                    .devices
                    .entry(topic.device.clone())
                    .or_insert_with(state);
                entry.info = Some(info);
            }),
            Leaf::Telemetry => serde_json::from_slice::<Telemetry>(payload).map(|t| {
                let entry = self
                    .devices
                    .entry(topic.device.clone())
                    .or_insert_with(state);
                let older = entry
                    .telemetry
                    .as_ref()
                    .is_some_and(|current| (current.boot, current.seq) > (t.boot, t.seq));
                if !older {
                    entry.telemetry = Some(t);
                }
            }),
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.malformed.push(format!("{topic}: {e}"));
        }
    }

    /// One row per device, sorted by name.
    pub fn rows(&self) -> Vec<DeviceRow> {
        self.devices
            .iter()
            .map(|(name, state)| DeviceRow::of(name, state))
            .collect()
    }
}

/// Online, offline or never heard of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Its status says online.
    Online,
    /// Its status says offline.
    Offline,
    /// No status (only info or telemetry were retained).
    Unknown,
}

/// One line of `dxctl devices`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    /// The device name.
    pub device: String,
    /// Online or offline.
    pub state: Liveness,
    /// Why it is offline (`connection lost` for a last will).
    pub reason: Option<String>,
    /// The latest `ts_ms` of its status and telemetry.
    pub last_seen_ms: Option<u64>,
    /// Its boot counter (the highest its messages carry).
    pub boot: Option<u64>,
    /// Firmware version.
    pub firmware: Option<String>,
    /// The edge model as `name/precision`.
    pub edge_model: Option<String>,
    /// Session reports waiting in its outbox.
    pub outbox_pending: Option<u64>,
    /// Outbox writes that failed since the kiosk started (the reports waited in memory).
    pub outbox_write_errors: Option<u64>,
    /// Session reports the kiosk gave up since it started (telemetry's `outbox_lost`).
    pub outbox_lost: Option<u64>,
}

impl DeviceRow {
    /// The row of one device.
    pub fn of(device: &str, state: &DeviceState) -> DeviceRow {
        let presence = state.presence.as_ref();
        let telemetry = state.telemetry.as_ref();
        let info = state.info.as_ref();
        let edge = info.and_then(|i| i.models.iter().find(|m| m.role == "edge"));
        DeviceRow {
            device: device.into(),
            state: match presence.map(|p| p.state) {
                Some(PresenceState::Online) => Liveness::Online,
                Some(PresenceState::Offline) => Liveness::Offline,
                None => Liveness::Unknown,
            },
            reason: presence
                .filter(|p| p.state == PresenceState::Offline)
                .and_then(|p| p.reason.clone()),
            last_seen_ms: [presence.map(|p| p.ts_ms), telemetry.map(|t| t.ts_ms)]
                .into_iter()
                .flatten()
                .max(),
            boot: [
                presence.map(|p| p.boot),
                telemetry.map(|t| t.boot),
                info.map(|i| i.boot),
            ]
            .into_iter()
            .flatten()
            .max(),
            firmware: info.map(|i| i.firmware.clone()),
            edge_model: edge.map(|m| match &m.precision {
                Some(precision) => format!("{}/{precision}", m.name),
                None => m.name.clone(),
            }),
            outbox_pending: telemetry.map(|t| t.outbox_pending),
            outbox_write_errors: telemetry.map(|t| t.outbox_write_errors),
            outbox_lost: telemetry.map(|t| t.outbox_lost),
        }
    }
}

/// The table people read; ages are relative to `now_ms` (Unix ms).
pub fn table(rows: &[DeviceRow], now_ms: u64) -> Table {
    let mut table = Table::new(&[
        "DEVICE",
        "STATE",
        "LAST SEEN",
        "BOOT",
        "FIRMWARE",
        "EDGE MODEL",
        "OUTBOX",
    ]);
    for row in rows {
        let state = match (&row.state, &row.reason) {
            (Liveness::Offline, Some(reason)) => format!("offline ({reason})"),
            (state, _) => format!("{state:?}").to_lowercase(),
        };
        table.push(vec![
            row.device.clone(),
            state,
            row.last_seen_ms.map_or("-".into(), |ts| age(now_ms, ts)),
            opt(row.boot),
            row.firmware.clone().unwrap_or_else(|| "-".into()),
            row.edge_model.clone().unwrap_or_else(|| "-".into()),
            outbox(row),
        ]);
    }
    table
}

/// Reports waiting, and what went wrong with the outbox if anything did: `3 (2 write errors,
/// 1 lost)`.
fn outbox(row: &DeviceRow) -> String {
    let trouble: Vec<String> = [
        (row.outbox_write_errors, "write errors"),
        (row.outbox_lost, "lost"),
    ]
    .into_iter()
    .filter_map(|(n, what)| n.filter(|&n| n > 0).map(|n| format!("{n} {what}")))
    .collect();
    match trouble.is_empty() {
        true => opt(row.outbox_pending),
        false => format!("{} ({})", opt(row.outbox_pending), trouble.join(", ")),
    }
}

fn opt(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

/// Subscribes to the fleet's `status`, `info` and `telemetry` (optionally one device's).
/// Call [`collect`] next.
pub async fn subscribe(link: &mut Link, fleet: &str, device: Option<&str>) -> Result<(), DxError> {
    topic::check_name("fleet", fleet)?;
    if let Some(device) = device {
        topic::check_name("device", device)?;
    }
    let filters = ["status", "info", "telemetry"]
        .map(|leaf| topic::filter(Some(fleet), device, leaf))
        .to_vec();
    link.subscribe(&filters).await
}

/// Folds what arrives until nothing has for [`QUIET`] or the link's timeout passes.
pub async fn collect(link: &mut Link) -> Result<Fleet, DxError> {
    let deadline = Instant::now() + link.timeout();
    let mut fleet = Fleet::default();
    for publish in link.collect_quiet(QUIET, deadline).await? {
        let name = String::from_utf8_lossy(&publish.topic);
        if let Ok(topic) = Topic::parse(&name) {
            fleet.apply(&topic, &publish.payload);
        }
    }
    Ok(fleet)
}

/// [`subscribe`] then [`collect`].
pub async fn read(link: &mut Link, fleet: &str) -> Result<Fleet, DxError> {
    subscribe(link, fleet, None).await?;
    collect(link).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(fleet: &mut Fleet, device: &str, body: serde_json::Value) {
        let topic = Topic::new("m", device, Leaf::Status).expect("valid");
        fleet.apply(&topic, body.to_string().as_bytes());
    }

    #[test]
    fn a_stale_will_after_an_online_is_ignored_but_a_clean_offline_is_not() {
        let mut fleet = Fleet::default();
        status(
            &mut fleet,
            "k1",
            json!({"state": "online", "boot": 5, "conn": 1, "ts_ms": 2000}),
        );
        status(
            &mut fleet,
            "k1",
            json!({"state": "offline", "boot": 4, "conn": 9, "ts_ms": 1000,
                   "reason": "connection lost"}),
        );
        let rows = fleet.rows();
        assert_eq!(rows[0].state, Liveness::Online);
        assert_eq!((rows[0].boot, rows[0].reason.clone()), (Some(5), None));
        status(
            &mut fleet,
            "k1",
            json!({"state": "offline", "boot": 5, "conn": 1, "ts_ms": 3000,
                   "reason": "shutdown"}),
        );
        let rows = fleet.rows();
        assert_eq!(rows[0].state, Liveness::Offline);
        assert_eq!(rows[0].reason.as_deref(), Some("shutdown"));
        assert_eq!(rows[0].last_seen_ms, Some(3000));
    }

    #[test]
    fn malformed_payloads_are_listed_not_fatal() {
        let mut fleet = Fleet::default();
        status(&mut fleet, "k1", json!({"state": "sleeping"}));
        assert_eq!(fleet.malformed.len(), 1);
        assert!(fleet.malformed[0].starts_with("kiosk/v1/m/k1/status: "));
        assert!(fleet.devices.is_empty());
    }
}
