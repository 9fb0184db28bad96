//! `dxctl config`: read a kiosk's reported settings, change them through a retained
//! `config/desired`, or check a patch locally against what the kiosk reported.

use std::collections::BTreeMap;

use diffusionx_fleet::topic::{self, Leaf, Topic};
use diffusionx_fleet::{ConfigDesired, ConfigReported, Settings, SettingsError};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::broker::{DxError, Link};
use crate::devices::QUIET;

/// A settings patch: field -> value, as in [`Settings`].
pub type Patch = Map<String, Value>;

/// What the broker holds for one kiosk's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceConfig {
    /// The kiosk's retained `config/reported`.
    pub reported: Option<ConfigReported>,
    /// The operators' retained `config/desired`.
    pub desired: Option<ConfigDesired>,
    /// `topic: why` for each retained payload that did not parse.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub malformed: Vec<String>,
}

impl DeviceConfig {
    /// The version a new `config/desired` gets: one more than any version known (desired,
    /// reported, applied), so the kiosk never takes it for one it has already considered.
    pub fn next_version(&self) -> u64 {
        let desired = self.desired.as_ref().map_or(0, |d| d.version);
        let reported = self
            .reported
            .as_ref()
            .map_or(0, |r| r.version.max(r.applied_version));
        desired.max(reported) + 1
    }

    fn apply(&mut self, topic: &Topic, payload: &[u8]) {
        let result = match topic.leaf {
            Leaf::ConfigReported => {
                serde_json::from_slice(payload).map(|r| self.reported = Some(r))
            }
            Leaf::ConfigDesired => serde_json::from_slice(payload).map(|d| self.desired = Some(d)),
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.malformed.push(format!("{topic}: {e}"));
        }
    }
}

/// Reads `key=value` arguments into a patch: a value that parses as JSON is taken as JSON
/// (`preview_steps=8`, `blocklist=["gore"]`), anything else as a string
/// (`prompt_privacy=hash`).
pub fn parse_assignments<S: AsRef<str>>(args: &[S]) -> Result<Patch, String> {
    let mut patch = Patch::new();
    for arg in args {
        let arg = arg.as_ref();
        let (key, value) = arg
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| format!("{arg:?} is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        patch.insert(key.into(), value);
    }
    Ok(patch)
}

/// Reads a patch file's contents: one JSON object.
pub fn parse_patch(text: &str) -> Result<Patch, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(patch)) => Ok(patch),
        Ok(_) => Err("a patch must be a JSON object of settings".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Checks `patch` locally with the same rules the kiosk applies ([`Settings::apply`]).
pub fn check(reported: &Settings, patch: &Patch) -> Result<Settings, SettingsError> {
    reported.apply(patch)
}

fn config_topics(fleet: &str, device: &str) -> Result<(Topic, Topic), DxError> {
    Ok((
        Topic::new(fleet, device, Leaf::ConfigDesired)?,
        Topic::new(fleet, device, Leaf::ConfigReported)?,
    ))
}

/// Subscribes to the device's `config/desired` and `config/reported` and reads what is
/// retained. The subscription stays, so [`set`] can wait for the answer on the same link.
pub async fn read(link: &mut Link, fleet: &str, device: &str) -> Result<DeviceConfig, DxError> {
    let (desired, reported) = config_topics(fleet, device)?;
    link.subscribe(&[desired.to_string(), reported.to_string()])
        .await?;
    let deadline = Instant::now() + link.timeout();
    let mut config = DeviceConfig::default();
    for publish in link.collect_quiet(QUIET, deadline).await? {
        if let Ok(topic) = Topic::parse(&String::from_utf8_lossy(&publish.topic)) {
            config.apply(&topic, &publish.payload);
        }
    }
    Ok(config)
}

/// How a `config set` ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum SetOutcome {
    /// The kiosk applied the version.
    Accepted {
        /// Its report.
        reported: ConfigReported,
    },
    /// The kiosk refused it; its settings in force are unchanged.
    Refused {
        /// Its report (with `errors`).
        reported: ConfigReported,
    },
    /// No report of this version before the timeout (the kiosk may be offline; the desired
    /// configuration stays retained and applies when it connects).
    NoAnswer {
        /// The version published.
        version: u64,
    },
}

