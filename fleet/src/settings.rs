//! The settings an operator may change over MQTT (`config/desired`, `cmd/set-config`,
//! `cmd/set-blocklist`), checked field by field: a change with any bad field is refused as a
//! whole, with a reason per field, and the settings in force stay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::payload::PromptField;

/// How prompts leave the kiosk in session reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptPrivacy {
    /// The prompt text.
    Full,
    /// A salted SHA-256 of it.
    Hash,
    /// Nothing.
    None,
}

impl PromptPrivacy {
    /// The prompt as this setting lets it out.
    pub fn apply(self, salt: &str, prompt: &str) -> Option<PromptField> {
        match self {
            PromptPrivacy::Full => Some(PromptField::Text(prompt.into())),
            PromptPrivacy::Hash => Some(PromptField::Sha256(hash_prompt(salt, prompt))),
            PromptPrivacy::None => None,
        }
    }
}

/// SHA-256 (lowercase hex) of `salt`, a zero byte and `prompt`.
pub fn hash_prompt(salt: &str, prompt: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update([0]);
    hasher.update(prompt.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Remotely changeable settings. The kiosk starts from its own configuration file's values;
/// operators change them over MQTT; the kiosk keeps the last accepted change on disk.
///
/// Readers ignore fields they do not know (a newer kiosk may have more settings); changes are
/// checked by [`Settings::apply`], which refuses unknown fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Denoising steps per preview, 1..=50.
    pub preview_steps: u16,
    /// The noise level the cloud redoes at finalize, 0.05..=1.0.
    pub noise_level: f32,
    /// Schedule steps of a cloud refinement, 1..=100.
    pub cloud_steps: u16,
    /// Seconds without input before a session is abandoned, 10..=3600.
    pub idle_timeout_s: u32,
    /// `full`, `hash` or `none`.
    pub prompt_privacy: PromptPrivacy,
    /// Seconds between telemetry samples, 5..=3600, at most half of `stats_window_s` (checked
    /// when a change sets either).
    pub telemetry_interval_s: u32,
    /// Seconds of history telemetry's counters and percentiles cover, 60..=86400.
    pub stats_window_s: u32,
    /// Words (case-insensitive, whole words) that a prompt may not contain; at most 1000
    /// entries of 1-64 characters.
    pub blocklist: Vec<String>,
    /// How the noise level is chosen at finalize (absent from older kiosks' reports: the
    /// defaults).
    #[serde(flatten, default)]
    pub noise_policy: NoisePolicy,
}

/// Who chooses the noise level at finalize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseLevelMode {
    /// The noise level predictor, within the policy below.
    #[default]
    Predicted,
    /// Always `noise_level`.
    Fixed,
}

/// The operator's policy for the noise level predictor (`diffusionx_predictor::Policy`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NoisePolicy {
    /// `predicted` or `fixed`.
    pub noise_level_mode: NoiseLevelMode,
    /// Predicted quality the chosen level must reach, 0..=1.
    pub quality_target: f32,
    /// Lowest level the predictor may choose, 0.05..=1.0.
    pub min_noise_level: f32,
    /// Highest level it may choose, `min_noise_level..=1.0`.
    pub max_noise_level: f32,
    /// Expected cloud latency a session may spend, ms, 100..=600000.
    pub cloud_budget_ms: u32,
}

impl Default for NoisePolicy {
    /// The predictor's default policy: target 0.8, levels 0.2 to 0.8, 4 s.
    fn default() -> Self {
        Self {
            noise_level_mode: NoiseLevelMode::Predicted,
            quality_target: 0.8,
            min_noise_level: 0.2,
            max_noise_level: 0.8,
            cloud_budget_ms: 4000,
        }
    }
}

/// A change refused: field -> reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("settings refused: {}", .errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; "))]
pub struct SettingsError {
    /// Field -> why.
    pub errors: BTreeMap<String, String>,
}

