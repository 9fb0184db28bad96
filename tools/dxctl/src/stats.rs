//! `dxctl stats`: per-device and fleet numbers, either from retained telemetry (each kiosk's
//! rolling window; fleet percentiles read from the merged histograms) or exactly from session
//! reports saved by `sessions --follow --json` over a window ending at the newest report.
//!
//! Retained telemetry stays on the broker after its kiosk goes away: a sample older than its
//! own window describes no part of the present, so it is left out and named as stale instead.

use std::collections::BTreeMap;
use std::time::Duration;

use diffusionx_fleet::{Histogram, Telemetry};
use serde::Serialize;

use crate::sessions::{Dedup, SessionEvent};
use crate::table::{Table, age, ms};

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
    /// The window covered: serialized as `window_s`, seconds, `null` for a fleet row whose
    /// kiosks use different windows, and left out when no kiosk is current.
    #[serde(
        rename = "window_s",
        serialize_with = "window_seconds",
        skip_serializing_if = "Window::is_no_kiosk"
    )]
    pub window: Window,
    /// A kiosk row from telemetry whose counters cover only part of `window_s` (the kiosk
    /// started less than a window ago): the seconds covered (not serialized otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers_s: Option<u64>,
    /// Fleet row from telemetry: the kiosks left out because their telemetry is stale (not
    /// serialized when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<String>,
}

/// The window a row of `dxctl stats` covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Every sample of the row covers this many seconds.
    Seconds(u64),
    /// A kiosk row whose counters cover only `covers_s` of its `window_s` (it started less
    /// than a window ago). Serialized as `window_s`, with the row's `covers_s` beside it.
    Partial {
        /// Seconds covered.
        covers_s: u64,
        /// The kiosk's window.
        window_s: u64,
    },
    /// A fleet row whose kiosks use different windows.
    Mixed,
    /// A fleet row from telemetry with no current kiosk (every sample stale, or none): it
    /// covers nothing, and is not "mixed" either.
    NoKiosk,
}

impl Window {
    fn is_no_kiosk(&self) -> bool {
        *self == Window::NoKiosk
    }
}

fn window_seconds<S: serde::Serializer>(window: &Window, serializer: S) -> Result<S::Ok, S::Error> {
    match window {
        Window::Seconds(seconds)
        | Window::Partial {
            window_s: seconds, ..
        } => serializer.serialize_u64(*seconds),
        Window::Mixed | Window::NoKiosk => serializer.serialize_none(),
    }
}

/// A kiosk whose latest telemetry is older than the window it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The device.
    pub device: String,
    /// Its latest telemetry's `ts_ms`.
    pub ts_ms: u64,
}

/// [`from_telemetry`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryStats {
    /// One row per current kiosk (sorted by device), then the fleet row.
    pub rows: Vec<StatsRow>,
    /// The kiosks left out, sorted by device.
    pub stale: Vec<Stale>,
}

/// Whether `t` no longer describes the present at `now_ms`: its window `(ts - window, ts]`
/// ended more than one window ago, so none of it overlaps the window ending now. (The payload
/// does not carry the telemetry interval, so there is no extra margin for it; a live kiosk
/// samples more often than once a window.)
pub fn is_stale(t: &Telemetry, now_ms: u64) -> bool {
    now_ms.saturating_sub(t.ts_ms) > t.window_s.saturating_mul(1000)
}

