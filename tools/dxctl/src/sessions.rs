//! `dxctl sessions --follow`: the live tail of session reports, de-duplicated by report id with
//! bounded memory (a report can arrive twice after a kiosk crash or a lost PUBACK).

use std::collections::{HashSet, VecDeque};
use std::ops::ControlFlow;

use diffusionx_fleet::SessionReport;
use diffusionx_fleet::topic::{self, Leaf, Topic};
use serde_json::Value;
use tokio::time::Instant;

use crate::broker::{DxError, Link};
use crate::table::ms;

/// How many report ids [`Dedup`] remembers by default (a few MiB at most).
pub const DEDUP_CAPACITY: usize = 100_000;

/// Remembers the last `capacity` ids seen; older ones are forgotten first.
#[derive(Debug, Clone)]
pub struct Dedup {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Dedup {
    /// Remembers at most `capacity` ids (at least one).
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether `id` is new (and remembers it).
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(id.into());
        self.order.push_back(id.into());
        true
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A session report and the kiosk that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEvent {
    /// The device name (from the topic).
    pub device: String,
    /// The report as sent.
    pub report: SessionReport,
}

impl SessionEvent {
    /// The JSON line `--json` prints: the report's own fields plus `"device"`.
    pub fn to_json(&self) -> Value {
        // Through text, so an `f32` such as a noise level of 0.45 stays 0.45 (a direct
        // `to_value` widens it to 0.44999998807907104).
        let text = serde_json::to_string(&self.report).expect("a report always serializes");
        let mut value: Value = serde_json::from_str(&text).expect("serde_json reads its output");
        if let Value::Object(map) = &mut value {
            map.insert("device".into(), Value::String(self.device.clone()));
        }
        value
    }

    /// Reads a line written by [`SessionEvent::to_json`].
    pub fn from_json(line: &str) -> Result<SessionEvent, serde_json::Error> {
        let mut value: Value = serde_json::from_str(line)?;
        let device = match value.as_object_mut().and_then(|m| m.remove("device")) {
            Some(Value::String(device)) => device,
            _ => return Err(serde::de::Error::missing_field("device")),
        };
        Ok(SessionEvent {
            device,
            report: serde_json::from_value(value)?,
        })
    }
}

/// The columns of [`line()`] for one session ([`row`]).
pub const HEADER: [&str; 7] = [
    "DEVICE", "ID", "ROUNDS", "PATH", "NOISE", "REFINE", "ENDING",
];

/// One line of `dxctl sessions --follow`: [`HEADER`] or a [`row`], in fixed-width columns (a
/// tail cannot size its columns from lines it has not seen yet).
pub fn line<S: AsRef<str>>(cells: &[S]) -> String {
    let widths = [12, 24, 6, 5, 5, 9, 0];
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        line.push_str(&format!("{:<width$} ", cell.as_ref()));
    }
    line.trim_end().to_string()
}

/// The cells of one session for [`line()`].
pub fn row(event: &SessionEvent) -> Vec<String> {
    let report = &event.report;
    let finalize = report.finalize.as_ref();
    vec![
        event.device.clone(),
        report.id.clone(),
        report.rounds.len().to_string(),
        finalize
            .and_then(|f| f.path.clone())
            .unwrap_or_else(|| "-".into()),
        finalize.map_or("-".into(), |f| format!("{:.2}", f.noise_level)),
        ms(finalize.and_then(|f| f.refine_ms)),
        report.ending.clone(),
    ]
}

/// Subscribes (QoS 1) to the fleet's session reports, or one device's.
pub async fn subscribe(link: &mut Link, fleet: &str, device: Option<&str>) -> Result<(), DxError> {
    topic::check_name("fleet", fleet)?;
    if let Some(device) = device {
        topic::check_name("device", device)?;
    }
    link.subscribe(&[topic::filter(Some(fleet), device, "sessions")])
        .await
}

/// Calls `on_report` once per distinct report id until `count` distinct reports have arrived
/// (forever when `None`). Payloads that are not reports are passed to `on_malformed`.
pub async fn follow(
    link: &mut Link,
    count: Option<u64>,
    dedup: &mut Dedup,
    mut on_report: impl FnMut(SessionEvent),
    on_malformed: impl FnMut(String),
) -> Result<(), DxError> {
    let on_report = |event| {
        on_report(event);
        ControlFlow::Continue(())
    };
    follow_until(link, count, dedup, on_report, on_malformed).await
}

/// [`follow`], also ending as soon as `on_report` breaks (the binary: its output is gone, as
/// in `dxctl sessions --follow | head`).
pub async fn follow_until(
    link: &mut Link,
    count: Option<u64>,
    dedup: &mut Dedup,
    mut on_report: impl FnMut(SessionEvent) -> ControlFlow<()>,
    mut on_malformed: impl FnMut(String),
) -> Result<(), DxError> {
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        // A day at a time: only the connection ending (or `count`) ends a follow.
        let deadline = Instant::now() + std::time::Duration::from_secs(86_400);
        let Some(publish) = link.next_publish(deadline).await? else {
            continue;
        };
        let name = String::from_utf8_lossy(&publish.topic);
        let Ok(Topic {
            device,
            leaf: Leaf::Sessions,
            ..
        }) = Topic::parse(&name)
        else {
            continue;
        };
        match serde_json::from_slice::<SessionReport>(&publish.payload) {
            Ok(report) if dedup.first_time(&report.id) => {
                seen += 1;
                if on_report(SessionEvent { device, report }).is_break() {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => on_malformed(format!("{name}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_forgets_the_oldest_id_first() {
        let mut dedup = Dedup::new(2);
        assert!(dedup.first_time("a"));
        assert!(!dedup.first_time("a"));
        assert!(dedup.first_time("b"));
        assert!(dedup.first_time("c"));
        assert_eq!(dedup.len(), 2);
        assert!(!dedup.first_time("c"));
        assert!(dedup.first_time("a"), "a was forgotten when c came");
    }

    #[test]
    fn json_lines_round_trip_with_the_device() {
        let line = r#"{"id":"k1-1-1","boot":1,"number":1,"ts_ms":5,"rounds":[],
            "finalize":null,"thumbs_up":null,"ending":"abandoned","device":"k1"}"#;
        let event = SessionEvent::from_json(line).expect("valid");
        assert_eq!(event.device, "k1");
        assert!(event.report.extra.is_empty());
        assert_eq!(event.to_json()["device"], "k1");
        assert_eq!(
            SessionEvent::from_json(&event.to_json().to_string()).expect("valid"),
            event
        );
        assert!(SessionEvent::from_json(r#"{"id":"x"}"#).is_err());
    }
}
