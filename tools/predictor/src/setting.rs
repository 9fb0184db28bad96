//! The evaluation setting as a JSON file: the measured [`Context`] and the operator's
//! [`Policy`], each field optional (defaults below), unknown fields refused.
//!
//! ```json
//! {"context": {"queue_depth": 0, "expected_wait_ms": 0, "rtt_ms": 20,
//!              "uplink_bytes_per_s": 1000000, "step_ms": 50, "steps_total": 50,
//!              "latent_bytes": 32768, "result_ms": 200},
//!  "policy": {"quality_target": 0.8, "min_level": 0.2, "max_level": 0.8,
//!             "cloud_budget_ms": 4000}}
//! ```

use diffusionx_predictor::{Context, InputError, Policy};
use serde::Deserialize;

/// A [`Context`] as written in a setting file; defaults: a quiet gateway on a fast link.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextJson {
    /// See [`Context::queue_depth`]; 0.
    pub queue_depth: u32,
    /// See [`Context::expected_wait_ms`]; 0.
    pub expected_wait_ms: f32,
    /// See [`Context::rtt_ms`]; 20.
    pub rtt_ms: f32,
    /// See [`Context::uplink_bytes_per_s`]; 1 MB/s.
    pub uplink_bytes_per_s: f32,
    /// See [`Context::step_ms`]; 50.
    pub step_ms: f32,
    /// See [`Context::steps_total`]; 50.
    pub steps_total: u32,
    /// See [`Context::latent_bytes`]; 32768.
    pub latent_bytes: u32,
    /// See [`Context::result_ms`]; 200.
    pub result_ms: f32,
}

impl Default for ContextJson {
    fn default() -> Self {
        Self {
            queue_depth: 0,
            expected_wait_ms: 0.0,
            rtt_ms: 20.0,
            uplink_bytes_per_s: 1_000_000.0,
            step_ms: 50.0,
            steps_total: 50,
            latent_bytes: 32_768,
            result_ms: 200.0,
        }
    }
}

impl ContextJson {
    /// The crate's context, validated.
    pub fn to_context(&self) -> Result<Context, InputError> {
        let c = Context {
            queue_depth: self.queue_depth,
            expected_wait_ms: self.expected_wait_ms,
            rtt_ms: self.rtt_ms,
            uplink_bytes_per_s: self.uplink_bytes_per_s,
            step_ms: self.step_ms,
            steps_total: self.steps_total,
            latent_bytes: self.latent_bytes,
            result_ms: self.result_ms,
        };
        c.validate()?;
        Ok(c)
    }
}

/// A [`Policy`] as written in a setting file; defaults: [`Policy::default`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyJson {
    /// See [`Policy::quality_target`].
    pub quality_target: f32,
    /// See [`Policy::min_level`].
    pub min_level: f32,
    /// See [`Policy::max_level`].
    pub max_level: f32,
    /// See [`Policy::cloud_budget_ms`].
    pub cloud_budget_ms: f32,
}

impl Default for PolicyJson {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            quality_target: p.quality_target,
            min_level: p.min_level,
            max_level: p.max_level,
            cloud_budget_ms: p.cloud_budget_ms,
        }
    }
}

impl PolicyJson {
    /// The crate's policy, validated.
    pub fn to_policy(&self) -> Result<Policy, InputError> {
        let p = Policy {
            quality_target: self.quality_target,
            min_level: self.min_level,
            max_level: self.max_level,
            cloud_budget_ms: self.cloud_budget_ms,
        };
        p.validate()?;
        Ok(p)
    }
}

/// A whole setting file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Setting {
    /// The measured context.
    pub context: ContextJson,
    /// The operator's policy.
    pub policy: PolicyJson,
}
