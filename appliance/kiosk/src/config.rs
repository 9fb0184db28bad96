//! `kiosk.toml`: the kiosk binary's configuration, checked at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::{Decode, TINY_VAE_DECODER};
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key or a wrong type (toml's message names line and key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml says.
        message: String,
    },
    /// A value out of range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KioskConfig {
    /// The edge model and how previews are made.
    pub model: ModelConfig,
    /// The display backend.
    pub display: DisplayConfig,
    /// The input source.
    #[serde(default)]
    pub input: InputConfig,
    /// The refinement gateway; without it every picture is refined on the kiosk.
    pub gateway: Option<GatewayConfig>,
    /// Visitor session behaviour.
    #[serde(default)]
    pub session: SessionSection,
    /// Where session records are kept.
    pub records: RecordsConfig,
    /// The fleet's MQTT broker; without it session reports stay in `records.dir`.
    pub mqtt: Option<diffusionx_agent::MqttConfig>,
    /// What the session reports and telemetry carry.
    #[serde(default)]
    pub reporting: ReportingSection,
    /// How the noise level is chosen at finalize.
    #[serde(default)]
    pub predictor: PredictorSection,
}

/// The noise level predictor (docs/predictor.md); operators can change all but `weights`
/// over MQTT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictorSection {
    /// `predicted` (the predictor, within the bounds below) or `fixed` (always
    /// `session.noise_level`).
    pub mode: diffusionx_fleet::NoiseLevelMode,
    /// The trained weights file; when absent, `predictor.json` in the model folder if there
    /// is one, else the rule-based default. A file operators installed over MQTT wins.
    pub weights: Option<PathBuf>,
    /// Predicted quality the chosen level must reach, 0..=1.
    pub quality_target: f32,
    /// Lowest level chosen.
    pub min_level: f32,
    /// Highest level chosen.
    pub max_level: f32,
    /// Expected cloud latency a session may spend, ms.
    pub cloud_budget_ms: u32,
}

impl Default for PredictorSection {
    fn default() -> Self {
        let policy = diffusionx_fleet::NoisePolicy::default();
        Self {
            mode: policy.noise_level_mode,
            weights: None,
            quality_target: policy.quality_target,
            min_level: policy.min_noise_level,
            max_level: policy.max_noise_level,
            cloud_budget_ms: policy.cloud_budget_ms,
        }
    }
}

/// Reporting to the fleet (operators can change these over MQTT).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportingSection {
    /// How prompts appear in session reports: `full`, `hash` (salted SHA-256) or `none`.
    pub prompt_privacy: diffusionx_fleet::PromptPrivacy,
    /// Seconds between telemetry samples.
    pub telemetry_interval_s: u32,
    /// Seconds of history that telemetry's counters and percentiles cover.
    pub stats_window_s: u32,
}

impl Default for ReportingSection {
    fn default() -> Self {
        Self {
            prompt_privacy: diffusionx_fleet::PromptPrivacy::Hash,
            telemetry_interval_s: 60,
            stats_window_s: 3600,
        }
    }
}

/// The edge model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The ONNX model folder (`onnx/export.py` / `onnx/quantize.py`).
    pub path: PathBuf,
    /// Image width in pixels (a multiple of 64, 256..=768).
    #[serde(default = "default_side")]
    pub width: usize,
    /// Image height in pixels.
    #[serde(default = "default_side")]
    pub height: usize,
    /// Denoising steps per preview.
    #[serde(default = "default_preview_steps")]
    pub preview_steps: u16,
    /// Guidance of previews (at most 1: none, twice as fast).
    #[serde(default = "one")]
    pub preview_guidance: f32,
    /// `ddim`, `euler`, `dpmpp2m` or `lcm`.
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// Schedule steps of a local refinement.
    #[serde(default = "default_refine_steps")]
    pub refine_steps: u16,
    /// Guidance of a local refinement.
    #[serde(default = "default_guidance")]
    pub refine_guidance: f32,
    /// Threads for the engine; 0 uses every core.
    #[serde(default)]
    pub threads: usize,
    /// Whose kernels run the engine's matrix products, `"packed"`, `"int8"` (as packed, and an
    /// int8 model's weights multiplied in 8-bit integer arithmetic), `"gemm"` or `"tract"`;
    /// unset, the engine's choice for this CPU (packed on x86-64 with AVX2 and FMA, gemm on
    /// other x86-64, tract elsewhere).
    #[serde(default)]
    pub products: Option<diffusionx_engine::Products>,
    /// What decodes a preview's picture (a local refinement always uses the VAE).
    #[serde(default)]
    pub preview_decoder: PreviewDecoder,
    /// What the screen shows after each preview step.
    #[serde(default)]
    pub step_previews: StepPreviews,
}

