//! `dxctl cmd`: one command request (MQTT v5 request/response) and its correlated reply.
//!
//! The request goes QoS 1 to `cmd/{name}` with the response topic `resp/{client}` of the same
//! device, 16 bytes of correlation data and a message expiry of the timeout; the reply is the
//! first publish on that topic with the same correlation data (others are ignored).

use std::time::Duration;

use diffusionx_fleet::CommandReply;
use diffusionx_fleet::topic::{Command, Leaf, Topic};
use serde_json::Value;
use tokio::time::Instant;

use crate::broker::{DxError, Link, request_properties};

/// Correlation data: 16 random bytes.
pub type Correlation = [u8; 16];

/// Fresh correlation data from the operating system's random source.
pub fn new_correlation() -> Correlation {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes
}

/// The arguments a command takes when none are given: `{}`.
pub fn default_args() -> Value {
    Value::Object(serde_json::Map::new())
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The kiosk replied.
    Reply(CommandReply),
    /// A reply with our correlation that is not a [`CommandReply`] (the raw payload).
    Malformed(String),
    /// No reply before the timeout.
    NoReply {
        /// How long dxctl waited.
        waited: Duration,
    },
}

/// Sends `command` with `args` to `device` and waits (the link's timeout) for the reply that
/// carries `correlation`.
pub async fn call(
    link: &mut Link,
    fleet: &str,
    device: &str,
    command: Command,
    args: &Value,
    correlation: Correlation,
) -> Result<Outcome, DxError> {
    let request = Topic::new(fleet, device, Leaf::Cmd(command))?;
    let response = Topic::new(fleet, device, Leaf::Response(link.client_id().into()))?;
    let response_name = response.to_string();
    link.subscribe(std::slice::from_ref(&response_name)).await?;
    let waited = link.timeout();
    let properties = request_properties(response_name.clone(), &correlation, waited);
    let body = serde_json::to_vec(args).expect("a JSON value always serializes");
    link.publish(&request.to_string(), false, body, properties)
        .await?;
    let deadline = Instant::now() + waited;
    while let Some(publish) = link.next_publish(deadline).await? {
        let ours = publish.topic == response_name.as_bytes()
            && publish
                .properties
                .as_ref()
                .and_then(|p| p.correlation_data.as_deref())
                == Some(&correlation[..]);
        if !ours {
            continue;
        }
        return Ok(
            match serde_json::from_slice::<CommandReply>(&publish.payload) {
                Ok(reply) => Outcome::Reply(reply),
                Err(_) => Outcome::Malformed(String::from_utf8_lossy(&publish.payload).into()),
            },
        );
    }
    Ok(Outcome::NoReply { waited })
}
