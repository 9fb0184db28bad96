//! Running a fleet: N agents with their own state folders (`{state}/sim-0001`, ...), each
//! writing a synthetic report every interval, then waiting until every outbox is empty (the
//! broker acknowledged everything) and shutting down cleanly.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use diffusionx_agent::{Agent, AgentError, AgentOptions, Facts, MqttConfig};
use diffusionx_fleet::payload::DisplayInfo;
use diffusionx_fleet::{PromptPrivacy, SessionReport, Settings};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::synth::Sessions;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `mqtt://host:port`.
    pub broker: String,
    /// The fleet name (topic segment).
    pub fleet: String,
    /// How many kiosks.
    pub kiosks: u32,
    /// The number of the first kiosk (`sim-{first:04}`), so several simulators can share a
    /// broker without sharing names.
    pub first_device: u32,
    /// Reports per kiosk; 0: until stopped.
    pub sessions: u64,
    /// Between two reports of one kiosk (the kiosks' first reports are spread over one
    /// interval). Zero: back to back.
    pub interval: Duration,
    /// The folder holding every kiosk's state folder.
    pub state: PathBuf,
    /// fsync the outboxes (a thousand kiosks fsyncing measure the disk, not the broker).
    pub sync: bool,
    /// The seed of the synthetic sessions.
    pub seed: u64,
    /// Seconds between telemetry samples (5..=3600).
    pub telemetry_interval_s: u32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            broker: "mqtt://127.0.0.1:1883".into(),
            fleet: "sim".into(),
            kiosks: 1,
            first_device: 1,
            sessions: 10,
            interval: Duration::from_millis(1_000),
            state: PathBuf::from("fleetsim-state"),
            sync: true,
            seed: 1,
            telemetry_interval_s: 60,
        }
    }
}

/// How a run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunSummary {
    /// Kiosks run.
    pub kiosks: u32,
    /// Reports handed to the agents in this run.
    pub reports: u64,
    /// Of those, reports whose outbox write failed (kept in memory by their agent).
    pub not_durable: u64,
    /// Reports the broker acknowledged in this run (replays of earlier runs included).
    pub delivered: u64,
    /// Whether the run was stopped before its reports were all written and delivered.
    pub stopped: bool,
}

/// Called after each `Agent::report` with the report and whether it reached the disk.
pub type Observer = Arc<dyn Fn(&SessionReport, bool) + Send + Sync>;

/// The name of kiosk number `index`.
pub fn device_name(index: u32) -> String {
    format!("sim-{index:04}")
}

/// The settings every simulated kiosk starts with.
pub fn settings(telemetry_interval_s: u32) -> Settings {
    Settings {
        preview_steps: 4,
        noise_level: 0.5,
        cloud_steps: 20,
        idle_timeout_s: 120,
        prompt_privacy: PromptPrivacy::Full,
        telemetry_interval_s,
        stats_window_s: 3_600,
        blocklist: Vec::new(),
        noise_policy: Default::default(),
    }
}

