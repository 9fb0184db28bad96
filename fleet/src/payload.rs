//! The JSON bodies of each topic. Every struct here is the schema `docs/mqtt.md` documents;
//! unknown fields are ignored on reading so newer kiosks can add fields without breaking older
//! tools.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::histogram::Histogram;
use crate::settings::Settings;

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// Connected.
    Online,
    /// Gone: a clean shutdown (with a reason) or the broker's last will (reason `connection lost`).
    Offline,
}

/// The body of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// Online or offline.
    pub state: PresenceState,
    /// The kiosk's boot counter (persisted, +1 per process start).
    pub boot: u64,
    /// The connection attempt of this boot that this message belongs to (1 for the first;
    /// failed attempts count too, so the first connection after 40 failed ones is 41). Only the
    /// order matters: a later connection has a higher number.
    pub conn: u64,
    /// When it was written (Unix ms; for a last will: when the connection was made).
    pub ts_ms: u64,
    /// Why it went offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Presence {
    /// Whether this message describes a later connection than `other`: (boot, conn) ordered.
    /// A last will from an older connection that arrives after a newer `online` is stale, and
    /// readers and the kiosk itself ignore (and the kiosk overwrites) it.
    pub fn is_newer_than(&self, other: &Presence) -> bool {
        (self.boot, self.conn) > (other.boot, other.conn)
    }
}

/// The kiosk's hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// Board model (`/proc/device-tree/model` or DMI product name), if known.
    pub model: Option<String>,
    /// CPU architecture (`aarch64`, `x86_64`).
    pub arch: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in MiB.
    pub mem_total_mb: u64,
}

/// The kiosk's display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisplayInfo {
    /// `fbdev`, `spi`, `headless`.
    pub backend: String,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

/// One model file set the kiosk runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `edge` (the preview pipeline) or another role.
    pub role: String,
    /// The folder's name.
    pub name: String,
    /// The SHA-256 of its manifest (hex), naming the exact weights.
    pub sha256: Option<String>,
    /// `f32` or `int8`.
    pub precision: Option<String>,
}

/// The body of `info` (retained birth facts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// Firmware version.
    pub firmware: String,
    /// Hardware facts.
    pub hardware: Hardware,
    /// The display.
    pub display: DisplayInfo,
    /// Models in use.
    pub models: Vec<ModelInfo>,
    /// Boot counter.
    pub boot: u64,
    /// Unix ms.
    pub ts_ms: u64,
}

/// Percentiles of one latency over the telemetry window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median in ms.
    pub p50_ms: Option<u64>,
    /// 95th percentile in ms.
    pub p95_ms: Option<u64>,
    /// The histogram they were read from (merge these for fleet percentiles).
    pub histogram: Histogram,
}

impl LatencySummary {
    /// A summary of a histogram.
    pub fn of(histogram: Histogram) -> Self {
        Self {
            count: histogram.count(),
            p50_ms: histogram.quantile(0.5),
            p95_ms: histogram.quantile(0.95),
            histogram,
        }
    }
}

