//! Prometheus text metrics (exposition format 0.0.4), kept in atomics: no registry crate, no
//! locks on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a job ended, for `dx_jobs_total{outcome=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A result was sent.
    Done,
    /// Refused at admission: the queue or the device's share of it was full.
    Busy,
    /// Refused at admission (bad request, wrong device), or a malformed frame after the request.
    Invalid,
    /// The kiosk cancelled or went away.
    Cancelled,
    /// The deadline passed.
    Deadline,
    /// The gateway was shutting down.
    Shutdown,
    /// The engine failed.
    Failed,
}

const OUTCOMES: [(Outcome, &str); 7] = [
    (Outcome::Done, "done"),
    (Outcome::Busy, "busy"),
    (Outcome::Invalid, "invalid"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Deadline, "deadline"),
    (Outcome::Shutdown, "shutdown"),
    (Outcome::Failed, "failed"),
];

/// Upper bounds of the step latency histogram, in seconds.
const STEP_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The gateway's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    jobs: [AtomicU64; 7],
    queue_depth: AtomicU64,
    running: AtomicU64,
    connections: AtomicU64,
    handshakes: AtomicU64,
    engine_up: AtomicU64,
    step_buckets: [AtomicU64; 12],
    step_count: AtomicU64,
    step_sum_us: AtomicU64,
    batch_jobs_sum: AtomicU64,
}

impl Metrics {
    /// Counts a finished job.
    pub fn job(&self, outcome: Outcome) {
        let i = OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .unwrap_or_default();
        self.jobs[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs that ended with `outcome` so far.
    pub fn jobs(&self, outcome: Outcome) -> u64 {
        let i = OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .unwrap_or_default();
        self.jobs[i].load(Ordering::Relaxed)
    }

    /// Sets the waiting and running gauges.
    pub fn set_load(&self, queue_depth: usize, running: usize) {
        self.queue_depth
            .store(queue_depth as u64, Ordering::Relaxed);
        self.running.store(running as u64, Ordering::Relaxed);
    }

    /// A connection opened (`+1`) or closed (`-1`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A QUIC handshake started (`+1`) or ended (`-1`), however it ended.
    pub fn handshake(&self, started: bool) {
        if started {
            self.handshakes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// QUIC handshakes in flight.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// The engine loop runs (`true`) or stopped or failed (`false`).
    pub fn set_engine_up(&self, up: bool) {
        self.engine_up.store(u64::from(up), Ordering::Relaxed);
    }

    /// Records one UNet call of `jobs` jobs taking `seconds`.
    pub fn step(&self, jobs: usize, seconds: f64) {
        for (bound, bucket) in STEP_BUCKETS.iter().zip(&self.step_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.step_count.fetch_add(1, Ordering::Relaxed);
        self.step_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.batch_jobs_sum
            .fetch_add(jobs as u64, Ordering::Relaxed);
    }

    /// UNet calls so far and the jobs they carried in all.
    pub fn steps(&self) -> (u64, u64) {
        (
            self.step_count.load(Ordering::Relaxed),
            self.batch_jobs_sum.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP dx_jobs_total Refinement jobs by how they ended.\n");
        out.push_str("# TYPE dx_jobs_total counter\n");
        for ((_, name), count) in OUTCOMES.iter().zip(&self.jobs) {
            let _ = writeln!(out, "dx_jobs_total{{outcome=\"{name}\"}} {}", get(count));
        }
        for (name, help, value) in [
            (
                "dx_queue_depth",
                "Jobs admitted and waiting.",
                &self.queue_depth,
            ),
            ("dx_batch_size", "Jobs in the running batch.", &self.running),
            (
                "dx_connections",
                "Open QUIC connections.",
                &self.connections,
            ),
            (
                "dx_handshakes",
                "QUIC handshakes in flight.",
                &self.handshakes,
            ),
            (
                "dx_engine_up",
                "1 while the refinement engine serves; 0 once it stopped or failed.",
                &self.engine_up,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                get(value)
            );
        }
        out.push_str("# HELP dx_step_seconds Wall time of one batched UNet step.\n");
        out.push_str("# TYPE dx_step_seconds histogram\n");
        for (bound, bucket) in STEP_BUCKETS.iter().zip(&self.step_buckets) {
            let _ = writeln!(
                out,
                "dx_step_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.step_count);
        let _ = writeln!(out, "dx_step_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "dx_step_seconds_sum {}",
            get(&self.step_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "dx_step_seconds_count {count}");
        out.push_str("# HELP dx_batch_jobs_total Jobs carried by all UNet steps (divide by dx_step_seconds_count for the mean batch).\n");
        out.push_str("# TYPE dx_batch_jobs_total counter\n");
        let _ = writeln!(out, "dx_batch_jobs_total {}", get(&self.batch_jobs_sum));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_every_family_with_its_values() {
        let m = Metrics::default();
        m.job(Outcome::Done);
        m.job(Outcome::Done);
        m.job(Outcome::Busy);
        m.set_load(3, 2);
        m.step(2, 0.3);
        m.step(1, 0.004);
        m.set_engine_up(true);
        m.handshake(true);
        m.handshake(true);
        m.handshake(false);
        let text = m.render();
        for line in [
            "dx_jobs_total{outcome=\"done\"} 2",
            "dx_jobs_total{outcome=\"busy\"} 1",
            "dx_jobs_total{outcome=\"failed\"} 0",
            "dx_queue_depth 3",
            "dx_batch_size 2",
            "dx_handshakes 1",
            "dx_engine_up 1",
            "dx_step_seconds_bucket{le=\"0.005\"} 1",
            "dx_step_seconds_bucket{le=\"0.25\"} 1",
            "dx_step_seconds_bucket{le=\"0.5\"} 2",
            "dx_step_seconds_bucket{le=\"+Inf\"} 2",
            "dx_step_seconds_sum 0.304",
            "dx_step_seconds_count 2",
            "dx_batch_jobs_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.steps(), (2, 3));
    }
}
