//! The connection to the broker: the broker URL, the connect options, and [`Link`], an MQTT v5
//! client whose event loop runs in its own task so every wait here has a deadline and can be
//! cancelled without losing packets.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest packet dxctl accepts (session reports with many rounds are a few KiB).
const MAX_PACKET: u32 = 1024 * 1024;

/// Where the broker is: `mqtt://host:port` (plain TCP) or `mqtts://host:port` (TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Whether the connection uses TLS (`mqtts://`).
    pub tls: bool,
    /// Host name or IP address.
    pub host: String,
    /// TCP port (default 1883, or 8883 with TLS).
    pub port: u16,
}

impl FromStr for BrokerUrl {
    type Err = DxError;

    fn from_str(url: &str) -> Result<BrokerUrl, DxError> {
        let bad = |why: &'static str| DxError::BadUrl {
            url: url.into(),
            why,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(bad("it must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        // An IPv6 address is bracketed and has colons of its own: the port, if any, follows
        // the closing bracket as `]:port`.
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("the IPv6 address has no closing ]"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(bad("only :port may follow the IPv6 address")),
                },
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some(port) => port.parse().map_err(|_| bad("the port is not a number"))?,
            None if tls => 8883,
            None => 1883,
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("it has no host"));
        }
        Ok(BrokerUrl {
            tls,
            host: host.into(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The broker.
    pub broker: BrokerUrl,
    /// The MQTT client id, also the `{client}` of response topics (checked with
    /// `topic::check_name`).
    pub client: String,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// The TLS configuration for `mqtts://` (see [`tls_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How long any one wait (connect, an acknowledgement, an answer) may take.
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Plain TCP to `broker` as `client`, no credentials, a 5 s timeout.
    pub fn new(broker: BrokerUrl, client: &str) -> ConnectOptions {
        ConnectOptions {
            broker,
            client: client.into(),
            credentials: None,
            tls: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why talking to the broker failed. Every variant names the broker; the binary prints it on
/// one line and exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum DxError {
    /// The broker URL could not be read.
    #[error("bad broker URL {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A fleet, device or client name outside the topic rules.
    #[error(transparent)]
    Name(#[from] diffusionx_fleet::TopicError),
    /// The TLS files could not be used.
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// `mqtts://` without a TLS configuration, or a TLS configuration for `mqtt://`.
    #[error("broker {broker}: {why}")]
    TlsMismatch {
        /// The broker.
        broker: BrokerUrl,
        /// What does not fit.
        why: &'static str,
    },
    /// No TCP connection (refused, unreachable host, DNS).
    #[error("cannot reach the broker at {broker}: {source}")]
    Unreachable {
        /// The broker.
        broker: BrokerUrl,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS with the broker at {broker} failed: {source}")]
    Tls {
        /// The broker.
        broker: BrokerUrl,
        /// What rustls said.
        source: rumqttc::TlsError,
    },
    /// The broker answered CONNECT with a refusal (bad password, not authorized, ...).
    #[error("the broker at {broker} refused the connection: {reason}")]
    Refused {
        /// The broker.
        broker: BrokerUrl,
        /// The CONNACK reason, in words.
        reason: String,
    },
    /// The broker refused a subscription (its ACL does not let this account read there).
    #[error("the broker at {broker} refused the subscription to {filter}: {reason:?}")]
    SubscribeRefused {
        /// The broker.
        broker: BrokerUrl,
        /// The filter.
        filter: String,
        /// The SUBACK reason code.
        reason: SubscribeReasonCode,
    },
    /// The broker refused a publish (its ACL does not let this account write there).
    #[error("the broker at {broker} refused the publish to {topic}: {reason:?}")]
    PublishRefused {
        /// The broker.
        broker: BrokerUrl,
        /// The topic.
        topic: String,
        /// The PUBACK reason code.
        reason: PubAckReason,
    },
    /// The broker did not answer in time (connect, SUBACK or PUBACK).
    #[error("no answer from the broker at {broker} within {} s while {what}", .after.as_secs_f32())]
    Timeout {
        /// The broker.
        broker: BrokerUrl,
        /// What was being waited for.
        what: &'static str,
        /// How long was waited.
        after: Duration,
    },
    /// The connection broke after it was made.
    #[error("lost the connection to the broker at {broker}: {source}")]
    Lost {
        /// The broker.
        broker: BrokerUrl,
        /// What the MQTT client said.
        source: ConnectionError,
    },
    /// A device that never reported anything retained (a typo, or a kiosk that never
    /// connected): nothing was published, or nothing answered.
    #[error("no kiosk {device:?} in fleet {fleet} (never reported); {hint}")]
    UnknownDevice {
        /// The fleet.
        fleet: String,
        /// The device name given.
        device: String,
        /// What to do about it.
        hint: &'static str,
    },
}

/// Builds the rustls client configuration for `mqtts://` from PEM bytes: the CA that signed the
/// broker's certificate and, for certificate authentication, the client's chain and key.
/// Uses the ring provider explicitly (never the process default), TLS 1.3 and 1.2.
pub fn tls_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, DxError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let setup = |what: &str, e: &dyn fmt::Display| DxError::TlsSetup(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| setup("reading the CA file", &e))?;
        roots
            .add(cert)
            .map_err(|e| setup("adding the CA certificate", &e))?;
    }
    if roots.is_empty() {
        return Err(DxError::TlsSetup("the CA file has no certificate".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| setup("the ring provider", &e))?
    .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup("reading the certificate file", &e))?;
            if chain.is_empty() {
                return Err(DxError::TlsSetup(
                    "the certificate file has no certificate".into(),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| setup("reading the key file", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| setup("the certificate and key", &e))
        }
    }
}

/// A connected MQTT v5 client. Publishes that arrive while dxctl waits for an acknowledgement
/// are kept, in order, for [`Link::next_publish`].
pub struct Link {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    pending: VecDeque<Publish>,
    broker: BrokerUrl,
    client_id: String,
    timeout: Duration,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("broker", &self.broker)
            .field("client", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connects and waits for the broker's CONNACK (at most `options.timeout`).
    pub async fn connect(options: &ConnectOptions) -> Result<Link, DxError> {
        diffusionx_fleet::topic::check_name("client", &options.client)?;
        let broker = options.broker.clone();
        let mut mqtt = MqttOptions::new(&options.client, &broker.host, broker.port);
        mqtt.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_max_packet_size(Some(MAX_PACKET))
            .set_connection_timeout(options.timeout.as_secs().max(1));
        if let Some((user, password)) = &options.credentials {
            mqtt.set_credentials(user, password);
        }
        match (&options.tls, broker.tls) {
            (Some(config), true) => {
                mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    config.clone(),
                )));
            }
            (None, false) => {}
            (None, true) => {
                return Err(DxError::TlsMismatch {
                    broker,
                    why: "mqtts:// needs a CA file (--ca)",
                });
            }
            (Some(_), false) => {
                return Err(DxError::TlsMismatch {
                    broker,
                    why: "TLS files given for a plain mqtt:// broker (use mqtts://)",
                });
            }
        }
        let (client, eventloop) = AsyncClient::new(mqtt, 64);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(pump(eventloop, tx));
        let mut link = Link {
            client,
            events,
            pending: VecDeque::new(),
            broker,
            client_id: options.client.clone(),
            timeout: options.timeout,
        };
        let deadline = Instant::now() + link.timeout;
        loop {
            match link.next_event(deadline, "connecting").await? {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => return Ok(link),
                Packet::ConnAck(ack) => {
                    return Err(DxError::Refused {
                        broker: link.broker.clone(),
                        reason: refusal(ack.code),
                    });
                }
                _ => {}
            }
        }
    }

    /// The broker this link is connected to.
    pub fn broker(&self) -> &BrokerUrl {
        &self.broker
    }

    /// The MQTT client id (the `{client}` of response topics).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The timeout every wait uses.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Subscribes to `filters` with QoS 1 and waits for the SUBACK; a refused filter is an
    /// error. Retained messages on them arrive after this returns.
    pub async fn subscribe(&mut self, filters: &[String]) -> Result<(), DxError> {
        use rumqttc::v5::mqttbytes::v5::Filter;
        let list: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        self.client
            .subscribe_many(list)
            .await
            .map_err(|_| self.closed())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Packet::SubAck(ack) = self.next_event(deadline, "subscribing").await? {
                for (filter, reason) in filters.iter().zip(ack.return_codes) {
                    if !matches!(reason, SubscribeReasonCode::Success(_)) {
                        return Err(DxError::SubscribeRefused {
                            broker: self.broker.clone(),
                            filter: filter.clone(),
                            reason,
                        });
                    }
                }
                return Ok(());
            }
        }
    }

    /// Publishes with QoS 1 and waits for the PUBACK; a refusal (reason code other than
    /// success or "no matching subscribers") is an error.
    pub async fn publish(
        &mut self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        properties: PublishProperties,
    ) -> Result<(), DxError> {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, properties)
            .await
            .map_err(|_| self.closed())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Packet::PubAck(ack) = self.next_event(deadline, "publishing").await? {
                return match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    reason => Err(DxError::PublishRefused {
                        broker: self.broker.clone(),
                        topic: topic.into(),
                        reason,
                    }),
                };
            }
        }
    }

    /// The next publish that arrives before `deadline` (`Ok(None)` when none did).
    pub async fn next_publish(&mut self, deadline: Instant) -> Result<Option<Publish>, DxError> {
        if let Some(publish) = self.pending.pop_front() {
            return Ok(Some(publish));
        }
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(self.closed()),
                Ok(Some(Err(e))) => return Err(self.lost(e)),
                Ok(Some(Ok(Event::Incoming(Packet::Publish(publish))))) => {
                    return Ok(Some(publish));
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Every publish that arrives until none has for `quiet`, or until `deadline`: how the
    /// retained messages of a subscription are read (the broker sends them at once).
    pub async fn collect_quiet(
        &mut self,
        quiet: Duration,
        deadline: Instant,
    ) -> Result<Vec<Publish>, DxError> {
        let mut out = Vec::new();
        loop {
            let until = (Instant::now() + quiet).min(deadline);
            match self.next_publish(until).await? {
                Some(publish) => out.push(publish),
                None => return Ok(out),
            }
        }
    }

    /// Disconnects cleanly (best effort: a broken connection is already gone).
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let mut events = self.events;
        let deadline = Instant::now() + Duration::from_millis(500);
        // Let the event loop send the DISCONNECT before the runtime goes away.
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, events.recv()).await {}
    }

    /// The next packet from the broker other than a publish (publishes are queued).
    async fn next_event(
        &mut self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Packet, DxError> {
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => {
                    return Err(DxError::Timeout {
                        broker: self.broker.clone(),
                        what,
                        after: self.timeout,
                    });
                }
                Ok(None) => return Err(self.closed()),
                Ok(Some(Err(e))) => return Err(self.lost(e)),
                Ok(Some(Ok(Event::Incoming(Packet::Publish(publish))))) => {
                    self.pending.push_back(publish);
                }
                Ok(Some(Ok(Event::Incoming(packet)))) => return Ok(packet),
                Ok(Some(Ok(Event::Outgoing(_)))) => {}
            }
        }
    }

    fn lost(&self, error: ConnectionError) -> DxError {
        let broker = self.broker.clone();
        match error {
            ConnectionError::Io(source) => DxError::Unreachable { broker, source },
            ConnectionError::Tls(source) => DxError::Tls { broker, source },
            ConnectionError::ConnectionRefused(code) => DxError::Refused {
                broker,
                reason: refusal(code),
            },
            ConnectionError::Timeout(_) => DxError::Timeout {
                broker,
                what: "connecting",
                after: self.timeout,
            },
            source => DxError::Lost { broker, source },
        }
    }

    fn closed(&self) -> DxError {
        DxError::Lost {
            broker: self.broker.clone(),
            source: ConnectionError::RequestsDone,
        }
    }
}

/// Publish properties of a request: where to answer, the correlation, and the expiry.
pub fn request_properties(
    response_topic: String,
    correlation: &[u8],
    expiry: Duration,
) -> PublishProperties {
    PublishProperties {
        response_topic: Some(response_topic),
        correlation_data: Some(Bytes::copy_from_slice(correlation)),
        message_expiry_interval: Some(expiry.as_secs().clamp(1, u32::MAX as u64) as u32),
        ..PublishProperties::default()
    }
}

/// Runs the event loop until the connection fails, forwarding every event. A CLI does not
/// reconnect: the first error ends the link.
async fn pump(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<Event, ConnectionError>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if tx.send(event).is_err() || failed {
            return;
        }
    }
}