/// `model.preview_decoder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewDecoder {
    /// The folder's tiny VAE decoder when it has one (about a tenth of the VAE's cost, close
    /// to its picture), else the VAE.
    #[default]
    Auto,
    /// Always the VAE: the model's own picture, at its full cost.
    Vae,
    /// The tiny VAE decoder; start-up fails if the model folder has none.
    Tiny,
}

impl PreviewDecoder {
    /// The decoder this choice means for a model folder that has (`has_tiny`) the tiny VAE
    /// decoder or not; `None` for [`PreviewDecoder::Tiny`] without one.
    pub fn resolve(self, has_tiny: bool) -> Option<Decode> {
        match (self, has_tiny) {
            (PreviewDecoder::Vae, _) | (PreviewDecoder::Auto, false) => Some(Decode::Vae),
            (PreviewDecoder::Auto | PreviewDecoder::Tiny, true) => Some(Decode::Tiny),
            (PreviewDecoder::Tiny, false) => None,
        }
    }
}

/// `model.step_previews`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepPreviews {
    /// The predicted picture through the linear latent-to-RGB map, at 1/8 of the image's
    /// size: free, blurry.
    #[default]
    Latent,
    /// The predicted picture through the tiny VAE decoder at full size: one tiny-decoder
    /// call per step; start-up fails if the model folder has none.
    Tiny,
}

/// Where the picture goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DisplayConfig {
    /// In memory, optionally writing a PNG per screen (tests, demo, bring-up).
    Headless {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Physical width, for 9 mm touch keys.
        width_mm: Option<f32>,
        /// Folder for the screen PNGs.
        snapshots: Option<PathBuf>,
    },
    /// An SPI TFT panel driven from userspace (spidev + GPIO).
    Spi(crate::spi_panel::SpiPanelConfig),
    /// The Linux framebuffer (geometry and pixel format from the driver).
    Fbdev {
        /// The device.
        #[serde(default = "default_fb")]
        device: PathBuf,
        /// Physical width, for 9 mm touch keys.
        width_mm: Option<f32>,
    },
}

/// Where taps and keys come from.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum InputConfig {
    /// No input (a display-only bring-up).
    #[default]
    None,
    /// A scripted visitor (`script.rs` explains the format).
    Script {
        /// The script file.
        path: PathBuf,
    },
    /// Linux evdev devices.
    Evdev {
        /// The touchscreen.
        touch: Option<TouchConfig>,
        /// A keyboard (`/dev/input/by-id/...-event-kbd`).
        keyboard: Option<PathBuf>,
    },
}

/// A touchscreen and its calibration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchConfig {
    /// The device (`/dev/input/by-path/...-event`).
    pub device: PathBuf,
    /// Raw X at the left and right edge (`evtest` shows the axis range); when absent, the
    /// range the device reports (right for most panels mounted the right way round).
    pub x: Option<[i32; 2]>,
    /// Raw Y at the top and bottom edge; when absent, the range the device reports.
    pub y: Option<[i32; 2]>,
    /// Clockwise rotation of the display against the touch axes: 0, 90, 180, 270.
    #[serde(default)]
    pub rotation: u16,
}

/// The gateway and this kiosk's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address.
    pub address: SocketAddr,
    /// The name on the gateway's certificate.
    pub server_name: String,
    /// PEM CA that issued it.
    pub ca: PathBuf,
    /// This kiosk's PEM certificate (CN = device id).
    pub cert: PathBuf,
    /// Its PEM key.
    pub key: PathBuf,
    /// The device id.
    pub device_id: String,
    /// Give up on the cloud (and refine locally) after this long.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Connecting may take this long.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Schedule steps of the cloud job.
    #[serde(default = "default_cloud_steps")]
    pub steps: u16,
    /// Guidance of the cloud job.
    #[serde(default = "default_guidance")]
    pub guidance: f32,
}