/// The part of its window a sample covers: `covers_s` as the kiosk says, or (older kiosks,
/// whose counters also start empty at every start) its uptime.
pub fn covered(t: &Telemetry) -> Window {
    let covers_s = t.covers_s.unwrap_or(t.uptime_s).min(t.window_s);
    if covers_s < t.window_s {
        Window::Partial {
            covers_s,
            window_s: t.window_s,
        }
    } else {
        Window::Seconds(t.window_s)
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// Rows from each device's latest telemetry (sorted by device), then the fleet row, leaving out
/// (and listing) the kiosks whose telemetry [`is_stale`] at `now_ms` (Unix ms). The fleet's
/// percentiles come from the sum of the kiosks' histograms; its fallback rate is the sum of
/// fallbacks over the sum of finalizes (older kiosks without a `finalizes` count: their cloud
/// samples plus their fallbacks).
pub fn from_telemetry(telemetry: &BTreeMap<String, Telemetry>, now_ms: u64) -> TelemetryStats {
    let (stale, current): (Vec<_>, Vec<_>) =
        telemetry.iter().partition(|(_, t)| is_stale(t, now_ms));
    let stale: Vec<Stale> = stale
        .into_iter()
        .map(|(device, t)| Stale {
            device: device.clone(),
            ts_ms: t.ts_ms,
        })
        .collect();
    let mut rows = Vec::new();
    let (mut preview, mut cloud) = (Histogram::default(), Histogram::default());
    let (mut sessions, mut rounds, mut fallbacks, mut finalizes) = (0, 0, 0, 0);
    let mut windows: Vec<Window> = Vec::new();
    for (device, t) in current {
        let window = covered(t);
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
            window,
            covers_s: match window {
                Window::Partial { covers_s, .. } => Some(covers_s),
                _ => None,
            },
            stale: Vec::new(),
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
        windows.push(window);
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
        window: match windows.as_slice() {
            [] => Window::NoKiosk,
            [Window::Seconds(one)] => Window::Seconds(*one),
            // Different windows, or kiosks that cover only part of theirs.
            _ => Window::Mixed,
        },
        covers_s: None,
        stale: stale.iter().map(|s| s.device.clone()).collect(),
    });
    TelemetryStats { rows, stale }
}

/// The line under the table naming the stale kiosks (`None` when there are none).
pub fn stale_line(stale: &[Stale], now_ms: u64) -> Option<String> {
    if stale.is_empty() {
        return None;
    }
    let names: Vec<String> = stale
        .iter()
        .map(|s| format!("{} ({})", s.device, age(now_ms, s.ts_ms)))
        .collect();
    let kiosks = if stale.len() == 1 { "kiosk" } else { "kiosks" };
    Some(format!(
        "stale: {} {kiosks} left out, telemetry older than its window: {}",
        stale.len(),
        names.join(", ")
    ))
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
            window: Window::Seconds(window_s),
            covers_s: None,
            stale: Vec::new(),
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
    n.checked_mul(seconds)
        .filter(|&s| s <= MAX_WINDOW_S)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("window {text:?} is longer than {}d", MAX_WINDOW_S / 86_400))
}

/// The longest window [`parse_window`] takes: ten years (reports older than that are not
/// statistics of a running fleet, and the number stays far from overflowing milliseconds).
pub const MAX_WINDOW_S: u64 = 3650 * 86_400;

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
            match row.window {
                Window::Seconds(seconds) => window_text(seconds),
                Window::Partial { covers_s, window_s } => {
                    format!("{} of {}", short(covers_s), window_text(window_s))
                }
                Window::Mixed => "mixed".into(),
                Window::NoKiosk => "-".into(),
            },
        ]);
    }
    table
}