/// The body of `telemetry` (periodic; the latest is retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// +1 per sample within a boot.
    pub seq: u64,
    /// Unix ms.
    pub ts_ms: u64,
    /// Boot counter.
    pub boot: u64,
    /// Seconds since the process started.
    pub uptime_s: u64,
    /// CPU temperature (`/sys/class/thermal`), if the board has a sensor.
    pub cpu_temp_c: Option<f32>,
    /// Memory in use, MiB (total minus available).
    pub mem_used_mb: Option<u64>,
    /// Total memory, MiB.
    pub mem_total_mb: Option<u64>,
    /// The process's resident memory, MiB.
    pub rss_mb: Option<u64>,
    /// One-minute load average.
    pub load1: Option<f32>,
    /// The window the counters and latencies cover, seconds (a rolling window ending now).
    pub window_s: u64,
    /// How much of `window_s` the counters really cover, seconds: less than `window_s` while
    /// the kiosk has run for less than a window (its counters start empty at every start).
    /// Absent from older kiosks (readers then take `min(window_s, uptime_s)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers_s: Option<u64>,
    /// Seconds between telemetry samples (the `telemetry_interval_s` setting in force), so
    /// readers can tell a silent kiosk from a live one. Absent from older kiosks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval_s: Option<u64>,
    /// Sessions finished in the window.
    pub sessions: u64,
    /// Preview rounds in the window.
    pub rounds: u64,
    /// Finalizes (cloud or local) in the window.
    #[serde(default)]
    pub finalizes: u64,
    /// Finalizes that fell back to the kiosk in the window.
    pub fallbacks: u64,
    /// `fallbacks / finalizes`, when there were finalizes.
    pub fallback_rate: Option<f32>,
    /// Preview latency (start of a round to its preview).
    pub preview: LatencySummary,
    /// Cloud latency (finalize to the refined picture, cloud path only).
    pub cloud: LatencySummary,
    /// Session reports waiting in the outbox (not yet acknowledged by the broker).
    pub outbox_pending: u64,
    /// Session reports that could not be written to disk so far (kept in memory, retried).
    pub outbox_write_errors: u64,
    /// Session reports given up so far: dropped past the outbox's in-memory cap (1000) while
    /// the disk refused writes, or unreadable on disk (set aside as `{seq}.unreadable`).
    #[serde(default)]
    pub outbox_lost: u64,
}

/// A prompt as the privacy setting lets it leave the kiosk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptField {
    /// The full text.
    Text(String),
    /// SHA-256 (hex) of the fleet's salt, a zero byte and the prompt: equal prompts are
    /// recognizable within a fleet, the text is not.
    Sha256(String),
}

/// One preview round of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The prompt (absent when the privacy setting is `none`).
    pub prompt: Option<PromptField>,
    /// Prompt length in CLIP tokens, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    /// The seed.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u16,
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
    /// Start of the round to its preview (absent if it was cancelled or failed).
    pub preview_ms: Option<u64>,
}

/// The `fallback_reason` of a session refined locally because the kiosk has no gateway: the
/// design, not a fallback (fleet statistics leave it out of the fallback count).
pub const LOCAL_ONLY: &str = "local-only";

impl Finalize {
    /// Whether the picture was refined on the kiosk because the cloud was given up (not a
    /// kiosk that has no gateway).
    pub fn is_fallback(&self) -> bool {
        self.path.as_deref() == Some("local") && self.fallback_reason.as_deref() != Some(LOCAL_ONLY)
    }
}

/// What happened when the visitor finalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finalize {
    /// The noise level the cloud (or the local fallback) redid, 0..=1.
    pub noise_level: f32,
    /// `cloud` or `local` (absent if the session ended before a path was taken).
    pub path: Option<String>,
    /// Finalize to the final picture, ms.
    pub refine_ms: Option<u64>,
    /// Jobs waiting at the gateway when it was asked.
    pub queue_depth: Option<u32>,
    /// The gateway's expected wait then, ms.
    pub expected_wait_ms: Option<u32>,
    /// Why the cloud was given up, if it was; [`LOCAL_ONLY`] for a kiosk without a gateway.
    pub fallback_reason: Option<String>,
    /// How the noise level was chosen (absent when the operator fixed it, or no decision was
    /// made: the gateway was unreachable before its load was known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<PredictorReport>,
    /// Why the predictor could not decide (the fixed `noise_level` was sent then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor_error: Option<String>,
}

/// The noise level predictor's inputs and decision at finalize: with the session's outcome
/// (`refine_ms`, `path`) and the visitor's `thumbs_up`, a training example from the fleet
/// (`dx-train --sessions`, docs/predictor.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorReport {
    /// The request's features v1, the text through the projection named below.
    pub features: diffusionx_predictor::Features,
    /// `Projection::fingerprint` of the projection that made `features.text`.
    pub projection: String,
    /// What the kiosk measured of the cloud and the link.
    pub context: diffusionx_predictor::Context,
    /// The operator's policy in force.
    pub policy: diffusionx_predictor::Policy,
    /// The level chosen, its steps, the quality and latency expected, and who decided.
    pub decision: diffusionx_predictor::Decision,
}

