//! `scheduler_config.json`, read the way diffusers' `from_config` reads it.

use serde_json::{Map, Value};

use crate::error::SchedulerError;
use crate::schedule::BetaSchedule;
use crate::timesteps::TimestepSpacing;

/// What the UNet predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictionType {
    /// The noise (`"epsilon"`, Stable Diffusion 1.x).
    #[default]
    Epsilon,
    /// The velocity `sqrt(abar) * noise - sqrt(1 - abar) * x0` (`"v_prediction"`).
    VPrediction,
    /// The clean latent itself (`"sample"`).
    Sample,
}

/// The settings of a diffusers `scheduler_config.json` that these schedulers use.
///
/// diffusers fills a key missing from the file with the default of the scheduler class it builds,
/// and those defaults differ between classes; the fields whose defaults differ are `Option`s,
/// `None` meaning "the class default", resolved by [`crate::Scheduler::new`] for its kind:
///
/// | field | DDIM | Euler | DPM++ 2M | LCM |
/// |---|---|---|---|---|
/// | `beta_start`, `beta_end`, `beta_schedule` | 0.0001, 0.02, linear | same | same | 0.00085, 0.012, scaled_linear |
/// | `timestep_spacing` | leading | linspace | linspace | (not used) |
/// | `clip_sample` | true | (not used) | (not used) | false |
///
/// The other fields have the same default in every class and are plain values.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Training timesteps `T` (1000).
    pub num_train_timesteps: usize,
    /// First beta; `None` for the class default.
    pub beta_start: Option<f64>,
    /// Last beta; `None` for the class default.
    pub beta_end: Option<f64>,
    /// How betas are spaced; `None` for the class default.
    pub beta_schedule: Option<BetaSchedule>,
    /// Added to `leading` timesteps (0; Stable Diffusion 1.x ships 1).
    pub steps_offset: usize,
    /// Timestep spacing; `None` for the class default.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// What the model predicts (epsilon).
    pub prediction_type: PredictionType,
    /// DDIM and LCM: `abar` after the last step is 1 (true) or `abar_0` (false).
    pub set_alpha_to_one: bool,
    /// DDIM and LCM clamp the predicted clean latent to `±clip_sample_range`; `None` for the
    /// class default.
    pub clip_sample: Option<bool>,
    /// The clamp bound of `clip_sample` (1.0).
    pub clip_sample_range: f64,
    /// LCM: the length of the distillation schedule its timesteps are drawn from (50).
    pub original_inference_steps: usize,
    /// LCM: the timestep factor of its boundary condition scalings (10.0).
    pub timestep_scaling: f64,
}

