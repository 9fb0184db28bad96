//! The rolling window behind telemetry: counters and latency histograms over the last
//! `window` of finished sessions, computed from the same reports the outbox sends.

use std::collections::VecDeque;

use diffusionx_fleet::{Finalize, Histogram, LatencySummary, SessionReport};

/// What one session contributes.
#[derive(Debug, Clone)]
struct Sample {
    ts_ms: u64,
    rounds: u64,
    previews: Vec<u64>,
    finalized: bool,
    cloud_ms: Option<u64>,
    fallback: bool,
}

/// Session samples of the last window.
#[derive(Debug, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
}

/// The window's figures, as telemetry reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Sessions.
    pub sessions: u64,
    /// Preview rounds.
    pub rounds: u64,
    /// Finalizes (cloud or local).
    pub finalizes: u64,
    /// Finalizes refined on the kiosk.
    pub fallbacks: u64,
    /// `fallbacks / finalizes`.
    pub fallback_rate: Option<f32>,
    /// Preview latency.
    pub preview: LatencySummary,
    /// Cloud latency.
    pub cloud: LatencySummary,
}

impl Window {
    /// Adds a finished session and drops the sessions that ended more than `window_ms` before
    /// `now_ms`: only telemetry reads the window, and a kiosk offline for days publishes none,
    /// so the window must not grow there.
    pub fn add(&mut self, report: &SessionReport, now_ms: u64, window_ms: u64) {
        self.trim(now_ms, window_ms);
        let finalize = report.finalize.as_ref();
        let path = finalize.and_then(|f| f.path.as_deref());
        self.samples.push_back(Sample {
            ts_ms: report.ts_ms,
            rounds: report.rounds.len() as u64,
            previews: report.rounds.iter().filter_map(|r| r.preview_ms).collect(),
            finalized: path.is_some(),
            cloud_ms: (path == Some("cloud"))
                .then(|| finalize.and_then(|f| f.refine_ms))
                .flatten(),
            fallback: finalize.is_some_and(Finalize::is_fallback),
        });
    }

    /// The figures of the sessions that ended within `window_ms` before `now_ms` (older ones
    /// are dropped).
    pub fn figures(&mut self, now_ms: u64, window_ms: u64) -> Figures {
        self.trim(now_ms, window_ms);
        let (mut preview, mut cloud) = (Histogram::default(), Histogram::default());
        let (mut rounds, mut finalizes, mut fallbacks) = (0, 0, 0);
        for sample in &self.samples {
            rounds += sample.rounds;
            finalizes += u64::from(sample.finalized);
            fallbacks += u64::from(sample.fallback);
            for &ms in &sample.previews {
                preview.record(ms);
            }
            if let Some(ms) = sample.cloud_ms {
                cloud.record(ms);
            }
        }
        Figures {
            sessions: self.samples.len() as u64,
            rounds,
            finalizes,
            fallbacks,
            fallback_rate: (finalizes > 0).then(|| fallbacks as f32 / finalizes as f32),
            preview: LatencySummary::of(preview),
            cloud: LatencySummary::of(cloud),
        }
    }

    /// Drops the sessions that ended more than `window_ms` before `now_ms`.
    fn trim(&mut self, now_ms: u64, window_ms: u64) {
        let since = now_ms.saturating_sub(window_ms);
        while self.samples.front().is_some_and(|s| s.ts_ms < since) {
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusionx_fleet::{Finalize, RoundReport};

    fn report(ts_ms: u64, previews: &[u64], path: Option<&str>, refine_ms: u64) -> SessionReport {
        SessionReport {
            id: format!("k-1-{ts_ms}"),
            boot: 1,
            number: ts_ms,
            ts_ms,
            rounds: previews
                .iter()
                .map(|&ms| RoundReport {
                    prompt: None,
                    tokens: None,
                    seed: 1,
                    steps: 4,
                    width: 256,
                    height: 256,
                    preview_ms: Some(ms),
                })
                .collect(),
            finalize: path.map(|p| Finalize {
                noise_level: 0.5,
                path: Some(p.into()),
                refine_ms: Some(refine_ms),
                queue_depth: None,
                expected_wait_ms: None,
                fallback_reason: None,
                predictor: None,
                predictor_error: None,
            }),
            thumbs_up: None,
            ending: "finished".into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn figures_cover_the_window_only() {
        let mut window = Window::default();
        let add = |window: &mut Window, report: &SessionReport| {
            window.add(report, report.ts_ms, 1_000_000);
        };
        add(&mut window, &report(1_000, &[900], Some("cloud"), 5_000));
        add(
            &mut window,
            &report(50_000, &[1_000, 2_000], Some("cloud"), 3_000),
        );
        add(&mut window, &report(60_000, &[1_500], Some("local"), 9_000));
        add(&mut window, &report(61_000, &[1_200], None, 0));
        let figures = window.figures(70_000, 30_000);
        assert_eq!(figures.sessions, 3, "the session at 1 s is outside");
        assert_eq!(figures.rounds, 4);
        assert_eq!((figures.finalizes, figures.fallbacks), (2, 1));
        assert_eq!(figures.fallback_rate, Some(0.5), "one of two finalizes");
        assert_eq!(figures.preview.count, 4);
        assert_eq!(
            figures.cloud.count, 1,
            "local refinements are not cloud latency"
        );
        let p50 = figures.cloud.p50_ms.expect("one sample");
        assert!(
            (2_713..=3_391).contains(&p50),
            "3000 ms reads within its bucket: {p50}"
        );
        assert_eq!(window.samples.len(), 3, "the old sample was dropped");
    }

    #[test]
    fn a_kiosk_without_a_gateway_refines_locally_without_counting_fallbacks() {
        let mut window = Window::default();
        let mut local_only = report(1_000, &[900], Some("local"), 5_000);
        let mut given_up = report(2_000, &[900], Some("local"), 5_000);
        if let (Some(a), Some(b)) = (&mut local_only.finalize, &mut given_up.finalize) {
            a.fallback_reason = Some(diffusionx_fleet::payload::LOCAL_ONLY.into());
            b.fallback_reason = Some("unreachable: connection refused".into());
        }
        window.add(&local_only, 2_000, 60_000);
        window.add(&given_up, 2_000, 60_000);
        let figures = window.figures(3_000, 60_000);
        assert_eq!((figures.finalizes, figures.fallbacks), (2, 1));
        assert_eq!(figures.fallback_rate, Some(0.5));
    }

    #[test]
    fn adding_drops_sessions_older_than_the_window_without_telemetry() {
        // A kiosk offline for a day at one session a minute, with a one-hour window: no
        // telemetry is published (and so `figures` never runs) while it is offline.
        let mut window = Window::default();
        let (minute, hour) = (60_000, 3_600_000);
        for n in 1..=24 * 60 {
            window.add(
                &report(n * minute, &[1_000], Some("cloud"), 3_000),
                n * minute,
                hour,
            );
        }
        let kept: Vec<u64> = window.samples.iter().map(|s| s.ts_ms).collect();
        assert_eq!(
            (kept.len(), kept.first(), kept.last()),
            (61, Some(&(23 * 60 * minute)), Some(&(24 * 60 * minute))),
            "the last hour (both ends included), nothing older"
        );
    }
}
