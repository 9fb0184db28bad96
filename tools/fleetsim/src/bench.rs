//! The broker benchmark: a fleet of simulated kiosks against a broker (its own mosquitto by
//! default), measured by one QoS 1 subscriber with a persistent session on
//! `kiosk/v1/{fleet}/+/sessions`.
//!
//! Figures: distinct reports delivered per second (from the first report to the last delivery),
//! end-to-end latency (receive time minus the report's `ts_ms`, which is when `Agent::report`
//! was called: outbox write, the agent's one-in-flight queue, the broker, the subscriber),
//! reports lost (expected minus distinct received: must be 0), duplicates, peak memory.
//!
//! Only the ids this run made count: other simulators on the same broker and fleet
//! (`--first-device`) publish on the same topic, and counting their reports would hide lost ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diffusionx_agent::config::parse_broker;
use diffusionx_fleet::topic;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::fleet::{self, FleetConfig, RunSummary, now_ms};
use crate::machine;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The fleet (its `broker` is replaced by the bench's own mosquitto unless `external`).
    pub fleet: FleetConfig,
    /// Use `fleet.broker` as it is instead of starting a mosquitto.
    pub external: bool,
    /// How long to wait for deliveries after the outboxes are empty.
    pub drain: Duration,
}

/// One report as the subscriber saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The report id.
    pub id: String,
    /// When the kiosk made it (Unix ms).
    pub ts_ms: u64,
    /// When the subscriber received it (Unix ms).
    pub received_ms: u64,
}

/// The figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// The run.
    pub summary: RunSummary,
    /// Reports per kiosk.
    pub sessions: u64,
    /// Between two reports of one kiosk, ms.
    pub interval_ms: u64,
    /// Reports written (what the subscriber must receive).
    pub expected: u64,
    /// Distinct ids received.
    pub distinct: u64,
    /// `expected - distinct`.
    pub lost: u64,
    /// Messages received beyond the first of their id.
    pub duplicates: u64,
    /// Messages on the sessions topic that were not session reports.
    pub malformed: u64,
    /// Reports on the sessions topic that this run did not make (other simulators or kiosks,
    /// earlier runs), left out of every other figure.
    pub foreign: u64,
    /// Distinct reports per second from the first report to the last delivery.
    pub rate: f64,
    /// Latency percentiles, ms (first arrival of each id).
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Maximum, ms.
    pub max_ms: u64,
    /// Seconds to start every agent (state folders, boot counters).
    pub start_s: f64,
    /// Seconds from the first report to the last delivery.
    pub window_s: f64,
    /// This process's peak RSS, MiB.
    pub peak_rss_mb: Option<u64>,
    /// The broker's peak RSS, MiB (own broker only).
    pub broker_peak_rss_mb: Option<u64>,
    /// The broker measured.
    pub broker: Broker,
}

/// The broker a benchmark ran against.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Broker {
    /// Not known yet ([`figures`] leaves it so).
    #[default]
    Unknown,
    /// The bench's own mosquitto on this machine: its version line.
    Own(String),
    /// `--broker`: its URL (its machine, persistence and logging are not the bench's to know).
    External(String),
}

#[derive(Deserialize)]
struct Stamp {
    id: String,
    ts_ms: u64,
}

