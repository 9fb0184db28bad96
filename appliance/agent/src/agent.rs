//! The agent: one tokio task that keeps the kiosk's MQTT v5 session, publishes presence, birth
//! facts, telemetry and the outbox's session reports, and answers commands and desired
//! configuration.
//!
//! Delivery of QoS 1 messages is serialized: one is in flight at a time (its packet id learned
//! from rumqttc's `Outgoing::Publish` event), so a PUBACK names exactly which outbox entry may
//! leave the disk. rumqttc keeps unacknowledged publishes only in memory and drops them when the
//! broker has no session for the kiosk (a clean start, an expired session, a broker that lost its
//! state); the agent notices that from the CONNACK's `session_present` and sends the report again
//! from the outbox. The session is persistent (clean start off, `session_expiry_s`), so commands
//! sent while the kiosk is briefly away wait at the broker.
//!
//! `rumqttc`'s event loop is polled by its own task and never cancelled (its `poll` is not
//! cancellation-safe); the controller task talks to it only through the client's channel.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diffusionx_fleet::payload::{DisplayInfo, Hardware, ModelInfo};
use diffusionx_fleet::topic;
use diffusionx_fleet::{
    Command, CommandReply, ConfigDesired, ConfigReported, Info, Leaf, Presence, PresenceState,
    SessionReport, Settings, Telemetry, Topic,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    LastWill, LastWillProperties, Packet, PubAckReason, Publish, PublishProperties,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, Transport};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::MqttConfig;
use crate::outbox::Outbox;
use crate::state::{Overrides, StateDir};
use crate::stats::Window;
use crate::system;
use diffusionx_predictor::Weights;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The `[mqtt]` section.
    #[error(transparent)]
    Config(#[from] crate::config::MqttConfigError),
    /// The state folder or the outbox.
    #[error("state folder: {0}")]
    State(#[from] std::io::Error),
}

/// How long the agent waits before it sends again a session report the broker refused
/// (a PUBACK with a refusal reason such as quota exceeded or not authorized).
pub const REPORT_RETRY: Duration = Duration::from_secs(30);

/// How often the same connection failure is logged at warn/error level while the kiosk
/// cannot connect (in between: debug), so a kiosk that never connects is not silent and its
/// log is not flooded at the 4 s reconnect backoff.
const CONNECT_LOG_EVERY: Duration = Duration::from_secs(300);

/// What the kiosk tells the agent about itself for `info`.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Firmware version.
    pub firmware: String,
    /// The display.
    pub display: DisplayInfo,
    /// Models in use.
    pub models: Vec<ModelInfo>,
}

/// Everything [`Agent::start`] needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The connection.
    pub mqtt: MqttConfig,
    /// Birth facts.
    pub facts: Facts,
    /// The settings of the kiosk's own configuration file (operators' changes apply on top).
    pub settings: Settings,
    /// fsync the outbox and state (false only for the fleet simulator).
    pub sync: bool,
    /// The width of the kiosk's pooled text embedding: predictor weights from operators are
    /// accepted only when their projection reads it (`None`: the kiosk has no predictor and
    /// refuses weights).
    pub predictor_width: Option<usize>,
}

/// What the agent asks of the kiosk.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// An operator asked for a restart (the reply was delivered): exit so the service manager
    /// starts the kiosk again.
    Restart,
    /// Use these operator-installed predictor weights from now on (`None`: the kiosk's own).
    /// Sent at start when weights are installed, and on every change.
    Predictor(Option<Arc<Weights>>),
}

/// Checks operator predictor weights (a weights file's JSON) for a kiosk whose text embedding
/// has `width` values.
pub fn predictor_weights(value: &Value, width: Option<usize>) -> Result<Weights, String> {
    let Some(width) = width else {
        return Err("this kiosk has no noise level predictor".into());
    };
    let weights = Weights::from_json(&value.to_string()).map_err(|e| e.to_string())?;
    weights.check_text_width(width).map_err(|e| e.to_string())?;
    Ok(weights)
}

/// A snapshot for tests and the kiosk's own logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// Connected to the broker now.
    pub connected: bool,
    /// Reports waiting for a PUBACK.
    pub outbox_pending: usize,
    /// Reports acknowledged by the broker since start.
    pub delivered: u64,
    /// Connections made since start.
    pub connections: u64,
    /// Reports whose outbox write failed since start (kept in memory and retried; the same
    /// figure as telemetry's `outbox_write_errors`).
    pub write_errors: u64,
    /// Reports given up since start (the same figure as telemetry's `outbox_lost`): dropped
    /// past the outbox's in-memory cap while the disk refused writes, or unreadable on disk.
    pub lost: u64,
    /// Why the last connection attempt failed or the connection broke (the broker refused
    /// the login, a TLS error, nothing listening, ...); `None` while connected and before
    /// the first attempt ended.
    pub connection_error: Option<String>,
}