impl Settings {
    /// These settings as a JSON object, each `f32` as written (`0.8`, where a direct
    /// `serde_json::to_value` widens it to `0.800000011920929`): what command replies carry and
    /// what `dxctl` prints.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let text = serde_json::to_string(self).expect("settings always serialize");
        serde_json::from_str(&text).expect("serde_json reads its own output")
    }

    /// These settings with `patch` (a JSON object of some fields) applied, or every field's
    /// reason for refusing. Unknown fields, wrong types and values out of range are refused.
    pub fn apply(&self, patch: &serde_json::Map<String, Value>) -> Result<Settings, SettingsError> {
        let mut next = self.clone();
        let mut errors = BTreeMap::new();
        for (field, value) in patch {
            if let Err(reason) = next.set(field, value) {
                errors.insert(field.clone(), reason);
            }
        }
        let p = next.noise_policy;
        if errors.is_empty() && p.min_noise_level > p.max_noise_level {
            errors.insert(
                "min_noise_level".into(),
                format!(
                    "{} is above max_noise_level {}",
                    p.min_noise_level, p.max_noise_level
                ),
            );
        }
        // A kiosk must sample more than once a window, or readers (`dxctl stats`) see its
        // telemetry go stale between samples. Checked only when a change sets either field,
        // so a kiosk's own file is not refused through an unrelated change.
        let timing = ["telemetry_interval_s", "stats_window_s"];
        if errors.is_empty()
            && timing.iter().any(|f| patch.contains_key(*f))
            && u64::from(next.telemetry_interval_s) * 2 > u64::from(next.stats_window_s)
        {
            errors.insert(
                "telemetry_interval_s".into(),
                format!(
                    "{} is more than half of stats_window_s {}",
                    next.telemetry_interval_s, next.stats_window_s
                ),
            );
        }
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(SettingsError { errors })
        }
    }

    fn set(&mut self, field: &str, value: &Value) -> Result<(), String> {
        match field {
            "preview_steps" => self.preview_steps = int(value, 1, 50)? as u16,
            "cloud_steps" => self.cloud_steps = int(value, 1, 100)? as u16,
            "idle_timeout_s" => self.idle_timeout_s = int(value, 10, 3600)? as u32,
            "telemetry_interval_s" => self.telemetry_interval_s = int(value, 5, 3600)? as u32,
            "stats_window_s" => self.stats_window_s = int(value, 60, 86_400)? as u32,
            "noise_level" => self.noise_level = number(value, 0.05, 1.0)?,
            "noise_level_mode" => {
                self.noise_policy.noise_level_mode = serde_json::from_value(value.clone())
                    .map_err(|_| "must be \"predicted\" or \"fixed\"".to_string())?;
            }
            "quality_target" => self.noise_policy.quality_target = number(value, 0.0, 1.0)?,
            "min_noise_level" => self.noise_policy.min_noise_level = number(value, 0.05, 1.0)?,
            "max_noise_level" => self.noise_policy.max_noise_level = number(value, 0.05, 1.0)?,
            "cloud_budget_ms" => {
                self.noise_policy.cloud_budget_ms = int(value, 100, 600_000)? as u32;
            }
            "prompt_privacy" => {
                self.prompt_privacy = serde_json::from_value(value.clone())
                    .map_err(|_| "must be \"full\", \"hash\" or \"none\"".to_string())?;
            }
            "blocklist" => self.blocklist = blocklist(value)?,
            _ => return Err("unknown setting".into()),
        }
        Ok(())
    }

    /// The first blocklisted word `prompt` contains (case-insensitive, whole words).
    pub fn blocked(&self, prompt: &str) -> Option<&str> {
        blocked_word(&self.blocklist, prompt)
    }
}

