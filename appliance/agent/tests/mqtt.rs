//! The agent against a real mosquitto: presence with the boot counter, birth facts, every
//! session report delivered exactly once (by id) through a broker restart and link cuts,
//! commands with correlation, desired configuration accepted and refused, a refused version
//! still reported as refused after commands and restarts, saved settings that no longer fit,
//! connection failures in the status, refused reports sent again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use diffusionx_agent::{Agent, AgentEvent, AgentOptions, Facts, MqttConfig};
use diffusionx_fleet::payload::DisplayInfo;
use diffusionx_fleet::{
    CommandReply, ConfigReported, Finalize, Presence, PresenceState, PromptPrivacy, RoundReport,
    SessionReport, Settings,
};
use diffusionx_testkit::{Collector, Mosquitto, Received, Relay};

const WAIT: Duration = Duration::from_secs(30);

fn settings() -> Settings {
    Settings {
        preview_steps: 4,
        noise_level: 0.5,
        cloud_steps: 20,
        idle_timeout_s: 60,
        prompt_privacy: PromptPrivacy::Full,
        telemetry_interval_s: 3600,
        stats_window_s: 3600,
        blocklist: vec![],
        noise_policy: Default::default(),
    }
}

fn logs() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init()
        .ok();
}

fn options(port: u16, device: &str, state: &Path) -> AgentOptions {
    AgentOptions {
        mqtt: MqttConfig {
            broker: format!("mqtt://127.0.0.1:{port}"),
            fleet: "museum".into(),
            device: device.into(),
            username: None,
            password_file: None,
            ca: None,
            cert: None,
            key: None,
            keep_alive_s: 5,
            session_expiry_s: 3600,
            state_dir: state.into(),
            prompt_salt: String::new(),
        },
        facts: Facts {
            firmware: "test-1.0".into(),
            display: DisplayInfo {
                backend: "headless".into(),
                width: 800,
                height: 480,
            },
            models: vec![],
        },
        settings: settings(),
        sync: true,
        predictor_width: Some(4),
    }
}

fn session(agent: &Agent, number: u64) -> SessionReport {
    SessionReport {
        id: SessionReport::make_id("k1", agent.boot(), number),
        boot: agent.boot(),
        number,
        ts_ms: 1_700_000_000_000 + number,
        rounds: vec![RoundReport {
            prompt: None,
            tokens: Some(5),
            seed: number,
            steps: 4,
            width: 256,
            height: 256,
            preview_ms: Some(1_000 + number),
        }],
        finalize: Some(Finalize {
            noise_level: 0.5,
            path: Some("cloud".into()),
            refine_ms: Some(3_000),
            queue_depth: Some(0),
            expected_wait_ms: Some(0),
            fallback_reason: None,
            predictor: None,
            predictor_error: None,
        }),
        thumbs_up: None,
        ending: "finished".into(),
        extra: BTreeMap::new(),
    }
}

/// Distinct report ids received, and how many arrived more than once.
fn ids(received: &[Received]) -> (Vec<String>, usize) {
    let mut seen = BTreeMap::new();
    for message in received.iter().filter(|m| m.topic.ends_with("/sessions")) {
        if let Ok(report) = serde_json::from_slice::<SessionReport>(&message.payload) {
            *seen.entry(report.id).or_insert(0usize) += 1;
        }
    }
    let duplicates = seen.values().map(|n| n - 1).sum();
    (seen.into_keys().collect(), duplicates)
}

fn expected(boot: u64, numbers: std::ops::RangeInclusive<u64>) -> Vec<String> {
    let mut ids: Vec<String> = numbers
        .map(|n| SessionReport::make_id("k1", boot, n))
        .collect();
    ids.sort();
    ids
}

fn last_presence(received: &[Received]) -> Option<Presence> {
    received
        .iter()
        .rev()
        .find(|m| m.topic.ends_with("/status"))
        .and_then(|m| serde_json::from_slice(&m.payload).ok())
}

/// Waits (up to `WAIT`) for the agent's status to satisfy `done`, woken by each change.
async fn wait_status(
    agent: &Agent,
    what: &str,
    done: impl FnMut(&diffusionx_agent::AgentStatus) -> bool,
) -> Result<()> {
    let mut status = agent.watch_status();
    tokio::time::timeout(WAIT, status.wait_for(done))
        .await
        .with_context(|| format!("timed out waiting until {what}: {:?}", agent.status()))?
        .context("the agent stopped")?;
    Ok(())
}