struct Shared {
    outbox: Outbox,
    window: Window,
    /// The status in force; [`Agent::watch_status`] hands out receivers.
    status: watch::Sender<AgentStatus>,
}

impl Shared {
    /// Applies `change` to the status and wakes its watchers if that changed anything.
    /// Copies the outbox's figures into the status.
    fn outbox_status(&self) {
        let (pending, errors, lost) = (
            self.outbox.len(),
            self.outbox.write_errors(),
            self.outbox.lost(),
        );
        self.update_status(|status| {
            status.outbox_pending = pending;
            status.write_errors = errors;
            status.lost = lost;
        });
    }

    fn update_status(&self, change: impl FnOnce(&mut AgentStatus)) {
        self.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }
}

enum Request {
    Wake,
    Shutdown {
        reason: String,
        done: oneshot::Sender<()>,
    },
}

/// The handle the kiosk holds.
pub struct Agent {
    boot: u64,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
    settings: watch::Receiver<Settings>,
    poller: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("boot", &self.boot).finish()
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The packet ids rumqttc may use for QoS 1 packets at once.
const MAX_IN_FLIGHT: u16 = 20;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Agent {
    /// Opens the state folder (incrementing the boot counter), loads the outbox and the saved
    /// operator settings, and starts connecting. Runs on the current tokio runtime; returns
    /// at once (the broker may be unreachable for hours: reports wait in the outbox).
    pub fn start(
        options: AgentOptions,
    ) -> Result<(Agent, mpsc::UnboundedReceiver<AgentEvent>), AgentError> {
        Agent::start_retrying_after(options, REPORT_RETRY)
    }

    /// [`Agent::start`], sending a session report that the broker refused again after
    /// `report_retry` instead of [`REPORT_RETRY`] (tests).
    pub fn start_retrying_after(
        options: AgentOptions,
        report_retry: Duration,
    ) -> Result<(Agent, mpsc::UnboundedReceiver<AgentEvent>), AgentError> {
        let address = options.mqtt.validate()?;
        let state = StateDir::open(&options.mqtt.state_dir)?;
        let boot = state.next_boot()?;
        let outbox = Outbox::open(&state.outbox(), options.sync)?;
        let mut overrides = state.overrides()?;
        let mut settings_errors = BTreeMap::new();
        let settings = match options.settings.apply(&overrides.settings) {
            Ok(settings) => settings,
            Err(refused) => {
                // The kiosk's own configuration changed under them. Start on the file's
                // settings and say so in `config/reported` until operators change something:
                // a kiosk that refused to start could not be fixed remotely. The saved file
                // stays as it is until then.
                tracing::error!(%refused, "saved operator settings ignored");
                settings_errors = refused
                    .errors
                    .into_iter()
                    .map(|(field, why)| (field, format!("saved operator settings ignored: {why}")))
                    .collect();
                overrides.version = 0;
                overrides.settings.clear();
                // The desired version they came from is no longer in force: it stays reported
                // refused, with the reason, after operators' commands too (until a new version).
                overrides.refused = settings_errors.clone();
                options.settings.clone()
            }
        };
        let mut predictor_error = None;
        let installed = overrides.predictor.as_ref().and_then(|value| {
            predictor_weights(value, options.predictor_width)
                .inspect_err(|why| {
                    tracing::error!(%why, "saved operator predictor weights ignored");
                    // Reported until operators send a new version: never a silent fallback.
                    predictor_error = Some(format!("saved weights ignored: {why}"));
                })
                .ok()
        });

        let mut mqtt = MqttOptions::new(options.mqtt.device.clone(), address.host, address.port);
        mqtt.set_clean_start(false)
            .set_session_expiry_interval(Some(options.mqtt.session_expiry_s))
            .set_keep_alive(Duration::from_secs(options.mqtt.keep_alive_s.into()))
            .set_connection_timeout(10)
            .set_max_packet_size(Some(1 << 20))
            // rumqttc preallocates one slot per possible in-flight publish: 65 536 by default,
            // 12 MiB per client. One report is in flight at a time here (plus the three
            // subscriptions at connect), and brokers allow 20 by default (mosquitto's
            // `max_inflight_messages`), so 20 changes nothing on the wire.
            .set_outgoing_inflight_upper_limit(MAX_IN_FLIGHT);
        if let Some(user) = &options.mqtt.username {
            mqtt.set_credentials(user.clone(), options.mqtt.password()?.unwrap_or_default());
        }
        if address.tls {
            mqtt.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(options.mqtt.tls()?),
            ));
        }
        let topics = Topics::new(&options.mqtt.fleet, &options.mqtt.device);
        mqtt.set_last_will(will(&topics, boot, 1));
        let (client, eventloop) = AsyncClient::new(mqtt, 64);