/// A CONNACK refusal in words.
fn refusal(code: ConnectReturnCode) -> String {
    match code {
        ConnectReturnCode::BadUserNamePassword => "bad user name or password".into(),
        // mosquitto 2.0 answers a wrong password with this code, not the one above.
        ConnectReturnCode::NotAuthorized => {
            "not authorized (check the user name, password or certificate)".into()
        }
        ConnectReturnCode::Banned => "banned".into(),
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => {
            "client id not accepted".into()
        }
        ConnectReturnCode::ServerUnavailable | ConnectReturnCode::ServiceUnavailable => {
            "server unavailable".into()
        }
        ConnectReturnCode::ServerBusy => "server busy".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports() {
        let url = |s: &str| s.parse::<BrokerUrl>();
        assert_eq!(
            url("mqtt://127.0.0.1:1999").expect("valid"),
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1999
            }
        );
        assert_eq!(url("mqtts://broker.example").expect("valid").port, 8883);
        assert_eq!(url("mqtt://broker.example/").expect("valid").port, 1883);
        let v6 = url("mqtts://[::1]:8884").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port, v6.tls), ("::1", 8884, true));
        assert_eq!(v6.to_string(), "mqtts://[::1]:8884");
        // The port is optional after an IPv6 address too.
        let v6 = url("mqtts://[::1]").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port, v6.tls), ("::1", 8883, true));
        let v6 = url("mqtt://[fe80::1]/").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port), ("fe80::1", 1883));
        assert_eq!(v6.to_string(), "mqtt://[fe80::1]:1883");
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:port",
            "h:1883",
            "mqtt://:1883",
            "mqtt://[::1",
            "mqtt://[::1]1883",
            "mqtt://[::1]:x",
            "mqtt://[]:1883",
            "mqtt://::1",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_setup_refuses_files_without_certificates() {
        let error = tls_config(b"not a pem", None).expect_err("no CA");
        assert_eq!(
            error.to_string(),
            "TLS setup: the CA file has no certificate"
        );
    }
}