/// Session behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    /// Back to the attract screen after this many idle seconds.
    pub idle_timeout_s: u64,
    /// How much of the preview the cloud redoes (0..=1) when `[predictor] mode = "fixed"`,
    /// and of a local refinement.
    pub noise_level: f32,
    /// The attract screen's text.
    pub hint: String,
    /// Words a prompt may not contain (whole words, any case).
    pub blocklist: Vec<String>,
}

impl Default for SessionSection {
    fn default() -> Self {
        Self {
            idle_timeout_s: 90,
            noise_level: 0.5,
            hint: "Touch the screen to make a picture".into(),
            blocklist: Vec::new(),
        }
    }
}

/// Session records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// A folder on persistent storage.
    pub dir: PathBuf,
}

/// The key in this file of a setting operators can change over MQTT (`field`, the setting's
/// name in `diffusionx_fleet::Settings`), so an error names what the engineer can edit.
fn setting_key(field: &str) -> &'static str {
    match field {
        "preview_steps" => "model.preview_steps",
        "noise_level" => "session.noise_level",
        "cloud_steps" => "gateway.steps",
        "idle_timeout_s" => "session.idle_timeout_s",
        "prompt_privacy" => "reporting.prompt_privacy",
        "telemetry_interval_s" => "reporting.telemetry_interval_s",
        "stats_window_s" => "reporting.stats_window_s",
        "blocklist" => "session.blocklist",
        "noise_level_mode" => "predictor.mode",
        "quality_target" => "predictor.quality_target",
        "min_noise_level" => "predictor.min_level",
        "max_noise_level" => "predictor.max_level",
        "cloud_budget_ms" => "predictor.cloud_budget_ms",
        _ => "settings",
    }
}

fn default_side() -> usize {
    256
}
fn default_preview_steps() -> u16 {
    4
}
fn one() -> f32 {
    1.0
}
fn default_guidance() -> f32 {
    7.5
}
fn default_scheduler() -> String {
    "ddim".into()
}
fn default_refine_steps() -> u16 {
    10
}
fn default_fb() -> PathBuf {
    PathBuf::from("/dev/fb0")
}
fn default_deadline_ms() -> u64 {
    60_000
}
fn default_connect_ms() -> u64 {
    3_000
}
fn default_cloud_steps() -> u16 {
    20
}