        let pending = outbox.len();
        let shared = Arc::new(Mutex::new(Shared {
            outbox,
            window: Window::default(),
            status: watch::channel(AgentStatus {
                connected: false,
                outbox_pending: pending,
                delivered: 0,
                connections: 0,
                write_errors: 0,
                lost: 0,
                connection_error: None,
            })
            .0,
        }));
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        if let Some(weights) = installed.clone() {
            let _ = events_tx.send(AgentEvent::Predictor(Some(Arc::new(weights))));
        }
        let (net_tx, net_rx) = mpsc::unbounded_channel();
        let (settings_tx, settings_rx) = watch::channel(settings);
        let poller = tokio::spawn(poll(eventloop, topics.clone(), boot, net_tx));
        let controller = Controller {
            topics,
            boot,
            started: Instant::now(),
            client,
            shared: shared.clone(),
            state,
            base: options.settings,
            overrides,
            predictor_width: options.predictor_width,
            predictor_error,
            settings_errors,
            predictor: installed.map(|w| w.model_version().to_owned()),
            settings: settings_tx,
            facts: options.facts,
            connected: false,
            conn: 0,
            control: VecDeque::new(),
            in_flight: None,
            telemetry_seq: 0,
            events: events_tx,
            retry_at: None,
            report_retry,
            down_logged: None,
        };
        tokio::spawn(controller.run(net_rx, requests_rx));
        Ok((
            Agent {
                boot,
                shared,
                requests,
                settings: settings_rx,
                poller,
            },
            events,
        ))
    }

    /// This start's boot counter (part of every report id).
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// The settings in force; changes when operators change them.
    pub fn settings(&self) -> watch::Receiver<Settings> {
        self.settings.clone()
    }

    /// Puts a finished session in the outbox (on disk, fsynced, before this returns) and
    /// wakes the publisher. Returns whether it reached the disk (false: the write failed, the
    /// report is kept in memory and retried; it is still published).
    pub fn report(&self, report: &SessionReport) -> bool {
        let payload = serde_json::to_vec(report).unwrap_or_default();
        let durable = {
            let mut shared = lock(&self.shared);
            let durable = shared.outbox.push(payload);
            let window_ms = u64::from(self.settings.borrow().stats_window_s) * 1000;
            shared.window.add(report, now_ms(), window_ms);
            shared.outbox_status();
            durable
        };
        self.requests.send(Request::Wake).ok();
        durable
    }

    /// A snapshot of the connection and the outbox.
    pub fn status(&self) -> AgentStatus {
        lock(&self.shared).status.borrow().clone()
    }

    /// The connection and outbox status, as a receiver that is marked changed whenever any
    /// figure in it changes (connected, a report queued or delivered, ...): for the kiosk's
    /// service screen, and for waiting on a delivery without polling.
    pub fn watch_status(&self) -> watch::Receiver<AgentStatus> {
        lock(&self.shared).status.subscribe()
    }

    /// Clean shutdown: publishes `offline` with `reason` (retained, replacing the last will),
    /// waits up to `timeout` for the broker to take it, disconnects.
    pub async fn shutdown(mut self, reason: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let (done, wait) = oneshot::channel();
        if self
            .requests
            .send(Request::Shutdown {
                reason: reason.into(),
                done,
            })
            .is_ok()
            && matches!(tokio::time::timeout_at(deadline, wait).await, Ok(Ok(())))
        {
            // The goodbye was delivered and the DISCONNECT queued: let the poller write it
            // (it stops once it has), or the broker sees a dropped connection and publishes
            // the last will over the goodbye.
            tokio::time::timeout_at(deadline, &mut self.poller)
                .await
                .ok();
        }
        self.poller.abort();
    }

    /// Stops at once without a goodbye (tests: the broker then publishes the last will).
    pub fn abort(self) {
        self.poller.abort();
    }
}

#[derive(Debug, Clone)]
struct Topics {
    fleet: String,
    device: String,
}

impl Topics {
    fn new(fleet: &str, device: &str) -> Topics {
        Topics {
            fleet: fleet.into(),
            device: device.into(),
        }
    }

    fn topic(&self, leaf: Leaf) -> String {
        Topic {
            fleet: self.fleet.clone(),
            device: self.device.clone(),
            leaf,
        }
        .to_string()
    }
}