/// Records every session report on a filter, with its receive time.
struct Subscriber {
    samples: Arc<Mutex<Vec<Sample>>>,
    malformed: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(broker: &str, filter: String) -> Result<Subscriber> {
        let address = parse_broker(broker).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            !address.tls,
            "the benchmark's subscriber speaks mqtt:// only"
        );
        let id = format!("fleetsim-bench-{}-{}", std::process::id(), now_ms());
        let mut options = MqttOptions::new(id, address.host, address.port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3_600))
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let malformed = Arc::new(Mutex::new(0));
        let (subscribed, ready) = oneshot::channel();
        let (sink, bad) = (samples.clone(), malformed.clone());
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(filter.clone(), QoS::AtLeastOnce)
                            .await
                            .ok();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            tx.send(()).ok();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let received_ms = now_ms();
                        match serde_json::from_slice::<Stamp>(&p.payload) {
                            Ok(stamp) => lock(&sink).push(Sample {
                                id: stamp.id,
                                ts_ms: stamp.ts_ms,
                                received_ms,
                            }),
                            Err(_) => *lock(&bad) += 1,
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("the subscriber was not subscribed within 10 s")?
            .context("the subscriber stopped")?;
        Ok(Subscriber {
            samples,
            malformed,
            task,
        })
    }

    /// How many of `made` arrived (other ids on the topic are not this run's).
    fn distinct_of(&self, made: &BTreeSet<String>) -> usize {
        let samples = lock(&self.samples);
        let mut ids: Vec<&str> = samples
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| made.contains(*id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the benchmark (inside a tokio runtime).
pub async fn bench(config: BenchConfig) -> Result<BenchResult> {
    let scratch = tempfile::tempdir().context("a scratch folder")?;
    let mut fleet = config.fleet.clone();
    fleet.state = scratch.path().join("state");
    let broker = if config.external {
        None
    } else {
        let broker = diffusionx_testkit::Mosquitto::start_quiet(&scratch.path().join("broker"))?;
        fleet.broker = broker.url();
        Some(broker)
    };
    let filter = topic::filter(Some(&fleet.fleet), None, "sessions");
    let subscriber = Subscriber::start(&fleet.broker, filter).await?;

    let started = Instant::now();
    let agents_started = Arc::new(Mutex::new(None::<Instant>));
    let made = Arc::new(Mutex::new(BTreeSet::new()));
    let (first, ids) = (agents_started.clone(), made.clone());
    let observer: fleet::Observer = Arc::new(move |report, _| {
        lock(&first).get_or_insert_with(Instant::now);
        lock(&ids).insert(report.id.clone());
    });
    let summary = fleet::run(&fleet, observer, std::future::pending()).await?;
    let made = std::mem::take(&mut *lock(&made));
    // Kiosk 0 reports as soon as it runs: the first report marks the end of the start-up.
    let start_s = lock(&agents_started).map_or(0.0, |at| (at - started).as_secs_f64());
    let deadline = Instant::now() + config.drain;
    while subscriber.distinct_of(&made) < made.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = lock(&subscriber.samples).clone();
    let malformed = *lock(&subscriber.malformed);
    let broker_peak_rss_mb = broker
        .as_ref()
        .and_then(|b| b.pid())
        .and_then(|pid| machine::peak_rss_mb(&pid.to_string()));
    let mut result = figures(&samples, &made);
    result.summary = summary;
    result.sessions = fleet.sessions;
    result.interval_ms = fleet.interval.as_millis() as u64;
    result.malformed = malformed;
    result.start_s = start_s;
    result.peak_rss_mb = machine::peak_rss_mb("self");
    result.broker_peak_rss_mb = broker_peak_rss_mb;
    result.broker = match broker {
        Some(_) => Broker::Own(mosquitto_version()),
        None => Broker::External(fleet.broker.clone()),
    };
    Ok(result)
}

fn mosquitto_version() -> String {
    diffusionx_testkit::mosquitto_binary()
        .ok()
        .and_then(|bin| std::process::Command::new(bin).arg("-h").output().ok())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mosquitto".into())
}

/// The delivery figures of `samples` for the reports `made` by this run (the run's fields left
/// default); samples of other ids are only counted as `foreign`.
pub fn figures(samples: &[Sample], made: &BTreeSet<String>) -> BenchResult {
    let expected = made.len() as u64;
    let ours: Vec<&Sample> = samples.iter().filter(|s| made.contains(&s.id)).collect();
    let mut first: BTreeMap<&str, &Sample> = BTreeMap::new();
    for sample in &ours {
        first.entry(sample.id.as_str()).or_insert(sample);
    }
    let distinct = first.len() as u64;
    let mut latencies: Vec<u64> = first
        .values()
        .map(|s| s.received_ms.saturating_sub(s.ts_ms))
        .collect();
    latencies.sort_unstable();
    let quantile = |q: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    let start = first.values().map(|s| s.ts_ms).min().unwrap_or(0);
    let end = first.values().map(|s| s.received_ms).max().unwrap_or(0);
    let window_s = end.saturating_sub(start) as f64 / 1000.0;
    BenchResult {
        summary: RunSummary::default(),
        sessions: 0,
        interval_ms: 0,
        expected,
        distinct,
        lost: expected.saturating_sub(distinct),
        duplicates: ours.len() as u64 - distinct,
        malformed: 0,
        foreign: (samples.len() - ours.len()) as u64,
        rate: if window_s > 0.0 {
            distinct as f64 / window_s
        } else {
            0.0
        },
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: latencies.last().copied().unwrap_or(0),
        start_s: 0.0,
        window_s,
        peak_rss_mb: None,
        broker_peak_rss_mb: None,
        broker: Broker::Unknown,
    }
}

/// The section's broker line.
fn broker_line(broker: &Broker) -> String {
    match broker {
        Broker::Own(version) => format!(
            "{version}, started by the bench on the same machine, persistence on (autosave every \
             second), logging errors and warnings only"
        ),
        Broker::External(url) => format!(
            "external, `{url}` (`--broker`): its machine, version, persistence and load are not \
             measured here"
        ),
        Broker::Unknown => "unknown".into(),
    }
}

/// The markdown section for `docs/benchmarks.md`.
pub fn markdown(result: &BenchResult, sync: bool, command: &str, today: &str) -> String {
    let kiosks = result.summary.kiosks;
    let offered = if result.interval_ms == 0 {
        "as fast as acknowledged".to_string()
    } else {
        format!(
            "{:.0}/s",
            f64::from(kiosks) * 1000.0 / result.interval_ms as f64
        )
    };
    let mib = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let outbox = if sync {
        "fsynced (`--sync`): this measures the disk as much as the broker".to_string()
    } else {
        "not fsynced (the default `--no-sync`: a thousand kiosks fsyncing every report would \
         measure this machine's disk, not the broker); files are still written and removed"
            .to_string()
    };
    format!(
        "\n## Fleet simulator: {kiosks} kiosks over MQTT ({today})\n\n\
         - machine: {machine}\n\
         - command: `{command}`\n\
         - broker: {broker}\n\
         - outbox: {outbox}\n\
         - load: {kiosks} kiosks, {sessions} reports each, one every {interval} ms per kiosk \
         (offered {offered}); every kiosk is a real agent with its own MQTT connection, one \
         QoS 1 report in flight at a time\n\
         - measured by one QoS 1 subscriber (persistent session) on `kiosk/v1/{{fleet}}/+/sessions`; \
         latency = receive time minus the report's `ts_ms` (when `Agent::report` was called); \
         rate = distinct reports / time from the first report to the last delivery \
         ({window:.1} s); agents started in {start:.1} s (not in the window); only this run's \
         report ids count ({foreign} other reports on the topic left out)\n\n\
         | kiosks | reports | offered | delivered/s | p50 ms | p99 ms | max ms | lost | duplicates | fleetsim peak RSS MiB | broker peak RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n\
         | {kiosks} | {expected} | {offered} | {rate:.0} | {p50} | {p99} | {max} | {lost} | {dups} | {rss} | {brss} |\n",
        machine = machine::machine(),
        broker = broker_line(&result.broker),
        foreign = result.foreign,
        sessions = result.sessions,
        interval = result.interval_ms,
        window = result.window_s,
        start = result.start_s,
        expected = result.expected,
        rate = result.rate,
        p50 = result.p50_ms,
        p99 = result.p99_ms,
        max = result.max_ms,
        lost = result.lost,
        dups = result.duplicates,
        rss = mib(result.peak_rss_mb),
        brss = mib(result.broker_peak_rss_mb),
    )
}

/// `YYYY-MM-DD` of a Unix time in ms (UTC; Howard Hinnant's civil-from-days).
pub fn date(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, ts_ms: u64, received_ms: u64) -> Sample {
        Sample {
            id: id.into(),
            ts_ms,
            received_ms,
        }
    }

    #[test]
    fn figures_count_first_arrivals_duplicates_and_losses() {
        let samples = [
            sample("a-1-1", 1_000, 1_010),
            sample("a-1-2", 1_100, 1_130),
            sample("a-1-1", 1_000, 1_500),
            sample("b-1-1", 1_200, 3_000),
        ];
        let made = ids(&["a-1-1", "a-1-2", "b-1-1", "b-1-2"]);
        let result = figures(&samples, &made);
        assert_eq!((result.distinct, result.lost, result.duplicates), (3, 1, 1));
        assert_eq!(
            (result.p50_ms, result.p99_ms, result.max_ms),
            (30, 1_800, 1_800)
        );
        assert_eq!(result.window_s, 2.0);
        assert_eq!(result.rate, 1.5);
    }

    fn ids(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    /// Another simulator on the same fleet (`--first-device 3`) and an earlier boot of ours
    /// deliver as many reports as we lost: they must not fill the gap.
    #[test]
    fn reports_this_run_did_not_make_do_not_hide_losses() {
        let samples = [
            sample("sim-0001-1-1", 1_000, 1_010),
            sample("sim-0003-1-1", 1_000, 1_020),
            sample("sim-0003-1-1", 1_000, 1_030),
            sample("sim-0002-0-1", 900, 1_040),
        ];
        let made = ids(&["sim-0001-1-1", "sim-0001-1-2", "sim-0002-1-1"]);
        let result = figures(&samples, &made);
        assert_eq!(
            (
                result.expected,
                result.distinct,
                result.lost,
                result.duplicates,
                result.foreign
            ),
            (3, 1, 2, 0, 3)
        );
        assert_eq!((result.p50_ms, result.max_ms), (10, 10));
    }

    #[test]
    fn an_external_broker_is_not_described_as_the_bench_own() {
        let mut result = figures(&[], &BTreeSet::new());
        result.broker = Broker::External("mqtt://broker.lan:1883".into());
        let section = markdown(&result, false, "fleetsim bench", "2026-11-27");
        assert!(
            section.contains("- broker: external, `mqtt://broker.lan:1883` (`--broker`)"),
            "{section}"
        );
        assert!(!section.contains("same machine"), "{section}");
        result.broker = Broker::Own("mosquitto version 2.0.18".into());
        let section = markdown(&result, false, "fleetsim bench", "2026-11-27");
        assert!(
            section.contains(
                "- broker: mosquitto version 2.0.18, started by the bench on the same machine"
            ),
            "{section}"
        );
    }

    #[test]
    fn dates_of_known_days() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400_000), "2000-02-29");
        assert_eq!(date(1_764_028_800_000), "2025-11-25");
    }
}