/// The agent options of kiosk `device` (state folder `{state}/{device}`).
pub fn agent_options(config: &FleetConfig, device: &str) -> AgentOptions {
    AgentOptions {
        mqtt: MqttConfig {
            broker: config.broker.clone(),
            fleet: config.fleet.clone(),
            device: device.into(),
            username: None,
            password_file: None,
            ca: None,
            cert: None,
            key: None,
            keep_alive_s: 30,
            session_expiry_s: 86_400,
            state_dir: config.state.join(device),
            prompt_salt: String::new(),
        },
        facts: Facts {
            firmware: format!("fleetsim-{}", env!("CARGO_PKG_VERSION")),
            display: DisplayInfo {
                backend: "headless".into(),
                width: 800,
                height: 480,
            },
            models: Vec::new(),
        },
        settings: settings(config.telemetry_interval_s),
        sync: config.sync,
        predictor_width: None,
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts every kiosk's agent (inside a tokio runtime).
pub fn start_agents(config: &FleetConfig) -> Result<Vec<(String, Agent)>> {
    crate::limits::ensure_open_files(u64::from(config.kiosks))?;
    let mut agents = Vec::with_capacity(config.kiosks as usize);
    for i in 0..config.kiosks {
        let device = device_name(config.first_device + i);
        let (agent, _events) = Agent::start(agent_options(config, &device)).map_err(|e| {
            let hint = match &e {
                AgentError::State(io) if io.raw_os_error() == Some(24) => {
                    " (too many open files: raise the limit, e.g. `ulimit -n 4096`)"
                }
                _ => "",
            };
            anyhow::anyhow!("starting the agent of {device}: {e}{hint}")
        })?;
        agents.push((device, agent));
    }
    Ok(agents)
}

/// Runs the fleet: starts the agents, has each write `sessions` reports, waits until every
/// outbox is empty and shuts the agents down. When `stop` completes first, the kiosks stop
/// reporting and shut down at once (what is in their outboxes stays on disk for the next run).
pub async fn run(
    config: &FleetConfig,
    observer: Observer,
    stop: impl Future<Output = ()>,
) -> Result<RunSummary> {
    let agents = start_agents(config)?;
    let mut summary = RunSummary {
        kiosks: config.kiosks,
        ..RunSummary::default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut kiosks = JoinSet::new();
    for (i, (device, agent)) in agents.into_iter().enumerate() {
        let offset = config
            .interval
            .mul_f64(i as f64 / f64::from(config.kiosks.max(1)));
        kiosks.spawn(kiosk(
            device,
            agent,
            config.clone(),
            offset,
            observer.clone(),
            stop_rx.clone(),
        ));
    }
    tokio::pin!(stop);
    let mut agents = Vec::new();
    loop {
        tokio::select! {
            joined = kiosks.join_next() => match joined {
                Some(done) => {
                    let (agent, made, not_durable) = done.context("a kiosk task failed")?;
                    summary.reports += made;
                    summary.not_durable += not_durable;
                    agents.push(agent);
                }
                None => break,
            },
            () = &mut stop, if !summary.stopped => {
                summary.stopped = true;
                stop_tx.send_replace(true);
            }
        }
    }
    // Every kiosk has made its last report: wait for each outbox to drain (woken by each
    // delivery), or for `stop`.
    for agent in &agents {
        if summary.stopped {
            break;
        }
        let mut status = agent.watch_status();
        tokio::select! {
            drained = status.wait_for(|s| s.outbox_pending == 0) => {
                drained.context("an agent stopped before its outbox drained")?;
            }
            () = &mut stop => summary.stopped = true,
        }
    }
    summary.delivered = agents.iter().map(|a| a.status().delivered).sum();
    let mut goodbyes = JoinSet::new();
    for agent in agents {
        goodbyes.spawn(agent.shutdown("simulation over", Duration::from_secs(10)));
    }
    while goodbyes.join_next().await.is_some() {}
    Ok(summary)
}

/// One kiosk: a report every interval until it made `sessions` (or is stopped).
async fn kiosk(
    device: String,
    agent: Agent,
    config: FleetConfig,
    offset: Duration,
    observer: Observer,
    mut stop: watch::Receiver<bool>,
) -> (Agent, u64, u64) {
    let mut sessions = Sessions::new(&device, agent.boot(), config.seed);
    let period = config.interval.max(Duration::from_micros(1));
    let mut ticker = tokio::time::interval_at((Instant::now() + offset).into(), period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut not_durable = 0;
    while config.sessions == 0 || sessions.made() < config.sessions {
        if config.interval.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => break,
            }
        }
        if *stop.borrow() {
            break;
        }
        let report = sessions.next_report(now_ms());
        let durable = agent.report(&report);
        if !durable {
            not_durable += 1;
        }
        observer(&report, durable);
    }
    (agent, sessions.made(), not_durable)
}