fn will(topics: &Topics, boot: u64, conn: u64) -> LastWill {
    let presence = Presence {
        state: PresenceState::Offline,
        boot,
        conn,
        ts_ms: now_ms(),
        reason: Some("connection lost".into()),
    };
    LastWill {
        topic: topics.topic(Leaf::Status).into(),
        message: serde_json::to_vec(&presence).unwrap_or_default().into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Some(LastWillProperties {
            delay_interval: Some(0),
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    }
}

/// The error a `restart` command gets from a kiosk whose host does not act on restarts.
pub const NO_RESTART: &str = "this kiosk's process does not restart on command";

/// What the poller tells the controller.
enum Net {
    Up {
        session_present: bool,
        conn: u64,
    },
    Down {
        error: String,
        /// The broker refused the login or TLS failed: retrying alone will not fix it.
        refused: bool,
    },
    Event(Box<Event>),
}

/// Polls the event loop forever (never cancelled mid-poll), reconnecting with backoff and a
/// last will that names the next connection.
async fn poll(
    mut eventloop: EventLoop,
    topics: Topics,
    boot: u64,
    net: mpsc::UnboundedSender<Net>,
) {
    let mut conn = 1;
    let mut backoff = Duration::from_millis(250);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(250);
                if net
                    .send(Net::Up {
                        session_present: ack.session_present,
                        conn,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // Written and flushed (a clean goodbye: the broker drops the last will).
                // Reconnecting now would bring the kiosk back online.
                return;
            }
            Ok(event) => {
                if net.send(Net::Event(Box::new(event))).is_err() {
                    return;
                }
            }
            Err(error) => {
                let refused = matches!(
                    error,
                    ConnectionError::ConnectionRefused(_) | ConnectionError::Tls(_)
                );
                if net
                    .send(Net::Down {
                        error: error.to_string(),
                        refused,
                    })
                    .is_err()
                {
                    return;
                }
                conn += 1;
                eventloop.options.set_last_will(will(&topics, boot, conn));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(4));
            }
        }
    }
}

/// A QoS 1 publish the controller sends.
#[derive(Debug, Clone)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    properties: PublishProperties,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Presence, info, config reports, command replies.
    Control,
    /// A command reply after whose delivery the kiosk restarts.
    RestartReply,
    /// The goodbye.
    Goodbye,
    /// Outbox entry `seq`.
    Report(u64),
}

struct InFlight {
    message: Message,
    pkid: Option<u16>,
}

struct Controller {
    topics: Topics,
    boot: u64,
    started: Instant,
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    state: StateDir,
    base: Settings,
    overrides: Overrides,
    predictor_width: Option<usize>,
    /// Why saved operator weights could not be used at start (until the next accepted version).
    predictor_error: Option<String>,
    /// Why saved operator settings could not be used at start, field -> reason (until
    /// operators' next accepted change).
    settings_errors: BTreeMap<String, String>,
    /// The model version of the operator weights in force.
    predictor: Option<String>,
    settings: watch::Sender<Settings>,
    facts: Facts,
    connected: bool,
    conn: u64,
    control: VecDeque<Message>,
    in_flight: Option<InFlight>,
    telemetry_seq: u64,
    events: mpsc::UnboundedSender<AgentEvent>,
    /// After a refused report, when to try again (a timer wakes the controller then).
    retry_at: Option<Instant>,
    /// How long after a refused report.
    report_retry: Duration,
    /// The connection failure last logged at warn/error level, and when.
    down_logged: Option<(String, Instant)>,
}

impl Controller {
    async fn run(
        mut self,
        mut net: mpsc::UnboundedReceiver<Net>,
        mut requests: mpsc::UnboundedReceiver<Request>,
    ) {
        let mut interval = self.settings.borrow().telemetry_interval_s;
        let mut telemetry = tokio::time::interval(Duration::from_secs(interval.into()));
        let mut goodbye: Option<oneshot::Sender<()>> = None;
        loop {
            self.pump();
            tokio::select! {
                message = net.recv() => match message {
                    Some(Net::Up { session_present, conn }) => self.on_up(session_present, conn),
                    Some(Net::Down { error, refused }) => self.on_down(error, refused),
                    Some(Net::Event(event)) => {
                        if let Some(kind) = self.on_event(*event)
                            && kind == Kind::Goodbye
                        {
                            self.client.disconnect().await.ok();
                            if let Some(done) = goodbye.take() {
                                done.send(()).ok();
                            }
                            return;
                        }
                    }
                    None => return,
                },
                request = requests.recv() => match request {
                    Some(Request::Wake) => {}
                    Some(Request::Shutdown { reason, done }) => {
                        let presence = self.presence(PresenceState::Offline, Some(reason));
                        self.enqueue_front(Leaf::Status, &presence, Kind::Goodbye);
                        goodbye = Some(done);
                        if !self.connected {
                            return;
                        }
                    }
                    None => return,
                },
                () = retry(self.retry_at) => {
                    // `pump` at the top of the loop sends the refused report again.
                    tracing::debug!("retrying refused reports");
                    self.retry_at = None;
                }
                _ = telemetry.tick() => {
                    if let Some(at) = self.retry_at.take_if(|at| *at <= Instant::now()) {
                        tracing::debug!(?at, "retrying refused reports");
                    }
                    lock(&self.shared).outbox.retry();
                    self.publish_telemetry();
                }
            }
            let wanted = self.settings.borrow().telemetry_interval_s;
            if wanted != interval {
                interval = wanted;
                telemetry = tokio::time::interval(Duration::from_secs(interval.into()));
                telemetry.reset();
            }
        }
    }