async fn wait_delivered(agent: &Agent, count: u64) -> Result<()> {
    wait_status(agent, &format!("{count} delivered"), |s| {
        s.delivered >= count && s.outbox_pending == 0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_birth_facts_reports_and_the_last_will() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = Collector::start(broker.port(), "watcher", "kiosk/v1/museum/#");
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    assert_eq!(agent.boot(), 1);
    for n in 1..=3 {
        assert!(agent.report(&session(&agent, n)), "written to disk");
    }
    let got = watcher
        .wait(WAIT, |r| {
            ids(r).0.len() == 3 && r.iter().any(|m| m.topic.ends_with("/info"))
        })
        .await;
    assert_eq!(ids(&got), (expected(1, 1..=3), 0));
    let online = last_presence(&got).context("a status")?;
    assert_eq!(
        (online.state, online.boot, online.conn),
        (PresenceState::Online, 1, 1)
    );
    let info = got
        .iter()
        .find(|m| m.topic == "kiosk/v1/museum/k1/info")
        .context("info")?;
    assert!(
        info.payload.windows(8).any(|w| w == b"test-1.0"),
        "firmware in info"
    );
    wait_delivered(&agent, 3).await?;
    assert!(
        std::fs::read_dir(dir.path().join("k1/outbox"))?
            .next()
            .is_none(),
        "the outbox is empty once the broker acknowledged everything"
    );

    // Killed without a goodbye: the broker publishes the will, naming boot 1, connection 1.
    agent.abort();
    let got = watcher
        .wait(WAIT, |r| {
            last_presence(r).is_some_and(|p| p.state == PresenceState::Offline)
        })
        .await;
    let will = last_presence(&got).context("a status")?;
    assert_eq!(
        (will.state, will.boot, will.conn, will.reason.as_deref()),
        (PresenceState::Offline, 1, 1, Some("connection lost"))
    );

    // The next boot comes online with boot 2, and a clean shutdown says why it left.
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    assert_eq!(agent.boot(), 2);
    watcher
        .wait(WAIT, |r| last_presence(r).is_some_and(|p| p.boot == 2))
        .await;
    agent.shutdown("maintenance", WAIT).await;
    let got = watcher
        .wait(WAIT, |r| {
            last_presence(r).is_some_and(|p| p.state == PresenceState::Offline && p.boot == 2)
        })
        .await;
    let bye = last_presence(&got).context("a status")?;
    assert_eq!(
        (bye.state, bye.boot, bye.reason.as_deref()),
        (PresenceState::Offline, 2, Some("maintenance"))
    );
    // The retained status a newcomer sees is the goodbye, not a will.
    let newcomer = Collector::start(broker.port(), "newcomer", "kiosk/v1/museum/k1/status");
    let seen = newcomer.wait(WAIT, |r| !r.is_empty()).await;
    assert_eq!(
        last_presence(&seen).and_then(|p| p.reason),
        Some("maintenance".into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_arrives_once_through_a_broker_restart() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let mut broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = Collector::start(broker.port(), "watcher", "kiosk/v1/museum/+/sessions");
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    for n in 1..=60 {
        agent.report(&session(&agent, n));
        if n == 20 {
            broker.stop()?;
        }
        if n == 40 {
            broker.restart()?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = watcher.wait(WAIT, |r| ids(r).0.len() == 60).await;
    let (distinct, duplicates) = ids(&got);
    assert_eq!(distinct, expected(1, 1..=60), "{}", broker.log());
    // At most the one report in flight when the broker went away can arrive twice.
    assert!(duplicates <= 1, "{duplicates} duplicates");
    wait_delivered(&agent, 60).await?;
    assert!(agent.status().connections >= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_arrives_once_through_link_cuts() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let relay = Relay::start(broker.port())?;
    let watcher = Collector::start(broker.port(), "watcher", "kiosk/v1/museum/+/sessions");
    let (agent, _events) = Agent::start(options(relay.port(), "k1", &dir.path().join("k1")))?;
    for n in 1..=60 {
        agent.report(&session(&agent, n));
        if matches!(n, 10 | 25 | 40) {
            // Cut only a live link, so every cut is a real one.
            wait_status(&agent, "connected", |s| s.connected).await?;
            relay.set_down(true);
            wait_status(&agent, "disconnected", |s| !s.connected).await?;
            if n != 40 {
                relay.set_down(false);
            }
        }
        if n == 50 {
            relay.set_down(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = watcher.wait(WAIT, |r| ids(r).0.len() == 60).await;
    let (distinct, duplicates) = ids(&got);
    assert_eq!(distinct, expected(1, 1..=60));
    assert!(duplicates <= 3, "at most one per cut: {duplicates}");
    wait_delivered(&agent, 60).await?;
    assert_eq!(
        agent.status().connections,
        4,
        "three cuts, three reconnects"
    );
    Ok(())
}

/// The operator's subscription to `k1`'s `resp/ops`: every reply with its correlation data
/// (the testkit's `Collector` keeps no MQTT properties).
struct Replies {
    received: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, Option<Vec<u8>>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Replies {
    /// Connects and returns once the broker granted the subscription.
    async fn start(port: u16) -> Result<Replies> {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("ops-replies", "127.0.0.1", port), 10);
        let (sink, received) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed, granted) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        client
                            .subscribe("kiosk/v1/museum/k1/resp/ops", QoS::AtLeastOnce)
                            .await
                            .ok();
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(subscribed) = subscribed.take() {
                            subscribed.send(()).ok();
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let correlation = p
                            .properties
                            .and_then(|p| p.correlation_data)
                            .map(|c| c.to_vec());
                        sink.send((p.payload.to_vec(), correlation)).ok();
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(WAIT, granted)
            .await
            .context("no SUBACK for resp/ops")??;
        Ok(Replies { received, task })
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends command `name` with `correlation` and returns the reply, checking that it carries
/// the same correlation data (operators' tools match replies on it).
async fn command(
    operator: &rumqttc::v5::AsyncClient,
    replies: &mut Replies,
    name: &str,
    args: serde_json::Value,
    correlation: &[u8],
) -> Result<CommandReply> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let properties = PublishProperties {
        response_topic: Some("kiosk/v1/museum/k1/resp/ops".into()),
        correlation_data: Some(correlation.to_vec().into()),
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    operator
        .publish_with_properties(
            format!("kiosk/v1/museum/k1/cmd/{name}"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&args)?,
            properties,
        )
        .await?;
    let (payload, echoed) = tokio::time::timeout(WAIT, replies.received.recv())
        .await
        .with_context(|| format!("no reply to {name}"))?
        .context("the reply subscriber stopped")?;
    assert_eq!(
        echoed.as_deref(),
        Some(correlation),
        "the reply to {name} carries the request's correlation data"
    );
    Ok(serde_json::from_slice(&payload)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_desired_configuration() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let mut replies = Replies::start(broker.port()).await?;
    let reported = Collector::start(
        broker.port(),
        "ops-config",
        "kiosk/v1/museum/k1/config/reported",
    );
    let (agent, mut events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    let mut settings = agent.settings();
    // The birth report: the file's settings, nothing desired yet.
    let first = reported.wait(WAIT, |r| !r.is_empty()).await;
    let birth: ConfigReported =
        serde_json::from_slice(&first.first().context("reported")?.payload)?;
    assert_eq!(
        (birth.version, birth.applied_version, birth.settings.clone()),
        (0, 0, self::settings())
    );

    let (operator, mut eventloop) = rumqttc::v5::AsyncClient::new(
        rumqttc::v5::MqttOptions::new("ops", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });

    let pong = command(
        &operator,
        &mut replies,
        "ping",
        serde_json::json!({}),
        b"c1",
    )
    .await?;
    assert!(pong.ok);
    assert_eq!(
        pong.result.as_ref().and_then(|r| r["boot"].as_u64()),
        Some(1)
    );

    let config = command(
        &operator,
        &mut replies,
        "get-config",
        serde_json::json!({}),
        b"g1",
    )
    .await?;
    assert_eq!(
        config.result,
        Some(serde_json::Value::Object(self::settings().to_json()))
    );
    // Each f32 as written: 0.8, not 0.800000011920929.
    assert_eq!(
        config.result.as_ref().map(|r| r["quality_target"].clone()),
        Some(serde_json::json!(0.8))
    );
    let flushed = command(
        &operator,
        &mut replies,
        "report-now",
        serde_json::json!({}),
        b"r1",
    )
    .await?;
    assert_eq!(
        flushed.result,
        Some(serde_json::json!({"outbox_pending": 0}))
    );
    let refused = command(
        &operator,
        &mut replies,
        "set-config",
        serde_json::json!({"preview_steps": 0}),
        b"c2",
    )
    .await?;
    assert!(!refused.ok);
    assert_eq!(
        refused
            .result
            .as_ref()
            .map(|r| r["errors"]["preview_steps"].clone()),
        Some("0 is outside 1..=50".into())
    );
    assert_eq!(settings.borrow().preview_steps, 4, "the old settings stay");

    let blocked = command(
        &operator,
        &mut replies,
        "set-blocklist",
        serde_json::json!({"words": ["gore"]}),
        b"c3",
    )
    .await?;
    assert!(blocked.ok, "{blocked:?}");
    settings.changed().await?;
    assert_eq!(settings.borrow_and_update().blocklist, vec!["gore"]);

    let unknown = command(
        &operator,
        &mut replies,
        "format-disk",
        serde_json::json!({}),
        b"c4",
    )
    .await?;
    assert_eq!(unknown.error.as_deref(), Some("unknown command"));

    // Desired configuration: version 5 refused as a whole, version 6 applied.
    operator
        .publish(
            "kiosk/v1/museum/k1/config/desired",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&serde_json::json!({"version": 5, "settings": {"preview_steps": 8, "noise_level": 7}}))?,
        )
        .await?;
    let got = reported
        .wait(WAIT, |r| {
            r.iter()
                .any(|m| m.payload.windows(12).any(|w| w == b"\"version\":5,"))
        })
        .await;
    let five: ConfigReported = got
        .iter()
        .filter_map(|m| serde_json::from_slice::<ConfigReported>(&m.payload).ok())
        .find(|r| r.version == 5)
        .context("version 5 reported")?;
    assert!(!five.accepted);
    assert_eq!(five.errors.keys().collect::<Vec<_>>(), ["noise_level"]);
    assert_eq!(five.settings.preview_steps, 4);
    operator
        .publish(
            "kiosk/v1/museum/k1/config/desired",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(
                &serde_json::json!({"version": 6, "settings": {"preview_steps": 8}}),
            )?,
        )
        .await?;
    settings.changed().await?;
    assert_eq!(settings.borrow().preview_steps, 8);
    assert_eq!(
        settings.borrow().blocklist,
        Vec::<String>::new(),
        "desired replaces command changes"
    );

    let restart = command(
        &operator,
        &mut replies,
        "restart",
        serde_json::json!({}),
        b"c5",
    )
    .await?;
    assert!(restart.ok);
    let event = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(event, Some(AgentEvent::Restart));

    // The accepted settings survive a restart of the kiosk.
    agent.shutdown("restart", WAIT).await;
    let (agent, events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    assert_eq!(agent.settings().borrow().preview_steps, 8);

    // A host that does not act on restarts (it dropped the events, as the fleet simulator
    // does) is not claimed to restart.
    drop(events);
    wait_status(&agent, "connected", |s| s.connected).await?;
    let refused = command(
        &operator,
        &mut replies,
        "restart",
        serde_json::json!({}),
        b"c6",
    )
    .await?;
    assert_eq!(
        (refused.ok, refused.error.as_deref()),
        (false, Some(diffusionx_agent::NO_RESTART))
    );
    agent.shutdown("done", WAIT).await;
    Ok(())
}

/// Weights for a `width`-value text embedding: `17 -> 10` on the levels 0.1 .. 1.0.
fn weights(version: &str, width: usize) -> Result<diffusionx_predictor::Weights> {
    use diffusionx_predictor::{Activation, INPUT_LEN, Layer, Projection, Weights};
    Ok(Weights::new(
        version.into(),
        (1..=10).map(|i| i as f32 / 10.0).collect(),
        Projection::standard(width)?,
        vec![Layer {
            w: vec![vec![0.01; INPUT_LEN]; 10],
            b: vec![0.0; 10],
            activation: Activation::Linear,
        }],
    )?)
}

async fn desired(
    operator: &rumqttc::v5::AsyncClient,
    reported: &Collector,
    body: serde_json::Value,
) -> Result<ConfigReported> {
    let version = body["version"].as_u64().context("a version")?;
    operator
        .publish(
            "kiosk/v1/museum/k1/config/desired",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&body)?,
        )
        .await?;
    let got = reported
        .wait(WAIT, |r| {
            r.iter().any(|m| {
                serde_json::from_slice::<ConfigReported>(&m.payload)
                    .is_ok_and(|c| c.version == version)
            })
        })
        .await;
    got.iter()
        .filter_map(|m| serde_json::from_slice::<ConfigReported>(&m.payload).ok())
        .find(|r| r.version == version)
        .context("the version reported")
}

/// A broker, kiosk `k1`'s agent (its birth report seen), an operator client and a collector
/// of `k1`'s `config/reported`.
struct ConfigSetup {
    dir: tempfile::TempDir,
    broker: Mosquitto,
    reported: Collector,
    state: std::path::PathBuf,
    agent: Agent,
    events: tokio::sync::mpsc::UnboundedReceiver<AgentEvent>,
    operator: rumqttc::v5::AsyncClient,
}

async fn config_setup() -> Result<ConfigSetup> {
    logs();
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let reported = Collector::start(
        broker.port(),
        "ops-config",
        "kiosk/v1/museum/k1/config/reported",
    );
    let state = dir.path().join("k1");
    let (agent, events) = Agent::start(options(broker.port(), "k1", &state))?;
    reported.wait(WAIT, |r| !r.is_empty()).await;
    let (operator, mut eventloop) = rumqttc::v5::AsyncClient::new(
        rumqttc::v5::MqttOptions::new("ops", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    Ok(ConfigSetup {
        dir,
        broker,
        reported,
        state,
        agent,
        events,
        operator,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictor_weights_arrive_over_the_config_channel_and_survive_a_restart() -> Result<()> {
    let ConfigSetup {
        dir: _dir,
        broker,
        reported,
        state,
        agent,
        mut events,
        operator,
    } = config_setup().await?;

    // Weights for another text encoder are refused with the reason; nothing changes.
    let wrong = serde_json::from_str::<serde_json::Value>(&weights("wide-1", 768)?.to_json())?;
    let refused = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 1, "settings": {}, "predictor": wrong}),
    )
    .await?;
    assert!(!refused.accepted);
    assert!(
        refused.errors["predictor"].contains("768-value text embedding"),
        "{:?}",
        refused.errors
    );
    assert_eq!(refused.predictor, None);
    // Malformed weights too, and with them the settings of the same version.
    let refused = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 2, "settings": {"preview_steps": 8},
                           "predictor": {"format": "nonsense"}}),
    )
    .await?;
    assert!(!refused.accepted);
    assert_eq!(agent.settings().borrow().preview_steps, 4);

    // Fitting weights: accepted, reported by model version, handed to the kiosk.
    let good = weights("museum-3", 4)?;
    let body = serde_json::from_str::<serde_json::Value>(&good.to_json())?;
    let accepted = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 3, "settings": {}, "predictor": body}),
    )
    .await?;
    assert!(accepted.accepted, "{:?}", accepted.errors);
    assert_eq!(accepted.predictor.as_deref(), Some("museum-3"));
    let event = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(
        event,
        Some(AgentEvent::Predictor(Some(std::sync::Arc::new(
            good.clone()
        ))))
    );

    // They survive a restart: the new agent hands them over at once.
    agent.shutdown("restart", WAIT).await;
    let (agent, mut events) = Agent::start(options(broker.port(), "k1", &state))?;
    let event = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(
        event,
        Some(AgentEvent::Predictor(Some(std::sync::Arc::new(good))))
    );

    // A version without weights gives the kiosk back its own.
    let plain = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 4, "settings": {}}),
    )
    .await?;
    assert!(plain.accepted);
    assert_eq!(plain.predictor, None);
    let event = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(event, Some(AgentEvent::Predictor(None)));
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_weights_that_no_longer_fit_the_model_are_reported_not_silently_dropped() -> Result<()>
{
    let ConfigSetup {
        dir: _dir,
        broker,
        reported,
        state,
        agent,
        mut events,
        operator,
    } = config_setup().await?;
    let body = serde_json::from_str::<serde_json::Value>(&weights("museum-3", 4)?.to_json())?;
    let accepted = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 1, "settings": {}, "predictor": body}),
    )
    .await?;
    assert!(accepted.accepted);
    tokio::time::timeout(WAIT, events.recv()).await?;
    agent.shutdown("model update", WAIT).await;

    // The kiosk comes back with a model whose text encoder gives 8 values.
    let mut wider = options(broker.port(), "k1", &state);
    wider.predictor_width = Some(8);
    let before = reported.received().len();
    let (agent, mut events) = Agent::start(wider)?;
    let got = reported.wait(WAIT, |r| r.len() > before).await;
    let birth: ConfigReported = serde_json::from_slice(&got[before].payload)?;
    assert_eq!((birth.version, birth.applied_version), (1, 1));
    assert_eq!(birth.predictor, None, "the kiosk's own weights decide");
    assert!(
        birth.errors["predictor"]
            .starts_with("saved weights ignored: the weights project a 4-value"),
        "{:?}",
        birth.errors
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "no weights handed to the kiosk"
    );
    // The next accepted version clears it.
    let next = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 2, "settings": {}}),
    )
    .await?;
    assert!(next.accepted && next.errors.is_empty(), "{:?}", next.errors);
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_version_stays_reported_refused_after_commands_and_restarts() -> Result<()> {
    let ConfigSetup {
        dir: _dir,
        broker,
        reported,
        state,
        agent,
        events: _events,
        operator,
    } = config_setup().await?;
    let mut replies = Replies::start(broker.port()).await?;
    let four = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 4, "settings": {"preview_steps": 8}}),
    )
    .await?;
    assert!(four.accepted);
    let five = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 5, "settings": {"noise_level": 7}}),
    )
    .await?;
    let refusal = (5, false, 4, five.errors.clone());
    assert_eq!(
        (five.version, five.accepted, five.applied_version),
        (5, false, 4)
    );
    assert_eq!(five.errors.keys().collect::<Vec<_>>(), ["noise_level"]);

    // A command changes the settings in force: the report that follows still answers 5 with
    // its refusal.
    let before = reported.received().len();
    let blocked = command(
        &operator,
        &mut replies,
        "set-blocklist",
        serde_json::json!({"words": ["gore"]}),
        b"b1",
    )
    .await?;
    assert!(blocked.ok, "{blocked:?}");
    let got = reported.wait(WAIT, |r| r.len() > before).await;
    let after: ConfigReported =
        serde_json::from_slice(&got.get(before).context("a report")?.payload)?;
    assert_eq!(
        (
            after.version,
            after.accepted,
            after.applied_version,
            after.errors
        ),
        refusal.clone()
    );
    assert_eq!(after.settings.blocklist, ["gore"]);

    // A restart (and so a reconnect): the birth report and the retained one say the same.
    agent.shutdown("restart", WAIT).await;
    let before = reported.received().len();
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &state))?;
    let got = reported.wait(WAIT, |r| r.len() > before).await;
    let birth: ConfigReported =
        serde_json::from_slice(&got.get(before).context("a report")?.payload)?;
    assert_eq!(
        (
            birth.version,
            birth.accepted,
            birth.applied_version,
            birth.errors
        ),
        refusal.clone()
    );
    agent.shutdown("done", WAIT).await;
    let newcomer = Collector::start(
        broker.port(),
        "newcomer",
        "kiosk/v1/museum/k1/config/reported",
    );
    let seen = newcomer.wait(WAIT, |r| !r.is_empty()).await;
    let retained: ConfigReported =
        serde_json::from_slice(&seen.first().context("a retained report")?.payload)?;
    assert_eq!(
        (
            retained.version,
            retained.accepted,
            retained.applied_version,
            retained.errors
        ),
        refusal
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_settings_that_no_longer_fit_are_reported_and_the_kiosk_starts() -> Result<()> {
    let ConfigSetup {
        dir: _dir,
        broker,
        reported,
        state,
        agent,
        events: _events,
        operator,
    } = config_setup().await?;
    let one = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 1, "settings": {"min_noise_level": 0.6, "preview_steps": 8}}),
    )
    .await?;
    assert!(one.accepted, "{:?}", one.errors);
    agent.shutdown("configuration update", WAIT).await;

    // The kiosk's own file now caps the level below the operators' minimum.
    let mut changed = options(broker.port(), "k1", &state);
    changed.settings.noise_policy.max_noise_level = 0.5;
    let base = changed.settings.clone();
    let before = reported.received().len();
    let (agent, _events) = Agent::start(changed)?;
    assert_eq!(*agent.settings().borrow(), base, "the file's settings");
    let got = reported.wait(WAIT, |r| r.len() > before).await;
    let birth: ConfigReported =
        serde_json::from_slice(&got.get(before).context("a report")?.payload)?;
    assert_eq!(
        (birth.version, birth.accepted, birth.applied_version),
        (1, false, 0),
        "version 1 is not in force"
    );
    assert_eq!(birth.settings, base);
    assert_eq!(birth.overrides, Some(Default::default()));
    assert_eq!(
        birth.errors,
        [(
            "min_noise_level".to_string(),
            "saved operator settings ignored: 0.6 is above max_noise_level 0.5".to_string()
        )]
        .into()
    );
    // A command changes the settings in force, but version 1 is still not: the report stays
    // until the next accepted desired version (docs/mqtt.md).
    let mut replies = Replies::start(broker.port()).await?;
    let before = reported.received().len();
    let set = command(
        &operator,
        &mut replies,
        "set-config",
        serde_json::json!({"preview_steps": 6}),
        b"p1",
    )
    .await?;
    assert!(set.ok, "{set:?}");
    let after = reports_after(&reported, before).await?;
    assert_eq!(
        (after.version, after.accepted, after.applied_version),
        (1, false, 0)
    );
    assert_eq!(after.errors, birth.errors);
    assert_eq!(after.settings.preview_steps, 6);
    // Operators can fix it remotely: the next accepted version clears the error.
    let two = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 2, "settings": {"preview_steps": 8}}),
    )
    .await?;
    assert!(two.accepted && two.errors.is_empty(), "{:?}", two.errors);
    assert_eq!(agent.settings().borrow().preview_steps, 8);
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kiosk_that_cannot_connect_says_why_in_its_status() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    // Nothing listening: a port that was free a moment ago.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (agent, _events) = Agent::start(options(closed, "k1", &dir.path().join("k1")))?;
    wait_status(&agent, "a connection error", |s| {
        s.connection_error.is_some()
    })
    .await?;
    let status = agent.status();
    assert!(!status.connected);
    let error = status.connection_error.context("an error")?;
    assert!(error.contains("Connection refused"), "{error}");
    agent.abort();

    // A broker that refuses the login.
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .arg("-c")
        .arg("-b")
        .arg(&passwords)
        .args(["k2", "k2-secret"])
        .status()
        .context("mosquitto_passwd (Debian package mosquitto)")?;
    anyhow::ensure!(made.success(), "mosquitto_passwd failed");
    let broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
    )?;
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n")?;
    let mut login = options(broker.port(), "k2", &dir.path().join("k2"));
    login.mqtt.username = Some("k2".into());
    login.mqtt.password_file = Some(wrong);
    let (agent, _events) = Agent::start(login)?;
    wait_status(&agent, "a connection error", |s| {
        s.connection_error.is_some()
    })
    .await?;
    assert_eq!(
        agent.status().connection_error.as_deref(),
        Some("Connection refused, return code: `NotAuthorized`")
    );
    agent.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_sent_again_after_the_retry_delay() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    // Anonymous clients may do everything k1 needs except publish session reports.
    let acl = dir.path().join("acl");
    let allowed = "topic readwrite kiosk/v1/museum/k1/status\n\
                   topic write kiosk/v1/museum/k1/info\n\
                   topic write kiosk/v1/museum/k1/telemetry\n\
                   topic write kiosk/v1/museum/k1/config/reported\n\
                   topic read kiosk/v1/museum/k1/config/desired\n\
                   topic read kiosk/v1/museum/k1/cmd/+\n";
    std::fs::write(&acl, allowed)?;
    let broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!("allow_anonymous true\nacl_file {}\n", acl.display()),
    )?;
    let mut kiosk = options(broker.port(), "k1", &dir.path().join("k1"));
    // No keep-alive ping (nor telemetry) wakes the agent within the test's wait: only the
    // retry timer can send the report again.
    kiosk.mqtt.keep_alive_s = 600;
    let (agent, _events) = Agent::start_retrying_after(kiosk, Duration::from_millis(100))?;
    agent.report(&session(&agent, 1));
    broker
        .wait_for_log("Denied PUBLISH from k1", WAIT, "the report was not refused")
        .await?;
    assert_eq!(
        (agent.status().delivered, agent.status().outbox_pending),
        (0, 1)
    );

    // The broker now takes reports: the next retry delivers it.
    std::fs::write(
        &acl,
        format!("{allowed}topic write kiosk/v1/museum/k1/sessions\n"),
    )?;
    let pid = broker.pid().context("the broker runs")?;
    let reloaded = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    anyhow::ensure!(reloaded.success(), "SIGHUP to mosquitto");
    wait_delivered(&agent, 1).await?;
    assert!(
        agent.status().connections == 1,
        "delivered without a reconnect"
    );
    agent.shutdown("done", WAIT).await;
    Ok(())
}

