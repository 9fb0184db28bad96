//! A simulated kiosk: its own rumqttc v5 client that follows the kiosk's rules (retained
//! presence, info and telemetry; session reports; command replies on the request's response
//! topic with its correlation data; config/desired answered by a retained config/reported).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diffusionx_fleet::topic::{Command, Leaf, Topic};
use diffusionx_fleet::{CommandReply, ConfigDesired, ConfigReported, Settings};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// One kiosk's connection.
pub(crate) struct Kiosk {
    pub(crate) fleet: String,
    pub(crate) device: String,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    pending: VecDeque<Publish>,
}

/// A request the kiosk received, as the broker delivered it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) topic: String,
    pub(crate) properties: PublishProperties,
    pub(crate) payload: Value,
}

/// What the serving kiosk knows and remembers.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) settings: Settings,
    pub(crate) boot: u64,
    pub(crate) firmware: String,
    /// Reply once with other correlation data before the real reply.
    pub(crate) decoy_reply: bool,
    pub(crate) applied_version: u64,
    pub(crate) overrides: serde_json::Map<String, Value>,
    pub(crate) predictor: Option<String>,
    pub(crate) considered_version: u64,
    pub(crate) requests: Arc<Mutex<Vec<Seen>>>,
}

impl State {
    pub(crate) fn new(settings: Settings) -> State {
        State {
            settings,
            boot: 3,
            firmware: "1.2.0".into(),
            decoy_reply: false,
            applied_version: 0,
            overrides: serde_json::Map::new(),
            predictor: None,
            considered_version: 0,
            requests: Arc::default(),
        }
    }
}

pub(crate) fn settings() -> Settings {
    serde_json::from_value(json!({
        "preview_steps": 4, "noise_level": 0.5, "cloud_steps": 20, "idle_timeout_s": 60,
        "prompt_privacy": "full", "telemetry_interval_s": 30, "stats_window_s": 3600,
        "blocklist": []
    }))
    .expect("valid settings")
}

impl Kiosk {
    /// Connects anonymously as `device` (client id = device name).
    pub(crate) async fn connect(url: &str, fleet: &str, device: &str) -> Kiosk {
        Kiosk::connect_as(url, fleet, device, None)
            .await
            .expect("the kiosk connects")
    }

    /// Connects with a user name and password; `Err` carries the refusal.
    pub(crate) async fn connect_as(
        url: &str,
        fleet: &str,
        device: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Kiosk, String> {
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("mqtt://127.0.0.1:PORT");
        let mut options = MqttOptions::new(device, "127.0.0.1", port);
        options.set_max_packet_size(Some(1 << 20));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut kiosk = Kiosk {
            fleet: fleet.into(),
            device: device.into(),
            client,
            events,
            pending: VecDeque::new(),
        };
        match kiosk.try_next_packet().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(kiosk),
            Packet::ConnAck(ack) => Err(format!("{:?}", ack.code)),
            other => Err(format!("{other:?}")),
        }
    }

    pub(crate) fn topic(&self, leaf: Leaf) -> String {
        Topic::new(&self.fleet, &self.device, leaf)
            .expect("valid names")
            .to_string()
    }

    async fn next_packet(&mut self) -> Packet {
        self.try_next_packet().await.expect("the connection holds")
    }

    async fn try_next_packet(&mut self) -> Result<Packet, String> {
        loop {
            let packet = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .map_err(|_| "no answer from the broker within 5 s".to_string())?
                .ok_or("the event loop stopped")??;
            match packet {
                Packet::Publish(publish) => self.pending.push_back(publish),
                other => return Ok(other),
            }
        }
    }

    /// Publishes `body` on one of this kiosk's leaves with the leaf's QoS and retain flag;
    /// for QoS 1, waits for the PUBACK and returns its reason.
    pub(crate) async fn send(&mut self, leaf: Leaf, body: &Value) -> Option<PubAckReason> {
        let (qos, retain) = (leaf.qos(), leaf.retain());
        let topic = self.topic(leaf);
        self.send_to(&topic, qos, retain, body.to_string().into_bytes(), None)
            .await
    }

    /// Publishes on any topic (what a misbehaving kiosk would do).
    pub(crate) async fn send_to(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<PublishProperties>,
    ) -> Option<PubAckReason> {
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .publish_with_properties(topic, qos, retain, payload, properties.unwrap_or_default())
            .await
            .expect("the request channel is open");
        if qos == QoS::AtMostOnce {
            return None;
        }
        loop {
            if let Packet::PubAck(ack) = self.next_packet().await {
                return Some(ack.reason);
            }
        }
    }