    fn on_down(&mut self, error: String, refused: bool) {
        if self.connected {
            tracing::warn!(%error, "broker connection lost");
            self.down_logged = Some((error.clone(), Instant::now()));
        } else {
            // Throttled: the same failure again within `CONNECT_LOG_EVERY` only at debug.
            let repeated = self
                .down_logged
                .as_ref()
                .is_some_and(|(last, at)| *last == error && at.elapsed() < CONNECT_LOG_EVERY);
            if repeated {
                tracing::debug!(%error, "broker still unreachable");
            } else {
                if refused {
                    tracing::error!(%error, "the broker refused the connection");
                } else {
                    tracing::warn!(%error, "cannot connect to the broker");
                }
                self.down_logged = Some((error.clone(), Instant::now()));
            }
        }
        self.connected = false;
        lock(&self.shared).update_status(|status| {
            status.connected = false;
            status.connection_error = Some(error);
        });
    }

    fn presence(&self, state: PresenceState, reason: Option<String>) -> Presence {
        Presence {
            state,
            boot: self.boot,
            conn: self.conn,
            ts_ms: now_ms(),
            reason,
        }
    }

    fn message<T: serde::Serialize>(&self, leaf: Leaf, body: &T, kind: Kind) -> Message {
        Message {
            retain: leaf.retain(),
            topic: self.topics.topic(leaf),
            payload: serde_json::to_vec(body).unwrap_or_default(),
            properties: json_properties(),
            kind,
        }
    }

    fn enqueue<T: serde::Serialize>(&mut self, leaf: Leaf, body: &T, kind: Kind) {
        let message = self.message(leaf, body, kind);
        self.control.push_back(message);
    }

    fn enqueue_front<T: serde::Serialize>(&mut self, leaf: Leaf, body: &T, kind: Kind) {
        let message = self.message(leaf, body, kind);
        self.control.push_front(message);
    }

    fn on_up(&mut self, session_present: bool, conn: u64) {
        self.connected = true;
        self.conn = conn;
        self.down_logged = None;
        lock(&self.shared).update_status(|status| {
            status.connected = true;
            status.connections += 1;
            status.connection_error = None;
        });
        tracing::info!(conn, session_present, "connected to the broker");
        if !session_present && let Some(lost) = self.in_flight.take() {
            // The broker has no session: rumqttc dropped the unacknowledged publish.
            // Reports go again from the outbox; anything else is queued again.
            if !matches!(lost.message.kind, Kind::Report(_)) {
                self.control.push_front(lost.message);
            }
        }
        for (filter, qos) in [
            (self.topics.topic(Leaf::Status), QoS::AtLeastOnce),
            (
                topic::filter(Some(&self.topics.fleet), Some(&self.topics.device), "cmd/+"),
                QoS::AtLeastOnce,
            ),
            (self.topics.topic(Leaf::ConfigDesired), QoS::AtLeastOnce),
        ] {
            if let Err(error) = self.client.try_subscribe(filter, qos) {
                tracing::warn!(%error, "subscribe");
            }
        }
        // Birth: presence first, then facts and the settings in force.
        let online = self.presence(PresenceState::Online, None);
        let info = self.info();
        let reported = self.current_reported();
        self.control
            .retain(|m| m.kind != Kind::Control || !m.topic.ends_with("/status"));
        self.enqueue_front(Leaf::ConfigReported, &reported, Kind::Control);
        self.enqueue_front(Leaf::Info, &info, Kind::Control);
        self.enqueue_front(Leaf::Status, &online, Kind::Control);
        self.publish_telemetry();
    }

    fn info(&self) -> Info {
        let memory = system::memory_mb();
        Info {
            firmware: self.facts.firmware.clone(),
            hardware: Hardware {
                model: system::board_model(),
                arch: std::env::consts::ARCH.into(),
                cpus: system::cpus(),
                mem_total_mb: memory.map_or(0, |(total, _)| total),
            },
            display: self.facts.display.clone(),
            models: self.facts.models.clone(),
            boot: self.boot,
            ts_ms: now_ms(),
        }
    }

    /// The report of the last desired version considered, with the settings in force now.
    fn current_reported(&self) -> ConfigReported {
        self.reported(
            self.overrides.considered,
            self.overrides.considered_accepted(),
            self.overrides.refused.clone(),
        )
    }