/// The body of `sessions`: one visitor session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    /// Unique across the fleet and stable across replays: `{device}-{boot}-{number}`.
    /// Receivers de-duplicate on it (a report can arrive twice after a crash or a lost PUBACK).
    pub id: String,
    /// Boot counter when the session ran.
    pub boot: u64,
    /// Sessions since that boot (1-based).
    pub number: u64,
    /// When the session ended (Unix ms).
    pub ts_ms: u64,
    /// Every preview round.
    pub rounds: Vec<RoundReport>,
    /// The finalize, if the visitor got that far.
    pub finalize: Option<Finalize>,
    /// The visitor's verdict on the final picture.
    pub thumbs_up: Option<bool>,
    /// `finished`, `abandoned` or `failed`.
    pub ending: String,
    /// Extra facts from newer firmware (predictor features, ...), passed through untouched.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl SessionReport {
    /// The report id of session `number` of boot `boot` on `device`.
    pub fn make_id(device: &str, boot: u64, number: u64) -> String {
        format!("{device}-{boot}-{number}")
    }
}

/// The body of a command reply on the response topic (correlation data copied from the request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    /// Whether the command was carried out.
    pub ok: bool,
    /// What it returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it was not carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CommandReply {
    /// A success.
    pub fn ok(result: Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A refusal.
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

/// The body of `config/desired`: settings from operators (a partial object: only the fields to
/// change from the kiosk's own configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigDesired {
    /// Increases with every change; a kiosk ignores a version it has already considered.
    pub version: u64,
    /// Field -> value, as in [`Settings`].
    pub settings: serde_json::Map<String, Value>,
    /// Noise level predictor weights to install (a `dx-train` weights file, as JSON); absent
    /// or `null`: the kiosk's own (shipped with its model, or the rule-based default). Like
    /// the settings, this is the operators' whole wish: a version without it removes earlier
    /// weights (`dxctl config set` carries them forward unless told otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<Value>,
}