/// The reports `k1` published on `config/reported` after the first `before`.
async fn reports_after(reported: &Collector, before: usize) -> Result<ConfigReported> {
    let got = reported.wait(WAIT, |r| r.len() > before).await;
    Ok(serde_json::from_slice(
        &got.get(before).context("a new report")?.payload,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_number_reused_with_other_content_is_refused_not_ignored() -> Result<()> {
    let ConfigSetup {
        dir: _dir,
        broker: _broker,
        reported,
        state: _state,
        agent,
        events: _events,
        operator,
    } = config_setup().await?;
    let one = desired(
        &operator,
        &reported,
        serde_json::json!({"version": 1, "settings": {"preview_steps": 8}}),
    )
    .await?;
    assert!(one.accepted, "{:?}", one.errors);

    // Another operator's version 1 (both read version 0): not applied, and said so.
    let before = reported.received().len();
    operator
        .publish(
            "kiosk/v1/museum/k1/config/desired",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(
                &serde_json::json!({"version": 1, "settings": {"cloud_steps": 30}}),
            )?,
        )
        .await?;
    let again = reports_after(&reported, before).await?;
    assert_eq!(
        (again.version, again.accepted, again.applied_version),
        (1, false, 1)
    );
    assert_eq!(
        again.errors,
        [(
            "version".to_string(),
            "version 1 was already considered with other content; publish version 2 or higher"
                .to_string()
        )]
        .into()
    );
    assert_eq!(
        (again.settings.preview_steps, again.settings.cloud_steps),
        (8, 20),
        "version 1 as first received stays in force"
    );
    // A lower version than the one considered, too.
    let before = reported.received().len();
    operator
        .publish(
            "kiosk/v1/museum/k1/config/desired",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&serde_json::json!({"version": 0, "settings": {}}))?,
        )
        .await?;
    let older = reports_after(&reported, before).await?;
    assert_eq!(
        older.errors.get("version").map(String::as_str),
        Some("version 0 is older than version 1 already considered; publish version 2 or higher")
    );
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_change_that_cannot_be_saved_is_refused_and_not_applied() -> Result<()> {
    let ConfigSetup {
        dir: _dir,
        broker,
        reported: _reported,
        state,
        agent,
        events: _events,
        operator,
    } = config_setup().await?;
    let mut replies = Replies::start(broker.port()).await?;
    // The state folder refuses the file (as a full or read-only partition would).
    std::fs::create_dir(state.join("overrides.json"))?;
    let reply = command(
        &operator,
        &mut replies,
        "set-config",
        serde_json::json!({"preview_steps": 8}),
        b"s1",
    )
    .await?;
    assert!(!reply.ok, "{reply:?}");
    assert!(
        reply
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("could not save: ")),
        "{reply:?}"
    );
    assert_eq!(agent.settings().borrow().preview_steps, 4, "not applied");
    let reply = command(
        &operator,
        &mut replies,
        "set-blocklist",
        serde_json::json!({"words": ["gore"]}),
        b"s2",
    )
    .await?;
    assert!(!reply.ok, "{reply:?}");
    assert_eq!(agent.settings().borrow().blocklist, Vec::<String>::new());
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_says_how_much_of_its_window_it_covers_and_its_interval() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let watcher = Collector::start(broker.port(), "watcher", "kiosk/v1/museum/k1/telemetry");
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &dir.path().join("k1")))?;
    let got = watcher.wait(WAIT, |r| !r.is_empty()).await;
    let first: diffusionx_fleet::Telemetry =
        serde_json::from_slice(&got.first().context("telemetry")?.payload)?;
    assert_eq!(first.window_s, 3600);
    assert_eq!(
        (first.covers_s, first.telemetry_interval_s),
        (Some(first.uptime_s), Some(3600)),
        "a kiosk that just started covers its uptime, not the window"
    );
    assert!(first.uptime_s < first.window_s);
    agent.shutdown("done", WAIT).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_counts_a_report_lost_on_disk() -> Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("k1");
    // Two reports wait from an earlier run; the first one's file became unreadable.
    {
        let mut outbox = diffusionx_agent::outbox::Outbox::open(&state.join("outbox"), true)?;
        assert!(outbox.push(b"{\"id\":\"k1-1-1\"}".to_vec()));
        assert!(outbox.push(b"{\"id\":\"k1-1-2\"}".to_vec()));
    }
    let one = state.join("outbox").join(format!("{:020}.json", 1));
    std::fs::remove_file(&one)?;
    std::fs::create_dir(&one)?;

    let broker = Mosquitto::start(&dir.path().join("broker"))?;
    let mut replies = Replies::start(broker.port()).await?;
    let watcher = Collector::start(broker.port(), "watcher", "kiosk/v1/museum/k1/telemetry");
    let (agent, _events) = Agent::start(options(broker.port(), "k1", &state))?;
    wait_status(&agent, "one lost, one delivered", |s| {
        s.lost == 1 && s.delivered == 1
    })
    .await?;
    let (operator, mut eventloop) = rumqttc::v5::AsyncClient::new(
        rumqttc::v5::MqttOptions::new("ops", "127.0.0.1", broker.port()),
        10,
    );
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let flushed = command(
        &operator,
        &mut replies,
        "report-now",
        serde_json::json!({}),
        b"r1",
    )
    .await?;
    assert!(flushed.ok, "{flushed:?}");
    let lost = |r: &[Received]| -> Vec<u64> {
        r.iter()
            .filter_map(|m| serde_json::from_slice::<diffusionx_fleet::Telemetry>(&m.payload).ok())
            .map(|t| t.outbox_lost)
            .collect()
    };
    let got = watcher.wait(WAIT, |r| lost(r).contains(&1)).await;
    assert_eq!(lost(&got).last(), Some(&1), "{:?}", lost(&got));
    assert_eq!(agent.status().lost, 1);
    agent.shutdown("done", WAIT).await;
    Ok(())
}