    fn reported(
        &self,
        version: u64,
        accepted: bool,
        mut errors: BTreeMap<String, String>,
    ) -> ConfigReported {
        for (field, why) in &self.settings_errors {
            errors.entry(field.clone()).or_insert_with(|| why.clone());
        }
        if let Some(why) = &self.predictor_error {
            errors
                .entry("predictor".into())
                .or_insert_with(|| why.clone());
        }
        ConfigReported {
            version,
            accepted,
            applied_version: self.overrides.version,
            settings: self.settings.borrow().clone(),
            overrides: Some(self.overrides.settings.clone()),
            errors,
            predictor: self.predictor.clone(),
            ts_ms: now_ms(),
        }
    }

    /// Sends the next QoS 1 message when none is in flight.
    fn pump(&mut self) {
        if !self.connected || self.in_flight.is_some() {
            return;
        }
        let message = match self.control.pop_front() {
            Some(message) => message,
            None => {
                if self.retry_at.is_some_and(|at| at > Instant::now()) {
                    return;
                }
                let mut shared = lock(&self.shared);
                let first = shared.outbox.first();
                // Reading it may have set unreadable reports aside.
                shared.outbox_status();
                let Some(entry) = first else {
                    return;
                };
                Message {
                    topic: self.topics.topic(Leaf::Sessions),
                    payload: entry.payload,
                    retain: false,
                    properties: json_properties(),
                    kind: Kind::Report(entry.seq),
                }
            }
        };
        match self.client.try_publish_with_properties(
            message.topic.clone(),
            QoS::AtLeastOnce,
            message.retain,
            message.payload.clone(),
            message.properties.clone(),
        ) {
            Ok(()) => {
                self.in_flight = Some(InFlight {
                    message,
                    pkid: None,
                })
            }
            Err(error) => {
                tracing::warn!(%error, "publish request refused by the client");
                if !matches!(message.kind, Kind::Report(_)) {
                    self.control.push_front(message);
                }
            }
        }
    }