/// What a `config set` does to the operator-installed predictor weights.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictorChange {
    /// Carry the weights of the retained `config/desired` forward (the default).
    Keep,
    /// Install these (a weights file's JSON).
    Install(Value),
    /// Remove them: the kiosk goes back to its own.
    Remove,
}

/// Publishes `patch` as the device's retained `config/desired` with the next version (see
/// [`DeviceConfig::next_version`]) and waits for the `config/reported` of that version.
pub async fn set(
    link: &mut Link,
    fleet: &str,
    device: &str,
    patch: Patch,
    predictor: PredictorChange,
) -> Result<SetOutcome, DxError> {
    let known = read(link, fleet, device).await?;
    let version = known.next_version();
    let (desired_topic, reported_topic) = config_topics(fleet, device)?;
    let desired = ConfigDesired {
        version,
        settings: patch,
        predictor: match predictor {
            PredictorChange::Keep => known.desired.and_then(|d| d.predictor),
            PredictorChange::Install(weights) => Some(weights),
            PredictorChange::Remove => None,
        },
    };
    let body = serde_json::to_vec(&desired).expect("a JSON map always serializes");
    link.publish(
        &desired_topic.to_string(),
        true,
        body,
        PublishProperties::default(),
    )
    .await?;
    let deadline = Instant::now() + link.timeout();
    let reported_name = reported_topic.to_string();
    while let Some(publish) = link.next_publish(deadline).await? {
        if publish.topic != reported_name.as_bytes() {
            continue;
        }
        let Ok(reported) = serde_json::from_slice::<ConfigReported>(&publish.payload) else {
            continue;
        };
        if reported.version == version {
            return Ok(if reported.accepted {
                SetOutcome::Accepted { reported }
            } else {
                SetOutcome::Refused { reported }
            });
        }
    }
    Ok(SetOutcome::NoAnswer { version })
}

/// Field -> reason lines, sorted by field.
pub fn error_lines(errors: &BTreeMap<String, String>) -> Vec<String> {
    errors
        .iter()
        .map(|(field, why)| format!("{field}: {why}"))
        .collect()
}

/// Checks the names of a fleet and device (before anything is published).
pub fn check_names(fleet: &str, device: &str) -> Result<(), DxError> {
    topic::check_name("fleet", fleet)?;
    topic::check_name("device", device)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn assignments_take_json_values_or_strings() {
        let patch = parse_assignments(&[
            "preview_steps=8",
            "prompt_privacy=hash",
            "blocklist=[\"gore\"]",
            "noise_level=0.4",
        ])
        .expect("valid");
        assert_eq!(
            Value::Object(patch),
            json!({"preview_steps": 8, "prompt_privacy": "hash", "blocklist": ["gore"],
                   "noise_level": 0.4})
        );
        assert!(parse_assignments(&["preview_steps"]).is_err());
        assert!(parse_assignments(&["=3"]).is_err());
        assert_eq!(
            parse_patch("[1]"),
            Err("a patch must be a JSON object of settings".into())
        );
    }

    #[test]
    fn the_next_version_is_above_every_known_one() {
        let mut config = DeviceConfig::default();
        assert_eq!(config.next_version(), 1);
        config.desired = Some(ConfigDesired {
            version: 7,
            settings: Map::new(),
            predictor: None,
        });
        assert_eq!(config.next_version(), 8);
        let settings: Settings = serde_json::from_value(json!({
            "preview_steps": 4, "noise_level": 0.5, "cloud_steps": 20, "idle_timeout_s": 60,
            "prompt_privacy": "full", "telemetry_interval_s": 30, "stats_window_s": 3600,
            "blocklist": []}))
        .expect("valid");
        config.reported = Some(ConfigReported {
            version: 9,
            accepted: false,
            applied_version: 3,
            settings,
            errors: BTreeMap::new(),
            predictor: None,
            ts_ms: 0,
        });
        assert_eq!(config.next_version(), 10);
    }
}
