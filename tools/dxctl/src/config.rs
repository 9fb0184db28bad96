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
    /// Whether a retained `status` of the device exists.
    #[serde(skip)]
    pub presence_seen: bool,
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

    /// The retained desired version when the kiosk has not answered it yet (no report, or a
    /// report of an older version).
    pub fn pending(&self) -> Option<&ConfigDesired> {
        self.desired
            .as_ref()
            .filter(|d| self.reported.as_ref().is_none_or(|r| d.version > r.version))
    }

    /// Whether the kiosk ever reported anything retained (its configuration or its presence):
    /// a device name that did not is a typo, or a kiosk that never connected.
    pub fn ever_reported(&self) -> bool {
        self.reported.is_some() || self.presence_seen
    }

    fn apply(&mut self, topic: &Topic, payload: &[u8]) {
        let result = match topic.leaf {
            Leaf::ConfigReported => {
                serde_json::from_slice(payload).map(|r| self.reported = Some(r))
            }
            Leaf::ConfigDesired => serde_json::from_slice(payload).map(|d| self.desired = Some(d)),
            Leaf::Status => {
                self.presence_seen = true;
                Ok(())
            }
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

/// Subscribes to the device's `config/desired`, `config/reported` and `status` and reads what
/// is retained. The subscription stays, so [`set`] can wait for the answer on the same link.
pub async fn read(link: &mut Link, fleet: &str, device: &str) -> Result<DeviceConfig, DxError> {
    let (desired, reported) = config_topics(fleet, device)?;
    let status = Topic::new(fleet, device, Leaf::Status)?;
    link.subscribe(&[
        desired.to_string(),
        reported.to_string(),
        status.to_string(),
    ])
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

/// What `cmd` and `config get/check` say of a device that never reported anything retained.
pub const CHECK_THE_NAME: &str = "check the device name and --fleet";

/// [`DxError::UnknownDevice`] when `read` shows that `device` never reported anything
/// retained (a typo, or a kiosk that never connected), so that "no answer" is not taken for
/// "offline".
pub fn known(read: &DeviceConfig, fleet: &str, device: &str) -> Result<(), DxError> {
    if read.ever_reported() {
        return Ok(());
    }
    Err(DxError::UnknownDevice {
        fleet: fleet.into(),
        device: device.into(),
        hint: CHECK_THE_NAME,
    })
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
    /// The kiosk reported the version as applied, but with other settings or weights than
    /// were published: another change used the same version number first (two operators at
    /// once), and this one was not applied.
    Conflict {
        /// What was published.
        desired: ConfigDesired,
        /// The kiosk's report of the version.
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

/// The next desired version for a change: the operators' settings in force (as the kiosk
/// reports them; from the retained desired version when it is the one applied, for kiosks that
/// do not report them) with `patch` on top, and the predictor weights the change asks for.
/// Weights are carried forward only when the kiosk reports them in force, so weights it
/// refused do not make every later change refused too.
///
/// A retained desired version the kiosk has not answered yet (above its reported `version`:
/// it is offline, or busy) is pending, and is the operators' whole wish so far: the change is
/// built on its settings and weights, so that it is not silently replaced. Returns notes for
/// the operator.
pub fn plan(
    known: &DeviceConfig,
    patch: Patch,
    predictor: PredictorChange,
) -> (ConfigDesired, Vec<String>) {
    if let Some(pending) = known.pending() {
        let mut notes = vec![format!(
            "building on pending version {} (not answered by the kiosk yet)",
            pending.version
        )];
        let mut settings = pending.settings.clone();
        settings.extend(patch);
        let predictor = match predictor {
            PredictorChange::Keep => {
                let weights = pending.predictor.clone().filter(|w| !w.is_null());
                if let Some(w) = &weights {
                    notes.push(format!(
                        "keeping pending predictor weights {}",
                        w["model_version"].as_str().unwrap_or("(unnamed)")
                    ));
                }
                weights
            }
            PredictorChange::Install(weights) => Some(weights),
            PredictorChange::Remove => None,
        };
        let desired = ConfigDesired {
            version: known.next_version(),
            settings,
            predictor,
        };
        return (desired, notes);
    }
    let mut notes = Vec::new();
    let applied_desired = known.desired.as_ref().filter(|d| {
        known
            .reported
            .as_ref()
            .is_some_and(|r| r.applied_version == d.version)
    });
    let mut settings = match known.reported.as_ref().and_then(|r| r.overrides.clone()) {
        Some(overrides) => overrides,
        None => applied_desired
            .map(|d| d.settings.clone())
            .unwrap_or_default(),
    };
    settings.extend(patch);
    let in_force = known.reported.as_ref().and_then(|r| r.predictor.clone());
    let predictor = match predictor {
        PredictorChange::Keep => {
            let retained = known.desired.as_ref().and_then(|d| d.predictor.clone());
            let version = |w: &Value| w["model_version"].as_str().map(str::to_owned);
            match retained {
                Some(w) if in_force.is_some() && version(&w) == in_force => {
                    notes.push(format!(
                        "keeping predictor weights {}",
                        in_force.as_deref().unwrap_or_default()
                    ));
                    Some(w)
                }
                Some(w) => {
                    notes.push(format!(
                        "not keeping predictor weights {}: the kiosk does not run them",
                        version(&w).unwrap_or_else(|| "(unnamed)".into())
                    ));
                    None
                }
                None => None,
            }
        }
        PredictorChange::Install(weights) => Some(weights),
        PredictorChange::Remove => None,
    };
    let desired = ConfigDesired {
        version: known.next_version(),
        settings,
        predictor,
    };
    (desired, notes)
}

/// What [`set`] does for a device that never reported anything retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownDevice {
    /// Publish nothing: [`DxError::UnknownDevice`] (a typo would leave a retained desired
    /// configuration that nobody ever reads).
    Refuse,
    /// Publish anyway (a kiosk that has not connected yet: `--force`).
    Publish,
}

/// Whether `reported` (of the published version) describes what was published: the
/// operators' settings in force equal to the published ones (kiosks that report them), and
/// the same predictor weights. A kiosk ignores a version number it has already considered, so
/// an accepted report with other content answers another change that used the number first.
pub fn answers(desired: &ConfigDesired, reported: &ConfigReported) -> bool {
    let settings = reported
        .overrides
        .as_ref()
        .is_none_or(|overrides| *overrides == desired.settings);
    let weights = desired
        .predictor
        .as_ref()
        .filter(|w| !w.is_null())
        .map(|w| w["model_version"].as_str().map(str::to_owned));
    let predictor = match weights {
        None => reported.predictor.is_none(),
        Some(version) => version.is_none() || reported.predictor == version,
    };
    settings && predictor
}

/// Publishes a change as the device's retained `config/desired` with the next version (see
/// [`plan`] and [`DeviceConfig::next_version`]) and waits for the `config/reported` of that
/// version.
pub async fn set(
    link: &mut Link,
    fleet: &str,
    device: &str,
    patch: Patch,
    predictor: PredictorChange,
    unknown: UnknownDevice,
) -> Result<SetOutcome, DxError> {
    let known = read(link, fleet, device).await?;
    if unknown == UnknownDevice::Refuse && !known.ever_reported() {
        return Err(DxError::UnknownDevice {
            fleet: fleet.into(),
            device: device.into(),
            hint: "use --force to publish anyway",
        });
    }
    let (desired, notes) = plan(&known, patch, predictor);
    for note in notes {
        eprintln!("{device}: {note}");
    }
    let version = desired.version;
    let (desired_topic, reported_topic) = config_topics(fleet, device)?;
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
            return Ok(if !reported.accepted {
                SetOutcome::Refused { reported }
            } else if answers(&desired, &reported) {
                SetOutcome::Accepted { reported }
            } else {
                SetOutcome::Conflict { desired, reported }
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
            overrides: None,
            errors: BTreeMap::new(),
            predictor: None,
            ts_ms: 0,
        });
        assert_eq!(config.next_version(), 10);
    }

    fn known(
        overrides: Option<Value>,
        applied: u64,
        desired: Value,
        in_force: Option<&str>,
    ) -> DeviceConfig {
        let settings: Settings = serde_json::from_value(json!({
            "preview_steps": 4, "noise_level": 0.5, "cloud_steps": 20, "idle_timeout_s": 60,
            "prompt_privacy": "full", "telemetry_interval_s": 30, "stats_window_s": 3600,
            "blocklist": []}))
        .expect("valid");
        DeviceConfig {
            reported: Some(ConfigReported {
                version: 3,
                accepted: true,
                applied_version: applied,
                settings,
                overrides: overrides.map(|o| o.as_object().cloned().expect("an object")),
                errors: BTreeMap::new(),
                predictor: in_force.map(str::to_owned),
                ts_ms: 0,
            }),
            desired: Some(serde_json::from_value(desired).expect("a desired version")),
            malformed: Vec::new(),
            presence_seen: true,
        }
    }

    fn patch(value: Value) -> Patch {
        value.as_object().cloned().expect("an object")
    }

    #[test]
    fn a_change_builds_on_a_pending_version_the_kiosk_has_not_answered() {
        let weights = json!({"model_version": "m2", "format": "diffusionx-predictor"});
        let mut k = known(
            Some(json!({})),
            4,
            json!({"version": 5, "settings": {"preview_steps": 6}, "predictor": weights}),
            None,
        );
        let reported = k.reported.as_mut().expect("reported");
        reported.version = 4;
        let (d, notes) = plan(
            &k,
            patch(json!({"noise_level": 0.4})),
            PredictorChange::Keep,
        );
        assert_eq!(d.version, 6);
        assert_eq!(
            Value::Object(d.settings),
            json!({"preview_steps": 6, "noise_level": 0.4})
        );
        assert_eq!(d.predictor, Some(weights));
        assert_eq!(
            notes,
            [
                "building on pending version 5 (not answered by the kiosk yet)",
                "keeping pending predictor weights m2"
            ]
        );
        // A kiosk that never reported: the retained version is pending too.
        k.reported = None;
        let (d, _) = plan(
            &k,
            patch(json!({"cloud_steps": 30})),
            PredictorChange::Remove,
        );
        assert_eq!(
            (Value::Object(d.settings), d.predictor),
            (json!({"preview_steps": 6, "cloud_steps": 30}), None)
        );
    }

    #[test]
    fn only_a_report_of_what_was_published_answers_it() {
        let k = known(
            Some(json!({"preview_steps": 6})),
            5,
            json!({"version": 5, "settings": {}}),
            Some("m1"),
        );
        let mut reported = k.reported.expect("reported");
        let desired = |v: Value| serde_json::from_value::<ConfigDesired>(v).expect("desired");
        let ours = desired(json!({"version": 5, "settings": {"preview_steps": 6},
                                  "predictor": {"model_version": "m1"}}));
        assert!(answers(&ours, &reported));
        let other = desired(json!({"version": 5, "settings": {"cloud_steps": 30},
                                   "predictor": {"model_version": "m1"}}));
        assert!(!answers(&other, &reported), "other settings");
        let no_weights = desired(json!({"version": 5, "settings": {"preview_steps": 6}}));
        assert!(!answers(&no_weights, &reported), "other weights");
        // An older kiosk that does not report its overrides: the weights alone are checked.
        reported.overrides = None;
        assert!(answers(&other, &reported));
    }

    #[test]
    fn a_change_keeps_the_operators_other_settings_and_only_weights_in_force() {
        let weights = json!({"model_version": "m1", "format": "diffusionx-predictor"});
        // The kiosk reports its overrides: the change goes on top of them.
        let k = known(
            Some(json!({"preview_steps": 8})),
            3,
            json!({"version": 3, "settings": {"preview_steps": 8}, "predictor": weights}),
            Some("m1"),
        );
        let (d, notes) = plan(
            &k,
            patch(json!({"prompt_privacy": "hash"})),
            PredictorChange::Keep,
        );
        assert_eq!(d.version, 4);
        assert_eq!(
            Value::Object(d.settings),
            json!({"preview_steps": 8, "prompt_privacy": "hash"})
        );
        assert_eq!(d.predictor, Some(weights.clone()));
        assert_eq!(notes, ["keeping predictor weights m1"]);
        // Installing or removing weights alone keeps every setting.
        let (d, _) = plan(&k, Patch::new(), PredictorChange::Remove);
        assert_eq!(
            (Value::Object(d.settings), d.predictor),
            (json!({"preview_steps": 8}), None)
        );
        let (d, _) = plan(&k, Patch::new(), PredictorChange::Install(json!({"x": 1})));
        assert_eq!(d.predictor, Some(json!({"x": 1})));

        // Weights the kiosk refused are not carried into the next change.
        let refused = known(
            Some(json!({"preview_steps": 8})),
            2,
            json!({"version": 3, "settings": {}, "predictor": weights}),
            None,
        );
        let (d, notes) = plan(
            &refused,
            patch(json!({"cloud_steps": 30})),
            PredictorChange::Keep,
        );
        assert_eq!(d.predictor, None);
        assert_eq!(
            Value::Object(d.settings),
            json!({"preview_steps": 8, "cloud_steps": 30}),
            "from what the kiosk runs, not from the refused version"
        );
        assert_eq!(
            notes,
            ["not keeping predictor weights m1: the kiosk does not run them"]
        );

        // A kiosk that does not report its overrides: the retained version if it is applied.
        let old = known(
            None,
            3,
            json!({"version": 3, "settings": {"preview_steps": 8}}),
            None,
        );
        let (d, _) = plan(
            &old,
            patch(json!({"cloud_steps": 30})),
            PredictorChange::Keep,
        );
        assert_eq!(
            Value::Object(d.settings),
            json!({"preview_steps": 8, "cloud_steps": 30})
        );
        let old = known(
            None,
            2,
            json!({"version": 3, "settings": {"preview_steps": 0}}),
            None,
        );
        let (d, _) = plan(
            &old,
            patch(json!({"cloud_steps": 30})),
            PredictorChange::Keep,
        );
        assert_eq!(Value::Object(d.settings), json!({"cloud_steps": 30}));
    }
}