    /// Handles one event; returns the kind of a message whose delivery it confirms.
    fn on_event(&mut self, event: Event) -> Option<Kind> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                if let Some(flight) = &mut self.in_flight
                    && flight.pkid.is_none()
                {
                    flight.pkid = Some(pkid);
                }
                None
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let flight = self.in_flight.as_ref()?;
                if flight.pkid != Some(ack.pkid) {
                    tracing::debug!(pkid = ack.pkid, "PUBACK for a packet not in flight");
                    return None;
                }
                let flight = self.in_flight.take()?;
                let refused = !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                );
                self.delivered(flight.message, refused, ack.reason)
            }
            Event::Incoming(Packet::Publish(publish)) => {
                self.on_publish(publish);
                None
            }
            _ => None,
        }
    }

    fn delivered(&mut self, message: Message, refused: bool, reason: PubAckReason) -> Option<Kind> {
        match message.kind {
            Kind::Report(seq) if refused => {
                // Keep it: a refusal (quota, authorization) must not lose a report. Try again
                // later, and say so loudly.
                tracing::error!(
                    ?reason,
                    seq,
                    "the broker refused a session report; keeping it"
                );
                self.retry_at = Some(Instant::now() + self.report_retry);
            }
            Kind::Report(seq) => {
                let mut shared = lock(&self.shared);
                if let Err(error) = shared.outbox.remove(seq) {
                    tracing::error!(%error, seq, "removing a delivered report");
                }
                shared.update_status(|status| status.delivered += 1);
                shared.outbox_status();
            }
            Kind::RestartReply => {
                self.events.send(AgentEvent::Restart).ok();
            }
            _ if refused => {
                tracing::warn!(
                    ?reason,
                    topic = message.topic,
                    "the broker refused a message"
                );
            }
            _ => {}
        }
        Some(message.kind)
    }

    fn on_publish(&mut self, publish: Publish) {
        let Ok(topic_text) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let own_cmd_prefix =
            topic::filter(Some(&self.topics.fleet), Some(&self.topics.device), "cmd/");
        let parsed = Topic::parse(topic_text);
        match parsed.map(|t| t.leaf) {
            Ok(Leaf::Status) => {
                if let Ok(presence) = serde_json::from_slice::<Presence>(&publish.payload)
                    && presence.state == PresenceState::Offline
                    && self
                        .presence(PresenceState::Online, None)
                        .is_newer_than(&presence)
                {
                    // A last will of an older connection landed after our `online`.
                    tracing::info!(
                        boot = presence.boot,
                        conn = presence.conn,
                        "overwriting a stale last will"
                    );
                    let online = self.presence(PresenceState::Online, None);
                    self.enqueue_front(Leaf::Status, &online, Kind::Control);
                }
            }
            Ok(Leaf::ConfigDesired) => self.on_desired(&publish.payload),
            Ok(Leaf::Cmd(command)) => self.on_command(Some(command), &publish),
            _ if topic_text.starts_with(&own_cmd_prefix) => self.on_command(None, &publish),
            _ => {}
        }
    }

    fn on_desired(&mut self, payload: &[u8]) {
        let desired: ConfigDesired = match serde_json::from_slice(payload) {
            Ok(desired) => desired,
            Err(error) => {
                let version = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| v.get("version").and_then(Value::as_u64))
                    .unwrap_or(0);
                let errors = [(
                    "payload".to_string(),
                    format!("not a desired configuration: {error}"),
                )]
                .into();
                let reported = self.reported(version, false, errors);
                self.enqueue(Leaf::ConfigReported, &reported, Kind::Control);
                return;
            }
        };
        let digest = desired.digest();
        if desired.version <= self.overrides.considered {
            self.on_desired_again(desired.version, &digest);
            return;
        }
        self.overrides.considered = desired.version;
        self.overrides.considered_digest = Some(digest);
        let settings = self.base.apply(&desired.settings);
        let weights = match desired.predictor.as_ref().filter(|v| !v.is_null()) {
            Some(value) => predictor_weights(value, self.predictor_width).map(Some),
            None => Ok(None),
        };
        let reported = match (settings, weights) {
            (Ok(settings), Ok(weights)) => {
                self.predictor_error = None;
                self.settings_errors.clear();
                self.overrides.refused.clear();
                self.overrides.version = desired.version;
                self.overrides.settings = desired.settings;
                self.overrides.predictor = weights.as_ref().and(desired.predictor);
                self.settings.send_replace(settings);
                let version = weights.as_ref().map(|w| w.model_version().to_owned());
                if version != self.predictor || weights.is_some() {
                    self.predictor = version;
                    let _ = self
                        .events
                        .send(AgentEvent::Predictor(weights.map(Arc::new)));
                }
                tracing::info!(version = desired.version, "desired configuration applied");
                self.reported(desired.version, true, Default::default())
            }
            (settings, weights) => {
                let mut errors = settings.err().map(|e| e.errors).unwrap_or_default();
                if let Err(why) = weights {
                    errors.insert("predictor".into(), why);
                }
                tracing::warn!(
                    version = desired.version,
                    ?errors,
                    "desired configuration refused"
                );
                self.overrides.refused = errors.clone();
                self.reported(desired.version, false, errors)
            }
        };
        if let Err(error) = self.state.save_overrides(&self.overrides) {
            tracing::error!(%error, "saving operator settings");
        }
        self.enqueue(Leaf::ConfigReported, &reported, Kind::Control);
    }

    /// A desired version not above the one considered: the retained message again (after a
    /// reconnect: nothing to do), or another change that reused or went below the number (two
    /// operators at once, a broker that lost its retained store). That one is not applied,
    /// and the kiosk says so rather than leave its sender waiting or believing it applied.
    fn on_desired_again(&mut self, version: u64, digest: &str) {
        let considered = self.overrides.considered;
        let same = version == considered
            && self
                .overrides
                .considered_digest
                .as_deref()
                .is_none_or(|known| known == digest);
        if same {
            return;
        }
        let why = if version == considered {
            format!(
                "version {version} was already considered with other content; publish version {} or higher",
                considered + 1
            )
        } else {
            format!(
                "version {version} is older than version {considered} already considered; publish version {} or higher",
                considered + 1
            )
        };
        tracing::warn!(
            version,
            considered,
            "desired configuration not above the one considered"
        );
        let reported = self.reported(version, false, [("version".to_string(), why)].into());
        self.enqueue(Leaf::ConfigReported, &reported, Kind::Control);
    }

    fn on_command(&mut self, command: Option<Command>, publish: &Publish) {
        let properties = publish.properties.clone().unwrap_or_default();
        let Some(response_topic) = properties.response_topic.clone() else {
            tracing::warn!("command without a response topic ignored");
            return;
        };
        let own_reply = Topic::parse(&response_topic).is_ok_and(|t| {
            t.fleet == self.topics.fleet
                && t.device == self.topics.device
                && matches!(t.leaf, Leaf::Response(_))
        });
        if !own_reply {
            tracing::warn!(
                response_topic,
                "command ignored: replies go only to this kiosk's resp/ topics"
            );
            return;
        }
        let args: Value = if publish.payload.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&publish.payload) {
                Ok(args) => args,
                Err(error) => {
                    let reply = CommandReply::error(format!("arguments are not JSON: {error}"));
                    self.reply(response_topic, &properties, &reply, Kind::Control);
                    return;
                }
            }
        };
        let mut kind = Kind::Control;
        let reply = match command {
            None => CommandReply::error("unknown command"),
            Some(Command::Ping) => CommandReply::ok(json!({
                "boot": self.boot,
                "conn": self.conn,
                "uptime_s": self.started.elapsed().as_secs(),
                "firmware": self.facts.firmware,
            })),
            Some(Command::GetConfig) => {
                CommandReply::ok(Value::Object(self.settings.borrow().to_json()))
            }
            Some(Command::SetConfig) => match args.as_object() {
                Some(patch) => self.set(patch.clone()),
                None => CommandReply::error("arguments must be an object of settings"),
            },
            Some(Command::SetBlocklist) => match args.get("words") {
                Some(words) => {
                    let mut patch = serde_json::Map::new();
                    patch.insert("blocklist".into(), words.clone());
                    self.set(patch)
                }
                None => CommandReply::error("arguments must be {\"words\": [...]}"),
            },
            // The host acts on the restart; one that dropped the events (the fleet simulator)
            // cannot, and says so rather than claim it.
            Some(Command::Restart) if self.events.is_closed() => CommandReply::error(NO_RESTART),
            Some(Command::Restart) => {
                kind = Kind::RestartReply;
                CommandReply::ok(json!({"restarting": true}))
            }
            Some(Command::ReportNow) => {
                let left = {
                    let mut shared = lock(&self.shared);
                    shared.outbox.retry();
                    shared.outbox.len()
                };
                self.retry_at = None;
                self.publish_telemetry();
                CommandReply::ok(json!({"outbox_pending": left}))
            }
        };
        self.reply(response_topic, &properties, &reply, kind);
    }

    /// Applies a change from a command on top of the settings in force.
    fn set(&mut self, patch: serde_json::Map<String, Value>) -> CommandReply {
        let current = self.settings.borrow().clone();
        match current.apply(&patch) {
            Ok(settings) => {
                // Saved before it is applied: a command is neither retained nor versioned, so
                // a change the disk did not take would vanish at the next start, after the
                // operator was told it worked.
                let mut overrides = self.overrides.clone();
                overrides.settings.extend(patch);
                if let Err(error) = self.state.save_overrides(&overrides) {
                    tracing::error!(%error, "saving operator settings; change not applied");
                    return CommandReply::error(format!("could not save: {error}"));
                }
                self.overrides = overrides;
                self.settings_errors.clear();
                self.settings.send_replace(settings.clone());
                let reported = self.current_reported();
                self.enqueue(Leaf::ConfigReported, &reported, Kind::Control);
                CommandReply::ok(Value::Object(settings.to_json()))
            }
            Err(refused) => CommandReply {
                ok: false,
                result: Some(json!({"errors": refused.errors})),
                error: Some(refused.to_string()),
            },
        }
    }

    fn reply(
        &mut self,
        topic: String,
        request: &PublishProperties,
        reply: &CommandReply,
        kind: Kind,
    ) {
        let mut properties = json_properties();
        properties.correlation_data = request.correlation_data.clone();
        self.control.push_back(Message {
            topic,
            payload: serde_json::to_vec(reply).unwrap_or_default(),
            retain: false,
            properties,
            kind,
        });
    }

    fn publish_telemetry(&mut self) {
        if !self.connected {
            return;
        }
        self.telemetry_seq += 1;
        let (window_s, interval_s) = {
            let settings = self.settings.borrow();
            (
                u64::from(settings.stats_window_s),
                u64::from(settings.telemetry_interval_s),
            )
        };
        let uptime_s = self.started.elapsed().as_secs();
        let now = now_ms();
        let (figures, pending, write_errors, lost) = {
            let mut shared = lock(&self.shared);
            let figures = shared.window.figures(now, window_s * 1000);
            let outbox = &shared.outbox;
            (figures, outbox.len(), outbox.write_errors(), outbox.lost())
        };
        let memory = system::memory_mb();
        let telemetry = Telemetry {
            seq: self.telemetry_seq,
            ts_ms: now,
            boot: self.boot,
            uptime_s,
            cpu_temp_c: system::cpu_temp_c(),
            mem_used_mb: memory.map(|(total, available)| total - available),
            mem_total_mb: memory.map(|(total, _)| total),
            rss_mb: system::rss_mb(),
            load1: system::load1(),
            window_s,
            // The window starts empty at every start (it is kept in memory only).
            covers_s: Some(window_s.min(uptime_s)),
            telemetry_interval_s: Some(interval_s),
            sessions: figures.sessions,
            rounds: figures.rounds,
            finalizes: figures.finalizes,
            fallbacks: figures.fallbacks,
            fallback_rate: figures.fallback_rate,
            preview: figures.preview,
            cloud: figures.cloud,
            outbox_pending: pending as u64,
            outbox_write_errors: write_errors,
            outbox_lost: lost,
        };
        let leaf = Leaf::Telemetry;
        if let Err(error) = self.client.try_publish_with_properties(
            self.topics.topic(leaf.clone()),
            QoS::AtMostOnce,
            leaf.retain(),
            serde_json::to_vec(&telemetry).unwrap_or_default(),
            json_properties(),
        ) {
            tracing::debug!(%error, "telemetry not queued");
        }
    }
}

/// Completes at `at` (never when `None`).
async fn retry(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn json_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    }
}