/// The first entry of `blocklist` that `prompt` contains, case-insensitive and as whole words
/// (an entry of several words matches them in sequence): "gore" blocks "A GORE scene" but not
/// "gorgeous".
pub fn blocked_word<'a>(blocklist: &'a [String], prompt: &str) -> Option<&'a str> {
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let prompt = words(prompt);
    blocklist.iter().map(String::as_str).find(|entry| {
        let entry = words(entry);
        !entry.is_empty() && prompt.windows(entry.len()).any(|w| w == entry.as_slice())
    })
}

fn number(value: &Value, min: f64, max: f64) -> Result<f32, String> {
    let x = value.as_f64().ok_or("must be a number")?;
    if (min..=max).contains(&x) {
        Ok(x as f32)
    } else {
        Err(format!("{x} is outside {min:?}..={max:?}"))
    }
}

fn int(value: &Value, min: u64, max: u64) -> Result<u64, String> {
    let n = value.as_u64().ok_or("must be a whole number")?;
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is outside {min}..={max}"))
    }
}

/// Checks a blocklist value: an array of at most 1000 strings of 1-64 characters.
pub fn blocklist(value: &Value) -> Result<Vec<String>, String> {
    let items = value.as_array().ok_or("must be an array of strings")?;
    if items.len() > 1000 {
        return Err(format!("{} entries, at most 1000", items.len()));
    }
    items
        .iter()
        .map(|item| match item.as_str() {
            Some(s) if (1..=64).contains(&s.chars().count()) => Ok(s.to_string()),
            _ => Err(format!("{item} is not a string of 1-64 characters")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Settings {
        Settings {
            preview_steps: 4,
            noise_level: 0.5,
            cloud_steps: 20,
            idle_timeout_s: 60,
            prompt_privacy: PromptPrivacy::Full,
            telemetry_interval_s: 30,
            stats_window_s: 3600,
            blocklist: vec![],
            noise_policy: NoisePolicy::default(),
        }
    }

    #[test]
    fn the_noise_policy_is_checked_field_by_field_and_as_a_whole() {
        let next = base()
            .apply(&object(
                json!({"noise_level_mode": "fixed", "quality_target": 0.9,
                                   "min_noise_level": 0.3, "max_noise_level": 0.6,
                                   "cloud_budget_ms": 2500}),
            ))
            .expect("valid");
        assert_eq!(
            next.noise_policy,
            NoisePolicy {
                noise_level_mode: NoiseLevelMode::Fixed,
                quality_target: 0.9,
                min_noise_level: 0.3,
                max_noise_level: 0.6,
                cloud_budget_ms: 2500,
            }
        );
        let error = base()
            .apply(&object(
                json!({"noise_level_mode": "auto", "quality_target": 1.5,
                                   "cloud_budget_ms": 10}),
            ))
            .expect_err("refused");
        assert_eq!(
            error.errors["noise_level_mode"],
            "must be \"predicted\" or \"fixed\""
        );
        assert_eq!(error.errors["quality_target"], "1.5 is outside 0.0..=1.0");
        assert_eq!(
            error.errors["cloud_budget_ms"],
            "10 is outside 100..=600000"
        );
        // Each bound alone is valid; together they cross.
        let error = base()
            .apply(&object(
                json!({"min_noise_level": 0.7, "max_noise_level": 0.4}),
            ))
            .expect_err("refused");
        assert_eq!(
            error.errors["min_noise_level"],
            "0.7 is above max_noise_level 0.4"
        );
        // The fields are flat in the JSON form, and a report without them reads as defaults.
        let mut value = serde_json::to_value(base()).expect("serializes");
        assert_eq!(value["quality_target"], json!(0.8f32));
        for key in [
            "noise_level_mode",
            "quality_target",
            "min_noise_level",
            "max_noise_level",
            "cloud_budget_ms",
        ] {
            value.as_object_mut().expect("an object").remove(key);
        }
        let old: Settings = serde_json::from_value(value).expect("parses");
        assert_eq!(old.noise_policy, NoisePolicy::default());
    }

    fn object(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().cloned().expect("an object")
    }

    #[test]
    fn the_telemetry_interval_must_fit_twice_in_the_window() {
        let error = base()
            .apply(&object(
                json!({"telemetry_interval_s": 600, "stats_window_s": 300}),
            ))
            .expect_err("refused");
        assert_eq!(
            error.errors,
            BTreeMap::from([(
                "telemetry_interval_s".to_string(),
                "600 is more than half of stats_window_s 300".to_string()
            )])
        );
        // One field alone is checked against the other in force.
        let error = base()
            .apply(&object(json!({"telemetry_interval_s": 1801})))
            .expect_err("refused");
        assert_eq!(
            error.errors.keys().collect::<Vec<_>>(),
            ["telemetry_interval_s"]
        );
        let next = base()
            .apply(&object(
                json!({"telemetry_interval_s": 300, "stats_window_s": 600}),
            ))
            .expect("exactly half is fine");
        assert_eq!((next.telemetry_interval_s, next.stats_window_s), (300, 600));
        // A change of other fields does not refuse a kiosk whose own file breaks the rule.
        let mut own = base();
        own.telemetry_interval_s = 3600;
        assert!(own.apply(&object(json!({"preview_steps": 8}))).is_ok());
    }

    #[test]
    fn a_valid_patch_changes_only_its_fields() {
        let next = base()
            .apply(&object(
                json!({"preview_steps": 8, "prompt_privacy": "hash",
                                   "blocklist": ["gore", "hate speech"]}),
            ))
            .expect("valid");
        assert_eq!(next.preview_steps, 8);
        assert_eq!(next.prompt_privacy, PromptPrivacy::Hash);
        assert_eq!(next.blocklist, vec!["gore", "hate speech"]);
        assert_eq!(next.cloud_steps, 20);
        assert_eq!(next.noise_level, 0.5);
    }

    #[test]
    fn one_bad_field_refuses_the_whole_patch_with_a_reason_per_field() {
        let error = base()
            .apply(&object(json!({"preview_steps": 0, "noise_level": "high",
                                   "cloud_steps": 30, "colour": "red",
                                   "blocklist": [""]})))
            .expect_err("refused");
        let fields: Vec<&str> = error.errors.keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            ["blocklist", "colour", "noise_level", "preview_steps"]
        );
        assert_eq!(error.errors["preview_steps"], "0 is outside 1..=50");
        assert_eq!(error.errors["colour"], "unknown setting");
        assert_eq!(error.errors["noise_level"], "must be a number");
    }

    #[test]
    fn the_blocklist_matches_whole_words_without_case() {
        let settings = base()
            .apply(&object(json!({"blocklist": ["gore", "Hate Speech"]})))
            .expect("valid");
        assert_eq!(settings.blocked("A GORE scene"), Some("gore"));
        assert_eq!(settings.blocked("no hate-speech here"), Some("Hate Speech"));
        assert_eq!(settings.blocked("a gorgeous sunset"), None);
        assert_eq!(settings.blocked("hate the speech"), None);
    }

    #[test]
    fn privacy_hashes_with_the_salt() {
        let a = PromptPrivacy::Hash.apply("fleet-salt", "a red fox");
        let b = PromptPrivacy::Hash.apply("other-salt", "a red fox");
        assert_ne!(a, b);
        let Some(PromptField::Sha256(hex)) = a else {
            panic!("a hash")
        };
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hash_prompt("fleet-salt", "a red fox"));
        assert_eq!(
            PromptPrivacy::Full.apply("s", "fox"),
            Some(PromptField::Text("fox".into()))
        );
        assert_eq!(PromptPrivacy::None.apply("s", "fox"), None);
    }

    #[test]
    fn settings_round_trip_through_json() {
        let text = serde_json::to_string(&base()).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Settings>(&text).expect("parses"),
            base()
        );
    }
}
