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

    /// One row per device, sorted by name, without a clock: no row is judged [`stale`]
    /// (use [`Fleet::rows_at`]).
    ///
    /// [`stale`]: DeviceRow::stale
    pub fn rows(&self) -> Vec<DeviceRow> {
        self.devices
            .iter()
            .map(|(name, state)| DeviceRow::of(name, state))
            .collect()
    }

    /// One row per device, sorted by name, each judged [`stale`] or not at `now_ms` (Unix ms).
    ///
    /// [`stale`]: DeviceRow::stale
    pub fn rows_at(&self, now_ms: u64) -> Vec<DeviceRow> {
        self.devices
            .iter()
            .map(|(name, state)| {
                let mut row = DeviceRow::of(name, state);
                row.stale = row.state == Liveness::Online
                    && row
                        .last_seen_ms
                        .is_some_and(|seen| now_ms.saturating_sub(seen) > silent_after_ms(state));
                row
            })
            .collect()
    }
}

/// The longest `telemetry_interval_s` a kiosk accepts: a kiosk that sends no telemetry
/// interval is silent once nothing came from it for three of these.
pub const LONGEST_INTERVAL_S: u64 = 3600;

/// How long without any message means an `online` kiosk is silent: three telemetry intervals
/// when its telemetry names the interval; its telemetry window for older kiosks (they sample
/// more often than once a window); three of the longest interval with no telemetry at all.
pub fn silent_after_ms(state: &DeviceState) -> u64 {
    let seconds = match &state.telemetry {
        Some(t) => match t.telemetry_interval_s {
            Some(interval) => interval.saturating_mul(3),
            None => t.window_s,
        },
        None => LONGEST_INTERVAL_S * 3,
    };
    seconds.saturating_mul(1000)
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
    /// Online or offline, as its retained `status` says.
    pub state: Liveness,
    /// `online` by its status, but nothing came from it for longer than it takes to send
    /// telemetry three times ([`silent_after_ms`]): probably gone without a last will (the
    /// broker restarted while it was connected, and it never came back).
    pub stale: bool,
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
            stale: false,
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
            (Liveness::Online, _) if row.stale => {
                let silent = row.last_seen_ms.map_or("-".into(), |ts| age(now_ms, ts));
                format!("online? (silent {})", silent.trim_end_matches(" ago"))
            }
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

    fn telemetry(fleet: &mut Fleet, device: &str, ts_ms: u64, interval_s: Option<u64>) {
        let topic = Topic::new("m", device, Leaf::Telemetry).expect("valid");
        let empty = diffusionx_fleet::LatencySummary::default();
        let mut body = json!({
            "seq": 1, "ts_ms": ts_ms, "boot": 5, "uptime_s": 60, "cpu_temp_c": null,
            "mem_used_mb": null, "mem_total_mb": null, "rss_mb": null, "load1": null,
            "window_s": 3600, "sessions": 0, "rounds": 0, "fallbacks": 0,
            "fallback_rate": null, "preview": empty, "cloud": empty,
            "outbox_pending": 0, "outbox_write_errors": 0
        });
        if let Some(interval) = interval_s {
            body["telemetry_interval_s"] = json!(interval);
        }
        fleet.apply(&topic, body.to_string().as_bytes());
    }

    #[test]
    fn an_online_kiosk_silent_for_three_intervals_is_stale() {
        const DAY: u64 = 86_400_000;
        let mut fleet = Fleet::default();
        // An older kiosk (no interval in its telemetry): its window decides.
        status(
            &mut fleet,
            "k1",
            json!({"state": "online", "boot": 5, "conn": 1, "ts_ms": 0}),
        );
        telemetry(&mut fleet, "k1", 0, None);
        let rows = fleet.rows_at(2 * DAY);
        assert_eq!((rows[0].state, rows[0].stale), (Liveness::Online, true));
        let text = table(&rows, 2 * DAY).to_string();
        let line = text.lines().nth(1).expect("a row");
        assert!(line.contains("online? (silent 2d)"), "{text}");
        let json = serde_json::to_value(&rows[0]).expect("json");
        assert_eq!(
            (json["state"].clone(), json["stale"].clone()),
            (json!("online"), json!(true))
        );
        assert!(
            !fleet.rows_at(3_600_000).remove(0).stale,
            "within its window"
        );
        assert!(!fleet.rows().remove(0).stale, "no clock, no judgment");

        // A kiosk that names its interval: three of them.
        status(
            &mut fleet,
            "k2",
            json!({"state": "online", "boot": 5, "conn": 1, "ts_ms": 0}),
        );
        telemetry(&mut fleet, "k2", 1_000, Some(30));
        let stale = |now| fleet.rows_at(now)[1].stale;
        assert_eq!((stale(91_000), stale(91_001)), (false, true));
        // Presence alone: three of the longest interval.
        status(
            &mut fleet,
            "k3",
            json!({"state": "online", "boot": 1, "conn": 1, "ts_ms": 0}),
        );
        let stale = |now| fleet.rows_at(now)[2].stale;
        assert_eq!(
            (stale(3 * 3_600_000), stale(3 * 3_600_000 + 1)),
            (false, true)
        );
        // An offline kiosk is offline, never stale.
        status(
            &mut fleet,
            "k4",
            json!({"state": "offline", "boot": 1, "conn": 1, "ts_ms": 0, "reason": "shutdown"}),
        );
        assert!(!fleet.rows_at(2 * DAY)[3].stale);
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
