//! rumqttd in-process: the zero-setup MQTT broker of the demo and of development (feature
//! `embedded-broker`). Production fleets use their own broker (`docs/mosquitto/`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A broker listening on loopback (MQTT v5 and v3.1.1 on two ports).
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// The MQTT v5 listener (what the kiosk agent and dxctl use).
    pub v5: SocketAddr,
    /// The MQTT v3.1.1 listener (for older tools such as `mosquitto_sub -V 311`).
    pub v4: SocketAddr,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EmbeddedBroker {
    /// Starts rumqttd on two free loopback ports in its own threads; returns once it accepts
    /// connections.
    pub fn start() -> anyhow::Result<EmbeddedBroker> {
        let (v4, v5) = (free_port()?, free_port()?);
        let text = format!(
            r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{v4}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{v5}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
"#
        );
        let config: rumqttd::Config = toml::from_str(&text).context("rumqttd configuration")?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(error) = broker.start() {
                    tracing::error!(%error, "embedded broker stopped");
                }
            })?;
        let v5: SocketAddr = ([127, 0, 0, 1], v5).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(v5).is_err() {
            if Instant::now() > deadline {
                bail!("the embedded broker did not listen on {v5} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(EmbeddedBroker {
            v5,
            v4: ([127, 0, 0, 1], v4).into(),
        })
    }
}