impl ConfigDesired {
    /// SHA-256 (lowercase hex) of the content (settings and predictor weights, not the
    /// version): a kiosk tells a version it receives again (the retained message after a
    /// reconnect) from another change that reused the number.
    pub fn digest(&self) -> String {
        let predictor = self.predictor.as_ref().filter(|p| !p.is_null());
        let content = serde_json::json!({"settings": self.settings, "predictor": predictor});
        use sha2::{Digest, Sha256};
        // serde_json's maps are sorted by key, so equal content gives equal text.
        Sha256::digest(content.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The body of `config/reported`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigReported {
    /// The desired version this report answers (0: none received yet).
    pub version: u64,
    /// Whether that version was applied. When not, `errors` says why per field and the
    /// settings in force are unchanged.
    pub accepted: bool,
    /// The desired version in force (0: the kiosk's own configuration).
    pub applied_version: u64,
    /// The settings in force.
    pub settings: Settings,
    /// The operators' settings in force (field -> value, on top of the kiosk's own file): the
    /// applied desired version's and later `set-config` changes. Tools build the next desired
    /// version on it (absent from older kiosks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<serde_json::Map<String, Value>>,
    /// Field -> why it was refused (`predictor` for the weights).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, String>,
    /// The `model_version` of operator-installed predictor weights in force (absent: the
    /// kiosk's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<String>,
    /// Unix ms.
    pub ts_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stale_will_is_older_than_the_online_of_the_next_connection() {
        let will = Presence {
            state: PresenceState::Offline,
            boot: 4,
            conn: 9,
            ts_ms: 1,
            reason: Some("connection lost".into()),
        };
        let online = Presence {
            state: PresenceState::Online,
            boot: 5,
            conn: 1,
            ts_ms: 0,
            reason: None,
        };
        assert!(online.is_newer_than(&will));
        assert!(!will.is_newer_than(&online));
        let reconnect = Presence {
            conn: 10,
            ..will.clone()
        };
        assert!(reconnect.is_newer_than(&will));
    }

    #[test]
    fn a_desired_digest_names_its_content_not_its_version() {
        let desired = |v: Value| serde_json::from_value::<ConfigDesired>(v).expect("desired");
        let a = desired(json!({"version": 5, "settings": {"preview_steps": 6, "cloud_steps": 30}}));
        let same = desired(
            json!({"version": 6, "settings": {"cloud_steps": 30, "preview_steps": 6},
                                  "predictor": null}),
        );
        let other = desired(json!({"version": 5, "settings": {"preview_steps": 8}}));
        let weights = desired(
            json!({"version": 5, "settings": {"preview_steps": 6, "cloud_steps": 30},
                                     "predictor": {"model_version": "m1"}}),
        );
        assert_eq!(a.digest(), same.digest());
        assert_ne!(a.digest(), other.digest());
        assert_ne!(a.digest(), weights.digest());
        assert_eq!(a.digest().len(), 64);
    }

    #[test]
    fn session_reports_keep_unknown_fields_and_prompt_forms() {
        let text = json!({
            "id": "k1-3-7", "boot": 3, "number": 7, "ts_ms": 1700000000000u64,
            "rounds": [
                {"prompt": {"text": "a red fox"}, "seed": 42, "steps": 4, "width": 512,
                 "height": 512, "preview_ms": 2100},
                {"prompt": {"sha256": "ab"}, "seed": 42, "steps": 4, "width": 512,
                 "height": 512, "preview_ms": null},
                {"prompt": null, "seed": 1, "steps": 4, "width": 512, "height": 512,
                 "preview_ms": 1900}
            ],
            "finalize": {"noise_level": 0.5, "path": "cloud", "refine_ms": 3000,
                         "queue_depth": 0, "expected_wait_ms": 0, "fallback_reason": null},
            "thumbs_up": true, "ending": "finished",
            "predictor": {"level": 0.5}
        });
        let report: SessionReport = serde_json::from_value(text.clone()).expect("schema");
        assert_eq!(
            report.rounds[0].prompt,
            Some(PromptField::Text("a red fox".into()))
        );
        assert_eq!(
            report.rounds[1].prompt,
            Some(PromptField::Sha256("ab".into()))
        );
        assert_eq!(report.rounds[2].prompt, None);
        assert_eq!(report.extra["predictor"], json!({"level": 0.5}));
        assert_eq!(serde_json::to_value(&report).expect("serializes"), text);
        assert_eq!(SessionReport::make_id("k1", 3, 7), report.id);
    }

    /// A newer kiosk may add fields inside the predictor's report too: older readers
    /// (`dxctl sessions`, `dx-train --sessions`) keep the session.
    #[test]
    fn predictor_reports_from_newer_kiosks_still_parse() {
        let text = json!({
            "features": {"text": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "prompt_tokens": 5,
                         "rounds": 1, "prompt_cosine": 1.0, "latent_mean": 0.0,
                         "latent_std": 1.0, "x0_change": 0.01, "width": 512, "height": 512,
                         "edge_steps": 4, "future_feature": 3},
            "projection": "5fcc5abebe434b61",
            "context": {"queue_depth": 0, "expected_wait_ms": 0.0, "rtt_ms": 12.0,
                        "uplink_bytes_per_s": 1e6, "step_ms": 50.0, "steps_total": 50,
                        "latent_bytes": 33000, "result_ms": 200.0, "gpu": "h100"},
            "policy": {"quality_target": 0.8, "min_level": 0.2, "max_level": 0.8,
                       "cloud_budget_ms": 4000.0, "tier": "gold"},
            "decision": {"level": 0.26, "level_bp": 2600, "cloud_steps": 13,
                         "predicted_quality": 0.81, "expected_latency_ms": 900.0,
                         "limit": "target", "source": "rule_based", "margin": 0.02}
        });
        let report: PredictorReport = serde_json::from_value(text).expect("parses");
        assert_eq!(report.decision.cloud_steps, 13);
        assert_eq!(report.context.steps_total, 50);
        assert_eq!(report.features.edge_steps, 4);
    }
}
