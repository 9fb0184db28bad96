//! `dxctl stats`: per-device and fleet numbers, either from retained telemetry (each kiosk's
//! rolling window; fleet percentiles read from the merged histograms) or exactly from session
//! reports saved by `sessions --follow --json` over a window ending at the newest report.

use std::collections::BTreeMap;
use std::time::Duration;

use diffusionx_fleet::{Histogram, Telemetry};
use serde::Serialize;

use crate::sessions::{Dedup, SessionEvent};
use crate::table::{Table, ms};

/// The name of the fleet-wide row.
pub const FLEET_ROW: &str = "(fleet)";

/// One line of `dxctl stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRow {
    /// A device name, or [`FLEET_ROW`].
    pub scope: String,
    /// Sessions finished in the window.
    pub sessions: u64,
    /// Preview rounds in the window.
    pub rounds: u64,
    /// `rounds / sessions`.
    pub rounds_per_session: Option<f64>,
    /// Preview latency, median.
    pub preview_p50_ms: Option<u64>,
    /// Preview latency, 95th percentile.
    pub preview_p95_ms: Option<u64>,
    /// Cloud latency (finalize to refined picture, cloud path), median.
    pub cloud_p50_ms: Option<u64>,
    /// Cloud latency, 95th percentile.
    pub cloud_p95_ms: Option<u64>,
    /// Finalizes refined locally / all finalizes that took a path.
    pub fallback_rate: Option<f64>,
    /// The window covered, seconds (`None` for a fleet row whose kiosks use different ones).
    pub window_s: Option<u64>,
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// Rows from each device's latest telemetry (sorted by device), then the fleet row. The fleet's
/// percentiles come from the sum of the kiosks' histograms; its fallback rate is the sum of
/// fallbacks over the sum of finalizes (older kiosks without a `finalizes` count: their cloud
/// samples plus their fallbacks).
pub fn from_telemetry(telemetry: &BTreeMap<String, Telemetry>) -> Vec<StatsRow> {
    let mut rows = Vec::new();
    let (mut preview, mut cloud) = (Histogram::default(), Histogram::default());
    let (mut sessions, mut rounds, mut fallbacks, mut finalizes) = (0, 0, 0, 0);
    let mut windows: Vec<u64> = Vec::new();
    for (device, t) in telemetry {
        rows.push(StatsRow {
            scope: device.clone(),
            sessions: t.sessions,
            rounds: t.rounds,
            rounds_per_session: ratio(t.rounds, t.sessions),
            preview_p50_ms: t.preview.histogram.quantile(0.5),
            preview_p95_ms: t.preview.histogram.quantile(0.95),
            cloud_p50_ms: t.cloud.histogram.quantile(0.5),
            cloud_p95_ms: t.cloud.histogram.quantile(0.95),
            fallback_rate: t.fallback_rate.map(f64::from),
            window_s: Some(t.window_s),
        });
        preview.merge(&t.preview.histogram);
        cloud.merge(&t.cloud.histogram);
        sessions += t.sessions;
        rounds += t.rounds;
        fallbacks += t.fallbacks;
        finalizes += if t.finalizes > 0 {
            t.finalizes
        } else {
            t.fallbacks + t.cloud.histogram.count()
        };
        windows.push(t.window_s);
    }
    windows.dedup();
    rows.push(StatsRow {
        scope: FLEET_ROW.into(),
        sessions,
        rounds,
        rounds_per_session: ratio(rounds, sessions),
        preview_p50_ms: preview.quantile(0.5),
        preview_p95_ms: preview.quantile(0.95),
        cloud_p50_ms: cloud.quantile(0.5),
        cloud_p95_ms: cloud.quantile(0.95),
        fallback_rate: ratio(fallbacks, finalizes),
        window_s: match windows.as_slice() {
            [one] => Some(*one),
            _ => None,
        },
    });
    rows
}

/// The exact nearest-rank percentile `percent` (0..=100) of `sorted` values.
pub fn nearest_rank(sorted: &[u64], percent: u64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (n * percent).div_ceil(100).clamp(1, n);
    Some(sorted[(rank - 1) as usize])
}

#[derive(Default)]
struct Tally {
    sessions: u64,
    rounds: u64,
    preview: Vec<u64>,
    cloud: Vec<u64>,
    local: u64,
    finalizes: u64,
}