impl Default for SchedulerConfig {
    /// A file with no keys: every class's defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            beta_schedule: None,
            steps_offset: 0,
            timestep_spacing: None,
            prediction_type: PredictionType::Epsilon,
            set_alpha_to_one: true,
            clip_sample: None,
            clip_sample_range: 1.0,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

/// Keys of the diffusers classes that select variants these schedulers do not implement, with
/// the only value accepted. A file that sets one to anything else is refused, whatever kind is
/// chosen later: running it would silently differ from what the file asks for.
const FIXED: &[(&str, Fixed)] = &[
    ("trained_betas", Fixed::Null),
    ("thresholding", Fixed::Bool(false)),
    ("rescale_betas_zero_snr", Fixed::Bool(false)),
    ("use_karras_sigmas", Fixed::Bool(false)),
    ("use_exponential_sigmas", Fixed::Bool(false)),
    ("use_beta_sigmas", Fixed::Bool(false)),
    ("use_lu_lambdas", Fixed::Bool(false)),
    ("use_flow_sigmas", Fixed::Bool(false)),
    ("use_dynamic_shifting", Fixed::Bool(false)),
    ("interpolation_type", Fixed::Str("linear")),
    ("timestep_type", Fixed::Str("discrete")),
    ("final_sigmas_type", Fixed::Str("zero")),
    ("algorithm_type", Fixed::Str("dpmsolver++")),
    ("solver_type", Fixed::Str("midpoint")),
    ("solver_order", Fixed::Int(2)),
    ("lower_order_final", Fixed::Bool(true)),
    ("euler_at_final", Fixed::Bool(false)),
    ("variance_type", Fixed::Null),
    // DPM-Solver's schedule cut (diffusers' default -inf, which the file writes as `-Infinity`,
    // read as null): a finite value shortens the schedule, which is not implemented.
    ("lambda_min_clipped", Fixed::Null),
];

enum Fixed {
    Null,
    Bool(bool),
    Int(i64),
    Str(&'static str),
}

impl Fixed {
    fn accepts(&self, value: &Value) -> bool {
        match self {
            Self::Null => value.is_null(),
            Self::Bool(b) => value.as_bool() == Some(*b),
            Self::Int(i) => value.as_i64() == Some(*i),
            Self::Str(s) => value.as_str() == Some(*s),
        }
    }
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`. Unknown keys (`_class_name`,
    /// `skip_prk_steps`, ...) are ignored, as diffusers ignores keys a class does not take; a key
    /// set to `null` counts as missing; a key that asks for an unimplemented variant (Karras
    /// sigmas, thresholding, zero-terminal-SNR rescaling, another DPM-Solver algorithm or order,
    /// `beta_schedule` `squaredcos_cap_v2`, ...) is an error.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        let json = python_floats_to_null(json);
        let value: Value = serde_json::from_str(&json).map_err(SchedulerError::Json)?;
        let map = value.as_object().ok_or(SchedulerError::NotAnObject)?;
        for (key, fixed) in FIXED {
            if let Some(value) = map.get(*key)
                && !(value.is_null() || fixed.accepts(value))
            {
                return Err(unsupported(key, value));
            }
        }
        let defaults = Self::default();
        Ok(Self {
            num_train_timesteps: uint(map, "num_train_timesteps")?
                .unwrap_or(defaults.num_train_timesteps),
            beta_start: float(map, "beta_start")?,
            beta_end: float(map, "beta_end")?,
            beta_schedule: choice(
                map,
                "beta_schedule",
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                ],
            )?,
            steps_offset: uint(map, "steps_offset")?.unwrap_or(defaults.steps_offset),
            timestep_spacing: choice(
                map,
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
            )?,
            prediction_type: choice(
                map,
                "prediction_type",
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                ],
            )?
            .unwrap_or(defaults.prediction_type),
            set_alpha_to_one: boolean(map, "set_alpha_to_one")?
                .unwrap_or(defaults.set_alpha_to_one),
            clip_sample: boolean(map, "clip_sample")?,
            clip_sample_range: non_negative(map, "clip_sample_range")?
                .unwrap_or(defaults.clip_sample_range),
            original_inference_steps: uint(map, "original_inference_steps")?
                .unwrap_or(defaults.original_inference_steps),
            timestep_scaling: float(map, "timestep_scaling")?.unwrap_or(defaults.timestep_scaling),
        })
    }
}

fn present<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn invalid(key: &str, value: &Value, expected: &'static str) -> SchedulerError {
    SchedulerError::InvalidValue {
        key: key.to_owned(),
        value: value.to_string(),
        expected,
    }
}

fn unsupported(key: &str, value: &Value) -> SchedulerError {
    SchedulerError::Unsupported {
        key: key.to_owned(),
        value: value.to_string(),
    }
}

fn uint(map: &Map<String, Value>, key: &str) -> Result<Option<usize>, SchedulerError> {
    present(map, key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| invalid(key, v, "a non-negative integer"))
        })
        .transpose()
}

fn float(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, SchedulerError> {
    present(map, key)
        .map(|v| {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| invalid(key, v, "a number"))
        })
        .transpose()
}

/// A number of at least 0 (a clipping range: a negative one has no values inside it).
fn non_negative(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, SchedulerError> {
    let value = float(map, key)?;
    match (value, present(map, key)) {
        (Some(x), Some(v)) if x < 0.0 => Err(invalid(key, v, "a number of at least 0")),
        _ => Ok(value),
    }
}

fn boolean(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, SchedulerError> {
    present(map, key)
        .map(|v| v.as_bool().ok_or_else(|| invalid(key, v, "true or false")))
        .transpose()
}

fn choice<T: Copy>(
    map: &Map<String, Value>,
    key: &str,
    options: &[(&str, T)],
) -> Result<Option<T>, SchedulerError> {
    present(map, key)
        .map(|v| {
            let s = v.as_str().ok_or_else(|| invalid(key, v, "a string"))?;
            options
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, t)| *t)
                .ok_or_else(|| unsupported(key, v))
        })
        .transpose()
}

/// diffusers writes its configs with Python's `json`, which spells non-finite floats as bare
/// `Infinity`, `-Infinity` and `NaN` (DPM-Solver's `lambda_min_clipped` defaults to `-inf`). Those
/// are not JSON; outside strings they become `null`, which every key here reads as "default".
fn python_floats_to_null(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            let len = match c {
                '\\' => rest.chars().take(2).map(char::len_utf8).sum(),
                _ => c.len_utf8(),
            };
            in_string = c != '"';
            out.push_str(&rest[..len]);
            rest = &rest[len..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        in_string = c == '"';
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