impl KioskConfig {
    /// Reads and checks `path`; relative paths inside are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths: Vec<&mut PathBuf> = vec![&mut config.model.path, &mut config.records.dir];
        if let Some(g) = &mut config.gateway {
            paths.extend([&mut g.ca, &mut g.cert, &mut g.key]);
        }
        if let Some(w) = &mut config.predictor.weights {
            paths.push(w);
        }
        if let Some(m) = &mut config.mqtt {
            paths.push(&mut m.state_dir);
            for p in [&mut m.ca, &mut m.cert, &mut m.key, &mut m.password_file]
                .into_iter()
                .flatten()
            {
                paths.push(p);
            }
        }
        match &mut config.input {
            InputConfig::Script { path } => paths.push(path),
            InputConfig::Evdev { touch, keyboard } => {
                if let Some(t) = touch {
                    paths.push(&mut t.device);
                }
                if let Some(k) = keyboard {
                    paths.push(k);
                }
            }
            InputConfig::None => {}
        }
        if let DisplayConfig::Headless {
            snapshots: Some(dir),
            ..
        } = &mut config.display
        {
            paths.push(dir);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        for (key, side) in [("model.width", m.width), ("model.height", m.height)] {
            if side % 64 != 0 || !(256..=768).contains(&side) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{side} is not a multiple of 64 in 256..=768"),
                });
            }
        }
        self.scheduler()?;
        self.noise_level()?;
        self.hint()?;
        if m.preview_steps == 0 {
            return Err(ConfigError::Invalid {
                key: "model.preview_steps",
                reason: "must be at least 1".into(),
            });
        }
        if let InputConfig::Evdev { touch: Some(t), .. } = &self.input
            && ![0, 90, 180, 270].contains(&t.rotation)
        {
            return Err(ConfigError::Invalid {
                key: "input.touch.rotation",
                reason: format!("{} is not 0, 90, 180 or 270", t.rotation),
            });
        }
        if let DisplayConfig::Spi(panel) = &self.display
            && ![0, 90, 180, 270].contains(&panel.rotation)
        {
            return Err(ConfigError::Invalid {
                key: "display.rotation",
                reason: format!("{} is not 0, 90, 180 or 270", panel.rotation),
            });
        }
        if let Some(m) = &self.mqtt {
            m.validate().map_err(|e| ConfigError::Invalid {
                key: "mqtt",
                reason: e.to_string(),
            })?;
        }
        // The settings operators may change must start valid: check them with the same rules,
        // and name the refused one by its key in this file.
        let base = self.settings();
        if let Err(refused) = base.apply(&base.to_json()) {
            let (field, reason) = refused.errors.into_iter().next().unwrap_or_default();
            return Err(ConfigError::Invalid {
                key: setting_key(&field),
                reason,
            });
        }
        self.check_guidance_and_steps()?;
        if let Some(g) = &self.gateway {
            diffusionx_protocol::DeviceId::new(g.device_id.clone()).map_err(|e| {
                ConfigError::Invalid {
                    key: "gateway.device_id",
                    reason: e.to_string(),
                }
            })?;
        }
        Ok(())
    }

    /// The values that would make every local refinement or every cloud job fail: each is
    /// refused here, by its key, rather than found in the reports as fallbacks.
    fn check_guidance_and_steps(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let limits = diffusionx_protocol::Limits::default();
        let m = &self.model;
        for (key, value) in [
            ("model.preview_guidance", m.preview_guidance),
            ("model.refine_guidance", m.refine_guidance),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(key, format!("{value} is not a finite number >= 0"));
            }
        }
        let level = self.noise_level()?;
        if m.refine_steps == 0 || level.denoising_steps(m.refine_steps) == 0 {
            return invalid(
                "model.refine_steps",
                format!(
                    "{} steps at session.noise_level {} leave no step to denoise: a local \
                     refinement needs refine_steps x noise_level >= 1",
                    m.refine_steps, self.session.noise_level
                ),
            );
        }
        let Some(g) = &self.gateway else {
            return Ok(());
        };
        if !(g.guidance.is_finite() && (0.0..=limits.max_guidance).contains(&g.guidance)) {
            return invalid(
                "gateway.guidance",
                format!(
                    "{} is not in 0..={} (the gateway refuses it)",
                    g.guidance, limits.max_guidance
                ),
            );
        }
        if !(1..=u64::from(limits.max_deadline_ms)).contains(&g.deadline_ms) {
            return invalid(
                "gateway.deadline_ms",
                format!(
                    "{} is not in 1..={} (the gateway refuses it)",
                    g.deadline_ms, limits.max_deadline_ms
                ),
            );
        }
        if g.connect_timeout_ms == 0 || g.connect_timeout_ms >= g.deadline_ms {
            return invalid(
                "gateway.connect_timeout_ms",
                format!(
                    "{} is not in 1..{} (gateway.deadline_ms)",
                    g.connect_timeout_ms, g.deadline_ms
                ),
            );
        }
        if self.predictor.mode == diffusionx_fleet::NoiseLevelMode::Fixed
            && level.denoising_steps(g.steps) == 0
        {
            return invalid(
                "gateway.steps",
                format!(
                    "{} steps at session.noise_level {} leave the cloud no step to denoise \
                     (steps x noise_level must be >= 1)",
                    g.steps, self.session.noise_level
                ),
            );
        }
        Ok(())
    }

    /// The visitor session's configuration as this file sets it (operators' settings over
    /// MQTT replace the ones they cover once the fleet agent has them).
    pub fn session_config(&self) -> Result<crate::session::SessionConfig, ConfigError> {
        Ok(crate::session::SessionConfig {
            idle_timeout: self.idle_timeout(),
            preview_steps: self.model.preview_steps,
            noise_level: self.noise_level()?,
            hint: self.hint()?.to_owned(),
            blocklist: self.session.blocklist.clone(),
            gateway: self.gateway.is_some(),
            ..crate::session::SessionConfig::default()
        })
    }

    /// The preview scheduler.
    pub fn scheduler(&self) -> Result<SchedulerKind, ConfigError> {
        Ok(match self.model.scheduler.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "dpmpp2m" => SchedulerKind::DpmSolverPp2m,
            "lcm" => SchedulerKind::Lcm,
            other => {
                return Err(ConfigError::Invalid {
                    key: "model.scheduler",
                    reason: format!("{other:?} is not one of ddim, euler, dpmpp2m, lcm"),
                });
            }
        })
    }

    /// The decoder of a preview's picture and whether steps preview through the tiny decoder,
    /// for a model folder that has (`has_tiny`) the tiny VAE decoder or not.
    pub fn preview_decoders(&self, has_tiny: bool) -> Result<(Decode, bool), ConfigError> {
        let missing = |key| ConfigError::Invalid {
            key,
            reason: format!(
                "\"tiny\" needs the model folder's tiny VAE decoder ({TINY_VAE_DECODER}), \
                 which {} does not have (add it with onnx/export.py --tiny-decoder)",
                self.model.path.display()
            ),
        };
        let decode = self
            .model
            .preview_decoder
            .resolve(has_tiny)
            .ok_or_else(|| missing("model.preview_decoder"))?;
        let tiny_steps = match (self.model.step_previews, has_tiny) {
            (StepPreviews::Latent, _) => false,
            (StepPreviews::Tiny, true) => true,
            (StepPreviews::Tiny, false) => return Err(missing("model.step_previews")),
        };
        Ok((decode, tiny_steps))
    }

    /// The attract screen's text, checked: the first thing every visitor reads must not be
    /// blank or show `'?'` for characters the kiosk's Latin-1 fonts lack.
    pub fn hint(&self) -> Result<&str, ConfigError> {
        let hint = self.session.hint.as_str();
        if hint.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "session.hint",
                reason: "is empty; the attract screen would invite nobody".into(),
            });
        }
        if let Some(c) = diffusionx_ui::undrawable(hint) {
            return Err(ConfigError::Invalid {
                key: "session.hint",
                reason: format!(
                    "{c:?} (U+{:04X}) cannot be drawn: the screen's fonts have \
                     U+0020-007E and U+00A0-00FF only",
                    u32::from(c)
                ),
            });
        }
        Ok(hint)
    }

    /// The noise level of the handover.
    pub fn noise_level(&self) -> Result<NoiseLevel, ConfigError> {
        NoiseLevel::from_fraction(self.session.noise_level)
            .filter(|n| n.bp() > 0)
            .ok_or_else(|| ConfigError::Invalid {
                key: "session.noise_level",
                reason: format!("{} is not in (0, 1]", self.session.noise_level),
            })
    }

    /// The settings operators can change over MQTT, as this file sets them.
    pub fn settings(&self) -> diffusionx_fleet::Settings {
        diffusionx_fleet::Settings {
            preview_steps: self.model.preview_steps,
            noise_level: self.session.noise_level,
            cloud_steps: self.gateway.as_ref().map_or(20, |g| g.steps),
            idle_timeout_s: u32::try_from(self.session.idle_timeout_s).unwrap_or(u32::MAX),
            prompt_privacy: self.reporting.prompt_privacy,
            telemetry_interval_s: self.reporting.telemetry_interval_s,
            stats_window_s: self.reporting.stats_window_s,
            blocklist: self.session.blocklist.clone(),
            noise_policy: diffusionx_fleet::NoisePolicy {
                noise_level_mode: self.predictor.mode,
                quality_target: self.predictor.quality_target,
                min_noise_level: self.predictor.min_level,
                max_noise_level: self.predictor.max_level,
                cloud_budget_ms: self.predictor.cloud_budget_ms,
            },
        }
    }

    /// The predictor weights file to load at start, if any: `predictor.weights`, else
    /// `predictor.json` in the model folder when it exists.
    pub fn predictor_weights(&self) -> Option<PathBuf> {
        self.predictor.weights.clone().or_else(|| {
            let shipped = self.model.path.join("predictor.json");
            shipped.is_file().then_some(shipped)
        })
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session.idle_timeout_s)
    }
}