impl Tally {
    fn add(&mut self, event: &SessionEvent) {
        let report = &event.report;
        self.sessions += 1;
        self.rounds += report.rounds.len() as u64;
        self.preview
            .extend(report.rounds.iter().filter_map(|r| r.preview_ms));
        if let Some(finalize) = &report.finalize {
            match finalize.path.as_deref() {
                Some("cloud") => {
                    self.finalizes += 1;
                    self.cloud.extend(finalize.refine_ms);
                }
                Some(_) => {
                    self.finalizes += 1;
                    self.local += 1;
                }
                None => {}
            }
        }
    }

    fn row(mut self, scope: &str, window_s: u64) -> StatsRow {
        self.preview.sort_unstable();
        self.cloud.sort_unstable();
        StatsRow {
            scope: scope.into(),
            sessions: self.sessions,
            rounds: self.rounds,
            rounds_per_session: ratio(self.rounds, self.sessions),
            preview_p50_ms: nearest_rank(&self.preview, 50),
            preview_p95_ms: nearest_rank(&self.preview, 95),
            cloud_p50_ms: nearest_rank(&self.cloud, 50),
            cloud_p95_ms: nearest_rank(&self.cloud, 95),
            fallback_rate: ratio(self.local, self.finalizes),
            window_s: Some(window_s),
        }
    }
}

/// Rows computed exactly from session reports (duplicates by id counted once) that ended in
/// the window `(newest - window, newest]`, `newest` being the latest `ts_ms` among them; rows
/// for `device` only when given, and the fleet row. Percentiles are nearest-rank on the raw
/// values; a finalize counts when it took a path (`cloud` or `local`).
pub fn from_reports(
    events: &[SessionEvent],
    window: Duration,
    device: Option<&str>,
) -> Vec<StatsRow> {
    let window_ms = window.as_millis() as u64;
    let window_s = window.as_secs();
    let mut dedup = Dedup::new(events.len());
    let chosen: Vec<&SessionEvent> = events
        .iter()
        .filter(|e| device.is_none_or(|d| e.device == d))
        .filter(|e| dedup.first_time(&e.report.id))
        .collect();
    let newest = chosen.iter().map(|e| e.report.ts_ms).max().unwrap_or(0);
    let mut per_device: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut fleet = Tally::default();
    for event in chosen {
        if event.report.ts_ms + window_ms > newest {
            per_device.entry(&event.device).or_default().add(event);
            fleet.add(event);
        }
    }
    let mut rows: Vec<StatsRow> = per_device
        .into_iter()
        .map(|(device, tally)| tally.row(device, window_s))
        .collect();
    rows.push(fleet.row(FLEET_ROW, window_s));
    rows
}

/// Reads a window like `90s`, `30m`, `1h`, `24h` or `7d`.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("window {text:?} needs a unit: s, m, h or d"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("window {text:?} must start with a whole number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("window {text:?}: the unit must be s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("window {text:?} is empty"));
    }
    Ok(Duration::from_secs(n * seconds))
}

/// The table people read.
pub fn table(rows: &[StatsRow]) -> Table {
    let mut table = Table::new(&[
        "SCOPE",
        "SESSIONS",
        "ROUNDS/SESSION",
        "PREVIEW P50",
        "PREVIEW P95",
        "CLOUD P50",
        "CLOUD P95",
        "FALLBACK",
        "WINDOW",
    ]);
    for row in rows {
        table.push(vec![
            row.scope.clone(),
            row.sessions.to_string(),
            row.rounds_per_session
                .map_or("-".into(), |r| format!("{r:.2}")),
            ms(row.preview_p50_ms),
            ms(row.preview_p95_ms),
            ms(row.cloud_p50_ms),
            ms(row.cloud_p95_ms),
            row.fallback_rate
                .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            row.window_s.map_or("mixed".into(), window_text),
        ]);
    }
    table
}

fn window_text(seconds: u64) -> String {
    match seconds {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=20).map(|v| v * 10).collect();
        assert_eq!(nearest_rank(&values, 50), Some(100));
        assert_eq!(nearest_rank(&values, 95), Some(190));
        assert_eq!(nearest_rank(&values[..1], 95), Some(10));
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&[3, 7, 9], 50), Some(7));
    }

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_window("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_window("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "30", "m", "1w", "0h", "1.5h", "-1h"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
        assert_eq!(window_text(86_400), "1d");
        assert_eq!(window_text(1800), "30m");
    }
}