/// Seconds rounded down to the largest unit: `12m`, `2h`, `45s`.
fn short(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
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
    use diffusionx_fleet::LatencySummary;

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
    fn telemetry_is_stale_once_its_whole_window_is_past() {
        let mut t: Telemetry = serde_json::from_value(serde_json::json!({
            "seq": 1, "ts_ms": 10_000_000, "boot": 1, "uptime_s": 1, "cpu_temp_c": null,
            "mem_used_mb": null, "mem_total_mb": null, "rss_mb": null, "load1": null,
            "window_s": 3600, "sessions": 0, "rounds": 0, "fallbacks": 0,
            "fallback_rate": null,
            "preview": LatencySummary::of(Histogram::default()),
            "cloud": LatencySummary::of(Histogram::default()),
            "outbox_pending": 0, "outbox_write_errors": 0
        }))
        .expect("telemetry");
        assert!(!is_stale(&t, 10_000_000 + 3_600_000));
        assert!(is_stale(&t, 10_000_000 + 3_600_001));
        // A sample from the future (clock skew) is current.
        assert!(!is_stale(&t, 0));
        t.window_s = 60;
        assert!(is_stale(&t, 10_000_000 + 60_001));
        let stale = [Stale {
            device: "k2".into(),
            ts_ms: 0,
        }];
        assert_eq!(stale_line(&[], 0), None);
        assert_eq!(
            stale_line(&stale, 2 * 86_400_000).as_deref(),
            Some("stale: 1 kiosk left out, telemetry older than its window: k2 (2d ago)")
        );
    }

    fn telemetry(ts_ms: u64, window_s: u64) -> Telemetry {
        serde_json::from_value(serde_json::json!({
            "seq": 1, "ts_ms": ts_ms, "boot": 1, "uptime_s": 86_400, "cpu_temp_c": null,
            "mem_used_mb": null, "mem_total_mb": null, "rss_mb": null, "load1": null,
            "window_s": window_s, "sessions": 0, "rounds": 0, "fallbacks": 0,
            "fallback_rate": null,
            "preview": LatencySummary::of(Histogram::default()),
            "cloud": LatencySummary::of(Histogram::default()),
            "outbox_pending": 0, "outbox_write_errors": 0
        }))
        .expect("telemetry")
    }

    /// The fleet row's WINDOW cell and its JSON.
    fn fleet_window(telemetry: &BTreeMap<String, Telemetry>, now_ms: u64) -> (String, String) {
        let rows = from_telemetry(telemetry, now_ms).rows;
        let fleet = rows.last().expect("a fleet row");
        assert_eq!(fleet.scope, FLEET_ROW);
        let text = table(&rows).to_string();
        let line = text.lines().last().expect("a fleet line");
        let cell = line.split_whitespace().last().expect("cells").to_owned();
        (cell, serde_json::to_string(fleet).expect("json"))
    }

    #[test]
    fn a_fleet_with_no_current_kiosk_has_no_window_rather_than_a_mixed_one() {
        let now = 100_000_000;
        let mut kiosks = BTreeMap::new();
        kiosks.insert("k1".to_owned(), telemetry(now - 3_601_000, 3600));
        kiosks.insert("k2".to_owned(), telemetry(now - 61_000, 60));
        let (cell, json) = fleet_window(&kiosks, now);
        assert_eq!(cell, "-");
        assert!(!json.contains("window_s"), "{json}");
        assert!(json.contains(r#""stale":["k1","k2"]"#), "{json}");
        // No telemetry at all: the same.
        assert_eq!(fleet_window(&BTreeMap::new(), now).0, "-");
        // Two current kiosks with different windows are mixed; one window is shown.
        kiosks.insert("k1".to_owned(), telemetry(now, 3600));
        kiosks.insert("k2".to_owned(), telemetry(now, 60));
        let (cell, json) = fleet_window(&kiosks, now);
        assert_eq!(cell, "mixed");
        assert!(json.contains(r#""window_s":null"#), "{json}");
        kiosks.insert("k2".to_owned(), telemetry(now, 3600));
        let (cell, json) = fleet_window(&kiosks, now);
        assert_eq!(cell, "1h");
        assert!(json.contains(r#""window_s":3600"#), "{json}");
    }

    #[test]
    fn a_kiosk_that_started_within_its_window_covers_only_part_of_it() {
        let now = 100_000_000;
        let mut young = telemetry(now, 3600);
        young.uptime_s = 600;
        let mut kiosks = BTreeMap::new();
        kiosks.insert("k1".to_owned(), young.clone());
        let rows = from_telemetry(&kiosks, now).rows;
        assert_eq!(
            rows[0].window,
            Window::Partial {
                covers_s: 600,
                window_s: 3600
            }
        );
        let json = serde_json::to_string(&rows[0]).expect("json");
        assert!(json.contains(r#""window_s":3600,"covers_s":600"#), "{json}");
        let text = table(&rows).to_string();
        assert!(
            text.lines().nth(1).expect("k1").ends_with("10m of 1h"),
            "{text}"
        );
        assert_eq!(rows[1].window, Window::Mixed, "the fleet row");
        // The kiosk's own covers_s wins over its uptime.
        young.covers_s = Some(3600);
        kiosks.insert("k1".to_owned(), young);
        let rows = from_telemetry(&kiosks, now).rows;
        assert_eq!(
            (rows[0].window, rows[0].covers_s, rows[1].window),
            (Window::Seconds(3600), None, Window::Seconds(3600))
        );
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
        // Too long: an error, not an overflow.
        assert_eq!(parse_window("3650d"), Ok(Duration::from_secs(MAX_WINDOW_S)));
        for long in ["3651d", "18446744073709551615d", "99999999999999999999h"] {
            assert!(parse_window(long).is_err(), "{long}");
        }
        assert_eq!(
            parse_window("3651d"),
            Err("window \"3651d\" is longer than 3650d".to_string())
        );
        assert_eq!(window_text(86_400), "1d");
        assert_eq!(window_text(1800), "30m");
    }
}