    pub(crate) async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("the request channel is open");
        loop {
            if let Packet::SubAck(ack) = self.next_packet().await {
                return ack.return_codes[0];
            }
        }
    }

    /// The next publish delivered to this kiosk within `within`.
    pub(crate) async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
        if let Some(publish) = self.pending.pop_front() {
            return Some(publish);
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Packet::Publish(publish)))) => return Some(publish),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Answers commands and desired configuration until the task is aborted. Subscribes and
    /// publishes its first `config/reported` (version 0) before returning the task handle.
    pub(crate) async fn serve(mut self, mut state: State) -> tokio::task::JoinHandle<()> {
        let commands = self
            .topic(Leaf::Cmd(Command::Ping))
            .replace("cmd/ping", "cmd/+");
        assert!(matches!(
            self.subscribe(&commands).await,
            SubscribeReasonCode::Success(_)
        ));
        let desired = self.topic(Leaf::ConfigDesired);
        assert!(matches!(
            self.subscribe(&desired).await,
            SubscribeReasonCode::Success(_)
        ));
        self.report(&state, 0, true, Default::default()).await;
        tokio::spawn(async move {
            while let Some(publish) = self.next_publish(Duration::from_secs(3600)).await {
                self.handle(&mut state, publish).await;
            }
        })
    }

    async fn handle(&mut self, state: &mut State, publish: Publish) {
        let name = String::from_utf8_lossy(&publish.topic).to_string();
        let Ok(topic) = Topic::parse(&name) else {
            return;
        };
        let payload: Value = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
        state.requests.lock().expect("not poisoned").push(Seen {
            topic: name.clone(),
            properties: publish.properties.clone().unwrap_or_default(),
            payload: payload.clone(),
        });
        match topic.leaf {
            Leaf::Cmd(command) => {
                let reply = self.run(state, command, &payload);
                let Some(properties) = publish.properties else {
                    return;
                };
                let Some(response) = properties.response_topic else {
                    return;
                };
                let ours = matches!(Topic::parse(&response),
                    Ok(Topic { leaf: Leaf::Response(_), ref fleet, ref device })
                        if *fleet == self.fleet && *device == self.device);
                if !ours {
                    return;
                }
                if state.decoy_reply {
                    let decoy = PublishProperties {
                        correlation_data: Some(bytes::Bytes::from_static(b"someone-else")),
                        ..Default::default()
                    };
                    let body = serde_json::to_vec(&CommandReply::error("decoy")).expect("json");
                    self.send_to(&response, 1, false, body, Some(decoy)).await;
                }
                let echo = PublishProperties {
                    correlation_data: properties.correlation_data,
                    ..Default::default()
                };
                let body = serde_json::to_vec(&reply).expect("json");
                self.send_to(&response, 1, false, body, Some(echo)).await;
            }
            Leaf::ConfigDesired => {
                let Ok(desired) = serde_json::from_value::<ConfigDesired>(payload) else {
                    return;
                };
                if desired.version <= state.considered_version {
                    return;
                }
                state.considered_version = desired.version;
                match state.settings.apply(&desired.settings) {
                    Ok(next) => {
                        state.settings = next;
                        state.applied_version = desired.version;
                        state.overrides = desired.settings;
                        state.predictor = desired
                            .predictor
                            .and_then(|w| w["model_version"].as_str().map(str::to_owned));
                        self.report(state, desired.version, true, Default::default())
                            .await;
                    }
                    Err(refused) => {
                        self.report(state, desired.version, false, refused.errors)
                            .await;
                    }
                }
            }
            _ => {}
        }
    }

    fn run(&self, state: &mut State, command: Command, args: &Value) -> CommandReply {
        match command {
            Command::Ping => CommandReply::ok(json!({
                "boot": state.boot, "uptime_s": 42, "firmware": state.firmware
            })),
            Command::GetConfig => CommandReply::ok(Value::Object(state.settings.to_json())),
            Command::SetConfig => {
                let patch = args.as_object().cloned().unwrap_or_default();
                match state.settings.apply(&patch) {
                    Ok(next) => {
                        state.settings = next;
                        CommandReply::ok(Value::Object(state.settings.to_json()))
                    }
                    Err(refused) => CommandReply {
                        ok: false,
                        result: Some(json!({"errors": refused.errors})),
                        error: Some("settings refused".into()),
                    },
                }
            }
            _ => CommandReply::error("not simulated"),
        }
    }

    async fn report(
        &mut self,
        state: &State,
        version: u64,
        accepted: bool,
        errors: std::collections::BTreeMap<String, String>,
    ) {
        let reported = ConfigReported {
            version,
            accepted,
            applied_version: state.applied_version,
            settings: state.settings.clone(),
            overrides: Some(state.overrides.clone()),
            errors,
            predictor: state.predictor.clone(),
            ts_ms: 1_700_000_000_000,
        };
        let body = serde_json::to_value(&reported).expect("json");
        let reason = self.send(Leaf::ConfigReported, &body).await;
        assert!(
            matches!(
                reason,
                Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
            ),
            "{reason:?}"
        );
    }
}
