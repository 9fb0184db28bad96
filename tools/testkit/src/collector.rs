//! An MQTT v5 subscriber for tests: a persistent session that reconnects forever and records
//! every message it receives, so a test can wait for what should arrive and count duplicates.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Whether the broker delivered it as retained.
    pub retain: bool,
}

/// The subscriber.
#[derive(Debug)]
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
    client: AsyncClient,
}

impl Collector {
    /// Subscribes `client_id` (a persistent session: messages queue at the broker while it is
    /// away) to `filter` at QoS 1 on `127.0.0.1:port`. Call inside a tokio runtime.
    pub fn start(port: u16, client_id: &str, filter: &str) -> Collector {
        Collector::start_with(port, client_id, filter, None)
    }

    /// The same with a username and password.
    pub fn start_with(
        port: u16,
        client_id: &str,
        filter: &str,
        login: Option<(&str, &str)>,
    ) -> Collector {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let subscriber = client.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        subscriber
                            .subscribe(filter.clone(), QoS::AtLeastOnce)
                            .await
                            .ok();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(mut list) = sink.lock() {
                            list.push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Collector {
            received,
            task,
            client,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for what was received (checked every 20 ms), up to `timeout`;
    /// returns what was received either way.
    pub async fn wait(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.received();
            if done(&now) || Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes (QoS 1) as this client.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .ok();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
